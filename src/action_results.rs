//! Action results: the completeness check and inlining, shared by gRPC and HTTP.
//!
//! An action-cache entry is only useful if every blob it names can still be fetched:
//! a client that gets a hit downloads the outputs next, and a hit whose outputs were
//! evicted fails the build instead of re-running the action. So before an entry is
//! served, every blob it references — output files, stdout and stderr, each output
//! directory's Tree blob and every file inside that tree — is checked against the CAS,
//! and an incomplete entry answers `NOT_FOUND`, exactly as if it had never been stored.
//!
//! REAPI v2.3 gives an output directory two forms: a `Tree` blob (`tree_digest`, the
//! form every client reads unless its Command asks otherwise through
//! `output_directory_format`) and a hierarchy of separately stored `Directory` blobs
//! (`root_directory_digest`). The check demands exactly what the entry advertises: the
//! Tree and its files when `tree_digest` is set, and every Directory of the hierarchy
//! when `root_directory_digest` is set, since a client that asked for that form follows
//! those digests. An entry that sets `root_directory_digest` without storing the
//! Directory blobs is incomplete, not merely untidy: such a client would fail on it.

use std::collections::HashSet;

use bytes::Bytes;
use cairn_proto::reapi::{ActionResult, Directory, Tree};
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
    let References {
        mut blobs,
        directories,
    } = referenced_blobs(function, result)?;
    for forms in directories {
        match forms {
            Forms::Tree(tree) => {
                read_tree(store, function, tree, &mut blobs, false).await?;
            }
            Forms::TreeAndDirectories { tree, root } => {
                // The Tree holds every Directory of the hierarchy, and the digests its
                // DirectoryNodes carry are the ones a client following the hierarchy
                // fetches: their existence is one more FindMissing, not a read each.
                blobs.push(root);
                read_tree(store, function, tree, &mut blobs, true).await?;
            }
            Forms::Directories(root) => {
                walk_directories(store, function, root, &mut blobs).await?;
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

/// Reads and decodes the message `digest` names; a missing or undecodable one makes
/// the entry incomplete.
async fn fetch_message<M: Message + Default>(
    store: &Store,
    digest: Digest,
    what: &str,
) -> Result<M> {
    if digest.size > store.limits().max_cas_blob_size {
        return Err(Error::invalid_argument(format!(
            "{what} is larger than any blob"
        )));
    }
    let data = store
        .get_bytes(digest)
        .await
        .map_err(|error| Error::not_found(format!("the action result is incomplete: {error}")))?;
    M::decode(data).map_err(|error| {
        Error::not_found(format!(
            "an {what} of the action result is invalid: {error}"
        ))
    })
}

/// Adds the files of the Tree `digest` names to `blobs`, and with `directories` the
/// subdirectories its directories name too.
async fn read_tree(
    store: &Store,
    function: DigestFunction,
    digest: Digest,
    blobs: &mut Vec<Digest>,
    directories: bool,
) -> Result<()> {
    let tree: Tree = fetch_message(store, digest, "output tree").await?;
    for directory in tree.root.iter().chain(tree.children.iter()) {
        push_files(function, directory, blobs)?;
        if directories {
            for child in &directory.directories {
                blobs.push(digests::required(
                    function,
                    child.digest.as_ref(),
                    "directory digest",
                )?);
            }
        }
    }
    Ok(())
}

fn push_files(
    function: DigestFunction,
    directory: &Directory,
    blobs: &mut Vec<Digest>,
) -> Result<()> {
    for file in &directory.files {
        blobs.push(digests::required(
            function,
            file.digest.as_ref(),
            "file digest",
        )?);
    }
    Ok(())
}

/// Most Directory messages one output directory's hierarchy may have: the check reads
/// each one, so it is bounded like any other request's work.
const MAX_DIRECTORIES: usize = 100_000;

/// Reads the Directory hierarchy under `root` from the CAS, adding every file it
/// names to `blobs`. Each distinct Directory is read once.
async fn walk_directories(
    store: &Store,
    function: DigestFunction,
    root: Digest,
    blobs: &mut Vec<Digest>,
) -> Result<()> {
    let mut seen = HashSet::from([root]);
    let mut queue = vec![root];
    while let Some(digest) = queue.pop() {
        let directory: Directory = fetch_message(store, digest, "output directory").await?;
        push_files(function, &directory, blobs)?;
        for child in &directory.directories {
            let child = digests::required(function, child.digest.as_ref(), "directory digest")?;
            if seen.insert(child) {
                if seen.len() > MAX_DIRECTORIES {
                    return Err(Error::invalid_argument(format!(
                        "an output directory has more than {MAX_DIRECTORIES} directories"
                    )));
                }
                queue.push(child);
            }
        }
    }
    Ok(())
}

/// What an action result references, validated.
struct References {
    /// Blobs that must exist as they are: output files, stdout, stderr.
    blobs: Vec<Digest>,
    /// The forms of each output directory.
    directories: Vec<Forms>,
}

/// The forms in which one output directory is stored.
enum Forms {
    /// A Tree blob, whose files must exist too.
    Tree(Digest),
    /// A Tree blob and the separately stored Directory hierarchy it describes.
    TreeAndDirectories { tree: Digest, root: Digest },
    /// Only the Directory hierarchy under `root`, every directory and file of which
    /// must exist.
    Directories(Digest),
}

/// The blobs, trees and directory hierarchies `result` references, all validated.
fn referenced_blobs(function: DigestFunction, result: &ActionResult) -> Result<References> {
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
    let mut directories = Vec::new();
    for directory in &result.output_directories {
        let tree = directory
            .tree_digest
            .as_ref()
            .map(|digest| digests::from_proto(function, digest))
            .transpose()?;
        let root = directory
            .root_directory_digest
            .as_ref()
            .map(|digest| digests::from_proto(function, digest))
            .transpose()?;
        directories.push(match (tree, root) {
            (Some(tree), None) => Forms::Tree(tree),
            (Some(tree), Some(root)) => Forms::TreeAndDirectories { tree, root },
            (None, Some(root)) => Forms::Directories(root),
            (None, None) => {
                return Err(Error::invalid_argument(format!(
                    "output directory `{}` has neither a tree digest nor a root directory digest",
                    directory.path
                )))
            }
        });
    }
    Ok(References { blobs, directories })
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
