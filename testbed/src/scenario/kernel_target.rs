//! `initiator-kernel-target`: the stock kernel's NVMe/RDMA target (nvmet-rdma on a RAM file) in one VM; in the
//! other, our `nvmf` on the verbs provider (rxe0 on bond0): `discover`, `id-ctrl`, `perf --verify`.

use std::time::Duration;

use serde::Serialize;

use super::{HOSTNQN, NQN, ScenarioError, Setup, TARGET_ADDR, nvmet_target_setup, ours, two_bonded_hosts, write_json};
use crate::vm::{Accel, Run, VmOutcome};

/// How long `nvmf perf --verify` runs.
pub const PERF_SECONDS: u64 = 15;

#[derive(Debug, Clone, Serialize)]
pub struct KernelTargetResult {
    pub scenario: &'static str,
    pub kernel: String,
    pub accel: Accel,
    pub passed: bool,
    pub seconds: f64,
    pub discovered: Vec<String>,
    pub discover_exit: Option<i32>,
    /// id-ctrl as our host read it from the kernel target: model and subsystem NQN.
    pub model: String,
    pub subnqn: String,
    pub id_ctrl_exit: Option<i32>,
    pub perf_exit: Option<i32>,
    pub perf_iops: f64,
    pub perf_ios: u64,
    pub perf_errors: u64,
    pub verified_blocks: u64,
    pub final_verified_blocks: u64,
    pub verify_errors: Option<u64>,
    /// How perf's keyed data reached the kernel target (our host's verbs pool): in place, copied through a
    /// pool buffer, or by a region registered per command. Zero copies and registrations is the claim.
    pub data_in_place: u64,
    pub data_copied: u64,
    pub data_registered: u64,
    pub target_kernel_errors: Vec<String>,
    pub vms: Vec<VmOutcome>,
    pub problems: Vec<String>,
}

impl KernelTargetResult {
    pub fn summary(&self) -> String {
        format!(
            "initiator-kernel-target: {}\n  kernel {} under {:?}, {:.0} s\n  nvmf discover (exit {:?}): {:?}\n  nvmf id-ctrl (exit {:?}): model {:?}, subnqn {:?}\n  nvmf perf --verify randrw 8k (exit {:?}): {:.0} IOPS, {} I/Os, {} errors; {} blocks checked during, {} at the end, verify errors {:?}\n  keyed data: {} in place, {} copied, {} registered per command\n{}",
            if self.passed { "PASSED" } else { "FAILED" },
            self.kernel,
            self.accel,
            self.seconds,
            self.discover_exit,
            self.discovered,
            self.id_ctrl_exit,
            self.model,
            self.subnqn,
            self.perf_exit,
            self.perf_iops,
            self.perf_ios,
            self.perf_errors,
            self.verified_blocks,
            self.final_verified_blocks,
            self.verify_errors,
            self.data_in_place,
            self.data_copied,
            self.data_registered,
            self.problems.iter().map(|p| format!("  problem: {p}\n")).collect::<String>()
        )
    }
}

pub fn run(setup: &Setup, timeout: Duration) -> Result<KernelTargetResult, ScenarioError> {
    let files = ours::files(&["nvmf"])?;
    let nvmf = ours::in_vm("nvmf");
    let secs = timeout.as_secs();
    let target = format!(
        "{}touch $T/target-ready\nwait_file $T/host-done {secs} || log 'the host never finished'\ndmesg > $T/target.dmesg\n",
        nvmet_target_setup(TARGET_ADDR),
    );
    let conn = format!("--provider verbs -a {TARGET_ADDR} -s 4420 --hostnqn {HOSTNQN}");
    let host = format!(
        r#"wait_file $T/target-ready {secs} || {{ log "target not ready"; exit 3; }}
export RUST_LOG=warn
{nvmf} discover {conn} -o json > $T/discover.json 2> $T/discover.err
echo $? > $T/discover.exit
{nvmf} id-ctrl {conn} -n {NQN} -o json > $T/id-ctrl.json 2> $T/id-ctrl.err
echo $? > $T/id-ctrl.exit
{nvmf} perf {conn} -n {NQN} -w randrw --bs 8k -q 16 --size 64m --runtime {PERF_SECONDS} --verify -o json \
    > $T/perf.json 2> $T/perf.err
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
    let mut problems = Vec::new();
    let exit = |name: &str| vm_run.read(name).and_then(|t| t.trim().parse::<i32>().ok());
    let json = |name: &str| vm_run.read(name).and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    let discover_exit = exit("discover.exit");
    let discovered = super::discovered_nqns(vm_run.read("discover.json"));
    if discover_exit != Some(0) || !discovered.iter().any(|s| s == NQN) {
        problems.push(format!("nvmf discover: exit {discover_exit:?}, records {discovered:?}"));
    }
    let id_ctrl_exit = exit("id-ctrl.exit");
    let id = json("id-ctrl.json");
    let field = |k: &str| id.as_ref().and_then(|v| v[k].as_str()).unwrap_or_default().trim().to_string();
    let (model, subnqn) = (field("mn"), field("subnqn"));
    if id_ctrl_exit != Some(0) || subnqn != NQN || model != "Linux" {
        problems.push(format!("nvmf id-ctrl: exit {id_ctrl_exit:?}, model {model:?}, subnqn {subnqn:?}"));
    }
    let perf_exit = exit("perf.exit");
    let perf = json("perf.json").unwrap_or_default();
    let verify_errors = perf["verify"]["errors"].as_u64();
    let moves = &perf["paths"][0]["data_moves"];
    let moved = |k: &str| moves[k].as_u64().unwrap_or(0);
    let result = KernelTargetResult {
        scenario: "initiator-kernel-target",
        kernel: setup.image.version.clone(),
        accel: setup.accel,
        passed: false,
        seconds,
        discovered,
        discover_exit,
        model,
        subnqn,
        id_ctrl_exit,
        perf_exit,
        perf_iops: perf["iops"].as_f64().unwrap_or(0.0),
        perf_ios: perf["ios"].as_u64().unwrap_or(0),
        perf_errors: perf["errors"].as_u64().unwrap_or(0),
        verified_blocks: perf["verify"]["checked_blocks"].as_u64().unwrap_or(0),
        final_verified_blocks: perf["verify"]["final_checked_blocks"].as_u64().unwrap_or(0),
        verify_errors,
        data_in_place: moved("in_place"),
        data_copied: moved("copied"),
        data_registered: moved("registered"),
        target_kernel_errors: super::flap::kernel_errors(&vm_run.read("target.dmesg").unwrap_or_default()),
        vms: outcomes,
        problems: Vec::new(),
    };
    if perf_exit != Some(0) || verify_errors != Some(0) || result.perf_errors > 0 || result.final_verified_blocks == 0 {
        problems.push(format!(
            "nvmf perf --verify: exit {perf_exit:?}, {} errors, verify errors {verify_errors:?}, {} blocks read back ({})",
            result.perf_errors,
            result.final_verified_blocks,
            vm_run.read("perf.err").unwrap_or_default().lines().last().unwrap_or_default()
        ));
    }
    // Every keyed transfer of the run (8 KiB: reads and writes, both past the capsule) in place: the queue's pool lent
    // the buffer and the kernel target reached it with the arena's key.
    if perf_exit == Some(0) && (result.data_in_place == 0 || result.data_copied > 0 || result.data_registered > 0) {
        problems.push(format!(
            "keyed data not all in place: {} in place, {} copied, {} registered per command ({moves})",
            result.data_in_place, result.data_copied, result.data_registered
        ));
    }
    problems.extend(super::vm_problems(&result.vms, timeout));
    let result = KernelTargetResult { passed: problems.is_empty(), problems, ..result };
    write_json(&setup.dir, "result.json", &result)?;
    Ok(result)
}
