//! I/O commands (NVM command set): Read, Write, Flush, Write Zeroes and Dataset Management, checked against
//! the namespace (Linux `io-cmd-file.c` / `io-cmd-bdev.c`) and then run on its backend. Planning is pure;
//! execution is one synchronous backend call, which the transport binding runs inline or on a blocking thread
//! as the backend asks.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use nvme_proto::io::{DsmRange, ReadWrite};
use nvme_proto::{IoCommand, Status};

use crate::controller::ControllerCounters;
use crate::subsystem::{Namespace, Subsystem};

/// A checked I/O command, ready to run.
#[derive(Debug, Clone)]
pub enum IoPlan {
    Read {
        ns: Arc<Namespace>,
        offset: u64,
        len: u32,
    },
    Write {
        ns: Arc<Namespace>,
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush {
        namespaces: Vec<Arc<Namespace>>,
    },
    WriteZeroes {
        ns: Arc<Namespace>,
        offset: u64,
        len: u64,
        slba: u64,
    },
    /// Dataset Management: `ranges` entries of range data follow; `deallocate` says whether to act on them.
    DatasetManagement {
        ns: Arc<Namespace>,
        ranges: usize,
        deallocate: bool,
    },
}

/// Where a command's data goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    None,
    /// Host → controller, this many bytes.
    ToController(u32),
    /// Controller → host, this many bytes.
    ToHost(u32),
}

fn namespace(subsystem: &Subsystem, nsid: u32) -> Result<Arc<Namespace>, Status> {
    subsystem.namespace(nsid).ok_or(Status::INVALID_NAMESPACE.with_dnr())
}

/// Byte offset and length of an LBA range, refused when it leaves the namespace.
fn extent(ns: &Namespace, slba: u64, blocks: u64) -> Result<(u64, u64), Status> {
    match slba.checked_add(blocks) {
        Some(end) if end <= ns.blocks() => Ok((slba << ns.block_shift(), blocks << ns.block_shift())),
        _ => Err(Status::LBA_OUT_OF_RANGE.with_dnr()),
    }
}

fn rw(subsystem: &Subsystem, rw: &ReadWrite, max_io_size: u32) -> Result<(Arc<Namespace>, u64, u32), Status> {
    let ns = namespace(subsystem, rw.nsid)?;
    let (offset, len) = extent(&ns, rw.slba, rw.blocks() as u64)?;
    if len > max_io_size as u64 {
        // Beyond MDTS: Invalid Field in Command (NVMe base spec, MDTS).
        return Err(Status::INVALID_FIELD.with_dnr());
    }
    Ok((ns, offset, len as u32))
}

impl IoPlan {
    pub fn new(subsystem: &Subsystem, cmd: &IoCommand, max_io_size: u32) -> Result<IoPlan, Status> {
        Ok(match cmd {
            IoCommand::Read(r) => {
                let (ns, offset, len) = rw(subsystem, r, max_io_size)?;
                IoPlan::Read { ns, offset, len }
            }
            IoCommand::Write(w) => {
                let (ns, offset, len) = rw(subsystem, w, max_io_size)?;
                IoPlan::Write { ns, offset, len, fua: w.fua() }
            }
            IoCommand::Flush { nsid } if *nsid == u32::MAX => IoPlan::Flush { namespaces: subsystem.namespaces() },
            IoCommand::Flush { nsid } => IoPlan::Flush { namespaces: vec![namespace(subsystem, *nsid)?] },
            IoCommand::WriteZeroes(w) => {
                let ns = namespace(subsystem, w.nsid)?;
                let (offset, len) = extent(&ns, w.slba, w.blocks() as u64)?;
                IoPlan::WriteZeroes { ns, offset, len, slba: w.slba }
            }
            IoCommand::DatasetManagement(d) => IoPlan::DatasetManagement {
                ns: namespace(subsystem, d.nsid)?,
                ranges: d.ranges(),
                deallocate: d.deallocate(),
            },
        })
    }

    pub fn transfer(&self) -> Transfer {
        match self {
            IoPlan::Read { len, .. } => Transfer::ToHost(*len),
            IoPlan::Write { len, .. } => Transfer::ToController(*len),
            IoPlan::DatasetManagement { ranges, .. } => {
                Transfer::ToController((ranges * nvme_proto::io::DSM_RANGE_LEN) as u32)
            }
            IoPlan::Flush { .. } | IoPlan::WriteZeroes { .. } => Transfer::None,
        }
    }

    /// Whether running it may sleep (it should then leave the poll group's thread).
    pub fn may_block(&self) -> bool {
        match self {
            IoPlan::Read { ns, .. }
            | IoPlan::Write { ns, .. }
            | IoPlan::WriteZeroes { ns, .. }
            | IoPlan::DatasetManagement { ns, .. } => ns.backend.may_block(),
            IoPlan::Flush { namespaces } => namespaces.iter().any(|n| n.backend.may_block()),
        }
    }

    /// Runs the command. `data` holds what the host sent (writes, DSM ranges) or receives what it reads (sized
    /// by the caller to the transfer length).
    pub fn execute(&self, data: &mut [u8], counters: &ControllerCounters) -> Result<(), Status> {
        let media = |e: std::io::Error, status: Status| {
            tracing::error!("backend: {e}");
            counters.media_errors.fetch_add(1, Ordering::Relaxed);
            status
        };
        match self {
            IoPlan::Read { ns, offset, len } => {
                ns.backend
                    .read_at(*offset, &mut data[..*len as usize])
                    .map_err(|e| media(e, Status::UNRECOVERED_READ_ERROR))?;
                counters.read_commands.fetch_add(1, Ordering::Relaxed);
                counters.bytes_read.fetch_add(*len as u64, Ordering::Relaxed);
            }
            IoPlan::Write { ns, offset, len, fua } => {
                ns.backend.write_at(*offset, &data[..*len as usize]).map_err(|e| media(e, Status::WRITE_FAULT))?;
                if *fua {
                    ns.backend.flush().map_err(|e| media(e, Status::WRITE_FAULT))?;
                }
                counters.write_commands.fetch_add(1, Ordering::Relaxed);
                counters.bytes_written.fetch_add(*len as u64, Ordering::Relaxed);
            }
            IoPlan::Flush { namespaces } => {
                for ns in namespaces {
                    ns.backend.flush().map_err(|e| media(e, Status::WRITE_FAULT))?;
                }
                counters.other_io_commands.fetch_add(1, Ordering::Relaxed);
            }
            IoPlan::WriteZeroes { ns, offset, len, .. } => {
                ns.backend.write_zeroes(*offset, *len).map_err(|e| media(e, Status::WRITE_FAULT))?;
                counters.other_io_commands.fetch_add(1, Ordering::Relaxed);
            }
            IoPlan::DatasetManagement { ns, ranges, deallocate } => {
                let list = DsmRange::parse_list(data, *ranges).map_err(|e| e.status)?;
                // Check every range before acting on any: a bad range changes nothing.
                let extents =
                    list.iter().map(|r| extent(ns, r.slba.get(), r.nlb.get() as u64)).collect::<Result<Vec<_>, _>>()?;
                if *deallocate && ns.backend.supports_deallocate() {
                    for (offset, len) in extents.into_iter().filter(|(_, len)| *len > 0) {
                        ns.backend.deallocate(offset, len).map_err(|e| media(e, Status::INTERNAL))?;
                    }
                }
                counters.other_io_commands.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// NSID and starting LBA, for the error log.
    pub fn location(&self) -> (u32, u64) {
        match self {
            IoPlan::Read { ns, offset, .. } | IoPlan::Write { ns, offset, .. } => (ns.nsid, offset >> ns.block_shift()),
            IoPlan::WriteZeroes { ns, slba, .. } => (ns.nsid, *slba),
            IoPlan::DatasetManagement { ns, .. } => (ns.nsid, 0),
            IoPlan::Flush { namespaces } => (namespaces.first().map_or(0, |n| n.nsid), 0),
        }
    }
}
