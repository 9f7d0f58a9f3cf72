//! Test doubles for the layer above the RC engine: registered memory and a seeded, lossy network.
#![allow(dead_code)]

pub mod capture;

use std::collections::BinaryHeap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use transport::soft::rc::{Access, AccessError, RemoteMemory};
use transport::soft::wire::{IpHeader, PacketRepr, icrc};

/// splitmix64: small, seedable, good enough to drive a simulation.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, n)`.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    /// True with probability `p` (0..=1).
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p && p > 0.0
    }
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// One registered region.
#[derive(Debug, Clone)]
pub struct Region {
    pub rkey: u32,
    pub base: u64,
    pub data: Vec<u8>,
    pub access: Access,
    pub valid: bool,
}

/// A memory table with bounds and access checks, like a device's MR table.
#[derive(Debug, Default, Clone)]
pub struct SimMemory {
    pub regions: Vec<Region>,
}

impl SimMemory {
    pub fn register(&mut self, rkey: u32, base: u64, data: Vec<u8>, access: Access) {
        self.regions.push(Region { rkey, base, data, access, valid: true });
    }
    pub fn region(&self, rkey: u32) -> &Region {
        self.regions.iter().find(|r| r.rkey == rkey).expect("registered")
    }
    fn find(&self, rkey: u32, addr: u64, len: u64) -> Result<(usize, usize), AccessError> {
        let i = self.regions.iter().position(|r| r.rkey == rkey && r.valid).ok_or(AccessError::UnknownKey(rkey))?;
        let r = &self.regions[i];
        let off = addr.checked_sub(r.base).ok_or(AccessError::OutOfBounds { rkey, addr, len })?;
        let end = off.checked_add(len).ok_or(AccessError::OutOfBounds { rkey, addr, len })?;
        if end > r.data.len() as u64 {
            return Err(AccessError::OutOfBounds { rkey, addr, len });
        }
        Ok((i, off as usize))
    }
}

impl RemoteMemory for SimMemory {
    fn write(&mut self, rkey: u32, addr: u64, data: &[u8]) -> Result<(), AccessError> {
        let (i, off) = self.find(rkey, addr, data.len() as u64)?;
        if !self.regions[i].access.remote_write {
            return Err(AccessError::Permission(rkey));
        }
        self.regions[i].data[off..off + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn read(&self, rkey: u32, addr: u64, out: &mut [u8]) -> Result<(), AccessError> {
        let (i, off) = self.find(rkey, addr, out.len() as u64)?;
        if !self.regions[i].access.remote_read {
            return Err(AccessError::Permission(rkey));
        }
        out.copy_from_slice(&self.regions[i].data[off..off + out.len()]);
        Ok(())
    }
    fn check(&self, rkey: u32, addr: u64, len: u64, write: bool) -> Result<(), AccessError> {
        let (i, _) = self.find(rkey, addr, len)?;
        let a = self.regions[i].access;
        if (write && !a.remote_write) || (!write && !a.remote_read) {
            Err(AccessError::Permission(rkey))
        } else {
            Ok(())
        }
    }
    fn invalidate(&mut self, rkey: u32) -> Result<(), AccessError> {
        let r = self.regions.iter_mut().find(|r| r.rkey == rkey && r.valid).ok_or(AccessError::UnknownKey(rkey))?;
        r.valid = false;
        Ok(())
    }
}

/// Network impairments. Packets of one direction arrive in order unless picked for reordering, which holds
/// them back by a random extra delay up to `jitter` — as a real network reorders: now and then, not always.
#[derive(Debug, Clone, Copy)]
pub struct Impairments {
    pub loss: f64,
    pub duplicate: f64,
    pub reorder: f64,
    pub delay: Duration,
    pub jitter: Duration,
}

#[derive(Debug, PartialEq, Eq)]
struct InFlight {
    at: Instant,
    seq: u64,
    to: usize,
    bytes: Vec<u8>,
}
impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// A two-ended datagram network that loses, duplicates, delays and reorders, with every packet carried as real
/// RoCEv2 bytes (ICRC added on send, verified on delivery).
pub struct SimNet {
    pub rng: Rng,
    pub impair: Impairments,
    queue: BinaryHeap<InFlight>,
    seq: u64,
    /// Latest in-order arrival time per destination, so that packets not picked for reordering stay in order.
    last_arrival: [Option<Instant>; 2],
    pub sent: u64,
    pub dropped: u64,
}

pub const ADDRS: [Ipv4Addr; 2] = [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2)];
pub const UDP_SRC: u16 = 0xc123;

impl SimNet {
    pub fn new(seed: u64, impair: Impairments) -> SimNet {
        SimNet {
            rng: Rng::new(seed),
            impair,
            queue: BinaryHeap::new(),
            seq: 0,
            last_arrival: [None; 2],
            sent: 0,
            dropped: 0,
        }
    }

    fn ip(from: usize, len: usize) -> IpHeader {
        IpHeader::ipv4(ADDRS[from], ADDRS[1 - from], 0, (8 + len + 4) as u16)
    }

    /// Sends a packet (BTH .. pad) from side `from`.
    pub fn send(&mut self, now: Instant, from: usize, mut packet: Vec<u8>) {
        let ip = Self::ip(from, packet.len());
        icrc::append(&ip, UDP_SRC, &mut packet).expect("ICRC");
        self.sent += 1;
        let copies = if self.rng.chance(self.impair.duplicate) { 2 } else { 1 };
        for _ in 0..copies {
            if self.rng.chance(self.impair.loss) {
                self.dropped += 1;
                continue;
            }
            let to = 1 - from;
            let base = now + self.impair.delay;
            let at = if self.rng.chance(self.impair.reorder) {
                base + Duration::from_nanos(self.rng.below(self.impair.jitter.as_nanos() as u64 + 1))
            } else {
                let at = self.last_arrival[to].map_or(base, |last| last.max(base));
                self.last_arrival[to] = Some(at);
                at
            };
            self.seq += 1;
            self.queue.push(InFlight { at, seq: self.seq, to, bytes: packet.clone() });
        }
    }

    pub fn next_delivery(&self) -> Option<Instant> {
        self.queue.peek().map(|p| p.at)
    }

    /// The next packet due at `now`: (destination side, bytes with ICRC verified and stripped of nothing).
    pub fn deliver(&mut self, now: Instant) -> Option<(usize, Vec<u8>)> {
        if self.queue.peek().is_some_and(|p| p.at <= now) {
            let p = self.queue.pop().expect("peeked");
            let ip = Self::ip(1 - p.to, p.bytes.len() - 4);
            icrc::verify(&ip, UDP_SRC, &p.bytes).expect("ICRC survives the network");
            return Some((p.to, p.bytes));
        }
        None
    }

    /// One line describing engine output (which has no ICRC yet), for traces.
    pub fn describe(bytes: &[u8]) -> String {
        let mut with_icrc = bytes.to_vec();
        with_icrc.extend_from_slice(&[0; 4]);
        match PacketRepr::parse(&with_icrc) {
            Ok((p, _)) => format!(
                "{:?} psn {} ackreq {} aeth {:?} reth {:?} len {}",
                p.bth.opcode,
                p.bth.psn,
                p.bth.ack_req,
                p.aeth.map(|a| (a.syndrome, a.msn)),
                p.reth.map(|r| (r.va, r.len)),
                p.payload.len()
            ),
            Err(e) => format!("unparsable: {e}"),
        }
    }

    pub fn parse(bytes: &[u8]) -> PacketRepr<'_> {
        PacketRepr::parse(bytes).expect("well-formed packet").0
    }
}

/// A RoCEv2 datagram as a kernel peer sends it: its ICRC over an IPv4 identification the receiver cannot see.
pub fn kernel_datagram(p: &transport::soft::wire::PacketRepr<'_>, from: [u8; 4], to: [u8; 4]) -> Vec<u8> {
    use transport::soft::wire::{IpHeader, icrc};
    let mut out = Vec::new();
    p.emit(&mut out).unwrap();
    let ip = IpHeader::ipv4(from.into(), to.into(), 0x1d2e, (8 + out.len() + 4) as u16);
    icrc::append(&ip, 4791, &mut out).unwrap();
    out
}
