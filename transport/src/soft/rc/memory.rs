//! How the responder reaches registered memory: by rkey, with bounds and access checks. The engine never sees
//! memory except through this trait, so nothing outside a registered region can be read or written.

pub use crate::region::Access;

/// Why a remote access was refused; all of them are answered with a remote access error NAK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("no memory region with rkey {0:#x}")]
    UnknownKey(u32),
    #[error("rkey {rkey:#x}: [{addr:#x}, +{len}) is outside the region")]
    OutOfBounds { rkey: u32, addr: u64, len: u64 },
    #[error("rkey {0:#x} does not allow this access")]
    Permission(u32),
}

/// The registered memory a responder may touch on behalf of its peer.
pub trait RemoteMemory {
    /// Writes `data` at `addr` in the region of `rkey` (needs remote write).
    fn write(&mut self, rkey: u32, addr: u64, data: &[u8]) -> Result<(), AccessError>;
    /// Reads `out.len()` bytes at `addr` in the region of `rkey` (needs remote read).
    fn read(&self, rkey: u32, addr: u64, out: &mut [u8]) -> Result<(), AccessError>;
    /// Checks, without moving data, that `[addr, addr + len)` is reachable with this access.
    fn check(&self, rkey: u32, addr: u64, len: u64, write: bool) -> Result<(), AccessError>;
    /// Invalidates `rkey` (SEND_WITH_INV); later accesses with it fail.
    fn invalidate(&mut self, rkey: u32) -> Result<(), AccessError>;
}
