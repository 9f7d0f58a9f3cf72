//! SIGKILL the host (`nvmf perf` on 4 I/O queues) in the middle of its I/O, 20 times: the `nvmf-target`
//! process never dies, and after each kill its stats return to their baseline — no controller, queue pair,
//! poller or pool buffer left, and the same threads and file descriptors as before the first host came. Then
//! SIGTERM: a clean exit 0.

mod support;

use std::time::{Duration, Instant};

use support::process::{PerfRun, TargetProcess};
use support::{LOOPBACK, Rng};

#[test]
fn host_killed_mid_io_twenty_times() {
    let mut target = TargetProcess::start(&[], &[LOOPBACK], 0, "kill");
    std::thread::sleep(Duration::from_millis(300));
    let baseline = target.stats();
    assert_eq!(baseline["qpairs"], 0);
    let mut rng = Rng(0x5eed);
    let kills = std::env::var("NVMF_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    for round in 0..kills {
        let host = PerfRun::start(&[], &[LOOPBACK], target.udp_port, 60, 1);
        // Connected (admin + 4 I/O queues) and moving data, then a random moment later, killed.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = target.stats();
            let moving = s["controller_detail"][0]["read_commands"].as_u64().unwrap_or(0) > 0;
            if s["controllers"] == 1 && s["qpairs"] == 5 && moving {
                break;
            }
            assert!(Instant::now() < deadline, "round {round}: host not connected: {s}");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        host.kill();
        let after = target.wait_baseline(&baseline, Duration::from_secs(20));
        eprintln!("round {round}: back to baseline (threads {}, fds {})", after["threads"], after["fds"]);
    }
    let status = target.terminate();
    assert!(status.success(), "nvmf-target exit status {status:?}");
}
