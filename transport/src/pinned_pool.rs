//! A free list of equal buffers carved from arenas that are registered once with every lane they are used on,
//! so that the verbs provider posts them in place: no staging copy and no registration per request. Arenas are
//! carved in chunks as the pool needs them (a pool of 256 × 16 MiB buffers is never allocated up front) and
//! buffers come back to the free list; each chunk is registered with each lane once, when it is carved or when
//! the lane is added. A lane whose device registers no arenas (the soft provider, which copies every buffer into
//! its datagrams anyway) says so once and is not asked again; a buffer whose chunk is not registered with the
//! lane it is posted on is staged, which is slower, not wrong.
//!
//! With remote access (a host's data buffers), [`PinnedPool::keys`] gives the region a peer reaches a buffer
//! through. The lock is never held across an await; a pool is meant for one thread but may be shared.

use std::sync::{Mutex, MutexGuard, Weak};

use crate::buffer::{Buffer, Pinned};
use crate::device::{Device, DeviceError, ProtectionDomain};
use crate::region::{Access, RegionKeys};

/// Bytes carved at once (at least one buffer, at most `CHUNK_BUFFERS`).
const CHUNK_BYTES: usize = 4 << 20;
const CHUNK_BUFFERS: usize = 1024;

/// A lane to register a pool's arenas with. Weak: a pool must not keep open a device its owner has let go.
#[derive(Debug, Clone)]
pub struct PoolLane {
    pub device: Weak<Device>,
    pub pd: u32,
    pub lane: usize,
    pub access: Access,
}

impl PoolLane {
    fn same(&self, other: &PoolLane) -> bool {
        self.device.ptr_eq(&other.device) && self.lane == other.lane
    }
}

#[derive(Debug)]
pub struct PinnedPool {
    buffer_size: usize,
    per_chunk: usize,
    state: Mutex<State>,
    /// Held while a chunk is carved and registered: its buffers are free only once every lane has it (else
    /// a buffer taken meanwhile would be staged, or have no keys), and those waiting take them then instead
    /// of carving chunks of their own.
    carving: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct State {
    free: Vec<Buffer>,
    /// One handle per chunk, to register it with lanes added later.
    chunks: Vec<Pinned>,
    lanes: Vec<PoolLane>,
    /// What each registration gave: the chunk's range, its lane, its keys.
    regions: Vec<(usize, usize, PoolLane, RegionKeys)>,
    carved: usize,
}

impl PinnedPool {
    pub fn new(buffer_size: usize) -> PinnedPool {
        PinnedPool {
            buffer_size,
            per_chunk: (CHUNK_BYTES / buffer_size.max(1)).clamp(1, CHUNK_BUFFERS),
            state: Mutex::new(State::default()),
            carving: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere leaves lists that are still consistent (each change is one push or pop).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn buffer_size(&self) -> usize {
        self.buffer_size
    }

    /// A buffer of the pool's size (its bytes are whatever its last use left). When none is free a chunk is
    /// carved and registered with every lane of the pool before this returns.
    pub async fn take(&self) -> Buffer {
        if let Some(b) = self.state().free.pop() {
            return b;
        }
        let _carving = self.carving.lock().await;
        let (pieces, chunk, lanes) = {
            let mut state = self.state();
            // Another taker carved while this one waited.
            if let Some(b) = state.free.pop() {
                return b;
            }
            let (pieces, mut pinned) = Buffer::carve(self.per_chunk, self.buffer_size);
            state.carved += self.per_chunk;
            let lanes = state.lanes.clone();
            let shares: Vec<Pinned> = lanes.iter().map(|_| pinned.share()).collect();
            state.chunks.push(pinned);
            (pieces, shares, lanes)
        };
        // A taker cancelled while the chunk registers leaves its buffers free all the same (one posted on a
        // lane it did not reach yet is staged: slower, not wrong).
        let mut carved = Carved { pool: self, pieces };
        for (lane, pinned) in lanes.into_iter().zip(chunk) {
            self.register(lane, pinned).await;
        }
        carved.pieces.pop().expect("a chunk holds at least one buffer")
    }

    /// Takes a buffer back: one of the pool's, whole; anything else (a piece that lost its tail, memory of its
    /// own) is let go.
    pub fn give(&self, buf: Buffer) {
        if buf.capacity() == self.buffer_size && buf.len() == self.buffer_size {
            self.state().free.push(buf);
        }
    }

    /// A lane the pool's buffers are posted on: every chunk so far is registered with it now, every later one
    /// when it is carved. Lanes of devices that are gone are forgotten.
    pub async fn add_lane(&self, lane: PoolLane) {
        let _carving = self.carving.lock().await;
        let shares: Vec<Pinned> = {
            let mut state = self.state();
            state.lanes.retain(|l| l.device.strong_count() > 0);
            state.regions.retain(|(_, _, l, _)| l.device.strong_count() > 0);
            state.lanes.push(lane.clone());
            state.chunks.iter_mut().map(Pinned::share).collect()
        };
        for pinned in shares {
            self.register(lane.clone(), pinned).await;
        }
    }

    async fn register(&self, lane: PoolLane, pinned: Pinned) {
        let Some(device) = lane.device.upgrade() else { return };
        let (start, len) = pinned.range();
        let pd = ProtectionDomain { id: lane.pd };
        // The region lives as long as the lane (the lane's end deregisters it).
        let result = device.pin_on_lane(lane.lane, &pd, pinned, lane.access).await;
        drop(device);
        match result {
            Ok(mr) => self.state().regions.push((start, len, lane, mr.keys)),
            Err(DeviceError::Unsupported(why)) => {
                tracing::debug!(lane = lane.lane, "buffers are posted as they are: {why}");
                self.state().lanes.retain(|l| !l.same(&lane));
            }
            Err(e) => tracing::warn!(lane = lane.lane, "registering a buffer arena: {e} (its buffers are staged)"),
        }
    }

    /// The region through which a peer of `lane` reaches `buf` (its chunk's keys; the address is the buffer's
    /// own), if the buffer's chunk is registered with that lane.
    pub fn keys(&self, buf: &Buffer, device: &Weak<Device>, lane: usize) -> Option<RegionKeys> {
        let at = usize::try_from(buf.address()).ok()?;
        let end = at.checked_add(buf.len())?;
        self.state()
            .regions
            .iter()
            .find(|(start, len, l, _)| l.device.ptr_eq(device) && l.lane == lane && at >= *start && end <= start + len)
            .map(|(_, _, _, keys)| *keys)
    }

    /// Buffers carved so far.
    pub fn carved(&self) -> usize {
        self.state().carved
    }
}

/// A chunk's buffers while it registers: free once it is done, or if its taker is cancelled.
struct Carved<'a> {
    pool: &'a PinnedPool,
    pieces: Vec<Buffer>,
}

impl Drop for Carved<'_> {
    fn drop(&mut self) {
        let pieces = std::mem::take(&mut self.pieces);
        self.pool.state().free.extend(pieces);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn buffers_are_carved_by_chunk_and_recycled() {
        let pool = PinnedPool::new(1 << 20);
        let a = pool.take().await;
        assert_eq!(a.len(), 1 << 20);
        assert_eq!(pool.carved(), 4);
        let b = pool.take().await;
        assert_eq!(pool.carved(), 4);
        // Neighbours in one allocation.
        assert_eq!(b.address() + (1 << 20), a.address());
        pool.give(a);
        pool.give(Buffer::zeroed(16));
        let mut short = pool.take().await;
        short.truncate(10);
        pool.give(short);
        assert_eq!(pool.state().free.len(), 2);
        // Nothing registered: no keys.
        assert_eq!(pool.keys(&b, &Weak::new(), 0), None);
    }

    #[test]
    fn small_buffers_come_a_thousand_at_a_time() {
        assert_eq!(PinnedPool::new(16).per_chunk, CHUNK_BUFFERS);
        assert_eq!(PinnedPool::new(16 << 20).per_chunk, 1);
    }
}
