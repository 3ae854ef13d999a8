//! The memory tier: verified records kept in DRAM in front of the log.
//!
//! A warm build reads again what it read a moment ago: action results, the Tree and
//! Directory messages they name, small outputs. Without this tier every such read is an
//! O_DIRECT read of the device (about 110 µs for 4 KiB on the development VM), since
//! the log bypasses the page cache. Each shard keeps one [`MemoryTier`]; a hit hands
//! out a clone of a `Bytes`, neither a copy nor a device read.
//!
//! **Who touches it.** The shard's own thread admits and invalidates; a hit is served
//! on whatever thread asked (the `Engine` handle looks the tier up before routing), so
//! the tier sits behind a lock ([`SharedTier`]). A read served by the owning shard
//! costs two cross-thread hand-offs, each a wake-up of a possibly sleeping executor:
//! with both, a tier that only the shard could read made `bazel-like-warm` 0.83 of
//! the sink and GetActionResult twice as slow as the map lookup it replaces; the lock
//! is uncontended but for the shard's own admissions (bench/README.md).
//!
//! **What may be served.** An entry is the verified payload of one record, with the
//! record's full key and its location in the log (the index [`Loc`]). The tier never
//! holds an entry the index does not point at: every change of the index drops the
//! entry it obsoletes, on the shard's thread, before anything else can happen there —
//! a record replaced by a newer one (an action result written again) or moved by
//! reinsertion ([`MemoryTier::forget_other_than`], from `Partition::insert`), a
//! segment reclaimed (the reclaimer's sweep of the index forgets each of its records)
//! and a record dropped as corrupt. A reader on another thread that took a payload
//! just before that holds a copy of bytes that were the record at the moment of its
//! lookup, never a view of a segment about to be reused. Only verified bytes enter:
//! on a read after the CRC check passed, on a write after the digest was checked and
//! the record committed (and indexed, hence durable under `Durability::Sync`);
//! records above [`ADMIT_AT_ONCE_MAX`] only on their second read. A hit
//! never reaches the index, so it cannot set the "accessed" mark the reclaimer
//! reinserts by; the entry remembers it was served instead, and the sweep that
//! forgets it counts that as an access.
//!
//! **Policy.** S3-FIFO (Yang et al., SOSP 2023), by bytes: new entries go to a small
//! FIFO of a tenth of the capacity; one read again while there moves to the main FIFO
//! when it reaches the small FIFO's head, the others leave and their keys are kept in a
//! ghost FIFO; an entry admitted again while its key is a ghost goes straight to main.
//! The main FIFO gives entries with a non-zero frequency (at most 3) another round,
//! decrementing it. A scan of one-time reads only ever passes through the small FIFO,
//! so it cannot flush the working set, which LRU lets it do; and a hit costs a counter
//! increment, no list surgery. `bench/src/bin/tier-sim.rs` replays Zipf and
//! scan-heavy traces through this very [`S3Fifo`], LRU and FIFO (table in
//! bench/README.md).
//!
//! **Memory.** Each entry is charged its payload plus [`ENTRY_OVERHEAD`], so the tier's
//! bytes bound what it really holds. The payload is copied into a buffer of its own on
//! admission: a slice of a request or read buffer would keep the whole buffer alive.

use crate::format::Key;
use crate::index::{Loc, Prefix, PrefixHasher};
use crate::key::answers;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The small FIFO's share of the capacity: one tenth, the paper's value, which its
/// traces and ours (bench/README.md) found best.
const SMALL_SHARE: u64 = 10;

/// Frequencies saturate here: two rounds more in main for an entry read often.
const MAX_FREQ: u8 = 3;

/// Records up to this size enter on their write and on their first read; larger ones
/// only on their second read (see `takes_read`). 256 KiB is the engine's
/// `small_blob_max`, what it stages whole anyway: action results, Tree and Directory
/// messages, most outputs. Above it, copying a record into memory the tier has not
/// used yet costs more than the device read it saves when the record is read once:
/// `scripts/bench.sh` measured `bazel-like` at 0.33–0.48 of the sink cold and
/// 0.58–0.67 warm with outputs up to 4 MiB admitted on write, against 0.63 / 0.53
/// with no tier at all, the node's CPU going to first-touch page faults
/// (`clear_page_erms` 42% of its samples). A blob read over and over (bs-read's 16 MiB
/// working set) is admitted at its second read and served from memory after that.
pub const ADMIT_AT_ONCE_MAX: u64 = 256 << 10;

/// Keys of large records read once, remembered for `takes_read`: 4,096 of them, about
/// 100 KiB a shard.
const SEEN_KEYS: usize = 4096;

/// Bytes charged per entry beyond its payload: the entry (full key, location, `Bytes`
/// handle, size, frequency, id: 120 bytes) in a hash map kept between 7/16 and 7/8
/// full, about 140–280 bytes a slot with the key, plus its place in a FIFO (24 bytes,
/// at most twice with a stale one waiting to be skipped) and the allocator's header of
/// the payload buffer. 320 covers the worst case; the ghost FIFO, at most one key per
/// entry of the main FIFO (48 bytes with its map slot), comes on top of the capacity.
pub const ENTRY_OVERHEAD: u64 = 320;

/// Hit, miss, admission and eviction counts of one cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub hits: u64,
    pub misses: u64,
    pub admissions: u64,
    pub evictions: u64,
}

struct Slot<V> {
    value: V,
    size: u64,
    freq: u8,
    /// Tells this slot's FIFO position from a stale one left by a removal.
    id: u64,
    in_main: bool,
}

/// S3-FIFO over keys `K` and values `V` with a byte size each (see the module docs).
/// Removal leaves the key's FIFO position behind, skipped when it reaches the head;
/// the FIFOs are compacted when stale positions outnumber live ones.
pub struct S3Fifo<K, V> {
    capacity: u64,
    small_target: u64,
    map: HashMap<K, Slot<V>, BuildHasherDefault<KeyHasher>>,
    small: VecDeque<(K, u64)>,
    main: VecDeque<(K, u64)>,
    small_bytes: u64,
    main_bytes: u64,
    main_len: usize,
    ghost: HashMap<K, u64, BuildHasherDefault<KeyHasher>>,
    ghost_fifo: VecDeque<(K, u64)>,
    next_id: u64,
    counts: Counts,
}

impl<K: Hash + Eq + Copy, V> S3Fifo<K, V> {
    pub fn new(capacity: u64) -> Self {
        S3Fifo {
            capacity,
            small_target: capacity / SMALL_SHARE,
            map: HashMap::default(),
            small: VecDeque::new(),
            main: VecDeque::new(),
            small_bytes: 0,
            main_bytes: 0,
            main_len: 0,
            ghost: HashMap::default(),
            ghost_fifo: VecDeque::new(),
            next_id: 0,
            counts: Counts::default(),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes charged for the entries held.
    pub fn bytes(&self) -> u64 {
        self.small_bytes + self.main_bytes
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// The entry of `key`, counted as a hit and as one more use; a miss is counted.
    pub fn get(&mut self, key: &K) -> Option<&mut V> {
        match self.map.get_mut(key) {
            Some(slot) => {
                self.counts.hits += 1;
                slot.freq = (slot.freq + 1).min(MAX_FREQ);
                Some(&mut slot.value)
            }
            None => {
                self.counts.misses += 1;
                None
            }
        }
    }

    /// The entry of `key`, without counting anything.
    pub fn peek(&self, key: &K) -> Option<&V> {
        self.map.get(key).map(|s| &s.value)
    }

    /// Counts a miss for a lookup that found an entry it could not use.
    pub fn count_miss(&mut self) {
        self.counts.misses += 1;
    }

    /// Admits `value` under `key`, charged `size` bytes, evicting what no longer fits.
    /// A value already held under `key` is replaced in its place. Returns false (and
    /// keeps nothing) when `size` is over a tenth of the capacity, which the small FIFO
    /// could not hold.
    pub fn insert(&mut self, key: K, value: V, size: u64) -> bool {
        if size > self.small_target || size == 0 {
            return false;
        }
        self.counts.admissions += 1;
        if let Some(slot) = self.map.get_mut(&key) {
            let old = std::mem::replace(&mut slot.size, size);
            slot.value = value;
            let bytes = if slot.in_main {
                &mut self.main_bytes
            } else {
                &mut self.small_bytes
            };
            *bytes = *bytes - old + size;
        } else {
            let id = self.next_id;
            self.next_id += 1;
            let in_main = self.ghost.remove(&key).is_some();
            if in_main {
                self.main.push_back((key, id));
                self.main_bytes += size;
                self.main_len += 1;
            } else {
                self.small.push_back((key, id));
                self.small_bytes += size;
            }
            self.map.insert(
                key,
                Slot {
                    value,
                    size,
                    freq: 0,
                    id,
                    in_main,
                },
            );
        }
        while self.bytes() > self.capacity {
            if self.small_bytes > self.small_target || self.main_len == 0 {
                self.evict_small();
            } else {
                self.evict_main();
            }
        }
        self.compact();
        true
    }

    /// Removes `key`'s entry (not counted as an eviction).
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let slot = self.map.remove(key)?;
        self.unaccount(&slot);
        Some(slot.value)
    }

    fn unaccount(&mut self, slot: &Slot<V>) {
        if slot.in_main {
            self.main_bytes -= slot.size;
            self.main_len -= 1;
        } else {
            self.small_bytes -= slot.size;
        }
    }

    /// The live slot a FIFO position names, if it is not stale.
    fn live(&mut self, key: &K, id: u64) -> Option<&mut Slot<V>> {
        self.map.get_mut(key).filter(|s| s.id == id)
    }

    fn evict_small(&mut self) {
        while let Some((key, id)) = self.small.pop_front() {
            let Some(slot) = self.live(&key, id) else {
                continue;
            };
            if slot.in_main {
                continue;
            }
            if slot.freq > 0 {
                slot.in_main = true;
                slot.freq = 0;
                let size = slot.size;
                self.small_bytes -= size;
                self.main_bytes += size;
                self.main_len += 1;
                self.main.push_back((key, id));
                return;
            }
            if let Some(slot) = self.map.remove(&key) {
                self.small_bytes -= slot.size;
                self.counts.evictions += 1;
                self.remember(key);
            }
            return;
        }
    }

    fn evict_main(&mut self) {
        while let Some((key, id)) = self.main.pop_front() {
            let Some(slot) = self.live(&key, id) else {
                continue;
            };
            if slot.freq > 0 {
                slot.freq -= 1;
                self.main.push_back((key, id));
                continue;
            }
            if let Some(slot) = self.map.remove(&key) {
                self.main_bytes -= slot.size;
                self.main_len -= 1;
                self.counts.evictions += 1;
            }
            return;
        }
    }

    /// Keeps `key` as a ghost; the ghost FIFO holds as many keys as main holds entries.
    fn remember(&mut self, key: K) {
        let id = self.next_id;
        self.next_id += 1;
        self.ghost.insert(key, id);
        self.ghost_fifo.push_back((key, id));
        while self.ghost.len() > self.main_len.max(1) {
            let Some((old, old_id)) = self.ghost_fifo.pop_front() else {
                break;
            };
            if self.ghost.get(&old) == Some(&old_id) {
                self.ghost.remove(&old);
            }
        }
    }

    /// Drops stale FIFO positions once they outnumber the live ones, so removals
    /// cannot make the FIFOs grow without bound.
    fn compact(&mut self) {
        let live = self.map.len();
        if self.small.len() + self.main.len() > 2 * live + 64 {
            let map = &self.map;
            let fresh = |(k, id): &(K, u64)| map.get(k).is_some_and(|s| s.id == *id);
            self.small.retain(|e| fresh(e) && !map[&e.0].in_main);
            self.main.retain(|e| fresh(e) && map[&e.0].in_main);
        }
        if self.ghost_fifo.len() > 2 * self.ghost.len() + 64 {
            let ghost = &self.ghost;
            self.ghost_fifo
                .retain(|(k, id)| ghost.get(k).is_some_and(|g| g == id));
        }
    }
}

/// Hashes keys that are already uniformly distributed (index prefixes, digests in the
/// simulation) by folding their words, as [`PrefixHasher`] does for the index.
#[derive(Default)]
pub struct KeyHasher(PrefixHasher);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0.finish()
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }

    fn write_u32(&mut self, v: u32) {
        self.0
            .write_u64(self.0.finish() ^ u64::from(v).rotate_left(32));
    }

    fn write_u64(&mut self, v: u64) {
        self.0.write_u64(self.0.finish() ^ v);
    }
}

/// An entry's key: the partition and the record's index prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TierKey {
    part: u32,
    prefix: u64,
}

impl TierKey {
    pub fn new(part: u32, prefix: Prefix) -> TierKey {
        TierKey {
            part,
            prefix: prefix.get(),
        }
    }
}

struct Entry {
    key: Key,
    loc: Loc,
    payload: Bytes,
    /// Served since it was admitted: a read the index's "accessed" mark never saw,
    /// since a hit does not reach the shard (see `forget`).
    read: bool,
}

/// One shard's memory tier: verified payloads by partition and index prefix.
pub struct MemoryTier {
    cache: S3Fifo<TierKey, Entry>,
    max_object: u64,
    /// Large records read once and not admitted (`takes_read`), oldest first.
    seen: HashMap<TierKey, (), BuildHasherDefault<KeyHasher>>,
    seen_order: VecDeque<TierKey>,
}

/// A shard's memory tier as `/metrics` shows it.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryTierStats {
    pub shard: usize,
    pub capacity_bytes: u64,
    /// Bytes charged for what it holds (payloads plus [`ENTRY_OVERHEAD`] each).
    pub bytes: u64,
    pub entries: u64,
    pub hits: u64,
    pub misses: u64,
    pub admissions: u64,
    pub evictions: u64,
}

/// Whether two locations name the same record, whatever their "accessed" marks.
fn same_record(a: &Loc, b: &Loc) -> bool {
    a.seg == b.seg && a.off == b.off && a.record_len() == b.record_len()
}

impl MemoryTier {
    /// A tier of `capacity` bytes (0: off). It takes payloads up to a sixteenth of
    /// the capacity: big enough for the 16 MiB blobs of a build's larger outputs at
    /// the default size, small enough that one admission displaces little, and within
    /// the small FIFO's tenth.
    pub fn new(capacity: u64) -> MemoryTier {
        MemoryTier {
            cache: S3Fifo::new(capacity),
            max_object: max_object(capacity),
            seen: HashMap::default(),
            seen_order: VecDeque::new(),
        }
    }

    /// Whether a payload of `len` bytes fits the tier at all.
    pub fn takes(&self, len: u64) -> bool {
        fits(len, self.max_object)
    }

    /// Whether the record at `prefix`, `len` bytes, being read should be kept: a small
    /// one at once, a large one if it was read before (remembered by this call).
    pub fn takes_read(&mut self, part: u32, prefix: Prefix, len: u64) -> bool {
        if !self.takes(len) {
            return false;
        }
        if len <= ADMIT_AT_ONCE_MAX {
            return true;
        }
        let tk = TierKey::new(part, prefix);
        if self.seen.remove(&tk).is_some() {
            return true;
        }
        self.seen.insert(tk, ());
        self.seen_order.push_back(tk);
        while self.seen_order.len() > SEEN_KEYS {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
        false
    }

    /// The payload held for `key` (found by hash alone with `any_size`), counted as
    /// a hit or a miss. What is held is what the index holds right now: every change
    /// of the index drops the entry it replaces (see the module docs).
    pub fn get(&mut self, part: u32, prefix: Prefix, key: &Key, any_size: bool) -> Option<Bytes> {
        if self.cache.is_empty() {
            self.cache.count_miss();
            return None;
        }
        let tk = TierKey::new(part, prefix);
        let answers_key = self
            .cache
            .peek(&tk)
            .is_some_and(|e| answers(&e.key, key, any_size));
        if !answers_key {
            self.cache.count_miss();
            return None;
        }
        self.cache.get(&tk).map(|e| {
            e.read = true;
            e.payload.clone()
        })
    }

    /// Like `get`, without counting: for the shard, which reads the log after the
    /// caller's counted lookup missed, in case a concurrent read admitted it since.
    pub fn peek(&self, part: u32, prefix: Prefix, key: &Key, any_size: bool) -> Option<Bytes> {
        self.cache
            .peek(&TierKey::new(part, prefix))
            .filter(|e| answers(&e.key, key, any_size))
            .map(|e| e.payload.clone())
    }

    /// Whether the tier holds exactly `key` (FindMissingBlobs), without counting.
    pub fn holds_key(&self, part: u32, prefix: Prefix, key: &Key) -> bool {
        self.cache
            .peek(&TierKey::new(part, prefix))
            .is_some_and(|e| answers(&e.key, key, false))
    }

    /// Admits the verified payload of the record `key` at `loc`, in a buffer of its
    /// own (see the module docs). The caller checked that the index points at `loc`.
    pub fn admit(&mut self, part: u32, prefix: Prefix, loc: Loc, key: Key, payload: Bytes) {
        if !self.takes(payload.len() as u64) {
            return;
        }
        let tk = TierKey::new(part, prefix);
        let charge = payload.len() as u64 + ENTRY_OVERHEAD;
        let entry = Entry {
            key,
            loc,
            payload,
            read: false,
        };
        self.cache.insert(tk, entry, charge);
    }

    /// Whether the tier holds the record at `loc` for `prefix`.
    pub fn holds(&self, part: u32, prefix: Prefix, loc: &Loc) -> bool {
        self.cache
            .peek(&TierKey::new(part, prefix))
            .is_some_and(|e| same_record(&e.loc, loc))
    }

    /// Drops the entry of the record at `loc`, if it is the one held for `prefix`.
    /// Returns whether that entry was served since it was admitted, which the
    /// reclaimer counts as an access when it decides what to reinsert.
    pub fn forget(&mut self, part: u32, prefix: Prefix, loc: &Loc) -> bool {
        if self.holds(part, prefix, loc) {
            return self
                .cache
                .remove(&TierKey::new(part, prefix))
                .is_some_and(|e| e.read);
        }
        false
    }

    /// Drops the entry held for `prefix` unless it is the record at `loc`: the index
    /// now points there, and whatever the entry held was replaced.
    pub fn forget_other_than(&mut self, part: u32, prefix: Prefix, loc: &Loc) {
        let tk = TierKey::new(part, prefix);
        if self
            .cache
            .peek(&tk)
            .is_some_and(|e| !same_record(&e.loc, loc))
        {
            self.cache.remove(&tk);
        }
    }

    pub fn stats(&self, shard: usize) -> MemoryTierStats {
        let c = self.cache.counts();
        MemoryTierStats {
            shard,
            capacity_bytes: self.cache.capacity(),
            bytes: self.cache.bytes(),
            entries: self.cache.len() as u64,
            hits: c.hits,
            misses: c.misses,
            admissions: c.admissions,
            evictions: c.evictions,
        }
    }
}

/// A shard's tier as every thread sees it: the shard admits and invalidates, any
/// thread serves a hit. Cheap to clone.
#[derive(Clone)]
pub struct SharedTier {
    tier: Arc<Mutex<MemoryTier>>,
    /// The tier's fixed [`MemoryTier::takes`] limit, so that writers can skip copying
    /// a payload it would refuse without taking the lock for it.
    max_object: u64,
}

impl SharedTier {
    pub fn new(capacity: u64) -> SharedTier {
        SharedTier {
            tier: Arc::new(Mutex::new(MemoryTier::new(capacity))),
            max_object: max_object(capacity),
        }
    }

    /// The tier, locked. A thread that panicked while holding it cannot have left an
    /// entry half-made (every change is one map operation on owned values), so a
    /// poisoned lock is taken over rather than taking the node down with it.
    pub fn lock(&self) -> MutexGuard<'_, MemoryTier> {
        self.tier.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// [`MemoryTier::takes`], without the lock.
    pub fn takes(&self, len: u64) -> bool {
        fits(len, self.max_object)
    }

    /// Whether a record of `len` bytes just written should enter (see
    /// [`ADMIT_AT_ONCE_MAX`]).
    pub fn takes_written(&self, len: u64) -> bool {
        len <= ADMIT_AT_ONCE_MAX && self.takes(len)
    }
}

/// The largest payload a tier of `capacity` bytes takes (see [`MemoryTier::new`]).
fn max_object(capacity: u64) -> u64 {
    (capacity / 16).saturating_sub(ENTRY_OVERHEAD)
}

fn fits(len: u64, max_object: u64) -> bool {
    len > 0 && len <= max_object
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::DigestFunction;
    use crate::format::RecordKind;

    fn key(n: u8) -> Key {
        Key {
            kind: RecordKind::Cas,
            function: DigestFunction::Sha256,
            hash: [n; 32],
            size: 3,
        }
    }

    #[test]
    fn a_scan_does_not_flush_the_working_set() {
        let mut c: S3Fifo<u64, ()> = S3Fifo::new(100);
        for k in 0..50 {
            c.insert(k, (), 1);
            c.get(&k);
        }
        for k in 1000..2000 {
            c.insert(k, (), 1);
        }
        let kept = (0..50).filter(|k| c.peek(k).is_some()).count();
        assert_eq!(kept, 50, "a one-time scan evicted the hot set");
        assert!(c.bytes() <= 100);
    }

    #[test]
    fn bytes_never_exceed_the_capacity() {
        let mut c: S3Fifo<u64, ()> = S3Fifo::new(1000);
        for k in 0..10_000u64 {
            c.insert(k % 700, (), 1 + k % 97);
            if k % 3 == 0 {
                c.get(&(k / 2 % 700));
            }
            if k % 11 == 0 {
                c.remove(&(k % 300));
            }
            assert!(c.bytes() <= 1000);
        }
        let held: u64 = (0..700).filter(|k| c.peek(k).is_some()).count() as u64;
        assert_eq!(held, c.len() as u64);
        assert!(c.small.len() + c.main.len() <= 2 * c.len() + 64 + 1);
    }

    #[test]
    fn a_large_record_is_taken_on_its_second_read_only() {
        let shared = SharedTier::new(1 << 30);
        let mut t = MemoryTier::new(1 << 30);
        let big = ADMIT_AT_ONCE_MAX + 1;
        assert!(shared.takes_written(4096) && t.takes_read(0, Prefix::new(1), 4096));
        assert!(!shared.takes_written(big) && shared.takes(big));
        assert!(!t.takes_read(0, Prefix::new(2), big));
        assert!(t.takes_read(0, Prefix::new(2), big));
        assert!(!t.takes_read(0, Prefix::new(3), big));
        for k in 10..10 + SEEN_KEYS as u64 {
            t.takes_read(0, Prefix::new(k), big);
        }
        assert!(t.seen.len() <= SEEN_KEYS && t.seen_order.len() <= SEEN_KEYS);
        assert!(
            !t.takes_read(0, Prefix::new(3), big),
            "a key read long ago was still remembered"
        );
    }

    #[test]
    fn a_ghost_comes_back_into_main() {
        let mut c: S3Fifo<u64, ()> = S3Fifo::new(20);
        for k in 0..10 {
            c.insert(k, (), 1);
            c.get(&k);
        }
        // Keys from 100 pass through the small FIFO unread and become ghosts.
        for k in 100..120 {
            c.insert(k, (), 1);
        }
        assert!(c.peek(&100).is_none());
        assert!(c.ghost.contains_key(&100));
        c.insert(100, (), 1);
        assert!(
            c.map[&100].in_main,
            "a ghost re-admitted went to the small FIFO"
        );
    }

    #[test]
    fn oversized_values_are_refused() {
        let mut c: S3Fifo<u64, ()> = S3Fifo::new(100);
        assert!(!c.insert(1, (), 11));
        assert!(c.insert(1, (), 10));
        assert_eq!(c.bytes(), 10);
    }

    #[test]
    fn a_replaced_record_is_dropped_and_a_moved_one_kept() {
        let mut t = MemoryTier::new(1 << 20);
        let p = Prefix::new(7);
        let at = Loc::new(3, 4096, 75, false);
        t.admit(0, p, at, key(1), Bytes::from_static(b"abc"));
        // The index marking the record accessed is the same record.
        let marked = {
            let mut l = at;
            l.mark_accessed();
            l
        };
        t.forget_other_than(0, p, &marked);
        assert_eq!(t.get(0, p, &key(1), false).as_deref(), Some(&b"abc"[..]));
        // Replaced (a newer record for the key) or moved (reinserted elsewhere).
        t.forget_other_than(0, p, &Loc::new(9, 0, 75, false));
        assert!(!t.holds(0, p, &at), "a replaced entry was kept");
        assert!(t.get(0, p, &key(1), false).is_none());
    }

    #[test]
    fn another_key_sharing_the_prefix_is_not_served() {
        let mut t = MemoryTier::new(1 << 20);
        let p = Prefix::new(7);
        let at = Loc::new(3, 0, 75, false);
        t.admit(0, p, at, key(1), Bytes::from_static(b"abc"));
        assert!(t.get(0, p, &key(2), false).is_none());
        assert!(!t.holds_key(0, p, &key(2)));
        assert!(t.get(1, p, &key(1), false).is_none(), "another partition");
        let any = Key { size: 0, ..key(1) };
        assert!(t.get(0, p, &any, true).is_some());
        assert!(
            !t.holds_key(0, p, &any),
            "FindMissingBlobs asks for the exact size"
        );
    }

    #[test]
    fn forgetting_a_served_entry_reports_the_read() {
        let mut t = MemoryTier::new(1 << 20);
        let (p, q) = (Prefix::new(1), Prefix::new(2));
        let (at, other) = (Loc::new(3, 0, 75, false), Loc::new(3, 4096, 75, false));
        t.admit(0, p, at, key(1), Bytes::from_static(b"abc"));
        t.admit(0, q, other, key(2), Bytes::from_static(b"def"));
        assert!(t.get(0, p, &key(1), false).is_some());
        assert!(t.forget(0, p, &at), "a hit the index never saw was lost");
        assert!(
            !t.forget(0, q, &other),
            "an entry never read counted as read"
        );
    }

    #[test]
    fn a_reclaimed_segment_leaves_the_tier() {
        let mut t = MemoryTier::new(1 << 20);
        t.admit(
            0,
            Prefix::new(1),
            Loc::new(3, 0, 75, false),
            key(1),
            Bytes::from_static(b"abc"),
        );
        t.admit(
            0,
            Prefix::new(2),
            Loc::new(4, 0, 75, false),
            key(2),
            Bytes::from_static(b"def"),
        );
        t.admit(
            1,
            Prefix::new(3),
            Loc::new(3, 0, 75, false),
            key(3),
            Bytes::from_static(b"ghi"),
        );
        // What the reclaimer does for each record of segment 3 of partition 0.
        t.forget(0, Prefix::new(1), &Loc::new(3, 0, 75, false));
        t.forget(0, Prefix::new(3), &Loc::new(3, 0, 75, false));
        assert!(!t.holds(0, Prefix::new(1), &Loc::new(3, 0, 75, false)));
        assert!(t.holds(0, Prefix::new(2), &Loc::new(4, 0, 75, false)));
        assert!(t.holds(1, Prefix::new(3), &Loc::new(3, 0, 75, false)));
        assert_eq!(t.stats(0).bytes, 2 * (3 + ENTRY_OVERHEAD));
    }

    #[test]
    fn a_tier_of_zero_bytes_holds_nothing() {
        let mut t = MemoryTier::new(0);
        let at = Loc::new(3, 0, 75, false);
        t.admit(0, Prefix::new(1), at, key(1), Bytes::from_static(b"abc"));
        assert!(t.get(0, Prefix::new(1), &key(1), false).is_none());
        assert_eq!(t.stats(0).entries, 0);
    }
}
