//! REAPI Capabilities: what this node tells clients it can do.
//!
//! Clients decide how to talk to the node from this answer alone: which digest
//! functions to hash with, whether they may compress ByteStream transfers, how large a
//! batch may be, whether they may write action results. Bazel refuses a cache that does
//! not list SHA-256 or does not allow AC updates. The node serves any instance name, so
//! the answer is the same for all of them. A node that runs execution (a single node
//! with its own scheduler and worker) adds `execution_capabilities` describing what
//! its scheduler accepts; a cache-only node leaves them out, and a separate
//! `cairn-scheduler` asks the node for its cache part and adds its own.

use cairn_proto::build::bazel::semver::SemVer;
use cairn_proto::reapi::capabilities_server::Capabilities;
use cairn_proto::reapi::compressor::Value as Compressor;
use cairn_proto::reapi::priority_capabilities::PriorityRange;
use cairn_proto::reapi::symlink_absolute_path_strategy::Value as SymlinkStrategy;
use cairn_proto::reapi::{
    ActionCacheUpdateCapabilities, CacheCapabilities, ExecutionCapabilities,
    GetCapabilitiesRequest, PriorityCapabilities, ServerCapabilities,
};
use cairn_storage::DigestFunction;
use tonic::{Request, Response, Status};

use crate::auth::{Access, Need};
use crate::digests::function_to_proto;
use crate::store::Store;

/// The Capabilities service.
pub struct CapabilitiesService {
    store: Store,
    execution: bool,
    access: Access,
}

impl CapabilitiesService {
    /// Answers from the limits of `store`, advertising execution if `execution`, to
    /// whom `access` lets in.
    pub fn new(store: Store, execution: bool, access: Access) -> Self {
        Self {
            store,
            execution,
            access,
        }
    }
}

/// What the node's scheduler accepts: actions hashed with SHA-256 or BLAKE3, any
/// priority.
fn execution_capabilities() -> ExecutionCapabilities {
    ExecutionCapabilities {
        digest_function: function_to_proto(DigestFunction::Sha256) as i32,
        exec_enabled: true,
        execution_priority_capabilities: Some(PriorityCapabilities {
            priorities: vec![PriorityRange {
                min_priority: i32::MIN,
                max_priority: i32::MAX,
            }],
        }),
        supported_node_properties: Vec::new(),
        digest_functions: [DigestFunction::Sha256, DigestFunction::Blake3]
            .into_iter()
            .map(|function| function_to_proto(function) as i32)
            .collect(),
    }
}

fn version(major: i32, minor: i32) -> SemVer {
    SemVer {
        major,
        minor,
        patch: 0,
        prerelease: String::new(),
    }
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        self.store
            .metrics()
            .request("capabilities", "GetCapabilities");
        // Every client asks first, whatever it goes on to do: any principal may.
        let instance = Some(request.get_ref().instance_name.as_str());
        self.access
            .check_grpc(&request, Need::Authenticated, instance)?;
        let limits = self.store.limits();
        let cache = CacheCapabilities {
            digest_functions: [DigestFunction::Sha256, DigestFunction::Blake3]
                .into_iter()
                .map(|function| function_to_proto(function) as i32)
                .collect(),
            action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                update_enabled: true,
            }),
            max_batch_total_size_bytes: limits.max_batch_total_size as i64,
            symlink_absolute_path_strategy: SymlinkStrategy::Allowed as i32,
            supported_compressors: vec![Compressor::Zstd as i32],
            supported_batch_update_compressors: vec![Compressor::Zstd as i32],
            max_cas_blob_size_bytes: limits.max_cas_blob_size as i64,
            ..Default::default()
        };
        Ok(Response::new(ServerCapabilities {
            cache_capabilities: Some(cache),
            execution_capabilities: self.execution.then(execution_capabilities),
            low_api_version: Some(version(2, 0)),
            high_api_version: Some(version(2, 3)),
            ..Default::default()
        }))
    }
}
