//! Parsing ByteStream resource names.
//!
//! REAPI encodes everything a ByteStream call needs in one string: the instance name,
//! for writes an upload id, whether the bytes are compressed and with what, the digest
//! function, the hash and the size. The rules (from `remote_execution.proto`):
//!
//! - read: `{instance}/blobs/{function/}{hash}/{size}` or
//!   `{instance}/compressed-blobs/{compressor}/{function/}{hash}/{size}`;
//! - write: `{instance}/uploads/{uuid}/blobs/{function/}{hash}/{size}{/metadata}` or the
//!   same with `compressed-blobs/{compressor}/`;
//! - the instance may span several segments (or none), and none of them may be one of
//!   the keywords below, which is what makes the grammar unambiguous;
//! - the function segment is present only for functions whose hashes cannot be told
//!   apart by length (here: BLAKE3 vs SHA-256); without it a 64-digit hash is SHA-256.
//!
//! These are pure functions over `&str`: every malformed name is an
//! `InvalidArgument` error naming what is wrong, never a panic, which a fuzz target
//! checks.

use cairn_storage::{Digest, DigestFunction};

use crate::error::{Error, Result};

/// Segments that can never be part of an instance name.
const KEYWORDS: &[&str] = &[
    "blobs",
    "uploads",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
    "compressed-blobs",
];

/// Digest function names REAPI defines but this node does not serve.
const UNSUPPORTED_FUNCTIONS: &[&str] = &[
    "md5",
    "sha1",
    "sha384",
    "sha512",
    "vso",
    "murmur3",
    "sha256tree",
];

/// How the bytes of a ByteStream call are encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain bytes (`blobs/`).
    Identity,
    /// A zstd frame (`compressed-blobs/zstd/`).
    Zstd,
}

/// A parsed read resource name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadName<'a> {
    /// The instance name, possibly empty, possibly several segments.
    pub instance: &'a str,
    /// The encoding of the bytes on the wire.
    pub compression: Compression,
    /// The digest of the uncompressed blob.
    pub digest: Digest,
}

/// A parsed write resource name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteName<'a> {
    /// The instance name, possibly empty, possibly several segments.
    pub instance: &'a str,
    /// The client's upload id.
    pub uuid: &'a str,
    /// The encoding of the bytes on the wire.
    pub compression: Compression,
    /// The digest of the uncompressed blob.
    pub digest: Digest,
}

/// Parses `{instance}/blobs/...` or `{instance}/compressed-blobs/...`.
pub fn parse_read(name: &str) -> Result<ReadName<'_>> {
    let segments: Vec<&str> = name.split('/').collect();
    let start = first_keyword(name, &segments)?;
    let instance = instance_of(name, &segments, start)?;
    let (compression, digest, rest) = parse_blob(name, &segments[start..])?;
    if !rest.is_empty() {
        return Err(invalid(name, "unexpected segments after the size"));
    }
    Ok(ReadName {
        instance,
        compression,
        digest,
    })
}

/// Parses `{instance}/uploads/{uuid}/blobs/...{/metadata}` or its `compressed-blobs` form.
pub fn parse_write(name: &str) -> Result<WriteName<'_>> {
    let segments: Vec<&str> = name.split('/').collect();
    let start = first_keyword(name, &segments)?;
    if segments[start] != "uploads" {
        return Err(invalid(
            name,
            "a write resource name starts with `uploads/`",
        ));
    }
    let instance = instance_of(name, &segments, start)?;
    let uuid = match segments.get(start + 1) {
        Some(uuid) if !uuid.is_empty() && !KEYWORDS.contains(uuid) => *uuid,
        _ => return Err(invalid(name, "missing upload id after `uploads/`")),
    };
    let (compression, digest, _metadata) = parse_blob(name, &segments[start + 2..])?;
    Ok(WriteName {
        instance,
        uuid,
        compression,
        digest,
    })
}

/// The index of the first keyword segment; everything before it is the instance name.
fn first_keyword(name: &str, segments: &[&str]) -> Result<usize> {
    segments
        .iter()
        .position(|segment| KEYWORDS.contains(segment))
        .ok_or_else(|| invalid(name, "no `blobs`, `compressed-blobs` or `uploads` segment"))
}

/// The instance name: the text before segment `start`, which must have no empty segment.
fn instance_of<'a>(name: &'a str, segments: &[&str], start: usize) -> Result<&'a str> {
    if segments[..start].iter().any(|segment| segment.is_empty()) {
        return Err(invalid(name, "empty segment in the instance name"));
    }
    let length: usize = segments[..start].iter().map(|s| s.len() + 1).sum();
    Ok(&name[..length.saturating_sub(1)])
}

/// Parses `blobs/{function/}{hash}/{size}` or `compressed-blobs/{compressor}/...`,
/// returning the segments left after the size.
fn parse_blob<'s>(
    name: &str,
    segments: &'s [&'s str],
) -> Result<(Compression, Digest, &'s [&'s str])> {
    let (compression, rest) = match segments {
        ["blobs", rest @ ..] => (Compression::Identity, rest),
        ["compressed-blobs", "zstd", rest @ ..] => (Compression::Zstd, rest),
        ["compressed-blobs", compressor, ..] => {
            return Err(invalid(
                name,
                &format!("compressor `{compressor}` is not supported (only `zstd`)"),
            ))
        }
        _ => return Err(invalid(name, "expected `blobs/` or `compressed-blobs/`")),
    };
    let (function, rest) = match rest {
        [first, rest @ ..] if *first == "sha256" => (Some(DigestFunction::Sha256), rest),
        [first, rest @ ..] if *first == "blake3" => (Some(DigestFunction::Blake3), rest),
        [first, ..] if UNSUPPORTED_FUNCTIONS.contains(first) => {
            return Err(invalid(
                name,
                &format!("digest function `{first}` is not supported"),
            ))
        }
        _ => (None, rest),
    };
    let [hash, size, rest @ ..] = rest else {
        return Err(invalid(name, "expected `{hash}/{size}`"));
    };
    let size = parse_size(size).ok_or_else(|| invalid(name, "size is not a decimal number"))?;
    let function = match function {
        Some(function) => function,
        None if hash.len() == 64 => DigestFunction::Sha256,
        None => {
            return Err(invalid(
                name,
                &format!(
                    "a hash of {} characters names no supported digest function",
                    hash.len()
                ),
            ))
        }
    };
    let digest = crate::digests::parse_hash(function, hash, size)
        .map_err(|error| invalid(name, error.message()))?;
    Ok((compression, digest, rest))
}

/// A size segment: ASCII digits only (no sign), fitting in an `i64` as REAPI sizes do.
fn parse_size(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<i64>().ok().map(|size| size as u64)
}

fn invalid(name: &str, why: &str) -> Error {
    Error::invalid_argument(format!("invalid resource name `{name}`: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    const HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn sha(size: u64) -> Digest {
        Digest::from_hex(DigestFunction::Sha256, HASH, size).unwrap()
    }

    fn rejected(result: Result<impl std::fmt::Debug>) {
        match result {
            Err(error) => assert_eq!(error.kind(), ErrorKind::InvalidArgument, "{error}"),
            Ok(parsed) => panic!("accepted: {parsed:?}"),
        }
    }

    #[test]
    fn read_without_instance() {
        let name = format!("blobs/{HASH}/12");
        let parsed = parse_read(&name).unwrap();
        assert_eq!(parsed.instance, "");
        assert_eq!(parsed.compression, Compression::Identity);
        assert_eq!(parsed.digest, sha(12));
    }

    #[test]
    fn read_with_multi_segment_instance() {
        let name = format!("a/b/c/blobs/{HASH}/0");
        let parsed = parse_read(&name).unwrap();
        assert_eq!(parsed.instance, "a/b/c");
        assert_eq!(parsed.digest, sha(0));
    }

    #[test]
    fn read_with_digest_function() {
        let name = format!("main/blobs/blake3/{HASH}/5");
        let parsed = parse_read(&name).unwrap();
        assert_eq!(parsed.digest.function, DigestFunction::Blake3);
        let name = format!("blobs/sha256/{HASH}/5");
        let parsed = parse_read(&name).unwrap();
        assert_eq!(parsed.digest, sha(5));
    }

    #[test]
    fn read_compressed() {
        let name = format!("x/compressed-blobs/zstd/{HASH}/7");
        let parsed = parse_read(&name).unwrap();
        assert_eq!(parsed.compression, Compression::Zstd);
        assert_eq!(parsed.instance, "x");
        let name = format!("compressed-blobs/zstd/blake3/{HASH}/7");
        let parsed = parse_read(&name).unwrap();
        assert_eq!(parsed.digest.function, DigestFunction::Blake3);
    }

    #[test]
    fn write_forms() {
        let name = format!("uploads/u-1/blobs/{HASH}/3");
        let parsed = parse_write(&name).unwrap();
        assert_eq!((parsed.instance, parsed.uuid), ("", "u-1"));
        assert_eq!(parsed.digest, sha(3));
        let name = format!("i/j/uploads/u/blobs/{HASH}/3/meta/data");
        let parsed = parse_write(&name).unwrap();
        assert_eq!(parsed.instance, "i/j");
        let name = format!("uploads/u/compressed-blobs/zstd/blake3/{HASH}/3");
        let parsed = parse_write(&name).unwrap();
        assert_eq!(parsed.compression, Compression::Zstd);
        assert_eq!(parsed.digest.function, DigestFunction::Blake3);
    }

    #[test]
    fn malformed_names_are_invalid_arguments() {
        rejected(parse_read(""));
        rejected(parse_read("/"));
        rejected(parse_read("blobs"));
        rejected(parse_read(&format!("blobs/{HASH}")));
        rejected(parse_read(&format!("blobs/{HASH}/12/extra")));
        rejected(parse_read(&format!("/blobs/{HASH}/12")));
        rejected(parse_read(&format!("a//b/blobs/{HASH}/12")));
        rejected(parse_read(&format!("uploads/u/blobs/{HASH}/12")));
        rejected(parse_read(&format!("actions/blobs/{HASH}/12")));
        rejected(parse_read(&format!("something/{HASH}/12")));
        rejected(parse_write(&format!("blobs/{HASH}/12")));
        rejected(parse_write(&format!("uploads//blobs/{HASH}/12")));
        rejected(parse_write(&format!("uploads/blobs/{HASH}/12")));
        rejected(parse_write("uploads/u"));
    }

    #[test]
    fn bad_sizes() {
        rejected(parse_read(&format!("blobs/{HASH}/-1")));
        rejected(parse_read(&format!("blobs/{HASH}/+1")));
        rejected(parse_read(&format!("blobs/{HASH}/1e3")));
        rejected(parse_read(&format!("blobs/{HASH}/")));
        rejected(parse_read(&format!("blobs/{HASH}/99999999999999999999")));
        rejected(parse_read(&format!("blobs/{HASH}/9223372036854775808")));
    }

    #[test]
    fn bad_hashes() {
        rejected(parse_read("blobs/xyz/12"));
        rejected(parse_read(&format!("blobs/{}/12", &HASH[..63])));
        rejected(parse_read(&format!("blobs/{HASH}0/12")));
        rejected(parse_read(&format!("blobs/{}g/12", &HASH[..63])));
        rejected(parse_read(&format!("blobs/{}/12", HASH.to_uppercase())));
        rejected(parse_read(&format!("blobs/blake3/{}/12", &HASH[..40])));
        rejected(parse_read(
            "blobs/da39a3ee5e6b4b0d3255bfef95601890afd80709/0",
        ));
    }

    #[test]
    fn unsupported_functions_and_compressors() {
        rejected(parse_read(&format!("blobs/sha1/{HASH}/1")));
        rejected(parse_read(&format!("blobs/md5/{HASH}/1")));
        rejected(parse_read(&format!("compressed-blobs/deflate/{HASH}/1")));
        rejected(parse_read(&format!("compressed-blobs/identity/{HASH}/1")));
        rejected(parse_read(&format!("compressed-blobs/{HASH}/1")));
    }

    #[test]
    fn never_panics_on_odd_input() {
        for name in [
            "blobs/",
            "blobs//",
            "compressed-blobs",
            "compressed-blobs/zstd",
            "uploads/",
            "uploads/u/",
            "uploads/u/compressed-blobs/zstd/",
            "\u{0}/blobs/\u{ff}/1",
            "é/blobs/é/1",
        ] {
            assert!(parse_read(name).is_err(), "{name}");
            assert!(parse_write(name).is_err(), "{name}");
        }
    }
}
