//! Unit tests of the scheduler's state, through the same calls the gRPC services make.
//!
//! `Scheduler::execute` reads Actions, Commands and action-cache entries from a cache
//! node, so the tests serve an in-memory fake of the CAS and AC on a loopback port.
//! Workers are simulated the way `service.rs` drives a worker session: `register`,
//! `worker_message`, `worker_gone`, and the session's outbox. Time is the scheduler's
//! test clock, which stands still until a test calls [`advance`], so keepalive, deadline
//! and retention rules are exercised by calling `tick` without waiting.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use cairn_proto::longrunning::operations_server::Operations;
use cairn_proto::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
};
use cairn_proto::reapi::action_cache_server::{ActionCache, ActionCacheServer};
use cairn_proto::reapi::batch_read_blobs_response::Response as ReadResponse;
use cairn_proto::reapi::content_addressable_storage_server::{
    ContentAddressableStorage, ContentAddressableStorageServer,
};
use cairn_proto::reapi::digest_function::Value as FunctionValue;
use cairn_proto::reapi::execution_server::Execution;
use cairn_proto::reapi::execution_stage::Value as Stage;
use cairn_proto::reapi::{Action, Command};
use cairn_proto::reapi::{
    ActionResult, BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest,
    BatchUpdateBlobsResponse, ExecuteOperationMetadata, ExecutionPolicy, FindMissingBlobsRequest,
    FindMissingBlobsResponse, GetActionResultRequest, GetTreeRequest, GetTreeResponse, Platform,
    SpliceBlobRequest, SpliceBlobResponse, SplitBlobRequest, SplitBlobResponse,
    UpdateActionResultRequest, WaitExecutionRequest,
};
use cairn_proto::rpc;
use cairn_proto::worker::{Keepalive, TaskRejected};
use futures::StreamExt;
use prost::Message;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc::error::TryRecvError;
use tonic::{Request, Response, Status};

use super::*;
use crate::exec_common::{cache_channel, rpc_status, CacheChannel};
use crate::scheduler::service::{ExecutionService, OperationsService};

type Rpc<T> = std::result::Result<Response<T>, Status>;

/// What the fake cache node holds, and how often the action cache was asked and
/// written.
#[derive(Default)]
struct CacheContents {
    blobs: Mutex<HashMap<String, Bytes>>,
    results: Mutex<HashMap<String, ActionResult>>,
    lookups: AtomicUsize,
    updates: AtomicUsize,
}

#[derive(Clone, Default)]
struct FakeCache(Arc<CacheContents>);

#[tonic::async_trait]
impl ContentAddressableStorage for FakeCache {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Rpc<FindMissingBlobsResponse> {
        let blobs = self.0.blobs.lock().unwrap();
        let missing_blob_digests = request
            .into_inner()
            .blob_digests
            .into_iter()
            .filter(|digest| !blobs.contains_key(&digest.hash))
            .collect();
        Ok(Response::new(FindMissingBlobsResponse {
            missing_blob_digests,
        }))
    }

    async fn batch_update_blobs(
        &self,
        _request: Request<BatchUpdateBlobsRequest>,
    ) -> Rpc<BatchUpdateBlobsResponse> {
        Err(Status::unimplemented("the scheduler never writes blobs"))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Rpc<BatchReadBlobsResponse> {
        let blobs = self.0.blobs.lock().unwrap();
        let responses = request
            .into_inner()
            .digests
            .into_iter()
            .map(|digest| {
                let (data, code) = match blobs.get(&digest.hash) {
                    Some(data) => (data.clone(), Code::Ok),
                    None => (Bytes::new(), Code::NotFound),
                };
                ReadResponse {
                    digest: Some(digest),
                    data,
                    compressor: 0,
                    status: Some(rpc_status(code, "")),
                }
            })
            .collect();
        Ok(Response::new(BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream =
        futures::stream::BoxStream<'static, std::result::Result<GetTreeResponse, Status>>;

    async fn get_tree(&self, _request: Request<GetTreeRequest>) -> Rpc<Self::GetTreeStream> {
        Err(Status::unimplemented("the scheduler never reads trees"))
    }

    async fn split_blob(&self, _request: Request<SplitBlobRequest>) -> Rpc<SplitBlobResponse> {
        Err(Status::unimplemented("not used by the scheduler"))
    }

    async fn splice_blob(&self, _request: Request<SpliceBlobRequest>) -> Rpc<SpliceBlobResponse> {
        Err(Status::unimplemented("not used by the scheduler"))
    }
}

#[tonic::async_trait]
impl ActionCache for FakeCache {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Rpc<ActionResult> {
        self.0.lookups.fetch_add(1, Ordering::SeqCst);
        let hash = request.into_inner().action_digest.unwrap_or_default().hash;
        match self.0.results.lock().unwrap().get(&hash) {
            Some(result) => Ok(Response::new(result.clone())),
            None => Err(Status::not_found("no result")),
        }
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Rpc<ActionResult> {
        self.0.updates.fetch_add(1, Ordering::SeqCst);
        let request = request.into_inner();
        let hash = request.action_digest.unwrap_or_default().hash;
        let result = request.action_result.unwrap_or_default();
        self.0.results.lock().unwrap().insert(hash, result.clone());
        Ok(Response::new(result))
    }
}

thread_local! {
    /// Where this test thread's scheduler clock started.
    static START: Instant = Instant::now();
    /// How far this test has moved the scheduler clock since.
    static ELAPSED: Cell<Duration> = const { Cell::new(Duration::ZERO) };
}

/// The scheduler clock of this test thread (`#[tokio::test]` runs everything on the
/// test's own thread). It stands still between calls to [`advance`], so a bound such as
/// "timeout plus keepalive timeout" can be approached to the second and crossed.
pub(super) fn now() -> Instant {
    START.with(|start| *start) + ELAPSED.with(Cell::get)
}

/// Moves the scheduler clock of this test forward.
fn advance(by: Duration) {
    ELAPSED.with(|elapsed| elapsed.set(elapsed.get() + by));
}

fn digest_of(bytes: &[u8]) -> Digest {
    Digest {
        hash: hex::encode(Sha256::digest(bytes)),
        size_bytes: bytes.len() as i64,
    }
}

/// A scheduler in front of a fake cache node.
struct Harness {
    cache: FakeCache,
    channel: CacheChannel,
    scheduler: Arc<Scheduler>,
}

impl Harness {
    async fn start(config: SchedulerConfig) -> Self {
        let cache = FakeCache::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ContentAddressableStorageServer::new(cache.clone()))
                .add_service(ActionCacheServer::new(cache.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel =
            cache_channel(&format!("http://{address}"), None, &Default::default()).unwrap();
        let scheduler = Scheduler::new(config, channel.clone());
        Self {
            cache,
            channel,
            scheduler,
        }
    }

    /// A fresh scheduler on the same cache node, as after a scheduler restart.
    fn restart(&mut self) {
        let config = self.scheduler.config().clone();
        self.scheduler = Scheduler::new(config, self.channel.clone());
    }

    fn put(&self, bytes: Vec<u8>) -> Digest {
        let digest = digest_of(&bytes);
        self.cache
            .0
            .blobs
            .lock()
            .unwrap()
            .insert(digest.hash.clone(), Bytes::from(bytes));
        digest
    }

    /// Stores an Action (and its Command) whose command line names `name`, so distinct
    /// names are distinct actions; `change` adjusts the Action.
    fn action_with(&self, name: &str, change: impl FnOnce(&mut Action, &mut Command)) -> Digest {
        let mut command = Command {
            arguments: vec!["true".to_string(), name.to_string()],
            ..Default::default()
        };
        let mut action = Action {
            input_root_digest: Some(digest_of(&[])),
            ..Default::default()
        };
        change(&mut action, &mut command);
        action.command_digest = Some(self.put(command.encode_to_vec()));
        self.put(action.encode_to_vec())
    }

    fn action(&self, name: &str) -> Digest {
        self.action_with(name, |_, _| {})
    }

    async fn execute_with(
        &self,
        action: &Digest,
        change: impl FnOnce(&mut ExecuteRequest),
    ) -> Watch {
        let mut request = ExecuteRequest {
            action_digest: Some(action.clone()),
            digest_function: FunctionValue::Sha256 as i32,
            ..Default::default()
        };
        change(&mut request);
        self.scheduler.execute(request).await.unwrap()
    }

    async fn execute(&self, action: &Digest) -> Watch {
        self.execute_with(action, |_| {}).await
    }

    async fn execute_at_priority(&self, action: &Digest, priority: i32) -> Watch {
        self.execute_with(action, |request| {
            request.execution_policy = Some(ExecutionPolicy { priority });
        })
        .await
    }

    fn lookups(&self) -> usize {
        self.cache.0.lookups.load(Ordering::SeqCst)
    }

    fn updates(&self) -> usize {
        self.cache.0.updates.load(Ordering::SeqCst)
    }

    /// Puts a result for `action` in the action cache.
    fn cache_result(&self, action: &Digest, exit_code: i32) {
        self.cache
            .0
            .results
            .lock()
            .unwrap()
            .insert(action.hash.clone(), success(exit_code).result.unwrap());
    }

    fn cached_exit_code(&self, action: &Digest) -> Option<i32> {
        let results = self.cache.0.results.lock().unwrap();
        results.get(&action.hash).map(|result| result.exit_code)
    }

    fn connect(&self, id: &str, max_inflight: u32) -> FakeWorker {
        FakeWorker::connect(&self.scheduler, id, max_inflight)
    }
}

/// One simulated worker session.
struct FakeWorker {
    id: String,
    session: u64,
    outbox: WorkerOutbox,
}

impl FakeWorker {
    fn connect(scheduler: &Scheduler, id: &str, max_inflight: u32) -> Self {
        Self::reconnect(scheduler, id, max_inflight, &[])
    }

    /// A session of a worker that still runs `running` from an earlier one.
    fn reconnect(scheduler: &Scheduler, id: &str, max_inflight: u32, running: &[&str]) -> Self {
        let (session, outbox) = scheduler
            .register(Register {
                worker_id: id.to_string(),
                properties: Vec::new(),
                max_inflight_tasks: max_inflight,
                running_task_ids: running.iter().map(|id| id.to_string()).collect(),
            })
            .unwrap();
        let mut worker = Self {
            id: id.to_string(),
            session,
            outbox,
        };
        match worker.next() {
            Some(ToWorker::Registered(_)) => {}
            other => panic!("{id}: expected Registered first, got {other:?}"),
        }
        worker
    }

    /// The next message the scheduler sent, if any.
    fn next(&mut self) -> Option<ToWorker> {
        match self.outbox.try_recv() {
            Ok(Ok(message)) => message.message,
            Ok(Err(status)) => panic!("{}: session failed: {status}", self.id),
            Err(_) => None,
        }
    }

    fn start(&mut self) -> StartTask {
        match self.next() {
            Some(ToWorker::Start(start)) => start,
            other => panic!("{}: expected a StartTask, got {other:?}", self.id),
        }
    }

    fn idle(&mut self) {
        if let Some(message) = self.next() {
            panic!("{}: expected nothing, got {message:?}", self.id);
        }
    }

    /// Whether the scheduler ended this session (dropped its end of the outbox).
    fn ended(&mut self) -> bool {
        loop {
            match self.outbox.try_recv() {
                Ok(_) => continue,
                Err(TryRecvError::Disconnected) => return true,
                Err(TryRecvError::Empty) => return false,
            }
        }
    }

    fn send(&self, scheduler: &Scheduler, message: FromWorker) {
        scheduler.worker_message(&self.id, self.session, message);
    }

    fn finish(&self, scheduler: &Scheduler, task: &StartTask, response: ExecuteResponse) {
        self.send(
            scheduler,
            FromWorker::Result(TaskResult {
                task_id: task.task_id.clone(),
                outcome: Some(Outcome::Response(response)),
            }),
        );
    }

    fn keepalive(&self, scheduler: &Scheduler) {
        self.send(scheduler, FromWorker::Keepalive(Keepalive {}));
    }
}

fn success(exit_code: i32) -> ExecuteResponse {
    ExecuteResponse {
        result: Some(ActionResult {
            exit_code,
            ..Default::default()
        }),
        status: Some(rpc_status(Code::Ok, "")),
        ..Default::default()
    }
}

fn stage(watch: &Watch) -> &'static str {
    match *watch.progress.borrow() {
        Progress::Queued => "queued",
        Progress::Executing => "executing",
        Progress::Completed(_) => "completed",
    }
}

fn response(watch: &Watch) -> Arc<ExecuteResponse> {
    match &*watch.progress.borrow() {
        Progress::Completed(response) => response.clone(),
        other => panic!("operation {} is not completed: {other:?}", watch.name),
    }
}

fn code(response: &ExecuteResponse) -> Code {
    Code::from_i32(response.status.as_ref().map_or(0, |status| status.code))
}

fn message(response: &ExecuteResponse) -> String {
    response
        .status
        .as_ref()
        .map(|status| status.message.clone())
        .unwrap_or_default()
}

fn config() -> SchedulerConfig {
    SchedulerConfig::default()
}

#[tokio::test]
async fn queue_runs_lower_priority_values_first_then_in_arrival_order() {
    let harness = Harness::start(config()).await;
    let late_low = harness.action("late_low");
    let urgent = harness.action("urgent");
    let second_low = harness.action("second_low");
    let most_urgent = harness.action("most_urgent");
    let mut watches = Vec::new();
    for (action, priority) in [
        (&late_low, 5),
        (&urgent, 0),
        (&second_low, 5),
        (&most_urgent, -1),
    ] {
        watches.push(harness.execute_at_priority(action, priority).await);
    }
    assert!(watches.iter().all(|watch| stage(watch) == "queued"));

    let scheduler = &harness.scheduler;
    let mut worker = harness.connect("w", 1);
    for expected in [&most_urgent, &urgent, &late_low, &second_low] {
        let task = worker.start();
        assert_eq!(task.action_digest.as_ref(), Some(expected));
        worker.idle();
        worker.finish(scheduler, &task, success(0));
    }
    assert!(watches
        .iter()
        .all(|watch| code(&response(watch)) == Code::Ok));
}

/// Which of `workers` was given a task; exactly one must have been.
fn started_on(workers: &mut [FakeWorker]) -> (usize, StartTask) {
    let mut started: Vec<(usize, StartTask)> = workers
        .iter_mut()
        .enumerate()
        .filter_map(|(index, worker)| match worker.next() {
            Some(ToWorker::Start(task)) => Some((index, task)),
            None => None,
            Some(other) => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(started.len(), 1, "one worker gets the task");
    started.remove(0)
}

/// Runs three actions one after another on two idle workers and returns which worker
/// ran each.
async fn selection_order(selection: WorkerSelection) -> Vec<usize> {
    let harness = Harness::start(SchedulerConfig {
        worker_selection: selection,
        ..config()
    })
    .await;
    let mut workers = vec![harness.connect("a", 1), harness.connect("b", 1)];
    let mut order = Vec::new();
    for name in ["one", "two", "three"] {
        let watch = harness.execute(&harness.action(name)).await;
        let (index, task) = started_on(&mut workers);
        workers[index].finish(&harness.scheduler, &task, success(0));
        assert_eq!(code(&response(&watch)), Code::Ok);
        order.push(index);
    }
    order
}

#[tokio::test]
async fn lru_selection_gives_work_to_the_worker_idle_longest() {
    let order = selection_order(WorkerSelection::Lru).await;
    assert_ne!(order[0], order[1], "{order:?}");
    assert_eq!(order[0], order[2], "{order:?}");
}

#[tokio::test]
async fn mru_selection_keeps_giving_work_to_the_worker_used_last() {
    let order = selection_order(WorkerSelection::Mru).await;
    assert_eq!(order[0], order[1], "{order:?}");
    assert_eq!(order[0], order[2], "{order:?}");
}

#[tokio::test]
async fn a_worker_that_stops_sending_keepalives_loses_its_job_to_another() {
    let harness = Harness::start(SchedulerConfig {
        keepalive_timeout: Duration::from_secs(30),
        ..config()
    })
    .await;
    let scheduler = &harness.scheduler;
    let mut silent = harness.connect("silent", 1);
    let watch = harness.execute(&harness.action("step")).await;
    let first = silent.start();

    advance(Duration::from_secs(29));
    scheduler.tick();
    silent.keepalive(scheduler);
    advance(Duration::from_secs(29));
    scheduler.tick();
    assert_eq!(stage(&watch), "executing", "a keepalive keeps the worker");
    assert!(!silent.ended());

    advance(Duration::from_secs(2));
    scheduler.tick();
    assert!(silent.ended(), "31s of silence ends the session");
    assert_eq!(stage(&watch), "queued");

    let mut next = harness.connect("next", 1);
    let second = next.start();
    assert_eq!(second.action_digest, first.action_digest);
    assert_ne!(second.task_id, first.task_id);
    silent.finish(scheduler, &first, success(1));
    assert_eq!(
        stage(&watch),
        "executing",
        "the lost session's report is ignored"
    );
    next.finish(scheduler, &second, success(0));
    assert_eq!(response(&watch).result.as_ref().unwrap().exit_code, 0);
}

#[tokio::test]
async fn a_job_lost_more_often_than_max_job_retries_fails_with_unavailable() {
    let harness = Harness::start(SchedulerConfig {
        max_job_retries: 2,
        ..config()
    })
    .await;
    let scheduler = &harness.scheduler;
    let watch = harness.execute(&harness.action("crashes its worker")).await;
    for attempt in 0..3 {
        let mut worker = harness.connect(&format!("w{attempt}"), 1);
        worker.start();
        assert_eq!(stage(&watch), "executing");
        scheduler.worker_gone(&worker.id, worker.session, "worker vanished");
        if attempt < 2 {
            assert_eq!(stage(&watch), "queued", "attempt {attempt} is retried");
        }
    }
    let response = response(&watch);
    assert_eq!(code(&response), Code::Unavailable);
    assert!(
        message(&response).contains("worker vanished"),
        "{response:?}"
    );
    harness.connect("after", 1).idle();
}

#[tokio::test]
async fn a_rejected_task_runs_elsewhere_without_spending_a_retry() {
    let harness = Harness::start(SchedulerConfig {
        max_job_retries: 0,
        ..config()
    })
    .await;
    let scheduler = &harness.scheduler;
    let mut refuses = harness.connect("refuses", 1);
    let watch = harness.execute(&harness.action("step")).await;
    let task = refuses.start();
    refuses.send(
        scheduler,
        FromWorker::Rejected(TaskRejected {
            task_id: task.task_id.clone(),
            reason: "disk full".to_string(),
        }),
    );
    assert_eq!(stage(&watch), "queued");
    refuses.idle();
    let mut accepts = harness.connect("accepts", 1);
    let task = accepts.start();
    accepts.finish(scheduler, &task, success(0));
    assert_eq!(code(&response(&watch)), Code::Ok);
}

#[tokio::test]
async fn the_tick_ends_an_overdue_action_and_cancels_it_on_its_worker() {
    let harness = Harness::start(SchedulerConfig {
        keepalive_timeout: Duration::from_secs(30),
        ..config()
    })
    .await;
    let scheduler = &harness.scheduler;
    let mut worker = harness.connect("w", 1);
    let action = harness.action_with("hangs", |action, _| {
        action.timeout = Some(proto_duration(Duration::from_secs(10)));
    });
    let watch = harness.execute(&action).await;
    let task = worker.start();
    assert_eq!(task.timeout, Some(proto_duration(Duration::from_secs(10))));

    // The worker stays alive (keepalives) but never reports; the scheduler allows the
    // timeout plus one keepalive timeout before giving up.
    for _ in 0..2 {
        advance(Duration::from_secs(20));
        worker.keepalive(scheduler);
        scheduler.tick();
    }
    assert_eq!(stage(&watch), "executing", "40s is not past 10s + 30s");
    worker.idle();
    advance(Duration::from_secs(2));
    worker.keepalive(scheduler);
    scheduler.tick();
    let response = response(&watch);
    assert_eq!(code(&response), Code::DeadlineExceeded, "{response:?}");
    match worker.next() {
        Some(ToWorker::Cancel(cancel)) => assert_eq!(cancel.task_id, task.task_id),
        other => panic!("expected a CancelTask, got {other:?}"),
    }
}

#[tokio::test]
async fn action_timeouts_default_and_are_capped() {
    let harness = Harness::start(SchedulerConfig {
        default_action_timeout: Duration::from_secs(60),
        max_action_timeout: Duration::from_secs(600),
        ..config()
    })
    .await;
    let mut worker = harness.connect("w", 2);
    harness.execute(&harness.action("no timeout")).await;
    let long = harness.action_with("long", |action, _| {
        action.timeout = Some(proto_duration(Duration::from_secs(7200)));
    });
    harness.execute(&long).await;
    assert_eq!(
        worker.start().timeout,
        Some(proto_duration(Duration::from_secs(60)))
    );
    assert_eq!(
        worker.start().timeout,
        Some(proto_duration(Duration::from_secs(600)))
    );
}

// The platform goes in the Command, where Bazel 4 (REAPI 2.0) puts it.
#[allow(deprecated)]
#[tokio::test]
async fn an_action_no_worker_matches_fails_after_the_unschedulable_timeout() {
    let harness = Harness::start(SchedulerConfig {
        unschedulable_timeout: Duration::from_secs(60),
        ..config()
    })
    .await;
    let scheduler = &harness.scheduler;
    let mut worker = harness.connect("plain", 1);
    let action = harness.action_with("needs gpu", |_, command| {
        command.platform = Some(Platform {
            properties: vec![Property {
                name: "gpu".to_string(),
                value: "yes".to_string(),
            }],
        });
    });
    let watch = harness.execute(&action).await;
    scheduler.tick();
    advance(Duration::from_secs(59));
    worker.keepalive(scheduler);
    scheduler.tick();
    assert_eq!(stage(&watch), "queued");
    advance(Duration::from_secs(2));
    worker.keepalive(scheduler);
    scheduler.tick();
    let response = response(&watch);
    assert_eq!(code(&response), Code::FailedPrecondition, "{response:?}");
    assert!(message(&response).contains("gpu"), "{response:?}");
    worker.idle();
}

#[tokio::test]
async fn a_cached_result_answers_without_a_worker_unless_lookup_is_skipped() {
    let harness = Harness::start(config()).await;
    let action = harness.action("cached");
    harness.cache_result(&action, 0);
    let hit = harness.execute(&action).await;
    let hit = response(&hit);
    assert!(hit.cached_result);
    assert_eq!(harness.lookups(), 1);

    let skipped = harness
        .execute_with(&action, |request| request.skip_cache_lookup = true)
        .await;
    assert_eq!(stage(&skipped), "queued");
    assert_eq!(harness.lookups(), 1);
}

#[tokio::test]
async fn identical_actions_in_flight_share_one_job() {
    let harness = Harness::start(config()).await;
    let scheduler = &harness.scheduler;
    let mut worker = harness.connect("w", 4);
    let action = harness.action("shared");
    let first = harness.execute(&action).await;
    let second = harness.execute(&action).await;
    let other_instance = harness
        .execute_with(&action, |request| {
            request.instance_name = "other".to_string()
        })
        .await;
    assert_ne!(first.name, second.name);
    assert_eq!(
        stage(&second),
        "executing",
        "the second joins the running job"
    );
    let task = worker.start();
    let separate = worker.start();
    assert_eq!(separate.instance_name, "other");
    worker.idle();

    worker.finish(scheduler, &task, success(3));
    for watch in [&first, &second] {
        let response = response(watch);
        assert_eq!(response.result.as_ref().unwrap().exit_code, 3);
        assert!(!response.cached_result);
    }
    assert_eq!(stage(&other_instance), "executing");

    // Once the job is done, the same action runs again rather than joining it.
    let again = harness
        .execute_with(&action, |request| request.skip_cache_lookup = true)
        .await;
    assert_eq!(stage(&again), "executing");
    worker.start();
}

#[tokio::test]
async fn do_not_cache_actions_are_neither_shared_nor_answered_from_the_cache() {
    let harness = Harness::start(config()).await;
    let scheduler = &harness.scheduler;
    let mut worker = harness.connect("w", 2);
    let action = harness.action_with("uncacheable", |action, _| action.do_not_cache = true);
    harness.cache_result(&action, 9);
    let first = harness.execute(&action).await;
    let second = harness.execute(&action).await;
    assert_eq!(harness.lookups(), 0, "the action cache is not consulted");
    let one = worker.start();
    let two = worker.start();
    assert_ne!(one.task_id, two.task_id, "each Execute runs the action");
    worker.finish(scheduler, &one, success(1));
    assert_eq!(stage(&second), "executing");
    worker.finish(scheduler, &two, success(2));
    for (watch, exit_code) in [(&first, 1), (&second, 2)] {
        let response = response(watch);
        assert_eq!(response.result.as_ref().unwrap().exit_code, exit_code);
        assert!(!response.cached_result);
    }
    assert_eq!(harness.updates(), 0, "no result is written");
    assert_eq!(harness.cached_exit_code(&action), Some(9));
}

#[tokio::test]
async fn a_missing_action_is_failed_precondition_naming_it_even_with_a_cached_result() {
    let harness = Harness::start(config()).await;
    let missing = digest_of(b"never uploaded");
    harness.cache_result(&missing, 0);
    let watch = harness.execute(&missing).await;
    let response = response(&watch);
    assert_eq!(code(&response), Code::FailedPrecondition);
    let details = &response.status.as_ref().unwrap().details;
    let failure = rpc::PreconditionFailure::decode(details[0].value.as_slice()).unwrap();
    assert_eq!(
        failure.violations[0].subject,
        format!("blobs/{}/{}", missing.hash, missing.size_bytes)
    );
}

fn stage_of(operation: &cairn_proto::longrunning::Operation) -> Stage {
    let metadata =
        ExecuteOperationMetadata::decode(operation.metadata.as_ref().unwrap().value.as_slice())
            .unwrap();
    Stage::try_from(metadata.stage).unwrap()
}

#[tokio::test]
async fn wait_execution_follows_an_operation_to_its_end() {
    let harness = Harness::start(config()).await;
    let scheduler = &harness.scheduler;
    let service = ExecutionService::new(scheduler.clone(), open_access());
    let watch = harness.execute(&harness.action("step")).await;
    let mut stream = service
        .wait_execution(Request::new(WaitExecutionRequest {
            name: watch.name.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let queued = stream.next().await.unwrap().unwrap();
    assert_eq!(queued.name, watch.name);
    assert!(!queued.done);
    assert_eq!(stage_of(&queued), Stage::Queued);

    let mut worker = harness.connect("w", 1);
    let task = worker.start();
    let executing = stream.next().await.unwrap().unwrap();
    assert_eq!(stage_of(&executing), Stage::Executing);

    worker.finish(scheduler, &task, success(4));
    let done = stream.next().await.unwrap().unwrap();
    assert!(done.done);
    assert_eq!(stage_of(&done), Stage::Completed);
    let Some(cairn_proto::longrunning::operation::Result::Response(any)) = done.result else {
        panic!("no response in {done:?}");
    };
    let response = ExecuteResponse::decode(any.value.as_slice()).unwrap();
    assert_eq!(response.result.unwrap().exit_code, 4);
    assert!(stream.next().await.is_none(), "the stream ends when done");

    let unknown = service
        .wait_execution(Request::new(WaitExecutionRequest {
            name: "nonesuch".to_string(),
        }))
        .await;
    assert_eq!(unknown.err().unwrap().code(), Code::NotFound);
}

#[tokio::test]
async fn operations_service_gets_lists_cancels_and_deletes() {
    let harness = Harness::start(config()).await;
    let scheduler = &harness.scheduler;
    let service = OperationsService::new(scheduler.clone(), open_access());
    let mut worker = harness.connect("w", 1);
    let running = harness.execute(&harness.action("running")).await;
    let queued = harness.execute(&harness.action("queued")).await;
    let third = harness.execute(&harness.action("third")).await;
    let task = worker.start();

    let got = service
        .get_operation(Request::new(GetOperationRequest {
            name: running.name.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stage_of(&got), Stage::Executing);
    assert!(!got.done);

    let first_page = service
        .list_operations(Request::new(ListOperationsRequest {
            page_size: 2,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first_page.operations.len(), 2);
    assert!(!first_page.next_page_token.is_empty());
    let second_page = service
        .list_operations(Request::new(ListOperationsRequest {
            page_size: 2,
            page_token: first_page.next_page_token.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second_page.operations.len(), 1);
    assert!(second_page.next_page_token.is_empty());
    let listed: Vec<String> = first_page
        .operations
        .iter()
        .chain(&second_page.operations)
        .map(|operation| operation.name.clone())
        .collect();
    let mut expected = vec![
        running.name.clone(),
        queued.name.clone(),
        third.name.clone(),
    ];
    expected.sort();
    assert_eq!(listed, expected, "every operation once, in name order");

    service
        .cancel_operation(Request::new(CancelOperationRequest {
            name: running.name.clone(),
        }))
        .await
        .unwrap();
    assert_eq!(code(&response(&running)), Code::Cancelled);
    match worker.next() {
        Some(ToWorker::Cancel(cancel)) => assert_eq!(cancel.task_id, task.task_id),
        other => panic!("expected a CancelTask, got {other:?}"),
    }
    // The worker's report on the cancelled task frees its slot for the next job and
    // does not change the cancelled operation.
    worker.finish(scheduler, &task, success(0));
    assert_eq!(code(&response(&running)), Code::Cancelled);
    let next = worker.start();

    service
        .delete_operation(Request::new(DeleteOperationRequest {
            name: queued.name.clone(),
        }))
        .await
        .unwrap();
    match worker.next() {
        Some(ToWorker::Cancel(cancel)) => assert_eq!(cancel.task_id, next.task_id),
        other => panic!("deleting a running operation cancels it; got {other:?}"),
    }
    let gone = service
        .get_operation(Request::new(GetOperationRequest {
            name: queued.name.clone(),
        }))
        .await;
    assert_eq!(gone.err().unwrap().code(), Code::NotFound);
    let missing = service
        .cancel_operation(Request::new(CancelOperationRequest {
            name: "nonesuch".to_string(),
        }))
        .await;
    assert_eq!(missing.err().unwrap().code(), Code::NotFound);
}

#[tokio::test]
async fn cancelling_one_of_two_shared_operations_keeps_the_job_for_the_other() {
    let harness = Harness::start(config()).await;
    let scheduler = &harness.scheduler;
    let mut worker = harness.connect("w", 1);
    let action = harness.action("shared");
    let first = harness.execute(&action).await;
    let second = harness.execute(&action).await;
    let task = worker.start();
    scheduler.cancel(&first.name).unwrap();
    assert_eq!(code(&response(&first)), Code::Cancelled);
    assert_eq!(stage(&second), "executing");
    worker.idle();
    worker.finish(scheduler, &task, success(0));
    assert_eq!(code(&response(&second)), Code::Ok);
    assert_eq!(code(&response(&first)), Code::Cancelled);
}

#[tokio::test]
async fn finished_operations_are_forgotten_after_the_retention() {
    let harness = Harness::start(SchedulerConfig {
        completed_operation_retention: Duration::from_secs(600),
        ..config()
    })
    .await;
    let scheduler = &harness.scheduler;
    let mut worker = harness.connect("w", 1);
    let watch = harness.execute(&harness.action("step")).await;
    let task = worker.start();
    worker.finish(scheduler, &task, success(0));
    advance(Duration::from_secs(599));
    scheduler.tick();
    assert!(scheduler.watch(&watch.name).is_ok());
    advance(Duration::from_secs(2));
    scheduler.tick();
    assert_eq!(
        scheduler.watch(&watch.name).err().unwrap().kind(),
        crate::ErrorKind::NotFound
    );
}

#[tokio::test]
async fn a_worker_registering_again_gets_back_the_work_its_old_session_held() {
    let harness = Harness::start(config()).await;
    let scheduler = &harness.scheduler;
    let mut old = harness.connect("w", 1);
    let watch = harness.execute(&harness.action("step")).await;
    let lost = old.start();
    let mut new = harness.connect("w", 1);
    assert!(old.ended());
    let task = new.start();
    assert_eq!(task.action_digest, lost.action_digest);
    old.finish(scheduler, &lost, success(1));
    scheduler.worker_gone("w", old.session, "old stream closed late");
    assert_eq!(
        stage(&watch),
        "executing",
        "the old session cannot touch the new one"
    );
    new.finish(scheduler, &task, success(0));
    assert_eq!(response(&watch).result.as_ref().unwrap().exit_code, 0);
}

#[tokio::test]
async fn a_worker_reconnecting_with_its_running_task_keeps_it_and_runs_it_once() {
    let harness = Harness::start(config()).await;
    let scheduler = &harness.scheduler;
    let mut old = harness.connect("w", 1);
    let watch = harness.execute(&harness.action("step")).await;
    let running = old.start();
    let mut new = FakeWorker::reconnect(scheduler, "w", 1, &[running.task_id.as_str()]);
    assert!(old.ended());
    new.idle();
    assert_eq!(stage(&watch), "executing");
    new.finish(scheduler, &running, success(0));
    assert_eq!(code(&response(&watch)), Code::Ok);
}

#[tokio::test]
async fn a_running_task_the_scheduler_does_not_hold_is_cancelled_on_register() {
    let mut harness = Harness::start(config()).await;
    let action = harness.action("step");
    let mut before = harness.connect("w", 1);
    harness.execute(&action).await;
    let lost = before.start();
    harness.restart();
    let mut after = FakeWorker::reconnect(&harness.scheduler, "w", 1, &[lost.task_id.as_str()]);
    match after.next() {
        Some(ToWorker::Cancel(cancel)) => assert_eq!(cancel.task_id, lost.task_id),
        other => panic!("expected the unknown task to be cancelled, got {other:?}"),
    }
    after.idle();
}

#[tokio::test]
async fn a_worker_reconnecting_after_a_scheduler_restart_gets_work() {
    let mut harness = Harness::start(config()).await;
    let action = harness.action("step");
    let mut before = harness.connect("w", 1);
    harness.execute(&action).await;
    before.start();

    harness.restart();
    let scheduler = harness.scheduler.clone();
    assert!(before.ended(), "the old scheduler's sessions end with it");
    assert!(scheduler.list().is_empty(), "a restart forgets operations");
    // The client retries its Execute before the worker is back, so it waits in the
    // queue until the worker registers again.
    let watch = harness.execute(&action).await;
    assert_eq!(stage(&watch), "queued");
    let mut after = harness.connect("w", 1);
    let task = after.start();
    assert_eq!(task.action_digest.as_ref(), Some(&action));
    after.finish(&scheduler, &task, success(0));
    assert_eq!(code(&response(&watch)), Code::Ok);

    let next = harness.execute(&harness.action("next")).await;
    let task = after.start();
    after.finish(&scheduler, &task, success(0));
    assert_eq!(code(&response(&next)), Code::Ok);
    assert_eq!(scheduler.list_workers().len(), 1);
}

/// A policy that allows everything, as a scheduler without `--auth` has.
fn open_access() -> crate::auth::Access {
    let failures = prometheus::IntCounterVec::new(
        prometheus::Opts::new("test_auth_failures_total", "refusals"),
        &["reason"],
    )
    .unwrap();
    crate::auth::Access::open(false, failures)
}
