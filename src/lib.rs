//! cairn: a remote build cache and remote execution speaking the Bazel Remote
//! Execution API v2.
//!
//! This crate is the cache node's network front. Requests arrive on per-core glommio
//! executors (the `runtime` module), are decoded by tonic-generated gRPC services — one module
//! per protocol: [`grpc_capabilities`], [`grpc_cas`], [`grpc_ac`], [`grpc_bytestream`],
//! [`grpc_asset`] (the Remote Asset API, downloading through [`asset_fetch`]) — or by
//! the HTTP cache protocol ([`http_cache`], which also serves the status page of
//! [`http_status`]), and are served from the storage
//! engine (`cairn-storage`) through [`store`], which holds the rules every protocol
//! shares. Every request is first weighed by [`auth`] (which principal its credential
//! names, and what that principal may do). [`node`] assembles all of it from a
//! [`config::Config`]; a single node also starts a scheduler and a worker of its own ([`embedded`]) and forwards Execution to
//! them ([`grpc_execution`]). The [`scheduler`] and [`worker`] modules are the
//! `cairn-scheduler` and `cairn-worker` programs; all three log through [`logging`]
//! and, when asked to, export OpenTelemetry traces through [`traces`].

pub mod action_results;
pub mod asset_fetch;
pub mod auth;
pub mod byte_size;
pub mod cas_client;
pub mod client_tls;
pub mod config;
pub mod digests;
pub mod embedded;
pub mod error;
pub mod exec_common;
pub mod grpc_ac;
pub mod grpc_asset;
pub mod grpc_bytestream;
pub mod grpc_capabilities;
pub mod grpc_cas;
pub mod grpc_execution;
pub mod http_cache;
pub mod http_path;
pub mod http_status;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod reload;
pub mod resource_name;
mod runtime;
pub mod scheduler;
mod signals;
pub mod sink;
pub mod slow_tier;
pub mod sri;
pub mod store;
pub mod tls;
pub mod traces;
pub mod tree_walk;
pub mod uploads;
pub mod worker;
pub mod zstd_stream;

/// What `--version` prints after a binary's name: the crate version and the commit the
/// build came from (recorded by build.rs; `unknown` outside a git checkout).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("CAIRN_COMMIT"),
    ")"
);

pub use error::{Error, ErrorKind, Result};
