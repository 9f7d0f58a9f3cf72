//! The 64-byte submission queue entry (Linux `struct nvme_common_command`), as a raw view.
//!
//! Byte map: 0 opcode, 1 flags (FUSE 1:0, PSDT 7:6), 2..4 command id, 4..8 NSID (for Fabrics commands byte 4 is
//! FCTYPE), 8..16 CDW2-3, 16..24 metadata pointer, 24..40 data pointer (an SGL descriptor on Fabrics),
//! 40..64 CDW10-15. Typed decoding lives in [`crate::command`].

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{DecodeError, view};

pub const SQE_LEN: usize = 64;

/// Byte offsets of the common fields, for error locations and known-answer tests.
pub mod offset {
    pub const OPCODE: usize = 0;
    pub const FLAGS: usize = 1;
    pub const COMMAND_ID: usize = 2;
    pub const NSID: usize = 4;
    pub const FCTYPE: usize = 4;
    pub const MPTR: usize = 16;
    pub const DPTR: usize = 24;
    pub const CDW10: usize = 40;
    pub const CDW11: usize = 44;
    pub const CDW12: usize = 48;
    pub const CDW13: usize = 52;
    pub const CDW14: usize = 56;
    pub const CDW15: usize = 60;
}

/// PSDT values (flags bits 7:6).
pub mod psdt {
    /// PRPs (PCIe only).
    pub const PRP: u8 = 0;
    /// SGL for data, metadata pointer to a contiguous buffer: the only value NVMe-oF allows.
    pub const SGL_METADATA_BUFFER: u8 = 1;
    /// SGL for data and metadata.
    pub const SGL_METADATA_SGL: u8 = 2;
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Sqe {
    pub opcode: u8,
    pub flags: u8,
    pub command_id: U16,
    pub nsid: U32,
    pub cdw2: U32,
    pub cdw3: U32,
    pub mptr: U64,
    pub dptr: [u8; 16],
    pub cdw10: U32,
    pub cdw11: U32,
    pub cdw12: U32,
    pub cdw13: U32,
    pub cdw14: U32,
    pub cdw15: U32,
}
const _: () = assert!(size_of::<Sqe>() == SQE_LEN);

impl Default for Sqe {
    fn default() -> Self {
        Sqe::new_zeroed()
    }
}

impl Sqe {
    /// Views exactly 64 bytes as an SQE.
    pub fn parse(bytes: &[u8]) -> Result<&Sqe, DecodeError> {
        view("SQE", bytes)
    }

    /// A zeroed SQE with the opcode, PSDT = SGL (as NVMe-oF requires) and the command id.
    pub fn with_opcode(opcode: u8, command_id: u16) -> Sqe {
        Sqe { opcode, flags: psdt::SGL_METADATA_BUFFER << 6, command_id: command_id.into(), ..Sqe::default() }
    }

    pub fn to_array(&self) -> [u8; SQE_LEN] {
        let mut out = [0u8; SQE_LEN];
        out.copy_from_slice(self.as_bytes());
        out
    }

    pub fn command_id(&self) -> u16 {
        self.command_id.get()
    }
    /// Fused operation (flags 1:0).
    pub fn fuse(&self) -> u8 {
        self.flags & 3
    }
    /// PRP or SGL for data transfer (flags 7:6).
    pub fn psdt(&self) -> u8 {
        self.flags >> 6
    }
    /// Fabrics command type (byte 4), meaningful when opcode is [`crate::command::opcode::FABRICS`].
    pub fn fctype(&self) -> u8 {
        self.nsid.get() as u8
    }
    /// CDW10..CDW15 by number; `None` for any other number.
    pub fn cdw(&self, n: usize) -> Option<u32> {
        Some(match n {
            10 => self.cdw10.get(),
            11 => self.cdw11.get(),
            12 => self.cdw12.get(),
            13 => self.cdw13.get(),
            14 => self.cdw14.get(),
            15 => self.cdw15.get(),
            _ => return None,
        })
    }
}
