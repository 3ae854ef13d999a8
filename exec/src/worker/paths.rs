//! The rules that keep an action inside its directory.
//!
//! Everything a worker writes or reads on an action's behalf is named by the client:
//! entry names in the input tree, symlink targets, the working directory and output
//! paths. A hostile or buggy client must not be able to make the worker create,
//! overwrite or upload a file outside the action directory, so every such name is
//! checked here before the filesystem is touched, and a bad one fails the action with
//! INVALID_ARGUMENT.
//!
//! The checks are lexical, and they are sound because of how the worker uses them:
//!
//! - A Directory entry name is one path component: not empty, not `.` or `..`, no `/`
//!   and no NUL. Inputs are created by walking the tree, so every parent of a created
//!   file is a real directory the worker just made, never a symlink.
//! - A relative path (working directory, output path) is normalized: components
//!   separated by single `/`, none empty, `.` or `..`, not absolute.
//! - A symlink target must be normalized too, with `..` allowed only as leading
//!   components, and no more of them than the link's depth below the action root.
//!   Because the link sits in a real directory and the rest of its target only
//!   descends, resolving it cannot climb above the root, even through other links
//!   that obey the same rule. A target like `s/../..` (climbing after following a
//!   link) is exactly what the leading-only rule forbids.
//!
//! Outputs are read without following symlinks: each component of an output path is
//! examined with `lstat`, a symlink in the middle is an error, and a symlink at the end
//! is reported as an output symlink (its target checked by the same rule), never read
//! through.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// Checks a Directory entry name.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid_argument("an input entry has an empty name"));
    }
    if name == "." || name == ".." {
        return Err(Error::invalid_argument(format!(
            "input entry name `{name}` is not allowed"
        )));
    }
    if name.contains('/') {
        return Err(Error::invalid_argument(format!(
            "input entry name `{name}` contains `/`"
        )));
    }
    if name.contains('\0') {
        return Err(Error::invalid_argument(format!(
            "input entry name `{}` contains NUL",
            name.escape_debug()
        )));
    }
    Ok(())
}

/// Checks a relative path of the action (`what` names it in errors) and returns it as
/// a [`PathBuf`]. The empty path (the directory itself) is allowed only if
/// `allow_empty`.
pub fn check_relative_path(path: &str, what: &str, allow_empty: bool) -> Result<PathBuf> {
    if path.is_empty() {
        if allow_empty {
            return Ok(PathBuf::new());
        }
        return Err(Error::invalid_argument(format!("{what} is empty")));
    }
    if path.starts_with('/') {
        return Err(Error::invalid_argument(format!(
            "{what} `{path}` is absolute"
        )));
    }
    if path.contains('\0') {
        return Err(Error::invalid_argument(format!(
            "{what} `{}` contains NUL",
            path.escape_debug()
        )));
    }
    for component in path.split('/') {
        match component {
            "" => {
                return Err(Error::invalid_argument(format!(
                    "{what} `{path}` has an empty component"
                )))
            }
            "." | ".." => {
                return Err(Error::invalid_argument(format!(
                    "{what} `{path}` contains `{component}`"
                )))
            }
            _ => {}
        }
    }
    Ok(PathBuf::from(path))
}

/// Checks that a symlink whose directory is `link_dir` (relative to the action root)
/// and whose target is `target` resolves inside the action root.
pub fn check_symlink_target(link_dir: &Path, target: &str) -> Result<()> {
    let link_name = link_dir.join("…");
    let escape = || {
        Error::invalid_argument(format!(
            "symlink {} -> `{target}` points outside the action directory",
            link_name.display()
        ))
    };
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return Err(escape());
    }
    let depth = link_dir
        .components()
        .filter(|component| matches!(component, Component::Normal(_)))
        .count();
    let mut climbed = 0usize;
    let mut descended = false;
    for component in target.split('/') {
        match component {
            ".." if !descended => climbed += 1,
            "" | "." | ".." => return Err(escape()),
            _ => descended = true,
        }
    }
    if climbed > depth {
        return Err(escape());
    }
    Ok(())
}

/// Joins checked relative paths under `root`.
pub fn under(root: &Path, relative: &Path) -> PathBuf {
    if relative.as_os_str().is_empty() {
        root.to_path_buf()
    } else {
        root.join(relative)
    }
}

/// What is at an output path, examined without following symlinks.
#[derive(Debug)]
pub enum Found {
    /// Nothing (or a parent is missing or not a directory).
    Missing,
    /// A regular file.
    File(PathBuf),
    /// A directory.
    Directory(PathBuf),
    /// A symlink, with its target.
    Symlink(String),
}

/// Looks up `relative` (checked) beneath `root` with `lstat` on every component; a
/// symlink anywhere but at the end is an INVALID_ARGUMENT error, because following it
/// could leave the action directory.
pub fn lookup_beneath(root: &Path, relative: &Path) -> Result<Found> {
    let mut current = root.to_path_buf();
    let components: Vec<_> = relative.components().collect();
    for (index, component) in components.iter().enumerate() {
        let Component::Normal(name) = component else {
            return Err(Error::invalid_argument(format!(
                "output path {} is not normalized",
                relative.display()
            )));
        };
        current.push(name);
        let metadata = match std::fs::symlink_metadata(&current) {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Found::Missing)
            }
            Err(error) => return Err(error.into()),
        };
        let last = index + 1 == components.len();
        let kind = metadata.file_type();
        if kind.is_symlink() {
            if !last {
                return Err(Error::invalid_argument(format!(
                    "output path {} passes through a symlink",
                    relative.display()
                )));
            }
            let target = std::fs::read_link(&current)?;
            let target = target.to_str().ok_or_else(|| {
                Error::invalid_argument(format!(
                    "output symlink {} has a target that is not UTF-8",
                    relative.display()
                ))
            })?;
            return Ok(Found::Symlink(target.to_string()));
        }
        if last {
            if kind.is_dir() {
                return Ok(Found::Directory(current));
            }
            if kind.is_file() {
                return Ok(Found::File(current));
            }
            return Err(Error::invalid_argument(format!(
                "output {} is neither a file, a directory nor a symlink",
                relative.display()
            )));
        }
        if !kind.is_dir() {
            return Ok(Found::Missing);
        }
    }
    Ok(Found::Directory(current))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn invalid<T: std::fmt::Debug>(result: Result<T>) {
        match result {
            Err(error) => assert_eq!(error.kind(), ErrorKind::InvalidArgument, "{error}"),
            Ok(value) => panic!("accepted: {value:?}"),
        }
    }

    #[test]
    fn names() {
        check_name("a").unwrap();
        check_name("file.txt").unwrap();
        check_name("..a").unwrap();
        check_name("a..").unwrap();
        check_name(" ").unwrap();
        invalid(check_name(""));
        invalid(check_name("."));
        invalid(check_name(".."));
        invalid(check_name("a/b"));
        invalid(check_name("/"));
        invalid(check_name("/etc"));
        invalid(check_name("../x"));
        invalid(check_name("a\0b"));
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            check_relative_path("a/b/c", "output path", false).unwrap(),
            PathBuf::from("a/b/c")
        );
        check_relative_path("bazel-out/k8-fastbuild/bin/x.o", "p", false).unwrap();
        assert_eq!(
            check_relative_path("", "working directory", true).unwrap(),
            PathBuf::new()
        );
        invalid(check_relative_path("", "output path", false));
        invalid(check_relative_path("/etc/passwd", "p", false));
        invalid(check_relative_path("/", "p", true));
        invalid(check_relative_path("..", "p", false));
        invalid(check_relative_path("../x", "p", false));
        invalid(check_relative_path("a/../../x", "p", false));
        invalid(check_relative_path("a/..", "p", false));
        invalid(check_relative_path("a/./b", "p", false));
        invalid(check_relative_path(".", "p", false));
        invalid(check_relative_path("a//b", "p", false));
        invalid(check_relative_path("a/", "p", false));
        invalid(check_relative_path("a\0", "p", false));
    }

    #[test]
    fn symlink_targets() {
        check_symlink_target(Path::new(""), "a").unwrap();
        check_symlink_target(Path::new(""), "a/b/c").unwrap();
        check_symlink_target(Path::new("d"), "../a").unwrap();
        check_symlink_target(Path::new("d/e"), "../../a/b").unwrap();
        check_symlink_target(Path::new("d/e"), "..").unwrap();
        invalid(check_symlink_target(Path::new(""), ".."));
        invalid(check_symlink_target(Path::new(""), "../etc/passwd"));
        invalid(check_symlink_target(Path::new("d"), "../../x"));
        invalid(check_symlink_target(Path::new("d/e"), "../../../x"));
        invalid(check_symlink_target(Path::new(""), "/etc/passwd"));
        invalid(check_symlink_target(Path::new("d"), "/"));
        invalid(check_symlink_target(Path::new(""), ""));
        invalid(check_symlink_target(Path::new(""), "s/../.."));
        invalid(check_symlink_target(Path::new("d"), "s/../x"));
        invalid(check_symlink_target(Path::new("d"), "./x"));
        invalid(check_symlink_target(Path::new("d"), "x//y"));
        invalid(check_symlink_target(Path::new("d"), "x/"));
        invalid(check_symlink_target(Path::new("d"), "x\0"));
    }

    #[test]
    fn lookup_does_not_follow_symlinks() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"secret").unwrap();
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        std::fs::create_dir(root.join("dir")).unwrap();
        std::fs::write(root.join("dir/file"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("escape")).unwrap();
        std::os::unix::fs::symlink("dir/file", root.join("link")).unwrap();
        std::fs::write(root.join("plain"), b"x").unwrap();

        assert!(matches!(
            lookup_beneath(root, Path::new("dir/file")).unwrap(),
            Found::File(_)
        ));
        assert!(matches!(
            lookup_beneath(root, Path::new("dir")).unwrap(),
            Found::Directory(_)
        ));
        assert!(matches!(
            lookup_beneath(root, Path::new("nothing/here")).unwrap(),
            Found::Missing
        ));
        assert!(matches!(
            lookup_beneath(root, Path::new("plain/below")).unwrap(),
            Found::Missing
        ));
        match lookup_beneath(root, Path::new("link")).unwrap() {
            Found::Symlink(target) => assert_eq!(target, "dir/file"),
            other => panic!("{other:?}"),
        }
        match lookup_beneath(root, Path::new("escape")).unwrap() {
            Found::Symlink(target) => {
                assert_eq!(Path::new(&target), outside.path());
                invalid(check_symlink_target(Path::new(""), &target));
            }
            other => panic!("{other:?}"),
        }
        invalid(lookup_beneath(root, Path::new("escape/secret")));
    }
}
