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
//! [`config::Config`]; a single node also starts a scheduler and a worker of its own
//! ([`embedded`]) and forwards Execution to them ([`grpc_execution`]). Those are the
//! `cairn-scheduler` and `cairn-worker` programs of the `cairn-exec` crate, which does
//! not depend on the engine; what all three programs share (errors, [`auth`], TLS,
//! [`logging`], OpenTelemetry [`traces`]) is the `cairn-common` crate, re-exported
//! here under the paths the node's modules use. The engine's errors become the
//! node's through [`engine_errors`].

pub mod action_results;
pub mod asset_fetch;
pub mod config;
pub mod digests;
pub mod embedded;
pub mod engine_errors;
pub mod grpc_ac;
pub mod grpc_asset;
pub mod grpc_bytestream;
pub mod grpc_capabilities;
pub mod grpc_cas;
pub mod grpc_execution;
pub mod http_cache;
pub mod http_path;
pub mod http_status;
pub mod metrics;
pub mod node;
pub mod resource_name;
mod runtime;
mod signals;
pub mod sink;
pub mod slow_tier;
pub mod sri;
pub mod store;
pub mod tree_walk;
pub mod uploads;
pub mod zstd_stream;

pub use cairn_common::{
    auth, byte_size, client_tls, error, exec_common, logging, reload, status_html, tls, traces,
    Error, ErrorKind, Result, VERSION,
};
