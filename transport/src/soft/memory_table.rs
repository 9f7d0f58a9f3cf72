//! The registered memory of one soft device. A region's memory is owned by the table while registered (the
//! application handed it over and gets it back on deregistration), so the provider may read and write it for
//! the peer without sharing it with anyone. Addresses are synthetic: each region gets its own 4 GiB-aligned
//! window, so a peer learns nothing about our address space and a region can never reach into another.

use std::collections::HashMap;

use super::rc::{Access, AccessError, RemoteMemory};
use crate::buffer::Buffer;

#[derive(Debug)]
struct Region {
    /// The protection domain the region belongs to: only queue pairs of the same domain reach it.
    pd: u32,
    base: u64,
    data: Buffer,
    access: Access,
    valid: bool,
}

pub use crate::region::RegionKeys;

#[derive(Debug)]
pub struct MemoryTable {
    regions: HashMap<u32, Region>,
    next_key: u32,
}

/// Regions are limited to 4 GiB so that each fits its address window.
pub const MAX_REGION: usize = u32::MAX as usize;

impl Default for MemoryTable {
    fn default() -> Self {
        MemoryTable { regions: HashMap::new(), next_key: 0x100 }
    }
}

impl MemoryTable {
    pub fn register(&mut self, pd: u32, data: Buffer, access: Access) -> Result<RegionKeys, Buffer> {
        if data.len() > MAX_REGION {
            return Err(data);
        }
        // Keys are never reused while a region holds them; a key identifies its address window.
        let key = loop {
            let k = self.next_key;
            self.next_key = self.next_key.wrapping_add(1).max(0x100);
            if !self.regions.contains_key(&k) {
                break k;
            }
        };
        let base = (key as u64) << 32;
        let keys = RegionKeys { lkey: key, rkey: key, addr: base, len: data.len() };
        self.regions.insert(key, Region { pd, base, data, access, valid: true });
        Ok(keys)
    }

    /// Removes the region and hands its memory back.
    pub fn deregister(&mut self, key: u32) -> Option<Buffer> {
        self.regions.remove(&key).map(|r| r.data)
    }

    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Regions of one protection domain.
    pub fn in_domain(&self, pd: u32) -> usize {
        self.regions.values().filter(|r| r.pd == pd).count()
    }

    /// The table as a queue pair of domain `pd` sees it: other domains' regions do not exist for it.
    pub fn domain(&mut self, pd: u32) -> DomainMemory<'_> {
        DomainMemory { table: self, pd }
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Bytes held in registered regions.
    pub fn bytes(&self) -> usize {
        self.regions.values().map(|r| r.data.len()).sum()
    }

    fn find(&self, pd: u32, rkey: u32, addr: u64, len: u64) -> Result<(&Region, usize), AccessError> {
        let r = self.regions.get(&rkey).filter(|r| r.valid && r.pd == pd).ok_or(AccessError::UnknownKey(rkey))?;
        let oob = AccessError::OutOfBounds { rkey, addr, len };
        let off = addr.checked_sub(r.base).ok_or(oob)?;
        let end = off.checked_add(len).ok_or(oob)?;
        if end > r.data.len() as u64 {
            return Err(oob);
        }
        Ok((r, off as usize))
    }
}

/// The regions of one protection domain, as its queue pairs reach them.
#[derive(Debug)]
pub struct DomainMemory<'a> {
    table: &'a mut MemoryTable,
    pd: u32,
}

impl RemoteMemory for DomainMemory<'_> {
    fn write(&mut self, rkey: u32, addr: u64, data: &[u8]) -> Result<(), AccessError> {
        let (r, off) = self.table.find(self.pd, rkey, addr, data.len() as u64)?;
        if !r.access.remote_write {
            return Err(AccessError::Permission(rkey));
        }
        let r = self.table.regions.get_mut(&rkey).expect("found above");
        r.data[off..off + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn read(&self, rkey: u32, addr: u64, out: &mut [u8]) -> Result<(), AccessError> {
        let (r, off) = self.table.find(self.pd, rkey, addr, out.len() as u64)?;
        if !r.access.remote_read {
            return Err(AccessError::Permission(rkey));
        }
        out.copy_from_slice(&r.data[off..off + out.len()]);
        Ok(())
    }

    fn check(&self, rkey: u32, addr: u64, len: u64, write: bool) -> Result<(), AccessError> {
        let (r, _) = self.table.find(self.pd, rkey, addr, len)?;
        if (write && !r.access.remote_write) || (!write && !r.access.remote_read) {
            return Err(AccessError::Permission(rkey));
        }
        Ok(())
    }

    fn invalidate(&mut self, rkey: u32) -> Result<(), AccessError> {
        let pd = self.pd;
        let r =
            self.table.regions.get_mut(&rkey).filter(|r| r.valid && r.pd == pd).ok_or(AccessError::UnknownKey(rkey))?;
        r.valid = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_access_and_invalidation() {
        let mut table = MemoryTable::default();
        let a = table.register(1, Buffer::zeroed(100), Access::REMOTE_WRITE).unwrap();
        let b = table.register(1, (0..50).collect::<Vec<u8>>().into(), Access::REMOTE_READ).unwrap();
        let c = table.register(2, Buffer::zeroed(10), Access::REMOTE_ALL).unwrap();
        assert!(
            matches!(table.domain(1).check(c.rkey, c.addr, 1, true), Err(AccessError::UnknownKey(_))),
            "other domain"
        );
        assert!(table.domain(2).check(c.rkey, c.addr, 1, true).is_ok());
        let mut t = table.domain(1);
        assert_ne!(a.rkey, b.rkey);
        t.write(a.rkey, a.addr + 90, &[1; 10]).unwrap();
        assert!(matches!(t.write(a.rkey, a.addr + 91, &[1; 10]), Err(AccessError::OutOfBounds { .. })));
        assert!(matches!(t.write(a.rkey, a.addr - 1, &[1]), Err(AccessError::OutOfBounds { .. })));
        assert!(matches!(t.write(a.rkey, u64::MAX, &[1; 2]), Err(AccessError::OutOfBounds { .. })));
        assert!(matches!(t.write(b.rkey, b.addr, &[1]), Err(AccessError::Permission(_))));
        // A region's key cannot reach into the other region's window.
        assert!(t.check(a.rkey, b.addr, 1, false).is_err());
        let mut out = [0u8; 5];
        t.read(b.rkey, b.addr + 45, &mut out).unwrap();
        assert_eq!(out, [45, 46, 47, 48, 49]);
        t.invalidate(b.rkey).unwrap();
        assert!(matches!(t.read(b.rkey, b.addr, &mut out), Err(AccessError::UnknownKey(_))));
        assert!(t.invalidate(b.rkey).is_err());
        let data = table.deregister(a.rkey).unwrap();
        assert_eq!(&data[90..], &[1; 10]);
        assert_eq!((table.len(), table.in_domain(1), table.in_domain(2)), (2, 1, 1));
    }
}
