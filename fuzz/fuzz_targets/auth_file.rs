//! Arbitrary text as an auth file (`--auth`): the parser must never panic, must refuse
//! what it does not take with a line to look at or a principal to name, and what it
//! takes must be a policy the node can apply.
#![no_main]

include!("auth_parsers.rs");

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match auth_file::parse(&text) {
        Ok(file) => {
            let mut names = HashSet::new();
            for principal in &file.principals {
                assert!(!principal.name.is_empty());
                assert!(names.insert(principal.name.clone()), "a name twice");
                assert_ne!(principal.grant.instances.as_deref(), Some(&[][..]));
                // Instance matching takes any name the client sends.
                let _ = principal.grant.covers(&principal.name);
                let _ = principal.grant.covers("");
            }
            if let Some(anonymous) = &file.anonymous {
                let _ = anonymous.covers(&text);
            }
        }
        Err(error) => {
            assert_eq!(error.kind(), error::ErrorKind::InvalidArgument);
            assert!(error.message().starts_with("invalid auth file"));
        }
    }
});
