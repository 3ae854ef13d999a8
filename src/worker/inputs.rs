//! Materializing an action's input tree.
//!
//! Three steps, so that nothing is written before everything is known to be valid:
//!
//! 1. [`fetch_tree`] reads the Directory messages level by level, each level in a few
//!    concurrent batches (a tree is mostly small Directory blobs).
//! 2. [`plan`] walks the tree from the root and checks every name and symlink with the
//!    rules of [`super::paths`]; a hostile tree fails here, before the action directory
//!    is touched.
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
use super::paths::{check_name, check_symlink_target};
use crate::cas_client::{key, BlobKey, CasClient};
use crate::error::{Error, Result};

/// Something that needs blobs, and either got them all or names those it lacks.
pub enum Fetched<T> {
    /// Everything was there.
    Ready(T),
    /// These blobs are missing from the CAS.
    Missing(Vec<Digest>),
}

/// At most this many entries in one input tree; the same subdirectory may appear
/// under many names, so a small tree of Directory blobs can describe a huge one.
const MAX_ENTRIES: usize = 4_000_000;

/// What [`materialize`] creates, relative to the action root, parents first.
#[derive(Debug, Default)]
pub struct InputPlan {
    /// Directories to create.
    pub directories: Vec<PathBuf>,
    /// Files: path, digest, executable.
    pub files: Vec<(PathBuf, Digest, bool)>,
    /// Symlinks: path, target.
    pub symlinks: Vec<(PathBuf, String)>,
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

/// Checks the tree and lists what to create.
pub fn plan(root: &Digest, directories: &HashMap<BlobKey, Directory>) -> Result<InputPlan> {
    let mut plan = InputPlan::default();
    let mut pending = vec![(PathBuf::new(), key(root))];
    let mut entries = 0usize;
    while let Some((path, digest_key)) = pending.pop() {
        let directory = directories.get(&digest_key).ok_or_else(|| {
            Error::internal(format!(
                "directory {}/{} was not fetched",
                digest_key.0, digest_key.1
            ))
        })?;
        entries += directory.files.len() + directory.directories.len() + directory.symlinks.len();
        if entries > MAX_ENTRIES {
            return Err(Error::invalid_argument(format!(
                "the input tree has more than {MAX_ENTRIES} entries"
            )));
        }
        let mut names = HashSet::new();
        let mut unique = |name: &str| -> Result<()> {
            check_name(name)?;
            if !names.insert(name.to_string()) {
                return Err(Error::invalid_argument(format!(
                    "input directory `{}` has two entries named `{name}`",
                    path.display()
                )));
            }
            Ok(())
        };
        for file in &directory.files {
            unique(&file.name)?;
            let digest = file.digest.clone().ok_or_else(|| {
                Error::invalid_argument(format!("input file `{}` has no digest", file.name))
            })?;
            if digest.size_bytes < 0 {
                return Err(Error::invalid_argument(format!(
                    "input file `{}` has a negative size",
                    file.name
                )));
            }
            plan.files
                .push((path.join(&file.name), digest, file.is_executable));
        }
        for symlink in &directory.symlinks {
            unique(&symlink.name)?;
            check_symlink_target(&path, &symlink.target)?;
            plan.symlinks
                .push((path.join(&symlink.name), symlink.target.clone()));
        }
        for child in &directory.directories {
            unique(&child.name)?;
            let digest = child.digest.as_ref().ok_or_else(|| {
                Error::invalid_argument(format!("input directory `{}` has no digest", child.name))
            })?;
            let child_path = path.join(&child.name);
            plan.directories.push(child_path.clone());
            pending.push((child_path, key(digest)));
        }
    }
    plan.directories
        .sort_by_key(|path| path.components().count());
    Ok(plan)
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

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_proto::reapi::{DirectoryNode, FileNode, SymlinkNode};

    fn digest(n: u8) -> Digest {
        Digest {
            hash: format!("{n:064x}"),
            size_bytes: 1,
        }
    }

    fn file(name: &str) -> FileNode {
        FileNode {
            name: name.to_string(),
            digest: Some(digest(9)),
            ..Default::default()
        }
    }

    fn tree(root: Directory, sub: Directory) -> HashMap<BlobKey, Directory> {
        HashMap::from([(key(&digest(1)), root), (key(&digest(2)), sub)])
    }

    fn subdir(name: &str) -> DirectoryNode {
        DirectoryNode {
            name: name.to_string(),
            digest: Some(digest(2)),
        }
    }

    fn rejected(root: Directory, sub: Directory) {
        let error = plan(&digest(1), &tree(root, sub)).unwrap_err();
        assert_eq!(error.kind(), crate::ErrorKind::InvalidArgument, "{error}");
    }

    #[test]
    fn plans_a_valid_tree() {
        let root = Directory {
            files: vec![file("a")],
            directories: vec![subdir("d")],
            symlinks: vec![SymlinkNode {
                name: "l".into(),
                target: "d/b".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let sub = Directory {
            files: vec![file("b")],
            symlinks: vec![SymlinkNode {
                name: "up".into(),
                target: "../a".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let plan = plan(&digest(1), &tree(root, sub)).unwrap();
        assert_eq!(plan.directories, vec![PathBuf::from("d")]);
        let files: Vec<_> = plan.files.iter().map(|(path, _, _)| path.clone()).collect();
        assert!(files.contains(&PathBuf::from("a")));
        assert!(files.contains(&PathBuf::from("d/b")));
        assert_eq!(plan.symlinks.len(), 2);
    }

    #[test]
    fn rejects_hostile_trees() {
        let empty = Directory::default();
        for name in ["..", ".", "", "../etc", "a/b", "/abs"] {
            rejected(
                Directory {
                    files: vec![file(name)],
                    ..Default::default()
                },
                empty.clone(),
            );
            rejected(
                Directory {
                    directories: vec![subdir(name)],
                    ..Default::default()
                },
                empty.clone(),
            );
        }
        rejected(
            Directory {
                files: vec![file("x"), file("x")],
                ..Default::default()
            },
            empty.clone(),
        );
        rejected(
            Directory {
                files: vec![file("x")],
                directories: vec![subdir("x")],
                ..Default::default()
            },
            empty.clone(),
        );
        for target in ["../x", "/etc/passwd", "d/../../x"] {
            rejected(
                Directory {
                    symlinks: vec![SymlinkNode {
                        name: "l".into(),
                        target: target.into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                empty.clone(),
            );
        }
        rejected(
            Directory {
                directories: vec![subdir("d")],
                ..Default::default()
            },
            Directory {
                symlinks: vec![SymlinkNode {
                    name: "l".into(),
                    target: "../../x".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
    }
}
