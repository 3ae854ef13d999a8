//! The scheduler's HTTP listener (`--http-listen`): `/metrics` for Prometheus,
//! `/healthz` for load balancers and service managers, and a status page (`/`, with
//! its data as JSON at `/status`) showing the queue, the workers and what they run, and
//! the recent operations with their durations and exit codes.
//!
//! Everything is read from the scheduler's state in one short critical section per
//! request ([`Scheduler::snapshot`]). The page is the node's kind of page
//! ([`crate::status_html`], whose formatting and chart code it shares); its charts need
//! a history, so a task samples the queue, the running tasks and the completions every
//! [`crate::status_html::SAMPLE_INTERVAL`] and keeps five minutes of them.
//!
//! With `--auth`, everything but `/healthz` needs the `metrics` permission, as on the
//! node. The listener is plaintext: the node's single-node setup binds it to
//! loopback, and a standalone scheduler should keep it on a private address.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::backend::Backend;
use super::metrics;
use crate::auth::{Access, Credentials, Need, Permission};
use crate::error::{Error, Result};
use crate::exec_common::write_ready_file;
use crate::status_html::{self, SAMPLES_KEPT, SAMPLE_INTERVAL};

/// The queue at one moment.
#[derive(Debug, Clone, Copy)]
struct Sample {
    unix_ms: u64,
    queue_length: u64,
    running: u64,
    completed: u64,
}

struct Board {
    scheduler: Backend,
    access: Access,
    started: Instant,
    samples: Mutex<VecDeque<Sample>>,
}

/// The running listener and sampler; dropping it stops both.
pub struct StatusServer {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for StatusServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Serves `scheduler`'s metrics and status on `listen`, if given, and writes the bound
/// address (`IP:PORT`) to `ready_file`.
pub async fn start(
    listen: Option<SocketAddr>,
    scheduler: &Backend,
    access: Access,
    ready_file: Option<&Path>,
) -> Result<Option<StatusServer>> {
    let Some(listen) = listen else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|error| {
            Error::new(
                crate::ErrorKind::Unavailable,
                format!("cannot listen on {listen} (--http-listen): {error}"),
            )
        })?;
    let address = listener.local_addr()?;
    let board = Arc::new(Board {
        scheduler: scheduler.clone(),
        access,
        started: Instant::now(),
        samples: Mutex::new(VecDeque::with_capacity(SAMPLES_KEPT)),
    });
    let sampling = Arc::clone(&board);
    let sampler = tokio::spawn(async move {
        let mut interval = tokio::time::interval(SAMPLE_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            sampling.sample();
        }
    });
    let serving = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // EMFILE and the like: pause rather than spin.
                    tracing::warn!("the HTTP listener could not accept: {error}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let board = Arc::clone(&board);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let response = board.respond(&request);
                    async move { Ok::<_, Infallible>(response) }
                });
                if let Err(error) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!("HTTP connection ended: {error}");
                }
            });
        }
    });
    tracing::info!("cairn-scheduler serving /metrics and its status page on http://{address}");
    if let Some(path) = ready_file {
        write_ready_file(path, &address.to_string())?;
    }
    Ok(Some(StatusServer {
        tasks: vec![sampler, serving],
    }))
}

impl Board {
    fn sample(&self) {
        let snapshot = self.scheduler.snapshot();
        let sample = Sample {
            unix_ms: unix_ms(),
            queue_length: snapshot.gauges.queue_length,
            running: snapshot.gauges.running,
            completed: snapshot.activity.completed.values().sum(),
        };
        if let Ok(mut samples) = self.samples.lock() {
            if samples.len() == SAMPLES_KEPT {
                samples.pop_front();
            }
            samples.push_back(sample);
        }
    }

    fn respond(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                format!("{} is not allowed here\n", request.method()),
            );
        }
        let path = request.uri().path();
        if path != "/healthz" {
            let credentials = Credentials::from_headers(request.headers());
            if let Err(error) =
                self.access
                    .check(&credentials, Need::One(Permission::Metrics), None)
            {
                let mut response = text(
                    match error.kind() {
                        crate::ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
                        _ => StatusCode::FORBIDDEN,
                    },
                    "text/plain",
                    format!("{error}\n"),
                );
                if response.status() == StatusCode::UNAUTHORIZED {
                    response.headers_mut().insert(
                        hyper::header::WWW_AUTHENTICATE,
                        hyper::header::HeaderValue::from_static("Basic realm=\"cairn\""),
                    );
                }
                return response;
            }
        }
        match path {
            "/metrics" => {
                let snapshot = self.scheduler.snapshot();
                let mut body = metrics::render(&snapshot.gauges, &snapshot.activity);
                if let Some(redis) = &snapshot.redis {
                    body.push_str(&metrics::render_redis(redis));
                }
                text(StatusCode::OK, "text/plain; version=0.0.4", body)
            }
            "/healthz" => {
                let gauges = self.scheduler.snapshot().gauges;
                if let Err(reason) = self.scheduler.health() {
                    return text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("unavailable: {reason}\n"),
                    );
                }
                text(
                    StatusCode::OK,
                    "text/plain",
                    format!(
                        "ok\nworkers: {}\nqueued: {}\nrunning: {}\n",
                        gauges.workers, gauges.queue_length, gauges.running
                    ),
                )
            }
            "/status" => text(
                StatusCode::OK,
                "application/json",
                self.status().to_string(),
            ),
            "/" => {
                let status = self.status();
                let core = core_html(&status);
                text(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    status_html::page(include_str!("status_page.html"), "", &core, &status),
                )
            }
            path => text(
                StatusCode::NOT_FOUND,
                "text/plain",
                format!(
                    "nothing at {}: try /, /status, /metrics or /healthz\n",
                    path.get(..200).unwrap_or(path)
                ),
            ),
        }
    }

    fn status(&self) -> Value {
        let snapshot = self.scheduler.snapshot();
        let activity = &snapshot.activity;
        let recent: Vec<&metrics::Recent> = activity.recent.iter().rev().collect();
        let dispatches: u64 = activity.latency_buckets.iter().sum();
        json!({
            "version": crate::VERSION,
            "uptime_seconds": self.started.elapsed().as_secs(),
            "gauges": snapshot.gauges,
            "counters": {
                "dispatched": activity.dispatched,
                "requeues": activity.requeues,
                "completed": activity.completed,
            },
            "dispatch_latency": {
                "count": dispatches,
                "mean_seconds": (dispatches > 0).then(|| activity.latency_sum / dispatches as f64),
            },
            "workers": snapshot.workers,
            "redis": snapshot.redis.as_ref().map(|redis| json!({
                "up": redis.up,
                "reason": redis.reason,
                "leases": redis.leases,
                "round_trips": redis.round_trips,
                "errors": redis.errors,
            })),
            "recent": recent,
            "series": self.series(),
        })
    }

    fn series(&self) -> Value {
        let samples: Vec<Sample> = self
            .samples
            .lock()
            .map(|samples| samples.iter().copied().collect())
            .unwrap_or_default();
        let later = || samples.iter().skip(1);
        let completed: Vec<f64> = samples
            .windows(2)
            .map(|pair| {
                let seconds = pair[1].unix_ms.saturating_sub(pair[0].unix_ms).max(1) as f64 / 1e3;
                pair[1].completed.saturating_sub(pair[0].completed) as f64 / seconds
            })
            .collect();
        json!({
            "interval_seconds": SAMPLE_INTERVAL.as_secs(),
            "time": later().map(|s| s.unix_ms).collect::<Vec<_>>(),
            "queue_length": later().map(|s| s.queue_length).collect::<Vec<_>>(),
            "running": later().map(|s| s.running).collect::<Vec<_>>(),
            "completed_per_second": completed,
        })
    }
}

/// The numbers readable without JavaScript.
fn core_html(status: &Value) -> String {
    let counters = &status["counters"];
    let completed = |outcome: &str| counters["completed"][outcome].as_u64().unwrap_or(0);
    let count = |key: &str, value: u64| status_html::field(key, "count", value);
    format!(
        "<h1>cairn scheduler</h1><p class=\"meta\">version {} · up <span data-key=\"uptime_seconds\" \
         data-format=\"uptime\">{}</span></p><h2>Queue and workers</h2><div class=\"cols\">{}\
         <table id=\"counters\"><tr><th>dispatched</th><td class=\"n\">{}</td></tr>\
         <tr><th>requeued</th><td class=\"n\">{}</td></tr>\
         <tr><th>cached</th><td class=\"n\">{}</td></tr>\
         <tr><th>succeeded</th><td class=\"n\">{}</td></tr>\
         <tr><th>non-zero exit</th><td class=\"n\">{}</td></tr>\
         <tr><th>errors</th><td class=\"n\">{}</td></tr></table></div>\
         <h2>Recent operations</h2>{}",
        status_html::escape(status["version"].as_str().unwrap_or("")),
        status_html::uptime_text(status["uptime_seconds"].as_u64().unwrap_or(0)),
        status_html::execution_html(status, ""),
        count(
            "counters.dispatched",
            counters["dispatched"].as_u64().unwrap_or(0)
        ),
        count("counters.requeues", counters["requeues"].as_u64().unwrap_or(0)),
        count("counters.completed.cached", completed("cached")),
        count("counters.completed.success", completed("success")),
        count("counters.completed.nonzero_exit", completed("nonzero_exit")),
        count("counters.completed.error", completed("error")),
        status_html::recent_html(status),
    )
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}
