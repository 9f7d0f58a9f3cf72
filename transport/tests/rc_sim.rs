//! Deterministic simulation of two RC engines over a seeded network that loses (up to 10 %), duplicates,
//! delays and reorders packets. Random mixes of SEND / WRITE / READ (with and without immediate data and
//! invalidation) from 1 byte to 1 MiB, in both directions at once; every byte and the completion order are
//! checked. Time is simulated: no test here waits on a clock.
//!
//! `RC_SIM_SEEDS=N` runs N seeds (default 1000); `RC_SIM_SEED=S` replays one seed; `RC_SIM_FIRST=F` starts
//! the range at F. A failure names its seed.

mod support;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use support::{Impairments, Rng, SimMemory, SimNet};
use transport::Buffer;
use transport::soft::rc::{
    Access, EngineState, RcConfig, RcQp, RecvWr, SendOp, SendWr, WcOpcode, WcStatus, WorkCompletion,
};

/// Each side's memory: a landing zone the peer WRITEs into, a patterned zone it READs from.
const WRITE_KEY: u32 = 0x100;
const READ_KEY: u32 = 0x200;
const BASE: u64 = 0x7f00_0000_0000;
const ZONE: usize = 2 << 20;

#[derive(Debug, Clone)]
enum Op {
    Send { data: Vec<u8>, imm: Option<u32>, invalidate: Option<u32> },
    Write { offset: usize, data: Vec<u8>, imm: Option<u32> },
    Read { offset: usize, len: usize },
}

fn size(rng: &mut Rng) -> usize {
    match rng.below(100) {
        0..=59 => 1 + rng.below(4096) as usize,
        60..=94 => 1 + rng.below(64 << 10) as usize,
        _ => 1 + rng.below(1 << 20) as usize,
    }
}

struct Side {
    qp: RcQp,
    memory: SimMemory,
    /// Ops this side issued, in order, with their wr_ids.
    issued: VecDeque<(u64, Op)>,
    /// What the peer will SEND to us, in order (to check our receives).
    expected_recvs: VecDeque<(Vec<u8>, Option<u32>, Option<u32>)>,
    /// Receives still to post, and when.
    pending_recvs: VecDeque<(Instant, usize)>,
    completions: Vec<WorkCompletion>,
    write_cursor: usize,
}

fn config(local: usize, seed: u64, rng: &mut Rng) -> RcConfig {
    let psn0 = (seed as u32).wrapping_mul(2_654_435_761) & 0xff_ffff;
    let psn1 = psn0 ^ 0x5a5a5a;
    let psns = [psn0, psn1];
    let mut c = RcConfig::new(0x11 + local as u32, 0x11 + 1 - local as u32, psns[local], psns[1 - local]);
    c.mtu = [256, 1024, 4096][rng.below(3) as usize];
    c.window = [16, 64, 256][rng.below(3) as usize];
    c.max_rd_atomic = 1 + rng.below(16) as u8;
    c.ack_timeout = Duration::from_millis(20);
    c.min_rnr_timer = 1 + rng.below(14) as u8;
    c
}

fn run(seed: u64) -> Result<String, String> {
    let mut rng = Rng::new(seed);
    let impair = Impairments {
        loss: rng.below(101) as f64 / 1000.0,
        duplicate: rng.below(51) as f64 / 1000.0,
        reorder: rng.below(51) as f64 / 1000.0,
        delay: Duration::from_micros(10 + rng.below(500)),
        jitter: Duration::from_micros(rng.below(2000)),
    };
    let mut net = SimNet::new(seed.wrapping_mul(31), impair);
    let start = Instant::now();
    let mut sides: Vec<Side> = (0..2)
        .map(|i| {
            let mut memory = SimMemory::default();
            memory.register(WRITE_KEY, BASE, vec![0; ZONE], Access::REMOTE_WRITE);
            let pattern: Vec<u8> = (0..ZONE).map(|b| (b as u64).wrapping_mul(0x9e37) as u8 ^ i as u8).collect();
            memory.register(READ_KEY, BASE + ZONE as u64, pattern, Access::REMOTE_READ);
            Ok(Side {
                qp: RcQp::new(config(i, seed, &mut rng)).map_err(|e| e.to_string())?,
                memory,
                issued: VecDeque::new(),
                expected_recvs: VecDeque::new(),
                pending_recvs: VecDeque::new(),
                completions: Vec::new(),
                write_cursor: 0,
            })
        })
        .collect::<Result<_, String>>()?;
    // Both ends must agree on the path MTU.
    let mtu = sides[0].qp.config().mtu;
    let mut c1 = *sides[1].qp.config();
    c1.mtu = mtu;
    sides[1].qp = RcQp::new(c1).map_err(|e| e.to_string())?;

    let nops = 1 + rng.below(8);
    let mut next_wr = 1u64;
    let mut next_inv_key = 0x1000u32;
    for _ in 0..nops {
        let from = rng.below(2) as usize;
        let to = 1 - from;
        let op = match rng.below(3) {
            0 => {
                let n = size(&mut rng);
                let data = rng.bytes(n);
                let imm = rng.chance(0.3).then(|| rng.next() as u32);
                let invalidate = (imm.is_none() && rng.chance(0.2)).then(|| {
                    next_inv_key += 1;
                    sides[to].memory.register(next_inv_key, 0, vec![0; 8], Access::REMOTE_WRITE);
                    next_inv_key
                });
                sides[to].expected_recvs.push_back((data.clone(), imm, invalidate));
                // The receive is posted now or a little later (RNR NAKs meanwhile), and is sometimes oversized.
                let delay = if rng.chance(0.3) { Duration::from_micros(rng.below(5000)) } else { Duration::ZERO };
                let capacity = data.len() + if rng.chance(0.5) { rng.below(100) as usize } else { 0 };
                sides[to].pending_recvs.push_back((start + delay, capacity));
                Op::Send { data, imm, invalidate }
            }
            1 => {
                let n = size(&mut rng);
                let data = rng.bytes(n);
                let offset = sides[to].write_cursor;
                sides[to].write_cursor += data.len();
                if sides[to].write_cursor > ZONE {
                    continue;
                }
                let imm = rng.chance(0.2).then(|| rng.next() as u32);
                if imm.is_some() {
                    sides[to].expected_recvs.push_back((Vec::new(), imm, None));
                    sides[to].pending_recvs.push_back((start, 0));
                }
                Op::Write { offset, data, imm }
            }
            _ => {
                let len = size(&mut rng);
                Op::Read { offset: rng.below((ZONE - len) as u64) as usize, len }
            }
        };
        let wr_id = next_wr;
        next_wr += 1;
        let wr = match &op {
            Op::Send { data, imm, invalidate } => SendWr::new(
                wr_id,
                match (imm, invalidate) {
                    (Some(i), _) => SendOp::SendWithImm(*i),
                    (None, Some(k)) => SendOp::SendWithInv(*k),
                    (None, None) => SendOp::Send,
                },
                data.clone(),
            ),
            Op::Write { offset, data, imm } => {
                let remote_addr = BASE + *offset as u64;
                let op = match imm {
                    Some(imm) => SendOp::RdmaWriteWithImm { remote_addr, rkey: WRITE_KEY, imm: *imm },
                    None => SendOp::RdmaWrite { remote_addr, rkey: WRITE_KEY },
                };
                SendWr::new(wr_id, op, data.clone())
            }
            Op::Read { offset, len } => SendWr::new(
                wr_id,
                SendOp::RdmaRead { remote_addr: BASE + (ZONE + offset) as u64, rkey: READ_KEY },
                vec![0xee; *len],
            ),
        };
        let wr = if rng.chance(0.3) {
            let segments = split(&mut rng, wr.buf.to_vec());
            SendWr { buf: Buffer::default(), sg_list: segments, ..wr }
        } else {
            wr
        };
        sides[from].qp.post_send(wr).map_err(|(e, _)| e.to_string())?;
        sides[from].issued.push_back((wr_id, op));
    }

    let expected_completions: Vec<usize> = sides.iter().map(|s| s.issued.len() + s.expected_recvs.len()).collect();
    let mut now = start;
    let mut steps = 0u64;
    loop {
        steps += 1;
        if steps > env("RC_SIM_STEPS").unwrap_or(5_000_000) {
            return Err(format!("no end after {steps} steps (impairments {impair:?})"));
        }
        for side in sides.iter_mut() {
            while side.pending_recvs.front().is_some_and(|(at, _)| *at <= now) {
                let (_, capacity) = side.pending_recvs.pop_front().expect("front");
                let wr_id = 1_000_000 + side.completions.len() as u64;
                let wr = if rng.chance(0.3) {
                    RecvWr::with_sg_list(wr_id, split(&mut rng, vec![0; capacity]))
                } else {
                    RecvWr::new(wr_id, vec![0; capacity])
                };
                side.qp.post_recv(wr).map_err(|(e, _)| e.to_string())?;
            }
        }
        let mut busy = false;
        let trace = std::env::var("RC_SIM_TRACE").is_ok();
        for (i, side) in sides.iter_mut().enumerate() {
            while let Some(packet) = side.qp.poll_transmit(now) {
                if trace {
                    eprintln!("{:>9.3}ms {i}> {}", (now - start).as_secs_f64() * 1e3, SimNet::describe(&packet));
                }
                net.send(now, i, packet);
                busy = true;
            }
        }
        while let Some((to, bytes)) = net.deliver(now) {
            if trace {
                eprintln!(
                    "{:>9.3}ms   <{to} {}",
                    (now - start).as_secs_f64() * 1e3,
                    SimNet::describe(&bytes[..bytes.len() - 4])
                );
            }
            let side = &mut sides[to];
            side.qp.handle_packet(now, &SimNet::parse(&bytes), &mut side.memory);
            busy = true;
        }
        for side in sides.iter_mut() {
            if side.qp.poll_timeout().is_some_and(|t| t <= now) {
                if trace {
                    eprintln!("{:>9.3}ms timeout", (now - start).as_secs_f64() * 1e3);
                }
                side.qp.handle_timeout(now);
                busy = true;
            }
            while let Some(wc) = side.qp.poll_completion() {
                side.completions.push(wc);
            }
        }
        if sides.iter().zip(&expected_completions).all(|(s, n)| s.completions.len() >= *n) {
            break;
        }
        if sides.iter().any(|s| s.qp.state() == EngineState::Error) {
            let causes: Vec<_> = sides.iter().map(|s| s.qp.error_cause()).collect();
            return Err(format!("QP error {causes:?} (impairments {impair:?})"));
        }
        if !busy {
            let next = [
                net.next_delivery(),
                sides[0].qp.poll_timeout(),
                sides[1].qp.poll_timeout(),
                sides[0].pending_recvs.front().map(|(t, _)| *t),
                sides[1].pending_recvs.front().map(|(t, _)| *t),
            ]
            .into_iter()
            .flatten()
            .min();
            match next {
                Some(t) => now = now.max(t),
                None => {
                    let state: Vec<_> = sides
                        .iter()
                        .map(|s| (s.qp.outstanding(), s.completions.len(), s.issued.len(), s.expected_recvs.len()))
                        .collect();
                    return Err(format!(
                        "stalled: nothing in flight, no timer, work outstanding ((sq, rq), completions, issued, expected recvs) {state:?}"
                    ));
                }
            }
        }
    }
    verify(&sides).map_err(|e| format!("{e} (impairments {impair:?})"))?;
    Ok(format!(
        "{nops} ops, {} packets, {} dropped, {:.1} ms simulated",
        net.sent,
        net.dropped,
        (now - start).as_secs_f64() * 1000.0
    ))
}

/// Cuts a buffer into 1 to 5 segments of random sizes (empty ones included).
fn split(rng: &mut Rng, buf: Vec<u8>) -> Vec<Buffer> {
    let pieces = 1 + rng.below(5) as usize;
    let mut cuts: Vec<usize> = (1..pieces).map(|_| rng.below(buf.len() as u64 + 1) as usize).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut start = 0;
    for cut in cuts.into_iter().chain([buf.len()]) {
        out.push(Buffer::from(&buf[start..cut]));
        start = cut;
    }
    out
}

/// The data a completion hands back, whether as one buffer or as segments.
fn data(wc: &WorkCompletion) -> Vec<u8> {
    if wc.sg_list.is_empty() { wc.buf.to_vec() } else { wc.sg_list.iter().flat_map(|s| s.iter().copied()).collect() }
}

fn verify(sides: &[Side]) -> Result<(), String> {
    for (i, side) in sides.iter().enumerate() {
        let peer = &sides[1 - i];
        let mut sends: Vec<&WorkCompletion> = side.completions.iter().filter(|c| c.wr_id < 1_000_000).collect();
        let recvs: Vec<&WorkCompletion> = side.completions.iter().filter(|c| c.wr_id >= 1_000_000).collect();
        // Send-queue completions in posting order, all successful, buffers handed back.
        let ids: Vec<u64> = sends.iter().map(|c| c.wr_id).collect();
        let want: Vec<u64> = side.issued.iter().map(|(id, _)| *id).collect();
        if ids != want {
            return Err(format!("side {i}: completion order {ids:?}, posted {want:?}"));
        }
        for (wc, (_, op)) in sends.drain(..).zip(&side.issued) {
            if wc.status != WcStatus::Success {
                return Err(format!("side {i}: wr {} completed {:?}", wc.wr_id, wc.status));
            }
            match op {
                Op::Send { data, .. } => {
                    if wc.opcode != WcOpcode::Send || self::data(wc) != *data {
                        return Err(format!("side {i}: SEND wr {} handed back another buffer", wc.wr_id));
                    }
                }
                Op::Write { offset, data, .. } => {
                    let landed = &peer.memory.region(WRITE_KEY).data[*offset..offset + data.len()];
                    if landed != data.as_slice() {
                        return Err(format!(
                            "side {i}: WRITE wr {} of {} bytes differs at the peer",
                            wc.wr_id,
                            data.len()
                        ));
                    }
                }
                Op::Read { offset, len } => {
                    let source = &peer.memory.region(READ_KEY).data[*offset..offset + len];
                    let got = self::data(wc);
                    if wc.opcode != WcOpcode::RdmaRead || got != source || wc.byte_len as usize != *len {
                        let at = got.iter().zip(source).position(|(a, b)| a != b);
                        return Err(format!("side {i}: READ wr {} of {len} bytes differs (first at {at:?})", wc.wr_id));
                    }
                }
            }
        }
        // Receives: in the order the peer sent, with their data, immediates and invalidations.
        if recvs.len() != side.expected_recvs.len() {
            return Err(format!(
                "side {i}: {} receive completions, expected {}",
                recvs.len(),
                side.expected_recvs.len()
            ));
        }
        for (wc, (data, imm, inv)) in recvs.iter().zip(&side.expected_recvs) {
            let len = wc.byte_len as usize;
            let received = self::data(wc);
            let got =
                if wc.opcode == WcOpcode::RecvRdmaWithImm { &[][..] } else { &received[..len.min(received.len())] };
            if wc.status != WcStatus::Success || got != data.as_slice() || wc.imm != *imm || wc.invalidated_rkey != *inv
            {
                return Err(format!(
                    "side {i}: receive {} {:?} {:?}: {len} bytes imm {:?} inv {:?}, expected {} bytes imm {imm:?} inv {inv:?}",
                    wc.wr_id,
                    wc.status,
                    wc.opcode,
                    wc.imm,
                    wc.invalidated_rkey,
                    data.len()
                ));
            }
            if let Some(key) = inv {
                if side.memory.region(*key).valid {
                    return Err(format!("side {i}: rkey {key:#x} still valid after SEND_WITH_INV"));
                }
            }
        }
    }
    Ok(())
}

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn seeded_simulation() {
    let (first, count) = match env("RC_SIM_SEED") {
        Some(seed) => (seed, 1),
        None => (env("RC_SIM_FIRST").unwrap_or(0), env("RC_SIM_SEEDS").unwrap_or(1000)),
    };
    let mut failures = Vec::new();
    let mut summary = String::new();
    for seed in first..first + count {
        match run(seed) {
            Ok(s) => {
                if count == 1 {
                    summary = s;
                }
            }
            Err(e) => failures
                .push(format!("seed {seed}: {e}\n  replay: RC_SIM_SEED={seed} cargo test -p transport --test rc_sim")),
        }
    }
    if !summary.is_empty() {
        eprintln!("{summary}");
    }
    assert!(failures.is_empty(), "{} of {count} seeds failed:\n{}", failures.len(), failures.join("\n"));
}
