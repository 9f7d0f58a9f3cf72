//! A host's controller association, brought up in the Linux host's order (`drivers/nvme/host/rdma.c`,
//! `core.c`, `fabrics.c`): admin queue (CM private data qid 0, hrqsize 32, hsqsize 31), Connect, Property Get
//! CAP and VS, Property Set CC.EN, wait for CSTS.RDY, Identify Controller, Set Features Number of Queues and
//! Async Event Configuration, the I/O queues' Connects, then Keep Alive every KATO/2. Commands carry data by
//! keyed SGL (a region registered for the command and invalidated by the target's SEND_WITH_INV) or, for
//! small writes on I/O queues, in the capsule.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nvme_proto::command::{GetLogPage, Identify};
use nvme_proto::discovery::DiscoveryLog;
use nvme_proto::fabrics::{CNTLID_DYNAMIC, Connect, ConnectData, connect_result_cntlid};
use nvme_proto::features::{Feature, NumberOfQueues, async_event_config};
use nvme_proto::identify::{IdentifyController, IdentifyNamespace, NamespaceList, cns};
use nvme_proto::io::{DatasetManagement, DsmRange, ReadWrite, dsm_attribute};
use nvme_proto::property::{Cap, Cc, Csts, Property};
use nvme_proto::{AdminCommand, Capsule, Command, Cqe, FabricsCommand, IoCommand, SglDescriptor, Uuid};
use tokio::task::JoinHandle;
use transport::{Access, Device, ProtectionDomain, Provider, SoftConfig, VerbsConfig};

use crate::error::HostError;
use crate::events::EventRouter;
use crate::io_buffer::IoBuffer;
use crate::lane::LaneThread;
use crate::loss::LossSignal;
use crate::queue::{DataMoveCounts, DataMoves, HostQueue, QueueIo, QueuePool};

/// Where a target listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetAddr {
    /// The target's address and its RoCEv2 UDP port (4791 for any RoCEv2 device).
    pub udp: SocketAddr,
    /// The NVMe/RDMA service id (rdma_cm port), 4420 by default.
    pub trsvcid: u16,
}

impl TargetAddr {
    pub fn new(addr: IpAddr, trsvcid: u16) -> TargetAddr {
        TargetAddr { udp: SocketAddr::new(addr, transport::soft::wire::ROCEV2_UDP_PORT), trsvcid }
    }
}

/// How to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    pub subnqn: String,
    pub hostnqn: String,
    pub hostid: Uuid,
    /// I/O queues to ask for (the target may grant fewer).
    pub nr_io_queues: u16,
    /// Entries per I/O queue.
    pub queue_size: u16,
    pub admin_queue_size: u16,
    /// Keep-alive timeout sent in Connect; `None` asks for none.
    pub keep_alive_tmo: Option<Duration>,
    /// Send Keep Alive every KATO/2 (turn off only to test a target's keep-alive expiry).
    pub send_keep_alive: bool,
    /// Our address; by default the loopback address for a loopback target, else the source address the
    /// kernel's routing table picks for the target.
    pub local_addr: Option<IpAddr>,
    /// Writes up to this many bytes travel in the capsule on I/O queues (capped by the target's IOCCSZ).
    pub in_capsule_limit: usize,
    /// An I/O command not completed within this is taken as the association's loss (Linux: io_timeout 30 s).
    pub io_timeout: Duration,
    /// The RDMA provider the connection's device is opened with.
    pub provider: Provider,
}

impl ConnectOptions {
    pub fn new(subnqn: &str) -> ConnectOptions {
        let hostid = default_hostid();
        ConnectOptions {
            subnqn: subnqn.to_string(),
            hostnqn: format!("nqn.2014-08.org.nvmexpress:uuid:{}", hostid),
            hostid,
            nr_io_queues: 1,
            queue_size: 128,
            admin_queue_size: 32,
            keep_alive_tmo: Some(Duration::from_secs(5)),
            send_keep_alive: true,
            local_addr: None,
            in_capsule_limit: 4096,
            io_timeout: Duration::from_secs(30),
            provider: Provider::Soft,
        }
    }
}

/// A host id for this machine: /etc/nvme/hostid when present, else derived from the machine id.
pub fn default_hostid() -> Uuid {
    if let Ok(text) = std::fs::read_to_string("/etc/nvme/hostid")
        && let Ok(u) = Uuid::parse(text.trim())
    {
        return u;
    }
    let seed = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let mut out = [0u8; 16];
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
        for b in seed.bytes().chain([i as u8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        chunk.copy_from_slice(&h.to_be_bytes());
    }
    out[6] = (out[6] & 0x0f) | 0x80;
    out[8] = (out[8] & 0x3f) | 0x80;
    Uuid::from_bytes(out)
}

/// What a command moves. Data to the controller is an [`IoBuffer`]: one the queue lent
/// ([`Controller::buffer`]) is sent in place, anything else (`vec.into()`) through a copy or a region of its own.
#[derive(Debug)]
pub enum DataDir {
    None,
    ToController(IoBuffer),
    ToHost(usize),
}

/// A namespace's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub nsid: u32,
    pub blocks: u64,
    pub block_size: u32,
}

/// A connected controller.
pub struct Controller {
    device: Arc<Device>,
    pd: ProtectionDomain,
    router: EventRouter,
    loss: Arc<LossSignal>,
    admin: Arc<HostQueue>,
    io: Vec<Arc<HostQueue>>,
    /// The I/O queues' lanes (soft provider), joined when the controller closes.
    lanes: Vec<Arc<LaneThread>>,
    next_io: AtomicUsize,
    pub cntlid: u16,
    pub cap: Cap,
    pub identify: IdentifyController,
    options: ConnectOptions,
    target: TargetAddr,
    namespaces: Mutex<HashMap<u32, NamespaceInfo>>,
    keep_alive: Option<JoinHandle<()>>,
    events: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<u32>>>,
    aer_task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").field("cntlid", &self.cntlid).field("subnqn", &self.options.subnqn).finish()
    }
}

/// Our address towards `target`: loopback for a loopback target, else the source address the kernel's routing
/// picks (a connected UDP socket learns it; nothing is sent).
fn local_for(target: SocketAddr) -> Option<IpAddr> {
    match target.ip() {
        IpAddr::V4(a) if a.is_loopback() => return Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        IpAddr::V6(a) if a.is_loopback() => return Some(target.ip()),
        _ => {}
    }
    let any: SocketAddr = if target.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { "[::]:0".parse().ok()? };
    let probe = std::net::UdpSocket::bind(any).ok()?;
    probe.connect(target).ok()?;
    probe.local_addr().ok().map(|a| a.ip())
}

/// Opens our soft device. A RoCEv2 peer on UDP 4791 answers to port 4791 whatever port we send from, so then we
/// bind 4791 too — on loopback (where the target holds 127.0.0.1:4791) at a free 127.x.y.z address when the
/// caller did not pick one. A peer on another port (a test device) answers to our source port: any port will do.
fn open_device(local: IpAddr, target_port: u16, pick_loopback: bool) -> Result<Device, HostError> {
    let rocev2 = transport::soft::wire::ROCEV2_UDP_PORT;
    if target_port != rocev2 {
        let mut config = SoftConfig::new(local);
        config.port = 0;
        return Ok(Device::open(config)?);
    }
    if !(pick_loopback && local.is_loopback() && local.is_ipv4()) {
        return Ok(Device::open(SoftConfig::new(local))?);
    }
    let seed = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), std::process::id());
    let mut last = None;
    for i in 0..64u64 {
        let n = (seed.wrapping_add(i.wrapping_mul(0x9e37_79b9)) % (250 * 250)) as u32;
        let addr = IpAddr::V4(Ipv4Addr::new(127, 1 + (n / 250) as u8, (n % 250) as u8, 2));
        match Device::open(SoftConfig::new(addr)) {
            Ok(d) => return Ok(d),
            Err(e @ transport::DeviceError::Bind { .. }) => last = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.map_or_else(|| HostError::Invalid("no free loopback address".into()), HostError::from))
}

fn capsule(command: Command, data: SglDescriptor) -> nvme_proto::Sqe {
    Capsule { command_id: 0, data, command }.to_sqe()
}

fn null_sgl() -> SglDescriptor {
    SglDescriptor::Keyed { address: 0, length: nvme_proto::sgl::U24::ZERO, key: 0, invalidate: false }
}

/// One command's outcome and the caller's buffer back (filled for controller → host transfers) whenever it
/// could be recovered — so that a write that failed on one association can be sent again on another.
pub(crate) type Exchange = (Result<Cqe, HostError>, Option<IoBuffer>);

/// Sends one command with its data on `queue`: small writes in the capsule; keyed data in place when the
/// queue's registered pool (verbs) lent the buffer, through a buffer of that pool otherwise, or in a region
/// registered for the command (soft — its pool's buffer moved into the region and back —, no pool, or more than
/// its buffers hold).
async fn exchange(
    pd: &ProtectionDomain,
    queue: &QueueIo,
    command: Command,
    data: DataDir,
    in_capsule_limit: usize,
    name: &'static str,
) -> Exchange {
    let (access, buf) = match data {
        DataDir::None => {
            let result = queue.submit(capsule(command, null_sgl()), &[]).await;
            return (result.and_then(|c| check(name, c)), Some(IoBuffer::default()));
        }
        DataDir::ToController(buf) if buf.len() <= in_capsule_limit => {
            let sgl = SglDescriptor::in_capsule(0, buf.len() as u32);
            let result = queue.submit(capsule(command, sgl), &buf).await;
            return (result.and_then(|c| check(name, c)), Some(buf));
        }
        DataDir::ToController(buf) => (Access::REMOTE_READ, buf),
        DataDir::ToHost(len) => match queue.pool() {
            Some(pool) => {
                // Zeroed as a new buffer would be: a lent one holds what its last use left (another read's
                // blocks, a write's), which a read the target acknowledged without writing must not return.
                let mut buf = IoBuffer::lend(pool, len).await;
                buf.fill(0);
                (Access::REMOTE_WRITE, buf)
            }
            None => (Access::REMOTE_WRITE, IoBuffer::zeroed(len)),
        },
    };
    let buf = match queue.pool() {
        Some(pool) if pool.in_place && buf.len() <= pool.buffers.buffer_size() => {
            match exchange_pooled(queue, pool, command, buf, access, name).await {
                Ok(done) => return done,
                Err(back) => back,
            }
        }
        _ => buf,
    };
    // The buffer's bytes are the region's while it is registered (a lent buffer's too: its pool gets it back
    // only once the region is gone, whatever the command's outcome).
    let len = buf.len() as u32;
    DataMoves::count(&queue.moves.registered);
    if buf.is_lent() && queue.pool().is_some_and(|p| p.in_place) {
        // A verbs pool's buffer whose arena is not registered: the verbs region would copy the piece out of its
        // arena and the pool would lose it, so a copy is registered and the buffer stays the caller's.
        return exchange_copy_registered(pd, queue, command, buf, access, name).await;
    }
    let mut shell = buf;
    let (bytes, lent) = shell.lend_bytes();
    let mr = match queue.register(pd, bytes, access).await {
        Ok(mr) => mr,
        Err(e) => return (Err(e), None),
    };
    let sgl = match SglDescriptor::keyed(mr.keys.addr, len, mr.keys.rkey, queue.remote_invalidate) {
        Ok(sgl) => sgl,
        Err(e) => {
            let buf = queue.deregister(mr).await.ok().map(|b| shell.restore_bytes(b, lent));
            return (Err(e.into()), buf);
        }
    };
    let result = queue.submit(capsule(command, sgl), &[]).await;
    match queue.deregister(mr).await {
        Ok(b) => (result.and_then(|c| check(name, c)), Some(shell.restore_bytes(b, lent))),
        Err(e) => (result.and(Err(e)), None),
    }
}

/// [`exchange`] through a region registered over a copy of `buf` (copied back for a read).
async fn exchange_copy_registered(
    pd: &ProtectionDomain,
    queue: &QueueIo,
    command: Command,
    mut buf: IoBuffer,
    access: Access,
    name: &'static str,
) -> Exchange {
    let len = buf.len() as u32;
    let mr = match queue.register(pd, transport::Buffer::from(&buf[..]), access).await {
        Ok(mr) => mr,
        Err(e) => return (Err(e), Some(buf)),
    };
    let result = match SglDescriptor::keyed(mr.keys.addr, len, mr.keys.rkey, queue.remote_invalidate) {
        Ok(sgl) => queue.submit(capsule(command, sgl), &[]).await.and_then(|c| check(name, c)),
        Err(e) => Err(e.into()),
    };
    match queue.deregister(mr).await {
        Ok(copy) => {
            if access.remote_write && result.is_ok() {
                buf.copy_from_slice(&copy);
            }
            (result, Some(buf))
        }
        Err(e) => (result.and(Err(e)), Some(buf)),
    }
}

/// [`exchange`] through the queue's registered pool: a buffer the pool lent is posted where it is; any other is
/// copied in (writes) or out (reads) through one of the pool's. The caller's buffer comes back as the error when
/// the pool's arena is not registered (then the command registers a region of its own).
async fn exchange_pooled(
    queue: &QueueIo,
    pool: &Arc<QueuePool>,
    command: Command,
    data: IoBuffer,
    access: Access,
    name: &'static str,
) -> Result<Exchange, IoBuffer> {
    let to_host = access.remote_write;
    let (mut posted, caller) = if data.lent_by(pool) {
        (data, None)
    } else {
        let mut lent = IoBuffer::lend(pool, data.len()).await;
        if !to_host {
            lent.copy_from_slice(&data);
        }
        (lent, Some(data))
    };
    let Some(keys) = posted.keys_in(pool) else {
        return Err(caller.unwrap_or(posted));
    };
    DataMoves::count(if caller.is_none() { &queue.moves.in_place } else { &queue.moves.copied });
    // No remote invalidation: the key is the whole arena's, not this command's.
    let sgl = match SglDescriptor::keyed(posted.address(), posted.len() as u32, keys.rkey, false) {
        Ok(sgl) => sgl,
        Err(e) => return Ok((Err(e.into()), Some(caller.unwrap_or(posted)))),
    };
    let home = posted.outstanding();
    let result = queue.submit(capsule(command, sgl), &[]).await.and_then(|c| check(name, c));
    // A response means the target is done with the buffer (RC delivers a read's data before its response).
    // Without one (a timeout, a lost queue pair) the target may still reach it through the arena's key: it
    // never goes back to the pool.
    if matches!(result, Ok(_) | Err(HostError::Nvme { .. })) {
        posted.answered(home);
    }
    let back = match caller {
        None => posted,
        Some(mut caller) => {
            if to_host && result.is_ok() {
                caller.copy_from_slice(&posted);
            }
            caller
        }
    };
    Ok((result, Some(back)))
}

/// [`exchange`] for callers that do not send data again.
async fn transact(
    pd: &ProtectionDomain,
    queue: &HostQueue,
    command: Command,
    data: DataDir,
    in_capsule_limit: usize,
    name: &'static str,
) -> Result<(Cqe, IoBuffer), HostError> {
    let (result, buf) = exchange(pd, queue.io(), command, data, in_capsule_limit, name).await;
    result.map(|c| (c, buf.unwrap_or_default()))
}

fn check(name: &'static str, cqe: Cqe) -> Result<Cqe, HostError> {
    if cqe.status().is_success() {
        Ok(cqe)
    } else {
        Err(HostError::Nvme { command: name, status: cqe.status(), result: result(&cqe) })
    }
}

fn result(cqe: &Cqe) -> u64 {
    cqe.dw0.get() as u64 | (cqe.dw1.get() as u64) << 32
}

impl Controller {
    /// Connects to `subnqn` at `target` and brings the controller up.
    pub async fn connect(target: TargetAddr, options: ConnectOptions) -> Result<Controller, HostError> {
        // Bad options are the caller's error, said before anything is opened (a zero-sized queue or keep-alive
        // period would otherwise underflow or spin).
        if options.admin_queue_size < 2 || options.queue_size < 2 {
            return Err(HostError::Invalid(format!(
                "queue sizes must be at least 2 (admin {}, I/O {})",
                options.admin_queue_size, options.queue_size
            )));
        }
        if options.keep_alive_tmo.is_some_and(|k| k < Duration::from_millis(100)) {
            return Err(HostError::Invalid("keep-alive timeout below 100 ms (use None for none)".into()));
        }
        let local = options
            .local_addr
            .or_else(|| local_for(target.udp))
            .ok_or_else(|| HostError::Invalid(format!("no route to {} (give a local address)", target.udp.ip())))?;
        let device = Arc::new(match options.provider {
            Provider::Soft => open_device(local, target.udp.port(), options.local_addr.is_none())?,
            Provider::Verbs => Device::open_verbs(VerbsConfig::new(local))?,
        });
        let pd = device.alloc_pd().await?;
        let router = EventRouter::start(device.clone());
        let loss = Arc::new(LossSignal::default());
        let admin =
            HostQueue::connect(device.clone(), &pd, &router, target, 0, options.admin_queue_size, loss.clone(), None)
                .await;
        let admin = match admin {
            Ok(q) => Arc::new(q),
            Err(e) => {
                drop(router);
                let _ = tokio::task::spawn_blocking(move || device.close()).await;
                return Err(e);
            }
        };
        let mut ctrl = Controller {
            device,
            pd,
            router,
            loss,
            admin,
            io: Vec::new(),
            lanes: Vec::new(),
            next_io: AtomicUsize::new(0),
            cntlid: 0,
            cap: Cap(0),
            identify: IdentifyController::zeroed(),
            options,
            target,
            namespaces: Mutex::new(HashMap::new()),
            keep_alive: None,
            events: Mutex::new(None),
            aer_task: None,
        };
        match ctrl.bring_up().await {
            Ok(()) => Ok(ctrl),
            Err(e) => {
                ctrl.close().await;
                Err(e)
            }
        }
    }

    async fn bring_up(&mut self) -> Result<(), HostError> {
        let kato_ms = self.options.keep_alive_tmo.map_or(0, |d| d.as_millis() as u32);
        self.cntlid = self.connect_admin(kato_ms).await?;
        self.cap = Cap(self.property_get(Property::Cap).await?);
        let _vs = self.property_get(Property::Vs).await?;
        let cc = Cc(0).set_iosqes(6).and_then(|c| c.set_iocqes(4)).and_then(|c| c.set_en(1)).expect("fields fit");
        self.property_set(Property::Cc, cc.0 as u64).await?;
        let ready_within = Duration::from_millis(500 * (self.cap.to().max(1) as u64));
        let deadline = tokio::time::Instant::now() + ready_within;
        loop {
            let csts = Csts(self.property_get(Property::Csts).await? as u32);
            if csts.cfs() != 0 {
                return Err(HostError::Invalid("controller fatal status after enabling".into()));
            }
            if csts.ready() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(HostError::Timeout("CSTS.RDY"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (_, data) = self
            .admin_data(
                AdminCommand::Identify(Identify { cns: cns::CONTROLLER, ..Default::default() }),
                4096,
                "Identify Controller",
            )
            .await?;
        self.identify = *IdentifyController::parse(&data)?;
        let discovery = self.options.subnqn == nvme_proto::nqn::DISCOVERY_NQN;
        if !discovery {
            let want = self.options.nr_io_queues.max(1) - 1;
            let set = Feature::NumberOfQueues(NumberOfQueues { nsqr: want, ncqr: want });
            let cqe = self.set_features(set).await?;
            let granted = NumberOfQueues::from_dword(result(&cqe) as u32);
            let queues = granted.nsqr.min(granted.ncqr).min(want) + 1;
            self.set_features(Feature::AsyncEventConfig(async_event_config::NAMESPACE_ATTRIBUTE)).await?;
            let depth = self.options.queue_size.min(self.cap.mqes().saturating_add(1)).max(2);
            for qid in 1..=queues {
                self.add_io_queue(qid, depth).await?;
            }
            self.start_async_events();
        }
        if let (Some(kato), true) = (self.options.keep_alive_tmo, self.options.send_keep_alive) {
            self.start_keep_alive(kato);
        }
        Ok(())
    }

    /// Connects I/O queue `qid` of `depth` entries (CM, then the Fabrics Connect naming our controller). On
    /// success it serves I/O as queue `qid`; on failure it is closed again.
    pub async fn add_io_queue(&mut self, qid: u16, depth: u16) -> Result<(), HostError> {
        if qid == 0 || depth < 2 {
            return Err(HostError::Invalid(format!("I/O queue {qid} of depth {depth}")));
        }
        let loss = self.loss.clone();
        // Each I/O queue on a lane of its own (a thread that ends when the device closes).
        let lane = LaneThread::start(&self.device, format!("nvmf-q{qid}")).await?.map(Arc::new);
        if let Some(l) = &lane {
            self.lanes.push(l.clone());
        }
        let (device, pd, router, target) = (self.device.clone(), &self.pd, &self.router, self.target);
        let mut q = HostQueue::connect(device, pd, router, target, qid, depth, loss, lane).await?;
        q.use_buffer_pool(pd, self.max_transfer()).await;
        let connect = Connect { recfmt: 0, qid, sqsize: depth - 1, cattr: 0, kato: 0 };
        let result = self.connect_on(&q, connect, self.cntlid, self.options.in_capsule_limit).await;
        match result {
            Ok(_) => {
                self.io.push(Arc::new(q));
                Ok(())
            }
            Err(e) => {
                q.close().await;
                Err(e)
            }
        }
    }

    async fn connect_on(
        &self,
        queue: &HostQueue,
        connect: Connect,
        cntlid: u16,
        limit: usize,
    ) -> Result<u16, HostError> {
        let data = ConnectData {
            hostid: self.options.hostid,
            cntlid,
            subnqn: self.options.subnqn.clone(),
            hostnqn: self.options.hostnqn.clone(),
        };
        let bytes = data.to_bytes()?.to_vec();
        let command = Command::Fabrics(FabricsCommand::Connect(connect));
        let (cqe, _) =
            transact(&self.pd, queue, command, DataDir::ToController(bytes.into()), limit, "Connect").await?;
        Ok(connect_result_cntlid(cqe.dw0.get()))
    }

    /// The admin queue's Connect: its data goes by RDMA READ (the I/O queues' in the capsule), as Linux does.
    async fn connect_admin(&self, kato: u32) -> Result<u16, HostError> {
        let connect = Connect { recfmt: 0, qid: 0, sqsize: self.options.admin_queue_size - 1, cattr: 0, kato };
        self.connect_on(&self.admin, connect, CNTLID_DYNAMIC, 0).await
    }

    pub async fn property_get(&self, property: Property) -> Result<u64, HostError> {
        let command = Command::Fabrics(FabricsCommand::PropertyGet { property });
        let (cqe, _) = transact(&self.pd, &self.admin, command, DataDir::None, 0, "Property Get").await?;
        Ok(result(&cqe))
    }

    pub async fn property_set(&self, property: Property, value: u64) -> Result<(), HostError> {
        let command = Command::Fabrics(FabricsCommand::PropertySet { property, value });
        transact(&self.pd, &self.admin, command, DataDir::None, 0, "Property Set").await.map(|_| ())
    }

    /// An admin command without data.
    pub async fn admin(&self, command: AdminCommand, name: &'static str) -> Result<Cqe, HostError> {
        transact(&self.pd, &self.admin, Command::Admin(command), DataDir::None, 0, name).await.map(|r| r.0)
    }

    /// An admin command returning `len` bytes.
    pub async fn admin_data(
        &self,
        command: AdminCommand,
        len: usize,
        name: &'static str,
    ) -> Result<(Cqe, Vec<u8>), HostError> {
        let (cqe, data) =
            transact(&self.pd, &self.admin, Command::Admin(command), DataDir::ToHost(len), 0, name).await?;
        Ok((cqe, data.into_vec()))
    }

    /// Any command with any data on queue `qid` (0 = admin): for tools and tests that need the raw exchange.
    pub async fn raw(
        &self,
        qid: u16,
        command: Command,
        data: DataDir,
        sgl: Option<SglDescriptor>,
    ) -> Result<Cqe, HostError> {
        let queue = if qid == 0 {
            &self.admin
        } else {
            self.io.get(qid as usize - 1).ok_or_else(|| HostError::Invalid(format!("no I/O queue {qid}")))?
        };
        match sgl {
            Some(sgl) => queue.submit(capsule(command, sgl), &[]).await,
            None => {
                let limit = if qid == 0 { 0 } else { self.options.in_capsule_limit };
                match transact(&self.pd, queue, command, data, limit, "command").await {
                    Ok((cqe, _)) => Ok(cqe),
                    Err(HostError::Nvme { status, result, .. }) => Ok(Cqe::new(0, qid, 0, status, result)),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Sends a hand-built SQE (its command id is assigned) with optional in-capsule data on queue `qid`: for
    /// tools and tests that need to send what the typed API would not.
    pub async fn raw_sqe(&self, qid: u16, sqe: nvme_proto::Sqe, inline: Vec<u8>) -> Result<Cqe, HostError> {
        let queue = if qid == 0 {
            &*self.admin
        } else {
            self.io.get(qid as usize - 1).ok_or_else(|| HostError::Invalid(format!("no I/O queue {qid}")))?
        };
        queue.submit(sqe, &inline).await
    }

    pub async fn set_features(&self, feature: Feature) -> Result<Cqe, HostError> {
        let set = nvme_proto::command::SetFeatures { nsid: 0, save: false, feature };
        self.admin(AdminCommand::SetFeatures(set), "Set Features").await
    }

    pub async fn identify_namespace(&self, nsid: u32) -> Result<IdentifyNamespace, HostError> {
        let id = Identify { nsid, cns: cns::NAMESPACE, ..Default::default() };
        let (_, data) = self.admin_data(AdminCommand::Identify(id), 4096, "Identify Namespace").await?;
        Ok(*IdentifyNamespace::parse(&data)?)
    }

    pub async fn active_namespaces(&self) -> Result<Vec<u32>, HostError> {
        let id = Identify { cns: cns::ACTIVE_NAMESPACE_LIST, ..Default::default() };
        let (_, data) = self.admin_data(AdminCommand::Identify(id), 4096, "Identify Active Namespace List").await?;
        Ok(NamespaceList::parse(&data)?.0)
    }

    /// Reads `len` bytes of log page `lid` from `offset`.
    pub async fn get_log_page(&self, lid: u8, offset: u64, len: usize, rae: bool) -> Result<Vec<u8>, HostError> {
        if len == 0 || len % 4 != 0 {
            return Err(HostError::Invalid(format!("log length {len} is not a positive multiple of 4")));
        }
        let get = GetLogPage { lid, numd: (len / 4 - 1) as u32, offset, rae, ..Default::default() };
        Ok(self.admin_data(AdminCommand::GetLogPage(get), len, "Get Log Page").await?.1)
    }

    /// The whole discovery log (discovery controllers): the header first, then every record, retried while
    /// the generation counter changes underneath.
    pub async fn discovery_log(&self) -> Result<DiscoveryLog, HostError> {
        for _ in 0..10 {
            let header = self.get_log_page(nvme_proto::log_page::lid::DISCOVERY, 0, 1024, false).await?;
            let first = DiscoveryLog::parse(&header)?;
            let len = 1024 + first.numrec as usize * 1024;
            if len > 1024 * 1024 {
                return Err(HostError::Invalid(format!("discovery log of {} records", first.numrec)));
            }
            let full = if first.numrec == 0 { header } else { self.get_log_page(0x70, 0, len, false).await? };
            let log = DiscoveryLog::parse(&full)?;
            if log.genctr == first.genctr {
                return Ok(log);
            }
        }
        Err(HostError::Invalid("the discovery log kept changing".into()))
    }

    /// Geometry of namespace `nsid` (cached).
    pub async fn namespace(&self, nsid: u32) -> Result<NamespaceInfo, HostError> {
        if let Some(info) = self.namespaces.lock().unwrap_or_else(|p| p.into_inner()).get(&nsid) {
            return Ok(*info);
        }
        let id = self.identify_namespace(nsid).await?;
        let block_size = id.block_size()?;
        if id.nsze.get() == 0 {
            return Err(HostError::Invalid(format!("namespace {nsid} is not active")));
        }
        let info = NamespaceInfo { nsid, blocks: id.nsze.get(), block_size };
        self.namespaces.lock().unwrap_or_else(|p| p.into_inner()).insert(nsid, info);
        Ok(info)
    }

    /// The transport's counters for this association's device (packets, queue pairs, lanes, regions).
    pub async fn transport_stats(&self) -> Result<transport::DeviceStats, HostError> {
        Ok(self.device.stats().await?)
    }

    pub fn io_queue_count(&self) -> usize {
        self.io.len()
    }

    /// The largest transfer the target takes.
    pub fn max_transfer(&self) -> usize {
        let page = 4096u64 << self.cap.mpsmin();
        self.identify.max_transfer_bytes(page).unwrap_or(1 << 20).min(1 << 24) as usize
    }

    fn in_capsule_limit(&self) -> usize {
        self.options.in_capsule_limit.min(self.identify.in_capsule_data_size() as usize)
    }

    fn pick_queue(&self, qid: Option<u16>) -> Result<&HostQueue, HostError> {
        if self.io.is_empty() {
            return Err(HostError::Invalid("no I/O queues".into()));
        }
        match qid {
            Some(q) => self
                .io
                .get((q as usize).wrapping_sub(1))
                .map(|q| &**q)
                .ok_or_else(|| HostError::Invalid(format!("no I/O queue {q}"))),
            None => Ok(&self.io[self.next_io.fetch_add(1, Ordering::Relaxed) % self.io.len()]),
        }
    }

    /// An I/O command on I/O queue `qid` (or the next one, round robin).
    pub async fn io_command(
        &self,
        qid: Option<u16>,
        command: IoCommand,
        data: DataDir,
    ) -> Result<(Cqe, IoBuffer), HostError> {
        let queue = self.pick_queue(qid)?;
        let (result, buf) = self.exchange_on(queue, command, data).await;
        result.map(|c| (c, buf.unwrap_or_default()))
    }

    /// `len` bytes for a command on the queue `lane` maps to (as in [`Controller::io_exchange`]): a buffer that
    /// queue's pool lends when it holds them — the target then reaches it in place (verbs), or it becomes the
    /// command's region without an allocation (soft); memory of its own otherwise (no lane, more than the
    /// largest transfer). A lent
    /// buffer's bytes are whatever its last use left: fill all of them for a write.
    pub async fn buffer(&self, lane: Option<usize>, len: usize) -> IoBuffer {
        let pool = match lane {
            Some(l) if !self.io.is_empty() => self.io[l % self.io.len()].io().pool(),
            _ => None,
        };
        match pool {
            Some(pool) => IoBuffer::lend(pool, len).await,
            None => IoBuffer::zeroed(len),
        }
    }

    /// How the keyed data of this association's I/O commands reached the target so far (every I/O queue).
    pub fn data_moves(&self) -> DataMoveCounts {
        let queue = |q: &HostQueue| DataMoveCounts {
            pool_buffers: q.io().pool().map_or(0, |p| p.buffers.carved() as u64),
            ..q.io().moves.snapshot()
        };
        self.io.iter().map(|q| queue(q)).fold(DataMoveCounts::default(), |a, b| a + b)
    }

    /// Whether one of this association's I/O queues lent `buf`.
    pub fn lent(&self, buf: &IoBuffer) -> bool {
        self.io.iter().any(|q| q.io().pool().is_some_and(|p| buf.lent_by(p)))
    }

    /// An I/O command on the queue `lane` maps to (round robin without one), with the caller's buffer back
    /// whatever happened when it could be recovered. A command not completed within the I/O timeout marks
    /// the association lost.
    pub async fn io_exchange(&self, lane: Option<usize>, command: IoCommand, data: DataDir) -> Exchange {
        let queue = match lane {
            Some(l) if !self.io.is_empty() => &self.io[l % self.io.len()],
            _ => match self.pick_queue(None) {
                Ok(q) => q,
                Err(e) => return (Err(e), data_back(data)),
            },
        };
        self.exchange_on(queue, command, data).await
    }

    async fn exchange_on(&self, queue: &HostQueue, command: IoCommand, data: DataDir) -> Exchange {
        let name = match command {
            IoCommand::Read(_) => "Read",
            IoCommand::Write(_) => "Write",
            IoCommand::Flush { .. } => "Flush",
            IoCommand::WriteZeroes(_) => "Write Zeroes",
            IoCommand::DatasetManagement(_) => "Dataset Management",
        };
        let limit = self.in_capsule_limit();
        let (pd, io) = (self.pd, queue.io().clone());
        let work = async move { exchange(&pd, &io, Command::Io(command), data, limit, name).await };
        let work = async {
            match queue.lane() {
                // The whole exchange on the lane's thread: registration, capsule and completion meet the queue
                // pair there; only the request and its outcome cross.
                Some(lane) => lane.spawn(work).await.unwrap_or((Err(HostError::QueueLost("lane stopped")), None)),
                None => work.await,
            }
        };
        match tokio::time::timeout(self.options.io_timeout, work).await {
            Ok(done) => done,
            Err(_) => {
                // The association is lost and its device torn down: an exchange still running on a lane ends with
                // its queue (the buffer comes back then, unused); one on the device's worker left its buffer
                // registered there until the device closes.
                self.loss.raise("I/O timeout");
                (Err(HostError::Timeout("I/O")), None)
            }
        }
    }

    fn rw(&self, nsid: u32, slba: u64, blocks: u64) -> Result<ReadWrite, HostError> {
        u32::try_from(blocks)
            .ok()
            .and_then(|b| ReadWrite::new(nsid, slba, b))
            .ok_or_else(|| HostError::Invalid(format!("{blocks} blocks is not 1..=65536")))
    }

    pub async fn read(&self, nsid: u32, slba: u64, blocks: u64) -> Result<Vec<u8>, HostError> {
        let info = self.namespace(nsid).await?;
        let rw = self.rw(nsid, slba, blocks)?;
        let len = blocks as usize * info.block_size as usize;
        Ok(self.io_command(None, IoCommand::Read(rw), DataDir::ToHost(len)).await?.1.into_vec())
    }

    /// Writes `data` (a whole number of blocks) at `slba`.
    pub async fn write(&self, nsid: u32, slba: u64, data: Vec<u8>) -> Result<(), HostError> {
        let info = self.namespace(nsid).await?;
        if data.is_empty() || data.len() % info.block_size as usize != 0 {
            return Err(HostError::Invalid(format!(
                "{} bytes is not a whole number of {}-byte blocks",
                data.len(),
                info.block_size
            )));
        }
        let rw = self.rw(nsid, slba, (data.len() / info.block_size as usize) as u64)?;
        self.io_command(None, IoCommand::Write(rw), DataDir::ToController(data.into())).await.map(|_| ())
    }

    pub async fn flush(&self, nsid: u32) -> Result<(), HostError> {
        self.io_command(None, IoCommand::Flush { nsid }, DataDir::None).await.map(|_| ())
    }

    pub async fn write_zeroes(&self, nsid: u32, slba: u64, blocks: u64) -> Result<(), HostError> {
        let rw = self.rw(nsid, slba, blocks)?;
        self.io_command(None, IoCommand::WriteZeroes(rw), DataDir::None).await.map(|_| ())
    }

    pub async fn deallocate(&self, nsid: u32, ranges: &[DsmRange]) -> Result<(), HostError> {
        if ranges.is_empty() || ranges.len() > nvme_proto::io::DSM_MAX_RANGES {
            return Err(HostError::Invalid(format!("{} ranges is not 1..=256", ranges.len())));
        }
        let dsm = DatasetManagement { nsid, nr: (ranges.len() - 1) as u8, attributes: dsm_attribute::AD };
        let data = DsmRange::list_to_bytes(ranges);
        self.io_command(None, IoCommand::DatasetManagement(dsm), DataDir::ToController(data.into())).await.map(|_| ())
    }

    /// Keep Alive every KATO/2; one that fails or is not answered within KATO marks the association lost
    /// (the target has, or will have, dropped it).
    fn start_keep_alive(&mut self, kato: Duration) {
        let admin = self.admin_handle();
        let loss = self.loss.clone();
        self.keep_alive = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(kato / 2);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some((pd, queue)) = admin.upgrade() else { break };
                let command = Command::Admin(AdminCommand::KeepAlive);
                let sent = transact(&pd, &queue, command, DataDir::None, 0, "Keep Alive");
                match tokio::time::timeout(kato, sent).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!("keep alive: {e}");
                        loss.raise("keep-alive failed");
                        break;
                    }
                    Err(_) => {
                        tracing::warn!("keep alive: no answer within {kato:?}");
                        loss.raise("keep-alive timeout");
                        break;
                    }
                }
            }
        }));
    }

    /// Why the association was lost, if it was.
    pub fn loss_reason(&self) -> Option<&'static str> {
        self.loss.reason()
    }

    /// Waits until the association is lost (a queue ended, keep-alive failed, an I/O timed out); returns why.
    pub async fn lost(&self) -> &'static str {
        self.loss.lost().await
    }

    /// Marks the association lost (its owner tears it down).
    pub fn fail(&self, reason: &'static str) {
        self.loss.raise(reason);
    }

    /// Stops every queue now (idempotent): outstanding commands fail with `QueueLost` and hand their buffers
    /// back while the device is still open. [`Controller::close`] finishes the teardown.
    pub async fn abort(&self, reason: &'static str) {
        self.loss.raise(reason);
        for q in &self.io {
            q.close().await;
        }
        self.admin.close().await;
    }

    /// Asynchronous events as they arrive (their completion DW0); keeps one AER outstanding.
    fn start_async_events(&mut self) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.events.lock().unwrap_or_else(|p| p.into_inner()) = Some(rx);
        let admin = self.admin_handle();
        self.aer_task = Some(tokio::spawn(async move {
            loop {
                let Some((pd, queue)) = admin.upgrade() else { break };
                let command = Command::Admin(AdminCommand::AsyncEventRequest);
                match transact(&pd, &queue, command, DataDir::None, 0, "Asynchronous Event Request").await {
                    Ok((cqe, _)) => {
                        if tx.send(cqe.dw0.get()).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        }));
    }

    /// The receiver of asynchronous events (DW0 of each AER completion); once.
    pub fn async_events(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<u32>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn admin_handle(&self) -> AdminHandle {
        AdminHandle { pd: self.pd, queue: Arc::downgrade(&self.admin) }
    }

    /// Normal shutdown: CC.SHN, wait for CSTS.SHST complete, then disconnect every queue.
    pub async fn shutdown(self) -> Result<(), HostError> {
        let result = async {
            let cc = Cc(self.property_get(Property::Cc).await? as u32);
            self.property_set(Property::Cc, cc.set_shn(1).expect("fits").0 as u64).await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let csts = Csts(self.property_get(Property::Csts).await? as u32);
                if csts.shst() == 2 {
                    return Ok(());
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(HostError::Timeout("shutdown"));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        .await;
        self.close().await;
        result
    }

    /// Disconnects every queue without the shutdown handshake.
    pub async fn close(mut self) {
        if let Some(t) = self.keep_alive.take() {
            t.abort();
        }
        if let Some(t) = self.aer_task.take() {
            t.abort();
        }
        for q in &self.io {
            q.close().await;
        }
        self.admin.close().await;
        let device = self.device.clone();
        let lanes = std::mem::take(&mut self.lanes);
        drop(self);
        // Close the device now (its event router may still hold a handle for a moment), then wait for its
        // lanes' threads; joining blocks, so off the runtime.
        let _ = tokio::task::spawn_blocking(move || {
            device.close();
            for lane in lanes {
                lane.join();
            }
        })
        .await;
    }

    pub fn options(&self) -> &ConnectOptions {
        &self.options
    }
}

/// The data of a command that was never sent, back to its caller.
fn data_back(data: DataDir) -> Option<IoBuffer> {
    match data {
        DataDir::ToController(buf) => Some(buf),
        DataDir::None | DataDir::ToHost(_) => Some(IoBuffer::default()),
    }
}

/// What the keep-alive and AER tasks hold: weak, so they end with the controller.
struct AdminHandle {
    pd: ProtectionDomain,
    queue: std::sync::Weak<HostQueue>,
}

impl AdminHandle {
    fn upgrade(&self) -> Option<(ProtectionDomain, Arc<HostQueue>)> {
        Some((self.pd, self.queue.upgrade()?))
    }
}

/// Discovery: connects to the discovery controller at `target`, reads the whole log, disconnects.
pub async fn discover(target: TargetAddr, mut options: ConnectOptions) -> Result<DiscoveryLog, HostError> {
    options.subnqn = nvme_proto::nqn::DISCOVERY_NQN.to_string();
    let ctrl = Controller::connect(target, options).await?;
    let log = ctrl.discovery_log().await;
    ctrl.close().await;
    log
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_options_are_refused_before_connecting() {
        // Nothing listens here: an option error must come first.
        let target = TargetAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 4420);
        for change in [
            |o: &mut ConnectOptions| o.admin_queue_size = 0,
            |o: &mut ConnectOptions| o.queue_size = 1,
            |o: &mut ConnectOptions| o.keep_alive_tmo = Some(Duration::ZERO),
        ] {
            let mut o = ConnectOptions::new("nqn.2026-11.dev.nvmf-rs:x");
            change(&mut o);
            let e = Controller::connect(target, o).await.unwrap_err();
            assert!(matches!(e, HostError::Invalid(_)), "{e}");
        }
    }
}
