//! A subsystem reached over one or more paths (nvme-cli's `-a` given once per listener): I/O goes round robin
//! over the live paths, fails over when one dies, waits while none is live — until a path comes back,
//! `fast_io_fail_tmo` passes, or every path has given up — and is sent again on the next live path. A write
//! is sent again with the same buffer, handed back by the failed attempt.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use nvme_proto::status::StatusCodeType;
use nvme_proto::{Cqe, IoCommand, Status};
use tokio::sync::watch;

use crate::controller::{ConnectOptions, Controller, DataDir, NamespaceInfo, TargetAddr};
use crate::error::HostError;
use crate::io_buffer::IoBuffer;
use crate::path::{Path, PathState};
use crate::reconnect::ReconnectPolicy;

pub struct Session {
    paths: Vec<Path>,
    changed: Arc<watch::Sender<u64>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("paths", &self.paths).finish()
    }
}

/// Errors after which the command may succeed on another association: the connection's, and — when the
/// target did not set Do Not Retry — a command aborted by its queue's deletion or a path-related status (as
/// Linux's multipath fails over on them).
fn retryable(e: &HostError) -> bool {
    match e {
        HostError::QueueLost(_) | HostError::Device(_) | HostError::Timeout(_) | HostError::Unreachable(_) => true,
        HostError::Nvme { status, .. } => {
            !status.dnr()
                && (status.code() == Status::SQ_DELETED
                    || status.code() == Status::ABORT_REQUESTED
                    || status.sct() == StatusCodeType::PathRelated)
        }
        _ => false,
    }
}

impl Session {
    /// Connects every path (at once), each with its own options (they differ in the local address). Fails —
    /// with the first path's error — only when none connects; the others keep trying in the background as the
    /// policy says.
    pub async fn connect(
        paths: Vec<(TargetAddr, ConnectOptions)>,
        policy: ReconnectPolicy,
    ) -> Result<Session, HostError> {
        if paths.is_empty() {
            return Err(HostError::Invalid("no target address".into()));
        }
        let changed = Arc::new(watch::channel(0u64).0);
        let opening: Vec<_> =
            paths.into_iter().map(|(a, o)| tokio::spawn(Path::open(a, o, policy, changed.clone()))).collect();
        let mut paths = Vec::new();
        let mut first_error = None;
        let mut failed = Vec::new();
        for opened in opening {
            let (path, error) = opened.await.map_err(|e| HostError::Invalid(format!("path task: {e}")))?;
            if let Some(e) = error {
                failed.push(format!("{}: {e}", path.addr().udp.ip()));
                first_error.get_or_insert(e);
            }
            paths.push(path);
        }
        let session = Session { paths, changed, next: AtomicUsize::new(0) };
        if session.paths.iter().all(|p| p.state() != PathState::Live) {
            let error = first_error.unwrap_or_else(|| HostError::Invalid("no path connected".into()));
            let _ = session.shutdown().await;
            return Err(error);
        }
        for f in failed {
            tracing::warn!("path not connected yet, retrying in the background: {f}");
        }
        Ok(session)
    }

    pub fn paths(&self) -> &[Path] {
        &self.paths
    }

    /// Successful reconnections over all paths.
    pub fn reconnects(&self) -> u64 {
        self.paths.iter().map(Path::reconnects).sum()
    }

    fn pick(&self) -> Option<(&Path, Arc<Controller>)> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..self.paths.len()).find_map(|i| {
            let p = &self.paths[(start + i) % self.paths.len()];
            p.live().map(|c| (p, c))
        })
    }

    /// Waits for a live path: fails when every path has given up, or — with `fast_io_fail_tmo` — when every
    /// path has been down that long.
    async fn wait_for_path(&self) -> Result<(), HostError> {
        loop {
            let mut rx = self.changed.subscribe();
            if self.pick().is_some() {
                return Ok(());
            }
            let mut fail_at: Option<Instant> = None;
            let mut waiting = false;
            let mut reasons = Vec::new();
            for p in &self.paths {
                match p.state() {
                    PathState::Live => waiting = true, // lost but not yet taken down
                    PathState::Reconnecting { lost_at, reason, .. } => {
                        waiting = true;
                        reasons.push(reason);
                        if let Some(d) = p.policy().io_fail_deadline(lost_at) {
                            fail_at = Some(fail_at.map_or(d, |f| f.max(d)));
                        } else {
                            // One path without fast_io_fail keeps I/O waiting.
                            self.wait_changed(&mut rx, None).await;
                            return Ok(());
                        }
                    }
                    PathState::Failed { reason } => reasons.push(reason),
                    PathState::Closed => reasons.push("closed".into()),
                }
            }
            if !waiting {
                return Err(HostError::PathsLost(format!("every path gave up ({})", reasons.join("; "))));
            }
            if let Some(at) = fail_at
                && Instant::now() >= at
            {
                return Err(HostError::PathsLost(format!("no path for fast-io-fail-tmo ({})", reasons.join("; "))));
            }
            self.wait_changed(&mut rx, fail_at).await;
        }
    }

    async fn wait_changed(&self, rx: &mut watch::Receiver<u64>, until: Option<Instant>) {
        // A lost controller stays in its slot until its supervisor takes it: poll lightly meanwhile.
        let tick = tokio::time::sleep(std::time::Duration::from_millis(50));
        let deadline = async {
            match until {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = rx.changed() => {}
            _ = tick => {}
            _ = deadline => {}
        }
    }

    /// A live controller (waiting for one as I/O does): for admin commands.
    pub async fn controller(&self) -> Result<Arc<Controller>, HostError> {
        loop {
            if let Some((_, c)) = self.pick() {
                return Ok(c);
            }
            self.wait_for_path().await?;
        }
    }

    pub async fn namespace(&self, nsid: u32) -> Result<NamespaceInfo, HostError> {
        loop {
            let c = self.controller().await?;
            match c.namespace(nsid).await {
                Err(e) if retryable(&e) => continue,
                r => return r,
            }
        }
    }

    /// `len` bytes for a command on queue `lane` ([`Controller::buffer`] of the next live path): [`Session::io`]
    /// sends a write of it on the path that lent it while that path is live (without a copy), elsewhere as
    /// any other buffer.
    pub async fn buffer(&self, lane: Option<usize>, len: usize) -> IoBuffer {
        match self.pick() {
            Some((_, ctrl)) => ctrl.buffer(lane, len).await,
            None => IoBuffer::zeroed(len),
        }
    }

    /// The live path for `data`: the one whose controller lent its buffer, or the next in turn.
    fn pick_for(&self, data: &DataDir) -> Option<(&Path, Arc<Controller>)> {
        if let DataDir::ToController(buf) = data
            && buf.is_lent()
            && let Some(found) = self.paths.iter().find_map(|p| p.live().filter(|c| c.lent(buf)).map(|c| (p, c)))
        {
            return Some(found);
        }
        self.pick()
    }

    /// One I/O command, on queue `lane` of whichever path is live, sent again after a lost association.
    /// Returns the completion, the path index it completed on, and the buffer (filled for reads).
    pub async fn io(
        &self,
        lane: Option<usize>,
        command: IoCommand,
        mut data: DataDir,
    ) -> Result<(Cqe, usize, IoBuffer), HostError> {
        loop {
            let Some((path, ctrl)) = self.pick_for(&data) else {
                self.wait_for_path().await?;
                continue;
            };
            let read_len = match &data {
                DataDir::ToHost(n) => Some(*n),
                _ => None,
            };
            let (result, buf) = ctrl.io_exchange(lane, command, data).await;
            match result {
                Ok(cqe) => {
                    path.count_completion();
                    let index = self.paths.iter().position(|p| std::ptr::eq(p, path)).unwrap_or(0);
                    return Ok((cqe, index, buf.unwrap_or_default()));
                }
                Err(e) if retryable(&e) => {
                    // Make sure the supervisor sees it (a device error raises nothing by itself).
                    ctrl.fail("I/O failed on this association");
                    drop(ctrl);
                    data = match (read_len, buf) {
                        (Some(n), _) => DataDir::ToHost(n),
                        (None, Some(b)) if b.is_empty() => DataDir::None,
                        (None, Some(b)) => DataDir::ToController(b),
                        (None, None) => return Err(e),
                    };
                    tracing::debug!("I/O retried after: {e}");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Shuts every path down (CC.SHN on the live ones); the first error is returned.
    pub async fn shutdown(self) -> Result<(), HostError> {
        let mut result = Ok(());
        for p in self.paths {
            if let Err(e) = p.shutdown().await
                && result.is_ok()
            {
                result = Err(e);
            }
        }
        result
    }
}
