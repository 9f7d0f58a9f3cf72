//! The RDMA programming surface the target and the initiator are written against, with verbs semantics:
//! protection domains, memory regions (lkey/rkey, access flags), completion queues, RC queue pairs with the
//! RESET/INIT/RTR/RTS/ERR state machine, shared receive queues, SEND / SEND_WITH_INV / RDMA WRITE / RDMA READ /
//! RECV work requests, async events and a connection manager that carries private data.
//!
//! Two providers will live here: `soft`, a userspace RoCEv2 (RC over UDP 4791, IB CM on QP1) that is
//! wire-compatible with Linux rxe and needs no hardware, root or kernel module; and `verbs`, libibverbs and
//! librdmacm through `sideway`, for real RNICs and kernel rxe.
//!
//! Nothing is implemented yet: this crate is a placeholder in the workspace until the transport issue lands.
#![forbid(unsafe_code)]
