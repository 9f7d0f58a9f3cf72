//! The soft provider's UDP: sockets bound as rxe's peers expect them (unfragmented, identification 0, large
//! buffers), the IP header an ICRC is computed over, and datagrams in batches — one `recvmmsg` takes up to
//! [`BATCH`] datagrams, one `sendmmsg` sends what a flush produced for one socket, instead of a system call
//! per packet. Buffers and headers are allocated once per owner; sockets stay non-blocking (tokio's readiness
//! decides when to call).

use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};
use tokio::io::Interest;

use super::wire::icrc::{self, IpHeader};

/// Datagrams per system call.
pub(crate) const BATCH: usize = 64;
/// Receive buffer per datagram: the largest RoCEv2 packet (4 096 bytes of payload, BTH, the largest extension
/// headers, ICRC) fits with room to spare; anything longer is counted as truncated and dropped.
pub(crate) const SLOT: usize = 8192;

/// What one datagram of a received batch is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Received {
    pub len: usize,
    pub from: Option<SocketAddr>,
    /// Longer than [`SLOT`]: the bytes are cut short and must not be used.
    pub truncated: bool,
}

pub(crate) struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    headers: MultiHeaders<SockaddrStorage>,
    received: Vec<Received>,
}

impl RecvBatch {
    pub fn new() -> RecvBatch {
        RecvBatch {
            bufs: (0..BATCH).map(|_| vec![0u8; SLOT]).collect(),
            headers: MultiHeaders::preallocate(BATCH, None),
            received: Vec::with_capacity(BATCH),
        }
    }

    /// Takes what is waiting on `socket` without blocking (up to [`BATCH`] datagrams); `WouldBlock` when none.
    pub fn recv(&mut self, socket: &impl AsFd) -> std::io::Result<usize> {
        self.received.clear();
        let mut slices: Vec<[IoSliceMut<'_>; 1]> = self.bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
        let results =
            recvmmsg(socket.as_fd().as_raw_fd(), &mut self.headers, slices.iter_mut(), MsgFlags::MSG_DONTWAIT, None)
                .map_err(std::io::Error::from)?;
        for r in results {
            self.received.push(Received {
                len: r.bytes.min(SLOT),
                from: r.address.and_then(socket_addr),
                truncated: r.bytes > SLOT || r.flags.contains(MsgFlags::MSG_TRUNC),
            });
        }
        Ok(self.received.len())
    }

    /// Datagram `i` of the last batch.
    pub fn get(&self, i: usize) -> Option<(Received, &[u8])> {
        let r = *self.received.get(i)?;
        Some((r, &self.bufs[i][..r.len]))
    }
}

pub(crate) struct SendBatch {
    headers: MultiHeaders<SockaddrStorage>,
}

impl SendBatch {
    pub fn new() -> SendBatch {
        SendBatch { headers: MultiHeaders::preallocate(BATCH, None) }
    }

    /// Sends up to [`BATCH`] datagrams from the front of `datagrams` without blocking; how many went.
    /// `WouldBlock` when the socket buffer is full.
    pub fn send(&mut self, socket: &impl AsFd, datagrams: &[(SocketAddr, &[u8])]) -> std::io::Result<usize> {
        let datagrams = &datagrams[..datagrams.len().min(BATCH)];
        let addrs: Vec<Option<SockaddrStorage>> =
            datagrams.iter().map(|(to, _)| Some(SockaddrStorage::from(*to))).collect();
        let slices: Vec<[IoSlice<'_>; 1]> = datagrams.iter().map(|(_, bytes)| [IoSlice::new(bytes)]).collect();
        let results =
            sendmmsg(socket.as_fd().as_raw_fd(), &mut self.headers, slices.iter(), addrs, [], MsgFlags::MSG_DONTWAIT)
                .map_err(std::io::Error::from)?;
        Ok(results.count())
    }
}

fn socket_addr(s: SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    s.as_sockaddr_in6().map(|v6| SocketAddr::from((v6.ip(), v6.port())))
}

/// Sends `datagrams` from `socket` in batches, waiting while its buffer is full; (sent, dropped). A datagram
/// the kernel refuses (an unreachable peer) is dropped: RC retransmission covers the loss.
pub(crate) async fn send_all(
    socket: &tokio::net::UdpSocket,
    batch: &mut SendBatch,
    datagrams: &[(SocketAddr, &[u8])],
) -> (u64, u64) {
    let (mut i, mut sent, mut dropped) = (0, 0u64, 0u64);
    while i < datagrams.len() {
        match socket.try_io(Interest::WRITABLE, || batch.send(socket, &datagrams[i..])) {
            Ok(n) if n > 0 => {
                i += n;
                sent += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if socket.writable().await.is_err() {
                    dropped += (datagrams.len() - i) as u64;
                    break;
                }
            }
            other => {
                // The first datagram of the batch was refused.
                tracing::trace!(dst = %datagrams[i].0, "send: {other:?}");
                i += 1;
                dropped += 1;
            }
        }
    }
    (sent, dropped)
}

/// Errors a UDP socket reports for one datagram or an ICMP message about an earlier one; anything else means
/// the socket itself is broken.
pub(crate) fn socket_error_is_transient(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        kind,
        WouldBlock
            | Interrupted
            | TimedOut
            | ConnectionRefused
            | ConnectionReset
            | HostUnreachable
            | NetworkUnreachable
            | NetworkDown
            | AddrNotAvailable
            | OutOfMemory
    )
}

/// The IP header the ICRC covers, as the kernel builds it for our datagrams: identification 0, which `bind`'s
/// path MTU discovery setting guarantees for what we send. A receiving socket cannot see the real header, so a
/// kernel peer's identification is recovered from its ICRC (`on_datagram`).
pub(crate) fn ip_header(src: IpAddr, dst: IpAddr, roce_len_without_icrc: usize) -> IpHeader {
    let udp_len = (8 + roce_len_without_icrc + icrc::ICRC_LEN) as u16;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => IpHeader::ipv4(s, d, 0, udp_len),
        (s, d) => IpHeader::ipv6(to_v6(s), to_v6(d), udp_len),
    }
}

fn to_v6(a: IpAddr) -> std::net::Ipv6Addr {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    bind_with(addr, false)
}

/// A socket of a device's reuseport group (`SO_REUSEPORT`; see `steering`), otherwise as [`bind`].
pub(crate) fn bind_shared(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    bind_with(addr, true)
}

/// The first socket of a device's reuseport group, with the steering program attached. The address must be
/// free: a plain bind is tried first, so that a second device (or process) on the same address and port is
/// refused as before rather than joining the group. `Ok(None)`: the kernel took no steering program, and the
/// device serves without lanes (from the plain socket).
pub(crate) fn bind_steered(addr: SocketAddr) -> std::io::Result<(std::net::UdpSocket, bool)> {
    let probe = bind(addr)?;
    let bound = probe.local_addr()?;
    drop(probe);
    let shared = bind_shared(bound)?;
    match super::steering::attach(&shared) {
        Ok(()) => Ok((shared, true)),
        Err(e) => {
            tracing::warn!(%bound, "no reuseport steering ({e}): queue pairs stay on the device's thread");
            drop(shared);
            Ok((bind(bound)?, false))
        }
    }
}

fn bind_with(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv4() {
        // The ICRC covers the IPv4 identification, which the kernel picks as it sends. With path MTU discovery
        // "probe" (DF set, never fragmented) an unconnected socket's datagrams go out with identification 0 —
        // the header `ip_header` computes the ICRC over. Without it the kernel numbers them and every ICRC we
        // send is wrong for the header on the wire: rxe drops all of it. "Probe" rather than "do": the device's
        // MTU governs, as for rxe, not a path MTU an ICMP message (perhaps forged) would lower.
        rustix::net::sockopt::set_ip_mtu_discover(&socket, rustix::net::sockopt::Ipv4PathMtuDiscovery::PROBE)?;
    }
    // Bursts of a window of MTU-sized packets must not overflow the default socket buffers.
    let _ = socket.set_recv_buffer_size(8 << 20);
    let _ = socket.set_send_buffer_size(8 << 20);
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Waits until `socket` is readable and takes what is waiting into `batch` (`WouldBlock`: nothing after all).
pub(crate) async fn recv_batch(socket: &tokio::net::UdpSocket, batch: &mut RecvBatch) -> std::io::Result<usize> {
    socket.readable().await?;
    socket.try_io(Interest::READABLE, || batch.recv(socket))
}

/// The RoCEv2 packet of a received datagram, if its ICRC holds for the header it arrived with. Our peers send
/// with IPv4 identification 0; a kernel peer's identification is recovered from the ICRC.
pub(crate) fn open_packet<'a>(
    bytes: &'a [u8],
    from: SocketAddr,
    local: IpAddr,
    solver: &mut icrc::IdentificationSolver,
) -> Option<super::wire::PacketRepr<'a>> {
    let ip = ip_header(from.ip(), local, bytes.len().saturating_sub(icrc::ICRC_LEN));
    let valid = icrc::verify(&ip, from.port(), bytes).is_ok()
        || (from.is_ipv4() && solver.solve(&ip, from.port(), bytes).is_some());
    if !valid {
        return None;
    }
    super::wire::PacketRepr::parse(bytes).ok().map(|(packet, _)| packet)
}

/// Appends the ICRC for the header a datagram leaves with (from `local`:`from_port` to `dst`); false when it
/// cannot be sealed (it must not be sent).
pub(crate) fn seal(bytes: &mut Vec<u8>, local: IpAddr, from_port: u16, dst: SocketAddr) -> bool {
    let ip = ip_header(local, dst.ip(), bytes.len());
    icrc::append(&ip, from_port, bytes).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_goes_out_and_comes_back_whole() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = rx.local_addr().expect("addr");
        let payloads: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 100 + i as usize * 400]).collect();
        let datagrams: Vec<(SocketAddr, &[u8])> = payloads.iter().map(|p| (to, p.as_slice())).collect();
        assert_eq!(SendBatch::new().send(&tx, &datagrams).expect("sendmmsg"), 10);
        // One more, longer than a slot: it arrives truncated and says so.
        tx.send_to(&vec![7u8; SLOT + 100], to).expect("send");
        let mut batch = RecvBatch::new();
        let mut got = Vec::new();
        while got.len() < 11 {
            match batch.recv(&rx) {
                Ok(n) => got.extend((0..n).map(|i| batch.get(i).map(|(r, b)| (r, b.to_vec())).expect("datagram"))),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("recvmmsg: {e}"),
            }
        }
        for (i, (r, bytes)) in got[..10].iter().enumerate() {
            assert_eq!(bytes, &payloads[i]);
            assert_eq!(r.from, Some(tx.local_addr().expect("addr")));
            assert!(!r.truncated);
        }
        assert!(got[10].0.truncated);
        assert!(matches!(batch.recv(&rx), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));
    }

    #[test]
    fn which_socket_errors_are_fatal() {
        for transient in [
            std::io::ErrorKind::WouldBlock,
            std::io::ErrorKind::ConnectionRefused,
            std::io::ErrorKind::NetworkUnreachable,
        ] {
            assert!(socket_error_is_transient(transient), "{transient:?}");
        }
        for fatal in [
            std::io::ErrorKind::InvalidInput,
            std::io::ErrorKind::PermissionDenied,
            std::io::ErrorKind::Unsupported,
            std::io::ErrorKind::Other,
        ] {
            assert!(!socket_error_is_transient(fatal), "{fatal:?}");
        }
    }
}
