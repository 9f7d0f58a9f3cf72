//! An I/O queue's own thread. The queue's queue pair lives on a lane of the device (soft provider: its RC engine
//! and its own socket, to which the kernel steers its datagrams; verbs provider: a device context of its own,
//! its CQ and completion channel); the lane, the queue's task and
//! every exchange of the queue (registering the command's buffer, sending the capsule, taking the completion,
//! giving the buffer back) run on this one thread, so an I/O crosses threads only on its way in from the
//! caller and on its way out — not between the caller, the queue's task and the device's worker several times.

use std::future::Future;
use std::sync::Mutex;

use transport::{Device, DeviceError};

use crate::error::HostError;

/// A lane of a device, run on a thread of its own with a single-threaded runtime.
pub(crate) struct LaneThread {
    /// The lane's number on its device (for `create_qp_on_lane`).
    pub id: usize,
    runtime: tokio::runtime::Handle,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for LaneThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaneThread").field("id", &self.id).finish_non_exhaustive()
    }
}

impl LaneThread {
    /// A lane of `device` running on a new thread named `name`; `None` where the device has no lanes (a
    /// kernel that took no steering program, a device with all its lanes taken) — its queue
    /// pairs then stay on the device's worker. The thread ends when the device closes.
    pub async fn start(device: &Device, name: String) -> Result<Option<LaneThread>, HostError> {
        let lane = match device.open_lane().await {
            Ok(lane) => lane,
            Err(DeviceError::Unsupported(why)) => {
                tracing::debug!("queue stays on the device's worker: {why}");
                return Ok(None);
            }
            Err(DeviceError::Closed) => return Err(DeviceError::Closed.into()),
            Err(e) => {
                tracing::warn!("queue stays on the device's worker: no lane ({e})");
                return Ok(None);
            }
        };
        let id = lane.id();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| HostError::Invalid(format!("lane runtime: {e}")))?;
        let handle = runtime.handle().clone();
        // When the lane ends (the device closed), the runtime goes with it: the queue's task and any exchange
        // still waiting end, and their callers hear that the queue was lost.
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || runtime.block_on(lane.run()))
            .map_err(|e| HostError::Invalid(format!("lane thread: {e}")))?;
        Ok(Some(LaneThread { id, runtime: handle, thread: Mutex::new(Some(thread)) }))
    }

    /// Runs `work` on the lane's thread.
    pub fn spawn<F>(&self, work: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.spawn(work)
    }

    /// Waits for the thread to end (blocking: call it off the runtime, after the device is closed).
    pub fn join(&self) {
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread
            && t.join().is_err()
        {
            tracing::error!(lane = self.id, "lane thread panicked");
        }
    }
}
