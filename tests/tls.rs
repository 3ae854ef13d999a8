//! TLS and mutual TLS on the real `cairn` binary: certificates made by the `openssl`
//! CLI for each test (a CA, a server certificate for 127.0.0.1 and localhost, a client
//! certificate of that CA and one of another CA), tonic's rustls client for gRPC and
//! `curl` for the HTTP listener.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command as Process;

use cairn_proto::reapi::action_cache_client::ActionCacheClient;
use cairn_proto::reapi::{ActionResult, UpdateActionResultRequest};
use common::certs::{certificates, make_cert};
use common::free_port;
use tonic::Code;

use cairn_proto::reapi::batch_update_blobs_request::Request as UpdateRequest;
use cairn_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use cairn_proto::reapi::{BatchReadBlobsRequest, BatchUpdateBlobsRequest};
use common::{bearer, blob, sha256, wire, Node};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

fn path(dir: &Path, file: &str) -> PathBuf {
    dir.join(file)
}

/// A cache-only node serving TLS with `server.pem`, plus `extra` flags.
fn tls_node(dir: &Path, extra: &[&str]) -> Node {
    let cert = path(dir, "server.pem");
    let key = path(dir, "server.key");
    let mut args = vec![
        "--no-execution",
        "--tls-cert",
        cert.to_str().expect("path"),
        "--tls-key",
        key.to_str().expect("path"),
    ];
    args.extend_from_slice(extra);
    Node::start_in(&dir.join("data"), &args)
}

/// A TLS channel to `node` trusting `ca.pem`, presenting `identity` (a name of a
/// certificate made by [`certificates`]) if given.
async fn tls_channel(
    node: &Node,
    dir: &Path,
    identity: Option<&str>,
) -> Result<Channel, tonic::transport::Error> {
    let ca = std::fs::read(path(dir, "ca.pem")).expect("ca.pem");
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(name) = identity {
        let cert = std::fs::read(path(dir, &format!("{name}.pem"))).expect("certificate");
        let key = std::fs::read(path(dir, &format!("{name}.key"))).expect("key");
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{}", node.grpc))
        .expect("endpoint")
        .tls_config(tls)
        .expect("TLS config")
        .connect()
        .await
}

/// Uploads and reads back a blob over `channel`.
async fn round_trip(channel: Channel, seed: u64) -> Result<(), tonic::Status> {
    let data = blob(seed, 4096);
    let digest = wire(&sha256(&data));
    let mut cas = ContentAddressableStorageClient::new(channel);
    cas.batch_update_blobs(BatchUpdateBlobsRequest {
        requests: vec![UpdateRequest {
            digest: Some(digest.clone()),
            data: data.clone().into(),
            compressor: 0,
        }],
        ..Default::default()
    })
    .await?;
    let read = cas
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: vec![digest],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(read.responses[0].data.as_ref(), &data[..]);
    Ok(())
}

/// `curl` against the node's HTTP listener; returns the status code curl saw (0 when
/// the connection or handshake failed).
fn curl(node: &Node, dir: &Path, scheme: &str, path_and_query: &str, extra: &[&str]) -> u16 {
    let port = node.http.port();
    let output = Process::new("curl")
        .args([
            "--silent",
            "--output",
            "/dev/null",
            "--write-out",
            "%{http_code}",
        ])
        .args(["--max-time", "20", "--cacert"])
        .arg(path(dir, "ca.pem"))
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(extra)
        .arg(format!("{scheme}://localhost:{port}{path_and_query}"))
        .current_dir(dir)
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[tokio::test]
async fn grpc_and_http_over_tls() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let dir = temp.path();
    certificates(dir);
    let node = tls_node(dir, &[]);
    let channel = tls_channel(&node, dir, None).await.expect("TLS connect");
    round_trip(channel, 1).await.expect("over TLS");

    // A plaintext client on the TLS port gets nowhere.
    let plaintext = Channel::from_shared(format!("http://{}", node.grpc))
        .expect("endpoint")
        .connect()
        .await;
    match plaintext {
        Err(_) => {}
        Ok(channel) => assert!(round_trip(channel, 2).await.is_err()),
    }

    assert_eq!(curl(&node, dir, "https", "/healthz", &[]), 200);
    assert_eq!(
        curl(&node, dir, "http", "/healthz", &[]),
        0,
        "plaintext HTTP"
    );
    let data = blob(3, 1000);
    std::fs::write(dir.join("blob"), &data).expect("write the blob");
    let put = format!("/cas/{}", sha256(&data).hash_hex());
    assert_eq!(
        curl(&node, dir, "https", &put, &["--upload-file", "blob"]),
        200
    );
    assert_eq!(curl(&node, dir, "https", &put, &[]), 200);
}

#[tokio::test]
async fn mutual_tls_needs_a_client_certificate_of_the_ca() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let dir = temp.path();
    certificates(dir);
    let ca = path(dir, "ca.pem");
    let node = tls_node(dir, &["--tls-client-ca", ca.to_str().expect("path")]);

    for identity in [None, Some("stranger"), Some("expired")] {
        let refused = match tls_channel(&node, dir, identity).await {
            Err(_) => true,
            Ok(channel) => round_trip(channel, 4).await.is_err(),
        };
        assert!(refused, "{identity:?} was let in");
    }
    let channel = tls_channel(&node, dir, Some("client"))
        .await
        .expect("TLS connect with a client certificate");
    round_trip(channel, 5)
        .await
        .expect("with the CA's client certificate");

    assert_eq!(
        curl(&node, dir, "https", "/healthz", &[]),
        0,
        "no certificate"
    );
    let with_cert = ["--cert", "client.pem", "--key", "client.key"];
    assert_eq!(curl(&node, dir, "https", "/healthz", &with_cert), 200);
}

#[tokio::test]
async fn the_secure_example_config_starts_and_enforces_its_auth_file() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let dir = temp.path();
    certificates(dir);
    let root = env!("CARGO_MANIFEST_DIR");
    let (grpc, http) = (free_port(), free_port());
    let mut command = Process::new(common::BINARY);
    command
        .env("CAIRN_DATA", dir.join("data"))
        .env("CAIRN_TLS", dir)
        .env("CAIRN_AUTH", format!("{root}/config/auth.json5"))
        .args(["--config", &format!("{root}/config/secure-node.json5")])
        // The file listens on every interface; the test keeps to loopback.
        .args(["--listen", &grpc.to_string()])
        .args(["--http-listen", &http.to_string()]);
    let node = Node::spawn(command, grpc, http, dir.join("data"));

    let refused = match tls_channel(&node, dir, None).await {
        Err(_) => true,
        Ok(channel) => round_trip(channel, 6).await.is_err(),
    };
    assert!(refused, "no client certificate was let in");
    let channel = tls_channel(&node, dir, Some("client"))
        .await
        .expect("mutual TLS");
    let refused = round_trip(channel.clone(), 7).await.expect_err("no token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    let data = blob(8, 100);
    let mut cas = ContentAddressableStorageClient::new(channel.clone());
    cas.batch_update_blobs(bearer(
        BatchUpdateBlobsRequest {
            requests: vec![UpdateRequest {
                digest: Some(wire(&sha256(&data))),
                data: data.clone().into(),
                compressor: 0,
            }],
            ..Default::default()
        },
        "example-ci-token",
    ))
    .await
    .expect("ci uploads");
    let forged = ActionCacheClient::new(channel)
        .update_action_result(bearer(
            UpdateActionResultRequest {
                action_digest: Some(wire(&sha256(b"action"))),
                action_result: Some(ActionResult::default()),
                instance_name: "main".to_string(),
                ..Default::default()
            },
            "example-reader-token",
        ))
        .await
        .expect_err("developers may only read");
    assert_eq!(forged.code(), Code::PermissionDenied);

    let with_cert = ["--cert", "client.pem", "--key", "client.key"];
    let alice = [&with_cert[..], &["--user", "alice:example-password"]].concat();
    let get = format!("/cas/{}", sha256(&data).hash_hex());
    assert_eq!(curl(&node, dir, "https", &get, &alice), 200);
    let metrics = [
        &with_cert[..],
        &["--header", "Authorization: Bearer example-metrics-token"],
    ]
    .concat();
    assert_eq!(curl(&node, dir, "https", "/metrics", &metrics), 200);
    assert_eq!(curl(&node, dir, "https", "/metrics", &with_cert), 401);
}

#[tokio::test]
async fn client_certificates_are_principals_by_common_name_or_alternative_name() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let dir = temp.path();
    certificates(dir);
    let client = "extendedKeyUsage=clientAuth\n";
    make_cert(dir, "ca", "intruder", "intruder", client);
    make_cert(
        dir,
        "ca",
        "builder",
        "some host",
        "extendedKeyUsage=clientAuth\nsubjectAltName=DNS:builder.example\n",
    );
    std::fs::write(
        dir.join("auth.json5"),
        "{ principals: [
            { name: 'ci', cert: 'ci-client', permissions: ['read', 'write'] },
            { name: 'builder', cert: 'builder.example', permissions: ['read'] },
        ] }",
    )
    .expect("write the auth file");
    let ca = path(dir, "ca.pem");
    let auth = path(dir, "auth.json5");
    let node = tls_node(
        dir,
        &[
            "--tls-client-ca",
            ca.to_str().expect("path"),
            "--auth",
            auth.to_str().expect("path"),
        ],
    );
    let channel = tls_channel(&node, dir, Some("client"))
        .await
        .expect("connect as ci-client");
    round_trip(channel, 9)
        .await
        .expect("ci by its certificate's CN");

    let channel = tls_channel(&node, dir, Some("builder"))
        .await
        .expect("connect as builder");
    let refused = round_trip(channel, 10)
        .await
        .expect_err("builder may only read");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("builder lacks the `write`"),
        "{refused:?}"
    );

    let channel = tls_channel(&node, dir, Some("intruder"))
        .await
        .expect("connect as intruder");
    let refused = round_trip(channel, 11).await.expect_err("no principal");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    let with_cert = ["--cert", "client.pem", "--key", "client.key"];
    let data = blob(9, 4096);
    let get = format!("/cas/{}", sha256(&data).hash_hex());
    assert_eq!(curl(&node, dir, "https", &get, &with_cert), 200);
    let intruder = ["--cert", "intruder.pem", "--key", "intruder.key"];
    assert_eq!(curl(&node, dir, "https", &get, &intruder), 401);
}

/// A TLS channel to `node` trusting the CA `ca` (`ca.pem` or `other-ca.pem`).
async fn channel_trusting(node: &Node, dir: &Path, ca: &str) -> Option<Channel> {
    let ca = std::fs::read(path(dir, &format!("{ca}.pem"))).expect("CA");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    Channel::from_shared(format!("https://{}", node.grpc))
        .expect("endpoint")
        .tls_config(tls)
        .expect("TLS config")
        .connect()
        .await
        .ok()
}

#[tokio::test]
async fn a_rotated_certificate_serves_new_connections_and_keeps_established_ones() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let dir = temp.path();
    certificates(dir);
    make_cert(
        dir,
        "other-ca",
        "rotated",
        "localhost",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    );
    let node = tls_node(dir, &[]);
    let established = channel_trusting(&node, dir, "ca").await.expect("connect");
    round_trip(established.clone(), 12)
        .await
        .expect("before the rotation");

    // Renamed into place, key first: the node may read between the two, sees a key
    // that does not fit, and keeps the old pair until the certificate follows.
    for (from, to) in [("rotated.key", "server.key"), ("rotated.pem", "server.pem")] {
        std::fs::copy(dir.join(from), dir.join(format!("{to}.new"))).expect("copy");
        std::fs::rename(dir.join(format!("{to}.new")), dir.join(to)).expect("rename");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let rotated = loop {
        if let Some(channel) = channel_trusting(&node, dir, "other-ca").await {
            break channel;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was not served within 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    round_trip(rotated, 13)
        .await
        .expect("with the new certificate");
    assert!(
        channel_trusting(&node, dir, "ca").await.is_none(),
        "a new connection still got the old certificate"
    );
    // The established connection trusts only the old CA: it still works, so it was
    // kept, not made again.
    round_trip(established, 14)
        .await
        .expect("after the rotation");
}

/// SIGHUP reads the TLS files again at once, even unchanged (so only the signal can
/// cause the reload the log reports), and the node keeps serving: SIGHUP's default
/// action would end the process, which is what an operator's `systemctl reload` or a
/// certificate renewer's hook must never do.
#[tokio::test]
async fn sighup_reloads_the_tls_files_and_keeps_serving() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let dir = temp.path();
    certificates(dir);
    let (grpc, http) = (free_port(), free_port());
    let log = dir.join("node.log");
    let mut command = Process::new(common::BINARY);
    command
        .args(["--listen", &grpc.to_string()])
        .args(["--http-listen", &http.to_string()])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--max-size", "1GiB", "--no-execution", "--tls-cert"])
        .arg(path(dir, "server.pem"))
        .arg("--tls-key")
        .arg(path(dir, "server.key"))
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).expect("log file"));
    let node = Node::spawn(command, grpc, http, dir.join("data"));
    let before = tls_channel(&node, dir, None).await.expect("connect");
    round_trip(before.clone(), 15).await.expect("before SIGHUP");

    node.signal(libc::SIGHUP);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !read_log().contains("TLS certificate reloaded") {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload after SIGHUP: {}",
            read_log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(read_log().contains("SIGHUP"), "{}", read_log());
    round_trip(before, 16)
        .await
        .expect("the same connection after SIGHUP");
    let after = tls_channel(&node, dir, None)
        .await
        .expect("connect after SIGHUP");
    round_trip(after, 17)
        .await
        .expect("a new connection after SIGHUP");
    assert!(node.terminate().success(), "the node did not stop cleanly");
}
