//! Subsystems and their namespaces: what a host connects to (by NQN) and which hosts may.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use nvme_proto::Uuid;

use crate::backend::Backend;

/// One namespace of a subsystem.
#[derive(Debug)]
pub struct Namespace {
    pub nsid: u32,
    pub backend: Arc<dyn Backend>,
    pub uuid: Uuid,
    pub nguid: [u8; 16],
}

impl Namespace {
    pub fn blocks(&self) -> u64 {
        self.backend.capacity() / self.backend.block_size() as u64
    }
    pub fn block_shift(&self) -> u32 {
        self.backend.block_size().trailing_zeros()
    }
}

#[derive(Debug)]
pub struct Subsystem {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    /// Any host may connect; otherwise only those in `hosts`.
    pub allow_any_host: bool,
    pub hosts: Vec<String>,
    namespaces: RwLock<BTreeMap<u32, Arc<Namespace>>>,
}

impl Subsystem {
    pub fn new(nqn: String, serial: String, model: String, allow_any_host: bool, hosts: Vec<String>) -> Subsystem {
        Subsystem { nqn, serial, model, allow_any_host, hosts, namespaces: RwLock::new(BTreeMap::new()) }
    }

    pub fn allows(&self, hostnqn: &str) -> bool {
        self.allow_any_host || self.hosts.iter().any(|h| h == hostnqn)
    }

    pub fn namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        self.namespaces.read().unwrap_or_else(|p| p.into_inner()).get(&nsid).cloned()
    }

    pub fn namespaces(&self) -> Vec<Arc<Namespace>> {
        self.namespaces.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Highest NSID that may be used (Identify Controller NN).
    pub fn max_nsid(&self) -> u32 {
        self.namespaces.read().unwrap_or_else(|p| p.into_inner()).keys().next_back().copied().unwrap_or(0).max(1024)
    }

    /// Adds a namespace; false when the NSID is taken or invalid.
    pub(crate) fn insert(&self, ns: Namespace) -> bool {
        let mut map = self.namespaces.write().unwrap_or_else(|p| p.into_inner());
        if ns.nsid == 0 || ns.nsid == u32::MAX || map.contains_key(&ns.nsid) {
            return false;
        }
        map.insert(ns.nsid, Arc::new(ns));
        true
    }

    pub(crate) fn remove(&self, nsid: u32) -> Option<Arc<Namespace>> {
        self.namespaces.write().unwrap_or_else(|p| p.into_inner()).remove(&nsid)
    }
}

/// A stable UUID for a namespace: derived from the subsystem NQN and NSID (FNV-1a), so that a restarted target
/// presents the same identity and multipath hosts match paths.
pub fn namespace_uuid(subnqn: &str, nsid: u32) -> Uuid {
    let mut out = [0u8; 16];
    for (half, seed) in out.chunks_exact_mut(8).zip([0xcbf2_9ce4_8422_2325u64, 0x8422_2325_cbf2_9ce4]) {
        let mut h = seed;
        for b in subnqn.bytes().chain(nsid.to_le_bytes()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        half.copy_from_slice(&h.to_be_bytes());
    }
    out[6] = (out[6] & 0x0f) | 0x80; // version 8 (custom)
    out[8] = (out[8] & 0x3f) | 0x80; // RFC 4122 variant
    Uuid::from_bytes(out)
}
