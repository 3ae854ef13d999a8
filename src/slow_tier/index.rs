//! What the bucket holds, known locally so S3 never sits on the FindMissingBlobs path.
//!
//! Asking S3 about each digest of a FindMissingBlobs call would turn one RPC into
//! thousands of HEAD requests. Instead the node keeps the set of blobs it knows to be
//! in the bucket: filled by listing the bucket in the background at startup (and
//! again every `relist_seconds`, which is how objects uploaded by other nodes or
//! removed by lifecycle rules are noticed), and kept current by the node's own
//! uploads and reads. A listing replaces the set, so expired objects drop out, but
//! blobs learnt while it ran are kept: the listing may have passed their keys before
//! they were written. A read that finds an object gone or corrupt removes it at once.
//!
//! The set is keyed by digest function and hash, with the size as the value: a
//! verified hash names one blob whatever the size, and Bazel's HTTP protocol names
//! blobs by hash alone (`GET /cas/{sha256}`), so [`BucketIndex::size_of`] finds the
//! object key without listing the bucket. It costs about 80 bytes per blob: ten
//! million blobs are about 800 MB.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use cairn_storage::{Digest, DigestFunction};

/// A blob named by hash alone; the index maps it to the blob's size.
type Name = (DigestFunction, [u8; 32]);

fn name(digest: &Digest) -> Name {
    (digest.function, digest.hash)
}

/// The blobs known to be in the bucket.
#[derive(Default)]
pub struct BucketIndex {
    inner: RwLock<Inner>,
    listed: AtomicBool,
}

#[derive(Default)]
struct Inner {
    known: HashMap<Name, u64>,
    /// Blobs learnt (`Some(size)`) or found gone (`None`) while a listing runs, applied
    /// to the listing when it replaces `known`.
    during_listing: Option<HashMap<Name, Option<u64>>>,
}

impl BucketIndex {
    /// Whether the bucket is known to hold `digest`.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.inner
            .read()
            .map(|inner| inner.known.get(&name(digest)) == Some(&digest.size))
            .unwrap_or(false)
    }

    /// The size of the blob named by `function` and `hash`, if the bucket is known
    /// to hold it.
    pub fn size_of(&self, function: DigestFunction, hash: &[u8; 32]) -> Option<u64> {
        self.inner
            .read()
            .ok()
            .and_then(|inner| inner.known.get(&(function, *hash)).copied())
    }

    /// Records that the bucket holds `digest`.
    pub fn insert(&self, digest: Digest) {
        if let Ok(mut inner) = self.inner.write() {
            inner.known.insert(name(&digest), digest.size);
            if let Some(recent) = inner.during_listing.as_mut() {
                recent.insert(name(&digest), Some(digest.size));
            }
        }
    }

    /// Records that the bucket does not hold `digest` (or holds a corrupt copy).
    pub fn remove(&self, digest: &Digest) {
        if let Ok(mut inner) = self.inner.write() {
            if inner.known.get(&name(digest)) == Some(&digest.size) {
                inner.known.remove(&name(digest));
            }
            if let Some(recent) = inner.during_listing.as_mut() {
                recent.insert(name(digest), None);
            }
        }
    }

    /// Blobs known to be in the bucket.
    pub fn len(&self) -> usize {
        self.inner
            .read()
            .map(|inner| inner.known.len())
            .unwrap_or(0)
    }

    /// Whether no blob is known to be in the bucket.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a listing of the whole bucket has completed at least once.
    pub fn listed(&self) -> bool {
        self.listed.load(Ordering::Acquire)
    }

    /// Marks the start of a listing.
    pub fn begin_listing(&self) {
        if let Ok(mut inner) = self.inner.write() {
            inner.during_listing = Some(HashMap::new());
        }
    }

    /// Replaces the set with a completed listing plus what was learnt meanwhile.
    pub fn finish_listing(&self, listed: HashSet<Digest>) {
        let mut known: HashMap<Name, u64> = listed
            .iter()
            .map(|digest| (name(digest), digest.size))
            .collect();
        if let Ok(mut inner) = self.inner.write() {
            for (blob, size) in inner.during_listing.take().into_iter().flatten() {
                match size {
                    Some(size) => known.insert(blob, size),
                    None => known.remove(&blob),
                };
            }
            inner.known = known;
        }
        self.listed.store(true, Ordering::Release);
    }

    /// Forgets a listing that failed part way; the set stays as it was.
    pub fn abandon_listing(&self) {
        if let Ok(mut inner) = self.inner.write() {
            inner.during_listing = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_storage::DigestFunction;

    fn digest(text: &str) -> Digest {
        Digest::of(DigestFunction::Sha256, text.as_bytes())
    }

    #[test]
    fn a_listing_replaces_the_set_but_keeps_what_was_learnt_meanwhile() {
        let index = BucketIndex::default();
        index.insert(digest("expired"));
        index.begin_listing();
        index.insert(digest("uploaded during the listing"));
        index.finish_listing([digest("listed")].into_iter().collect());
        assert!(index.listed());
        assert!(!index.contains(&digest("expired")));
        assert!(index.contains(&digest("listed")));
        assert!(index.contains(&digest("uploaded during the listing")));
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn removal_during_a_listing_sticks_for_what_was_learnt() {
        let index = BucketIndex::default();
        index.begin_listing();
        index.insert(digest("corrupt"));
        index.remove(&digest("corrupt"));
        index.finish_listing([digest("corrupt")].into_iter().collect());
        assert!(index.is_empty());
    }

    #[test]
    fn a_blob_is_found_by_hash_alone_and_only_at_its_size() {
        let index = BucketIndex::default();
        let d = digest("blob");
        index.insert(d);
        assert_eq!(index.size_of(d.function, &d.hash), Some(d.size));
        assert!(!index.contains(&Digest { size: 99, ..d }));
        index.remove(&Digest { size: 99, ..d });
        assert!(index.contains(&d));
        index.remove(&d);
        assert_eq!(index.size_of(d.function, &d.hash), None);
    }
}
