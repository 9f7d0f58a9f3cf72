//! The perf job: `iodepth` workers keep one command each in flight for `runtime`, over a session's paths,
//! and count, time and (with `verify`) check what they did. With `verify` every worker owns the units
//! (`bs`-sized pieces of the span) congruent to its index, so no two commands touch one block at once and
//! each unit's possible contents are known exactly: the generation of its last acknowledged write, plus that
//! of any write whose outcome is unknown (it failed with the connection). After the run, every written unit
//! is read back and checked.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nvme_proto::IoCommand;
use nvme_proto::io::ReadWrite;

use super::histogram::Histogram;
use super::pattern;
use crate::controller::DataDir;
use crate::error::HostError;
use crate::session::Session;

/// fio's `--rw`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RwMode {
    Read,
    Write,
    RandRead,
    RandWrite,
    Rw,
    RandRw,
}

impl FromStr for RwMode {
    type Err = String;
    fn from_str(s: &str) -> Result<RwMode, String> {
        Ok(match s {
            "read" => RwMode::Read,
            "write" => RwMode::Write,
            "randread" => RwMode::RandRead,
            "randwrite" => RwMode::RandWrite,
            "rw" | "readwrite" => RwMode::Rw,
            "randrw" => RwMode::RandRw,
            _ => return Err(format!("unknown rw mode {s:?} (read, write, randread, randwrite, rw, randrw)")),
        })
    }
}

impl RwMode {
    pub fn name(self) -> &'static str {
        match self {
            RwMode::Read => "read",
            RwMode::Write => "write",
            RwMode::RandRead => "randread",
            RwMode::RandWrite => "randwrite",
            RwMode::Rw => "rw",
            RwMode::RandRw => "randrw",
        }
    }

    fn random(self) -> bool {
        matches!(self, RwMode::RandRead | RwMode::RandWrite | RwMode::RandRw)
    }

    /// Percentage of reads.
    fn read_share(self, rwmixread: u8) -> u8 {
        match self {
            RwMode::Read | RwMode::RandRead => 100,
            RwMode::Write | RwMode::RandWrite => 0,
            RwMode::Rw | RwMode::RandRw => rwmixread,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PerfJob {
    pub nsid: u32,
    pub mode: RwMode,
    /// Reads in percent, for `rw` and `randrw`.
    pub rwmixread: u8,
    /// Bytes per I/O (a whole number of logical blocks).
    pub block_bytes: u64,
    pub iodepth: usize,
    /// I/O queues the workers spread over.
    pub io_queues: usize,
    pub runtime: Duration,
    /// Bytes of the namespace used, from LBA 0 (`None`: all of it).
    pub size: Option<u64>,
    pub verify: bool,
    pub seed: u64,
}

/// One second's progress.
#[derive(Debug, Clone, Copy)]
pub struct Tick {
    pub elapsed: Duration,
    pub ios: u64,
    pub bytes: u64,
    pub errors: u64,
    pub reconnects: u64,
    pub live_paths: usize,
}

#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Blocks checked during the run.
    pub checked_blocks: u64,
    /// Blocks checked by the read-back after the run.
    pub final_checked_blocks: u64,
    pub errors: u64,
    /// The first few errors, described.
    pub first_errors: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct PathReport {
    pub address: String,
    pub completions: u64,
    pub reconnects: u64,
    pub state: String,
    /// How the I/O data of the association live at the end of the run reached the target (since that
    /// association began): in place, copied through the queue's pool, or by a region per command.
    pub data_moves: Option<crate::DataMoveCounts>,
}

#[derive(Debug, Clone)]
pub struct PerfReport {
    pub elapsed: Duration,
    pub reads: u64,
    pub writes: u64,
    pub bytes: u64,
    pub read_latency: Histogram,
    pub write_latency: Histogram,
    pub latency: Histogram,
    /// Commands that failed for good (after any retries).
    pub errors: u64,
    pub first_error: Option<String>,
    pub reconnects: u64,
    /// The longest time without any completion, from the start of the run to its end.
    pub longest_gap: Duration,
    pub verify: Option<VerifyReport>,
    pub paths: Vec<PathReport>,
    /// CPU time (user + system) this process spent during the timed run, every thread included — what the host
    /// costs per I/O, beside the target's own figure in its stats. `None` where the OS does not say.
    pub cpu: Option<Duration>,
}

impl PerfReport {
    pub fn iops(&self) -> f64 {
        (self.reads + self.writes) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Host CPU microseconds per completed I/O.
    pub fn cpu_us_per_io(&self) -> Option<f64> {
        let ios = self.reads + self.writes;
        self.cpu.filter(|_| ios > 0).map(|c| c.as_secs_f64() * 1e6 / ios as f64)
    }
}

/// CPU time (user + system) of this whole process so far.
pub fn process_cpu_time() -> Option<Duration> {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF).ok()?;
    let us = |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    Some(us(usage.user_time()) + us(usage.system_time()))
}

impl PerfJob {
    /// What can be refused without knowing the namespace (so before connecting).
    pub fn check(&self) -> Result<(), HostError> {
        let bad = |m: &str| Err(HostError::Invalid(m.to_string()));
        if self.block_bytes == 0 {
            return bad("--bs must be above 0");
        }
        if self.iodepth == 0 || self.io_queues == 0 {
            return bad("--iodepth and --io-queues must be at least 1");
        }
        if self.runtime.is_zero() {
            return bad("--runtime must be above 0");
        }
        if self.rwmixread > 100 {
            return bad(&format!("--rwmixread {} is above 100", self.rwmixread));
        }
        if self.verify && self.mode.read_share(self.rwmixread) == 100 {
            return bad("--verify needs writes: use write, randwrite, rw or randrw");
        }
        Ok(())
    }
}

/// The geometry a job runs on, checked before anything is sent.
#[derive(Debug, Clone, Copy)]
struct Span {
    block_size: u64,
    blocks_per_io: u64,
    units: u64,
}

fn plan(job: &PerfJob, blocks: u64, block_size: u32, max_transfer: usize) -> Result<Span, HostError> {
    job.check()?;
    let bs = block_size as u64;
    let bad = |m: String| Err(HostError::Invalid(m));
    if job.block_bytes % bs != 0 {
        return bad(format!("--bs {} is not a whole number of {bs}-byte blocks", job.block_bytes));
    }
    if job.block_bytes > max_transfer as u64 {
        return bad(format!("--bs {} is above the target's largest transfer ({max_transfer} bytes)", job.block_bytes));
    }
    let capacity = blocks * bs;
    let size = job.size.unwrap_or(capacity);
    if size > capacity {
        return bad(format!("--size {size} is larger than the namespace ({capacity} bytes)"));
    }
    let units = size / job.block_bytes;
    if units < job.iodepth as u64 {
        return bad(format!(
            "--size {size} holds {units} I/Os of --bs {}, fewer than --iodepth {}",
            job.block_bytes, job.iodepth
        ));
    }
    Ok(Span { block_size: bs, blocks_per_io: job.block_bytes / bs, units })
}

struct Shared {
    start: Instant,
    deadline: Instant,
    ios: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    last_completion_ns: AtomicU64,
    longest_gap_ns: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    fn completed(&self, bytes: u64) {
        let now = self.start.elapsed().as_nanos() as u64;
        let prev = self.last_completion_ns.fetch_max(now, Ordering::Relaxed);
        if now > prev {
            self.longest_gap_ns.fetch_max(now - prev, Ordering::Relaxed);
        }
        self.ios.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct WorkerResult {
    reads: u64,
    writes: u64,
    read_latency: Histogram,
    write_latency: Histogram,
    first_error: Option<String>,
    verify: VerifyReport,
    /// Possible generations per owned unit (index k = unit / iodepth); empty = unknown.
    units: Vec<Vec<u64>>,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const MAX_REPORTED_ERRORS: usize = 10;

fn note_verify_errors(v: &mut VerifyReport, data: &[u8], first_lba: u64, span: Span, expected: &[u64]) {
    for (i, block) in data.chunks_exact(span.block_size as usize).enumerate() {
        let lba = first_lba + i as u64;
        if let Err(m) = pattern::check(block, lba, expected) {
            v.errors += 1;
            if v.first_errors.len() < MAX_REPORTED_ERRORS {
                v.first_errors.push(format!("LBA {lba}: {m} (expected {:x?})", expected));
            }
        }
    }
}

/// Runs `job` on `session`, calling `tick` about once a second; `stop` set ends the run early (the report
/// covers what ran, and the verify read-back still happens).
pub async fn run(
    session: Arc<Session>,
    job: PerfJob,
    stop: Arc<AtomicBool>,
    mut tick: impl FnMut(Tick) + Send,
) -> Result<PerfReport, HostError> {
    let ns = session.namespace(job.nsid).await?;
    let max_transfer = session.controller().await?.max_transfer();
    let span = plan(&job, ns.blocks, ns.block_size, max_transfer)?;
    let run_id = (job.seed ^ (job.seed >> 32)) & 0xffff_ffff;
    let cpu_before = process_cpu_time();
    let start = Instant::now();
    let shared = Arc::new(Shared {
        start,
        deadline: start + job.runtime,
        ios: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        last_completion_ns: AtomicU64::new(0),
        longest_gap_ns: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let completions_before: Vec<u64> = session.paths().iter().map(|p| p.completions()).collect();
    let reconnects_before = session.reconnects();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..job.iodepth {
        workers.spawn(worker(session.clone(), job.clone(), span, w, run_id, shared.clone()));
    }
    let mut results = Vec::new();
    // Ticks each second; checks `stop` ten times as often.
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    let mut ticks = 0u64;
    ticker.tick().await;
    loop {
        tokio::select! {
            done = workers.join_next() => match done {
                Some(r) => results.push(r.map_err(|e| HostError::Invalid(format!("perf worker: {e}")))?),
                None => break,
            },
            _ = ticker.tick() => {
                if stop.load(Ordering::Relaxed) {
                    shared.stop.store(true, Ordering::Relaxed);
                }
                ticks += 1;
                if ticks % 10 != 0 {
                    continue;
                }
                tick(Tick {
                elapsed: start.elapsed(),
                ios: shared.ios.load(Ordering::Relaxed),
                bytes: shared.bytes.load(Ordering::Relaxed),
                errors: shared.errors.load(Ordering::Relaxed),
                reconnects: session.reconnects() - reconnects_before,
                live_paths: session.paths().iter().filter(|p| p.live().is_some()).count(),
            })},
        }
    }
    let elapsed = start.elapsed().max(Duration::from_millis(1));
    let cpu = process_cpu_time().zip(cpu_before).map(|(after, before)| after.saturating_sub(before));
    // A stall that lasted to the end of the run is a gap too.
    let tail = (elapsed.as_nanos() as u64).saturating_sub(shared.last_completion_ns.load(Ordering::Relaxed));
    let longest_gap = Duration::from_nanos(shared.longest_gap_ns.load(Ordering::Relaxed).max(tail));
    let mut report = PerfReport {
        elapsed,
        reads: 0,
        writes: 0,
        bytes: 0,
        read_latency: Histogram::default(),
        write_latency: Histogram::default(),
        latency: Histogram::default(),
        errors: shared.errors.load(Ordering::Relaxed),
        first_error: None,
        reconnects: 0,
        longest_gap,
        verify: job.verify.then(VerifyReport::default),
        paths: Vec::new(),
        cpu,
    };
    let mut owned = Vec::new();
    for r in results {
        let (w, r) = r;
        report.reads += r.reads;
        report.writes += r.writes;
        report.read_latency.merge(&r.read_latency);
        report.write_latency.merge(&r.write_latency);
        if report.first_error.is_none() {
            report.first_error = r.first_error.clone();
        }
        if let Some(v) = &mut report.verify {
            v.checked_blocks += r.verify.checked_blocks;
            v.errors += r.verify.errors;
            v.first_errors.extend(r.verify.first_errors.iter().cloned());
        }
        owned.push((w, r.units));
    }
    report.bytes = (report.reads + report.writes) * job.block_bytes;
    report.latency.merge(&report.read_latency);
    report.latency.merge(&report.write_latency);
    report.reconnects = session.reconnects() - reconnects_before;
    report.paths = session
        .paths()
        .iter()
        .zip(completions_before)
        .map(|(p, before)| PathReport {
            address: format!("{}:{}", p.addr().udp.ip(), p.addr().trsvcid),
            completions: p.completions() - before,
            reconnects: p.reconnects(),
            state: match p.state() {
                crate::PathState::Live => "live".into(),
                crate::PathState::Reconnecting { .. } => "reconnecting".into(),
                crate::PathState::Failed { .. } => "failed".into(),
                crate::PathState::Closed => "closed".into(),
            },
            data_moves: p.live().map(|c| c.data_moves()),
        })
        .collect();
    if let Some(v) = &mut report.verify {
        final_check(&session, &job, span, owned, v).await?;
        v.first_errors.truncate(MAX_REPORTED_ERRORS);
    }
    Ok(report)
}

fn lba_of(unit: u64, span: Span) -> u64 {
    unit * span.blocks_per_io
}

async fn worker(
    session: Arc<Session>,
    job: PerfJob,
    span: Span,
    w: usize,
    run_id: u64,
    shared: Arc<Shared>,
) -> (usize, WorkerResult) {
    let depth = job.iodepth as u64;
    let owned = (span.units - w as u64).div_ceil(depth); // units w, w+depth, …
    let mut r = WorkerResult {
        units: if job.verify { vec![Vec::new(); owned as usize] } else { Vec::new() },
        ..Default::default()
    };
    let mut rng =
        Rng(job.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (w as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03) | 1);
    let read_share = job.mode.read_share(job.rwmixread) as u64;
    let bytes = job.block_bytes;
    let lane = w % job.io_queues;
    let mut seq = 0u64;
    let mut writes_issued = 0u64;
    while Instant::now() < shared.deadline && !shared.stop.load(Ordering::Relaxed) {
        let k = if job.mode.random() {
            rng.below(owned)
        } else {
            let k = seq % owned;
            seq += 1;
            k
        };
        let unit = w as u64 + k * depth;
        let lba = lba_of(unit, span);
        let rw = ReadWrite::new(job.nsid, lba, span.blocks_per_io as u32).expect("blocks per I/O checked by plan");
        let is_read = rng.below(100) < read_share;
        let started = Instant::now();
        if is_read {
            match session.io(Some(lane), IoCommand::Read(rw), DataDir::ToHost(bytes as usize)).await {
                Ok((_, _, data)) => {
                    r.read_latency.record(started.elapsed().as_nanos() as u64);
                    r.reads += 1;
                    shared.completed(bytes);
                    if job.verify && !r.units[k as usize].is_empty() {
                        note_verify_errors(&mut r.verify, &data, lba, span, &r.units[k as usize]);
                        r.verify.checked_blocks += span.blocks_per_io;
                    }
                }
                Err(e) => {
                    if failed(&shared, &mut r, e) {
                        break;
                    }
                }
            }
        } else {
            writes_issued += 1;
            let generation = (run_id << 32) | (writes_issued * depth + w as u64) & 0xffff_ffff;
            // Filled where the queue's pool lent it, so the target reads it in place.
            let mut data = session.buffer(Some(lane), bytes as usize).await;
            if job.verify {
                pattern::fill(&mut data, span.block_size as usize, lba, generation);
                r.units[k as usize].push(generation);
            } else {
                data[..8].copy_from_slice(&lba.to_le_bytes());
            }
            match session.io(Some(lane), IoCommand::Write(rw), DataDir::ToController(data)).await {
                Ok(_) => {
                    r.write_latency.record(started.elapsed().as_nanos() as u64);
                    r.writes += 1;
                    shared.completed(bytes);
                    if job.verify {
                        r.units[k as usize] = vec![generation];
                    }
                }
                // The unit may hold the old or the new generation: both stay possible.
                Err(e) => {
                    if failed(&shared, &mut r, e) {
                        break;
                    }
                }
            }
        }
    }
    (w, r)
}

/// Counts a command that failed for good; true when the run cannot go on (no path left).
fn failed(shared: &Shared, r: &mut WorkerResult, e: HostError) -> bool {
    shared.errors.fetch_add(1, Ordering::Relaxed);
    let fatal = matches!(e, HostError::PathsLost(_));
    if r.first_error.is_none() {
        r.first_error = Some(e.to_string());
    }
    if fatal {
        shared.stop.store(true, Ordering::Relaxed);
    }
    fatal
}

/// Reads back every unit a worker wrote and checks it: `iodepth` readers, each over its own units.
async fn final_check(
    session: &Arc<Session>,
    job: &PerfJob,
    span: Span,
    owned: Vec<(usize, Vec<Vec<u64>>)>,
    v: &mut VerifyReport,
) -> Result<(), HostError> {
    let mut readers = tokio::task::JoinSet::new();
    for (w, units) in owned {
        let session = session.clone();
        let job = job.clone();
        readers.spawn(async move {
            let mut report = VerifyReport::default();
            for (k, expected) in units.iter().enumerate() {
                if expected.is_empty() {
                    continue;
                }
                let lba = lba_of(w as u64 + k as u64 * job.iodepth as u64, span);
                let rw = ReadWrite::new(job.nsid, lba, span.blocks_per_io as u32).expect("checked");
                let lane = Some(w % job.io_queues);
                let (_, _, data) =
                    session.io(lane, IoCommand::Read(rw), DataDir::ToHost(job.block_bytes as usize)).await?;
                note_verify_errors(&mut report, &data, lba, span, expected);
                report.final_checked_blocks += span.blocks_per_io;
            }
            Ok::<_, HostError>(report)
        });
    }
    while let Some(r) = readers.join_next().await {
        let r = r.map_err(|e| HostError::Invalid(format!("verify reader: {e}")))??;
        v.final_checked_blocks += r.final_checked_blocks;
        v.errors += r.errors;
        v.first_errors.extend(r.first_errors);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> PerfJob {
        PerfJob {
            nsid: 1,
            mode: RwMode::RandRead,
            rwmixread: 50,
            block_bytes: 4096,
            iodepth: 4,
            io_queues: 1,
            runtime: Duration::from_secs(1),
            size: None,
            verify: false,
            seed: 1,
        }
    }

    #[test]
    fn plans_refuse_what_cannot_run() {
        let ok = plan(&job(), 1024, 512, 131072).unwrap();
        assert_eq!((ok.blocks_per_io, ok.units), (8, 128));
        let refuse = |j: PerfJob| plan(&j, 1024, 512, 131072).unwrap_err().to_string();
        assert!(refuse(PerfJob { block_bytes: 1000, ..job() }).contains("whole number"));
        assert!(refuse(PerfJob { block_bytes: 1 << 20, ..job() }).contains("largest transfer"));
        assert!(refuse(PerfJob { iodepth: 0, ..job() }).contains("at least 1"));
        assert!(refuse(PerfJob { verify: true, ..job() }).contains("needs writes"));
        assert!(refuse(PerfJob { size: Some(1 << 30), ..job() }).contains("larger than the namespace"));
        assert!(refuse(PerfJob { size: Some(8192), ..job() }).contains("fewer than --iodepth"));
        assert!(refuse(PerfJob { rwmixread: 101, mode: RwMode::RandRw, ..job() }).contains("above 100"));
        assert_eq!("randrw".parse::<RwMode>(), Ok(RwMode::RandRw));
        assert!("sideways".parse::<RwMode>().is_err());
    }
}
