//! `testbed bench vm`: the stock kernel host's fio (4 KiB random reads, libaio, direct) against three targets in
//! the same target VM, over the same bond: the kernel's own **nvmet-rdma** on rxe0, **ours on the verbs
//! provider** on that rxe0, and **ours on the soft provider** (rxe0 deleted and `rdma_rxe` unloaded, since the
//! module holds UDP 4791 for as long as it is loaded; so the soft rounds come last). Each target serves a
//! 256 MiB RAM namespace; the host connects afresh for each run. Per run: fio's IOPS and mean latency, and each
//! VM's busy CPU time (from `/proc/stat`, between the host's go and stop marks) per I/O. The report gives the
//! medians per target and the ratios against nvmet-rdma measured in the same run — the independent ceiling.
//! Our target must also be back at its baseline and stop with exit 0 after every run.

use std::time::Duration;

use serde::Serialize;

use super::{BenchError, median};
use crate::scenario::ours::{self, StatsCheck};
use crate::scenario::{self, HOSTNQN, NQN, Setup, TARGET_ADDR};
use crate::vm::{Accel, Run, VmOutcome};

/// The targets, in the order they run within a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Candidate {
    #[serde(rename = "nvmet-rdma")]
    NvmetRdma,
    #[serde(rename = "ours-verbs")]
    OursVerbs,
    #[serde(rename = "ours-soft")]
    OursSoft,
}

impl Candidate {
    pub const ALL: [Candidate; 3] = [Candidate::NvmetRdma, Candidate::OursVerbs, Candidate::OursSoft];

    pub fn label(self) -> &'static str {
        match self {
            Candidate::NvmetRdma => "nvmet-rdma",
            Candidate::OursVerbs => "ours-verbs",
            Candidate::OursSoft => "ours-soft",
        }
    }
}

/// Shell helpers of both VMs' scripts. `cpu_line`: the `/proc/stat` totals and the uptime (under TCG the
/// guest's jiffies run a few per cent short of its clock; the report says by how much). `problem RUN WHAT`:
/// logged, and kept as the run's problem for the report.
const HELPERS: &str = r#"cpu_line() { head -1 /proc/stat; cut -d' ' -f1 /proc/uptime; }
problem() { log "$1: $2"; echo "$2" > $T/$1.problem; }
"#;

#[derive(Debug, Clone)]
pub struct VmBench {
    pub setup: Setup,
    /// Seconds of fio per run.
    pub runtime: Duration,
    /// Runs per target (the medians are reported).
    pub rounds: usize,
    pub iodepth: usize,
}

/// One fio run against one target.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub name: String,
    pub target: Candidate,
    pub connected: bool,
    pub fio_exit: Option<i32>,
    pub iops: f64,
    pub ios: u64,
    pub mean_latency_us: f64,
    /// Busy CPU time of the whole VM per I/O, and the share of the window it was busy.
    pub target_cpu_us_per_io: Option<f64>,
    pub target_busy: Option<f64>,
    /// The target VM's jiffies over its uptime in the window: under TCG the guest's ticks run a few per cent
    /// short, for every target alike.
    pub target_clock_coverage: Option<f64>,
    pub host_cpu_us_per_io: Option<f64>,
    pub host_busy: Option<f64>,
    /// Ours only: alive to the end, exit code after SIGINT, stats back at the baseline.
    pub our_target: Option<scenario::flap::OurTarget>,
    pub problems: Vec<String>,
}

/// The medians of one target's runs, and their ratios to nvmet-rdma's.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub target: Candidate,
    pub runs: usize,
    pub iops: f64,
    pub mean_latency_us: f64,
    pub target_cpu_us_per_io: f64,
    /// The target VM's busy share of the window, and its jiffies over its uptime.
    pub target_busy: f64,
    pub target_clock_coverage: f64,
    pub host_cpu_us_per_io: f64,
    /// IOPS over nvmet-rdma's (goal ≥ 1.0), and target CPU per I/O over nvmet-rdma's (goal ≤ 1.0).
    pub iops_ratio: f64,
    pub target_cpu_ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmBenchReport {
    pub kernel: String,
    pub accel: Accel,
    pub runtime_seconds: u64,
    pub rounds: usize,
    pub iodepth: usize,
    pub runs: Vec<RunResult>,
    pub summary: Vec<Summary>,
    pub vms: Vec<VmOutcome>,
    pub passed: bool,
    pub problems: Vec<String>,
}

impl VmBench {
    /// The runs in order: `rounds` × (nvmet-rdma, ours-verbs), then `rounds` × ours-soft.
    fn schedule(&self) -> Vec<(String, Candidate)> {
        let mut runs = Vec::new();
        for r in 1..=self.rounds {
            for c in [Candidate::NvmetRdma, Candidate::OursVerbs] {
                runs.push((format!("{}-{r}", c.label()), c));
            }
        }
        for r in 1..=self.rounds {
            runs.push((format!("{}-{r}", Candidate::OursSoft.label()), Candidate::OursSoft));
        }
        runs
    }

    /// Seconds a VM waits for the other at any one mark.
    fn mark_timeout(&self) -> u64 {
        self.runtime.as_secs() + 180
    }

    /// The whole run's bound: boot, then every run with room for connecting, fio and teardown under TCG.
    pub fn time_bound(&self) -> Duration {
        Duration::from_secs(180 + self.schedule().len() as u64 * (self.runtime.as_secs() + 90))
    }

    fn target_script(&self) -> String {
        let bin = ours::in_vm("nvmf-target");
        let secs = self.mark_timeout();
        // The target sleeps through the run rather than polling for the stop mark: its own polling would be
        // counted as the target's CPU.
        let nap = self.runtime.as_secs().saturating_sub(1);
        let helpers = HELPERS;
        let mut s = format!(
            r#"{helpers}getconf CLK_TCK > $T/clk_tck 2>/dev/null
# window RUN: ready for the host, then the CPU counters at its go and stop marks, then its disconnect.
window() {{
    touch $T/$1.ready
    wait_file $T/$1.go {secs} host || {{ problem $1 "the host never started"; return 1; }}
    cpu_line > $T/$1.target-cpu.start
    sleep {nap}
    wait_file $T/$1.stop {secs} host || {{ problem $1 "the host never stopped"; return 1; }}
    cpu_line > $T/$1.target-cpu.end
    wait_file $T/$1.done {secs} host || {{ problem $1 "the host never disconnected"; return 1; }}
}}
# keep RUN: our target's files under the run's name.
keep() {{
    for f in stats.before stats.after nvmf-target.log nvmf-target.exit nvmf-target.alive target.out; do
        [ -e $T/$f ] && mv $T/$f $T/$1.$f
    done
}}
"#
        );
        let mut soft_started = false;
        for (name, candidate) in self.schedule() {
            match candidate {
                Candidate::NvmetRdma => {
                    s.push_str(&scenario::nvmet_target_setup(TARGET_ADDR));
                    s.push_str(&format!("window {name}\n"));
                    s.push_str(&scenario::nvmet_target_teardown());
                }
                Candidate::OursVerbs | Candidate::OursSoft => {
                    let provider = if candidate == Candidate::OursSoft { "soft" } else { "verbs" };
                    if candidate == Candidate::OursSoft && !soft_started {
                        soft_started = true;
                        s.push_str(
                            "rdma link delete rxe0\nrmmod rdma_rxe || log 'rmmod rdma_rxe failed: UDP 4791 stays taken'\n",
                        );
                    }
                    // One poll group: the VM has one vCPU, and the kernel host one I/O queue.
                    s.push_str(&ours::start_target_on(&bin, TARGET_ADDR, provider, 1));
                    s.push_str(&format!("window {name}\n"));
                    s.push_str(&ours::stop_target());
                    s.push_str(&format!("keep {name}\n"));
                }
            }
        }
        s.push_str("dmesg > $T/target.dmesg\n");
        s
    }

    fn host_script(&self) -> String {
        let secs = self.mark_timeout();
        let (runtime, qd) = (self.runtime.as_secs(), self.iodepth);
        let helpers = HELPERS;
        let mut s = format!(
            r#"{helpers}# run_phase RUN: connect, fio between the go and stop marks, disconnect.
run_phase() {{
    # A target VM whose script has ended serves nothing more: stop here rather than wait out every mark.
    wait_file $T/$1.ready {secs} target || {{ problem $1 "target not ready"; exit 3; }}
    # Bounded reconnecting, so a target that dies under fio fails the run instead of holding it for 600 s.
    nvme connect -t rdma -a {TARGET_ADDR} -s 4420 -n {NQN} --hostnqn {HOSTNQN} --nr-io-queues=1 \
        --ctrl-loss-tmo=30 --reconnect-delay=2 > $T/$1.connect.out 2>&1
    echo $? > $T/$1.connect.exit
    n=0; until [ -b /dev/nvme0n1 ]; do sleep 0.2; n=$((n+1)); [ $n -gt 150 ] && break; done
    if [ -b /dev/nvme0n1 ]; then
        cpu_line > $T/$1.host-cpu.start
        touch $T/$1.go
        fio --name=$1 --filename=/dev/nvme0n1 --rw=randread --bs=4k --iodepth={qd} --ioengine=libaio --direct=1 \
            --time_based --runtime={runtime} --size=256m --output-format=json --output=$T/$1.fio.json
        echo $? > $T/$1.fio.exit
        touch $T/$1.stop
        cpu_line > $T/$1.host-cpu.end
    else
        log "$1: no /dev/nvme0n1"; nvme list; touch $T/$1.go $T/$1.stop
    fi
    nvme disconnect -n {NQN} > $T/$1.disconnect.out 2>&1
    n=0; while [ -e /dev/nvme0 ]; do
        sleep 0.2; n=$((n+1))
        [ $n -gt 150 ] && {{ problem $1 "the controller outlived its disconnect"; break; }}
    done
    touch $T/$1.done
}}
"#
        );
        for (name, _) in self.schedule() {
            s.push_str(&format!("run_phase {name}\n"));
        }
        s.push_str("dmesg > $T/host.dmesg\n");
        s
    }

    pub fn run(&self) -> Result<VmBenchReport, BenchError> {
        if self.rounds == 0 || self.runtime.as_secs() < 2 || self.iodepth == 0 {
            return Err(BenchError::Failed("--rounds and --iodepth at least 1, --runtime at least 2 s".into()));
        }
        let files = ours::files(&["nvmf-target"]).map_err(BenchError::Scenario)?;
        let (vms, cables) = scenario::two_bonded_hosts(self.target_script(), self.host_script());
        let setup = &self.setup;
        let mut vm_run = Run::start_with_files(&setup.image, setup.accel, &vms, &cables, &[], &setup.dir, &files)
            .map_err(|e| BenchError::Scenario(e.into()))?;
        let bound = self.time_bound();
        let outcomes = vm_run.wait(bound);
        let ticks = vm_run.read("clk_tck").and_then(|t| t.trim().parse::<f64>().ok()).unwrap_or(100.0);
        let runs: Vec<RunResult> =
            self.schedule().into_iter().map(|(name, candidate)| read_run(&vm_run, name, candidate, ticks)).collect();
        let mut problems: Vec<String> =
            runs.iter().flat_map(|r| r.problems.iter().map(|p| format!("{}: {p}", r.name))).collect();
        problems.extend(scenario::vm_problems(&outcomes, bound));
        let summary = summarise(&runs);
        Ok(VmBenchReport {
            kernel: setup.image.version.clone(),
            accel: setup.accel,
            runtime_seconds: self.runtime.as_secs(),
            rounds: self.rounds,
            iodepth: self.iodepth,
            runs,
            summary,
            vms: outcomes,
            passed: problems.is_empty(),
            problems,
        })
    }
}

/// Busy and total jiffies of a `/proc/stat` `cpu` line (busy: user, nice, system, irq, softirq, steal).
fn cpu_jiffies(line: &str) -> Option<(u64, u64)> {
    let fields: Vec<u64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>().ok()?;
    if !line.starts_with("cpu ") || fields.len() < 8 {
        return None;
    }
    let busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7];
    Some((busy, busy + fields[3] + fields[4]))
}

/// CPU microseconds per I/O and the busy share between two `/proc/stat` lines.
/// What two `cpu_line` snapshots say of the window between them.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CpuWindow {
    /// Busy CPU microseconds per I/O, and the busy share of the window's jiffies.
    per_io: f64,
    busy: f64,
    /// The window's jiffies over its uptime (1.0 when the guest's ticks keep up with its clock).
    coverage: Option<f64>,
}

/// From two `cpu_line` snapshots (a `/proc/stat` `cpu` line, then the uptime in seconds).
fn cpu_window(start: Option<String>, end: Option<String>, ios: u64, ticks_per_second: f64) -> Option<CpuWindow> {
    let (start, end) = (start?, end?);
    let (mut a, mut b) = (start.lines(), end.lines());
    let (b0, t0) = cpu_jiffies(a.next()?.trim())?;
    let (b1, t1) = cpu_jiffies(b.next()?.trim())?;
    if ios == 0 || b1 < b0 || t1 <= t0 {
        return None;
    }
    let busy = (b1 - b0) as f64;
    let uptime = |l: Option<&str>| l.and_then(|l| l.trim().parse::<f64>().ok());
    let coverage = match (uptime(a.next()), uptime(b.next())) {
        (Some(u0), Some(u1)) if u1 > u0 => Some((t1 - t0) as f64 / ticks_per_second / (u1 - u0)),
        _ => None,
    };
    Some(CpuWindow { per_io: busy / ticks_per_second * 1e6 / ios as f64, busy: busy / (t1 - t0) as f64, coverage })
}

fn read_run(vm_run: &Run, name: String, target: Candidate, ticks: f64) -> RunResult {
    let file = |suffix: &str| vm_run.read(&format!("{name}.{suffix}"));
    let mut problems = Vec::new();
    let connected = file("connect.exit").is_some_and(|t| t.trim() == "0");
    if !connected {
        problems.push(format!("nvme connect failed: {}", file("connect.out").unwrap_or_default().trim()));
    }
    let fio_exit = file("fio.exit").and_then(|t| t.trim().parse().ok());
    let fio: Option<serde_json::Value> = file("fio.json").and_then(|t| serde_json::from_str(&t).ok());
    let job = fio.as_ref().map(|f| &f["jobs"][0]["read"]);
    let iops = job.and_then(|j| j["iops"].as_f64()).unwrap_or(0.0);
    let ios = job.and_then(|j| j["total_ios"].as_u64()).unwrap_or(0);
    let mean_latency_us = job.and_then(|j| j["lat_ns"]["mean"].as_f64()).unwrap_or(0.0) / 1e3;
    let job_error = fio.as_ref().and_then(|f| f["jobs"][0]["error"].as_i64());
    if fio_exit != Some(0) || job_error != Some(0) || ios == 0 || iops <= 0.0 || mean_latency_us <= 0.0 {
        problems.push(format!(
            "fio exit {fio_exit:?}, job error {job_error:?}, {ios} I/Os, {iops} IOPS, mean latency {mean_latency_us} µs"
        ));
    }
    if let Some(p) = file("problem") {
        problems.push(p.trim().to_string());
    }
    let target_cpu = cpu_window(file("target-cpu.start"), file("target-cpu.end"), ios, ticks);
    let host_cpu = cpu_window(file("host-cpu.start"), file("host-cpu.end"), ios, ticks);
    if target_cpu.is_none() || host_cpu.is_none() {
        problems.push("CPU counters missing".into());
    }
    let our_target = (target != Candidate::NvmetRdma).then(|| {
        let t = scenario::flap::OurTarget {
            alive_at_end: file("nvmf-target.alive").is_some_and(|t| t.trim() == "yes"),
            exit: file("nvmf-target.exit").and_then(|t| t.trim().parse().ok()),
            stats: StatsCheck::from_texts(file("stats.before"), file("stats.after")),
            listener_repairs: None,
            log_problems: ours::log_problems(&file("nvmf-target.log").unwrap_or_default()),
        };
        if !t.clean() {
            problems.push(format!(
                "our target: alive at the end {}, exit {:?}, stats {:?}",
                t.alive_at_end, t.exit, t.stats.differing
            ));
        }
        t
    });
    RunResult {
        name,
        target,
        connected,
        fio_exit,
        iops,
        ios,
        mean_latency_us,
        target_cpu_us_per_io: target_cpu.map(|c| c.per_io),
        target_busy: target_cpu.map(|c| c.busy),
        target_clock_coverage: target_cpu.and_then(|c| c.coverage),
        host_cpu_us_per_io: host_cpu.map(|c| c.per_io),
        host_busy: host_cpu.map(|c| c.busy),
        our_target,
        problems,
    }
}

fn summarise(runs: &[RunResult]) -> Vec<Summary> {
    let medians: Vec<(Candidate, usize, [f64; 6])> = Candidate::ALL
        .iter()
        .map(|&c| {
            let of = |f: &dyn Fn(&RunResult) -> Option<f64>| {
                median(runs.iter().filter(|r| r.target == c && r.ios > 0).filter_map(f).collect())
            };
            let n = runs.iter().filter(|r| r.target == c && r.ios > 0).count();
            let m = [
                of(&|r| Some(r.iops)),
                of(&|r| Some(r.mean_latency_us)),
                of(&|r| r.target_cpu_us_per_io),
                of(&|r| r.host_cpu_us_per_io),
                of(&|r| r.target_busy),
                of(&|r| r.target_clock_coverage),
            ];
            (c, n, m)
        })
        .collect();
    let base = medians[0].2;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    medians
        .into_iter()
        .map(|(target, runs, [iops, lat, tcpu, hcpu, busy, coverage])| Summary {
            target,
            runs,
            iops,
            mean_latency_us: lat,
            target_cpu_us_per_io: tcpu,
            target_busy: busy,
            target_clock_coverage: coverage,
            host_cpu_us_per_io: hcpu,
            iops_ratio: ratio(iops, base[0]),
            target_cpu_ratio: ratio(tcpu, base[2]),
        })
        .collect()
}

/// The report as a table.
pub fn text(r: &VmBenchReport) -> String {
    let mut s = format!(
        "bench vm: {} — kernel {} under {:?}; the kernel host's fio, 4 KiB randread QD{}, {} s × {} per target\n",
        if r.passed { "PASSED" } else { "FAILED" },
        r.kernel,
        r.accel,
        r.iodepth,
        r.runtime_seconds,
        r.rounds
    );
    s.push_str(&format!(
        "  {:<11} {:>10} {:>9} {:>16} {:>12} {:>14} {:>10} {:>10}\n",
        "target", "IOPS", "lat µs", "target CPU/IO µs", "target busy", "host CPU/IO µs", "IOPS ×", "CPU ×"
    ));
    for m in &r.summary {
        s.push_str(&format!(
            "  {:<11} {:>10.0} {:>9.0} {:>16.0} {:>11.0}% {:>14.0} {:>10.3} {:>10.3}\n",
            m.target.label(),
            m.iops,
            m.mean_latency_us,
            m.target_cpu_us_per_io,
            m.target_busy * 100.0,
            m.host_cpu_us_per_io,
            m.iops_ratio,
            m.target_cpu_ratio
        ));
    }
    s.push_str("  (× : over nvmet-rdma in this run; CPU is the whole VM's busy jiffies between the host's marks)\n");
    let coverage: Vec<String> = r.summary.iter().map(|m| format!("{:.3}", m.target_clock_coverage)).collect();
    s.push_str(&format!("  target VM jiffies over its uptime (TCG loses ticks): {}\n", coverage.join(" / ")));
    for p in &r.problems {
        s.push_str(&format!("  problem: {p}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn cpu_lines_give_busy_time_per_io() {
        let start = "cpu  100 0 50 1000 10 5 5 0 0 0\n10.00\n";
        let end = "cpu  300 0 150 1100 10 25 25 0 0 0\n15.50\n";
        // 340 busy jiffies of 440 at 100 per second over 1 000 I/Os: 3.4 s / 1 000 = 3 400 µs; 4.4 s of jiffies
        // in 5.5 s of uptime.
        let w = cpu_window(Some(start.into()), Some(end.into()), 1000, 100.0).expect("parsed");
        assert!((w.per_io - 3400.0).abs() < 1e-6, "{w:?}");
        assert!((w.busy - 340.0 / 440.0).abs() < 1e-9, "{w:?}");
        assert!(w.coverage.is_some_and(|c| (c - 0.8).abs() < 1e-9), "{w:?}");
        let no_uptime = cpu_window(Some(start.lines().next().unwrap().into()), Some(end.into()), 1000, 100.0);
        assert_eq!(no_uptime.map(|w| w.coverage), Some(None));
        assert_eq!(cpu_window(Some(start.into()), Some(end.into()), 0, 100.0), None);
        assert_eq!(cpu_window(Some("cpu0 1 2 3".into()), Some(end.into()), 10, 100.0), None);
        assert_eq!(cpu_window(Some(end.into()), Some(start.into()), 10, 100.0), None);
    }

    fn bench(rounds: usize) -> VmBench {
        let image = crate::image::Image {
            version: "test".into(),
            kernel: PathBuf::from("/nonexistent"),
            initramfs: PathBuf::from("/nonexistent"),
        };
        VmBench {
            setup: Setup { image, accel: Accel::Tcg, dir: PathBuf::from("/nonexistent") },
            runtime: Duration::from_secs(30),
            rounds,
            iodepth: 32,
        }
    }

    #[test]
    fn soft_rounds_come_after_rxe_is_unloaded_and_scripts_parse() {
        let b = bench(2);
        let names: Vec<String> = b.schedule().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["nvmet-rdma-1", "ours-verbs-1", "nvmet-rdma-2", "ours-verbs-2", "ours-soft-1", "ours-soft-2"]
        );
        let target = b.target_script();
        let rmmod = target.find("rmmod rdma_rxe").expect("rxe unloaded");
        assert!(target.rfind("window nvmet-rdma-2").unwrap() < rmmod);
        assert!(target.find("window ours-soft-1").unwrap() > rmmod);
        assert_eq!(target.matches("rmmod rdma_rxe ||").count(), 1);
        crate::guest::assert_parses(&target);
        crate::guest::assert_parses(&b.host_script());
    }

    #[test]
    fn summary_is_relative_to_nvmet() {
        let run = |target, iops: f64, cpu: f64| RunResult {
            name: String::new(),
            target,
            connected: true,
            fio_exit: Some(0),
            iops,
            ios: 1,
            mean_latency_us: 1.0,
            target_cpu_us_per_io: Some(cpu),
            target_busy: None,
            target_clock_coverage: None,
            host_cpu_us_per_io: Some(1.0),
            host_busy: None,
            our_target: None,
            problems: Vec::new(),
        };
        let runs = [
            run(Candidate::NvmetRdma, 1000.0, 400.0),
            run(Candidate::NvmetRdma, 3000.0, 200.0),
            run(Candidate::NvmetRdma, 2000.0, 300.0),
            run(Candidate::OursVerbs, 1000.0, 600.0),
        ];
        let s = summarise(&runs);
        assert_eq!((s[0].iops, s[0].target_cpu_us_per_io, s[0].runs), (2000.0, 300.0, 3));
        assert_eq!((s[1].iops_ratio, s[1].target_cpu_ratio), (0.5, 2.0));
        // No run of the soft provider: nothing, not a ratio of zeros passed off as a figure.
        assert_eq!((s[2].runs, s[2].iops_ratio), (0, 0.0));
    }
}
