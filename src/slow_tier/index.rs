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
//! The set costs about 100 bytes per blob: ten million blobs are about a gigabyte.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use cairn_storage::Digest;

/// The blobs known to be in the bucket.
#[derive(Default)]
pub struct BucketIndex {
    inner: RwLock<Inner>,
    listed: AtomicBool,
}

#[derive(Default)]
struct Inner {
    known: HashSet<Digest>,
    /// Blobs learnt while a listing runs, kept when the listing replaces `known`.
    during_listing: Option<HashSet<Digest>>,
}

impl BucketIndex {
    /// Whether the bucket is known to hold `digest`.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.inner
            .read()
            .map(|inner| inner.known.contains(digest))
            .unwrap_or(false)
    }

    /// Records that the bucket holds `digest`.
    pub fn insert(&self, digest: Digest) {
        if let Ok(mut inner) = self.inner.write() {
            inner.known.insert(digest);
            if let Some(recent) = inner.during_listing.as_mut() {
                recent.insert(digest);
            }
        }
    }

    /// Records that the bucket does not hold `digest` (or holds a corrupt copy).
    pub fn remove(&self, digest: &Digest) {
        if let Ok(mut inner) = self.inner.write() {
            inner.known.remove(digest);
            if let Some(recent) = inner.during_listing.as_mut() {
                recent.remove(digest);
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
            inner.during_listing = Some(HashSet::new());
        }
    }

    /// Replaces the set with a completed listing plus what was learnt meanwhile.
    pub fn finish_listing(&self, mut listed: HashSet<Digest>) {
        if let Ok(mut inner) = self.inner.write() {
            if let Some(recent) = inner.during_listing.take() {
                listed.extend(recent);
            }
            inner.known = listed;
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
        index.finish_listing(HashSet::new());
        assert!(index.is_empty());
    }
}
