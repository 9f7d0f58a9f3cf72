//! `soft-target-kernel-host`: our `nvmf-target` on the **soft** provider, on the host (inside the run's
//! namespace, on the tap's address), serving the stock kernel host in a VM whose rxe0 sits on bond0 over that
//! tap — the kernel's rxe is the only other RDMA implementation in play. In phases, each a fresh connection:
//! netdev MTU 1500 (path MTU 1024) with one I/O queue of 32, then 9000 (4096) with a read, a write and a poll
//! queue of 128 each: `nvme discover`, `nvme connect -t rdma`, `nvme id-ctrl`, fio 4 KiB random writes and
//! 128 KiB sequential writes with crc32c verify (and a polled read-back on the poll queue), `nvme disconnect`.
//! Our target's view is read while each phase is connected; at the end its stats must be back at the baseline
//! and SIGINT must stop it with exit 0. Everything on the tap is captured and checked with our codecs.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::flap::OurTarget;
use super::tap_side::{self, HOST_SIDE_ADDR, HostTarget, TapSide, WireCheck};
use super::{FioVerify, HOSTNQN, NQN, ScenarioError, Setup, write_json};
use crate::vm::{Accel, Run, VmOutcome};

/// One connection of the kernel host: the netdev MTU on both ends of the tap and `nvme connect`'s options.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub netdev_mtu: u32,
    /// The path MTU rxe and our target derive from it.
    pub path_mtu: u64,
    pub nr_io_queues: u32,
    pub nr_write_queues: u32,
    pub nr_poll_queues: u32,
    pub queue_size: u32,
}

impl Phase {
    fn connect_options(&self) -> String {
        let mut o = format!("--nr-io-queues={} --queue-size={}", self.nr_io_queues, self.queue_size);
        if self.nr_write_queues > 0 {
            o.push_str(&format!(" --nr-write-queues={}", self.nr_write_queues));
        }
        if self.nr_poll_queues > 0 {
            o.push_str(&format!(" --nr-poll-queues={}", self.nr_poll_queues));
        }
        o
    }

    /// I/O queues the kernel host creates (each kind at most one per CPU; the VM has one).
    fn io_queues(&self) -> u64 {
        u64::from(self.nr_io_queues.min(1) + self.nr_write_queues.min(1) + self.nr_poll_queues.min(1))
    }
}

/// MTU 1500 with the defaults a user starts from; jumbo frames with every kind of queue, as deep as our
/// target allows (its default MQES + 1 is 128).
pub const PHASES: [Phase; 2] = [
    Phase {
        name: "mtu1500",
        netdev_mtu: 1500,
        path_mtu: 1024,
        nr_io_queues: 1,
        nr_write_queues: 0,
        nr_poll_queues: 0,
        queue_size: 32,
    },
    Phase {
        name: "mtu9000",
        netdev_mtu: 9000,
        path_mtu: 4096,
        nr_io_queues: 1,
        nr_write_queues: 1,
        nr_poll_queues: 1,
        queue_size: 128,
    },
];

#[derive(Debug, Clone, Serialize)]
pub struct PhaseResult {
    pub phase: Phase,
    pub discovered: Vec<String>,
    pub connected: bool,
    /// As the kernel host's sysfs says: queues (admin included) and their size (0's based).
    pub queue_count: Option<u64>,
    pub sqsize: Option<u64>,
    pub model: String,
    pub subnqn: String,
    pub fio_4k: FioVerify,
    pub fio_128k: FioVerify,
    /// Polled reads of the 4 KiB data on the poll queue, verified (phases with a poll queue).
    pub fio_polled: Option<FioVerify>,
    /// Our target while the phase was connected: the controller's I/O queues and commands, and the path MTU
    /// its listener's device gives new connections.
    pub target_io_queues: Option<u64>,
    pub target_reads: Option<u64>,
    pub target_writes: Option<u64>,
    pub target_active_mtu: Option<u64>,
    /// Lanes of our listener's device (one per poll group) and the datagrams that reached them directly: the
    /// kernel's traffic, steered to the poll groups' threads.
    pub target_lanes: Option<u64>,
    pub target_lane_packets: Option<u64>,
    /// GSO buffers our target's lanes sent (each several datagrams the kernel cut, rxe checked the ICRC of
    /// each) and GRO buffers they took.
    pub target_gso_sends: Option<u64>,
    pub target_gro_receives: Option<u64>,
    pub disconnected: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoftTargetResult {
    pub scenario: &'static str,
    pub kernel: String,
    pub accel: Accel,
    pub passed: bool,
    pub seconds: f64,
    pub phases: Vec<PhaseResult>,
    pub our_target: OurTarget,
    /// Our listener's node GUID (from the tap's MAC, as rxe would derive it).
    pub node_guid: String,
    pub wire: WireCheck,
    pub vms: Vec<VmOutcome>,
    pub problems: Vec<String>,
}

impl SoftTargetResult {
    pub fn summary(&self) -> String {
        let mut s = format!(
            "soft-target-kernel-host: {}\n  kernel {} under {:?}, {:.0} s; our target (soft provider) on the host, node GUID {}\n",
            if self.passed { "PASSED" } else { "FAILED" },
            self.kernel,
            self.accel,
            self.seconds,
            self.node_guid
        );
        for p in &self.phases {
            let fio = |f: &FioVerify| {
                format!("exit {:?}, {:.0} write IOPS, {} B verified", f.exit, f.write_iops, f.verified_bytes)
            };
            s.push_str(&format!(
                "  {} (nvme connect {}): discover {:?}, connect {}, queues {:?} of {:?}+1, id-ctrl {:?}\n    fio 4k randwrite+verify {}; 128k write+verify {}{}\n    our target: {:?} I/O queues, {:?} reads, {:?} writes, path MTU {:?}, {:?} lanes took {:?} datagrams (GSO buffers sent {:?}, GRO buffers taken {:?}); disconnect {}\n",
                p.phase.name,
                p.phase.connect_options(),
                p.discovered,
                p.connected,
                p.queue_count,
                p.sqsize,
                p.model,
                fio(&p.fio_4k),
                fio(&p.fio_128k),
                p.fio_polled.as_ref().map(|f| format!("; polled read-back {}", fio(f))).unwrap_or_default(),
                p.target_io_queues,
                p.target_reads,
                p.target_writes,
                p.target_active_mtu,
                p.target_lanes,
                p.target_lane_packets,
                p.target_gso_sends,
                p.target_gro_receives,
                p.disconnected
            ));
        }
        let t = &self.our_target;
        s.push_str(&format!(
            "  our target: alive at the end {}, exit {:?}, stats back to baseline {} {:?}\n  {}\n",
            t.alive_at_end,
            t.exit,
            t.stats.back_to_baseline,
            t.stats.differing,
            self.wire.summary()
        ));
        for p in &self.problems {
            s.push_str(&format!("  problem: {p}\n"));
        }
        s
    }
}

/// The kernel host's script: every phase in turn, asking the host side to set its MTU where it changes.
fn host_script(secs: u64) -> String {
    let mut s = format!(
        r#"wait_file $T/target-ready {secs} || {{ log "target not ready"; exit 3; }}
phase() {{
    p=$1; shift
    nvme discover -t rdma -a {HOST_SIDE_ADDR} -s 4420 --hostnqn {HOSTNQN} -o json > $T/$p.discover.json 2> $T/$p.discover.err
    nvme connect -t rdma -a {HOST_SIDE_ADDR} -s 4420 -n {NQN} --hostnqn {HOSTNQN} "$@" > $T/$p.connect.out 2>&1
    echo $? > $T/$p.connect.exit
    n=0; until [ -b /dev/nvme0n1 ]; do sleep 0.2; n=$((n+1)); [ $n -gt 150 ] && break; done
    [ -b /dev/nvme0n1 ] || {{ log "$p: no /dev/nvme0n1"; touch $T/$p.connected; return 1; }}
    cat /sys/class/nvme/nvme0/queue_count > $T/$p.queue_count
    cat /sys/class/nvme/nvme0/sqsize > $T/$p.sqsize
    nvme id-ctrl /dev/nvme0 -o json > $T/$p.id-ctrl.json
    w4k="--name=w4k --filename=/dev/nvme0n1 --rw=randwrite --bs=4k --size=8m --direct=1 --verify=crc32c --verify_fatal=1"
    fio $w4k --ioengine=libaio --iodepth=8 --do_verify=1 --output-format=json --output=$T/$p.fio-4k.json
    echo $? > $T/$p.fio-4k.exit
    fio --name=w128k --filename=/dev/nvme0n1 --rw=write --bs=128k --offset=64m --size=16m --direct=1 \
        --verify=crc32c --verify_fatal=1 --ioengine=libaio --iodepth=4 --do_verify=1 \
        --output-format=json --output=$T/$p.fio-128k.json
    echo $? > $T/$p.fio-128k.exit
    if [ -n "${{POLLED:-}}" ]; then
        # The same 4 KiB blocks read back through the poll queue (polled I/O) and checked again.
        fio $w4k --ioengine=pvsync2 --hipri=1 --verify_only --output-format=json --output=$T/$p.fio-polled.json
        echo $? > $T/$p.fio-polled.exit
    fi
    touch $T/$p.connected
    wait_file $T/$p.stats-taken 30 || log "$p: our target's stats were not taken"
    nvme disconnect -n {NQN} > $T/$p.disconnect.out 2>&1
    echo $? > $T/$p.disconnect.exit
    n=0; while [ -e /dev/nvme0 ]; do sleep 0.2; n=$((n+1)); [ $n -gt 50 ] && break; done
}}
"#
    );
    let mut mtu = 1500;
    for p in PHASES {
        if p.netdev_mtu != mtu {
            mtu = p.netdev_mtu;
            s.push_str(&format!(
                "ip link set bond0 mtu {mtu}\ntouch $T/{name}.mtu-request\nwait_file $T/{name}.mtu-done 60 || {{ log 'the host side did not set its MTU'; exit 4; }}\n",
                name = p.name
            ));
        }
        let polled = if p.nr_poll_queues > 0 { "POLLED=1 " } else { "" };
        s.push_str(&format!("{polled}phase {} {}\n", p.name, p.connect_options()));
    }
    s.push_str(&tap_side::host_done());
    s
}

/// Our listener's node GUID and path MTU from a stats snapshot.
fn listener_view(stats: &serde_json::Value) -> (String, Option<u64>) {
    let l = &stats["listeners"][0];
    (l["node_guid"].as_str().unwrap_or_default().to_string(), l["active_mtu"].as_u64())
}

pub fn run(setup: &Setup, timeout: Duration) -> Result<SoftTargetResult, ScenarioError> {
    let started = Instant::now();
    let vm = tap_side::tap_vm("host", host_script(timeout.as_secs()));
    let mut vm_run = Run::start(&setup.image, setup.accel, &[vm], &[], &[tap_side::tap()], &setup.dir)?;
    let side = TapSide::of(&vm_run)?;
    let expected_guid = side.mac().map(transport::soft::cm::node_guid_of_mac).unwrap_or(0);
    let capture = side.capture(&setup.dir.join("tap.pcap"))?;
    let target = HostTarget::start(
        &side,
        &setup.dir,
        &["-a", HOST_SIDE_ADDR, "-n", NQN, "--ram-size", "256M", "--poll-groups", "2"],
    )?;
    let before = target.stats();
    let (node_guid, _) = listener_view(&target.stats_json());
    vm_run.touch("target-ready");

    // Serve the VM's requests (MTU changes, stats while connected) until its host is done.
    let mut snapshots: Vec<Option<serde_json::Value>> = vec![None; PHASES.len()];
    let mut mtu_set = vec![false; PHASES.len()];
    let mut problems = Vec::new();
    while started.elapsed() < timeout && !vm_run.finished() && vm_run.read("host-done").is_none() {
        for (i, p) in PHASES.iter().enumerate() {
            if !mtu_set[i] && vm_run.read(&format!("{}.mtu-request", p.name)).is_some() {
                mtu_set[i] = true;
                side.set_mtu(p.netdev_mtu)?;
                // Our device follows the netdev's MTU: wait until new connections would get the path MTU.
                let deadline = Instant::now() + Duration::from_secs(10);
                while listener_view(&target.stats_json()).1 != Some(p.path_mtu) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                }
                vm_run.touch(&format!("{}.mtu-done", p.name));
            }
            if snapshots[i].is_none() && vm_run.read(&format!("{}.connected", p.name)).is_some() {
                snapshots[i] = Some(target.stats_json());
                vm_run.touch(&format!("{}.stats-taken", p.name));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let our_target = target.stop(before);
    let wire = capture.stop(HOST_SIDE_ADDR.parse().expect("address"), expected_guid, &PHASES.map(|p| p.path_mtu));
    vm_run.touch(tap_side::RELEASED);
    let outcomes = vm_run.wait(Duration::from_secs(30));

    let mut phases = Vec::new();
    for (p, snapshot) in PHASES.iter().zip(snapshots) {
        let file = |what: &str| vm_run.read(&format!("{}.{what}", p.name));
        let number = |what: &str| file(what).and_then(|t| t.trim().parse::<u64>().ok());
        let id: Option<serde_json::Value> = file("id-ctrl.json").and_then(|t| serde_json::from_str(&t).ok());
        let field = |k: &str| id.as_ref().and_then(|v| v[k].as_str()).unwrap_or_default().trim().to_string();
        let snapshot = snapshot.unwrap_or_default();
        let controller = snapshot["controller_detail"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["subnqn"] == NQN))
            .cloned()
            .unwrap_or_default();
        let fio = |name: &str, bytes| FioVerify::read_named(&vm_run, &format!("{}.{name}", p.name), bytes);
        let r = PhaseResult {
            phase: *p,
            discovered: super::discovered_nqns(file("discover.json")),
            connected: number("connect.exit") == Some(0),
            queue_count: number("queue_count"),
            sqsize: number("sqsize"),
            model: field("mn"),
            subnqn: field("subnqn"),
            fio_4k: fio("fio-4k", 8 << 20),
            fio_128k: fio("fio-128k", 16 << 20),
            fio_polled: (p.nr_poll_queues > 0).then(|| fio("fio-polled", 8 << 20)),
            target_io_queues: controller["io_queues"].as_u64(),
            target_reads: controller["read_commands"].as_u64(),
            target_writes: controller["write_commands"].as_u64(),
            target_active_mtu: listener_view(&snapshot).1,
            target_lanes: snapshot["listeners"][0]["lanes"].as_u64(),
            target_lane_packets: snapshot["listeners"][0]["lane_packets_received"].as_u64(),
            target_gso_sends: snapshot["listeners"][0]["lane_gso_sends"].as_u64(),
            target_gro_receives: snapshot["listeners"][0]["lane_gro_receives"].as_u64(),
            disconnected: number("disconnect.exit") == Some(0),
        };
        let mut wrong = Vec::new();
        if !r.discovered.iter().any(|s| s == NQN) {
            wrong.push(format!("discovery listed {:?}", r.discovered));
        }
        if !r.connected || !r.disconnected {
            wrong.push(format!("connect {} / disconnect {}", r.connected, r.disconnected));
        }
        if r.queue_count != Some(p.io_queues() + 1) || r.sqsize != Some(u64::from(p.queue_size) - 1) {
            wrong.push(format!(
                "queues {:?} of {:?}+1 (want {} of {})",
                r.queue_count,
                r.sqsize,
                p.io_queues() + 1,
                p.queue_size
            ));
        }
        if r.subnqn != NQN || r.model != "nvmf-target" {
            wrong.push(format!("id-ctrl model {:?} subnqn {:?}", r.model, r.subnqn));
        }
        for (what, f) in [("4k", Some(&r.fio_4k)), ("128k", Some(&r.fio_128k)), ("polled", r.fio_polled.as_ref())] {
            if let Some(f) = f.filter(|f| !f.passed) {
                wrong.push(format!("fio {what}: exit {:?}, {} bytes verified", f.exit, f.verified_bytes));
            }
        }
        if r.target_io_queues != Some(p.io_queues()) || r.target_active_mtu != Some(p.path_mtu) {
            wrong.push(format!(
                "our target saw {:?} I/O queues and path MTU {:?} (want {} and {})",
                r.target_io_queues,
                r.target_active_mtu,
                p.io_queues(),
                p.path_mtu
            ));
        }
        if r.target_gso_sends.unwrap_or(0) == 0 {
            wrong.push("our target's lanes sent nothing by GSO (a read's data and response go as one buffer)".into());
        }
        if r.target_lanes != Some(2) || r.target_lane_packets.unwrap_or(0) == 0 {
            wrong.push(format!(
                "our target's device had {:?} lanes for 2 poll groups, {:?} datagrams through them",
                r.target_lanes, r.target_lane_packets
            ));
        }
        problems.extend(wrong.into_iter().map(|w| format!("{}: {w}", p.name)));
        phases.push(r);
    }
    if !our_target.clean() {
        problems.push(format!(
            "our target: alive {}, exit {:?}, back to baseline {} {:?}",
            our_target.alive_at_end, our_target.exit, our_target.stats.back_to_baseline, our_target.stats.differing
        ));
    }
    // The node GUID rxe would give a device on the tap: our device's, in its stats and on the wire.
    if u64::from_str_radix(&node_guid.replace(':', ""), 16).ok() != Some(expected_guid) {
        problems.push(format!("our target's node GUID {node_guid:?}, the tap's MAC gives {expected_guid:#018x}"));
    }
    problems.extend(wire.problems());
    problems.extend(super::vm_problems(&outcomes, timeout));
    let result = SoftTargetResult {
        scenario: "soft-target-kernel-host",
        kernel: setup.image.version.clone(),
        accel: setup.accel,
        passed: problems.is_empty(),
        seconds: started.elapsed().as_secs_f64(),
        phases,
        our_target,
        node_guid,
        wire,
        vms: outcomes,
        problems,
    };
    write_json(&setup.dir, "result.json", &result)?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_host_script_parses() {
        crate::guest::assert_parses(&super::host_script(60));
    }
}
