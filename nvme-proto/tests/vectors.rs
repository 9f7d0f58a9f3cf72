//! Known-answer tests against real kernel traffic: nvme-cli / Linux nvme-rdma as host, Linux nvmet-rdma as
//! target, on rxe, captured in `shared/vectors` (see its README for what each capture holds).

mod support;

use std::net::Ipv4Addr;

use nvme_proto::command::{AdminCommand, Capsule, Command, FabricsCommand, IoCommand, QueueKind};
use nvme_proto::cqe::Cqe;
use nvme_proto::discovery::{self, DiscoveryLog};
use nvme_proto::fabrics::{self, ConnectData, ConnectParameter};
use nvme_proto::features::{Feature, NumberOfQueues};
use nvme_proto::identify::{IdentifyController, IdentifyNamespace, NamespaceId, NamespaceIdList, NamespaceList};
use nvme_proto::log_page::{AnaLog, AnaState, CommandEffectsLog, SmartLog, effects};
use nvme_proto::property::{Cap, Cc, Csts, Property, ShutdownNotification, ShutdownStatus, Vs};
use nvme_proto::rdma_cm::{CmAccept, CmRequest};
use nvme_proto::sgl::SglDescriptor;
use nvme_proto::status::{CommandSet, Status};
use nvme_proto::{Nqn, Uuid};
use support::capture::{self, Kind, Message};

const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const TARGET: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:0b6f3c2e-5a41-4d8e-9c7b-1f2a3b4c5d01";
const SUBNQN: &str = "nqn.2024-01.io.vectors:nvme-rdma-mtu1024";
const DISCOVERY_QP: u32 = 0x11;
const ADMIN_QP: u32 = 0x12;
const IO_QP: u32 = 0x13;

/// One NVMe command as seen on the wire: its capsule, the data that moved for it, and its completion.
#[derive(Debug)]
struct Exchange {
    qpn: u32,
    capsule: Capsule,
    /// In-capsule data (after the SQE).
    in_capsule: Vec<u8>,
    /// Data the target RDMA-wrote to the host or RDMA-read from it.
    data: Vec<u8>,
    cqe: Cqe,
    /// Whether the completion came by SEND_WITH_INVALIDATE, and with which rkey.
    invalidated: Option<u32>,
}

fn load(name: &str) -> Option<Vec<Message>> {
    let dir = support::vectors_dir()?;
    Some(capture::messages(&std::fs::read(dir.join(name)).expect("read pcap")))
}

/// Pairs every host capsule with its data and completion (matched by QP and command id).
fn exchanges(messages: &[Message]) -> Vec<Exchange> {
    exchanges_and_open(messages).0
}

/// Completed exchanges, and the capsules still open at the end of the capture.
fn exchanges_and_open(messages: &[Message]) -> (Vec<Exchange>, Vec<Exchange>) {
    let mut open: Vec<Exchange> = Vec::new();
    let mut done = Vec::new();
    for m in messages {
        match (&m.kind, m.src) {
            (Kind::Send { .. }, src) if src == HOST => {
                let queue = if m.dest_qpn == IO_QP { QueueKind::Io } else { QueueKind::Admin };
                let capsule = Capsule::parse_bytes(&m.data[..64], queue)
                    .unwrap_or_else(|e| panic!("kernel capsule on qp {:#x} rejected: {e}", m.dest_qpn));
                open.push(Exchange {
                    qpn: m.dest_qpn,
                    capsule,
                    in_capsule: m.data[64..].to_vec(),
                    data: Vec::new(),
                    cqe: Cqe::default(),
                    invalidated: None,
                });
            }
            (Kind::Write { rkey, .. }, src) if src == TARGET => {
                let x = open
                    .iter_mut()
                    .find(|x| {
                        x.qpn == m.dest_qpn
                            && matches!(x.capsule.data, SglDescriptor::Keyed { key, .. } if key == *rkey)
                    })
                    .expect("RDMA WRITE for an open command");
                x.data.extend_from_slice(&m.data);
            }
            (Kind::ReadResponse, src) if src == HOST => {
                // READ responses travel to the target's QP; the only command reading on that QP is the oldest
                // open one with a keyed SGL and no data yet.
                let x = open
                    .iter_mut()
                    .find(|x| {
                        x.qpn == m.dest_qpn
                            && x.data.is_empty()
                            && x.capsule.data.length() > 0
                            && x.in_capsule.is_empty()
                    })
                    .expect("READ response for an open command");
                x.data = m.data.clone();
            }
            (Kind::Send { invalidate }, src) if src == TARGET => {
                let cqe = *Cqe::parse(&m.data).expect("16-byte completion");
                let i = open
                    .iter()
                    .position(|x| x.qpn == m.dest_qpn && x.capsule.command_id == cqe.command_id())
                    .expect("completion for an open command");
                let mut x = open.remove(i);
                x.cqe = cqe;
                x.invalidated = *invalidate;
                done.push(x);
            }
            _ => {}
        }
    }
    (done, open)
}

fn find(xs: &[Exchange], qpn: u32, pred: impl Fn(&Command) -> bool) -> Vec<&Exchange> {
    xs.iter().filter(|x| x.qpn == qpn && pred(&x.capsule.command)).collect()
}

#[test]
fn every_kernel_capsule_decodes_and_every_command_completes() {
    let Some(messages) = load("connect-io-mtu1024.pcap") else {
        return;
    };
    let (xs, open) = exchanges_and_open(&messages);
    // 54 single-packet host SENDs plus 2 multi-packet in-capsule SENDs; one AER per controller stays open.
    assert_eq!(xs.len(), 54, "completed commands");
    assert_eq!(open.len(), 2);
    assert!(open.iter().all(|x| x.capsule.command == Command::Admin(AdminCommand::AsyncEventRequest)));
    for x in &xs {
        assert!(x.cqe.status().is_success(), "{:?} failed: {:?}", x.capsule, x.cqe.status());
        // Every keyed SGL with the invalidate subtype was completed by SEND_WITH_INVALIDATE of its key.
        match x.capsule.data {
            SglDescriptor::Keyed { key, invalidate: true, .. } => assert_eq!(x.invalidated, Some(key)),
            _ => assert_eq!(x.invalidated, None),
        }
    }
    // The decode of the target-side and the initiator-side capture agree.
    let Some(other) = load("connect-io-mtu1024.initiator.pcap") else {
        return;
    };
    let ys = exchanges(&other);
    let mut a: Vec<_> = xs.iter().map(|x| (x.qpn, x.capsule, x.cqe)).collect();
    let mut b: Vec<_> = ys.iter().map(|x| (x.qpn, x.capsule, x.cqe)).collect();
    a.sort_by_key(|k| format!("{k:?}"));
    b.sort_by_key(|k| format!("{k:?}"));
    assert_eq!(a, b);
}

#[test]
fn admin_connect_capsule_and_data() {
    let Some(messages) = load("connect-io-mtu1024.pcap") else {
        return;
    };
    let xs = exchanges(&messages);
    let connects = find(&xs, ADMIN_QP, |c| matches!(c, Command::Fabrics(FabricsCommand::Connect(_))));
    let x = connects[0];
    let Command::Fabrics(FabricsCommand::Connect(connect)) = x.capsule.command else { unreachable!() };
    assert_eq!((connect.recfmt, connect.qid, connect.sqsize, connect.cattr, connect.kato), (0, 0, 31, 0, 5000));
    assert_eq!(x.capsule.command_id, 0);
    let SglDescriptor::Keyed { address, length, key, invalidate } = x.capsule.data else { panic!("keyed SGL") };
    assert_eq!((address, length.get(), key, invalidate), (0xffff888006824000, 1024, 0x248f, true));
    // The target fetched the data by RDMA READ.
    let data = ConnectData::parse(&x.data).expect("connect data");
    assert_eq!(data.hostid, Uuid::parse("0b6f3c2e-5a41-4d8e-9c7b-1f2a3b4c5d01").unwrap());
    assert_eq!(data.cntlid, fabrics::CNTLID_DYNAMIC);
    assert_eq!(data.subnqn, SUBNQN);
    assert_eq!(data.hostnqn, HOSTNQN);
    Nqn::new(&data.subnqn).expect("subsystem NQN well-formed");
    assert_eq!(Nqn::new(&data.hostnqn).unwrap().uuid(), Some(data.hostid));
    // Encoding what we decoded gives the kernel's bytes back.
    assert_eq!(data.to_bytes().unwrap().as_slice(), x.data.as_slice());
    assert_eq!(x.capsule.to_sqe().to_array().as_slice(), &messages_sqe(&messages, ADMIN_QP, 0)[..]);
    // Response: cntlid 1 in DW0.
    assert_eq!(fabrics::connect_result_cntlid(x.cqe.dw0.get()), 1);
    assert_eq!((x.cqe.sq_head.get(), x.cqe.sq_id.get()), (1, 0));
}

/// The raw 64 bytes of the n-th host SEND on a QP.
fn messages_sqe(messages: &[Message], qpn: u32, n: usize) -> Vec<u8> {
    messages
        .iter()
        .filter(|m| m.src == HOST && m.dest_qpn == qpn && matches!(m.kind, Kind::Send { .. }))
        .nth(n)
        .expect("host SEND")
        .data[..64]
        .to_vec()
}

#[test]
fn io_queue_connect_is_in_capsule() {
    let Some(messages) = load("connect-io-mtu1024.pcap") else {
        return;
    };
    let xs = exchanges(&messages);
    let x = find(&xs, IO_QP, |c| matches!(c, Command::Fabrics(FabricsCommand::Connect(_))))[0];
    let Command::Fabrics(FabricsCommand::Connect(connect)) = x.capsule.command else { unreachable!() };
    assert_eq!((connect.qid, connect.sqsize, connect.kato), (1, 31, 0));
    assert_eq!(x.capsule.data, SglDescriptor::in_capsule(0, 1024));
    assert_eq!(x.in_capsule.len(), 1024);
    let data = ConnectData::parse(&x.in_capsule).unwrap();
    assert_eq!((data.cntlid, data.subnqn.as_str(), data.hostnqn.as_str()), (1, SUBNQN, HOSTNQN));
}

#[test]
fn property_exchange_matches_the_kernel_bring_up() {
    let Some(messages) = load("connect-io-mtu1024.pcap") else {
        return;
    };
    let xs = exchanges(&messages);
    let props: Vec<_> = find(&xs, ADMIN_QP, |c| {
        matches!(c, Command::Fabrics(FabricsCommand::PropertyGet { .. } | FabricsCommand::PropertySet { .. }))
    });
    let mut seen = Vec::new();
    for x in &props {
        match x.capsule.command {
            Command::Fabrics(FabricsCommand::PropertyGet { property }) => seen.push((property, None, x.cqe.result())),
            Command::Fabrics(FabricsCommand::PropertySet { property, value }) => seen.push((property, Some(value), 0)),
            _ => unreachable!(),
        }
    }
    let cap = 0x0000_0820_0f00_007f;
    assert_eq!(
        &seen[..8],
        &[
            (Property::Cap, None, cap),
            (Property::Cc, Some(0x460060), 0),
            (Property::Cc, None, 0x460060),
            (Property::Cap, None, cap),
            (Property::Cc, Some(0x460061), 0),
            (Property::Csts, None, 1),
            (Property::Vs, None, 0x00010300),
            (Property::Cc, Some(0x464061), 0),
        ]
    );
    assert_eq!(seen[8], (Property::Csts, None, 8));
    let cap = Cap(cap);
    assert_eq!((cap.mqes(), cap.to(), cap.css(), cap.cqr(), cap.mpsmin()), (127, 15, 0x41, 0, 0));
    let cc = Cc(0x460061);
    assert_eq!((cc.en(), cc.css(), cc.iosqes(), cc.iocqes(), cc.shutdown()), (1, 6, 6, 4, ShutdownNotification::None));
    assert_eq!(Cc(0x464061).shutdown(), ShutdownNotification::Normal);
    assert!(Csts(1).ready());
    assert_eq!(Csts(8).shutdown(), ShutdownStatus::Complete);
    assert_eq!(Vs(0x00010300), Vs::V1_3);
}

#[test]
fn identify_controller_from_nvmet() {
    let Some(messages) = load("connect-io-mtu1024.pcap") else {
        return;
    };
    let xs = exchanges(&messages);
    let x = find(&xs, ADMIN_QP, |c| matches!(c, Command::Admin(AdminCommand::Identify(i)) if i.cns == 1))[0];
    let id = IdentifyController::parse(&x.data).unwrap();
    assert_eq!(id.serial().unwrap(), "8eb03cc0a7ad27f5ae6a");
    assert_eq!(id.model().unwrap(), "Linux");
    assert_eq!(id.firmware().unwrap(), "6.1.0-56");
    assert_eq!(id.subnqn().unwrap(), SUBNQN);
    assert_eq!((id.mdts, id.cntlid.get(), id.maxcmd.get(), id.kas.get()), (8, 1, 1024, 10));
    assert_eq!(id.sgls.get(), 0x0010_0005);
    assert_eq!((id.ioccsz.get(), id.iorcsz.get(), id.icdoff.get(), id.msdbd), (260, 1, 0, 1));
    assert_eq!((id.sqes, id.cqes, id.cntrltype), (0x66, 0x44, 1));
    assert_eq!(id.in_capsule_data_size(), 4096);
    assert_eq!(id.max_transfer_bytes(4096), Some(1 << 20));
    assert_eq!(Vs(id.ver.get()).major(), 1);
    assert!(id.nn.get() >= 1);
    // A byte-exact round trip through the typed view.
    assert_eq!(zerocopy::IntoBytes::as_bytes(id), x.data.as_slice());
}

#[test]
fn identify_namespace_and_descriptors_from_nvmet() {
    let Some(messages) = load("connect-io-mtu1024.pcap") else {
        return;
    };
    let xs = exchanges(&messages);
    let x = find(&xs, ADMIN_QP, |c| matches!(c, Command::Admin(AdminCommand::Identify(i)) if i.cns == 0))[0];
    let ns = IdentifyNamespace::parse(&x.data).unwrap();
    assert_eq!((ns.nsze.get(), ns.ncap.get()), (0x200000, 0x200000));
    assert_eq!((ns.nlbaf, ns.format_index(), ns.block_size().unwrap()), (0, 0, 512));
    assert_eq!(ns.anagrpid.get(), 1);
    assert_eq!(ns.nguid, [0; 16]);

    let x = find(&xs, ADMIN_QP, |c| matches!(c, Command::Admin(AdminCommand::Identify(i)) if i.cns == 3))[0];
    let list = NamespaceIdList::parse(&x.data).unwrap();
    let uuid = Uuid::parse("1bfd2e33-a88c-4e7b-b934-2bf6ef50de32").unwrap();
    assert!(list.0.contains(&NamespaceId::Uuid(uuid)), "{list:?}");
    assert_eq!(list.to_bytes().unwrap().as_slice(), x.data.as_slice());

    let x = find(&xs, ADMIN_QP, |c| matches!(c, Command::Admin(AdminCommand::Identify(i)) if i.cns == 2))[0];
    let active = NamespaceList::parse(&x.data).unwrap();
    assert_eq!(active.0, vec![1]);
    assert_eq!(active.to_bytes().unwrap().as_slice(), x.data.as_slice());
}

#[test]
fn discovery_log_from_nvmet() {
    let Some(messages) = load("connect-io-mtu1024.pcap") else {
        return;
    };
    let xs = exchanges(&messages);
    let logs = find(&xs, DISCOVERY_QP, |c| matches!(c, Command::Admin(AdminCommand::GetLogPage(g)) if g.lid == 0x70));
    assert_eq!(logs.len(), 2);
    let Command::Admin(AdminCommand::GetLogPage(first)) = logs[0].capsule.command else { unreachable!() };
    assert_eq!((first.data_len(), first.offset), (1024, 0));
    // The first read is the header only: NUMREC announces records that were not read.
    let head = DiscoveryLog::parse(&logs[0].data).unwrap();
    assert_eq!((head.numrec, head.entries.len(), head.is_complete()), (2, 0, false));
    let log = DiscoveryLog::parse(&logs[1].data).unwrap();
    assert!(log.is_complete());
    assert_eq!(log.genctr, head.genctr);
    let nvm = log.entries.iter().find(|e| e.subtype == discovery::subtype::NVME).expect("NVM subsystem entry");
    assert_eq!((nvm.trtype, nvm.adrfam), (discovery::trtype::RDMA, discovery::adrfam::IPV4));
    assert_eq!((nvm.traddr.as_str(), nvm.trsvcid.as_str(), nvm.subnqn.as_str()), ("198.18.0.1", "4420", SUBNQN));
    assert_eq!(nvm.cntlid, 0xffff);
    let rdma = nvm.rdma.expect("RDMA TSAS");
    assert_eq!((rdma.qptype, rdma.cms), (discovery::rdma::QPTYPE_CONNECTED, discovery::rdma::CMS_RDMA_CM));
    let disc =
        log.entries.iter().find(|e| e.subtype == discovery::subtype::CURRENT_DISCOVERY).expect("discovery entry");
    assert_eq!(disc.subnqn, nvme_proto::nqn::DISCOVERY_NQN);
    // Encoding the decoded log reproduces the kernel's bytes.
    assert_eq!(log.to_bytes().unwrap(), logs[1].data);
}

#[test]
fn log_pages_and_features_from_the_bring_up() {
    let Some(messages) = load("connect-io-mtu1024.pcap") else {
        return;
    };
    let xs = exchanges(&messages);
    let log = |lid: u8| {
        find(&xs, ADMIN_QP, move |c| matches!(c, Command::Admin(AdminCommand::GetLogPage(g)) if g.lid == lid))
    };

    let effects_log = CommandEffectsLog::parse(&log(0x05)[0].data).unwrap();
    assert_ne!(effects_log.admin[0x06].get() & effects::CSUPP, 0, "Identify supported");
    // nvmet 6.1 marks flush, write, read, write zeroes and DSM supported, nothing else in the I/O set.
    let io_supported: Vec<usize> = (0..256).filter(|&op| effects_log.io[op].get() & effects::CSUPP != 0).collect();
    assert_eq!(io_supported, vec![0x00, 0x01, 0x02, 0x08, 0x09]);

    let ana_x = log(0x0c)[0];
    let Command::Admin(AdminCommand::GetLogPage(g)) = ana_x.capsule.command else { unreachable!() };
    assert_eq!(g.data_len(), 8208);
    let ana = AnaLog::parse(&ana_x.data).unwrap();
    let group = ana.groups.iter().find(|g| g.grpid == 1).expect("ANA group 1");
    assert_eq!((group.state, group.nsids.as_slice()), (AnaState::Optimized, &[1][..]));

    let smart = SmartLog::parse(&log(0x02)[0].data).unwrap();
    assert_eq!(smart.critical_warning, 0);

    let nq = find(
        &xs,
        ADMIN_QP,
        |c| matches!(c, Command::Admin(AdminCommand::SetFeatures(s)) if matches!(s.feature, Feature::NumberOfQueues(_))),
    )[0];
    let Command::Admin(AdminCommand::SetFeatures(s)) = nq.capsule.command else { unreachable!() };
    assert_eq!(s.feature, Feature::NumberOfQueues(NumberOfQueues { nsqr: 0, ncqr: 0 }));
    assert_eq!(NumberOfQueues::from_dword(nq.cqe.dw0.get()), NumberOfQueues { nsqr: 127, ncqr: 127 });

    let aec = find(&xs, DISCOVERY_QP, |c| matches!(c, Command::Admin(AdminCommand::SetFeatures(_))))[0];
    let Command::Admin(AdminCommand::SetFeatures(s)) = aec.capsule.command else { unreachable!() };
    assert_eq!(s.feature, Feature::AsyncEventConfig(0x8000_0000));

    let keep_alives = find(&xs, ADMIN_QP, |c| matches!(c, Command::Admin(AdminCommand::KeepAlive)));
    assert_eq!(keep_alives.len(), 4);
}

#[test]
fn io_commands_and_their_data() {
    let Some(messages) = load("connect-io-mtu1024.pcap") else {
        return;
    };
    let xs = exchanges(&messages);
    let writes = find(&xs, IO_QP, |c| matches!(c, Command::Io(IoCommand::Write(_))));
    assert_eq!(writes.len(), 2);
    // 4 KiB of 0xA5 at LBA 0, in-capsule.
    let Command::Io(IoCommand::Write(w)) = writes[0].capsule.command else { unreachable!() };
    assert_eq!((w.nsid, w.slba, w.nlb, w.blocks()), (1, 0, 7, 8));
    assert_eq!(writes[0].capsule.data, SglDescriptor::in_capsule(0, 4096));
    assert!(writes[0].in_capsule.len() == 4096 && writes[0].in_capsule.iter().all(|&b| b == 0xa5));
    // 128 KiB of inc32le at LBA 256, fetched by RDMA READ.
    let Command::Io(IoCommand::Write(w)) = writes[1].capsule.command else { unreachable!() };
    assert_eq!((w.slba, w.nlb), (256, 255));
    assert_eq!(writes[1].capsule.data.length(), 131072);
    let inc: Vec<u8> = (0u32..32768).flat_map(u32::to_le_bytes).collect();
    assert_eq!(writes[1].data, inc);

    let reads = find(&xs, IO_QP, |c| matches!(c, Command::Io(IoCommand::Read(_))));
    // Partition scan (LBAs 0, 8, 24), then the two test reads.
    let lbas: Vec<(u64, u16)> = reads
        .iter()
        .map(|x| match x.capsule.command {
            Command::Io(IoCommand::Read(r)) => (r.slba, r.nlb),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(lbas, vec![(0, 7), (8, 7), (24, 7), (0, 7), (256, 255)]);
    assert!(reads[3].data.iter().all(|&b| b == 0xa5));
    assert_eq!(reads[4].data, inc);

    let flush = find(&xs, IO_QP, |c| matches!(c, Command::Io(IoCommand::Flush { .. })));
    assert_eq!(flush[0].capsule.command, Command::Io(IoCommand::Flush { nsid: 1 }));
    // Every I/O SQE re-encodes to the kernel's bytes.
    let raw: Vec<Vec<u8>> =
        (0..).map_while(|n| std::panic::catch_unwind(|| messages_sqe(&messages, IO_QP, n)).ok()).collect();
    for x in find(&xs, IO_QP, |_| true) {
        assert!(raw.contains(&x.capsule.to_sqe().to_array().to_vec()), "{:?}", x.capsule);
    }
}

#[test]
fn cm_private_data() {
    let Some(messages) = load("connect-io-mtu1024.pcap") else {
        return;
    };
    // IB CM REQ: MAD header 24 + private data at 140 in the REQ, after rdma_cm's 36-byte IP header.
    const REQ_NVME: core::ops::Range<usize> = 24 + 140 + 36..24 + 140 + 36 + 32;
    let req_mads: Vec<&Message> =
        messages.iter().filter(|m| m.kind == Kind::Mad && capture::mad_attribute(&m.data) == 0x0010).collect();
    let reqs: Vec<CmRequest> = req_mads.iter().map(|m| CmRequest::parse(&m.data[REQ_NVME]).unwrap()).collect();
    let qids: Vec<u16> = reqs.iter().map(|r| r.qid).collect();
    assert_eq!(qids, vec![0, 0, 1]);
    for (r, m) in reqs.iter().zip(&req_mads) {
        assert_eq!((r.recfmt, r.hrqsize, r.hsqsize, r.cntlid), (0, 32, 31, 0));
        assert_eq!(&r.to_bytes()[..], &m.data[REQ_NVME]);
    }
    // IB CM REP: private data at 36 in the REP, no rdma_cm header.
    let reps: Vec<CmAccept> = messages
        .iter()
        .filter(|m| m.kind == Kind::Mad && capture::mad_attribute(&m.data) == 0x0013)
        .map(|m| CmAccept::parse(&m.data[24 + 36..24 + 232]).unwrap())
        .collect();
    assert_eq!(reps.len(), 3);
    assert!(reps.iter().all(|r| r.recfmt == 0 && r.crqsize == 32));
}

#[test]
fn connect_to_unknown_subsystem_is_rejected_with_invalid_parameters() {
    let Some(dir) = support::vectors_dir() else {
        return;
    };
    let messages = capture::messages(&std::fs::read(dir.join("cm-reject.pcap")).unwrap());
    let xs = exchanges(&messages);
    assert_eq!(xs.len(), 1);
    let data = ConnectData::parse(&xs[0].data).unwrap();
    assert_eq!(data.subnqn, "nqn.2024-01.io.vectors:no-such-subsystem");
    let status = xs[0].cqe.status();
    assert_eq!(status.code(), Status::CONNECT_INVALID_PARAMETERS);
    assert!(status.dnr());
    assert_eq!(xs[0].cqe.status_phase.get(), 0x8304);
    assert_eq!(status.name(CommandSet::Fabrics), "Connect Invalid Parameters");
    let location = fabrics::parse_invalid_parameter_result(xs[0].cqe.dw0.get());
    assert_eq!(location, ConnectParameter::Data(fabrics::offset::DATA_SUBNQN as u16));
    assert_eq!(fabrics::invalid_parameter_result(location), 0x0001_0100);
}

/// Writes the fuzz seed corpus (`fuzz/corpus/<target>/`) from the captures. Run after changing a harness's
/// input format: `cargo test -p nvme-proto --test vectors -- --ignored write_seed_corpus`.
#[test]
#[ignore = "writes files; run by hand to regenerate the seed corpus"]
fn write_seed_corpus() {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let Some(dir) = support::vectors_dir() else {
        return;
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let write = |target: &str, data: &[u8]| {
        let mut h = DefaultHasher::new();
        data.hash(&mut h);
        let path = root.join(target).join(format!("vector-{:016x}", h.finish()));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    };
    let with = |selector: u8, data: &[u8]| [&[selector][..], data].concat();
    for pcap in ["connect-io-mtu1024.pcap", "cm-reject.pcap"] {
        let messages = capture::messages(&std::fs::read(dir.join(pcap)).unwrap());
        for m in &messages {
            match &m.kind {
                Kind::Mad => match capture::mad_attribute(&m.data) {
                    0x0010 => write("rdma_cm", &with(0, &m.data[24 + 140 + 36..24 + 232])),
                    0x0013 => write("rdma_cm", &with(1, &m.data[24 + 36..24 + 232])),
                    0x0012 => write("rdma_cm", &with(2, &m.data[24 + 84..24 + 232])),
                    _ => {}
                },
                Kind::Send { .. } if m.src == HOST => {
                    let queue = u8::from(m.dest_qpn == IO_QP);
                    write("capsule", &with(queue, &m.data[..64]));
                    write("sgl", &m.data[24..40]);
                }
                Kind::Send { .. } => write("cqe", &m.data),
                _ => {}
            }
        }
        for x in exchanges(&messages) {
            let data = if x.in_capsule.is_empty() { &x.data } else { &x.in_capsule };
            match x.capsule.command {
                Command::Fabrics(FabricsCommand::Connect(_)) => {
                    write("connect_data", data);
                    let d = ConnectData::parse(data).unwrap();
                    let mut field = [0u8; 256];
                    nvme_proto::nqn::write_wire("NQN", &mut field, &d.subnqn).unwrap();
                    write("names", &field);
                    write("names", d.hostnqn.as_bytes());
                    write("names", d.hostid.to_string().as_bytes());
                }
                Command::Admin(AdminCommand::Identify(i)) if i.cns <= 3 => write("identify", &with(i.cns, data)),
                Command::Admin(AdminCommand::GetLogPage(g)) => match g.lid {
                    0x70 => write("discovery_log", data),
                    0x02 => write("log_page", &with(1, data)),
                    0x05 => write("log_page", &with(3, data)),
                    0x0c => write("log_page", &with(4, data)),
                    _ => {}
                },
                Command::Fabrics(FabricsCommand::PropertyGet { property }) => {
                    let mut p = property.offset().to_le_bytes().to_vec();
                    p.push(property.size().attrib());
                    p.extend_from_slice(&x.cqe.result().to_le_bytes());
                    write("property", &p);
                }
                _ => {}
            }
        }
    }
    // Shapes the captures do not contain: an error log, a firmware slot log, DSM ranges.
    let err = nvme_proto::log_page::ErrorLogEntry {
        error_count: 1.into(),
        status_field: (Status::INVALID_FIELD.with_dnr().raw() << 1).into(),
        ..Default::default()
    };
    write("log_page", &with(0, zerocopy::IntoBytes::as_bytes(&err)));
    let mut fw = nvme_proto::log_page::FirmwareSlotLog::zeroed();
    fw.afi = 1;
    fw.set_revision(1, "6.1.0-56").unwrap();
    write("log_page", &with(2, zerocopy::IntoBytes::as_bytes(&fw)));
    let ranges = [nvme_proto::io::DsmRange::new(0, 8), nvme_proto::io::DsmRange::new(256, 256)];
    write("dsm_ranges", &with(1, &nvme_proto::io::DsmRange::list_to_bytes(&ranges)));
    write("names", b"      SN padded       ");
    write("names", nvme_proto::nqn::DISCOVERY_NQN.as_bytes());
}
