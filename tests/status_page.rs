//! The status page of a node and of its scheduler, as an operator sees it: the JSON at
//! `/status`, the page at `/` read without JavaScript, the access it needs, and the
//! page in a real browser (Debian's headless `chromium`) drawing its charts from a
//! node under load, with a screenshot kept under `target/test-artifacts/`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_proto::reapi::batch_update_blobs_request::Request as UpdateRequest;
use cairn_proto::reapi::execution_client::ExecutionClient;
use cairn_proto::reapi::{
    Action, ActionResult, BatchUpdateBlobsRequest, Command as ReapiCommand, Directory,
    ExecuteRequest, ExecuteResponse, FindMissingBlobsRequest, GetActionResultRequest,
    UpdateActionResultRequest,
};
use common::{http, http_with_headers, read_name, sha256, upload_name, wire, Node};
use prost::Message;
use serde_json::Value;

/// `GET path` on the node's HTTP listener, as JSON.
fn json(addr: std::net::SocketAddr, path: &str) -> Value {
    let (status, body) = http(addr, "GET", path, b"");
    assert_eq!(
        status,
        200,
        "GET {path}: {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).expect("JSON")
}

/// Polls the node's `/status` until `ready` holds (at most 60 s: samples come every
/// two seconds).
fn wait_status(addr: std::net::SocketAddr, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = json(addr, "/status");
        if ready(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "never {what}: {status:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Uploads and reads `count` blobs starting at `seed`, asks for as many missing ones,
/// and stores and reads an action result for every tenth.
async fn traffic(node: &Node, seed: u64, count: u64) {
    let mut bytestream = node.bytestream().await;
    let mut cas = node.cas().await;
    let mut ac = node.ac().await;
    for index in seed..seed + count {
        let data = common::blob(index, 4096);
        let digest = sha256(&data);
        common::write_blob(&mut bytestream, &upload_name("", &digest), &data)
            .await
            .expect("upload");
        let read = common::read_blob(&mut bytestream, &read_name("", &digest), 0, 0)
            .await
            .expect("read");
        assert_eq!(read, data);
        let missing = sha256(&common::blob(index + 1_000_000, 10));
        cas.find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![wire(&digest), wire(&missing)],
            ..Default::default()
        })
        .await
        .expect("FindMissingBlobs");
        if index % 10 == 0 {
            ac.update_action_result(UpdateActionResultRequest {
                action_digest: Some(wire(&digest)),
                action_result: Some(ActionResult::default()),
                ..Default::default()
            })
            .await
            .expect("UpdateActionResult");
            ac.get_action_result(GetActionResultRequest {
                action_digest: Some(wire(&digest)),
                ..Default::default()
            })
            .await
            .expect("GetActionResult");
            let _ = ac
                .get_action_result(GetActionResultRequest {
                    action_digest: Some(wire(&missing)),
                    ..Default::default()
                })
                .await;
        }
    }
}

/// `html` without its script elements: what a browser without JavaScript shows.
fn without_scripts(html: &str) -> String {
    let mut rest = html;
    let mut text = String::new();
    while let Some(start) = rest.find("<script") {
        text.push_str(&rest[..start]);
        let end = rest[start..]
            .find("</script>")
            .expect("a closed script element");
        rest = &rest[start + end + "</script>".len()..];
    }
    text.push_str(rest);
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_json_and_the_page_without_javascript_show_the_core_numbers() {
    let node = Node::start();
    traffic(&node, 0, 100).await;
    let status = wait_status(node.http, "two samples after the traffic", |status| {
        status["series"]["time"]
            .as_array()
            .is_some_and(|t| !t.is_empty())
            && status["execution"]["gauges"]["workers"].as_u64() == Some(1)
    });

    assert_eq!(status["version"], cairn::VERSION);
    assert!(status["uptime_seconds"].is_u64());
    assert_eq!(status["health"]["status"], "ok", "{status:#}");
    let store = &status["store"];
    assert!(
        store["objects"].as_u64().expect("objects") >= 100,
        "{store:#}"
    );
    assert!(store["used_bytes"].as_u64().expect("used") >= 100 * 4096);
    assert!(store["budget_bytes"].as_u64().expect("budget") > 0);
    assert_eq!(store["crc_failures"], 0);
    assert_eq!(store["evictions"], 0);
    let partitions = store["partitions"].as_array().expect("partitions");
    assert!(!partitions.is_empty());
    for partition in partitions {
        assert!(partition["budget_bytes"].as_u64().expect("budget") > 0);
    }
    let traffic = &status["traffic"];
    assert!(traffic["received_bytes"].as_u64().expect("received") >= 100 * 4096);
    assert!(traffic["sent_bytes"].as_u64().expect("sent") >= 100 * 4096);
    assert!(
        traffic["requests"]["bytestream"]
            .as_u64()
            .expect("bytestream requests")
            >= 200
    );
    assert!(
        traffic["cas"]["hits"].as_u64().expect("CAS hits") >= 100,
        "{traffic:#}"
    );
    assert!(traffic["cas"]["misses"].as_u64().expect("CAS misses") >= 100);
    assert!(traffic["ac"]["hits"].as_u64().expect("AC hits") >= 10);
    assert!(traffic["ac"]["misses"].as_u64().expect("AC misses") >= 10);
    assert!(traffic["cas"]["hit_ratio"].as_f64().expect("ratio") > 0.0);
    assert!(status["s3"].is_null(), "no slow tier configured");
    let execution = &status["execution"];
    assert_eq!(execution["gauges"]["queue_length"], 0, "{execution:#}");
    assert_eq!(execution["workers"].as_array().expect("workers").len(), 1);
    let series = &status["series"];
    let points = series["time"].as_array().expect("time").len();
    for name in [
        "cas_hit_ratio",
        "ac_hit_ratio",
        "received_bytes_per_second",
        "sent_bytes_per_second",
        "evictions_per_second",
        "used_bytes",
        "backlog_bytes",
    ] {
        assert_eq!(series[name].as_array().expect(name).len(), points, "{name}");
    }
    assert!(series["requests_per_second"]["bytestream"].is_array());

    let (code, head, body) = http_with_headers(node.http, "GET", "/", &[], b"");
    assert_eq!(code, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/html"),
        "{head}"
    );
    let page = String::from_utf8(body).expect("UTF-8");
    assert!(
        !page.contains("src=\"http") && !page.contains("href=\"http") && !page.contains("url("),
        "the page loads nothing from elsewhere"
    );
    let text = without_scripts(&page);
    let objects = wait_status(node.http, "a status", |_| true)["store"]["objects"]
        .as_u64()
        .expect("objects");
    assert!(text.contains(cairn::VERSION), "version");
    assert!(text.contains(">ok<"), "health");
    assert!(text.contains(&format!(">{objects}<")), "objects {objects}");
    for words in [
        "CAS hit ratio",
        "AC hit ratio",
        "CRC failures",
        "evictions",
        "received",
        "bytestream",
        "queued actions",
    ] {
        assert!(text.contains(words), "{words}");
    }
    assert!(
        text.contains("not configured"),
        "the S3 section says it is off"
    );
    assert!(text.contains(" / "), "a worker's running / slots");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_s3_down_and_its_backlog() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let dir = temp.path().join("data");
    let grpc = common::free_port();
    let http_addr = common::free_port();
    // Nobody listens on this port: every request to S3 fails.
    let dead = common::free_port();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/fleet-node.json5");
    let mut command = Command::new(common::BINARY);
    command
        .arg("--config")
        .arg(config)
        .env("CAIRN_LISTEN", grpc.to_string())
        .env("CAIRN_HTTP_LISTEN", http_addr.to_string())
        .env("CAIRN_DATA_DIR", &dir)
        .env("CAIRN_MAX_SIZE", "1GiB")
        .env("CAIRN_S3_ENDPOINT", format!("http://{dead}"))
        .env("CAIRN_S3_BUCKET", "status-page")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE");
    let node = Node::spawn(command, grpc, http_addr, dir);
    traffic(&node, 0, 20).await;
    let status = wait_status(node.http, "S3 failing with a backlog", |status| {
        status["s3"]["state"] == "failing"
            && status["s3"]["backlog_bytes"].as_u64().unwrap_or(0) >= 20 * 4096
    });
    assert!(status["s3"]["error"].is_string(), "{status:#}");
    assert_eq!(status["health"]["status"], "degraded");
    assert!(
        status["health"]["reasons"][0]
            .as_str()
            .is_some_and(|reason| reason.contains("S3")),
        "{status:#}"
    );
    let (_, page) = http(node.http, "GET", "/", b"");
    let text = without_scripts(&String::from_utf8(page).expect("UTF-8"));
    assert!(text.contains("failing"), "S3 state");
    assert!(text.contains("replication backlog"));
    assert!(text.contains("S3 unreachable"), "the reason for degraded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_the_page_and_its_data_need_the_metrics_permission() {
    use sha2::Digest as _;
    let temp = tempfile::tempdir().expect("temporary directory");
    let hash = |token: &str| hex::encode(sha2::Sha256::digest(token.as_bytes()));
    let auth = temp.path().join("auth.json5");
    std::fs::write(
        &auth,
        format!(
            "{{ principals: [
                {{ name: 'ops', token_sha256: '{}', permissions: ['metrics'] }},
                {{ name: 'ci', token_sha256: '{}', permissions: ['read', 'write'] }},
            ] }}",
            hash("ops-token"),
            hash("ci-token")
        ),
    )
    .expect("auth file");
    let node = Node::start_in(
        &temp.path().join("data"),
        &["--no-execution", "--auth", auth.to_str().expect("path")],
    );
    for path in ["/", "/status", "/metrics"] {
        let (code, head, _) = http_with_headers(node.http, "GET", path, &[], b"");
        assert_eq!(code, 401, "{path} without credentials");
        assert!(
            head.contains("WWW-Authenticate: Basic") || head.contains("www-authenticate: Basic")
        );
        let ci = [("Authorization", "Bearer ci-token")];
        let (code, _, _) = http_with_headers(node.http, "GET", path, &ci, b"");
        assert_eq!(code, 403, "{path} for a principal without `metrics`");
        let ops = [("Authorization", "Bearer ops-token")];
        let (code, _, body) = http_with_headers(node.http, "GET", path, &ops, b"");
        assert_eq!(code, 200, "{path}: {}", String::from_utf8_lossy(&body));
    }
    let (code, _) = http(node.http, "GET", "/healthz", b"");
    assert_eq!(code, 200, "/healthz stays open");
}

/// The digest and bytes of `message`.
fn encoded(message: &impl Message) -> (cairn_proto::reapi::Digest, Vec<u8>) {
    let bytes = message.encode_to_vec();
    (wire(&sha256(&bytes)), bytes)
}

/// Executes `sh -c script` on the node and returns the response.
async fn execute(node: &Node, script: &str) -> ExecuteResponse {
    let command = ReapiCommand {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    let (command_digest, command_bytes) = encoded(&command);
    let (root_digest, root_bytes) = encoded(&Directory::default());
    let action = Action {
        command_digest: Some(command_digest.clone()),
        input_root_digest: Some(root_digest.clone()),
        ..Default::default()
    };
    let (action_digest, action_bytes) = encoded(&action);
    node.cas()
        .await
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: [
                (command_digest, command_bytes),
                (root_digest, root_bytes),
                (action_digest.clone(), action_bytes),
            ]
            .into_iter()
            .map(|(digest, data)| UpdateRequest {
                digest: Some(digest),
                data: data.into(),
                ..Default::default()
            })
            .collect(),
            ..Default::default()
        })
        .await
        .expect("BatchUpdateBlobs");
    let mut stream = ExecutionClient::new(node.channel().await)
        .execute(ExecuteRequest {
            action_digest: Some(action_digest),
            ..Default::default()
        })
        .await
        .expect("Execute")
        .into_inner();
    while let Some(operation) = stream.message().await.expect("the operation stream") {
        if let Some(cairn_proto::longrunning::operation::Result::Response(any)) = operation.result {
            return ExecuteResponse::decode(any.value.as_slice()).expect("ExecuteResponse");
        }
    }
    panic!("the operation stream ended without a response");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_serves_metrics_status_and_recent_operations_with_exit_codes() {
    let node = Node::start();
    let response = execute(&node, "exit 3").await;
    assert_eq!(response.result.expect("a result").exit_code, 3);
    let response = execute(&node, "true").await;
    assert_eq!(response.result.expect("a result").exit_code, 0);

    let address: std::net::SocketAddr =
        std::fs::read_to_string(node.data_dir.join("scheduler.http"))
            .expect("scheduler.http")
            .trim()
            .parse()
            .expect("the scheduler's HTTP address");
    let (code, metrics) = http(address, "GET", "/metrics", b"");
    assert_eq!(code, 200);
    let metrics = String::from_utf8(metrics).expect("UTF-8");
    for line in [
        "cairn_scheduler_workers 1\n",
        "cairn_scheduler_queue_length 0\n",
        "cairn_scheduler_running_tasks 0\n",
        "cairn_scheduler_dispatched_total 2\n",
        "cairn_scheduler_completed_total{outcome=\"nonzero_exit\"} 1\n",
        "cairn_scheduler_completed_total{outcome=\"success\"} 1\n",
        "cairn_scheduler_dispatch_latency_seconds_count 2\n",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    let (code, health) = http(address, "GET", "/healthz", b"");
    assert_eq!((code, health.starts_with(b"ok\n")), (200, true));

    let status = json(address, "/status");
    assert_eq!(status["version"], cairn::VERSION);
    let recent = status["recent"].as_array().expect("recent");
    assert_eq!(recent.len(), 2, "{status:#}");
    // Newest first.
    assert_eq!(recent[0]["outcome"], "success");
    assert_eq!(recent[0]["exit_code"], 0);
    assert_eq!(recent[1]["outcome"], "nonzero_exit");
    assert_eq!(recent[1]["exit_code"], 3);
    for operation in recent {
        assert!(
            operation["execution_seconds"].as_f64().is_some(),
            "{operation:#}"
        );
        assert!(!operation["worker"].as_str().expect("worker").is_empty());
    }
    let workers = status["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 1);

    let (code, page) = http(address, "GET", "/", b"");
    assert_eq!(code, 200);
    let text = without_scripts(&String::from_utf8(page).expect("UTF-8"));
    assert!(text.contains("cairn scheduler"));
    assert!(text.contains("nonzero_exit"), "recent operations");
    assert!(text.contains("queued actions"));

    // The node's page shows the same, fetched from the scheduler.
    let node_status = wait_status(node.http, "the executions on the node's page", |status| {
        status["execution"]["recent"]
            .as_array()
            .is_some_and(|recent| recent.len() == 2)
    });
    assert_eq!(node_status["execution"]["recent"][1]["exit_code"], 3);
}

/// Where test artifacts go: `target/test-artifacts/`.
fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

/// Runs headless chromium on `url` with `extra` arguments and returns its stdout; fails
/// the test, saying what to install, when chromium is missing.
fn chromium(url: &str, extra: &[&str]) -> String {
    let profile = tempfile::tempdir().expect("a profile directory");
    let mut command = Command::new("chromium");
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = match command.spawn() {
        Ok(child) => child,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => panic!(
            "chromium is not installed: run scripts/install-deps.sh (Debian's `chromium`), \
             which this test needs to load the status page in a real browser"
        ),
        Err(error) => panic!("cannot start chromium: {error}"),
    };
    let pid = child.id() as i32;
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            // A browser that hangs must fail the test, not stall the suite.
            for _ in 0..1200 {
                if done.load(Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            // SAFETY: signalling the chromium process this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        })
    };
    let output = child.wait_with_output().expect("wait for chromium");
    done.store(true, Ordering::Release);
    let _ = watchdog.join();
    assert!(
        output.status.success(),
        "chromium failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// The value of `attribute` on the element whose id is `id`, in serialized `dom`.
fn attribute(dom: &str, id: &str, attribute: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    let tag = &dom[start..end];
    let value = tag.split(&format!(" {attribute}=\"")).nth(1)?;
    Some(value[..value.find('"')?].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_draws_the_charts_of_a_node_under_load() {
    let node = Arc::new(Node::start());
    // Uploads and reads all along, a few hundred before the page loads.
    let running = Arc::new(AtomicBool::new(true));
    let load = {
        let node = Arc::clone(&node);
        let running = Arc::clone(&running);
        tokio::spawn(async move {
            let mut seed = 0;
            while running.load(Ordering::Acquire) {
                traffic(&node, seed, 20).await;
                seed += 20;
            }
        })
    };
    wait_status(node.http, "three points and 200 uploads", |status| {
        status["series"]["time"]
            .as_array()
            .is_some_and(|time| time.len() >= 3)
            && status["traffic"]["requests"]["bytestream"]
                .as_u64()
                .is_some_and(|requests| requests >= 400)
    });
    let url = format!("http://{}/", node.http);
    let dom = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            chromium(&url, &["--virtual-time-budget=10000", "--dump-dom"])
        })
        .await
        .expect("chromium")
    };
    let screenshot = artifacts().join("status.png");
    let _ = std::fs::remove_file(&screenshot);
    {
        let url = url.clone();
        let path = format!("--screenshot={}", screenshot.display());
        tokio::task::spawn_blocking(move || {
            chromium(
                &url,
                &[
                    "--virtual-time-budget=10000",
                    "--hide-scrollbars",
                    "--window-size=1280,1600",
                    &path,
                ],
            )
        })
        .await
        .expect("chromium");
    }
    running.store(false, Ordering::Release);
    load.await.expect("the load");

    for chart in [
        "chart-hits",
        "chart-bytes",
        "chart-requests",
        "chart-used",
        "chart-evictions",
        "chart-queue",
    ] {
        let points: usize = attribute(&dom, chart, "data-points")
            .unwrap_or_else(|| panic!("{chart} was never drawn:\n{dom}"))
            .parse()
            .expect("a count");
        assert!(points >= 2, "{chart} drew {points} points");
    }
    let updates: usize = dom
        .split("<body data-updates=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("the page never applied a fetched /status:\n{dom}"))
        .parse()
        .expect("a count");
    assert!(updates >= 1);
    assert!(dom.contains("live, updated"), "{dom}");
    let png = std::fs::read(&screenshot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    assert!(png.len() > 10_000, "a screenshot of a drawn page");
}
