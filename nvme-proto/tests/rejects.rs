//! Hostile and malformed input: every parser refuses it with a typed error naming the NVMe status a target
//! answers with and the byte offset of the offending field. Nothing panics.

use nvme_proto::command::{Capsule, QueueKind};
use nvme_proto::discovery::{DiscoveryLog, DiscoveryLogEntry};
use nvme_proto::error::{DecodeError, Reason};
use nvme_proto::fabrics::{ConnectData, offset as fo};
use nvme_proto::identify::{IdentifyNamespace, NamespaceIdList, NamespaceList};
use nvme_proto::io::DsmRange;
use nvme_proto::log_page::{AnaLog, ErrorLogEntry, FirmwareSlotLog, SmartLog};
use nvme_proto::rdma_cm::{CmAccept, CmReject, CmRejectStatus, CmRequest};
use nvme_proto::sgl::SglDescriptor;
use nvme_proto::sqe::Sqe;
use nvme_proto::status::Status;
use nvme_proto::{Cqe, Nqn, Uuid, nqn, text};
use rstest::rstest;
use zerocopy::{FromZeros, IntoBytes};

/// A valid Identify on the admin queue, to be broken one field at a time.
fn base_sqe() -> [u8; 64] {
    let mut sqe = Sqe::with_opcode(0x06, 9);
    sqe.dptr = SglDescriptor::keyed(0x1000, 4096, 0x77, true).unwrap().to_bytes();
    sqe.cdw10 = 1.into();
    sqe.to_array()
}

fn fabrics_sqe(fctype: u8) -> [u8; 64] {
    let mut b = base_sqe();
    b[0] = 0x7f;
    b[4] = fctype;
    b[40..64].fill(0);
    b
}

fn expect(result: Result<Capsule, DecodeError>, status: Status, offset: usize) {
    let e = result.expect_err("must be rejected");
    assert_eq!((e.status, e.offset), (status, offset), "{e}");
}

#[test]
fn valid_base_capsule_is_accepted() {
    Capsule::parse_bytes(&base_sqe(), QueueKind::Admin).unwrap();
}

#[rstest]
#[case::fused(|b: &mut [u8; 64]| b[1] |= 1, Status::INVALID_FIELD, 1)]
#[case::prp(|b: &mut [u8; 64]| b[1] = 0, Status::INVALID_FIELD, 1)]
#[case::sgl_for_metadata(|b: &mut [u8; 64]| b[1] = 0x80, Status::INVALID_FIELD, 1)]
#[case::bit_bucket(|b: &mut [u8; 64]| b[39] = 0x10, Status::SGL_INVALID_TYPE, 39)]
#[case::transport_sgl(|b: &mut [u8; 64]| b[39] = 0x5a, Status::SGL_INVALID_TYPE, 39)]
#[case::vendor_sgl(|b: &mut [u8; 64]| b[39] = 0xf0, Status::SGL_INVALID_TYPE, 39)]
#[case::keyed_offset_subtype(|b: &mut [u8; 64]| b[39] = 0x41, Status::INVALID_FIELD, 39)]
#[case::data_block_address(|b: &mut [u8; 64]| b[39] = 0x00, Status::INVALID_FIELD, 39)]
#[case::segment_offset_subtype(|b: &mut [u8; 64]| b[39] = 0x21, Status::INVALID_FIELD, 39)]
#[case::create_sq(|b: &mut [u8; 64]| b[0] = 0x01, Status::INVALID_OPCODE, 0)]
#[case::vendor_admin(|b: &mut [u8; 64]| b[0] = 0xc0, Status::INVALID_OPCODE, 0)]
#[case::log_offset_unaligned(|b: &mut [u8; 64]| { b[0] = 0x02; b[48] = 2; }, Status::INVALID_FIELD, 48)]
#[case::get_features_bad_select(|b: &mut [u8; 64]| { b[0] = 0x0a; b[41] = 5; }, Status::INVALID_FIELD, 41)]
#[case::set_queues_ffff(|b: &mut [u8; 64]| { b[0] = 0x09; b[40] = 7; b[44] = 0xff; b[45] = 0xff; }, Status::INVALID_FIELD, 44)]
fn broken_admin_capsules(#[case] breaks: fn(&mut [u8; 64]), #[case] status: Status, #[case] offset: usize) {
    let mut b = base_sqe();
    breaks(&mut b);
    expect(Capsule::parse_bytes(&b, QueueKind::Admin), status.with_dnr(), offset);
}

#[rstest]
#[case::auth_send(0x05, QueueKind::Admin, Status::INVALID_OPCODE, 4)]
#[case::unknown_fctype(0x7e, QueueKind::Admin, Status::INVALID_OPCODE, 4)]
#[case::property_get_on_io_queue(0x04, QueueKind::Io, Status::INVALID_OPCODE, 4)]
#[case::property_set_on_io_queue(0x00, QueueKind::Io, Status::INVALID_OPCODE, 4)]
#[case::disconnect_on_admin_queue(0x08, QueueKind::Admin, Status::INVALID_OPCODE, 4)]
fn misplaced_fabrics_commands(
    #[case] fctype: u8,
    #[case] queue: QueueKind,
    #[case] status: Status,
    #[case] offset: usize,
) {
    expect(Capsule::parse_bytes(&fabrics_sqe(fctype), queue), status.with_dnr(), offset);
}

#[test]
fn bad_fabrics_fields() {
    let mut b = fabrics_sqe(0x01);
    b[40] = 1; // Connect RECFMT 1
    expect(
        Capsule::parse_bytes(&b, QueueKind::Admin),
        Status::CONNECT_INCOMPATIBLE_FORMAT.with_dnr(),
        fo::CONNECT_RECFMT,
    );
    let mut b = fabrics_sqe(0x04);
    b[44] = 0x10; // INTMC is not a Fabrics property
    expect(Capsule::parse_bytes(&b, QueueKind::Admin), Status::INVALID_FIELD.with_dnr(), fo::PROPERTY_OFFSET);
    let mut b = fabrics_sqe(0x04);
    b[40] = 0; // CAP read as 4 bytes
    expect(Capsule::parse_bytes(&b, QueueKind::Admin), Status::INVALID_FIELD.with_dnr(), fo::PROPERTY_ATTRIB);
    let mut b = fabrics_sqe(0x00);
    b[40] = 1;
    b[44] = 0x14; // CC written as 8 bytes
    expect(Capsule::parse_bytes(&b, QueueKind::Admin), Status::INVALID_FIELD.with_dnr(), fo::PROPERTY_ATTRIB);
    let mut b = fabrics_sqe(0x08);
    b[40] = 2;
    expect(
        Capsule::parse_bytes(&b, QueueKind::Io),
        Status::CONNECT_INCOMPATIBLE_FORMAT.with_dnr(),
        fo::DISCONNECT_RECFMT,
    );
}

#[test]
fn io_queue_rejects_admin_opcodes() {
    let mut b = base_sqe();
    b[0] = 0x05; // Compare: not offered
    expect(Capsule::parse_bytes(&b, QueueKind::Io), Status::INVALID_OPCODE.with_dnr(), 0);
    b[0] = 0x18; // Keep Alive is an admin command
    expect(Capsule::parse_bytes(&b, QueueKind::Io), Status::INVALID_OPCODE.with_dnr(), 0);
}

#[rstest]
#[case(0)]
#[case(63)]
#[case(65)]
#[case(4096)]
fn wrong_lengths(#[case] len: usize) {
    let bytes = vec![0u8; len];
    let e = Capsule::parse_bytes(&bytes, QueueKind::Admin).unwrap_err();
    assert_eq!(e.reason, Reason::Length { expected: 64, actual: len });
    assert!(Cqe::parse(&bytes).is_err());
    assert!(SglDescriptor::parse(&bytes).is_err());
    assert!(ConnectData::parse(&bytes).is_err() || len == 1024);
    assert!(NamespaceList::parse(&bytes).is_err() || len == 4096);
    assert!(SmartLog::parse(&bytes).is_err());
    assert!(FirmwareSlotLog::parse(&bytes).is_err());
    assert!(DiscoveryLogEntry::parse(&bytes).is_err());
}

#[test]
fn segments_decode_but_an_rdma_target_refuses_them() {
    for id in [0x20u8, 0x30] {
        let mut b = base_sqe();
        b[39] = id;
        let capsule = Capsule::parse_bytes(&b, QueueKind::Admin).unwrap();
        let e = capsule.data.for_rdma().unwrap_err();
        assert_eq!((e.status, e.offset), (Status::SGL_INVALID_TYPE.with_dnr(), 15));
    }
    assert!(SglDescriptor::in_capsule(0, 4096).for_rdma().is_ok());
}

fn connect_data() -> [u8; 1024] {
    ConnectData {
        hostid: Uuid([7; 16]),
        cntlid: 0xffff,
        subnqn: "nqn.2024-01.io.example:sub".into(),
        hostnqn: "nqn.2014-08.org.nvmexpress:uuid:07070707-0707-0707-0707-070707070707".into(),
    }
    .to_bytes()
    .unwrap()
}

#[rstest]
#[case::subnqn_unterminated(|d: &mut [u8; 1024]| d[256..512].fill(b'a'), fo::DATA_SUBNQN + 256)]
#[case::subnqn_too_long(|d: &mut [u8; 1024]| { d[256..256 + 224].fill(b'a'); d[256 + 224] = 0; }, fo::DATA_SUBNQN)]
#[case::hostnqn_not_utf8(|d: &mut [u8; 1024]| d[512 + 3] = 0xff, fo::DATA_HOSTNQN + 3)]
#[case::hostnqn_unterminated(|d: &mut [u8; 1024]| d[512..768].fill(b'x'), fo::DATA_HOSTNQN + 256)]
fn broken_connect_data(#[case] breaks: fn(&mut [u8; 1024]), #[case] offset: usize) {
    let mut d = connect_data();
    breaks(&mut d);
    let e = ConnectData::parse(&d).unwrap_err();
    assert_eq!((e.status, e.offset), (Status::CONNECT_INVALID_PARAMETERS.with_dnr(), offset), "{e}");
}

#[test]
fn connect_data_refuses_to_truncate_names() {
    let mut d = ConnectData::parse(&connect_data()).unwrap();
    d.subnqn = "n".repeat(224);
    assert!(matches!(d.to_bytes().unwrap_err().reason, Reason::TooLong { max: 223, actual: 224 }));
    d.subnqn = "nqn.with\0nul".into();
    assert!(d.to_bytes().is_err());
}

#[test]
fn cm_private_data_rejections() {
    let good = CmRequest { recfmt: 0, qid: 1, hrqsize: 32, hsqsize: 31, cntlid: 1 }.to_bytes();
    assert_eq!(CmRequest::parse(&good[..31]).unwrap_err().status, CmRejectStatus::InvalidLength);
    assert_eq!(CmRequest::parse(&[]).unwrap_err().status, CmRejectStatus::InvalidLength);
    let mut bad = good;
    bad[0] = 1;
    assert_eq!(CmRequest::parse(&bad).unwrap_err().status, CmRejectStatus::InvalidRecordFormat);
    // Longer private data (CM pads to 92 bytes) is fine.
    let mut padded = good.to_vec();
    padded.resize(56, 0);
    assert_eq!(CmRequest::parse(&padded).unwrap().qid, 1);
    assert_eq!(CmAccept::parse(&[0; 3]).unwrap_err().status, CmRejectStatus::InvalidLength);
    assert!(CmReject::parse(&[0, 0, 9, 0]).is_err(), "unknown status");
    assert!(CmReject::parse(&[0, 0, 0, 0]).is_err(), "zero private data, as ib_cm's own REJ carries");
    assert!(CmReject::parse(&[0, 0]).is_err());
}

#[test]
fn namespace_lists() {
    let mut b = [0u8; 4096];
    b[0] = 1;
    b[8] = 3; // a gap: entry 1 is 0, entry 2 is not
    let e = NamespaceList::parse(&b).unwrap_err();
    assert_eq!(e.offset, 8);
    assert!(NamespaceList(vec![0]).to_bytes().is_err(), "0 is the terminator, not an id");
    assert!(NamespaceList(vec![1; 1025]).to_bytes().is_err(), "over 1024 refused, not truncated");

    let mut d = [0u8; 4096];
    d[0] = 3; // UUID
    d[1] = 8; // with the EUI64 length
    assert_eq!(NamespaceIdList::parse(&d).unwrap_err().offset, 1);
    d[0] = 9;
    assert_eq!(NamespaceIdList::parse(&d).unwrap_err().offset, 0);
    // NGUID descriptors back to back (20 bytes each); the 205th, at 4080, runs past the end of the page.
    let mut d = [0u8; 4096];
    for k in 0..=204 {
        d[k * 20] = 2;
        d[k * 20 + 1] = 16;
    }
    assert_eq!(NamespaceIdList::parse(&d).unwrap_err().offset, 4084);
}

#[test]
fn identify_namespace_format_out_of_range() {
    let mut ns = IdentifyNamespace::new_zeroed();
    ns.nlbaf = 0;
    ns.flbas = 1;
    assert_eq!(ns.lba_format().unwrap_err().offset, 26);
    ns.flbas = 0;
    ns.lbaf[0].ds = 70; // 2^70-byte blocks
    assert!(ns.block_size().is_err());
    ns.lbaf[0].ds = 12;
    assert_eq!(ns.block_size().unwrap(), 4096);
}

#[test]
fn log_page_rejections() {
    assert!(ErrorLogEntry::parse_list(&[0; 65]).is_err());
    assert_eq!(ErrorLogEntry::parse_list(&[0; 128]).unwrap().len(), 2);
    let fw = FirmwareSlotLog::new_zeroed();
    assert!(fw.revision(0).is_err() && fw.revision(8).is_err());
    assert_eq!(fw.revision(7).unwrap(), "");
    let mut fw2 = fw;
    assert!(fw2.set_revision(1, "123456789").is_err(), "9 bytes do not fit in 8");

    // ANA: header says 1 group but it is missing; a group claims 2^32-1 namespaces.
    let mut ana = vec![0u8; 16];
    ana[8] = 1;
    assert!(AnaLog::parse(&ana).is_err());
    ana.extend_from_slice(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    ana.resize(16 + 32, 0);
    ana[16 + 16] = 1;
    let e = AnaLog::parse(&ana).unwrap_err();
    assert_eq!(e.offset, 16 + 32);
    // Bad ANA state.
    let mut ana = vec![0u8; 48];
    ana[8] = 1;
    ana[32] = 7;
    assert_eq!(AnaLog::parse(&ana).unwrap_err().offset, 32);
}

#[test]
fn discovery_log_rejections() {
    assert!(DiscoveryLog::parse(&[0; 1023]).is_err());
    assert!(DiscoveryLog::parse(&[0; 1500]).is_err(), "partial entry");
    let mut log = vec![0u8; 2048];
    log[8] = 1; // numrec 1
    log[1024 + 512] = 0xc3; // non-ASCII TRADDR
    log[1024 + 256] = 0; // empty subnqn is fine
    let e = DiscoveryLog::parse(&log).unwrap_err();
    assert_eq!(e.offset, 1024 + 512);
    // A header claiming more records than were read is not an error: the host reads the rest later.
    let mut log = vec![0u8; 1024];
    log[8] = 200;
    let parsed = DiscoveryLog::parse(&log).unwrap();
    assert_eq!((parsed.numrec, parsed.entries.len(), parsed.is_complete()), (200, 0, false));
}

#[test]
fn dsm_ranges_short_data() {
    let e = DsmRange::parse_list(&[0; 31], 2).unwrap_err();
    assert_eq!(e.status, Status::SGL_INVALID_DATA_LENGTH.with_dnr());
    assert!(DsmRange::parse_list(&[0; 16 * 257], 257).is_err(), "at most 256 ranges");
    assert_eq!(DsmRange::parse_list(&[0; 4096], 3).unwrap().len(), 3);
}

#[rstest]
#[case("nqn.2014-08.org.nvmexpress.discovery", true)]
#[case("nqn.2014-08.org.nvmexpress:uuid:0b6f3c2e-5a41-4d8e-9c7b-1f2a3b4c5d01", true)]
#[case("nqn.2024-01.io.vectors:nvme-rdma-mtu1024", true)]
#[case("nqn.2014-08.org.nvmexpress:NVMf:uuid:0b6f3c2e-5a41-4d8e-9c7b-1f2a3b4c5d01", true)]
#[case("nqn.2016-06.io.spdk:cnode1", true)]
#[case("nqn.2014-08.org.nvmexpress:uuid:0b6f3c2e-5a41-4d8e-9c7b-1f2a3b4c5d0", false)]
#[case("nqn.2014-08.org.nvmexpress:uuid:0b6f3c2e+5a41-4d8e-9c7b-1f2a3b4c5d01", false)]
#[case("testnqn", false)]
#[case("nqn.14-08.org.example:x", false)]
#[case("nqn.2014-13.org.example:x", false)]
#[case("nqn.2014-00.org.example:x", false)]
#[case("nqn.2014-08org.example:x", false)]
#[case("nqn.2014-08.org.example", false)]
#[case("nqn.2014-08.org.example:", false)]
#[case("nqn.2014-08..org:x", false)]
#[case("nqn.2014-08.-org:x", false)]
#[case("nqn.2014-08.org_x:x", false)]
#[case("", false)]
fn nqn_forms(#[case] name: &str, #[case] valid: bool) {
    assert_eq!(Nqn::new(name).is_ok(), valid, "{name}");
}

#[test]
fn nqn_length_limit() {
    let base = "nqn.2024-01.io.example:";
    let ok = format!("{base}{}", "a".repeat(223 - base.len()));
    assert!(Nqn::new(&ok).is_ok());
    let long = format!("{ok}a");
    assert!(matches!(Nqn::new(&long).unwrap_err().reason, Reason::TooLong { max: 223, actual: 224 }));
    let mut field = [0u8; 256];
    assert!(nqn::write_wire("NQN", &mut field, &long).is_err());
    // A name of exactly 223 bytes is terminated at byte 223 on the wire.
    nqn::write_wire("NQN", &mut field, &ok).unwrap();
    assert_eq!(field[223], 0);
    assert_eq!(nqn::read_wire("NQN", &field).unwrap(), ok);
}

#[test]
fn padded_text() {
    let mut sn = [0u8; 20];
    assert!(text::write_padded("SN", &mut sn, "x".repeat(21).as_str(), b' ').is_err());
    assert!(text::write_padded("SN", &mut sn, "caf\u{e9}", b' ').is_err(), "not ASCII");
    assert!(text::write_padded("SN", &mut sn, "tab\there", b' ').is_err(), "control character");
    text::write_padded("SN", &mut sn, "ABC123", b' ').unwrap();
    assert_eq!(&sn, b"ABC123              ");
    assert_eq!(text::read_padded("SN", &sn).unwrap(), "ABC123");
    let mut bad = sn;
    bad[2] = 0x07;
    assert_eq!(text::read_padded("SN", &bad).unwrap_err().offset, 2);
    assert_eq!(text::read_padded("SN", &[b' '; 20]).unwrap(), "");
}

#[rstest]
#[case("0b6f3c2e-5a41-4d8e-9c7b-1f2a3b4c5d01", true)]
#[case("0B6F3C2E-5A41-4D8E-9C7B-1F2A3B4C5D01", true)]
#[case("0b6f3c2e5a414d8e9c7b1f2a3b4c5d01", false)]
#[case("0b6f3c2e-5a41-4d8e-9c7b-1f2a3b4c5d0g", false)]
#[case("0b6f3c2e-5a41-4d8e-9c7b_1f2a3b4c5d01", false)]
#[case("", false)]
fn uuid_forms(#[case] text: &str, #[case] valid: bool) {
    assert_eq!(Uuid::parse(text).is_ok(), valid);
}

#[test]
fn error_entries_carry_status_and_location() {
    let mut e = ErrorLogEntry::new_zeroed();
    e.status_field = (Status::INVALID_FIELD.with_dnr().raw() << 1).into();
    e.param_error_location = ErrorLogEntry::location(44).into();
    let bytes = e.as_bytes().to_vec();
    let back = &ErrorLogEntry::parse_list(&bytes).unwrap()[0];
    assert_eq!(back.status(), Status::INVALID_FIELD.with_dnr());
    assert_eq!(back.param_error_location.get(), 44);
}
