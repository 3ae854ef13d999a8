//! OpenTelemetry traces, exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set.
//!
//! [`crate::logging::init`] calls [`start`]: with an endpoint it builds a batch span
//! exporter and a `tracing` layer that turns cairn's spans into OpenTelemetry spans;
//! without one nothing is built, [`enabled`] stays false, and the node creates no
//! per-request span at all, so a node without traces pays one relaxed atomic load per
//! request. The other standard variables (`OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, ...) are read by the OpenTelemetry SDK itself.
//!
//! The exporter's gRPC client needs a tokio runtime, and the node's requests run on
//! glommio executors, so every program gets a one-thread tokio runtime of its own for
//! the exporter; the batch processor hands it the spans from its own thread.
//!
//! One remote action is one trace: the node's Execute forwarding puts the W3C
//! `traceparent` of its request span into the metadata of its call to the scheduler
//! ([`inject_current`], [`into_metadata`]), the scheduler's Execute span takes it as its
//! parent ([`from_metadata`]) and hands its own context to the worker in the task
//! (`StartTask.trace_context`), whose execution span continues it ([`child_of`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use base64::Engine;
use cairn_proto::reapi::RequestMetadata;
use futures::future::Either;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use prost::Message;
use tracing::field::Empty;
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Whether this process exports spans; set once by [`start`].
static ENABLED: AtomicBool = AtomicBool::new(false);

/// The header Bazel sends its `RequestMetadata` in (binary, so base64 on the wire).
const REQUEST_METADATA: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

/// Whether spans are exported: the node creates its per-request spans only then.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Keeps the exporter running; dropping it sends the spans still buffered and stops
/// the exporter's runtime.
pub struct Exporter {
    provider: SdkTracerProvider,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("cannot flush the trace exporter: {error}");
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The tracer of `service` (the `service.name` unless `OTEL_SERVICE_NAME` says
/// otherwise), if an OTLP endpoint is configured and the exporter could be built.
pub fn start(service: &'static str) -> Option<(opentelemetry_sdk::trace::Tracer, Exporter)> {
    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()));
    if !configured {
        return None;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{service}: cannot start the trace exporter's runtime: {error}");
            return None;
        }
    };
    let exporter = {
        let _entered = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
    };
    let exporter = match exporter {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("{service}: cannot build the OTLP trace exporter: {error}");
            return None;
        }
    };
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none_or(|name| name.is_empty()) {
        resource = resource.with_service_name(service);
    }
    let provider = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build();
    let tracer = provider.tracer("cairn");
    ENABLED.store(true, Ordering::Relaxed);
    Some((
        tracer,
        Exporter {
            provider,
            runtime: Some(runtime),
        },
    ))
}

/// The W3C trace context of the current span (empty when traces are off).
pub fn inject_current() -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    if enabled() {
        TraceContextPropagator::new().inject_context(&Span::current().context(), &mut carrier);
    }
    carrier
}

/// Adds `context` (from [`inject_current`]) to an outgoing request's metadata.
pub fn into_metadata(
    context: &HashMap<String, String>,
    metadata: &mut tonic::metadata::MetadataMap,
) {
    for (key, value) in context {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            metadata.insert(key, value);
        }
    }
}

/// The trace context an incoming request carries in its metadata.
pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> HashMap<String, String> {
    let mut context = HashMap::new();
    if enabled() {
        for key in TraceContextPropagator::new().fields() {
            if let Some(value) = metadata.get(key).and_then(|value| value.to_str().ok()) {
                context.insert(key.to_string(), value.to_string());
            }
        }
    }
    context
}

/// Makes `span` a child of the remote span `context` names (nothing if it names none).
pub fn child_of(span: &Span, context: &HashMap<String, String>) {
    if context.is_empty() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(context);
    // Fails only for a span that has already started a trace of its own.
    let _ = span.set_parent(parent);
}

/// Records `value` as the field `name` of the current request's span, if there is one.
pub fn record(name: &'static str, value: impl tracing::Value) {
    if enabled() {
        Span::current().record(name, value);
    }
}

/// Wraps every gRPC request of the node in a span named after its method, with the
/// client's `RequestMetadata` as attributes; handlers add what they find out (digest,
/// hit or miss) with [`record`]. With traces off it forwards requests untouched.
#[derive(Clone)]
pub struct Traced<S>(pub S);

impl<S, B> tower_service::Service<http::Request<B>> for Traced<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, tracing::instrument::Instrumented<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if !enabled() {
            return Either::Left(self.0.call(request));
        }
        let span = request_span(&request);
        let future = span.in_scope(|| self.0.call(request));
        Either::Right(future.instrument(span))
    }
}

/// The span of one gRPC request: its method, and Bazel's `RequestMetadata`.
fn request_span<B>(request: &http::Request<B>) -> Span {
    let method = request.uri().path();
    let metadata = request
        .headers()
        .get(REQUEST_METADATA)
        .and_then(|value| {
            // gRPC senders may pad binary headers or not.
            let engine = base64::engine::GeneralPurpose::new(
                &base64::alphabet::STANDARD,
                base64::engine::GeneralPurposeConfig::new()
                    .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
            );
            engine.decode(value.as_bytes()).ok()
        })
        .and_then(|bytes| RequestMetadata::decode(bytes.as_slice()).ok())
        .unwrap_or_default();
    let span = tracing::info_span!(
        target: "cairn::traces",
        "rpc",
        otel.name = method.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.method = method,
        shard = Empty,
        instance = Empty,
        digest.hash = Empty,
        digest.size = Empty,
        hit = Empty,
        requested = Empty,
        missing = Empty,
        bazel.tool_invocation_id = Empty,
        bazel.correlated_invocations_id = Empty,
        bazel.action_id = Empty,
        bazel.action_mnemonic = Empty,
        bazel.target_id = Empty,
    );
    // Shard N's executor is named `shard-N` (runtime/mod.rs) and glommio names its
    // thread `shard-N-<executor id>`; a connection stays on the shard that accepted it.
    if let Some(shard) = std::thread::current()
        .name()
        .and_then(|name| name.strip_prefix("shard-"))
        .and_then(|rest| rest.split('-').next())
        .and_then(|index| index.parse::<u64>().ok())
    {
        span.record("shard", shard);
    }
    for (name, value) in [
        ("bazel.tool_invocation_id", &metadata.tool_invocation_id),
        (
            "bazel.correlated_invocations_id",
            &metadata.correlated_invocations_id,
        ),
        ("bazel.action_id", &metadata.action_id),
        ("bazel.action_mnemonic", &metadata.action_mnemonic),
        ("bazel.target_id", &metadata.target_id),
    ] {
        if !value.is_empty() {
            span.record(name, value.as_str());
        }
    }
    span
}

/// A span for one stage of work (`otel.name` = `name`), or a disabled one when traces
/// are off.
pub fn stage(name: &'static str) -> Span {
    if enabled() {
        tracing::info_span!(target: "cairn::traces", "stage", otel.name = name)
    } else {
        Span::none()
    }
}

/// Records the instance and digest a request is about on its span, if there is one;
/// `digest` gives the hash in hex and the size, and is only called when traces are on.
pub fn record_digest(instance: &str, digest: impl FnOnce() -> (String, u64)) {
    if enabled() {
        let (hash, size) = digest();
        let span = Span::current();
        span.record("instance", instance);
        span.record("digest.hash", tracing::field::display(hash));
        span.record("digest.size", size);
    }
}
