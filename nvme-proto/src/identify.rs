//! Identify data structures (4096 bytes each): controller (CNS 0x01), namespace (CNS 0x00), active namespace
//! list (CNS 0x02, same layout as the Changed Namespace List log), namespace identification descriptor list
//! (CNS 0x03). Layouts as Linux `struct nvme_id_ctrl`, `nvme_id_ns`, `nvme_ns_id_desc`.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{DecodeError, Reason, exact, view};
use crate::nqn;
use crate::status::Status;
use crate::text;
use crate::uuid::Uuid;

pub const IDENTIFY_DATA_LEN: usize = 4096;

/// Controller or Namespace Structure values (Identify CDW10 bits 7:0).
pub mod cns {
    pub const NAMESPACE: u8 = 0x00;
    pub const CONTROLLER: u8 = 0x01;
    pub const ACTIVE_NAMESPACE_LIST: u8 = 0x02;
    pub const NAMESPACE_DESCRIPTORS: u8 = 0x03;
    pub const NVM_SET_LIST: u8 = 0x04;
    pub const CS_NAMESPACE: u8 = 0x05;
    pub const CS_CONTROLLER: u8 = 0x06;
    pub const CS_ACTIVE_NAMESPACE_LIST: u8 = 0x07;
    pub const ALLOCATED_NAMESPACE_LIST: u8 = 0x10;
    pub const CONTROLLER_LIST: u8 = 0x13;
}

/// Identify Controller (CNS 0x01).
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct IdentifyController {
    pub vid: U16,
    pub ssvid: U16,
    /// Serial number, space-padded ASCII: use [`IdentifyController::serial`].
    pub sn: [u8; 20],
    /// Model number, space-padded ASCII.
    pub mn: [u8; 40],
    /// Firmware revision, space-padded ASCII.
    pub fr: [u8; 8],
    pub rab: u8,
    pub ieee: [u8; 3],
    pub cmic: u8,
    /// Maximum data transfer size: 2^MDTS units of the minimum memory page size (CAP.MPSMIN); 0 = no limit.
    pub mdts: u8,
    pub cntlid: U16,
    pub ver: U32,
    pub rtd3r: U32,
    pub rtd3e: U32,
    /// Optional asynchronous events supported.
    pub oaes: U32,
    pub ctratt: U32,
    pub reserved100: [u8; 11],
    /// Controller type: 1 I/O, 2 discovery, 3 administrative.
    pub cntrltype: u8,
    pub fguid: [u8; 16],
    pub crdt1: U16,
    pub crdt2: U16,
    pub crdt3: U16,
    pub reserved134: [u8; 122],
    /// Optional admin command support.
    pub oacs: U16,
    /// Abort command limit, 0's based.
    pub acl: u8,
    /// Asynchronous event request limit, 0's based.
    pub aerl: u8,
    pub frmw: u8,
    /// Log page attributes.
    pub lpa: u8,
    /// Error log page entries, 0's based.
    pub elpe: u8,
    pub npss: u8,
    pub avscc: u8,
    pub apsta: u8,
    pub wctemp: U16,
    pub cctemp: U16,
    pub mtfa: U16,
    pub hmpre: U32,
    pub hmmin: U32,
    pub tnvmcap: [u8; 16],
    pub unvmcap: [u8; 16],
    pub rpmbs: U32,
    pub edstt: U16,
    pub dsto: u8,
    pub fwug: u8,
    /// Keep alive support: granularity in 100 ms units; 0 = not supported.
    pub kas: U16,
    pub hctma: U16,
    pub mntmt: U16,
    pub mxtmt: U16,
    pub sanicap: U32,
    pub hmminds: U32,
    pub hmmaxd: U16,
    pub nvmsetidmax: U16,
    pub endgidmax: U16,
    pub anatt: u8,
    pub anacap: u8,
    pub anagrpmax: U32,
    pub nanagrpid: U32,
    pub reserved352: [u8; 160],
    /// Submission queue entry size: required 3:0 and maximum 7:4, as powers of two (0x66 = 64 bytes).
    pub sqes: u8,
    /// Completion queue entry size (0x44 = 16 bytes).
    pub cqes: u8,
    pub maxcmd: U16,
    /// Number of namespaces (highest valid NSID).
    pub nn: U32,
    /// Optional NVM command support.
    pub oncs: U16,
    pub fuses: U16,
    pub fna: u8,
    /// Volatile write cache: bit 0 present.
    pub vwc: u8,
    pub awun: U16,
    pub awupf: U16,
    pub nvscc: u8,
    pub nwpc: u8,
    pub acwu: U16,
    pub reserved534: [u8; 2],
    /// SGL support (see [`sgls`]).
    pub sgls: U32,
    pub mnan: U32,
    pub reserved544: [u8; 224],
    /// NVM subsystem NQN, NUL-terminated: use [`IdentifyController::subnqn`].
    pub subnqn: [u8; 256],
    pub reserved1024: [u8; 768],
    /// I/O queue command capsule supported size, in 16-byte units: (64 + in-capsule data) / 16.
    pub ioccsz: U32,
    /// I/O queue response capsule supported size, in 16-byte units.
    pub iorcsz: U32,
    /// In-capsule data offset, in 16-byte units after the SQE.
    pub icdoff: U16,
    /// Fabrics controller attributes: bit 0 static controller model.
    pub fcatt: u8,
    /// Maximum SGL data block descriptors.
    pub msdbd: u8,
    /// Optional fabrics commands supported.
    pub ofcs: U16,
    pub dctype: u8,
    pub reserved1807: [u8; 241],
    pub psd: [PowerStateDescriptor; 32],
    pub vendor: [u8; 1024],
}
const _: () = assert!(size_of::<IdentifyController>() == IDENTIFY_DATA_LEN);

/// A power state descriptor (32 bytes); NVMe-oF controllers report one all-zero state.
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct PowerStateDescriptor {
    pub max_power: U16,
    pub reserved2: u8,
    pub flags: u8,
    pub entry_lat: U32,
    pub exit_lat: U32,
    pub read_tput: u8,
    pub read_lat: u8,
    pub write_tput: u8,
    pub write_lat: u8,
    pub idle_power: U16,
    pub idle_scale: u8,
    pub reserved19: u8,
    pub active_power: U16,
    pub active_work_scale: u8,
    pub reserved23: [u8; 9],
}
const _: () = assert!(size_of::<PowerStateDescriptor>() == 32);

/// Identify Controller SGLS bits.
pub mod sgls {
    /// Bits 1:0 = 01b: SGLs supported, no alignment requirement; 10b: dword aligned.
    pub const SUPPORTED: u32 = 1 << 0;
    pub const DWORD_ALIGNED: u32 = 2;
    /// Keyed SGL data block descriptor supported (what NVMe/RDMA needs).
    pub const KEYED: u32 = 1 << 2;
    pub const BIT_BUCKET: u32 = 1 << 16;
    pub const METADATA_BYTE_ALIGNED: u32 = 1 << 17;
    pub const LONGER_THAN_DATA: u32 = 1 << 18;
    pub const METADATA_POINTER_SGL: u32 = 1 << 19;
    /// SGL data block descriptor with offset (in-capsule data) supported.
    pub const OFFSET: u32 = 1 << 20;
    pub const TRANSPORT_DATA_BLOCK: u32 = 1 << 21;
}

/// Identify Controller CNTRLTYPE values.
pub mod controller_type {
    pub const IO: u8 = 1;
    pub const DISCOVERY: u8 = 2;
    pub const ADMIN: u8 = 3;
}

/// Identify Controller ONCS bits.
pub mod oncs {
    pub const COMPARE: u16 = 1 << 0;
    pub const WRITE_UNCORRECTABLE: u16 = 1 << 1;
    pub const DATASET_MANAGEMENT: u16 = 1 << 2;
    pub const WRITE_ZEROES: u16 = 1 << 3;
    pub const SAVE_SELECT: u16 = 1 << 4;
    pub const RESERVATIONS: u16 = 1 << 5;
    pub const TIMESTAMP: u16 = 1 << 6;
    pub const VERIFY: u16 = 1 << 7;
}

/// Identify Controller LPA bits.
pub mod lpa {
    pub const PER_NAMESPACE_SMART: u8 = 1 << 0;
    pub const COMMANDS_EFFECTS: u8 = 1 << 1;
    pub const EXTENDED_DATA: u8 = 1 << 2;
    pub const TELEMETRY: u8 = 1 << 3;
    pub const PERSISTENT_EVENT: u8 = 1 << 4;
}

/// Identify Controller OAES bits.
pub mod oaes {
    pub const NAMESPACE_ATTRIBUTE: u32 = 1 << 8;
    pub const FIRMWARE_ACTIVATION: u32 = 1 << 9;
    pub const ANA_CHANGE: u32 = 1 << 11;
    pub const DISCOVERY_LOG_CHANGE: u32 = 1 << 31;
}

/// Identify Controller CMIC bits.
pub mod cmic {
    pub const MULTI_PORT: u8 = 1 << 0;
    pub const MULTI_CONTROLLER: u8 = 1 << 1;
    pub const SRIOV: u8 = 1 << 2;
    pub const ANA: u8 = 1 << 3;
}

impl IdentifyController {
    pub fn parse(bytes: &[u8]) -> Result<&IdentifyController, DecodeError> {
        view("Identify Controller", bytes)
    }
    pub fn zeroed() -> Self {
        IdentifyController::new_zeroed()
    }
    pub fn serial(&self) -> Result<&str, DecodeError> {
        text::read_padded("Identify Controller SN", &self.sn).map_err(|e| e.at(4))
    }
    pub fn model(&self) -> Result<&str, DecodeError> {
        text::read_padded("Identify Controller MN", &self.mn).map_err(|e| e.at(24))
    }
    pub fn firmware(&self) -> Result<&str, DecodeError> {
        text::read_padded("Identify Controller FR", &self.fr).map_err(|e| e.at(64))
    }
    pub fn subnqn(&self) -> Result<&str, DecodeError> {
        nqn::read_wire("Identify Controller SUBNQN", &self.subnqn).map_err(|e| e.at(768))
    }
    pub fn set_serial(&mut self, sn: &str) -> Result<(), DecodeError> {
        text::write_padded("Identify Controller SN", &mut self.sn, sn, b' ')
    }
    pub fn set_model(&mut self, mn: &str) -> Result<(), DecodeError> {
        text::write_padded("Identify Controller MN", &mut self.mn, mn, b' ')
    }
    pub fn set_firmware(&mut self, fr: &str) -> Result<(), DecodeError> {
        text::write_padded("Identify Controller FR", &mut self.fr, fr, b' ')
    }
    pub fn set_subnqn(&mut self, subnqn: &str) -> Result<(), DecodeError> {
        nqn::write_wire("Identify Controller SUBNQN", &mut self.subnqn, subnqn)
    }
    /// Largest transfer in bytes for a given minimum page size, or `None` for "no limit" (MDTS 0).
    pub fn max_transfer_bytes(&self, min_page_size: u64) -> Option<u64> {
        match self.mdts {
            0 => None,
            m => min_page_size.checked_shl(m as u32),
        }
    }
    /// In-capsule data bytes an I/O command capsule may carry: IOCCSZ * 16 - 64.
    pub fn in_capsule_data_size(&self) -> u64 {
        (self.ioccsz.get() as u64 * 16).saturating_sub(64)
    }
}

impl core::fmt::Debug for IdentifyController {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IdentifyController")
            .field("vid", &self.vid.get())
            .field("sn", &self.serial())
            .field("mn", &self.model())
            .field("fr", &self.firmware())
            .field("mdts", &self.mdts)
            .field("cntlid", &self.cntlid.get())
            .field("ver", &format_args!("{:#x}", self.ver.get()))
            .field("cntrltype", &self.cntrltype)
            .field("kas", &self.kas.get())
            .field("sqes", &self.sqes)
            .field("cqes", &self.cqes)
            .field("maxcmd", &self.maxcmd.get())
            .field("nn", &self.nn.get())
            .field("sgls", &format_args!("{:#x}", self.sgls.get()))
            .field("subnqn", &self.subnqn())
            .field("ioccsz", &self.ioccsz.get())
            .field("iorcsz", &self.iorcsz.get())
            .field("icdoff", &self.icdoff.get())
            .field("msdbd", &self.msdbd)
            .finish_non_exhaustive()
    }
}

/// An LBA format (4 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct LbaFormat {
    /// Metadata bytes per block.
    pub ms: U16,
    /// LBA data size as a power of two (9 = 512 bytes).
    pub ds: u8,
    /// Relative performance (bits 1:0).
    pub rp: u8,
}

impl LbaFormat {
    pub fn new(block_size_log2: u8) -> Self {
        LbaFormat { ms: 0.into(), ds: block_size_log2, rp: 0 }
    }
    /// Block size in bytes, or `None` when DS is outside what the spec allows (9..=63 would overflow; we cap
    /// at 2^31).
    pub fn block_size(&self) -> Option<u32> {
        (9..=31).contains(&self.ds).then(|| 1u32 << self.ds)
    }
}

/// Identify Namespace (CNS 0x00), NVM command set.
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct IdentifyNamespace {
    /// Namespace size in logical blocks.
    pub nsze: U64,
    /// Namespace capacity in logical blocks.
    pub ncap: U64,
    /// Namespace utilization in logical blocks.
    pub nuse: U64,
    /// Namespace features (bit 0 thin provisioning, bit 2 DAE/dealloc errors ...).
    pub nsfeat: u8,
    /// Number of LBA formats, 0's based.
    pub nlbaf: u8,
    /// Formatted LBA size: index into `lbaf` in bits 3:0 (and 6:5 for indexes above 15).
    pub flbas: u8,
    pub mc: u8,
    pub dpc: u8,
    pub dps: u8,
    /// Namespace multi-path I/O and sharing capabilities: bit 0 shared.
    pub nmic: u8,
    pub rescap: u8,
    pub fpi: u8,
    /// Deallocate logical block features: bits 2:0 = 001b reads return zeroes after deallocate.
    pub dlfeat: u8,
    pub nawun: U16,
    pub nawupf: U16,
    pub nacwu: U16,
    pub nabsn: U16,
    pub nabo: U16,
    pub nabspf: U16,
    pub noiob: U16,
    pub nvmcap: [u8; 16],
    pub npwg: U16,
    pub npwa: U16,
    pub npdg: U16,
    pub npda: U16,
    pub nows: U16,
    pub reserved74: [u8; 18],
    pub anagrpid: U32,
    pub reserved96: [u8; 3],
    pub nsattr: u8,
    pub nvmsetid: U16,
    pub endgid: U16,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    pub lbaf: [LbaFormat; 64],
    pub vendor: [u8; 3712],
}
const _: () = assert!(size_of::<IdentifyNamespace>() == IDENTIFY_DATA_LEN);

impl IdentifyNamespace {
    pub fn parse(bytes: &[u8]) -> Result<&IdentifyNamespace, DecodeError> {
        view("Identify Namespace", bytes)
    }
    pub fn zeroed() -> Self {
        IdentifyNamespace::new_zeroed()
    }
    /// Index of the LBA format in use (FLBAS bits 3:0, plus bits 6:5 as the high bits).
    pub fn format_index(&self) -> usize {
        ((self.flbas & 0xf) | ((self.flbas >> 5) & 3) << 4) as usize
    }
    /// The LBA format in use; an error if FLBAS points past NLBAF or DS is invalid.
    pub fn lba_format(&self) -> Result<LbaFormat, DecodeError> {
        let index = self.format_index();
        if index > self.nlbaf as usize {
            return Err(DecodeError::value("Identify Namespace FLBAS", 26, self.flbas as u64));
        }
        let format = self.lbaf[index];
        format.block_size().map(|_| format).ok_or(DecodeError::value(
            "Identify Namespace LBAF.DS",
            128 + index * 4 + 2,
            format.ds as u64,
        ))
    }
    /// Logical block size in bytes of the format in use.
    pub fn block_size(&self) -> Result<u32, DecodeError> {
        Ok(self.lba_format()?.block_size().unwrap_or(0))
    }
}

impl core::fmt::Debug for IdentifyNamespace {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IdentifyNamespace")
            .field("nsze", &self.nsze.get())
            .field("ncap", &self.ncap.get())
            .field("nuse", &self.nuse.get())
            .field("nlbaf", &self.nlbaf)
            .field("flbas", &self.flbas)
            .field("nmic", &self.nmic)
            .field("anagrpid", &self.anagrpid.get())
            .field("nguid", &self.nguid)
            .field("eui64", &self.eui64)
            .field("lbaf0", &self.lbaf[0])
            .finish_non_exhaustive()
    }
}

/// A list of up to 1024 namespace ids, zero-terminated: the Active Namespace List (Identify CNS 0x02) and the
/// Changed Namespace List log page (0x04) share this layout.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct NamespaceList(pub Vec<u32>);

pub const NAMESPACE_LIST_MAX: usize = 1024;

impl NamespaceList {
    /// Decodes 4096 bytes. Ids stop at the first 0; after it, every entry must be 0 too.
    pub fn parse(bytes: &[u8]) -> Result<NamespaceList, DecodeError> {
        let ids: &[U32; NAMESPACE_LIST_MAX] = view("namespace list", bytes)?;
        let count = ids.iter().position(|id| id.get() == 0).unwrap_or(NAMESPACE_LIST_MAX);
        if let Some(stray) = ids[count..].iter().position(|id| id.get() != 0) {
            let at = (count + stray) * 4;
            return Err(DecodeError::value("namespace list entry after the end", at, ids[count + stray].get() as u64));
        }
        Ok(NamespaceList(ids[..count].iter().map(|id| id.get()).collect()))
    }

    /// Encodes up to 1024 ids; refuses more (a target reports overflow as a list holding only 0xFFFFFFFF).
    pub fn to_bytes(&self) -> Result<[u8; IDENTIFY_DATA_LEN], DecodeError> {
        if self.0.len() > NAMESPACE_LIST_MAX {
            return Err(DecodeError::new(
                "namespace list",
                0,
                Reason::TooLong { max: NAMESPACE_LIST_MAX, actual: self.0.len() },
                Status::INTERNAL,
            ));
        }
        if let Some(i) = self.0.iter().position(|&id| id == 0) {
            return Err(DecodeError::value("namespace list entry", i * 4, 0));
        }
        let mut out = [0u8; IDENTIFY_DATA_LEN];
        for (slot, id) in out.chunks_exact_mut(4).zip(&self.0) {
            slot.copy_from_slice(&id.to_le_bytes());
        }
        Ok(out)
    }

    /// The Changed Namespace List for more than 1024 changes: one entry, 0xFFFFFFFF.
    pub fn overflowed() -> NamespaceList {
        NamespaceList(vec![0xffff_ffff])
    }
}

/// Namespace identifier types in the descriptor list.
pub mod nidt {
    pub const EUI64: u8 = 0x1;
    pub const NGUID: u8 = 0x2;
    pub const UUID: u8 = 0x3;
    pub const CSI: u8 = 0x4;
}

/// One namespace identification descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NamespaceId {
    Eui64([u8; 8]),
    Nguid([u8; 16]),
    Uuid(Uuid),
    /// Command set identifier (0 = NVM).
    Csi(u8),
}

impl NamespaceId {
    pub fn nidt(&self) -> u8 {
        match self {
            NamespaceId::Eui64(_) => nidt::EUI64,
            NamespaceId::Nguid(_) => nidt::NGUID,
            NamespaceId::Uuid(_) => nidt::UUID,
            NamespaceId::Csi(_) => nidt::CSI,
        }
    }
    fn value(&self) -> &[u8] {
        match self {
            NamespaceId::Eui64(v) => v,
            NamespaceId::Nguid(v) => v,
            NamespaceId::Uuid(u) => u.as_bytes(),
            NamespaceId::Csi(c) => core::slice::from_ref(c),
        }
    }
}

/// The Namespace Identification Descriptor list (CNS 0x03): descriptors of 4-byte header (NIDT, NIDL, 2
/// reserved) plus NIDL bytes, ended by a zero header or the end of the 4096 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct NamespaceIdList(pub Vec<NamespaceId>);

impl NamespaceIdList {
    pub fn parse(bytes: &[u8]) -> Result<NamespaceIdList, DecodeError> {
        let bytes: &[u8; IDENTIFY_DATA_LEN] = exact("namespace identification descriptor list", bytes)?;
        let mut ids = Vec::new();
        let mut at = 0;
        while at + 4 <= bytes.len() {
            let (kind, len) = (bytes[at], bytes[at + 1] as usize);
            if kind == 0 && len == 0 {
                break;
            }
            let expected = match kind {
                nidt::EUI64 => 8,
                nidt::NGUID | nidt::UUID => 16,
                nidt::CSI => 1,
                _ => return Err(DecodeError::value("descriptor NIDT", at, kind as u64)),
            };
            if len != expected {
                return Err(DecodeError::value("descriptor NIDL", at + 1, len as u64));
            }
            let value = bytes.get(at + 4..at + 4 + len).ok_or(DecodeError::new(
                "descriptor value",
                at + 4,
                Reason::Length { expected: len, actual: bytes.len() - (at + 4) },
                Status::INVALID_FIELD.with_dnr(),
            ))?;
            ids.push(match kind {
                nidt::EUI64 => NamespaceId::Eui64(value.try_into().expect("8 bytes")),
                nidt::NGUID => NamespaceId::Nguid(value.try_into().expect("16 bytes")),
                nidt::UUID => NamespaceId::Uuid(Uuid(value.try_into().expect("16 bytes"))),
                _ => NamespaceId::Csi(value[0]),
            });
            at += 4 + len;
        }
        Ok(NamespaceIdList(ids))
    }

    pub fn to_bytes(&self) -> Result<[u8; IDENTIFY_DATA_LEN], DecodeError> {
        let mut out = [0u8; IDENTIFY_DATA_LEN];
        let mut at = 0;
        for id in &self.0 {
            let value = id.value();
            // Keep room for the terminating zero header.
            if at + 4 + value.len() + 4 > out.len() {
                return Err(DecodeError::new(
                    "namespace identification descriptor list",
                    at,
                    Reason::TooLong { max: IDENTIFY_DATA_LEN, actual: at + 4 + value.len() },
                    Status::INTERNAL,
                ));
            }
            out[at] = id.nidt();
            out[at + 1] = value.len() as u8;
            out[at + 4..at + 4 + value.len()].copy_from_slice(value);
            at += 4 + value.len();
        }
        Ok(out)
    }
}
