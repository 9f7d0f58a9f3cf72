//! `target-kernel-host`: our `nvmf-target` (verbs provider, rxe0 on bond0) in one VM; in the other, the stock
//! kernel's NVMe/RDMA host: `nvme discover`, `nvme connect -t rdma`, `nvme id-ctrl`, an fio random write with
//! crc32c verify, `nvme disconnect`. Then the target must be back at its baseline and stop cleanly.

use std::time::Duration;

use serde::Serialize;

use super::ours::{self, StatsCheck};
use super::{HOSTNQN, NQN, ScenarioError, Setup, TARGET_ADDR, two_bonded_hosts, write_json};
use crate::vm::{Accel, Run, VmOutcome};

#[derive(Debug, Clone, Serialize)]
pub struct KernelHostResult {
    pub scenario: &'static str,
    pub kernel: String,
    pub accel: Accel,
    pub passed: bool,
    pub seconds: f64,
    pub discovered: Vec<String>,
    pub connected: bool,
    /// id-ctrl as the kernel host read it: model, subsystem NQN, controller id.
    pub model: String,
    pub subnqn: String,
    pub cntlid: Option<u64>,
    pub fio_exit: Option<i32>,
    pub fio_verify_passed: bool,
    pub fio_write_iops: f64,
    pub fio_verified_bytes: u64,
    pub disconnected: bool,
    pub target_alive_at_end: bool,
    pub target_exit: Option<i32>,
    pub stats: StatsCheck,
    pub target_log_problems: Vec<String>,
    pub vms: Vec<VmOutcome>,
    pub problems: Vec<String>,
}

impl KernelHostResult {
    pub fn summary(&self) -> String {
        format!(
            "target-kernel-host: {}\n  kernel {} under {:?}, {:.0} s\n  discover: {:?}\n  connect: {}, id-ctrl: model {:?} cntlid {:?}\n  fio randwrite 4k + crc32c verify: exit {:?}, {:.0} write IOPS, {} bytes verified\n  disconnect: {}; our target alive {}, exit {:?}; stats back to baseline: {} {:?}\n{}",
            if self.passed { "PASSED" } else { "FAILED" },
            self.kernel,
            self.accel,
            self.seconds,
            self.discovered,
            if self.connected { "ok" } else { "failed" },
            self.model,
            self.cntlid,
            self.fio_exit,
            self.fio_write_iops,
            self.fio_verified_bytes,
            if self.disconnected { "ok" } else { "failed" },
            self.target_alive_at_end,
            self.target_exit,
            self.stats.back_to_baseline,
            self.stats.differing,
            self.problems.iter().map(|p| format!("  problem: {p}\n")).collect::<String>()
        )
    }
}

pub fn run(setup: &Setup, timeout: Duration) -> Result<KernelHostResult, ScenarioError> {
    let files = ours::files(&["nvmf-target"])?;
    let bin = ours::in_vm("nvmf-target");
    let secs = timeout.as_secs();
    let target = format!(
        "{}touch $T/target-ready\nwait_file $T/host-done {secs} || log 'the host never finished'\n{}dmesg > $T/target.dmesg\n",
        ours::start_target(&bin, TARGET_ADDR),
        ours::stop_target(),
    );
    let host = format!(
        r#"wait_file $T/target-ready {secs} || {{ log "target not ready"; exit 3; }}
nvme discover -t rdma -a {TARGET_ADDR} -s 4420 --hostnqn {HOSTNQN} -o json > $T/discover.json
echo $? > $T/discover.exit
nvme connect -t rdma -a {TARGET_ADDR} -s 4420 -n {NQN} --hostnqn {HOSTNQN}
echo $? > $T/connect.exit
n=0; until [ -b /dev/nvme0n1 ]; do sleep 0.2; n=$((n+1)); [ $n -gt 150 ] && break; done
[ -b /dev/nvme0n1 ] || {{ log "no /dev/nvme0n1"; nvme list; dmesg > $T/host.dmesg; touch $T/host-done; exit 5; }}
nvme id-ctrl /dev/nvme0 -o json > $T/id-ctrl.json
fio --name=verify --filename=/dev/nvme0n1 --rw=randwrite --bs=4k --size=16m --ioengine=libaio --iodepth=8 \
    --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=json --output=$T/fio.json
echo $? > $T/fio.exit
nvme disconnect -n {NQN} > $T/disconnect.out 2>&1
echo $? > $T/disconnect.exit
dmesg > $T/host.dmesg
touch $T/host-done
"#
    );
    let (vms, cables) = two_bonded_hosts(target, host);
    let mut vm_run = Run::start_with_files(&setup.image, setup.accel, &vms, &cables, &[], &setup.dir, &files)?;
    let outcomes = vm_run.wait(timeout);
    let seconds = vm_run.elapsed().as_secs_f64();
    let mut problems = Vec::new();
    let discovered = super::discovered_nqns(vm_run.read("discover.json"));
    if !discovered.iter().any(|s| s == NQN) {
        problems.push(format!("discovery did not list {NQN}"));
    }
    let connected = vm_run.read("connect.exit").is_some_and(|t| t.trim() == "0");
    if !connected {
        problems.push("nvme connect failed".into());
    }
    let id: Option<serde_json::Value> = vm_run.read("id-ctrl.json").and_then(|t| serde_json::from_str(&t).ok());
    let field = |k: &str| id.as_ref().and_then(|v| v[k].as_str()).unwrap_or_default().trim().to_string();
    let (model, subnqn) = (field("mn"), field("subnqn"));
    let cntlid = id.as_ref().and_then(|v| v["cntlid"].as_u64());
    if subnqn != NQN {
        problems.push(format!("id-ctrl subnqn {subnqn:?}, expected {NQN}"));
    }
    let super::FioVerify {
        exit: fio_exit,
        write_iops: fio_write_iops,
        verified_bytes: fio_verified_bytes,
        passed: fio_verify_passed,
    } = super::FioVerify::read(&vm_run, 16 << 20);
    if !fio_verify_passed {
        problems.push(format!("fio verify did not pass (exit {fio_exit:?}, {fio_verified_bytes} bytes read back)"));
    }
    let disconnected = vm_run.read("disconnect.exit").is_some_and(|t| t.trim() == "0");
    if !disconnected {
        problems.push("nvme disconnect failed".into());
    }
    let target_alive_at_end = vm_run.read("nvmf-target.alive").is_some_and(|t| t.trim() == "yes");
    let target_exit = vm_run.read("nvmf-target.exit").and_then(|t| t.trim().parse().ok());
    if !target_alive_at_end || target_exit != Some(0) {
        problems.push(format!("our target: alive at the end {target_alive_at_end}, exit {target_exit:?}"));
    }
    let stats = StatsCheck::from_texts(vm_run.read("stats.before"), vm_run.read("stats.after"));
    if !stats.back_to_baseline {
        problems.push(format!("target stats not back to baseline: {:?}", stats.differing));
    }
    let target_log_problems = ours::log_problems(&vm_run.read("nvmf-target.log").unwrap_or_default());
    problems.extend(super::vm_problems(&outcomes, timeout));
    let result = KernelHostResult {
        scenario: "target-kernel-host",
        kernel: setup.image.version.clone(),
        accel: setup.accel,
        passed: problems.is_empty(),
        seconds,
        discovered,
        connected,
        model,
        subnqn,
        cntlid,
        fio_exit,
        fio_verify_passed,
        fio_write_iops,
        fio_verified_bytes,
        disconnected,
        target_alive_at_end,
        target_exit,
        stats,
        target_log_problems,
        vms: outcomes,
        problems,
    };
    write_json(&setup.dir, "result.json", &result)?;
    Ok(result)
}
