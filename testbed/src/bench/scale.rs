//! `testbed bench scale`: one release `nvmf-target` (soft provider, loopback) under many hosts at once — `hosts`
//! `nvmf perf --verify` processes, each from its own loopback address with `queues` I/O queues on a namespace of
//! its own — and what it costs the target: its queue pairs, resident memory, threads and file descriptors at the
//! peak beside its baseline (after a first wave of the same hosts has written every namespace, so the memory per
//! queue pair is a difference measured in the same run and holds no namespace data), every host's I/O and
//! verify result, and the stats back at the baseline after the last.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use super::BenchError;
use super::target::RunningTarget;

/// Not the loopback bench's 127.0.0.9: the two can run at once.
const TARGET_ADDR: &str = "127.0.0.13";
const NQN: &str = "nqn.2026-11.dev.nvmf-rs:scale";
/// Each host's namespace.
const NAMESPACE: &str = "8M";
const WARM_UP: &str = "warm-up";

#[derive(Debug, Clone)]
pub struct ScaleBench {
    pub hosts: usize,
    /// I/O queues per host (each also has an admin queue).
    pub queues: usize,
    pub iodepth: usize,
    pub poll_groups: usize,
    pub runtime: Duration,
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostResult {
    pub host: String,
    pub exit: Option<i32>,
    pub ios: u64,
    pub iops: f64,
    pub errors: u64,
    pub verify_errors: u64,
    pub verified_blocks: u64,
    pub reconnects: u64,
    /// The last lines the host printed on stderr when it failed.
    pub stderr_tail: Option<String>,
}

/// The target's figures at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct TargetSnapshot {
    pub qpairs: u64,
    pub rss_bytes: u64,
    pub threads: u64,
    pub fds: u64,
    pub pool_buffers_in_use: u64,
    /// Capsule buffers waiting on the shared receive queues (all of them when no queue holds one).
    pub srq_receives: u64,
}

impl TargetSnapshot {
    fn of(stats: &Value) -> TargetSnapshot {
        let n = |k: &str| stats[k].as_u64().unwrap_or(0);
        TargetSnapshot {
            qpairs: n("qpairs"),
            rss_bytes: n("rss_bytes"),
            threads: n("threads"),
            fds: n("fds"),
            pool_buffers_in_use: n("pool_buffers_in_use"),
            srq_receives: n("srq_receives"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    pub hosts: usize,
    pub queues_per_host: usize,
    pub iodepth: usize,
    pub poll_groups: usize,
    pub runtime_s: f64,
    /// Queue pairs every host together opens: hosts × (queues + 1).
    pub expected_qpairs: u64,
    pub baseline: TargetSnapshot,
    /// At the most queue pairs seen (memory at that moment).
    pub peak: TargetSnapshot,
    pub after: TargetSnapshot,
    /// (peak RSS − baseline RSS) / peak queue pairs.
    pub rss_per_qpair_bytes: f64,
    pub shared_receive_queues: u64,
    pub total_ios: u64,
    pub total_iops: f64,
    pub errors: u64,
    pub verify_errors: u64,
    pub verified_blocks: u64,
    pub back_at_baseline: bool,
    pub host_results: Vec<HostResult>,
    pub problems: Vec<String>,
    pub passed: bool,
}

impl ScaleBench {
    pub fn run(&self) -> Result<ScaleReport, BenchError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| BenchError::Io { path: self.dir.clone(), source })?;
        let target_bin = crate::scenario::ours::host_binary("nvmf-target").map_err(BenchError::Scenario)?;
        let nvmf_bin = crate::scenario::ours::host_binary("nvmf").map_err(BenchError::Scenario)?;
        let config = self.dir.join("scale-target.toml");
        std::fs::write(&config, self.config()).map_err(|source| BenchError::Io { path: config.clone(), source })?;
        let args = vec!["--config".to_string(), config.display().to_string()];
        let mut target = RunningTarget::start(&target_bin, &self.dir, "nvmf-target-scale", &args)?;
        // A first wave writes every namespace (RAM is allocated as it is written) and warms the heap; the
        // baseline is taken after it, so the second wave's growth is what its queue pairs cost.
        let (_, _, warm_up) = self.wave(&nvmf_bin, &mut target, WARM_UP)?;
        let baseline = self.settle(&mut target, None)?;
        let (peak, srqs, host_results) = self.wave(&nvmf_bin, &mut target, "measured")?;
        let after = self.settle(&mut target, Some(&baseline))?;
        target.stop()?;
        let mut report = self.report(baseline, peak, after, srqs, host_results);
        report.problems.extend(warm_up.iter().filter_map(|h| h.problem("warm-up host")));
        report.passed = report.problems.is_empty();
        Ok(report)
    }

    /// Every host's verified I/O at once, watching the target: the peak is the snapshot with the most queue
    /// pairs (and, among those, the most memory).
    fn wave(
        &self,
        nvmf: &Path,
        target: &mut RunningTarget,
        name: &str,
    ) -> Result<(TargetSnapshot, u64, Vec<HostResult>), BenchError> {
        tracing::info!(wave = name, hosts = self.hosts, "hosts start");
        let mut hosts: Vec<RunningHost> = Vec::new();
        for i in 0..self.hosts {
            match self.start_host(nvmf, i, name) {
                Ok(h) => hosts.push(h),
                Err(e) => {
                    for mut h in hosts {
                        let _ = h.child.kill();
                        let _ = h.child.wait();
                    }
                    return Err(e);
                }
            }
        }
        let mut peak = TargetSnapshot::default();
        let mut srqs = 0;
        let deadline = Instant::now() + self.runtime + Duration::from_secs(120);
        while hosts.iter_mut().any(|h| matches!(h.child.try_wait(), Ok(None))) && Instant::now() < deadline {
            if let Ok(stats) = target.stats() {
                let now = TargetSnapshot::of(&stats);
                if now.qpairs > peak.qpairs || (now.qpairs == peak.qpairs && now.rss_bytes > peak.rss_bytes) {
                    peak = now;
                    srqs = stats["listeners"]
                        .as_array()
                        .map_or(0, |l| l.iter().filter_map(|l| l["shared_receive_queues"].as_u64()).sum());
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok((peak, srqs, hosts.into_iter().map(RunningHost::finish).collect()))
    }

    /// Waits (up to 30 s) until no queue pair and no pool buffer is held — and, given a baseline, the same
    /// threads, descriptors and shared receive queue buffers as then; the snapshot at that moment.
    fn settle(
        &self,
        target: &mut RunningTarget,
        baseline: Option<&TargetSnapshot>,
    ) -> Result<TargetSnapshot, BenchError> {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let now = TargetSnapshot::of(&target.stats()?);
            let idle = now.qpairs == 0 && now.pool_buffers_in_use == 0;
            let same = baseline
                .is_none_or(|b| now.threads == b.threads && now.fds == b.fds && now.srq_receives == b.srq_receives);
            if (idle && same) || Instant::now() >= until {
                return Ok(now);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn config(&self) -> String {
        let mut c = format!(
            "[target]\npoll_groups = {}\nmax_io_queues = {}\n\n[[listener]]\naddress = \"{TARGET_ADDR}\"\nports = [4420]\n\n\
             [[subsystem]]\nnqn = \"{NQN}\"\nallow_any_host = true\n",
            self.poll_groups,
            self.queues.max(1),
        );
        for nsid in 1..=self.hosts {
            c += &format!("\n[[subsystem.namespace]]\nnsid = {nsid}\nbackend = \"ram\"\nsize = \"{NAMESPACE}\"\n");
        }
        c
    }

    fn start_host(&self, nvmf: &Path, i: usize, wave: &str) -> Result<RunningHost, BenchError> {
        let addr = host_addr(i);
        let err_path = self.dir.join(format!("{wave}-host-{i}.err"));
        let err =
            std::fs::File::create(&err_path).map_err(|source| BenchError::Io { path: err_path.clone(), source })?;
        let json_path = self.dir.join(format!("{wave}-host-{i}.json"));
        let stdout =
            std::fs::File::create(&json_path).map_err(|source| BenchError::Io { path: json_path.clone(), source })?;
        let q = self.queues.to_string();
        let child = Command::new(nvmf)
            .args(["perf", "-a", TARGET_ADDR, "--host-traddr", &addr, "-n", NQN, "-o", "json", "--verify"])
            .args(["--nsid", &(i + 1).to_string(), "-q", &self.iodepth.to_string()])
            // The warm-up writes the whole namespace in order (every page of it then resident); the measured
            // wave is random 4 KiB reads and writes.
            .args(if wave == WARM_UP { ["-w", "write", "--bs", "131072"] } else { ["-w", "randrw", "--bs", "4096"] })
            .args(["-i", &q, "--io-queues", &q, "-Q", "32", "--runtime", &self.runtime.as_secs().max(1).to_string()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(err)
            .spawn()
            .map_err(|source| BenchError::Io { path: nvmf.to_path_buf(), source })?;
        Ok(RunningHost { addr, child, json_path, err_path })
    }

    fn report(
        &self,
        baseline: TargetSnapshot,
        peak: TargetSnapshot,
        after: TargetSnapshot,
        shared_receive_queues: u64,
        host_results: Vec<HostResult>,
    ) -> ScaleReport {
        let expected_qpairs = (self.hosts * (self.queues + 1)) as u64;
        let sum = |f: fn(&HostResult) -> u64| host_results.iter().map(f).sum::<u64>();
        let (errors, verify_errors) = (sum(|h| h.errors), sum(|h| h.verify_errors));
        let back_at_baseline = after.qpairs == 0
            && after.pool_buffers_in_use == 0
            && after.threads == baseline.threads
            && after.fds == baseline.fds
            && after.srq_receives == baseline.srq_receives;
        let mut problems = Vec::new();
        if peak.qpairs != expected_qpairs {
            problems.push(format!("{} queue pairs at the peak, {expected_qpairs} expected", peak.qpairs));
        }
        problems.extend(host_results.iter().filter_map(|h| h.problem("host")));
        if shared_receive_queues != self.poll_groups as u64 {
            problems.push(format!(
                "{shared_receive_queues} shared receive queues, one per poll group ({}) expected",
                self.poll_groups
            ));
        }
        if !back_at_baseline {
            problems.push(format!("not back at the baseline after the hosts: {after:?} (before {baseline:?})"));
        }
        ScaleReport {
            hosts: self.hosts,
            queues_per_host: self.queues,
            iodepth: self.iodepth,
            poll_groups: self.poll_groups,
            runtime_s: self.runtime.as_secs_f64(),
            expected_qpairs,
            baseline,
            peak,
            after,
            rss_per_qpair_bytes: if peak.qpairs > 0 {
                peak.rss_bytes.saturating_sub(baseline.rss_bytes) as f64 / peak.qpairs as f64
            } else {
                0.0
            },
            shared_receive_queues,
            total_ios: sum(|h| h.ios),
            total_iops: host_results.iter().map(|h| h.iops).sum(),
            errors,
            verify_errors,
            verified_blocks: sum(|h| h.verified_blocks),
            back_at_baseline,
            passed: problems.is_empty(),
            host_results,
            problems,
        }
    }
}

/// Host i's own loopback address (its device binds it on 4791).
fn host_addr(i: usize) -> String {
    format!("127.0.{}.{}", 20 + i / 250, 1 + i % 250)
}

impl HostResult {
    /// What went wrong with this host, if anything: an exit other than 0, errors, verify errors, nothing
    /// verified, or a reconnection (a host that lost its association may still exit 0).
    fn problem(&self, what: &str) -> Option<String> {
        let bad = self.exit != Some(0)
            || self.errors > 0
            || self.verify_errors > 0
            || self.verified_blocks == 0
            || self.reconnects > 0;
        bad.then(|| {
            format!(
                "{what} {}: exit {:?}, {} errors, {} verify errors, {} blocks verified, {} reconnects{}",
                self.host,
                self.exit,
                self.errors,
                self.verify_errors,
                self.verified_blocks,
                self.reconnects,
                self.stderr_tail.as_deref().map(|t| format!(": {t}")).unwrap_or_default()
            )
        })
    }
}

/// A host's `nvmf perf`, its report and its log.
struct RunningHost {
    addr: String,
    child: Child,
    json_path: PathBuf,
    err_path: PathBuf,
}

impl Drop for RunningHost {
    /// A host never outlives the bench (a panic or an early return included).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl RunningHost {
    /// Its result once it ended (stopped if it runs past the watch).
    fn finish(mut self) -> HostResult {
        let status = match self.child.try_wait() {
            Ok(Some(s)) => Some(s),
            _ => {
                let _ = self.child.kill();
                self.child.wait().ok()
            }
        };
        let exit = status.and_then(|s| s.code());
        let report: Value = std::fs::read_to_string(&self.json_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let verify = &report["verify"];
        let stderr_tail = (exit != Some(0)).then(|| {
            let text = std::fs::read_to_string(&self.err_path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().rev().take(3).collect();
            lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
        });
        HostResult {
            host: std::mem::take(&mut self.addr),
            exit,
            ios: n(&report["ios"]),
            iops: report["iops"].as_f64().unwrap_or(0.0),
            errors: n(&report["errors"]),
            // A report without a verify section verified nothing: counted as an error.
            verify_errors: if verify.is_null() { 1 } else { n(&verify["errors"]) },
            verified_blocks: n(&verify["checked_blocks"]) + n(&verify["final_checked_blocks"]),
            reconnects: n(&report["reconnects"]),
            stderr_tail,
        }
    }
}

/// A report as a person reads it.
pub fn text(r: &ScaleReport) -> String {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut out = format!(
        "{} hosts × {} I/O queues (+ admin) at QD {} each, {} poll groups, {:.0} s of verified 4 KiB randrw (after a wave of sequential writes)\n",
        r.hosts, r.queues_per_host, r.iodepth, r.poll_groups, r.runtime_s
    );
    out += &format!(
        "target: {} queue pairs at the peak (expected {}), {} shared receive queues; RSS {:.1} MiB before, {:.1} MiB at the peak: {:.1} KiB per queue pair; threads {} → {}, fds {} → {}\n",
        r.peak.qpairs,
        r.expected_qpairs,
        r.shared_receive_queues,
        mib(r.baseline.rss_bytes),
        mib(r.peak.rss_bytes),
        r.rss_per_qpair_bytes / 1024.0,
        r.baseline.threads,
        r.peak.threads,
        r.baseline.fds,
        r.peak.fds,
    );
    out += &format!(
        "hosts: {} I/Os, {:.0} IOPS together, {} errors, {} verify errors, {} blocks verified\n",
        r.total_ios, r.total_iops, r.errors, r.verify_errors, r.verified_blocks
    );
    out += &format!(
        "after: {} queue pairs, {} pool buffers in use, threads {}, fds {}: {}\n",
        r.after.qpairs,
        r.after.pool_buffers_in_use,
        r.after.threads,
        r.after.fds,
        if r.back_at_baseline { "back at the baseline" } else { "NOT back at the baseline" }
    );
    for p in &r.problems {
        out += &format!("problem: {p}\n");
    }
    out += if r.passed { "PASSED\n" } else { "FAILED\n" };
    out
}
