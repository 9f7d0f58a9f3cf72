//! The host's side of a run whose VM has a tap NIC: our binaries run on the host, inside the run's network
//! namespace, on the tap's address — the soft provider talking straight to the VM's kernel rxe, no RDMA in the
//! host's kernel. Also the capture on the tap (tcpdump), checked datagram by datagram with our wire codecs
//! against the headers really sent, and the link and MTU changes made on our side of the tap.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::ScenarioError;
use super::flap::OurTarget;
use super::ours::StatsCheck;
use crate::vm::{Run, Tap, VmError, VmSpec};

/// The VM's address on its tap NIC (on bond0, rxe0 on top), and the host side's, on the tap.
pub const VM_ADDR: &str = "198.18.1.1";
pub const HOST_SIDE_ADDR: &str = "198.18.1.254";

/// What the host side touches once it has checked and stopped what it runs: until then a VM whose peer is on
/// the host side keeps its NIC (the tap goes away with QEMU).
pub const RELEASED: &str = "released";

/// Shell that waits (at most 120 s) for [`RELEASED`].
pub fn hold_until_released() -> String {
    format!("wait_file $T/{RELEASED} 120 || log 'never released'")
}

/// The end of a kernel host's script whose target is on the host side: it says it is done, then holds.
pub fn host_done() -> String {
    format!("dmesg > $T/host.dmesg\ntouch $T/host-done\n{}\n", hold_until_released())
}

/// The VM's first NIC as a tap holding the host side's address.
pub fn tap() -> Tap {
    Tap { vm: 0, nic: 0, host_addr: format!("{HOST_SIDE_ADDR}/24") }
}

/// The VM of a tap run: one NIC, the tap; bond0 over it with the VM's address and rxe0; then `script`.
pub fn tap_vm(name: &str, script: String) -> VmSpec {
    VmSpec {
        name: name.into(),
        nics: 1,
        memory_mib: 1024,
        script: format!("{}{script}", crate::guest::network_with(1, &[0], Some(VM_ADDR), true)),
    }
}

/// The run's namespace and its tap.
#[derive(Debug, Clone)]
pub struct TapSide {
    netns: String,
    tap: String,
}

fn io_error(what: &str) -> impl FnOnce(std::io::Error) -> ScenarioError + '_ {
    move |source| ScenarioError::Io { path: what.into(), source }
}

impl TapSide {
    pub fn of(run: &Run) -> Result<TapSide, ScenarioError> {
        match (run.netns(), run.tap_device(0)) {
            (Some(netns), Some(tap)) => Ok(TapSide { netns: netns.into(), tap: tap.into() }),
            _ => Err(ScenarioError::Missing("a tap device in the run's namespace".into())),
        }
    }

    /// `program` to be run inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).arg(program);
        c
    }

    fn ip(&self, args: &[&str]) -> Result<(), ScenarioError> {
        let out = Command::new("ip").args(["-n", &self.netns]).args(args).output().map_err(io_error("ip"))?;
        if out.status.success() {
            Ok(())
        } else {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            Err(VmError::Topology(format!("ip -n {} {}: {err}", self.netns, args.join(" "))).into())
        }
    }

    /// The tap's link, on our side (the VM's NIC keeps its carrier: its packets just go nowhere).
    pub fn set_link(&self, up: bool) -> Result<(), ScenarioError> {
        self.ip(&["link", "set", &self.tap, if up { "up" } else { "down" }])
    }

    /// "up" when the tap is administratively up with a carrier (its operstate says "unknown" then), else
    /// "down": what a flap record needs.
    pub fn link_state(&self) -> &'static str {
        let out = Command::new("ip").args(["-n", &self.netns, "-o", "link", "show", &self.tap]).output();
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        let flags = text.split(['<', '>']).nth(1).unwrap_or_default();
        let has = |f: &str| flags.split(',').any(|x| x == f);
        if has("UP") && has("LOWER_UP") { "up" } else { "down" }
    }

    /// The tap's MAC address (what our soft device's node GUID derives from).
    pub fn mac(&self) -> Option<[u8; 6]> {
        let out = Command::new("ip").args(["-n", &self.netns, "-o", "link", "show", &self.tap]).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mac = text.split_whitespace().skip_while(|w| *w != "link/ether").nth(1)?;
        let bytes: Vec<u8> = mac.split(':').filter_map(|b| u8::from_str_radix(b, 16).ok()).collect();
        bytes.try_into().ok()
    }

    /// Runs `program args` in the namespace, its stdout to `dir/NAME.out` and stderr to `dir/NAME.err`, for at
    /// most `timeout` (then it is killed); returns its exit code.
    pub fn run(&self, dir: &Path, name: &str, program: &Path, args: &[String], timeout: Duration) -> Option<i32> {
        let stdout = std::fs::File::create(dir.join(format!("{name}.out"))).ok()?;
        let stderr = std::fs::File::create(dir.join(format!("{name}.err"))).ok()?;
        let mut child = self
            .command(program)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .ok()?;
        wait_or_kill(&mut child, timeout)
    }

    pub fn set_mtu(&self, mtu: u32) -> Result<(), ScenarioError> {
        self.ip(&["link", "set", &self.tap, "mtu", &mtu.to_string()])
    }

    /// Starts tcpdump on the tap (UDP 4791, whole frames) writing `pcap`; returns once it listens.
    pub fn capture(&self, pcap: &Path) -> Result<TapCapture, ScenarioError> {
        crate::image::require("tcpdump", "apt-get install tcpdump").map_err(VmError::from)?;
        let mut capture = TapCapture { side: self.clone(), base: pcap.to_owned(), segments: Vec::new(), child: None };
        capture.start_segment()?;
        Ok(capture)
    }
}

/// A running tcpdump on the tap, in segments (libpcap gives up on an interface that goes down, so a capture
/// through a flap of our side is restarted after it); stopped and checked by [`TapCapture::stop`], killed if
/// dropped.
pub struct TapCapture {
    side: TapSide,
    base: PathBuf,
    segments: Vec<PathBuf>,
    child: Option<Child>,
}

impl TapCapture {
    fn start_segment(&mut self) -> Result<(), ScenarioError> {
        let n = self.segments.len();
        let pcap = if n == 0 { self.base.clone() } else { self.base.with_extension(format!("{n}.pcap")) };
        let log = pcap.with_extension("tcpdump.log");
        let stderr = std::fs::File::create(&log).map_err(io_error("tcpdump log"))?;
        let child = self
            .side
            .command(Path::new("tcpdump"))
            .args(["-Z", "root", "-i", &self.side.tap, "-s", "0", "-n", "-U", "-w"])
            .arg(&pcap)
            .arg("udp port 4791")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(io_error("tcpdump"))?;
        self.child = Some(child);
        self.segments.push(pcap);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("listening on") {
            if Instant::now() > deadline {
                return Err(ScenarioError::Missing(format!(
                    "tcpdump listening on {} ({})",
                    self.side.tap,
                    log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn end_segment(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, nix::sys::signal::Signal::SIGINT);
            wait_or_kill(&mut child, Duration::from_secs(10));
        }
    }

    /// Ends the current segment and starts the next (after our side of the tap came back up).
    pub fn restart(&mut self) -> Result<(), ScenarioError> {
        self.end_segment();
        self.start_segment()
    }

    /// Stops the capture and checks every datagram in it (`ours` is the host side's address), and that our CA
    /// GUID was `guid` and every one of `path_mtus` in use ([`WireCheck::expect`]).
    pub fn stop(mut self, ours: IpAddr, guid: u64, path_mtus: &[u64]) -> WireCheck {
        self.end_segment();
        let mut check = WireCheck::of_pcaps(&self.segments, ours);
        check.expect(guid, path_mtus);
        // What tcpdump could not keep up with is not in the files (and so not checked): say how much.
        check.dropped_by_kernel = self
            .segments
            .iter()
            .filter_map(|p| std::fs::read_to_string(p.with_extension("tcpdump.log")).ok())
            .filter_map(|log| {
                let line = log.lines().find(|l| l.ends_with("packets dropped by kernel"))?.to_string();
                line.split_whitespace().next()?.parse::<u64>().ok()
            })
            .sum();
        // Captures of I/O runs are hundreds of MB: kept only when something is wrong, or when asked for.
        check.pcap_kept = !check.passed() || std::env::var_os("TESTBED_KEEP_PCAP").is_some();
        if !check.pcap_kept {
            for pcap in &self.segments {
                let _ = std::fs::remove_file(pcap);
            }
        }
        check
    }
}

impl Drop for TapCapture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// Waits for `child` to exit, at most `grace`; then kills it. Its exit code, if it exited by itself.
fn wait_or_kill(child: &mut Child, grace: Duration) -> Option<i32> {
    let deadline = Instant::now() + grace;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the tap carried, checked with our codecs: every datagram must parse and carry the ICRC that is right
/// for the IP and UDP headers it was really sent with — ours and the kernel's alike.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WireCheck {
    /// The capture's files (one per segment).
    pub pcaps: Vec<PathBuf>,
    /// Whether they are still there (removed after a clean check, unless `TESTBED_KEEP_PCAP` is set).
    pub pcap_kept: bool,
    pub datagrams: usize,
    pub from_ours: usize,
    pub from_kernel: usize,
    pub bad_icrc: usize,
    pub unparsable: usize,
    /// The first few bad datagrams, described.
    pub problems: Vec<String>,
    /// The path MTU (bytes) of every CM REQ, in order: what each connection was set up with.
    pub req_path_mtus: Vec<usize>,
    /// The largest RC payload each side sent (path MTU in use).
    pub largest_rc_payload_ours: usize,
    pub largest_rc_payload_kernel: usize,
    /// The CA GUIDs of the REQs and REPs we sent (each distinct value once).
    pub our_ca_guids: Vec<u64>,
    /// Datagrams tcpdump reported it dropped (not in the files, so not checked).
    pub dropped_by_kernel: u64,
    /// What [`WireCheck::expect`] found missing: our CA GUID, or a path MTU not in use.
    pub unmet: Vec<String>,
}

impl WireCheck {
    pub fn of_pcaps(pcaps: &[PathBuf], ours: IpAddr) -> WireCheck {
        let mut check = WireCheck { pcaps: pcaps.to_vec(), ..WireCheck::default() };
        for pcap in pcaps {
            check.add_pcap(pcap, ours);
        }
        check
    }

    fn add_pcap(&mut self, pcap: &Path, ours: IpAddr) {
        use transport::soft::wire::mad::CmMessage;
        use transport::soft::wire::{PacketRepr, icrc};
        let check = self;
        let reader = std::fs::File::open(pcap)
            .map_err(|e| e.to_string())
            .and_then(|f| transport::soft::pcap::Reader::new(std::io::BufReader::new(f)).map_err(|e| e.to_string()));
        let reader = match reader {
            Ok(r) => r,
            Err(e) => {
                check.unparsable += 1;
                check.problems.push(format!("{}: {e}", pcap.display()));
                return;
            }
        };
        let file = pcap.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        for d in reader {
            let d = match d {
                Ok(d) => d,
                Err(e) => {
                    check.unparsable += 1;
                    check.problems.push(format!("{}: {e}", pcap.display()));
                    break;
                }
            };
            check.datagrams += 1;
            let mine = d.src == ours;
            if mine {
                check.from_ours += 1;
            } else {
                check.from_kernel += 1;
            }
            let who = if mine { "ours" } else { "kernel" };
            if let Err(e) = icrc::verify(&d.ip, d.udp_src, &d.payload) {
                check.bad_icrc += 1;
                if check.problems.len() < 10 {
                    check.problems.push(format!("{file} #{} ({who}, {} → {}): {e}", d.record, d.src, d.dst));
                }
            }
            match PacketRepr::parse(&d.payload) {
                Ok((p, _)) => {
                    if p.bth.opcode.is_rc() {
                        let largest = if mine {
                            &mut check.largest_rc_payload_ours
                        } else {
                            &mut check.largest_rc_payload_kernel
                        };
                        *largest = (*largest).max(p.payload.len());
                    } else {
                        let guid = match CmMessage::parse(p.payload) {
                            Ok((_, CmMessage::Req(req))) => {
                                check.req_path_mtus.push(transport::mtu::mtu_bytes(req.path_mtu));
                                Some(req.local_ca_guid)
                            }
                            Ok((_, CmMessage::Rep(rep))) => Some(rep.local_ca_guid),
                            _ => None,
                        };
                        if let Some(g) = guid.filter(|g| mine && !check.our_ca_guids.contains(g)) {
                            check.our_ca_guids.push(g);
                        }
                    }
                }
                Err(e) => {
                    check.unparsable += 1;
                    if check.problems.len() < 10 {
                        check.problems.push(format!("{file} #{} ({who}): does not parse: {e}", d.record));
                    }
                }
            }
        }
    }

    /// Both sides talked, every datagram parsed and verified, and what was expected of the run was there.
    pub fn passed(&self) -> bool {
        self.clean() && self.unmet.is_empty()
    }

    /// Both sides talked, and every datagram parsed and verified.
    fn clean(&self) -> bool {
        self.from_ours > 0 && self.from_kernel > 0 && self.bad_icrc == 0 && self.unparsable == 0
    }

    /// What the run must show on the wire: our CA GUID `guid` (never 0) in every REQ and REP we sent, and each
    /// of `path_mtus` set up by some connection and in use by both sides (the largest filling their packets).
    fn expect(&mut self, guid: u64, path_mtus: &[u64]) {
        if guid == 0 || self.our_ca_guids != [guid] {
            self.unmet.push(format!("our CA GUIDs on the wire {:x?}, expected {guid:#x}", self.our_ca_guids));
        }
        for mtu in path_mtus {
            if !self.req_path_mtus.contains(&(*mtu as usize)) {
                self.unmet.push(format!("no connection with path MTU {mtu} on the wire"));
            }
        }
        let largest = *path_mtus.iter().max().unwrap_or(&0) as usize;
        if self.largest_rc_payload_ours != largest || self.largest_rc_payload_kernel != largest {
            self.unmet.push(format!(
                "largest RC payloads: ours {}, the kernel's {} (path MTU {largest})",
                self.largest_rc_payload_ours, self.largest_rc_payload_kernel
            ));
        }
    }

    /// What is wrong, for a scenario's problem list.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = self.unmet.clone();
        if !self.clean() {
            problems.insert(0, format!("{} {:?}", self.summary(), self.problems));
        }
        problems
    }

    pub fn summary(&self) -> String {
        format!(
            "tap capture: {} datagrams ({} ours, {} the kernel's; {} dropped by the capture), {} bad ICRC, {} unparsable; REQ path MTUs {:?}; largest RC payload ours {} / kernel {}",
            self.datagrams,
            self.from_ours,
            self.from_kernel,
            self.dropped_by_kernel,
            self.bad_icrc,
            self.unparsable,
            self.req_path_mtus,
            self.largest_rc_payload_ours,
            self.largest_rc_payload_kernel
        )
    }
}

/// Our `nvmf-target` (soft provider) running on the host side, with its control socket.
pub struct HostTarget {
    child: Child,
    control: PathBuf,
    pub log: PathBuf,
}

impl HostTarget {
    /// Starts `nvmf-target` (built beside this binary) in the namespace with `args`, logging to
    /// `dir/nvmf-target.log`; returns once it listens (at most 30 s).
    pub fn start(side: &TapSide, dir: &Path, args: &[&str]) -> Result<HostTarget, ScenarioError> {
        let bin = super::ours::host_binary("nvmf-target")?;
        // Unix socket paths are short (108 bytes): not in the run directory.
        let control = std::env::temp_dir().join(format!("nvmf-tb-{}-{}.sock", std::process::id(), crate::unique()));
        let (out, log) = (dir.join("nvmf-target.out"), dir.join("nvmf-target.log"));
        let stdout = std::fs::File::create(&out).map_err(io_error("nvmf-target.out"))?;
        let stderr = std::fs::File::create(&log).map_err(io_error("nvmf-target.log"))?;
        let child = side
            .command(&bin)
            .args(args)
            .arg("--control-socket")
            .arg(&control)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(io_error("nvmf-target"))?;
        let mut target = HostTarget { child, control, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&out).unwrap_or_default().contains("listening on") {
            if Instant::now() > deadline || target.child.try_wait().ok().flatten().is_some() {
                let log = std::fs::read_to_string(&target.log).unwrap_or_default();
                return Err(ScenarioError::Missing(format!("our target listening: {}", log.trim())));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(target)
    }

    /// One JSON line of the target's stats, from its control socket.
    pub fn stats(&self) -> Option<String> {
        let mut stream = std::os::unix::net::UnixStream::connect(&self.control).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        stream.write_all(b"stats\n").ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).ok()?;
        Some(line.trim().to_string()).filter(|l| !l.is_empty())
    }

    pub fn stats_json(&self) -> serde_json::Value {
        self.stats().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
    }

    /// Waits (at most 30 s) until the target holds no controller, queue pair, poller, pool buffer or connection
    /// (time-wait included), compares its stats with `before`, stops it with SIGINT and reports.
    pub fn stop(mut self, before: Option<String>) -> OurTarget {
        let alive_at_end = self.child.try_wait().ok().flatten().is_none();
        let idle = |s: &serde_json::Value| {
            ["controllers", "qpairs", "pollers", "pool_buffers_in_use", "connections"].iter().all(|k| s[*k] == 0)
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while alive_at_end && !idle(&self.stats_json()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        let after = self.stats();
        let listener_repairs = after
            .as_deref()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
            .and_then(|a| a["listeners"][0]["repairs"].as_u64());
        signal(&self.child, nix::sys::signal::Signal::SIGINT);
        let exit = wait_or_kill(&mut self.child, Duration::from_secs(20));
        let _ = std::fs::remove_file(&self.control);
        OurTarget {
            alive_at_end,
            exit,
            stats: StatsCheck::from_texts(before, after),
            listener_repairs,
            log_problems: super::ours::log_problems(&std::fs::read_to_string(&self.log).unwrap_or_default()),
        }
    }
}

impl Drop for HostTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.control);
    }
}
