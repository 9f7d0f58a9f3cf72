//! The RDMA binding (Linux `drivers/nvme/target/rdma.c`): listeners, poll groups, queues, and the stats
//! snapshot. Threads: one per poll group, one acceptor thread running every listener, plus each device's own
//! worker.

mod group;
mod listener;
mod pool;
mod queue;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

pub use group::GroupStats;
use group::{GroupMsg, Groups};
pub use listener::{ListenError, ListenSpec, ListenerState, ListenerStatus};
use listener::{Listener, ListenerMsg};

use crate::core::{ControllerStats, PortInfo, Target, TargetLimits};

/// How the binding runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaOptions {
    /// Poll group threads (default: the number of cores).
    pub poll_groups: usize,
    /// Data buffers of `max_io_size` per poll group.
    pub pool_buffers: usize,
    /// How often a listener in repair retries.
    pub repair_interval: Duration,
}

impl Default for RdmaOptions {
    fn default() -> Self {
        RdmaOptions {
            poll_groups: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pool_buffers: 256,
            repair_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Listen(#[from] ListenError),
    #[error("the acceptor thread stopped")]
    Acceptor,
}

/// What the target holds, for leak checks and monitoring.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    /// Live controllers (I/O and discovery).
    pub controllers: usize,
    /// Queue pairs the devices hold.
    pub qpairs: usize,
    /// Queues served by poll groups (each polls its own completion queue).
    pub pollers: usize,
    pub poll_groups: usize,
    /// Connections the devices' connection managers track (time-wait included).
    pub connections: usize,
    /// Attempts whose accept went unanswered, remembered while the host may still retransmit its request
    /// (each goes away on its own within two minutes).
    pub stale_connection_attempts: usize,
    /// Memory regions of every device registered for one request (back to its baseline when idle).
    pub memory_regions: usize,
    /// Buffer arenas registered once per lane (receive buffers, the pools' data and response buffers, posted
    /// in place): the pools' grow to their high-water mark and stay, bounded by `pool_buffers`.
    pub buffer_arenas: usize,
    pub buffer_arena_bytes: usize,
    /// Capsule buffers waiting on the poll groups' shared receive queues: all of them (groups × `srq_depth` per
    /// listener) whenever no queue holds one — a buffer a closing queue failed to hand back shows here.
    pub srq_receives: u64,
    pub pool_buffers_in_use: usize,
    pub pool_buffers: usize,
    /// Commands the poll groups have answered since the target started (every queue, admin included).
    pub commands_completed: u64,
    /// CPU time (user + system) of the whole process since it started: with `commands_completed`, two
    /// snapshots give the target's CPU per I/O.
    pub cpu_seconds: f64,
    /// Resident memory of the process.
    pub rss_bytes: u64,
    /// Threads and file descriptors of the process.
    pub threads: usize,
    pub fds: usize,
    pub listeners: Vec<ListenerStatus>,
    pub controller_detail: Vec<ControllerStats>,
}

/// User + system CPU seconds of this process (0 where the OS does not say).
fn process_cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 * 1e-6;
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| secs(u.user_time()) + secs(u.system_time()))
}

/// Resident set size, from `/proc/self/status` (0 where unreadable).
fn process_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().strip_suffix("kB"));
    kib.and_then(|k| k.trim().parse::<u64>().ok()).map_or(0, |k| k * 1024)
}

fn count_dir(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// A running target: the core plus its RDMA binding.
pub struct RdmaTarget {
    target: Arc<Target>,
    groups: Groups,
    group_threads: Vec<std::thread::JoinHandle<()>>,
    acceptor: Option<std::thread::JoinHandle<()>>,
    acceptor_tasks: mpsc::UnboundedSender<AcceptorCommand>,
    listeners: Arc<Mutex<Vec<ListenerParts>>>,
    options: RdmaOptions,
    next_portid: u16,
}

type ListenerParts = (mpsc::UnboundedSender<ListenerMsg>, Arc<Mutex<ListenerStatus>>);

enum AcceptorCommand {
    Listen(ListenSpec, oneshot::Sender<Result<ListenerParts, ListenError>>),
}

impl RdmaTarget {
    /// Starts the poll groups and the acceptor; add subsystems through [`RdmaTarget::target`] and listeners
    /// with [`RdmaTarget::listen`].
    pub async fn start(limits: TargetLimits, options: RdmaOptions) -> Result<RdmaTarget, StartError> {
        let n = options.poll_groups.max(1);
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
        let groups = Groups { senders };
        let target = Arc::new(Target::new(limits, Arc::new(groups.clone())));
        let mut group_threads = Vec::new();
        for (i, rx) in receivers.into_iter().enumerate() {
            let handle = group::spawn(i, target.clone(), groups.senders[i].clone(), rx, options.pool_buffers)
                .map_err(StartError::Thread)?;
            group_threads.push(handle);
        }
        let next_key = Arc::new(AtomicU64::new(1));
        let (acceptor_tasks, mut commands) = mpsc::unbounded_channel::<AcceptorCommand>();
        let (acceptor_target, acceptor_groups, acceptor_keys) = (target.clone(), groups.clone(), next_key.clone());
        let repair_interval = options.repair_interval;
        let acceptor = std::thread::Builder::new()
            .name("nvmf-acceptor".into())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                    tracing::error!("acceptor runtime could not start");
                    return;
                };
                runtime.block_on(async move {
                    let mut running = tokio::task::JoinSet::new();
                    while let Some(AcceptorCommand::Listen(spec, reply)) = commands.recv().await {
                        let opened = Listener::open(
                            spec,
                            acceptor_target.clone(),
                            acceptor_groups.clone(),
                            acceptor_keys.clone(),
                            repair_interval,
                        )
                        .await;
                        match opened {
                            Ok((listener, rx, status)) => {
                                let _ = reply.send(Ok((listener.sender(), status)));
                                running.spawn(listener.run(rx));
                            }
                            Err(e) => {
                                let _ = reply.send(Err(e));
                            }
                        }
                    }
                    // Every listener was told to stop; wait for them.
                    while running.join_next().await.is_some() {}
                });
            })
            .map_err(StartError::Thread)?;
        Ok(RdmaTarget {
            target,
            groups,
            group_threads,
            acceptor: Some(acceptor),
            acceptor_tasks,
            listeners: Arc::new(Mutex::new(Vec::new())),
            options,
            next_portid: 1,
        })
    }

    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }

    pub fn options(&self) -> &RdmaOptions {
        &self.options
    }

    /// Opens a listener and adds its ports to the discovery log; returns the UDP port it bound.
    pub async fn listen(&mut self, spec: ListenSpec) -> Result<u16, StartError> {
        let (tx, rx) = oneshot::channel();
        let addr = spec.addr;
        let trsvcids = spec.trsvcids.clone();
        self.acceptor_tasks.send(AcceptorCommand::Listen(spec, tx)).map_err(|_| StartError::Acceptor)?;
        let (sender, status) = rx.await.map_err(|_| StartError::Acceptor)??;
        let udp_port = status.lock().unwrap_or_else(|p| p.into_inner()).udp_port;
        self.listeners.lock().unwrap_or_else(|p| p.into_inner()).push((sender, status));
        for trsvcid in trsvcids {
            self.target.add_port(PortInfo { portid: self.next_portid, addr, trsvcid });
            self.next_portid += 1;
        }
        Ok(udp_port)
    }

    pub fn listener_status(&self) -> Vec<ListenerStatus> {
        self.stats_handle().listener_status()
    }

    /// A handle that takes stats snapshots (for the control socket and signal handler).
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle { target: self.target.clone(), groups: self.groups.clone(), listeners: self.listeners.clone() }
    }

    pub async fn stats(&self) -> Stats {
        self.stats_handle().stats().await
    }

    /// Stops accepting, drains and closes every queue, flushes every namespace, stops every thread.
    pub async fn shutdown(mut self) {
        let listeners: Vec<_> = self.listeners.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        for (sender, _) in &listeners {
            let (tx, rx) = oneshot::channel();
            if sender.send(ListenerMsg::Shutdown(tx)).is_ok() {
                let _ = rx.await;
            }
        }
        drop(listeners);
        for g in 0..self.groups.senders.len() {
            let (tx, rx) = oneshot::channel();
            if self.groups.send(g, GroupMsg::Shutdown(tx)).is_ok() {
                let _ = rx.await;
            }
        }
        if let Err(e) = self.target.flush_all() {
            tracing::error!("flushing namespaces: {e}");
        }
        let (closed, _) = mpsc::unbounded_channel();
        self.acceptor_tasks = closed;
        let threads: Vec<_> = self.group_threads.drain(..).chain(self.acceptor.take()).collect();
        // Joining blocks: do it off the runtime.
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// Takes stats snapshots of a running target; cheap to clone.
#[derive(Clone)]
pub struct StatsHandle {
    target: Arc<Target>,
    groups: Groups,
    listeners: Arc<Mutex<Vec<ListenerParts>>>,
}

impl StatsHandle {
    pub fn listener_status(&self) -> Vec<ListenerStatus> {
        let listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        listeners.iter().map(|(_, s)| s.lock().unwrap_or_else(|p| p.into_inner()).clone()).collect()
    }

    pub async fn stats(&self) -> Stats {
        let mut groups = Vec::new();
        for g in 0..self.groups.senders.len() {
            let (tx, rx) = oneshot::channel();
            if self.groups.send(g, GroupMsg::Stats(tx)).is_ok()
                && let Ok(s) = rx.await
            {
                groups.push(s);
            }
        }
        let mut listeners = self.listener_status();
        let (mut qpairs, mut connections, mut stale_connection_attempts, mut memory_regions) = (0, 0, 0, 0);
        let (mut srq_receives, mut buffer_arenas, mut buffer_arena_bytes) = (0, 0, 0);
        for l in &mut listeners {
            if let Some(d) = &l.device
                && let Ok(s) = d.stats().await
            {
                qpairs += s.queue_pairs;
                connections += s.connections;
                stale_connection_attempts += s.stale_connection_attempts;
                memory_regions += s.regions;
                buffer_arenas += s.arenas;
                buffer_arena_bytes += s.arena_bytes;
                srq_receives += s.srq_receives;
                l.active_mtu = Some(s.active_mtu);
                l.lanes = Some(s.lanes);
                l.shared_receive_queues = Some(s.shared_receive_queues);
                l.lane_packets_received = Some(s.lane_packets_received);
                l.lane_gso_sends = Some(s.lane_gso_sends);
                l.lane_gro_receives = Some(s.lane_gro_receives);
                let g = s.node_guid.to_be_bytes();
                l.node_guid = Some(format!(
                    "{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}",
                    g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]
                ));
            }
        }
        Stats {
            controllers: self.target.controller_count(),
            qpairs,
            pollers: groups.iter().map(|g| g.queues).sum(),
            poll_groups: self.groups.senders.len(),
            connections,
            stale_connection_attempts,
            memory_regions,
            buffer_arenas,
            buffer_arena_bytes,
            srq_receives,
            pool_buffers_in_use: groups.iter().map(|g| g.pool_buffers_in_use).sum(),
            pool_buffers: groups.iter().map(|g| g.pool_buffers).sum(),
            commands_completed: groups.iter().map(|g| g.commands_completed).sum(),
            cpu_seconds: process_cpu_seconds(),
            rss_bytes: process_rss_bytes(),
            threads: count_dir("/proc/self/task"),
            fds: count_dir("/proc/self/fd"),
            listeners,
            controller_detail: self.target.controller_stats(),
        }
    }
}

impl crate::control::StatsSource for StatsHandle {
    fn snapshot(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Stats> + Send + '_>> {
        Box::pin(self.stats())
    }
}
