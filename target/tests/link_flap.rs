//! The seed's failure, reproduced: the target's link goes down for 1 s and comes back for 10 s, 5 times (set
//! `NVMF_FLAPS` for more), while a host process runs verified I/O and reconnects. Root only (network
//! namespaces joined by a veth pair); under `CI=true` it must run, never skip.
//!
//! The `nvmf-target` process must never die; its listener must repair itself after every flap; once the host
//! disconnects, its stats must be back to the baseline taken before the host came (no controller, queue pair,
//! poller or pool buffer; same threads and file descriptors); and every write the host saw acknowledged must
//! read back identical at the end (a write in flight when the link died may hold either version).

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use support::netns::{Topology, ip, root_or_skip};
use support::process::{HostJob, TargetProcess, child_host_main, read_report, spawn_host};

/// The host process of the flap test; not a test of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the host process of seed_flap_loop_on_the_target_link; runs only as its child"]
async fn child_host() {
    child_host_main().await;
}

/// What both tests start with: the topology, `nvmf-target` in the first namespace (its stats baseline taken
/// before any host), and the verifying host process in the second, told to stop when `stop` appears.
struct Run {
    topo: Topology,
    target: TargetProcess,
    baseline: serde_json::Value,
    stop: std::path::PathBuf,
    host: std::process::Child,
    lines: support::process::Lines,
}

impl Run {
    /// `None` (after saying why) when not root; under CI=true that is a failure.
    fn start(test: &str, tag: &str, subnet_offset: u32) -> Option<Run> {
        if !root_or_skip(test) {
            return None;
        }
        let topo = Topology::new(tag, subnet_offset, 1);
        let target_ns = topo.exec(0);
        let host_ns = topo.exec(1);
        let target = TargetProcess::start(&target_ns, &[IpAddr::V4(topo.links[0].addrs[0])], 4791, tag);
        std::thread::sleep(Duration::from_millis(300));
        let baseline = target.stats();
        let stop = std::env::temp_dir().join(format!("nvmf-{tag}-stop-{}", std::process::id()));
        let _ = std::fs::remove_file(&stop);
        let job = HostJob {
            target: SocketAddr::new(IpAddr::V4(topo.links[0].addrs[0]), 4791),
            local: IpAddr::V4(topo.links[0].addrs[1]),
            stop_file: Some(stop.clone()),
            fresh: true,
        };
        let (host, lines) = spawn_host("child_host", &host_ns, &job);
        Some(Run { topo, target, baseline, stop, host, lines })
    }
}

#[test]
fn seed_flap_loop_on_the_target_link() {
    let Some(Run { topo, mut target, baseline, stop, mut host, lines }) =
        Run::start("seed_flap_loop_on_the_target_link", "fl", 0)
    else {
        return;
    };
    let flaps: usize = std::env::var("NVMF_FLAPS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(target.stats()["controllers"], 1, "the host is connected before the first flap");

    let started = Instant::now();
    for flap in 0..flaps {
        // The seed's loop: ifdown; sleep 1; ifup; sleep 10.
        topo.set_target_link(0, false);
        std::thread::sleep(Duration::from_secs(1));
        topo.set_target_link(0, true);
        std::thread::sleep(Duration::from_secs(10));
        assert!(target.alive(), "nvmf-target died in flap {flap}");
        let s = target.stats();
        eprintln!(
            "flap {flap}: listener {} (repairs {}), controllers {}, qpairs {}",
            s["listeners"][0]["state"], s["listeners"][0]["repairs"], s["controllers"], s["qpairs"]
        );
    }
    let flapping = started.elapsed();

    std::fs::write(&stop, b"stop").expect("stop file");
    let report = read_report(&lines, Duration::from_secs(120));
    let status = host.wait().expect("host exit");
    let _ = std::fs::remove_file(&stop);
    eprintln!("after {flaps} flaps in {flapping:?}: {report:?}");
    assert!(status.success(), "host process: {status:?}");
    assert_eq!(report.mismatches, 0, "acknowledged writes must read back identical");
    assert!(report.acknowledged_writes > 0 && report.verified_reads > 0, "{report:?}");
    assert!(report.reconnects >= 1, "the flaps must have broken the host's connection: {report:?}");
    assert_eq!(report.final_blocks_checked, 8 * 2048);

    let end = target.wait_baseline(&baseline, Duration::from_secs(30));
    assert_eq!(end["listeners"][0]["state"], "listening");
    let repairs = end["listeners"][0]["repairs"].as_u64().expect("repairs");
    assert!(repairs >= flaps as u64, "the listener repaired {repairs} times for {flaps} flaps");
    let status = target.terminate();
    assert!(status.success(), "nvmf-target exit status {status:?}");
}

fn wait_for(target: &mut TargetProcess, what: &str, within: Duration, ok: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        assert!(target.alive(), "nvmf-target died waiting for {what}");
        let s = target.stats();
        if ok(&s) {
            eprintln!("{what}: {}", s["listeners"][0]);
            return;
        }
        assert!(Instant::now() < deadline, "no {what} within {within:?}: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The other two ways a port goes away: its address is removed (ADDR_CHANGE) and its netdev is deleted
/// (DEVICE_REMOVAL). Each time the target closes the port's queues and repairs the listener — waiting for the
/// address, or reopening the device once the netdev is back — and the host gets back in; its acknowledged
/// writes are all there at the end.
#[test]
fn listener_repairs_after_address_loss_and_device_removal() {
    let Some(Run { topo, mut target, baseline, stop, mut host, lines }) =
        Run::start("listener_repairs_after_address_loss_and_device_removal", "rp", 125)
    else {
        return;
    };
    // Fully back: the controller and its admin + 4 I/O queues.
    let connected =
        |s: &serde_json::Value| s["controllers"] == 1 && s["qpairs"] == 5 && s["listeners"][0]["state"] == "listening";
    wait_for(&mut target, "host connected", Duration::from_secs(10), connected);

    let target_addr = format!("{}/24", topo.links[0].addrs[0]);
    ip(&["-n", &topo.ns[0], "addr", "del", &target_addr, "dev", &topo.links[0].veth[0]]);
    wait_for(&mut target, "address-gone repair", Duration::from_secs(10), |s| {
        s["listeners"][0]["state"] == "repairing-address-gone" && s["qpairs"] == 0
    });
    ip(&["-n", &topo.ns[0], "addr", "add", &target_addr, "dev", &topo.links[0].veth[0]]);
    wait_for(&mut target, "host back after the address", Duration::from_secs(30), connected);
    std::thread::sleep(Duration::from_secs(1));

    ip(&["-n", &topo.ns[0], "link", "del", &topo.links[0].veth[0]]);
    wait_for(&mut target, "device-gone repair", Duration::from_secs(10), |s| {
        s["listeners"][0]["state"] == "repairing-device-gone" && s["controllers"] == 0
    });
    std::thread::sleep(Duration::from_secs(2));
    topo.wire(0);
    wait_for(&mut target, "host back on the reopened device", Duration::from_secs(30), connected);
    std::thread::sleep(Duration::from_secs(1));

    std::fs::write(&stop, b"stop").expect("stop file");
    let report = read_report(&lines, Duration::from_secs(60));
    let status = host.wait().expect("host exit");
    let _ = std::fs::remove_file(&stop);
    eprintln!("{report:?}");
    assert!(status.success(), "host process: {status:?}");
    assert_eq!(report.mismatches, 0);
    assert!(report.reconnects >= 2, "{report:?}");
    let end = target.wait_baseline(&baseline, Duration::from_secs(30));
    assert_eq!(end["listeners"][0]["repairs"], 2);
    let status = target.terminate();
    assert!(status.success(), "nvmf-target exit status {status:?}");
}
