//! Log pages: error information (0x01), SMART / health (0x02), firmware slot (0x03), changed namespace list
//! (0x04, see [`crate::identify::NamespaceList`]), commands supported and effects (0x05), ANA (0x0C). The
//! discovery log (0x70) is in [`crate::discovery`]. Layouts as Linux `struct nvme_error_slot`,
//! `nvme_smart_log`, `nvme_fw_slot_info_log`, `nvme_effects_log`, `nvme_ana_rsp_hdr`, `nvme_ana_group_desc`.

use zerocopy::little_endian::{U16, U32, U64, U128};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{DecodeError, Reason, view};
use crate::status::Status;

/// Log page identifiers.
pub mod lid {
    pub const ERROR: u8 = 0x01;
    pub const SMART: u8 = 0x02;
    pub const FIRMWARE_SLOT: u8 = 0x03;
    pub const CHANGED_NAMESPACES: u8 = 0x04;
    pub const COMMANDS_EFFECTS: u8 = 0x05;
    pub const DEVICE_SELF_TEST: u8 = 0x06;
    pub const ANA: u8 = 0x0c;
    pub const DISCOVERY: u8 = 0x70;
    pub const RESERVATION_NOTIFICATION: u8 = 0x80;
}

/// One Error Information log entry (64 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ErrorLogEntry {
    /// Unique, incrementing error count; 0 marks an empty entry.
    pub error_count: U64,
    pub sqid: U16,
    pub cmdid: U16,
    /// Status field of the failed completion, phase tag in bit 0.
    pub status_field: U16,
    /// Byte (7:0) and bit (10:8) of the offending field in the command.
    pub param_error_location: U16,
    pub lba: U64,
    pub nsid: U32,
    pub vendor: u8,
    pub trtype: u8,
    pub reserved30: [u8; 2],
    pub command_specific: U64,
    pub transport_specific: U16,
    pub reserved42: [u8; 22],
}
pub const ERROR_LOG_ENTRY_LEN: usize = 64;
const _: () = assert!(size_of::<ErrorLogEntry>() == ERROR_LOG_ENTRY_LEN);

impl ErrorLogEntry {
    /// Decodes a list of entries; the length must be a multiple of 64.
    pub fn parse_list(bytes: &[u8]) -> Result<&[ErrorLogEntry], DecodeError> {
        <[ErrorLogEntry]>::ref_from_bytes(bytes).map_err(|_| {
            DecodeError::length(
                "error log",
                bytes.len().div_ceil(ERROR_LOG_ENTRY_LEN) * ERROR_LOG_ENTRY_LEN,
                bytes.len(),
            )
        })
    }
    pub fn status(&self) -> Status {
        Status::from_raw(self.status_field.get() >> 1)
    }
    /// Parameter error location for a byte offset in the command (bit 0).
    pub fn location(byte: usize) -> u16 {
        (byte as u16) & 0xff
    }
}

/// SMART / Health Information (512 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SmartLog {
    pub critical_warning: u8,
    /// Composite temperature in kelvins.
    pub temperature: U16,
    pub available_spare: u8,
    pub available_spare_threshold: u8,
    pub percentage_used: u8,
    pub endurance_group_critical_warning: u8,
    pub reserved7: [u8; 25],
    /// Thousands of 512-byte units read.
    pub data_units_read: U128,
    /// Thousands of 512-byte units written.
    pub data_units_written: U128,
    pub host_read_commands: U128,
    pub host_write_commands: U128,
    pub controller_busy_time: U128,
    pub power_cycles: U128,
    pub power_on_hours: U128,
    pub unsafe_shutdowns: U128,
    pub media_errors: U128,
    pub error_log_entries: U128,
    pub warning_temp_time: U32,
    pub critical_temp_time: U32,
    pub temp_sensor: [U16; 8],
    pub thermal_mgmt_temp1_transitions: U32,
    pub thermal_mgmt_temp2_transitions: U32,
    pub thermal_mgmt_temp1_time: U32,
    pub thermal_mgmt_temp2_time: U32,
    pub reserved232: [u8; 280],
}
pub const SMART_LOG_LEN: usize = 512;
const _: () = assert!(size_of::<SmartLog>() == SMART_LOG_LEN);

impl SmartLog {
    pub fn parse(bytes: &[u8]) -> Result<&SmartLog, DecodeError> {
        view("SMART log", bytes)
    }
    pub fn zeroed() -> Self {
        SmartLog::new_zeroed()
    }
    /// Data units (thousands of 512-byte units, rounded up) for a byte count, as the spec counts them.
    pub fn data_units(bytes: u128) -> u128 {
        bytes.div_ceil(512 * 1000)
    }
}

/// Firmware Slot Information (512 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FirmwareSlotLog {
    /// Active firmware info: active slot in bits 2:0, next-reset slot in 6:4.
    pub afi: u8,
    pub reserved1: [u8; 7],
    /// Firmware revision per slot 1..7, ASCII, space padded.
    pub frs: [[u8; 8]; 7],
    pub reserved64: [u8; 448],
}
pub const FIRMWARE_SLOT_LOG_LEN: usize = 512;
const _: () = assert!(size_of::<FirmwareSlotLog>() == FIRMWARE_SLOT_LOG_LEN);

impl FirmwareSlotLog {
    pub fn parse(bytes: &[u8]) -> Result<&FirmwareSlotLog, DecodeError> {
        view("firmware slot log", bytes)
    }
    pub fn zeroed() -> Self {
        FirmwareSlotLog::new_zeroed()
    }
    /// The active slot (1..=7), 0 if none reported.
    pub fn active_slot(&self) -> u8 {
        self.afi & 7
    }
    /// Revision in slot `slot` (1..=7).
    pub fn revision(&self, slot: usize) -> Result<&str, DecodeError> {
        let field = slot.checked_sub(1).and_then(|i| self.frs.get(i)).ok_or(DecodeError::value(
            "firmware slot",
            0,
            slot as u64,
        ))?;
        crate::text::read_padded("firmware slot revision", field).map_err(|e| e.at(8 * slot))
    }
    pub fn set_revision(&mut self, slot: usize, revision: &str) -> Result<(), DecodeError> {
        let field = slot.checked_sub(1).and_then(|i| self.frs.get_mut(i)).ok_or(DecodeError::value(
            "firmware slot",
            0,
            slot as u64,
        ))?;
        crate::text::write_padded("firmware slot revision", field, revision, b' ')
    }
}

/// Commands Supported and Effects (4096 bytes): one dword per admin opcode, then per I/O opcode.
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CommandEffectsLog {
    pub admin: [U32; 256],
    pub io: [U32; 256],
    pub reserved: [u8; 2048],
}
pub const COMMAND_EFFECTS_LOG_LEN: usize = 4096;
const _: () = assert!(size_of::<CommandEffectsLog>() == COMMAND_EFFECTS_LOG_LEN);

/// Command effects bits.
pub mod effects {
    /// Command supported.
    pub const CSUPP: u32 = 1 << 0;
    /// Logical block content change.
    pub const LBCC: u32 = 1 << 1;
    /// Namespace capability change.
    pub const NCC: u32 = 1 << 2;
    /// Namespace inventory change.
    pub const NIC: u32 = 1 << 3;
    /// Controller capability change.
    pub const CCC: u32 = 1 << 4;
}

impl CommandEffectsLog {
    pub fn parse(bytes: &[u8]) -> Result<&CommandEffectsLog, DecodeError> {
        view("commands supported and effects log", bytes)
    }
    pub fn zeroed() -> Self {
        CommandEffectsLog::new_zeroed()
    }
}

/// ANA states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AnaState {
    Optimized = 0x1,
    NonOptimized = 0x2,
    Inaccessible = 0x3,
    PersistentLoss = 0x4,
    Change = 0xf,
}

impl AnaState {
    pub fn from_bits(bits: u8) -> Option<AnaState> {
        Some(match bits & 0xf {
            0x1 => AnaState::Optimized,
            0x2 => AnaState::NonOptimized,
            0x3 => AnaState::Inaccessible,
            0x4 => AnaState::PersistentLoss,
            0xf => AnaState::Change,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct AnaHeaderRaw {
    chgcnt: U64,
    ngrps: U16,
    reserved10: [u8; 6],
}

#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct AnaGroupRaw {
    grpid: U32,
    nnsids: U32,
    chgcnt: U64,
    state: u8,
    reserved17: [u8; 15],
}
const ANA_HEADER_LEN: usize = 16;
const ANA_GROUP_LEN: usize = 32;
const _: () = assert!(size_of::<AnaHeaderRaw>() == ANA_HEADER_LEN && size_of::<AnaGroupRaw>() == ANA_GROUP_LEN);

/// One ANA group descriptor with its namespaces.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AnaGroup {
    pub grpid: u32,
    pub chgcnt: u64,
    pub state: AnaState,
    pub nsids: Vec<u32>,
}

/// The ANA log page (0x0C): a 16-byte header, then variable-length group descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct AnaLog {
    pub chgcnt: u64,
    pub groups: Vec<AnaGroup>,
}

/// ANA log LSP bit 0: return group descriptors without namespace ids (RGO).
pub const ANA_LSP_GROUPS_ONLY: u8 = 1;

impl AnaLog {
    /// Decodes a complete ANA log; trailing bytes after the last group are allowed (hosts read a fixed size).
    pub fn parse(bytes: &[u8]) -> Result<AnaLog, DecodeError> {
        let (header, mut rest) = AnaHeaderRaw::ref_from_prefix(bytes)
            .map_err(|_| DecodeError::length("ANA log header", ANA_HEADER_LEN, bytes.len()))?;
        let mut groups = Vec::new();
        for _ in 0..header.ngrps.get() {
            let at = bytes.len() - rest.len();
            let (group, after) = AnaGroupRaw::ref_from_prefix(rest)
                .map_err(|_| truncated("ANA group descriptor", at, ANA_GROUP_LEN, rest.len()))?;
            let count = group.nnsids.get() as usize;
            let (ids, after) = <[U32]>::ref_from_prefix_with_elems(after, count)
                .map_err(|_| truncated("ANA group NSIDs", at + ANA_GROUP_LEN, count.saturating_mul(4), after.len()))?;
            let state =
                AnaState::from_bits(group.state).ok_or(DecodeError::value("ANA state", at + 16, group.state as u64))?;
            groups.push(AnaGroup {
                grpid: group.grpid.get(),
                chgcnt: group.chgcnt.get(),
                state,
                nsids: ids.iter().map(|id| id.get()).collect(),
            });
            rest = after;
        }
        Ok(AnaLog { chgcnt: header.chgcnt.get(), groups })
    }

    /// Encodes the log. More than 65535 groups cannot be expressed and is refused.
    pub fn to_bytes(&self) -> Result<Vec<u8>, DecodeError> {
        let ngrps = u16::try_from(self.groups.len()).map_err(|_| {
            DecodeError::new(
                "ANA groups",
                8,
                Reason::TooLong { max: 0xffff, actual: self.groups.len() },
                Status::INTERNAL,
            )
        })?;
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(
            AnaHeaderRaw { chgcnt: self.chgcnt.into(), ngrps: ngrps.into(), reserved10: [0; 6] }.as_bytes(),
        );
        for g in &self.groups {
            let nnsids = u32::try_from(g.nsids.len()).map_err(|_| {
                DecodeError::new(
                    "ANA group NSIDs",
                    out.len() + 4,
                    Reason::Value(g.nsids.len() as u64),
                    Status::INTERNAL,
                )
            })?;
            let raw = AnaGroupRaw {
                grpid: g.grpid.into(),
                nnsids: nnsids.into(),
                chgcnt: g.chgcnt.into(),
                state: g.state as u8,
                reserved17: [0; 15],
            };
            out.extend_from_slice(raw.as_bytes());
            for id in &g.nsids {
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
        Ok(out)
    }

    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        ANA_HEADER_LEN + self.groups.iter().map(|g| ANA_GROUP_LEN + 4 * g.nsids.len()).sum::<usize>()
    }
}

fn truncated(what: &'static str, at: usize, expected: usize, actual: usize) -> DecodeError {
    DecodeError::new(what, at, Reason::Length { expected, actual }, Status::INVALID_FIELD.with_dnr())
}
