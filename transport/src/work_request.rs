//! Work requests and work completions, the same for every provider. Buffers are leased by ownership: posting a
//! request moves its buffer into the provider, and the completion hands the same buffer back (filled, for RECV
//! and RDMA READ), whatever the outcome.
//!
//! A request's data is either one buffer (`buf`) or a scatter/gather list (`sg_list`, when non-empty): the
//! message is the segments' concatenation, and the completion hands the segments back, filled in order. The
//! engine gathers a list into one buffer while the request is in flight (one copy) and scatters it back.

use crate::buffer::Buffer;

/// What a send-queue work request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    Send,
    SendWithImm(u32),
    /// SEND that asks the responder to invalidate this rkey.
    SendWithInv(u32),
    RdmaWrite {
        remote_addr: u64,
        rkey: u32,
    },
    RdmaWriteWithImm {
        remote_addr: u64,
        rkey: u32,
        imm: u32,
    },
    /// Reads `buf.len()` bytes from the remote address into `buf`.
    RdmaRead {
        remote_addr: u64,
        rkey: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendWr {
    pub wr_id: u64,
    pub op: SendOp,
    /// Data to send or write; for RDMA READ, the buffer the data lands in (its length is the read length).
    /// Every request completes — there are no unsignaled requests — because the completion is what hands the
    /// buffer back.
    pub buf: Buffer,
    /// Segments instead of `buf`, when non-empty.
    pub sg_list: Vec<Buffer>,
    pub solicited: bool,
}

impl SendWr {
    pub fn new(wr_id: u64, op: SendOp, buf: impl Into<Buffer>) -> SendWr {
        SendWr { wr_id, op, buf: buf.into(), sg_list: Vec::new(), solicited: false }
    }

    /// A request whose data is the concatenation of `segments`.
    pub fn with_sg_list(wr_id: u64, op: SendOp, segments: Vec<Buffer>) -> SendWr {
        SendWr { wr_id, op, buf: Buffer::default(), sg_list: segments, solicited: false }
    }

    pub fn opcode(&self) -> WcOpcode {
        match self.op {
            SendOp::Send | SendOp::SendWithImm(_) | SendOp::SendWithInv(_) => WcOpcode::Send,
            SendOp::RdmaWrite { .. } | SendOp::RdmaWriteWithImm { .. } => WcOpcode::RdmaWrite,
            SendOp::RdmaRead { .. } => WcOpcode::RdmaRead,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvWr {
    pub wr_id: u64,
    /// Receive buffer; its length is the largest message it accepts.
    pub buf: Buffer,
    /// Segments instead of `buf`, when non-empty (the message fills them in order).
    pub sg_list: Vec<Buffer>,
}

impl RecvWr {
    pub fn new(wr_id: u64, buf: impl Into<Buffer>) -> RecvWr {
        RecvWr { wr_id, buf: buf.into(), sg_list: Vec::new() }
    }

    pub fn with_sg_list(wr_id: u64, segments: Vec<Buffer>) -> RecvWr {
        RecvWr { wr_id, buf: Buffer::default(), sg_list: segments }
    }
}

impl WorkCompletion {
    /// The completion of a request posted with `buf` / `sg_list`: the first `filled` bytes of the (gathered)
    /// buffer are scattered back into the list, and both are handed back.
    pub(crate) fn new(
        wr_id: u64,
        status: WcStatus,
        opcode: WcOpcode,
        byte_len: u32,
        mut buf: Buffer,
        mut sg_list: Vec<Buffer>,
        filled: usize,
    ) -> WorkCompletion {
        scatter(&mut buf, &mut sg_list, filled);
        WorkCompletion { wr_id, status, opcode, byte_len, imm: None, invalidated_rkey: None, buf, sg_list }
    }
}

/// Gathers a scatter/gather list into `buf` (no-op for a single buffer).
pub(crate) fn gather(buf: &mut Buffer, sg_list: &[Buffer]) {
    if !sg_list.is_empty() {
        // One allocation of the whole length, as `concat` made.
        let mut all = Vec::with_capacity(sg_list.iter().map(|s| s.len()).sum());
        for segment in sg_list {
            all.extend_from_slice(segment);
        }
        *buf = all.into();
    }
}

/// Scatters the first `len` bytes of `buf` back into the segments (no-op without a list); the gathered copy
/// is released so that the completion hands back exactly what was posted.
pub(crate) fn scatter(buf: &mut Buffer, sg_list: &mut [Buffer], len: usize) {
    if sg_list.is_empty() {
        return;
    }
    let mut at = 0;
    for segment in sg_list.iter_mut() {
        if at >= len {
            break;
        }
        let n = segment.len().min(len - at);
        segment[..n].copy_from_slice(&buf[at..at + n]);
        at += n;
    }
    *buf = Buffer::default();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WcOpcode {
    Send,
    RdmaWrite,
    RdmaRead,
    Recv,
    RecvRdmaWithImm,
}

/// Work completion status (the `ibv_wc_status` values that RC can produce).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WcStatus {
    Success,
    /// The message is larger than the receive buffer.
    LocalLength,
    LocalQpOperation,
    LocalProtection,
    /// The QP went to the error state before this request finished.
    WrFlush,
    RemoteInvalidRequest,
    RemoteAccess,
    RemoteOperation,
    /// Transport retries (timeouts / sequence errors) exhausted.
    RetryExceeded,
    RnrRetryExceeded,
    /// The responder saw a bad request and answered with a NAK.
    BadResponse,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkCompletion {
    pub wr_id: u64,
    pub status: WcStatus,
    pub opcode: WcOpcode,
    /// Bytes received (RECV) or transferred.
    pub byte_len: u32,
    pub imm: Option<u32>,
    /// The rkey a SEND_WITH_INV invalidated (RECV completions).
    pub invalidated_rkey: Option<u32>,
    /// The buffer the request was posted with, handed back.
    pub buf: Buffer,
    /// The scatter/gather list the request was posted with, handed back (filled for RECV and RDMA READ).
    pub sg_list: Vec<Buffer>,
}
