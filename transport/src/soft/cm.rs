//! The connection manager, sans-IO: IB CM over QP1 the way Linux's `cm.c` and rdma_cm's `cma.c` speak it on
//! RoCE, so that a kernel peer can connect to us and we to it. Fed MADs ([`Cm::handle_mad`]) and time
//! ([`Cm::handle_timeout`]); hands back MADs to send ([`Cm::poll_transmit`]), events for the application
//! ([`Cm::poll_event`]) and its next deadline ([`Cm::poll_timeout`]).
//!
//! Active side: REQ (rdma_cm header + private data) → REP → RTU → `Established`. Passive side: REQ →
//! `ConnectRequest` → accept (REP) or reject (REJ) → RTU → `Established`. Either side: DREQ → DREP →
//! `Disconnected`, then `TimewaitExit` once the connection's identifiers may be reused. Requests are
//! retransmitted on the response timeout up to the retry limit; duplicates are answered with the same reply.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::soft::wire::cma::{self, CmaHeader};
use crate::soft::wire::mad::{self, CmMessage, CmPath, MAD_LEN, MadHeader, Rej, Rep, Req, reject_reason};

pub use crate::connection::{ConnId, PeerParams};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmConfig {
    /// Our node GUID (CA GUID in REQ / REP); 0 lets a soft device derive it from its netdev's MAC address, as
    /// rxe does ([`node_guid_of_mac`]).
    pub node_guid: u64,
    /// Wait for a reply before retransmitting.
    pub response_timeout: Duration,
    /// Retransmissions of a REQ, REP or DREQ before giving up.
    pub max_retries: u8,
    /// How long a closed connection's identifiers stay reserved.
    pub timewait: Duration,
    /// First local communication id (the rest count up from it).
    pub first_comm_id: u32,
}

impl Default for CmConfig {
    fn default() -> Self {
        CmConfig {
            node_guid: 0,
            response_timeout: Duration::from_millis(500),
            max_retries: 15,
            timewait: Duration::from_secs(1),
            first_comm_id: 0x1000,
        }
    }
}

/// The first PSNs of a connected RC queue pair. A REQ's or REP's starting PSN is the PSN its sender expects
/// to *receive* first (Linux `cm.c`: the active side's `rq_psn` is its REQ's starting PSN, the passive side's its
/// REP's; each side's `sq_psn` is the other's), so each side sends from the PSN its peer advertised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartPsns {
    pub send: u32,
    pub recv: u32,
}

impl StartPsns {
    /// From the starting PSN we advertised in our REQ or REP and what the peer's REP or REQ said.
    pub fn new(advertised: u32, peer: &PeerParams) -> StartPsns {
        StartPsns { send: peer.start_psn, recv: advertised }
    }
}

/// What the active side asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectParams {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Our rdma_cm port (an ephemeral port, as the kernel picks one).
    pub src_port: u16,
    /// The listener's rdma_cm port (4420 for NVMe/RDMA).
    pub dst_port: u16,
    pub local_qpn: u32,
    /// The PSN we expect to receive first (see [`StartPsns`]).
    pub start_psn: u32,
    /// IB MTU code: 1 = 256 … 5 = 4096.
    pub path_mtu: u8,
    /// RDMA READs we accept from the peer at once.
    pub responder_resources: u8,
    /// RDMA READs we issue to the peer at once.
    pub initiator_depth: u8,
    pub retry_count: u8,
    pub rnr_retry_count: u8,
    /// The application's private data (at most 56 bytes after rdma_cm's header).
    pub private_data: Vec<u8>,
}

/// What the passive side answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptParams {
    pub local_qpn: u32,
    /// The PSN we expect to receive first (see [`StartPsns`]).
    pub start_psn: u32,
    pub responder_resources: u8,
    pub initiator_depth: u8,
    pub rnr_retry_count: u8,
    pub private_data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmEvent {
    /// A REQ arrived on a listened port: accept or reject it. `local_port` is the port it was for.
    ConnectRequest {
        conn: ConnId,
        local_port: u16,
        local_addr: IpAddr,
        peer: PeerParams,
    },
    /// Active side: REP received and RTU sent. Passive side: RTU received. `peer` carries the REP's private
    /// data on the active side.
    Established {
        conn: ConnId,
        peer: PeerParams,
    },
    Rejected {
        conn: ConnId,
        reason: u16,
        private_data: Vec<u8>,
    },
    /// No reply after every retransmission.
    Unreachable {
        conn: ConnId,
    },
    Disconnected {
        conn: ConnId,
    },
    TimewaitExit {
        conn: ConnId,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CmError {
    #[error("no connection {0:#x}")]
    UnknownConnection(ConnId),
    #[error("connection {conn:#x} is {state:?}; {action} is not possible")]
    WrongState { conn: ConnId, state: State, action: &'static str },
    #[error("port {0} is already listened on")]
    PortInUse(u16),
    #[error("{len} bytes of private data; at most {max} fit")]
    PrivateDataTooLong { len: usize, max: usize },
    #[error("source and destination addresses are of different families")]
    MixedFamilies,
    #[error("cannot encode the message: {0}")]
    Encode(#[from] mad::MadError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    ReqSent,
    ReqReceived,
    RepSent,
    Established,
    DreqSent,
    TimeWait,
    /// Passive side: our REP went unanswered through every retry, the attempt was rejected (timeout) and
    /// reported unreachable. Kept while the peer may still retransmit its REQ, so that a duplicate is answered
    /// with a stale-connection REJ rather than taken for a new connection; then forgotten without an event.
    Stale,
}

#[derive(Debug)]
struct Conn {
    state: State,
    remote_id: u32,
    peer_addr: IpAddr,
    tid: u64,
    /// The last MAD we sent, for retransmission and for answering duplicates.
    last_sent: Option<[u8; MAD_LEN]>,
    retries_left: u8,
    deadline: Option<Instant>,
    peer: PeerParams,
    /// The listened port a passive connection came in on (0 for active connections).
    listener: u16,
    /// Passive side: how long the peer goes on retransmitting its REQ (from the REQ's CM timeouts), which is
    /// how long a stale attempt is remembered.
    peer_req_span: Duration,
}

/// Service timeout announced in an MRA: 4.096 us * 2^20, about 4.3 s (rdma_cm's CMA_CM_MRA_SETTING).
const MRA_SERVICE_TIMEOUT: u8 = 20;

/// The longest a stale passive attempt is remembered, whatever its REQ claims, and how many are at most
/// (beyond that the one due to be forgotten first goes at once).
const MAX_STALE: Duration = Duration::from_secs(120);
const MAX_STALE_ATTEMPTS: usize = 1024;

/// An IB CM timeout field: 4.096 us * 2^value.
fn cm_timeout(value: u8) -> Duration {
    Duration::from_nanos(4096u64 << value.min(31))
}

/// Private data after rdma_cm's header in a REQ (92 - 36).
pub const REQ_PRIVATE_DATA_MAX: usize = mad::private_data_len::REQ - cma::CMA_HEADER_LEN;
/// Private data in a REP and a REJ.
pub const REP_PRIVATE_DATA_MAX: usize = mad::private_data_len::REP;
pub const REJ_PRIVATE_DATA_MAX: usize = mad::private_data_len::REJ;

/// The connection manager of one device.
#[derive(Debug)]
pub struct Cm {
    config: CmConfig,
    next_comm_id: u32,
    next_tid: u64,
    /// Listened ports and how many requests may wait for an answer on each.
    listeners: HashMap<u16, usize>,
    conns: HashMap<ConnId, Conn>,
    /// (peer address, peer's comm id) → our id: recognises retransmitted REQs.
    by_remote: HashMap<(IpAddr, u32), ConnId>,
    transmit: VecDeque<(IpAddr, [u8; MAD_LEN])>,
    events: VecDeque<CmEvent>,
    /// How many of `conns` are stale attempts.
    stale: usize,
}

/// The node GUID of a device on a netdev with MAC address `mac`, as rxe derives it (`addrconf_addr_eui48`):
/// the modified EUI-64 — universal/local bit flipped, ff:fe in the middle.
pub fn node_guid_of_mac(mac: [u8; 6]) -> u64 {
    u64::from_be_bytes([mac[0] ^ 0x02, mac[1], mac[2], 0xff, 0xfe, mac[3], mac[4], mac[5]])
}

/// The node GUID of a device on a link without a MAC address (loopback): that of a locally administered MAC
/// made of the device's address (its last four bytes), so that devices on different addresses differ.
pub fn node_guid_of_addr(addr: IpAddr) -> u64 {
    let tail = match addr {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(v6) => v6.octets()[12..].try_into().expect("4 bytes"),
    };
    node_guid_of_mac([0x02, 0, tail[0], tail[1], tail[2], tail[3]])
}

/// The RoCE GID of an IP address: IPv4-mapped for IPv4 (GID index 1 in rxe's table).
pub fn gid_of(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

impl Cm {
    pub fn new(config: CmConfig) -> Cm {
        Cm {
            next_comm_id: config.first_comm_id,
            next_tid: (config.first_comm_id as u64) << 16,
            config,
            listeners: HashMap::new(),
            conns: HashMap::new(),
            by_remote: HashMap::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            stale: 0,
        }
    }

    pub fn listen(&mut self, port: u16, backlog: usize) -> Result<(), CmError> {
        if self.listeners.contains_key(&port) {
            return Err(CmError::PortInUse(port));
        }
        self.listeners.insert(port, backlog.max(1));
        Ok(())
    }

    /// The node GUID our REQs and REPs carry as CA GUID.
    pub fn node_guid(&self) -> u64 {
        self.config.node_guid
    }

    /// Sets the node GUID, once the device knows its netdev (what is already sent keeps the old one).
    pub fn set_node_guid(&mut self, guid: u64) {
        self.config.node_guid = guid;
    }

    pub fn unlisten(&mut self, port: u16) {
        self.listeners.remove(&port);
    }

    pub fn state(&self, conn: ConnId) -> Option<State> {
        self.conns.get(&conn).map(|c| c.state)
    }

    /// Connections the CM still tracks (time-wait included; stale attempts are not connections).
    pub fn connections(&self) -> usize {
        self.conns.len() - self.stale
    }

    /// Passive attempts whose REP went unanswered, remembered so that the peer's retransmitted REQs are
    /// recognised (each goes away on its own once the peer has stopped retransmitting).
    pub fn stale_attempts(&self) -> usize {
        self.stale
    }

    fn new_id(&mut self) -> ConnId {
        loop {
            let id = self.next_comm_id;
            self.next_comm_id = self.next_comm_id.wrapping_add(1).max(1);
            if !self.conns.contains_key(&id) {
                return id;
            }
        }
    }

    pub fn connect(&mut self, now: Instant, p: ConnectParams) -> Result<ConnId, CmError> {
        if p.private_data.len() > REQ_PRIVATE_DATA_MAX {
            return Err(CmError::PrivateDataTooLong { len: p.private_data.len(), max: REQ_PRIVATE_DATA_MAX });
        }
        let header = CmaHeader { version: cma::CMA_VERSION, src_port: p.src_port, src: p.src, dst: p.dst };
        let mut private_data = header.emit().map_err(|_| CmError::MixedFamilies)?.to_vec();
        private_data.extend_from_slice(&p.private_data);
        let conn = self.new_id();
        let tid = self.next_tid;
        self.next_tid += 1;
        let flow_label = crate::soft::wire::udp_port::cm_flow_label(p.src_port, p.dst_port);
        let req = Req {
            local_comm_id: conn,
            service_id: cma::service_id(p.dst_port),
            local_ca_guid: self.config.node_guid,
            local_qkey: 0,
            local_qpn: p.local_qpn,
            responder_resources: p.responder_resources,
            local_eecn: 0,
            initiator_depth: p.initiator_depth,
            remote_eecn: 0,
            remote_cm_response_timeout: 20,
            transport_service_type: 0,
            end_to_end_flow_control: true,
            starting_psn: p.start_psn,
            local_cm_response_timeout: 20,
            retry_count: p.retry_count.min(7),
            pkey: 0xffff,
            path_mtu: p.path_mtu,
            rdc_exists: false,
            rnr_retry_count: p.rnr_retry_count.min(7),
            max_cm_retries: self.config.max_retries.min(15),
            srq: false,
            extended_transport_type: 0,
            primary_path: CmPath {
                local_lid: 0xffff,
                remote_lid: 0xffff,
                local_gid: gid_of(p.src),
                remote_gid: gid_of(p.dst),
                flow_label,
                hop_limit: 64,
                local_ack_timeout: 19,
                ..CmPath::default()
            },
            alternate_path: CmPath::default(),
            private_data,
        };
        let mad = CmMessage::Req(req).emit(&MadHeader::cm(mad::attr::REQ, tid))?;
        let peer = PeerParams {
            addr: p.dst,
            port: p.dst_port,
            qpn: 0,
            start_psn: 0,
            path_mtu: p.path_mtu,
            responder_resources: 0,
            initiator_depth: 0,
            retry_count: p.retry_count,
            rnr_retry_count: p.rnr_retry_count,
            flow_label,
            private_data: Vec::new(),
        };
        self.conns.insert(
            conn,
            Conn {
                state: State::ReqSent,
                remote_id: 0,
                peer_addr: p.dst,
                tid,
                last_sent: None,
                retries_left: self.config.max_retries,
                deadline: None,
                peer,
                listener: 0,
                peer_req_span: Duration::ZERO,
            },
        );
        self.send(now, conn, mad, true);
        Ok(conn)
    }

    pub fn accept(&mut self, now: Instant, conn: ConnId, p: AcceptParams) -> Result<(), CmError> {
        if p.private_data.len() > REP_PRIVATE_DATA_MAX {
            return Err(CmError::PrivateDataTooLong { len: p.private_data.len(), max: REP_PRIVATE_DATA_MAX });
        }
        let c = self.conns.get_mut(&conn).ok_or(CmError::UnknownConnection(conn))?;
        if c.state != State::ReqReceived {
            return Err(CmError::WrongState { conn, state: c.state, action: "accept" });
        }
        let rep = Rep {
            local_comm_id: conn,
            remote_comm_id: c.remote_id,
            local_qkey: 0,
            local_qpn: p.local_qpn,
            local_eecn: 0,
            starting_psn: p.start_psn,
            responder_resources: p.responder_resources,
            initiator_depth: p.initiator_depth,
            target_ack_delay: 15,
            failover_accepted: 0,
            end_to_end_flow_control: true,
            rnr_retry_count: p.rnr_retry_count.min(7),
            srq: false,
            local_ca_guid: self.config.node_guid,
            private_data: p.private_data,
        };
        let tid = c.tid;
        let mad = CmMessage::Rep(rep).emit(&MadHeader::cm(mad::attr::REP, tid))?;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.state = State::RepSent;
        }
        self.send(now, conn, mad, true);
        Ok(())
    }

    /// Rejects a connection request with the application's private data (reason "consumer defined").
    pub fn reject(&mut self, conn: ConnId, private_data: &[u8]) -> Result<(), CmError> {
        if private_data.len() > REJ_PRIVATE_DATA_MAX {
            return Err(CmError::PrivateDataTooLong { len: private_data.len(), max: REJ_PRIVATE_DATA_MAX });
        }
        let c = self.conns.get(&conn).ok_or(CmError::UnknownConnection(conn))?;
        if c.state != State::ReqReceived {
            return Err(CmError::WrongState { conn, state: c.state, action: "reject" });
        }
        let mad =
            reject_mad(conn, c.remote_id, c.tid, mad::message::REQ, reject_reason::CONSUMER_DEFINED, private_data);
        self.transmit.push_back((c.peer_addr, mad));
        self.forget(conn);
        Ok(())
    }

    /// Starts an orderly disconnect; `Disconnected` follows on DREP or after the retries. Idempotent.
    pub fn disconnect(&mut self, now: Instant, conn: ConnId) -> Result<(), CmError> {
        let c = self.conns.get_mut(&conn).ok_or(CmError::UnknownConnection(conn))?;
        match c.state {
            State::Established | State::RepSent => {
                c.state = State::DreqSent;
                let mad = CmMessage::Dreq {
                    local_comm_id: conn,
                    remote_comm_id: c.remote_id,
                    remote_qpn: c.peer.qpn,
                    private_data: Vec::new(),
                }
                .emit(&MadHeader::cm(mad::attr::DREQ, c.tid))
                .expect("no private data");
                c.retries_left = self.config.max_retries;
                self.send(now, conn, mad, true);
                Ok(())
            }
            State::ReqSent | State::ReqReceived => {
                // Nothing established yet: abandon the attempt.
                let (addr, remote, tid) = (c.peer_addr, c.remote_id, c.tid);
                if remote != 0 {
                    let rej = timeout_reject_mad(conn, remote, tid, mad::message::REQ, self.config.node_guid);
                    self.transmit.push_back((addr, rej));
                }
                self.forget(conn);
                self.events.push_back(CmEvent::Disconnected { conn });
                Ok(())
            }
            State::DreqSent | State::TimeWait | State::Stale => Ok(()),
        }
    }

    pub fn poll_transmit(&mut self) -> Option<(IpAddr, [u8; MAD_LEN])> {
        self.transmit.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<CmEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.conns.values().filter_map(|c| c.deadline).min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<ConnId> =
            self.conns.iter().filter(|(_, c)| c.deadline.is_some_and(|d| d <= now)).map(|(id, _)| *id).collect();
        for conn in due {
            let Some(c) = self.conns.get_mut(&conn) else { continue };
            match c.state {
                State::TimeWait => {
                    self.forget(conn);
                    self.events.push_back(CmEvent::TimewaitExit { conn });
                }
                State::Stale => self.forget(conn),
                State::ReqSent | State::RepSent | State::DreqSent if c.retries_left > 0 => {
                    c.retries_left -= 1;
                    let mad = c.last_sent.expect("a request was sent");
                    self.send(now, conn, mad, true);
                }
                State::ReqSent => {
                    self.forget(conn);
                    self.events.push_back(CmEvent::Unreachable { conn });
                }
                State::RepSent => {
                    // An unanswered REP: reject it (timeout; the additional information is our CA GUID, by
                    // which a peer that got the REP finds the connection), and remember the attempt so that
                    // the peer's retransmitted REQ is answered rather than taken for a second connection.
                    let rej = timeout_reject_mad(conn, c.remote_id, c.tid, mad::message::REP, self.config.node_guid);
                    c.state = State::Stale;
                    c.deadline = Some(now + c.peer_req_span);
                    self.transmit.push_back((c.peer_addr, rej));
                    self.events.push_back(CmEvent::Unreachable { conn });
                    self.stale += 1;
                    if self.stale > MAX_STALE_ATTEMPTS {
                        let oldest = self
                            .conns
                            .iter()
                            .filter(|(_, c)| c.state == State::Stale)
                            .min_by_key(|(_, c)| c.deadline)
                            .map(|(id, _)| *id);
                        if let Some(oldest) = oldest {
                            self.forget(oldest);
                        }
                    }
                }
                State::DreqSent => {
                    self.enter_timewait(now, conn);
                    self.events.push_back(CmEvent::Disconnected { conn });
                }
                State::ReqReceived | State::Established => c.deadline = None,
            }
        }
    }

    /// A MAD received on QP1 from `src`. Anything that is not a CM message for us is dropped.
    pub fn handle_mad(&mut self, now: Instant, src: IpAddr, dst: IpAddr, bytes: &[u8]) {
        let Ok((header, message)) = CmMessage::parse(bytes) else { return };
        match message {
            CmMessage::Req(req) => self.on_req(src, dst, header.transaction_id, req),
            CmMessage::Rep(rep) => self.on_rep(src, rep),
            CmMessage::Rtu { remote_comm_id, .. } => {
                if let Some(c) = self.conns.get_mut(&remote_comm_id).filter(|c| c.peer_addr == src) {
                    if c.state == State::RepSent {
                        c.state = State::Established;
                        c.deadline = None;
                        let peer = c.peer.clone();
                        self.events.push_back(CmEvent::Established { conn: remote_comm_id, peer });
                    }
                }
            }
            CmMessage::Rej(rej) => self.on_rej(src, rej),
            CmMessage::Dreq { local_comm_id, remote_comm_id, .. } => {
                self.on_dreq(now, src, local_comm_id, remote_comm_id)
            }
            CmMessage::Drep { remote_comm_id, .. } => {
                if self.conns.get(&remote_comm_id).is_some_and(|c| c.peer_addr == src && c.state == State::DreqSent) {
                    self.enter_timewait(now, remote_comm_id);
                    self.events.push_back(CmEvent::Disconnected { conn: remote_comm_id });
                }
            }
            CmMessage::Mra { remote_comm_id, service_timeout, .. } => {
                // The peer needs longer to answer our REQ or REP: wait its service timeout (4.096 us * 2^n) on
                // top of ours. In any other state there is nothing to wait for (and a stale attempt or a
                // time-wait must not be kept by the peer).
                let awaiting = |c: &Conn| matches!(c.state, State::ReqSent | State::RepSent);
                if let Some(c) = self.conns.get_mut(&remote_comm_id).filter(|c| c.peer_addr == src && awaiting(c)) {
                    let extra = Duration::from_nanos(4096u64 << service_timeout.min(31));
                    c.deadline = c.deadline.map(|d| d.max(now + self.config.response_timeout + extra));
                }
            }
        }
    }

    fn on_req(&mut self, src: IpAddr, dst: IpAddr, tid: u64, req: Req) {
        if let Some(&conn) = self.by_remote.get(&(src, req.local_comm_id)) {
            // A retransmitted REQ: answer again with what we answered (a REP); while the application still
            // decides, with an MRA asking the peer to wait longer; for an attempt given up on or a connection
            // closed since, with a stale-connection REJ of the REQ — which a peer still waiting for its REP
            // finds by its own communication id (Linux's CM matches a REJ of a REQ so) and stops at once.
            let Some(c) = self.conns.get(&conn) else { return };
            let answer = match (c.state, c.last_sent) {
                (State::TimeWait | State::Stale, _) => {
                    reject_mad(conn, req.local_comm_id, tid, mad::message::REQ, reject_reason::STALE_CONNECTION, &[])
                }
                (_, Some(mad)) => mad,
                (_, None) => CmMessage::Mra {
                    local_comm_id: conn,
                    remote_comm_id: req.local_comm_id,
                    message_mraed: mad::message::REQ,
                    service_timeout: MRA_SERVICE_TIMEOUT,
                    private_data: Vec::new(),
                }
                .emit(&MadHeader::cm(mad::attr::MRA, tid))
                .expect("no private data"),
            };
            self.transmit.push_back((src, answer));
            return;
        }
        let port = cma::port_of(req.service_id);
        let listening = port.and_then(|p| self.listeners.get(&p).map(|b| (p, *b)));
        let Some((port, backlog)) = listening else {
            // As Linux's CM answers a REQ for a service nobody listens on.
            let rej = reject_mad(0, req.local_comm_id, tid, mad::message::REQ, reject_reason::INVALID_SERVICE_ID, &[]);
            self.transmit.push_back((src, rej));
            return;
        };
        let waiting = self.conns.values().filter(|c| c.state == State::ReqReceived && c.listener == port).count();
        let Ok((cma_header, app_data)) = CmaHeader::parse(&req.private_data) else {
            let rej = reject_mad(0, req.local_comm_id, tid, mad::message::REQ, reject_reason::UNSUPPORTED, &[]);
            self.transmit.push_back((src, rej));
            return;
        };
        if waiting >= backlog {
            let rej = reject_mad(0, req.local_comm_id, tid, mad::message::REQ, reject_reason::NO_RESOURCES, &[]);
            self.transmit.push_back((src, rej));
            return;
        }
        let conn = self.new_id();
        let peer = PeerParams {
            addr: src,
            port: cma_header.src_port,
            qpn: req.local_qpn,
            start_psn: req.starting_psn,
            path_mtu: req.path_mtu,
            responder_resources: req.responder_resources,
            initiator_depth: req.initiator_depth,
            retry_count: req.retry_count,
            rnr_retry_count: req.rnr_retry_count,
            flow_label: req.primary_path.flow_label,
            private_data: app_data.to_vec(),
        };
        let local_addr = if cma_header.dst.is_unspecified() { dst } else { cma_header.dst };
        self.conns.insert(
            conn,
            Conn {
                state: State::ReqReceived,
                remote_id: req.local_comm_id,
                peer_addr: src,
                tid,
                last_sent: None,
                retries_left: self.config.max_retries,
                deadline: None,
                peer: peer.clone(),
                listener: port,
                // The active side resends its REQ every remote CM response timeout, max CM retries times.
                peer_req_span: (cm_timeout(req.remote_cm_response_timeout) * (u32::from(req.max_cm_retries) + 1))
                    .min(MAX_STALE),
            },
        );
        self.by_remote.insert((src, req.local_comm_id), conn);
        self.events.push_back(CmEvent::ConnectRequest { conn, local_port: port, local_addr, peer });
    }

    fn on_rep(&mut self, src: IpAddr, rep: Rep) {
        let conn = rep.remote_comm_id;
        let Some(c) = self.conns.get_mut(&conn).filter(|c| c.peer_addr == src) else { return };
        match c.state {
            State::ReqSent => {
                c.remote_id = rep.local_comm_id;
                c.state = State::Established;
                c.deadline = None;
                c.peer.qpn = rep.local_qpn;
                c.peer.start_psn = rep.starting_psn;
                c.peer.responder_resources = rep.responder_resources;
                c.peer.initiator_depth = rep.initiator_depth;
                c.peer.rnr_retry_count = rep.rnr_retry_count;
                c.peer.private_data = rep.private_data.clone();
                let tid = c.tid;
                let peer = c.peer.clone();
                let rtu = rtu_mad(conn, rep.local_comm_id, tid);
                c.last_sent = Some(rtu);
                self.by_remote.insert((src, rep.local_comm_id), conn);
                self.transmit.push_back((src, rtu));
                self.events.push_back(CmEvent::Established { conn, peer });
            }
            // Our RTU was lost and the peer repeats its REP: repeat the RTU.
            State::Established => {
                let rtu = rtu_mad(conn, rep.local_comm_id, c.tid);
                self.transmit.push_back((src, rtu));
            }
            _ => {}
        }
    }

    fn on_rej(&mut self, src: IpAddr, rej: Rej) {
        let conn = rej.remote_comm_id;
        let Some(c) = self.conns.get(&conn).filter(|c| c.peer_addr == src) else { return };
        if matches!(c.state, State::ReqSent | State::RepSent) {
            self.forget(conn);
            self.events.push_back(CmEvent::Rejected { conn, reason: rej.reason, private_data: rej.private_data });
        }
    }

    fn on_dreq(&mut self, now: Instant, src: IpAddr, remote_id: u32, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn).filter(|c| c.peer_addr == src && c.remote_id == remote_id) else {
            // Unknown or already forgotten: answer anyway so the peer stops asking (IBTA 12.9.6).
            let drep = drep_mad(conn, remote_id, 0);
            self.transmit.push_back((src, drep));
            return;
        };
        let drep = drep_mad(conn, remote_id, c.tid);
        self.transmit.push_back((src, drep));
        match c.state {
            State::Established | State::RepSent | State::DreqSent => {
                self.enter_timewait(now, conn);
                self.events.push_back(CmEvent::Disconnected { conn });
            }
            _ => {}
        }
    }

    fn enter_timewait(&mut self, now: Instant, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.state = State::TimeWait;
            c.deadline = Some(now + self.config.timewait);
        }
    }

    fn send(&mut self, now: Instant, conn: ConnId, mad: [u8; MAD_LEN], await_reply: bool) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.last_sent = Some(mad);
        if await_reply {
            c.deadline = Some(now + self.config.response_timeout);
        }
        self.transmit.push_back((c.peer_addr, mad));
    }

    fn forget(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.remove(&conn) {
            self.by_remote.remove(&(c.peer_addr, c.remote_id));
            self.stale -= usize::from(c.state == State::Stale);
        }
    }
}

/// A REJ of message `rejected` (`mad::message`), as the connection's state gives it.
fn reject_mad(local: u32, remote: u32, tid: u64, rejected: u8, reason: u16, private_data: &[u8]) -> [u8; MAD_LEN] {
    CmMessage::Rej(Rej {
        local_comm_id: local,
        remote_comm_id: remote,
        message_rejected: rejected,
        ari_len: 0,
        reason,
        ari: [0; 72],
        private_data: private_data.to_vec(),
    })
    .emit(&MadHeader::cm(mad::attr::REJ, tid))
    .expect("private data length checked by the caller")
}

/// A REJ for a timeout: its additional rejection information is the rejecting CA's GUID (IBTA 12.6.7).
fn timeout_reject_mad(local: u32, remote: u32, tid: u64, rejected: u8, node_guid: u64) -> [u8; MAD_LEN] {
    let mut ari = [0; 72];
    ari[..8].copy_from_slice(&node_guid.to_be_bytes());
    CmMessage::Rej(Rej {
        local_comm_id: local,
        remote_comm_id: remote,
        message_rejected: rejected,
        ari_len: 8,
        reason: reject_reason::TIMEOUT,
        ari,
        private_data: Vec::new(),
    })
    .emit(&MadHeader::cm(mad::attr::REJ, tid))
    .expect("no private data")
}

fn rtu_mad(local: u32, remote: u32, tid: u64) -> [u8; MAD_LEN] {
    CmMessage::Rtu { local_comm_id: local, remote_comm_id: remote, private_data: Vec::new() }
        .emit(&MadHeader::cm(mad::attr::RTU, tid))
        .expect("no private data")
}

fn drep_mad(local: u32, remote: u32, tid: u64) -> [u8; MAD_LEN] {
    CmMessage::Drep { local_comm_id: local, remote_comm_id: remote, private_data: Vec::new() }
        .emit(&MadHeader::cm(mad::attr::DREP, tid))
        .expect("no private data")
}
