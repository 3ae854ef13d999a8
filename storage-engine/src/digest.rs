//! Digests: the content address of every CAS blob and the key of every AC entry.
//!
//! A digest is (function, hash, size). The function is part of the key everywhere, on
//! disk and in memory, so that SHA-256 and BLAKE3 blobs with equal bytes are distinct
//! entries and another function can be added without a format change to the index.
//! Both functions produce 32 bytes; a longer hash would need a new record version.

use crate::error::{Error, Result};
use sha2::Digest as _;
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
    Sha256(Box<sha2::Sha256>),
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
            Hasher::Sha256(h) => h.finalize().into(),
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
    /// Parses a lower- or upper-case 64-character hex hash.
    pub fn from_hex(function: DigestFunction, hex: &str, size: u64) -> Result<Digest> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return Err(Error::invalid(format!(
                "{} hash must be 64 hex characters, got {}",
                function.name(),
                bytes.len()
            )));
        }
        let mut hash = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = hex_value(pair[0]);
            let lo = hex_value(pair[1]);
            match (hi, lo) {
                (Some(hi), Some(lo)) => hash[i] = (hi << 4) | lo,
                _ => {
                    return Err(Error::invalid(format!(
                        "hash is not hexadecimal: {:?}",
                        String::from_utf8_lossy(bytes)
                    )))
                }
            }
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

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

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
    }
}
