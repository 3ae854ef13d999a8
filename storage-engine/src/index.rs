//! The in-memory index of one partition.
//!
//! A map from 8-byte key prefix to a 16-byte location: 24 bytes a slot, plus one
//! control byte in hashbrown's SwissTable, at a load factor between 7/16 and 7/8
//! (measured per object by `bench/benches/index_memory.rs`). It is the only structure
//! FindMissingBlobs touches, and it is owned by one thread: no locks.

use hashbrown::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Where a record lives. `len` is the whole record length, saturated at `u32::MAX`
/// for records in huge segments (whose header is read first anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub seg: u32,
    pub off: u32,
    pub len: u32,
    pub flags: u8,
}

/// The record was read since it was written (or last reinserted): keep it on eviction.
pub const ACCESSED: u8 = 1;

impl Loc {
    pub fn accessed(&self) -> bool {
        self.flags & ACCESSED != 0
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

pub type Index = HashMap<u64, Loc, BuildHasherDefault<PrefixHasher>>;
