//! What identifies a connection and what the connection manager learned of its peer, the same for every
//! provider.

use std::net::IpAddr;

/// Identifies a connection: our local communication id.
pub type ConnId = u32;

/// The peer's side of a connection, as the CM learned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerParams {
    pub addr: IpAddr,
    pub port: u16,
    pub qpn: u32,
    /// The starting PSN of the peer's REQ or REP: the PSN the peer expects to receive first, which is where our
    /// sends start ([`crate::soft::cm::StartPsns`]).
    pub start_psn: u32,
    pub path_mtu: u8,
    pub responder_resources: u8,
    pub initiator_depth: u8,
    pub retry_count: u8,
    pub rnr_retry_count: u8,
    /// Decides the connection's UDP source port ([`crate::soft::wire::udp_port::from_flow_label`]); the verbs
    /// provider leaves it 0.
    pub flow_label: u32,
    pub private_data: Vec<u8>,
}
