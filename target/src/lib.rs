//! nvmf-target: an NVMe-over-Fabrics RDMA target built to keep serving while the network under it fails.
//!
//! The transport-agnostic core follows Linux `drivers/nvme/target/`, one file per concern: [`core`] (the
//! target: subsystems, controller table, listeners for discovery), [`subsystem`], [`controller`], [`fabrics`]
//! (Connect, Property Get/Set), [`admin`], [`io`], [`discovery`], and the namespace [`backend`]s (RAM, file,
//! block device). The RDMA binding ([`rdma`]) owns threads and the transport: poll groups that alone own their
//! queues, listeners that route events to them by id and repair themselves, a bounded buffer pool per group.
//! [`config`] reads `target.toml`; [`control`] serves the stats snapshot on a Unix socket.
#![forbid(unsafe_code)]

pub mod admin;
pub mod backend;
pub mod config;
pub mod control;
pub mod controller;
pub mod core;
pub mod discovery;
pub mod fabrics;
pub mod io;
pub mod rdma;
pub mod subsystem;

pub use crate::core::{Target, TargetLimits};
pub use rdma::{RdmaOptions, RdmaTarget, Stats};
