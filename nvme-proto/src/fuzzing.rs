//! Fuzz harnesses: one per parser family, shared by the cargo-fuzz targets in `nvme-proto/fuzz/` and by the
//! corpus replay in the normal test run.
//!
//! Each harness feeds untrusted bytes to a parser. The parser may refuse them (that is its job); it must never
//! panic, and whatever it accepts must survive encode → decode unchanged. A panic here is a finding.

use crate::command::{Capsule, QueueKind};
use crate::cqe::Cqe;
use crate::discovery::DiscoveryLog;
use crate::fabrics::ConnectData;
use crate::identify::{IdentifyController, IdentifyNamespace, NamespaceIdList, NamespaceList};
use crate::io::DsmRange;
use crate::log_page::{AnaLog, CommandEffectsLog, ErrorLogEntry, FirmwareSlotLog, SmartLog};
use crate::nqn::{self, Nqn};
use crate::property::{Cap, Cc, Csts, Property, PropertySize, Vs};
use crate::rdma_cm::{CmAccept, CmReject, CmRequest};
use crate::sgl::SglDescriptor;
use crate::sqe::Sqe;
use crate::{text, uuid::Uuid};
use zerocopy::IntoBytes;

/// A fuzz target: its name (the cargo-fuzz target and corpus directory) and harness.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

pub const TARGETS: &[Target] = &[
    Target { name: "capsule", run: capsule },
    Target { name: "cqe", run: cqe },
    Target { name: "sgl", run: sgl },
    Target { name: "connect_data", run: connect_data },
    Target { name: "rdma_cm", run: rdma_cm },
    Target { name: "identify", run: identify },
    Target { name: "log_page", run: log_page },
    Target { name: "discovery_log", run: discovery_log },
    Target { name: "dsm_ranges", run: dsm_ranges },
    Target { name: "names", run: names },
    Target { name: "property", run: property },
];

/// First byte selects the queue kind (even: admin, odd: I/O); the rest is the SQE.
pub fn capsule(data: &[u8]) {
    let Some((&selector, sqe)) = data.split_first() else {
        return;
    };
    let queue = if selector & 1 == 0 { QueueKind::Admin } else { QueueKind::Io };
    if let Ok(capsule) = Capsule::parse_bytes(sqe, queue) {
        let again = Capsule::parse(&capsule.to_sqe(), queue).expect("re-encoded capsule decodes");
        assert_eq!(again, capsule);
    }
    if let Ok(raw) = Sqe::parse(sqe) {
        assert_eq!(raw.as_bytes(), sqe);
        let _ = (raw.fctype(), raw.psdt(), raw.fuse(), (0..=16).fold(0u32, |a, n| a ^ raw.cdw(n).unwrap_or(0)));
    }
}

pub fn cqe(data: &[u8]) {
    if let Ok(c) = Cqe::parse(data) {
        let rebuilt = Cqe::new(c.command_id(), c.sq_id.get(), c.sq_head.get(), c.status(), c.result());
        let mut expected = *c;
        expected.status_phase = (c.status_phase.get() & !1).into();
        assert_eq!(rebuilt, expected);
        let _ = c.status().name(crate::status::CommandSet::Fabrics);
    }
}

pub fn sgl(data: &[u8]) {
    if let Ok(d) = SglDescriptor::parse(data) {
        assert_eq!(SglDescriptor::parse(&d.to_bytes()), Ok(d));
    }
}

pub fn connect_data(data: &[u8]) {
    if let Ok(d) = ConnectData::parse(data) {
        let bytes = d.to_bytes().expect("decoded connect data re-encodes");
        assert_eq!(ConnectData::parse(&bytes).as_ref(), Ok(&d));
    }
}

/// First byte selects request, accept or reject.
pub fn rdma_cm(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => {
            if let Ok(r) = CmRequest::parse(rest) {
                assert_eq!(CmRequest::parse(&r.to_bytes()), Ok(r));
            }
        }
        1 => {
            if let Ok(a) = CmAccept::parse(rest) {
                assert_eq!(CmAccept::parse(&a.to_bytes()), Ok(a));
            }
        }
        _ => {
            if let Ok(j) = CmReject::parse(rest) {
                assert_eq!(CmReject::parse(&j.to_bytes()), Ok(j));
            }
        }
    }
}

/// First byte selects the Identify structure (CNS 0, 1, 2, 3).
pub fn identify(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 4 {
        0 => {
            if let Ok(ns) = IdentifyNamespace::parse(rest) {
                let _ = (ns.format_index(), ns.lba_format(), ns.block_size(), format!("{ns:?}"));
            }
        }
        1 => {
            if let Ok(c) = IdentifyController::parse(rest) {
                let _ = (c.serial(), c.model(), c.firmware(), c.subnqn(), format!("{c:?}"));
                let _ = (c.max_transfer_bytes(4096), c.in_capsule_data_size());
                let mut copy = *c;
                if let (Ok(sn), Ok(mn)) = (c.serial().map(str::to_owned), c.model().map(str::to_owned)) {
                    copy.set_serial(&sn).expect("decoded serial re-encodes");
                    copy.set_model(&mn).expect("decoded model re-encodes");
                    assert_eq!(copy.serial(), Ok(sn.as_str()));
                }
            }
        }
        2 => {
            if let Ok(list) = NamespaceList::parse(rest) {
                assert_eq!(list.to_bytes().expect("decoded list re-encodes").as_slice(), rest);
            }
        }
        _ => {
            if let Ok(list) = NamespaceIdList::parse(rest) {
                let bytes = list.to_bytes().expect("decoded descriptors re-encode");
                assert_eq!(NamespaceIdList::parse(&bytes), Ok(list));
            }
        }
    }
}

/// First byte selects the log page (error, SMART, firmware slot, effects, ANA).
pub fn log_page(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 5 {
        0 => {
            if let Ok(entries) = ErrorLogEntry::parse_list(rest) {
                assert_eq!(entries.as_bytes(), rest);
                for e in entries {
                    let _ = e.status();
                }
            }
        }
        1 => {
            if let Ok(s) = SmartLog::parse(rest) {
                assert_eq!(s.as_bytes(), rest);
            }
        }
        2 => {
            if let Ok(f) = FirmwareSlotLog::parse(rest) {
                for slot in 0..9 {
                    let _ = f.revision(slot);
                }
                let _ = f.active_slot();
            }
        }
        3 => {
            if let Ok(e) = CommandEffectsLog::parse(rest) {
                assert_eq!(e.as_bytes(), rest);
            }
        }
        _ => {
            if let Ok(ana) = AnaLog::parse(rest) {
                let bytes = ana.to_bytes().expect("decoded ANA log re-encodes");
                assert_eq!(bytes.len(), ana.encoded_len());
                assert_eq!(AnaLog::parse(&bytes).as_ref(), Ok(&ana));
            }
        }
    }
}

pub fn discovery_log(data: &[u8]) {
    if let Ok(log) = DiscoveryLog::parse(data) {
        let bytes = log.to_bytes().expect("decoded discovery log re-encodes");
        let again = DiscoveryLog::parse(&bytes).expect("re-encoded discovery log decodes");
        assert_eq!(again.entries, log.entries);
        assert!(again.is_complete());
    }
}

/// First byte is the 0's based range count.
pub fn dsm_ranges(data: &[u8]) {
    let Some((&nr, rest)) = data.split_first() else {
        return;
    };
    if let Ok(ranges) = DsmRange::parse_list(rest, nr as usize + 1) {
        assert_eq!(ranges.len(), nr as usize + 1);
        assert_eq!(DsmRange::list_to_bytes(&ranges).as_slice(), &rest[..ranges.len() * 16]);
    }
}

/// NQNs, UUIDs and padded text.
pub fn names(data: &[u8]) {
    if let Ok(name) = nqn::read_wire("NQN", data) {
        let mut field = [0u8; nqn::NQN_FIELD_LEN];
        nqn::write_wire("NQN", &mut field, name).expect("decoded NQN re-encodes");
        assert_eq!(nqn::read_wire("NQN", &field), Ok(name));
        if let Ok(strict) = Nqn::new(name) {
            assert_eq!(nqn::read_wire("NQN", &strict.to_wire()), Ok(name));
        }
    }
    if let Ok(text) = core::str::from_utf8(data) {
        if let Ok(u) = Uuid::parse(text) {
            assert_eq!(Uuid::parse(&u.to_string()), Ok(u));
        }
        let _ = Nqn::new(text);
    }
    if let Ok(t) = text::read_padded("text", data) {
        let mut field = vec![0u8; data.len()];
        text::write_padded("text", &mut field, t, b' ').expect("decoded text re-encodes");
        assert_eq!(text::read_padded("text", &field), Ok(t));
    }
}

/// Property offsets/sizes and register fields: first 4 bytes offset, next byte attrib, then a value.
pub fn property(data: &[u8]) {
    if data.len() < 13 {
        return;
    }
    let offset = u32::from_le_bytes(data[0..4].try_into().expect("4 bytes"));
    let size = PropertySize::from_attrib(data[4]);
    if let Ok(p) = Property::from_wire(offset, size) {
        assert_eq!((p.offset(), p.size()), (offset, size));
    }
    let value = u64::from_le_bytes(data[5..13].try_into().expect("8 bytes"));
    let cap = Cap(value);
    let rebuilt = Cap(0)
        .set_mqes(cap.mqes())
        .and_then(|c| c.set_to(cap.to()))
        .and_then(|c| c.set_css(cap.css()))
        .expect("decoded fields fit");
    assert_eq!((rebuilt.mqes(), rebuilt.to(), rebuilt.css()), (cap.mqes(), cap.to(), cap.css()));
    let (cc, csts, vs) = (Cc(value as u32), Csts(value as u32), Vs(value as u32));
    let _ = (cc.shutdown(), cc.enabled(), csts.shutdown(), csts.ready(), vs.major());
    assert_eq!(Cc(0).set_iosqes(cc.iosqes()).map(|c| c.iosqes()), Some(cc.iosqes()));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file of every target's corpus (seeded from the kernel captures, grown by fuzzing) replays clean.
    #[test]
    fn corpus_replay() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let mut total = 0;
        for target in TARGETS {
            let dir = root.join(target.name);
            let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
            let mut count = 0;
            for entry in entries {
                let path = entry.expect("corpus entry").path();
                let data = std::fs::read(&path).expect("corpus file");
                let outcome = std::panic::catch_unwind(|| (target.run)(&data));
                assert!(outcome.is_ok(), "{} panicked on {}", target.name, path.display());
                count += 1;
            }
            assert!(count > 0, "corpus for {} is empty", target.name);
            total += count;
        }
        assert!(total >= TARGETS.len());
    }

    /// Bytes no parser should like still must not panic anything.
    #[test]
    fn harnesses_survive_edge_inputs() {
        let inputs: [&[u8]; 6] = [&[], &[0], &[0xff; 65], &[0; 4097], &[0xff; 4097], &[0x41; 300]];
        for target in TARGETS {
            for input in inputs {
                (target.run)(input);
            }
        }
    }
}
