//! Topology files for `testbed vm run --topology FILE` (TOML):
//!
//! ```toml
//! [[vm]]
//! name = "a"
//! nics = 2
//! bond = [0, 1]              # NICs bonded into bond0 (active-backup, miimon 100); none by default
//! address = "198.18.0.1"     # /24, on bond0 or eth0
//! rxe = true                 # rxe0 on bond0 or eth0
//! memory_mib = 1024          # default 1024
//! command = "rdma link; ip -br addr"
//! tap = { nic = 1, host_address = "198.18.1.254/24" }   # optional: that NIC is a tap in the run's namespace
//!
//! [[vm]]
//! name = "b"
//! # ...
//!
//! [[cable]]                  # NIC to NIC: "vm:nic"
//! a = "a:0"
//! b = "b:0"
//! ```

use serde::Deserialize;

use crate::vm::{Cable, Tap, VmSpec};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    vm: Vec<RawVm>,
    #[serde(default)]
    cable: Vec<RawCable>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: String,
    nics: usize,
    #[serde(default)]
    bond: Vec<usize>,
    address: Option<String>,
    #[serde(default)]
    rxe: bool,
    memory_mib: Option<u32>,
    command: String,
    tap: Option<RawTap>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTap {
    nic: usize,
    host_address: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCable {
    a: String,
    b: String,
}

/// A parsed topology, ready for [`crate::vm::Run::start`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub vms: Vec<VmSpec>,
    pub cables: Vec<Cable>,
    pub taps: Vec<Tap>,
}

#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct TopologyError {
    pub file: String,
    pub message: String,
}

fn in_range(what: &str, addr: &str) -> Result<(), String> {
    let ip: std::net::Ipv4Addr =
        addr.split('/').next().unwrap_or_default().parse().map_err(|e| format!("{what} {addr:?}: {e}"))?;
    // Testbed hosts live in 198.18.0.0/15 (the network rule).
    if ip.octets()[0] != 198 || !(18..=19).contains(&ip.octets()[1]) {
        return Err(format!("{what} {addr}: testbed addresses are in 198.18.0.0/15"));
    }
    Ok(())
}

impl Topology {
    pub fn parse(file: &str, text: &str) -> Result<Topology, TopologyError> {
        let err = |message: String| TopologyError { file: file.into(), message };
        let raw: RawTopology = toml::from_str(text).map_err(|e| err(e.to_string().trim().to_string()))?;
        if raw.vm.is_empty() || raw.vm.len() > 4 {
            return Err(err(format!("{} VMs: 1 to 4", raw.vm.len())));
        }
        let mut vms = Vec::new();
        let mut taps = Vec::new();
        for (i, v) in raw.vm.iter().enumerate() {
            if vms.iter().any(|x: &VmSpec| x.name == v.name)
                || v.name.is_empty()
                || !v.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                return Err(err(format!("VM name {:?}: empty, repeated or not [A-Za-z0-9-]", v.name)));
            }
            if let Some(n) = v.bond.iter().find(|&&n| n >= v.nics) {
                return Err(err(format!("{}: bond member eth{n} but only {} NICs", v.name, v.nics)));
            }
            if let Some(a) = &v.address {
                in_range(&format!("{}: address", v.name), a).map_err(err)?;
            }
            if let Some(t) = &v.tap {
                if t.nic >= v.nics {
                    return Err(err(format!("{}: tap on eth{} but only {} NICs", v.name, t.nic, v.nics)));
                }
                in_range(&format!("{}: tap host_address", v.name), &t.host_address).map_err(err)?;
                taps.push(Tap { vm: i, nic: t.nic, host_addr: t.host_address.clone() });
            }
            let net = crate::guest::network_with(v.nics, &v.bond, v.address.as_deref(), v.rxe);
            vms.push(VmSpec {
                name: v.name.clone(),
                nics: v.nics,
                memory_mib: v.memory_mib.unwrap_or(1024),
                script: format!("{net}{}\n", v.command),
            });
        }
        let end = |s: &str| -> Result<(usize, usize), TopologyError> {
            let (name, nic) = s.split_once(':').ok_or_else(|| err(format!("cable end {s:?}: VM:NIC")))?;
            let vm =
                vms.iter().position(|v| v.name == name).ok_or_else(|| err(format!("cable end {s:?}: no VM {name}")))?;
            let nic: usize = nic.parse().map_err(|_| err(format!("cable end {s:?}: NIC number")))?;
            if nic >= vms[vm].nics || taps.iter().any(|t| t.vm == vm && t.nic == nic) {
                return Err(err(format!("cable end {s:?}: no such free NIC")));
            }
            Ok((vm, nic))
        };
        let mut cables: Vec<Cable> = Vec::new();
        for c in &raw.cable {
            let (a, b) = (end(&c.a)?, end(&c.b)?);
            if a == b || cables.iter().any(|&(x, y)| [x, y].contains(&a) || [x, y].contains(&b)) {
                return Err(err(format!("cable {} – {}: a NIC takes one cable", c.a, c.b)));
            }
            cables.push((a, b));
        }
        Ok(Topology { vms, cables, taps })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"
[[vm]]
name = "a"
nics = 2
bond = [0, 1]
address = "198.18.0.1"
rxe = true
command = "true"

[[vm]]
name = "b"
nics = 3
bond = [0, 1]
address = "198.18.0.2"
command = "true"
tap = { nic = 2, host_address = "198.18.1.254/24" }

[[cable]]
a = "a:0"
b = "b:0"

[[cable]]
a = "a:1"
b = "b:1"
"#;

    #[test]
    fn parses_bonds_cables_and_taps() {
        let t = Topology::parse("t.toml", TWO).unwrap();
        assert_eq!(t.cables, vec![((0, 0), (1, 0)), ((0, 1), (1, 1))]);
        assert_eq!(t.taps, vec![Tap { vm: 1, nic: 2, host_addr: "198.18.1.254/24".into() }]);
        assert!(t.vms[0].script.contains("rdma link add rxe0 type rxe netdev bond0"));
        assert!(t.vms[1].script.contains("ip link set eth2 up") && !t.vms[1].script.contains("rxe0"));
    }

    #[test]
    fn the_example_topology_parses() {
        let t = Topology::parse("two-bonded.toml", include_str!("../examples/two-bonded.toml")).unwrap();
        assert_eq!((t.vms.len(), t.cables.len(), t.taps.len()), (2, 2, 0));
    }

    #[test]
    fn refuses_what_cannot_be_wired() {
        let bad = [
            (TWO.replace("b = \"b:1\"", "b = \"b:0\""), "one cable"),
            (TWO.replace("b = \"b:1\"", "b = \"b:2\""), "free NIC"),
            (TWO.replace("b = \"b:1\"", "b = \"c:1\""), "no VM c"),
            (TWO.replace("198.18.0.2", "10.0.0.2"), "198.18.0.0/15"),
            (
                TWO.replace("bond = [0, 1]\naddress = \"198.18.0.1\"", "bond = [0, 5]\naddress = \"198.18.0.1\""),
                "bond member",
            ),
            (TWO.replace("nics = 3", "nics = 3\nbogus = 1"), "unknown field"),
        ];
        for (text, want) in bad {
            let e = Topology::parse("t.toml", &text).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should say {want:?}");
        }
    }
}
