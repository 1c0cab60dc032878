//! The storage service's one error type and its one mapping to gRPC.

use switchboard_proto::{status, ErrorCode};

/// Everything a storage operation can fail with.
///
/// `Clone` because one coalesced history query answers several callers, errors
/// included.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// A field is missing or has an invalid value.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The caller is not a member of the conversation.
    #[error("user {user_id} is not a member of conversation {conversation_id}")]
    NotMember {
        conversation_id: String,
        user_id: String,
    },
    /// The caller is a member but lacks the role (or the conversation the kind) for the action.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The conversation (or the message, webhook, ... named in the text) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The user is banned from the conversation.
    #[error("banned: {0}")]
    Banned(String),
    /// An appended sequence is not the conversation's next one. Appends must keep the
    /// sequence gapless, so this is a bug or a second partition owner: it travels as
    /// `internal`.
    #[error(
        "sequence conflict in conversation {conversation_id}: expected seq {expected}, got {got}"
    )]
    SequenceConflict {
        conversation_id: String,
        expected: u64,
        got: u64,
    },
    /// The backend is temporarily unable to serve (busy, shutting down); retry later.
    #[error("history store unavailable: {0}")]
    Unavailable(String),
    /// Anything else (a backend failure or a broken invariant).
    #[error("internal storage error: {0}")]
    Internal(String),
}

impl StorageError {
    /// The stable client error code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            StorageError::InvalidRequest(_) => ErrorCode::InvalidRequest,
            StorageError::NotMember { .. } => ErrorCode::NotMember,
            StorageError::Forbidden(_) => ErrorCode::Forbidden,
            StorageError::NotFound(_) => ErrorCode::NotFound,
            StorageError::Banned(_) => ErrorCode::Banned,
            StorageError::Unavailable(_) => ErrorCode::Unavailable,
            StorageError::SequenceConflict { .. } | StorageError::Internal(_) => {
                ErrorCode::Internal
            }
        }
    }

    pub(crate) fn not_member(conversation_id: &str, user_id: &str) -> Self {
        StorageError::NotMember {
            conversation_id: conversation_id.to_owned(),
            user_id: user_id.to_owned(),
        }
    }
}

impl From<StorageError> for tonic::Status {
    fn from(e: StorageError) -> Self {
        let conflict = matches!(e, StorageError::SequenceConflict { .. });
        let st = status(e.code(), e.to_string());
        if conflict {
            // The partition owner tells a sequence conflict (reload LastSeq and retry)
            // from other failures by the gRPC code; clients still see `internal`.
            let mut aborted = tonic::Status::aborted(st.message());
            *aborted.metadata_mut() = st.metadata().clone();
            aborted
        } else {
            st
        }
    }
}

/// Result of storage operations.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_proto::status_error_code;

    #[test]
    fn errors_travel_with_their_client_code() {
        let cases = [
            (
                StorageError::InvalidRequest("x".into()),
                ErrorCode::InvalidRequest,
            ),
            (StorageError::not_member("c", "u"), ErrorCode::NotMember),
            (StorageError::Forbidden("x".into()), ErrorCode::Forbidden),
            (StorageError::NotFound("c".into()), ErrorCode::NotFound),
            (StorageError::Banned("u".into()), ErrorCode::Banned),
            (
                StorageError::Unavailable("x".into()),
                ErrorCode::Unavailable,
            ),
            (StorageError::Internal("x".into()), ErrorCode::Internal),
            (
                StorageError::SequenceConflict {
                    conversation_id: "c".into(),
                    expected: 3,
                    got: 5,
                },
                ErrorCode::Internal,
            ),
        ];
        for (err, code) in cases {
            let st = tonic::Status::from(err);
            assert_eq!(status_error_code(&st), code);
        }
    }

    #[test]
    fn sequence_conflict_names_expected_and_got() {
        let st = tonic::Status::from(StorageError::SequenceConflict {
            conversation_id: "c".into(),
            expected: 3,
            got: 5,
        });
        assert_eq!(st.code(), tonic::Code::Aborted);
        assert!(
            st.message().contains("expected seq 3, got 5"),
            "{}",
            st.message()
        );
    }
}
