//! Arbitrary text through the HTTP cache path parser (`/ac/<hash>`, `/cas/<hash>`, with
//! an optional instance prefix): it must never panic.
#![no_main]

// The node's parser modules, declared at the crate root where their `crate::` paths expect them.
include!("node_parsers.rs");

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(path) = http_path::parse(&text) {
        let _ = format!("{path:?}");
    }
});
