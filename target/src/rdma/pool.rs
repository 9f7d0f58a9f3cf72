//! A poll group's bounded pool of data buffers for keyed transfers (RDMA READ of host data, RDMA WRITE of
//! read data). Bounded so that a flood of large commands waits for buffers instead of growing memory; each
//! buffer leaves the pool while the transport holds it and comes back with its completion. The buffers are
//! carved from arenas registered once with each lane the group runs (`transport::PinnedPool`), so the verbs
//! provider posts them in place; so are the response capsules' (16 bytes each, unbounded: one per command in
//! flight).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use transport::{Buffer, PinnedPool, PoolLane};

pub struct BufferPool {
    buffer_size: usize,
    capacity: usize,
    arenas: PinnedPool,
    responses: PinnedPool,
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BufferPool({} × {} bytes, {} in use)", self.capacity, self.buffer_size, self.in_use())
    }
}

/// A buffer taken from the pool, and its place in the pool; hand both back with [`BufferPool::put`].
#[derive(Debug)]
pub struct Lease {
    pub buf: Buffer,
    /// The rest of the pool's buffer beyond this transfer's length, joined back on `put` (no zeroing).
    tail: Buffer,
    _permit: OwnedSemaphorePermit,
}

impl BufferPool {
    pub fn new(capacity: usize, buffer_size: usize) -> BufferPool {
        BufferPool {
            buffer_size,
            capacity,
            arenas: PinnedPool::new(buffer_size),
            responses: PinnedPool::new(nvme_proto::cqe::CQE_LEN),
            permits: Arc::new(Semaphore::new(capacity)),
        }
    }

    /// A buffer of `len` bytes (at most the pool's buffer size), waiting while all are in use.
    pub async fn take(&self, len: usize) -> Lease {
        assert!(len <= self.buffer_size, "transfer of {len} bytes exceeds the pool's buffers; callers check MDTS");
        let permit = self.permits.clone().acquire_owned().await.expect("the pool's semaphore is never closed");
        let mut buf = self.arenas.take().await;
        // Not zeroed again: whatever a transfer leaves in a buffer is overwritten in full before it is sent —
        // a read's by the backend (`read_at` fills the slice or fails, and a failed read sends nothing), a
        // write's by the RDMA READ (a failed one fails the command) — as nvmet's and SPDK's buffers are.
        let tail = buf.split_off(len);
        Lease { buf, tail, _permit: permit }
    }

    /// Returns a lease; put the buffer back into `lease.buf` first if it travelled. A buffer that did not come
    /// back (a transport that lost it) is replaced by a new one on a later `take`.
    pub fn put(&self, lease: Lease) {
        let Lease { mut buf, tail, _permit } = lease;
        buf.unsplit(tail);
        self.arenas.give(buf);
    }

    /// A buffer for a response capsule.
    pub async fn take_response(&self) -> Buffer {
        self.responses.take().await
    }

    pub fn put_response(&self, buf: Buffer) {
        self.responses.give(buf);
    }

    /// A lane the group runs: the pool's memory is registered with it.
    pub async fn add_lane(&self, lane: PoolLane) {
        self.arenas.add_lane(lane.clone()).await;
        self.responses.add_lane(lane).await;
    }

    pub fn in_use(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}
