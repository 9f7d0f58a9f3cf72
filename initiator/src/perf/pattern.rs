//! The `--verify` block pattern: every logical block carries a magic, its own LBA and the generation of the
//! write that produced it (run id << 32 | write number), then bytes derived from both — so a block from the
//! wrong place, an older write, another run, or with any byte changed is told apart from the right one.

use std::fmt;

pub const MAGIC: [u8; 8] = *b"nvmfperf";
const HEADER: usize = 24;

/// What was wrong with a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// Not our pattern at all (never written by a verifying run, or overwritten by something else).
    Foreign,
    /// Our pattern for another LBA.
    Misplaced { found_lba: u64 },
    /// Our pattern, right LBA, an earlier write of this run: a lost or reordered write.
    Stale { found: u64 },
    /// Right LBA, a generation nobody expected (another run, or a later one that was never acknowledged).
    Unexpected { found: u64 },
    /// Header right, payload bytes wrong.
    Corrupt { offset: usize },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Foreign => write!(f, "not a verify pattern"),
            Mismatch::Misplaced { found_lba } => write!(f, "holds the block of LBA {found_lba}"),
            Mismatch::Stale { found } => write!(f, "stale: generation {found:#x}"),
            Mismatch::Unexpected { found } => write!(f, "unexpected generation {found:#x}"),
            Mismatch::Corrupt { offset } => write!(f, "corrupt at byte {offset}"),
        }
    }
}

fn payload_word(lba: u64, generation: u64, i: u64) -> u64 {
    // splitmix64 of (lba, generation, index): cheap, and no two blocks share a payload.
    let mut z =
        lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation.rotate_left(29) ^ i.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` (whole blocks of `block_size` ≥ 64 bytes) starting at `first_lba` with `generation`.
pub fn fill(buf: &mut [u8], block_size: usize, first_lba: u64, generation: u64) {
    for (i, block) in buf.chunks_exact_mut(block_size).enumerate() {
        let lba = first_lba + i as u64;
        block[..8].copy_from_slice(&MAGIC);
        block[8..16].copy_from_slice(&lba.to_le_bytes());
        block[16..24].copy_from_slice(&generation.to_le_bytes());
        for (j, word) in block[HEADER..].chunks_mut(8).enumerate() {
            let w = payload_word(lba, generation, j as u64).to_le_bytes();
            word.copy_from_slice(&w[..word.len()]);
        }
    }
}

/// Checks one block read from `lba` against the generations it may hold (`expected`, from the writes that
/// were acknowledged or whose outcome is unknown).
pub fn check(block: &[u8], lba: u64, expected: &[u64]) -> Result<(), Mismatch> {
    if block.len() < HEADER || block[..8] != MAGIC {
        return Err(Mismatch::Foreign);
    }
    let word = |r: std::ops::Range<usize>| u64::from_le_bytes(block[r].try_into().expect("8 bytes"));
    let (found_lba, found) = (word(8..16), word(16..24));
    if found_lba != lba {
        return Err(Mismatch::Misplaced { found_lba });
    }
    if !expected.contains(&found) {
        let newest = expected.iter().copied().max().unwrap_or(0);
        let same_run = found >> 32 == newest >> 32;
        return Err(if same_run && found < newest {
            Mismatch::Stale { found }
        } else {
            Mismatch::Unexpected { found }
        });
    }
    for (j, word) in block[HEADER..].chunks(8).enumerate() {
        let w = payload_word(lba, found, j as u64).to_le_bytes();
        if word != &w[..word.len()] {
            let offset = HEADER + j * 8 + word.iter().zip(&w).position(|(a, b)| a != b).unwrap_or(0);
            return Err(Mismatch::Corrupt { offset });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn right_blocks_pass_and_every_kind_of_wrong_block_is_named() {
        let bs = 512;
        let run = 7u64 << 32;
        let mut buf = vec![0u8; 4 * bs];
        fill(&mut buf, bs, 100, run | 3);
        for i in 0..4 {
            check(&buf[i * bs..(i + 1) * bs], 100 + i as u64, &[run | 3]).unwrap();
        }
        let block = &buf[..bs];
        assert_eq!(check(block, 101, &[run | 3]), Err(Mismatch::Misplaced { found_lba: 100 }));
        assert_eq!(check(block, 100, &[run | 4]), Err(Mismatch::Stale { found: run | 3 }));
        assert_eq!(check(block, 100, &[run | 2]), Err(Mismatch::Unexpected { found: run | 3 }));
        assert_eq!(check(block, 100, &[(8 << 32) | 9]), Err(Mismatch::Unexpected { found: run | 3 }));
        assert_eq!(check(&vec![0u8; bs], 100, &[run | 3]), Err(Mismatch::Foreign));
        // Either of two possible generations is fine.
        check(block, 100, &[run | 2, run | 3]).unwrap();
        let mut bad = block.to_vec();
        bad[300] ^= 1;
        assert_eq!(check(&bad, 100, &[run | 3]), Err(Mismatch::Corrupt { offset: 300 }));
        // Payloads differ between generations and blocks.
        let mut other = vec![0u8; bs];
        fill(&mut other, bs, 100, run | 4);
        assert_ne!(other[24..], block[24..]);
    }
}
