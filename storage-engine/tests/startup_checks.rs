//! Environment problems are reported as sentences, not panics.

mod common;

use cairn_storage::{Engine, ErrorKind};
use common::*;

/// Installs, on the calling thread only, a seccomp filter that fails io_uring_setup
/// with EPERM, as Docker's default profile does.
fn block_io_uring_on_this_thread() {
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const AUDIT_ARCH_AARCH64: u32 = 0xc000_00b7;
    let arch = if cfg!(target_arch = "x86_64") {
        AUDIT_ARCH_X86_64
    } else {
        AUDIT_ARCH_AARCH64
    };
    let stmt = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: 0x15,
        jt,
        jf,
        k,
    };
    let mut filter = [
        stmt(0x20, 4),   // ld arch
        jeq(arch, 1, 0), // foreign arch: allow (not ours to judge)
        stmt(0x06, SECCOMP_RET_ALLOW),
        stmt(0x20, 0), // ld syscall number
        jeq(libc::SYS_io_uring_setup as u32, 0, 1),
        stmt(0x06, SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(0x06, SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: a valid filter program; affects only this thread (no TSYNC flag).
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::syscall(
                libc::SYS_seccomp,
                1, /* SECCOMP_SET_MODE_FILTER */
                0,
                &prog
            ),
            0
        );
    }
}

#[test]
fn io_uring_blocked_by_seccomp_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let err = std::thread::spawn(move || {
        block_io_uring_on_this_thread();
        Engine::open(cfg).err()
    })
    .join()
    .unwrap()
    .expect("engine opened without io_uring");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.message().contains("io_uring"), "{err}");
    assert!(err.message().contains("seccomp"), "{err}");
}

#[test]
fn too_small_a_budget_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cairn_storage::EngineConfig {
        max_size: MIB,
        ..config(dir.path())
    };
    let err = Engine::start(cfg).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.message().contains("too small"), "{err}");
}

#[test]
fn small_budget_with_default_limits_starts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cairn_storage::EngineConfig {
        dir: dir.path().to_path_buf(),
        max_size: 256 * MIB,
        ..Default::default()
    };
    let engine = start(cfg);
    assert!(engine.max_ac_value() < 1 << 20);
    let data = blob(1, 100_000);
    let d = put(&engine, &data);
    assert!(block_on(engine.get_bytes(d)).unwrap() == data);
    block_on(engine.shutdown()).unwrap();
}
