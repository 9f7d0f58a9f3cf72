//! `testbed bench loopback`: our target and host (soft provider, RAM namespace, loopback) beside the machine's
//! UDP ceiling ([`super::ceiling`]) measured in the same run, reported as ratios.
//!
//! The release binaries are used as a storage engineer runs them: `nvmf-target` started with a control socket,
//! `nvmf perf -o json` for each job. The target's CPU per I/O comes from two snapshots of its stats
//! (`cpu_seconds`, `commands_completed`) around each job; the host's from perf's own report.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::ceiling::{self, ExchangeResult, StreamResult};
use super::target::RunningTarget;
use super::{BenchError, median};

/// Addresses of this bench: none of them is the default target's 127.0.0.1, so a running main job is not
/// disturbed (and does not disturb it).
const TARGET_ADDR: &str = "127.0.0.9";
const HOST_ADDR: &str = "127.0.0.10";
const CEILING_CLIENT: &str = "127.0.0.11:0";
const CEILING_SERVER: &str = "127.0.0.12:0";
const NQN: &str = "nqn.2026-11.dev.nvmf-rs:bench";

/// One perf job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Job {
    pub name: &'static str,
    pub rw: &'static str,
    pub bs: u64,
    pub iodepth: usize,
}

/// Every job the bench knows, in the order it runs them.
pub const JOBS: [Job; 5] = [
    Job { name: "randread-4k-qd1", rw: "randread", bs: 4096, iodepth: 1 },
    Job { name: "randread-4k-qd32", rw: "randread", bs: 4096, iodepth: 32 },
    Job { name: "randwrite-4k-qd32", rw: "randwrite", bs: 4096, iodepth: 32 },
    Job { name: "read-128k-qd8", rw: "read", bs: 128 << 10, iodepth: 8 },
    Job { name: "write-128k-qd8", rw: "write", bs: 128 << 10, iodepth: 8 },
];

#[derive(Debug, Clone)]
pub struct LoopbackBench {
    pub jobs: Vec<Job>,
    /// Poll groups of the target = I/O queues of the host, one configuration each.
    pub queues: Vec<usize>,
    pub runtime: Duration,
    pub runs: usize,
    pub dir: PathBuf,
}

/// The ceiling's medians.
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    pub read_qd1: ExchangeResult,
    pub read_qd32: ExchangeResult,
    pub write_qd32: ExchangeResult,
    pub stream_4k: StreamResult,
    pub stream_64k: StreamResult,
}

/// One job in one configuration: medians over the runs.
#[derive(Debug, Clone, Serialize)]
pub struct JobResult {
    pub job: Job,
    pub queues: usize,
    pub iops: f64,
    pub mib_per_s: f64,
    pub latency_mean_us: f64,
    pub latency_p50_us: f64,
    pub host_cpu_us_per_io: f64,
    pub target_cpu_us_per_io: f64,
    pub errors: u64,
    /// What the job is compared with, and the ratios (throughput: ours / ceiling, higher is better; latency
    /// and CPU: ours / ceiling, lower is better).
    pub baseline: String,
    pub throughput_ratio: f64,
    pub latency_ratio: Option<f64>,
    pub host_cpu_ratio: Option<f64>,
    pub target_cpu_ratio: Option<f64>,
    /// The goal of issue 15 for this ratio, and whether this run meets it.
    pub goal: Option<String>,
    pub goal_met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoopbackReport {
    pub machine: String,
    pub runtime_s: f64,
    pub runs: usize,
    pub ceiling: Ceiling,
    pub jobs: Vec<JobResult>,
}

impl LoopbackBench {
    pub fn run(&self) -> Result<LoopbackReport, BenchError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| BenchError::Io { path: self.dir.clone(), source })?;
        let target_bin = crate::scenario::ours::host_binary("nvmf-target").map_err(BenchError::Scenario)?;
        let nvmf_bin = crate::scenario::ours::host_binary("nvmf").map_err(BenchError::Scenario)?;
        let ceiling = self.ceiling()?;
        let mut jobs = Vec::new();
        for &queues in &self.queues {
            let args: Vec<String> = ["-a", TARGET_ADDR, "-n", NQN, "--ram-size", "512M", "--poll-groups"]
                .iter()
                .map(|s| s.to_string())
                .chain([queues.to_string()])
                .collect();
            let mut target = RunningTarget::start(&target_bin, &self.dir, &format!("nvmf-target-{queues}"), &args)?;
            for &job in &self.jobs {
                let mut runs = Vec::new();
                for run in 0..self.runs {
                    tracing::info!(job = job.name, queues, run, "perf");
                    runs.push(self.perf(&nvmf_bin, &mut target, job, queues)?);
                }
                jobs.push(summarise(job, queues, &runs, &ceiling));
            }
            target.stop()?;
        }
        Ok(LoopbackReport { machine: machine(), runtime_s: self.runtime.as_secs_f64(), runs: self.runs, ceiling, jobs })
    }

    fn ceiling(&self) -> Result<Ceiling, BenchError> {
        let (c, s): (SocketAddr, SocketAddr) = (parse(CEILING_CLIENT), parse(CEILING_SERVER));
        let secs = self.runtime.min(Duration::from_secs(5));
        let mut read_qd1 = Vec::new();
        let mut read_qd32 = Vec::new();
        let mut write_qd32 = Vec::new();
        let mut stream_4k = Vec::new();
        let mut stream_64k = Vec::new();
        for _ in 0..self.runs {
            tracing::info!("ceiling");
            // A read: the 64-byte command out, 4 KiB of data and a 16-byte completion back.
            read_qd1.push(ceiling::exchange(c, s, 64, 4096 + 16, 1, secs)?);
            read_qd32.push(ceiling::exchange(c, s, 64, 4096 + 16, 32, secs)?);
            // A write: command and 4 KiB out, 32 bytes back.
            write_qd32.push(ceiling::exchange(c, s, 4096 + 64, 32, 32, secs)?);
            stream_4k.push(ceiling::stream(c, s, 4096, secs)?);
            stream_64k.push(ceiling::stream(c, s, 65000, secs)?);
        }
        let ex = |v: &[ExchangeResult]| median_by(v, |r| r.per_second);
        let st = |v: &[StreamResult]| median_by(v, |r| r.mib_per_s);
        Ok(Ceiling {
            read_qd1: median_by(&read_qd1, |r| -r.rtt_mean_us),
            read_qd32: ex(&read_qd32),
            write_qd32: ex(&write_qd32),
            stream_4k: st(&stream_4k),
            stream_64k: st(&stream_64k),
        })
    }

    fn perf(&self, nvmf: &Path, target: &mut RunningTarget, job: Job, queues: usize) -> Result<Run, BenchError> {
        let before = target.stats()?;
        let out = Command::new(nvmf)
            .args(["perf", "-a", TARGET_ADDR, "--host-traddr", HOST_ADDR, "-n", NQN, "-o", "json"])
            .args(["-w", job.rw, "--bs", &job.bs.to_string(), "-q", &job.iodepth.to_string()])
            .args(["--runtime", &self.runtime.as_secs().max(1).to_string(), "--io-queues", &queues.to_string()])
            .args(["-i", &queues.to_string(), "-Q", "128", "--size", "512m"])
            .env("RUST_LOG", "warn")
            .output()
            .map_err(|source| BenchError::Io { path: nvmf.to_path_buf(), source })?;
        let after = target.stats()?;
        if !out.status.success() {
            return Err(BenchError::Failed(format!(
                "nvmf perf {}: {}: {}",
                job.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let report: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| BenchError::Failed(format!("nvmf perf {} printed no JSON: {e}", job.name)))?;
        let f = |v: &Value| v.as_f64().unwrap_or(0.0);
        let commands = f(&after["commands_completed"]) - f(&before["commands_completed"]);
        let cpu = f(&after["cpu_seconds"]) - f(&before["cpu_seconds"]);
        Ok(Run {
            iops: f(&report["iops"]),
            mib_per_s: f(&report["mib_per_s"]),
            latency_mean_us: f(&report["latency_us"]["avg"]),
            latency_p50_us: f(&report["latency_us"]["p50"]),
            host_cpu_us_per_io: f(&report["cpu_us_per_io"]),
            target_cpu_us_per_io: if commands > 0.0 { cpu * 1e6 / commands } else { 0.0 },
            errors: report["errors"].as_u64().unwrap_or(0),
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Run {
    iops: f64,
    mib_per_s: f64,
    latency_mean_us: f64,
    latency_p50_us: f64,
    host_cpu_us_per_io: f64,
    target_cpu_us_per_io: f64,
    errors: u64,
}

fn summarise(job: Job, queues: usize, runs: &[Run], ceiling: &Ceiling) -> JobResult {
    let m = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let (iops, mib_per_s) = (m(|r| r.iops), m(|r| r.mib_per_s));
    let (latency_mean_us, latency_p50_us) = (m(|r| r.latency_mean_us), m(|r| r.latency_p50_us));
    let (host_cpu, target_cpu) = (m(|r| r.host_cpu_us_per_io), m(|r| r.target_cpu_us_per_io));
    let cpu_ratios = |x: &ExchangeResult| (Some(host_cpu / x.client_cpu_us), Some(target_cpu / x.server_cpu_us));
    let (baseline, throughput_ratio, latency_ratio, (host_cpu_ratio, target_cpu_ratio), goal) = match job.name {
        "randread-4k-qd1" => (
            "UDP 64 B → 4 KiB + 16 B, 1 in flight (mean round trip)".to_string(),
            iops / ceiling.read_qd1.per_second,
            Some(latency_mean_us / ceiling.read_qd1.rtt_mean_us),
            cpu_ratios(&ceiling.read_qd1),
            Some(("latency ≤ 1.5× the round trip", 1.5, false)),
        ),
        "randread-4k-qd32" => (
            "UDP 64 B → 4 KiB + 16 B, 32 in flight".to_string(),
            iops / ceiling.read_qd32.per_second,
            None,
            cpu_ratios(&ceiling.read_qd32),
            Some(("IOPS ≥ 0.5 of the exchanges", 0.5, true)),
        ),
        "randwrite-4k-qd32" => (
            "UDP 4 KiB + 64 B → 32 B, 32 in flight".to_string(),
            iops / ceiling.write_qd32.per_second,
            None,
            cpu_ratios(&ceiling.write_qd32),
            None,
        ),
        "read-128k-qd8" => (
            "UDP stream of 4 KiB datagrams".to_string(),
            mib_per_s / ceiling.stream_4k.mib_per_s,
            None,
            (None, None),
            Some(("MiB/s ≥ 0.8 of the stream", 0.8, true)),
        ),
        _ => (
            "UDP stream of 4 KiB datagrams".to_string(),
            mib_per_s / ceiling.stream_4k.mib_per_s,
            None,
            (None, None),
            None,
        ),
    };
    let goal_met = goal.map(|(_, bound, higher_is_better)| {
        let value = if higher_is_better { throughput_ratio } else { latency_ratio.unwrap_or(f64::INFINITY) };
        if higher_is_better { value >= bound } else { value <= bound }
    });
    JobResult {
        job,
        queues,
        iops,
        mib_per_s,
        latency_mean_us,
        latency_p50_us,
        host_cpu_us_per_io: host_cpu,
        target_cpu_us_per_io: target_cpu,
        errors: runs.iter().map(|r| r.errors).sum(),
        baseline,
        throughput_ratio,
        latency_ratio,
        host_cpu_ratio,
        target_cpu_ratio,
        goal: goal.map(|g| g.0.to_string()),
        goal_met,
    }
}

fn median_by<T: Clone>(v: &[T], key: impl Fn(&T) -> f64) -> T {
    let mut sorted: Vec<&T> = v.iter().collect();
    sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
    sorted[sorted.len() / 2].clone()
}

fn parse(a: &str) -> SocketAddr {
    a.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// "N cores, model" from /proc/cpuinfo.
fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info.lines().find_map(|l| l.strip_prefix("model name")).map(|m| m.trim_start_matches([' ', '\t', ':']));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {}", model.unwrap_or("unknown CPU"))
}

/// The report as a table a person reads.
pub fn text(r: &LoopbackReport) -> String {
    let c = &r.ceiling;
    let mut out = format!(
        "machine: {}; {} run(s) of {:.0} s per job, medians\n\nceiling (plain UDP, one blocking socket and thread per side):\n",
        r.machine, r.runs, r.runtime_s
    );
    for (name, x) in [
        ("64 B → 4 KiB + 16 B, 1 in flight", &c.read_qd1),
        ("64 B → 4 KiB + 16 B, 32 in flight", &c.read_qd32),
        ("4 KiB + 64 B → 32 B, 32 in flight", &c.write_qd32),
    ] {
        out += &format!(
            "  {name}: {:.0}/s, round trip {:.1} µs (p50 {:.1}), CPU client {:.2} µs, server {:.2} µs\n",
            x.per_second, x.rtt_mean_us, x.rtt_p50_us, x.client_cpu_us, x.server_cpu_us
        );
    }
    out += &format!(
        "  stream of 4 KiB datagrams: {:.0} MiB/s; of 65000 B: {:.0} MiB/s\n\n",
        c.stream_4k.mib_per_s, c.stream_64k.mib_per_s
    );
    out += "| job | queues | IOPS | MiB/s | lat mean / p50 µs | host / target CPU µs per I/O | ratio | latency ratio | CPU ratio host / target | goal |\n|---|---|---|---|---|---|---|---|---|---|\n";
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for j in &r.jobs {
        out += &format!(
            "| {} | {} | {:.0} | {:.1} | {:.0} / {:.0} | {:.1} / {:.1} | {:.3} | {} | {} / {} | {} |\n",
            j.job.name,
            j.queues,
            j.iops,
            j.mib_per_s,
            j.latency_mean_us,
            j.latency_p50_us,
            j.host_cpu_us_per_io,
            j.target_cpu_us_per_io,
            j.throughput_ratio,
            opt(j.latency_ratio),
            opt(j.host_cpu_ratio),
            opt(j.target_cpu_ratio),
            match (&j.goal, j.goal_met) {
                (Some(g), Some(true)) => format!("{g}: met"),
                (Some(g), _) => format!("{g}: not met"),
                _ => "-".into(),
            }
        );
    }
    out
}
