//! What every Execute goes through before it reaches the state, whichever keeps it:
//! reading the Action (and, for old clients, the Command) from the cache node, the
//! action-cache lookup, and turning the request into a [`JobSpec`].
//!
//! Both the in-memory [`super::state`] and the Redis-backed [`super::redis_state`]
//! start from the same [`Intake`], so an action is judged the same way whether one
//! scheduler runs or several.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use cairn_proto::reapi::platform::Property;
use cairn_proto::reapi::{Action, Command, Digest, ExecuteRequest, ExecuteResponse};
use cairn_proto::rpc;
use cairn_proto::worker::StartTask;
use prost::Message;
use tonic::Code;

use super::config::SchedulerConfig;
use super::matching::{self, Requirements};
use crate::cas_client::{CasClient, TransferLimits};
use crate::digests;
use crate::error::{Error, Result};
use crate::exec_common::{
    from_proto_duration, proto_duration, rpc_status, timestamp, CacheChannel,
};

/// Identical in-flight actions share a job under this key: instance, digest function,
/// Action hash and size.
pub type DedupKey = (String, i32, String, i64);

/// The outcome of reading an Execute request.
pub enum Intake {
    /// Answered without executing (from the action cache, or refused because a blob is
    /// missing): the operation completes at once with this response.
    Finished(Digest, Box<ExecuteResponse>),
    /// To be executed.
    Job(Box<JobSpec>),
}

/// Everything the scheduler keeps about an action to execute.
pub struct JobSpec {
    /// Set unless the Action is `do_not_cache`: identical actions in flight share a job.
    pub dedup: Option<DedupKey>,
    /// The request's instance name.
    pub instance_name: String,
    /// The Action's digest.
    pub action_digest: Digest,
    /// The wire value of the digest function.
    pub digest_function: i32,
    /// The action's platform properties, as the client sent them.
    pub platform: Vec<Property>,
    /// What a worker must offer, from `platform` and the configured rules.
    pub requirements: Requirements,
    /// `ExecutionPolicy.priority`: lower runs sooner.
    pub priority: i32,
    /// The Action's timeout, capped by `max_action_timeout`.
    pub timeout: Duration,
    /// When the request arrived.
    pub queued_at: SystemTime,
    /// The W3C trace context of the Execute (empty when traces are off).
    pub trace_context: HashMap<String, String>,
}

impl JobSpec {
    /// The StartTask for attempt `task_id`.
    pub fn start_task(&self, task_id: String) -> StartTask {
        StartTask {
            task_id,
            instance_name: self.instance_name.clone(),
            action_digest: Some(self.action_digest.clone()),
            digest_function: self.digest_function,
            timeout: Some(proto_duration(self.timeout)),
            queued_timestamp: Some(timestamp(self.queued_at)),
            properties: self.requirements.passed_through.clone(),
            trace_context: self.trace_context.clone(),
        }
    }
}

/// An ExecuteResponse that carries only a status.
pub fn status_response(code: Code, message: impl Into<String>) -> ExecuteResponse {
    ExecuteResponse {
        status: Some(rpc_status(code, message)),
        ..Default::default()
    }
}

/// The FAILED_PRECONDITION response REAPI prescribes when blobs are missing from the
/// CAS, with the PreconditionFailure details clients use to upload them again.
fn missing_response(digest: &Digest, what: &str) -> ExecuteResponse {
    let failure = rpc::PreconditionFailure {
        violations: vec![rpc::precondition_failure::Violation {
            r#type: "MISSING".to_string(),
            subject: format!("blobs/{}/{}", digest.hash, digest.size_bytes),
            description: format!("the {what} is not in the CAS"),
        }],
    };
    let mut status = rpc_status(
        Code::FailedPrecondition,
        format!(
            "the {what} {}/{} is not in the CAS",
            digest.hash, digest.size_bytes
        ),
    );
    status.details.push(prost_types::Any {
        type_url: "type.googleapis.com/google.rpc.PreconditionFailure".to_string(),
        value: failure.encode_to_vec(),
    });
    ExecuteResponse {
        status: Some(status),
        ..Default::default()
    }
}

/// Reads `request`: answers from the action cache when it can (never for a
/// `do_not_cache` Action), otherwise describes the job. A missing Action is
/// FAILED_PRECONDITION even when the cache holds a result. The platform comes from the
/// Action, or for clients older than REAPI 2.2 (Bazel 4) from the Command.
#[allow(deprecated)]
pub async fn read(
    config: &SchedulerConfig,
    cache: &CacheChannel,
    request: ExecuteRequest,
) -> Result<Intake> {
    let function = digests::function_of_request(request.digest_function)?;
    let wire_function = digests::function_to_proto(function);
    let action_digest = request
        .action_digest
        .clone()
        .ok_or_else(|| Error::invalid_argument("action_digest is missing"))?;
    digests::check(&action_digest)?;
    let queued_at = SystemTime::now();
    let cas = CasClient::new(
        cache.clone(),
        &request.instance_name,
        wire_function,
        TransferLimits::default(),
    );
    let Some(action_bytes) = cas.read_blob(&action_digest).await? else {
        let response = missing_response(&action_digest, "Action");
        return Ok(Intake::Finished(action_digest, Box::new(response)));
    };
    let action = Action::decode(action_bytes)
        .map_err(|error| Error::invalid_argument(format!("the Action does not parse: {error}")))?;
    // REAPI: a `do_not_cache` action is never answered from the action cache, even
    // when an entry exists for its digest. Only the Action says so, hence it is read
    // before the lookup, at the price of one small CAS read before a cache hit.
    if !request.skip_cache_lookup && !action.do_not_cache {
        match cas.get_action_result(&action_digest).await {
            Ok(Some(result)) => {
                let response = ExecuteResponse {
                    result: Some(result),
                    cached_result: true,
                    status: Some(rpc_status(Code::Ok, "")),
                    ..Default::default()
                };
                return Ok(Intake::Finished(action_digest, Box::new(response)));
            }
            Ok(None) => {}
            Err(error) => tracing::warn!("action cache lookup failed, executing: {error}"),
        }
    }
    let command_digest = action
        .command_digest
        .clone()
        .ok_or_else(|| Error::invalid_argument("the Action has no command_digest"))?;
    digests::check(&command_digest)?;
    let platform = match action
        .platform
        .as_ref()
        .filter(|p| !p.properties.is_empty())
    {
        Some(platform) => platform.properties.clone(),
        None => {
            let Some(command_bytes) = cas.read_blob(&command_digest).await? else {
                let response = missing_response(&command_digest, "Command");
                return Ok(Intake::Finished(action_digest, Box::new(response)));
            };
            Command::decode(command_bytes)
                .map_err(|error| {
                    Error::invalid_argument(format!("the Command does not parse: {error}"))
                })?
                .platform
                .map(|platform| platform.properties)
                .unwrap_or_default()
        }
    };
    let requirements = matching::requirements(config, &platform)?;
    let timeout = action
        .timeout
        .as_ref()
        .and_then(from_proto_duration)
        .unwrap_or(config.default_action_timeout)
        .min(config.max_action_timeout);
    let priority = request
        .execution_policy
        .as_ref()
        .map_or(0, |policy| policy.priority);
    let dedup = (!action.do_not_cache).then(|| {
        (
            request.instance_name.clone(),
            wire_function as i32,
            action_digest.hash.clone(),
            action_digest.size_bytes,
        )
    });
    Ok(Intake::Job(Box::new(JobSpec {
        dedup,
        instance_name: request.instance_name,
        action_digest,
        digest_function: wire_function as i32,
        platform,
        requirements,
        priority,
        timeout,
        queued_at,
        trace_context: crate::traces::inject_current(),
    })))
}
