//! A RAM namespace. Memory is taken lazily in 1 MiB chunks on first write, so a large namespace costs
//! nothing until it is written, and deallocating a whole chunk gives it back. Each chunk has its own lock:
//! I/O to different chunks from different poll groups never contends.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Backend, BackendError, check_geometry};

const CHUNK: u64 = 1 << 20;

#[derive(Debug)]
pub struct RamBackend {
    size: u64,
    block_size: u32,
    chunks: Vec<Mutex<Option<Box<[u8]>>>>,
    allocated: AtomicU64,
}

impl RamBackend {
    pub fn new(size: u64, block_size: u32) -> Result<RamBackend, BackendError> {
        check_geometry(size, block_size)?;
        let n = size.div_ceil(CHUNK) as usize;
        Ok(RamBackend { size, block_size, chunks: (0..n).map(|_| Mutex::new(None)).collect(), allocated: 0.into() })
    }

    fn chunk_len(&self, index: usize) -> usize {
        (self.size - index as u64 * CHUNK).min(CHUNK) as usize
    }

    /// Calls `f(chunk index, offset in chunk, range in the caller's buffer)` for each piece of the range.
    fn pieces(offset: u64, len: usize, mut f: impl FnMut(usize, usize, std::ops::Range<usize>)) {
        let mut done = 0usize;
        while done < len {
            let at = offset + done as u64;
            let (index, within) = ((at / CHUNK) as usize, (at % CHUNK) as usize);
            let n = (CHUNK as usize - within).min(len - done);
            f(index, within, done..done + n);
            done += n;
        }
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        super::check_extent(offset, len, self.size)
    }

    fn lock(&self, index: usize) -> std::sync::MutexGuard<'_, Option<Box<[u8]>>> {
        self.chunks[index].lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for RamBackend {
    fn kind(&self) -> &'static str {
        "ram"
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn capacity(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        Self::pieces(offset, buf.len(), |index, within, range| {
            let n = range.len();
            match self.lock(index).as_deref() {
                Some(chunk) => buf[range].copy_from_slice(&chunk[within..within + n]),
                None => buf[range].fill(0),
            }
        });
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len() as u64)?;
        Self::pieces(offset, data.len(), |index, within, range| {
            let n = range.len();
            let mut chunk = self.lock(index);
            let chunk = chunk.get_or_insert_with(|| {
                self.allocated.fetch_add(1, Ordering::Relaxed);
                vec![0u8; self.chunk_len(index)].into_boxed_slice()
            });
            chunk[within..within + n].copy_from_slice(&data[range]);
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.deallocate(offset, len)
    }

    fn supports_deallocate(&self) -> bool {
        true
    }

    fn deallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        Self::pieces(offset, len, |index, within, range| {
            let mut chunk = self.lock(index);
            if within == 0 && range.len() == self.chunk_len(index) {
                if chunk.take().is_some() {
                    self.allocated.fetch_sub(1, Ordering::Relaxed);
                }
            } else if let Some(c) = chunk.as_deref_mut() {
                c[within..within + range.len()].fill(0);
            }
        });
        Ok(())
    }

    fn may_block(&self) -> bool {
        false
    }

    fn used(&self) -> u64 {
        (self.allocated.load(Ordering::Relaxed) * CHUNK).min(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_zero_until_written_and_spans_chunks() {
        let ram = RamBackend::new(3 * CHUNK, 512).unwrap();
        let mut buf = vec![0xffu8; 4096];
        ram.read_at(CHUNK - 2048, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        ram.write_at(CHUNK - 2048, &data).unwrap();
        ram.read_at(CHUNK - 2048, &mut buf).unwrap();
        assert_eq!(buf, data);
        assert_eq!(ram.used(), 2 * CHUNK);
        ram.deallocate(0, CHUNK).unwrap();
        assert_eq!(ram.used(), CHUNK);
        ram.read_at(CHUNK - 2048, &mut buf).unwrap();
        assert_eq!(&buf[..2048], &[0u8; 2048][..]);
        assert_eq!(&buf[2048..], &data[2048..]);
        assert!(ram.read_at(3 * CHUNK - 512, &mut buf).is_err());
        assert!(ram.write_at(u64::MAX - 10, &data).is_err());
    }

    #[test]
    fn refuses_bad_geometry() {
        assert!(RamBackend::new(1000, 512).is_err());
        assert!(RamBackend::new(4096, 1000).is_err());
        assert!(RamBackend::new(0, 512).is_err());
    }
}
