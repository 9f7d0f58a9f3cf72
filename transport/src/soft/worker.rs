//! The worker of a soft device: the one thread that owns the device's socket, connection manager, netdev
//! watch and the data path of its queue pairs ([`DataPath`]). It takes commands from the device's handles,
//! packets from the socket, events from the netdev and time from its timers, and hands back packets,
//! completions and events. Nothing here is shared with another thread (completion queues are the hand-off
//! point).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::cm::{AcceptParams, Cm, CmEvent, ConnId, ConnectParams};
use super::data_path::{DataPath, DataPathConfig, Datagram};
use super::device::SoftConfig;
use super::lane::{Lane, LaneCommand, LaneCounters};
use super::steering::{self, MAX_LANES};
use super::udp::{
    BATCH, RecvBatch, SendBatch, bind, open_packet, recv_batch, seal, send_all, socket_error_is_transient,
};
use super::wire::ext::GSI_QKEY;
use super::wire::icrc;
use super::wire::{MASK_24, Opcode, PacketRepr, ROCEV2_UDP_PORT};
use crate::device::{
    Command, ConnectionOptions, DeviceError, DeviceEvent, DeviceStats, MemoryRegion, ProtectionDomain,
};

/// A lane of the device, as its worker keeps it.
struct LaneEntry {
    commands: mpsc::UnboundedSender<Command>,
    /// A second descriptor of the lane's socket: it stays in the reuseport group (keeping every later
    /// lane's socket number) until the device closes, whenever the lane itself ends.
    _socket: std::net::UdpSocket,
    counters: std::sync::Arc<LaneCounters>,
    /// The next queue pair number within the lane.
    next: u32,
}

/// What the worker knows of a queue pair a lane drives: enough for the connection manager.
struct LaneQp {
    lane: usize,
    pd: u32,
    start_psn: u32,
    conn: Option<ConnId>,
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
    data: DataPath,
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
    next_srq: u32,
    id_solver: icrc::IdentificationSolver,
    /// The path MTU new connections get: the configured one, within what the netdev's MTU carries.
    mtu: usize,
    send_batch: SendBatch,
    data_path_config: DataPathConfig,
    /// The device socket leads a reuseport group with the steering program attached: lanes can join.
    steered: bool,
    lanes: Vec<LaneEntry>,
    lane_qps: HashMap<u32, LaneQp>,
    /// Shared receive queues kept by lanes: (lane, domain) by id.
    lane_srqs: HashMap<u32, (usize, u32)>,
}

impl Worker {
    pub(super) fn new(
        config: SoftConfig,
        local: SocketAddr,
        socket: tokio::net::UdpSocket,
        steered: bool,
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
        let data_path_config = DataPathConfig {
            port: config.port,
            ack_timeout: config.ack_timeout,
            retry_cnt: config.retry_cnt,
            rnr_retry: config.rnr_retry,
            window: config.window,
        };
        Worker {
            mtu: config.mtu,
            cm: Cm::new(cm_config),
            config,
            local,
            socket,
            events,
            data: DataPath::new(data_path_config),
            data_path_config,
            steered,
            lanes: Vec::new(),
            lane_qps: HashMap::new(),
            lane_srqs: HashMap::new(),
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
            next_srq: 1,
            id_solver: icrc::IdentificationSolver::new(),
            send_batch: SendBatch::new(),
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
                taken = recv_batch(&self.socket, &mut received) => match taken {
                    Ok(_) => {
                        for (r, bytes) in received.datagrams() {
                            match r.from {
                                Some(from) if !r.truncated => self.on_datagram(bytes, from),
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
                        self.fail_all();
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
                            // What the burst produced still goes out (a DREQ before a close).
                            self.flush_outputs().await;
                            break;
                        }
                    }
                },
                () = &mut sleep => self.on_timeout(Instant::now()),
                Some(event) = netdev_rx.recv() => self.on_netdev(event),
            }
            self.flush_outputs().await;
        }
        // Teardown: every queue pair flushes its outstanding requests, so every buffer goes back; lanes flush
        // theirs as they stop.
        for qpn in self.data.qpns().into_iter().chain(self.lane_qps.keys().copied().collect::<Vec<_>>()) {
            self.destroy_qp(qpn);
        }
        for lane in &self.lanes {
            let _ = lane.commands.send(Command::Shutdown);
        }
    }

    /// The largest RoCE MTU that fits the netdev's MTU with the IP, UDP and RoCE headers, within the
    /// configured one. Datagrams go out unfragmented (DF): a larger one would not go out at all.
    fn set_netdev_mtu(&mut self, netdev_mtu: u32) {
        let fits = crate::mtu::mtu_bytes(crate::mtu::mtu_code((netdev_mtu as usize).saturating_sub(80)));
        self.mtu = self.config.mtu.min(fits);
        self.tell_lanes(|| LaneCommand::Mtu(self.mtu));
    }

    fn tell_lanes(&self, command: impl Fn() -> LaneCommand) {
        for lane in &self.lanes {
            let _ = lane.commands.send(Command::Lane(command()));
        }
    }

    /// Lane `lane` (lanes are numbered from 1; 0 is the device itself).
    fn lane(&self, lane: usize) -> Option<&LaneEntry> {
        self.lanes.get(lane.checked_sub(1)?)
    }

    /// The channel of the lane that drives `qpn`, if a lane does.
    fn lane_of(&self, qpn: u32) -> Option<&mpsc::UnboundedSender<Command>> {
        self.lane(self.lane_qps.get(&qpn)?.lane).map(|l| &l.commands)
    }

    fn open_lane(&mut self) -> Result<crate::Lane, DeviceError> {
        if !self.steered {
            return Err(DeviceError::Unsupported("lanes: the kernel took no reuseport steering program"));
        }
        if self.lanes.len() >= MAX_LANES {
            return Err(DeviceError::Unsupported("lanes: at most 31 per device"));
        }
        let local = self.local;
        let socket = super::udp::bind_shared(local).map_err(|source| DeviceError::Bind { addr: local, source })?;
        let keep = socket.try_clone().map_err(|source| DeviceError::Bind { addr: local, source })?;
        let (commands, receiver) = mpsc::unbounded_channel();
        let counters = std::sync::Arc::new(LaneCounters::default());
        self.lanes.push(LaneEntry { commands, _socket: keep, counters: counters.clone(), next: 0 });
        let id = self.lanes.len();
        tracing::debug!(%local, lane = id, "lane opened");
        let lane =
            Lane::new(id, local, socket, receiver, self.events.clone(), self.data_path_config, self.mtu, counters);
        Ok(crate::Lane::soft(lane))
    }

    fn create_lane_qp(
        &mut self,
        lane: usize,
        pd: u32,
        send_cq: crate::device::CompletionQueue,
        recv_cq: crate::device::CompletionQueue,
        srq: Option<u32>,
    ) -> Result<(u32, mpsc::UnboundedSender<Command>), DeviceError> {
        if !self.pds.contains(&pd) {
            return Err(DeviceError::UnknownPd(pd));
        }
        // A lane's queue pair takes its receives only from a shared receive queue of that lane and domain.
        if let Some(id) = srq.filter(|id| self.lane_srqs.get(id) != Some(&(lane, pd))) {
            return Err(DeviceError::UnknownSrq(id));
        }
        let start_psn = self.random_psn();
        let entry = lane
            .checked_sub(1)
            .and_then(|i| self.lanes.get_mut(i))
            .ok_or(DeviceError::Unsupported("no such lane on this device"))?;
        let qpn = loop {
            let qpn = steering::lane_qpn(lane, entry.next);
            entry.next = (entry.next + 1) % steering::LANE_QPNS;
            // 0xffffff is the multicast QPN.
            if qpn != MASK_24 && !self.lane_qps.contains_key(&qpn) {
                break qpn;
            }
        };
        let create = LaneCommand::Create { qpn, pd, send_cq, recv_cq, srq, start_psn };
        entry.commands.send(Command::Lane(create)).map_err(|_| DeviceError::Closed)?;
        self.lane_qps.insert(qpn, LaneQp { lane, pd, start_psn, conn: None });
        Ok((qpn, entry.commands.clone()))
    }

    fn create_lane_srq(&mut self, lane: usize, pd: u32) -> Result<(u32, mpsc::UnboundedSender<Command>), DeviceError> {
        if !self.pds.contains(&pd) {
            return Err(DeviceError::UnknownPd(pd));
        }
        let commands = self.lane(lane).ok_or(DeviceError::Unsupported("no such lane on this device"))?.commands.clone();
        let id = self.next_srq;
        commands.send(Command::Lane(LaneCommand::CreateSrq { id, pd })).map_err(|_| DeviceError::Closed)?;
        self.next_srq += 1;
        self.lane_srqs.insert(id, (lane, pd));
        Ok((id, commands))
    }

    /// The first PSN of a queue pair about to be connected, wherever it runs.
    fn connectable(&self, qpn: u32, to: &'static str) -> Result<u32, DeviceError> {
        match self.lane_qps.get(&qpn) {
            Some(LaneQp { conn: None, start_psn, .. }) if self.lane_of(qpn).is_some_and(|l| !l.is_closed()) => {
                Ok(*start_psn)
            }
            // Its lane no longer runs: nothing would drive the connection.
            Some(LaneQp { conn: None, .. }) => Err(DeviceError::Closed),
            Some(_) => Err(DeviceError::BadTransition { qpn, from: crate::device::QpState::Init, to }),
            None => self.data.connectable(qpn, to),
        }
    }

    fn bind_connection(&mut self, qpn: u32, conn: ConnId, peer: SocketAddr) {
        if let Some(l) = self.lane_qps.get_mut(&qpn) {
            l.conn = Some(conn);
            if let Some(tx) = self.lane_of(qpn) {
                let _ = tx.send(Command::Lane(LaneCommand::Bind { qpn, conn, peer }));
            }
        } else {
            self.data.bind_connection(qpn, conn, peer);
        }
    }

    /// The device failed or went away: every queue pair, its own and its lanes', to the error state.
    fn fail_all(&mut self) {
        self.data.fail_all();
        self.tell_lanes(|| LaneCommand::FailAll);
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
                self.fail_all();
                DeviceEvent::DeviceRemoval
            }
        };
        let _ = self.events.send(out);
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.data.poll_timeout().into_iter().chain(self.cm.poll_timeout()).min()
    }

    fn on_timeout(&mut self, now: Instant) {
        self.cm.handle_timeout(now);
        self.data.handle_timeout(now);
    }

    fn on_datagram(&mut self, bytes: &[u8], from: SocketAddr) {
        self.stats.packets_received += 1;
        let Some(packet) = open_packet(bytes, from, self.local.ip(), &mut self.id_solver) else {
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
        if !self.data.handle_packet(now, from.ip(), bytes, &packet) {
            self.stats.packets_dropped += 1;
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
                } else if self.data.pd_in_use(pd)
                    || self.lane_qps.values().any(|q| q.pd == pd)
                    || self.lane_srqs.values().any(|&(_, p)| p == pd)
                    // Lanes count their regions, not per domain: any region on a lane keeps every domain.
                    || self.lane_count(|c| &c.regions) > 0
                {
                    Err(DeviceError::PdBusy(pd))
                } else {
                    self.pds.remove(&pd);
                    Ok(())
                };
                let _ = reply.send(result);
            }
            Command::Register(pd, buf, access, reply) => {
                let result = if self.pds.contains(&pd) {
                    self.data.register(pd, buf, access).map(|keys| MemoryRegion { keys })
                } else {
                    Err(DeviceError::UnknownPd(pd))
                };
                let _ = reply.send(result);
            }
            Command::Deregister(key, reply) => {
                let _ = reply.send(self.data.deregister(key));
            }
            Command::CreateSrq(pd, reply) => {
                if !self.pds.contains(&pd) {
                    let _ = reply.send(Err(DeviceError::UnknownPd(pd)));
                    return;
                }
                let id = self.next_srq;
                self.next_srq += 1;
                self.data.create_srq(id, pd);
                let _ = reply.send(Ok(id));
            }
            Command::DestroySrq(id, reply) => {
                let _ = reply.send(self.data.destroy_srq(id));
            }
            Command::PostSrqRecv(id, wr) => self.data.post_srq_recv(id, wr),
            Command::CreateQp(pd, send_cq, recv_cq, srq, reply) => {
                if !self.pds.contains(&pd) {
                    let _ = reply.send(Err(DeviceError::UnknownPd(pd)));
                    return;
                }
                if let Some(id) = srq.filter(|&id| !self.data.srq_in(id, pd)) {
                    let _ = reply.send(Err(DeviceError::UnknownSrq(id)));
                    return;
                }
                let qpn = self.allocate_qpn();
                let start_psn = self.random_psn();
                self.data.create_qp(qpn, pd, send_cq, recv_cq, srq, start_psn);
                let _ = reply.send(Ok(qpn));
            }
            Command::ModifyQp(qpn, transition, reply) => match self.lane_of(qpn) {
                Some(lane) => {
                    let _ = lane.send(Command::ModifyQp(qpn, transition, reply));
                }
                None => {
                    let _ = reply.send(self.data.modify_qp(qpn, transition, self.mtu));
                }
            },
            Command::DestroyQp(qpn, reply) => match self.lane_of(qpn).cloned() {
                // The lane flushes and forgets it, then answers.
                Some(lane) => {
                    self.destroy_qp(qpn);
                    let _ = lane.send(Command::DestroyQp(qpn, reply));
                }
                None => {
                    self.destroy_qp(qpn);
                    let _ = reply.send(Ok(()));
                }
            },
            Command::PostSend(qpn, wr) => self.data.post_send(qpn, wr),
            Command::PostRecv(qpn, wr) => self.data.post_recv(qpn, wr),
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
                let (regions, region_bytes) = self.data.regions();
                let regions = regions + self.lane_count(|c| &c.regions) as usize;
                let region_bytes = region_bytes + self.lane_count(|c| &c.region_bytes) as usize;
                let _ = reply.send(DeviceStats {
                    protection_domains: self.pds.len(),
                    shared_receive_queues: self.data.shared_receive_queues() + self.lane_srqs.len(),
                    queue_pairs: self.data.queue_pairs() + self.lane_qps.len(),
                    regions,
                    region_bytes,
                    connections: self.cm.connections(),
                    stale_connection_attempts: self.cm.stale_attempts(),
                    node_guid: self.cm.node_guid(),
                    active_mtu: self.mtu,
                    packets_sent: self.stats.packets_sent + self.lane_count(|c| &c.sent),
                    packets_received: self.stats.packets_received + self.lane_count(|c| &c.received),
                    packets_dropped: self.stats.packets_dropped + self.lane_count(|c| &c.dropped),
                    lanes: self.lanes.len(),
                    lane_packets_received: self.lane_count(|c| &c.received),
                    lane_gso_sends: self.lane_count(|c| &c.gso_sends),
                    lane_gro_receives: self.lane_count(|c| &c.gro_receives),
                    srq_receives: self.data.srq_receives() as u64 + self.lane_count(|c| &c.srq_receives),
                    ..self.stats
                });
            }
            Command::OpenLane(reply) => {
                let _ = reply.send(self.open_lane());
            }
            Command::CreateQpOnLane { lane, pd, send_cq, recv_cq, srq, reply } => {
                let _ = reply.send(self.create_lane_qp(lane, pd, send_cq, recv_cq, srq));
            }
            Command::CreateSrqOnLane { lane, pd, reply } => {
                let _ = reply.send(self.create_lane_srq(lane, pd));
            }
            Command::LaneSrqDestroyed(id) => {
                self.lane_srqs.remove(&id);
            }
            Command::Lane(_) => tracing::debug!("lane commands are for lanes"),
            #[cfg(feature = "verbs")]
            Command::VerbsLane(_) | Command::FromVerbsLane(_) => tracing::debug!("verbs lanes are not this device's"),
            Command::RegisterOnLane { lane, pd, buf, access, reply } => {
                let lane = self.lane(lane).map(|l| &l.commands);
                crate::device::register_on_lane(lane, self.pds.contains(&pd), pd, buf, access, reply);
            }
            Command::DeregisterOnLane { lane, key, reply } => {
                crate::device::deregister_on_lane(self.lane(lane).map(|l| &l.commands), key, reply);
            }
            Command::Shutdown => {}
        }
    }

    fn lane_count(&self, counter: impl Fn(&LaneCounters) -> &std::sync::atomic::AtomicU64) -> u64 {
        self.lanes.iter().map(|l| counter(&l.counters).load(std::sync::atomic::Ordering::Relaxed)).sum()
    }

    fn allocate_qpn(&mut self) -> u32 {
        loop {
            let qpn = self.next_qpn;
            // Numbers with the lane bit are the lanes' (steering).
            self.next_qpn = if self.next_qpn + 1 >= steering::DEVICE_QPN_LIMIT { 0x11 } else { self.next_qpn + 1 };
            if !self.data.contains(qpn) {
                return qpn;
            }
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
        let start_psn = self.connectable(qpn, "connect")?;
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
        self.bind_connection(qpn, conn, dst);
        Ok(conn)
    }

    fn accept(
        &mut self,
        conn: ConnId,
        qpn: u32,
        options: ConnectionOptions,
        private_data: Vec<u8>,
    ) -> Result<(), DeviceError> {
        if !self.conns.contains_key(&conn) {
            return Err(DeviceError::Cm(super::cm::CmError::UnknownConnection(conn)));
        }
        let start_psn = self.connectable(qpn, "accept")?;
        let binding = self.conns.get_mut(&conn).ok_or(DeviceError::Cm(super::cm::CmError::UnknownConnection(conn)))?;
        binding.qpn = Some(qpn);
        binding.options = options;
        let peer_addr = binding.peer;
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
        self.bind_connection(qpn, conn, peer_addr);
        Ok(())
    }

    fn destroy_qp(&mut self, qpn: u32) {
        let (conn, port) = match self.lane_qps.remove(&qpn) {
            Some(l) => (l.conn, None),
            None => self.data.destroy_qp(qpn),
        };
        // Each connection sends from its own source port: its socket goes with the last queue pair using it
        // (QP1's stays), or every connection ever made would keep a file descriptor.
        if let Some(port) = port.filter(|&p| Some(p) != self.mad_source_port()) {
            self.source_sockets.remove(&port);
        }
        if let Some(conn) = conn {
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
                match self.lane_of(qpn) {
                    Some(lane) => {
                        let _ = lane.send(Command::Lane(LaneCommand::Start { qpn, peer: peer.clone(), options }));
                    }
                    None => self.data.start_engine(Instant::now(), qpn, &peer, options, self.mtu),
                }
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
                    match self.lane_of(qpn) {
                        Some(lane) => {
                            let _ = lane.send(Command::Lane(LaneCommand::ConnectionLost(qpn)));
                        }
                        None => self.data.connection_lost(qpn),
                    }
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
        if let Some(qpn) = self.conns.remove(&conn).and_then(|b| b.qpn) {
            if let Some(l) = self.lane_qps.get_mut(&qpn) {
                l.conn = None;
            }
            match self.lane_of(qpn) {
                Some(lane) => {
                    let _ = lane.send(Command::Lane(LaneCommand::ConnectionFailed(qpn)));
                }
                None => self.data.connection_failed(qpn),
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
        let mut datagrams = Vec::new();
        let mut fatal = Vec::new();
        self.data.poll_output(Instant::now(), &mut datagrams, &mut fatal);
        out.extend(datagrams.into_iter().map(|Datagram { dst, bytes, source_port }| (dst, bytes, source_port)));
        for (qpn, cause) in fatal {
            let _ = self.events.send(DeviceEvent::QpFatal { qpn, cause });
        }
        let local = self.local;
        for (_, _, source_port) in &mut out {
            let from_port = source_port.filter(|&port| self.source_socket(port).is_some()).unwrap_or(local.port());
            *source_port = (from_port != local.port()).then_some(from_port);
        }
        for (dst, bytes, source_port) in &mut out {
            if !seal(bytes, local.ip(), source_port.unwrap_or(local.port()), *dst) {
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
