//! `target.toml`: limits, listeners, subsystems and their namespaces. Errors name the file, the line and the
//! field. With no file, [`TargetConfig::default_ram`] serves a 1 GiB RAM namespace on 127.0.0.1:4420.
//!
//! ```toml
//! [target]                      # all optional
//! poll_groups = 2               # default: number of cores
//! max_queue_depth = 128
//! max_io_queues = 16
//! in_capsule_data_size = 4096
//! max_io_size = "128K"          # MDTS
//! pool_buffers = 256            # per poll group
//! srq_depth = 1024              # receives shared by a poll group's queues (soft provider)
//! repair_interval_ms = 1000
//! control_socket = "/run/nvmf-target.sock"
//!
//! [[listener]]
//! address = "127.0.0.1"
//! ports = [4420]                # NVMe/RDMA service ids (rdma_cm ports)
//! udp_port = 4791               # RoCEv2 (soft provider)
//! provider = "soft"             # or "verbs": libibverbs + kernel rdma_cm (RNICs, kernel rxe)
//!
//! [[subsystem]]
//! nqn = "nqn.2026-11.dev.nvmf-rs:ram"
//! allow_any_host = true         # or: hosts = ["nqn.2014-08.org.nvmexpress:uuid:..."]
//! serial = "0123456789"         # optional
//! model = "nvmf-target"         # optional
//!
//! [[subsystem.namespace]]
//! nsid = 1
//! backend = "ram"               # "ram" (size), "file" (path, size), "block" (path)
//! size = "1G"
//! block_size = 512              # ram and file
//! ```

use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::backend::{BackendSpec, check_geometry};
use crate::core::TargetLimits;
use crate::rdma::{ListenSpec, RdmaOptions};

/// The NQN the target serves when run without a configuration.
pub const DEFAULT_NQN: &str = "nqn.2026-11.dev.nvmf-rs:ram";
pub const DEFAULT_PORT: u16 = 4420;
pub const DEFAULT_RAM_SIZE: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {field}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub field: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceConfig {
    pub nsid: u32,
    pub backend: BackendSpec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsystemConfig {
    pub nqn: String,
    pub serial: Option<String>,
    pub model: Option<String>,
    pub allow_any_host: bool,
    pub hosts: Vec<String>,
    pub namespaces: Vec<NamespaceConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    pub limits: TargetLimits,
    pub rdma: RdmaOptions,
    pub control_socket: Option<PathBuf>,
    pub listeners: Vec<ListenSpec>,
    pub subsystems: Vec<SubsystemConfig>,
}

impl TargetConfig {
    /// One 1 GiB RAM namespace under [`DEFAULT_NQN`], any host, on 127.0.0.1:4420 (UDP 4791).
    pub fn default_ram() -> TargetConfig {
        TargetConfig {
            limits: TargetLimits::default(),
            rdma: RdmaOptions::default(),
            control_socket: None,
            listeners: vec![ListenSpec {
                addr: IpAddr::from([127, 0, 0, 1]),
                trsvcids: vec![DEFAULT_PORT],
                udp_port: transport::soft::wire::ROCEV2_UDP_PORT,
                provider: transport::Provider::Soft,
            }],
            subsystems: vec![SubsystemConfig {
                nqn: DEFAULT_NQN.into(),
                serial: None,
                model: None,
                allow_any_host: true,
                hosts: Vec::new(),
                namespaces: vec![NamespaceConfig {
                    nsid: 1,
                    backend: BackendSpec::Ram { size: DEFAULT_RAM_SIZE, block_size: 512 },
                }],
            }],
        }
    }

    pub fn load(path: &Path) -> Result<TargetConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: 0,
            field: "(file)".into(),
            message: e.to_string(),
        })?;
        TargetConfig::parse(&path.display().to_string(), &text)
    }

    /// Parses `text` (named `file` in errors).
    pub fn parse(file: &str, text: &str) -> Result<TargetConfig, ConfigError> {
        let line_of = |span: Range<usize>| text[..span.start.min(text.len())].matches('\n').count() + 1;
        let err = |span: Range<usize>, field: &str, message: String| ConfigError {
            file: file.into(),
            line: line_of(span),
            field: field.into(),
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let field = e.message().split('`').nth(1).unwrap_or("(syntax)").to_string();
            err(span, &field, e.message().trim().to_string())
        })?;
        let mut limits = TargetLimits::default();
        let mut rdma = RdmaOptions::default();
        let mut control_socket = None;
        if let Some(t) = raw.target {
            if let Some(v) = t.poll_groups {
                if *v.get_ref() == 0 || *v.get_ref() > 256 {
                    return Err(err(v.span(), "target.poll_groups", "must be 1..=256".into()));
                }
                rdma.poll_groups = *v.get_ref();
            }
            if let Some(v) = t.pool_buffers {
                if *v.get_ref() == 0 {
                    return Err(err(v.span(), "target.pool_buffers", "must be at least 1".into()));
                }
                rdma.pool_buffers = *v.get_ref();
            }
            if let Some(v) = t.repair_interval_ms {
                if *v.get_ref() == 0 {
                    return Err(err(v.span(), "target.repair_interval_ms", "must be at least 1".into()));
                }
                rdma.repair_interval = Duration::from_millis(*v.get_ref());
            }
            if let Some(v) = t.max_queue_depth {
                if !(2..=1024).contains(v.get_ref()) {
                    return Err(err(v.span(), "target.max_queue_depth", "must be 2..=1024".into()));
                }
                limits.max_queue_depth = *v.get_ref();
            }
            if let Some(v) = t.max_io_queues {
                if !(1..=1024).contains(v.get_ref()) {
                    return Err(err(v.span(), "target.max_io_queues", "must be 1..=1024".into()));
                }
                limits.max_io_queues = *v.get_ref();
            }
            if let Some(v) = t.in_capsule_data_size {
                let n = size_of(&v).map_err(|m| err(v.span(), "target.in_capsule_data_size", m))?;
                if n % 16 != 0 || n > 64 * 1024 {
                    return Err(err(
                        v.span(),
                        "target.in_capsule_data_size",
                        "must be a multiple of 16, at most 64K".into(),
                    ));
                }
                limits.in_capsule_data_size = n as u32;
            }
            if let Some(v) = t.max_io_size {
                let n = size_of(&v).map_err(|m| err(v.span(), "target.max_io_size", m))?;
                if !n.is_power_of_two() || !(4096..=(1 << 24)).contains(&n) {
                    return Err(err(v.span(), "target.max_io_size", "must be a power of two in 4K..=16M".into()));
                }
                limits.max_io_size = n as u32;
            }
            if let Some(v) = t.srq_depth {
                if !(16..=65536).contains(v.get_ref()) {
                    return Err(err(v.span(), "target.srq_depth", "must be 16..=65536".into()));
                }
                limits.srq_depth = *v.get_ref();
            }
            control_socket = t.control_socket.map(PathBuf::from);
        }
        let mut listeners = Vec::new();
        for l in raw.listener {
            let addr: IpAddr =
                l.address.get_ref().parse().map_err(|e| err(l.address.span(), "listener.address", format!("{e}")))?;
            let ports = l.ports.map(|p| p.into_inner()).unwrap_or_else(|| vec![DEFAULT_PORT]);
            if ports.is_empty() {
                return Err(err(l.address.span(), "listener.ports", "at least one port".into()));
            }
            listeners.push(ListenSpec {
                addr,
                trsvcids: ports,
                udp_port: l.udp_port.unwrap_or(transport::soft::wire::ROCEV2_UDP_PORT),
                provider: match &l.provider {
                    Some(p) => p.get_ref().parse().map_err(|e| err(p.span(), "listener.provider", e))?,
                    None => transport::Provider::Soft,
                },
            });
        }
        if listeners.is_empty() {
            return Err(err(0..0, "listener", "at least one [[listener]] is needed".into()));
        }
        let mut subsystems = Vec::new();
        for s in raw.subsystem {
            let nqn = s.nqn.get_ref().clone();
            nvme_proto::Nqn::new(&nqn).map_err(|e| err(s.nqn.span(), "subsystem.nqn", e.to_string()))?;
            if subsystems.iter().any(|x: &SubsystemConfig| x.nqn == nqn) {
                return Err(err(s.nqn.span(), "subsystem.nqn", format!("{nqn} appears twice")));
            }
            if let Some(serial) = &s.serial
                && (serial.get_ref().len() > 20 || !serial.get_ref().is_ascii())
            {
                return Err(err(serial.span(), "subsystem.serial", "at most 20 ASCII characters".into()));
            }
            if let Some(model) = &s.model
                && (model.get_ref().len() > 40 || !model.get_ref().is_ascii())
            {
                return Err(err(model.span(), "subsystem.model", "at most 40 ASCII characters".into()));
            }
            let allow_any_host = s.allow_any_host.unwrap_or(s.hosts.is_empty());
            let mut namespaces = Vec::new();
            for n in s.namespace {
                let nsid = *n.nsid.get_ref();
                if nsid == 0 || nsid == u32::MAX || namespaces.iter().any(|x: &NamespaceConfig| x.nsid == nsid) {
                    return Err(err(
                        n.nsid.span(),
                        "subsystem.namespace.nsid",
                        format!("{nsid} is invalid or repeated"),
                    ));
                }
                let block_size = n.block_size.as_ref().map_or(512, |b| *b.get_ref());
                let size = match &n.size {
                    Some(v) => Some(size_of(v).map_err(|m| err(v.span(), "subsystem.namespace.size", m))?),
                    None => None,
                };
                let span = n.backend.span();
                let backend = match n.backend.get_ref().as_str() {
                    "ram" => {
                        let size = size.ok_or_else(|| {
                            err(span.clone(), "subsystem.namespace.size", "a RAM namespace needs a size".into())
                        })?;
                        BackendSpec::Ram { size, block_size }
                    }
                    "file" => {
                        let path = n.path.clone().ok_or_else(|| {
                            err(span.clone(), "subsystem.namespace.path", "a file namespace needs a path".into())
                        })?;
                        BackendSpec::File { path: path.into(), size, block_size }
                    }
                    "block" => {
                        let path = n.path.clone().ok_or_else(|| {
                            err(span.clone(), "subsystem.namespace.path", "a block namespace needs a path".into())
                        })?;
                        BackendSpec::Block { path: path.into() }
                    }
                    other => {
                        return Err(err(
                            span,
                            "subsystem.namespace.backend",
                            format!("{other:?} is not ram, file or block"),
                        ));
                    }
                };
                if let (Some(size), false) = (size, matches!(backend, BackendSpec::Block { .. })) {
                    let at = n.size.as_ref().map_or(span.clone(), |s| s.span());
                    check_geometry(size, block_size).map_err(|e| err(at, "subsystem.namespace.size", e.to_string()))?;
                }
                namespaces.push(NamespaceConfig { nsid, backend });
            }
            subsystems.push(SubsystemConfig {
                nqn,
                serial: s.serial.map(|v| v.into_inner()),
                model: s.model.map(|v| v.into_inner()),
                allow_any_host,
                hosts: s.hosts,
                namespaces,
            });
        }
        Ok(TargetConfig { limits, rdma, control_socket, listeners, subsystems })
    }
}

/// A size: bytes as an integer, or text with a K/M/G/T suffix (powers of 1024).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

fn size_of(v: &Spanned<SizeValue>) -> Result<u64, String> {
    match v.get_ref() {
        SizeValue::Bytes(n) => Ok(*n),
        SizeValue::Text(t) => parse_size(t),
    }
}

/// "4096", "128K", "1G", "1.5T" is refused (whole numbers only).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{text:?}: unknown unit {c:?} (K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits.trim().parse().map_err(|_| format!("{text:?} is not a size (e.g. 4096, 128K, 1G)"))?;
    n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("{text:?} is too large"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    target: Option<RawTarget>,
    #[serde(default)]
    listener: Vec<RawListener>,
    #[serde(default)]
    subsystem: Vec<RawSubsystem>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    poll_groups: Option<Spanned<usize>>,
    pool_buffers: Option<Spanned<usize>>,
    repair_interval_ms: Option<Spanned<u64>>,
    max_queue_depth: Option<Spanned<u16>>,
    max_io_queues: Option<Spanned<u16>>,
    in_capsule_data_size: Option<Spanned<SizeValue>>,
    max_io_size: Option<Spanned<SizeValue>>,
    srq_depth: Option<Spanned<u32>>,
    control_socket: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    address: Spanned<String>,
    ports: Option<Spanned<Vec<u16>>>,
    udp_port: Option<u16>,
    provider: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubsystem {
    nqn: Spanned<String>,
    serial: Option<Spanned<String>>,
    model: Option<Spanned<String>>,
    allow_any_host: Option<bool>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    namespace: Vec<RawNamespace>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamespace {
    nsid: Spanned<u32>,
    backend: Spanned<String>,
    size: Option<Spanned<SizeValue>>,
    path: Option<String>,
    block_size: Option<Spanned<u32>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[target]
poll_groups = 2
max_io_size = "64K"

[[listener]]
address = "127.0.0.1"
ports = [4420, 4421]
udp_port = 0

[[subsystem]]
nqn = "nqn.2026-11.dev.nvmf-rs:a"
hosts = ["nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"]

[[subsystem.namespace]]
nsid = 1
backend = "ram"
size = "64M"

[[subsystem.namespace]]
nsid = 2
backend = "file"
path = "/tmp/x.img"
size = 1048576
block_size = 4096
"#;

    #[test]
    fn parses_a_full_file() {
        let c = TargetConfig::parse("t.toml", GOOD).unwrap();
        assert_eq!(c.rdma.poll_groups, 2);
        assert_eq!(c.limits.srq_depth, TargetLimits::default().srq_depth);
        let deep = TargetConfig::parse("t.toml", &GOOD.replace("poll_groups = 2", "poll_groups = 2\nsrq_depth = 4096"));
        assert_eq!(deep.unwrap().limits.srq_depth, 4096);
        assert_eq!(c.limits.max_io_size, 64 * 1024);
        assert_eq!(c.listeners[0].trsvcids, vec![4420, 4421]);
        assert_eq!(c.listeners[0].udp_port, 0);
        let s = &c.subsystems[0];
        assert!(!s.allow_any_host);
        assert_eq!(s.namespaces[0].backend, BackendSpec::Ram { size: 64 << 20, block_size: 512 });
        assert_eq!(
            s.namespaces[1].backend,
            BackendSpec::File { path: "/tmp/x.img".into(), size: Some(1 << 20), block_size: 4096 }
        );
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let bad = GOOD.replace("size = \"64M\"", "size = \"64Q\"");
        let e = TargetConfig::parse("t.toml", &bad).unwrap_err();
        assert_eq!((e.file.as_str(), e.line, e.field.as_str()), ("t.toml", 18, "subsystem.namespace.size"), "{e}");
        let bad = GOOD.replace("poll_groups = 2", "poll_groups = 2\nsrq_depth = 8");
        let e = TargetConfig::parse("t.toml", &bad).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (4, "target.srq_depth"), "{e}");
        let bad = GOOD.replace("poll_groups = 2", "poll_grups = 2");
        let e = TargetConfig::parse("t.toml", &bad).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (3, "poll_grups"), "{e}");
        let bad = GOOD.replace("address = \"127.0.0.1\"", "address = \"127.0.0.300\"");
        let e = TargetConfig::parse("t.toml", &bad).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (7, "listener.address"), "{e}");
        let bad = GOOD.replace("size = 1048576", "size = 1048577");
        let e = TargetConfig::parse("t.toml", &bad).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (24, "subsystem.namespace.size"), "{e}");
        let bad = GOOD.replace("backend = \"ram\"", "backend = \"nvram\"");
        let e = TargetConfig::parse("t.toml", &bad).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (17, "subsystem.namespace.backend"), "{e}");
        let bad = GOOD.replace("nqn = \"nqn.2026-11.dev.nvmf-rs:a\"", "nqn = \"not an nqn\"");
        let e = TargetConfig::parse("t.toml", &bad).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (12, "subsystem.nqn"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("128K"), Ok(128 << 10));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("").is_err());
    }
}
