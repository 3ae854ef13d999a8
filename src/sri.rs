//! Subresource Integrity values: the `checksum.sri` qualifier of the Remote Asset API.
//!
//! Bazel sends the checksum of an `http_archive` or `http_file` as SRI,
//! `sha256-<base64>`. The format allows more: several space-separated hashes, each
//! optionally followed by `?options`, and as the SRI specification says the strongest
//! algorithm among them decides, any of its values matching being enough. sha256,
//! sha384 and sha512 are understood; tokens of other algorithms are skipped, and a
//! value naming none of the three is refused. This module depends only on `base64` and
//! the crate's error type, so the fuzz target compiles it from source.

use base64::Engine as _;

use crate::error::{Error, Result};

/// A hash algorithm of Subresource Integrity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SriAlgorithm {
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl SriAlgorithm {
    /// The name SRI writes before the hash.
    pub fn name(self) -> &'static str {
        match self {
            SriAlgorithm::Sha256 => "sha256",
            SriAlgorithm::Sha384 => "sha384",
            SriAlgorithm::Sha512 => "sha512",
        }
    }

    /// The length of the algorithm's hashes, in bytes.
    pub fn hash_len(self) -> usize {
        match self {
            SriAlgorithm::Sha256 => 32,
            SriAlgorithm::Sha384 => 48,
            SriAlgorithm::Sha512 => 64,
        }
    }
}

/// A parsed `checksum.sri` value: the strongest algorithm it names and the hashes it
/// accepts for that algorithm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sri {
    /// The algorithm that decides.
    pub algorithm: SriAlgorithm,
    /// The accepted hashes, each `algorithm.hash_len()` bytes.
    pub hashes: Vec<Vec<u8>>,
}

impl Sri {
    /// Parses a Subresource Integrity value: space-separated `algorithm-base64`
    /// tokens, each optionally followed by `?options` (ignored). Tokens of unknown
    /// algorithms are skipped; a value with no token of a known algorithm, or a
    /// known one whose hash does not decode to the algorithm's length, is refused.
    pub fn parse(value: &str) -> Result<Sri> {
        let mut best: Option<Sri> = None;
        for token in value.split_ascii_whitespace() {
            let token = token.split_once('?').map_or(token, |(hash, _)| hash);
            let Some((name, encoded)) = token.split_once('-') else {
                return Err(Error::invalid_argument(format!(
                    "checksum.sri `{token}` is not of the form `algorithm-base64`"
                )));
            };
            let algorithm = match name {
                "sha256" => SriAlgorithm::Sha256,
                "sha384" => SriAlgorithm::Sha384,
                "sha512" => SriAlgorithm::Sha512,
                _ => continue,
            };
            let hash = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()
                .filter(|hash| hash.len() == algorithm.hash_len())
                .ok_or_else(|| {
                    Error::invalid_argument(format!(
                        "checksum.sri `{token}` does not hold a base64 {} hash ({} bytes)",
                        algorithm.name(),
                        algorithm.hash_len()
                    ))
                })?;
            match &mut best {
                Some(sri) if sri.algorithm == algorithm => sri.hashes.push(hash),
                Some(sri) if sri.algorithm > algorithm => {}
                _ => {
                    best = Some(Sri {
                        algorithm,
                        hashes: vec![hash],
                    })
                }
            }
        }
        best.ok_or_else(|| {
            Error::invalid_argument(format!(
                "checksum.sri `{value}` names no supported algorithm (sha256, sha384, sha512)"
            ))
        })
    }

    /// The SHA-256 this value requires, when it decides by SHA-256 and accepts one hash.
    pub fn sha256(&self) -> Option<[u8; 32]> {
        match (self.algorithm, self.hashes.as_slice()) {
            (SriAlgorithm::Sha256, [only]) => <[u8; 32]>::try_from(only.as_slice()).ok(),
            _ => None,
        }
    }

    /// Whether `hash`, computed with [`Sri::algorithm`], is one this value accepts.
    pub fn matches(&self, hash: &[u8]) -> bool {
        self.hashes.iter().any(|expected| expected == hash)
    }

    /// `hash` written as an SRI token of this value's algorithm.
    pub fn describe(&self, hash: &[u8]) -> String {
        format!(
            "{}-{}",
            self.algorithm.name(),
            base64::engine::general_purpose::STANDARD.encode(hash)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";

    #[test]
    fn sri_values_parse() {
        let sri = Sri::parse(EMPTY_SHA256).unwrap();
        assert_eq!(sri.algorithm, SriAlgorithm::Sha256);
        assert_eq!(
            hex::encode(sri.sha256().unwrap()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let options = Sri::parse(&format!("{EMPTY_SHA256}?ct=application/x-tar")).unwrap();
        assert_eq!(options, sri);
    }

    #[test]
    fn the_strongest_sri_algorithm_decides() {
        let sha384 = format!(
            "sha384-{}",
            base64::engine::general_purpose::STANDARD.encode([7u8; 48])
        );
        let sri = Sri::parse(&format!("{EMPTY_SHA256} {sha384} md5-abc")).unwrap();
        assert_eq!(sri.algorithm, SriAlgorithm::Sha384);
        assert_eq!(sri.hashes, vec![vec![7u8; 48]]);
        assert_eq!(sri.sha256(), None);
    }

    #[test]
    fn bad_sri_values_are_refused() {
        for value in [
            "",
            "md5-abc",
            "sha256",
            "sha256-notbase64!",
            "sha256-AAAA",
            "sha512-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
        ] {
            let error = Sri::parse(value).unwrap_err();
            assert_eq!(error.kind(), crate::ErrorKind::InvalidArgument, "{value}");
        }
    }
}
