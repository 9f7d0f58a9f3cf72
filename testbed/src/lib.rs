//! The testbed (binary `testbed`, to come): builds topologies (network namespaces with veth; QEMU microVMs with
//! a stock Debian kernel for real rxe, bonding, nvme-rdma and nvmet-rdma), breaks them the way the seed
//! incident did (link flaps on a bond under load), and reports what survived.
//!
//! Nothing is implemented yet: this crate is a placeholder in the workspace until the testbed issue lands.
#![forbid(unsafe_code)]
