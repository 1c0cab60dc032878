//! The one error type of the client.

use switchboard_proto::{ErrorCode, ErrorEvent};

/// Why a client call failed.
///
/// `Clone` because one connection failure is handed to every request that was
/// waiting on that connection.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// The WebSocket connection could not be opened. `status` is the HTTP status
    /// when the server refused the upgrade (for example 401 with `reason` taken from
    /// the response body); `None` when no HTTP response was read (refused TCP
    /// connection, bad URL, broken handshake).
    #[error("connect failed (status {status:?}): {reason}")]
    Connect { status: Option<u16>, reason: String },
    /// The server answered the request with an error ack. `retry_after_ms` is the
    /// server's hint for `rate_limited` (0 when it gave none).
    #[error("server error {code}: {message}")]
    Server {
        code: ErrorCode,
        message: String,
        retry_after_ms: u32,
    },
    /// No ack arrived within the request timeout. The request may or may not have
    /// taken effect on the server.
    #[error("request timed out")]
    Timeout,
    /// The connection is closed. `code` and `reason` come from the server's close
    /// frame when it sent one (for example reason `slow_consumer`).
    #[error("connection closed (code {code:?}): {reason}")]
    Closed { code: Option<u16>, reason: String },
    /// The server sent something the protocol does not allow (an undecodable frame,
    /// a first frame that is not `welcome`, an ack of the wrong kind).
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The error of an error ack. A code this client does not know becomes
    /// `internal`, with the original code kept in the message.
    pub fn from_error_event(error: ErrorEvent) -> ClientError {
        match ErrorCode::parse(&error.code) {
            Some(code) => ClientError::Server {
                code,
                message: error.message,
                retry_after_ms: error.retry_after_ms,
            },
            None => ClientError::Server {
                code: ErrorCode::Internal,
                message: format!("{}: {}", error.code, error.message),
                retry_after_ms: error.retry_after_ms,
            },
        }
    }

    /// How long the server asked to wait before the next request (its
    /// `retry_after_ms` with `rate_limited`); zero when it said nothing.
    pub fn retry_after(&self) -> std::time::Duration {
        match self {
            ClientError::Server { retry_after_ms, .. } => {
                std::time::Duration::from_millis(u64::from(*retry_after_ms))
            }
            _ => std::time::Duration::ZERO,
        }
    }

    /// The server error code, if this is a server error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether repeating the same request later (possibly on a new connection) can
    /// succeed: timeouts, closed connections, connection failures that are not a
    /// refusal by the server, and the server codes that ask for a retry.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Timeout | ClientError::Closed { .. } => true,
            ClientError::Connect { status, .. } => match status {
                None => true,
                Some(status) => *status == 429 || *status >= 500,
            },
            ClientError::Server { code, .. } => matches!(
                code,
                ErrorCode::Unavailable
                    | ErrorCode::Timeout
                    | ErrorCode::Draining
                    | ErrorCode::RateLimited
            ),
            ClientError::Protocol(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_codes() {
        let e = ClientError::from_error_event(ErrorEvent {
            code: "not_member".into(),
            message: "no".into(),
            ..Default::default()
        });
        assert_eq!(e.code(), Some(ErrorCode::NotMember));
        assert!(!e.is_retryable());
        let e = ClientError::from_error_event(ErrorEvent {
            code: "brand_new".into(),
            message: "m".into(),
            ..Default::default()
        });
        assert_eq!(
            e,
            ClientError::Server {
                code: ErrorCode::Internal,
                message: "brand_new: m".into(),
                retry_after_ms: 0,
            }
        );
    }

    #[test]
    fn retryable_errors() {
        assert!(ClientError::Timeout.is_retryable());
        assert!(ClientError::Closed {
            code: None,
            reason: String::new()
        }
        .is_retryable());
        assert!(ClientError::Server {
            code: ErrorCode::Unavailable,
            message: String::new(),
            retry_after_ms: 0,
        }
        .is_retryable());
        assert!(!ClientError::Connect {
            status: Some(401),
            reason: "expired".into()
        }
        .is_retryable());
        assert!(ClientError::Connect {
            status: None,
            reason: "refused".into()
        }
        .is_retryable());
        assert!(!ClientError::Protocol("x".into()).is_retryable());
    }
}
