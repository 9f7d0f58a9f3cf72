//! The seed's loop — `ip link set bond0 down; sleep 1; ip link set bond0 up; sleep 10`, N times — on the
//! target's bond (or, with `--side initiator`, the host's) while a host runs I/O over rxe:
//!
//! - `kernel-flap`: the kernel's nvmet-rdma target, the kernel host running fio;
//! - `target-flap`: our `nvmf-target` (verbs provider), the host being either our `nvmf perf --verify` or the
//!   kernel host running fio with crc32c verify; our target's stats are read before and after.
//!
//! The host VM reports I/O progress every second; this side watches it. The outcome is either *recovered* (I/O
//! moves again after the last flap; with the time it took after each flap) or *stalled* (no progress for the
//! stall time: the host VM is asked for evidence — controller state, the stacks of blocked tasks, dmesg — and
//! the VMs are stopped), never a hang.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::ours::{self, StatsCheck};
use super::{HOSTNQN, NQN, ScenarioError, Setup, TARGET_ADDR, nvmet_target_setup, two_bonded_hosts, write_json};
use crate::vm::{Accel, Run, VmOutcome};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Target,
    Initiator,
}

/// Who serves: the kernel's nvmet-rdma, our nvmf-target on the verbs provider (in a VM), or our nvmf-target
/// on the soft provider (on the host side of a tap, the kernel host's rxe across it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Kernel,
    Ours,
    Soft,
}

/// Who drives I/O: the kernel host with fio (with crc32c verify when `verify`), or our `nvmf perf --verify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostKind {
    Kernel { verify: bool },
    Ours,
}

/// Our host's report (`nvmf perf --verify -o json`), in short.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PerfSummary {
    pub exit: Option<i32>,
    pub iops: f64,
    pub ios: u64,
    pub errors: u64,
    pub reconnects: u64,
    pub longest_gap_ms: u64,
    pub verified_blocks: u64,
    pub final_verified_blocks: u64,
    pub verify_errors: Option<u64>,
}

impl PerfSummary {
    /// From `perf.json` (`nvmf perf -o json`) and `perf.exit` in the run directory.
    pub fn read(run: &Run) -> PerfSummary {
        PerfSummary::of(run.read("perf.json"), run.read("perf.exit").and_then(|t| t.trim().parse().ok()))
    }

    /// From `nvmf perf -o json`'s output and its exit code.
    pub fn of(json: Option<String>, exit: Option<i32>) -> PerfSummary {
        let p: serde_json::Value = json.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
        PerfSummary {
            exit,
            iops: p["iops"].as_f64().unwrap_or(0.0),
            ios: p["ios"].as_u64().unwrap_or(0),
            errors: p["errors"].as_u64().unwrap_or(0),
            reconnects: p["reconnects"].as_u64().unwrap_or(0),
            longest_gap_ms: p["longest_gap_ms"].as_u64().unwrap_or(0),
            verified_blocks: p["verify"]["checked_blocks"].as_u64().unwrap_or(0),
            final_verified_blocks: p["verify"]["final_checked_blocks"].as_u64().unwrap_or(0),
            verify_errors: p["verify"]["errors"].as_u64(),
        }
    }
}

/// Our target's side of a run (in a VM, or on the host side of a tap).
#[derive(Debug, Clone, Default, Serialize)]
pub struct OurTarget {
    /// Still running when the host finished (a crash would say no), and its exit code after SIGINT.
    pub alive_at_end: bool,
    pub exit: Option<i32>,
    pub stats: StatsCheck,
    pub listener_repairs: Option<u64>,
    pub log_problems: Vec<String>,
}

impl OurTarget {
    /// Alive to the end, stopped with exit 0, back at its baseline.
    pub fn clean(&self) -> bool {
        self.alive_at_end && self.exit == Some(0) && self.stats.back_to_baseline
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// I/O moved again after the last flap.
    Recovered,
    /// No I/O progress for the stall time; evidence collected.
    Stalled,
    /// The run ended (time bound, VM exit) before either could be said.
    Incomplete,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlapRecord {
    pub flap: u32,
    /// bond0's operstate right after `down`, and 1 s after `up`, as the flapping VM read it.
    pub operstate_after_down: String,
    pub operstate_after_up: String,
    /// Seconds from this flap's `up` (seen here) to the next I/O progress; `None` if none came.
    pub recovered_after: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Evidence {
    pub controller_state: String,
    pub blocked_tasks: String,
    pub dmesg_tail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlapResult {
    pub scenario: &'static str,
    pub kernel: String,
    pub accel: Accel,
    pub target: TargetKind,
    pub host: HostKind,
    pub side: Side,
    pub flaps_requested: u32,
    pub outcome: Outcome,
    pub flaps: Vec<FlapRecord>,
    /// Seconds after the last flap's `up` until I/O moved again.
    pub time_to_recover: Option<f64>,
    /// Longest time without I/O progress while fio ran.
    pub longest_gap: f64,
    pub reads_completed: u64,
    pub writes_completed: u64,
    /// fio's exit code and error count (a verify mismatch fails fio), and the kernel host's I/O error and
    /// reconnect lines.
    pub fio_exit: Option<i32>,
    pub fio_errors: Option<u64>,
    pub host_io_error_lines: usize,
    pub reconnects: usize,
    pub host_kernel_errors: Vec<String>,
    pub target_kernel_errors: Vec<String>,
    pub evidence: Option<Evidence>,
    /// With our host.
    pub perf: Option<PerfSummary>,
    /// With our target.
    pub our_target: Option<OurTarget>,
    /// With our soft target on the host side of a tap: what the tap carried, checked.
    pub wire: Option<super::tap_side::WireCheck>,
    pub seconds: f64,
    pub time_bound: f64,
    pub vms: Vec<VmOutcome>,
}

/// What a flap run was, for its result.
pub(crate) struct FlapRun {
    pub scenario: &'static str,
    pub target: TargetKind,
    pub host: HostKind,
    pub side: Side,
    pub flaps: u32,
    pub time_bound: Duration,
}

impl FlapResult {
    /// The result of a finished run: what [`watch`] saw, and what the VMs left in the run directory.
    pub(crate) fn assemble(
        setup: &Setup,
        run: &FlapRun,
        vm_run: &Run,
        watched: Watched,
        vms: Vec<VmOutcome>,
        our_target: Option<OurTarget>,
        seconds: Duration,
    ) -> FlapResult {
        let Watched { outcome, longest_gap, recovered_after, evidence, counts } = watched;
        let records = flap_records(vm_run, &recovered_after);
        let fio: Option<serde_json::Value> = vm_run.read("fio.json").and_then(|t| serde_json::from_str(&t).ok());
        let host_dmesg = vm_run.read("host.dmesg").unwrap_or_default();
        let target_dmesg = vm_run.read("target.dmesg").unwrap_or_default();
        FlapResult {
            scenario: run.scenario,
            kernel: setup.image.version.clone(),
            accel: setup.accel,
            target: run.target,
            host: run.host,
            side: run.side,
            flaps_requested: run.flaps,
            outcome,
            time_to_recover: if outcome == Outcome::Recovered {
                records.last().and_then(|r| r.recovered_after)
            } else {
                None
            },
            flaps: records,
            longest_gap,
            reads_completed: counts.0,
            writes_completed: counts.1,
            fio_exit: vm_run.read("fio.exit").and_then(|t| t.trim().parse().ok()),
            // total_err is there when fio went on through errors; otherwise the job's error code says.
            fio_errors: fio
                .as_ref()
                .and_then(|f| f["jobs"][0]["total_err"].as_u64().or(f["jobs"][0]["error"].as_u64())),
            host_io_error_lines: host_dmesg.lines().filter(|l| l.contains("I/O error")).count(),
            reconnects: host_dmesg.lines().filter(|l| l.contains("Successfully reconnected")).count(),
            host_kernel_errors: kernel_errors(&host_dmesg),
            target_kernel_errors: kernel_errors(&target_dmesg),
            evidence,
            perf: (run.host == HostKind::Ours).then(|| PerfSummary::read(vm_run)),
            our_target,
            wire: None,
            seconds: seconds.as_secs_f64(),
            time_bound: run.time_bound.as_secs_f64(),
            vms,
        }
    }

    /// Every flap toggled the bond (down, then back up), as seen in the VM.
    pub fn flaps_toggled(&self) -> bool {
        self.flaps.len() as u32 == self.flaps_requested
            && self.flaps.iter().all(|f| f.operstate_after_down == "down" && f.operstate_after_up == "up")
    }

    /// Everything held: the flaps toggled the bond, I/O recovered after each, no I/O or verify error reached
    /// the application, and our target (when it served) never died and came back to its baseline.
    pub fn passed(&self) -> bool {
        let host_clean = match self.host {
            HostKind::Kernel { .. } => self.fio_exit == Some(0) && self.fio_errors == Some(0),
            HostKind::Ours => self.perf.as_ref().is_some_and(|p| {
                p.exit == Some(0) && p.errors == 0 && p.verify_errors == Some(0) && p.final_verified_blocks > 0
            }),
        };
        let target_clean = self.our_target.as_ref().is_none_or(OurTarget::clean);
        self.flaps_toggled()
            && self.wire.as_ref().is_none_or(|w| w.passed())
            && self.outcome == Outcome::Recovered
            && self.flaps.iter().all(|f| f.recovered_after.is_some())
            && host_clean
            && target_clean
    }

    /// The result says what happened: recovered with its time, or stalled with its evidence.
    pub fn complete(&self) -> bool {
        match self.outcome {
            Outcome::Recovered => self.time_to_recover.is_some(),
            Outcome::Stalled => self.evidence.as_ref().is_some_and(|e| !e.controller_state.is_empty()),
            Outcome::Incomplete => false,
        }
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} ({:?} target, {:?} host, {:?} side, {} flaps): {:?}\n  kernel {} under {:?}, {:.0} s (bound {:.0} s)\n",
            self.scenario,
            self.target,
            self.host,
            self.side,
            self.flaps_requested,
            self.outcome,
            self.kernel,
            self.accel,
            self.seconds,
            self.time_bound
        );
        // Our soft target is on the host side of a tap: its own link is the tap.
        let link = if (self.target, self.side) == (TargetKind::Soft, Side::Target) { "tap" } else { "bond0" };
        for f in &self.flaps {
            s.push_str(&format!(
                "  flap {}: {link} {} → {}, I/O back after {}\n",
                f.flap,
                f.operstate_after_down,
                f.operstate_after_up,
                f.recovered_after.map_or("—".into(), |t| format!("{t:.1} s"))
            ));
        }
        match &self.perf {
            Some(p) => s.push_str(&format!(
                "  our host: exit {:?}, {} I/Os, {} errors, {} reconnects, longest gap {} ms; verify: {} blocks checked during, {} at the end, {:?} errors\n",
                p.exit, p.ios, p.errors, p.reconnects, p.longest_gap_ms, p.verified_blocks, p.final_verified_blocks, p.verify_errors
            )),
            None => s.push_str(&format!(
                "  I/O: {} reads, {} writes, longest gap {:.1} s, fio exit {:?} errors {:?}, kernel I/O error lines {}, reconnects {}\n",
                self.reads_completed,
                self.writes_completed,
                self.longest_gap,
                self.fio_exit,
                self.fio_errors,
                self.host_io_error_lines,
                self.reconnects
            )),
        }
        if let Some(t) = &self.our_target {
            s.push_str(&format!(
                "  our target: alive at the end {}, exit {:?}, listener repairs {:?}, stats back to baseline {} {:?}\n",
                t.alive_at_end, t.exit, t.listener_repairs, t.stats.back_to_baseline, t.stats.differing
            ));
            for line in t.log_problems.iter().take(6) {
                s.push_str(&format!("  our target log: {line}\n"));
            }
        }
        if let Some(w) = &self.wire {
            s.push_str(&format!("  {}\n", w.summary()));
        }
        if let Some(e) = &self.evidence {
            s.push_str(&format!("  stalled: controller {}\n", e.controller_state.trim()));
            for line in e.blocked_tasks.lines().take(12) {
                s.push_str(&format!("    {line}\n"));
            }
        }
        for line in self.host_kernel_errors.iter().take(6) {
            s.push_str(&format!("  host kernel: {line}\n"));
        }
        for line in self.target_kernel_errors.iter().take(6) {
            s.push_str(&format!("  target kernel: {line}\n"));
        }
        s
    }
}

/// The flapping loop, in whichever VM flaps.
pub(crate) fn flap_loop(flaps: u32) -> String {
    format!(
        r#"wait_file $T/io-started 600 || exit 6
for i in $(seq 1 {flaps}); do
    ip link set bond0 down
    echo "$i down $(cat /sys/class/net/bond0/operstate)" >> $T/flaps
    sleep 1
    ip link set bond0 up
    echo "$i upcmd" >> $T/flaps
    sleep 1
    echo "$i up $(cat /sys/class/net/bond0/operstate)" >> $T/flaps
    sleep 9
done
touch $T/flaps-done
"#
    )
}

/// The kernel host: connect, fio in the background (random writes with crc32c verify of what was written, or
/// random reads and writes going on through I/O errors), progress every second; on `finish` or `evidence`, act.
pub(crate) fn host_script(addr: &str, runtime: u64, verify: bool) -> String {
    host_script_holding(addr, runtime, verify, "")
}

/// `host_script`, running `hold` (shell) after it said it is done or gave its evidence, before it exits.
pub(crate) fn host_script_holding(addr: &str, runtime: u64, verify: bool, hold: &str) -> String {
    let stop = if verify { ":" } else { "kill $fio_pid 2>/dev/null" };
    let workload = if verify {
        "--rw=randwrite --verify=crc32c --verify_backlog=256 --verify_fatal=1 --do_verify=1"
    } else {
        "--rw=randrw --continue_on_error=io"
    };
    format!(
        r#"wait_file $T/target-ready 300 || {{ log "target not ready"; exit 3; }}
nvme connect -t rdma -a {addr} -s 4420 -n {NQN} --hostnqn {HOSTNQN} --reconnect-delay=2 --ctrl-loss-tmo=60
n=0; until [ -b /dev/nvme0n1 ]; do sleep 0.2; n=$((n+1)); [ $n -gt 150 ] && break; done
[ -b /dev/nvme0n1 ] || {{ log "no /dev/nvme0n1"; exit 5; }}
fio --name=flap --filename=/dev/nvme0n1 {workload} --bs=4k --size=64m --ioengine=libaio --iodepth=4 --direct=1 \
    --time_based --runtime={runtime} --output-format=json --output=$T/fio.json &
fio_pid=$!
touch $T/io-started
grep nvme /proc/diskstats > $T/diskstats.start
while true; do
    # Completed reads and writes of every nvme disk, path devices included (the multipath head counts none).
    echo "$(now) $(awk '$3 ~ /^nvme/ {{r += $4; w += $8}} END {{print r + 0, w + 0}}' /proc/diskstats) $(cat /sys/class/nvme/nvme0/state 2>/dev/null || echo gone)" >> $T/progress
    if [ -e $T/evidence ]; then
        cat /sys/class/nvme/nvme0/state > $T/evidence.state 2>&1
        # Blocked tasks, and any task whose kernel stack is in the NVMe or RDMA code (a reconnect worker waiting
        # in nvme_rdma_alloc_queue sleeps, it is not blocked).
        {{
            for pid in $(pidof fio); do
                echo "== fio (pid $pid) $(grep '^State:' /proc/$pid/status)"; cat /proc/$pid/stack
            done
            for p in /proc/[0-9]*; do
                st=$(cat $p/stack 2>/dev/null)
                if grep -q '^State:.*D' $p/status 2>/dev/null || echo "$st" | grep -qE 'nvme|rdma|rxe|ib_'; then
                    echo "== $(cat $p/comm) (pid ${{p#/proc/}}) $(grep '^State:' $p/status)"; echo "$st"
                fi
            done
        }} > $T/evidence.stacks 2>&1
        echo w > /proc/sysrq-trigger
        sleep 1
        dmesg > $T/host.dmesg
        touch $T/evidence-done
        {hold}
        exit 0
    fi
    if [ -e $T/finish ] || ! kill -0 $fio_pid 2>/dev/null; then
        # A verifying fio runs to its end (it checks what it wrote and reports); the other is stopped.
        {stop}
        wait $fio_pid
        echo $? > $T/fio.exit
        dmesg > $T/host.dmesg
        touch $T/host-done
        (nvme disconnect -n {NQN} >/dev/null 2>&1 &)
        sleep 2
        {hold}
        exit 0
    fi
    sleep 1
done
"#
    )
}

/// Our host: `nvmf perf --verify` in the background on the verbs provider, reconnecting as the kernel host is
/// told to (every 2 s, for up to 60 s); its progress lines (`--status-interval 1`) give the I/O count each
/// second; `finish` ends it with SIGINT, which still reports and reads everything written back.
fn our_host_script(nvmf: &std::path::Path, runtime: u64) -> String {
    format!(
        r#"wait_file $T/target-ready 300 || {{ log "target not ready"; exit 3; }}
RUST_LOG=info {nvmf} perf --provider verbs -a {TARGET_ADDR} -s 4420 -n {NQN} --hostnqn {HOSTNQN} \
    --reconnect-delay 2 --ctrl-loss-tmo 60 -w randrw --bs 4k -q 8 --size 64m --runtime {runtime} --verify \
    --status-interval 1 -o json > $T/perf.json 2> $T/perf.err &
perf_pid=$!
# The flaps start once I/O moves (connecting can take a while under emulation).
n=0; until grep -q 'ios [1-9]' $T/perf.err 2>/dev/null; do
    sleep 0.5; n=$((n+1)); [ $n -gt 120 ] && break
done
touch $T/io-started
while true; do
    ios=$(grep -o 'ios [0-9]*' $T/perf.err | tail -1 | cut -d' ' -f2)
    echo "$(now) ${{ios:-0}} 0 $(grep -o 'live paths [0-9]*' $T/perf.err | tail -1 | tr ' ' '_')" >> $T/progress
    if [ -e $T/evidence ]; then
        tail -20 $T/perf.err > $T/evidence.state 2>&1
        cat /proc/$perf_pid/status /proc/$perf_pid/stack > $T/evidence.stacks 2>&1
        dmesg > $T/host.dmesg
        touch $T/evidence-done
        kill -INT $perf_pid 2>/dev/null
        wait $perf_pid
        echo $? > $T/perf.exit
        exit 0
    fi
    if [ -e $T/finish ] || ! kill -0 $perf_pid 2>/dev/null; then
        kill -INT $perf_pid 2>/dev/null
        wait $perf_pid
        echo $? > $T/perf.exit
        dmesg > $T/host.dmesg
        touch $T/host-done
        exit 0
    fi
    sleep 1
done
"#,
        nvmf = nvmf.display()
    )
}

pub(crate) fn kernel_errors(dmesg: &str) -> Vec<String> {
    let keys = ["error", "fail", "fatal", "timeout", "reconnect", "not free", "stuck", "blocked for more"];
    dmesg
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            keys.iter().any(|k| l.contains(k)) && !l.contains("sysrq") && !l.contains("tsc:")
        })
        .map(|l| l.trim().to_string())
        .collect()
}

/// How long the host's I/O runs, and the run's time bound: I/O runs through the flaps and a little after (a
/// verifying kernel host runs fio to its end: not much longer than the flaps); the bound covers boots, the
/// flaps and the stall limit.
pub(crate) fn timing(flaps: u32, host: HostKind, stall: Duration, timeout: Duration) -> (u64, Duration) {
    let flapping = flaps as u64 * 11;
    let runtime = flapping + if host == (HostKind::Kernel { verify: true }) { 20 } else { 40 };
    (runtime, Duration::from_secs(60 + flapping + stall.as_secs() + 60).min(timeout))
}

/// `kernel-flap`: the kernel's target and host.
pub fn run(
    setup: &Setup,
    flaps: u32,
    side: Side,
    stall: Duration,
    timeout: Duration,
) -> Result<FlapResult, ScenarioError> {
    run_with(setup, TargetKind::Kernel, HostKind::Kernel { verify: false }, flaps, side, stall, timeout)
}

pub fn run_with(
    setup: &Setup,
    target_kind: TargetKind,
    host_kind: HostKind,
    flaps: u32,
    side: Side,
    stall: Duration,
    timeout: Duration,
) -> Result<FlapResult, ScenarioError> {
    let (runtime, time_bound) = timing(flaps, host_kind, stall, timeout);
    let mut target = match target_kind {
        // Our soft target runs on the host side of a tap: a topology of its own.
        TargetKind::Soft => return super::soft_flap::run(setup, host_kind, flaps, side, stall, timeout),
        TargetKind::Kernel => format!("{}touch $T/target-ready\n", nvmet_target_setup(TARGET_ADDR)),
        TargetKind::Ours => {
            format!("{}touch $T/target-ready\n", ours::start_target(&ours::in_vm("nvmf-target"), TARGET_ADDR))
        }
    };
    let mut host = String::new();
    match side {
        Side::Target => target.push_str(&flap_loop(flaps)),
        Side::Initiator => host.push_str(&format!("( {} ) &\n", flap_loop(flaps).replace('\n', "\n  "))),
    }
    // When the watcher asks for evidence, the target VM gives its side too: blocked tasks and dmesg.
    target.push_str(
        r#"( wait_file $T/evidence 100000 && {
    for p in /proc/[0-9]*; do
        st=$(cat $p/stack 2>/dev/null)
        if grep -q '^State:.*D' $p/status 2>/dev/null || echo "$st" | grep -qE 'rdma|rxe|ib_|cm_'; then
            echo "== $(cat $p/comm) (pid ${p#/proc/}) $(grep '^State:' $p/status)"; echo "$st"
        fi
    done > $T/target.stacks 2>&1
    echo w > /proc/sysrq-trigger; sleep 1; dmesg > $T/target.dmesg; } ) &
"#,
    );
    // The host finished, or stalled and gave its evidence: either way our target is then checked and stopped.
    target.push_str(&format!(
        "n=0; until [ -e $T/host-done ] || [ -e $T/evidence-done ]; do sleep 0.5; n=$((n+1)); [ $n -ge {} ] && break; done\n",
        time_bound.as_secs() * 2
    ));
    if target_kind == TargetKind::Ours {
        target.push_str(&ours::stop_target());
    }
    target.push_str("dmesg > $T/target.dmesg\n");
    match host_kind {
        HostKind::Kernel { verify } => host.push_str(&host_script(TARGET_ADDR, runtime, verify)),
        HostKind::Ours => host.push_str(&our_host_script(&ours::in_vm("nvmf"), runtime)),
    }
    let (vms, cables) = two_bonded_hosts(target, host);
    let mut ours_needed = Vec::new();
    if target_kind == TargetKind::Ours {
        ours_needed.push("nvmf-target");
    }
    if host_kind == HostKind::Ours {
        ours_needed.push("nvmf");
    }
    let files = ours::files(&ours_needed)?;
    let mut vm_run = Run::start_with_files(&setup.image, setup.accel, &vms, &cables, &[], &setup.dir, &files)?;

    let started = Instant::now();
    let watched = watch(&mut vm_run, stall, time_bound);
    // Let the host write its logs (a stalled host may never: the VMs are stopped regardless).
    // Time for the host to finish and for our target (when it serves) to be checked and stopped.
    let grace = match (watched.outcome, target_kind) {
        (Outcome::Recovered, _) => 60,
        (_, TargetKind::Ours) => 45,
        _ => 5,
    };
    let outcomes = vm_run.wait(Duration::from_secs(grace));
    let our_target = (target_kind == TargetKind::Ours).then(|| {
        let after: Option<serde_json::Value> =
            vm_run.read("stats.after").and_then(|t| serde_json::from_str(t.trim()).ok());
        OurTarget {
            alive_at_end: vm_run.read("nvmf-target.alive").is_some_and(|t| t.trim() == "yes"),
            exit: vm_run.read("nvmf-target.exit").and_then(|t| t.trim().parse().ok()),
            stats: StatsCheck::from_texts(vm_run.read("stats.before"), vm_run.read("stats.after")),
            listener_repairs: after.and_then(|a| a["listeners"][0]["repairs"].as_u64()),
            log_problems: ours::log_problems(&vm_run.read("nvmf-target.log").unwrap_or_default()),
        }
    });
    let run = FlapRun {
        scenario: if target_kind == TargetKind::Ours { "target-flap" } else { "kernel-flap" },
        target: target_kind,
        host: host_kind,
        side,
        flaps,
        time_bound,
    };
    let result = FlapResult::assemble(setup, &run, &vm_run, watched, outcomes, our_target, started.elapsed());
    write_json(&setup.dir, "result.json", &result)?;
    Ok(result)
}

/// What [`watch`] saw of a flap run.
pub(crate) struct Watched {
    pub outcome: Outcome,
    pub longest_gap: f64,
    /// Per flap (in the order of the `upcmd` lines), seconds from its `up` to the next I/O progress.
    pub recovered_after: Vec<Option<f64>>,
    pub evidence: Option<Evidence>,
    /// The last progress line's counts.
    pub counts: (u64, u64),
}

/// Watches a flap run through the shared directory until it recovers after the last flap (then `finish` is
/// touched) or stalls for `stall` (then `evidence` is touched and collected), at most `time_bound`. The host
/// writes `io-started` and a `progress` line a second (`TIME COUNT COUNT …`); whoever flaps writes `flaps`
/// (`N down STATE`, `N upcmd`, `N up STATE`) and `flaps-done`.
pub(crate) fn watch(vm_run: &mut Run, stall: Duration, time_bound: Duration) -> Watched {
    let started = Instant::now();
    let mut last_counts: Option<(u64, u64)> = None;
    let mut last_progress = Instant::now();
    let mut longest_gap = 0.0f64;
    let mut io_started = false;
    let mut up_seen: Vec<(Instant, u64)> = Vec::new();
    let mut recovered_after: Vec<Option<f64>> = Vec::new();
    let mut outcome = Outcome::Incomplete;
    let mut evidence = None;
    let mut counts = (0, 0);
    while started.elapsed() < time_bound && !vm_run.finished() {
        std::thread::sleep(Duration::from_millis(250));
        if !io_started {
            io_started = vm_run.read("io-started").is_some();
            last_progress = Instant::now();
            continue;
        }
        if let Some(line) = vm_run.read("progress").and_then(|p| p.lines().last().map(str::to_string)) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let (Some(r), Some(w)) = (f.get(1).and_then(|v| v.parse().ok()), f.get(2).and_then(|v| v.parse().ok())) {
                counts = (r, w);
                if last_counts != Some((r, w)) {
                    // Growth is progress; a drop (a path device went away) only resets the baseline.
                    let grew = last_counts.is_some_and(|(lr, lw)| r + w > lr + lw);
                    if grew {
                        longest_gap = longest_gap.max(last_progress.elapsed().as_secs_f64());
                        last_progress = Instant::now();
                        for (i, (up, at_up)) in up_seen.iter().enumerate() {
                            if recovered_after[i].is_none() && last_progress > *up && r + w > *at_up {
                                recovered_after[i] = Some((last_progress - *up).as_secs_f64());
                            }
                        }
                    }
                    last_counts = Some((r, w));
                }
            }
        }
        // Flaps seen so far (times taken here, when the "upcmd" line appears), read after the progress so that
        // a flap's recovery is growth past what was counted when it came back up (resolution: the 1 s lines).
        let flap_text = vm_run.read("flaps").unwrap_or_default();
        let ups = flap_text.lines().filter(|l| l.ends_with("upcmd")).count();
        while up_seen.len() < ups {
            up_seen.push((Instant::now(), counts.0 + counts.1));
            recovered_after.push(None);
        }
        let flaps_done = vm_run.read("flaps-done").is_some();
        if flaps_done && recovered_after.last().is_some_and(|r| r.is_some()) {
            outcome = Outcome::Recovered;
            vm_run.touch("finish");
            break;
        }
        if last_progress.elapsed() >= stall {
            longest_gap = longest_gap.max(last_progress.elapsed().as_secs_f64());
            outcome = Outcome::Stalled;
            vm_run.touch("evidence");
            let asked = Instant::now();
            while vm_run.read("evidence-done").is_none() && asked.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(250));
            }
            let dmesg = vm_run.read("host.dmesg").unwrap_or_default();
            let tail: Vec<&str> = dmesg.lines().rev().take(80).collect();
            evidence = Some(Evidence {
                controller_state: vm_run.read("evidence.state").unwrap_or_default(),
                blocked_tasks: vm_run.read("evidence.stacks").unwrap_or_default(),
                dmesg_tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            });
            break;
        }
    }
    Watched { outcome, longest_gap, recovered_after, evidence, counts }
}

/// The flaps as `flaps` in the run directory records them, with their recovery times.
pub(crate) fn flap_records(vm_run: &Run, recovered_after: &[Option<f64>]) -> Vec<FlapRecord> {
    let flap_text = vm_run.read("flaps").unwrap_or_default();
    let state = |n: u32, what: &str| {
        flap_text
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 3 && f[0] == n.to_string() && f[1] == what).then(|| f[2].to_string())
            })
            .unwrap_or_default()
    };
    let done = flap_text.lines().filter(|l| l.ends_with("upcmd")).count() as u32;
    (1..=done)
        .map(|n| FlapRecord {
            flap: n,
            operstate_after_down: state(n, "down"),
            operstate_after_up: state(n, "up"),
            recovered_after: recovered_after.get(n as usize - 1).copied().flatten(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scripts the VMs run are valid shell (checked by the host's sh, the same one the VMs use).
    #[test]
    fn generated_scripts_parse() {
        for script in [
            host_script(TARGET_ADDR, 60, false),
            host_script(TARGET_ADDR, 60, true),
            host_script_holding(TARGET_ADDR, 60, true, &crate::scenario::tap_side::hold_until_released()),
            our_host_script(std::path::Path::new("/x/nvmf"), 60),
            flap_loop(3),
            crate::scenario::nvmet_target_setup(TARGET_ADDR),
            crate::guest::network(2, true, "198.18.0.1", true),
        ] {
            crate::guest::assert_parses(&script);
        }
    }
}
