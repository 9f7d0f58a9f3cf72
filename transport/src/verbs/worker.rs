//! The worker of a verbs device: the one thread that owns the device's libibverbs objects and connection-manager
//! ids. It takes commands from the device's handles and events from three file descriptors (the kernel
//! connection manager's file, the completion channel every queue's CQ is armed on, and the device's async
//! events), all driven from a tokio reactor, and hands back completions and events — the same contract as the
//! soft worker.
//!
//! The application's buffers never reach the device: each work request is staged through a registered buffer
//! the worker owns (copied in before posting, copied out on completion), so a buffer handed back by a
//! completion can be used at once, whatever the device still does. Queue pairs are connected through rdma_cm
//! with queue pairs the worker creates itself (its INIT_QP_ATTR gives their attributes), so a queue pair
//! exists — and takes receives — before its connection does, as the soft provider's do.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::VerbsConfig;
use super::ffi::{self, AsyncEvent, CmEvent, CmId, ConnParam, QpTarget, SendKind, cm_event};
use crate::connection::{ConnId, PeerParams};
use crate::device::{
    Command, Completion, CompletionQueue, ConnectionOptions, DeviceError, DeviceEvent, DeviceStats, MemoryRegion,
    ProtectionDomain, QpState, QpTransition,
};
use crate::region::{Access, RegionKeys};
use crate::work_request::{RecvWr, SendOp, SendWr, WcOpcode, WcStatus, WorkCompletion};

/// Work requests each queue pair has on the device at once; more wait in the worker (a full queue is not an
/// error for the application).
const SEND_DEPTH: usize = 256;
const RECV_DEPTH: usize = 256;
const SRQ_DEPTH: usize = 1024;
/// How long a DREQ waits after the connection was closed, for the port's state to catch up with the link.
const DREQ_GRACE: Duration = Duration::from_secs(1);
/// How often parked ids and pending disconnects are looked at.
const RELEASE_TICK: Duration = Duration::from_millis(200);
/// Commands taken in one turn beyond the first, so that posts queued together are posted together.
const COMMAND_BURST: usize = 64;
/// Staging buffers kept per size class and queue, beyond which returned ones are deregistered.
const STAGING_KEEP: usize = 64;

fn verbs(e: ffi::VerbsError) -> DeviceError {
    DeviceError::Verbs { call: e.call, source: e.source }
}

/// Registered buffers a queue stages its requests through, by size class.
#[derive(Default)]
struct Staging {
    free: HashMap<usize, Vec<ffi::MemoryRegion>>,
}

impl Staging {
    fn take(&mut self, pd: &Rc<ffi::Pd>, len: usize) -> Result<Option<ffi::MemoryRegion>, ffi::VerbsError> {
        if len == 0 {
            return Ok(None);
        }
        let class = len.next_power_of_two().max(4096);
        if let Some(mr) = self.free.get_mut(&class).and_then(Vec::pop) {
            return Ok(Some(mr));
        }
        ffi::MemoryRegion::register(pd, vec![0; class], ffi::RegionAccess { local_write: true, ..Default::default() })
            .map(Some)
            .map_err(|(e, _)| e)
    }

    fn give(&mut self, mr: ffi::MemoryRegion) {
        let free = self.free.entry(mr.len()).or_default();
        if free.len() < STAGING_KEEP {
            free.push(mr);
        }
    }

    fn count(&self) -> usize {
        self.free.values().map(Vec::len).sum()
    }
}

/// Where a posted request's staging buffer goes back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Qp(u32),
    Srq(u32),
}

/// A request on the device.
struct Pending {
    owner: Owner,
    wr_id: u64,
    /// `None` for a receive.
    op: Option<SendOp>,
    buf: Vec<u8>,
    sg_list: Vec<Vec<u8>>,
    staging: Option<ffi::MemoryRegion>,
    len: usize,
}

impl Pending {
    fn receive(owner: Owner, wr: RecvWr, staging: Option<ffi::MemoryRegion>, len: usize) -> Pending {
        Pending { owner, wr_id: wr.wr_id, op: None, buf: wr.buf, sg_list: wr.sg_list, staging, len }
    }

    fn send(qpn: u32, wr: SendWr, staging: Option<ffi::MemoryRegion>, len: usize) -> Pending {
        Pending {
            owner: Owner::Qp(qpn),
            wr_id: wr.wr_id,
            op: Some(wr.op),
            buf: wr.buf,
            sg_list: wr.sg_list,
            staging,
            len,
        }
    }
}

struct QpSlot {
    qp: ffi::Qp,
    cq: Rc<ffi::Cq>,
    pd: u32,
    srq: Option<u32>,
    state: QpState,
    send_cq: CompletionQueue,
    recv_cq: CompletionQueue,
    conn: Option<ConnId>,
    sends_posted: usize,
    recvs_posted: usize,
    send_backlog: VecDeque<SendWr>,
    recv_backlog: VecDeque<RecvWr>,
    staging: Staging,
    fatal_reported: bool,
    /// Sends prepared (staged, in `pending`) this turn, posted as one chain at its end ([`Worker::post_chains`]).
    chain: Vec<ffi::SendRequest>,
    /// Posted unsignalled sends, oldest first: each completes when a later send of this queue pair does.
    unsignaled: VecDeque<u64>,
}

struct SrqSlot {
    srq: Option<Rc<ffi::Srq>>,
    pd: u32,
    posted: usize,
    backlog: VecDeque<RecvWr>,
    staging: Staging,
}

struct Region {
    pd: u32,
    mr: Option<ffi::MemoryRegion>,
    /// The buffer, once the device was removed under the region.
    kept: Option<Vec<u8>>,
}

struct Conn {
    id: CmId,
    qpn: Option<u32>,
    options: ConnectionOptions,
    /// What an outgoing connection sends once its route is resolved.
    private_data: Vec<u8>,
    peer: Option<PeerParams>,
    /// Disconnected by the application: the DREQ goes out from this time on, once the port is up.
    disconnect_after: Option<Instant>,
}

/// The device's objects; dropped as a whole when the device is removed.
struct Live {
    // Field order is drop order: the completion channel before the context, the context before its anchor.
    comp: Rc<ffi::CompChannel>,
    context: Rc<ffi::Context>,
}

pub(super) struct Worker {
    config: VerbsConfig,
    events: mpsc::UnboundedSender<DeviceEvent>,
    channel: Rc<ffi::EventChannel>,
    live: Option<Live>,
    port: u8,
    pds: HashMap<u32, Option<Rc<ffi::Pd>>>,
    next_pd: u32,
    regions: HashMap<u32, Region>,
    srqs: HashMap<u32, SrqSlot>,
    next_srq: u32,
    qps: HashMap<u32, QpSlot>,
    cq_owner: HashMap<usize, u32>,
    pending: HashMap<u64, Pending>,
    next_wr: u64,
    listeners: HashMap<usize, (u16, CmId)>,
    conns: HashMap<ConnId, Conn>,
    conn_by_id: HashMap<usize, ConnId>,
    next_conn: ConnId,
    /// Ids of closed connections, each kept until its time has come and the port is up: destroying a connected
    /// id sends a DREQ, and a MAD sent while rxe's port is down leaves the kernel's connection manager deaf to
    /// every later REQ on the device (seen in the testbed's target-flap; hosts then retry `connecting` for
    /// ever). The port's state lags the link: a queue pair fails because the bond just went down before the
    /// port says so, and the application closes the connection at once — hence [`DREQ_GRACE`].
    parked: Vec<(Instant, CmId)>,
    /// Queue pairs the device's removal destroyed, until the application destroys them too: what it still
    /// posts there comes back flushed (its buffers are not lost).
    removed_qps: HashMap<u32, (CompletionQueue, CompletionQueue)>,
    /// Queue pairs with a chain of sends to post at the end of this turn.
    chained: Vec<u32>,
    stats: DeviceStats,
    removed: bool,
}

fn flushed(wr_id: u64, op: Option<SendOp>, buf: Vec<u8>, sg_list: Vec<Vec<u8>>, status: WcStatus) -> WorkCompletion {
    let opcode = op.map_or(WcOpcode::Recv, |op| SendWr::new(0, op, Vec::new()).opcode());
    WorkCompletion { wr_id, status, opcode, byte_len: 0, imm: None, invalidated_rkey: None, buf, sg_list }
}

fn wc_status(status: u32) -> WcStatus {
    use ffi::wc_status as s;
    match status {
        s::IBV_WC_SUCCESS => WcStatus::Success,
        s::IBV_WC_LOC_LEN_ERR => WcStatus::LocalLength,
        s::IBV_WC_LOC_PROT_ERR => WcStatus::LocalProtection,
        s::IBV_WC_WR_FLUSH_ERR => WcStatus::WrFlush,
        s::IBV_WC_REM_INV_REQ_ERR => WcStatus::RemoteInvalidRequest,
        s::IBV_WC_REM_ACCESS_ERR => WcStatus::RemoteAccess,
        s::IBV_WC_REM_OP_ERR => WcStatus::RemoteOperation,
        s::IBV_WC_RETRY_EXC_ERR => WcStatus::RetryExceeded,
        s::IBV_WC_RNR_RETRY_EXC_ERR => WcStatus::RnrRetryExceeded,
        s::IBV_WC_BAD_RESP_ERR => WcStatus::BadResponse,
        _ => WcStatus::LocalQpOperation,
    }
}

/// Whether `addr` is still configured on this host (binding a UDP socket to it sends nothing).
fn address_present(addr: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(addr, 0)).is_ok()
}

impl Worker {
    /// Opens the device that serves `config.addr`: a connection-manager id bound to the address picks it.
    pub(super) fn open(config: VerbsConfig, events: mpsc::UnboundedSender<DeviceEvent>) -> Result<Worker, DeviceError> {
        let names = ffi::device_names().map_err(DeviceError::Unavailable)?;
        if names.is_empty() {
            return Err(DeviceError::Unavailable("no RDMA device on this host".into()));
        }
        let unavailable = |what: String| DeviceError::Unavailable(what);
        let channel = ffi::EventChannel::new()
            .map_err(|e| unavailable(format!("the kernel's connection manager (rdma_ucm) is not there: {e}")))?;
        let anchor = CmId::new(&channel).map_err(|e| unavailable(format!("connection manager: {e}")))?;
        anchor.bind(SocketAddr::new(config.addr, 0)).map_err(|e| {
            unavailable(format!("no RDMA device serves {} (devices: {}): {e}", config.addr, names.join(", ")))
        })?;
        let context = ffi::Context::open(Rc::new(anchor)).map_err(verbs)?.ok_or_else(|| {
            unavailable(format!("no RDMA device serves {} (devices: {})", config.addr, names.join(", ")))
        })?;
        let port = context.port_num().max(1);
        context.set_async_nonblocking().map_err(verbs)?;
        let (port_up, mtu) = context.port_state(port).map_err(verbs)?;
        let comp = ffi::CompChannel::new(&context).map_err(verbs)?;
        let node_guid = context.node_guid();
        tracing::info!(addr = %config.addr, device = %context.device_name(), port, mtu, port_up, "verbs device open");
        Ok(Worker {
            config,
            events,
            channel,
            live: Some(Live { comp, context }),
            port,
            pds: HashMap::new(),
            next_pd: 1,
            regions: HashMap::new(),
            srqs: HashMap::new(),
            next_srq: 1,
            qps: HashMap::new(),
            cq_owner: HashMap::new(),
            pending: HashMap::new(),
            next_wr: 1,
            listeners: HashMap::new(),
            conns: HashMap::new(),
            conn_by_id: HashMap::new(),
            next_conn: 1,
            parked: Vec::new(),
            removed_qps: HashMap::new(),
            chained: Vec::new(),
            stats: DeviceStats { port_up, node_guid, active_mtu: mtu, ..DeviceStats::default() },
            removed: false,
        })
    }

    pub(super) async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let Some(live) = &self.live else { return };
        let (cm_fd, comp_fd, async_fd) = (self.channel.watch(), live.comp.watch(), live.context.watch_async());
        let (cm_fd, mut comp_fd, mut async_fd) = match (cm_fd, comp_fd, async_fd) {
            (Ok(a), Ok(b), Ok(c)) => (a, Some(b), Some(c)),
            (a, b, c) => {
                let e = [a.err(), b.err(), c.err()].into_iter().flatten().next();
                tracing::error!(addr = %self.config.addr, "verbs device: cannot watch its descriptors: {e:?}");
                self.shutdown();
                return;
            }
        };
        let mut release = tokio::time::interval(RELEASE_TICK);
        release.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = release.tick() => self.release_due(),
                command = commands.recv() => match command {
                    None | Some(Command::Shutdown) => break,
                    Some(c) => {
                        self.on_command(c);
                        // What is queued already (a read's data WRITE and its response) goes out as one chain.
                        let mut stop = false;
                        for _ in 0..COMMAND_BURST {
                            match commands.try_recv() {
                                Ok(Command::Shutdown) => {
                                    stop = true;
                                    break;
                                }
                                Ok(c) => self.on_command(c),
                                Err(_) => break,
                            }
                        }
                        if stop {
                            break;
                        }
                    }
                },
                guard = cm_fd.readable() => {
                    if let Ok(mut guard) = guard {
                        self.drain_cm_events();
                        guard.clear_ready();
                    }
                },
                guard = readable(&comp_fd) => {
                    if let Ok(mut guard) = guard {
                        self.drain_completions();
                        guard.clear_ready();
                    }
                },
                guard = readable(&async_fd) => {
                    if let Ok(mut guard) = guard {
                        self.drain_async_events();
                        guard.clear_ready();
                    }
                },
            }
            self.post_chains();
            if self.removed && comp_fd.is_some() {
                // The reactor lets go of the device's descriptors before the device's objects close them.
                comp_fd = None;
                async_fd = None;
                self.live = None;
                tracing::info!(addr = %self.config.addr, "verbs device released");
            }
        }
        drop((comp_fd, async_fd));
        self.shutdown();
    }

    /// Teardown: every queue pair flushes its outstanding requests (every buffer goes back), then every object
    /// is destroyed, children first.
    fn shutdown(&mut self) {
        let qpns: Vec<u32> = self.qps.keys().copied().collect();
        for qpn in qpns {
            self.destroy_qp(qpn);
        }
        self.conns.clear();
        self.conn_by_id.clear();
        self.parked.clear();
        self.listeners.clear();
        self.srqs.clear();
        self.regions.clear();
        self.pds.clear();
        self.live = None;
    }

    fn emit(&self, event: DeviceEvent) {
        let _ = self.events.send(event);
    }

    fn alive(&self) -> Result<&Live, DeviceError> {
        self.live.as_ref().ok_or(DeviceError::Closed)
    }

    fn pd(&self, pd: u32) -> Result<Rc<ffi::Pd>, DeviceError> {
        match self.pds.get(&pd) {
            Some(Some(p)) => Ok(Rc::clone(p)),
            Some(None) => Err(DeviceError::Closed),
            None => Err(DeviceError::UnknownPd(pd)),
        }
    }

    fn on_command(&mut self, command: Command) {
        // Only posts may overtake the sends of this turn (a send queue's order is its own): anything else
        // sees them posted.
        if !matches!(command, Command::PostSend(..) | Command::PostRecv(..) | Command::PostSrqRecv(..)) {
            self.post_chains();
        }
        match command {
            Command::AllocPd(reply) => {
                let result = self.alive().and_then(|l| ffi::Pd::new(&l.context).map_err(verbs)).map(|pd| {
                    let id = self.next_pd;
                    self.next_pd += 1;
                    self.pds.insert(id, Some(pd));
                    ProtectionDomain { id }
                });
                let _ = reply.send(result);
            }
            Command::DeallocPd(pd, reply) => {
                let result = if !self.pds.contains_key(&pd) {
                    Err(DeviceError::UnknownPd(pd))
                } else if self.regions.values().any(|r| r.pd == pd)
                    || self.qps.values().any(|q| q.pd == pd)
                    || self.srqs.values().any(|s| s.pd == pd)
                {
                    Err(DeviceError::PdBusy(pd))
                } else {
                    self.pds.remove(&pd);
                    Ok(())
                };
                let _ = reply.send(result);
            }
            Command::Register(pd, buf, access, reply) => {
                let _ = reply.send(self.register(pd, buf, access));
            }
            Command::Deregister(key, reply) => {
                let result = match self.regions.remove(&key) {
                    Some(Region { mr: Some(mr), .. }) => Ok(mr.into_buffer()),
                    Some(Region { kept, .. }) => Ok(kept.unwrap_or_default()),
                    None => Err(DeviceError::UnknownRegion(key)),
                };
                let _ = reply.send(result);
            }
            Command::CreateSrq(pd, reply) => {
                let result = self.pd(pd).and_then(|p| ffi::Srq::new(&p, SRQ_DEPTH as u32).map_err(verbs)).map(|srq| {
                    let id = self.next_srq;
                    self.next_srq += 1;
                    let slot = SrqSlot {
                        srq: Some(srq),
                        pd,
                        posted: 0,
                        backlog: VecDeque::new(),
                        staging: Staging::default(),
                    };
                    self.srqs.insert(id, slot);
                    id
                });
                let _ = reply.send(result);
            }
            Command::DestroySrq(id, reply) => {
                let _ = reply.send(self.destroy_srq(id));
            }
            Command::PostSrqRecv(id, wr) => self.post_srq_recv(id, wr),
            Command::CreateQp(pd, send_cq, recv_cq, srq, reply) => {
                let _ = reply.send(self.create_qp(pd, send_cq, recv_cq, srq));
            }
            Command::ModifyQp(qpn, transition, reply) => {
                let result = match (self.qps.get_mut(&qpn), transition) {
                    (None, _) => Err(DeviceError::UnknownQp(qpn)),
                    (Some(slot), QpTransition::Error) => {
                        let _ = slot.qp.to_error();
                        slot.state = QpState::Error;
                        Ok(QpState::Error)
                    }
                    (Some(_), _) => Err(DeviceError::Unsupported(
                        "moving a queue pair by hand: the verbs provider connects queue pairs through rdma_cm",
                    )),
                };
                let _ = reply.send(result);
            }
            Command::DestroyQp(qpn, reply) => {
                self.removed_qps.remove(&qpn);
                self.destroy_qp(qpn);
                let _ = reply.send(Ok(()));
            }
            Command::PostSend(qpn, wr) => self.post_send(qpn, wr),
            Command::PostRecv(qpn, wr) => self.post_recv(qpn, wr),
            Command::Listen(port, backlog, reply) => {
                let _ = reply.send(self.listen(port, backlog));
            }
            Command::Connect { qpn, dst, port, options, private_data, reply } => {
                let _ = reply.send(self.connect(qpn, dst, port, options, private_data));
            }
            Command::Accept { conn, qpn, options, private_data, reply } => {
                let _ = reply.send(self.accept(conn, qpn, options, private_data));
            }
            Command::Reject(conn, private_data, reply) => {
                let result = match self.conns.remove(&conn) {
                    Some(c) => {
                        self.conn_by_id.remove(&c.id.key());
                        c.id.reject(&private_data).map_err(verbs)
                    }
                    None => Err(DeviceError::Cm(crate::soft::cm::CmError::UnknownConnection(conn))),
                };
                let _ = reply.send(result);
            }
            Command::Disconnect(conn, reply) => {
                let result = match self.conns.get_mut(&conn) {
                    Some(c) => {
                        if let Some(slot) = c.qpn.and_then(|q| self.qps.get_mut(&q)) {
                            let _ = slot.qp.to_error();
                            slot.state = QpState::Error;
                        }
                        // The queue pair is flushed now; the DREQ waits (see `parked`).
                        c.disconnect_after.get_or_insert(Instant::now() + DREQ_GRACE);
                        Ok(())
                    }
                    None => Err(DeviceError::Cm(crate::soft::cm::CmError::UnknownConnection(conn))),
                };
                let _ = reply.send(result);
            }
            Command::Stats(reply) => {
                let staging: usize = self.qps.values().map(|q| q.staging.count()).sum::<usize>()
                    + self.srqs.values().map(|s| s.staging.count()).sum::<usize>();
                tracing::trace!(staging, pending = self.pending.len(), "verbs stats");
                // The active MTU follows the netdev's MTU.
                if let Some(Ok((_, mtu))) = self.live.as_ref().map(|l| l.context.port_state(self.port)) {
                    self.stats.active_mtu = mtu;
                }
                let _ = reply.send(DeviceStats {
                    protection_domains: self.pds.len(),
                    shared_receive_queues: self.srqs.len(),
                    queue_pairs: self.qps.len(),
                    regions: self.regions.len(),
                    region_bytes: self.regions.values().map(|r| r.mr.as_ref().map_or(0, |m| m.len())).sum(),
                    connections: self.conns.len(),
                    ..self.stats
                });
            }
            // The verbs provider drives its queue pairs on this thread (poll-group ownership is the next step).
            Command::OpenLane(reply) => {
                let _ = reply.send(Err(DeviceError::Unsupported("lanes: the verbs provider keeps its queue pairs")));
            }
            Command::CreateQpOnLane { reply, .. } | Command::CreateSrqOnLane { reply, .. } => {
                let _ = reply.send(Err(DeviceError::Unsupported("lanes: the verbs provider keeps its queue pairs")));
            }
            Command::LaneSrqDestroyed(_) => {}
            Command::Lane(_) => {}
            Command::RegisterOnLane { reply, .. } => {
                let _ = reply.send(Err(DeviceError::Unsupported("lanes: the verbs provider keeps its queue pairs")));
            }
            Command::DeregisterOnLane { reply, .. } => {
                let _ = reply.send(Err(DeviceError::Unsupported("lanes: the verbs provider keeps its queue pairs")));
            }
            Command::Shutdown => {}
        }
    }

    fn register(&mut self, pd: u32, buf: Vec<u8>, access: Access) -> Result<MemoryRegion, DeviceError> {
        let p = self.pd(pd)?;
        let access = ffi::RegionAccess {
            local_write: access.local_write,
            remote_read: access.remote_read,
            remote_write: access.remote_write,
        };
        let mr = ffi::MemoryRegion::register(&p, buf, access).map_err(|(e, _)| verbs(e))?;
        let keys = RegionKeys { lkey: mr.lkey(), rkey: mr.rkey(), addr: mr.addr(), len: mr.len() };
        self.regions.insert(keys.rkey, Region { pd, mr: Some(mr), kept: None });
        Ok(MemoryRegion { keys })
    }

    fn create_qp(
        &mut self,
        pd: u32,
        send_cq: CompletionQueue,
        recv_cq: CompletionQueue,
        srq: Option<u32>,
    ) -> Result<u32, DeviceError> {
        let p = self.pd(pd)?;
        let live = self.alive()?;
        let srq_rc = match srq {
            Some(id) => match self.srqs.get(&id) {
                Some(SrqSlot { srq: Some(s), pd: spd, .. }) if *spd == pd => Some(Rc::clone(s)),
                _ => return Err(DeviceError::UnknownSrq(id)),
            },
            None => None,
        };
        let entries = SEND_DEPTH + if srq.is_some() { SRQ_DEPTH } else { RECV_DEPTH };
        let cq = ffi::Cq::new(&live.context, &live.comp, entries as u32).map_err(verbs)?;
        let qp = ffi::Qp::new(&p, &cq, srq_rc.as_ref(), SEND_DEPTH as u32, RECV_DEPTH as u32).map_err(verbs)?;
        // INIT at once: receives may be posted before the connection exists.
        qp.init(self.port).map_err(verbs)?;
        let qpn = qp.qp_num();
        self.cq_owner.insert(cq.key(), qpn);
        self.qps.insert(
            qpn,
            QpSlot {
                qp,
                cq,
                pd,
                srq,
                state: QpState::Init,
                send_cq,
                recv_cq,
                conn: None,
                sends_posted: 0,
                recvs_posted: 0,
                send_backlog: VecDeque::new(),
                recv_backlog: VecDeque::new(),
                staging: Staging::default(),
                fatal_reported: false,
                chain: Vec::new(),
                unsignaled: VecDeque::new(),
            },
        );
        Ok(qpn)
    }

    fn destroy_srq(&mut self, id: u32) -> Result<Vec<RecvWr>, DeviceError> {
        if self.qps.values().any(|q| q.srq == Some(id)) {
            return Err(DeviceError::SrqBusy(id));
        }
        let mut slot = self.srqs.remove(&id).ok_or(DeviceError::UnknownSrq(id))?;
        // The device lets go of the posted receives' buffers with the SRQ.
        drop(slot.srq.take());
        let keys: Vec<u64> = self.pending.iter().filter(|(_, p)| p.owner == Owner::Srq(id)).map(|(k, _)| *k).collect();
        let mut back: Vec<RecvWr> = Vec::new();
        for key in keys {
            if let Some(p) = self.pending.remove(&key) {
                back.push(RecvWr { wr_id: p.wr_id, buf: p.buf, sg_list: p.sg_list });
            }
        }
        back.extend(slot.backlog.drain(..));
        Ok(back)
    }

    fn post_srq_recv(&mut self, id: u32, wr: RecvWr) {
        let Some(slot) = self.srqs.get_mut(&id) else {
            tracing::warn!(srq = id, wr_id = wr.wr_id, "receive posted on a destroyed shared receive queue");
            return;
        };
        if slot.srq.is_none() || slot.posted >= SRQ_DEPTH {
            slot.backlog.push_back(wr);
            return;
        }
        self.post_srq_recv_now(id, wr);
    }

    fn post_srq_recv_now(&mut self, id: u32, wr: RecvWr) {
        let Some(slot) = self.srqs.get_mut(&id) else { return };
        let Some(srq) = slot.srq.clone() else {
            slot.backlog.push_back(wr);
            return;
        };
        let pd = slot.pd;
        let Ok(pd) = self.pd(pd) else { return };
        let Some(slot) = self.srqs.get_mut(&id) else { return };
        let len = recv_len(&wr);
        let staging = match slot.staging.take(&pd, len) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(srq = id, "staging a receive: {e}");
                slot.backlog.push_back(wr);
                return;
            }
        };
        let key = self.next_wr;
        self.next_wr += 1;
        match srq.post_recv(key, staging.as_ref().map(|s| s.sge(len))) {
            Ok(()) => {
                slot.posted += 1;
                self.pending.insert(key, Pending::receive(Owner::Srq(id), wr, staging, len));
            }
            Err(e) => {
                tracing::warn!(srq = id, "ibv_post_srq_recv: {e}");
                if let Some(s) = staging {
                    slot.staging.give(s);
                }
                slot.backlog.push_back(wr);
            }
        }
    }

    fn post_recv(&mut self, qpn: u32, wr: RecvWr) {
        if let Some((_, recv_cq)) = self.removed_qps.get(&qpn) {
            recv_cq.push(Completion { qpn, wc: flushed(wr.wr_id, None, wr.buf, wr.sg_list, WcStatus::WrFlush) });
            return;
        }
        let Some(slot) = self.qps.get_mut(&qpn) else {
            tracing::warn!(qpn, wr_id = wr.wr_id, "receive posted on a destroyed queue pair");
            return;
        };
        if slot.srq.is_some() || slot.state == QpState::Error {
            slot.recv_cq.push(Completion { qpn, wc: flushed(wr.wr_id, None, wr.buf, wr.sg_list, WcStatus::WrFlush) });
            return;
        }
        if slot.recvs_posted >= RECV_DEPTH {
            slot.recv_backlog.push_back(wr);
            return;
        }
        self.post_recv_now(qpn, wr);
    }

    fn post_recv_now(&mut self, qpn: u32, wr: RecvWr) {
        let Some(pd) = self.qps.get(&qpn).map(|s| s.pd) else { return };
        let Ok(pd) = self.pd(pd) else { return };
        let Some(slot) = self.qps.get_mut(&qpn) else { return };
        let len = recv_len(&wr);
        let staging = match slot.staging.take(&pd, len) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(qpn, "staging a receive: {e}");
                slot.recv_cq.push(Completion {
                    qpn,
                    wc: flushed(wr.wr_id, None, wr.buf, wr.sg_list, WcStatus::LocalProtection),
                });
                return;
            }
        };
        let key = self.next_wr;
        self.next_wr += 1;
        match slot.qp.post_recv(key, staging.as_ref().map(|s| s.sge(len))) {
            Ok(()) => {
                slot.recvs_posted += 1;
                self.pending.insert(key, Pending::receive(Owner::Qp(qpn), wr, staging, len));
            }
            Err(e) => {
                tracing::debug!(qpn, "ibv_post_recv: {e}");
                if let Some(s) = staging {
                    slot.staging.give(s);
                }
                slot.recv_cq.push(Completion {
                    qpn,
                    wc: flushed(wr.wr_id, None, wr.buf, wr.sg_list, WcStatus::LocalQpOperation),
                });
            }
        }
    }

    fn post_send(&mut self, qpn: u32, wr: SendWr) {
        if let Some((send_cq, _)) = self.removed_qps.get(&qpn) {
            let wc = flushed(wr.wr_id, Some(wr.op), wr.buf, wr.sg_list, WcStatus::WrFlush);
            send_cq.push(Completion { qpn, wc });
            return;
        }
        let Some(slot) = self.qps.get_mut(&qpn) else {
            tracing::warn!(qpn, wr_id = wr.wr_id, "send posted on a destroyed queue pair");
            return;
        };
        match slot.state {
            QpState::Error => {
                let wc = flushed(wr.wr_id, Some(wr.op), wr.buf, wr.sg_list, WcStatus::WrFlush);
                slot.send_cq.push(Completion { qpn, wc });
            }
            QpState::Rts if slot.sends_posted < SEND_DEPTH && slot.send_backlog.is_empty() => {
                self.post_send_now(qpn, wr)
            }
            // Before the connection is up, or with the send queue full: in order, once it can go.
            _ => slot.send_backlog.push_back(wr),
        }
    }

    fn post_send_now(&mut self, qpn: u32, wr: SendWr) {
        let Some(pd) = self.qps.get(&qpn).map(|s| s.pd) else { return };
        let Ok(pd) = self.pd(pd) else { return };
        let Some(slot) = self.qps.get_mut(&qpn) else { return };
        let len = if wr.sg_list.is_empty() { wr.buf.len() } else { wr.sg_list.iter().map(Vec::len).sum() };
        let mut staging = match slot.staging.take(&pd, len) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(qpn, "staging a send: {e}");
                let wc = flushed(wr.wr_id, Some(wr.op), wr.buf, wr.sg_list, WcStatus::LocalProtection);
                slot.send_cq.push(Completion { qpn, wc });
                // Nothing posted after a request that could not go may execute: a read's response must not
                // reach the host without the data WRITE before it.
                let _ = slot.qp.to_error();
                slot.state = QpState::Error;
                return;
            }
        };
        if let Some(s) = staging.as_mut()
            && !matches!(wr.op, SendOp::RdmaRead { .. })
        {
            let out = s.bytes_mut();
            if wr.sg_list.is_empty() {
                out[..len].copy_from_slice(&wr.buf);
            } else {
                let mut at = 0;
                for seg in &wr.sg_list {
                    out[at..at + seg.len()].copy_from_slice(seg);
                    at += seg.len();
                }
            }
        }
        let kind = match wr.op {
            SendOp::Send => SendKind::Send,
            SendOp::SendWithImm(imm) => SendKind::SendWithImm(imm),
            SendOp::SendWithInv(rkey) => SendKind::SendWithInv(rkey),
            SendOp::RdmaWrite { remote_addr, rkey } => SendKind::Write { remote_addr, rkey },
            SendOp::RdmaWriteWithImm { remote_addr, rkey, imm } => SendKind::WriteWithImm { remote_addr, rkey, imm },
            SendOp::RdmaRead { remote_addr, rkey } => SendKind::Read { remote_addr, rkey },
        };
        let key = self.next_wr;
        self.next_wr += 1;
        if slot.chain.is_empty() {
            self.chained.push(qpn);
        }
        let sge = staging.as_ref().map(|s| s.sge(len));
        slot.chain.push(ffi::SendRequest { wr_id: key, kind, sge, solicited: wr.solicited, signaled: true });
        slot.sends_posted += 1;
        self.pending.insert(key, Pending::send(qpn, wr, staging, len));
    }

    /// Posts the sends this turn prepared, one chain per queue pair (one `ibv_post_send`: rxe's requester runs
    /// once for a read's data WRITE and its response, as for nvmet's chained pair). All but a chain's last are
    /// unsignalled — one completion where there were several — except READs, whose data must be copied out
    /// when they complete.
    fn post_chains(&mut self) {
        for qpn in std::mem::take(&mut self.chained) {
            let Some(slot) = self.qps.get_mut(&qpn) else { continue };
            let mut chain = std::mem::take(&mut slot.chain);
            let last = chain.len().saturating_sub(1);
            for r in &mut chain[..last] {
                r.signaled = matches!(r.kind, SendKind::Read { .. });
            }
            let (posted, failed) = match slot.qp.post_sends(&chain) {
                Ok(()) => (chain.len(), false),
                Err((at, e)) => {
                    tracing::debug!(qpn, "ibv_post_send: {e}");
                    // None: all are on the ring (the doorbell failed); the error state flushes them.
                    (at.unwrap_or(chain.len()), true)
                }
            };
            slot.unsignaled.extend(chain[..posted].iter().filter(|r| !r.signaled).map(|r| r.wr_id));
            if posted == chain.len() {
                if failed {
                    let _ = slot.qp.to_error();
                    slot.state = QpState::Error;
                }
                continue;
            }
            // The first that could not be posted fails, the rest are flushed; and nothing after a request
            // that could not go may execute: a read's response must not reach the host without its data.
            let _ = slot.qp.to_error();
            slot.state = QpState::Error;
            for (i, r) in chain[posted..].iter().enumerate() {
                let Some(p) = self.pending.remove(&r.wr_id) else { continue };
                let Some(slot) = self.qps.get_mut(&qpn) else { break };
                slot.sends_posted -= 1;
                if let Some(s) = p.staging {
                    slot.staging.give(s);
                }
                let status = if i == 0 { WcStatus::LocalQpOperation } else { WcStatus::WrFlush };
                slot.send_cq.push(Completion { qpn, wc: flushed(p.wr_id, p.op, p.buf, p.sg_list, status) });
            }
        }
    }

    /// Posts what waited for room (or for the connection), in order.
    fn drain_backlogs(&mut self, owner: Owner) {
        match owner {
            Owner::Qp(qpn) => {
                loop {
                    let Some(slot) = self.qps.get_mut(&qpn) else { return };
                    if slot.state != QpState::Rts || slot.sends_posted >= SEND_DEPTH {
                        break;
                    }
                    let Some(wr) = slot.send_backlog.pop_front() else { break };
                    self.post_send_now(qpn, wr);
                }
                loop {
                    let Some(slot) = self.qps.get_mut(&qpn) else { return };
                    if slot.recvs_posted >= RECV_DEPTH {
                        break;
                    }
                    let Some(wr) = slot.recv_backlog.pop_front() else { break };
                    self.post_recv_now(qpn, wr);
                }
            }
            Owner::Srq(id) => loop {
                let Some(slot) = self.srqs.get_mut(&id) else { return };
                if slot.srq.is_none() || slot.posted >= SRQ_DEPTH {
                    break;
                }
                let Some(wr) = slot.backlog.pop_front() else { break };
                let before = slot.backlog.len();
                self.post_srq_recv_now(id, wr);
                // A post that failed put the request back: try again at the next completion.
                if self.srqs.get(&id).is_some_and(|s| s.backlog.len() > before) {
                    break;
                }
            },
        }
    }

    fn drain_completions(&mut self) {
        let Some(live) = &self.live else { return };
        let comp = Rc::clone(&live.comp);
        let mut signalled = Vec::new();
        loop {
            match comp.next() {
                Ok(Some(key)) => signalled.push(key),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("completion channel: {e}");
                    break;
                }
            }
        }
        signalled.sort_unstable();
        signalled.dedup();
        for key in signalled {
            if let Some(&qpn) = self.cq_owner.get(&key) {
                self.poll_qp(qpn);
            }
        }
    }

    /// Re-arms the queue pair's CQ and takes every completion on it (polling after arming, so none is missed).
    fn poll_qp(&mut self, qpn: u32) {
        let Some(slot) = self.qps.get(&qpn) else { return };
        let cq = Rc::clone(&slot.cq);
        if let Err(e) = cq.arm() {
            tracing::warn!(qpn, "{e}");
        }
        let mut wcs = Vec::new();
        loop {
            wcs.clear();
            match cq.poll(&mut wcs, 64) {
                Ok(0) => break,
                Ok(_) => {
                    for wc in wcs.drain(..) {
                        self.complete(qpn, wc);
                    }
                }
                Err(e) => {
                    tracing::warn!(qpn, "{e}");
                    break;
                }
            }
        }
    }

    fn complete(&mut self, qpn: u32, wc: ffi::Wc) {
        // A send's completion completes every unsignalled send posted before it on this queue pair (in order):
        // successfully, unless this one is a flush (then whether they ran is unknown).
        if self.pending.get(&wc.wr_id).is_some_and(|p| p.op.is_some()) {
            let status = if wc.status == ffi::wc_status::IBV_WC_WR_FLUSH_ERR {
                ffi::wc_status::IBV_WC_WR_FLUSH_ERR
            } else {
                ffi::wc_status::IBV_WC_SUCCESS
            };
            while let Some(slot) = self.qps.get_mut(&qpn)
                && let Some(&key) = slot.unsignaled.front()
                && key <= wc.wr_id
            {
                slot.unsignaled.pop_front();
                if key < wc.wr_id {
                    let implied =
                        ffi::Wc { wr_id: key, status, opcode: 0, byte_len: 0, imm: None, invalidated_rkey: None };
                    self.complete_one(qpn, implied);
                }
            }
        }
        self.complete_one(qpn, wc);
    }

    fn complete_one(&mut self, qpn: u32, wc: ffi::Wc) {
        let Some(mut p) = self.pending.remove(&wc.wr_id) else {
            tracing::warn!(qpn, wr_id = wc.wr_id, "completion of an unknown request");
            return;
        };
        let status = wc_status(wc.status);
        let filled = match (status, p.op) {
            (WcStatus::Success, None) => (wc.byte_len as usize).min(p.len),
            (WcStatus::Success, Some(SendOp::RdmaRead { .. })) => p.len,
            _ => 0,
        };
        if filled > 0
            && let Some(s) = &p.staging
        {
            let src = &s.bytes()[..filled];
            if p.sg_list.is_empty() {
                p.buf[..filled].copy_from_slice(src);
            } else {
                let mut at = 0;
                for seg in p.sg_list.iter_mut() {
                    let n = seg.len().min(filled - at);
                    seg[..n].copy_from_slice(&src[at..at + n]);
                    at += n;
                    if at >= filled {
                        break;
                    }
                }
            }
        }
        match p.owner {
            Owner::Qp(owner) => {
                if let Some(slot) = self.qps.get_mut(&owner) {
                    if p.op.is_some() {
                        slot.sends_posted -= 1;
                    } else {
                        slot.recvs_posted -= 1;
                    }
                    if let Some(s) = p.staging.take() {
                        slot.staging.give(s);
                    }
                }
            }
            Owner::Srq(id) => {
                if let Some(slot) = self.srqs.get_mut(&id) {
                    slot.posted -= 1;
                    if let Some(s) = p.staging.take() {
                        slot.staging.give(s);
                    }
                }
            }
        }
        let opcode = match p.op {
            Some(op) => SendWr::new(0, op, Vec::new()).opcode(),
            None if wc.opcode == ffi::wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => WcOpcode::RecvRdmaWithImm,
            None => WcOpcode::Recv,
        };
        let byte_len = if p.op.is_some() { p.len as u32 } else { wc.byte_len };
        let out = WorkCompletion {
            wr_id: p.wr_id,
            status,
            opcode,
            byte_len: if status == WcStatus::Success { byte_len } else { 0 },
            imm: wc.imm,
            invalidated_rkey: wc.invalidated_rkey,
            buf: p.buf,
            sg_list: p.sg_list,
        };
        let mut fatal = None;
        if let Some(slot) = self.qps.get_mut(&qpn) {
            let cq = if p.op.is_some() { &slot.send_cq } else { &slot.recv_cq };
            cq.push(Completion { qpn, wc: out });
            if !matches!(status, WcStatus::Success | WcStatus::WrFlush) {
                slot.state = QpState::Error;
                if !std::mem::replace(&mut slot.fatal_reported, true) {
                    fatal = Some(status);
                }
            }
        }
        if let Some(cause) = fatal {
            self.emit(DeviceEvent::QpFatal { qpn, cause });
        }
        self.drain_backlogs(p.owner);
    }

    fn destroy_qp(&mut self, qpn: u32) {
        let Some(slot) = self.qps.get_mut(&qpn) else { return };
        let _ = slot.qp.to_error();
        slot.state = QpState::Error;
        // What the device completed goes out first, with its data.
        self.poll_qp(qpn);
        let Some(mut slot) = self.qps.remove(&qpn) else { return };
        self.cq_owner.remove(&slot.cq.key());
        let conn = slot.conn.take();
        let (send_cq, recv_cq) = (slot.send_cq.clone(), slot.recv_cq.clone());
        let (send_backlog, recv_backlog) =
            (std::mem::take(&mut slot.send_backlog), std::mem::take(&mut slot.recv_backlog));
        // Destroying the queue pair ends the device's use of every buffer posted on it.
        drop(slot);
        let keys: Vec<u64> = self.pending.iter().filter(|(_, p)| p.owner == Owner::Qp(qpn)).map(|(k, _)| *k).collect();
        for key in keys {
            if let Some(p) = self.pending.remove(&key) {
                let cq = if p.op.is_some() { &send_cq } else { &recv_cq };
                cq.push(Completion { qpn, wc: flushed(p.wr_id, p.op, p.buf, p.sg_list, WcStatus::WrFlush) });
            }
        }
        for wr in send_backlog {
            send_cq.push(Completion { qpn, wc: flushed(wr.wr_id, Some(wr.op), wr.buf, wr.sg_list, WcStatus::WrFlush) });
        }
        for wr in recv_backlog {
            recv_cq.push(Completion { qpn, wc: flushed(wr.wr_id, None, wr.buf, wr.sg_list, WcStatus::WrFlush) });
        }
        if let Some(conn) = conn
            && let Some(c) = self.conns.remove(&conn)
        {
            self.conn_by_id.remove(&c.id.key());
            self.release_id(c.id);
        }
    }

    /// Whether the port is up now: the async event lags the link by tens of milliseconds, and a queue pair
    /// that failed because the link just went down is torn down inside that window; so ask the device.
    fn port_up_now(&mut self) -> bool {
        let Some(live) = &self.live else { return false };
        if let Ok((up, _)) = live.context.port_state(self.port) {
            self.stats.port_up &= up;
        }
        self.stats.port_up
    }

    /// Disconnects and destroys a connection's id after [`DREQ_GRACE`], with the port up (see `parked`).
    fn release_id(&mut self, id: CmId) {
        self.parked.push((Instant::now() + DREQ_GRACE, id));
    }

    /// Sends the DREQs whose time has come, if the port is up.
    fn release_due(&mut self) {
        let now = Instant::now();
        let due = self.parked.iter().any(|(t, _)| *t <= now)
            || self.conns.values().any(|c| c.disconnect_after.is_some_and(|t| t <= now));
        if !due || !self.port_up_now() {
            return;
        }
        let (ready, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.parked).into_iter().partition(|(t, _)| *t <= now);
        self.parked = waiting;
        for (_, id) in ready {
            let _ = id.disconnect();
        }
        for c in self.conns.values_mut() {
            if c.disconnect_after.is_some_and(|t| t <= now) {
                c.disconnect_after = None;
                let _ = c.id.disconnect();
            }
        }
    }

    fn listen(&mut self, port: u16, backlog: usize) -> Result<(), DeviceError> {
        self.alive()?;
        let id = CmId::new(&self.channel).map_err(verbs)?;
        id.bind(SocketAddr::new(self.config.addr, port)).map_err(verbs)?;
        id.listen(u32::try_from(backlog).unwrap_or(u32::MAX)).map_err(verbs)?;
        self.listeners.insert(id.key(), (port, id));
        Ok(())
    }

    fn new_conn(&mut self, conn: Conn) -> ConnId {
        let id = self.next_conn;
        self.next_conn = self.next_conn.wrapping_add(1).max(1);
        self.conn_by_id.insert(conn.id.key(), id);
        self.conns.insert(id, conn);
        id
    }

    fn connect(
        &mut self,
        qpn: u32,
        dst: SocketAddr,
        port: u16,
        options: ConnectionOptions,
        private_data: Vec<u8>,
    ) -> Result<ConnId, DeviceError> {
        self.alive()?;
        let slot = self.qps.get(&qpn).ok_or(DeviceError::UnknownQp(qpn))?;
        if slot.state != QpState::Init || slot.conn.is_some() {
            return Err(DeviceError::BadTransition { qpn, from: slot.state, to: "connect" });
        }
        let id = CmId::new(&self.channel).map_err(verbs)?;
        let timeout = self.resolve_timeout_ms();
        id.resolve_addr(Some(SocketAddr::new(self.config.addr, 0)), SocketAddr::new(dst.ip(), port), timeout)
            .map_err(verbs)?;
        let conn =
            self.new_conn(Conn { id, qpn: Some(qpn), options, private_data, peer: None, disconnect_after: None });
        if let Some(slot) = self.qps.get_mut(&qpn) {
            slot.conn = Some(conn);
        }
        Ok(conn)
    }

    fn accept(
        &mut self,
        conn: ConnId,
        qpn: u32,
        options: ConnectionOptions,
        private_data: Vec<u8>,
    ) -> Result<(), DeviceError> {
        let c = self.conns.get_mut(&conn).ok_or(DeviceError::Cm(crate::soft::cm::CmError::UnknownConnection(conn)))?;
        let slot = self.qps.get_mut(&qpn).ok_or(DeviceError::UnknownQp(qpn))?;
        if slot.state != QpState::Init || slot.conn.is_some() {
            return Err(DeviceError::BadTransition { qpn, from: slot.state, to: "accept" });
        }
        // As librdmacm's rdma_accept does for a queue pair of its own: INIT with the connection's port and keys,
        // RTR, RTS, then the reply.
        let mut init = c.id.qp_attr(QpTarget::Init).map_err(verbs)?;
        slot.qp.modify(&mut init).map_err(verbs)?;
        let mut rtr = c.id.qp_attr(QpTarget::Rtr).map_err(verbs)?;
        rtr.set_max_dest_rd_atomic(options.responder_resources.max(1));
        slot.qp.modify(&mut rtr).map_err(verbs)?;
        let mut rts = c.id.qp_attr(QpTarget::Rts).map_err(verbs)?;
        rts.set_max_rd_atomic(options.initiator_depth.max(1));
        slot.qp.modify(&mut rts).map_err(verbs)?;
        c.id.accept(&ConnParam {
            private_data,
            responder_resources: options.responder_resources,
            initiator_depth: options.initiator_depth,
            retry_count: options.retry_count,
            rnr_retry_count: options.rnr_retry_count,
            qp_num: qpn,
            srq: slot.srq.is_some(),
        })
        .map_err(verbs)?;
        c.qpn = Some(qpn);
        c.options = options;
        slot.conn = Some(conn);
        Ok(())
    }

    fn drain_cm_events(&mut self) {
        loop {
            match self.channel.next() {
                Ok(Some(event)) => self.on_cm_event(event),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(addr = %self.config.addr, "connection manager: {e}");
                    break;
                }
            }
        }
    }

    fn on_cm_event(&mut self, ev: CmEvent) {
        let kind = ev.kind;
        tracing::debug!(addr = %self.config.addr, kind, status = ev.status, "cm event");
        match kind {
            cm_event::DEVICE_REMOVAL => return self.remove_device(),
            cm_event::ADDR_CHANGE => {
                return self.emit(DeviceEvent::AddrChange { present: address_present(self.config.addr) });
            }
            cm_event::CONNECT_REQUEST => return self.on_connect_request(ev),
            _ => {}
        }
        let Some(&conn) = self.conn_by_id.get(&ev.id_key) else {
            tracing::debug!(kind, "event for an id no connection holds");
            return;
        };
        let timeout = self.resolve_timeout_ms();
        match kind {
            cm_event::ADDR_RESOLVED => {
                let result = self.conns.get(&conn).map(|c| c.id.resolve_route(timeout));
                if let Some(Err(e)) = result {
                    tracing::debug!(conn, "{e}");
                    self.fail_connection(conn);
                    self.emit(DeviceEvent::Unreachable { conn });
                }
            }
            cm_event::ROUTE_RESOLVED => {
                if let Err(e) = self.send_connect(conn) {
                    tracing::warn!(conn, "connecting: {e}");
                    self.fail_connection(conn);
                    self.emit(DeviceEvent::Unreachable { conn });
                }
            }
            cm_event::CONNECT_RESPONSE => match self.finish_connect(conn, ev.conn) {
                Ok(event) => self.emit(event),
                Err(e) => {
                    tracing::warn!(conn, "completing the connection: {e}");
                    self.fail_connection(conn);
                    self.emit(DeviceEvent::Unreachable { conn });
                }
            },
            cm_event::ESTABLISHED => {
                let Some(c) = self.conns.get(&conn) else { return };
                let (Some(qpn), Some(peer)) = (c.qpn, c.peer.clone()) else { return };
                if let Some(slot) = self.qps.get_mut(&qpn)
                    && slot.state == QpState::Init
                {
                    slot.state = QpState::Rts;
                }
                self.drain_backlogs(Owner::Qp(qpn));
                self.emit(DeviceEvent::Established { conn, qpn, peer });
            }
            cm_event::ADDR_ERROR | cm_event::ROUTE_ERROR | cm_event::CONNECT_ERROR | cm_event::UNREACHABLE => {
                self.fail_connection(conn);
                self.emit(DeviceEvent::Unreachable { conn });
            }
            cm_event::REJECTED => {
                self.fail_connection(conn);
                let reason = u16::try_from(ev.status).unwrap_or(u16::MAX);
                self.emit(DeviceEvent::Rejected { conn, reason, private_data: ev.conn.private_data });
            }
            cm_event::DISCONNECTED => {
                // As rdma_cm does for its own queue pairs: the error state flushes outstanding work.
                if let Some(slot) = self.conns.get(&conn).and_then(|c| c.qpn).and_then(|q| self.qps.get_mut(&q)) {
                    let _ = slot.qp.to_error();
                    slot.state = QpState::Error;
                }
                self.emit(DeviceEvent::Disconnected { conn });
            }
            cm_event::TIMEWAIT_EXIT => {
                if let Some(c) = self.conns.remove(&conn) {
                    self.conn_by_id.remove(&c.id.key());
                    if let Some(slot) = c.qpn.and_then(|q| self.qps.get_mut(&q)) {
                        slot.conn = None;
                    }
                }
                self.emit(DeviceEvent::TimewaitExit { conn });
            }
            other => tracing::debug!(conn, other, "connection event ignored"),
        }
    }

    /// Address and route resolution's time limit, in the connection manager's milliseconds.
    fn resolve_timeout_ms(&self) -> u32 {
        u32::try_from(self.config.resolve_timeout.as_millis()).unwrap_or(u32::MAX)
    }

    fn on_connect_request(&mut self, ev: CmEvent) {
        let Some(id) = ev.new_id else { return };
        let Some(live) = &self.live else { return };
        let local_port = self.listeners.get(&ev.listen_key).map_or(0, |(port, _)| *port);
        // One query says both which device the request came in on and who sent it.
        let info = id.addr_info().ok();
        if !info.as_ref().is_some_and(|i| live.context.holds(i)) {
            // A listener bound to our address only hears our device; refuse anything else.
            let _ = id.reject(&[]);
            return;
        }
        let peer_addr = info.and_then(|i| i.dst).unwrap_or_else(|| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0));
        let mtu = live.context.port_state(self.port).map(|(_, m)| m).unwrap_or(1024);
        let peer = PeerParams {
            addr: peer_addr.ip(),
            port: peer_addr.port(),
            qpn: ev.conn.qp_num,
            start_psn: 0,
            path_mtu: crate::mtu::mtu_code(mtu),
            responder_resources: ev.conn.responder_resources,
            initiator_depth: ev.conn.initiator_depth,
            retry_count: ev.conn.retry_count,
            rnr_retry_count: ev.conn.rnr_retry_count,
            flow_label: 0,
            private_data: ev.conn.private_data,
        };
        let conn = self.new_conn(Conn {
            id,
            qpn: None,
            options: ConnectionOptions::default(),
            private_data: Vec::new(),
            peer: Some(peer.clone()),
            disconnect_after: None,
        });
        self.emit(DeviceEvent::ConnectRequest { conn, local_port, peer });
    }

    fn send_connect(&mut self, conn: ConnId) -> Result<(), DeviceError> {
        let live = self.alive()?;
        let c = self.conns.get(&conn).ok_or(DeviceError::Cm(crate::soft::cm::CmError::UnknownConnection(conn)))?;
        if !c.id.on_device(&live.context) {
            return Err(DeviceError::Unsupported("the route to the peer leaves through another RDMA device"));
        }
        let qpn = c.qpn.ok_or(DeviceError::UnknownQp(0))?;
        let slot = self.qps.get(&qpn).ok_or(DeviceError::UnknownQp(qpn))?;
        c.id.connect(&ConnParam {
            private_data: c.private_data.clone(),
            responder_resources: c.options.responder_resources,
            initiator_depth: c.options.initiator_depth,
            retry_count: c.options.retry_count,
            rnr_retry_count: c.options.rnr_retry_count,
            qp_num: qpn,
            srq: slot.srq.is_some(),
        })
        .map_err(verbs)
    }

    /// The active side's half of the handshake for a queue pair of our own: INIT, RTR, RTS, then RTU.
    fn finish_connect(&mut self, conn: ConnId, params: ConnParam) -> Result<DeviceEvent, DeviceError> {
        let c = self.conns.get_mut(&conn).ok_or(DeviceError::Cm(crate::soft::cm::CmError::UnknownConnection(conn)))?;
        let qpn = c.qpn.ok_or(DeviceError::UnknownQp(0))?;
        let slot = self.qps.get_mut(&qpn).ok_or(DeviceError::UnknownQp(qpn))?;
        let mut init = c.id.qp_attr(QpTarget::Init).map_err(verbs)?;
        slot.qp.modify(&mut init).map_err(verbs)?;
        let mut rtr = c.id.qp_attr(QpTarget::Rtr).map_err(verbs)?;
        slot.qp.modify(&mut rtr).map_err(verbs)?;
        let mut rts = c.id.qp_attr(QpTarget::Rts).map_err(verbs)?;
        slot.qp.modify(&mut rts).map_err(verbs)?;
        c.id.establish().map_err(verbs)?;
        slot.state = QpState::Rts;
        let peer_addr = c.id.peer_addr().unwrap_or_else(|| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0));
        let peer = PeerParams {
            addr: peer_addr.ip(),
            port: peer_addr.port(),
            qpn: params.qp_num,
            start_psn: 0,
            path_mtu: 0,
            responder_resources: params.responder_resources,
            initiator_depth: params.initiator_depth,
            retry_count: params.retry_count,
            rnr_retry_count: params.rnr_retry_count,
            flow_label: 0,
            private_data: params.private_data,
        };
        c.peer = Some(peer.clone());
        self.drain_backlogs(Owner::Qp(qpn));
        Ok(DeviceEvent::Established { conn, qpn, peer })
    }

    /// A connection that will not come up: its id goes, and sends that waited for it fail.
    fn fail_connection(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else { return };
        self.conn_by_id.remove(&c.id.key());
        if let Some(qpn) = c.qpn
            && let Some(slot) = self.qps.get_mut(&qpn)
        {
            slot.conn = None;
            for wr in slot.send_backlog.drain(..) {
                let wc = flushed(wr.wr_id, Some(wr.op), wr.buf, wr.sg_list, WcStatus::WrFlush);
                slot.send_cq.push(Completion { qpn, wc });
            }
        }
    }

    fn drain_async_events(&mut self) {
        let Some(live) = &self.live else { return };
        let context = Rc::clone(&live.context);
        loop {
            match context.next_async_event() {
                Ok(Some(event)) => self.on_async_event(event),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("async events: {e}");
                    break;
                }
            }
        }
    }

    fn on_async_event(&mut self, event: AsyncEvent) {
        tracing::debug!(addr = %self.config.addr, ?event, "device event");
        match event {
            AsyncEvent::QpFatal { qp_num, kind } => {
                let Some(slot) = self.qps.get_mut(&qp_num) else { return };
                slot.state = QpState::Error;
                if !std::mem::replace(&mut slot.fatal_reported, true) {
                    tracing::warn!(qpn = qp_num, "queue pair error: {kind}");
                    self.emit(DeviceEvent::QpFatal { qpn: qp_num, cause: WcStatus::LocalQpOperation });
                }
            }
            AsyncEvent::PortActive => {
                self.stats.port_up = true;
                self.emit(DeviceEvent::PortActive);
            }
            AsyncEvent::PortError => {
                self.stats.port_up = false;
                self.emit(DeviceEvent::PortError);
            }
            AsyncEvent::DeviceFatal => {
                self.emit(DeviceEvent::DeviceFatal { reason: "the RDMA device reported a fatal error".into() });
            }
            AsyncEvent::Other(kind) => tracing::debug!(kind, "device event ignored"),
        }
    }

    /// The device is going away (`rdma link delete`, hot unplug): every queue pair is flushed and destroyed,
    /// regions are deregistered (their buffers wait for `deregister`), every id is destroyed, and the device's
    /// context is let go so the kernel can finish removing it. The application's handles stay valid; the
    /// device serves nothing more.
    fn remove_device(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        self.stats.port_up = false;
        let qpns: Vec<u32> = self.qps.keys().copied().collect();
        for qpn in qpns {
            if let Some(slot) = self.qps.get(&qpn) {
                self.removed_qps.insert(qpn, (slot.send_cq.clone(), slot.recv_cq.clone()));
            }
            self.destroy_qp(qpn);
        }
        for slot in self.srqs.values_mut() {
            slot.srq = None;
            slot.staging = Staging::default();
        }
        let srq_pending: Vec<u64> =
            self.pending.iter().filter(|(_, p)| matches!(p.owner, Owner::Srq(_))).map(|(k, _)| *k).collect();
        for key in srq_pending {
            if let Some(mut p) = self.pending.remove(&key)
                && let Owner::Srq(id) = p.owner
                && let Some(slot) = self.srqs.get_mut(&id)
            {
                p.staging = None;
                slot.posted -= 1;
                slot.backlog.push_front(RecvWr { wr_id: p.wr_id, buf: p.buf, sg_list: p.sg_list });
            }
        }
        for region in self.regions.values_mut() {
            if let Some(mr) = region.mr.take() {
                region.kept = Some(mr.into_buffer());
            }
        }
        for pd in self.pds.values_mut() {
            *pd = None;
        }
        self.conns.clear();
        self.conn_by_id.clear();
        self.parked.clear();
        self.listeners.clear();
        tracing::warn!(addr = %self.config.addr, "RDMA device removed");
        self.emit(DeviceEvent::DeviceRemoval);
    }
}

fn recv_len(wr: &RecvWr) -> usize {
    if wr.sg_list.is_empty() { wr.buf.len() } else { wr.sg_list.iter().map(Vec::len).sum() }
}

/// Readiness of a descriptor the device may no longer have (never ready then).
async fn readable(fd: &Option<ffi::Watched>) -> std::io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, ffi::FdNumber>> {
    match fd {
        Some(fd) => fd.readable().await,
        None => std::future::pending().await,
    }
}
