//! Reproducible data: a fast seeded generator and the digests of what it makes.

use bytes::Bytes;
use cairn_proto::reapi::Digest;
use sha2::{Digest as _, Sha256};

/// A SplitMix64 generator: fast, seedable, good enough to make every blob distinct.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`; streams of nearby seeds do not overlap in practice.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Bytes {
        let mut data = Vec::with_capacity(len + 8);
        while data.len() < len {
            data.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        data.truncate(len);
        Bytes::from(data)
    }
}

/// The SHA-256 digest of `data`.
pub fn digest(data: &[u8]) -> Digest {
    Digest {
        hash: digest_hex(&Sha256::digest(data)),
        size_bytes: data.len() as i64,
    }
}

/// The digest functions a scenario can name its blobs by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Function {
    Sha256,
    Blake3,
}

impl Function {
    /// The digest of `data`.
    pub fn digest(self, data: &[u8]) -> Digest {
        match self {
            Function::Sha256 => digest(data),
            Function::Blake3 => Digest {
                hash: digest_hex(blake3::hash(data).as_bytes()),
                size_bytes: data.len() as i64,
            },
        }
    }

    /// What comes between `blobs/` and the hash in a resource name: nothing for
    /// SHA-256 (the default every server assumes), the function's name otherwise.
    pub fn resource_segment(self) -> &'static str {
        match self {
            Function::Sha256 => "",
            Function::Blake3 => "blake3/",
        }
    }
}

/// The digest of a blob that was never written (random hash).
pub fn absent_digest(rng: &mut Rng) -> Digest {
    let mut hash = [0u8; 32];
    for piece in hash.chunks_mut(8) {
        piece.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    Digest {
        hash: digest_hex(&hash),
        size_bytes: 1 + rng.below(4096) as i64,
    }
}

/// Lower-case hex of a hash.
pub fn digest_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(DIGITS[(byte >> 4) as usize] as char);
        out.push(DIGITS[(byte & 15) as usize] as char);
    }
    out
}

/// A blob size drawn from a build's output mix: mostly 1–64 KiB, some up to a few
/// MiB, rarely 32 MiB.
pub fn output_size(rng: &mut Rng) -> usize {
    match rng.below(1000) {
        0 => 32 << 20,
        1..=49 => (1 << 20) + rng.below(3 << 20) as usize,
        50..=199 => (64 << 10) + rng.below(960 << 10) as usize,
        _ => 1024 + rng.below(63 << 10) as usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_reproducible_and_digests_match_sha256() {
        assert_eq!(Rng::new(7).bytes(100), Rng::new(7).bytes(100));
        assert_ne!(Rng::new(7).bytes(100), Rng::new(8).bytes(100));
        assert_eq!(
            digest(b"").hash,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
