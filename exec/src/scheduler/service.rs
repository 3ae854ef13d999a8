//! The scheduler's gRPC services: REAPI Execution and Capabilities,
//! google.longrunning.Operations, and the worker protocol.
//!
//! They are thin: each turns a request into a call on [`Backend`] and the
//! scheduler's [`Progress`] into the `google.longrunning.Operation` REAPI clients
//! expect (ExecuteOperationMetadata with the stage, an ExecuteResponse once done). A
//! stream ends with the completed operation; a client that loses its stream calls
//! WaitExecution with the name and picks up where it left off.

use std::pin::Pin;
use std::time::Duration;

use cairn_proto::longrunning::operation::Result as OperationResult;
use cairn_proto::longrunning::operations_server::Operations;
use cairn_proto::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
    ListOperationsResponse, Operation, WaitOperationRequest,
};
use cairn_proto::reapi::capabilities_client::CapabilitiesClient;
use cairn_proto::reapi::capabilities_server::Capabilities;
use cairn_proto::reapi::digest_function::Value as FunctionValue;
use cairn_proto::reapi::execution_server::Execution;
use cairn_proto::reapi::execution_stage::Value as Stage;
use cairn_proto::reapi::{
    Digest, ExecuteOperationMetadata, ExecuteRequest, ExecutionCapabilities,
    GetCapabilitiesRequest, PriorityCapabilities, ServerCapabilities, WaitExecutionRequest,
};
use cairn_proto::worker::worker_api_server::WorkerApi;
use cairn_proto::worker::worker_message::Message as FromWorker;
use cairn_proto::worker::{
    DrainWorkerRequest, DrainWorkerResponse, ListWorkersRequest, ListWorkersResponse, WorkerMessage,
};
use futures::Stream;
use prost::Message;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::backend::Backend;
use super::state::{Progress, Watch};
use crate::auth::{Access, Need, Permission};
use crate::error::Error;
use crate::exec_common::{from_proto_duration, CacheChannel};

/// What Execute, WaitExecution and the Operations service need.
const EXECUTE: Need = Need::One(Permission::Execute);

/// What a worker needs to register (or an operator to drain one): the results a worker
/// reports become action-cache entries, so registering is trusted like writing them.
const WORKER: Need = Need::One(Permission::WriteAc);

type OperationStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

/// The wire form of an operation's state.
pub fn operation(name: &str, action_digest: &Digest, progress: &Progress) -> Operation {
    let stage = match progress {
        Progress::Queued => Stage::Queued,
        Progress::Executing => Stage::Executing,
        Progress::Completed(_) => Stage::Completed,
    };
    let metadata = ExecuteOperationMetadata {
        stage: stage as i32,
        action_digest: Some(action_digest.clone()),
        ..Default::default()
    };
    let result = match progress {
        Progress::Completed(response) => Some(OperationResult::Response(prost_types::Any {
            type_url: "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse"
                .to_string(),
            value: response.encode_to_vec(),
        })),
        _ => None,
    };
    Operation {
        name: name.to_string(),
        metadata: Some(prost_types::Any {
            type_url:
                "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteOperationMetadata"
                    .to_string(),
            value: metadata.encode_to_vec(),
        }),
        done: result.is_some(),
        result,
    }
}

/// A stream of the operation's states: the current one, then every change, ending
/// with the completed operation (or when the operation is forgotten).
fn operation_stream(watch: Watch) -> OperationStream {
    let Watch {
        name,
        action_digest,
        progress,
    } = watch;
    let stream = futures::stream::unfold(
        (progress, name, action_digest, true, false),
        |(mut progress, name, digest, first, done)| async move {
            if done {
                return None;
            }
            if !first && progress.changed().await.is_err() {
                return None;
            }
            let current = progress.borrow_and_update().clone();
            let finished = matches!(current, Progress::Completed(_));
            let item = operation(&name, &digest, &current);
            Some((Ok(item), (progress, name, digest, false, finished)))
        },
    );
    Box::pin(stream)
}

/// REAPI Execution.
pub struct ExecutionService {
    scheduler: Backend,
    access: Access,
}

impl ExecutionService {
    /// The service in front of `scheduler`, for the callers `access` allows.
    pub fn new(scheduler: impl Into<Backend>, access: Access) -> Self {
        Self {
            scheduler: scheduler.into(),
            access,
        }
    }
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let instance = request.get_ref().instance_name.clone();
        self.access.check_grpc(&request, EXECUTE, Some(&instance))?;
        let span = crate::traces::stage("Execute");
        crate::traces::child_of(&span, &crate::traces::from_metadata(request.metadata()));
        let watch = self
            .scheduler
            .execute(request.into_inner())
            .instrument(span)
            .await?;
        Ok(Response::new(operation_stream(watch)))
    }

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<Self::WaitExecutionStream>, Status> {
        self.access.check_grpc(&request, EXECUTE, None)?;
        let watch = self.scheduler.watch(&request.into_inner().name).await?;
        Ok(Response::new(operation_stream(watch)))
    }
}

/// google.longrunning.Operations over the scheduler's operations.
pub struct OperationsService {
    scheduler: Backend,
    access: Access,
}

impl OperationsService {
    /// The service in front of `scheduler`, for the callers `access` allows.
    pub fn new(scheduler: impl Into<Backend>, access: Access) -> Self {
        Self {
            scheduler: scheduler.into(),
            access,
        }
    }
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        self.access.check_grpc(&request, EXECUTE, None)?;
        let request = request.into_inner();
        let all = self.scheduler.list().await?;
        let start = if request.page_token.is_empty() {
            0
        } else {
            all.partition_point(|(name, _, _)| name.as_str() <= request.page_token.as_str())
        };
        let size = usize::try_from(request.page_size)
            .ok()
            .filter(|size| *size > 0)
            .unwrap_or(usize::MAX);
        let page: Vec<Operation> = all
            .iter()
            .skip(start)
            .take(size)
            .map(|(name, digest, progress)| operation(name, digest, progress))
            .collect();
        let next_page_token = if start.saturating_add(page.len()) < all.len() {
            page.last()
                .map(|last| last.name.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListOperationsResponse {
            operations: page,
            next_page_token,
            unreachable: Vec::new(),
        }))
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        self.access.check_grpc(&request, EXECUTE, None)?;
        let watch = self.scheduler.watch(&request.into_inner().name).await?;
        let current = watch.progress.borrow().clone();
        Ok(Response::new(operation(
            &watch.name,
            &watch.action_digest,
            &current,
        )))
    }

    async fn delete_operation(
        &self,
        request: Request<DeleteOperationRequest>,
    ) -> Result<Response<()>, Status> {
        self.access.check_grpc(&request, EXECUTE, None)?;
        self.scheduler.delete(&request.into_inner().name).await?;
        Ok(Response::new(()))
    }

    async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> Result<Response<()>, Status> {
        self.access.check_grpc(&request, EXECUTE, None)?;
        self.scheduler.cancel(&request.into_inner().name).await?;
        Ok(Response::new(()))
    }

    /// Waits until the operation is done or the request's timeout (default one
    /// minute) passes, and returns its state either way.
    async fn wait_operation(
        &self,
        request: Request<WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        self.access.check_grpc(&request, EXECUTE, None)?;
        let request = request.into_inner();
        let timeout = request
            .timeout
            .as_ref()
            .and_then(from_proto_duration)
            .unwrap_or(Duration::from_secs(60));
        let mut watch = self.scheduler.watch(&request.name).await?;
        let wait = watch
            .progress
            .wait_for(|progress| matches!(progress, Progress::Completed(_)));
        let _ = tokio::time::timeout(timeout, wait).await;
        let current = watch.progress.borrow().clone();
        Ok(Response::new(operation(
            &watch.name,
            &watch.action_digest,
            &current,
        )))
    }
}

/// REAPI Capabilities: the cache node's cache capabilities plus execution.
pub struct CapabilitiesService {
    cache: CacheChannel,
    access: Access,
}

impl CapabilitiesService {
    /// Asks the cache node behind `cache` for its part; answers the callers `access`
    /// knows.
    pub fn new(cache: CacheChannel, access: Access) -> Self {
        Self { cache, access }
    }
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        let instance = request.get_ref().instance_name.clone();
        self.access
            .check_grpc(&request, Need::Authenticated, Some(&instance))?;
        let mut capabilities = CapabilitiesClient::new(self.cache.clone())
            .get_capabilities(request.into_inner())
            .await
            .map(Response::into_inner)
            .unwrap_or_else(|status| {
                tracing::warn!("cache node capabilities unavailable: {}", status.message());
                ServerCapabilities::default()
            });
        capabilities.execution_capabilities = Some(ExecutionCapabilities {
            digest_function: FunctionValue::Sha256 as i32,
            exec_enabled: true,
            execution_priority_capabilities: Some(PriorityCapabilities {
                priorities: vec![cairn_proto::reapi::priority_capabilities::PriorityRange {
                    min_priority: i32::MIN,
                    max_priority: i32::MAX,
                }],
            }),
            supported_node_properties: Vec::new(),
            digest_functions: vec![FunctionValue::Sha256 as i32, FunctionValue::Blake3 as i32],
        });
        Ok(Response::new(capabilities))
    }
}

/// The worker protocol.
pub struct WorkerService {
    scheduler: Backend,
    access: Access,
}

impl WorkerService {
    /// The service in front of `scheduler`, for the callers `access` allows.
    pub fn new(scheduler: impl Into<Backend>, access: Access) -> Self {
        Self {
            scheduler: scheduler.into(),
            access,
        }
    }
}

#[tonic::async_trait]
impl WorkerApi for WorkerService {
    type ConnectStream =
        UnboundedReceiverStream<Result<cairn_proto::worker::SchedulerMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        self.access.check_grpc(&request, WORKER, None)?;
        let mut inbound = request.into_inner();
        let register = match inbound.message().await? {
            Some(WorkerMessage {
                message: Some(FromWorker::Register(register)),
            }) => register,
            _ => {
                return Err(
                    Error::invalid_argument("a worker session must begin with Register").into(),
                )
            }
        };
        let worker_id = register.worker_id.clone();
        let (session, outbox) = self.scheduler.register(register).await?;
        let scheduler = self.scheduler.clone();
        tokio::spawn(async move {
            let cause = loop {
                match inbound.message().await {
                    Ok(Some(WorkerMessage {
                        message: Some(message),
                    })) => scheduler.worker_message(&worker_id, session, message).await,
                    Ok(Some(WorkerMessage { message: None })) => {}
                    Ok(None) => break format!("worker {worker_id} disconnected"),
                    Err(status) => {
                        break format!("worker {worker_id} disconnected: {}", status.message())
                    }
                }
            };
            scheduler.worker_gone(&worker_id, session, &cause).await;
        });
        Ok(Response::new(UnboundedReceiverStream::new(outbox)))
    }

    async fn drain_worker(
        &self,
        request: Request<DrainWorkerRequest>,
    ) -> Result<Response<DrainWorkerResponse>, Status> {
        self.access.check_grpc(&request, WORKER, None)?;
        self.scheduler
            .drain(&request.into_inner().worker_id)
            .await?;
        Ok(Response::new(DrainWorkerResponse {}))
    }

    async fn list_workers(
        &self,
        request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        self.access
            .check_grpc(&request, Need::One(Permission::Metrics), None)?;
        Ok(Response::new(ListWorkersResponse {
            workers: self.scheduler.list_workers().await?,
        }))
    }
}
