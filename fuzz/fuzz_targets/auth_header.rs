//! Arbitrary bytes as an `authorization` header (gRPC metadata or HTTP): the parser
//! must never panic, must refuse with UNAUTHENTICATED and a short fixed reason that
//! cannot quote the secret, and what it accepts must be what the header says.
#![no_main]

include!("auth_parsers.rs");

use credentials::Presented;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match credentials::parse(data) {
        Ok(Presented::Bearer(token)) => {
            assert!(!token.is_empty());
            assert!(token.bytes().all(|b| b.is_ascii_graphic()));
            let text = std::str::from_utf8(data).expect("accepted input is text");
            assert!(text.trim().ends_with(&token));
        }
        Ok(Presented::Basic { user, .. }) => {
            assert!(!user.contains(':'));
        }
        Err(error) => {
            assert_eq!(error.kind(), error::ErrorKind::Unauthenticated);
            assert!(error.message().starts_with("malformed authorization: "));
            assert!(error.message().len() < 120, "{}", error.message());
        }
    }
});
