//! `soft-target-flap`: the seed's loop — down, 1 s, up, 10 s, N times — against our `nvmf-target` on the
//! **soft** provider (on the host side of a tap) while the stock kernel host in the VM runs fio random writes
//! with crc32c verify. `--side target` flaps our side: the tap goes down and up, the target's link, as in the
//! seed. `--side initiator` flaps the kernel's: the VM's bond0 over the tap. Every flap must be recovered
//! from, fio's verify must pass, our target must come back to its baseline and stop cleanly, and everything
//! the tap carried must check with our codecs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::flap::{self, FlapResult, FlapRun, HostKind, Side, TargetKind};
use super::tap_side::{self, HOST_SIDE_ADDR, HostTarget, RELEASED, TapCapture, TapSide};
use super::{NQN, ScenarioError, Setup, write_json};
use crate::vm::Run;

pub fn run(
    setup: &Setup,
    host: HostKind,
    flaps: u32,
    side: Side,
    stall: Duration,
    timeout: Duration,
) -> Result<FlapResult, ScenarioError> {
    let HostKind::Kernel { verify } = host else {
        return Err(ScenarioError::Missing("soft-target-flap: the kernel host drives the I/O".into()));
    };
    let (runtime, time_bound) = flap::timing(flaps, host, stall, timeout);
    // The VM holds its NIC (the tap goes with QEMU) until our target on the host side has been checked.
    let hold = tap_side::hold_until_released();
    let mut script = String::new();
    if side == Side::Initiator {
        script.push_str(&format!("( {} ) &\n", flap::flap_loop(flaps).replace('\n', "\n  ")));
    }
    script.push_str(&flap::host_script_holding(HOST_SIDE_ADDR, runtime, verify, &hold));
    let vm = tap_side::tap_vm("host", script);
    let mut vm_run = Run::start(&setup.image, setup.accel, &[vm], &[], &[tap_side::tap()], &setup.dir)?;
    let tap = TapSide::of(&vm_run)?;
    let expected_guid = tap.mac().map(transport::soft::cm::node_guid_of_mac).unwrap_or(0);
    let capture = Arc::new(Mutex::new(tap.capture(&setup.dir.join("tap.pcap"))?));
    let target = HostTarget::start(
        &tap,
        &setup.dir,
        &["-a", HOST_SIDE_ADDR, "-n", NQN, "--ram-size", "256M", "--poll-groups", "2"],
    )?;
    let before = target.stats();
    vm_run.touch("target-ready");
    let started = Instant::now();

    // Our side flaps from a thread of its own, writing the `flaps` lines the watcher reads.
    let stop = Arc::new(AtomicBool::new(false));
    let flapper = (side == Side::Target).then(|| {
        let (tap, capture, stop, dir) = (tap.clone(), capture.clone(), stop.clone(), setup.dir.clone());
        std::thread::spawn(move || flap_our_side(&tap, &capture, &stop, &dir, flaps))
    });
    let watched = flap::watch(&mut vm_run, stall, time_bound);
    stop.store(true, Ordering::Relaxed);
    // Our side's link is back up before anything is checked.
    if let Some(handle) = flapper {
        let _ = handle.join();
    }
    // A verifying fio runs to its end after the last flap, then the host says it is done (or it stalled and
    // gave its evidence).
    let deadline = Instant::now() + Duration::from_secs(runtime + 60);
    while vm_run.read("host-done").is_none() && vm_run.read("evidence-done").is_none() && Instant::now() < deadline {
        if vm_run.finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let our_target = target.stop(before);
    // The flapper is joined: the capture has one owner again (were it not, the run has no wire check: an
    // empty one, which does not pass).
    let capture = Arc::try_unwrap(capture).ok().map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()));
    let wire =
        capture.map(|c| c.stop(HOST_SIDE_ADDR.parse().expect("address"), expected_guid, &[1024])).unwrap_or_default();
    vm_run.touch(RELEASED);
    let outcomes = vm_run.wait(Duration::from_secs(30));
    let run = FlapRun { scenario: "soft-target-flap", target: TargetKind::Soft, host, side, flaps, time_bound };
    let mut result = FlapResult::assemble(setup, &run, &vm_run, watched, outcomes, Some(our_target), started.elapsed());
    result.wire = Some(wire);
    write_json(&setup.dir, "result.json", &result)?;
    Ok(result)
}

/// The seed's loop on our side of the tap, once the host's I/O runs; lines in `dir/flaps` as the VM's loop
/// writes them. The capture is restarted after each up (libpcap gives up on an interface that went down).
fn flap_our_side(tap: &TapSide, capture: &Mutex<TapCapture>, stop: &AtomicBool, dir: &Path, flaps: u32) {
    let record = |line: String| {
        let path: PathBuf = dir.join("flaps");
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{line}");
        }
    };
    let sleep = |d: Duration| {
        let end = Instant::now() + d;
        while Instant::now() < end && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while !dir.join("io-started").exists() {
        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for i in 1..=flaps {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let at = Instant::now();
        if let Err(e) = tap.set_link(false) {
            tracing::warn!("flap {i}: {e}");
        }
        record(format!("{i} down {}", tap.link_state()));
        sleep(Duration::from_secs(1).saturating_sub(at.elapsed()));
        if let Err(e) = tap.set_link(true) {
            tracing::warn!("flap {i}: {e}");
        }
        let up = Instant::now();
        record(format!("{i} upcmd"));
        if let Err(e) = capture.lock().unwrap_or_else(|p| p.into_inner()).restart() {
            tracing::warn!("flap {i}: capture: {e}");
        }
        sleep(Duration::from_secs(1).saturating_sub(up.elapsed()));
        record(format!("{i} up {}", tap.link_state()));
        sleep(Duration::from_secs(9));
    }
    let _ = std::fs::write(dir.join("flaps-done"), b"");
}
