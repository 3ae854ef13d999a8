//! The node's configuration: a JSON5 file, overridden by command-line flags.
//!
//! Everything has a default, so `cairn` with no configuration at all is a working
//! single node on loopback. The file is JSON5 (comments, trailing commas) because
//! operators annotate their configs; unknown fields are rejected so a typo is an error
//! at startup, not a silently ignored setting. `${NAME}` inside any string value is
//! replaced by the environment variable `NAME` (an unset variable is an error), which
//! keeps secrets and per-host paths out of the file.
//!
//! One default depends on whether there is a file at all: `cairn` with no config runs
//! remote execution next to the cache (a scheduler and a worker of its own), because
//! the bare command is meant to be a complete single node; a config file describes a
//! deliberate layout, so it gets execution only from an explicit `execution` section
//! and a cache node of a distributed setup stays a cache.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::byte_size::ByteSize;
use crate::error::{Error, Result};
use crate::runtime::Timeouts;
use crate::slow_tier::config::S3Config;

/// The cache node's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the gRPC (REAPI) listener. Default `127.0.0.1:50051`: loopback,
    /// because remote execution runs commands for whoever connects.
    pub listen: SocketAddr,
    /// Address of the HTTP listener serving Bazel's HTTP cache protocol, `/metrics`
    /// and `/healthz`. Default: none (no HTTP listener).
    pub http_listen: Option<SocketAddr>,
    /// Directory holding the store. Default `./cairn-data`.
    pub data_dir: PathBuf,
    /// Byte budget of the store, e.g. `"20GiB"`. Default: 90% of the space available
    /// to the data directory when the node starts (free space on its filesystem plus
    /// what the directory already holds). A larger value is lowered at start to that
    /// same 90%, with a warning naming both (`cairn_budget_clamped_bytes`), rather than
    /// refused: a budget the disk cannot hold is a budget never reached, and the node
    /// is better off evicting within what the disk has than not starting after a move
    /// to a smaller disk or while another process holds part of it. Startup rejects
    /// only what cannot work at all.
    pub max_size: Option<ByteSize>,
    /// Bytes of recently written and read records (blobs, action results, Tree and
    /// Directory messages) kept in memory in front of the log, split between shards,
    /// and served without a device read; `"0"` turns the memory tier off. Default: a
    /// sixteenth of physical memory (`cairn_storage::default_memory_cache`): the log
    /// bypasses the page cache, so this memory would otherwise sit idle, and the rest
    /// stays with the builds and workers sharing the host. Peak RSS grows by up to
    /// this much plus 320 bytes an entry held (README, "Memory tier").
    pub memory_cache: Option<ByteSize>,
    /// Number of shards, each a thread pinned to a core with its own executor.
    /// Default: the number of CPUs this process may run on.
    pub shards: Option<usize>,
    /// Largest total of blob bytes in one BatchUpdateBlobs or BatchReadBlobs call,
    /// advertised in the capabilities. Default `4MiB`.
    pub max_batch_total_size: ByteSize,
    /// Largest blob the node accepts, advertised in the capabilities. Default `16GiB`,
    /// lowered at start to what the storage engine can hold: half of one partition's
    /// own budget, which is its share of the 7/8 of `max_size` left after the uploads'
    /// overflow pool (112 MiB for a 4 GiB budget over 16 partitions).
    pub max_cas_blob_size: ByteSize,
    /// How long an interrupted ByteStream upload is kept so the client can resume it
    /// from its committed size, in seconds. Default `60`.
    pub upload_resume_seconds: u64,
    /// How long a shutdown waits for in-flight requests before closing connections,
    /// in seconds. Default `10`.
    pub shutdown_grace_seconds: u64,
    /// How long a new connection may take to send its HTTP/2 preface (gRPC) or its
    /// first request's headers (HTTP/1.1; and every later request's) before it is
    /// closed, in seconds. Default `10`.
    pub handshake_timeout_seconds: u64,
    /// How long a connection with no request in flight and nothing received stays
    /// open before it is closed (GOAWAY on HTTP/2), in seconds. Default `600`.
    pub idle_timeout_seconds: u64,
    /// How often an HTTP/2 peer is pinged to find one that vanished without closing
    /// its connection (unanswered for the interval, at most 20 s, the connection is
    /// closed), in seconds.
    /// Default `60`.
    pub keepalive_interval_seconds: u64,
    /// Most client connections served at once, gRPC and HTTP together; a connection
    /// past it is closed as soon as it is accepted. Default: the open-file limit
    /// (raised at start to its hard maximum) less a reserve of 256 descriptors plus 4
    /// per storage partition for the node's own files, and at least 16.
    pub max_connections: Option<usize>,
    /// Most bytes of gRPC messages the node holds received in part, over every
    /// connection: a call whose incomplete message would go past it ends with
    /// RESOURCE_EXHAUSTED (`src/runtime/inbound.rs`). Default `256MiB`: room for 28
    /// batches at the 9 MiB message limit arriving at once, or 256 ByteStream chunks
    /// of 1 MiB.
    pub max_receiving_bytes: ByteSize,
    /// Most concurrent streams (calls) a client may open on one HTTP/2 connection,
    /// announced in the connection's settings; clients queue calls past it. Default
    /// `256`.
    pub max_streams_per_connection: u32,
    /// When a write is acknowledged: `"sync"` once an `fdatasync` covering it has
    /// completed (group commit: concurrent writes share one), so a power loss loses
    /// nothing acknowledged; `"interval"` as soon as it is written, with an
    /// `fdatasync` every second, so a power loss can drop up to the last second of
    /// acknowledged writes (a process crash loses nothing either way). Default
    /// `"sync"`, the promise docs/s3.md makes (`CAIRN_BENCH_DURABILITY` in `bench/`
    /// measures what it costs).
    pub durability: Durability,
    /// The S3 slow tier shared by a fleet of nodes (see `docs/s3.md` and
    /// [`S3Config`] for its settings and their defaults). Default: none, the node keeps
    /// everything on local disk only.
    pub s3: Option<S3Config>,
    /// Benchmarking only: serve every request from a bounded in-memory [`Sink`]
    /// instead of the store, to measure the network stack alone (see `bench/`).
    /// `max_size` bounds its memory (default `1GiB`). Default `false`.
    ///
    /// [`Sink`]: crate::sink::Sink
    pub sink: bool,
    /// Remote execution on this node's endpoint (see [`ExecutionConfig`]). Without a
    /// config file the node runs with execution and its defaults; a config file runs
    /// execution only if it has an `execution` section (`execution: {}` for the
    /// defaults), and `--no-execution` turns it off either way.
    #[serde(default)]
    pub execution: Option<ExecutionConfig>,
    /// The auth file: JSON5 principals (bearer-token hashes, bcrypt basic users or
    /// client-certificate names) with their permissions and instance prefixes (see the
    /// README's "Security" section). Read at start (a malformed file is refused) and
    /// reloaded when it changes. Default: none, every client may do everything, as
    /// befits a node reachable on loopback only.
    pub auth: Option<PathBuf>,
    /// Refuse every write (blob uploads, action results), whoever asks. Default
    /// `false`. Execution needs writes, so it needs `--no-execution` too.
    pub read_only: bool,
    /// Let a node with execution listen on a non-loopback address without `auth`,
    /// so that anyone who reaches it can run commands on the worker's host. Default
    /// `false`: such a node refuses to start.
    pub allow_unauthenticated_execution: bool,
    /// How long a Remote Asset FetchBlob may spend downloading (all its URLs together)
    /// when the request gives no `timeout`, in seconds. Default `600`; at least 1, and
    /// values over 3600 are lowered to it. A request's own `timeout` is honoured up to
    /// an hour too (see `docs/asset.md`).
    pub asset_fetch_timeout_seconds: u64,
    /// PEM certificate chain for TLS (1.2 and 1.3, rustls) on the gRPC listener (ALPN
    /// `h2`) and the HTTP listener; needs `tls_key`. It, the key and the client CA are
    /// read again when they change (polled every second), for new connections.
    /// Default: none, plaintext.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`. Default: none.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: with it, every client must present a certificate signed
    /// by one of them (mutual TLS). Default: none, no client certificate asked for.
    pub tls_client_ca: Option<PathBuf>,
}

/// When the store acknowledges a write (see [`Config::durability`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After an `fdatasync` covering the write (group commit).
    #[default]
    Sync,
    /// After the write; `fdatasync` once a second.
    Interval,
}

impl From<Durability> for cairn_storage::Durability {
    fn from(durability: Durability) -> Self {
        match durability {
            Durability::Sync => cairn_storage::Durability::Sync,
            Durability::Interval => cairn_storage::Durability::Interval,
        }
    }
}

/// Remote execution served by a single node: the node starts a `cairn-scheduler` and
/// one `cairn-worker` next to itself and forwards Execution and Operations to them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutionConfig {
    /// Actions the worker runs at once. Default: the number of CPUs the node may
    /// run on.
    pub max_inflight_tasks: Option<u32>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_listen: None,
            data_dir: PathBuf::from("./cairn-data"),
            max_size: None,
            memory_cache: None,
            shards: None,
            max_batch_total_size: ByteSize(4 << 20),
            max_cas_blob_size: ByteSize(16 << 30),
            upload_resume_seconds: 60,
            shutdown_grace_seconds: 10,
            handshake_timeout_seconds: 10,
            idle_timeout_seconds: 600,
            keepalive_interval_seconds: 60,
            max_connections: None,
            max_receiving_bytes: ByteSize(256 << 20),
            max_streams_per_connection: 256,
            durability: Durability::Sync,
            s3: None,
            sink: false,
            execution: Some(ExecutionConfig::default()),
            auth: None,
            read_only: false,
            allow_unauthenticated_execution: false,
            asset_fetch_timeout_seconds: 600,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
        }
    }
}

impl Config {
    /// Reads a JSON5 config file, expanding `${NAME}` in its strings.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            Error::invalid_argument(format!("cannot read config {}: {error}", path.display()))
        })?;
        Self::parse(&text)
            .map_err(|error| Error::invalid_argument(format!("{}: {error}", path.display())))
    }

    /// Parses the text of a JSON5 config, expanding `${NAME}` in its strings.
    pub fn parse(text: &str) -> Result<Config> {
        let mut value: Value =
            json5::from_str(text).map_err(|error| Error::invalid_argument(error.to_string()))?;
        expand_env(&mut value, &|name| std::env::var(name).ok())?;
        serde_json::from_value(value).map_err(|error| Error::invalid_argument(error.to_string()))
    }

    /// Refuses settings that would expose execution or cannot work together: remote
    /// execution on a non-loopback listener without `auth` (unless
    /// `allow_unauthenticated_execution`), and `read_only` with execution (whose
    /// worker must upload outputs). Runs before anything binds or starts.
    pub fn check_security(&self) -> Result<()> {
        if self.execution.is_none() {
            return Ok(());
        }
        if self.read_only {
            return Err(Error::invalid_argument(
                "--read-only refuses the uploads remote execution makes; add --no-execution \
                 (or leave the `execution` section out of the config)",
            ));
        }
        if self.auth.is_some() || self.allow_unauthenticated_execution {
            return Ok(());
        }
        let exposed = std::iter::once(self.listen)
            .chain(self.http_listen)
            .find(|address| !address.ip().is_loopback());
        match exposed {
            Some(address) => Err(Error::invalid_argument(format!(
                "refusing to serve remote execution on {address}, which is not a loopback \
                 address, without authentication: anyone who reaches it could run any \
                 command on this host. Give --auth FILE (principals with the `execute` \
                 permission), or --no-execution, or accept the risk with \
                 --allow-unauthenticated-execution"
            ))),
            None => Ok(()),
        }
    }

    /// The upload resumption window.
    pub fn upload_resume(&self) -> Duration {
        Duration::from_secs(self.upload_resume_seconds)
    }

    /// The download timeout of a FetchBlob that gives none; at least a second.
    pub fn asset_fetch_timeout(&self) -> Result<Duration> {
        if self.asset_fetch_timeout_seconds == 0 {
            return Err(Error::invalid_argument(
                "asset_fetch_timeout_seconds must be at least 1",
            ));
        }
        Ok(Duration::from_secs(self.asset_fetch_timeout_seconds))
    }

    /// The shutdown grace period.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_seconds)
    }

    /// The connection timeouts; each must be at least a second.
    pub fn connection_timeouts(&self) -> Result<Timeouts> {
        let seconds = |key: &str, value: u64| {
            if value == 0 {
                Err(Error::invalid_argument(format!(
                    "{key} must be at least 1 (seconds)"
                )))
            } else {
                Ok(Duration::from_secs(value))
            }
        };
        Ok(Timeouts {
            handshake: seconds("handshake_timeout_seconds", self.handshake_timeout_seconds)?,
            idle: seconds("idle_timeout_seconds", self.idle_timeout_seconds)?,
            keepalive: seconds(
                "keepalive_interval_seconds",
                self.keepalive_interval_seconds,
            )?,
        })
    }
}

/// Replaces `${NAME}` in every string of `value` with `lookup(NAME)`.
fn expand_env(value: &mut Value, lookup: &dyn Fn(&str) -> Option<String>) -> Result<()> {
    match value {
        Value::String(text) => *text = expand_string(text, lookup)?,
        Value::Array(items) => {
            for item in items {
                expand_env(item, lookup)?;
            }
        }
        Value::Object(fields) => {
            for field in fields.values_mut() {
                expand_env(field, lookup)?;
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    Ok(())
}

fn expand_string(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String> {
    let mut expanded = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        expanded.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| {
            Error::invalid_argument(format!("unterminated `${{` in config value `{text}`"))
        })?;
        let name = &after[..end];
        let value = lookup(name).ok_or_else(|| {
            Error::invalid_argument(format!(
                "config value `{text}` names environment variable `{name}`, which is not set"
            ))
        })?;
        expanded.push_str(&value);
        rest = &after[end + 1..];
    }
    expanded.push_str(rest);
    Ok(expanded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_the_defaults() {
        let config = Config::parse("{}").unwrap();
        assert_eq!(config.listen, SocketAddr::from(([127, 0, 0, 1], 50051)));
        assert_eq!(config.data_dir, PathBuf::from("./cairn-data"));
        assert_eq!(config.max_batch_total_size, ByteSize(4 << 20));
        assert!(config.max_size.is_none());
        assert_eq!(config.durability, Durability::Sync);
        assert!(
            config.execution.is_none(),
            "a file needs an execution section"
        );
        assert!(Config::default().execution.is_some());
    }

    #[test]
    fn execution_section() {
        let config = Config::parse("{ execution: {} }").unwrap();
        assert_eq!(config.execution.unwrap().max_inflight_tasks, None);
        let config = Config::parse("{ execution: { max_inflight_tasks: 3 } }").unwrap();
        assert_eq!(config.execution.unwrap().max_inflight_tasks, Some(3));
        assert!(Config::parse("{ execution: { workers: 2 } }").is_err());
    }

    #[test]
    fn json5_with_sizes_and_comments() {
        let config = Config::parse(
            "{ // a node\n listen: '0.0.0.0:9000', max_size: '20GiB', shards: 2,\n max_cas_blob_size: 1024, }",
        )
        .unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.max_size, Some(ByteSize(20 << 30)));
        assert_eq!(config.shards, Some(2));
        assert_eq!(config.max_cas_blob_size, ByteSize(1024));
    }

    #[test]
    fn durability_values() {
        let config = Config::parse("{ durability: 'interval' }").unwrap();
        assert_eq!(config.durability, Durability::Interval);
        assert_eq!(
            Config::parse("{ durability: 'sync' }").unwrap().durability,
            Durability::Sync
        );
        let error = Config::parse("{ durability: 'never' }").unwrap_err();
        assert!(error.message().contains("never"), "{error}");
    }

    #[test]
    fn security_settings() {
        let config = Config::parse(
            "{ auth: '/etc/cairn/auth.json5', read_only: true, allow_unauthenticated_execution: true }",
        )
        .unwrap();
        assert_eq!(config.auth, Some(PathBuf::from("/etc/cairn/auth.json5")));
        assert!(config.read_only);
        assert!(config.allow_unauthenticated_execution);
        let defaults = Config::parse("{}").unwrap();
        assert!(defaults.auth.is_none() && !defaults.read_only);
        assert!(!defaults.allow_unauthenticated_execution);
    }

    #[test]
    fn execution_on_the_network_needs_auth() {
        let mut config = Config::default();
        config.check_security().unwrap();
        config.listen = "0.0.0.0:50051".parse().unwrap();
        let message = config.check_security().unwrap_err().to_string();
        assert!(message.contains("--auth"), "{message}");
        assert!(
            message.contains("--allow-unauthenticated-execution"),
            "{message}"
        );
        config.allow_unauthenticated_execution = true;
        config.check_security().unwrap();
        config.allow_unauthenticated_execution = false;
        config.auth = Some(PathBuf::from("auth.json5"));
        config.check_security().unwrap();
        config.auth = None;
        config.execution = None;
        config.check_security().unwrap();

        let mut http = Config {
            http_listen: Some("192.0.2.1:8080".parse().unwrap()),
            ..Config::default()
        };
        assert!(http.check_security().is_err());
        http.http_listen = Some("[::1]:8080".parse().unwrap());
        http.check_security().unwrap();

        let mut read_only = Config {
            read_only: true,
            ..Config::default()
        };
        let message = read_only.check_security().unwrap_err().to_string();
        assert!(message.contains("--no-execution"), "{message}");
        read_only.execution = None;
        read_only.check_security().unwrap();

        // TLS with the node's own execution: on loopback as without TLS, and off it
        // only with credentials, like any node that executes.
        let mut tls = Config {
            tls_cert: Some(PathBuf::from("cert.pem")),
            ..Config::default()
        };
        tls.check_security().unwrap();
        tls.listen = "0.0.0.0:50051".parse().unwrap();
        let message = tls.check_security().unwrap_err().to_string();
        assert!(message.contains("--auth"), "{message}");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let error = Config::parse("{ lisen: '127.0.0.1:1' }").unwrap_err();
        assert!(error.message().contains("lisen"), "{error}");
    }

    #[test]
    fn env_expansion() {
        let lookup = |name: &str| (name == "ROOT").then(|| "/srv".to_string());
        assert_eq!(
            expand_string("${ROOT}/cache", &lookup).unwrap(),
            "/srv/cache"
        );
        assert_eq!(
            expand_string("plain $ text", &lookup).unwrap(),
            "plain $ text"
        );
        assert!(expand_string("${MISSING}", &lookup).is_err());
        assert!(expand_string("${ROOT", &lookup).is_err());
        let mut value = serde_json::json!({"a": ["${ROOT}", 1], "b": {"c": "x${ROOT}"}});
        expand_env(&mut value, &lookup).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"a": ["/srv", 1], "b": {"c": "x/srv"}})
        );
    }
}
