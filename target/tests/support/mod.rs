//! Shared by the end-to-end tests: an in-process target on loopback (its own UDP port, so tests run in
//! parallel), data patterns that name their block and generation, and a seeded generator.
#![allow(dead_code)]

pub mod netns;
pub mod process;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use initiator::TargetAddr;
use target::backend::BackendSpec;
use target::rdma::{ListenSpec, RdmaOptions};
use target::subsystem::Subsystem;
use target::{RdmaTarget, Target, TargetLimits};

pub const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

pub struct SubsystemSpec {
    pub nqn: &'static str,
    /// `None`: any host.
    pub hosts: Option<Vec<String>>,
    pub namespaces: Vec<(u32, BackendSpec)>,
}

impl SubsystemSpec {
    pub fn ram(nqn: &'static str, size: u64) -> SubsystemSpec {
        SubsystemSpec { nqn, hosts: None, namespaces: vec![(1, BackendSpec::Ram { size, block_size: 512 })] }
    }
}

pub struct TestTarget {
    pub rdma: RdmaTarget,
    pub addr: TargetAddr,
    /// Receives per shared receive queue (the limits it started with).
    pub srq_depth: u32,
}

impl TestTarget {
    pub async fn start(subsystems: Vec<SubsystemSpec>, trsvcids: &[u16]) -> TestTarget {
        TestTarget::start_with(subsystems, trsvcids, TargetLimits::default(), Duration::from_secs(1)).await
    }

    pub async fn start_with(
        subsystems: Vec<SubsystemSpec>,
        trsvcids: &[u16],
        limits: TargetLimits,
        repair_interval: Duration,
    ) -> TestTarget {
        TestTarget::start_on(subsystems, trsvcids, limits, repair_interval, 0).await
    }

    /// On UDP port `udp_port` (0: any free one) — to come back where a stopped target was.
    pub async fn start_on(
        subsystems: Vec<SubsystemSpec>,
        trsvcids: &[u16],
        limits: TargetLimits,
        repair_interval: Duration,
        udp_port: u16,
    ) -> TestTarget {
        let options = RdmaOptions { poll_groups: 2, pool_buffers: 64, repair_interval };
        let mut rdma = RdmaTarget::start(limits, options).await.expect("start target");
        for s in subsystems {
            let serial = Target::default_serial(s.nqn);
            let (any, hosts) = match s.hosts {
                None => (true, Vec::new()),
                Some(h) => (false, h),
            };
            rdma.target()
                .add_subsystem(Subsystem::new(s.nqn.into(), serial, "nvmf-target".into(), any, hosts))
                .expect("add subsystem");
            for (nsid, spec) in s.namespaces {
                rdma.target().add_namespace(s.nqn, nsid, &spec).expect("add namespace");
            }
        }
        let spec =
            ListenSpec { addr: LOOPBACK, trsvcids: trsvcids.to_vec(), udp_port, provider: transport::Provider::Soft };
        let udp = rdma.listen(spec).await.expect("listen");
        let addr = TargetAddr { udp: SocketAddr::new(LOOPBACK, udp), trsvcid: trsvcids[0] };
        TestTarget { rdma, addr, srq_depth: limits.srq_depth }
    }

    /// Waits until the target holds no controllers, queues or queue pairs, and no pool buffers.
    /// Waits until no controller, queue pair, poller or pool buffer is left and every shared receive queue
    /// holds all its buffers again.
    pub async fn wait_idle(&self, within: Duration) -> target::Stats {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let s = self.rdma.stats().await;
            let srqs: usize = s.listeners.iter().filter_map(|l| l.shared_receive_queues).sum();
            let receives_home = s.srq_receives == (srqs as u64) * u64::from(self.srq_depth);
            if s.controllers == 0 && s.qpairs == 0 && s.pollers == 0 && s.pool_buffers_in_use == 0 && receives_home {
                return s;
            }
            assert!(tokio::time::Instant::now() < deadline, "target did not return to idle: {s:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// splitmix64.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A block's content for write generation `generation` (0: never written, reads as zeroes): it names its
/// LBA and generation, so a stale or misplaced block is caught.
pub fn block(lba: u64, generation: u32, block_size: usize) -> Vec<u8> {
    if generation == 0 {
        return vec![0; block_size];
    }
    let mut b: Vec<u8> =
        (0..block_size).map(|i| (lba.wrapping_mul(131) as usize + generation as usize * 7 + i) as u8).collect();
    b[..8].copy_from_slice(&lba.to_le_bytes());
    b[8..12].copy_from_slice(&generation.to_le_bytes());
    b
}

pub fn blocks(lba: u64, generations: &[u32], block_size: usize) -> Vec<u8> {
    generations.iter().enumerate().flat_map(|(i, &g)| block(lba + i as u64, g, block_size)).collect()
}
