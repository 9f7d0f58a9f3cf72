//! rdma_cm's private data header (Linux `struct cma_hdr`, 36 bytes), which the active side puts before the
//! application's private data in a CM REQ: version, IP version, the active side's port, then source and
//! destination addresses (IPv4 in the last 4 bytes of each 16-byte slot).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{WireError, need};

pub const CMA_HEADER_LEN: usize = 36;
pub const CMA_VERSION: u8 = 0x00;
/// Service ID of rdma_cm's TCP port space: `RDMA_PS_TCP << 16 | port` with the IB "IP CM" prefix.
pub const SERVICE_ID_TCP_BASE: u64 = 0x0000_0000_0106_0000;

/// The service ID a CM REQ carries for an rdma_cm TCP-port-space listener on `port`.
pub const fn service_id(port: u16) -> u64 {
    SERVICE_ID_TCP_BASE | port as u64
}

/// The port of an rdma_cm TCP-port-space service ID, or `None` for another service.
pub const fn port_of(service_id: u64) -> Option<u16> {
    if service_id & !0xffff == SERVICE_ID_TCP_BASE { Some(service_id as u16) } else { None }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CmaHeader {
    pub version: u8,
    /// The active side's rdma_cm port (its "source port").
    pub src_port: u16,
    pub src: IpAddr,
    pub dst: IpAddr,
}

/// Why a REQ's rdma_cm header is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CmaError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("rdma_cm header version {0:#04x} (only 0 is defined)")]
    Version(u8),
    #[error("rdma_cm header IP version {0} (4 or 6)")]
    IpVersion(u8),
    #[error("rdma_cm header mixes IPv4 and IPv6 addresses")]
    MixedFamilies,
}

impl CmaHeader {
    /// Parses the header at the start of REQ private data; returns it and the application's private data.
    pub fn parse(b: &[u8]) -> Result<(CmaHeader, &[u8]), CmaError> {
        need("rdma_cm header", b, CMA_HEADER_LEN)?;
        if b[0] != CMA_VERSION {
            return Err(CmaError::Version(b[0]));
        }
        let slot = |at: usize| -> [u8; 16] { b[at..at + 16].try_into().expect("16 bytes") };
        let (src, dst) = match b[1] >> 4 {
            4 => {
                let v4 = |s: [u8; 16]| IpAddr::V4(Ipv4Addr::new(s[12], s[13], s[14], s[15]));
                (v4(slot(4)), v4(slot(20)))
            }
            6 => (IpAddr::V6(Ipv6Addr::from(slot(4))), IpAddr::V6(Ipv6Addr::from(slot(20)))),
            other => return Err(CmaError::IpVersion(other)),
        };
        Ok((CmaHeader { version: b[0], src_port: u16::from_be_bytes([b[2], b[3]]), src, dst }, &b[CMA_HEADER_LEN..]))
    }

    pub fn emit(&self) -> Result<[u8; CMA_HEADER_LEN], CmaError> {
        let mut b = [0u8; CMA_HEADER_LEN];
        b[0] = self.version;
        b[2..4].copy_from_slice(&self.src_port.to_be_bytes());
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                b[1] = 4 << 4;
                b[16..20].copy_from_slice(&s.octets());
                b[32..36].copy_from_slice(&d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                b[1] = 6 << 4;
                b[4..20].copy_from_slice(&s.octets());
                b[20..36].copy_from_slice(&d.octets());
            }
            _ => return Err(CmaError::MixedFamilies),
        }
        Ok(b)
    }
}
