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
    #[error("record {index} at byte {offset} claims {len} bytes (at most {MAX_RECORD} are read)")]
    RecordTooLarge { index: usize, offset: usize, len: usize },
    #[error("reading the capture: {0}")]
    Io(String),
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
    Reader::new(file)?.collect()
}

/// A classic pcap read record by record (a capture of a long run need not fit in memory): yields its RoCEv2
/// datagrams, as [`read_rocev2`] does.
pub struct Reader<R> {
    input: R,
    little_endian: bool,
    nanos: bool,
    linktype: u32,
    index: usize,
    offset: usize,
    frame: Vec<u8>,
    /// After an error the rest of the file cannot be framed: the reader ends.
    failed: bool,
}

impl<R: std::io::Read> Reader<R> {
    /// Reads and checks the file header.
    pub fn new(mut input: R) -> Result<Reader<R>, PcapError> {
        let mut header = [0u8; 24];
        let got = read_full(&mut input, &mut header).map_err(|e| PcapError::Io(e.to_string()))?;
        let magic = if got >= 4 { u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) } else { 0 };
        let (little_endian, nanos) = match magic {
            0xa1b2_c3d4 => (true, false),
            0xa1b2_3c4d => (true, true),
            0xd4c3_b2a1 => (false, false),
            0x4d3c_b2a1 => (false, true),
            other => return Err(PcapError::Magic(other)),
        };
        if got < header.len() {
            return Err(PcapError::Truncated { index: 0, offset: 0 });
        }
        let linktype = word(&header[20..24], little_endian);
        if linktype != LINKTYPE_ETHERNET && linktype != LINKTYPE_RAW {
            return Err(PcapError::LinkType(linktype));
        }
        Ok(Reader { input, little_endian, nanos, linktype, index: 0, offset: 24, frame: Vec::new(), failed: false })
    }

    /// The next record's frame and timestamp; `None` at the end of the file.
    fn next_record(&mut self) -> Result<Option<u64>, PcapError> {
        let mut header = [0u8; 16];
        let (index, offset) = (self.index + 1, self.offset);
        let truncated = PcapError::Truncated { index, offset };
        match read_full(&mut self.input, &mut header).map_err(|e| PcapError::Io(e.to_string()))? {
            0 => return Ok(None),
            16 => {}
            _ => return Err(truncated),
        }
        let le = self.little_endian;
        let (secs, frac, incl) = (word(&header[0..4], le), word(&header[4..8], le), word(&header[8..12], le) as usize);
        // No record is larger than the biggest snapshot length tcpdump takes.
        if incl > MAX_RECORD {
            return Err(PcapError::RecordTooLarge { index, offset, len: incl });
        }
        self.frame.resize(incl, 0);
        if read_full(&mut self.input, &mut self.frame).map_err(|e| PcapError::Io(e.to_string()))? != incl {
            return Err(truncated);
        }
        self.index = index;
        self.offset += 16 + incl;
        Ok(Some(secs as u64 * 1_000_000 + if self.nanos { frac as u64 / 1000 } else { frac as u64 }))
    }
}

impl<R: std::io::Read> Iterator for Reader<R> {
    type Item = Result<Datagram, PcapError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.failed {
            let timestamp_us = match self.next_record() {
                Ok(Some(t)) => t,
                Ok(None) => return None,
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            };
            let frame = &self.frame[..];
            let ip = match self.linktype {
                LINKTYPE_ETHERNET if frame.len() >= 14 => match u16::from_be_bytes([frame[12], frame[13]]) {
                    0x0800 | 0x86dd => &frame[14..],
                    _ => continue,
                },
                LINKTYPE_RAW => frame,
                _ => continue,
            };
            if let Some(d) = from_ip(ip) {
                return Some(Ok(Datagram { record: self.index, timestamp_us, ..d }));
            }
        }
        None
    }
}

/// The largest record read (tcpdump's largest snapshot length).
const MAX_RECORD: usize = 262_144;

fn word(b: &[u8], little_endian: bool) -> u32 {
    let a: [u8; 4] = b.try_into().expect("4 bytes");
    if little_endian { u32::from_le_bytes(a) } else { u32::from_be_bytes(a) }
}

/// Fills `buf` as far as the input goes; returns how much was read.
fn read_full(input: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
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
