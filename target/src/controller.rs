//! A controller: the state one host's association with one subsystem has — registers (CC/CSTS), negotiated
//! queues, keep-alive, features, asynchronous events, and the counters behind the error and SMART logs.
//!
//! The state itself lives in the target's controller table and is changed only by admin and fabrics commands.
//! The counters are shared with the controller's I/O queues (atomics and a small locked ring), which live on
//! other poll groups: they are plain numbers, not queue state, so sharing them breaks no ownership rule.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nvme_proto::aer::AsyncEvent;
use nvme_proto::log_page::ErrorLogEntry;
use nvme_proto::property::{Cc, Csts};
use nvme_proto::{Status, Uuid};

use crate::subsystem::Subsystem;

/// Identifies a controller across threads: its controller id and the generation it was created with. A stale
/// id (the controller went away, the cntlid was reused) finds nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ControllerId {
    pub cntlid: u16,
    pub generation: u64,
}

/// Identifies a queue of some poll group, opaque to the core: the transport binding routes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QueueRef {
    pub group: usize,
    pub key: u64,
}

/// Entries kept in the error log (ELPE + 1).
pub const ERROR_LOG_ENTRIES: usize = 64;
/// Outstanding Asynchronous Event Requests allowed (AERL + 1).
pub const AER_LIMIT: usize = 4;

/// Counters shared by a controller's queues.
#[derive(Debug, Default)]
pub struct ControllerCounters {
    pub read_commands: AtomicU64,
    pub write_commands: AtomicU64,
    pub other_io_commands: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub media_errors: AtomicU64,
    /// Commands completed with an error status, any queue.
    pub errors: AtomicU64,
    error_log: Mutex<VecDeque<ErrorLogEntry>>,
}

impl ControllerCounters {
    /// Records a failed command in the error log (newest first, at most [`ERROR_LOG_ENTRIES`]).
    pub fn record_error(&self, sqid: u16, cid: u16, status: Status, location: Option<u16>, nsid: u32, lba: u64) {
        let count = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = ErrorLogEntry {
            error_count: count.into(),
            sqid: sqid.into(),
            cmdid: cid.into(),
            status_field: (status.raw() << 1).into(),
            param_error_location: location.unwrap_or(0xffff).into(),
            lba: lba.into(),
            nsid: nsid.into(),
            trtype: nvme_proto::discovery::trtype::RDMA,
            ..Default::default()
        };
        let mut log = self.error_log.lock().unwrap_or_else(|p| p.into_inner());
        log.push_front(entry);
        log.truncate(ERROR_LOG_ENTRIES);
    }

    pub fn error_log(&self) -> Vec<ErrorLogEntry> {
        self.error_log.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect()
    }
}

/// What kind of controller: an I/O controller of an NVM subsystem, or the discovery controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControllerKind {
    Io,
    Discovery,
}

#[derive(Debug)]
pub struct Controller {
    pub id: ControllerId,
    pub kind: ControllerKind,
    /// `None` for the discovery controller.
    pub subsystem: Option<Arc<Subsystem>>,
    pub subnqn: String,
    pub hostnqn: String,
    pub hostid: Uuid,
    pub cc: Cc,
    pub csts: Csts,
    /// Keep-alive timeout; `None` disables it.
    pub kato: Option<Duration>,
    /// I/O queues the host may create (Set Features Number of Queues), 1's based.
    pub io_queues: u16,
    /// The most the target offers.
    pub max_io_queues: u16,
    pub async_event_config: u32,
    pub volatile_write_cache: bool,
    pub admin_queue: QueueRef,
    /// Connected I/O queues by qid.
    pub io_queue_refs: Vec<(u16, QueueRef)>,
    /// Outstanding Asynchronous Event Requests (command ids), oldest first.
    pub aer_cids: VecDeque<u16>,
    /// Events waiting for an AER to carry them.
    pub pending_events: VecDeque<AsyncEvent>,
    /// Namespaces changed since the host last read log 0x04.
    pub changed_namespaces: Vec<u32>,
    /// A notice of this type was sent and not yet cleared by reading its log page (masks repeats).
    pub namespace_notice_masked: bool,
    pub counters: Arc<ControllerCounters>,
}

impl Controller {
    pub fn is_ready(&self) -> bool {
        self.csts.ready()
    }

    /// Queues an event if the host enabled it, unless one of its kind awaits the host.
    pub fn queue_namespace_notice(&mut self, nsid: u32) {
        if !self.changed_namespaces.contains(&nsid) {
            self.changed_namespaces.push(nsid);
        }
        let enabled = self.async_event_config & nvme_proto::features::async_event_config::NAMESPACE_ATTRIBUTE != 0;
        if enabled && !self.namespace_notice_masked {
            self.namespace_notice_masked = true;
            self.pending_events.push_back(AsyncEvent::NAMESPACE_CHANGED);
        }
    }

    /// An outstanding AER and the event it completes with, if both exist.
    pub fn take_aer_completion(&mut self) -> Option<(u16, AsyncEvent)> {
        if self.aer_cids.is_empty() || self.pending_events.is_empty() {
            return None;
        }
        Some((self.aer_cids.pop_front()?, self.pending_events.pop_front()?))
    }
}
