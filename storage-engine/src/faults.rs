//! Fault injection for tests (feature `fault-injection`): hold or fail the
//! `fdatasync`s of the files under one directory, as a slow or failing device would.
//!
//! Plans are keyed by directory so that tests running in parallel in one process,
//! each with its own data directory, do not disturb each other. Without the feature
//! none of this is compiled, and `SegFile::sync` calls `fdatasync` directly.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

struct Plan {
    dir: PathBuf,
    /// Syncs that reached the device layer under `dir`.
    started: AtomicU64,
    /// How many of the next syncs fail with EIO.
    fail: AtomicU64,
    /// When set, each sync waits for one token (or for the sender to go away).
    gate: Option<flume::Receiver<()>>,
}

static PLANS: Mutex<Vec<Arc<Plan>>> = Mutex::new(Vec::new());

/// Faults applied to the syncs under one directory while this value lives.
pub struct SyncFaults {
    plan: Arc<Plan>,
    release: Option<flume::Sender<()>>,
}

impl SyncFaults {
    fn install(dir: &Path, fail: u64, held: bool) -> SyncFaults {
        let (release, gate) = if held {
            let (tx, rx) = flume::unbounded();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let plan = Arc::new(Plan {
            dir: dir.to_path_buf(),
            started: AtomicU64::new(0),
            fail: AtomicU64::new(fail),
            gate,
        });
        PLANS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(plan.clone());
        SyncFaults { plan, release }
    }

    /// Every sync under `dir` waits until `release` lets it through.
    pub fn hold(dir: &Path) -> SyncFaults {
        SyncFaults::install(dir, 0, true)
    }

    /// The next `n` syncs under `dir` fail with EIO.
    pub fn fail(dir: &Path, n: u64) -> SyncFaults {
        SyncFaults::install(dir, n, false)
    }

    /// Lets `n` held syncs (present or future) through.
    pub fn release(&self, n: usize) {
        if let Some(tx) = &self.release {
            for _ in 0..n {
                let _ = tx.send(());
            }
        }
    }

    /// Syncs that have reached the device layer so far (held ones included).
    pub fn started(&self) -> u64 {
        self.plan.started.load(Ordering::SeqCst)
    }
}

impl Drop for SyncFaults {
    fn drop(&mut self) {
        PLANS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|p| !Arc::ptr_eq(p, &self.plan));
    }
}

/// Called by `SegFile::sync` before it syncs `path`.
pub(crate) async fn before_sync(path: &Path) -> std::io::Result<()> {
    let plan = PLANS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .find(|p| path.starts_with(&p.dir))
        .cloned();
    let Some(plan) = plan else {
        return Ok(());
    };
    plan.started.fetch_add(1, Ordering::SeqCst);
    if let Some(gate) = &plan.gate {
        // An error means the `SyncFaults` is gone: nothing holds the sync any more.
        let _ = gate.recv_async().await;
    }
    let fail = plan
        .fail
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    match fail {
        Ok(_) => Err(std::io::Error::from_raw_os_error(libc::EIO)),
        Err(_) => Ok(()),
    }
}
