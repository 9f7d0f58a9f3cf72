//! Fabrics commands: Connect (creating a controller on the admin queue, joining one on an I/O queue) and
//! Property Get / Set (the CAP / VS / CC / CSTS registers, with enable and shutdown). Checks and statuses follow
//! Linux `drivers/nvme/target/fabrics-cmd.c`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use nvme_proto::fabrics::{
    CNTLID_DYNAMIC, Connect, ConnectData, ConnectParameter, invalid_parameter_result, offset as connect_offset,
};
use nvme_proto::property::{Cap, Cc, Csts, Property, Vs, css};
use nvme_proto::{Status, nqn};

use crate::controller::{Controller, ControllerCounters, ControllerId, ControllerKind, QueueRef};
use crate::core::Target;
use crate::subsystem::Subsystem;

/// How long a discovery controller lives without keep-alives when the host asks for none (Linux
/// `NVMET_DISC_KATO_MS`).
pub const DISCOVERY_KATO: Duration = Duration::from_secs(120);

/// A refused Connect: its status and CQE DW0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectFailure {
    pub status: Status,
    pub result: u32,
}

impl ConnectFailure {
    fn invalid(parameter: ConnectParameter) -> ConnectFailure {
        ConnectFailure {
            status: Status::CONNECT_INVALID_PARAMETERS.with_dnr(),
            result: invalid_parameter_result(parameter),
        }
    }
    fn status(status: Status) -> ConnectFailure {
        ConnectFailure { status, result: 0 }
    }
}

/// The admin queue's view of its new controller.
#[derive(Debug, Clone)]
pub struct AdminBinding {
    pub ctrl: ControllerId,
    pub kind: ControllerKind,
    pub kato: Option<Duration>,
    pub counters: Arc<ControllerCounters>,
}

/// An I/O queue's view of the controller it joined.
#[derive(Debug, Clone)]
pub struct IoBinding {
    pub ctrl: ControllerId,
    pub subsystem: Arc<Subsystem>,
    pub counters: Arc<ControllerCounters>,
}

impl Target {
    pub fn cap(&self) -> Cap {
        let cap = Cap(0).set_mqes(self.limits.max_queue_depth - 1).and_then(|c| c.set_cqr(1));
        let cap = cap.and_then(|c| c.set_to(15)).and_then(|c| c.set_css(css::NVM));
        cap.expect("constant fields fit")
    }

    /// Connect on an admin queue of `depth` entries: a new controller.
    pub fn connect_admin(
        &self,
        connect: &Connect,
        data: &ConnectData,
        queue: QueueRef,
        depth: u16,
    ) -> Result<AdminBinding, ConnectFailure> {
        if connect.sqsize == 0 || connect.sqsize >= depth.min(self.limits.max_admin_depth) {
            return Err(ConnectFailure::invalid(ConnectParameter::Command(connect_offset::CONNECT_SQSIZE as u16)));
        }
        if data.cntlid != CNTLID_DYNAMIC {
            return Err(ConnectFailure::invalid(ConnectParameter::Data(connect_offset::DATA_CNTLID as u16)));
        }
        let (kind, subsystem) = if data.subnqn == nqn::DISCOVERY_NQN {
            (ControllerKind::Discovery, None)
        } else {
            let Some(s) = self.subsystem(&data.subnqn) else {
                tracing::warn!(subnqn = %data.subnqn, hostnqn = %data.hostnqn, "connect to an unknown subsystem");
                return Err(ConnectFailure::invalid(ConnectParameter::Data(connect_offset::DATA_SUBNQN as u16)));
            };
            if !s.allows(&data.hostnqn) {
                tracing::warn!(subnqn = %data.subnqn, hostnqn = %data.hostnqn, "host not allowed");
                return Err(ConnectFailure {
                    status: Status::CONNECT_INVALID_HOST.with_dnr(),
                    result: invalid_parameter_result(ConnectParameter::Data(connect_offset::DATA_HOSTNQN as u16)),
                });
            }
            (ControllerKind::Io, Some(s))
        };
        let kato = match (connect.kato, kind) {
            (0, ControllerKind::Discovery) => Some(DISCOVERY_KATO),
            (0, ControllerKind::Io) => None,
            // Round up to the 100 ms granularity we announce (KAS 1).
            (ms, _) => Some(Duration::from_millis(ms.div_ceil(100) as u64 * 100)),
        };
        let mut table = self.table();
        let Some(id) = table.allocate() else {
            return Err(ConnectFailure::status(Status::CONNECT_CONTROLLER_BUSY));
        };
        let counters = Arc::new(ControllerCounters::default());
        let controller = Controller {
            id,
            kind,
            subsystem,
            subnqn: data.subnqn.clone(),
            hostnqn: data.hostnqn.clone(),
            hostid: data.hostid,
            cc: Cc(0),
            csts: Csts(0),
            kato,
            io_queues: if kind == ControllerKind::Io { self.limits.max_io_queues } else { 0 },
            max_io_queues: if kind == ControllerKind::Io { self.limits.max_io_queues } else { 0 },
            async_event_config: 0,
            volatile_write_cache: true,
            admin_queue: queue,
            io_queue_refs: Vec::new(),
            aer_cids: VecDeque::new(),
            pending_events: VecDeque::new(),
            changed_namespaces: Vec::new(),
            namespace_notice_masked: false,
            counters: counters.clone(),
        };
        table.controllers.insert(id.cntlid, controller);
        tracing::info!(cntlid = id.cntlid, subnqn = %data.subnqn, hostnqn = %data.hostnqn, ?kato, "controller created");
        Ok(AdminBinding { ctrl: id, kind, kato, counters })
    }

    /// Connect on I/O queue `connect.qid` of `depth` entries: joins the controller named in the data.
    pub fn connect_io(
        &self,
        connect: &Connect,
        data: &ConnectData,
        queue: QueueRef,
        depth: u16,
    ) -> Result<IoBinding, ConnectFailure> {
        let mut table = self.table();
        let Some(c) = table.controllers.get_mut(&data.cntlid) else {
            return Err(ConnectFailure::invalid(ConnectParameter::Data(connect_offset::DATA_CNTLID as u16)));
        };
        if c.subnqn != data.subnqn || c.hostnqn != data.hostnqn || c.kind != ControllerKind::Io {
            return Err(ConnectFailure::invalid(ConnectParameter::Data(connect_offset::DATA_CNTLID as u16)));
        }
        if !c.is_ready() {
            return Err(ConnectFailure::status(Status::COMMAND_SEQUENCE_ERROR.with_dnr()));
        }
        if connect.qid > c.io_queues {
            tracing::warn!(
                cntlid = c.id.cntlid,
                qid = connect.qid,
                allowed = c.io_queues,
                "qid above the negotiated count"
            );
            return Err(ConnectFailure::invalid(ConnectParameter::Command(connect_offset::CONNECT_QID as u16)));
        }
        if c.io_queue_refs.iter().any(|(qid, _)| *qid == connect.qid) {
            return Err(ConnectFailure::status(Status::COMMAND_SEQUENCE_ERROR.with_dnr()));
        }
        if connect.sqsize == 0 || connect.sqsize >= depth {
            return Err(ConnectFailure::invalid(ConnectParameter::Command(connect_offset::CONNECT_SQSIZE as u16)));
        }
        c.io_queue_refs.push((connect.qid, queue));
        let subsystem = c.subsystem.clone().expect("I/O controllers have a subsystem");
        Ok(IoBinding { ctrl: c.id, subsystem, counters: c.counters.clone() })
    }

    pub fn property_get(&self, ctrl: ControllerId, property: Property) -> Result<u64, Status> {
        let mut table = self.table();
        let c = table.get_mut(ctrl).ok_or(Status::COMMAND_SEQUENCE_ERROR)?;
        Ok(match property {
            Property::Cap => self.cap().0,
            Property::Vs => Vs::V1_3.0 as u64,
            Property::Cc => c.cc.0 as u64,
            Property::Csts => c.csts.0 as u64,
            Property::Nssr => return Err(Status::INVALID_FIELD.with_dnr()),
        })
    }

    /// Property Set: only CC is writable. Enabling with parameters we cannot honour sets CSTS.CFS, as nvmet
    /// does; a shutdown notification flushes the controller's namespaces and reports shutdown complete.
    pub fn property_set(&self, ctrl: ControllerId, property: Property, value: u64) -> Result<(), Status> {
        if property != Property::Cc {
            return Err(Status::INVALID_FIELD.with_dnr());
        }
        let new = Cc(value as u32);
        let mut table = self.table();
        let c = table.get_mut(ctrl).ok_or(Status::COMMAND_SEQUENCE_ERROR)?;
        let old = c.cc;
        c.cc = new;
        if new.enabled() && !old.enabled() {
            let valid = new.iosqes() == 6 && new.iocqes() == 4 && new.mps() == 0 && new.ams() == 0;
            let valid = valid && (new.css() == 0 || c.kind == ControllerKind::Discovery);
            c.csts = if valid {
                Csts(0).set_rdy(1).expect("1 bit")
            } else {
                tracing::warn!(cntlid = ctrl.cntlid, cc = new.0, "CC.EN with unsupported parameters");
                Csts(0).set_cfs(1).expect("1 bit")
            };
        } else if !new.enabled() && old.enabled() {
            c.csts = Csts(0);
            c.aer_cids.clear();
        }
        if new.shn() != 0 && old.shn() == 0 {
            let subsystem = c.subsystem.clone();
            drop(table);
            // Shutdown: make every acknowledged write durable before saying so.
            if let Some(s) = subsystem {
                for ns in s.namespaces() {
                    if let Err(e) = ns.backend.flush() {
                        tracing::error!(nsid = ns.nsid, "flush on shutdown: {e}");
                    }
                }
            }
            let mut table = self.table();
            if let Some(c) = table.get_mut(ctrl) {
                c.csts = c.csts.set_shst(2).expect("2 bits");
                c.csts = c.csts.set_rdy(0).expect("1 bit");
            }
        } else if new.shn() == 0 && old.shn() != 0 {
            c.csts = c.csts.set_shst(0).expect("2 bits");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use nvme_proto::fabrics::{CNTLID_DYNAMIC, ConnectParameter, invalid_parameter_result};
    use nvme_proto::property::{Csts, Property};
    use nvme_proto::{Status, nqn};

    use super::ConnectFailure;
    use crate::controller::QueueRef;
    use crate::core::tests::{ADMIN_Q, HOST, NQN, connect, data, ready, target};

    fn invalid(p: ConnectParameter) -> ConnectFailure {
        ConnectFailure { status: Status::CONNECT_INVALID_PARAMETERS.with_dnr(), result: invalid_parameter_result(p) }
    }

    #[test]
    fn admin_connect_checks_like_nvmet() {
        let (t, _) = target();
        let ok = data(NQN, HOST, CNTLID_DYNAMIC);
        let e = t.connect_admin(&connect(0, 0), &ok, ADMIN_Q, 32).unwrap_err();
        assert_eq!(e, invalid(ConnectParameter::Command(44)));
        let e = t.connect_admin(&connect(0, 32), &ok, ADMIN_Q, 32).unwrap_err();
        assert_eq!(e, invalid(ConnectParameter::Command(44)));
        let e = t.connect_admin(&connect(0, 31), &data(NQN, HOST, 5), ADMIN_Q, 32).unwrap_err();
        assert_eq!(e, invalid(ConnectParameter::Data(16)));
        let e = t.connect_admin(&connect(0, 31), &data("nqn.2026-11.x:nope", HOST, CNTLID_DYNAMIC), ADMIN_Q, 32);
        assert_eq!(e.unwrap_err(), invalid(ConnectParameter::Data(256)));
        let other = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000002";
        let e = t.connect_admin(&connect(0, 31), &data(NQN, other, CNTLID_DYNAMIC), ADMIN_Q, 32).unwrap_err();
        assert_eq!(e.status, Status::CONNECT_INVALID_HOST.with_dnr());
        // The discovery subsystem takes anyone, and has a default keep-alive.
        let d = t.connect_admin(&connect(0, 31), &data(nqn::DISCOVERY_NQN, other, CNTLID_DYNAMIC), ADMIN_Q, 32);
        let mut c = connect(0, 31);
        c.kato = 0;
        assert!(d.is_ok());
        let d = t.connect_admin(&c, &data(nqn::DISCOVERY_NQN, other, CNTLID_DYNAMIC), ADMIN_Q, 32).unwrap();
        assert_eq!(d.kato, Some(super::DISCOVERY_KATO));
    }

    #[test]
    fn io_connect_needs_a_ready_matching_controller_and_a_granted_qid() {
        let (t, _) = target();
        let b = t.connect_admin(&connect(0, 31), &data(NQN, HOST, CNTLID_DYNAMIC), ADMIN_Q, 32).unwrap();
        let q = QueueRef { group: 1, key: 9 };
        // Not enabled yet.
        let e = t.connect_io(&connect(1, 31), &data(NQN, HOST, b.ctrl.cntlid), q, 32).unwrap_err();
        assert_eq!(e.status, Status::COMMAND_SEQUENCE_ERROR.with_dnr());
        t.property_set(b.ctrl, Property::Cc, 0x0046_0001).unwrap();
        let e = t.connect_io(&connect(17, 31), &data(NQN, HOST, b.ctrl.cntlid), q, 32).unwrap_err();
        assert_eq!(e, invalid(ConnectParameter::Command(42)));
        let e = t.connect_io(&connect(1, 31), &data(NQN, HOST, 999), q, 32).unwrap_err();
        assert_eq!(e, invalid(ConnectParameter::Data(16)));
        let other = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000002";
        let e = t.connect_io(&connect(1, 31), &data(NQN, other, b.ctrl.cntlid), q, 32).unwrap_err();
        assert_eq!(e, invalid(ConnectParameter::Data(16)));
        let e = t.connect_io(&connect(1, 32), &data(NQN, HOST, b.ctrl.cntlid), q, 32).unwrap_err();
        assert_eq!(e, invalid(ConnectParameter::Command(44)));
        t.connect_io(&connect(1, 31), &data(NQN, HOST, b.ctrl.cntlid), q, 32).unwrap();
        let e = t.connect_io(&connect(1, 31), &data(NQN, HOST, b.ctrl.cntlid), q, 32).unwrap_err();
        assert_eq!(e.status, Status::COMMAND_SEQUENCE_ERROR.with_dnr(), "the same qid twice");
    }

    #[test]
    fn enable_with_unsupported_parameters_sets_cfs_and_shutdown_completes() {
        let (t, _) = target();
        let b = t.connect_admin(&connect(0, 31), &data(NQN, HOST, CNTLID_DYNAMIC), ADMIN_Q, 32).unwrap();
        t.property_set(b.ctrl, Property::Cc, 0x0047_0001).unwrap(); // IOSQES 7
        assert_eq!(Csts(t.property_get(b.ctrl, Property::Csts).unwrap() as u32).cfs(), 1);
        let ctrl = ready(&t);
        let csts = Csts(t.property_get(ctrl, Property::Csts).unwrap() as u32);
        assert!(csts.ready());
        t.property_set(ctrl, Property::Cc, 0x0046_4001).unwrap(); // SHN normal
        let csts = Csts(t.property_get(ctrl, Property::Csts).unwrap() as u32);
        assert_eq!(csts.shst(), 2);
        assert_eq!(t.property_set(ctrl, Property::Cap, 0), Err(Status::INVALID_FIELD.with_dnr()));
    }
}
