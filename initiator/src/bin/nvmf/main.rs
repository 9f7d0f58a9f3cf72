//! `nvmf`: the NVMe-oF RDMA host from userspace — discover, identify, list, read, write, flush and perf
//! against any NVMe-oF RDMA target, with nvme-cli's connection options (reconnect, multipath) and fio's perf
//! flags. Exit status: 0 success, 1 failure (target unreachable, command failed, verify errors), 2 bad
//! arguments.

mod args;
mod commands;
mod output;

use std::process::ExitCode;

use clap::Parser;

use args::Cli;

/// A failure and the exit status it gives.
pub enum Failure {
    /// The arguments cannot work (exit 2, like clap's own usage errors).
    Usage(String),
    /// Something failed at run time (exit 1).
    Run(String),
}

impl From<initiator::HostError> for Failure {
    fn from(e: initiator::HostError) -> Failure {
        Failure::Run(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(Failure::Usage(m)) => {
            eprintln!("error: {m}\n\nFor more information, try '--help'.");
            ExitCode::from(2)
        }
        Err(Failure::Run(m)) => {
            eprintln!("error: {m}");
            ExitCode::FAILURE
        }
    }
}
