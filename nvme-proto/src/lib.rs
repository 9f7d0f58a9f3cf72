//! NVMe and NVMe over Fabrics wire formats for the RDMA transport binding.
//!
//! Everything here is bytes in, typed values out (and back): no I/O, no threads, no clocks, no `unsafe`.
//! Each parser takes untrusted bytes and returns a [`DecodeError`] that names the field, its byte offset and
//! the NVMe [`Status`] a target completes the command with; nothing panics on bad input.
//!
//! Layouts follow Linux `include/linux/nvme.h` and `include/linux/nvme-rdma.h`; the byte offsets are pinned by
//! known-answer tests, and decoding is checked against real kernel traffic captured on the wire.
//!
//! | module | what it holds |
//! |---|---|
//! | [`sqe`], [`cqe`] | the 64-byte SQE and 16-byte CQE |
//! | [`status`] | completion status codes with names |
//! | [`sgl`] | SGL descriptors (keyed, in-capsule, segments) |
//! | [`command`] | typed admin, I/O and Fabrics commands ([`Capsule::parse`]) |
//! | [`fabrics`], [`property`] | Connect and its data, Property Get/Set, CAP/VS/CC/CSTS |
//! | [`identify`] | Identify Controller / Namespace, namespace lists, descriptors |
//! | [`log_page`], [`discovery`] | log pages, the discovery log |
//! | [`features`], [`aer`], [`io`] | Set/Get Features values, AER completions, I/O commands and DSM ranges |
//! | [`rdma_cm`] | NVMe/RDMA CM private data (request, accept, reject) |
//! | [`nqn`], [`uuid`], [`text`] | names and fixed-width text fields |
#![forbid(unsafe_code)]

pub mod aer;
pub mod command;
pub mod cqe;
pub mod discovery;
pub mod error;
pub mod fabrics;
pub mod features;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod identify;
pub mod io;
pub mod log_page;
pub mod nqn;
pub mod property;
pub mod rdma_cm;
pub mod sgl;
pub mod sqe;
pub mod status;
pub mod text;
pub mod uuid;

pub use command::{AdminCommand, Capsule, Command, FabricsCommand, IoCommand, QueueKind};
pub use cqe::Cqe;
pub use error::DecodeError;
pub use nqn::Nqn;
pub use sgl::SglDescriptor;
pub use sqe::Sqe;
pub use status::Status;
pub use uuid::Uuid;
