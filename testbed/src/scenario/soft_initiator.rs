//! `soft-initiator-kernel-target`: the stock kernel's NVMe/RDMA target (nvmet-rdma on a RAM file) in a VM whose
//! rxe0 sits on bond0 over a tap; our `nvmf` on the **soft** provider on the host (inside the run's namespace,
//! on the tap's address). In phases: netdev MTU 1500 (path MTU 1024), `nvmf discover`, `nvmf id-ctrl`, `nvmf
//! perf --verify` 4 KiB random reads and writes on one I/O queue; then 9000 (4096) on both ends of the tap,
//! the same with 64 KiB I/Os on two I/O queues. Everything on the tap is captured and checked with our codecs.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::flap::PerfSummary;
use super::tap_side::{self, HOST_SIDE_ADDR, TapSide, VM_ADDR, WireCheck};
use super::{HOSTNQN, NQN, ScenarioError, Setup, nvmet_target_setup, write_json};
use crate::vm::{Accel, Run, VmOutcome};

/// One round of our host against the kernel target.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub netdev_mtu: u32,
    pub path_mtu: u64,
    /// `-i` and `-Q` (the controller's I/O queues and their size), perf's `--io-queues`, `-q` and `--bs`.
    pub nr_io_queues: u32,
    pub queue_size: u32,
    pub io_queues: u32,
    pub iodepth: u32,
    pub block_size: &'static str,
}

pub const PHASES: [Phase; 2] = [
    Phase {
        name: "mtu1500",
        netdev_mtu: 1500,
        path_mtu: 1024,
        nr_io_queues: 1,
        queue_size: 32,
        io_queues: 1,
        iodepth: 16,
        block_size: "4k",
    },
    Phase {
        name: "mtu9000",
        netdev_mtu: 9000,
        path_mtu: 4096,
        nr_io_queues: 2,
        queue_size: 64,
        io_queues: 2,
        iodepth: 16,
        block_size: "64k",
    },
];

/// How long each `nvmf perf --verify` runs.
pub const PERF_SECONDS: u64 = 5;

#[derive(Debug, Clone, Serialize)]
pub struct PhaseResult {
    pub phase: Phase,
    pub discover_exit: Option<i32>,
    pub discovered: Vec<String>,
    pub id_ctrl_exit: Option<i32>,
    pub model: String,
    pub subnqn: String,
    pub perf: PerfSummary,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoftInitiatorResult {
    pub scenario: &'static str,
    pub kernel: String,
    pub accel: Accel,
    pub passed: bool,
    pub seconds: f64,
    pub phases: Vec<PhaseResult>,
    pub wire: WireCheck,
    pub target_kernel_errors: Vec<String>,
    pub vms: Vec<VmOutcome>,
    pub problems: Vec<String>,
}

impl SoftInitiatorResult {
    pub fn summary(&self) -> String {
        let mut s = format!(
            "soft-initiator-kernel-target: {}\n  kernel {} under {:?}, {:.0} s; our nvmf (soft provider) on the host, nvmet-rdma in the VM\n",
            if self.passed { "PASSED" } else { "FAILED" },
            self.kernel,
            self.accel,
            self.seconds
        );
        for r in &self.phases {
            let (p, f) = (&r.phase, &r.perf);
            s.push_str(&format!(
                "  {} (-i {} -Q {}): discover exit {:?} {:?}; id-ctrl exit {:?} model {:?}\n    perf --verify randrw {} --io-queues {} -q {}: exit {:?}, {:.0} IOPS, {} I/Os, {} errors, verify errors {:?}, {} blocks read back\n",
                p.name,
                p.nr_io_queues,
                p.queue_size,
                r.discover_exit,
                r.discovered,
                r.id_ctrl_exit,
                r.model,
                p.block_size,
                p.io_queues,
                p.iodepth,
                f.exit,
                f.iops,
                f.ios,
                f.errors,
                f.verify_errors,
                f.final_verified_blocks
            ));
        }
        s.push_str(&format!("  {}\n", self.wire.summary()));
        for p in &self.problems {
            s.push_str(&format!("  problem: {p}\n"));
        }
        s
    }
}

/// The kernel target's script: nvmet on the tap's bond, its MTU changed when the host side asks.
fn target_script(secs: u64) -> String {
    let mut s = format!("{}touch $T/target-ready\n", nvmet_target_setup(VM_ADDR));
    let mut mtu = 1500;
    for p in PHASES.iter().filter(|p| p.netdev_mtu != 1500) {
        if p.netdev_mtu != mtu {
            mtu = p.netdev_mtu;
            s.push_str(&format!(
                "wait_file $T/{name}.mtu-request {secs} && ip link set bond0 mtu {mtu} && touch $T/{name}.mtu-done\n",
                name = p.name
            ));
        }
    }
    s.push_str(&format!("wait_file $T/host-done {secs} || log 'the host never finished'\ndmesg > $T/target.dmesg\n"));
    s
}

pub fn run(setup: &Setup, timeout: Duration) -> Result<SoftInitiatorResult, ScenarioError> {
    let started = Instant::now();
    let nvmf = super::ours::host_binary("nvmf")?;
    let vm = tap_side::tap_vm("target", target_script(timeout.as_secs()));
    let mut vm_run = Run::start(&setup.image, setup.accel, &[vm], &[], &[tap_side::tap()], &setup.dir)?;
    let side = TapSide::of(&vm_run)?;
    let expected_guid = side.mac().map(transport::soft::cm::node_guid_of_mac).unwrap_or(0);
    let capture = side.capture(&setup.dir.join("tap.pcap"))?;
    let mut problems = Vec::new();
    let ready = Instant::now() + timeout.saturating_sub(Duration::from_secs(60));
    while vm_run.read("target-ready").is_none() && Instant::now() < ready && !vm_run.finished() {
        std::thread::sleep(Duration::from_millis(200));
    }
    let conn = |p: &Phase| -> Vec<String> {
        [
            "-a",
            tap_side::VM_ADDR,
            "-s",
            "4420",
            "--hostnqn",
            HOSTNQN,
            "-i",
            &p.nr_io_queues.to_string(),
            "-Q",
            &p.queue_size.to_string(),
            "-o",
            "json",
        ]
        .map(String::from)
        .to_vec()
    };
    let mut phases = Vec::new();
    let step = Duration::from_secs(60);
    for p in PHASES {
        if vm_run.read("target-ready").is_none() {
            problems.push("the kernel target never became ready".into());
            break;
        }
        if p.netdev_mtu != 1500 {
            side.set_mtu(p.netdev_mtu)?;
            vm_run.touch(&format!("{}.mtu-request", p.name));
            let deadline = Instant::now() + step;
            while vm_run.read(&format!("{}.mtu-done", p.name)).is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let name = |what: &str| format!("{}.{what}", p.name);
        let dir = &setup.dir;
        let discover_exit =
            side.run(dir, &name("discover"), &nvmf, &[vec!["discover".into()], conn(&p)].concat(), step);
        let id_args = [vec!["id-ctrl".into()], conn(&p), vec!["-n".into(), NQN.into()]].concat();
        let id_ctrl_exit = side.run(dir, &name("id-ctrl"), &nvmf, &id_args, step);
        let perf_args = [
            vec!["perf".into()],
            conn(&p),
            [
                "-n",
                NQN,
                "-w",
                "randrw",
                "--bs",
                p.block_size,
                "-q",
                &p.iodepth.to_string(),
                "--io-queues",
                &p.io_queues.to_string(),
                "--size",
                "64m",
                "--runtime",
                &PERF_SECONDS.to_string(),
                "--verify",
            ]
            .map(String::from)
            .to_vec(),
        ]
        .concat();
        let perf_exit = side.run(dir, &name("perf"), &nvmf, &perf_args, step + Duration::from_secs(PERF_SECONDS));
        let read = |what: &str| std::fs::read_to_string(dir.join(name(what))).ok();
        let id: Option<serde_json::Value> = read("id-ctrl.out").and_then(|t| serde_json::from_str(&t).ok());
        let field = |k: &str| id.as_ref().and_then(|v| v[k].as_str()).unwrap_or_default().trim().to_string();
        let r = PhaseResult {
            phase: p,
            discover_exit,
            discovered: super::discovered_nqns(read("discover.out")),
            id_ctrl_exit,
            model: field("mn"),
            subnqn: field("subnqn"),
            perf: PerfSummary::of(read("perf.out"), perf_exit),
        };
        if r.discover_exit != Some(0) || !r.discovered.iter().any(|s| s == NQN) {
            problems.push(format!("{}: nvmf discover exit {:?}, records {:?}", p.name, r.discover_exit, r.discovered));
        }
        if r.id_ctrl_exit != Some(0) || r.model != "Linux" || r.subnqn != NQN {
            problems.push(format!("{}: nvmf id-ctrl exit {:?}, model {:?}", p.name, r.id_ctrl_exit, r.model));
        }
        let f = &r.perf;
        if f.exit != Some(0) || f.errors > 0 || f.verify_errors != Some(0) || f.final_verified_blocks == 0 {
            let err = read("perf.err").unwrap_or_default();
            problems.push(format!(
                "{}: nvmf perf --verify exit {:?}, {} errors, verify errors {:?}, {} blocks read back ({})",
                p.name,
                f.exit,
                f.errors,
                f.verify_errors,
                f.final_verified_blocks,
                err.lines().last().unwrap_or_default()
            ));
        }
        phases.push(r);
    }
    let wire = capture.stop(HOST_SIDE_ADDR.parse().expect("address"), expected_guid, &PHASES.map(|p| p.path_mtu));
    vm_run.touch("host-done");
    let outcomes = vm_run.wait(Duration::from_secs(60));
    problems.extend(wire.problems());
    problems.extend(super::vm_problems(&outcomes, timeout));
    let result = SoftInitiatorResult {
        scenario: "soft-initiator-kernel-target",
        kernel: setup.image.version.clone(),
        accel: setup.accel,
        passed: problems.is_empty(),
        seconds: started.elapsed().as_secs_f64(),
        phases,
        wire,
        target_kernel_errors: super::flap::kernel_errors(&vm_run.read("target.dmesg").unwrap_or_default()),
        vms: outcomes,
        problems,
    };
    write_json(&setup.dir, "result.json", &result)?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_target_script_parses() {
        crate::guest::assert_parses(&super::target_script(60));
    }
}
