//! Decodes an NVMe-oF/RDMA command capsule (a 64-byte SQE, optionally followed by in-capsule data) and prints
//! what a target would make of it: the command, its data descriptor, and any in-capsule Connect data — or
//! the NVMe status and byte offset it would be rejected with.
//!
//! With no input it decodes an embedded capsule: the Linux kernel host's I/O-queue Fabrics Connect, as
//! captured on the wire (`shared/vectors/connect-io-mtu1024.pcap`, 1088-byte SEND to QP 0x13).
//!
//!     cargo run -p nvme-proto --example decode_capsule
//!     cargo run -p nvme-proto --example decode_capsule -- --queue admin --hex 7f4000000400000000...
//!     cargo run -p nvme-proto --example decode_capsule -- --file capsule.bin
#![allow(clippy::print_stdout)]

use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use nvme_proto::command::{AdminCommand, Capsule, Command, FabricsCommand, QueueKind};
use nvme_proto::fabrics::ConnectData;
use nvme_proto::sgl::SglDescriptor;
use nvme_proto::sqe::SQE_LEN;
use nvme_proto::status::CommandSet;

const EMBEDDED: &[u8] = include_bytes!("linux-io-queue-connect.capsule");

#[derive(Clone, Copy, ValueEnum)]
enum Queue {
    Admin,
    Io,
}

#[derive(Parser)]
#[command(about = "Decode an NVMe-oF/RDMA command capsule")]
struct Args {
    /// Capsule bytes as hexadecimal (spaces allowed).
    #[arg(long, conflicts_with = "file")]
    hex: Option<String>,
    /// File holding the raw capsule bytes.
    #[arg(long)]
    file: Option<std::path::PathBuf>,
    /// Queue the capsule arrived on (opcodes differ). Default: I/O for the embedded capsule, admin otherwise.
    #[arg(long, value_enum)]
    queue: Option<Queue>,
}

fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<char> = text.chars().filter(|c| !c.is_whitespace()).collect();
    if digits.len() % 2 != 0 {
        return Err(format!("odd number of hex digits ({})", digits.len()));
    }
    digits
        .chunks(2)
        .enumerate()
        .map(|(i, pair)| {
            let s: String = pair.iter().collect();
            u8::from_str_radix(&s, 16).map_err(|_| format!("not hex at byte {i}: {s:?}"))
        })
        .collect()
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (bytes, default_queue, source) = match (&args.hex, &args.file) {
        (Some(h), _) => match parse_hex(h) {
            Ok(b) => (b, Queue::Admin, "--hex".to_owned()),
            Err(e) => {
                eprintln!("error: --hex: {e}");
                return ExitCode::from(2);
            }
        },
        (None, Some(path)) => match std::fs::read(path) {
            Ok(b) => (b, Queue::Admin, path.display().to_string()),
            Err(e) => {
                eprintln!("error: {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        (None, None) => (EMBEDDED.to_vec(), Queue::Io, "embedded: Linux host I/O-queue Connect".to_owned()),
    };
    let queue = match args.queue.unwrap_or(default_queue) {
        Queue::Admin => QueueKind::Admin,
        Queue::Io => QueueKind::Io,
    };
    println!("capsule: {source}, {} bytes, {queue:?} queue", bytes.len());
    if bytes.len() < SQE_LEN {
        eprintln!("error: a capsule starts with a 64-byte SQE; got {} bytes", bytes.len());
        return ExitCode::from(1);
    }
    let (sqe, in_capsule) = bytes.split_at(SQE_LEN);
    let capsule = match Capsule::parse_bytes(sqe, queue) {
        Ok(c) => c,
        Err(e) => {
            let set = if sqe[0] == 0x7f { CommandSet::Fabrics } else { CommandSet::Admin };
            println!("rejected: {e}");
            println!(
                "  completion status {:#06x} ({}), error location byte {}",
                e.status.raw(),
                e.status.name(set),
                e.offset
            );
            return ExitCode::from(1);
        }
    };
    println!("command id: {:#06x}", capsule.command_id);
    println!("command: {:#?}", capsule.command);
    match capsule.data {
        SglDescriptor::Keyed { address, length, key, invalidate } => println!(
            "data: keyed SGL, remote address {address:#x}, {} bytes, rkey {key:#x}{}",
            length.get(),
            if invalidate { ", invalidate on completion" } else { "" }
        ),
        SglDescriptor::InCapsule { offset, length } => {
            println!("data: in-capsule, offset {offset}, {length} bytes ({} present)", in_capsule.len())
        }
        SglDescriptor::Segment { .. } => println!("data: SGL segment (an RDMA target rejects it)"),
    }
    if let Command::Fabrics(FabricsCommand::Connect(_)) = capsule.command {
        if let SglDescriptor::InCapsule { offset, length } = capsule.data {
            let data = usize::try_from(offset).ok().and_then(|o| in_capsule.get(o..o.checked_add(length as usize)?));
            match data.map(ConnectData::parse) {
                Some(Ok(d)) => println!(
                    "connect data: hostid {}, cntlid {:#06x}\n  subnqn  {}\n  hostnqn {}",
                    d.hostid, d.cntlid, d.subnqn, d.hostnqn
                ),
                Some(Err(e)) => println!("connect data rejected: {e}"),
                None => {
                    println!("connect data: missing (in-capsule data shorter than the SGL says)")
                }
            }
        }
    }
    if let Command::Admin(AdminCommand::GetLogPage(g)) = capsule.command {
        println!("log page {:#04x}: {} bytes from offset {}", g.lid, g.data_len(), g.offset);
    }
    ExitCode::SUCCESS
}
