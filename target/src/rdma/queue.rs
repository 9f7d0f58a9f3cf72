//! One NVMe queue over one RC queue pair, owned by one poll group (Linux `nvmet_rdma_queue`): receives command
//! capsules, moves data by RDMA READ / WRITE through the group's buffer pool, runs the command on the core,
//! and answers with SEND (SEND_WITH_INV when the host asked for invalidation).
//!
//! Lifecycle: `Connecting` (waiting for the NVMe Connect) → `Active` → `Draining` → closed. Draining is the
//! only way out, whatever the cause (host disconnect, queue pair error, keep-alive expiry, controller teardown,
//! link loss): the queue pair goes to the error state, every posted request completes (flushed), every command
//! in flight finishes — a write whose completion was sent is already in the backend — and only then is the
//! queue pair destroyed and the core told. Asking twice is harmless.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use nvme_proto::fabrics::{
    ConnectData, ConnectParameter, connect_success_result, invalid_parameter_result, offset as connect_offset,
};
use nvme_proto::sgl::SglDescriptor;
use nvme_proto::{AdminCommand, Capsule, Command, Cqe, FabricsCommand, QueueKind, Sqe, Status};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use transport::{
    Buffer, Completion, CompletionQueue, ConnId, Device, QpTransition, QueuePair, SendOp, SendWr, SharedReceiveQueue,
    WcOpcode, WcStatus, WorkCompletion,
};

use super::listener::ListenerMsg;
use super::pool::{BufferPool, Lease};
use crate::admin::{AdminOutcome, admin_transfer};
use crate::controller::{ControllerCounters, ControllerId, QueueRef};
use crate::core::Target;
use crate::fabrics::{AdminBinding, IoBinding};
use crate::io::{IoPlan, Transfer};

/// Receive work requests carry this bit and their slot number.
pub(crate) const RECV_TAG: u64 = 1 << 63;
/// How long a draining queue waits for the transport to hand back its requests before giving them up.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Everything a queue holds in the transport. Whoever holds it tears it down with [`QueueSetup::release`]: the
/// acceptor when the queue never reached a group, the queue itself otherwise.
#[derive(Debug)]
pub(crate) struct QueueSetup {
    pub key: u64,
    pub device: Arc<Device>,
    /// Which opening of the listener's device this is: every reopen after a removal gets a new one.
    pub device_id: u64,
    pub qp: QueuePair,
    pub cq: CompletionQueue,
    pub conn: ConnId,
    pub qid: u16,
    pub depth: u16,
    /// The poll group's shared receive queue the queue pair takes its capsules from; `None`: its own receives.
    pub srq: Option<SharedReceiveQueue>,
    pub listener: mpsc::UnboundedSender<ListenerMsg>,
}

impl QueueSetup {
    /// Disconnects (when `connected`) and destroys the queue pair; outstanding requests are flushed by the
    /// device. Errors mean the connection or device is already gone, which is the goal.
    pub async fn release(&self, connected: bool) {
        if connected {
            let _ = self.device.disconnect(self.conn).await;
        }
        let _ = self.device.destroy_qp(&self.qp).await;
        let _ = self.listener.send(ListenerMsg::Forget { conn: self.conn, qpn: self.qp.qpn });
    }
}

pub(crate) enum QueueMsg {
    Close(&'static str),
    /// An asynchronous event may be ready.
    Poke,
}

#[derive(Debug, Clone)]
enum Binding {
    Connecting,
    Admin(AdminBinding),
    Io(IoBinding),
}

/// Data of one command while it is handled.
enum Data {
    None,
    Plain(Buffer),
    Pooled(Lease),
}

impl Data {
    fn bytes_mut(&mut self) -> &mut Buffer {
        match self {
            Data::Pooled(lease) => &mut lease.buf,
            Data::Plain(v) => v,
            Data::None => unreachable!("callers only ask for the bytes of a transfer"),
        }
    }
}

/// A command's completion, before it becomes a CQE.
struct Reply {
    status: Status,
    result: u64,
    /// Error-log details: parameter location, NSID, LBA.
    location: Option<u16>,
    nsid: u32,
    lba: u64,
    /// A read's data, posted as an RDMA WRITE and still on its way: the response goes out behind it without
    /// waiting (RC executes them in order, and a WRITE that fails takes the queue pair to the error state, so
    /// the response is then never delivered), as Linux nvmet chains them.
    data_in_flight: Option<DataInFlight>,
}

struct DataInFlight {
    completion: oneshot::Receiver<WorkCompletion>,
    wr_id: u64,
    lease: Lease,
}

impl Reply {
    fn ok(result: u64) -> Reply {
        Reply { status: Status::SUCCESS, result, location: None, nsid: 0, lba: 0, data_in_flight: None }
    }
    fn err(status: Status) -> Reply {
        Reply { status, result: 0, location: None, nsid: 0, lba: 0, data_in_flight: None }
    }
}

pub(crate) struct Queue {
    setup: QueueSetup,
    me: QueueRef,
    target: Arc<Target>,
    pool: Rc<BufferPool>,
    /// The group's count of commands answered.
    commands_completed: Rc<Cell<u64>>,
    kind: QueueKind,
    binding: RefCell<Binding>,
    draining: Cell<bool>,
    /// A close was requested from inside (error, flush, host disconnect).
    closing: Cell<bool>,
    waiters: RefCell<HashMap<u64, oneshot::Sender<WorkCompletion>>>,
    next_wr_id: Cell<u64>,
    sq_head: Cell<u16>,
    last_command: Cell<Instant>,
    kato: Cell<Option<Duration>>,
    close_request: Cell<Option<&'static str>>,
    close_notify: Notify,
}

fn lost(wr_id: u64, opcode: WcOpcode) -> WorkCompletion {
    WorkCompletion {
        wr_id,
        status: WcStatus::WrFlush,
        opcode,
        byte_len: 0,
        imm: None,
        invalidated_rkey: None,
        buf: Buffer::default(),
        sg_list: Vec::new(),
    }
}

impl Queue {
    pub fn new(
        setup: QueueSetup,
        group: usize,
        target: Arc<Target>,
        pool: Rc<BufferPool>,
        commands_completed: Rc<Cell<u64>>,
    ) -> Rc<Queue> {
        let kind = if setup.qid == 0 { QueueKind::Admin } else { QueueKind::Io };
        Rc::new(Queue {
            me: QueueRef { group, key: setup.key },
            setup,
            target,
            pool,
            commands_completed,
            kind,
            binding: RefCell::new(Binding::Connecting),
            draining: Cell::new(false),
            closing: Cell::new(false),
            waiters: RefCell::new(HashMap::new()),
            next_wr_id: Cell::new(1),
            sq_head: Cell::new(0),
            last_command: Cell::new(Instant::now()),
            kato: Cell::new(None),
            close_request: Cell::new(None),
            close_notify: Notify::new(),
        })
    }

    pub fn conn(&self) -> ConnId {
        self.setup.conn
    }

    /// Serves the queue until it is told to close or fails, then drains and releases it.
    pub async fn run(self: Rc<Self>, mut control: mpsc::UnboundedReceiver<QueueMsg>) {
        let mut tasks = JoinSet::new();
        let reason = loop {
            let deadline = self.kato.get().map(|k| self.last_command.get() + k);
            tokio::select! {
                c = self.setup.cq.next() => self.on_completion(c, &mut tasks),
                msg = control.recv() => match msg {
                    Some(QueueMsg::Close(reason)) => break reason,
                    Some(QueueMsg::Poke) => self.deliver_events(&mut tasks),
                    None => break "poll group stopped",
                },
                _ = self.close_notify.notified() => {
                    if let Some(reason) = self.close_request.take() {
                        break reason;
                    }
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    if self.last_command.get() + self.kato.get().unwrap_or_default() <= Instant::now() {
                        break "keep-alive timeout";
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        };
        self.drain(&mut tasks, reason).await;
    }

    fn request_close(&self, reason: &'static str) {
        self.close_request.set(Some(reason));
        self.close_notify.notify_one();
    }

    async fn drain(self: &Rc<Self>, tasks: &mut JoinSet<()>, reason: &'static str) {
        self.draining.set(true);
        let ctrl = self.controller();
        tracing::info!(
            qid = self.setup.qid,
            conn = self.setup.conn,
            cntlid = ctrl.map(|c| c.cntlid),
            "queue closing: {reason}"
        );
        let device = &self.setup.device;
        let _ = device.disconnect(self.setup.conn).await;
        let _ = device.modify_qp(&self.setup.qp, QpTransition::Error).await;
        let limit = tokio::time::sleep(DRAIN_LIMIT);
        tokio::pin!(limit);
        while !tasks.is_empty() {
            tokio::select! {
                c = self.setup.cq.next() => self.on_completion(c, tasks),
                _ = tasks.join_next() => {}
                _ = &mut limit => {
                    tracing::error!(qid = self.setup.qid, "transport did not hand back {} requests", self.waiters.borrow().len());
                    // Dropping the senders completes every waiter as lost.
                    self.waiters.borrow_mut().clear();
                    while tasks.join_next().await.is_some() {}
                }
            }
        }
        // What completed but was not read yet, and what destroying the queue pair flushes, still hands its
        // receive buffer back to the group's shared receive queue (it outlives this queue).
        self.take_leftovers(tasks);
        self.setup.release(false).await;
        self.take_leftovers(tasks);
        if let Some(ctrl) = ctrl {
            self.target.queue_closed(ctrl, self.me);
        }
    }

    fn take_leftovers(self: &Rc<Self>, tasks: &mut JoinSet<()>) {
        for c in self.setup.cq.poll(usize::MAX) {
            self.on_completion(c, tasks);
        }
    }

    fn controller(&self) -> Option<ControllerId> {
        match &*self.binding.borrow() {
            Binding::Admin(a) => Some(a.ctrl),
            Binding::Io(b) => Some(b.ctrl),
            Binding::Connecting => None,
        }
    }

    fn counters(&self) -> Option<Arc<ControllerCounters>> {
        match &*self.binding.borrow() {
            Binding::Admin(a) => Some(a.counters.clone()),
            Binding::Io(b) => Some(b.counters.clone()),
            Binding::Connecting => None,
        }
    }

    fn on_completion(self: &Rc<Self>, c: Completion, tasks: &mut JoinSet<()>) {
        let wc = c.wc;
        if wc.wr_id & RECV_TAG != 0 {
            if wc.status != WcStatus::Success {
                // A receive the queue pair had taken from the shared queue comes back with it.
                if self.setup.srq.is_some() && !wc.buf.is_empty() {
                    self.repost(wc.wr_id & !RECV_TAG, wc.buf);
                }
                // The queue pair left RTS (disconnect, error): every receive comes back flushed; say it once.
                if !self.draining.get() && !self.closing.replace(true) {
                    if wc.status == WcStatus::WrFlush {
                        tracing::debug!(qid = self.setup.qid, "receives flushed");
                    } else {
                        tracing::warn!(qid = self.setup.qid, status = ?wc.status, "receive failed");
                    }
                    self.request_close("queue pair left the ready state");
                }
                return;
            }
            if self.draining.get() {
                // Not served; a shared receive queue gets the buffer back.
                self.repost(wc.wr_id & !RECV_TAG, wc.buf);
                return;
            }
            let slot = wc.wr_id & !RECV_TAG;
            tasks.spawn_local(self.clone().command(slot, wc));
        } else if let Some(waiter) = self.waiters.borrow_mut().remove(&wc.wr_id) {
            if wc.status != WcStatus::Success
                && wc.status != WcStatus::WrFlush
                && !self.draining.get()
                && !self.closing.replace(true)
            {
                tracing::warn!(qid = self.setup.qid, status = ?wc.status, opcode = ?wc.opcode, "request failed");
                self.request_close("queue pair error");
            }
            let _ = waiter.send(wc);
        }
    }

    /// Posts a send-queue request and waits for its completion (which hands the buffer back).
    async fn post(&self, wr: SendWr) -> WorkCompletion {
        let opcode = wr.opcode();
        let (id, completion) = self.start(wr);
        completion.await.unwrap_or_else(|_| lost(id, opcode))
    }

    /// Posts a send-queue request; its completion arrives on the receiver (dropped unanswered if it could not
    /// be posted).
    fn start(&self, mut wr: SendWr) -> (u64, oneshot::Receiver<WorkCompletion>) {
        let id = self.next_wr_id.get();
        self.next_wr_id.set(id + 1);
        wr.wr_id = id;
        let (tx, rx) = oneshot::channel();
        self.waiters.borrow_mut().insert(id, tx);
        if self.setup.qp.post_send(wr).is_err() {
            self.waiters.borrow_mut().remove(&id);
        }
        (id, rx)
    }

    /// Hands a receive buffer back: to the group's shared receive queue always (it outlives this queue), to
    /// the queue pair's own receives unless the queue is draining.
    fn repost(&self, slot: u64, mut buf: Buffer) {
        if self.draining.get() && self.setup.srq.is_none() {
            return;
        }
        // Whole again, zeroing only what a transport cut off (zeroing 8 KiB per command was 3 % of a profile).
        let size = buf.capacity();
        if buf.len() < size {
            buf.resize(size, 0);
        }
        let wr = transport::RecvWr::new(RECV_TAG | slot, buf);
        let _ = match &self.setup.srq {
            Some(srq) => srq.post_recv(wr),
            None => self.setup.qp.post_recv(wr),
        };
    }

    /// One received capsule, from decoding to the response.
    async fn command(self: Rc<Self>, slot: u64, wc: WorkCompletion) {
        let recv = wc.buf;
        let len = (wc.byte_len as usize).min(recv.len());
        self.sq_head.set((self.sq_head.get() + 1) % self.setup.depth);
        if self.kind == QueueKind::Admin {
            self.last_command.set(Instant::now());
        }
        let capsule = &recv[..len];
        if capsule.len() < nvme_proto::sqe::SQE_LEN {
            // Not even a command: answer when its id is there, as a malformed command.
            if capsule.len() >= 4 {
                let cid = u16::from_le_bytes([capsule[2], capsule[3]]);
                self.respond(cid, Reply::err(Status::INVALID_FIELD.with_dnr()), None).await;
            } else {
                tracing::warn!(qid = self.setup.qid, len, "runt capsule dropped");
            }
            self.repost(slot, recv);
            return;
        }
        let sqe = *Sqe::parse(&capsule[..64]).expect("64 bytes");
        let cid = sqe.command_id();
        let invalidate = match SglDescriptor::parse(&sqe.dptr) {
            Ok(SglDescriptor::Keyed { key, invalidate: true, .. }) => Some(key),
            _ => None,
        };
        let parsed = Capsule::parse(&sqe, self.kind);
        let disconnect = matches!(&parsed, Ok(c) if c.command == Command::Fabrics(FabricsCommand::Disconnect));
        let reply = match parsed {
            Ok(c) => self.execute(c, &capsule[64..]).await,
            Err(e) => Some(Reply { location: Some(e.offset as u16), ..Reply::err(e.status) }),
        };
        // Hand the receive buffer back before answering: the host may send its next command as soon as it has
        // our response. (What the last capsule left in it is never read: a capsule is its completion's length.)
        self.repost(slot, recv);
        if let Some(reply) = reply {
            self.respond(cid, reply, invalidate).await;
        }
        if disconnect {
            self.request_close("host disconnect");
        }
    }

    async fn respond(&self, cid: u16, reply: Reply, invalidate: Option<u32>) {
        if !reply.status.is_success()
            && let Some(counters) = self.counters()
        {
            counters.record_error(self.setup.qid, cid, reply.status, reply.location, reply.nsid, reply.lba);
        }
        self.commands_completed.set(self.commands_completed.get() + 1);
        let cqe = Cqe::new(cid, self.setup.qid, self.sq_head.get(), reply.status, reply.result);
        let op = match invalidate {
            Some(rkey) => SendOp::SendWithInv(rkey),
            None => SendOp::Send,
        };
        let mut capsule = self.pool.take_response().await;
        capsule.copy_from_slice(&cqe.to_array());
        let wc = self.post(SendWr::new(0, op, capsule)).await;
        if wc.status != WcStatus::Success && !self.draining.get() {
            tracing::debug!(qid = self.setup.qid, cid, status = ?wc.status, "response not delivered");
        }
        self.pool.put_response(wc.buf);
        if let Some(DataInFlight { completion, wr_id, mut lease }) = reply.data_in_flight {
            let wc = completion.await.unwrap_or_else(|_| lost(wr_id, WcOpcode::RdmaWrite));
            if wc.status != WcStatus::Success && !self.draining.get() {
                tracing::debug!(qid = self.setup.qid, cid, status = ?wc.status, "read data not delivered");
            }
            lease.buf = wc.buf;
            self.pool.put(lease);
        }
    }

    /// Completes waiting AERs with waiting events.
    fn deliver_events(self: &Rc<Self>, tasks: &mut JoinSet<()>) {
        let Some(ctrl) = self.controller() else { return };
        while let Some((cid, dw0)) = self.target.take_async_event(ctrl) {
            let q = self.clone();
            tasks.spawn_local(async move { q.respond(cid, Reply::ok(dw0 as u64), None).await });
        }
    }

    /// Runs a decoded command; `None` when its completion comes later (AER).
    async fn execute(self: &Rc<Self>, capsule: Capsule, inline: &[u8]) -> Option<Reply> {
        let binding = self.binding.borrow().clone();
        Some(match (&binding, capsule.command) {
            (Binding::Connecting, Command::Fabrics(FabricsCommand::Connect(connect))) => {
                self.connect(&capsule, connect, inline).await
            }
            (Binding::Connecting, _) | (_, Command::Fabrics(FabricsCommand::Connect(_))) => {
                Reply::err(Status::COMMAND_SEQUENCE_ERROR.with_dnr())
            }
            (Binding::Admin(a), Command::Fabrics(FabricsCommand::PropertyGet { property })) => {
                match self.check_data(&capsule.data, Transfer::None, inline) {
                    Err(status) => Reply::err(status),
                    Ok(()) => match self.target.property_get(a.ctrl, property) {
                        Ok(v) => Reply::ok(v),
                        Err(s) => Reply::err(s),
                    },
                }
            }
            (Binding::Admin(a), Command::Fabrics(FabricsCommand::PropertySet { property, value })) => {
                match self.check_data(&capsule.data, Transfer::None, inline) {
                    Err(status) => Reply::err(status),
                    Ok(()) => match self.target.property_set(a.ctrl, property, value) {
                        Ok(()) => Reply::ok(0),
                        Err(s) => Reply::err(s),
                    },
                }
            }
            (Binding::Io(_), Command::Fabrics(FabricsCommand::Disconnect)) => Reply::ok(0),
            (Binding::Admin(a), Command::Admin(cmd)) => return self.admin(a, capsule, cmd, inline).await,
            (Binding::Io(b), Command::Io(cmd)) => self.io(b, &capsule, cmd, inline).await,
            _ => Reply::err(Status::INVALID_OPCODE.with_dnr()),
        })
    }

    async fn connect(
        self: &Rc<Self>,
        capsule: &Capsule,
        connect: nvme_proto::fabrics::Connect,
        inline: &[u8],
    ) -> Reply {
        let transfer = Transfer::ToController(nvme_proto::fabrics::CONNECT_DATA_LEN as u32);
        let mut data = match self.fetch(&capsule.data, transfer, inline).await {
            Ok(d) => d,
            Err(status) => return Reply::err(status),
        };
        let parsed = ConnectData::parse(data.bytes_mut());
        self.release(data);
        let invalid = |p| Reply {
            result: invalid_parameter_result(p) as u64,
            ..Reply::err(Status::CONNECT_INVALID_PARAMETERS.with_dnr())
        };
        let data = match parsed {
            Ok(d) => d,
            Err(e) => {
                return Reply {
                    result: invalid_parameter_result(ConnectParameter::Data(e.offset as u16)) as u64,
                    ..Reply::err(e.status)
                };
            }
        };
        if connect.qid != self.setup.qid {
            // The Connect must name the queue the CM request created.
            return invalid(ConnectParameter::Command(connect_offset::CONNECT_QID as u16));
        }
        let depth = self.setup.depth;
        if connect.qid == 0 {
            match self.target.connect_admin(&connect, &data, self.me, depth) {
                Ok(binding) => {
                    let cntlid = binding.ctrl.cntlid;
                    self.kato.set(binding.kato);
                    self.last_command.set(Instant::now());
                    *self.binding.borrow_mut() = Binding::Admin(binding);
                    Reply::ok(connect_success_result(cntlid) as u64)
                }
                Err(f) => Reply { result: f.result as u64, ..Reply::err(f.status) },
            }
        } else {
            match self.target.connect_io(&connect, &data, self.me, depth) {
                Ok(binding) => {
                    let cntlid = binding.ctrl.cntlid;
                    *self.binding.borrow_mut() = Binding::Io(binding);
                    Reply::ok(connect_success_result(cntlid) as u64)
                }
                Err(f) => Reply { result: f.result as u64, ..Reply::err(f.status) },
            }
        }
    }

    async fn admin(
        self: &Rc<Self>,
        binding: &AdminBinding,
        capsule: Capsule,
        cmd: AdminCommand,
        inline: &[u8],
    ) -> Option<Reply> {
        let len = admin_transfer(&cmd);
        let transfer = match u32::try_from(len) {
            Ok(0) => Transfer::None,
            Ok(n) if n <= self.target.limits.max_io_size => Transfer::ToHost(n),
            _ => return Some(Reply::err(Status::INVALID_FIELD.with_dnr())),
        };
        if let Err(status) = self.check_data(&capsule.data, transfer, inline) {
            return Some(Reply::err(status));
        }
        let mut kato = None;
        let outcome = self.target.admin_command(binding.ctrl, capsule.command_id, &cmd, &mut kato);
        if let Some(new) = kato {
            self.kato.set(new);
        }
        match outcome {
            AdminOutcome::Deferred => {
                // The event may already be waiting.
                let ctrl = self.controller()?;
                if let Some((cid, dw0)) = self.target.take_async_event(ctrl) {
                    let q = self.clone();
                    tokio::task::spawn_local(async move { q.respond(cid, Reply::ok(dw0 as u64), None).await });
                }
                None
            }
            AdminOutcome::Done { status, result, data } => {
                if !status.is_success() {
                    return Some(Reply { result, ..Reply::err(status) });
                }
                if let Transfer::ToHost(n) = transfer {
                    let mut data = Data::Plain(Buffer::from(data));
                    data.bytes_mut().resize(n as usize, 0);
                    let sent = self.deliver(&capsule.data, &mut data).await;
                    self.release(data);
                    if let Err(status) = sent {
                        return Some(Reply::err(status));
                    }
                }
                Some(Reply::ok(result))
            }
        }
    }

    async fn io(
        self: &Rc<Self>,
        binding: &IoBinding,
        capsule: &Capsule,
        cmd: nvme_proto::IoCommand,
        inline: &[u8],
    ) -> Reply {
        let plan = match IoPlan::new(&binding.subsystem, &cmd, self.target.limits.max_io_size) {
            Ok(p) => p,
            Err(status) => {
                let (nsid, lba) = io_location(&cmd);
                return Reply { nsid, lba, ..Reply::err(status) };
            }
        };
        let (nsid, lba) = plan.location();
        let fail = |status| Reply { nsid, lba, ..Reply::err(status) };
        let transfer = plan.transfer();
        let mut data = match transfer {
            Transfer::ToController(_) => match self.fetch(&capsule.data, transfer, inline).await {
                Ok(d) => d,
                Err(status) => return fail(status),
            },
            Transfer::ToHost(n) => {
                if let Err(status) = self.check_data(&capsule.data, transfer, inline) {
                    return fail(status);
                }
                Data::Pooled(self.pool.take(n as usize).await)
            }
            Transfer::None => {
                if let Err(status) = self.check_data(&capsule.data, transfer, inline) {
                    return fail(status);
                }
                Data::None
            }
        };
        let counters = binding.counters.clone();
        let result = if plan.may_block() {
            let mut buf = match &mut data {
                Data::None => Buffer::default(),
                d => std::mem::take(d.bytes_mut()),
            };
            let joined = tokio::task::spawn_blocking(move || {
                let r = plan.execute(&mut buf, &counters);
                (r, buf)
            })
            .await;
            match joined {
                Ok((r, buf)) => {
                    if !matches!(data, Data::None) {
                        *data.bytes_mut() = buf;
                    }
                    r
                }
                Err(e) => {
                    tracing::error!("backend task failed: {e}");
                    Err(Status::INTERNAL)
                }
            }
        } else {
            let mut empty = Buffer::default();
            let buf = match &mut data {
                Data::None => &mut empty,
                d => d.bytes_mut(),
            };
            plan.execute(buf, &counters)
        };
        match (result, data, &capsule.data) {
            (Err(status), data, _) => {
                self.release(data);
                fail(status)
            }
            (Ok(()), Data::Pooled(mut lease), &SglDescriptor::Keyed { address, key, .. })
                if matches!(transfer, Transfer::ToHost(_)) =>
            {
                let buf = std::mem::take(&mut lease.buf);
                let (wr_id, completion) =
                    self.start(SendWr::new(0, SendOp::RdmaWrite { remote_addr: address, rkey: key }, buf));
                Reply { data_in_flight: Some(DataInFlight { completion, wr_id, lease }), ..Reply::ok(0) }
            }
            (Ok(()), data, _) => {
                // check_data admitted only keyed descriptors for data to the host.
                let unsent = matches!(transfer, Transfer::ToHost(_));
                self.release(data);
                if unsent { fail(Status::SGL_INVALID_TYPE.with_dnr()) } else { Reply::ok(0) }
            }
        }
    }

    /// Checks the command's data descriptor against what the command moves (Linux
    /// `nvmet_check_transfer_len`): the lengths must match, in-capsule data only flows to the controller, at
    /// offset 0, within what arrived.
    fn check_data(&self, sgl: &SglDescriptor, transfer: Transfer, inline: &[u8]) -> Result<(), Status> {
        let sgl = sgl.for_rdma().map_err(|e| e.status)?;
        let want = match transfer {
            Transfer::None => 0,
            Transfer::ToController(n) | Transfer::ToHost(n) => n,
        };
        match sgl {
            SglDescriptor::Keyed { length, .. } if length.get() != want => {
                Err(Status::SGL_INVALID_DATA_LENGTH.with_dnr())
            }
            SglDescriptor::Keyed { .. } => Ok(()),
            SglDescriptor::InCapsule { length: 0, .. } if want == 0 => Ok(()),
            SglDescriptor::InCapsule { .. } if matches!(transfer, Transfer::ToHost(_)) => {
                Err(Status::SGL_INVALID_TYPE.with_dnr())
            }
            SglDescriptor::InCapsule { offset, .. } if offset != 0 => Err(Status::SGL_INVALID_OFFSET.with_dnr()),
            SglDescriptor::InCapsule { length, .. } => {
                let fits = length as usize <= inline.len() && length <= self.target.limits.in_capsule_data_size;
                if length != want || !fits { Err(Status::SGL_INVALID_DATA_LENGTH.with_dnr()) } else { Ok(()) }
            }
            SglDescriptor::Segment { .. } => Err(Status::SGL_INVALID_TYPE.with_dnr()),
        }
    }

    /// The host's data for a host → controller transfer: from the capsule, or by RDMA READ into a pool buffer.
    async fn fetch(&self, sgl: &SglDescriptor, transfer: Transfer, inline: &[u8]) -> Result<Data, Status> {
        self.check_data(sgl, transfer, inline)?;
        let Transfer::ToController(len) = transfer else { return Ok(Data::None) };
        match *sgl {
            SglDescriptor::InCapsule { .. } => Ok(Data::Plain(Buffer::from(&inline[..len as usize]))),
            SglDescriptor::Keyed { address, key, .. } => {
                let mut lease = self.pool.take(len as usize).await;
                let buf = std::mem::take(&mut lease.buf);
                let wc = self.post(SendWr::new(0, SendOp::RdmaRead { remote_addr: address, rkey: key }, buf)).await;
                lease.buf = wc.buf;
                if wc.status != WcStatus::Success || lease.buf.len() != len as usize {
                    self.pool.put(lease);
                    return Err(Status::DATA_TRANSFER_ERROR);
                }
                Ok(Data::Pooled(lease))
            }
            SglDescriptor::Segment { .. } => Err(Status::SGL_INVALID_TYPE.with_dnr()),
        }
    }

    /// Sends controller → host data by RDMA WRITE to the host's keyed buffer.
    async fn deliver(&self, sgl: &SglDescriptor, data: &mut Data) -> Result<(), Status> {
        let SglDescriptor::Keyed { address, key, .. } = *sgl else { return Err(Status::SGL_INVALID_TYPE.with_dnr()) };
        let bytes = data.bytes_mut();
        let buf = std::mem::take(bytes);
        let wc = self.post(SendWr::new(0, SendOp::RdmaWrite { remote_addr: address, rkey: key }, buf)).await;
        *bytes = wc.buf;
        if wc.status != WcStatus::Success {
            return Err(Status::DATA_TRANSFER_ERROR);
        }
        Ok(())
    }

    fn release(&self, data: Data) {
        if let Data::Pooled(lease) = data {
            self.pool.put(lease);
        }
    }
}

/// NSID and starting LBA a command names, for the error log.
fn io_location(cmd: &nvme_proto::IoCommand) -> (u32, u64) {
    use nvme_proto::IoCommand::*;
    match cmd {
        Read(r) | Write(r) | WriteZeroes(r) => (r.nsid, r.slba),
        Flush { nsid } => (*nsid, 0),
        DatasetManagement(d) => (d.nsid, 0),
    }
}
