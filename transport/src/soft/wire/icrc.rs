//! The invariant CRC, exactly as Linux rxe computes it (`rxe_icrc.c`).
//!
//! CRC-32 (IEEE 802.3, reflected, the zlib `crc32`) over: 8 bytes of 0xFF standing for the masked LRH; the IP
//! header with its variant fields masked to ones (IPv4: TOS, TTL, header checksum; IPv6: traffic class, flow
//! label, hop limit); the UDP header with its checksum masked; the BTH with byte 4 (FECN/BECN/reserved) masked;
//! then everything after the BTH through the pad. The result is stored little-endian in the last 4 bytes.
//! Verified against every packet of the kernel captures in `shared/vectors`.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::bth::{BTH_LEN, field};
use super::{ROCEV2_UDP_PORT, WireError, need};

pub const ICRC_LEN: usize = 4;
pub const IPV4_HEADER_LEN: usize = 20;
pub const IPV6_HEADER_LEN: usize = 40;
pub const UDP_HEADER_LEN: usize = 8;

/// The IP header of the datagram carrying the packet, as transmitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpHeader {
    V4([u8; IPV4_HEADER_LEN]),
    V6([u8; IPV6_HEADER_LEN]),
}

impl IpHeader {
    /// The IPv4 header Linux sends a UDP datagram with: no options, DF set (we send with
    /// `IP_PMTUDISC_PROBE`), the given identification, TTL 64, correct checksum. `udp_len` counts the UDP header.
    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, id: u16, udp_len: u16) -> IpHeader {
        let mut h = [0u8; IPV4_HEADER_LEN];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&(IPV4_HEADER_LEN as u16 + udp_len).to_be_bytes());
        h[4..6].copy_from_slice(&id.to_be_bytes());
        h[6] = 0x40; // DF
        h[8] = 64;
        h[9] = 17;
        h[12..16].copy_from_slice(&src.octets());
        h[16..20].copy_from_slice(&dst.octets());
        let sum = checksum(&h);
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        IpHeader::V4(h)
    }

    /// An IPv6 header (traffic class and flow label are masked by the ICRC, so their values do not matter).
    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, udp_len: u16) -> IpHeader {
        let mut h = [0u8; IPV6_HEADER_LEN];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&udp_len.to_be_bytes());
        h[6] = 17;
        h[7] = 64;
        h[8..24].copy_from_slice(&src.octets());
        h[24..40].copy_from_slice(&dst.octets());
        IpHeader::V6(h)
    }

    fn masked(&self) -> ([u8; IPV6_HEADER_LEN], usize) {
        let mut out = [0u8; IPV6_HEADER_LEN];
        match self {
            IpHeader::V4(h) => {
                out[..IPV4_HEADER_LEN].copy_from_slice(h);
                out[1] = 0xff; // TOS
                out[8] = 0xff; // TTL
                out[10] = 0xff; // header checksum
                out[11] = 0xff;
                (out, IPV4_HEADER_LEN)
            }
            IpHeader::V6(h) => {
                out.copy_from_slice(h);
                out[0] |= 0x0f; // traffic class, high nibble
                out[1] = 0xff; // traffic class low nibble, flow label
                out[2] = 0xff;
                out[3] = 0xff;
                out[7] = 0xff; // hop limit
                (out, IPV6_HEADER_LEN)
            }
        }
    }
}

/// RFC 1071 checksum of an IPv4 header.
fn checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header.chunks(2).map(|w| u16::from_be_bytes([w[0], w[1]]) as u32).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The ICRC of `packet` (BTH through pad, without the ICRC) sent from UDP port `udp_src` to 4791.
pub fn compute(ip: &IpHeader, udp_src: u16, packet: &[u8]) -> Result<u32, WireError> {
    need("BTH", packet, BTH_LEN)?;
    let (ip_masked, ip_len) = ip.masked();
    let udp_len = UDP_HEADER_LEN + packet.len() + ICRC_LEN;
    let udp_len =
        u16::try_from(udp_len).map_err(|_| WireError::FieldOverflow { what: "UDP length", value: udp_len as u64 })?;
    let mut udp = [0u8; UDP_HEADER_LEN];
    udp[0..2].copy_from_slice(&udp_src.to_be_bytes());
    udp[2..4].copy_from_slice(&ROCEV2_UDP_PORT.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[6..8].copy_from_slice(&[0xff, 0xff]);
    let mut bth = [0u8; BTH_LEN];
    bth.copy_from_slice(&packet[..BTH_LEN]);
    bth[field::RESV8A] = 0xff;

    let mut crc = crc32fast::Hasher::new();
    crc.update(&[0xff; 8]);
    crc.update(&ip_masked[..ip_len]);
    crc.update(&udp);
    crc.update(&bth);
    crc.update(&packet[BTH_LEN..]);
    Ok(crc.finalize())
}

/// Appends the ICRC to a packet built by [`super::PacketRepr::emit`].
pub fn append(ip: &IpHeader, udp_src: u16, packet: &mut Vec<u8>) -> Result<(), WireError> {
    let icrc = compute(ip, udp_src, packet)?;
    packet.extend_from_slice(&icrc.to_le_bytes());
    Ok(())
}

/// Checks the ICRC at the end of a received UDP payload.
pub fn verify(ip: &IpHeader, udp_src: u16, datagram: &[u8]) -> Result<(), WireError> {
    need("RoCEv2 packet", datagram, BTH_LEN + ICRC_LEN)?;
    let (packet, carried) = datagram.split_at(datagram.len() - ICRC_LEN);
    let carried = u32::from_le_bytes(carried.try_into().expect("4 bytes"));
    let computed = compute(ip, udp_src, packet)?;
    if carried == computed { Ok(()) } else { Err(WireError::BadIcrc { carried, computed }) }
}

/// Recovers the IPv4 identification of a received packet from its ICRC.
///
/// The ICRC covers the IPv4 identification field, which a UDP socket never sees. Linux sends our own
/// datagrams with identification 0 (DF set, unconnected socket), but kernel rxe's have other values. The CRC is
/// affine in its input, so for a given length the identification's 16 bits shift the CRC by a linear map: we
/// solve for the identification that makes the carried ICRC right. A packet for which no identification
/// works is corrupt. The price: a corrupted packet passes with probability 2^-16 instead of 2^-32 (the
/// Ethernet FCS below still catches link errors).
#[derive(Debug, Default)]
pub struct IdentificationSolver {
    /// Per pseudo-message length: the reduced basis of the map from identification bits to CRC bits.
    bases: std::collections::HashMap<usize, Vec<(u32, u32, u16)>>,
}

/// Where the identification sits in the ICRC's input: after the 8-byte LRH placeholder, at IPv4 bytes 4..6.
const ID_OFFSET: usize = 8 + 4;

impl IdentificationSolver {
    pub fn new() -> Self {
        Self::default()
    }

    /// The identification for which `datagram`'s ICRC is right, given the rest of its IPv4 header (`ip`, any
    /// identification) and UDP source port; `None` if there is none (the packet is corrupt).
    pub fn solve(&mut self, ip: &IpHeader, udp_src: u16, datagram: &[u8]) -> Option<u16> {
        let IpHeader::V4(h) = ip else { return None };
        if datagram.len() < BTH_LEN + ICRC_LEN {
            return None;
        }
        let (packet, carried) = datagram.split_at(datagram.len() - ICRC_LEN);
        let carried = u32::from_le_bytes(carried.try_into().ok()?);
        let mut zero_id = *h;
        zero_id[4] = 0;
        zero_id[5] = 0;
        let at_zero = compute(&IpHeader::V4(zero_id), udp_src, packet).ok()?;
        self.solve_difference(packet.len(), at_zero ^ carried)
    }

    /// [`IdentificationSolver::solve`] for a caller that has computed the ICRC of an IPv4 packet of
    /// `packet_len` bytes (BTH to pad) with identification 0: `difference` is that ICRC xor the one carried.
    pub fn solve_difference(&mut self, packet_len: usize, difference: u32) -> Option<u16> {
        let len = 8 + IPV4_HEADER_LEN + UDP_HEADER_LEN + packet_len;
        let basis = self.bases.entry(len).or_insert_with(|| reduced_basis(len));
        let mut target = difference;
        let mut id = 0u16;
        for &(vector, pivot, combination) in basis.iter() {
            if target & pivot != 0 {
                target ^= vector;
                id ^= combination;
            }
        }
        (target == 0).then_some(id)
    }
}

/// The CRC change caused by each identification bit in a pseudo-message of `len` bytes (the CRC of a message
/// that is zero but for that bit, minus the CRC of all zeros), reduced to echelon form over GF(2). Entries are
/// (vector, pivot bit, identification bits that make the vector).
fn reduced_basis(len: usize) -> Vec<(u32, u32, u16)> {
    let crc = |data: &[u8]| {
        let mut h = crc32fast::Hasher::new();
        h.update(data);
        h.finalize()
    };
    let zeros = vec![0u8; len];
    let base = crc(&zeros);
    let mut rows: Vec<(u32, u16)> = (0..16)
        .map(|bit| {
            let mut m = zeros.clone();
            // Bit 15 is the most significant bit of the big-endian field.
            let value = 1u16 << bit;
            m[ID_OFFSET..ID_OFFSET + 2].copy_from_slice(&value.to_be_bytes());
            (crc(&m) ^ base, value)
        })
        .collect();
    let mut basis = Vec::new();
    for pivot_bit in (0..32).rev() {
        let pivot = 1u32 << pivot_bit;
        let Some(i) = rows.iter().position(|(v, _)| v & pivot != 0) else { continue };
        let (pv, pc) = rows.swap_remove(i);
        for (v, c) in rows.iter_mut() {
            if *v & pivot != 0 {
                *v ^= pv;
                *c ^= pc;
            }
        }
        basis.push((pv, pivot, pc));
    }
    basis
}
