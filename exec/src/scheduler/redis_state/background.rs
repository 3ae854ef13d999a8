//! What runs beside the requests: the ticker (expired leases, overdue tasks, gauges,
//! re-reading watched operations, jobs nobody can run) and the subscriber to
//! `cairn:events`, which turns published changes into updates of local watchers and
//! into dispatch passes, cancellations and drains for local workers.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_proto::reapi::platform::Property;
use cairn_proto::worker::scheduler_message::Message as ToWorker;
use cairn_proto::worker::{CancelTask, Drain, WorkerInfo};
use futures::StreamExt;
use prost::Message;
use tonic::Code;

use super::dispatch::job_of_member;
use super::{
    millis, parse_op, stage_progress, update, RedisScheduler, CHANNEL, MAX_BACKOFF, REFRESH, WINDOW,
};
use crate::error::Result;
use crate::scheduler::intake::status_response;
use crate::scheduler::matching;
use crate::scheduler::state::Progress;

impl RedisScheduler {
    /// What time alone changes, run every [`super::state::TICK`]: expired leases are
    /// requeued, the gauges re-read, and every [`REFRESH`] overdue tasks ended,
    /// watched operations re-read, and jobs nobody can run failed after
    /// `unschedulable_timeout`.
    pub async fn tick(&self) {
        let mut invocation = self.scripts.reap.prepare_invoke();
        invocation
            .arg(self.config.max_job_retries)
            .arg(millis(self.config.completed_operation_retention))
            .arg(self.config.keepalive_timeout.as_secs_f64().to_string());
        if let Ok(reaped) = self.invoke::<Vec<redis::Value>>("reap", invocation).await {
            let requeued: u64 = reaped
                .first()
                .and_then(|value| redis::from_redis_value_ref(value).ok())
                .unwrap_or(0);
            self.lock().activity.requeues += requeued;
            for value in reaped.iter().skip(1) {
                if let Ok(worker) = redis::from_redis_value_ref::<String>(value) {
                    self.end_session(&worker, None, "its lease expired");
                }
            }
        }
        let mut pipeline = redis::pipe();
        pipeline
            .cmd("ZCARD")
            .arg("cairn:queue")
            .cmd("ZCARD")
            .arg("cairn:workers");
        if let Ok((queued, leases)) = self.pipeline::<(u64, u64)>("gauges", &pipeline).await {
            self.lock().queue_length = queued;
            self.link().status.leases = leases;
        }
        let due = {
            let mut local = self.lock();
            let due = local
                .last_refresh
                .is_none_or(|last| last.elapsed() >= REFRESH);
            if due {
                local.last_refresh = Some(Instant::now());
            }
            due
        };
        if due {
            let mut invocation = self.scripts.overdue.prepare_invoke();
            invocation.arg(millis(self.config.completed_operation_retention));
            let _ = self.invoke::<i64>("overdue", invocation).await;
            let _ = self.refresh().await;
            let _ = self.fail_unrunnable().await;
        }
        self.wake.notify_one();
    }

    /// Re-reads every operation a local client watches; forgets watchers nobody holds.
    async fn refresh(&self) -> Result<()> {
        let names: Vec<String> = {
            let mut local = self.lock();
            local
                .watches
                .retain(|_, watched| watched.updates.receiver_count() > 0);
            local.watches.keys().cloned().collect()
        };
        for chunk in names.chunks(500) {
            let mut pipeline = redis::pipe();
            for name in chunk {
                pipeline.cmd("HGETALL").arg(format!("cairn:op:{name}"));
            }
            let replies: Vec<HashMap<String, Vec<u8>>> =
                self.pipeline("refresh", &pipeline).await?;
            let local = self.lock();
            for (name, fields) in chunk.iter().zip(replies) {
                let Some(watched) = local.watches.get(name) else {
                    continue;
                };
                match parse_op(&fields) {
                    Some((_, progress)) => update(&watched.updates, progress),
                    // Expired, deleted, or lost with a Redis that kept no data.
                    None => update(
                        &watched.updates,
                        Progress::Completed(Arc::new(status_response(
                            Code::NotFound,
                            "the operation is no longer known to the scheduler; execute again",
                        ))),
                    ),
                }
            }
        }
        Ok(())
    }

    /// Fails the queued jobs at the front that no registered worker (with any
    /// scheduler) could run for `unschedulable_timeout`; exactly one scheduler's
    /// FAIL_QUEUED takes each.
    async fn fail_unrunnable(&self) -> Result<()> {
        let ids: Vec<String> = self
            .query(
                "list_workers",
                redis::cmd("ZRANGE").arg("cairn:workers").arg(0).arg(-1),
            )
            .await?;
        let mut offers: Vec<Vec<Property>> = Vec::new();
        if !ids.is_empty() {
            let mut pipeline = redis::pipe();
            for id in &ids {
                pipeline
                    .cmd("HGET")
                    .arg(format!("cairn:worker:{id}"))
                    .arg("info");
            }
            let infos: Vec<Option<Vec<u8>>> = self.pipeline("worker_infos", &pipeline).await?;
            offers = infos
                .into_iter()
                .flatten()
                .filter_map(|bytes| WorkerInfo::decode(bytes.as_slice()).ok())
                .filter(|info| !info.draining)
                .map(|info| info.properties)
                .collect();
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
        self.learn_jobs(&members).await?;
        let now = Instant::now();
        let mut overdue = Vec::new();
        {
            let mut local = self.lock();
            let front: HashSet<&String> = members.iter().collect();
            local.unrunnable.retain(|member, _| front.contains(member));
            for member in &members {
                let Some(job) = local.jobs.get(member).cloned() else {
                    continue;
                };
                let runnable = offers
                    .iter()
                    .any(|offered| matching::matches(&job.requirements.required, offered));
                if runnable {
                    local.unrunnable.remove(member);
                    continue;
                }
                let since = *local.unrunnable.entry(member.clone()).or_insert(now);
                if now.duration_since(since) >= self.config.unschedulable_timeout {
                    let reason = matching::explain(
                        &job.requirements.required,
                        offers.iter().map(Vec::as_slice),
                    );
                    overdue.push((member.clone(), reason));
                }
            }
        }
        for (member, reason) in overdue {
            let message = format!(
                "no worker can run this action: {reason} (waited {}s)",
                self.config.unschedulable_timeout.as_secs_f64()
            );
            let response = status_response(Code::FailedPrecondition, message);
            let mut invocation = self.scripts.fail_queued.prepare_invoke();
            invocation
                .arg(job_of_member(&member))
                .arg(response.encode_to_vec())
                .arg(millis(self.config.completed_operation_retention));
            self.invoke::<i64>("fail_queued", invocation).await?;
            self.lock().unrunnable.remove(&member);
        }
        Ok(())
    }

    /// Follows `cairn:events` for as long as the scheduler runs, subscribing again
    /// with backoff whenever the connection breaks, and re-reading every watched
    /// operation after each (re)subscription, since events sent meanwhile are lost.
    pub async fn follow_events(self: Arc<Self>) {
        let mut pause = Duration::from_millis(50);
        loop {
            let connected = tokio::time::timeout(Duration::from_secs(5), async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(CHANNEL).await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await;
            match connected {
                Ok(Ok(mut pubsub)) => {
                    pause = Duration::from_millis(50);
                    let _ = self.refresh().await;
                    self.wake.notify_one();
                    let mut messages = pubsub.on_message();
                    while let Some(message) = messages.next().await {
                        self.event(message.get_payload_bytes());
                    }
                    tracing::debug!("the Redis subscription ended; subscribing again");
                }
                Ok(Err(error)) => {
                    let _ = self.record::<()>("subscribe", Err(error));
                }
                Err(_) => tracing::debug!("subscribing to Redis timed out"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_BACKOFF);
        }
    }

    fn event(self: &Arc<Self>, payload: &[u8]) {
        let text = String::from_utf8_lossy(payload);
        let mut words = text.split(' ');
        let (Some(kind), first, second) = (words.next(), words.next(), words.next()) else {
            return;
        };
        match (kind, first, second) {
            ("queue", _, _) => self.wake.notify_one(),
            ("q" | "e", Some(name), _) => {
                if let Some(watched) = self.lock().watches.get(name) {
                    update(&watched.updates, stage_progress(kind.as_bytes(), None));
                }
            }
            ("c", Some(name), _) => {
                if !self.lock().watches.contains_key(name) {
                    return;
                }
                let scheduler = Arc::clone(self);
                let name = name.to_string();
                tokio::spawn(async move {
                    if let Ok(Some((_, progress))) = scheduler.read_op(&name).await {
                        if let Some(watched) = scheduler.lock().watches.get(&name) {
                            update(&watched.updates, progress);
                        }
                    }
                });
            }
            ("cancel", Some(worker_id), Some(task)) => {
                if let Some(worker) = self.lock().workers.get_mut(worker_id) {
                    if worker.running.remove(task).is_some() {
                        worker.send(ToWorker::Cancel(CancelTask {
                            task_id: task.to_string(),
                        }));
                        self.wake.notify_one();
                    }
                }
            }
            ("drain", Some(worker_id), _) => {
                if let Some(worker) = self.lock().workers.get_mut(worker_id) {
                    worker.draining = true;
                    worker.send(ToWorker::Drain(Drain {}));
                }
            }
            _ => {}
        }
    }
}
