//! The RDMA programming surface the target and the initiator are written against, with verbs semantics, and
//! its providers.
//!
//! The surface, re-exported here: a [`Device`] (opened by IP address or netdev name, with port state, GID and
//! async events), [`ProtectionDomain`]s, [`MemoryRegion`]s (lkey, rkey, access flags), [`CompletionQueue`]s
//! (poll up to N, or await the next completion from tokio), RC [`QueuePair`]s (RESET / INIT / RTR / RTS / ERR,
//! or driven by the connection manager), [`SharedReceiveQueue`]s, work requests SEND, SEND_WITH_INV,
//! SEND_WITH_IMM, RDMA_WRITE, RDMA_WRITE_WITH_IMM, RDMA_READ and RECV (one buffer or a scatter/gather list),
//! work completions with flush-with-error, and a connection manager carrying private data (listen, connect,
//! accept, reject, disconnect; events CONNECT_REQUEST, ESTABLISHED, REJECTED, UNREACHABLE, DISCONNECTED,
//! TIMEWAIT_EXIT, ADDR_CHANGE, DEVICE_REMOVAL, PORT_ACTIVE, PORT_ERR, QP_FATAL, DEVICE_FATAL). Buffers are leased
//! by ownership: posting moves a buffer in, its completion hands it back; a registered region belongs to the
//! device until deregistered.
//!
//! Providers: [`soft`], a userspace RoCEv2 (RC over UDP 4791, IB CM on QP1) wire-compatible with Linux rxe,
//! needing no hardware, root or kernel module ([`Device::open`]); and [`verbs`], libibverbs (loaded at run
//! time) and the kernel's connection manager, for real RNICs and kernel rxe ([`Device::open_verbs`]). Both are
//! one worker thread behind the same handles, which keeps the connection manager, plus lanes that the
//! application runs on its own threads for the data path (see [`lane`]).
#![deny(unsafe_code)]

pub mod buffer;
pub mod connection;
pub mod device;
pub mod lane;
pub mod mtu;
pub mod pinned_pool;
pub mod provider;
pub mod region;
pub mod soft;
pub mod verbs;
pub mod work_request;

pub use buffer::{Buffer, Pinned};
pub use connection::{ConnId, PeerParams};
pub use device::{
    Completion, CompletionQueue, ConnectionOptions, Device, DeviceError, DeviceEvent, DeviceStats, MemoryRegion,
    ProtectionDomain, QpState, QpTransition, QueuePair, SharedReceiveQueue,
};
pub use lane::Lane;
pub use pinned_pool::{PinnedPool, PoolLane};
pub use provider::Provider;
pub use region::{Access, RegionKeys};
pub use soft::device::SoftConfig;
pub use verbs::VerbsConfig;
pub use work_request::{RecvWr, SendOp, SendWr, WcOpcode, WcStatus, WorkCompletion};
