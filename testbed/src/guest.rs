//! What runs inside a VM: the initramfs's `/init`, and the shell snippets scenarios build their per-VM scripts
//! from (network setup: NICs, bond, rxe, addresses; barriers through the shared directory).
//!
//! `/init` loads the modules, mounts the host's `/` read-only over 9p under a tmpfs overlay (so the host's
//! binaries — nvme-cli, fio, iproute2, tcpdump, ours — run unchanged), mounts the run's shared directory at
//! `/testbed`, runs `/testbed/NAME.sh` (NAME from `testbed.name=` on the kernel command line) with its output in
//! `/testbed/NAME.log` and its exit code in `/testbed/NAME.exit`, and powers off.

pub const INIT: &str = r#"#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
name=$(sed -n 's/.*testbed\.name=\([^ ]*\).*/\1/p' /proc/cmdline)
while read -r module params; do
    insmod "$module" $params 2>/dev/null || echo "testbed: insmod $module failed"
done < /modules.order
fail() { echo "testbed: $*"; poweroff -f; }
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /host || fail "9p host root"
mount -t tmpfs -o size=600m tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot || fail overlay
mkdir -p /newroot/testbed
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 shared /newroot/testbed || fail "9p shared"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mount -t configfs configfs /newroot/sys/kernel/config
mount -t tmpfs tmpfs /newroot/tmp
mount -t tmpfs tmpfs /newroot/run
echo "testbed: $name up $(cut -d' ' -f1 /proc/uptime)" > /newroot/testbed/$name.boot
chroot /newroot /bin/sh /testbed/$name.sh > /newroot/testbed/$name.log 2>&1
echo $? > /newroot/testbed/$name.exit
sync
poweroff -f
"#;

/// Shell helpers every per-VM script starts with.
pub const PRELUDE: &str = r#"set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
T=/testbed
now() { cut -d' ' -f1 /proc/uptime; }
log() { echo "[$(now)] $*"; }
# wait_file FILE SECONDS [OTHER]: until another VM (or the host) creates FILE; with OTHER, giving up as soon as
# that VM's script has ended (its OTHER.exit), since it will create nothing more.
wait_file() {
    n=0
    while [ ! -e "$1" ]; do
        [ -n "${3:-}" ] && [ -e "$T/$3.exit" ] && return 1
        sleep 0.2; n=$((n+1)); [ $n -ge $(($2*5)) ] && return 1
    done
    return 0
}
"#;

/// Asserts that `script`, after the prelude, is valid shell for the host's sh (the one the VMs run).
#[cfg(test)]
pub(crate) fn assert_parses(script: &str) {
    let script = format!("{PRELUDE}{script}");
    let out = std::process::Command::new("sh").args(["-n", "-c", &script]).output().expect("sh");
    assert!(out.status.success(), "{}\n{script}", String::from_utf8_lossy(&out.stderr));
}

/// Network setup: `nics` NICs (eth0..), a bond over all of them when `bond`, the address on the bond (or eth0),
/// and an rxe device on it when `rxe`.
pub fn network(nics: usize, bond: bool, addr: &str, rxe: bool) -> String {
    let members: Vec<usize> = if bond { (0..nics).collect() } else { Vec::new() };
    network_with(nics, &members, Some(addr), rxe)
}

/// Network setup: every NIC up; bond0 (active-backup, miimon 100) over `bond_members` when there are any; the
/// address (/24) on bond0, else eth0; rxe0 on that netdev when `rxe`.
pub fn network_with(nics: usize, bond_members: &[usize], addr: Option<&str>, rxe: bool) -> String {
    let mut s = String::from("ip link set lo up\n");
    let dev = if bond_members.is_empty() { "eth0" } else { "bond0" };
    if !bond_members.is_empty() {
        s.push_str("ip link add bond0 type bond mode active-backup miimon 100\n");
        for i in bond_members {
            s.push_str(&format!("ip link set eth{i} down\nip link set eth{i} master bond0\n"));
        }
        s.push_str("ip link set bond0 up\n");
    }
    for i in (0..nics).filter(|i| !bond_members.contains(i)) {
        s.push_str(&format!("ip link set eth{i} up\n"));
    }
    if nics == 0 {
        return s;
    }
    if let Some(addr) = addr {
        s.push_str(&format!("ip addr add {addr}/24 dev {dev}\n"));
    }
    if rxe {
        s.push_str(&format!("rdma link add rxe0 type rxe netdev {dev} || log 'rdma link add failed'\n"));
    }
    // The bond needs a moment to pick an active slave.
    s.push_str(&format!(
        "n=0; until ip link show {dev} | grep -q LOWER_UP; do sleep 0.1; n=$((n+1)); [ $n -gt 100 ] && break; done\n"
    ));
    s
}
