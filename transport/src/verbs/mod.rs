//! `verbs`: the provider for real RDMA devices — RNICs, and the kernel's rxe and siw — through libibverbs, and
//! the kernel's connection manager (`/dev/infiniband/rdma_cm`, spoken directly: `ucma` says why not through
//! librdmacm). libibverbs is loaded at run time (rdma-mummy-sys's stubs `dlopen` it), so a binary built with
//! this provider starts on a host without it and reports "RDMA unavailable (…)" when asked for it.
//!
//! `sideway` lists the devices; the rest goes through rdma-mummy-sys directly (`ffi`, the workspace's only
//! unsafe code), because sideway 0.4 has no shared receive queues, no connection parameters (private data,
//! responder resources, initiator depth, RNR retry) and no access to a connect request's private data, all of
//! which the NVMe/RDMA binding needs. The device's worker thread (`worker`) owns the connection manager, the
//! device's lifecycle and the queue pairs made on the device; queue pairs made on a lane belong to the lane's
//! thread (`lane`), each lane with a device context of its own; both drive a `data_path`. The surface is the
//! same [`crate::Device`] as the soft provider's.

#[cfg(feature = "verbs")]
mod data_path;
#[cfg(feature = "verbs")]
mod ffi;
#[cfg(feature = "verbs")]
pub(crate) mod lane;
#[cfg(feature = "verbs")]
mod ucma;
#[cfg(feature = "verbs")]
mod worker;

use std::net::IpAddr;
use std::time::Duration;

use crate::device::{Device, DeviceError};

/// How a verbs device is opened.
#[derive(Debug, Clone)]
pub struct VerbsConfig {
    /// An address of the RDMA device to use (the netdev under it holds the address: rxe0's, an RNIC port's).
    pub addr: IpAddr,
    /// How long address and route resolution may take when connecting.
    pub resolve_timeout: Duration,
}

impl VerbsConfig {
    pub fn new(addr: IpAddr) -> VerbsConfig {
        VerbsConfig { addr, resolve_timeout: Duration::from_secs(2) }
    }
}

/// Whether this build has the verbs provider (the `verbs` feature).
pub const BUILT: bool = cfg!(feature = "verbs");

/// Why this build cannot open a verbs device.
#[cfg(not(feature = "verbs"))]
const NOT_BUILT: &str =
    "this build has no verbs provider: build with --features verbs (which needs cmake and libclang-dev)";

/// The RDMA devices libibverbs sees, by name; why there are none when it cannot be loaded.
pub fn devices() -> Result<Vec<String>, String> {
    #[cfg(feature = "verbs")]
    return ffi::device_names();
    #[cfg(not(feature = "verbs"))]
    Err(NOT_BUILT.into())
}

impl Device {
    /// Built without the `verbs` feature: always [`DeviceError::Unavailable`], saying how to get it.
    #[cfg(not(feature = "verbs"))]
    pub fn open_verbs(config: VerbsConfig) -> Result<Device, DeviceError> {
        let _ = config;
        Err(DeviceError::Unavailable(NOT_BUILT.into()))
    }

    /// Opens the RDMA device serving `config.addr` and starts its worker thread. Fails with
    /// [`DeviceError::Unavailable`] when libibverbs or the kernel's connection manager is missing or no RDMA
    /// device has the address.
    #[cfg(feature = "verbs")]
    pub fn open_verbs(config: VerbsConfig) -> Result<Device, DeviceError> {
        let addr = config.addr;
        use std::net::SocketAddr;
        use tokio::sync::mpsc;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (event_tx, events) = mpsc::unbounded_channel();
        let own = commands.downgrade();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let worker = std::thread::Builder::new()
            .name(format!("verbs {addr}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
                let rt = match runtime {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(DeviceError::Worker(e)));
                        return;
                    }
                };
                // The library objects are created on this thread and never leave it.
                match worker::Worker::open(config, event_tx, own) {
                    Ok(w) => {
                        let _ = ready_tx.send(Ok(()));
                        rt.block_on(w.run(command_rx));
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(DeviceError::Worker)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Device::from_worker(
                crate::Provider::Verbs,
                SocketAddr::new(addr, crate::soft::wire::ROCEV2_UDP_PORT),
                commands,
                events,
                worker,
            )),
            Ok(Err(e)) => {
                let _ = worker.join();
                Err(e)
            }
            Err(_) => {
                let _ = worker.join();
                Err(DeviceError::Closed)
            }
        }
    }
}
