//! The storage engine's errors as the node's.
//!
//! The engine has its own error type (it knows nothing of gRPC); the node answers
//! with the [`Error`] every cairn program shares, which lives in `cairn-common`
//! because the scheduler and the worker use it too and must not depend on the engine.
//! Neither crate can hold the conversion as a `From` (the orphan rule), so the node's
//! services convert explicitly with [`engine_error`], which keeps the kind: a missing
//! blob stays `NotFound`, a full store `ResourceExhausted`, a failed checksum
//! `DataLoss`.

use crate::error::{Error, ErrorKind};

/// `error` with the kind that decides its gRPC and HTTP status.
pub fn engine_error(error: cairn_storage::Error) -> Error {
    use cairn_storage::ErrorKind as Storage;
    let kind = match error.kind() {
        Storage::NotFound => ErrorKind::NotFound,
        Storage::InvalidArgument => ErrorKind::InvalidArgument,
        Storage::OutOfRange => ErrorKind::OutOfRange,
        Storage::ResourceExhausted => ErrorKind::ResourceExhausted,
        Storage::FailedPrecondition => ErrorKind::FailedPrecondition,
        Storage::Unavailable => ErrorKind::Unavailable,
        Storage::DataLoss => ErrorKind::DataLoss,
        Storage::Internal => ErrorKind::Internal,
    };
    Error::new(kind, error.to_string())
}
