//! Interrupted ByteStream uploads, kept for a while so clients can resume them.
//!
//! A client whose stream breaks (a dropped connection, a proxy timeout) asks
//! QueryWriteStatus how much was committed and continues from there with the same
//! resource name. So when a write stream ends without `finish_write`, its engine
//! upload — an extent already holding the bytes received — is parked here under the
//! resource name instead of being dropped. A parked upload is never visible to
//! readers: only a finished, verified upload is. Uploads not resumed within the
//! configured window are dropped, which aborts them and frees their extent.
//!
//! Uploads still streaming are tracked too, by their committed size only, so that
//! QueryWriteStatus reports progress while a write is in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::store::Upload;

struct Parked {
    upload: Upload,
    parked_at: Instant,
}

/// Parked uploads keyed by resource name.
pub struct PendingUploads {
    keep_for: Duration,
    parked: Mutex<HashMap<String, Parked>>,
    streaming: Arc<Mutex<HashMap<String, Arc<AtomicU64>>>>,
}

/// The committed size of an upload while its stream is open; dropping it forgets it.
pub struct Progress {
    name: String,
    committed: Arc<AtomicU64>,
    streaming: Arc<Mutex<HashMap<String, Arc<AtomicU64>>>>,
}

impl Progress {
    /// Records that `committed` bytes are committed.
    pub fn set(&self, committed: u64) {
        self.committed.store(committed, Ordering::Relaxed);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        let mut streaming = match self.streaming.lock() {
            Ok(streaming) => streaming,
            Err(poisoned) => poisoned.into_inner(),
        };
        if streaming
            .get(&self.name)
            .is_some_and(|current| Arc::ptr_eq(current, &self.committed))
        {
            streaming.remove(&self.name);
        }
    }
}

impl PendingUploads {
    /// A registry that keeps each parked upload for `keep_for`.
    pub fn new(keep_for: Duration) -> Self {
        Self {
            keep_for,
            parked: Mutex::new(HashMap::new()),
            streaming: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Tracks the progress of the upload streaming under `name`.
    pub fn track(&self, name: &str, committed: u64) -> Progress {
        let progress = Progress {
            name: name.to_string(),
            committed: Arc::new(AtomicU64::new(committed)),
            streaming: Arc::clone(&self.streaming),
        };
        let mut streaming = match self.streaming.lock() {
            Ok(streaming) => streaming,
            Err(poisoned) => poisoned.into_inner(),
        };
        streaming.insert(name.to_string(), Arc::clone(&progress.committed));
        progress
    }

    /// Parks `upload` under `name`, replacing (and so aborting) any older one.
    pub fn park(&self, name: String, upload: Upload) {
        let expired = self.with_map(|parked| {
            parked.insert(
                name,
                Parked {
                    upload,
                    parked_at: Instant::now(),
                },
            )
        });
        drop(expired);
    }

    /// Takes the upload parked under `name`, if it has not expired.
    pub fn take(&self, name: &str) -> Option<Upload> {
        self.with_map(|parked| parked.remove(name))
            .map(|parked| parked.upload)
    }

    /// The committed size of the upload parked or streaming under `name`.
    pub fn committed(&self, name: &str) -> Option<u64> {
        let parked =
            self.with_map(|parked| parked.get(name).map(|parked| parked.upload.committed()));
        parked.or_else(|| {
            let streaming = match self.streaming.lock() {
                Ok(streaming) => streaming,
                Err(poisoned) => poisoned.into_inner(),
            };
            streaming
                .get(name)
                .map(|committed| committed.load(Ordering::Relaxed))
        })
    }

    /// Runs `f` on the map after dropping expired uploads. The expired ones are
    /// dropped after the lock is released, since aborting an upload may take a while.
    fn with_map<T>(&self, f: impl FnOnce(&mut HashMap<String, Parked>) -> T) -> T {
        let now = Instant::now();
        let mut expired = Vec::new();
        let result = {
            let mut parked = match self.parked.lock() {
                Ok(parked) => parked,
                Err(poisoned) => poisoned.into_inner(),
            };
            let stale: Vec<String> = parked
                .iter()
                .filter(|(_, entry)| now.duration_since(entry.parked_at) > self.keep_for)
                .map(|(name, _)| name.clone())
                .collect();
            for name in stale {
                if let Some(entry) = parked.remove(&name) {
                    expired.push(entry);
                }
            }
            f(&mut parked)
        };
        drop(expired);
        result
    }
}
