//! Interrupted ByteStream uploads, kept for a while so clients can resume them.
//!
//! A client whose stream breaks (a dropped connection, a proxy timeout) asks
//! QueryWriteStatus how much was committed and continues from there with the same
//! resource name. So when a write stream ends without `finish_write`, its engine
//! upload — an extent already holding the bytes received — is parked here under the
//! resource name instead of being dropped. A parked upload is never visible to
//! readers: only a finished, verified upload is. Uploads not resumed within the
//! configured window are dropped, which aborts them and frees their extent.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cairn_storage::Upload;

struct Parked {
    upload: Upload,
    parked_at: Instant,
}

/// Parked uploads keyed by resource name.
pub struct PendingUploads {
    keep_for: Duration,
    parked: Mutex<HashMap<String, Parked>>,
}

impl PendingUploads {
    /// A registry that keeps each parked upload for `keep_for`.
    pub fn new(keep_for: Duration) -> Self {
        Self {
            keep_for,
            parked: Mutex::new(HashMap::new()),
        }
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

    /// The committed size of the upload parked under `name`.
    pub fn committed(&self, name: &str) -> Option<u64> {
        self.with_map(|parked| parked.get(name).map(|parked| parked.upload.committed()))
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
