//! `cairn`: the cache node.
//!
//! With no arguments it is a complete single node: gRPC on 127.0.0.1:50051, data in
//! ./cairn-data, a size budget taken from the free disk space, any instance name.
//! It also runs remote execution: it starts `cairn-scheduler` and one `cairn-worker`
//! (found next to this binary) on loopback and serves Execution and Operations on the
//! same endpoint. A JSON5 config file and the flags below adjust it; flags win over the
//! file, and a config file runs execution only if it has an `execution` section.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use cairn::byte_size::ByteSize;
use cairn::config::{Config, Durability};
use clap::Parser;

/// jemalloc, with its background thread purging freed memory (dirty pages decay over
/// 10 s). Measured with a BatchUpdateBlobs of 100,000 tiny blobs (8.6 MB on the wire,
/// `a_batch_of_many_tiny_blobs_costs_a_small_multiple_of_its_size`): glibc's malloc
/// kept 37 MB of per-thread arena memory afterwards for good, mimalloc kept 62 MB,
/// jemalloc peaked higher but was back within 17 MB of where it started 10 s later.
/// A cache node lives for months and sees such bursts all day; memory that returns
/// matters more than the peak.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A remote build cache speaking the Bazel Remote Execution API v2 (gRPC) and Bazel's
/// HTTP cache protocol.
///
/// Point Bazel at it with --remote_executor=grpc://127.0.0.1:50051 to build remotely,
/// or --remote_cache=grpc://127.0.0.1:50051 to cache only (or, with --http-listen,
/// --remote_cache=http://ADDR). Without a config file it also runs remote execution:
/// cairn-scheduler and cairn-worker (next to this binary) start as child processes.
/// Logs go to stderr; RUST_LOG adjusts them.
#[derive(Parser, Debug)]
#[command(name = "cairn", version = cairn::VERSION)]
struct Args {
    /// How log lines are written to standard error: `text`, or `json` (one object per
    /// line, for log shippers). The level comes from RUST_LOG (default info).
    #[arg(long, value_enum, env = cairn::logging::ENV, default_value_t = cairn::logging::LogFormat::Text)]
    log_format: cairn::logging::LogFormat,

    /// JSON5 configuration file (see config/ for examples). `${NAME}` in its strings
    /// expands to environment variables; unknown fields are errors.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Address of the gRPC (REAPI) listener [default: 127.0.0.1:50051; loopback only,
    /// use 0.0.0.0:50051 to expose it].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,

    /// Address of the HTTP listener: Bazel's HTTP cache protocol (/ac/, /cas/),
    /// /metrics and /healthz [default: none].
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<SocketAddr>,

    /// Data directory [default: ./cairn-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// Size budget of the store, e.g. 20GiB, 500MB or a number of bytes [default: 90% of
    /// the space available to the data directory at startup: free space plus what the
    /// directory already holds].
    #[arg(long, value_name = "SIZE")]
    max_size: Option<ByteSize>,

    /// Memory for hot records in front of the log, split between shards, e.g. 2GiB;
    /// 0 turns it off [default: a sixteenth of physical memory].
    #[arg(long, value_name = "SIZE")]
    memory_cache: Option<ByteSize>,

    /// Number of shards, each an executor pinned to its own core [default: the number
    /// of CPUs cairn may run on].
    #[arg(long, value_name = "N")]
    shards: Option<usize>,

    /// Most client connections served at once, gRPC and HTTP together; more are
    /// closed as soon as they are accepted [default: the open-file limit, raised at
    /// start to its hard maximum, less a reserve for the store's own files].
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,

    /// When a write is acknowledged: `sync`, once an fdatasync covering it completed
    /// (concurrent writes share one; nothing acknowledged is lost on power loss), or
    /// `interval`, once written, with an fdatasync every second (a power loss can drop
    /// up to the last second of acknowledged writes) [default: sync].
    #[arg(long, value_enum, value_name = "MODE")]
    durability: Option<Durability>,

    /// Benchmarking only: keep blobs in memory (bounded by --max-size, default 1GiB)
    /// instead of the store, to measure the network stack alone. Nothing is durable.
    #[arg(long)]
    sink: bool,
    /// Serve the cache only: start no scheduler or worker, and answer Execute with
    /// UNIMPLEMENTED [default without a config file: execution on, with a worker
    /// running as many actions at once as there are CPUs; with a config file: as its
    /// `execution` section says].
    #[arg(long)]
    no_execution: bool,

    /// Auth file: JSON5 principals (bearer-token SHA-256s, bcrypt basic users,
    /// client-certificate names) with permissions read, write, write_ac, execute and
    /// metrics, optionally limited to instance prefixes; reloaded when it changes
    /// (see the README's Security section) [default: none, every client may do
    /// everything].
    #[arg(long, value_name = "FILE")]
    auth: Option<PathBuf>,

    /// Refuse every write (blob uploads, action results), whoever asks; needs
    /// --no-execution [default: writes allowed].
    #[arg(long)]
    read_only: bool,

    /// Allow remote execution on a non-loopback listener without --auth, so that anyone
    /// who reaches the node can run commands on this host [default: such a node refuses
    /// to start].
    #[arg(long)]
    allow_unauthenticated_execution: bool,

    /// PEM certificate chain: TLS 1.2/1.3 on the gRPC listener (ALPN h2, clients use
    /// grpcs://) and the HTTP listener (https://); needs --tls-key. The certificate, key
    /// and client CA files are read again when they change, for new connections
    /// [default: none, plaintext].
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert [default: none].
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,

    /// PEM CA certificates: require every client to present a certificate signed by
    /// one of them (mutual TLS) [default: none, no client certificate asked for].
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _traces = cairn::logging::init(args.log_format, "cairn");
    if let Err(error) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!("cannot start the allocator's purging thread: {error}");
    }
    let config = match &args.config {
        Some(path) => Config::load(path),
        None => Ok(Config::default()),
    };
    let outcome = config.and_then(|mut config| {
        if let Some(listen) = args.listen {
            config.listen = listen;
        }
        if let Some(http_listen) = args.http_listen {
            config.http_listen = Some(http_listen);
        }
        if let Some(data_dir) = args.data_dir {
            config.data_dir = data_dir;
        }
        if let Some(max_size) = args.max_size {
            config.max_size = Some(max_size);
        }
        if let Some(memory_cache) = args.memory_cache {
            config.memory_cache = Some(memory_cache);
        }
        if let Some(shards) = args.shards {
            config.shards = Some(shards);
        }
        if let Some(max_connections) = args.max_connections {
            config.max_connections = Some(max_connections);
        }
        if let Some(durability) = args.durability {
            config.durability = durability;
        }
        if args.sink {
            config.sink = true;
        }
        if args.no_execution {
            config.execution = None;
        }
        if let Some(auth) = args.auth {
            config.auth = Some(auth);
        }
        if args.read_only {
            config.read_only = true;
        }
        if args.allow_unauthenticated_execution {
            config.allow_unauthenticated_execution = true;
        }
        if let Some(path) = args.tls_cert {
            config.tls_cert = Some(path);
        }
        if let Some(path) = args.tls_key {
            config.tls_key = Some(path);
        }
        if let Some(path) = args.tls_client_ca {
            config.tls_client_ca = Some(path);
        }
        cairn::node::run(config)
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cairn: {error}");
            ExitCode::FAILURE
        }
    }
}
