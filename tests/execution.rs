//! Remote execution against the real binaries: a `cairn` cache node, `cairn-scheduler`
//! and one or more `cairn-worker`s on loopback, and a single `cairn` that starts its
//! own scheduler and worker and serves Execute on its endpoint.
//!
//! Every process gets ports or files of its own; readiness is polled (the scheduler
//! writes its address to a ready file, a worker writes its id once registered), and
//! each process is killed when its handle drops. Commands are `/bin/sh` scripts; where
//! a test needs to know whether or how often a command ran, the script appends to a
//! marker file in the test's temporary directory.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_proto::longrunning::operations_client::OperationsClient;
use cairn_proto::longrunning::{CancelOperationRequest, GetOperationRequest, Operation};
use cairn_proto::reapi::batch_update_blobs_request::Request as UpdateRequest;
use cairn_proto::reapi::command::EnvironmentVariable;
use cairn_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use cairn_proto::reapi::digest_function::Value as FunctionValue;
use cairn_proto::reapi::execution_client::ExecutionClient;
use cairn_proto::reapi::platform::Property;
use cairn_proto::reapi::{
    Action, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Command, Digest, Directory,
    ExecuteRequest, ExecuteResponse, FileNode, GetActionResultRequest, GetCapabilitiesRequest,
    Platform, SymlinkNode,
};
use cairn_proto::worker::worker_api_client::WorkerApiClient;
use cairn_proto::worker::{ListWorkersRequest, WorkerInfo};
use common::certs::certificates;
use common::exec::{response_of, stage_of, wait_for_file, Proc};
use common::{bearer, exec_binary, sha256, wire, Node, SCHEDULER, WORKER};
use prost::Message;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Streaming};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A seccomp filter that kills the process on `io_uring_setup`.
fn forbid_io_uring(command: &mut Process) {
    const IO_URING_SETUP: u32 = 425;
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xC000_003E;
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xC000_00B7;
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let filter = [
        libc::sock_filter {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 4,
        },
        libc::sock_filter {
            code: JEQ_K,
            jt: 0,
            jf: 3,
            k: ARCH,
        },
        libc::sock_filter {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: JEQ_K,
            jt: 0,
            jf: 1,
            k: IO_URING_SETUP,
        },
        libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_KILL_PROCESS,
        },
        libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    // SAFETY: between fork and exec the closure only calls prctl with a filter that
    // lives in the closure's captured array.
    unsafe {
        command.pre_exec(move || {
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &program as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

struct Cluster {
    node: Node,
    scheduler: Proc,
    address: SocketAddr,
    workers: Vec<(String, Proc)>,
    dir: tempfile::TempDir,
    seccomp: bool,
    /// Behind mutual TLS: the directory of the certificates the test's client uses
    /// (`common::certs::certificates`).
    tls: Option<PathBuf>,
}

impl Cluster {
    /// A node and a scheduler with `config` (a path, or JSON5 text written to a file).
    fn start(config: SchedulerConfig, seccomp: bool) -> Cluster {
        let dir = tempfile::tempdir().expect("temporary directory");
        let node = Node::start_in(&dir.path().join("node"), &["--no-execution"]);
        let ready = dir.path().join("scheduler.ready");
        let mut command = Process::new(exec_binary(SCHEDULER));
        command
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--cache")
            .arg(format!("http://{}", node.grpc))
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .env("RUST_LOG", "error");
        match config {
            SchedulerConfig::Default => {}
            SchedulerConfig::File(path) => {
                command.arg("--config").arg(path);
            }
            SchedulerConfig::Text(text) => {
                let path = dir.path().join("scheduler.json5");
                std::fs::write(&path, text).expect("write config");
                command.arg("--config").arg(path);
            }
        }
        if seccomp {
            forbid_io_uring(&mut command);
        }
        let mut scheduler = Proc {
            child: Some(command.spawn().expect("start cairn-scheduler")),
        };
        let address = wait_for_file(&ready, &mut scheduler)
            .trim()
            .parse()
            .expect("scheduler address");
        Cluster {
            node,
            scheduler,
            address,
            workers: Vec::new(),
            dir,
            seccomp,
            tls: None,
        }
    }

    /// A single `cairn` node started with no execution-related flags: it runs its own
    /// scheduler and worker, and its endpoint is the one Execute goes to.
    fn single_node() -> Cluster {
        let dir = tempfile::tempdir().expect("temporary directory");
        Cluster::single_node_in(dir, &[], None)
    }

    /// [`Cluster::single_node`] serving mutual TLS: every client of its public port
    /// must present a certificate of the test CA, which its own scheduler and worker
    /// have no key for.
    fn single_mtls_node() -> Cluster {
        let dir = tempfile::tempdir().expect("temporary directory");
        let certs = dir.path().join("certs");
        std::fs::create_dir(&certs).expect("certificate directory");
        certificates(&certs);
        let file = |name: &str| certs.join(name).to_str().expect("utf-8").to_string();
        let args = [
            "--tls-cert".to_string(),
            file("server.pem"),
            "--tls-key".to_string(),
            file("server.key"),
            "--tls-client-ca".to_string(),
            file("ca.pem"),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Cluster::single_node_in(dir, &args, Some(certs))
    }

    /// A single node in `dir` with `args`; `tls` as in [`Cluster::tls`].
    fn single_node_in(dir: tempfile::TempDir, args: &[&str], tls: Option<PathBuf>) -> Cluster {
        let node = Node::start_in(&dir.path().join("node"), args);
        let address = node.grpc;
        Cluster {
            node,
            scheduler: Proc { child: None },
            address,
            workers: Vec::new(),
            dir,
            seccomp: false,
            tls,
        }
    }

    /// Starts a worker with `args` and waits until it has registered.
    fn worker(&mut self, id: &str, args: &[&str]) {
        let scheduler = format!("http://{}", self.address);
        self.worker_of(id, &[scheduler.as_str()], args);
    }

    /// Starts a worker given the scheduler URLs `schedulers`, in that order.
    fn worker_of(&mut self, id: &str, schedulers: &[&str], args: &[&str]) {
        let ready = self.dir.path().join(format!("{id}.ready"));
        let mut command = Process::new(exec_binary(WORKER));
        for scheduler in schedulers {
            command.arg("--scheduler").arg(scheduler);
        }
        command
            .arg("--cache")
            .arg(format!("http://{}", self.node.grpc))
            .arg("--id")
            .arg(id)
            .arg("--work-dir")
            .arg(self.dir.path().join(id))
            .arg("--ready-file")
            .arg(&ready)
            .args(args)
            .stdin(Stdio::null())
            .env("RUST_LOG", "error");
        if self.seccomp {
            forbid_io_uring(&mut command);
        }
        let mut worker = Proc {
            child: Some(command.spawn().expect("start cairn-worker")),
        };
        wait_for_file(&ready, &mut worker);
        self.workers.push((id.to_string(), worker));
    }

    fn marker(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn channel(&self) -> Channel {
        let Some(certs) = &self.tls else {
            return Channel::from_shared(format!("http://{}", self.address))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect to the scheduler");
        };
        let file = |name: &str| std::fs::read(certs.join(name)).expect("certificate file");
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(file("ca.pem")))
            .domain_name("localhost")
            .identity(Identity::from_pem(file("client.pem"), file("client.key")));
        Channel::from_shared(format!("https://{}", self.address))
            .expect("endpoint")
            .tls_config(tls)
            .expect("TLS config")
            .connect()
            .await
            .expect("connect over TLS")
    }

    /// The node's CAS: over [`Cluster::channel`] behind TLS (a single node, whose
    /// address it is).
    async fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        match &self.tls {
            Some(_) => ContentAddressableStorageClient::new(self.channel().await),
            None => self.node.cas().await,
        }
    }

    async fn workers_info(&self) -> Vec<WorkerInfo> {
        WorkerApiClient::new(self.channel().await)
            .list_workers(ListWorkersRequest {})
            .await
            .expect("ListWorkers")
            .into_inner()
            .workers
    }

    async fn upload(&self, blobs: &[Vec<u8>]) {
        let requests = blobs
            .iter()
            .map(|data| UpdateRequest {
                digest: Some(wire(&sha256(data))),
                data: Bytes::from(data.clone()),
                compressor: 0,
            })
            .collect();
        let response = self
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
    }

    async fn read(&self, digest: &Digest) -> Vec<u8> {
        let response = self
            .cas()
            .await
            .batch_read_blobs(BatchReadBlobsRequest {
                digests: vec![digest.clone()],
                ..Default::default()
            })
            .await
            .expect("BatchReadBlobs")
            .into_inner();
        response.responses[0].data.to_vec()
    }

    /// Uploads the action described by `spec` and returns its digest.
    async fn action(&self, spec: Spec) -> Digest {
        let command = Command {
            arguments: vec!["/bin/sh".into(), "-c".into(), spec.script],
            environment_variables: vec![
                EnvironmentVariable {
                    name: "PATH".into(),
                    value: "/usr/bin:/bin".into(),
                },
                EnvironmentVariable {
                    name: "SALT".into(),
                    value: self.dir.path().to_string_lossy().into_owned(),
                },
            ],
            output_paths: spec.outputs,
            working_directory: spec.working_directory,
            ..Default::default()
        };
        let command = command.encode_to_vec();
        let root = spec.input_root.encode_to_vec();
        let action = Action {
            command_digest: Some(wire(&sha256(&command))),
            input_root_digest: Some(wire(&sha256(&root))),
            timeout: spec.timeout.map(|timeout| prost_types::Duration {
                seconds: timeout.as_secs() as i64,
                nanos: 0,
            }),
            do_not_cache: spec.do_not_cache,
            platform: Some(Platform {
                properties: spec
                    .platform
                    .iter()
                    .map(|(name, value)| Property {
                        name: name.to_string(),
                        value: value.to_string(),
                    })
                    .collect(),
            }),
            ..Default::default()
        }
        .encode_to_vec();
        let mut blobs = vec![command, root, action.clone()];
        blobs.extend(spec.blobs);
        self.upload(&blobs).await;
        wire(&sha256(&action))
    }

    /// Sends Execute for `action`; the operations stream follows.
    async fn open_execute(&self, action: &Digest, skip_cache_lookup: bool) -> Streaming<Operation> {
        ExecutionClient::new(self.channel().await)
            .execute(ExecuteRequest {
                action_digest: Some(action.clone()),
                skip_cache_lookup,
                ..Default::default()
            })
            .await
            .expect("Execute")
            .into_inner()
    }

    /// Executes `action` and follows the stream to the end.
    async fn execute(
        &self,
        action: &Digest,
        skip_cache_lookup: bool,
    ) -> (Vec<Operation>, ExecuteResponse) {
        let mut stream = self.open_execute(action, skip_cache_lookup).await;
        let mut operations = Vec::new();
        while let Some(operation) = stream.message().await.expect("Execute stream") {
            operations.push(operation);
        }
        let last = operations.last().expect("at least one operation");
        assert!(last.done, "the stream ended before the operation was done");
        let response = response_of(last);
        (operations, response)
    }

    /// Executes `action` in a task of its own, for tests that act on the cluster while
    /// it runs; the task's result is the final response.
    async fn execute_in_background(&self, action: &Digest) -> JoinHandle<ExecuteResponse> {
        let mut stream = self.open_execute(action, false).await;
        tokio::spawn(async move {
            let mut last = None;
            while let Some(operation) = stream.message().await.expect("stream") {
                last = Some(operation);
            }
            response_of(&last.expect("an operation"))
        })
    }

    /// Polls the scheduler until a worker runs an action and `ready()` holds; returns
    /// that worker's id and its place in `self.workers`.
    async fn busy_worker(&self, ready: impl Fn() -> bool) -> (String, usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let busy = self
                .workers_info()
                .await
                .into_iter()
                .find(|worker| !worker.running_operations.is_empty());
            if let Some(worker) = busy.filter(|_| ready()) {
                let index = self
                    .workers
                    .iter()
                    .position(|(id, _)| *id == worker.worker_id)
                    .expect("the busy worker is one of the cluster's");
                return (worker.worker_id, index);
            }
            assert!(Instant::now() < deadline, "no worker started the action");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

enum SchedulerConfig {
    Default,
    File(PathBuf),
    Text(&'static str),
}

struct Spec {
    script: String,
    outputs: Vec<String>,
    working_directory: String,
    timeout: Option<Duration>,
    platform: Vec<(&'static str, &'static str)>,
    input_root: Directory,
    blobs: Vec<Vec<u8>>,
    do_not_cache: bool,
}

impl Spec {
    fn script(script: impl Into<String>) -> Spec {
        Spec {
            script: script.into(),
            outputs: Vec::new(),
            working_directory: String::new(),
            timeout: None,
            platform: Vec::new(),
            input_root: Directory::default(),
            blobs: Vec::new(),
            do_not_cache: false,
        }
    }

    fn outputs(mut self, outputs: &[&str]) -> Spec {
        self.outputs = outputs.iter().map(|output| output.to_string()).collect();
        self
    }
}

fn code_of(response: &ExecuteResponse) -> Code {
    Code::from_i32(response.status.as_ref().map_or(0, |status| status.code))
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |text| text.lines().count())
}

async fn output_file(cluster: &Cluster, response: &ExecuteResponse, path: &str) -> Vec<u8> {
    let result = response.result.as_ref().expect("result");
    let file = result
        .output_files
        .iter()
        .find(|file| file.path == path)
        .unwrap_or_else(|| panic!("no output {path}: {result:?}"));
    cluster.read(file.digest.as_ref().expect("digest")).await
}

#[tokio::test]
async fn a_cache_hit_skips_execution() {
    let mut cluster = Cluster::start(SchedulerConfig::File(repo("config/scheduler.json5")), false);
    cluster.worker(
        "w1",
        &[
            "--config",
            repo("config/worker.json5").to_str().expect("utf-8"),
        ],
    );
    let marker = cluster.marker("runs");
    let action = cluster
        .action(
            Spec::script(format!(
                "echo run >> {}; echo hello > out/greeting",
                marker.display()
            ))
            .outputs(&["out/greeting"]),
        )
        .await;
    let (operations, first) = cluster.execute(&action, false).await;
    assert_eq!(code_of(&first), Code::Ok, "{first:?}");
    assert!(!first.cached_result);
    assert_eq!(
        output_file(&cluster, &first, "out/greeting").await,
        b"hello\n"
    );
    let metadata = first
        .result
        .as_ref()
        .unwrap()
        .execution_metadata
        .clone()
        .unwrap();
    assert_eq!(metadata.worker, "w1");
    assert!(metadata.execution_start_timestamp.is_some());
    assert!(metadata.output_upload_completed_timestamp.is_some());
    assert_eq!(stage_of(operations.last().unwrap()), 4);
    assert_eq!(lines(&marker), 1);

    let (operations, second) = cluster.execute(&action, false).await;
    assert!(second.cached_result);
    assert_eq!(operations.len(), 1);
    assert_eq!(
        second.result.as_ref().unwrap().output_files,
        first.result.as_ref().unwrap().output_files
    );
    assert_eq!(lines(&marker), 1, "a cache hit ran the command");

    let (_, third) = cluster.execute(&action, true).await;
    assert!(!third.cached_result);
    assert_eq!(
        lines(&marker),
        2,
        "skip_cache_lookup did not run the command"
    );
}

#[tokio::test]
async fn identical_concurrent_executes_run_once() {
    let mut cluster = Cluster::start(SchedulerConfig::Default, false);
    cluster.worker("w1", &["--max-inflight-tasks", "4"]);
    let marker = cluster.marker("runs");
    let action = cluster
        .action(
            Spec::script(format!(
                "echo run >> {}; sleep 1; echo same > out",
                marker.display()
            ))
            .outputs(&["out"]),
        )
        .await;
    let ((first_ops, first), (second_ops, second)) = tokio::join!(
        cluster.execute(&action, false),
        cluster.execute(&action, false)
    );
    assert_eq!(code_of(&first), Code::Ok);
    assert_eq!(first.result, second.result);
    // Both executed (one run shared), neither came from the action cache.
    assert!(!first.cached_result, "{first:?}");
    assert!(!second.cached_result, "{second:?}");
    assert_ne!(first_ops[0].name, second_ops[0].name);
    assert_eq!(lines(&marker), 1, "the action ran more than once");
    assert_eq!(output_file(&cluster, &second, "out").await, b"same\n");
}

#[tokio::test]
async fn a_killed_worker_is_retried_on_another() {
    let mut cluster = Cluster::start(SchedulerConfig::Default, false);
    cluster.worker("w1", &["--max-inflight-tasks", "1"]);
    cluster.worker("w2", &["--max-inflight-tasks", "1"]);
    let marker = cluster.marker("runs");
    let action = cluster
        .action(
            Spec::script(format!(
                "echo run >> {}; sleep 2; echo done > out",
                marker.display()
            ))
            .outputs(&["out"]),
        )
        .await;
    let execution = cluster.execute_in_background(&action).await;
    let (busy, index) = cluster.busy_worker(|| lines(&marker) == 1).await;
    cluster.workers[index].1.kill();
    let response = execution.await.expect("execution task");
    assert_eq!(code_of(&response), Code::Ok, "{response:?}");
    let metadata = response
        .result
        .as_ref()
        .unwrap()
        .execution_metadata
        .clone()
        .unwrap();
    assert_ne!(metadata.worker, busy);
    assert_eq!(output_file(&cluster, &response, "out").await, b"done\n");
    assert_eq!(lines(&marker), 2);
}

#[tokio::test]
async fn a_worker_registers_with_the_next_scheduler_when_the_first_is_unreachable() {
    let mut cluster = Cluster::start(SchedulerConfig::Default, false);
    let unreachable = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", listener.local_addr().expect("address"))
    };
    let reachable = format!("http://{}", cluster.address);
    cluster.worker_of("w1", &[unreachable.as_str(), reachable.as_str()], &[]);
    let action = cluster
        .action(Spec::script("echo ran > out").outputs(&["out"]))
        .await;
    let (_, response) = cluster.execute(&action, false).await;
    assert_eq!(code_of(&response), Code::Ok, "{response:?}");
    assert_eq!(output_file(&cluster, &response, "out").await, b"ran\n");
}

#[tokio::test]
async fn platform_properties_pick_the_worker_that_satisfies_them() {
    let mut cluster = Cluster::start(
        SchedulerConfig::File(repo("config/distributed/scheduler.json5")),
        false,
    );
    for name in ["worker-a", "worker-b"] {
        let config = repo(&format!("config/distributed/{name}.json5"));
        cluster.worker(name, &["--config", config.to_str().expect("utf-8")]);
    }
    for round in 0..4 {
        let action = cluster
            .action(Spec {
                platform: vec![("cpu_arch", "x86_64"), ("cpu_count", "4")],
                ..Spec::script(format!("echo {round}"))
            })
            .await;
        let (_, response) = cluster.execute(&action, false).await;
        assert_eq!(code_of(&response), Code::Ok, "{response:?}");
        let worker = response.result.unwrap().execution_metadata.unwrap().worker;
        assert_eq!(worker, "worker-b");
    }
}

#[tokio::test]
async fn an_action_no_worker_can_run_fails_naming_the_property() {
    let mut cluster = Cluster::start(
        SchedulerConfig::Text(
            "{ platform_properties: { cpu_count: 'minimum' }, unschedulable_timeout: '1s' }",
        ),
        false,
    );
    cluster.worker("small", &["--property", "cpu_count=2"]);
    let action = cluster
        .action(Spec {
            platform: vec![("cpu_count", "64")],
            ..Spec::script("true")
        })
        .await;
    let (_, response) = cluster.execute(&action, false).await;
    assert_eq!(code_of(&response), Code::FailedPrecondition);
    let message = response.status.unwrap().message;
    assert!(message.contains("cpu_count>=64"), "{message}");
}

#[tokio::test]
async fn a_timeout_ends_with_deadline_exceeded() {
    let mut cluster = Cluster::start(SchedulerConfig::Default, false);
    cluster.worker("w1", &[]);
    let action = cluster
        .action(Spec {
            timeout: Some(Duration::from_secs(1)),
            ..Spec::script("echo started; sleep 60")
        })
        .await;
    let started = Instant::now();
    let (_, response) = cluster.execute(&action, false).await;
    assert_eq!(code_of(&response), Code::DeadlineExceeded, "{response:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let stdout = response.result.unwrap().stdout_digest.unwrap();
    assert_eq!(cluster.read(&stdout).await, b"started\n");
    let cached = cluster
        .node
        .ac()
        .await
        .get_action_result(GetActionResultRequest {
            action_digest: Some(action),
            ..Default::default()
        })
        .await;
    assert_eq!(cached.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn cancellation_kills_the_command() {
    let mut cluster = Cluster::start(SchedulerConfig::Default, false);
    cluster.worker("w1", &[]);
    let pid_file = cluster.marker("pid");
    let action = cluster
        .action(Spec::script(format!(
            "echo $$ > {}; exec sleep 60",
            pid_file.display()
        )))
        .await;
    let mut stream = cluster.open_execute(&action, false).await;
    let first = stream
        .message()
        .await
        .expect("stream")
        .expect("an operation");
    let mut process = Proc { child: None };
    let pid: i32 = wait_for_file(&pid_file, &mut process)
        .trim()
        .parse()
        .expect("pid");
    OperationsClient::new(cluster.channel().await)
        .cancel_operation(CancelOperationRequest {
            name: first.name.clone(),
        })
        .await
        .expect("CancelOperation");
    let mut last = first;
    while let Some(operation) = stream.message().await.expect("stream") {
        last = operation;
    }
    assert_eq!(code_of(&response_of(&last)), Code::Cancelled);
    let deadline = Instant::now() + Duration::from_secs(20);
    // SAFETY: signal 0 only checks whether the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(
            Instant::now() < deadline,
            "the cancelled command still runs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster
        .workers_info()
        .await
        .iter()
        .any(|worker| !worker.running_operations.is_empty())
    {
        assert!(
            Instant::now() < deadline,
            "the worker still runs the cancelled task"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_failing_command_is_reported_and_not_cached() {
    let mut cluster = Cluster::start(SchedulerConfig::Default, false);
    cluster.worker("w1", &[]);
    let action = cluster.action(Spec::script("echo oops >&2; exit 3")).await;
    let (_, response) = cluster.execute(&action, false).await;
    assert_eq!(code_of(&response), Code::Ok);
    let result = response.result.unwrap();
    assert_eq!(result.exit_code, 3);
    assert_eq!(
        cluster.read(&result.stderr_digest.unwrap()).await,
        b"oops\n"
    );
    let cached = cluster
        .node
        .ac()
        .await
        .get_action_result(GetActionResultRequest {
            action_digest: Some(action.clone()),
            ..Default::default()
        })
        .await;
    assert_eq!(cached.unwrap_err().code(), Code::NotFound);
    let (_, again) = cluster.execute(&action, false).await;
    assert!(!again.cached_result);
}

/// An input root with an executable `tool.sh`, a subdirectory `src` holding `data.txt`
/// and the symlinks `in_src`, and a symlink `link` to `src/data.txt`; with its blobs.
fn tool_and_data_tree(
    tool: &[u8],
    data: &[u8],
    in_src: Vec<SymlinkNode>,
) -> (Directory, Vec<Vec<u8>>) {
    let sub = Directory {
        files: vec![FileNode {
            name: "data.txt".into(),
            digest: Some(wire(&sha256(data))),
            ..Default::default()
        }],
        symlinks: in_src,
        ..Default::default()
    };
    let sub_bytes = sub.encode_to_vec();
    let root = Directory {
        files: vec![FileNode {
            name: "tool.sh".into(),
            digest: Some(wire(&sha256(tool))),
            is_executable: true,
            ..Default::default()
        }],
        directories: vec![cairn_proto::reapi::DirectoryNode {
            name: "src".into(),
            digest: Some(wire(&sha256(&sub_bytes))),
        }],
        symlinks: vec![SymlinkNode {
            name: "link".into(),
            target: "src/data.txt".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    (root, vec![tool.to_vec(), data.to_vec(), sub_bytes])
}

#[tokio::test]
async fn inputs_and_outputs_are_materialized() {
    let mut cluster = Cluster::start(SchedulerConfig::Default, false);
    cluster.worker("w1", &[]);
    let tool = b"#!/bin/sh\necho tool ran\n".to_vec();
    let data = b"input data\n".to_vec();
    let (root, blobs) = tool_and_data_tree(&tool, &data, Vec::new());
    let action = cluster
        .action(Spec {
            input_root: root,
            blobs,
            working_directory: "src".into(),
            ..Spec::script("../tool.sh > ../out/log; cat ../link >> ../out/log; mkdir -p ../out/tree/d; echo x > ../out/tree/d/f")
                .outputs(&["../out/log"])
        })
        .await;
    let (_, response) = cluster.execute(&action, false).await;
    assert_eq!(
        code_of(&response),
        Code::InvalidArgument,
        "an output path with `..`"
    );

    let tool = b"#!/bin/sh\necho tool ran\n".to_vec();
    let root = Directory {
        files: vec![FileNode {
            name: "tool.sh".into(),
            digest: Some(wire(&sha256(&tool))),
            is_executable: true,
            ..Default::default()
        }],
        ..Default::default()
    };
    let action = cluster
        .action(Spec {
            input_root: root,
            blobs: vec![tool],
            ..Spec::script("./tool.sh > out/log; mkdir -p out/tree/d; echo x > out/tree/d/f; ln -s log out/alias")
                .outputs(&["out/log", "out/tree", "out/alias"])
        })
        .await;
    let (_, response) = cluster.execute(&action, false).await;
    assert_eq!(code_of(&response), Code::Ok, "{response:?}");
    let result = response.result.clone().unwrap();
    assert_eq!(
        result.exit_code,
        0,
        "{}",
        String::from_utf8_lossy(&cluster.read(result.stderr_digest.as_ref().unwrap()).await)
    );
    assert_eq!(
        output_file(&cluster, &response, "out/log").await,
        b"tool ran\n"
    );
    assert_eq!(result.output_directories.len(), 1);
    assert_eq!(result.output_symlinks[0].target, "log");
    let tree = cairn_proto::reapi::Tree::decode(
        cluster
            .read(result.output_directories[0].tree_digest.as_ref().unwrap())
            .await
            .as_slice(),
    )
    .unwrap();
    assert_eq!(tree.root.unwrap().directories[0].name, "d");
}

/// Everything beneath `dir`, relative to it, without following symlinks.
fn listing(dir: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).expect("read_dir") {
            let path = entry.expect("directory entry").path();
            if std::fs::symlink_metadata(&path).expect("lstat").is_dir() {
                pending.push(path.clone());
            }
            found.insert(path.strip_prefix(dir).expect("beneath").to_path_buf());
        }
    }
    found
}

#[tokio::test]
async fn hostile_paths_are_rejected() {
    let mut cluster = Cluster::start(SchedulerConfig::Default, false);
    // The worker keeps the directory of each rejected task as it was at the end, so the
    // test sees what the task wrote before it would have been cleaned up.
    cluster.worker("w1", &["--keep-failed-tasks"]);
    let data = b"payload".to_vec();
    let file = |name: &str| FileNode {
        name: name.into(),
        digest: Some(wire(&sha256(&data))),
        ..Default::default()
    };
    let symlink = |target: &str| SymlinkNode {
        name: "link".into(),
        target: target.into(),
        ..Default::default()
    };
    // An action doing nothing over an input root holding one hostile entry, beside a
    // harmless file: the tree is checked whole before anything is written, so not even
    // the harmless file may appear.
    let with_file = |name: &str| Spec {
        input_root: Directory {
            files: vec![file("harmless"), file(name)],
            ..Default::default()
        },
        ..Spec::script("true")
    };
    let with_symlink = |target: &str| Spec {
        input_root: Directory {
            files: vec![file("harmless")],
            symlinks: vec![symlink(target)],
            ..Default::default()
        },
        ..Spec::script("true")
    };
    let below = |sub: Directory| {
        let sub_bytes = sub.encode_to_vec();
        Spec {
            input_root: Directory {
                files: vec![file("harmless")],
                directories: vec![cairn_proto::reapi::DirectoryNode {
                    name: "sub".into(),
                    digest: Some(wire(&sha256(&sub_bytes))),
                }],
                ..Default::default()
            },
            blobs: vec![sub_bytes],
            ..Spec::script("true")
        }
    };
    // (what, the case, whether the command runs before the rejection)
    let cases: Vec<(&str, Spec, bool)> = vec![
        ("file named ..", with_file(".."), false),
        ("file named ../escape", with_file("../escape"), false),
        ("file with a slash", with_file("a/b"), false),
        ("absolute file name", with_file("/tmp/escape"), false),
        (
            "file named ../escape in a subdirectory",
            below(Directory {
                files: vec![file("../escape")],
                ..Default::default()
            }),
            false,
        ),
        (
            "symlink climbing out",
            with_symlink("../../../../etc/passwd"),
            false,
        ),
        ("absolute symlink", with_symlink("/etc/passwd"), false),
        (
            "symlink in a subdirectory climbing out",
            below(Directory {
                symlinks: vec![symlink("../../escape")],
                ..Default::default()
            }),
            false,
        ),
        (
            "output path with ..",
            Spec::script("true").outputs(&["../../outside"]),
            false,
        ),
        (
            "absolute output path",
            Spec::script("true").outputs(&["/tmp/outside"]),
            false,
        ),
        (
            "working directory with ..",
            Spec {
                working_directory: "..".into(),
                ..Spec::script("true")
            },
            false,
        ),
        (
            "output through a symlink",
            Spec::script("rm -r out && ln -s / out").outputs(&["out/etc/passwd"]),
            true,
        ),
        (
            "output symlink escaping",
            Spec::script("ln -s /etc/passwd out").outputs(&["out"]),
            true,
        ),
    ];
    let work_dir = cluster.dir.path().join("w1");
    for (what, mut spec, runs) in cases {
        spec.blobs.push(data.clone());
        let action = cluster.action(spec).await;
        let before = listing(&work_dir);
        let (_, response) = cluster.execute(&action, false).await;
        let created: Vec<PathBuf> = listing(&work_dir).difference(&before).cloned().collect();
        let kept: Vec<&PathBuf> = created
            .iter()
            .filter(|path| path.parent() == Some(Path::new("tasks")))
            .collect();
        assert_eq!(
            kept.len(),
            1,
            "{what}: one kept task directory: {created:?}"
        );
        let kept = kept[0].clone();
        let mut inside = Vec::new();
        for path in &created {
            let relative = path.strip_prefix(&kept).unwrap_or_else(|_| {
                panic!(
                    "{what}: {} created outside the task directory",
                    path.display()
                )
            });
            if !relative.as_os_str().is_empty() {
                inside.push(relative.to_path_buf());
            }
        }
        if runs {
            for path in &inside {
                assert!(
                    ["root", "stdout", "stderr"]
                        .iter()
                        .any(|allowed| path.starts_with(allowed)),
                    "{what}: {} created beside the action root",
                    path.display()
                );
            }
        } else {
            assert!(
                inside.is_empty(),
                "{what}: written before the rejection: {inside:?}"
            );
        }
        assert_eq!(
            code_of(&response),
            Code::InvalidArgument,
            "{what}: {response:?}"
        );
    }
    assert!(
        !Path::new("/tmp/escape").exists(),
        "/tmp/escape was written"
    );
}

#[tokio::test]
async fn do_not_cache_results_are_returned_but_not_stored() {
    let mut cluster = Cluster::start(SchedulerConfig::Default, false);
    cluster.worker("w1", &[]);
    let script = "echo made > out";
    let uncached = cluster
        .action(Spec {
            do_not_cache: true,
            ..Spec::script(script).outputs(&["out"])
        })
        .await;
    let cached = cluster.action(Spec::script(script).outputs(&["out"])).await;
    for (action, stored) in [(uncached, false), (cached, true)] {
        let (_, response) = cluster.execute(&action, false).await;
        assert_eq!(code_of(&response), Code::Ok, "{response:?}");
        assert!(!response.cached_result);
        let result = response.result.clone().expect("result");
        assert_eq!(result.exit_code, 0);
        assert_eq!(output_file(&cluster, &response, "out").await, b"made\n");
        let lookup = cluster
            .node
            .ac()
            .await
            .get_action_result(GetActionResultRequest {
                action_digest: Some(action),
                ..Default::default()
            })
            .await;
        if stored {
            let found = lookup.expect("the cacheable result is stored").into_inner();
            assert_eq!(found.output_files, result.output_files);
        } else {
            assert_eq!(
                lookup.expect_err("a do_not_cache result was stored").code(),
                Code::NotFound
            );
        }
    }
}

#[tokio::test]
async fn scheduler_and_worker_never_set_up_io_uring() {
    // The filter works: the cache node, which needs io_uring, is killed by it.
    let temp = tempfile::tempdir().expect("temporary directory");
    let mut node = Process::new(common::BINARY);
    node.arg("--listen")
        .arg(common::free_port().to_string())
        .arg("--data-dir")
        .arg(temp.path().join("data"))
        .arg("--max-size")
        .arg("1GiB")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .env("RUST_LOG", "error");
    forbid_io_uring(&mut node);
    let status = node.status().expect("run cairn");
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "cairn survived the filter: {status}"
    );

    let mut cluster = Cluster::start(SchedulerConfig::Default, true);
    cluster.worker("w1", &[]);
    let action = cluster
        .action(Spec::script("echo remote > out").outputs(&["out"]))
        .await;
    let (_, response) = cluster.execute(&action, false).await;
    assert_eq!(code_of(&response), Code::Ok, "{response:?}");
    assert_eq!(output_file(&cluster, &response, "out").await, b"remote\n");
    let (_, worker) = cluster.workers.pop().expect("worker");
    let status = worker.terminate();
    assert!(status.success(), "cairn-worker: {status}");
    let Cluster { scheduler, .. } = cluster;
    let status = scheduler.terminate();
    assert!(status.success(), "cairn-scheduler: {status}");
}

#[tokio::test]
async fn draining_finishes_running_work_then_exits() {
    let mut cluster = Cluster::start(SchedulerConfig::Default, false);
    cluster.worker("w1", &["--max-inflight-tasks", "1"]);
    cluster.worker("w2", &["--max-inflight-tasks", "1"]);
    let marker = cluster.marker("runs");
    let action = cluster
        .action(
            Spec::script(format!(
                "echo run >> {}; sleep 1; echo finished > out",
                marker.display()
            ))
            .outputs(&["out"]),
        )
        .await;
    let execution = cluster.execute_in_background(&action).await;
    let (busy, index) = cluster.busy_worker(|| true).await;
    let (_, worker) = cluster.workers.remove(index);
    let status = worker.terminate();
    assert!(
        status.success(),
        "a draining worker exits cleanly: {status}"
    );
    let response = execution.await.expect("execution task");
    assert_eq!(code_of(&response), Code::Ok, "{response:?}");
    let metadata = response
        .result
        .as_ref()
        .unwrap()
        .execution_metadata
        .clone()
        .unwrap();
    assert_eq!(
        metadata.worker, busy,
        "the drained worker finished its action"
    );
    assert_eq!(lines(&marker), 1);

    let (other, _) = &cluster.workers[0];
    let other = other.clone();
    WorkerApiClient::new(cluster.channel().await)
        .drain_worker(cairn_proto::worker::DrainWorkerRequest {
            worker_id: other.clone(),
        })
        .await
        .expect("DrainWorker");
    let (_, mut worker) = cluster.workers.remove(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = worker
            .child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
        {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "{other} did not exit after DrainWorker"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{other}: {status}");
    worker.child = None;
    assert!(cluster.workers_info().await.is_empty());
}

#[tokio::test]
async fn a_single_node_behind_mutual_tls_runs_its_own_execution() {
    let cluster = Cluster::single_mtls_node();
    let action = cluster
        .action(Spec::script("echo secure > out/answer").outputs(&["out/answer"]))
        .await;
    let (_, response) = cluster.execute(&action, false).await;
    assert_eq!(code_of(&response), Code::Ok, "{response:?}");
    assert_eq!(
        output_file(&cluster, &response, "out/answer").await,
        b"secure\n"
    );

    // The worker uploaded those outputs through a loopback port of its own, in
    // plaintext, which answers only calls carrying the node's token.
    let internal = worker_cache_address(cluster.node.pid());
    assert!(internal.starts_with("127.0.0.1:"), "{internal}");
    assert_ne!(internal, cluster.node.grpc.to_string());
    let channel = Channel::from_shared(format!("http://{internal}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the loopback port");
    let digest = wire(&sha256(b"secure\n"));
    let request = || BatchReadBlobsRequest {
        digests: vec![digest.clone()],
        ..Default::default()
    };
    let mut cas = ContentAddressableStorageClient::new(channel);
    for (refused, asked) in [
        (cas.batch_read_blobs(request()).await, "no token"),
        (
            cas.batch_read_blobs(bearer(request(), "guess")).await,
            "a wrong token",
        ),
    ] {
        let status = refused.expect_err(asked);
        assert_eq!(status.code(), Code::Unauthenticated, "{asked}: {status:?}");
    }
    let token = std::fs::read_to_string(cluster.node.data_dir.join("embedded.token"))
        .expect("the children's token file");
    let answer = cas
        .batch_read_blobs(bearer(request(), token.trim()))
        .await
        .expect("a read with the node's token")
        .into_inner();
    assert_eq!(answer.responses[0].data, b"secure\n"[..]);

    // Its scheduler, on loopback in plaintext too, runs nothing for a caller without
    // the node's token: the node's own credentials checks cannot be walked around.
    let scheduler = std::fs::read_to_string(cluster.node.data_dir.join("scheduler.addr"))
        .expect("the scheduler's address file");
    let channel = Channel::from_shared(format!("http://{}", scheduler.trim()))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the scheduler");
    let status = ExecutionClient::new(channel)
        .execute(ExecuteRequest {
            action_digest: Some(action.clone()),
            skip_cache_lookup: true,
            ..Default::default()
        })
        .await
        .expect_err("Execute on the scheduler without the node's token");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

/// The `--cache` address node `node` gave its own `cairn-worker` (its command line).
fn worker_cache_address(node: i32) -> String {
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|byte| *byte == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        if !args
            .first()
            .is_some_and(|arg| arg.ends_with("cairn-worker"))
        {
            continue;
        }
        // The parent's pid is the second field after the parenthesised name.
        let parent = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|stat| {
                let (_, rest) = stat.rsplit_once(')')?;
                rest.split_whitespace().nth(1)?.parse::<i32>().ok()
            });
        if parent != Some(node) {
            continue;
        }
        let cache = args.iter().position(|arg| arg == "--cache");
        if let Some(value) = cache.and_then(|at| args.get(at + 1)) {
            return value.trim_start_matches("http://").to_string();
        }
    }
    panic!("no cairn-worker child of process {node}");
}

#[tokio::test]
async fn a_single_node_executes_on_its_own_endpoint() {
    let cluster = Cluster::single_node();
    let capabilities = cluster
        .node
        .capabilities()
        .await
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .expect("GetCapabilities")
        .into_inner();
    let execution = capabilities
        .execution_capabilities
        .expect("execution capabilities");
    assert!(execution.exec_enabled);
    assert_eq!(execution.digest_function, FunctionValue::Sha256 as i32);
    assert_eq!(
        execution.digest_functions,
        vec![FunctionValue::Sha256 as i32, FunctionValue::Blake3 as i32]
    );
    assert!(capabilities.cache_capabilities.is_some());

    let marker = cluster.marker("runs");
    let action = cluster
        .action(
            Spec::script(format!(
                "echo run >> {}; echo single > out/answer",
                marker.display()
            ))
            .outputs(&["out/answer"]),
        )
        .await;
    let (operations, first) = cluster.execute(&action, false).await;
    assert_eq!(code_of(&first), Code::Ok, "{first:?}");
    assert!(!first.cached_result);
    assert_eq!(stage_of(operations.last().expect("operations")), 4);
    assert_eq!(
        output_file(&cluster, &first, "out/answer").await,
        b"single\n"
    );
    assert_eq!(lines(&marker), 1);

    // Operations are forwarded too: the finished operation is known by its name.
    let name = operations.last().expect("operations").name.clone();
    let operation = OperationsClient::new(cluster.channel().await)
        .get_operation(GetOperationRequest { name: name.clone() })
        .await
        .expect("GetOperation")
        .into_inner();
    assert_eq!(operation.name, name);
    assert!(operation.done);

    let (_, second) = cluster.execute(&action, false).await;
    assert!(second.cached_result);
    assert_eq!(lines(&marker), 1, "a cache hit ran the command");

    // A clean stop takes the scheduler and the worker down with the node.
    let scheduler: SocketAddr =
        std::fs::read_to_string(cluster.node.data_dir.join("scheduler.addr"))
            .expect("scheduler.addr")
            .trim()
            .parse()
            .expect("scheduler address");
    let Cluster { node, dir, .. } = cluster;
    let status = node.terminate();
    assert!(status.success(), "cairn exited with {status}");
    assert!(
        std::net::TcpStream::connect(scheduler).is_err(),
        "the scheduler outlived the node"
    );
    drop(dir);
}

#[tokio::test]
async fn no_execution_serves_the_cache_alone() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let node = Node::start_in(&dir.path().join("node"), &["--no-execution"]);
    let capabilities = node
        .capabilities()
        .await
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .expect("GetCapabilities")
        .into_inner();
    assert!(capabilities.execution_capabilities.is_none());
    assert!(capabilities.cache_capabilities.is_some());
    let error = ExecutionClient::new(node.channel().await)
        .execute(ExecuteRequest {
            action_digest: Some(wire(&sha256(b"action"))),
            ..Default::default()
        })
        .await
        .expect_err("Execute on a cache-only node");
    assert_eq!(error.code(), Code::Unimplemented, "{error:?}");
    assert!(!node.data_dir.join("scheduler.addr").exists());
}

/// The SHA-256 of `data` in hex, computed here rather than by the server.
#[tokio::test]
async fn an_action_cannot_change_the_inputs_of_later_actions() {
    let mut cluster = Cluster::start(SchedulerConfig::Default, false);
    cluster.worker("w1", &["--max-inflight-tasks", "1"]);
    let data = b"original input\n".to_vec();
    let tool = b"#!/bin/sh\necho original tool\n".to_vec();
    let sub = Directory {
        files: vec![FileNode {
            name: "tool".into(),
            digest: Some(wire(&sha256(&tool))),
            is_executable: true,
            ..Default::default()
        }],
        ..Default::default()
    };
    let sub_bytes = sub.encode_to_vec();
    let root = Directory {
        files: vec![FileNode {
            name: "in".into(),
            digest: Some(wire(&sha256(&data))),
            ..Default::default()
        }],
        directories: vec![cairn_proto::reapi::DirectoryNode {
            name: "x".into(),
            digest: Some(wire(&sha256(&sub_bytes))),
        }],
        ..Default::default()
    };
    let spec = |script: String| Spec {
        input_root: root.clone(),
        blobs: vec![data.clone(), tool.clone(), sub_bytes.clone()],
        ..Spec::script(script).outputs(&["out/in", "out/tool"])
    };
    // The same user may make its input writable; root writes it whatever its mode.
    // Every shape runs: as root both write, otherwise the second one's writes fail.
    let shapes = [
        "chmod u+w in x/tool; echo poison >> in; echo poison >> x/tool",
        "echo poison >> in; echo poison >> x/tool",
    ];
    for (round, shape) in shapes.iter().enumerate() {
        let poison = cluster
            .action(spec(format!(
                "{shape}; cp in out/in; cp x/tool out/tool; echo poisoner {round}"
            )))
            .await;
        let (_, response) = cluster.execute(&poison, false).await;
        assert_eq!(code_of(&response), Code::Ok, "{shape}: {response:?}");

        let check = cluster
            .action(spec(format!(
                "cat in > out/in; cat x/tool > out/tool; echo reader {round}"
            )))
            .await;
        let (_, response) = cluster.execute(&check, false).await;
        assert_eq!(code_of(&response), Code::Ok, "{shape}: {response:?}");
        let result = response.result.as_ref().expect("result");
        assert_eq!(result.exit_code, 0, "{shape}: {result:?}");
        assert_eq!(
            result.execution_metadata.as_ref().expect("metadata").worker,
            "w1"
        );
        for (path, original) in [("out/in", &data), ("out/tool", &tool)] {
            let seen = output_file(&cluster, &response, path).await;
            assert_eq!(
                String::from_utf8_lossy(&seen),
                String::from_utf8_lossy(original),
                "after `{shape}`, a later action saw a changed {path}"
            );
            let digest = result
                .output_files
                .iter()
                .find(|file| file.path == path)
                .and_then(|file| file.digest.clone())
                .expect("digest");
            assert_eq!(digest.hash, sha256(original).hash_hex(), "{path}");
        }
    }
}

/// Whether `pid` names a live process: a zombie (killed, not yet reaped by whoever
/// inherited it) counts as gone.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits (bounded) for the pid an action wrote to `path`.
fn recorded_pid(path: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|text| text.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "{} not written within 60 s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn assert_gone(pid: i32, when: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "{when}: the background process {pid} still runs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn background_processes_die_with_their_action() {
    let mut cluster = Cluster::start(SchedulerConfig::Default, false);
    cluster.worker("w1", &[]);

    // A normal exit: the shell is gone, its background child must follow.
    let pid_file = cluster.marker("exit.pid");
    let action = cluster
        .action(Spec::script(format!(
            "sleep 300 & echo $! > {}; echo done",
            pid_file.display()
        )))
        .await;
    let (_, response) = cluster.execute(&action, false).await;
    assert_eq!(code_of(&response), Code::Ok, "{response:?}");
    assert_eq!(response.result.as_ref().expect("result").exit_code, 0);
    assert_gone(recorded_pid(&pid_file), "after a normal exit").await;

    // A timeout.
    let pid_file = cluster.marker("timeout.pid");
    let action = cluster
        .action(Spec {
            timeout: Some(Duration::from_secs(1)),
            ..Spec::script(format!(
                "sleep 300 & echo $! > {}; sleep 60",
                pid_file.display()
            ))
        })
        .await;
    let (_, response) = cluster.execute(&action, false).await;
    assert_eq!(code_of(&response), Code::DeadlineExceeded, "{response:?}");
    assert_gone(recorded_pid(&pid_file), "after a timeout").await;

    // A cancellation.
    let pid_file = cluster.marker("cancel.pid");
    let action = cluster
        .action(Spec::script(format!(
            "sleep 300 & echo $! > {}; sleep 60",
            pid_file.display()
        )))
        .await;
    let mut stream = cluster.open_execute(&action, false).await;
    let first = stream
        .message()
        .await
        .expect("stream")
        .expect("an operation");
    let pid = recorded_pid(&pid_file);
    assert!(alive(pid), "the background process runs before the cancel");
    OperationsClient::new(cluster.channel().await)
        .cancel_operation(CancelOperationRequest {
            name: first.name.clone(),
        })
        .await
        .expect("CancelOperation");
    let mut last = first;
    while let Some(operation) = stream.message().await.expect("stream") {
        last = operation;
    }
    assert_eq!(code_of(&response_of(&last)), Code::Cancelled);
    assert_gone(pid, "after a cancellation").await;
}

#[tokio::test]
async fn a_tree_with_a_subdirectory_a_symlink_and_a_working_directory_runs() {
    let mut cluster = Cluster::start(SchedulerConfig::Default, false);
    cluster.worker("w1", &[]);
    let tool = b"#!/bin/sh\necho tool ran\n".to_vec();
    let data = b"input data\n".to_vec();
    let tool_link = SymlinkNode {
        name: "tool".into(),
        target: "../tool.sh".into(),
        ..Default::default()
    };
    let (root, blobs) = tool_and_data_tree(&tool, &data, vec![tool_link]);
    let action = cluster
        .action(Spec {
            input_root: root,
            blobs,
            working_directory: "src".into(),
            ..Spec::script(
                "./tool > out/log; cat ../link >> out/log; cat data.txt >> out/log; pwd > out/where",
            )
            .outputs(&["out/log", "out/where"])
        })
        .await;
    let (_, response) = cluster.execute(&action, false).await;
    assert_eq!(code_of(&response), Code::Ok, "{response:?}");
    let result = response.result.as_ref().expect("result");
    assert_eq!(
        result.exit_code,
        0,
        "{}",
        String::from_utf8_lossy(&cluster.read(result.stderr_digest.as_ref().unwrap()).await)
    );
    let log = output_file(&cluster, &response, "out/log").await;
    assert_eq!(
        String::from_utf8_lossy(&log),
        "tool ran\ninput data\ninput data\n"
    );
    let expected = b"tool ran\ninput data\ninput data\n";
    let digest = result
        .output_files
        .iter()
        .find(|file| file.path == "out/log")
        .and_then(|file| file.digest.clone())
        .expect("digest");
    assert_eq!(digest.hash, sha256(expected).hash_hex());
    let place = output_file(&cluster, &response, "out/where").await;
    assert!(
        String::from_utf8_lossy(&place)
            .trim_end()
            .ends_with("/root/src"),
        "the command ran in {}",
        String::from_utf8_lossy(&place)
    );
}

#[tokio::test]
async fn missing_inputs_are_named_then_run_once_uploaded() {
    let mut cluster = Cluster::start(SchedulerConfig::Default, false);
    cluster.worker("w1", &[]);
    let first = b"first missing input\n".to_vec();
    let second = b"second missing input\n".to_vec();
    let file = |name: &str, data: &[u8]| FileNode {
        name: name.into(),
        digest: Some(wire(&sha256(data))),
        ..Default::default()
    };
    let action = cluster
        .action(Spec {
            input_root: Directory {
                files: vec![file("a", &first), file("b", &second)],
                ..Default::default()
            },
            ..Spec::script("cat a b > out").outputs(&["out"])
        })
        .await;
    let (_, response) = cluster.execute(&action, false).await;
    assert_eq!(code_of(&response), Code::FailedPrecondition, "{response:?}");
    let status = response.status.as_ref().expect("status");
    let failure = status
        .details
        .iter()
        .find(|any| any.type_url == "type.googleapis.com/google.rpc.PreconditionFailure")
        .map(|any| {
            cairn_proto::rpc::PreconditionFailure::decode(any.value.as_slice())
                .expect("PreconditionFailure")
        })
        .expect("a PreconditionFailure detail");
    let mut subjects: Vec<(String, String)> = failure
        .violations
        .iter()
        .map(|violation| (violation.r#type.clone(), violation.subject.clone()))
        .collect();
    subjects.sort();
    let mut expected: Vec<(String, String)> = [&first, &second]
        .iter()
        .map(|data| {
            (
                "MISSING".to_string(),
                format!("blobs/{}/{}", sha256(data).hash_hex(), data.len()),
            )
        })
        .collect();
    expected.sort();
    assert_eq!(subjects, expected);

    cluster.upload(&[first.clone(), second.clone()]).await;
    let (_, response) = cluster.execute(&action, false).await;
    assert_eq!(code_of(&response), Code::Ok, "{response:?}");
    assert!(!response.cached_result);
    assert_eq!(response.result.as_ref().expect("result").exit_code, 0);
    assert_eq!(
        output_file(&cluster, &response, "out").await,
        [first, second].concat()
    );
}
