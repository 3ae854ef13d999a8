//! A minimal OTLP/gRPC trace receiver for `scripts/e2e-bazel.sh`: it listens on a
//! loopback port, writes `IP:PORT` to the file named by its first argument, and
//! appends every span it is sent, one JSON object a line, to the file named by its
//! second (`service`, `name`, `trace_id`, `span_id`, `parent_span_id` in hex, and the
//! string attributes). It runs until it is killed.

use std::io::Write;
use std::sync::Mutex;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tonic::{Request, Response, Status};

struct Receiver {
    out: Mutex<std::fs::File>,
}

fn text(value: Option<&Value>) -> String {
    match value {
        Some(Value::StringValue(text)) => text.clone(),
        Some(Value::BoolValue(flag)) => flag.to_string(),
        Some(Value::IntValue(number)) => number.to_string(),
        _ => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut lines = String::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| resource.attributes.iter())
                .find(|attribute| attribute.key == "service.name")
                .map(|attribute| text(attribute.value.as_ref().and_then(|v| v.value.as_ref())))
                .unwrap_or_default();
            for span in resource_spans
                .scope_spans
                .into_iter()
                .flat_map(|scope| scope.spans)
            {
                let attributes: serde_json::Map<String, serde_json::Value> = span
                    .attributes
                    .iter()
                    .map(|attribute| {
                        let value = text(attribute.value.as_ref().and_then(|v| v.value.as_ref()));
                        (attribute.key.clone(), value.into())
                    })
                    .collect();
                let line = serde_json::json!({
                    "service": service,
                    "name": span.name,
                    "trace_id": hex::encode(&span.trace_id),
                    "span_id": hex::encode(&span.span_id),
                    "parent_span_id": hex::encode(&span.parent_span_id),
                    "attributes": attributes,
                });
                lines.push_str(&line.to_string());
                lines.push('\n');
            }
        }
        let mut out = self.out.lock().map_err(|_| Status::internal("poisoned"))?;
        out.write_all(lines.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|error| Status::internal(error.to_string()))?;
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(address_file), Some(spans_file)) = (args.next(), args.next()) else {
        return Err("usage: otlp-receiver ADDRESS_FILE SPANS_FILE".into());
    };
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(spans_file)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    std::fs::write(address_file, listener.local_addr()?.to_string())?;
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Receiver {
            out: Mutex::new(out),
        }))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}
