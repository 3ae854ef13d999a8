//! Startup checks that turn environment problems into sentences.
//!
//! glommio panics or silently slows down when the environment is wrong: io_uring
//! blocked by a seccomp profile (Docker's and containerd's defaults) or by
//! `kernel.io_uring_disabled`, a locked-memory limit below the 10 MiB of I/O buffers
//! each executor registers, or a data directory on a filesystem without O_DIRECT
//! (tmpfs). Each is checked before any executor starts and reported with its fix.

use crate::error::{Error, ErrorKind, Result};
use std::path::Path;

/// glommio registers this much I/O memory per executor (its default `io_memory`).
pub const IO_MEMORY_PER_EXECUTOR: u64 = 10 << 20;

/// Fails with a clear message if this process cannot create an io_uring.
pub fn io_uring() -> Result<()> {
    // SAFETY: io_uring_setup with a zeroed params struct only reads and writes that
    // struct; the returned descriptor is closed right away.
    let mut params = [0u8; 120];
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd >= 0 {
        // SAFETY: fd was just returned by the kernel and is owned here.
        unsafe { libc::close(fd as libc::c_int) };
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(0);
    let why = if disabled > 0 {
        format!(
            "kernel.io_uring_disabled is {disabled}; run `sysctl kernel.io_uring_disabled=0` \
             (or =1 with this user in the io_uring group)"
        )
    } else if err.raw_os_error() == Some(libc::ENOSYS) {
        "the kernel has no io_uring support (Linux 5.8 or later with CONFIG_IO_URING is needed)"
            .to_string()
    } else {
        "a seccomp profile blocks it: Docker and containerd block io_uring by default; run \
         the container with `--security-opt seccomp=unconfined` or a profile that allows \
         io_uring_setup, io_uring_enter and io_uring_register"
            .to_string()
    };
    Err(Error::new(
        ErrorKind::FailedPrecondition,
        format!("io_uring is unavailable ({err}): {why}"),
    ))
}

/// Raises RLIMIT_MEMLOCK to what `executors` glommio executors need, if it is lower and
/// the hard limit (or root) allows. Returns a warning when it could not.
pub fn memlock(executors: usize) -> Option<String> {
    let need = IO_MEMORY_PER_EXECUTOR * executors as u64 + (8 << 20);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur == libc::RLIM_INFINITY || lim.rlim_cur >= need {
        return None;
    }
    let raised = libc::rlimit {
        rlim_cur: need.max(lim.rlim_cur),
        rlim_max: lim.rlim_max.max(need),
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raised) } == 0 {
        return None;
    }
    Some(format!(
        "locked-memory limit is {} KiB but {} executors need {} KiB of registered I/O \
         buffers; I/O falls back to a slower path. Raise it with `ulimit -l {}` or \
         LimitMEMLOCK= in the systemd unit",
        lim.rlim_cur / 1024,
        executors,
        need / 1024,
        need / 1024
    ))
}

/// Fails if files in `dir` cannot be opened with O_DIRECT; returns a warning when the
/// directory is on tmpfs, which accepts O_DIRECT since Linux 6.6 but keeps the data in
/// memory, so it vanishes at reboot and counts against RAM.
pub fn data_dir(dir: &Path) -> Result<Option<String>> {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join(".o_direct_probe");
    let res = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe);
    let _ = std::fs::remove_file(&probe);
    match res {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            return Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "the data directory {} is on a filesystem without O_DIRECT support \
                     (tmpfs before Linux 6.6?); put it on a disk-backed filesystem such as \
                     ext4 or xfs",
                    dir.display()
                ),
            ))
        }
        Err(e) => return Err(Error::io(format!("probing {}", dir.display()), e)),
    }
    Ok(on_tmpfs(dir).then(|| {
        format!(
            "the data directory {} is on tmpfs: stored blobs live in RAM and are lost at \
             reboot",
            dir.display()
        )
    }))
}

fn on_tmpfs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we pass; the path is NUL-terminated.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut buf) };
    rc == 0 && buf.f_type == libc::TMPFS_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmpfs_data_dir_is_reported() {
        let shm = Path::new("/dev/shm");
        if !on_tmpfs(shm) {
            return;
        }
        let dir = tempfile::tempdir_in(shm).unwrap();
        match data_dir(dir.path()) {
            Ok(Some(warning)) => assert!(warning.contains("tmpfs"), "{warning}"),
            Ok(None) => panic!("tmpfs not reported"),
            Err(e) => assert!(e.message().contains("O_DIRECT"), "{e}"),
        }
        let disk = tempfile::tempdir().unwrap();
        if !on_tmpfs(disk.path()) {
            assert!(matches!(data_dir(disk.path()), Ok(None)));
        }
    }
}
