//! Input trees built from the input, through the worker's planner (`plan_within` of
//! `src/worker/plan.rs`): it may refuse a tree but never panics, and what it accepts
//! keeps every promise of its module docs: relative paths of checked names only, none
//! planned twice, each below the root or a planned directory, directories parents
//! first, symlink targets that cannot leave the root, at most the entry bound.
//!
//! Input layout: the first byte gives the number of Directory messages (1 to 8;
//! message 0 is the root, message `i` has the digest `{i:064x}`/1), then operations
//! that fill them, starting with message 0. Each operation is one byte:
//! - `% 5 == 0`: move on to the next message;
//! - `1`: a file: a name (below), then a flag byte (bit 0 executable, bit 1 no digest,
//!   bit 2 a negative size);
//! - `2`: a subdirectory: a name, then a byte `r`: 255 is no digest, else message
//!   `r % (n + 1)` (`n` names a message that is not there; references may form cycles,
//!   which honest digests never do but the planner must survive);
//! - `3`: a symlink: a name, then a target (same encoding as names);
//! - `4`: a length byte and that many bytes decoded as a Directory message whose
//!   entries are appended (garbage that does not decode is skipped).
//!
//! A name is one byte `s`: below 0x80 it picks from `NAMES`, otherwise the next
//! `s & 15` bytes each pick a character from `ALPHABET`.
#![no_main]

// The worker's planning modules, declared at the crate root where their `crate::` paths expect them.
include!("worker_plan.rs");

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

use cairn_proto::reapi::{Digest, Directory, DirectoryNode, FileNode, SymlinkNode};
use error::ErrorKind;
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Keeps each input fast: a DAG of eight messages can name millions of entries.
const MAX_ENTRIES: usize = 2048;

const NAMES: &[&str] = &[
    "a", "b", "c", "d", "..", ".", "", "a/b", "/", "/etc", "../x", "x\0", "..a", "a..", " ",
    "\u{2026}", "a/", "./a",
];

const ALPHABET: &[char] = &['a', 'b', '.', '/', '\0', '-', ' ', '\u{e9}'];

struct Bytes<'a> {
    data: &'a [u8],
}

impl Bytes<'_> {
    fn next(&mut self) -> Option<u8> {
        let (first, rest) = self.data.split_first()?;
        self.data = rest;
        Some(*first)
    }

    fn name(&mut self) -> Option<String> {
        let selector = self.next()?;
        if selector < 0x80 {
            return Some(NAMES[usize::from(selector) % NAMES.len()].to_string());
        }
        let mut name = String::new();
        for _ in 0..selector & 15 {
            name.push(ALPHABET[usize::from(self.next()?) % ALPHABET.len()]);
        }
        Some(name)
    }

    fn take(&mut self, len: usize) -> &[u8] {
        let (taken, rest) = self.data.split_at(len.min(self.data.len()));
        self.data = rest;
        taken
    }
}

fn digest(index: usize) -> Digest {
    Digest {
        hash: format!("{index:064x}"),
        size_bytes: 1,
    }
}

fn build(data: &[u8]) -> Option<Vec<Directory>> {
    let mut input = Bytes { data };
    let count = 1 + usize::from(input.next()?) % 8;
    let mut directories = vec![Directory::default(); count];
    let mut current = 0;
    while let Some(operation) = input.next() {
        let directory = &mut directories[current];
        match operation % 5 {
            0 => {
                if current + 1 == count {
                    break;
                }
                current += 1;
            }
            1 => {
                let name = input.name()?;
                let flags = input.next()?;
                directory.files.push(FileNode {
                    name,
                    digest: (flags & 2 == 0).then(|| Digest {
                        hash: "f".repeat(64),
                        size_bytes: if flags & 4 == 0 { 3 } else { -3 },
                    }),
                    is_executable: flags & 1 != 0,
                    ..Default::default()
                });
            }
            2 => {
                let name = input.name()?;
                let reference = input.next()?;
                directory.directories.push(DirectoryNode {
                    name,
                    digest: (reference != 255)
                        .then(|| digest(usize::from(reference) % (count + 1))),
                });
            }
            3 => {
                let name = input.name()?;
                let target = input.name()?;
                directory.symlinks.push(SymlinkNode {
                    name,
                    target,
                    ..Default::default()
                });
            }
            _ => {
                let len = usize::from(input.next()?);
                if let Ok(decoded) = Directory::decode(input.take(len)) {
                    directory.files.extend(decoded.files);
                    directory.directories.extend(decoded.directories);
                    directory.symlinks.extend(decoded.symlinks);
                }
            }
        }
    }
    Some(directories)
}

/// A planned path: relative, normalized, short enough.
fn check_path(path: &Path) {
    let text = path
        .to_str()
        .expect("planned paths are made of UTF-8 names");
    assert!(!text.is_empty(), "an empty path was planned");
    assert!(
        text.len() <= plan::MAX_PATH_BYTES,
        "a path of {} bytes",
        text.len()
    );
    for component in text.split('/') {
        assert!(
            !matches!(component, "" | "." | ".."),
            "{text:?} has a `{component}` component"
        );
        assert!(!component.contains('\0'), "{text:?} contains NUL");
    }
    assert!(
        path.components()
            .all(|component| matches!(component, Component::Normal(_))),
        "{text:?} is not a plain relative path"
    );
}

/// Resolves a symlink's target from its directory, lexically: leading `..` only, never
/// above the root.
fn check_target(link: &Path, target: &str) {
    assert!(
        !target.is_empty() && !target.starts_with('/'),
        "{link:?} -> {target:?}"
    );
    let mut depth = link.components().count() - 1;
    let mut descended = false;
    for component in target.split('/') {
        match component {
            ".." => {
                assert!(!descended, "{link:?} -> {target:?} climbs after descending");
                assert!(depth > 0, "{link:?} -> {target:?} leaves the root");
                depth -= 1;
            }
            "" | "." => panic!("{link:?} -> {target:?} is not normalized"),
            name => {
                assert!(!name.contains('\0'), "{link:?} -> {target:?} contains NUL");
                descended = true;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(directories) = build(data) else {
        return;
    };
    let root_files: Vec<String> = directories[0]
        .files
        .iter()
        .map(|file| file.name.clone())
        .collect();
    let map: HashMap<digests::BlobKey, Directory> = directories
        .into_iter()
        .enumerate()
        .map(|(index, directory)| (digests::key(&digest(index)), directory))
        .collect();
    let planned = match plan::plan_within(&digest(0), &map, MAX_ENTRIES) {
        Ok(planned) => planned,
        Err(error) => {
            assert!(
                matches!(
                    error.kind(),
                    ErrorKind::InvalidArgument | ErrorKind::Internal
                ),
                "{error}"
            );
            return;
        }
    };
    let total = planned.directories.len() + planned.files.len() + planned.symlinks.len();
    assert!(total <= MAX_ENTRIES, "{total} entries planned");

    let mut made: HashSet<&Path> = HashSet::new();
    for directory in &planned.directories {
        check_path(directory);
        let parent = directory.parent().expect("a relative path has a parent");
        assert!(
            parent.as_os_str().is_empty() || made.contains(parent),
            "{directory:?} is listed before its parent"
        );
        assert!(made.insert(directory), "{directory:?} planned twice");
    }
    let mut seen: HashSet<&Path> = made.clone();
    let leaves = planned
        .files
        .iter()
        .map(|(path, _, _)| path)
        .chain(planned.symlinks.iter().map(|(path, _)| path));
    for path in leaves {
        check_path(path);
        let parent = path.parent().expect("a relative path has a parent");
        assert!(
            parent.as_os_str().is_empty() || made.contains(parent),
            "{path:?} is not in a planned directory"
        );
        assert!(seen.insert(path), "{path:?} planned twice");
    }
    for (path, digest, _) in &planned.files {
        assert!(digest.size_bytes >= 0, "{path:?} has a negative size");
    }
    for (path, target) in &planned.symlinks {
        check_target(path, target);
    }
    for name in root_files {
        let path = PathBuf::from(&name);
        assert!(
            planned.files.iter().any(|(planned, _, _)| *planned == path),
            "root file {name:?} was not planned"
        );
    }
});
