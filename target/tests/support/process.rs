//! Real processes for the fault tests: the `nvmf-target` binary (stats through its control socket) and the
//! `nvmf` CLI as the host — `nvmf perf --verify`, which reconnects through failures and checks every block it
//! wrote; interrupted (SIGINT) it stops, reads everything back and reports, killed it just dies.
//!
//! `nvmf` is the initiator package's binary: `cargo test --workspace` builds it beside `nvmf-target`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const NQN: &str = "nqn.2026-11.dev.nvmf-rs:ram";

/// A running `nvmf-target`, killed when dropped.
pub struct TargetProcess {
    pub child: Child,
    pub udp_port: u16,
    pub control: PathBuf,
}

impl TargetProcess {
    /// Starts the binary (through `prefix`, e.g. `ip netns exec NS`) listening on every address of `listen`,
    /// with a 64 MiB RAM namespace.
    pub fn start(prefix: &[&str], listen: &[IpAddr], udp_port: u16, tag: &str) -> TargetProcess {
        let control = std::env::temp_dir().join(format!("nvmf-target-{}-{tag}.sock", std::process::id()));
        let bin = env!("CARGO_BIN_EXE_nvmf-target");
        let mut args: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        args.push(bin.into());
        for addr in listen {
            args.extend(["--listen".to_string(), addr.to_string()]);
        }
        args.extend(
            [
                "--udp-port",
                &udp_port.to_string(),
                "--ram-size",
                "64M",
                "--poll-groups",
                "2",
                "--control-socket",
                control.to_str().expect("utf-8 path"),
            ]
            .map(String::from),
        );
        let mut child = Command::new(&args[0])
            .args(&args[1..])
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nvmf-target");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut bound = None;
        let mut line = String::new();
        while bound.is_none() {
            line.clear();
            assert!(out.read_line(&mut line).expect("target stdout") > 0, "nvmf-target exited before listening");
            if let Some(rest) = line.split("UDP ").nth(1) {
                bound = rest.trim().trim_end_matches(')').parse::<u16>().ok();
            }
        }
        // Keep draining its stdout so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in out.lines() {});
        let t = TargetProcess { child, udp_port: bound.expect("port"), control };
        t.wait_for_socket();
        t
    }

    fn wait_for_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&self.control).is_err() {
            assert!(Instant::now() < deadline, "control socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stats(&self) -> serde_json::Value {
        let mut s = UnixStream::connect(&self.control).expect("control socket");
        s.write_all(b"stats\n").expect("send");
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("answer");
        serde_json::from_str(&line).expect("JSON stats")
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    /// Waits until stats show no controllers, queue pairs, pollers or pool buffers, and the same threads and
    /// file descriptors as `baseline`.
    pub fn wait_baseline(&mut self, baseline: &serde_json::Value, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            assert!(self.alive(), "nvmf-target died");
            let s = self.stats();
            let same = |k: &str| s[k] == baseline[k];
            let idle = s["controllers"] == 0 && s["qpairs"] == 0 && s["pollers"] == 0 && s["pool_buffers_in_use"] == 0;
            if idle && same("threads") && same("fds") && same("memory_regions") && same("srq_receives") {
                return s;
            }
            assert!(Instant::now() < deadline, "target did not return to its baseline {baseline}: {s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM; returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .expect("signal");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                let _ = std::fs::remove_file(&self.control);
                return status;
            }
            assert!(Instant::now() < deadline, "nvmf-target did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TargetProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.control);
    }
}

/// The `nvmf` binary next to `nvmf-target`.
pub fn nvmf_binary() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_nvmf-target")).with_file_name("nvmf");
    assert!(
        path.exists(),
        "{} is missing: cargo build -p initiator --bin nvmf (cargo test --workspace builds it)",
        path.display()
    );
    path
}

/// `nvmf perf` running as the host; its JSON report is read when it exits.
pub struct PerfRun {
    pub child: Child,
    started: Instant,
}

impl PerfRun {
    /// Verifying random reads and writes (16 MiB span, 4 I/O queues, QD 16) against every address of `targets`
    /// (one path each) on `udp_port`, started through `prefix`; reconnecting every second for up to 120 s,
    /// keep-alive `kato` seconds.
    pub fn start(prefix: &[&str], targets: &[IpAddr], udp_port: u16, runtime: u64, kato: u32) -> PerfRun {
        let bin = nvmf_binary();
        let mut args: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        args.push(bin.to_str().expect("utf-8").into());
        args.push("perf".into());
        for t in targets {
            args.extend(["-a".into(), t.to_string()]);
        }
        args.extend(
            [
                "-n",
                NQN,
                "-q",
                "16",
                "--io-queues",
                "4",
                "-w",
                "randrw",
                "-M",
                "50",
                "--bs",
                "4k",
                "--size",
                "16m",
                "--verify",
                "--reconnect-delay",
                "1",
                "--ctrl-loss-tmo",
                "120",
                "-o",
                "json",
            ]
            .map(String::from),
        );
        for (flag, value) in
            [("--runtime", runtime), ("--keep-alive-tmo", kato as u64), ("--udp-port", udp_port as u64)]
        {
            args.extend([flag.to_string(), value.to_string()]);
        }
        let child = Command::new(&args[0])
            .args(&args[1..])
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nvmf perf");
        PerfRun { child, started: Instant::now() }
    }

    /// SIGINT: perf stops, reads back what it wrote and reports.
    pub fn interrupt(&self) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGINT)
            .expect("SIGINT");
    }

    /// SIGKILL, and reaped.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// Waits (at most `within`) for perf to exit; its report, which must say it succeeded.
    pub fn report(mut self, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        while self.child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("nvmf perf still running after {within:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = self.child.wait_with_output().expect("perf output");
        eprintln!("nvmf perf ran {:?}: {:?}", self.started.elapsed(), out.status);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("perf JSON: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        assert!(out.status.success(), "nvmf perf failed: {report}");
        report
    }
}

/// What every verifying perf run must end with: I/O done, nothing failed for good, every block intact.
pub fn assert_clean(report: &serde_json::Value) {
    assert_eq!(report["errors"], 0, "every I/O lost to a failure is sent again: {report}");
    assert_eq!(report["verify"]["errors"], 0, "{report}");
    assert!(report["ios"].as_u64().is_some_and(|n| n > 0), "{report}");
    assert!(report["verify"]["final_checked_blocks"].as_u64().is_some_and(|n| n > 0), "{report}");
}
