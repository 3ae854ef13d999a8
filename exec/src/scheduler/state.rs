//! The scheduler's state: operations, jobs, the queue and the connected workers.
//!
//! A client's Execute creates an *operation*, the name the client watches. The action
//! behind it is a *job*; identical actions (same instance, digest function and Action
//! digest, not `do_not_cache`) share one job while it is in flight, so a second Execute
//! joins the first and both operations complete with the same response. A job waits in
//! a queue ordered by `ExecutionPolicy.priority` (lower runs sooner, as REAPI
//! suggests) and then by arrival, and is given to a matching worker with room for it;
//! each hand-over is a *task* with its own id, so a late report about an attempt the
//! scheduler has given up on can never complete a newer one.
//!
//! Everything lives in one mutex-protected structure and every change happens in a
//! short critical section that never awaits: the gRPC handlers and worker sessions
//! call in, change the state, push messages into the workers' unbounded channels and
//! update the operations' `watch` channels, which is how Execute and WaitExecution
//! streams learn about progress. A ticker drives what time alone changes: dead
//! workers, actions nobody can run, overdue actions, and forgetting old operations.
//!
//! The state is in memory and belongs to one scheduler process: a restart loses queued
//! work (clients retry Execute) and workers simply reconnect. Sharing work between
//! several schedulers would move jobs, the queue and worker registrations into Redis;
//! that is a later step and nothing here depends on it being local except this mutex.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use cairn_proto::reapi::platform::Property;
use cairn_proto::reapi::{Digest, ExecuteRequest, ExecuteResponse};
use cairn_proto::worker::scheduler_message::Message as ToWorker;
use cairn_proto::worker::task_result::Outcome;
use cairn_proto::worker::worker_message::Message as FromWorker;
use cairn_proto::worker::{
    CancelTask, Drain, Register, Registered, SchedulerMessage, StartTask, TaskResult, WorkerInfo,
};
use tokio::sync::{mpsc, watch};
use tonic::Code;

use super::config::{SchedulerConfig, WorkerSelection};
pub use super::intake::status_response;
use super::intake::{self, DedupKey, Intake, JobSpec};
use super::matching::{self, Requirements};
use super::metrics::Activity;
use crate::error::{Error, Result};
use crate::exec_common::{proto_duration, random_name, timestamp, CacheChannel};

/// Where an operation stands, as its watchers see it.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Waiting for a worker.
    Queued,
    /// A worker has it.
    Executing,
    /// Finished; the response says how.
    Completed(Arc<ExecuteResponse>),
}

/// A client's view of one operation.
pub struct Watch {
    /// The operation's name.
    pub name: String,
    /// The action it executes.
    pub action_digest: Digest,
    /// Progress updates; the current value first.
    pub progress: watch::Receiver<Progress>,
}

/// What a worker session receives.
pub type WorkerOutbox =
    mpsc::UnboundedReceiver<std::result::Result<SchedulerMessage, tonic::Status>>;

type WorkerSender = mpsc::UnboundedSender<std::result::Result<SchedulerMessage, tonic::Status>>;

struct Operation {
    action_digest: Digest,
    job: Option<u64>,
    updates: watch::Sender<Progress>,
    done_at: Option<Instant>,
}

impl Operation {
    fn finish(&mut self, response: Arc<ExecuteResponse>, now: Instant) {
        self.updates.send_replace(Progress::Completed(response));
        self.done_at = Some(now);
        self.job = None;
    }
}

struct Task {
    id: String,
    worker: String,
    session: u64,
    started: Instant,
}

struct Job {
    dedup: Option<DedupKey>,
    instance_name: String,
    action_digest: Digest,
    digest_function: i32,
    requirements: Requirements,
    priority: i32,
    seq: u64,
    timeout: Duration,
    queued_at: SystemTime,
    retries: u32,
    dispatches: u32,
    task: Option<Task>,
    operations: Vec<String>,
    unrunnable_since: Option<Instant>,
    /// The W3C trace context of the Execute that queued the job, handed to the worker
    /// (empty when traces are off).
    trace_context: HashMap<String, String>,
}

impl Job {
    fn queue_entry(&self, id: u64) -> (i32, u64, u64) {
        (self.priority, self.seq, id)
    }
}

struct Worker {
    session: u64,
    properties: Vec<Property>,
    max_inflight: u32,
    /// Task id to job id, for every task the worker has not reported on.
    running: HashMap<String, u64>,
    draining: bool,
    last_seen: Instant,
    last_assigned: u64,
    sender: WorkerSender,
}

#[derive(Default)]
struct State {
    operations: HashMap<String, Operation>,
    jobs: HashMap<u64, Job>,
    in_flight: HashMap<DedupKey, u64>,
    queue: BTreeSet<(i32, u64, u64)>,
    workers: HashMap<String, Worker>,
    next_id: u64,
    assignments: u64,
    activity: Activity,
}

impl State {
    fn next(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// The scheduler: shared by the gRPC services and the ticker.
pub struct Scheduler {
    config: SchedulerConfig,
    cache: CacheChannel,
    state: Mutex<State>,
}

impl Scheduler {
    /// A scheduler reading from the cache node behind `cache`.
    pub fn new(config: SchedulerConfig, cache: CacheChannel) -> Arc<Self> {
        Arc::new(Self {
            config,
            cache,
            state: Mutex::new(State::default()),
        })
    }

    /// The time keepalives, deadlines and retention are judged by.
    #[cfg(not(test))]
    fn now(&self) -> Instant {
        Instant::now()
    }

    /// The unit tests' clock: it stands still until a test moves it, so the rules that
    /// depend on time run by calling [`Scheduler::tick`] instead of waiting.
    #[cfg(test)]
    fn now(&self) -> Instant {
        tests::now()
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts executing `request` (see [`intake::read`]): joins an identical action
    /// in flight, or queues a new job.
    pub async fn execute(&self, request: ExecuteRequest) -> Result<Watch> {
        let spec = match intake::read(&self.config, &self.cache, request).await? {
            Intake::Finished(action_digest, response) => {
                return Ok(self.finished(action_digest, *response))
            }
            Intake::Job(spec) => spec,
        };
        let JobSpec {
            dedup,
            instance_name,
            action_digest,
            digest_function,
            requirements,
            priority,
            timeout,
            queued_at,
            trace_context,
            ..
        } = *spec;
        let mut state = self.lock();
        let name = random_name();
        let joined = dedup
            .as_ref()
            .and_then(|key| state.in_flight.get(key).copied());
        let (job_id, initial) = match joined {
            Some(job_id) => {
                let executing = state
                    .jobs
                    .get(&job_id)
                    .is_some_and(|job| job.task.is_some());
                if let Some(job) = state.jobs.get_mut(&job_id) {
                    job.operations.push(name.clone());
                }
                let progress = if executing {
                    Progress::Executing
                } else {
                    Progress::Queued
                };
                (job_id, progress)
            }
            None => {
                let job_id = state.next();
                let seq = state.next();
                let job = Job {
                    dedup: dedup.clone(),
                    instance_name,
                    action_digest: action_digest.clone(),
                    digest_function,
                    requirements,
                    priority,
                    seq,
                    timeout,
                    queued_at,
                    retries: 0,
                    dispatches: 0,
                    task: None,
                    operations: vec![name.clone()],
                    unrunnable_since: None,
                    trace_context,
                };
                state.queue.insert(job.queue_entry(job_id));
                state.jobs.insert(job_id, job);
                if let Some(key) = dedup {
                    state.in_flight.insert(key, job_id);
                }
                (job_id, Progress::Queued)
            }
        };
        let (updates, progress) = watch::channel(initial);
        state.operations.insert(
            name.clone(),
            Operation {
                action_digest: action_digest.clone(),
                job: Some(job_id),
                updates,
                done_at: None,
            },
        );
        self.dispatch(&mut state);
        Ok(Watch {
            name,
            action_digest,
            progress,
        })
    }

    fn finished(&self, action_digest: Digest, response: ExecuteResponse) -> Watch {
        let name = random_name();
        let recent = snapshot::answered(&action_digest, &response);
        let (updates, progress) = watch::channel(Progress::Completed(Arc::new(response)));
        let mut state = self.lock();
        state.activity.completed(recent);
        state.operations.insert(
            name.clone(),
            Operation {
                action_digest: action_digest.clone(),
                job: None,
                updates,
                done_at: Some(self.now()),
            },
        );
        Watch {
            name,
            action_digest,
            progress,
        }
    }

    /// Follows the operation `name`.
    pub fn watch(&self, name: &str) -> Result<Watch> {
        let state = self.lock();
        let operation = state
            .operations
            .get(name)
            .ok_or_else(|| Error::not_found(format!("no operation named `{name}`")))?;
        Ok(Watch {
            name: name.to_string(),
            action_digest: operation.action_digest.clone(),
            progress: operation.updates.subscribe(),
        })
    }

    /// Every known operation, ordered by name.
    pub fn list(&self) -> Vec<(String, Digest, Progress)> {
        let state = self.lock();
        let mut all: Vec<_> = state
            .operations
            .iter()
            .map(|(name, operation)| {
                (
                    name.clone(),
                    operation.action_digest.clone(),
                    operation.updates.borrow().clone(),
                )
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Cancels the operation `name`: it completes with CANCELLED at once, and its job
    /// is withdrawn (killed on its worker) unless another operation still waits for it.
    pub fn cancel(&self, name: &str) -> Result<()> {
        let mut state = self.lock();
        let operation = state
            .operations
            .get_mut(name)
            .ok_or_else(|| Error::not_found(format!("no operation named `{name}`")))?;
        if operation.done_at.is_some() {
            return Ok(());
        }
        let job_id = operation.job;
        operation.finish(
            Arc::new(status_response(
                Code::Cancelled,
                "the operation was cancelled",
            )),
            self.now(),
        );
        let Some(job_id) = job_id else {
            return Ok(());
        };
        let orphaned = match state.jobs.get_mut(&job_id) {
            Some(job) => {
                job.operations.retain(|other| other != name);
                job.operations.is_empty()
            }
            None => false,
        };
        if orphaned {
            if let Some(job) = state.jobs.remove(&job_id) {
                state.queue.remove(&job.queue_entry(job_id));
                if let Some(key) = &job.dedup {
                    state.in_flight.remove(key);
                }
                if let Some(task) = job.task {
                    send_cancel(&state, &task);
                }
            }
        }
        self.dispatch(&mut state);
        Ok(())
    }

    /// Forgets a finished operation; an unfinished one is cancelled first.
    pub fn delete(&self, name: &str) -> Result<()> {
        self.cancel(name)?;
        self.lock().operations.remove(name);
        Ok(())
    }

    /// Opens a session for a worker. A previous session of the same worker ends: the
    /// tasks the worker says it still runs (`running_task_ids`) move to the new
    /// session, the old session's other tasks are requeued, and a running task this
    /// scheduler does not hold (lost with a restart, or already requeued) is cancelled.
    pub fn register(&self, register: Register) -> Result<(u64, WorkerOutbox)> {
        if register.worker_id.is_empty() {
            return Err(Error::invalid_argument("worker_id is empty"));
        }
        let mut state = self.lock();
        let session = state.next();
        let mut adopted = HashMap::new();
        if let Some(old) = state.workers.get_mut(&register.worker_id) {
            for task_id in &register.running_task_ids {
                if let Some(job_id) = old.running.remove(task_id) {
                    adopted.insert(task_id.clone(), job_id);
                }
            }
            let session = old.session;
            self.remove_worker(
                &mut state,
                &register.worker_id,
                session,
                &format!(
                    "worker {} reconnected, abandoning what it ran",
                    register.worker_id
                ),
            );
        }
        adopted.retain(|task_id, job_id| is_current(&state, *job_id, task_id));
        for (task_id, job_id) in &adopted {
            if let Some(task) = state.jobs.get_mut(job_id).and_then(|job| job.task.as_mut()) {
                task.session = session;
            }
            tracing::info!(worker = %register.worker_id, task = %task_id, "task adopted by the worker's new session");
        }
        let (sender, outbox) = mpsc::unbounded_channel();
        let registered = SchedulerMessage {
            message: Some(ToWorker::Registered(Registered {
                keepalive_interval: Some(proto_duration(self.config.keepalive_interval)),
            })),
        };
        let _ = sender.send(Ok(registered));
        for task_id in &register.running_task_ids {
            if !adopted.contains_key(task_id) {
                let _ = sender.send(Ok(SchedulerMessage {
                    message: Some(ToWorker::Cancel(CancelTask {
                        task_id: task_id.clone(),
                    })),
                }));
            }
        }
        tracing::info!(
            worker = %register.worker_id,
            max_inflight_tasks = register.max_inflight_tasks,
            "worker registered"
        );
        state.workers.insert(
            register.worker_id,
            Worker {
                session,
                properties: register.properties,
                max_inflight: register.max_inflight_tasks.max(1),
                running: adopted,
                draining: false,
                last_seen: self.now(),
                last_assigned: 0,
                sender,
            },
        );
        self.dispatch(&mut state);
        Ok((session, outbox))
    }

    /// Handles a message from a worker's session.
    pub fn worker_message(&self, worker_id: &str, session: u64, message: FromWorker) {
        let mut state = self.lock();
        let Some(worker) = state
            .workers
            .get_mut(worker_id)
            .filter(|worker| worker.session == session)
        else {
            return;
        };
        worker.last_seen = self.now();
        match message {
            FromWorker::Register(_) | FromWorker::Keepalive(_) => {}
            FromWorker::Draining(_) => {
                tracing::info!(worker = worker_id, "worker is draining");
                worker.draining = true;
            }
            FromWorker::Result(result) => {
                self.task_finished(&mut state, worker_id, result);
            }
            FromWorker::Rejected(rejected) => {
                tracing::info!(worker = worker_id, reason = %rejected.reason, "task rejected");
                worker.draining = true;
                if let Some(job_id) = worker.running.remove(&rejected.task_id) {
                    if is_current(&state, job_id, &rejected.task_id) {
                        self.requeue(&mut state, job_id, "", false);
                    }
                }
            }
        }
        self.dispatch(&mut state);
    }

    fn task_finished(&self, state: &mut State, worker_id: &str, result: TaskResult) {
        let job_id = state
            .workers
            .get_mut(worker_id)
            .and_then(|worker| worker.running.remove(&result.task_id));
        let Some(job_id) = job_id else { return };
        if !is_current(state, job_id, &result.task_id) {
            return;
        }
        let response = match result.outcome {
            Some(Outcome::Response(response)) => response,
            Some(Outcome::Error(status)) => ExecuteResponse {
                status: Some(status),
                ..Default::default()
            },
            None => status_response(Code::Internal, "the worker reported no outcome"),
        };
        complete_job(state, job_id, response, self.now());
    }

    /// Ends a worker's session (its stream closed or failed).
    pub fn worker_gone(&self, worker_id: &str, session: u64, cause: &str) {
        let mut state = self.lock();
        self.remove_worker(&mut state, worker_id, session, cause);
        self.dispatch(&mut state);
    }

    fn remove_worker(&self, state: &mut State, worker_id: &str, session: u64, cause: &str) {
        let matches = state
            .workers
            .get(worker_id)
            .is_some_and(|worker| worker.session == session);
        if !matches {
            return;
        }
        let Some(worker) = state.workers.remove(worker_id) else {
            return;
        };
        tracing::warn!(worker = worker_id, "worker removed: {cause}");
        for (task_id, job_id) in worker.running {
            if is_current(state, job_id, &task_id) {
                self.requeue(state, job_id, cause, true);
            }
        }
    }

    /// Puts a job back in the queue, in its original place. A counted retry beyond
    /// `max_job_retries` completes it with UNAVAILABLE naming `cause` instead.
    fn requeue(&self, state: &mut State, job_id: u64, cause: &str, counted: bool) {
        let Some(job) = state.jobs.get_mut(&job_id) else {
            return;
        };
        job.task = None;
        if counted {
            job.retries += 1;
            if job.retries > self.config.max_job_retries {
                let message = format!(
                    "{cause}; gave up after {} attempts at the action",
                    job.retries
                );
                let response = status_response(Code::Unavailable, message);
                complete_job(state, job_id, response, self.now());
                return;
            }
        }
        job.unrunnable_since = None;
        let entry = job.queue_entry(job_id);
        let names = job.operations.clone();
        if counted {
            state.activity.requeues += 1;
        }
        state.queue.insert(entry);
        set_progress(state, &names, Progress::Queued);
    }

    /// Stops giving work to `worker_id` and tells it to drain.
    pub fn drain(&self, worker_id: &str) -> Result<()> {
        let mut state = self.lock();
        let worker = state
            .workers
            .get_mut(worker_id)
            .ok_or_else(|| Error::not_found(format!("no worker named `{worker_id}`")))?;
        worker.draining = true;
        let _ = worker.sender.send(Ok(SchedulerMessage {
            message: Some(ToWorker::Drain(Drain {})),
        }));
        Ok(())
    }

    /// The connected workers, ordered by id.
    pub fn list_workers(&self) -> Vec<WorkerInfo> {
        let state = self.lock();
        let mut workers: Vec<WorkerInfo> = state
            .workers
            .iter()
            .map(|(id, worker)| {
                let mut running_operations: Vec<String> = worker
                    .running
                    .values()
                    .filter_map(|job_id| state.jobs.get(job_id))
                    .flat_map(|job| job.operations.iter().cloned())
                    .collect();
                running_operations.sort();
                WorkerInfo {
                    worker_id: id.clone(),
                    properties: worker.properties.clone(),
                    max_inflight_tasks: worker.max_inflight,
                    running_operations,
                    draining: worker.draining,
                }
            })
            .collect();
        workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        workers
    }

    /// Gives queued jobs, in queue order, to matching workers with room for them.
    fn dispatch(&self, state: &mut State) {
        let entries: Vec<(i32, u64, u64)> = state.queue.iter().copied().collect();
        for entry in entries {
            let has_room = state.workers.values().any(|worker| {
                !worker.draining && (worker.running.len() as u32) < worker.max_inflight
            });
            if !has_room {
                return;
            }
            let job_id = entry.2;
            let Some(job) = state.jobs.get(&job_id) else {
                state.queue.remove(&entry);
                continue;
            };
            let candidates = state.workers.iter().filter(|(_, worker)| {
                !worker.draining
                    && (worker.running.len() as u32) < worker.max_inflight
                    && matching::matches(&job.requirements.required, &worker.properties)
            });
            let chosen = match self.config.worker_selection {
                WorkerSelection::Lru => candidates.min_by_key(|(_, worker)| worker.last_assigned),
                WorkerSelection::Mru => candidates.max_by_key(|(_, worker)| worker.last_assigned),
            };
            let Some((worker_id, worker)) = chosen else {
                continue;
            };
            let worker_id = worker_id.clone();
            let session = worker.session;
            state.queue.remove(&entry);
            state.assignments += 1;
            let clock = state.assignments;
            let Some(job) = state.jobs.get_mut(&job_id) else {
                continue;
            };
            job.dispatches += 1;
            let waited = job.queued_at.elapsed().unwrap_or_default();
            let task_id = format!("{job_id}.{}", job.dispatches);
            job.task = Some(Task {
                id: task_id.clone(),
                worker: worker_id.clone(),
                session,
                started: self.now(),
            });
            let start = StartTask {
                task_id: task_id.clone(),
                instance_name: job.instance_name.clone(),
                action_digest: Some(job.action_digest.clone()),
                digest_function: job.digest_function,
                timeout: Some(proto_duration(job.timeout)),
                queued_timestamp: Some(timestamp(job.queued_at)),
                properties: job.requirements.passed_through.clone(),
                trace_context: job.trace_context.clone(),
            };
            let names = job.operations.clone();
            if let Some(worker) = state.workers.get_mut(&worker_id) {
                worker.running.insert(task_id, job_id);
                worker.last_assigned = clock;
                let _ = worker.sender.send(Ok(SchedulerMessage {
                    message: Some(ToWorker::Start(start)),
                }));
            }
            state.activity.dispatched(waited);
            set_progress(state, &names, Progress::Executing);
        }
    }

    /// What time alone changes; called every [`TICK`].
    pub fn tick(&self) {
        let mut state = self.lock();
        let now = self.now();
        let keepalive_timeout = self.config.keepalive_timeout;

        let silent: Vec<(String, u64)> = state
            .workers
            .iter()
            .filter(|(_, worker)| now.duration_since(worker.last_seen) > keepalive_timeout)
            .map(|(id, worker)| (id.clone(), worker.session))
            .collect();
        for (worker_id, session) in silent {
            let cause = format!(
                "worker {worker_id} sent no keepalive for {}s",
                keepalive_timeout.as_secs_f64()
            );
            self.remove_worker(&mut state, &worker_id, session, &cause);
        }

        let mut unrunnable = Vec::new();
        let queued: Vec<u64> = state.queue.iter().map(|entry| entry.2).collect();
        for job_id in queued {
            let runnable = {
                let Some(job) = state.jobs.get(&job_id) else {
                    continue;
                };
                state.workers.values().any(|worker| {
                    !worker.draining
                        && matching::matches(&job.requirements.required, &worker.properties)
                })
            };
            let Some(job) = state.jobs.get_mut(&job_id) else {
                continue;
            };
            if runnable {
                job.unrunnable_since = None;
                continue;
            }
            let since = *job.unrunnable_since.get_or_insert(now);
            if now.duration_since(since) >= self.config.unschedulable_timeout {
                let required = job.requirements.required.clone();
                let reason = matching::explain(
                    &required,
                    state
                        .workers
                        .values()
                        .filter(|worker| !worker.draining)
                        .map(|worker| worker.properties.as_slice()),
                );
                unrunnable.push((job_id, reason));
            }
        }
        for (job_id, reason) in unrunnable {
            let message = format!(
                "no worker can run this action: {reason} (waited {}s)",
                self.config.unschedulable_timeout.as_secs_f64()
            );
            complete_job(
                &mut state,
                job_id,
                status_response(Code::FailedPrecondition, message),
                now,
            );
        }

        let overdue: Vec<u64> = state
            .jobs
            .iter()
            .filter(|(_, job)| {
                job.task.as_ref().is_some_and(|task| {
                    now.duration_since(task.started) > job.timeout + keepalive_timeout
                })
            })
            .map(|(id, _)| *id)
            .collect();
        for job_id in overdue {
            let Some(job) = state.jobs.get(&job_id) else {
                continue;
            };
            let message = format!(
                "the action exceeded its timeout of {}s and its worker did not report back",
                job.timeout.as_secs_f64()
            );
            if let Some(task) = &job.task {
                send_cancel(&state, task);
            }
            complete_job(
                &mut state,
                job_id,
                status_response(Code::DeadlineExceeded, message),
                now,
            );
        }

        let retention = self.config.completed_operation_retention;
        state.operations.retain(|_, operation| {
            operation
                .done_at
                .is_none_or(|done| now.duration_since(done) < retention)
        });
        self.dispatch(&mut state);
    }
}

/// How often [`Scheduler::tick`] runs.
pub const TICK: Duration = Duration::from_millis(100);

fn is_current(state: &State, job_id: u64, task_id: &str) -> bool {
    state
        .jobs
        .get(&job_id)
        .and_then(|job| job.task.as_ref())
        .is_some_and(|task| task.id == task_id)
}

fn send_cancel(state: &State, task: &Task) {
    if let Some(worker) = state
        .workers
        .get(&task.worker)
        .filter(|worker| worker.session == task.session)
    {
        let _ = worker.sender.send(Ok(SchedulerMessage {
            message: Some(ToWorker::Cancel(CancelTask {
                task_id: task.id.clone(),
            })),
        }));
    }
}

fn set_progress(state: &State, names: &[String], progress: Progress) {
    for name in names {
        if let Some(operation) = state.operations.get(name) {
            operation.updates.send_replace(progress.clone());
        }
    }
}

/// Finishes a job: every operation waiting for it completes with `response`.
fn complete_job(state: &mut State, job_id: u64, response: ExecuteResponse, now: Instant) {
    let Some(job) = state.jobs.remove(&job_id) else {
        return;
    };
    state.queue.remove(&job.queue_entry(job_id));
    if let Some(key) = &job.dedup {
        if state.in_flight.get(key) == Some(&job_id) {
            state.in_flight.remove(key);
        }
    }
    state
        .activity
        .completed(snapshot::executed(&job, &response, now));
    let response = Arc::new(response);
    for name in &job.operations {
        if let Some(operation) = state.operations.get_mut(name) {
            operation.finish(response.clone(), now);
        }
    }
}

pub mod snapshot;
#[cfg(test)]
mod tests;
