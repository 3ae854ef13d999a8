//! From digests to index keys and partitions.
//!
//! The in-memory index holds 8 bytes of each key (a "prefix" mixed from hash, kind
//! and function) instead of the full 42-byte key; the full key lives in the record
//! header and is compared on every read. Two distinct keys sharing a prefix is a
//! 2^-64 event per pair: the cost is that one of them reads as missing (and
//! FindMissingBlobs could call the other present), never that wrong bytes are served.
//!
//! A CAS blob's prefix leaves its size out. The size adds nothing to a verified
//! SHA-256 or BLAKE3 hash (two blobs of one hash and different sizes would be a
//! collision), and leaving it out lets the engine find a blob by hash alone, which
//! Bazel's HTTP cache protocol needs (`GET /cas/{sha256}`): the record header then
//! tells the size. Exactness for a (hash, size) whose size is wrong is kept by
//! comparing the record length the index holds, a function of the payload length
//! (see [`crate::partition::Partition::holds`]). An AC key's size is already folded
//! into its BLAKE3 hash, so its prefix mixes it in or not to no effect; it keeps it.
//!
//! AC entries are keyed by instance name and action digest together, hashed with
//! BLAKE3 into a 32-byte record key, so that instances never see each other's results.

use crate::digest::{Digest, DigestFunction};
use crate::format::{Key, RecordKind};
use crate::index::Prefix;

pub fn cas_key(digest: &Digest) -> Key {
    Key {
        kind: RecordKind::Cas,
        function: digest.function,
        hash: digest.hash,
        size: digest.size,
    }
}

pub fn ac_key(instance: &str, action: &Digest) -> Key {
    let mut h = blake3::Hasher::new();
    h.update(b"cairn-ac\0");
    h.update(&(instance.len() as u64).to_le_bytes());
    h.update(instance.as_bytes());
    h.update(&[action.function.code()]);
    h.update(&action.hash);
    h.update(&action.size.to_le_bytes());
    Key {
        kind: RecordKind::Ac,
        function: DigestFunction::Blake3,
        hash: *h.finalize().as_bytes(),
        size: action.size,
    }
}

/// The 8-byte index key. Hash bytes are already uniform, so a cheap mix suffices.
/// A CAS key's size is left out (see the module docs); changing this function changes
/// what checkpoints hold, so it goes with a new checkpoint magic (`checkpoint.rs`).
pub fn prefix(key: &Key) -> Prefix {
    let mut first = [0u8; 8];
    first.copy_from_slice(&key.hash[..8]);
    let tag = (u64::from(key.kind.code()) << 8) | u64::from(key.function.code());
    let size = match key.kind {
        RecordKind::Cas => 0,
        _ => key.size.wrapping_mul(0x9E37_79B9_7F4A_7C15),
    };
    Prefix::new(u64::from_le_bytes(first) ^ size ^ tag.rotate_left(56))
}

/// Whether a record whose header holds `found` answers a lookup of `wanted`; with
/// `any_size`, a CAS lookup by hash alone, whatever the blob's size.
pub fn answers(found: &Key, wanted: &Key, any_size: bool) -> bool {
    if any_size {
        found.kind == wanted.kind && found.function == wanted.function && found.hash == wanted.hash
    } else {
        found == wanted
    }
}

/// The partition that owns a key. Uses hash bytes disjoint from the prefix so that the
/// index tables inside a partition stay uniformly filled.
pub fn partition_of(key: &Key, partitions: u32) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&key.hash[8..12]);
    u32::from_le_bytes(b) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ac_keys_are_namespaced_by_instance() {
        let d = Digest::of(DigestFunction::Sha256, b"action");
        assert_ne!(ac_key("a", &d), ac_key("b", &d));
        assert_ne!(ac_key("", &d).hash, cas_key(&d).hash);
        assert_eq!(ac_key("a", &d), ac_key("a", &d));
    }

    #[test]
    fn prefix_separates_functions_and_kinds() {
        let d = Digest::of(DigestFunction::Sha256, b"x");
        let mut b = d;
        b.function = DigestFunction::Blake3;
        assert_ne!(prefix(&cas_key(&d)), prefix(&cas_key(&b)));
        let mut k = cas_key(&d);
        k.kind = RecordKind::Ac;
        assert_ne!(prefix(&cas_key(&d)), prefix(&k));
    }

    #[test]
    fn cas_prefix_ignores_the_size_and_ac_prefix_does_not() {
        let d = Digest::of(DigestFunction::Sha256, b"x");
        let wrong = Digest { size: 7, ..d };
        assert_eq!(prefix(&cas_key(&d)), prefix(&cas_key(&wrong)));
        let mut a = ac_key("", &d);
        let b = a;
        a.size += 1;
        assert_ne!(prefix(&a), prefix(&b));
        assert!(answers(&cas_key(&d), &cas_key(&wrong), true));
        assert!(!answers(&cas_key(&d), &cas_key(&wrong), false));
    }
}
