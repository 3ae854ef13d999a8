//! The in-memory index of one partition.
//!
//! A SwissTable (hashbrown) from an 8-byte key prefix to a 12-byte location. Both are
//! stored as 4-byte-aligned words so a slot is 20 bytes, plus hashbrown's one control
//! byte: 21 bytes a bucket, and with the table between 7/16 and 7/8 full that is 24–48
//! bytes an object (measured by `bench/benches/index_memory.rs`). Nothing else is kept
//! per object: the reclaimer finds a segment's records by sweeping the index, which
//! costs about a millisecond per million objects per reclaimed segment, instead of
//! keeping 8 more bytes per object in per-segment lists.
//!
//! It is the only structure FindMissingBlobs touches, and one thread owns it: no locks.

use hashbrown::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

/// The index key: a 64-bit prefix of the full key (see `key.rs`), split into two words
/// so that the slot needs only 4-byte alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix([u32; 2]);

impl Prefix {
    pub fn new(v: u64) -> Prefix {
        Prefix([v as u32, (v >> 32) as u32])
    }

    pub fn get(self) -> u64 {
        u64::from(self.0[0]) | (u64::from(self.0[1]) << 32)
    }
}

impl Hash for Prefix {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.get());
    }
}

/// Where a record lives: segment id, offset, and record length with the "accessed"
/// mark in its top bit. Lengths of 2 GiB and more (records in huge segments, whose
/// header is read first anyway) are stored as the 31-bit maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub seg: u32,
    pub off: u32,
    len_flags: u32,
}

const ACCESSED: u32 = 1 << 31;
const LEN_MASK: u32 = ACCESSED - 1;

impl Loc {
    pub fn new(seg: u32, off: u32, record_len: u64, accessed: bool) -> Loc {
        let len = record_len.min(u64::from(LEN_MASK)) as u32;
        Loc {
            seg,
            off,
            len_flags: len | if accessed { ACCESSED } else { 0 },
        }
    }

    /// The record length (saturated, see above).
    pub fn record_len(&self) -> u32 {
        self.len_flags & LEN_MASK
    }

    /// Read since it was written (or last reinserted): the reclaimer keeps it.
    pub fn accessed(&self) -> bool {
        self.len_flags & ACCESSED != 0
    }

    pub fn mark_accessed(&mut self) {
        self.len_flags |= ACCESSED;
    }

    /// Whether this is the location of a record `record_len` bytes long, as far as the
    /// stored length can tell: `None` when both lengths saturate and only the record's
    /// header can answer. A CAS prefix leaves the size out (see `key.rs`), so this is
    /// what keeps FindMissingBlobs exact for a right hash with a wrong size.
    pub fn fits(&self, record_len: u64) -> Option<bool> {
        let want = record_len.min(u64::from(LEN_MASK)) as u32;
        if want != self.record_len() {
            Some(false)
        } else if want == LEN_MASK {
            None
        } else {
            Some(true)
        }
    }
}

/// Prefixes are already uniformly distributed; hashing them again is wasted work.
#[derive(Default)]
pub struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

pub type Index = HashMap<Prefix, Loc, BuildHasherDefault<PrefixHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_is_twenty_bytes() {
        assert_eq!(std::mem::size_of::<(Prefix, Loc)>(), 20);
    }

    #[test]
    fn length_saturates_and_keeps_the_mark_apart() {
        let mut loc = Loc::new(1, 2, 5 << 30, false);
        assert_eq!(loc.record_len(), LEN_MASK);
        assert!(!loc.accessed());
        loc.mark_accessed();
        assert!(loc.accessed());
        assert_eq!(loc.record_len(), LEN_MASK);
        assert_eq!(Loc::new(1, 2, 100, true).record_len(), 100);
        assert_eq!(Loc::new(1, 2, 100, true).fits(100), Some(true));
        assert_eq!(Loc::new(1, 2, 100, true).fits(101), Some(false));
        assert_eq!(loc.fits(100), Some(false));
        assert_eq!(loc.fits(3 << 30), None);
        assert_eq!(Loc::new(1, 2, 100, false).fits(3 << 30), Some(false));
        assert_eq!(
            Prefix::new(0xDEAD_BEEF_0123_4567).get(),
            0xDEAD_BEEF_0123_4567
        );
    }
}
