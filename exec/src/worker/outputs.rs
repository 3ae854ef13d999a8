//! Collecting an action's outputs into an ActionResult.
//!
//! The Command names its outputs either in `output_paths` (REAPI 2.1 and later: each
//! may turn out to be a file, a directory or a symlink) or in the older
//! `output_files` / `output_directories`. Each is looked up without following
//! symlinks ([`super::paths::lookup_beneath`]); a file is hashed, a directory becomes a
//! `Tree` (its root and every subdirectory), a symlink is reported with its target.
//! Nothing outside the action directory is read.
//!
//! A directory is always stored as a Tree, the form every client reads. Only when the
//! Command's `output_directory_format` asks for the separately stored form too
//! (REAPI v2.3: `DIRECTORY_ONLY`, which the worker may widen to `TREE_AND_DIRECTORY`)
//! does the result carry `root_directory_digest`, and then every Directory message of
//! the hierarchy is uploaded with the outputs: a digest the result advertises must be
//! readable, and the action cache's completeness check demands it. The collected blobs are then
//! uploaded together, so the CAS is asked once which of them it already has.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use cairn_proto::reapi::{
    ActionResult, Command, Digest, Directory, DirectoryNode, FileNode, OutputDirectory, OutputFile,
    OutputSymlink, SymlinkNode, Tree,
};
use prost::Message;

use super::paths::{check_relative_path, check_symlink_target, lookup_beneath, Found};
use crate::digests::{self, key, BlobKey, DigestFunction};
use crate::error::{Error, Result};

/// An output the Command asks for, with the kind the older fields promise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// Relative to the working directory, checked.
    pub path: PathBuf,
    /// As written in the Command.
    pub name: String,
    /// `None` for `output_paths` (any kind).
    pub kind: Option<Kind>,
}

/// What an older-style output field promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// From `output_files`.
    File,
    /// From `output_directories`.
    Directory,
}

/// The outputs of `command`, checked: `output_paths`, or for clients older than REAPI
/// 2.1 (Bazel 4) the deprecated `output_files` and `output_directories`.
#[allow(deprecated)]
pub fn wanted(command: &Command) -> Result<Vec<Wanted>> {
    let mut wanted = Vec::new();
    if !command.output_paths.is_empty() {
        for path in &command.output_paths {
            wanted.push(Wanted {
                path: check_relative_path(path, "output path", false)?,
                name: path.clone(),
                kind: None,
            });
        }
        return Ok(wanted);
    }
    for path in &command.output_files {
        wanted.push(Wanted {
            path: check_relative_path(path, "output file", false)?,
            name: path.clone(),
            kind: Some(Kind::File),
        });
    }
    for path in &command.output_directories {
        wanted.push(Wanted {
            path: check_relative_path(path, "output directory", false)?,
            name: path.clone(),
            kind: Some(Kind::Directory),
        });
    }
    Ok(wanted)
}

/// The forms in which output directories are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectoryFormat {
    /// A Tree blob only (`TREE_ONLY`, and any format this worker does not know).
    Tree,
    /// A Tree blob and every Directory message (`DIRECTORY_ONLY`, `TREE_AND_DIRECTORY`).
    TreeAndDirectories,
}

/// The form `command` asks its output directories to be stored in.
pub fn directory_format(command: &Command) -> DirectoryFormat {
    use cairn_proto::reapi::command::OutputDirectoryFormat;
    match OutputDirectoryFormat::try_from(command.output_directory_format) {
        Ok(OutputDirectoryFormat::DirectoryOnly | OutputDirectoryFormat::TreeAndDirectory) => {
            DirectoryFormat::TreeAndDirectories
        }
        Ok(OutputDirectoryFormat::TreeOnly) | Err(_) => DirectoryFormat::Tree,
    }
}

/// Blobs to upload: contents in memory or in files.
#[derive(Default)]
pub struct Blobs {
    /// In-memory blobs (Trees and Directory messages).
    pub memory: HashMap<BlobKey, Bytes>,
    /// Blobs in files (outputs, stdout, stderr).
    pub files: HashMap<BlobKey, PathBuf>,
    /// Every digest, for FindMissingBlobs.
    pub digests: Vec<Digest>,
}

impl Blobs {
    fn add_memory(&mut self, function: DigestFunction, data: Vec<u8>) -> Digest {
        let digest = digests::of(function, &data);
        if self
            .memory
            .insert(key(&digest), Bytes::from(data))
            .is_none()
        {
            self.digests.push(digest.clone());
        }
        digest
    }

    /// Adds the file at `path`, returning its digest.
    pub fn add_file(&mut self, function: DigestFunction, path: &Path) -> Result<Digest> {
        let digest = digest_file(function, path)?;
        if self
            .files
            .insert(key(&digest), path.to_path_buf())
            .is_none()
        {
            self.digests.push(digest.clone());
        }
        Ok(digest)
    }
}

/// The digest of a file, opened without following a symlink.
pub fn digest_file(function: DigestFunction, path: &Path) -> Result<Digest> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut hasher = function.hasher();
    let mut buffer = vec![0u8; 256 << 10];
    let mut size = 0u64;
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        size += read as u64;
    }
    Ok(Digest {
        hash: hex::encode(hasher.finalize()),
        size_bytes: size as i64,
    })
}

fn is_executable(path: &Path) -> Result<bool> {
    Ok(std::fs::symlink_metadata(path)?.permissions().mode() & 0o111 != 0)
}

/// Collects the outputs found beneath `root`/`working_directory` into `result`,
/// adding their blobs to `blobs`. Missing outputs are left out, as REAPI says.
/// Symlinks also go in the deprecated per-kind lists when the client named its
/// outputs the old way, because such clients read only those.
#[allow(deprecated)]
pub fn collect(
    root: &Path,
    working_directory: &Path,
    wanted: &[Wanted],
    format: DirectoryFormat,
    function: DigestFunction,
    result: &mut ActionResult,
    blobs: &mut Blobs,
) -> Result<()> {
    let exec_root = super::paths::under(root, working_directory);
    for output in wanted {
        let from_root = working_directory.join(&output.path);
        match lookup_beneath(&exec_root, &output.path)? {
            Found::Missing => {}
            Found::File(path) => {
                if output.kind == Some(Kind::Directory) {
                    return Err(Error::new(
                        crate::ErrorKind::FailedPrecondition,
                        format!("output directory `{}` is a file", output.name),
                    ));
                }
                let digest = blobs.add_file(function, &path)?;
                result.output_files.push(OutputFile {
                    path: output.name.clone(),
                    digest: Some(digest),
                    is_executable: is_executable(&path)?,
                    ..Default::default()
                });
            }
            Found::Directory(path) => {
                if output.kind == Some(Kind::File) {
                    return Err(Error::new(
                        crate::ErrorKind::FailedPrecondition,
                        format!("output file `{}` is a directory", output.name),
                    ));
                }
                let mut children = Vec::new();
                let root_directory =
                    directory_message(&path, &from_root, function, blobs, &mut children)?;
                let root_directory_digest = match format {
                    DirectoryFormat::Tree => None,
                    DirectoryFormat::TreeAndDirectories => {
                        for child in &children {
                            blobs.add_memory(function, child.encode_to_vec());
                        }
                        Some(blobs.add_memory(function, root_directory.encode_to_vec()))
                    }
                };
                let tree = Tree {
                    root: Some(root_directory),
                    children,
                };
                let tree_digest = blobs.add_memory(function, tree.encode_to_vec());
                result.output_directories.push(OutputDirectory {
                    path: output.name.clone(),
                    tree_digest: Some(tree_digest),
                    is_topologically_sorted: false,
                    root_directory_digest,
                });
            }
            Found::Symlink(target) => {
                let parent = from_root.parent().unwrap_or(Path::new(""));
                check_symlink_target(parent, &target)?;
                let symlink = OutputSymlink {
                    path: output.name.clone(),
                    target,
                    ..Default::default()
                };
                match output.kind {
                    Some(Kind::File) => result.output_file_symlinks.push(symlink.clone()),
                    Some(Kind::Directory) => result.output_directory_symlinks.push(symlink.clone()),
                    None => {}
                }
                result.output_symlinks.push(symlink);
            }
        }
    }
    Ok(())
}

/// The Directory message for the directory at `path` (at `from_root` relative to the
/// action root), adding every subdirectory's message to `children`.
fn directory_message(
    path: &Path,
    from_root: &Path,
    function: DigestFunction,
    blobs: &mut Blobs,
    children: &mut Vec<Directory>,
) -> Result<Directory> {
    let mut entries: Vec<(String, std::fs::FileType)> = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let name = entry.file_name().into_string().map_err(|name| {
            Error::invalid_argument(format!(
                "output {} contains a name that is not UTF-8: {name:?}",
                from_root.display()
            ))
        })?;
        entries.push((name, entry.file_type()?));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut directory = Directory::default();
    for (name, kind) in entries {
        let child = path.join(&name);
        let child_from_root = from_root.join(&name);
        if kind.is_symlink() {
            let target = std::fs::read_link(&child)?;
            let target = target.to_str().ok_or_else(|| {
                Error::invalid_argument(format!(
                    "output symlink {} has a target that is not UTF-8",
                    child_from_root.display()
                ))
            })?;
            check_symlink_target(from_root, target)?;
            directory.symlinks.push(SymlinkNode {
                name,
                target: target.to_string(),
                ..Default::default()
            });
        } else if kind.is_dir() {
            let message = directory_message(&child, &child_from_root, function, blobs, children)?;
            let digest = digests::of(function, &message.encode_to_vec());
            children.push(message);
            directory.directories.push(DirectoryNode {
                name,
                digest: Some(digest),
            });
        } else if kind.is_file() {
            let digest = blobs.add_file(function, &child)?;
            directory.files.push(FileNode {
                name,
                digest: Some(digest),
                is_executable: is_executable(&child)?,
                ..Default::default()
            });
        }
    }
    Ok(directory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(deprecated)]
    fn wanted_outputs_are_checked() {
        let command = Command {
            output_paths: vec!["out/a".into(), "b".into()],
            output_files: vec!["ignored".into()],
            ..Default::default()
        };
        let outputs = wanted(&command).unwrap();
        assert_eq!(outputs.len(), 2);
        assert!(outputs.iter().all(|output| output.kind.is_none()));

        let legacy = Command {
            output_files: vec!["f".into()],
            output_directories: vec!["d".into()],
            ..Default::default()
        };
        let outputs = wanted(&legacy).unwrap();
        assert_eq!(outputs[0].kind, Some(Kind::File));
        assert_eq!(outputs[1].kind, Some(Kind::Directory));

        for bad in ["../x", "/etc/passwd", "a/../../b", "", "a//b"] {
            let command = Command {
                output_paths: vec![bad.into()],
                ..Default::default()
            };
            let error = wanted(&command).unwrap_err();
            assert_eq!(error.kind(), crate::ErrorKind::InvalidArgument, "{bad}");
            let command = Command {
                output_files: vec![bad.into()],
                ..Default::default()
            };
            assert!(wanted(&command).is_err(), "{bad}");
        }
    }

    #[test]
    fn collects_files_trees_and_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        std::fs::create_dir_all(root.join("w/dir/sub")).unwrap();
        std::fs::write(root.join("w/file"), b"hello").unwrap();
        std::fs::write(root.join("w/dir/sub/x"), b"x").unwrap();
        std::os::unix::fs::symlink("sub/x", root.join("w/dir/link")).unwrap();
        std::os::unix::fs::symlink("file", root.join("w/slink")).unwrap();
        let command = Command {
            output_paths: vec!["file".into(), "dir".into(), "slink".into(), "absent".into()],
            ..Default::default()
        };
        let mut result = ActionResult::default();
        let mut blobs = Blobs::default();
        collect(
            root,
            Path::new("w"),
            &wanted(&command).unwrap(),
            DirectoryFormat::Tree,
            DigestFunction::Sha256,
            &mut result,
            &mut blobs,
        )
        .unwrap();
        assert_eq!(result.output_files.len(), 1);
        assert_eq!(
            result.output_files[0].digest.as_ref().unwrap().hash,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(result.output_directories.len(), 1);
        assert_eq!(result.output_symlinks.len(), 1);
        assert_eq!(result.output_symlinks[0].target, "file");
        let tree_digest = result.output_directories[0].tree_digest.clone().unwrap();
        let tree = Tree::decode(blobs.memory[&key(&tree_digest)].clone()).unwrap();
        let tree_root = tree.root.unwrap();
        assert_eq!(tree_root.directories[0].name, "sub");
        assert_eq!(tree_root.symlinks[0].target, "sub/x");
        assert_eq!(tree.children.len(), 1);
    }

    #[test]
    fn directories_are_stored_separately_only_when_asked_for() {
        use cairn_proto::reapi::command::OutputDirectoryFormat;
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        std::fs::create_dir_all(root.join("out/a/b")).unwrap();
        std::fs::write(root.join("out/a/b/leaf"), b"leaf").unwrap();
        std::fs::write(root.join("out/empty"), b"").unwrap();
        for (asked, stored) in [
            (OutputDirectoryFormat::TreeOnly, DirectoryFormat::Tree),
            (
                OutputDirectoryFormat::DirectoryOnly,
                DirectoryFormat::TreeAndDirectories,
            ),
            (
                OutputDirectoryFormat::TreeAndDirectory,
                DirectoryFormat::TreeAndDirectories,
            ),
        ] {
            let command = Command {
                output_paths: vec!["out".into()],
                output_directory_format: asked as i32,
                ..Default::default()
            };
            assert_eq!(directory_format(&command), stored);
            let mut result = ActionResult::default();
            let mut blobs = Blobs::default();
            collect(
                root,
                Path::new(""),
                &wanted(&command).unwrap(),
                stored,
                DigestFunction::Sha256,
                &mut result,
                &mut blobs,
            )
            .unwrap();
            let output = &result.output_directories[0];
            let tree =
                Tree::decode(blobs.memory[&key(output.tree_digest.as_ref().unwrap())].clone())
                    .unwrap();
            let Some(root_digest) = &output.root_directory_digest else {
                assert_eq!(stored, DirectoryFormat::Tree, "{asked:?}");
                assert_eq!(blobs.memory.len(), 1, "only the Tree is uploaded");
                continue;
            };
            assert_eq!(stored, DirectoryFormat::TreeAndDirectories, "{asked:?}");
            // The root and every subdirectory are uploaded, each as the message the
            // Tree and its parent name.
            let root_message = Directory::decode(blobs.memory[&key(root_digest)].clone()).unwrap();
            assert_eq!(Some(&root_message), tree.root.as_ref());
            let mut pending = vec![root_message];
            let mut seen = 0;
            while let Some(directory) = pending.pop() {
                seen += 1;
                for child in &directory.directories {
                    let bytes = &blobs.memory[&key(child.digest.as_ref().unwrap())];
                    pending.push(Directory::decode(bytes.clone()).unwrap());
                }
            }
            assert_eq!(seen, 1 + tree.children.len());
            assert_eq!(seen, 3);
        }
        let unknown = Command {
            output_directory_format: 77,
            ..Default::default()
        };
        assert_eq!(directory_format(&unknown), DirectoryFormat::Tree);
    }

    #[test]
    fn escaping_output_symlinks_are_rejected() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        std::fs::create_dir_all(root.join("dir")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("dir/abs")).unwrap();
        std::os::unix::fs::symlink("../../x", root.join("up")).unwrap();
        for output in ["dir", "up", "dir/abs/passwd"] {
            let command = Command {
                output_paths: vec![output.into()],
                ..Default::default()
            };
            let error = collect(
                root,
                Path::new(""),
                &wanted(&command).unwrap(),
                DirectoryFormat::Tree,
                DigestFunction::Sha256,
                &mut ActionResult::default(),
                &mut Blobs::default(),
            )
            .unwrap_err();
            assert_eq!(error.kind(), crate::ErrorKind::InvalidArgument, "{output}");
        }
    }
}
