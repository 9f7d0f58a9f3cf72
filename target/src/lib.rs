//! The NVMe-oF target (binary `nvmf-target`, to come).
//!
//! It will own: subsystems, controllers (CC/CSTS, keep-alive), admin, fabrics and I/O command handling, the
//! discovery subsystem, async events, the namespace backends (RAM, file, block device), and, apart from those,
//! the RDMA binding (capsule receive, SGL to RDMA READ/WRITE, response SEND, qpairs owned by poll groups).
//! The layout follows Linux `drivers/nvme/target/`: one file per concern.
//!
//! Nothing is implemented yet: this crate is a placeholder in the workspace until the target issue lands.
#![forbid(unsafe_code)]
