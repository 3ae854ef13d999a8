//! Action results: the completeness check and inlining, shared by gRPC and HTTP.
//!
//! An action-cache entry is only useful if every blob it names can still be fetched:
//! a client that gets a hit downloads the outputs next, and a hit whose outputs were
//! evicted fails the build instead of re-running the action. So before an entry is
//! served, every blob it references — output files, stdout and stderr, each output
//! directory's Tree blob and every file inside that tree — is checked against the CAS,
//! and an incomplete entry answers `NOT_FOUND`, exactly as if it had never been stored.

use bytes::Bytes;
use cairn_proto::reapi::{ActionResult, Tree};
use cairn_storage::{Digest, DigestFunction};
use prost::Message;

use crate::digests;
use crate::error::{Error, Result};
use crate::store::Store;

/// Which outputs the client would like inlined in the answer.
#[derive(Debug, Default)]
pub struct Inline {
    /// Inline stdout.
    pub stdout: bool,
    /// Inline stderr.
    pub stderr: bool,
    /// Inline the contents of these output files.
    pub files: Vec<String>,
}

/// Loads the entry of `action`, checks it is complete and inlines what was asked for
/// within `budget` bytes.
pub async fn load(
    store: &Store,
    instance: &str,
    action: Digest,
    inline: &Inline,
    budget: u64,
) -> Result<ActionResult> {
    let encoded = store.ac_get(instance, action).await?;
    let mut result = ActionResult::decode(encoded)
        .map_err(|error| Error::internal(format!("stored action result is corrupt: {error}")))?;
    ensure_complete(store, action.function, &result).await?;
    inline_outputs(store, action.function, &mut result, inline, budget).await?;
    Ok(result)
}

/// Validates and stores `result` as the entry of `action`.
pub async fn store_result(
    store: &Store,
    instance: &str,
    action: Digest,
    result: &ActionResult,
) -> Result<()> {
    referenced_blobs(action.function, result)?;
    store
        .ac_put(instance, action, Bytes::from(result.encode_to_vec()))
        .await
}

/// `NOT_FOUND` unless every blob `result` references is in the CAS.
pub async fn ensure_complete(
    store: &Store,
    function: DigestFunction,
    result: &ActionResult,
) -> Result<()> {
    let (mut blobs, trees) = referenced_blobs(function, result)?;
    let tree_limit = store.limits().max_cas_blob_size;
    for tree_digest in trees {
        if tree_digest.size > tree_limit {
            return Err(Error::invalid_argument(
                "output tree is larger than any blob",
            ));
        }
        let data = store.get_bytes(tree_digest).await.map_err(|error| {
            Error::not_found(format!("the action result is incomplete: {error}"))
        })?;
        let tree = Tree::decode(data).map_err(|error| {
            Error::not_found(format!(
                "an output tree of the action result is invalid: {error}"
            ))
        })?;
        for directory in tree.root.iter().chain(tree.children.iter()) {
            for file in &directory.files {
                blobs.push(digests::required(
                    function,
                    file.digest.as_ref(),
                    "file digest",
                )?);
            }
        }
    }
    blobs.sort_by_key(|digest| (digest.hash, digest.size));
    blobs.dedup();
    let missing = store.find_missing(blobs).await?;
    if let Some(first) = missing.first() {
        return Err(Error::not_found(format!(
            "the action result is incomplete: {} of its outputs are gone (e.g. {}/{})",
            missing.len(),
            first.hash_hex(),
            first.size
        )));
    }
    Ok(())
}

/// The blobs and the output trees `result` references, all validated.
fn referenced_blobs(
    function: DigestFunction,
    result: &ActionResult,
) -> Result<(Vec<Digest>, Vec<Digest>)> {
    let mut blobs = Vec::new();
    for file in &result.output_files {
        blobs.push(digests::required(
            function,
            file.digest.as_ref(),
            "output file digest",
        )?);
    }
    for digest in [&result.stdout_digest, &result.stderr_digest]
        .into_iter()
        .flatten()
    {
        blobs.push(digests::from_proto(function, digest)?);
    }
    let mut trees = Vec::new();
    for directory in &result.output_directories {
        trees.push(digests::required(
            function,
            directory.tree_digest.as_ref(),
            "tree digest",
        )?);
        if let Some(root) = &directory.root_directory_digest {
            blobs.push(digests::from_proto(function, root)?);
        }
    }
    Ok((blobs, trees))
}

/// Fills in stdout, stderr and output file contents as asked, while they fit.
async fn inline_outputs(
    store: &Store,
    function: DigestFunction,
    result: &mut ActionResult,
    inline: &Inline,
    budget: u64,
) -> Result<()> {
    let mut budget = budget.saturating_sub(result.encoded_len() as u64);
    if inline.stdout && result.stdout_raw.is_empty() {
        if let Some(digest) = &result.stdout_digest {
            let digest = digests::from_proto(function, digest)?;
            if digest.size <= budget {
                result.stdout_raw = store.get_bytes(digest).await?;
                budget -= digest.size;
            }
        }
    }
    if inline.stderr && result.stderr_raw.is_empty() {
        if let Some(digest) = &result.stderr_digest {
            let digest = digests::from_proto(function, digest)?;
            if digest.size <= budget {
                result.stderr_raw = store.get_bytes(digest).await?;
                budget -= digest.size;
            }
        }
    }
    for file in &mut result.output_files {
        if !inline.files.contains(&file.path) || !file.contents.is_empty() {
            continue;
        }
        let digest = digests::required(function, file.digest.as_ref(), "output file digest")?;
        if digest.size <= budget {
            file.contents = store.get_bytes(digest).await?;
            budget -= digest.size;
        }
    }
    Ok(())
}
