//! What every cairn program shares: the cache node (`cairn`), the scheduler and the
//! worker (`cairn-exec`).
//!
//! The node is a glommio program built around the storage engine; the scheduler and
//! the worker are light tokio programs that only talk to it over gRPC, and must build
//! and run on hosts without io_uring. What they have in common lives here, with no
//! dependency on the engine: the one [`Error`] type and its mapping to gRPC and HTTP
//! codes ([`error`]), who may do what ([`auth`]), the reloading TLS of listeners
//! ([`tls`]) and of clients ([`client_tls`]), SIGHUP ([`reload`]), logs ([`logging`])
//! and OpenTelemetry traces ([`traces`]), byte sizes in configs ([`byte_size`]), what
//! the execution programs share on the wire ([`exec_common`]) and the HTML of the
//! status pages ([`status_html`]).

pub mod auth;
pub mod byte_size;
pub mod client_tls;
pub mod error;
pub mod exec_common;
pub mod logging;
pub mod reload;
pub mod status_html;
pub mod tls;
pub mod traces;

/// What `--version` prints after a binary's name: the crate version and the commit the
/// build came from (recorded by build.rs; `unknown` outside a git checkout).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("CAIRN_COMMIT"),
    ")"
);

pub use error::{Error, ErrorKind, Result};
