//! The IB path MTU as CM messages and port attributes carry it: a code, 1 = 256 bytes … 5 = 4096 (`enum
//! ibv_mtu`), the same for both providers.

/// Bytes of an MTU code (out-of-range codes are clamped to 1..=5).
pub fn mtu_bytes(code: u8) -> usize {
    128 << code.clamp(1, 5)
}

/// The code of the largest IB MTU that fits in `bytes` (256 at the least).
pub fn mtu_code(bytes: usize) -> u8 {
    match bytes {
        4096.. => 5,
        2048.. => 4,
        1024.. => 3,
        512.. => 2,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_bytes() {
        for (code, bytes) in [(1, 256), (2, 512), (3, 1024), (4, 2048), (5, 4096)] {
            assert_eq!((mtu_bytes(code), mtu_code(bytes)), (bytes, code));
        }
        assert_eq!((mtu_bytes(0), mtu_bytes(9)), (256, 4096));
        assert_eq!((mtu_code(1500), mtu_code(100), mtu_code(9000)), (3, 1, 5));
    }
}
