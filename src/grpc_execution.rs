//! REAPI Execution and google.longrunning.Operations on the node's own endpoint, by
//! forwarding every call to the scheduler the node started (see [`crate::embedded`]).
//!
//! A single node is meant to be one address: Bazel's `--remote_executor` and
//! `--remote_cache` both point at it. The node does not schedule anything itself; it
//! passes Execute, WaitExecution and the Operations calls to its child
//! `cairn-scheduler` over loopback and relays the answers unchanged, so operation names,
//! stages and results are exactly the scheduler's.
//!
//! The node's handlers run on glommio executors and may only await `Send` futures,
//! while tonic's client transport needs a tokio runtime. So the forwarder owns a small
//! tokio runtime (one thread): each call is spawned onto it and the handler awaits the
//! join handle, and a streamed answer is pumped from the scheduler's stream into a
//! channel whose receiving end is the node's response stream. When the client goes
//! away the channel closes, the pump drops the scheduler's stream, and the scheduler
//! sees the cancellation as if the client had called it directly.

use std::future::Future;
use std::pin::Pin;

use cairn_proto::longrunning::operations_client::OperationsClient;
use cairn_proto::longrunning::operations_server::Operations;
use cairn_proto::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
    ListOperationsResponse, Operation, WaitOperationRequest,
};
use cairn_proto::reapi::execution_client::ExecutionClient;
use cairn_proto::reapi::execution_server::Execution;
use cairn_proto::reapi::{ExecuteRequest, WaitExecutionRequest};
use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Access, Need, Permission};
use crate::error::{Error, Result};
use crate::exec_common::lazy_channel;

type OperationStream = Pin<Box<dyn Stream<Item = std::result::Result<Operation, Status>> + Send>>;

/// Operations buffered between the scheduler's stream and the client's.
const STREAM_BUFFER: usize = 16;

/// The tokio side of the forwarder: a one-thread runtime and a channel to the
/// scheduler. Cloning shares both.
#[derive(Clone)]
pub struct Forwarder {
    runtime: tokio::runtime::Handle,
    scheduler: Channel,
    token: NodeToken,
}

/// The node's own token on every forwarded call, when its scheduler asks for one
/// (see `embedded.rs`): the client's credentials were checked here, and mean nothing
/// to the scheduler.
#[derive(Clone)]
struct NodeToken(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for NodeToken {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Keeps the forwarder's runtime alive; dropping it stops the forwarding.
pub struct ForwarderRuntime {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for ForwarderRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Forwarder {
    /// Starts the runtime and a (lazily connecting) channel to the scheduler at `url`,
    /// which is called with `token` if given.
    pub fn start(url: &str, token: Option<&str>) -> Result<(Forwarder, ForwarderRuntime)> {
        let token =
            match token {
                Some(token) => Some(format!("Bearer {token}").parse().map_err(|_| {
                    Error::internal("the node's token is not a valid header value")
                })?),
                None => None,
            };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("exec-forward")
            .enable_all()
            .build()
            .map_err(|error| {
                Error::internal(format!("cannot start the execution forwarder: {error}"))
            })?;
        let scheduler = {
            let _entered = runtime.enter();
            lazy_channel(url, &crate::client_tls::ClientTls::default())?
        };
        let forwarder = Forwarder {
            runtime: runtime.handle().clone(),
            scheduler,
            token: NodeToken(token),
        };
        Ok((
            forwarder,
            ForwarderRuntime {
                runtime: Some(runtime),
            },
        ))
    }

    /// Runs `call` on the forwarder's runtime and waits for its answer.
    async fn call<T, F>(&self, call: F) -> std::result::Result<T, Status>
    where
        F: Future<Output = std::result::Result<T, Status>> + Send + 'static,
        T: Send + 'static,
    {
        self.runtime.spawn(call).await.map_err(|error| {
            Status::internal(format!("forwarding to the scheduler failed: {error}"))
        })?
    }

    /// Relays the scheduler's `stream` to the client until either side ends it.
    fn relay(&self, mut stream: Streaming<Operation>) -> OperationStream {
        let (sender, receiver) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        self.runtime.spawn(async move {
            loop {
                let next = tokio::select! {
                    next = stream.message() => next,
                    () = sender.closed() => break,
                };
                let item = match next {
                    Ok(Some(operation)) => Ok(operation),
                    Ok(None) => break,
                    Err(status) => Err(status),
                };
                let failed = item.is_err();
                if sender.send(item).await.is_err() || failed {
                    break;
                }
            }
        });
        Box::pin(ReceiverStream::new(receiver))
    }

    fn execution(&self) -> ExecutionClient<InterceptedService<Channel, NodeToken>> {
        ExecutionClient::with_interceptor(self.scheduler.clone(), self.token.clone())
    }

    fn operations(&self) -> OperationsClient<InterceptedService<Channel, NodeToken>> {
        OperationsClient::with_interceptor(self.scheduler.clone(), self.token.clone())
    }
}

/// What following an operation needs. Operation names are random and unguessable, and
/// the scheduler does not tie them to an instance, so they are checked for the
/// permission alone.
const EXECUTE: Need = Need::One(Permission::Execute);

/// REAPI Execution, forwarded to the scheduler.
pub struct ExecutionService {
    forwarder: Forwarder,
    access: Access,
}

impl ExecutionService {
    /// Forwards through `forwarder` what `access` allows.
    pub fn new(forwarder: Forwarder, access: Access) -> Self {
        Self { forwarder, access }
    }
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> std::result::Result<Response<Self::ExecuteStream>, Status> {
        let instance = Some(request.get_ref().instance_name.as_str());
        self.access
            .check_grpc(&request, Need::One(Permission::Execute), instance)?;
        let mut client = self.forwarder.execution();
        let mut forwarded = Request::new(request.into_inner());
        if let Some(digest) = &forwarded.get_ref().action_digest {
            crate::traces::record("instance", forwarded.get_ref().instance_name.as_str());
            crate::traces::record("digest.hash", digest.hash.as_str());
            crate::traces::record("digest.size", digest.size_bytes);
        }
        // The scheduler's spans for this action continue this request's trace.
        crate::traces::into_metadata(&crate::traces::inject_current(), forwarded.metadata_mut());
        let stream = self
            .forwarder
            .call(async move { client.execute(forwarded).await.map(Response::into_inner) })
            .await?;
        Ok(Response::new(self.forwarder.relay(stream)))
    }

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> std::result::Result<Response<Self::WaitExecutionStream>, Status> {
        self.access.check_grpc(&request, EXECUTE, None)?;
        let mut client = self.forwarder.execution();
        let message = request.into_inner();
        let stream = self
            .forwarder
            .call(async move {
                client
                    .wait_execution(message)
                    .await
                    .map(Response::into_inner)
            })
            .await?;
        Ok(Response::new(self.forwarder.relay(stream)))
    }
}

/// google.longrunning.Operations, forwarded to the scheduler.
pub struct OperationsService {
    forwarder: Forwarder,
    access: Access,
}

impl OperationsService {
    /// Forwards through `forwarder` what `access` allows.
    pub fn new(forwarder: Forwarder, access: Access) -> Self {
        Self { forwarder, access }
    }
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> std::result::Result<Response<ListOperationsResponse>, Status> {
        self.access.check_grpc(&request, EXECUTE, None)?;
        let mut client = self.forwarder.operations();
        let message = request.into_inner();
        self.forwarder
            .call(async move { client.list_operations(message).await })
            .await
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> std::result::Result<Response<Operation>, Status> {
        self.access.check_grpc(&request, EXECUTE, None)?;
        let mut client = self.forwarder.operations();
        let message = request.into_inner();
        self.forwarder
            .call(async move { client.get_operation(message).await })
            .await
    }

    async fn delete_operation(
        &self,
        request: Request<DeleteOperationRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        self.access.check_grpc(&request, EXECUTE, None)?;
        let mut client = self.forwarder.operations();
        let message = request.into_inner();
        self.forwarder
            .call(async move { client.delete_operation(message).await })
            .await
    }

    async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        self.access.check_grpc(&request, EXECUTE, None)?;
        let mut client = self.forwarder.operations();
        let message = request.into_inner();
        self.forwarder
            .call(async move { client.cancel_operation(message).await })
            .await
    }

    async fn wait_operation(
        &self,
        request: Request<WaitOperationRequest>,
    ) -> std::result::Result<Response<Operation>, Status> {
        self.access.check_grpc(&request, EXECUTE, None)?;
        let mut client = self.forwarder.operations();
        let message = request.into_inner();
        self.forwarder
            .call(async move { client.wait_operation(message).await })
            .await
    }
}
