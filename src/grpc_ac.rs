//! REAPI ActionCache: GetActionResult and UpdateActionResult.
//!
//! Entries are namespaced by instance name, so two teams sharing a node under
//! different instance names never see each other's results. A lookup is served only
//! when the entry is complete (see [`crate::action_results`]); inlining of stdout,
//! stderr and output files is honoured within `max_batch_total_size_bytes`, the same
//! bound a client expects of any single response carrying blob bytes.

use cairn_proto::reapi::action_cache_server::ActionCache;
use cairn_proto::reapi::{ActionResult, GetActionResultRequest, UpdateActionResultRequest};
use tonic::{Request, Response, Status};

use crate::action_results::{self, Inline};
use crate::auth::{Access, Need, Permission};
use crate::digests::{self, function_of_request};
use crate::error::Error;
use crate::store::Store;

/// The ActionCache service.
pub struct ActionCacheService {
    store: Store,
    access: Access,
}

impl ActionCacheService {
    /// An action cache over `store`, serving whom `access` allows.
    pub fn new(store: Store, access: Access) -> Self {
        Self { store, access }
    }
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        self.store.metrics().request("ac", "GetActionResult");
        let instance = Some(request.get_ref().instance_name.as_str());
        self.access
            .check_grpc(&request, Need::One(Permission::Read), instance)?;
        let request = request.into_inner();
        let function = function_of_request(request.digest_function)?;
        let action = digests::required(function, request.action_digest.as_ref(), "action_digest")?;
        crate::traces::record_digest(&request.instance_name, || (action.hash_hex(), action.size));
        let inline = Inline {
            stdout: request.inline_stdout,
            stderr: request.inline_stderr,
            files: request.inline_output_files,
        };
        let budget = self.store.limits().max_batch_total_size;
        let result =
            action_results::load(&self.store, &request.instance_name, action, &inline, budget)
                .await;
        crate::traces::record("hit", result.is_ok());
        let result = result?;
        Ok(Response::new(result))
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        self.store.metrics().request("ac", "UpdateActionResult");
        // `write_ac`, not `write`: a client that may upload blobs must not be able to
        // poison the results every later build trusts.
        let instance = Some(request.get_ref().instance_name.as_str());
        self.access
            .check_grpc(&request, Need::One(Permission::WriteAc), instance)?;
        let request = request.into_inner();
        let function = function_of_request(request.digest_function)?;
        let action = digests::required(function, request.action_digest.as_ref(), "action_digest")?;
        let result = request
            .action_result
            .ok_or_else(|| Error::invalid_argument("action_result is missing"))?;
        action_results::store_result(&self.store, &request.instance_name, action, &result).await?;
        Ok(Response::new(result))
    }
}
