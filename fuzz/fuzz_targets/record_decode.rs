//! Arbitrary bytes through the record decoder and the recovery scanner: neither may
//! panic, and every record the scanner reports must really be intact where it says.
//!
//! Input layout: nonce (8 bytes LE), scan start (4 bytes LE), mode (1 byte), then the
//! segment image. Random bytes never pass a header CRC, so with mode bit 0 set the
//! target first repairs every header-shaped run in the image (each occurrence of the
//! magic number with 72 bytes after it): payload CRC over the payload that follows,
//! when it fits, then the header CRC. That lets the fuzzer reach the code behind the
//! checks (lengths, chunk tables, resynchronisation after damaged bodies).
#![no_main]

use cairn_storage::format::{
    crc, header_crc, scan_records, verify_body, Header, CRC_CHUNK, HEADER_LEN, MAGIC,
};
use libfuzzer_sys::fuzz_target;

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn repair(image: &mut [u8], nonce: u64) {
    let magic = MAGIC.to_le_bytes();
    let mut pos = 0;
    while pos + HEADER_LEN <= image.len() {
        if image[pos..pos + 4] != magic {
            pos += 1;
            continue;
        }
        let payload_len = le_u64(&image[pos + 56..pos + 64]);
        let body = pos + HEADER_LEN;
        if payload_len <= CRC_CHUNK && payload_len as usize <= image.len() - body {
            let c = crc(&image[body..body + payload_len as usize]);
            image[pos + 64..pos + 68].copy_from_slice(&c.to_le_bytes());
        }
        let h = header_crc(nonce, &image[pos..pos + 68]);
        image[pos + 68..pos + 72].copy_from_slice(&h.to_le_bytes());
        pos += HEADER_LEN;
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 13 {
        return;
    }
    let nonce = le_u64(&data[0..8]);
    let mut start = [0u8; 4];
    start.copy_from_slice(&data[8..12]);
    let start = u32::from_le_bytes(start) as usize;
    let mode = data[12];
    let mut image = data[13..].to_vec();
    if mode & 1 != 0 {
        repair(&mut image, nonce);
    }

    let _ = Header::decode(&image, nonce);
    let _ = Header::decode(&image[image.len().min(start)..], nonce);

    let (found, damaged) = scan_records(&image, start, nonce);
    assert!(damaged as usize <= image.len() / HEADER_LEN + 1);
    let mut last_end = start;
    for (pos, header) in found {
        assert!(pos >= last_end, "records overlap or go backwards");
        let decoded = Header::decode(&image[pos..], nonce);
        assert_eq!(
            decoded,
            Ok(header),
            "reported header does not decode in place"
        );
        let end = pos + header.record_len() as usize;
        assert!(end <= image.len(), "record runs past the image");
        assert!(verify_body(&header, &image[pos + HEADER_LEN..end]));
        last_end = end;
    }
});
