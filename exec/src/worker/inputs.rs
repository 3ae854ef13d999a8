//! Materializing an action's input tree.
//!
//! Three steps, so that nothing is written before everything is known to be valid:
//!
//! 1. [`fetch_tree`] reads the Directory messages level by level, each level in a few
//!    concurrent batches (a tree is mostly small Directory blobs).
//! 2. [`super::plan`] walks the tree from the root and checks every name and symlink
//!    with the rules of [`super::paths`]; a hostile tree fails there, before the action
//!    directory is touched.
//! 3. [`materialize`] creates the directories, makes sure every file is in the local
//!    [`FileCache`] (small files fetched in batches, large ones streamed, concurrently),
//!    puts a private copy of each in place (a reflink where the filesystem has them;
//!    see [`FileCache`] for why not a hardlink) and creates the symlinks.
//!
//! Blobs the CAS lacks are collected rather than failing on the first, so the client
//! gets one FAILED_PRECONDITION listing all of them and can upload them at once.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use cairn_proto::reapi::{Digest, Directory};
use futures::{StreamExt, TryStreamExt};
use prost::Message;

use super::file_cache::{entry_name, FileCache};
use super::plan::InputPlan;
use crate::cas_client::CasClient;
use crate::digests::{key, BlobKey};
use crate::error::{Error, Result};

/// Something that needs blobs, and either got them all or names those it lacks.
pub enum Fetched<T> {
    /// Everything was there.
    Ready(T),
    /// These blobs are missing from the CAS.
    Missing(Vec<Digest>),
}

/// Reads every Directory of the tree rooted at `root`.
pub async fn fetch_tree(
    cas: &CasClient,
    root: &Digest,
) -> Result<Fetched<HashMap<BlobKey, Directory>>> {
    let mut directories = HashMap::new();
    let mut seen = HashSet::from([key(root)]);
    let mut level = vec![root.clone()];
    let mut missing = Vec::new();
    while !level.is_empty() {
        let blobs = cas.read_blobs(&level).await?;
        let mut next = Vec::new();
        for digest in level {
            let Some(bytes) = blobs.get(&key(&digest)) else {
                missing.push(digest);
                continue;
            };
            let directory = Directory::decode(bytes.clone()).map_err(|error| {
                Error::invalid_argument(format!(
                    "input Directory {}/{} does not parse: {error}",
                    digest.hash, digest.size_bytes
                ))
            })?;
            for child in &directory.directories {
                let child_digest = child.digest.clone().ok_or_else(|| {
                    Error::invalid_argument(format!(
                        "input directory `{}` has no digest",
                        child.name
                    ))
                })?;
                if seen.insert(key(&child_digest)) {
                    next.push(child_digest);
                }
            }
            directories.insert(key(&digest), directory);
        }
        level = next;
    }
    if missing.is_empty() {
        Ok(Fetched::Ready(directories))
    } else {
        Ok(Fetched::Missing(missing))
    }
}

/// Creates the planned inputs beneath `root`, which must exist and be empty.
pub async fn materialize(
    plan: &InputPlan,
    root: &Path,
    cas: &CasClient,
    cache: &FileCache,
    concurrency: usize,
) -> Result<Fetched<()>> {
    for directory in &plan.directories {
        std::fs::create_dir(root.join(directory))?;
    }
    let mut wanted: HashMap<String, (Digest, bool)> = HashMap::new();
    for (_, digest, executable) in &plan.files {
        wanted
            .entry(entry_name(digest, *executable))
            .or_insert_with(|| (digest.clone(), *executable));
    }
    let absent: Vec<(String, Digest, bool)> = wanted
        .into_iter()
        .filter(|(name, _)| !cache.contains(name))
        .map(|(name, (digest, executable))| (name, digest, executable))
        .collect();
    let missing = fill_cache(absent, cas, cache, concurrency).await?;
    if !missing.is_empty() {
        return Ok(Fetched::Missing(missing));
    }
    // Copying is blocking file I/O (megabytes where the filesystem has no reflinks):
    // keep it off the threads that drive the session and other tasks' transfers.
    let vanished = tokio::task::block_in_place(|| copy_inputs(&plan.files, root, cache))?;
    if !vanished.is_empty() {
        let refill: HashMap<String, (Digest, bool)> = vanished
            .iter()
            .map(|(_, digest, executable)| {
                (
                    entry_name(digest, *executable),
                    (digest.clone(), *executable),
                )
            })
            .collect();
        let refill = refill
            .into_iter()
            .map(|(name, (digest, executable))| (name, digest, executable))
            .collect();
        let missing = fill_cache(refill, cas, cache, concurrency).await?;
        if !missing.is_empty() {
            return Ok(Fetched::Missing(missing));
        }
        let again = tokio::task::block_in_place(|| copy_inputs(&vanished, root, cache))?;
        if let Some((path, _, _)) = again.first() {
            return Err(Error::internal(format!(
                "input {} vanished from the file cache twice",
                path.display()
            )));
        }
    }
    for (path, target) in &plan.symlinks {
        std::os::unix::fs::symlink(target, root.join(path))?;
    }
    Ok(Fetched::Ready(()))
}

/// Copies each of `files` from the cache beneath `root`; returns those whose entry
/// was evicted before it could be copied.
fn copy_inputs(
    files: &[(PathBuf, Digest, bool)],
    root: &Path,
    cache: &FileCache,
) -> Result<Vec<(PathBuf, Digest, bool)>> {
    let mut vanished = Vec::new();
    for (path, digest, executable) in files {
        if !cache.copy_to(&entry_name(digest, *executable), &root.join(path))? {
            vanished.push((path.clone(), digest.clone(), *executable));
        }
    }
    Ok(vanished)
}

/// Bytes of small blobs fetched into memory per round before they are written out.
const ROUND_BYTES: u64 = 64 << 20;

/// Fetches `entries` into the cache; returns the digests the CAS lacks.
async fn fill_cache(
    entries: Vec<(String, Digest, bool)>,
    cas: &CasClient,
    cache: &FileCache,
    concurrency: usize,
) -> Result<Vec<Digest>> {
    let threshold = cas.batch_threshold();
    let (small, large): (Vec<_>, Vec<_>) = entries
        .into_iter()
        .partition(|(_, digest, _)| (digest.size_bytes as u64) <= threshold);
    let mut missing = Vec::new();
    let mut round: Vec<(String, Digest, bool)> = Vec::new();
    let mut round_bytes = 0u64;
    let mut rounds = Vec::new();
    for entry in small {
        round_bytes += entry.1.size_bytes as u64;
        round.push(entry);
        if round_bytes >= ROUND_BYTES {
            rounds.push(std::mem::take(&mut round));
            round_bytes = 0;
        }
    }
    if !round.is_empty() {
        rounds.push(round);
    }
    for round in rounds {
        let digests: Vec<Digest> = round.iter().map(|(_, digest, _)| digest.clone()).collect();
        let blobs = cas.read_blobs(&digests).await?;
        for (name, digest, executable) in round {
            let Some(data) = blobs.get(&key(&digest)) else {
                missing.push(digest);
                continue;
            };
            let staged = cache.staging_path(&name);
            std::fs::write(&staged, data)?;
            cache.insert(&name, &staged, digest.size_bytes as u64, executable)?;
        }
    }
    let streamed: Vec<Option<Digest>> = futures::stream::iter(large)
        .map(|(name, digest, executable)| async move {
            let staged = cache.staging_path(&name);
            if cas.read_to_file(&digest, &staged).await? {
                cache.insert(&name, &staged, digest.size_bytes as u64, executable)?;
                Ok::<_, Error>(None)
            } else {
                let _ = std::fs::remove_file(&staged);
                Ok(Some(digest))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;
    missing.extend(streamed.into_iter().flatten());
    Ok(missing)
}
