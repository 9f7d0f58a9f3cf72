//! The kernel scenarios end to end, in real VMs (QEMU, TCG here): `kernel-smoke` must pass fio's verify, and
//! `kernel-flap` with 3 flaps (`TESTBED_FLAPS=10` for the long mode) must show the bond toggling in the VM and
//! end complete — recovered with its time, or stalled with its evidence — within its own time bound.
//!
//! Needs qemu-system-x86, nvme-cli, fio and kmod on the host (scripts/test-all installs them) and root (the VMs'
//! 9p share of `/`); without them the tests skip with a message, except under `CI=true`, where they must run.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use testbed::image;
use testbed::scenario::{Setup, capture, flap, smoke};
use testbed::vm;

/// At most two single-vCPU VMs at once on two cores: one scenario at a time.
static VMS: Mutex<()> = Mutex::new(());

fn setup(name: &str) -> Option<Setup> {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let mut missing: Vec<&str> = ["qemu-system-x86_64", "nvme", "fio", "depmod"]
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
