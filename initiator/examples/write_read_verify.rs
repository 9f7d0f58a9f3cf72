//! Connects to an NVMe-oF RDMA target, writes a pattern (a small in-capsule write and a large keyed one),
//! reads it back, verifies it, and shuts the controller down. Against the README's target:
//!
//! ```text
//! cargo run -p target --bin nvmf-target &
//! cargo run -p initiator --example write_read_verify
//! ```
#![allow(clippy::print_stdout)]

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;

use initiator::{ConnectOptions, Controller, TargetAddr};

struct Args {
    traddr: IpAddr,
    trsvcid: u16,
    udp_port: u16,
    nqn: String,
    local: Option<IpAddr>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        traddr: IpAddr::from([127, 0, 0, 1]),
        trsvcid: 4420,
        udp_port: 4791,
        nqn: "nqn.2026-11.dev.nvmf-rs:ram".into(),
        local: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--traddr" | "-a" => args.traddr = value.parse().map_err(|e| format!("--traddr: {e}"))?,
            "--trsvcid" | "-s" => args.trsvcid = value.parse().map_err(|e| format!("--trsvcid: {e}"))?,
            "--udp-port" => args.udp_port = value.parse().map_err(|e| format!("--udp-port: {e}"))?,
            "--nqn" | "-n" => args.nqn = value,
            "--host-traddr" | "-w" => args.local = Some(value.parse().map_err(|e| format!("--host-traddr: {e}"))?),
            _ => return Err(format!("unknown flag {flag} (--traddr, --trsvcid, --udp-port, --nqn, --host-traddr)")),
        }
    }
    Ok(args)
}

fn pattern(lba: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (lba as usize * 31 + i * 7 + (i >> 9)) as u8).collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("write_read_verify: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("write_read_verify: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), initiator::HostError> {
    let target = TargetAddr { udp: SocketAddr::new(args.traddr, args.udp_port), trsvcid: args.trsvcid };
    let mut options = ConnectOptions::new(&args.nqn);
    options.nr_io_queues = 2;
    options.local_addr = args.local;
    let ctrl = Controller::connect(target, options).await?;
    let id = &ctrl.identify;
    println!(
        "connected: cntlid {} model {:?} serial {:?} firmware {:?}, {} I/O queues, MDTS {} KiB",
        ctrl.cntlid,
        id.model().unwrap_or("?"),
        id.serial().unwrap_or("?"),
        id.firmware().unwrap_or("?"),
        ctrl.io_queue_count(),
        ctrl.max_transfer() / 1024
    );
    let nsid = *ctrl.active_namespaces().await?.first().ok_or(initiator::HostError::Invalid("no namespaces".into()))?;
    let ns = ctrl.namespace(nsid).await?;
    println!("namespace {nsid}: {} blocks of {} bytes", ns.blocks, ns.block_size);
    let bs = ns.block_size as usize;
    // A one-block write travels in the capsule; a 128 KiB one by RDMA READ from our registered buffer.
    let cases = [(0u64, bs), (8, 128 * 1024)];
    for &(lba, len) in &cases {
        ctrl.write(nsid, lba, pattern(lba, len)).await?;
    }
    for &(lba, len) in &cases {
        let back = ctrl.read(nsid, lba, (len / bs) as u64).await?;
        if back != pattern(lba, len) {
            return Err(initiator::HostError::Invalid(format!("LBA {lba}: data read back differs")));
        }
        println!("LBA {lba}: wrote and read back {len} bytes, verified");
    }
    ctrl.flush(nsid).await?;
    ctrl.shutdown().await?;
    println!("shut down cleanly");
    Ok(())
}
