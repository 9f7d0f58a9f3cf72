//! `testbed bench loopback` and `bench scale` end to end with the debug binaries: they start our target, run
//! perf (and the UDP ceiling) and write reports whose every figure is a measurement (nothing is asserted about
//! speed).

use std::process::Command;

/// Runs `testbed bench ARGS --dir DIR` (a fresh directory named after `tag`); its stdout, the JSON report it
/// wrote (`file` in DIR), and DIR.
fn bench(tag: &str, args: &[&str], file: &str) -> (String, serde_json::Value, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("testbed-{tag}-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_testbed"))
        .arg("bench")
        .args(args)
        .arg("--dir")
        .arg(&dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run testbed");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    (stdout, serde_json::from_str(&text).expect("JSON"), dir)
}

#[test]
fn loopback_bench_reports_measured_ratios() {
    let args =
        ["loopback", "--runtime", "1", "--runs", "1", "--queues", "1", "--jobs", "randread-4k-qd1,write-128k-qd8"];
    let (stdout, report, dir) = bench("bench", &args, "bench.json");
    assert!(stdout.contains("| randread-4k-qd1 | 1 |"), "{stdout}");
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    for shape in ["read_qd1", "read_qd32", "write_qd32"] {
        let c = &report["ceiling"][shape];
        assert!(f(&c["per_second"]) > 0.0 && f(&c["client_cpu_us"]) > 0.0 && f(&c["server_cpu_us"]) > 0.0, "{c}");
    }
    assert!(f(&report["ceiling"]["stream_4k"]["mib_per_s"]) > 0.0);
    let jobs = report["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 2, "{report}");
    for j in jobs {
        assert_eq!(j["errors"], 0, "{j}");
        for key in ["iops", "host_cpu_us_per_io", "target_cpu_us_per_io", "throughput_ratio"] {
            assert!(f(&j[key]) > 0.0 && f(&j[key]).is_finite(), "{key}: {j}");
        }
    }
    // QD1 is compared with the round trip, so its latency ratio is there.
    assert!(f(&jobs[0]["latency_ratio"]) > 0.0, "{}", jobs[0]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `testbed bench scale` with the debug binaries: a few hosts, every queue pair counted at the peak, every
/// host's data verified, the target back at its baseline, the memory per queue pair measured.
#[test]
fn scale_bench_counts_every_queue_pair_and_verifies_every_host() {
    let args = ["scale", "--hosts", "3", "--queues", "2", "--iodepth", "4", "--runtime", "2"];
    let (stdout, report, dir) = bench("scale", &args, "scale.json");
    assert!(stdout.contains("PASSED"), "{stdout}");
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(report["peak"]["qpairs"], 9, "3 hosts × (2 I/O queues + admin): {report}");
    assert_eq!(report["shared_receive_queues"], 2, "one per poll group: {report}");
    assert_eq!(report["verify_errors"], 0);
    let hosts = report["host_results"].as_array().expect("hosts");
    assert_eq!(hosts.len(), 3);
    assert!(hosts.iter().all(|h| h["exit"] == 0 && h["verified_blocks"].as_u64().unwrap_or(0) > 0), "{report}");
    assert!(report["rss_per_qpair_bytes"].as_f64().is_some_and(f64::is_finite), "{report}");
    assert_eq!(report["back_at_baseline"], true);
    let _ = std::fs::remove_dir_all(&dir);
}
