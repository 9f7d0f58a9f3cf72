//! Known-answer tests pinned to the byte offsets of Linux `include/linux/nvme.h` and
//! `include/linux/nvme-rdma.h`: every field of every wire structure sits where the kernel puts it, and the
//! bit-packed command dwords encode to the bytes the kernel sends.

use core::mem::offset_of;

use nvme_proto::aer::{AsyncEvent, AsyncEventType};
use nvme_proto::command::{
    AdminCommand, Capsule, Command, FabricsCommand, GetLogPage, Identify, IoCommand, SetFeatures,
};
use nvme_proto::cqe::Cqe;
use nvme_proto::discovery::{DiscoveryLogEntryRaw, DiscoveryLogHeader, RdmaTsas};
use nvme_proto::fabrics::{Connect, ConnectDataRaw};
use nvme_proto::features::{Feature, NumberOfQueues};
use nvme_proto::identify::{IdentifyController, IdentifyNamespace, LbaFormat, PowerStateDescriptor};
use nvme_proto::io::{DsmRange, ReadWrite};
use nvme_proto::log_page::{CommandEffectsLog, ErrorLogEntry, FirmwareSlotLog, SmartLog};
use nvme_proto::property::{Cap, Cc, Csts, Property, Vs};
use nvme_proto::rdma_cm::{CmAccept, CmReject, CmRejectStatus, CmRequest};
use nvme_proto::sgl::SglDescriptor;
use nvme_proto::sqe::Sqe;
use nvme_proto::status::Status;
use rstest::rstest;

macro_rules! offsets {
    ($ty:ty, size $size:expr, { $($field:ident : $off:expr),* $(,)? }) => {{
        assert_eq!(size_of::<$ty>(), $size, "size of {}", stringify!($ty));
        $( assert_eq!(offset_of!($ty, $field), $off, "{}::{}", stringify!($ty), stringify!($field)); )*
    }};
}

#[test]
fn sqe_and_cqe_layout() {
    offsets!(Sqe, size 64, {
        opcode: 0, flags: 1, command_id: 2, nsid: 4, cdw2: 8, cdw3: 12, mptr: 16, dptr: 24,
        cdw10: 40, cdw11: 44, cdw12: 48, cdw13: 52, cdw14: 56, cdw15: 60,
    });
    offsets!(Cqe, size 16, { dw0: 0, dw1: 4, sq_head: 8, sq_id: 10, command_id: 12, status_phase: 14 });
}

#[test]
fn connect_data_layout() {
    offsets!(ConnectDataRaw, size 1024, { hostid: 0, cntlid: 16, subnqn: 256, hostnqn: 512, reserved768: 768 });
}

#[test]
fn identify_controller_layout() {
    offsets!(IdentifyController, size 4096, {
        vid: 0, ssvid: 2, sn: 4, mn: 24, fr: 64, rab: 72, ieee: 73, cmic: 76, mdts: 77, cntlid: 78, ver: 80,
        rtd3r: 84, rtd3e: 88, oaes: 92, ctratt: 96, cntrltype: 111, fguid: 112, crdt1: 128, crdt2: 130, crdt3: 132,
        oacs: 256, acl: 258, aerl: 259, frmw: 260, lpa: 261, elpe: 262, npss: 263, avscc: 264, apsta: 265,
        wctemp: 266, cctemp: 268, mtfa: 270, hmpre: 272, hmmin: 276, tnvmcap: 280, unvmcap: 296, rpmbs: 312,
        edstt: 316, dsto: 318, fwug: 319, kas: 320, hctma: 322, mntmt: 324, mxtmt: 326, sanicap: 328,
        hmminds: 332, hmmaxd: 336, nvmsetidmax: 338, endgidmax: 340, anatt: 342, anacap: 343, anagrpmax: 344,
        nanagrpid: 348, sqes: 512, cqes: 513, maxcmd: 514, nn: 516, oncs: 520, fuses: 522, fna: 524, vwc: 525,
        awun: 526, awupf: 528, nvscc: 530, nwpc: 531, acwu: 532, sgls: 536, mnan: 540, subnqn: 768,
        ioccsz: 1792, iorcsz: 1796, icdoff: 1800, fcatt: 1802, msdbd: 1803, ofcs: 1804, dctype: 1806,
        psd: 2048, vendor: 3072,
    });
    offsets!(PowerStateDescriptor, size 32, {
        max_power: 0, flags: 3, entry_lat: 4, exit_lat: 8, read_tput: 12, read_lat: 13, write_tput: 14,
        write_lat: 15, idle_power: 16, idle_scale: 18, active_power: 20, active_work_scale: 22,
    });
}

#[test]
fn identify_namespace_layout() {
    offsets!(IdentifyNamespace, size 4096, {
        nsze: 0, ncap: 8, nuse: 16, nsfeat: 24, nlbaf: 25, flbas: 26, mc: 27, dpc: 28, dps: 29, nmic: 30,
        rescap: 31, fpi: 32, dlfeat: 33, nawun: 34, nawupf: 36, nacwu: 38, nabsn: 40, nabo: 42, nabspf: 44,
        noiob: 46, nvmcap: 48, npwg: 64, npwa: 66, npdg: 68, npda: 70, nows: 72, anagrpid: 92, nsattr: 99,
        nvmsetid: 100, endgid: 102, nguid: 104, eui64: 120, lbaf: 128, vendor: 384,
    });
    offsets!(LbaFormat, size 4, { ms: 0, ds: 2, rp: 3 });
}

#[test]
fn log_page_layouts() {
    offsets!(ErrorLogEntry, size 64, {
        error_count: 0, sqid: 8, cmdid: 10, status_field: 12, param_error_location: 14, lba: 16, nsid: 24,
        vendor: 28, trtype: 29, command_specific: 32, transport_specific: 40,
    });
    offsets!(SmartLog, size 512, {
        critical_warning: 0, temperature: 1, available_spare: 3, available_spare_threshold: 4,
        percentage_used: 5, endurance_group_critical_warning: 6, data_units_read: 32, data_units_written: 48,
        host_read_commands: 64, host_write_commands: 80, controller_busy_time: 96, power_cycles: 112,
        power_on_hours: 128, unsafe_shutdowns: 144, media_errors: 160, error_log_entries: 176,
        warning_temp_time: 192, critical_temp_time: 196, temp_sensor: 200, thermal_mgmt_temp1_transitions: 216,
        thermal_mgmt_temp2_transitions: 220, thermal_mgmt_temp1_time: 224, thermal_mgmt_temp2_time: 228,
    });
    offsets!(FirmwareSlotLog, size 512, { afi: 0, frs: 8, reserved64: 64 });
    offsets!(CommandEffectsLog, size 4096, { admin: 0, io: 1024, reserved: 2048 });
}

#[test]
fn discovery_layouts() {
    offsets!(DiscoveryLogHeader, size 1024, { genctr: 0, numrec: 8, recfmt: 16 });
    offsets!(DiscoveryLogEntryRaw, size 1024, {
        trtype: 0, adrfam: 1, subtype: 2, treq: 3, portid: 4, cntlid: 6, asqsz: 8, eflags: 10, trsvcid: 32,
        subnqn: 256, traddr: 512, tsas: 768,
    });
    offsets!(RdmaTsas, size 256, { qptype: 0, prtype: 1, cms: 2, pkey: 8 });
    offsets!(DsmRange, size 16, { cattr: 0, nlb: 4, slba: 8 });
}

/// `struct nvme_rdma_cm_req` / `_rep` / `_rej` byte for byte.
#[test]
fn rdma_cm_private_data_bytes() {
    let req = CmRequest { recfmt: 0, qid: 0x0102, hrqsize: 0x0304, hsqsize: 0x0506, cntlid: 0x0708 };
    let mut expected = [0u8; 32];
    expected[..10].copy_from_slice(&[0, 0, 0x02, 0x01, 0x04, 0x03, 0x06, 0x05, 0x08, 0x07]);
    assert_eq!(req.to_bytes(), expected);
    let rep = CmAccept { recfmt: 0, crqsize: 0x0120 };
    assert_eq!(&rep.to_bytes()[..4], &[0, 0, 0x20, 0x01]);
    assert_eq!(rep.to_bytes()[4..], [0; 28]);
    assert_eq!(CmReject::new(CmRejectStatus::InvalidHostRqSize).to_bytes(), [0, 0, 5, 0]);
}

#[rstest]
#[case(CmRejectStatus::InvalidLength, 1)]
#[case(CmRejectStatus::InvalidRecordFormat, 2)]
#[case(CmRejectStatus::InvalidQueueId, 3)]
#[case(CmRejectStatus::InvalidHostSqSize, 4)]
#[case(CmRejectStatus::InvalidHostRqSize, 5)]
#[case(CmRejectStatus::NoResources, 6)]
#[case(CmRejectStatus::InvalidIrd, 7)]
#[case(CmRejectStatus::InvalidOrd, 8)]
fn rdma_cm_reject_codes(#[case] status: CmRejectStatus, #[case] code: u16) {
    let bytes = CmReject::new(status).to_bytes();
    assert_eq!(u16::from_le_bytes([bytes[2], bytes[3]]), code);
    assert_eq!(CmReject::parse(&bytes).unwrap().status, status);
}

fn sqe_bytes(capsule: Capsule) -> [u8; 64] {
    capsule.to_sqe().to_array()
}

#[test]
fn connect_sqe_bytes() {
    let connect = Connect { recfmt: 0, qid: 1, sqsize: 127, cattr: 0x04, kato: 0x0000_1388 };
    let capsule = Capsule {
        command_id: 0x1234,
        data: SglDescriptor::keyed(0x1122_3344_5566_7788, 1024, 0xaabb_ccdd, true).unwrap(),
        command: Command::Fabrics(FabricsCommand::Connect(connect)),
    };
    let b = sqe_bytes(capsule);
    assert_eq!(&b[..5], &[0x7f, 0x40, 0x34, 0x12, 0x01], "opcode, PSDT=SGL, cid, fctype");
    assert_eq!(
        &b[24..40],
        &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0x00, 0x04, 0x00, 0xdd, 0xcc, 0xbb, 0xaa, 0x4f]
    );
    assert_eq!(&b[40..52], &[0, 0, 1, 0, 127, 0, 0x04, 0, 0x88, 0x13, 0, 0], "recfmt, qid, sqsize, cattr, kato");
}

#[test]
fn property_sqe_bytes() {
    let get = Capsule {
        command_id: 1,
        data: SglDescriptor::default(),
        command: Command::Fabrics(FabricsCommand::PropertyGet { property: Property::Cap }),
    };
    let b = sqe_bytes(get);
    assert_eq!((b[4], b[40], &b[44..48]), (0x04, 1, &[0u8, 0, 0, 0][..]), "fctype get, 8 bytes, offset CAP");
    assert_eq!(b[39], 0x40, "keyed, address subtype, zero length: what the Linux host sends");
    let set = Capsule {
        command_id: 2,
        data: SglDescriptor::default(),
        command: Command::Fabrics(FabricsCommand::PropertySet { property: Property::Cc, value: 0x0046_0061 }),
    };
    let b = sqe_bytes(set);
    assert_eq!(
        (b[4], b[40], &b[44..48], &b[48..56]),
        (0x00, 0, &[0x14u8, 0, 0, 0][..], &[0x61u8, 0, 0x46, 0, 0, 0, 0, 0][..])
    );
}

#[test]
fn admin_sqe_bytes() {
    let glp = GetLogPage {
        nsid: 0xffff_ffff,
        lid: 0x0c,
        lsp: 1,
        rae: true,
        numd: 0x0001_0803,
        lsi: 0x0203,
        offset: 0x1_0000_0010,
        uuid_index: 5,
        csi: 2,
    };
    let b = sqe_bytes(Capsule {
        command_id: 0,
        data: SglDescriptor::default(),
        command: Command::Admin(AdminCommand::GetLogPage(glp)),
    });
    assert_eq!(b[0], 0x02);
    assert_eq!(&b[4..8], &[0xff; 4]);
    assert_eq!(&b[40..60], &[0x0c, 0x81, 0x03, 0x08, 0x01, 0x00, 0x03, 0x02, 0x10, 0, 0, 0, 1, 0, 0, 0, 5, 0, 0, 2]);
    assert_eq!(glp.data_len(), (0x0001_0803 + 1) * 4);

    let id = Identify { nsid: 1, cns: 0x03, cntid: 0x0102, cnssid: 0, csi: 0 };
    let b = sqe_bytes(Capsule {
        command_id: 0,
        data: SglDescriptor::default(),
        command: Command::Admin(AdminCommand::Identify(id)),
    });
    assert_eq!((b[0], &b[40..44]), (0x06, &[0x03u8, 0, 0x02, 0x01][..]));

    let sf = SetFeatures { nsid: 0, save: true, feature: Feature::NumberOfQueues(NumberOfQueues { nsqr: 3, ncqr: 7 }) };
    let b = sqe_bytes(Capsule {
        command_id: 0,
        data: SglDescriptor::default(),
        command: Command::Admin(AdminCommand::SetFeatures(sf)),
    });
    assert_eq!((b[0], &b[40..48]), (0x09, &[0x07u8, 0, 0, 0x80, 3, 0, 7, 0][..]));

    for (cmd, opcode) in [(AdminCommand::KeepAlive, 0x18), (AdminCommand::AsyncEventRequest, 0x0c)] {
        assert_eq!(
            sqe_bytes(Capsule { command_id: 0, data: SglDescriptor::default(), command: Command::Admin(cmd) })[0],
            opcode
        );
    }
}

#[test]
fn io_sqe_bytes() {
    let rw = ReadWrite { nsid: 1, slba: 0x0102_0304_0506_0708, nlb: 255, control: 0x4000, dsmgmt: 0x11 };
    let b = sqe_bytes(Capsule {
        command_id: 7,
        data: SglDescriptor::in_capsule(0, 4096),
        command: Command::Io(IoCommand::Write(rw)),
    });
    assert_eq!(b[0], 0x01);
    assert_eq!(&b[24..40], &[0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x10, 0, 0, 0, 0, 0, 0x01], "in-capsule SGL");
    assert_eq!(&b[40..56], &[8, 7, 6, 5, 4, 3, 2, 1, 255, 0, 0x00, 0x40, 0x11, 0, 0, 0], "slba, nlb, FUA, dsm");
    let read =
        sqe_bytes(Capsule { command_id: 7, data: SglDescriptor::default(), command: Command::Io(IoCommand::Read(rw)) });
    assert_eq!(read[0], 0x02);
    let dsm = nvme_proto::io::DatasetManagement { nsid: 1, nr: 1, attributes: nvme_proto::io::dsm_attribute::AD };
    let b = sqe_bytes(Capsule {
        command_id: 0,
        data: SglDescriptor::in_capsule(0, 32),
        command: Command::Io(IoCommand::DatasetManagement(dsm)),
    });
    assert_eq!((b[0], &b[40..48]), (0x09, &[1u8, 0, 0, 0, 4, 0, 0, 0][..]));
    let b = sqe_bytes(Capsule {
        command_id: 0,
        data: SglDescriptor::default(),
        command: Command::Io(IoCommand::WriteZeroes(ReadWrite { control: 1 << 9, ..rw })),
    });
    assert_eq!((b[0], b[51]), (0x08, 0x02), "write zeroes, DEAC = CDW12 bit 25");
    assert_eq!(
        sqe_bytes(Capsule {
            command_id: 0,
            data: SglDescriptor::default(),
            command: Command::Io(IoCommand::Flush { nsid: 1 })
        })[0],
        0x00
    );
}

#[test]
fn cqe_status_bits() {
    let cqe = Cqe::new(0x1000, 0, 5, Status::CONNECT_INVALID_PARAMETERS.with_dnr(), 0x0001_0100);
    let b = cqe.to_array();
    assert_eq!(&b, &[0x00, 0x01, 0x01, 0x00, 0, 0, 0, 0, 5, 0, 0, 0, 0x00, 0x10, 0x04, 0x83]);
    assert_eq!(Cqe::new(1, 1, 1, Status::LBA_OUT_OF_RANGE, 0).status_phase.get(), 0x80 << 1);
    assert_eq!(Status::SGL_INVALID_TYPE.with_dnr().raw(), 0x4011);
    assert_eq!(Status::ANA_INACCESSIBLE.raw(), 0x302);
}

#[test]
fn register_bits() {
    // Values from nvmet (CAP 0x000008200f00007f: MQES 127, TO 15, CSS NVM + I/O command sets).
    let cap = Cap(0).set_mqes(127).and_then(|c| c.set_to(15)).and_then(|c| c.set_css(0x41)).unwrap();
    assert_eq!(cap.0, 0x0000_0820_0f00_007f);
    let cc =
        Cc(0).set_en(1).and_then(|c| c.set_css(6)).and_then(|c| c.set_iosqes(6)).and_then(|c| c.set_iocqes(4)).unwrap();
    assert_eq!(cc.0, 0x0046_0061);
    assert_eq!(cc.set_shn(1).unwrap().0, 0x0046_4061);
    assert_eq!(Csts(0).set_shst(2).unwrap().0, 0x8);
    assert_eq!(Csts(0).set_rdy(1).and_then(|c| c.set_cfs(1)).unwrap().0, 0x3);
    assert_eq!(Vs::new(1, 3, 0).0, 0x0001_0300);
    assert_eq!(Cc(0).set_iosqes(16), None, "too wide for 4 bits: refused, not truncated");
    assert_eq!(
        [Property::Cap, Property::Vs, Property::Cc, Property::Csts, Property::Nssr].map(|p| p.offset()),
        [0, 8, 0x14, 0x1c, 0x20]
    );
    assert_eq!(nvme_proto::property::NSSR_RESET.to_be_bytes(), *b"NVMe");
}

#[test]
fn aer_completion_dword() {
    assert_eq!(AsyncEvent::NAMESPACE_CHANGED.to_dword(), 0x0004_0002);
    assert_eq!(AsyncEvent::ANA_CHANGED.to_dword(), 0x000c_0302);
    assert_eq!(AsyncEvent::DISCOVERY_CHANGED.to_dword(), 0x0070_f002);
    let e = AsyncEvent::from_dword(0x0002_0101);
    assert_eq!((e.kind, e.info, e.log_page), (AsyncEventType::SmartHealth, 1, 2));
}

#[test]
fn sgl_descriptor_bytes() {
    let keyed = SglDescriptor::keyed(0xffff_8880_0681_f400, 0x0010_0000, 0x0000_0395, false).unwrap();
    assert_eq!(
        keyed.to_bytes(),
        [0x00, 0xf4, 0x81, 0x06, 0x80, 0x88, 0xff, 0xff, 0x00, 0x00, 0x10, 0x95, 0x03, 0, 0, 0x40]
    );
    assert_eq!(SglDescriptor::Segment { address: 1, length: 16, last: true }.to_bytes()[15], 0x30);
    assert_eq!(SglDescriptor::Segment { address: 1, length: 16, last: false }.to_bytes()[15], 0x20);
    assert!(SglDescriptor::keyed(0, 0x0100_0000, 0, false).is_err(), "25-bit length refused");
}

/// Set / Get Features CDW10 / CDW11 as Linux nvme_set_features / nvme_get_features send them.
#[rstest]
#[case(Feature::VolatileWriteCache { enabled: true }, 0x06, 0x0000_0001)]
#[case(Feature::NumberOfQueues(NumberOfQueues { nsqr: 0x10, ncqr: 0x20 }), 0x07, 0x0020_0010)]
#[case(Feature::AsyncEventConfig(0x8000_0900), 0x0b, 0x8000_0900)]
#[case(Feature::KeepAliveTimer { kato_ms: 5000 }, 0x0f, 5000)]
#[case(Feature::HostIdentifier { extended: true }, 0x81, 0x0000_0001)]
fn feature_dwords(#[case] feature: Feature, #[case] fid: u8, #[case] cdw11: u32) {
    let set = SetFeatures { nsid: 0, save: false, feature };
    let b = sqe_bytes(Capsule {
        command_id: 0,
        data: SglDescriptor::default(),
        command: Command::Admin(AdminCommand::SetFeatures(set)),
    });
    assert_eq!((b[0], b[40], &b[41..44]), (0x09, fid, &[0u8, 0, 0][..]));
    assert_eq!(&b[44..48], &cdw11.to_le_bytes());
    let get =
        nvme_proto::command::GetFeatures { nsid: 0, fid, select: nvme_proto::features::FeatureSelect::Saved, cdw11: 1 };
    let b = sqe_bytes(Capsule {
        command_id: 0,
        data: SglDescriptor::default(),
        command: Command::Admin(AdminCommand::GetFeatures(get)),
    });
    assert_eq!((b[0], b[40], b[41], b[44]), (0x0a, fid, 0x02, 1), "SEL in CDW10 bits 10:8");
}
