//! A lane of a verbs device: a data path (`data_path`) on the thread of whoever runs it — a poll group, a host
//! queue's thread — with a device context of its own, opened on that thread, so that its queue pairs, their
//! completion queues and completion channel, its shared receive queues, regions and staging buffers are created,
//! posted on, completed and destroyed there and nowhere else. Posting is a message on the lane's own channel
//! (from its thread, a call there, no hop), completions come from its own completion channel on its thread's
//! reactor, and the device's async events for its queue pairs come on its own context.
//!
//! The device's worker keeps the connection manager and the device's lifecycle: it tells the lane what the CM
//! decided (a connection's attributes, established, lost, failed), and the lane answers (created, ready). The
//! device's removal is a protocol: the worker tells every lane (naming the device's generation, a number never
//! reused in the process), each lane destroys its own objects and closes its context, and says so; only then
//! does the worker close its own context and report the removal. Nothing is freed on one thread while another
//! holds it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

use super::data_path::{DataPath, readable};
use super::ffi::{self, AsyncEvent, DeviceKey, QpAttr};
use crate::connection::ConnId;
use crate::device::{Command, CompletionQueue, DeviceError, DeviceEvent, Reply};

/// Commands taken in one turn beyond the first, so that posts queued together are posted together.
pub(super) const COMMAND_BURST: usize = 64;

/// What the device's worker tells a lane.
pub(crate) enum LaneCommand {
    CreateQp {
        pd: u32,
        send_cq: CompletionQueue,
        recv_cq: CompletionQueue,
        srq: Option<u32>,
        /// The lane's channel, for the queue pair's handle.
        commands: mpsc::UnboundedSender<Command>,
        reply: Reply<(u32, mpsc::UnboundedSender<Command>)>,
    },
    CreateSrq {
        id: u32,
        pd: u32,
        commands: mpsc::UnboundedSender<Command>,
        reply: Reply<(u32, mpsc::UnboundedSender<Command>)>,
    },
    /// The connection manager's attributes for the queue pair's connection (INIT, RTR, RTS); answered by
    /// [`LaneReport::QpReady`].
    Connect {
        conn: ConnId,
        qpn: u32,
        attrs: Vec<QpAttr>,
    },
    Established(u32),
    /// Disconnected: to the error state.
    ToError(u32),
    /// The connection will not come up.
    FailBacklog(u32),
    DeallocPd(u32),
    /// The device is going away: destroy everything, close the context, answer [`LaneReport::Released`].
    Remove {
        generation: u64,
    },
}

/// What a lane tells the device's worker.
pub(crate) enum LaneReport {
    QpCreated { lane: usize, qpn: u32, pd: u32, srq: bool },
    SrqCreated { lane: usize, id: u32, pd: u32 },
    QpReady { conn: ConnId, qpn: u32, result: Result<(), DeviceError> },
    Released { lane: usize, generation: u64 },
}

/// What a lane holds, as of its last turn, for the device's stats.
#[derive(Debug, Default)]
pub(crate) struct LaneCounters {
    pub regions: AtomicU64,
    pub region_bytes: AtomicU64,
    pub arenas: AtomicU64,
    pub arena_bytes: AtomicU64,
    pub srq_receives: AtomicU64,
}

/// A lane before it runs: hand it to the thread that is to own its queue pairs and run it there.
pub struct Lane {
    id: usize,
    generation: u64,
    device: DeviceKey,
    port: u8,
    commands: mpsc::UnboundedReceiver<Command>,
    worker: mpsc::UnboundedSender<Command>,
    events: mpsc::UnboundedSender<DeviceEvent>,
    counters: Arc<LaneCounters>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane").field("id", &self.id).field("generation", &self.generation).finish_non_exhaustive()
    }
}

/// Where a lane is created from: the device's worker.
pub(super) struct LaneParts {
    pub id: usize,
    pub generation: u64,
    pub device: DeviceKey,
    pub port: u8,
    pub commands: mpsc::UnboundedReceiver<Command>,
    pub worker: mpsc::UnboundedSender<Command>,
    pub events: mpsc::UnboundedSender<DeviceEvent>,
    pub counters: Arc<LaneCounters>,
}

impl Lane {
    pub(super) fn new(p: LaneParts) -> Lane {
        Lane {
            id: p.id,
            generation: p.generation,
            device: p.device,
            port: p.port,
            commands: p.commands,
            worker: p.worker,
            events: p.events,
            counters: p.counters,
        }
    }

    pub fn id(&self) -> usize {
        self.id
    }

    /// Serves the lane's queue pairs until the device closes or goes away. Run it on the thread that uses them
    /// (a tokio runtime with I/O enabled).
    pub async fn run(self) {
        let Lane { id, generation, device, port, mut commands, worker, events, counters } = self;
        // The context is opened here: every object made from it is this thread's.
        let opened = ffi::Context::open_key(device).map_err(super::data_path::verbs).and_then(|c| match c {
            Some(c) => DataPath::new(c, port, events.clone()),
            None => Err(DeviceError::Closed),
        });
        let mut data = opened.unwrap_or_else(|e| {
            tracing::error!(lane = id, "verbs lane: no device context ({e}): it serves nothing");
            DataPath::gone(port, events.clone())
        });
        let (mut comp_fd, mut async_fd) = match data.watch() {
            Ok((c, a)) => (Some(c), Some(a)),
            Err(e) => {
                if data.context().is_some() {
                    tracing::error!(lane = id, "verbs lane: cannot watch its descriptors: {e}");
                    data.remove_device();
                }
                (None, None)
            }
        };
        let mut lane = LaneState { id, generation, data, worker, counters, removed: false };
        loop {
            tokio::select! {
                command = commands.recv() => {
                    let mut next = command;
                    let mut handled = 0;
                    while let Some(c) = next.take() {
                        match c {
                            Command::Shutdown => {
                                lane.data.post_chains();
                                lane.data.shutdown();
                                return;
                            }
                            Command::VerbsLane(LaneCommand::Remove { generation: g }) if g == lane.generation => {
                                lane.remove();
                                // The reactor lets go of the descriptors; the last holders of the completion
                                // channel and the context go with them, and the kernel can finish.
                                comp_fd = None;
                                async_fd = None;
                                tracing::info!(lane = id, generation, "verbs lane released its device");
                                let _ = lane.worker.send(Command::FromVerbsLane(LaneReport::Released {
                                    lane: id,
                                    generation,
                                }));
                            }
                            c => lane.on_command(c),
                        }
                        handled += 1;
                        if handled <= COMMAND_BURST {
                            next = commands.try_recv().ok();
                        }
                    }
                    if handled == 0 {
                        // Every sender is gone: the device is closed.
                        lane.data.shutdown();
                        return;
                    }
                }
                guard = readable(&comp_fd) => {
                    if let Ok(mut guard) = guard {
                        lane.data.drain_completions();
                        guard.clear_ready();
                    }
                }
                guard = readable(&async_fd) => {
                    if let Ok(mut guard) = guard {
                        lane.drain_async_events();
                        guard.clear_ready();
                    }
                }
            }
            lane.data.post_chains();
            lane.count();
        }
    }
}

struct LaneState {
    id: usize,
    generation: u64,
    data: DataPath,
    worker: mpsc::UnboundedSender<Command>,
    counters: Arc<LaneCounters>,
    removed: bool,
}

impl LaneState {
    /// What the device's stats read of this lane (also before a region's caller hears of it, so that its next
    /// stats include it).
    fn count(&self) {
        let (regions, bytes) = self.data.regions();
        self.counters.regions.store(regions as u64, Ordering::Relaxed);
        self.counters.region_bytes.store(bytes as u64, Ordering::Relaxed);
        let (arenas, arena_bytes) = self.data.arenas();
        self.counters.arenas.store(arenas as u64, Ordering::Relaxed);
        self.counters.arena_bytes.store(arena_bytes as u64, Ordering::Relaxed);
        self.counters.srq_receives.store(self.data.srq_receives() as u64, Ordering::Relaxed);
    }

    fn report(&self, report: LaneReport) {
        let _ = self.worker.send(Command::FromVerbsLane(report));
    }

    fn remove(&mut self) {
        if !std::mem::replace(&mut self.removed, true) {
            self.data.post_chains();
            self.data.remove_device();
        }
    }

    fn on_command(&mut self, command: Command) {
        // Only posts may overtake the sends of this turn (a send queue's order is its own): anything else sees
        // them posted.
        if !matches!(command, Command::PostSend(..) | Command::PostRecv(..) | Command::PostSrqRecv(..)) {
            self.data.post_chains();
        }
        if let Command::VerbsLane(c) = command {
            return self.on_lane_command(c);
        }
        let data = &mut self.data;
        match command {
            Command::Register(pd, buf, access, reply) => {
                let result = data.ensure_pd(pd).and_then(|()| data.register(pd, buf, access));
                self.count();
                let _ = reply.send(result);
            }
            Command::Deregister(key, reply) => {
                let result = data.deregister(key);
                self.count();
                let _ = reply.send(result);
            }
            Command::PostSend(qpn, wr) => data.post_send(qpn, wr),
            Command::PostRecv(qpn, wr) => data.post_recv(qpn, wr),
            Command::PostSrqRecv(id, wr) => data.post_srq_recv(id, wr),
            Command::DestroySrq(id, reply) => {
                let _ = reply.send(data.destroy_srq(id));
            }
            Command::ModifyQp(qpn, transition, reply) => {
                let _ = reply.send(data.modify_by_hand(qpn, transition));
            }
            Command::DestroyQp(qpn, reply) => {
                data.destroy_qp(qpn);
                let _ = reply.send(Ok(()));
            }
            _ => tracing::debug!(lane = self.id, "a lane takes only its queue pairs' commands"),
        }
    }

    fn on_lane_command(&mut self, command: LaneCommand) {
        let (id, data) = (self.id, &mut self.data);
        match command {
            LaneCommand::CreateQp { pd, send_cq, recv_cq, srq, commands, reply } => {
                let created = data.ensure_pd(pd).and_then(|()| data.create_qp(pd, send_cq, recv_cq, srq));
                // The worker hears of it before the caller can name it in a connect or an accept.
                if let Ok(qpn) = created {
                    self.report(LaneReport::QpCreated { lane: id, qpn, pd, srq: srq.is_some() });
                }
                let _ = reply.send(created.map(|qpn| (qpn, commands)));
            }
            LaneCommand::CreateSrq { id: srq, pd, commands, reply } => {
                let created = data.ensure_pd(pd).and_then(|()| data.create_srq(srq, pd));
                if created.is_ok() {
                    self.report(LaneReport::SrqCreated { lane: id, id: srq, pd });
                }
                let _ = reply.send(created.map(|()| (srq, commands)));
            }
            LaneCommand::Connect { conn, qpn, mut attrs } => {
                let result = data.connectable(qpn, "connect").and_then(|_| data.connect_qp(qpn, &mut attrs));
                if result.is_err() {
                    data.fail_qp(qpn);
                }
                self.report(LaneReport::QpReady { conn, qpn, result });
            }
            LaneCommand::Established(qpn) => data.established(qpn),
            LaneCommand::ToError(qpn) => data.fail_qp(qpn),
            LaneCommand::FailBacklog(qpn) => data.fail_backlog(qpn),
            LaneCommand::DeallocPd(pd) => {
                // A domain something of this lane still holds stays until that goes (at the lane's end).
                let _ = data.dealloc_pd(pd);
            }
            LaneCommand::Remove { generation } => {
                tracing::warn!(lane = id, generation, ours = self.generation, "removal of another device");
            }
        }
    }

    fn drain_async_events(&mut self) {
        let Some(context) = self.data.context().cloned() else { return };
        loop {
            match context.next_async_event() {
                Ok(Some(AsyncEvent::QpFatal { qp_num, kind })) => self.data.qp_fatal(qp_num, kind),
                // Port and device events reach the worker's context too: the worker acts on them.
                Ok(Some(other)) => tracing::trace!(lane = self.id, ?other, "device event (the worker's)"),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(lane = self.id, "async events: {e}");
                    break;
                }
            }
        }
    }
}
