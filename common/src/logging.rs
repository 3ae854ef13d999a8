//! Log output for all three binaries: human-readable lines by default, or one JSON
//! object per line (`--log-format json`) for log shippers, which otherwise have to
//! parse the text format's columns and colours. The level comes from `RUST_LOG`
//! (default `info`).
//!
//! A node that starts its own scheduler and worker hands them its format through the
//! [`ENV`] variable, so one node's three processes write one format.
//!
//! With `OTEL_EXPORTER_OTLP_ENDPOINT` set, the same subscriber also exports cairn's
//! spans over OTLP ([`crate::traces`]); `RUST_LOG` then filters only the log lines, not
//! the spans. Without it the subscriber is the log writer alone.

use std::sync::OnceLock;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::traces::Exporter;

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines. The default.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields` (with `message`) and
    /// `target`.
    Json,
}

impl LogFormat {
    /// The flag's value for this format.
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The environment variable `--log-format` also reads, and that a node sets for the
/// scheduler and worker it starts.
pub const ENV: &str = "CAIRN_LOG_FORMAT";

static CHOSEN: OnceLock<LogFormat> = OnceLock::new();

/// Starts logging in `format`, and trace export as `service` when an OTLP endpoint is
/// configured; once per process. Keep the returned value until the program ends:
/// dropping it flushes the spans not yet exported.
pub fn init(format: LogFormat, service: &'static str) -> Option<Exporter> {
    let _ = CHOSEN.set(format);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let Some((tracer, exporter)) = crate::traces::start(service) else {
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        match format {
            LogFormat::Text => builder.init(),
            LogFormat::Json => builder.json().init(),
        }
        return None;
    };
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = match format {
        LogFormat::Text => lines.with_filter(filter).boxed(),
        LogFormat::Json => lines.json().with_filter(filter).boxed(),
    };
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(Targets::new().with_target("cairn", tracing::Level::INFO));
    tracing_subscriber::registry()
        .with(lines)
        .with(spans)
        .init();
    Some(exporter)
}

/// The format this process logs in.
pub fn chosen() -> LogFormat {
    CHOSEN.get().copied().unwrap_or_default()
}
