//! The S3 slow tier against a real S3-protocol server (moto) on loopback.
//!
//! Every test starts its own `moto_server` on an ephemeral port and one or more
//! `cairn` nodes from `config/fleet-node.json5`, each with its own data directory and
//! the same bucket. Readiness and progress are observed by polling (the node's
//! `/metrics`, the bucket's listing), never by sleeping for a fixed time. moto keeps
//! its state in memory, so "S3 restarted" is a fresh, empty server on the same port.
//! moto's request log on stderr is how the tests count requests made to S3.
//!
//! The server is moto, pinned by scripts/install-deps.sh to a version whose answers the
//! AWS SDK accepts (moto 5.2 answers CompleteMultipartUpload with a root element the
//! SDK rejects; the multipart test fails against it). When `moto_server` is not
//! installed every test fails saying so, unless `CAIRN_SKIP_S3` is set.
//!
//! Every test ends by stopping its nodes with SIGTERM and asserting a clean exit.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
use bytes::Bytes;
use cairn_proto::bytestream::ReadRequest;
use cairn_proto::reapi::batch_update_blobs_request::Request as UpdateRequest;
use cairn_proto::reapi::{
    ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, FindMissingBlobsRequest,
    GetActionResultRequest, OutputFile, UpdateActionResultRequest,
};
use cairn_storage::Digest;
use common::{blob, free_port, read_blob, read_name, sha256, upload_name, wire, write_blob, Node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const BUCKET: &str = "cairn-test";
const PREFIX: &str = "cairn/";
const WAIT: Duration = Duration::from_secs(120);

/// A moto server this test started, killed (by its own PID) on drop.
struct Moto {
    child: Option<Child>,
    addr: SocketAddr,
    log: PathBuf,
    /// Environment of the server process (moto's own settings).
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

/// A moto server stopped with SIGSTOP: it keeps its connections open and answers
/// nothing. Dropping the guard (also when the test panics) resumes it.
struct Paused<'a> {
    moto: &'a Moto,
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.moto.signal(libc::SIGCONT);
    }
}

impl Moto {
    /// Starts moto. When it is not installed the test fails, unless `CAIRN_SKIP_S3`
    /// is set: then it returns `None` (after saying so) and the test passes without
    /// having run, which must never happen unnoticed in CI.
    async fn start() -> Option<Moto> {
        Moto::start_with(&[]).await
    }

    /// Starts moto with `env` set in its environment.
    async fn start_with(env: &[(&str, &str)]) -> Option<Moto> {
        if Command::new("moto_server")
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            let why = "moto_server is not installed (scripts/install-deps.sh installs the \
                       pinned moto[server])";
            if std::env::var_os("CAIRN_SKIP_S3").is_some() {
                eprintln!("skipping, as CAIRN_SKIP_S3 asks: {why}");
                return None;
            }
            panic!("{why}; set CAIRN_SKIP_S3=1 to skip the S3 tests");
        }
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut moto = Moto {
            child: None,
            addr: free_port(),
            log: dir.path().join("moto.log"),
            env: env
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
            _dir: dir,
        };
        moto.run().await;
        Some(moto)
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts the server process on `addr` and creates the bucket.
    async fn run(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("moto log");
        let child = Command::new("moto_server")
            .arg("-H")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.addr.port().to_string())
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("moto log"))
            .stderr(log)
            .spawn()
            .expect("start moto_server");
        self.child = Some(child);
        let s3 = client(&self.endpoint());
        let deadline = Instant::now() + WAIT;
        while s3.list_buckets().send().await.is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("moto_server exited: {status}");
            }
            assert!(Instant::now() < deadline, "moto_server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s3.create_bucket()
            .bucket(BUCKET)
            .send()
            .await
            .expect("create the bucket");
    }

    /// Stops the server with SIGSTOP until the guard is dropped.
    fn pause(&self) -> Paused<'_> {
        self.signal(libc::SIGSTOP);
        Paused { moto: self }
    }

    fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: signalling our own child process, which has not been reaped.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    fn stop(&mut self) {
        self.signal(libc::SIGCONT);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// GET requests moto has served so far for the object `key`.
    fn gets(&self, key: &str) -> usize {
        let request = format!("\"GET /{BUCKET}/{key}");
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(&request))
            .count()
    }

    /// Requests moto has served so far (one log line each).
    fn requests(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(" HTTP/1.1\""))
            .count()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An S3 client of the test's own, to look into and tamper with the bucket.
fn client(endpoint: &str) -> aws_sdk_s3::Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .http_client(http)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

fn blob_key(digest: &Digest) -> String {
    format!("{PREFIX}cas/sha256/{}-{}", digest.hash_hex(), digest.size)
}

/// Every key in the bucket.
async fn bucket_keys(s3: &aws_sdk_s3::Client) -> HashSet<String> {
    let mut keys = HashSet::new();
    let mut token = None;
    loop {
        let Ok(page) = s3
            .list_objects_v2()
            .bucket(BUCKET)
            .set_continuation_token(token)
            .send()
            .await
        else {
            return keys;
        };
        keys.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(String::from)),
        );
        match page.next_continuation_token() {
            Some(next) => token = Some(next.to_string()),
            None => return keys,
        }
    }
}

/// Waits until the bucket holds every blob of `digests`.
async fn wait_in_bucket(s3: &aws_sdk_s3::Client, digests: &[Digest]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let keys = bucket_keys(s3).await;
        let missing = digests
            .iter()
            .filter(|d| !keys.contains(&blob_key(d)))
            .count();
        if missing == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} blobs never reached the bucket"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts a node from the fleet config on `dir`.
fn fleet_node(moto: &Moto, dir: &Path) -> Node {
    fleet_node_of_size(moto, dir, "4GiB")
}

/// Starts a node from the fleet config on `dir` with a local budget of `max_size`.
fn fleet_node_of_size(moto: &Moto, dir: &Path, max_size: &str) -> Node {
    let grpc = free_port();
    let http = free_port();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/fleet-node.json5");
    let mut command = Command::new(common::BINARY);
    command
        .arg("--config")
        .arg(config)
        .env("CAIRN_LISTEN", grpc.to_string())
        .env("CAIRN_HTTP_LISTEN", http.to_string())
        .env("CAIRN_DATA_DIR", dir)
        .env("CAIRN_MAX_SIZE", max_size)
        .env("CAIRN_S3_ENDPOINT", moto.endpoint())
        .env("CAIRN_S3_BUCKET", BUCKET)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE");
    Node::spawn(command, grpc, http, dir.to_path_buf())
}

/// An HTTP GET on the node's admin listener: (status line, body).
async fn http_get(node: &Node, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(node.http)
        .await
        .expect("connect to the HTTP listener");
    let request = format!("GET {path} HTTP/1.1\r\nHost: cairn\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, body.to_string())
}

/// The sum of every sample of metric `name` whose labels contain `labels`.
async fn metric(node: &Node, name: &str, labels: &str) -> u64 {
    let (_, body) = http_get(node, "/metrics").await;
    body.lines()
        .filter(|line| line.contains(labels))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| *series == name || series.starts_with(&format!("{name}{{")))
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .map(|value| value as u64)
        .sum()
}

/// Waits until `check` holds for the metric.
async fn wait_metric(node: &Node, name: &str, labels: &str, check: impl Fn(u64) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = metric(node, name, labels).await;
        if check(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels} stayed at {value}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops `node` with SIGTERM and asserts that it exited cleanly.
fn assert_clean_exit(node: Node) {
    let status = node.terminate();
    assert!(status.success(), "cairn exited with {status}");
}

/// Stores small blobs through BatchUpdateBlobs.
async fn put_blobs(node: &Node, blobs: &[Vec<u8>]) -> Vec<Digest> {
    for answer in try_put_blobs(node, blobs).await {
        assert_eq!(
            answer.map_err(|(code, _)| code),
            Ok(()),
            "a blob was refused"
        );
    }
    blobs.iter().map(|data| sha256(data)).collect()
}

/// Stores small blobs through BatchUpdateBlobs: for each, the code and message it was
/// refused with, if it was.
async fn try_put_blobs(node: &Node, blobs: &[Vec<u8>]) -> Vec<Result<(), (Code, String)>> {
    let mut cas = node.cas().await;
    let response = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: blobs
                .iter()
                .map(|data| UpdateRequest {
                    digest: Some(wire(&sha256(data))),
                    data: Bytes::copy_from_slice(data),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .await
        .expect("BatchUpdateBlobs")
        .into_inner();
    assert_eq!(response.responses.len(), blobs.len());
    response
        .responses
        .into_iter()
        .map(|answer| match answer.status {
            Some(status) if status.code != 0 => Err((Code::from(status.code), status.message)),
            _ => Ok(()),
        })
        .collect()
}

/// Reads blobs through BatchReadBlobs: the data of each, or the error code.
async fn get_blobs(node: &Node, digests: &[Digest]) -> Vec<Result<Vec<u8>, i32>> {
    let mut cas = node.cas().await;
    let response = cas
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: digests.iter().map(wire).collect(),
            ..Default::default()
        })
        .await
        .expect("BatchReadBlobs")
        .into_inner();
    response
        .responses
        .into_iter()
        .map(|answer| match answer.status.map_or(0, |s| s.code) {
            0 => Ok(answer.data.to_vec()),
            code => Err(code),
        })
        .collect()
}

async fn find_missing(node: &Node, digests: &[Digest]) -> Vec<Digest> {
    let mut cas = node.cas().await;
    let response = cas
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: digests.iter().map(wire).collect(),
            ..Default::default()
        })
        .await
        .expect("FindMissingBlobs")
        .into_inner();
    response
        .missing_blob_digests
        .iter()
        .map(|d| {
            Digest::from_hex(
                cairn_storage::DigestFunction::Sha256,
                &d.hash,
                d.size_bytes as u64,
            )
            .expect("digest")
        })
        .collect()
}

/// Stores `data` through the node's ByteStream.
/// Writes `data` through a node of its own at `dir`, waits until it is in the bucket and
/// stops that node: afterwards the blob is only in S3.
async fn only_in_the_bucket(moto: &Moto, dir: &Path, data: &[u8]) -> Digest {
    let node = fleet_node(moto, dir);
    let digest = put_stream(&node, data).await;
    wait_in_bucket(&client(&moto.endpoint()), &[digest]).await;
    assert_clean_exit(node);
    digest
}

async fn put_stream(node: &Node, data: &[u8]) -> Digest {
    let digest = sha256(data);
    let mut bytestream = node.bytestream().await;
    let committed = write_blob(&mut bytestream, &upload_name("", &digest), data)
        .await
        .expect("ByteStream Write");
    assert_eq!(committed as usize, data.len());
    digest
}

/// Reads a whole blob through ByteStream, counting what arrives before the stream
/// ends: the byte count and the error it ended with, if any.
async fn read_counting(node: &Node, digest: &Digest) -> (usize, Option<tonic::Status>) {
    let mut bytestream = node.bytestream().await;
    let mut stream = match bytestream
        .read(ReadRequest {
            resource_name: read_name("", digest),
            read_offset: 0,
            read_limit: 0,
        })
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return (0, Some(status)),
    };
    let mut received = 0;
    loop {
        match stream.message().await {
            Ok(Some(response)) => received += response.data.len(),
            Ok(None) => return (received, None),
            Err(status) => return (received, Some(status)),
        }
    }
}

fn small_blobs(seed: u64, count: usize) -> Vec<Vec<u8>> {
    (0..count as u64)
        .map(|i| blob(seed + i, 1000 + i as usize))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_sharing_a_bucket_serve_each_others_blobs_and_action_results() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let s3 = client(&moto.endpoint());
    let temp = tempfile::tempdir().expect("temporary directory");
    let a = fleet_node(&moto, &temp.path().join("a"));

    let blobs = small_blobs(100, 20);
    let digests = put_blobs(&a, &blobs).await;
    let large = blob(7, (64 << 20) + (3 << 20) + 17);
    let large_digest = sha256(&large);
    let mut bytestream = a.bytestream().await;
    let committed = write_blob(&mut bytestream, &upload_name("", &large_digest), &large)
        .await
        .expect("upload the large blob");
    assert_eq!(committed as usize, large.len());
    let action = sha256(b"an action");
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: "out".into(),
            digest: Some(wire(&digests[0])),
            ..Default::default()
        }],
        ..Default::default()
    };
    a.ac()
        .await
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(wire(&action)),
            action_result: Some(result.clone()),
            ..Default::default()
        })
        .await
        .expect("UpdateActionResult");

    let mut all = digests.clone();
    all.push(large_digest);
    wait_in_bucket(&s3, &all).await;
    // The object can be in the bucket while its upload failed: a server may store it
    // and then answer CompleteMultipartUpload in a way the SDK rejects. The upload
    // completed only when nothing is left to upload and no attempt failed.
    wait_metric(&a, "cairn_replication_backlog_bytes", "", |n| n == 0).await;
    assert_eq!(metric(&a, "cairn_s3_upload_failures_total", "").await, 0);
    assert_eq!(metric(&a, "cairn_s3_rejected_objects", "").await, 0);
    let parts = s3
        .head_object()
        .bucket(BUCKET)
        .key(blob_key(&large_digest))
        .send()
        .await
        .expect("the large blob is in the bucket");
    assert!(
        parts.e_tag().unwrap_or_default().contains('-'),
        "the large blob was not a multipart upload: etag {:?}",
        parts.e_tag()
    );
    wait_metric(&a, "cairn_s3_uploads_total", "kind=\"ac\"", |n| n >= 1).await;

    let b = fleet_node(&moto, &temp.path().join("b"));
    let read = get_blobs(&b, &digests).await;
    for (data, expected) in read.iter().zip(&blobs) {
        assert_eq!(data.as_ref().ok(), Some(expected));
    }
    let mut bytestream = b.bytestream().await;
    let large_read = read_blob(&mut bytestream, &read_name("", &large_digest), 0, 0)
        .await
        .expect("read the large blob through node B");
    assert!(large_read == large, "the large blob came back different");
    let got = b
        .ac()
        .await
        .get_action_result(GetActionResultRequest {
            action_digest: Some(wire(&action)),
            ..Default::default()
        })
        .await
        .expect("node B serves node A's action result")
        .into_inner();
    assert_eq!(got, result);
    wait_metric(&b, "cairn_s3_fetches_total", "result=\"hit\"", |n| n >= 22).await;
    assert_clean_exit(a);
    assert_clean_exit(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_missing_answers_from_the_bucket_index_without_asking_s3() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let s3 = client(&moto.endpoint());
    let temp = tempfile::tempdir().expect("temporary directory");
    let a = fleet_node(&moto, &temp.path().join("a"));
    let stored = put_blobs(&a, &small_blobs(1000, 50)).await;
    wait_in_bucket(&s3, &stored).await;

    let b = fleet_node(&moto, &temp.path().join("b"));
    wait_metric(&b, "cairn_s3_bucket_index_listed", "", |n| n == 1).await;
    let mut asked: Vec<Digest> = (0..10_000u64 - stored.len() as u64)
        .map(|i| sha256(format!("never stored {i}").as_bytes()))
        .collect();
    asked.extend(&stored);
    let before = moto.requests();
    let missing = find_missing(&b, &asked).await;
    let during = moto.requests() - before;
    assert_eq!(missing.len(), 10_000 - stored.len());
    assert!(stored.iter().all(|d| !missing.contains(d)));
    // Background uploader polls never reach S3 on an idle node; allow none at all.
    assert_eq!(during, 0, "FindMissingBlobs made {during} requests to S3");

    // The completeness check of an action result sees blobs known only to S3.
    let action = sha256(b"complete only with S3");
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: "out".into(),
            digest: Some(wire(&stored[1])),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut ac = b.ac().await;
    ac.update_action_result(UpdateActionResultRequest {
        action_digest: Some(wire(&action)),
        action_result: Some(result.clone()),
        ..Default::default()
    })
    .await
    .expect("UpdateActionResult");
    let got = ac
        .get_action_result(GetActionResultRequest {
            action_digest: Some(wire(&action)),
            ..Default::default()
        })
        .await
        .expect("an entry whose outputs are in S3 is complete");
    assert_eq!(got.into_inner(), result);
    assert_clean_exit(a);
    assert_clean_exit(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_queues_uploads_and_a_restart_drains_them() {
    let Some(mut moto) = Moto::start().await else {
        return;
    };
    let s3 = client(&moto.endpoint());
    let temp = tempfile::tempdir().expect("temporary directory");
    let dir = temp.path().join("a");
    let a = fleet_node(&moto, &dir);
    let before = put_blobs(&a, &small_blobs(2000, 10)).await;
    wait_in_bucket(&s3, &before).await;

    moto.stop();
    let blobs = small_blobs(3000, 200);
    let during = put_blobs(&a, &blobs).await;
    wait_metric(&a, "cairn_replication_backlog_bytes", "", |n| n > 0).await;
    wait_metric(&a, "cairn_s3_up", "", |n| n == 0).await;
    let (status, body) = http_get(&a, "/healthz").await;
    assert!(status.contains("200"), "{status}");
    assert!(body.starts_with("degraded"), "{body}");
    let read = get_blobs(&a, &during).await;
    assert!(read
        .iter()
        .zip(&blobs)
        .all(|(r, b)| r.as_ref().ok() == Some(b)));
    assert!(get_blobs(&a, &before).await.iter().all(Result::is_ok));

    moto.run().await;
    wait_in_bucket(&s3, &during).await;
    wait_metric(&a, "cairn_replication_backlog_bytes", "", |n| n == 0).await;
    let (_, body) = http_get(&a, "/healthz").await;
    assert!(body.starts_with("ok"), "{body}");

    // A crash with a backlog: the cursor on disk resumes it after the restart.
    moto.stop();
    let more = put_blobs(&a, &small_blobs(4000, 200)).await;
    wait_metric(&a, "cairn_replication_backlog_bytes", "", |n| n > 0).await;
    a.kill();
    moto.run().await;
    let a = fleet_node(&moto, &dir);
    wait_in_bucket(&s3, &more).await;
    wait_metric(&a, "cairn_replication_backlog_bytes", "", |n| n == 0).await;
    assert_clean_exit(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_serves_everything_from_s3() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let s3 = client(&moto.endpoint());
    let temp = tempfile::tempdir().expect("temporary directory");
    let dir = temp.path().join("a");
    let a = fleet_node(&moto, &dir);
    let blobs = small_blobs(5000, 100);
    let digests = put_blobs(&a, &blobs).await;
    wait_in_bucket(&s3, &digests).await;
    assert_clean_exit(a);
    std::fs::remove_dir_all(&dir).expect("wipe the data directory");

    let a = fleet_node(&moto, &dir);
    let read = get_blobs(&a, &digests).await;
    for (data, expected) in read.iter().zip(&blobs) {
        assert_eq!(data.as_ref().ok(), Some(expected));
    }
    assert_clean_exit(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_altered_in_the_bucket_is_neither_served_nor_cached() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let s3 = client(&moto.endpoint());
    let temp = tempfile::tempdir().expect("temporary directory");
    let a = fleet_node(&moto, &temp.path().join("a"));
    let small = blob(6000, 4096);
    let mut digests = put_blobs(&a, std::slice::from_ref(&small)).await;
    // Streamed to the client in several pieces.
    let large = blob(6001, 3 << 20);
    digests.push(put_stream(&a, &large).await);
    wait_in_bucket(&s3, &digests).await;
    for (data, digest) in [&small, &large].into_iter().zip(&digests) {
        let mut altered = data.clone();
        altered[100] ^= 1;
        s3.put_object()
            .bucket(BUCKET)
            .key(blob_key(digest))
            .body(ByteStream::from(altered))
            .send()
            .await
            .expect("alter the object");
    }

    let b = fleet_node(&moto, &temp.path().join("b"));
    wait_metric(&b, "cairn_s3_bucket_index_listed", "", |n| n == 1).await;
    assert!(find_missing(&b, &digests).await.is_empty());
    assert_eq!(
        get_blobs(&b, &digests[..1]).await[0],
        Err(Code::NotFound as i32)
    );
    let mut bytestream = b.bytestream().await;
    let error = read_blob(&mut bytestream, &read_name("", &digests[0]), 0, 0)
        .await
        .expect_err("a corrupt object is not served");
    assert_eq!(error.code(), Code::NotFound);
    // The pieces before the end were streamed; the last one was held back until the
    // digest was checked, and the stream ended in NOT_FOUND instead.
    let (received, error) = read_counting(&b, &digests[1]).await;
    assert_eq!(error.map(|status| status.code()), Some(Code::NotFound));
    assert!(
        received > 0 && received < large.len(),
        "the client received {received} bytes of a {}-byte corrupt blob",
        large.len()
    );
    wait_metric(&b, "cairn_s3_fetches_total", "result=\"corrupt\"", |n| {
        n >= 3
    })
    .await;
    // Not cached locally, and no longer believed to be in the bucket.
    assert_eq!(find_missing(&b, &digests).await, digests);
    assert_eq!(metric(&b, "cairn_partition_objects", "").await, 0);
    assert_clean_exit(a);
    assert_clean_exit(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_the_local_tier_cannot_hold_is_still_served_from_s3() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let temp = tempfile::tempdir().expect("temporary directory");
    let data = blob(7000, 3 << 20);
    let digest = only_in_the_bucket(&moto, &temp.path().join("a"), &data).await;

    // 64 MiB over 16 partitions: the engine takes no blob over 2 MiB.
    let b = fleet_node_of_size(&moto, &temp.path().join("b"), "64MiB");
    let name = read_name("", &digest);
    let mut first = b.bytestream().await;
    let mut second = first.clone();
    let (one, two) = tokio::join!(
        read_blob(&mut first, &name, 0, 0),
        read_blob(&mut second, &name, 0, 0)
    );
    assert!(one.expect("first read") == data, "the first read differs");
    assert!(two.expect("second read") == data, "the second read differs");
    let range = read_blob(&mut first, &name, 1000, 5000)
        .await
        .expect("ranged read");
    assert!(range == data[1000..6000], "the ranged read differs");
    // Each read was served by a fetch of its own, none of them kept.
    let fetches = "cairn_s3_fetches_total";
    assert_eq!(metric(&b, fetches, "result=\"passthrough\"").await, 3);
    assert_eq!(metric(&b, fetches, "result=\"hit\"").await, 0);
    assert_eq!(metric(&b, "cairn_partition_objects", "").await, 0);
    assert_clean_exit(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ranged_read_of_a_blob_only_in_s3_stores_the_whole_blob_locally() {
    let Some(mut moto) = Moto::start().await else {
        return;
    };
    let temp = tempfile::tempdir().expect("temporary directory");
    let data = blob(8000, 3 << 20);
    let digest = only_in_the_bucket(&moto, &temp.path().join("a"), &data).await;

    let b = fleet_node(&moto, &temp.path().join("b"));
    let name = read_name("", &digest);
    let mut bytestream = b.bytestream().await;
    let (offset, limit) = ((1 << 20) + 5, (1 << 20) + 1000);
    let range = read_blob(&mut bytestream, &name, offset, limit)
        .await
        .expect("ranged read");
    assert!(
        range == data[offset as usize..(offset + limit) as usize],
        "the ranged read differs"
    );
    assert_eq!(
        metric(&b, "cairn_s3_fetches_total", "result=\"hit\"").await,
        1
    );

    // Without S3 the whole blob can only come from the local copy.
    moto.stop();
    let whole = read_blob(&mut bytestream, &name, 0, 0)
        .await
        .expect("read the whole blob locally");
    assert!(whole == data, "the local copy differs");
    assert_clean_exit(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_goes_away_mid_stream_still_leaves_a_local_copy() {
    let Some(mut moto) = Moto::start().await else {
        return;
    };
    let temp = tempfile::tempdir().expect("temporary directory");
    // Far more than the channel and the HTTP/2 windows hold, so the fetch is still
    // reading when the client goes.
    let data = blob(9000, 8 << 20);
    let digest = only_in_the_bucket(&moto, &temp.path().join("a"), &data).await;

    let b = fleet_node(&moto, &temp.path().join("b"));
    let name = read_name("", &digest);
    let mut bytestream = b.bytestream().await;
    let mut stream = bytestream
        .read(ReadRequest {
            resource_name: name.clone(),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .expect("ByteStream Read")
        .into_inner();
    let first = stream
        .message()
        .await
        .expect("the first piece")
        .expect("a first piece before the end");
    assert!(!first.data.is_empty());
    drop(stream);

    wait_metric(&b, "cairn_s3_fetches_total", "result=\"hit\"", |n| n == 1).await;
    moto.stop();
    let whole = read_blob(&mut bytestream, &name, 0, 0)
        .await
        .expect("read the whole blob locally");
    assert!(whole == data, "the local copy differs");
    assert_clean_exit(b);
}

/// A client's deadline for a read miss while S3 hangs: well above the node's own bound
/// on such a read (`read_miss_timeout_ms`, 5 s by default), so a `NOT_FOUND` in time is
/// the node's doing.
const CLIENT_DEADLINE: Duration = Duration::from_secs(30);

/// Polls of `/healthz` (every 250 ms) before a node must call itself degraded: the
/// documented bound is `operation_timeout_ms` (30 s by default) after the first request
/// S3 leaves unanswered, which the uploader sends within 200 ms of a write.
const DEGRADED_POLLS: u32 = 180;

/// Reads a whole blob through ByteStream within `CLIENT_DEADLINE`: the bytes received,
/// or the status the read ended with (`DEADLINE_EXCEEDED` when the node never answered).
async fn read_within_deadline(node: &Node, digest: &Digest) -> Result<usize, Code> {
    let read = async {
        let mut bytestream = node.bytestream().await;
        let mut request = tonic::Request::new(ReadRequest {
            resource_name: read_name("", digest),
            read_offset: 0,
            read_limit: 0,
        });
        request.set_timeout(CLIENT_DEADLINE);
        let mut stream = bytestream
            .read(request)
            .await
            .map_err(|status| status.code())?
            .into_inner();
        let mut received = 0;
        while let Some(piece) = stream.message().await.map_err(|status| status.code())? {
            received += piece.data.len();
        }
        Ok(received)
    };
    tokio::time::timeout(CLIENT_DEADLINE, read)
        .await
        .unwrap_or(Err(Code::DeadlineExceeded))
}

/// GetActionResult within `CLIENT_DEADLINE`.
async fn get_action_result_within_deadline(
    node: &Node,
    action: &Digest,
) -> Result<ActionResult, Code> {
    let get = async {
        let mut request = tonic::Request::new(GetActionResultRequest {
            action_digest: Some(wire(action)),
            ..Default::default()
        });
        request.set_timeout(CLIENT_DEADLINE);
        node.ac()
            .await
            .get_action_result(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| status.code())
    };
    tokio::time::timeout(CLIENT_DEADLINE, get)
        .await
        .unwrap_or(Err(Code::DeadlineExceeded))
}

/// Polls `/healthz` until its body starts with `verdict`, at most `polls` times.
async fn wait_health(node: &Node, verdict: &str, polls: u32) -> String {
    let mut last = String::new();
    for _ in 0..polls {
        let (status, body) = http_get(node, "/healthz").await;
        assert!(status.contains("200"), "/healthz answered {status}");
        if body.starts_with(verdict) {
            return body;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("/healthz never said {verdict:?} in {polls} polls; last: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_s3_degrades_the_node_bounds_read_misses_and_loses_nothing() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let s3 = client(&moto.endpoint());
    let temp = tempfile::tempdir().expect("temporary directory");
    let a = fleet_node(&moto, &temp.path().join("a"));
    let b = fleet_node(&moto, &temp.path().join("b"));
    wait_metric(&b, "cairn_s3_bucket_index_listed", "", |n| n == 1).await;
    let before = put_blobs(&a, &small_blobs(11_000, 10)).await;
    wait_in_bucket(&s3, &before).await;

    // S3 stops answering while its connections stay open.
    let paused = moto.pause();
    let blobs = small_blobs(12_000, 100);
    let during = put_blobs(&a, &blobs).await;
    let large = blob(12_500, 3 << 20);
    let large_digest = put_stream(&a, &large).await;
    let action = sha256(b"written while S3 hangs");
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: "out".into(),
            digest: Some(wire(&during[0])),
            ..Default::default()
        }],
        ..Default::default()
    };
    a.ac()
        .await
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(wire(&action)),
            action_result: Some(result.clone()),
            ..Default::default()
        })
        .await
        .expect("UpdateActionResult is acknowledged while S3 hangs");

    let body = wait_health(&a, "degraded", DEGRADED_POLLS).await;
    assert!(body.contains("S3 unreachable"), "{body}");
    assert_eq!(metric(&a, "cairn_s3_up", "").await, 0);
    assert!(metric(&a, "cairn_replication_backlog_bytes", "").await > 0);

    // Misses through the other node answer NOT_FOUND, bounded by the node itself.
    assert_eq!(
        read_within_deadline(&b, &during[1]).await,
        Err(Code::NotFound)
    );
    assert_eq!(
        read_within_deadline(&b, &large_digest).await,
        Err(Code::NotFound)
    );
    assert_eq!(
        get_action_result_within_deadline(&b, &action).await,
        Err(Code::NotFound)
    );
    assert!(metric(&b, "cairn_s3_fetches_total", "result=\"error\"").await >= 3);
    assert_eq!(metric(&b, "cairn_s3_up", "").await, 0);
    // Local data is still served.
    let read = get_blobs(&a, &during).await;
    assert!(read
        .iter()
        .zip(&blobs)
        .all(|(r, b)| r.as_ref().ok() == Some(b)));

    // Once S3 answers again everything drains and every acknowledged write is readable
    // through the other node.
    drop(paused);
    wait_metric(&a, "cairn_replication_backlog_bytes", "", |n| n == 0).await;
    wait_health(&a, "ok", DEGRADED_POLLS).await;
    assert_eq!(metric(&a, "cairn_s3_rejected_objects", "").await, 0);
    let read = get_blobs(&b, &during).await;
    for (data, expected) in read.iter().zip(&blobs) {
        assert_eq!(data.as_ref().ok(), Some(expected));
    }
    assert_eq!(
        read_within_deadline(&b, &large_digest).await,
        Ok(large.len())
    );
    assert_eq!(
        get_action_result_within_deadline(&b, &action).await,
        Ok(result)
    );
    assert_clean_exit(a);
    assert_clean_exit(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_s3_keeps_rejecting_does_not_hold_back_later_records() {
    // moto refuses to complete a multipart upload whose parts but the last are smaller
    // than S3_UPLOAD_PART_MIN_SIZE. Above the node's 16 MiB parts, it rejects every
    // multipart upload (EntityTooSmall) and accepts every other request.
    let Some(mut moto) = Moto::start_with(&[("S3_UPLOAD_PART_MIN_SIZE", "17825792")]).await else {
        return;
    };
    let s3 = client(&moto.endpoint());
    let temp = tempfile::tempdir().expect("temporary directory");
    let dir = temp.path().join("a");
    let a = fleet_node(&moto, &dir);
    let large = blob(13_000, (64 << 20) + (1 << 20));
    let large_digest = put_stream(&a, &large).await;
    let rejected = format!("key=\"{}\"", blob_key(&large_digest));
    wait_metric(&a, "cairn_s3_rejected_objects", &rejected, |n| n == 1).await;

    // Blobs written after it, about 25 in its partition, all reach the bucket and
    // leave the backlog: only the rejected record is still owed.
    let mut later = Vec::new();
    for seed in [14_000, 15_000] {
        let blobs: Vec<Vec<u8>> = (0..200).map(|i| blob(seed + i, 8 << 10)).collect();
        later.extend(put_blobs(&a, &blobs).await);
    }
    wait_in_bucket(&s3, &later).await;
    let owed = large.len() as u64;
    wait_metric(&a, "cairn_replication_backlog_bytes", "", |n| {
        (owed..owed + (32 << 10)).contains(&n)
    })
    .await;
    // And it is retried.
    wait_metric(&a, "cairn_s3_upload_failures_total", "", |n| n >= 2).await;
    assert_eq!(metric(&a, "cairn_s3_rejected_objects", &rejected).await, 1);
    assert!(!bucket_keys(&s3).await.contains(&blob_key(&large_digest)));
    let (_, body) = http_get(&a, "/healthz").await;
    assert!(body.starts_with("ok"), "{body}");
    assert_clean_exit(a);

    // The owed record survives a restart, and goes through once S3 takes it.
    moto.stop();
    moto.env.clear();
    moto.run().await;
    let a = fleet_node(&moto, &dir);
    wait_in_bucket(&s3, &[large_digest]).await;
    wait_metric(&a, "cairn_replication_backlog_bytes", "", |n| n == 0).await;
    assert_eq!(metric(&a, "cairn_s3_rejected_objects", "").await, 0);
    assert_clean_exit(a);
}

/// Clients reading one blob at the same time, each over a connection of its own: half
/// through ByteStream Read, half through BatchReadBlobs.
const READERS: usize = 16;

/// Reads each of them makes in a row, so that some start while the first fetch ends.
const ROUNDS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_for_one_blob_make_one_s3_request() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let temp = tempfile::tempdir().expect("temporary directory");
    // Several pieces, so the fetch is still streaming while the other reads arrive, and
    // small enough for BatchReadBlobs.
    let data = blob(16_000, 3 << 20);
    let digest = only_in_the_bucket(&moto, &temp.path().join("a"), &data).await;
    let key = blob_key(&digest);
    assert_eq!(moto.gets(&key), 0);

    let b = fleet_node(&moto, &temp.path().join("b"));
    let name = read_name("", &digest);
    let mut streams = Vec::new();
    let mut batches = Vec::new();
    for _ in 0..READERS / 2 {
        streams.push(b.bytestream().await);
        batches.push(b.cas().await);
    }
    let streamed = streams.iter_mut().map(|bytestream| {
        let name = &name;
        async move {
            let mut reads = Vec::new();
            for _ in 0..ROUNDS {
                reads.push(
                    read_blob(bytestream, name, 0, 0)
                        .await
                        .map_err(|status| status.code() as i32),
                );
            }
            reads
        }
    });
    let batched = batches.iter_mut().map(|cas| async move {
        let mut reads = Vec::new();
        for _ in 0..ROUNDS {
            let response = cas
                .batch_read_blobs(BatchReadBlobsRequest {
                    digests: vec![wire(&digest)],
                    ..Default::default()
                })
                .await;
            reads.push(match response {
                Ok(response) => {
                    let answer = response.into_inner().responses.remove(0);
                    match answer.status.map_or(0, |s| s.code) {
                        0 => Ok(answer.data.to_vec()),
                        code => Err(code),
                    }
                }
                Err(status) => Err(status.code() as i32),
            });
        }
        reads
    });
    let (streamed, batched) = tokio::join!(
        futures::future::join_all(streamed),
        futures::future::join_all(batched)
    );
    let reads: Vec<Result<Vec<u8>, i32>> = streamed.into_iter().chain(batched).flatten().collect();
    assert_eq!(reads.len(), READERS * ROUNDS);
    for read in &reads {
        match read {
            Ok(read) => assert!(*read == data, "a read returned other bytes"),
            Err(code) => panic!("a read failed with code {code}"),
        }
    }
    // One GET for all of them, which stored the blob; every other read was local.
    assert_eq!(moto.gets(&key), 1, "GET requests for {key}");
    let fetches = "cairn_s3_fetches_total";
    assert_eq!(metric(&b, fetches, "result=\"hit\"").await, 1);
    assert_eq!(metric(&b, fetches, "").await, 1);

    // A blob the bucket lacks: one GET, and its answer reaches every reader.
    let absent = sha256(b"never stored anywhere");
    let absent_key = blob_key(&absent);
    let name = read_name("", &absent);
    let misses = streams.iter_mut().map(|bytestream| {
        let name = &name;
        async move {
            read_blob(bytestream, name, 0, 0)
                .await
                .map(|_| ())
                .map_err(|status| status.code())
        }
    });
    let misses = futures::future::join_all(misses).await;
    assert!(
        misses.iter().all(|read| *read == Err(Code::NotFound)),
        "{misses:?}"
    );
    assert_eq!(moto.gets(&absent_key), 1, "GET requests for {absent_key}");
    assert_eq!(metric(&b, fetches, "result=\"miss\"").await, 1);
    assert_clean_exit(b);
}

/// Whether `message` says why a write was refused while the backlog fills the budget.
fn names_the_backlog(message: &str) -> bool {
    message.contains("not yet replicated to the slow tier") && message.contains("backlog")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_that_fills_the_budget_refuses_writes_until_s3_drains_it() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let s3 = client(&moto.endpoint());
    let temp = tempfile::tempdir().expect("temporary directory");
    // 64 MiB over 16 partitions of 4 MiB: a backlog fills one in a few MiB.
    let a = fleet_node_of_size(&moto, &temp.path().join("a"), "64MiB");
    let before = put_blobs(&a, &small_blobs(17_000, 10)).await;
    wait_in_bucket(&s3, &before).await;

    // S3 hangs; write 1 MiB batches until a partition's budget holds nothing but
    // backlog. Four times the whole budget is far more than that takes.
    let paused = moto.pause();
    let mut acknowledged: Vec<Vec<u8>> = Vec::new();
    let mut refused: Vec<Vec<u8>> = Vec::new();
    for round in 0..256u64 {
        let blobs: Vec<Vec<u8>> = (0..16)
            .map(|i| blob(18_000 + round * 16 + i, 64 << 10))
            .collect();
        let answers = try_put_blobs(&a, &blobs).await;
        for (data, answer) in blobs.into_iter().zip(answers) {
            match answer {
                Ok(()) => acknowledged.push(data),
                Err((code, message)) => {
                    assert_eq!(code, Code::ResourceExhausted, "{message}");
                    assert!(names_the_backlog(&message), "{message}");
                    refused.push(data);
                }
            }
        }
        if !refused.is_empty() {
            break;
        }
    }
    assert!(!refused.is_empty(), "no write was ever refused");
    assert!(metric(&a, "cairn_replication_backlog_bytes", "").await > 0);
    // ByteStream refuses it alike.
    let mut bytestream = a.bytestream().await;
    let digest = sha256(&refused[0]);
    let error = write_blob(&mut bytestream, &upload_name("", &digest), &refused[0])
        .await
        .expect_err("a write into a full budget is refused");
    assert_eq!(error.code(), Code::ResourceExhausted, "{error}");
    assert!(names_the_backlog(error.message()), "{error}");
    // Everything acknowledged is still served.
    let digests: Vec<Digest> = acknowledged.iter().map(|data| sha256(data)).collect();
    for (digests, blobs) in digests.chunks(32).zip(acknowledged.chunks(32)) {
        let read = get_blobs(&a, digests).await;
        assert!(
            read.iter()
                .zip(blobs)
                .all(|(r, b)| r.as_ref().ok() == Some(b)),
            "an acknowledged blob is not served while S3 hangs"
        );
    }

    // Once S3 answers the backlog drains, the refused writes are taken, and every
    // acknowledged blob reaches the bucket.
    drop(paused);
    wait_metric(&a, "cairn_replication_backlog_bytes", "", |n| n == 0).await;
    let mut retried = put_blobs(&a, &refused).await;
    retried.push(put_stream(&a, &blob(19_000, 256 << 10)).await);
    wait_in_bucket(&s3, &before).await;
    wait_in_bucket(&s3, &digests).await;
    wait_in_bucket(&s3, &retried).await;
    assert_eq!(metric(&a, "cairn_s3_rejected_objects", "").await, 0);
    assert_clean_exit(a);
}

/// Bazel's HTTP protocol names a blob by hash alone; a blob held only in the bucket
/// is found through the bucket index by hash and served, the same answer gRPC gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_only_in_s3_is_served_over_http_by_hash() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let temp = tempfile::tempdir().expect("temporary directory");
    let data = blob(9500, 200_000);
    let digest = only_in_the_bucket(&moto, &temp.path().join("a"), &data).await;

    let b = fleet_node(&moto, &temp.path().join("b"));
    wait_metric(&b, "cairn_s3_bucket_index_listed", "", |n| n == 1).await;
    let path = format!("/cas/{}", digest.hash_hex());
    let (head, _) = common::http(b.http, "HEAD", &path, b"");
    assert_eq!(head, 200, "HEAD {path} of a blob only in S3");
    // HEAD answers from the bucket index: nothing was fetched.
    assert_eq!(metric(&b, "cairn_s3_fetches_total", "").await, 0);
    let (status, body) = common::http(b.http, "GET", &path, b"");
    assert_eq!(status, 200, "GET {path} of a blob only in S3");
    assert!(body == data, "GET {path} served other bytes");
    let absent = format!("/cas/{}", sha256(b"in no bucket").hash_hex());
    assert_eq!(common::http(b.http, "GET", &absent, b"").0, 404);
    assert_clean_exit(b);
}
