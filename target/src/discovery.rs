//! The discovery subsystem's log page (0x70): an entry per (subsystem the host may use) × listener, plus one
//! per listener for the discovery subsystem itself, under a generation counter that changes with them.

use nvme_proto::discovery::{DiscoveryLog, DiscoveryLogEntry, RdmaParams, adrfam, rdma, subtype, treq, trtype};
use nvme_proto::fabrics::CNTLID_DYNAMIC;
use nvme_proto::nqn;

use crate::core::{PortInfo, Target};

fn entry(port: &PortInfo, subnqn: &str, kind: u8, asqsz: u16) -> DiscoveryLogEntry {
    DiscoveryLogEntry {
        trtype: trtype::RDMA,
        adrfam: if port.addr.is_ipv4() { adrfam::IPV4 } else { adrfam::IPV6 },
        subtype: kind,
        treq: treq::NOT_SPECIFIED,
        portid: port.portid,
        cntlid: CNTLID_DYNAMIC,
        asqsz,
        eflags: 0,
        trsvcid: port.trsvcid.to_string(),
        subnqn: subnqn.to_string(),
        traddr: port.addr.to_string(),
        rdma: Some(RdmaParams {
            qptype: rdma::QPTYPE_CONNECTED,
            prtype: rdma::PRTYPE_NOT_SPECIFIED,
            cms: rdma::CMS_RDMA_CM,
            pkey: 0,
        }),
    }
}

impl Target {
    /// The discovery log as `hostnqn` sees it.
    pub fn discovery_log(&self, hostnqn: &str) -> DiscoveryLog {
        let ports = self.ports();
        let mut entries = Vec::new();
        for port in &ports {
            entries.push(entry(port, nqn::DISCOVERY_NQN, subtype::CURRENT_DISCOVERY, self.limits.max_admin_depth));
        }
        for s in self.subsystems().iter().filter(|s| s.allows(hostnqn)) {
            for port in &ports {
                entries.push(entry(port, &s.nqn, subtype::NVME, self.limits.max_admin_depth));
            }
        }
        DiscoveryLog { genctr: self.genctr(), numrec: entries.len() as u64, recfmt: 0, entries }
    }
}
