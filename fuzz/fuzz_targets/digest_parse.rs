//! Arbitrary text through `Digest::from_hex` and `Digest::from_lower_hex`: they must
//! never panic, accept exactly the 64-character hex strings (lowercase only for the
//! latter), and round-trip what they accept.
//!
//! Input layout: function selector (1 byte), size (8 bytes LE), then the hash text.
#![no_main]

use cairn_storage::{Digest, DigestFunction};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let function = if data[0] & 1 == 0 {
        DigestFunction::Sha256
    } else {
        DigestFunction::Blake3
    };
    let mut size = [0u8; 8];
    size.copy_from_slice(&data[1..9]);
    let size = u64::from_le_bytes(size);
    let text = String::from_utf8_lossy(&data[9..]);

    let valid = text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit());
    match Digest::from_hex(function, &text, size) {
        Ok(d) => {
            assert!(valid, "accepted {text:?}");
            assert_eq!(d.function, function);
            assert_eq!(d.size, size);
            assert_eq!(d.hash_hex(), text.to_ascii_lowercase());
            let again = Digest::from_hex(function, &d.hash_hex(), size);
            assert_eq!(again.ok(), Some(d));
            let _ = d.to_string();
            let _ = d.is_empty_blob();
        }
        Err(e) => {
            assert!(!valid, "rejected {text:?}: {e}");
        }
    }
    let lower = valid && !text.bytes().any(|b| b.is_ascii_uppercase());
    match Digest::from_lower_hex(function, &text, size) {
        Ok(d) => {
            assert!(lower, "accepted {text:?} as lowercase");
            assert_eq!(d.hash_hex(), text);
        }
        Err(e) => assert!(!lower, "rejected lowercase {text:?}: {e}"),
    }
});
