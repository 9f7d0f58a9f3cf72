//! `capture`: tcpdump of UDP 4791 (RoCEv2) on both VMs' bonds while the kernel host discovers, connects, reads
//! Identify, writes and reads back known patterns (4 KiB of 0xA5 and 128 KiB of 0x5A, direct I/O) and
//! disconnects. The pcap files are test vectors for the wire codecs.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::{HOSTNQN, NQN, ScenarioError, Setup, TARGET_ADDR, nvmet_target_setup, two_bonded_hosts, write_json};
use crate::vm::{Accel, Run, VmOutcome};

#[derive(Debug, Clone, Serialize)]
pub struct CaptureResult {
    pub scenario: &'static str,
    pub kernel: String,
    pub accel: Accel,
    pub passed: bool,
    pub patterns_verified: bool,
    pub target_pcap: PathBuf,
    pub host_pcap: PathBuf,
    pub target_packets: usize,
    pub host_packets: usize,
    pub seconds: f64,
    pub vms: Vec<VmOutcome>,
}

const START_CAPTURE: &str =
    "tcpdump -i bond0 -s 0 -U -w $T/$NAME.pcap udp port 4791 2> $T/$NAME.tcpdump &\ndump=$!\nsleep 1\n";
const STOP_CAPTURE: &str = "sleep 1\nkill -INT $dump\nwait $dump\n";

impl CaptureResult {
    pub fn summary(&self) -> String {
        format!(
            "capture: {}\n  kernel {} under {:?}, {:.0} s\n  patterns written and read back: {}\n  {} ({} packets)\n  {} ({} packets)\n",
            if self.passed { "PASSED" } else { "FAILED" },
            self.kernel,
            self.accel,
            self.seconds,
            if self.patterns_verified { "identical" } else { "DIFFERENT" },
            self.target_pcap.display(),
            self.target_packets,
            self.host_pcap.display(),
            self.host_packets
        )
    }
}

pub fn run(setup: &Setup, timeout: Duration) -> Result<CaptureResult, ScenarioError> {
    let capture = |name: &str| START_CAPTURE.replace("$NAME", name);
    let target = format!(
        "{}{}touch $T/target-ready\nwait_file $T/host-done {}\n{STOP_CAPTURE}",
        nvmet_target_setup(TARGET_ADDR),
        capture("target"),
        timeout.as_secs()
    );
    let host = format!(
        r#"wait_file $T/target-ready {secs} || exit 3
{start}nvme discover -t rdma -a {TARGET_ADDR} -s 4420 --hostnqn {HOSTNQN}
nvme connect -t rdma -a {TARGET_ADDR} -s 4420 -n {NQN} --hostnqn {HOSTNQN}
n=0; until [ -b /dev/nvme0n1 ]; do sleep 0.2; n=$((n+1)); [ $n -gt 150 ] && break; done
nvme id-ctrl /dev/nvme0 > $T/id-ctrl.txt
head -c 4096 /dev/zero | tr '\0' '\245' > /tmp/p4k
head -c 131072 /dev/zero | tr '\0' '\132' > /tmp/p128k
dd if=/tmp/p4k of=/dev/nvme0n1 bs=4096 count=1 oflag=direct 2>/dev/null
dd if=/tmp/p128k of=/dev/nvme0n1 bs=131072 seek=1 count=1 oflag=direct 2>/dev/null
dd if=/dev/nvme0n1 of=/tmp/r4k bs=4096 count=1 iflag=direct 2>/dev/null
dd if=/dev/nvme0n1 of=/tmp/r128k bs=131072 skip=1 count=1 iflag=direct 2>/dev/null
cmp /tmp/p4k /tmp/r4k && cmp /tmp/p128k /tmp/r128k && touch $T/patterns-ok
nvme disconnect -n {NQN}
{STOP_CAPTURE}touch $T/host-done
"#,
        secs = timeout.as_secs(),
        start = capture("host"),
    );
    let (vms, cables) = two_bonded_hosts(target, host);
    let mut vm_run = Run::start(&setup.image, setup.accel, &vms, &cables, &[], &setup.dir)?;
    let vms = vm_run.wait(timeout);
    // RoCEv2 datagrams in each capture (0 when it is not a capture).
    let count = |name: &str| {
        let bytes = std::fs::read(setup.dir.join(name)).unwrap_or_default();
        transport::soft::pcap::read_rocev2(&bytes).map(|d| d.len()).unwrap_or(0)
    };
    let (target_packets, host_packets) = (count("target.pcap"), count("host.pcap"));
    let patterns_verified = vm_run.read("patterns-ok").is_some();
    let result = CaptureResult {
        scenario: "capture",
        kernel: setup.image.version.clone(),
        accel: setup.accel,
        passed: patterns_verified && target_packets > 0 && host_packets > 0 && vms.iter().all(|v| v.exit == Some(0)),
        patterns_verified,
        target_pcap: setup.dir.join("target.pcap"),
        host_pcap: setup.dir.join("host.pcap"),
        target_packets,
        host_packets,
        seconds: vm_run.elapsed().as_secs_f64(),
        vms,
    };
    write_json(&setup.dir, "result.json", &result)?;
    Ok(result)
}
