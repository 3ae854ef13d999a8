//! The Remote Asset API against the real `cairn` binary and an HTTP origin the test
//! runs on loopback: downloads verified against `checksum.sri`, mappings remembered
//! across restarts, failing mirrors skipped, hung origins timed out, concurrent
//! fetches sharing one download, pushes, and the permissions both services need.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use cairn_proto::asset::fetch_client::FetchClient;
use cairn_proto::asset::push_client::PushClient;
use cairn_proto::asset::{
    FetchBlobRequest, FetchBlobResponse, FetchDirectoryRequest, PushBlobRequest,
    PushDirectoryRequest, Qualifier,
};
use cairn_proto::reapi::FindMissingBlobsRequest;
use common::{bearer, blob, http, sha256, token_hash, wire, Node};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::Code;

/// What the origin does for a path.
#[derive(Clone)]
enum Route {
    /// Answers 200 with the body.
    Serve(Vec<u8>),
    /// Answers 200 with the body once the gate opens.
    Gated(Vec<u8>, watch::Receiver<bool>),
    /// Answers a redirect to the location.
    Redirect(String),
    /// Reads the request and never answers.
    Hang,
}

/// An HTTP/1.1 origin on loopback that counts the requests for each path; unknown
/// paths get 404.
struct Origin {
    addr: SocketAddr,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin address");
        let routes: Arc<Mutex<HashMap<String, Route>>> = Arc::default();
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let task = tokio::spawn({
            let routes = Arc::clone(&routes);
            let hits = Arc::clone(&hits);
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(serve(stream, Arc::clone(&routes), Arc::clone(&hits)));
                }
            }
        });
        Origin {
            addr,
            routes,
            hits,
            task,
        }
    }

    fn route(&self, path: &str, route: Route) -> String {
        self.routes
            .lock()
            .expect("routes")
            .insert(path.to_string(), route);
        self.url(path)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn hits(&self, path: &str) -> usize {
        self.hits
            .lock()
            .expect("hits")
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut stream: tokio::net::TcpStream,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
    *hits.lock().expect("hits").entry(path.clone()).or_default() += 1;
    let route = routes.lock().expect("routes").get(&path).cloned();
    let (status, location, body) = match route {
        Some(Route::Serve(body)) => ("200 OK", None, body),
        Some(Route::Gated(body, mut gate)) => {
            let _ = gate.wait_for(|open| *open).await;
            ("200 OK", None, body)
        }
        Some(Route::Redirect(to)) => ("302 Found", Some(to), Vec::new()),
        Some(Route::Hang) => {
            std::future::pending::<()>().await;
            return;
        }
        None => ("404 Not Found", None, b"no such file".to_vec()),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    if let Some(location) = location {
        response.push_str(&format!("location: {location}\r\n"));
    }
    response.push_str("\r\n");
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
}

fn sri(data: &[u8]) -> String {
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(data))
    )
}

fn qualifiers(sri: &str) -> Vec<Qualifier> {
    vec![Qualifier {
        name: "checksum.sri".to_string(),
        value: sri.to_string(),
    }]
}

/// A FetchBlob request as Bazel 4.2.3 sends it: URLs and `checksum.sri` only.
fn fetch_request(uris: &[&str], sri: &str) -> FetchBlobRequest {
    FetchBlobRequest {
        uris: uris.iter().map(|uri| uri.to_string()).collect(),
        qualifiers: qualifiers(sri),
        ..Default::default()
    }
}

async fn fetch_client(node: &Node) -> FetchClient<tonic::transport::Channel> {
    FetchClient::new(node.channel().await)
}

async fn fetch(node: &Node, request: FetchBlobRequest) -> FetchBlobResponse {
    fetch_client(node)
        .await
        .fetch_blob(request)
        .await
        .expect("FetchBlob")
        .into_inner()
}

fn status_code(response: &FetchBlobResponse) -> Code {
    Code::from(response.status.as_ref().map_or(0, |status| status.code))
}

/// The `cairn_asset_fetches_total` sample of `outcome`.
fn fetches(node: &Node, outcome: &str) -> f64 {
    metric(
        node,
        &format!("cairn_asset_fetches_total{{outcome=\"{outcome}\"}}"),
    )
}

fn metric(node: &Node, sample: &str) -> f64 {
    let (status, body) = http(node.http, "GET", "/metrics", b"");
    assert_eq!(status, 200, "GET /metrics");
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn is_missing(node: &Node, data: &[u8]) -> bool {
    let response = node
        .cas()
        .await
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![wire(&sha256(data))],
            ..Default::default()
        })
        .await
        .expect("FindMissingBlobs")
        .into_inner();
    !response.missing_blob_digests.is_empty()
}

async fn upload(node: &Node, data: &[u8]) {
    let name = common::upload_name("", &sha256(data));
    common::write_blob(&mut node.bytestream().await, &name, data)
        .await
        .expect("upload");
}

fn cache_node(dir: &Path) -> Node {
    Node::start_in(dir, &["--no-execution"])
}

#[tokio::test]
async fn a_download_is_stored_verified_and_then_a_hit() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let node = cache_node(&temp.path().join("data"));
    let origin = Origin::start().await;
    let data = blob(1, 3 << 20);
    let url = origin.route("/dep-1.0.tar.gz", Route::Serve(data.clone()));

    let first = fetch(&node, fetch_request(&[&url], &sri(&data))).await;
    assert_eq!(status_code(&first), Code::Ok, "{first:?}");
    assert_eq!(first.blob_digest, Some(wire(&sha256(&data))));
    assert_eq!(first.uri, url);
    assert!(!is_missing(&node, &data).await, "the blob is in the CAS");
    let name = common::read_name("", &sha256(&data));
    let read = common::read_blob(&mut node.bytestream().await, &name, 0, 0)
        .await
        .expect("read the fetched blob");
    assert_eq!(read, data);

    let second = fetch(&node, fetch_request(&[&url], &sri(&data))).await;
    assert_eq!(second.blob_digest, first.blob_digest);
    assert_eq!(
        origin.hits("/dep-1.0.tar.gz"),
        1,
        "the second fetch is a hit"
    );
    assert_eq!(fetches(&node, "downloaded"), 1.0);
    assert_eq!(fetches(&node, "hit"), 1.0);
    assert!(metric(&node, "cairn_asset_downloaded_bytes_total") >= data.len() as f64);
}

#[tokio::test]
async fn a_wrong_checksum_is_refused_and_nothing_is_stored() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let node = cache_node(&temp.path().join("data"));
    let origin = Origin::start().await;
    let data = blob(2, 10_000);
    let url = origin.route("/tampered.zip", Route::Serve(data.clone()));
    let expected = sri(b"what the client expected");

    let refused = fetch(&node, fetch_request(&[&url], &expected)).await;
    assert_eq!(status_code(&refused), Code::Aborted, "{refused:?}");
    let message = &refused.status.as_ref().expect("status").message;
    assert!(message.contains("checksum mismatch"), "{message}");
    assert!(message.contains(&expected), "{message}");
    assert_eq!(refused.blob_digest, None);
    assert!(is_missing(&node, &data).await, "nothing is stored");

    let again = fetch(&node, fetch_request(&[&url], &expected)).await;
    assert_eq!(status_code(&again), Code::Aborted, "{again:?}");
    assert_eq!(
        origin.hits("/tampered.zip"),
        2,
        "the refusal was not remembered"
    );
    assert_eq!(fetches(&node, "checksum_mismatch"), 2.0);
    assert_eq!(fetches(&node, "hit"), 0.0);
}

#[tokio::test]
async fn failing_urls_fall_through_to_the_next() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let node = cache_node(&temp.path().join("data"));
    let origin = Origin::start().await;
    let data = blob(3, 5000);
    let good = origin.route("/mirror/file", Route::Serve(data.clone()));
    let missing = origin.url("/nowhere");
    // A port nobody listens on: the connection is refused.
    let refused = format!("http://{}/file", common::free_port());

    let response = fetch(
        &node,
        fetch_request(&[&missing, &refused, &good], &sri(&data)),
    )
    .await;
    assert_eq!(status_code(&response), Code::Ok, "{response:?}");
    assert_eq!(response.uri, good);
    assert_eq!(response.blob_digest, Some(wire(&sha256(&data))));
    assert_eq!(origin.hits("/nowhere"), 1);

    let other = blob(4, 777);
    origin.route("/mirror/other", Route::Serve(other.clone()));
    let moved = origin.route("/moved-other", Route::Redirect("mirror/other".to_string()));
    let followed = fetch(&node, fetch_request(&[&moved], &sri(&other))).await;
    assert_eq!(status_code(&followed), Code::Ok, "{followed:?}");
    assert_eq!(followed.blob_digest, Some(wire(&sha256(&other))));

    let all_fail = fetch(&node, fetch_request(&[&missing, &refused], &sri(b"x"))).await;
    assert_eq!(status_code(&all_fail), Code::Unavailable, "{all_fail:?}");
    let message = &all_fail.status.as_ref().expect("status").message;
    assert!(message.contains("404"), "{message}");
    assert!(message.contains(&refused), "{message}");
    let only_404 = fetch(&node, fetch_request(&[&missing], &sri(b"x"))).await;
    assert_eq!(status_code(&only_404), Code::NotFound, "{only_404:?}");
}

#[tokio::test]
async fn a_hung_origin_times_out() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let node = cache_node(&temp.path().join("data"));
    let origin = Origin::start().await;
    let url = origin.route("/hangs", Route::Hang);
    let mut request = fetch_request(&[&url], &sri(b"never"));
    request.timeout = Some(prost_types::Duration {
        seconds: 1,
        nanos: 0,
    });
    let response = fetch(&node, request).await;
    assert_eq!(
        status_code(&response),
        Code::DeadlineExceeded,
        "{response:?}"
    );
    assert_eq!(fetches(&node, "failed"), 1.0);
}

#[tokio::test]
async fn concurrent_fetches_of_one_url_download_once() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let node = cache_node(&temp.path().join("data"));
    let origin = Origin::start().await;
    let data = blob(5, 1 << 20);
    let (open, gate) = watch::channel(false);
    let url = origin.route("/popular.tar.gz", Route::Gated(data.clone(), gate));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let client = fetch_client(&node).await;
        let request = fetch_request(&[&url], &sri(&data));
        clients.push(tokio::spawn(async move {
            let mut client = client;
            client.fetch_blob(request).await.map(|r| r.into_inner())
        }));
    }
    // Hold the body back until all eight requests reached the node.
    let mut arrived = 0.0;
    for _ in 0..500 {
        arrived = metric(
            &node,
            "cairn_requests_total{method=\"FetchBlob\",service=\"asset\"}",
        );
        if arrived >= 8.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(arrived, 8.0, "all eight requests arrived");
    open.send_replace(true);
    for client in clients {
        let response = client.await.expect("task").expect("FetchBlob");
        assert_eq!(status_code(&response), Code::Ok, "{response:?}");
        assert_eq!(response.blob_digest, Some(wire(&sha256(&data))));
    }
    assert_eq!(
        origin.hits("/popular.tar.gz"),
        1,
        "one download for eight requests"
    );
}

#[tokio::test]
async fn a_mapping_survives_a_restart() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let dir = temp.path().join("data");
    let origin = Origin::start().await;
    let data = blob(6, 4096);
    let url = origin.route("/kept", Route::Serve(data.clone()));
    // A checksum qualifier of another algorithm, so the CAS lookup by SHA-256 cannot
    // answer and only the mapping can.
    let sha512 = format!(
        "sha512-{}",
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha512::digest(&data))
    );
    let node = cache_node(&dir);
    let first = fetch(&node, fetch_request(&[&url], &sha512)).await;
    assert_eq!(status_code(&first), Code::Ok, "{first:?}");
    assert!(node.terminate().success());

    let node = cache_node(&dir);
    let again = fetch(&node, fetch_request(&[&url], &sha512)).await;
    assert_eq!(status_code(&again), Code::Ok, "{again:?}");
    assert_eq!(again.blob_digest, Some(wire(&sha256(&data))));
    assert_eq!(
        origin.hits("/kept"),
        1,
        "answered from the remembered mapping"
    );
    assert_eq!(fetches(&node, "hit"), 1.0);
}

#[tokio::test]
async fn push_then_fetch_needs_no_download_and_a_gone_blob_is_fetched_again() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let node = cache_node(&temp.path().join("data"));
    let origin = Origin::start().await;
    let data = blob(7, 2048);
    let mut push = PushClient::new(node.channel().await);
    // Pushed content the CAS holds (uploaded first, as the API asks).
    upload(&node, &data).await;
    push.push_blob(PushBlobRequest {
        uris: vec!["urn:example:pushed".to_string()],
        qualifiers: vec![Qualifier {
            name: "vcs.commit".to_string(),
            value: "abc".to_string(),
        }],
        blob_digest: Some(wire(&sha256(&data))),
        ..Default::default()
    })
    .await
    .expect("PushBlob");
    let pushed = fetch(
        &node,
        FetchBlobRequest {
            uris: vec!["urn:example:pushed".to_string()],
            qualifiers: vec![Qualifier {
                name: "vcs.commit".to_string(),
                value: "abc".to_string(),
            }],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(status_code(&pushed), Code::Ok, "{pushed:?}");
    assert_eq!(pushed.blob_digest, Some(wire(&sha256(&data))));

    // A mapping whose blob is gone from the CAS (pushed without it here; evicted in
    // life) is not served: the URL is downloaded again.
    let gone = blob(8, 100);
    let url_gone = origin.route("/gone", Route::Serve(data.clone()));
    let sha512 = format!(
        "sha512-{}",
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha512::digest(&data))
    );
    push.push_blob(PushBlobRequest {
        uris: vec![url_gone.clone()],
        qualifiers: qualifiers(&sha512),
        blob_digest: Some(wire(&sha256(&gone))),
        ..Default::default()
    })
    .await
    .expect("PushBlob");
    let refetched = fetch(&node, fetch_request(&[&url_gone], &sha512)).await;
    assert_eq!(status_code(&refetched), Code::Ok, "{refetched:?}");
    assert_eq!(refetched.blob_digest, Some(wire(&sha256(&data))));
    assert_eq!(origin.hits("/gone"), 1);

    // Directories: only what was pushed, and NOT_FOUND otherwise.
    let root = blob(9, 64);
    upload(&node, &root).await;
    push.push_directory(PushDirectoryRequest {
        uris: vec!["https://example.org/repo.git".to_string()],
        root_directory_digest: Some(wire(&sha256(&root))),
        ..Default::default()
    })
    .await
    .expect("PushDirectory");
    let mut fetch_dir = fetch_client(&node).await;
    let directory = fetch_dir
        .fetch_directory(FetchDirectoryRequest {
            uris: vec!["https://example.org/repo.git".to_string()],
            ..Default::default()
        })
        .await
        .expect("FetchDirectory")
        .into_inner();
    assert_eq!(directory.root_directory_digest, Some(wire(&sha256(&root))));
    let unknown = fetch_dir
        .fetch_directory(FetchDirectoryRequest {
            uris: vec!["https://example.org/other.git".to_string()],
            ..Default::default()
        })
        .await
        .expect_err("not pushed");
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn malformed_requests_are_invalid_arguments() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let node = cache_node(&temp.path().join("data"));
    let mut client = fetch_client(&node).await;
    let cases = [
        fetch_request(&[], &sri(b"x")),
        fetch_request(&["http://127.0.0.1:1/x"], "sha256-tooshort"),
        FetchBlobRequest {
            uris: vec!["http://127.0.0.1:1/x".to_string()],
            qualifiers: vec![
                Qualifier {
                    name: "a".to_string(),
                    value: "1".to_string(),
                },
                Qualifier {
                    name: "a".to_string(),
                    value: "2".to_string(),
                },
            ],
            ..Default::default()
        },
        FetchBlobRequest {
            uris: vec!["http://127.0.0.1:1/x".to_string()],
            qualifiers: vec![Qualifier {
                name: "vcs.branch".to_string(),
                value: "main".to_string(),
            }],
            ..Default::default()
        },
    ];
    for request in cases {
        let status = client
            .fetch_blob(request.clone())
            .await
            .expect_err("refused");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{request:?}: {status:?}"
        );
    }
}

const READER: &str = "asset-reader-1";
const UPLOADER: &str = "asset-uploader-2";

#[tokio::test]
async fn downloads_and_pushes_need_write() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let auth = temp.path().join("auth.json5");
    std::fs::write(
        &auth,
        format!(
            "{{ principals: [
  {{ name: 'reader', token_sha256: '{}', permissions: ['read'] }},
  {{ name: 'uploader', token_sha256: '{}', permissions: ['read', 'write'] }},
] }}",
            token_hash(READER),
            token_hash(UPLOADER)
        ),
    )
    .expect("auth file");
    let node = Node::start_in(
        &temp.path().join("data"),
        &["--no-execution", "--auth", auth.to_str().expect("path")],
    );
    let origin = Origin::start().await;
    let data = blob(10, 1000);
    let url = origin.route("/guarded", Route::Serve(data.clone()));
    let mut client = fetch_client(&node).await;

    let anonymous = client
        .fetch_blob(fetch_request(&[&url], &sri(&data)))
        .await
        .expect_err("no credentials");
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let reader_miss = client
        .fetch_blob(bearer(fetch_request(&[&url], &sri(&data)), READER))
        .await
        .expect_err("a reader cannot download");
    assert_eq!(
        reader_miss.code(),
        Code::PermissionDenied,
        "{reader_miss:?}"
    );
    assert!(reader_miss.message().contains("write"), "{reader_miss:?}");
    assert_eq!(origin.hits("/guarded"), 0);

    let downloaded = client
        .fetch_blob(bearer(fetch_request(&[&url], &sri(&data)), UPLOADER))
        .await
        .expect("an uploader downloads")
        .into_inner();
    assert_eq!(status_code(&downloaded), Code::Ok, "{downloaded:?}");
    let reader_hit = client
        .fetch_blob(bearer(fetch_request(&[&url], &sri(&data)), READER))
        .await
        .expect("a reader is served what is cached")
        .into_inner();
    assert_eq!(reader_hit.blob_digest, downloaded.blob_digest);

    let mut push = PushClient::new(node.channel().await);
    let request = || PushBlobRequest {
        uris: vec!["urn:example:x".to_string()],
        blob_digest: Some(wire(&sha256(&data))),
        ..Default::default()
    };
    let refused = push
        .push_blob(bearer(request(), READER))
        .await
        .expect_err("a reader cannot push");
    assert_eq!(refused.code(), Code::PermissionDenied);
    push.push_blob(bearer(request(), UPLOADER))
        .await
        .expect("an uploader pushes");
}
