//! Soft provider throughput against the machine's own ceiling, measured in the same run: for each case the
//! same bytes are moved by two soft devices over loopback and by a plain UDP sender/receiver pair with the
//! same datagram size and the same in-flight window (the receiver returns a small credit every 32 datagrams,
//! like RC's coalesced ACKs). Reported as medians of 5 runs and as soft / raw ratios.
//!
//!     cargo bench -p transport --bench soft            (BENCH_RUNS, BENCH_MIB to change the effort)
#![allow(clippy::print_stdout)]

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use transport::soft::device::{
    CompletionQueue, ConnectionOptions, Device, DeviceEvent, ProtectionDomain, QueuePair, SoftConfig,
};
use transport::soft::rc::{Access, RecvWr, SendOp, SendWr, WcStatus};

const WINDOW: usize = 128;
const CREDIT_EVERY: usize = 32;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Raw UDP: `count` datagrams of `size` bytes one way with a credit window; returns seconds.
fn udp(addr: &str) -> UdpSocket {
    // The same socket buffers the soft device uses.
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    s.set_recv_buffer_size(8 << 20).unwrap();
    s.set_send_buffer_size(8 << 20).unwrap();
    s.bind(&addr.into()).unwrap();
    s.into()
}

fn raw_udp(size: usize, count: usize) -> f64 {
    let rx = udp("127.0.0.2:0");
    let tx = udp("127.0.0.1:0");
    let (rx_addr, tx_addr) = (rx.local_addr().unwrap(), tx.local_addr().unwrap());
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    tx.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let receiver = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut got = 0;
        while got < count {
            match rx.recv(&mut buf) {
                Ok(_) => {
                    got += 1;
                    if got % CREDIT_EVERY == 0 || got == count {
                        let _ = rx.send_to(&(got as u64).to_le_bytes(), tx_addr);
                    }
                }
                Err(_) => break, // lost datagrams: the sender gives up on its own
            }
        }
    });
    let payload = vec![0xa5u8; size];
    let start = Instant::now();
    let (mut sent, mut credited) = (0usize, 0usize);
    let mut ack = [0u8; 8];
    while credited < count {
        while sent < count && sent - credited < WINDOW {
            tx.send_to(&payload, rx_addr).unwrap();
            sent += 1;
        }
        match tx.recv(&mut ack) {
            Ok(_) => credited = credited.max(u64::from_le_bytes(ack) as usize),
            Err(e) => panic!("raw UDP baseline lost datagrams ({credited} of {count} credited): {e}"),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = receiver.join();
    elapsed
}

struct Pair {
    /// Kept open for the pair's lifetime.
    _a: Device,
    b: Device,
    qa: QueuePair,
    qb: QueuePair,
    cqa: CompletionQueue,
    cqb: CompletionQueue,
    pdb: ProtectionDomain,
}

async fn pair() -> Pair {
    let open = |last| {
        let mut c = SoftConfig::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)));
        c.port = 0;
        c.window = WINDOW as u32;
        Device::open(c).unwrap()
    };
    let (a, b) = (open(1), open(2));
    let (pda, pdb) = (a.alloc_pd().await.unwrap(), b.alloc_pd().await.unwrap());
    let (cqa, cqb) = (CompletionQueue::new(), CompletionQueue::new());
    b.listen(4420, 4).await.unwrap();
    let qa = a.create_qp(&pda, &cqa, &cqa).await.unwrap();
    a.connect(&qa, b.local_addr(), 4420, ConnectionOptions::default(), &[]).await.unwrap();
    let Some(DeviceEvent::ConnectRequest { conn, .. }) = b.next_event().await else { panic!("request") };
    let qb = b.create_qp(&pdb, &cqb, &cqb).await.unwrap();
    b.accept(conn, &qb, ConnectionOptions::default(), &[]).await.unwrap();
    assert!(matches!(a.next_event().await, Some(DeviceEvent::Established { .. })));
    assert!(matches!(b.next_event().await, Some(DeviceEvent::Established { .. })));
    Pair { _a: a, b, qa, qb, cqa, cqb, pdb }
}

/// SEND of `count` messages of `size` bytes, `depth` outstanding; returns seconds. Receives are posted
/// before the clock starts.
async fn soft_send(p: &Pair, size: usize, count: usize, depth: usize) -> f64 {
    for i in 0..count {
        p.qb.post_recv(RecvWr::new(i as u64, vec![0; size])).unwrap();
    }
    let start = Instant::now();
    let (mut posted, mut done, mut received) = (0, 0, 0);
    let mut bufs: Vec<Vec<u8>> = (0..depth).map(|_| vec![0x5a; size]).collect();
    while done < count || received < count {
        while posted < count && posted - done < depth {
            p.qa.post_send(SendWr::new(posted as u64, SendOp::Send, bufs.pop().unwrap())).unwrap();
            posted += 1;
        }
        let c = p.cqa.next().await;
        assert_eq!(c.wc.status, WcStatus::Success);
        bufs.push(c.wc.buf.into_vec());
        done += 1;
        received += p.cqb.poll(usize::MAX).len();
    }
    start.elapsed().as_secs_f64()
}

/// RDMA WRITE or READ of `total` bytes in `size` pieces, `depth` outstanding; returns seconds.
async fn soft_rdma(p: &Pair, read: bool, size: usize, total: usize, depth: usize) -> f64 {
    let region = p.b.register(&p.pdb, vec![0; size * depth], Access::REMOTE_ALL).await.unwrap();
    let count = total / size;
    let start = Instant::now();
    let (mut posted, mut done) = (0, 0);
    let mut bufs: Vec<Vec<u8>> = (0..depth).map(|_| vec![0x3c; size]).collect();
    while done < count {
        while posted < count && posted - done < depth {
            let slot = (posted % depth * size) as u64;
            let (remote_addr, rkey) = (region.keys.addr + slot, region.keys.rkey);
            let op =
                if read { SendOp::RdmaRead { remote_addr, rkey } } else { SendOp::RdmaWrite { remote_addr, rkey } };
            p.qa.post_send(SendWr::new(posted as u64, op, bufs.pop().unwrap())).unwrap();
            posted += 1;
        }
        let c = p.cqa.next().await;
        assert_eq!(c.wc.status, WcStatus::Success);
        bufs.push(c.wc.buf.into_vec());
        done += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    p.b.deregister(region).await.unwrap();
    elapsed
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let runs = env("BENCH_RUNS", 5);
    let mib = env("BENCH_MIB", 128);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let p = rt.block_on(pair());
    println!("soft RoCE over loopback vs raw UDP, median of {runs} runs, {mib} MiB per bandwidth run");
    println!("{:<22} {:>14} {:>14} {:>7}", "case", "soft", "raw UDP", "ratio");
    for size in [64usize, 4096] {
        let count = if size == 64 { 100_000 } else { (mib << 20) / size / 4 };
        let soft = median((0..runs).map(|_| rt.block_on(soft_send(&p, size, count, 32))).collect());
        let raw = median((0..runs).map(|_| raw_udp(size, count)).collect());
        let (s, r) = (count as f64 / soft, count as f64 / raw);
        println!("{:<22} {:>10.0} m/s {:>10.0} m/s {:>7.3}", format!("SEND {size} B"), s, r, s / r);
    }
    for read in [false, true] {
        for size in [4096usize, 128 << 10, 1 << 20] {
            let total = mib << 20;
            let soft = median((0..runs).map(|_| rt.block_on(soft_rdma(&p, read, size, total, 8))).collect());
            // The same bytes in MTU-sized datagrams.
            let raw = median((0..runs).map(|_| raw_udp(4096, total / 4096)).collect());
            let (s, r) = (total as f64 / soft / 1e6, total as f64 / raw / 1e6);
            let name = format!("{} {}", if read { "READ" } else { "WRITE" }, human(size));
            println!("{name:<22} {s:>10.1} MB/s {r:>10.1} MB/s {:>7.3}", s / r);
        }
    }
    drop(p);
}

fn human(bytes: usize) -> String {
    if bytes >= 1 << 20 { format!("{} MiB", bytes >> 20) } else { format!("{} KiB", bytes >> 10) }
}
