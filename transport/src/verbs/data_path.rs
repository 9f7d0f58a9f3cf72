//! A verbs data path: the libibverbs objects one thread owns — a device context of its own, its completion
//! channel, protection domains, regions, shared receive queues, queue pairs and their completion queues — and
//! the posting and completing of work requests on them. The device's worker has one for the queue pairs it keeps
//! itself; each lane (`lane`) has one on the thread that runs it. Nothing in it is reached from another thread:
//! the objects are `Rc`, and the connection manager (the worker's) tells the owner by message what it decided.
//!
//! A buffer carved from an arena the application registered here ([`crate::Buffer::carve`],
//! `Device::pin_on_lane`) is posted in place: the device reads and writes it while the data path holds it, and
//! the completion hands it back. Any other buffer is staged through a registered buffer the data path owns
//! (copied in before posting, copied out on completion), so a buffer handed back by a completion can be used at
//! once, whatever the device still does.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;

use tokio::sync::mpsc;

use super::ffi::{self, QpAttr, SendKind};
use crate::buffer::Buffer;
use crate::device::{Completion, CompletionQueue, DeviceError, DeviceEvent, MemoryRegion, QpState, QpTransition};
use crate::region::{Access, RegionKeys, RegionMemory};
use crate::work_request::{RecvWr, SendOp, SendWr, WcOpcode, WcStatus, WorkCompletion};

/// Work requests each queue pair has on the device at once; more wait here (a full queue is not an error for
/// the application).
const SEND_DEPTH: usize = 256;
const RECV_DEPTH: usize = 256;
const SRQ_DEPTH: usize = 1024;
/// Completions the data path's one CQ starts with room for; it grows (`ibv_resize_cq`) so that every request
/// that can be outstanding at once has a place: an overflowing CQ breaks every queue pair on it.
const CQ_INITIAL: usize = 8192;

/// Staging buffers kept per size class and queue, beyond which returned ones are deregistered: enough for a
/// queue's requests in flight (a read at QD 32 holds 64: its data and its response), within a byte budget per
/// class. Registering one is a pinned page and a zeroed buffer: it must not happen per I/O.
const STAGING_KEEP_BYTES: usize = 1 << 20;
const STAGING_KEEP_MIN: usize = 64;
const STAGING_KEEP_MAX: usize = 1024;
/// The smallest staging buffer (a response capsule is 16 bytes).
const STAGING_MIN_CLASS: usize = 256;

/// A hasher for the numbers this module keys its tables by — request keys it hands out in sequence, queue pair
/// numbers, region keys and queue ids the library or the worker gives — none of them chosen by a peer; SipHash
/// was 1.4 % of a target's profile.
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        // splitmix64's finaliser: every bit of the key reaches the low bits the table picks buckets by (a plain
        // multiply would leave keys alike in their low bits, as region keys are, in one bucket).
        let mut z = (self.0 ^ n).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.0 = z ^ (z >> 31);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type KeyMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

pub(super) fn verbs(e: ffi::VerbsError) -> DeviceError {
    DeviceError::Verbs { call: e.call, source: e.source }
}

/// Registered buffers a queue stages its requests through, by size class.
#[derive(Default)]
struct Staging {
    free: HashMap<usize, Vec<ffi::MemoryRegion>>,
}

impl Staging {
    fn take(&mut self, pd: &Rc<ffi::Pd>, len: usize) -> Result<Option<ffi::MemoryRegion>, ffi::VerbsError> {
        if len == 0 {
            return Ok(None);
        }
        let class = len.next_power_of_two().max(STAGING_MIN_CLASS);
        if let Some(mr) = self.free.get_mut(&class).and_then(Vec::pop) {
            return Ok(Some(mr));
        }
        ffi::MemoryRegion::register(pd, vec![0; class], ffi::RegionAccess { local_write: true, ..Default::default() })
            .map(Some)
            .map_err(|(e, _)| e)
    }

    fn give(&mut self, mr: ffi::MemoryRegion) {
        let keep = (STAGING_KEEP_BYTES / mr.len().max(1)).clamp(STAGING_KEEP_MIN, STAGING_KEEP_MAX);
        let free = self.free.entry(mr.len()).or_default();
        if free.len() < keep {
            free.push(mr);
        }
    }

    fn count(&self) -> usize {
        self.free.values().map(Vec::len).sum()
    }
}

/// Where a posted request's staging buffer goes back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Qp(u32),
    Srq(u32),
}

/// A request on the device.
struct Pending {
    owner: Owner,
    wr_id: u64,
    /// `None` for a receive.
    op: Option<SendOp>,
    buf: Buffer,
    sg_list: Vec<Buffer>,
    staging: Option<ffi::MemoryRegion>,
    len: usize,
}

impl Pending {
    fn receive(owner: Owner, wr: RecvWr, staging: Option<ffi::MemoryRegion>, len: usize) -> Pending {
        Pending { owner, wr_id: wr.wr_id, op: None, buf: wr.buf, sg_list: wr.sg_list, staging, len }
    }

    fn send(qpn: u32, wr: SendWr, staging: Option<ffi::MemoryRegion>, len: usize) -> Pending {
        Pending {
            owner: Owner::Qp(qpn),
            wr_id: wr.wr_id,
            op: Some(wr.op),
            buf: wr.buf,
            sg_list: wr.sg_list,
            staging,
            len,
        }
    }
}

struct QpSlot {
    qp: ffi::Qp,
    pd: u32,
    srq: Option<u32>,
    state: QpState,
    send_cq: CompletionQueue,
    recv_cq: CompletionQueue,
    sends_posted: usize,
    recvs_posted: usize,
    send_backlog: VecDeque<SendWr>,
    recv_backlog: VecDeque<RecvWr>,
    staging: Staging,
    fatal_reported: bool,
    /// Sends prepared (staged, in `pending`) this turn, posted as one chain at its end ([`DataPath::post_chains`]).
    chain: Vec<ffi::SendRequest>,
    /// Posted unsignalled sends, oldest first: each completes when a later send of this queue pair does.
    unsignaled: VecDeque<u64>,
}

struct SrqSlot {
    srq: Option<Rc<ffi::Srq>>,
    pd: u32,
    posted: usize,
    backlog: VecDeque<RecvWr>,
    staging: Staging,
}

struct Region {
    pd: u32,
    mr: Option<ffi::MemoryRegion>,
    /// The buffer, once the device was removed under the region.
    kept: Option<Vec<u8>>,
}

/// The device objects of a data path; dropped as a whole when the device is removed.
struct Live {
    // Field order is drop order: the completion channel before the context.
    comp: Rc<ffi::CompChannel>,
    context: Rc<ffi::Context>,
}

pub(super) struct DataPath {
    live: Option<Live>,
    port: u8,
    events: mpsc::UnboundedSender<DeviceEvent>,
    /// `None`: the device was removed under the domain.
    pds: HashMap<u32, Option<Rc<ffi::Pd>>>,
    /// Regions and arenas by lkey: a region without remote access has no rkey to tell it apart (rxe gives
    /// every such region rkey 0).
    regions: KeyMap<u32, Region>,
    /// Arenas registered once, with their domain: buffers in them are posted in place.
    pinned: KeyMap<u32, (u32, ffi::PinnedRegion)>,
    srqs: KeyMap<u32, SrqSlot>,
    qps: KeyMap<u32, QpSlot>,
    /// The one completion queue of every queue pair here (made with the first), its size, and the completions
    /// its queue pairs and shared receive queues can have outstanding at once.
    cq: Option<(Rc<ffi::Cq>, usize)>,
    cq_reserved: usize,
    pending: KeyMap<u64, Pending>,
    next_wr: u64,
    /// Queue pairs the device's removal destroyed, until the application destroys them too: what it still
    /// posts there comes back flushed (its buffers are not lost).
    removed_qps: HashMap<u32, (CompletionQueue, CompletionQueue)>,
    /// Queue pairs with a chain of sends to post at the end of this turn.
    chained: Vec<u32>,
}

pub(super) fn flushed(
    wr_id: u64,
    op: Option<SendOp>,
    buf: Buffer,
    sg_list: Vec<Buffer>,
    status: WcStatus,
) -> WorkCompletion {
    let opcode = op.map_or(WcOpcode::Recv, |op| SendWr::new(0, op, Buffer::default()).opcode());
    WorkCompletion { wr_id, status, opcode, byte_len: 0, imm: None, invalidated_rkey: None, buf, sg_list }
}

fn wc_status(status: u32) -> WcStatus {
    use ffi::wc_status as s;
    match status {
        s::IBV_WC_SUCCESS => WcStatus::Success,
        s::IBV_WC_LOC_LEN_ERR => WcStatus::LocalLength,
        s::IBV_WC_LOC_PROT_ERR => WcStatus::LocalProtection,
        s::IBV_WC_WR_FLUSH_ERR => WcStatus::WrFlush,
        s::IBV_WC_REM_INV_REQ_ERR => WcStatus::RemoteInvalidRequest,
        s::IBV_WC_REM_ACCESS_ERR => WcStatus::RemoteAccess,
        s::IBV_WC_REM_OP_ERR => WcStatus::RemoteOperation,
        s::IBV_WC_RETRY_EXC_ERR => WcStatus::RetryExceeded,
        s::IBV_WC_RNR_RETRY_EXC_ERR => WcStatus::RnrRetryExceeded,
        s::IBV_WC_BAD_RESP_ERR => WcStatus::BadResponse,
        _ => WcStatus::LocalQpOperation,
    }
}

fn data_len(buf: &Buffer, sg_list: &[Buffer]) -> usize {
    if sg_list.is_empty() { buf.len() } else { sg_list.iter().map(|s| s.len()).sum() }
}

impl DataPath {
    /// A data path on `context` (its completion channel made here).
    pub fn new(
        context: Rc<ffi::Context>,
        port: u8,
        events: mpsc::UnboundedSender<DeviceEvent>,
    ) -> Result<DataPath, DeviceError> {
        let comp = ffi::CompChannel::new(&context).map_err(verbs)?;
        let mut data = DataPath::gone(port, events);
        data.live = Some(Live { comp, context });
        Ok(data)
    }

    /// A data path whose device is already gone: everything posted comes back flushed, nothing can be made.
    pub fn gone(port: u8, events: mpsc::UnboundedSender<DeviceEvent>) -> DataPath {
        DataPath {
            live: None,
            port,
            events,
            pds: HashMap::new(),
            regions: KeyMap::default(),
            pinned: KeyMap::default(),
            srqs: KeyMap::default(),
            qps: KeyMap::default(),
            cq: None,
            cq_reserved: 0,
            pending: KeyMap::default(),
            next_wr: 1,
            removed_qps: HashMap::new(),
            chained: Vec::new(),
        }
    }

    pub fn context(&self) -> Option<&Rc<ffi::Context>> {
        self.live.as_ref().map(|l| &l.context)
    }

    /// The completion channel's and the context's async-event descriptors, for the owner's reactor.
    pub fn watch(&self) -> std::io::Result<(ffi::Watched, ffi::Watched)> {
        let live = self.live.as_ref().ok_or_else(|| std::io::Error::other("the device is gone"))?;
        live.context.set_async_nonblocking().map_err(|e| e.source)?;
        Ok((live.comp.watch()?, live.context.watch_async()?))
    }

    fn alive(&self) -> Result<&Live, DeviceError> {
        self.live.as_ref().ok_or(DeviceError::Closed)
    }

    fn pd(&self, pd: u32) -> Result<Rc<ffi::Pd>, DeviceError> {
        match self.pds.get(&pd) {
            Some(Some(p)) => Ok(Rc::clone(p)),
            Some(None) => Err(DeviceError::Closed),
            None => Err(DeviceError::UnknownPd(pd)),
        }
    }

    /// A protection domain under the caller's number (the device's worker numbers every domain of the device).
    pub fn add_pd(&mut self, id: u32) -> Result<(), DeviceError> {
        let pd = ffi::Pd::new(&self.alive()?.context).map_err(verbs)?;
        self.pds.insert(id, Some(pd));
        Ok(())
    }

    /// Domain `id`, made here on first use (a lane's domains mirror the device's).
    pub fn ensure_pd(&mut self, id: u32) -> Result<(), DeviceError> {
        if self.pds.contains_key(&id) { Ok(()) } else { self.add_pd(id) }
    }

    /// Frees a domain; refused while regions, queue pairs or shared receive queues of it are here.
    pub fn dealloc_pd(&mut self, pd: u32) -> Result<(), DeviceError> {
        if !self.pds.contains_key(&pd) {
            Err(DeviceError::UnknownPd(pd))
        } else if self.pd_busy(pd) {
            Err(DeviceError::PdBusy(pd))
        } else {
            self.pds.remove(&pd);
            Ok(())
        }
    }

    pub fn pd_busy(&self, pd: u32) -> bool {
        self.regions.values().any(|r| r.pd == pd)
            || self.pinned.values().any(|(p, _)| *p == pd)
            || self.qps.values().any(|q| q.pd == pd)
            || self.srqs.values().any(|s| s.pd == pd)
    }

    pub fn register(&mut self, pd: u32, memory: RegionMemory, access: Access) -> Result<MemoryRegion, DeviceError> {
        let p = self.pd(pd)?;
        let access = ffi::RegionAccess {
            local_write: access.local_write,
            remote_read: access.remote_read,
            remote_write: access.remote_write,
        };
        let buf = match memory {
            RegionMemory::Owned(buf) => buf,
            RegionMemory::Pinned(pinned) => {
                let mr = ffi::PinnedRegion::register(&p, pinned, access).map_err(|(e, _)| verbs(e))?;
                let keys = RegionKeys { lkey: mr.lkey(), rkey: mr.rkey(), addr: mr.addr(), len: mr.len() };
                self.pinned.insert(keys.lkey, (pd, mr));
                return Ok(MemoryRegion { keys });
            }
        };
        // The FFI region owns a `Vec` (moved, not copied, for memory of its own; a piece of an arena is copied
        // out — its arena is the way to post it in place).
        let mr = ffi::MemoryRegion::register(&p, buf.into_vec(), access).map_err(|(e, _)| verbs(e))?;
        let keys = RegionKeys { lkey: mr.lkey(), rkey: mr.rkey(), addr: mr.addr(), len: mr.len() };
        self.regions.insert(keys.lkey, Region { pd, mr: Some(mr), kept: None });
        Ok(MemoryRegion { keys })
    }

    pub fn deregister(&mut self, key: u32) -> Result<Buffer, DeviceError> {
        match self.regions.remove(&key) {
            Some(Region { mr: Some(mr), .. }) => Ok(mr.into_buffer().into()),
            Some(Region { kept, .. }) => Ok(kept.unwrap_or_default().into()),
            // An arena's memory is its pieces': nothing to hand back.
            None if self.pinned.remove(&key).is_some() => Ok(Buffer::default()),
            None => Err(DeviceError::UnknownRegion(key)),
        }
    }

    /// The entry for a request's data where it is, if it is one buffer carved from an arena of domain `pd`
    /// registered here (no staging then).
    fn in_place(&self, pd: u32, buf: &Buffer, sg_list: &[Buffer]) -> Option<ffi::Sge> {
        if !sg_list.is_empty() || buf.is_empty() || self.pinned.is_empty() {
            return None;
        }
        self.pinned.values().filter(|(p, _)| *p == pd).find_map(|(_, mr)| mr.sge(buf.address(), buf.len()))
    }

    pub fn create_srq(&mut self, id: u32, pd: u32) -> Result<(), DeviceError> {
        let srq = ffi::Srq::new(&self.pd(pd)?, SRQ_DEPTH as u32).map_err(verbs)?;
        let slot = SrqSlot { srq: Some(srq), pd, posted: 0, backlog: VecDeque::new(), staging: Staging::default() };
        self.srqs.insert(id, slot);
        // Its receives complete on the CQ of whichever queue pair takes them: the one CQ.
        self.cq_reserved += SRQ_DEPTH;
        Ok(())
    }

    /// The CQ, with room for `more` completions beyond what is reserved already.
    fn cq_for(&mut self, more: usize) -> Result<Rc<ffi::Cq>, DeviceError> {
        let need = self.cq_reserved + more;
        let live = self.live.as_ref().ok_or(DeviceError::Closed)?;
        match &mut self.cq {
            Some((cq, size)) => {
                if need > *size {
                    let grown = need.next_power_of_two();
                    // A device that cannot resize (or not that far) takes no more queue pairs here: an
                    // overflowing CQ would break every one of them.
                    cq.resize(u32::try_from(grown).unwrap_or(u32::MAX)).map_err(verbs)?;
                    tracing::debug!(from = *size, to = grown, "completion queue grown");
                    *size = grown;
                }
                Ok(Rc::clone(cq))
            }
            None => {
                let size = need.max(CQ_INITIAL).next_power_of_two();
                let cq =
                    ffi::Cq::new(&live.context, &live.comp, u32::try_from(size).unwrap_or(u32::MAX)).map_err(verbs)?;
                self.cq = Some((Rc::clone(&cq), size));
                Ok(cq)
            }
        }
    }

    pub fn create_qp(
        &mut self,
        pd: u32,
        send_cq: CompletionQueue,
        recv_cq: CompletionQueue,
        srq: Option<u32>,
    ) -> Result<u32, DeviceError> {
        let p = self.pd(pd)?;
        self.alive()?;
        let srq_rc = match srq {
            Some(id) => match self.srqs.get(&id) {
                Some(SrqSlot { srq: Some(s), pd: spd, .. }) if *spd == pd => Some(Rc::clone(s)),
                _ => return Err(DeviceError::UnknownSrq(id)),
            },
            None => None,
        };
        let entries = SEND_DEPTH + if srq.is_some() { 0 } else { RECV_DEPTH };
        let cq = self.cq_for(entries)?;
        let qp = ffi::Qp::new(&p, &cq, srq_rc.as_ref(), SEND_DEPTH as u32, RECV_DEPTH as u32).map_err(verbs)?;
        // INIT at once: receives may be posted before the connection exists.
        qp.init(self.port).map_err(verbs)?;
        self.cq_reserved += entries;
        let qpn = qp.qp_num();
        self.qps.insert(
            qpn,
            QpSlot {
                qp,
                pd,
                srq,
                state: QpState::Init,
                send_cq,
                recv_cq,
                sends_posted: 0,
                recvs_posted: 0,
                send_backlog: VecDeque::new(),
                recv_backlog: VecDeque::new(),
                staging: Staging::default(),
                fatal_reported: false,
                chain: Vec::new(),
                unsignaled: VecDeque::new(),
            },
        );
        Ok(qpn)
    }

    /// Whether `qpn` may be connected (`to` names the step for the error), and whether it takes its receives
    /// from a shared receive queue.
    pub fn connectable(&self, qpn: u32, to: &'static str) -> Result<bool, DeviceError> {
        let slot = self.qps.get(&qpn).ok_or(DeviceError::UnknownQp(qpn))?;
        if slot.state != QpState::Init {
            return Err(DeviceError::BadTransition { qpn, from: slot.state, to });
        }
        Ok(slot.srq.is_some())
    }

    /// The connection manager's attributes for a connection, applied in order (INIT, RTR, RTS).
    pub fn connect_qp(&mut self, qpn: u32, attrs: &mut [QpAttr]) -> Result<(), DeviceError> {
        let slot = self.qps.get_mut(&qpn).ok_or(DeviceError::UnknownQp(qpn))?;
        for attr in attrs {
            slot.qp.modify(attr).map_err(verbs)?;
        }
        Ok(())
    }

    /// The connection is up: sends that waited for it go.
    pub fn established(&mut self, qpn: u32) {
        if let Some(slot) = self.qps.get_mut(&qpn)
            && slot.state == QpState::Init
        {
            slot.state = QpState::Rts;
        }
        self.drain_backlogs(Owner::Qp(qpn));
    }

    /// To the error state: outstanding work completes as flushed.
    pub fn fail_qp(&mut self, qpn: u32) {
        if let Some(slot) = self.qps.get_mut(&qpn) {
            let _ = slot.qp.to_error();
            slot.state = QpState::Error;
        }
    }

    /// The connection will not come up: sends that waited for it fail.
    pub fn fail_backlog(&mut self, qpn: u32) {
        if let Some(slot) = self.qps.get_mut(&qpn) {
            for wr in slot.send_backlog.drain(..) {
                let wc = flushed(wr.wr_id, Some(wr.op), wr.buf, wr.sg_list, WcStatus::WrFlush);
                slot.send_cq.push(Completion { qpn, wc });
            }
        }
    }

    /// `Device::modify_qp`: only to ERR here (rdma_cm makes every other transition).
    pub fn modify_by_hand(&mut self, qpn: u32, transition: QpTransition) -> Result<QpState, DeviceError> {
        match (self.qps.contains_key(&qpn), transition) {
            (false, _) => Err(DeviceError::UnknownQp(qpn)),
            (true, QpTransition::Error) => {
                self.fail_qp(qpn);
                Ok(QpState::Error)
            }
            (true, _) => Err(DeviceError::Unsupported(
                "moving a queue pair by hand: the verbs provider connects queue pairs through rdma_cm",
            )),
        }
    }

    /// A device event about one of our queue pairs.
    pub fn qp_fatal(&mut self, qpn: u32, kind: &'static str) {
        let Some(slot) = self.qps.get_mut(&qpn) else { return };
        slot.state = QpState::Error;
        if !std::mem::replace(&mut slot.fatal_reported, true) {
            tracing::warn!(qpn, "queue pair error: {kind}");
            let _ = self.events.send(DeviceEvent::QpFatal { qpn, cause: WcStatus::LocalQpOperation });
        }
    }

    pub fn destroy_srq(&mut self, id: u32) -> Result<Vec<RecvWr>, DeviceError> {
        if self.qps.values().any(|q| q.srq == Some(id)) {
            return Err(DeviceError::SrqBusy(id));
        }
        let mut slot = self.srqs.remove(&id).ok_or(DeviceError::UnknownSrq(id))?;
        self.cq_reserved = self.cq_reserved.saturating_sub(SRQ_DEPTH);
        // The device lets go of the posted receives' buffers with the SRQ.
        drop(slot.srq.take());
        let keys: Vec<u64> = self.pending.iter().filter(|(_, p)| p.owner == Owner::Srq(id)).map(|(k, _)| *k).collect();
        let mut back: Vec<RecvWr> = Vec::new();
        for key in keys {
            if let Some(p) = self.pending.remove(&key) {
                back.push(RecvWr { wr_id: p.wr_id, buf: p.buf, sg_list: p.sg_list });
            }
        }
        back.extend(slot.backlog.drain(..));
        Ok(back)
    }

    pub fn post_srq_recv(&mut self, id: u32, wr: RecvWr) {
        let Some(slot) = self.srqs.get_mut(&id) else {
            tracing::warn!(srq = id, wr_id = wr.wr_id, "receive posted on a destroyed shared receive queue");
            return;
        };
        if slot.srq.is_none() || slot.posted >= SRQ_DEPTH {
            slot.backlog.push_back(wr);
            return;
        }
        self.post_srq_recv_now(id, wr);
    }

    fn post_srq_recv_now(&mut self, id: u32, wr: RecvWr) {
        let Some(slot) = self.srqs.get_mut(&id) else { return };
        let Some(srq) = slot.srq.clone() else {
            slot.backlog.push_back(wr);
            return;
        };
        let pd_id = slot.pd;
        let Ok(pd) = self.pd(pd_id) else { return };
        let direct = self.in_place(pd_id, &wr.buf, &wr.sg_list);
        let Some(slot) = self.srqs.get_mut(&id) else { return };
        let len = data_len(&wr.buf, &wr.sg_list);
        let staging = match if direct.is_some() { Ok(None) } else { slot.staging.take(&pd, len) } {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(srq = id, "staging a receive: {e}");
                slot.backlog.push_back(wr);
                return;
            }
        };
        let key = self.next_wr;
        self.next_wr += 1;
        match srq.post_recv(key, direct.or_else(|| staging.as_ref().map(|s| s.sge(len)))) {
            Ok(()) => {
                slot.posted += 1;
                self.pending.insert(key, Pending::receive(Owner::Srq(id), wr, staging, len));
            }
            Err(e) => {
                tracing::warn!(srq = id, "ibv_post_srq_recv: {e}");
                if let Some(s) = staging {
                    slot.staging.give(s);
                }
                slot.backlog.push_back(wr);
            }
        }
    }

    pub fn post_recv(&mut self, qpn: u32, wr: RecvWr) {
        if let Some((_, recv_cq)) = self.removed_qps.get(&qpn) {
            recv_cq.push(Completion { qpn, wc: flushed(wr.wr_id, None, wr.buf, wr.sg_list, WcStatus::WrFlush) });
            return;
        }
        let Some(slot) = self.qps.get_mut(&qpn) else {
            tracing::warn!(qpn, wr_id = wr.wr_id, "receive posted on a destroyed queue pair");
            return;
        };
        if slot.srq.is_some() || slot.state == QpState::Error {
            slot.recv_cq.push(Completion { qpn, wc: flushed(wr.wr_id, None, wr.buf, wr.sg_list, WcStatus::WrFlush) });
            return;
        }
        if slot.recvs_posted >= RECV_DEPTH {
            slot.recv_backlog.push_back(wr);
            return;
        }
        self.post_recv_now(qpn, wr);
    }

    fn post_recv_now(&mut self, qpn: u32, wr: RecvWr) {
        let Some(pd_id) = self.qps.get(&qpn).map(|s| s.pd) else { return };
        let Ok(pd) = self.pd(pd_id) else { return };
        let direct = self.in_place(pd_id, &wr.buf, &wr.sg_list);
        let Some(slot) = self.qps.get_mut(&qpn) else { return };
        let len = data_len(&wr.buf, &wr.sg_list);
        let staging = match if direct.is_some() { Ok(None) } else { slot.staging.take(&pd, len) } {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(qpn, "staging a receive: {e}");
                slot.recv_cq.push(Completion {
                    qpn,
                    wc: flushed(wr.wr_id, None, wr.buf, wr.sg_list, WcStatus::LocalProtection),
                });
                return;
            }
        };
        let key = self.next_wr;
        self.next_wr += 1;
        match slot.qp.post_recv(key, direct.or_else(|| staging.as_ref().map(|s| s.sge(len)))) {
            Ok(()) => {
                slot.recvs_posted += 1;
                self.pending.insert(key, Pending::receive(Owner::Qp(qpn), wr, staging, len));
            }
            Err(e) => {
                tracing::debug!(qpn, "ibv_post_recv: {e}");
                if let Some(s) = staging {
                    slot.staging.give(s);
                }
                slot.recv_cq.push(Completion {
                    qpn,
                    wc: flushed(wr.wr_id, None, wr.buf, wr.sg_list, WcStatus::LocalQpOperation),
                });
            }
        }
    }

    pub fn post_send(&mut self, qpn: u32, wr: SendWr) {
        if let Some((send_cq, _)) = self.removed_qps.get(&qpn) {
            let wc = flushed(wr.wr_id, Some(wr.op), wr.buf, wr.sg_list, WcStatus::WrFlush);
            send_cq.push(Completion { qpn, wc });
            return;
        }
        let Some(slot) = self.qps.get_mut(&qpn) else {
            tracing::warn!(qpn, wr_id = wr.wr_id, "send posted on a destroyed queue pair");
            return;
        };
        match slot.state {
            QpState::Error => {
                let wc = flushed(wr.wr_id, Some(wr.op), wr.buf, wr.sg_list, WcStatus::WrFlush);
                slot.send_cq.push(Completion { qpn, wc });
            }
            QpState::Rts if slot.sends_posted < SEND_DEPTH && slot.send_backlog.is_empty() => {
                self.post_send_now(qpn, wr)
            }
            // Before the connection is up, or with the send queue full: in order, once it can go.
            _ => slot.send_backlog.push_back(wr),
        }
    }

    fn post_send_now(&mut self, qpn: u32, wr: SendWr) {
        let Some(pd_id) = self.qps.get(&qpn).map(|s| s.pd) else { return };
        let Ok(pd) = self.pd(pd_id) else { return };
        let direct = self.in_place(pd_id, &wr.buf, &wr.sg_list);
        let Some(slot) = self.qps.get_mut(&qpn) else { return };
        let len = data_len(&wr.buf, &wr.sg_list);
        let mut staging = match if direct.is_some() { Ok(None) } else { slot.staging.take(&pd, len) } {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(qpn, "staging a send: {e}");
                let wc = flushed(wr.wr_id, Some(wr.op), wr.buf, wr.sg_list, WcStatus::LocalProtection);
                slot.send_cq.push(Completion { qpn, wc });
                // What this turn took before it goes as it would have; nothing after it may execute: a read's
                // response must not reach the host without the data WRITE before it.
                self.chained.retain(|&q| q != qpn);
                self.post_chain(qpn);
                self.fail_qp(qpn);
                return;
            }
        };
        if let Some(s) = staging.as_mut()
            && !matches!(wr.op, SendOp::RdmaRead { .. })
        {
            let out = s.bytes_mut();
            if wr.sg_list.is_empty() {
                out[..len].copy_from_slice(&wr.buf);
            } else {
                let mut at = 0;
                for seg in &wr.sg_list {
                    out[at..at + seg.len()].copy_from_slice(seg);
                    at += seg.len();
                }
            }
        }
        let kind = match wr.op {
            SendOp::Send => SendKind::Send,
            SendOp::SendWithImm(imm) => SendKind::SendWithImm(imm),
            SendOp::SendWithInv(rkey) => SendKind::SendWithInv(rkey),
            SendOp::RdmaWrite { remote_addr, rkey } => SendKind::Write { remote_addr, rkey },
            SendOp::RdmaWriteWithImm { remote_addr, rkey, imm } => SendKind::WriteWithImm { remote_addr, rkey, imm },
            SendOp::RdmaRead { remote_addr, rkey } => SendKind::Read { remote_addr, rkey },
        };
        let key = self.next_wr;
        self.next_wr += 1;
        if slot.chain.is_empty() {
            self.chained.push(qpn);
        }
        let sge = direct.or_else(|| staging.as_ref().map(|s| s.sge(len)));
        slot.chain.push(ffi::SendRequest { wr_id: key, kind, sge, solicited: wr.solicited, signaled: true });
        slot.sends_posted += 1;
        self.pending.insert(key, Pending::send(qpn, wr, staging, len));
    }

    /// Posts the sends this turn prepared, one chain per queue pair (one `ibv_post_send`: rxe's requester runs
    /// once for a read's data WRITE and its response, as for nvmet's chained pair). All but a chain's last are
    /// unsignalled — one completion where there were several — except READs, whose data must be copied out
    /// when they complete.
    pub fn post_chains(&mut self) {
        for qpn in std::mem::take(&mut self.chained) {
            self.post_chain(qpn);
        }
    }

    fn post_chain(&mut self, qpn: u32) {
        let Some(slot) = self.qps.get_mut(&qpn) else { return };
        let mut chain = std::mem::take(&mut slot.chain);
        if chain.is_empty() {
            return;
        }
        let last = chain.len() - 1;
        for r in &mut chain[..last] {
            r.signaled = matches!(r.kind, SendKind::Read { .. });
        }
        let (posted, failed) = match slot.qp.post_sends(&chain) {
            Ok(()) => (chain.len(), false),
            Err((at, e)) => {
                tracing::debug!(qpn, "ibv_post_send: {e}");
                // None: all are on the ring (the doorbell failed); the error state flushes them.
                (at.unwrap_or(chain.len()), true)
            }
        };
        // Posted unsignalled requests complete with the next signalled one, or on their own when the queue
        // pair's error state flushes them (an error completion is always generated).
        slot.unsignaled.extend(chain[..posted].iter().filter(|r| !r.signaled).map(|r| r.wr_id));
        if posted == chain.len() {
            if failed {
                let _ = slot.qp.to_error();
                slot.state = QpState::Error;
            }
            return;
        }
        // The first that could not be posted fails, the rest are flushed; and nothing after a request that
        // could not go may execute: a read's response must not reach the host without its data.
        let _ = slot.qp.to_error();
        slot.state = QpState::Error;
        for (i, r) in chain[posted..].iter().enumerate() {
            let Some(p) = self.pending.remove(&r.wr_id) else { continue };
            let Some(slot) = self.qps.get_mut(&qpn) else { break };
            slot.sends_posted -= 1;
            if let Some(s) = p.staging {
                slot.staging.give(s);
            }
            let status = if i == 0 { WcStatus::LocalQpOperation } else { WcStatus::WrFlush };
            slot.send_cq.push(Completion { qpn, wc: flushed(p.wr_id, p.op, p.buf, p.sg_list, status) });
        }
    }

    /// Posts what waited for room (or for the connection), in order.
    fn drain_backlogs(&mut self, owner: Owner) {
        match owner {
            Owner::Qp(qpn) => {
                loop {
                    let Some(slot) = self.qps.get_mut(&qpn) else { return };
                    if slot.state != QpState::Rts || slot.sends_posted >= SEND_DEPTH {
                        break;
                    }
                    let Some(wr) = slot.send_backlog.pop_front() else { break };
                    self.post_send_now(qpn, wr);
                }
                loop {
                    let Some(slot) = self.qps.get_mut(&qpn) else { return };
                    if slot.recvs_posted >= RECV_DEPTH {
                        break;
                    }
                    let Some(wr) = slot.recv_backlog.pop_front() else { break };
                    self.post_recv_now(qpn, wr);
                }
            }
            Owner::Srq(id) => loop {
                let Some(slot) = self.srqs.get_mut(&id) else { return };
                if slot.srq.is_none() || slot.posted >= SRQ_DEPTH {
                    break;
                }
                let Some(wr) = slot.backlog.pop_front() else { break };
                let before = slot.backlog.len();
                self.post_srq_recv_now(id, wr);
                // A post that failed put the request back: try again at the next completion.
                if self.srqs.get(&id).is_some_and(|s| s.backlog.len() > before) {
                    break;
                }
            },
        }
    }

    /// Takes every completion the completion channel announces.
    pub fn drain_completions(&mut self) {
        let Some(live) = &self.live else { return };
        let comp = Rc::clone(&live.comp);
        let mut signalled = false;
        loop {
            match comp.next() {
                Ok(Some(_)) => signalled = true,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("completion channel: {e}");
                    break;
                }
            }
        }
        if signalled {
            self.poll_cq();
        }
    }

    /// Re-arms the CQ and takes every completion on it, each to its queue pair (polling after arming, so none
    /// is missed).
    fn poll_cq(&mut self) {
        let Some((cq, _)) = &self.cq else { return };
        let cq = Rc::clone(cq);
        if let Err(e) = cq.arm() {
            tracing::warn!("{e}");
        }
        let mut wcs = Vec::new();
        loop {
            wcs.clear();
            match cq.poll(&mut wcs, 64) {
                Ok(0) => break,
                Ok(_) => {
                    for wc in wcs.drain(..) {
                        self.complete(wc.qp_num, wc);
                    }
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    break;
                }
            }
        }
    }

    fn complete(&mut self, qpn: u32, wc: ffi::Wc) {
        // A send's completion completes every unsignalled send posted before it on this queue pair (in order):
        // successfully, unless this one is a flush (then whether they ran is unknown).
        if self.pending.get(&wc.wr_id).is_some_and(|p| p.op.is_some()) {
            let status = if wc.status == ffi::wc_status::IBV_WC_WR_FLUSH_ERR {
                ffi::wc_status::IBV_WC_WR_FLUSH_ERR
            } else {
                ffi::wc_status::IBV_WC_SUCCESS
            };
            while let Some(slot) = self.qps.get_mut(&qpn)
                && let Some(&key) = slot.unsignaled.front()
                && key <= wc.wr_id
            {
                slot.unsignaled.pop_front();
                if key < wc.wr_id {
                    let implied = ffi::Wc {
                        wr_id: key,
                        qp_num: qpn,
                        status,
                        opcode: 0,
                        byte_len: 0,
                        imm: None,
                        invalidated_rkey: None,
                    };
                    self.complete_one(qpn, implied);
                }
            }
        }
        self.complete_one(qpn, wc);
    }

    fn complete_one(&mut self, qpn: u32, wc: ffi::Wc) {
        let Some(mut p) = self.pending.remove(&wc.wr_id) else {
            // A flush the device made after its queue pair was destroyed (what it held came back then); keys
            // are never reused, so it is nobody else's.
            tracing::debug!(qpn, wr_id = wc.wr_id, "completion of a request no longer here");
            return;
        };
        let status = wc_status(wc.status);
        let filled = match (status, p.op) {
            (WcStatus::Success, None) => (wc.byte_len as usize).min(p.len),
            (WcStatus::Success, Some(SendOp::RdmaRead { .. })) => p.len,
            _ => 0,
        };
        if filled > 0
            && let Some(s) = &p.staging
        {
            let src = &s.bytes()[..filled];
            if p.sg_list.is_empty() {
                p.buf[..filled].copy_from_slice(src);
            } else {
                let mut at = 0;
                for seg in p.sg_list.iter_mut() {
                    let n = seg.len().min(filled - at);
                    seg[..n].copy_from_slice(&src[at..at + n]);
                    at += n;
                    if at >= filled {
                        break;
                    }
                }
            }
        }
        match p.owner {
            Owner::Qp(owner) => {
                if let Some(slot) = self.qps.get_mut(&owner) {
                    if p.op.is_some() {
                        slot.sends_posted -= 1;
                    } else {
                        slot.recvs_posted -= 1;
                    }
                    if let Some(s) = p.staging.take() {
                        slot.staging.give(s);
                    }
                }
            }
            Owner::Srq(id) => {
                if let Some(slot) = self.srqs.get_mut(&id) {
                    slot.posted -= 1;
                    if let Some(s) = p.staging.take() {
                        slot.staging.give(s);
                    }
                }
            }
        }
        let opcode = match p.op {
            Some(op) => SendWr::new(0, op, Buffer::default()).opcode(),
            None if wc.opcode == ffi::wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => WcOpcode::RecvRdmaWithImm,
            None => WcOpcode::Recv,
        };
        let byte_len = if p.op.is_some() { p.len as u32 } else { wc.byte_len };
        let out = WorkCompletion {
            wr_id: p.wr_id,
            status,
            opcode,
            byte_len: if status == WcStatus::Success { byte_len } else { 0 },
            imm: wc.imm,
            invalidated_rkey: wc.invalidated_rkey,
            buf: p.buf,
            sg_list: p.sg_list,
        };
        let mut fatal = None;
        if !self.qps.contains_key(&qpn)
            && let Owner::Srq(id) = p.owner
        {
            // A shared receive a queue pair took just before it was destroyed, completed after: nobody waits
            // for its message, and the buffer is the shared queue's again.
            self.post_srq_recv(id, RecvWr { wr_id: out.wr_id, buf: out.buf, sg_list: out.sg_list });
            return;
        }
        if let Some(slot) = self.qps.get_mut(&qpn) {
            let cq = if p.op.is_some() { &slot.send_cq } else { &slot.recv_cq };
            cq.push(Completion { qpn, wc: out });
            if !matches!(status, WcStatus::Success | WcStatus::WrFlush) {
                slot.state = QpState::Error;
                if !std::mem::replace(&mut slot.fatal_reported, true) {
                    fatal = Some(status);
                }
            }
        }
        if let Some(cause) = fatal {
            let _ = self.events.send(DeviceEvent::QpFatal { qpn, cause });
        }
        self.drain_backlogs(p.owner);
    }

    /// Destroys a queue pair: what the device completed goes out first with its data, then everything still
    /// posted or waiting comes back flushed. Idempotent.
    pub fn destroy_qp(&mut self, qpn: u32) {
        self.removed_qps.remove(&qpn);
        let Some(slot) = self.qps.get_mut(&qpn) else { return };
        let _ = slot.qp.to_error();
        slot.state = QpState::Error;
        self.poll_cq();
        let Some(mut slot) = self.qps.remove(&qpn) else { return };
        self.cq_reserved -= SEND_DEPTH + if slot.srq.is_some() { 0 } else { RECV_DEPTH };
        let (send_cq, recv_cq) = (slot.send_cq.clone(), slot.recv_cq.clone());
        let (send_backlog, recv_backlog) =
            (std::mem::take(&mut slot.send_backlog), std::mem::take(&mut slot.recv_backlog));
        // Destroying the queue pair ends the device's use of every buffer posted on it; what it completed in
        // the meantime leaves the CQ before its room is given to another.
        drop(slot);
        self.poll_cq();
        let keys: Vec<u64> = self.pending.iter().filter(|(_, p)| p.owner == Owner::Qp(qpn)).map(|(k, _)| *k).collect();
        for key in keys {
            if let Some(p) = self.pending.remove(&key) {
                let cq = if p.op.is_some() { &send_cq } else { &recv_cq };
                cq.push(Completion { qpn, wc: flushed(p.wr_id, p.op, p.buf, p.sg_list, WcStatus::WrFlush) });
            }
        }
        for wr in send_backlog {
            send_cq.push(Completion { qpn, wc: flushed(wr.wr_id, Some(wr.op), wr.buf, wr.sg_list, WcStatus::WrFlush) });
        }
        for wr in recv_backlog {
            recv_cq.push(Completion { qpn, wc: flushed(wr.wr_id, None, wr.buf, wr.sg_list, WcStatus::WrFlush) });
        }
    }

    /// The device is going away: every queue pair is flushed and destroyed (what the application posts there
    /// later comes back flushed), shared receive queues keep their receives for `destroy_srq`, regions are
    /// deregistered (their buffers wait for `deregister`), and every device object is let go — the context last
    /// once the caller drops its watchers — so the kernel can finish removing the device.
    pub fn remove_device(&mut self) {
        let qpns: Vec<u32> = self.qps.keys().copied().collect();
        for qpn in qpns {
            let cqs = self.qps.get(&qpn).map(|slot| (slot.send_cq.clone(), slot.recv_cq.clone()));
            self.destroy_qp(qpn);
            if let Some(cqs) = cqs {
                self.removed_qps.insert(qpn, cqs);
            }
        }
        for slot in self.srqs.values_mut() {
            slot.srq = None;
            slot.staging = Staging::default();
        }
        let srq_pending: Vec<u64> =
            self.pending.iter().filter(|(_, p)| matches!(p.owner, Owner::Srq(_))).map(|(k, _)| *k).collect();
        for key in srq_pending {
            if let Some(mut p) = self.pending.remove(&key)
                && let Owner::Srq(id) = p.owner
                && let Some(slot) = self.srqs.get_mut(&id)
            {
                p.staging = None;
                slot.posted -= 1;
                slot.backlog.push_front(RecvWr { wr_id: p.wr_id, buf: p.buf, sg_list: p.sg_list });
            }
        }
        for region in self.regions.values_mut() {
            if let Some(mr) = region.mr.take() {
                region.kept = Some(mr.into_buffer());
            }
        }
        // The device is done with every queue above, so nothing can still be writing an arena; what the
        // application posts from one later is staged (and flushed, the device being gone).
        self.pinned.clear();
        for pd in self.pds.values_mut() {
            *pd = None;
        }
        self.cq = None;
        self.live = None;
    }

    /// Teardown: every queue pair flushes its outstanding requests (every buffer goes back), then every object
    /// is destroyed, children first.
    pub fn shutdown(&mut self) {
        let qpns: Vec<u32> = self.qps.keys().copied().collect();
        for qpn in qpns {
            self.destroy_qp(qpn);
        }
        self.srqs.clear();
        self.regions.clear();
        self.pinned.clear();
        self.pds.clear();
        self.cq = None;
        self.live = None;
    }

    pub fn queue_pairs(&self) -> usize {
        self.qps.len()
    }

    pub fn shared_receive_queues(&self) -> usize {
        self.srqs.len()
    }

    /// Regions and their bytes.
    pub fn regions(&self) -> (usize, usize) {
        let bytes = self.regions.values().map(|r| r.mr.as_ref().map_or(0, |m| m.len())).sum();
        (self.regions.len(), bytes)
    }

    /// Arenas registered, and their bytes.
    pub fn arenas(&self) -> (usize, usize) {
        (self.pinned.len(), self.pinned.values().map(|(_, mr)| mr.len()).sum())
    }

    /// Receives posted on shared receive queues and not yet taken (on the device or waiting for room).
    pub fn srq_receives(&self) -> usize {
        self.srqs.values().map(|s| s.posted + s.backlog.len()).sum()
    }

    /// Staging buffers kept for reuse, and requests on the device.
    pub fn held(&self) -> (usize, usize) {
        let staging = self.qps.values().map(|q| q.staging.count()).sum::<usize>()
            + self.srqs.values().map(|s| s.staging.count()).sum::<usize>();
        (staging, self.pending.len())
    }
}

/// Readiness of a descriptor the device may no longer have (never ready then).
pub(super) async fn readable(
    fd: &Option<ffi::Watched>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, ffi::FdNumber>> {
    match fd {
        Some(fd) => fd.readable().await,
        None => std::future::pending().await,
    }
}
