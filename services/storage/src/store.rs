//! The history store: the backend-neutral trait every implementation (SQLite, and
//! ScyllaDB/Cassandra) provides, with the value types it speaks.
//!
//! The store trusts its inputs: ids, kinds and limits are validated by the service
//! ([`crate::rules`]) before they get here. The store owns what must be atomic with
//! the data (direct-pair uniqueness, role checks of a membership change, dedupe with
//! gapless append, monotonic read markers); the service owns request validation,
//! membership checks of reads, paging defaults and time.

use std::collections::HashMap;

use async_trait::async_trait;
use switchboard_proto::{Conversation, HistoryResult, Message, ReadMarker, SyncResult};

use crate::error::Result;

/// The two kinds of conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConversationKind {
    /// Exactly two members, no owner; one per pair of users.
    Direct,
    /// An owner plus members, changed by [`HistoryStore::change_members`].
    Group,
}

impl ConversationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ConversationKind::Direct => "direct",
            ConversationKind::Group => "group",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "direct" => Some(ConversationKind::Direct),
            "group" => Some(ConversationKind::Group),
            _ => None,
        }
    }
}

/// A validated request to create a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewConversation {
    /// Fresh id (UUIDv7) to use if a conversation is created; for a direct pair that
    /// already has one, the existing conversation is returned instead.
    pub conversation_id: String,
    pub kind: ConversationKind,
    /// Owner of a group; for a direct conversation, one of the two members.
    pub creator_id: String,
    /// All members, creator included, deduplicated (two for a direct conversation).
    pub members: Vec<String>,
    /// Group name, possibly empty.
    pub name: String,
    pub now_ms: i64,
}

/// What a membership change does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberAction {
    Add,
    Remove,
}

impl MemberAction {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "add" => Some(MemberAction::Add),
            "remove" => Some(MemberAction::Remove),
            _ => None,
        }
    }
}

/// A validated membership change; the store applies [`crate::rules::authorize_member_change`]
/// inside its transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberChange {
    pub conversation_id: String,
    pub actor_id: String,
    pub action: MemberAction,
    /// Deduplicated, non-empty.
    pub user_ids: Vec<String>,
    pub now_ms: i64,
}

/// Paging direction of a history query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Older messages: sequences below `from_seq` (0 = from the newest).
    Backward,
    /// Newer messages: sequences above `from_seq`.
    Forward,
}

/// One page of a conversation's history. Also the coalescing key: identical queries
/// running at the same time share one backend read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PageQuery {
    pub conversation_id: String,
    /// Exclusive bound; with [`Direction::Backward`], 0 means "from the newest".
    pub from_seq: u64,
    pub direction: Direction,
    /// Already normalized: 1..=max page.
    pub limit: u32,
}

/// The outcome of an append.
#[derive(Debug, Clone, PartialEq)]
pub struct Appended {
    /// The stored message (the earlier one for a duplicate).
    pub message: Message,
    /// True when the dedupe key was known: nothing was written.
    pub duplicate: bool,
}

/// The history store. Every implementation passes the conformance suite in
/// `crate::conformance`. Implementations must not block the async runtime.
#[async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    /// Create a conversation; a direct pair that already has one gets that one back
    /// (created from either side). Returned with members.
    async fn create_conversation(&self, new: NewConversation) -> Result<Conversation>;

    /// A conversation with its members (sorted by user id); `NotFound` if unknown.
    async fn get_conversation(&self, conversation_id: &str) -> Result<Conversation>;

    /// Whether `user_id` is a member (false for an unknown conversation).
    async fn is_member(&self, conversation_id: &str, user_id: &str) -> Result<bool>;

    /// Apply a membership change of a group atomically with its authorization
    /// (`NotFound`, `NotMember`, `Forbidden`). Returns the conversation with members.
    async fn change_members(&self, change: MemberChange) -> Result<Conversation>;

    /// The user's conversations with `last_seq`, without members, most recently
    /// updated first.
    async fn list_conversations(&self, user_id: &str) -> Result<Vec<Conversation>>;

    /// Highest stored sequence (0 when empty); `NotFound` if unknown.
    async fn last_seq(&self, conversation_id: &str) -> Result<u64>;

    /// In one transaction: if the message's (sender, client_msg_id) key was stored at
    /// or after `dedupe_since_ms`, return the stored message as a duplicate and write
    /// nothing; else require `seq == last_seq + 1` (`SequenceConflict`), store the
    /// message and its dedupe key (stamped `now_ms`; none when client_msg_id is empty)
    /// and bump the conversation's `last_seq` and `updated_at_ms`.
    async fn append(&self, message: Message, dedupe_since_ms: i64, now_ms: i64)
        -> Result<Appended>;

    /// The message stored under (sender, client_msg_id) if its key is at or after
    /// `since_ms`.
    async fn lookup_dedupe(
        &self,
        sender_id: &str,
        client_msg_id: &str,
        since_ms: i64,
    ) -> Result<Option<Message>>;

    /// One page of history, messages in ascending sequence order, `has_more` true when
    /// more exist in the requested direction. No membership check (the service does it).
    async fn history_page(&self, query: &PageQuery) -> Result<HistoryResult>;

    /// For every conversation `user_id` is a member of, with no cursor or
    /// `last_seq > cursor`: the conversation with members, its messages after the
    /// cursor (ascending, at most `limit`) and its id in `truncated` if more remain.
    /// Cursors of other conversations are ignored.
    async fn sync(
        &self,
        user_id: &str,
        cursors: &HashMap<String, u64>,
        limit: u32,
    ) -> Result<SyncResult>;

    /// Raise the user's read marker to `min(seq, last_seq)` (never lower it) and
    /// return the stored marker. `NotFound` / `NotMember` as usual.
    async fn set_read_marker(
        &self,
        conversation_id: &str,
        user_id: &str,
        seq: u64,
        now_ms: i64,
    ) -> Result<ReadMarker>;

    /// Delete at most `max_rows` dedupe keys stored before `before_ms`; returns how many.
    async fn purge_dedupe(&self, before_ms: i64, max_rows: u32) -> Result<u64>;
}
