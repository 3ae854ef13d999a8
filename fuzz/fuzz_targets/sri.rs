//! Arbitrary text as a `checksum.sri` qualifier (client input of every Remote Asset
//! FetchBlob): the parser must never panic, must refuse with INVALID_ARGUMENT, and
//! what it accepts must hold hashes of its algorithm's length that read back the same.
#![no_main]

#[path = "../../common/src/error.rs"]
#[allow(dead_code)]
mod error;
#[path = "../../src/sri.rs"]
#[allow(dead_code)]
mod sri;

use libfuzzer_sys::fuzz_target;
use sri::Sri;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Sri::parse(text) {
        Ok(parsed) => {
            assert!(!parsed.hashes.is_empty());
            for hash in &parsed.hashes {
                assert_eq!(hash.len(), parsed.algorithm.hash_len());
                assert!(parsed.matches(hash));
                let again = Sri::parse(&parsed.describe(hash)).expect("a described hash parses");
                assert_eq!(again.algorithm, parsed.algorithm);
                assert_eq!(again.hashes, vec![hash.clone()]);
            }
        }
        Err(error) => assert_eq!(error.kind(), error::ErrorKind::InvalidArgument),
    }
});
