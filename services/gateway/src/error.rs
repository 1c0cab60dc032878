//! The gateway's one error type and its mappings to client error codes and gRPC status.

use switchboard_proto::{status, status_error_code, v1, ErrorCode};

/// Why a request (or an internal call) failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GatewayError {
    /// The client sent something the gateway rejects before calling any backend.
    #[error("{message}")]
    Rejected { code: ErrorCode, message: String },
    /// A request refused because it came too soon after the previous one of its kind
    /// (`typing`): answered with `rate_limited`, but not a protocol violation.
    #[error("{message}")]
    Throttled { message: String },
    /// A backend call failed; its status carries the client code when the backend set one.
    #[error("{call} failed: {}", status.message())]
    Backend {
        call: &'static str,
        status: tonic::Status,
    },
}

impl GatewayError {
    pub(crate) fn rejected(code: ErrorCode, message: impl Into<String>) -> Self {
        GatewayError::Rejected {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::rejected(ErrorCode::InvalidRequest, message)
    }

    pub(crate) fn typing_throttle(message: impl Into<String>) -> Self {
        GatewayError::Throttled {
            message: message.into(),
        }
    }

    /// True for [`GatewayError::Throttled`].
    pub(crate) fn is_typing_throttle(&self) -> bool {
        matches!(self, GatewayError::Throttled { .. })
    }

    /// Context for a failed backend call.
    pub(crate) fn backend(call: &'static str) -> impl FnOnce(tonic::Status) -> GatewayError {
        move |status| GatewayError::Backend { call, status }
    }

    /// The stable client code of this error.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            GatewayError::Rejected { code, .. } => *code,
            GatewayError::Throttled { .. } => ErrorCode::RateLimited,
            GatewayError::Backend { status, .. } => status_error_code(status),
        }
    }

    /// The error as the client sees it. Backend messages are passed on (they are written
    /// for clients: "not a member of the conversation"); internal failures are not detailed.
    pub(crate) fn to_event(&self) -> v1::ErrorEvent {
        let code = self.code();
        let message = match self {
            GatewayError::Rejected { message, .. } | GatewayError::Throttled { message } => {
                message.clone()
            }
            GatewayError::Backend { .. } if code == ErrorCode::Internal => {
                "internal error".to_owned()
            }
            GatewayError::Backend { status, .. } => status.message().to_owned(),
        };
        v1::ErrorEvent {
            code: code.as_str().to_owned(),
            message,
        }
    }
}

impl From<GatewayError> for tonic::Status {
    fn from(e: GatewayError) -> Self {
        match e {
            GatewayError::Backend { status, .. } => status,
            GatewayError::Rejected { code, message } => status(code, message),
            GatewayError::Throttled { message } => status(ErrorCode::RateLimited, message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_codes_survive_to_the_client() {
        let e = GatewayError::backend("storage.history")(status(ErrorCode::NotMember, "no"));
        assert_eq!(e.code(), ErrorCode::NotMember);
        assert_eq!(e.to_event().code, "not_member");
        let e = GatewayError::backend("routing.send")(tonic::Status::internal("disk on fire"));
        assert_eq!(e.to_event().code, "internal");
        assert_eq!(e.to_event().message, "internal error");
    }
}
