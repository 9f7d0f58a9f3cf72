//! The verbs provider's foreign-function layer: the workspace's only unsafe code. Each type here owns one
//! libibverbs or librdmacm object and releases it on drop; a type that needs another object alive holds an
//! `Rc` to it (a queue pair holds its completion queue, protection domain and shared receive queue; a domain
//! holds the device context; the context holds the connection-manager id that keeps librdmacm's device open),
//! so objects are always destroyed children first. Raw pointers and `Rc` make every type `!Send`: they live
//! and die on the device's worker thread, which is the ownership rule that keeps a queue pair from being freed
//! on one thread while another still uses it.
//!
//! Memory handed to the device for DMA belongs to a [`MemoryRegion`]: the region owns the `Vec`, and gives it
//! back only after `ibv_dereg_mr`. The worker reads or writes a region's bytes only while no work request that
//! uses it is outstanding.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;
use std::ptr::{NonNull, null_mut};
use std::rc::Rc;

use rdma_mummy_sys as sys;

fn last_error(call: &'static str) -> VerbsError {
    VerbsError { call, source: io::Error::last_os_error() }
}

fn check(call: &'static str, ret: i32) -> Result<(), VerbsError> {
    match ret {
        0 => Ok(()),
        // librdmacm returns -1 and sets errno; libibverbs returns the errno itself.
        -1 => Err(last_error(call)),
        e => Err(VerbsError { call, source: io::Error::from_raw_os_error(e.abs()) }),
    }
}

/// A failed libibverbs or librdmacm call.
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

fn sockaddr_of(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data for which all-zero bytes are valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(std::ptr::addr_of_mut!(storage).cast::<libc::sockaddr_in>(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: v6.ip().octets() },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(std::ptr::addr_of_mut!(storage).cast::<libc::sockaddr_in6>(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Reads a socket address librdmacm filled in; `None` for a family other than IPv4 and IPv6.
///
/// SAFETY (for callers): `sa` must point to a sockaddr_storage-sized address.
unsafe fn socket_addr_from(sa: *const libc::sockaddr) -> Option<SocketAddr> {
    // SAFETY: the caller guarantees `sa` points to a full sockaddr; the family says which layout it has.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let sin = &*sa.cast::<libc::sockaddr_in>();
                let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
                Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(sin.sin_port)))
            }
            libc::AF_INET6 => {
                let sin6 = &*sa.cast::<libc::sockaddr_in6>();
                Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)), u16::from_be(sin6.sin6_port)))
            }
            _ => None,
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

/// A librdmacm event channel: the file descriptor the worker waits on for connection events.
pub struct EventChannel {
    raw: NonNull<sys::rdma_event_channel>,
}

impl EventChannel {
    pub fn new() -> Result<Rc<EventChannel>, VerbsError> {
        // SAFETY: no arguments; a null return is checked.
        let raw = unsafe { sys::rdma_create_event_channel() };
        let raw = NonNull::new(raw).ok_or_else(|| last_error("rdma_create_event_channel"))?;
        let channel = EventChannel { raw };
        set_nonblocking(channel.fd())?;
        Ok(Rc::new(channel))
    }

    pub fn fd(&self) -> RawFd {
        // SAFETY: the channel is valid for our lifetime; fd is a plain field.
        unsafe { self.raw.as_ref().fd }
    }

    /// Registers the channel's descriptor with the current tokio reactor.
    pub fn watch(self: &Rc<Self>) -> io::Result<Watched> {
        Watched::new(self.fd(), Rc::clone(self) as Rc<dyn std::any::Any>)
    }

    /// The next event, acknowledged (its contents copied out first), or `None` when none is queued.
    pub fn next(self: &Rc<Self>) -> Result<Option<CmEvent>, VerbsError> {
        let mut event: *mut sys::rdma_cm_event = null_mut();
        // SAFETY: the channel is valid; `event` receives a pointer librdmacm owns until rdma_ack_cm_event.
        let ret = unsafe { sys::rdma_get_cm_event(self.raw.as_ptr(), &mut event) };
        if ret != 0 {
            let e = last_error("rdma_get_cm_event");
            return if e.would_block() { Ok(None) } else { Err(e) };
        }
        // SAFETY: success gives a valid event, which stays valid until acknowledged below.
        let ev = unsafe { &*event };
        let kind = ev.event;
        let is_request = kind == sys::rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST;
        let carries_conn = matches!(
            kind,
            sys::rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST
                | sys::rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_RESPONSE
                | sys::rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED
                | sys::rdma_cm_event_type::RDMA_CM_EVENT_REJECTED
        );
        let conn = if carries_conn {
            // SAFETY: for these events the union holds connection parameters; private_data points to
            // private_data_len bytes owned by the event (or is null).
            unsafe {
                let p = &ev.param.conn;
                let data = if p.private_data.is_null() {
                    Vec::new()
                } else {
                    std::slice::from_raw_parts(p.private_data.cast::<u8>(), usize::from(p.private_data_len)).to_vec()
                };
                ConnParams {
                    private_data: data,
                    responder_resources: p.responder_resources,
                    initiator_depth: p.initiator_depth,
                    retry_count: p.retry_count,
                    rnr_retry_count: p.rnr_retry_count,
                    qp_num: p.qp_num,
                }
            }
        } else {
            ConnParams::default()
        };
        let id_key = ev.id as usize;
        let listen_key = ev.listen_id as usize;
        let new_id =
            if is_request { NonNull::new(ev.id).map(|raw| CmId { raw, _channel: Rc::clone(self) }) } else { None };
        let status = ev.status;
        // SAFETY: the event came from rdma_get_cm_event and is acknowledged exactly once; nothing read from it
        // is used afterwards (the new id of a request is ours to destroy and outlives the event).
        check("rdma_ack_cm_event", unsafe { sys::rdma_ack_cm_event(event) })?;
        Ok(Some(CmEvent { kind, status, id_key, listen_key, new_id, conn }))
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every id of the channel holds an Rc to it, so none is left when this runs.
        unsafe { sys::rdma_destroy_event_channel(self.raw.as_ptr()) };
    }
}

/// Connection parameters an event carried.
#[derive(Debug, Clone, Default)]
pub struct ConnParams {
    pub private_data: Vec<u8>,
    pub responder_resources: u8,
    pub initiator_depth: u8,
    pub retry_count: u8,
    pub rnr_retry_count: u8,
    pub qp_num: u32,
}

/// A connection-manager event, copied out and already acknowledged.
pub struct CmEvent {
    pub kind: sys::rdma_cm_event_type::Type,
    pub status: i32,
    /// The id the event is for ([`CmId::key`]); for a connect request, the new id's.
    pub id_key: usize,
    /// The listening id a connect request arrived on.
    pub listen_key: usize,
    /// A connect request's new id: ours to accept, reject or drop.
    pub new_id: Option<CmId>,
    pub conn: ConnParams,
}

pub use sys::rdma_cm_event_type as cm_event;

/// What the application sends in a connect or accept.
#[derive(Debug, Clone, Default)]
pub struct ConnRequest {
    pub private_data: Vec<u8>,
    pub responder_resources: u8,
    pub initiator_depth: u8,
    pub retry_count: u8,
    pub rnr_retry_count: u8,
    pub qp_num: u32,
    pub srq: bool,
}

impl ConnRequest {
    fn raw(&self) -> Result<sys::rdma_conn_param, VerbsError> {
        let len = u8::try_from(self.private_data.len())
            .map_err(|_| VerbsError { call: "rdma_conn_param", source: io::ErrorKind::InvalidInput.into() })?;
        Ok(sys::rdma_conn_param {
            private_data: if len == 0 { std::ptr::null() } else { self.private_data.as_ptr().cast() },
            private_data_len: len,
            responder_resources: self.responder_resources,
            initiator_depth: self.initiator_depth,
            flow_control: 1,
            retry_count: self.retry_count.min(7),
            rnr_retry_count: self.rnr_retry_count.min(7),
            srq: u8::from(self.srq),
            qp_num: self.qp_num,
        })
    }
}

/// A librdmacm id (`rdma_cm_id`): a listener, or one end of a connection.
pub struct CmId {
    raw: NonNull<sys::rdma_cm_id>,
    _channel: Rc<EventChannel>,
}

/// Queue pair states, for [`CmId::qp_attr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpTarget {
    Init,
    Rtr,
    Rts,
}

/// Queue pair attributes and their mask, as `rdma_init_qp_attr` computes them for a connection.
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
}

impl CmId {
    pub fn new(channel: &Rc<EventChannel>) -> Result<CmId, VerbsError> {
        let mut raw: *mut sys::rdma_cm_id = null_mut();
        // SAFETY: the channel is valid; `raw` receives the new id. RDMA_PS_TCP gives RC connections.
        let ret = unsafe {
            sys::rdma_create_id(channel.raw.as_ptr(), &mut raw, null_mut(), sys::rdma_port_space::RDMA_PS_TCP)
        };
        check("rdma_create_id", ret)?;
        let raw = NonNull::new(raw).ok_or_else(|| last_error("rdma_create_id"))?;
        Ok(CmId { raw, _channel: Rc::clone(channel) })
    }

    /// Identifies the id in events.
    pub fn key(&self) -> usize {
        self.raw.as_ptr() as usize
    }

    pub fn bind(&self, addr: SocketAddr) -> Result<(), VerbsError> {
        let (mut storage, _) = sockaddr_of(addr);
        // SAFETY: the id is valid; the address is a complete sockaddr for its family.
        check("rdma_bind_addr", unsafe {
            sys::rdma_bind_addr(self.raw.as_ptr(), std::ptr::addr_of_mut!(storage).cast())
        })
    }

    pub fn listen(&self, backlog: i32) -> Result<(), VerbsError> {
        // SAFETY: the id is valid and bound.
        check("rdma_listen", unsafe { sys::rdma_listen(self.raw.as_ptr(), backlog) })
    }

    pub fn resolve_addr(&self, src: Option<SocketAddr>, dst: SocketAddr, timeout_ms: i32) -> Result<(), VerbsError> {
        let (mut dst, _) = sockaddr_of(dst);
        let mut src = src.map(|s| sockaddr_of(s).0);
        let src_ptr = src.as_mut().map_or(null_mut(), |s| std::ptr::addr_of_mut!(*s).cast());
        // SAFETY: the id is valid; both addresses are complete sockaddrs (or null for the source).
        check("rdma_resolve_addr", unsafe {
            sys::rdma_resolve_addr(self.raw.as_ptr(), src_ptr, std::ptr::addr_of_mut!(dst).cast(), timeout_ms)
        })
    }

    pub fn resolve_route(&self, timeout_ms: i32) -> Result<(), VerbsError> {
        // SAFETY: the id is valid and its address resolved.
        check("rdma_resolve_route", unsafe { sys::rdma_resolve_route(self.raw.as_ptr(), timeout_ms) })
    }

    pub fn connect(&self, request: &ConnRequest) -> Result<(), VerbsError> {
        let mut param = request.raw()?;
        // SAFETY: the id is valid; `param` points into `request`, which outlives the call (librdmacm copies it).
        check("rdma_connect", unsafe { sys::rdma_connect(self.raw.as_ptr(), &mut param) })
    }

    pub fn accept(&self, request: &ConnRequest) -> Result<(), VerbsError> {
        let mut param = request.raw()?;
        // SAFETY: as for connect.
        check("rdma_accept", unsafe { sys::rdma_accept(self.raw.as_ptr(), &mut param) })
    }

    pub fn reject(&self, private_data: &[u8]) -> Result<(), VerbsError> {
        let len = u8::try_from(private_data.len())
            .map_err(|_| VerbsError { call: "rdma_reject", source: io::ErrorKind::InvalidInput.into() })?;
        let data = if len == 0 { std::ptr::null() } else { private_data.as_ptr().cast() };
        // SAFETY: the id is valid; the data is `len` readable bytes, copied by librdmacm.
        check("rdma_reject", unsafe { sys::rdma_reject(self.raw.as_ptr(), data, len) })
    }

    pub fn establish(&self) -> Result<(), VerbsError> {
        // SAFETY: the id is valid and has received a connect response.
        check("rdma_establish", unsafe { sys::rdma_establish(self.raw.as_ptr()) })
    }

    pub fn disconnect(&self) -> Result<(), VerbsError> {
        // SAFETY: the id is valid.
        check("rdma_disconnect", unsafe { sys::rdma_disconnect(self.raw.as_ptr()) })
    }

    /// The attributes a queue pair needs to enter `state` for this connection.
    pub fn qp_attr(&self, state: QpTarget) -> Result<QpAttr, VerbsError> {
        // SAFETY: ibv_qp_attr is plain data for which all-zero bytes are valid.
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = match state {
            QpTarget::Init => sys::ibv_qp_state::IBV_QPS_INIT,
            QpTarget::Rtr => sys::ibv_qp_state::IBV_QPS_RTR,
            QpTarget::Rts => sys::ibv_qp_state::IBV_QPS_RTS,
        };
        let mut mask = 0;
        // SAFETY: the id is valid; attr and mask are written by the call.
        check("rdma_init_qp_attr", unsafe { sys::rdma_init_qp_attr(self.raw.as_ptr(), &mut attr, &mut mask) })?;
        Ok(QpAttr { attr, mask })
    }

    /// The device context the id is bound to, if any.
    fn context_ptr(&self) -> *mut sys::ibv_context {
        // SAFETY: the id is valid; `verbs` is a plain field librdmacm sets on binding.
        unsafe { self.raw.as_ref().verbs }
    }

    pub fn port_num(&self) -> u8 {
        // SAFETY: as above.
        unsafe { self.raw.as_ref().port_num }
    }

    /// The peer's address (after address resolution, or on a connect request's id).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: the id is valid; the route's destination is a sockaddr_storage-sized union.
        unsafe { socket_addr_from(std::ptr::addr_of!(self.raw.as_ref().route.addr.dst_addr_union).cast()) }
    }

    /// Whether this id is on the device `context` is.
    pub fn on_device(&self, context: &Context) -> bool {
        self.context_ptr() == context.raw.as_ptr()
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: the id is valid and destroyed once; its events were acknowledged as they were read.
        unsafe { sys::rdma_destroy_id(self.raw.as_ptr()) };
    }
}

/// The device context librdmacm opened for the device an id is bound to. It is librdmacm's, not ours to
/// close: holding the bound id keeps it open.
pub struct Context {
    raw: NonNull<sys::ibv_context>,
    _anchor: Rc<CmId>,
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

impl Context {
    /// The context of the device `anchor` is bound to.
    pub fn of(anchor: Rc<CmId>) -> Option<Rc<Context>> {
        let raw = NonNull::new(anchor.context_ptr())?;
        Some(Rc::new(Context { raw, _anchor: anchor }))
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
        Ok((active, 128usize << attr.active_mtu.clamp(1, 5)))
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
        let mut flags = 0;
        if access.local_write || access.remote_write {
            flags |= sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        }
        if access.remote_read {
            flags |= sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
        }
        if access.remote_write {
            flags |= sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        }
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

    /// The completion queue that signalled ([`Cq::key`]), its event acknowledged; `None` when none did.
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

    pub fn key(&self) -> usize {
        self.raw.as_ptr() as usize
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
            sq_sig_all: 1,
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
        // SAFETY: the QP is valid; attr and mask come from rdma_init_qp_attr (or a state-only change).
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

    /// Posts one signalled send-queue request over `sge`'s region (registered and untouched until it completes).
    pub fn post_send(&self, wr_id: u64, kind: SendKind, sge: Option<Sge>, solicited: bool) -> Result<(), VerbsError> {
        let mut sg = sge.map(Sge::raw);
        // SAFETY: ibv_send_wr is plain data (pointers and integers) for which all-zero bytes are valid.
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = sg.as_mut().map_or(null_mut(), |s| s as *mut _);
        wr.num_sge = i32::from(sg.is_some());
        wr.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
        if solicited {
            wr.send_flags |= sys::ibv_send_flags::IBV_SEND_SOLICITED.0;
        }
        use sys::ibv_wr_opcode as op;
        let rdma = |remote_addr, rkey| sys::wr_t { rdma: sys::rdma_t { remote_addr, rkey } };
        match kind {
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
        let mut bad: *mut sys::ibv_send_wr = null_mut();
        // SAFETY: the QP is valid; wr and its SGE live across the call (the provider copies them).
        post_recv_error("ibv_post_send", unsafe { sys::ibv_post_send(self.raw.as_ptr(), &mut wr, &mut bad) })
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
