//! Every datagram two soft devices put on the wire, captured outside them by a raw IP socket, must carry the
//! ICRC that is right for the IPv4 header it was really sent with — the check a kernel rxe makes and a soft
//! receiver cannot (its socket never sees the header). Connection setup with private data, SENDs of several
//! MTUs, RDMA WRITE, RDMA READ, SEND with invalidate, disconnect and time-wait, on loopback at the standard
//! port. Root only (a raw socket); under `CI=true` it must run, never skip.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use support::capture::{WireCapture, assert_icrcs_match_the_wire};
use transport::soft::device::{CompletionQueue, ConnectionOptions, Device, DeviceEvent, SoftConfig};
use transport::soft::rc::{Access, RecvWr, SendOp, SendWr, WcStatus};
use transport::soft::wire::Opcode;

fn root_or_skip(name: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true: {name} must run as root (a raw socket)");
    eprintln!("SKIP {name}: needs root (a raw IP socket to see the headers on the wire)");
    false
}

async fn event(dev: &Device) -> DeviceEvent {
    tokio::time::timeout(Duration::from_secs(10), dev.next_event()).await.expect("event within 10 s").expect("open")
}

#[tokio::test]
async fn every_datagram_on_the_wire_carries_the_icrc_of_its_real_headers() {
    if !root_or_skip("wire_capture") {
        return;
    }
    let addrs = [IpAddr::V4(Ipv4Addr::new(127, 0, 0, 21)), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 22))];
    let capture = WireCapture::start(None, &addrs);
    let (a, b) = (Device::open(SoftConfig::new(addrs[0])).unwrap(), Device::open(SoftConfig::new(addrs[1])).unwrap());
    let (pda, pdb) = (a.alloc_pd().await.unwrap(), b.alloc_pd().await.unwrap());
    let (cqa, cqb) = (CompletionQueue::new(), CompletionQueue::new());
    b.listen(4420, 4).await.unwrap();
    let qa = a.create_qp(&pda, &cqa, &cqa).await.unwrap();
    let conn_a = a.connect(&qa, b.local_addr(), 4420, ConnectionOptions::default(), &[7; 32]).await.unwrap();
    let DeviceEvent::ConnectRequest { conn: conn_b, .. } = event(&b).await else { panic!("connect request") };
    let qb = b.create_qp(&pdb, &cqb, &cqb).await.unwrap();
    b.accept(conn_b, &qb, ConnectionOptions::default(), &[8; 16]).await.unwrap();
    assert!(matches!(event(&a).await, DeviceEvent::Established { .. }));
    assert!(matches!(event(&b).await, DeviceEvent::Established { .. }));

    let complete = |cq: &CompletionQueue| {
        let cq = cq.clone();
        async move { tokio::time::timeout(Duration::from_secs(10), cq.next()).await.expect("completion").wc }
    };
    // SENDs of one byte, one MTU and several MTUs.
    for (i, len) in [1usize, 4096, 10_000].into_iter().enumerate() {
        qb.post_recv(RecvWr::new(i as u64, vec![0; 16 << 10])).unwrap();
        qa.post_send(SendWr::new(i as u64, SendOp::Send, vec![i as u8; len])).unwrap();
        assert_eq!(complete(&cqa).await.status, WcStatus::Success);
        assert_eq!(complete(&cqb).await.byte_len as usize, len);
    }
    // RDMA WRITE of 256 KiB, READ of 64 KiB back, then a SEND that invalidates the region's key.
    let region = b.register(&pdb, vec![0; 256 << 10], Access::REMOTE_ALL).await.unwrap();
    let write = SendOp::RdmaWrite { remote_addr: region.keys.addr, rkey: region.keys.rkey };
    qa.post_send(SendWr::new(10, write, vec![0x5a; 256 << 10])).unwrap();
    assert_eq!(complete(&cqa).await.status, WcStatus::Success);
    let read = SendOp::RdmaRead { remote_addr: region.keys.addr, rkey: region.keys.rkey };
    qa.post_send(SendWr::new(11, read, vec![0; 64 << 10])).unwrap();
    let wc = complete(&cqa).await;
    assert_eq!(wc.status, WcStatus::Success);
    assert!(wc.buf.iter().all(|&x| x == 0x5a));
    qb.post_recv(RecvWr::new(12, vec![0; 64])).unwrap();
    qa.post_send(SendWr::new(12, SendOp::SendWithInv(region.keys.rkey), vec![1; 16])).unwrap();
    assert_eq!(complete(&cqa).await.status, WcStatus::Success);
    assert_eq!(complete(&cqb).await.status, WcStatus::Success);

    a.disconnect(conn_a).await.unwrap();
    assert_eq!(event(&a).await, DeviceEvent::Disconnected { conn: conn_a });
    assert_eq!(event(&b).await, DeviceEvent::Disconnected { conn: conn_b });
    a.destroy_qp(&qa).await.unwrap();
    b.destroy_qp(&qb).await.unwrap();
    let datagrams = capture.stop();

    let opcodes = assert_icrcs_match_the_wire("soft ↔ soft on loopback", &datagrams);
    for (want, what) in [
        (Opcode::UdSendOnly, "CM MADs"),
        (Opcode::RcSendOnly, "SEND only"),
        (Opcode::RcSendFirst, "SEND first"),
        (Opcode::RcSendLast, "SEND last"),
        (Opcode::RcRdmaWriteFirst, "WRITE first"),
        (Opcode::RcRdmaWriteMiddle, "WRITE middle"),
        (Opcode::RcRdmaWriteLast, "WRITE last"),
        (Opcode::RcRdmaReadRequest, "READ request"),
        (Opcode::RcRdmaReadResponseMiddle, "READ response"),
        (Opcode::RcSendOnlyWithInvalidate, "SEND with invalidate"),
        (Opcode::RcAcknowledge, "ACK"),
    ] {
        assert!(opcodes.contains(&want), "no {what} captured: {opcodes:?}");
    }
    // Both directions, as sent (DF set: the identification is then 0, what the ICRC was computed over).
    for addr in addrs {
        assert!(datagrams.iter().any(|d| d.src == addr), "nothing captured from {addr}");
    }
    // CA GUIDs: loopback has no MAC, so each device's comes from its address — never 0, never shared.
    let mut guids = Vec::new();
    for d in &datagrams {
        let (p, _) = transport::soft::wire::PacketRepr::parse(&d.payload).unwrap();
        match transport::soft::wire::mad::CmMessage::parse(p.payload).map(|(_, m)| m) {
            Ok(transport::soft::wire::mad::CmMessage::Req(req)) => guids.push((d.src, req.local_ca_guid)),
            Ok(transport::soft::wire::mad::CmMessage::Rep(rep)) => guids.push((d.src, rep.local_ca_guid)),
            _ => {}
        }
    }
    // (A REQ or REP retransmitted on a slow machine appears twice.)
    guids.dedup();
    let expected = addrs.map(|a| (a, transport::soft::cm::node_guid_of_addr(a)));
    assert_eq!(guids, expected.to_vec());
    assert!(expected[0].1 != expected[1].1 && expected.iter().all(|(_, g)| *g != 0));
    assert_eq!(a.stats().await.unwrap().node_guid, expected[0].1);
}
