//! The worker's configuration: a JSON5 file, overridden by command-line flags.
//!
//! With no file, a worker connects to a scheduler and a cache node on their default
//! loopback ports, offers no platform properties and runs as many tasks at once as
//! it has CPUs. Unknown fields are errors.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use cairn_proto::reapi::platform::Property;
use serde::{Deserialize, Deserializer};

use crate::byte_size::ByteSize;
use crate::exec_common::deserialize_duration;

/// A platform property value in the config: a string, a number, or a list of them
/// when the worker offers several values for one name.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    /// One value, e.g. `"x86_64"`.
    Text(String),
    /// One numeric value, e.g. `4`.
    Number(u64),
    /// Several values.
    List(Vec<String>),
}

/// A string or a non-empty list of strings.
fn one_or_more<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMore {
        One(String),
        More(Vec<String>),
    }
    match OneOrMore::deserialize(deserializer)? {
        OneOrMore::One(one) => Ok(vec![one]),
        OneOrMore::More(more) if more.is_empty() => {
            Err(serde::de::Error::custom("the list of schedulers is empty"))
        }
        OneOrMore::More(more) => Ok(more),
    }
}

/// The worker's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// URL of the scheduler, or a list of URLs (or one load balancer's). The worker
    /// registers with the first it reaches; when its session breaks it tries the next,
    /// keeping its running tasks and reporting them there, so the schedulers of a list
    /// should share their state (`cairn-scheduler --redis`). Default
    /// `http://127.0.0.1:50061`.
    #[serde(deserialize_with = "one_or_more")]
    pub scheduler: Vec<String>,
    /// URL of the cache node inputs are read from and outputs written to. Default
    /// `http://127.0.0.1:50051`.
    pub cache: String,
    /// A file holding the bearer token presented to the cache node and the scheduler
    /// (their `--auth` principals; the scheduler asks for `write_ac`). Default: none,
    /// calls carry no credentials.
    pub token_file: Option<PathBuf>,
    /// PEM CA certificates trusted for `https://` scheduler and cache URLs. Default:
    /// none, the system's trust store.
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate chain presented to a scheduler or cache node that asks for a
    /// client certificate (mutual TLS); its extended key usage must allow
    /// `clientAuth`. Default: none.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`. Default: none.
    pub tls_key: Option<PathBuf>,
    /// The worker's id at the scheduler. Default: `HOSTNAME-PID`.
    pub id: Option<String>,
    /// Platform properties offered, e.g. `{ cpu_arch: "x86_64", cpu_count: 8 }`.
    /// Default: none.
    pub properties: BTreeMap<String, PropertyValue>,
    /// Tasks run at once. Default: the number of CPUs the worker may run on.
    pub max_inflight_tasks: Option<u32>,
    /// Directory for the file cache and the per-action directories. Each action gets
    /// a private copy of its inputs, a reflink where the filesystem has them (btrfs,
    /// XFS), so a filesystem with reflinks makes materializing nearly free. Default
    /// `./cairn-worker`.
    pub work_dir: PathBuf,
    /// Byte budget of the local file cache; least recently used files go first.
    /// Default `"10GiB"`.
    pub file_cache_size: ByteSize,
    /// A program run (without arguments) before the worker registers and before each
    /// task; if it exits non-zero the worker takes no work until it succeeds again.
    /// Default: none.
    pub precondition_script: Option<PathBuf>,
    /// Blobs up to this size are read and written in batches, larger ones streamed.
    /// Default `"1MiB"`.
    pub batch_threshold: ByteSize,
    /// Batch calls and streams to the cache node in flight at once, per task. Default
    /// `16`.
    pub transfer_concurrency: usize,
    /// Wait between attempts to reach the scheduler, and between precondition checks.
    /// Default `"1s"`.
    #[serde(deserialize_with = "deserialize_duration")]
    pub retry_delay: Duration,
    /// Keep the directory of each failed task as it was when the task ended, for
    /// inspection: a task is failed when it ends in any status but OK (a hostile input
    /// tree, missing inputs, a timeout) or its command exits non-zero. The directory
    /// stays in `work_dir/tasks/` and its path is logged with the action digest;
    /// nothing removes it until the worker starts again, so enable this for debugging
    /// only. Default `false`: every task directory is removed when its task ends.
    pub keep_failed_tasks: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            scheduler: vec!["http://127.0.0.1:50061".to_string()],
            cache: "http://127.0.0.1:50051".to_string(),
            token_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            id: None,
            properties: BTreeMap::new(),
            max_inflight_tasks: None,
            work_dir: PathBuf::from("./cairn-worker"),
            file_cache_size: ByteSize(10 << 30),
            precondition_script: None,
            batch_threshold: ByteSize(1 << 20),
            transfer_concurrency: 16,
            retry_delay: Duration::from_secs(1),
            keep_failed_tasks: false,
        }
    }
}

impl WorkerConfig {
    /// The properties as the worker protocol carries them.
    pub fn platform(&self) -> Vec<Property> {
        let mut properties = Vec::new();
        for (name, value) in &self.properties {
            let values = match value {
                PropertyValue::Text(text) => vec![text.clone()],
                PropertyValue::Number(number) => vec![number.to_string()],
                PropertyValue::List(list) => list.clone(),
            };
            for value in values {
                properties.push(Property {
                    name: name.clone(),
                    value,
                });
            }
        }
        properties
    }

    /// The id to register with.
    pub fn worker_id(&self) -> String {
        if let Some(id) = &self.id {
            return id.clone();
        }
        let mut buffer = [0u8; 256];
        // SAFETY: gethostname writes at most `buffer.len()` bytes into `buffer`.
        let result = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
        let host = if result == 0 {
            let end = buffer.iter().position(|b| *b == 0).unwrap_or(buffer.len());
            String::from_utf8_lossy(&buffer[..end]).into_owned()
        } else {
            "worker".to_string()
        };
        format!("{host}-{}", std::process::id())
    }

    /// How many tasks run at once.
    pub fn max_inflight(&self) -> u32 {
        self.max_inflight_tasks.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|count| count.get() as u32)
                .unwrap_or(1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec_common::parse_json5;

    #[test]
    fn defaults_and_properties() {
        let config: WorkerConfig = parse_json5("{}").unwrap();
        assert_eq!(config.file_cache_size, ByteSize(10 << 30));
        assert!(config.platform().is_empty());
        assert!(config.max_inflight() >= 1);
        assert!(!config.keep_failed_tasks);

        let config: WorkerConfig = parse_json5(
            "{ properties: { cpu_arch: 'x86_64', cpu_count: 4, pool: ['a', 'b'] },
               file_cache_size: '1GiB', max_inflight_tasks: 2, id: 'w1' }",
        )
        .unwrap();
        let names: Vec<(String, String)> = config
            .platform()
            .into_iter()
            .map(|property| (property.name, property.value))
            .collect();
        assert_eq!(
            names,
            vec![
                ("cpu_arch".to_string(), "x86_64".to_string()),
                ("cpu_count".to_string(), "4".to_string()),
                ("pool".to_string(), "a".to_string()),
                ("pool".to_string(), "b".to_string()),
            ]
        );
        assert_eq!(config.max_inflight(), 2);
        assert_eq!(config.worker_id(), "w1");
    }

    #[test]
    fn scheduler_is_one_url_or_a_list() {
        let config: WorkerConfig = parse_json5("{ scheduler: 'http://a:1' }").unwrap();
        assert_eq!(config.scheduler, vec!["http://a:1".to_string()]);
        let config: WorkerConfig =
            parse_json5("{ scheduler: ['http://a:1', 'http://b:2'] }").unwrap();
        assert_eq!(config.scheduler.len(), 2);
        assert!(parse_json5::<WorkerConfig>("{ scheduler: [] }").is_err());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(parse_json5::<WorkerConfig>("{ schedular: 'x' }").is_err());
    }
}
