//! BTH opcodes (IBTA vol. 1, table 35; Linux `enum ib_opcode`) and what each one carries.

use super::WireError;

/// Which extension headers follow the BTH, in wire order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Headers {
    pub deth: bool,
    pub reth: bool,
    pub atomic_eth: bool,
    pub aeth: bool,
    pub atomic_ack_eth: bool,
    pub imm: bool,
    pub ieth: bool,
}

impl Headers {
    /// Total bytes of extension headers.
    pub const fn len(&self) -> usize {
        (self.deth as usize) * 8
            + (self.reth as usize) * 16
            + (self.atomic_eth as usize) * 28
            + (self.aeth as usize) * 4
            + (self.atomic_ack_eth as usize) * 8
            + (self.imm as usize) * 4
            + (self.ieth as usize) * 4
    }
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Position of a packet within its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    First,
    Middle,
    Last,
    Only,
}

macro_rules! opcodes {
    ($( $name:ident = $value:expr, $text:literal, $pos:ident, payload $payload:expr, [$($h:ident),*] ; )*) => {
        /// A BTH opcode this implementation knows.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Opcode { $( $name = $value, )* }

        impl Opcode {
            pub const ALL: &'static [Opcode] = &[$( Opcode::$name, )*];

            pub fn from_u8(value: u8) -> Result<Opcode, WireError> {
                match value {
                    $( $value => Ok(Opcode::$name), )*
                    other => Err(WireError::UnknownOpcode(other)),
                }
            }
            /// Extension headers after the BTH.
            pub const fn headers(self) -> Headers {
                match self {
                    $( Opcode::$name => Headers { $( $h: true, )* ..HEADERS_NONE }, )*
                }
            }
            pub const fn position(self) -> Position {
                match self { $( Opcode::$name => Position::$pos, )* }
            }
            /// Whether packets with this opcode may carry payload bytes.
            pub const fn has_payload(self) -> bool {
                match self { $( Opcode::$name => $payload, )* }
            }
            /// The name Linux and the vectors' decode files use (`IB_OPCODE_RC_SEND_ONLY` without the prefix).
            pub const fn name(self) -> &'static str {
                match self { $( Opcode::$name => $text, )* }
            }
        }
    };
}

const HEADERS_NONE: Headers = Headers {
    deth: false,
    reth: false,
    atomic_eth: false,
    aeth: false,
    atomic_ack_eth: false,
    imm: false,
    ieth: false,
};

opcodes! {
    RcSendFirst = 0x00, "RC_SEND_FIRST", First, payload true, [];
    RcSendMiddle = 0x01, "RC_SEND_MIDDLE", Middle, payload true, [];
    RcSendLast = 0x02, "RC_SEND_LAST", Last, payload true, [];
    RcSendLastWithImmediate = 0x03, "RC_SEND_LAST_WITH_IMMEDIATE", Last, payload true, [imm];
    RcSendOnly = 0x04, "RC_SEND_ONLY", Only, payload true, [];
    RcSendOnlyWithImmediate = 0x05, "RC_SEND_ONLY_WITH_IMMEDIATE", Only, payload true, [imm];
    RcRdmaWriteFirst = 0x06, "RC_RDMA_WRITE_FIRST", First, payload true, [reth];
    RcRdmaWriteMiddle = 0x07, "RC_RDMA_WRITE_MIDDLE", Middle, payload true, [];
    RcRdmaWriteLast = 0x08, "RC_RDMA_WRITE_LAST", Last, payload true, [];
    RcRdmaWriteLastWithImmediate = 0x09, "RC_RDMA_WRITE_LAST_WITH_IMMEDIATE", Last, payload true, [imm];
    RcRdmaWriteOnly = 0x0a, "RC_RDMA_WRITE_ONLY", Only, payload true, [reth];
    RcRdmaWriteOnlyWithImmediate = 0x0b, "RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE", Only, payload true, [reth, imm];
    RcRdmaReadRequest = 0x0c, "RC_RDMA_READ_REQUEST", Only, payload false, [reth];
    RcRdmaReadResponseFirst = 0x0d, "RC_RDMA_READ_RESPONSE_FIRST", First, payload true, [aeth];
    RcRdmaReadResponseMiddle = 0x0e, "RC_RDMA_READ_RESPONSE_MIDDLE", Middle, payload true, [];
    RcRdmaReadResponseLast = 0x0f, "RC_RDMA_READ_RESPONSE_LAST", Last, payload true, [aeth];
    RcRdmaReadResponseOnly = 0x10, "RC_RDMA_READ_RESPONSE_ONLY", Only, payload true, [aeth];
    RcAcknowledge = 0x11, "RC_ACKNOWLEDGE", Only, payload false, [aeth];
    RcAtomicAcknowledge = 0x12, "RC_ATOMIC_ACKNOWLEDGE", Only, payload false, [aeth, atomic_ack_eth];
    RcCompareSwap = 0x13, "RC_COMPARE_SWAP", Only, payload false, [atomic_eth];
    RcFetchAdd = 0x14, "RC_FETCH_ADD", Only, payload false, [atomic_eth];
    RcSendLastWithInvalidate = 0x16, "RC_SEND_LAST_WITH_INVALIDATE", Last, payload true, [ieth];
    RcSendOnlyWithInvalidate = 0x17, "RC_SEND_ONLY_WITH_INVALIDATE", Only, payload true, [ieth];
    UdSendOnly = 0x64, "UD_SEND_ONLY", Only, payload true, [deth];
    UdSendOnlyWithImmediate = 0x65, "UD_SEND_ONLY_WITH_IMMEDIATE", Only, payload true, [deth, imm];
}

impl Opcode {
    /// Reliable Connected transport (opcode bits 7:5 = 000).
    pub const fn is_rc(self) -> bool {
        (self as u8) >> 5 == 0
    }
    pub const fn is_send(self) -> bool {
        matches!(
            self,
            Opcode::RcSendFirst
                | Opcode::RcSendMiddle
                | Opcode::RcSendLast
                | Opcode::RcSendLastWithImmediate
                | Opcode::RcSendOnly
                | Opcode::RcSendOnlyWithImmediate
                | Opcode::RcSendLastWithInvalidate
                | Opcode::RcSendOnlyWithInvalidate
                | Opcode::UdSendOnly
                | Opcode::UdSendOnlyWithImmediate
        )
    }
    pub const fn is_write(self) -> bool {
        matches!(self as u8, 0x06..=0x0b)
    }
    pub const fn is_read_response(self) -> bool {
        matches!(self as u8, 0x0d..=0x10)
    }
    /// A request the responder executes (as opposed to an ACK or READ response travelling back).
    pub const fn is_request(self) -> bool {
        !(self.is_read_response() || matches!(self, Opcode::RcAcknowledge | Opcode::RcAtomicAcknowledge))
    }
}
