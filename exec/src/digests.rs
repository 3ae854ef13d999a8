//! Digests as the scheduler and the worker handle them: REAPI's wire form, checked
//! and computed without the storage engine.
//!
//! The cache node converts wire digests into the engine's own type, which it needs
//! for keys and records. The execution programs never store anything themselves:
//! they only check that a digest a client sent is well formed before acting on it
//! (so a malformed one is an `InvalidArgument` naming it, not a failed read later),
//! and the worker hashes the outputs it uploads. Both work on the wire type here.

use cairn_proto::reapi;
use cairn_proto::reapi::digest_function::Value as FunctionValue;
use sha2::Digest as _;

use crate::error::{Error, Result};

/// The digest functions cairn serves: REAPI's default, SHA-256, and BLAKE3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestFunction {
    Sha256,
    Blake3,
}

impl DigestFunction {
    /// A hasher of this function.
    pub fn hasher(self) -> Hasher {
        match self {
            DigestFunction::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            DigestFunction::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }
}

/// An incremental hash of either function; both produce 32 bytes.
pub enum Hasher {
    Sha256(sha2::Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(hasher) => hasher.update(data),
            Hasher::Blake3(hasher) => {
                hasher.update(data);
            }
        }
    }

    pub fn finalize(self) -> [u8; 32] {
        match self {
            Hasher::Sha256(hasher) => hasher.finalize().into(),
            Hasher::Blake3(hasher) => *hasher.finalize().as_bytes(),
        }
    }
}

/// The digest function a request names; unset means SHA-256, as REAPI prescribes for
/// 64-digit hashes.
pub fn function_of_request(value: i32) -> Result<DigestFunction> {
    match FunctionValue::try_from(value) {
        Ok(FunctionValue::Unknown) | Ok(FunctionValue::Sha256) => Ok(DigestFunction::Sha256),
        Ok(FunctionValue::Blake3) => Ok(DigestFunction::Blake3),
        Ok(other) => Err(Error::invalid_argument(format!(
            "digest function {} is not supported (SHA256 and BLAKE3 are)",
            other.as_str_name()
        ))),
        Err(_) => Err(Error::invalid_argument(format!(
            "unknown digest function {value}"
        ))),
    }
}

/// The wire value of a digest function.
pub fn function_to_proto(function: DigestFunction) -> FunctionValue {
    match function {
        DigestFunction::Sha256 => FunctionValue::Sha256,
        DigestFunction::Blake3 => FunctionValue::Blake3,
    }
}

/// Checks a wire digest: a size that is not negative and a hash of 64 lowercase
/// hexadecimal digits (both functions produce 32 bytes).
pub fn check(digest: &reapi::Digest) -> Result<()> {
    if digest.size_bytes < 0 {
        return Err(Error::invalid_argument(format!(
            "digest {}/{} has a negative size",
            digest.hash, digest.size_bytes
        )));
    }
    let well_formed = digest.hash.len() == 64
        && digest
            .hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !well_formed {
        return Err(Error::invalid_argument(format!(
            "invalid hash `{}`: 64 lowercase hexadecimal digits expected",
            digest.hash
        )));
    }
    Ok(())
}

/// An optional wire digest, which must be present and well formed.
pub fn required(digest: Option<&reapi::Digest>, what: &str) -> Result<reapi::Digest> {
    let digest = digest.ok_or_else(|| Error::invalid_argument(format!("{what} is missing")))?;
    check(digest)?;
    Ok(digest.clone())
}

/// The digest of in-memory data.
pub fn of(function: DigestFunction, data: &[u8]) -> reapi::Digest {
    let mut hasher = function.hasher();
    hasher.update(data);
    reapi::Digest {
        hash: hex::encode(hasher.finalize()),
        size_bytes: data.len() as i64,
    }
}

/// A wire digest's identity as a map key: its hash and size, as the client wrote them
/// (not validated).
pub type BlobKey = (String, i64);

/// The map key of `digest`.
pub fn key(digest: &reapi::Digest) -> BlobKey {
    (digest.hash.clone(), digest.size_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_the_published_empty_digests() {
        assert_eq!(
            of(DigestFunction::Sha256, b"").hash,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            of(DigestFunction::Blake3, b"").hash,
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn malformed_digests_are_invalid_arguments_naming_them() {
        let digest = |hash: &str, size| reapi::Digest {
            hash: hash.to_string(),
            size_bytes: size,
        };
        let good = "a".repeat(64);
        assert!(check(&digest(&good, 3)).is_ok());
        for (hash, size) in [
            (good.as_str(), -1),
            (&"A".repeat(64), 3),
            (&"a".repeat(63), 3),
            (&"g".repeat(64), 3),
        ] {
            let error = check(&digest(hash, size)).unwrap_err();
            assert_eq!(error.kind(), crate::ErrorKind::InvalidArgument);
            assert!(error.message().contains(&hash[..8]), "{error}");
        }
        assert!(required(None, "command_digest")
            .unwrap_err()
            .message()
            .contains("command_digest"));
        assert!(function_of_request(99).is_err());
    }
}
