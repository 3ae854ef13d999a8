//! The SHA-256 compression function over two to four messages at once, with the x86
//! SHA extensions (SHA-NI).
//!
//! The state of one message lives in two registers in the order the instructions want
//! ({A,B,E,F} and {C,D,G,H}); each step of the loop below does, for every message in
//! turn, four rounds and the message-schedule words they need. The messages do not
//! depend on each other, so the core overlaps one message's round with the others'
//! instead of waiting out each `sha256rnds2`.

use std::arch::x86_64::*;
use std::sync::OnceLock;

const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

/// Whether this CPU has the instructions `compress` uses.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        is_x86_feature_detected!("sha")
            && is_x86_feature_detected!("sse2")
            && is_x86_feature_detected!("ssse3")
            && is_x86_feature_detected!("sse4.1")
    })
}

/// Compresses `data[i]` into `states[i]` for two to four messages of the same whole
/// number of blocks. Only call it when [`available`] says so.
pub fn compress(states: &mut [[u32; 8]], data: &[&[u8]]) {
    assert!(available(), "SHA extensions missing");
    assert_eq!(states.len(), data.len());
    let len = data[0].len();
    assert!(len.is_multiple_of(64) && data.iter().all(|d| d.len() == len));
    // SAFETY (all three): the CPU has the features `lanes` is compiled for (asserted
    // above), and every message holds `len` bytes, a whole number of blocks.
    match states {
        [a, b] => unsafe { lanes::<2>([a, b], [data[0], data[1]]) },
        [a, b, c] => unsafe { lanes::<3>([a, b, c], [data[0], data[1], data[2]]) },
        [a, b, c, d] => unsafe { lanes::<4>([a, b, c, d], [data[0], data[1], data[2], data[3]]) },
        _ => panic!("compress takes two to four messages, not {}", states.len()),
    }
}

/// # Safety
/// The CPU must have SHA, SSE2, SSSE3 and SSE4.1, and every `data[i]` must hold the
/// same whole number of 64-byte blocks.
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
unsafe fn lanes<const N: usize>(states: [&mut [u32; 8]; N], data: [&[u8]; N]) {
    let blocks = data[0].len() / 64;
    // Message words are big-endian: swap the bytes of each 32-bit word on load.
    let byte_swap = _mm_set_epi64x(0x0c0d0e0f_08090a0b, 0x04050607_00010203);
    let mut abef = [_mm_setzero_si128(); N];
    let mut cdgh = [_mm_setzero_si128(); N];
    for l in 0..N {
        let abcd = _mm_loadu_si128(states[l].as_ptr().cast());
        let efgh = _mm_loadu_si128(states[l].as_ptr().add(4).cast());
        let badc = _mm_shuffle_epi32(abcd, 0xB1);
        let hgfe = _mm_shuffle_epi32(efgh, 0x1B);
        abef[l] = _mm_alignr_epi8(badc, hgfe, 8);
        cdgh[l] = _mm_blend_epi16(hgfe, badc, 0xF0);
    }
    for b in 0..blocks {
        let start_abef = abef;
        let start_cdgh = cdgh;
        let mut w = [[_mm_setzero_si128(); 4]; N];
        for l in 0..N {
            let block: *const __m128i = data[l].as_ptr().add(b * 64).cast();
            for (j, word) in w[l].iter_mut().enumerate() {
                *word = _mm_shuffle_epi8(_mm_loadu_si128(block.add(j)), byte_swap);
            }
        }
        // Four rounds of every message, using schedule words 4t..4t+4 (held in
        // w[l][j], j = t % 4), computing them first from the earlier words when t >= 4.
        // A macro rather than a loop over t: with constant j the sixteen words stay in
        // registers (a loop indexed them in memory and ran 15% slower for one message,
        // 30% for two).
        macro_rules! four_rounds {
            ($t:expr, $j:expr, $schedule:expr) => {{
                let k = _mm_loadu_si128(K.as_ptr().add(4 * $t).cast());
                for l in 0..N {
                    if $schedule {
                        // W[i] = σ1(W[i-2]) + W[i-7] + σ0(W[i-15]) + W[i-16], four at a time.
                        let x = _mm_sha256msg1_epu32(w[l][$j], w[l][($j + 1) % 4]);
                        let w7 = _mm_alignr_epi8(w[l][($j + 3) % 4], w[l][($j + 2) % 4], 4);
                        w[l][$j] = _mm_sha256msg2_epu32(_mm_add_epi32(x, w7), w[l][($j + 3) % 4]);
                    }
                    let wk = _mm_add_epi32(w[l][$j], k);
                    cdgh[l] = _mm_sha256rnds2_epu32(cdgh[l], abef[l], wk);
                    abef[l] = _mm_sha256rnds2_epu32(abef[l], cdgh[l], _mm_shuffle_epi32(wk, 0x0E));
                }
            }};
        }
        four_rounds!(0, 0, false);
        four_rounds!(1, 1, false);
        four_rounds!(2, 2, false);
        four_rounds!(3, 3, false);
        for t in (4..16).step_by(4) {
            four_rounds!(t, 0, true);
            four_rounds!(t + 1, 1, true);
            four_rounds!(t + 2, 2, true);
            four_rounds!(t + 3, 3, true);
        }
        for l in 0..N {
            abef[l] = _mm_add_epi32(abef[l], start_abef[l]);
            cdgh[l] = _mm_add_epi32(cdgh[l], start_cdgh[l]);
        }
    }
    for l in 0..N {
        let feba = _mm_shuffle_epi32(abef[l], 0x1B);
        let dchg = _mm_shuffle_epi32(cdgh[l], 0xB1);
        let abcd = _mm_blend_epi16(feba, dchg, 0xF0);
        let efgh = _mm_alignr_epi8(dchg, feba, 8);
        _mm_storeu_si128(states[l].as_mut_ptr().cast(), abcd);
        _mm_storeu_si128(states[l].as_mut_ptr().add(4).cast(), efgh);
    }
}
