//! OpenTelemetry traces from the real binaries: a single node (which starts its own
//! scheduler and worker, passing them its environment) exports to an OTLP receiver the
//! test runs on loopback, and one remote action comes out as one trace across the
//! three processes.
//!
//! The receiver implements `TraceService/Export` from the `opentelemetry-proto`
//! definitions and keeps every span it is sent. `OTEL_BSP_SCHEDULE_DELAY` is short so
//! the processes export soon after a span ends; the test polls the receiver with a
//! bounded number of attempts until the spans it expects are there.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cairn_proto::reapi::batch_update_blobs_request::Request as UpdateRequest;
use cairn_proto::reapi::execution_client::ExecutionClient;
use cairn_proto::reapi::{
    Action, BatchUpdateBlobsRequest, Command as ReapiCommand, Directory, ExecuteRequest,
    ExecuteResponse, RequestMetadata,
};
use common::{free_port, sha256, wire, Node, BINARY};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use tokio::net::TcpListener;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

/// One exported span, reduced to what the assertions look at.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: HashMap<String, String>,
}

/// The OTLP receiver: every span of every Export call.
#[derive(Default, Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| resource.attributes.iter())
                .find(|attribute| attribute.key == "service.name")
                .map(|attribute| text(attribute.value.as_ref().and_then(|v| v.value.as_ref())))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    received.push(Received {
                        service: service.clone(),
                        name: span.name,
                        trace_id: span.trace_id,
                        span_id: span.span_id,
                        parent_span_id: span.parent_span_id,
                        attributes: span
                            .attributes
                            .into_iter()
                            .map(|attribute| {
                                let value =
                                    text(attribute.value.as_ref().and_then(|v| v.value.as_ref()));
                                (attribute.key, value)
                            })
                            .collect(),
                    });
                }
            }
        }
        self.spans.lock().expect("spans").extend(received);
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

fn text(value: Option<&Value>) -> String {
    match value {
        Some(Value::StringValue(text)) => text.clone(),
        Some(Value::BoolValue(flag)) => flag.to_string(),
        Some(Value::IntValue(number)) => number.to_string(),
        Some(Value::DoubleValue(number)) => number.to_string(),
        _ => String::new(),
    }
}

impl Receiver {
    /// Serves on a loopback port until the test ends.
    async fn start() -> (Receiver, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let receiver = Receiver::default();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        (receiver, address)
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().expect("spans").clone()
    }
}

/// A single node whose three processes export to `endpoint` (or export nothing).
fn node(dir: &std::path::Path, endpoint: Option<SocketAddr>) -> Node {
    let grpc = free_port();
    let http = free_port();
    let mut command = Command::new(BINARY);
    command
        .arg("--listen")
        .arg(grpc.to_string())
        .arg("--http-listen")
        .arg(http.to_string())
        .arg("--data-dir")
        .arg(dir)
        .args(["--max-size", "1GiB"])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_SERVICE_NAME");
    if let Some(endpoint) = endpoint {
        command
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{endpoint}"))
            .env("OTEL_BSP_SCHEDULE_DELAY", "50");
    }
    Node::spawn(command, grpc, http, dir.to_path_buf())
}

/// What the test's Execute claims to come from.
fn request_metadata() -> RequestMetadata {
    RequestMetadata {
        tool_invocation_id: "invocation-1".into(),
        action_id: "action-1".into(),
        action_mnemonic: "Genrule".into(),
        target_id: "//pkg:target".into(),
        ..Default::default()
    }
}

/// Uploads an action running `script` and executes it through the node, with Bazel's
/// RequestMetadata header on the Execute call.
async fn execute(node: &Node, script: &str) -> ExecuteResponse {
    let command = ReapiCommand {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
    .encode_to_vec();
    let root = Directory::default().encode_to_vec();
    let action = Action {
        command_digest: Some(wire(&sha256(&command))),
        input_root_digest: Some(wire(&sha256(&root))),
        do_not_cache: true,
        ..Default::default()
    }
    .encode_to_vec();
    let requests = [&command, &root, &action]
        .into_iter()
        .map(|data| UpdateRequest {
            digest: Some(wire(&sha256(data))),
            data: Bytes::from(data.clone()),
            compressor: 0,
        })
        .collect();
    node.cas()
        .await
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests,
            ..Default::default()
        })
        .await
        .expect("BatchUpdateBlobs");
    let mut request = Request::new(ExecuteRequest {
        action_digest: Some(wire(&sha256(&action))),
        ..Default::default()
    });
    request.metadata_mut().insert_bin(
        "build.bazel.remote.execution.v2.requestmetadata-bin",
        MetadataValue::from_bytes(&request_metadata().encode_to_vec()),
    );
    let mut stream = ExecutionClient::new(node.channel().await)
        .execute(request)
        .await
        .expect("Execute")
        .into_inner();
    let mut last = None;
    while let Some(operation) = stream.message().await.expect("Execute stream") {
        last = Some(operation);
    }
    let operation = last.expect("an operation");
    assert!(operation.done);
    match operation.result {
        Some(cairn_proto::longrunning::operation::Result::Response(any)) => {
            ExecuteResponse::decode(any.value.as_slice()).expect("ExecuteResponse")
        }
        other => panic!("the operation ended without a response: {other:?}"),
    }
}

/// The spans of the action's trace once the scheduler's and the worker's have both
/// arrived, polled for at most 30 s. Each process exports in batches on its own
/// schedule, so the worker's span can arrive before the scheduler's, which ended
/// first.
async fn action_trace(receiver: &Receiver) -> Vec<Received> {
    for _ in 0..300 {
        let spans = receiver.spans();
        let node_span = spans.iter().find(|span| {
            span.service == "cairn"
                && span.name == "build.bazel.remote.execution.v2.Execution/Execute"
        });
        if let Some(node_span) = node_span {
            let trace: Vec<Received> = spans
                .iter()
                .filter(|span| span.trace_id == node_span.trace_id)
                .cloned()
                .collect();
            let has = |service: &str| {
                trace
                    .iter()
                    .any(|span| span.service == service && span.name == "Execute")
            };
            if has("cairn-scheduler") && has("cairn-worker") {
                return trace;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the action's trace did not arrive within 30 s; received: {:#?}",
        receiver.spans()
    );
}

#[tokio::test]
async fn one_remote_action_is_one_trace_across_node_scheduler_and_worker() {
    let (receiver, endpoint) = Receiver::start().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let node = node(&dir.path().join("node"), Some(endpoint));
    let response = execute(&node, "echo traced").await;
    assert_eq!(
        response.status.as_ref().map_or(0, |status| status.code),
        0,
        "{response:?}"
    );
    assert_eq!(response.result.as_ref().map(|r| r.exit_code), Some(0));

    let trace = action_trace(&receiver).await;
    let one = |service: &str, name: &str| -> Received {
        trace
            .iter()
            .find(|span| span.service == service && span.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} span from {service} in {trace:#?}"))
    };
    let node_span = one("cairn", "build.bazel.remote.execution.v2.Execution/Execute");
    let scheduler_span = one("cairn-scheduler", "Execute");
    let worker_span = one("cairn-worker", "Execute");

    // Parent links cross the processes: node → scheduler → worker.
    assert!(node_span.parent_span_id.is_empty(), "{node_span:?}");
    assert_eq!(scheduler_span.parent_span_id, node_span.span_id);
    assert_eq!(worker_span.parent_span_id, scheduler_span.span_id);
    // The worker's stages are children of its Execute span.
    for stage in ["fetch inputs", "run command", "upload outputs"] {
        assert_eq!(
            one("cairn-worker", stage).parent_span_id,
            worker_span.span_id,
            "{stage}"
        );
    }

    // Bazel's RequestMetadata and the action are on the node's span.
    let metadata = request_metadata();
    for (key, value) in [
        ("bazel.tool_invocation_id", metadata.tool_invocation_id),
        ("bazel.action_id", metadata.action_id),
        ("bazel.action_mnemonic", metadata.action_mnemonic),
        ("bazel.target_id", metadata.target_id),
    ] {
        assert_eq!(
            node_span.attributes.get(key),
            Some(&value),
            "{key} in {node_span:?}"
        );
    }
    assert_eq!(
        node_span.attributes.get("digest.hash").map(String::len),
        Some(64),
        "{node_span:?}"
    );
    assert!(
        node_span
            .attributes
            .get("shard")
            .is_some_and(|shard| shard.parse::<u64>().is_ok()),
        "no shard on {node_span:?}"
    );

    // The node's other RPCs have spans too, with what they found.
    let spans = receiver.spans();
    let update = spans
        .iter()
        .find(|span| {
            span.service == "cairn"
                && span.name
                    == "build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs"
        })
        .unwrap_or_else(|| panic!("no BatchUpdateBlobs span in {spans:#?}"));
    assert_eq!(
        update.attributes.get("rpc.system").map(String::as_str),
        Some("grpc")
    );

    let status = node.terminate();
    assert!(status.success(), "cairn exited with {status}");
}

/// How many of `pid`'s threads and its children's are the trace exporter's (tokio
/// names them `otlp-export`).
fn exporter_threads(pid: i32) -> usize {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .expect("the node's children");
    let pids: Vec<i32> = std::iter::once(pid)
        .chain(
            children
                .split_whitespace()
                .map(|child| child.parse().expect("a pid")),
        )
        .collect();
    assert_eq!(
        pids.len(),
        3,
        "the node, its scheduler and its worker: {pids:?}"
    );
    pids.iter()
        .flat_map(|pid| std::fs::read_dir(format!("/proc/{pid}/task")).expect("threads"))
        .filter_map(|task| std::fs::read_to_string(task.expect("thread").path().join("comm")).ok())
        .filter(|name| name.trim() == "otlp-export")
        .count()
}

#[tokio::test]
async fn exporters_run_only_with_an_endpoint() {
    let (_receiver, endpoint) = Receiver::start().await;
    let dir = tempfile::tempdir().expect("temporary directory");

    // The other OTEL_* variables alone start nothing, and execution works as usual.
    let mut command = Command::new(BINARY);
    let grpc = free_port();
    let http = free_port();
    command
        .arg("--listen")
        .arg(grpc.to_string())
        .arg("--http-listen")
        .arg(http.to_string())
        .arg("--data-dir")
        .arg(dir.path().join("untraced"))
        .args(["--max-size", "1GiB"])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env("OTEL_SERVICE_NAME", "untraced")
        .env("OTEL_BSP_SCHEDULE_DELAY", "50");
    let untraced = Node::spawn(command, grpc, http, dir.path().join("untraced"));
    let response = execute(&untraced, "echo untraced").await;
    assert_eq!(response.result.as_ref().map(|r| r.exit_code), Some(0));
    assert_eq!(exporter_threads(untraced.pid()), 0);
    let status = untraced.terminate();
    assert!(status.success(), "cairn exited with {status}");

    // With the endpoint each of the three processes runs one.
    let traced = node(&dir.path().join("traced"), Some(endpoint));
    assert_eq!(exporter_threads(traced.pid()), 3);
    let status = traced.terminate();
    assert!(status.success(), "cairn exited with {status}");
}
