//! A listener: one device on one address, listening on one or more rdma_cm ports (trsvcid). It is the only
//! reader of the device's events: it validates connection requests (NVMe/RDMA CM private data), builds and
//! accepts queue pairs and hands each to a poll group, and routes connection and device events to the owning
//! group by queue key — never touching a queue itself.
//!
//! States: `Listening` → `Repairing` (link down, address gone, device removed or failed: every queue of the
//! device is closed) → `Listening` again once the link or address is back or the device could be reopened,
//! checked every repair interval (Linux nvmet retries its port every 5 s; we default to 1 s).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nvme_proto::rdma_cm::{CmAccept, CmReject, CmRejectStatus, CmRequest, RECORD_FORMAT_1_0};
use tokio::sync::{mpsc, oneshot};
use transport::{
    Access, Buffer, CompletionQueue, ConnId, ConnectionOptions, Device, DeviceEvent, PeerParams, ProtectionDomain,
    Provider, RecvWr, SharedReceiveQueue,
};

use super::group::{GroupMsg, Groups};
use super::queue::{QueueSetup, RECV_TAG};
use crate::controller::QueueRef;
use crate::core::{Target, TargetLimits};

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    pub addr: IpAddr,
    /// rdma_cm ports (NVMe trsvcid), 4420 by default.
    pub trsvcids: Vec<u16>,
    /// The soft provider's UDP port: 4791 (RoCEv2) unless several devices share an address (tests).
    pub udp_port: u16,
    /// The RDMA provider the listener's device is opened with.
    pub provider: Provider,
}

pub(crate) enum ListenerMsg {
    /// A queue is gone: drop its routes.
    Forget { conn: ConnId, qpn: u32 },
    /// Stop accepting and reply.
    Shutdown(oneshot::Sender<()>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerState {
    Listening,
    /// Link down: waiting for it to come back.
    RepairingLinkDown,
    /// Our address was removed: waiting for it to come back.
    RepairingAddressGone,
    /// The device was removed or failed: reopening it every repair interval.
    RepairingDeviceGone,
}

/// Queues name the device they run on by this id, so that closing "every queue of a device" reaches exactly
/// that device's: unique across every listener of the process, never reused (a listener's first device and
/// another listener's must differ — they once did not, and one link's flap closed the other link's queues).
fn new_device_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// What the stats show of a listener.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ListenerStatus {
    pub addr: IpAddr,
    pub udp_port: u16,
    pub trsvcids: Vec<u16>,
    pub state: ListenerState,
    /// Times the listener left `Listening`.
    pub repairs: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// What the listener's device says of itself (filled in by the stats snapshot; `None` without a device):
    /// the path MTU new connections get, and its node GUID as rxe's sysfs writes it (`5054:00ff:feaa:0000`).
    pub active_mtu: Option<usize>,
    pub node_guid: Option<String>,
    /// Lanes of the device the poll groups run, and the datagrams that reached them directly.
    pub lanes: Option<usize>,
    pub lane_packets_received: Option<u64>,
    /// Shared receive queues of the device: one per poll group's lane, its queue pairs' capsules.
    pub shared_receive_queues: Option<usize>,
    /// Buffers the lanes sent by UDP GSO (a read's data and response in one pass through the kernel) and
    /// took coalesced by UDP GRO.
    pub lane_gso_sends: Option<u64>,
    pub lane_gro_receives: Option<u64>,
    #[serde(skip)]
    pub device: Option<Arc<Device>>,
}

pub(crate) struct Listener {
    spec: ListenSpec,
    target: Arc<Target>,
    groups: Groups,
    next_group: usize,
    next_key: Arc<AtomicU64>,
    device: Option<Arc<Device>>,
    device_id: u64,
    pd: Option<ProtectionDomain>,
    /// Per poll group, the lane of the current device it runs.
    lanes: Vec<Option<GroupLane>>,
    state: ListenerState,
    routes_by_conn: HashMap<ConnId, QueueRef>,
    routes_by_qpn: HashMap<u32, QueueRef>,
    status: Arc<Mutex<ListenerStatus>>,
    own: mpsc::UnboundedSender<ListenerMsg>,
    repair_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("listener {addr}: {source}")]
    Device { addr: IpAddr, source: transport::DeviceError },
}

/// A device as the listener holds it: the device, its protection domain, and for each poll group the lane
/// of the device that group runs (soft provider; `None`: that group's queue pairs stay on the device's own
/// thread).
struct OpenDevice {
    device: Arc<Device>,
    pd: ProtectionDomain,
    lanes: Vec<Option<GroupLane>>,
}

/// A poll group's lane of the listener's device, and the shared receive queue its queue pairs take their
/// capsules from (SPDK's default: one per poll group, so receive memory does not grow with queue pairs × depth).
#[derive(Debug, Clone)]
struct GroupLane {
    id: usize,
    srq: Option<SharedReceiveQueue>,
}

/// A lane's shared receive queue with `depth` receives of `size` bytes posted; `None` (each queue pair posts
/// its own) if the device will not make one.
async fn group_srq(
    device: &Device,
    lane: usize,
    pd: &ProtectionDomain,
    depth: u32,
    size: usize,
) -> Option<SharedReceiveQueue> {
    let srq = match device.create_srq_on_lane(lane, pd).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(lane, "no shared receive queue: {e}");
            return None;
        }
    };
    // One arena for all of them, registered once with the lane: the device takes capsules into them in place.
    let (buffers, pinned) = Buffer::carve(depth as usize, size);
    match device.pin_on_lane(lane, pd, pinned, Access::LOCAL_WRITE).await {
        Ok(_) | Err(transport::DeviceError::Unsupported(_)) => {}
        Err(e) => tracing::warn!(lane, "pinning the receive buffers: {e} (they are staged)"),
    }
    for (slot, buf) in (0..u64::from(depth)).zip(buffers) {
        srq.post_recv(RecvWr::new(RECV_TAG | slot, buf)).ok()?;
    }
    Some(srq)
}

/// Opens the device, listens on every port, and gives every poll group a lane of it to run, so that each
/// queue's datagrams, RC engine and NVMe work share the group's thread.
async fn open_device(
    spec: &ListenSpec,
    groups: &Groups,
    limits: &TargetLimits,
) -> Result<OpenDevice, transport::DeviceError> {
    let device = Arc::new(Device::open_provider(spec.provider, spec.addr, spec.udp_port)?);
    let pd = device.alloc_pd().await?;
    for &port in &spec.trsvcids {
        device.listen(port, 128).await?;
    }
    let mut lanes = Vec::with_capacity(groups.senders.len());
    for group in 0..groups.senders.len() {
        lanes.push(match device.open_lane().await {
            Ok(lane) => {
                let id = lane.id();
                let pin = transport::PoolLane {
                    device: Arc::downgrade(&device),
                    pd: pd.id,
                    lane: id,
                    access: Access::LOCAL_WRITE,
                };
                match groups.send(group, GroupMsg::RunLane { lane: Box::new(lane), pin }) {
                    Ok(()) => {
                        let srq = group_srq(&device, id, &pd, limits.srq_depth, limits.capsule_bytes()).await;
                        Some(GroupLane { id, srq })
                    }
                    Err(_) => None,
                }
            }
            Err(e) => {
                tracing::debug!(addr = %spec.addr, group, "no lane: {e}");
                None
            }
        });
    }
    Ok(OpenDevice { device, pd, lanes })
}

impl Listener {
    /// Opens the listener's device; errors (address not there, port taken) are the caller's to report.
    pub async fn open(
        spec: ListenSpec,
        target: Arc<Target>,
        groups: Groups,
        next_key: Arc<AtomicU64>,
        repair_interval: Duration,
    ) -> Result<(Listener, mpsc::UnboundedReceiver<ListenerMsg>, Arc<Mutex<ListenerStatus>>), ListenError> {
        let OpenDevice { device, pd, lanes } = open_device(&spec, &groups, &target.limits)
            .await
            .map_err(|source| ListenError::Device { addr: spec.addr, source })?;
        let udp_port = device.local_addr().port();
        let spec = ListenSpec { udp_port, ..spec };
        let status = Arc::new(Mutex::new(ListenerStatus {
            addr: spec.addr,
            udp_port,
            trsvcids: spec.trsvcids.clone(),
            state: ListenerState::Listening,
            repairs: 0,
            accepted: 0,
            rejected: 0,
            active_mtu: None,
            node_guid: None,
            lanes: None,
            lane_packets_received: None,
            shared_receive_queues: None,
            lane_gso_sends: None,
            lane_gro_receives: None,
            device: Some(device.clone()),
        }));
        let (own, rx) = mpsc::unbounded_channel();
        let listener = Listener {
            spec,
            target,
            groups,
            next_group: 0,
            next_key,
            device: Some(device),
            device_id: new_device_id(),
            pd: Some(pd),
            lanes,
            state: ListenerState::Listening,
            routes_by_conn: HashMap::new(),
            routes_by_qpn: HashMap::new(),
            status: status.clone(),
            own,
            repair_interval,
        };
        Ok((listener, rx, status))
    }

    pub fn sender(&self) -> mpsc::UnboundedSender<ListenerMsg> {
        self.own.clone()
    }

    fn status(&self) -> std::sync::MutexGuard<'_, ListenerStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(&mut self, state: ListenerState) {
        if state != ListenerState::Listening && self.state == ListenerState::Listening {
            self.status().repairs += 1;
        }
        if state != self.state {
            tracing::info!(addr = %self.spec.addr, from = ?self.state, to = ?state, "listener state");
        }
        self.state = state;
        let device = self.device.clone();
        let mut s = self.status();
        s.state = state;
        s.device = device;
    }

    pub async fn run(mut self, mut messages: mpsc::UnboundedReceiver<ListenerMsg>) {
        let mut repair = tokio::time::interval(self.repair_interval);
        repair.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let device = self.device.clone();
            let repairing = self.state != ListenerState::Listening;
            tokio::select! {
                event = async {
                    match &device {
                        Some(d) => d.next_event().await,
                        None => std::future::pending().await,
                    }
                } => match event {
                    Some(event) => self.on_event(event).await,
                    None => self.lose_device("device closed"),
                },
                msg = messages.recv() => match msg {
                    Some(ListenerMsg::Forget { conn, qpn }) => {
                        self.routes_by_conn.remove(&conn);
                        self.routes_by_qpn.remove(&qpn);
                    }
                    Some(ListenerMsg::Shutdown(reply)) => {
                        let _ = reply.send(());
                        break;
                    }
                    None => break,
                },
                _ = repair.tick(), if repairing => self.try_repair().await,
            }
        }
        tracing::info!(addr = %self.spec.addr, "listener stopped");
    }

    async fn on_event(&mut self, event: DeviceEvent) {
        match event {
            DeviceEvent::ConnectRequest { conn, local_port, peer } => {
                self.on_connect_request(conn, local_port, peer).await
            }
            DeviceEvent::Established { conn, qpn, .. } => tracing::debug!(conn, qpn, "established"),
            DeviceEvent::Disconnected { conn } => self.close_conn(conn, "host disconnected"),
            DeviceEvent::Rejected { conn, .. } | DeviceEvent::Unreachable { conn } => {
                self.close_conn(conn, "connection not completed")
            }
            DeviceEvent::TimewaitExit { conn } => {
                self.routes_by_conn.remove(&conn);
            }
            DeviceEvent::QpFatal { qpn, cause } => {
                if let Some(q) = self.routes_by_qpn.get(&qpn) {
                    tracing::warn!(qpn, ?cause, "queue pair fatal");
                    let _ = self.groups.send(q.group, GroupMsg::Close { key: q.key, reason: "queue pair fatal" });
                }
            }
            DeviceEvent::PortError => {
                self.close_all("link down");
                self.set_state(ListenerState::RepairingLinkDown);
            }
            DeviceEvent::PortActive => {
                if self.state == ListenerState::RepairingLinkDown {
                    self.set_state(ListenerState::Listening);
                }
            }
            DeviceEvent::AddrChange { present: false } => {
                self.close_all("address removed");
                if self.state == ListenerState::Listening || self.state == ListenerState::RepairingLinkDown {
                    self.set_state(ListenerState::RepairingAddressGone);
                }
            }
            DeviceEvent::AddrChange { present: true } => {
                if self.state == ListenerState::RepairingAddressGone {
                    self.set_state(ListenerState::Listening);
                }
            }
            DeviceEvent::DeviceRemoval => self.lose_device("device removed"),
            DeviceEvent::DeviceFatal { reason } => {
                tracing::error!(addr = %self.spec.addr, "device fatal: {reason}");
                self.lose_device("device failed");
            }
        }
    }

    fn close_conn(&mut self, conn: ConnId, reason: &'static str) {
        if let Some(q) = self.routes_by_conn.get(&conn) {
            let _ = self.groups.send(q.group, GroupMsg::Close { key: q.key, reason });
        }
    }

    /// Closes every queue on the current device.
    fn close_all(&mut self, reason: &'static str) {
        tracing::warn!(addr = %self.spec.addr, queues = self.routes_by_conn.len(), "closing every queue: {reason}");
        for group in 0..self.groups.senders.len() {
            let _ = self.groups.send(group, GroupMsg::CloseDevice { device: self.device_id, reason });
        }
    }

    fn lose_device(&mut self, reason: &'static str) {
        self.close_all(reason);
        // Queues hold the device until they drained; it closes when the last lets go.
        self.device = None;
        self.pd = None;
        self.set_state(ListenerState::RepairingDeviceGone);
    }

    async fn try_repair(&mut self) {
        match self.state {
            ListenerState::Listening => {}
            ListenerState::RepairingLinkDown => {
                if let Some(d) = &self.device
                    && d.stats().await.is_ok_and(|s| s.port_up)
                {
                    self.set_state(ListenerState::Listening);
                }
            }
            // The device's socket stays bound; the address coming back is an event.
            ListenerState::RepairingAddressGone => {}
            ListenerState::RepairingDeviceGone => {
                match open_device(&self.spec, &self.groups, &self.target.limits).await {
                    Ok(OpenDevice { device, pd, lanes }) => {
                        self.device = Some(device);
                        self.pd = Some(pd);
                        self.lanes = lanes;
                        self.device_id = new_device_id();
                        self.set_state(ListenerState::Listening);
                    }
                    Err(e) => tracing::debug!(addr = %self.spec.addr, "reopening the device: {e}"),
                }
            }
        }
    }

    async fn reject(&mut self, conn: ConnId, status: CmRejectStatus) {
        tracing::warn!(conn, ?status, "connection rejected");
        self.status().rejected += 1;
        if let Some(d) = &self.device {
            let _ = d.reject(conn, &CmReject::new(status).to_bytes()).await;
        }
    }

    async fn on_connect_request(&mut self, conn: ConnId, local_port: u16, peer: PeerParams) {
        let (Some(device), Some(pd)) = (self.device.clone(), self.pd) else { return };
        if self.state != ListenerState::Listening {
            return self.reject(conn, CmRejectStatus::NoResources).await;
        }
        let request = match CmRequest::parse(&peer.private_data) {
            Ok(r) => r,
            Err(e) => return self.reject(conn, e.status).await,
        };
        let limits = self.target.limits;
        let max_depth = if request.qid == 0 { limits.max_admin_depth } else { limits.max_queue_depth };
        if request.qid > limits.max_io_queues {
            return self.reject(conn, CmRejectStatus::InvalidQueueId).await;
        }
        if request.hsqsize == 0 || request.hsqsize >= max_depth {
            return self.reject(conn, CmRejectStatus::InvalidHostSqSize).await;
        }
        if request.hrqsize == 0 || request.hrqsize > max_depth {
            return self.reject(conn, CmRejectStatus::InvalidHostRqSize).await;
        }
        let depth = max_depth.min(request.hrqsize).min(request.hsqsize + 1);
        let group = self.next_group % self.groups.senders.len();
        self.next_group += 1;
        let cq = CompletionQueue::new();
        let lane = self.lanes.get(group).cloned().flatten();
        let srq = lane.as_ref().and_then(|l| l.srq.clone());
        let created = match (&lane, &srq) {
            (Some(l), Some(srq)) => device.create_qp_on_lane_with_srq(l.id, &pd, &cq, &cq, srq).await,
            (Some(l), None) => device.create_qp_on_lane(l.id, &pd, &cq, &cq).await,
            (None, _) => device.create_qp(&pd, &cq, &cq).await,
        };
        let qp = match created {
            Ok(qp) => qp,
            Err(e) => {
                tracing::error!("create queue pair: {e}");
                return self.reject(conn, CmRejectStatus::NoResources).await;
            }
        };
        if srq.is_none() {
            for slot in 0..depth as u64 {
                let _ = qp.post_recv(RecvWr::new(RECV_TAG | slot, vec![0; limits.capsule_bytes()]));
            }
        }
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let setup = QueueSetup {
            key,
            device: device.clone(),
            device_id: self.device_id,
            qp,
            cq,
            conn,
            qid: request.qid,
            depth,
            srq,
            listener: self.own.clone(),
        };
        let options = ConnectionOptions {
            responder_resources: peer.initiator_depth.clamp(1, 16),
            initiator_depth: peer.responder_resources.clamp(1, 16),
            ..ConnectionOptions::default()
        };
        let accept = CmAccept { recfmt: RECORD_FORMAT_1_0, crqsize: depth };
        if let Err(e) = device.accept(conn, &setup.qp, options, &accept.to_bytes()).await {
            tracing::warn!(conn, "accept: {e}");
            // Never reached a group: torn down here, by the same code a queue uses.
            setup.release(false).await;
            return;
        }
        let route = QueueRef { group, key };
        self.routes_by_conn.insert(conn, route);
        self.routes_by_qpn.insert(setup.qp.qpn, route);
        tracing::info!(conn, qid = request.qid, depth, group, port = local_port, peer = %peer.addr, "queue accepted");
        self.status().accepted += 1;
        if let Err(GroupMsg::Adopt(setup)) = self.groups.send(group, GroupMsg::Adopt(Box::new(setup))) {
            // The group is gone (shutting down): the queue never joined one, so it is torn down here.
            tracing::warn!(conn, "no poll group to take the queue");
            setup.release(true).await;
        }
    }
}
