//! NVM command set I/O commands: Read, Write, Flush, Write Zeroes, Dataset Management and its range list
//! (Linux `struct nvme_rw_command`, `nvme_write_zeroes_cmd`, `nvme_dsm_cmd`, `nvme_dsm_range`).

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{DecodeError, Reason};
use crate::sqe::Sqe;
use crate::status::Status;

/// Read / Write CDW12 bits 31:16 (`control`).
pub mod control {
    /// Limited Retry.
    pub const LIMITED_RETRY: u16 = 1 << 15;
    /// Force Unit Access.
    pub const FUA: u16 = 1 << 14;
    /// Protection information field (bits 13:10).
    pub const PRINFO_MASK: u16 = 0xf << 10;
    /// Write Zeroes: deallocate the blocks (CDW12 bit 25).
    pub const DEALLOCATE: u16 = 1 << 9;
}

/// Read, Write (and the same layout for Write Zeroes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ReadWrite {
    pub nsid: u32,
    /// Starting LBA (CDW10-11).
    pub slba: u64,
    /// Number of logical blocks, 0's based (CDW12 bits 15:0).
    pub nlb: u16,
    /// CDW12 bits 31:16: see [`control`].
    pub control: u16,
    /// Dataset management hints (CDW13).
    pub dsmgmt: u32,
}

impl ReadWrite {
    /// Number of logical blocks (1..=65536).
    pub const fn blocks(&self) -> u32 {
        self.nlb as u32 + 1
    }
    pub const fn fua(&self) -> bool {
        self.control & control::FUA != 0
    }
    pub const fn deallocate(&self) -> bool {
        self.control & control::DEALLOCATE != 0
    }
    /// The command covering `blocks` blocks from `slba`; `None` when `blocks` is 0 or over 65536.
    pub fn new(nsid: u32, slba: u64, blocks: u32) -> Option<Self> {
        let nlb = u16::try_from(blocks.checked_sub(1)?).ok()?;
        Some(ReadWrite { nsid, slba, nlb, ..Default::default() })
    }

    pub(crate) fn decode(sqe: &Sqe) -> Self {
        let cdw12 = sqe.cdw12.get();
        ReadWrite {
            nsid: sqe.nsid.get(),
            slba: sqe.cdw10.get() as u64 | (sqe.cdw11.get() as u64) << 32,
            nlb: cdw12 as u16,
            control: (cdw12 >> 16) as u16,
            dsmgmt: sqe.cdw13.get(),
        }
    }

    pub(crate) fn encode(&self, sqe: &mut Sqe) {
        sqe.nsid = self.nsid.into();
        sqe.cdw10 = (self.slba as u32).into();
        sqe.cdw11 = ((self.slba >> 32) as u32).into();
        sqe.cdw12 = (self.nlb as u32 | (self.control as u32) << 16).into();
        sqe.cdw13 = self.dsmgmt.into();
    }
}

/// Dataset Management attributes (CDW11).
pub mod dsm_attribute {
    /// Integral Dataset for Read.
    pub const IDR: u32 = 1 << 0;
    /// Integral Dataset for Write.
    pub const IDW: u32 = 1 << 1;
    /// Deallocate.
    pub const AD: u32 = 1 << 2;
}

/// Dataset Management: the ranges travel as data, `nr + 1` entries of 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DatasetManagement {
    pub nsid: u32,
    /// Number of ranges, 0's based (CDW10 bits 7:0).
    pub nr: u8,
    /// See [`dsm_attribute`].
    pub attributes: u32,
}

impl DatasetManagement {
    pub const fn ranges(&self) -> usize {
        self.nr as usize + 1
    }
    pub const fn deallocate(&self) -> bool {
        self.attributes & dsm_attribute::AD != 0
    }
    /// Bytes of range data the command carries.
    pub const fn data_len(&self) -> usize {
        self.ranges() * DSM_RANGE_LEN
    }
}

pub const DSM_RANGE_LEN: usize = 16;
pub const DSM_MAX_RANGES: usize = 256;

/// One Dataset Management range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DsmRange {
    /// Context attributes.
    pub cattr: U32,
    /// Length in logical blocks (1's based).
    pub nlb: U32,
    pub slba: U64,
}
const _: () = assert!(size_of::<DsmRange>() == DSM_RANGE_LEN);

impl DsmRange {
    pub fn new(slba: u64, nlb: u32) -> Self {
        DsmRange { cattr: 0.into(), nlb: nlb.into(), slba: slba.into() }
    }

    /// Decodes `count` ranges from the command's data. Fewer bytes than `count` ranges is a data SGL length
    /// error; extra bytes are ignored (the host may send a whole page).
    pub fn parse_list(data: &[u8], count: usize) -> Result<Vec<DsmRange>, DecodeError> {
        let needed = count * DSM_RANGE_LEN;
        if count == 0 || count > DSM_MAX_RANGES || data.len() < needed {
            return Err(DecodeError::new(
                "Dataset Management ranges",
                0,
                Reason::Length { expected: needed, actual: data.len() },
                Status::SGL_INVALID_DATA_LENGTH.with_dnr(),
            ));
        }
        let (ranges, _) = <[DsmRange]>::ref_from_prefix_with_elems(data, count)
            .map_err(|_| DecodeError::length("Dataset Management ranges", needed, data.len()))?;
        Ok(ranges.to_vec())
    }

    pub fn list_to_bytes(ranges: &[DsmRange]) -> Vec<u8> {
        ranges.as_bytes().to_vec()
    }
}
