//! nvmf-target: serves NVMe namespaces to NVMe-oF RDMA hosts.
//!
//! With no arguments it serves a 1 GiB RAM namespace under `nqn.2026-11.dev.nvmf-rs:ram` on 127.0.0.1:4420
//! (soft RoCEv2 provider, UDP 4791) and prints how to connect. `--config target.toml` reads a file (see the
//! `config` module); the flags below build a simple configuration instead. SIGINT / SIGTERM: stop accepting,
//! drain every queue, flush the namespaces, exit 0. SIGUSR1: log a stats snapshot. Logs go to stderr
//! (`RUST_LOG` sets the level, `info` by default).
#![allow(clippy::print_stdout)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use target::backend::BackendSpec;
use target::config::{DEFAULT_NQN, DEFAULT_PORT, NamespaceConfig, TargetConfig, parse_size};
use target::rdma::ListenSpec;
use target::subsystem::Subsystem;
use target::{RdmaTarget, Target};

#[derive(Debug, Parser)]
#[command(
    name = "nvmf-target",
    version,
    about = "An NVMe-over-Fabrics RDMA target that keeps serving while its links fail"
)]
struct Args {
    /// Configuration file (TOML); the flags below are then not allowed, except --control-socket.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Address to listen on (repeatable).
    #[arg(long, short = 'a', value_name = "ADDR")]
    listen: Vec<IpAddr>,
    /// NVMe/RDMA service id (rdma_cm port).
    #[arg(long, short = 's', default_value_t = DEFAULT_PORT)]
    port: u16,
    /// RDMA provider: soft (userspace RoCEv2, no hardware) or verbs (libibverbs and the kernel's rdma_cm: RNICs,
    /// kernel rxe).
    #[arg(long, default_value = "soft", value_parser = transport::Provider::NAMES)]
    provider: String,
    /// RoCEv2 UDP port of the soft provider (0: any free port, printed at start).
    #[arg(long, default_value_t = transport::soft::wire::ROCEV2_UDP_PORT)]
    udp_port: u16,
    /// Subsystem NQN.
    #[arg(long, short = 'n', default_value = DEFAULT_NQN)]
    nqn: String,
    /// RAM namespace size (e.g. 1G); ignored with --file or --block.
    #[arg(long, default_value = "1G")]
    ram_size: String,
    /// Serve this file as namespace 1 (created sparse with --file-size when missing).
    #[arg(long, conflicts_with = "block")]
    file: Option<PathBuf>,
    #[arg(long, requires = "file")]
    file_size: Option<String>,
    /// Serve this block device as namespace 1 (O_DIRECT).
    #[arg(long)]
    block: Option<PathBuf>,
    /// Only this host NQN may connect (repeatable; default: any host).
    #[arg(long)]
    allow_host: Vec<String>,
    /// Poll group threads (default: number of cores).
    #[arg(long)]
    poll_groups: Option<usize>,
    /// Serve stats and live changes on this Unix socket.
    #[arg(long)]
    control_socket: Option<PathBuf>,
}

fn from_flags(args: &Args) -> Result<TargetConfig, String> {
    let mut config = TargetConfig::default_ram();
    let provider: transport::Provider = args.provider.parse()?;
    if !args.listen.is_empty() {
        config.listeners = args
            .listen
            .iter()
            .map(|&addr| ListenSpec { addr, trsvcids: vec![args.port], udp_port: args.udp_port, provider })
            .collect();
    } else {
        config.listeners[0].trsvcids = vec![args.port];
        config.listeners[0].udp_port = args.udp_port;
        config.listeners[0].provider = provider;
    }
    nvme_proto::Nqn::new(&args.nqn).map_err(|e| format!("--nqn: {e}"))?;
    let subsystem = &mut config.subsystems[0];
    subsystem.nqn = args.nqn.clone();
    subsystem.allow_any_host = args.allow_host.is_empty();
    subsystem.hosts = args.allow_host.clone();
    let backend = if let Some(path) = &args.file {
        let size = args.file_size.as_deref().map(parse_size).transpose().map_err(|e| format!("--file-size: {e}"))?;
        BackendSpec::File { path: path.clone(), size, block_size: 512 }
    } else if let Some(path) = &args.block {
        BackendSpec::Block { path: path.clone() }
    } else {
        let size = parse_size(&args.ram_size).map_err(|e| format!("--ram-size: {e}"))?;
        target::backend::check_geometry(size, 512).map_err(|e| format!("--ram-size: {e}"))?;
        BackendSpec::Ram { size, block_size: 512 }
    };
    subsystem.namespaces = vec![NamespaceConfig { nsid: 1, backend }];
    if let Some(n) = args.poll_groups {
        if n == 0 {
            return Err("--poll-groups: at least 1".into());
        }
        config.rdma.poll_groups = n;
    }
    Ok(config)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let flags_given = !args.listen.is_empty()
        || args.file.is_some()
        || args.block.is_some()
        || !args.allow_host.is_empty()
        || args.poll_groups.is_some();
    let mut config = match &args.config {
        Some(_) if flags_given => {
            eprintln!(
                "nvmf-target: --config cannot be combined with --listen/--file/--block/--allow-host/--poll-groups"
            );
            return ExitCode::from(2);
        }
        Some(path) => match TargetConfig::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("nvmf-target: {e}");
                return ExitCode::from(2);
            }
        },
        None => match from_flags(&args) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("nvmf-target: {e}");
                return ExitCode::from(2);
            }
        },
    };
    if args.control_socket.is_some() {
        config.control_socket = args.control_socket.clone();
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nvmf-target: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nvmf-target: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: TargetConfig) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut usr1 = signal(SignalKind::user_defined1()).map_err(|e| e.to_string())?;

    let mut rdma = RdmaTarget::start(config.limits, config.rdma.clone()).await.map_err(|e| e.to_string())?;
    let target = rdma.target().clone();
    for s in &config.subsystems {
        let serial = s.serial.clone().unwrap_or_else(|| Target::default_serial(&s.nqn));
        let model = s.model.clone().unwrap_or_else(|| target::admin::MODEL.to_string());
        target
            .add_subsystem(Subsystem::new(s.nqn.clone(), serial, model, s.allow_any_host, s.hosts.clone()))
            .map_err(|e| e.to_string())?;
        for ns in &s.namespaces {
            target.add_namespace(&s.nqn, ns.nsid, &ns.backend).map_err(|e| e.to_string())?;
        }
    }
    let mut bound = Vec::new();
    for l in &config.listeners {
        let udp = rdma.listen(l.clone()).await.map_err(|e| e.to_string())?;
        bound.push((l.clone(), udp));
    }
    let stats = rdma.stats_handle();
    let control = config.control_socket.clone().map(|path| {
        let (target, stats) = (target.clone(), Arc::new(stats.clone()));
        tokio::spawn(async move {
            if let Err(e) = target::control::serve(path.clone(), target, stats).await {
                tracing::error!(path = %path.display(), "control socket: {e}");
            }
        })
    });

    for s in &config.subsystems {
        let sizes: Vec<String> = target
            .subsystem(&s.nqn)
            .map(|sub| {
                sub.namespaces()
                    .iter()
                    .map(|n| {
                        format!(
                            "nsid {} {} {:.1} GiB",
                            n.nsid,
                            n.backend.kind(),
                            n.backend.capacity() as f64 / (1u64 << 30) as f64
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!("nvmf-target: serving {} ({})", s.nqn, sizes.join(", "));
    }
    for (l, udp) in &bound {
        for port in &l.trsvcids {
            match l.provider {
                transport::Provider::Soft => {
                    println!("nvmf-target: listening on {}:{port} (soft RoCEv2, UDP {udp})", l.addr)
                }
                transport::Provider::Verbs => println!("nvmf-target: listening on {}:{port} (verbs)", l.addr),
            }
        }
    }
    if let (Some((l, udp)), Some(s)) = (bound.first(), config.subsystems.first()) {
        let port = l.trsvcids[0];
        println!("connect with the example host:");
        println!(
            "  cargo run -p initiator --example write_read_verify -- --traddr {} --trsvcid {port} --udp-port {udp} --nqn {}",
            l.addr, s.nqn
        );
        println!("or a Linux host with an rxe device on the same link:");
        println!("  nvme connect -t rdma -a {} -s {port} -n {}", l.addr, s.nqn);
    }
    if let Some(path) = &config.control_socket {
        println!("stats: echo stats | socat - UNIX-CONNECT:{}", path.display());
    }

    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = usr1.recv() => {
                let snapshot = stats.stats().await;
                tracing::info!(stats = %serde_json::to_string(&snapshot).unwrap_or_default(), "stats");
            }
        }
    }
    tracing::info!("shutting down: draining queues, flushing namespaces");
    if let Some(c) = control {
        c.abort();
    }
    rdma.shutdown().await;
    if let Some(path) = &config.control_socket {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("stopped");
    Ok(())
}
