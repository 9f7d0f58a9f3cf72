//! Just enough of pcap, Ethernet, IPv4, UDP and the InfiniBand BTH to pull NVMe/RDMA messages out of the
//! kernel captures in `shared/vectors`: RC SEND messages (capsules and completions), RDMA WRITE data,
//! RDMA READ response data, and CM MADs. Multi-packet messages are reassembled per direction and QP.
//! This is test scaffolding, not the transport's codec: it trusts the captures (checked by their README).

use std::collections::HashMap;
use std::net::Ipv4Addr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// An RC SEND (capsule or completion); `invalidate` is the IETH rkey of SEND_WITH_INVALIDATE.
    Send { invalidate: Option<u32> },
    /// RDMA WRITE data, with the remote address of its RETH.
    Write { va: u64, rkey: u32 },
    /// RDMA READ request (no data).
    ReadRequest { va: u64, rkey: u32, len: u32 },
    /// The data of an RDMA READ response.
    ReadResponse,
    /// A 256-byte CM MAD on QP1.
    Mad,
}

#[derive(Debug, Clone)]
pub struct Message {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub dest_qpn: u32,
    pub kind: Kind,
    pub data: Vec<u8>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// The UDP payloads (RoCEv2 packets) of a classic little-endian pcap, with their IPv4 addresses.
pub fn roce_packets(pcap: &[u8]) -> Vec<(Ipv4Addr, Ipv4Addr, Vec<u8>)> {
    assert_eq!(&pcap[0..4], &[0xd4, 0xc3, 0xb2, 0xa1], "little-endian microsecond pcap");
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let incl = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().unwrap()) as usize;
        let frame = &pcap[at + 16..at + 16 + incl];
        at += 16 + incl;
        if be16(frame, 12) != 0x0800 {
            continue;
        }
        let ip = &frame[14..];
        let ihl = (ip[0] & 0xf) as usize * 4;
        let total = be16(ip, 2) as usize;
        if ip[9] != 17 {
            continue;
        }
        let src = Ipv4Addr::from(be32(ip, 12));
        let dst = Ipv4Addr::from(be32(ip, 16));
        let udp = &ip[ihl..total];
        if be16(udp, 2) != 4791 {
            continue;
        }
        out.push((src, dst, udp[8..].to_vec()));
    }
    out
}

/// Reassembled messages in the order their last packet was captured.
pub fn messages(pcap: &[u8]) -> Vec<Message> {
    let mut out = Vec::new();
    // (src, dest qpn) -> message under reassembly
    let mut sends: HashMap<(Ipv4Addr, u32), Vec<u8>> = HashMap::new();
    let mut writes: HashMap<(Ipv4Addr, u32), (u64, u32, Vec<u8>)> = HashMap::new();
    let mut reads: HashMap<(Ipv4Addr, u32), Vec<u8>> = HashMap::new();
    for (src, dst, pkt) in roce_packets(pcap) {
        let opcode = pkt[0];
        let pad = ((pkt[1] >> 4) & 3) as usize;
        let dest_qpn = be32(&pkt, 4) & 0xff_ffff;
        let end = pkt.len() - 4 - pad; // ICRC and pad
        let ext = &pkt[12..];
        let key = (src, dest_qpn);
        let msg = |kind, data: Vec<u8>| Message { src, dst, dest_qpn, kind, data };
        match opcode {
            0x00 => {
                sends.insert(key, pkt[12..end].to_vec());
            }
            0x01 => sends.get_mut(&key).expect("SEND_MIDDLE after FIRST").extend_from_slice(&pkt[12..end]),
            0x02 => {
                let mut data = sends.remove(&key).expect("SEND_LAST after FIRST");
                data.extend_from_slice(&pkt[12..end]);
                out.push(msg(Kind::Send { invalidate: None }, data));
            }
            0x04 => out.push(msg(Kind::Send { invalidate: None }, pkt[12..end].to_vec())),
            0x17 => out.push(msg(Kind::Send { invalidate: Some(be32(ext, 0)) }, pkt[16..end].to_vec())),
            0x06 => {
                writes.insert(key, (be64(ext, 0), be32(ext, 8), pkt[28..end].to_vec()));
            }
            0x07 => writes.get_mut(&key).expect("WRITE_MIDDLE after FIRST").2.extend_from_slice(&pkt[12..end]),
            0x08 => {
                let (va, rkey, mut data) = writes.remove(&key).expect("WRITE_LAST after FIRST");
                data.extend_from_slice(&pkt[12..end]);
                out.push(msg(Kind::Write { va, rkey }, data));
            }
            0x0a => out.push(msg(Kind::Write { va: be64(ext, 0), rkey: be32(ext, 8) }, pkt[28..end].to_vec())),
            0x0c => out
                .push(msg(Kind::ReadRequest { va: be64(ext, 0), rkey: be32(ext, 8), len: be32(ext, 12) }, Vec::new())),
            0x0d => {
                reads.insert(key, pkt[16..end].to_vec());
            }
            0x0e => reads.get_mut(&key).expect("READ_RESPONSE_MIDDLE after FIRST").extend_from_slice(&pkt[12..end]),
            0x0f => {
                let mut data = reads.remove(&key).expect("READ_RESPONSE_LAST after FIRST");
                data.extend_from_slice(&pkt[16..end]);
                out.push(msg(Kind::ReadResponse, data));
            }
            0x10 => out.push(msg(Kind::ReadResponse, pkt[16..end].to_vec())),
            0x64 => out.push(msg(Kind::Mad, pkt[20..end].to_vec())), // BTH + DETH
            _ => {}                                                  // ACKs
        }
    }
    out
}

/// The IB CM attribute id of a MAD.
pub fn mad_attribute(mad: &[u8]) -> u16 {
    be16(mad, 16)
}
