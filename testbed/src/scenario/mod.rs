//! Scenarios: each builds a topology and per-VM scripts, runs them, watches the shared directory, and returns
//! a result that serialises to JSON and prints as a one-screen summary.

pub mod capture;
pub mod device_removal;
pub mod flap;
pub mod kernel_host;
pub mod kernel_target;
pub mod ours;
pub mod smoke;
pub mod soft_flap;
pub mod soft_initiator;
pub mod soft_target;
pub mod tap_side;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::image::Image;
use crate::vm::{Accel, VmError, VmSpec};

/// Addresses of the two hosts (198.18.0.0/15, the benchmarking range).
pub const TARGET_ADDR: &str = "198.18.0.1";
pub const HOST_ADDR: &str = "198.18.0.2";
pub const NQN: &str = "nqn.2026-11.dev.nvmf-rs:testbed";
/// nvme-cli needs a host NQN; VMs have no /etc/nvme of their own.
pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:7e57bed0-0000-4000-8000-000000000002";

/// Where a scenario runs and what it runs on.
#[derive(Debug, Clone)]
pub struct Setup {
    pub image: Image,
    pub accel: Accel,
    /// The run's shared directory (scripts, logs, results).
    pub dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{0}")]
    Vm(#[from] VmError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("missing {0}")]
    Missing(String),
}

/// The kernel NVMe-oF target on a RAM file: nvmet configured through configfs, listening on rdma.
pub fn nvmet_target_setup(addr: &str) -> String {
    format!(
        r#"truncate -s 256M /tmp/ns1.img
cd /sys/kernel/config/nvmet
mkdir subsystems/{NQN}
echo 1 > subsystems/{NQN}/attr_allow_any_host
mkdir subsystems/{NQN}/namespaces/1
echo /tmp/ns1.img > subsystems/{NQN}/namespaces/1/device_path
# tmpfs has no O_DIRECT: nvmet must use the page cache for this file.
echo 1 > subsystems/{NQN}/namespaces/1/buffered_io
echo 1 > subsystems/{NQN}/namespaces/1/enable || {{ log "namespace enable failed"; exit 4; }}
mkdir ports/1
echo rdma > ports/1/addr_trtype
echo ipv4 > ports/1/addr_adrfam
echo {addr} > ports/1/addr_traddr
echo 4420 > ports/1/addr_trsvcid
ln -s /sys/kernel/config/nvmet/subsystems/{NQN} ports/1/subsystems/{NQN}
cd /
log "nvmet listening on {addr}:4420"
"#
    )
}

/// Undoes [`nvmet_target_setup`]: the port (its listener goes with it), the namespace, the subsystem, the file.
pub fn nvmet_target_teardown() -> String {
    format!(
        r#"cd /sys/kernel/config/nvmet
rm ports/1/subsystems/{NQN}
rmdir ports/1
echo 0 > subsystems/{NQN}/namespaces/1/enable
rmdir subsystems/{NQN}/namespaces/1
rmdir subsystems/{NQN}
cd /
rm -f /tmp/ns1.img
log "nvmet removed"
"#
    )
}

/// Two VMs, each with two NICs wired pairwise, bond0 + rxe0 on both.
pub fn two_bonded_hosts(target_script: String, host_script: String) -> (Vec<VmSpec>, Vec<crate::vm::Cable>) {
    let net = |addr| crate::guest::network(2, true, addr, true);
    let vms = vec![
        VmSpec {
            name: "target".into(),
            nics: 2,
            memory_mib: 1024,
            script: format!("{}{}", net(TARGET_ADDR), target_script),
        },
        VmSpec { name: "host".into(), nics: 2, memory_mib: 1024, script: format!("{}{}", net(HOST_ADDR), host_script) },
    ];
    (vms, vec![((0, 0), (1, 0)), ((0, 1), (1, 1))])
}

/// The subsystem NQNs of a discovery log page in nvme-cli's (or our `nvmf`'s) JSON, `{"records": [...]}`.
pub fn discovered_nqns(json: Option<String>) -> Vec<String> {
    let log: Option<serde_json::Value> = json.and_then(|t| serde_json::from_str(&t).ok());
    log.as_ref()
        .and_then(|d| d["records"].as_array())
        .map(|r| r.iter().filter_map(|e| e["subnqn"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// A problem for each VM whose script timed out or did not exit 0.
pub fn vm_problems(outcomes: &[crate::vm::VmOutcome], timeout: std::time::Duration) -> Vec<String> {
    outcomes
        .iter()
        .filter_map(|o| {
            if o.timed_out {
                Some(format!("{} did not finish within {timeout:?}", o.name))
            } else if o.exit != Some(0) {
                Some(format!("{} script exited {:?} (see {})", o.name, o.exit, o.log.display()))
            } else {
                None
            }
        })
        .collect()
}

/// A kernel host's fio write + crc32c verify, as `fio.exit` and `fio.json` in the run directory report it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FioVerify {
    pub exit: Option<i32>,
    pub write_iops: f64,
    pub verified_bytes: u64,
    /// Exit 0, no job error, and at least `min_bytes` read back and checked.
    pub passed: bool,
}

impl FioVerify {
    pub fn read(run: &crate::vm::Run, min_bytes: u64) -> FioVerify {
        FioVerify::read_named(run, "fio", min_bytes)
    }

    /// From `NAME.exit` and `NAME.json` in the run directory.
    pub fn read_named(run: &crate::vm::Run, name: &str, min_bytes: u64) -> FioVerify {
        let exit = run.read(&format!("{name}.exit")).and_then(|t| t.trim().parse().ok());
        let fio: Option<serde_json::Value> =
            run.read(&format!("{name}.json")).and_then(|t| serde_json::from_str(&t).ok());
        let job = fio.as_ref().map(|f| &f["jobs"][0]);
        let write_iops = job.and_then(|j| j["write"]["iops"].as_f64()).unwrap_or(0.0);
        let verified_bytes = job.and_then(|j| j["read"]["io_bytes"].as_u64()).unwrap_or(0);
        let passed = exit == Some(0) && job.is_some_and(|j| j["error"] == 0) && verified_bytes >= min_bytes;
        FioVerify { exit, write_iops, verified_bytes, passed }
    }
}

pub fn write_json(dir: &Path, name: &str, value: &impl serde::Serialize) -> Result<PathBuf, ScenarioError> {
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(value).expect("serialisable");
    std::fs::write(&path, text).map_err(|source| ScenarioError::Io { path: path.clone(), source })?;
    Ok(path)
}
