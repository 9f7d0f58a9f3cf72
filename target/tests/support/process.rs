//! Real processes for the fault tests: the `nvmf-target` binary (stats through its control socket), and a
//! host process — this test binary re-executed into its ignored `child_host` test — that runs verified I/O
//! until it is killed or told to stop, reconnecting after failures.
#![allow(dead_code)]
// The child host talks to its parent through stdout.
#![allow(clippy::print_stdout)]

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use initiator::{ConnectOptions, Controller, DataDir, TargetAddr};
use nvme_proto::IoCommand;
use nvme_proto::io::ReadWrite;

use super::{Rng, blocks};

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
            if idle && same("threads") && same("fds") && same("memory_regions") {
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

/// What the child host is told (environment variables, read by [`child_host_main`]).
pub struct HostJob {
    pub target: SocketAddr,
    pub local: IpAddr,
    /// Stop (final verification, clean disconnect) when this file appears; run until killed otherwise.
    pub stop_file: Option<PathBuf>,
    /// The target is new: every block reads as zeroes until written.
    pub fresh: bool,
}

/// A child host's stdout lines, read by a thread so that waiting for them can time out.
pub type Lines = std::sync::mpsc::Receiver<String>;

/// Starts the child host (through `prefix`) and waits (at most 30 s) for its "ready" line.
pub fn spawn_host(test_binary_entry: &str, prefix: &[&str], job: &HostJob) -> (Child, Lines) {
    let exe = std::env::current_exe().expect("test binary");
    let mut args: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
    args.push(exe.to_str().expect("utf-8").into());
    args.extend(["--exact", test_binary_entry, "--ignored", "--nocapture", "--test-threads=1"].map(String::from));
    let mut cmd = Command::new(&args[0]);
    cmd.args(&args[1..])
        .env("NVMF_CHILD_TARGET", job.target.to_string())
        .env("NVMF_CHILD_LOCAL", job.local.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(stop) = &job.stop_file {
        cmd.env("NVMF_CHILD_STOP", stop);
    }
    if job.fresh {
        cmd.env("NVMF_CHILD_FRESH", "1");
    }
    let mut child = cmd.spawn().expect("start child host");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        match lines.recv_timeout(Duration::from_secs(30)) {
            // The test harness prints "test child_host ... " first, on the same line.
            Ok(line) if line.trim_end().ends_with("ready") => return (child, lines),
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                panic!("child host not ready within 30 s ({e}): {:?}", child.wait());
            }
        }
    }
}

/// The blocks a worker may find: every generation it wrote whose completion it did not see, plus the last
/// acknowledged one. Cleared to just the new one when a write is acknowledged; empty while unknown.
#[derive(Clone)]
struct BlockState {
    possible: Vec<u32>,
}

/// Summary the child prints as its last line.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct HostReport {
    pub acknowledged_writes: u64,
    pub verified_reads: u64,
    pub io_errors: u64,
    pub reconnects: u64,
    pub failed_connects: u64,
    pub mismatches: u64,
    pub final_blocks_checked: u64,
}

const WORKERS: u64 = 8;
const REGION: u64 = 2048;

/// The child host: connects, runs verified I/O on 8 workers (each owning a region), reconnects after any
/// failure; with a stop file, finishes with a full read-back of every region and prints a [`HostReport`].
pub async fn child_host_main() {
    let Ok(target) = std::env::var("NVMF_CHILD_TARGET") else { return };
    let target: SocketAddr = target.parse().expect("target address");
    let local: IpAddr = std::env::var("NVMF_CHILD_LOCAL").expect("local").parse().expect("local address");
    let stop = std::env::var_os("NVMF_CHILD_STOP").map(PathBuf::from);
    let addr = TargetAddr { udp: target, trsvcid: 4420 };
    let mut options = ConnectOptions::new(NQN);
    options.local_addr = Some(local);
    options.nr_io_queues = 4;
    options.queue_size = 32;
    options.keep_alive_tmo = Some(Duration::from_secs(1));
    let stopped = |stop: &Option<PathBuf>| stop.as_deref().is_some_and(Path::exists);
    let mut report = HostReport::default();
    // A fresh target reads zeroes; otherwise a block's content is unknown until this process writes it.
    let initial = if std::env::var_os("NVMF_CHILD_FRESH").is_some() { vec![0] } else { Vec::new() };
    let mut model = vec![BlockState { possible: initial }; (WORKERS * REGION) as usize];
    let mut generation = 0u32;
    let mut first = true;
    while !stopped(&stop) {
        let ctrl = match Controller::connect(addr, options.clone()).await {
            Ok(c) => std::sync::Arc::new(c),
            Err(e) => {
                report.failed_connects += 1;
                eprintln!("child host: connect: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        if first {
            println!("ready");
            first = false;
        } else {
            report.reconnects += 1;
            eprintln!("child host: reconnected ({})", report.reconnects);
        }
        // Workers run until one fails or the stop file appears.
        let mut tasks = Vec::new();
        for w in 0..WORKERS {
            let ctrl = ctrl.clone();
            let region: Vec<BlockState> = model[(w * REGION) as usize..((w + 1) * REGION) as usize].to_vec();
            let stop = stop.clone();
            let start_gen = generation + (w as u32) * 1_000_000;
            tasks.push(tokio::spawn(worker(ctrl, w, region, start_gen, stop)));
        }
        for (w, t) in tasks.into_iter().enumerate() {
            let (region, r) = t.await.expect("worker");
            model[w * REGION as usize..(w + 1) * REGION as usize].clone_from_slice(&region);
            report.acknowledged_writes += r.acknowledged_writes;
            report.verified_reads += r.verified_reads;
            report.io_errors += r.io_errors;
            report.mismatches += r.mismatches;
        }
        generation += 100_000_000 / 16;
        if let Some(ctrl) = std::sync::Arc::into_inner(ctrl) {
            ctrl.close().await;
        }
    }
    // Final check: every block must hold one of the generations it may hold.
    let ctrl = loop {
        match Controller::connect(addr, options.clone()).await {
            Ok(c) => break c,
            Err(e) => {
                report.failed_connects += 1;
                eprintln!("child host: final connect: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    for chunk in 0..(WORKERS * REGION) / 256 {
        let lba = chunk * 256;
        let data = ctrl.read(1, lba, 256).await.expect("final read");
        for i in 0..256usize {
            let state = &model[lba as usize + i];
            let got = &data[i * 512..(i + 1) * 512];
            let ok =
                state.possible.is_empty() || state.possible.iter().any(|&g| blocks(lba + i as u64, &[g], 512) == got);
            if !ok {
                report.mismatches += 1;
                eprintln!("child host: LBA {} holds none of generations {:?}", lba + i as u64, state.possible);
            }
            report.final_blocks_checked += 1;
        }
    }
    ctrl.shutdown().await.expect("clean shutdown");
    println!("report {}", serde_json::to_string(&report).expect("json"));
}

async fn worker(
    ctrl: std::sync::Arc<Controller>,
    w: u64,
    mut region: Vec<BlockState>,
    mut generation: u32,
    stop: Option<PathBuf>,
) -> (Vec<BlockState>, HostReport) {
    let mut r = HostReport::default();
    let mut rng = Rng(w * 104_729 + generation as u64 + 17);
    let qid = (w % 4) as u16 + 1;
    let base = w * REGION;
    loop {
        if stop.as_deref().is_some_and(Path::exists) {
            break;
        }
        let len = [1u64, 8, 64, 256][rng.below(4) as usize];
        let at = rng.below(REGION - len + 1);
        let lba = base + at;
        let rw = ReadWrite::new(1, lba, len as u32).expect("valid");
        let range = at as usize..(at + len) as usize;
        if rng.below(2) == 0 {
            generation += 1;
            let data = blocks(lba, &vec![generation; len as usize], 512);
            for b in &mut region[range.clone()] {
                b.possible.push(generation);
            }
            match ctrl.io_command(Some(qid), IoCommand::Write(rw), DataDir::ToController(data)).await {
                Ok(_) => {
                    for b in &mut region[range] {
                        b.possible = vec![generation];
                    }
                    r.acknowledged_writes += 1;
                }
                Err(e) => {
                    r.io_errors += 1;
                    eprintln!("child host: worker {w}: write: {e}");
                    break;
                }
            }
        } else {
            match ctrl.io_command(Some(qid), IoCommand::Read(rw), DataDir::ToHost(len as usize * 512)).await {
                Ok((_, data)) => {
                    for (i, b) in region[range].iter().enumerate() {
                        let got = &data[i * 512..(i + 1) * 512];
                        let known = !b.possible.is_empty();
                        if known && !b.possible.iter().any(|&g| blocks(lba + i as u64, &[g], 512) == got) {
                            r.mismatches += 1;
                            eprintln!("child host: LBA {} read none of {:?}", lba + i as u64, b.possible);
                        }
                    }
                    r.verified_reads += 1;
                }
                Err(e) => {
                    eprintln!("child host: worker {w}: read: {e}");
                    r.io_errors += 1;
                    break;
                }
            }
        }
    }
    (region, r)
}

/// Reads the child's final report line, waiting at most `within`.
pub fn read_report(lines: &Lines, within: Duration) -> HostReport {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                if let Some((_, json)) = line.split_once("report ") {
                    return serde_json::from_str(json).expect("report JSON");
                }
            }
            Err(e) => panic!("the child host printed no report within {within:?}: {e}"),
        }
    }
}
