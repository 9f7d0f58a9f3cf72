//! A hostile or broken peer: bad rkeys, out-of-bounds and wrong-permission RDMA, lengths that lie, PSNs far
//! outside the window, garbage and corrupted datagrams. The responder answers with the right NAK or drops the
//! packet; nothing outside a registered region is read or written; other queue pairs keep working.

mod support;

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use support::SimMemory;
use transport::soft::device::{CompletionQueue, ConnectionOptions, Device, DeviceEvent, SoftConfig};
use transport::soft::rc::{Access, EngineState, RcConfig, RcQp, RecvWr, SendOp, SendWr, WcStatus};
use transport::soft::wire::ext::{NakCode, Reth, Syndrome};
use transport::soft::wire::{Bth, Opcode, PacketRepr};

const KEY_RW: u32 = 0x10;
const KEY_RO: u32 = 0x20;
const KEY_WO: u32 = 0x30;
const BASE: u64 = 0x1000;

fn responder() -> (RcQp, SimMemory) {
    let mut memory = SimMemory::default();
    memory.register(KEY_RW, BASE, vec![0; 4096], Access::REMOTE_ALL);
    memory.register(KEY_RO, BASE + 0x10000, vec![7; 4096], Access::REMOTE_READ);
    memory.register(KEY_WO, BASE + 0x20000, vec![9; 4096], Access::REMOTE_WRITE);
    // Everything around the regions is a canary the peer must never reach.
    let qp = RcQp::new(RcConfig::new(0x22, 0x11, 500, 1000)).unwrap();
    (qp, memory)
}

fn request(opcode: Opcode, psn: u32, reth: Option<Reth>, payload: &[u8]) -> Vec<u8> {
    let mut p = PacketRepr::new(Bth::new(opcode, 0x22, psn));
    p.bth.ack_req = true;
    p.reth = reth;
    p.payload = payload;
    let mut out = Vec::new();
    p.emit(&mut out).unwrap();
    out.extend_from_slice(&[0; 4]);
    out
}

/// Feeds one request and returns every packet the responder answers with (parsed AETH syndromes and PSNs).
fn feed(qp: &mut RcQp, memory: &mut SimMemory, bytes: &[u8]) -> Vec<(Opcode, u32, Option<Syndrome>)> {
    let now = Instant::now();
    qp.handle_packet(now, &PacketRepr::parse(bytes).unwrap().0, memory);
    let mut out = Vec::new();
    while let Some(mut p) = qp.poll_transmit(now) {
        p.extend_from_slice(&[0; 4]);
        let (r, _) = PacketRepr::parse(&p).unwrap();
        out.push((r.bth.opcode, r.bth.psn, r.aeth.map(|a| a.syndrome)));
    }
    out
}

fn snapshot(m: &SimMemory) -> Vec<Vec<u8>> {
    m.regions.iter().map(|r| r.data.clone()).collect()
}

#[test]
fn access_violations_are_nakked_and_touch_nothing() {
    let cases: Vec<(&str, Opcode, Reth, Vec<u8>)> = vec![
        ("unknown rkey", Opcode::RcRdmaWriteOnly, Reth { va: BASE, rkey: 0x99, len: 16 }, vec![1; 16]),
        ("past the end", Opcode::RcRdmaWriteOnly, Reth { va: BASE + 4090, rkey: KEY_RW, len: 16 }, vec![1; 16]),
        ("before the start", Opcode::RcRdmaWriteOnly, Reth { va: BASE - 8, rkey: KEY_RW, len: 16 }, vec![1; 16]),
        ("wrapping address", Opcode::RcRdmaWriteOnly, Reth { va: u64::MAX - 4, rkey: KEY_RW, len: 16 }, vec![1; 16]),
        (
            "write to read-only",
            Opcode::RcRdmaWriteOnly,
            Reth { va: BASE + 0x10000, rkey: KEY_RO, len: 16 },
            vec![1; 16],
        ),
        ("read of write-only", Opcode::RcRdmaReadRequest, Reth { va: BASE + 0x20000, rkey: KEY_WO, len: 16 }, vec![]),
        ("read past the end", Opcode::RcRdmaReadRequest, Reth { va: BASE, rkey: KEY_RW, len: 4097 }, vec![]),
        (
            "another region's window",
            Opcode::RcRdmaReadRequest,
            Reth { va: BASE + 0x10000, rkey: KEY_RW, len: 1 },
            vec![],
        ),
    ];
    for (what, opcode, reth, payload) in cases {
        let (mut qp, mut memory) = responder();
        let before = snapshot(&memory);
        let out = feed(&mut qp, &mut memory, &request(opcode, 1000, Some(reth), &payload));
        assert_eq!(out, vec![(Opcode::RcAcknowledge, 1000, Some(Syndrome::Nak(NakCode::RemoteAccessError)))], "{what}");
        assert_eq!(snapshot(&memory), before, "{what}: memory changed");
        assert_eq!(qp.state(), EngineState::Error, "{what}");
    }
}

#[test]
fn lengths_that_lie_are_invalid_requests() {
    // A WRITE whose payload exceeds its RETH length.
    let (mut qp, mut memory) = responder();
    let out = feed(
        &mut qp,
        &mut memory,
        &request(Opcode::RcRdmaWriteOnly, 1000, Some(Reth { va: BASE, rkey: KEY_RW, len: 8 }), &[1; 16]),
    );
    assert_eq!(out[0].2, Some(Syndrome::Nak(NakCode::InvalidRequest)));
    assert_eq!(memory.region(KEY_RW).data[..16], [0; 16], "nothing written");
    // A middle packet with no message in progress.
    let (mut qp, mut memory) = responder();
    let out = feed(&mut qp, &mut memory, &request(Opcode::RcSendMiddle, 1000, None, &[0; 1024]));
    assert_eq!(out[0].2, Some(Syndrome::Nak(NakCode::InvalidRequest)));
    // A first packet shorter than the MTU.
    let (mut qp, mut memory) = responder();
    qp.post_recv(RecvWr::new(1, vec![0; 8192])).unwrap();
    let out = feed(&mut qp, &mut memory, &request(Opcode::RcSendFirst, 1000, None, &[0; 100]));
    assert_eq!(out[0].2, Some(Syndrome::Nak(NakCode::InvalidRequest)));
    // A SEND larger than the posted receive: the receive completes with a length error.
    let (mut qp, mut memory) = responder();
    qp.post_recv(RecvWr::new(1, vec![0; 10])).unwrap();
    let out = feed(&mut qp, &mut memory, &request(Opcode::RcSendOnly, 1000, None, &[5; 20]));
    assert_eq!(out[0].2, Some(Syndrome::Nak(NakCode::InvalidRequest)));
    let wc = qp.poll_completion().unwrap();
    assert_eq!((wc.wr_id, wc.status), (1, WcStatus::LocalLength));
    // Atomics are not offered.
    let (mut qp, mut memory) = responder();
    let mut p = PacketRepr::new(Bth::new(Opcode::RcFetchAdd, 0x22, 1000));
    p.atomic_eth = Some(Default::default());
    let mut bytes = Vec::new();
    p.emit(&mut bytes).unwrap();
    bytes.extend_from_slice(&[0; 4]);
    assert_eq!(feed(&mut qp, &mut memory, &bytes)[0].2, Some(Syndrome::Nak(NakCode::InvalidRequest)));
}

#[test]
fn psns_outside_the_window() {
    let (mut qp, mut memory) = responder();
    let reth = Some(Reth { va: BASE, rkey: KEY_RW, len: 4 });
    // Far ahead: one sequence-error NAK for the gap, nothing executed.
    let out = feed(&mut qp, &mut memory, &request(Opcode::RcRdmaWriteOnly, 1000 + 0x40_0000, reth, &[1; 4]));
    assert_eq!(out, vec![(Opcode::RcAcknowledge, 1000, Some(Syndrome::Nak(NakCode::PsnSequenceError)))]);
    assert!(
        feed(&mut qp, &mut memory, &request(Opcode::RcRdmaWriteOnly, 1001, reth, &[1; 4])).is_empty(),
        "one NAK per gap"
    );
    // Far behind: treated as a duplicate, re-acknowledged, not executed.
    let out = feed(
        &mut qp,
        &mut memory,
        &request(Opcode::RcRdmaWriteOnly, (1000u32.wrapping_sub(0x40_0000)) & 0xff_ffff, reth, &[1; 4]),
    );
    assert_eq!(out, vec![(Opcode::RcAcknowledge, 999, Some(Syndrome::ACK_NO_CREDITS))]);
    assert_eq!(memory.region(KEY_RW).data[..4], [0; 4]);
    // The expected PSN still works.
    let out = feed(&mut qp, &mut memory, &request(Opcode::RcRdmaWriteOnly, 1000, reth, &[1; 4]));
    assert_eq!(out, vec![(Opcode::RcAcknowledge, 1000, Some(Syndrome::ACK_NO_CREDITS))]);
    assert_eq!(memory.region(KEY_RW).data[..4], [1; 4]);
    assert_eq!(qp.state(), EngineState::Rts);
}

#[test]
fn duplicate_read_requests_must_match_what_was_executed() {
    let (mut qp, mut memory) = responder();
    let read = Reth { va: BASE + 0x10000, rkey: KEY_RO, len: 2048 };
    let first = feed(&mut qp, &mut memory, &request(Opcode::RcRdmaReadRequest, 1000, Some(read), &[]));
    assert_eq!(first.len(), 2);
    // A replay from the second packet is answered; a "replay" reaching further than the original is not.
    let again = feed(
        &mut qp,
        &mut memory,
        &request(Opcode::RcRdmaReadRequest, 1001, Some(Reth { va: read.va + 1024, len: 1024, ..read }), &[]),
    );
    assert_eq!(again.len(), 1);
    let forged = feed(
        &mut qp,
        &mut memory,
        &request(Opcode::RcRdmaReadRequest, 1001, Some(Reth { va: read.va + 1024, len: 4096, ..read }), &[]),
    );
    assert!(forged.is_empty());
}

fn device(last: u8) -> Device {
    let mut config = SoftConfig::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)));
    config.port = 0;
    Device::open(config).unwrap()
}

async fn event(dev: &Device) -> DeviceEvent {
    tokio::time::timeout(Duration::from_secs(10), dev.next_event()).await.unwrap().unwrap()
}

/// Garbage, truncated and corrupted datagrams at a device are dropped; a broken queue pair does not disturb
/// another one between the same devices.
#[tokio::test]
async fn garbage_is_dropped_and_other_queue_pairs_keep_working() {
    let (a, b) = (device(1), device(2));
    let (pda, pdb) = (a.alloc_pd().await.unwrap(), b.alloc_pd().await.unwrap());
    b.listen(4420, 8).await.unwrap();
    let mut pairs = Vec::new();
    for _ in 0..2 {
        let (cqa, cqb) = (CompletionQueue::new(), CompletionQueue::new());
        let qa = a.create_qp(&pda, &cqa, &cqa).await.unwrap();
        a.connect(&qa, b.local_addr(), 4420, ConnectionOptions::default(), &[]).await.unwrap();
        let DeviceEvent::ConnectRequest { conn, .. } = event(&b).await else { panic!() };
        let qb = b.create_qp(&pdb, &cqb, &cqb).await.unwrap();
        b.accept(conn, &qb, ConnectionOptions::default(), &[]).await.unwrap();
        assert!(matches!(event(&a).await, DeviceEvent::Established { .. }));
        assert!(matches!(event(&b).await, DeviceEvent::Established { .. }));
        pairs.push((qa, qb, cqa, cqb));
    }
    let region = b.register(&pdb, vec![0; 1 << 20], Access::REMOTE_ALL).await.unwrap();
    let dropped_before = b.stats().await.unwrap().packets_dropped;

    // Throw junk at B: random bytes, a valid-looking packet with a wrong ICRC, a truncated header, and a
    // well-formed WRITE for a live queue pair from a stranger's address.
    let stranger = UdpSocket::bind("127.0.0.3:0").unwrap();
    let mut junk = vec![vec![0xff; 100], vec![0x0a; 3], Vec::new()];
    let mut forged = PacketRepr::new(Bth::new(Opcode::RcRdmaWriteOnly, pairs[0].1.qpn, 0));
    forged.reth = Some(Reth { va: region.keys.addr, rkey: region.keys.rkey, len: 4 });
    forged.payload = &[0xee; 4];
    let mut bytes = Vec::new();
    forged.emit(&mut bytes).unwrap();
    bytes.extend_from_slice(&[1, 2, 3, 4]); // wrong ICRC
    junk.push(bytes.clone());
    let ip = transport::soft::wire::IpHeader::ipv4(
        Ipv4Addr::new(127, 0, 0, 3),
        Ipv4Addr::new(127, 0, 0, 2),
        0,
        (8 + bytes.len()) as u16,
    );
    bytes.truncate(bytes.len() - 4);
    transport::soft::wire::icrc::append(&ip, stranger.local_addr().unwrap().port(), &mut bytes).unwrap();
    junk.push(bytes); // right ICRC, but not from the connected peer
    for j in &junk {
        stranger.send_to(j, b.local_addr()).unwrap();
    }

    // Break the first pair with a bad rkey.
    let (qa0, _, cqa0, _) = &pairs[0];
    qa0.post_send(SendWr::new(1, SendOp::RdmaWrite { remote_addr: region.keys.addr, rkey: 0xbad }, vec![1; 64]))
        .unwrap();
    let wc = tokio::time::timeout(Duration::from_secs(10), cqa0.next()).await.unwrap().wc;
    assert_eq!(wc.status, WcStatus::RemoteAccess);

    // The second pair still moves data.
    let (qa1, _, cqa1, _) = &pairs[1];
    qa1.post_send(SendWr::new(
        2,
        SendOp::RdmaWrite { remote_addr: region.keys.addr + 100, rkey: region.keys.rkey },
        vec![0x5a; 1000],
    ))
    .unwrap();
    let wc = tokio::time::timeout(Duration::from_secs(10), cqa1.next()).await.unwrap().wc;
    assert_eq!(wc.status, WcStatus::Success);
    let memory = b.deregister(region).await.unwrap();
    assert!(memory[..100].iter().all(|&x| x == 0), "the forged WRITE never landed");
    assert!(memory[100..1100].iter().all(|&x| x == 0x5a));
    assert!(b.stats().await.unwrap().packets_dropped >= dropped_before + junk.len() as u64);
}

/// A READ asking for 4 GiB with a key that does not exist is refused before anything is allocated or read.
#[test]
fn huge_reads_are_checked_before_allocating() {
    let (mut qp, mut memory) = responder();
    let out = feed(
        &mut qp,
        &mut memory,
        &request(Opcode::RcRdmaReadRequest, 1000, Some(Reth { va: 0, rkey: 0x77, len: u32::MAX }), &[]),
    );
    assert_eq!(out, vec![(Opcode::RcAcknowledge, 1000, Some(Syndrome::Nak(NakCode::RemoteAccessError)))]);
}

/// More READs at once than the responder resources granted: the excess is an invalid RD request.
#[test]
fn reads_beyond_the_granted_depth_are_refused() {
    let mut memory = SimMemory::default();
    memory.register(KEY_RO, BASE, vec![7; 4096], Access::REMOTE_READ);
    let mut qp = RcQp::new(RcConfig { max_dest_rd_atomic: 2, ..RcConfig::new(0x22, 0x11, 500, 1000) }).unwrap();
    let now = Instant::now();
    let read = Some(Reth { va: BASE, rkey: KEY_RO, len: 8 });
    // Two READs are taken in before the responder gets to answer them; the third exceeds the grant.
    for psn in 1000..1003 {
        qp.handle_packet(
            now,
            &PacketRepr::parse(&request(Opcode::RcRdmaReadRequest, psn, read, &[])).unwrap().0,
            &mut memory,
        );
    }
    assert_eq!(qp.state(), EngineState::Error);
    let mut out = Vec::new();
    while let Some(mut p) = qp.poll_transmit(now) {
        p.extend_from_slice(&[0; 4]);
        out.push(PacketRepr::parse(&p).unwrap().0.aeth.map(|a| a.syndrome));
    }
    assert_eq!(out, vec![Some(Syndrome::Nak(NakCode::InvalidRdRequest))]);
}
