//! `device-removal`: while our `nvmf perf --verify` runs against our `nvmf-target` (verbs provider, rxe0 on
//! bond0) and a second host process connects and disconnects over and over (`nvmf discover` in a loop), the
//! target VM deletes its RDMA device (`rdma link delete rxe0`) and adds it back, N times, the device staying
//! back between removals for gaps from 0.3 s to 5 s — some inside the target's repair (reopening the device,
//! handing its poll groups new lanes) and the host's reconnect — so removals race with connections being set
//! up and with completions in flight. Our target must survive every one, let the device go each time (the
//! kernel waits for every user — the worker's context and each lane's — before the delete returns), listen
//! again on the new rxe0, and the host must reconnect with nothing lost.

use std::time::Duration;

use serde::Serialize;

use super::ours::{self, StatsCheck};
use super::{HOSTNQN, NQN, ScenarioError, Setup, TARGET_ADDR, two_bonded_hosts, write_json};
use crate::vm::{Accel, Run, VmOutcome};

/// Seconds the device stays back before the next removal, in turn.
/// The target reopens the device within about 3 s of its return and the host reconnects 2 s after losing it, so
/// these land before the reopen, during it (lanes just handed to the poll groups) and during reconnects.
const GAPS: [&str; 6] = ["4", "0.3", "2.5", "5", "0.8", "3"];

/// One removal: the delete's exit and seconds (it returns once every user let go), the add's exit.
#[derive(Debug, Clone, Serialize)]
pub struct Removal {
    pub delete_exit: Option<i32>,
    pub delete_seconds: Option<f64>,
    pub add_exit: Option<i32>,
}

/// A removal as our target's log tells it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TargetRemoval {
    pub generation: u64,
    /// Lanes told to let go, and those that said they did.
    pub lanes: u64,
    pub lanes_released: u64,
    /// The worker let its own context go after them.
    pub released: bool,
    /// Queues of hosts the removal closed (connected or being set up at that moment).
    pub queues_closed: Option<u64>,
}

impl TargetRemoval {
    /// From our target's log: "RDMA device removed … generation=G lanes=N", "verbs lane released its device …
    /// generation=G", "verbs device released … generation=G". Lines of one generation are matched by it, not by
    /// their order: threads write their lines in whatever order they get the stream (a lane's release has been
    /// seen before the worker's line announcing the removal it answers).
    fn parse(log: &str) -> Vec<TargetRemoval> {
        let field = |line: &str, name: &str| -> Option<u64> {
            let at = line.find(&format!("{name}="))? + name.len() + 1;
            line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        };
        let mut out: Vec<TargetRemoval> = Vec::new();
        let (mut lanes_released, mut released) = (Vec::new(), Vec::new());
        for line in log.lines().map(strip_ansi) {
            if line.contains("closing every queue: device removed")
                && let Some(last) = out.last_mut()
            {
                last.queues_closed = field(&line, "queues");
                continue;
            }
            let Some(generation) = field(&line, "generation") else { continue };
            if line.contains("RDMA device removed") {
                let lanes = field(&line, "lanes").unwrap_or(0);
                out.push(TargetRemoval { generation, lanes, lanes_released: 0, released: false, queues_closed: None });
            } else if line.contains("verbs lane released its device") {
                lanes_released.push(generation);
            } else if line.contains("verbs device released") {
                released.push(generation);
            }
        }
        for r in &mut out {
            r.lanes_released = lanes_released.iter().filter(|&&g| g == r.generation).count() as u64;
            r.released = released.contains(&r.generation);
        }
        out
    }

    fn complete(&self) -> bool {
        self.released && self.lanes_released == self.lanes
    }
}

/// A log line without its colour escapes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for e in chars.by_ref() {
                if e.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Removal {
    /// `cycles` lines: `i delete_exit delete_seconds add_exit`.
    fn parse(text: &str) -> Vec<Removal> {
        text.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() == 4)
            .map(|f| Removal {
                delete_exit: f[1].parse().ok(),
                delete_seconds: f[2].parse().ok(),
                add_exit: f[3].parse().ok(),
            })
            .collect()
    }

    fn ok(&self) -> bool {
        self.delete_exit == Some(0) && self.add_exit == Some(0)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceRemovalResult {
    pub scenario: &'static str,
    pub kernel: String,
    pub accel: Accel,
    pub passed: bool,
    pub seconds: f64,
    /// Removals asked for, and each one made.
    pub removals_asked: u32,
    pub removals: Vec<Removal>,
    /// The connection churn beside the I/O: `nvmf discover` runs that succeeded and failed during the
    /// removals, and whether one after the last succeeded.
    pub churn_ok: u64,
    pub churn_failed: u64,
    pub churn_after_ok: bool,
    /// What our target said about it.
    pub target_saw_removal: bool,
    /// Each removal of a device our target held, by its generation (a removal that lands while the target has
    /// not reopened the device yet finds nothing to let go): whether every lane and then the worker released
    /// it. Generations are never reused.
    pub target_removals: Vec<TargetRemoval>,
    pub listener_repairs: Option<u64>,
    pub listener_state_after: String,
    pub target_alive_at_end: bool,
    pub target_exit: Option<i32>,
    pub stats: StatsCheck,
    pub perf: super::flap::PerfSummary,
    pub target_log_problems: Vec<String>,
    pub vms: Vec<VmOutcome>,
    pub problems: Vec<String>,
}

impl DeviceRemovalResult {
    pub fn summary(&self) -> String {
        let p = &self.perf;
        format!(
            "device-removal: {}\n  kernel {} under {:?}, {:.0} s\n  {}\n  connection churn (nvmf discover): {} ok, {} failed during the removals; after the last: {}\n  our target: removals of a device it held {}, listener repairs {:?}, state after {:?}, alive at the end {}, exit {:?}, stats back to baseline {} {:?}\n  our host: exit {:?}, {} I/Os, {} errors, {} reconnects, longest gap {} ms, verify errors {:?}, {} blocks read back\n{}",
            if self.passed { "PASSED" } else { "FAILED" },
            self.kernel,
            self.accel,
            self.seconds,
            self.removals_line(),
            self.churn_ok,
            self.churn_failed,
            if self.churn_after_ok { "ok" } else { "FAILED" },
            self.target_removals
                .iter()
                .map(|r| format!(
                    "[generation {}: {}/{} lanes released, device released {}, {} queues closed]",
                    r.generation,
                    r.lanes_released,
                    r.lanes,
                    r.released,
                    r.queues_closed.map_or("?".into(), |q| q.to_string())
                ))
                .collect::<Vec<_>>()
                .join(" "),
            self.listener_repairs,
            self.listener_state_after,
            self.target_alive_at_end,
            self.target_exit,
            self.stats.back_to_baseline,
            self.stats.differing,
            p.exit,
            p.ios,
            p.errors,
            p.reconnects,
            p.longest_gap_ms,
            p.verify_errors,
            p.final_verified_blocks,
            self.problems.iter().map(|p| format!("  problem: {p}\n")).collect::<String>()
        )
    }

    fn removals_line(&self) -> String {
        let each: Vec<String> = self
            .removals
            .iter()
            .map(|r| match (r.delete_exit, r.delete_seconds, r.add_exit) {
                (Some(0), Some(s), Some(0)) => format!("{s:.1} s"),
                (d, s, a) => format!("delete exit {d:?} after {s:?} s, add exit {a:?}"),
            })
            .collect();
        format!(
            "rdma link delete rxe0 + add back: {} of {} made; each delete returned after {}",
            self.removals.len(),
            self.removals_asked,
            each.join(", ")
        )
    }
}

pub fn run(setup: &Setup, removals: u32, timeout: Duration) -> Result<DeviceRemovalResult, ScenarioError> {
    let files = ours::files(&["nvmf-target", "nvmf"])?;
    let (bin, nvmf) = (ours::in_vm("nvmf-target"), ours::in_vm("nvmf"));
    let secs = timeout.as_secs();
    let removals = removals.max(1);
    let runtime = 30 + 8 * u64::from(removals);
    let gaps = GAPS.join(" ");
    let target = format!(
        r#"{start}touch $T/target-ready
wait_file $T/io-started {secs} host || exit 6
sleep 3
: > $T/cycles
i=0
while [ $i -lt {removals} ]; do
    i=$((i+1))
    t0=$(now)
    rdma link delete rxe0 &
    dpid=$!
    n=0; while kill -0 $dpid 2>/dev/null && [ $n -lt 120 ]; do sleep 0.25; n=$((n+1)); done
    if kill -0 $dpid 2>/dev/null; then
        # Still waiting for a user of the device to let go: say who holds it.
        ls -l /proc/$tpid/fd > $T/delete.fds 2>&1
        cat /proc/$dpid/stack > $T/delete.stack 2>&1
        log "removal $i: rdma link delete rxe0 still waiting after 30 s"
        dexit=124
    else
        wait $dpid; dexit=$?
    fi
    dsec=$(echo "$(now) $t0" | awk '{{print $1 - $2}}')
    sleep 1
    rdma link add rxe0 type rxe netdev bond0; aexit=$?
    echo "$i $dexit $dsec $aexit" >> $T/cycles
    log "removal $i: delete exit $dexit after $dsec s, add exit $aexit"
    [ $dexit -eq 0 ] && [ $aexit -eq 0 ] || break
    if [ $i -lt {removals} ]; then
        sleep $(echo {gaps} | cut -d' ' -f$(( (i - 1) % {ngaps} + 1 )))
    fi
done
touch $T/device-back
wait_file $T/host-done {secs} host || log 'the host never finished'
{stop}dmesg > $T/target.dmesg
"#,
        start = ours::start_target(&bin, TARGET_ADDR),
        stop = ours::stop_target(),
        ngaps = GAPS.len(),
    );
    let conn = format!("--provider verbs -a {TARGET_ADDR} -s 4420 --hostnqn {HOSTNQN}");
    let host = format!(
        r#"wait_file $T/target-ready {secs} target || {{ log "target not ready"; exit 3; }}
RUST_LOG=info {nvmf} perf {conn} -n {NQN} \
    --reconnect-delay 2 --ctrl-loss-tmo 60 -w randrw --bs 4k -q 8 --size 64m --runtime {runtime} --verify \
    --status-interval 1 -o json > $T/perf.json 2> $T/perf.err &
perf_pid=$!
n=0; until grep -q 'ios [1-9]' $T/perf.err 2>/dev/null; do sleep 0.5; n=$((n+1)); [ $n -gt 120 ] && break; done
touch $T/io-started
# Connections set up and torn down all through the removals (each run bounded).
ok=0; failed=0
while [ ! -e $T/device-back ] && [ ! -e $T/target.exit ]; do
    if RUST_LOG=error timeout 20 {nvmf} discover {conn} -o json > /dev/null 2>> $T/churn.err; then
        ok=$((ok+1))
    else
        failed=$((failed+1))
    fi
    echo "$ok $failed" > $T/churn.counts
    sleep 0.2
done
wait $perf_pid
echo $? > $T/perf.exit
RUST_LOG=error timeout 20 {nvmf} discover {conn} -o json > $T/discover-after.json 2>> $T/churn.err
echo $? > $T/discover-after.exit
dmesg > $T/host.dmesg
touch $T/host-done
"#,
        nvmf = nvmf.display()
    );
    let (vms, cables) = two_bonded_hosts(target, host);
    let mut vm_run = Run::start_with_files(&setup.image, setup.accel, &vms, &cables, &[], &setup.dir, &files)?;
    let outcomes = vm_run.wait(timeout);
    let seconds = vm_run.elapsed().as_secs_f64();
    let exit = |name: &str| vm_run.read(name).and_then(|t| t.trim().parse::<i32>().ok());
    let perf = super::flap::PerfSummary::read(&vm_run);
    let log = vm_run.read("nvmf-target.log").unwrap_or_default();
    let after: Option<serde_json::Value> = vm_run.read("stats.after").and_then(|t| serde_json::from_str(t.trim()).ok());
    let churn: Vec<u64> = vm_run
        .read("churn.counts")
        .map(|t| t.split_whitespace().filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default();
    let listener = after.as_ref().map(|a| a["listeners"][0].clone()).unwrap_or_default();
    let mut result = DeviceRemovalResult {
        scenario: "device-removal",
        kernel: setup.image.version.clone(),
        accel: setup.accel,
        passed: false,
        seconds,
        removals_asked: removals,
        removals: Removal::parse(&vm_run.read("cycles").unwrap_or_default()),
        churn_ok: churn.first().copied().unwrap_or(0),
        churn_failed: churn.get(1).copied().unwrap_or(0),
        churn_after_ok: exit("discover-after.exit") == Some(0),
        target_saw_removal: log.contains("RDMA device removed"),
        target_removals: TargetRemoval::parse(&log),
        listener_repairs: listener["repairs"].as_u64(),
        listener_state_after: listener["state"].as_str().unwrap_or_default().to_string(),
        target_alive_at_end: vm_run.read("nvmf-target.alive").is_some_and(|t| t.trim() == "yes"),
        target_exit: exit("nvmf-target.exit"),
        stats: StatsCheck::from_texts(vm_run.read("stats.before"), vm_run.read("stats.after")),
        perf,
        target_log_problems: ours::log_problems(&log),
        vms: outcomes,
        problems: Vec::new(),
    };
    let mut problems = Vec::new();
    if result.removals.len() != removals as usize || !result.removals.iter().all(Removal::ok) {
        problems.push(result.removals_line());
    }
    if result.churn_ok + result.churn_failed == 0 || !result.churn_after_ok {
        problems.push(format!(
            "connection churn: {} ok, {} failed, after the last removal ok {}",
            result.churn_ok, result.churn_failed, result.churn_after_ok
        ));
    }
    if result.target_log_problems.iter().any(|l| l.contains("panicked")) {
        problems.push(format!("our target panicked: {:?}", result.target_log_problems));
    }
    if !result.target_saw_removal {
        problems.push("our target did not report the device's removal".into());
    }
    let generations: Vec<u64> = result.target_removals.iter().map(|r| r.generation).collect();
    if result.target_removals.is_empty()
        || !result.target_removals.iter().all(TargetRemoval::complete)
        || !generations.windows(2).all(|w| w[0] < w[1])
    {
        problems.push(format!("our target's removals: {:?}", result.target_removals));
    }
    // A repair per removal of a device the target held — fewer when one lands inside a repair (the reopened
    // device gone before the listener listens on it: that repair fails and the next one counts).
    let repairs = result.listener_repairs.unwrap_or(0);
    if repairs < 1 || repairs > result.target_removals.len() as u64 || result.listener_state_after != "listening" {
        problems.push(format!(
            "listener: {:?} repairs, state {:?} after",
            result.listener_repairs, result.listener_state_after
        ));
    }
    if !result.target_alive_at_end || result.target_exit != Some(0) || !result.stats.back_to_baseline {
        problems.push(format!(
            "our target: alive {}, exit {:?}, stats {:?}",
            result.target_alive_at_end, result.target_exit, result.stats.differing
        ));
    }
    let p = &result.perf;
    if p.exit != Some(0) || p.errors > 0 || p.verify_errors != Some(0) || p.reconnects < 1 {
        problems.push(format!("our host: {p:?}"));
    }
    problems.extend(super::vm_problems(&result.vms, timeout));
    result.passed = problems.is_empty();
    result.problems = problems;
    write_json(&setup.dir, "result.json", &result)?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_removals_are_read_per_generation_from_a_coloured_log() {
        let log = "\u{1b}[2m2026-12-03T18:24:14Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m RDMA device removed \u{1b}[3maddr\u{1b}[0m=198.18.0.1 \u{1b}[3mgeneration\u{1b}[0m\u{1b}[2m=\u{1b}[0m1 \u{1b}[3mlanes\u{1b}[0m\u{1b}[2m=\u{1b}[0m2
 INFO verbs lane released its device lane=2 generation=1
 INFO verbs lane released its device lane=1 generation=1
 INFO verbs device released addr=198.18.0.1 generation=1
 WARN closing every queue: device removed addr=198.18.0.1 queues=2
 INFO verbs device open addr=198.18.0.1 generation=2
 INFO verbs lane released its device lane=1 generation=2
 WARN RDMA device removed addr=198.18.0.1 generation=2 lanes=2
";
        let r = TargetRemoval::parse(log);
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(
            r[0],
            TargetRemoval { generation: 1, lanes: 2, lanes_released: 2, released: true, queues_closed: Some(2) }
        );
        assert!(r[0].complete());
        assert_eq!(
            r[1],
            TargetRemoval { generation: 2, lanes: 2, lanes_released: 1, released: false, queues_closed: None }
        );
        assert!(!r[1].complete());
    }

    #[test]
    fn removal_cycles_parse() {
        let r = Removal::parse("1 0 0.44 0\n2 124 30.1 0\ngarbage\n");
        assert_eq!(r.len(), 2);
        assert!(r[0].ok() && !r[1].ok());
        assert_eq!(r[1].delete_seconds, Some(30.1));
    }
}
