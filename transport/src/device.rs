//! A device, whatever its provider: one worker thread alone owns every queue pair, registered region and
//! connection of the device (the soft provider's RC engines and socket, or the verbs provider's libibverbs
//! objects and connection-manager ids). Nothing else touches them: the application talks to the worker by
//! messages (posting moves a work request and its buffer in), completions come back through completion queues,
//! and connection events through the device's event stream. Teardown is a message too, so a queue pair can never be freed by one
//! thread while another still holds it — the failure that crashed SPDK's target.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};

use crate::buffer::Buffer;
use crate::connection::{ConnId, PeerParams};
use crate::region::RegionKeys;
use crate::region::{Access, RegionMemory};
use crate::work_request::{RecvWr, SendWr, WcStatus, WorkCompletion};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot bind UDP {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start the device worker: {0}")]
    Worker(std::io::Error),
    #[error("the device is closed")]
    Closed,
    #[error("{0}")]
    Cm(#[from] crate::soft::cm::CmError),
    #[error("no queue pair {0:#x}")]
    UnknownQp(u32),
    #[error("memory region of {0} bytes exceeds 4 GiB")]
    RegionTooLarge(usize),
    #[error("no memory region with key {0:#x}")]
    UnknownRegion(u32),
    #[error("{0}")]
    Netdev(#[from] crate::soft::netdev::NetdevError),
    #[error("queue pair {qpn:#x} is {from:?}: {to} is not a valid transition")]
    BadTransition { qpn: u32, from: QpState, to: &'static str },
    #[error("queue pair parameters: {0}")]
    QpConfig(#[from] crate::soft::rc::ConfigError),
    #[error("no shared receive queue {0} in this protection domain")]
    UnknownSrq(u32),
    #[error("shared receive queue {0} still serves queue pairs")]
    SrqBusy(u32),
    #[error("no protection domain {0}")]
    UnknownPd(u32),
    #[error("protection domain {0} still has memory regions or queue pairs")]
    PdBusy(u32),
    /// The verbs provider cannot run here: no libibverbs or no kernel connection manager, or no RDMA device for
    /// the address.
    #[error("RDMA unavailable ({0})")]
    Unavailable(String),
    #[error("{call}: {source}")]
    Verbs { call: &'static str, source: std::io::Error },
    #[error("not supported: {0}")]
    Unsupported(&'static str),
}

/// A work completion and the queue pair it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub qpn: u32,
    pub wc: WorkCompletion,
}

#[derive(Debug, Default)]
struct CqShared {
    queue: Mutex<VecDeque<Completion>>,
    notify: Notify,
}

/// A completion queue. Clones share it.
#[derive(Debug, Clone, Default)]
pub struct CompletionQueue {
    shared: Arc<CqShared>,
}

impl CompletionQueue {
    pub fn new() -> CompletionQueue {
        CompletionQueue::default()
    }

    /// Up to `max` completions, oldest first, without waiting.
    pub fn poll(&self, max: usize) -> Vec<Completion> {
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        let n = max.min(q.len());
        q.drain(..n).collect()
    }

    /// The next completion, waiting for one.
    pub async fn next(&self) -> Completion {
        loop {
            let notified = self.shared.notify.notified();
            if let Some(c) = self.poll(1).pop() {
                return c;
            }
            notified.await;
        }
    }

    pub(crate) fn push(&self, c: Completion) {
        self.shared.queue.lock().unwrap_or_else(|p| p.into_inner()).push_back(c);
        self.shared.notify.notify_waiters();
    }
}

/// Connection and device events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEvent {
    ConnectRequest {
        conn: ConnId,
        local_port: u16,
        peer: PeerParams,
    },
    Established {
        conn: ConnId,
        qpn: u32,
        peer: PeerParams,
    },
    Rejected {
        conn: ConnId,
        reason: u16,
        private_data: Vec<u8>,
    },
    Unreachable {
        conn: ConnId,
    },
    Disconnected {
        conn: ConnId,
    },
    TimewaitExit {
        conn: ConnId,
    },
    /// The queue pair entered the error state on its own (retries exhausted, a fatal NAK).
    QpFatal {
        qpn: u32,
        cause: WcStatus,
    },
    /// The netdev's link came up.
    PortActive,
    /// The netdev's link went down.
    PortError,
    /// The device's address went away (`present: false`) or came back.
    AddrChange {
        present: bool,
    },
    /// The netdev was deleted: every queue pair is in the error state and the device serves nothing more.
    DeviceRemoval,
    /// The device's socket failed beyond recovery: every queue pair is in the error state.
    DeviceFatal {
        reason: String,
    },
}

/// Queue pair states (verbs' RESET / INIT / RTR / RTS / ERR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QpState {
    Reset,
    Init,
    Rtr,
    Rts,
    Error,
}

/// A transition requested by [`Device::modify_qp`], for queue pairs connected without the CM (as
/// `ibv_rc_pingpong` does, exchanging numbers out of band). The CM makes these transitions itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpTransition {
    /// RESET → INIT: receives may be posted.
    Init,
    /// INIT → RTR: the peer's address, queue pair number and first PSN; the responder starts.
    Rtr { peer: SocketAddr, dest_qpn: u32, rq_psn: u32, path_mtu: usize, min_rnr_timer: u8, max_dest_rd_atomic: u8 },
    /// RTR → RTS: the send side's parameters; the requester starts.
    Rts { sq_psn: u32, ack_timeout: Duration, retry_cnt: u8, rnr_retry: u8, max_rd_atomic: u8 },
    /// Any → ERR: outstanding work completes with a flush error.
    Error,
    /// Any → RESET: the queue pair forgets its connection; outstanding work is flushed first.
    Reset,
}

/// A protection domain: memory regions are reachable only by queue pairs of the same domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProtectionDomain {
    pub id: u32,
}

/// A registered memory region. Its memory belongs to the device until [`Device::deregister`] returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemoryRegion {
    pub keys: RegionKeys,
}

/// Sends a command that carries its reply to the owner behind `commands` and waits for the answer.
async fn call_on<T>(
    commands: &mpsc::UnboundedSender<Command>,
    make: impl FnOnce(Reply<T>) -> Command,
) -> Result<T, DeviceError> {
    let (tx, rx) = oneshot::channel();
    commands.send(make(tx)).map_err(|_| DeviceError::Closed)?;
    rx.await.map_err(|_| DeviceError::Closed)?
}

/// A device worker's `RegisterOnLane`: handed to the lane's channel (`lane`, if the device has that lane) as the
/// lane's own `Register`, once the domain is known to be the device's. A lane that no longer runs drops the reply:
/// the caller sees `Closed`.
pub(crate) fn register_on_lane(
    lane: Option<&mpsc::UnboundedSender<Command>>,
    pd_known: bool,
    pd: u32,
    buf: RegionMemory,
    access: Access,
    reply: Reply<MemoryRegion>,
) {
    match lane {
        _ if !pd_known => {
            let _ = reply.send(Err(DeviceError::UnknownPd(pd)));
        }
        Some(l) => {
            let _ = l.send(Command::Register(pd, buf, access, reply));
        }
        None => {
            let _ = reply.send(Err(DeviceError::Unsupported("no such lane on this device")));
        }
    }
}

/// A device worker's `DeregisterOnLane`: handed to the lane's channel as the lane's own `Deregister`.
pub(crate) fn deregister_on_lane(lane: Option<&mpsc::UnboundedSender<Command>>, key: u32, reply: Reply<Buffer>) {
    match lane {
        Some(l) => {
            let _ = l.send(Command::Deregister(key, reply));
        }
        None => {
            let _ = reply.send(Err(DeviceError::UnknownRegion(key)));
        }
    }
}

/// A handle to an RC queue pair of a device.
#[derive(Debug, Clone)]
pub struct QueuePair {
    pub qpn: u32,
    commands: mpsc::UnboundedSender<Command>,
}

impl QueuePair {
    /// Posts a send-queue request; its buffer comes back in the completion (an error completion if the queue
    /// pair cannot take it).
    pub fn post_send(&self, wr: SendWr) -> Result<(), DeviceError> {
        self.commands.send(Command::PostSend(self.qpn, wr)).map_err(|_| DeviceError::Closed)
    }

    pub fn post_recv(&self, wr: RecvWr) -> Result<(), DeviceError> {
        self.commands.send(Command::PostRecv(self.qpn, wr)).map_err(|_| DeviceError::Closed)
    }

    /// Hands `buf` for remote access by this queue pair's peer to whoever owns the queue pair — its lane, for
    /// a queue pair made by [`Device::create_qp_on_lane`], else the device — by a message on the channel posts
    /// use: from the lane's own thread it is a call on that thread, not a round trip to the device's worker.
    /// [`QueuePair::deregister`] gives it back. (A lane does not check the domain; the device does. The
    /// responder reaches a region only from a queue pair of the same domain either way.)
    pub async fn register(
        &self,
        pd: &ProtectionDomain,
        buf: impl Into<Buffer>,
        access: Access,
    ) -> Result<MemoryRegion, DeviceError> {
        let pd = pd.id;
        let buf = RegionMemory::Owned(buf.into());
        call_on(&self.commands, |reply| Command::Register(pd, buf, access, reply)).await
    }

    /// Takes back a region [`QueuePair::register`] handed out.
    pub async fn deregister(&self, mr: MemoryRegion) -> Result<Buffer, DeviceError> {
        call_on(&self.commands, |reply| Command::Deregister(mr.keys.lkey, reply)).await
    }
}

/// A shared receive queue: queue pairs attached to it take their receives from it.
#[derive(Debug, Clone)]
pub struct SharedReceiveQueue {
    pub id: u32,
    commands: mpsc::UnboundedSender<Command>,
}

impl SharedReceiveQueue {
    pub fn post_recv(&self, wr: RecvWr) -> Result<(), DeviceError> {
        self.commands.send(Command::PostSrqRecv(self.id, wr)).map_err(|_| DeviceError::Closed)
    }
}

/// Parameters of one end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionOptions {
    pub responder_resources: u8,
    pub initiator_depth: u8,
    pub retry_count: u8,
    pub rnr_retry_count: u8,
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        ConnectionOptions { responder_resources: 16, initiator_depth: 16, retry_count: 7, rnr_retry_count: 7 }
    }
}

/// Counts of what a device holds, for leak checks and stats, and what it says of itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceStats {
    pub protection_domains: usize,
    pub shared_receive_queues: usize,
    pub queue_pairs: usize,
    pub regions: usize,
    pub region_bytes: usize,
    /// Buffer arenas registered once for in-place posting (`Device::pin_on_lane`): a pool's, which grows to
    /// its high-water mark and stays; not counted in `regions`, which are per-request registrations.
    pub arenas: usize,
    pub arena_bytes: usize,
    pub connections: usize,
    /// Connection attempts given up on but still remembered, so that the peer's retransmissions are recognised
    /// (soft provider; each goes away on its own).
    pub stale_connection_attempts: usize,
    pub packets_sent: u64,
    pub packets_received: u64,
    pub packets_dropped: u64,
    /// Link state of the netdev (true when not watched).
    pub port_up: bool,
    /// The node GUID (as `ibv_query_device` gives it; the CA GUID of the device's CM messages).
    pub node_guid: u64,
    /// The port's active MTU in bytes: the path MTU new connections get (as `ibv_query_port` gives it).
    pub active_mtu: usize,
    /// Lanes opened on the device (soft provider), and the datagrams their sockets took — the traffic that
    /// reached a poll group's thread directly.
    pub lanes: usize,
    pub lane_packets_received: u64,
    /// Buffers the lanes sent by UDP GSO (each several datagrams, cut by the kernel) and buffers they took
    /// coalesced by UDP GRO.
    pub lane_gso_sends: u64,
    pub lane_gro_receives: u64,
    /// Receives posted on shared receive queues (the device's and its lanes') and not yet taken: a pool that
    /// must be whole again whenever no queue pair holds one.
    pub srq_receives: u64,
}

pub(crate) type Reply<T> = oneshot::Sender<Result<T, DeviceError>>;

pub(crate) enum Command {
    AllocPd(Reply<ProtectionDomain>),
    DeallocPd(u32, Reply<()>),
    Register(u32, RegionMemory, Access, Reply<MemoryRegion>),
    /// By the region's lkey (its rkey may be 0 when it grants no remote access).
    Deregister(u32, Reply<Buffer>),
    CreateQp(u32, CompletionQueue, CompletionQueue, Option<u32>, Reply<u32>),
    CreateSrq(u32, Reply<u32>),
    DestroySrq(u32, Reply<Vec<RecvWr>>),
    PostSrqRecv(u32, RecvWr),
    DestroyQp(u32, Reply<()>),
    ModifyQp(u32, QpTransition, Reply<QpState>),
    PostSend(u32, SendWr),
    PostRecv(u32, RecvWr),
    Listen(u16, usize, Reply<()>),
    Connect {
        qpn: u32,
        dst: SocketAddr,
        port: u16,
        options: ConnectionOptions,
        private_data: Vec<u8>,
        reply: Reply<ConnId>,
    },
    Accept {
        conn: ConnId,
        qpn: u32,
        options: ConnectionOptions,
        private_data: Vec<u8>,
        reply: Reply<()>,
    },
    Reject(ConnId, Vec<u8>, Reply<()>),
    Disconnect(ConnId, Reply<()>),
    Stats(oneshot::Sender<DeviceStats>),
    /// A lane for the caller's thread.
    OpenLane(Reply<crate::Lane>),
    CreateQpOnLane {
        lane: usize,
        pd: u32,
        send_cq: CompletionQueue,
        recv_cq: CompletionQueue,
        srq: Option<u32>,
        reply: Reply<(u32, mpsc::UnboundedSender<Command>)>,
    },
    /// A shared receive queue on a lane: numbered by the worker, kept by the lane.
    CreateSrqOnLane {
        lane: usize,
        pd: u32,
        reply: Reply<(u32, mpsc::UnboundedSender<Command>)>,
    },
    /// A lane's shared receive queue was destroyed (its queue pairs can no longer name it).
    LaneSrqDestroyed(u32),
    /// The device's worker to one of its lanes.
    Lane(crate::soft::lane::LaneCommand),
    /// The verbs device's worker to one of its lanes.
    #[cfg(feature = "verbs")]
    VerbsLane(crate::verbs::lane::LaneCommand),
    /// A verbs lane to its device's worker.
    #[cfg(feature = "verbs")]
    FromVerbsLane(crate::verbs::lane::LaneReport),
    /// A region for the queue pairs of a lane (forwarded to it as `Register` / `Deregister`).
    RegisterOnLane {
        lane: usize,
        pd: u32,
        buf: RegionMemory,
        access: Access,
        reply: Reply<MemoryRegion>,
    },
    DeregisterOnLane {
        lane: usize,
        key: u32,
        reply: Reply<Buffer>,
    },
    Shutdown,
}

/// A soft RoCE device.
pub struct Device {
    provider: crate::Provider,
    local: SocketAddr,
    commands: mpsc::UnboundedSender<Command>,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<DeviceEvent>>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Device {
    /// A device served by `worker`, the thread that alone owns the provider's objects and takes `commands`.
    pub(crate) fn from_worker(
        provider: crate::Provider,
        local: SocketAddr,
        commands: mpsc::UnboundedSender<Command>,
        events: mpsc::UnboundedReceiver<DeviceEvent>,
        worker: std::thread::JoinHandle<()>,
    ) -> Device {
        Device { provider, local, commands, events: tokio::sync::Mutex::new(events), worker: Mutex::new(Some(worker)) }
    }

    pub fn provider(&self) -> crate::Provider {
        self.provider
    }

    /// Whether a peer may invalidate our regions with SEND_WITH_INV. The soft provider's regions can be; a
    /// region registered through libibverbs (`ibv_reg_mr`) cannot — only memory windows and fast-registered
    /// regions can, and a SEND_WITH_INV naming one fails the receive with a remote invalid request.
    pub fn regions_remotely_invalidable(&self) -> bool {
        self.provider == crate::Provider::Soft
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("local", &self.local).finish_non_exhaustive()
    }
}

impl Device {
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The RoCE v2 GID of the device's address (IPv4-mapped for IPv4, as rxe's GID index 1).
    pub fn gid(&self) -> [u8; 16] {
        crate::soft::cm::gid_of(self.local.ip())
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, DeviceError> {
        call_on(&self.commands, make).await
    }

    /// Hands `buf` to the device for remote access; [`Device::deregister`] gives it back.
    pub async fn alloc_pd(&self) -> Result<ProtectionDomain, DeviceError> {
        self.call(Command::AllocPd).await
    }

    /// Frees a protection domain; refused while regions or queue pairs still belong to it.
    pub async fn dealloc_pd(&self, pd: ProtectionDomain) -> Result<(), DeviceError> {
        self.call(|r| Command::DeallocPd(pd.id, r)).await
    }

    pub async fn register(
        &self,
        pd: &ProtectionDomain,
        buf: impl Into<Buffer>,
        access: Access,
    ) -> Result<MemoryRegion, DeviceError> {
        let pd = pd.id;
        let buf = RegionMemory::Owned(buf.into());
        self.call(|r| Command::Register(pd, buf, access, r)).await
    }

    pub async fn deregister(&self, mr: MemoryRegion) -> Result<Buffer, DeviceError> {
        self.call(|r| Command::Deregister(mr.keys.lkey, r)).await
    }

    /// Hands `buf` to lane `lane` for remote access by the lane's queue pairs (a lane's memory is its own:
    /// its responder finds only these keys); [`Device::deregister_on_lane`] gives it back.
    pub async fn register_on_lane(
        &self,
        lane: usize,
        pd: &ProtectionDomain,
        buf: impl Into<Buffer>,
        access: Access,
    ) -> Result<MemoryRegion, DeviceError> {
        let pd = pd.id;
        let buf = RegionMemory::Owned(buf.into());
        self.call(|reply| Command::RegisterOnLane { lane, pd, buf, access, reply }).await
    }

    /// Registers an arena ([`crate::Buffer::carve`]) with lane `lane` once: the buffers carved from it are then
    /// posted on the lane's queue pairs in place — no staging copy, no registration per request — and, with
    /// remote access, a peer reaches a piece at its [`crate::Buffer::address`] with the region's rkey. A peer
    /// given that rkey can reach the whole arena, so grant remote access only on memory that peer may have
    /// (a host queue's data buffers, as SPDK's host does with its memory map). The verbs provider only: the soft
    /// provider copies every buffer into its datagrams anyway and says `Unsupported`, and so does a lane's
    /// device with no arenas (post the buffers as they are then). The region lasts until
    /// [`Device::deregister_on_lane`], the lane's end or the device's removal.
    pub async fn pin_on_lane(
        &self,
        lane: usize,
        pd: &ProtectionDomain,
        pinned: crate::buffer::Pinned,
        access: Access,
    ) -> Result<MemoryRegion, DeviceError> {
        let pd = pd.id;
        let buf = RegionMemory::Pinned(pinned);
        self.call(|reply| Command::RegisterOnLane { lane, pd, buf, access, reply }).await
    }

    pub async fn deregister_on_lane(&self, lane: usize, mr: MemoryRegion) -> Result<Buffer, DeviceError> {
        let key = mr.keys.lkey;
        self.call(|reply| Command::DeregisterOnLane { lane, key, reply }).await
    }

    pub async fn create_qp(
        &self,
        pd: &ProtectionDomain,
        send_cq: &CompletionQueue,
        recv_cq: &CompletionQueue,
    ) -> Result<QueuePair, DeviceError> {
        let pd = pd.id;
        let qpn = self.call(|r| Command::CreateQp(pd, send_cq.clone(), recv_cq.clone(), None, r)).await?;
        Ok(QueuePair { qpn, commands: self.commands.clone() })
    }

    /// A queue pair whose receives come from `srq` (posting receives on the queue pair itself is refused).
    pub async fn create_qp_with_srq(
        &self,
        pd: &ProtectionDomain,
        send_cq: &CompletionQueue,
        recv_cq: &CompletionQueue,
        srq: &SharedReceiveQueue,
    ) -> Result<QueuePair, DeviceError> {
        let (pd, srq) = (pd.id, srq.id);
        let qpn = self.call(|r| Command::CreateQp(pd, send_cq.clone(), recv_cq.clone(), Some(srq), r)).await?;
        Ok(QueuePair { qpn, commands: self.commands.clone() })
    }

    /// A lane of the device's data path for the calling thread to run ([`crate::soft::lane::Lane::run`]):
    /// queue pairs created on it ([`Device::create_qp_on_lane`]) are driven on that thread, their datagrams
    /// steered to it by the kernel, so posting, completing and the RC engine share one thread. Soft provider
    /// only (`Unsupported` elsewhere, or where the kernel takes no steering program); a device has at most 31.
    pub async fn open_lane(&self) -> Result<crate::Lane, DeviceError> {
        self.call(Command::OpenLane).await
    }

    /// A queue pair on lane `lane` of this device. Its receives are its own (no shared receive queue), and the
    /// regions a peer may reach through it are the lane's own ([`Device::register_on_lane`]): a region
    /// registered on the device serves the device's queue pairs. It sends from the lane's socket, on the device's port (rxe sends from a port per flow).
    /// `Device::close` tells the lanes to stop; they flush their queue pairs and close their sockets as their
    /// threads get to it.
    pub async fn create_qp_on_lane(
        &self,
        lane: usize,
        pd: &ProtectionDomain,
        send_cq: &CompletionQueue,
        recv_cq: &CompletionQueue,
    ) -> Result<QueuePair, DeviceError> {
        let (pd, send_cq, recv_cq) = (pd.id, send_cq.clone(), recv_cq.clone());
        let (qpn, commands) =
            self.call(|reply| Command::CreateQpOnLane { lane, pd, send_cq, recv_cq, srq: None, reply }).await?;
        Ok(QueuePair { qpn, commands })
    }

    /// A queue pair on lane `lane` whose receives come from `srq`, a shared receive queue of the same lane
    /// ([`Device::create_srq_on_lane`]) and domain: a poll group's queue pairs share one pool of receives, so
    /// memory does not grow with queue pairs × depth.
    pub async fn create_qp_on_lane_with_srq(
        &self,
        lane: usize,
        pd: &ProtectionDomain,
        send_cq: &CompletionQueue,
        recv_cq: &CompletionQueue,
        srq: &SharedReceiveQueue,
    ) -> Result<QueuePair, DeviceError> {
        let (pd, send_cq, recv_cq, srq) = (pd.id, send_cq.clone(), recv_cq.clone(), Some(srq.id));
        let (qpn, commands) =
            self.call(|reply| Command::CreateQpOnLane { lane, pd, send_cq, recv_cq, srq, reply }).await?;
        Ok(QueuePair { qpn, commands })
    }

    /// A shared receive queue kept by lane `lane`: posting on it is a message to the lane, on the lane's thread a
    /// call there. Soft provider only.
    pub async fn create_srq_on_lane(
        &self,
        lane: usize,
        pd: &ProtectionDomain,
    ) -> Result<SharedReceiveQueue, DeviceError> {
        let pd = pd.id;
        let (id, commands) = self.call(|reply| Command::CreateSrqOnLane { lane, pd, reply }).await?;
        Ok(SharedReceiveQueue { id, commands })
    }

    pub async fn create_srq(&self, pd: &ProtectionDomain) -> Result<SharedReceiveQueue, DeviceError> {
        let pd = pd.id;
        let id = self.call(|r| Command::CreateSrq(pd, r)).await?;
        Ok(SharedReceiveQueue { id, commands: self.commands.clone() })
    }

    /// Destroys a shared receive queue and hands back the receives still posted on it. Refused while queue
    /// pairs use it.
    pub async fn destroy_srq(&self, srq: &SharedReceiveQueue) -> Result<Vec<RecvWr>, DeviceError> {
        // Its owner destroys it: the device's worker, or the lane that keeps it.
        let taken = call_on(&srq.commands, |reply| Command::DestroySrq(srq.id, reply)).await;
        // Gone unless still in use — also when its lane has ended (the queue went with it).
        if !srq.commands.same_channel(&self.commands) && !matches!(taken, Err(DeviceError::SrqBusy(_))) {
            let _ = self.commands.send(Command::LaneSrqDestroyed(srq.id));
        }
        taken
    }

    /// Moves a queue pair through RESET / INIT / RTR / RTS / ERR by hand; returns the new state.
    pub async fn modify_qp(&self, qp: &QueuePair, transition: QpTransition) -> Result<QpState, DeviceError> {
        self.call(|r| Command::ModifyQp(qp.qpn, transition, r)).await
    }

    /// Destroys a queue pair: outstanding requests complete with a flush error first. Idempotent.
    pub async fn destroy_qp(&self, qp: &QueuePair) -> Result<(), DeviceError> {
        self.call(|r| Command::DestroyQp(qp.qpn, r)).await
    }

    pub async fn listen(&self, port: u16, backlog: usize) -> Result<(), DeviceError> {
        self.call(|r| Command::Listen(port, backlog, r)).await
    }

    /// Connects `qp` to the listener at `dst` (the peer device's UDP address) and rdma_cm `port`.
    pub async fn connect(
        &self,
        qp: &QueuePair,
        dst: SocketAddr,
        port: u16,
        options: ConnectionOptions,
        private_data: &[u8],
    ) -> Result<ConnId, DeviceError> {
        let private_data = private_data.to_vec();
        self.call(|reply| Command::Connect { qpn: qp.qpn, dst, port, options, private_data, reply }).await
    }

    pub async fn accept(
        &self,
        conn: ConnId,
        qp: &QueuePair,
        options: ConnectionOptions,
        private_data: &[u8],
    ) -> Result<(), DeviceError> {
        let private_data = private_data.to_vec();
        self.call(|reply| Command::Accept { conn, qpn: qp.qpn, options, private_data, reply }).await
    }

    pub async fn reject(&self, conn: ConnId, private_data: &[u8]) -> Result<(), DeviceError> {
        let pd = private_data.to_vec();
        self.call(|r| Command::Reject(conn, pd, r)).await
    }

    pub async fn disconnect(&self, conn: ConnId) -> Result<(), DeviceError> {
        self.call(|r| Command::Disconnect(conn, r)).await
    }

    /// The next connection or device event; `None` once the device is closed.
    pub async fn next_event(&self) -> Option<DeviceEvent> {
        self.events.lock().await.recv().await
    }

    pub async fn stats(&self) -> Result<DeviceStats, DeviceError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Stats(tx)).map_err(|_| DeviceError::Closed)?;
        rx.await.map_err(|_| DeviceError::Closed)
    }

    /// Stops the worker: every queue pair is flushed, the socket closed, the thread joined.
    pub fn close(&self) {
        let handle = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            // Queue pair handles hold senders too, so the channel alone would not end the worker: ask it.
            let _ = self.commands.send(Command::Shutdown);
            let _ = handle.join();
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.close();
    }
}
