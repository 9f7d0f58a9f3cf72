//! The discovery log page (0x70): a 1024-byte header and 1024-byte entries, one per subsystem and port
//! (Linux `struct nvmf_disc_rsp_page_hdr`, `nvmf_disc_rsp_page_entry`), with the RDMA transport specific
//! address subtype (TSAS: QP type, provider type, connection management service, P_Key).

use zerocopy::little_endian::{U16, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{DecodeError, Reason, view};
use crate::nqn;
use crate::status::Status;
use crate::text;

pub const DISCOVERY_HEADER_LEN: usize = 1024;
pub const DISCOVERY_ENTRY_LEN: usize = 1024;

/// Transport types (TRTYPE).
pub mod trtype {
    pub const RDMA: u8 = 1;
    pub const FC: u8 = 2;
    pub const TCP: u8 = 3;
    pub const LOOP: u8 = 254;
}

/// Address families (ADRFAM).
pub mod adrfam {
    pub const IPV4: u8 = 1;
    pub const IPV6: u8 = 2;
    pub const IB: u8 = 3;
    pub const FC: u8 = 4;
    pub const LOOP: u8 = 254;
}

/// Subsystem types (SUBTYPE).
pub mod subtype {
    /// A referral to another discovery service.
    pub const DISCOVERY_REFERRAL: u8 = 1;
    pub const NVME: u8 = 2;
    /// The discovery subsystem answering this log.
    pub const CURRENT_DISCOVERY: u8 = 3;
}

/// Transport requirements (TREQ).
pub mod treq {
    pub const SECURE_CHANNEL_MASK: u8 = 0x3;
    pub const NOT_SPECIFIED: u8 = 0x0;
    pub const REQUIRED: u8 = 0x1;
    pub const NOT_REQUIRED: u8 = 0x2;
    pub const DISABLE_SQ_FLOW_CONTROL: u8 = 0x4;
}

/// RDMA TSAS values.
pub mod rdma {
    /// QP type: reliable connected.
    pub const QPTYPE_CONNECTED: u8 = 1;
    pub const QPTYPE_DATAGRAM: u8 = 2;
    pub const PRTYPE_NOT_SPECIFIED: u8 = 1;
    pub const PRTYPE_IB: u8 = 2;
    pub const PRTYPE_ROCE: u8 = 3;
    pub const PRTYPE_ROCEV2: u8 = 4;
    pub const PRTYPE_IWARP: u8 = 5;
    /// Connection management service: the RDMA_IP_CM.
    pub const CMS_RDMA_CM: u8 = 1;
}

/// Discovery log header.
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DiscoveryLogHeader {
    /// Generation counter: changes whenever the log changes.
    pub genctr: U64,
    /// Number of records (entries) in the whole log.
    pub numrec: U64,
    pub recfmt: U16,
    pub reserved18: [u8; 1006],
}
const _: () = assert!(size_of::<DiscoveryLogHeader>() == DISCOVERY_HEADER_LEN);

/// The RDMA view of the 256-byte TSAS field.
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RdmaTsas {
    pub qptype: u8,
    pub prtype: u8,
    pub cms: u8,
    pub reserved3: [u8; 5],
    pub pkey: U16,
    pub reserved10: [u8; 246],
}
const _: () = assert!(size_of::<RdmaTsas>() == 256);

/// One discovery log entry (1024 bytes).
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DiscoveryLogEntryRaw {
    pub trtype: u8,
    pub adrfam: u8,
    pub subtype: u8,
    pub treq: u8,
    pub portid: U16,
    pub cntlid: U16,
    /// Admin max SQ size (1's based).
    pub asqsz: U16,
    pub eflags: U16,
    pub reserved12: [u8; 20],
    pub trsvcid: [u8; 32],
    pub reserved64: [u8; 192],
    pub subnqn: [u8; 256],
    pub traddr: [u8; 256],
    pub tsas: RdmaTsas,
}
const _: () = assert!(size_of::<DiscoveryLogEntryRaw>() == DISCOVERY_ENTRY_LEN);

/// A discovery log entry, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DiscoveryLogEntry {
    pub trtype: u8,
    pub adrfam: u8,
    pub subtype: u8,
    pub treq: u8,
    pub portid: u16,
    pub cntlid: u16,
    pub asqsz: u16,
    pub eflags: u16,
    pub trsvcid: String,
    pub subnqn: String,
    pub traddr: String,
    /// Present when `trtype` is RDMA.
    pub rdma: Option<RdmaParams>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RdmaParams {
    pub qptype: u8,
    pub prtype: u8,
    pub cms: u8,
    pub pkey: u16,
}

impl DiscoveryLogEntry {
    pub fn parse(bytes: &[u8]) -> Result<DiscoveryLogEntry, DecodeError> {
        let raw: &DiscoveryLogEntryRaw = view("discovery log entry", bytes)?;
        Ok(DiscoveryLogEntry {
            trtype: raw.trtype,
            adrfam: raw.adrfam,
            subtype: raw.subtype,
            treq: raw.treq,
            portid: raw.portid.get(),
            cntlid: raw.cntlid.get(),
            asqsz: raw.asqsz.get(),
            eflags: raw.eflags.get(),
            trsvcid: text::read_padded("discovery TRSVCID", &raw.trsvcid).map_err(|e| e.at(32))?.to_owned(),
            subnqn: nqn::read_wire("discovery SUBNQN", &raw.subnqn).map_err(|e| e.at(256))?.to_owned(),
            traddr: text::read_padded("discovery TRADDR", &raw.traddr).map_err(|e| e.at(512))?.to_owned(),
            rdma: (raw.trtype == trtype::RDMA).then_some(RdmaParams {
                qptype: raw.tsas.qptype,
                prtype: raw.tsas.prtype,
                cms: raw.tsas.cms,
                pkey: raw.tsas.pkey.get(),
            }),
        })
    }

    /// Encodes the entry; TRSVCID and TRADDR are NUL padded as Linux nvmet sends them.
    pub fn to_bytes(&self) -> Result<[u8; DISCOVERY_ENTRY_LEN], DecodeError> {
        let mut raw = DiscoveryLogEntryRaw::new_zeroed();
        raw.trtype = self.trtype;
        raw.adrfam = self.adrfam;
        raw.subtype = self.subtype;
        raw.treq = self.treq;
        raw.portid = self.portid.into();
        raw.cntlid = self.cntlid.into();
        raw.asqsz = self.asqsz.into();
        raw.eflags = self.eflags.into();
        text::write_padded("discovery TRSVCID", &mut raw.trsvcid, &self.trsvcid, 0).map_err(|e| e.at(32))?;
        nqn::write_wire("discovery SUBNQN", &mut raw.subnqn, &self.subnqn).map_err(|e| e.at(256))?;
        text::write_padded("discovery TRADDR", &mut raw.traddr, &self.traddr, 0).map_err(|e| e.at(512))?;
        if let Some(r) = self.rdma {
            raw.tsas.qptype = r.qptype;
            raw.tsas.prtype = r.prtype;
            raw.tsas.cms = r.cms;
            raw.tsas.pkey = r.pkey.into();
        }
        let mut out = [0u8; DISCOVERY_ENTRY_LEN];
        out.copy_from_slice(raw.as_bytes());
        Ok(out)
    }
}

/// A discovery log page, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct DiscoveryLog {
    pub genctr: u64,
    /// NUMREC from the header: the number of records in the whole log, which may exceed `entries.len()` when
    /// only part of the log was read.
    pub numrec: u64,
    pub recfmt: u16,
    pub entries: Vec<DiscoveryLogEntry>,
}

impl DiscoveryLog {
    /// Decodes a log read from offset 0: the header, then as many whole entries as both NUMREC and the buffer
    /// allow. A buffer shorter than the header, or a partial trailing entry, is an error.
    pub fn parse(bytes: &[u8]) -> Result<DiscoveryLog, DecodeError> {
        let (header, rest) = DiscoveryLogHeader::ref_from_prefix(bytes)
            .map_err(|_| DecodeError::length("discovery log header", DISCOVERY_HEADER_LEN, bytes.len()))?;
        if rest.len() % DISCOVERY_ENTRY_LEN != 0 {
            return Err(DecodeError::new(
                "discovery log",
                DISCOVERY_HEADER_LEN,
                Reason::Length {
                    expected: rest.len().next_multiple_of(DISCOVERY_ENTRY_LEN) + DISCOVERY_HEADER_LEN,
                    actual: bytes.len(),
                },
                Status::INVALID_FIELD.with_dnr(),
            ));
        }
        let numrec = header.numrec.get();
        let present = (rest.len() / DISCOVERY_ENTRY_LEN) as u64;
        let entries = rest
            .chunks_exact(DISCOVERY_ENTRY_LEN)
            .take(numrec.min(present) as usize)
            .enumerate()
            .map(|(i, e)| {
                DiscoveryLogEntry::parse(e).map_err(|err| err.at(DISCOVERY_HEADER_LEN + i * DISCOVERY_ENTRY_LEN))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DiscoveryLog { genctr: header.genctr.get(), numrec, recfmt: header.recfmt.get(), entries })
    }

    /// Whether `entries` holds every record the header announces.
    pub fn is_complete(&self) -> bool {
        self.entries.len() as u64 == self.numrec
    }

    /// Encodes the header and all entries (NUMREC = number of entries).
    pub fn to_bytes(&self) -> Result<Vec<u8>, DecodeError> {
        let header = DiscoveryLogHeader {
            genctr: self.genctr.into(),
            numrec: (self.entries.len() as u64).into(),
            recfmt: self.recfmt.into(),
            reserved18: [0; 1006],
        };
        let mut out = Vec::with_capacity(DISCOVERY_HEADER_LEN + self.entries.len() * DISCOVERY_ENTRY_LEN);
        out.extend_from_slice(header.as_bytes());
        for (i, e) in self.entries.iter().enumerate() {
            out.extend_from_slice(&e.to_bytes().map_err(|err| err.at(DISCOVERY_HEADER_LEN + i * DISCOVERY_ENTRY_LEN))?);
        }
        Ok(out)
    }
}

impl core::fmt::Debug for DiscoveryLogEntryRaw {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match DiscoveryLogEntry::parse(self.as_bytes()) {
            Ok(e) => e.fmt(f),
            Err(e) => write!(f, "DiscoveryLogEntryRaw(undecodable: {e})"),
        }
    }
}
