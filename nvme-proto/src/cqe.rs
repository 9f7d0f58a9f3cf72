//! The 16-byte completion queue entry (Linux `struct nvme_completion`).
//!
//! Byte map: 0..8 command specific result (DW0, DW1), 8..10 SQ head, 10..12 SQ id, 12..14 command id,
//! 14..16 phase tag (bit 0) and status field (bits 15:1).

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{DecodeError, view};
use crate::status::Status;

pub const CQE_LEN: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Cqe {
    pub dw0: U32,
    pub dw1: U32,
    pub sq_head: U16,
    pub sq_id: U16,
    pub command_id: U16,
    /// Phase tag in bit 0, status field in bits 15:1.
    pub status_phase: U16,
}
const _: () = assert!(size_of::<Cqe>() == CQE_LEN);

impl Cqe {
    pub fn parse(bytes: &[u8]) -> Result<&Cqe, DecodeError> {
        view("CQE", bytes)
    }

    pub fn new(command_id: u16, sq_id: u16, sq_head: u16, status: Status, result: u64) -> Cqe {
        Cqe {
            dw0: (result as u32).into(),
            dw1: ((result >> 32) as u32).into(),
            sq_head: sq_head.into(),
            sq_id: sq_id.into(),
            command_id: command_id.into(),
            status_phase: (status.raw() << 1).into(),
        }
    }

    pub fn to_array(&self) -> [u8; CQE_LEN] {
        let mut out = [0u8; CQE_LEN];
        out.copy_from_slice(self.as_bytes());
        out
    }

    pub fn status(&self) -> Status {
        Status::from_raw(self.status_phase.get() >> 1)
    }
    pub fn set_status(&mut self, status: Status) {
        self.status_phase = ((status.raw() << 1) | (self.status_phase.get() & 1)).into();
    }
    pub fn phase(&self) -> bool {
        self.status_phase.get() & 1 != 0
    }
    pub fn command_id(&self) -> u16 {
        self.command_id.get()
    }
    /// DW0 and DW1 as one 64-bit result (Property Get of CAP returns 8 bytes).
    pub fn result(&self) -> u64 {
        self.dw0.get() as u64 | (self.dw1.get() as u64) << 32
    }
}
