//! What the scheduler counts, and its `/metrics` text.
//!
//! The counters live in the scheduler's state, under the mutex every change already
//! takes (see [`super::state`]): a dispatch, a requeue or a completion is recorded in
//! the critical section that makes it, so they cost a few additions and never a lock of
//! their own. The gauges (queue length, workers, running tasks) are read from the state
//! when `/metrics` is scraped. The text format is written here rather than through a
//! metrics registry: the set is small and fixed, and writing it by hand keeps every
//! name in one place for the dashboards and alert rules (config/grafana,
//! config/prometheus) that depend on them.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::time::Duration;

use serde::Serialize;

/// Upper bounds of the dispatch latency histogram's buckets, in seconds: from an
/// action dispatched at once to one that waited minutes for a free worker.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// How many finished operations the status page lists.
pub const RECENT_KEPT: usize = 50;

/// The scheduler's counters and its list of recent operations.
#[derive(Debug, Clone, Default)]
pub struct Activity {
    /// Tasks handed to workers (a requeued action counts again when handed again).
    pub dispatched: u64,
    /// Actions requeued because their worker disconnected or went silent.
    pub requeues: u64,
    /// Finished operations by outcome (see [`Outcome`]).
    pub completed: BTreeMap<&'static str, u64>,
    /// Dispatch latency (Execute to hand-over) histogram: counts per bucket of
    /// [`LATENCY_BUCKETS`], then the overflow.
    pub latency_buckets: [u64; LATENCY_BUCKETS.len() + 1],
    /// Sum of every dispatch latency, in seconds.
    pub latency_sum: f64,
    /// The last [`RECENT_KEPT`] finished operations, newest last.
    pub recent: VecDeque<Recent>,
}

/// How an operation ended, as `cairn_scheduler_completed_total{outcome}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered from the action cache without executing.
    Cached,
    /// Executed and exited 0.
    Success,
    /// Executed and exited with another code.
    NonzeroExit,
    /// Ended with an error status (timeout, no worker, missing inputs, cancelled, ...).
    Error,
}

impl Outcome {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Cached => "cached",
            Outcome::Success => "success",
            Outcome::NonzeroExit => "nonzero_exit",
            Outcome::Error => "error",
        }
    }

    /// The outcome of a response: its status, then the command's exit code.
    pub fn of(response: &cairn_proto::reapi::ExecuteResponse) -> Outcome {
        let code = response.status.as_ref().map_or(0, |status| status.code);
        if code != 0 {
            Outcome::Error
        } else if response.cached_result {
            Outcome::Cached
        } else if response
            .result
            .as_ref()
            .is_some_and(|result| result.exit_code != 0)
        {
            Outcome::NonzeroExit
        } else {
            Outcome::Success
        }
    }
}

/// One finished operation, as the status page lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Recent {
    /// The action digest, `HASH/SIZE`.
    pub action: String,
    /// The instance name.
    pub instance: String,
    /// The worker that ran it (empty when it never ran).
    pub worker: String,
    /// `cached`, `success`, `nonzero_exit` or `error`.
    pub outcome: &'static str,
    /// The command's exit code, when it ran to the end.
    pub exit_code: Option<i32>,
    /// The gRPC status code of the response (0 is OK).
    pub status_code: i32,
    /// The status message, if any.
    pub message: String,
    /// Seconds from Execute to the response.
    pub total_seconds: f64,
    /// Seconds the worker had it, when one did.
    pub execution_seconds: Option<f64>,
    /// When it finished, in milliseconds since the Unix epoch.
    pub finished_unix_ms: u64,
}

impl Activity {
    /// Records a hand-over of an action that waited `latency` since its Execute.
    pub fn dispatched(&mut self, latency: Duration) {
        self.dispatched += 1;
        let seconds = latency.as_secs_f64();
        self.latency_sum += seconds;
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency_buckets[bucket] += 1;
    }

    /// Records a finished operation.
    pub fn completed(&mut self, recent: Recent) {
        *self.completed.entry(recent.outcome).or_default() += 1;
        if self.recent.len() == RECENT_KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back(recent);
    }
}

/// The gauges of one moment, read from the state.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Gauges {
    /// Actions waiting for a worker.
    pub queue_length: u64,
    /// Tasks workers are running.
    pub running: u64,
    /// Connected workers.
    pub workers: u64,
    /// Connected workers that take no new work.
    pub draining_workers: u64,
    /// Tasks the connected workers (not draining) can run at once.
    pub worker_slots: u64,
    /// Operations known (running, queued, or finished and retained).
    pub operations: u64,
}

/// The Prometheus text of `gauges` and `activity`.
pub fn render(gauges: &Gauges, activity: &Activity) -> String {
    let mut text = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
        let _ = writeln!(text, "# HELP cairn_scheduler_{name} {help}");
        let _ = writeln!(text, "# TYPE cairn_scheduler_{name} {kind}");
        for (suffix, value) in samples {
            let _ = writeln!(text, "cairn_scheduler_{name}{suffix} {value}");
        }
    };
    let one = |value: u64| vec![(String::new(), value.to_string())];
    metric(
        "queue_length",
        "gauge",
        "Actions waiting for a worker",
        &one(gauges.queue_length),
    );
    metric(
        "running_tasks",
        "gauge",
        "Tasks the workers are running",
        &one(gauges.running),
    );
    metric(
        "workers",
        "gauge",
        "Connected workers, draining ones included",
        &one(gauges.workers),
    );
    metric(
        "draining_workers",
        "gauge",
        "Connected workers that take no new work",
        &one(gauges.draining_workers),
    );
    metric(
        "worker_slots",
        "gauge",
        "Tasks the connected workers that are not draining can run at once",
        &one(gauges.worker_slots),
    );
    metric(
        "operations",
        "gauge",
        "Operations known: queued, running, or finished and still retained",
        &one(gauges.operations),
    );
    metric(
        "dispatched_total",
        "counter",
        "Tasks handed to workers",
        &one(activity.dispatched),
    );
    metric(
        "requeues_total",
        "counter",
        "Actions put back in the queue because their worker disconnected or went silent",
        &one(activity.requeues),
    );
    let outcomes: Vec<(String, String)> = [
        Outcome::Cached,
        Outcome::Success,
        Outcome::NonzeroExit,
        Outcome::Error,
    ]
    .iter()
    .map(|outcome| {
        let count = activity
            .completed
            .get(outcome.label())
            .copied()
            .unwrap_or(0);
        (
            format!("{{outcome=\"{}\"}}", outcome.label()),
            count.to_string(),
        )
    })
    .collect();
    metric(
        "completed_total",
        "counter",
        "Operations finished, by outcome: answered from the action cache (cached), \
         exited 0 (success), exited otherwise (nonzero_exit), or ended with an error \
         status (error)",
        &outcomes,
    );
    let mut histogram = Vec::new();
    let mut cumulative = 0;
    for (index, count) in activity.latency_buckets.iter().enumerate() {
        cumulative += count;
        let bound = LATENCY_BUCKETS
            .get(index)
            .map_or_else(|| "+Inf".to_string(), |bound| bound.to_string());
        histogram.push((format!("_bucket{{le=\"{bound}\"}}"), cumulative.to_string()));
    }
    histogram.push(("_sum".to_string(), activity.latency_sum.to_string()));
    histogram.push(("_count".to_string(), cumulative.to_string()));
    metric(
        "dispatch_latency_seconds",
        "histogram",
        "Time from an action's Execute to its hand-over to a worker",
        &histogram,
    );
    text
}

/// The Prometheus text of the connection to Redis (`--redis` only).
pub fn render_redis(redis: &crate::scheduler::redis_state::RedisStatus) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "# HELP cairn_scheduler_redis_up Whether the last Redis command succeeded (1) or \
         Redis was unreachable (0)\n# TYPE cairn_scheduler_redis_up gauge\n\
         cairn_scheduler_redis_up {}",
        u8::from(redis.up)
    );
    let _ = writeln!(
        text,
        "# HELP cairn_scheduler_redis_round_trips_total Round trips to Redis, by command or \
         script\n# TYPE cairn_scheduler_redis_round_trips_total counter"
    );
    for (command, count) in &redis.round_trips {
        let _ = writeln!(
            text,
            "cairn_scheduler_redis_round_trips_total{{command=\"{command}\"}} {count}"
        );
    }
    let _ = writeln!(
        text,
        "# HELP cairn_scheduler_redis_errors_total Round trips to Redis that failed\n\
         # TYPE cairn_scheduler_redis_errors_total counter\n\
         cairn_scheduler_redis_errors_total {}",
        redis.errors
    );
    let _ = writeln!(
        text,
        "# HELP cairn_scheduler_redis_worker_leases Workers holding a lease, with any \
         scheduler sharing the Redis\n# TYPE cairn_scheduler_redis_worker_leases gauge\n\
         cairn_scheduler_redis_worker_leases {}",
        redis.leases
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_is_cumulative_and_counts_every_dispatch() {
        let mut activity = Activity::default();
        activity.dispatched(Duration::from_millis(2));
        activity.dispatched(Duration::from_millis(2));
        activity.dispatched(Duration::from_secs(1000));
        let text = render(&Gauges::default(), &activity);
        assert!(text.contains("cairn_scheduler_dispatch_latency_seconds_bucket{le=\"0.001\"} 0\n"));
        assert!(text.contains("cairn_scheduler_dispatch_latency_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("cairn_scheduler_dispatch_latency_seconds_bucket{le=\"300\"} 2\n"));
        assert!(text.contains("cairn_scheduler_dispatch_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("cairn_scheduler_dispatch_latency_seconds_count 3\n"));
        assert!(text.contains("cairn_scheduler_dispatched_total 3\n"));
    }

    #[test]
    fn recent_operations_are_bounded_and_counted_by_outcome() {
        let mut activity = Activity::default();
        for index in 0..RECENT_KEPT + 5 {
            activity.completed(Recent {
                action: format!("{index}"),
                instance: String::new(),
                worker: String::new(),
                outcome: Outcome::Success.label(),
                exit_code: Some(0),
                status_code: 0,
                message: String::new(),
                total_seconds: 0.0,
                execution_seconds: None,
                finished_unix_ms: 0,
            });
        }
        assert_eq!(activity.recent.len(), RECENT_KEPT);
        assert_eq!(
            activity.recent.front().map(|r| r.action.as_str()),
            Some("5")
        );
        let text = render(&Gauges::default(), &activity);
        assert!(text.contains(&format!(
            "cairn_scheduler_completed_total{{outcome=\"success\"}} {}\n",
            RECENT_KEPT + 5
        )));
        assert!(text.contains("cairn_scheduler_completed_total{outcome=\"error\"} 0\n"));
    }
}
