//! What the session layer (supervised paths, multipath round robin, I/O sent again after a loss) and the perf
//! engine (histograms, per-I/O bookkeeping) cost over driving one controller directly — measured in the same
//! run against the same in-process target on loopback: 4 KiB random reads at QD 16 on one I/O queue, with the
//! controller's own API (baseline), through `Session::io`, and through `perf::run` (with and without verify,
//! randrw). Medians of `BENCH_RUNS` (3) runs of `BENCH_SECS` (3) seconds, reported as ratios to the baseline.
//!
//!     cargo bench -p initiator --bench session
#![allow(clippy::print_stdout)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use initiator::perf::{PerfJob, RwMode};
use initiator::{ConnectOptions, Controller, DataDir, ReconnectPolicy, Session, TargetAddr};
use nvme_proto::IoCommand;
use nvme_proto::io::ReadWrite;
use target::backend::BackendSpec;
use target::rdma::ListenSpec;
use target::subsystem::Subsystem;
use target::{RdmaOptions, RdmaTarget, Target, TargetLimits};

const NQN: &str = "nqn.2026-11.dev.nvmf-rs:bench";
const DEPTH: usize = 16;
const BLOCKS: u64 = (64 << 20) / 512;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn options() -> ConnectOptions {
    let mut o = ConnectOptions::new(NQN);
    o.queue_size = 64;
    o
}

fn lba(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    (*x % (BLOCKS / 8)) * 8
}

/// IOPS of `DEPTH` workers, each reading random 4 KiB blocks through `read` for `secs` seconds.
async fn readers<F, Fut>(secs: u64, read: F) -> f64
where
    F: Fn(ReadWrite) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    let workers: Vec<_> = (0..DEPTH as u64)
        .map(|w| {
            let read = read.clone();
            tokio::spawn(async move {
                let (mut x, mut n) = (w * 0x9e37_79b9 + 1, 0u64);
                while Instant::now() < deadline {
                    read(ReadWrite::new(1, lba(&mut x), 8).expect("valid")).await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for w in workers {
        total += w.await.expect("worker");
    }
    total as f64 / secs as f64
}

/// Through the controller directly.
async fn direct(addr: TargetAddr, secs: u64) -> f64 {
    let ctrl = Arc::new(Controller::connect(addr, options()).await.expect("connect"));
    let c = ctrl.clone();
    let iops = readers(secs, move |rw| {
        let c = c.clone();
        async move {
            c.io_command(Some(1), IoCommand::Read(rw), DataDir::ToHost(4096)).await.expect("read");
        }
    })
    .await;
    Arc::into_inner(ctrl).expect("workers done").shutdown().await.expect("shutdown");
    iops
}

async fn session(addr: TargetAddr) -> Arc<Session> {
    Arc::new(Session::connect(vec![(addr, options())], ReconnectPolicy::default()).await.expect("connect"))
}

/// Through a session.
async fn via_session(addr: TargetAddr, secs: u64) -> f64 {
    let s = session(addr).await;
    let c = s.clone();
    let iops = readers(secs, move |rw| {
        let c = c.clone();
        async move {
            c.io(Some(0), IoCommand::Read(rw), DataDir::ToHost(4096)).await.expect("read");
        }
    })
    .await;
    Arc::into_inner(s).expect("workers done").shutdown().await.expect("shutdown");
    iops
}

/// IOPS of the perf engine.
async fn via_perf(addr: TargetAddr, secs: u64, mode: RwMode, verify: bool) -> f64 {
    let s = session(addr).await;
    let job = PerfJob {
        nsid: 1,
        mode,
        rwmixread: 50,
        block_bytes: 4096,
        iodepth: DEPTH,
        io_queues: 1,
        runtime: Duration::from_secs(secs),
        size: None,
        verify,
        seed: 7,
    };
    let report = initiator::perf::run(s.clone(), job, Arc::new(AtomicBool::new(false)), |_| {}).await.expect("perf");
    assert_eq!(report.errors, 0);
    Arc::into_inner(s).expect("perf done").shutdown().await.expect("shutdown");
    report.iops()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let options = RdmaOptions { poll_groups: 1, pool_buffers: 64, repair_interval: Duration::from_secs(1) };
        let mut rdma = RdmaTarget::start(TargetLimits::default(), options).await.expect("target");
        let sub = Subsystem::new(NQN.into(), Target::default_serial(NQN), "nvmf-target".into(), true, Vec::new());
        rdma.target().add_subsystem(sub).expect("subsystem");
        let ram = BackendSpec::Ram { size: BLOCKS * 512, block_size: 512 };
        rdma.target().add_namespace(NQN, 1, &ram).expect("namespace");
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let udp = rdma
            .listen(ListenSpec {
                addr: loopback,
                trsvcids: vec![4420],
                udp_port: 0,
                provider: transport::Provider::Soft,
            })
            .await
            .expect("listen");
        let addr = TargetAddr { udp: SocketAddr::new(loopback, udp), trsvcid: 4420 };
        let (runs, secs) = (env("BENCH_RUNS", 3), env("BENCH_SECS", 3));
        let mut results: [Vec<f64>; 5] = Default::default();
        for _ in 0..runs {
            results[0].push(direct(addr, secs).await);
            results[1].push(via_session(addr, secs).await);
            results[2].push(via_perf(addr, secs, RwMode::RandRead, false).await);
            results[3].push(via_perf(addr, secs, RwMode::RandRw, false).await);
            results[4].push(via_perf(addr, secs, RwMode::RandRw, true).await);
        }
        let base = median(results[0].clone());
        println!("4 KiB QD {DEPTH}, 1 I/O queue, soft provider on loopback; medians of {runs} × {secs} s");
        println!("| path | IOPS | vs Controller::io_command |");
        println!("|---|---|---|");
        let names = [
            "Controller::io_command, randread (baseline)",
            "Session::io, randread",
            "perf::run, randread",
            "perf::run, randrw 50/50",
            "perf::run, randrw 50/50 --verify",
        ];
        for (name, r) in names.iter().zip(results) {
            let m = median(r);
            println!("| {name} | {m:.0} | {:.2} |", m / base);
        }
        rdma.shutdown().await;
    });
}
