//! The zstd stream decoder of `compressed-blobs/zstd` uploads against the reference
//! decoder, fed in arbitrary pieces.
//!
//! Input layout: byte 0 picks the mode, byte 1 and 2 the piece sizes, the rest is data.
//! - mode even: the data is a compressed stream as a client might send it. Whatever
//!   the reference decoder makes of it (up to [`LIMIT`] bytes), the stream decoder
//!   must agree: the same bytes when it succeeds, an error when it fails. The one
//!   deliberate difference: no bytes at all decode to no bytes (the reference reader
//!   calls that an incomplete frame), which is harmless since the digest decides.
//!   And frames of zstd's pre-1.0 formats (magic 0xFD2FB522 to 0xFD2FB527), which
//!   the reference decoder still reads and the stream decoder refuses: REAPI's zstd
//!   is the standard format, and refusing costs a client nothing it could rely on.
//! - mode odd: the data is plain bytes; the reference encoder compresses them (level,
//!   content size and checksum from the mode byte) and the stream decoder must give
//!   them back exactly, however the frame is cut.
#![no_main]

#[path = "../../common/src/error.rs"]
#[allow(dead_code)]
mod error;
#[path = "../../src/zstd_stream.rs"]
#[allow(dead_code)]
mod zstd_stream;

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use zstd_stream::Decompressor;

/// Most plain bytes either decoder is allowed to produce for one input.
const LIMIT: usize = 8 << 20;

/// Decodes `compressed` in pieces of the sizes `cuts` cycles through, stopping with
/// `None` once the output passes [`LIMIT`].
fn stream_decode(compressed: &[u8], cuts: [usize; 2]) -> Option<Result<Vec<u8>, String>> {
    let mut decompressor = match Decompressor::new() {
        Ok(decompressor) => decompressor,
        Err(error) => return Some(Err(error.to_string())),
    };
    let mut plain = Vec::new();
    let mut start = 0;
    let mut turn = 0;
    while start < compressed.len() {
        let end = (start + cuts[turn % 2]).min(compressed.len());
        turn += 1;
        let piece = &compressed[start..end];
        let mut consumed = 0;
        loop {
            match decompressor.step(piece, &mut consumed) {
                Ok(Some(out)) => {
                    plain.extend_from_slice(&out);
                    if plain.len() > LIMIT {
                        return None;
                    }
                }
                Ok(None) => break,
                Err(error) => return Some(Err(error.to_string())),
            }
        }
        assert_eq!(consumed, piece.len(), "the decoder left input unread");
        start = end;
    }
    Some(
        decompressor
            .finish()
            .map(|()| plain)
            .map_err(|e| e.to_string()),
    )
}

/// The reference decoder's answer, or `None` past [`LIMIT`].
fn reference_decode(compressed: &[u8]) -> Option<Result<Vec<u8>, String>> {
    let decoder = match zstd::stream::read::Decoder::new(compressed) {
        Ok(decoder) => decoder,
        Err(error) => return Some(Err(error.to_string())),
    };
    let mut plain = Vec::new();
    match decoder.take(LIMIT as u64 + 1).read_to_end(&mut plain) {
        Ok(_) if plain.len() > LIMIT => None,
        Ok(_) => Some(Ok(plain)),
        Err(error) => Some(Err(error.to_string())),
    }
}

/// Whether `data` starts with the magic number of a pre-1.0 zstd frame.
fn is_legacy_frame(data: &[u8]) -> bool {
    data.get(..4)
        .and_then(|magic| <[u8; 4]>::try_from(magic).ok())
        .map(u32::from_le_bytes)
        .is_some_and(|magic| (0xFD2F_B522..=0xFD2F_B527).contains(&magic))
}

fuzz_target!(|input: &[u8]| {
    let [mode, a, b, data @ ..] = input else {
        return;
    };
    let cuts = [usize::from(*a).max(1), usize::from(*b).max(1) * 97];
    if mode % 2 == 0 {
        if data.is_empty() {
            assert!(matches!(stream_decode(data, cuts), Some(Ok(plain)) if plain.is_empty()));
            return;
        }
        let (Some(ours), Some(reference)) = (stream_decode(data, cuts), reference_decode(data))
        else {
            return;
        };
        match (ours, reference) {
            (Ok(ours), Ok(reference)) => assert!(ours == reference, "decoders disagree"),
            (Err(_), Err(_)) => {}
            (Err(_), Ok(_)) if is_legacy_frame(data) => {}
            (ours, reference) => panic!(
                "decoders disagree: stream {:?}, reference {:?}",
                ours.map(|plain| plain.len()),
                reference.map(|plain| plain.len())
            ),
        }
    } else {
        let level = i32::from(mode >> 4) - 2;
        let mut encoder = zstd::bulk::Compressor::new(level).expect("encoder");
        encoder
            .include_contentsize(mode & 2 != 0)
            .expect("parameter");
        encoder.include_checksum(mode & 4 != 0).expect("parameter");
        // Repeating the data makes highly compressible frames out of short inputs.
        let repeats = if mode & 8 != 0 { 4096 } else { 1 };
        let plain = data.repeat(repeats);
        let frame = encoder.compress(&plain).expect("compress");
        match stream_decode(&frame, cuts) {
            Some(Ok(decoded)) => assert!(decoded == plain, "round trip changed the data"),
            Some(Err(error)) => panic!("a valid frame was refused: {error}"),
            None => {}
        }
    }
});
