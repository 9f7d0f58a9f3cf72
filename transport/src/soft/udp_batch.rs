//! Datagrams in batches: one `recvmmsg` takes up to [`BATCH`] datagrams, one `sendmmsg` sends what a flush
//! produced for one socket — instead of a system call per packet. Buffers and headers are allocated once per
//! device; the socket stays non-blocking (tokio's readiness decides when to call).

use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};

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
}
