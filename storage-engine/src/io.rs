//! The engine's I/O layer: the only module that touches glommio's file API.
//!
//! glommio's last release is from 2024; keeping its types behind this small surface
//! (aligned buffers, positioned O_DIRECT reads and writes, preallocation, sync,
//! unlink) keeps a move to another io_uring runtime a contained change.

use crate::error::{Error, Result};
use bytes::Bytes;
use glommio::io::{DmaBuffer, DmaFile, OpenOptions};
use glommio::GlommioError;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// An aligned buffer suitable for O_DIRECT writes.
pub struct IoBuf(DmaBuffer);

impl IoBuf {
    pub fn as_mut(&mut self) -> &mut [u8] {
        self.0.as_bytes_mut()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// A segment (or checkpoint) file opened for O_DIRECT reads and writes.
pub struct SegFile {
    file: DmaFile,
    path: PathBuf,
}

impl SegFile {
    /// Creates a new file of `size` bytes. Preallocated, its whole size is allocated
    /// now, so that running out of disk space is discovered here, as a clear error;
    /// otherwise it is sparse, and [`SegFile::allocate`] allocates each range before
    /// it is written.
    pub async fn create(path: &Path, size: u64, preallocate: bool) -> Result<SegFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .dma_open(path)
            .await
            .map_err(|e| failed("creating", path, e))?;
        let sized = if preallocate {
            file.pre_allocate(size, false)
                .await
                .map_err(|e| failed(&format!("allocating {size} bytes for"), path, e))
        } else {
            file.truncate(size)
                .await
                .map_err(|e| failed(&format!("sizing to {size} bytes"), path, e))
        };
        if let Err(e) = sized {
            let _ = file.remove().await;
            let _ = file.close().await;
            return Err(e);
        }
        Ok(SegFile {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Allocates `[pos, pos + len)` of a sparse file on disk before it is written, so
    /// that a full disk shows up here (ENOSPC, EDQUOT: `ResourceExhausted`), before any
    /// byte of the range is written. A plain `fallocate(2)` call: glommio offers only
    /// whole-file preallocation, and allocating one write unit takes microseconds.
    pub fn allocate(&self, pos: u64, len: u64) -> Result<()> {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(length)) = (libc::off_t::try_from(pos), libc::off_t::try_from(len))
        else {
            return Err(Error::invalid(format!(
                "range of {len} bytes at {pos} is beyond any file"
            )));
        };
        // SAFETY: fallocate only reads its integer arguments; the descriptor is open
        // for as long as `self.file` is.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, offset, length) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        tracing::warn!(
            "allocating {len} bytes at {pos} of {}: {err}",
            self.path.display()
        );
        Err(Error::io(
            format!("allocating {len} bytes of {}", describe(&self.path)),
            err,
        ))
    }

    pub async fn open(path: &Path) -> Result<SegFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .dma_open(path)
            .await
            .map_err(|e| failed("opening", path, e))?;
        Ok(SegFile {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn alloc(&self, len: usize) -> IoBuf {
        IoBuf(self.file.alloc_dma_buffer(len))
    }

    /// Writes an aligned buffer at an aligned position; a short write is an error.
    pub async fn write(&self, buf: IoBuf, pos: u64) -> Result<()> {
        self.write_reusing(buf, pos).await.map(drop)
    }

    /// Like [`SegFile::write`], and hands the buffer back for reuse: a fresh 1 MiB
    /// buffer per write unit cost a page fault per 4 KiB filled, 9% of the CPU of a
    /// large upload (glibc returns such allocations to the kernel on free).
    pub async fn write_reusing(&self, buf: IoBuf, pos: u64) -> Result<IoBuf> {
        let len = buf.len();
        let shared = Rc::new(buf.0);
        let n = self
            .file
            .write_rc_at(shared.clone(), pos)
            .await
            .map_err(|e| failed("writing", &self.path, e))?;
        if n != len {
            tracing::warn!("short write to {} at {pos}", self.path.display());
            return Err(Error::io(
                format!("short write to {} at {pos}", describe(&self.path)),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(match Rc::try_unwrap(shared) {
            Ok(buf) => IoBuf(buf),
            Err(_) => self.alloc(len),
        })
    }

    /// Copies `data` into an aligned buffer padded with zeros and writes it at `pos`.
    pub async fn write_padded(&self, data: &[u8], pos: u64) -> Result<()> {
        self.write(self.padded(data), pos).await
    }

    /// `data` copied into an I/O buffer, zero-padded to whole blocks.
    pub fn padded(&self, data: &[u8]) -> IoBuf {
        let mut buf = self.alloc(crate::format::align_up(data.len() as u64) as usize);
        let out = buf.as_mut();
        out[..data.len()].copy_from_slice(data);
        out[data.len()..].fill(0);
        buf
    }

    /// Reads `len` bytes at any position; fewer bytes come back only at end of file.
    pub async fn read(&self, pos: u64, len: usize) -> Result<Bytes> {
        let rr = self
            .file
            .read_at(pos, len)
            .await
            .map_err(|e| failed(&format!("reading {len} bytes at {pos} of"), &self.path, e))?;
        Ok(Bytes::copy_from_slice(&rr))
    }

    pub async fn sync(&self) -> Result<()> {
        #[cfg(feature = "fault-injection")]
        crate::faults::before_sync(&self.path)
            .await
            .map_err(|e| Error::io(format!("syncing {}", describe(&self.path)), e))?;
        self.file
            .fdatasync()
            .await
            .map_err(|e| failed("syncing", &self.path, e))
    }

    pub async fn size(&self) -> Result<u64> {
        self.file
            .file_size()
            .await
            .map_err(|e| failed("stat", &self.path, e))
    }

    /// Closes the descriptor. Files must be closed while their executor still runs:
    /// glommio closes a dropped file through the executor's ring, and leaks the
    /// descriptor if the executor is gone.
    pub async fn close(self) -> Result<()> {
        self.file
            .close()
            .await
            .map_err(|e| failed("closing", &self.path, e))
    }

    /// Unlinks the file. Readers and writers holding it keep a valid descriptor.
    pub async fn remove(&self) -> Result<()> {
        self.file
            .remove()
            .await
            .map_err(|e| failed("removing", &self.path, e))
    }
}

/// A file of the store named by its place in it ("segment 0000002a.packed of partition
/// 3"), never by its absolute path: messages reach clients, and the server's layout is
/// none of their business.
pub(crate) fn describe(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy());
    let partition = path
        .parent()
        .and_then(Path::file_name)
        .and_then(|p| p.to_str()?.strip_prefix('p')?.parse::<u32>().ok());
    match (name, partition) {
        (Some(name), Some(p)) => format!("segment {name} of partition {p}"),
        (Some(name), None) => format!("file {name}"),
        (None, _) => "a file".to_string(),
    }
}

/// An engine error for a failed glommio call on `path`. glommio's own message carries
/// the absolute path and the descriptor number: it goes to the log, and the error,
/// which clients see, keeps only the OS error and [`describe`]'s name for the file.
fn failed(what: &str, path: &Path, err: GlommioError<()>) -> Error {
    tracing::warn!("{what} {}: {err}", path.display());
    Error::io(format!("{what} {}", describe(path)), os_error(err))
}

/// The OS error inside a glommio error, without glommio's path and descriptor.
pub(crate) fn os_error(err: GlommioError<()>) -> std::io::Error {
    match err {
        GlommioError::EnhancedIoError { source, .. } => source,
        other => std::io::Error::from(other),
    }
}

/// Makes glommio's per-thread probe of io_uring polled I/O (IOPOLL) read real data.
///
/// The first O_DIRECT file a glommio thread opens on a device decides, for the rest of
/// the thread's life, whether reads on that device go to the polled ring: glommio
/// reads the file's first block and treats success as "IOPOLL works". A new segment
/// file's first block is unwritten, so the filesystem answers that read with zeros
/// without touching the device, the probe wrongly succeeds on devices without poll
/// queues (virtio disks, most cloud volumes), and every later read of written data
/// fails with EOPNOTSUPP. Opening, first, a file whose first block is really on the
/// device makes the probe exercise the device and get the right answer. `shard` keeps
/// the probe files of concurrent threads apart.
pub async fn prime_iopoll_probe(dir: &Path, shard: usize) -> Result<()> {
    use std::io::Write;
    let path = dir.join(format!(".iopoll-probe-{shard}"));
    let written = std::fs::File::create(&path).and_then(|mut file| {
        file.write_all(&[0xA5; 64 << 10])?;
        file.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&path);
        return Err(Error::io(format!("writing {}", path.display()), e));
    }
    let opened = OpenOptions::new().read(true).dma_open(&path).await;
    let _ = std::fs::remove_file(&path);
    let file = opened.map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let _ = file.close().await;
    Ok(())
}

/// Spawns a task on the current shard's executor.
pub fn spawn<F: std::future::Future<Output = ()> + 'static>(fut: F) {
    glommio::spawn_local(fut).detach();
}

/// Spawns a task on the current shard's executor and returns a future of its result.
pub fn spawn_joinable<T: 'static>(
    fut: impl std::future::Future<Output = T> + 'static,
) -> impl std::future::Future<Output = T> {
    glommio::spawn_local(fut)
}

pub async fn sleep(d: std::time::Duration) {
    glommio::timer::sleep(d).await;
}

/// Lets the executor hand the I/O queued so far to the kernel, then resumes.
///
/// glommio submits queued requests only between runs of its task queues, and a task
/// that never waits (an upload whose next chunk is always already there) keeps the
/// queue running for up to the 100 ms preemption period. An upload that spawned a
/// write and went straight on hashing the next unit left that write unsubmitted until
/// it waited for it, so hashing and the device never overlapped. Measured with
/// `engine-seq` (16 MiB blobs, one upload): waiting for writes fell from 7.5 ms to
/// 0.45 ms per blob, and the put from 850 to 1280 MiB/s. The pause is a 5 µs timer:
/// one that is already due by its first poll does not park the task at all.
pub async fn submit_queued() {
    glommio::timer::sleep(std::time::Duration::from_micros(5)).await;
}

/// A shard executor thread started by [`spawn_executor`].
pub struct ExecutorThread(glommio::ExecutorJoinHandle<()>);

impl ExecutorThread {
    pub fn join(self) {
        if let Err(e) = self.0.join() {
            tracing::error!("storage shard executor failed: {e}");
        }
    }
}

/// Runs `f()` on a new executor thread; used by `Engine::start`.
pub fn spawn_executor<F, Fut>(name: &str, cpu: Option<usize>, f: F) -> Result<ExecutorThread>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let placement = match cpu {
        Some(c) => glommio::Placement::Fixed(c),
        None => glommio::Placement::Unbound,
    };
    glommio::LocalExecutorBuilder::new(placement)
        .name(name)
        .spawn(f)
        .map(ExecutorThread)
        .map_err(|e| {
            Error::io(
                "starting a storage shard",
                std::io::Error::other(e.to_string()),
            )
        })
}
