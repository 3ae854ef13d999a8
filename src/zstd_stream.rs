//! zstd compression and decompression, one chunk at a time.
//!
//! `compressed-blobs/zstd` transfers may be as large as any blob, so neither direction
//! ever holds a whole blob: a decompressor turns each received chunk into bounded
//! pieces of plain bytes that go straight to the upload, and a compressor turns each
//! chunk read from the store into a piece of the zstd frame sent to the client. The
//! piece size bounds memory even for a tiny chunk that expands enormously (a
//! "zip bomb"), and the caller stops as soon as the output exceeds the declared size.

use bytes::Bytes;
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

use crate::error::{Error, Result};

/// Largest piece of plain bytes produced in one decompression step.
const PIECE: usize = 256 << 10;

/// The compression level of blobs sent compressed: fast, since the network, not the
/// ratio, is what a cache saves.
const LEVEL: i32 = 1;

/// Decompresses one zstd stream fed in arbitrary chunks.
///
/// The decoder is drained, not merely fed: a frame of a few hundred bytes can hold
/// megabytes, so after the input of a chunk is used up the decoder is called again
/// with no input for as long as it still produces output. Whether an output buffer
/// came back full says nothing about what the decoder still holds (it flushes at its
/// own block boundaries), so only a step that produced nothing ends the draining.
pub struct Decompressor {
    decoder: Decoder<'static>,
    /// Whether the last step produced output, so the decoder may hold more.
    pending: bool,
    /// Whether the stream so far ends exactly at the end of a frame.
    frame_complete: bool,
}

impl Decompressor {
    /// A decompressor at the start of a stream.
    pub fn new() -> Result<Self> {
        let decoder = Decoder::new()
            .map_err(|error| Error::internal(format!("cannot start zstd decoder: {error}")))?;
        Ok(Self {
            decoder,
            pending: false,
            frame_complete: true,
        })
    }

    /// The next piece of plain bytes from `input[*consumed..]`, advancing `consumed`;
    /// `None` once the input is used up and the decoder has nothing left to give.
    pub fn step(&mut self, input: &[u8], consumed: &mut usize) -> Result<Option<Bytes>> {
        loop {
            if *consumed >= input.len() && !self.pending {
                return Ok(None);
            }
            let mut source = InBuffer::around(&input[*consumed..]);
            let mut piece = Vec::with_capacity(PIECE);
            let mut output = OutBuffer::around(&mut piece);
            let hint = self
                .decoder
                .run(&mut source, &mut output)
                .map_err(|error| Error::invalid_argument(format!("invalid zstd data: {error}")))?;
            let produced = output.pos();
            let advanced = source.pos();
            *consumed += advanced;
            self.frame_complete = hint == 0;
            // A finished frame has been flushed whole; otherwise output means the
            // decoder may hold more, and one more call (with or without input) tells.
            self.pending = produced > 0 && hint != 0;
            if produced > 0 {
                return Ok(Some(Bytes::from(piece)));
            }
            if advanced == 0 && *consumed < input.len() {
                return Err(Error::invalid_argument("zstd decoder made no progress"));
            }
        }
    }

    /// Checks that the stream ended at the end of a frame.
    pub fn finish(&self) -> Result<()> {
        if self.frame_complete {
            Ok(())
        } else {
            Err(Error::invalid_argument("the zstd stream is truncated"))
        }
    }
}

/// Compresses one stream fed in arbitrary chunks into one zstd frame.
pub struct Compressor {
    encoder: Encoder<'static>,
}

impl Compressor {
    /// A compressor at the start of a frame.
    pub fn new() -> Result<Self> {
        let encoder = Encoder::new(LEVEL)
            .map_err(|error| Error::internal(format!("cannot start zstd encoder: {error}")))?;
        Ok(Self { encoder })
    }

    /// Compresses `input`, returning what the frame has so far to show for it.
    pub fn compress(&mut self, input: &[u8]) -> Result<Bytes> {
        let mut compressed = Vec::with_capacity(zstd::zstd_safe::compress_bound(input.len()));
        let mut source = InBuffer::around(input);
        while source.pos() < input.len() {
            let filled = compressed.len();
            if filled == compressed.capacity() {
                compressed.reserve(PIECE);
            }
            let mut output = OutBuffer::around_pos(&mut compressed, filled);
            self.encoder
                .run(&mut source, &mut output)
                .map_err(|error| Error::internal(format!("zstd compression failed: {error}")))?;
        }
        Ok(Bytes::from(compressed))
    }

    /// Ends the frame, returning its last bytes.
    pub fn finish(&mut self) -> Result<Bytes> {
        let mut tail = Vec::with_capacity(PIECE);
        loop {
            let filled = tail.len();
            tail.reserve(PIECE);
            let mut output = OutBuffer::around_pos(&mut tail, filled);
            let remaining = self
                .encoder
                .finish(&mut output, true)
                .map_err(|error| Error::internal(format!("zstd compression failed: {error}")))?;
            if remaining == 0 {
                return Ok(Bytes::from(tail));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decompresses `compressed` fed in pieces cut at `cuts` (cycled), checking that
    /// no piece of output exceeds [`PIECE`].
    fn decompress_cut(compressed: &[u8], cuts: &[usize]) -> Result<Vec<u8>> {
        let mut decompressor = Decompressor::new()?;
        let mut plain = Vec::new();
        let mut start = 0;
        let mut cut = cuts.iter().cycle();
        while start < compressed.len() {
            let end = (start + cut.next().copied().unwrap_or(1).max(1)).min(compressed.len());
            let chunk = &compressed[start..end];
            let mut consumed = 0;
            while let Some(out) = decompressor.step(chunk, &mut consumed)? {
                assert!(out.len() <= PIECE);
                plain.extend_from_slice(&out);
            }
            assert_eq!(consumed, chunk.len(), "every input byte is consumed");
            start = end;
        }
        decompressor.finish()?;
        Ok(plain)
    }

    fn decompress_all(compressed: &[u8], chunk: usize) -> Result<Vec<u8>> {
        decompress_cut(compressed, &[chunk])
    }

    /// A deterministic pseudo-random stream (xorshift), incompressible.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// `len` bytes of repeated English text followed by `tail` random bytes.
    fn text(len: usize, tail: usize) -> Vec<u8> {
        let sentence =
            b"The quick brown fox jumps over the lazy dog while the build cache answers. ";
        let mut data: Vec<u8> = sentence.iter().copied().cycle().take(len).collect();
        data.extend(noise(len as u64, tail));
        data
    }

    /// One frame made by the reference library, with or without the content size
    /// and the checksum in its header.
    fn frame(data: &[u8], level: i32, content_size: bool, checksum: bool) -> Vec<u8> {
        let mut encoder = zstd::bulk::Compressor::new(level).unwrap();
        encoder.include_contentsize(content_size).unwrap();
        encoder.include_checksum(checksum).unwrap();
        encoder.compress(data).unwrap()
    }

    /// A frame made by the streaming encoder, which never records the content size.
    fn streamed_frame(data: &[u8], level: i32) -> Vec<u8> {
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), level).unwrap();
        std::io::Write::write_all(&mut encoder, data).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn a_highly_compressible_blob_in_one_message_decompresses_whole() {
        // 1 MiB of text and 64 random bytes compress to about 200 bytes at level 3:
        // the whole frame arrives in one WriteRequest, and the decoder has far more
        // than one piece of output to give for it.
        for len in [200_000, 1 << 20, 3 << 20] {
            let data = text(len, 64);
            for level in [1, 3] {
                for content_size in [true, false] {
                    let compressed = frame(&data, level, content_size, false);
                    assert!(compressed.len() < 4096, "{} bytes", compressed.len());
                    let plain = decompress_all(&compressed, compressed.len()).unwrap();
                    assert!(plain == data, "{len} bytes at level {level}");
                }
                let compressed = streamed_frame(&data, level);
                assert!(decompress_all(&compressed, compressed.len()).unwrap() == data);
            }
        }
    }

    #[test]
    fn compression_ratios_from_none_to_extreme_round_trip() {
        let zeros = vec![0u8; 64 << 20];
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("incompressible", noise(7, 3 << 20)),
            ("half text", {
                let mut data = text(1 << 20, 0);
                data.extend(noise(9, 1 << 20));
                data
            }),
            ("text", text(5 << 20, 64)),
            ("64 MiB of zeros", zeros),
        ];
        for (name, data) in &cases {
            for (content_size, checksum) in [(true, true), (false, false), (true, false)] {
                let compressed = frame(data, 3, content_size, checksum);
                let plain = decompress_cut(&compressed, &[compressed.len()]).unwrap();
                assert!(plain == *data, "{name}: one message");
                let plain = decompress_cut(&compressed, &[16 << 10]).unwrap();
                assert!(plain == *data, "{name}: 16 KiB messages");
            }
        }
    }

    #[test]
    fn input_split_at_every_boundary_round_trips() {
        // Small enough to cut at every byte: a frame of several blocks (the text is
        // longer than one 128 KiB block), so some cuts land inside block headers.
        let data = text(300_000, 500);
        for (content_size, checksum) in [(true, true), (false, false)] {
            let compressed = frame(&data, 3, content_size, checksum);
            assert!(
                decompress_cut(&compressed, &[1]).unwrap() == data,
                "one byte per message"
            );
            for cut in 1..compressed.len() {
                let plain = decompress_cut(&compressed, &[cut, compressed.len()]).unwrap();
                assert!(plain == data, "cut after byte {cut}");
            }
            assert!(decompress_cut(&compressed, &[3, 1, 4, 1, 5, 9, 2, 6]).unwrap() == data);
        }
    }

    #[test]
    fn frames_back_to_back_are_one_stream() {
        let first = text(1 << 20, 64);
        let second = noise(3, 100_000);
        let third = vec![0u8; 2 << 20];
        let mut compressed = frame(&first, 3, true, true);
        compressed.extend(streamed_frame(&second, 1));
        compressed.extend(frame(&third, 19, false, false));
        let mut expected = first.clone();
        expected.extend(&second);
        expected.extend(&third);
        for cuts in [vec![compressed.len()], vec![1000], vec![7, 13]] {
            assert!(decompress_cut(&compressed, &cuts).unwrap() == expected);
        }
    }

    #[test]
    fn round_trip_in_small_chunks() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut compressor = Compressor::new().unwrap();
        let mut compressed = Vec::new();
        for chunk in data.chunks(100_000) {
            compressed.extend_from_slice(&compressor.compress(chunk).unwrap());
        }
        compressed.extend_from_slice(&compressor.finish().unwrap());
        assert!(compressed.len() < data.len() / 10);
        assert_eq!(decompress_all(&compressed, 7).unwrap(), data);
        assert_eq!(decompress_all(&compressed, 1 << 20).unwrap(), data);
        assert_eq!(zstd::stream::decode_all(&compressed[..]).unwrap(), data);
    }

    #[test]
    fn truncated_and_garbage_streams_are_invalid() {
        let compressed = zstd::bulk::compress(&[7u8; 100_000], 3).unwrap();
        let truncated = decompress_all(&compressed[..compressed.len() - 3], 1000);
        assert!(truncated.is_err());
        assert!(decompress_all(b"definitely not zstd", 4).is_err());
        let data = text(1 << 20, 64);
        let compressed = frame(&data, 3, true, true);
        for keep in [compressed.len() - 1, compressed.len() / 2, 5] {
            assert!(
                decompress_all(&compressed[..keep], keep).is_err(),
                "a frame cut to {keep} bytes"
            );
        }
    }

    #[test]
    fn empty_input_is_an_empty_frame() {
        let mut compressor = Compressor::new().unwrap();
        let frame = compressor.finish().unwrap();
        assert_eq!(decompress_all(&frame, 3).unwrap(), Vec::<u8>::new());
    }
}
