//! NVMe over Fabrics commands (opcode 0x7F): Connect with its 1024-byte data, Property Get/Set, Disconnect, and
//! the Connect response (Linux `struct nvmf_connect_command`, `nvmf_connect_data`, `nvmf_property_*_command`).

use zerocopy::little_endian::U16;
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{DecodeError, view};
use crate::nqn;
use crate::property::PropertySize;
use crate::sqe::Sqe;
use crate::status::Status;
use crate::uuid::Uuid;

/// Fabrics command types (SQE byte 4).
pub mod fctype {
    pub const PROPERTY_SET: u8 = 0x00;
    pub const CONNECT: u8 = 0x01;
    pub const PROPERTY_GET: u8 = 0x04;
    pub const AUTH_SEND: u8 = 0x05;
    pub const AUTH_RECEIVE: u8 = 0x06;
    pub const DISCONNECT: u8 = 0x08;
}

/// Byte offsets inside Fabrics SQEs and the Connect data, as Linux's `offsetof` gives them; used for error
/// locations (Connect response IPO) and pinned by the known-answer tests.
pub mod offset {
    pub const CONNECT_RECFMT: usize = 40;
    pub const CONNECT_QID: usize = 42;
    pub const CONNECT_SQSIZE: usize = 44;
    pub const CONNECT_CATTR: usize = 46;
    pub const CONNECT_KATO: usize = 48;
    pub const PROPERTY_ATTRIB: usize = 40;
    pub const PROPERTY_OFFSET: usize = 44;
    pub const PROPERTY_VALUE: usize = 48;
    pub const DISCONNECT_RECFMT: usize = 40;

    pub const DATA_HOSTID: usize = 0;
    pub const DATA_CNTLID: usize = 16;
    pub const DATA_SUBNQN: usize = 256;
    pub const DATA_HOSTNQN: usize = 512;
}

/// The only Connect / Disconnect record format defined (NVMe-oF 1.0 onwards).
pub const RECORD_FORMAT_0: u16 = 0;
/// CNTLID value in the admin queue's Connect data asking for a dynamically allocated controller.
pub const CNTLID_DYNAMIC: u16 = 0xffff;
/// CNTLID value asking for a static controller "any".
pub const CNTLID_STATIC_ANY: u16 = 0xfffe;
pub const CONNECT_DATA_LEN: usize = 1024;

/// Connect command attributes (CATTR).
pub mod cattr {
    /// Priority class of an I/O queue (bits 1:0).
    pub const PRIORITY_CLASS_MASK: u8 = 0x03;
    /// The host disables SQ flow control and will ignore SQHD (Linux `NVME_CONNECT_DISABLE_SQFLOW`).
    pub const DISABLE_SQ_FLOW_CONTROL: u8 = 0x04;
}

/// A decoded Connect command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Connect {
    pub recfmt: u16,
    /// Queue to create: 0 is the admin queue.
    pub qid: u16,
    /// Submission queue size, 0's based.
    pub sqsize: u16,
    pub cattr: u8,
    /// Keep-alive timeout in milliseconds (admin queue only; 0 disables).
    pub kato: u32,
}

impl Connect {
    pub(crate) fn decode(sqe: &Sqe) -> Result<Self, DecodeError> {
        let cdw10 = sqe.cdw10.get();
        let cdw11 = sqe.cdw11.get();
        let connect = Connect {
            recfmt: cdw10 as u16,
            qid: (cdw10 >> 16) as u16,
            sqsize: cdw11 as u16,
            cattr: (cdw11 >> 16) as u8,
            kato: sqe.cdw12.get(),
        };
        if connect.recfmt != RECORD_FORMAT_0 {
            return Err(DecodeError::value("Connect RECFMT", offset::CONNECT_RECFMT, connect.recfmt as u64)
                .with_status(Status::CONNECT_INCOMPATIBLE_FORMAT.with_dnr()));
        }
        Ok(connect)
    }

    pub(crate) fn encode(&self, sqe: &mut Sqe) {
        sqe.cdw10 = (self.recfmt as u32 | (self.qid as u32) << 16).into();
        sqe.cdw11 = (self.sqsize as u32 | (self.cattr as u32) << 16).into();
        sqe.cdw12 = self.kato.into();
    }
}

/// The 1024 bytes of Connect data (Linux `struct nvmf_connect_data`).
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ConnectDataRaw {
    pub hostid: [u8; 16],
    pub cntlid: U16,
    pub reserved18: [u8; 238],
    pub subnqn: [u8; 256],
    pub hostnqn: [u8; 256],
    pub reserved768: [u8; 256],
}
const _: () = assert!(size_of::<ConnectDataRaw>() == CONNECT_DATA_LEN);

/// Connect data, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnectData {
    pub hostid: Uuid,
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
}

impl ConnectData {
    /// Decodes the 1024 bytes. Errors carry Connect Invalid Parameters; build the CQE result with
    /// [`invalid_parameter_result`] from the error's offset.
    pub fn parse(bytes: &[u8]) -> Result<Self, DecodeError> {
        let raw: &ConnectDataRaw = view("Connect data", bytes)?;
        let invalid = |e: DecodeError, at| e.at(at).with_status(Status::CONNECT_INVALID_PARAMETERS.with_dnr());
        let subnqn = nqn::read_wire("Connect SUBNQN", &raw.subnqn).map_err(|e| invalid(e, offset::DATA_SUBNQN))?;
        let hostnqn = nqn::read_wire("Connect HOSTNQN", &raw.hostnqn).map_err(|e| invalid(e, offset::DATA_HOSTNQN))?;
        Ok(ConnectData {
            hostid: Uuid(raw.hostid),
            cntlid: raw.cntlid.get(),
            subnqn: subnqn.to_owned(),
            hostnqn: hostnqn.to_owned(),
        })
    }

    pub fn to_bytes(&self) -> Result<[u8; CONNECT_DATA_LEN], DecodeError> {
        let mut raw = ConnectDataRaw::new_zeroed();
        raw.hostid = self.hostid.0;
        raw.cntlid = self.cntlid.into();
        nqn::write_wire("Connect SUBNQN", &mut raw.subnqn, &self.subnqn).map_err(|e| e.at(offset::DATA_SUBNQN))?;
        nqn::write_wire("Connect HOSTNQN", &mut raw.hostnqn, &self.hostnqn).map_err(|e| e.at(offset::DATA_HOSTNQN))?;
        let mut out = [0u8; CONNECT_DATA_LEN];
        out.copy_from_slice(raw.as_bytes());
        Ok(out)
    }
}

/// Where an invalid Connect parameter is: in the SQE or in the Connect data (IATTR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectParameter {
    /// Byte offset in the Connect SQE.
    Command(u16),
    /// Byte offset in the Connect data.
    Data(u16),
}

/// CQE DW0 of a Connect completed with Connect Invalid Parameters: IPO in bits 15:0, IATTR in bits 23:16
/// (1 = the offset is in the data). Linux `IPO_IATTR_CONNECT_DATA` / `IPO_IATTR_CONNECT_SQE`.
pub const fn invalid_parameter_result(parameter: ConnectParameter) -> u32 {
    match parameter {
        ConnectParameter::Command(ipo) => ipo as u32,
        ConnectParameter::Data(ipo) => 1 << 16 | ipo as u32,
    }
}

/// Decodes a Connect Invalid Parameters CQE DW0.
pub const fn parse_invalid_parameter_result(dw0: u32) -> ConnectParameter {
    if (dw0 >> 16) & 0xff == 1 { ConnectParameter::Data(dw0 as u16) } else { ConnectParameter::Command(dw0 as u16) }
}

/// CQE DW0 of a successful Connect: the controller id in bits 15:0 (Linux `result.u16`).
pub const fn connect_success_result(cntlid: u16) -> u32 {
    cntlid as u32
}

/// The controller id from a successful Connect's CQE DW0.
pub const fn connect_result_cntlid(dw0: u32) -> u16 {
    dw0 as u16
}

/// Property Get / Set decoding from the SQE.
pub(crate) fn decode_property(sqe: &Sqe) -> (PropertySize, u32, u64) {
    let size = PropertySize::from_attrib(sqe.cdw10.get() as u8);
    let offset = sqe.cdw11.get();
    let value = sqe.cdw12.get() as u64 | (sqe.cdw13.get() as u64) << 32;
    (size, offset, value)
}

pub(crate) fn encode_property(sqe: &mut Sqe, size: PropertySize, offset: u32, value: Option<u64>) {
    sqe.cdw10 = (size.attrib() as u32).into();
    sqe.cdw11 = offset.into();
    if let Some(value) = value {
        sqe.cdw12 = (value as u32).into();
        sqe.cdw13 = ((value >> 32) as u32).into();
    }
}

impl core::fmt::Debug for ConnectDataRaw {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match ConnectData::parse(self.as_bytes()) {
            Ok(data) => data.fmt(f),
            Err(e) => write!(f, "ConnectDataRaw(undecodable: {e})"),
        }
    }
}
