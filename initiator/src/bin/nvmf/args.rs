//! The command line: nvme-cli's verbs and connection flags, fio's perf flags.

use std::net::IpAddr;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "nvmf",
    version,
    about = "NVMe over Fabrics (RDMA) host: discover, identify, I/O and perf from userspace"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Verb,
}

#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Read a discovery controller's log (nvme discover).
    Discover(#[command(flatten)] Connection),
    /// Identify Controller (nvme id-ctrl).
    IdCtrl(#[command(flatten)] Connection),
    /// Identify Namespace (nvme id-ns).
    IdNs {
        #[command(flatten)]
        conn: Connection,
        #[arg(long = "namespace-id", visible_alias = "nsid", default_value_t = 1)]
        namespace_id: u32,
    },
    /// A target's subsystems (from its discovery log) and their namespaces.
    List(#[command(flatten)] Connection),
    /// Read blocks to --data FILE or stdout (nvme read).
    Read(#[command(flatten)] Transfer),
    /// Write blocks from --data FILE or stdin (nvme write).
    Write(#[command(flatten)] Transfer),
    /// Flush a namespace (nvme flush).
    Flush {
        #[command(flatten)]
        conn: Connection,
        #[arg(long = "namespace-id", visible_alias = "nsid", default_value_t = 1)]
        namespace_id: u32,
    },
    /// Load a namespace and report IOPS, bandwidth and latency percentiles (fio's flags; spdk_nvme_perf's spirit).
    Perf(#[command(flatten)] Perf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Rdma,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Provider {
    /// Userspace RoCEv2 over UDP (no RDMA hardware or kernel module needed).
    Soft,
    /// libibverbs and the kernel's rdma_cm (RNICs, kernel rxe).
    Verbs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Normal,
    Json,
}

/// How to reach the target (nvme-cli's connect options).
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// Transport type.
    #[arg(short = 't', long, value_enum, default_value = "rdma")]
    pub transport: Transport,
    /// Target address; give it once per path (multipath).
    #[arg(short = 'a', long, required = true, action = clap::ArgAction::Append)]
    pub traddr: Vec<IpAddr>,
    /// NVMe/RDMA service id (the rdma_cm port).
    #[arg(short = 's', long, default_value_t = 4420)]
    pub trsvcid: u16,
    /// Our address, once per --traddr in the same order (default: what the routing table picks). Long form
    /// only: perf's -w is fio's --rw.
    #[arg(long, action = clap::ArgAction::Append)]
    pub host_traddr: Vec<IpAddr>,
    /// Subsystem NQN (discover: the discovery subsystem's).
    #[arg(short = 'n', long)]
    pub nqn: Option<String>,
    /// Host NQN (default: /etc/nvme/hostnqn, else derived from the host id).
    #[arg(long)]
    pub hostnqn: Option<String>,
    /// Host identifier, a UUID (default: /etc/nvme/hostid, else derived from /etc/machine-id).
    #[arg(long)]
    pub hostid: Option<String>,
    /// I/O queues to ask for.
    #[arg(short = 'i', long)]
    pub nr_io_queues: Option<u16>,
    /// Entries per I/O queue.
    #[arg(short = 'Q', long, default_value_t = 128, value_parser = clap::value_parser!(u16).range(2..))]
    pub queue_size: u16,
    /// Keep-alive timeout in seconds (0: none).
    #[arg(short = 'k', long, default_value_t = 5)]
    pub keep_alive_tmo: u32,
    /// Give up reconnecting after this many seconds; -1: never.
    #[arg(short = 'l', long, default_value_t = 600, allow_negative_numbers = true)]
    pub ctrl_loss_tmo: i64,
    /// Seconds between reconnection attempts.
    #[arg(long, default_value_t = 10)]
    pub reconnect_delay: u32,
    /// Fail I/O waiting for a lost connection after this many seconds (default: wait for ctrl-loss-tmo).
    #[arg(short = 'f', long)]
    pub fast_io_fail_tmo: Option<u32>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "normal")]
    pub output_format: OutputFormat,
    /// RDMA provider.
    #[arg(long, value_enum, default_value = "soft")]
    pub provider: Provider,
    /// The target's RoCEv2 UDP port (soft provider; 4791 for any RoCEv2 device).
    #[arg(long, default_value_t = 4791)]
    pub udp_port: u16,
}

/// nvme read / write.
#[derive(Debug, Clone, Args)]
pub struct Transfer {
    #[command(flatten)]
    pub conn: Connection,
    #[arg(long = "namespace-id", visible_alias = "nsid", default_value_t = 1)]
    pub namespace_id: u32,
    /// First logical block.
    #[arg(long, default_value_t = 0)]
    pub start_block: u64,
    /// Number of blocks minus one, as nvme-cli counts (write: default from the data's length).
    #[arg(short = 'c', long)]
    pub block_count: Option<u32>,
    /// Bytes to move; must equal (block-count + 1) × block size when both are given.
    #[arg(short = 'z', long)]
    pub data_size: Option<u64>,
    /// File to write from or read into (default: stdin / stdout).
    #[arg(short = 'd', long)]
    pub data: Option<std::path::PathBuf>,
}

/// nvmf perf.
#[derive(Debug, Clone, Args)]
pub struct Perf {
    #[command(flatten)]
    pub conn: Connection,
    /// Commands in flight.
    #[arg(short = 'q', long, default_value_t = 1)]
    pub iodepth: usize,
    /// Bytes per I/O (k, m suffixes).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    pub bs: u64,
    /// read, write, randread, randwrite, rw, randrw.
    #[arg(short = 'w', long = "rw", default_value = "randread", value_parser = parse_rw)]
    pub rw: initiator::perf::RwMode,
    /// Percentage of reads in rw / randrw.
    #[arg(short = 'M', long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmixread: u8,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    pub runtime: u64,
    /// I/O queues to spread the load over.
    #[arg(long, default_value_t = 1)]
    pub io_queues: u16,
    /// Namespace.
    #[arg(long, default_value_t = 1)]
    pub nsid: u32,
    /// Bytes of the namespace to use from LBA 0 (k, m, g suffixes; default: all).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Write a pattern holding each block's LBA and a generation number, check every read, and read everything
    /// written back at the end.
    #[arg(long)]
    pub verify: bool,
    /// Seed for offsets and the run id (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print a progress line (elapsed, I/Os so far, IOPS, errors, reconnects) to stderr every N seconds, as
    /// fio's --status-interval does; without it the line is drawn in place, on a terminal only.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub status_interval: Option<u64>,
}

fn parse_rw(s: &str) -> Result<initiator::perf::RwMode, String> {
    s.parse()
}

/// "4096", "4k", "128K", "1m", "2g" (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                _ => return Err(format!("{s:?}: unknown suffix {c:?} (k, m, g, t)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("128K"), Ok(131072));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("4x").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("99999999999t").is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
