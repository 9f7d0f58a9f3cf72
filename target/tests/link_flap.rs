//! The seed's failure and its relatives, with `nvmf perf --verify` as the host: the target's link goes down
//! for 1 s and comes back for 10 s, 5 times (`NVMF_FLAPS` for more); one of two paths flaps; the target's
//! address is removed and its netdev deleted; the target freezes. Root for the namespace tests (network
//! namespaces joined by veth pairs); under `CI=true` they must run, never skip.
//!
//! Every time: the `nvmf-target` process never dies; its listener repairs itself; perf reconnects, sends again
//! what was lost, and finds every block it wrote intact during the run and in the read-back after it (a write
//! lost with the connection may hold either version until it is sent again); once perf leaves, the target's
//! stats are back to the baseline taken before it came (no controller, queue pair, poller or pool buffer;
//! same threads and file descriptors).

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use support::netns::{Topology, ip, root_or_skip};
use support::process::{PerfRun, TargetProcess, assert_clean};

fn flaps() -> usize {
    std::env::var("NVMF_FLAPS").ok().and_then(|v| v.parse().ok()).unwrap_or(5)
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

/// Root check, the topology, `nvmf-target` on the target's end of every link, and its stats before any host.
fn start(
    test: &str,
    tag: &str,
    subnet_offset: u32,
    links: usize,
) -> Option<(Topology, TargetProcess, serde_json::Value)> {
    if !root_or_skip(test) {
        return None;
    }
    let topo = Topology::new(tag, subnet_offset, links);
    let addrs: Vec<IpAddr> = topo.links.iter().map(|l| IpAddr::V4(l.addrs[0])).collect();
    let target = TargetProcess::start(&topo.exec(0), &addrs, 4791, tag);
    std::thread::sleep(Duration::from_millis(300));
    let baseline = target.stats();
    Some((topo, target, baseline))
}

/// The seed's loop on the target's end of `link`, `times` times: down for 1 s, up for `up`.
fn flap(topo: &Topology, target: &mut TargetProcess, link: usize, times: usize, up: Duration) {
    for flap in 0..times {
        topo.set_target_link(link, false);
        std::thread::sleep(Duration::from_secs(1));
        topo.set_target_link(link, true);
        std::thread::sleep(up);
        assert!(target.alive(), "nvmf-target died in flap {flap}");
        let s = target.stats();
        eprintln!(
            "flap {flap}: listener {}, controllers {}, qpairs {}",
            s["listeners"][link], s["controllers"], s["qpairs"]
        );
    }
}

/// The controller and its admin + 4 I/O queues, per path.
/// Every path's queues are connected and I/O is flowing: perf's setup is over (a fault before that fails perf's
/// first connect, which it does not retry, rather than a connection it repairs).
fn connected(paths: usize) -> impl Fn(&serde_json::Value) -> bool {
    move |s| {
        let io = |c: &serde_json::Value| {
            c["read_commands"].as_u64().unwrap_or(0) + c["write_commands"].as_u64().unwrap_or(0)
        };
        let flowing =
            s["controller_detail"].as_array().is_some_and(|cs| cs.iter().filter(|c| io(c) > 0).count() >= paths);
        s["controllers"] == paths && s["qpairs"] == 5 * paths && flowing
    }
}

/// The seed's loop (`ifdown; sleep 1; ifup; sleep 10`) on the target's only link.
#[test]
fn seed_flap_loop_on_the_target_link() {
    let Some((topo, mut target, baseline)) = start("seed_flap_loop_on_the_target_link", "fl", 0, 1) else { return };
    let target_addr = IpAddr::V4(topo.links[0].addrs[0]);
    let flaps = flaps();
    let runtime = flaps as u64 * 11 + 5;
    let perf = PerfRun::start(&topo.exec(1), &[target_addr], 4791, runtime, 2);
    wait_for(&mut target, "perf connected", Duration::from_secs(10), connected(1));
    flap(&topo, &mut target, 0, flaps, Duration::from_secs(10));
    let report = perf.report(Duration::from_secs(runtime + 120));
    eprintln!(
        "seed loop × {flaps}: {} I/Os ({:.0} IOPS), {} reconnects, longest gap {} ms, verify {}",
        report["ios"],
        report["iops"].as_f64().unwrap_or(0.0),
        report["reconnects"],
        report["longest_gap_ms"],
        report["verify"]
    );
    assert_clean(&report);
    assert!(report["verify"]["checked_blocks"].as_u64().is_some_and(|n| n > 0), "{report}");
    assert!(report["reconnects"].as_u64().is_some_and(|n| n >= 1), "the flaps broke the connection: {report}");
    let end = target.wait_baseline(&baseline, Duration::from_secs(30));
    assert_eq!(end["listeners"][0]["state"], "listening");
    let repairs = end["listeners"][0]["repairs"].as_u64().expect("repairs");
    assert!(repairs >= flaps as u64, "the listener repaired {repairs} times for {flaps} flaps");
    assert!(target.terminate().success());
}

/// Two paths (two links, a listener on each); the first link flaps (down 1 s, up 5 s): I/O moves to the second
/// path at once — never 2 s without a completion — and back to the first once it reconnects. The second path is
/// never disturbed.
#[test]
fn two_paths_one_flapping_keeps_io_going() {
    let Some((topo, mut target, baseline)) = start("two_paths_one_flapping_keeps_io_going", "mp", 40, 2) else {
        return;
    };
    let addrs = [topo.links[0].addrs[0], topo.links[1].addrs[0]].map(IpAddr::V4);
    let flaps = 3;
    let runtime = flaps as u64 * 6 + 6;
    let perf = PerfRun::start(&topo.exec(1), &addrs, 4791, runtime, 2);
    wait_for(&mut target, "both paths connected", Duration::from_secs(10), connected(2));
    flap(&topo, &mut target, 0, flaps, Duration::from_secs(5));
    let report = perf.report(Duration::from_secs(runtime + 120));
    eprintln!(
        "two paths, {flaps} flaps of the first: {} I/Os, longest gap {} ms, paths {}",
        report["ios"], report["longest_gap_ms"], report["paths"]
    );
    assert_clean(&report);
    let gap = report["longest_gap_ms"].as_u64().expect("gap");
    assert!(gap <= 2000, "I/O stopped for {gap} ms although the second path was up: {report}");
    let paths = report["paths"].as_array().expect("paths");
    assert!(paths.iter().all(|p| p["completions"].as_u64().is_some_and(|n| n > 0)), "{paths:?}");
    assert!(paths[0]["reconnects"].as_u64().is_some_and(|n| n >= 1), "the flapping path reconnected: {paths:?}");
    assert_eq!(paths[1]["reconnects"], 0, "flapping the first link must not touch the second path: {paths:?}");
    target.wait_baseline(&baseline, Duration::from_secs(30));
    assert!(target.terminate().success());
}

/// The other two ways a port goes away: its address is removed (ADDR_CHANGE) and its netdev is deleted
/// (DEVICE_REMOVAL). Each time the target closes the port's queues and repairs the listener — waiting for the
/// address, or reopening the device once the netdev is back — and perf gets back in. Interrupted at the end,
/// perf reads everything back.
#[test]
fn listener_repairs_after_address_loss_and_device_removal() {
    let test = "listener_repairs_after_address_loss_and_device_removal";
    let Some((topo, mut target, baseline)) = start(test, "rp", 125, 1) else { return };
    let target_addr = IpAddr::V4(topo.links[0].addrs[0]);
    let perf = PerfRun::start(&topo.exec(1), &[target_addr], 4791, 600, 2);
    let back = |s: &serde_json::Value| connected(1)(s) && s["listeners"][0]["state"] == "listening";
    wait_for(&mut target, "perf connected", Duration::from_secs(10), back);

    let (ns, veth) = (&topo.ns[0], &topo.links[0].veth[0]);
    let cidr = format!("{}/24", topo.links[0].addrs[0]);
    ip(&["-n", ns, "addr", "del", &cidr, "dev", veth]);
    wait_for(&mut target, "address-gone repair", Duration::from_secs(10), |s| {
        s["listeners"][0]["state"] == "repairing-address-gone" && s["qpairs"] == 0
    });
    ip(&["-n", ns, "addr", "add", &cidr, "dev", veth]);
    wait_for(&mut target, "perf back after the address", Duration::from_secs(30), back);
    std::thread::sleep(Duration::from_secs(1));

    ip(&["-n", ns, "link", "del", veth]);
    wait_for(&mut target, "device-gone repair", Duration::from_secs(10), |s| {
        s["listeners"][0]["state"] == "repairing-device-gone" && s["controllers"] == 0
    });
    std::thread::sleep(Duration::from_secs(2));
    topo.wire(0);
    wait_for(&mut target, "perf back on the reopened device", Duration::from_secs(30), back);
    std::thread::sleep(Duration::from_secs(1));

    perf.interrupt();
    let report = perf.report(Duration::from_secs(60));
    eprintln!("address and device loss: {} reconnects, verify {}", report["reconnects"], report["verify"]);
    assert_clean(&report);
    assert!(report["reconnects"].as_u64().is_some_and(|n| n >= 2), "{report}");
    let end = target.wait_baseline(&baseline, Duration::from_secs(30));
    assert_eq!(end["listeners"][0]["repairs"], 2);
    assert!(target.terminate().success());
}

/// A target that stops answering without closing anything (SIGSTOP for 4 s; loopback, no root): no disconnect,
/// no link event — the host learns it from the RC retry limit or its keep-alive timeout (1 s), whichever comes
/// first, tears the association down, and reconnects once the target runs again.
#[test]
fn perf_rides_through_a_frozen_target() {
    use nix::sys::signal::{Signal, kill};
    let addr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5));
    let mut target = TargetProcess::start(&[], &[addr], 4791, "frz");
    let baseline = target.stats();
    let pid = nix::unistd::Pid::from_raw(target.child.id() as i32);
    let perf = PerfRun::start(&[], &[addr], 4791, 14, 1);
    wait_for(&mut target, "perf connected", Duration::from_secs(10), connected(1));
    std::thread::sleep(Duration::from_secs(2));
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    std::thread::sleep(Duration::from_secs(4));
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    let report = perf.report(Duration::from_secs(120));
    eprintln!(
        "frozen 4 s: {} reconnects, longest gap {} ms, {}",
        report["reconnects"], report["longest_gap_ms"], report["verify"]
    );
    assert_clean(&report);
    assert!(report["reconnects"].as_u64().is_some_and(|n| n >= 1), "the freeze broke the connection: {report}");
    assert!(report["longest_gap_ms"].as_u64().is_some_and(|g| g >= 3000), "the freeze shows as a gap: {report}");
    // The target's side of the old association expires by its own keep-alive timer.
    target.wait_baseline(&baseline, Duration::from_secs(30));
    assert!(target.terminate().success());
}
