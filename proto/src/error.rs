//! Stable error codes of the client protocol and their one mapping to gRPC.
//!
//! Services return `tonic::Status` built by [`status`]; the code travels in the
//! `x-switchboard-error` metadata so the gateway can give clients the precise code
//! (for example `not_member` rather than a generic `permission_denied`).

use std::fmt;

const ERROR_METADATA: &str = "x-switchboard-error";

/// A stable, machine-readable error code. The string forms are part of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frame could not be decoded (bad JSON or protobuf).
    BadFrame,
    /// The frame decoded but names no known request.
    UnknownFrame,
    /// The frame is larger than the gateway accepts.
    FrameTooLarge,
    /// A message body is larger than the configured maximum.
    BodyTooLarge,
    /// A field is missing or has an invalid value.
    InvalidRequest,
    /// The token is missing, expired or invalid.
    Unauthorized,
    /// The caller is not a member of the conversation.
    NotMember,
    /// The caller is a member but lacks the role for this action.
    Forbidden,
    /// The conversation (or other object) does not exist.
    NotFound,
    /// The user is banned from the conversation.
    Banned,
    /// Too many requests; slow down and retry later.
    RateLimited,
    /// A backend or service is unavailable; retry with backoff.
    Unavailable,
    /// The request did not complete in time; it may or may not have taken effect.
    Timeout,
    /// The server is shutting down; reconnect elsewhere.
    Draining,
    /// The client could not keep up with its events and was disconnected.
    SlowConsumer,
    /// An unexpected server error.
    Internal,
}

impl ErrorCode {
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::BadFrame,
        ErrorCode::UnknownFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::BodyTooLarge,
        ErrorCode::InvalidRequest,
        ErrorCode::Unauthorized,
        ErrorCode::NotMember,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Banned,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Timeout,
        ErrorCode::Draining,
        ErrorCode::SlowConsumer,
        ErrorCode::Internal,
    ];

    /// The protocol string of this code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownFrame => "unknown_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotMember => "not_member",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Banned => "banned",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Draining => "draining",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::Internal => "internal",
        }
    }

    /// Parse a protocol string.
    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.as_str() == s)
    }

    /// The gRPC status code this error travels as between services.
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorCode::BadFrame
            | ErrorCode::UnknownFrame
            | ErrorCode::FrameTooLarge
            | ErrorCode::BodyTooLarge
            | ErrorCode::InvalidRequest => tonic::Code::InvalidArgument,
            ErrorCode::Unauthorized => tonic::Code::Unauthenticated,
            ErrorCode::NotMember | ErrorCode::Forbidden | ErrorCode::Banned => {
                tonic::Code::PermissionDenied
            }
            ErrorCode::NotFound => tonic::Code::NotFound,
            ErrorCode::RateLimited | ErrorCode::SlowConsumer => tonic::Code::ResourceExhausted,
            ErrorCode::Unavailable | ErrorCode::Draining => tonic::Code::Unavailable,
            ErrorCode::Timeout => tonic::Code::DeadlineExceeded,
            ErrorCode::Internal => tonic::Code::Internal,
        }
    }

    /// The client code for a gRPC code that carried no explicit one.
    pub fn from_grpc_code(code: tonic::Code) -> ErrorCode {
        match code {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => ErrorCode::InvalidRequest,
            tonic::Code::Unauthenticated => ErrorCode::Unauthorized,
            tonic::Code::PermissionDenied => ErrorCode::Forbidden,
            tonic::Code::NotFound => ErrorCode::NotFound,
            tonic::Code::ResourceExhausted => ErrorCode::RateLimited,
            tonic::Code::Unavailable | tonic::Code::Cancelled => ErrorCode::Unavailable,
            tonic::Code::DeadlineExceeded => ErrorCode::Timeout,
            _ => ErrorCode::Internal,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A gRPC status carrying a client error code.
pub fn status(code: ErrorCode, message: impl Into<String>) -> tonic::Status {
    let mut status = tonic::Status::new(code.grpc_code(), message);
    if let Ok(value) = code.as_str().parse() {
        status.metadata_mut().insert(ERROR_METADATA, value);
    }
    status
}

/// The client code a Switchboard service set on a status with [`status`], if any.
fn explicit_code(status: &tonic::Status) -> Option<ErrorCode> {
    status
        .metadata()
        .get(ERROR_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorCode::parse)
}

/// The client code of a status that carries none: a failure of the internal call
/// itself (tonic's own statuses: connection errors, timeouts, decode errors, size
/// limits), never the client's fault. Connection failures are `unavailable`
/// (retry), an expired deadline `timeout`, anything else `internal`. tonic reports a
/// connection that broke during the call (the service died, or was restarted) as
/// `Unknown` ("transport error"): the call may or may not have taken effect, and a
/// retry with the same idempotency key is the answer, so it is `unavailable` too.
fn transport_code(code: tonic::Code) -> ErrorCode {
    match code {
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown => {
            ErrorCode::Unavailable
        }
        tonic::Code::DeadlineExceeded => ErrorCode::Timeout,
        _ => ErrorCode::Internal,
    }
}

/// The client error code of a gRPC status: the one a Switchboard service set with
/// [`status`], else the code of a failed internal call (see [`client_message`]).
pub fn status_error_code(status: &tonic::Status) -> ErrorCode {
    explicit_code(status).unwrap_or_else(|| transport_code(status.code()))
}

/// The message a client may see for a status of an internal call: the service's own
/// message when a Switchboard service wrote it for clients (it set a client code other
/// than `internal`), else a generic one for the code. tonic's own messages (decode
/// errors, size limits, connection errors) name internals and never reach clients.
pub fn client_message(status: &tonic::Status) -> &str {
    match explicit_code(status) {
        Some(ErrorCode::Internal) => generic_message(ErrorCode::Internal),
        Some(_) => status.message(),
        None => generic_message(transport_code(status.code())),
    }
}

/// The message of a failed internal call, by client code.
fn generic_message(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Unavailable => "a backend service is unavailable, retry later",
        ErrorCode::Timeout => "the request timed out; it may or may not have taken effect",
        _ => "internal error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_strings_and_status() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(*code));
            let st = status(*code, "x");
            assert_eq!(status_error_code(&st), *code);
            assert_eq!(st.code(), code.grpc_code());
        }
    }

    #[test]
    fn plain_status_maps_by_grpc_code() {
        let st = tonic::Status::unavailable("down");
        assert_eq!(status_error_code(&st), ErrorCode::Unavailable);
        assert_eq!(
            client_message(&st),
            "a backend service is unavailable, retry later"
        );
    }

    #[test]
    fn transport_failures_never_show_their_text_nor_blame_the_client() {
        // What tonic answers for a response above its decoding limit.
        let too_big = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes",
        );
        assert_eq!(status_error_code(&too_big), ErrorCode::Internal);
        assert_eq!(client_message(&too_big), "internal error");
        let decode = tonic::Status::internal("failed to decode Protobuf message: buffer underflow");
        assert_eq!(status_error_code(&decode), ErrorCode::Internal);
        assert_eq!(client_message(&decode), "internal error");
        let invalid = tonic::Status::invalid_argument("h2 protocol error");
        assert_eq!(status_error_code(&invalid), ErrorCode::Internal);
        let refused = tonic::Status::unavailable("tcp connect error: Connection refused");
        assert_eq!(status_error_code(&refused), ErrorCode::Unavailable);
        assert!(!client_message(&refused).contains("tcp"));
        let late = tonic::Status::deadline_exceeded("Timeout expired");
        assert_eq!(status_error_code(&late), ErrorCode::Timeout);
        assert!(!client_message(&late).contains("Timeout expired"));
    }

    #[test]
    fn messages_written_for_clients_pass_through_except_internal_ones() {
        let st = status(ErrorCode::NotMember, "not a member of the conversation");
        assert_eq!(client_message(&st), "not a member of the conversation");
        let st = status(ErrorCode::Internal, "cassandra: write timeout at node 3");
        assert_eq!(client_message(&st), "internal error");
    }
}
