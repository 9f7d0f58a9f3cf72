//! Known answers from the kernel: every RoCEv2 packet that Linux rxe sent in `shared/vectors` decodes, its ICRC
//! recomputes to the captured value, and re-emitting the decoded packet gives the captured bytes back; a soft
//! device answers the kernel host's captured connection setup as the kernel target did.

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use nvme_proto::rdma_cm::CmAccept;
use transport::soft::device::{CompletionQueue, ConnectionOptions, Device, DeviceEvent, SoftConfig};
use transport::soft::pcap::{self, Datagram};
use transport::soft::rc::{RecvWr, SendOp, SendWr, WcStatus};
use transport::soft::wire::ext::{GSI_QKEY, Syndrome};
use transport::soft::wire::{IpHeader, Opcode, PacketRepr, WireError, icrc, udp_port};

const CAPTURES: [&str; 4] =
    ["connect-io-mtu1024.pcap", "connect-io-mtu1024.initiator.pcap", "cm-reject.pcap", "cm-reject.initiator.pcap"];

fn vectors_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors");
    if dir.join(CAPTURES[0]).is_file() {
        return Some(dir);
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true but the vectors are missing at {}", dir.display());
    eprintln!("SKIP: captured vectors not found at {}", dir.display());
    None
}

fn load(name: &str) -> Option<Vec<Datagram>> {
    let dir = vectors_dir()?;
    Some(pcap::read_rocev2(&std::fs::read(dir.join(name)).expect("read capture")).expect("classic pcap"))
}

#[test]
fn every_packet_decodes_verifies_and_reemits_byte_for_byte() {
    for name in CAPTURES {
        let Some(datagrams) = load(name) else { return };
        assert!(!datagrams.is_empty(), "{name}");
        for d in &datagrams {
            let (packet, carried) =
                PacketRepr::parse(&d.payload).unwrap_or_else(|e| panic!("{name} #{}: {e}", d.record));
            icrc::verify(&d.ip, d.udp_src, &d.payload).unwrap_or_else(|e| panic!("{name} #{}: {e}", d.record));
            let mut again = Vec::new();
            packet.emit(&mut again).unwrap();
            assert_eq!(packet.len_without_icrc(), again.len());
            icrc::append(&d.ip, d.udp_src, &mut again).unwrap();
            assert_eq!(again, d.payload, "{name} #{} re-emitted", d.record);
            assert_eq!(u32::from_le_bytes(again[again.len() - 4..].try_into().unwrap()), carried);
        }
    }
}

#[test]
fn opcode_histogram_matches_the_capture_readme() {
    let Some(datagrams) = load("connect-io-mtu1024.pcap") else { return };
    assert_eq!(datagrams.len(), 616);
    let mut histogram: BTreeMap<u8, usize> = BTreeMap::new();
    for d in &datagrams {
        *histogram.entry(PacketRepr::parse(&d.payload).unwrap().0.bth.opcode as u8).or_default() += 1;
    }
    let expected: BTreeMap<u8, usize> = [
        (0x00, 2),
        (0x01, 3),
        (0x02, 2),
        (0x04, 82),
        (0x06, 21),
        (0x07, 175),
        (0x08, 21),
        (0x0a, 2),
        (0x0c, 3),
        (0x0d, 1),
        (0x0e, 126),
        (0x0f, 1),
        (0x10, 2),
        (0x11, 134),
        (0x17, 26),
        (0x64, 15),
    ]
    .into();
    assert_eq!(histogram, expected);
}

#[test]
fn header_fields_as_rxe_sends_them() {
    let Some(datagrams) = load("connect-io-mtu1024.pcap") else { return };
    for d in &datagrams {
        let (p, _) = PacketRepr::parse(&d.payload).unwrap();
        assert_eq!((p.bth.pkey, p.bth.pad as usize), (0xffff, (4 - p.payload.len() % 4) % 4));
        assert!(!p.bth.solicited && !p.bth.mig_req && !p.bth.fecn && !p.bth.becn);
        match p.bth.opcode {
            Opcode::RcAcknowledge => {
                assert_eq!(p.aeth.unwrap().syndrome, Syndrome::ACK_NO_CREDITS);
                assert!(p.payload.is_empty());
            }
            Opcode::UdSendOnly => {
                let deth = p.deth.unwrap();
                assert_eq!((deth.qkey, deth.src_qp, p.bth.dest_qp, p.payload.len()), (GSI_QKEY, 1, 1, 256));
                assert_eq!(d.udp_src, udp_port::rxe_default(1), "QP1 source port");
            }
            Opcode::RcSendOnly | Opcode::RcSendLast | Opcode::RcSendOnlyWithInvalidate => {
                assert!(p.bth.ack_req, "{:?}", p.bth.opcode)
            }
            Opcode::RcRdmaReadRequest => assert!(p.bth.ack_req && p.reth.unwrap().len > 0),
            _ => {}
        }
        if let IpHeader::V4(h) = d.ip {
            assert_eq!((h[1], h[8], h[6] & 0x40), (0, 64, 0x40), "TOS 0, TTL 64, DF");
        }
    }
}

/// The RC connections' UDP source port comes from the flow label rdma_cm derived from its port pair; the CM REQ
/// (in its rdma_cm private data header) tells the host's rdma_cm port.
#[test]
fn rc_source_ports_follow_the_cm_flow_label() {
    let Some(datagrams) = load("connect-io-mtu1024.pcap") else { return };
    let host = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
    // REQ: MAD header 24 + REQ local QPN at 32 (3 bytes) + private data at 140, whose rdma_cm header holds the
    // source port at bytes 2..4.
    let mut expected_port: BTreeMap<u32, u16> = BTreeMap::new();
    for d in &datagrams {
        let (p, _) = PacketRepr::parse(&d.payload).unwrap();
        let mad = p.payload;
        if p.bth.opcode == Opcode::UdSendOnly && u16::from_be_bytes([mad[16], mad[17]]) == 0x0010 {
            let qpn = u32::from_be_bytes([0, mad[24 + 32], mad[24 + 33], mad[24 + 34]]);
            let cm_port = u16::from_be_bytes([mad[24 + 140 + 2], mad[24 + 140 + 3]]);
            expected_port.insert(qpn, udp_port::from_flow_label(udp_port::cm_flow_label(cm_port, 4420)));
        }
    }
    assert_eq!(expected_port.len(), 3);
    let mut checked = 0;
    for d in &datagrams {
        let (p, _) = PacketRepr::parse(&d.payload).unwrap();
        if p.bth.opcode.is_rc() {
            // QP numbers are equal on both ends here, so the destination QP names the connection either way.
            assert_eq!(Some(&d.udp_src), expected_port.get(&p.bth.dest_qp), "#{} from {}", d.record, d.src == host);
            checked += 1;
        }
    }
    assert_eq!(checked, 616 - 15);
}

#[test]
fn corrupted_packets_fail_the_icrc() {
    let Some(datagrams) = load("cm-reject.pcap") else { return };
    for d in &datagrams {
        for i in [0, 5, 11, d.payload.len() / 2, d.payload.len() - 5] {
            let mut bad = d.payload.clone();
            bad[i] ^= 0x01;
            assert!(matches!(icrc::verify(&d.ip, d.udp_src, &bad), Err(WireError::BadIcrc { .. })), "byte {i}");
        }
        // The masked fields do not matter: TTL and TOS may change in flight, and so may FECN/BECN.
        let mut hops = d.ip;
        if let IpHeader::V4(h) = &mut hops {
            h[8] = 3;
            h[1] = 0x02;
        }
        let mut marked = d.payload.clone();
        marked[4] |= 0x80;
        icrc::verify(&hops, d.udp_src, &marked).unwrap();
    }
}

#[test]
fn pcap_writer_round_trips() {
    let Some(datagrams) = load("cm-reject.pcap") else { return };
    let written = pcap::write_rocev2(&datagrams);
    let back = pcap::read_rocev2(&written).unwrap();
    assert_eq!(back.len(), datagrams.len());
    for (a, b) in back.iter().zip(&datagrams) {
        assert_eq!((&a.ip, a.udp_src, &a.payload, a.timestamp_us), (&b.ip, b.udp_src, &b.payload, b.timestamp_us));
    }
}

mod cm {
    use super::*;
    use nvme_proto::rdma_cm::{CmAccept, CmRequest};
    use transport::soft::wire::cma::{self, CmaHeader};
    use transport::soft::wire::mad::{self, CmMessage, MadHeader};

    fn mads(name: &str) -> Option<Vec<(MadHeader, CmMessage, Vec<u8>)>> {
        let datagrams = load(name)?;
        Some(
            datagrams
                .iter()
                .filter_map(|d| {
                    let (p, _) = PacketRepr::parse(&d.payload).unwrap();
                    (p.bth.opcode == Opcode::UdSendOnly).then(|| {
                        let (h, m) = CmMessage::parse(p.payload).unwrap_or_else(|e| panic!("#{}: {e}", d.record));
                        (h, m, p.payload.to_vec())
                    })
                })
                .collect(),
        )
    }

    #[test]
    fn every_kernel_mad_parses_and_reemits_byte_for_byte() {
        for name in CAPTURES {
            let Some(all) = mads(name) else { return };
            for (header, message, bytes) in &all {
                assert_eq!((header.base_version, header.mgmt_class, header.class_version, header.method), (1, 7, 2, 3));
                assert_eq!(message.emit(header).unwrap().as_slice(), bytes.as_slice(), "{name}: {message:?}");
            }
        }
    }

    #[test]
    fn connect_and_disconnect_of_the_discovery_queue() {
        let Some(all) = mads("connect-io-mtu1024.pcap") else { return };
        let kinds: Vec<u16> = all.iter().map(|(h, _, _)| h.attr_id).collect();
        assert_eq!(kinds.iter().filter(|&&k| k == mad::attr::REQ).count(), 3);
        let CmMessage::Req(req) = &all[0].1 else { panic!("first MAD is a REQ") };

        assert_eq!((req.local_comm_id, req.service_id, req.local_qpn), (0xe432_786a, 0x0000_0000_0106_1144, 0x11));
        assert_eq!((req.starting_psn, req.path_mtu, req.transport_service_type), (2_726_883, 3, 0));
        assert_eq!(cma::port_of(req.service_id), Some(4420));
        assert_eq!(all[0].0.transaction_id, 0x0000_0002_6a78_32e4);
        // The rdma_cm header, then the host's NVMe/RDMA request.
        let (cma, nvme) = CmaHeader::parse(&req.private_data).unwrap();
        assert_eq!(cma.src_port, 36644);
        assert_eq!(
            (cma.src, cma.dst),
            (IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)))
        );
        assert_eq!(&cma.emit().unwrap()[..], &req.private_data[..36]);
        let nvme = CmRequest::parse(nvme).unwrap();
        assert_eq!((nvme.qid, nvme.hrqsize, nvme.hsqsize), (0, 32, 31));
        // The flow label in the primary path gives the connection's UDP source port.
        assert_eq!(req.primary_path.flow_label, udp_port::cm_flow_label(36644, 4420));
        let CmMessage::Rep(rep) = &all[1].1 else { panic!("then a REP") };
        assert_eq!(
            (rep.local_comm_id, rep.remote_comm_id, rep.local_qpn, rep.starting_psn),
            (0xbf32_9cd8, 0xe432_786a, 0x11, 8_866_897)
        );
        let accept = CmAccept::parse(&rep.private_data).unwrap();
        assert_eq!((accept.recfmt, accept.crqsize), (0, 32));
        assert!(matches!(all[2].1, CmMessage::Rtu { local_comm_id: 0xe432_786a, remote_comm_id: 0xbf32_9cd8, .. }));
        assert!(matches!(
            all[3].1,
            CmMessage::Dreq { local_comm_id: 0xe432_786a, remote_comm_id: 0xbf32_9cd8, remote_qpn: 0x11, .. }
        ));
        assert!(matches!(all[4].1, CmMessage::Drep { local_comm_id: 0xbf32_9cd8, remote_comm_id: 0xe432_786a, .. }));
        // What the kernel host asks for: nvme-rdma's RDMA READ depths (rxe's max_qp_rd_atom 128 as responder
        // resources), retry counts 7 / RNR 7 (infinite), CM retries 15, CM response timeouts 20 (4.096 us * 2^20).
        assert_eq!((req.responder_resources, req.initiator_depth), (128, 0));
        assert_eq!((req.retry_count, req.rnr_retry_count, req.max_cm_retries), (7, 7, 15));
        assert_eq!((req.local_cm_response_timeout, req.remote_cm_response_timeout), (20, 20));
    }

    /// The PSN convention, pinned to the kernel: in every connection of the capture the host's first request
    /// carries the REP's starting PSN and the target's first request the REQ's — each side sends from the PSN
    /// its peer advertised. Our CM and [`StartPsns`], put in either role with the captured MADs, derive the same.
    #[test]
    fn psn_convention_matches_the_kernel_captures() {
        use transport::soft::cm::{AcceptParams, Cm, CmConfig, CmEvent, ConnectParams, StartPsns};
        let Some(datagrams) = load("connect-io-mtu1024.pcap") else { return };
        let (host, target) = (IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)));
        // Per connection: (REQ, REP, the host's first request PSN, the target's first request PSN).
        let mut conns: Vec<(mad::Req, mad::Rep, Option<u32>, Option<u32>)> = Vec::new();
        let mut reqs = Vec::new();
        for d in &datagrams {
            let (p, _) = PacketRepr::parse(&d.payload).unwrap();
            if p.bth.opcode == Opcode::UdSendOnly {
                match CmMessage::parse(p.payload).unwrap().1 {
                    CmMessage::Req(req) => reqs.push(req),
                    CmMessage::Rep(rep) => {
                        let req = reqs.iter().find(|r| r.local_comm_id == rep.remote_comm_id).unwrap().clone();
                        conns.push((req, rep, None, None));
                    }
                    _ => {}
                }
                continue;
            }
            if !p.bth.opcode.is_request() {
                continue; // ACKs and READ responses carry the PSN of what they answer
            }
            // The newest connection whose queue pair this is addressed to.
            let Some(c) = conns.iter_mut().rev().find(|(req, rep, _, _)| {
                (d.src == host && p.bth.dest_qp == rep.local_qpn) || (d.src == target && p.bth.dest_qp == req.local_qpn)
            }) else {
                panic!("#{}: request for no connection", d.record)
            };
            let first = if d.src == host { &mut c.2 } else { &mut c.3 };
            first.get_or_insert(p.bth.psn);
        }
        assert_eq!(conns.len(), 3, "discovery, admin and I/O queue");
        for (req, rep, host_first, target_first) in &conns {
            assert_eq!(*host_first, Some(rep.starting_psn), "host sends from the REP's PSN: {req:?}");
            assert_eq!(*target_first, Some(req.starting_psn), "target sends from the REQ's PSN: {rep:?}");
        }
        let (req, rep, host_first, target_first) = conns[0].clone();
        let (host_first, target_first) = (host_first.unwrap(), target_first.unwrap());
        let mad_bytes = |attr: u16| {
            mads("connect-io-mtu1024.pcap").unwrap().into_iter().find(|(h, _, _)| h.attr_id == attr).unwrap().2
        };
        let config = |first_comm_id| CmConfig { first_comm_id, ..CmConfig::default() };
        let now = std::time::Instant::now();

        // Our CM as the target: the kernel host's REQ, our REP advertising what the kernel target advertised.
        let mut passive = Cm::new(config(rep.local_comm_id));
        passive.listen(4420, 1).unwrap();
        passive.handle_mad(now, host, target, &mad_bytes(mad::attr::REQ));
        let Some(CmEvent::ConnectRequest { conn, .. }) = passive.poll_event() else { panic!("connect request") };
        let accept = AcceptParams {
            local_qpn: rep.local_qpn,
            start_psn: rep.starting_psn,
            responder_resources: rep.responder_resources,
            initiator_depth: rep.initiator_depth,
            rnr_retry_count: rep.rnr_retry_count,
            private_data: rep.private_data.clone(),
        };
        passive.accept(now, conn, accept).unwrap();
        passive.handle_mad(now, host, target, &mad_bytes(mad::attr::RTU));
        let Some(CmEvent::Established { peer, .. }) = passive.poll_event() else { panic!("established") };
        assert_eq!(StartPsns::new(rep.starting_psn, &peer), StartPsns { send: target_first, recv: host_first });

        // Our CM as the host: our REQ advertising the kernel host's PSN, then the kernel target's REP.
        let mut active = Cm::new(config(req.local_comm_id));
        let (cma, private_data) = CmaHeader::parse(&req.private_data).unwrap();
        let params = ConnectParams {
            src: host,
            dst: target,
            src_port: cma.src_port,
            dst_port: 4420,
            local_qpn: req.local_qpn,
            start_psn: req.starting_psn,
            path_mtu: req.path_mtu,
            responder_resources: req.responder_resources,
            initiator_depth: req.initiator_depth,
            retry_count: req.retry_count,
            rnr_retry_count: req.rnr_retry_count,
            private_data: private_data.to_vec(),
        };
        assert_eq!(active.connect(now, params).unwrap(), req.local_comm_id);
        active.handle_mad(now, target, host, &mad_bytes(mad::attr::REP));
        let Some(CmEvent::Established { peer, .. }) = active.poll_event() else { panic!("established") };
        assert_eq!(StartPsns::new(req.starting_psn, &peer), StartPsns { send: host_first, recv: target_first });
    }

    /// rxe's node GUID is the EUI-64 of its netdev's MAC: the captured REQ (host, bond0 52:54:00:bb:00:00) and
    /// REP (target, 52:54:00:aa:00:00) carry exactly what `node_guid_of_mac` derives from those MACs.
    #[test]
    fn ca_guids_are_the_eui64_of_the_mac() {
        use transport::soft::cm::node_guid_of_mac;
        let Some(all) = mads("connect-io-mtu1024.pcap") else { return };
        let CmMessage::Req(req) = &all[0].1 else { panic!("REQ") };
        let CmMessage::Rep(rep) = &all[1].1 else { panic!("REP") };
        assert_eq!(req.local_ca_guid, 0x5054_00ff_febb_0000);
        assert_eq!(rep.local_ca_guid, 0x5054_00ff_feaa_0000);
        assert_eq!(node_guid_of_mac([0x52, 0x54, 0x00, 0xbb, 0x00, 0x00]), req.local_ca_guid);
        assert_eq!(node_guid_of_mac([0x52, 0x54, 0x00, 0xaa, 0x00, 0x00]), rep.local_ca_guid);
    }

    #[test]
    fn reject_for_a_port_without_listener() {
        let Some(all) = mads("cm-reject.pcap") else { return };
        let rej =
            all.iter().find_map(|(_, m, _)| if let CmMessage::Rej(r) = m { Some(r.clone()) } else { None }).unwrap();
        assert_eq!((rej.local_comm_id, rej.remote_comm_id, rej.message_rejected), (0, 0x9b52_0ed3, mad::message::REQ));
        assert_eq!((rej.reason, rej.ari_len), (mad::reject_reason::INVALID_SERVICE_ID, 0));
        assert!(rej.private_data.iter().all(|&b| b == 0));
    }
}

/// The kernel's datagrams carry IPv4 identifications our sockets never see; the ICRC still tells them.
#[test]
fn ipv4_identification_is_recovered_from_the_icrc() {
    use transport::soft::wire::icrc::IdentificationSolver;
    let Some(datagrams) = load("connect-io-mtu1024.pcap") else { return };
    let mut solver = IdentificationSolver::new();
    let mut nonzero = 0;
    for d in &datagrams {
        let IpHeader::V4(h) = d.ip else { panic!("IPv4 capture") };
        let real = u16::from_be_bytes([h[4], h[5]]);
        nonzero += usize::from(real != 0);
        let mut hidden = h;
        hidden[4..6].fill(0);
        assert_eq!(solver.solve(&IpHeader::V4(hidden), d.udp_src, &d.payload), Some(real), "record {}", d.record);
        // A corrupted payload has no identification that fits (2^-16 chance per packet; none of these do).
        let mut bad = d.payload.clone();
        bad[13] ^= 0x40;
        assert_eq!(solver.solve(&IpHeader::V4(hidden), d.udp_src, &bad), None, "record {}", d.record);
    }
    assert!(nonzero > 600, "the kernel used real identifications: {nonzero}");
}

/// A soft device as the target of a kernel host, from the kernel's own bytes: the REQ the stock nvme-rdma host sent
/// (`shared/vectors`) is replayed from a bare socket; the device accepts; its first request carries the REQ's
/// starting PSN, and the host's Connect capsule, sent from our REP's starting PSN as the kernel does, is
/// received and acknowledged.
#[tokio::test]
async fn answers_the_kernel_hosts_captured_req() {
    use transport::soft::wire::mad::{self, CmMessage, MadHeader};
    use transport::soft::wire::{Bth, Opcode, PacketRepr};

    let Some(captured) = load("connect-io-mtu1024.pcap") else { return };
    let packet = |record: usize| PacketRepr::parse(&captured[record - 1].payload).unwrap().0;
    // Record 1 is the host's REQ of the discovery queue, record 4 its first request (the Connect capsule).
    let req_mad = packet(1).payload.to_vec();
    let (req_header, CmMessage::Req(req)) = CmMessage::parse(&req_mad).unwrap() else { panic!("REQ") };
    let connect_capsule = packet(4).payload.to_vec();
    assert_eq!(connect_capsule.len(), 64);

    let dev = Device::open(SoftConfig::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7)))).unwrap();
    let host = std::net::UdpSocket::bind("127.0.0.8:4791").unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut recv = || {
        let n = host.recv(&mut buf).expect("datagram from the device");
        buf[..n].to_vec()
    };
    let mad = |attr, message: CmMessage| {
        let bytes = message.emit(&MadHeader::cm(attr, req_header.transaction_id)).unwrap();
        support::kernel_datagram(&PacketRepr::cm_mad(0, &bytes), [127, 0, 0, 8], [127, 0, 0, 7])
    };
    let pd = dev.alloc_pd().await.unwrap();
    let cq = CompletionQueue::new();
    dev.listen(4420, 4).await.unwrap();
    let req_packet = support::kernel_datagram(&PacketRepr::cm_mad(0, &req_mad), [127, 0, 0, 8], [127, 0, 0, 7]);
    host.send_to(&req_packet, "127.0.0.7:4791").unwrap();
    let DeviceEvent::ConnectRequest { conn, peer, .. } = next_event(&dev).await else { panic!("connect request") };
    assert_eq!((peer.qpn, peer.start_psn), (req.local_qpn, req.starting_psn));
    let qp = dev.create_qp(&pd, &cq, &cq).await.unwrap();
    qp.post_recv(RecvWr::new(1, vec![0; 4096])).unwrap();
    let accept = CmAccept { recfmt: 0, crqsize: 32 }.to_bytes();
    dev.accept(conn, &qp, ConnectionOptions::default(), &accept).await.unwrap();
    let (_, CmMessage::Rep(rep)) = CmMessage::parse(PacketRepr::parse(&recv()).unwrap().0.payload).unwrap() else {
        panic!("REP")
    };
    assert_eq!((rep.remote_comm_id, rep.local_qpn), (req.local_comm_id, qp.qpn));
    let rtu =
        CmMessage::Rtu { local_comm_id: req.local_comm_id, remote_comm_id: rep.local_comm_id, private_data: vec![] };
    host.send_to(&mad(mad::attr::RTU, rtu), "127.0.0.7:4791").unwrap();
    assert!(matches!(next_event(&dev).await, DeviceEvent::Established { .. }));

    // The host's Connect capsule, from the PSN our REP advertised, to our queue pair.
    let mut p = PacketRepr::new(Bth::new(Opcode::RcSendOnly, qp.qpn, rep.starting_psn));
    p.bth.ack_req = true;
    p.payload = &connect_capsule;
    host.send_to(&support::kernel_datagram(&p, [127, 0, 0, 8], [127, 0, 0, 7]), "127.0.0.7:4791").unwrap();
    let (ack, _) = PacketRepr::parse(&recv()).map(|(p, c)| (p.bth, c)).unwrap();
    assert_eq!((ack.opcode, ack.dest_qp, ack.psn), (Opcode::RcAcknowledge, req.local_qpn, rep.starting_psn));
    let got = tokio::time::timeout(Duration::from_secs(5), cq.next()).await.unwrap().wc;
    assert_eq!((got.status, &got.buf[..got.byte_len as usize]), (WcStatus::Success, &connect_capsule[..]));
    // Our first request (the Connect response) goes out from the PSN the host's REQ advertised.
    qp.post_send(SendWr::new(2, SendOp::Send, vec![0; 16])).unwrap();
    let response = recv();
    let (response, _) = PacketRepr::parse(&response).unwrap();
    assert_eq!(
        (response.bth.opcode, response.bth.dest_qp, response.bth.psn),
        (Opcode::RcSendOnly, req.local_qpn, req.starting_psn)
    );
}

async fn next_event(dev: &Device) -> DeviceEvent {
    tokio::time::timeout(Duration::from_secs(10), dev.next_event()).await.expect("event within 10 s").expect("open")
}
