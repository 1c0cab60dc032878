//! The presence service's one error type and its one mapping to gRPC status.

use switchboard_proto::{status, ErrorCode};

/// Why a presence operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// A field is missing or invalid, or a bound (id length, watch cap) is exceeded.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The named session (or the watcher's session on a gateway) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The session store cannot be reached; the caller may retry with backoff.
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    /// An unexpected failure inside the service.
    #[error("internal error: {0}")]
    Internal(String),
}

impl PresenceError {
    /// The stable client error code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            PresenceError::InvalidRequest(_) => ErrorCode::InvalidRequest,
            PresenceError::NotFound(_) => ErrorCode::NotFound,
            PresenceError::Unavailable(_) => ErrorCode::Unavailable,
            PresenceError::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl From<PresenceError> for tonic::Status {
    fn from(err: PresenceError) -> Self {
        status(err.code(), err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_proto::status_error_code;

    #[test]
    fn errors_map_to_their_client_codes() {
        let cases = [
            (
                PresenceError::InvalidRequest("x".into()),
                ErrorCode::InvalidRequest,
            ),
            (PresenceError::NotFound("x".into()), ErrorCode::NotFound),
            (
                PresenceError::Unavailable("x".into()),
                ErrorCode::Unavailable,
            ),
            (PresenceError::Internal("x".into()), ErrorCode::Internal),
        ];
        for (err, code) in cases {
            let st = tonic::Status::from(err);
            assert_eq!(status_error_code(&st), code);
            assert_eq!(st.code(), code.grpc_code());
        }
    }
}
