//! The control socket: a Unix stream socket taking one command per line and answering one JSON line.
//!
//! - `stats` — the [`crate::rdma::Stats`] snapshot (controllers, queue pairs, pollers, MRs, pool buffers in
//!   use, threads, fds, listeners, per-controller I/O and errors).
//! - `add-namespace SUBNQN NSID ram SIZE` / `add-namespace SUBNQN NSID file PATH [SIZE]` /
//!   `add-namespace SUBNQN NSID block PATH` — connected hosts get a namespace-changed event.
//! - `remove-namespace SUBNQN NSID`.
//!
//! Try it with `socat - UNIX-CONNECT:/run/nvmf-target.sock` or `nc -U`. SIGUSR1 writes the same stats to the log.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use crate::backend::BackendSpec;
use crate::config::parse_size;
use crate::core::Target;
use crate::rdma::Stats;

/// Where stats come from (the running binding).
pub trait StatsSource: Send + Sync + 'static {
    fn snapshot(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Stats> + Send + '_>>;
}

fn error(message: impl std::fmt::Display) -> String {
    serde_json::json!({ "error": message.to_string() }).to_string()
}

/// Executes one command line.
pub async fn execute(line: &str, target: &Target, stats: &dyn StatsSource) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["stats"] => serde_json::to_string(&stats.snapshot().await).unwrap_or_else(error),
        ["add-namespace", subnqn, nsid, kind, rest @ ..] => {
            let Ok(nsid) = nsid.parse::<u32>() else { return error(format!("bad NSID {nsid:?}")) };
            let spec = match (*kind, rest) {
                ("ram", [size]) => match parse_size(size) {
                    Ok(size) => BackendSpec::Ram { size, block_size: 512 },
                    Err(e) => return error(e),
                },
                ("file", [path]) => BackendSpec::File { path: path.into(), size: None, block_size: 512 },
                ("file", [path, size]) => match parse_size(size) {
                    Ok(size) => BackendSpec::File { path: path.into(), size: Some(size), block_size: 512 },
                    Err(e) => return error(e),
                },
                ("block", [path]) => BackendSpec::Block { path: path.into() },
                _ => return error("usage: add-namespace SUBNQN NSID ram SIZE | file PATH [SIZE] | block PATH"),
            };
            match target.add_namespace(subnqn, nsid, &spec) {
                Ok(()) => serde_json::json!({ "ok": true }).to_string(),
                Err(e) => error(e),
            }
        }
        ["remove-namespace", subnqn, nsid] => match nsid.parse::<u32>() {
            Ok(nsid) => match target.remove_namespace(subnqn, nsid) {
                Ok(()) => serde_json::json!({ "ok": true }).to_string(),
                Err(e) => error(e),
            },
            Err(_) => error(format!("bad NSID {nsid:?}")),
        },
        _ => error(format!("unknown command {line:?}: stats | add-namespace | remove-namespace")),
    }
}

/// Serves the socket at `path` until the task is dropped; removes a stale socket file first.
pub async fn serve(path: PathBuf, target: Arc<Target>, stats: Arc<dyn StatsSource>) -> std::io::Result<()> {
    if Path::new(&path).exists() {
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let (target, stats) = (target.clone(), stats.clone());
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut answer = execute(&line, &target, &*stats).await;
                answer.push('\n');
                if write.write_all(answer.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}
