//! Planning an input tree: the check between fetching it and writing it.
//!
//! The Directory messages of an input root name everything the worker will create
//! inside the action directory, and a client chooses every name and symlink target in
//! them. [`plan`] walks the tree from the root, checks each entry with the rules of
//! [`super::paths`], and returns the full list of directories, files and symlinks to
//! create. It touches no filesystem, so a hostile tree fails with INVALID_ARGUMENT
//! before the action directory holds anything, and [`super::inputs::materialize`] only
//! ever creates what was planned.
//!
//! What a successful plan promises, and what the `input_plan` fuzz target checks:
//!
//! - every path is relative, made of names that passed [`check_name`] (no empty, `.`
//!   or `..` component, no `/` inside a name, no NUL), so it stays beneath the root;
//! - no path is planned twice: names are unique within each directory, and a path is
//!   its parent's path plus one such name;
//! - every symlink target passed [`check_symlink_target`] from the link's directory,
//!   so resolving it cannot leave the root;
//! - directories are listed parents first, and every parent of a planned entry is the
//!   root or a planned directory.
//!
//! A tree is a DAG of content-addressed blobs, and the same subdirectory can appear
//! under many names, so a few small blobs can describe a tree of millions of entries;
//! the walk stops at [`MAX_ENTRIES`]. It also stops at paths longer than
//! [`MAX_PATH_BYTES`]: nothing longer can be created beneath any action root, and the
//! bound ends the walk of a tree whose Directory messages refer to each other in a
//! cycle (impossible with honest digests, since a blob cannot contain its own hash,
//! but the walk does not depend on the CAS having checked them).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use cairn_proto::reapi::{Digest, Directory};

use super::paths::{check_name, check_symlink_target};
use crate::digests::{key, BlobKey};
use crate::error::{Error, Result};

/// At most this many entries in one input tree; the same subdirectory may appear
/// under many names, so a small tree of Directory blobs can describe a huge one.
pub const MAX_ENTRIES: usize = 4_000_000;

/// The longest planned path, in bytes: Linux's `PATH_MAX`, which a path beneath an
/// action root (itself a path of some length) could never fit in.
pub const MAX_PATH_BYTES: usize = 4096;

/// What [`super::inputs::materialize`] creates, relative to the action root, parents
/// first.
#[derive(Debug, Default)]
pub struct InputPlan {
    /// Directories to create.
    pub directories: Vec<PathBuf>,
    /// Files: path, digest, executable.
    pub files: Vec<(PathBuf, Digest, bool)>,
    /// Symlinks: path, target.
    pub symlinks: Vec<(PathBuf, String)>,
}

/// Checks the tree rooted at `root` and lists what to create; `directories` holds its
/// Directory messages by digest ([`super::inputs::fetch_tree`]).
pub fn plan(root: &Digest, directories: &HashMap<BlobKey, Directory>) -> Result<InputPlan> {
    plan_within(root, directories, MAX_ENTRIES)
}

/// [`plan`] with at most `max_entries` entries instead of [`MAX_ENTRIES`] (the fuzz
/// target keeps each input fast this way).
pub fn plan_within(
    root: &Digest,
    directories: &HashMap<BlobKey, Directory>,
    max_entries: usize,
) -> Result<InputPlan> {
    let mut plan = InputPlan::default();
    let mut pending = vec![(PathBuf::new(), key(root))];
    let mut entries = 0usize;
    while let Some((path, digest_key)) = pending.pop() {
        let directory = directories.get(&digest_key).ok_or_else(|| {
            Error::internal(format!(
                "directory {}/{} was not fetched",
                digest_key.0, digest_key.1
            ))
        })?;
        entries += directory.files.len() + directory.directories.len() + directory.symlinks.len();
        if entries > max_entries {
            return Err(Error::invalid_argument(format!(
                "the input tree has more than {max_entries} entries"
            )));
        }
        let mut names = HashSet::new();
        // Checks a name of this directory; the entry's path if it is fine.
        let mut entry = |name: &str| -> Result<PathBuf> {
            check_name(name)?;
            if !names.insert(name.to_string()) {
                return Err(Error::invalid_argument(format!(
                    "input directory `{}` has two entries named `{name}`",
                    path.display()
                )));
            }
            let joined = path.join(name);
            if joined.as_os_str().len() > MAX_PATH_BYTES {
                return Err(Error::invalid_argument(format!(
                    "input path `{}…` is longer than {MAX_PATH_BYTES} bytes",
                    path.components().take(8).collect::<PathBuf>().display()
                )));
            }
            Ok(joined)
        };
        for file in &directory.files {
            let file_path = entry(&file.name)?;
            let digest = file.digest.clone().ok_or_else(|| {
                Error::invalid_argument(format!("input file `{}` has no digest", file.name))
            })?;
            if digest.size_bytes < 0 {
                return Err(Error::invalid_argument(format!(
                    "input file `{}` has a negative size",
                    file.name
                )));
            }
            plan.files.push((file_path, digest, file.is_executable));
        }
        for symlink in &directory.symlinks {
            let link_path = entry(&symlink.name)?;
            check_symlink_target(&path, &symlink.target)?;
            plan.symlinks.push((link_path, symlink.target.clone()));
        }
        for child in &directory.directories {
            let child_path = entry(&child.name)?;
            let digest = child.digest.as_ref().ok_or_else(|| {
                Error::invalid_argument(format!("input directory `{}` has no digest", child.name))
            })?;
            plan.directories.push(child_path.clone());
            pending.push((child_path, key(digest)));
        }
    }
    plan.directories
        .sort_by_key(|path| path.components().count());
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_proto::reapi::{DirectoryNode, FileNode, SymlinkNode};

    fn digest(n: u8) -> Digest {
        Digest {
            hash: format!("{n:064x}"),
            size_bytes: 1,
        }
    }

    fn file(name: &str) -> FileNode {
        FileNode {
            name: name.to_string(),
            digest: Some(digest(9)),
            ..Default::default()
        }
    }

    fn tree(root: Directory, sub: Directory) -> HashMap<BlobKey, Directory> {
        HashMap::from([(key(&digest(1)), root), (key(&digest(2)), sub)])
    }

    fn subdir(name: &str) -> DirectoryNode {
        DirectoryNode {
            name: name.to_string(),
            digest: Some(digest(2)),
        }
    }

    fn rejected(root: Directory, sub: Directory) {
        let error = plan(&digest(1), &tree(root, sub)).unwrap_err();
        assert_eq!(error.kind(), crate::ErrorKind::InvalidArgument, "{error}");
    }

    #[test]
    fn plans_a_valid_tree() {
        let root = Directory {
            files: vec![file("a")],
            directories: vec![subdir("d")],
            symlinks: vec![SymlinkNode {
                name: "l".into(),
                target: "d/b".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let sub = Directory {
            files: vec![file("b")],
            symlinks: vec![SymlinkNode {
                name: "up".into(),
                target: "../a".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let plan = plan(&digest(1), &tree(root, sub)).unwrap();
        assert_eq!(plan.directories, vec![PathBuf::from("d")]);
        let files: Vec<_> = plan.files.iter().map(|(path, _, _)| path.clone()).collect();
        assert!(files.contains(&PathBuf::from("a")));
        assert!(files.contains(&PathBuf::from("d/b")));
        assert_eq!(plan.symlinks.len(), 2);
    }

    #[test]
    fn rejects_hostile_trees() {
        let empty = Directory::default();
        for name in ["..", ".", "", "../etc", "a/b", "/abs"] {
            rejected(
                Directory {
                    files: vec![file(name)],
                    ..Default::default()
                },
                empty.clone(),
            );
            rejected(
                Directory {
                    directories: vec![subdir(name)],
                    ..Default::default()
                },
                empty.clone(),
            );
        }
        rejected(
            Directory {
                files: vec![file("x"), file("x")],
                ..Default::default()
            },
            empty.clone(),
        );
        rejected(
            Directory {
                files: vec![file("x")],
                directories: vec![subdir("x")],
                ..Default::default()
            },
            empty.clone(),
        );
        for target in ["../x", "/etc/passwd", "d/../../x"] {
            rejected(
                Directory {
                    symlinks: vec![SymlinkNode {
                        name: "l".into(),
                        target: target.into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                empty.clone(),
            );
        }
        rejected(
            Directory {
                directories: vec![subdir("d")],
                ..Default::default()
            },
            Directory {
                symlinks: vec![SymlinkNode {
                    name: "l".into(),
                    target: "../../x".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
    }

    #[test]
    fn a_tree_that_contains_itself_ends_at_the_path_bound() {
        let looping = Directory {
            files: vec![file("f")],
            directories: vec![DirectoryNode {
                name: "d".into(),
                digest: Some(digest(1)),
            }],
            ..Default::default()
        };
        let directories = HashMap::from([(key(&digest(1)), looping)]);
        let error = plan(&digest(1), &directories).unwrap_err();
        assert_eq!(error.kind(), crate::ErrorKind::InvalidArgument, "{error}");
        assert!(error.to_string().contains("longer than"), "{error}");
    }

    #[test]
    fn at_most_max_entries() {
        let root = Directory {
            files: vec![file("a"), file("b")],
            directories: vec![subdir("d")],
            ..Default::default()
        };
        let sub = Directory {
            files: vec![file("c")],
            ..Default::default()
        };
        let directories = tree(root, sub);
        assert!(plan_within(&digest(1), &directories, 4).is_ok());
        let error = plan_within(&digest(1), &directories, 3).unwrap_err();
        assert_eq!(error.kind(), crate::ErrorKind::InvalidArgument, "{error}");
    }
}
