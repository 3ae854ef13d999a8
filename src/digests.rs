//! Converting between REAPI's wire digests and the engine's.
//!
//! On the wire a digest is a hex string and a signed size, and the digest function is
//! a separate field of the request (absent in older clients, which means SHA-256).
//! Everything is validated here, once, so the services below only see well-formed
//! [`Digest`]s: a hash of the wrong length or with non-hex characters, a negative size
//! or an unsupported function is an `InvalidArgument` error naming the culprit.

use cairn_proto::reapi;
use cairn_proto::reapi::digest_function::Value as FunctionValue;
use cairn_storage::{Digest, DigestFunction};

use crate::error::{Error, Result};

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

/// Parses a hash written as REAPI requires: lowercase hexadecimal, of the length
/// `function` produces.
pub fn parse_hash(function: DigestFunction, hash: &str, size: u64) -> Result<Digest> {
    Digest::from_lower_hex(function, hash, size).map_err(|error| {
        if hash.bytes().any(|b| b.is_ascii_uppercase()) {
            Error::invalid_argument(format!("hash `{hash}` is not lowercase hexadecimal"))
        } else {
            Error::invalid_argument(format!("invalid hash `{hash}`: {error}"))
        }
    })
}

/// Validates a wire digest.
pub fn from_proto(function: DigestFunction, digest: &reapi::Digest) -> Result<Digest> {
    let size = u64::try_from(digest.size_bytes).map_err(|_| {
        Error::invalid_argument(format!(
            "digest {}/{} has a negative size",
            digest.hash, digest.size_bytes
        ))
    })?;
    parse_hash(function, &digest.hash, size)
}

/// Validates an optional wire digest, which must be present.
pub fn required(
    function: DigestFunction,
    digest: Option<&reapi::Digest>,
    what: &str,
) -> Result<Digest> {
    match digest {
        Some(digest) => from_proto(function, digest),
        None => Err(Error::invalid_argument(format!("{what} is missing"))),
    }
}

/// The wire form of a digest.
pub fn to_proto(digest: &Digest) -> reapi::Digest {
    reapi::Digest {
        hash: digest.hash_hex(),
        size_bytes: digest.size as i64,
    }
}
