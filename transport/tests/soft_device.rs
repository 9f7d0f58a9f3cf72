//! Two soft devices over real UDP sockets on 127.0.0.1 and 127.0.0.2: connection setup with NVMe/RDMA
//! private data, SEND, 1 GiB of RDMA WRITE and READ verified byte for byte (`SOFT_BULK_MIB` changes the
//! size), reject with private data, disconnect from either side, and nothing left behind afterwards.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use nvme_proto::rdma_cm::{CmAccept, CmReject, CmRejectStatus, CmRequest};
use nvmf_transport::soft::device::{CompletionQueue, ConnectionOptions, Device, DeviceEvent, QueuePair, SoftConfig};
use nvmf_transport::soft::rc::{Access, RecvWr, SendOp, SendWr, WcStatus};

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
    conn_a: u32,
    conn_b: u32,
}

async fn connect() -> Connected {
    let (a, b) = (device(1), device(2));
    let (cqa, cqb) = (CompletionQueue::new(), CompletionQueue::new());
    b.listen(4420, 16).await.unwrap();
    let qa = a.create_qp(&cqa, &cqa).await.unwrap();
    let request = CmRequest { recfmt: 0, qid: 0, hrqsize: 32, hsqsize: 31, cntlid: 0 }.to_bytes();
    let conn_a = a.connect(&qa, b.local_addr(), 4420, ConnectionOptions::default(), &request).await.unwrap();
    let DeviceEvent::ConnectRequest { conn: conn_b, local_port, peer } = event(&b).await else {
        panic!("connect request")
    };
    assert_eq!((local_port, peer.addr), (4420, a.local_addr().ip()));
    assert_eq!(CmRequest::parse(&peer.private_data).unwrap(), CmRequest::parse(&request).unwrap());
    let qb = b.create_qp(&cqb, &cqb).await.unwrap();
    let accept = CmAccept { recfmt: 0, crqsize: 32 }.to_bytes();
    b.accept(conn_b, &qb, ConnectionOptions::default(), &accept).await.unwrap();
    let DeviceEvent::Established { conn, qpn, peer } = event(&a).await else { panic!("active established") };
    assert_eq!((conn, qpn, peer.qpn), (conn_a, qa.qpn, qb.qpn));
    assert_eq!(CmAccept::parse(&peer.private_data).unwrap().crqsize, 32);
    let DeviceEvent::Established { conn, qpn, .. } = event(&b).await else { panic!("passive established") };
    assert_eq!((conn, qpn), (conn_b, qb.qpn));
    Connected { a, b, qa, qb, cqa, cqb, conn_a, conn_b }
}

async fn complete(cq: &CompletionQueue) -> nvmf_transport::soft::device::Completion {
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
    c.qb.post_recv(RecvWr { wr_id: 1, buf: vec![0; 16 << 10] }).unwrap();
    let msg = pattern(10 << 10, 7);
    c.qa.post_send(SendWr::new(2, SendOp::Send, msg.clone())).unwrap();
    let sent = complete(&c.cqa).await;
    assert_eq!((sent.wc.wr_id, sent.wc.status), (2, WcStatus::Success));
    let got = complete(&c.cqb).await;
    assert_eq!((got.wc.wr_id, got.wc.status, got.wc.byte_len as usize), (1, WcStatus::Success, msg.len()));
    assert_eq!(&got.wc.buf[..msg.len()], &msg[..]);

    // Bulk: B exposes a region; A writes it in 1 MiB pieces, then reads it back.
    let total: usize = std::env::var("SOFT_BULK_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024) << 20;
    let region = c.b.register(vec![0; total], Access::REMOTE_ALL).await.unwrap();
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
        c.qa.post_recv(RecvWr { wr_id: i, buf: vec![0; 4096] }).unwrap();
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
    let cq = CompletionQueue::new();
    b.listen(4420, 4).await.unwrap();
    let qa = a.create_qp(&cq, &cq).await.unwrap();
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
    assert_eq!(a.gid(), std::net::Ipv6Addr::LOCALHOST.octets());
    let (cqa, cqb) = (CompletionQueue::new(), CompletionQueue::new());
    b.listen(4420, 4).await.unwrap();
    let qa = a.create_qp(&cqa, &cqa).await.unwrap();
    a.connect(&qa, b.local_addr(), 4420, ConnectionOptions::default(), b"v6").await.unwrap();
    let DeviceEvent::ConnectRequest { conn, peer, .. } = event(&b).await else { panic!() };
    assert_eq!(&peer.private_data[..2], b"v6");
    let qb = b.create_qp(&cqb, &cqb).await.unwrap();
    b.accept(conn, &qb, ConnectionOptions::default(), &[]).await.unwrap();
    assert!(matches!(event(&a).await, DeviceEvent::Established { .. }));
    let region = b.register(vec![0; 1 << 20], Access::REMOTE_ALL).await.unwrap();
    let data = pattern(1 << 20, 6);
    let op = SendOp::RdmaWrite { remote_addr: region.keys.addr, rkey: region.keys.rkey };
    qa.post_send(SendWr::new(1, op, data.clone())).unwrap();
    assert_eq!(complete(&cqa).await.wc.status, WcStatus::Success);
    assert!(b.deregister(region).await.unwrap() == data);
}
