//! The machine's own ceiling for the soft provider: plain UDP over loopback moving the bytes an NVMe I/O moves,
//! with one blocking socket and one thread per side and the socket buffers the soft device uses — no RDMA, no
//! NVMe, nothing to retransmit. What the stack achieves is reported as a ratio of this, measured in the same run.
//!
//! - [`exchange`]: request/response at a given concurrency, shaped like a read (a 64-byte command, a
//!   4 KiB + 16-byte answer) or a write (4 KiB + 64 bytes in, 32 bytes back): exchanges per second, each
//!   side's CPU per exchange, and the round trip.
//! - [`stream`]: one-way datagrams of a given size with a credit every 32, like RC's coalesced ACKs: MiB/s.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Socket buffers of the soft device (`transport::soft::device::bind_udp`).
const SOCKET_BUFFER: usize = 8 << 20;
/// A lost datagram (never expected on loopback) is given up after this long and the exchange sent again.
const LOSS_TIMEOUT: Duration = Duration::from_millis(200);
const CREDIT_EVERY: u64 = 32;
const STREAM_WINDOW: u64 = 128;

#[derive(Debug, thiserror::Error)]
pub enum CeilingError {
    #[error("UDP socket on {addr}: {source}")]
    Socket { addr: SocketAddr, source: std::io::Error },
    #[error("the {0} thread failed")]
    Thread(&'static str),
}

/// What one exchange run measured.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ExchangeResult {
    pub request_bytes: usize,
    pub response_bytes: usize,
    pub concurrency: usize,
    pub seconds: f64,
    pub exchanges: u64,
    pub per_second: f64,
    /// CPU (user + system) of the requesting thread per exchange, µs.
    pub client_cpu_us: f64,
    /// CPU of the answering thread per exchange, µs.
    pub server_cpu_us: f64,
    /// Mean and median time from a request's send to its response's arrival, µs.
    pub rtt_mean_us: f64,
    pub rtt_p50_us: f64,
    /// Exchanges sent again after [`LOSS_TIMEOUT`] without an answer.
    pub resent: u64,
}

/// What one stream run measured.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StreamResult {
    pub datagram_bytes: usize,
    pub seconds: f64,
    pub mib_per_s: f64,
    pub sender_cpu_us_per_mib: f64,
    pub receiver_cpu_us_per_mib: f64,
}

fn socket(addr: SocketAddr) -> Result<UdpSocket, CeilingError> {
    let fail = |source| CeilingError::Socket { addr, source };
    let s = std::net::UdpSocket::bind(addr).map_err(fail)?;
    let fd = std::os::fd::AsFd::as_fd(&s);
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::RcvBuf, &SOCKET_BUFFER).map_err(|e| fail(e.into()))?;
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SndBuf, &SOCKET_BUFFER).map_err(|e| fail(e.into()))?;
    Ok(s)
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

/// Request/response between `client_addr` and `server_addr` (loopback addresses, port 0 for any) for `duration`,
/// keeping `concurrency` requests in flight.
pub fn exchange(
    client_addr: SocketAddr,
    server_addr: SocketAddr,
    request_bytes: usize,
    response_bytes: usize,
    concurrency: usize,
    duration: Duration,
) -> Result<ExchangeResult, CeilingError> {
    let concurrency = concurrency.max(1);
    let server = socket(server_addr)?;
    let client = socket(client_addr)?;
    let server_at = server.local_addr().map_err(|source| CeilingError::Socket { addr: server_addr, source })?;
    let client_at = client.local_addr().map_err(|source| CeilingError::Socket { addr: client_addr, source })?;
    // The server stops when the client says so with an empty datagram.
    server
        .set_read_timeout(Some(duration + Duration::from_secs(5)))
        .map_err(|source| CeilingError::Socket { addr: server_at, source })?;
    client.set_read_timeout(Some(LOSS_TIMEOUT)).map_err(|source| CeilingError::Socket { addr: client_at, source })?;
    let answering = std::thread::spawn(move || {
        let start = thread_cpu();
        let mut request = vec![0u8; 65536];
        let mut response = vec![0x5au8; response_bytes];
        let mut answered = 0u64;
        while let Ok((n, from)) = server.recv_from(&mut request) {
            if n == 0 {
                break;
            }
            // Echo the request's sequence number, as a CQE carries the command id.
            response[..8.min(response_bytes)].copy_from_slice(&request[..8.min(response_bytes)]);
            if server.send_to(&response, from).is_ok() {
                answered += 1;
            }
        }
        (answered, thread_cpu() - start)
    });
    let cpu_start = thread_cpu();
    let mut request = vec![0xa5u8; request_bytes.max(8)];
    let mut response = vec![0u8; 65536];
    // Slot i carries the numbers i, i + c, i + 2c, …: what it waits for and since when.
    let c = concurrency as u64;
    let mut waiting: Vec<(u64, Instant)> = Vec::with_capacity(concurrency);
    let mut rtts = Vec::with_capacity(1 << 16);
    let (mut done, mut resent) = (0u64, 0u64);
    let send = |number: u64, request: &mut Vec<u8>| {
        request[..8].copy_from_slice(&number.to_le_bytes());
        let _ = client.send_to(request, server_at);
    };
    let start = Instant::now();
    let deadline = start + duration;
    for slot in 0..c {
        waiting.push((slot, Instant::now()));
        send(slot, &mut request);
    }
    while Instant::now() < deadline {
        match client.recv(&mut response) {
            Ok(n) if n >= 8 => {
                let got = u64::from_le_bytes(response[..8].try_into().unwrap_or_default());
                let slot = &mut waiting[(got % c) as usize];
                if slot.0 != got {
                    continue; // the answer to a request sent again
                }
                done += 1;
                if rtts.len() < rtts.capacity() {
                    rtts.push(slot.1.elapsed().as_nanos() as u64);
                }
                *slot = (got + c, Instant::now());
                send(got + c, &mut request);
            }
            Ok(_) => {}
            Err(_) => {
                for slot in waiting.iter_mut().filter(|s| s.1.elapsed() >= LOSS_TIMEOUT) {
                    slot.1 = Instant::now();
                    send(slot.0, &mut request);
                    resent += 1;
                }
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let client_cpu = thread_cpu() - cpu_start;
    let _ = client.send_to(&[], server_at);
    let (_answered, server_cpu) = answering.join().map_err(|_| CeilingError::Thread("answering"))?;
    rtts.sort_unstable();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / done.max(1) as f64;
    Ok(ExchangeResult {
        request_bytes,
        response_bytes,
        concurrency,
        seconds,
        exchanges: done,
        per_second: done as f64 / seconds,
        client_cpu_us: per(client_cpu),
        server_cpu_us: per(server_cpu),
        rtt_mean_us: rtts.iter().sum::<u64>() as f64 / rtts.len().max(1) as f64 / 1e3,
        rtt_p50_us: rtts.get(rtts.len() / 2).copied().unwrap_or_default() as f64 / 1e3,
        resent,
    })
}

/// Datagrams of `datagram_bytes` from `sender_addr` to `receiver_addr` for `duration`, at most
/// [`STREAM_WINDOW`] ahead of the receiver's credits.
pub fn stream(
    sender_addr: SocketAddr,
    receiver_addr: SocketAddr,
    datagram_bytes: usize,
    duration: Duration,
) -> Result<StreamResult, CeilingError> {
    let receiver = socket(receiver_addr)?;
    let sender = socket(sender_addr)?;
    let receiver_at = receiver.local_addr().map_err(|source| CeilingError::Socket { addr: receiver_addr, source })?;
    let sender_at = sender.local_addr().map_err(|source| CeilingError::Socket { addr: sender_addr, source })?;
    receiver
        .set_read_timeout(Some(LOSS_TIMEOUT))
        .map_err(|source| CeilingError::Socket { addr: receiver_at, source })?;
    sender.set_read_timeout(Some(LOSS_TIMEOUT)).map_err(|source| CeilingError::Socket { addr: sender_at, source })?;
    let receiving = std::thread::spawn(move || {
        let start = thread_cpu();
        let mut buf = vec![0u8; 65536];
        let mut got = 0u64;
        loop {
            match receiver.recv(&mut buf) {
                Ok(0) => break,
                Ok(_) => {
                    got += 1;
                    if got % CREDIT_EVERY == 0 {
                        let _ = receiver.send_to(&got.to_le_bytes(), sender_at);
                    }
                }
                // A lost datagram: credit what arrived so the sender goes on.
                Err(_) => {
                    let _ = receiver.send_to(&got.to_le_bytes(), sender_at);
                }
            }
        }
        (got, thread_cpu() - start)
    });
    let cpu_start = thread_cpu();
    let payload = vec![0xa5u8; datagram_bytes];
    let mut credit = [0u8; 8];
    let (mut sent, mut credited) = (0u64, 0u64);
    let start = Instant::now();
    let deadline = start + duration;
    while Instant::now() < deadline {
        while sent - credited < STREAM_WINDOW {
            if sender.send_to(&payload, receiver_at).is_ok() {
                sent += 1;
            }
        }
        if let Ok(8) = sender.recv(&mut credit) {
            credited = credited.max(u64::from_le_bytes(credit));
            // Datagrams lost on the way are not waited for.
            credited = credited.min(sent);
        } else {
            credited = sent;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let sender_cpu = thread_cpu() - cpu_start;
    let _ = sender.send_to(&[], receiver_at);
    let (received, receiver_cpu) = receiving.join().map_err(|_| CeilingError::Thread("receiving"))?;
    let mib = received as f64 * datagram_bytes as f64 / (1 << 20) as f64;
    Ok(StreamResult {
        datagram_bytes,
        seconds,
        mib_per_s: mib / seconds,
        sender_cpu_us_per_mib: sender_cpu.as_secs_f64() * 1e6 / mib.max(1e-9),
        receiver_cpu_us_per_mib: receiver_cpu.as_secs_f64() * 1e6 / mib.max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(a: &str) -> SocketAddr {
        a.parse().expect("address")
    }

    #[test]
    fn exchanges_move_what_they_say() {
        let r =
            exchange(at("127.0.0.1:0"), at("127.0.0.1:0"), 64, 4112, 4, Duration::from_millis(300)).expect("exchange");
        assert!(r.exchanges > 100, "{r:?}");
        assert!(r.rtt_p50_us > 0.0 && r.rtt_mean_us >= r.rtt_p50_us * 0.1, "{r:?}");
        assert!(r.client_cpu_us > 0.0 && r.server_cpu_us > 0.0, "{r:?}");
    }

    #[test]
    fn a_stream_counts_what_arrived() {
        let r = stream(at("127.0.0.1:0"), at("127.0.0.1:0"), 4096, Duration::from_millis(300)).expect("stream");
        assert!(r.mib_per_s > 10.0, "{r:?}");
    }
}
