//! What a soft device really puts on the wire, seen from outside it: a raw IPv4 socket (root: CAP_NET_RAW)
//! receives a copy of every UDP datagram the kernel delivers in its network namespace, IP header included —
//! the header the ICRC covers and a receiving socket never sees. A check against it cannot pass by symmetry
//! between our sender and our receiver.

use std::io::Read;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use transport::soft::pcap::{self, Datagram};
use transport::soft::wire::{PacketRepr, icrc};

/// A capture running on its own thread until [`WireCapture::stop`].
pub struct WireCapture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Datagram>>>,
}

impl WireCapture {
    /// Starts capturing RoCEv2 datagrams (UDP to 4791) from or to any of `addrs`, in the network namespace
    /// named `netns` (`ip netns`), or the caller's. Returns once the socket is open.
    pub fn start(netns: Option<&str>, addrs: &[IpAddr]) -> WireCapture {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (flag, netns, addrs) = (stop.clone(), netns.map(str::to_owned), addrs.to_vec());
        let thread = std::thread::spawn(move || {
            if let Some(ns) = netns {
                let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("namespace file");
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            }
            let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP)).expect("raw socket (root)");
            let _ = socket.set_recv_buffer_size(32 << 20);
            socket.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
            ready_tx.send(()).expect("starter waits");
            let mut out = Vec::new();
            let mut buf = vec![0u8; 65536];
            let mut record = 0;
            while !flag.load(Ordering::Relaxed) {
                let Ok(n) = (&socket).read(&mut buf) else { continue };
                let Some(d) = pcap::from_ip(&buf[..n]) else { continue };
                if addrs.contains(&d.src) || addrs.contains(&d.dst) {
                    record += 1;
                    out.push(Datagram { record, ..d });
                }
            }
            out
        });
        ready_rx.recv().expect("capture socket opened");
        WireCapture { stop, thread: Some(thread) }
    }

    /// Stops (after a moment for datagrams still on their way) and returns what was captured.
    pub fn stop(mut self) -> Vec<Datagram> {
        std::thread::sleep(Duration::from_millis(100));
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map(|t| t.join().expect("capture thread")).unwrap_or_default()
    }
}

impl Drop for WireCapture {
    /// A test that failed before `stop` still ends the capture (and closes its socket).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Every datagram must parse with our codecs and carry the ICRC that is right for the IP and UDP headers it
/// was really sent with. Returns the datagrams' opcodes; panics naming each bad one.
pub fn assert_icrcs_match_the_wire(what: &str, datagrams: &[Datagram]) -> Vec<transport::soft::wire::Opcode> {
    let mut bad = Vec::new();
    let mut opcodes = Vec::new();
    for d in datagrams {
        match PacketRepr::parse(&d.payload) {
            Ok((p, _)) => opcodes.push(p.bth.opcode),
            Err(e) => bad.push(format!("#{} {} → {}: does not parse: {e}", d.record, d.src, d.dst)),
        }
        if let Err(e) = icrc::verify(&d.ip, d.udp_src, &d.payload) {
            let id = match d.ip {
                icrc::IpHeader::V4(h) => u16::from_be_bytes([h[4], h[5]]),
                icrc::IpHeader::V6(_) => 0,
            };
            bad.push(format!("#{} {} → {} (IPv4 id {id:#06x}): {e}", d.record, d.src, d.dst));
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {} datagrams on the wire are wrong:\n{}",
        bad.len(),
        datagrams.len(),
        bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    opcodes
}
