//! The sink: a stand-in for the storage engine that keeps blobs in memory, for
//! measuring the ceiling of the network stack (`cairn --sink`).
//!
//! A node started with `--sink` is the same process as a normal one — the same
//! executors, listeners, HTTP/2 handling and gRPC services — except that the
//! [`Store`](crate::store::Store) sends every data call here instead of to the engine.
//! What the sink leaves out is exactly what the storage path costs: no disk, no
//! checksums, no copies — a blob is held as the very chunks it arrived in, and served
//! as them. So benchmarks against a sink and against a real node differ only by
//! storage.
//!
//! What it keeps is what REAPI asks of any CAS: an upload becomes readable only if its
//! bytes hash to its digest (batch uploads through the store's shared rules, streamed
//! ones with the engine's own [`UploadHasher`]). A sink that kept and served
//! unverified bytes would not be a CAS, and as a ceiling it would leave out a cost no
//! conforming server can skip.
//!
//! Memory is bounded by a byte budget: once full, the oldest entries are dropped, so
//! a read of a blob written long ago may be `NOT_FOUND`. Keep a read benchmark's
//! working set under the budget. Nothing survives a restart.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use cairn_storage::{Digest, UploadHasher};

/// What the sink holds an entry under.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    Blob(Digest),
    Action(String, Digest),
}

#[derive(Default)]
struct Held {
    entries: HashMap<Key, Arc<[Bytes]>>,
    /// Insertion order, oldest first, for eviction.
    order: VecDeque<Key>,
    bytes: u64,
}

/// In-memory blobs and action-cache entries, bounded by a byte budget. Cheap to clone.
#[derive(Clone)]
pub struct Sink {
    held: Arc<Mutex<Held>>,
    budget: u64,
}

impl Sink {
    /// An empty sink that holds at most `budget` bytes.
    pub fn new(budget: u64) -> Self {
        Self {
            held: Arc::new(Mutex::new(Held::default())),
            budget,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        match self.held.lock() {
            Ok(held) => held,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Whether the sink holds the blob `digest`.
    pub fn contains(&self, digest: Digest) -> bool {
        self.lock().entries.contains_key(&Key::Blob(digest))
    }

    /// The digests among `digests` that the sink does not hold.
    pub fn find_missing(&self, digests: Vec<Digest>) -> Vec<Digest> {
        let held = self.lock();
        digests
            .into_iter()
            .filter(|digest| !held.entries.contains_key(&Key::Blob(*digest)))
            .collect()
    }

    /// Keeps a blob, as the chunks it arrived in.
    pub fn put(&self, digest: Digest, chunks: Vec<Bytes>) {
        self.insert(Key::Blob(digest), chunks);
    }

    /// The chunks of blob `digest` from `offset`, at most `limit` bytes; `None` if the
    /// sink does not hold it.
    pub fn get(&self, digest: Digest, offset: u64, limit: Option<u64>) -> Option<Vec<Bytes>> {
        let chunks = self.lock().entries.get(&Key::Blob(digest)).cloned()?;
        let mut skip = offset;
        let mut left = limit.unwrap_or(u64::MAX);
        let mut out = Vec::with_capacity(chunks.len());
        for chunk in chunks.iter() {
            let len = chunk.len() as u64;
            if skip >= len {
                skip -= len;
                continue;
            }
            if left == 0 {
                break;
            }
            let end = len.min(skip.saturating_add(left));
            out.push(chunk.slice(skip as usize..end as usize));
            left -= end - skip;
            skip = 0;
        }
        Some(out)
    }

    /// The full digest of the held blob whose function and hash are `named`'s. A
    /// search of every entry: the sink measures the network stack, and its entries are
    /// bounded by its budget.
    pub fn find_by_hash(&self, named: &Digest) -> Option<Digest> {
        self.lock().entries.keys().find_map(|key| match key {
            Key::Blob(d) if d.function == named.function && d.hash == named.hash => Some(*d),
            _ => None,
        })
    }

    /// The whole blob `digest` in one piece, if held.
    pub fn get_bytes(&self, digest: Digest) -> Option<Bytes> {
        self.get(digest, 0, None).map(concat)
    }

    /// The action-cache entry under `key` in `instance`, if held.
    pub fn ac_get(&self, instance: &str, key: Digest) -> Option<Bytes> {
        let held = self.lock();
        let chunks = held
            .entries
            .get(&Key::Action(instance.to_string(), key))
            .cloned();
        drop(held);
        chunks.map(|chunks| concat(chunks.to_vec()))
    }

    /// Keeps (or replaces) the action-cache entry under `key` in `instance`.
    pub fn ac_put(&self, instance: &str, key: Digest, value: Bytes) {
        self.insert(Key::Action(instance.to_string(), key), vec![value]);
    }

    /// An upload that collects its chunks and hands them to the sink on `finish`.
    pub fn begin_put(&self, digest: Digest) -> SinkUpload {
        SinkUpload {
            sink: self.clone(),
            digest,
            chunks: Vec::new(),
            committed: 0,
            hasher: UploadHasher::new(digest.function),
        }
    }

    fn insert(&self, key: Key, chunks: Vec<Bytes>) {
        let len: u64 = chunks.iter().map(|chunk| chunk.len() as u64).sum();
        if len > self.budget {
            return;
        }
        let mut held = self.lock();
        if let Some(old) = held.entries.get_mut(&key) {
            // A blob is its digest's content: keep the copy held. An action-cache entry
            // is replaced where it stands in the eviction order; moving it to the back
            // scanned the whole order per write, which made a second run of a benchmark
            // over the same blobs 100 times slower against the sink.
            if matches!(key, Key::Blob(_)) {
                return;
            }
            let old_len: u64 = old.iter().map(|chunk| chunk.len() as u64).sum();
            *old = chunks.into();
            held.bytes = held.bytes - old_len + len;
            return;
        }
        while held.bytes + len > self.budget {
            let Some(oldest) = held.order.pop_front() else {
                break;
            };
            if let Some(old) = held.entries.remove(&oldest) {
                held.bytes -= old.iter().map(|chunk| chunk.len() as u64).sum::<u64>();
            }
        }
        held.bytes += len;
        held.order.push_back(key.clone());
        held.entries.insert(key, chunks.into());
    }
}

/// A streaming upload into the sink. Dropping it without `finish` discards it.
pub struct SinkUpload {
    sink: Sink,
    digest: Digest,
    chunks: Vec<Bytes>,
    committed: u64,
    hasher: UploadHasher,
}

impl SinkUpload {
    /// Bytes accepted so far.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Accepts one chunk, without copying it.
    pub async fn write(&mut self, chunk: Bytes) {
        self.hasher.update(&chunk).await;
        self.committed += chunk.len() as u64;
        self.chunks.push(chunk);
    }

    /// Makes the blob readable if its bytes match its digest.
    pub fn finish(self) -> cairn_storage::Result<()> {
        self.digest
            .check_sent(self.committed, self.hasher.finalize())?;
        self.sink.put(self.digest, self.chunks);
        Ok(())
    }
}

/// The chunks as one buffer; a single chunk is returned as is.
fn concat(mut chunks: Vec<Bytes>) -> Bytes {
    if chunks.len() == 1 {
        return chunks.swap_remove(0);
    }
    let mut whole = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
    for chunk in chunks {
        whole.extend_from_slice(&chunk);
    }
    whole.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_storage::DigestFunction;
    use futures::executor::block_on;

    fn digest(data: &[u8]) -> Digest {
        Digest::of(DigestFunction::Sha256, data)
    }

    #[test]
    fn serves_ranges_across_chunks() {
        let sink = Sink::new(1 << 20);
        let blob = digest(b"abcdefgh");
        let mut upload = sink.begin_put(blob);
        block_on(upload.write(Bytes::from_static(b"abc")));
        block_on(upload.write(Bytes::from_static(b"defgh")));
        assert!(!sink.contains(blob));
        upload.finish().unwrap();
        assert!(sink.contains(blob));
        assert_eq!(
            sink.get_bytes(blob).unwrap(),
            Bytes::from_static(b"abcdefgh")
        );
        let range = concat(sink.get(blob, 2, Some(4)).unwrap());
        assert_eq!(range, Bytes::from_static(b"cdef"));
        assert!(concat(sink.get(blob, 8, None).unwrap()).is_empty());
    }

    #[test]
    fn an_upload_that_does_not_match_its_digest_is_refused() {
        let sink = Sink::new(1 << 20);
        let claimed = digest(b"abcdefgh");
        let mut upload = sink.begin_put(claimed);
        block_on(upload.write(Bytes::from_static(b"abcdefgX")));
        let refused = upload.finish().expect_err("wrong content accepted");
        assert_eq!(refused.kind(), cairn_storage::ErrorKind::InvalidArgument);
        assert!(!sink.contains(claimed));
    }

    #[test]
    fn evicts_the_oldest_beyond_its_budget() {
        let sink = Sink::new(10);
        let (first, second) = (digest(b"123456"), digest(b"abcdef"));
        sink.put(first, vec![Bytes::from_static(b"123456")]);
        sink.put(second, vec![Bytes::from_static(b"abcdef")]);
        assert_eq!(sink.find_missing(vec![first, second]), vec![first]);
        sink.ac_put("", first, Bytes::from_static(b"r"));
        assert_eq!(sink.ac_get("", first).unwrap(), Bytes::from_static(b"r"));
        assert!(sink.ac_get("other", first).is_none());
    }

    #[test]
    fn putting_again_keeps_one_copy_and_replaces_action_results() {
        let sink = Sink::new(15);
        let (first, second) = (digest(b"123456"), digest(b"abcdef"));
        sink.put(first, vec![Bytes::from_static(b"123456")]);
        sink.put(first, vec![Bytes::from_static(b"123456")]);
        sink.put(second, vec![Bytes::from_static(b"abcdef")]);
        assert!(sink.find_missing(vec![first, second]).is_empty());
        sink.ac_put("", first, Bytes::from_static(b"old"));
        sink.ac_put("", first, Bytes::from_static(b"new"));
        assert_eq!(sink.ac_get("", first).unwrap(), Bytes::from_static(b"new"));
        assert_eq!(sink.lock().bytes, 15);
    }
}
