//! Classic pcap files of RoCEv2 traffic: reading captures (the kernel's, in `shared/vectors`) and writing our
//! own, so a soft device's traffic can be opened in Wireshark or tcpdump. Only what RoCEv2 needs: Ethernet
//! (linktype 1) or raw IP (linktype 101), IPv4 or IPv6, UDP to port 4791.

use std::net::IpAddr;

use super::wire::ROCEV2_UDP_PORT;
use super::wire::icrc::{IPV4_HEADER_LEN, IPV6_HEADER_LEN, IpHeader, UDP_HEADER_LEN};

/// Why a capture could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PcapError {
    #[error("not a classic pcap file (magic {0:#010x})")]
    Magic(u32),
    #[error("pcap link type {0} (Ethernet 1 and raw IP 101 are read)")]
    LinkType(u32),
    #[error("record {index} at byte {offset} runs past the end of the file")]
    Truncated { index: usize, offset: usize },
}

/// One RoCEv2 datagram found in a capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// Record number in the file, from 1 (as tcpdump and Wireshark count).
    pub record: usize,
    pub timestamp_us: u64,
    pub ip: IpHeader,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub udp_src: u16,
    /// The UDP payload: the RoCEv2 packet including its ICRC.
    pub payload: Vec<u8>,
}

const LINKTYPE_ETHERNET: u32 = 1;
const LINKTYPE_RAW: u32 = 101;

/// Every UDP datagram to port 4791 in a classic pcap (either byte order, µs or ns timestamps). Frames that are
/// not IPv4/IPv6 UDP to 4791, or are cut short, are skipped: a capture may hold anything.
pub fn read_rocev2(file: &[u8]) -> Result<Vec<Datagram>, PcapError> {
    let word = |b: &[u8], le: bool| {
        let a: [u8; 4] = b.try_into().expect("4 bytes");
        if le { u32::from_le_bytes(a) } else { u32::from_be_bytes(a) }
    };
    let magic = file.get(0..4).map(|m| u32::from_le_bytes(m.try_into().expect("4 bytes"))).unwrap_or(0);
    let (le, nanos) = match magic {
        0xa1b2_c3d4 => (true, false),
        0xa1b2_3c4d => (true, true),
        0xd4c3_b2a1 => (false, false),
        0x4d3c_b2a1 => (false, true),
        other => return Err(PcapError::Magic(other)),
    };
    if file.len() < 24 {
        return Err(PcapError::Truncated { index: 0, offset: 0 });
    }
    let linktype = word(&file[20..24], le);
    if linktype != LINKTYPE_ETHERNET && linktype != LINKTYPE_RAW {
        return Err(PcapError::LinkType(linktype));
    }
    let mut out = Vec::new();
    let mut at = 24;
    let mut index = 0;
    while at < file.len() {
        index += 1;
        let header = file.get(at..at + 16).ok_or(PcapError::Truncated { index, offset: at })?;
        let (secs, frac, incl) = (word(&header[0..4], le), word(&header[4..8], le), word(&header[8..12], le) as usize);
        let frame = file.get(at + 16..at + 16 + incl).ok_or(PcapError::Truncated { index, offset: at })?;
        at += 16 + incl;
        let timestamp_us = secs as u64 * 1_000_000 + if nanos { frac as u64 / 1000 } else { frac as u64 };
        let ip = match linktype {
            LINKTYPE_ETHERNET if frame.len() >= 14 => match u16::from_be_bytes([frame[12], frame[13]]) {
                0x0800 | 0x86dd => &frame[14..],
                _ => continue,
            },
            LINKTYPE_RAW => frame,
            _ => continue,
        };
        if let Some(d) = from_ip(ip) {
            out.push(Datagram { record: index, timestamp_us, ..d });
        }
    }
    Ok(out)
}

/// The RoCEv2 datagram in an IP packet (header included, as a capture or a raw socket holds it), if it is
/// one: IPv4 without options or IPv6, UDP to port 4791. Record number and timestamp are left 0.
pub fn from_ip(ip: &[u8]) -> Option<Datagram> {
    let (header, src, dst, rest) = match ip.first()? >> 4 {
        4 => {
            let ihl = (ip[0] & 0xf) as usize * 4;
            let total = u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]) as usize;
            if ihl != IPV4_HEADER_LEN || *ip.get(9)? != 17 || total > ip.len() || total < ihl {
                return None; // options or not UDP: not something rxe sends
            }
            let h: [u8; IPV4_HEADER_LEN] = ip[..IPV4_HEADER_LEN].try_into().ok()?;
            let src: [u8; 4] = h[12..16].try_into().ok()?;
            let dst: [u8; 4] = h[16..20].try_into().ok()?;
            (IpHeader::V4(h), IpAddr::from(src), IpAddr::from(dst), &ip[ihl..total])
        }
        6 => {
            let h: [u8; IPV6_HEADER_LEN] = ip.get(..IPV6_HEADER_LEN)?.try_into().ok()?;
            let payload_len = u16::from_be_bytes([h[4], h[5]]) as usize;
            if h[6] != 17 {
                return None;
            }
            let src: [u8; 16] = h[8..24].try_into().ok()?;
            let dst: [u8; 16] = h[24..40].try_into().ok()?;
            (
                IpHeader::V6(h),
                IpAddr::from(src),
                IpAddr::from(dst),
                ip.get(IPV6_HEADER_LEN..IPV6_HEADER_LEN + payload_len)?,
            )
        }
        _ => return None,
    };
    let udp = rest.get(..UDP_HEADER_LEN)?;
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    if u16::from_be_bytes([udp[2], udp[3]]) != ROCEV2_UDP_PORT || udp_len < UDP_HEADER_LEN {
        return None;
    }
    Some(Datagram {
        record: 0,
        timestamp_us: 0,
        ip: header,
        src,
        dst,
        udp_src: u16::from_be_bytes([udp[0], udp[1]]),
        payload: rest.get(UDP_HEADER_LEN..udp_len)?.to_vec(),
    })
}

/// Writes datagrams as a raw-IP (linktype 101) classic pcap, little-endian, µs timestamps.
pub fn write_rocev2(datagrams: &[Datagram]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes()); // version 2.4
    out.extend_from_slice(&4u16.to_le_bytes());
    for w in [0u32, 0, 262_144, LINKTYPE_RAW] {
        out.extend_from_slice(&w.to_le_bytes()); // zone, sigfigs, snaplen, link type
    }
    for d in datagrams {
        let ip: &[u8] = match &d.ip {
            IpHeader::V4(h) => h,
            IpHeader::V6(h) => h,
        };
        let udp_len = (UDP_HEADER_LEN + d.payload.len()) as u16;
        let len = (ip.len() + UDP_HEADER_LEN + d.payload.len()) as u32;
        for w in [(d.timestamp_us / 1_000_000) as u32, (d.timestamp_us % 1_000_000) as u32, len, len] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(ip);
        out.extend_from_slice(&d.udp_src.to_be_bytes());
        out.extend_from_slice(&ROCEV2_UDP_PORT.to_be_bytes());
        out.extend_from_slice(&udp_len.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&d.payload);
    }
    out
}
