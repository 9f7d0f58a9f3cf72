//! Link faults under a live connection, on real network namespaces joined by a veth pair (root only; under
//! `CI=true` this test must run, never skip). Each soft device lives in its own namespace. Link down in the
//! middle of a transfer: retries, then RETRY_EXC and flush completions, and PORT_ERR; link up: PORT_ACTIVE and
//! a new connection works; address deleted and restored: ADDR_CHANGE both ways; veth deleted:
//! DEVICE_REMOVAL. Afterwards the process has no more threads or file descriptors than before. Every datagram
//! either device sent is captured in the receiving namespace (a raw socket) and must carry the ICRC of the IP
//! header it really went out with.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use transport::soft::device::{
    CompletionQueue, ConnectionOptions, Device, DeviceEvent, ProtectionDomain, QueuePair, SoftConfig,
};
use transport::soft::rc::{Access, SendOp, SendWr, WcStatus};
use transport::soft::wire::mad::CmMessage;

fn sh(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// The veths' MACs: those of the kernel captures' bond0s, whose rxe node GUIDs are known.
const MACS: [&str; 2] = ["52:54:00:aa:00:00", "52:54:00:bb:00:00"];
const NODE_GUIDS: [u64; 2] = [0x5054_00ff_feaa_0000, 0x5054_00ff_febb_0000];

/// Namespaces and veth created for one test run, removed when dropped (also on failure).
struct Topology {
    ns: [String; 2],
    veth: [String; 2],
    addrs: [Ipv4Addr; 2],
}

impl Topology {
    fn new() -> Topology {
        let id = std::process::id();
        let subnet = (id % 250) as u8 + 1;
        let t = Topology {
            ns: [format!("nvmf-lf-a-{id}"), format!("nvmf-lf-b-{id}")],
            veth: [format!("lfa{id}"), format!("lfb{id}")],
            addrs: [Ipv4Addr::new(198, 19, subnet, 1), Ipv4Addr::new(198, 19, subnet, 2)],
        };
        for ns in &t.ns {
            sh(&["netns", "add", ns]);
        }
        sh(&["link", "add", &t.veth[0], "type", "veth", "peer", "name", &t.veth[1]]);
        for (((veth, ns), addr), mac) in t.veth.iter().zip(&t.ns).zip(&t.addrs).zip(MACS) {
            sh(&["link", "set", veth, "netns", ns]);
            sh(&["-n", ns, "link", "set", veth, "address", mac]);
            sh(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", veth]);
            sh(&["-n", ns, "link", "set", veth, "up"]);
            sh(&["-n", ns, "link", "set", "lo", "up"]);
        }
        t
    }

    /// Opens a soft device inside namespace `i`: the opening thread enters the namespace, and the device's
    /// socket and worker (with its netlink watcher) are created there.
    fn device(&self, i: usize) -> Device {
        let ns = format!("/var/run/netns/{}", self.ns[i]);
        let mut config = SoftConfig::new(IpAddr::V4(self.addrs[i]));
        config.ack_timeout = Duration::from_millis(50);
        config.retry_cnt = 3;
        std::thread::spawn(move || {
            let file = std::fs::File::open(&ns).expect("namespace file");
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            Device::open(config).expect("open device in namespace")
        })
        .join()
        .expect("device thread")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

async fn event(dev: &Device) -> DeviceEvent {
    tokio::time::timeout(Duration::from_secs(10), dev.next_event()).await.expect("event within 10 s").expect("open")
}

/// Waits for an event matching `want`, skipping others (returns what was skipped).
async fn expect(dev: &Device, mut want: impl FnMut(&DeviceEvent) -> bool) -> Vec<DeviceEvent> {
    let mut skipped = Vec::new();
    loop {
        let e = event(dev).await;
        if want(&e) {
            return skipped;
        }
        skipped.push(e);
    }
}

async fn connect(
    (a, pda): (&Device, &ProtectionDomain),
    (b, pdb): (&Device, &ProtectionDomain),
    b_addr: SocketAddr,
) -> (QueuePair, CompletionQueue, QueuePair, u32, u32) {
    let (cqa, cqb) = (CompletionQueue::new(), CompletionQueue::new());
    let qa = a.create_qp(pda, &cqa, &cqa).await.unwrap();
    let options = ConnectionOptions { retry_count: 3, ..ConnectionOptions::default() };
    let conn_a = a.connect(&qa, b_addr, 4420, options, &[]).await.unwrap();
    let mut request = None;
    expect(b, |e| {
        if let DeviceEvent::ConnectRequest { conn, .. } = e {
            request = Some(*conn);
        }
        request.is_some()
    })
    .await;
    let conn_b = request.expect("connect request");
    let qb = b.create_qp(pdb, &cqb, &cqb).await.unwrap();
    b.accept(conn_b, &qb, options, &[]).await.unwrap();
    expect(a, |e| matches!(e, DeviceEvent::Established { .. })).await;
    expect(b, |e| matches!(e, DeviceEvent::Established { .. })).await;
    (qa, cqa, qb, conn_a, conn_b)
}

#[tokio::test]
async fn link_down_up_address_and_removal() {
    if !nix::unistd::geteuid().is_root() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true: the link fault test must run as root");
        eprintln!("SKIP: link_faults needs root (network namespaces and veth)");
        return;
    }
    let (threads0, fds0) = (count("/proc/self/task"), count("/proc/self/fd"));
    let topo = Topology::new();
    let addrs = topo.addrs.map(IpAddr::V4);
    let captures = topo.ns.clone().map(|ns| support::capture::WireCapture::start(Some(&ns), &addrs));
    let (a, b) = (topo.device(0), topo.device(1));
    let (pda, pdb) = (a.alloc_pd().await.unwrap(), b.alloc_pd().await.unwrap());
    let b_addr = b.local_addr();
    let stats = [a.stats().await.unwrap(), b.stats().await.unwrap()];
    assert!(stats[0].port_up);
    // A node GUID as rxe derives it from the MAC, and the path MTU a 1500-byte netdev carries.
    assert_eq!(stats.map(|s| (s.node_guid, s.active_mtu)), NODE_GUIDS.map(|g| (g, 1024)));
    b.listen(4420, 8).await.unwrap();
    let (qa, cqa, qb, _, _) = connect((&a, &pda), (&b, &pdb), b_addr).await;
    let region = b.register(&pdb, vec![0; 64 << 20], Access::REMOTE_ALL).await.unwrap();

    // A stream of 1 MiB WRITEs; the link goes down after the first completes.
    for i in 0..64u64 {
        let op = SendOp::RdmaWrite { remote_addr: region.keys.addr + (i << 20), rkey: region.keys.rkey };
        qa.post_send(SendWr::new(i, op, vec![i as u8; 1 << 20])).unwrap();
    }
    let first = tokio::time::timeout(Duration::from_secs(10), cqa.next()).await.unwrap().wc;
    assert_eq!((first.wr_id, first.status), (0, WcStatus::Success));
    sh(&["-n", &topo.ns[0], "link", "set", &topo.veth[0], "down"]);
    expect(&a, |e| *e == DeviceEvent::PortError).await;
    assert!(!a.stats().await.unwrap().port_up);
    // Retries run out: one RETRY_EXC, the rest flushed — and every buffer comes back.
    let mut statuses = vec![first.status];
    while statuses.len() < 64 {
        let wc = tokio::time::timeout(Duration::from_secs(20), cqa.next())
            .await
            .expect("completions after the link died")
            .wc;
        assert_eq!(wc.buf.len(), 1 << 20, "buffer handed back");
        statuses.push(wc.status);
    }
    let successes = statuses.iter().take_while(|s| **s == WcStatus::Success).count();
    assert_eq!(statuses[successes], WcStatus::RetryExceeded, "{statuses:?}");
    assert!(statuses[successes + 1..].iter().all(|s| *s == WcStatus::WrFlush), "{statuses:?}");
    expect(&a, |e| matches!(e, DeviceEvent::QpFatal { cause: WcStatus::RetryExceeded, .. })).await;
    a.destroy_qp(&qa).await.unwrap();

    // Link up: PORT_ACTIVE, and a new connection moves data.
    sh(&["-n", &topo.ns[0], "link", "set", &topo.veth[0], "up"]);
    expect(&a, |e| *e == DeviceEvent::PortActive).await;
    // Wait for the link to carry traffic (carrier comes back on both ends).
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Jumbo frames: the devices follow the netdev's MTU, and the next connection uses 4096-byte packets.
    for i in 0..2 {
        sh(&["-n", &topo.ns[i], "link", "set", &topo.veth[i], "mtu", "9000"]);
    }
    for dev in [&a, &b] {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while dev.stats().await.unwrap().active_mtu != 4096 {
            assert!(std::time::Instant::now() < deadline, "the device did not follow the MTU change");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (qa2, cqa2, qb2, _, _) = connect((&a, &pda), (&b, &pdb), b_addr).await;
    let op = SendOp::RdmaWrite { remote_addr: region.keys.addr, rkey: region.keys.rkey };
    qa2.post_send(SendWr::new(1000, op, vec![0x77; 1 << 20])).unwrap();
    let wc = tokio::time::timeout(Duration::from_secs(10), cqa2.next()).await.unwrap().wc;
    assert_eq!(wc.status, WcStatus::Success);

    // The address goes away and comes back.
    let cidr = format!("{}/24", topo.addrs[0]);
    sh(&["-n", &topo.ns[0], "addr", "del", &cidr, "dev", &topo.veth[0]]);
    expect(&a, |e| *e == DeviceEvent::AddrChange { present: false }).await;
    sh(&["-n", &topo.ns[0], "addr", "add", &cidr, "dev", &topo.veth[0]]);
    expect(&a, |e| *e == DeviceEvent::AddrChange { present: true }).await;

    // The veth is deleted: DEVICE_REMOVAL, and the queue pair's work is flushed.
    sh(&["-n", &topo.ns[0], "link", "del", &topo.veth[0]]);
    expect(&a, |e| *e == DeviceEvent::DeviceRemoval).await;
    a.destroy_qp(&qa2).await.unwrap();
    b.destroy_qp(&qb).await.unwrap();
    b.destroy_qp(&qb2).await.unwrap();
    let landed = b.deregister(region).await.unwrap();
    assert!(landed[..1 << 20].iter().all(|&x| x == 0x77));

    // Nothing left behind.
    for dev in [&a, &b] {
        let s = dev.stats().await.unwrap();
        assert_eq!((s.queue_pairs, s.regions, s.region_bytes), (0, 0, 0), "{s:?}");
    }
    drop(a);
    drop(b);
    let captured = captures.map(|c| c.stop());
    for (datagrams, ns) in captured.iter().zip(&topo.ns) {
        assert!(datagrams.len() > 50, "{ns}: {} datagrams captured", datagrams.len());
        eprintln!("{ns}: {} datagrams captured, every ICRC right for its IP header", datagrams.len());
        support::capture::assert_icrcs_match_the_wire(ns, datagrams);
    }
    // What A sent, as B's namespace received it: REQs carrying A's node GUID, RDMA WRITEs of 1024 bytes a
    // packet at MTU 1500 and of 4096 at 9000.
    let mut guids = Vec::new();
    let mut write_sizes = std::collections::BTreeSet::new();
    for d in &captured[1] {
        let (p, _) = transport::soft::wire::PacketRepr::parse(&d.payload).unwrap();
        if p.bth.opcode.is_write() {
            write_sizes.insert(p.payload.len());
        }
        if let Ok((_, CmMessage::Req(req))) = CmMessage::parse(p.payload) {
            guids.push(req.local_ca_guid);
        }
    }
    assert!(!guids.is_empty() && guids.iter().all(|&g| g == NODE_GUIDS[0]), "{guids:x?}");
    assert_eq!(write_sizes.iter().max(), Some(&4096), "{write_sizes:?}");
    assert!(write_sizes.contains(&1024), "{write_sizes:?}");
    drop(topo);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(count("/proc/self/task"), threads0, "threads back to the baseline");
    assert_eq!(count("/proc/self/fd"), fds0, "file descriptors back to the baseline");
}
