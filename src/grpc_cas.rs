//! REAPI ContentAddressableStorage: existence checks, batch transfers and trees.
//!
//! FindMissingBlobs is the hottest call a build makes (every action's inputs, every
//! time), so it goes straight to the engine's in-memory index. The batch calls carry
//! small blobs inline; each blob gets its own status, so one bad blob (a digest that
//! does not match its data) fails alone while its neighbours are stored. A batch whose
//! total exceeds `max_batch_total_size_bytes` is refused whole, as REAPI requires.
//! GetTree walks a directory tree breadth-first, in pages; a page's token resumes the
//! walk where it ended (`tree_walk.rs`).

use std::sync::Arc;

use bytes::Bytes;
use cairn_proto::reapi::batch_read_blobs_response::Response as ReadResponse;
use cairn_proto::reapi::batch_update_blobs_response::Response as UpdateResponse;
use cairn_proto::reapi::compressor::Value as Compressor;
use cairn_proto::reapi::content_addressable_storage_server::ContentAddressableStorage;
use cairn_proto::reapi::{
    BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest,
    BatchUpdateBlobsResponse, FindMissingBlobsRequest, FindMissingBlobsResponse, GetTreeRequest,
    GetTreeResponse, SpliceBlobRequest, SpliceBlobResponse, SplitBlobRequest, SplitBlobResponse,
};
use cairn_proto::rpc;
use cairn_storage::DigestFunction;
use futures::stream::{self, BoxStream, StreamExt};
use tonic::{Request, Response, Status};

use crate::auth::{Access, Need, Permission};
use crate::digests::{self, function_of_request};
use crate::error::{Error, Result};
use crate::store::Store;
use crate::tree_walk::TreeWalks;

/// Entries of one batch call stored or read at once. All at once, a batch of 100,000
/// tiny blobs (8.6 MB on the wire) made 100,000 futures and engine requests together
/// and took the node from 37 MB to 394 MB. The window first set for that, 64, halved
/// `cairn-bench --scenario batch-small` (100 blobs a call: 515-553 calls/s before,
/// 279-322 after): the entries past the 64th waited for the first ones' group commit
/// and paid a second `fdatasync` round. 1,024 holds a whole Bazel batch (4 MiB of
/// blobs of 4 KiB and up) in one round and keeps the 100,000-blob batch bounded.
const BATCH_IN_FLIGHT: usize = 1024;

/// Most directories returned in one GetTree page, whatever the client asks for.
const MAX_TREE_PAGE: usize = 4096;

/// The ContentAddressableStorage service.
pub struct CasService {
    store: Store,
    trees: Arc<TreeWalks>,
    access: Access,
}

impl CasService {
    /// A CAS service over `store`, parking GetTree walks between pages in `trees`,
    /// serving whom `access` allows.
    pub fn new(store: Store, trees: Arc<TreeWalks>, access: Access) -> Self {
        Self {
            store,
            trees,
            access,
        }
    }
}

/// The per-blob status of a batch entry.
pub fn rpc_status(result: &Result<()>) -> rpc::Status {
    match result {
        Ok(()) => rpc::Status::default(),
        Err(error) => rpc::Status {
            code: error.kind().grpc_code() as i32,
            message: error.message().to_string(),
            details: Vec::new(),
        },
    }
}

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        self.store.metrics().request("cas", "FindMissingBlobs");
        // Uploaders ask which blobs to send, readers which exist: either may.
        let need = Need::Either(Permission::Read, Permission::Write);
        let instance = Some(request.get_ref().instance_name.as_str());
        self.access.check_grpc(&request, need, instance)?;
        let request = request.into_inner();
        let function = function_of_request(request.digest_function)?;
        let wanted = request
            .blob_digests
            .iter()
            .map(|digest| digests::from_proto(function, digest))
            .collect::<Result<Vec<_>>>()?;
        crate::traces::record("instance", request.instance_name.as_str());
        crate::traces::record("requested", wanted.len());
        let missing = self.store.find_missing(wanted).await?;
        crate::traces::record("missing", missing.len());
        Ok(Response::new(FindMissingBlobsResponse {
            missing_blob_digests: missing.iter().map(digests::to_proto).collect(),
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        self.store.metrics().request("cas", "BatchUpdateBlobs");
        let instance = Some(request.get_ref().instance_name.as_str());
        self.access
            .check_grpc(&request, Need::One(Permission::Write), instance)?;
        let request = request.into_inner();
        let function = function_of_request(request.digest_function)?;
        let total: u64 = request
            .requests
            .iter()
            .map(|blob| blob.data.len() as u64)
            .sum();
        self.check_batch_total(total)?;
        let updates = request.requests.into_iter().map(|blob| async move {
            let digest = blob.digest.clone().unwrap_or_default();
            let result = self.update_one(function, blob).await;
            UpdateResponse {
                digest: Some(digest),
                status: Some(rpc_status(&result)),
            }
        });
        Ok(Response::new(BatchUpdateBlobsResponse {
            responses: stream::iter(updates)
                .buffered(BATCH_IN_FLIGHT)
                .collect()
                .await,
        }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        self.store.metrics().request("cas", "BatchReadBlobs");
        let instance = Some(request.get_ref().instance_name.as_str());
        self.access
            .check_grpc(&request, Need::One(Permission::Read), instance)?;
        let request = request.into_inner();
        let function = function_of_request(request.digest_function)?;
        let wanted = request
            .digests
            .iter()
            .map(|digest| digests::from_proto(function, digest))
            .collect::<Result<Vec<_>>>()?;
        self.check_batch_total(wanted.iter().map(|digest| digest.size).sum())?;
        let reads = wanted
            .into_iter()
            .zip(request.digests)
            .map(|(digest, wire)| async move {
                let (data, result) = match self.store.get_bytes(digest).await {
                    Ok(data) => (data, Ok(())),
                    Err(error) => (Bytes::new(), Err(error)),
                };
                ReadResponse {
                    digest: Some(wire),
                    data,
                    compressor: Compressor::Identity as i32,
                    status: Some(rpc_status(&result)),
                }
            });
        Ok(Response::new(BatchReadBlobsResponse {
            responses: stream::iter(reads)
                .buffered(BATCH_IN_FLIGHT)
                .collect()
                .await,
        }))
    }

    type GetTreeStream = BoxStream<'static, Result<GetTreeResponse, Status>>;

    async fn get_tree(
        &self,
        request: Request<GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        self.store.metrics().request("cas", "GetTree");
        let instance = Some(request.get_ref().instance_name.as_str());
        self.access
            .check_grpc(&request, Need::One(Permission::Read), instance)?;
        let request = request.into_inner();
        let function = function_of_request(request.digest_function)?;
        let root = digests::required(function, request.root_digest.as_ref(), "root_digest")?;
        let page_size = match usize::try_from(request.page_size) {
            Ok(0) => MAX_TREE_PAGE,
            Ok(size) => size.min(MAX_TREE_PAGE),
            Err(_) => return Err(Error::invalid_argument("page_size is negative").into()),
        };
        let page = self
            .trees
            .page(&self.store, root, &request.page_token, page_size)
            .await?;
        let response = GetTreeResponse {
            next_page_token: page.next_page_token,
            directories: page.directories,
        };
        Ok(Response::new(Box::pin(stream::iter([Ok(response)]))))
    }

    async fn split_blob(
        &self,
        _request: Request<SplitBlobRequest>,
    ) -> Result<Response<SplitBlobResponse>, Status> {
        Err(Status::unimplemented(
            "SplitBlob is not supported by this node",
        ))
    }

    async fn splice_blob(
        &self,
        _request: Request<SpliceBlobRequest>,
    ) -> Result<Response<SpliceBlobResponse>, Status> {
        Err(Status::unimplemented(
            "SpliceBlob is not supported by this node",
        ))
    }
}

impl CasService {
    fn check_batch_total(&self, total: u64) -> Result<()> {
        let limit = self.store.limits().max_batch_total_size;
        if total > limit {
            return Err(Error::invalid_argument(format!(
                "the batch holds {total} bytes, more than max_batch_total_size_bytes ({limit}); \
                 use ByteStream for large blobs"
            )));
        }
        Ok(())
    }

    async fn update_one(
        &self,
        function: DigestFunction,
        blob: cairn_proto::reapi::batch_update_blobs_request::Request,
    ) -> Result<()> {
        let digest = digests::required(function, blob.digest.as_ref(), "digest")?;
        self.store.check_blob_size(&digest)?;
        let data = match Compressor::try_from(blob.compressor) {
            Ok(Compressor::Identity) => blob.data,
            Ok(Compressor::Zstd) => decompress_bounded(&blob.data, digest.size)?,
            _ => {
                return Err(Error::invalid_argument(format!(
                    "compressor {} is not supported in batch updates",
                    blob.compressor
                )))
            }
        };
        self.store.put(digest, data).await
    }
}

/// Decompresses a whole small zstd blob, refusing output larger than `size` bytes.
fn decompress_bounded(data: &[u8], size: u64) -> Result<Bytes> {
    let capacity = usize::try_from(size)
        .map_err(|_| Error::invalid_argument("declared size does not fit in memory"))?;
    zstd::bulk::decompress(data, capacity)
        .map(Bytes::from)
        .map_err(|error| Error::invalid_argument(format!("invalid zstd data: {error}")))
}
