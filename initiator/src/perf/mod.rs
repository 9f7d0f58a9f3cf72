//! `nvmf perf`'s engine: a fio-like job over a [`crate::Session`], latency histograms, and the `--verify`
//! block pattern.

pub mod histogram;
pub mod pattern;
pub mod workload;

pub use histogram::Histogram;
pub use workload::{PathReport, PerfJob, PerfReport, RwMode, Tick, VerifyReport, run};
