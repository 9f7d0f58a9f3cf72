//! The memory a work request carries. A [`Buffer`] is owned: posting moves it into the provider and its
//! completion hands it back. It is either memory of its own (made from a `Vec`), which a provider that needs
//! registered memory copies through a staging buffer of its own, or a piece of an *arena* — one allocation
//! carved into equal buffers ([`Buffer::carve`]) whose [`Pinned`] handle the application registers with a
//! lane once (`Device::pin_on_lane`). The verbs provider posts a piece of a registered arena in place: no
//! copy and no registration per request.
//!
//! Why this is sound without unsafe code here: the pieces are `bytes::BytesMut` handles of one shared
//! allocation, and the [`Pinned`] handle is one more of them, so the allocation lives as long as its
//! registration (the provider keeps `Pinned` until it deregisters) even if the application drops every
//! piece. A piece that grew past its capacity has moved to memory of its own and is no longer in the arena;
//! the provider checks the address range of every buffer it posts, so such a piece is staged like any other.

use std::fmt;
use std::ops::{Deref, DerefMut};

use bytes::BytesMut;

/// A work request's memory (see the module documentation).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Buffer(BytesMut);

impl Buffer {
    /// `len` zero bytes of memory of its own.
    pub fn zeroed(len: usize) -> Buffer {
        Buffer(BytesMut::zeroed(len))
    }

    /// `count` zeroed buffers of `size` bytes each, carved out of one allocation, and the handle that lets a
    /// lane register that allocation once ([`Pinned`]).
    pub fn carve(count: usize, size: usize) -> (Vec<Buffer>, Pinned) {
        let total = count.checked_mul(size).expect("an arena's size fits in memory");
        let mut all = BytesMut::zeroed(total);
        // The address is only recorded here, as a number; the provider registers the range while `keep` below
        // (the same allocation) is alive.
        let start = all.as_ptr() as usize;
        let pieces = (0..count).map(|_| Buffer(all.split_to(size))).collect();
        // What is left is an empty handle of the same allocation: it keeps the memory alive.
        (pieces, Pinned { _keep: all, start, len: total })
    }

    /// The bytes it can hold without moving to new memory (and so out of its arena).
    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }

    /// Where its bytes are, as the device addresses them (a virtual address).
    pub fn address(&self) -> u64 {
        self.0.as_ptr() as u64
    }

    /// Shortens it to `len` bytes (no-op when already shorter); the capacity stays.
    pub fn truncate(&mut self, len: usize) {
        self.0.truncate(len);
    }

    /// Lengthens it with `value` or shortens it to `len` bytes. Growing within its capacity keeps it where it
    /// is (in its arena, for a piece of one).
    pub fn resize(&mut self, len: usize, value: u8) {
        self.0.resize(len, value);
    }

    /// Splits off its bytes from `at` on (no copy: both stay where they are); [`Buffer::unsplit`] joins them.
    /// How a buffer lends a shorter prefix to one request without zeroing the rest back later.
    pub fn split_off(&mut self, at: usize) -> Buffer {
        Buffer(self.0.split_off(at))
    }

    /// Joins `tail` back on: without a copy when it is the piece [`Buffer::split_off`] cut from this one.
    pub fn unsplit(&mut self, tail: Buffer) {
        self.0.unsplit(tail.0);
    }

    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Its bytes as a `Vec` (no copy when the memory is its own and unshared; a piece of an arena is copied).
    pub fn into_vec(self) -> Vec<u8> {
        self.0.into()
    }
}

impl From<Vec<u8>> for Buffer {
    fn from(v: Vec<u8>) -> Buffer {
        // A `Bytes` made from a `Vec` is unique, so turning it back into a `BytesMut` keeps the memory.
        Buffer(BytesMut::from(bytes::Bytes::from(v)))
    }
}

impl From<&[u8]> for Buffer {
    fn from(v: &[u8]) -> Buffer {
        Buffer(BytesMut::from(v))
    }
}

impl<const N: usize> From<[u8; N]> for Buffer {
    fn from(v: [u8; N]) -> Buffer {
        Buffer(BytesMut::from(&v[..]))
    }
}

impl Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl AsRef<[u8]> for Buffer {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl PartialEq<[u8]> for Buffer {
    fn eq(&self, other: &[u8]) -> bool {
        self[..] == *other
    }
}

impl PartialEq<Vec<u8>> for Buffer {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self[..] == other[..]
    }
}

impl PartialEq<&[u8]> for Buffer {
    fn eq(&self, other: &&[u8]) -> bool {
        self[..] == **other
    }
}

impl<const N: usize> PartialEq<[u8; N]> for Buffer {
    fn eq(&self, other: &[u8; N]) -> bool {
        self[..] == other[..]
    }
}

impl fmt::Debug for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Buffer({} bytes at {:#x})", self.len(), self.address())
    }
}

/// The allocation an arena's buffers were carved from, to register with a lane once: it keeps the memory
/// alive while the registration lasts, whatever happens to the pieces.
pub struct Pinned {
    _keep: BytesMut,
    start: usize,
    len: usize,
}

impl Pinned {
    /// The arena's first address and its length in bytes.
    pub fn range(&self) -> (usize, usize) {
        (self.start, self.len)
    }

    /// Another handle of the same arena, to register it with another lane as well.
    pub fn share(&mut self) -> Pinned {
        Pinned { _keep: self._keep.split_to(0), start: self.start, len: self.len }
    }

    /// Whether `len` bytes at `address` lie inside the arena.
    pub fn contains(&self, address: u64, len: usize) -> bool {
        let Ok(address) = usize::try_from(address) else { return false };
        address >= self.start && address.checked_add(len).is_some_and(|end| end <= self.start + self.len)
    }
}

impl fmt::Debug for Pinned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pinned({} bytes at {:#x})", self.len, self.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carved_pieces_lie_in_the_arena_and_leave_it_when_they_grow() {
        let (mut pieces, pinned) = Buffer::carve(4, 4096);
        let (start, len) = pinned.range();
        assert_eq!(len, 4 * 4096);
        for (i, p) in pieces.iter().enumerate() {
            assert_eq!(p.len(), 4096);
            assert_eq!(p.address() as usize, start + i * 4096);
            assert!(pinned.contains(p.address(), p.len()));
        }
        // Shrinking and growing back within its capacity keeps a piece where it is.
        pieces[1].truncate(16);
        pieces[1].resize(4096, 7);
        assert!(pinned.contains(pieces[1].address(), 4096));
        // Growing past it moves the piece to memory of its own.
        pieces[2].resize(8192, 0);
        assert!(!pinned.contains(pieces[2].address(), pieces[2].len()));
        // One byte past the end is outside.
        assert!(!pinned.contains(pieces[3].address(), 4097));
        assert!(!pinned.contains(u64::MAX, 1));
        let mut pinned = pinned;
        let shared = pinned.share();
        assert_eq!(shared.range(), pinned.range());
        // A prefix lent and joined back is the whole piece again, in place.
        let at = pieces[0].address();
        let tail = pieces[0].split_off(512);
        assert_eq!(pieces[0].len(), 512);
        pieces[0].unsplit(tail);
        assert_eq!((pieces[0].address(), pieces[0].len(), pieces[0].capacity()), (at, 4096, 4096));
    }

    #[test]
    fn a_vec_becomes_a_buffer_and_back_without_copying() {
        let v = vec![1u8, 2, 3];
        let at = v.as_ptr() as u64;
        let b = Buffer::from(v);
        assert_eq!(b.address(), at);
        assert_eq!(b, vec![1, 2, 3]);
        let back = b.into_vec();
        assert_eq!(back.as_ptr() as u64, at);
    }
}
