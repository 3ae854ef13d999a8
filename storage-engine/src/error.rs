//! The engine's one error type.
//!
//! Every failure the engine reports carries an [`ErrorKind`] chosen so that a gRPC front
//! end can map it to a status code without looking at the message: the kinds mirror the
//! codes a REAPI client acts on (NOT_FOUND means "upload it", RESOURCE_EXHAUSTED means
//! "back off", INVALID_ARGUMENT means "your request is wrong, don't retry").

use std::fmt;

/// What went wrong, in the terms a caller acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The blob or action result is not stored (or was dropped because it was corrupt).
    NotFound,
    /// The request itself is wrong: malformed digest, content that does not match its
    /// digest, a stream shorter or longer than its declared size.
    InvalidArgument,
    /// A read offset or limit outside the blob.
    OutOfRange,
    /// The byte budget or the disk is full, or a value exceeds a configured limit.
    ResourceExhausted,
    /// The data directory cannot be used as it is (format version, O_DIRECT, io_uring).
    FailedPrecondition,
    /// The engine is shutting down, or a shard is gone; retrying later may work.
    Unavailable,
    /// Stored bytes failed their checksum while being streamed.
    DataLoss,
    /// An I/O error or a broken invariant.
    Internal,
}

/// An engine error: a kind plus a human-readable message.
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::NotFound, message)
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    pub(crate) fn unavailable() -> Error {
        Error::new(ErrorKind::Unavailable, "storage engine is shutting down")
    }

    /// Wraps an I/O error with what was being done. Out-of-space errors become
    /// `ResourceExhausted` so that callers see "disk full", not "internal error".
    pub(crate) fn io(context: impl fmt::Display, err: impl Into<std::io::Error>) -> Error {
        let err: std::io::Error = err.into();
        // glommio wraps the OS error; its kind survives the wrapping, its code may not.
        let full = matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
            || matches!(
                err.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            );
        let kind = if full {
            ErrorKind::ResourceExhausted
        } else {
            ErrorKind::Internal
        };
        Error::new(kind, format!("{context}: {err}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for Error {}

impl From<glommio::GlommioError<()>> for Error {
    fn from(err: glommio::GlommioError<()>) -> Error {
        Error::io("storage I/O", crate::io::os_error(err))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
