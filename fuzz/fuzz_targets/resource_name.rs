//! Arbitrary text through the ByteStream resource-name parsers (read and write forms,
//! with and without instance names, compressed and digest-function segments): they
//! must never panic, whatever the bytes.
#![no_main]

// The node's parser modules, declared at the crate root where their `crate::` paths expect them.
include!("node_parsers.rs");

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(read) = resource_name::parse_read(&text) {
        let _ = format!("{read:?}");
    }
    if let Ok(write) = resource_name::parse_write(&text) {
        let _ = format!("{write:?}");
    }
});
