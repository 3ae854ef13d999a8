//! Arbitrary bytes as an index checkpoint file: decoding may refuse them but never
//! panic, and whatever it accepts is a checkpoint that encodes back to an image that
//! decodes to the same checkpoint.
//!
//! Input layout: nonce (8 bytes LE), mode (1 byte), then data.
//! - mode bit 1 clear: the data is the file image. Random bytes never pass the image's
//!   CRC, so with mode bit 0 set the target first writes the right magic, length and
//!   CRC for the bytes after the 16-byte preamble, which sends the archive itself
//!   through rkyv's validation.
//! - mode bit 1 set: the data describes a checkpoint (segments and entries from its
//!   bytes) that the encoder writes; then the byte at the position the first two data
//!   bytes name is replaced by the third and, with mode bit 0, the CRC repaired, so
//!   the fuzzer explores damage inside well-formed archives.
#![no_main]

use cairn_storage::format::crc;
use cairn_storage::fuzzing::{decode, encode, Checkpoint, Entry, SegmentMark};
use libfuzzer_sys::fuzz_target;

const MAGIC: &[u8; 8] = b"CRNCKPT1";
const PREAMBLE: usize = 16;

fn repair(image: &mut [u8]) {
    if image.len() < PREAMBLE {
        return;
    }
    let body_len = (image.len() - PREAMBLE) as u32;
    let body_crc = crc(&image[PREAMBLE..]);
    image[..8].copy_from_slice(MAGIC);
    image[8..12].copy_from_slice(&body_crc.to_le_bytes());
    image[12..16].copy_from_slice(&body_len.to_le_bytes());
}

fn word(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    for (i, byte) in word.iter_mut().enumerate() {
        *byte = bytes.get(at + i).copied().unwrap_or(0);
    }
    u32::from_le_bytes(word)
}

/// A checkpoint made from `data`: a segment mark per 8 bytes of its first half, an
/// entry per 16 bytes of its second.
fn described(nonce: u64, data: &[u8]) -> Checkpoint {
    let (marks, entries) = data.split_at(data.len() / 2);
    Checkpoint {
        nonce,
        next_seq: u64::from(word(data, 0)),
        next_seg: word(data, 4),
        segments: marks
            .chunks(8)
            .map(|mark| SegmentMark {
                id: word(mark, 0),
                replay_from: u64::from(word(mark, 4)),
            })
            .collect(),
        entries: entries
            .chunks(16)
            .map(|entry| Entry {
                prefix: u64::from(word(entry, 0)) << 32 | u64::from(word(entry, 4)),
                seg: word(entry, 8),
                off: word(entry, 12),
                len: word(entry, 2),
                flags: entry[0],
            })
            .collect(),
    }
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 9 {
        return;
    }
    let mut nonce = [0u8; 8];
    nonce.copy_from_slice(&input[..8]);
    let nonce = u64::from_le_bytes(nonce);
    let mode = input[8];
    let data = &input[9..];
    let mut image = if mode & 2 == 0 {
        data.to_vec()
    } else {
        let checkpoint = described(nonce, data);
        let mut image = encode(&checkpoint).expect("a checkpoint encodes");
        assert_eq!(
            decode(&image, nonce),
            Some(checkpoint),
            "an intact image decodes"
        );
        if data.len() >= 3 {
            let at = usize::from(u16::from_le_bytes([data[0], data[1]])) % image.len();
            image[at] = data[2];
        }
        image
    };
    if mode & 1 != 0 {
        repair(&mut image);
    }
    if let Some(checkpoint) = decode(&image, nonce) {
        assert_eq!(checkpoint.nonce, nonce, "a checkpoint of another directory");
        let again = encode(&checkpoint).expect("a decoded checkpoint encodes");
        assert_eq!(decode(&again, nonce), Some(checkpoint), "round trip");
    }
});
