//! The data directory's manifest: format version, partition count and the nonce that
//! seeds every header checksum. Written once, when the directory is created, with a
//! plain `key=value` text format an operator can read.

use crate::error::{Error, ErrorKind, Result};
use std::io::Write;
use std::path::Path;

pub const FILE: &str = "MANIFEST";
/// Data-directory format version; bumped when a change makes old data unreadable.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Manifest {
    pub format_version: u32,
    pub partitions: u32,
    pub nonce: u64,
}

impl Manifest {
    /// Loads the manifest of `dir`, or creates the directory and a new manifest.
    pub fn load_or_create(dir: &Path, partitions: u32) -> Result<Manifest> {
        let path = dir.join(FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let m = Manifest::parse(&text).ok_or_else(|| {
                    Error::new(
                        ErrorKind::FailedPrecondition,
                        format!("{} is not a cairn manifest", path.display()),
                    )
                })?;
                if m.format_version != FORMAT_VERSION {
                    return Err(Error::new(
                        ErrorKind::FailedPrecondition,
                        format!(
                            "{} was created with storage format {}, this build reads format {}; \
                             use a new data directory",
                            dir.display(),
                            m.format_version,
                            FORMAT_VERSION
                        ),
                    ));
                }
                Ok(m)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if partitions == 0 {
                    return Err(Error::invalid("partitions must be at least 1"));
                }
                std::fs::create_dir_all(dir)
                    .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
                let m = Manifest {
                    format_version: FORMAT_VERSION,
                    partitions,
                    nonce: random_nonce(),
                };
                m.write(&path)?;
                Ok(m)
            }
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    fn parse(text: &str) -> Option<Manifest> {
        let mut lines = text.lines();
        if lines.next()? != "cairn-storage" {
            return None;
        }
        let (mut version, mut partitions, mut nonce) = (None, None, None);
        for line in lines {
            let (k, v) = line.split_once('=')?;
            match k {
                "format_version" => version = v.parse().ok(),
                "partitions" => partitions = v.parse().ok().filter(|&p: &u32| p > 0),
                "nonce" => nonce = u64::from_str_radix(v, 16).ok(),
                _ => return None,
            }
        }
        Some(Manifest {
            format_version: version?,
            partitions: partitions?,
            nonce: nonce?,
        })
    }

    fn write(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        let text = format!(
            "cairn-storage\nformat_version={}\npartitions={}\nnonce={:016x}\n",
            self.format_version, self.partitions, self.nonce
        );
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            if let Some(parent) = path.parent() {
                std::fs::File::open(parent)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }
}

fn random_nonce() -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&std::process::id().to_le_bytes());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.update(&t.as_nanos().to_le_bytes());
    }
    let mut buf = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        if f.read_exact(&mut buf).is_ok() {
            h.update(&buf);
        }
    }
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incompatible_format_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest::load_or_create(dir.path(), 4).unwrap();
        assert_eq!(Manifest::load_or_create(dir.path(), 8).unwrap(), m);
        std::fs::write(
            dir.path().join(FILE),
            "cairn-storage\nformat_version=99\npartitions=4\nnonce=00000000000000ff\n",
        )
        .unwrap();
        let err = Manifest::load_or_create(dir.path(), 4).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert!(err.message().contains("format 99"), "{err}");
    }
}
