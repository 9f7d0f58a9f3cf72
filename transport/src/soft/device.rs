//! The soft provider's device: its configuration, and the worker thread that owns its UDP socket and RC engines.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::sync::mpsc;

pub use crate::device::*;

use super::cm::CmConfig;
use super::wire::ROCEV2_UDP_PORT;
use super::worker::Worker;

/// How a soft device is set up.
#[derive(Debug, Clone)]
pub struct SoftConfig {
    /// The address the device serves (and its GID is derived from).
    pub addr: IpAddr,
    /// UDP port to bind; 4791 talks to any RoCEv2 peer, another port lets two devices share an address.
    pub port: u16,
    /// Path MTU in bytes (256..=4096).
    pub mtu: usize,
    pub ack_timeout: Duration,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    /// Packets in flight per queue pair.
    pub window: u32,
    pub cm: CmConfig,
    /// Watch the netdev holding `addr` (rtnetlink) and raise port, address and removal events.
    pub watch_netdev: bool,
}

impl SoftConfig {
    pub fn new(addr: IpAddr) -> SoftConfig {
        SoftConfig {
            addr,
            port: ROCEV2_UDP_PORT,
            mtu: 4096,
            ack_timeout: Duration::from_millis(100),
            retry_cnt: 7,
            rnr_retry: 7,
            window: 128,
            cm: CmConfig::default(),
            watch_netdev: true,
        }
    }

    /// A device on the first IPv4 address (else IPv6) of the netdev named `name`.
    pub fn for_netdev(name: &str) -> Result<SoftConfig, DeviceError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(DeviceError::Worker)?;
        let addr = rt.block_on(super::netdev::address_of_name(name)).map_err(DeviceError::Netdev)?;
        Ok(SoftConfig::new(addr))
    }
}

/// A UDP socket as a soft device sends RoCEv2 from: non-blocking, large buffers, IPv4 unfragmented with
/// identification 0 (the header its ICRCs are computed over) — for tools and tests that speak RoCEv2 by hand.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    super::udp::bind(addr)
}

impl Device {
    /// Binds the UDP socket and starts the worker thread.
    pub fn open(config: SoftConfig) -> Result<Device, DeviceError> {
        let local = SocketAddr::new(config.addr, config.port);
        let (socket, steered) =
            super::udp::bind_steered(local).map_err(|source| DeviceError::Bind { addr: local, source })?;
        let local = socket.local_addr().map_err(|source| DeviceError::Bind { addr: local, source })?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (event_tx, events) = mpsc::unbounded_channel();
        let worker = std::thread::Builder::new()
            .name(format!("soft-roce {local}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
                match runtime {
                    Ok(rt) => rt.block_on(async move {
                        match tokio::net::UdpSocket::from_std(socket) {
                            Ok(socket) => Worker::new(config, local, socket, steered, event_tx).run(command_rx).await,
                            Err(e) => tracing::error!(%local, "soft device socket: {e}"),
                        }
                    }),
                    Err(e) => tracing::error!(%local, "soft device runtime: {e}"),
                }
            })
            .map_err(DeviceError::Worker)?;
        Ok(Device::from_worker(crate::Provider::Soft, local, commands, events, worker))
    }
}
