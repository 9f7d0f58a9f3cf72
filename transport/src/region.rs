//! A registered memory region's access rights and keys, the same for every provider.

/// Remote access rights of a memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Access {
    pub local_write: bool,
    pub remote_read: bool,
    pub remote_write: bool,
}

impl Access {
    pub const LOCAL_WRITE: Access = Access { local_write: true, remote_read: false, remote_write: false };
    pub const REMOTE_READ: Access = Access { local_write: false, remote_read: true, remote_write: false };
    pub const REMOTE_WRITE: Access = Access { local_write: true, remote_read: false, remote_write: true };
    pub const REMOTE_ALL: Access = Access { local_write: true, remote_read: true, remote_write: true };
}

/// Keys and address of a registered region, as the application sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegionKeys {
    pub lkey: u32,
    pub rkey: u32,
    /// The address the peer uses in RDMA operations on this region.
    pub addr: u64,
    pub len: usize,
}

/// What a region is registered over: a buffer the region owns until it is deregistered, or an arena the
/// application keeps carving its buffers from ([`crate::Buffer::carve`]), which the region only keeps alive.
#[derive(Debug)]
pub(crate) enum RegionMemory {
    Owned(crate::buffer::Buffer),
    Pinned(#[cfg_attr(not(feature = "verbs"), allow(dead_code))] crate::buffer::Pinned),
}
