//! Round trips and hostile input for the RoCEv2 wire formats.

use std::net::{Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use rstest::rstest;
use transport::soft::wire::ext::{Aeth, AtomicEth, Deth, NakCode, Reth, Syndrome};
use transport::soft::wire::{Bth, IpHeader, Opcode, PacketRepr, WireError, icrc, udp_port};

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

mod cm {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;
    use transport::soft::wire::cma::{self, CmaError, CmaHeader};
    use transport::soft::wire::mad::{self, CmMessage, CmPath, MadError, MadHeader, Rej, Rep, Req};

    fn req(private_data: Vec<u8>) -> Req {
        Req {
            local_comm_id: 0x1234_5678,
            service_id: cma::service_id(4420),
            local_ca_guid: 0x5054_00ff_feaa_0000,
            local_qkey: 0,
            local_qpn: 0x11,
            responder_resources: 16,
            local_eecn: 0,
            initiator_depth: 16,
            remote_eecn: 0,
            remote_cm_response_timeout: 20,
            transport_service_type: 0,
            end_to_end_flow_control: true,
            starting_psn: 0xab_cdef,
            local_cm_response_timeout: 20,
            retry_count: 7,
            pkey: 0xffff,
            path_mtu: 3,
            rdc_exists: false,
            rnr_retry_count: 7,
            max_cm_retries: 15,
            srq: false,
            extended_transport_type: 0,
            primary_path: CmPath {
                flow_label: 0xf_ffff,
                packet_rate: 0x3f,
                hop_limit: 64,
                sl: 15,
                local_ack_timeout: 31,
                ..Default::default()
            },
            alternate_path: CmPath::default(),
            private_data,
        }
    }

    #[test]
    fn every_message_round_trips() {
        let header = MadHeader::cm(0, 0x42);
        let messages = vec![
            CmMessage::Req(req(vec![7; mad::private_data_len::REQ])),
            CmMessage::Mra {
                local_comm_id: 1,
                remote_comm_id: 2,
                message_mraed: 1,
                service_timeout: 31,
                private_data: vec![1; 222],
            },
            CmMessage::Rej(Rej {
                local_comm_id: 1,
                remote_comm_id: 2,
                message_rejected: 0,
                ari_len: 72,
                reason: mad::reject_reason::CONSUMER_DEFINED,
                ari: [9; 72],
                private_data: vec![3; 148],
            }),
            CmMessage::Rep(Rep {
                local_comm_id: 1,
                remote_comm_id: 2,
                local_qkey: 3,
                local_qpn: 0xff_ffff,
                local_eecn: 0,
                starting_psn: 5,
                responder_resources: 16,
                initiator_depth: 16,
                target_ack_delay: 31,
                failover_accepted: 3,
                end_to_end_flow_control: true,
                rnr_retry_count: 7,
                srq: true,
                local_ca_guid: 9,
                private_data: vec![4; 196],
            }),
            CmMessage::Rtu { local_comm_id: 1, remote_comm_id: 2, private_data: vec![5; 224] },
            CmMessage::Dreq { local_comm_id: 1, remote_comm_id: 2, remote_qpn: 0x13, private_data: vec![6; 220] },
            CmMessage::Drep { local_comm_id: 1, remote_comm_id: 2, private_data: vec![8; 224] },
        ];
        for m in messages {
            let bytes = m.emit(&header).unwrap();
            let (h, back) = CmMessage::parse(&bytes).unwrap();
            assert_eq!((h.attr_id, h.transaction_id), (m.attr_id(), 0x42));
            assert_eq!(back, m);
        }
    }

    #[test]
    fn short_private_data_is_zero_padded_and_long_refused() {
        let (_, back) =
            CmMessage::parse(&CmMessage::Req(req(vec![1, 2, 3])).emit(&MadHeader::cm(0, 1)).unwrap()).unwrap();
        let CmMessage::Req(r) = back else { unreachable!() };
        assert_eq!(&r.private_data[..4], &[1, 2, 3, 0]);
        assert_eq!(r.private_data.len(), 92);
        let long = CmMessage::Req(req(vec![0; 93]));
        assert!(matches!(long.emit(&MadHeader::cm(0, 1)), Err(MadError::PrivateDataTooLong { max: 92, .. })));
        let mut wide = req(vec![]);
        wide.primary_path.flow_label = 1 << 20;
        assert!(CmMessage::Req(wide).emit(&MadHeader::cm(0, 1)).is_err(), "21-bit flow label refused");
    }

    #[test]
    fn hostile_mads() {
        assert!(CmMessage::parse(&[0; 255]).is_err());
        let mut m = CmMessage::Rtu { local_comm_id: 1, remote_comm_id: 2, private_data: vec![] }
            .emit(&MadHeader::cm(0, 1))
            .unwrap();
        m[1] = 0x04; // a SA MAD
        assert!(matches!(CmMessage::parse(&m), Err(MadError::NotCm { class: 4, .. })));
        m[1] = 0x07;
        m[17] = 0x19; // LAP: not handled
        assert!(matches!(CmMessage::parse(&m), Err(MadError::UnknownAttribute(0x19))));
    }

    #[test]
    fn cma_headers() {
        for (src, dst) in [
            (IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))),
            (IpAddr::V6(Ipv6Addr::LOCALHOST), IpAddr::V6("fd00::2".parse().unwrap())),
        ] {
            let h = CmaHeader { version: 0, src_port: 40000, src, dst };
            let mut bytes = h.emit().unwrap().to_vec();
            bytes.extend_from_slice(b"nvme");
            assert_eq!(CmaHeader::parse(&bytes).unwrap(), (h, &b"nvme"[..]));
        }
        let mixed = CmaHeader {
            version: 0,
            src_port: 1,
            src: IpAddr::V4(Ipv4Addr::LOCALHOST),
            dst: IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        assert_eq!(mixed.emit(), Err(CmaError::MixedFamilies));
        let mut bad = CmaHeader {
            version: 0,
            src_port: 1,
            src: IpAddr::V4(Ipv4Addr::LOCALHOST),
            dst: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
        .emit()
        .unwrap();
        bad[1] = 0x50;
        assert_eq!(CmaHeader::parse(&bad), Err(CmaError::IpVersion(5)));
        bad[0] = 1;
        assert_eq!(CmaHeader::parse(&bad), Err(CmaError::Version(1)));
        assert!(CmaHeader::parse(&[0; 35]).is_err());
        assert_eq!(cma::port_of(cma::service_id(4420)), Some(4420));
        assert_eq!(cma::port_of(0x0000_0000_0102_1144), None, "another port space");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any 256 bytes: no panic; a parsed CM message re-emits to the same bytes except reserved bits.
        #[test]
        fn arbitrary_mads(mut bytes in proptest::collection::vec(any::<u8>(), 256), attr in 0x10u16..=0x16) {
            bytes[1] = 0x07;
            bytes[2] = 2;
            bytes[16..18].copy_from_slice(&attr.to_be_bytes());
            if let Ok((h, m)) = CmMessage::parse(&bytes) {
                let again = m.emit(&h).unwrap();
                prop_assert_eq!(CmMessage::parse(&again).unwrap(), (h, m));
            }
        }
    }
}
