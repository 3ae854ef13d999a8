//! The one error type of cairn's programs.
//!
//! Every failure a client can cause or observe ends up as a gRPC status or an HTTP
//! status code, so errors carry a [`ErrorKind`] chosen where the failure is understood
//! (a bad resource name is `InvalidArgument` where it is parsed, a missing blob is
//! `NotFound` where it is looked up) and a message for the human reading the client's
//! log. The mapping to wire codes lives here, in one place, so every protocol answers
//! the same failure with the same code.

use std::fmt;

/// What went wrong, in the vocabulary of gRPC status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed: bad resource name, digest, size or offset order.
    InvalidArgument,
    /// The blob, action result or upload does not exist.
    NotFound,
    /// An offset or limit points outside the blob.
    OutOfRange,
    /// The store is full or a limit was exceeded.
    ResourceExhausted,
    /// The request is valid but the state does not allow it.
    FailedPrecondition,
    /// The node is shutting down or a shard cannot be reached; retrying may help.
    Unavailable,
    /// Stored data failed its checksum.
    DataLoss,
    /// The request carries no credentials, or credentials nobody is known by.
    Unauthenticated,
    /// The client is known but may not do this (or the node is read-only).
    PermissionDenied,
    /// A bug or an unexpected I/O failure.
    Internal,
}

/// Longest message an error carries, in bytes. Messages often quote client input (a
/// resource name, a token); quoted whole, a 1 MiB name went into `grpc-message` and
/// the client then failed on its own metadata limit (8 KiB in grpc-go, 16 KiB in
/// Bazel's netty), never seeing the error.
pub const MAX_MESSAGE: usize = 1024;

/// `message` cut to at most [`MAX_MESSAGE`] bytes on a character boundary, saying how
/// much was left out.
fn bounded(mut message: String) -> String {
    if message.len() <= MAX_MESSAGE {
        return message;
    }
    let total = message.len();
    let mut cut = MAX_MESSAGE - 40;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    message.truncate(cut);
    message.push_str(&format!("… ({} more bytes)", total - cut));
    message
}

/// An error with the kind that decides its wire status and a human-readable message.
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    /// An error of `kind` described by `message`, cut to [`MAX_MESSAGE`] bytes.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: bounded(message.into()),
        }
    }

    /// A malformed request.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// Something the request names does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// An offset or limit outside the blob.
    pub fn out_of_range(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::OutOfRange, message)
    }

    /// Missing or unknown credentials.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unauthenticated, message)
    }

    /// A known client lacking a permission.
    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::PermissionDenied, message)
    }

    /// An unexpected failure.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl ErrorKind {
    /// The gRPC status code for this kind.
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorKind::NotFound => tonic::Code::NotFound,
            ErrorKind::OutOfRange => tonic::Code::OutOfRange,
            ErrorKind::ResourceExhausted => tonic::Code::ResourceExhausted,
            ErrorKind::FailedPrecondition => tonic::Code::FailedPrecondition,
            ErrorKind::Unavailable => tonic::Code::Unavailable,
            ErrorKind::DataLoss => tonic::Code::DataLoss,
            ErrorKind::Unauthenticated => tonic::Code::Unauthenticated,
            ErrorKind::PermissionDenied => tonic::Code::PermissionDenied,
            ErrorKind::Internal => tonic::Code::Internal,
        }
    }

    /// The HTTP status code for this kind, as the HTTP cache protocol answers it.
    pub fn http_status(self) -> http::StatusCode {
        match self {
            ErrorKind::InvalidArgument | ErrorKind::OutOfRange => http::StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => http::StatusCode::NOT_FOUND,
            ErrorKind::ResourceExhausted => http::StatusCode::INSUFFICIENT_STORAGE,
            ErrorKind::FailedPrecondition => http::StatusCode::CONFLICT,
            ErrorKind::Unavailable => http::StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Unauthenticated => http::StatusCode::UNAUTHORIZED,
            ErrorKind::PermissionDenied => http::StatusCode::FORBIDDEN,
            ErrorKind::DataLoss | ErrorKind::Internal => http::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        tonic::Status::new(error.kind.grpc_code(), error.message)
    }
}

impl From<std::io::Error> for Error {
    fn from(error: std::io::Error) -> Self {
        Error::internal(format!("I/O error: {error}"))
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_quoting_huge_client_input_are_cut() {
        let name = "é".repeat(1 << 19);
        let error = Error::invalid_argument(format!("invalid resource name `{name}`"));
        assert!(error.message().len() <= MAX_MESSAGE);
        assert!(
            error.message().ends_with("more bytes)"),
            "{}",
            error.message()
        );
        let short = Error::not_found("blob x not found");
        assert_eq!(short.message(), "blob x not found");
    }
}
