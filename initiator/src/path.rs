//! One path to a subsystem: a controller association to one target address, kept up by a supervisor task.
//! The supervisor alone owns the association's teardown — it waits for the association's loss signal, takes
//! the controller out of the path's slot (so no new I/O reaches it), aborts its queues (outstanding commands
//! fail and hand their buffers back while the device is still open), waits for the last in-flight user to let
//! go, closes it, then reconnects as [`ReconnectPolicy`] says. Users only clone the live controller's `Arc`
//! for one command and raise the loss signal; nothing else ever closes it, so teardown runs exactly once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::controller::{ConnectOptions, Controller, TargetAddr};
use crate::error::HostError;
use crate::reconnect::{NextStep, ReconnectPolicy};

/// Where a path stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathState {
    Live,
    /// Lost at `lost_at`; `attempts` connection attempts failed since.
    Reconnecting {
        lost_at: Instant,
        attempts: u32,
        reason: String,
    },
    /// `ctrl_loss_tmo` passed without a connection.
    Failed {
        reason: String,
    },
    Closed,
}

struct Slot {
    ctrl: Option<Arc<Controller>>,
    state: PathState,
}

struct PathShared {
    addr: TargetAddr,
    options: ConnectOptions,
    policy: ReconnectPolicy,
    slot: Mutex<Slot>,
    /// Bumped on every state change of any path of the session.
    changed: Arc<watch::Sender<u64>>,
    closing: AtomicBool,
    close: Notify,
    reconnects: AtomicU64,
    completions: AtomicU64,
}

impl PathShared {
    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, ctrl: Option<Arc<Controller>>, state: PathState) {
        {
            let mut s = self.slot();
            s.ctrl = ctrl;
            s.state = state;
        }
        self.changed.send_modify(|n| *n += 1);
    }
}

/// A supervised path.
pub struct Path {
    shared: Arc<PathShared>,
    supervisor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Path").field("addr", &self.shared.addr).field("state", &self.state()).finish()
    }
}

/// How long teardown waits for in-flight users of a lost controller (they fail at once after the abort).
const RELEASE_WAIT: Duration = Duration::from_secs(10);

impl Path {
    /// Connects once; on failure the path starts out reconnecting (the error is returned beside it).
    pub async fn open(
        addr: TargetAddr,
        options: ConnectOptions,
        policy: ReconnectPolicy,
        changed: Arc<watch::Sender<u64>>,
    ) -> (Path, Option<HostError>) {
        let first = Controller::connect(addr, options.clone()).await;
        let (ctrl, state, error) = match first {
            Ok(c) => (Some(Arc::new(c)), PathState::Live, None),
            Err(e) => {
                let state = PathState::Reconnecting { lost_at: Instant::now(), attempts: 1, reason: e.to_string() };
                (None, state, Some(e))
            }
        };
        let shared = Arc::new(PathShared {
            addr,
            options,
            policy,
            slot: Mutex::new(Slot { ctrl, state }),
            changed,
            closing: AtomicBool::new(false),
            close: Notify::new(),
            reconnects: AtomicU64::new(0),
            completions: AtomicU64::new(0),
        });
        let supervisor = tokio::spawn(supervise(shared.clone()));
        (Path { shared, supervisor: Some(supervisor) }, error)
    }

    pub fn addr(&self) -> TargetAddr {
        self.shared.addr
    }

    pub fn state(&self) -> PathState {
        self.shared.slot().state.clone()
    }

    /// The live controller, unless it is lost (even before the supervisor noticed).
    pub fn live(&self) -> Option<Arc<Controller>> {
        self.shared.slot().ctrl.clone().filter(|c| c.loss_reason().is_none())
    }

    /// Successful reconnections so far.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// I/O commands completed on this path (counted by the session).
    pub fn completions(&self) -> u64 {
        self.shared.completions.load(Ordering::Relaxed)
    }

    pub(crate) fn count_completion(&self) {
        self.shared.completions.fetch_add(1, Ordering::Relaxed);
    }

    pub fn policy(&self) -> ReconnectPolicy {
        self.shared.policy
    }

    /// Stops the supervisor, then shuts the live controller down (CC.SHN) or closes it.
    pub async fn shutdown(mut self) -> Result<(), HostError> {
        self.shared.closing.store(true, Ordering::Relaxed);
        self.shared.close.notify_one();
        if let Some(s) = self.supervisor.take() {
            let _ = s.await;
        }
        let ctrl = {
            let mut s = self.shared.slot();
            s.state = PathState::Closed;
            s.ctrl.take()
        };
        self.shared.changed.send_modify(|n| *n += 1);
        match ctrl {
            Some(c) if c.loss_reason().is_none() => match released(c).await {
                Some(c) => c.shutdown().await,
                None => Ok(()),
            },
            Some(c) => {
                close_released(c).await;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl Drop for Path {
    fn drop(&mut self) {
        // Dropped without shutdown: stop the supervisor; the controller closes with the last Arc.
        if let Some(s) = self.supervisor.take() {
            s.abort();
        }
    }
}

/// Waits (bounded) until `ctrl` has no other user.
async fn released(mut ctrl: Arc<Controller>) -> Option<Controller> {
    let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
    loop {
        match Arc::try_unwrap(ctrl) {
            Ok(c) => return Some(c),
            Err(c) if tokio::time::Instant::now() < deadline => {
                ctrl = c;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(_) => {
                tracing::warn!("a lost controller was still in use after {RELEASE_WAIT:?}; its last user closes it");
                return None;
            }
        }
    }
}

async fn close_released(ctrl: Arc<Controller>) {
    if let Some(c) = released(ctrl).await {
        c.close().await;
    }
}

async fn supervise(shared: Arc<PathShared>) {
    let closing = || shared.closing.load(Ordering::Relaxed);
    loop {
        let live = shared.slot().ctrl.clone();
        if let Some(ctrl) = live {
            let reason = tokio::select! {
                r = ctrl.lost() => r,
                _ = shared.close.notified() => return,
            };
            if closing() {
                return;
            }
            tracing::warn!(target = %shared.addr.udp.ip(), trsvcid = shared.addr.trsvcid, "path lost ({reason}); reconnecting");
            shared.set(None, PathState::Reconnecting { lost_at: Instant::now(), attempts: 0, reason: reason.into() });
            ctrl.abort(reason).await;
            close_released(ctrl).await;
        }
        // Reconnecting until connected, given up, or closed.
        loop {
            let (lost_at, attempts, reason) = match shared.slot().state.clone() {
                PathState::Reconnecting { lost_at, attempts, reason } => (lost_at, attempts, reason),
                _ => return,
            };
            let at = match shared.policy.next(lost_at, attempts, Instant::now()) {
                NextStep::RetryAt(at) => at,
                NextStep::GiveUp => {
                    tracing::warn!(target = %shared.addr.udp.ip(), "path failed: no connection within ctrl-loss-tmo ({reason})");
                    shared.set(None, PathState::Failed { reason });
                    return;
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => {}
                _ = shared.close.notified() => return,
            }
            let attempt = tokio::select! {
                r = Controller::connect(shared.addr, shared.options.clone()) => r,
                _ = shared.close.notified() => return,
            };
            match attempt {
                Ok(c) => {
                    shared.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(target = %shared.addr.udp.ip(), attempts = attempts + 1, "path reconnected");
                    shared.set(Some(Arc::new(c)), PathState::Live);
                    break;
                }
                Err(e) => {
                    tracing::debug!(target = %shared.addr.udp.ip(), "reconnect attempt {}: {e}", attempts + 1);
                    let state = PathState::Reconnecting { lost_at, attempts: attempts + 1, reason: e.to_string() };
                    shared.set(None, state);
                }
            }
        }
    }
}
