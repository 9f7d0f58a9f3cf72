//! SGL descriptors (16 bytes), as NVMe/RDMA uses them in an SQE's data pointer.
//!
//! Byte 15 is the identifier: descriptor type in bits 7:4, subtype in bits 3:0.
//! - Keyed SGL Data Block (type 0x4): address 0..8, length 8..11 (24-bit), key 11..15; subtype 0x0 (address)
//!   or 0xF (invalidate key: the target answers with SEND_WITH_INV).
//! - SGL Data Block (type 0x0) with subtype 0x1 (offset): address 0..8 is an offset into in-capsule data,
//!   length 8..12 (32-bit).
//! - Segment (0x2) and Last Segment (0x3): decoded so that a target can reject them with the right status.

use crate::error::{DecodeError, Reason, exact};
use crate::status::Status;

pub const SGL_DESCRIPTOR_LEN: usize = 16;
/// Largest length a keyed data block can carry (24 bits).
pub const KEYED_MAX_LEN: u32 = 0xff_ffff;

pub mod descriptor_type {
    pub const DATA_BLOCK: u8 = 0x0;
    pub const BIT_BUCKET: u8 = 0x1;
    pub const SEGMENT: u8 = 0x2;
    pub const LAST_SEGMENT: u8 = 0x3;
    pub const KEYED_DATA_BLOCK: u8 = 0x4;
    pub const TRANSPORT_DATA_BLOCK: u8 = 0x5;
    pub const VENDOR: u8 = 0xf;
}

pub mod subtype {
    pub const ADDRESS: u8 = 0x0;
    pub const OFFSET: u8 = 0x1;
    pub const TRANSPORT: u8 = 0xa;
    pub const INVALIDATE_KEY: u8 = 0xf;
}

/// A decoded SGL descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SglDescriptor {
    /// Remote memory the target reaches with RDMA READ / WRITE.
    Keyed { address: u64, length: U24, key: u32, invalidate: bool },
    /// Data carried in the capsule after the SQE, at `offset` from its start.
    InCapsule { offset: u64, length: u32 },
    /// A pointer to further descriptors; NVMe/RDMA targets need not support these.
    Segment { address: u64, length: u32, last: bool },
}

impl Default for SglDescriptor {
    /// The "no data" descriptor the Linux host sends: keyed, address 0, length 0, key 0.
    fn default() -> Self {
        SglDescriptor::Keyed { address: 0, length: U24::ZERO, key: 0, invalidate: false }
    }
}

/// The 24-bit length of a keyed data block; built only through a check, so it can never be truncated on emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct U24(u32);

impl U24 {
    pub const ZERO: U24 = U24(0);
    pub const MAX: U24 = U24(KEYED_MAX_LEN);
    pub const fn new(value: u32) -> Option<U24> {
        if value <= KEYED_MAX_LEN { Some(U24(value)) } else { None }
    }
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl SglDescriptor {
    /// Offset of the descriptor identifier byte.
    pub const IDENTIFIER: usize = 15;

    /// A keyed descriptor; refuses lengths that do not fit in 24 bits instead of truncating them.
    pub fn keyed(address: u64, length: u32, key: u32, invalidate: bool) -> Result<Self, DecodeError> {
        let length = U24::new(length).ok_or(DecodeError::new(
            "keyed SGL length",
            8,
            Reason::Value(length as u64),
            Status::SGL_INVALID_DATA_LENGTH.with_dnr(),
        ))?;
        Ok(SglDescriptor::Keyed { address, length, key, invalidate })
    }

    pub fn in_capsule(offset: u64, length: u32) -> Self {
        SglDescriptor::InCapsule { offset, length }
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, DecodeError> {
        let b: &[u8; SGL_DESCRIPTOR_LEN] = exact("SGL descriptor", bytes)?;
        let address = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
        let id = b[15];
        let (kind, sub) = (id >> 4, id & 0xf);
        let invalid_subtype = || {
            DecodeError::new(
                "SGL descriptor subtype",
                Self::IDENTIFIER,
                Reason::Value(id as u64),
                Status::INVALID_FIELD.with_dnr(),
            )
        };
        match kind {
            descriptor_type::KEYED_DATA_BLOCK => {
                let invalidate = match sub {
                    subtype::ADDRESS => false,
                    subtype::INVALIDATE_KEY => true,
                    _ => return Err(invalid_subtype()),
                };
                let length = U24(u32::from_le_bytes([b[8], b[9], b[10], 0]));
                let key = u32::from_le_bytes(b[11..15].try_into().expect("4 bytes"));
                Ok(SglDescriptor::Keyed { address, length, key, invalidate })
            }
            descriptor_type::DATA_BLOCK | descriptor_type::SEGMENT | descriptor_type::LAST_SEGMENT => {
                let length = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
                match (kind, sub) {
                    (descriptor_type::DATA_BLOCK, subtype::OFFSET) => {
                        Ok(SglDescriptor::InCapsule { offset: address, length })
                    }
                    (descriptor_type::DATA_BLOCK, _) => Err(invalid_subtype()),
                    (_, subtype::ADDRESS) => {
                        Ok(SglDescriptor::Segment { address, length, last: kind == descriptor_type::LAST_SEGMENT })
                    }
                    _ => Err(invalid_subtype()),
                }
            }
            _ => Err(DecodeError::new(
                "SGL descriptor type",
                Self::IDENTIFIER,
                Reason::Value(id as u64),
                Status::SGL_INVALID_TYPE.with_dnr(),
            )),
        }
    }

    pub fn to_bytes(&self) -> [u8; SGL_DESCRIPTOR_LEN] {
        let mut b = [0u8; SGL_DESCRIPTOR_LEN];
        match *self {
            SglDescriptor::Keyed { address, length, key, invalidate } => {
                b[0..8].copy_from_slice(&address.to_le_bytes());
                b[8..11].copy_from_slice(&length.get().to_le_bytes()[..3]);
                b[11..15].copy_from_slice(&key.to_le_bytes());
                b[15] = descriptor_type::KEYED_DATA_BLOCK << 4
                    | if invalidate { subtype::INVALIDATE_KEY } else { subtype::ADDRESS };
            }
            SglDescriptor::InCapsule { offset, length } => {
                b[0..8].copy_from_slice(&offset.to_le_bytes());
                b[8..12].copy_from_slice(&length.to_le_bytes());
                b[15] = descriptor_type::DATA_BLOCK << 4 | subtype::OFFSET;
            }
            SglDescriptor::Segment { address, length, last } => {
                b[0..8].copy_from_slice(&address.to_le_bytes());
                b[8..12].copy_from_slice(&length.to_le_bytes());
                let kind = if last { descriptor_type::LAST_SEGMENT } else { descriptor_type::SEGMENT };
                b[15] = kind << 4 | subtype::ADDRESS;
            }
        }
        b
    }

    /// This descriptor, if an NVMe/RDMA target can move its data: keyed (RDMA READ/WRITE) or in-capsule.
    /// Segments are refused as Linux nvmet-rdma refuses them: SGL Descriptor Type Invalid, at the
    /// descriptor's identifier byte.
    pub fn for_rdma(self) -> Result<Self, DecodeError> {
        match self {
            SglDescriptor::Keyed { .. } | SglDescriptor::InCapsule { .. } => Ok(self),
            SglDescriptor::Segment { .. } => Err(DecodeError::new(
                "SGL descriptor type",
                Self::IDENTIFIER,
                Reason::Value(self.to_bytes()[Self::IDENTIFIER] as u64),
                Status::SGL_INVALID_TYPE.with_dnr(),
            )),
        }
    }

    /// Number of data bytes this descriptor describes.
    pub fn length(&self) -> u32 {
        match *self {
            SglDescriptor::Keyed { length, .. } => length.get(),
            SglDescriptor::InCapsule { length, .. } | SglDescriptor::Segment { length, .. } => length,
        }
    }
}
