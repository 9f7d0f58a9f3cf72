//! One host queue over one RC queue pair: connects with the NVMe/RDMA CM private data, sends command capsules,
//! matches completions to commands by command id, and fails every outstanding command when the connection is
//! lost (completion error, flush, disconnect, device event). The queue pair and its completion queue belong to
//! the queue's task alone; callers talk to it by messages. An I/O queue on the soft provider lives on a lane
//! ([`crate::lane`]): its queue pair, its task and its exchanges share the lane's thread.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nvme_proto::rdma_cm::{CmReject, CmRequest, RECORD_FORMAT_1_0};
use nvme_proto::{Cqe, Sqe};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use transport::{
    Access, Buffer, CompletionQueue, ConnId, ConnectionOptions, Device, DeviceEvent, MemoryRegion, PinnedPool,
    PoolLane, ProtectionDomain, QueuePair, RecvWr, RegionKeys, SendOp, SendWr, WcStatus,
};

use crate::controller::TargetAddr;
use crate::error::HostError;
use crate::events::EventRouter;
use crate::lane::LaneThread;
use crate::loss::LossSignal;

const RECV_TAG: u64 = 1 << 63;
/// How long the CM exchange may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

struct Submission {
    /// The SQE and its in-capsule data; the command id (bytes 2..4) is set by the queue task.
    capsule: Vec<u8>,
    reply: oneshot::Sender<Result<Cqe, HostError>>,
}

/// A connected queue.
#[derive(Debug)]
pub struct HostQueue {
    pub qid: u16,
    /// Entries (sqsize + 1).
    pub depth: u16,
    pub conn: ConnId,
    io: QueueIo,
    /// Tells the queue's task to stop (a destroyed queue pair need not complete what it held).
    closing: Arc<Notify>,
    device: Arc<Device>,
    /// The lane the queue pair lives on, whose thread runs the queue's task (none: the device's worker).
    lane: Option<Arc<LaneThread>>,
}

/// What a command's exchange needs of its queue: submitting, and registering its data where the queue pair's
/// peer reaches it. It holds no device, so work left on a lane's thread cannot keep the device open.
#[derive(Debug, Clone)]
pub(crate) struct QueueIo {
    submissions: mpsc::UnboundedSender<Submission>,
    /// One permit per command the queue may hold (depth - 1).
    slots: Arc<Semaphore>,
    qp: QueuePair,
    /// Keyed data may ask for remote invalidation (the target's SEND_WITH_INV).
    pub remote_invalidate: bool,
    /// Data buffers lent to its commands (registered once with the queue's lane on the verbs provider).
    pool: Option<Arc<QueuePool>>,
    /// How its commands' keyed data reached the target.
    pub moves: Arc<DataMoves>,
}

/// How a queue's keyed data reached the target, by command: where it was (a buffer the queue's pool lent), by a
/// copy through one of the pool's buffers, or through a region registered for the command.
#[derive(Debug, Default)]
pub struct DataMoves {
    pub in_place: AtomicU64,
    pub copied: AtomicU64,
    pub registered: AtomicU64,
}

/// A snapshot of [`DataMoves`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DataMoveCounts {
    pub in_place: u64,
    pub copied: u64,
    pub registered: u64,
    /// Buffers the queues' pools carved: what they hold (each of the largest transfer), which stays bounded by
    /// the commands in flight however many ran.
    pub pool_buffers: u64,
}

impl DataMoves {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> DataMoveCounts {
        DataMoveCounts {
            in_place: self.in_place.load(Ordering::Relaxed),
            copied: self.copied.load(Ordering::Relaxed),
            registered: self.registered.load(Ordering::Relaxed),
            pool_buffers: 0,
        }
    }
}

impl std::ops::Add for DataMoveCounts {
    type Output = DataMoveCounts;
    fn add(self, o: DataMoveCounts) -> DataMoveCounts {
        DataMoveCounts {
            in_place: self.in_place + o.in_place,
            copied: self.copied + o.copied,
            registered: self.registered + o.registered,
            pool_buffers: self.pool_buffers + o.pool_buffers,
        }
    }
}

/// A queue's data buffers and the lane they are registered with, if they are (verbs provider).
#[derive(Debug)]
pub(crate) struct QueuePool {
    pub buffers: PinnedPool,
    /// Its arenas are registered with the queue's lane: the target reaches its buffers in place, with the
    /// arena's key. Otherwise (soft provider) a buffer is handed to the lane as a region for its command.
    pub in_place: bool,
    device: std::sync::Weak<Device>,
    lane: usize,
}

impl QueuePool {
    /// A pool registered with no lane (its buffers have no keys): for tests of lending.
    #[cfg(test)]
    pub fn unregistered(buffer_size: usize) -> QueuePool {
        QueuePool { buffers: PinnedPool::new(buffer_size), in_place: false, device: std::sync::Weak::new(), lane: 0 }
    }

    /// The keys through which the target reaches `buf`, if its arena is registered with the queue's lane.
    pub fn keys(&self, buf: &Buffer) -> Option<RegionKeys> {
        self.buffers.keys(buf, &self.device, self.lane)
    }
}

impl QueueIo {
    /// Sends a command (its command id is assigned by the queue's task) with optional in-capsule data and
    /// waits for its completion.
    pub async fn submit(&self, sqe: Sqe, inline: &[u8]) -> Result<Cqe, HostError> {
        let permit = self.slots.acquire().await.map_err(|_| HostError::QueueLost("queue closed"))?;
        permit.forget(); // the queue task gives the slot back when the completion arrives
        let (reply, rx) = oneshot::channel();
        let mut capsule = Vec::with_capacity(nvme_proto::sqe::SQE_LEN + inline.len());
        capsule.extend_from_slice(&sqe.to_array());
        capsule.extend_from_slice(inline);
        if self.submissions.send(Submission { capsule, reply }).is_err() {
            return Err(HostError::QueueLost("queue closed"));
        }
        rx.await.map_err(|_| HostError::QueueLost("queue closed"))?
    }

    /// Registers a command's buffer with the queue pair's owner (on a lane: a call on the lane's thread).
    pub async fn register(
        &self,
        pd: &ProtectionDomain,
        buf: Buffer,
        access: Access,
    ) -> Result<MemoryRegion, HostError> {
        Ok(self.qp.register(pd, buf, access).await?)
    }

    pub async fn deregister(&self, mr: MemoryRegion) -> Result<Buffer, HostError> {
        Ok(self.qp.deregister(mr).await?)
    }

    /// The queue's registered data buffers, if it has them.
    pub fn pool(&self) -> Option<&Arc<QueuePool>> {
        self.pool.as_ref()
    }
}

impl HostQueue {
    /// Creates the queue pair (on `lane` when given), posts the receives, connects (CM REQ with our private
    /// data), and starts the queue's task (on the lane's thread when given).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn connect(
        device: Arc<Device>,
        pd: &ProtectionDomain,
        router: &EventRouter,
        target: TargetAddr,
        qid: u16,
        depth: u16,
        loss: Arc<LossSignal>,
        lane: Option<Arc<LaneThread>>,
    ) -> Result<HostQueue, HostError> {
        let cq = CompletionQueue::new();
        let qp = match &lane {
            Some(l) => device.create_qp_on_lane(l.id, pd, &cq, &cq).await?,
            None => device.create_qp(pd, &cq, &cq).await?,
        };
        for slot in 0..depth as u64 {
            qp.post_recv(RecvWr::new(RECV_TAG | slot, vec![0; nvme_proto::cqe::CQE_LEN]))?;
        }
        let request = CmRequest { recfmt: RECORD_FORMAT_1_0, qid, hrqsize: depth, hsqsize: depth - 1, cntlid: 0 };
        let conn = match device
            .connect(&qp, target.udp, target.trsvcid, ConnectionOptions::default(), &request.to_bytes())
            .await
        {
            Ok(c) => c,
            Err(e) => {
                let _ = device.destroy_qp(&qp).await;
                return Err(e.into());
            }
        };
        let mut events = router.subscribe(conn, qp.qpn);
        let established = tokio::time::timeout(CONNECT_TIMEOUT, async {
            loop {
                match events.recv().await {
                    Some(DeviceEvent::Established { .. }) => return Ok(()),
                    Some(DeviceEvent::Rejected { private_data, reason, .. }) => {
                        return Err(match CmReject::parse(&private_data) {
                            Ok(r) => HostError::Rejected { status: r.status },
                            Err(_) => HostError::RejectedRaw { reason },
                        });
                    }
                    Some(DeviceEvent::Unreachable { .. }) => return Err(HostError::Unreachable(target.udp)),
                    Some(DeviceEvent::PortError | DeviceEvent::DeviceRemoval | DeviceEvent::DeviceFatal { .. }) => {
                        return Err(HostError::QueueLost("device event during connect"));
                    }
                    Some(_) => {}
                    None => return Err(HostError::QueueLost("device closed")),
                }
            }
        })
        .await;
        let result = match established {
            Ok(r) => r,
            Err(_) => Err(HostError::Timeout("connection")),
        };
        if let Err(e) = result {
            let _ = device.disconnect(conn).await;
            let _ = device.destroy_qp(&qp).await;
            router.unsubscribe(conn, qp.qpn);
            return Err(e);
        }
        let (submissions, rx) = mpsc::unbounded_channel();
        let closing = Arc::new(Notify::new());
        let slots = Arc::new(Semaphore::new(depth as usize - 1));
        let task = QueueTask {
            qid,
            depth,
            qp: qp.clone(),
            cq,
            pending: HashMap::new(),
            free_cids: (0..depth).rev().collect(),
            closing: closing.clone(),
            slots: slots.clone(),
            loss,
        };
        match &lane {
            Some(l) => drop(l.spawn(task.run(rx, events))),
            None => drop(tokio::spawn(task.run(rx, events))),
        }
        let io = QueueIo {
            submissions,
            slots,
            qp,
            remote_invalidate: device.regions_remotely_invalidable(),
            pool: None,
            moves: Arc::default(),
        };
        Ok(HostQueue { qid, depth, conn, io, closing, device, lane })
    }

    /// Sends a command (its command id is assigned by the queue) with optional in-capsule data and waits for
    /// its completion. The caller keeps its data, so that it can send it again elsewhere.
    pub async fn submit(&self, sqe: Sqe, inline: &[u8]) -> Result<Cqe, HostError> {
        self.io.submit(sqe, inline).await
    }

    pub(crate) fn io(&self) -> &QueueIo {
        &self.io
    }

    /// Gives the queue a pool of data buffers of `buffer_size` bytes, lent to its commands and back. On the
    /// verbs provider, whose registration per command is a system call and pinned pages each way, the pool's
    /// arenas are registered once with the queue's lane (remote read and write: the target reaches them with
    /// the arena's key). A peer with the key reaches every buffer of the queue's arenas (as SPDK's host exposes
    /// its registered memory map), from any queue pair of the domain, while the queue's lane lives (the lane's
    /// end deregisters them). The soft provider registers no arenas (its lane's memory is its own): a lent
    /// buffer is moved to the lane as its command's region — a table entry — and back, so the pool saves the
    /// allocation per command, not the registration.
    pub(crate) async fn use_buffer_pool(&mut self, pd: &ProtectionDomain, buffer_size: usize) {
        let Some(lane) = &self.lane else { return };
        let in_place = self.device.provider() == transport::Provider::Verbs;
        let device = Arc::downgrade(&self.device);
        let pool = QueuePool { buffers: PinnedPool::new(buffer_size), in_place, device: device.clone(), lane: lane.id };
        if in_place {
            pool.buffers.add_lane(PoolLane { device, pd: pd.id, lane: lane.id, access: Access::REMOTE_ALL }).await;
        }
        self.io.pool = Some(Arc::new(pool));
    }

    pub(crate) fn lane(&self) -> Option<&Arc<LaneThread>> {
        self.lane.as_ref()
    }

    /// Disconnects and destroys the queue pair; outstanding commands fail (idempotent).
    pub async fn close(&self) {
        self.closing.notify_one();
        let _ = self.device.disconnect(self.conn).await;
        let _ = self.device.destroy_qp(&self.io.qp).await;
    }
}

struct QueueTask {
    qid: u16,
    depth: u16,
    qp: QueuePair,
    cq: CompletionQueue,
    pending: HashMap<u16, oneshot::Sender<Result<Cqe, HostError>>>,
    free_cids: Vec<u16>,
    closing: Arc<Notify>,
    slots: Arc<Semaphore>,
    loss: Arc<LossSignal>,
}

impl QueueTask {
    async fn run(
        mut self,
        mut submissions: mpsc::UnboundedReceiver<Submission>,
        mut events: mpsc::UnboundedReceiver<DeviceEvent>,
    ) {
        let mut next_wr = 1u64;
        let reason = loop {
            tokio::select! {
                sub = submissions.recv() => {
                    let Some(mut sub) = sub else { break "queue dropped" };
                    let Some(cid) = self.free_cids.pop() else {
                        let _ = sub.reply.send(Err(HostError::QueueLost("no free command id")));
                        continue;
                    };
                    sub.capsule[2..4].copy_from_slice(&cid.to_le_bytes());
                    self.pending.insert(cid, sub.reply);
                    next_wr += 1;
                    if self.qp.post_send(SendWr::new(next_wr, SendOp::Send, sub.capsule)).is_err() {
                        break "device closed";
                    }
                }
                c = self.cq.next() => {
                    let wc = c.wc;
                    if wc.status != WcStatus::Success {
                        if wc.status != WcStatus::WrFlush {
                            tracing::warn!(qid = self.qid, status = ?wc.status, opcode = ?wc.opcode, "transport error");
                        }
                        break if wc.status == WcStatus::WrFlush { "queue flushed" } else { "transport error" };
                    }
                    if wc.wr_id & RECV_TAG == 0 {
                        continue; // a capsule went out
                    }
                    match Cqe::parse(&wc.buf[..(wc.byte_len as usize).min(wc.buf.len())]) {
                        Ok(cqe) => {
                            let cid = cqe.command_id();
                            if let Some(reply) = self.pending.remove(&cid) {
                                let _ = reply.send(Ok(*cqe));
                                self.free_cids.push(cid);
                                self.slots.add_permits(1);
                            } else {
                                tracing::warn!(qid = self.qid, cid, "completion for no command");
                            }
                        }
                        Err(e) => tracing::warn!(qid = self.qid, "malformed completion: {e}"),
                    }
                    let mut buf = wc.buf;
                    buf.resize(nvme_proto::cqe::CQE_LEN, 0);
                    if self.qp.post_recv(RecvWr::new(wc.wr_id, buf)).is_err() {
                        break "device closed";
                    }
                }
                _ = self.closing.notified() => break "closed by the host",
                ev = events.recv() => match ev {
                    Some(DeviceEvent::Disconnected { .. }) => break "target disconnected",
                    Some(DeviceEvent::QpFatal { .. }) => break "queue pair fatal",
                    Some(DeviceEvent::PortError) => break "link down",
                    Some(DeviceEvent::AddrChange { present: false }) => break "address removed",
                    Some(DeviceEvent::DeviceRemoval | DeviceEvent::DeviceFatal { .. }) => break "device lost",
                    Some(_) => {}
                    None => break "device closed",
                },
            }
        };
        tracing::debug!(qid = self.qid, depth = self.depth, "queue lost: {reason}");
        self.loss.raise(reason);
        // Fail what is outstanding and what still arrives; closing the semaphore wakes waiting submitters.
        self.slots.close();
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(HostError::QueueLost(reason)));
        }
        submissions.close();
        while let Some(sub) = submissions.recv().await {
            let _ = sub.reply.send(Err(HostError::QueueLost(reason)));
        }
    }
}
