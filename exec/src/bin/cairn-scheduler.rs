//! `cairn-scheduler`: remote execution (REAPI Execution and Operations) in front of a
//! cairn cache node, handing actions to `cairn-worker`s.
//!
//! With no arguments it listens on 127.0.0.1:50061 and uses the cache node on
//! 127.0.0.1:50051. A JSON5 config file and the flags below adjust it; flags win.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use cairn_exec::exec_common::load_json5;
use cairn_exec::scheduler::config::SchedulerConfig;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

/// Schedules REAPI actions onto cairn workers.
///
/// Logs go to stderr; RUST_LOG adjusts them. SIGTERM or SIGINT stops it.
#[derive(Parser, Debug)]
#[command(name = "cairn-scheduler", version = cairn_exec::VERSION)]
struct Args {
    /// How log lines are written to standard error: `text`, or `json` (one object per
    /// line, for log shippers). The level comes from RUST_LOG (default info).
    #[arg(long, value_enum, env = cairn_exec::logging::ENV, default_value_t = cairn_exec::logging::LogFormat::Text)]
    log_format: cairn_exec::logging::LogFormat,

    /// JSON5 configuration file (see config/ for examples); unknown fields are errors.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Address of the gRPC listener [default: 127.0.0.1:50061]; port 0 picks one.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,

    /// URL of the cache node [default: http://127.0.0.1:50051].
    #[arg(long, value_name = "URL")]
    cache: Option<String>,

    /// File holding the bearer token presented to the cache node, when its --auth
    /// requires one [default: none].
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,

    /// PEM certificate chain for TLS on the listener (ALPN h2), reloaded when the file
    /// changes or on SIGHUP; also presented to a cache node that asks for a client
    /// certificate [default: none, plaintext].
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert [default: none].
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// PEM CA certificates client certificates must chain to: clients without one are
    /// refused (mutual TLS) [default: none].
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,

    /// PEM CA certificates trusted for an https:// --cache [default: the system's
    /// trust store].
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,

    /// Auth file (JSON5 principals, as the cache node's): Execute and Operations need
    /// `execute`, workers need `write_ac`; reloaded when it changes or on SIGHUP
    /// [default: none, everyone may do everything].
    #[arg(long, value_name = "FILE")]
    auth: Option<PathBuf>,

    /// Listen on a non-loopback address without --auth, letting anyone who reaches the
    /// port run commands on the workers [default: refuse to start].
    #[arg(long)]
    allow_unauthenticated_execution: bool,

    /// Keep the state in Redis, shared with other schedulers given the same URL:
    /// `redis://HOST:PORT/DB`, `rediss://` for TLS; the password in the URL or in
    /// REDIS_PASSWORD [default: none, the state is in memory].
    #[arg(long, value_name = "URL")]
    redis: Option<String>,

    /// Once listening, write the bound address (IP:PORT) to this file.
    #[arg(long, value_name = "FILE")]
    ready_file: Option<PathBuf>,

    /// Address of the HTTP listener for /metrics, /healthz and the status page
    /// [default: none]; port 0 picks one. It has no access control: keep it private.
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<SocketAddr>,

    /// Once the HTTP listener is bound, write its address (IP:PORT) to this file.
    #[arg(long, value_name = "FILE")]
    http_ready_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _traces = cairn_exec::logging::init(args.log_format, "cairn-scheduler");
    let config = match &args.config {
        Some(path) => load_json5::<SchedulerConfig>(path),
        None => Ok(SchedulerConfig::default()),
    };
    let outcome = config.and_then(|mut config| {
        if let Some(listen) = args.listen {
            config.listen = listen;
        }
        if let Some(cache) = args.cache {
            config.cache = cache;
        }
        if let Some(token_file) = args.token_file {
            config.token_file = Some(token_file);
        }
        if args.tls_cert.is_some() {
            config.tls_cert = args.tls_cert;
            config.tls_key = args.tls_key;
        }
        if args.tls_client_ca.is_some() {
            config.tls_client_ca = args.tls_client_ca;
        }
        if args.tls_ca.is_some() {
            config.tls_ca = args.tls_ca;
        }
        if args.auth.is_some() {
            config.auth = args.auth;
        }
        if args.allow_unauthenticated_execution {
            config.allow_unauthenticated_execution = true;
        }
        if args.redis.is_some() {
            config.redis = args.redis;
        }
        if let Some(http_listen) = args.http_listen {
            config.http_listen = Some(http_listen);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let mut terminate = signal(SignalKind::terminate())?;
            let mut interrupt = signal(SignalKind::interrupt())?;
            let shutdown = async move {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
                tracing::info!("stopping");
            };
            cairn_exec::scheduler::serve(config, args.ready_file, args.http_ready_file, shutdown)
                .await
        })
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cairn-scheduler: {error}");
            ExitCode::FAILURE
        }
    }
}
