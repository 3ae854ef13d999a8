//! Dispatching: offering the front of the shared queue to this scheduler's workers.
//!
//! A pass reads the first [`WINDOW`] queue entries, learns (once) what each job needs,
//! and for each, in order, picks a local worker with room whose properties match
//! (LRU or MRU); the CLAIM script then decides whether this scheduler got the job,
//! since another may have claimed it since the read. Passes run when something may
//! have become dispatchable: a job queued anywhere (the `queue` event), a slot freed
//! here, a worker registered, and every tick.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cairn_proto::reapi::Platform;
use cairn_proto::worker::scheduler_message::Message as ToWorker;
use cairn_proto::worker::StartTask;
use prost::Message;

use super::{millis, Field, LocalTask, LocalWorker, QueuedJob, RedisScheduler, WINDOW};
use crate::error::Result;
use crate::scheduler::config::WorkerSelection;
use crate::scheduler::matching;

impl RedisScheduler {
    /// Gives queued jobs, front first, to this scheduler's workers with room and
    /// matching properties, until no worker has room or no job matches.
    pub async fn dispatch(&self) -> Result<()> {
        loop {
            if !self.lock().workers.values().any(LocalWorker::has_room) {
                return Ok(());
            }
            let members: Vec<String> = self
                .query(
                    "queue_front",
                    redis::cmd("ZRANGE")
                        .arg("cairn:queue")
                        .arg(0)
                        .arg(WINDOW - 1),
                )
                .await?;
            if members.is_empty() {
                return Ok(());
            }
            self.learn_jobs(&members).await?;
            let mut claimed_any = false;
            for member in &members {
                let Some((worker_id, token, job)) = self.choose(member) else {
                    continue;
                };
                let mut invocation = self.scripts.claim.prepare_invoke();
                invocation
                    .arg(member)
                    .arg(&worker_id)
                    .arg(&token)
                    .arg(millis(self.config.keepalive_timeout));
                let claimed: Option<String> = self.invoke("claim", invocation).await?;
                let Some(task_id) = claimed else {
                    self.lock().jobs.remove(member);
                    continue;
                };
                claimed_any = true;
                self.hand_over(&worker_id, &token, task_id, &job);
                if !self.lock().workers.values().any(LocalWorker::has_room) {
                    return Ok(());
                }
            }
            if !claimed_any {
                return Ok(());
            }
        }
    }

    /// Reads the queued jobs among `members` not read before; forgets those no longer
    /// in front.
    pub(super) async fn learn_jobs(&self, members: &[String]) -> Result<()> {
        let unknown: Vec<&String> = {
            let mut local = self.lock();
            let front: HashSet<&String> = members.iter().collect();
            local.jobs.retain(|member, _| front.contains(member));
            members
                .iter()
                .filter(|member| !local.jobs.contains_key(*member))
                .collect()
        };
        if unknown.is_empty() {
            return Ok(());
        }
        let mut pipeline = redis::pipe();
        for member in &unknown {
            let id = job_of_member(member);
            pipeline
                .cmd("HMGET")
                .arg(format!("cairn:job:{id}"))
                .arg("start")
                .arg("platform");
        }
        let replies: Vec<(Field, Field)> = self.pipeline("queued_jobs", &pipeline).await?;
        let mut local = self.lock();
        for (member, (start, platform)) in unknown.into_iter().zip(replies) {
            let (Some(start), Some(platform)) = (start, platform) else {
                continue;
            };
            let Ok(start) = StartTask::decode(start.as_slice()) else {
                continue;
            };
            let properties = Platform::decode(platform.as_slice())
                .map(|platform| platform.properties)
                .unwrap_or_default();
            // Checked when the job was queued (by this configuration or another
            // scheduler's): a job whose properties this one rejects matches nothing.
            let Ok(requirements) = matching::requirements(&self.config, &properties) else {
                continue;
            };
            local.jobs.insert(
                member.clone(),
                Arc::new(QueuedJob {
                    start,
                    requirements,
                }),
            );
        }
        Ok(())
    }

    /// The local worker to offer `member` to, by the configured selection.
    fn choose(&self, member: &str) -> Option<(String, String, Arc<QueuedJob>)> {
        let local = self.lock();
        let job = local.jobs.get(member)?.clone();
        let candidates = local.workers.iter().filter(|(_, worker)| {
            worker.has_room() && matching::matches(&job.requirements.required, &worker.properties)
        });
        let chosen = match self.config.worker_selection {
            WorkerSelection::Lru => candidates.min_by_key(|(_, worker)| worker.last_assigned),
            WorkerSelection::Mru => candidates.max_by_key(|(_, worker)| worker.last_assigned),
        };
        chosen.map(|(id, worker)| (id.clone(), worker.token.clone(), job))
    }

    fn hand_over(&self, worker_id: &str, token: &str, task_id: String, job: &QueuedJob) {
        let mut start = job.start.clone();
        start.task_id = task_id.clone();
        let waited = start
            .queued_timestamp
            .as_ref()
            .and_then(|queued| {
                let since = Duration::new(
                    u64::try_from(queued.seconds).ok()?,
                    u32::try_from(queued.nanos).ok()?,
                );
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .ok()?
                    .checked_sub(since)
            })
            .unwrap_or_default();
        let mut local = self.lock();
        local.assignments += 1;
        let clock = local.assignments;
        local.activity.dispatched(waited);
        match local
            .workers
            .get_mut(worker_id)
            .filter(|worker| worker.token == token)
        {
            Some(worker) => {
                worker.last_assigned = clock;
                worker.running.insert(
                    task_id,
                    LocalTask {
                        action: start
                            .action_digest
                            .as_ref()
                            .map(|digest| format!("{}/{}", digest.hash, digest.size_bytes))
                            .unwrap_or_default(),
                        instance: start.instance_name.clone(),
                        started: Instant::now(),
                    },
                );
                worker.send(ToWorker::Start(start));
            }
            // The session ended between the claim and now: its GONE (or the lease's
            // expiry) requeues the task.
            None => tracing::debug!(worker = worker_id, "claimed for a session that ended"),
        }
    }

    /// Waits for a reason to dispatch (a job queued anywhere, a slot freed here, a
    /// worker registered), then dispatches; for as long as the scheduler runs.
    pub async fn dispatch_forever(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            // Errors were logged and counted; the next wake-up (a tick at the latest)
            // tries again.
            let _ = self.dispatch().await;
        }
    }
}

/// The job id of a queue member (`PRIORITY:JOB`).
pub(super) fn job_of_member(member: &str) -> &str {
    let padded = member.rsplit(':').next().unwrap_or_default();
    let trimmed = padded.trim_start_matches('0');
    if trimmed.is_empty() {
        padded
    } else {
        trimmed
    }
}
