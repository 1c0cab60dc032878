//! The gateway's one error type and its mappings to client error codes and gRPC status.

use switchboard_proto::{client_message, status, status_error_code, v1, ErrorCode};

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

    /// The error as the client sees it. Backend messages are passed on only when a
    /// Switchboard service wrote them for clients ("not a member of the conversation");
    /// failures of the internal call itself (tonic's statuses) and internal errors get
    /// a generic message, their detail is only logged (see `Display`).
    pub(crate) fn to_event(&self) -> v1::ErrorEvent {
        let code = self.code();
        let message = match self {
            GatewayError::Rejected { message, .. } | GatewayError::Throttled { message } => {
                message.clone()
            }
            GatewayError::Backend { status, .. } => client_message(status).to_owned(),
        };
        v1::ErrorEvent {
            code: code.as_str().to_owned(),
            message,
            retry_after_ms: 0,
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

    #[test]
    fn a_response_above_the_grpc_limit_is_internal_without_its_text() {
        let e = GatewayError::backend("storage.history")(tonic::Status::out_of_range(
            "Error, decoded message length too large: found 4194400 bytes, the limit is: 4194304 bytes",
        ));
        let event = e.to_event();
        assert_eq!(event.code, "internal");
        assert_eq!(event.message, "internal error");
        // The detail stays in the server's log line.
        assert!(e.to_string().contains("4194304"));
        let e = GatewayError::backend("presence.watch")(tonic::Status::unavailable(
            "error trying to connect: tcp connect error",
        ));
        let event = e.to_event();
        assert_eq!(event.code, "unavailable");
        assert!(!event.message.contains("tcp"));
    }
}
