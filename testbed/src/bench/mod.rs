//! Benchmarks: what the stack achieves as a ratio of a baseline measured in the same run, never a timed
//! assertion. [`loopback`]: our target and host on the soft provider beside plain UDP ([`ceiling`]); [`scale`]:
//! one target under many hosts' verified I/O, its memory per queue pair; [`vm`]: in the VMs, the kernel host's
//! fio against nvmet-rdma and our target on both providers.

pub mod ceiling;
pub mod loopback;
pub mod scale;
mod target;
pub mod vm;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Ceiling(#[from] ceiling::CeilingError),
    #[error(transparent)]
    Scenario(crate::scenario::ScenarioError),
    #[error("{0}")]
    Failed(String),
}

/// The median of `v` (the upper one of an even count); 0 for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
