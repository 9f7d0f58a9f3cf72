//! The testbed: real Linux kernels in QEMU microVMs — rxe, bonding, nvme-rdma, nvmet-rdma — wired NIC-to-NIC,
//! broken the way the seed was broken, with a report of what survived.
//!
//! [`image`] builds the bootable image (a stock Debian kernel and an initramfs over the host's own userspace),
//! [`vm`] runs VMs from a topology, [`guest`] is what runs inside them, [`scenario`] holds the scenarios
//! (`kernel-smoke`, `kernel-flap`), each writing a JSON result and a one-screen summary.
#![forbid(unsafe_code)]

pub mod bench;
pub mod cpio;
pub mod guest;
pub mod image;
pub mod scenario;
pub mod topology;
pub mod vm;

/// A number unique within this process (for names of runs and sockets).
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
