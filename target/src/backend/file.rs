//! A file namespace: positional reads and writes on a regular file (sparse is fine). Write Zeroes and
//! deallocation punch holes, so they free space and read back as zeroes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::fcntl::{FallocateFlags, fallocate};

use super::{Backend, BackendError, check_geometry};

#[derive(Debug)]
pub struct FileBackend {
    file: File,
    size: u64,
    block_size: u32,
}

impl FileBackend {
    /// Opens (creating it when missing) `path`; with `size`, extends a shorter file to it (sparse).
    pub fn open(path: &Path, size: Option<u64>, block_size: u32) -> Result<FileBackend, BackendError> {
        let io = |source| BackendError::Io { path: path.to_owned(), source };
        let exists = path.exists();
        if !exists && size.is_none() {
            return Err(BackendError::NoSize(path.to_owned()));
        }
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
        let current = file.metadata().map_err(io)?.len();
        let size = match size {
            Some(s) => {
                if current < s {
                    file.set_len(s).map_err(io)?;
                }
                s
            }
            None => current - current % block_size as u64,
        };
        check_geometry(size, block_size)?;
        Ok(FileBackend { file, size, block_size })
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        super::check_extent(offset, len, self.size)
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(&self.file, flags, offset as i64, len as i64) {
            Ok(()) => Ok(()),
            // A filesystem without hole punching: write the zeroes.
            Err(nix::errno::Errno::EOPNOTSUPP) => write_zeroes_by_hand(&self.file, offset, len),
            Err(e) => Err(e.into()),
        }
    }
}

pub(super) fn write_zeroes_by_hand(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

impl Backend for FileBackend {
    fn kind(&self) -> &'static str {
        "file"
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn capacity(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len() as u64)?;
        self.file.write_all_at(data, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.punch(offset, len)
    }
    fn supports_deallocate(&self) -> bool {
        true
    }
    fn deallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.punch(offset, len)
    }
    fn may_block(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_file_round_trip_and_holes() {
        let dir = std::env::temp_dir().join(format!("nvmf-file-backend-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ns.img");
        let _ = std::fs::remove_file(&path);
        assert!(matches!(FileBackend::open(&path, None, 512), Err(BackendError::NoSize(_))));
        let f = FileBackend::open(&path, Some(8 << 20), 512).unwrap();
        assert_eq!(f.capacity(), 8 << 20);
        let data = vec![0x5au8; 8192];
        f.write_at(4096, &data).unwrap();
        let mut back = vec![0u8; 8192];
        f.read_at(4096, &mut back).unwrap();
        assert_eq!(back, data);
        f.write_zeroes(4096, 4096).unwrap();
        f.read_at(4096, &mut back).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0) && back[4096..].iter().all(|&b| b == 0x5a));
        assert!(f.write_at((8 << 20) - 512, &data).is_err());
        drop(f);
        // Reopened without a size: the file's own.
        assert_eq!(FileBackend::open(&path, None, 4096).unwrap().capacity(), 8 << 20);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
