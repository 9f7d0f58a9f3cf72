//! Extension transport headers: RETH, AETH, IETH, ImmDt, DETH, AtomicETH, AtomicAckETH (all big-endian).

use super::{MASK_24, WireError, be24, need, put_be24};

/// RDMA Extended Transport Header (16 bytes): virtual address, rkey, DMA length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Reth {
    pub va: u64,
    pub rkey: u32,
    pub len: u32,
}
pub const RETH_LEN: usize = 16;

impl Reth {
    pub fn parse(b: &[u8]) -> Result<Reth, WireError> {
        need("RETH", b, RETH_LEN)?;
        Ok(Reth {
            va: u64::from_be_bytes(b[0..8].try_into().expect("8 bytes")),
            rkey: u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")),
            len: u32::from_be_bytes(b[12..16].try_into().expect("4 bytes")),
        })
    }
    pub fn emit(&self, b: &mut [u8]) {
        b[0..8].copy_from_slice(&self.va.to_be_bytes());
        b[8..12].copy_from_slice(&self.rkey.to_be_bytes());
        b[12..16].copy_from_slice(&self.len.to_be_bytes());
    }
}

/// NAK codes (AETH syndrome bits 4:0 when bits 7:5 are 011).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NakCode {
    PsnSequenceError = 0,
    InvalidRequest = 1,
    RemoteAccessError = 2,
    RemoteOperationalError = 3,
    InvalidRdRequest = 4,
}

/// The meaning of an AETH syndrome byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Syndrome {
    /// Positive ACK with a credit count (0x1f: credits not used, what rxe sends).
    Ack {
        credits: u8,
    },
    /// Receiver not ready: retry after the encoded timer (IBTA table 45).
    RnrNak {
        timer: u8,
    },
    Nak(NakCode),
    /// A syndrome this implementation does not recognise (reserved values).
    Reserved(u8),
}

impl Syndrome {
    pub const ACK_NO_CREDITS: Syndrome = Syndrome::Ack { credits: 0x1f };

    pub fn from_u8(s: u8) -> Syndrome {
        let low = s & 0x1f;
        match s >> 5 {
            0b000 => Syndrome::Ack { credits: low },
            0b001 => Syndrome::RnrNak { timer: low },
            0b011 => match low {
                0 => Syndrome::Nak(NakCode::PsnSequenceError),
                1 => Syndrome::Nak(NakCode::InvalidRequest),
                2 => Syndrome::Nak(NakCode::RemoteAccessError),
                3 => Syndrome::Nak(NakCode::RemoteOperationalError),
                4 => Syndrome::Nak(NakCode::InvalidRdRequest),
                _ => Syndrome::Reserved(s),
            },
            _ => Syndrome::Reserved(s),
        }
    }
    pub fn to_u8(self) -> u8 {
        match self {
            Syndrome::Ack { credits } => credits & 0x1f,
            Syndrome::RnrNak { timer } => 0x20 | (timer & 0x1f),
            Syndrome::Nak(code) => 0x60 | code as u8,
            Syndrome::Reserved(s) => s,
        }
    }
}

/// ACK Extended Transport Header (4 bytes): syndrome and message sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Aeth {
    pub syndrome: Syndrome,
    /// 24-bit message sequence number.
    pub msn: u32,
}
pub const AETH_LEN: usize = 4;

impl Aeth {
    pub fn parse(b: &[u8]) -> Result<Aeth, WireError> {
        need("AETH", b, AETH_LEN)?;
        Ok(Aeth { syndrome: Syndrome::from_u8(b[0]), msn: be24(&b[1..4]) })
    }
    pub fn emit(&self, b: &mut [u8]) -> Result<(), WireError> {
        if self.msn > MASK_24 {
            return Err(WireError::FieldOverflow { what: "AETH MSN", value: self.msn as u64 });
        }
        b[0] = self.syndrome.to_u8();
        put_be24(&mut b[1..4], self.msn);
        Ok(())
    }
}

/// Datagram Extended Transport Header (8 bytes): Q_Key and source QP (UD, e.g. the CM's QP1 MADs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Deth {
    pub qkey: u32,
    pub src_qp: u32,
}
pub const DETH_LEN: usize = 8;
/// The Q_Key of the general services QP (QP1).
pub const GSI_QKEY: u32 = 0x8001_0000;

impl Deth {
    pub fn parse(b: &[u8]) -> Result<Deth, WireError> {
        need("DETH", b, DETH_LEN)?;
        Ok(Deth { qkey: u32::from_be_bytes(b[0..4].try_into().expect("4 bytes")), src_qp: be24(&b[5..8]) })
    }
    pub fn emit(&self, b: &mut [u8]) -> Result<(), WireError> {
        if self.src_qp > MASK_24 {
            return Err(WireError::FieldOverflow { what: "DETH source QP", value: self.src_qp as u64 });
        }
        b[0..4].copy_from_slice(&self.qkey.to_be_bytes());
        b[4] = 0;
        put_be24(&mut b[5..8], self.src_qp);
        Ok(())
    }
}

/// Atomic Extended Transport Header (28 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AtomicEth {
    pub va: u64,
    pub rkey: u32,
    /// Swap value (compare-and-swap) or addend (fetch-and-add).
    pub swap_add: u64,
    pub compare: u64,
}
pub const ATOMIC_ETH_LEN: usize = 28;

impl AtomicEth {
    pub fn parse(b: &[u8]) -> Result<AtomicEth, WireError> {
        need("AtomicETH", b, ATOMIC_ETH_LEN)?;
        Ok(AtomicEth {
            va: u64::from_be_bytes(b[0..8].try_into().expect("8 bytes")),
            rkey: u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")),
            swap_add: u64::from_be_bytes(b[12..20].try_into().expect("8 bytes")),
            compare: u64::from_be_bytes(b[20..28].try_into().expect("8 bytes")),
        })
    }
    pub fn emit(&self, b: &mut [u8]) {
        b[0..8].copy_from_slice(&self.va.to_be_bytes());
        b[8..12].copy_from_slice(&self.rkey.to_be_bytes());
        b[12..20].copy_from_slice(&self.swap_add.to_be_bytes());
        b[20..28].copy_from_slice(&self.compare.to_be_bytes());
    }
}

pub const ATOMIC_ACK_ETH_LEN: usize = 8;
/// Immediate data, IETH (the rkey to invalidate): 4 bytes each.
pub const IMM_LEN: usize = 4;
pub const IETH_LEN: usize = 4;

pub(crate) fn be32(b: &[u8], what: &'static str) -> Result<u32, WireError> {
    need(what, b, 4)?;
    Ok(u32::from_be_bytes(b[0..4].try_into().expect("4 bytes")))
}
