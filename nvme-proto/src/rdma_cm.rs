//! NVMe/RDMA connection manager private data (NVMe over Fabrics RDMA transport binding; Linux
//! `include/linux/nvme-rdma.h`): the request a host sends with its CM REQ, the accept a target sends with
//! REP, and the reject with its status.

use zerocopy::little_endian::U16;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{DecodeError, Reason};
use crate::status::Status;

pub const CM_REQUEST_LEN: usize = 32;
pub const CM_ACCEPT_LEN: usize = 32;
pub const CM_REJECT_LEN: usize = 4;
/// Record format 1.0, the only one defined.
pub const RECORD_FORMAT_1_0: u16 = 0;

#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RequestRaw {
    recfmt: U16,
    qid: U16,
    hrqsize: U16,
    hsqsize: U16,
    cntlid: U16,
    reserved10: [u8; 22],
}
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct AcceptRaw {
    recfmt: U16,
    crqsize: U16,
    reserved4: [u8; 28],
}
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RejectRaw {
    recfmt: U16,
    sts: U16,
}
const _: () = assert!(size_of::<RequestRaw>() == CM_REQUEST_LEN);
const _: () = assert!(size_of::<AcceptRaw>() == CM_ACCEPT_LEN);
const _: () = assert!(size_of::<RejectRaw>() == CM_REJECT_LEN);

/// The host's request (CM REQ private data, after the rdma_cm header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CmRequest {
    pub recfmt: u16,
    /// Queue id: 0 admin, 1.. I/O.
    pub qid: u16,
    /// Host receive queue size: the number of RDMA receive buffers the host posts (1's based).
    pub hrqsize: u16,
    /// Host send queue size: the NVMe SQ size, 0's based.
    pub hsqsize: u16,
    /// Controller id for I/O queues (NVMe-oF 1.1), 0 otherwise.
    pub cntlid: u16,
}

/// Why a target rejects a connection (the `sts` of the reject private data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmRejectStatus {
    InvalidLength = 0x01,
    InvalidRecordFormat = 0x02,
    InvalidQueueId = 0x03,
    InvalidHostSqSize = 0x04,
    InvalidHostRqSize = 0x05,
    NoResources = 0x06,
    InvalidIrd = 0x07,
    InvalidOrd = 0x08,
}

impl CmRejectStatus {
    pub const ALL: [CmRejectStatus; 8] = [
        CmRejectStatus::InvalidLength,
        CmRejectStatus::InvalidRecordFormat,
        CmRejectStatus::InvalidQueueId,
        CmRejectStatus::InvalidHostSqSize,
        CmRejectStatus::InvalidHostRqSize,
        CmRejectStatus::NoResources,
        CmRejectStatus::InvalidIrd,
        CmRejectStatus::InvalidOrd,
    ];
    pub fn from_u16(sts: u16) -> Option<Self> {
        CmRejectStatus::ALL.into_iter().find(|s| *s as u16 == sts)
    }
    pub fn description(self) -> &'static str {
        match self {
            CmRejectStatus::InvalidLength => "invalid private data length",
            CmRejectStatus::InvalidRecordFormat => "invalid record format",
            CmRejectStatus::InvalidQueueId => "invalid queue id",
            CmRejectStatus::InvalidHostSqSize => "invalid host SQ size",
            CmRejectStatus::InvalidHostRqSize => "invalid host RQ size",
            CmRejectStatus::NoResources => "no resources",
            CmRejectStatus::InvalidIrd => "invalid IRD",
            CmRejectStatus::InvalidOrd => "invalid ORD",
        }
    }
}

/// A CM-level decode failure, with the reject status a target answers it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("NVMe/RDMA CM {what}: {reason} -> reject {status:?}")]
pub struct CmError {
    pub what: &'static str,
    pub reason: Reason,
    pub status: CmRejectStatus,
}

impl From<CmError> for DecodeError {
    fn from(e: CmError) -> DecodeError {
        DecodeError::new(e.what, 0, e.reason, Status::INVALID_FIELD.with_dnr())
    }
}

impl CmRequest {
    /// Decodes a host's private data. Longer private data is fine (CM pads it); shorter is an invalid length,
    /// a record format other than 1.0 an invalid record format: each with the status to reject with.
    pub fn parse(bytes: &[u8]) -> Result<CmRequest, CmError> {
        let (raw, _) = RequestRaw::ref_from_prefix(bytes).map_err(|_| CmError {
            what: "request",
            reason: Reason::Length { expected: CM_REQUEST_LEN, actual: bytes.len() },
            status: CmRejectStatus::InvalidLength,
        })?;
        if raw.recfmt.get() != RECORD_FORMAT_1_0 {
            return Err(CmError {
                what: "request RECFMT",
                reason: Reason::Value(raw.recfmt.get() as u64),
                status: CmRejectStatus::InvalidRecordFormat,
            });
        }
        Ok(CmRequest {
            recfmt: raw.recfmt.get(),
            qid: raw.qid.get(),
            hrqsize: raw.hrqsize.get(),
            hsqsize: raw.hsqsize.get(),
            cntlid: raw.cntlid.get(),
        })
    }

    pub fn to_bytes(&self) -> [u8; CM_REQUEST_LEN] {
        let raw = RequestRaw {
            recfmt: self.recfmt.into(),
            qid: self.qid.into(),
            hrqsize: self.hrqsize.into(),
            hsqsize: self.hsqsize.into(),
            cntlid: self.cntlid.into(),
            reserved10: [0; 22],
        };
        let mut out = [0u8; CM_REQUEST_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }
}

/// The target's accept (CM REP private data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CmAccept {
    pub recfmt: u16,
    /// Controller receive queue size: RDMA receive buffers the target posted (1's based).
    pub crqsize: u16,
}

impl CmAccept {
    pub fn parse(bytes: &[u8]) -> Result<CmAccept, CmError> {
        let (raw, _) = AcceptRaw::ref_from_prefix(bytes).map_err(|_| CmError {
            what: "accept",
            reason: Reason::Length { expected: CM_ACCEPT_LEN, actual: bytes.len() },
            status: CmRejectStatus::InvalidLength,
        })?;
        if raw.recfmt.get() != RECORD_FORMAT_1_0 {
            return Err(CmError {
                what: "accept RECFMT",
                reason: Reason::Value(raw.recfmt.get() as u64),
                status: CmRejectStatus::InvalidRecordFormat,
            });
        }
        Ok(CmAccept { recfmt: raw.recfmt.get(), crqsize: raw.crqsize.get() })
    }

    pub fn to_bytes(&self) -> [u8; CM_ACCEPT_LEN] {
        let raw = AcceptRaw { recfmt: self.recfmt.into(), crqsize: self.crqsize.into(), reserved4: [0; 28] };
        let mut out = [0u8; CM_ACCEPT_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }
}

/// The target's reject (CM REJ private data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CmReject {
    pub recfmt: u16,
    pub status: CmRejectStatus,
}

impl CmReject {
    pub fn new(status: CmRejectStatus) -> Self {
        CmReject { recfmt: RECORD_FORMAT_1_0, status }
    }

    /// Decodes a reject; an unknown status code is an error (the host reports it raw).
    pub fn parse(bytes: &[u8]) -> Result<CmReject, DecodeError> {
        let (raw, _) = RejectRaw::ref_from_prefix(bytes)
            .map_err(|_| DecodeError::length("NVMe/RDMA CM reject", CM_REJECT_LEN, bytes.len()))?;
        let status = CmRejectStatus::from_u16(raw.sts.get()).ok_or(DecodeError::value(
            "NVMe/RDMA CM reject STS",
            2,
            raw.sts.get() as u64,
        ))?;
        Ok(CmReject { recfmt: raw.recfmt.get(), status })
    }

    pub fn to_bytes(&self) -> [u8; CM_REJECT_LEN] {
        let raw = RejectRaw { recfmt: self.recfmt.into(), sts: (self.status as u16).into() };
        let mut out = [0u8; CM_REJECT_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }
}
