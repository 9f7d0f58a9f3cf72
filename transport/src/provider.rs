//! Which provider serves a device, as users name it (`--provider soft|verbs`, `provider = "verbs"`).

use std::net::IpAddr;

use crate::device::{Device, DeviceError};
use crate::soft::device::SoftConfig;
use crate::verbs::VerbsConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Provider {
    /// The userspace RoCEv2 provider: no hardware, no root, no kernel module.
    #[default]
    Soft,
    /// libibverbs and the kernel's connection manager: RNICs and the kernel's rxe.
    Verbs,
}

impl Provider {
    pub const NAMES: [&'static str; 2] = ["soft", "verbs"];

    pub fn name(self) -> &'static str {
        match self {
            Provider::Soft => "soft",
            Provider::Verbs => "verbs",
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Provider {
    type Err = String;

    fn from_str(s: &str) -> Result<Provider, String> {
        match s {
            "soft" => Ok(Provider::Soft),
            "verbs" => Ok(Provider::Verbs),
            other => Err(format!("unknown provider {other:?} (soft or verbs)")),
        }
    }
}

impl Device {
    /// Opens a device on `addr` with `provider`; `udp_port` is the soft provider's (4791 talks to any RoCEv2
    /// peer; the verbs provider's device decides its own).
    pub fn open_provider(provider: Provider, addr: IpAddr, udp_port: u16) -> Result<Device, DeviceError> {
        match provider {
            Provider::Soft => {
                let mut config = SoftConfig::new(addr);
                config.port = udp_port;
                Device::open(config)
            }
            Provider::Verbs => Device::open_verbs(VerbsConfig::new(addr)),
        }
    }
}
