//! The scheduler's configuration: a JSON5 file, overridden by command-line flags.
//!
//! Every setting has a default, so `cairn-scheduler` with no file is a scheduler on
//! loopback in front of a cache node on its default port. Unknown fields are errors,
//! so a misspelt rule is caught at startup rather than silently matching nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::exec_common::deserialize_duration;

/// How one platform property of an action is compared with what workers offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PropertyRule {
    /// The worker must offer exactly the action's value (e.g. `OSFamily`, `cpu_arch`).
    Exact,
    /// Both values are whole numbers and the worker's must be at least the action's
    /// (e.g. `cpu_count`, `memory_gb`).
    Minimum,
    /// Not matched; the scheduler passes the property to the worker with the task.
    Priority,
    /// Not matched and not passed on.
    Ignore,
}

/// Which of several idle-enough matching workers gets a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerSelection {
    /// The one that was given work longest ago: spreads load.
    Lru,
    /// The one that was given work most recently: keeps its caches warm and lets the
    /// others idle (or scale down).
    Mru,
}

/// The scheduler's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Address of the gRPC listener serving Execution, Operations, Capabilities and
    /// the worker protocol. Default `127.0.0.1:50061`. Port 0 picks a free port (see
    /// the `--ready-file` flag for learning it).
    pub listen: SocketAddr,
    /// Address of the HTTP listener serving `/metrics`, `/healthz` and the status page
    /// (`/`, `/status`); with `auth`, all but `/healthz` need `metrics`. Plaintext, so
    /// keep it on a private address. Default: none, no HTTP listener.
    pub http_listen: Option<SocketAddr>,
    /// URL of the cache node, for action-cache lookups and reading Actions. Default
    /// `http://127.0.0.1:50051`.
    pub cache: String,
    /// A file holding the bearer token presented to the cache node (its `--auth`
    /// principals). Default: none, calls carry no credentials.
    pub token_file: Option<std::path::PathBuf>,
    /// PEM certificate chain served on the listener (TLS 1.2/1.3, ALPN `h2`), reloaded
    /// when the file changes or on SIGHUP; also presented as the client certificate
    /// when the cache node asks for one. Default: none, plaintext.
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of `tls_cert`. Default: none.
    pub tls_key: Option<std::path::PathBuf>,
    /// PEM CA certificates a client certificate must chain to; with it, clients without
    /// one are refused (mutual TLS). Default: none.
    pub tls_client_ca: Option<std::path::PathBuf>,
    /// PEM CA certificates trusted for an `https://` cache URL. Default: none, the
    /// system's trust store.
    pub tls_ca: Option<std::path::PathBuf>,
    /// The auth file (the cache node's format): Execute, WaitExecution and Operations
    /// need `execute`, workers need `write_ac` to register, ListWorkers needs
    /// `metrics`. Reloaded when it changes or on SIGHUP. Default: none, every caller
    /// is allowed everything, which is only safe on loopback (see
    /// `allow_unauthenticated_execution`).
    pub auth: Option<std::path::PathBuf>,
    /// Listen on a non-loopback address without `auth`, so that anyone who reaches the
    /// port can run commands on the workers. Default `false`: such a scheduler refuses
    /// to start.
    pub allow_unauthenticated_execution: bool,
    /// Rules for platform property names. Default: none, so every property follows
    /// `default_property_rule`.
    pub platform_properties: BTreeMap<String, PropertyRule>,
    /// The rule for property names not in `platform_properties`. Default `exact`.
    pub default_property_rule: PropertyRule,
    /// Which matching worker gets a task. Default `lru`.
    pub worker_selection: WorkerSelection,
    /// How many times an action is given to another worker after the one running it
    /// disconnected or stopped sending keepalives; after that the client gets an
    /// error naming the cause. Default `3`.
    pub max_job_retries: u32,
    /// How often workers send keepalives. Default `"5s"`.
    #[serde(deserialize_with = "deserialize_duration")]
    pub keepalive_interval: Duration,
    /// A worker silent for this long is considered dead and its actions are
    /// requeued. Default `"30s"`.
    #[serde(deserialize_with = "deserialize_duration")]
    pub keepalive_timeout: Duration,
    /// How long an action that no connected worker could ever run (its platform
    /// properties match none) waits for one to connect before it fails with
    /// FAILED_PRECONDITION. Default `"60s"`.
    #[serde(deserialize_with = "deserialize_duration")]
    pub unschedulable_timeout: Duration,
    /// Timeout of actions that set none. Default `"15m"`.
    #[serde(deserialize_with = "deserialize_duration")]
    pub default_action_timeout: Duration,
    /// Upper bound on any action's timeout; longer `Action.timeout`s are capped to it.
    /// Default `"1h"`.
    #[serde(deserialize_with = "deserialize_duration")]
    pub max_action_timeout: Duration,
    /// How long a finished operation stays visible to GetOperation and WaitExecution
    /// (with `redis`, the expiry of its key). Default `"10m"`.
    #[serde(deserialize_with = "deserialize_duration")]
    pub completed_operation_retention: Duration,
    /// Redis holding the state shared by several schedulers: `redis://HOST:PORT/DB`, or
    /// `rediss://` for TLS (the system's trust store); a password in the URL
    /// (`redis://:PASSWORD@HOST/0`) or, when it has none, from the `REDIS_PASSWORD`
    /// environment variable. Default: none, the state is in this process's memory and
    /// only this scheduler serves it.
    pub redis: Option<String>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50061)),
            http_listen: None,
            cache: "http://127.0.0.1:50051".to_string(),
            token_file: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_ca: None,
            auth: None,
            allow_unauthenticated_execution: false,
            platform_properties: BTreeMap::new(),
            default_property_rule: PropertyRule::Exact,
            worker_selection: WorkerSelection::Lru,
            max_job_retries: 3,
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(30),
            unschedulable_timeout: Duration::from_secs(60),
            default_action_timeout: Duration::from_secs(15 * 60),
            max_action_timeout: Duration::from_secs(3600),
            completed_operation_retention: Duration::from_secs(600),
            redis: None,
        }
    }
}

impl SchedulerConfig {
    /// Refuses a listener off loopback without `auth` (unless
    /// `allow_unauthenticated_execution`): it would run any command for whoever
    /// connects. Runs before anything binds.
    pub fn check_security(&self) -> crate::Result<()> {
        if self.auth.is_some()
            || self.allow_unauthenticated_execution
            || self.listen.ip().is_loopback()
        {
            return Ok(());
        }
        Err(crate::Error::invalid_argument(format!(
            "refusing to serve remote execution on {}, which is not a loopback address, \
             without authentication: anyone who reaches it could run any command on the \
             workers. Give --auth FILE (principals with the `execute` permission, and \
             `write_ac` for workers), or accept the risk with \
             --allow-unauthenticated-execution",
            self.listen
        )))
    }

    /// The rule for property `name`.
    pub fn rule(&self, name: &str) -> PropertyRule {
        self.platform_properties
            .get(name)
            .copied()
            .unwrap_or(self.default_property_rule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec_common::parse_json5;

    #[test]
    fn empty_is_the_defaults() {
        let config: SchedulerConfig = parse_json5("{}").unwrap();
        assert_eq!(config.listen.port(), 50061);
        assert_eq!(config.http_listen, None);
        assert_eq!(config.worker_selection, WorkerSelection::Lru);
        assert_eq!(config.rule("anything"), PropertyRule::Exact);
        assert_eq!(config.keepalive_timeout, Duration::from_secs(30));
        assert_eq!(config.redis, None);
    }

    #[test]
    fn rules_and_durations() {
        let config: SchedulerConfig = parse_json5(
            "{ platform_properties: { cpu_count: 'minimum', pool: 'priority', x: 'ignore' },
               worker_selection: 'mru', keepalive_timeout: '2s', http_listen: '127.0.0.1:9461',
               redis: 'redis://127.0.0.1:6379/0' }",
        )
        .unwrap();
        assert_eq!(config.rule("cpu_count"), PropertyRule::Minimum);
        assert_eq!(config.rule("pool"), PropertyRule::Priority);
        assert_eq!(config.rule("x"), PropertyRule::Ignore);
        assert_eq!(config.worker_selection, WorkerSelection::Mru);
        assert_eq!(config.keepalive_timeout, Duration::from_secs(2));
        assert_eq!(config.redis.as_deref(), Some("redis://127.0.0.1:6379/0"));
        assert_eq!(
            config.http_listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 9461)))
        );
    }

    #[test]
    fn execution_off_loopback_needs_auth() {
        let mut config: SchedulerConfig = parse_json5("{ listen: '0.0.0.0:50061' }").unwrap();
        let refused = config.check_security().unwrap_err();
        assert!(refused.message().contains("--auth"), "{refused}");
        assert!(
            refused
                .message()
                .contains("--allow-unauthenticated-execution"),
            "{refused}"
        );
        config.allow_unauthenticated_execution = true;
        assert!(config.check_security().is_ok());
        config.allow_unauthenticated_execution = false;
        config.auth = Some("auth.json5".into());
        assert!(config.check_security().is_ok());
        assert!(SchedulerConfig::default().check_security().is_ok());
    }

    #[test]
    fn unknown_fields_and_rules_are_rejected() {
        assert!(parse_json5::<SchedulerConfig>("{ listn: '127.0.0.1:1' }").is_err());
        assert!(
            parse_json5::<SchedulerConfig>("{ platform_properties: { a: 'atleast' } }").is_err()
        );
    }
}
