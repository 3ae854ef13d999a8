//! Reading the state for `/metrics`, `/status` and the status page, in one short
//! critical section; and the records of finished operations the page lists.
//!
//! A child of the state module so that it reads the state's private structures
//! directly, without widening what the rest of the scheduler can touch.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use cairn_proto::reapi::{Digest, ExecuteResponse};
use serde::Serialize;

use super::{Job, Scheduler};
use crate::scheduler::metrics::{Activity, Gauges, Outcome, Recent};

/// Everything the scheduler's status shows, read at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Queue, running tasks, workers.
    pub gauges: Gauges,
    /// Counters and recent operations.
    pub activity: Activity,
    /// The connected workers, ordered by id.
    pub workers: Vec<WorkerView>,
    /// The connection to Redis, when the state is there (`--redis`).
    pub redis: Option<crate::scheduler::redis_state::RedisStatus>,
}

/// A connected worker and what it runs.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerView {
    /// The worker's id.
    pub id: String,
    /// Tasks it runs at once.
    pub max_inflight: u32,
    /// Whether it takes no new work.
    pub draining: bool,
    /// The platform properties it offers, `name=value`.
    pub properties: Vec<String>,
    /// Seconds since its last message.
    pub last_seen_seconds: f64,
    /// The tasks it runs, longest-running first.
    pub running: Vec<TaskView>,
}

/// A task a worker runs.
#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    /// The action digest, `HASH/SIZE`.
    pub action: String,
    /// The instance name.
    pub instance: String,
    /// Seconds since the hand-over.
    pub running_seconds: f64,
}

impl Scheduler {
    /// The gauges, counters, recent operations and workers as they stand.
    pub fn snapshot(&self) -> Snapshot {
        let now = self.now();
        let state = self.lock();
        let mut workers: Vec<WorkerView> = state
            .workers
            .iter()
            .map(|(id, worker)| {
                let mut running: Vec<TaskView> = worker
                    .running
                    .values()
                    .filter_map(|job_id| state.jobs.get(job_id))
                    .map(|job| TaskView {
                        action: digest_text(&job.action_digest),
                        instance: job.instance_name.clone(),
                        running_seconds: job
                            .task
                            .as_ref()
                            .map_or(0.0, |task| seconds_between(task.started, now)),
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
                    last_seen_seconds: seconds_between(worker.last_seen, now),
                    running,
                }
            })
            .collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        let active = state.workers.values().filter(|worker| !worker.draining);
        let gauges = Gauges {
            queue_length: state.queue.len() as u64,
            running: state
                .workers
                .values()
                .map(|worker| worker.running.len() as u64)
                .sum(),
            workers: state.workers.len() as u64,
            draining_workers: state.workers.values().filter(|w| w.draining).count() as u64,
            worker_slots: active.map(|worker| u64::from(worker.max_inflight)).sum(),
            operations: state.operations.len() as u64,
        };
        Snapshot {
            gauges,
            activity: state.activity.clone(),
            workers,
            redis: None,
        }
    }
}

/// The record of a job that finished with `response` at `now`.
pub(super) fn executed(job: &Job, response: &ExecuteResponse, now: Instant) -> Recent {
    let mut recent = answered(&job.action_digest, response);
    recent.instance = job.instance_name.clone();
    recent.total_seconds = SystemTime::now()
        .duration_since(job.queued_at)
        .unwrap_or_default()
        .as_secs_f64();
    if let Some(task) = &job.task {
        recent.worker = task.worker.clone();
        recent.execution_seconds = Some(seconds_between(task.started, now));
    }
    recent
}

/// The record of an operation answered without a job (from the action cache, or
/// refused before queueing).
pub(crate) fn answered(action: &Digest, response: &ExecuteResponse) -> Recent {
    let outcome = Outcome::of(response);
    let status = response.status.as_ref();
    Recent {
        action: digest_text(action),
        instance: String::new(),
        worker: String::new(),
        outcome: outcome.label(),
        exit_code: match outcome {
            Outcome::Success | Outcome::NonzeroExit | Outcome::Cached => {
                response.result.as_ref().map(|result| result.exit_code)
            }
            Outcome::Error => None,
        },
        status_code: status.map_or(0, |status| status.code),
        message: status
            .map(|status| status.message.clone())
            .unwrap_or_default(),
        total_seconds: 0.0,
        execution_seconds: None,
        finished_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64),
    }
}

fn digest_text(digest: &Digest) -> String {
    format!("{}/{}", digest.hash, digest.size_bytes)
}

fn seconds_between(earlier: Instant, later: Instant) -> f64 {
    later.saturating_duration_since(earlier).as_secs_f64()
}
