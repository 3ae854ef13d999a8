//! Reading the credentials a request presents in its `authorization` header.
//!
//! gRPC clients send `authorization: Bearer <token>` as metadata (Bazel:
//! `--remote_header=authorization=Bearer …`); HTTP clients send `Authorization: Basic
//! <base64 of user:password>` (Bazel: `--remote_cache=https://user:pass@host`) or a
//! bearer token. Both arrive here as the header's raw bytes, and the same parser reads
//! both, with the scheme matched without regard to case as RFC 9110 asks.
//!
//! The header is client input and carries a secret, so a value that cannot be read is
//! refused with a reason that never quotes it. This module only refers to
//! `crate::error`, so a fuzz target compiles it from source.

use base64::Engine as _;

use crate::error::{Error, Result};

/// Longest `authorization` value read, in bytes: far more than any token or basic
/// credential needs, and short enough that a client cannot make the node decode
/// megabytes of base64 per request.
pub const MAX_VALUE: usize = 4096;

/// The credential an `authorization` header presents.
#[derive(Clone, PartialEq, Eq)]
pub enum Presented {
    /// `Bearer <token>`.
    Bearer(String),
    /// `Basic <base64 of user:password>`.
    Basic {
        /// The user name (before the first `:`).
        user: String,
        /// The password (everything after it).
        password: Vec<u8>,
    },
}

impl std::fmt::Debug for Presented {
    // Secrets stay out of every log line and panic message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Presented::Bearer(_) => f.write_str("Bearer(…)"),
            Presented::Basic { user, .. } => write!(f, "Basic({user}, …)"),
        }
    }
}

/// Parses an `authorization` header value. Errors are `Unauthenticated` and never
/// contain the value.
pub fn parse(value: &[u8]) -> Result<Presented> {
    let malformed = |why: &str| Error::unauthenticated(format!("malformed authorization: {why}"));
    if value.len() > MAX_VALUE {
        return Err(malformed("longer than 4096 bytes"));
    }
    let text = std::str::from_utf8(value).map_err(|_| malformed("not ASCII"))?;
    if !text.is_ascii() {
        return Err(malformed("not ASCII"));
    }
    let text = text.trim_matches([' ', '\t']);
    let (scheme, rest) = text
        .split_once([' ', '\t'])
        .ok_or_else(|| malformed("expected `Bearer <token>` or `Basic <credentials>`"))?;
    let rest = rest.trim_start_matches([' ', '\t']);
    if rest.is_empty() {
        return Err(malformed("the credentials after the scheme are empty"));
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        if !rest.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(malformed(
                "a bearer token must be one word of visible characters",
            ));
        }
        Ok(Presented::Bearer(rest.to_string()))
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| malformed("basic credentials are not base64"))?;
        let split = decoded
            .iter()
            .position(|&b| b == b':')
            .ok_or_else(|| malformed("basic credentials have no `:` between user and password"))?;
        let user = String::from_utf8(decoded[..split].to_vec())
            .map_err(|_| malformed("the basic user name is not UTF-8"))?;
        Ok(Presented::Basic {
            user,
            password: decoded[split + 1..].to_vec(),
        })
    } else {
        Err(malformed(
            "unknown scheme; expected `Bearer <token>` or `Basic <credentials>`",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn bearer_tokens() {
        assert_eq!(
            parse(b"Bearer abc.DEF-123").unwrap(),
            Presented::Bearer("abc.DEF-123".to_string())
        );
        assert_eq!(
            parse(b"  bearer   tok  ").unwrap(),
            Presented::Bearer("tok".to_string())
        );
        assert_eq!(
            parse(b"BEARER tok").unwrap(),
            Presented::Bearer("tok".to_string())
        );
    }

    #[test]
    fn basic_credentials() {
        // "alice:s3cr:et" — the password may itself contain colons.
        assert_eq!(
            parse(b"Basic YWxpY2U6czNjcjpldA==").unwrap(),
            Presented::Basic {
                user: "alice".to_string(),
                password: b"s3cr:et".to_vec()
            }
        );
        // ":": empty user and password are read; they simply match nobody.
        assert_eq!(
            parse(b"basic Og==").unwrap(),
            Presented::Basic {
                user: String::new(),
                password: Vec::new()
            }
        );
    }

    #[test]
    fn malformed_values_are_refused_without_quoting_them() {
        let secret = "hunter2-very-secret";
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            secret.as_bytes().to_vec(),
            format!("Bearer {secret} extra").into_bytes(),
            format!("Token {secret}").into_bytes(),
            format!("Basic {secret}!").into_bytes(),
            b"Basic aHVudGVyMg==".to_vec(), // "hunter2": no colon
            b"Bearer ".to_vec(),
            format!("Bearer {secret}\u{e9}").into_bytes(),
            vec![b'B', 0xff, 0xfe],
            format!("Bearer {}", "x".repeat(MAX_VALUE)).into_bytes(),
        ];
        for value in cases {
            let error = parse(&value).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Unauthenticated);
            assert!(!error.message().contains("hunter2"), "{}", error.message());
            assert!(error.message().starts_with("malformed authorization"));
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let basic = Presented::Basic {
            user: "alice".to_string(),
            password: b"hunter2".to_vec(),
        };
        assert_eq!(format!("{basic:?}"), "Basic(alice, …)");
        let bearer = Presented::Bearer("hunter2".to_string());
        assert!(!format!("{bearer:?}").contains("hunter2"));
    }
}
