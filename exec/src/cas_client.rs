//! A client of the cache node's CAS, ActionCache and ByteStream services, as the
//! scheduler and the workers use them.
//!
//! Small blobs travel in batches (BatchReadBlobs / BatchUpdateBlobs): one round trip for
//! many directories or small files, which is what most input trees are made of. Blobs
//! larger than the batch threshold stream through ByteStream, straight from or into a
//! file, so a multi-gigabyte output never sits in memory. Batches and streams run
//! concurrently up to a configured limit. The empty blob is never transferred: every
//! side knows its content.

use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;
use cairn_proto::bytestream::byte_stream_client::ByteStreamClient;
use cairn_proto::bytestream::{ReadRequest, WriteRequest};
use cairn_proto::reapi::action_cache_client::ActionCacheClient;
use cairn_proto::reapi::batch_update_blobs_request::Request as UpdateRequest;
use cairn_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use cairn_proto::reapi::digest_function::Value as FunctionValue;
use cairn_proto::reapi::{
    ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Digest, FindMissingBlobsRequest,
    GetActionResultRequest, UpdateActionResultRequest,
};
use futures::{StreamExt, TryStreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::digests::{key, BlobKey};
use crate::error::{Error, Result};
use crate::exec_common::{error_from_status, CacheChannel};

/// How blobs move between this process and the cache node.
#[derive(Debug, Clone, Copy)]
pub struct TransferLimits {
    /// Blobs up to this size go in batches; larger ones through ByteStream.
    pub batch_threshold: u64,
    /// Largest total of blob bytes in one batch call.
    pub max_batch_bytes: u64,
    /// How many batch calls and streams run at once.
    pub concurrency: usize,
}

impl Default for TransferLimits {
    fn default() -> Self {
        Self {
            batch_threshold: 1 << 20,
            max_batch_bytes: 3 << 20,
            concurrency: 16,
        }
    }
}

/// One instance name and digest function on the cache node.
#[derive(Clone)]
pub struct CasClient {
    channel: CacheChannel,
    instance: String,
    function: FunctionValue,
    limits: TransferLimits,
}

const MAX_MESSAGE: usize = 64 << 20;
const STREAM_CHUNK: usize = 64 << 10;

impl CasClient {
    /// A client for `instance` hashing with `function`.
    pub fn new(
        channel: CacheChannel,
        instance: &str,
        function: FunctionValue,
        limits: TransferLimits,
    ) -> Self {
        Self {
            channel,
            instance: instance.to_string(),
            function,
            limits,
        }
    }

    /// Blobs up to this size travel in batches.
    pub fn batch_threshold(&self) -> u64 {
        self.limits.batch_threshold
    }

    fn cas(&self) -> ContentAddressableStorageClient<CacheChannel> {
        ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn bytestream(&self) -> ByteStreamClient<CacheChannel> {
        ByteStreamClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE)
    }

    fn resource(&self, digest: &Digest) -> String {
        let mut name = String::new();
        if !self.instance.is_empty() {
            name.push_str(&self.instance);
            name.push('/');
        }
        name.push_str("blobs/");
        if self.function == FunctionValue::Blake3 {
            name.push_str("blake3/");
        }
        name.push_str(&format!("{}/{}", digest.hash, digest.size_bytes));
        name
    }

    fn upload_resource(&self, digest: &Digest) -> String {
        let read = self.resource(digest);
        let blobs = read.rfind("blobs/").unwrap_or(0);
        format!(
            "{}uploads/{}/{}",
            &read[..blobs],
            crate::exec_common::random_name(),
            &read[blobs..]
        )
    }

    /// The cached result of `action`, if the cache has one.
    pub async fn get_action_result(&self, action: &Digest) -> Result<Option<ActionResult>> {
        let request = GetActionResultRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(action.clone()),
            digest_function: self.function as i32,
            ..Default::default()
        };
        match ActionCacheClient::new(self.channel.clone())
            .get_action_result(request)
            .await
        {
            Ok(response) => Ok(Some(response.into_inner())),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(error_from_status("GetActionResult", &status)),
        }
    }

    /// Stores `result` as the result of `action`.
    pub async fn update_action_result(&self, action: &Digest, result: ActionResult) -> Result<()> {
        let request = UpdateActionResultRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(action.clone()),
            action_result: Some(result),
            digest_function: self.function as i32,
            ..Default::default()
        };
        ActionCacheClient::new(self.channel.clone())
            .update_action_result(request)
            .await
            .map_err(|status| error_from_status("UpdateActionResult", &status))?;
        Ok(())
    }

    /// One blob into memory; `None` if the CAS does not have it.
    pub async fn read_blob(&self, digest: &Digest) -> Result<Option<Bytes>> {
        let mut blobs = self.read_blobs(std::slice::from_ref(digest)).await?;
        Ok(blobs.remove(&key(digest)))
    }

    /// Several blobs into memory, batched and concurrent; missing ones are absent from
    /// the answer.
    pub async fn read_blobs(&self, digests: &[Digest]) -> Result<HashMap<BlobKey, Bytes>> {
        let mut found = HashMap::new();
        let mut small = Vec::new();
        let mut large = Vec::new();
        for digest in digests {
            if digest.size_bytes == 0 {
                found.insert(key(digest), Bytes::new());
            } else if (digest.size_bytes as u64) <= self.limits.batch_threshold {
                small.push(digest.clone());
            } else {
                large.push(digest.clone());
            }
        }
        let batches = self.batches(small);
        let mut batch_results = futures::stream::iter(batches)
            .map(|batch| self.read_batch(batch))
            .buffer_unordered(self.limits.concurrency);
        while let Some(blobs) = batch_results.try_next().await? {
            found.extend(blobs);
        }
        let mut stream_results = futures::stream::iter(large)
            .map(|digest| async move {
                let data = self.read_stream(&digest).await?;
                Ok::<_, Error>((digest, data))
            })
            .buffer_unordered(self.limits.concurrency);
        while let Some((digest, data)) = stream_results.try_next().await? {
            if let Some(data) = data {
                found.insert(key(&digest), data);
            }
        }
        Ok(found)
    }

    fn batches(&self, mut digests: Vec<Digest>) -> Vec<Vec<Digest>> {
        digests.sort_by(|a, b| a.hash.cmp(&b.hash));
        digests.dedup_by(|a, b| a.hash == b.hash && a.size_bytes == b.size_bytes);
        let mut batches = Vec::new();
        let mut current = Vec::new();
        let mut bytes = 0u64;
        for digest in digests {
            let size = digest.size_bytes as u64;
            if !current.is_empty() && bytes + size > self.limits.max_batch_bytes {
                batches.push(std::mem::take(&mut current));
                bytes = 0;
            }
            bytes += size;
            current.push(digest);
        }
        if !current.is_empty() {
            batches.push(current);
        }
        batches
    }

    async fn read_batch(&self, digests: Vec<Digest>) -> Result<Vec<(BlobKey, Bytes)>> {
        let request = BatchReadBlobsRequest {
            instance_name: self.instance.clone(),
            digests,
            digest_function: self.function as i32,
            ..Default::default()
        };
        let response = self
            .cas()
            .batch_read_blobs(request)
            .await
            .map_err(|status| error_from_status("BatchReadBlobs", &status))?
            .into_inner();
        let mut blobs = Vec::with_capacity(response.responses.len());
        for entry in response.responses {
            let Some(digest) = entry.digest else { continue };
            let code = entry.status.as_ref().map_or(0, |status| status.code);
            if code == tonic::Code::NotFound as i32 {
                continue;
            }
            if code != 0 {
                let message = entry
                    .status
                    .map(|status| status.message)
                    .unwrap_or_default();
                return Err(error_from_status(
                    "BatchReadBlobs",
                    &tonic::Status::new(tonic::Code::from_i32(code), message),
                ));
            }
            blobs.push((key(&digest), entry.data));
        }
        Ok(blobs)
    }

    async fn read_stream(&self, digest: &Digest) -> Result<Option<Bytes>> {
        let request = ReadRequest {
            resource_name: self.resource(digest),
            read_offset: 0,
            read_limit: 0,
        };
        let mut stream = match self.bytestream().read(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(None),
            Err(status) => return Err(error_from_status("ByteStream.Read", &status)),
        };
        let mut data = Vec::with_capacity(usize::try_from(digest.size_bytes).unwrap_or(0));
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => data.extend_from_slice(&chunk.data),
                Ok(None) => break,
                Err(status) if status.code() == tonic::Code::NotFound => return Ok(None),
                Err(status) => return Err(error_from_status("ByteStream.Read", &status)),
            }
        }
        Ok(Some(Bytes::from(data)))
    }

    /// Streams a blob into the file at `path`; `false` if the CAS does not have it.
    pub async fn read_to_file(&self, digest: &Digest, path: &Path) -> Result<bool> {
        let mut file = tokio::fs::File::create(path).await?;
        if digest.size_bytes == 0 {
            return Ok(true);
        }
        if (digest.size_bytes as u64) <= self.limits.batch_threshold {
            let Some(data) = self.read_blob(digest).await? else {
                return Ok(false);
            };
            file.write_all(&data).await?;
            file.flush().await?;
            return Ok(true);
        }
        let request = ReadRequest {
            resource_name: self.resource(digest),
            read_offset: 0,
            read_limit: 0,
        };
        let mut stream = match self.bytestream().read(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(false),
            Err(status) => return Err(error_from_status("ByteStream.Read", &status)),
        };
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => file.write_all(&chunk.data).await?,
                Ok(None) => break,
                Err(status) if status.code() == tonic::Code::NotFound => return Ok(false),
                Err(status) => return Err(error_from_status("ByteStream.Read", &status)),
            }
        }
        file.flush().await?;
        Ok(true)
    }

    /// The digests among `digests` that the CAS lacks.
    pub async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let wanted: Vec<Digest> = digests
            .iter()
            .filter(|digest| digest.size_bytes > 0)
            .cloned()
            .collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let request = FindMissingBlobsRequest {
            instance_name: self.instance.clone(),
            blob_digests: wanted,
            digest_function: self.function as i32,
        };
        Ok(self
            .cas()
            .find_missing_blobs(request)
            .await
            .map_err(|status| error_from_status("FindMissingBlobs", &status))?
            .into_inner()
            .missing_blob_digests)
    }

    /// Uploads blobs: in-memory ones from `memory`, the others from the files in
    /// `files`. Only the blobs the CAS lacks are sent.
    pub async fn upload(
        &self,
        memory: &HashMap<BlobKey, Bytes>,
        files: &HashMap<BlobKey, std::path::PathBuf>,
        digests: &[Digest],
    ) -> Result<()> {
        let missing = self.find_missing(digests).await?;
        let mut small = Vec::new();
        let mut large = Vec::new();
        for digest in missing {
            if (digest.size_bytes as u64) <= self.limits.batch_threshold {
                small.push(digest);
            } else {
                large.push(digest);
            }
        }
        let batches = self.batches(small);
        futures::stream::iter(batches)
            .map(|batch| self.upload_batch(batch, memory, files))
            .buffer_unordered(self.limits.concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        futures::stream::iter(large)
            .map(|digest| async move {
                let k = key(&digest);
                match (memory.get(&k), files.get(&k)) {
                    (Some(data), _) => self.write_stream(&digest, Source::Memory(data)).await,
                    (None, Some(path)) => self.write_stream(&digest, Source::File(path)).await,
                    (None, None) => Err(Error::internal(format!(
                        "no content for blob {}/{}",
                        digest.hash, digest.size_bytes
                    ))),
                }
            })
            .buffer_unordered(self.limits.concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn upload_batch(
        &self,
        digests: Vec<Digest>,
        memory: &HashMap<BlobKey, Bytes>,
        files: &HashMap<BlobKey, std::path::PathBuf>,
    ) -> Result<()> {
        let mut requests = Vec::with_capacity(digests.len());
        for digest in digests {
            let k = key(&digest);
            let data = match (memory.get(&k), files.get(&k)) {
                (Some(data), _) => data.clone(),
                (None, Some(path)) => Bytes::from(tokio::fs::read(path).await?),
                (None, None) => {
                    return Err(Error::internal(format!(
                        "no content for blob {}/{}",
                        digest.hash, digest.size_bytes
                    )))
                }
            };
            requests.push(UpdateRequest {
                digest: Some(digest),
                data,
                compressor: 0,
            });
        }
        let request = BatchUpdateBlobsRequest {
            instance_name: self.instance.clone(),
            requests,
            digest_function: self.function as i32,
        };
        let response = self
            .cas()
            .batch_update_blobs(request)
            .await
            .map_err(|status| error_from_status("BatchUpdateBlobs", &status))?
            .into_inner();
        for entry in response.responses {
            if let Some(status) = entry.status.filter(|status| status.code != 0) {
                return Err(error_from_status(
                    "BatchUpdateBlobs",
                    &tonic::Status::new(tonic::Code::from_i32(status.code), status.message),
                ));
            }
        }
        Ok(())
    }

    async fn write_stream(&self, digest: &Digest, source: Source<'_>) -> Result<()> {
        let resource_name = self.upload_resource(digest);
        let total = digest.size_bytes as u64;
        let chunks: Vec<WriteRequest> = match source {
            Source::Memory(data) => {
                let mut requests = Vec::new();
                let mut offset = 0usize;
                while offset < data.len() {
                    let end = (offset + STREAM_CHUNK).min(data.len());
                    requests.push(WriteRequest {
                        resource_name: if offset == 0 {
                            resource_name.clone()
                        } else {
                            String::new()
                        },
                        write_offset: offset as i64,
                        finish_write: end == data.len(),
                        data: data.slice(offset..end),
                    });
                    offset = end;
                }
                requests
            }
            Source::File(path) => {
                return self.write_file_stream(resource_name, total, path).await;
            }
        };
        self.bytestream()
            .write(futures::stream::iter(chunks))
            .await
            .map_err(|status| error_from_status("ByteStream.Write", &status))?;
        Ok(())
    }

    async fn write_file_stream(
        &self,
        resource_name: String,
        total: u64,
        path: &Path,
    ) -> Result<()> {
        let file = tokio::fs::File::open(path).await?;
        let (sender, receiver) = tokio::sync::mpsc::channel::<WriteRequest>(4);
        let reader = tokio::spawn(async move {
            let mut file = file;
            let mut offset = 0u64;
            let mut first = true;
            while offset < total {
                let want = STREAM_CHUNK.min((total - offset) as usize);
                let mut buffer = vec![0u8; want];
                file.read_exact(&mut buffer).await?;
                let request = WriteRequest {
                    resource_name: if first {
                        resource_name.clone()
                    } else {
                        String::new()
                    },
                    write_offset: offset as i64,
                    finish_write: offset + want as u64 == total,
                    data: Bytes::from(buffer),
                };
                first = false;
                offset += want as u64;
                if sender.send(request).await.is_err() {
                    break;
                }
            }
            Ok::<_, std::io::Error>(())
        });
        let written = self
            .bytestream()
            .write(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await;
        let read = reader
            .await
            .map_err(|error| Error::internal(format!("upload reader failed: {error}")))?;
        read?;
        written.map_err(|status| error_from_status("ByteStream.Write", &status))?;
        Ok(())
    }
}

enum Source<'a> {
    Memory(&'a Bytes),
    File(&'a Path),
}
