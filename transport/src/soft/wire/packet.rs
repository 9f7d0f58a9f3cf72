//! A whole RoCEv2 packet (the UDP payload): BTH, extension headers, payload, pad, ICRC.

use super::bth::{BTH_LEN, Bth};
use super::ext::{
    AETH_LEN, ATOMIC_ACK_ETH_LEN, ATOMIC_ETH_LEN, Aeth, AtomicEth, DETH_LEN, Deth, IETH_LEN, IMM_LEN, RETH_LEN, Reth,
    be32,
};
use super::icrc::ICRC_LEN;
use super::{WireError, need};

/// A parsed packet. Which optional headers are present is decided by the opcode, so a `PacketRepr` built by
/// hand must follow [`super::Opcode::headers`]; [`PacketRepr::emit`] checks that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketRepr<'a> {
    pub bth: Bth,
    pub deth: Option<Deth>,
    pub reth: Option<Reth>,
    pub atomic_eth: Option<AtomicEth>,
    pub aeth: Option<Aeth>,
    /// AtomicAckETH: the original remote value.
    pub atomic_ack: Option<u64>,
    /// Immediate data.
    pub imm: Option<u32>,
    /// IETH: the rkey the responder invalidates.
    pub ieth: Option<u32>,
    pub payload: &'a [u8],
}

/// A RoCEv2 packet with the ICRC it carries (checked separately: it needs the IP and UDP headers).
pub type Packet<'a> = (PacketRepr<'a>, u32);

impl<'a> PacketRepr<'a> {
    /// A packet of the given BTH, with no extension headers or payload yet.
    pub fn new(bth: Bth) -> Self {
        PacketRepr {
            bth,
            deth: None,
            reth: None,
            atomic_eth: None,
            aeth: None,
            atomic_ack: None,
            imm: None,
            ieth: None,
            payload: &[],
        }
    }

    /// A CM MAD as QP1 sends it: UD SEND to QP 1 with the GSI Q_Key, from QP 1.
    pub fn cm_mad(psn: u32, mad: &'a [u8]) -> Self {
        let mut p = PacketRepr::new(Bth::new(super::Opcode::UdSendOnly, 1, psn));
        p.deth = Some(Deth { qkey: super::ext::GSI_QKEY, src_qp: 1 });
        p.payload = mad;
        p
    }

    /// Parses a UDP payload. Returns the packet and the ICRC it carries (little-endian on the wire, as rxe
    /// stores it). Nothing here trusts a length field: every slice is bounds-checked first.
    pub fn parse(b: &'a [u8]) -> Result<Packet<'a>, WireError> {
        let bth = Bth::parse(b)?;
        let headers = bth.opcode.headers();
        let fixed = BTH_LEN + headers.len();
        need("RoCEv2 headers and ICRC", b, fixed + bth.pad as usize + ICRC_LEN)?;
        let mut at = BTH_LEN;
        let mut take = |present: bool, len: usize| {
            let start = at;
            at += if present { len } else { 0 };
            &b[start..start + if present { len } else { 0 }]
        };
        // Wire order: DETH, RETH, AtomicETH, AETH, AtomicAckETH, ImmDt, IETH.
        let deth = take(headers.deth, DETH_LEN);
        let reth = take(headers.reth, RETH_LEN);
        let atomic = take(headers.atomic_eth, ATOMIC_ETH_LEN);
        let aeth = take(headers.aeth, AETH_LEN);
        let atomic_ack = take(headers.atomic_ack_eth, ATOMIC_ACK_ETH_LEN);
        let imm = take(headers.imm, IMM_LEN);
        let ieth = take(headers.ieth, IETH_LEN);
        let end = b.len() - ICRC_LEN;
        let payload = &b[fixed..end - bth.pad as usize];
        if !bth.opcode.has_payload() && !payload.is_empty() {
            return Err(WireError::UnexpectedPayload { opcode: bth.opcode as u8, len: payload.len() });
        }
        let icrc = u32::from_le_bytes(b[end..].try_into().expect("4 bytes"));
        let repr = PacketRepr {
            bth,
            deth: headers.deth.then(|| Deth::parse(deth)).transpose()?,
            reth: headers.reth.then(|| Reth::parse(reth)).transpose()?,
            atomic_eth: headers.atomic_eth.then(|| AtomicEth::parse(atomic)).transpose()?,
            aeth: headers.aeth.then(|| Aeth::parse(aeth)).transpose()?,
            atomic_ack: headers
                .atomic_ack_eth
                .then(|| atomic_ack.try_into().map(u64::from_be_bytes))
                .transpose()
                .map_err(|_| WireError::Truncated { what: "AtomicAckETH", needed: 8, available: atomic_ack.len() })?,
            imm: headers.imm.then(|| be32(imm, "ImmDt")).transpose()?,
            ieth: headers.ieth.then(|| be32(ieth, "IETH")).transpose()?,
            payload,
        };
        Ok((repr, icrc))
    }

    /// Bytes from the BTH through the pad: what the ICRC covers after the IP and UDP headers.
    pub fn len_without_icrc(&self) -> usize {
        BTH_LEN + self.bth.opcode.headers().len() + self.payload.len() + pad_for(self.payload.len())
    }

    /// Appends the packet without its ICRC (BTH .. pad) to `out`. The BTH pad count is set from the payload
    /// length; the headers present must be exactly the ones the opcode calls for.
    pub fn emit(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let headers = self.bth.opcode.headers();
        let present = [
            (headers.deth, self.deth.is_some(), "DETH"),
            (headers.reth, self.reth.is_some(), "RETH"),
            (headers.atomic_eth, self.atomic_eth.is_some(), "AtomicETH"),
            (headers.aeth, self.aeth.is_some(), "AETH"),
            (headers.atomic_ack_eth, self.atomic_ack.is_some(), "AtomicAckETH"),
            (headers.imm, self.imm.is_some(), "ImmDt"),
            (headers.ieth, self.ieth.is_some(), "IETH"),
        ];
        if let Some((_, _, what)) = present.iter().find(|(want, have, _)| want != have) {
            return Err(WireError::HeaderMismatch { what, opcode: self.bth.opcode as u8 });
        }
        if !self.bth.opcode.has_payload() && !self.payload.is_empty() {
            return Err(WireError::UnexpectedPayload { opcode: self.bth.opcode as u8, len: self.payload.len() });
        }
        let pad = pad_for(self.payload.len());
        let start = out.len();
        out.resize(start + BTH_LEN + headers.len(), 0);
        let bth = Bth { pad: pad as u8, ..self.bth };
        bth.emit((&mut out[start..start + BTH_LEN]).try_into().expect("12 bytes"))?;
        let mut at = start + BTH_LEN;
        let mut slot = |len: usize| {
            let s = at;
            at += len;
            s..s + len
        };
        if let Some(d) = self.deth {
            d.emit(&mut out[slot(DETH_LEN)])?;
        }
        if let Some(r) = self.reth {
            r.emit(&mut out[slot(RETH_LEN)]);
        }
        if let Some(a) = self.atomic_eth {
            a.emit(&mut out[slot(ATOMIC_ETH_LEN)]);
        }
        if let Some(a) = self.aeth {
            a.emit(&mut out[slot(AETH_LEN)])?;
        }
        if let Some(v) = self.atomic_ack {
            out[slot(ATOMIC_ACK_ETH_LEN)].copy_from_slice(&v.to_be_bytes());
        }
        if let Some(v) = self.imm {
            out[slot(IMM_LEN)].copy_from_slice(&v.to_be_bytes());
        }
        if let Some(v) = self.ieth {
            out[slot(IETH_LEN)].copy_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(self.payload);
        out.resize(out.len() + pad, 0);
        Ok(())
    }
}

/// Pad bytes that make a payload a multiple of 4.
pub const fn pad_for(payload_len: usize) -> usize {
    (4 - payload_len % 4) % 4
}
