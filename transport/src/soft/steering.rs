//! Datagrams to the thread that owns their queue pair, without a hop: every socket of a device binds its
//! address and RoCEv2 port with `SO_REUSEPORT`, and a classic BPF program attached to the group picks the
//! socket from the BTH destination QPN. The device's own socket (its connection manager, QP1, and the queue
//! pairs it drives itself) is socket 0; a lane's queue pairs carry its number in their QPN:
//! `0x800000 | lane << 18 | n`. Sockets of a reuseport group are numbered in the order they joined, and a
//! number moves when a socket leaves, so the device keeps every lane's socket open for as long as it lives.

use std::os::fd::AsFd;

use nix::libc::{sock_filter, sock_fprog};

/// Lanes a device can have (the QPN field holds 5 bits of lane).
pub(crate) const MAX_LANES: usize = 31;
const LANE_BIT: u32 = 0x80_0000;
const LANE_SHIFT: u32 = 18;
const LANE_MASK: u32 = 0x1f;
/// Queue pairs a lane numbers before it wraps.
pub(crate) const LANE_QPNS: u32 = 1 << LANE_SHIFT;
/// QPNs below this belong to the device itself.
pub(crate) const DEVICE_QPN_LIMIT: u32 = LANE_BIT;

/// The QPN of a lane's `n`-th queue pair (lane 1..=MAX_LANES, n below [`LANE_QPNS`]).
pub(crate) fn lane_qpn(lane: usize, n: u32) -> u32 {
    LANE_BIT | ((lane as u32 & LANE_MASK) << LANE_SHIFT) | (n % LANE_QPNS)
}

/// The lane a QPN belongs to; 0: the device itself.
#[cfg(test)]
pub(crate) fn lane_of(qpn: u32) -> usize {
    if qpn & LANE_BIT != 0 { ((qpn >> LANE_SHIFT) & LANE_MASK) as usize } else { 0 }
}

/// The program: socket index = lane of the BTH destination QPN (bytes 5..8 of the UDP payload, which is
/// where the kernel runs a reuseport program), 0 for anything else — QP1, the device's queue pairs, runts.
fn program() -> [sock_filter; 7] {
    const LD_W_ABS: u16 = 0x20;
    const AND_K: u16 = 0x54;
    const RSH_K: u16 = 0x74;
    const JSET_K: u16 = 0x45;
    const RET_K: u16 = 0x06;
    const RET_A: u16 = 0x16;
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    [
        op(LD_W_ABS, 0, 0, 4), // A = BTH bytes 4..8 (reserved, destination QP)
        op(AND_K, 0, 0, 0x00ff_ffff),
        op(JSET_K, 1, 0, LANE_BIT), // a lane's QPN: on to its number
        op(RET_K, 0, 0, 0),
        op(RSH_K, 0, 0, LANE_SHIFT),
        op(AND_K, 0, 0, LANE_MASK),
        op(RET_A, 0, 0, 0),
    ]
}

/// Attaches the steering program to the reuseport group of `socket`.
pub(crate) fn attach(socket: &impl AsFd) -> std::io::Result<()> {
    let mut filter = program();
    let fprog = sock_fprog { len: filter.len() as u16, filter: filter.as_mut_ptr() };
    nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::AttachReusePortCbpf, &fprog)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, UdpSocket};
    use std::time::Duration;

    use super::*;

    fn member(addr: SocketAddr) -> UdpSocket {
        let s = crate::soft::udp::bind_shared(addr).expect("bind with SO_REUSEPORT");
        s.set_nonblocking(false).expect("blocking");
        s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        s
    }

    fn bth_to(qpn: u32) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x04; // RC SEND only
        p[5..8].copy_from_slice(&qpn.to_be_bytes()[1..]);
        p
    }

    #[test]
    fn qpns_name_their_lane() {
        for lane in 1..=MAX_LANES {
            for n in [0, 1, LANE_QPNS - 1] {
                let qpn = lane_qpn(lane, n);
                assert!((DEVICE_QPN_LIMIT..=crate::soft::wire::MASK_24).contains(&qpn));
                assert_eq!(lane_of(qpn), lane);
            }
        }
        for qpn in [1, 0x11, DEVICE_QPN_LIMIT - 1] {
            assert_eq!(lane_of(qpn), 0);
        }
    }

    /// The kernel, not our reading of it: datagrams sent to one port land on the socket of their lane.
    #[test]
    fn the_kernel_steers_each_datagram_to_its_lanes_socket() {
        let device = member("127.0.0.1:0".parse().expect("address"));
        let at = device.local_addr().expect("address");
        attach(&device).expect("attach the program");
        let lanes: Vec<UdpSocket> = (0..3).map(|_| member(at)).collect();
        let sender = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let cases = [(1, 0), (0x11, 0), (lane_qpn(1, 5), 1), (lane_qpn(2, 9), 2), (lane_qpn(3, 0), 3)];
        for round in 0..20u8 {
            for &(qpn, socket) in &cases {
                let mut p = bth_to(qpn);
                p[39] = round;
                sender.send_to(&p, at).expect("send");
                let receiver = if socket == 0 { &device } else { &lanes[socket - 1] };
                let mut buf = [0u8; 64];
                let n = receiver.recv(&mut buf).unwrap_or_else(|e| panic!("QPN {qpn:#x} not on socket {socket}: {e}"));
                assert_eq!(&buf[..n], &p[..]);
            }
        }
        // Nothing went astray.
        for s in std::iter::once(&device).chain(&lanes) {
            s.set_nonblocking(true).expect("non-blocking");
            assert!(s.recv(&mut [0u8; 64]).is_err());
        }
    }
}
