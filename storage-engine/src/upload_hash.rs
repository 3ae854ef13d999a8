//! Hashing the chunks of concurrent uploads together.
//!
//! A node under load receives many uploads at once, each hashed on the core that reads
//! its connection. SHA-256 over up to four messages at once costs about half as much
//! per byte as one at a time (see `sha256`), so an upload's chunk need not be hashed the
//! moment it arrives: it waits in its thread's *room* until other uploads on that
//! thread have a chunk waiting too, and the four are hashed in one pass.
//!
//! The rules that keep every hash right and every wait short:
//! - an upload has at most one chunk waiting; before it leaves another, or finishes,
//!   the waiting one is hashed (with the room's others if it is there, else alone);
//! - a room holds at most `LANES` chunks; the one that fills it hashes them all;
//! - whoever hashes a room only takes uploads it can lock without waiting, so two
//!   threads never wait on each other (an upload resumed on another thread may be
//!   listed in two rooms); one it skips keeps its chunk, for its owner to hash.
//!
//! BLAKE3 already spreads one message over the core's vector lanes, so it hashes at
//! once, as do all uploads when the CPU has no SHA extensions (nothing to gain).

use crate::digest::{DigestFunction, Hasher};
use crate::sha256::{update_together, Sha256, LANES};
use bytes::Bytes;
use std::cell::RefCell;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::Poll;

/// The running hash of one upload.
pub struct UploadHasher(Kind);

enum Kind {
    Shared(Arc<Mutex<Stream>>),
    Alone(Hasher),
}

#[derive(Default)]
struct Stream {
    hasher: Sha256,
    /// A chunk not yet in `hasher`, listed in some thread's room.
    waiting: Option<Bytes>,
}

thread_local! {
    static ROOM: RefCell<Vec<Weak<Mutex<Stream>>>> = const { RefCell::new(Vec::new()) };
}

impl UploadHasher {
    pub fn new(function: DigestFunction) -> UploadHasher {
        if function == DigestFunction::Sha256 && crate::sha256::hashes_together() {
            UploadHasher(Kind::Shared(Arc::default()))
        } else {
            UploadHasher(Kind::Alone(function.hasher()))
        }
    }

    /// Adds `chunk` to the hash, now or together with other uploads' chunks later.
    pub async fn update(&mut self, chunk: &Bytes) {
        let stream = match &mut self.0 {
            Kind::Alone(hasher) => return hasher.update(chunk),
            Kind::Shared(stream) => stream,
        };
        if lock(stream).waiting.is_some() {
            yield_once().await;
        }
        hash_waiting(stream);
        lock(stream).waiting = Some(chunk.clone());
        let full = ROOM.with(|room| {
            let mut room = room.borrow_mut();
            room.push(Arc::downgrade(stream));
            room.len() >= LANES
        });
        if full {
            hash_room();
        }
    }

    pub fn finalize(self) -> [u8; 32] {
        match self.0 {
            Kind::Alone(hasher) => hasher.finalize(),
            Kind::Shared(stream) => {
                hash_waiting(&stream);
                let hasher = std::mem::take(&mut lock(&stream).hasher);
                hasher.finalize()
            }
        }
    }
}

/// Hashes the upload's waiting chunk, if it has one: with the room's others if it is
/// in this thread's room, else alone.
fn hash_waiting(stream: &Arc<Mutex<Stream>>) {
    if lock(stream).waiting.is_none() {
        return;
    }
    hash_room();
    let mut own = lock(stream);
    if let Some(chunk) = own.waiting.take() {
        own.hasher.update(&chunk);
    }
}

/// Hashes every waiting chunk in this thread's room that can be had without waiting.
fn hash_room() {
    let listed = ROOM.with(|room| std::mem::take(&mut *room.borrow_mut()));
    let streams: Vec<Arc<Mutex<Stream>>> = listed.iter().filter_map(Weak::upgrade).collect();
    let mut work: Vec<(MutexGuard<Stream>, Bytes)> = streams
        .iter()
        .filter_map(|stream| stream.try_lock().ok())
        .filter_map(|mut stream| stream.waiting.take().map(|chunk| (stream, chunk)))
        .collect();
    let mut items: Vec<(&mut Sha256, &[u8])> = work
        .iter_mut()
        .map(|(stream, chunk)| (&mut stream.hasher, &chunk[..]))
        .collect();
    update_together(&mut items);
}

/// Lets the thread's other tasks run once first: they may bring chunks to hash with.
async fn yield_once() {
    let mut yielded = false;
    futures::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

/// Hashing cannot panic halfway through a state update, so a poisoned lock still holds
/// a consistent stream.
fn lock(stream: &Mutex<Stream>) -> MutexGuard<'_, Stream> {
    stream.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use futures::executor::block_on;

    fn blob(len: usize, seed: u8) -> Bytes {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    fn hash_of(data: &[u8]) -> [u8; 32] {
        Digest::of(DigestFunction::Sha256, data).hash
    }

    #[test]
    fn interleaved_uploads_each_get_their_own_hash() {
        // Seven uploads (more than a room holds) sending chunks of different sizes in
        // turn, some finishing early: every hash must be that of its own bytes.
        let blobs: Vec<Bytes> = (0..7).map(|i| blob(1_000 + 70_000 * i, i as u8)).collect();
        let mut hashers: Vec<Option<UploadHasher>> = blobs
            .iter()
            .map(|_| Some(UploadHasher::new(DigestFunction::Sha256)))
            .collect();
        let mut offsets = vec![0; blobs.len()];
        let mut hashes = vec![None; blobs.len()];
        while hashes.iter().any(Option::is_none) {
            for i in 0..blobs.len() {
                let Some(hasher) = hashers[i].as_mut() else {
                    continue;
                };
                let end = (offsets[i] + 16_384 + 4_099 * i).min(blobs[i].len());
                block_on(hasher.update(&blobs[i].slice(offsets[i]..end)));
                offsets[i] = end;
                if end == blobs[i].len() {
                    hashes[i] = hashers[i].take().map(UploadHasher::finalize);
                }
            }
        }
        for (i, hash) in hashes.into_iter().enumerate() {
            assert_eq!(hash, Some(hash_of(&blobs[i])), "upload {i}");
        }
    }

    #[test]
    fn an_abandoned_upload_leaves_the_others_right() {
        let kept = blob(300_000, 1);
        let mut hasher = UploadHasher::new(DigestFunction::Sha256);
        for (n, part) in kept.chunks(65_536).enumerate() {
            let mut dropped = UploadHasher::new(DigestFunction::Sha256);
            block_on(dropped.update(&blob(65_536, n as u8)));
            block_on(hasher.update(&Bytes::copy_from_slice(part)));
            drop(dropped);
        }
        assert_eq!(hasher.finalize(), hash_of(&kept));
    }

    #[test]
    fn an_upload_moved_to_another_thread_keeps_its_order() {
        // The first chunk waits in this thread's room; the rest are hashed on another
        // thread. The waiting chunk must still come first.
        let data = blob(200_000, 9);
        let mut hasher = UploadHasher::new(DigestFunction::Sha256);
        block_on(hasher.update(&data.slice(..65_536)));
        let rest = data.slice(65_536..);
        let hash = std::thread::spawn(move || {
            block_on(hasher.update(&rest));
            hasher.finalize()
        })
        .join()
        .expect("hashing thread");
        assert_eq!(hash, hash_of(&data));
    }
}
