//! cairn's remote execution: the `cairn-scheduler` and `cairn-worker` programs.
//!
//! The [`scheduler`] takes REAPI Execute calls and hands actions to [`worker`]s; both
//! use the cache node only through its gRPC APIs ([`cas_client`]), and check and
//! compute digests in their wire form ([`digests`]). Neither depends on the storage
//! engine or glommio, so they build and run on hosts without io_uring; what they share
//! with the node (errors, auth, TLS, logs, traces) comes from `cairn-common`,
//! re-exported here under the same paths the node uses.

pub mod cas_client;
pub mod digests;
pub mod scheduler;
pub mod worker;

pub use cairn_common::{
    auth, byte_size, client_tls, error, exec_common, logging, reload, status_html, tls, traces,
    Error, ErrorKind, Result, VERSION,
};
