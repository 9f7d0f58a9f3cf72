//! Typed decoding and encoding of capsule commands (an SQE with its SGL): admin, I/O and Fabrics.
//!
//! [`Capsule::parse`] is what a target runs on every received SQE. Anything it rejects comes back as a
//! [`DecodeError`] carrying the NVMe status and the byte offset for the error log, so the target completes
//! the command with exactly that and changes nothing else.

use crate::error::DecodeError;
use crate::fabrics::{self, Connect, fctype};
use crate::features::{Feature, FeatureSelect};
use crate::io::{DatasetManagement, ReadWrite};
use crate::property::{Property, PropertySize};
use crate::sgl::SglDescriptor;
use crate::sqe::{Sqe, offset, psdt};
use crate::status::Status;

pub mod opcode {
    // Admin.
    pub const DELETE_SQ: u8 = 0x00;
    pub const CREATE_SQ: u8 = 0x01;
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const DELETE_CQ: u8 = 0x04;
    pub const CREATE_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
    pub const NAMESPACE_MANAGEMENT: u8 = 0x0d;
    pub const FIRMWARE_COMMIT: u8 = 0x10;
    pub const FIRMWARE_DOWNLOAD: u8 = 0x11;
    pub const NAMESPACE_ATTACHMENT: u8 = 0x15;
    pub const KEEP_ALIVE: u8 = 0x18;
    /// Fabrics commands, on any queue; the command type is in byte 4.
    pub const FABRICS: u8 = 0x7f;
    // I/O, NVM command set.
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_UNCORRECTABLE: u8 = 0x04;
    pub const COMPARE: u8 = 0x05;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Which queue a capsule arrived on: opcodes mean different things on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueKind {
    Admin,
    Io,
}

/// Identify (CDW10: CNS 7:0, CNTID 31:16; CDW11: CNSSID 15:0, CSI 31:24).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Identify {
    pub nsid: u32,
    pub cns: u8,
    pub cntid: u16,
    pub cnssid: u16,
    pub csi: u8,
}

/// Get Log Page (CDW10: LID 7:0, LSP 14:8, RAE 15, NUMDL 31:16; CDW11: NUMDU 15:0, LSI 31:16;
/// CDW12-13: offset; CDW14: UUID index 6:0, OT 23, CSI 31:24).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct GetLogPage {
    pub nsid: u32,
    pub lid: u8,
    pub lsp: u8,
    /// Retain Asynchronous Event: reading does not clear the event.
    pub rae: bool,
    /// Number of dwords, 0's based.
    pub numd: u32,
    pub lsi: u16,
    /// Byte offset into the log; a multiple of 4.
    pub offset: u64,
    pub uuid_index: u8,
    pub csi: u8,
}

impl GetLogPage {
    /// Bytes requested: (NUMD + 1) dwords.
    pub const fn data_len(&self) -> u64 {
        (self.numd as u64 + 1) * 4
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SetFeatures {
    pub nsid: u32,
    /// Save (CDW10 bit 31).
    pub save: bool,
    pub feature: Feature,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GetFeatures {
    pub nsid: u32,
    pub fid: u8,
    pub select: FeatureSelect,
    pub cdw11: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdminCommand {
    GetLogPage(GetLogPage),
    Identify(Identify),
    Abort { sqid: u16, cid: u16 },
    SetFeatures(SetFeatures),
    GetFeatures(GetFeatures),
    AsyncEventRequest,
    KeepAlive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoCommand {
    Read(ReadWrite),
    Write(ReadWrite),
    Flush { nsid: u32 },
    WriteZeroes(ReadWrite),
    DatasetManagement(DatasetManagement),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FabricsCommand {
    Connect(Connect),
    PropertyGet { property: Property },
    PropertySet { property: Property, value: u64 },
    Disconnect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Admin(AdminCommand),
    Io(IoCommand),
    Fabrics(FabricsCommand),
}

/// A decoded SQE: command id, data descriptor and command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Capsule {
    pub command_id: u16,
    pub data: SglDescriptor,
    pub command: Command,
}

fn invalid_opcode(what: &'static str, at: usize, value: u8) -> DecodeError {
    DecodeError::value(what, at, value as u64).with_status(Status::INVALID_OPCODE.with_dnr())
}

impl Capsule {
    /// Decodes an SQE received on a queue of the given kind.
    pub fn parse(sqe: &Sqe, queue: QueueKind) -> Result<Capsule, DecodeError> {
        // NVMe-oF: no fused commands, and PSDT must say "SGL, metadata in one buffer" (Linux nvmet_req_init).
        if sqe.fuse() != 0 || sqe.psdt() != psdt::SGL_METADATA_BUFFER {
            return Err(DecodeError::value("SQE flags", offset::FLAGS, sqe.flags as u64));
        }
        let data = SglDescriptor::parse(&sqe.dptr).map_err(|e| e.at(offset::DPTR))?;
        let command = if sqe.opcode == opcode::FABRICS {
            Command::Fabrics(decode_fabrics(sqe, queue)?)
        } else {
            match queue {
                QueueKind::Admin => Command::Admin(decode_admin(sqe)?),
                QueueKind::Io => Command::Io(decode_io(sqe)?),
            }
        };
        Ok(Capsule { command_id: sqe.command_id(), data, command })
    }

    /// Decodes 64 bytes; see [`Capsule::parse`].
    pub fn parse_bytes(bytes: &[u8], queue: QueueKind) -> Result<Capsule, DecodeError> {
        Capsule::parse(Sqe::parse(bytes)?, queue)
    }

    /// The SQE for this capsule.
    pub fn to_sqe(&self) -> Sqe {
        let mut sqe = Sqe::with_opcode(self.command.opcode(), self.command_id);
        sqe.dptr = self.data.to_bytes();
        self.command.encode(&mut sqe);
        sqe
    }
}

impl Command {
    pub fn opcode(&self) -> u8 {
        match self {
            Command::Fabrics(_) => opcode::FABRICS,
            Command::Admin(a) => match a {
                AdminCommand::GetLogPage(_) => opcode::GET_LOG_PAGE,
                AdminCommand::Identify(_) => opcode::IDENTIFY,
                AdminCommand::Abort { .. } => opcode::ABORT,
                AdminCommand::SetFeatures(_) => opcode::SET_FEATURES,
                AdminCommand::GetFeatures(_) => opcode::GET_FEATURES,
                AdminCommand::AsyncEventRequest => opcode::ASYNC_EVENT_REQUEST,
                AdminCommand::KeepAlive => opcode::KEEP_ALIVE,
            },
            Command::Io(i) => match i {
                IoCommand::Read(_) => opcode::READ,
                IoCommand::Write(_) => opcode::WRITE,
                IoCommand::Flush { .. } => opcode::FLUSH,
                IoCommand::WriteZeroes(_) => opcode::WRITE_ZEROES,
                IoCommand::DatasetManagement(_) => opcode::DATASET_MANAGEMENT,
            },
        }
    }

    /// The queue kind this command is sent on; Fabrics commands other than Connect go to the admin queue.
    pub fn queue_kind(&self) -> QueueKind {
        match self {
            Command::Io(_) | Command::Fabrics(FabricsCommand::Disconnect) => QueueKind::Io,
            Command::Fabrics(FabricsCommand::Connect(c)) if c.qid != 0 => QueueKind::Io,
            _ => QueueKind::Admin,
        }
    }

    fn encode(&self, sqe: &mut Sqe) {
        match *self {
            Command::Fabrics(f) => encode_fabrics(&f, sqe),
            Command::Admin(a) => encode_admin(&a, sqe),
            Command::Io(i) => encode_io(&i, sqe),
        }
    }
}

fn decode_fabrics(sqe: &Sqe, queue: QueueKind) -> Result<FabricsCommand, DecodeError> {
    let ty = sqe.fctype();
    match (ty, queue) {
        (fctype::CONNECT, _) => Ok(FabricsCommand::Connect(Connect::decode(sqe)?)),
        (fctype::PROPERTY_GET, QueueKind::Admin) => {
            let (size, offset, _) = fabrics::decode_property(sqe);
            Ok(FabricsCommand::PropertyGet { property: Property::from_wire(offset, size)? })
        }
        (fctype::PROPERTY_SET, QueueKind::Admin) => {
            let (size, offset, value) = fabrics::decode_property(sqe);
            let property = Property::from_wire(offset, size)?;
            // For a 4-byte property, bytes 52..56 are reserved: the value is the low half only.
            let value = match size {
                PropertySize::Four => value & 0xffff_ffff,
                PropertySize::Eight => value,
            };
            Ok(FabricsCommand::PropertySet { property, value })
        }
        (fctype::DISCONNECT, QueueKind::Io) => {
            let recfmt = sqe.cdw10.get() as u16;
            if recfmt != fabrics::RECORD_FORMAT_0 {
                return Err(DecodeError::value("Disconnect RECFMT", fabrics::offset::DISCONNECT_RECFMT, recfmt as u64)
                    .with_status(Status::CONNECT_INCOMPATIBLE_FORMAT.with_dnr()));
            }
            Ok(FabricsCommand::Disconnect)
        }
        _ => Err(invalid_opcode("Fabrics command type", offset::FCTYPE, ty)),
    }
}

fn encode_fabrics(cmd: &FabricsCommand, sqe: &mut Sqe) {
    let ty = match *cmd {
        FabricsCommand::Connect(c) => {
            c.encode(sqe);
            fctype::CONNECT
        }
        FabricsCommand::PropertyGet { property } => {
            fabrics::encode_property(sqe, property.size(), property.offset(), None);
            fctype::PROPERTY_GET
        }
        FabricsCommand::PropertySet { property, value } => {
            fabrics::encode_property(sqe, property.size(), property.offset(), Some(value));
            fctype::PROPERTY_SET
        }
        FabricsCommand::Disconnect => fctype::DISCONNECT,
    };
    sqe.nsid = (ty as u32).into();
}

fn decode_admin(sqe: &Sqe) -> Result<AdminCommand, DecodeError> {
    let nsid = sqe.nsid.get();
    let (cdw10, cdw11) = (sqe.cdw10.get(), sqe.cdw11.get());
    Ok(match sqe.opcode {
        opcode::GET_LOG_PAGE => {
            let offset = sqe.cdw12.get() as u64 | (sqe.cdw13.get() as u64) << 32;
            if offset % 4 != 0 {
                return Err(DecodeError::value("Get Log Page offset", offset::CDW12, offset));
            }
            let cdw14 = sqe.cdw14.get();
            AdminCommand::GetLogPage(GetLogPage {
                nsid,
                lid: cdw10 as u8,
                lsp: (cdw10 >> 8) as u8 & 0x7f,
                rae: cdw10 & (1 << 15) != 0,
                numd: cdw10 >> 16 | (cdw11 & 0xffff) << 16,
                lsi: (cdw11 >> 16) as u16,
                offset,
                uuid_index: cdw14 as u8 & 0x7f,
                csi: (cdw14 >> 24) as u8,
            })
        }
        opcode::IDENTIFY => AdminCommand::Identify(Identify {
            nsid,
            cns: cdw10 as u8,
            cntid: (cdw10 >> 16) as u16,
            cnssid: cdw11 as u16,
            csi: (cdw11 >> 24) as u8,
        }),
        opcode::ABORT => AdminCommand::Abort { sqid: cdw10 as u16, cid: (cdw10 >> 16) as u16 },
        opcode::SET_FEATURES => AdminCommand::SetFeatures(SetFeatures {
            nsid,
            save: cdw10 & (1 << 31) != 0,
            feature: Feature::decode(cdw10 as u8, cdw11)?,
        }),
        opcode::GET_FEATURES => AdminCommand::GetFeatures(GetFeatures {
            nsid,
            fid: cdw10 as u8,
            select: FeatureSelect::from_bits((cdw10 >> 8) as u8 & 7)?,
            cdw11,
        }),
        opcode::ASYNC_EVENT_REQUEST => AdminCommand::AsyncEventRequest,
        opcode::KEEP_ALIVE => AdminCommand::KeepAlive,
        other => return Err(invalid_opcode("admin opcode", offset::OPCODE, other)),
    })
}

fn encode_admin(cmd: &AdminCommand, sqe: &mut Sqe) {
    match *cmd {
        AdminCommand::GetLogPage(g) => {
            sqe.nsid = g.nsid.into();
            sqe.cdw10 =
                (g.lid as u32 | ((g.lsp & 0x7f) as u32) << 8 | (g.rae as u32) << 15 | (g.numd & 0xffff) << 16).into();
            sqe.cdw11 = (g.numd >> 16 | (g.lsi as u32) << 16).into();
            sqe.cdw12 = (g.offset as u32).into();
            sqe.cdw13 = ((g.offset >> 32) as u32).into();
            sqe.cdw14 = ((g.uuid_index & 0x7f) as u32 | (g.csi as u32) << 24).into();
        }
        AdminCommand::Identify(i) => {
            sqe.nsid = i.nsid.into();
            sqe.cdw10 = (i.cns as u32 | (i.cntid as u32) << 16).into();
            sqe.cdw11 = (i.cnssid as u32 | (i.csi as u32) << 24).into();
        }
        AdminCommand::Abort { sqid, cid } => sqe.cdw10 = (sqid as u32 | (cid as u32) << 16).into(),
        AdminCommand::SetFeatures(s) => {
            sqe.nsid = s.nsid.into();
            sqe.cdw10 = (s.feature.fid() as u32 | (s.save as u32) << 31).into();
            sqe.cdw11 = s.feature.cdw11().into();
        }
        AdminCommand::GetFeatures(g) => {
            sqe.nsid = g.nsid.into();
            sqe.cdw10 = (g.fid as u32 | (g.select as u32) << 8).into();
            sqe.cdw11 = g.cdw11.into();
        }
        AdminCommand::AsyncEventRequest | AdminCommand::KeepAlive => {}
    }
}

fn decode_io(sqe: &Sqe) -> Result<IoCommand, DecodeError> {
    Ok(match sqe.opcode {
        opcode::READ => IoCommand::Read(ReadWrite::decode(sqe)),
        opcode::WRITE => IoCommand::Write(ReadWrite::decode(sqe)),
        opcode::FLUSH => IoCommand::Flush { nsid: sqe.nsid.get() },
        opcode::WRITE_ZEROES => IoCommand::WriteZeroes(ReadWrite::decode(sqe)),
        opcode::DATASET_MANAGEMENT => IoCommand::DatasetManagement(DatasetManagement {
            nsid: sqe.nsid.get(),
            nr: sqe.cdw10.get() as u8,
            attributes: sqe.cdw11.get(),
        }),
        other => return Err(invalid_opcode("I/O opcode", offset::OPCODE, other)),
    })
}

fn encode_io(cmd: &IoCommand, sqe: &mut Sqe) {
    match *cmd {
        IoCommand::Read(rw) | IoCommand::Write(rw) | IoCommand::WriteZeroes(rw) => rw.encode(sqe),
        IoCommand::Flush { nsid } => sqe.nsid = nsid.into(),
        IoCommand::DatasetManagement(d) => {
            sqe.nsid = d.nsid.into();
            sqe.cdw10 = (d.nr as u32).into();
            sqe.cdw11 = d.attributes.into();
        }
    }
}
