//! Poll groups: N threads, each alone owning its queues (and their completion queues and buffer pool). Other
//! threads reach a queue only by a message to its group naming it by key; keys are never reused, so a message
//! for a queue that is gone finds nothing and does nothing (the SPDK crash this design rules out was a poller
//! freed on one thread while another still held its pointer).

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::pool::BufferPool;
use super::queue::{Queue, QueueMsg, QueueSetup};
use crate::controller::QueueRef;
use crate::core::{QueueControl, Target};

pub(crate) enum GroupMsg {
    /// A connected queue pair for this group to serve.
    Adopt(Box<QueueSetup>),
    /// A lane of a device for this group's thread to run: the queue pairs the listener creates on it are
    /// driven here, beside the queues that use them.
    RunLane {
        lane: Box<transport::Lane>,
        /// The lane as the group's buffer pool registers its memory with it.
        pin: transport::PoolLane,
    },
    Close {
        key: u64,
        reason: &'static str,
    },
    Poke {
        key: u64,
    },
    /// Close every queue of this device (link or address lost, device removed).
    CloseDevice {
        device: u64,
        reason: &'static str,
    },
    /// A queue's task ended.
    Finished {
        key: u64,
    },
    Stats(oneshot::Sender<GroupStats>),
    /// Close everything, then reply.
    Shutdown(oneshot::Sender<()>),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GroupStats {
    pub queues: usize,
    /// Commands answered (a response sent or attempted) since the group started.
    pub commands_completed: u64,
    pub pool_buffers_in_use: usize,
    pub pool_buffers: usize,
}

struct Entry {
    control: mpsc::UnboundedSender<QueueMsg>,
    /// The device generation the queue runs on (see [`QueueSetup::device_id`]).
    device: u64,
}

/// Senders to every group: the core's [`QueueControl`].
#[derive(Clone)]
pub(crate) struct Groups {
    pub senders: Vec<mpsc::UnboundedSender<GroupMsg>>,
}

impl Groups {
    /// Sends to a group; a group that is gone hands the message back.
    pub fn send(&self, group: usize, msg: GroupMsg) -> Result<(), GroupMsg> {
        match self.senders.get(group) {
            Some(s) => s.send(msg).map_err(|e| e.0),
            None => Err(msg),
        }
    }
}

impl QueueControl for Groups {
    fn close(&self, queue: QueueRef, reason: &'static str) {
        let _ = self.send(queue.group, GroupMsg::Close { key: queue.key, reason });
    }
    fn poke(&self, queue: QueueRef) {
        let _ = self.send(queue.group, GroupMsg::Poke { key: queue.key });
    }
}

/// Starts group `index`'s thread.
pub(crate) fn spawn(
    index: usize,
    target: Arc<Target>,
    own: mpsc::UnboundedSender<GroupMsg>,
    messages: mpsc::UnboundedReceiver<GroupMsg>,
    pool_buffers: usize,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(format!("nvmf-pg{index}")).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(group = index, "poll group runtime: {e}");
                return;
            }
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, run(index, target, own, messages, pool_buffers));
    })
}

async fn run(
    index: usize,
    target: Arc<Target>,
    own: mpsc::UnboundedSender<GroupMsg>,
    mut messages: mpsc::UnboundedReceiver<GroupMsg>,
    pool_buffers: usize,
) {
    let pool = Rc::new(BufferPool::new(pool_buffers, target.limits.max_io_size as usize));
    let commands_completed = Rc::new(std::cell::Cell::new(0u64));
    let mut queues: HashMap<u64, Entry> = HashMap::new();
    let mut shutdown: Option<oneshot::Sender<()>> = None;
    while let Some(msg) = messages.recv().await {
        match msg {
            GroupMsg::Adopt(setup) => {
                if shutdown.is_some() {
                    setup.release(true).await;
                    continue;
                }
                let key = setup.key;
                let device = setup.device_id;
                let (control, control_rx) = mpsc::unbounded_channel();
                let queue = Queue::new(*setup, index, target.clone(), pool.clone(), commands_completed.clone());
                tracing::debug!(group = index, key, conn = queue.conn(), "queue adopted");
                queues.insert(key, Entry { control, device });
                let own = own.clone();
                tokio::task::spawn_local(async move {
                    queue.run(control_rx).await;
                    let _ = own.send(GroupMsg::Finished { key });
                });
            }
            GroupMsg::RunLane { lane, pin } => {
                tracing::debug!(group = index, lane = lane.id(), "running a lane");
                tokio::task::spawn_local(lane.run());
                let pool = pool.clone();
                tokio::task::spawn_local(async move { pool.add_lane(pin).await });
            }
            GroupMsg::Close { key, reason } => {
                if let Some(e) = queues.get(&key) {
                    let _ = e.control.send(QueueMsg::Close(reason));
                }
            }
            GroupMsg::Poke { key } => {
                if let Some(e) = queues.get(&key) {
                    let _ = e.control.send(QueueMsg::Poke);
                }
            }
            GroupMsg::CloseDevice { device, reason } => {
                for e in queues.values().filter(|e| e.device == device) {
                    let _ = e.control.send(QueueMsg::Close(reason));
                }
            }
            GroupMsg::Finished { key } => {
                queues.remove(&key);
            }
            GroupMsg::Stats(reply) => {
                let _ = reply.send(GroupStats {
                    queues: queues.len(),
                    commands_completed: commands_completed.get(),
                    pool_buffers_in_use: pool.in_use(),
                    pool_buffers: pool.capacity(),
                });
            }
            GroupMsg::Shutdown(reply) => {
                for e in queues.values() {
                    let _ = e.control.send(QueueMsg::Close("target shutting down"));
                }
                shutdown = Some(reply);
            }
        }
        if queues.is_empty()
            && let Some(reply) = shutdown.take()
        {
            let _ = reply.send(());
            return;
        }
    }
}
