//! The connection manager against itself and against the kernel's MADs: connect, accept, reject with private
//! data, disconnect from either side, time-wait, lost and duplicated MADs, unreachable peers. Time is
//! simulated.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use nvme_proto::rdma_cm::{CmAccept, CmReject, CmRejectStatus, CmRequest};
use support::Rng;
use transport::soft::cm::{AcceptParams, Cm, CmConfig, CmEvent, ConnId, ConnectParams, State};
use transport::soft::wire::mad::{self, CmMessage};
use transport::soft::wire::udp_port;

const A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

fn cm(first_comm_id: u32) -> Cm {
    Cm::new(CmConfig {
        node_guid: 0x5054_00ff_fe00_0000 | first_comm_id as u64,
        response_timeout: Duration::from_millis(100),
        max_retries: 3,
        timewait: Duration::from_millis(300),
        first_comm_id,
    })
}

fn nvme_request(qid: u16) -> Vec<u8> {
    CmRequest { recfmt: 0, qid, hrqsize: 32, hsqsize: 31, cntlid: 0 }.to_bytes().to_vec()
}

fn connect_params(private_data: Vec<u8>) -> ConnectParams {
    ConnectParams {
        src: A,
        dst: B,
        src_port: 40000,
        dst_port: 4420,
        local_qpn: 0x11,
        start_psn: 0x12_3456,
        path_mtu: 3,
        responder_resources: 16,
        initiator_depth: 16,
        retry_count: 7,
        rnr_retry_count: 7,
        private_data,
    }
}

/// Two CMs wired together; `drop` decides, per MAD (sender index, attribute), whether the wire loses it.
struct Pair {
    cms: [Cm; 2],
    now: Instant,
    events: [Vec<CmEvent>; 2],
}

impl Pair {
    fn new() -> Pair {
        Pair { cms: [cm(0x100), cm(0x9000)], now: Instant::now(), events: [Vec::new(), Vec::new()] }
    }

    /// Moves MADs and time until nothing is pending or `until` passes.
    fn run(&mut self, until: Duration, mut drop: impl FnMut(usize, u16) -> bool) {
        let end = self.now + until;
        let addrs = [A, B];
        loop {
            let mut moved = false;
            for i in 0..2 {
                while let Some((dst, bytes)) = self.cms[i].poll_transmit() {
                    assert_eq!(dst, addrs[1 - i]);
                    moved = true;
                    let attr = u16::from_be_bytes([bytes[16], bytes[17]]);
                    if !drop(i, attr) {
                        let now = self.now;
                        self.cms[1 - i].handle_mad(now, addrs[i], addrs[1 - i], &bytes);
                    }
                }
                while let Some(e) = self.cms[i].poll_event() {
                    self.events[i].push(e);
                    moved = true;
                }
            }
            if moved {
                continue;
            }
            let next = self.cms.iter().filter_map(|c| c.poll_timeout()).min();
            match next {
                Some(t) if t <= end => {
                    self.now = t;
                    for c in &mut self.cms {
                        c.handle_timeout(t);
                    }
                }
                _ => break,
            }
        }
    }

    fn take(&mut self, i: usize) -> Vec<CmEvent> {
        std::mem::take(&mut self.events[i])
    }
}

fn accept_params() -> AcceptParams {
    AcceptParams {
        local_qpn: 0x22,
        start_psn: 0x65_4321,
        responder_resources: 16,
        initiator_depth: 16,
        rnr_retry_count: 7,
        private_data: CmAccept { recfmt: 0, crqsize: 32 }.to_bytes().to_vec(),
    }
}

/// Connects through the pair and returns (active id, passive id).
fn establish(pair: &mut Pair, drop: impl FnMut(usize, u16) -> bool + Copy) -> (ConnId, ConnId) {
    pair.cms[1].listen(4420, 8).unwrap();
    let now = pair.now;
    let active = pair.cms[0].connect(now, connect_params(nvme_request(1))).unwrap();
    pair.run(Duration::from_millis(50), drop);
    let events = pair.take(1);
    let Some(CmEvent::ConnectRequest { conn: passive, local_port, local_addr, peer }) = events.first().cloned() else {
        panic!("no connect request: {events:?}")
    };
    assert_eq!(
        (local_port, local_addr, peer.addr, peer.port, peer.qpn, peer.start_psn),
        (4420, B, A, 40000, 0x11, 0x12_3456)
    );
    assert_eq!(peer.flow_label, udp_port::cm_flow_label(40000, 4420));
    assert_eq!(CmRequest::parse(&peer.private_data).unwrap().qid, 1);
    let now = pair.now;
    pair.cms[1].accept(now, passive, accept_params()).unwrap();
    pair.run(Duration::from_secs(5), drop);
    (active, passive)
}

#[test]
fn connect_accept_disconnect_and_timewait() {
    let mut pair = Pair::new();
    let (active, passive) = establish(&mut pair, |_, _| false);
    let Some(CmEvent::Established { conn, peer }) = pair.take(0).first().cloned() else {
        panic!("active not established")
    };
    assert_eq!((conn, peer.qpn, peer.start_psn), (active, 0x22, 0x65_4321));
    assert_eq!(CmAccept::parse(&peer.private_data).unwrap().crqsize, 32);
    assert!(matches!(pair.take(1).as_slice(), [CmEvent::Established { conn, .. }] if *conn == passive));
    assert_eq!(
        (pair.cms[0].state(active), pair.cms[1].state(passive)),
        (Some(State::Established), Some(State::Established))
    );

    let now = pair.now;
    pair.cms[0].disconnect(now, active).unwrap();
    pair.cms[0].disconnect(now, active).unwrap(); // idempotent
    pair.run(Duration::from_millis(50), |_, _| false);
    assert_eq!(pair.take(0), vec![CmEvent::Disconnected { conn: active }]);
    assert_eq!(pair.take(1), vec![CmEvent::Disconnected { conn: passive }]);
    pair.run(Duration::from_secs(1), |_, _| false);
    assert_eq!(pair.take(0), vec![CmEvent::TimewaitExit { conn: active }]);
    assert_eq!(pair.take(1), vec![CmEvent::TimewaitExit { conn: passive }]);
    assert_eq!((pair.cms[0].connections(), pair.cms[1].connections()), (0, 0));
}

#[test]
fn passive_side_disconnects() {
    let mut pair = Pair::new();
    let (active, passive) = establish(&mut pair, |_, _| false);
    pair.take(0);
    pair.take(1);
    let now = pair.now;
    pair.cms[1].disconnect(now, passive).unwrap();
    pair.run(Duration::from_millis(50), |_, _| false);
    assert_eq!(pair.take(0), vec![CmEvent::Disconnected { conn: active }]);
    assert_eq!(pair.take(1), vec![CmEvent::Disconnected { conn: passive }]);
}

#[test]
fn reject_carries_private_data() {
    let mut pair = Pair::new();
    pair.cms[1].listen(4420, 8).unwrap();
    let now = pair.now;
    let active = pair.cms[0].connect(now, connect_params(nvme_request(0))).unwrap();
    pair.run(Duration::from_millis(50), |_, _| false);
    let Some(CmEvent::ConnectRequest { conn, .. }) = pair.take(1).first().cloned() else { panic!() };
    let rej = CmReject::new(CmRejectStatus::InvalidHostRqSize).to_bytes();
    pair.cms[1].reject(conn, &rej).unwrap();
    assert!(pair.cms[1].reject(conn, &rej).is_err(), "already gone");
    pair.run(Duration::from_secs(1), |_, _| false);
    let events = pair.take(0);
    let [CmEvent::Rejected { conn, reason, private_data }] = events.as_slice() else { panic!("{events:?}") };
    assert_eq!((*conn, *reason), (active, mad::reject_reason::CONSUMER_DEFINED));
    assert_eq!(CmReject::parse(private_data).unwrap().status, CmRejectStatus::InvalidHostRqSize);
    assert_eq!(pair.cms[0].connections() + pair.cms[1].connections(), 0);
}

#[test]
fn no_listener_rejects_like_the_kernel() {
    let mut pair = Pair::new();
    let now = pair.now;
    let active = pair.cms[0].connect(now, connect_params(vec![])).unwrap();
    // Capture the REJ on the wire before it is delivered.
    let (_, req) = pair.cms[0].poll_transmit().unwrap();
    pair.cms[1].handle_mad(now, A, B, &req);
    let (_, rej) = pair.cms[1].poll_transmit().unwrap();
    let (_, CmMessage::Rej(r)) = CmMessage::parse(&rej).unwrap() else { panic!("REJ expected") };
    assert_eq!((r.local_comm_id, r.remote_comm_id, r.reason), (0, active, mad::reject_reason::INVALID_SERVICE_ID));
    pair.cms[0].handle_mad(now, B, A, &rej);
    assert!(matches!(pair.cms[0].poll_event(), Some(CmEvent::Rejected { reason: 8, .. })));
}

#[test]
fn lost_mads_are_retransmitted() {
    for (who, attr) in [(0, mad::attr::REQ), (1, mad::attr::REP), (0, mad::attr::RTU)] {
        let mut pair = Pair::new();
        let mut dropped = false;
        let once = |from: usize, a: u16| {
            if !dropped && from == who && a == attr {
                dropped = true;
                return true;
            }
            false
        };
        // The closure is FnMut with state: run the exchange by hand instead of `establish`.
        pair.cms[1].listen(4420, 8).unwrap();
        let now = pair.now;
        let active = pair.cms[0].connect(now, connect_params(vec![])).unwrap();
        let mut drop = once;
        pair.run(Duration::from_millis(250), &mut drop);
        let Some(CmEvent::ConnectRequest { conn: passive, .. }) = pair.take(1).first().cloned() else {
            panic!("{attr:#x}: no request")
        };
        let now = pair.now;
        pair.cms[1].accept(now, passive, accept_params()).unwrap();
        pair.run(Duration::from_secs(2), &mut drop);
        assert!(
            pair.take(0).iter().any(|e| matches!(e, CmEvent::Established { conn, .. } if *conn == active)),
            "{attr:#x}"
        );
        assert!(
            pair.take(1).iter().any(|e| matches!(e, CmEvent::Established { conn, .. } if *conn == passive)),
            "{attr:#x}"
        );
    }
}

#[test]
fn unreachable_after_the_retries() {
    let mut pair = Pair::new();
    pair.cms[1].listen(4420, 8).unwrap();
    let now = pair.now;
    let active = pair.cms[0].connect(now, connect_params(vec![])).unwrap();
    pair.run(Duration::from_secs(5), |_, _| true);
    assert_eq!(pair.take(0), vec![CmEvent::Unreachable { conn: active }]);
    assert_eq!(pair.cms[0].connections(), 0);
    // A DREQ that never gets its DREP still ends in Disconnected.
    let mut pair = Pair::new();
    let (active, _) = establish(&mut pair, |_, _| false);
    pair.take(0);
    let now = pair.now;
    pair.cms[0].disconnect(now, active).unwrap();
    pair.run(Duration::from_secs(5), |_, _| true);
    assert!(pair.take(0).contains(&CmEvent::Disconnected { conn: active }));
}

#[test]
fn backlog_limits_waiting_requests() {
    let mut pair = Pair::new();
    pair.cms[1].listen(4420, 1).unwrap();
    assert!(pair.cms[1].listen(4420, 1).is_err());
    let now = pair.now;
    let first = pair.cms[0].connect(now, connect_params(vec![])).unwrap();
    let second = pair.cms[0].connect(now, ConnectParams { src_port: 40001, ..connect_params(vec![]) }).unwrap();
    pair.run(Duration::from_millis(50), |_, _| false);
    assert_eq!(pair.take(1).len(), 1, "one request waits");
    assert!(pair.take(0).contains(&CmEvent::Rejected {
        conn: second,
        reason: mad::reject_reason::NO_RESOURCES,
        private_data: vec![0; 148]
    }));
    let _ = first;
}

#[test]
fn a_slow_application_gets_an_mra_not_a_timeout() {
    let mut pair = Pair::new();
    pair.cms[1].listen(4420, 8).unwrap();
    let now = pair.now;
    let active = pair.cms[0].connect(now, connect_params(vec![])).unwrap();
    // Three seconds pass before the passive application answers: retransmitted REQs are met with MRAs.
    pair.run(Duration::from_secs(3), |_, _| false);
    let Some(CmEvent::ConnectRequest { conn: passive, .. }) = pair.take(1).first().cloned() else { panic!() };
    assert_eq!(pair.take(0), vec![], "no Unreachable while the peer asks for time");
    let now = pair.now;
    pair.cms[1].accept(now, passive, accept_params()).unwrap();
    pair.run(Duration::from_millis(50), |_, _| false);
    assert!(matches!(pair.take(0).as_slice(), [CmEvent::Established { conn, .. }] if *conn == active));
}

#[test]
fn private_data_limits() {
    let mut a = cm(1);
    let now = Instant::now();
    assert!(a.connect(now, connect_params(vec![0; 57])).is_err(), "56 bytes fit after rdma_cm's header");
    assert!(a.connect(now, connect_params(vec![0; 56])).is_ok());
}

/// Random loss and duplication of MADs: whatever happens, both ends agree in the end.
#[test]
fn lossy_handshakes_converge() {
    for seed in 0..300u64 {
        let mut rng = Rng::new(seed);
        let mut pair = Pair::new();
        pair.cms[1].listen(4420, 8).unwrap();
        let now = pair.now;
        let active = pair.cms[0].connect(now, connect_params(vec![1, 2, 3])).unwrap();
        let loss = rng.below(40) as f64 / 100.0;
        let mut drop = |_: usize, _: u16| rng.chance(loss);
        pair.run(Duration::from_secs(10), &mut drop);
        let passive = pair.take(1).iter().find_map(|e| match e {
            CmEvent::ConnectRequest { conn, .. } => Some(*conn),
            _ => None,
        });
        let Some(passive) = passive else {
            assert!(pair.take(0).contains(&CmEvent::Unreachable { conn: active }), "seed {seed}");
            continue;
        };
        let now = pair.now;
        pair.cms[1].accept(now, passive, accept_params()).unwrap();
        pair.run(Duration::from_secs(10), &mut drop);
        let a = pair.take(0);
        let b = pair.take(1);
        let a_up = a.iter().any(|e| matches!(e, CmEvent::Established { .. }));
        let b_up = b.iter().any(|e| matches!(e, CmEvent::Established { .. }));
        let b_lost = b.iter().any(|e| matches!(e, CmEvent::Unreachable { .. }));
        let a_lost = a.iter().any(|e| matches!(e, CmEvent::Unreachable { .. }));
        // Both are up, or whoever is not up says so: nobody is left waiting forever.
        assert!((a_up || a_lost) && (b_up || b_lost), "seed {seed}: {a:?} / {b:?}");
        assert!(a_up || b_lost, "seed {seed}: the passive side cannot be up if the active side is not");
    }
}

/// The kernel host's first REQ in the capture (`shared/vectors`), or `None` (and a skip) without the vectors.
fn kernel_req() -> Option<Vec<u8>> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors");
    let Ok(file) = std::fs::read(dir.join("connect-io-mtu1024.pcap")) else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true but the vectors are missing");
        eprintln!("SKIP: captured vectors not found");
        return None;
    };
    let datagrams = transport::soft::pcap::read_rocev2(&file).unwrap();
    datagrams.iter().find_map(|d| {
        let (p, _) = transport::soft::wire::PacketRepr::parse(&d.payload).ok()?;
        (p.payload.len() == 256 && u16::from_be_bytes([p.payload[16], p.payload[17]]) == 0x10)
            .then(|| p.payload.to_vec())
    })
}

const KERNEL_HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
const KERNEL_TARGET: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));

#[test]
fn kernel_req_is_understood_and_answered() {
    let Some(req) = kernel_req() else { return };
    let (host, target) = (KERNEL_HOST, KERNEL_TARGET);
    let mut cm = cm(0x500);
    cm.listen(4420, 8).unwrap();
    let now = Instant::now();
    cm.handle_mad(now, host, target, &req);
    let Some(CmEvent::ConnectRequest { conn, local_port, local_addr, peer }) = cm.poll_event() else { panic!() };
    assert_eq!(
        (local_port, local_addr, peer.port, peer.qpn, peer.start_psn, peer.path_mtu),
        (4420, target, 36644, 0x11, 2_726_883, 3)
    );
    assert_eq!(
        (peer.responder_resources, peer.initiator_depth, peer.flow_label),
        (128, 0, udp_port::cm_flow_label(36644, 4420))
    );
    assert_eq!(CmRequest::parse(&peer.private_data).unwrap().hsqsize, 31);
    // The same REQ again (the kernel retransmits after its CM timeout) is not a second request: while we
    // decide, it is answered with an MRA.
    cm.handle_mad(now, host, target, &req);
    assert_eq!(cm.poll_event(), None);
    let (_, mra) = cm.poll_transmit().unwrap();
    assert!(matches!(CmMessage::parse(&mra).unwrap().1, CmMessage::Mra { message_mraed: 0, .. }));
    cm.accept(now, conn, accept_params()).unwrap();
    let (dst, rep) = cm.poll_transmit().unwrap();
    assert_eq!(dst, host);
    let (h, CmMessage::Rep(r)) = CmMessage::parse(&rep).unwrap() else { panic!("REP") };
    let (kh, CmMessage::Req(kr)) = CmMessage::parse(&req).unwrap() else { panic!("REQ") };
    assert_eq!((h.transaction_id, r.remote_comm_id, r.local_comm_id), (kh.transaction_id, kr.local_comm_id, conn));
    assert_eq!(CmAccept::parse(&r.private_data).unwrap().crqsize, 32);
    // And a retransmitted REQ now gets the REP again.
    cm.handle_mad(now, host, target, &req);
    assert_eq!(cm.poll_transmit().map(|(_, m)| m), Some(rep));
}

/// Our REP is lost every time (as rxe dropped ours while their ICRC was wrong) until its retries run out: the
/// attempt is rejected (timeout) and reported unreachable once, and the kernel host's REQ, which it goes on
/// retransmitting for 16 × 4.3 s, is the same attempt — answered with that REJ, never a second connection.
#[test]
fn a_duplicate_req_after_a_rep_timeout_is_the_same_attempt() {
    let Some(req) = kernel_req() else { return };
    let (host, target) = (KERNEL_HOST, KERNEL_TARGET);
    let mut cm = cm(0x700);
    cm.listen(4420, 8).unwrap();
    let mut now = Instant::now();
    cm.handle_mad(now, host, target, &req);
    let Some(CmEvent::ConnectRequest { conn, .. }) = cm.poll_event() else { panic!("connect request") };
    cm.accept(now, conn, accept_params()).unwrap();
    let mut reps = 0;
    let mut rejects = Vec::new();
    let mut events = Vec::new();
    // Time passes with nothing from the host; every MAD we send is lost. Then the host's retransmitted REQ,
    // 4.3 s after the first, and later ones.
    let (_, CmMessage::Req(kernel)) = CmMessage::parse(&req).unwrap() else { panic!("REQ") };
    let resend_every = Duration::from_nanos(4096 << kernel.remote_cm_response_timeout);
    let mut next_req = now + resend_every;
    let end = now + resend_every * 5;
    while now < end {
        now = cm.poll_timeout().map_or(next_req, |t| t.min(next_req));
        if now >= next_req {
            cm.handle_mad(now, host, target, &req);
            next_req += resend_every;
        } else {
            cm.handle_timeout(now);
        }
        while let Some((dst, mad)) = cm.poll_transmit() {
            assert_eq!(dst, host);
            match CmMessage::parse(&mad).unwrap().1 {
                CmMessage::Rep(_) => reps += 1,
                CmMessage::Rej(rej) => rejects.push(rej),
                other => panic!("{other:?}"),
            }
        }
        events.extend(std::iter::from_fn(|| cm.poll_event()));
    }
    assert_eq!(events, vec![CmEvent::Unreachable { conn }], "one attempt, reported once");
    assert!(reps >= 4, "the REP was retried ({reps})");
    assert!(rejects.len() >= 2, "the REJ went out, and one for each duplicate REQ: {rejects:?}");
    // First the REP's timeout, with our CA GUID as its additional information (how a peer that got the REP
    // finds the connection); then each duplicate gets a stale-connection REJ of its REQ, which the kernel
    // matches by its own communication id — the REJ's remote id — and so stops retransmitting.
    let (_, CmMessage::Req(kernel_req)) = CmMessage::parse(&req).unwrap() else { panic!("REQ") };
    let first = &rejects[0];
    assert_eq!(
        (first.reason, first.message_rejected, first.ari_len),
        (mad::reject_reason::TIMEOUT, mad::message::REP, 8)
    );
    assert_eq!(first.ari[..8], cm.node_guid().to_be_bytes());
    for dup in &rejects[1..] {
        assert_eq!(
            (dup.reason, dup.message_rejected, dup.local_comm_id, dup.remote_comm_id),
            (mad::reject_reason::STALE_CONNECTION, mad::message::REQ, conn, kernel_req.local_comm_id)
        );
    }
    // The peer cannot keep the attempt: an MRA does not extend it.
    let mra = CmMessage::Mra {
        local_comm_id: kernel_req.local_comm_id,
        remote_comm_id: conn,
        message_mraed: mad::message::REP,
        service_timeout: 31,
        private_data: vec![],
    }
    .emit(&mad::MadHeader::cm(mad::attr::MRA, 1))
    .unwrap();
    cm.handle_mad(now, host, target, &mra);
    assert!(cm.poll_timeout().is_some_and(|t| t <= now + Duration::from_secs(120)));
    // Not a connection, but counted; forgotten once the host has stopped retransmitting (16 REQs), without
    // another event.
    assert_eq!((cm.connections(), cm.stale_attempts()), (0, 1));
    cm.handle_timeout(now + resend_every * 16);
    assert_eq!((cm.connections(), cm.stale_attempts(), cm.poll_event()), (0, 0, None));
}

/// A REQ retransmitted after its connection closed gets a stale-connection REJ of the REQ, as Linux's CM
/// answers, not a second connection.
#[test]
fn a_req_for_a_connection_in_time_wait_is_rejected_as_stale() {
    let (mut a, mut b) = (cm(1), cm(0x20_0000));
    b.listen(4420, 4).unwrap();
    let now = Instant::now();
    let active = a.connect(now, connect_params(vec![])).unwrap();
    let (_, req) = a.poll_transmit().unwrap();
    b.handle_mad(now, A, B, &req);
    let Some(CmEvent::ConnectRequest { conn: passive, .. }) = b.poll_event() else { panic!("connect request") };
    b.accept(now, passive, accept_params()).unwrap();
    let (_, rep) = b.poll_transmit().unwrap();
    a.handle_mad(now, B, A, &rep);
    let (_, rtu) = a.poll_transmit().unwrap();
    b.handle_mad(now, A, B, &rtu);
    a.disconnect(now, active).unwrap();
    let (_, dreq) = a.poll_transmit().unwrap();
    b.handle_mad(now, A, B, &dreq);
    let (_, drep) = b.poll_transmit().unwrap();
    assert!(matches!(CmMessage::parse(&drep).unwrap().1, CmMessage::Drep { .. }));
    assert_eq!(b.state(passive), Some(State::TimeWait));
    while b.poll_event().is_some() {}
    b.handle_mad(now, A, B, &req);
    assert_eq!(b.poll_event(), None, "not a new connection");
    let (_, answer) = b.poll_transmit().unwrap();
    let CmMessage::Rej(rej) = CmMessage::parse(&answer).unwrap().1 else { panic!("REJ") };
    assert_eq!(
        (rej.reason, rej.message_rejected, rej.local_comm_id, rej.remote_comm_id),
        (mad::reject_reason::STALE_CONNECTION, mad::message::REQ, passive, active)
    );
}

/// However many attempts a peer leaves unanswered, what the CM remembers of them is bounded.
#[test]
fn stale_attempts_are_bounded() {
    let (mut a, mut b) = (cm(1), cm(0x10_0000));
    b.listen(4420, 2000).unwrap();
    let now = Instant::now();
    for i in 0..1100u16 {
        a.connect(now, ConnectParams { src_port: 20000 + i, ..connect_params(vec![]) }).unwrap();
    }
    while let Some((_, req)) = a.poll_transmit() {
        b.handle_mad(now, A, B, &req);
    }
    while let Some(event) = b.poll_event() {
        let CmEvent::ConnectRequest { conn, .. } = event else { panic!("{event:?}") };
        b.accept(now, conn, accept_params()).unwrap();
    }
    // No RTU ever comes: every REP runs out of retries (the stale attempts are kept far longer).
    while let Some(t) = b.poll_timeout().filter(|t| *t < now + Duration::from_secs(5)) {
        b.handle_timeout(t);
        while b.poll_transmit().is_some() {}
    }
    assert_eq!((b.connections(), b.stale_attempts()), (0, 1024));
}

#[test]
fn out_of_range_parameters_are_errors_not_panics() {
    let mut a = cm(1);
    let now = Instant::now();
    let wide = ConnectParams { local_qpn: 1 << 24, ..connect_params(vec![]) };
    assert!(matches!(a.connect(now, wide), Err(transport::soft::cm::CmError::Encode(_))));
    let mut b = cm(2);
    b.listen(4420, 1).unwrap();
    let _ = a.connect(now, connect_params(vec![])).unwrap();
    let (_, req) = a.poll_transmit().unwrap();
    b.handle_mad(now, A, B, &req);
    let Some(CmEvent::ConnectRequest { conn, .. }) = b.poll_event() else { panic!() };
    let bad = AcceptParams { start_psn: 1 << 24, ..accept_params() };
    assert!(b.accept(now, conn, bad).is_err());
    assert_eq!(b.state(conn), Some(State::ReqReceived), "a refused accept changes nothing");
    b.accept(now, conn, accept_params()).unwrap();
    assert_eq!(b.state(conn), Some(State::RepSent));
}
