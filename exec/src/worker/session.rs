//! The worker's life: sessions with the scheduler, tasks, drain.
//!
//! [`run`] loops over sessions: check the precondition script, connect, register,
//! then serve until the session ends. Within a session one loop multiplexes the
//! scheduler's messages, the results of finished tasks, the keepalive timer and the
//! drain request, so every message to the scheduler leaves from one place and in
//! order. Tasks run as separate tokio tasks with a cancellation token each.
//!
//! Tasks outlive sessions. A scheduler that goes away (a deploy, a crash, SIGKILL)
//! does not stop the commands it started: the worker moves on to the next scheduler
//! of its list (schedulers sharing their state through Redis), registers with the ids
//! of the tasks it still runs, and the new scheduler adopts them or cancels those it
//! no longer wants. Results cannot be acknowledged by the protocol, so those sent
//! shortly before a session broke may have been lost in flight; the worker keeps the
//! last [`RESENT_RESULTS`] it sent and sends them again on the next session, which is
//! harmless because a scheduler ignores a result for a task that is no longer current.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_proto::worker::scheduler_message::Message as FromScheduler;
use cairn_proto::worker::task_result::Outcome;
use cairn_proto::worker::worker_api_client::WorkerApiClient;
use cairn_proto::worker::worker_message::Message as ToScheduler;
use cairn_proto::worker::{
    Draining, Keepalive, Register, SchedulerMessage, TaskRejected, TaskResult, WorkerMessage,
};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::config::WorkerConfig;
use super::file_cache::FileCache;
use super::runner::Runner;
use crate::client_tls::ClientTls;
use crate::error::{Error, Result};
use crate::exec_common::{
    cache_channel, error_from_status, from_proto_duration, read_token_file, rpc_status,
    write_ready_file, BearerToken,
};

/// How many of the last results sent are sent again after a session breaks. A result
/// is a few hundred bytes to a few KiB (digests, not outputs), and the ones at risk
/// are those sent in the moments before the break: the window is far larger than the
/// results a worker finishes between two keepalives.
const RESENT_RESULTS: usize = 64;

/// How the worker reaches one scheduler: its URL, the endpoint (with TLS for
/// `https://`) and the token it presents.
struct SchedulerLink {
    url: String,
    endpoint: tonic::transport::Endpoint,
    token: BearerToken,
}

/// The worker's tasks, which live across sessions.
struct Tasks {
    /// Running tasks by id, with the token that cancels each.
    running: HashMap<String, CancellationToken>,
    /// Where a finished task leaves its report.
    finished: mpsc::UnboundedSender<(String, WorkerMessage)>,
    finished_results: mpsc::UnboundedReceiver<(String, WorkerMessage)>,
    /// Reports to send right after the next Registered.
    undelivered: Vec<WorkerMessage>,
    /// The last reports sent in this session, newest last.
    recent: VecDeque<WorkerMessage>,
}

impl Tasks {
    fn new() -> Self {
        let (finished, finished_results) = mpsc::unbounded_channel();
        Self {
            running: HashMap::new(),
            finished,
            finished_results,
            undelivered: Vec::new(),
            recent: VecDeque::new(),
        }
    }

    /// Remembers a report about to be sent, in case the session breaks.
    fn sending(&mut self, report: &WorkerMessage) {
        if self.recent.len() == RESENT_RESULTS {
            self.recent.pop_front();
        }
        self.recent.push_back(report.clone());
    }

    /// After a session broke: what it may have lost goes out on the next one.
    fn session_broke(&mut self) {
        let recent = std::mem::take(&mut self.recent);
        let mut resend: Vec<WorkerMessage> = recent.into_iter().collect();
        resend.append(&mut self.undelivered);
        self.undelivered = resend;
    }

    /// The ids for Register's `running_task_ids`: the running tasks, and the finished
    /// ones whose result goes out right after Registered. A scheduler sharing state in
    /// Redis requeues the tasks it holds for this worker that the worker does not name,
    /// so a result not named here would arrive for a task no longer current and the
    /// action would run again.
    fn running_ids(&self) -> Vec<String> {
        let undelivered = self
            .undelivered
            .iter()
            .filter_map(|report| match &report.message {
                Some(ToScheduler::Result(result)) => Some(&result.task_id),
                Some(ToScheduler::Rejected(rejected)) => Some(&rejected.task_id),
                _ => None,
            });
        let mut ids: Vec<String> = self.running.keys().chain(undelivered).cloned().collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

/// How a session ended.
enum SessionEnd {
    /// Drained: nothing runs, the worker exits.
    Drained,
    /// The precondition script failed: re-register once it passes.
    Unhealthy,
}

/// Runs the worker until it has drained. Once registered for the first time it logs
/// `cairn-worker registered as ID` and writes the id to `ready_file`, if given.
pub async fn run(config: WorkerConfig, ready_file: Option<PathBuf>) -> Result<()> {
    let worker_id = config.worker_id();
    std::fs::create_dir_all(&config.work_dir)?;
    let file_cache = FileCache::open(&config.work_dir.join("cache"), config.file_cache_size.0)?;
    let tasks_dir = config.work_dir.join("tasks");
    if tasks_dir.exists() {
        std::fs::remove_dir_all(&tasks_dir)?;
    }
    std::fs::create_dir_all(&tasks_dir)?;
    let token = config
        .token_file
        .as_deref()
        .map(read_token_file)
        .transpose()?;
    let tls = ClientTls::from_files(
        config.tls_ca.as_ref(),
        config.tls_cert.as_ref(),
        config.tls_key.as_ref(),
    )?;
    let links = config
        .scheduler
        .iter()
        .map(|url| {
            Ok(SchedulerLink {
                url: url.clone(),
                endpoint: tls.endpoint(url)?,
                token: BearerToken::new(token.as_deref())?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if links.is_empty() {
        return Err(Error::invalid_argument("no scheduler is configured"));
    }
    let runner = Arc::new(Runner {
        cache_channel: cache_channel(&config.cache, token.as_deref(), &tls)?,
        worker_id: worker_id.clone(),
        file_cache,
        tasks_dir,
        config,
    });
    let drain = CancellationToken::new();
    watch_signals(drain.clone())?;
    let mut ready_file = ready_file;
    let mut tasks = Tasks::new();
    // The link to try next, and how many have failed in a row: the worker pauses
    // `retry_delay` only once every scheduler of the list has failed, so losing one
    // moves it to the next at once.
    let mut next = 0;
    let mut failures = 0;
    loop {
        if drain.is_cancelled() && tasks.running.is_empty() && tasks.undelivered.is_empty() {
            return Ok(());
        }
        if failures >= links.len() || !precondition_ok(&runner.config).await {
            failures = 0;
            tokio::select! {
                () = tokio::time::sleep(runner.config.retry_delay) => {}
                () = drain.cancelled(), if !drain.is_cancelled() => {}
            }
            if !precondition_ok(&runner.config).await {
                continue;
            }
        }
        let link = &links[next];
        match session(&runner, link, &mut tasks, &drain, &mut ready_file).await {
            Ok(SessionEnd::Drained) => return Ok(()),
            Ok(SessionEnd::Unhealthy) => failures = 0,
            Err((registered, error)) => {
                tasks.session_broke();
                tracing::warn!(
                    "session with the scheduler at {} ended: {error}; {} task(s) keep running",
                    link.url,
                    tasks.running.len()
                );
                failures = if registered { 1 } else { failures + 1 };
                next = (next + 1) % links.len();
            }
        }
    }
}

/// The first SIGTERM or SIGINT drains; a second exits at once.
fn watch_signals(drain: CancellationToken) -> Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            if drain.is_cancelled() {
                tracing::warn!("second signal: exiting without finishing tasks");
                std::process::exit(1);
            }
            tracing::info!("draining: finishing running tasks, taking no new ones");
            drain.cancel();
        }
    });
    Ok(())
}

async fn precondition_ok(config: &WorkerConfig) -> bool {
    let Some(script) = &config.precondition_script else {
        return true;
    };
    match tokio::process::Command::new(script)
        .stdin(std::process::Stdio::null())
        .status()
        .await
    {
        Ok(status) if status.success() => true,
        Ok(status) => {
            tracing::warn!("precondition script {} failed: {status}", script.display());
            false
        }
        Err(error) => {
            tracing::warn!(
                "cannot run precondition script {}: {error}",
                script.display()
            );
            false
        }
    }
}

fn message(message: ToScheduler) -> WorkerMessage {
    WorkerMessage {
        message: Some(message),
    }
}

/// One session with the scheduler at `link`. An error comes with whether the session
/// got as far as Registered.
async fn session(
    runner: &Arc<Runner>,
    link: &SchedulerLink,
    tasks: &mut Tasks,
    drain: &CancellationToken,
    ready_file: &mut Option<PathBuf>,
) -> std::result::Result<SessionEnd, (bool, Error)> {
    let mut registered = false;
    serve(runner, link, tasks, drain, ready_file, &mut registered)
        .await
        .map_err(|error| (registered, error))
}

async fn serve(
    runner: &Arc<Runner>,
    link: &SchedulerLink,
    tasks: &mut Tasks,
    drain: &CancellationToken,
    ready_file: &mut Option<PathBuf>,
    registered: &mut bool,
) -> Result<SessionEnd> {
    let config = &runner.config;
    let channel = link
        .endpoint
        .clone()
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|error| {
            Error::new(
                crate::ErrorKind::Unavailable,
                format!("cannot reach the scheduler at {}: {error}", link.url),
            )
        })?;
    let max_inflight = config.max_inflight();
    let (outbound, outbound_stream) = mpsc::channel::<WorkerMessage>(256);
    let send = |item: WorkerMessage| {
        let outbound = outbound.clone();
        async move {
            outbound
                .send(item)
                .await
                .map_err(|_| Error::new(crate::ErrorKind::Unavailable, "the session closed"))
        }
    };
    send(message(ToScheduler::Register(Register {
        worker_id: runner.worker_id.clone(),
        properties: config.platform(),
        max_inflight_tasks: max_inflight,
        running_task_ids: tasks.running_ids(),
    })))
    .await?;
    let mut inbound = WorkerApiClient::with_interceptor(channel, link.token.clone())
        .max_decoding_message_size(64 << 20)
        .connect(ReceiverStream::new(outbound_stream))
        .await
        .map_err(|status| error_from_status("WorkerApi.Connect", &status))?
        .into_inner();

    let mut keepalive = tokio::time::interval(Duration::from_secs(5));
    let mut draining = false;
    let mut unhealthy = false;
    let end = |unhealthy: bool| {
        if unhealthy {
            SessionEnd::Unhealthy
        } else {
            SessionEnd::Drained
        }
    };
    let outcome = loop {
        tokio::select! {
            received = inbound.message() => {
                let received = match received {
                    Ok(Some(SchedulerMessage { message: Some(received) })) => received,
                    Ok(Some(SchedulerMessage { message: None })) => continue,
                    Ok(None) => {
                        return Err(Error::new(crate::ErrorKind::Unavailable, "the scheduler closed the session"));
                    }
                    Err(status) => {
                        return Err(error_from_status("the scheduler session failed", &status));
                    }
                };
                match received {
                    FromScheduler::Registered(answer) => {
                        let interval = answer
                            .keepalive_interval
                            .as_ref()
                            .and_then(from_proto_duration)
                            .unwrap_or(Duration::from_secs(5));
                        keepalive = tokio::time::interval(interval);
                        *registered = true;
                        tracing::info!(
                            "cairn-worker registered as {} with the scheduler at {}",
                            runner.worker_id,
                            link.url
                        );
                        if let Some(path) = ready_file.take() {
                            write_ready_file(&path, &runner.worker_id)?;
                        }
                        for report in std::mem::take(&mut tasks.undelivered) {
                            tasks.sending(&report);
                            send(report).await?;
                        }
                    }
                    FromScheduler::Start(task) => {
                        let task_id = task.task_id.clone();
                        if draining || tasks.running.len() >= max_inflight as usize {
                            let reason = if draining { "draining" } else { "no free task slot" };
                            send(message(ToScheduler::Rejected(TaskRejected {
                                task_id,
                                reason: reason.to_string(),
                            })))
                            .await?;
                            continue;
                        }
                        let token = CancellationToken::new();
                        tasks.running.insert(task_id.clone(), token.clone());
                        let runner = runner.clone();
                        let finished = tasks.finished.clone();
                        tokio::spawn(async move {
                            let report = if precondition_ok(&runner.config).await {
                                let response = runner.clone().run(task, token).await;
                                let outcome = match response {
                                    Some(response) => Outcome::Response(response),
                                    None => Outcome::Error(rpc_status(Code::Cancelled, "cancelled")),
                                };
                                ToScheduler::Result(TaskResult {
                                    task_id: task_id.clone(),
                                    outcome: Some(outcome),
                                })
                            } else {
                                ToScheduler::Rejected(TaskRejected {
                                    task_id: task_id.clone(),
                                    reason: "the precondition script failed".to_string(),
                                })
                            };
                            let _ = finished.send((task_id, message(report)));
                        });
                    }
                    FromScheduler::Cancel(cancel) => {
                        if let Some(token) = tasks.running.get(&cancel.task_id) {
                            token.cancel();
                        }
                    }
                    FromScheduler::Drain(_) => {
                        tracing::info!("the scheduler asked this worker to drain");
                        drain.cancel();
                    }
                }
            }
            Some((task_id, report)) = tasks.finished_results.recv() => {
                tasks.running.remove(&task_id);
                if matches!(report.message, Some(ToScheduler::Rejected(_))) && !draining {
                    unhealthy = true;
                    draining = true;
                    send(message(ToScheduler::Draining(Draining {}))).await?;
                }
                tasks.sending(&report);
                send(report).await?;
                if draining && tasks.running.is_empty() {
                    break end(unhealthy);
                }
            }
            _ = keepalive.tick() => {
                send(message(ToScheduler::Keepalive(Keepalive {}))).await?;
            }
            () = drain.cancelled(), if !draining && tasks.undelivered.is_empty() => {
                draining = true;
                send(message(ToScheduler::Draining(Draining {}))).await?;
                if tasks.running.is_empty() {
                    break end(unhealthy);
                }
            }
        }
    };
    // Closing our half of the stream makes the scheduler end the session; waiting for
    // its half to close makes sure the last reports were delivered before we exit.
    drop(outbound);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = inbound.message().await {}
    })
    .await;
    Ok(outcome)
}
