//! Validation and authorization rules, written once for every backend.

use switchboard_proto::{Conversation, MemberReceipt, Message, SyncResult, SystemEvent};

use crate::error::{Result, StorageError};
use crate::store::{actions, kinds, roles, ConversationKind, MemberAction, MemberNotification};

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

/// Longest topic, in bytes.
pub const MAX_TOPIC_BYTES: usize = 1024;
pub use switchboard_proto::timeline::MAX_MENTIONS;
/// Most webhooks a conversation may have.
pub const MAX_WEBHOOKS: usize = 10;
/// Longest webhook URL, in bytes.
pub const MAX_WEBHOOK_URL_BYTES: usize = 2048;
/// Thread page size when the request says 0.
pub const DEFAULT_THREAD_LIMIT: u32 = 50;
/// Hard cap of a thread page.
pub const MAX_THREAD_LIMIT: u32 = 200;
/// `unread_count` and `unread_mentions` count up to this many.
pub const MAX_UNREAD: u32 = 1000;

/// A topic: at most [`MAX_TOPIC_BYTES`], no control characters other than line
/// breaks and tabs, may be empty.
pub fn validate_topic(topic: &str) -> Result<()> {
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(StorageError::InvalidRequest(format!(
            "topic is longer than {MAX_TOPIC_BYTES} bytes"
        )));
    }
    if topic
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        return Err(StorageError::InvalidRequest(
            "topic contains control characters".into(),
        ));
    }
    Ok(())
}

/// A reaction emoji ([`switchboard_proto::timeline::emoji_problem`]).
pub fn validate_emoji(emoji: &str) -> Result<()> {
    match switchboard_proto::timeline::emoji_problem(emoji) {
        Some(problem) => Err(StorageError::InvalidRequest(problem)),
        None => Ok(()),
    }
}

/// A role given by a role change: "admin", "member" or "owner" (transfer).
fn validate_role(role: &str) -> Result<()> {
    match role {
        roles::OWNER | roles::ADMIN | roles::MEMBER => Ok(()),
        other => Err(StorageError::InvalidRequest(format!(
            "role must be \"owner\", \"admin\" or \"member\", not {other:?}"
        ))),
    }
}

/// Field checks of a timeline event that need no stored data: a known kind, ids,
/// mentions (at most [`MAX_MENTIONS`], distinct), the emoji of a reaction, and a
/// well-formed system event (known action, user_ids where the action needs them,
/// name / topic / role values, `actor_id` empty or the sender).
pub fn validate_event(event: &Message) -> Result<()> {
    validate_id("conversation_id", &event.conversation_id)?;
    validate_id("sender_id", &event.sender_id)?;
    if event.mentions.len() > MAX_MENTIONS {
        return Err(StorageError::InvalidRequest(format!(
            "a message mentions at most {MAX_MENTIONS} users"
        )));
    }
    if dedup_ids("mentions", &event.mentions)?.len() != event.mentions.len() {
        return Err(StorageError::InvalidRequest(
            "mentions must be distinct".into(),
        ));
    }
    for (field, seq) in [
        ("target_seq", event.target_seq),
        ("reply_to_seq", event.reply_to_seq),
        ("thread_root_seq", event.thread_root_seq),
    ] {
        if i64::try_from(seq).is_err() {
            return Err(StorageError::InvalidRequest(format!(
                "{field} {seq} is out of range"
            )));
        }
    }
    match event.kind.as_str() {
        "" | kinds::MESSAGE | kinds::EDIT | kinds::DELETE => Ok(()),
        kinds::REACTION => validate_emoji(&event.emoji),
        kinds::SYSTEM => {
            let system = event.system.as_ref().ok_or_else(|| {
                StorageError::InvalidRequest("a system event needs `system`".into())
            })?;
            validate_system(&event.sender_id, system)
        }
        other => Err(StorageError::InvalidRequest(format!(
            "unknown event kind {other:?}"
        ))),
    }
}

fn validate_system(sender_id: &str, system: &SystemEvent) -> Result<()> {
    if !system.actor_id.is_empty() && system.actor_id != sender_id {
        return Err(StorageError::InvalidRequest(
            "system.actor_id must be the sender".into(),
        ));
    }
    let users = dedup_ids("user_ids", &system.user_ids)?;
    let need_users = || {
        if users.is_empty() {
            Err(StorageError::InvalidRequest("user_ids is required".into()))
        } else {
            check_member_count(users.len())
        }
    };
    match system.action.as_str() {
        actions::MEMBERS_ADDED
        | actions::MEMBERS_REMOVED
        | actions::MEMBERS_BANNED
        | actions::MEMBERS_UNBANNED => need_users(),
        actions::MEMBER_LEFT => {
            if users.iter().any(|u| u != sender_id) {
                return Err(StorageError::InvalidRequest(
                    "member_left names only the member who leaves".into(),
                ));
            }
            Ok(())
        }
        actions::ROLE_CHANGED => {
            need_users()?;
            validate_role(&system.role)?;
            if system.role == roles::OWNER && users.len() != 1 {
                return Err(StorageError::InvalidRequest(
                    "ownership passes to exactly one user".into(),
                ));
            }
            Ok(())
        }
        actions::RENAMED => validate_name(&system.name),
        actions::TOPIC_CHANGED => validate_topic(&system.topic),
        other => Err(StorageError::InvalidRequest(format!(
            "unknown system action {other:?}"
        ))),
    }
}

/// What [`authorize_event`] needs to know, read from the store.
#[derive(Debug, Clone, Copy)]
pub struct EventFacts<'a> {
    /// The conversation with `member_roles`.
    pub conversation: &'a Conversation,
    /// The stored event at `target_seq` (edit, delete, reaction), if any.
    pub target: Option<&'a Message>,
    /// The stored event at `reply_to_seq`, if any.
    pub reply_to: Option<&'a Message>,
    /// The stored event at `thread_root_seq`, if any.
    pub thread_root: Option<&'a Message>,
    /// Those of `system.user_ids` on the ban list (members_added).
    pub banned: &'a [String],
}

/// The role of `user_id` in the conversation, `None` for a non-member.
pub fn role_of<'a>(conversation: &'a Conversation, user_id: &str) -> Option<&'a str> {
    conversation
        .member_roles
        .iter()
        .find(|m| m.user_id == user_id)
        .map(|m| m.role.as_str())
}

fn is_manager(role: &str) -> bool {
    role == roles::OWNER || role == roles::ADMIN
}

/// The referenced event exists and is a "message" (`NotFound` otherwise).
fn referenced<'a>(field: &str, seq: u64, found: Option<&'a Message>) -> Result<&'a Message> {
    match found {
        Some(m) if kinds::is_message(&m.kind) => Ok(m),
        _ => Err(StorageError::NotFound(format!("message {seq} ({field})"))),
    }
}

/// Like [`referenced`], and not deleted.
fn live_target(seq: u64, found: Option<&Message>) -> Result<&Message> {
    let m = referenced("target_seq", seq, found)?;
    if m.deleted {
        return Err(StorageError::NotFound(format!("message {seq} was deleted")));
    }
    Ok(m)
}

/// Whether a (field-validated, see [`validate_event`]) timeline event may be appended
/// now; the same rules for every backend. See the `Authorize` RPC for the outcomes.
pub fn authorize_event(event: &Message, facts: &EventFacts<'_>) -> Result<()> {
    let conv = facts.conversation;
    let actor = event.sender_id.as_str();
    let actor_role = role_of(conv, actor)
        .ok_or_else(|| StorageError::not_member(&conv.conversation_id, actor))?;
    if event.reply_to_seq > 0 {
        referenced("reply_to_seq", event.reply_to_seq, facts.reply_to)?;
    }
    if event.thread_root_seq > 0 {
        let root = referenced("thread_root_seq", event.thread_root_seq, facts.thread_root)?;
        if root.thread_root_seq != 0 {
            return Err(StorageError::InvalidRequest(
                "a thread reply cannot be a thread root".into(),
            ));
        }
    }
    if let Some(outsider) = event.mentions.iter().find(|u| role_of(conv, u).is_none()) {
        return Err(StorageError::InvalidRequest(format!(
            "mentioned user {outsider} is not a member"
        )));
    }
    match event.kind.as_str() {
        kinds::EDIT => {
            let target = live_target(event.target_seq, facts.target)?;
            if target.sender_id != actor {
                return Err(StorageError::Forbidden(
                    "only the sender edits a message".into(),
                ));
            }
            Ok(())
        }
        kinds::DELETE => {
            let target = live_target(event.target_seq, facts.target)?;
            let group_manager =
                conv.kind == ConversationKind::Group.as_str() && is_manager(actor_role);
            if target.sender_id != actor && !group_manager {
                return Err(StorageError::Forbidden(
                    "only the sender, or a group's owner or admin, deletes a message".into(),
                ));
            }
            Ok(())
        }
        kinds::REACTION => live_target(event.target_seq, facts.target).map(|_| ()),
        kinds::SYSTEM => {
            let system = event.system.as_ref().ok_or_else(|| {
                StorageError::InvalidRequest("a system event needs `system`".into())
            })?;
            authorize_system(conv, actor, actor_role, system, facts.banned)
        }
        _ => Ok(()),
    }
}

fn authorize_system(
    conv: &Conversation,
    actor: &str,
    actor_role: &str,
    system: &SystemEvent,
    banned: &[String],
) -> Result<()> {
    if conv.kind != ConversationKind::Group.as_str() {
        return Err(StorageError::Forbidden(
            "a direct conversation has no system events".into(),
        ));
    }
    let manager = || {
        if is_manager(actor_role) {
            Ok(())
        } else {
            Err(StorageError::Forbidden(format!(
                "{} needs the owner or an admin",
                system.action
            )))
        }
    };
    let users = &system.user_ids;
    match system.action.as_str() {
        actions::MEMBERS_ADDED => {
            manager()?;
            if let Some(user) = banned.first() {
                return Err(StorageError::Banned(format!(
                    "user {user} is banned from conversation {}",
                    conv.conversation_id
                )));
            }
            let new = users.iter().filter(|u| role_of(conv, u).is_none()).count();
            check_member_count(conv.member_roles.len() + new)
        }
        actions::MEMBERS_REMOVED | actions::MEMBERS_BANNED => {
            manager()?;
            if users.iter().any(|u| u == actor) {
                return Err(StorageError::Forbidden(
                    "members leave rather than remove themselves".into(),
                ));
            }
            for user in users {
                match role_of(conv, user) {
                    Some(roles::OWNER) => {
                        return Err(StorageError::Forbidden(
                            "the owner cannot be removed".into(),
                        ))
                    }
                    Some(roles::ADMIN) if actor_role != roles::OWNER => {
                        return Err(StorageError::Forbidden(
                            "only the owner removes an admin".into(),
                        ))
                    }
                    _ => {}
                }
            }
            Ok(())
        }
        actions::MEMBERS_UNBANNED | actions::RENAMED | actions::TOPIC_CHANGED => manager(),
        actions::MEMBER_LEFT => Ok(()),
        actions::ROLE_CHANGED => {
            if actor_role != roles::OWNER {
                return Err(StorageError::Forbidden(
                    "only the owner changes roles".into(),
                ));
            }
            for user in users {
                if user == actor {
                    return Err(StorageError::InvalidRequest(
                        "the owner's role changes only by a transfer".into(),
                    ));
                }
                if role_of(conv, user).is_none() {
                    return Err(StorageError::InvalidRequest(format!(
                        "user {user} is not a member"
                    )));
                }
            }
            Ok(())
        }
        other => Err(StorageError::InvalidRequest(format!(
            "unknown system action {other:?}"
        ))),
    }
}

/// A stored preference as it applies at `now_ms`: -1 (forever) stays, a time in the
/// past reads as 0 (off).
pub fn active_until(until_ms: i64, now_ms: i64) -> i64 {
    if until_ms == -1 || until_ms > now_ms {
        until_ms
    } else {
        0
    }
}

/// A `SetNotification.until_ms`: -1, 0 or a time.
pub fn validate_until(until_ms: i64) -> Result<()> {
    if until_ms < -1 {
        return Err(StorageError::InvalidRequest(format!(
            "until_ms must be -1, 0 or a time, not {until_ms}"
        )));
    }
    Ok(())
}

/// Who is notified of a new message from `sender_id`: members other than the sender
/// not in an active do-not-disturb and either not muting the conversation or
/// mentioned; `silenced` = the other members except the sender. Both sorted.
pub fn notification_targets(
    members: &[MemberNotification],
    sender_id: &str,
    mentions: &[String],
    now_ms: i64,
) -> (Vec<String>, Vec<String>) {
    let mut notify = Vec::new();
    let mut silenced = Vec::new();
    for m in members.iter().filter(|m| m.user_id != sender_id) {
        let dnd = active_until(m.dnd_until_ms, now_ms) != 0;
        let muted = active_until(m.muted_until_ms, now_ms) != 0;
        let mentioned = mentions.contains(&m.user_id);
        if !dnd && (!muted || mentioned) {
            notify.push(m.user_id.clone());
        } else {
            silenced.push(m.user_id.clone());
        }
    }
    notify.sort_unstable();
    silenced.sort_unstable();
    (notify, silenced)
}

/// Receipt counts of the message at `seq` sent by `sender_id`: (read_by,
/// delivered_to) over the members other than the sender.
pub fn receipt_counts(members: &[MemberReceipt], sender_id: &str, seq: u64) -> (u32, u32) {
    let others = members.iter().filter(|m| m.user_id != sender_id);
    let (mut read, mut delivered) = (0u32, 0u32);
    for m in others {
        if m.read_seq >= seq {
            read += 1;
        }
        if m.read_seq.max(m.delivered_seq) >= seq {
            delivered += 1;
        }
    }
    (read, delivered)
}

/// A webhook URL: http:// or https:// with a host, at most [`MAX_WEBHOOK_URL_BYTES`],
/// no whitespace or control characters.
pub fn validate_webhook_url(url: &str) -> Result<()> {
    let bad = |why: &str| Err(StorageError::InvalidRequest(format!("webhook url {why}")));
    if url.len() > MAX_WEBHOOK_URL_BYTES {
        return bad(&format!("is longer than {MAX_WEBHOOK_URL_BYTES} bytes"));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return bad("contains whitespace or control characters");
    }
    let lower = url.to_ascii_lowercase();
    let rest = if let Some(rest) = lower.strip_prefix("https://") {
        rest
    } else if let Some(rest) = lower.strip_prefix("http://") {
        rest
    } else {
        return bad("must start with http:// or https://");
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    if host.is_empty() {
        return bad("has no host");
    }
    Ok(())
}

/// The users whose right to manage webhooks (and so the webhooks they created) a
/// timeline event takes away: those removed or banned, the member who leaves, those
/// set back to plain members. Empty for every other event.
pub fn webhook_rights_revoked(event: &Message) -> Vec<&str> {
    let Some(system) = event
        .system
        .as_ref()
        .filter(|_| event.kind == kinds::SYSTEM)
    else {
        return Vec::new();
    };
    match system.action.as_str() {
        actions::MEMBERS_REMOVED | actions::MEMBERS_BANNED => {
            system.user_ids.iter().map(String::as_str).collect()
        }
        actions::MEMBER_LEFT => vec![event.sender_id.as_str()],
        actions::ROLE_CHANGED if system.role == roles::MEMBER => {
            system.user_ids.iter().map(String::as_str).collect()
        }
        _ => Vec::new(),
    }
}

/// What a member who does not manage a webhook sees of its URL: the origin only
/// (`scheme://host[:port]`), without userinfo, path, query or fragment, any of which
/// may hold a credential of the receiver.
pub fn webhook_url_origin(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return String::new();
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    format!("{scheme}://{host_port}")
}

/// Who may add and delete a conversation's webhooks and see their secrets: in a
/// group the owner and admins, in a direct conversation either member
/// (`NotMember` for outsiders, `Forbidden` for other group members).
pub fn authorize_webhook_admin(conversation: &Conversation, actor_id: &str) -> Result<()> {
    let role = role_of(conversation, actor_id)
        .ok_or_else(|| StorageError::not_member(&conversation.conversation_id, actor_id))?;
    if conversation.kind == ConversationKind::Group.as_str() && !is_manager(role) {
        return Err(StorageError::Forbidden(
            "only the owner or an admin manages webhooks".into(),
        ));
    }
    Ok(())
}

/// The page size of a thread request: 0 -> [`DEFAULT_THREAD_LIMIT`], capped at
/// [`MAX_THREAD_LIMIT`].
pub fn thread_limit(requested: u32) -> u32 {
    if requested == 0 {
        DEFAULT_THREAD_LIMIT
    } else {
        requested.min(MAX_THREAD_LIMIT)
    }
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

/// A user who created `created` conversations may create another one while under
/// `max_created`.
pub fn created_cap(created: u64, max_created: u32) -> Result<()> {
    if created >= u64::from(max_created) {
        return Err(StorageError::InvalidRequest(format!(
            "a user creates at most {max_created} conversations"
        )));
    }
    Ok(())
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

/// Bytes the fields of an answer other than its messages may take beside them
/// (conversation id, `has_more`, a thread's framing, sync's `truncated` entries are
/// counted apart): kept free under `storage.max_answer_bytes`.
pub const ANSWER_SLACK_BYTES: usize = 1024;

/// Bytes one element of a repeated message field (tag, length, message) takes.
pub fn encoded_bytes<M: prost::Message>(m: &M) -> usize {
    let len = m.encoded_len();
    1 + prost::length_delimiter_len(len) + len
}

/// How many of `messages`, taken in order, fit in `budget` bytes, never fewer than
/// one when there is one (a page always moves the cursor; the configured budget
/// holds at least one largest message).
pub fn fitting<'a>(messages: impl IntoIterator<Item = &'a Message>, budget: usize) -> usize {
    fit(messages, budget, true).0
}

/// How many of `messages` fit in `budget` (at least one when `at_least_one`), and the
/// bytes they take.
fn fit<'a>(
    messages: impl IntoIterator<Item = &'a Message>,
    budget: usize,
    at_least_one: bool,
) -> (usize, usize) {
    let mut used = 0usize;
    let mut count = 0usize;
    for m in messages {
        let next = used.saturating_add(encoded_bytes(m));
        if next > budget && (count > 0 || !at_least_one) {
            break;
        }
        used = next;
        count += 1;
    }
    (count, used)
}

/// Trim a sync answer to `budget` bytes: its conversations count first, then each
/// conversation's messages (grouped, in order) as long as they fit. A conversation
/// that lost messages is listed in `truncated` (paged with history forward from
/// the client's cursor), and so is every conversation after it that had some.
/// At least one message stays when there is one. `has_more` says whether any
/// conversation is in `truncated`.
pub fn trim_sync(result: &mut SyncResult, budget: usize) {
    let mut used: usize = result.conversations.iter().map(encoded_bytes).sum();
    used += result
        .truncated
        .iter()
        .map(|id| id.len() + 3)
        .sum::<usize>();
    let messages = std::mem::take(&mut result.messages);
    let mut kept = Vec::with_capacity(messages.len());
    let mut full = false;
    let mut start = 0;
    while start < messages.len() {
        let id = messages[start].conversation_id.clone();
        let len = messages[start..]
            .iter()
            .take_while(|m| m.conversation_id == id)
            .count();
        let group = &messages[start..start + len];
        let (n, bytes) = if full {
            (0, 0)
        } else {
            fit(group, budget.saturating_sub(used), kept.is_empty())
        };
        used += bytes;
        kept.extend_from_slice(&group[..n]);
        if n < len {
            full = true;
            if !result.truncated.contains(&id) {
                used += id.len() + 3;
                result.truncated.push(id);
            }
        }
        start += len;
    }
    result.messages = kept;
    result.has_more = !result.truncated.is_empty();
}

/// Trim a history page (ascending) to `budget` bytes, keeping the messages nearest the
/// cursor: the first ones going forward, the last ones going backward. Returns true
/// when something was cut (the page then has more).
pub fn trim_page(messages: &mut Vec<Message>, backward: bool, budget: usize) -> bool {
    let keep = if backward {
        fitting(messages.iter().rev(), budget)
    } else {
        fitting(messages.iter(), budget)
    };
    if keep == messages.len() {
        return false;
    }
    if backward {
        messages.drain(..messages.len() - keep);
    } else {
        messages.truncate(keep);
    }
    true
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
    fn pages_are_trimmed_to_the_byte_budget_nearest_the_cursor() {
        let msg = |seq: u64| Message {
            conversation_id: "c".into(),
            seq,
            body: "x".repeat(1000),
            ..Default::default()
        };
        let one = encoded_bytes(&msg(1));
        let page = || (1..=10).map(msg).collect::<Vec<_>>();
        let mut forward = page();
        assert!(trim_page(&mut forward, false, 3 * one + one / 2));
        assert_eq!(forward.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3]);
        let mut backward = page();
        assert!(trim_page(&mut backward, true, 3 * one));
        assert_eq!(
            backward.iter().map(|m| m.seq).collect::<Vec<_>>(),
            [8, 9, 10]
        );
        let mut whole = page();
        assert!(!trim_page(&mut whole, true, 10 * one));
        assert_eq!(whole.len(), 10);
        let mut tiny = page();
        assert!(
            trim_page(&mut tiny, false, 1),
            "at least one message moves the cursor"
        );
        assert_eq!(tiny.len(), 1);
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

    #[test]
    fn webhook_urls_are_http_with_a_host() {
        for ok in [
            "https://example.com",
            "http://example.com/hook?x=1#f",
            "HTTPS://Example.com:8443/a",
            "http://user:pw@10.0.0.1:80/",
            "http://[::1]:8080/x",
        ] {
            assert!(validate_webhook_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "example.com",
            "ftp://example.com",
            "https://",
            "https://:443/x",
            "http://[]/x",
            "https://exa mple.com",
            "https://example.com/\n",
        ] {
            assert!(validate_webhook_url(bad).is_err(), "{bad:?}");
        }
        let at_limit = format!("https://e.com/{}", "a".repeat(MAX_WEBHOOK_URL_BYTES - 14));
        assert_eq!(at_limit.len(), MAX_WEBHOOK_URL_BYTES);
        assert!(validate_webhook_url(&at_limit).is_ok());
        assert!(validate_webhook_url(&format!("{at_limit}a")).is_err());
    }

    #[test]
    fn webhook_url_origins_hold_no_credentials() {
        for (url, origin) in [
            ("https://example.com", "https://example.com"),
            (
                "https://user:pw@hooks.example.com:8443/services/T0/B0/tok?key=s#f",
                "https://hooks.example.com:8443",
            ),
            ("http://a@b@10.0.0.1/x", "http://10.0.0.1"),
            ("http://[::1]:8080?token=t", "http://[::1]:8080"),
            ("no scheme", ""),
        ] {
            assert_eq!(webhook_url_origin(url), origin, "{url}");
        }
    }

    #[test]
    fn preferences_expire() {
        assert_eq!(active_until(-1, 100), -1);
        assert_eq!(active_until(0, 100), 0);
        assert_eq!(active_until(100, 100), 0);
        assert_eq!(active_until(101, 100), 101);
        assert!(validate_until(-1).is_ok() && validate_until(0).is_ok());
        assert!(validate_until(-2).is_err());
    }

    #[test]
    fn notification_targets_skip_sender_dnd_and_unmentioned_mutes() {
        let m = |user: &str, muted: i64, dnd: i64| MemberNotification {
            user_id: user.into(),
            muted_until_ms: muted,
            dnd_until_ms: dnd,
        };
        let members = [
            m("s", 0, 0),
            m("d", 0, 50),
            m("a", 0, 0),
            m("muted", -1, 0),
            m("expired", 10, 10),
            m("m_dnd", -1, -1),
        ];
        let mentions = ["muted".to_string(), "m_dnd".to_string()];
        let (notify, silenced) = notification_targets(&members, "s", &[], 20);
        assert_eq!(notify, ["a", "expired"]);
        assert_eq!(silenced, ["d", "m_dnd", "muted"]);
        let (notify, silenced) = notification_targets(&members, "s", &mentions, 20);
        assert_eq!(notify, ["a", "expired", "muted"]);
        assert_eq!(silenced, ["d", "m_dnd"]);
    }

    #[test]
    fn receipts_count_others_than_the_sender() {
        let r = |user: &str, read, delivered| MemberReceipt {
            user_id: user.into(),
            read_seq: read,
            delivered_seq: delivered,
            read_at_ms: 0,
        };
        let members = [r("s", 9, 9), r("a", 5, 5), r("b", 2, 7), r("c", 0, 0)];
        assert_eq!(receipt_counts(&members, "s", 5), (1, 2));
        assert_eq!(receipt_counts(&members, "s", 8), (0, 0));
        assert_eq!(receipt_counts(&members, "a", 2), (2, 2));
    }

    #[test]
    fn event_fields() {
        let base = Message {
            conversation_id: "c".into(),
            sender_id: "a".into(),
            ..Default::default()
        };
        assert!(validate_event(&base).is_ok());
        let kind = |k: &str| Message {
            kind: k.into(),
            ..base.clone()
        };
        assert!(validate_event(&kind("poke")).is_err());
        assert!(
            validate_event(&kind("system")).is_err(),
            "system needs `system`"
        );
        let system = |action: &str, actor: &str, users: &[&str]| Message {
            kind: "system".into(),
            system: Some(SystemEvent {
                action: action.into(),
                actor_id: actor.into(),
                user_ids: users.iter().map(|u| u.to_string()).collect(),
                ..Default::default()
            }),
            ..base.clone()
        };
        assert!(validate_event(&system("members_added", "a", &["b"])).is_ok());
        assert!(validate_event(&system("members_added", "", &["b"])).is_ok());
        assert!(validate_event(&system("members_added", "z", &["b"])).is_err());
        assert!(validate_event(&system("member_left", "a", &["a"])).is_ok());
        assert!(validate_event(&system("member_left", "a", &["b"])).is_err());
        assert!(
            validate_event(&system("role_changed", "a", &["b"])).is_err(),
            "no role"
        );
        assert!(validate_topic(&"t".repeat(MAX_TOPIC_BYTES)).is_ok());
        assert!(validate_topic("line\nbreak").is_ok());
        assert!(validate_topic("bell\u{7}").is_err());
        assert!(validate_emoji("👍🏽").is_ok());
        let far = Message {
            target_seq: u64::MAX,
            ..base.clone()
        };
        assert!(validate_event(&far).is_err());
    }
}
