//! Remote execution with TLS and tokens between every process: a `cairn` cache node,
//! `cairn-scheduler` and `cairn-worker`, each serving or connecting over TLS with
//! certificates made by the `openssl` CLI, and one auth file (the node's format) in
//! force on both servers. A client executes through real tonic TLS clients; the
//! scheduler reads actions from the node with its own token, and the worker registers
//! and uploads with its own. Refusals are checked through the same clients: a worker
//! with a wrong token never registers, a principal without `execute` or outside its
//! instance is denied, a plaintext client gets nowhere, and a scheduler told to listen
//! off loopback without `--auth` refuses to start.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use cairn_proto::reapi::batch_update_blobs_request::Request as UpdateRequest;
use cairn_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use cairn_proto::reapi::execution_client::ExecutionClient;
use cairn_proto::reapi::{
    Action, BatchUpdateBlobsRequest, Command, Directory, ExecuteRequest, ExecuteResponse,
};
use cairn_proto::worker::worker_api_client::WorkerApiClient;
use cairn_proto::worker::ListWorkersRequest;
use common::certs::certificates;
use common::{bearer, exec_binary, sha256, token_hash, wire, Node, SCHEDULER, WORKER};
use prost::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

const CI: &str = "ci-exec-token-1";
const UPLOADER: &str = "uploader-token-2";
const TEAM_A: &str = "team-a-token-3";
const SCHEDULER_TOKEN: &str = "scheduler-token-4";
const WORKER_TOKEN: &str = "worker-token-5";
const OPS: &str = "ops-token-6";

/// One auth file for the node and the scheduler: clients, the scheduler (reads actions
/// and the action cache), workers (upload outputs, write results, register).
fn auth_file(dir: &Path) -> PathBuf {
    let text = format!(
        "{{ principals: [
    {{ name: 'ci', token_sha256: '{}', permissions: ['read', 'write', 'execute'] }},
    {{ name: 'uploader', token_sha256: '{}', permissions: ['read', 'write'] }},
    {{ name: 'team-a', token_sha256: '{}', permissions: ['read', 'write', 'execute'], instances: ['a/'] }},
    {{ name: 'scheduler', token_sha256: '{}', permissions: ['read'] }},
    {{ name: 'worker', token_sha256: '{}', permissions: ['read', 'write', 'write_ac'] }},
    {{ name: 'ops', token_sha256: '{}', permissions: ['metrics'] }},
    {{ name: 'builder-cert', cert: 'ci-client', permissions: ['read', 'write', 'write_ac', 'metrics'] }},
] }}",
        token_hash(CI),
        token_hash(UPLOADER),
        token_hash(TEAM_A),
        token_hash(SCHEDULER_TOKEN),
        token_hash(WORKER_TOKEN),
        token_hash(OPS),
    );
    let path = dir.join("auth.json5");
    std::fs::write(&path, text).expect("write the auth file");
    path
}

fn token_file(dir: &Path, name: &str, token: &str) -> PathBuf {
    let path = dir.join(format!("{name}.token"));
    std::fs::write(&path, format!("{token}\n")).expect("write a token file");
    path
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// A child process, killed on drop, whose standard error goes to a file.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn start(mut command: Process, log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).expect("log file");
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .env("RUST_LOG", "warn");
        Proc {
            child: command.spawn().expect("start a cairn binary"),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls until `path` exists (the process's ready file); fails if the process exits.
    fn wait_for(&mut self, path: &Path) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = std::fs::read_to_string(path) {
                if !text.is_empty() {
                    return text;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("exited before it was ready ({status}): {}", self.log());
            }
            assert!(Instant::now() < deadline, "not ready: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The node, the scheduler and their files, all over TLS with the auth file.
struct Secure {
    dir: PathBuf,
    node: Node,
    scheduler: Proc,
    scheduler_port: u16,
}

impl Secure {
    /// The node and a scheduler with `scheduler_args` added.
    fn start(dir: &Path) -> Secure {
        Self::start_with(dir, &[])
    }

    fn start_with(dir: &Path, scheduler_args: &[&str]) -> Secure {
        certificates(dir);
        let auth = auth_file(dir);
        let cert = dir.join("server.pem");
        let key = dir.join("server.key");
        let node = Node::start_in(
            &dir.join("data"),
            &[
                "--no-execution",
                "--tls-cert",
                arg(&cert),
                "--tls-key",
                arg(&key),
                "--auth",
                arg(&auth),
            ],
        );
        let ready = dir.join("scheduler.addr");
        let mut command = Process::new(exec_binary(SCHEDULER));
        command
            .args(["--listen", "127.0.0.1:0", "--cache"])
            .arg(format!("https://localhost:{}", node.grpc.port()))
            .args(["--tls-ca", arg(&dir.join("ca.pem"))])
            .args(["--tls-cert", arg(&cert), "--tls-key", arg(&key)])
            .args(["--auth", arg(&auth)])
            .args([
                "--token-file",
                arg(&token_file(dir, "scheduler", SCHEDULER_TOKEN)),
            ])
            .args(["--ready-file", arg(&ready)])
            .args(scheduler_args);
        let mut scheduler = Proc::start(command, dir.join("scheduler.log"));
        let address = scheduler.wait_for(&ready);
        let scheduler_port = address
            .trim()
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("scheduler address");
        Secure {
            dir: dir.to_path_buf(),
            node,
            scheduler,
            scheduler_port,
        }
    }

    /// A worker presenting `token`; its ready file is `<name>.ready`.
    fn worker(&self, name: &str, token: &str) -> Proc {
        let mut command = Process::new(exec_binary(WORKER));
        command.args(["--token-file", arg(&token_file(&self.dir, name, token))]);
        self.worker_with(name, command)
    }

    /// A worker started by `command` (its credentials already given).
    fn worker_with(&self, name: &str, mut command: Process) -> Proc {
        command
            .arg("--scheduler")
            .arg(format!("https://localhost:{}", self.scheduler_port))
            .arg("--cache")
            .arg(format!("https://localhost:{}", self.node.grpc.port()))
            .args(["--tls-ca", arg(&self.dir.join("ca.pem"))])
            .args(["--id", name, "--max-inflight-tasks", "2"])
            .arg("--work-dir")
            .arg(self.dir.join(name))
            .arg("--ready-file")
            .arg(self.dir.join(format!("{name}.ready")));
        Proc::start(command, self.dir.join(format!("{name}.log")))
    }

    async fn channel(&self, port: u16) -> Channel {
        let ca = std::fs::read(self.dir.join("ca.pem")).expect("ca.pem");
        let cert = std::fs::read(self.dir.join("client.pem")).expect("client.pem");
        let key = std::fs::read(self.dir.join("client.key")).expect("client.key");
        // The client certificate matters only to a scheduler that asks for one.
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key));
        Channel::from_shared(format!("https://localhost:{port}"))
            .expect("endpoint")
            .tls_config(tls)
            .expect("TLS config")
            .connect()
            .await
            .expect("TLS connect")
    }

    async fn workers(&self) -> Vec<String> {
        let mut client = WorkerApiClient::new(self.channel(self.scheduler_port).await);
        client
            .list_workers(bearer(ListWorkersRequest::default(), OPS))
            .await
            .expect("ListWorkers as ops")
            .into_inner()
            .workers
            .into_iter()
            .map(|worker| worker.worker_id)
            .collect()
    }

    /// Uploads an action writing `text` to `out`, as `ci`; returns its digest.
    async fn action(&self, instance: &str, text: &str) -> cairn_proto::reapi::Digest {
        let command = Command {
            arguments: vec!["/bin/sh".into(), "-c".into(), format!("echo {text} > out")],
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
        let mut cas =
            ContentAddressableStorageClient::new(self.channel(self.node.grpc.port()).await);
        let requests = [&command, &root, &action]
            .into_iter()
            .map(|blob| UpdateRequest {
                digest: Some(wire(&sha256(blob))),
                data: blob.clone().into(),
                compressor: 0,
            })
            .collect();
        cas.batch_update_blobs(bearer(
            BatchUpdateBlobsRequest {
                instance_name: instance.to_string(),
                requests,
                ..Default::default()
            },
            CI,
        ))
        .await
        .expect("upload as ci");
        wire(&sha256(&action))
    }

    /// Executes `action` on `instance` as `token` through the scheduler.
    async fn execute(
        &self,
        instance: &str,
        action: &cairn_proto::reapi::Digest,
        token: &str,
    ) -> Result<ExecuteResponse, tonic::Status> {
        let mut execution = ExecutionClient::new(self.channel(self.scheduler_port).await);
        let mut stream = execution
            .execute(bearer(
                ExecuteRequest {
                    instance_name: instance.to_string(),
                    action_digest: Some(action.clone()),
                    ..Default::default()
                },
                token,
            ))
            .await?
            .into_inner();
        let mut last = None;
        while let Some(operation) = stream.message().await? {
            last = Some(operation);
        }
        match last.and_then(|operation| operation.result) {
            Some(cairn_proto::longrunning::operation::Result::Response(any)) => {
                Ok(ExecuteResponse::decode(any.value.as_slice()).expect("ExecuteResponse"))
            }
            other => panic!("no response: {other:?}"),
        }
    }
}

fn assert_refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, part: &str) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(part), "{status:?}");
}

#[tokio::test]
async fn execution_over_tls_with_tokens_between_node_scheduler_and_worker() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let secure = Secure::start(temp.path());

    // A worker with a token nobody has is refused at registration and never listed.
    let intruder = secure.worker("intruder", "not-a-known-token");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !intruder.log().contains("unknown credentials") {
        assert!(
            Instant::now() < deadline,
            "the intruding worker was not refused: {}",
            intruder.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!temp.path().join("intruder.ready").exists());
    assert!(secure.workers().await.is_empty());
    drop(intruder);

    let mut worker = secure.worker("builder", WORKER_TOKEN);
    worker.wait_for(&temp.path().join("builder.ready"));
    assert_eq!(secure.workers().await, vec!["builder".to_string()]);

    let action = secure.action("", "over-tls").await;
    assert_refused(
        secure.execute("", &action, UPLOADER).await,
        Code::PermissionDenied,
        "`execute`",
    );
    assert_refused(
        secure.execute("", &action, "wrong-token").await,
        Code::Unauthenticated,
        "unknown credentials",
    );
    let response = secure
        .execute("", &action, CI)
        .await
        .expect("Execute as ci");
    assert_eq!(response.status.map_or(0, |status| status.code), 0);
    let result = response.result.expect("a result");
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.output_files.len(), 1, "{result:?}");
    assert!(!response.cached_result);
    // The worker's principal wrote the result: the next Execute is a cache hit, found
    // by the scheduler with its own token.
    let again = secure
        .execute("", &action, CI)
        .await
        .expect("second Execute");
    assert!(again.cached_result, "{again:?}");

    // A principal limited to instance prefix `a/` executes there, not elsewhere.
    let elsewhere = secure.action("b", "elsewhere").await;
    assert_refused(
        secure.execute("b", &elsewhere, TEAM_A).await,
        Code::PermissionDenied,
        "b",
    );
    let inside = secure.action("a/main", "inside").await;
    let response = secure
        .execute("a/main", &inside, TEAM_A)
        .await
        .expect("Execute on a/main as team-a");
    assert_eq!(response.result.expect("a result").exit_code, 0);

    // A plaintext client on the scheduler's TLS port gets nowhere.
    let plaintext = Channel::from_shared(format!("http://127.0.0.1:{}", secure.scheduler_port))
        .expect("endpoint")
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        let refused = ExecutionClient::new(channel)
            .execute(bearer(
                ExecuteRequest {
                    action_digest: Some(action.clone()),
                    ..Default::default()
                },
                CI,
            ))
            .await;
        assert!(refused.is_err(), "a plaintext Execute was answered");
    }
    assert!(
        !secure.scheduler.log().contains("panicked"),
        "{}",
        secure.scheduler.log()
    );
}

/// Under mutual TLS on the scheduler, a worker is known by its client certificate: one
/// presenting `client.pem` (CN `ci-client`, the `builder-cert` principal) registers with
/// no token, and one without a certificate never completes the handshake.
#[tokio::test]
async fn a_worker_registers_by_its_client_certificate_under_mutual_tls() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let dir = temp.path();
    let ca = dir.join("ca.pem");
    let secure = Secure::start_with(dir, &["--tls-client-ca", arg(&ca)]);

    let anonymous = secure.worker_with("anonymous", Process::new(exec_binary(WORKER)));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !anonymous.log().contains("session with the scheduler at") {
        assert!(
            Instant::now() < deadline,
            "the worker without a certificate was not turned away: {}",
            anonymous.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!dir.join("anonymous.ready").exists());
    drop(anonymous);

    let mut command = Process::new(exec_binary(WORKER));
    command.args([
        "--tls-cert",
        arg(&dir.join("client.pem")),
        "--tls-key",
        arg(&dir.join("client.key")),
    ]);
    let mut worker = secure.worker_with("by-cert", command);
    worker.wait_for(&dir.join("by-cert.ready"));
    let mut client = WorkerApiClient::new(secure.channel(secure.scheduler_port).await);
    let listed: Vec<String> = client
        .list_workers(ListWorkersRequest::default())
        .await
        .expect("ListWorkers as builder-cert, by certificate")
        .into_inner()
        .workers
        .into_iter()
        .map(|worker| worker.worker_id)
        .collect();
    assert_eq!(listed, vec!["by-cert".to_string()]);
}

/// With `--auth`, the scheduler's HTTP listener serves metrics and status only to
/// principals with `metrics`; `/healthz` stays open for load balancers.
#[tokio::test]
async fn the_schedulers_metrics_and_status_need_the_metrics_permission() {
    let temp = tempfile::tempdir().expect("temporary directory");
    let dir = temp.path();
    let http_ready = dir.join("scheduler.http");
    let secure = Secure::start_with(
        dir,
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--http-ready-file",
            arg(&http_ready),
        ],
    );
    let address: std::net::SocketAddr = std::fs::read_to_string(&http_ready)
        .expect("the HTTP ready file is written before the gRPC one")
        .trim()
        .parse()
        .expect("IP:PORT");
    let get = |path: &str, token: Option<&str>| {
        let header = token.map(|token| format!("Bearer {token}"));
        let headers: Vec<(&str, &str)> = header
            .as_deref()
            .map(|value| vec![("authorization", value)])
            .unwrap_or_default();
        common::http_with_headers(address, "GET", path, &headers, b"")
    };
    for path in ["/metrics", "/status", "/"] {
        let (code, head, _) = get(path, None);
        assert_eq!(code, 401, "{path} without credentials");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: basic"),
            "{head}"
        );
        assert_eq!(get(path, Some(WORKER_TOKEN)).0, 403, "{path} as a worker");
        assert_eq!(get(path, Some(OPS)).0, 200, "{path} as ops");
    }
    let (code, _, body) = get("/metrics", Some(OPS));
    assert_eq!(code, 200);
    assert!(
        String::from_utf8_lossy(&body).contains("cairn_scheduler_"),
        "no scheduler metrics"
    );
    assert_eq!(get("/healthz", None).0, 200);
    drop(secure);
}

#[test]
fn a_scheduler_off_loopback_without_auth_refuses_to_start() {
    // 192.0.2.1 (TEST-NET-1) belongs to no interface: a scheduler that failed to refuse
    // would fail to bind, with a message naming neither flag.
    let output = Process::new(exec_binary(SCHEDULER))
        .args(["--listen", "192.0.2.1:50061"])
        .env("RUST_LOG", "error")
        .output()
        .expect("run cairn-scheduler");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--auth"), "{stderr}");
    assert!(
        stderr.contains("--allow-unauthenticated-execution"),
        "{stderr}"
    );
}
