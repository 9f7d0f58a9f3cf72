//! The verbs: build the connection from the flags, run, print.

use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use initiator::perf::{PerfJob, Tick};
use initiator::{ConnectOptions, Controller, DataDir, ReconnectPolicy, Session, TargetAddr};
use nvme_proto::io::ReadWrite;
use nvme_proto::{IoCommand, Uuid};

use crate::Failure;
use crate::args::{Cli, Connection, OutputFormat, Perf, Provider, Transfer, Verb};
use crate::output;

/// A command's output on stdout (a CLI's output is stdout).
#[allow(clippy::print_stdout)]
fn emit(text: &str) {
    print!("{text}");
    let _ = std::io::stdout().flush();
}

fn emit_json(value: &serde_json::Value) {
    emit(&format!("{}\n", serde_json::to_string_pretty(value).unwrap_or_default()));
}

pub async fn run(cli: Cli) -> Result<ExitCode, Failure> {
    match cli.command {
        Verb::Discover(conn) => discover(conn).await,
        Verb::IdCtrl(conn) => id_ctrl(conn).await,
        Verb::IdNs { conn, namespace_id } => id_ns(conn, namespace_id).await,
        Verb::List(conn) => list(conn).await,
        Verb::Read(t) => read(t).await,
        Verb::Write(t) => write(t).await,
        Verb::Flush { conn, namespace_id } => flush(conn, namespace_id).await,
        Verb::Perf(p) => perf(p).await,
    }
}

/// The paths and options the flags describe (checked before anything is opened).
fn paths(conn: &Connection, subnqn: &str, io_queues: u16) -> Result<Vec<(TargetAddr, ConnectOptions)>, Failure> {
    if !conn.host_traddr.is_empty() && conn.host_traddr.len() != conn.traddr.len() {
        return Err(Failure::Usage(format!(
            "--host-traddr given {} times for {} --traddr; give it once per --traddr or not at all",
            conn.host_traddr.len(),
            conn.traddr.len()
        )));
    }
    let mut options = ConnectOptions::new(subnqn);
    if let Some(id) = &conn.hostid {
        options.hostid = Uuid::parse(id).map_err(|e| Failure::Usage(format!("--hostid {id:?}: {e}")))?;
        options.hostnqn = format!("nqn.2014-08.org.nvmexpress:uuid:{}", options.hostid);
    }
    match &conn.hostnqn {
        Some(n) => options.hostnqn = n.clone(),
        None if conn.hostid.is_none() => {
            if let Ok(n) = std::fs::read_to_string("/etc/nvme/hostnqn")
                && !n.trim().is_empty()
            {
                options.hostnqn = n.trim().to_string();
            }
        }
        None => {}
    }
    for (name, nqn) in [("--nqn", &options.subnqn), ("--hostnqn", &options.hostnqn)] {
        if nqn.is_empty() || nqn.len() > 223 {
            return Err(Failure::Usage(format!("{name} must be 1 to 223 bytes, not {}", nqn.len())));
        }
    }
    options.nr_io_queues = conn.nr_io_queues.unwrap_or(io_queues).max(io_queues).max(1);
    options.queue_size = conn.queue_size;
    options.provider = match conn.provider {
        Provider::Soft => transport::Provider::Soft,
        Provider::Verbs => transport::Provider::Verbs,
    };
    options.keep_alive_tmo = (conn.keep_alive_tmo > 0).then(|| Duration::from_secs(conn.keep_alive_tmo as u64));
    Ok(conn
        .traddr
        .iter()
        .enumerate()
        .map(|(i, &ip)| {
            let mut o = options.clone();
            o.local_addr = conn.host_traddr.get(i).copied();
            (TargetAddr { udp: SocketAddr::new(ip, conn.udp_port), trsvcid: conn.trsvcid }, o)
        })
        .collect())
}

fn policy(conn: &Connection) -> ReconnectPolicy {
    ReconnectPolicy::from_secs(conn.reconnect_delay, conn.ctrl_loss_tmo, conn.fast_io_fail_tmo)
}

fn subsystem(conn: &Connection) -> Result<&str, Failure> {
    conn.nqn.as_deref().ok_or_else(|| Failure::Usage("-n/--nqn SUBSYSTEM is required for this command".into()))
}

fn where_(target: TargetAddr) -> String {
    format!("{}:{}", target.udp.ip(), target.trsvcid)
}

async fn connect_one(target: TargetAddr, options: ConnectOptions) -> Result<Controller, Failure> {
    let nqn = options.subnqn.clone();
    Controller::connect(target, options)
        .await
        .map_err(|e| Failure::Run(format!("cannot connect to {nqn} at {}: {e}", where_(target))))
}

async fn session(conn: &Connection, io_queues: u16) -> Result<Session, Failure> {
    let nqn = subsystem(conn)?;
    let paths = paths(conn, nqn, io_queues)?;
    let at: Vec<String> = paths.iter().map(|(t, _)| where_(*t)).collect();
    Session::connect(paths, policy(conn))
        .await
        .map_err(|e| Failure::Run(format!("cannot connect to {nqn} at {}: {e}", at.join(", "))))
}

async fn discover(conn: Connection) -> Result<ExitCode, Failure> {
    let mut all = paths(&conn, nvme_proto::nqn::DISCOVERY_NQN, 1)?;
    let (target, options) = all.swap_remove(0);
    let ctrl = connect_one(target, options).await?;
    let log = ctrl.discovery_log().await;
    ctrl.close().await;
    let log = log?;
    match conn.output_format {
        OutputFormat::Json => emit_json(&output::discovery_json(&log)),
        OutputFormat::Normal => emit(&output::discovery_text(&log)),
    }
    Ok(ExitCode::SUCCESS)
}

async fn id_ctrl(conn: Connection) -> Result<ExitCode, Failure> {
    let s = session(&conn, 1).await?;
    let fields = output::id_ctrl_fields(&s.controller().await?.identify);
    let _ = s.shutdown().await;
    match conn.output_format {
        OutputFormat::Json => emit_json(&output::fields_json(fields)),
        OutputFormat::Normal => emit(&output::fields_text("NVME Identify Controller:", &fields)),
    }
    Ok(ExitCode::SUCCESS)
}

async fn id_ns(conn: Connection, nsid: u32) -> Result<ExitCode, Failure> {
    let s = session(&conn, 1).await?;
    let id = s.controller().await?.identify_namespace(nsid).await;
    let _ = s.shutdown().await;
    let id = id?;
    let fields = output::id_ns_fields(&id);
    match conn.output_format {
        OutputFormat::Json => emit_json(&output::fields_json(fields)),
        OutputFormat::Normal => emit(&output::fields_text(&format!("NVME Identify Namespace {nsid}:"), &fields)),
    }
    Ok(ExitCode::SUCCESS)
}

/// Discovery at every --traddr, then each NVMe subsystem's controller and namespaces.
async fn list(conn: Connection) -> Result<ExitCode, Failure> {
    let discovery_paths = paths(&conn, nvme_proto::nqn::DISCOVERY_NQN, 1)?;
    let mut seen = std::collections::BTreeSet::new();
    let mut subsystems = Vec::new();
    for (target, options) in discovery_paths {
        let ctrl = connect_one(target, options.clone()).await?;
        let log = ctrl.discovery_log().await;
        ctrl.close().await;
        for e in log?.entries {
            if e.subtype != nvme_proto::discovery::subtype::NVME
                || !seen.insert((e.subnqn.clone(), e.traddr.clone(), e.trsvcid.clone()))
            {
                continue;
            }
            // A wildcard or unparsable address is reached where discovery was.
            let ip =
                e.traddr.parse().ok().filter(|ip: &std::net::IpAddr| !ip.is_unspecified()).unwrap_or(target.udp.ip());
            let trsvcid = e.trsvcid.parse().unwrap_or(target.trsvcid);
            let at = TargetAddr { udp: SocketAddr::new(ip, target.udp.port()), trsvcid };
            let mut o = options.clone();
            o.subnqn = e.subnqn.clone();
            let mut entry = serde_json::json!({
                "subnqn": e.subnqn, "traddr": ip.to_string(), "trsvcid": trsvcid, "namespaces": [],
            });
            match Controller::connect(at, o).await {
                Ok(c) => {
                    entry["cntlid"] = c.cntlid.into();
                    entry["model"] = c.identify.model().unwrap_or("").trim().into();
                    entry["serial"] = c.identify.serial().unwrap_or("").trim().into();
                    entry["firmware"] = c.identify.firmware().unwrap_or("").trim().into();
                    let mut namespaces = Vec::new();
                    match c.active_namespaces().await {
                        Ok(ids) => {
                            for nsid in ids {
                                match c.namespace(nsid).await {
                                    Ok(ns) => namespaces.push(serde_json::json!({
                                        "nsid": nsid, "blocks": ns.blocks, "block_size": ns.block_size,
                                        "bytes": ns.blocks * ns.block_size as u64,
                                    })),
                                    Err(err) => {
                                        namespaces.push(serde_json::json!({"nsid": nsid, "error": err.to_string()}))
                                    }
                                }
                            }
                        }
                        Err(err) => entry["error"] = err.to_string().into(),
                    }
                    entry["namespaces"] = namespaces.into();
                    let _ = c.shutdown().await;
                }
                Err(err) => entry["error"] = err.to_string().into(),
            }
            subsystems.push(entry);
        }
    }
    match conn.output_format {
        OutputFormat::Json => emit_json(&serde_json::json!({ "subsystems": subsystems })),
        OutputFormat::Normal => emit(&list_text(&subsystems)),
    }
    Ok(ExitCode::SUCCESS)
}

fn list_text(subsystems: &[serde_json::Value]) -> String {
    let mut out = format!(
        "{:<40} {:<22} {:<5} {:>14} {:>7}  {:<16} {:<20}\n",
        "Subsystem NQN", "Address", "NSID", "Size", "Format", "Model", "Serial"
    );
    out += &format!(
        "{} {} {} {} {}  {} {}\n",
        "-".repeat(40),
        "-".repeat(22),
        "-".repeat(5),
        "-".repeat(14),
        "-".repeat(7),
        "-".repeat(16),
        "-".repeat(20)
    );
    for s in subsystems {
        let addr = format!("{}:{}", s["traddr"].as_str().unwrap_or(""), s["trsvcid"]);
        let name = s["subnqn"].as_str().unwrap_or("");
        if let Some(e) = s["error"].as_str() {
            out += &format!("{name:<40} {addr:<22} error: {e}\n");
            continue;
        }
        for ns in s["namespaces"].as_array().into_iter().flatten() {
            let bytes = ns["bytes"].as_u64().unwrap_or(0);
            out += &format!(
                "{name:<40} {addr:<22} {:<5} {:>11.2} GB {:>5} B  {:<16} {:<20}\n",
                ns["nsid"],
                bytes as f64 / 1e9,
                ns["block_size"],
                s["model"].as_str().unwrap_or(""),
                s["serial"].as_str().unwrap_or("")
            );
        }
    }
    out
}

/// Blocks and bytes of a read or write, from --block-count, --data-size and (write) the data's length.
fn extent(t: &Transfer, block_size: u32, data_len: Option<usize>) -> Result<(u32, usize), Failure> {
    let bs = block_size as u64;
    let blocks = match (t.block_count, t.data_size, data_len) {
        (Some(c), _, _) => c as u64 + 1,
        (None, Some(z), _) => z.div_ceil(bs),
        (None, None, Some(len)) => (len as u64).div_ceil(bs),
        (None, None, None) => 1,
    };
    let bytes = blocks * bs;
    if let Some(z) = t.data_size
        && z != bytes
    {
        return Err(Failure::Usage(format!("--data-size {z} is not {blocks} blocks of {bs} bytes ({bytes})")));
    }
    if let Some(len) = data_len
        && len as u64 != bytes
    {
        return Err(Failure::Usage(format!(
            "the data is {len} bytes; {blocks} blocks of {bs} bytes need exactly {bytes} (nothing is padded or cut)"
        )));
    }
    let blocks = u32::try_from(blocks).map_err(|_| Failure::Usage(format!("{blocks} blocks is too many")))?;
    Ok((blocks, bytes as usize))
}

fn check_transfer(bytes: usize, ctrl: &Controller) -> Result<(), Failure> {
    if bytes > ctrl.max_transfer() {
        return Err(Failure::Usage(format!(
            "{bytes} bytes is above the target's largest transfer ({} bytes); use fewer blocks",
            ctrl.max_transfer()
        )));
    }
    Ok(())
}

fn rw(nsid: u32, slba: u64, blocks: u32) -> Result<ReadWrite, Failure> {
    ReadWrite::new(nsid, slba, blocks).ok_or_else(|| Failure::Usage(format!("{blocks} blocks is not 1..=65536")))
}

async fn read(t: Transfer) -> Result<ExitCode, Failure> {
    let s = session(&t.conn, 1).await?;
    let result = async {
        let ns = s.namespace(t.namespace_id).await?;
        let (blocks, bytes) = extent(&t, ns.block_size, None)?;
        check_transfer(bytes, &*s.controller().await?)?;
        let command = IoCommand::Read(rw(t.namespace_id, t.start_block, blocks)?);
        let (_, _, data) = s.io(None, command, DataDir::ToHost(bytes)).await?;
        Ok::<_, Failure>(data)
    }
    .await;
    let _ = s.shutdown().await;
    let data = result?;
    match &t.data {
        Some(path) => std::fs::write(path, &data).map_err(|e| Failure::Run(format!("{}: {e}", path.display())))?,
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(&data).and_then(|_| out.flush()).map_err(|e| Failure::Run(format!("stdout: {e}")))?;
        }
    }
    eprintln!("read: Success");
    Ok(ExitCode::SUCCESS)
}

async fn write(t: Transfer) -> Result<ExitCode, Failure> {
    let data = match &t.data {
        Some(path) => std::fs::read(path).map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))?,
        None => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).map_err(|e| Failure::Usage(format!("stdin: {e}")))?;
            buf
        }
    };
    if data.is_empty() {
        return Err(Failure::Usage("no data to write (empty input)".into()));
    }
    let s = session(&t.conn, 1).await?;
    let result = async {
        let ns = s.namespace(t.namespace_id).await?;
        let (blocks, bytes) = extent(&t, ns.block_size, Some(data.len()))?;
        check_transfer(bytes, &*s.controller().await?)?;
        let command = IoCommand::Write(rw(t.namespace_id, t.start_block, blocks)?);
        s.io(None, command, DataDir::ToController(data.into())).await?;
        Ok::<_, Failure>(())
    }
    .await;
    let _ = s.shutdown().await;
    result?;
    eprintln!("write: Success");
    Ok(ExitCode::SUCCESS)
}

async fn flush(conn: Connection, nsid: u32) -> Result<ExitCode, Failure> {
    let s = session(&conn, 1).await?;
    let result = s.io(None, IoCommand::Flush { nsid }, DataDir::None).await;
    let _ = s.shutdown().await;
    result?;
    eprintln!("NVMe Flush: success");
    Ok(ExitCode::SUCCESS)
}

async fn perf(p: Perf) -> Result<ExitCode, Failure> {
    let job = PerfJob {
        nsid: p.nsid,
        mode: p.rw,
        rwmixread: p.rwmixread,
        block_bytes: p.bs,
        iodepth: p.iodepth,
        io_queues: p.io_queues as usize,
        runtime: Duration::from_secs(p.runtime),
        size: p.size,
        verify: p.verify,
        seed: p.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
        }),
    };
    job.check().map_err(|e| Failure::Usage(e.to_string()))?;
    let s = Arc::new(session(&p.conn, p.io_queues).await?);
    let interval = p.status_interval;
    let live = interval.is_none() && std::io::stderr().is_terminal();
    let mut last = (Duration::ZERO, 0u64, 0u64);
    let progress = move |t: Tick| {
        let due = interval.is_some_and(|n| t.elapsed.as_secs_f64().round() as u64 % n == 0);
        if !live && !due {
            return;
        }
        let dt = (t.elapsed - last.0).as_secs_f64().max(1e-3);
        let iops = (t.ios - last.1) as f64 / dt;
        let mib = (t.bytes - last.2) as f64 / dt / (1 << 20) as f64;
        last = (t.elapsed, t.ios, t.bytes);
        let line = format!(
            "[{:>4.0}s] {iops:>9.0} IOPS {mib:>8.1} MiB/s  ios {}  errors {}  reconnects {}  live paths {}",
            t.elapsed.as_secs_f64(),
            t.ios,
            t.errors,
            t.reconnects,
            t.live_paths
        );
        if live {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    };
    // Ctrl-C ends the run early and still reports (and verifies), as fio does.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_interrupt = tokio::spawn({
        let stop = stop.clone();
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let report = initiator::perf::run(s.clone(), job.clone(), stop, progress).await;
    on_interrupt.abort();
    if live {
        eprintln!();
    }
    if let Ok(s) = Arc::try_unwrap(s) {
        let _ = s.shutdown().await;
    }
    let report = report.map_err(|e| match e {
        initiator::HostError::Invalid(m) => Failure::Usage(m),
        e => Failure::from(e),
    })?;
    match p.conn.output_format {
        OutputFormat::Json => emit_json(&output::perf_json(&job, &report)),
        OutputFormat::Normal => emit(&output::perf_text(&job, &report)),
    }
    let verify_errors = report.verify.as_ref().map_or(0, |v| v.errors);
    Ok(if verify_errors > 0 || report.errors > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
