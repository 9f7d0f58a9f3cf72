//! A block device namespace, opened with O_DIRECT so that an acknowledged write is on the device, not in our
//! page cache. Size and logical block size come from the device. O_DIRECT needs aligned memory: data passes
//! through page-aligned bounce buffers (safe Rust: a slice of aligned, plain-byte pages viewed as bytes).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use nix::fcntl::{FallocateFlags, OFlag, fallocate};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::{Backend, BackendError, check_geometry};

#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, align(4096))]
struct Page([u8; 4096]);

fn aligned(len: usize) -> Vec<Page> {
    vec![Page([0; 4096]); len.div_ceil(4096)]
}

#[derive(Debug)]
pub struct BlockBackend {
    file: File,
    size: u64,
    block_size: u32,
}

impl BlockBackend {
    pub fn open(path: &Path) -> Result<BlockBackend, BackendError> {
        let io = |source| BackendError::Io { path: path.to_owned(), source };
        let mut file =
            OpenOptions::new().read(true).write(true).custom_flags(OFlag::O_DIRECT.bits()).open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.file_type().is_block_device() {
            return Err(BackendError::NotBlockDevice(path.to_owned()));
        }
        let size = file.seek(SeekFrom::End(0)).map_err(io)?;
        let rdev = meta.rdev();
        let sysfs = format!(
            "/sys/dev/block/{}:{}/queue/logical_block_size",
            nix::sys::stat::major(rdev),
            nix::sys::stat::minor(rdev)
        );
        let block_size = std::fs::read_to_string(&sysfs)
            .map_err(|source| BackendError::Io { path: sysfs.clone().into(), source })?
            .trim()
            .parse::<u32>()
            .map_err(|e| BackendError::Io {
                path: sysfs.into(),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })?;
        check_geometry(size, block_size)?;
        Ok(BlockBackend { file, size, block_size })
    }

    /// O_DIRECT also needs whole blocks.
    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        super::check_extent(offset, len, self.size)?;
        if offset % self.block_size as u64 != 0 || len % self.block_size as u64 != 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not whole blocks"));
        }
        Ok(())
    }
}

impl Backend for BlockBackend {
    fn kind(&self) -> &'static str {
        "block"
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn capacity(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let mut bounce = aligned(buf.len());
        let bytes = &mut bounce.as_mut_bytes()[..buf.len()];
        self.file.read_exact_at(bytes, offset)?;
        buf.copy_from_slice(bytes);
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len() as u64)?;
        let mut bounce = aligned(data.len());
        let bytes = &mut bounce.as_mut_bytes()[..data.len()];
        bytes.copy_from_slice(data);
        self.file.write_all_at(bytes, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        let flags = FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(&self.file, flags, offset as i64, len as i64) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                let mut done = 0;
                let zeroes = aligned(1 << 20);
                while done < len {
                    let n = (len - done).min(1 << 20) as usize;
                    self.file.write_all_at(&zeroes.as_bytes()[..n], offset + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
    fn supports_deallocate(&self) -> bool {
        true
    }
    fn deallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        // On a block device, punching a hole discards (or zeroes) the range.
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(&self.file, flags, offset as i64, len as i64) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP) => self.write_zeroes(offset, len),
            Err(e) => Err(e.into()),
        }
    }
    fn may_block(&self) -> bool {
        true
    }
}
