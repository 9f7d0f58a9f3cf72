//! Round trips and hostile input for the RoCEv2 wire formats.

use std::net::{Ipv4Addr, Ipv6Addr};

use nvmf_transport::soft::wire::ext::{Aeth, AtomicEth, Deth, NakCode, Reth, Syndrome};
use nvmf_transport::soft::wire::{Bth, IpHeader, Opcode, PacketRepr, WireError, icrc, udp_port};
use proptest::prelude::*;
use rstest::rstest;

/// A packet of `opcode` with every header it calls for filled from `seed`.
fn full_packet(opcode: Opcode, seed: u64, payload: &[u8]) -> PacketRepr<'_> {
    let h = opcode.headers();
    let mut bth = Bth::new(opcode, (seed as u32) & 0xff_ffff, (seed >> 24) as u32 & 0xff_ffff);
    bth.ack_req = seed & 1 == 1;
    bth.solicited = seed & 2 == 2;
    PacketRepr {
        bth,
        deth: h.deth.then_some(Deth { qkey: seed as u32, src_qp: (seed >> 8) as u32 & 0xff_ffff }),
        reth: h.reth.then_some(Reth { va: seed, rkey: !(seed as u32), len: payload.len() as u32 }),
        atomic_eth: h.atomic_eth.then_some(AtomicEth {
            va: seed,
            rkey: 7,
            swap_add: !seed,
            compare: seed.rotate_left(7),
        }),
        aeth: h.aeth.then_some(Aeth { syndrome: Syndrome::ACK_NO_CREDITS, msn: (seed as u32) & 0xff_ffff }),
        atomic_ack: h.atomic_ack_eth.then_some(seed ^ 0x5555),
        imm: h.imm.then_some(seed as u32 ^ 0xdead_beef),
        ieth: h.ieth.then_some(seed as u32 ^ 0x1234),
        payload: if opcode.has_payload() { payload } else { &[] },
    }
}

#[rstest]
fn every_opcode_round_trips(#[values(0u64, 1, 0xffff_ffff_ffff, u64::MAX)] seed: u64) {
    let payload: Vec<u8> = (0..1027u32).map(|i| i as u8).collect();
    let ip = IpHeader::ipv4(Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2), 0, 0);
    for &opcode in Opcode::ALL {
        let packet = full_packet(opcode, seed, &payload);
        let mut bytes = Vec::new();
        packet.emit(&mut bytes).unwrap();
        assert_eq!(bytes.len() % 4, 0, "{opcode:?} padded to a multiple of 4");
        icrc::append(&ip, 0xc000, &mut bytes).unwrap();
        let (back, _) = PacketRepr::parse(&bytes).unwrap();
        let expected_pad = if opcode.has_payload() { 1 } else { 0 };
        assert_eq!(back, PacketRepr { bth: Bth { pad: expected_pad, ..packet.bth }, ..packet.clone() }, "{opcode:?}");
        icrc::verify(&ip, 0xc000, &bytes).unwrap();
        assert!(icrc::verify(&ip, 0xc001, &bytes).is_err(), "the UDP source port is covered");
    }
}

#[test]
fn emit_refuses_headers_that_do_not_belong_to_the_opcode() {
    let mut p = full_packet(Opcode::RcSendOnly, 1, b"abc");
    p.reth = Some(Reth::default());
    assert!(matches!(p.emit(&mut Vec::new()), Err(WireError::HeaderMismatch { what: "RETH", .. })));
    let mut p = full_packet(Opcode::RcRdmaWriteFirst, 1, b"abc");
    p.reth = None;
    assert!(matches!(p.emit(&mut Vec::new()), Err(WireError::HeaderMismatch { what: "RETH", .. })));
    let mut p = full_packet(Opcode::RcAcknowledge, 1, b"");
    p.payload = b"x";
    assert!(matches!(p.emit(&mut Vec::new()), Err(WireError::UnexpectedPayload { .. })));
    let mut p = full_packet(Opcode::RcSendOnly, 1, b"");
    p.bth.psn = 1 << 24;
    assert!(matches!(p.emit(&mut Vec::new()), Err(WireError::FieldOverflow { what: "BTH PSN", .. })));
}

#[test]
fn hostile_packets_are_refused() {
    let ip = IpHeader::ipv4(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 0, 0);
    let mut good = Vec::new();
    full_packet(Opcode::RcRdmaWriteFirst, 3, &[9; 64]).emit(&mut good).unwrap();
    icrc::append(&ip, 0xc000, &mut good).unwrap();
    for cut in 0..good.len() - 64 {
        assert!(PacketRepr::parse(&good[..cut]).is_err(), "truncated to {cut}");
    }
    let mut unknown = good.clone();
    unknown[0] = 0x15;
    assert_eq!(PacketRepr::parse(&unknown).unwrap_err(), WireError::UnknownOpcode(0x15));
    let mut version = good.clone();
    version[1] |= 0x01;
    assert_eq!(PacketRepr::parse(&version).unwrap_err(), WireError::BadVersion(1));
    // An ACK carrying payload bytes.
    let mut ack = Vec::new();
    full_packet(Opcode::RcAcknowledge, 3, &[]).emit(&mut ack).unwrap();
    ack.extend_from_slice(&[0; 8]);
    assert!(matches!(PacketRepr::parse(&ack), Err(WireError::UnexpectedPayload { .. })));
    // A pad count larger than what follows the headers.
    let mut pad = Vec::new();
    full_packet(Opcode::RcSendOnly, 3, &[]).emit(&mut pad).unwrap();
    pad[1] |= 0x30;
    pad.extend_from_slice(&[0; 4]);
    assert!(matches!(PacketRepr::parse(&pad), Err(WireError::Truncated { .. })));
}

#[test]
fn aeth_syndromes() {
    for (byte, s) in [
        (0x1f, Syndrome::ACK_NO_CREDITS),
        (0x00, Syndrome::Ack { credits: 0 }),
        (0x2e, Syndrome::RnrNak { timer: 14 }),
        (0x60, Syndrome::Nak(NakCode::PsnSequenceError)),
        (0x61, Syndrome::Nak(NakCode::InvalidRequest)),
        (0x62, Syndrome::Nak(NakCode::RemoteAccessError)),
        (0x63, Syndrome::Nak(NakCode::RemoteOperationalError)),
        (0x64, Syndrome::Nak(NakCode::InvalidRdRequest)),
    ] {
        assert_eq!(Syndrome::from_u8(byte), s);
        assert_eq!(s.to_u8(), byte);
    }
    assert_eq!(Syndrome::from_u8(0x65), Syndrome::Reserved(0x65));
    assert_eq!(Syndrome::from_u8(0x40), Syndrome::Reserved(0x40));
}

#[test]
fn known_source_ports() {
    // From the captures: QP1 and three rdma_cm connections (host rdma_cm ports 36644, 47423, 45602 to 4420).
    assert_eq!(udp_port::rxe_default(1), 55410);
    assert_eq!(udp_port::from_flow_label(udp_port::cm_flow_label(36644, 4420)), 59045);
    assert_eq!(udp_port::from_flow_label(udp_port::cm_flow_label(47423, 4420)), 65532);
    assert_eq!(udp_port::from_flow_label(udp_port::cm_flow_label(45602, 4420)), 58228);
    for fl in [0u32, 1, 0x3fff, 0x4000, 0xf_ffff, 0xfff_ffff] {
        assert!(udp_port::from_flow_label(fl) >= 0xc000);
    }
    assert_eq!(udp_port::qp_pair_flow_label(0x11, 0x11), 0x121);
}

#[test]
fn ipv6_icrc_masks_class_label_and_hops() {
    let src: Ipv6Addr = "fe80::5054:ff:feaa:0".parse().unwrap();
    let dst: Ipv6Addr = "fe80::5054:ff:febb:0".parse().unwrap();
    let mut bytes = Vec::new();
    full_packet(Opcode::RcSendOnly, 9, b"hello").emit(&mut bytes).unwrap();
    let ip = IpHeader::ipv6(src, dst, (8 + bytes.len() + 4) as u16);
    icrc::append(&ip, 0xd000, &mut bytes).unwrap();
    let IpHeader::V6(mut h) = ip else { unreachable!() };
    h[0] = 0x6a;
    h[1] = 0xbc;
    h[3] = 0x12;
    h[7] = 1;
    icrc::verify(&IpHeader::V6(h), 0xd000, &bytes).unwrap();
    h[8] ^= 1; // the source address is covered
    assert!(icrc::verify(&IpHeader::V6(h), 0xd000, &bytes).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Garbage never panics the parser, and whatever parses re-emits to a packet that parses the same (reserved
    /// bits and pad bytes are not kept).
    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok((p, _)) = PacketRepr::parse(&bytes) {
            let mut out = Vec::new();
            p.emit(&mut out).unwrap();
            prop_assert_eq!(out.len() % 4, 0);
            out.extend_from_slice(&[0; 4]);
            let (again, _) = PacketRepr::parse(&out).unwrap();
            prop_assert_eq!(again.payload, p.payload);
            prop_assert_eq!(again.bth, Bth { pad: packet_pad(p.payload.len()) as u8, ..p.bth });
            prop_assert_eq!((again.reth, again.aeth, again.deth, again.imm, again.ieth), (p.reth, p.aeth, p.deth, p.imm, p.ieth));
        }
    }

    #[test]
    fn typed_round_trip(op in 0usize..25, seed in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        let opcode = Opcode::ALL[op];
        let packet = full_packet(opcode, seed, &payload);
        let mut bytes = Vec::new();
        packet.emit(&mut bytes).unwrap();
        bytes.extend_from_slice(&[0; 4]);
        let (back, _) = PacketRepr::parse(&bytes).unwrap();
        prop_assert_eq!(back.payload, packet.payload);
        prop_assert_eq!((back.reth, back.aeth, back.deth, back.imm, back.ieth, back.atomic_eth, back.atomic_ack),
                        (packet.reth, packet.aeth, packet.deth, packet.imm, packet.ieth, packet.atomic_eth, packet.atomic_ack));
    }
}

fn packet_pad(len: usize) -> usize {
    (4 - len % 4) % 4
}
