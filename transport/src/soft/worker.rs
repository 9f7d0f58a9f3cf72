//! The worker of a soft device: the one thread that owns the device's socket, RC engines, registered memory,
//! connection manager and netdev watch. It takes commands from the device's handles, packets from the socket,
//! events from the netdev and time from its timers, and hands back packets, completions and events. Nothing
//! here is shared with another thread (completion queues are the hand-off point).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::sync::mpsc;

use super::cm::{AcceptParams, Cm, CmEvent, ConnId, ConnectParams, PeerParams, StartPsns};
use super::device::SoftConfig;
use super::memory_table::MemoryTable;
use super::rc::{EngineState, RcConfig, RcQp, RecvWr, SendWr, WcOpcode, WcStatus, WorkCompletion};
use super::udp_batch::{BATCH, RecvBatch, SendBatch};
use super::wire::ext::GSI_QKEY;
use super::wire::icrc::{self, IpHeader};
use super::wire::{MASK_24, Opcode, PacketRepr, ROCEV2_UDP_PORT};
use crate::device::{
    Command, Completion, CompletionQueue, ConnectionOptions, DeviceError, DeviceEvent, DeviceStats, MemoryRegion,
    ProtectionDomain, QpState, QpTransition,
};

/// A queue pair as the worker holds it.
struct QpSlot {
    pd: u32,
    srq: Option<u32>,
    state: QpState,
    send_cq: CompletionQueue,
    recv_cq: CompletionQueue,
    /// The engine, once the connection gave the queue pair its peer.
    engine: Option<RcQp>,
    /// Receives posted before the connection came up.
    early_recvs: Vec<RecvWr>,
    /// Sends posted before the connection came up (they go out once it is established).
    early_sends: Vec<SendWr>,
    peer: Option<SocketAddr>,
    conn: Option<ConnId>,
    /// The PSN this queue pair expects first, advertised in its REQ or REP (or, driven by hand, where it sends
    /// from until RTS says otherwise).
    start_psn: u32,
    fatal_reported: bool,
    /// UDP source port of the connection's packets (rxe's, from the CM flow label), when the device serves the
    /// standard port; otherwise the device socket's port is used.
    source_port: Option<u16>,
    /// The engine's deadline as the worker's timer set holds it.
    armed: Option<Instant>,
    /// Listed in the worker's `dirty`: something happened to it since the last flush.
    dirty: bool,
}

/// What the worker remembers of a connection it carries.
struct ConnBinding {
    qpn: Option<u32>,
    peer: SocketAddr,
    options: ConnectionOptions,
}

pub(super) struct Worker {
    config: SoftConfig,
    local: SocketAddr,
    socket: tokio::net::UdpSocket,
    events: mpsc::UnboundedSender<DeviceEvent>,
    qps: HashMap<u32, QpSlot>,
    memory: MemoryTable,
    cm: Cm,
    conns: HashMap<ConnId, ConnBinding>,
    /// UDP port of each peer address we have heard from (4791 unless a test device says otherwise).
    peer_ports: HashMap<IpAddr, u16>,
    next_qpn: u32,
    next_cm_port: u16,
    mad_psn: u32,
    psn_seed: u64,
    stats: DeviceStats,
    removed: bool,
    /// Send-only sockets bound to the source ports rxe would use (None: the port was taken; fall back).
    source_sockets: HashMap<u16, Option<tokio::net::UdpSocket>>,
    pds: std::collections::HashSet<u32>,
    next_pd: u32,
    /// Shared receive queues: their domain and the receives posted on them.
    srqs: HashMap<u32, (u32, VecDeque<RecvWr>)>,
    next_srq: u32,
    id_solver: icrc::IdentificationSolver,
    /// The path MTU new connections get: the configured one, within what the netdev's MTU carries.
    mtu: usize,
    /// Queue pairs whose engines were fed (a packet, a post, a timeout, a state change) since the last flush:
    /// only these can have output, so a flush costs what happened, not how many queue pairs exist.
    dirty: Vec<u32>,
    /// Engine deadlines, earliest first: a timeout costs the queue pairs that are due, not all of them.
    timers: BTreeSet<(Instant, u32)>,
    send_batch: SendBatch,
}

impl Worker {
    pub(super) fn new(
        config: SoftConfig,
        local: SocketAddr,
        socket: tokio::net::UdpSocket,
        events: mpsc::UnboundedSender<DeviceEvent>,
    ) -> Worker {
        let seed = (local.port() as u64) << 32
            ^ u64::from(match local.ip() {
                IpAddr::V4(v4) => u32::from(v4),
                IpAddr::V6(v6) => v6.octets().iter().fold(0u32, |a, b| a.rotate_left(5) ^ *b as u32),
            });
        // Communication ids must differ between devices that share an address (and across restarts), or a
        // peer takes a new REQ for a duplicate of an old one: random, as Linux's CM makes them.
        let mut cm_config = config.cm;
        cm_config.first_comm_id = (std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), seed) as u32) | 1;
        if cm_config.node_guid == 0 {
            // Until the netdev is known (and for good where it is not watched).
            cm_config.node_guid = super::cm::node_guid_of_addr(local.ip());
        }
        Worker {
            mtu: config.mtu,
            cm: Cm::new(cm_config),
            config,
            local,
            socket,
            events,
            qps: HashMap::new(),
            memory: MemoryTable::default(),
            conns: HashMap::new(),
            peer_ports: HashMap::new(),
            next_qpn: 0x11,
            next_cm_port: 40000,
            mad_psn: 0,
            psn_seed: seed | 1,
            stats: DeviceStats { port_up: true, ..DeviceStats::default() },
            removed: false,
            source_sockets: HashMap::new(),
            pds: std::collections::HashSet::new(),
            next_pd: 1,
            srqs: HashMap::new(),
            next_srq: 1,
            id_solver: icrc::IdentificationSolver::new(),
            dirty: Vec::new(),
            timers: BTreeSet::new(),
            send_batch: SendBatch::new(),
        }
    }

    /// Marks a queue pair for the next flush.
    fn touch(&mut self, qpn: u32) {
        if let Some(slot) = self.qps.get_mut(&qpn)
            && !slot.dirty
        {
            slot.dirty = true;
            self.dirty.push(qpn);
        }
    }

    fn random_psn(&mut self) -> u32 {
        // xorshift: start PSNs only need to differ between connections.
        self.psn_seed ^= self.psn_seed << 13;
        self.psn_seed ^= self.psn_seed >> 7;
        self.psn_seed ^= self.psn_seed << 17;
        self.psn_seed as u32 & MASK_24
    }

    pub(super) async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut received = RecvBatch::new();
        self.bind_mad_socket();
        let (netdev_tx, mut netdev_rx) = mpsc::unbounded_channel();
        if self.config.watch_netdev {
            match super::netdev::watch(self.local.ip(), netdev_tx).await {
                Ok(netdev) => {
                    self.stats.port_up = netdev.up;
                    self.set_netdev_mtu(netdev.mtu);
                    if self.config.cm.node_guid == 0
                        && let Some(mac) = netdev.mac.filter(|m| m.iter().any(|&b| b != 0))
                    {
                        self.cm.set_node_guid(super::cm::node_guid_of_mac(mac));
                    }
                    tracing::debug!(
                        local = %self.local, netdev = %netdev.name, mtu = self.mtu,
                        node_guid = format_args!("{:#018x}", self.cm.node_guid()), "watching"
                    );
                }
                Err(e) => tracing::warn!(local = %self.local, "not watching the netdev: {e}"),
            }
        }
        let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
        let sleep = tokio::time::sleep_until(far());
        tokio::pin!(sleep);
        loop {
            let deadline = self.next_deadline().map(tokio::time::Instant::from_std).unwrap_or_else(far);
            if deadline != sleep.deadline() {
                sleep.as_mut().reset(deadline);
            }
            tokio::select! {
                ready = self.socket.readable() => match ready.and_then(|()| {
                    self.socket.try_io(Interest::READABLE, || received.recv(&self.socket))
                }) {
                    Ok(n) => {
                        for i in 0..n {
                            match received.get(i) {
                                Some((r, bytes)) if !r.truncated && r.from.is_some() => {
                                    self.on_datagram(bytes, r.from.unwrap_or(self.local))
                                }
                                _ => {
                                    self.stats.packets_received += 1;
                                    self.stats.packets_dropped += 1;
                                }
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if socket_error_is_transient(e.kind()) => tracing::debug!(local = %self.local, "recv: {e}"),
                    Err(e) => {
                        // The socket itself is broken: nothing more will arrive. Fail every queue pair (their work
                        // is flushed back), say so, and stop serving.
                        tracing::error!(local = %self.local, "device failed: {e}");
                        self.fail_all_qps();
                        let _ = self.events.send(DeviceEvent::DeviceFatal { reason: e.to_string() });
                        self.flush_outputs().await;
                        break;
                    }
                },
                command = commands.recv() => match command {
                    None | Some(Command::Shutdown) => break,
                    Some(c) => {
                        self.on_command(c);
                        // What else is queued already (a burst of posts) goes out in the same flush.
                        let mut stop = false;
                        for _ in 0..BATCH {
                            match commands.try_recv() {
                                Ok(Command::Shutdown) | Err(mpsc::error::TryRecvError::Disconnected) => {
                                    stop = true;
                                    break;
                                }
                                Ok(c) => self.on_command(c),
                                Err(mpsc::error::TryRecvError::Empty) => break,
                            }
                        }
                        if stop {
                            break;
                        }
                    }
                },
                () = &mut sleep => self.on_timeout(Instant::now()),
                Some(event) = netdev_rx.recv() => self.on_netdev(event),
            }
            self.flush_outputs().await;
        }
        // Teardown: every queue pair flushes its outstanding requests, so every buffer goes back.
        let qpns: Vec<u32> = self.qps.keys().copied().collect();
        for qpn in qpns {
            self.destroy_qp(qpn);
        }
    }

    /// The largest RoCE MTU that fits the netdev's MTU with the IP, UDP and RoCE headers, within the
    /// configured one. Datagrams go out unfragmented (DF): a larger one would not go out at all.
    fn set_netdev_mtu(&mut self, netdev_mtu: u32) {
        let fits = crate::mtu::mtu_bytes(crate::mtu::mtu_code((netdev_mtu as usize).saturating_sub(80)));
        self.mtu = self.config.mtu.min(fits);
    }

    fn on_netdev(&mut self, event: super::netdev::NetdevEvent) {
        use super::netdev::NetdevEvent;
        let out = match event {
            NetdevEvent::MtuChanged(mtu) => {
                // New connections get the new path MTU; live ones keep theirs (a smaller netdev MTU fails
                // their larger datagrams, and they reconnect).
                self.set_netdev_mtu(mtu);
                tracing::info!(local = %self.local, netdev_mtu = mtu, path_mtu = self.mtu, "netdev MTU changed");
                return;
            }
            NetdevEvent::PortActive => {
                self.stats.port_up = true;
                DeviceEvent::PortActive
            }
            NetdevEvent::PortError => {
                self.stats.port_up = false;
                DeviceEvent::PortError
            }
            NetdevEvent::AddressRemoved => DeviceEvent::AddrChange { present: false },
            NetdevEvent::AddressAdded => DeviceEvent::AddrChange { present: true },
            NetdevEvent::Removed => {
                self.removed = true;
                self.stats.port_up = false;
                self.fail_all_qps();
                DeviceEvent::DeviceRemoval
            }
        };
        let _ = self.events.send(out);
    }

    fn fail_all_qps(&mut self) {
        let qpns: Vec<u32> = self.qps.keys().copied().collect();
        for qpn in qpns {
            if let Some(engine) = self.qps.get_mut(&qpn).and_then(|s| s.engine.as_mut()) {
                engine.set_state(EngineState::Error);
            }
            self.touch(qpn);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.timers.first().map(|&(t, _)| t).into_iter().chain(self.cm.poll_timeout()).min()
    }

    fn on_timeout(&mut self, now: Instant) {
        self.cm.handle_timeout(now);
        while let Some(&(t, qpn)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            let Some(slot) = self.qps.get_mut(&qpn) else { continue };
            slot.armed = None;
            if let Some(engine) = slot.engine.as_mut()
                && engine.poll_timeout().is_some_and(|t| t <= now)
            {
                engine.handle_timeout(now);
            }
            self.touch(qpn);
        }
    }

    fn on_datagram(&mut self, bytes: &[u8], from: SocketAddr) {
        self.stats.packets_received += 1;
        let ip = ip_header(from.ip(), self.local.ip(), bytes.len().saturating_sub(icrc::ICRC_LEN));
        // Our peers send with IPv4 identification 0; a kernel peer's identification is recovered from the ICRC.
        let valid = icrc::verify(&ip, from.port(), bytes).is_ok()
            || (from.is_ipv4() && self.id_solver.solve(&ip, from.port(), bytes).is_some());
        if !valid {
            self.stats.packets_dropped += 1;
            return;
        }
        let Ok((packet, _)) = PacketRepr::parse(bytes) else {
            self.stats.packets_dropped += 1;
            return;
        };
        // RoCEv2 peers listen on 4791 whatever port they send from; only devices on another port (tests sharing an
        // address) send from the port they listen on.
        if self.config.port != ROCEV2_UDP_PORT {
            self.peer_ports.insert(from.ip(), from.port());
        }
        let now = Instant::now();
        if packet.bth.opcode == Opcode::UdSendOnly && packet.bth.dest_qp == 1 {
            if packet.deth.is_some_and(|d| d.qkey == GSI_QKEY) {
                self.cm.handle_mad(now, from.ip(), self.local.ip(), packet.payload);
            }
            return;
        }
        let Some(slot) = self.qps.get_mut(&packet.bth.dest_qp) else {
            self.stats.packets_dropped += 1;
            return;
        };
        // Only the connected peer may talk to an RC queue pair (from any source port: rxe varies it).
        if slot.peer.map(|p| p.ip()) != Some(from.ip()) {
            self.stats.packets_dropped += 1;
            return;
        }
        if let Some(engine) = slot.engine.as_mut() {
            let srq = slot.srq.and_then(|id| self.srqs.get_mut(&id)).map(|(_, queue)| queue);
            engine.handle_packet_with(now, &packet, &mut self.memory.domain(slot.pd), srq);
            self.touch(packet.bth.dest_qp);
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::AllocPd(reply) => {
                let id = self.next_pd;
                self.next_pd += 1;
                self.pds.insert(id);
                let _ = reply.send(Ok(ProtectionDomain { id }));
            }
            Command::DeallocPd(pd, reply) => {
                let result = if !self.pds.contains(&pd) {
                    Err(DeviceError::UnknownPd(pd))
                } else if self.memory.in_domain(pd) > 0
                    || self.qps.values().any(|q| q.pd == pd)
                    || self.srqs.values().any(|(p, _)| *p == pd)
                {
                    Err(DeviceError::PdBusy(pd))
                } else {
                    self.pds.remove(&pd);
                    Ok(())
                };
                let _ = reply.send(result);
            }
            Command::Register(pd, buf, access, reply) => {
                let len = buf.len();
                let result = if self.pds.contains(&pd) {
                    self.memory
                        .register(pd, buf, access)
                        .map(|keys| MemoryRegion { keys })
                        .map_err(|_| DeviceError::RegionTooLarge(len))
                } else {
                    Err(DeviceError::UnknownPd(pd))
                };
                let _ = reply.send(result);
            }
            Command::Deregister(key, reply) => {
                let _ = reply.send(self.memory.deregister(key).ok_or(DeviceError::UnknownRegion(key)));
            }
            Command::CreateSrq(pd, reply) => {
                if !self.pds.contains(&pd) {
                    let _ = reply.send(Err(DeviceError::UnknownPd(pd)));
                    return;
                }
                let id = self.next_srq;
                self.next_srq += 1;
                self.srqs.insert(id, (pd, VecDeque::new()));
                let _ = reply.send(Ok(id));
            }
            Command::DestroySrq(id, reply) => {
                let result = if self.qps.values().any(|q| q.srq == Some(id)) {
                    Err(DeviceError::SrqBusy(id))
                } else {
                    self.srqs
                        .remove(&id)
                        .map(|(_, queue)| {
                            queue
                                .into_iter()
                                .map(|mut wr| {
                                    crate::work_request::scatter(&mut wr.buf, &mut wr.sg_list, 0);
                                    wr
                                })
                                .collect()
                        })
                        .ok_or(DeviceError::UnknownSrq(id))
                };
                let _ = reply.send(result);
            }
            Command::PostSrqRecv(id, mut wr) => match self.srqs.get_mut(&id) {
                Some((_, queue)) => {
                    crate::work_request::gather(&mut wr.buf, &wr.sg_list);
                    queue.push_back(wr)
                }
                None => {
                    tracing::warn!(srq = id, wr_id = wr.wr_id, "receive posted on a destroyed shared receive queue")
                }
            },
            Command::CreateQp(pd, send_cq, recv_cq, srq, reply) => {
                if !self.pds.contains(&pd) {
                    let _ = reply.send(Err(DeviceError::UnknownPd(pd)));
                    return;
                }
                if let Some(id) = srq.filter(|id| self.srqs.get(id).is_none_or(|(p, _)| *p != pd)) {
                    let _ = reply.send(Err(DeviceError::UnknownSrq(id)));
                    return;
                }
                let qpn = self.allocate_qpn();
                let start_psn = self.random_psn();
                self.qps.insert(
                    qpn,
                    QpSlot {
                        pd,
                        srq,
                        state: QpState::Reset,
                        send_cq,
                        recv_cq,
                        engine: None,
                        early_recvs: Vec::new(),
                        early_sends: Vec::new(),
                        peer: None,
                        conn: None,
                        start_psn,
                        fatal_reported: false,
                        source_port: None,
                        armed: None,
                        dirty: false,
                    },
                );
                let _ = reply.send(Ok(qpn));
            }
            Command::ModifyQp(qpn, transition, reply) => {
                let _ = reply.send(self.modify_qp(qpn, transition));
            }
            Command::DestroyQp(qpn, reply) => {
                self.destroy_qp(qpn);
                let _ = reply.send(Ok(()));
            }
            Command::PostSend(qpn, wr) => self.post_send(qpn, wr),
            Command::PostRecv(qpn, wr) => self.post_recv(qpn, wr),
            Command::Listen(port, backlog, reply) => {
                let _ = reply.send(self.cm.listen(port, backlog).map_err(DeviceError::from));
            }
            Command::Connect { qpn, dst, port, options, private_data, reply } => {
                let _ = reply.send(self.connect(qpn, dst, port, options, private_data));
            }
            Command::Accept { conn, qpn, options, private_data, reply } => {
                let _ = reply.send(self.accept(conn, qpn, options, private_data));
            }
            Command::Reject(conn, private_data, reply) => {
                let result = self.cm.reject(conn, &private_data).map_err(DeviceError::from);
                self.conns.remove(&conn);
                let _ = reply.send(result);
            }
            Command::Disconnect(conn, reply) => {
                let _ = reply.send(self.cm.disconnect(Instant::now(), conn).map_err(DeviceError::from));
            }
            Command::Stats(reply) => {
                let _ = reply.send(DeviceStats {
                    protection_domains: self.pds.len(),
                    shared_receive_queues: self.srqs.len(),
                    queue_pairs: self.qps.len(),
                    regions: self.memory.len(),
                    region_bytes: self.memory.bytes(),
                    connections: self.cm.connections(),
                    stale_connection_attempts: self.cm.stale_attempts(),
                    node_guid: self.cm.node_guid(),
                    active_mtu: self.mtu,
                    ..self.stats
                });
            }
            Command::Shutdown => {}
        }
    }

    fn allocate_qpn(&mut self) -> u32 {
        loop {
            let qpn = self.next_qpn;
            self.next_qpn = if self.next_qpn >= MASK_24 { 0x11 } else { self.next_qpn + 1 };
            if !self.qps.contains_key(&qpn) {
                return qpn;
            }
        }
    }

    fn post_send(&mut self, qpn: u32, wr: SendWr) {
        self.touch(qpn);
        let Some(slot) = self.qps.get_mut(&qpn) else { return };
        match (slot.state, slot.engine.as_mut()) {
            (QpState::Rts, Some(engine)) => {
                if let Err((_, wr)) = engine.post_send(wr) {
                    slot.send_cq.push(Completion { qpn, wc: failed_send(wr) });
                }
            }
            // Connecting through the CM: the request goes out once the connection is up.
            (QpState::Reset | QpState::Init, None) if slot.conn.is_some() => slot.early_sends.push(wr),
            // Sends before RTS, or after an error, are refused (and the buffer handed back).
            _ => slot.send_cq.push(Completion { qpn, wc: failed_send(wr) }),
        }
    }

    fn post_recv(&mut self, qpn: u32, wr: RecvWr) {
        self.touch(qpn);
        let Some(slot) = self.qps.get_mut(&qpn) else { return };
        if slot.srq.is_some() {
            // Its receives come from the shared queue: posting here is an error, as in verbs.
            slot.recv_cq.push(Completion { qpn, wc: failed_recv(wr) });
            return;
        }
        match slot.engine.as_mut() {
            Some(engine) => {
                if let Err((_, wr)) = engine.post_recv(wr) {
                    slot.recv_cq.push(Completion { qpn, wc: failed_recv(wr) });
                }
            }
            None if slot.state == QpState::Error => slot.recv_cq.push(Completion { qpn, wc: failed_recv(wr) }),
            None => slot.early_recvs.push(wr),
        }
    }

    fn modify_qp(&mut self, qpn: u32, transition: QpTransition) -> Result<QpState, DeviceError> {
        self.touch(qpn);
        let slot = self.qps.get_mut(&qpn).ok_or(DeviceError::UnknownQp(qpn))?;
        let bad = |from, to| Err(DeviceError::BadTransition { qpn, from, to });
        match transition {
            QpTransition::Init => match slot.state {
                QpState::Reset | QpState::Init => slot.state = QpState::Init,
                from => return bad(from, "INIT"),
            },
            QpTransition::Rtr { peer, dest_qpn, rq_psn, path_mtu, min_rnr_timer, max_dest_rd_atomic } => {
                if slot.state != QpState::Init {
                    return bad(slot.state, "RTR");
                }
                let config = RcConfig {
                    mtu: path_mtu.min(self.mtu),
                    min_rnr_timer,
                    max_dest_rd_atomic,
                    window: self.config.window,
                    ..RcConfig::new(qpn, dest_qpn, slot.start_psn, rq_psn)
                };
                let mut engine = RcQp::new(config)?;
                engine.set_state(EngineState::Rtr);
                for wr in slot.early_recvs.drain(..) {
                    let _ = engine.post_recv(wr);
                }
                slot.engine = Some(engine);
                slot.peer = Some(peer);
                slot.source_port = rxe_source_port(self.config.port, 0, qpn, dest_qpn);
                slot.state = QpState::Rtr;
            }
            QpTransition::Rts { sq_psn, ack_timeout, retry_cnt, rnr_retry, max_rd_atomic } => {
                let (QpState::Rtr, Some(engine)) = (slot.state, slot.engine.as_mut()) else {
                    return bad(slot.state, "RTS");
                };
                let send = super::rc::SendParams { send_psn: sq_psn, retry_cnt, rnr_retry, ack_timeout, max_rd_atomic };
                engine.enter_rts(send)?;
                slot.state = QpState::Rts;
            }
            QpTransition::Error => {
                self.flush_qp(qpn);
                if let Some(slot) = self.qps.get_mut(&qpn) {
                    slot.state = QpState::Error;
                }
            }
            QpTransition::Reset => {
                self.flush_qp(qpn);
                if let Some(slot) = self.qps.get_mut(&qpn) {
                    slot.engine = None;
                    slot.peer = None;
                    slot.source_port = None;
                    slot.fatal_reported = false;
                    slot.state = QpState::Reset;
                }
            }
        }
        Ok(self.qps.get(&qpn).map_or(QpState::Reset, |s| s.state))
    }

    /// Completes everything outstanding on a queue pair with a flush error (the buffers go back).
    fn flush_qp(&mut self, qpn: u32) {
        self.touch(qpn);
        let Some(slot) = self.qps.get_mut(&qpn) else { return };
        if let Some(engine) = slot.engine.as_mut() {
            engine.set_state(EngineState::Error);
            while let Some(wc) = engine.poll_completion() {
                completion_queue(&slot.send_cq, &slot.recv_cq, &wc).push(Completion { qpn, wc });
            }
        }
        for wr in slot.early_recvs.drain(..) {
            slot.recv_cq.push(Completion { qpn, wc: failed_recv(wr) });
        }
        for wr in slot.early_sends.drain(..) {
            slot.send_cq.push(Completion { qpn, wc: failed_send(wr) });
        }
    }

    fn connect(
        &mut self,
        qpn: u32,
        dst: SocketAddr,
        port: u16,
        options: ConnectionOptions,
        private_data: Vec<u8>,
    ) -> Result<ConnId, DeviceError> {
        let slot = self.qps.get(&qpn).ok_or(DeviceError::UnknownQp(qpn))?;
        if !matches!(slot.state, QpState::Reset | QpState::Init) || slot.conn.is_some() {
            return Err(DeviceError::BadTransition { qpn, from: slot.state, to: "connect" });
        }
        let start_psn = slot.start_psn;
        let src_port = self.next_cm_port;
        self.next_cm_port = if self.next_cm_port == u16::MAX { 40000 } else { self.next_cm_port + 1 };
        let conn = self.cm.connect(
            Instant::now(),
            ConnectParams {
                src: self.local.ip(),
                dst: dst.ip(),
                src_port,
                dst_port: port,
                local_qpn: qpn,
                start_psn,
                path_mtu: crate::mtu::mtu_code(self.mtu),
                responder_resources: options.responder_resources,
                initiator_depth: options.initiator_depth,
                retry_count: options.retry_count,
                rnr_retry_count: options.rnr_retry_count,
                private_data,
            },
        )?;
        self.peer_ports.insert(dst.ip(), dst.port());
        self.conns.insert(conn, ConnBinding { qpn: Some(qpn), peer: dst, options });
        if let Some(slot) = self.qps.get_mut(&qpn) {
            slot.conn = Some(conn);
            slot.peer = Some(dst);
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
        let binding = self.conns.get_mut(&conn).ok_or(DeviceError::Cm(super::cm::CmError::UnknownConnection(conn)))?;
        let slot = self.qps.get_mut(&qpn).ok_or(DeviceError::UnknownQp(qpn))?;
        if !matches!(slot.state, QpState::Reset | QpState::Init) || slot.conn.is_some() {
            return Err(DeviceError::BadTransition { qpn, from: slot.state, to: "accept" });
        }
        binding.qpn = Some(qpn);
        binding.options = options;
        let peer_addr = binding.peer;
        let start_psn = slot.start_psn;
        self.cm.accept(
            Instant::now(),
            conn,
            AcceptParams {
                local_qpn: qpn,
                start_psn,
                responder_resources: options.responder_resources,
                initiator_depth: options.initiator_depth,
                rnr_retry_count: options.rnr_retry_count,
                private_data,
            },
        )?;
        slot.conn = Some(conn);
        slot.peer = Some(peer_addr);
        Ok(())
    }

    /// Gives a queue pair its engine once both ends' parameters are known (RTR and RTS in one step, as
    /// rdma_cm does).
    fn start_engine(&mut self, qpn: u32, peer: &PeerParams, options: ConnectionOptions) {
        let Some(slot) = self.qps.get_mut(&qpn) else { return };
        let mtu = crate::mtu::mtu_bytes(peer.path_mtu).min(self.mtu);
        let psns = StartPsns::new(slot.start_psn, peer);
        let config = RcConfig {
            mtu,
            retry_cnt: options.retry_count.min(self.config.retry_cnt),
            rnr_retry: options.rnr_retry_count.min(self.config.rnr_retry),
            ack_timeout: self.config.ack_timeout,
            window: self.config.window,
            // READs we issue: what we asked for, within what the peer grants; READs we serve: what we grant.
            max_rd_atomic: options.initiator_depth.min(peer.responder_resources).max(1),
            max_dest_rd_atomic: options.responder_resources.max(1),
            ..RcConfig::new(qpn, peer.qpn, psns.send, psns.recv)
        };
        let Ok(mut engine) = RcQp::new(config) else {
            tracing::warn!(qpn, ?peer, "unusable connection parameters");
            return;
        };
        for wr in slot.early_recvs.drain(..) {
            let _ = engine.post_recv(wr);
        }
        for wr in slot.early_sends.drain(..) {
            let _ = engine.post_send(wr);
        }
        slot.engine = Some(engine);
        slot.state = QpState::Rts;
        slot.source_port = rxe_source_port(self.config.port, peer.flow_label, qpn, peer.qpn);
        self.touch(qpn);
    }

    fn destroy_qp(&mut self, qpn: u32) {
        self.flush_qp(qpn);
        let Some(slot) = self.qps.remove(&qpn) else { return };
        if let Some(t) = slot.armed {
            self.timers.remove(&(t, qpn));
        }
        // Each connection sends from its own source port: its socket goes with the last queue pair using it
        // (QP1's stays), or every connection ever made would keep a file descriptor.
        if let Some(port) = slot.source_port
            && Some(port) != self.mad_source_port()
            && !self.qps.values().any(|q| q.source_port == Some(port))
        {
            self.source_sockets.remove(&port);
        }
        if let Some(conn) = slot.conn {
            let _ = self.cm.disconnect(Instant::now(), conn);
            if let Some(b) = self.conns.get_mut(&conn) {
                b.qpn = None;
            }
        }
    }

    fn on_cm_event(&mut self, event: CmEvent) {
        let out = match event {
            CmEvent::ConnectRequest { conn, local_port, peer, .. } => {
                let port = self.peer_ports.get(&peer.addr).copied().unwrap_or(ROCEV2_UDP_PORT);
                self.conns.insert(
                    conn,
                    ConnBinding {
                        qpn: None,
                        peer: SocketAddr::new(peer.addr, port),
                        options: ConnectionOptions::default(),
                    },
                );
                DeviceEvent::ConnectRequest { conn, local_port, peer }
            }
            CmEvent::Established { conn, peer } => {
                let Some(binding) = self.conns.get(&conn) else { return };
                let Some(qpn) = binding.qpn else { return };
                let options = binding.options;
                self.start_engine(qpn, &peer, options);
                DeviceEvent::Established { conn, qpn, peer }
            }
            CmEvent::Rejected { conn, reason, private_data } => {
                self.fail_connection(conn);
                DeviceEvent::Rejected { conn, reason, private_data }
            }
            CmEvent::Unreachable { conn } => {
                self.fail_connection(conn);
                DeviceEvent::Unreachable { conn }
            }
            CmEvent::Disconnected { conn } => {
                // rdma_cm moves the queue pair to the error state: outstanding work is flushed.
                if let Some(qpn) = self.conns.get(&conn).and_then(|b| b.qpn) {
                    if let Some(slot) = self.qps.get_mut(&qpn) {
                        if let Some(engine) = slot.engine.as_mut() {
                            engine.set_state(EngineState::Error);
                        }
                        slot.state = QpState::Error;
                    }
                    self.touch(qpn);
                }
                DeviceEvent::Disconnected { conn }
            }
            CmEvent::TimewaitExit { conn } => {
                self.conns.remove(&conn);
                DeviceEvent::TimewaitExit { conn }
            }
        };
        let _ = self.events.send(out);
    }

    fn fail_connection(&mut self, conn: ConnId) {
        if let Some(binding) = self.conns.remove(&conn) {
            if let Some(slot) = binding.qpn.and_then(|q| self.qps.get_mut(&q)) {
                slot.conn = None;
                let qpn = binding.qpn.unwrap_or_default();
                for wr in slot.early_sends.drain(..) {
                    slot.send_cq.push(Completion { qpn, wc: failed_send(wr) });
                }
            }
        }
    }

    /// The source port rxe sends MADs (QP1) from, on the standard port.
    fn mad_source_port(&self) -> Option<u16> {
        (self.config.port == ROCEV2_UDP_PORT).then(|| super::wire::udp_port::rxe_default(1))
    }

    /// Binds QP1's source-port socket now, so that the device's file descriptors do not change with traffic.
    fn bind_mad_socket(&mut self) {
        if let Some(port) = self.mad_source_port() {
            self.source_socket(port);
        }
    }

    async fn flush_outputs(&mut self) {
        while let Some(event) = self.cm.poll_event() {
            self.on_cm_event(event);
        }
        // (destination, packet, source port rxe would use)
        let mut out: Vec<(SocketAddr, Vec<u8>, Option<u16>)> = Vec::new();
        let mad_port = self.mad_source_port();
        while let Some((dst, mad)) = self.cm.poll_transmit() {
            let port = self.peer_ports.get(&dst).copied().unwrap_or(ROCEV2_UDP_PORT);
            let p = PacketRepr::cm_mad(self.mad_psn, &mad);
            self.mad_psn = (self.mad_psn + 1) & MASK_24;
            let mut bytes = Vec::with_capacity(300);
            if p.emit(&mut bytes).is_ok() {
                out.push((SocketAddr::new(dst, port), bytes, mad_port));
            }
        }
        let now = Instant::now();
        for qpn in std::mem::take(&mut self.dirty) {
            let Some(slot) = self.qps.get_mut(&qpn) else { continue };
            slot.dirty = false;
            let Some(engine) = slot.engine.as_mut() else { continue };
            if let Some(peer) = slot.peer {
                while let Some(packet) = engine.poll_transmit(now) {
                    out.push((peer, packet, slot.source_port));
                }
            }
            while let Some(wc) = engine.poll_completion() {
                completion_queue(&slot.send_cq, &slot.recv_cq, &wc).push(Completion { qpn, wc });
            }
            let deadline = engine.poll_timeout();
            if deadline != slot.armed {
                if let Some(t) = slot.armed {
                    self.timers.remove(&(t, qpn));
                }
                if let Some(t) = deadline {
                    self.timers.insert((t, qpn));
                }
                slot.armed = deadline;
            }
            if let (Some(cause), false) = (engine.error_cause(), slot.fatal_reported) {
                slot.fatal_reported = true;
                slot.state = QpState::Error;
                if cause != WcStatus::WrFlush {
                    let _ = self.events.send(DeviceEvent::QpFatal { qpn, cause });
                }
            }
        }
        let local = self.local;
        for (_, _, source_port) in &mut out {
            let from_port = source_port.filter(|&port| self.source_socket(port).is_some()).unwrap_or(local.port());
            *source_port = (from_port != local.port()).then_some(from_port);
        }
        for (dst, bytes, source_port) in &mut out {
            let from_port = source_port.unwrap_or(local.port());
            let ip = ip_header(local.ip(), dst.ip(), bytes.len());
            if icrc::append(&ip, from_port, bytes).is_err() {
                bytes.clear();
            }
        }
        // One sendmmsg per run of datagrams that leave from the same socket.
        let mut start = 0;
        while start < out.len() {
            let port = out[start].2;
            let end = start + out[start..].iter().take_while(|d| d.2 == port).count();
            let socket = match port {
                Some(p) => self.source_sockets.get(&p).and_then(Option::as_ref).unwrap_or(&self.socket),
                None => &self.socket,
            };
            let datagrams: Vec<(SocketAddr, &[u8])> =
                out[start..end].iter().filter(|d| !d.1.is_empty()).map(|d| (d.0, d.1.as_slice())).collect();
            let (sent, dropped) = send_all(socket, &mut self.send_batch, &datagrams).await;
            self.stats.packets_sent += sent;
            self.stats.packets_dropped += dropped + (end - start - datagrams.len()) as u64;
            start = end;
        }
    }

    /// The socket bound to the source port rxe would use (bound on first use; `None` if the port is taken,
    /// and the device socket serves instead).
    fn source_socket(&mut self, port: u16) -> Option<&tokio::net::UdpSocket> {
        let local = self.local;
        self.source_sockets
            .entry(port)
            .or_insert_with(|| {
                bind(SocketAddr::new(local.ip(), port)).ok().and_then(|s| tokio::net::UdpSocket::from_std(s).ok())
            })
            .as_ref()
    }
}

/// Sends `datagrams` from `socket` in batches, waiting while its buffer is full; (sent, dropped). A datagram
/// the kernel refuses (an unreachable peer) is dropped: RC retransmission covers the loss.
async fn send_all(
    socket: &tokio::net::UdpSocket,
    batch: &mut SendBatch,
    datagrams: &[(SocketAddr, &[u8])],
) -> (u64, u64) {
    let (mut i, mut sent, mut dropped) = (0, 0u64, 0u64);
    while i < datagrams.len() {
        match socket.try_io(Interest::WRITABLE, || batch.send(socket, &datagrams[i..])) {
            Ok(n) if n > 0 => {
                i += n;
                sent += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if socket.writable().await.is_err() {
                    dropped += (datagrams.len() - i) as u64;
                    break;
                }
            }
            other => {
                // The first datagram of the batch was refused.
                tracing::trace!(dst = %datagrams[i].0, "send: {other:?}");
                i += 1;
                dropped += 1;
            }
        }
    }
    (sent, dropped)
}

/// The UDP source port rxe would use for a connection: from its flow label (the CM's, or else the one rxe
/// derives from the QP pair). Only on the standard port; a device on another port sends from its own.
fn rxe_source_port(device_port: u16, flow_label: u32, qpn: u32, dest_qpn: u32) -> Option<u16> {
    use super::wire::udp_port;
    let flow_label = match flow_label {
        0 => udp_port::qp_pair_flow_label(qpn, dest_qpn),
        fl => fl,
    };
    (device_port == ROCEV2_UDP_PORT).then(|| udp_port::from_flow_label(flow_label))
}

/// Errors a UDP socket reports for one datagram or an ICMP message about an earlier one; anything else means
/// the socket itself is broken.
fn socket_error_is_transient(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        kind,
        WouldBlock
            | Interrupted
            | TimedOut
            | ConnectionRefused
            | ConnectionReset
            | HostUnreachable
            | NetworkUnreachable
            | NetworkDown
            | AddrNotAvailable
            | OutOfMemory
    )
}

/// The IP header the ICRC covers, as the kernel builds it for our datagrams: identification 0, which `bind`'s
/// path MTU discovery setting guarantees for what we send. A receiving socket cannot see the real header, so a
/// kernel peer's identification is recovered from its ICRC (`on_datagram`).
fn ip_header(src: IpAddr, dst: IpAddr, roce_len_without_icrc: usize) -> IpHeader {
    let udp_len = (8 + roce_len_without_icrc + icrc::ICRC_LEN) as u16;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => IpHeader::ipv4(s, d, 0, udp_len),
        (s, d) => IpHeader::ipv6(to_v6(s), to_v6(d), udp_len),
    }
}

fn to_v6(a: IpAddr) -> std::net::Ipv6Addr {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Receives complete on the receive queue's CQ, everything else on the send queue's.
fn completion_queue<'a>(
    send: &'a CompletionQueue,
    recv: &'a CompletionQueue,
    wc: &WorkCompletion,
) -> &'a CompletionQueue {
    if matches!(wc.opcode, WcOpcode::Recv | WcOpcode::RecvRdmaWithImm) { recv } else { send }
}

fn failed_send(wr: SendWr) -> WorkCompletion {
    let opcode = wr.opcode();
    flushed(wr.wr_id, opcode, wr.buf, wr.sg_list)
}

fn failed_recv(wr: RecvWr) -> WorkCompletion {
    flushed(wr.wr_id, WcOpcode::Recv, wr.buf, wr.sg_list)
}

/// A request that never ran: flushed, with what it was posted with handed back.
fn flushed(wr_id: u64, opcode: WcOpcode, buf: Vec<u8>, sg_list: Vec<Vec<u8>>) -> WorkCompletion {
    WorkCompletion::new(wr_id, WcStatus::WrFlush, opcode, 0, buf, sg_list, 0)
}

pub(super) fn bind(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv4() {
        // The ICRC covers the IPv4 identification, which the kernel picks as it sends. With path MTU discovery
        // "probe" (DF set, never fragmented) an unconnected socket's datagrams go out with identification 0 —
        // the header `ip_header` computes the ICRC over. Without it the kernel numbers them and every ICRC we
        // send is wrong for the header on the wire: rxe drops all of it. "Probe" rather than "do": the device's
        // MTU governs, as for rxe, not a path MTU an ICMP message (perhaps forged) would lower.
        rustix::net::sockopt::set_ip_mtu_discover(&socket, rustix::net::sockopt::Ipv4PathMtuDiscovery::PROBE)?;
    }
    // Bursts of a window of MTU-sized packets must not overflow the default socket buffers.
    let _ = socket.set_recv_buffer_size(8 << 20);
    let _ = socket.set_send_buffer_size(8 << 20);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    #[test]
    fn which_socket_errors_are_fatal() {
        for transient in [ErrorKind::WouldBlock, ErrorKind::ConnectionRefused, ErrorKind::NetworkUnreachable] {
            assert!(super::socket_error_is_transient(transient), "{transient:?}");
        }
        for fatal in [ErrorKind::InvalidInput, ErrorKind::PermissionDenied, ErrorKind::Unsupported, ErrorKind::Other] {
            assert!(!super::socket_error_is_transient(fatal), "{fatal:?}");
        }
    }
}
