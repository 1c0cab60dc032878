//! The rule every id of the protocol that is not a user id follows (conversation
//! ids, client message ids): non-empty, at most [`MAX_ID_BYTES`], no control
//! characters. User ids follow the stricter rule of a token's `sub`
//! (`switchboard_auth::validate_user_id`).

/// Longest id, in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// What is wrong with `id`, or `None` when it is a valid id.
pub fn id_problem(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        Some("is empty")
    } else if id.len() > MAX_ID_BYTES {
        Some("is longer than 128 bytes")
    } else if id.chars().any(char::is_control) {
        Some("contains control characters")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_bounded_and_free_of_control_characters() {
        assert_eq!(id_problem("0193a1b2-conv"), None);
        assert_eq!(id_problem(&"x".repeat(MAX_ID_BYTES)), None);
        assert!(id_problem("").is_some());
        assert!(id_problem(&"x".repeat(MAX_ID_BYTES + 1)).is_some());
        assert!(id_problem("a\u{0}b").is_some());
        assert!(id_problem("a\nb").is_some());
        assert!(id_problem("a\u{7f}").is_some());
    }
}
