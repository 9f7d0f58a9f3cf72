//! The kernel scenarios end to end, in real VMs (QEMU, TCG here): `kernel-smoke` must pass fio's verify, and
//! `kernel-flap` with 3 flaps (`TESTBED_FLAPS=10` for the long mode) must show the bond toggling in the VM and
//! end complete — recovered with its time, or stalled with its evidence — within its own time bound.
//!
//! Our stack against the kernel over rxe on a bond: `target-kernel-host` (the kernel host on our target, fio
//! verify), `initiator-kernel-target` (our `nvmf` on nvmet-rdma, perf --verify), and `target-flap` with 3 flaps
//! (`TESTBED_FLAPS` too) on our target's bond, with our host and with the kernel host; `device-removal` (rxe0
//! deleted and added back under our host's I/O). Those need the binaries
//! built with the verbs provider (`--features target/verbs,initiator/verbs`, as scripts/test-all does).
//!
//! The soft provider against the kernel, across a tap (our binaries on the host in the run's namespace, the VM's
//! rxe0 on bond0 over the tap): `soft-target-kernel-host` (the kernel host on our soft target at MTU 1500 and
//! 9000, with several queue options), `soft-initiator-kernel-target` (our soft `nvmf` on nvmet-rdma at both
//! MTUs) and `soft-target-flap` (the seed's loop on the tap and on the VM's bond0 under fio verify); every
//! datagram the tap carried must check with our codecs against its real headers.
//!
//! Needs qemu-system-x86, nvme-cli, fio, kmod and tcpdump on the host (scripts/test-all installs them) and root
//! (the VMs' 9p share of `/`); without them the tests skip with a message, except under `CI=true`, where they
//! must run.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use testbed::image;
use testbed::scenario::{
    Setup, capture, device_removal, flap, kernel_host, kernel_target, smoke, soft_initiator, soft_target,
};
use testbed::vm;

/// At most two single-vCPU VMs at once on two cores: one scenario at a time.
static VMS: Mutex<()> = Mutex::new(());

fn setup(name: &str) -> Option<Setup> {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let mut missing: Vec<&str> = ["qemu-system-x86_64", "nvme", "fio", "depmod", "tcpdump"]
        .into_iter()
        .filter(|t| image::require(t, "").is_err())
        .collect();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root");
    }
    if !missing.is_empty() {
        assert!(!ci, "CI must run {name}: missing {missing:?}");
        eprintln!("SKIP {name}: needs {missing:?}");
        return None;
    }
    let cache = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../build/testbed-cache");
    let image = image::build(&cache).expect("VM image");
    let accel = vm::probe_accel(&image, &cache);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../build/testbed-test-{name}"));
    Some(Setup { image, accel, dir })
}

#[test]
fn kernel_smoke_passes_fio_verify() {
    let _one = VMS.lock().unwrap_or_else(|p| p.into_inner());
    let Some(setup) = setup("kernel-smoke") else { return };
    let r = smoke::run(&setup, Duration::from_secs(600)).expect("scenario ran");
    eprintln!("{}", r.summary());
    assert!(r.discovered.iter().any(|s| s == testbed::scenario::NQN), "{r:#?}");
    assert!(r.connected);
    assert!(r.fio_verify_passed, "{r:#?}");
    assert!(r.passed, "{:?}", r.problems);
    assert!(setup.dir.join("result.json").is_file());
}

#[test]
fn kernel_flap_result_is_complete_within_its_bound() {
    let _one = VMS.lock().unwrap_or_else(|p| p.into_inner());
    let Some(setup) = setup("kernel-flap") else { return };
    let flaps = std::env::var("TESTBED_FLAPS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let r = flap::run(&setup, flaps, flap::Side::Target, Duration::from_secs(45), Duration::from_secs(1200))
        .expect("scenario ran");
    eprintln!("{}", r.summary());
    assert!(r.flaps_toggled(), "every flap must take bond0 down and up, as seen in the VM: {:#?}", r.flaps);
    assert!(r.complete(), "recovered with its time or stalled with its evidence: {r:#?}");
    assert!(r.seconds <= r.time_bound + 5.0, "{} s beyond the bound {}", r.seconds, r.time_bound);
    assert!(setup.dir.join("result.json").is_file());
}

/// The capture's packets are test vectors: every one must decode with our wire codecs and its ICRC verify.
#[test]
fn capture_yields_packets_our_codecs_accept() {
    let _one = VMS.lock().unwrap_or_else(|p| p.into_inner());
    let Some(setup) = setup("capture") else { return };
    let r = capture::run(&setup, Duration::from_secs(600)).expect("scenario ran");
    eprintln!("{}", r.summary());
    assert!(r.passed, "{r:#?}");
    for pcap in [&r.host_pcap, &r.target_pcap] {
        let bytes = std::fs::read(pcap).expect("pcap");
        let datagrams = transport::soft::pcap::read_rocev2(&bytes).expect("pcap parses");
        assert!(datagrams.len() > 100, "{}: {} RoCEv2 datagrams", pcap.display(), datagrams.len());
        for d in &datagrams {
            transport::soft::wire::PacketRepr::parse(&d.payload)
                .unwrap_or_else(|e| panic!("{} #{}: {e}", pcap.display(), d.record));
            transport::soft::wire::icrc::verify(&d.ip, d.udp_src, &d.payload)
                .unwrap_or_else(|e| panic!("{} #{}: ICRC: {e}", pcap.display(), d.record));
        }
    }
}

/// A host process in the run's namespace reaches a VM through its tap NIC: UDP to a VM-side echo, answered.
#[test]
fn tap_attachment_reaches_the_vm() {
    let _one = VMS.lock().unwrap_or_else(|p| p.into_inner());
    let Some(setup) = setup("tap") else { return };
    let script = format!(
        "{}python3 -c \"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('198.18.1.1', 5000)); s.settimeout(120); d, a = s.recvfrom(100); s.sendto(d, a)\"\n",
        testbed::guest::network(1, false, "198.18.1.1", false)
    );
    let spec = vm::VmSpec { name: "tapvm".into(), nics: 1, memory_mib: 512, script };
    let tap = vm::Tap { vm: 0, nic: 0, host_addr: "198.18.1.254/24".into() };
    let mut run = vm::Run::start(&setup.image, setup.accel, &[spec], &[], &[tap], &setup.dir).expect("VM");
    let ns = format!("/var/run/netns/{}", run.netns().expect("a namespace for the tap"));
    let answer = std::thread::spawn(move || {
        let f = std::fs::File::open(&ns).expect("namespace");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let socket = std::net::UdpSocket::bind("198.18.1.254:0").expect("bind on the tap's address");
        socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        let mut buf = [0u8; 100];
        while std::time::Instant::now() < deadline {
            let _ = socket.send_to(b"testbed tap", "198.18.1.1:5000");
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                return Some((buf[..n].to_vec(), from));
            }
        }
        None
    })
    .join()
    .expect("thread");
    let outcomes = run.wait(Duration::from_secs(30));
    let (data, from) = answer.expect("the VM answered through the tap");
    assert_eq!(data, b"testbed tap");
    assert_eq!(from, "198.18.1.1:5000".parse().unwrap());
    assert_eq!(outcomes[0].exit, Some(0), "{outcomes:?}");
}

/// `setup`, for a scenario that runs our binaries on the verbs provider.
fn setup_ours(name: &str) -> Option<Setup> {
    if !transport::verbs::BUILT {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must run {name}: build with --features target/verbs,initiator/verbs"
        );
        eprintln!("SKIP {name}: built without the verbs provider (--features target/verbs,initiator/verbs)");
        return None;
    }
    setup(name)
}

fn flaps() -> u32 {
    std::env::var("TESTBED_FLAPS").ok().and_then(|v| v.parse().ok()).unwrap_or(3)
}

#[test]
fn kernel_host_passes_fio_verify_on_our_target() {
    let _one = VMS.lock().unwrap_or_else(|p| p.into_inner());
    let Some(setup) = setup_ours("target-kernel-host") else { return };
    let r = kernel_host::run(&setup, Duration::from_secs(600)).expect("scenario ran");
    eprintln!("{}", r.summary());
    assert!(r.connected && r.fio_verify_passed && r.disconnected, "{r:#?}");
    assert_eq!(r.subnqn, testbed::scenario::NQN);
    assert!(r.stats.back_to_baseline, "{:?}", r.stats);
    assert!(r.passed, "{:?}", r.problems);
}

#[test]
fn our_initiator_passes_perf_verify_on_the_kernel_target() {
    let _one = VMS.lock().unwrap_or_else(|p| p.into_inner());
    let Some(setup) = setup_ours("initiator-kernel-target") else { return };
    let r = kernel_target::run(&setup, Duration::from_secs(600)).expect("scenario ran");
    eprintln!("{}", r.summary());
    assert_eq!(r.model, "Linux", "id-ctrl read from nvmet");
    assert!(r.final_verified_blocks > 0 && r.verify_errors == Some(0), "{r:#?}");
    assert!(r.passed, "{:?}", r.problems);
}

/// The seed's loop on our target's bond with our host: every flap recovered, nothing lost, the target alive
/// and back at its baseline.
#[test]
fn target_flap_our_host_recovers_every_flap() {
    let _one = VMS.lock().unwrap_or_else(|p| p.into_inner());
    let Some(setup) = setup_ours("target-flap-ours") else { return };
    let r = flap::run_with(
        &setup,
        flap::TargetKind::Ours,
        flap::HostKind::Ours,
        flaps(),
        flap::Side::Target,
        Duration::from_secs(45),
        Duration::from_secs(1200),
    )
    .expect("scenario ran");
    eprintln!("{}", r.summary());
    let perf = r.perf.as_ref().expect("our host's report");
    assert!(perf.reconnects >= 1, "the target's link went down under live queues: {perf:?}");
    assert!(r.passed(), "{r:#?}");
}

/// The seed's loop on our target's bond with the kernel host: our target must survive and come back to its
/// baseline whatever the kernel host does; the result says whether the kernel host recovered.
#[test]
fn target_flap_kernel_host_our_target_survives() {
    let _one = VMS.lock().unwrap_or_else(|p| p.into_inner());
    let Some(setup) = setup_ours("target-flap-kernel") else { return };
    let r = flap::run_with(
        &setup,
        flap::TargetKind::Ours,
        flap::HostKind::Kernel { verify: true },
        flaps(),
        flap::Side::Target,
        Duration::from_secs(45),
        Duration::from_secs(1200),
    )
    .expect("scenario ran");
    eprintln!("{}", r.summary());
    assert!(r.flaps_toggled(), "{:#?}", r.flaps);
    assert!(r.complete(), "recovered with its time or stalled with its evidence: {r:#?}");
    let ours = r.our_target.as_ref().expect("our target's side");
    assert!(ours.alive_at_end && ours.exit == Some(0), "our target died or did not stop cleanly: {ours:#?}");
    assert!(ours.stats.back_to_baseline, "{:?}", ours.stats);
}

/// `rdma link delete rxe0` four times under live I/O and a connection churn, the device back for 0.3 to 5 s in
/// between (removals racing with the target's repair, new connections and completions): every delete completes
/// (our target's worker and every lane let the device go), our target listens on the last device, and our host
/// reconnects with nothing lost.
#[test]
fn device_removal_our_target_lets_go_and_listens_again() {
    let _one = VMS.lock().unwrap_or_else(|p| p.into_inner());
    let Some(setup) = setup_ours("device-removal") else { return };
    let r = device_removal::run(&setup, 4, Duration::from_secs(600)).expect("scenario ran");
    eprintln!("{}", r.summary());
    assert_eq!(r.removals.len(), 4, "{r:#?}");
    assert!(r.removals.iter().all(|c| c.delete_exit == Some(0)), "each delete waits for every user: {r:#?}");
    assert!(r.churn_after_ok && r.churn_ok + r.churn_failed > 0, "{r:#?}");
    assert!(r.target_saw_removal && r.listener_state_after == "listening", "{r:#?}");
    assert!(r.perf.reconnects >= 1 && r.perf.verify_errors == Some(0), "{:?}", r.perf);
    assert!(r.stats.back_to_baseline, "{:?}", r.stats);
    assert!(r.passed, "{:?}", r.problems);
}

/// `testbed bench vm`, short: the kernel host's fio against nvmet-rdma, our verbs target and our soft target in
/// the same VMs; every run moves I/O with its CPU counted, and our target is back at its baseline after each.
/// The figures are reported, not asserted (a benchmark, not a timed test).
#[test]
fn vm_bench_runs_fio_against_nvmet_and_both_our_providers() {
    let _one = VMS.lock().unwrap_or_else(|p| p.into_inner());
    let Some(setup) = setup_ours("bench-vm") else { return };
    let bench = testbed::bench::vm::VmBench { setup, runtime: Duration::from_secs(5), rounds: 1, iodepth: 32 };
    let r = bench.run().expect("bench ran");
    eprintln!("{}", testbed::bench::vm::text(&r));
    for run in &r.runs {
        assert!(run.connected && run.fio_exit == Some(0) && run.ios > 0 && run.mean_latency_us > 0.0, "{run:#?}");
        assert!(run.target_cpu_us_per_io.is_some_and(|c| c > 0.0), "{run:#?}");
        assert!(run.host_cpu_us_per_io.is_some_and(|c| c > 0.0), "{run:#?}");
        assert!(run.target_busy.is_some_and(|b| b > 0.0 && b <= 1.0), "{run:#?}");
        assert!(run.target_clock_coverage.is_some_and(|c| c > 0.5 && c <= 1.05), "{run:#?}");
    }
    for run in r.runs.iter().filter(|run| run.our_target.is_some()) {
        assert!(run.our_target.as_ref().is_some_and(|t| t.clean()), "{run:#?}");
    }
    assert!(r.summary.iter().all(|m| m.runs == 1), "{:#?}", r.summary);
    assert!(r.passed, "{:?}", r.problems);
}

/// The kernel host on our soft target across the tap, at MTU 1500 and 9000: discover, connect (one I/O queue
/// of 32; a read, a write and a poll queue of 128), id-ctrl, fio 4 KiB and 128 KiB writes with crc32c verify
/// (and a polled read-back), disconnect; our target back at its baseline; every datagram checks.
#[test]
fn kernel_host_passes_fio_verify_on_our_soft_target() {
    let _one = VMS.lock().unwrap_or_else(|p| p.into_inner());
    let Some(setup) = setup("soft-target-kernel-host") else { return };
    let r = soft_target::run(&setup, Duration::from_secs(600)).expect("scenario ran");
    eprintln!("{}", r.summary());
    assert_eq!(r.phases.len(), 2);
    for p in &r.phases {
        assert!(p.connected && p.fio_4k.passed && p.fio_128k.passed && p.disconnected, "{p:#?}");
        assert_eq!(p.target_active_mtu, Some(p.phase.path_mtu), "{p:#?}");
    }
    assert!(r.phases[1].fio_polled.is_some_and(|f| f.passed), "{:#?}", r.phases[1]);
    assert!(r.wire.passed() && r.wire.bad_icrc == 0 && r.wire.from_ours > 1000, "{:#?}", r.wire);
    assert!(r.our_target.clean(), "{:#?}", r.our_target);
    assert!(r.passed, "{:?}", r.problems);
}

/// Our soft `nvmf` on the kernel's nvmet-rdma across the tap, at MTU 1500 and 9000: discover, id-ctrl, perf
/// --verify with 0 errors; every datagram checks.
#[test]
fn our_soft_initiator_passes_perf_verify_on_the_kernel_target() {
    let _one = VMS.lock().unwrap_or_else(|p| p.into_inner());
    let Some(setup) = setup("soft-initiator-kernel-target") else { return };
    let r = soft_initiator::run(&setup, Duration::from_secs(600)).expect("scenario ran");
    eprintln!("{}", r.summary());
    assert_eq!(r.phases.len(), 2);
    for p in &r.phases {
        assert_eq!(p.model, "Linux", "id-ctrl read from nvmet");
        assert!(p.perf.exit == Some(0) && p.perf.errors == 0 && p.perf.verify_errors == Some(0), "{p:#?}");
        assert!(p.perf.final_verified_blocks > 0, "{p:#?}");
    }
    assert!(r.wire.passed() && r.wire.largest_rc_payload_ours == 4096, "{:#?}", r.wire);
    assert!(r.passed, "{:?}", r.problems);
}

/// The seed's loop against our soft target with the kernel host running fio verify. On our side of the tap
/// (the target's link, the seed's case): every flap recovered, verify clean, our target back at its baseline.
/// On the VM's bond0 the kernel host can wedge its own connection manager (it does so with the kernel's target
/// too: see the README), so there the result must say what happened — recovered, or stalled with its evidence —
/// and our target must survive and come back to its baseline either way.
#[test]
fn soft_target_flap_our_side_recovers_every_flap_and_our_target_survives_both() {
    let _one = VMS.lock().unwrap_or_else(|p| p.into_inner());
    let Some(base) = setup("soft-target-flap") else { return };
    for (name, side) in [("target", flap::Side::Target), ("initiator", flap::Side::Initiator)] {
        let setup = Setup { dir: base.dir.join(name), ..base.clone() };
        let r = flap::run_with(
            &setup,
            flap::TargetKind::Soft,
            flap::HostKind::Kernel { verify: true },
            flaps(),
            side,
            Duration::from_secs(45),
            Duration::from_secs(1200),
        )
        .expect("scenario ran");
        eprintln!("{}", r.summary());
        assert!(r.flaps_toggled(), "{:#?}", r.flaps);
        assert!(r.complete(), "recovered with its time or stalled with its evidence: {r:#?}");
        let ours = r.our_target.as_ref().expect("our target's side");
        assert!(ours.clean(), "our target died, did not stop cleanly or did not come back: {ours:#?}");
        assert!(r.wire.as_ref().is_some_and(|w| w.passed()), "{:#?}", r.wire);
        if side == flap::Side::Target || r.outcome == flap::Outcome::Recovered {
            assert!(r.passed(), "{r:#?}");
        }
    }
}

/// The kernel host's REQ retransmitted after our REP was lost: our CM (fed by a bare socket in the run's
/// namespace, its REPs dropped) takes it for the same attempt — one connect request in all — and answers it
/// with a stale-connection REJ of the REQ, which the kernel must act on at once ("Connect rejected: status 10")
/// instead of retransmitting until its own retries run out.
#[test]
fn kernel_host_retransmitted_req_after_our_rep_timed_out_is_rejected_as_stale() {
    use std::time::Instant;
    use transport::soft::cm::{AcceptParams, Cm, CmConfig, CmEvent};
    use transport::soft::wire::mad::{self, CmMessage};
    use transport::soft::wire::{IpHeader, PacketRepr, icrc};

    let _one = VMS.lock().unwrap_or_else(|p| p.into_inner());
    let Some(setup) = setup("stale-req") else { return };
    let host = "198.18.1.1";
    let script = format!(
        "{}touch $T/ready\nstart=$(now)\nnvme connect -t rdma -a 198.18.1.254 -s 4420 -n {} --hostnqn {} > $T/connect.out 2>&1\necho $? > $T/connect.exit\necho \"$start $(now)\" > $T/connect.times\ndmesg > $T/host.dmesg\n",
        testbed::guest::network_with(1, &[0], Some(host), true),
        testbed::scenario::NQN,
        testbed::scenario::HOSTNQN
    );
    let spec = vm::VmSpec { name: "host".into(), nics: 1, memory_mib: 1024, script };
    let tap = vm::Tap { vm: 0, nic: 0, host_addr: "198.18.1.254/24".into() };
    let mut run = vm::Run::start(&setup.image, setup.accel, &[spec], &[], &[tap], &setup.dir).expect("VM");
    let ns = format!("/var/run/netns/{}", run.netns().expect("a namespace for the tap"));
    let (requests, rejects, answered) = std::thread::spawn(move || {
        let f = std::fs::File::open(&ns).expect("namespace");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let ours: std::net::Ipv4Addr = "198.18.1.254".parse().unwrap();
        let socket = transport::soft::device::bind_udp("198.18.1.254:4791".parse().unwrap()).expect("bind");
        socket.set_nonblocking(false).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        // Our REPs are lost until the attempt is given up on; then what our CM answers goes out.
        let mut cm = Cm::new(CmConfig {
            response_timeout: Duration::from_millis(200),
            max_retries: 3,
            node_guid: 0x0200_00ff_fe12_0001,
            ..CmConfig::default()
        });
        cm.listen(4420, 4).unwrap();
        let (mut requests, mut rejects, mut answered) = (0, Vec::new(), false);
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(150);
        while Instant::now() < deadline && !answered {
            let now = Instant::now();
            if let Ok((n, from)) = socket.recv_from(&mut buf)
                && let Ok((p, _)) = PacketRepr::parse(&buf[..n])
                && p.bth.dest_qp == 1
            {
                cm.handle_mad(now, from.ip(), ours.into(), p.payload);
            }
            if cm.poll_timeout().is_some_and(|t| t <= now) {
                cm.handle_timeout(now);
            }
            while let Some(event) = cm.poll_event() {
                if let CmEvent::ConnectRequest { conn, .. } = event {
                    requests += 1;
                    let accept = AcceptParams {
                        local_qpn: 0x99,
                        start_psn: 1,
                        responder_resources: 16,
                        initiator_depth: 16,
                        rnr_retry_count: 7,
                        private_data: vec![0; 32], // the REP is lost anyway
                    };
                    cm.accept(now, conn, accept).unwrap();
                }
            }
            while let Some((dst, bytes)) = cm.poll_transmit() {
                let Ok((_, CmMessage::Rej(rej))) = CmMessage::parse(&bytes) else { continue }; // lost REPs
                rejects.push((rej.reason, rej.message_rejected));
                if cm.stale_attempts() == 0 || rej.reason != mad::reject_reason::STALE_CONNECTION {
                    continue; // the REP's own timeout REJ: lost too
                }
                let mut out = Vec::new();
                PacketRepr::cm_mad(0, &bytes).emit(&mut out).unwrap();
                let port = socket.local_addr().unwrap().port();
                let std::net::IpAddr::V4(dst4) = dst else { panic!("IPv4") };
                let ip = IpHeader::ipv4(ours, dst4, 0, (8 + out.len() + 4) as u16);
                icrc::append(&ip, port, &mut out).unwrap();
                socket.send_to(&out, std::net::SocketAddr::new(dst, 4791)).unwrap();
                answered = true;
            }
        }
        (requests, rejects, answered)
    })
    .join()
    .expect("CM thread");
    let outcomes = run.wait(Duration::from_secs(120));
    let exit = run.read("connect.exit").and_then(|t| t.trim().parse::<i32>().ok());
    let times: Vec<f64> =
        run.read("connect.times").unwrap_or_default().split_whitespace().filter_map(|t| t.parse().ok()).collect();
    let dmesg = run.read("host.dmesg").unwrap_or_default();
    eprintln!("requests {requests}, rejects {rejects:?}, connect exit {exit:?}, times {times:?}");
    assert_eq!(requests, 1, "the retransmitted REQ is the same attempt");
    assert!(answered, "the retransmitted REQ got a stale-connection REJ: {rejects:?}");
    assert!(exit.is_some_and(|e| e != 0), "the kernel's connect failed: {outcomes:?}");
    assert!(dmesg.contains("Connect rejected: status 10"), "the kernel acted on the REJ:\n{dmesg}");
    // Rejected at its first retransmission, not after its own retries (16 × 4.3 s).
    assert!(times.len() == 2 && times[1] - times[0] < 30.0, "{times:?}");
}
