use std::net::SocketAddr;

use nvme_proto::Status;
use nvme_proto::rdma_cm::CmRejectStatus;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("transport: {0}")]
    Device(#[from] transport::DeviceError),
    #[error("the target rejected the connection: {} ({status:?})", status.description())]
    Rejected { status: CmRejectStatus },
    #[error("the target rejected the connection (CM reason {reason})")]
    RejectedRaw { reason: u16 },
    #[error("no answer from {0}")]
    Unreachable(SocketAddr),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("queue lost: {0}")]
    QueueLost(&'static str),
    #[error("{command} failed: {} (status {:#x}, DW0 {result:#x})", status.name(nvme_proto::status::CommandSet::Admin), status.raw())]
    Nvme { command: &'static str, status: Status, result: u64 },
    #[error("malformed data from the target: {0}")]
    Decode(#[from] nvme_proto::DecodeError),
    #[error("{0}")]
    Invalid(String),
    #[error("no path to the subsystem: {0}")]
    PathsLost(String),
}

impl HostError {
    /// The NVMe status, when the target answered with one.
    pub fn status(&self) -> Option<Status> {
        match self {
            HostError::Nvme { status, .. } => Some(*status),
            _ => None,
        }
    }
}
