//! Access control against the real `cairn` binary: an auth file of principals, real
//! tonic clients presenting `authorization: Bearer` metadata, raw HTTP requests with
//! basic and bearer credentials, the file edited while the node runs, `--read-only`,
//! and the refusal to serve execution to the network without authentication.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::{Duration, Instant};

use cairn_proto::bytestream::byte_stream_client::ByteStreamClient;
use cairn_proto::reapi::action_cache_client::ActionCacheClient;
use cairn_proto::reapi::batch_update_blobs_request::Request as UpdateRequest;
use cairn_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use cairn_proto::reapi::execution_client::ExecutionClient;
use cairn_proto::reapi::{
    Action, ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Command, Directory,
    ExecuteRequest, ExecuteResponse, FindMissingBlobsRequest, GetActionResultRequest,
    GetCapabilitiesRequest, UpdateActionResultRequest,
};
use common::{
    bearer, blob, http_with_headers as http, sha256, token_hash, upload_name, wire, write_requests,
    Node,
};
use prost::Message;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const CI: &str = "ci-token-7f3a";
const READER: &str = "reader-token-91bc";
const UPLOADER: &str = "uploader-token-c0de";
const TEAM_A: &str = "team-a-token-5e11";
const OPS: &str = "ops-token-0a0a";
const PASSWORD: &str = "correct horse";

/// The test's auth file: one principal per role.
fn auth_file(dir: &Path) -> PathBuf {
    // Cost 4, bcrypt's lowest: the node verifies it on the test's HTTP requests.
    let hash = bcrypt::hash(PASSWORD, 4).expect("bcrypt");
    let text = format!(
        "{{
  principals: [
    {{ name: 'ci', token_sha256: '{}', permissions: ['read', 'write', 'write_ac', 'execute'] }},
    {{ name: 'reader', token_sha256: '{}', permissions: ['read'] }},
    {{ name: 'uploader', token_sha256: '{}', permissions: ['read', 'write'] }},
    {{ name: 'team-a', token_sha256: '{}', permissions: ['read', 'write'], instances: ['a/'] }},
    {{ name: 'ops', token_sha256: '{}', permissions: ['metrics'] }},
    {{ name: 'alice', basic: {{ user: 'alice', hash: '{hash}' }}, permissions: ['read', 'write'] }},
  ],
}}",
        token_hash(CI),
        token_hash(READER),
        token_hash(UPLOADER),
        token_hash(TEAM_A),
        token_hash(OPS),
    );
    let path = dir.join("auth.json5");
    std::fs::write(&path, text).expect("write the auth file");
    path
}

/// A cache-only node (no execution) enforcing the test's auth file.
fn node_with_auth(temp: &tempfile::TempDir) -> Node {
    let auth = auth_file(temp.path());
    let dir = temp.path().join("data");
    Node::start_in(
        &dir,
        &["--no-execution", "--auth", auth.to_str().expect("path")],
    )
}

async fn cas(node: &Node) -> ContentAddressableStorageClient<Channel> {
    node.cas().await
}

fn update(instance: &str, data: &[u8]) -> BatchUpdateBlobsRequest {
    BatchUpdateBlobsRequest {
        instance_name: instance.to_string(),
        requests: vec![UpdateRequest {
            digest: Some(wire(&sha256(data))),
            data: data.to_vec().into(),
            compressor: 0,
        }],
        ..Default::default()
    }
}

/// Whether `data` is missing on `instance`, asked as `ci`.
async fn missing(node: &Node, instance: &str, data: &[u8]) -> bool {
    let response = cas(node)
        .await
        .find_missing_blobs(bearer(
            FindMissingBlobsRequest {
                instance_name: instance.to_string(),
                blob_digests: vec![wire(&sha256(data))],
                ..Default::default()
            },
            CI,
        ))
        .await
        .expect("FindMissingBlobs as ci")
        .into_inner();
    !response.missing_blob_digests.is_empty()
}

fn assert_status(result: Result<impl std::fmt::Debug, Status>, code: Code, parts: &[&str]) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    for part in parts {
        assert!(status.message().contains(part), "{part}: {status:?}");
    }
}

#[tokio::test]
async fn missing_or_wrong_tokens_are_unauthenticated() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let node = node_with_auth(&temp);
    let data = b"never stored".to_vec();
    let mut client = cas(&node).await;
    let refused = client
        .batch_update_blobs(bearer(update("", &data), "wrong-token"))
        .await;
    assert_status(refused, Code::Unauthenticated, &["unknown credentials"]);
    let refused = client
        .batch_update_blobs(Request::new(update("", &data)))
        .await;
    assert_status(refused, Code::Unauthenticated, &["credentials required"]);
    let refused = node
        .capabilities()
        .await
        .get_capabilities(bearer(GetCapabilitiesRequest::default(), "wrong-token"))
        .await;
    assert_status(refused, Code::Unauthenticated, &[]);
    let mut malformed = Request::new(update("", &data));
    malformed
        .metadata_mut()
        .insert("authorization", "Token wrong-token".parse().unwrap());
    let refused = client.batch_update_blobs(malformed).await;
    assert_status(refused, Code::Unauthenticated, &["malformed"]);
    assert!(missing(&node, "", &data).await, "a refused upload stored");

    // Every principal may ask for the capabilities; the refusals above were counted.
    node.capabilities()
        .await
        .get_capabilities(bearer(GetCapabilitiesRequest::default(), READER))
        .await
        .expect("GetCapabilities as reader");
    let metrics = http(
        node.http,
        "GET",
        "/metrics",
        &[("Authorization", &format!("Bearer {OPS}"))],
        b"",
    );
    assert_eq!(metrics.0, 200);
    let text = String::from_utf8_lossy(&metrics.2).to_string();
    for line in [
        "cairn_auth_failures_total{reason=\"unknown_token\"} 2",
        "cairn_auth_failures_total{reason=\"missing\"} 1",
        "cairn_auth_failures_total{reason=\"malformed\"} 1",
    ] {
        assert!(text.contains(line), "{line} not in /metrics");
    }
}

#[tokio::test]
async fn a_read_only_principal_cannot_upload_and_nothing_is_stored() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let node = node_with_auth(&temp);
    let data = blob(7, 3000);
    let refused = cas(&node)
        .await
        .batch_update_blobs(bearer(update("main", &data), READER))
        .await;
    assert_status(
        refused,
        Code::PermissionDenied,
        &["reader", "`write`", "instance `main`"],
    );
    let digest = sha256(&data);
    let requests = write_requests(&upload_name("main", &digest), &data, 1024);
    let request = bearer(tokio_stream::iter(requests), READER);
    let refused = ByteStreamClient::new(node.channel().await)
        .write(request)
        .await;
    assert_status(refused, Code::PermissionDenied, &["`write`"]);
    assert!(
        missing(&node, "main", &data).await,
        "a refused upload stored"
    );
    // The reader reads what someone allowed stored.
    cas(&node)
        .await
        .batch_update_blobs(bearer(update("main", &data), UPLOADER))
        .await
        .expect("upload as uploader");
    let read = cas(&node)
        .await
        .batch_read_blobs(bearer(
            BatchReadBlobsRequest {
                instance_name: "main".to_string(),
                digests: vec![wire(&digest)],
                ..Default::default()
            },
            READER,
        ))
        .await
        .expect("read as reader")
        .into_inner();
    assert_eq!(read.responses[0].data.as_ref(), &data[..]);
}

#[tokio::test]
async fn a_write_only_principal_cannot_update_the_action_cache() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let node = node_with_auth(&temp);
    let action = wire(&sha256(b"an action"));
    let forged = ActionResult {
        exit_code: 0,
        ..Default::default()
    };
    let mut ac = ActionCacheClient::new(node.channel().await);
    let refused = ac
        .update_action_result(bearer(
            UpdateActionResultRequest {
                action_digest: Some(action.clone()),
                action_result: Some(forged.clone()),
                ..Default::default()
            },
            UPLOADER,
        ))
        .await;
    assert_status(
        refused,
        Code::PermissionDenied,
        &["uploader", "`write_ac`", "instance ``"],
    );
    let lookup = ac
        .get_action_result(bearer(
            GetActionResultRequest {
                action_digest: Some(action.clone()),
                ..Default::default()
            },
            CI,
        ))
        .await;
    assert_status(lookup, Code::NotFound, &[]);
    // `write_ac` may.
    ac.update_action_result(bearer(
        UpdateActionResultRequest {
            action_digest: Some(action.clone()),
            action_result: Some(forged),
            ..Default::default()
        },
        CI,
    ))
    .await
    .expect("UpdateActionResult as ci");
}

#[tokio::test]
async fn a_principal_limited_to_one_instance_cannot_read_another() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let node = node_with_auth(&temp);
    let data = blob(3, 500);
    for instance in ["a", "b"] {
        cas(&node)
            .await
            .batch_update_blobs(bearer(update(instance, &data), CI))
            .await
            .expect("upload as ci");
    }
    let read = |instance: &str| BatchReadBlobsRequest {
        instance_name: instance.to_string(),
        digests: vec![wire(&sha256(&data))],
        ..Default::default()
    };
    let refused = cas(&node)
        .await
        .batch_read_blobs(bearer(read("b"), TEAM_A))
        .await;
    assert_status(
        refused,
        Code::PermissionDenied,
        &["team-a", "`read`", "instance `b`"],
    );
    for instance in ["a", "a/sub"] {
        cas(&node)
            .await
            .batch_read_blobs(bearer(read(instance), TEAM_A))
            .await
            .expect("team-a reads its own instance");
    }
    let refused = cas(&node)
        .await
        .batch_update_blobs(bearer(update("ab", &data), TEAM_A))
        .await;
    assert_status(refused, Code::PermissionDenied, &["instance `ab`"]);
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

#[tokio::test]
async fn http_basic_and_bearer_credentials() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let node = node_with_auth(&temp);
    let data = blob(11, 2048);
    let path = format!("/cas/{}", sha256(&data).hash_hex());
    let alice = basic("alice", PASSWORD);

    let (status, head, _) = http(
        node.http,
        "PUT",
        &path,
        &[("Authorization", &basic("alice", "wrong"))],
        &data,
    );
    assert_eq!(status, 401);
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: basic"),
        "{head}"
    );
    let (status, head, _) = http(node.http, "PUT", &path, &[], &data);
    assert_eq!(status, 401, "{head}");
    assert!(head
        .to_ascii_lowercase()
        .contains("www-authenticate: basic"));
    let (status, _, _) = http(
        node.http,
        "PUT",
        &path,
        &[("Authorization", &format!("Bearer {READER}"))],
        &data,
    );
    assert_eq!(status, 403);
    assert!(missing(&node, "", &data).await, "a refused PUT stored");

    let (status, _, _) = http(node.http, "PUT", &path, &[("Authorization", &alice)], &data);
    assert_eq!(status, 200);
    let (status, _, body) = http(node.http, "GET", &path, &[("Authorization", &alice)], b"");
    assert_eq!(status, 200);
    assert_eq!(body, data);
    let (status, _, body) = http(
        node.http,
        "GET",
        &path,
        &[("Authorization", &format!("Bearer {READER}"))],
        b"",
    );
    assert_eq!((status, body), (200, data.clone()));
    // Alice may write blobs but not action results.
    let ac_path = format!("/ac/{}", sha256(b"action").hash_hex());
    let (status, _, _) = http(
        node.http,
        "PUT",
        &ac_path,
        &[("Authorization", &alice)],
        b"",
    );
    assert_eq!(status, 403);

    // Health stays open; metrics need the permission.
    assert_eq!(http(node.http, "GET", "/healthz", &[], b"").0, 200);
    assert_eq!(http(node.http, "GET", "/metrics", &[], b"").0, 401);
    assert_eq!(
        http(
            node.http,
            "GET",
            "/metrics",
            &[("Authorization", &alice)],
            b""
        )
        .0,
        403
    );
    let (status, _, body) = http(
        node.http,
        "GET",
        "/metrics",
        &[("Authorization", &format!("Bearer {OPS}"))],
        b"",
    );
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("cairn_auth_failures_total{reason=\"bad_password\"} 1"),
        "{text}"
    );
}

/// Polls `condition` up to 300 times, 20 ms apart (the node reads the file once a
/// second).
async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for _ in 0..1500 {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not after 1500 attempts");
}

async fn capabilities_as(node: &Node, token: &str) -> Result<(), Status> {
    node.capabilities()
        .await
        .get_capabilities(bearer(GetCapabilitiesRequest::default(), token))
        .await
        .map(|_| ())
}

fn reloads(node: &Node, result: &str) -> u64 {
    let (status, _, body) = http(
        node.http,
        "GET",
        "/metrics",
        &[("Authorization", &format!("Bearer {OPS}"))],
        b"",
    );
    assert_eq!(status, 200);
    let prefix = format!("cairn_auth_reloads_total{{result=\"{result}\"}} ");
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|line| line.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn the_auth_file_is_reloaded_and_a_broken_edit_keeps_the_old_one() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let node = node_with_auth(&temp);
    let path = temp.path().join("auth.json5");
    capabilities_as(&node, READER).await.expect("reader known");
    let newcomer = "newcomer-token-3c3c";
    assert_eq!(
        capabilities_as(&node, newcomer).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // The reader goes, a newcomer comes, ops stays (to read the metrics).
    std::fs::write(
        &path,
        format!(
            "{{ principals: [
                {{ name: 'newcomer', token_sha256: '{}', permissions: ['read'] }},
                {{ name: 'ops', token_sha256: '{}', permissions: ['metrics'] }},
            ] }}",
            token_hash(newcomer),
            token_hash(OPS)
        ),
    )
    .expect("edit the auth file");
    eventually("the new token works", async || {
        capabilities_as(&node, newcomer).await.is_ok()
    })
    .await;
    assert_eq!(
        capabilities_as(&node, READER).await.unwrap_err().code(),
        Code::Unauthenticated,
        "a removed token still works"
    );
    eventually("the reload is counted", async || reloads(&node, "ok") == 1).await;

    std::fs::write(&path, "{ principals: [ { name: 'half an edit'").expect("break the file");
    eventually("the broken file is seen", async || {
        reloads(&node, "refused") == 1
    })
    .await;
    capabilities_as(&node, newcomer)
        .await
        .expect("the previous file stays in force");
    assert_eq!(
        capabilities_as(&node, READER).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn read_only_refuses_every_write() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let node = Node::start_in(
        &temp.path().join("data"),
        &["--no-execution", "--read-only"],
    );
    let data = blob(5, 100);
    let refused = cas(&node).await.batch_update_blobs(update("", &data)).await;
    assert_status(refused, Code::PermissionDenied, &["read-only"]);
    let path = format!("/cas/{}", sha256(&data).hash_hex());
    assert_eq!(http(node.http, "PUT", &path, &[], &data).0, 403);
    let found = cas(&node)
        .await
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![wire(&sha256(&data))],
            ..Default::default()
        })
        .await
        .expect("FindMissingBlobs")
        .into_inner();
    assert_eq!(
        found.missing_blob_digests.len(),
        1,
        "a refused write stored"
    );
}

#[test]
fn execution_on_the_network_without_auth_is_refused_before_binding() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let data = temp.path().join("data");
    // 192.0.2.1 (TEST-NET-1) is not loopback and belongs to no interface here, so even
    // a node that failed to refuse could never listen on it (it would fail to bind,
    // with a message that names neither flag).
    let output = Process::new(common::BINARY)
        .args(["--listen", "192.0.2.1:50051", "--data-dir"])
        .arg(&data)
        .env("RUST_LOG", "error")
        .output()
        .expect("run cairn");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--auth"), "{stderr}");
    assert!(
        stderr.contains("--allow-unauthenticated-execution"),
        "{stderr}"
    );
    assert!(
        !data.exists(),
        "the node got as far as creating its data directory"
    );
}

#[tokio::test]
async fn a_single_node_executes_with_auth_through_its_own_worker() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let auth = auth_file(temp.path());
    let node = Node::start_in(
        &temp.path().join("data"),
        &["--auth", auth.to_str().expect("path")],
    );
    let command = Command {
        arguments: vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo authorised > out".into(),
        ],
        output_paths: vec!["out".into()],
        ..Default::default()
    }
    .encode_to_vec();
    let root = Directory::default().encode_to_vec();
    let action = Action {
        command_digest: Some(wire(&sha256(&command))),
        input_root_digest: Some(wire(&sha256(&root))),
        ..Default::default()
    }
    .encode_to_vec();
    for blob in [&command, &root, &action] {
        cas(&node)
            .await
            .batch_update_blobs(bearer(update("", blob), CI))
            .await
            .expect("upload as ci");
    }
    let execute = || ExecuteRequest {
        action_digest: Some(wire(&sha256(&action))),
        ..Default::default()
    };
    let mut execution = ExecutionClient::new(node.channel().await);
    let refused = execution.execute(bearer(execute(), UPLOADER)).await;
    assert_status(refused, Code::PermissionDenied, &["`execute`"]);

    let mut stream = execution
        .execute(bearer(execute(), CI))
        .await
        .expect("Execute as ci")
        .into_inner();
    let mut last = None;
    while let Some(operation) = stream.message().await.expect("Execute stream") {
        last = Some(operation);
    }
    let response = match last.and_then(|operation| operation.result) {
        Some(cairn_proto::longrunning::operation::Result::Response(any)) => {
            ExecuteResponse::decode(any.value.as_slice()).expect("ExecuteResponse")
        }
        other => panic!("no response: {other:?}"),
    };
    assert_eq!(response.status.map_or(0, |status| status.code), 0);
    let result = response.result.expect("a result");
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.output_files.len(), 1, "{result:?}");
    // The worker wrote the result under the node's own principal.
    let cached = ActionCacheClient::new(node.channel().await)
        .get_action_result(bearer(
            GetActionResultRequest {
                action_digest: Some(wire(&sha256(&action))),
                ..Default::default()
            },
            READER,
        ))
        .await
        .expect("the result is in the action cache")
        .into_inner();
    assert_eq!(cached.output_files, result.output_files);
}
