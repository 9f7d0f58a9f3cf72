//! Base Transport Header (12 bytes).
//!
//! Byte map: 0 opcode; 1 SE (7), MigReq (6), PadCnt (5:4), TVer (3:0); 2..4 P_Key; 4 FECN (7), BECN (6),
//! reserved (5:0); 5..8 destination QP; 8 AckReq (7), reserved (6:0); 9..12 PSN.

use super::{MASK_24, Opcode, WireError, be24, need, put_be24};

pub const BTH_LEN: usize = 12;
/// The default partition key, used by rxe.
pub const DEFAULT_PKEY: u16 = 0xffff;

pub mod field {
    use core::ops::Range;
    pub const OPCODE: usize = 0;
    pub const FLAGS: usize = 1;
    pub const PKEY: Range<usize> = 2..4;
    pub const RESV8A: usize = 4;
    pub const DEST_QP: Range<usize> = 5..8;
    pub const ACK_REQ: usize = 8;
    pub const PSN: Range<usize> = 9..12;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Bth {
    pub opcode: Opcode,
    /// Solicited event.
    pub solicited: bool,
    pub mig_req: bool,
    /// Pad bytes (0..=3) after the payload.
    pub pad: u8,
    pub pkey: u16,
    pub fecn: bool,
    pub becn: bool,
    /// Destination QP number (24 bits).
    pub dest_qp: u32,
    pub ack_req: bool,
    /// Packet sequence number (24 bits).
    pub psn: u32,
}

impl Bth {
    pub fn new(opcode: Opcode, dest_qp: u32, psn: u32) -> Bth {
        Bth {
            opcode,
            solicited: false,
            mig_req: false,
            pad: 0,
            pkey: DEFAULT_PKEY,
            fecn: false,
            becn: false,
            dest_qp: dest_qp & MASK_24,
            ack_req: false,
            psn: psn & MASK_24,
        }
    }

    pub fn parse(b: &[u8]) -> Result<Bth, WireError> {
        need("BTH", b, BTH_LEN)?;
        let opcode = Opcode::from_u8(b[field::OPCODE])?;
        let flags = b[field::FLAGS];
        if flags & 0x0f != 0 {
            return Err(WireError::BadVersion(flags & 0x0f));
        }
        Ok(Bth {
            opcode,
            solicited: flags & 0x80 != 0,
            mig_req: flags & 0x40 != 0,
            pad: (flags >> 4) & 3,
            pkey: u16::from_be_bytes([b[2], b[3]]),
            fecn: b[field::RESV8A] & 0x80 != 0,
            becn: b[field::RESV8A] & 0x40 != 0,
            dest_qp: be24(&b[field::DEST_QP]),
            ack_req: b[field::ACK_REQ] & 0x80 != 0,
            psn: be24(&b[field::PSN]),
        })
    }

    /// Writes the 12 bytes; a QP number or PSN wider than 24 bits, or a pad over 3, is refused.
    pub fn emit(&self, b: &mut [u8; BTH_LEN]) -> Result<(), WireError> {
        for (what, value, max) in
            [("BTH dest QP", self.dest_qp, MASK_24), ("BTH PSN", self.psn, MASK_24), ("BTH pad", self.pad as u32, 3)]
        {
            if value > max {
                return Err(WireError::FieldOverflow { what, value: value as u64 });
            }
        }
        b[field::OPCODE] = self.opcode as u8;
        b[field::FLAGS] = (self.solicited as u8) << 7 | (self.mig_req as u8) << 6 | self.pad << 4;
        b[field::PKEY].copy_from_slice(&self.pkey.to_be_bytes());
        b[field::RESV8A] = (self.fecn as u8) << 7 | (self.becn as u8) << 6;
        put_be24(&mut b[field::DEST_QP], self.dest_qp);
        b[field::ACK_REQ] = (self.ack_req as u8) << 7;
        put_be24(&mut b[field::PSN], self.psn);
        Ok(())
    }
}
