//! SHA-256 that can hash several independent messages in one pass.
//!
//! Every byte a client uploads is hashed before the blob becomes visible, and SHA-256 is
//! most of a large upload's CPU time (38% of the node's samples under `bs-write`). One
//! SHA-256 stream is a chain of dependent rounds: on a core with the SHA extensions each
//! `sha256rnds2` waits for the one before, and the SHA unit idles most of the time.
//! Hashing the blocks of up to four unrelated messages in the same loop fills those
//! gaps. Measured on this project's 2-core EPYC (SHA-NI) with 64 KiB messages
//! (`cargo bench -p cairn-bench --bench sha256_lanes`):
//!
//! | messages at once | GiB/s per core |
//! |------------------|----------------|
//! | 1 (`sha2`)       | 1.68           |
//! | 2                | 3.11           |
//! | 3                | 3.46           |
//! | 4                | 3.30           |
//!
//! Four is not faster per byte than three (the sixteen SSE registers run out), but
//! four at once (74 µs) beats three and then one (53 + 36 µs), so a pass takes up to
//! four. [`Sha256`] is the streaming state; [`update_together`] advances several of
//! them at once. A single message, and every CPU without the SHA extensions, goes
//! through `sha2`'s compression function, so the result never depends on the path.

use sha2::digest::generic_array::GenericArray;

const BLOCK: usize = 64;

/// Most messages [`update_together`] hashes in one pass.
pub const LANES: usize = 4;

const INITIAL: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// An incremental SHA-256.
#[derive(Clone)]
pub struct Sha256 {
    state: [u32; 8],
    /// Bytes of an incomplete block, waiting for the rest of it.
    tail: [u8; BLOCK],
    tail_len: usize,
    /// Bytes absorbed, for the final padding.
    len: u64,
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256 {
            state: INITIAL,
            tail: [0; BLOCK],
            tail_len: 0,
            len: 0,
        }
    }
}

impl Sha256 {
    pub fn update(&mut self, data: &[u8]) {
        self.len = self.len.wrapping_add(data.len() as u64);
        let (whole, tail) = self.split(data);
        compress_blocks(&mut self.state, whole);
        self.keep_tail(tail);
    }

    pub fn finalize(mut self) -> [u8; 32] {
        let bits = self.len.wrapping_mul(8);
        let mut pad = [0u8; 2 * BLOCK];
        pad[0] = 0x80;
        // The padding ends the message on a block boundary, with the length in its
        // last eight bytes: one block if the tail leaves room for 0x80 and the length,
        // two otherwise.
        let pad_len = if self.tail_len < BLOCK - 8 {
            BLOCK - self.tail_len
        } else {
            2 * BLOCK - self.tail_len
        };
        pad[pad_len - 8..pad_len].copy_from_slice(&bits.to_be_bytes());
        let (whole, tail) = self.split(&pad[..pad_len]);
        compress_blocks(&mut self.state, whole);
        debug_assert!(tail.is_empty() && self.tail_len == 0);
        let mut out = [0u8; 32];
        for (bytes, word) in out.chunks_exact_mut(4).zip(self.state) {
            bytes.copy_from_slice(&word.to_be_bytes());
        }
        out
    }

    /// Completes an incomplete tail block from the front of `data` (compressing it if
    /// that fills it), then splits the rest into whole blocks and a new tail.
    fn split<'d>(&mut self, data: &'d [u8]) -> (&'d [u8], &'d [u8]) {
        let mut data = data;
        if self.tail_len > 0 {
            let take = (BLOCK - self.tail_len).min(data.len());
            self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&data[..take]);
            self.tail_len += take;
            data = &data[take..];
            if self.tail_len < BLOCK {
                return (&[], &[]);
            }
            let block = self.tail;
            compress_blocks(&mut self.state, &block);
            self.tail_len = 0;
        }
        data.split_at(data.len() - data.len() % BLOCK)
    }

    fn keep_tail(&mut self, tail: &[u8]) {
        debug_assert!(self.tail_len + tail.len() < BLOCK);
        self.tail[self.tail_len..self.tail_len + tail.len()].copy_from_slice(tail);
        self.tail_len += tail.len();
    }
}

/// Feeds each hasher its data, hashing the whole blocks of up to [`LANES`] of them at a
/// time. The result for each is what `update` alone would give.
pub fn update_together<'d>(items: &mut [(&mut Sha256, &'d [u8])]) {
    let mut tails: Vec<&'d [u8]> = Vec::with_capacity(items.len());
    let mut blocks: Vec<(usize, &'d [u8])> = Vec::with_capacity(items.len());
    for (i, (hasher, data)) in items.iter_mut().enumerate() {
        let data: &'d [u8] = data;
        hasher.len = hasher.len.wrapping_add(data.len() as u64);
        let (whole, tail) = hasher.split(data);
        tails.push(tail);
        if !whole.is_empty() {
            blocks.push((i, whole));
        }
    }
    while !blocks.is_empty() {
        let group = blocks.len().min(LANES);
        let step = blocks[..group]
            .iter()
            .map(|(_, b)| b.len())
            .min()
            .unwrap_or(0);
        compress_group(items, &blocks[..group], step);
        for entry in &mut blocks[..group] {
            entry.1 = &entry.1[step..];
        }
        blocks.retain(|(_, b)| !b.is_empty());
    }
    for ((hasher, _), tail) in items.iter_mut().zip(tails) {
        hasher.keep_tail(tail);
    }
}

/// Whether [`update_together`] is faster than hashing one message after another: it is
/// where the CPU has the SHA extensions.
pub fn hashes_together() -> bool {
    #[cfg(target_arch = "x86_64")]
    return x86::available();
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// Compresses the first `len` bytes of each message in `group` into its hasher.
fn compress_group(items: &mut [(&mut Sha256, &[u8])], group: &[(usize, &[u8])], len: usize) {
    #[cfg(target_arch = "x86_64")]
    if group.len() > 1 && x86::available() {
        let mut states: Vec<[u32; 8]> = group.iter().map(|(i, _)| items[*i].0.state).collect();
        let data: Vec<&[u8]> = group.iter().map(|(_, b)| &b[..len]).collect();
        x86::compress(&mut states, &data);
        for ((i, _), state) in group.iter().zip(states) {
            items[*i].0.state = state;
        }
        return;
    }
    for (i, b) in group {
        compress_blocks(&mut items[*i].0.state, &b[..len]);
    }
}

/// Compresses whole blocks with `sha2` (its SHA-NI path where the CPU has one).
fn compress_blocks(state: &mut [u32; 8], data: &[u8]) {
    debug_assert_eq!(data.len() % BLOCK, 0);
    let blocks: &[GenericArray<u8, sha2::digest::consts::U64>] =
        // SAFETY: `GenericArray<u8, U64>` is `repr(transparent)` over `[u8; 64]`, with
        // alignment 1, and `data` holds exactly `data.len() / 64` such arrays.
        unsafe { std::slice::from_raw_parts(data.as_ptr().cast(), data.len() / BLOCK) };
    sha2::compress256(state, blocks);
}

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    fn reference(data: &[u8]) -> [u8; 32] {
        sha2::Sha256::digest(data).into()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 7) as u8)
            .collect()
    }

    /// The lanes tests below pass on any CPU, but without the SHA extensions they only
    /// exercise the one-message fallback. Say so rather than pass unseen; a machine
    /// known to lack them opts out with CAIRN_TEST_WITHOUT_SHA_NI=1.
    #[test]
    fn the_multi_lane_kernel_is_exercised_on_this_cpu() {
        if std::env::var_os("CAIRN_TEST_WITHOUT_SHA_NI").is_some() {
            eprintln!("CAIRN_TEST_WITHOUT_SHA_NI is set: the SHA-NI lanes go untested");
            return;
        }
        assert!(
            hashes_together(),
            "this CPU lacks the x86 SHA extensions, so the multi-lane SHA-256 kernel \
             (sha256/x86.rs) is not tested here; run the suite on a CPU with SHA-NI, or \
             set CAIRN_TEST_WITHOUT_SHA_NI=1 to accept that"
        );
    }

    #[test]
    fn every_length_around_the_padding_boundaries_matches_sha2() {
        for len in 0..=3 * BLOCK + 1 {
            let data = pattern(len, 7);
            let mut h = Sha256::default();
            h.update(&data);
            assert_eq!(h.finalize(), reference(&data), "length {len}");
        }
    }

    #[test]
    fn feeding_in_odd_pieces_gives_the_same_hash() {
        let data = pattern(10_000, 3);
        for piece in [1, 7, 63, 64, 65, 1000] {
            let mut h = Sha256::default();
            for part in data.chunks(piece) {
                h.update(part);
            }
            assert_eq!(h.finalize(), reference(&data), "pieces of {piece}");
        }
    }

    #[test]
    fn hashing_messages_together_gives_each_its_own_hash() {
        // Up to six messages of different lengths (more than LANES, with unequal block
        // counts and tails), fed together in rounds of unequal pieces.
        let messages: Vec<Vec<u8>> = [70_000, 64, 0, 1_000_001, 4_097, 129]
            .iter()
            .enumerate()
            .map(|(i, &len)| pattern(len, i as u8))
            .collect();
        for count in 1..=messages.len() {
            let mut hashers: Vec<Sha256> = vec![Sha256::default(); count];
            let mut offsets = vec![0usize; count];
            let mut round = 0;
            while offsets.iter().zip(&messages).any(|(o, m)| *o < m.len()) {
                round += 1;
                let mut items: Vec<(&mut Sha256, &[u8])> = Vec::new();
                for (i, h) in hashers.iter_mut().enumerate() {
                    let piece = 3_000 * (i + 1) + 17 * round;
                    let end = (offsets[i] + piece).min(messages[i].len());
                    items.push((h, &messages[i][offsets[i]..end]));
                    offsets[i] = end;
                }
                update_together(&mut items);
            }
            for (i, h) in hashers.into_iter().enumerate() {
                assert_eq!(
                    h.finalize(),
                    reference(&messages[i]),
                    "{count} messages, #{i}"
                );
            }
        }
    }
}
