//! `testbed vm run`: boots 1–4 VMs from an [`crate::image::Image`], their NICs wired NIC-to-NIC by QEMU
//! `-netdev dgram` over unix sockets (never user-mode networking), each running its script from the run's shared
//! directory, with per-VM console and script logs and a hard timeout.
//!
//! Acceleration is probed, not assumed: KVM is used only if a guest actually boots under it (here `/dev/kvm`
//! belongs to kvm_pvm, which cannot run a stock kernel), TCG otherwise; the answer is cached.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::image::{Image, ImageError, require};

/// One VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub name: String,
    pub nics: usize,
    pub memory_mib: u32,
    /// The script it runs (see [`crate::guest`]).
    pub script: String,
}

/// A cable between NIC `a.1` of VM `a.0` and NIC `b.1` of VM `b.0`.
pub type Cable = ((usize, usize), (usize, usize));

/// NIC `nic` of VM `vm` attached to a tap device inside a network namespace the run creates, the tap holding
/// `host_addr` (with its prefix, e.g. `198.18.1.254/24`): a host process run in [`Run::netns`] talks to the VM
/// directly (our soft provider against the VM's kernel rxe, later).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tap {
    pub vm: usize,
    pub nic: usize,
    pub host_addr: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    Image(#[from] ImageError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("topology: {0}")]
    Topology(String),
    #[error("cannot start qemu: {0}")]
    Spawn(std::io::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VmError + '_ {
    move |source| VmError::Io { path: path.to_owned(), source }
}

/// What became of a VM.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VmOutcome {
    pub name: String,
    /// The script's exit code, if it finished.
    pub exit: Option<i32>,
    pub timed_out: bool,
    /// The guest powered off (its console says so) but QEMU did not exit by itself within a grace period,
    /// so it was killed: the guest's work was done, so this is not a time-out.
    pub killed_after_power_down: bool,
    /// Seconds from launch to the guest's userspace (the `.boot` marker).
    pub boot_seconds: Option<f64>,
    pub console: PathBuf,
    pub log: PathBuf,
}

/// A set of running VMs.
pub struct Run {
    pub shared: PathBuf,
    netns: Option<String>,
    /// The tap devices' names, in the order of the `taps` the run was started with.
    tap_devices: Vec<String>,
    sockets: PathBuf,
    vms: Vec<(VmSpec, Child)>,
    started: Instant,
    boot_seen: Vec<Option<f64>>,
    /// When each guest's console first said it powered off.
    power_down_seen: Vec<Option<Instant>>,
}

/// What the guest kernel prints as it powers off.
const POWER_DOWN: &str = "reboot: Power down";
/// How long QEMU gets to exit after its guest powered off.
const POWER_DOWN_GRACE: Duration = Duration::from_secs(10);

fn mac(vm: usize, nic: usize) -> String {
    format!("52:54:00:18:{vm:02x}:{nic:02x}")
}

#[allow(clippy::too_many_arguments)]
fn qemu_args(
    image: &Image,
    accel: Accel,
    spec: &VmSpec,
    index: usize,
    shared: &Path,
    sockets: &Path,
    cables: &[Cable],
    taps: &[(Tap, String)],
) -> Result<Vec<String>, VmError> {
    let accel_args: &[&str] = match accel {
        Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
        Accel::Tcg => &["-accel", "tcg", "-cpu", "max"],
    };
    let mut args: Vec<String> = [
        "-machine",
        "q35",
        "-m",
        &spec.memory_mib.to_string(),
        "-smp",
        "1",
        "-display",
        "none",
        "-no-reboot",
        "-monitor",
        "none",
    ]
    .iter()
    .chain(accel_args)
    .map(|s| s.to_string())
    .collect();
    args.push("-serial".into());
    args.push(format!("file:{}", shared.join(format!("{}.console", spec.name)).display()));
    args.extend([
        "-kernel".into(),
        image.kernel.display().to_string(),
        "-initrd".into(),
        image.initramfs.display().to_string(),
    ]);
    args.push("-append".into());
    args.push(format!("console=ttyS0 panic=-1 quiet loglevel=4 testbed.name={}", spec.name));
    args.extend(
        [
            "-fsdev",
            "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        ]
        .map(String::from),
    );
    args.push("-fsdev".into());
    args.push(format!("local,id=shared,path={},security_model=none", shared.display()));
    args.extend(["-device".into(), "virtio-9p-pci,fsdev=shared,mount_tag=shared".into()]);
    for nic in 0..spec.nics {
        let peer = cables.iter().find_map(|&(a, b)| {
            if a == (index, nic) {
                Some(b)
            } else if b == (index, nic) {
                Some(a)
            } else {
                None
            }
        });
        let local = sockets.join(format!("{index}-{nic}.sock"));
        let tap = taps.iter().find(|(t, _)| t.vm == index && t.nic == nic);
        let netdev = match (tap, peer) {
            (Some((_, ifname)), _) => format!("tap,id=n{nic},ifname={ifname},script=no,downscript=no"),
            (None, peer) => match peer {
                Some((pv, pn)) => format!(
                    "dgram,id=n{nic},local.type=unix,local.path={},remote.type=unix,remote.path={}",
                    local.display(),
                    sockets.join(format!("{pv}-{pn}.sock")).display()
                ),
                // An unwired NIC: a socket nobody talks to (the link is up, nothing arrives).
                None => format!(
                    "dgram,id=n{nic},local.type=unix,local.path={},remote.type=unix,remote.path={}",
                    local.display(),
                    sockets.join(format!("{index}-{nic}.void")).display()
                ),
            },
        };
        args.extend([
            "-netdev".into(),
            netdev,
            "-device".into(),
            format!("virtio-net-pci,netdev=n{nic},mac={}", mac(index, nic)),
        ]);
    }
    Ok(args)
}

/// Acceleration to use: KVM only if a guest boots under it within 20 s (the answer is cached in `cache`).
pub fn probe_accel(image: &Image, cache: &Path) -> Accel {
    let cached = cache.join("accel");
    if let Ok(text) = std::fs::read_to_string(&cached) {
        match text.trim() {
            "kvm" => return Accel::Kvm,
            "tcg" => return Accel::Tcg,
            _ => {}
        }
    }
    let accel = if Path::new("/dev/kvm").exists() {
        let spec = VmSpec { name: "probe".into(), nics: 0, memory_mib: 256, script: "exit 0\n".into() };
        let dir = std::env::temp_dir().join(format!("testbed-probe-{}", std::process::id()));
        let ok = Run::start(image, Accel::Kvm, &[spec], &[], &[], &dir)
            .map(|mut run| run.wait(Duration::from_secs(20)).first().is_some_and(|o| o.exit == Some(0)))
            .unwrap_or(false);
        let _ = std::fs::remove_dir_all(&dir);
        if ok { Accel::Kvm } else { Accel::Tcg }
    } else {
        Accel::Tcg
    };
    tracing::info!(?accel, "acceleration probed");
    let _ = std::fs::write(&cached, if accel == Accel::Kvm { "kvm" } else { "tcg" });
    accel
}

impl Run {
    /// Writes the scripts into `shared` (created, emptied) and launches every VM.
    pub fn start(
        image: &Image,
        accel: Accel,
        vms: &[VmSpec],
        cables: &[Cable],
        taps: &[Tap],
        shared: &Path,
    ) -> Result<Run, VmError> {
        Run::start_with_files(image, accel, vms, cables, taps, shared, &[])
    }

    /// `start`, with `files` (host path, name under the shared directory) placed in the shared directory
    /// before the VMs boot — the way to give them host files outside what they see of `/` (the host's `/tmp`
    /// is not: each VM has its own).
    pub fn start_with_files(
        image: &Image,
        accel: Accel,
        vms: &[VmSpec],
        cables: &[Cable],
        taps: &[Tap],
        shared: &Path,
        files: &[(PathBuf, String)],
    ) -> Result<Run, VmError> {
        require("qemu-system-x86_64", "apt-get install qemu-system-x86")?;
        if vms.is_empty() || vms.len() > 4 {
            return Err(VmError::Topology(format!("{} VMs (1..=4)", vms.len())));
        }
        for &((a, an), (b, bn)) in cables {
            let ok = |v: usize, n: usize| vms.get(v).is_some_and(|s| n < s.nics);
            if !ok(a, an) || !ok(b, bn) || (a, an) == (b, bn) {
                return Err(VmError::Topology(format!("cable {a}.{an} – {b}.{bn} names no NIC")));
            }
        }
        let _ = std::fs::remove_dir_all(shared);
        std::fs::create_dir_all(shared).map_err(io(shared))?;
        for (source, name) in files {
            let to = shared.join(name);
            if let Some(dir) = to.parent() {
                std::fs::create_dir_all(dir).map_err(io(dir))?;
            }
            // A hard link where the file system allows, a copy otherwise.
            if std::fs::hard_link(source, &to).is_err() {
                std::fs::copy(source, &to).map_err(io(&to))?;
            }
        }
        // Unix socket paths must stay short (108 bytes).
        let sockets = std::env::temp_dir().join(format!("tb-{}-{}", std::process::id(), crate::unique()));
        std::fs::create_dir_all(&sockets).map_err(io(&sockets))?;
        let id = crate::unique();
        // Tap NICs live in a namespace of the run's own; QEMU opens them there, so every VM runs inside it.
        let netns = (!taps.is_empty()).then(|| format!("tb-{}-{id}", std::process::id()));
        let tap_names: Vec<(Tap, String)> = taps
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), format!("tbt{}x{id}x{i}", std::process::id() % 10000)))
            .collect();
        let mut run = Run {
            shared: shared.to_owned(),
            netns: netns.clone(),
            tap_devices: tap_names.iter().map(|(_, name)| name.clone()).collect(),
            sockets: sockets.clone(),
            vms: Vec::new(),
            started: Instant::now(),
            boot_seen: vec![None; vms.len()],
            power_down_seen: vec![None; vms.len()],
        };
        if let Some(ns) = &netns {
            require("ip", "apt-get install iproute2")?;
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        for (i, spec) in vms.iter().enumerate() {
            let script = shared.join(format!("{}.sh", spec.name));
            std::fs::write(&script, format!("{}\n{}", crate::guest::PRELUDE, spec.script)).map_err(io(&script))?;
            let args = qemu_args(image, accel, spec, i, shared, &sockets, cables, &tap_names)?;
            let stderr = std::fs::File::create(shared.join(format!("{}.qemu", spec.name))).map_err(io(shared))?;
            let mut command = match &netns {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                    c
                }
                None => Command::new("qemu-system-x86_64"),
            };
            let child = command
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .map_err(VmError::Spawn)?;
            run.vms.push((spec.clone(), child));
        }
        if let Some(ns) = &netns {
            for (tap, name) in &tap_names {
                // QEMU creates the tap as it starts: wait for it, then give it its address.
                let deadline = Instant::now() + Duration::from_secs(20);
                while ip(&["-n", ns, "link", "show", name]).is_err() {
                    if Instant::now() > deadline {
                        return Err(VmError::Topology(format!("tap {name} never appeared in {ns}")));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                ip(&["-n", ns, "addr", "add", &tap.host_addr, "dev", name])?;
                ip(&["-n", ns, "link", "set", name, "up"])?;
            }
        }
        Ok(run)
    }

    /// The network namespace holding the run's tap devices, if it has any.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// The name of tap device `i` (in the order the taps were given), inside [`Run::netns`].
    pub fn tap_device(&self, i: usize) -> Option<&str> {
        self.tap_devices.get(i).map(String::as_str)
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// A file of the shared directory, if present.
    pub fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.shared.join(name)).ok()
    }

    pub fn touch(&self, name: &str) {
        let _ = std::fs::write(self.shared.join(name), b"");
    }

    fn note_boots(&mut self) {
        for (i, (spec, _)) in self.vms.iter().enumerate() {
            if self.boot_seen[i].is_none() && self.shared.join(format!("{}.boot", spec.name)).exists() {
                self.boot_seen[i] = Some(self.started.elapsed().as_secs_f64());
            }
        }
    }

    /// Whether every VM has powered off. A QEMU still running `POWER_DOWN_GRACE` after its guest powered off
    /// counts as finished (QEMU under TCG has been seen to linger there); `outcomes` kills it.
    pub fn finished(&mut self) -> bool {
        self.note_boots();
        let mut all = true;
        for (i, (spec, child)) in self.vms.iter_mut().enumerate() {
            if child.try_wait().ok().flatten().is_some() {
                continue;
            }
            if self.power_down_seen[i].is_none() {
                let console = std::fs::read(self.shared.join(format!("{}.console", spec.name))).unwrap_or_default();
                if String::from_utf8_lossy(&console).contains(POWER_DOWN) {
                    self.power_down_seen[i] = Some(Instant::now());
                }
            }
            all &= self.power_down_seen[i].is_some_and(|t| t.elapsed() >= POWER_DOWN_GRACE);
        }
        all
    }

    /// Waits for every VM to power off, at most `timeout` from now; kills the rest.
    pub fn wait(&mut self, timeout: Duration) -> Vec<VmOutcome> {
        let deadline = Instant::now() + timeout;
        while !self.finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.outcomes()
    }

    /// Kills what still runs and says what became of each VM.
    pub fn outcomes(&mut self) -> Vec<VmOutcome> {
        self.note_boots();
        let mut out = Vec::new();
        for (i, (spec, child)) in self.vms.iter_mut().enumerate() {
            let running = child.try_wait().ok().flatten().is_none();
            let powered_down = self.power_down_seen[i].is_some_and(|t| t.elapsed() >= POWER_DOWN_GRACE);
            if running {
                let _ = child.kill();
            }
            let (timed_out, killed_after_power_down) = (running && !powered_down, running && powered_down);
            if killed_after_power_down {
                tracing::warn!(vm = %spec.name, "the guest powered off but QEMU did not exit: killed");
            }
            let _ = child.wait();
            let exit = std::fs::read_to_string(self.shared.join(format!("{}.exit", spec.name)))
                .ok()
                .and_then(|t| t.trim().parse().ok());
            out.push(VmOutcome {
                name: spec.name.clone(),
                exit,
                timed_out,
                killed_after_power_down,
                boot_seconds: self.boot_seen[i],
                console: self.shared.join(format!("{}.console", spec.name)),
                log: self.shared.join(format!("{}.log", spec.name)),
            });
        }
        out
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        for (_, child) in &mut self.vms {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.sockets);
        if let Some(ns) = &self.netns {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), VmError> {
    let out = Command::new("ip").args(args).output().map_err(|e| VmError::Topology(format!("ip: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(VmError::Topology(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())))
    }
}
