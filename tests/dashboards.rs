//! The Grafana dashboard (config/grafana/cairn.json) and the Prometheus alert rules
//! (config/prometheus/alerts.yml): the rules pass `promtool check rules`, and every
//! metric either names exists in the `/metrics` of a running node (with an S3 slow
//! tier, so its metrics are there too) and a running `cairn-scheduler`. A renamed
//! metric would otherwise leave a dashboard panel empty and an alert silent.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_proto::reapi::{FindMissingBlobsRequest, GetActionResultRequest};
use common::{http, read_name, sha256, upload_name, wire, Node};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every `cairn_...` metric name in `text`.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("cairn_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// The names of the samples in a Prometheus text exposition.
fn served(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let output = match Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(repo("config/prometheus/alerts.yml"))
        .output()
    {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not installed: run scripts/install-deps.sh (Debian's `prometheus` \
             package provides it)"
        ),
        Err(error) => panic!("cannot run promtool: {error}"),
    };
    assert!(
        output.status.success(),
        "promtool check rules failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_dashboard_is_templated_on_instance_and_every_panel_has_a_query() {
    let text = std::fs::read_to_string(repo("config/grafana/cairn.json")).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("template variables");
    assert!(variables.iter().any(|v| v["name"] == "instance"));
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queries = 0;
    for panel in panels.iter().filter(|panel| panel["type"] != "row") {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            assert!(
                expr.contains("$instance"),
                "{expr} ignores the instance choice"
            );
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} queries");
}

/// Polls `GET /healthz` at `addr` until it answers 200 (at most 30 s).
fn wait_healthy(addr: SocketAddr, process: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = process.try_wait() {
            panic!("cairn-scheduler exited: {status}");
        }
        assert!(Instant::now() < deadline, "cairn-scheduler did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(http(addr, "GET", "/healthz", b"").0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_dashboard_and_the_rules_is_served() {
    // A node with a slow tier whose S3 nobody serves: its S3 metrics are there, at 0.
    let temp = tempfile::tempdir().expect("temporary directory");
    let dir = temp.path().join("data");
    let grpc = common::free_port();
    let http_addr = common::free_port();
    let dead = common::free_port();
    let mut command = Command::new(common::BINARY);
    command
        .arg("--config")
        .arg(repo("config/fleet-node.json5"))
        .env("CAIRN_LISTEN", grpc.to_string())
        .env("CAIRN_HTTP_LISTEN", http_addr.to_string())
        .env("CAIRN_DATA_DIR", &dir)
        .env("CAIRN_MAX_SIZE", "1GiB")
        .env("CAIRN_S3_ENDPOINT", format!("http://{dead}"))
        .env("CAIRN_S3_BUCKET", "dashboards")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE");
    let node = Node::spawn(command, grpc, http_addr, dir);
    // Labelled counters appear once counted: a request, a hit and a miss of each store.
    let data = common::blob(1, 1000);
    let digest = sha256(&data);
    let mut bytestream = node.bytestream().await;
    common::write_blob(&mut bytestream, &upload_name("", &digest), &data)
        .await
        .expect("upload");
    common::read_blob(&mut bytestream, &read_name("", &digest), 0, 0)
        .await
        .expect("read");
    node.cas()
        .await
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![wire(&digest), wire(&sha256(b"missing"))],
            ..Default::default()
        })
        .await
        .expect("FindMissingBlobs");
    let _ = node
        .ac()
        .await
        .get_action_result(GetActionResultRequest {
            action_digest: Some(wire(&digest)),
            ..Default::default()
        })
        .await;

    let scheduler_http = common::free_port();
    let mut scheduler = Command::new(common::exec_binary(common::SCHEDULER))
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--http-listen")
        .arg(scheduler_http.to_string())
        .arg("--cache")
        .arg(format!("http://{}", node.grpc))
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .spawn()
        .expect("start cairn-scheduler");
    wait_healthy(scheduler_http, &mut scheduler);
    let (_, scheduler_metrics) = http(scheduler_http, "GET", "/metrics", b"");
    let _ = scheduler.kill();
    let _ = scheduler.wait();
    let (code, node_metrics) = http(node.http, "GET", "/metrics", b"");
    assert_eq!(code, 200);

    let mut available = served(&String::from_utf8_lossy(&node_metrics));
    available.extend(served(&String::from_utf8_lossy(&scheduler_metrics)));
    for file in ["config/grafana/cairn.json", "config/prometheus/alerts.yml"] {
        let used = names_in(&std::fs::read_to_string(repo(file)).expect(file));
        assert!(used.len() >= 8, "{file} names {used:?}");
        let missing: Vec<&String> = used.difference(&available).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics nothing serves: {missing:?}\nserved: {available:?}"
        );
    }
    let rules = std::fs::read_to_string(repo("config/prometheus/alerts.yml")).expect("rules");
    for needed in [
        "cairn_s3_up",
        "cairn_replication_backlog_bytes",
        "cairn_partition_crc_failures",
        "cairn_partition_budget_bytes",
        "cairn_lookups_total",
        "cairn_scheduler_worker_slots",
        "cairn_scheduler_queue_length",
    ] {
        assert!(
            names_in(&rules).contains(needed),
            "no rule watches {needed}"
        );
    }
}

#[test]
fn metric_names_are_found_in_expressions() {
    let names = names_in(
        "sum by (instance) (rate(cairn_lookups_total{store=\"cas\"}[5m])) / x_cairn_no + cairn_s3_up",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        vec!["cairn_lookups_total", "cairn_s3_up"]
    );
}
