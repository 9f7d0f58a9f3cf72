//! Two network namespaces — the target's and the host's — joined by one or more veth pairs in 198.18.0.0/15,
//! removed when dropped; and the root check every namespace test starts with.

use std::net::Ipv4Addr;
use std::process::Command;

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// True when the test can run; false (after saying why) when not root. Under CI=true not being root fails.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "CI must run {test} as root");
    eprintln!("SKIP {test}: needs root for network namespaces");
    false
}

/// One veth pair: index 0 is the target's end, 1 the host's.
pub struct Link {
    pub veth: [String; 2],
    pub addrs: [Ipv4Addr; 2],
}

pub struct Topology {
    /// The target's namespace, then the host's.
    pub ns: [String; 2],
    pub links: Vec<Link>,
}

impl Topology {
    /// `links` veth pairs, link `i` in 198.18.X.0/24 with X derived from the pid, `subnet_offset` and `i`.
    pub fn new(tag: &str, subnet_offset: u32, links: usize) -> Topology {
        let id = std::process::id();
        let t = Topology {
            ns: [format!("nvmf-{tag}-t-{id}"), format!("nvmf-{tag}-h-{id}")],
            links: (0..links)
                .map(|i| {
                    let subnet = ((id + subnet_offset + i as u32 * 37) % 250) as u8 + 1;
                    Link {
                        veth: [format!("{tag}{i}t{id}"), format!("{tag}{i}h{id}")],
                        addrs: [Ipv4Addr::new(198, 18, subnet, 1), Ipv4Addr::new(198, 18, subnet, 2)],
                    }
                })
                .collect(),
        };
        for ns in &t.ns {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        for i in 0..links {
            t.wire(i);
        }
        t
    }

    /// Creates link `i`'s veth pair and its addresses (again, after it was deleted).
    pub fn wire(&self, i: usize) {
        let link = &self.links[i];
        ip(&["link", "add", &link.veth[0], "type", "veth", "peer", "name", &link.veth[1]]);
        for side in 0..2 {
            ip(&["link", "set", &link.veth[side], "netns", &self.ns[side]]);
            ip(&["-n", &self.ns[side], "addr", "add", &format!("{}/24", link.addrs[side]), "dev", &link.veth[side]]);
            ip(&["-n", &self.ns[side], "link", "set", &link.veth[side], "up"]);
        }
    }

    /// `ip link set` the target's end of link `i` up or down.
    pub fn set_target_link(&self, i: usize, up: bool) {
        ip(&["-n", &self.ns[0], "link", "set", &self.links[i].veth[0], if up { "up" } else { "down" }]);
    }

    /// The prefix that runs a command in the target's (0) or the host's (1) namespace.
    pub fn exec(&self, side: usize) -> [&str; 4] {
        ["ip", "netns", "exec", self.ns[side].as_str()]
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
