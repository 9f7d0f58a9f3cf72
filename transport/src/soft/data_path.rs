//! The soft provider's data path, sans-IO: the queue pairs of one owner (the device's worker today, a poll
//! group's lane next), their RC engines, shared receive queues and registered memory, and the timers of the
//! engines. It is fed packets ([`DataPath::handle_packet`]), work requests, state changes and time
//! ([`DataPath::handle_timeout`]); it hands back datagrams and fatal queue pair errors
//! ([`DataPath::poll_output`]) and when it next needs the clock ([`DataPath::poll_timeout`]). Completions go
//! straight into the queue pairs' completion queues, the hand-off point to the application.
//!
//! Cost follows activity, not size: only queue pairs something happened to since the last output are visited
//! (`dirty`), and deadlines live in an ordered set, so a thousand idle connections cost nothing per packet.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::cm::{ConnId, PeerParams, StartPsns};
use super::memory_table::MemoryTable;
use super::rc::{EngineState, RcConfig, RcQp, RecvWr, SendWr, WcOpcode, WcStatus, WorkCompletion};
use super::wire::{PacketRepr, ROCEV2_UDP_PORT};
use crate::device::{Completion, CompletionQueue, ConnectionOptions, DeviceError, QpState, QpTransition};
use crate::region::{Access, RegionKeys};

/// What every engine of a data path is configured with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DataPathConfig {
    /// The device's UDP port: on 4791 connections send from rxe's source ports, otherwise from this one.
    pub port: u16,
    pub ack_timeout: Duration,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub window: u32,
}

/// A datagram to send: RoCEv2 from the BTH on, without the ICRC (the driver adds it for the header it sends).
#[derive(Debug)]
pub(crate) struct Datagram {
    pub dst: SocketAddr,
    pub bytes: Vec<u8>,
    /// The UDP source port rxe would use for the connection, when the device serves the standard port.
    pub source_port: Option<u16>,
}

/// A queue pair as its owner holds it.
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
    /// Packets from the peer that arrived before the engine started (the peer may send as soon as it has our
    /// REP, and its first request can overtake the RTU on another socket or in the same batch): replayed
    /// when it starts, at most [`EARLY_PACKETS`].
    early_packets: Vec<(IpAddr, Vec<u8>)>,
    peer: Option<SocketAddr>,
    conn: Option<ConnId>,
    /// The PSN this queue pair expects first, advertised in its REQ or REP (or, driven by hand, where it sends
    /// from until RTS says otherwise).
    start_psn: u32,
    fatal_reported: bool,
    source_port: Option<u16>,
    /// The engine's deadline as `timers` holds it.
    armed: Option<Instant>,
    /// Listed in `dirty`.
    dirty: bool,
}

/// Packets kept for a queue pair whose connection is coming up (its peer's window is far larger; what is
/// beyond this is retransmitted by the peer).
const EARLY_PACKETS: usize = 64;

pub(crate) struct DataPath {
    config: DataPathConfig,
    qps: HashMap<u32, QpSlot>,
    memory: MemoryTable,
    /// Shared receive queues: their domain and the receives posted on them.
    srqs: HashMap<u32, (u32, VecDeque<RecvWr>)>,
    /// Queue pairs fed (a packet, a post, a timeout, a state change) since the last output.
    dirty: Vec<u32>,
    /// Engine deadlines, earliest first.
    timers: BTreeSet<(Instant, u32)>,
}

impl DataPath {
    pub fn new(config: DataPathConfig) -> DataPath {
        DataPath {
            config,
            qps: HashMap::new(),
            memory: MemoryTable::default(),
            srqs: HashMap::new(),
            dirty: Vec::new(),
            timers: BTreeSet::new(),
        }
    }

    fn touch(&mut self, qpn: u32) {
        if let Some(slot) = self.qps.get_mut(&qpn)
            && !slot.dirty
        {
            slot.dirty = true;
            self.dirty.push(qpn);
        }
    }

    pub fn queue_pairs(&self) -> usize {
        self.qps.len()
    }

    pub fn contains(&self, qpn: u32) -> bool {
        self.qps.contains_key(&qpn)
    }

    /// Whether regions, queue pairs or shared receive queues still belong to `pd`.
    pub fn pd_in_use(&self, pd: u32) -> bool {
        self.memory.in_domain(pd) > 0 || self.qps.values().any(|q| q.pd == pd) || self.srqs.values().any(|s| s.0 == pd)
    }

    pub fn regions(&self) -> (usize, usize) {
        (self.memory.len(), self.memory.bytes())
    }

    pub fn shared_receive_queues(&self) -> usize {
        self.srqs.len()
    }

    pub fn register(
        &mut self,
        pd: u32,
        memory: crate::region::RegionMemory,
        access: Access,
    ) -> Result<RegionKeys, DeviceError> {
        // The responder copies a region's bytes into its datagrams from memory it owns: it cannot reach an
        // arena whose pieces the application holds (and needs none to avoid a copy).
        let crate::region::RegionMemory::Owned(buf) = memory else {
            return Err(DeviceError::Unsupported(
                "the soft provider does not register arenas (post their buffers as they are)",
            ));
        };
        let len = buf.len();
        self.memory.register(pd, buf, access).map_err(|_| DeviceError::RegionTooLarge(len))
    }

    pub fn deregister(&mut self, key: u32) -> Result<crate::buffer::Buffer, DeviceError> {
        self.memory.deregister(key).ok_or(DeviceError::UnknownRegion(key))
    }

    /// Receives posted on the shared receive queues and not yet taken.
    pub fn srq_receives(&self) -> usize {
        self.srqs.values().map(|(_, q)| q.len()).sum()
    }

    pub fn create_srq(&mut self, id: u32, pd: u32) {
        self.srqs.insert(id, (pd, VecDeque::new()));
    }

    /// Destroys a shared receive queue and hands back what was posted on it; refused while queue pairs use it.
    pub fn destroy_srq(&mut self, id: u32) -> Result<Vec<RecvWr>, DeviceError> {
        if self.qps.values().any(|q| q.srq == Some(id)) {
            return Err(DeviceError::SrqBusy(id));
        }
        let (_, queue) = self.srqs.remove(&id).ok_or(DeviceError::UnknownSrq(id))?;
        Ok(queue
            .into_iter()
            .map(|mut wr| {
                crate::work_request::scatter(&mut wr.buf, &mut wr.sg_list, 0);
                wr
            })
            .collect())
    }

    pub fn post_srq_recv(&mut self, id: u32, mut wr: RecvWr) {
        match self.srqs.get_mut(&id) {
            Some((_, queue)) => {
                crate::work_request::gather(&mut wr.buf, &wr.sg_list);
                queue.push_back(wr)
            }
            None => tracing::warn!(srq = id, wr_id = wr.wr_id, "receive posted on a destroyed shared receive queue"),
        }
    }

    /// Whether `srq` exists in `pd`.
    pub fn srq_in(&self, srq: u32, pd: u32) -> bool {
        self.srqs.get(&srq).is_some_and(|(p, _)| *p == pd)
    }

    /// A queue pair in RESET. The caller has checked its domain and shared receive queue.
    pub fn create_qp(
        &mut self,
        qpn: u32,
        pd: u32,
        send_cq: CompletionQueue,
        recv_cq: CompletionQueue,
        srq: Option<u32>,
        start_psn: u32,
    ) {
        let slot = QpSlot {
            pd,
            srq,
            state: QpState::Reset,
            send_cq,
            recv_cq,
            engine: None,
            early_recvs: Vec::new(),
            early_sends: Vec::new(),
            early_packets: Vec::new(),
            peer: None,
            conn: None,
            start_psn,
            fatal_reported: false,
            source_port: None,
            armed: None,
            dirty: false,
        };
        self.qps.insert(qpn, slot);
    }

    pub fn post_send(&mut self, qpn: u32, wr: SendWr) {
        self.touch(qpn);
        let Some(slot) = self.qps.get_mut(&qpn) else { return };
        match (slot.state, slot.engine.as_mut()) {
            (QpState::Rts, Some(engine)) => {
                if let Err((_, wr)) = engine.post_send(wr) {
                    slot.send_cq.push(Completion { qpn, wc: failed_send(wr) });
                    // Nothing posted after a request that could not go may execute: a read's response must
                    // not reach the host without the data WRITE before it.
                    engine.set_state(EngineState::Error);
                }
            }
            // Connecting through the CM: the request goes out once the connection is up.
            (QpState::Reset | QpState::Init, None) if slot.conn.is_some() => slot.early_sends.push(wr),
            // Sends before RTS, or after an error, are refused (and the buffer handed back).
            _ => slot.send_cq.push(Completion { qpn, wc: failed_send(wr) }),
        }
    }

    pub fn post_recv(&mut self, qpn: u32, wr: RecvWr) {
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

    /// Moves a queue pair by hand (no CM); `path_mtu` is the most the device carries now.
    pub fn modify_qp(&mut self, qpn: u32, transition: QpTransition, path_mtu: usize) -> Result<QpState, DeviceError> {
        self.touch(qpn);
        let window = self.config.window;
        let device_port = self.config.port;
        let slot = self.qps.get_mut(&qpn).ok_or(DeviceError::UnknownQp(qpn))?;
        let bad = |from, to| Err(DeviceError::BadTransition { qpn, from, to });
        match transition {
            QpTransition::Init => match slot.state {
                QpState::Reset | QpState::Init => slot.state = QpState::Init,
                from => return bad(from, "INIT"),
            },
            QpTransition::Rtr { peer, dest_qpn, rq_psn, path_mtu: mtu, min_rnr_timer, max_dest_rd_atomic } => {
                if slot.state != QpState::Init {
                    return bad(slot.state, "RTR");
                }
                let config = RcConfig {
                    mtu: mtu.min(path_mtu),
                    min_rnr_timer,
                    max_dest_rd_atomic,
                    window,
                    ..RcConfig::new(qpn, dest_qpn, slot.start_psn, rq_psn)
                };
                let mut engine = RcQp::new(config)?;
                engine.set_state(EngineState::Rtr);
                for wr in slot.early_recvs.drain(..) {
                    let _ = engine.post_recv(wr);
                }
                slot.engine = Some(engine);
                slot.peer = Some(peer);
                slot.source_port = rxe_source_port(device_port, 0, qpn, dest_qpn);
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

    /// Flushes and forgets a queue pair; what the connection manager and the sockets must let go of: its
    /// connection and its source port (if no other queue pair sends from it).
    pub fn destroy_qp(&mut self, qpn: u32) -> (Option<ConnId>, Option<u16>) {
        self.flush_qp(qpn);
        let Some(slot) = self.qps.remove(&qpn) else { return (None, None) };
        if let Some(t) = slot.armed {
            self.timers.remove(&(t, qpn));
        }
        let port = slot.source_port.filter(|&p| !self.qps.values().any(|q| q.source_port == Some(p)));
        (slot.conn, port)
    }

    pub fn qpns(&self) -> Vec<u32> {
        self.qps.keys().copied().collect()
    }

    /// What a connection needs of its queue pair before the CM exchange: it must be unconnected in RESET or
    /// INIT; its first PSN.
    pub fn connectable(&self, qpn: u32, to: &'static str) -> Result<u32, DeviceError> {
        let slot = self.qps.get(&qpn).ok_or(DeviceError::UnknownQp(qpn))?;
        if !matches!(slot.state, QpState::Reset | QpState::Init) || slot.conn.is_some() {
            return Err(DeviceError::BadTransition { qpn, from: slot.state, to });
        }
        Ok(slot.start_psn)
    }

    /// The queue pair now carries `conn` to `peer`.
    pub fn bind_connection(&mut self, qpn: u32, conn: ConnId, peer: SocketAddr) {
        if let Some(slot) = self.qps.get_mut(&qpn) {
            slot.conn = Some(conn);
            slot.peer = Some(peer);
        }
    }

    /// Gives a queue pair its engine once both ends' parameters are known (RTR and RTS in one step, as
    /// rdma_cm does); `path_mtu` is the most the device carries now.
    pub fn start_engine(
        &mut self,
        now: Instant,
        qpn: u32,
        peer: &PeerParams,
        options: ConnectionOptions,
        path_mtu: usize,
    ) {
        let config = self.config;
        let Some(slot) = self.qps.get_mut(&qpn) else { return };
        let mtu = crate::mtu::mtu_bytes(peer.path_mtu).min(path_mtu);
        let psns = StartPsns::new(slot.start_psn, peer);
        let rc = RcConfig {
            mtu,
            retry_cnt: options.retry_count.min(config.retry_cnt),
            rnr_retry: options.rnr_retry_count.min(config.rnr_retry),
            ack_timeout: config.ack_timeout,
            window: config.window,
            // READs we issue: what we asked for, within what the peer grants; READs we serve: what we grant.
            max_rd_atomic: options.initiator_depth.min(peer.responder_resources).max(1),
            max_dest_rd_atomic: options.responder_resources.max(1),
            ..RcConfig::new(qpn, peer.qpn, psns.send, psns.recv)
        };
        let Ok(mut engine) = RcQp::new(rc) else {
            tracing::warn!(qpn, ?peer, "unusable connection parameters");
            return;
        };
        for wr in slot.early_recvs.drain(..) {
            let _ = engine.post_recv(wr);
        }
        for wr in slot.early_sends.drain(..) {
            let _ = engine.post_send(wr);
        }
        for (from, bytes) in std::mem::take(&mut slot.early_packets) {
            if slot.peer.map(|p| p.ip()) == Some(from)
                && let Ok((packet, _)) = PacketRepr::parse(&bytes)
            {
                let srq = slot.srq.and_then(|id| self.srqs.get_mut(&id)).map(|(_, queue)| queue);
                engine.handle_packet_with(now, &packet, &mut self.memory.domain(slot.pd), srq);
            }
        }
        slot.engine = Some(engine);
        slot.state = QpState::Rts;
        slot.source_port = rxe_source_port(config.port, peer.flow_label, qpn, peer.qpn);
        self.touch(qpn);
    }

    /// The connection is gone (rdma_cm moves the queue pair to the error state): outstanding work is flushed.
    pub fn connection_lost(&mut self, qpn: u32) {
        if let Some(slot) = self.qps.get_mut(&qpn) {
            if let Some(engine) = slot.engine.as_mut() {
                engine.set_state(EngineState::Error);
            }
            slot.state = QpState::Error;
        }
        self.touch(qpn);
    }

    /// The connection never came up: the sends posted for it fail.
    pub fn connection_failed(&mut self, qpn: u32) {
        let Some(slot) = self.qps.get_mut(&qpn) else { return };
        slot.conn = None;
        for wr in slot.early_sends.drain(..) {
            slot.send_cq.push(Completion { qpn, wc: failed_send(wr) });
        }
    }

    /// The device failed or went away: every queue pair to the error state.
    pub fn fail_all(&mut self) {
        let qpns: Vec<u32> = self.qps.keys().copied().collect();
        for qpn in qpns {
            if let Some(engine) = self.qps.get_mut(&qpn).and_then(|s| s.engine.as_mut()) {
                engine.set_state(EngineState::Error);
            }
            self.touch(qpn);
        }
    }

    /// One RC packet (ICRC checked; `bytes` is the datagram it was parsed from) from `from`; false when no
    /// queue pair of ours takes it.
    pub fn handle_packet(&mut self, now: Instant, from: IpAddr, bytes: &[u8], packet: &PacketRepr<'_>) -> bool {
        let qpn = packet.bth.dest_qp;
        let Some(slot) = self.qps.get_mut(&qpn) else { return false };
        // Only the connected peer may talk to an RC queue pair (from any source port: rxe varies it).
        if slot.peer.map(|p| p.ip()) != Some(from) {
            return false;
        }
        let Some(engine) = slot.engine.as_mut() else {
            if slot.conn.is_none() || slot.early_packets.len() >= EARLY_PACKETS {
                return false;
            }
            slot.early_packets.push((from, bytes.to_vec()));
            return true;
        };
        let srq = slot.srq.and_then(|id| self.srqs.get_mut(&id)).map(|(_, queue)| queue);
        engine.handle_packet_with(now, packet, &mut self.memory.domain(slot.pd), srq);
        self.touch(qpn);
        true
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|&(t, _)| t)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
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

    /// What the queue pairs fed since the last call have to send, their completions (pushed to their
    /// completion queues) and, once per queue pair, a fatal error that was not a flush.
    pub fn poll_output(&mut self, now: Instant, out: &mut Vec<Datagram>, fatal: &mut Vec<(u32, WcStatus)>) {
        for qpn in std::mem::take(&mut self.dirty) {
            let Some(slot) = self.qps.get_mut(&qpn) else { continue };
            slot.dirty = false;
            let Some(engine) = slot.engine.as_mut() else { continue };
            if let Some(dst) = slot.peer {
                while let Some(bytes) = engine.poll_transmit(now) {
                    out.push(Datagram { dst, bytes, source_port: slot.source_port });
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
                    fatal.push((qpn, cause));
                }
            }
        }
    }
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
fn flushed(wr_id: u64, opcode: WcOpcode, buf: crate::Buffer, sg_list: Vec<crate::Buffer>) -> WorkCompletion {
    WorkCompletion::new(wr_id, WcStatus::WrFlush, opcode, 0, buf, sg_list, 0)
}

#[cfg(test)]
mod tests {
    //! The data path with no socket, thread or clock: datagrams are handed from one to the other by hand, and
    //! time is whatever the test says.
    use super::*;
    use crate::soft::rc::SendOp;

    const A: &str = "127.0.0.1:4791";
    const B: &str = "127.0.0.2:4791";

    fn data_path() -> DataPath {
        DataPath::new(DataPathConfig {
            port: 4792, // not the standard port: datagrams say no source port
            ack_timeout: Duration::from_millis(100),
            retry_cnt: 7,
            rnr_retry: 7,
            window: 128,
        })
    }

    /// A queue pair moved to RTS by hand towards `dest_qpn` at `peer`.
    fn connected(dp: &mut DataPath, qpn: u32, dest_qpn: u32, peer: &str, cq: &CompletionQueue) {
        dp.create_qp(qpn, 1, cq.clone(), cq.clone(), None, 100);
        let peer = peer.parse().expect("address");
        let rtr =
            QpTransition::Rtr { peer, dest_qpn, rq_psn: 100, path_mtu: 1024, min_rnr_timer: 12, max_dest_rd_atomic: 4 };
        let rts = QpTransition::Rts {
            sq_psn: 100,
            ack_timeout: Duration::from_millis(100),
            retry_cnt: 7,
            rnr_retry: 7,
            max_rd_atomic: 4,
        };
        for t in [QpTransition::Init, rtr, rts] {
            dp.modify_qp(qpn, t, 4096).expect("transition");
        }
    }

    /// Everything `from` has to send, delivered to `to` (as if from `from_ip`); how many datagrams.
    fn deliver(now: Instant, from: &mut DataPath, to: &mut DataPath, from_ip: &str) -> usize {
        let (mut out, mut fatal) = (Vec::new(), Vec::new());
        from.poll_output(now, &mut out, &mut fatal);
        assert!(fatal.is_empty(), "{fatal:?}");
        let ip: SocketAddr = from_ip.parse().expect("address");
        for d in &out {
            let mut bytes = d.bytes.clone();
            bytes.extend_from_slice(&[0; 4]); // the ICRC, which the driver checks before this layer
            let (packet, _) = PacketRepr::parse(&bytes).expect("a packet we built");
            assert!(to.handle_packet(now, ip.ip(), &bytes, &packet));
        }
        out.len()
    }

    #[test]
    fn a_send_crosses_two_data_paths_and_completes_on_both() {
        let (mut a, mut b) = (data_path(), data_path());
        let (cq_a, cq_b) = (CompletionQueue::new(), CompletionQueue::new());
        connected(&mut a, 0x11, 0x22, B, &cq_a);
        connected(&mut b, 0x22, 0x11, A, &cq_b);
        b.post_recv(0x22, RecvWr::new(7, vec![0; 3000]));
        a.post_send(0x11, SendWr::new(9, SendOp::Send, vec![0x5a; 2500]));
        let now = Instant::now();
        assert_eq!(deliver(now, &mut a, &mut b, A), 3, "2 500 bytes at a 1 024-byte MTU");
        assert_eq!(deliver(now, &mut b, &mut a, B), 1, "one ACK for the message");
        let got = cq_b.poll(8);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].wc.wr_id, got[0].wc.status, got[0].wc.byte_len), (7, WcStatus::Success, 2500));
        assert!(got[0].wc.buf[..2500].iter().all(|&x| x == 0x5a));
        // The ACK retires the SEND (its completion comes with the next output); nothing more to send, no
        // deadline left.
        assert_eq!(deliver(now, &mut a, &mut b, A), 0);
        let sent = cq_a.poll(8);
        assert_eq!((sent.len(), sent[0].wc.wr_id, sent[0].wc.status), (1, 9, WcStatus::Success));
        assert_eq!(a.poll_timeout(), None);
    }

    #[test]
    fn idle_queue_pairs_are_not_visited_and_only_the_due_timer_fires() {
        let (mut a, mut b) = (data_path(), data_path());
        let cq = CompletionQueue::new();
        for i in 0..1000 {
            connected(&mut a, 0x100 + i, 0x900 + i, B, &cq);
        }
        let now = Instant::now();
        // The hand transitions fed every queue pair once; after that output, all of them are idle.
        assert_eq!(deliver(now, &mut a, &mut b, A), 0);
        assert!(a.dirty.is_empty());
        a.post_send(0x200, SendWr::new(1, SendOp::Send, vec![1; 10]));
        assert_eq!(a.dirty, vec![0x200], "one post, one queue pair to visit");
        let (mut out, mut fatal) = (Vec::new(), Vec::new());
        a.poll_output(now, &mut out, &mut fatal);
        assert_eq!(out.len(), 1);
        let deadline = a.poll_timeout().expect("the send waits for its ACK");
        assert!(deadline > now && deadline <= now + Duration::from_millis(100));
        assert_eq!(a.timers.len(), 1, "idle queue pairs hold no timer");
        // Before the deadline nothing fires; at it, the lost SEND goes again with the same PSN.
        a.handle_timeout(deadline - Duration::from_millis(1));
        a.poll_output(now, &mut out, &mut fatal);
        assert_eq!(out.len(), 1);
        a.handle_timeout(deadline);
        a.poll_output(deadline, &mut out, &mut fatal);
        assert_eq!(out.len(), 2, "retransmitted once");
        assert_eq!(out[0].bytes, out[1].bytes);
        assert!(fatal.is_empty());
        // A destroyed queue pair leaves no timer behind, and its send comes back flushed.
        let (conn, _) = a.destroy_qp(0x200);
        assert_eq!(conn, None);
        assert_eq!(a.poll_timeout(), None);
        let flushed = cq.poll(8);
        assert_eq!((flushed.len(), flushed[0].wc.status), (1, WcStatus::WrFlush));
    }

    #[test]
    fn a_packet_from_another_peer_or_for_no_queue_pair_is_refused() {
        let (mut a, mut b) = (data_path(), data_path());
        let cq = CompletionQueue::new();
        connected(&mut a, 0x11, 0x22, B, &cq);
        connected(&mut b, 0x22, 0x11, A, &cq);
        a.post_send(0x11, SendWr::new(1, SendOp::Send, vec![1; 10]));
        let (mut out, mut fatal) = (Vec::new(), Vec::new());
        a.poll_output(Instant::now(), &mut out, &mut fatal);
        let mut bytes = out[0].bytes.clone();
        bytes.extend_from_slice(&[0; 4]);
        let (packet, _) = PacketRepr::parse(&bytes).expect("packet");
        let stranger: IpAddr = "127.0.0.3".parse().expect("address");
        assert!(!b.handle_packet(Instant::now(), stranger, &bytes, &packet));
        b.destroy_qp(0x22);
        assert!(!b.handle_packet(Instant::now(), "127.0.0.1".parse().expect("address"), &bytes, &packet));
    }

    /// The peer may send as soon as it has our REP; its first request can arrive before our engine starts
    /// (before the RTU is handled, in the same batch or on another thread's socket). It is kept and replayed.
    #[test]
    fn a_request_before_the_engine_starts_is_kept_and_replayed() {
        let (mut host, mut target) = (data_path(), data_path());
        let (cq_host, cq_target) = (CompletionQueue::new(), CompletionQueue::new());
        connected(&mut host, 0x11, 0x22, B, &cq_host);
        // The target's queue pair is bound to its connection but has no engine yet.
        target.create_qp(0x22, 1, cq_target.clone(), cq_target.clone(), None, 100);
        target.post_recv(0x22, RecvWr::new(5, vec![0; 64]));
        target.bind_connection(0x22, 7, A.parse().expect("address"));
        host.post_send(0x11, SendWr::new(1, SendOp::Send, vec![0xc3; 64]));
        let now = Instant::now();
        assert_eq!(deliver(now, &mut host, &mut target, A), 1, "kept, not dropped");
        assert!(cq_target.poll(4).is_empty());
        let peer = PeerParams {
            addr: "127.0.0.1".parse().expect("address"),
            port: 4791,
            qpn: 0x11,
            start_psn: 100,
            path_mtu: crate::mtu::mtu_code(1024),
            responder_resources: 4,
            initiator_depth: 4,
            retry_count: 7,
            rnr_retry_count: 7,
            flow_label: 0,
            private_data: Vec::new(),
        };
        target.start_engine(now, 0x22, &peer, ConnectionOptions::default(), 4096);
        assert_eq!(deliver(now, &mut target, &mut host, B), 1, "the replayed SEND is ACKed");
        let got = cq_target.poll(4);
        assert_eq!((got.len(), got[0].wc.wr_id, got[0].wc.status), (1, 5, WcStatus::Success));
        assert_eq!(&got[0].wc.buf[..64], &[0xc3; 64][..]);
        // A queue pair with no connection keeps nothing.
        target.create_qp(0x33, 1, cq_target.clone(), cq_target.clone(), None, 100);
        let mut out = Vec::new();
        host.post_send(0x11, SendWr::new(2, SendOp::Send, vec![1; 8]));
        host.poll_output(now, &mut out, &mut Vec::new());
        let mut bytes = out[0].bytes.clone();
        bytes[5..8].copy_from_slice(&[0, 0, 0x33]);
        bytes.extend_from_slice(&[0; 4]);
        let (packet, _) = PacketRepr::parse(&bytes).expect("packet");
        assert!(!target.handle_packet(now, "127.0.0.1".parse().expect("address"), &bytes, &packet));
    }
}
