//! The NVMe-oF RDMA host: controller bring-up as the Linux host does it, discovery, Identify, Read / Write /
//! Flush / Write Zeroes / Deallocate with keyed SGLs (and in-capsule data for small writes), keep-alive,
//! asynchronous events and a clean shutdown — an async API over the `transport` crate's soft provider.
//!
//! [`Controller`] is one association. [`Session`] is what a user holds: one supervised [`Path`] per target
//! address, each reconnecting by its [`ReconnectPolicy`] (nvme-cli's reconnect-delay, ctrl-loss-tmo,
//! fast-io-fail-tmo); I/O fails over between paths and is sent again after a reconnection. [`perf`] is the
//! engine of `nvmf perf`; the `nvmf` binary is the CLI.
//!
//! ```no_run
//! # async fn demo() -> Result<(), initiator::HostError> {
//! use initiator::{ConnectOptions, Controller, TargetAddr};
//! let target = TargetAddr::new("127.0.0.1".parse().unwrap(), 4420);
//! let ctrl = Controller::connect(target, ConnectOptions::new("nqn.2026-11.io.nvmf-rs:ram")).await?;
//! ctrl.write(1, 0, vec![0xa5; 4096]).await?;
//! assert_eq!(ctrl.read(1, 0, 8).await?, vec![0xa5; 4096]);
//! ctrl.shutdown().await
//! # }
//! ```
#![forbid(unsafe_code)]

mod controller;
mod error;
mod events;
mod io_buffer;
mod lane;
mod loss;
mod path;
pub mod perf;
mod queue;
mod reconnect;
mod session;

pub use controller::{ConnectOptions, Controller, DataDir, NamespaceInfo, TargetAddr, default_hostid, discover};
pub use error::HostError;
pub use io_buffer::IoBuffer;
pub use path::{Path, PathState};
pub use queue::{CONNECT_TIMEOUT, DataMoveCounts, HostQueue};
pub use reconnect::{NextStep, ReconnectPolicy};
pub use session::Session;
