//! The soft provider's UDP: sockets bound as rxe's peers expect them (unfragmented, identification 0, large
//! buffers), the IP header an ICRC is computed over, and datagrams in batches — one `recvmmsg` takes up to
//! [`BATCH`] datagrams, one `sendmmsg` sends what a flush produced for one socket, instead of a system call
//! per packet. Buffers and headers are allocated once per owner; sockets stay non-blocking (tokio's readiness
//! decides when to call).

use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg, sendmsg,
};
use tokio::io::Interest;

use super::data_path::Datagram;
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
    /// Longer than its slot: the bytes are cut short and must not be used.
    pub truncated: bool,
    /// A buffer the kernel coalesced (UDP GRO): datagrams of this length, the last perhaps shorter.
    pub segment: Option<usize>,
}

/// A coalesced buffer holds at most 64 KiB.
const GRO_SLOT: usize = 65_536;
/// Buffers per system call when the socket coalesces (each up to [`GRO_SLOT`]).
const GRO_BATCH: usize = 32;

pub(crate) struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    headers: MultiHeaders<SockaddrStorage>,
    received: Vec<Received>,
    /// Room for control messages per buffer (GRO's segment size), when the socket coalesces.
    cmsg_space: Option<Vec<u8>>,
}

impl RecvBatch {
    pub fn new() -> RecvBatch {
        RecvBatch {
            bufs: (0..BATCH).map(|_| vec![0u8; SLOT]).collect(),
            headers: MultiHeaders::preallocate(BATCH, None),
            received: Vec::with_capacity(BATCH),
            cmsg_space: None,
        }
    }

    /// A batch for a socket with UDP GRO on ([`enable_gro`]): slots that hold a coalesced buffer, and room for
    /// the segment size the kernel reports with it.
    pub fn with_gro() -> RecvBatch {
        RecvBatch {
            bufs: (0..GRO_BATCH).map(|_| vec![0u8; GRO_SLOT]).collect(),
            headers: MultiHeaders::preallocate(GRO_BATCH, Some(nix::cmsg_space!(i32))),
            received: Vec::with_capacity(GRO_BATCH),
            cmsg_space: Some(nix::cmsg_space!(i32)),
        }
    }

    /// Takes what is waiting on `socket` without blocking (up to a batch of buffers); `WouldBlock` when none.
    /// Returns the number of buffers; [`RecvBatch::datagrams`] gives the datagrams in them.
    pub fn recv(&mut self, socket: &impl AsFd) -> std::io::Result<usize> {
        // (Only headers a previous call filled have been shrunk.)
        if let (Some(space), false) = (&self.cmsg_space, self.received.is_empty()) {
            // The kernel shrinks each header's control length to what it delivered (0 without a control
            // message) and nix does not restore it, so a reused header would lose the next segment size: fresh
            // headers per call (one small allocation per system call, not per datagram).
            self.headers = MultiHeaders::preallocate(self.bufs.len(), Some(space.clone()));
        }
        self.received.clear();
        let slot = self.bufs[0].len();
        let mut slices: Vec<[IoSliceMut<'_>; 1]> = self.bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
        let results =
            recvmmsg(socket.as_fd().as_raw_fd(), &mut self.headers, slices.iter_mut(), MsgFlags::MSG_DONTWAIT, None)
                .map_err(std::io::Error::from)?;
        for r in results {
            let segment = r.cmsgs().ok().and_then(|mut c| {
                c.find_map(|m| match m {
                    ControlMessageOwned::UdpGroSegments(size) => usize::try_from(size).ok().filter(|&s| s > 0),
                    _ => None,
                })
            });
            self.received.push(Received {
                len: r.bytes.min(slot),
                from: r.address.and_then(socket_addr),
                // Control data cut short may have hidden a segment size: the buffer cannot be cut up safely.
                truncated: r.bytes > slot || r.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC),
                segment,
            });
        }
        Ok(self.received.len())
    }

    /// The datagrams of the last batch, coalesced buffers cut back into their datagrams.
    pub fn datagrams(&self) -> impl Iterator<Item = (Received, &[u8])> {
        self.received.iter().zip(&self.bufs).flat_map(|(r, buf)| {
            let segment = r.segment.unwrap_or(r.len).max(1);
            // An empty datagram is a datagram too (counted, and dropped by the caller).
            let count = r.len.div_ceil(segment).max(1);
            (0..count).map(move |k| {
                let chunk = &buf[(k * segment).min(r.len)..((k + 1) * segment).min(r.len)];
                (Received { len: chunk.len(), segment: None, ..*r }, chunk)
            })
        })
    }

    /// Buffers of the last batch that the kernel had coalesced.
    pub fn coalesced(&self) -> usize {
        self.received.iter().filter(|r| r.segment.is_some()).count()
    }
}

/// Asks the kernel to coalesce datagrams of one flow for `socket` (UDP GRO); false where it cannot.
pub(crate) fn enable_gro(socket: &impl AsFd) -> bool {
    nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::UdpGroSegment, &true).is_ok()
}

pub(crate) struct SendBatch {
    headers: MultiHeaders<SockaddrStorage>,
    /// The socket takes UDP GSO sends ([`transmit`]); cleared the first time the kernel refuses one.
    gso: bool,
}

impl SendBatch {
    pub fn new() -> SendBatch {
        SendBatch { headers: MultiHeaders::preallocate(BATCH, None), gso: true }
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
    numbered_ip_header(src, dst, roce_len_without_icrc, 0)
}

/// [`ip_header`] with IPv4 identification `id` (IPv6 has none).
fn numbered_ip_header(src: IpAddr, dst: IpAddr, roce_len_without_icrc: usize, id: u16) -> IpHeader {
    let udp_len = (8 + roce_len_without_icrc + icrc::ICRC_LEN) as u16;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => IpHeader::ipv4(s, d, id, udp_len),
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
    if bytes.len() < icrc::ICRC_LEN {
        return None;
    }
    let (packet, carried) = bytes.split_at(bytes.len() - icrc::ICRC_LEN);
    let carried = u32::from_le_bytes(carried.try_into().ok()?);
    let ip = ip_header(from.ip(), local, packet.len());
    // One CRC either way: at identification 0 it holds for a datagram sent alone; for the later segments of a
    // GSO send (numbered 1, 2, …) and a kernel peer's, the difference gives the identification.
    let at_zero = icrc::compute(&ip, from.port(), packet).ok()?;
    let valid =
        at_zero == carried || (from.is_ipv4() && solver.solve_difference(packet.len(), at_zero ^ carried).is_some());
    if !valid {
        return None;
    }
    super::wire::PacketRepr::parse(bytes).ok().map(|(packet, _)| packet)
}

/// Appends the ICRC for the header a datagram leaves with (from `local`:`from_port` to `dst`); false when it
/// cannot be sealed (it must not be sent).
pub(crate) fn seal(bytes: &mut Vec<u8>, local: IpAddr, from_port: u16, dst: SocketAddr) -> bool {
    seal_segment(bytes, local, from_port, dst, 0)
}

/// [`seal`] for segment `index` of a GSO send: the kernel gives the segments of one buffer consecutive IPv4
/// identifications from the buffer's (0, as for every datagram we send).
fn seal_segment(bytes: &mut Vec<u8>, local: IpAddr, from_port: u16, dst: SocketAddr, index: u16) -> bool {
    let ip = numbered_ip_header(local, dst.ip(), bytes.len(), index);
    icrc::append(&ip, from_port, bytes).is_ok()
}

/// The most UDP payload one GSO buffer carries (IPv4 allows 65 507 bytes) and the most segments.
const GSO_MAX_BYTES: usize = 65_000;
const GSO_MAX_SEGMENTS: usize = 64;

/// The next run of `datagrams` (unsealed, from the front) that the kernel can send as one GSO buffer: one
/// destination queue pair, every datagram of the run the same length but the last, which may be shorter — a
/// read's data WRITE with its response SEND, or the middle packets of a long WRITE with its last. Returns its
/// length. One queue pair, not just one address: a buffer that arrives whole (loopback, GRO) is steered to a
/// lane by its first datagram's queue pair, so another queue pair's datagram in it would reach the wrong lane.
fn gso_run(datagrams: &[Datagram]) -> usize {
    let Some(first) = datagrams.first() else { return 0 };
    let segment = first.bytes.len() + icrc::ICRC_LEN;
    let qp = dest_qp(&first.bytes);
    let mut total = segment;
    let mut n = 1;
    for d in &datagrams[1..] {
        let len = d.bytes.len() + icrc::ICRC_LEN;
        if d.dst != first.dst
            || qp.is_none()
            || dest_qp(&d.bytes) != qp
            || len > segment
            || n == GSO_MAX_SEGMENTS
            || total + len > GSO_MAX_BYTES
        {
            break;
        }
        n += 1;
        total += len;
        if len < segment {
            break;
        }
    }
    n
}

/// The destination queue pair of a RoCEv2 packet (BTH bytes 5..8).
fn dest_qp(packet: &[u8]) -> Option<&[u8]> {
    packet.get(super::wire::bth::field::DEST_QP)
}

/// Seals the datagrams of a flush leaving `local` (a lane's socket, on the device's port) and sends them:
/// each run that GSO can carry as one buffer by one `sendmsg` with `UDP_SEGMENT` — one pass through the
/// kernel's stack for a read's data and response, or for fifteen packets of a long transfer — and the rest by
/// `sendmmsg`. A kernel or route that refuses GSO turns it off for the batch's socket; the run is then sent
/// as single datagrams.
pub(crate) async fn transmit(
    socket: &tokio::net::UdpSocket,
    batch: &mut SendBatch,
    local: SocketAddr,
    mut datagrams: Vec<Datagram>,
) -> Transmitted {
    let (mut sent, mut dropped, mut gso_buffers) = (0u64, 0u64, 0u64);
    let mut singles: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    let mut rest = &mut datagrams[..];
    while !rest.is_empty() {
        let n = if batch.gso { gso_run(rest) } else { 1 };
        let (run, after) = rest.split_at_mut(n);
        rest = after;
        if n == 1 {
            dropped += seal_single(&mut run[0], local, &mut singles);
            continue;
        }
        // Order holds: what came before the run leaves before it.
        let (s, x) = send_sealed(socket, batch, &singles).await;
        (sent, dropped) = (sent + s, dropped + x);
        singles.clear();
        let mut sealed = true;
        for (k, d) in run.iter_mut().enumerate() {
            sealed &= seal_segment(&mut d.bytes, local.ip(), local.port(), d.dst, k as u16);
        }
        if !sealed {
            dropped += n as u64;
            continue;
        }
        match send_gso(socket, run).await {
            Ok(()) => {
                sent += n as u64;
                gso_buffers += 1;
            }
            Err(e) => match gso_refused(&e) {
                Some(refusal) => {
                    if refusal == Refusal::Always {
                        tracing::debug!(%local, "UDP GSO unavailable ({e}): single datagrams from now on");
                        batch.gso = false;
                    }
                    // Sealed for identifications 1, 2, …: sealed again for 0, as single datagrams.
                    for d in run.iter_mut() {
                        d.bytes.truncate(d.bytes.len() - icrc::ICRC_LEN);
                        dropped += seal_single(d, local, &mut singles);
                    }
                }
                None => {
                    tracing::trace!(dst = %run[0].dst, "GSO send: {e}");
                    dropped += n as u64;
                }
            },
        }
    }
    let (s, x) = send_sealed(socket, batch, &singles).await;
    Transmitted { sent: sent + s, dropped: dropped + x, gso_buffers }
}

/// What [`transmit`] did, in datagrams, and the GSO buffers that carried some of them.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Transmitted {
    pub sent: u64,
    pub dropped: u64,
    pub gso_buffers: u64,
}

async fn send_sealed(
    socket: &tokio::net::UdpSocket,
    batch: &mut SendBatch,
    sealed: &[(SocketAddr, Vec<u8>)],
) -> (u64, u64) {
    if sealed.is_empty() {
        return (0, 0);
    }
    let datagrams: Vec<(SocketAddr, &[u8])> = sealed.iter().map(|(to, bytes)| (*to, bytes.as_slice())).collect();
    send_all(socket, batch, &datagrams).await
}

/// One GSO buffer: the run's datagrams gathered, cut by the kernel at the first one's length.
async fn send_gso(socket: &tokio::net::UdpSocket, run: &[Datagram]) -> std::io::Result<()> {
    let segment = run[0].bytes.len() as u16;
    let slices: Vec<IoSlice<'_>> = run.iter().map(|d| IoSlice::new(&d.bytes)).collect();
    let to = SockaddrStorage::from(run[0].dst);
    loop {
        let cmsgs = [ControlMessage::UdpGsoSegments(&segment)];
        let result = socket.try_io(Interest::WRITABLE, || {
            sendmsg(socket.as_fd().as_raw_fd(), &slices, &cmsgs, MsgFlags::MSG_DONTWAIT, Some(&to))
                .map_err(std::io::Error::from)
        });
        match result {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => socket.writable().await?,
            Err(e) => return Err(e),
        }
    }
}

/// Seals a datagram for sending alone and queues it; 1 if it could not be sealed (dropped), else 0.
fn seal_single(d: &mut Datagram, local: SocketAddr, singles: &mut Vec<(SocketAddr, Vec<u8>)>) -> u64 {
    if seal(&mut d.bytes, local.ip(), local.port(), d.dst) {
        singles.push((d.dst, std::mem::take(&mut d.bytes)));
        0
    } else {
        1
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// This run only (a segment above the route's MTU, which an MTU change may have lowered).
    ThisRun,
    /// The kernel or route cannot segment for us at all (no UDP GSO, no checksum offload).
    Always,
}

/// Whether an error says the kernel would not segment the run (rather than that sending failed).
fn gso_refused(e: &std::io::Error) -> Option<Refusal> {
    use nix::errno::Errno;
    match Errno::from_raw(e.raw_os_error()?) {
        Errno::EINVAL => Some(Refusal::ThisRun),
        Errno::EIO | Errno::ENOPROTOOPT | Errno::EOPNOTSUPP => Some(Refusal::Always),
        _ => None,
    }
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
                Ok(_) => got.extend(batch.datagrams().map(|(r, b)| (r, b.to_vec()))),
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

    /// Runs never mix queue pairs (their datagrams may belong to different lanes of the peer) nor
    /// destinations, and end at a shorter datagram.
    #[test]
    fn a_gso_run_is_one_queue_pair_of_one_destination() {
        let to: SocketAddr = "127.0.0.1:4791".parse().unwrap();
        let d = |len: usize, qp: u8| {
            let mut bytes = vec![0u8; len];
            if let Some(b) = bytes.get_mut(7) {
                *b = qp;
            }
            Datagram { dst: to, bytes, source_port: None }
        };
        assert_eq!(gso_run(&[d(100, 1), d(100, 1), d(40, 1), d(100, 1)]), 3);
        assert_eq!(gso_run(&[d(100, 1), d(100, 2), d(40, 2)]), 1, "another queue pair");
        assert_eq!(gso_run(&[d(100, 1), d(120, 1)]), 1, "a longer one");
        assert_eq!(gso_run(&[d(4, 1), d(4, 1)]), 1, "too short for a BTH");
        let mut elsewhere = d(100, 1);
        elsewhere.dst = "127.0.0.2:4791".parse().unwrap();
        assert_eq!(gso_run(&[d(100, 1), elsewhere]), 1, "another destination");
        let long: Vec<Datagram> = (0..40).map(|_| d(4112, 1)).collect();
        assert_eq!(gso_run(&long), 15, "at most 65 000 bytes");
    }

    /// A long WRITE's last packets and its response go as one GSO buffer (segments numbered 0, 1, 2 in their
    /// ICRCs) and come back through GRO as the same three datagrams, each whole; a datagram for another
    /// destination goes alone.
    #[tokio::test]
    async fn a_gso_run_comes_back_as_its_datagrams_through_gro() {
        let rx = bind("127.0.0.1:0".parse().unwrap()).expect("bind");
        assert!(enable_gro(&rx), "UDP GRO");
        let tx = tokio::net::UdpSocket::from_std(bind("127.0.0.1:0".parse().unwrap()).expect("bind")).unwrap();
        let (to, from) = (rx.local_addr().unwrap(), tx.local_addr().unwrap());
        // Bytes 5..8 are the BTH's destination queue pair.
        let datagram = |fill: u8, len: usize, qp: u8| {
            let mut bytes = vec![fill; len];
            bytes[5..8].copy_from_slice(&[0, 0, qp]);
            Datagram { dst: to, bytes, source_port: None }
        };
        // One run [4124, 4124, 28] for queue pair 0x42; then a lone datagram to another port.
        let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut lone = datagram(9, 100, 0x42);
        lone.dst = other.local_addr().unwrap();
        // First a datagram of its own: a buffer that comes with no control message must not cost the next
        // one its segment size.
        let mut batch = RecvBatch::with_gro();
        tx.send_to(&[7u8; 40], to).await.expect("send");
        loop {
            match batch.recv(&rx) {
                Ok(_) => break assert_eq!(batch.datagrams().map(|(r, _)| r.len).collect::<Vec<_>>(), vec![40]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("recvmmsg: {e}"),
            }
        }
        let out = vec![datagram(1, 4124, 0x42), datagram(2, 4124, 0x42), datagram(3, 28, 0x42), lone];
        let done = transmit(&tx, &mut SendBatch::new(), from, out).await;
        assert_eq!((done.sent, done.dropped, done.gso_buffers), (4, 0, 1));
        let (mut got, mut coalesced) = (Vec::new(), 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < 3 && std::time::Instant::now() < deadline {
            match batch.recv(&rx) {
                Ok(_) => {
                    coalesced += batch.coalesced();
                    got.extend(batch.datagrams().map(|(r, b)| (r, b.to_vec())));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("recvmmsg: {e}"),
            }
        }
        let lens: Vec<usize> = got.iter().map(|(r, _)| r.len).collect();
        assert_eq!(lens, vec![4128, 4128, 32]);
        assert!(coalesced >= 1, "the kernel handed the run up coalesced");
        let mut solver = icrc::IdentificationSolver::new();
        for (k, (r, bytes)) in got.iter().enumerate() {
            assert_eq!(r.from, Some(from));
            assert!(bytes[8..bytes.len() - 4].iter().all(|&b| b == k as u8 + 1));
            let ip = ip_header(from.ip(), to.ip(), bytes.len() - icrc::ICRC_LEN);
            assert_eq!(solver.solve(&ip, from.port(), bytes), Some(k as u16), "segment {k}'s identification");
        }
    }
}
