//! Durability: the `fdatasync` stage after the flusher and the extent writer, with
//! group commit.
//!
//! An O_DIRECT write that completed is on the device, but possibly only in its
//! volatile write cache; `fdatasync` is what makes it survive a power loss. Under
//! `Durability::Sync` a write is acknowledged, and enters the index, only once an
//! `fdatasync` that *started after the write completed* has succeeded. One sync runs
//! at a time per partition; writes that complete while it runs wait for the next one,
//! which then covers all of them, so N concurrent writers pay for about two syncs, not
//! N. The index entries of written records wait here, in write order, and the sync
//! that covers them inserts them in that order (for AC entries, the newest value wins
//! as it does without syncing).
//!
//! A failed `fdatasync` is not retried. Linux reports a writeback error once and may
//! then mark the failed pages clean, so a second `fdatasync` can succeed without the
//! data ever reaching the disk: after a failure nothing written since the last good
//! sync can be trusted, and no later sync could prove otherwise. The writes the failed
//! sync covered get an error and never enter the index, and the partition refuses
//! every later write (reads of what was synced before keep working) until a restart,
//! whose recovery scan accepts only records that pass their checksums. Refusing is
//! loud where retrying would be silent: clients see errors at once and operators a
//! counter, instead of acknowledgements that might not hold.

use crate::config::Durability;
use crate::error::{Error, ErrorKind, Result};
use crate::partition::{Partition, Pending};
use futures::lock::Mutex;
use std::cell::{Cell, RefCell};
use std::time::Instant;

/// One partition's sync state; touched only on its shard's thread.
#[derive(Default)]
pub struct Syncer {
    /// Held by the task running a sync; the others wait for it.
    lock: Mutex<()>,
    /// Syncs started (the generation of the latest one) and completed successfully.
    started: Cell<u64>,
    completed: Cell<u64>,
    /// Packed-segment log position every byte before which has been synced.
    durable_lsn: Cell<u64>,
    /// Index entries of written records, waiting for the sync that covers them.
    waiting: RefCell<Vec<Pending>>,
    /// A segment file was created since the last sync: its directory entry needs one.
    dir_dirty: Cell<bool>,
    /// Set by a failed sync: the reason every later write is refused.
    failed: RefCell<Option<Error>>,
    pub syncs: Cell<u64>,
    pub failures: Cell<u64>,
    pub sync_micros: Cell<u64>,
}

impl Syncer {
    /// Queues index entries of records just written, to be inserted by the sync that
    /// covers them.
    pub fn defer(&self, pending: Vec<Pending>) {
        self.waiting.borrow_mut().extend(pending);
    }

    /// Notes that a segment file was created.
    pub fn created_file(&self) {
        self.dir_dirty.set(true);
    }

    /// The generation of the first sync to start from now on: the one that covers a
    /// write completed now.
    pub fn next_generation(&self) -> u64 {
        self.started.get() + 1
    }
}

impl Partition {
    fn sync_mode(&self) -> bool {
        self.limits.durability == Durability::Sync
    }

    /// Refuses writes once a sync has failed.
    pub fn check_writable(&self) -> Result<()> {
        match &*self.syncer.failed.borrow() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Under `Durability::Sync`, waits until the packed segment is synced up to
    /// `target`; otherwise returns at once.
    pub async fn wait_durable_lsn(&self, target: u64) -> Result<()> {
        if !self.sync_mode() {
            return Ok(());
        }
        self.wait_covered(|| self.syncer.durable_lsn.get() >= target)
            .await
    }

    /// Under `Durability::Sync`, waits for a sync of generation `generation` (taken
    /// from `Syncer::next_generation` right after a write completed); otherwise
    /// returns at once.
    pub async fn wait_durable_generation(&self, generation: u64) -> Result<()> {
        if !self.sync_mode() {
            return Ok(());
        }
        self.wait_covered(|| self.syncer.completed.get() >= generation)
            .await
    }

    /// Whether records just written should enter the index now (`Interval`) or wait
    /// for their sync (`Sync`, in which case they are queued).
    pub fn index_now(&self, pending: Vec<Pending>) -> Vec<Pending> {
        if self.sync_mode() {
            self.syncer.defer(pending);
            Vec::new()
        } else {
            pending
        }
    }

    async fn wait_covered(&self, covered: impl Fn() -> bool) -> Result<()> {
        loop {
            if covered() {
                return Ok(());
            }
            self.check_writable()?;
            let _running = self.syncer.lock.lock().await;
            if covered() {
                return Ok(());
            }
            self.check_writable()?;
            self.run_sync().await?;
        }
    }

    /// Syncs everything written so far (the interval loop and shutdown).
    pub async fn sync_dirty(&self) -> Result<()> {
        self.check_writable()?;
        let _running = self.syncer.lock.lock().await;
        self.check_writable()?;
        self.run_sync().await
    }

    /// One sync generation: `fdatasync` of every segment written since the last one
    /// (and of the directory after a segment was created), then the deferred index
    /// entries. The caller holds the sync lock.
    async fn run_sync(&self) -> Result<()> {
        let s = &self.syncer;
        let (generation, files, covered_lsn, waiting, dir) = {
            let mut st = self.st.borrow_mut();
            let generation = s.started.get() + 1;
            s.started.set(generation);
            let files: Vec<_> = st
                .segments
                .values_mut()
                .filter_map(|seg| std::mem::take(&mut seg.dirty).then(|| seg.file.clone()))
                .collect();
            let covered = st
                .packed
                .as_ref()
                .map_or(0, |p| crate::flusher::lsn(p.seg, p.flushed));
            let waiting = std::mem::take(&mut *s.waiting.borrow_mut());
            (generation, files, covered, waiting, s.dir_dirty.take())
        };
        let started = Instant::now();
        let mut result = Ok(());
        if dir {
            result = std::fs::File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| {
                    tracing::warn!("syncing {}: {e}", self.dir.display());
                    Error::io(format!("syncing the directory of partition {}", self.id), e)
                });
        }
        for file in &files {
            if result.is_err() {
                break;
            }
            result = file.sync().await;
        }
        if dir || !files.is_empty() {
            s.syncs.set(s.syncs.get() + 1);
            s.sync_micros
                .set(s.sync_micros.get() + started.elapsed().as_micros() as u64);
        }
        match result {
            Ok(()) => {
                s.completed.set(generation);
                s.durable_lsn.set(s.durable_lsn.get().max(covered_lsn));
                for item in waiting {
                    self.insert(item.prefix, item.loc, item.if_absent);
                }
                Ok(())
            }
            Err(e) => {
                s.failures.set(s.failures.get() + 1);
                tracing::error!(
                    partition = self.id,
                    "fdatasync failed, partition refuses writes until restarted: {e}"
                );
                let refused = Error::new(
                    ErrorKind::Internal,
                    format!(
                        "partition {} refuses writes: an fdatasync failed ({}); writes since \
                         the last successful one are not stored; restart after checking the disk",
                        self.id,
                        e.message()
                    ),
                );
                *s.failed.borrow_mut() = Some(refused);
                Err(e)
            }
        }
    }
}
