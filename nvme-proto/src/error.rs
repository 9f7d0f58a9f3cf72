//! The one error type every parser in this crate returns.
//!
//! A decode error says what was wrong, where (byte offset inside the structure, which a target copies into the
//! Error Information log's parameter error location), and which NVMe status a target should complete the
//! command with. The parser knows the right status better than its caller does, so it decides.

use crate::status::Status;

/// What was wrong with the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The buffer does not have the length this structure needs.
    Length { expected: usize, actual: usize },
    /// A field holds a value this structure does not allow.
    Value(u64),
    /// A string field has no NUL terminator within its allowed length.
    Unterminated,
    /// A string field holds bytes outside its character set (ASCII / UTF-8).
    BadText,
    /// A string field is longer than allowed.
    TooLong { max: usize, actual: usize },
    /// A string does not follow its required format; the text says which part.
    Format(&'static str),
}

impl core::fmt::Display for Reason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Reason::Length { expected, actual } => {
                write!(f, "length {actual}, expected {expected}")
            }
            Reason::Value(v) => write!(f, "invalid value {v:#x}"),
            Reason::Unterminated => f.write_str("not NUL-terminated"),
            Reason::BadText => f.write_str("invalid characters"),
            Reason::TooLong { max, actual } => write!(f, "{actual} bytes, at most {max} allowed"),
            Reason::Format(why) => f.write_str(why),
        }
    }
}

/// A structure or field that could not be decoded (or encoded) from untrusted input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{what} (byte {offset}): {reason}")]
pub struct DecodeError {
    /// The field or structure, named as the specification names it.
    pub what: &'static str,
    /// Byte offset of the offending field inside the structure that was being decoded.
    pub offset: usize,
    pub reason: Reason,
    /// The status a target completes the command with.
    pub status: Status,
}

impl DecodeError {
    pub(crate) const fn new(what: &'static str, offset: usize, reason: Reason, status: Status) -> Self {
        Self { what, offset, reason, status }
    }

    /// A wrong buffer length; completes as Invalid Field.
    pub(crate) const fn length(what: &'static str, expected: usize, actual: usize) -> Self {
        Self::new(what, 0, Reason::Length { expected, actual }, Status::INVALID_FIELD.with_dnr())
    }

    /// A field with a value that is not allowed; completes as Invalid Field.
    pub(crate) const fn value(what: &'static str, offset: usize, value: u64) -> Self {
        Self::new(what, offset, Reason::Value(value), Status::INVALID_FIELD.with_dnr())
    }

    /// Same error, with `base` added to its offset: for a field decoded inside a larger structure.
    pub const fn at(mut self, base: usize) -> Self {
        self.offset += base;
        self
    }

    /// Same error, completing with another status.
    pub const fn with_status(mut self, status: Status) -> Self {
        self.status = status;
        self
    }
}

/// Views `bytes` as a wire structure; a wrong length is an error, never a panic (all our structures have
/// alignment 1, so length is the only way to fail).
pub(crate) fn view<'a, T>(what: &'static str, bytes: &'a [u8]) -> Result<&'a T, DecodeError>
where
    T: zerocopy::FromBytes + zerocopy::KnownLayout + zerocopy::Immutable + zerocopy::Unaligned,
{
    T::ref_from_bytes(bytes).map_err(|_| DecodeError::length(what, size_of::<T>(), bytes.len()))
}

/// Checks that `bytes` has exactly `N` bytes and returns them as an array reference.
pub(crate) fn exact<'a, const N: usize>(what: &'static str, bytes: &'a [u8]) -> Result<&'a [u8; N], DecodeError> {
    bytes.try_into().map_err(|_| DecodeError::length(what, N, bytes.len()))
}
