//! The node as a process: configs, the HTTP listener, garbage on the wire, clean
//! shutdown on SIGTERM and crash consistency under SIGKILL.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use cairn_proto::bytestream::ReadRequest;
use cairn_proto::reapi::{FindMissingBlobsRequest, GetCapabilitiesRequest};
use common::{
    blob, free_port, http, read_blob, read_name, sha256, upload_name, wait_committed, wire,
    write_blob, Node, Tmpfs,
};
use tokio_stream::wrappers::ReceiverStream;

#[test]
fn http_cache_protocol_metrics_and_health() {
    let node = Node::start();
    let data = blob(40, 100_000);
    let hash = sha256(&data).hash_hex();
    assert_eq!(http(node.http, "GET", "/healthz", b"").0, 200);
    assert_eq!(http(node.http, "GET", &format!("/cas/{hash}"), b"").0, 404);
    assert_eq!(
        http(node.http, "PUT", &format!("/cas/{hash}"), &data).0,
        200
    );
    let (status, body) = http(node.http, "GET", &format!("/cas/{hash}"), b"");
    assert_eq!((status, body.len()), (200, data.len()));
    assert_eq!(body, data);
    assert_eq!(http(node.http, "HEAD", &format!("/cas/{hash}"), b"").0, 200);
    let wrong = sha256(b"other").hash_hex();
    assert_eq!(
        http(node.http, "PUT", &format!("/cas/{wrong}"), &data).0,
        400
    );
    assert_eq!(http(node.http, "GET", "/cas/not-a-hash", b"").0, 400);
    assert_eq!(
        http(node.http, "DELETE", &format!("/cas/{hash}"), b"").0,
        405
    );

    let result = cairn_proto::reapi::ActionResult {
        output_files: vec![cairn_proto::reapi::OutputFile {
            path: "out".into(),
            digest: Some(wire(&sha256(&data))),
            ..Default::default()
        }],
        ..Default::default()
    };
    let encoded = prost::Message::encode_to_vec(&result);
    let action = sha256(b"an action").hash_hex();
    assert_eq!(
        http(node.http, "PUT", &format!("/team/ac/{action}"), &encoded).0,
        200
    );
    let (status, body) = http(node.http, "GET", &format!("/team/ac/{action}"), b"");
    assert_eq!((status, body), (200, encoded));
    assert_eq!(http(node.http, "GET", &format!("/ac/{action}"), b"").0, 404);
    assert_eq!(
        http(node.http, "PUT", &format!("/ac/{action}"), b"\xff\xff").0,
        400
    );

    let (status, metrics) = http(node.http, "GET", "/metrics", b"");
    let metrics = String::from_utf8(metrics).unwrap();
    assert_eq!(status, 200);
    for name in [
        "cairn_requests_total",
        "cairn_lookups_total",
        "cairn_received_bytes_total",
        "cairn_partition_used_bytes",
        "cairn_shard_queue_depth",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}

/// Sends one HTTP/1.1 request on a kept-alive connection and reads its response by
/// Content-Length; returns the status and the body.
fn keep_alive_request(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: cairn\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .expect("send the request head");
    stream.write_all(body).expect("send the whole body");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("a response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status code");
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .expect("a Content-Length");
    let mut response = vec![0u8; length];
    stream.read_exact(&mut response).expect("the response body");
    (status, response)
}

/// Bazel sends every output with PUT on a few kept-alive connections. A PUT answered
/// before its body was read (blob already stored, or refused) used to close the
/// connection under the client, which Bazel reports as a failed cache write.
#[test]
fn http_put_answers_without_dropping_the_connection() {
    let node = Node::start();
    let data = blob(41, 3 << 20);
    let hash = sha256(&data).hash_hex();
    let wrong = sha256(b"other").hash_hex();
    let mut stream = TcpStream::connect(node.http).expect("connect to the HTTP listener");
    let path = format!("/cas/{hash}");
    assert_eq!(keep_alive_request(&mut stream, "PUT", &path, &data).0, 200);
    assert_eq!(keep_alive_request(&mut stream, "PUT", &path, &data).0, 200);
    let refused = format!("/cas/{wrong}");
    assert_eq!(
        keep_alive_request(&mut stream, "PUT", &refused, &data).0,
        400
    );
    let (status, body) = keep_alive_request(&mut stream, "GET", &path, b"");
    assert_eq!(status, 200);
    assert!(body == data, "the blob read back differs from the one put");
    assert_eq!(keep_alive_request(&mut stream, "GET", &refused, b"").0, 404);
}

#[tokio::test]
async fn garbage_on_the_port_does_not_hurt_the_node() {
    let node = Node::start();
    for garbage in [
        &b"\x00\x01\x02 this is not HTTP/2 at all"[..],
        b"GET / HTTP/1.1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        &[0xAB; 100_000],
    ] {
        let mut stream = TcpStream::connect(node.grpc).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let _ = stream.write_all(garbage);
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    }
    let mut http_garbage = TcpStream::connect(node.http).unwrap();
    let _ = http_garbage.write_all(b"\x16\x03\x01 not a request\r\n\r\n");
    let mut capabilities = node.capabilities().await;
    capabilities
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .expect("the node still serves after garbage");
    assert_eq!(http(node.http, "GET", "/healthz", b"").0, 200);
}

/// Per-shard open connections, from the node's /metrics.
fn connections_per_shard(node: &Node) -> Vec<u64> {
    let (status, body) = http(node.http, "GET", "/metrics", b"");
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    let mut counts: Vec<(usize, u64)> = text
        .lines()
        .filter_map(|line| line.strip_prefix("cairn_shard_connections{shard=\""))
        .filter_map(|rest| {
            let (shard, value) = rest.split_once("\"} ")?;
            Some((shard.parse().ok()?, value.trim().parse().ok()?))
        })
        .collect();
    counts.sort_unstable();
    counts.into_iter().map(|(_, open)| open).collect()
}

/// Which shard accepts a connection is blind to load, so a client's few connections
/// often all landed on one core. They must end up evenly spread, and the
/// ones handed to another shard must serve like any other.
#[tokio::test]
async fn connections_pile_onto_one_shard() {
    let temp = tempfile::tempdir().unwrap();
    let node = Node::start_in(&temp.path().join("data"), &["--shards", "2"]);
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut client = node.capabilities().await;
        client
            .get_capabilities(GetCapabilitiesRequest::default())
            .await
            .expect("a new connection serves");
        clients.push(client);
    }
    // 8 gRPC connections and the one reading /metrics; connections closed earlier
    // (the readiness probe) leave the count as their tasks end.
    let deadline = Instant::now() + Duration::from_secs(10);
    let counts = loop {
        let counts = connections_per_shard(&node);
        if counts.iter().sum::<u64>() == 9 || Instant::now() > deadline {
            break counts;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(counts.len(), 2, "one gauge per shard: {counts:?}");
    assert_eq!(
        counts.iter().sum::<u64>(),
        9,
        "open connections: {counts:?}"
    );
    assert!(
        counts.iter().all(|&open| open == 4 || open == 5),
        "connections are not spread evenly: {counts:?}"
    );
    for client in &mut clients {
        client
            .get_capabilities(GetCapabilitiesRequest::default())
            .await
            .expect("every connection still serves");
    }
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_keeps_the_data() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let node = Node::start_in(&dir, &[]);
    let data = blob(41, 700_000);
    let digest = sha256(&data);
    let mut client = node.bytestream().await;
    write_blob(&mut client, &upload_name("", &digest), &data)
        .await
        .unwrap();
    drop(client);
    let status = node.terminate();
    assert!(status.success(), "cairn exited with {status}");

    let node = Node::start_in(&dir, &[]);
    // The stop wrote checkpoints covering everything: the restart loaded the blob from
    // them and scanned nothing.
    assert!(node.metric_sum(FROM_CHECKPOINT) >= 1.0);
    assert_eq!(node.metric_sum(SCANNED), 0.0);
    let mut client = node.bytestream().await;
    let read = read_blob(&mut client, &read_name("", &digest), 0, 0)
        .await
        .unwrap();
    assert_eq!(read, data);
}

/// Index entries the start-up recovery loaded from checkpoints.
const FROM_CHECKPOINT: &str = "cairn_recovery_records{source=\"checkpoint\"}";
/// Records the start-up recovery found by scanning segments past the checkpoints.
const SCANNED: &str = "cairn_recovery_records{source=\"scan\"}";

/// A stop signal in the middle of a Write and a Read: the node stops accepting
/// connections at once, lets both streams finish, exits 0, and keeps what they stored.
async fn a_stop_signal_lets_a_write_and_a_read_finish(signal: i32) {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    // The grace period is made long enough that no machine is too slow for the
    // streams to finish within it: the outcome, not the speed, is under test.
    let config = temp.path().join("grace.json5");
    std::fs::write(&config, "{ shutdown_grace_seconds: 600 }").unwrap();
    let config = config.to_str().unwrap();
    let node = Node::start_in(&dir, &["--no-execution", "--config", config]);
    // Larger than every flow-control window between the node and the client, so the
    // read is still in progress when the signal arrives.
    let stored = blob(70 + signal as u64, 48 << 20);
    let stored_digest = sha256(&stored);
    let mut client = node.bytestream().await;
    write_blob(&mut client, &upload_name("", &stored_digest), &stored)
        .await
        .unwrap();
    let mut reading = client
        .read(ReadRequest {
            resource_name: read_name("", &stored_digest),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut read = reading.message().await.unwrap().unwrap().data.to_vec();

    let uploading = blob(80 + signal as u64, 3 << 20);
    let uploading_digest = sha256(&uploading);
    let name = upload_name("", &uploading_digest);
    let mut requests = common::write_requests(&name, &uploading, 64 << 10).into_iter();
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    let mut writer = node.bytestream().await;
    let call = tokio::spawn(async move { writer.write(ReceiverStream::new(receiver)).await });
    for request in requests.by_ref().take(4) {
        sender.send(request).await.unwrap();
    }
    wait_committed(&node, &name, 4 * (64 << 10)).await;

    node.signal(signal);
    let mut refused = false;
    for _ in 0..2000 {
        if TcpStream::connect(node.grpc).is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        refused,
        "new connections were still accepted after the signal"
    );

    for request in requests {
        sender.send(request).await.unwrap();
    }
    drop(sender);
    let committed = call.await.unwrap().expect("the write in flight finishes");
    assert_eq!(
        committed.into_inner().committed_size,
        uploading.len() as i64
    );
    while let Some(response) = reading
        .message()
        .await
        .expect("the read in flight finishes")
    {
        read.extend_from_slice(&response.data);
    }
    assert!(read == stored, "the read in flight returned other bytes");
    drop((client, reading));
    let status = node.wait();
    assert!(status.success(), "cairn exited with {status}");

    let node = Node::start_in(&dir, &["--no-execution"]);
    // The stop wrote checkpoints covering everything: the restart loaded both blobs
    // from them and scanned nothing.
    assert!(node.metric_sum(FROM_CHECKPOINT) >= 2.0);
    assert_eq!(node.metric_sum(SCANNED), 0.0);
    let mut client = node.bytestream().await;
    for (digest, data) in [(uploading_digest, &uploading), (stored_digest, &stored)] {
        let again = read_blob(&mut client, &read_name("", &digest), 0, 0)
            .await
            .unwrap();
        assert!(again == *data, "a blob was lost across the stop");
    }
    assert!(node.terminate().success());
}

// These two guard the lingering close (src/runtime/linger.rs): before it, about one
// run in five cut the read short with "connection reset", the node having closed the
// socket with the client's WINDOW_UPDATE frames unread while the tail of the response
// was still in its send queue.
#[tokio::test]
async fn sigterm_lets_a_write_and_a_read_finish() {
    a_stop_signal_lets_a_write_and_a_read_finish(libc::SIGTERM).await;
}

#[tokio::test]
async fn sigint_lets_a_write_and_a_read_finish() {
    a_stop_signal_lets_a_write_and_a_read_finish(libc::SIGINT).await;
}

/// Without `--max-size` the budget is 90% of the space available to the data
/// directory. Measured on a tmpfs of its own, whose free space nothing else changes.
#[tokio::test]
async fn the_default_budget_is_ninety_percent_of_the_space() {
    let tmpfs = Tmpfs::mount(1024);
    let grpc = free_port();
    let http_addr = free_port();
    let dir = tmpfs.path.join("data");
    let mut command = Command::new(common::BINARY);
    command
        .args(["--no-execution", "--listen", &grpc.to_string()])
        .args(["--http-listen", &http_addr.to_string()])
        .args(["--data-dir", dir.to_str().unwrap()]);
    let node = Node::spawn(command, grpc, http_addr, dir);
    let budget = node.metric_sum("cairn_partition_budget_bytes");
    let expected = 0.9 * 1024.0 * 1024.0 * 1024.0;
    assert!(
        (budget - expected).abs() < expected * 0.01,
        "budget {budget} bytes, expected 90% of 1 GiB"
    );
    assert!(node.terminate().success());
}

#[tokio::test]
async fn sigkill_mid_upload_loses_nothing_acknowledged() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let node = Node::start_in(&dir, &[]);
    let mut client = node.bytestream().await;
    let mut acknowledged = Vec::new();
    for seed in 0..8 {
        let data = blob(50 + seed, 10_000 + seed as usize * 50_000);
        let digest = sha256(&data);
        write_blob(&mut client, &upload_name("", &digest), &data)
            .await
            .unwrap();
        acknowledged.push((digest, data));
    }
    let interrupted = blob(99, 1 << 20);
    let interrupted_digest = sha256(&interrupted);
    let name = upload_name("", &interrupted_digest);
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    let mut writer = node.bytestream().await;
    let call = tokio::spawn(async move { writer.write(ReceiverStream::new(receiver)).await });
    for request in common::write_requests(&name, &interrupted, 64 << 10)
        .into_iter()
        .take(4)
    {
        sender.send(request).await.unwrap();
    }
    wait_committed(&node, &name, 4 * (64 << 10)).await;
    node.kill();
    drop(sender);
    let _ = call.await;

    let node = Node::start_in(&dir, &[]);
    // No checkpoint was written after these blobs: the restart found them by scanning.
    assert!(node.metric_sum(SCANNED) >= acknowledged.len() as f64);
    let mut client = node.bytestream().await;
    for (digest, data) in &acknowledged {
        let read = read_blob(&mut client, &read_name("", digest), 0, 0)
            .await
            .unwrap();
        assert_eq!(&read, data);
    }
    let missing = node
        .cas()
        .await
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![wire(&interrupted_digest)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(
        missing.len(),
        1,
        "the interrupted upload must not be visible"
    );
}

#[tokio::test]
async fn the_example_config_starts() {
    let temp = tempfile::tempdir().unwrap();
    let grpc = free_port();
    let http_addr = free_port();
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/config/single-node.json5");
    let mut command = Command::new(common::BINARY);
    command
        .env("CAIRN_DATA", temp.path().join("data"))
        .args(["--config", config])
        .args(["--listen", &grpc.to_string()])
        .args(["--http-listen", &http_addr.to_string()]);
    let node = Node::spawn(command, grpc, http_addr, temp.path().join("data"));
    let capabilities = node
        .capabilities()
        .await
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        capabilities
            .cache_capabilities
            .unwrap()
            .max_batch_total_size_bytes,
        4 << 20
    );
    assert_eq!(http(node.http, "GET", "/healthz", b"").0, 200);
    // `max_size: "20GiB"` in the file, where the default is 90% of the disk.
    // Each partition gets a whole share, so a few bytes may be left over. On a disk
    // with less room the node lowers it, and says by how much.
    let budget = node.metric_sum("cairn_partition_budget_bytes")
        + node.metric_sum("cairn_budget_clamped_bytes");
    let configured = (20u64 << 30) as f64;
    assert!(
        budget <= configured && budget > configured - 4096.0,
        "budget {budget}: not the 20GiB of config/single-node.json5"
    );
    assert!(node.terminate().success());
}

/// A second node started on a port already served must fail loudly. With a socket per
/// shard bound with SO_REUSEPORT it started and silently took a share of the first
/// node's connections.
#[test]
fn a_second_node_on_the_same_port_shares_it() {
    let first = Node::start();
    let temp = tempfile::tempdir().unwrap();
    let mut second = Command::new(common::BINARY)
        .args(["--no-execution", "--listen", &first.grpc.to_string()])
        .args(["--http-listen", &free_port().to_string()])
        .args(["--data-dir", temp.path().join("data").to_str().unwrap()])
        .args(["--max-size", "1GiB"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Before the fix the second node served on; it must be gone by the deadline.
    let deadline = Instant::now() + Duration::from_secs(30);
    while second.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second node started on {} and kept running", first.grpc);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "the second node started:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("cannot listen on {}", first.grpc)),
        "{stderr}"
    );
    assert!(stderr.contains("in use"), "{stderr}");
}

#[test]
fn bad_configs_and_flags_fail_with_a_message() {
    let temp = tempfile::tempdir().unwrap();
    let config = temp.path().join("typo.json5");
    std::fs::write(&config, "{ lisen: '127.0.0.1:1' }").unwrap();
    let output = Command::new(common::BINARY)
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("lisen"));

    let output = Command::new(common::BINARY)
        .args(["--max-size", "lots"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a size"));

    let output = Command::new(common::BINARY).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--config",
        "--listen",
        "--http-listen",
        "--data-dir",
        "--max-size",
        "--shards",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

/// The pids whose parent is `parent`, with their command names, from /proc.
fn children_of(parent: i32) -> Vec<(i32, String)> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after its `)`.
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let ppid = rest
            .split_whitespace()
            .nth(1)
            .and_then(|ppid| ppid.parse().ok());
        if ppid == Some(parent) {
            let comm = head.split_once(" (").map(|(_, comm)| comm.to_string());
            children.push((pid, comm.unwrap_or_default()));
        }
    }
    children
}

fn alive(pid: i32) -> bool {
    // A zombie still has a /proc entry; count it as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// A node with execution runs a scheduler and a worker as its children; they must not
/// outlive it, whether it stops on a signal or is killed outright.
fn the_children_end_with_the_node(kill: bool) {
    let node = Node::start();
    let mut children = Vec::new();
    for _ in 0..1000 {
        children = children_of(node.pid());
        if children.len() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let names: Vec<&str> = children.iter().map(|(_, name)| name.as_str()).collect();
    assert!(
        names.contains(&"cairn-scheduler") && names.contains(&"cairn-worker"),
        "children of the node: {names:?}"
    );
    if kill {
        node.kill();
    } else {
        assert!(node.terminate().success());
    }
    for (pid, name) in children {
        let mut gone = false;
        for _ in 0..3000 {
            if !alive(pid) {
                gone = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if !gone {
            // SAFETY: killing the leftover so that the test leaves nothing behind.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{name} ({pid}) outlived the node");
        }
    }
}

#[test]
fn the_children_end_after_sigterm_of_the_node() {
    the_children_end_with_the_node(false);
}

#[test]
fn the_children_end_after_sigkill_of_the_node() {
    the_children_end_with_the_node(true);
}
