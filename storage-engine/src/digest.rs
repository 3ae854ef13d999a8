//! Digests: the content address of every CAS blob and the key of every AC entry.
//!
//! A digest is (function, hash, size). The function is part of the key everywhere, on
//! disk and in memory, so that SHA-256 and BLAKE3 blobs with equal bytes are distinct
//! entries and another function can be added without a format change to the index.
//! Both functions produce 32 bytes; a longer hash would need a new record version.

use crate::error::{Error, Result};
use crate::sha256::Sha256;
use std::fmt;

/// The hash functions cairn stores blobs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestFunction {
    Sha256,
    Blake3,
}

impl DigestFunction {
    /// The code stored in record headers (see FORMAT.md).
    pub fn code(self) -> u8 {
        match self {
            DigestFunction::Sha256 => 1,
            DigestFunction::Blake3 => 2,
        }
    }

    pub fn from_code(code: u8) -> Option<DigestFunction> {
        match code {
            1 => Some(DigestFunction::Sha256),
            2 => Some(DigestFunction::Blake3),
            _ => None,
        }
    }

    /// Lower-case name as used in ByteStream resource names (`blobs/blake3/...`).
    pub fn name(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => "sha256",
            DigestFunction::Blake3 => "blake3",
        }
    }

    pub fn hasher(self) -> Hasher {
        match self {
            DigestFunction::Sha256 => Hasher::Sha256(Box::default()),
            DigestFunction::Blake3 => Hasher::Blake3(Box::default()),
        }
    }
}

/// An incremental hasher for either function; blobs are hashed chunk by chunk as they
/// stream, never as a whole.
#[derive(Clone)]
pub enum Hasher {
    Sha256(Box<Sha256>),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    pub fn finalize(self) -> [u8; 32] {
        match self {
            Hasher::Sha256(h) => h.finalize(),
            Hasher::Blake3(h) => *h.finalize().as_bytes(),
        }
    }
}

/// A content digest: function, 32-byte hash and size in bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest {
    pub function: DigestFunction,
    pub hash: [u8; 32],
    pub size: u64,
}

impl Digest {
    /// Checks the length and hash of what an upload sent against this digest.
    pub fn check_sent(&self, len: u64, hash: [u8; 32]) -> Result<()> {
        if len != self.size {
            return Err(Error::invalid(format!(
                "upload ended after {len} of its declared {} bytes",
                self.size
            )));
        }
        if hash != self.hash {
            return Err(Error::invalid(format!(
                "uploaded content does not match its digest {self}"
            )));
        }
        Ok(())
    }

    /// Parses a lower- or upper-case 64-character hex hash.
    pub fn from_hex(function: DigestFunction, hex: &str, size: u64) -> Result<Digest> {
        Self::parse_hex(function, hex, size, &EITHER_CASE)
    }

    /// Parses a lowercase 64-character hex hash, the only spelling REAPI allows.
    pub fn from_lower_hex(function: DigestFunction, hex: &str, size: u64) -> Result<Digest> {
        Self::parse_hex(function, hex, size, &LOWER_CASE)
    }

    fn parse_hex(
        function: DigestFunction,
        hex: &str,
        size: u64,
        table: &[u8; 256],
    ) -> Result<Digest> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return Err(Error::invalid(format!(
                "{} hash must be 64 hex characters, got {}",
                function.name(),
                bytes.len()
            )));
        }
        // Branch-free: a table lookup per character, invalid ones flagged in the high
        // nibble and checked once at the end. The former per-character `match` took
        // 32% of the node's CPU in a FindMissingBlobs of 1000 digests (bench/README.md).
        let mut hash = [0u8; 32];
        let mut flags = 0u8;
        for (out, pair) in hash.iter_mut().zip(bytes.chunks_exact(2)) {
            let hi = table[usize::from(pair[0])];
            let lo = table[usize::from(pair[1])];
            flags |= hi | lo;
            *out = (hi << 4) | (lo & 0x0f);
        }
        if flags & INVALID != 0 {
            return Err(Error::invalid(format!(
                "hash is not hexadecimal: {:?}",
                String::from_utf8_lossy(bytes)
            )));
        }
        Ok(Digest {
            function,
            hash,
            size,
        })
    }

    /// The digest of `data` under `function`.
    pub fn of(function: DigestFunction, data: &[u8]) -> Digest {
        let mut hasher = function.hasher();
        hasher.update(data);
        Digest {
            function,
            hash: hasher.finalize(),
            size: data.len() as u64,
        }
    }

    /// The digest of the empty blob, which every CAS holds implicitly.
    pub fn empty(function: DigestFunction) -> Digest {
        Digest::of(function, &[])
    }

    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && *self == Digest::empty(self.function)
    }

    pub fn hash_hex(&self) -> String {
        let mut out = String::with_capacity(64);
        for byte in self.hash {
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        out
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Marks a character that is not a hex digit in the decoding tables.
const INVALID: u8 = 0xf0;

/// Hex digit values by character: `0-9`, `a-f`, and `A-F` when `upper` is set.
const fn hex_table(upper: bool) -> [u8; 256] {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        if upper {
            table[b'A' as usize + i] = 10 + i as u8;
        }
        i += 1;
    }
    table
}

static LOWER_CASE: [u8; 256] = hex_table(false);
static EITHER_CASE: [u8; 256] = hex_table(true);

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.function.name(),
            self.hash_hex(),
            self.size
        )
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_empty_digests() {
        assert_eq!(
            Digest::empty(DigestFunction::Sha256).hash_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            Digest::empty(DigestFunction::Blake3).hash_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn hex_round_trip_and_rejections() {
        let d = Digest::of(DigestFunction::Sha256, b"hello");
        let parsed = Digest::from_hex(DigestFunction::Sha256, &d.hash_hex().to_uppercase(), 5);
        assert_eq!(parsed.ok(), Some(d));
        assert!(Digest::from_hex(DigestFunction::Sha256, "abc", 1).is_err());
        let bad = "g".repeat(64);
        assert!(Digest::from_hex(DigestFunction::Sha256, &bad, 1).is_err());
        let multibyte = "é".repeat(32);
        assert!(Digest::from_hex(DigestFunction::Blake3, &multibyte, 1).is_err());
        let upper = d.hash_hex().to_uppercase();
        assert!(Digest::from_lower_hex(DigestFunction::Sha256, &upper, 5).is_err());
        assert_eq!(
            Digest::from_lower_hex(DigestFunction::Sha256, &d.hash_hex(), 5).ok(),
            Some(d)
        );
        for (position, bad) in [
            (0, b'g'),
            (63, b'/'),
            (31, b':'),
            (7, b'@'),
            (40, b'G'),
            (12, b'F' + 1),
        ] {
            let mut text = d.hash_hex().into_bytes();
            text[position] = bad;
            let text = String::from_utf8(text).expect("ASCII");
            assert!(
                Digest::from_hex(DigestFunction::Sha256, &text, 5).is_err(),
                "{text}"
            );
        }
    }
}
