//! `cairn-worker`: executes actions for `cairn-scheduler`, reading inputs from and
//! writing outputs to a cairn cache node.
//!
//! With no arguments it connects to the scheduler on 127.0.0.1:50061 and the cache
//! node on 127.0.0.1:50051 and works in ./cairn-worker. A JSON5 config file and the
//! flags below adjust it; flags win.

use std::path::PathBuf;
use std::process::ExitCode;

use cairn_exec::exec_common::load_json5;
use cairn_exec::worker::config::{PropertyValue, WorkerConfig};
use clap::Parser;

/// Runs REAPI actions handed out by cairn-scheduler.
///
/// Logs go to stderr; RUST_LOG adjusts them. SIGTERM drains: running actions finish,
/// no new ones are taken, then the worker exits; a second SIGTERM exits at once.
#[derive(Parser, Debug)]
#[command(name = "cairn-worker", version = cairn_exec::VERSION)]
struct Args {
    /// How log lines are written to standard error: `text`, or `json` (one object per
    /// line, for log shippers). The level comes from RUST_LOG (default info).
    #[arg(long, value_enum, env = cairn_exec::logging::ENV, default_value_t = cairn_exec::logging::LogFormat::Text)]
    log_format: cairn_exec::logging::LogFormat,

    /// JSON5 configuration file (see config/ for examples); unknown fields are errors.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// URL of the scheduler [default: http://127.0.0.1:50061]. Give it several times
    /// for schedulers that share their state (--redis): the worker moves to the next
    /// when its session breaks, keeping its running tasks.
    #[arg(long, value_name = "URL")]
    scheduler: Vec<String>,

    /// URL of the cache node [default: http://127.0.0.1:50051].
    #[arg(long, value_name = "URL")]
    cache: Option<String>,

    /// File holding the bearer token presented to the cache node and the scheduler,
    /// when their --auth requires one (the scheduler asks for `write_ac`)
    /// [default: none].
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,

    /// PEM CA certificates trusted for https:// scheduler and cache URLs [default: the
    /// system's trust store].
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,

    /// PEM certificate chain presented to servers that ask for a client certificate
    /// (mutual TLS) [default: none].
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert [default: none].
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Worker id at the scheduler [default: HOSTNAME-PID].
    #[arg(long, value_name = "ID")]
    id: Option<String>,

    /// Directory for the file cache and action directories [default: ./cairn-worker].
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,

    /// Tasks run at once [default: the number of CPUs].
    #[arg(long, value_name = "N")]
    max_inflight_tasks: Option<u32>,

    /// A platform property offered, NAME=VALUE; repeatable, added to the config's.
    #[arg(long = "property", value_name = "NAME=VALUE")]
    properties: Vec<String>,

    /// Keep the directories of failed tasks in WORK_DIR/tasks for inspection (until the
    /// worker starts again) [default: removed].
    #[arg(long)]
    keep_failed_tasks: bool,

    /// Once registered with the scheduler, write the worker id to this file.
    #[arg(long, value_name = "FILE")]
    ready_file: Option<PathBuf>,
}

fn apply(
    args: Args,
    mut config: WorkerConfig,
) -> cairn_exec::Result<(WorkerConfig, Option<PathBuf>)> {
    if !args.scheduler.is_empty() {
        config.scheduler = args.scheduler;
    }
    if let Some(cache) = args.cache {
        config.cache = cache;
    }
    if let Some(token_file) = args.token_file {
        config.token_file = Some(token_file);
    }
    if args.tls_ca.is_some() {
        config.tls_ca = args.tls_ca;
    }
    if args.tls_cert.is_some() {
        config.tls_cert = args.tls_cert;
        config.tls_key = args.tls_key;
    }
    if let Some(id) = args.id {
        config.id = Some(id);
    }
    if let Some(work_dir) = args.work_dir {
        config.work_dir = work_dir;
    }
    if let Some(max) = args.max_inflight_tasks {
        config.max_inflight_tasks = Some(max);
    }
    if args.keep_failed_tasks {
        config.keep_failed_tasks = true;
    }
    for property in args.properties {
        let (name, value) = property.split_once('=').ok_or_else(|| {
            cairn_exec::Error::invalid_argument(format!(
                "--property `{property}` is not NAME=VALUE"
            ))
        })?;
        let value = value.to_string();
        match config.properties.get_mut(name) {
            Some(PropertyValue::List(values)) => values.push(value),
            Some(existing) => {
                let first = match existing {
                    PropertyValue::Text(text) => text.clone(),
                    PropertyValue::Number(number) => number.to_string(),
                    PropertyValue::List(_) => String::new(),
                };
                *existing = PropertyValue::List(vec![first, value]);
            }
            None => {
                config
                    .properties
                    .insert(name.to_string(), PropertyValue::Text(value));
            }
        }
    }
    Ok((config, args.ready_file))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _traces = cairn_exec::logging::init(args.log_format, "cairn-worker");
    let config = match &args.config {
        Some(path) => load_json5::<WorkerConfig>(path),
        None => Ok(WorkerConfig::default()),
    };
    let outcome = config
        .and_then(|config| apply(args, config))
        .and_then(|(config, ready_file)| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(cairn_exec::worker::session::run(config, ready_file))
        });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cairn-worker: {error}");
            ExitCode::FAILURE
        }
    }
}
