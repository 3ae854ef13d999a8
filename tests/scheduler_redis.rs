//! Several `cairn-scheduler`s sharing their state in a real Redis (`--redis`): a cache
//! node, a `redis-server` on a free loopback port in the test's directory, two
//! schedulers and their workers, all real processes.
//!
//! The tests kill processes the way failures do (SIGKILL, SIGSTOP) and check that no
//! work is lost or done twice: each action appends a line to a marker file of its own,
//! so the number of lines is the number of times it ran. Actions that must be "caught
//! running" wait for a release file the test creates. Every wait polls a condition
//! with a bound.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_proto::longrunning::operations_client::OperationsClient;
use cairn_proto::longrunning::{GetOperationRequest, ListOperationsRequest, Operation};
use cairn_proto::reapi::batch_update_blobs_request::Request as UpdateRequest;
use cairn_proto::reapi::command::EnvironmentVariable;
use cairn_proto::reapi::execution_client::ExecutionClient;
use cairn_proto::reapi::execution_stage::Value as Stage;
use cairn_proto::reapi::{
    Action, BatchUpdateBlobsRequest, Command, Digest, Directory, ExecuteRequest, ExecuteResponse,
    WaitExecutionRequest,
};
use cairn_proto::worker::worker_api_client::WorkerApiClient;
use cairn_proto::worker::ListWorkersRequest;
use common::exec::{response_of, stage_of, wait_for_file, Proc};
use common::{exec_binary, free_port, http, sha256, wire, Node, SCHEDULER, WORKER};
use prost::Message;
use tonic::transport::Channel;

/// A `redis-server` of the test's own, on loopback.
struct Redis {
    process: Proc,
    port: u16,
    /// The TLS port, when the server was given `certs/` (see [`Redis::start_tls`]).
    tls_port: Option<u16>,
    dir: PathBuf,
    aof: bool,
    password: Option<&'static str>,
}

impl Redis {
    /// Starts `redis-server` in `dir`, with append-only persistence (every write synced
    /// before it is acknowledged) if `aof`, requiring `password` if given. Fails the
    /// test, saying so, when `redis-server` is not installed.
    fn start(dir: &Path, aof: bool, password: Option<&'static str>) -> Redis {
        std::fs::create_dir_all(dir).expect("redis directory");
        let port = free_port().port();
        let process = Redis::spawn(dir, port, None, aof, password);
        Redis {
            process,
            port,
            tls_port: None,
            dir: dir.to_path_buf(),
            aof,
            password,
        }
    }

    /// [`Redis::start`] without persistence or password, also serving TLS with the
    /// certificates of `tests/common/certs.rs` made in `dir/certs` (`server.pem` names
    /// `localhost`; clients need not present one).
    fn start_tls(dir: &Path) -> Redis {
        std::fs::create_dir_all(dir.join("certs")).expect("certificate directory");
        common::certs::certificates(&dir.join("certs"));
        let port = free_port().port();
        let tls_port = free_port().port();
        let process = Redis::spawn(dir, port, Some(tls_port), false, None);
        Redis {
            process,
            port,
            tls_port: Some(tls_port),
            dir: dir.to_path_buf(),
            aof: false,
            password: None,
        }
    }

    fn spawn(
        dir: &Path,
        port: u16,
        tls_port: Option<u16>,
        aof: bool,
        password: Option<&str>,
    ) -> Proc {
        let mut command = Process::new("redis-server");
        command.args(["--bind", "127.0.0.1", "--port", &port.to_string()]);
        if let Some(tls_port) = tls_port {
            let certs = dir.join("certs");
            command
                .args(["--tls-port", &tls_port.to_string()])
                .arg("--tls-cert-file")
                .arg(certs.join("server.pem"))
                .arg("--tls-key-file")
                .arg(certs.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(certs.join("ca.pem"))
                .args(["--tls-auth-clients", "no"]);
        }
        command
            .arg("--dir")
            .arg(dir)
            .args(["--save", ""])
            .args(["--appendonly", if aof { "yes" } else { "no" }])
            .args(["--appendfsync", "always"])
            .args(
                password
                    .map(|password| ["--requirepass", password])
                    .into_iter()
                    .flatten(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = match command.spawn() {
            Ok(child) => child,
            Err(error) => panic!(
                "cannot start redis-server ({error}): these tests need a real Redis; \
                 scripts/install-deps.sh installs it (Debian package redis-server)"
            ),
        };
        let mut process = Proc { child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ping(port) {
            if let Some(child) = process.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("redis-server exited at startup: {status}");
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer in 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        process
    }

    fn url(&self) -> String {
        match self.tls_port {
            Some(tls_port) => format!("rediss://localhost:{tls_port}/0"),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// SIGKILL, then a new server on the same port and directory (and so the same AOF).
    fn kill(&mut self) {
        self.process.kill();
    }

    fn restart(&mut self) {
        self.process = Redis::spawn(&self.dir, self.port, self.tls_port, self.aof, self.password);
    }
}

/// Whether a Redis answers PING on `port` (with an error, when it wants a password).
fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 1];
    stream.read_exact(&mut reply).is_ok() && matches!(&reply, b"+" | b"-")
}

/// A scheduler process with its gRPC and HTTP addresses.
struct Scheduler {
    process: Proc,
    grpc: SocketAddr,
    http: SocketAddr,
}

impl Scheduler {
    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to the scheduler")
    }

    /// The sum of the `name` samples in `/metrics`.
    fn metric(&self, name: &str) -> f64 {
        let (status, body) = http(self.http, "GET", "/metrics", b"");
        assert_eq!(status, 200, "GET /metrics");
        String::from_utf8_lossy(&body)
            .lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    fn healthz(&self) -> u16 {
        http(self.http, "GET", "/healthz", b"").0
    }
}

struct Cluster {
    node: Node,
    redis: Redis,
    /// Environment every scheduler starts with.
    scheduler_env: Vec<(&'static str, PathBuf)>,
    schedulers: Vec<Scheduler>,
    workers: Vec<(String, Proc)>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// A cache node, a Redis, and `schedulers` schedulers sharing it, with `config`
    /// (JSON5) as their configuration file.
    fn start(schedulers: usize, aof: bool, config: &str) -> Cluster {
        Cluster::start_with(schedulers, aof, config, None)
    }

    /// [`Cluster::start`] with a Redis requiring `password`.
    fn start_with(
        schedulers: usize,
        aof: bool,
        config: &str,
        password: Option<&'static str>,
    ) -> Cluster {
        let dir = tempfile::tempdir().expect("temporary directory");
        let redis = Redis::start(&dir.path().join("redis"), aof, password);
        Cluster::start_on(dir, redis, Vec::new(), schedulers, config, password)
    }

    /// A cluster whose schedulers reach Redis over TLS (`rediss://`), trusting its CA
    /// through `SSL_CERT_FILE`, which the system's trust store honours.
    fn start_tls(schedulers: usize, config: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("temporary directory");
        let redis = Redis::start_tls(&dir.path().join("redis"));
        let ca = dir.path().join("redis").join("certs").join("ca.pem");
        Cluster::start_on(
            dir,
            redis,
            vec![("SSL_CERT_FILE", ca)],
            schedulers,
            config,
            None,
        )
    }

    fn start_on(
        dir: tempfile::TempDir,
        redis: Redis,
        scheduler_env: Vec<(&'static str, PathBuf)>,
        schedulers: usize,
        config: &str,
        password: Option<&'static str>,
    ) -> Cluster {
        let node = Node::start_in(&dir.path().join("node"), &["--no-execution"]);
        let mut cluster = Cluster {
            node,
            redis,
            scheduler_env,
            schedulers: Vec::new(),
            workers: Vec::new(),
            dir,
        };
        for index in 0..schedulers {
            cluster.scheduler(index, config, password);
        }
        std::fs::create_dir_all(cluster.dir.path().join("runs")).expect("runs directory");
        cluster
    }

    /// Starts scheduler `index`, giving it `password` in REDIS_PASSWORD.
    fn scheduler(&mut self, index: usize, config: &str, password: Option<&str>) {
        let dir = self.dir.path();
        let config_file = dir.join(format!("scheduler-{index}.json5"));
        std::fs::write(&config_file, config).expect("write config");
        let ready = dir.join(format!("scheduler-{index}.ready"));
        let http_ready = dir.join(format!("scheduler-{index}.http"));
        let log = std::fs::File::create(dir.join(format!("scheduler-{index}.log"))).expect("log");
        let mut command = Process::new(exec_binary(SCHEDULER));
        command
            .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .arg("--cache")
            .arg(format!("http://{}", self.node.grpc))
            .arg("--redis")
            .arg(self.redis.url())
            .arg("--config")
            .arg(&config_file)
            .arg("--ready-file")
            .arg(&ready)
            .arg("--http-ready-file")
            .arg(&http_ready)
            .stdin(Stdio::null())
            .stderr(log)
            .env("RUST_LOG", "warn")
            .env_remove("REDIS_PASSWORD");
        if let Some(password) = password {
            command.env("REDIS_PASSWORD", password);
        }
        for (name, value) in &self.scheduler_env {
            command.env(name, value);
        }
        let mut process = Proc {
            child: Some(command.spawn().expect("start cairn-scheduler")),
        };
        let grpc = wait_for_file(&ready, &mut process)
            .trim()
            .parse()
            .expect("scheduler address");
        let http = wait_for_file(&http_ready, &mut process)
            .trim()
            .parse()
            .expect("scheduler HTTP address");
        self.schedulers.push(Scheduler {
            process,
            grpc,
            http,
        });
    }

    /// Starts worker `id` on scheduler `index` and waits until it has registered.
    fn worker(&mut self, id: &str, index: usize, max_inflight: u32) {
        let ready = self.dir.path().join(format!("{id}.ready"));
        let log = std::fs::File::create(self.dir.path().join(format!("{id}.log"))).expect("log");
        let mut command = Process::new(exec_binary(WORKER));
        command
            .arg("--scheduler")
            .arg(format!("http://{}", self.schedulers[index].grpc))
            .arg("--cache")
            .arg(format!("http://{}", self.node.grpc))
            .arg("--id")
            .arg(id)
            .arg("--work-dir")
            .arg(self.dir.path().join(id))
            .arg("--ready-file")
            .arg(&ready)
            .arg("--max-inflight-tasks")
            .arg(max_inflight.to_string())
            .stdin(Stdio::null())
            .stderr(log)
            .env("RUST_LOG", "warn");
        let mut worker = Proc {
            child: Some(command.spawn().expect("start cairn-worker")),
        };
        wait_for_file(&ready, &mut worker);
        self.workers.push((id.to_string(), worker));
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Uploads an action running `script` under `/bin/sh` and returns its digest.
    async fn action(&self, script: &str) -> Digest {
        let command = Command {
            arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
            environment_variables: vec![EnvironmentVariable {
                name: "PATH".into(),
                value: "/usr/bin:/bin".into(),
            }],
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
        let digest = wire(&sha256(&action));
        let requests = [command, root, action]
            .into_iter()
            .map(|data| UpdateRequest {
                digest: Some(wire(&sha256(&data))),
                data: Bytes::from(data),
                compressor: 0,
            })
            .collect();
        let response = self
            .node
            .cas()
            .await
            .batch_update_blobs(BatchUpdateBlobsRequest {
                requests,
                ..Default::default()
            })
            .await
            .expect("BatchUpdateBlobs")
            .into_inner();
        for entry in response.responses {
            assert_eq!(entry.status.map_or(0, |status| status.code), 0);
        }
        digest
    }

    /// An action that records each start in `runs/NAME`, waits for the file `release`,
    /// records its end in `runs/NAME.done` and succeeds.
    async fn held_action(&self, name: &str) -> Digest {
        let runs = self.path("runs").join(name);
        let release = self.path("release");
        self.action(&format!(
            "echo started >> {runs}; while [ ! -f {release} ]; do sleep 0.05; done; \
             echo done >> {runs}.done; echo {name}",
            runs = runs.display(),
            release = release.display()
        ))
        .await
    }

    fn release(&self) {
        std::fs::write(self.path("release"), b"").expect("release");
    }

    fn runs(&self, name: &str) -> usize {
        std::fs::read_to_string(self.path("runs").join(name)).map_or(0, |text| text.lines().count())
    }

    /// Waits (at most 30 s) until the action recording in `runs/NAME` has started.
    async fn wait_for_start(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.runs(name) == 0 {
            assert!(Instant::now() < deadline, "{name} did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The worker running an action, as any scheduler lists the workers of all.
    async fn busy_worker(&self, through: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let workers = WorkerApiClient::new(self.schedulers[through].channel().await)
                .list_workers(ListWorkersRequest {})
                .await
                .expect("ListWorkers")
                .into_inner()
                .workers;
            if let Some(busy) = workers
                .into_iter()
                .find(|worker| !worker.running_operations.is_empty())
            {
                return busy.worker_id;
            }
            assert!(Instant::now() < deadline, "no worker started the action");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn worker_process(&mut self, id: &str) -> &mut Proc {
        &mut self
            .workers
            .iter_mut()
            .find(|(name, _)| name == id)
            .expect("a worker of the cluster")
            .1
    }

    /// Every operation any scheduler knows, as scheduler `through` lists them.
    async fn operations(&self, through: usize) -> Vec<Operation> {
        let mut client = OperationsClient::new(self.schedulers[through].channel().await);
        let mut all = Vec::new();
        let mut page_token = String::new();
        for _ in 0..1000 {
            let page = client
                .list_operations(ListOperationsRequest {
                    name: String::new(),
                    filter: String::new(),
                    page_size: 500,
                    page_token: page_token.clone(),
                    return_partial_success: false,
                })
                .await
                .expect("ListOperations")
                .into_inner();
            all.extend(page.operations);
            if page.next_page_token.is_empty() {
                return all;
            }
            page_token = page.next_page_token;
        }
        panic!("ListOperations did not end within 1000 pages");
    }

    /// Asserts that no operation is left queued or executing.
    async fn assert_all_done(&self) {
        for through in 0..self.schedulers.len() {
            for operation in self.operations(through).await {
                assert!(
                    operation.done && stage_of(&operation) == Stage::Completed as i32,
                    "operation {} left at stage {}",
                    operation.name,
                    stage_of(&operation)
                );
            }
        }
    }

    fn requeues(&self) -> f64 {
        self.schedulers
            .iter()
            .map(|scheduler| scheduler.metric("cairn_scheduler_requeues_total"))
            .sum()
    }
}

/// Executes `action` through `channel` and follows the stream to the end.
async fn execute(channel: Channel, action: Digest) -> ExecuteResponse {
    let mut stream = ExecutionClient::new(channel)
        .execute(ExecuteRequest {
            action_digest: Some(action),
            ..Default::default()
        })
        .await
        .expect("Execute")
        .into_inner();
    let mut last = None;
    while let Some(operation) = stream.message().await.expect("Execute stream") {
        last = Some(operation);
    }
    let last = last.expect("an operation");
    assert!(last.done, "the stream ended before the operation was done");
    response_of(&last)
}

/// Sends Execute and waits for the first operation (the scheduler has stored it), then
/// follows the rest of the stream in a task of its own.
async fn started_execute(
    channel: Channel,
    action: Digest,
) -> tokio::task::JoinHandle<ExecuteResponse> {
    let mut stream = ExecutionClient::new(channel)
        .execute(ExecuteRequest {
            action_digest: Some(action),
            ..Default::default()
        })
        .await
        .expect("Execute")
        .into_inner();
    let mut last = stream
        .message()
        .await
        .expect("Execute stream")
        .expect("an operation");
    tokio::spawn(async move {
        while let Some(operation) = stream.message().await.expect("Execute stream") {
            last = operation;
        }
        assert!(last.done, "the stream ended before the operation was done");
        response_of(&last)
    })
}

/// The response of an Execute running in `task`, within two minutes.
async fn finish(task: tokio::task::JoinHandle<ExecuteResponse>) -> ExecuteResponse {
    tokio::time::timeout(Duration::from_secs(120), task)
        .await
        .expect("the Execute did not finish within 120 s")
        .expect("Execute task")
}

fn assert_succeeded(response: &ExecuteResponse) {
    let code = response.status.as_ref().map_or(0, |status| status.code);
    assert_eq!(code, 0, "status: {:?}", response.status);
    assert_eq!(
        response.result.as_ref().map(|result| result.exit_code),
        Some(0),
        "{response:?}"
    );
}

fn executed_by(response: &ExecuteResponse) -> String {
    response
        .result
        .as_ref()
        .and_then(|result| result.execution_metadata.as_ref())
        .map(|metadata| metadata.worker.clone())
        .unwrap_or_default()
}

/// Short leases, so the tests that wait for one to expire are quick.
const SHORT_LEASES: &str = "{ keepalive_interval: '500ms', keepalive_timeout: '3s' }";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_executes_of_two_hundred_actions_run_each_action_once() {
    let mut cluster = Cluster::start(2, false, "{}");
    for (id, scheduler) in [("a1", 0), ("a2", 0), ("b1", 1), ("b2", 1)] {
        cluster.worker(id, scheduler, 4);
    }
    let mut actions = Vec::new();
    for index in 0..200 {
        let runs = cluster.path("runs").join(index.to_string());
        let script = format!("echo ran >> {}; sleep 0.2; echo {index}", runs.display());
        actions.push(cluster.action(&script).await);
    }
    let channels = [
        cluster.schedulers[0].channel().await,
        cluster.schedulers[1].channel().await,
    ];
    let mut executes = Vec::new();
    for index in 0..1000 {
        let channel = channels[index % 2].clone();
        let action = actions[index % 200].clone();
        executes.push(tokio::spawn(execute(channel, action)));
    }
    for execute in executes {
        assert_succeeded(&finish(execute).await);
    }
    for index in 0..200 {
        assert_eq!(
            cluster.runs(&index.to_string()),
            1,
            "action {index} ran more or less than once"
        );
    }
    let dispatched: f64 = cluster
        .schedulers
        .iter()
        .map(|scheduler| scheduler.metric("cairn_scheduler_dispatched_total"))
        .sum();
    assert_eq!(dispatched, 200.0);
    assert!(
        cluster.schedulers[0].metric("cairn_scheduler_dispatched_total") > 0.0
            && cluster.schedulers[1].metric("cairn_scheduler_dispatched_total") > 0.0,
        "both schedulers' workers took work"
    );
    let operations = cluster.operations(1).await;
    assert!(operations.len() >= 1000, "{} operations", operations.len());
    cluster.assert_all_done().await;
}

#[tokio::test]
async fn a_killed_worker_is_requeued_once_and_completes_elsewhere() {
    let mut cluster = Cluster::start(2, false, "{}");
    cluster.worker("w1", 0, 1);
    cluster.worker("w2", 1, 1);
    let action = cluster.held_action("held").await;
    let running = tokio::spawn(execute(cluster.schedulers[0].channel().await, action));
    cluster.wait_for_start("held").await;
    let busy = cluster.busy_worker(1).await;
    cluster.worker_process(&busy).kill();
    cluster.release();
    let response = finish(running).await;
    assert_succeeded(&response);
    assert_ne!(executed_by(&response), busy);
    assert_eq!(
        cluster.runs("held"),
        2,
        "started on the killed worker, then once more"
    );
    assert_eq!(cluster.requeues(), 1.0);
    cluster.assert_all_done().await;
}

#[tokio::test]
async fn an_expired_lease_is_requeued_by_exactly_one_scheduler() {
    let mut cluster = Cluster::start(2, false, SHORT_LEASES);
    cluster.worker("w1", 0, 1);
    cluster.worker("w2", 1, 1);
    let action = cluster.held_action("held").await;
    let running = tokio::spawn(execute(cluster.schedulers[1].channel().await, action));
    cluster.wait_for_start("held").await;
    let busy = cluster.busy_worker(0).await;
    // A stopped worker keeps its connection open but sends no keepalives: only its
    // lease's expiry, seen by both schedulers' tickers, can free its job.
    let pid = cluster
        .worker_process(&busy)
        .child
        .as_ref()
        .expect("running")
        .id();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster.runs("held") < 2 {
        assert!(
            Instant::now() < deadline,
            "the job was not requeued after the lease expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.release();
    let response = finish(running).await;
    assert_succeeded(&response);
    assert_ne!(executed_by(&response), busy);
    assert_eq!(cluster.requeues(), 1.0);
    assert_eq!(cluster.runs("held"), 2);
    cluster.worker_process(&busy).kill();
    cluster.assert_all_done().await;
}

#[tokio::test]
async fn an_operation_outlives_the_scheduler_it_was_created_on() {
    let mut cluster = Cluster::start(2, false, "{}");
    let action = cluster.held_action("held").await;
    // Queued through scheduler 0, which no worker serves.
    let mut stream = ExecutionClient::new(cluster.schedulers[0].channel().await)
        .execute(ExecuteRequest {
            action_digest: Some(action.clone()),
            ..Default::default()
        })
        .await
        .expect("Execute")
        .into_inner();
    let first = stream
        .message()
        .await
        .expect("Execute stream")
        .expect("an operation");
    assert_eq!(stage_of(&first), Stage::Queued as i32);
    cluster.schedulers[0].process.kill();
    assert!(
        stream.message().await.is_err(),
        "the stream breaks with its scheduler"
    );
    // Scheduler 1 dispatches the queued job to its worker and answers for the
    // operation created on scheduler 0.
    cluster.worker("w1", 1, 1);
    cluster.release();
    let mut waited = ExecutionClient::new(cluster.schedulers[1].channel().await)
        .wait_execution(WaitExecutionRequest {
            name: first.name.clone(),
        })
        .await
        .expect("WaitExecution")
        .into_inner();
    let mut last = None;
    while let Some(operation) = tokio::time::timeout(Duration::from_secs(120), waited.message())
        .await
        .expect("WaitExecution ended within 120 s")
        .expect("WaitExecution stream")
    {
        last = Some(operation);
    }
    let last = last.expect("an operation");
    assert!(last.done);
    assert_eq!(last.name, first.name);
    assert_succeeded(&response_of(&last));
    let fetched = OperationsClient::new(cluster.schedulers[1].channel().await)
        .get_operation(GetOperationRequest {
            name: first.name.clone(),
        })
        .await
        .expect("GetOperation")
        .into_inner();
    assert!(fetched.done);
    assert_eq!(cluster.runs("held"), 1);
    cluster.schedulers.remove(0);
    assert_eq!(cluster.requeues(), 0.0);
    cluster.assert_all_done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_survives_a_redis_restart_with_aof() {
    let mut cluster = Cluster::start(2, true, "{}");
    cluster.worker("w1", 0, 2);
    cluster.worker("w2", 1, 2);
    let mut executes = Vec::new();
    for index in 0..12 {
        let action = cluster.held_action(&index.to_string()).await;
        let channel = cluster.schedulers[index % 2].channel().await;
        executes.push(started_execute(channel, action).await);
    }
    let started = |cluster: &Cluster| (0..12).filter(|i| cluster.runs(&i.to_string()) > 0).count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while started(&cluster) < 4 {
        assert!(
            Instant::now() < deadline,
            "the workers did not start 4 actions"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.redis.kill();
    // Both schedulers notice, and say so on /healthz.
    for scheduler in &cluster.schedulers {
        let deadline = Instant::now() + Duration::from_secs(30);
        while scheduler.healthz() != 503 {
            assert!(
                Instant::now() < deadline,
                "/healthz did not report Redis gone"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The running actions finish while Redis is away; their results wait.
    cluster.release();
    let finished = |cluster: &Cluster| {
        (0..12)
            .filter(|i| cluster.runs(&format!("{i}.done")) > 0)
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while finished(&cluster) < 4 {
        assert!(
            Instant::now() < deadline,
            "the running actions did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Results have reached the schedulers, which cannot store them yet. (A session
    // handles its worker's messages in order, so a worker's second result waits
    // behind its first: the count drops below 4, not to 0.)
    let running = |cluster: &Cluster| -> f64 {
        cluster
            .schedulers
            .iter()
            .map(|scheduler| scheduler.metric("cairn_scheduler_running_tasks"))
            .sum()
    };
    while running(&cluster) >= 4.0 {
        assert!(
            Instant::now() < deadline,
            "the results did not reach the schedulers"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.redis.restart();
    for scheduler in &cluster.schedulers {
        let deadline = Instant::now() + Duration::from_secs(30);
        while scheduler.healthz() != 200 {
            assert!(Instant::now() < deadline, "/healthz did not recover");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for execute in executes {
        assert_succeeded(&finish(execute).await);
    }
    for index in 0..12 {
        assert_eq!(cluster.runs(&index.to_string()), 1, "action {index}");
    }
    assert_eq!(cluster.requeues(), 0.0);
    cluster.assert_all_done().await;
}

#[tokio::test]
async fn the_password_comes_from_redis_password_and_a_refusal_is_unhealthy() {
    let mut cluster = Cluster::start_with(1, false, "{}", Some("sekrit"));
    cluster.scheduler(1, "{}", None);
    cluster.worker("w1", 0, 1);
    let action = cluster.action("echo hello").await;
    let response = execute(cluster.schedulers[0].channel().await, action).await;
    assert_succeeded(&response);
    assert_eq!(cluster.schedulers[0].healthz(), 200);
    // Without the password, Redis refuses every command: unhealthy, and saying why.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = http(cluster.schedulers[1].http, "GET", "/healthz", b"");
        if status == 503 {
            let body = String::from_utf8_lossy(&body);
            assert!(body.contains("NOAUTH"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "/healthz stayed {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `rediss://`: the scheduler reaches Redis over TLS, trusting the server's
/// certificate through the system's trust store (`SSL_CERT_FILE` here), and executes.
#[tokio::test]
async fn a_scheduler_reaches_redis_over_tls_with_a_rediss_url() {
    let mut cluster = Cluster::start_tls(1, "{}");
    assert!(cluster.redis.url().starts_with("rediss://"));
    cluster.worker("w1", 0, 1);
    let action = cluster.action("echo over-tls").await;
    let response = execute(cluster.schedulers[0].channel().await, action).await;
    assert_succeeded(&response);
    assert_eq!(cluster.schedulers[0].healthz(), 200);
    assert!(cluster.schedulers[0].metric("cairn_scheduler_redis_round_trips_total") > 0.0);
}
