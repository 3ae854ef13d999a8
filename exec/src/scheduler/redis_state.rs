//! The scheduler's state in Redis (`--redis`), shared by several schedulers.
//!
//! With one scheduler, everything can live in one process's memory ([`super::state`]);
//! killing it loses every queued and running operation. Here the operations, the
//! queue, the in-flight index, the workers' leases and the assignments live in Redis,
//! so any scheduler answers Execute, WaitExecution and the Operations service for any
//! operation, and a scheduler that dies loses nothing: its workers register with
//! another, its queued jobs are dispatched by the others, and its clients' retries
//! reach whichever scheduler answers.
//!
//! What stays in each process is what cannot be shared: the gRPC streams of the
//! workers connected to it, and `watch` channels for the operations its clients follow.
//!
//! # Key layout (prefix `cairn:`)
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `seq` | string | INCR counter: job ids |
//! | `queue` | sorted set | queued jobs; all scores 0, members `PRIORITY:JOB` (priority + 2^31 as ten digits, the job id as sixteen), so text order is priority, then arrival, and nothing is lost to a float score's 53 bits |
//! | `job:ID` | hash | `start` (the StartTask without its id), `platform`, `member` (its queue entry), `dedup`, `retries`, `dispatches`, `timeout_ms`, and while a worker has it `task` (`ID.ATTEMPT`), `worker`, `started_ms` |
//! | `job:ID:ops` | set | the names of the operations waiting for the job |
//! | `op:NAME` | hash | `digest`, `stage` (`q`, `e`, `c`), `job` until done, `response` once done; expires `completed_operation_retention` after completion |
//! | `running` | sorted set | job id to the deadline of its task (Redis time, ms): the action's timeout plus `keepalive_timeout` |
//! | `inflight` | hash | dedup key (`instance`, function, hash, size) to job id |
//! | `done:DEDUP` | string | a successful response, for [`REMEMBER`] after its job completed |
//! | `workers` | sorted set | worker id to lease expiry (Redis time, ms) |
//! | `worker:ID` | hash | `session` (the scheduler id and session holding it), `info` (WorkerInfo) |
//! | `worker:ID:tasks` | set | the task ids assigned to the worker |
//!
//! Changes are published on the channel `cairn:events`: `q NAME`, `e NAME`, `c NAME`
//! (an operation's stage), `queue` (a job became dispatchable), `cancel WORKER TASK`
//! and `drain WORKER` (for the scheduler holding the worker's session).
//!
//! # Consistency
//!
//! Every multi-key change is a Lua script ([`super::redis_scripts`]), atomic in Redis.
//! A job is claimed by the scheduler whose `ZREM` of its queue entry succeeded; a
//! report is taken only if its task is still the job's current attempt; an expired
//! lease is requeued by the scheduler whose `ZREM` of it succeeded. Published events
//! are hints: a subscriber that missed some (Redis restarted, the connection broke)
//! re-reads every operation it watches when it subscribes again, and every second.
//!
//! The dispatch passes are in [`dispatch`]; the ticker and the subscriber to the
//! events in [`background`].
//!
//! When Redis is unreachable, calls fail with UNAVAILABLE (Bazel retries), `/healthz`
//! answers 503, results from workers are retried with backoff until Redis answers, and
//! the connection is re-established with backoff. With AOF (`appendonly yes`,
//! `appendfsync always`) a restarted Redis has every acknowledged change; without
//! persistence it comes back empty: clients' WaitExecution then gets NOT_FOUND and
//! Bazel executes again, and workers' leases being gone, their sessions end and they
//! register anew (docs/scheduler-redis.md).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cairn_proto::reapi::platform::Property;
use cairn_proto::reapi::{Digest, ExecuteRequest, ExecuteResponse, Platform};
use cairn_proto::worker::scheduler_message::Message as ToWorker;
use cairn_proto::worker::task_result::Outcome;
use cairn_proto::worker::worker_message::Message as FromWorker;
use cairn_proto::worker::{
    CancelTask, Drain, Register, Registered, SchedulerMessage, StartTask, WorkerInfo,
};
use prost::Message;
use redis::aio::ConnectionManager;
use redis::Script;
use tokio::sync::{mpsc, watch, Notify};
use tonic::Code;

use super::config::SchedulerConfig;
use super::intake::{self, status_response, DedupKey, Intake};
use super::matching::Requirements;
use super::metrics::{Activity, Gauges};
use super::redis_scripts as lua;
use super::state::snapshot::{self, Snapshot, TaskView, WorkerView};
use super::state::{Progress, Watch, WorkerOutbox};
use crate::error::{Error, ErrorKind, Result};
use crate::exec_common::{proto_duration, random_name};

/// The channel changes are published on.
const CHANNEL: &str = "cairn:events";

/// How many queue entries, from the front, one dispatch pass considers. A job no
/// worker of this scheduler matches is skipped, so this many such jobs in front hide
/// the rest from it (other schedulers' workers still take them).
const WINDOW: isize = 256;

/// How long a successful response is remembered after its job completed (see
/// `complete` in [`super::redis_scripts::COMMON`]): longer than the moment between an
/// Execute's action-cache lookup and its joining the in-flight index.
pub const REMEMBER: Duration = Duration::from_secs(30);

/// How often watched operations are re-read, in case an event was lost.
const REFRESH: Duration = Duration::from_secs(1);

/// The longest pause between attempts to write a worker's report while Redis is away.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How often an unreachable Redis is logged again.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A hash field's value; `None` where the hash has no such field.
type Field = Option<Vec<u8>>;

type WorkerSender = mpsc::UnboundedSender<std::result::Result<SchedulerMessage, tonic::Status>>;

/// The state of the connection to Redis, for `/healthz`, `/metrics` and logs.
#[derive(Debug, Clone, Default)]
pub struct RedisStatus {
    /// Whether the last command succeeded.
    pub up: bool,
    /// Why the last command failed, while `up` is false.
    pub reason: String,
    /// Round trips by command or script name.
    pub round_trips: BTreeMap<&'static str, u64>,
    /// Round trips that failed.
    pub errors: u64,
    /// Workers holding a lease, across all schedulers (as of the last tick).
    pub leases: u64,
}

struct Link {
    status: RedisStatus,
    down_since: Option<Instant>,
    last_logged: Option<Instant>,
}

struct Scripts {
    execute: Script,
    claim: Script,
    result: Script,
    reject: Script,
    register: Script,
    renew: Script,
    gone: Script,
    reap: Script,
    cancel: Script,
    fail_queued: Script,
    overdue: Script,
}

impl Scripts {
    fn new() -> Self {
        let script = |body: &str| Script::new(&format!("{}{body}", lua::COMMON));
        Self {
            execute: script(lua::EXECUTE),
            claim: script(lua::CLAIM),
            result: script(lua::RESULT),
            reject: script(lua::REJECT),
            register: script(lua::REGISTER),
            renew: script(lua::RENEW),
            gone: script(lua::GONE),
            reap: script(lua::REAP),
            cancel: script(lua::CANCEL),
            fail_queued: script(lua::FAIL_QUEUED),
            overdue: script(lua::OVERDUE),
        }
    }
}

struct LocalTask {
    action: String,
    instance: String,
    started: Instant,
}

struct LocalWorker {
    session: u64,
    token: String,
    properties: Vec<Property>,
    max_inflight: u32,
    draining: bool,
    running: HashMap<String, LocalTask>,
    last_seen: Instant,
    last_assigned: u64,
    sender: WorkerSender,
}

impl LocalWorker {
    fn has_room(&self) -> bool {
        !self.draining && (self.running.len() as u32) < self.max_inflight
    }

    fn info(&self, worker_id: &str) -> Vec<u8> {
        WorkerInfo {
            worker_id: worker_id.to_string(),
            properties: self.properties.clone(),
            max_inflight_tasks: self.max_inflight,
            running_operations: Vec::new(),
            draining: self.draining,
        }
        .encode_to_vec()
    }

    fn send(&self, message: ToWorker) {
        let _ = self.sender.send(Ok(SchedulerMessage {
            message: Some(message),
        }));
    }
}

/// A queued job as a dispatch pass needs it.
struct QueuedJob {
    start: StartTask,
    requirements: Requirements,
}

struct Watched {
    updates: watch::Sender<Progress>,
}

#[derive(Default)]
struct Local {
    workers: HashMap<String, LocalWorker>,
    watches: HashMap<String, Watched>,
    next_session: u64,
    assignments: u64,
    activity: Activity,
    queue_length: u64,
    jobs: HashMap<String, Arc<QueuedJob>>,
    unrunnable: HashMap<String, Instant>,
    last_refresh: Option<Instant>,
}

/// The scheduler over Redis: shared by the gRPC services, the ticker, the dispatcher
/// and the subscriber.
pub struct RedisScheduler {
    config: SchedulerConfig,
    cache: crate::exec_common::CacheChannel,
    id: String,
    client: redis::Client,
    connection: ConnectionManager,
    scripts: Scripts,
    local: Mutex<Local>,
    link: Mutex<Link>,
    wake: Notify,
}

/// The connection settings of `url`, with the password from `REDIS_PASSWORD` when the
/// URL has none.
pub fn client(url: &str) -> Result<redis::Client> {
    client_with(url, std::env::var("REDIS_PASSWORD").ok())
}

/// [`client`], with `password` standing in for `REDIS_PASSWORD`.
fn client_with(url: &str, password: Option<String>) -> Result<redis::Client> {
    use redis::IntoConnectionInfo;
    let invalid = |error: redis::RedisError| {
        Error::invalid_argument(format!(
            "--redis {}: {error}",
            url.split('@').next_back().unwrap_or(url)
        ))
    };
    let mut info = url.into_connection_info().map_err(invalid)?;
    if info.redis_settings().password().is_none() {
        if let Some(password) = password.filter(|password| !password.is_empty()) {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
    }
    redis::Client::open(info).map_err(invalid)
}

fn stage_progress(stage: &[u8], response: Option<&[u8]>) -> Progress {
    match stage {
        b"e" => Progress::Executing,
        b"c" => {
            let response = response
                .and_then(|bytes| ExecuteResponse::decode(bytes).ok())
                .unwrap_or_else(|| {
                    status_response(Code::Internal, "the stored response does not parse")
                });
            Progress::Completed(Arc::new(response))
        }
        _ => Progress::Queued,
    }
}

fn dedup_text(key: &DedupKey) -> String {
    format!("{}/{}/{}/{}", key.0, key.1, key.2, key.3)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Replaces a watcher's value, except that a completed operation stays completed.
fn update(updates: &watch::Sender<Progress>, progress: Progress) {
    updates.send_if_modified(|current| {
        if matches!(current, Progress::Completed(_)) {
            return false;
        }
        *current = progress;
        true
    });
}

impl RedisScheduler {
    /// A scheduler keeping its state in the Redis of `client`, reading Actions from the
    /// cache node behind `cache`. Connects lazily: it starts while Redis is away.
    pub fn new(
        config: SchedulerConfig,
        cache: crate::exec_common::CacheChannel,
        client: redis::Client,
    ) -> Result<Arc<Self>> {
        let settings = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(MAX_BACKOFF)
            .set_number_of_retries(2);
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), settings)
            .map_err(|error| Error::invalid_argument(format!("--redis: {error}")))?;
        Ok(Arc::new(Self {
            config,
            cache,
            id: random_name(),
            client,
            connection,
            scripts: Scripts::new(),
            local: Mutex::new(Local::default()),
            link: Mutex::new(Link {
                status: RedisStatus {
                    up: true,
                    ..Default::default()
                },
                down_since: None,
                last_logged: None,
            }),
            wake: Notify::new(),
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, Local> {
        self.local
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn link(&self) -> MutexGuard<'_, Link> {
        self.link
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a round trip and tracks the connection's health: any failure makes the
    /// scheduler unhealthy until a command succeeds; logs when Redis fails, then every
    /// [`LOG_EVERY`] while it keeps failing.
    fn record<T>(&self, what: &'static str, outcome: redis::RedisResult<T>) -> Result<T> {
        let mut link = self.link();
        *link.status.round_trips.entry(what).or_default() += 1;
        match outcome {
            Ok(value) => {
                if !link.status.up {
                    let away = link.down_since.map(|since| since.elapsed().as_secs_f64());
                    tracing::info!("Redis answers again after {:.1}s", away.unwrap_or_default());
                    link.status.up = true;
                    link.status.reason.clear();
                    link.down_since = None;
                    link.last_logged = None;
                }
                Ok(value)
            }
            Err(error) => {
                link.status.errors += 1;
                let reason = error.to_string();
                // Unreachable, refused (NOAUTH, a wrong password), or out of memory:
                // the scheduler cannot work until a command succeeds again.
                let now = Instant::now();
                if link.status.up {
                    link.down_since = Some(now);
                }
                link.status.up = false;
                link.status.reason = reason.clone();
                if link
                    .last_logged
                    .is_none_or(|logged| now.duration_since(logged) >= LOG_EVERY)
                {
                    tracing::warn!(
                        "Redis unavailable ({what}): {reason}; retrying, reconnecting with \
                         backoff (up to {}s between attempts)",
                        MAX_BACKOFF.as_secs()
                    );
                    link.last_logged = Some(now);
                }
                Err(Error::new(
                    ErrorKind::Unavailable,
                    format!("the scheduler's Redis: {what}: {reason}"),
                ))
            }
        }
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        let mut connection = self.connection.clone();
        let outcome = invocation.invoke_async(&mut connection).await;
        self.record(what, outcome)
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        command: &redis::Cmd,
    ) -> Result<T> {
        let mut connection = self.connection.clone();
        let outcome = command.query_async(&mut connection).await;
        self.record(what, outcome)
    }

    async fn pipeline<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        pipeline: &redis::Pipeline,
    ) -> Result<T> {
        let mut connection = self.connection.clone();
        let outcome = pipeline.query_async(&mut connection).await;
        self.record(what, outcome)
    }

    /// Runs `attempt` until it succeeds, with backoff: for what a worker reported,
    /// which must not be lost while Redis restarts.
    async fn persist<T, F, Fut>(&self, mut attempt: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut pause = Duration::from_millis(50);
        loop {
            match attempt().await {
                Ok(value) => return value,
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Whether Redis answered the last command, and why not.
    pub fn health(&self) -> std::result::Result<(), String> {
        let link = self.link();
        if link.status.up {
            Ok(())
        } else {
            Err(format!("Redis unavailable: {}", link.status.reason))
        }
    }

    /// Starts executing `request` (see [`intake::read`]).
    pub async fn execute(&self, request: ExecuteRequest) -> Result<Watch> {
        let spec = match intake::read(&self.config, &self.cache, request).await? {
            Intake::Finished(digest, response) => return self.finished(digest, *response).await,
            Intake::Job(spec) => spec,
        };
        let name = random_name();
        let dedup = spec.dedup.as_ref().map(dedup_text).unwrap_or_default();
        let start = spec.start_task(String::new()).encode_to_vec();
        let platform = Platform {
            properties: spec.platform.clone(),
        }
        .encode_to_vec();
        let priority = format!("{:010}", i64::from(spec.priority) + (1i64 << 31));
        let digest = spec.action_digest.clone();
        let progress = self.watcher(&name, Progress::Queued);
        let mut invocation = self.scripts.execute.prepare_invoke();
        invocation
            .arg(&dedup)
            .arg(&name)
            .arg(digest.encode_to_vec())
            .arg(start)
            .arg(platform)
            .arg(&priority)
            .arg(millis(self.config.completed_operation_retention))
            .arg(millis(spec.timeout));
        let reply: Vec<Vec<u8>> = match self.invoke("execute", invocation).await {
            Ok(reply) => reply,
            Err(error) => {
                self.lock().watches.remove(&name);
                return Err(error);
            }
        };
        let stage = reply.first().map(Vec::as_slice).unwrap_or(b"q");
        let initial = match stage {
            b"c" => {
                let response = self.read_op(&name).await?.map(|(_, progress)| progress);
                response.unwrap_or(Progress::Queued)
            }
            stage => stage_progress(stage, None),
        };
        if !progress.has_changed().unwrap_or(true) {
            if let Some(watched) = self.lock().watches.get(&name) {
                update(&watched.updates, initial);
            }
        }
        if stage == b"q" {
            self.wake.notify_one();
        }
        Ok(Watch {
            name,
            action_digest: digest,
            progress,
        })
    }

    /// A local watcher of `name`, created with `initial` if there is none.
    fn watcher(&self, name: &str, initial: Progress) -> watch::Receiver<Progress> {
        let mut local = self.lock();
        let watched = local
            .watches
            .entry(name.to_string())
            .or_insert_with(|| Watched {
                updates: watch::channel(initial).0,
            });
        watched.updates.subscribe()
    }

    async fn finished(&self, digest: Digest, response: ExecuteResponse) -> Result<Watch> {
        let name = random_name();
        let key = format!("cairn:op:{name}");
        let mut pipeline = redis::pipe();
        pipeline
            .atomic()
            .cmd("HSET")
            .arg(&key)
            .arg("digest")
            .arg(digest.encode_to_vec())
            .arg("stage")
            .arg("c")
            .arg("response")
            .arg(response.encode_to_vec())
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(millis(self.config.completed_operation_retention))
            .ignore();
        self.pipeline::<()>("finished", &pipeline).await?;
        let recent = snapshot::answered(&digest, &response);
        self.lock().activity.completed(recent);
        let (_, progress) = watch::channel(Progress::Completed(Arc::new(response)));
        Ok(Watch {
            name,
            action_digest: digest,
            progress,
        })
    }

    /// The digest and progress of operation `name`, if Redis knows it.
    async fn read_op(&self, name: &str) -> Result<Option<(Digest, Progress)>> {
        let fields: HashMap<String, Vec<u8>> = self
            .query(
                "read_op",
                redis::cmd("HGETALL").arg(format!("cairn:op:{name}")),
            )
            .await?;
        Ok(parse_op(&fields))
    }

    /// Follows the operation `name`, wherever it was created.
    pub async fn watch(&self, name: &str) -> Result<Watch> {
        let (digest, progress) = self
            .read_op(name)
            .await?
            .ok_or_else(|| Error::not_found(format!("no operation named `{name}`")))?;
        let receiver = self.watcher(name, progress.clone());
        if let Some(watched) = self.lock().watches.get(name) {
            update(&watched.updates, progress);
        }
        Ok(Watch {
            name: name.to_string(),
            action_digest: digest,
            progress: receiver,
        })
    }

    /// Every operation Redis holds, ordered by name.
    pub async fn list(&self) -> Result<Vec<(String, Digest, Progress)>> {
        let mut connection = self.connection.clone();
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let outcome = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg("cairn:op:*")
                .arg("COUNT")
                .arg(1000)
                .query_async::<(u64, Vec<String>)>(&mut connection)
                .await;
            let (next, batch) = self.record("scan", outcome)?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        keys.sort();
        keys.dedup();
        let mut all = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(500) {
            let mut pipeline = redis::pipe();
            for key in chunk {
                pipeline.cmd("HGETALL").arg(key);
            }
            let replies: Vec<HashMap<String, Vec<u8>>> = self.pipeline("list", &pipeline).await?;
            for (key, fields) in chunk.iter().zip(replies) {
                if let Some((digest, progress)) = parse_op(&fields) {
                    let name = key.trim_start_matches("cairn:op:").to_string();
                    all.push((name, digest, progress));
                }
            }
        }
        Ok(all)
    }

    /// Cancels the operation `name` (see [`super::redis_scripts::CANCEL`]).
    pub async fn cancel(&self, name: &str) -> Result<()> {
        let response = status_response(Code::Cancelled, "the operation was cancelled");
        let mut invocation = self.scripts.cancel.prepare_invoke();
        invocation
            .arg(name)
            .arg(response.encode_to_vec())
            .arg(millis(self.config.completed_operation_retention));
        let outcome: i64 = self.invoke("cancel", invocation).await?;
        if outcome < 0 {
            return Err(Error::not_found(format!("no operation named `{name}`")));
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Forgets an operation; an unfinished one is cancelled first.
    pub async fn delete(&self, name: &str) -> Result<()> {
        self.cancel(name).await?;
        self.query::<()>("delete", redis::cmd("DEL").arg(format!("cairn:op:{name}")))
            .await?;
        self.lock().watches.remove(name);
        Ok(())
    }

    /// Opens a session for a worker and adopts the tasks it reports running; a
    /// previous session of the same worker (here or with another scheduler) ends.
    pub async fn register(&self, register: Register) -> Result<(u64, WorkerOutbox)> {
        if register.worker_id.is_empty() {
            return Err(Error::invalid_argument("worker_id is empty"));
        }
        let session = {
            let mut local = self.lock();
            local.next_session += 1;
            local.next_session
        };
        let token = format!("{}:{session}", self.id);
        let (sender, outbox) = mpsc::unbounded_channel();
        let mut worker = LocalWorker {
            session,
            token: token.clone(),
            properties: register.properties,
            max_inflight: register.max_inflight_tasks.max(1),
            draining: false,
            running: HashMap::new(),
            last_seen: Instant::now(),
            last_assigned: 0,
            sender,
        };
        let cause = format!(
            "worker {} registered again without the task",
            register.worker_id
        );
        let mut invocation = self.scripts.register.prepare_invoke();
        invocation
            .arg(&register.worker_id)
            .arg(&token)
            .arg(millis(self.config.keepalive_timeout))
            .arg(worker.info(&register.worker_id))
            .arg(&cause)
            .arg(self.config.max_job_retries)
            .arg(millis(self.config.completed_operation_retention));
        for task in &register.running_task_ids {
            invocation.arg(task);
        }
        let cancelled: Vec<String> = self.invoke("register", invocation).await?;
        worker.send(ToWorker::Registered(Registered {
            keepalive_interval: Some(proto_duration(self.config.keepalive_interval)),
        }));
        for task in &register.running_task_ids {
            if cancelled.contains(task) {
                worker.send(ToWorker::Cancel(CancelTask {
                    task_id: task.clone(),
                }));
            } else {
                worker.running.insert(
                    task.clone(),
                    LocalTask {
                        action: format!("task {task}, adopted"),
                        instance: String::new(),
                        started: Instant::now(),
                    },
                );
            }
        }
        tracing::info!(
            worker = %register.worker_id,
            max_inflight_tasks = register.max_inflight_tasks,
            adopted = register.running_task_ids.len().saturating_sub(cancelled.len()),
            cancelled = cancelled.len(),
            "worker registered"
        );
        self.lock().workers.insert(register.worker_id, worker);
        self.wake.notify_one();
        Ok((session, outbox))
    }

    fn session_token(&self, worker_id: &str, session: u64) -> Option<String> {
        let mut local = self.lock();
        let worker = local
            .workers
            .get_mut(worker_id)
            .filter(|worker| worker.session == session)?;
        worker.last_seen = Instant::now();
        Some(worker.token.clone())
    }

    /// Handles a message from a worker's session.
    pub async fn worker_message(&self, worker_id: &str, session: u64, message: FromWorker) {
        let Some(token) = self.session_token(worker_id, session) else {
            return;
        };
        match message {
            FromWorker::Register(_) | FromWorker::Keepalive(_) => {
                self.renew(worker_id, session, &token).await;
            }
            FromWorker::Draining(_) => {
                tracing::info!(worker = worker_id, "worker is draining");
                if let Some(worker) = self.lock().workers.get_mut(worker_id) {
                    worker.draining = true;
                }
                self.renew(worker_id, session, &token).await;
            }
            FromWorker::Result(result) => {
                let task = self
                    .lock()
                    .workers
                    .get_mut(worker_id)
                    .and_then(|worker| worker.running.remove(&result.task_id));
                let response = match result.outcome {
                    Some(Outcome::Response(response)) => response,
                    Some(Outcome::Error(status)) => ExecuteResponse {
                        status: Some(status),
                        ..Default::default()
                    },
                    None => status_response(Code::Internal, "the worker reported no outcome"),
                };
                let succeeded = response
                    .status
                    .as_ref()
                    .is_none_or(|status| status.code == 0)
                    && response
                        .result
                        .as_ref()
                        .is_some_and(|result| result.exit_code == 0);
                let remember = if succeeded { millis(REMEMBER) } else { 0 };
                let bytes = response.encode_to_vec();
                let retention = millis(self.config.completed_operation_retention);
                let taken: i64 = self
                    .persist(|| {
                        let mut invocation = self.scripts.result.prepare_invoke();
                        invocation
                            .arg(&result.task_id)
                            .arg(&bytes)
                            .arg(retention)
                            .arg(remember);
                        self.invoke("result", invocation)
                    })
                    .await;
                if taken == 1 {
                    let mut recent = snapshot::answered(&Digest::default(), &response);
                    recent.worker = worker_id.to_string();
                    if let Some(task) = task {
                        recent.action = task.action;
                        recent.instance = task.instance;
                        recent.execution_seconds = Some(task.started.elapsed().as_secs_f64());
                    }
                    self.lock().activity.completed(recent);
                }
            }
            FromWorker::Rejected(rejected) => {
                tracing::info!(worker = worker_id, reason = %rejected.reason, "task rejected");
                if let Some(worker) = self.lock().workers.get_mut(worker_id) {
                    worker.draining = true;
                    worker.running.remove(&rejected.task_id);
                }
                self.persist(|| {
                    let mut invocation = self.scripts.reject.prepare_invoke();
                    invocation.arg(&rejected.task_id);
                    self.invoke::<i64>("reject", invocation)
                })
                .await;
            }
        }
        self.wake.notify_one();
    }

    /// Extends the lease of a worker's session; ends the session if the lease is gone
    /// (it expired and another scheduler requeued its work).
    async fn renew(&self, worker_id: &str, session: u64, token: &str) {
        let info = match self.lock().workers.get(worker_id) {
            Some(worker) => worker.info(worker_id),
            None => return,
        };
        let mut invocation = self.scripts.renew.prepare_invoke();
        invocation
            .arg(worker_id)
            .arg(token)
            .arg(millis(self.config.keepalive_timeout))
            .arg(info);
        if let Ok(0) = self.invoke::<i64>("renew", invocation).await {
            self.end_session(worker_id, Some(session), "its lease expired");
        }
    }

    /// Drops a local session (any, with `None`), telling the worker to register again.
    fn end_session(&self, worker_id: &str, session: Option<u64>, why: &str) {
        let mut local = self.lock();
        let matches = local
            .workers
            .get(worker_id)
            .is_some_and(|worker| session.is_none_or(|session| worker.session == session));
        if !matches {
            return;
        }
        if let Some(worker) = local.workers.remove(worker_id) {
            tracing::warn!(worker = worker_id, "worker session ended: {why}");
            let _ = worker.sender.send(Err(tonic::Status::unavailable(format!(
                "the session ended: {why}; register again"
            ))));
        }
    }

    /// Ends a worker's session (its stream closed or failed): its tasks are requeued,
    /// unless it has registered again since.
    pub async fn worker_gone(&self, worker_id: &str, session: u64, cause: &str) {
        let token = {
            let mut local = self.lock();
            let matches = local
                .workers
                .get(worker_id)
                .is_some_and(|worker| worker.session == session);
            if !matches {
                return;
            }
            local.workers.remove(worker_id).map(|worker| worker.token)
        };
        let Some(token) = token else { return };
        tracing::warn!(worker = worker_id, "worker removed: {cause}");
        let retention = millis(self.config.completed_operation_retention);
        let requeued: u64 = self
            .persist(|| {
                let mut invocation = self.scripts.gone.prepare_invoke();
                invocation
                    .arg(worker_id)
                    .arg(&token)
                    .arg(cause)
                    .arg(self.config.max_job_retries)
                    .arg(retention);
                self.invoke("gone", invocation)
            })
            .await;
        self.lock().activity.requeues += requeued;
        self.wake.notify_one();
    }

    /// Stops giving work to `worker_id` and tells it to drain, through whichever
    /// scheduler holds its session.
    pub async fn drain(&self, worker_id: &str) -> Result<()> {
        if let Some(worker) = self.lock().workers.get_mut(worker_id) {
            worker.draining = true;
            worker.send(ToWorker::Drain(Drain {}));
            return Ok(());
        }
        let known: bool = self
            .query(
                "drain",
                redis::cmd("EXISTS").arg(format!("cairn:worker:{worker_id}")),
            )
            .await?;
        if !known {
            return Err(Error::not_found(format!("no worker named `{worker_id}`")));
        }
        self.query::<()>(
            "publish",
            redis::cmd("PUBLISH")
                .arg(CHANNEL)
                .arg(format!("drain {worker_id}")),
        )
        .await
    }

    /// The workers holding a lease, with every scheduler, ordered by id.
    pub async fn list_workers(&self) -> Result<Vec<WorkerInfo>> {
        let ids: Vec<String> = self
            .query(
                "list_workers",
                redis::cmd("ZRANGE").arg("cairn:workers").arg(0).arg(-1),
            )
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipeline = redis::pipe();
        for id in &ids {
            pipeline
                .cmd("HGET")
                .arg(format!("cairn:worker:{id}"))
                .arg("info")
                .cmd("SMEMBERS")
                .arg(format!("cairn:worker:{id}:tasks"));
        }
        let replies: Vec<(Option<Vec<u8>>, Vec<String>)> = {
            let flat: Vec<redis::Value> = self.pipeline("list_workers", &pipeline).await?;
            flat.chunks(2)
                .map(|pair| {
                    let info = pair
                        .first()
                        .and_then(|value| redis::from_redis_value_ref(value).ok());
                    let tasks = pair
                        .get(1)
                        .and_then(|value| redis::from_redis_value_ref(value).ok())
                        .unwrap_or_default();
                    (info, tasks)
                })
                .collect()
        };
        let mut workers = Vec::with_capacity(ids.len());
        for (id, (info, tasks)) in ids.into_iter().zip(replies) {
            let mut info = info
                .and_then(|bytes| WorkerInfo::decode(bytes.as_slice()).ok())
                .unwrap_or_default();
            info.worker_id = id;
            let mut operations = Vec::new();
            if !tasks.is_empty() {
                let mut pipeline = redis::pipe();
                for task in &tasks {
                    let job = task.split('.').next().unwrap_or_default();
                    pipeline.cmd("SMEMBERS").arg(format!("cairn:job:{job}:ops"));
                }
                let names: Vec<Vec<String>> = self.pipeline("list_workers", &pipeline).await?;
                operations.extend(names.into_iter().flatten());
            }
            operations.sort();
            info.running_operations = operations;
            workers.push(info);
        }
        Ok(workers)
    }

    /// The gauges, counters and this scheduler's workers.
    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let local = self.lock();
        let mut workers: Vec<WorkerView> = local
            .workers
            .iter()
            .map(|(id, worker)| {
                let mut running: Vec<TaskView> = worker
                    .running
                    .values()
                    .map(|task| TaskView {
                        action: task.action.clone(),
                        instance: task.instance.clone(),
                        running_seconds: now.duration_since(task.started).as_secs_f64(),
                    })
                    .collect();
                running.sort_by(|a, b| b.running_seconds.total_cmp(&a.running_seconds));
                WorkerView {
                    id: id.clone(),
                    max_inflight: worker.max_inflight,
                    draining: worker.draining,
                    properties: worker
                        .properties
                        .iter()
                        .map(|property| format!("{}={}", property.name, property.value))
                        .collect(),
                    last_seen_seconds: now.duration_since(worker.last_seen).as_secs_f64(),
                    running,
                }
            })
            .collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        let gauges = Gauges {
            queue_length: local.queue_length,
            running: local
                .workers
                .values()
                .map(|worker| worker.running.len() as u64)
                .sum(),
            workers: local.workers.len() as u64,
            draining_workers: local.workers.values().filter(|w| w.draining).count() as u64,
            worker_slots: local
                .workers
                .values()
                .filter(|worker| !worker.draining)
                .map(|worker| u64::from(worker.max_inflight))
                .sum(),
            operations: local.watches.len() as u64,
        };
        let activity = local.activity.clone();
        drop(local);
        Snapshot {
            gauges,
            activity,
            workers,
            redis: Some(self.link().status.clone()),
        }
    }
}

fn parse_op(fields: &HashMap<String, Vec<u8>>) -> Option<(Digest, Progress)> {
    let digest = Digest::decode(fields.get("digest")?.as_slice()).ok()?;
    let stage = fields.get("stage").map(Vec::as_slice).unwrap_or(b"q");
    let progress = stage_progress(stage, fields.get("response").map(Vec::as_slice));
    Some((digest, progress))
}

mod background;
mod dispatch;

#[cfg(test)]
mod tests {
    use super::dispatch::job_of_member;
    use super::*;

    fn password(client: &redis::Client) -> Option<String> {
        client
            .get_connection_info()
            .redis_settings()
            .password()
            .map(str::to_string)
    }

    #[test]
    fn the_password_comes_from_the_url_or_else_from_the_environment() {
        let from_env = client_with("redis://127.0.0.1:6379/0", Some("secret".into())).unwrap();
        assert_eq!(password(&from_env).as_deref(), Some("secret"));
        let in_url =
            client_with("redis://:inline@127.0.0.1:6379/0", Some("secret".into())).unwrap();
        assert_eq!(password(&in_url).as_deref(), Some("inline"));
        let none = client_with("redis://127.0.0.1:6379/0", None).unwrap();
        assert_eq!(password(&none), None);
        assert!(client_with("rediss://redis.example:6380/1", None).is_ok());
        let error = client_with("http://:hidden@127.0.0.1/0", None).unwrap_err();
        assert!(!error.message().contains("hidden"), "{error}");
    }

    #[test]
    fn queue_members_name_their_job() {
        assert_eq!(job_of_member("2147483648:0000000000000042"), "42");
        assert_eq!(job_of_member("0000000000:0000000000000100"), "100");
    }
}
