//! What `cairn-scheduler` and `cairn-worker` share.
//!
//! Both are plain tokio programs that talk to the cache node and to each other over
//! tonic's HTTP/2 transport; neither starts glommio or the storage engine, so they run
//! on hosts without io_uring. The pieces here are the ones both need in the same
//! form: reading a JSON5 config, writing durations the way operators do ("30s"),
//! turning the crate's [`Error`] into the `google.rpc.Status` that travels inside an
//! `ExecuteResponse` and back, and the wire forms of times.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_proto::rpc;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;

use crate::client_tls::ClientTls;

use crate::error::{Error, ErrorKind, Result};

/// Reads a JSON5 config file into `T`, whose unknown fields should be rejected.
pub fn load_json5<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        Error::invalid_argument(format!("cannot read config {}: {error}", path.display()))
    })?;
    parse_json5(&text)
        .map_err(|error| Error::invalid_argument(format!("{}: {error}", path.display())))
}

/// Parses the text of a JSON5 config into `T`.
pub fn parse_json5<T: DeserializeOwned>(text: &str) -> Result<T> {
    json5::from_str(text).map_err(|error| Error::invalid_argument(error.to_string()))
}

/// Parses a duration written as a number and a unit: `250ms`, `30s`, `5m`, `2h`.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number.parse().map_err(|_| {
        Error::invalid_argument(format!(
            "duration `{text}` must be a whole number with a unit (ms, s, m, h)"
        ))
    })?;
    let duration = match unit.trim() {
        "ms" => Duration::from_millis(value),
        "s" => Duration::from_secs(value),
        "m" => Duration::from_secs(value.saturating_mul(60)),
        "h" => Duration::from_secs(value.saturating_mul(3600)),
        _ => {
            return Err(Error::invalid_argument(format!(
                "duration `{text}` needs a unit: ms, s, m or h"
            )))
        }
    };
    Ok(duration)
}

/// Serde adapter for durations in configs, written as [`parse_duration`] reads them.
pub fn deserialize_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

/// A `google.rpc.Status` with `code` and `message`.
pub fn rpc_status(code: tonic::Code, message: impl Into<String>) -> rpc::Status {
    rpc::Status {
        code: code as i32,
        message: message.into(),
        details: Vec::new(),
    }
}

/// The `google.rpc.Status` a client sees for `error`.
pub fn error_to_rpc(error: &Error) -> rpc::Status {
    rpc_status(error.kind().grpc_code(), error.message())
}

/// The crate's error for a failed call to another cairn service; `what` says which
/// call, so the message names it.
pub fn error_from_status(what: &str, status: &tonic::Status) -> Error {
    let kind = match status.code() {
        tonic::Code::InvalidArgument => ErrorKind::InvalidArgument,
        tonic::Code::NotFound => ErrorKind::NotFound,
        tonic::Code::OutOfRange => ErrorKind::OutOfRange,
        tonic::Code::ResourceExhausted => ErrorKind::ResourceExhausted,
        tonic::Code::FailedPrecondition => ErrorKind::FailedPrecondition,
        tonic::Code::DataLoss => ErrorKind::DataLoss,
        tonic::Code::Unauthenticated => ErrorKind::Unauthenticated,
        tonic::Code::PermissionDenied => ErrorKind::PermissionDenied,
        tonic::Code::Unavailable
        | tonic::Code::DeadlineExceeded
        | tonic::Code::Aborted
        | tonic::Code::Cancelled => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    };
    Error::new(kind, format!("{what}: {}", status.message()))
}

/// The crate's error for a `google.rpc.Status` code number.
pub fn error_from_rpc(status: &rpc::Status) -> Error {
    let code = tonic::Code::from_i32(status.code);
    error_from_status("", &tonic::Status::new(code, status.message.clone()))
}

/// The wire form of a wall-clock time.
pub fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

/// The wire form of a duration.
pub fn proto_duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

/// A wire duration as a [`Duration`]; `None` when it is zero or negative.
pub fn from_proto_duration(duration: &prost_types::Duration) -> Option<Duration> {
    let seconds = u64::try_from(duration.seconds).ok()?;
    let nanos = u32::try_from(duration.nanos).ok()?;
    let duration = Duration::new(seconds, nanos);
    (!duration.is_zero()).then_some(duration)
}

/// A channel to `url` that connects on first use and reconnects after failures, so a
/// program can start before the service it talks to; TLS per `tls` for `https://`.
pub fn lazy_channel(url: &str, tls: &ClientTls) -> Result<Channel> {
    Ok(tls
        .endpoint(url)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// A channel to the cache node whose every call presents the configured bearer token
/// (none: calls go without credentials, as a node without `--auth` expects).
pub type CacheChannel = InterceptedService<Channel, BearerToken>;

/// Adds `authorization: Bearer <token>` to every call, when there is a token.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// Presents `token`, or nothing when `None`.
    pub fn new(token: Option<&str>) -> Result<Self> {
        let header = token
            .map(|token| {
                MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                    Error::invalid_argument(
                        "the token must be visible ASCII characters without spaces",
                    )
                })
            })
            .transpose()?;
        Ok(BearerToken(header))
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A lazily connecting channel (see [`lazy_channel`]) to the cache node at `url`,
/// presenting `token` if given.
pub fn cache_channel(url: &str, token: Option<&str>, tls: &ClientTls) -> Result<CacheChannel> {
    Ok(InterceptedService::new(
        lazy_channel(url, tls)?,
        BearerToken::new(token)?,
    ))
}

/// Reads a bearer token from `path`: the file's text without surrounding whitespace.
pub fn read_token_file(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        Error::invalid_argument(format!(
            "cannot read the token file {}: {error}",
            path.display()
        ))
    })?;
    let token = text.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid_argument(format!(
            "the token file {} must hold one token of visible ASCII characters",
            path.display()
        )));
    }
    Ok(token.to_string())
}

/// Writes `contents` to `path` atomically (a temporary file renamed into place), so a
/// process polling for the file never reads half of it.
pub fn write_ready_file(path: &Path, contents: &str) -> Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    std::fs::write(&temporary, contents)?;
    std::fs::rename(&temporary, path)?;
    Ok(())
}

/// Sixteen random bytes as hex: unique, unguessable names for operations.
pub fn random_name() -> String {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: writes at most `bytes.len() - filled` bytes into the rest of `bytes`.
        let got = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if got <= 0 {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            let fallback = nanos.to_le_bytes();
            let rest = bytes.len() - filled;
            bytes[filled..].copy_from_slice(&fallback[..rest]);
            break;
        }
        filled += got as usize;
    }
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn proto_durations_round_trip() {
        let duration = Duration::from_millis(1500);
        assert_eq!(
            from_proto_duration(&proto_duration(duration)),
            Some(duration)
        );
        assert_eq!(from_proto_duration(&prost_types::Duration::default()), None);
        let negative = prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert_eq!(from_proto_duration(&negative), None);
    }

    #[test]
    fn token_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc-123\n").unwrap();
        assert_eq!(read_token_file(&path).unwrap(), "abc-123");
        std::fs::write(&path, "two words").unwrap();
        let error = read_token_file(&path).unwrap_err();
        assert!(!error.message().contains("words"), "{error}");
        std::fs::write(&path, "\n").unwrap();
        assert!(read_token_file(&path).is_err());
        assert!(read_token_file(&dir.path().join("absent")).is_err());
    }

    #[test]
    fn names_are_distinct() {
        let a = random_name();
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_name());
    }
}
