//! Namespace backends: where a namespace's blocks live. A backend moves bytes at byte offsets that the I/O
//! command layer has already checked against the namespace's size and block size; it knows nothing of NVMe.
//!
//! Backends are shared by every poll group serving the namespace, so each is safe to call from several threads
//! at once. A backend whose calls may sleep (files, block devices) says so with [`Backend::may_block`], and the
//! poll group runs its calls on a blocking thread instead of its own.

use std::io;
use std::path::PathBuf;

mod block;
mod file;
mod ram;

pub use block::BlockBackend;
pub use file::FileBackend;
pub use ram::RamBackend;

pub trait Backend: Send + Sync + std::fmt::Debug {
    /// "ram", "file" or "block".
    fn kind(&self) -> &'static str;
    /// Logical block size in bytes (a power of two, 512..=4096).
    fn block_size(&self) -> u32;
    /// Size in bytes, a multiple of the block size.
    fn capacity(&self) -> u64;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Whether [`Backend::deallocate`] frees space (and later reads return zeroes).
    fn supports_deallocate(&self) -> bool;
    fn deallocate(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Calls may sleep: run them off the poll group's thread.
    fn may_block(&self) -> bool;
    /// Bytes of backing storage in use, for Identify Namespace's NUSE (capacity when unknown).
    fn used(&self) -> u64 {
        self.capacity()
    }
}

/// What a namespace is backed by, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    Ram {
        size: u64,
        block_size: u32,
    },
    /// A regular file, created sparse at `size` when missing (or when shorter).
    File {
        path: PathBuf,
        size: Option<u64>,
        block_size: u32,
    },
    /// A block device opened with O_DIRECT; size and block size come from the device.
    Block {
        path: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("block size {0} is not a power of two in 512..=4096")]
    BlockSize(u32),
    #[error("size {size} is not a non-zero multiple of the block size {block_size}")]
    Size { size: u64, block_size: u32 },
    #[error("{0}: no size given and the file does not exist")]
    NoSize(PathBuf),
    #[error("{0}: not a block device")]
    NotBlockDevice(PathBuf),
}

/// Refuses a byte range that does not lie within `size` (or whose end overflows).
pub(crate) fn check_extent(offset: u64, len: u64, size: u64) -> std::io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "beyond the end of the namespace")),
    }
}

pub fn check_geometry(size: u64, block_size: u32) -> Result<(), BackendError> {
    if !block_size.is_power_of_two() || !(512..=4096).contains(&block_size) {
        return Err(BackendError::BlockSize(block_size));
    }
    if size == 0 || size % block_size as u64 != 0 {
        return Err(BackendError::Size { size, block_size });
    }
    Ok(())
}

impl BackendSpec {
    pub fn open(&self) -> Result<std::sync::Arc<dyn Backend>, BackendError> {
        Ok(match self {
            BackendSpec::Ram { size, block_size } => std::sync::Arc::new(RamBackend::new(*size, *block_size)?),
            BackendSpec::File { path, size, block_size } => {
                std::sync::Arc::new(FileBackend::open(path, *size, *block_size)?)
            }
            BackendSpec::Block { path } => std::sync::Arc::new(BlockBackend::open(path)?),
        })
    }
}
