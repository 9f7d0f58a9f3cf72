//! The verbs provider's foreign-function layer: the workspace's only unsafe code. Each type here owns one
//! libibverbs object or one kernel connection-manager id and releases it on drop; a type that needs another
//! object alive holds an `Rc` to it (a queue pair holds its completion queue, protection domain and shared
//! receive queue; a domain holds the device context; the context holds an id bound to the device's address,
//! on which the kernel announces the device's removal), so objects are always destroyed children first. Raw
//! pointers and `Rc` make every type `!Send`: they live and die on the device's worker thread, which is the
//! ownership rule that keeps a queue pair from being freed on one thread while another still uses it.
//!
//! Memory handed to the device for DMA belongs to a [`MemoryRegion`]: the region owns the `Vec`, and gives it
//! back only after `ibv_dereg_mr`. The worker reads or writes a region's bytes only while no work request that
//! uses it is outstanding.
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::c_void;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::ptr::{NonNull, null_mut};
use std::rc::Rc;

use rdma_mummy_sys as sys;

use super::ucma;
use crate::buffer::Pinned;

fn last_error(call: &'static str) -> VerbsError {
    VerbsError { call, source: io::Error::last_os_error() }
}

fn check(call: &'static str, ret: i32) -> Result<(), VerbsError> {
    match ret {
        0 => Ok(()),
        // Some calls return -1 and set errno; most of libibverbs returns the errno itself.
        -1 => Err(last_error(call)),
        e => Err(VerbsError { call, source: io::Error::from_raw_os_error(e.abs()) }),
    }
}

/// A failed libibverbs call or connection-manager command.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {source}")]
pub struct VerbsError {
    pub call: &'static str,
    pub source: io::Error,
}

impl VerbsError {
    pub fn would_block(&self) -> bool {
        self.source.kind() == io::ErrorKind::WouldBlock
    }
}

fn set_nonblocking(fd: RawFd) -> Result<(), VerbsError> {
    // SAFETY: fcntl on a descriptor the library opened; F_GETFL/F_SETFL only change its flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(last_error("fcntl(F_GETFL)"));
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(last_error("fcntl(F_SETFL)"));
    }
    Ok(())
}

/// Names of the RDMA devices libibverbs sees; an error when libibverbs itself cannot be loaded.
pub fn device_names() -> Result<Vec<String>, String> {
    match sideway::ibverbs::device::DeviceList::new() {
        Ok(list) => Ok(list.iter().map(|d| sideway::ibverbs::device::DeviceInfo::name(&d)).collect()),
        Err(e) => {
            use sideway::ibverbs::device::GetDeviceListErrorKind;
            let cause = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<GetDeviceListErrorKind>());
            let Some(GetDeviceListErrorKind::Ibverbs(cause)) = cause else {
                return Err(e.to_string());
            };
            // The run-time loader's stubs answer EOPNOTSUPP when libibverbs.so.1 is not there.
            Err(match cause.raw_os_error() {
                Some(libc::EOPNOTSUPP) => "libibverbs.so.1 is not installed (Debian: libibverbs1)".to_string(),
                Some(libc::ENOSYS) => "the kernel has no RDMA support (no /sys/class/infiniband)".to_string(),
                _ => format!("ibv_get_device_list: {cause}"),
            })
        }
    }
}

/// A descriptor the tokio reactor watches for readability. It holds the library object that owns the
/// descriptor, so the descriptor stays open while registered (the registration is dropped first: field order).
pub struct Watched {
    fd: tokio::io::unix::AsyncFd<FdNumber>,
    _owner: Rc<dyn std::any::Any>,
}

pub struct FdNumber(RawFd);

impl std::os::fd::AsRawFd for FdNumber {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl Watched {
    fn new(fd: RawFd, owner: Rc<dyn std::any::Any>) -> io::Result<Watched> {
        use tokio::io::Interest;
        // SAFETY: `fd` belongs to `owner`, which this value keeps alive (and so the descriptor open and the same)
        // until after the registration is dropped.
        let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(FdNumber(fd), Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Watched { fd, _owner: owner })
    }

    pub async fn readable(&self) -> io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, FdNumber>> {
        self.fd.readable().await
    }
}

/// The kernel's connection-manager file (`/dev/infiniband/rdma_cm`): ids are created on it, commanded through
/// it and their events read from it (see [`super::ucma`] for why not through librdmacm).
pub struct EventChannel {
    file: std::fs::File,
    next_uid: Cell<u64>,
    /// Each id's `uid` → its kernel handle: a connect request names its listener by uid.
    handles: RefCell<HashMap<u64, u32>>,
}

const RDMA_CM_PATH: &str = "/dev/infiniband/rdma_cm";

impl EventChannel {
    pub fn new() -> Result<Rc<EventChannel>, VerbsError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(RDMA_CM_PATH)
            .map_err(|source| VerbsError { call: "open /dev/infiniband/rdma_cm", source })?;
        Ok(Rc::new(EventChannel { file, next_uid: Cell::new(1), handles: RefCell::new(HashMap::new()) }))
    }

    fn fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.file.as_raw_fd()
    }

    fn uid(&self) -> u64 {
        let uid = self.next_uid.get();
        self.next_uid.set(uid + 1);
        uid
    }

    /// Writes one command. `response` is the buffer the kernel fills, its address already in the command that
    /// `command` builds from it; it comes back filled.
    fn call(
        &self,
        call: &'static str,
        mut response: Vec<u8>,
        command: impl FnOnce(u64) -> Result<Vec<u8>, ucma::EncodeError>,
    ) -> Result<Vec<u8>, VerbsError> {
        let command = command(response.as_mut_ptr() as u64)
            .map_err(|e| VerbsError { call, source: io::Error::new(io::ErrorKind::InvalidInput, e) })?;
        // The kernel writes at most the header's `out` bytes (and refuses a smaller `out` than its reply):
        // a command must never promise more room than `response` has.
        let out = command.get(6..8).map_or(usize::MAX, |b| usize::from(u16::from_ne_bytes([b[0], b[1]])));
        if out > response.len() {
            return Err(VerbsError { call, source: io::Error::other("reply larger than its buffer") });
        }
        // SAFETY: `command` is a complete rdma_ucm command of its header's length. The only memory the kernel
        // writes is `response`: its address is in the command (a command without a reply names none), the
        // header's `out` (checked above) bounds what is written, and it is a live, unaliased buffer of that
        // length for the whole call.
        let n = unsafe { libc::write(self.fd(), command.as_ptr().cast(), command.len()) };
        if n < 0 {
            return Err(last_error(call));
        }
        if n as usize != command.len() {
            return Err(VerbsError { call, source: io::ErrorKind::WriteZero.into() });
        }
        Ok(response)
    }

    /// Registers the channel's descriptor with the current tokio reactor.
    pub fn watch(self: &Rc<Self>) -> io::Result<Watched> {
        Watched::new(self.fd(), Rc::clone(self) as Rc<dyn std::any::Any>)
    }

    /// The next event, or `None` when none is queued.
    pub fn next(self: &Rc<Self>) -> Result<Option<CmEvent>, VerbsError> {
        let response = match self.call("rdma_cm GET_EVENT", vec![0; ucma::EVENT_RESP_LEN], |r| Ok(ucma::get_event(r))) {
            Ok(r) => r,
            Err(e) if e.would_block() => return Ok(None),
            Err(e) => return Err(e),
        };
        let ev = ucma::Event::parse(&response);
        let is_request = ev.kind == ucma::event::CONNECT_REQUEST;
        let listen_key = if is_request { self.handles.borrow().get(&ev.uid).map_or(0, |h| *h as usize) } else { 0 };
        // A connect request's new id is ours from now on: to accept, reject or drop (which destroys it).
        let new_id = is_request.then(|| CmId { handle: ev.id, uid: self.uid(), channel: Rc::clone(self) });
        Ok(Some(CmEvent {
            kind: ev.kind,
            status: ev.status,
            id_key: ev.id as usize,
            listen_key,
            new_id,
            conn: ev.conn.unwrap_or_default(),
        }))
    }
}

pub use super::ucma::ConnParam;
pub use super::ucma::event as cm_event;

/// A connection-manager event, copied out of the kernel's reply.
pub struct CmEvent {
    pub kind: u32,
    pub status: i32,
    /// The id the event is for ([`CmId::key`]); for a connect request, the new id's.
    pub id_key: usize,
    /// The listening id a connect request arrived on.
    pub listen_key: usize,
    /// A connect request's new id: ours to accept, reject or drop.
    pub new_id: Option<CmId>,
    /// The peer's parameters (connect request, response, establishment, reject); empty otherwise.
    pub conn: ConnParam,
}

/// A connection-manager id: a listener, or one end of a connection. Dropping it destroys the kernel's id.
pub struct CmId {
    handle: u32,
    uid: u64,
    channel: Rc<EventChannel>,
}

/// Queue pair states, for [`CmId::qp_attr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpTarget {
    Init,
    Rtr,
    Rts,
}

/// Queue pair attributes and their mask, as the connection manager computes them for a connection.
pub struct QpAttr {
    attr: sys::ibv_qp_attr,
    mask: i32,
}

impl QpAttr {
    pub fn set_max_dest_rd_atomic(&mut self, n: u8) {
        self.attr.max_dest_rd_atomic = n;
    }

    pub fn set_max_rd_atomic(&mut self, n: u8) {
        self.attr.max_rd_atomic = n;
    }

    fn from_kernel(k: &ucma::QpAttrs) -> QpAttr {
        let ah = |a: &ucma::AhAttr| sys::ibv_ah_attr {
            grh: sys::ibv_global_route {
                dgid: sys::ibv_gid { raw: a.dgid },
                flow_label: a.flow_label,
                sgid_index: a.sgid_index,
                hop_limit: a.hop_limit,
                traffic_class: a.traffic_class,
            },
            dlid: a.dlid,
            sl: a.sl,
            src_path_bits: a.src_path_bits,
            static_rate: a.static_rate,
            is_global: a.is_global,
            port_num: a.port_num,
        };
        let attr = sys::ibv_qp_attr {
            qp_state: k.qp_state,
            cur_qp_state: k.cur_qp_state,
            path_mtu: k.path_mtu,
            path_mig_state: k.path_mig_state,
            qkey: k.qkey,
            rq_psn: k.rq_psn,
            sq_psn: k.sq_psn,
            dest_qp_num: k.dest_qp_num,
            qp_access_flags: k.qp_access_flags,
            cap: sys::ibv_qp_cap {
                max_send_wr: k.cap[0],
                max_recv_wr: k.cap[1],
                max_send_sge: k.cap[2],
                max_recv_sge: k.cap[3],
                max_inline_data: k.cap[4],
            },
            ah_attr: ah(&k.ah_attr),
            alt_ah_attr: ah(&k.alt_ah_attr),
            pkey_index: k.pkey_index,
            alt_pkey_index: k.alt_pkey_index,
            en_sqd_async_notify: k.en_sqd_async_notify,
            sq_draining: k.sq_draining,
            max_rd_atomic: k.max_rd_atomic,
            max_dest_rd_atomic: k.max_dest_rd_atomic,
            min_rnr_timer: k.min_rnr_timer,
            port_num: k.port_num,
            timeout: k.timeout,
            retry_cnt: k.retry_cnt,
            rnr_retry: k.rnr_retry,
            alt_port_num: k.alt_port_num,
            alt_timeout: k.alt_timeout,
            rate_limit: 0,
        };
        QpAttr { attr, mask: k.mask as i32 }
    }
}

impl CmId {
    pub fn new(channel: &Rc<EventChannel>) -> Result<CmId, VerbsError> {
        let uid = channel.uid();
        let response =
            channel.call("rdma_cm CREATE_ID", vec![0; ucma::CREATE_ID_RESP_LEN], |r| Ok(ucma::create_id(uid, r)))?;
        let handle = ucma::created_id(&response);
        channel.handles.borrow_mut().insert(uid, handle);
        Ok(CmId { handle, uid, channel: Rc::clone(channel) })
    }

    fn command(
        &self,
        call: &'static str,
        command: impl FnOnce() -> Result<Vec<u8>, ucma::EncodeError>,
    ) -> Result<(), VerbsError> {
        self.channel.call(call, Vec::new(), |_| command()).map(drop)
    }

    /// Identifies the id in events.
    pub fn key(&self) -> usize {
        self.handle as usize
    }

    pub fn bind(&self, addr: SocketAddr) -> Result<(), VerbsError> {
        self.command("rdma_cm BIND", || Ok(ucma::bind(self.handle, addr)))
    }

    pub fn listen(&self, backlog: u32) -> Result<(), VerbsError> {
        self.command("rdma_cm LISTEN", || Ok(ucma::listen(self.handle, backlog)))
    }

    pub fn resolve_addr(&self, src: Option<SocketAddr>, dst: SocketAddr, timeout_ms: u32) -> Result<(), VerbsError> {
        self.command("rdma_cm RESOLVE_ADDR", || Ok(ucma::resolve_addr(self.handle, src, dst, timeout_ms)))
    }

    pub fn resolve_route(&self, timeout_ms: u32) -> Result<(), VerbsError> {
        self.command("rdma_cm RESOLVE_ROUTE", || Ok(ucma::resolve_route(self.handle, timeout_ms)))
    }

    pub fn connect(&self, param: &ConnParam) -> Result<(), VerbsError> {
        self.command("rdma_cm CONNECT", || ucma::connect(self.handle, param))
    }

    pub fn accept(&self, param: &ConnParam) -> Result<(), VerbsError> {
        self.command("rdma_cm ACCEPT", || ucma::accept(self.uid, self.handle, Some(param)))
    }

    pub fn reject(&self, private_data: &[u8]) -> Result<(), VerbsError> {
        self.command("rdma_cm REJECT", || ucma::reject(self.handle, private_data))
    }

    /// The active side's last step after a connect response: the kernel sends the RTU.
    pub fn establish(&self) -> Result<(), VerbsError> {
        self.command("rdma_cm ACCEPT (ready to use)", || ucma::accept(self.uid, self.handle, None))
    }

    pub fn disconnect(&self) -> Result<(), VerbsError> {
        self.command("rdma_cm DISCONNECT", || Ok(ucma::disconnect(self.handle)))
    }

    /// The attributes a queue pair needs to enter `state` for this connection.
    pub fn qp_attr(&self, state: QpTarget) -> Result<QpAttr, VerbsError> {
        let state = match state {
            QpTarget::Init => sys::ibv_qp_state::IBV_QPS_INIT,
            QpTarget::Rtr => sys::ibv_qp_state::IBV_QPS_RTR,
            QpTarget::Rts => sys::ibv_qp_state::IBV_QPS_RTS,
        };
        let response = self.channel.call("rdma_cm INIT_QP_ATTR", vec![0; ucma::QP_ATTR_RESP_LEN], |r| {
            Ok(ucma::init_qp_attr(r, self.handle, state))
        })?;
        Ok(QpAttr::from_kernel(&ucma::QpAttrs::parse(&response)))
    }

    /// Where the id is bound: device, port, addresses.
    pub fn addr_info(&self) -> Result<ucma::AddrInfo, VerbsError> {
        let response = self
            .channel
            .call("rdma_cm QUERY", ucma::query_addr_response(), |r| Ok(ucma::query_addr(r, self.handle)))?;
        Ok(ucma::AddrInfo::parse(&response))
    }

    /// The peer's address (after address resolution, or on a connect request's id).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.addr_info().ok()?.dst
    }

    /// Whether this id is on the device `context` is.
    pub fn on_device(&self, context: &Context) -> bool {
        self.addr_info().is_ok_and(|a| context.holds(&a))
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        // The kernel drops the id's queued events with it.
        let handle = self.handle;
        if let Err(e) = self
            .channel
            .call("rdma_cm DESTROY_ID", vec![0; ucma::DESTROY_ID_RESP_LEN], |r| Ok(ucma::destroy_id(r, handle)))
        {
            tracing::debug!(handle, "{e}");
        }
        self.channel.handles.borrow_mut().remove(&self.uid);
    }
}

/// A device context of our own (`ibv_open_device`), for the device an id is bound to; closed on drop, which
/// is what lets the kernel finish removing the device.
pub struct Context {
    raw: NonNull<sys::ibv_context>,
    node_guid: u64,
    ibdev_index: u32,
    port_num: u8,
    /// An id bound to the device's address: the device's removal is announced on it even with no listener
    /// (the worker's context has one; a lane's does not).
    _anchor: Option<Rc<CmId>>,
}

/// A device event (`ibv_get_async_event`).
#[derive(Debug, Clone, Copy)]
pub enum AsyncEvent {
    QpFatal { qp_num: u32, kind: &'static str },
    PortActive,
    PortError,
    DeviceFatal,
    Other(u32),
}

/// What names a device across threads: its node GUID (as the kernel stores it), index and the port, so that a
/// lane can open a context of its own on the same device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceKey {
    node_guid: u64,
    ibdev_index: u32,
    port_num: u8,
}

impl Context {
    /// Opens the device `anchor` is bound to; `None` when no RDMA device serves its address.
    pub fn open(anchor: Rc<CmId>) -> Result<Option<Rc<Context>>, VerbsError> {
        let info = anchor.addr_info()?;
        if !info.has_device() {
            return Ok(None);
        }
        let key = DeviceKey { node_guid: info.node_guid, ibdev_index: info.ibdev_index, port_num: info.port_num };
        Context::open_with(key, Some(anchor))
    }

    /// Another context of the device `key` names (a lane's: its objects are its own); `None` once the device
    /// is gone.
    pub fn open_key(key: DeviceKey) -> Result<Option<Rc<Context>>, VerbsError> {
        Context::open_with(key, None)
    }

    fn open_with(key: DeviceKey, anchor: Option<Rc<CmId>>) -> Result<Option<Rc<Context>>, VerbsError> {
        let mut n = 0;
        // SAFETY: the list (or null) is released below with ibv_free_device_list; an opened context keeps its
        // device alive on its own.
        let list = unsafe { sys::ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(last_error("ibv_get_device_list"));
        }
        let mut opened = None;
        for i in 0..usize::try_from(n).unwrap_or(0) {
            // SAFETY: the list holds `n` valid device pointers.
            let device = unsafe { *list.add(i) };
            // The node GUID names the device (the loader's stubs have no ibv_get_device_index); a device removed
            // and added back under the same GUID is no longer listed while its old self is going away.
            // SAFETY: `device` is valid while the list is.
            if unsafe { sys::ibv_get_device_guid(device) } == key.node_guid {
                // SAFETY: `device` is valid; the context is closed in Drop.
                opened = Some(unsafe { sys::ibv_open_device(device) });
                break;
            }
        }
        // SAFETY: the list came from ibv_get_device_list and is freed once.
        unsafe { sys::ibv_free_device_list(list) };
        let Some(raw) = opened else { return Ok(None) };
        let raw = NonNull::new(raw).ok_or_else(|| last_error("ibv_open_device"))?;
        Ok(Some(Rc::new(Context {
            raw,
            node_guid: key.node_guid,
            ibdev_index: key.ibdev_index,
            port_num: key.port_num,
            _anchor: anchor,
        })))
    }

    /// What another thread needs to open this device ([`Context::open_key`]).
    pub fn key(&self) -> DeviceKey {
        DeviceKey { node_guid: self.node_guid, ibdev_index: self.ibdev_index, port_num: self.port_num }
    }

    /// Whether an id bound as `info` says is on this device.
    pub fn holds(&self, info: &ucma::AddrInfo) -> bool {
        info.has_device() && info.node_guid == self.node_guid && info.ibdev_index == self.ibdev_index
    }

    /// The device's node GUID, as a number (the kernel stores it big-endian).
    pub fn node_guid(&self) -> u64 {
        u64::from_be(self.node_guid)
    }

    /// The port the anchor id is bound to.
    pub fn port_num(&self) -> u8 {
        self.port_num
    }

    pub fn device_name(&self) -> String {
        // SAFETY: the context and its device are valid; ibv_get_device_name returns a static C string.
        unsafe {
            let name = sys::ibv_get_device_name(self.raw.as_ref().device);
            if name.is_null() { String::new() } else { std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned() }
        }
    }

    /// Registers the device's async-event descriptor with the current tokio reactor.
    pub fn watch_async(self: &Rc<Self>) -> io::Result<Watched> {
        Watched::new(self.async_fd(), Rc::clone(self) as Rc<dyn std::any::Any>)
    }

    pub fn async_fd(&self) -> RawFd {
        // SAFETY: the context is valid; async_fd is a plain field.
        unsafe { self.raw.as_ref().async_fd }
    }

    pub fn set_async_nonblocking(&self) -> Result<(), VerbsError> {
        set_nonblocking(self.async_fd())
    }

    /// The next device event, acknowledged, or `None` when none is queued.
    pub fn next_async_event(&self) -> Result<Option<AsyncEvent>, VerbsError> {
        let mut event = MaybeUninit::<sys::ibv_async_event>::zeroed();
        // SAFETY: the context is valid; the event is written on success.
        let ret = unsafe { sys::ibv_get_async_event(self.raw.as_ptr(), event.as_mut_ptr()) };
        if ret != 0 {
            let e = last_error("ibv_get_async_event");
            return if e.would_block() { Ok(None) } else { Err(e) };
        }
        // The type is read as an integer: a kernel newer than our bindings may report a value they lack.
        // SAFETY: on success the event is initialised; event_type is a 32-bit field.
        let kind = unsafe { std::ptr::addr_of!((*event.as_ptr()).event_type).cast::<u32>().read() };
        let qp_kind = match kind {
            1 => Some("QP fatal"),
            2 => Some("invalid request"),
            3 => Some("access error"),
            _ => None,
        };
        let out = match (kind, qp_kind) {
            (_, Some(k)) => {
                // SAFETY: for QP events the element is the QP, valid until the event is acknowledged.
                let qp_num = unsafe { (*(*event.as_ptr()).element.qp).qp_num };
                AsyncEvent::QpFatal { qp_num, kind: k }
            }
            (8, _) => AsyncEvent::DeviceFatal,
            (9, _) => AsyncEvent::PortActive,
            (10, _) => AsyncEvent::PortError,
            (k, _) => AsyncEvent::Other(k),
        };
        // SAFETY: the event was returned by ibv_get_async_event and is acknowledged once.
        unsafe { sys::ibv_ack_async_event(event.as_mut_ptr()) };
        Ok(Some(out))
    }

    /// Whether the port is active, and its active MTU in bytes.
    pub fn port_state(&self, port: u8) -> Result<(bool, usize), VerbsError> {
        // SAFETY: ibv_port_attr is plain data for which all-zero bytes are valid.
        let mut attr: sys::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is valid; attr is written by the call.
        check("ibv_query_port", unsafe { sys::ibv_query_port(self.raw.as_ptr(), port, &mut attr) })?;
        let active = attr.state == sys::ibv_port_state::IBV_PORT_ACTIVE;
        Ok((active, crate::mtu::mtu_bytes(u8::try_from(attr.active_mtu).unwrap_or(u8::MAX))))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: the context is ours (ibv_open_device) and every object made from it holds an Rc to it, so
        // none is left when this runs.
        unsafe { sys::ibv_close_device(self.raw.as_ptr()) };
    }
}

/// A protection domain.
pub struct Pd {
    raw: NonNull<sys::ibv_pd>,
    _context: Rc<Context>,
}

impl Pd {
    pub fn new(context: &Rc<Context>) -> Result<Rc<Pd>, VerbsError> {
        // SAFETY: the context is valid.
        let raw = unsafe { sys::ibv_alloc_pd(context.raw.as_ptr()) };
        let raw = NonNull::new(raw).ok_or_else(|| last_error("ibv_alloc_pd"))?;
        Ok(Rc::new(Pd { raw, _context: Rc::clone(context) }))
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: regions and queue pairs of the domain hold an Rc to it, so none is left.
        unsafe { sys::ibv_dealloc_pd(self.raw.as_ptr()) };
    }
}

/// Memory registered with the device. The region owns its buffer until [`MemoryRegion::into_buffer`].
pub struct MemoryRegion {
    raw: NonNull<sys::ibv_mr>,
    buf: Vec<u8>,
    registered: bool,
    _pd: Rc<Pd>,
}

/// Access rights of a region.
#[derive(Debug, Clone, Copy, Default)]
pub struct RegionAccess {
    pub local_write: bool,
    pub remote_read: bool,
    pub remote_write: bool,
}

impl RegionAccess {
    fn flags(self) -> u32 {
        let mut flags = 0;
        if self.local_write || self.remote_write {
            flags |= sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        }
        if self.remote_read {
            flags |= sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
        }
        if self.remote_write {
            flags |= sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        }
        flags
    }
}

impl MemoryRegion {
    /// Registers `buf`; on failure the buffer comes back with the error.
    pub fn register(
        pd: &Rc<Pd>,
        mut buf: Vec<u8>,
        access: RegionAccess,
    ) -> Result<MemoryRegion, (VerbsError, Vec<u8>)> {
        if buf.is_empty() {
            return Err((VerbsError { call: "ibv_reg_mr", source: io::ErrorKind::InvalidInput.into() }, buf));
        }
        let flags = access.flags();
        // SAFETY: the domain is valid; the buffer's heap memory stays where it is (the Vec is owned by the
        // region and never grown) until ibv_dereg_mr in drop or into_buffer.
        let raw =
            unsafe { sys::ibv_reg_mr(pd.raw.as_ptr(), buf.as_mut_ptr().cast::<c_void>(), buf.len(), flags as i32) };
        match NonNull::new(raw) {
            Some(raw) => Ok(MemoryRegion { raw, buf, registered: true, _pd: Rc::clone(pd) }),
            None => Err((last_error("ibv_reg_mr"), buf)),
        }
    }

    pub fn lkey(&self) -> u32 {
        // SAFETY: the region is valid; lkey is a plain field.
        unsafe { self.raw.as_ref().lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { self.raw.as_ref().rkey }
    }

    pub fn addr(&self) -> u64 {
        self.buf.as_ptr() as u64
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// The bytes, for copying into or out of the region while no work request uses it.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// A scatter/gather entry for the first `len` bytes.
    pub fn sge(&self, len: usize) -> Sge {
        Sge { addr: self.addr(), length: len.min(self.buf.len()) as u32, lkey: self.lkey() }
    }

    /// Deregisters the region and hands its buffer back.
    pub fn into_buffer(mut self) -> Vec<u8> {
        self.deregister();
        std::mem::take(&mut self.buf)
    }

    fn deregister(&mut self) {
        if std::mem::take(&mut self.registered) {
            // SAFETY: the region is valid and deregistered once; afterwards the device no longer touches the
            // buffer.
            unsafe { sys::ibv_dereg_mr(self.raw.as_ptr()) };
        }
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // Before the buffer is freed.
        self.deregister();
    }
}

/// An arena registered with the device once ([`crate::Buffer::carve`]): the buffers carved from it are posted
/// in place. The region keeps the arena's memory alive (its `Pinned`) until it is deregistered.
pub struct PinnedRegion {
    raw: NonNull<sys::ibv_mr>,
    pinned: Pinned,
    _pd: Rc<Pd>,
}

impl PinnedRegion {
    /// Registers the arena; on failure it comes back with the error.
    pub fn register(pd: &Rc<Pd>, pinned: Pinned, access: RegionAccess) -> Result<PinnedRegion, (VerbsError, Pinned)> {
        let (start, len) = pinned.range();
        if len == 0 {
            return Err((VerbsError { call: "ibv_reg_mr", source: io::ErrorKind::InvalidInput.into() }, pinned));
        }
        // SAFETY: the domain is valid. `pinned` can only be made by `Buffer::carve`, which records the range of
        // one allocation and keeps a handle of that allocation in it; the allocation is freed only when its last
        // handle goes, so the range stays mapped while the region owns `pinned` — until ibv_dereg_mr in drop.
        // The device writes there only for requests the data path posted with a piece it owns while they run,
        // or for a peer granted remote access to the whole arena (see `Device::pin_on_lane`).
        let raw = unsafe { sys::ibv_reg_mr(pd.raw.as_ptr(), start as *mut c_void, len, access.flags() as i32) };
        match NonNull::new(raw) {
            Some(raw) => Ok(PinnedRegion { raw, pinned, _pd: Rc::clone(pd) }),
            None => Err((last_error("ibv_reg_mr"), pinned)),
        }
    }

    pub fn lkey(&self) -> u32 {
        // SAFETY: the region is valid; lkey is a plain field.
        unsafe { self.raw.as_ref().lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { self.raw.as_ref().rkey }
    }

    pub fn addr(&self) -> u64 {
        self.pinned.range().0 as u64
    }

    pub fn len(&self) -> usize {
        self.pinned.range().1
    }

    /// The entry for `len` bytes at `addr`, if they lie in the arena.
    pub fn sge(&self, addr: u64, len: usize) -> Option<Sge> {
        let length = u32::try_from(len).ok()?;
        self.pinned.contains(addr, len).then(|| Sge { addr, length, lkey: self.lkey() })
    }
}

impl Drop for PinnedRegion {
    fn drop(&mut self) {
        // SAFETY: the region is valid and deregistered once, here, before `pinned` lets the memory go.
        unsafe { sys::ibv_dereg_mr(self.raw.as_ptr()) };
    }
}

/// A scatter/gather entry of a registered region.
#[derive(Debug, Clone, Copy)]
pub struct Sge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

impl Sge {
    fn raw(self) -> sys::ibv_sge {
        sys::ibv_sge { addr: self.addr, length: self.length, lkey: self.lkey }
    }
}

/// A completion channel: the file descriptor the worker waits on for completions of every queue.
pub struct CompChannel {
    raw: NonNull<sys::ibv_comp_channel>,
    _context: Rc<Context>,
}

impl CompChannel {
    pub fn new(context: &Rc<Context>) -> Result<Rc<CompChannel>, VerbsError> {
        // SAFETY: the context is valid.
        let raw = unsafe { sys::ibv_create_comp_channel(context.raw.as_ptr()) };
        let raw = NonNull::new(raw).ok_or_else(|| last_error("ibv_create_comp_channel"))?;
        let channel = CompChannel { raw, _context: Rc::clone(context) };
        set_nonblocking(channel.fd())?;
        Ok(Rc::new(channel))
    }

    pub fn fd(&self) -> RawFd {
        // SAFETY: the channel is valid; fd is a plain field.
        unsafe { self.raw.as_ref().fd }
    }

    /// Registers the channel's descriptor with the current tokio reactor.
    pub fn watch(self: &Rc<Self>) -> io::Result<Watched> {
        Watched::new(self.fd(), Rc::clone(self) as Rc<dyn std::any::Any>)
    }

    /// The completion queue that signalled (by address), its event acknowledged; `None` when none did.
    pub fn next(&self) -> Result<Option<usize>, VerbsError> {
        let mut cq: *mut sys::ibv_cq = null_mut();
        let mut context: *mut c_void = null_mut();
        // SAFETY: the channel is valid; cq and context are written on success.
        let ret = unsafe { sys::ibv_get_cq_event(self.raw.as_ptr(), &mut cq, &mut context) };
        if ret != 0 {
            let e = last_error("ibv_get_cq_event");
            return if e.would_block() { Ok(None) } else { Err(e) };
        }
        // SAFETY: the event names a live CQ (a CQ cannot be destroyed with unacknowledged events); one ack.
        unsafe { sys::ibv_ack_cq_events(cq, 1) };
        Ok(Some(cq as usize))
    }
}

impl Drop for CompChannel {
    fn drop(&mut self) {
        // SAFETY: every CQ on the channel holds an Rc to it, so none is left.
        unsafe { sys::ibv_destroy_comp_channel(self.raw.as_ptr()) };
    }
}

/// A work completion as libibverbs reports it.
#[derive(Debug, Clone, Copy)]
pub struct Wc {
    pub wr_id: u64,
    pub qp_num: u32,
    pub status: u32,
    pub opcode: u32,
    pub byte_len: u32,
    pub imm: Option<u32>,
    pub invalidated_rkey: Option<u32>,
}

pub use sys::ibv_wc_opcode as wc_opcode;
pub use sys::ibv_wc_status as wc_status;

/// A completion queue, armed on a completion channel.
pub struct Cq {
    raw: NonNull<sys::ibv_cq>,
    _channel: Rc<CompChannel>,
}

impl Cq {
    pub fn new(context: &Rc<Context>, channel: &Rc<CompChannel>, entries: u32) -> Result<Rc<Cq>, VerbsError> {
        // SAFETY: context and channel are valid and of the same device.
        let raw =
            unsafe { sys::ibv_create_cq(context.raw.as_ptr(), entries as i32, null_mut(), channel.raw.as_ptr(), 0) };
        let raw = NonNull::new(raw).ok_or_else(|| last_error("ibv_create_cq"))?;
        let cq = Cq { raw, _channel: Rc::clone(channel) };
        cq.arm()?;
        Ok(Rc::new(cq))
    }

    /// Makes room for at least `entries` completions (`ibv_resize_cq`).
    pub fn resize(&self, entries: u32) -> Result<(), VerbsError> {
        let entries = i32::try_from(entries).unwrap_or(i32::MAX);
        // SAFETY: the CQ is valid; libibverbs keeps what it holds across the resize.
        let ret = unsafe { sys::ibv_resize_cq(self.raw.as_ptr(), entries) };
        if ret == 0 {
            Ok(())
        } else {
            Err(VerbsError { call: "ibv_resize_cq", source: io::Error::from_raw_os_error(ret.abs()) })
        }
    }

    /// Asks for an event on the channel at the next completion.
    pub fn arm(&self) -> Result<(), VerbsError> {
        // SAFETY: the CQ is valid.
        check("ibv_req_notify_cq", unsafe { sys::ibv_req_notify_cq(self.raw.as_ptr(), 0) })
    }

    /// Appends up to `max` completions to `out`; returns how many.
    pub fn poll(&self, out: &mut Vec<Wc>, max: usize) -> Result<usize, VerbsError> {
        // SAFETY: ibv_wc is plain data for which all-zero bytes are valid.
        let mut wcs: [sys::ibv_wc; 16] = unsafe { std::mem::zeroed() };
        let mut total = 0;
        while total < max {
            let want = (max - total).min(wcs.len());
            // SAFETY: the CQ is valid; at most `want` entries of `wcs` are written.
            let n = unsafe { sys::ibv_poll_cq(self.raw.as_ptr(), want as i32, wcs.as_mut_ptr()) };
            if n < 0 {
                return Err(VerbsError { call: "ibv_poll_cq", source: io::Error::from_raw_os_error(-n) });
            }
            for wc in &wcs[..n as usize] {
                let flags = wc.wc_flags;
                // SAFETY: the union member is chosen by wc_flags, as libibverbs documents.
                let (imm, inv) = unsafe {
                    (
                        (flags & sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0)
                            .then(|| u32::from_be(wc.imm_data_invalidated_rkey_union.imm_data)),
                        (flags & sys::ibv_wc_flags::IBV_WC_WITH_INV.0 != 0)
                            .then_some(wc.imm_data_invalidated_rkey_union.invalidated_rkey),
                    )
                };
                out.push(Wc {
                    wr_id: wc.wr_id,
                    qp_num: wc.qp_num,
                    status: wc.status,
                    opcode: wc.opcode,
                    byte_len: wc.byte_len,
                    imm,
                    invalidated_rkey: inv,
                });
            }
            total += n as usize;
            if (n as usize) < want {
                break;
            }
        }
        Ok(total)
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: queue pairs using the CQ hold an Rc to it, so none is left; its events were acknowledged.
        unsafe { sys::ibv_destroy_cq(self.raw.as_ptr()) };
    }
}

/// A shared receive queue.
pub struct Srq {
    raw: NonNull<sys::ibv_srq>,
    _pd: Rc<Pd>,
}

/// A one-entry (or empty) receive request pointing at `sg`, which must outlive its posting.
fn recv_wr(wr_id: u64, sg: &mut Option<sys::ibv_sge>) -> sys::ibv_recv_wr {
    sys::ibv_recv_wr {
        wr_id,
        next: null_mut(),
        sg_list: sg.as_mut().map_or(null_mut(), |s| s as *mut _),
        num_sge: i32::from(sg.is_some()),
    }
}

fn post_recv_error(call: &'static str, ret: i32) -> Result<(), VerbsError> {
    if ret == 0 { Ok(()) } else { Err(VerbsError { call, source: io::Error::from_raw_os_error(ret.abs()) }) }
}

impl Srq {
    pub fn new(pd: &Rc<Pd>, max_wr: u32) -> Result<Rc<Srq>, VerbsError> {
        let mut attr = sys::ibv_srq_init_attr {
            srq_context: null_mut(),
            attr: sys::ibv_srq_attr { max_wr, max_sge: 1, srq_limit: 0 },
        };
        // SAFETY: the domain is valid; attr is read (and its caps written) by the call.
        let raw = unsafe { sys::ibv_create_srq(pd.raw.as_ptr(), &mut attr) };
        let raw = NonNull::new(raw).ok_or_else(|| last_error("ibv_create_srq"))?;
        Ok(Rc::new(Srq { raw, _pd: Rc::clone(pd) }))
    }

    /// Posts a receive into `sge`'s region (which must stay registered and untouched until it completes).
    pub fn post_recv(&self, wr_id: u64, sge: Option<Sge>) -> Result<(), VerbsError> {
        let mut sg = sge.map(Sge::raw);
        let mut wr = recv_wr(wr_id, &mut sg);
        let mut bad: *mut sys::ibv_recv_wr = null_mut();
        // SAFETY: the SRQ is valid; wr and its SGE live across the call (the device copies them).
        post_recv_error("ibv_post_srq_recv", unsafe { sys::ibv_post_srq_recv(self.raw.as_ptr(), &mut wr, &mut bad) })
    }
}

impl Drop for Srq {
    fn drop(&mut self) {
        // SAFETY: queue pairs on the SRQ hold an Rc to it, so none is left.
        unsafe { sys::ibv_destroy_srq(self.raw.as_ptr()) };
    }
}

/// One request of a chain for [`Qp::post_sends`]. An unsignalled one completes silently: its completion is
/// implied by a later signalled one's (an RC send queue completes in order).
#[derive(Debug, Clone, Copy)]
pub struct SendRequest {
    pub wr_id: u64,
    pub kind: SendKind,
    pub sge: Option<Sge>,
    pub solicited: bool,
    pub signaled: bool,
}

/// What a send-queue request does, in libibverbs terms.
#[derive(Debug, Clone, Copy)]
pub enum SendKind {
    Send,
    SendWithImm(u32),
    SendWithInv(u32),
    Write { remote_addr: u64, rkey: u32 },
    WriteWithImm { remote_addr: u64, rkey: u32, imm: u32 },
    Read { remote_addr: u64, rkey: u32 },
}

/// An RC queue pair.
pub struct Qp {
    raw: NonNull<sys::ibv_qp>,
    _cq: Rc<Cq>,
    _pd: Rc<Pd>,
    _srq: Option<Rc<Srq>>,
}

impl Qp {
    /// An RC queue pair whose send and receive completions go to `cq`; receives come from `srq` if given.
    pub fn new(
        pd: &Rc<Pd>,
        cq: &Rc<Cq>,
        srq: Option<&Rc<Srq>>,
        max_send_wr: u32,
        max_recv_wr: u32,
    ) -> Result<Qp, VerbsError> {
        let mut attr = sys::ibv_qp_init_attr {
            qp_context: null_mut(),
            send_cq: cq.raw.as_ptr(),
            recv_cq: cq.raw.as_ptr(),
            srq: srq.map_or(null_mut(), |s| s.raw.as_ptr()),
            cap: sys::ibv_qp_cap {
                max_send_wr,
                max_recv_wr: if srq.is_some() { 0 } else { max_recv_wr },
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: sys::ibv_qp_type::IBV_QPT_RC,
            // Requests say whether they are signalled (the worker leaves all but a chain's last unsignalled).
            sq_sig_all: 0,
        };
        // SAFETY: domain, CQ and SRQ are valid and of one device; attr is read by the call.
        let raw = unsafe { sys::ibv_create_qp(pd.raw.as_ptr(), &mut attr) };
        let raw = NonNull::new(raw).ok_or_else(|| last_error("ibv_create_qp"))?;
        Ok(Qp { raw, _cq: Rc::clone(cq), _pd: Rc::clone(pd), _srq: srq.map(Rc::clone) })
    }

    pub fn qp_num(&self) -> u32 {
        // SAFETY: the QP is valid; qp_num is a plain field.
        unsafe { self.raw.as_ref().qp_num }
    }

    pub fn modify(&self, attr: &mut QpAttr) -> Result<(), VerbsError> {
        // SAFETY: the QP is valid; attr and mask come from the kernel's INIT_QP_ATTR (or a state-only change).
        check("ibv_modify_qp", unsafe { sys::ibv_modify_qp(self.raw.as_ptr(), &mut attr.attr, attr.mask) })
    }

    /// RESET → INIT on `port`, with remote read and write allowed (receives may be posted from here on).
    pub fn init(&self, port: u8) -> Result<(), VerbsError> {
        // SAFETY: ibv_qp_attr is plain data for which all-zero bytes are valid.
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_INIT;
        attr.port_num = port;
        attr.pkey_index = 0;
        attr.qp_access_flags = sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0
            | sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0
            | sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        let mask = sys::ibv_qp_attr_mask::IBV_QP_STATE.0
            | sys::ibv_qp_attr_mask::IBV_QP_PKEY_INDEX.0
            | sys::ibv_qp_attr_mask::IBV_QP_PORT.0
            | sys::ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS.0;
        self.modify(&mut QpAttr { attr, mask: mask as i32 })
    }

    /// Any state → ERR: outstanding work completes with a flush error.
    pub fn to_error(&self) -> Result<(), VerbsError> {
        // SAFETY: ibv_qp_attr is plain data for which all-zero bytes are valid.
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_ERR;
        self.modify(&mut QpAttr { attr, mask: sys::ibv_qp_attr_mask::IBV_QP_STATE.0 as i32 })
    }

    /// Posts `requests` as one chain — one `ibv_post_send`, so the provider is rung once — each over its SGE's
    /// region (registered and untouched until it completes). On a failure, the index of the first request not
    /// posted (those before it are on the device), or `None` when the provider named none: then all of them are
    /// on its ring (its doorbell failed), to be flushed.
    pub fn post_sends(&self, requests: &[SendRequest]) -> Result<(), (Option<usize>, VerbsError)> {
        if requests.is_empty() {
            return Ok(());
        }
        let mut sges: Vec<sys::ibv_sge> =
            requests.iter().map(|r| r.sge.map_or(sys::ibv_sge { addr: 0, length: 0, lkey: 0 }, Sge::raw)).collect();
        let mut wrs: Vec<sys::ibv_send_wr> = Vec::with_capacity(requests.len());
        for (r, sg) in requests.iter().zip(sges.iter_mut()) {
            // SAFETY: ibv_send_wr is plain data (pointers and integers) for which all-zero bytes are valid.
            let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
            wr.wr_id = r.wr_id;
            wr.sg_list = if r.sge.is_some() { sg as *mut _ } else { null_mut() };
            wr.num_sge = i32::from(r.sge.is_some());
            if r.signaled {
                wr.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
            }
            if r.solicited {
                wr.send_flags |= sys::ibv_send_flags::IBV_SEND_SOLICITED.0;
            }
            use sys::ibv_wr_opcode as op;
            let rdma = |remote_addr, rkey| sys::wr_t { rdma: sys::rdma_t { remote_addr, rkey } };
            match r.kind {
                SendKind::Send => wr.opcode = op::IBV_WR_SEND,
                SendKind::SendWithImm(imm) => {
                    wr.opcode = op::IBV_WR_SEND_WITH_IMM;
                    wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
                }
                SendKind::SendWithInv(rkey) => {
                    wr.opcode = op::IBV_WR_SEND_WITH_INV;
                    wr.imm_data_invalidated_rkey_union.invalidated_rkey = rkey;
                }
                SendKind::Write { remote_addr, rkey } => {
                    wr.opcode = op::IBV_WR_RDMA_WRITE;
                    wr.wr = rdma(remote_addr, rkey);
                }
                SendKind::WriteWithImm { remote_addr, rkey, imm } => {
                    wr.opcode = op::IBV_WR_RDMA_WRITE_WITH_IMM;
                    wr.wr = rdma(remote_addr, rkey);
                    wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
                }
                SendKind::Read { remote_addr, rkey } => {
                    wr.opcode = op::IBV_WR_RDMA_READ;
                    wr.wr = rdma(remote_addr, rkey);
                }
            }
            wrs.push(wr);
        }
        // Linked in place through one base pointer: `wrs` is not resized or reborrowed from here on.
        let base = wrs.as_mut_ptr();
        for i in 1..wrs.len() {
            // SAFETY: i - 1 and i are in bounds of `wrs`, which outlives the call below.
            unsafe { (*base.add(i - 1)).next = base.add(i) };
        }
        let mut bad: *mut sys::ibv_send_wr = null_mut();
        // SAFETY: the QP is valid; the chain and its SGEs live across the call (the provider copies them).
        let ret = unsafe { sys::ibv_post_send(self.raw.as_ptr(), base, &mut bad) };
        post_recv_error("ibv_post_send", ret).map_err(|e| {
            let at = (0..requests.len()).find(|&i| std::ptr::eq(base.wrapping_add(i), bad));
            (at, e)
        })
    }

    /// Posts a receive into `sge`'s region (registered and untouched until it completes).
    pub fn post_recv(&self, wr_id: u64, sge: Option<Sge>) -> Result<(), VerbsError> {
        let mut sg = sge.map(Sge::raw);
        let mut wr = recv_wr(wr_id, &mut sg);
        let mut bad: *mut sys::ibv_recv_wr = null_mut();
        // SAFETY: the QP is valid; wr and its SGE live across the call.
        post_recv_error("ibv_post_recv", unsafe { sys::ibv_post_recv(self.raw.as_ptr(), &mut wr, &mut bad) })
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: the QP is valid and destroyed once; the device stops using its buffers when this returns.
        unsafe { sys::ibv_destroy_qp(self.raw.as_ptr()) };
    }
}
