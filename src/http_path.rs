//! Parsing request paths of the HTTP listener.
//!
//! Bazel's HTTP cache protocol names entries `/ac/{sha256}` and `/cas/{sha256}`,
//! optionally below a prefix that this node treats as the instance name (so
//! `--remote_cache=http://host:port/team-a` keeps team A's action results apart).
//! `/metrics`, `/healthz` and the status page (`/` and `/status`) sit beside them. A pure function over the path, so every
//! malformed path is a clear `InvalidArgument`, never a panic (a fuzz target checks).

use crate::error::{Error, Result};

/// What an HTTP request addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpPath<'a> {
    /// `/healthz`.
    Health,
    /// `/metrics`.
    Metrics,
    /// `/`: the status page.
    StatusPage,
    /// `/status`: the status page's data, as JSON.
    Status,
    /// `{instance}/ac/{hash}`: an action-cache entry.
    ActionCache {
        /// The prefix before `/ac/`, without slashes at either end.
        instance: &'a str,
        /// The action digest's SHA-256 hash, 64 lowercase hex digits.
        hash: &'a str,
    },
    /// `{instance}/cas/{hash}`: a blob.
    Cas {
        /// The prefix before `/cas/`, without slashes at either end.
        instance: &'a str,
        /// The blob's SHA-256 hash, 64 lowercase hex digits.
        hash: &'a str,
    },
}

/// Parses the path of a request (without query string).
pub fn parse(path: &str) -> Result<HttpPath<'_>> {
    match path {
        "/healthz" => return Ok(HttpPath::Health),
        "/metrics" => return Ok(HttpPath::Metrics),
        "/" => return Ok(HttpPath::StatusPage),
        "/status" => return Ok(HttpPath::Status),
        _ => {}
    }
    let invalid = |why: &str| Error::invalid_argument(format!("invalid path `{path}`: {why}"));
    let inner = path
        .strip_prefix('/')
        .ok_or_else(|| invalid("it must start with `/`"))?;
    let (rest, hash) = inner
        .rsplit_once('/')
        .ok_or_else(|| invalid("expected `/ac/{sha256}` or `/cas/{sha256}`"))?;
    let (instance, kind) = match rest.rsplit_once('/') {
        Some((instance, _)) if instance.split('/').any(str::is_empty) => {
            return Err(invalid("empty segment in the instance prefix"))
        }
        Some((instance, kind)) => (instance, kind),
        None => ("", rest),
    };
    if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(invalid(
            "the hash must be 64 lowercase hex digits (SHA-256)",
        ));
    }
    match kind {
        "ac" => Ok(HttpPath::ActionCache { instance, hash }),
        "cas" => Ok(HttpPath::Cas { instance, hash }),
        _ => Err(invalid("expected `/ac/{sha256}` or `/cas/{sha256}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn plain_and_prefixed_paths() {
        assert_eq!(parse("/healthz").unwrap(), HttpPath::Health);
        assert_eq!(parse("/metrics").unwrap(), HttpPath::Metrics);
        assert_eq!(parse("/").unwrap(), HttpPath::StatusPage);
        assert_eq!(parse("/status").unwrap(), HttpPath::Status);
        assert_eq!(
            parse(&format!("/ac/{HASH}")).unwrap(),
            HttpPath::ActionCache {
                instance: "",
                hash: HASH
            }
        );
        assert_eq!(
            parse(&format!("/team/a/cas/{HASH}")).unwrap(),
            HttpPath::Cas {
                instance: "team/a",
                hash: HASH
            }
        );
    }

    #[test]
    fn malformed_paths() {
        for path in [
            "",
            "ac/x",
            "/ac",
            "/ac/",
            "/cas/xyz",
            &format!("/blob/{HASH}"),
            &format!("/ac/{}", HASH.to_uppercase()),
            &format!("/ac/{HASH}/"),
            &format!("//ac/{HASH}"),
            &format!("/a//b/ac/{HASH}"),
            &format!("/ac/{}", &HASH[..63]),
            "/healthz/",
            "/é/ac/é",
        ] {
            assert!(parse(path).is_err(), "{path}");
        }
    }
}
