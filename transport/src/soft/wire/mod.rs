//! RoCEv2 wire formats, in the smoltcp style: each header has a `mod field` of byte ranges, a parsed `Repr`
//! with `parse` and `emit`, and the parser takes untrusted bytes and returns a [`WireError`], never panicking.
//!
//! A RoCEv2 packet is a UDP datagram to port 4791 whose payload is: BTH (12 bytes), the extension headers the
//! opcode calls for (RETH, AETH, IETH, ImmDt, DETH, AtomicETH, AtomicAckETH), the payload, 0–3 pad bytes, and
//! the 4-byte ICRC. References: IBTA spec vol. 1 ch. 9 and annex A17; Linux `drivers/infiniband/sw/rxe/`
//! (`rxe_hdr.h`, `rxe_opcode.c`, `rxe_icrc.c`).

pub mod bth;
pub mod cma;
pub mod ext;
pub mod icrc;
pub mod mad;
pub mod opcode;
pub mod packet;
pub mod udp_port;

pub use bth::Bth;
pub use icrc::IpHeader;
pub use opcode::Opcode;
pub use packet::{Packet, PacketRepr};

/// The UDP destination port of RoCEv2.
pub const ROCEV2_UDP_PORT: u16 = 4791;

/// Why bytes are not a valid RoCEv2 packet. The receiver drops such packets (rxe counts them and drops).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("packet too short: {what} needs {needed} bytes, {available} available")]
    Truncated { what: &'static str, needed: usize, available: usize },
    #[error("unknown or unsupported BTH opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("BTH transport header version {0} (only 0 is defined)")]
    BadVersion(u8),
    #[error("payload of {len} bytes on opcode {opcode:#04x}, which carries none")]
    UnexpectedPayload { opcode: u8, len: usize },
    #[error("ICRC mismatch: packet carries {carried:#010x}, computed {computed:#010x}")]
    BadIcrc { carried: u32, computed: u32 },
    #[error("{what}: value {value:#x} does not fit its field")]
    FieldOverflow { what: &'static str, value: u64 },
    #[error("{what} present or missing against what opcode {opcode:#04x} carries")]
    HeaderMismatch { what: &'static str, opcode: u8 },
}

pub(crate) fn need(what: &'static str, bytes: &[u8], needed: usize) -> Result<(), WireError> {
    if bytes.len() < needed { Err(WireError::Truncated { what, needed, available: bytes.len() }) } else { Ok(()) }
}

pub(crate) fn be24(b: &[u8]) -> u32 {
    u32::from_be_bytes([0, b[0], b[1], b[2]])
}

pub(crate) fn put_be24(b: &mut [u8], v: u32) {
    b.copy_from_slice(&v.to_be_bytes()[1..]);
}

/// Largest value of a 24-bit field (QP numbers, PSNs, MSNs).
pub const MASK_24: u32 = 0x00ff_ffff;
