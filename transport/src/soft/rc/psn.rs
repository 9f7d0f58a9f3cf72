//! 24-bit packet sequence number arithmetic (IBTA 9.7.1: comparisons within half the PSN space).

use crate::soft::wire::MASK_24;

/// `a - b` as a signed distance in the 24-bit PSN space: positive when `a` is after `b`.
pub const fn diff(a: u32, b: u32) -> i32 {
    ((a.wrapping_sub(b) << 8) as i32) >> 8
}

pub const fn add(psn: u32, n: u32) -> u32 {
    psn.wrapping_add(n) & MASK_24
}

pub const fn sub(psn: u32, n: u32) -> u32 {
    psn.wrapping_sub(n) & MASK_24
}

/// Whether `psn` lies in `[start, start + count)`.
pub const fn within(psn: u32, start: u32, count: u32) -> bool {
    let d = diff(psn, start);
    d >= 0 && (d as u32) < count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_at_24_bits() {
        assert_eq!(add(0xff_ffff, 1), 0);
        assert_eq!(sub(0, 1), 0xff_ffff);
        assert_eq!(diff(0, 0xff_ffff), 1);
        assert_eq!(diff(0xff_ffff, 0), -1);
        assert_eq!(diff(5, 5), 0);
        assert!(within(1, 0xff_fffe, 4));
        assert!(!within(2, 0xff_fffe, 4));
        assert_eq!(diff(0x40_0000, 0), 0x40_0000);
        assert_eq!(diff(0x80_0000, 0), -0x80_0000, "half the space away counts as before");
    }
}
