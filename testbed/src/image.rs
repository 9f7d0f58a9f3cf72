//! `testbed vm image`: a stock Debian kernel and an initramfs that boots it into the host's own userspace.
//!
//! The kernel package is the one `linux-image-amd64` depends on; busybox comes from busybox-static. Both are
//! fetched with `apt-get download` (no install), unpacked, `depmod`-ed, and the modules the testbed needs are
//! resolved with their dependencies (`modprobe --show-depends`, in load order). The initramfs holds busybox,
//! those modules and [`crate::guest::INIT`]; the kernel and the initramfs are cached under
//! `CACHE/KERNEL-VERSION/`, so a second call does nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::CpioWriter;

/// Modules loaded at boot, in this order (each after its dependencies). crc32_generic first: rdma_rxe needs
/// the crc32 algorithm and fails to initialise without it.
pub const MODULES: &[&str] = &[
    "crc32_generic",
    "virtio_net",
    "virtio_pci",
    "9p",
    "9pnet_virtio",
    "overlay",
    "configfs",
    "af_packet",
    "bonding",
    "rdma_rxe",
    "ib_uverbs",
    "rdma_ucm",
    "nvme_rdma",
    "nvmet_rdma",
    "null_blk",
];

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{tool} not found: {hint}")]
    MissingTool { tool: &'static str, hint: &'static str },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Unexpected(String),
}

/// A bootable image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub version: String,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io { path: path.to_owned(), source }
}

fn run(cmd: &mut Command) -> Result<String, ImageError> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| ImageError::Command { command: shown.clone(), detail: e.to_string() })?;
    if !out.status.success() {
        return Err(ImageError::Command {
            command: shown,
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn require(tool: &'static str, hint: &'static str) -> Result<(), ImageError> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).chain(["/sbin".into(), "/usr/sbin".into()]).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if found { Ok(()) } else { Err(ImageError::MissingTool { tool, hint }) }
}

/// The default cache: `$XDG_CACHE_HOME/nvmf-testbed` or `~/.cache/nvmf-testbed`.
pub fn default_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("nvmf-testbed")
}

/// The kernel package `linux-image-amd64` depends on, e.g. `linux-image-6.1.0-48-amd64`.
fn kernel_package() -> Result<String, ImageError> {
    let out = run(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_string)
        .ok_or_else(|| ImageError::Unexpected(format!("linux-image-amd64 depends on no kernel image: {out}")))
}

/// Builds (or finds in the cache) the image.
pub fn build(cache: &Path) -> Result<Image, ImageError> {
    for (tool, hint) in [
        ("apt-get", "the testbed fetches Debian packages with apt"),
        ("dpkg", "dpkg unpacks the packages"),
        ("depmod", "apt-get install kmod"),
        ("modprobe", "apt-get install kmod"),
    ] {
        require(tool, hint)?;
    }
    let package = kernel_package()?;
    let version = package.trim_start_matches("linux-image-").to_string();
    let dir = cache.join(&version);
    let mut image =
        Image { version: version.clone(), kernel: dir.join("vmlinuz"), initramfs: dir.join("initramfs.cpio") };
    if image.kernel.is_file() && image.initramfs.is_file() {
        if dir.join("vmlinux").is_file() {
            image.kernel = dir.join("vmlinux");
        }
        return Ok(image);
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let work = dir.join("unpacked");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    tracing::info!(%package, "downloading the kernel and busybox-static");
    run(Command::new("apt-get").current_dir(&work).args(["download", "-q", &package, "busybox-static"]))?;
    let root = work.join("root");
    for entry in std::fs::read_dir(&work).map_err(io(&work))? {
        let path = entry.map_err(io(&work))?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            run(Command::new("dpkg").arg("-x").arg(&path).arg(&root))?;
        }
    }
    run(Command::new("depmod").arg("-b").arg(&root).arg(&version))?;
    let mut order: Vec<(PathBuf, String)> = Vec::new();
    for module in MODULES {
        let out = run(Command::new("modprobe").arg("-d").arg(&root).args(["-S", &version, "--show-depends", module]))?;
        for line in out.lines() {
            let Some(rest) = line.strip_prefix("insmod ") else { continue }; // "builtin X": nothing to load
            let mut parts = rest.trim().splitn(2, ' ');
            let path = PathBuf::from(parts.next().unwrap_or_default());
            // Options from the package's modprobe.d come along (bonding's max_bonds=0: bonds are made by hand).
            let params = parts.next().unwrap_or_default().trim().to_string();
            if !order.iter().any(|(p, _)| *p == path) {
                order.push((path, params));
            }
        }
    }
    let mut cpio = CpioWriter::new(Vec::new());
    let add = |e: std::io::Error| ImageError::Unexpected(format!("initramfs: {e}"));
    for d in ["bin", "lib", "lib/modules", "proc", "sys", "dev", "host", "rw", "newroot"] {
        cpio.dir(d).map_err(add)?;
    }
    let busybox_path = root.join("bin/busybox");
    let busybox = std::fs::read(&busybox_path).map_err(io(&busybox_path))?;
    cpio.file("bin/busybox", &busybox, true).map_err(add)?;
    cpio.symlink("bin/sh", "busybox").map_err(add)?;
    let mut listing = String::new();
    for (i, (path, params)) in order.iter().enumerate() {
        let data = std::fs::read(path).map_err(io(path))?;
        let name = format!("lib/modules/{i:03}-{}", path.file_name().and_then(|f| f.to_str()).unwrap_or("module.ko"));
        cpio.file(&name, &data, false).map_err(add)?;
        listing.push_str(&format!("/{name} {params}\n"));
    }
    cpio.file("modules.order", listing.as_bytes(), false).map_err(add)?;
    cpio.file("init", crate::guest::INIT.as_bytes(), true).map_err(add)?;
    let bytes = cpio.finish().map_err(add)?;
    let kernel_src = root.join(format!("boot/vmlinuz-{version}"));
    std::fs::copy(&kernel_src, &image.kernel).map_err(io(&kernel_src))?;
    // The uncompressed kernel boots through its PVH entry, seconds faster under TCG than the bzImage through
    // the BIOS; without xz the bzImage does.
    match extract_vmlinux(&image.kernel, &dir.join("vmlinux")) {
        Ok(vmlinux) => image.kernel = vmlinux,
        Err(e) => tracing::warn!("booting the bzImage: no vmlinux ({e})"),
    }
    let tmp = image.initramfs.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &image.initramfs).map_err(io(&image.initramfs))?;
    // The unpacked package is ~400 MB; the image needs none of it any more.
    let _ = std::fs::remove_dir_all(&work);
    tracing::info!(version, modules = order.len(), "image ready");
    Ok(image)
}

/// Unpacks the kernel inside a bzImage (its xz payload) to `out`.
fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<PathBuf, ImageError> {
    use std::io::Write;
    require("xz", "apt-get install xz-utils")?;
    let data = std::fs::read(bzimage).map_err(io(bzimage))?;
    let start = data
        .windows(6)
        .position(|w| w == b"\xfd7zXZ\x00")
        .ok_or_else(|| ImageError::Unexpected(format!("{}: no xz payload", bzimage.display())))?;
    let file = std::fs::File::create(out).map_err(io(out))?;
    let mut child = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(std::process::Stdio::piped())
        .stdout(file)
        .spawn()
        .map_err(|e| ImageError::Command { command: "xz -dc".into(), detail: e.to_string() })?;
    let mut stdin = child.stdin.take().expect("piped");
    let payload = data[start..].to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&payload));
    let status = child.wait().map_err(|e| ImageError::Command { command: "xz -dc".into(), detail: e.to_string() })?;
    let _ = feeder.join();
    let elf = std::fs::read(out).map(|b| b.starts_with(b"\x7fELF")).unwrap_or(false);
    if !status.success() || !elf {
        let _ = std::fs::remove_file(out);
        return Err(ImageError::Command { command: "xz -dc".into(), detail: format!("{status}, ELF: {elf}") });
    }
    Ok(out.to_owned())
}
