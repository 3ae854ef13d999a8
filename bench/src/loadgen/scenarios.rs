//! The scenarios: what each operation does and how its answer is checked.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_proto::bytestream::byte_stream_client::ByteStreamClient;
use cairn_proto::bytestream::{ReadRequest, WriteRequest};
use cairn_proto::reapi::action_cache_client::ActionCacheClient;
use cairn_proto::reapi::batch_update_blobs_request::Request as UpdateEntry;
use cairn_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use cairn_proto::reapi::{
    ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Digest, FindMissingBlobsRequest,
    GetActionResultRequest, OutputFile, UpdateActionResultRequest,
};
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;
use tonic::Code;

use super::data::{self, Function, Rng};
use super::report::{Report, Tally};
use super::{Budget, Deadline, Options, MAX_MESSAGE};

/// Every scenario, in the order `all` runs them.
pub const ALL: [&str; 8] = [
    "bs-write",
    "bs-write-blake3",
    "bs-read",
    "batch-small",
    "batch-read",
    "find-missing",
    "ac",
    "bazel-like",
];

/// Chunk size of ByteStream writes.
const WRITE_CHUNK: usize = 64 << 10;
/// Blobs read at random by `bs-read`.
const READ_WORKING_SET: usize = 8;
/// Blob size and count per call of `batch-small`.
const SMALL_BLOB: usize = 4 << 10;
const SMALL_PER_CALL: usize = 100;
/// Blobs `batch-read` draws its calls from: 8 MiB of 4 KiB blobs, a warm build's
/// small outputs, and well inside the sink's budget.
const SMALL_WORKING_SET: usize = 2000;
/// Digests per FindMissingBlobs call, half of them present.
const FIND_PER_CALL: usize = 1000;
/// Outputs at most this large travel in batch calls in `bazel-like`.
const BATCH_MAX_BLOB: usize = 1 << 20;
/// Largest payload of one batch call `bazel-like` makes.
const BATCH_MAX_TOTAL: usize = 3 << 20;

/// The gRPC clients of one channel.
#[derive(Clone)]
struct Clients {
    cas: ContentAddressableStorageClient<Channel>,
    bytestream: ByteStreamClient<Channel>,
    ac: ActionCacheClient<Channel>,
}

impl Clients {
    fn new(channel: Channel) -> Self {
        Self {
            cas: ContentAddressableStorageClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            bytestream: ByteStreamClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            ac: ActionCacheClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        }
    }
}

/// Runs scenario `name` (one of [`ALL`]), returning one report per phase.
pub async fn run(
    name: &str,
    options: &Options,
    channels: &[Channel],
) -> Result<Vec<Report>, String> {
    let clients: Vec<Clients> = channels.iter().cloned().map(Clients::new).collect();
    // Each scenario draws from its own streams, so running one after another on the
    // same node never repeats a blob.
    let salt = ALL
        .iter()
        .position(|known| *known == name)
        .unwrap_or(ALL.len()) as u64;
    let seed = options.seed.wrapping_mul(0x100).wrapping_add(salt << 32);
    let reports = match name {
        "bs-write" | "bs-write-blake3" => {
            let size = options.blob_size;
            let function = if name == "bs-write" {
                Function::Sha256
            } else {
                Function::Blake3
            };
            one_phase(name, options, &clients, move |task, clients, deadline| {
                let rng = Rng::new(seed + task as u64);
                bs_write(clients, deadline, rng, size, function)
            })
            .await
        }
        "bs-read" => {
            let mut rng = Rng::new(seed);
            let mut set = Vec::with_capacity(READ_WORKING_SET);
            for _ in 0..READ_WORKING_SET {
                let blob = rng.bytes(options.blob_size);
                let digest = data::digest(&blob);
                write_blob(
                    &mut clients[0].clone(),
                    &blob,
                    &digest,
                    Function::Sha256,
                    &mut rng,
                )
                .await
                .map_err(|error| format!("bs-read setup: {error}"))?;
                set.push(digest);
            }
            let set = Arc::new(set);
            one_phase(name, options, &clients, move |task, clients, deadline| {
                bs_read(
                    clients,
                    deadline,
                    Rng::new(seed + 1 + task as u64),
                    Arc::clone(&set),
                )
            })
            .await
        }
        "batch-small" => {
            one_phase(name, options, &clients, move |task, clients, deadline| {
                batch_small(clients, deadline, Rng::new(seed + task as u64))
            })
            .await
        }
        "batch-read" => {
            let mut rng = Rng::new(seed);
            let mut set = Vec::with_capacity(SMALL_WORKING_SET);
            for _ in 0..SMALL_WORKING_SET / SMALL_PER_CALL {
                let blobs: Vec<(Digest, Bytes)> = (0..SMALL_PER_CALL)
                    .map(|_| {
                        let blob = rng.bytes(SMALL_BLOB);
                        (data::digest(&blob), blob)
                    })
                    .collect();
                set.extend(blobs.iter().map(|(digest, _)| digest.clone()));
                batch_update(&mut clients[0].clone(), blobs)
                    .await
                    .map_err(|error| format!("batch-read setup: {error}"))?;
            }
            let set = Arc::new(set);
            one_phase(name, options, &clients, move |task, clients, deadline| {
                batch_read_only(
                    clients,
                    deadline,
                    Rng::new(seed + 1 + task as u64),
                    Arc::clone(&set),
                )
            })
            .await
        }
        "find-missing" => {
            let mut rng = Rng::new(seed);
            let blobs: Vec<Bytes> = (0..FIND_PER_CALL / 2).map(|_| rng.bytes(64)).collect();
            let present: Vec<Digest> = blobs.iter().map(|blob| data::digest(blob)).collect();
            batch_update(
                &mut clients[0].clone(),
                present.iter().cloned().zip(blobs).collect(),
            )
            .await
            .map_err(|error| format!("find-missing setup: {error}"))?;
            let present = Arc::new(present);
            one_phase(name, options, &clients, move |task, clients, deadline| {
                find_missing(
                    clients,
                    deadline,
                    Rng::new(seed + 1 + task as u64),
                    Arc::clone(&present),
                )
            })
            .await
        }
        "ac" => {
            let output = Bytes::from_static(b"an output every action result refers to");
            let output_digest = data::digest(&output);
            batch_update(
                &mut clients[0].clone(),
                vec![(output_digest.clone(), output)],
            )
            .await
            .map_err(|error| format!("ac setup: {error}"))?;
            one_phase(name, options, &clients, move |task, clients, deadline| {
                action_cache(
                    clients,
                    deadline,
                    Rng::new(seed + task as u64),
                    output_digest.clone(),
                )
            })
            .await
        }
        "bazel-like" => bazel_like(options, &clients, seed).await,
        other => {
            return Err(format!(
                "unknown scenario {other}; known: {}, all",
                ALL.join(", ")
            ))
        }
    };
    Ok(reports)
}

/// Runs a scenario of one phase: `task` in every slot until the budget is spent.
async fn one_phase<F, Fut>(
    name: &str,
    options: &Options,
    clients: &[Clients],
    task: F,
) -> Vec<Report>
where
    F: Fn(usize, Clients, Deadline) -> Fut,
    Fut: Future<Output = (Tally, ())> + Send + 'static,
{
    let (measured, _) = run_tasks(options, clients, options.budget, task).await;
    vec![measured.finish(name)]
}

/// What a finished run of tasks measured.
struct Measured(Tally, Duration);

impl Measured {
    fn finish(self, name: &str) -> Report {
        Report::new(name, self.0, self.1)
    }
}

/// Runs `options.concurrency` tasks of `task` spread over `clients` until `budget` is
/// spent; returns their merged tally, the wall time, and what each task returned.
async fn run_tasks<F, Fut, T>(
    options: &Options,
    clients: &[Clients],
    budget: Budget,
    task: F,
) -> (Measured, Vec<T>)
where
    F: Fn(usize, Clients, Deadline) -> Fut,
    Fut: Future<Output = (Tally, T)> + Send + 'static,
    T: Send + 'static,
{
    let deadline = Deadline::new(budget);
    let started = Instant::now();
    let handles: Vec<_> = (0..options.concurrency.max(1))
        .map(|index| {
            let client = clients[index % clients.len()].clone();
            tokio::spawn(task(index, client, deadline.clone()))
        })
        .collect();
    let mut tally = Tally::default();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        match handle.await {
            Ok((task_tally, output)) => {
                tally.merge(task_tally);
                outputs.push(output);
            }
            Err(error) => tally.error(format!("a load task failed: {error}")),
        }
    }
    (Measured(tally, started.elapsed()), outputs)
}

/// Records the outcome of one timed operation.
fn record(tally: &mut Tally, started: Instant, outcome: Result<u64, Problem>) {
    match outcome {
        Ok(bytes) => {
            tally.latencies.push(started.elapsed().as_micros() as u64);
            tally.bytes += bytes;
        }
        Err(Problem::Rpc(what)) => tally.error(what),
        Err(Problem::Mismatch(what)) => tally.mismatch(what),
    }
}

/// Why an operation did not count.
enum Problem {
    /// The server failed the call.
    Rpc(String),
    /// The server answered, wrongly.
    Mismatch(String),
}

impl From<tonic::Status> for Problem {
    fn from(status: tonic::Status) -> Self {
        Problem::Rpc(format!("{:?}: {}", status.code(), status.message()))
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Rpc(what) => write!(f, "rpc error: {what}"),
            Problem::Mismatch(what) => write!(f, "verification failed: {what}"),
        }
    }
}

async fn bs_write(
    mut clients: Clients,
    deadline: Deadline,
    mut rng: Rng,
    size: usize,
    function: Function,
) -> (Tally, ()) {
    let mut tally = Tally::default();
    while deadline.next() {
        let blob = rng.bytes(size);
        let digest = function.digest(&blob);
        let started = Instant::now();
        let outcome = write_blob(&mut clients, &blob, &digest, function, &mut rng).await;
        record(&mut tally, started, outcome.map(|()| size as u64));
    }
    (tally, ())
}

async fn bs_read(
    mut clients: Clients,
    deadline: Deadline,
    mut rng: Rng,
    set: Arc<Vec<Digest>>,
) -> (Tally, ()) {
    let mut tally = Tally::default();
    while deadline.next() {
        let digest = &set[rng.below(set.len() as u64) as usize];
        let started = Instant::now();
        let outcome = read_blob(&mut clients, digest).await;
        record(
            &mut tally,
            started,
            outcome.map(|()| digest.size_bytes as u64),
        );
    }
    (tally, ())
}

async fn batch_small(mut clients: Clients, deadline: Deadline, mut rng: Rng) -> (Tally, ()) {
    let mut tally = Tally::default();
    while deadline.next() {
        let blobs: Vec<(Digest, Bytes)> = (0..SMALL_PER_CALL)
            .map(|_| {
                let blob = rng.bytes(SMALL_BLOB);
                (data::digest(&blob), blob)
            })
            .collect();
        let digests: Vec<Digest> = blobs.iter().map(|(digest, _)| digest.clone()).collect();
        let started = Instant::now();
        let outcome = async {
            batch_update(&mut clients, blobs).await?;
            batch_read(&mut clients, digests).await
        }
        .await;
        record(&mut tally, started, outcome.map(|read| 2 * read));
    }
    (tally, ())
}

async fn batch_read_only(
    mut clients: Clients,
    deadline: Deadline,
    mut rng: Rng,
    set: Arc<Vec<Digest>>,
) -> (Tally, ()) {
    let mut tally = Tally::default();
    while deadline.next() {
        let digests: Vec<Digest> = (0..SMALL_PER_CALL)
            .map(|_| set[rng.below(set.len() as u64) as usize].clone())
            .collect();
        let started = Instant::now();
        let outcome = batch_read(&mut clients, digests).await;
        record(&mut tally, started, outcome);
    }
    (tally, ())
}

async fn find_missing(
    mut clients: Clients,
    deadline: Deadline,
    mut rng: Rng,
    present: Arc<Vec<Digest>>,
) -> (Tally, ()) {
    let mut tally = Tally::default();
    while deadline.next() {
        let absent: Vec<Digest> = (0..FIND_PER_CALL - present.len())
            .map(|_| data::absent_digest(&mut rng))
            .collect();
        let mut asked: Vec<Digest> = present.iter().chain(absent.iter()).cloned().collect();
        // Interleave present and absent digests.
        for index in (1..asked.len()).rev() {
            asked.swap(index, rng.below(index as u64 + 1) as usize);
        }
        let started = Instant::now();
        let outcome = async {
            let missing = clients
                .cas
                .find_missing_blobs(FindMissingBlobsRequest {
                    blob_digests: asked,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .missing_blob_digests;
            let expected: HashSet<(String, i64)> =
                absent.into_iter().map(|d| (d.hash, d.size_bytes)).collect();
            let got: HashSet<(String, i64)> = missing
                .into_iter()
                .map(|d| (d.hash, d.size_bytes))
                .collect();
            if got != expected {
                return Err(Problem::Mismatch(format!(
                    "FindMissingBlobs answered {} digests, {} of them wrong, for {} absent",
                    got.len(),
                    got.symmetric_difference(&expected).count(),
                    expected.len()
                )));
            }
            Ok(0)
        }
        .await;
        record(&mut tally, started, outcome);
    }
    (tally, ())
}

async fn action_cache(
    mut clients: Clients,
    deadline: Deadline,
    mut rng: Rng,
    output: Digest,
) -> (Tally, ()) {
    let mut tally = Tally::default();
    while deadline.next() {
        let action = data::digest(&rng.bytes(64));
        let result = ActionResult {
            output_files: vec![OutputFile {
                path: format!("out/{}", rng.below(1 << 20)),
                digest: Some(output.clone()),
                is_executable: rng.below(2) == 1,
                ..Default::default()
            }],
            exit_code: rng.below(3) as i32,
            ..Default::default()
        };
        let started = Instant::now();
        let outcome = async {
            clients
                .ac
                .update_action_result(UpdateActionResultRequest {
                    action_digest: Some(action.clone()),
                    action_result: Some(result.clone()),
                    ..Default::default()
                })
                .await?;
            let got = get_action_result(&mut clients, &action).await?;
            if got.as_ref() != Some(&result) {
                return Err(Problem::Mismatch(format!(
                    "GetActionResult of {}: {got:?}, expected {result:?}",
                    action.hash
                )));
            }
            Ok(0)
        }
        .await;
        record(&mut tally, started, outcome);
    }
    (tally, ())
}

/// An action of the cold pass, for the warm pass to fetch again.
struct Action {
    digest: Digest,
    result: ActionResult,
}

async fn bazel_like(options: &Options, clients: &[Clients], seed: u64) -> Vec<Report> {
    let half = match options.budget {
        Budget::Time(duration) => Budget::Time(duration / 2),
        ops => ops,
    };
    let (cold, actions) = run_tasks(options, clients, half, move |task, clients, deadline| {
        bazel_cold(clients, deadline, Rng::new(seed + task as u64))
    })
    .await;
    let mut actions: Vec<Arc<Vec<Action>>> = actions.into_iter().map(Arc::new).collect();
    let warm_budget = match options.budget {
        Budget::Time(duration) => Budget::Time(duration / 2),
        Budget::Ops(_) => Budget::Ops(actions.iter().map(|list| list.len() as u64).sum()),
    };
    actions.rotate_left(1);
    let (warm, _) = run_tasks(
        options,
        clients,
        warm_budget,
        move |task, clients, deadline| {
            bazel_warm(
                clients,
                deadline,
                Arc::clone(&actions[task % actions.len()]),
            )
        },
    )
    .await;
    vec![
        cold.finish("bazel-like-cold"),
        warm.finish("bazel-like-warm"),
    ]
}

async fn bazel_cold(
    mut clients: Clients,
    deadline: Deadline,
    mut rng: Rng,
) -> (Tally, Vec<Action>) {
    let mut tally = Tally::default();
    let mut actions = Vec::new();
    while deadline.next() {
        let action = data::digest(&rng.bytes(128));
        let outputs: Vec<Bytes> = (0..1 + rng.below(5))
            .map(|_| {
                let size = data::output_size(&mut rng);
                rng.bytes(size)
            })
            .collect();
        let digests: Vec<Digest> = outputs.iter().map(|blob| data::digest(blob)).collect();
        let result = ActionResult {
            output_files: digests
                .iter()
                .enumerate()
                .map(|(index, digest)| OutputFile {
                    path: format!("bazel-out/k8-fastbuild/bin/{index}.o"),
                    digest: Some(digest.clone()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let started = Instant::now();
        let outcome = async {
            if let Some(found) = get_action_result(&mut clients, &action).await? {
                return Err(Problem::Mismatch(format!(
                    "a new action {} has a result: {found:?}",
                    action.hash
                )));
            }
            let missing = clients
                .cas
                .find_missing_blobs(FindMissingBlobsRequest {
                    blob_digests: digests.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .missing_blob_digests;
            if missing.len() != digests.len() {
                return Err(Problem::Mismatch(format!(
                    "{} of {} new outputs reported missing",
                    missing.len(),
                    digests.len()
                )));
            }
            let mut moved = 0;
            let mut batch = Vec::new();
            let mut batch_total = 0;
            for (digest, blob) in digests.iter().zip(&outputs) {
                moved += blob.len() as u64;
                if blob.len() > BATCH_MAX_BLOB {
                    write_blob(&mut clients, blob, digest, Function::Sha256, &mut rng).await?;
                    continue;
                }
                if batch_total + blob.len() > BATCH_MAX_TOTAL {
                    batch_update(&mut clients, std::mem::take(&mut batch)).await?;
                    batch_total = 0;
                }
                batch_total += blob.len();
                batch.push((digest.clone(), blob.clone()));
            }
            if !batch.is_empty() {
                batch_update(&mut clients, batch).await?;
            }
            clients
                .ac
                .update_action_result(UpdateActionResultRequest {
                    action_digest: Some(action.clone()),
                    action_result: Some(result.clone()),
                    ..Default::default()
                })
                .await?;
            Ok(moved)
        }
        .await;
        let ok = outcome.is_ok();
        record(&mut tally, started, outcome);
        if ok {
            actions.push(Action {
                digest: action,
                result,
            });
        }
    }
    (tally, actions)
}

async fn bazel_warm(
    mut clients: Clients,
    deadline: Deadline,
    actions: Arc<Vec<Action>>,
) -> (Tally, ()) {
    let mut tally = Tally::default();
    for action in actions.iter() {
        if !deadline.next() {
            break;
        }
        let started = Instant::now();
        let outcome = async {
            let got = get_action_result(&mut clients, &action.digest).await?;
            if got.as_ref() != Some(&action.result) {
                return Err(Problem::Mismatch(format!(
                    "GetActionResult of {}: {got:?}, expected {:?}",
                    action.digest.hash, action.result
                )));
            }
            let mut moved = 0;
            let mut batch = Vec::new();
            let mut batch_total = 0;
            for file in &action.result.output_files {
                let Some(digest) = &file.digest else { continue };
                let size = digest.size_bytes as usize;
                if size > BATCH_MAX_BLOB {
                    read_blob(&mut clients, digest).await?;
                    moved += size as u64;
                    continue;
                }
                if batch_total + size > BATCH_MAX_TOTAL {
                    moved += batch_read(&mut clients, std::mem::take(&mut batch)).await?;
                    batch_total = 0;
                }
                batch_total += size;
                batch.push(digest.clone());
            }
            if !batch.is_empty() {
                moved += batch_read(&mut clients, batch).await?;
            }
            Ok(moved)
        }
        .await;
        record(&mut tally, started, outcome);
    }
    (tally, ())
}

/// GetActionResult; `None` for NOT_FOUND.
async fn get_action_result(
    clients: &mut Clients,
    action: &Digest,
) -> Result<Option<ActionResult>, Problem> {
    let answer = clients
        .ac
        .get_action_result(GetActionResultRequest {
            action_digest: Some(action.clone()),
            ..Default::default()
        })
        .await;
    match answer {
        Ok(response) => Ok(Some(response.into_inner())),
        Err(status) if status.code() == Code::NotFound => Ok(None),
        Err(status) => Err(status.into()),
    }
}

/// Writes `blob` with ByteStream in [`WRITE_CHUNK`] messages.
async fn write_blob(
    clients: &mut Clients,
    blob: &Bytes,
    digest: &Digest,
    function: Function,
    rng: &mut Rng,
) -> Result<(), Problem> {
    let resource = format!(
        "uploads/{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}/blobs/{}{}/{}",
        rng.next_u64() as u32,
        rng.next_u64() as u16,
        rng.below(0x1000),
        rng.below(0x1000),
        rng.next_u64() & 0xffff_ffff_ffff,
        function.resource_segment(),
        digest.hash,
        digest.size_bytes
    );
    let chunks = blob.len().div_ceil(WRITE_CHUNK).max(1);
    let blob = blob.clone();
    let requests = futures::stream::iter((0..chunks).map(move |index| {
        let start = index * WRITE_CHUNK;
        let end = (start + WRITE_CHUNK).min(blob.len());
        WriteRequest {
            resource_name: if index == 0 {
                resource.clone()
            } else {
                String::new()
            },
            write_offset: start as i64,
            finish_write: index + 1 == chunks,
            data: blob.slice(start..end),
        }
    }));
    let committed = clients
        .bytestream
        .write(requests)
        .await?
        .into_inner()
        .committed_size;
    if committed != digest.size_bytes {
        return Err(Problem::Mismatch(format!(
            "Write of {} committed {committed} bytes of {}",
            digest.hash, digest.size_bytes
        )));
    }
    Ok(())
}

/// Reads blob `digest` with ByteStream and checks its bytes hash to it.
async fn read_blob(clients: &mut Clients, digest: &Digest) -> Result<(), Problem> {
    let mut stream = clients
        .bytestream
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", digest.hash, digest.size_bytes),
            read_offset: 0,
            read_limit: 0,
        })
        .await?
        .into_inner();
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(message) = stream.message().await? {
        len += message.data.len() as u64;
        hasher.update(&message.data);
    }
    let hash = data::digest_hex(&hasher.finalize());
    if len != digest.size_bytes as u64 || hash != digest.hash {
        return Err(Problem::Mismatch(format!(
            "Read of {}/{} returned {len} bytes hashing to {hash}",
            digest.hash, digest.size_bytes
        )));
    }
    Ok(())
}

/// BatchUpdateBlobs; every blob must be accepted.
async fn batch_update(clients: &mut Clients, blobs: Vec<(Digest, Bytes)>) -> Result<(), Problem> {
    let count = blobs.len();
    let responses = clients
        .cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: blobs
                .into_iter()
                .map(|(digest, data)| UpdateEntry {
                    digest: Some(digest),
                    data,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .responses;
    if responses.len() != count {
        return Err(Problem::Mismatch(format!(
            "BatchUpdateBlobs answered {} of {count} blobs",
            responses.len()
        )));
    }
    for response in responses {
        if let Some(status) = response.status.filter(|status| status.code != 0) {
            return Err(Problem::Rpc(format!(
                "BatchUpdateBlobs refused a blob: {} {}",
                status.code, status.message
            )));
        }
    }
    Ok(())
}

/// BatchReadBlobs; every blob must come back with exactly its bytes. Returns the
/// bytes read.
async fn batch_read(clients: &mut Clients, digests: Vec<Digest>) -> Result<u64, Problem> {
    let count = digests.len();
    let responses = clients
        .cas
        .batch_read_blobs(BatchReadBlobsRequest {
            digests,
            ..Default::default()
        })
        .await?
        .into_inner()
        .responses;
    if responses.len() != count {
        return Err(Problem::Mismatch(format!(
            "BatchReadBlobs answered {} of {count} blobs",
            responses.len()
        )));
    }
    let mut read = 0;
    for response in responses {
        let Some(digest) = response.digest else {
            return Err(Problem::Mismatch(
                "BatchReadBlobs answered without a digest".into(),
            ));
        };
        if let Some(status) = response.status.filter(|status| status.code != 0) {
            return Err(Problem::Mismatch(format!(
                "BatchReadBlobs could not read {}: {} {}",
                digest.hash, status.code, status.message
            )));
        }
        if data::digest(&response.data) != digest {
            return Err(Problem::Mismatch(format!(
                "BatchReadBlobs returned other bytes for {}/{}",
                digest.hash, digest.size_bytes
            )));
        }
        read += response.data.len() as u64;
    }
    Ok(read)
}
