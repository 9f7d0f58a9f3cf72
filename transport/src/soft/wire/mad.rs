//! Management datagrams for connection management: the 24-byte MAD header and the IB CM messages (class 0x07,
//! class version 2) REQ, MRA, REJ, REP, RTU, DREQ, DREP, as Linux `drivers/infiniband/core/cm.c` sends them
//! (field map: `include/rdma/ibta_vol1_c12.h`; all fields big-endian, offsets below are within the CM message,
//! i.e. after the MAD header). Every MAD is 256 bytes on QP1, in a UD SEND with a DETH.

use super::{WireError, be24, need, put_be24};

pub const MAD_LEN: usize = 256;
pub const MAD_HEADER_LEN: usize = 24;
/// Bytes of CM message after the MAD header.
pub const CM_DATA_LEN: usize = MAD_LEN - MAD_HEADER_LEN;
pub const MGMT_CLASS_CM: u8 = 0x07;
pub const CM_CLASS_VERSION: u8 = 2;
pub const METHOD_SEND: u8 = 0x03;

/// CM attribute identifiers.
pub mod attr {
    pub const CLASS_PORT_INFO: u16 = 0x0001;
    pub const REQ: u16 = 0x0010;
    pub const MRA: u16 = 0x0011;
    pub const REJ: u16 = 0x0012;
    pub const REP: u16 = 0x0013;
    pub const RTU: u16 = 0x0014;
    pub const DREQ: u16 = 0x0015;
    pub const DREP: u16 = 0x0016;
}

/// Private data sizes of each message (IBTA table 106 onwards).
pub mod private_data_len {
    pub const REQ: usize = 92;
    pub const MRA: usize = 222;
    pub const REJ: usize = 148;
    pub const REP: usize = 196;
    pub const RTU: usize = 224;
    pub const DREQ: usize = 220;
    pub const DREP: usize = 224;
}

/// REJ reasons (Linux `enum ib_cm_rej_reason`).
pub mod reject_reason {
    pub const NO_QP: u16 = 1;
    pub const NO_RESOURCES: u16 = 3;
    pub const TIMEOUT: u16 = 4;
    pub const UNSUPPORTED: u16 = 5;
    pub const INVALID_COMM_ID: u16 = 6;
    pub const INVALID_SERVICE_ID: u16 = 8;
    pub const STALE_CONNECTION: u16 = 10;
    pub const INVALID_MTU: u16 = 26;
    pub const INSUFFICIENT_RESPONDER_RESOURCES: u16 = 27;
    /// A reject by the application (rdma_reject), with its private data.
    pub const CONSUMER_DEFINED: u16 = 28;
    pub const INVALID_RNR_RETRY: u16 = 29;
    pub const DUPLICATE_LOCAL_COMM_ID: u16 = 30;
    pub const INVALID_CLASS_VERSION: u16 = 31;
}

/// Which message a REJ or MRA refers to.
pub mod message {
    pub const REQ: u8 = 0;
    pub const REP: u8 = 1;
    pub const OTHER: u8 = 2;
}

/// The common MAD header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MadHeader {
    pub base_version: u8,
    pub mgmt_class: u8,
    pub class_version: u8,
    pub method: u8,
    pub status: u16,
    pub class_specific: u16,
    pub transaction_id: u64,
    pub attr_id: u16,
    pub attr_mod: u32,
}

impl MadHeader {
    /// A CM Send of the given attribute, as Linux's CM sends it.
    pub fn cm(attr_id: u16, transaction_id: u64) -> MadHeader {
        MadHeader {
            base_version: 1,
            mgmt_class: MGMT_CLASS_CM,
            class_version: CM_CLASS_VERSION,
            method: METHOD_SEND,
            status: 0,
            class_specific: 0,
            transaction_id,
            attr_id,
            attr_mod: 0,
        }
    }

    pub fn parse(b: &[u8]) -> Result<MadHeader, WireError> {
        need("MAD header", b, MAD_HEADER_LEN)?;
        Ok(MadHeader {
            base_version: b[0],
            mgmt_class: b[1],
            class_version: b[2],
            method: b[3],
            status: u16::from_be_bytes([b[4], b[5]]),
            class_specific: u16::from_be_bytes([b[6], b[7]]),
            transaction_id: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            attr_id: u16::from_be_bytes([b[16], b[17]]),
            attr_mod: u32::from_be_bytes(b[20..24].try_into().expect("4 bytes")),
        })
    }

    pub fn emit(&self, b: &mut [u8]) {
        b[0] = self.base_version;
        b[1] = self.mgmt_class;
        b[2] = self.class_version;
        b[3] = self.method;
        b[4..6].copy_from_slice(&self.status.to_be_bytes());
        b[6..8].copy_from_slice(&self.class_specific.to_be_bytes());
        b[8..16].copy_from_slice(&self.transaction_id.to_be_bytes());
        b[16..18].copy_from_slice(&self.attr_id.to_be_bytes());
        b[18..20].fill(0);
        b[20..24].copy_from_slice(&self.attr_mod.to_be_bytes());
    }
}

/// One path of a REQ (primary or alternate, 44 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CmPath {
    pub local_lid: u16,
    pub remote_lid: u16,
    pub local_gid: [u8; 16],
    pub remote_gid: [u8; 16],
    /// 20 bits; on RoCEv2 it decides the UDP source port of the connection.
    pub flow_label: u32,
    /// 6 bits.
    pub packet_rate: u8,
    pub traffic_class: u8,
    pub hop_limit: u8,
    /// Service level, 4 bits.
    pub sl: u8,
    pub subnet_local: bool,
    /// 5 bits: 4.096 µs × 2^n.
    pub local_ack_timeout: u8,
}
const PATH_LEN: usize = 44;

impl CmPath {
    fn parse(b: &[u8]) -> CmPath {
        CmPath {
            local_lid: u16::from_be_bytes([b[0], b[1]]),
            remote_lid: u16::from_be_bytes([b[2], b[3]]),
            local_gid: b[4..20].try_into().expect("16 bytes"),
            remote_gid: b[20..36].try_into().expect("16 bytes"),
            flow_label: u32::from_be_bytes(b[36..40].try_into().expect("4 bytes")) >> 12,
            packet_rate: b[39] & 0x3f,
            traffic_class: b[40],
            hop_limit: b[41],
            sl: b[42] >> 4,
            subnet_local: b[42] & 0x08 != 0,
            local_ack_timeout: b[43] >> 3,
        }
    }
    fn emit(&self, b: &mut [u8]) -> Result<(), WireError> {
        check("path flow label", self.flow_label as u64, 20)?;
        check("path packet rate", self.packet_rate as u64, 6)?;
        check("path SL", self.sl as u64, 4)?;
        check("path local ACK timeout", self.local_ack_timeout as u64, 5)?;
        b[0..2].copy_from_slice(&self.local_lid.to_be_bytes());
        b[2..4].copy_from_slice(&self.remote_lid.to_be_bytes());
        b[4..20].copy_from_slice(&self.local_gid);
        b[20..36].copy_from_slice(&self.remote_gid);
        b[36..40].copy_from_slice(&(self.flow_label << 12).to_be_bytes());
        b[39] |= self.packet_rate;
        b[40] = self.traffic_class;
        b[41] = self.hop_limit;
        b[42] = self.sl << 4 | (self.subnet_local as u8) << 3;
        b[43] = self.local_ack_timeout << 3;
        Ok(())
    }
}

fn check(what: &'static str, value: u64, bits: u32) -> Result<(), WireError> {
    if value >> bits != 0 { Err(WireError::FieldOverflow { what, value }) } else { Ok(()) }
}

/// Connection request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Req {
    pub local_comm_id: u32,
    /// rdma_cm over IP: 0x0000000001060000 | port for TCP port space (RDMA_PS_TCP).
    pub service_id: u64,
    pub local_ca_guid: u64,
    pub local_qkey: u32,
    pub local_qpn: u32,
    pub responder_resources: u8,
    pub local_eecn: u32,
    pub initiator_depth: u8,
    pub remote_eecn: u32,
    /// 5 bits.
    pub remote_cm_response_timeout: u8,
    /// 2 bits: 0 = RC.
    pub transport_service_type: u8,
    pub end_to_end_flow_control: bool,
    pub starting_psn: u32,
    pub local_cm_response_timeout: u8,
    /// 3 bits.
    pub retry_count: u8,
    pub pkey: u16,
    /// 4 bits: 1 = 256 … 5 = 4096.
    pub path_mtu: u8,
    pub rdc_exists: bool,
    /// 3 bits (7 = infinite).
    pub rnr_retry_count: u8,
    /// 4 bits.
    pub max_cm_retries: u8,
    pub srq: bool,
    pub extended_transport_type: u8,
    pub primary_path: CmPath,
    pub alternate_path: CmPath,
    /// 92 bytes on the wire; shorter is zero-padded on emit.
    pub private_data: Vec<u8>,
}

/// Connection reply.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rep {
    pub local_comm_id: u32,
    pub remote_comm_id: u32,
    pub local_qkey: u32,
    pub local_qpn: u32,
    pub local_eecn: u32,
    pub starting_psn: u32,
    pub responder_resources: u8,
    pub initiator_depth: u8,
    /// 5 bits.
    pub target_ack_delay: u8,
    /// 2 bits.
    pub failover_accepted: u8,
    pub end_to_end_flow_control: bool,
    /// 3 bits.
    pub rnr_retry_count: u8,
    pub srq: bool,
    pub local_ca_guid: u64,
    pub private_data: Vec<u8>,
}

/// Reject.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rej {
    pub local_comm_id: u32,
    pub remote_comm_id: u32,
    /// See [`message`].
    pub message_rejected: u8,
    /// Length of the additional rejection information (7 bits).
    pub ari_len: u8,
    pub reason: u16,
    pub ari: [u8; 72],
    pub private_data: Vec<u8>,
}

/// A CM message: what QP1 carries for connection management.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CmMessage {
    Req(Req),
    Mra { local_comm_id: u32, remote_comm_id: u32, message_mraed: u8, service_timeout: u8, private_data: Vec<u8> },
    Rej(Rej),
    Rep(Rep),
    Rtu { local_comm_id: u32, remote_comm_id: u32, private_data: Vec<u8> },
    Dreq { local_comm_id: u32, remote_comm_id: u32, remote_qpn: u32, private_data: Vec<u8> },
    Drep { local_comm_id: u32, remote_comm_id: u32, private_data: Vec<u8> },
}

/// Why a MAD is not a CM message we handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MadError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("MAD of class {class:#04x} version {version} (CM is class 0x07 version 2)")]
    NotCm { class: u8, version: u8 },
    #[error("CM attribute {0:#06x} is not handled")]
    UnknownAttribute(u16),
    #[error("{what}: {len} bytes of private data, at most {max} fit")]
    PrivateDataTooLong { what: &'static str, len: usize, max: usize },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl CmMessage {
    pub fn attr_id(&self) -> u16 {
        match self {
            CmMessage::Req(_) => attr::REQ,
            CmMessage::Mra { .. } => attr::MRA,
            CmMessage::Rej(_) => attr::REJ,
            CmMessage::Rep(_) => attr::REP,
            CmMessage::Rtu { .. } => attr::RTU,
            CmMessage::Dreq { .. } => attr::DREQ,
            CmMessage::Drep { .. } => attr::DREP,
        }
    }

    /// Parses a 256-byte MAD: its header and CM message.
    pub fn parse(mad: &[u8]) -> Result<(MadHeader, CmMessage), MadError> {
        need("CM MAD", mad, MAD_LEN)?;
        let header = MadHeader::parse(mad)?;
        if header.mgmt_class != MGMT_CLASS_CM || header.class_version != CM_CLASS_VERSION {
            return Err(MadError::NotCm { class: header.mgmt_class, version: header.class_version });
        }
        let b = &mad[MAD_HEADER_LEN..MAD_LEN];
        let pd = |at: usize| b[at..].to_vec();
        let message = match header.attr_id {
            attr::REQ => CmMessage::Req(Req {
                local_comm_id: u32_at(b, 0),
                service_id: u64_at(b, 8),
                local_ca_guid: u64_at(b, 16),
                local_qkey: u32_at(b, 28),
                local_qpn: be24(&b[32..35]),
                responder_resources: b[35],
                local_eecn: be24(&b[36..39]),
                initiator_depth: b[39],
                remote_eecn: be24(&b[40..43]),
                remote_cm_response_timeout: b[43] >> 3,
                transport_service_type: (b[43] >> 1) & 3,
                end_to_end_flow_control: b[43] & 1 != 0,
                starting_psn: be24(&b[44..47]),
                local_cm_response_timeout: b[47] >> 3,
                retry_count: b[47] & 7,
                pkey: u16::from_be_bytes([b[48], b[49]]),
                path_mtu: b[50] >> 4,
                rdc_exists: b[50] & 0x08 != 0,
                rnr_retry_count: b[50] & 7,
                max_cm_retries: b[51] >> 4,
                srq: b[51] & 0x08 != 0,
                extended_transport_type: b[51] & 7,
                primary_path: CmPath::parse(&b[52..52 + PATH_LEN]),
                alternate_path: CmPath::parse(&b[96..96 + PATH_LEN]),
                private_data: pd(140),
            }),
            attr::MRA => CmMessage::Mra {
                local_comm_id: u32_at(b, 0),
                remote_comm_id: u32_at(b, 4),
                message_mraed: b[8] >> 6,
                service_timeout: b[9] >> 3,
                private_data: pd(10),
            },
            attr::REJ => CmMessage::Rej(Rej {
                local_comm_id: u32_at(b, 0),
                remote_comm_id: u32_at(b, 4),
                message_rejected: b[8] >> 6,
                ari_len: b[9] >> 1,
                reason: u16::from_be_bytes([b[10], b[11]]),
                ari: b[12..84].try_into().expect("72 bytes"),
                private_data: pd(84),
            }),
            attr::REP => CmMessage::Rep(Rep {
                local_comm_id: u32_at(b, 0),
                remote_comm_id: u32_at(b, 4),
                local_qkey: u32_at(b, 8),
                local_qpn: be24(&b[12..15]),
                local_eecn: be24(&b[16..19]),
                starting_psn: be24(&b[20..23]),
                responder_resources: b[24],
                initiator_depth: b[25],
                target_ack_delay: b[26] >> 3,
                failover_accepted: (b[26] >> 1) & 3,
                end_to_end_flow_control: b[26] & 1 != 0,
                rnr_retry_count: b[27] >> 5,
                srq: b[27] & 0x10 != 0,
                local_ca_guid: u64_at(b, 28),
                private_data: pd(36),
            }),
            attr::RTU => {
                CmMessage::Rtu { local_comm_id: u32_at(b, 0), remote_comm_id: u32_at(b, 4), private_data: pd(8) }
            }
            attr::DREQ => CmMessage::Dreq {
                local_comm_id: u32_at(b, 0),
                remote_comm_id: u32_at(b, 4),
                remote_qpn: be24(&b[8..11]),
                private_data: pd(12),
            },
            attr::DREP => {
                CmMessage::Drep { local_comm_id: u32_at(b, 0), remote_comm_id: u32_at(b, 4), private_data: pd(8) }
            }
            other => return Err(MadError::UnknownAttribute(other)),
        };
        Ok((header, message))
    }

    /// The 256-byte MAD. Private data longer than the message allows is refused; shorter is zero-padded.
    pub fn emit(&self, header: &MadHeader) -> Result<[u8; MAD_LEN], MadError> {
        let mut mad = [0u8; MAD_LEN];
        MadHeader { attr_id: self.attr_id(), ..*header }.emit(&mut mad[..MAD_HEADER_LEN]);
        let b = &mut mad[MAD_HEADER_LEN..];
        let put_pd = |b: &mut [u8], at: usize, data: &[u8], what: &'static str| {
            let max = CM_DATA_LEN - at;
            if data.len() > max {
                return Err(MadError::PrivateDataTooLong { what, len: data.len(), max });
            }
            b[at..at + data.len()].copy_from_slice(data);
            Ok(())
        };
        let ids = |b: &mut [u8], local: u32, remote: u32| {
            b[0..4].copy_from_slice(&local.to_be_bytes());
            b[4..8].copy_from_slice(&remote.to_be_bytes());
        };
        match self {
            CmMessage::Req(r) => {
                for (what, v, bits) in [
                    ("REQ local QPN", r.local_qpn as u64, 24),
                    ("REQ local EECN", r.local_eecn as u64, 24),
                    ("REQ remote EECN", r.remote_eecn as u64, 24),
                    ("REQ starting PSN", r.starting_psn as u64, 24),
                    ("REQ remote CM response timeout", r.remote_cm_response_timeout as u64, 5),
                    ("REQ transport service type", r.transport_service_type as u64, 2),
                    ("REQ local CM response timeout", r.local_cm_response_timeout as u64, 5),
                    ("REQ retry count", r.retry_count as u64, 3),
                    ("REQ path MTU", r.path_mtu as u64, 4),
                    ("REQ RNR retry count", r.rnr_retry_count as u64, 3),
                    ("REQ max CM retries", r.max_cm_retries as u64, 4),
                    ("REQ extended transport type", r.extended_transport_type as u64, 3),
                ] {
                    check(what, v, bits)?;
                }
                b[0..4].copy_from_slice(&r.local_comm_id.to_be_bytes());
                b[8..16].copy_from_slice(&r.service_id.to_be_bytes());
                b[16..24].copy_from_slice(&r.local_ca_guid.to_be_bytes());
                b[28..32].copy_from_slice(&r.local_qkey.to_be_bytes());
                put_be24(&mut b[32..35], r.local_qpn);
                b[35] = r.responder_resources;
                put_be24(&mut b[36..39], r.local_eecn);
                b[39] = r.initiator_depth;
                put_be24(&mut b[40..43], r.remote_eecn);
                b[43] =
                    r.remote_cm_response_timeout << 3 | r.transport_service_type << 1 | r.end_to_end_flow_control as u8;
                put_be24(&mut b[44..47], r.starting_psn);
                b[47] = r.local_cm_response_timeout << 3 | r.retry_count;
                b[48..50].copy_from_slice(&r.pkey.to_be_bytes());
                b[50] = r.path_mtu << 4 | (r.rdc_exists as u8) << 3 | r.rnr_retry_count;
                b[51] = r.max_cm_retries << 4 | (r.srq as u8) << 3 | r.extended_transport_type;
                r.primary_path.emit(&mut b[52..52 + PATH_LEN])?;
                r.alternate_path.emit(&mut b[96..96 + PATH_LEN])?;
                put_pd(b, 140, &r.private_data, "REQ")?;
            }
            CmMessage::Mra { local_comm_id, remote_comm_id, message_mraed, service_timeout, private_data } => {
                check("MRA message", *message_mraed as u64, 2)?;
                check("MRA service timeout", *service_timeout as u64, 5)?;
                ids(b, *local_comm_id, *remote_comm_id);
                b[8] = message_mraed << 6;
                b[9] = service_timeout << 3;
                put_pd(b, 10, private_data, "MRA")?;
            }
            CmMessage::Rej(r) => {
                check("REJ message", r.message_rejected as u64, 2)?;
                check("REJ ARI length", r.ari_len as u64, 7)?;
                ids(b, r.local_comm_id, r.remote_comm_id);
                b[8] = r.message_rejected << 6;
                b[9] = r.ari_len << 1;
                b[10..12].copy_from_slice(&r.reason.to_be_bytes());
                b[12..84].copy_from_slice(&r.ari);
                put_pd(b, 84, &r.private_data, "REJ")?;
            }
            CmMessage::Rep(r) => {
                for (what, v, bits) in [
                    ("REP local QPN", r.local_qpn as u64, 24),
                    ("REP local EECN", r.local_eecn as u64, 24),
                    ("REP starting PSN", r.starting_psn as u64, 24),
                    ("REP target ACK delay", r.target_ack_delay as u64, 5),
                    ("REP failover accepted", r.failover_accepted as u64, 2),
                    ("REP RNR retry count", r.rnr_retry_count as u64, 3),
                ] {
                    check(what, v, bits)?;
                }
                ids(b, r.local_comm_id, r.remote_comm_id);
                b[8..12].copy_from_slice(&r.local_qkey.to_be_bytes());
                put_be24(&mut b[12..15], r.local_qpn);
                put_be24(&mut b[16..19], r.local_eecn);
                put_be24(&mut b[20..23], r.starting_psn);
                b[24] = r.responder_resources;
                b[25] = r.initiator_depth;
                b[26] = r.target_ack_delay << 3 | r.failover_accepted << 1 | r.end_to_end_flow_control as u8;
                b[27] = r.rnr_retry_count << 5 | (r.srq as u8) << 4;
                b[28..36].copy_from_slice(&r.local_ca_guid.to_be_bytes());
                put_pd(b, 36, &r.private_data, "REP")?;
            }
            CmMessage::Rtu { local_comm_id, remote_comm_id, private_data } => {
                ids(b, *local_comm_id, *remote_comm_id);
                put_pd(b, 8, private_data, "RTU")?;
            }
            CmMessage::Dreq { local_comm_id, remote_comm_id, remote_qpn, private_data } => {
                check("DREQ remote QPN", *remote_qpn as u64, 24)?;
                ids(b, *local_comm_id, *remote_comm_id);
                put_be24(&mut b[8..11], *remote_qpn);
                put_pd(b, 12, private_data, "DREQ")?;
            }
            CmMessage::Drep { local_comm_id, remote_comm_id, private_data } => {
                ids(b, *local_comm_id, *remote_comm_id);
                put_pd(b, 8, private_data, "DREP")?;
            }
        }
        Ok(mad)
    }
}
