//! The status page: `GET /` and `GET /status` on the node's HTTP listener.
//!
//! Whoever runs a cache node for a CI fleet asks the same questions many times a day:
//! is it healthy, how full is it, is the hit rate what it was, is S3 keeping up, are
//! the workers busy. `/metrics` answers all of them, but only to Prometheus. The page
//! answers them to a person with a browser, on a node that may have no internet
//! access: one self-contained HTML document (its script and styles are
//! `status_page.html` and `status_chart.js`, compiled in), whose core numbers are
//! rendered here, so they read without JavaScript, and whose charts the page draws
//! itself as inline SVG from `GET /status`, the same data as JSON, fetched every few
//! seconds.
//!
//! Charts need a history, which the counters alone do not keep. A [`Sampler`] thread
//! reads the node's counters and storage figures every [`SAMPLE_INTERVAL`] and keeps
//! the last [`SAMPLES_KEPT`] in a ring: five minutes, about 20 KiB, one engine
//! statistics call (a message to each shard) every two seconds. The series served are
//! the differences between consecutive samples: hit ratios and rates over each
//! interval. When the node runs execution, the same thread fetches the `/status` of
//! its scheduler over the scheduler's HTTP listener on loopback (see
//! [`crate::embedded`]), which carries the queue, the workers and what they run.
//!
//! Both need the `metrics` permission when `--auth` is on, like `/metrics`.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_storage::Stats;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::metrics::Counters;
use crate::status_html::{
    escape, execution_html, field, page, recent_html, uptime_text, SAMPLES_KEPT, SAMPLE_INTERVAL,
};
use crate::store::Store;

/// How long fetching the scheduler's status may take, connecting and reading each.
const SCHEDULER_TIMEOUT: Duration = Duration::from_secs(1);

/// The largest scheduler status read (its recent operations are bounded to 50).
const SCHEDULER_STATUS_LIMIT: u64 = 4 << 20;

/// The node's counters and storage figures at one moment.
#[derive(Debug, Clone)]
struct Sample {
    unix_ms: u64,
    counters: Counters,
    used_bytes: u64,
    evictions: u64,
    backlog_bytes: u64,
}

/// What the page shows: the ring of samples and the latest scheduler status.
pub struct StatusBoard {
    store: Store,
    started: Instant,
    scheduler: Option<SocketAddr>,
    /// The token the scheduler asks of the node, if any (see `embedded.rs`).
    scheduler_token: Option<String>,
    samples: Mutex<VecDeque<Sample>>,
    execution: Mutex<Option<Value>>,
}

/// Takes the samples until dropped.
pub struct Sampler {
    board: Arc<StatusBoard>,
    _stop: mpsc::Sender<()>,
}

impl Sampler {
    /// Starts sampling `store`, and the scheduler whose HTTP listener is `scheduler`
    /// when the node runs execution, presenting `scheduler_token` to it if given.
    pub fn start(
        store: Store,
        scheduler: Option<SocketAddr>,
        scheduler_token: Option<String>,
    ) -> Result<Sampler> {
        let board = Arc::new(StatusBoard {
            store,
            started: Instant::now(),
            scheduler,
            scheduler_token,
            samples: Mutex::new(VecDeque::with_capacity(SAMPLES_KEPT)),
            execution: Mutex::new(None),
        });
        let (stop, stopped) = mpsc::channel::<()>();
        let sampling = Arc::clone(&board);
        // Not joined on drop: a statistics call made while the engine stops may never
        // be answered, and the thread holds nothing that needs releasing; it ends at
        // its next wake-up or with the process.
        std::thread::Builder::new()
            .name("status-sampler".to_string())
            .spawn(move || loop {
                sampling.sample();
                match stopped.recv_timeout(SAMPLE_INTERVAL) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            })
            .map_err(|error| {
                Error::internal(format!("cannot start the status sampler: {error}"))
            })?;
        Ok(Sampler { board, _stop: stop })
    }

    /// The board the HTTP front renders.
    pub fn board(&self) -> Arc<StatusBoard> {
        Arc::clone(&self.board)
    }
}

impl StatusBoard {
    fn sample(&self) {
        if let Some(address) = self.scheduler {
            let token = self.scheduler_token.as_deref();
            let status = fetch_scheduler_status(address, token).unwrap_or_else(|error| {
                json!({ "error": format!("the scheduler at {address} did not answer: {error}") })
            });
            if let Ok(mut execution) = self.execution.lock() {
                *execution = Some(status);
            }
        }
        let Ok(stats) = futures::executor::block_on(self.store.engine().stats()) else {
            return;
        };
        let sample = Sample {
            unix_ms: unix_ms(),
            counters: self.store.metrics().counters(),
            used_bytes: stats.partitions.iter().map(|p| p.used_bytes).sum(),
            evictions: stats.partitions.iter().map(|p| p.evictions).sum(),
            backlog_bytes: stats.replication_backlog_bytes(),
        };
        if let Ok(mut samples) = self.samples.lock() {
            if samples.len() == SAMPLES_KEPT {
                samples.pop_front();
            }
            samples.push_back(sample);
        }
    }

    /// The status as JSON, with the health verdict of `/healthz` (`health_status`, its
    /// HTTP status, and `health_body`).
    pub fn status(&self, stats: &Stats, health_status: u16, health_body: &str) -> Value {
        let counters = self.store.metrics().counters();
        let reasons: Vec<&str> = health_body
            .lines()
            .filter_map(|line| line.strip_prefix("degraded: "))
            .collect();
        let verdict = if health_status >= 500 {
            "unavailable"
        } else if reasons.is_empty() {
            "ok"
        } else {
            "degraded"
        };
        let partitions: Vec<Value> = stats
            .partitions
            .iter()
            .map(|p| {
                json!({
                    "partition": p.partition,
                    "used_bytes": p.used_bytes,
                    "budget_bytes": p.budget_bytes,
                    "objects": p.objects,
                    "evictions": p.evictions,
                    "crc_failures": p.crc_failures,
                })
            })
            .collect();
        let sum = |field: fn(&cairn_storage::PartitionStats) -> u64| -> u64 {
            stats.partitions.iter().map(field).sum()
        };
        let lookups = |hits: u64, misses: u64| {
            json!({
                "hits": hits,
                "misses": misses,
                "hit_ratio": ratio(hits, misses),
            })
        };
        let s3 = self.store.slow_tier().map(|tier| {
            let state = tier.state();
            json!({
                "state": if state.failing.is_some() { "failing" } else { "ok" },
                "error": state.failing,
                "backlog_bytes": stats.replication_backlog_bytes(),
                "index_objects": state.index_objects,
                "listed": state.listed,
            })
        });
        let execution = self
            .execution
            .lock()
            .ok()
            .and_then(|execution| execution.clone());
        json!({
            "version": crate::VERSION,
            "uptime_seconds": self.started.elapsed().as_secs(),
            "health": {
                "status": verdict,
                "http_status": health_status,
                "reasons": reasons,
            },
            "store": {
                "used_bytes": sum(|p| p.used_bytes),
                "budget_bytes": sum(|p| p.budget_bytes),
                "objects": sum(|p| p.objects),
                "evictions": sum(|p| p.evictions),
                "crc_failures": sum(|p| p.crc_failures),
                "partitions": partitions,
            },
            "traffic": {
                "requests": counters.requests,
                "received_bytes": counters.received_bytes,
                "sent_bytes": counters.sent_bytes,
                "cas": lookups(counters.cas_hits, counters.cas_misses),
                "ac": lookups(counters.ac_hits, counters.ac_misses),
            },
            "s3": s3,
            "execution": execution,
            "series": self.series(),
        })
    }

    /// The charts' series: one point per interval between consecutive samples.
    fn series(&self) -> Value {
        let samples: Vec<Sample> = self
            .samples
            .lock()
            .map(|samples| samples.iter().cloned().collect())
            .unwrap_or_default();
        let pairs: Vec<(&Sample, &Sample, f64)> = samples
            .windows(2)
            .map(|pair| {
                let seconds = pair[1].unix_ms.saturating_sub(pair[0].unix_ms).max(1) as f64 / 1e3;
                (&pair[0], &pair[1], seconds)
            })
            .collect();
        let rate = |of: fn(&Sample) -> u64| -> Vec<f64> {
            pairs
                .iter()
                .map(|(a, b, seconds)| of(b).saturating_sub(of(a)) as f64 / seconds)
                .collect()
        };
        let hit_ratio = |hits: fn(&Counters) -> u64, misses: fn(&Counters) -> u64| {
            pairs
                .iter()
                .map(|(a, b, _)| {
                    let hits = hits(&b.counters).saturating_sub(hits(&a.counters));
                    let misses = misses(&b.counters).saturating_sub(misses(&a.counters));
                    ratio(hits, misses)
                })
                .collect::<Vec<Option<f64>>>()
        };
        let mut requests: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for sample in &samples {
            for service in sample.counters.requests.keys() {
                requests.entry(service.as_str()).or_default();
            }
        }
        for (service, values) in requests.iter_mut() {
            *values = pairs
                .iter()
                .map(|(a, b, seconds)| {
                    let before = a.counters.requests.get(*service).copied().unwrap_or(0);
                    let after = b.counters.requests.get(*service).copied().unwrap_or(0);
                    after.saturating_sub(before) as f64 / seconds
                })
                .collect();
        }
        let later = || samples.iter().skip(1);
        json!({
            "interval_seconds": SAMPLE_INTERVAL.as_secs(),
            "time": later().map(|s| s.unix_ms).collect::<Vec<_>>(),
            "cas_hit_ratio": hit_ratio(|c| c.cas_hits, |c| c.cas_misses),
            "ac_hit_ratio": hit_ratio(|c| c.ac_hits, |c| c.ac_misses),
            "received_bytes_per_second": rate(|s| s.counters.received_bytes),
            "sent_bytes_per_second": rate(|s| s.counters.sent_bytes),
            "requests_per_second": requests,
            "evictions_per_second": rate(|s| s.evictions),
            "used_bytes": later().map(|s| s.used_bytes).collect::<Vec<_>>(),
            "backlog_bytes": later().map(|s| s.backlog_bytes).collect::<Vec<_>>(),
        })
    }

    /// The HTML page for `status` (what [`StatusBoard::status`] returned).
    pub fn page(&self, status: &Value) -> String {
        let (head, core) = core_html(status);
        page(include_str!("status_page.html"), &head, &core, status)
    }
}

/// The numbers readable without JavaScript: the verdict above the charts, the rest
/// below.
fn core_html(status: &Value) -> (String, String) {
    let mut head = String::new();
    let health = &status["health"];
    let verdict = health["status"].as_str().unwrap_or("unknown");
    let _ = write!(
        head,
        "<h1>cairn node <span class=\"badge {verdict}\" id=\"health\">{verdict}</span></h1>\
         <p class=\"meta\">version {} · up <span data-key=\"uptime_seconds\" \
         data-format=\"uptime\">{}</span></p>",
        escape(status["version"].as_str().unwrap_or("")),
        uptime_text(status["uptime_seconds"].as_u64().unwrap_or(0)),
    );
    if let Some(reasons) = health["reasons"].as_array().filter(|r| !r.is_empty()) {
        head.push_str("<ul id=\"health-reasons\">");
        for reason in reasons {
            let _ = write!(head, "<li>{}</li>", escape(reason.as_str().unwrap_or("")));
        }
        head.push_str("</ul>");
    }
    let mut html = String::new();

    let store = &status["store"];
    html.push_str("<h2>Store</h2><div class=\"cols\"><table>");
    let used = store["used_bytes"].as_u64().unwrap_or(0);
    let budget = store["budget_bytes"].as_u64().unwrap_or(0);
    let _ = write!(
        html,
        "<tr><th>used</th><td class=\"n\">{} of {}</td><td>{}</td></tr>",
        field("store.used_bytes", "bytes", used),
        field("store.budget_bytes", "bytes", budget),
        bar(used, budget),
    );
    for (label, key) in [
        ("objects", "objects"),
        ("evictions", "evictions"),
        ("CRC failures", "crc_failures"),
    ] {
        let _ = write!(
            html,
            "<tr><th>{label}</th><td class=\"n\">{}</td></tr>",
            field(
                &format!("store.{key}"),
                "count",
                store[key].as_u64().unwrap_or(0)
            ),
        );
    }
    html.push_str(
        "</table><table id=\"partitions\"><tr><th>partition</th><th class=\"n\">used</th>\
         <th class=\"n\">budget</th><th></th><th class=\"n\">objects</th>\
         <th class=\"n\">evictions</th><th class=\"n\">CRC failures</th></tr>",
    );
    for (index, partition) in store["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let number = |key: &str| partition[key].as_u64().unwrap_or(0);
        let key = |name: &str| format!("store.partitions.{index}.{name}");
        let _ = write!(
            html,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            number("partition"),
            field(&key("used_bytes"), "bytes", number("used_bytes")),
            field(&key("budget_bytes"), "bytes", number("budget_bytes")),
            bar(number("used_bytes"), number("budget_bytes")),
            field(&key("objects"), "count", number("objects")),
            field(&key("evictions"), "count", number("evictions")),
            field(&key("crc_failures"), "count", number("crc_failures")),
        );
    }
    html.push_str("</table></div>");

    let traffic = &status["traffic"];
    html.push_str("<h2>Traffic since start</h2><div class=\"cols\"><table id=\"lookups\">");
    for (label, store) in [("CAS", "cas"), ("AC", "ac")] {
        let lookups = &traffic[store];
        let _ = write!(
            html,
            "<tr><th>{label} hit ratio</th><td class=\"n\">{}</td><td class=\"n\">{} hits</td>\
             <td class=\"n\">{} misses</td></tr>",
            ratio_field(
                &format!("traffic.{store}.hit_ratio"),
                lookups["hit_ratio"].as_f64()
            ),
            field(
                &format!("traffic.{store}.hits"),
                "count",
                lookups["hits"].as_u64().unwrap_or(0)
            ),
            field(
                &format!("traffic.{store}.misses"),
                "count",
                lookups["misses"].as_u64().unwrap_or(0)
            ),
        );
    }
    let _ = write!(
        html,
        "<tr><th>received</th><td class=\"n\">{}</td></tr><tr><th>sent</th><td class=\"n\">{}</td></tr>",
        field(
            "traffic.received_bytes",
            "bytes",
            traffic["received_bytes"].as_u64().unwrap_or(0)
        ),
        field(
            "traffic.sent_bytes",
            "bytes",
            traffic["sent_bytes"].as_u64().unwrap_or(0)
        ),
    );
    html.push_str(
        "</table><table id=\"requests\"><tr><th>service</th><th class=\"n\">requests</th></tr>",
    );
    if let Some(requests) = traffic["requests"].as_object() {
        for (service, count) in requests {
            let _ = write!(
                html,
                "<tr><td>{}</td><td class=\"n\">{}</td></tr>",
                escape(service),
                field(
                    &format!("traffic.requests.{service}"),
                    "count",
                    count.as_u64().unwrap_or(0)
                ),
            );
        }
    }
    html.push_str("</table></div>");

    html.push_str("<h2>S3 slow tier</h2>");
    let s3 = &status["s3"];
    if s3.is_null() {
        html.push_str("<p>not configured</p>");
    } else {
        let _ = write!(
            html,
            "<table id=\"s3\"><tr><th>state</th><td data-key=\"s3.state\">{}</td></tr>\
             <tr><th>replication backlog</th><td class=\"n\">{}</td></tr>\
             <tr><th>blobs known in the bucket</th><td class=\"n\">{}</td></tr>\
             <tr><th>bucket listed</th><td data-key=\"s3.listed\">{}</td></tr>",
            escape(s3["state"].as_str().unwrap_or("")),
            field(
                "s3.backlog_bytes",
                "bytes",
                s3["backlog_bytes"].as_u64().unwrap_or(0)
            ),
            field(
                "s3.index_objects",
                "count",
                s3["index_objects"].as_u64().unwrap_or(0)
            ),
            s3["listed"].as_bool().unwrap_or(false),
        );
        if let Some(error) = s3["error"].as_str() {
            let _ = write!(
                html,
                "<tr><th>last error</th><td data-key=\"s3.error\">{}</td></tr>",
                escape(error)
            );
        }
        html.push_str("</table>");
    }

    html.push_str("<h2>Execution</h2>");
    let execution = &status["execution"];
    if execution.is_null() {
        html.push_str("<p>this node runs no execution</p>");
    } else if let Some(error) = execution["error"].as_str() {
        let _ = write!(html, "<p id=\"execution-error\">{}</p>", escape(error));
    } else {
        html.push_str(&execution_html(execution, "execution."));
        html.push_str("<h3>Recent operations</h3>");
        html.push_str(&recent_html(execution));
    }
    (head, html)
}

fn ratio_field(key: &str, value: Option<f64>) -> String {
    let text = value.map_or_else(|| "–".to_string(), |v| format!("{:.1} %", v * 100.0));
    format!("<span data-key=\"{key}\" data-format=\"ratio\">{text}</span>")
}

fn bar(used: u64, budget: u64) -> String {
    let share = if budget == 0 {
        0.0
    } else {
        (used as f64 / budget as f64).min(1.0)
    };
    format!(
        "<span class=\"bar\" title=\"{:.1} %\"><span style=\"width:{:.1}%\"></span></span>",
        share * 100.0,
        share * 100.0
    )
}

/// Hits over lookups; `None` when there were none.
fn ratio(hits: u64, misses: u64) -> Option<f64> {
    let total = hits + misses;
    (total > 0).then(|| hits as f64 / total as f64)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// `GET /status` from the scheduler's HTTP listener at `address`, with `token` if
/// given, over a plain blocking connection (the sampler thread has no runtime, and
/// one small request every few seconds needs none).
fn fetch_scheduler_status(
    address: SocketAddr,
    token: Option<&str>,
) -> std::result::Result<Value, String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&address, SCHEDULER_TIMEOUT)
        .map_err(|error| error.to_string())?;
    stream
        .set_read_timeout(Some(SCHEDULER_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(SCHEDULER_TIMEOUT)))
        .map_err(|error| error.to_string())?;
    stream
        .write_all(
            format!(
                "GET /status HTTP/1.1\r\nHost: {address}\r\n{}Connection: close\r\n\r\n",
                token.map_or(String::new(), |token| format!(
                    "Authorization: Bearer {token}\r\n"
                ))
            )
            .as_bytes(),
        )
        .map_err(|error| error.to_string())?;
    let mut response = Vec::new();
    stream
        .take(SCHEDULER_STATUS_LIMIT)
        .read_to_end(&mut response)
        .map_err(|error| error.to_string())?;
    let split = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or("no HTTP response")?;
    let head = String::from_utf8_lossy(&response[..split]);
    if head.split_whitespace().nth(1) != Some("200") {
        return Err(format!(
            "answered {}",
            head.lines().next().unwrap_or_default()
        ));
    }
    serde_json::from_slice(&response[split + 4..]).map_err(|error| error.to_string())
}
