//! Admin commands on a controller: Identify, Get Log Page, Set / Get Features, Asynchronous Event Request,
//! Keep Alive, Abort — what a stock Linux host (and nvme-cli) uses, with the statuses Linux
//! `drivers/nvme/target/admin-cmd.c` gives.

use std::sync::atomic::Ordering;
use std::time::Duration;

use nvme_proto::command::{AdminCommand, GetFeatures, GetLogPage, Identify, SetFeatures};
use nvme_proto::features::{Feature, FeatureSelect, NumberOfQueues, async_event_config, fid};
use nvme_proto::identify::{
    IdentifyController, IdentifyNamespace, LbaFormat, NamespaceId, NamespaceIdList, NamespaceList, cmic, cns,
    controller_type, lpa, oaes, oncs, sgls,
};
use nvme_proto::log_page::{CommandEffectsLog, FirmwareSlotLog, SmartLog, effects, lid};
use nvme_proto::property::Vs;
use nvme_proto::{Status, command::opcode};
use zerocopy::IntoBytes;

use crate::controller::{AER_LIMIT, Controller, ControllerId, ControllerKind, ERROR_LOG_ENTRIES};
use crate::core::Target;

pub const FIRMWARE_REVISION: &str = env!("CARGO_PKG_VERSION");
pub const MODEL: &str = "nvmf-target";

/// How an admin command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminOutcome {
    Done {
        status: Status,
        result: u64,
        /// Data for the host (controller → host transfer).
        data: Vec<u8>,
    },
    /// An Asynchronous Event Request: completes when an event comes.
    Deferred,
}

impl AdminOutcome {
    fn ok(result: u64, data: Vec<u8>) -> AdminOutcome {
        AdminOutcome::Done { status: Status::SUCCESS, result, data }
    }
    fn status(status: Status) -> AdminOutcome {
        AdminOutcome::Done { status, result: 0, data: Vec::new() }
    }
}

/// Bytes the command moves to the host (admin commands take no data from the host).
pub fn admin_transfer(cmd: &AdminCommand) -> u64 {
    match cmd {
        AdminCommand::Identify(_) => nvme_proto::identify::IDENTIFY_DATA_LEN as u64,
        AdminCommand::GetLogPage(g) => g.data_len(),
        _ => 0,
    }
}

/// The requested window of a log: `len` bytes from `offset`, zero-padded past the end.
fn window(full: &[u8], get: &GetLogPage) -> Result<Vec<u8>, Status> {
    let len = get.data_len() as usize;
    let offset = usize::try_from(get.offset).map_err(|_| Status::INVALID_FIELD.with_dnr())?;
    if offset > full.len() || offset % 4 != 0 {
        return Err(Status::INVALID_FIELD.with_dnr());
    }
    let mut out = vec![0u8; len];
    let n = (full.len() - offset).min(len);
    out[..n].copy_from_slice(&full[offset..offset + n]);
    Ok(out)
}

impl Target {
    /// Executes an admin command of controller `ctrl` with command id `cid`; `kato` receives a new keep-alive
    /// timeout when Set Features changed it.
    pub fn admin_command(
        &self,
        ctrl: ControllerId,
        cid: u16,
        cmd: &AdminCommand,
        kato: &mut Option<Option<Duration>>,
    ) -> AdminOutcome {
        let mut table = self.table();
        let Some(c) = table.get_mut(ctrl) else { return AdminOutcome::status(Status::COMMAND_SEQUENCE_ERROR) };
        if !c.is_ready() {
            return AdminOutcome::status(Status::COMMAND_SEQUENCE_ERROR);
        }
        match cmd {
            AdminCommand::Identify(id) => self.identify(c, id),
            AdminCommand::GetLogPage(get) => self.get_log_page(c, get),
            AdminCommand::SetFeatures(set) => self.set_features(c, set, kato),
            AdminCommand::GetFeatures(get) => get_features(c, get),
            AdminCommand::AsyncEventRequest => {
                if c.aer_cids.len() >= AER_LIMIT {
                    AdminOutcome::status(Status::AER_LIMIT_EXCEEDED.with_dnr())
                } else {
                    c.aer_cids.push_back(cid);
                    AdminOutcome::Deferred
                }
            }
            AdminCommand::KeepAlive => {
                if c.kato.is_none() {
                    AdminOutcome::status(Status::KEEP_ALIVE_INVALID.with_dnr())
                } else {
                    AdminOutcome::ok(0, Vec::new())
                }
            }
            // Bit 0 of DW0 set: the command was not aborted (nvmet never aborts).
            AdminCommand::Abort { .. } => AdminOutcome::ok(1, Vec::new()),
        }
    }

    /// Completes a waiting AER with a waiting event, if both exist: (command id, DW0).
    pub fn take_async_event(&self, ctrl: ControllerId) -> Option<(u16, u32)> {
        let mut table = self.table();
        let c = table.get_mut(ctrl)?;
        c.take_aer_completion().map(|(cid, event)| (cid, event.to_dword()))
    }

    fn identify(&self, c: &Controller, id: &Identify) -> AdminOutcome {
        let result = match (c.kind, id.cns) {
            (_, cns::CONTROLLER) => Ok(self.identify_controller(c).as_bytes().to_vec()),
            (ControllerKind::Io, cns::NAMESPACE) => self.identify_namespace(c, id.nsid),
            (ControllerKind::Io, cns::ACTIVE_NAMESPACE_LIST) => {
                let subsystem = c.subsystem.as_ref().expect("I/O controller");
                let ids: Vec<u32> = subsystem.namespaces().iter().map(|n| n.nsid).filter(|&n| n > id.nsid).collect();
                let list = NamespaceList(ids.into_iter().take(nvme_proto::identify::NAMESPACE_LIST_MAX).collect());
                list.to_bytes().map(|b| b.to_vec()).map_err(|e| e.status)
            }
            (ControllerKind::Io, cns::NAMESPACE_DESCRIPTORS) => {
                let subsystem = c.subsystem.as_ref().expect("I/O controller");
                match subsystem.namespace(id.nsid) {
                    None => Err(Status::INVALID_NAMESPACE.with_dnr()),
                    Some(ns) => NamespaceIdList(vec![
                        NamespaceId::Uuid(ns.uuid),
                        NamespaceId::Nguid(ns.nguid),
                        NamespaceId::Csi(0),
                    ])
                    .to_bytes()
                    .map(|b| b.to_vec())
                    .map_err(|e| e.status),
                }
            }
            _ => Err(Status::INVALID_FIELD.with_dnr()),
        };
        match result {
            Ok(data) => AdminOutcome::ok(0, data),
            Err(status) => AdminOutcome::status(status),
        }
    }

    pub fn identify_controller(&self, c: &Controller) -> IdentifyController {
        let mut id = IdentifyController::zeroed();
        let (serial, model) = match &c.subsystem {
            Some(s) => (s.serial.clone(), s.model.clone()),
            None => (Target::default_serial(&c.subnqn), MODEL.to_string()),
        };
        // Our own configuration: a serial or model too long was refused when loading it; cut, never fail here.
        let _ = id.set_serial(&serial.chars().take(20).collect::<String>());
        let _ = id.set_model(&model.chars().take(40).collect::<String>());
        let _ = id.set_firmware(FIRMWARE_REVISION);
        let _ = id.set_subnqn(&c.subnqn);
        id.rab = 6;
        id.cmic = cmic::MULTI_CONTROLLER;
        id.mdts = self.limits.mdts();
        id.cntlid = c.id.cntlid.into();
        id.ver = Vs::V1_3.0.into();
        id.cntrltype = match c.kind {
            ControllerKind::Io => controller_type::IO,
            ControllerKind::Discovery => controller_type::DISCOVERY,
        };
        id.oaes = match c.kind {
            ControllerKind::Io => oaes::NAMESPACE_ATTRIBUTE,
            ControllerKind::Discovery => oaes::DISCOVERY_LOG_CHANGE,
        }
        .into();
        id.acl = 3;
        id.aerl = (AER_LIMIT - 1) as u8;
        id.frmw = 0x3; // one slot, slot 1 read-only
        id.lpa = lpa::COMMANDS_EFFECTS | lpa::EXTENDED_DATA;
        id.elpe = (ERROR_LOG_ENTRIES - 1) as u8;
        id.kas = 1u16.into(); // 100 ms granularity
        id.sqes = 0x66;
        id.cqes = 0x44;
        id.maxcmd = self.limits.max_queue_depth.into();
        if let Some(s) = &c.subsystem {
            id.nn = s.max_nsid().into();
            id.oncs = (oncs::DATASET_MANAGEMENT | oncs::WRITE_ZEROES).into();
            id.vwc = 1;
            id.awun = 0u16.into();
        }
        id.sgls = (sgls::SUPPORTED | sgls::KEYED | sgls::OFFSET).into();
        id.ioccsz = ((64 + self.limits.in_capsule_data_size) / 16).into();
        id.iorcsz = 1u32.into();
        id.icdoff = 0u16.into();
        id.msdbd = 1;
        id
    }

    fn identify_namespace(&self, c: &Controller, nsid: u32) -> Result<Vec<u8>, Status> {
        let subsystem = c.subsystem.as_ref().expect("I/O controller");
        if nsid == 0 || nsid == u32::MAX {
            return Err(Status::INVALID_NAMESPACE.with_dnr());
        }
        let mut id = IdentifyNamespace::zeroed();
        let Some(ns) = subsystem.namespace(nsid) else {
            // An inactive NSID within NN reads as zeroes; beyond it is invalid.
            return if nsid <= subsystem.max_nsid() {
                Ok(id.as_bytes().to_vec())
            } else {
                Err(Status::INVALID_NAMESPACE.with_dnr())
            };
        };
        let blocks = ns.blocks();
        id.nsze = blocks.into();
        id.ncap = blocks.into();
        id.nuse = (ns.backend.used() >> ns.block_shift()).min(blocks).into();
        if ns.backend.supports_deallocate() {
            id.nsfeat = 1; // thin provisioning
            id.dlfeat = 1 | 1 << 3; // deallocated blocks read as zeroes; Write Zeroes may deallocate
        }
        id.nlbaf = 0;
        id.flbas = 0;
        id.lbaf[0] = LbaFormat::new(ns.block_shift() as u8);
        id.nmic = 1; // may be shared by several controllers
        id.nguid = ns.nguid;
        Ok(id.as_bytes().to_vec())
    }

    fn get_log_page(&self, c: &mut Controller, get: &GetLogPage) -> AdminOutcome {
        let full: Vec<u8> = match (c.kind, get.lid) {
            (ControllerKind::Discovery, lid::DISCOVERY) => match self.discovery_log(&c.hostnqn).to_bytes() {
                Ok(b) => b,
                Err(e) => return AdminOutcome::status(e.status),
            },
            (_, lid::ERROR) => {
                let mut out = Vec::with_capacity(ERROR_LOG_ENTRIES * 64);
                for e in c.counters.error_log() {
                    out.extend_from_slice(e.as_bytes());
                }
                out.resize(ERROR_LOG_ENTRIES * 64, 0);
                out
            }
            (ControllerKind::Io, lid::SMART) => smart_log(c).as_bytes().to_vec(),
            (ControllerKind::Io, lid::FIRMWARE_SLOT) => {
                let mut log = FirmwareSlotLog::zeroed();
                log.afi = 1;
                let _ = log.set_revision(1, FIRMWARE_REVISION);
                log.as_bytes().to_vec()
            }
            (ControllerKind::Io, lid::CHANGED_NAMESPACES) => {
                let list = if c.changed_namespaces.len() > nvme_proto::identify::NAMESPACE_LIST_MAX {
                    NamespaceList::overflowed()
                } else {
                    NamespaceList(c.changed_namespaces.clone())
                };
                if !get.rae {
                    c.changed_namespaces.clear();
                    c.namespace_notice_masked = false;
                }
                match list.to_bytes() {
                    Ok(b) => b.to_vec(),
                    Err(e) => return AdminOutcome::status(e.status),
                }
            }
            (ControllerKind::Io, lid::COMMANDS_EFFECTS) => command_effects().as_bytes().to_vec(),
            _ => return AdminOutcome::status(Status::INVALID_LOG_PAGE.with_dnr()),
        };
        if c.kind == ControllerKind::Discovery && get.lid == lid::DISCOVERY && !get.rae {
            c.pending_events.retain(|e| e.log_page != lid::DISCOVERY);
        }
        match window(&full, get) {
            Ok(data) => AdminOutcome::ok(0, data),
            Err(status) => AdminOutcome::status(status),
        }
    }

    fn set_features(&self, c: &mut Controller, set: &SetFeatures, kato: &mut Option<Option<Duration>>) -> AdminOutcome {
        if set.save {
            return AdminOutcome::status(Status::FEATURE_NOT_SAVEABLE.with_dnr());
        }
        match set.feature {
            Feature::NumberOfQueues(want) if c.kind == ControllerKind::Io => {
                if !c.io_queue_refs.is_empty() {
                    return AdminOutcome::status(Status::COMMAND_SEQUENCE_ERROR);
                }
                let granted = want.nsqr.min(want.ncqr).min(c.max_io_queues - 1);
                c.io_queues = granted + 1;
                let n = NumberOfQueues { nsqr: granted, ncqr: granted };
                AdminOutcome::ok(n.to_dword() as u64, Vec::new())
            }
            Feature::AsyncEventConfig(bits) => {
                let supported = match c.kind {
                    ControllerKind::Io => async_event_config::NAMESPACE_ATTRIBUTE,
                    ControllerKind::Discovery => async_event_config::DISCOVERY_LOG_CHANGE,
                };
                c.async_event_config = bits & supported;
                AdminOutcome::ok(0, Vec::new())
            }
            Feature::KeepAliveTimer { kato_ms } => {
                let new = (kato_ms != 0).then(|| Duration::from_millis(kato_ms.div_ceil(100) as u64 * 100));
                c.kato = new;
                *kato = Some(new);
                AdminOutcome::ok(0, Vec::new())
            }
            Feature::VolatileWriteCache { enabled } if c.kind == ControllerKind::Io => {
                c.volatile_write_cache = enabled;
                AdminOutcome::ok(0, Vec::new())
            }
            _ => AdminOutcome::status(Status::INVALID_FIELD.with_dnr()),
        }
    }
}

fn get_features(c: &Controller, get: &GetFeatures) -> AdminOutcome {
    let current = !matches!(get.select, FeatureSelect::Default);
    if matches!(get.select, FeatureSelect::SupportedCapabilities) {
        // Changeable (bit 2) for what Set Features accepts; nothing is saveable.
        let changeable = matches!(
            get.fid,
            fid::NUMBER_OF_QUEUES | fid::ASYNC_EVENT_CONFIG | fid::KEEP_ALIVE_TIMER | fid::VOLATILE_WRITE_CACHE
        );
        return AdminOutcome::ok(if changeable { 1 << 2 } else { 0 }, Vec::new());
    }
    let value: u32 = match get.fid {
        fid::ARBITRATION | fid::POWER_MANAGEMENT | fid::ERROR_RECOVERY | fid::WRITE_ATOMICITY => 0,
        fid::INTERRUPT_COALESCING => 0,
        fid::VOLATILE_WRITE_CACHE if c.kind == ControllerKind::Io => {
            (if current { c.volatile_write_cache } else { true }) as u32
        }
        fid::NUMBER_OF_QUEUES if c.kind == ControllerKind::Io => {
            let n = if current { c.io_queues } else { c.max_io_queues } - 1;
            NumberOfQueues { nsqr: n, ncqr: n }.to_dword()
        }
        fid::ASYNC_EVENT_CONFIG => {
            if current {
                c.async_event_config
            } else {
                0
            }
        }
        fid::KEEP_ALIVE_TIMER => {
            if current {
                c.kato.map_or(0, |d| d.as_millis() as u32)
            } else {
                0
            }
        }
        _ => return AdminOutcome::status(Status::INVALID_FIELD.with_dnr()),
    };
    AdminOutcome::ok(value as u64, Vec::new())
}

fn smart_log(c: &Controller) -> SmartLog {
    let n = &c.counters;
    let mut log = SmartLog::zeroed();
    log.temperature = 300u16.into();
    log.available_spare = 100;
    log.available_spare_threshold = 10;
    log.data_units_read = SmartLog::data_units(n.bytes_read.load(Ordering::Relaxed) as u128).into();
    log.data_units_written = SmartLog::data_units(n.bytes_written.load(Ordering::Relaxed) as u128).into();
    log.host_read_commands = (n.read_commands.load(Ordering::Relaxed) as u128).into();
    log.host_write_commands = (n.write_commands.load(Ordering::Relaxed) as u128).into();
    log.power_cycles = 1u128.into();
    log.media_errors = (n.media_errors.load(Ordering::Relaxed) as u128).into();
    log.error_log_entries = (n.errors.load(Ordering::Relaxed) as u128).into();
    log
}

fn command_effects() -> CommandEffectsLog {
    let mut log = CommandEffectsLog::zeroed();
    for op in [
        opcode::GET_LOG_PAGE,
        opcode::IDENTIFY,
        opcode::ABORT,
        opcode::SET_FEATURES,
        opcode::GET_FEATURES,
        opcode::ASYNC_EVENT_REQUEST,
        opcode::KEEP_ALIVE,
    ] {
        log.admin[op as usize] = effects::CSUPP.into();
    }
    log.io[opcode::FLUSH as usize] = effects::CSUPP.into();
    for op in [opcode::WRITE, opcode::WRITE_ZEROES, opcode::DATASET_MANAGEMENT] {
        log.io[op as usize] = (effects::CSUPP | effects::LBCC).into();
    }
    log.io[opcode::READ as usize] = effects::CSUPP.into();
    log
}
