//! `soft`: a userspace RoCEv2 provider, wire-compatible with Linux rxe.
//!
//! Protocol logic is sans-IO: [`wire`] holds the packet formats (bytes in, typed values out and back); the RC
//! engine and the CM will be state machines fed packets and time; sockets and threads live in a thin driver.

pub mod cm;
pub mod device;
pub mod memory_table;
pub mod netdev;
pub mod pcap;
pub mod rc;
pub mod wire;
mod worker;
