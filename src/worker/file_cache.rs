//! The worker's local file cache.
//!
//! Consecutive actions of a build share most of their inputs (compilers, headers,
//! libraries), so fetching every input for every action would move the same bytes
//! from the cache node over and over. The file cache keeps each input file once, named
//! by its digest, and an action directory gets hardlinks to it: materializing an
//! input is then a `link` call. Executable and plain copies are distinct entries,
//! because a hardlink shares its inode's mode. Entries are read-only so an action that
//! tries to write an input fails instead of corrupting later actions' inputs.
//!
//! The cache has a byte budget. The index lives in memory (the directory is emptied
//! at startup, which also clears what a crash left behind) and evicts the least
//! recently used entries once the budget is exceeded. Evicting a file that an action
//! directory still links to is harmless: the action's link keeps the data alive.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cairn_proto::reapi::Digest;

use crate::error::Result;

struct Entry {
    size: u64,
    last_used: u64,
}

#[derive(Default)]
struct Index {
    entries: HashMap<String, Entry>,
    bytes: u64,
    clock: u64,
}

/// Input files by digest, within a byte budget.
pub struct FileCache {
    dir: PathBuf,
    budget: u64,
    index: Mutex<Index>,
}

/// The cache entry name of a blob.
pub fn entry_name(digest: &Digest, executable: bool) -> String {
    format!(
        "{}-{}{}",
        digest.hash,
        digest.size_bytes,
        if executable { "-x" } else { "" }
    )
}

impl FileCache {
    /// An empty cache in `dir` (created; anything in it is removed).
    pub fn open(dir: &Path, budget: u64) -> Result<Self> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            budget,
            index: Mutex::new(Index::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Where a new entry is written before [`FileCache::insert`] moves it in.
    pub fn staging_path(&self, name: &str) -> PathBuf {
        self.dir
            .join(format!(".{name}.{}", crate::exec_common::random_name()))
    }

    /// Whether the entry exists (and marks it used).
    pub fn contains(&self, name: &str) -> bool {
        let mut index = self.lock();
        index.clock += 1;
        let clock = index.clock;
        match index.entries.get_mut(name) {
            Some(entry) => {
                entry.last_used = clock;
                true
            }
            None => false,
        }
    }

    /// Moves the complete file at `staged` into the cache as `name`, then evicts
    /// until the budget holds.
    pub fn insert(&self, name: &str, staged: &Path, size: u64, executable: bool) -> Result<()> {
        let mode = if executable { 0o555 } else { 0o444 };
        std::fs::set_permissions(staged, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(staged, self.dir.join(name))?;
        let mut evicted = Vec::new();
        {
            let mut index = self.lock();
            index.clock += 1;
            let clock = index.clock;
            if let Some(old) = index.entries.insert(
                name.to_string(),
                Entry {
                    size,
                    last_used: clock,
                },
            ) {
                index.bytes -= old.size;
            }
            index.bytes += size;
            while index.bytes > self.budget && index.entries.len() > 1 {
                let Some(oldest) = index
                    .entries
                    .iter()
                    .filter(|(key, _)| key.as_str() != name)
                    .min_by_key(|(_, entry)| entry.last_used)
                    .map(|(key, _)| key.clone())
                else {
                    break;
                };
                if let Some(entry) = index.entries.remove(&oldest) {
                    index.bytes -= entry.size;
                }
                evicted.push(oldest);
            }
        }
        for name in evicted {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
        Ok(())
    }

    /// Hardlinks entry `name` to `destination` (copying if the filesystem refuses
    /// another link). `false` if the entry is gone (evicted meanwhile).
    pub fn link(&self, name: &str, destination: &Path) -> Result<bool> {
        let source = self.dir.join(name);
        match std::fs::hard_link(&source, destination) {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                self.forget(name);
                Ok(false)
            }
            Err(error) if error.raw_os_error() == Some(libc::EMLINK) => {
                std::fs::copy(&source, destination)?;
                Ok(true)
            }
            Err(error) => Err(error.into()),
        }
    }

    fn forget(&self, name: &str) {
        let mut index = self.lock();
        if let Some(entry) = index.entries.remove(name) {
            index.bytes -= entry.size;
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(hash: &str, size: i64) -> Digest {
        Digest {
            hash: hash.to_string(),
            size_bytes: size,
        }
    }

    fn put(cache: &FileCache, name: &str, size: usize) {
        let staged = cache.staging_path(name);
        std::fs::write(&staged, vec![7u8; size]).unwrap();
        cache.insert(name, &staged, size as u64, false).unwrap();
    }

    #[test]
    fn evicts_least_recently_used_within_budget() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FileCache::open(&dir.path().join("cache"), 250).unwrap();
        put(&cache, "a", 100);
        put(&cache, "b", 100);
        assert!(cache.contains("a"));
        put(&cache, "c", 100);
        assert!(cache.contains("a"));
        assert!(!cache.contains("b"));
        assert!(cache.contains("c"));
        assert_eq!(cache.bytes(), 200);
        let out = dir.path().join("linked");
        assert!(cache.link("a", &out).unwrap());
        assert_eq!(std::fs::read(&out).unwrap().len(), 100);
        assert!(!cache.link("b", &dir.path().join("other")).unwrap());
    }

    #[test]
    fn modes_and_names() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FileCache::open(&dir.path().join("cache"), 1 << 20).unwrap();
        let name = entry_name(&digest("ab", 3), true);
        assert_eq!(name, "ab-3-x");
        let staged = cache.staging_path(&name);
        std::fs::write(&staged, b"abc").unwrap();
        cache.insert(&name, &staged, 3, true).unwrap();
        let out = dir.path().join("tool");
        assert!(cache.link(&name, &out).unwrap());
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o555);
    }
}
