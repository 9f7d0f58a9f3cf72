//! The worker of a verbs device: the thread that owns the device's connection manager (its ids on the kernel's
//! rdma_cm file) and the device's lifecycle (async events, removal), and a data path (`data_path`) for the
//! queue pairs it keeps itself. Queue pairs made on a lane (`lane`) belong to the lane's thread: the worker only
//! knows which lane has them and tells it by message what the connection manager decided.
//!
//! Queue pairs are connected through rdma_cm with queue pairs of our own (its INIT_QP_ATTR gives their
//! attributes, applied by their owner), so a queue pair exists — and takes receives — before its connection
//! does, as the soft provider's do.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::VerbsConfig;
use super::data_path::{DataPath, readable, verbs};
use super::ffi::{self, AsyncEvent, CmEvent, CmId, ConnParam, QpAttr, QpTarget, cm_event};
use super::lane::{COMMAND_BURST, Lane, LaneCommand, LaneCounters, LaneParts, LaneReport};
use crate::connection::{ConnId, PeerParams};
use crate::device::{
    Command, CompletionQueue, ConnectionOptions, DeviceError, DeviceEvent, DeviceStats, ProtectionDomain, Reply,
};

/// How long a DREQ waits after the connection was closed, for the port's state to catch up with the link.
const DREQ_GRACE: Duration = Duration::from_secs(1);
/// How often parked ids, pending disconnects and a removal's progress are looked at.
const RELEASE_TICK: Duration = Duration::from_millis(200);
/// Lanes a device hands out.
const MAX_LANES: usize = 64;
/// A removal that waits longer than this for a lane says so (again at each multiple).
const RELEASE_WARN: Duration = Duration::from_secs(5);

/// Generations of verbs devices opened in this process: a number names one opening of one device and is never
/// used again, so a lane's answer can only be taken for the device it was about.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// What an accepted or connecting connection waits for from the lane that owns its queue pair.
enum Awaiting {
    /// The passive side: the reply goes out once the queue pair is at RTS.
    Accept { param: ConnParam, reply: Reply<()> },
    /// The active side: the RTU goes out once the queue pair is at RTS.
    Establish { params: ConnParam },
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
    awaiting: Option<Awaiting>,
}

/// A queue pair of a lane, as the worker knows it.
struct LaneQp {
    lane: usize,
    pd: u32,
    srq: bool,
}

struct LaneEntry {
    commands: mpsc::UnboundedSender<Command>,
    counters: Arc<LaneCounters>,
}

/// A removal waiting for lanes to let go of the device.
struct Releasing {
    waiting: HashSet<usize>,
    since: Instant,
    warned: u32,
}

pub(super) struct Worker {
    config: VerbsConfig,
    events: mpsc::UnboundedSender<DeviceEvent>,
    /// The worker's own channel, for lanes to answer on (weak: the handles' senders decide its life).
    own: mpsc::WeakUnboundedSender<Command>,
    channel: Rc<ffi::EventChannel>,
    generation: u64,
    device: ffi::DeviceKey,
    data: DataPath,
    port: u8,
    pds: HashSet<u32>,
    next_pd: u32,
    next_srq: u32,
    listeners: HashMap<usize, (u16, CmId)>,
    conns: HashMap<ConnId, Conn>,
    conn_by_id: HashMap<usize, ConnId>,
    next_conn: ConnId,
    /// The connection of each queue pair that has one, the worker's and the lanes'.
    qp_conn: HashMap<u32, ConnId>,
    /// Ids of closed connections, each kept until its time has come and the port is up: destroying a connected
    /// id sends a DREQ, and a MAD sent while rxe's port is down leaves the kernel's connection manager deaf to
    /// every later REQ on the device (seen in the testbed's target-flap; hosts then retry `connecting` for
    /// ever). The port's state lags the link: a queue pair fails because the bond just went down before the
    /// port says so, and the application closes the connection at once — hence [`DREQ_GRACE`].
    parked: Vec<(Instant, CmId)>,
    lanes: Vec<LaneEntry>,
    lane_qps: HashMap<u32, LaneQp>,
    /// Shared receive queues kept by lanes: (lane, domain) by id.
    lane_srqs: HashMap<u32, (usize, u32)>,
    releasing: Option<Releasing>,
    stats: DeviceStats,
    removed: bool,
}

/// Whether `addr` is still configured on this host (binding a UDP socket to it sends nothing).
fn address_present(addr: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(addr, 0)).is_ok()
}

fn unknown_conn(conn: ConnId) -> DeviceError {
    DeviceError::Cm(crate::soft::cm::CmError::UnknownConnection(conn))
}

impl Worker {
    /// Opens the device that serves `config.addr`: a connection-manager id bound to the address picks it.
    pub(super) fn open(
        config: VerbsConfig,
        events: mpsc::UnboundedSender<DeviceEvent>,
        own: mpsc::WeakUnboundedSender<Command>,
    ) -> Result<Worker, DeviceError> {
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
        let (port_up, mtu) = context.port_state(port).map_err(verbs)?;
        let node_guid = context.node_guid();
        let device = context.key();
        let generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
        tracing::info!(addr = %config.addr, device = %context.device_name(), port, mtu, port_up, generation,
            "verbs device open");
        let data = DataPath::new(context, port, events.clone())?;
        Ok(Worker {
            config,
            events,
            own,
            channel,
            generation,
            device,
            data,
            port,
            pds: HashSet::new(),
            next_pd: 1,
            next_srq: 1,
            listeners: HashMap::new(),
            conns: HashMap::new(),
            conn_by_id: HashMap::new(),
            next_conn: 1,
            qp_conn: HashMap::new(),
            parked: Vec::new(),
            lanes: Vec::new(),
            lane_qps: HashMap::new(),
            lane_srqs: HashMap::new(),
            releasing: None,
            stats: DeviceStats { port_up, node_guid, active_mtu: mtu, ..DeviceStats::default() },
            removed: false,
        })
    }

    pub(super) async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let cm_fd = self.channel.watch();
        let watched = self.data.watch();
        let (cm_fd, mut comp_fd, mut async_fd) = match (cm_fd, watched) {
            (Ok(a), Ok((b, c))) => (a, Some(b), Some(c)),
            (a, b) => {
                let e = a.err().or(b.err());
                tracing::error!(addr = %self.config.addr, "verbs device: cannot watch its descriptors: {e:?}");
                self.shutdown();
                return;
            }
        };
        let mut release = tokio::time::interval(RELEASE_TICK);
        release.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = release.tick() => {
                    self.release_due();
                    self.check_released();
                }
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
                        self.data.drain_completions();
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
            self.data.post_chains();
            if self.removed && self.releasing.is_none() && comp_fd.is_some() {
                // Every lane has let go: the reactor lets go of the device's descriptors, and with them the last
                // holders of the completion channel and the context, which close.
                comp_fd = None;
                async_fd = None;
                tracing::info!(addr = %self.config.addr, generation = self.generation, "verbs device released");
                self.emit(DeviceEvent::DeviceRemoval);
            }
        }
        drop((comp_fd, async_fd));
        self.shutdown();
    }

    /// Teardown: the lanes are told to stop, every queue pair of the worker's flushes its outstanding requests
    /// (every buffer goes back), then every object is destroyed, children first.
    fn shutdown(&mut self) {
        for lane in &self.lanes {
            let _ = lane.commands.send(Command::Shutdown);
        }
        self.data.post_chains();
        self.conns.clear();
        self.conn_by_id.clear();
        self.parked.clear();
        self.listeners.clear();
        self.data.shutdown();
    }

    fn emit(&self, event: DeviceEvent) {
        let _ = self.events.send(event);
    }

    fn lane(&self, lane: usize) -> Option<&LaneEntry> {
        self.lanes.get(lane.checked_sub(1)?)
    }

    /// The channel of the lane that owns `qpn`, if a lane does.
    fn lane_of(&self, qpn: u32) -> Option<&mpsc::UnboundedSender<Command>> {
        self.lane(self.lane_qps.get(&qpn)?.lane).map(|l| &l.commands)
    }

    fn tell_lane(&self, qpn: u32, command: LaneCommand) {
        if let Some(lane) = self.lane_of(qpn) {
            let _ = lane.send(Command::VerbsLane(command));
        }
    }

    fn on_command(&mut self, command: Command) {
        // Only posts may overtake the sends of this turn (a send queue's order is its own): anything else
        // sees them posted.
        if !matches!(command, Command::PostSend(..) | Command::PostRecv(..) | Command::PostSrqRecv(..)) {
            self.data.post_chains();
        }
        match command {
            Command::AllocPd(reply) => {
                let id = self.next_pd;
                let result = self.data.add_pd(id).map(|()| {
                    self.next_pd += 1;
                    self.pds.insert(id);
                    ProtectionDomain { id }
                });
                let _ = reply.send(result);
            }
            Command::DeallocPd(pd, reply) => {
                let result = if !self.pds.contains(&pd) {
                    Err(DeviceError::UnknownPd(pd))
                } else if self.data.pd_busy(pd)
                    || self.lane_qps.values().any(|q| q.pd == pd)
                    || self.lane_srqs.values().any(|(_, p)| *p == pd)
                {
                    Err(DeviceError::PdBusy(pd))
                } else {
                    let _ = self.data.dealloc_pd(pd);
                    self.pds.remove(&pd);
                    for lane in &self.lanes {
                        let _ = lane.commands.send(Command::VerbsLane(LaneCommand::DeallocPd(pd)));
                    }
                    Ok(())
                };
                let _ = reply.send(result);
            }
            Command::Register(pd, buf, access, reply) => {
                let _ = reply.send(self.data.register(pd, buf, access));
            }
            Command::Deregister(key, reply) => {
                let _ = reply.send(self.data.deregister(key));
            }
            Command::CreateSrq(pd, reply) => {
                let id = self.next_srq;
                let result = self.data.create_srq(id, pd).map(|()| {
                    self.next_srq += 1;
                    id
                });
                let _ = reply.send(result);
            }
            Command::DestroySrq(id, reply) => {
                let _ = reply.send(self.data.destroy_srq(id));
            }
            Command::PostSrqRecv(id, wr) => self.data.post_srq_recv(id, wr),
            Command::CreateQp(pd, send_cq, recv_cq, srq, reply) => {
                let _ = reply.send(self.data.create_qp(pd, send_cq, recv_cq, srq));
            }
            Command::ModifyQp(qpn, transition, reply) => match self.lane_of(qpn) {
                Some(lane) => {
                    let _ = lane.send(Command::ModifyQp(qpn, transition, reply));
                }
                None => {
                    let _ = reply.send(self.data.modify_by_hand(qpn, transition));
                }
            },
            Command::DestroyQp(qpn, reply) => self.destroy_qp(qpn, reply),
            Command::PostSend(qpn, wr) => self.data.post_send(qpn, wr),
            Command::PostRecv(qpn, wr) => self.data.post_recv(qpn, wr),
            Command::Listen(port, backlog, reply) => {
                let _ = reply.send(self.listen(port, backlog));
            }
            Command::Connect { qpn, dst, port, options, private_data, reply } => {
                let _ = reply.send(self.connect(qpn, dst, port, options, private_data));
            }
            Command::Accept { conn, qpn, options, private_data, reply } => {
                self.accept(conn, qpn, options, private_data, reply);
            }
            Command::Reject(conn, private_data, reply) => {
                let result = match self.conns.remove(&conn) {
                    Some(c) => {
                        self.conn_by_id.remove(&c.id.key());
                        if let Some(qpn) = c.qpn {
                            self.qp_conn.remove(&qpn);
                        }
                        c.id.reject(&private_data).map_err(verbs)
                    }
                    None => Err(unknown_conn(conn)),
                };
                let _ = reply.send(result);
            }
            Command::Disconnect(conn, reply) => {
                let result = match self.conns.get_mut(&conn) {
                    Some(c) => {
                        // The queue pair is flushed now; the DREQ waits (see `parked`).
                        c.disconnect_after.get_or_insert(Instant::now() + DREQ_GRACE);
                        if let Some(qpn) = c.qpn {
                            self.qp_to_error(qpn);
                        }
                        Ok(())
                    }
                    None => Err(unknown_conn(conn)),
                };
                let _ = reply.send(result);
            }
            Command::Stats(reply) => {
                let (staging, pending) = self.data.held();
                tracing::trace!(staging, pending, "verbs stats");
                // The active MTU follows the netdev's MTU.
                if let Some(Ok((_, mtu))) = self.data.context().map(|c| c.port_state(self.port)) {
                    self.stats.active_mtu = mtu;
                }
                let (regions, region_bytes) = self.data.regions();
                let (arenas, arena_bytes) = self.data.arenas();
                let _ = reply.send(DeviceStats {
                    protection_domains: self.pds.len(),
                    shared_receive_queues: self.data.shared_receive_queues() + self.lane_srqs.len(),
                    queue_pairs: self.data.queue_pairs() + self.lane_qps.len(),
                    regions: regions + self.lane_count(|c| &c.regions) as usize,
                    region_bytes: region_bytes + self.lane_count(|c| &c.region_bytes) as usize,
                    arenas: arenas + self.lane_count(|c| &c.arenas) as usize,
                    arena_bytes: arena_bytes + self.lane_count(|c| &c.arena_bytes) as usize,
                    connections: self.conns.len(),
                    lanes: self.lanes.len(),
                    srq_receives: self.data.srq_receives() as u64 + self.lane_count(|c| &c.srq_receives),
                    ..self.stats
                });
            }
            Command::OpenLane(reply) => {
                let _ = reply.send(self.open_lane());
            }
            Command::CreateQpOnLane { lane, pd, send_cq, recv_cq, srq, reply } => {
                self.create_lane_qp(lane, pd, send_cq, recv_cq, srq, reply);
            }
            Command::CreateSrqOnLane { lane, pd, reply } => self.create_lane_srq(lane, pd, reply),
            Command::LaneSrqDestroyed(id) => {
                self.lane_srqs.remove(&id);
            }
            Command::RegisterOnLane { lane, pd, buf, access, reply } => {
                let lane = self.lane(lane).map(|l| &l.commands);
                crate::device::register_on_lane(lane, self.pds.contains(&pd), pd, buf, access, reply);
            }
            Command::DeregisterOnLane { lane, key, reply } => {
                crate::device::deregister_on_lane(self.lane(lane).map(|l| &l.commands), key, reply);
            }
            Command::FromVerbsLane(report) => self.on_lane_report(report),
            Command::Lane(_) | Command::VerbsLane(_) => tracing::debug!("lane commands are for lanes"),
            Command::Shutdown => {}
        }
    }

    fn lane_count(&self, counter: impl Fn(&LaneCounters) -> &AtomicU64) -> u64 {
        self.lanes.iter().map(|l| counter(&l.counters).load(Ordering::Relaxed)).sum()
    }

    fn open_lane(&mut self) -> Result<crate::Lane, DeviceError> {
        if self.removed || self.data.context().is_none() {
            return Err(DeviceError::Closed);
        }
        if self.lanes.len() >= MAX_LANES {
            return Err(DeviceError::Unsupported("lanes: at most 64 per device"));
        }
        let worker = self.own.upgrade().ok_or(DeviceError::Closed)?;
        let (commands, receiver) = mpsc::unbounded_channel();
        let counters = Arc::new(LaneCounters::default());
        self.lanes.push(LaneEntry { commands, counters: counters.clone() });
        let id = self.lanes.len();
        tracing::debug!(addr = %self.config.addr, lane = id, "verbs lane opened");
        Ok(crate::Lane::verbs(Lane::new(LaneParts {
            id,
            generation: self.generation,
            device: self.device,
            port: self.port,
            commands: receiver,
            worker,
            events: self.events.clone(),
            counters,
        })))
    }

    fn create_lane_qp(
        &mut self,
        lane: usize,
        pd: u32,
        send_cq: CompletionQueue,
        recv_cq: CompletionQueue,
        srq: Option<u32>,
        reply: Reply<(u32, mpsc::UnboundedSender<Command>)>,
    ) {
        if !self.pds.contains(&pd) {
            let _ = reply.send(Err(DeviceError::UnknownPd(pd)));
            return;
        }
        // A lane's queue pair takes its receives only from a shared receive queue of that lane and domain.
        if let Some(id) = srq.filter(|id| self.lane_srqs.get(id) != Some(&(lane, pd))) {
            let _ = reply.send(Err(DeviceError::UnknownSrq(id)));
            return;
        }
        let Some(l) = self.lane(lane) else {
            let _ = reply.send(Err(DeviceError::Unsupported("no such lane on this device")));
            return;
        };
        let commands = l.commands.clone();
        // The lane creates it and tells us its number (`QpCreated`) before it answers the caller. A lane that
        // no longer runs drops the reply: the caller sees Closed.
        let create = LaneCommand::CreateQp { pd, send_cq, recv_cq, srq, commands, reply };
        let _ = l.commands.send(Command::VerbsLane(create));
    }

    fn create_lane_srq(&mut self, lane: usize, pd: u32, reply: Reply<(u32, mpsc::UnboundedSender<Command>)>) {
        if !self.pds.contains(&pd) {
            let _ = reply.send(Err(DeviceError::UnknownPd(pd)));
            return;
        }
        let Some(commands) = self.lane(lane).map(|l| l.commands.clone()) else {
            let _ = reply.send(Err(DeviceError::Unsupported("no such lane on this device")));
            return;
        };
        let id = self.next_srq;
        self.next_srq += 1;
        // The lane says so once it has made it (`SrqCreated`), before its caller hears of it.
        let _ = commands.clone().send(Command::VerbsLane(LaneCommand::CreateSrq { id, pd, commands, reply }));
    }

    fn on_lane_report(&mut self, report: LaneReport) {
        match report {
            LaneReport::QpCreated { lane, qpn, pd, srq } => {
                self.lane_qps.insert(qpn, LaneQp { lane, pd, srq });
            }
            LaneReport::SrqCreated { lane, id, pd } => {
                self.lane_srqs.insert(id, (lane, pd));
            }
            LaneReport::QpReady { conn, qpn, result } => self.lane_qp_ready(conn, qpn, result),
            LaneReport::Released { lane, generation } => {
                if generation != self.generation {
                    tracing::warn!(lane, generation, ours = self.generation, "a lane released another device");
                    return;
                }
                if let Some(r) = self.releasing.as_mut() {
                    r.waiting.remove(&lane);
                }
                self.check_released();
            }
        }
    }

    /// A removal is finished once every lane it waits for has said so, or no longer runs (its channel is
    /// closed: nothing of it holds the device).
    fn check_released(&mut self) {
        let Some(r) = self.releasing.as_mut() else { return };
        let lanes = &self.lanes;
        r.waiting.retain(|&l| lanes.get(l - 1).is_some_and(|e| !e.commands.is_closed()));
        if r.waiting.is_empty() {
            self.releasing = None;
            return;
        }
        let waited = r.since.elapsed();
        if waited >= RELEASE_WARN * (r.warned + 1) {
            r.warned += 1;
            tracing::warn!(addr = %self.config.addr, lanes = ?r.waiting, ?waited,
                "the device's removal waits for lanes to let go of it");
        }
    }

    /// A lane's queue pair has the connection's attributes (or could not take them): the handshake goes on.
    fn lane_qp_ready(&mut self, conn: ConnId, qpn: u32, result: Result<(), DeviceError>) {
        let Some(c) = self.conns.get_mut(&conn).filter(|c| c.qpn == Some(qpn)) else { return };
        match c.awaiting.take() {
            Some(Awaiting::Accept { param, reply }) => {
                let result = result.and_then(|()| c.id.accept(&param).map_err(verbs));
                if result.is_err() {
                    c.qpn = None;
                    self.qp_conn.remove(&qpn);
                }
                let _ = reply.send(result);
            }
            Some(Awaiting::Establish { params }) => {
                let result = result.and_then(|()| c.id.establish().map_err(verbs));
                match result {
                    Ok(()) => {
                        let event = Self::established_event(c, conn, qpn, params);
                        self.tell_lane(qpn, LaneCommand::Established(qpn));
                        self.emit(event);
                    }
                    Err(e) => {
                        tracing::warn!(conn, "completing the connection: {e}");
                        self.fail_connection(conn);
                        self.emit(DeviceEvent::Unreachable { conn });
                    }
                }
            }
            None => {}
        }
    }

    fn qp_to_error(&mut self, qpn: u32) {
        if self.lane_qps.contains_key(&qpn) {
            self.tell_lane(qpn, LaneCommand::ToError(qpn));
        } else {
            self.data.fail_qp(qpn);
        }
    }

    fn destroy_qp(&mut self, qpn: u32, reply: Reply<()>) {
        match self.lane_qps.remove(&qpn).and_then(|q| self.lane(q.lane)).map(|l| l.commands.clone()) {
            // The lane flushes and destroys it, then answers.
            Some(lane) => {
                let _ = lane.send(Command::DestroyQp(qpn, reply));
            }
            None => {
                self.data.destroy_qp(qpn);
                let _ = reply.send(Ok(()));
            }
        }
        if let Some(conn) = self.qp_conn.remove(&qpn)
            && let Some(c) = self.conns.remove(&conn)
        {
            self.conn_by_id.remove(&c.id.key());
            self.release_id(c.id);
        }
    }

    /// Whether a queue pair may be connected, and whether its receives come from a shared receive queue.
    fn connectable(&self, qpn: u32, to: &'static str) -> Result<bool, DeviceError> {
        if self.qp_conn.contains_key(&qpn) {
            return Err(DeviceError::BadTransition { qpn, from: crate::device::QpState::Init, to });
        }
        match self.lane_qps.get(&qpn) {
            Some(q) if self.lane(q.lane).is_some_and(|l| !l.commands.is_closed()) => Ok(q.srq),
            // Its lane no longer runs: nothing would drive the connection.
            Some(_) => Err(DeviceError::Closed),
            None => self.data.connectable(qpn, to),
        }
    }

    /// Whether the port is up now: the async event lags the link by tens of milliseconds, and a queue pair
    /// that failed because the link just went down is torn down inside that window; so ask the device.
    fn port_up_now(&mut self) -> bool {
        let Some(context) = self.data.context() else { return false };
        if let Ok((up, _)) = context.port_state(self.port) {
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
        if self.removed {
            return Err(DeviceError::Closed);
        }
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
        if self.removed {
            return Err(DeviceError::Closed);
        }
        self.connectable(qpn, "connect")?;
        let id = CmId::new(&self.channel).map_err(verbs)?;
        let timeout = self.resolve_timeout_ms();
        id.resolve_addr(Some(SocketAddr::new(self.config.addr, 0)), SocketAddr::new(dst.ip(), port), timeout)
            .map_err(verbs)?;
        let conn = self.new_conn(Conn {
            id,
            qpn: Some(qpn),
            options,
            private_data,
            peer: None,
            disconnect_after: None,
            awaiting: None,
        });
        self.qp_conn.insert(qpn, conn);
        Ok(conn)
    }

    /// The connection manager's attributes for `conn`'s queue pair, as librdmacm's rdma_accept and rdma_connect
    /// apply them to a queue pair of their own: INIT with the connection's port and keys, RTR, RTS.
    fn connection_attrs(c: &Conn, options: Option<ConnectionOptions>) -> Result<Vec<QpAttr>, DeviceError> {
        let init = c.id.qp_attr(QpTarget::Init).map_err(verbs)?;
        let mut rtr = c.id.qp_attr(QpTarget::Rtr).map_err(verbs)?;
        let mut rts = c.id.qp_attr(QpTarget::Rts).map_err(verbs)?;
        if let Some(options) = options {
            rtr.set_max_dest_rd_atomic(options.responder_resources.max(1));
            rts.set_max_rd_atomic(options.initiator_depth.max(1));
        }
        Ok(vec![init, rtr, rts])
    }

    fn accept(&mut self, conn: ConnId, qpn: u32, options: ConnectionOptions, private_data: Vec<u8>, reply: Reply<()>) {
        let prepared = self.connectable(qpn, "accept").and_then(|srq| {
            let c = self.conns.get(&conn).ok_or(unknown_conn(conn))?;
            // Accepted once already (or being accepted): a second accept would take the first one's place.
            if c.qpn.is_some() {
                return Err(DeviceError::BadTransition { qpn, from: crate::device::QpState::Init, to: "accept" });
            }
            Ok((srq, Self::connection_attrs(c, Some(options))?))
        });
        let (srq, mut attrs) = match prepared {
            Ok(p) => p,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let param = ConnParam {
            private_data,
            responder_resources: options.responder_resources,
            initiator_depth: options.initiator_depth,
            retry_count: options.retry_count,
            rnr_retry_count: options.rnr_retry_count,
            qp_num: qpn,
            srq,
        };
        let on_lane = self.lane_qps.contains_key(&qpn);
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.options = options;
        c.qpn = Some(qpn);
        self.qp_conn.insert(qpn, conn);
        if on_lane {
            // The lane moves its queue pair to RTS; the reply goes out when it says so (`lane_qp_ready`).
            c.awaiting = Some(Awaiting::Accept { param, reply });
            self.tell_lane(qpn, LaneCommand::Connect { conn, qpn, attrs });
            return;
        }
        let result = self.data.connect_qp(qpn, &mut attrs).and_then(|()| c.id.accept(&param).map_err(verbs));
        if result.is_err() {
            c.qpn = None;
            self.qp_conn.remove(&qpn);
        }
        let _ = reply.send(result);
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
                Ok(Some(event)) => self.emit(event),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(conn, "completing the connection: {e}");
                    self.fail_connection(conn);
                    self.emit(DeviceEvent::Unreachable { conn });
                }
            },
            cm_event::ESTABLISHED => {
                let Some(c) = self.conns.get(&conn) else { return };
                let (Some(qpn), Some(peer)) = (c.qpn, c.peer.clone()) else { return };
                if self.lane_qps.contains_key(&qpn) {
                    self.tell_lane(qpn, LaneCommand::Established(qpn));
                } else {
                    self.data.established(qpn);
                }
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
                if let Some(qpn) = self.conns.get(&conn).and_then(|c| c.qpn) {
                    self.qp_to_error(qpn);
                }
                self.emit(DeviceEvent::Disconnected { conn });
            }
            cm_event::TIMEWAIT_EXIT => {
                if let Some(c) = self.conns.remove(&conn) {
                    self.conn_by_id.remove(&c.id.key());
                    if let Some(qpn) = c.qpn {
                        self.qp_conn.remove(&qpn);
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
        let Some(context) = self.data.context() else { return };
        let local_port = self.listeners.get(&ev.listen_key).map_or(0, |(port, _)| *port);
        // One query says both which device the request came in on and who sent it.
        let info = id.addr_info().ok();
        if !info.as_ref().is_some_and(|i| context.holds(i)) {
            // A listener bound to our address only hears our device; refuse anything else.
            let _ = id.reject(&[]);
            return;
        }
        let peer_addr = info.and_then(|i| i.dst).unwrap_or_else(|| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0));
        let mtu = context.port_state(self.port).map(|(_, m)| m).unwrap_or(1024);
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
            awaiting: None,
        });
        self.emit(DeviceEvent::ConnectRequest { conn, local_port, peer });
    }

    fn send_connect(&mut self, conn: ConnId) -> Result<(), DeviceError> {
        let context = self.data.context().ok_or(DeviceError::Closed)?;
        let c = self.conns.get(&conn).ok_or(unknown_conn(conn))?;
        if !c.id.on_device(context) {
            return Err(DeviceError::Unsupported("the route to the peer leaves through another RDMA device"));
        }
        let qpn = c.qpn.ok_or(DeviceError::UnknownQp(0))?;
        let srq = match self.lane_qps.get(&qpn) {
            Some(q) => q.srq,
            None => self.data.connectable(qpn, "connect")?,
        };
        c.id.connect(&ConnParam {
            private_data: c.private_data.clone(),
            responder_resources: c.options.responder_resources,
            initiator_depth: c.options.initiator_depth,
            retry_count: c.options.retry_count,
            rnr_retry_count: c.options.rnr_retry_count,
            qp_num: qpn,
            srq,
        })
        .map_err(verbs)
    }

    /// The active side's half of the handshake for a queue pair of our own: INIT, RTR, RTS, then RTU. For a
    /// lane's queue pair the lane takes the attributes first (`None` now; `lane_qp_ready` goes on).
    fn finish_connect(&mut self, conn: ConnId, params: ConnParam) -> Result<Option<DeviceEvent>, DeviceError> {
        let c = self.conns.get_mut(&conn).ok_or(unknown_conn(conn))?;
        let qpn = c.qpn.ok_or(DeviceError::UnknownQp(0))?;
        let mut attrs = Self::connection_attrs(c, None)?;
        if self.lane_qps.contains_key(&qpn) {
            c.awaiting = Some(Awaiting::Establish { params });
            self.tell_lane(qpn, LaneCommand::Connect { conn, qpn, attrs });
            return Ok(None);
        }
        self.data.connect_qp(qpn, &mut attrs)?;
        c.id.establish().map_err(verbs)?;
        let event = Self::established_event(c, conn, qpn, params);
        self.data.established(qpn);
        Ok(Some(event))
    }

    fn established_event(c: &mut Conn, conn: ConnId, qpn: u32, params: ConnParam) -> DeviceEvent {
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
        DeviceEvent::Established { conn, qpn, peer }
    }

    /// A connection that will not come up: its id goes, and sends that waited for it fail.
    fn fail_connection(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else { return };
        self.conn_by_id.remove(&c.id.key());
        if let Some(qpn) = c.qpn {
            self.qp_conn.remove(&qpn);
            if self.lane_qps.contains_key(&qpn) {
                self.tell_lane(qpn, LaneCommand::FailBacklog(qpn));
            } else {
                self.data.fail_backlog(qpn);
            }
        }
        // An accept that waited on the lane hears that the connection is gone.
        if let Some(Awaiting::Accept { reply, .. }) = c.awaiting {
            let _ = reply.send(Err(unknown_conn(conn)));
        }
    }

    fn drain_async_events(&mut self) {
        let Some(context) = self.data.context().cloned() else { return };
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
            // Events of a lane's queue pairs come on the lane's own context.
            AsyncEvent::QpFatal { qp_num, kind } => self.data.qp_fatal(qp_num, kind),
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

    /// The device is going away (`rdma link delete`, hot unplug): the worker's queue pairs are flushed and
    /// destroyed, its regions deregistered (their buffers wait for `deregister`), every id destroyed; every lane
    /// is told to do the same with its own and to close its context. Once all have said so (or no longer run),
    /// the worker lets its context go, so the kernel can finish removing the device, and reports the removal.
    /// The application's handles stay valid; the device serves nothing more.
    fn remove_device(&mut self) {
        if std::mem::replace(&mut self.removed, true) {
            return;
        }
        self.stats.port_up = false;
        self.data.post_chains();
        self.data.remove_device();
        self.conns.clear();
        self.conn_by_id.clear();
        self.qp_conn.clear();
        self.parked.clear();
        self.listeners.clear();
        let generation = self.generation;
        let waiting: HashSet<usize> = (1..=self.lanes.len())
            .filter(|&l| {
                let remove = Command::VerbsLane(LaneCommand::Remove { generation });
                self.lanes[l - 1].commands.send(remove).is_ok()
            })
            .collect();
        tracing::warn!(addr = %self.config.addr, generation, lanes = waiting.len(), "RDMA device removed");
        self.releasing = Some(Releasing { waiting, since: Instant::now(), warned: 0 });
        self.check_released();
    }
}
