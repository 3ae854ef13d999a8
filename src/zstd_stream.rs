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
pub struct Decompressor {
    decoder: Decoder<'static>,
    /// Whether the last step filled its output, so the decoder may hold more.
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
    /// `None` once the input is used up and nothing is left to flush.
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
            self.pending = produced == PIECE;
            self.frame_complete = hint == 0;
            if produced > 0 {
                return Ok(Some(Bytes::from(piece)));
            }
            if advanced == 0 {
                self.pending = false;
                if *consumed < input.len() {
                    return Err(Error::invalid_argument("zstd decoder made no progress"));
                }
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

    fn decompress_all(compressed: &[u8], chunk: usize) -> Result<Vec<u8>> {
        let mut decompressor = Decompressor::new()?;
        let mut plain = Vec::new();
        for piece in compressed.chunks(chunk) {
            let mut consumed = 0;
            while let Some(out) = decompressor.step(piece, &mut consumed)? {
                assert!(out.len() <= PIECE);
                plain.extend_from_slice(&out);
            }
        }
        decompressor.finish()?;
        Ok(plain)
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
    }

    #[test]
    fn truncated_and_garbage_streams_are_invalid() {
        let compressed = zstd::bulk::compress(&[7u8; 100_000], 3).unwrap();
        let truncated = decompress_all(&compressed[..compressed.len() - 3], 1000);
        assert!(truncated.is_err());
        assert!(decompress_all(b"definitely not zstd", 4).is_err());
    }

    #[test]
    fn empty_input_is_an_empty_frame() {
        let mut compressor = Compressor::new().unwrap();
        let frame = compressor.finish().unwrap();
        assert_eq!(decompress_all(&frame, 3).unwrap(), Vec::<u8>::new());
    }
}
