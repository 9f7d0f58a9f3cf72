//! A lane: part of a soft device's data path that runs on the thread of whoever runs it — a poll group — so
//! that a queue pair's datagrams, its RC engine and the application's work on it share one thread and an I/O
//! crosses no thread between a datagram arriving and the answer leaving. The lane owns its queue pairs (a
//! [`DataPath`]) and its own socket in the device's reuseport group, to which the kernel steers the datagrams
//! of those queue pairs (`steering`). The device's worker keeps the connection manager: it numbers the lane's
//! queue pairs, and tells the lane by message what the CM decided (bind, start, lost, failed) and what befell
//! the device (removal, MTU). Posting goes to the lane over the same channel, so a queue pair is created before
//! anything is posted on it and started before a send that followed its Established event.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::cm::{ConnId, PeerParams};
use super::data_path::{DataPath, DataPathConfig};
use super::udp::{RecvBatch, SendBatch, enable_gro, open_packet, recv_batch, socket_error_is_transient, transmit};
use super::wire::icrc::IdentificationSolver;
use crate::device::{Command, CompletionQueue, ConnectionOptions, DeviceEvent};

/// What the device's worker tells a lane.
pub(crate) enum LaneCommand {
    Create {
        qpn: u32,
        pd: u32,
        send_cq: CompletionQueue,
        recv_cq: CompletionQueue,
        /// The lane's shared receive queue its receives come from, if any.
        srq: Option<u32>,
        start_psn: u32,
    },
    CreateSrq {
        id: u32,
        pd: u32,
    },
    Bind {
        qpn: u32,
        conn: ConnId,
        peer: SocketAddr,
    },
    Start {
        qpn: u32,
        peer: PeerParams,
        options: ConnectionOptions,
    },
    ConnectionLost(u32),
    ConnectionFailed(u32),
    /// The device failed or was removed: every queue pair to the error state.
    FailAll,
    /// The path MTU new connections and hand transitions get.
    Mtu(usize),
}

/// Packet counts of a lane, read by the device's stats.
#[derive(Debug, Default)]
pub(crate) struct LaneCounters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub dropped: AtomicU64,
    /// GSO buffers sent and GRO buffers taken.
    pub gso_sends: AtomicU64,
    pub gro_receives: AtomicU64,
    /// Receives waiting on the lane's shared receive queues (as of the lane's last turn).
    pub srq_receives: AtomicU64,
    /// Regions registered on the lane and their bytes.
    pub regions: AtomicU64,
    pub region_bytes: AtomicU64,
}

/// A lane, before it runs: hand it to the thread that is to own its queue pairs and run it there
/// ([`Lane::run`]); create queue pairs on it with `Device::create_qp_on_lane`.
pub struct Lane {
    id: usize,
    local: SocketAddr,
    socket: std::net::UdpSocket,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<DeviceEvent>,
    config: DataPathConfig,
    mtu: usize,
    counters: Arc<LaneCounters>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane").field("id", &self.id).field("local", &self.local).finish_non_exhaustive()
    }
}

impl Lane {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: usize,
        local: SocketAddr,
        socket: std::net::UdpSocket,
        commands: mpsc::UnboundedReceiver<Command>,
        events: mpsc::UnboundedSender<DeviceEvent>,
        config: DataPathConfig,
        mtu: usize,
        counters: Arc<LaneCounters>,
    ) -> Lane {
        Lane { id, local, socket, commands, events, config, mtu, counters }
    }

    /// Which lane of its device this is.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Serves the lane's queue pairs until the device closes. Run it on the thread that uses them (a tokio
    /// runtime with I/O and time enabled).
    pub async fn run(self) {
        let Lane { id, local, socket, mut commands, events, config, mut mtu, counters } = self;
        let socket = match tokio::net::UdpSocket::from_std(socket) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(%local, lane = id, "lane socket: {e}");
                return;
            }
        };
        let mut data = DataPath::new(config);
        let mut solver = IdentificationSolver::new();
        // Coalesced receives on loopback, where the only coalesced buffers are our peers' GSO sends (one queue
        // pair each, steered whole to the lane that owns it): a long transfer's packets come up in one buffer.
        // Not on a NIC: its GRO merges by UDP flow, and lanes send every queue pair from the device's port, so a
        // buffer could carry another lane's datagrams (per-queue-pair source ports, as rxe's, come first).
        let gro = local.ip().is_loopback() && enable_gro(&socket);
        let mut received = if gro { RecvBatch::with_gro() } else { RecvBatch::new() };
        let mut batch = SendBatch::new();
        let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
        let sleep = tokio::time::sleep_until(far());
        tokio::pin!(sleep);
        // The socket failed beyond recovery: its queue pairs are failed, it is read no more.
        let mut broken = false;
        loop {
            let deadline = data.poll_timeout().map(tokio::time::Instant::from_std).unwrap_or_else(far);
            if deadline != sleep.deadline() {
                sleep.as_mut().reset(deadline);
            }
            tokio::select! {
                taken = recv_batch(&socket, &mut received), if !broken => match taken {
                    Ok(_) => {
                        let now = Instant::now();
                        counters.gro_receives.fetch_add(received.coalesced() as u64, Ordering::Relaxed);
                        let (mut taken, mut dropped) = (0u64, 0u64);
                        for (r, bytes) in received.datagrams() {
                            let handled = match (r.truncated, r.from) {
                                (false, Some(from)) => open_packet(bytes, from, local.ip(), &mut solver)
                                    .is_some_and(|packet| data.handle_packet(now, from.ip(), bytes, &packet)),
                                _ => false,
                            };
                            taken += 1;
                            dropped += u64::from(!handled);
                        }
                        counters.received.fetch_add(taken, Ordering::Relaxed);
                        counters.dropped.fetch_add(dropped, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if socket_error_is_transient(e.kind()) => tracing::debug!(%local, lane = id, "recv: {e}"),
                    Err(e) => {
                        tracing::error!(%local, lane = id, "lane socket failed: {e}");
                        data.fail_all();
                        broken = true;
                        let _ = events.send(DeviceEvent::DeviceFatal { reason: format!("lane {id}: {e}") });
                    }
                },
                command = commands.recv() => {
                    let mut next = command;
                    let mut handled = 0;
                    // What is queued already (a burst of posts) goes out in one flush.
                    while let Some(c) = next.take() {
                        match c {
                            Command::Shutdown => {
                                for qpn in data.qpns() {
                                    data.destroy_qp(qpn);
                                }
                                return;
                            }
                            c => on_command(&mut data, &mut mtu, &counters, c),
                        }
                        handled += 1;
                        if handled < super::udp::BATCH {
                            next = commands.try_recv().ok();
                        }
                    }
                    if handled == 0 {
                        // Every sender is gone: the device is closed.
                        for qpn in data.qpns() {
                            data.destroy_qp(qpn);
                        }
                        return;
                    }
                }
                () = &mut sleep => data.handle_timeout(Instant::now()),
            }
            let (mut out, mut fatal) = (Vec::new(), Vec::new());
            data.poll_output(Instant::now(), &mut out, &mut fatal);
            counters.srq_receives.store(data.srq_receives() as u64, Ordering::Relaxed);
            for (qpn, cause) in fatal {
                let _ = events.send(DeviceEvent::QpFatal { qpn, cause });
            }
            if out.is_empty() {
                continue;
            }
            // A lane sends from its socket in the group: the device's port.
            let done = transmit(&socket, &mut batch, local, out).await;
            counters.sent.fetch_add(done.sent, Ordering::Relaxed);
            counters.dropped.fetch_add(done.dropped, Ordering::Relaxed);
            counters.gso_sends.fetch_add(done.gso_buffers, Ordering::Relaxed);
        }
    }
}

fn count_regions(data: &DataPath, counters: &LaneCounters) {
    let (regions, bytes) = data.regions();
    counters.regions.store(regions as u64, Ordering::Relaxed);
    counters.region_bytes.store(bytes as u64, Ordering::Relaxed);
}

fn on_command(data: &mut DataPath, mtu: &mut usize, counters: &LaneCounters, command: Command) {
    match command {
        Command::Register(pd, buf, access, reply) => {
            let result = data.register(pd, buf, access).map(|keys| crate::device::MemoryRegion { keys });
            // Counted before the caller hears of it: its next stats include the region.
            count_regions(data, counters);
            let _ = reply.send(result);
        }
        Command::Deregister(key, reply) => {
            let result = data.deregister(key);
            count_regions(data, counters);
            let _ = reply.send(result);
        }
        Command::PostSend(qpn, wr) => data.post_send(qpn, wr),
        Command::PostRecv(qpn, wr) => data.post_recv(qpn, wr),
        Command::PostSrqRecv(id, wr) => data.post_srq_recv(id, wr),
        Command::DestroySrq(id, reply) => {
            let _ = reply.send(data.destroy_srq(id));
        }
        Command::ModifyQp(qpn, transition, reply) => {
            let _ = reply.send(data.modify_qp(qpn, transition, *mtu));
        }
        Command::DestroyQp(qpn, reply) => {
            data.destroy_qp(qpn);
            let _ = reply.send(Ok(()));
        }
        Command::Lane(c) => match c {
            LaneCommand::Create { qpn, pd, send_cq, recv_cq, srq, start_psn } => {
                // A shared receive queue destroyed after the worker checked it: the queue pair is born in the
                // error state (nothing it is posted completes but as a flush), never waiting on receives.
                let gone = srq.is_some_and(|id| !data.srq_in(id, pd));
                data.create_qp(qpn, pd, send_cq, recv_cq, srq.filter(|_| !gone), start_psn);
                if gone {
                    let _ = data.modify_qp(qpn, crate::device::QpTransition::Error, *mtu);
                }
            }
            LaneCommand::CreateSrq { id, pd } => data.create_srq(id, pd),
            LaneCommand::Bind { qpn, conn, peer } => data.bind_connection(qpn, conn, peer),
            LaneCommand::Start { qpn, peer, options } => data.start_engine(Instant::now(), qpn, &peer, options, *mtu),
            LaneCommand::ConnectionLost(qpn) => data.connection_lost(qpn),
            LaneCommand::ConnectionFailed(qpn) => data.connection_failed(qpn),
            LaneCommand::FailAll => data.fail_all(),
            LaneCommand::Mtu(m) => *mtu = m,
        },
        _ => tracing::debug!("a lane takes only its queue pairs' commands"),
    }
}
