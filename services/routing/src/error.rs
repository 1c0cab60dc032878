//! The routing service's error type and its one mapping to gRPC status.

use switchboard_proto::ErrorCode;

/// Why a routing request failed.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("message body is {size} bytes; the limit is {limit} bytes")]
    BodyTooLarge { size: usize, limit: usize },
    #[error("too many messages from this user; slow down")]
    RateLimited,
    #[error("not a member of conversation {0}")]
    NotMember(String),
    #[error("conversation {0} not found")]
    NotFound(String),
    /// Storage refused to authorize the event (not_found, forbidden, not_member,
    /// banned or invalid_request), with its reason; nothing was appended.
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    /// A peer or the event log failed; the request had no effect unless it says so.
    #[error("{0}")]
    Unavailable(String),
    #[error("routing is shutting down")]
    Draining,
}

impl RoutingError {
    /// The stable client code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            RoutingError::InvalidRequest(_) => ErrorCode::InvalidRequest,
            RoutingError::BodyTooLarge { .. } => ErrorCode::BodyTooLarge,
            RoutingError::RateLimited => ErrorCode::RateLimited,
            RoutingError::NotMember(_) => ErrorCode::NotMember,
            RoutingError::NotFound(_) => ErrorCode::NotFound,
            RoutingError::Refused { code, .. } => *code,
            RoutingError::Unavailable(_) => ErrorCode::Unavailable,
            RoutingError::Draining => ErrorCode::Draining,
        }
    }

    /// A failed call to a peer service, with the peer and call named.
    pub(crate) fn peer(call: &str, status: &tonic::Status) -> RoutingError {
        RoutingError::Unavailable(format!("{call} failed: {}", status.message()))
    }
}

impl From<RoutingError> for tonic::Status {
    fn from(e: RoutingError) -> tonic::Status {
        switchboard_proto::status(e.code(), e.to_string())
    }
}
