//! `device-removal`: while our `nvmf perf --verify` runs against our `nvmf-target` (verbs provider, rxe0 on
//! bond0), the target VM deletes its RDMA device (`rdma link delete rxe0`) and adds it back. Our target must
//! survive, let the device go (the kernel waits for every user before the delete returns), listen again on the
//! new rxe0, and the host must reconnect with nothing lost.

use std::time::Duration;

use serde::Serialize;

use super::ours::{self, StatsCheck};
use super::{HOSTNQN, NQN, ScenarioError, Setup, TARGET_ADDR, two_bonded_hosts, write_json};
use crate::vm::{Accel, Run, VmOutcome};

const RUNTIME: u64 = 60;

#[derive(Debug, Clone, Serialize)]
pub struct DeviceRemovalResult {
    pub scenario: &'static str,
    pub kernel: String,
    pub accel: Accel,
    pub passed: bool,
    pub seconds: f64,
    /// `rdma link delete rxe0`: its exit code and how long it took (it returns once every user let go).
    pub delete_exit: Option<i32>,
    pub delete_seconds: Option<f64>,
    pub add_exit: Option<i32>,
    /// What our target said about it.
    pub target_saw_removal: bool,
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
            "device-removal: {}\n  kernel {} under {:?}, {:.0} s\n  rdma link delete rxe0: exit {:?} after {:?} s; add back: exit {:?}\n  our target: saw the removal {}, listener repairs {:?}, state after {:?}, alive at the end {}, exit {:?}, stats back to baseline {} {:?}\n  our host: exit {:?}, {} I/Os, {} errors, {} reconnects, longest gap {} ms, verify errors {:?}, {} blocks read back\n{}",
            if self.passed { "PASSED" } else { "FAILED" },
            self.kernel,
            self.accel,
            self.seconds,
            self.delete_exit,
            self.delete_seconds,
            self.add_exit,
            self.target_saw_removal,
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
}

pub fn run(setup: &Setup, timeout: Duration) -> Result<DeviceRemovalResult, ScenarioError> {
    let files = ours::files(&["nvmf-target", "nvmf"])?;
    let (bin, nvmf) = (ours::in_vm("nvmf-target"), ours::in_vm("nvmf"));
    let secs = timeout.as_secs();
    let target = format!(
        r#"{start}touch $T/target-ready
wait_file $T/io-started {secs} || exit 6
sleep 5
t0=$(now)
rdma link delete rxe0 &
dpid=$!
n=0; while kill -0 $dpid 2>/dev/null && [ $n -lt 60 ]; do sleep 0.5; n=$((n+1)); done
if kill -0 $dpid 2>/dev/null; then
    # Still waiting for a user of the device to let go: say who holds it.
    ls -l /proc/$tpid/fd > $T/delete.fds 2>&1
    cat /proc/$dpid/stack > $T/delete.stack 2>&1
    log "rdma link delete rxe0 still waiting after 30 s"
    echo 124 > $T/delete.exit
else
    wait $dpid; echo $? > $T/delete.exit
fi
echo "$(now) $t0" | awk '{{print $1 - $2}}' > $T/delete.seconds
log "rxe0 deleted"
sleep 3
rdma link add rxe0 type rxe netdev bond0; echo $? > $T/add.exit
log "rxe0 added back"
touch $T/device-back
wait_file $T/host-done {secs} || log 'the host never finished'
{stop}dmesg > $T/target.dmesg
"#,
        start = ours::start_target(&bin, TARGET_ADDR),
        stop = ours::stop_target(),
    );
    let host = format!(
        r#"wait_file $T/target-ready {secs} || {{ log "target not ready"; exit 3; }}
RUST_LOG=info {nvmf} perf --provider verbs -a {TARGET_ADDR} -s 4420 -n {NQN} --hostnqn {HOSTNQN} \
    --reconnect-delay 2 --ctrl-loss-tmo 60 -w randrw --bs 4k -q 8 --size 64m --runtime {RUNTIME} --verify \
    --status-interval 1 -o json > $T/perf.json 2> $T/perf.err &
perf_pid=$!
n=0; until grep -q 'ios [1-9]' $T/perf.err 2>/dev/null; do sleep 0.5; n=$((n+1)); [ $n -gt 120 ] && break; done
touch $T/io-started
wait $perf_pid
echo $? > $T/perf.exit
dmesg > $T/host.dmesg
touch $T/host-done
"#,
        nvmf = nvmf.display()
    );
    let (vms, cables) = two_bonded_hosts(target, host);
    let mut vm_run = Run::start_with_files(&setup.image, setup.accel, &vms, &cables, &[], &setup.dir, &files)?;
    let outcomes = vm_run.wait(timeout);
    let seconds = vm_run.elapsed().as_secs_f64();
    let num = |name: &str| vm_run.read(name).and_then(|t| t.trim().parse::<f64>().ok());
    let exit = |name: &str| vm_run.read(name).and_then(|t| t.trim().parse::<i32>().ok());
    let perf = super::flap::PerfSummary::read(&vm_run);
    let log = vm_run.read("nvmf-target.log").unwrap_or_default();
    let after: Option<serde_json::Value> = vm_run.read("stats.after").and_then(|t| serde_json::from_str(t.trim()).ok());
    let listener = after.as_ref().map(|a| a["listeners"][0].clone()).unwrap_or_default();
    let mut result = DeviceRemovalResult {
        scenario: "device-removal",
        kernel: setup.image.version.clone(),
        accel: setup.accel,
        passed: false,
        seconds,
        delete_exit: exit("delete.exit"),
        delete_seconds: num("delete.seconds"),
        add_exit: exit("add.exit"),
        target_saw_removal: log.contains("RDMA device removed"),
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
    if result.delete_exit != Some(0) || result.add_exit != Some(0) {
        problems.push(format!("rdma link delete/add: exit {:?}/{:?}", result.delete_exit, result.add_exit));
    }
    if !result.target_saw_removal {
        problems.push("our target did not report the device's removal".into());
    }
    if result.listener_repairs.unwrap_or(0) < 1 || result.listener_state_after != "listening" {
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
