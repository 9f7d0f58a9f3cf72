//! A 4 KiB random-read load at a fixed queue depth, reporting IOPS and latency percentiles — the measurement
//! behind the README's figure until the `nvmf perf` command exists. Against the README's target:
//!
//! ```text
//! cargo run --release -p target --bin nvmf-target &
//! cargo run --release -p initiator --example randread -- --runtime 30 --iodepth 32
//! ```
#![allow(clippy::print_stdout)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use initiator::{ConnectOptions, Controller, DataDir, TargetAddr};
use nvme_proto::IoCommand;
use nvme_proto::io::ReadWrite;

fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), initiator::HostError> {
    let args: Vec<String> = std::env::args().collect();
    let traddr: IpAddr = flag(&args, "--traddr", IpAddr::from([127, 0, 0, 1]));
    let udp: u16 = flag(&args, "--udp-port", 4791);
    let runtime = Duration::from_secs(flag(&args, "--runtime", 30));
    let depth: usize = flag(&args, "--iodepth", 32);
    let nqn: String = flag(&args, "--nqn", "nqn.2026-11.dev.nvmf-rs:ram".to_string());
    let target = TargetAddr { udp: SocketAddr::new(traddr, udp), trsvcid: flag(&args, "--trsvcid", 4420) };
    let mut options = ConnectOptions::new(&nqn);
    options.queue_size = (depth + 1).max(2) as u16;
    let ctrl = Arc::new(Controller::connect(target, options).await?);
    let ns = ctrl.namespace(1).await?;
    let blocks_per_io = 4096 / ns.block_size as u64;
    let span = ns.blocks / blocks_per_io;
    let deadline = Instant::now() + runtime;
    let mut workers = Vec::new();
    for w in 0..depth as u64 {
        let ctrl = ctrl.clone();
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut x = w.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            while Instant::now() < deadline {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let rw = ReadWrite::new(1, (x % span) * blocks_per_io, blocks_per_io as u32).expect("valid");
                let start = Instant::now();
                ctrl.io_command(Some(1), IoCommand::Read(rw), DataDir::ToHost(4096)).await?;
                lat.push(start.elapsed().as_micros() as u32);
            }
            Ok::<_, initiator::HostError>(lat)
        }));
    }
    let mut lat = Vec::new();
    for w in workers {
        lat.extend(w.await.expect("worker")?);
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let iops = lat.len() as f64 / runtime.as_secs_f64();
    println!(
        "4 KiB randread QD {depth}, {:.0} s: {:.0} IOPS ({:.1} MiB/s); latency µs: min {} p50 {} p99 {} p99.9 {} max {}",
        runtime.as_secs_f64(),
        iops,
        iops * 4096.0 / (1 << 20) as f64,
        lat[0],
        pct(0.5),
        pct(0.99),
        pct(0.999),
        lat[lat.len() - 1]
    );
    Arc::into_inner(ctrl).expect("workers done").shutdown().await
}
