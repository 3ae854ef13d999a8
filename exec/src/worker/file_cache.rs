//! The worker's local file cache.
//!
//! Consecutive actions of a build share most of their inputs (compilers, headers,
//! libraries), so fetching every input for every action would move the same bytes
//! from the cache node over and over. The file cache keeps each input file once, named
//! by its digest, and every action directory gets a private copy of it. Executable and
//! plain copies are distinct entries, so each entry's mode is already right.
//!
//! Why copies and not hardlinks: a hardlink is the cache's own inode, and the mode
//! (0444, 0555) is the only thing between an action and that inode. An action running
//! as root (CI workers usually do) writes through the mode, and one of the worker's
//! own user can `chmod u+w` first; one `>> input` then changes that input for every
//! later action on the worker, and for those running at the same time, and their
//! wrong results go to the action cache for everyone. A private inode per action makes
//! that impossible whatever the action's user. The other ways considered:
//!
//! - *Verifying the entry before reuse* (hash it, or compare its ctime): hashing reads
//!   every byte, which costs more than copying them; ctime changes whenever another
//!   action links or unlinks the file; and neither catches an action that read the
//!   file while a concurrent one was changing it.
//! - *A read-only bind mount, or a separate user for actions*: both need the worker to
//!   be root and change what actions may do (an action that expects to be root, or to
//!   write beside its inputs, breaks), and a root action can remount.
//!
//! The copy is a reflink (`FICLONE`) where the filesystem shares extents (btrfs, XFS
//! formatted with reflinks): the new inode points at the same blocks and
//! only a write copies them, so it costs about what a hardlink does whatever the size.
//! Elsewhere (ext4, tmpfs) it is an in-kernel copy (`copy_file_range`), which costs the
//! bytes once per action. The first refused `FICLONE` switches the cache to plain
//! copies. Measured with `cargo run -p cairn-bench --bin materialize-inputs` (median of
//! 7 rounds, page cache warm, 2 shared vCPUs at load average 10, so ±30%), per action,
//! placing then removing the files:
//!
//! | inputs | filesystem | hardlink (before) | copy (now) | reflink | SHA-256, then hardlink |
//! | --- | --- | --- | --- | --- | --- |
//! | 1,000 × 4 KiB | ext4 | 8.9 + 7.1 ms | 23.7 + 14.5 ms | unsupported | 47.5 + 9.0 ms |
//! | 4 × 50 MiB | ext4 | 0.01 + 3.9 ms | 108 + 24 ms | unsupported | 269 + 3.7 ms |
//! | 1,000 × 4 KiB | XFS | 8.0 + 3.6 ms | 31.3 + 20.7 ms | 14.3 + 11.4 ms | 33.3 + 3.9 ms |
//! | 4 × 50 MiB | XFS | 0.01 + 0.01 ms | 0.05 + 0.01 ms | 0.04 + 0.01 ms | 248 + 0.06 ms |
//!
//! (XFS: a loop-mounted image made with `mkfs.xfs -m reflink=1`; its `copy` of large
//! files is a reflink too, because `copy_file_range` clones where it can.) So on ext4 a
//! typical compile action, a thousand headers and a 50 MiB compiler, pays about 40 ms
//! more to start and 12 ms more to clean up than with hardlinks, small beside the
//! seconds it compiles; on XFS or btrfs the difference is a few milliseconds whatever
//! the sizes. Verifying instead of copying costs more than the copy on both.
//!
//! Where they are not reflinks, copies also take disk space while their action runs,
//! beyond the cache's budget: each running task holds one copy of its inputs (freed
//! with its directory).
//!
//! This protects the inputs of other actions from an action that writes its own. It
//! is not a sandbox: an action can still find the worker's directories through `..`
//! and write there, as it can write anywhere its user may. Untrusted actions need the
//! worker itself in a container or VM, one per trust domain.
//!
//! The cache has a byte budget. The index lives in memory (the directory is emptied
//! at startup, which also clears what a crash left behind) and evicts the least
//! recently used entries once the budget is exceeded. Evicting an entry while an
//! action's copy is being made is harmless: the open descriptor keeps the data alive.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Cleared by the first `FICLONE` the filesystem refuses.
    reflinks: AtomicBool,
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
            reflinks: AtomicBool::new(true),
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

    /// Puts a private copy of entry `name` at `destination` (which must not exist),
    /// with the entry's mode. `false` if the entry is gone (evicted meanwhile).
    pub fn copy_to(&self, name: &str, destination: &Path) -> Result<bool> {
        let mut source = match File::open(self.dir.join(name)) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                self.forget(name);
                return Ok(false);
            }
            Err(error) => return Err(error.into()),
        };
        let mode = source.metadata()?.permissions().mode() & 0o777;
        let mut copy = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(destination)?;
        if !self.reflink(&source, &copy)? {
            std::io::copy(&mut source, &mut copy)?;
        }
        Ok(true)
    }

    /// Makes `copy` share `source`'s blocks; `false` where the filesystem cannot.
    fn reflink(&self, source: &File, copy: &File) -> Result<bool> {
        if !self.reflinks.load(Ordering::Relaxed) {
            return Ok(false);
        }
        // SAFETY: FICLONE takes the source descriptor as its argument; both stay open
        // for the duration of the call.
        if unsafe { libc::ioctl(copy.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) } == 0 {
            return Ok(true);
        }
        let error = std::io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY) => {
                self.reflinks.store(false, Ordering::Relaxed);
                tracing::info!(
                    "the file cache's filesystem has no reflinks ({error}); inputs are copied"
                );
                Ok(false)
            }
            _ => Err(error.into()),
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
        assert!(cache.copy_to("a", &out).unwrap());
        assert_eq!(std::fs::read(&out).unwrap().len(), 100);
        assert!(!cache.copy_to("b", &dir.path().join("other")).unwrap());
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
        assert!(cache.copy_to(&name, &out).unwrap());
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o555);
    }

    /// What an action may do to its input (`chmod u+w` as its owner, or write through
    /// the mode as root) reaches neither the entry nor another action's copy.
    #[test]
    fn an_action_writing_its_copy_changes_nothing_else() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let cache = FileCache::open(&dir.path().join("cache"), 1 << 20).unwrap();
        let name = entry_name(&digest("cd", 9), false);
        let staged = cache.staging_path(&name);
        std::fs::write(&staged, b"original\n").unwrap();
        cache.insert(&name, &staged, 9, false).unwrap();
        let first = dir.path().join("first");
        let second = dir.path().join("second");
        assert!(cache.copy_to(&name, &first).unwrap());
        assert!(cache.copy_to(&name, &second).unwrap());
        std::fs::set_permissions(&first, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut writer = OpenOptions::new().append(true).open(&first).unwrap();
        writer.write_all(b"poison\n").unwrap();
        drop(writer);
        assert_eq!(std::fs::read(&first).unwrap(), b"original\npoison\n");
        assert_eq!(std::fs::read(&second).unwrap(), b"original\n");
        let third = dir.path().join("third");
        assert!(cache.copy_to(&name, &third).unwrap());
        assert_eq!(std::fs::read(&third).unwrap(), b"original\n");
        let mode = std::fs::metadata(&third).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
        assert_eq!(
            std::fs::metadata(&second).unwrap().permissions().mode() & 0o777,
            0o444
        );
    }
}
