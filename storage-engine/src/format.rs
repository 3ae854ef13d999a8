//! The on-disk record format, as pure functions over byte slices.
//!
//! Everything the engine persists in a segment is a record: a 72-byte header, the
//! payload, and for payloads larger than [`CRC_CHUNK`] a table of per-chunk CRC32s.
//! FORMAT.md documents the layout byte by byte; this module is its only implementation,
//! and it never trusts its input: decoding arbitrary bytes returns an error, never
//! panics, and never allocates based on an unchecked length (the fuzz target
//! `record_decode` holds it to that).
//!
//! The header CRC is seeded with the data directory's random nonce. A client can upload
//! bytes that look like a record; it cannot make them pass the header check without
//! knowing the nonce, so a recovery scan that resynchronises on block boundaries after
//! an abandoned upload never mistakes uploaded payload for a record.

use crate::digest::DigestFunction;

/// Every header starts with these bytes ("CRNR" little-endian).
pub const MAGIC: u32 = u32::from_le_bytes(*b"CRNR");
/// Record format version written by this build.
pub const VERSION: u8 = 1;
/// Size of the fixed record header.
pub const HEADER_LEN: usize = 72;
/// The device alignment used for every O_DIRECT write and every extent start.
pub const ALIGN: u64 = 4096;
/// Payloads are checksummed in chunks of this size so that a large blob can be
/// streamed to a reader chunk by chunk, each chunk verified before it is sent.
pub const CRC_CHUNK: u64 = 1 << 20;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// A CAS blob; the key hash is the blob's digest.
    Cas,
    /// An action-cache value; the key hash is derived from instance name and action digest.
    Ac,
}

impl RecordKind {
    pub fn code(self) -> u8 {
        match self {
            RecordKind::Cas => 1,
            RecordKind::Ac => 2,
        }
    }

    pub fn from_code(code: u8) -> Option<RecordKind> {
        match code {
            1 => Some(RecordKind::Cas),
            2 => Some(RecordKind::Ac),
            _ => None,
        }
    }
}

/// The full key of a record, as stored in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub kind: RecordKind,
    pub function: DigestFunction,
    pub hash: [u8; 32],
    pub size: u64,
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub key: Key,
    pub seq: u64,
    pub payload_len: u64,
    /// CRC32 of the payload when it is at most one chunk; otherwise CRC32 of the chunk table.
    pub payload_crc: u32,
}

/// Why a header did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer than [`HEADER_LEN`] bytes.
    Short,
    /// No magic: padding, an unwritten block, or an abandoned extent.
    NoMagic,
    /// A version this build does not read.
    Version(u8),
    /// The header checksum does not match (torn write or corruption).
    Checksum,
    /// Kind, digest function or compression code outside the known set.
    Field,
}

impl Header {
    /// Number of chunk CRCs that follow the payload.
    pub fn chunk_count(&self) -> u64 {
        chunk_table_entries(self.payload_len)
    }

    /// Header, payload and chunk table together.
    pub fn record_len(&self) -> u64 {
        record_len(self.payload_len)
    }

    /// Encodes the header into its 72 bytes.
    pub fn encode(&self, nonce: u64) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4] = VERSION;
        out[5] = self.key.kind.code();
        out[6] = self.key.function.code();
        out[7] = 0; // compression: none (the only value version 1 writes)
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..48].copy_from_slice(&self.key.hash);
        out[48..56].copy_from_slice(&self.key.size.to_le_bytes());
        out[56..64].copy_from_slice(&self.payload_len.to_le_bytes());
        out[64..68].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = header_crc(nonce, &out[0..68]);
        out[68..72].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a header from the start of `bytes`.
    pub fn decode(bytes: &[u8], nonce: u64) -> Result<Header, HeaderError> {
        let bytes = bytes.get(..HEADER_LEN).ok_or(HeaderError::Short)?;
        if le_u32(&bytes[0..4]) != MAGIC {
            return Err(HeaderError::NoMagic);
        }
        if bytes[4] != VERSION {
            return Err(HeaderError::Version(bytes[4]));
        }
        if header_crc(nonce, &bytes[0..68]) != le_u32(&bytes[68..72]) {
            return Err(HeaderError::Checksum);
        }
        let kind = RecordKind::from_code(bytes[5]).ok_or(HeaderError::Field)?;
        let function = DigestFunction::from_code(bytes[6]).ok_or(HeaderError::Field)?;
        if bytes[7] != 0 {
            return Err(HeaderError::Field);
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&bytes[16..48]);
        let payload_len = le_u64(&bytes[56..64]);
        // A length this large cannot be real and would overflow record arithmetic.
        if payload_len > MAX_PAYLOAD {
            return Err(HeaderError::Field);
        }
        Ok(Header {
            key: Key {
                kind,
                function,
                hash,
                size: le_u64(&bytes[48..56]),
            },
            seq: le_u64(&bytes[8..16]),
            payload_len,
            payload_crc: le_u32(&bytes[64..68]),
        })
    }
}

/// Largest payload a header may declare (1 TiB); anything above is corruption.
pub const MAX_PAYLOAD: u64 = 1 << 40;

pub fn chunk_table_entries(payload_len: u64) -> u64 {
    if payload_len > CRC_CHUNK {
        payload_len.div_ceil(CRC_CHUNK)
    } else {
        0
    }
}

pub fn record_len(payload_len: u64) -> u64 {
    HEADER_LEN as u64 + payload_len + 4 * chunk_table_entries(payload_len)
}

pub fn header_crc(nonce: u64, bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&nonce.to_le_bytes());
    h.update(bytes);
    h.finalize()
}

/// CRC32 of a byte slice.
pub fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Encodes a chunk table as little-endian CRC32s.
pub fn encode_chunk_table(crcs: &[u32]) -> Vec<u8> {
    crcs.iter().flat_map(|c| c.to_le_bytes()).collect()
}

/// Decodes a chunk table previously checked against the header's `payload_crc`.
pub fn decode_chunk_table(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(le_u32).collect()
}

/// Checks a record's payload (and chunk table) against its header, given the bytes that
/// follow the header: at least `payload_len` + table bytes.
pub fn verify_body(header: &Header, body: &[u8]) -> bool {
    let payload_len = header.payload_len as usize;
    let table_len = 4 * header.chunk_count() as usize;
    let Some(payload) = body.get(..payload_len) else {
        return false;
    };
    if table_len == 0 {
        return crc(payload) == header.payload_crc;
    }
    let Some(table) = body.get(payload_len..payload_len + table_len) else {
        return false;
    };
    if crc(table) != header.payload_crc {
        return false;
    }
    payload
        .chunks(CRC_CHUNK as usize)
        .zip(table.chunks_exact(4))
        .all(|(chunk, want)| crc(chunk) == le_u32(want))
}

/// Finds the intact records in a segment image, starting at `pos`: the recovery scan.
///
/// Where a header does not decode (zeros after the last write, an abandoned extent, a
/// torn or flipped header) it searches forward for the next magic number, so one
/// damaged record costs only itself. Records whose body fails its CRC are counted as
/// damaged and skipped using their (checksummed) length. Returns each record's
/// position in `bytes` with its header, and the number of damaged records.
pub fn scan_records(bytes: &[u8], mut pos: usize, nonce: u64) -> (Vec<(usize, Header)>, u64) {
    let magic = MAGIC.to_le_bytes();
    let finder = memchr::memmem::Finder::new(&magic);
    let mut found = Vec::new();
    let mut damaged = 0;
    while pos.saturating_add(HEADER_LEN) <= bytes.len() {
        let next = match Header::decode(&bytes[pos..], nonce) {
            Ok(h) => {
                let len = h.record_len() as usize;
                match bytes.get(pos + HEADER_LEN..pos + len) {
                    Some(body) if verify_body(&h, body) => {
                        found.push((pos, h));
                        Some(pos + len)
                    }
                    Some(_) => {
                        damaged += 1;
                        Some(pos + len)
                    }
                    // Claims to run past the end of the image: damaged, resynchronise.
                    None => {
                        damaged += 1;
                        None
                    }
                }
            }
            Err(_) => None,
        };
        pos = match next {
            Some(p) => p,
            None => match finder.find(&bytes[pos + 1..]) {
                Some(i) => pos + 1 + i,
                None => break,
            },
        };
    }
    (found, damaged)
}

/// Builds a complete small record (payload at most one chunk) in memory.
pub fn encode_small_record(key: Key, seq: u64, payload: &[u8], nonce: u64, out: &mut Vec<u8>) {
    debug_assert!(payload.len() as u64 <= CRC_CHUNK);
    let header = Header {
        key,
        seq,
        payload_len: payload.len() as u64,
        payload_crc: crc(payload),
    };
    out.extend_from_slice(&header.encode(nonce));
    out.extend_from_slice(payload);
}

pub fn align_up(v: u64) -> u64 {
    v.div_ceil(ALIGN) * ALIGN
}

pub fn align_down(v: u64) -> u64 {
    v / ALIGN * ALIGN
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key {
            kind: RecordKind::Cas,
            function: DigestFunction::Blake3,
            hash: [7; 32],
            size: 3,
        }
    }

    #[test]
    fn header_round_trip() {
        let h = Header {
            key: key(),
            seq: 42,
            payload_len: 3,
            payload_crc: crc(b"abc"),
        };
        let bytes = h.encode(99);
        assert_eq!(Header::decode(&bytes, 99), Ok(h));
    }

    #[test]
    fn corrupted_header_is_rejected() {
        let h = Header {
            key: key(),
            seq: 1,
            payload_len: 3,
            payload_crc: 0,
        };
        let bytes = h.encode(5);
        assert_eq!(Header::decode(&bytes, 6), Err(HeaderError::Checksum));
        for i in 0..HEADER_LEN {
            let mut b = bytes;
            b[i] ^= 0x10;
            assert!(Header::decode(&b, 5).is_err(), "flip at byte {i} accepted");
        }
        assert_eq!(Header::decode(&bytes[..10], 5), Err(HeaderError::Short));
        assert_eq!(Header::decode(&[0u8; 72], 5), Err(HeaderError::NoMagic));
    }

    #[test]
    fn scan_skips_damage_and_resynchronises() {
        let nonce = 3;
        let mut image = vec![0u8; 100];
        let mut positions = Vec::new();
        for i in 0..5u8 {
            positions.push(image.len());
            let k = Key {
                hash: [i; 32],
                ..key()
            };
            encode_small_record(k, u64::from(i), &[i; 3], nonce, &mut image);
        }
        image.extend_from_slice(&[0u8; 50]);
        image[positions[1] + 20] ^= 1; // header of record 1
        image[positions[3] + HEADER_LEN] ^= 1; // payload of record 3
        let (found, damaged) = scan_records(&image, 0, nonce);
        let got: Vec<usize> = found.iter().map(|(p, _)| *p).collect();
        assert_eq!(got, vec![positions[0], positions[2], positions[4]]);
        assert_eq!(damaged, 1);
    }

    #[test]
    fn chunk_table_covers_large_payloads() {
        assert_eq!(record_len(CRC_CHUNK), HEADER_LEN as u64 + CRC_CHUNK);
        assert_eq!(
            record_len(CRC_CHUNK + 1),
            HEADER_LEN as u64 + CRC_CHUNK + 1 + 8
        );
        let payload: Vec<u8> = (0..(CRC_CHUNK as usize * 2 + 10))
            .map(|i| i as u8)
            .collect();
        let crcs: Vec<u32> = payload.chunks(CRC_CHUNK as usize).map(crc).collect();
        let table = encode_chunk_table(&crcs);
        let header = Header {
            key: key(),
            seq: 1,
            payload_len: payload.len() as u64,
            payload_crc: crc(&table),
        };
        let mut body = payload.clone();
        body.extend_from_slice(&table);
        assert!(verify_body(&header, &body));
        body[CRC_CHUNK as usize + 5] ^= 1;
        assert!(!verify_body(&header, &body));
    }
}
