//! A 128-bit UUID as NVMe carries it (host identifier, namespace UUID): 16 bytes in text order.

use crate::error::{DecodeError, Reason};
use crate::status::Status;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    pub const NIL: Uuid = Uuid([0; 16]);

    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Uuid(bytes)
    }
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Parses the 36-character `8-4-4-4-12` hexadecimal form (either case).
    pub fn parse(text: &str) -> Result<Self, DecodeError> {
        let bad = |offset, why| DecodeError::new("UUID", offset, Reason::Format(why), Status::INVALID_FIELD.with_dnr());
        let b = text.as_bytes();
        if b.len() != 36 {
            return Err(DecodeError::new(
                "UUID",
                0,
                Reason::Length { expected: 36, actual: b.len() },
                Status::INVALID_FIELD.with_dnr(),
            ));
        }
        let mut out = [0u8; 16];
        let mut nibble = 0;
        for (i, &c) in b.iter().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                if c != b'-' {
                    return Err(bad(i, "expected '-' between groups"));
                }
                continue;
            }
            let v = (c as char).to_digit(16).ok_or_else(|| bad(i, "expected a hexadecimal digit"))? as u8;
            out[nibble / 2] |= if nibble % 2 == 0 { v << 4 } else { v };
            nibble += 1;
        }
        Ok(Uuid(out))
    }
}

impl core::fmt::Display for Uuid {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl core::str::FromStr for Uuid {
    type Err = DecodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse(s)
    }
}
