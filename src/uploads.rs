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
//!
//! A parked upload holds disk space (its extent) and, for a huge blob, an open segment
//! file, so parking is bounded twice: a sweeper thread drops expired uploads on time
//! even when no other upload touches the registry, and at most [`MAX_PARKED`] are
//! kept, the oldest dropped first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::store::Upload;

/// Most uploads parked at once; parking one more drops the oldest.
pub const MAX_PARKED: usize = 1024;

struct Parked {
    upload: Upload,
    parked_at: Instant,
}

/// Parked uploads keyed by resource name.
pub struct PendingUploads {
    keep_for: Duration,
    parked: Mutex<HashMap<String, Parked>>,
    streaming: Arc<Mutex<HashMap<String, Arc<AtomicU64>>>>,
    /// The number of uploads parked.
    gauge: prometheus::IntGauge,
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
    /// A registry that keeps each parked upload for `keep_for`, reporting how many
    /// are parked in `gauge`.
    pub fn new(keep_for: Duration, gauge: prometheus::IntGauge) -> Self {
        Self {
            keep_for,
            parked: Mutex::new(HashMap::new()),
            streaming: Arc::new(Mutex::new(HashMap::new())),
            gauge,
        }
    }

    /// Starts a thread that drops expired uploads every half `keep_for` (at most a
    /// minute apart, at least 100 ms), until `until`'s sender is dropped.
    pub fn sweep_until(
        self: &Arc<Self>,
        until: mpsc::Receiver<()>,
    ) -> std::io::Result<JoinHandle<()>> {
        let uploads = Arc::clone(self);
        let every = (self.keep_for / 2).clamp(Duration::from_millis(100), Duration::from_secs(60));
        std::thread::Builder::new()
            .name("cairn-uploads".to_string())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = until.recv_timeout(every) {
                    uploads.with_map(|_| ());
                }
            })
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
        let dropped = self.with_map(|parked| {
            let replaced = parked.insert(
                name,
                Parked {
                    upload,
                    parked_at: Instant::now(),
                },
            );
            let oldest = (parked.len() > MAX_PARKED)
                .then(|| {
                    parked
                        .iter()
                        .min_by_key(|(_, entry)| entry.parked_at)
                        .map(|(name, _)| name.clone())
                })
                .flatten()
                .and_then(|name| parked.remove(&name));
            (replaced, oldest)
        });
        drop(dropped);
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
            let result = f(&mut parked);
            self.gauge
                .set(i64::try_from(parked.len()).unwrap_or(i64::MAX));
            result
        };
        drop(expired);
        result
    }
}
