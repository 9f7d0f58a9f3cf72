//! `kernel-smoke`: two VMs with bond0 + rxe0; the kernel target (nvmet-rdma on a RAM file) in one, and from
//! the other `nvme discover`, `nvme connect -t rdma` and an fio random write with crc32c verify.

use std::time::Duration;

use serde::Serialize;

use super::{HOSTNQN, NQN, ScenarioError, Setup, TARGET_ADDR, nvmet_target_setup, two_bonded_hosts, write_json};
use crate::vm::{Accel, Run, VmOutcome};

#[derive(Debug, Clone, Serialize)]
pub struct SmokeResult {
    pub scenario: &'static str,
    pub kernel: String,
    pub accel: Accel,
    pub passed: bool,
    pub seconds: f64,
    pub discovered: Vec<String>,
    pub connected: bool,
    pub fio_exit: Option<i32>,
    pub fio_verify_passed: bool,
    pub fio_write_iops: f64,
    pub fio_verified_bytes: u64,
    pub vms: Vec<VmOutcome>,
    pub problems: Vec<String>,
}

impl SmokeResult {
    pub fn summary(&self) -> String {
        let boots: Vec<String> = self
            .vms
            .iter()
            .map(|v| format!("{} {}", v.name, v.boot_seconds.map_or("—".into(), |s| format!("{s:.1} s"))))
            .collect();
        format!(
            "kernel-smoke: {}\n  kernel {} under {:?}, {:.0} s in all; boot to userspace: {}\n  discover: {:?}\n  connect: {}\n  fio randwrite 4k + crc32c verify: exit {:?}, {:.0} write IOPS, {} bytes verified\n{}",
            if self.passed { "PASSED" } else { "FAILED" },
            self.kernel,
            self.accel,
            self.seconds,
            boots.join(", "),
            self.discovered,
            if self.connected { "ok" } else { "failed" },
            self.fio_exit,
            self.fio_write_iops,
            self.fio_verified_bytes,
            self.problems.iter().map(|p| format!("  problem: {p}\n")).collect::<String>()
        )
    }
}

pub fn run(setup: &Setup, timeout: Duration) -> Result<SmokeResult, ScenarioError> {
    let target = format!(
        "{}touch $T/target-ready\nwait_file $T/host-done {} || log 'the host never finished'\ndmesg > $T/target.dmesg\n",
        nvmet_target_setup(TARGET_ADDR),
        timeout.as_secs()
    );
    let host = format!(
        r#"wait_file $T/target-ready {secs} || {{ log "target not ready"; exit 3; }}
nvme discover -t rdma -a {TARGET_ADDR} -s 4420 --hostnqn {HOSTNQN} -o json > $T/discover.json
echo $? > $T/discover.exit
nvme connect -t rdma -a {TARGET_ADDR} -s 4420 -n {NQN} --hostnqn {HOSTNQN}
echo $? > $T/connect.exit
n=0; until [ -b /dev/nvme0n1 ]; do sleep 0.2; n=$((n+1)); [ $n -gt 150 ] && break; done
[ -b /dev/nvme0n1 ] || {{ log "no /dev/nvme0n1"; nvme list; touch $T/host-done; exit 5; }}
fio --name=smoke --filename=/dev/nvme0n1 --rw=randwrite --bs=4k --size=16m --ioengine=libaio --iodepth=8 \
    --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=json --output=$T/fio.json
echo $? > $T/fio.exit
nvme disconnect -n {NQN}
dmesg > $T/host.dmesg
touch $T/host-done
"#,
        secs = timeout.as_secs()
    );
    let (vms, cables) = two_bonded_hosts(target, host);
    let mut vm_run = Run::start(&setup.image, setup.accel, &vms, &cables, &[], &setup.dir)?;
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
    let super::FioVerify {
        exit: fio_exit,
        write_iops: fio_write_iops,
        verified_bytes: fio_verified_bytes,
        passed: fio_verify_passed,
    } = super::FioVerify::read(&vm_run, 16 << 20);
    if !fio_verify_passed {
        problems.push(format!("fio verify did not pass (exit {fio_exit:?}, {fio_verified_bytes} bytes read back)"));
    }
    problems.extend(super::vm_problems(&outcomes, timeout));
    let result = SmokeResult {
        scenario: "kernel-smoke",
        kernel: setup.image.version.clone(),
        accel: setup.accel,
        passed: problems.is_empty(),
        seconds,
        discovered,
        connected,
        fio_exit,
        fio_verify_passed,
        fio_write_iops,
        fio_verified_bytes,
        vms: outcomes,
        problems,
    };
    write_json(&setup.dir, "result.json", &result)?;
    Ok(result)
}
