//! Fixed-width text fields: space-padded ASCII (SN, MN, FR, TRSVCID, TRADDR) and NUL-terminated UTF-8 (NQNs).

use crate::error::{DecodeError, Reason};
use crate::status::Status;

fn invalid(what: &'static str, offset: usize, reason: Reason) -> DecodeError {
    DecodeError::new(what, offset, reason, Status::INVALID_FIELD.with_dnr())
}

/// Reads a space-padded printable-ASCII field. Trailing spaces and NULs are padding (Linux pads SN/MN/FR with
/// spaces, and address fields with NULs); anything else outside 0x20..=0x7e is an error.
pub fn read_padded<'a>(what: &'static str, field: &'a [u8]) -> Result<&'a str, DecodeError> {
    let end = field.iter().rposition(|&b| b != b' ' && b != 0).map_or(0, |i| i + 1);
    let text = &field[..end];
    if let Some(bad) = text.iter().position(|&b| !(0x20..=0x7e).contains(&b)) {
        return Err(invalid(what, bad, Reason::BadText));
    }
    // Printable ASCII is always valid UTF-8.
    core::str::from_utf8(text).map_err(|_| invalid(what, 0, Reason::BadText))
}

/// Writes `text` into `field`, padded with `pad` (b' ' or 0). Refuses text that does not fit or is not printable
/// ASCII: a silently truncated serial number is worse than an error.
pub fn write_padded(what: &'static str, field: &mut [u8], text: &str, pad: u8) -> Result<(), DecodeError> {
    let bytes = text.as_bytes();
    if bytes.len() > field.len() {
        return Err(invalid(what, 0, Reason::TooLong { max: field.len(), actual: bytes.len() }));
    }
    if let Some(bad) = bytes.iter().position(|&b| !(0x20..=0x7e).contains(&b)) {
        return Err(invalid(what, bad, Reason::BadText));
    }
    field[..bytes.len()].copy_from_slice(bytes);
    field[bytes.len()..].fill(pad);
    Ok(())
}

/// Reads a NUL-terminated UTF-8 string of at most `max` bytes (not counting the NUL) from a wider field.
pub fn read_nul_terminated<'a>(what: &'static str, field: &'a [u8], max: usize) -> Result<&'a str, DecodeError> {
    let len = field.iter().position(|&b| b == 0).ok_or_else(|| invalid(what, field.len(), Reason::Unterminated))?;
    if len > max {
        return Err(invalid(what, 0, Reason::TooLong { max, actual: len }));
    }
    core::str::from_utf8(&field[..len]).map_err(|e| invalid(what, e.valid_up_to(), Reason::BadText))
}

/// Writes `text` NUL-terminated and NUL-padded into `field`; at most `max` bytes of text, and never without a
/// terminator.
pub fn write_nul_terminated(what: &'static str, field: &mut [u8], text: &str, max: usize) -> Result<(), DecodeError> {
    let bytes = text.as_bytes();
    let limit = max.min(field.len().saturating_sub(1));
    if bytes.len() > limit {
        return Err(invalid(what, 0, Reason::TooLong { max: limit, actual: bytes.len() }));
    }
    if let Some(nul) = bytes.iter().position(|&b| b == 0) {
        return Err(invalid(what, nul, Reason::BadText));
    }
    field[..bytes.len()].copy_from_slice(bytes);
    field[bytes.len()..].fill(0);
    Ok(())
}
