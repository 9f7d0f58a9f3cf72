//! Round trips for every wire type: typed value → bytes → typed value is the identity, over rstest tables of
//! named cases and proptest-generated values. For raw structures, bytes → view → bytes is the identity too.

use nvme_proto::aer::{AsyncEvent, AsyncEventType};
use nvme_proto::command::{
    AdminCommand, Capsule, Command, FabricsCommand, GetFeatures, GetLogPage, Identify, IoCommand, SetFeatures,
};
use nvme_proto::cqe::Cqe;
use nvme_proto::discovery::{DiscoveryLog, DiscoveryLogEntry, RdmaParams};
use nvme_proto::fabrics::{self, Connect, ConnectData, ConnectParameter};
use nvme_proto::features::{Feature, FeatureSelect, NumberOfQueues, fid};
use nvme_proto::identify::{
    IdentifyController, IdentifyNamespace, LbaFormat, NamespaceId, NamespaceIdList, NamespaceList,
};
use nvme_proto::io::{DatasetManagement, DsmRange, ReadWrite};
use nvme_proto::log_page::{AnaGroup, AnaLog, AnaState, CommandEffectsLog, ErrorLogEntry, FirmwareSlotLog, SmartLog};
use nvme_proto::property::{Cap, Cc, Csts, Property, Vs};
use nvme_proto::rdma_cm::{CmAccept, CmReject, CmRejectStatus, CmRequest};
use nvme_proto::sgl::SglDescriptor;
use nvme_proto::status::{CommandSet, Status, StatusCodeType};
use nvme_proto::{Nqn, QueueKind, Uuid, nqn, text};
use proptest::prelude::*;
use rstest::rstest;
use zerocopy::IntoBytes;

fn roundtrip_capsule(capsule: Capsule) {
    let queue = capsule.command.queue_kind();
    let sqe = capsule.to_sqe();
    assert_eq!(Capsule::parse(&sqe, queue), Ok(capsule));
    assert_eq!(Capsule::parse_bytes(&sqe.to_array(), queue), Ok(capsule));
}

fn capsule(command: Command) -> Capsule {
    Capsule { command_id: 0x1001, data: SglDescriptor::keyed(0xdead_0000, 4096, 0x1234, true).unwrap(), command }
}

#[rstest]
#[case::connect_admin(Command::Fabrics(FabricsCommand::Connect(Connect { recfmt: 0, qid: 0, sqsize: 31, cattr: 0, kato: 5000 })))]
#[case::connect_io(Command::Fabrics(FabricsCommand::Connect(Connect { recfmt: 0, qid: 7, sqsize: 127, cattr: 4, kato: 0 })))]
#[case::property_get_cap(Command::Fabrics(FabricsCommand::PropertyGet { property: Property::Cap }))]
#[case::property_get_csts(Command::Fabrics(FabricsCommand::PropertyGet { property: Property::Csts }))]
#[case::property_set_cc(Command::Fabrics(FabricsCommand::PropertySet { property: Property::Cc, value: 0x460061 }))]
#[case::property_set_nssr(Command::Fabrics(FabricsCommand::PropertySet { property: Property::Nssr, value: 0x4e564d65 }))]
#[case::disconnect(Command::Fabrics(FabricsCommand::Disconnect))]
#[case::identify_ctrl(Command::Admin(AdminCommand::Identify(Identify { nsid: 0, cns: 1, ..Default::default() })))]
#[case::identify_ns(Command::Admin(AdminCommand::Identify(Identify { nsid: 1, cns: 0, ..Default::default() })))]
#[case::identify_active(Command::Admin(AdminCommand::Identify(Identify { nsid: 0, cns: 2, ..Default::default() })))]
#[case::identify_desc(Command::Admin(AdminCommand::Identify(Identify { nsid: 1, cns: 3, ..Default::default() })))]
#[case::log_error(Command::Admin(AdminCommand::GetLogPage(GetLogPage { lid: 0x01, numd: 15, ..Default::default() })))]
#[case::log_smart(Command::Admin(AdminCommand::GetLogPage(GetLogPage { nsid: 0xffff_ffff, lid: 0x02, numd: 127, ..Default::default() })))]
#[case::log_fw(Command::Admin(AdminCommand::GetLogPage(GetLogPage { lid: 0x03, numd: 127, ..Default::default() })))]
#[case::log_changed(Command::Admin(AdminCommand::GetLogPage(GetLogPage { lid: 0x04, numd: 1023, rae: true, ..Default::default() })))]
#[case::log_effects(Command::Admin(AdminCommand::GetLogPage(GetLogPage { lid: 0x05, numd: 1023, ..Default::default() })))]
#[case::log_ana(Command::Admin(AdminCommand::GetLogPage(GetLogPage { lid: 0x0c, numd: 2051, lsp: 1, ..Default::default() })))]
#[case::log_discovery(Command::Admin(AdminCommand::GetLogPage(GetLogPage { lid: 0x70, numd: 767, offset: 1024, ..Default::default() })))]
#[case::set_vwc(Command::Admin(AdminCommand::SetFeatures(SetFeatures { nsid: 0, save: false, feature: Feature::VolatileWriteCache { enabled: true } })))]
#[case::set_queues(Command::Admin(AdminCommand::SetFeatures(SetFeatures { nsid: 0, save: false, feature: Feature::NumberOfQueues(NumberOfQueues { nsqr: 3, ncqr: 3 }) })))]
#[case::set_aec(Command::Admin(AdminCommand::SetFeatures(SetFeatures { nsid: 0, save: false, feature: Feature::AsyncEventConfig(0x8000_0900) })))]
#[case::set_kato(Command::Admin(AdminCommand::SetFeatures(SetFeatures { nsid: 0, save: false, feature: Feature::KeepAliveTimer { kato_ms: 120_000 } })))]
#[case::set_hostid(Command::Admin(AdminCommand::SetFeatures(SetFeatures { nsid: 0, save: true, feature: Feature::HostIdentifier { extended: true } })))]
#[case::get_hostid(Command::Admin(AdminCommand::GetFeatures(GetFeatures { nsid: 0, fid: fid::HOST_IDENTIFIER, select: FeatureSelect::Current, cdw11: 1 })))]
#[case::get_vwc(Command::Admin(AdminCommand::GetFeatures(GetFeatures { nsid: 0, fid: fid::VOLATILE_WRITE_CACHE, select: FeatureSelect::SupportedCapabilities, cdw11: 0 })))]
#[case::keep_alive(Command::Admin(AdminCommand::KeepAlive))]
#[case::aer(Command::Admin(AdminCommand::AsyncEventRequest))]
#[case::abort(Command::Admin(AdminCommand::Abort { sqid: 1, cid: 0x2003 }))]
#[case::read(Command::Io(IoCommand::Read(ReadWrite::new(1, 256, 256).unwrap())))]
#[case::write_fua(Command::Io(IoCommand::Write(ReadWrite { control: 0x4000, ..ReadWrite::new(1, 0, 8).unwrap() })))]
#[case::flush(Command::Io(IoCommand::Flush { nsid: 1 }))]
#[case::write_zeroes(Command::Io(IoCommand::WriteZeroes(ReadWrite { control: 1 << 9, ..ReadWrite::new(1, 1 << 40, 65536).unwrap() })))]
#[case::dsm(Command::Io(IoCommand::DatasetManagement(DatasetManagement { nsid: 1, nr: 255, attributes: 4 })))]
fn command_table(#[case] command: Command) {
    roundtrip_capsule(capsule(command));
}

#[rstest]
#[case(SglDescriptor::default())]
#[case(SglDescriptor::keyed(u64::MAX, 0xff_ffff, u32::MAX, true).unwrap())]
#[case(SglDescriptor::in_capsule(0, 4096))]
#[case(SglDescriptor::in_capsule(64, 1024))]
#[case(SglDescriptor::Segment { address: 0x1000, length: 32, last: false })]
#[case(SglDescriptor::Segment { address: 0x1000, length: 32, last: true })]
fn sgl_table(#[case] d: SglDescriptor) {
    assert_eq!(SglDescriptor::parse(&d.to_bytes()), Ok(d));
}

#[test]
fn read_write_block_counts() {
    assert_eq!(ReadWrite::new(1, 0, 0), None);
    assert_eq!(ReadWrite::new(1, 0, 65537), None, "not representable: refused, not truncated");
    assert_eq!(ReadWrite::new(1, 0, 65536).unwrap().nlb, 0xffff);
}

#[test]
fn status_names() {
    assert_eq!(Status::SUCCESS.name(CommandSet::Admin), "Successful Completion");
    assert_eq!(Status::INVALID_FIELD.with_dnr().name(CommandSet::Io), "Invalid Field in Command");
    assert_eq!(Status::from_raw(0x182).name(CommandSet::Fabrics), "Connect Invalid Parameters");
    assert_eq!(Status::from_raw(0x182).name(CommandSet::Io), "Attempted Write to Read Only Range");
    assert_eq!(Status::CONNECT_INVALID_HOST.name(CommandSet::Fabrics), "Connect Invalid Host");
    assert_eq!(Status::ANA_TRANSITION.name(CommandSet::Io), "Asymmetric Access Transition");
    assert_eq!(Status::UNRECOVERED_READ_ERROR.name(CommandSet::Io), "Unrecovered Read Error");
    assert_eq!(Status::from_raw(0x07f).name(CommandSet::Io), "Unknown generic status");
    assert_eq!(Status::from_raw(0x700).name(CommandSet::Io), "Vendor specific status");
    let s = Status::KEEP_ALIVE_EXPIRED.with_dnr().with_more().with_crd(2);
    assert!(s.dnr() && s.more() && s.crd() == 2 && s.code() == Status::KEEP_ALIVE_EXPIRED);
    assert_eq!(s.sct(), StatusCodeType::Generic);
}

#[test]
fn connect_response_results() {
    for p in [ConnectParameter::Command(42), ConnectParameter::Data(256), ConnectParameter::Data(512)] {
        assert_eq!(fabrics::parse_invalid_parameter_result(fabrics::invalid_parameter_result(p)), p);
    }
    assert_eq!(fabrics::connect_result_cntlid(fabrics::connect_success_result(0xabcd)), 0xabcd);
}

#[test]
fn raw_structures_roundtrip_through_their_views() {
    let mut id = IdentifyController::zeroed();
    id.set_serial("SN-0001").unwrap();
    id.set_model("nvmf-target").unwrap();
    id.set_firmware("0.1.0").unwrap();
    id.set_subnqn("nqn.2024-01.io.example:sub").unwrap();
    id.kas = 10.into();
    id.sgls = 0x0010_0005.into();
    let back = IdentifyController::parse(id.as_bytes()).unwrap();
    assert_eq!((back.serial(), back.model(), back.firmware()), (Ok("SN-0001"), Ok("nvmf-target"), Ok("0.1.0")));
    assert_eq!(back.subnqn(), Ok("nqn.2024-01.io.example:sub"));
    assert_eq!(back, &id);

    let mut ns = IdentifyNamespace::zeroed();
    ns.nsze = (1u64 << 21).into();
    ns.nlbaf = 1;
    ns.lbaf[0] = LbaFormat::new(9);
    ns.lbaf[1] = LbaFormat::new(12);
    ns.flbas = 1;
    let back = IdentifyNamespace::parse(ns.as_bytes()).unwrap();
    assert_eq!((back.block_size(), back.nsze.get()), (Ok(4096), 1 << 21));

    let mut smart = SmartLog::zeroed();
    smart.data_units_read = SmartLog::data_units(1_000_000_000).into();
    assert_eq!(SmartLog::parse(smart.as_bytes()).unwrap().data_units_read.get(), 1954);
    let mut fw = FirmwareSlotLog::zeroed();
    fw.afi = 1;
    fw.set_revision(1, "0.1.0").unwrap();
    let fw_back = FirmwareSlotLog::parse(fw.as_bytes()).unwrap();
    assert_eq!((fw_back.active_slot(), fw_back.revision(1)), (1, Ok("0.1.0")));
    let mut effects = CommandEffectsLog::zeroed();
    effects.admin[6] = 1.into();
    assert_eq!(CommandEffectsLog::parse(effects.as_bytes()).unwrap(), &effects);
}

// ---- property tests ----

fn nqn_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,8}(\\.[a-z0-9]{1,8}){0,3}:[ -~]{1,120}".prop_map(|s| format!("nqn.2024-07.{s}")),
        any::<[u8; 16]>().prop_map(|u| Nqn::from_uuid(Uuid(u)).to_string()),
        Just(nqn::DISCOVERY_NQN.to_string()),
    ]
}

/// Any UTF-8 without NUL that fits an NQN field (what the wire allows, valid form or not).
fn wire_name() -> impl Strategy<Value = String> {
    "[^\\x00]{0,60}".prop_filter("fits in 223 bytes", |s| s.len() <= 223)
}

fn sgl_strategy() -> impl Strategy<Value = SglDescriptor> {
    prop_oneof![
        (any::<u64>(), 0u32..=0xff_ffff, any::<u32>(), any::<bool>())
            .prop_map(|(a, l, k, i)| SglDescriptor::keyed(a, l, k, i).unwrap()),
        (any::<u64>(), any::<u32>()).prop_map(|(o, l)| SglDescriptor::in_capsule(o, l)),
        (any::<u64>(), any::<u32>(), any::<bool>())
            .prop_map(|(address, length, last)| { SglDescriptor::Segment { address, length, last } }),
    ]
}

fn feature_strategy() -> impl Strategy<Value = Feature> {
    let known = [
        fid::VOLATILE_WRITE_CACHE,
        fid::NUMBER_OF_QUEUES,
        fid::ASYNC_EVENT_CONFIG,
        fid::KEEP_ALIVE_TIMER,
        fid::HOST_IDENTIFIER,
    ];
    prop_oneof![
        any::<bool>().prop_map(|enabled| Feature::VolatileWriteCache { enabled }),
        (0u16..0xffff, 0u16..0xffff).prop_map(|(nsqr, ncqr)| Feature::NumberOfQueues(NumberOfQueues { nsqr, ncqr })),
        any::<u32>().prop_map(Feature::AsyncEventConfig),
        any::<u32>().prop_map(|kato_ms| Feature::KeepAliveTimer { kato_ms }),
        any::<bool>().prop_map(|extended| Feature::HostIdentifier { extended }),
        (any::<u8>(), any::<u32>())
            .prop_filter("not a decoded feature", move |(f, _)| !known.contains(f))
            .prop_map(|(fid, cdw11)| Feature::Other { fid, cdw11 }),
    ]
}

fn rw_strategy() -> impl Strategy<Value = ReadWrite> {
    (any::<u32>(), any::<u64>(), any::<u16>(), any::<u16>(), any::<u32>())
        .prop_map(|(nsid, slba, nlb, control, dsmgmt)| ReadWrite { nsid, slba, nlb, control, dsmgmt })
}

fn command_strategy() -> impl Strategy<Value = Command> {
    let property = prop_oneof![
        Just(Property::Cap),
        Just(Property::Vs),
        Just(Property::Cc),
        Just(Property::Csts),
        Just(Property::Nssr)
    ];
    let select = prop_oneof![
        Just(FeatureSelect::Current),
        Just(FeatureSelect::Default),
        Just(FeatureSelect::Saved),
        Just(FeatureSelect::SupportedCapabilities)
    ];
    prop_oneof![
        (any::<u16>(), any::<u16>(), any::<u8>(), any::<u32>()).prop_map(
            |(qid, sqsize, cattr, kato)| Command::Fabrics(FabricsCommand::Connect(Connect {
                recfmt: 0,
                qid,
                sqsize,
                cattr,
                kato
            }))
        ),
        property.clone().prop_map(|property| Command::Fabrics(FabricsCommand::PropertyGet { property })),
        (property, any::<u64>()).prop_map(|(property, v)| {
            let value = if property == Property::Cap { v } else { v & 0xffff_ffff };
            Command::Fabrics(FabricsCommand::PropertySet { property, value })
        }),
        Just(Command::Fabrics(FabricsCommand::Disconnect)),
        (any::<u32>(), any::<u8>(), any::<u16>(), any::<u16>(), any::<u8>()).prop_map(
            |(nsid, cns, cntid, cnssid, csi)| Command::Admin(AdminCommand::Identify(Identify {
                nsid,
                cns,
                cntid,
                cnssid,
                csi
            }))
        ),
        (
            any::<u32>(),
            any::<u8>(),
            0u8..0x80,
            any::<bool>(),
            any::<u32>(),
            any::<u16>(),
            any::<u64>(),
            0u8..0x80,
            any::<u8>()
        )
            .prop_map(|(nsid, lid, lsp, rae, numd, lsi, offset, uuid_index, csi)| {
                Command::Admin(AdminCommand::GetLogPage(GetLogPage {
                    nsid,
                    lid,
                    lsp,
                    rae,
                    numd,
                    lsi,
                    offset: offset & !3,
                    uuid_index,
                    csi,
                }))
            }),
        (any::<u32>(), any::<bool>(), feature_strategy()).prop_map(|(nsid, save, feature)| {
            Command::Admin(AdminCommand::SetFeatures(SetFeatures { nsid, save, feature }))
        }),
        (any::<u32>(), any::<u8>(), select, any::<u32>()).prop_map(|(nsid, fid, select, cdw11)| {
            Command::Admin(AdminCommand::GetFeatures(GetFeatures { nsid, fid, select, cdw11 }))
        }),
        (any::<u16>(), any::<u16>()).prop_map(|(sqid, cid)| Command::Admin(AdminCommand::Abort { sqid, cid })),
        Just(Command::Admin(AdminCommand::KeepAlive)),
        Just(Command::Admin(AdminCommand::AsyncEventRequest)),
        rw_strategy().prop_map(|rw| Command::Io(IoCommand::Read(rw))),
        rw_strategy().prop_map(|rw| Command::Io(IoCommand::Write(rw))),
        rw_strategy().prop_map(|rw| Command::Io(IoCommand::WriteZeroes(rw))),
        any::<u32>().prop_map(|nsid| Command::Io(IoCommand::Flush { nsid })),
        (any::<u32>(), any::<u8>(), any::<u32>()).prop_map(|(nsid, nr, attributes)| Command::Io(
            IoCommand::DatasetManagement(DatasetManagement { nsid, nr, attributes })
        )),
    ]
}

fn discovery_entry() -> impl Strategy<Value = DiscoveryLogEntry> {
    (
        (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>(), any::<u16>(), any::<u16>(), any::<u16>(), any::<u16>()),
        "[ -~]{0,31}",
        wire_name(),
        "[ -~]{0,100}",
        (any::<u8>(), any::<u8>(), any::<u8>(), any::<u16>()),
    )
        .prop_map(
            |(
                (trtype, adrfam, subtype, treq, portid, cntlid, asqsz, eflags),
                trsvcid,
                subnqn,
                traddr,
                (qptype, prtype, cms, pkey),
            )| {
                DiscoveryLogEntry {
                    trtype,
                    adrfam,
                    subtype,
                    treq,
                    portid,
                    cntlid,
                    asqsz,
                    eflags,
                    // Trailing spaces are padding on the wire, so a value never ends with one.
                    trsvcid: trsvcid.trim_end().to_owned(),
                    subnqn,
                    traddr: traddr.trim_end().to_owned(),
                    rdma: (trtype == 1).then_some(RdmaParams { qptype, prtype, cms, pkey }),
                }
            },
        )
}

fn namespace_id() -> impl Strategy<Value = NamespaceId> {
    prop_oneof![
        any::<[u8; 8]>().prop_map(NamespaceId::Eui64),
        any::<[u8; 16]>().prop_map(NamespaceId::Nguid),
        any::<[u8; 16]>().prop_map(|u| NamespaceId::Uuid(Uuid(u))),
        any::<u8>().prop_map(NamespaceId::Csi),
    ]
}

fn ana_state() -> impl Strategy<Value = AnaState> {
    prop_oneof![
        Just(AnaState::Optimized),
        Just(AnaState::NonOptimized),
        Just(AnaState::Inaccessible),
        Just(AnaState::PersistentLoss),
        Just(AnaState::Change),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn capsules(command in command_strategy(), data in sgl_strategy(), command_id in any::<u16>()) {
        roundtrip_capsule(Capsule { command_id, data, command });
    }

    /// Arbitrary SQE bytes: decoding never panics, and whatever decodes re-encodes to the same command.
    #[test]
    fn arbitrary_sqe_bytes(bytes in proptest::collection::vec(any::<u8>(), 64), io in any::<bool>()) {
        let queue = if io { QueueKind::Io } else { QueueKind::Admin };
        if let Ok(c) = Capsule::parse_bytes(&bytes, queue) {
            prop_assert_eq!(Capsule::parse(&c.to_sqe(), queue), Ok(c));
        }
    }

    #[test]
    fn cqes(dw0 in any::<u32>(), dw1 in any::<u32>(), head in any::<u16>(), sqid in any::<u16>(), cid in any::<u16>(), status in any::<u16>()) {
        let status = Status::from_raw(status);
        let result = dw0 as u64 | (dw1 as u64) << 32;
        let cqe = Cqe::new(cid, sqid, head, status, result);
        let back = *Cqe::parse(&cqe.to_array()).unwrap();
        prop_assert_eq!((back.command_id(), back.sq_id.get(), back.sq_head.get(), back.status(), back.result(), back.phase()),
                        (cid, sqid, head, status, result, false));
        let mut flipped = back;
        flipped.status_phase = (back.status_phase.get() | 1).into();
        flipped.set_status(Status::SUCCESS);
        prop_assert!(flipped.phase() && flipped.status() == Status::SUCCESS);
    }

    #[test]
    fn sgls(d in sgl_strategy()) {
        prop_assert_eq!(SglDescriptor::parse(&d.to_bytes()), Ok(d));
    }

    #[test]
    fn connect_data(hostid in any::<[u8; 16]>(), cntlid in any::<u16>(), subnqn in wire_name(), hostnqn in nqn_strategy()) {
        let d = ConnectData { hostid: Uuid(hostid), cntlid, subnqn, hostnqn };
        prop_assert_eq!(ConnectData::parse(&d.to_bytes().unwrap()), Ok(d));
    }

    #[test]
    fn cm_private_data(qid in any::<u16>(), hrqsize in any::<u16>(), hsqsize in any::<u16>(), cntlid in any::<u16>(), crqsize in any::<u16>(), sts in 0usize..8) {
        let req = CmRequest { recfmt: 0, qid, hrqsize, hsqsize, cntlid };
        prop_assert_eq!(CmRequest::parse(&req.to_bytes()), Ok(req));
        let acc = CmAccept { recfmt: 0, crqsize };
        prop_assert_eq!(CmAccept::parse(&acc.to_bytes()), Ok(acc));
        let rej = CmReject::new(CmRejectStatus::ALL[sts]);
        prop_assert_eq!(CmReject::parse(&rej.to_bytes()), Ok(rej));
    }

    #[test]
    fn namespace_lists(ids in proptest::collection::vec(1u32.., 0..=1024)) {
        let list = NamespaceList(ids);
        prop_assert_eq!(NamespaceList::parse(&list.to_bytes().unwrap()), Ok(list));
    }

    #[test]
    fn namespace_id_lists(ids in proptest::collection::vec(namespace_id(), 0..100)) {
        let list = NamespaceIdList(ids);
        prop_assert_eq!(NamespaceIdList::parse(&list.to_bytes().unwrap()), Ok(list));
    }

    #[test]
    fn ana_logs(chgcnt in any::<u64>(), groups in proptest::collection::vec((any::<u32>(), any::<u64>(), ana_state(), proptest::collection::vec(any::<u32>(), 0..20)), 0..10)) {
        let log = AnaLog { chgcnt, groups: groups.into_iter().map(|(grpid, chgcnt, state, nsids)| AnaGroup { grpid, chgcnt, state, nsids }).collect() };
        let bytes = log.to_bytes().unwrap();
        prop_assert_eq!(bytes.len(), log.encoded_len());
        // Hosts read a fixed-size buffer: zero padding after the last group is fine.
        let mut padded = bytes.clone();
        padded.resize(bytes.len() + 64, 0);
        prop_assert_eq!(AnaLog::parse(&padded), Ok(log));
    }

    #[test]
    fn discovery_logs(genctr in any::<u64>(), entries in proptest::collection::vec(discovery_entry(), 0..4)) {
        let log = DiscoveryLog { genctr, numrec: entries.len() as u64, recfmt: 0, entries };
        prop_assert_eq!(DiscoveryLog::parse(&log.to_bytes().unwrap()), Ok(log));
    }

    #[test]
    fn raw_views_are_byte_exact(bytes in proptest::collection::vec(any::<u8>(), 4096)) {
        prop_assert_eq!(IdentifyController::parse(&bytes).unwrap().as_bytes(), &bytes[..]);
        prop_assert_eq!(IdentifyNamespace::parse(&bytes).unwrap().as_bytes(), &bytes[..]);
        prop_assert_eq!(CommandEffectsLog::parse(&bytes).unwrap().as_bytes(), &bytes[..]);
        prop_assert_eq!(SmartLog::parse(&bytes[..512]).unwrap().as_bytes(), &bytes[..512]);
        prop_assert_eq!(FirmwareSlotLog::parse(&bytes[..512]).unwrap().as_bytes(), &bytes[..512]);
        prop_assert_eq!(ErrorLogEntry::parse_list(&bytes).unwrap().as_bytes(), &bytes[..]);
        prop_assert_eq!(DsmRange::list_to_bytes(&DsmRange::parse_list(&bytes, 256).unwrap()), bytes.clone());
    }

    #[test]
    fn features_and_events(feature in feature_strategy(), dw in any::<u32>()) {
        prop_assert_eq!(Feature::decode(feature.fid(), feature.cdw11()), Ok(feature));
        let event = AsyncEvent::from_dword(dw);
        prop_assert_eq!(AsyncEvent::from_dword(event.to_dword()), event);
        prop_assert_eq!(event.to_dword(), dw & 0x00ff_ff07);
        prop_assert_eq!(NumberOfQueues::from_dword(dw).to_dword(), dw);
    }

    #[test]
    fn registers(v in any::<u64>()) {
        let cap = Cap(v);
        let rebuilt = Cap(0).set_mqes(cap.mqes()).and_then(|c| c.set_cqr(cap.cqr())).and_then(|c| c.set_ams(cap.ams()))
            .and_then(|c| c.set_to(cap.to())).and_then(|c| c.set_dstrd(cap.dstrd())).and_then(|c| c.set_nssrs(cap.nssrs()))
            .and_then(|c| c.set_css(cap.css())).and_then(|c| c.set_bps(cap.bps())).and_then(|c| c.set_mpsmin(cap.mpsmin()))
            .and_then(|c| c.set_mpsmax(cap.mpsmax())).unwrap();
        let mask = 0x00ff_3fff_ff07_ffff_u64;
        prop_assert_eq!(rebuilt.0, v & mask);
        let cc = Cc(v as u32);
        let rebuilt = Cc(0).set_en(cc.en()).and_then(|c| c.set_css(cc.css())).and_then(|c| c.set_mps(cc.mps()))
            .and_then(|c| c.set_ams(cc.ams())).and_then(|c| c.set_shn(cc.shn())).and_then(|c| c.set_iosqes(cc.iosqes()))
            .and_then(|c| c.set_iocqes(cc.iocqes())).and_then(|c| c.set_crime(cc.crime())).unwrap();
        prop_assert_eq!(rebuilt.0, v as u32 & 0x01ff_fff1);
        let csts = Csts(v as u32);
        let rebuilt = Csts(0).set_rdy(csts.rdy()).and_then(|c| c.set_cfs(csts.cfs())).and_then(|c| c.set_shst(csts.shst()))
            .and_then(|c| c.set_nssro(csts.nssro())).and_then(|c| c.set_pp(csts.pp())).unwrap();
        prop_assert_eq!(rebuilt.0, v as u32 & 0x3f);
        let vs = Vs(v as u32);
        prop_assert_eq!(Vs::new(vs.major(), vs.minor(), vs.tertiary()), vs);
    }

    #[test]
    fn names(name in nqn_strategy(), uuid in any::<[u8; 16]>(), text in "[ -~]{0,20}") {
        let n = Nqn::new(&name).unwrap();
        let wire = n.to_wire();
        prop_assert_eq!(nqn::read_wire("NQN", &wire), Ok(name.as_str()));
        let u = Uuid(uuid);
        prop_assert_eq!(Uuid::parse(&u.to_string()), Ok(u));
        prop_assert_eq!(Nqn::from_uuid(u).uuid(), Some(u));
        let mut field = [0u8; 20];
        text::write_padded("SN", &mut field, &text, b' ').unwrap();
        prop_assert_eq!(text::read_padded("SN", &field), Ok(text.trim_end()));
    }

    #[test]
    fn statuses(raw in 0u16..0x8000) {
        let s = Status::from_raw(raw);
        prop_assert_eq!(s.raw(), raw);
        prop_assert_eq!(Status::new(s.sct(), s.sc()), s.code());
        prop_assert_eq!(Cqe::new(0, 0, 0, s, 0).status(), s);
        let _ = s.name(CommandSet::Fabrics);
    }
}

#[test]
fn async_event_kinds() {
    for (bits, kind) in [
        (0, AsyncEventType::Error),
        (1, AsyncEventType::SmartHealth),
        (2, AsyncEventType::Notice),
        (6, AsyncEventType::IoCommandSpecific),
        (7, AsyncEventType::VendorSpecific),
    ] {
        assert_eq!(AsyncEventType::from_bits(bits), kind);
        assert_eq!(AsyncEvent { kind, info: 0, log_page: 0 }.to_dword(), bits as u32);
    }
}
