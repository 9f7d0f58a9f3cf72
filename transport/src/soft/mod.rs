//! `soft`: a userspace RoCEv2 provider, wire-compatible with Linux rxe.
//!
//! Protocol logic is sans-IO: [`wire`] holds the packet formats (bytes in, typed values out and back); the RC
//! engine ([`rc`]) and the connection manager ([`cm`]) are state machines fed packets and time. Sockets,
//! threads and clocks live in the driver: [`device`] (the handles an application holds) and its worker thread;
//! [`netdev`] watches the network device over rtnetlink.

pub mod cm;
mod data_path;
pub mod device;
pub mod lane;
pub mod memory_table;
pub mod netdev;
pub mod pcap;
pub mod rc;
mod steering;
mod udp;
pub mod wire;
mod worker;
