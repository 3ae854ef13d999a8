//! Another process fills the disk below the engine's budget: writers get a clear
//! RESOURCE_EXHAUSTED, nothing already stored is lost, and writing resumes once space
//! is freed. The store itself fills a disk smaller than its budget: it evicts its
//! oldest segments and every write succeeds. Runs on a small tmpfs mounted for the
//! test (needs root, as CI has).

mod common;

use cairn_storage::{EngineConfig, ErrorKind};
use common::*;
use std::ffi::CString;
use std::path::{Path, PathBuf};

struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size_mib: u64) -> Option<Mount> {
        let target = CString::new(at.to_str()?).ok()?;
        let opts = CString::new(format!("size={size_mib}m")).ok()?;
        // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        (rc == 0).then(|| Mount(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.0.to_string_lossy().as_bytes()) {
            // SAFETY: unmounting the tmpfs this test mounted.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

#[test]
fn full_disk_is_a_clear_error_and_loses_nothing() {
    let base = tempfile::tempdir().unwrap();
    let Some(_mount) = Mount::tmpfs(base.path(), 48) else {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(!root, "mounting a tmpfs failed although running as root");
        panic!("this test mounts a 48 MiB tmpfs and needs root: run the suite as root (CI does)");
    };
    let dir = base.path().join("data");
    let engine = start(EngineConfig {
        max_size: 256 * MIB,
        partitions: 2,
        segment_size: Some(MIB),
        small_blob_max: 64 << 10,
        max_ac_value: 64 << 10,
        ..config(&dir)
    });
    let mut stored = Vec::new();
    for i in 0..40u64 {
        let data = blob(i, 50_000);
        stored.push((put(&engine, &data), data));
    }
    // Another process takes most of what is left.
    let filler = base.path().join("filler");
    let free = {
        // SAFETY: statvfs writes into the zeroed struct.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        let p = CString::new(base.path().to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::statvfs(p.as_ptr(), &mut s) }, 0);
        s.f_bavail * s.f_frsize
    };
    std::fs::write(&filler, vec![1u8; (free - 3 * MIB) as usize]).unwrap();

    let mut refused = None;
    for i in 1000..1400u64 {
        let data = blob(i, 50_000);
        match block_on(engine.put(digest(&data), data.clone())) {
            Ok(()) => stored.push((digest(&data), data)),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let err = refused.expect("writes into a full disk kept succeeding");
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{err}");
    assert!(
        !err.to_string().contains(base.path().to_str().unwrap()),
        "the error names a server path: {err}"
    );
    let stats = block_on(engine.stats()).unwrap();
    assert!(
        stats.disk_full_refusing() > 0,
        "no partition reports the full disk"
    );
    assert_eq!(stats.disk_full_reclaims(), 0, "evicted for another's files");
    for (d, data) in &stored {
        assert!(
            block_on(engine.get_bytes(*d)).unwrap() == *data,
            "{d} lost on full disk"
        );
    }

    std::fs::remove_file(&filler).unwrap();
    let data = blob(5000, 50_000);
    let d = put(&engine, &data);
    assert!(block_on(engine.get_bytes(d)).unwrap() == data);
    block_on(engine.shutdown()).unwrap();
    drop(engine);

    let engine = start(EngineConfig {
        max_size: 256 * MIB,
        partitions: 2,
        segment_size: Some(MIB),
        small_blob_max: 64 << 10,
        max_ac_value: 64 << 10,
        ..config(&dir)
    });
    for (d, data) in &stored {
        assert!(
            block_on(engine.get_bytes(*d)).unwrap() == *data,
            "{d} lost after restart"
        );
    }
    block_on(engine.shutdown()).unwrap();
}

#[test]
fn a_disk_full_of_the_store_evicts_instead_of_refusing() {
    let base = tempfile::tempdir().unwrap();
    let Some(_mount) = Mount::tmpfs(base.path(), 48) else {
        panic!("this test mounts a 48 MiB tmpfs and needs root: run the suite as root (CI does)");
    };
    let dir = base.path().join("data");
    let engine = start(EngineConfig {
        max_size: 256 * MIB,
        partitions: 2,
        segment_size: Some(MIB),
        small_blob_max: 64 << 10,
        max_ac_value: 64 << 10,
        ..config(&dir)
    });
    // 100 MB through a 48 MiB disk, in blobs that take extents and in small ones.
    let mut stored = Vec::new();
    for i in 0..1000u64 {
        let data = blob(i, if i % 2 == 0 { 150_000 } else { 50_000 });
        let d = digest(&data);
        if let Err(e) = block_on(engine.put(d, data.clone())) {
            panic!("write {i} into a disk full of the store failed: {e}");
        }
        stored.push((d, data));
    }
    for (d, data) in &stored[stored.len() - 20..] {
        assert!(block_on(engine.get_bytes(*d)).unwrap() == *data, "{d} lost");
    }
    let (first, _) = &stored[0];
    let err = block_on(engine.get_bytes(*first)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let stats = block_on(engine.stats()).unwrap();
    assert!(stats.disk_full_reclaims() > 0, "no reclaim for a full disk");
    assert_eq!(stats.disk_full_refusing(), 0);
    block_on(engine.shutdown()).unwrap();
}
