//! google.bytestream.ByteStream over the CAS: streaming reads and resumable writes.
//!
//! Large blobs travel here, so nothing is ever held whole: a read streams the engine's
//! chunks (re-cut to a bounded message size), a write hands each received chunk to an
//! engine upload that owns a reserved extent on disk and hashes as it goes. The blob
//! becomes visible only when the upload finishes and its digest verifies.
//!
//! Writes follow REAPI's rules: every message's `write_offset` must be exactly what
//! was committed so far (a skip or a rewind is `INVALID_ARGUMENT`); a blob that already
//! exists ends the call at once with its full size (`-1` for compressed uploads); a
//! stream that breaks leaves its upload parked (see [`crate::uploads`]) so the client
//! can resume from `committed_size`. Compressed uploads (`compressed-blobs/zstd`) are
//! decompressed chunk by chunk; their offsets count compressed bytes, which cannot be
//! mapped back to a position in the decompressor, so they restart rather than resume.

use std::sync::Arc;

use bytes::Bytes;
use cairn_proto::bytestream::byte_stream_server::ByteStream;
use cairn_proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse,
};
use cairn_storage::Digest;
use futures::stream::{self, BoxStream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Access, Credentials, Need, Permission};
use crate::engine_errors::engine_error;
use crate::error::{Error, Result};
use crate::resource_name::{parse_read, parse_write, Compression};
use crate::store::{Store, Upload};
use crate::uploads::PendingUploads;
use crate::zstd_stream::{Compressor, Decompressor};

/// Largest data payload of one ReadResponse.
const READ_CHUNK: usize = 256 << 10;

/// The ByteStream service.
pub struct ByteStreamService {
    store: Store,
    pending: Arc<PendingUploads>,
    access: Access,
}

impl ByteStreamService {
    /// A ByteStream service over `store`, parking interrupted uploads in `pending`,
    /// serving whom `access` allows.
    pub fn new(store: Store, pending: Arc<PendingUploads>, access: Access) -> Self {
        Self {
            store,
            pending,
            access,
        }
    }
}

type ReadStream = BoxStream<'static, Result<ReadResponse, Status>>;

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        self.store.metrics().request("bytestream", "Read");
        let credentials = Credentials::of_grpc(&request);
        let request = request.into_inner();
        let name = parse_read(&request.resource_name)?;
        self.access.check(
            &credentials,
            Need::One(Permission::Read),
            Some(name.instance),
        )?;
        let offset = u64::try_from(request.read_offset).map_err(|_| {
            Error::out_of_range(format!("read_offset {} is negative", request.read_offset))
        })?;
        let limit = match request.read_limit {
            0 => None,
            limit if limit < 0 => {
                return Err(
                    Error::invalid_argument(format!("read_limit {limit} is negative")).into(),
                )
            }
            limit => Some(limit as u64),
        };
        crate::traces::record_digest(name.instance, || (name.digest.hash_hex(), name.digest.size));
        let stream = match name.compression {
            Compression::Identity => {
                let blob = self.store.get(name.digest, offset, limit).await;
                crate::traces::record("hit", blob.is_ok());
                rechunk(blob?)
            }
            Compression::Zstd => {
                if limit.is_some() {
                    return Err(Error::invalid_argument(
                        "read_limit must be 0 when reading compressed-blobs",
                    )
                    .into());
                }
                let blob = self.store.get(name.digest, offset, None).await;
                crate::traces::record("hit", blob.is_ok());
                compress(blob?)?
            }
        };
        Ok(Response::new(stream))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        self.store.metrics().request("bytestream", "Write");
        let credentials = Credentials::of_grpc(&request);
        // Refused before the first message is read, when credentials alone decide.
        self.access
            .check(&credentials, Need::One(Permission::Write), None)?;
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Error::invalid_argument("the write stream carried no request"))?;
        let resource = first.resource_name.clone();
        let name = parse_write(&resource)?;
        self.access.check(
            &credentials,
            Need::One(Permission::Write),
            Some(name.instance),
        )?;
        self.store.check_blob_size(&name.digest)?;
        if self.store.contains(name.digest).await? {
            self.pending.take(&resource);
            let committed_size = match name.compression {
                Compression::Identity => name.digest.size as i64,
                Compression::Zstd => -1,
            };
            return Ok(Response::new(WriteResponse { committed_size }));
        }
        let (compression, digest) = (name.compression, name.digest);
        let committed_size = match compression {
            Compression::Identity => self.write_plain(resource, digest, first, stream).await?,
            Compression::Zstd => {
                write_compressed(&self.store, &resource, digest, first, stream).await?
            }
        };
        Ok(Response::new(WriteResponse {
            committed_size: committed_size as i64,
        }))
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        self.store
            .metrics()
            .request("bytestream", "QueryWriteStatus");
        let credentials = Credentials::of_grpc(&request);
        let resource = request.into_inner().resource_name;
        let name = parse_write(&resource)?;
        self.access.check(
            &credentials,
            Need::One(Permission::Write),
            Some(name.instance),
        )?;
        if let Some(committed) = self.pending.committed(&resource) {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: committed as i64,
                complete: false,
            }));
        }
        let response = if self.store.contains(name.digest).await? {
            QueryWriteStatusResponse {
                committed_size: name.digest.size as i64,
                complete: true,
            }
        } else {
            QueryWriteStatusResponse {
                committed_size: 0,
                complete: false,
            }
        };
        Ok(Response::new(response))
    }
}

impl ByteStreamService {
    /// Writes an uncompressed blob, resuming a parked upload when `write_offset` says so.
    async fn write_plain(
        &self,
        resource: String,
        digest: Digest,
        first: WriteRequest,
        mut stream: Streaming<WriteRequest>,
    ) -> Result<u64, Status> {
        let mut upload = self
            .start_or_resume(&resource, digest, first.write_offset)
            .await?;
        let progress = self.pending.track(&resource, upload.committed());
        let mut message = first;
        loop {
            if let Err(error) = check_message(&resource, &message, upload.committed(), digest) {
                self.pending.park(resource, upload);
                return Err(error.into());
            }
            let finish = message.finish_write;
            if !message.data.is_empty() {
                self.store
                    .metrics()
                    .bytes_received(message.data.len() as u64);
                upload.write(message.data).await.map_err(engine_error)?;
                progress.set(upload.committed());
            }
            if finish {
                upload.finish().await.map_err(engine_error)?;
                return Ok(digest.size);
            }
            message = match stream.message().await {
                Ok(Some(message)) => message,
                Ok(None) => {
                    self.pending.park(resource, upload);
                    return Err(Error::invalid_argument(
                        "the write stream ended without finish_write",
                    )
                    .into());
                }
                Err(status) => {
                    self.pending.park(resource, upload);
                    return Err(status);
                }
            };
        }
    }

    async fn start_or_resume(&self, resource: &str, digest: Digest, offset: i64) -> Result<Upload> {
        let parked = self.pending.take(resource);
        if offset == 0 {
            drop(parked);
            return self.store.begin_put(digest).await;
        }
        match parked {
            Some(upload) if upload.committed() as i64 == offset => Ok(upload),
            Some(upload) => {
                let committed = upload.committed();
                self.pending.park(resource.to_string(), upload);
                Err(Error::invalid_argument(format!(
                    "write_offset {offset} does not continue the upload, which has {committed} bytes committed"
                )))
            }
            None => Err(Error::invalid_argument(format!(
                "write_offset {offset} resumes an upload that does not exist (or expired); start at 0"
            ))),
        }
    }
}

/// Checks one message of an uncompressed write against the upload's state.
fn check_message(
    resource: &str,
    message: &WriteRequest,
    committed: u64,
    digest: Digest,
) -> Result<()> {
    if !message.resource_name.is_empty() && message.resource_name != resource {
        return Err(Error::invalid_argument(
            "resource_name changed in the middle of a write stream",
        ));
    }
    if message.write_offset != committed as i64 {
        return Err(Error::invalid_argument(format!(
            "write_offset {} does not match the {committed} bytes committed so far",
            message.write_offset
        )));
    }
    if committed + message.data.len() as u64 > digest.size {
        return Err(Error::invalid_argument(format!(
            "more data than the {} bytes declared in the resource name",
            digest.size
        )));
    }
    if message.finish_write && committed + (message.data.len() as u64) != digest.size {
        return Err(Error::invalid_argument(format!(
            "finish_write after {} bytes, but the resource name declares {}",
            committed + message.data.len() as u64,
            digest.size
        )));
    }
    Ok(())
}

/// Writes a zstd-compressed blob; returns the number of compressed bytes received.
async fn write_compressed(
    store: &Store,
    resource: &str,
    digest: Digest,
    first: WriteRequest,
    mut stream: Streaming<WriteRequest>,
) -> Result<u64, Status> {
    if first.write_offset != 0 {
        return Err(Error::invalid_argument(
            "compressed uploads cannot be resumed: write_offset must start at 0",
        )
        .into());
    }
    let mut upload = store.begin_put(digest).await?;
    let mut decompressor = Decompressor::new()?;
    let mut received = 0u64;
    let mut message = first;
    loop {
        if !message.resource_name.is_empty() && message.resource_name != resource {
            return Err(Error::invalid_argument(
                "resource_name changed in the middle of a write stream",
            )
            .into());
        }
        if message.write_offset != received as i64 {
            return Err(Error::invalid_argument(format!(
                "write_offset {} does not match the {received} compressed bytes received so far",
                message.write_offset
            ))
            .into());
        }
        received += message.data.len() as u64;
        store.metrics().bytes_received(message.data.len() as u64);
        let mut consumed = 0;
        while let Some(piece) = decompressor.step(&message.data, &mut consumed)? {
            if upload.committed() + piece.len() as u64 > digest.size {
                return Err(Error::invalid_argument(format!(
                    "the data decompresses to more than the {} bytes declared",
                    digest.size
                ))
                .into());
            }
            upload.write(piece).await.map_err(engine_error)?;
        }
        if message.finish_write {
            decompressor.finish()?;
            if upload.committed() != digest.size {
                return Err(Error::invalid_argument(format!(
                    "the data decompresses to {} bytes, but the resource name declares {}",
                    upload.committed(),
                    digest.size
                ))
                .into());
            }
            upload.finish().await.map_err(engine_error)?;
            return Ok(received);
        }
        message = stream.message().await?.ok_or_else(|| {
            Error::invalid_argument("the write stream ended without finish_write")
        })?;
    }
}

/// Cuts a blob's chunks into ReadResponses of at most [`READ_CHUNK`] bytes.
fn rechunk(blob: crate::store::ByteStream) -> ReadStream {
    blob.flat_map(|chunk| match chunk {
        Ok(chunk) => stream::iter(split(chunk).map(|data| Ok(ReadResponse { data }))).left_stream(),
        Err(error) => stream::once(async move { Err(Status::from(error)) }).right_stream(),
    })
    .boxed()
}

fn split(chunk: Bytes) -> impl Iterator<Item = Bytes> {
    let pieces = chunk.len().div_ceil(READ_CHUNK);
    (0..pieces).map(move |index| {
        let start = index * READ_CHUNK;
        chunk.slice(start..(start + READ_CHUNK).min(chunk.len()))
    })
}

/// Compresses a blob's chunks into one zstd frame, one ReadResponse per chunk.
fn compress(blob: crate::store::ByteStream) -> Result<ReadStream> {
    let compressor = Compressor::new()?;
    let state = (blob, Some(compressor));
    let frames = stream::unfold(state, |(mut blob, compressor)| async move {
        let mut compressor = compressor?;
        let produced = match blob.next().await {
            Some(Ok(chunk)) => compressor
                .compress(&chunk)
                .map(|data| (data, Some(compressor))),
            Some(Err(error)) => Err(error),
            None => compressor.finish().map(|data| (data, None)),
        };
        Some(match produced {
            Ok((data, compressor)) => (Ok(data), (blob, compressor)),
            Err(error) => (Err(error), (blob, None)),
        })
    });
    Ok(frames
        .filter_map(|data| async move {
            match data {
                Ok(data) if data.is_empty() => None,
                Ok(data) => Some(Ok(ReadResponse { data })),
                Err(error) => Some(Err(Status::from(error))),
            }
        })
        .boxed())
}
