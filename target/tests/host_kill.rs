//! SIGKILL the host process in the middle of its I/O, 20 times: the `nvmf-target` process never dies, and after
//! each kill its stats return to their baseline — no controller, queue pair, poller or pool buffer left, and
//! the same threads and file descriptors as before the first host came. Then SIGTERM: a clean exit 0.

mod support;

use std::time::Duration;

use support::process::{HostJob, TargetProcess, child_host_main, spawn_host};
use support::{LOOPBACK, Rng};

/// The host process this test starts (and kills); not a test of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the host process of host_killed_mid_io_twenty_times; runs only as its child"]
async fn child_host() {
    child_host_main().await;
}

#[test]
fn host_killed_mid_io_twenty_times() {
    let mut target = TargetProcess::start(&[], &[LOOPBACK], 0, "kill");
    std::thread::sleep(Duration::from_millis(300));
    let baseline = target.stats();
    assert_eq!(baseline["qpairs"], 0);
    let job = HostJob {
        target: std::net::SocketAddr::new(LOOPBACK, target.udp_port),
        local: LOOPBACK,
        stop_file: None,
        fresh: false,
    };
    let mut rng = Rng(0x5eed);
    let kills = std::env::var("NVMF_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    for round in 0..kills {
        let (mut host, _out) = spawn_host("child_host", &[], &job);
        // Let it get I/O in flight on every queue.
        std::thread::sleep(Duration::from_millis(100 + rng.below(300)));
        let busy = target.stats();
        assert!(busy["controllers"] == 1 && busy["qpairs"] == 5, "round {round}: host not connected: {busy}");
        host.kill().expect("SIGKILL");
        host.wait().expect("reap");
        let after = target.wait_baseline(&baseline, Duration::from_secs(20));
        eprintln!("round {round}: back to baseline (threads {}, fds {})", after["threads"], after["fds"]);
    }
    let status = target.terminate();
    assert!(status.success(), "nvmf-target exit status {status:?}");
}
