//! `testbed`: builds the VM image, runs VMs, runs scenarios. See the README's testbed section.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use testbed::image::{self, default_cache};
use testbed::scenario::{self, Setup};
use testbed::vm;

#[derive(Debug, Parser)]
#[command(name = "testbed", version, about = "Real kernels in QEMU microVMs, broken the way the seed was broken")]
struct Args {
    /// Image cache (default: $XDG_CACHE_HOME/nvmf-testbed or ~/.cache/nvmf-testbed).
    #[arg(long, global = true)]
    cache: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// VM image and ad-hoc runs.
    Vm {
        #[command(subcommand)]
        command: VmCmd,
    },
    /// Benchmarks: ratios against a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        command: BenchCmd,
    },
    /// Run a scenario; writes DIR/result.json and prints a summary.
    Scenario {
        /// kernel-smoke | kernel-flap | capture | target-kernel-host | initiator-kernel-target | target-flap |
        /// device-removal | soft-target-kernel-host | soft-initiator-kernel-target | soft-target-flap
        name: String,
        /// Run directory (scripts, consoles, logs, result.json).
        #[arg(long, default_value = "build/testbed-run")]
        dir: PathBuf,
        /// Hard time limit, seconds.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
        /// kernel-flap, target-flap: number of flaps.
        #[arg(long, default_value_t = 10)]
        flaps: u32,
        /// device-removal: how many times the device is deleted and added back.
        #[arg(long, default_value_t = 4)]
        removals: u32,
        /// kernel-flap, target-flap: whose bond flaps (target | initiator); soft-target-flap: target (the tap,
        /// our side), initiator (the VM's bond0) or both (a run each).
        #[arg(long, default_value = "target")]
        side: String,
        /// kernel-flap, target-flap: seconds without I/O progress that count as a stall.
        #[arg(long, default_value_t = 60)]
        stall: u64,
        /// target-flap: the host driving I/O — ours (nvmf perf --verify), kernel (fio verify) or both, one run
        /// each (DIR/ours/, DIR/kernel/).
        #[arg(long, default_value = "both", value_parser = ["ours", "kernel", "both"])]
        host: String,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Our target and host (soft provider, RAM namespace) on loopback beside plain UDP moving the same bytes,
    /// measured in the same run; prints a table of ratios and writes DIR/bench.json. Uses the nvmf-target and
    /// nvmf binaries built beside this one (cargo build --release).
    Loopback {
        #[arg(long, default_value = "build/bench-loopback")]
        dir: PathBuf,
        /// Seconds per perf run.
        #[arg(long, default_value_t = 20)]
        runtime: u64,
        /// Runs per job (the medians are reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Jobs to run (default: all of randread-4k-qd1, randread-4k-qd32, randwrite-4k-qd32, read-128k-qd8,
        /// write-128k-qd8).
        #[arg(long, value_delimiter = ',')]
        jobs: Vec<String>,
        /// Target poll groups = host I/O queues, one configuration each.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        queues: Vec<usize>,
    },
    /// One target under many hosts at once (soft provider, loopback): HOSTS `nvmf perf --verify` processes of
    /// QUEUES I/O queues each, every one on a namespace of its own; the target's queue pairs, memory per queue
    /// pair (peak minus its baseline in the same run), threads and descriptors, every host's verify result, and
    /// the stats back at the baseline. Writes DIR/scale.json; exit 1 if anything failed.
    Scale {
        #[arg(long, default_value = "build/bench-scale")]
        dir: PathBuf,
        #[arg(long, default_value_t = 32)]
        hosts: usize,
        /// I/O queues per host.
        #[arg(long, default_value_t = 8)]
        queues: usize,
        /// Commands in flight per host.
        #[arg(long, default_value_t = 8)]
        iodepth: usize,
        #[arg(long, default_value_t = 2)]
        poll_groups: usize,
        /// Seconds of I/O per host.
        #[arg(long, default_value_t = 10)]
        runtime: u64,
    },
    /// In two VMs on a bond (TCG here): the stock kernel host's fio, 4 KiB randread, against the kernel's
    /// nvmet-rdma on rxe, our target on the verbs provider on the same rxe, and our target on the soft provider;
    /// IOPS and each VM's CPU per I/O, medians and ratios against nvmet-rdma. Needs nvmf-target built with the
    /// verbs feature beside this binary. Writes DIR/vm.json; exit 1 if a run failed.
    Vm {
        #[arg(long, default_value = "build/bench-vm")]
        dir: PathBuf,
        /// Seconds of fio per run.
        #[arg(long, default_value_t = 30)]
        runtime: u64,
        /// Runs per target (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, default_value_t = 32)]
        iodepth: usize,
    },
}

#[derive(Debug, Subcommand)]
enum VmCmd {
    /// Download the kernel and busybox, build the initramfs (cached; idempotent).
    Image,
    /// Boot VMs from a topology file, or a chain (two NICs each, wired VM i ↔ VM i+1) running one command.
    Run {
        /// Topology file (TOML: [[vm]] name, nics, bond, address, rxe, command, tap; [[cable]] a, b).
        #[arg(long, conflicts_with_all = ["vms", "bond", "rxe", "command"])]
        topology: Option<PathBuf>,
        /// Number of VMs (1..=4).
        #[arg(long, default_value_t = 2)]
        vms: usize,
        /// Bond the two NICs (active-backup, miimon 100).
        #[arg(long)]
        bond: bool,
        /// Add an rxe device on the bond (or eth0).
        #[arg(long)]
        rxe: bool,
        #[arg(long, default_value = "build/testbed-run")]
        dir: PathBuf,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Shell command each VM of the chain runs (VM i has 198.18.0.(i+1)).
        #[arg(required_unless_present = "topology")]
        command: Option<String>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("testbed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if let Cmd::Bench { command: BenchCmd::Loopback { dir, runtime, runs, jobs, queues } } = args.command {
        return bench_loopback(dir, runtime, runs, &jobs, queues);
    }
    if let Cmd::Bench { command: BenchCmd::Scale { dir, hosts, queues, iodepth, poll_groups, runtime } } = args.command
    {
        if hosts == 0 || hosts > 1000 || queues == 0 || queues > 16 || iodepth == 0 || poll_groups == 0 || runtime == 0
        {
            return Err("--hosts 1..=1000, --queues 1..=16, --iodepth, --poll-groups and --runtime at least 1".into());
        }
        let bench = testbed::bench::scale::ScaleBench {
            hosts,
            queues,
            iodepth,
            poll_groups,
            runtime: Duration::from_secs(runtime),
            dir: dir.clone(),
        };
        let report = bench.run()?;
        print!("{}", testbed::bench::scale::text(&report));
        let path = scenario::write_json(&dir, "scale.json", &report)?;
        println!("result: {}", path.display());
        return Ok(if report.passed { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    let cache = args.cache.unwrap_or_else(default_cache);
    let image = image::build(&cache)?;
    match args.command {
        Cmd::Vm { command: VmCmd::Image } => {
            println!("kernel {}\n  {}\n  {}", image.version, image.kernel.display(), image.initramfs.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Vm { command: VmCmd::Run { topology, vms, bond, rxe, dir, timeout, command } } => {
            let topology = match topology {
                Some(path) => {
                    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                    testbed::topology::Topology::parse(&path.display().to_string(), &text)?
                }
                None => chain(vms, bond, rxe, command.as_deref().unwrap_or("true"))?,
            };
            let accel = vm::probe_accel(&image, &cache);
            let mut run = vm::Run::start(&image, accel, &topology.vms, &topology.cables, &topology.taps, &dir)?;
            if let Some(ns) = run.netns() {
                println!("tap devices are in network namespace {ns} (ip netns exec {ns} …) while the VMs run");
            }
            let outcomes = run.wait(Duration::from_secs(timeout));
            let mut ok = true;
            for o in &outcomes {
                println!(
                    "{}: exit {:?}{} boot {:?} s — log {}",
                    o.name,
                    o.exit,
                    if o.timed_out {
                        " (timed out)"
                    } else if o.killed_after_power_down {
                        " (powered off; QEMU lingered and was killed)"
                    } else {
                        ""
                    },
                    o.boot_seconds,
                    o.log.display()
                );
                ok &= o.exit == Some(0);
            }
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Cmd::Bench { command: BenchCmd::Vm { dir, runtime, rounds, iodepth } } => {
            let accel = vm::probe_accel(&image, &cache);
            let bench = testbed::bench::vm::VmBench {
                setup: Setup { image, accel, dir: dir.clone() },
                runtime: Duration::from_secs(runtime),
                rounds,
                iodepth,
            };
            let report = bench.run()?;
            print!("{}", testbed::bench::vm::text(&report));
            let path = scenario::write_json(&dir, "vm.json", &report)?;
            println!("result: {}", path.display());
            Ok(if report.passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Cmd::Bench { .. } => unreachable!("handled before the image is built"),
        Cmd::Scenario { name, dir, timeout, flaps, removals, side, stall, host } => {
            let accel = vm::probe_accel(&image, &cache);
            let setup = Setup { image, accel, dir: dir.clone() };
            let timeout = Duration::from_secs(timeout);
            let passed = match name.as_str() {
                "kernel-smoke" => {
                    let r = scenario::smoke::run(&setup, timeout)?;
                    println!("{}", r.summary());
                    r.passed
                }
                "target-flap" => {
                    use scenario::flap::{HostKind, TargetKind};
                    let side = flap_side(&side)?;
                    let (ours, kernel) = (HostKind::Ours, HostKind::Kernel { verify: true });
                    let runs: Vec<FlapRunSpec> = match host.as_str() {
                        "ours" => vec![("ours", TargetKind::Ours, ours, side)],
                        "kernel" => vec![("kernel", TargetKind::Ours, kernel, side)],
                        _ => vec![("ours", TargetKind::Ours, ours, side), ("kernel", TargetKind::Ours, kernel, side)],
                    };
                    flap_runs(&setup, &runs, flaps, Duration::from_secs(stall), timeout)?
                }
                "kernel-flap" => {
                    let side = flap_side(&side)?;
                    let r = scenario::flap::run(&setup, flaps, side, Duration::from_secs(stall), timeout)?;
                    println!("{}", r.summary());
                    r.flaps_toggled() && r.complete()
                }
                "target-kernel-host" => {
                    let r = scenario::kernel_host::run(&setup, timeout)?;
                    println!("{}", r.summary());
                    r.passed
                }
                "initiator-kernel-target" => {
                    let r = scenario::kernel_target::run(&setup, timeout)?;
                    println!("{}", r.summary());
                    r.passed
                }
                "device-removal" => {
                    let r = scenario::device_removal::run(&setup, removals, timeout)?;
                    println!("{}", r.summary());
                    r.passed
                }
                "capture" => {
                    let r = scenario::capture::run(&setup, timeout)?;
                    println!("{}", r.summary());
                    r.passed
                }
                "soft-target-flap" => {
                    use scenario::flap::{HostKind, Side, TargetKind};
                    // target: the tap, our side (the seed's case); initiator: the VM's bond0; both: a run each.
                    let kernel = HostKind::Kernel { verify: true };
                    let runs: Vec<FlapRunSpec> = match side.as_str() {
                        "both" => vec![
                            ("target", TargetKind::Soft, kernel, Side::Target),
                            ("initiator", TargetKind::Soft, kernel, Side::Initiator),
                        ],
                        one => vec![(one, TargetKind::Soft, kernel, flap_side(one)?)],
                    };
                    flap_runs(&setup, &runs, flaps, Duration::from_secs(stall), timeout)?
                }
                "soft-initiator-kernel-target" => {
                    let r = scenario::soft_initiator::run(&setup, timeout)?;
                    println!("{}", r.summary());
                    r.passed
                }
                "soft-target-kernel-host" => {
                    let r = scenario::soft_target::run(&setup, timeout)?;
                    println!("{}", r.summary());
                    r.passed
                }
                other => return Err(format!("unknown scenario {other:?} ({SCENARIOS})").into()),
            };
            println!("result: {}", dir.join("result.json").display());
            Ok(if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}

const SCENARIOS: &str = "kernel-smoke, kernel-flap, capture, target-kernel-host, initiator-kernel-target, target-flap, \
    device-removal, soft-target-kernel-host, soft-initiator-kernel-target, soft-target-flap";

/// A flap run: its subdirectory, who serves, who drives I/O, whose link flaps.
type FlapRunSpec<'a> = (&'a str, scenario::flap::TargetKind, scenario::flap::HostKind, scenario::flap::Side);

/// Flap runs one after another, each in its own subdirectory of the run directory, their results together in
/// its result.json; whether every one passed.
fn flap_runs(
    setup: &Setup,
    runs: &[FlapRunSpec],
    flaps: u32,
    stall: Duration,
    timeout: Duration,
) -> Result<bool, Box<dyn std::error::Error>> {
    let mut all = true;
    let mut results = Vec::new();
    for &(name, target, host, side) in runs {
        let setup = Setup { dir: setup.dir.join(name), ..setup.clone() };
        let r = scenario::flap::run_with(&setup, target, host, flaps, side, stall, timeout)?;
        println!("{}", r.summary());
        all &= r.passed();
        results.push(r);
    }
    scenario::write_json(&setup.dir, "result.json", &results)?;
    Ok(all)
}

fn bench_loopback(
    dir: PathBuf,
    runtime: u64,
    runs: usize,
    jobs: &[String],
    queues: Vec<usize>,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    use testbed::bench::loopback::{JOBS, LoopbackBench, text};
    let jobs = if jobs.is_empty() {
        JOBS.to_vec()
    } else {
        jobs.iter()
            .map(|name| {
                JOBS.iter()
                    .copied()
                    .find(|j| j.name == name)
                    .ok_or_else(|| format!("--jobs: unknown job {name:?} ({})", JOBS.map(|j| j.name).join(", ")))
            })
            .collect::<Result<_, _>>()?
    };
    if runs == 0 || runtime == 0 || queues.is_empty() || queues.contains(&0) {
        return Err("--runs, --runtime and every --queues value must be at least 1".into());
    }
    let bench = LoopbackBench { jobs, queues, runtime: Duration::from_secs(runtime), runs, dir: dir.clone() };
    let report = bench.run()?;
    print!("{}", text(&report));
    let path = scenario::write_json(&dir, "bench.json", &report)?;
    println!("result: {}", path.display());
    Ok(ExitCode::SUCCESS)
}

fn flap_side(side: &str) -> Result<scenario::flap::Side, String> {
    match side {
        "target" => Ok(scenario::flap::Side::Target),
        "initiator" => Ok(scenario::flap::Side::Initiator),
        other => Err(format!("--side {other:?}: target or initiator")),
    }
}

/// The chain topology of `vm run` without a file: VM i ↔ VM i+1 on both NICs, 198.18.0.(i+1).
fn chain(vms: usize, bond: bool, rxe: bool, command: &str) -> Result<testbed::topology::Topology, String> {
    if !(1..=4).contains(&vms) {
        return Err("--vms must be 1..=4".into());
    }
    let specs = (0..vms)
        .map(|i| vm::VmSpec {
            name: format!("vm{i}"),
            nics: 2,
            memory_mib: 1024,
            script: format!("{}{command}\n", testbed::guest::network(2, bond, &format!("198.18.0.{}", i + 1), rxe)),
        })
        .collect();
    let cables = (0..vms.saturating_sub(1)).flat_map(|i| [((i, 0), (i + 1, 0)), ((i, 1), (i + 1, 1))]).collect();
    Ok(testbed::topology::Topology { vms: specs, cables, taps: Vec::new() })
}
