//! The timeline event kinds (`Message.kind`) and the shape limits of their fields,
//! written once for every service that checks them (the gateway before routing,
//! routing before the log, storage before `Authorize` and `Append`).

/// Timeline event kinds.
pub mod kinds {
    /// A plain message (also the empty kind).
    pub const MESSAGE: &str = "message";
    pub const EDIT: &str = "edit";
    pub const DELETE: &str = "delete";
    pub const REACTION: &str = "reaction";
    pub const SYSTEM: &str = "system";

    /// Whether `kind` is a plain message ("message" or empty).
    pub fn is_message(kind: &str) -> bool {
        kind.is_empty() || kind == MESSAGE
    }
}

/// Most users one message may mention.
pub const MAX_MENTIONS: usize = 50;
/// Longest reaction emoji, in bytes.
pub const MAX_EMOJI_BYTES: usize = 32;

/// Why `emoji` is not a valid reaction (1..=[`MAX_EMOJI_BYTES`] bytes, no control
/// characters), or `None` when it is.
pub fn emoji_problem(emoji: &str) -> Option<String> {
    if emoji.is_empty() || emoji.len() > MAX_EMOJI_BYTES {
        Some(format!("emoji must be 1 to {MAX_EMOJI_BYTES} bytes"))
    } else if emoji.chars().any(char::is_control) {
        Some("emoji contains control characters".into())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emoji_are_one_to_32_bytes_without_control_characters() {
        assert_eq!(emoji_problem("👍🏽"), None);
        assert!(emoji_problem("").is_some());
        assert!(emoji_problem(&"x".repeat(MAX_EMOJI_BYTES + 1)).is_some());
        assert!(emoji_problem("a\u{7}").is_some());
        assert!(kinds::is_message("") && kinds::is_message("message"));
        assert!(!kinds::is_message(kinds::EDIT));
    }
}
