//! Running one task: inputs in, command, outputs out.
//!
//! Each task gets a fresh directory under the work directory: `root/` is the action's
//! input root (the command runs in `root/<working_directory>`), and `stdout` / `stderr`
//! sit beside it, outside the tree the action can name. The directory is removed when
//! the task ends, unless the task failed and `keep_failed_tasks` asks to keep it as it
//! was, for inspection. The command runs in its own
//! process group, so a timeout or a cancellation kills everything it started, not
//! just the first process; the group is killed after a normal exit too, so nothing an
//! action leaves behind outlives it. Children also get a parent-death signal, so
//! actions die with a worker that is killed outright.
//!
//! Whatever happens, the task ends in an ExecuteResponse for the client: the
//! ActionResult when the command ran (any exit code; DEADLINE_EXCEEDED in the status
//! with what was captured when it timed out), or a status such as INVALID_ARGUMENT for
//! a hostile input tree or FAILED_PRECONDITION listing missing inputs. Only a zero
//! exit code of a cacheable action is written to the action cache.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cairn_proto::reapi::digest_function::Value as FunctionValue;
use cairn_proto::reapi::{
    Action, ActionResult, Command, Digest, ExecuteResponse, ExecutedActionMetadata,
};
use cairn_proto::rpc;
use cairn_proto::worker::StartTask;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::Instrument;

use super::config::WorkerConfig;
use super::file_cache::FileCache;
use super::inputs::{self, Fetched};
use super::outputs::{self, Blobs};
use super::paths::{check_relative_path, under};
use super::plan;
use crate::cas_client::{CasClient, TransferLimits};
use crate::digests;
use crate::error::{Error, Result};
use crate::exec_common::{error_to_rpc, from_proto_duration, random_name, rpc_status, timestamp};

/// What every task of a worker shares.
pub struct Runner {
    /// The worker's settings.
    pub config: WorkerConfig,
    /// The worker's id, recorded in ExecutedActionMetadata.
    pub worker_id: String,
    /// Channel to the cache node.
    pub cache_channel: crate::exec_common::CacheChannel,
    /// The local file cache.
    pub file_cache: FileCache,
    /// Where task directories are made.
    pub tasks_dir: PathBuf,
}

/// How a command ended.
enum Ending {
    Exited(i32),
    TimedOut,
    Cancelled,
}

impl Runner {
    /// Runs `task`; `None` if it was cancelled (the scheduler no longer wants it).
    pub async fn run(
        self: Arc<Self>,
        task: StartTask,
        cancel: CancellationToken,
    ) -> Option<ExecuteResponse> {
        let directory = self.tasks_dir.join(random_name());
        tracing::debug!(
            task = %task.task_id,
            action = %task.action_digest.as_ref().map_or("", |digest| digest.hash.as_str()),
            "task started"
        );
        // The action's span, continuing the trace of the scheduler's Execute.
        let span = crate::traces::stage("Execute");
        crate::traces::child_of(&span, &task.trace_context);
        let outcome = match std::fs::create_dir(&directory) {
            Ok(()) => {
                self.run_in(&task, &directory, &cancel)
                    .instrument(span)
                    .await
            }
            Err(error) => Err(error.into()),
        };
        if self.config.keep_failed_tasks && failed(&outcome) {
            let action = task
                .action_digest
                .as_ref()
                .map_or_else(String::new, |digest| {
                    format!("{}/{}", digest.hash, digest.size_bytes)
                });
            tracing::warn!(
                task = %task.task_id,
                "kept the directory {} of the failed action {action}",
                directory.display()
            );
        } else {
            remove_tree(&directory);
        }
        match outcome {
            Ok(Some(response)) => Some(response),
            Ok(None) => None,
            Err(error) => {
                tracing::warn!(task = %task.task_id, "task failed: {error}");
                Some(ExecuteResponse {
                    status: Some(error_to_rpc(&error)),
                    ..Default::default()
                })
            }
        }
    }

    async fn run_in(
        &self,
        task: &StartTask,
        directory: &Path,
        cancel: &CancellationToken,
    ) -> Result<Option<ExecuteResponse>> {
        let mut metadata = ExecutedActionMetadata {
            worker: self.worker_id.clone(),
            queued_timestamp: task.queued_timestamp,
            worker_start_timestamp: Some(timestamp(SystemTime::now())),
            ..Default::default()
        };
        let function = digests::function_of_request(task.digest_function)?;
        let wire_function =
            FunctionValue::try_from(task.digest_function).unwrap_or(FunctionValue::Sha256);
        let action_digest = task
            .action_digest
            .clone()
            .ok_or_else(|| Error::invalid_argument("the task has no action digest"))?;
        let cas = CasClient::new(
            self.cache_channel.clone(),
            &task.instance_name,
            wire_function,
            TransferLimits {
                batch_threshold: self.config.batch_threshold.0,
                concurrency: self.config.transfer_concurrency.max(1),
                ..TransferLimits::default()
            },
        );

        metadata.input_fetch_start_timestamp = Some(timestamp(SystemTime::now()));
        let Some(action_bytes) = cas.read_blob(&action_digest).await? else {
            return Ok(Some(missing(vec![action_digest])));
        };
        let action = Action::decode(action_bytes).map_err(|error| {
            Error::invalid_argument(format!("the Action does not parse: {error}"))
        })?;
        let command_digest = digests::required(action.command_digest.as_ref(), "command_digest")?;
        let root_digest =
            digests::required(action.input_root_digest.as_ref(), "input_root_digest")?;
        let Some(command_bytes) = cas.read_blob(&command_digest).await? else {
            return Ok(Some(missing(vec![command_digest])));
        };
        let command = Command::decode(command_bytes).map_err(|error| {
            Error::invalid_argument(format!("the Command does not parse: {error}"))
        })?;
        if command.arguments.is_empty() {
            return Err(Error::invalid_argument("the Command has no arguments"));
        }
        let working_directory =
            check_relative_path(&command.working_directory, "working directory", true)?;
        let wanted = outputs::wanted(&command)?;
        let directory_format = outputs::directory_format(&command);

        let fetching = crate::traces::stage("fetch inputs");
        let tree = match inputs::fetch_tree(&cas, &root_digest)
            .instrument(fetching.clone())
            .await?
        {
            Fetched::Ready(tree) => tree,
            Fetched::Missing(digests) => return Ok(Some(missing(digests))),
        };
        let plan = plan::plan(&root_digest, &tree)?;
        let root = directory.join("root");
        std::fs::create_dir_all(&root)?;
        if let Fetched::Missing(digests) = inputs::materialize(
            &plan,
            &root,
            &cas,
            &self.file_cache,
            self.config.transfer_concurrency,
        )
        .instrument(fetching)
        .await?
        {
            return Ok(Some(missing(digests)));
        }
        let exec_dir = under(&root, &working_directory);
        std::fs::create_dir_all(&exec_dir)?;
        for output in &wanted {
            if let Some(parent) = output.path.parent() {
                create_dirs_beneath(&exec_dir, parent)?;
            }
        }
        metadata.input_fetch_completed_timestamp = Some(timestamp(SystemTime::now()));

        let timeout = task
            .timeout
            .as_ref()
            .and_then(from_proto_duration)
            .unwrap_or(Duration::from_secs(3600));
        let stdout_path = directory.join("stdout");
        let stderr_path = directory.join("stderr");
        metadata.execution_start_timestamp = Some(timestamp(SystemTime::now()));
        let ending = run_command(
            &command,
            &exec_dir,
            &stdout_path,
            &stderr_path,
            timeout,
            cancel,
        )
        .instrument(crate::traces::stage("run command"))
        .await?;
        metadata.execution_completed_timestamp = Some(timestamp(SystemTime::now()));
        let exit_code = match ending {
            Ending::Cancelled => return Ok(None),
            Ending::Exited(code) => code,
            Ending::TimedOut => -1,
        };

        metadata.output_upload_start_timestamp = Some(timestamp(SystemTime::now()));
        let mut result = ActionResult {
            exit_code,
            ..Default::default()
        };
        let mut blobs = Blobs::default();
        // Hashing outputs is blocking file I/O, possibly gigabytes: keep it off the
        // threads that drive the session and the other tasks' network transfers.
        tokio::task::block_in_place(|| -> Result<()> {
            if !matches!(ending, Ending::TimedOut) {
                outputs::collect(
                    &root,
                    &working_directory,
                    &wanted,
                    directory_format,
                    function,
                    &mut result,
                    &mut blobs,
                )?;
            }
            result.stdout_digest = Some(blobs.add_file(function, &stdout_path)?);
            result.stderr_digest = Some(blobs.add_file(function, &stderr_path)?);
            Ok(())
        })?;
        cas.upload(&blobs.memory, &blobs.files, &blobs.digests)
            .instrument(crate::traces::stage("upload outputs"))
            .await?;
        metadata.output_upload_completed_timestamp = Some(timestamp(SystemTime::now()));
        metadata.worker_completed_timestamp = Some(timestamp(SystemTime::now()));
        result.execution_metadata = Some(metadata);

        let status = match ending {
            Ending::TimedOut => rpc_status(
                Code::DeadlineExceeded,
                format!(
                    "the action exceeded its timeout of {}s",
                    timeout.as_secs_f64()
                ),
            ),
            _ => rpc_status(Code::Ok, ""),
        };
        if exit_code == 0 && !action.do_not_cache && matches!(ending, Ending::Exited(_)) {
            cas.update_action_result(&action_digest, result.clone())
                .await?;
        }
        Ok(Some(ExecuteResponse {
            result: Some(result),
            cached_result: false,
            status: Some(status),
            ..Default::default()
        }))
    }
}

/// Whether a task's outcome is a failure worth keeping its directory for: an error, a
/// status other than OK, or a non-zero exit code (a cancelled task is not).
fn failed(outcome: &Result<Option<ExecuteResponse>>) -> bool {
    match outcome {
        Err(_) => true,
        Ok(None) => false,
        Ok(Some(response)) => {
            response
                .status
                .as_ref()
                .is_some_and(|status| status.code != 0)
                || response
                    .result
                    .as_ref()
                    .is_some_and(|result| result.exit_code != 0)
        }
    }
}

/// FAILED_PRECONDITION with the PreconditionFailure details REAPI clients read to
/// upload what is missing.
fn missing(digests: Vec<Digest>) -> ExecuteResponse {
    let violations = digests
        .iter()
        .map(|digest| rpc::precondition_failure::Violation {
            r#type: "MISSING".to_string(),
            subject: format!("blobs/{}/{}", digest.hash, digest.size_bytes),
            description: "not in the CAS".to_string(),
        })
        .collect();
    let mut status = rpc_status(
        Code::FailedPrecondition,
        format!("{} input blob(s) are missing from the CAS", digests.len()),
    );
    status.details.push(prost_types::Any {
        type_url: "type.googleapis.com/google.rpc.PreconditionFailure".to_string(),
        value: rpc::PreconditionFailure { violations }.encode_to_vec(),
    });
    ExecuteResponse {
        status: Some(status),
        ..Default::default()
    }
}

/// Creates `relative` (checked) beneath `base`, refusing to pass through anything
/// that is not a real directory.
fn create_dirs_beneath(base: &Path, relative: &Path) -> Result<()> {
    let mut current = base.to_path_buf();
    for component in relative.components() {
        current.push(component);
        match std::fs::symlink_metadata(&current) {
            Ok(metadata) if metadata.is_dir() => {}
            Ok(_) => {
                return Err(Error::invalid_argument(format!(
                    "the parent {} of an output is an input that is not a directory",
                    relative.display()
                )))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&current)?
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

async fn run_command(
    command: &Command,
    exec_dir: &Path,
    stdout_path: &Path,
    stderr_path: &Path,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Ending> {
    let program = &command.arguments[0];
    let program_path = if program.contains('/') && !program.starts_with('/') {
        exec_dir.join(program)
    } else {
        PathBuf::from(program)
    };
    let mut process = tokio::process::Command::new(&program_path);
    process
        .args(&command.arguments[1..])
        .env_clear()
        .envs(
            command
                .environment_variables
                .iter()
                .map(|variable| (&variable.name, &variable.value)),
        )
        .current_dir(exec_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(stdout_path)?)
        .stderr(std::fs::File::create(stderr_path)?)
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // prctl, which is async-signal-safe.
    unsafe {
        process.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match process.spawn() {
        Ok(child) => child,
        Err(error) => {
            let message = format!("cannot start `{program}`: {error}\n");
            std::fs::write(stderr_path, message)?;
            return Ok(Ending::Exited(127));
        }
    };
    let group = child.id().and_then(|pid| i32::try_from(pid).ok());
    let ending = tokio::select! {
        status = child.wait() => {
            let status = status?;
            Ending::Exited(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
        }
        () = tokio::time::sleep(timeout) => Ending::TimedOut,
        () = cancel.cancelled() => Ending::Cancelled,
    };
    if let Some(group) = group {
        // SAFETY: signals the process group the child leads; the child has not been
        // reaped yet unless it exited, and its group id is not reused while any member
        // lives.
        unsafe { libc::kill(-group, libc::SIGKILL) };
    }
    let _ = child.wait().await;
    Ok(ending)
}

/// Removes a task directory, making read-only directories writable if an action left
/// any behind.
fn remove_tree(path: &Path) {
    if std::fs::remove_dir_all(path).is_ok() || !path.exists() {
        return;
    }
    make_writable(path);
    if let Err(error) = std::fs::remove_dir_all(path) {
        tracing::warn!("cannot remove {}: {error}", path.display());
    }
}

fn make_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return;
    };
    if !metadata.is_dir() {
        return;
    }
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755));
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            make_writable(&entry.path());
        }
    }
}
