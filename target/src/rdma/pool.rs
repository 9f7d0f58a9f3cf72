//! A poll group's bounded pool of data buffers for keyed transfers (RDMA READ of host data, RDMA WRITE of
//! read data). Bounded so that a flood of large commands waits for buffers instead of growing memory; each
//! buffer leaves the pool while the transport holds it and comes back with its completion.

use std::cell::RefCell;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
pub struct BufferPool {
    buffer_size: usize,
    capacity: usize,
    free: RefCell<Vec<Vec<u8>>>,
    permits: Arc<Semaphore>,
}

/// A buffer taken from the pool, and its place in the pool; hand both back with [`BufferPool::put`].
#[derive(Debug)]
pub struct Lease {
    pub buf: Vec<u8>,
    _permit: OwnedSemaphorePermit,
}

impl BufferPool {
    pub fn new(capacity: usize, buffer_size: usize) -> BufferPool {
        BufferPool {
            buffer_size,
            capacity,
            free: RefCell::new(Vec::new()),
            permits: Arc::new(Semaphore::new(capacity)),
        }
    }

    /// A buffer of `len` bytes (at most the pool's buffer size), waiting while all are in use.
    pub async fn take(&self, len: usize) -> Lease {
        assert!(len <= self.buffer_size, "transfer of {len} bytes exceeds the pool's buffers; callers check MDTS");
        let permit = self.permits.clone().acquire_owned().await.expect("the pool's semaphore is never closed");
        let mut buf = self.free.borrow_mut().pop().unwrap_or_else(|| Vec::with_capacity(self.buffer_size));
        // Not zeroed again: whatever a transfer leaves in a buffer is overwritten in full before it is sent —
        // a read's by the backend (`read_at` fills the slice or fails, and a failed read sends nothing), a
        // write's by the RDMA READ (a failed one fails the command) — as nvmet's and SPDK's buffers are.
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        Lease { buf, _permit: permit }
    }

    /// Returns a lease; put the buffer back into `lease.buf` first if it travelled. A buffer that did not come
    /// back (a transport that lost it) is replaced by a new one on a later `take`.
    pub fn put(&self, lease: Lease) {
        let Lease { buf, _permit } = lease;
        if buf.capacity() == self.buffer_size {
            self.free.borrow_mut().push(buf);
        }
    }

    pub fn in_use(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}
