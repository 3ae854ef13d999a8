//! The open-file limit, and the number of client connections it leaves room for.
//!
//! Every connection is a file descriptor, and so are the segment files, checkpoints,
//! the S3 client's sockets and the pipes to the node's children. systemd's default
//! soft limit is 1024, far below what a CI fleet's connections need, while the hard
//! limit is usually much higher: the node raises its soft limit to the hard one at
//! start, and admits at most as many connections as leave a reserve for everything
//! else. Past that, a new connection is accepted and closed at once, which a client
//! sees as a clean refusal it can retry, rather than a listen backlog that never
//! drains while `accept` fails with EMFILE.

use std::io;

/// Descriptors kept for the node's own files besides connections: segment files
/// (up to three open per partition), checkpoints being written, S3 and child-process
/// sockets and pipes, log files.
const RESERVE_BASE: u64 = 256;
const RESERVE_PER_PARTITION: u64 = 4;

/// Fewest connections a node admits whatever its limit.
const MIN_CONNECTIONS: u64 = 16;

/// The soft limit before and after [`raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit the process started with.
    pub before: u64,
    /// The soft limit now in force.
    pub now: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit.
pub fn raise() -> io::Result<FdLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct passed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(FdLimit {
        before,
        now: limit.rlim_cur,
    })
}

/// The default `max_connections` for a process allowed `fd_limit` descriptors with
/// `partitions` storage partitions.
pub fn default_max_connections(fd_limit: u64, partitions: u64) -> u64 {
    let reserve = RESERVE_BASE + RESERVE_PER_PARTITION * partitions;
    fd_limit.saturating_sub(reserve).max(MIN_CONNECTIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_leaves_room_for_the_store() {
        assert_eq!(default_max_connections(1024, 32), 1024 - 256 - 128);
        assert_eq!(default_max_connections(1 << 20, 32), (1 << 20) - 384);
        assert_eq!(default_max_connections(256, 64), MIN_CONNECTIONS);
    }
}
