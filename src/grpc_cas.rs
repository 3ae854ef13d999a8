//! REAPI ContentAddressableStorage: existence checks, batch transfers and trees.
//!
//! FindMissingBlobs is the hottest call a build makes (every action's inputs, every
//! time), so it goes straight to the engine's in-memory index. The batch calls carry
//! small blobs inline; each blob gets its own status, so one bad blob (a digest that
//! does not match its data) fails alone while its neighbours are stored. A batch whose
//! total exceeds `max_batch_total_size_bytes` is refused whole, as REAPI requires.
//! GetTree walks a directory tree breadth-first, returning it in pages whose token is
//! the position in that walk, so a client can continue where a page ended.

use std::collections::{HashSet, VecDeque};

use bytes::Bytes;
use cairn_proto::reapi::batch_read_blobs_response::Response as ReadResponse;
use cairn_proto::reapi::batch_update_blobs_response::Response as UpdateResponse;
use cairn_proto::reapi::compressor::Value as Compressor;
use cairn_proto::reapi::content_addressable_storage_server::ContentAddressableStorage;
use cairn_proto::reapi::{
    BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest,
    BatchUpdateBlobsResponse, Directory, FindMissingBlobsRequest, FindMissingBlobsResponse,
    GetTreeRequest, GetTreeResponse, SpliceBlobRequest, SpliceBlobResponse, SplitBlobRequest,
    SplitBlobResponse,
};
use cairn_proto::rpc;
use cairn_storage::{Digest, DigestFunction};
use futures::future::join_all;
use futures::stream::{self, BoxStream};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::digests::{self, function_of_request};
use crate::error::{Error, Result};
use crate::store::Store;

/// Most directories returned in one GetTree page, whatever the client asks for.
const MAX_TREE_PAGE: usize = 4096;

/// Most directory fetches in flight during a GetTree walk.
const TREE_FETCH_WIDTH: usize = 64;

/// The ContentAddressableStorage service.
pub struct CasService {
    store: Store,
}

impl CasService {
    /// A CAS service over `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
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
        let request = request.into_inner();
        let function = function_of_request(request.digest_function)?;
        let wanted = request
            .blob_digests
            .iter()
            .map(|digest| digests::from_proto(function, digest))
            .collect::<Result<Vec<_>>>()?;
        let missing = self.store.find_missing(wanted).await?;
        Ok(Response::new(FindMissingBlobsResponse {
            missing_blob_digests: missing.iter().map(digests::to_proto).collect(),
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        self.store.metrics().request("cas", "BatchUpdateBlobs");
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
            responses: join_all(updates).await,
        }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        self.store.metrics().request("cas", "BatchReadBlobs");
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
            responses: join_all(reads).await,
        }))
    }

    type GetTreeStream = BoxStream<'static, Result<GetTreeResponse, Status>>;

    async fn get_tree(
        &self,
        request: Request<GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        self.store.metrics().request("cas", "GetTree");
        let request = request.into_inner();
        let function = function_of_request(request.digest_function)?;
        let root = digests::required(function, request.root_digest.as_ref(), "root_digest")?;
        let skip = parse_page_token(&request.page_token)?;
        let page_size = match usize::try_from(request.page_size) {
            Ok(0) => MAX_TREE_PAGE,
            Ok(size) => size.min(MAX_TREE_PAGE),
            Err(_) => return Err(Error::invalid_argument("page_size is negative").into()),
        };
        let page = walk_tree(&self.store, root, skip, page_size).await?;
        let response = GetTreeResponse {
            next_page_token: page.next.map(|next| next.to_string()).unwrap_or_default(),
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

fn parse_page_token(token: &str) -> Result<usize> {
    if token.is_empty() {
        return Ok(0);
    }
    token
        .parse()
        .map_err(|_| Error::invalid_argument(format!("invalid page_token `{token}`")))
}

/// One page of a tree walk.
struct TreePage {
    directories: Vec<Directory>,
    /// Position of the first directory of the next page, if there is one.
    next: Option<usize>,
}

/// Walks the tree under `root` breadth-first, each directory once, and returns the
/// `take` directories after the first `skip`. Missing subdirectories are left out, as
/// REAPI allows; a missing root is `NotFound`.
async fn walk_tree(store: &Store, root: Digest, skip: usize, take: usize) -> Result<TreePage> {
    let directory_limit = store.limits().max_batch_total_size;
    let mut seen = HashSet::from([root]);
    let mut queue = VecDeque::from([root]);
    let mut position = 0usize;
    let mut directories = Vec::new();
    let mut first = true;
    while !queue.is_empty() {
        let width = queue.len().min(TREE_FETCH_WIDTH);
        let level: Vec<Digest> = queue.drain(..width).collect();
        let fetched = join_all(level.iter().map(|digest| async move {
            if digest.size > directory_limit {
                return Err(Error::invalid_argument(format!(
                    "directory {}/{} is too large to be a Directory message",
                    digest.hash_hex(),
                    digest.size
                )));
            }
            store.get_bytes(*digest).await
        }))
        .await;
        for (digest, data) in level.into_iter().zip(fetched) {
            let data = match data {
                Ok(data) => data,
                Err(error) if first => return Err(error),
                Err(_) => continue,
            };
            first = false;
            let directory = Directory::decode(data).map_err(|error| {
                Error::invalid_argument(format!(
                    "blob {}/{} is not a Directory: {error}",
                    digest.hash_hex(),
                    digest.size
                ))
            })?;
            for child in &directory.directories {
                let child = digests::required(digest.function, child.digest.as_ref(), "child")?;
                if seen.insert(child) {
                    queue.push_back(child);
                }
            }
            if position >= skip {
                if directories.len() == take {
                    return Ok(TreePage {
                        directories,
                        next: Some(position),
                    });
                }
                directories.push(directory);
            }
            position += 1;
        }
    }
    Ok(TreePage {
        directories,
        next: None,
    })
}
