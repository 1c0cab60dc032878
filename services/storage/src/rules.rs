//! Validation and authorization rules, written once for every backend.

use crate::error::{Result, StorageError};
use crate::store::{ConversationKind, MemberAction};

/// Longest id (user, conversation, client message id), in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Longest group name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Most members a conversation may have.
pub const MAX_MEMBERS: usize = 10_000;
/// History page size when the request says 0.
pub const DEFAULT_HISTORY_LIMIT: u32 = 50;
/// Sync messages per conversation when the request says 0.
pub const DEFAULT_SYNC_LIMIT: u32 = 100;
/// Hard cap of sync messages per conversation.
pub const MAX_SYNC_LIMIT: u32 = 200;

/// An id is non-empty, at most [`MAX_ID_BYTES`] long and free of control characters.
pub fn validate_id(field: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(StorageError::InvalidRequest(format!("{field} is required")));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(StorageError::InvalidRequest(format!(
            "{field} is longer than {MAX_ID_BYTES} bytes"
        )));
    }
    if id.chars().any(char::is_control) {
        return Err(StorageError::InvalidRequest(format!(
            "{field} contains control characters"
        )));
    }
    Ok(())
}

/// Like [`validate_id`] but an empty value is allowed.
pub fn validate_optional_id(field: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        Ok(())
    } else {
        validate_id(field, id)
    }
}

/// A group name: at most [`MAX_NAME_BYTES`], no control characters, may be empty.
pub fn validate_name(name: &str) -> Result<()> {
    if name.len() > MAX_NAME_BYTES {
        return Err(StorageError::InvalidRequest(format!(
            "name is longer than {MAX_NAME_BYTES} bytes"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(StorageError::InvalidRequest(
            "name contains control characters".into(),
        ));
    }
    Ok(())
}

/// Validate `ids` and return them deduplicated, first occurrence order kept.
pub fn dedup_ids(field: &str, ids: &[String]) -> Result<Vec<String>> {
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        validate_id(field, id)?;
        if seen.insert(id.as_str()) {
            out.push(id.clone());
        }
    }
    Ok(out)
}

/// A conversation may not grow past [`MAX_MEMBERS`].
pub fn check_member_count(count: usize) -> Result<()> {
    if count > MAX_MEMBERS {
        return Err(StorageError::InvalidRequest(format!(
            "a conversation has at most {MAX_MEMBERS} members"
        )));
    }
    Ok(())
}

/// Who may change a conversation's members:
/// - only groups change (direct -> `Forbidden`);
/// - the actor must be a member (`NotMember`);
/// - the owner adds and removes; any member may remove themselves (leave);
/// - the owner cannot be removed (`Forbidden`).
pub fn authorize_member_change(
    conversation_id: &str,
    kind: ConversationKind,
    owner_id: &str,
    actor_id: &str,
    actor_is_member: bool,
    action: MemberAction,
    user_ids: &[String],
) -> Result<()> {
    if kind != ConversationKind::Group {
        return Err(StorageError::Forbidden(
            "members of a direct conversation cannot change".into(),
        ));
    }
    if !actor_is_member {
        return Err(StorageError::not_member(conversation_id, actor_id));
    }
    let actor_is_owner = actor_id == owner_id;
    match action {
        MemberAction::Add if !actor_is_owner => Err(StorageError::Forbidden(
            "only the owner adds members".into(),
        )),
        MemberAction::Add => Ok(()),
        MemberAction::Remove => {
            if user_ids.iter().any(|u| u == owner_id) {
                return Err(StorageError::Forbidden(
                    "the owner cannot be removed".into(),
                ));
            }
            if !actor_is_owner && user_ids.iter().any(|u| u != actor_id) {
                return Err(StorageError::Forbidden(
                    "only the owner removes other members".into(),
                ));
            }
            Ok(())
        }
    }
}

/// The page size of a history request: 0 -> [`DEFAULT_HISTORY_LIMIT`], capped at `max_page`.
pub fn history_limit(requested: u32, max_page: u32) -> u32 {
    let limit = if requested == 0 {
        DEFAULT_HISTORY_LIMIT
    } else {
        requested
    };
    limit.min(max_page).max(1)
}

/// Messages per conversation of a sync: 0 -> [`DEFAULT_SYNC_LIMIT`], capped at [`MAX_SYNC_LIMIT`].
pub fn sync_limit(requested: u32) -> u32 {
    if requested == 0 {
        DEFAULT_SYNC_LIMIT
    } else {
        requested.min(MAX_SYNC_LIMIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_non_empty_short_and_printable() {
        assert!(validate_id("user_id", "alice").is_ok());
        assert!(validate_id("user_id", "").is_err());
        assert!(validate_id("user_id", &"x".repeat(MAX_ID_BYTES)).is_ok());
        assert!(validate_id("user_id", &"x".repeat(MAX_ID_BYTES + 1)).is_err());
        assert!(validate_id("user_id", "a\nb").is_err());
        assert!(validate_id("user_id", "a\u{1f}b").is_err());
        assert!(validate_optional_id("client_msg_id", "").is_ok());
    }

    #[test]
    fn ids_are_deduplicated_in_order() {
        let ids = ["b", "a", "b", "c", "a"].map(String::from);
        assert_eq!(dedup_ids("members", &ids).unwrap(), ["b", "a", "c"]);
        assert!(dedup_ids("members", &["".to_string()]).is_err());
    }

    #[test]
    fn limits_default_and_cap() {
        assert_eq!(history_limit(0, 200), 50);
        assert_eq!(history_limit(10, 200), 10);
        assert_eq!(history_limit(500, 200), 200);
        assert_eq!(history_limit(0, 20), 20);
        assert_eq!(sync_limit(0), 100);
        assert_eq!(sync_limit(7), 7);
        assert_eq!(sync_limit(1000), 200);
    }

    #[test]
    fn member_change_roles() {
        use MemberAction::*;
        let ok = |actor: &str, member: bool, action, users: &[&str]| {
            let users: Vec<String> = users.iter().map(|s| s.to_string()).collect();
            authorize_member_change(
                "c",
                ConversationKind::Group,
                "own",
                actor,
                member,
                action,
                &users,
            )
        };
        assert!(ok("own", true, Add, &["x"]).is_ok());
        assert!(matches!(
            ok("m", true, Add, &["x"]),
            Err(StorageError::Forbidden(_))
        ));
        assert!(ok("own", true, Remove, &["m"]).is_ok());
        assert!(ok("m", true, Remove, &["m"]).is_ok());
        assert!(matches!(
            ok("m", true, Remove, &["n"]),
            Err(StorageError::Forbidden(_))
        ));
        assert!(matches!(
            ok("own", true, Remove, &["own"]),
            Err(StorageError::Forbidden(_))
        ));
        assert!(matches!(
            ok("z", false, Remove, &["z"]),
            Err(StorageError::NotMember { .. })
        ));
        let direct = authorize_member_change(
            "c",
            ConversationKind::Direct,
            "",
            "a",
            true,
            Add,
            &["x".to_string()],
        );
        assert!(matches!(direct, Err(StorageError::Forbidden(_))));
    }
}
