//! A command's data as the caller holds it. An [`IoBuffer`] is either memory of its own (made from a `Vec`) or
//! a buffer lent by an I/O queue's registered pool ([`crate::Controller::buffer`], and every read on such a
//! queue): the target reaches a lent buffer through the pool's key where it is, so a write filled in place and a
//! read handed back as it landed cross no copy and no registration. A lent buffer goes back to its pool when
//! dropped — unless its command got no response (or its exchange was cancelled), when the target may still
//! reach it: then it is never lent again (the pool carves another when it needs one).

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Weak};

use transport::{Buffer, RegionKeys};

use crate::queue::QueuePool;

/// What [`IoBuffer::lend_bytes`] leaves to know its bytes again.
pub(crate) struct LentBytes {
    address: u64,
    home: Option<Weak<QueuePool>>,
}

/// A command's data: see the module documentation.
#[derive(Default)]
pub struct IoBuffer {
    /// The bytes the command moves.
    bytes: Buffer,
    /// The rest of a lent pool buffer (a pool's buffers are of the largest transfer), joined back on return.
    tail: Buffer,
    /// The pool it was lent by; none for memory of its own, or once it must not be lent again.
    home: Option<Weak<QueuePool>>,
}

impl IoBuffer {
    /// `len` bytes of `pool`'s: the pool's buffer lent whole when it holds them, memory of its own otherwise.
    /// A lent buffer's bytes are whatever its last use left (a write fills them; a read overwrites them).
    pub(crate) async fn lend(pool: &Arc<QueuePool>, len: usize) -> IoBuffer {
        if len > pool.buffers.buffer_size() {
            return IoBuffer::zeroed(len);
        }
        let mut bytes = pool.buffers.take().await;
        let tail = bytes.split_off(len);
        IoBuffer { bytes, tail, home: Some(Arc::downgrade(pool)) }
    }

    fn own(bytes: Buffer) -> IoBuffer {
        IoBuffer { bytes, tail: Buffer::default(), home: None }
    }

    /// `len` zero bytes of memory of its own.
    pub fn zeroed(len: usize) -> IoBuffer {
        IoBuffer::own(Buffer::zeroed(len))
    }

    /// Whether it is lent by `pool` — and so posted in place on that pool's queue.
    pub(crate) fn lent_by(&self, pool: &QueuePool) -> bool {
        self.home.as_ref().is_some_and(|h| std::ptr::eq(h.as_ptr(), pool))
    }

    /// The region through which `pool`'s peer reaches it in place, if `pool` lent it and its arena is
    /// registered with the pool's lane.
    pub(crate) fn keys_in(&self, pool: &QueuePool) -> Option<RegionKeys> {
        if self.lent_by(pool) { pool.keys(&self.bytes) } else { None }
    }

    /// While its command is outstanding the target may reach it through the pool's key, so it is not the
    /// pool's to lend again: dropped then (a cancelled exchange), it is never returned. [`IoBuffer::answered`]
    /// gives it back its pool once a response came.
    pub(crate) fn outstanding(&mut self) -> Option<Weak<QueuePool>> {
        self.home.take()
    }

    /// Its command was answered: the target is done with it, so it may go back to `home` (from
    /// [`IoBuffer::outstanding`]). A buffer whose command got no response is never given this.
    pub(crate) fn answered(&mut self, home: Option<Weak<QueuePool>>) {
        self.home = home;
    }

    /// Where its bytes are, as the device addresses them.
    pub(crate) fn address(&self) -> u64 {
        self.bytes.address()
    }

    /// Hands its bytes over (to be a region of their own for one command); [`IoBuffer::restore_bytes`] takes
    /// them back. Meanwhile it is not its pool's: dropped (a cancelled exchange), its bytes are not returned.
    pub(crate) fn lend_bytes(&mut self) -> (Buffer, LentBytes) {
        let bytes = std::mem::take(&mut self.bytes);
        let lent = LentBytes { address: bytes.address(), home: self.home.take() };
        (bytes, lent)
    }

    /// Its bytes back from their region. They go home again only if they are the very bytes lent (a provider
    /// that copied them out hands back memory of its own, which is not the pool's).
    pub(crate) fn restore_bytes(mut self, bytes: Buffer, lent: LentBytes) -> IoBuffer {
        if bytes.address() == lent.address {
            self.home = lent.home;
        } else {
            self.tail = Buffer::default();
        }
        self.bytes = bytes;
        self
    }

    /// Whether it is a pool's (lent, and so returned when dropped).
    pub fn is_lent(&self) -> bool {
        self.home.is_some()
    }

    /// Its bytes as a `Vec` (no copy for memory of its own; a lent buffer is copied and goes back to its pool).
    pub fn into_vec(mut self) -> Vec<u8> {
        if self.home.is_some() {
            return self.bytes.to_vec();
        }
        std::mem::take(&mut self.bytes).into_vec()
    }
}

impl Drop for IoBuffer {
    fn drop(&mut self) {
        let Some(pool) = self.home.take().and_then(|h| h.upgrade()) else { return };
        let mut bytes = std::mem::take(&mut self.bytes);
        bytes.unsplit(std::mem::take(&mut self.tail));
        pool.buffers.give(bytes);
    }
}

impl From<Vec<u8>> for IoBuffer {
    fn from(v: Vec<u8>) -> IoBuffer {
        IoBuffer::own(Buffer::from(v))
    }
}

impl From<&[u8]> for IoBuffer {
    fn from(v: &[u8]) -> IoBuffer {
        IoBuffer::own(Buffer::from(v))
    }
}

impl Deref for IoBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl DerefMut for IoBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }
}

impl AsRef<[u8]> for IoBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl PartialEq for IoBuffer {
    fn eq(&self, other: &IoBuffer) -> bool {
        self[..] == other[..]
    }
}

impl PartialEq<[u8]> for IoBuffer {
    fn eq(&self, other: &[u8]) -> bool {
        self[..] == *other
    }
}

impl PartialEq<Vec<u8>> for IoBuffer {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self[..] == other[..]
    }
}

impl fmt::Debug for IoBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.home.is_some() { "lent" } else { "own" };
        write!(f, "IoBuffer({} bytes, {kind})", self.bytes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 4 MiB buffers: the pool carves one at a time, so `carved` counts the buffers that never came back.
    const BIG: usize = 4 << 20;

    #[tokio::test]
    async fn a_lent_buffer_goes_back_whole_when_dropped() {
        let pool = Arc::new(QueuePool::unregistered(BIG));
        let mut a = IoBuffer::lend(&pool, 4096).await;
        assert_eq!((a.len(), a.is_lent(), pool.buffers.carved()), (4096, true, 1));
        assert!(a.lent_by(&pool));
        a.fill(0xa5);
        let at = a.address();
        drop(a);
        // The same buffer again, whole (the tail joined back), holding what its last use left.
        let b = IoBuffer::lend(&pool, BIG).await;
        assert_eq!((b.address(), b.len(), pool.buffers.carved()), (at, BIG, 1));
        assert!(b[..4096].iter().all(|&x| x == 0xa5));
        // More than a buffer holds: memory of its own.
        let big = IoBuffer::lend(&pool, BIG + 1).await;
        assert!(!big.is_lent() && !big.lent_by(&pool));
        assert_eq!(pool.buffers.carved(), 1);
        // Not registered with any lane: no keys, so the exchange registers a region instead.
        assert_eq!(b.keys_in(&pool), None);
    }

    #[tokio::test]
    async fn a_buffer_whose_command_got_no_response_is_never_lent_again() {
        let pool = Arc::new(QueuePool::unregistered(BIG));
        let mut a = IoBuffer::lend(&pool, 512).await;
        let at = a.address();
        let home = a.outstanding();
        assert!(!a.is_lent());
        // A cancelled exchange drops it while outstanding.
        drop(a);
        let mut b = IoBuffer::lend(&pool, 512).await;
        assert_ne!(b.address(), at);
        assert_eq!(pool.buffers.carved(), 2);
        drop(home);
        // Answered: back to the pool as before.
        let home = b.outstanding();
        b.answered(home);
        let again = b.address();
        drop(b);
        assert_eq!(IoBuffer::lend(&pool, 512).await.address(), again);
        assert_eq!(pool.buffers.carved(), 2);
    }

    #[tokio::test]
    async fn another_pools_buffer_and_memory_of_its_own_are_not_this_pools() {
        let (one, two) = (Arc::new(QueuePool::unregistered(BIG)), Arc::new(QueuePool::unregistered(BIG)));
        let a = IoBuffer::lend(&one, 64).await;
        assert!(a.lent_by(&one) && !a.lent_by(&two));
        let own = IoBuffer::from(vec![1u8, 2, 3]);
        assert!(!own.lent_by(&one) && !own.is_lent());
        assert_eq!(own, vec![1, 2, 3]);
        // A lent buffer outliving its pool (a lost association's) is let go when dropped.
        let gone = Arc::downgrade(&one);
        drop(one);
        assert!(a.is_lent() && gone.upgrade().is_none());
        drop(a);
        // Its bytes out: copied from a lent one (which then goes home), moved from memory of its own.
        let lent = IoBuffer::lend(&two, 3).await;
        let at = lent.address();
        assert_eq!(lent.into_vec().len(), 3);
        assert_eq!(IoBuffer::lend(&two, 3).await.address(), at);
        assert_eq!(own.into_vec(), vec![1, 2, 3]);
    }
}
