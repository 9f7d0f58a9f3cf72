//! The target's shared core: subsystems, the controller table, the listeners the discovery log advertises,
//! and the hook to the transport binding's queues. Transport-agnostic: queues are [`QueueRef`]s, and the
//! binding is reached only through [`QueueControl`] messages.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use nvme_proto::aer::AsyncEvent;

use crate::backend::{BackendError, BackendSpec};
use crate::controller::{Controller, ControllerId, ControllerKind, QueueRef};
use crate::subsystem::{Namespace, Subsystem, namespace_uuid};

/// How the core asks the transport binding to act on a queue it does not own. Both are messages to the
/// queue's owner; a queue that is gone ignores them.
pub trait QueueControl: Send + Sync {
    /// Tear the queue down (disconnect, drain, destroy).
    fn close(&self, queue: QueueRef, reason: &'static str);
    /// Controller state the queue waits on changed (an asynchronous event is ready).
    fn poke(&self, queue: QueueRef);
}

/// Limits the target offers hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetLimits {
    /// Deepest I/O queue, in commands (CAP.MQES + 1).
    pub max_queue_depth: u16,
    /// Deepest admin queue (Linux hosts ask for 32).
    pub max_admin_depth: u16,
    pub max_io_queues: u16,
    /// In-capsule data a command may carry (IOCCSZ = (64 + this) / 16).
    pub in_capsule_data_size: u32,
    /// Largest transfer of one command (MDTS); a power of two, at least 4 KiB.
    pub max_io_size: u32,
    /// Receives in each poll group's shared receive queue (one per group and listener, soft provider): the
    /// capsules a group holds at once across all its queues; beyond it a host waits out an RNR NAK.
    pub srq_depth: u32,
}

impl Default for TargetLimits {
    fn default() -> Self {
        TargetLimits {
            max_queue_depth: 128,
            max_admin_depth: 32,
            max_io_queues: 16,
            in_capsule_data_size: 4096,
            max_io_size: 128 * 1024,
            srq_depth: 1024,
        }
    }
}

impl TargetLimits {
    /// Bytes of one capsule receive buffer: the SQE and the in-capsule data it may carry.
    pub fn capsule_bytes(&self) -> usize {
        64 + self.in_capsule_data_size as usize
    }

    /// MDTS in units of the 4 KiB minimum page.
    pub fn mdts(&self) -> u8 {
        (self.max_io_size / 4096).trailing_zeros() as u8
    }
}

/// A listener as the discovery log shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    pub portid: u16,
    pub addr: IpAddr,
    pub trsvcid: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigureError {
    #[error("subsystem {0} already exists")]
    DuplicateSubsystem(String),
    #[error("no subsystem {0}")]
    UnknownSubsystem(String),
    #[error("subsystem {subnqn}: namespace {nsid} already exists or is not a valid NSID")]
    DuplicateNamespace { subnqn: String, nsid: u32 },
    #[error("subsystem {subnqn}: no namespace {nsid}")]
    UnknownNamespace { subnqn: String, nsid: u32 },
    #[error("subsystem {subnqn} namespace {nsid}: {source}")]
    Backend { subnqn: String, nsid: u32, source: BackendError },
}

#[derive(Debug, Default)]
pub(crate) struct ControllerTable {
    pub(crate) controllers: HashMap<u16, Controller>,
    next_cntlid: u16,
    next_generation: u64,
}

impl ControllerTable {
    /// A free controller id (1..=0xFFEF) and a fresh generation.
    pub(crate) fn allocate(&mut self) -> Option<ControllerId> {
        for _ in 0..0xffef {
            self.next_cntlid = if self.next_cntlid >= 0xffef { 1 } else { self.next_cntlid + 1 };
            if !self.controllers.contains_key(&self.next_cntlid) {
                self.next_generation += 1;
                return Some(ControllerId { cntlid: self.next_cntlid, generation: self.next_generation });
            }
        }
        None
    }

    pub(crate) fn get_mut(&mut self, id: ControllerId) -> Option<&mut Controller> {
        self.controllers.get_mut(&id.cntlid).filter(|c| c.id == id)
    }
}

/// Counts for stats.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ControllerStats {
    pub cntlid: u16,
    pub kind: &'static str,
    pub subnqn: String,
    pub hostnqn: String,
    pub io_queues: usize,
    pub read_commands: u64,
    pub write_commands: u64,
    pub other_io_commands: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
}

pub struct Target {
    pub limits: TargetLimits,
    subsystems: RwLock<BTreeMap<String, Arc<Subsystem>>>,
    ports: RwLock<Vec<PortInfo>>,
    /// Discovery log generation counter: bumped on every change the log shows.
    genctr: AtomicU64,
    controllers: Mutex<ControllerTable>,
    queues: Arc<dyn QueueControl>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl Target {
    pub fn new(limits: TargetLimits, queues: Arc<dyn QueueControl>) -> Target {
        Target {
            limits,
            subsystems: RwLock::new(BTreeMap::new()),
            ports: RwLock::new(Vec::new()),
            genctr: AtomicU64::new(1),
            controllers: Mutex::new(ControllerTable::default()),
            queues,
        }
    }

    pub(crate) fn table(&self) -> MutexGuard<'_, ControllerTable> {
        self.controllers.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn genctr(&self) -> u64 {
        self.genctr.load(Ordering::Relaxed)
    }

    fn discovery_changed(&self) {
        self.genctr.fetch_add(1, Ordering::Relaxed);
        let mut table = self.table();
        for c in table.controllers.values_mut() {
            let enabled = c.async_event_config & nvme_proto::features::async_event_config::DISCOVERY_LOG_CHANGE != 0;
            if c.kind == ControllerKind::Discovery && enabled {
                c.pending_events.push_back(AsyncEvent::DISCOVERY_CHANGED);
                self.queues.poke(c.admin_queue);
            }
        }
    }

    pub fn add_subsystem(&self, subsystem: Subsystem) -> Result<Arc<Subsystem>, ConfigureError> {
        let mut map = self.subsystems.write().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&subsystem.nqn) || subsystem.nqn == nvme_proto::nqn::DISCOVERY_NQN {
            return Err(ConfigureError::DuplicateSubsystem(subsystem.nqn));
        }
        let subsystem = Arc::new(subsystem);
        map.insert(subsystem.nqn.clone(), subsystem.clone());
        drop(map);
        self.discovery_changed();
        Ok(subsystem)
    }

    pub fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        self.subsystems.read().unwrap_or_else(|p| p.into_inner()).get(nqn).cloned()
    }

    pub fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        self.subsystems.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Opens the backend and adds the namespace; connected controllers of the subsystem get a
    /// namespace-changed notice.
    pub fn add_namespace(&self, subnqn: &str, nsid: u32, spec: &BackendSpec) -> Result<(), ConfigureError> {
        let subsystem = self.subsystem(subnqn).ok_or_else(|| ConfigureError::UnknownSubsystem(subnqn.into()))?;
        let backend = spec.open().map_err(|source| ConfigureError::Backend { subnqn: subnqn.into(), nsid, source })?;
        let uuid = namespace_uuid(subnqn, nsid);
        let ns = Namespace { nsid, backend, uuid, nguid: *uuid.as_bytes() };
        if !subsystem.insert(ns) {
            return Err(ConfigureError::DuplicateNamespace { subnqn: subnqn.into(), nsid });
        }
        self.namespace_changed(subnqn, nsid);
        Ok(())
    }

    pub fn remove_namespace(&self, subnqn: &str, nsid: u32) -> Result<(), ConfigureError> {
        let subsystem = self.subsystem(subnqn).ok_or_else(|| ConfigureError::UnknownSubsystem(subnqn.into()))?;
        subsystem.remove(nsid).ok_or_else(|| ConfigureError::UnknownNamespace { subnqn: subnqn.into(), nsid })?;
        self.namespace_changed(subnqn, nsid);
        Ok(())
    }

    fn namespace_changed(&self, subnqn: &str, nsid: u32) {
        let mut table = self.table();
        for c in table.controllers.values_mut().filter(|c| c.subnqn == subnqn) {
            c.queue_namespace_notice(nsid);
            self.queues.poke(c.admin_queue);
        }
    }

    pub fn add_port(&self, port: PortInfo) {
        self.ports.write().unwrap_or_else(|p| p.into_inner()).push(port);
        self.discovery_changed();
    }

    pub fn ports(&self) -> Vec<PortInfo> {
        self.ports.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Flushes every namespace of every subsystem (shutdown).
    pub fn flush_all(&self) -> std::io::Result<()> {
        let mut first_error = None;
        for s in self.subsystems() {
            for ns in s.namespaces() {
                if let Err(e) = ns.backend.flush() {
                    tracing::error!(subnqn = %s.nqn, nsid = ns.nsid, "flush: {e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// A queue went away. The admin queue takes its controller with it (and the controller's I/O queues are told
    /// to close); an I/O queue just leaves its controller. Safe to call twice or for a stale controller.
    pub fn queue_closed(&self, ctrl: ControllerId, queue: QueueRef) {
        let mut table = self.table();
        let Some(c) = table.get_mut(ctrl) else { return };
        if c.admin_queue == queue {
            let c = table.controllers.remove(&ctrl.cntlid).expect("present");
            drop(table);
            tracing::info!(cntlid = ctrl.cntlid, subnqn = %c.subnqn, hostnqn = %c.hostnqn, "controller removed");
            for (_, q) in c.io_queue_refs {
                self.queues.close(q, "controller removed");
            }
        } else {
            c.io_queue_refs.retain(|(_, q)| *q != queue);
        }
    }

    /// Tears a controller down: its admin queue closes, which removes it and closes the rest.
    pub fn controller_fatal(&self, ctrl: ControllerId, reason: &'static str) {
        let table = self.table();
        let Some(c) = table.controllers.get(&ctrl.cntlid).filter(|c| c.id == ctrl) else { return };
        tracing::warn!(cntlid = ctrl.cntlid, hostnqn = %c.hostnqn, "controller fatal: {reason}");
        let admin = c.admin_queue;
        drop(table);
        self.queues.close(admin, reason);
    }

    pub fn controller_count(&self) -> usize {
        self.table().controllers.len()
    }

    pub fn controller_stats(&self) -> Vec<ControllerStats> {
        let table = self.table();
        let mut out: Vec<ControllerStats> = table
            .controllers
            .values()
            .map(|c| ControllerStats {
                cntlid: c.id.cntlid,
                kind: match c.kind {
                    ControllerKind::Io => "io",
                    ControllerKind::Discovery => "discovery",
                },
                subnqn: c.subnqn.clone(),
                hostnqn: c.hostnqn.clone(),
                io_queues: c.io_queue_refs.len(),
                read_commands: c.counters.read_commands.load(Ordering::Relaxed),
                write_commands: c.counters.write_commands.load(Ordering::Relaxed),
                other_io_commands: c.counters.other_io_commands.load(Ordering::Relaxed),
                bytes_read: c.counters.bytes_read.load(Ordering::Relaxed),
                bytes_written: c.counters.bytes_written.load(Ordering::Relaxed),
                errors: c.counters.errors.load(Ordering::Relaxed),
            })
            .collect();
        out.sort_by_key(|c| c.cntlid);
        out
    }

    /// A subsystem's serial-number default: derived from its NQN.
    pub fn default_serial(nqn: &str) -> String {
        let u = namespace_uuid(nqn, 0);
        u.as_bytes()[..10].iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The core without a transport: queues are refs, and a recording [`QueueControl`] shows what the core
    //! asked the binding to do.
    use std::sync::Mutex;

    use nvme_proto::Uuid;
    use nvme_proto::fabrics::{CNTLID_DYNAMIC, Connect, ConnectData};

    use super::*;
    use crate::backend::BackendSpec;

    #[derive(Default)]
    pub(crate) struct Recorder {
        pub closed: Mutex<Vec<QueueRef>>,
        pub poked: Mutex<Vec<QueueRef>>,
    }

    impl QueueControl for Recorder {
        fn close(&self, queue: QueueRef, _reason: &'static str) {
            self.closed.lock().unwrap().push(queue);
        }
        fn poke(&self, queue: QueueRef) {
            self.poked.lock().unwrap().push(queue);
        }
    }

    pub(crate) const NQN: &str = "nqn.2026-11.dev.nvmf-rs:unit";
    pub(crate) const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000001";

    pub(crate) fn target() -> (Target, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        let t = Target::new(TargetLimits::default(), recorder.clone());
        t.add_subsystem(Subsystem::new(NQN.into(), "sn".into(), "mn".into(), false, vec![HOST.into()])).unwrap();
        t.add_namespace(NQN, 1, &BackendSpec::Ram { size: 1 << 20, block_size: 512 }).unwrap();
        (t, recorder)
    }

    pub(crate) fn data(subnqn: &str, hostnqn: &str, cntlid: u16) -> ConnectData {
        ConnectData { hostid: Uuid::NIL, cntlid, subnqn: subnqn.into(), hostnqn: hostnqn.into() }
    }

    pub(crate) fn connect(qid: u16, sqsize: u16) -> Connect {
        Connect { recfmt: 0, qid, sqsize, cattr: 0, kato: 5000 }
    }

    pub(crate) const ADMIN_Q: QueueRef = QueueRef { group: 0, key: 1 };

    /// A ready controller (connected and enabled).
    pub(crate) fn ready(t: &Target) -> ControllerId {
        let b = t.connect_admin(&connect(0, 31), &data(NQN, HOST, CNTLID_DYNAMIC), ADMIN_Q, 32).unwrap();
        t.property_set(b.ctrl, nvme_proto::property::Property::Cc, 0x0046_0001).unwrap();
        b.ctrl
    }

    #[test]
    fn admin_queue_loss_removes_the_controller_and_closes_its_io_queues_once() {
        let (t, rec) = target();
        let ctrl = ready(&t);
        let io = [QueueRef { group: 1, key: 2 }, QueueRef { group: 0, key: 3 }];
        for (i, q) in io.iter().enumerate() {
            t.connect_io(&connect(i as u16 + 1, 31), &data(NQN, HOST, ctrl.cntlid), *q, 32).unwrap();
        }
        // An I/O queue leaving does not touch the controller.
        t.queue_closed(ctrl, io[1]);
        assert_eq!(t.controller_count(), 1);
        t.queue_closed(ctrl, ADMIN_Q);
        assert_eq!(t.controller_count(), 0);
        assert_eq!(*rec.closed.lock().unwrap(), vec![io[0]]);
        // Twice, or with a stale id: nothing more happens.
        t.queue_closed(ctrl, ADMIN_Q);
        t.controller_fatal(ctrl, "again");
        assert_eq!(rec.closed.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_reused_cntlid_does_not_answer_to_a_stale_id() {
        let (t, _) = target();
        let old = ready(&t);
        t.queue_closed(old, ADMIN_Q);
        let new = ready(&t);
        assert_ne!(old, new);
        assert!(t.property_get(old, nvme_proto::property::Property::Csts).is_err());
        assert!(t.property_get(new, nvme_proto::property::Property::Csts).is_ok());
    }

    #[test]
    fn namespace_changes_poke_the_admin_queue_of_subscribed_controllers() {
        let (t, rec) = target();
        let ctrl = ready(&t);
        let mut kato = None;
        use nvme_proto::features::{Feature, async_event_config};
        let set = nvme_proto::command::SetFeatures {
            nsid: 0,
            save: false,
            feature: Feature::AsyncEventConfig(async_event_config::NAMESPACE_ATTRIBUTE),
        };
        t.admin_command(ctrl, 9, &nvme_proto::AdminCommand::SetFeatures(set), &mut kato);
        assert_eq!(
            t.admin_command(ctrl, 10, &nvme_proto::AdminCommand::AsyncEventRequest, &mut kato),
            crate::admin::AdminOutcome::Deferred
        );
        assert_eq!(t.take_async_event(ctrl), None);
        t.add_namespace(NQN, 2, &BackendSpec::Ram { size: 1 << 20, block_size: 512 }).unwrap();
        t.add_namespace(NQN, 3, &BackendSpec::Ram { size: 1 << 20, block_size: 512 }).unwrap();
        assert_eq!(*rec.poked.lock().unwrap(), vec![ADMIN_Q, ADMIN_Q]);
        let (cid, dw0) = t.take_async_event(ctrl).expect("event for the waiting AER");
        assert_eq!((cid, dw0), (10, nvme_proto::aer::AsyncEvent::NAMESPACE_CHANGED.to_dword()));
        // One notice until the log is read, even for two changes.
        t.admin_command(ctrl, 11, &nvme_proto::AdminCommand::AsyncEventRequest, &mut kato);
        assert_eq!(t.take_async_event(ctrl), None);
    }
}
