//! Two soft devices over real UDP sockets on 127.0.0.1 and 127.0.0.2: connection setup with NVMe/RDMA
//! private data, SEND, 1 GiB of RDMA WRITE and READ verified byte for byte (`SOFT_BULK_MIB` changes the
//! size), reject with private data, disconnect from either side, and nothing left behind afterwards.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use nvme_proto::rdma_cm::{CmAccept, CmReject, CmRejectStatus, CmRequest};
use transport::Buffer;
use transport::soft::device::{
    CompletionQueue, ConnectionOptions, Device, DeviceEvent, ProtectionDomain, QueuePair, SoftConfig,
};
use transport::soft::rc::{Access, RecvWr, SendOp, SendWr, WcStatus};

fn device(last: u8) -> Device {
    let mut config = SoftConfig::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)));
    config.port = 0; // tests run in parallel: let the kernel pick ports
    Device::open(config).expect("open soft device")
}

async fn event(dev: &Device) -> DeviceEvent {
    tokio::time::timeout(Duration::from_secs(10), dev.next_event())
        .await
        .expect("event within 10 s")
        .expect("device open")
}

struct Connected {
    a: Device,
    b: Device,
    qa: QueuePair,
    qb: QueuePair,
    cqa: CompletionQueue,
    cqb: CompletionQueue,
    pdb: ProtectionDomain,
    conn_a: u32,
    conn_b: u32,
}

async fn connect() -> Connected {
    let (a, b) = (device(1), device(2));
    let (pda, pdb) = (a.alloc_pd().await.unwrap(), b.alloc_pd().await.unwrap());
    let (cqa, cqb) = (CompletionQueue::new(), CompletionQueue::new());
    b.listen(4420, 16).await.unwrap();
    let qa = a.create_qp(&pda, &cqa, &cqa).await.unwrap();
    let request = CmRequest { recfmt: 0, qid: 0, hrqsize: 32, hsqsize: 31, cntlid: 0 }.to_bytes();
    let conn_a = a.connect(&qa, b.local_addr(), 4420, ConnectionOptions::default(), &request).await.unwrap();
    let DeviceEvent::ConnectRequest { conn: conn_b, local_port, peer } = event(&b).await else {
        panic!("connect request")
    };
    assert_eq!((local_port, peer.addr), (4420, a.local_addr().ip()));
    assert_eq!(CmRequest::parse(&peer.private_data).unwrap(), CmRequest::parse(&request).unwrap());
    let qb = b.create_qp(&pdb, &cqb, &cqb).await.unwrap();
    let accept = CmAccept { recfmt: 0, crqsize: 32 }.to_bytes();
    b.accept(conn_b, &qb, ConnectionOptions::default(), &accept).await.unwrap();
    let DeviceEvent::Established { conn, qpn, peer } = event(&a).await else { panic!("active established") };
    assert_eq!((conn, qpn, peer.qpn), (conn_a, qa.qpn, qb.qpn));
    assert_eq!(CmAccept::parse(&peer.private_data).unwrap().crqsize, 32);
    let DeviceEvent::Established { conn, qpn, .. } = event(&b).await else { panic!("passive established") };
    assert_eq!((conn, qpn), (conn_b, qb.qpn));
    Connected { a, b, qa, qb, cqa, cqb, pdb, conn_a, conn_b }
}

async fn complete(cq: &CompletionQueue) -> transport::soft::device::Completion {
    tokio::time::timeout(Duration::from_secs(30), cq.next()).await.expect("completion within 30 s")
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn send_write_read_and_disconnect() {
    let c = connect().await;
    let base_a = c.a.stats().await.unwrap();

    // SEND of 10 KiB into a posted receive.
    c.qb.post_recv(RecvWr::new(1, vec![0; 16 << 10])).unwrap();
    let msg = pattern(10 << 10, 7);
    c.qa.post_send(SendWr::new(2, SendOp::Send, msg.clone())).unwrap();
    let sent = complete(&c.cqa).await;
    assert_eq!((sent.wc.wr_id, sent.wc.status), (2, WcStatus::Success));
    let got = complete(&c.cqb).await;
    assert_eq!((got.wc.wr_id, got.wc.status, got.wc.byte_len as usize), (1, WcStatus::Success, msg.len()));
    assert_eq!(&got.wc.buf[..msg.len()], &msg[..]);

    // Bulk: B exposes a region; A writes it in 1 MiB pieces, then reads it back.
    let total: usize = std::env::var("SOFT_BULK_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024) << 20;
    let region = c.b.register(&c.pdb, vec![0; total], Access::REMOTE_ALL).await.unwrap();
    let chunk = 1 << 20;
    let data = pattern(total, 99);
    let in_flight = 8;
    let mut posted = 0;
    let mut done = 0;
    while done < total / chunk {
        while posted < total / chunk && posted - done < in_flight {
            let off = posted * chunk;
            let op = SendOp::RdmaWrite { remote_addr: region.keys.addr + off as u64, rkey: region.keys.rkey };
            c.qa.post_send(SendWr::new(100 + posted as u64, op, data[off..off + chunk].to_vec())).unwrap();
            posted += 1;
        }
        let wc = complete(&c.cqa).await.wc;
        assert_eq!((wc.wr_id, wc.status), (100 + done as u64, WcStatus::Success));
        done += 1;
    }
    let mut read_back = Vec::with_capacity(total);
    for i in 0..total / chunk {
        let op = SendOp::RdmaRead { remote_addr: region.keys.addr + (i * chunk) as u64, rkey: region.keys.rkey };
        c.qa.post_send(SendWr::new(10_000 + i as u64, op, vec![0; chunk])).unwrap();
        let wc = complete(&c.cqa).await.wc;
        assert_eq!((wc.wr_id, wc.status), (10_000 + i as u64, WcStatus::Success));
        read_back.extend_from_slice(&wc.buf);
    }
    assert!(read_back == data, "READ returned what WRITE put there");
    let landed = c.b.deregister(region).await.unwrap();
    assert!(landed == data, "the region B gets back holds the written bytes");

    // An RDMA READ with a key B never gave out: remote access error, the queue pair fails, nothing is read.
    let bad = SendOp::RdmaRead { remote_addr: 0x1234_0000_0000, rkey: 0xdead };
    c.qa.post_send(SendWr::new(77, bad, vec![0; 64])).unwrap();
    let wc = complete(&c.cqa).await.wc;
    assert_eq!((wc.wr_id, wc.status), (77, WcStatus::RemoteAccess));
    assert!(
        matches!(event(&c.a).await, DeviceEvent::QpFatal { qpn, cause: WcStatus::RemoteAccess } if qpn == c.qa.qpn)
    );
    // B's responder refused it too: its queue pair is in error, its memory untouched (there was none to read).
    assert!(
        matches!(event(&c.b).await, DeviceEvent::QpFatal { qpn, cause: WcStatus::LocalProtection } if qpn == c.qb.qpn)
    );

    // Disconnect from A: both ends see it, then time-wait ends and nothing is left.
    c.a.disconnect(c.conn_a).await.unwrap();
    assert_eq!(event(&c.a).await, DeviceEvent::Disconnected { conn: c.conn_a });
    assert_eq!(event(&c.b).await, DeviceEvent::Disconnected { conn: c.conn_b });
    assert_eq!(event(&c.a).await, DeviceEvent::TimewaitExit { conn: c.conn_a });
    assert_eq!(event(&c.b).await, DeviceEvent::TimewaitExit { conn: c.conn_b });
    c.a.destroy_qp(&c.qa).await.unwrap();
    c.b.destroy_qp(&c.qb).await.unwrap();
    for dev in [&c.a, &c.b] {
        let s = dev.stats().await.unwrap();
        assert_eq!((s.queue_pairs, s.regions, s.region_bytes, s.connections), (0, 0, 0, 0), "{s:?}");
    }
    assert!(c.a.stats().await.unwrap().packets_sent > base_a.packets_sent);
}

#[tokio::test]
async fn passive_side_disconnects_and_flushes() {
    let c = connect().await;
    // Receives posted on A are flushed (and handed back) when B disconnects.
    for i in 0..4 {
        c.qa.post_recv(RecvWr::new(i, vec![0; 4096])).unwrap();
    }
    c.b.disconnect(c.conn_b).await.unwrap();
    assert_eq!(event(&c.b).await, DeviceEvent::Disconnected { conn: c.conn_b });
    assert_eq!(event(&c.a).await, DeviceEvent::Disconnected { conn: c.conn_a });
    for i in 0..4 {
        let wc = complete(&c.cqa).await.wc;
        assert_eq!((wc.wr_id, wc.status, wc.buf.len()), (i, WcStatus::WrFlush, 4096));
    }
    let _ = &c.cqb;
}

#[tokio::test]
async fn reject_with_private_data() {
    let (a, b) = (device(1), device(2));
    let pda = a.alloc_pd().await.unwrap();
    let cq = CompletionQueue::new();
    b.listen(4420, 4).await.unwrap();
    let qa = a.create_qp(&pda, &cq, &cq).await.unwrap();
    let conn = a.connect(&qa, b.local_addr(), 4420, ConnectionOptions::default(), b"hello").await.unwrap();
    let DeviceEvent::ConnectRequest { conn: incoming, peer, .. } = event(&b).await else { panic!() };
    assert_eq!(&peer.private_data[..5], b"hello");
    b.reject(incoming, &CmReject::new(CmRejectStatus::InvalidHostSqSize).to_bytes()).await.unwrap();
    let DeviceEvent::Rejected { conn: rejected, reason, private_data } = event(&a).await else { panic!() };
    assert_eq!((rejected, reason), (conn, 28));
    assert_eq!(CmReject::parse(&private_data).unwrap().status, CmRejectStatus::InvalidHostSqSize);
    // A port nobody listens on: the CM rejects like the kernel does (invalid service ID).
    let conn = a.connect(&qa, b.local_addr(), 4421, ConnectionOptions::default(), &[]).await.unwrap();
    assert!(matches!(event(&a).await, DeviceEvent::Rejected { conn: c, reason: 8, .. } if c == conn));
}

#[tokio::test]
async fn ipv6_loopback() {
    let open = || {
        let mut config = SoftConfig::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST));
        config.port = 0;
        Device::open(config).expect("open IPv6 soft device")
    };
    let (a, b) = (open(), open());
    let (pda, pdb) = (a.alloc_pd().await.unwrap(), b.alloc_pd().await.unwrap());
    assert_eq!(a.gid(), std::net::Ipv6Addr::LOCALHOST.octets());
    let (cqa, cqb) = (CompletionQueue::new(), CompletionQueue::new());
    b.listen(4420, 4).await.unwrap();
    let qa = a.create_qp(&pda, &cqa, &cqa).await.unwrap();
    a.connect(&qa, b.local_addr(), 4420, ConnectionOptions::default(), b"v6").await.unwrap();
    let DeviceEvent::ConnectRequest { conn, peer, .. } = event(&b).await else { panic!() };
    assert_eq!(&peer.private_data[..2], b"v6");
    let qb = b.create_qp(&pdb, &cqb, &cqb).await.unwrap();
    b.accept(conn, &qb, ConnectionOptions::default(), &[]).await.unwrap();
    assert!(matches!(event(&a).await, DeviceEvent::Established { .. }));
    let region = b.register(&pdb, vec![0; 1 << 20], Access::REMOTE_ALL).await.unwrap();
    let data = pattern(1 << 20, 6);
    let op = SendOp::RdmaWrite { remote_addr: region.keys.addr, rkey: region.keys.rkey };
    qa.post_send(SendWr::new(1, op, data.clone())).unwrap();
    assert_eq!(complete(&cqa).await.wc.status, WcStatus::Success);
    assert!(b.deregister(region).await.unwrap() == data);
}

/// On the standard port, a device sends as rxe does: CM MADs from QP1's port (55410), RC packets from the port
/// the connection's flow label gives; and it accepts a peer's ICRC computed over an IPv4 identification it
/// cannot see. The peer here is a bare UDP socket speaking the protocol by hand.
#[tokio::test]
async fn rxe_source_ports_on_the_standard_port() {
    use transport::soft::wire::ext::Syndrome;
    use transport::soft::wire::mad::{self, CmMessage, MadHeader, Rep};
    use transport::soft::wire::{Bth, IpHeader, Opcode, PacketRepr, icrc, udp_port};

    let a = Device::open(SoftConfig::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)))).unwrap();
    let peer = std::net::UdpSocket::bind("127.0.0.4:4791").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let pda = a.alloc_pd().await.unwrap();
    let cq = CompletionQueue::new();
    let qa = a.create_qp(&pda, &cq, &cq).await.unwrap();
    a.connect(&qa, peer.local_addr().unwrap(), 4420, ConnectionOptions::default(), &[]).await.unwrap();

    let mut buf = vec![0u8; 4096];
    let recv = |buf: &mut Vec<u8>| {
        let (n, from) = peer.recv_from(buf).expect("datagram from the device");
        (buf[..n].to_vec(), from)
    };
    let (req_bytes, from) = recv(&mut buf);
    assert_eq!(from.port(), udp_port::rxe_default(1), "MADs come from QP1's port");
    let (packet, _) = PacketRepr::parse(&req_bytes).unwrap();
    let (header, CmMessage::Req(req)) = CmMessage::parse(packet.payload).unwrap() else { panic!("REQ") };
    let (cma, _) = transport::soft::wire::cma::CmaHeader::parse(&req.private_data).unwrap();

    // Answer with a REP from "QP 0x99", as a kernel would.
    let rep = Rep {
        local_comm_id: 0x4242,
        remote_comm_id: req.local_comm_id,
        local_qkey: 0,
        local_qpn: 0x99,
        local_eecn: 0,
        starting_psn: 1000,
        responder_resources: 16,
        initiator_depth: 16,
        target_ack_delay: 15,
        failover_accepted: 0,
        end_to_end_flow_control: true,
        rnr_retry_count: 7,
        srq: false,
        local_ca_guid: 1,
        private_data: Vec::new(),
    };
    let mad = CmMessage::Rep(rep).emit(&MadHeader::cm(mad::attr::REP, header.transaction_id)).unwrap();
    let p = PacketRepr::cm_mad(0, &mad);
    let mut out = Vec::new();
    p.emit(&mut out).unwrap();
    // Computed over identification 0x5a5a, as a kernel peer's would be over its own: the device cannot see
    // the identification and must recover it from the ICRC.
    let ip =
        IpHeader::ipv4(Ipv4Addr::new(127, 0, 0, 4), Ipv4Addr::new(127, 0, 0, 3), 0x5a5a, (8 + out.len() + 4) as u16);
    icrc::append(&ip, 4791, &mut out).unwrap();
    peer.send_to(&out, "127.0.0.3:4791").unwrap();
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(5), a.next_event()).await.unwrap(),
        Some(DeviceEvent::Established { .. })
    ));

    let (rtu, from) = recv(&mut buf);
    assert_eq!(from.port(), udp_port::rxe_default(1));
    assert!(matches!(CmMessage::parse(PacketRepr::parse(&rtu).unwrap().0.payload).unwrap().1, CmMessage::Rtu { .. }));
    // A SEND on the connection comes from the flow label's port and is addressed to QP 0x99.
    qa.post_recv(RecvWr::new(2, vec![0; 64])).unwrap();
    qa.post_send(SendWr::new(1, SendOp::Send, b"hi".to_vec())).unwrap();
    let (send, from) = recv(&mut buf);
    let expected = udp_port::from_flow_label(udp_port::cm_flow_label(cma.src_port, 4420));
    assert_eq!(from.port(), expected, "RC packets come from the flow label's port");
    let (p, _) = PacketRepr::parse(&send).unwrap();
    assert_eq!((p.bth.opcode, p.bth.dest_qp, p.payload), (Opcode::RcSendOnly, 0x99, &b"hi"[..]));
    assert_eq!(p.bth.psn, 1000, "the active side sends from the PSN the REP advertised");
    let ip = IpHeader::ipv4(Ipv4Addr::new(127, 0, 0, 3), Ipv4Addr::new(127, 0, 0, 4), 0, (send.len() + 8) as u16);
    icrc::verify(&ip, expected, &send).expect("ICRC over the real source port");

    // The peer's first request carries the PSN the REQ advertised: received and acknowledged, not NAKed.
    let mut p = PacketRepr::new(Bth::new(Opcode::RcSendOnly, qa.qpn, req.starting_psn));
    p.bth.ack_req = true;
    p.payload = b"from the peer";
    peer.send_to(&support::kernel_datagram(&p, [127, 0, 0, 4], [127, 0, 0, 3]), "127.0.0.3:4791").unwrap();
    let (ack, _) = recv(&mut buf);
    let (ack, _) = PacketRepr::parse(&ack).unwrap();
    assert_eq!((ack.bth.opcode, ack.bth.psn), (Opcode::RcAcknowledge, req.starting_psn));
    assert_eq!(ack.aeth.unwrap().syndrome, Syndrome::ACK_NO_CREDITS, "an ACK, not a NAK");
    let got = tokio::time::timeout(Duration::from_secs(5), cq.next()).await.unwrap().wc;
    assert_eq!(
        (got.wr_id, got.status, &got.buf[..got.byte_len as usize]),
        (2, WcStatus::Success, &b"from the peer"[..])
    );
}

/// A region of another protection domain is out of reach: the rkey might as well not exist.
#[tokio::test]
async fn protection_domains_fence_regions() {
    let c = connect().await;
    let other = c.b.alloc_pd().await.unwrap();
    let fenced = c.b.register(&other, vec![0; 4096], Access::REMOTE_ALL).await.unwrap();
    let op = SendOp::RdmaWrite { remote_addr: fenced.keys.addr, rkey: fenced.keys.rkey };
    c.qa.post_send(SendWr::new(1, op, vec![1; 64])).unwrap();
    assert_eq!(complete(&c.cqa).await.wc.status, WcStatus::RemoteAccess);
    assert!(matches!(c.b.dealloc_pd(other).await, Err(transport::soft::device::DeviceError::PdBusy(_))));
    assert_eq!(c.b.deregister(fenced).await.unwrap(), vec![0; 4096], "untouched");
    c.b.dealloc_pd(other).await.unwrap();
    assert!(c.b.dealloc_pd(other).await.is_err(), "already freed");
    assert!(c.b.register(&other, vec![0; 8], Access::REMOTE_ALL).await.is_err(), "freed domain");
    let s = c.b.stats().await.unwrap();
    assert_eq!((s.protection_domains, s.regions), (1, 0));
}

/// Queue pairs connected by hand, without the CM: RESET → INIT → RTR → RTS with numbers exchanged out of
/// band, traffic, then ERR flushes and RESET makes the queue pair reusable. Invalid transitions are refused.
#[tokio::test]
async fn manual_state_machine() {
    use transport::soft::device::{DeviceError, QpState, QpTransition};
    let (a, b) = (device(1), device(2));
    let (pda, pdb) = (a.alloc_pd().await.unwrap(), b.alloc_pd().await.unwrap());
    let (cqa, cqb) = (CompletionQueue::new(), CompletionQueue::new());
    let qa = a.create_qp(&pda, &cqa, &cqa).await.unwrap();
    let qb = b.create_qp(&pdb, &cqb, &cqb).await.unwrap();
    let rts = QpTransition::Rts {
        sq_psn: 100,
        ack_timeout: Duration::from_millis(50),
        retry_cnt: 7,
        rnr_retry: 7,
        max_rd_atomic: 16,
    };
    assert!(matches!(a.modify_qp(&qa, rts).await, Err(DeviceError::BadTransition { from: QpState::Reset, .. })));
    for (dev, qp) in [(&a, &qa), (&b, &qb)] {
        assert_eq!(dev.modify_qp(qp, QpTransition::Init).await.unwrap(), QpState::Init);
    }
    // A receive posted in INIT survives into RTR.
    qb.post_recv(RecvWr::new(7, vec![0; 64])).unwrap();
    let rtr = |peer, dest_qpn| QpTransition::Rtr {
        peer,
        dest_qpn,
        rq_psn: 100,
        path_mtu: 1024,
        min_rnr_timer: 12,
        max_dest_rd_atomic: 16,
    };
    assert_eq!(a.modify_qp(&qa, rtr(b.local_addr(), qb.qpn)).await.unwrap(), QpState::Rtr);
    assert_eq!(b.modify_qp(&qb, rtr(a.local_addr(), qa.qpn)).await.unwrap(), QpState::Rtr);
    // Sends are refused before RTS (the buffer still comes back).
    qa.post_send(SendWr::new(1, SendOp::Send, b"early".to_vec())).unwrap();
    let wc = complete(&cqa).await.wc;
    assert_eq!((wc.wr_id, wc.status, &wc.buf[..]), (1, WcStatus::WrFlush, &b"early"[..]));
    for (dev, qp) in [(&a, &qa), (&b, &qb)] {
        assert_eq!(dev.modify_qp(qp, rts).await.unwrap(), QpState::Rts);
    }
    qa.post_send(SendWr::new(2, SendOp::SendWithImm(0xfeed), b"hello".to_vec())).unwrap();
    assert_eq!(complete(&cqa).await.wc.status, WcStatus::Success);
    let got = complete(&cqb).await.wc;
    assert_eq!((got.wr_id, got.status, got.imm, &got.buf[..5]), (7, WcStatus::Success, Some(0xfeed), &b"hello"[..]));
    // ERR flushes what is posted; RESET then INIT makes it usable again.
    for i in 0..3 {
        qb.post_recv(RecvWr::new(10 + i, vec![0; 8])).unwrap();
    }
    assert_eq!(b.modify_qp(&qb, QpTransition::Error).await.unwrap(), QpState::Error);
    for i in 0..3 {
        let wc = complete(&cqb).await.wc;
        assert_eq!((wc.wr_id, wc.status), (10 + i, WcStatus::WrFlush));
    }
    assert_eq!(b.modify_qp(&qb, QpTransition::Reset).await.unwrap(), QpState::Reset);
    assert_eq!(b.modify_qp(&qb, QpTransition::Init).await.unwrap(), QpState::Init);
    assert!(matches!(b.modify_qp(&qb, rts).await, Err(DeviceError::BadTransition { from: QpState::Init, .. })));
}

/// Two connections draw their receives from one shared receive queue; destroying it hands back what is left.
#[tokio::test]
async fn shared_receive_queue() {
    let (a, b) = (device(1), device(2));
    let (pda, pdb) = (a.alloc_pd().await.unwrap(), b.alloc_pd().await.unwrap());
    b.listen(4420, 8).await.unwrap();
    let srq = b.create_srq(&pdb).await.unwrap();
    for i in 0..6 {
        srq.post_recv(RecvWr::new(100 + i, vec![0; 32])).unwrap();
    }
    let cqb = CompletionQueue::new();
    let mut senders = Vec::new();
    for _ in 0..2 {
        let cqa = CompletionQueue::new();
        let qa = a.create_qp(&pda, &cqa, &cqa).await.unwrap();
        a.connect(&qa, b.local_addr(), 4420, ConnectionOptions::default(), &[]).await.unwrap();
        let DeviceEvent::ConnectRequest { conn, .. } = event(&b).await else { panic!() };
        let qb = b.create_qp_with_srq(&pdb, &cqb, &cqb, &srq).await.unwrap();
        b.accept(conn, &qb, ConnectionOptions::default(), &[]).await.unwrap();
        assert!(matches!(event(&a).await, DeviceEvent::Established { .. }));
        assert!(matches!(event(&b).await, DeviceEvent::Established { .. }));
        // Posting on the queue pair itself is refused: its receives belong to the shared queue.
        qb.post_recv(RecvWr::new(1, vec![0; 8])).unwrap();
        assert_eq!(complete(&cqb).await.wc.status, WcStatus::WrFlush);
        senders.push((qa, cqa, qb));
    }
    for (i, (qa, cqa, _)) in senders.iter().enumerate() {
        for j in 0..2u8 {
            qa.post_send(SendWr::new(j as u64, SendOp::Send, vec![i as u8 * 10 + j; 16])).unwrap();
            assert_eq!(complete(cqa).await.wc.status, WcStatus::Success);
        }
    }
    let mut by_qp: std::collections::HashMap<u32, Vec<u8>> = Default::default();
    for _ in 0..4 {
        let c = complete(&cqb).await;
        assert_eq!(c.wc.status, WcStatus::Success);
        assert!((100..106).contains(&c.wc.wr_id), "receives come from the shared queue");
        by_qp.entry(c.qpn).or_default().push(c.wc.buf[0]);
    }
    assert_eq!(by_qp[&senders[0].2.qpn], vec![0, 1]);
    assert_eq!(by_qp[&senders[1].2.qpn], vec![10, 11]);
    assert!(b.destroy_srq(&srq).await.is_err(), "still serving two queue pairs");
    for (_, _, qb) in &senders {
        b.destroy_qp(qb).await.unwrap();
    }
    let left = b.destroy_srq(&srq).await.unwrap();
    assert_eq!(left.iter().map(|w| w.wr_id).collect::<Vec<_>>(), vec![104, 105]);
    assert_eq!(b.stats().await.unwrap().shared_receive_queues, 0);
}

/// Scatter/gather lists: a SEND gathered from three segments lands across a receive's two segments; a READ
/// scatters into two; every segment comes back to its owner with its own length.
#[tokio::test]
async fn scatter_gather_lists() {
    let c = connect().await;
    c.qb.post_recv(RecvWr::with_sg_list(1, vec![Buffer::zeroed(4), Buffer::zeroed(20)])).unwrap();
    let segments = vec![Buffer::from(&b"ab"[..]), Buffer::from(&b"cdef"[..]), Buffer::from(&b"ghij"[..])];
    c.qa.post_send(SendWr::with_sg_list(2, SendOp::Send, segments.clone())).unwrap();
    let sent = complete(&c.cqa).await.wc;
    assert_eq!((sent.status, &sent.sg_list, sent.buf.is_empty()), (WcStatus::Success, &segments, true));
    let got = complete(&c.cqb).await.wc;
    assert_eq!((got.status, got.byte_len), (WcStatus::Success, 10));
    assert_eq!(got.sg_list, vec![b"abcd".to_vec(), b"efghij\0\0\0\0\0\0\0\0\0\0\0\0\0\0".to_vec()]);

    let region = c.b.register(&c.pdb, (0..64u8).collect::<Vec<u8>>(), Access::REMOTE_READ).await.unwrap();
    let op = SendOp::RdmaRead { remote_addr: region.keys.addr + 8, rkey: region.keys.rkey };
    c.qa.post_send(SendWr::with_sg_list(3, op, vec![Buffer::zeroed(3), Buffer::default(), Buffer::zeroed(5)])).unwrap();
    let read = complete(&c.cqa).await.wc;
    assert_eq!((read.status, read.byte_len), (WcStatus::Success, 8));
    assert_eq!(read.sg_list, vec![vec![8, 9, 10], vec![], vec![11, 12, 13, 14, 15]]);
}
