//! The NVMe-oF host library and its CLI (binary `nvmf`, to come).
//!
//! It will own: controller bring-up in the Linux host's order, I/O queues, discovery, keyed-SGL and in-capsule
//! data transfers, keep-alive, reconnect (ctrl-loss-tmo, reconnect-delay, fast-io-fail-tmo) and multipath.
//!
//! Nothing is implemented yet: this crate is a placeholder in the workspace until the initiator issues land.
#![forbid(unsafe_code)]
