//! The RDMA programming surface the target and the initiator are written against, with verbs semantics:
//! protection domains, memory regions (lkey/rkey, access flags), completion queues, RC queue pairs with the
//! RESET/INIT/RTR/RTS/ERR state machine, shared receive queues, SEND / SEND_WITH_INV / RDMA WRITE / RDMA READ /
//! RECV work requests, async events and a connection manager that carries private data.
//!
//! Two providers will live here: `soft`, a userspace RoCEv2 (RC over UDP 4791, IB CM on QP1) that is
//! wire-compatible with Linux rxe and needs no hardware, root or kernel module; and `verbs`, libibverbs and
//! librdmacm through `sideway`, for real RNICs and kernel rxe.
//!
//! Built so far: the `soft` provider's wire formats ([`soft::wire`]) — RoCEv2 packets with the ICRC exactly as
//! rxe computes it, and the IB CM MADs with rdma_cm's header — checked against kernel captures. The verbs surface,
//! the RC engine, the CM state machine and the socket driver are still to come.
#![forbid(unsafe_code)]

pub mod soft;
