//! Conversation members, read from storage and cached briefly.
//!
//! Trade-off of the TTL: every send and every fan-out needs the member list, and
//! asking storage each time would put one storage read on every message. With a
//! short TTL (2 s with the Kafka log, where other routing instances exist) a
//! membership change made through another instance can take up to that long to be
//! seen here: a removed member may still send and receive live events for up to
//! the TTL, and a newly added member may miss live events for that long (they get
//! the messages from history/sync). With the embedded log this process is the only
//! routing instance, every change passes through it, and the TTL (60 s) is only a
//! safety net: a conversation with a message every second or two then costs one
//! storage read a minute instead of one every other message.
//!
//! Membership changes are "system" timeline events: the partition owner drops the
//! entry when it persisted one (before the sender's Send returns and before the
//! event's fan-out reads the members), and the instance that took the Send drops its
//! own entry too, so the next send through either is checked against the new
//! membership. Conversation-change events published through routing also invalidate
//! the entry at once; the TTL only bounds staleness on other instances. A sender or
//! actor missing from the cached list is checked against storage again before being
//! refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard_proto::v1::GetConversationRequest;
use switchboard_proto::ErrorCode;
use switchboard_rpc::StorageApi;
use tokio::time::Instant;

use crate::error::RoutingError;

/// The members of a conversation, sorted (for `contains`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Members(Vec<String>);

impl Members {
    pub fn new(mut members: Vec<String>) -> Members {
        members.sort();
        members.dedup();
        Members(members)
    }

    pub fn contains(&self, user: &str) -> bool {
        self.0.binary_search_by(|m| m.as_str().cmp(user)).is_ok()
    }

    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
}

/// Members by conversation with a TTL, bounded by `max_entries`.
pub(crate) struct MemberCache {
    storage: StorageApi,
    ttl: Duration,
    max_entries: usize,
    /// A std mutex: lookups and inserts only, never held across the storage call.
    entries: Mutex<HashMap<String, (Arc<Members>, Instant)>>,
}

impl MemberCache {
    pub fn new(storage: StorageApi, ttl: Duration, max_entries: usize) -> MemberCache {
        MemberCache {
            storage,
            ttl,
            max_entries: max_entries.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The members of `conversation_id` (not_found if it does not exist).
    pub async fn get(&self, conversation_id: &str) -> Result<Arc<Members>, RoutingError> {
        let now = Instant::now();
        if let Some((members, fetched)) = self.lock().get(conversation_id) {
            if now.saturating_duration_since(*fetched) < self.ttl {
                return Ok(members.clone());
            }
        }
        let reply = self
            .storage
            .clone()
            .get_conversation(GetConversationRequest {
                conversation_id: conversation_id.to_owned(),
                caller_id: String::new(),
            })
            .await;
        let conversation = match reply {
            Ok(r) => r.into_inner(),
            Err(st) if switchboard_proto::status_error_code(&st) == ErrorCode::NotFound => {
                self.invalidate(conversation_id);
                return Err(RoutingError::NotFound(conversation_id.to_owned()));
            }
            Err(st) => return Err(RoutingError::peer("storage GetConversation", &st)),
        };
        let members = Arc::new(Members::new(conversation.members));
        let mut entries = self.lock();
        if entries.len() >= self.max_entries && !entries.contains_key(conversation_id) {
            let ttl = self.ttl;
            entries.retain(|_, (_, fetched)| now.saturating_duration_since(*fetched) < ttl);
            if entries.len() >= self.max_entries {
                entries.clear();
            }
        }
        entries.insert(conversation_id.to_owned(), (members.clone(), now));
        Ok(members)
    }

    /// The members, read again from storage when the cached list lacks `user`: a
    /// negative answer is never served from the cache, so a member added a moment ago
    /// can send at once (and the non-member's refusal costs one storage read).
    pub async fn get_checking(
        &self,
        conversation_id: &str,
        user: &str,
    ) -> Result<Arc<Members>, RoutingError> {
        // To a user, an unknown conversation is one they are not a member of:
        // the answer does not reveal which conversations exist.
        let hide = |e| match e {
            RoutingError::NotFound(_) => RoutingError::NotMember(conversation_id.to_owned()),
            other => other,
        };
        let members = self.get(conversation_id).await.map_err(hide)?;
        if members.contains(user) {
            return Ok(members);
        }
        self.invalidate(conversation_id);
        self.get(conversation_id).await.map_err(hide)
    }

    /// Forget a conversation's members (they changed).
    pub fn invalidate(&self, conversation_id: &str) {
        self.lock().remove(conversation_id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<Members>, Instant)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_contains_after_sorting() {
        let m = Members::new(vec!["c".into(), "a".into(), "b".into(), "a".into()]);
        assert_eq!(m.as_slice(), &["a", "b", "c"]);
        assert!(m.contains("b"));
        assert!(!m.contains("d"));
    }
}
