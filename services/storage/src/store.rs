//! The history store: the backend-neutral trait every implementation (SQLite, and
//! ScyllaDB/Cassandra) provides, with the value types it speaks.
//!
//! The store trusts its inputs: ids, kinds and limits are validated by the service
//! ([`crate::rules`]) before they get here. The store owns what must be atomic with
//! the data (direct-pair uniqueness, role checks of a membership change, dedupe with
//! gapless append and the effects of each appended event, monotonic markers, the
//! webhook cap); the service owns request validation, authorization of timeline
//! events (over facts the store reads: [`HistoryStore::get_conversation`],
//! [`HistoryStore::message_at`], [`HistoryStore::banned_among`]), membership checks of
//! reads, paging defaults, `ReactionCount.mine`, expiry of preferences and time.

use std::collections::HashMap;

use async_trait::async_trait;
use switchboard_proto::{
    Conversation, HistoryResult, MemberReceipt, Message, ReadMarker, SyncResult, Webhook,
};

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
    /// Most conversations `creator_id` may have created, this one included
    /// (`InvalidRequest` past it; an existing direct pair is still returned).
    pub max_created: u32,
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

/// Timeline event kinds (`Message.kind`).
pub use switchboard_proto::timeline::kinds;

/// System event actions (`SystemEvent.action`).
pub mod actions {
    pub const MEMBERS_ADDED: &str = "members_added";
    pub const MEMBERS_REMOVED: &str = "members_removed";
    pub const MEMBERS_BANNED: &str = "members_banned";
    pub const MEMBERS_UNBANNED: &str = "members_unbanned";
    pub const MEMBER_LEFT: &str = "member_left";
    pub const ROLE_CHANGED: &str = "role_changed";
    pub const RENAMED: &str = "renamed";
    pub const TOPIC_CHANGED: &str = "topic_changed";
}

/// Member roles (`Member.role`, `Conversation.my_role`).
pub mod roles {
    pub const OWNER: &str = "owner";
    pub const ADMIN: &str = "admin";
    pub const MEMBER: &str = "member";
}

/// Which marker a [`HistoryStore::set_read_marker`] / [`HistoryStore::set_delivered_marker`]
/// call moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MarkerKind {
    /// Read up to the sequence (also raises the delivered marker).
    Read,
    /// Delivered to one of the user's devices up to the sequence.
    Delivered,
}

impl MarkerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MarkerKind::Read => "read",
            MarkerKind::Delivered => "delivered",
        }
    }

    /// "read" (also the empty string) or "delivered".
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "read" => Some(MarkerKind::Read),
            "delivered" => Some(MarkerKind::Delivered),
            _ => None,
        }
    }
}

/// One page of a thread: replies after `from_seq`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ThreadQuery {
    pub conversation_id: String,
    /// The thread's root message.
    pub root_seq: u64,
    /// Exclusive; 0 = from the first reply.
    pub from_seq: u64,
    /// Already normalized: 1..=200.
    pub limit: u32,
}

/// A thread page as the store returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct ThreadPage {
    /// The root in its current state (like a history row).
    pub root: Message,
    /// Replies (kind "message" with `thread_root_seq == root_seq`) with
    /// `seq > from_seq`, ascending, at most `limit`, in their current state.
    pub replies: Vec<Message>,
    /// True when more replies exist after the last one returned.
    pub has_more: bool,
}

/// A member's stored notification preferences, as raw stored values (the service
/// applies expiry): -1 = forever, 0 = off, else until that time (ms since epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberNotification {
    pub user_id: String,
    /// Mute of the conversation asked about.
    pub muted_until_ms: i64,
    /// The user's do-not-disturb (all conversations).
    pub dnd_until_ms: i64,
}

/// A validated, authorized webhook to store; ids, secret and time come from the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewWebhook {
    /// Fresh UUIDv7.
    pub webhook_id: String,
    pub conversation_id: String,
    pub url: String,
    /// 32 random bytes, lowercase hex.
    pub secret: String,
    pub created_by: String,
    pub created_at_ms: i64,
    /// Most webhooks the conversation may have, this one included.
    pub max_per_conversation: usize,
}

/// The history store. Every implementation passes the conformance suite in
/// `crate::conformance`. Implementations must not block the async runtime.
#[async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    /// Create a conversation; a direct pair that already has one gets that one back
    /// (created from either side). Returned with members. A creator who already
    /// created `max_created` conversations is refused ([`crate::rules::created_cap`]).
    async fn create_conversation(&self, new: NewConversation) -> Result<Conversation>;

    /// A conversation with its members (sorted by user id), `member_roles` (every
    /// member with role and joined_at_ms, sorted by user id) and `topic`; `NotFound`
    /// if unknown. Per-user fields (`my_role`, markers, unread, mute) stay empty.
    async fn get_conversation(&self, conversation_id: &str) -> Result<Conversation>;

    /// Whether `user_id` is a member (false for an unknown conversation).
    async fn is_member(&self, conversation_id: &str, user_id: &str) -> Result<bool>;

    /// Apply a membership change of a group atomically with its authorization
    /// (`NotFound`, `NotMember`, `Forbidden`). Returns the conversation with members.
    async fn change_members(&self, change: MemberChange) -> Result<Conversation>;

    /// The user's conversations with `last_seq` and `topic`, without members (nor
    /// member_roles), most recently updated first, each with the user's own fields:
    /// `my_role`, `read_seq`, `delivered_seq` (max of read and delivered markers),
    /// `unread_count` (events of kind "message"/"" with seq > read_seq, sender other
    /// than the user, not deleted, counted up to 1000), `unread_mentions` (those of
    /// them whose mentions contain the user, also capped at 1000) and the RAW stored
    /// `muted_until_ms` (-1, 0 or a time; the service zeroes an expired one).
    async fn list_conversations(&self, user_id: &str) -> Result<Vec<Conversation>>;

    /// Highest stored sequence (0 when empty); `NotFound` if unknown.
    async fn last_seq(&self, conversation_id: &str) -> Result<u64>;

    /// In one transaction: if the message's (sender, client_msg_id) key was stored at
    /// or after `dedupe_since_ms`, return the stored message as a duplicate and write
    /// nothing; else require `seq == last_seq + 1` (`SequenceConflict`), store the
    /// event (every field of `Message` up to `from_bot`; the current-state fields 19..22
    /// of the input are ignored and start empty) and its dedupe key (stamped `now_ms`, on CQL the event's `sent_at_ms`;
    /// none when client_msg_id is empty) and bump the conversation's `last_seq` and
    /// `updated_at_ms`. The returned message is the input as stored.
    ///
    /// Effects, applied atomically with storing the event (SQLite: same transaction;
    /// Scylla: idempotently when rolling the append forward). Append does not
    /// re-authorize (routing called `Authorize` first); an effect whose target does
    /// not apply any more (missing, not a "message", already deleted, ...) is skipped
    /// and the event is still stored. `e` is the event, `target` the stored event at
    /// `e.target_seq`, "message" means kind "message" or "".
    /// - "message" with `thread_root_seq > 0`: the root's `reply_count` + 1 (if the
    ///   root is a "message"). Its `mentions` are stored so that `unread_mentions` can
    ///   count them.
    /// - "edit": target ("message", not deleted) gets `body` / `content_type` of `e`
    ///   and `edited_at_ms = e.sent_at_ms`.
    /// - "delete": target ("message", not deleted): body and content_type cleared,
    ///   `deleted = true`, all its reactions removed, and the bodies (and
    ///   content_types) of every stored "edit" event whose target_seq is it cleared
    ///   too: no copy of the text stays in storage.
    /// - "reaction": target ("message", not deleted): (target, e.sender_id, e.emoji)
    ///   added, or removed when `e.remove`; idempotent.
    /// - "system" (groups), by `e.system.action`, actor = `e.sender_id`:
    ///   members_added: each user_id not yet a member becomes one, role "member",
    ///   joined_at_ms = now_ms (existing members unchanged); members_removed: the
    ///   user_ids stop being members; members_banned: like removed, plus each user_id
    ///   is put on the ban list; members_unbanned: user_ids leave the ban list;
    ///   member_left: the actor stops being a member; role_changed: role "owner" with
    ///   one user_id transfers ownership (that user becomes "owner" and the
    ///   conversation's owner_id, the previous owner becomes "admin"), roles
    ///   "admin"/"member" set the role of each user_id that is a member and not the
    ///   owner; renamed: name = system.name; topic_changed: topic = system.topic.
    ///   Whenever the owner stops being a member and members remain, ownership passes
    ///   to the earliest-joined admin, else the earliest-joined member (ties: lowest
    ///   user id); owner_id follows. Membership changes bump `updated_at_ms` like any
    ///   append.
    async fn append(&self, message: Message, dedupe_since_ms: i64, now_ms: i64)
        -> Result<Appended>;

    /// Several events of ONE conversation, in log order, appended as [`append`] would
    /// one after the other: each non-duplicate takes the next sequence from
    /// `first_seq` on (`message.seq` of the input is ignored), a duplicate (also of an
    /// earlier event of the batch) takes none. `first_seq` must be `last_seq + 1`
    /// (`SequenceConflict`, nothing written). Returns the results of a prefix of the
    /// batch, at least the first event; an error means nothing of the batch was
    /// appended by this call (SQLite; on CQL part of it may be, and the same batch
    /// sent again completes it: what is stored is found in place, not again). SQLite
    /// writes the whole batch in one transaction; the
    /// CQL store writes it without a conditional update (see `scylla::append`): its
    /// rows in one batch per partition, its dedupe decisions taken against each
    /// event's own `sent_at_ms` minus the window, so that whoever replays the same
    /// log writes the same thing.
    ///
    /// [`append`]: HistoryStore::append
    async fn append_batch(
        &self,
        messages: Vec<Message>,
        first_seq: u64,
        dedupe_since_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<Appended>>;

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
    ///
    /// Every event is returned with all its stored fields. "message" rows carry their
    /// CURRENT state: body/content_type (edited, or empty when deleted), `edited_at_ms`,
    /// `deleted`, `reactions` (one ReactionCount per emoji with its count, sorted by
    /// emoji, `mine` left false: the page is shared by readers, the service fills
    /// `mine` from [`HistoryStore::my_reactions`]) and `reply_count`. Other kinds are
    /// returned as stored (edits of a deleted message have empty bodies).
    async fn history_page(&self, query: &PageQuery) -> Result<HistoryResult>;

    /// For every conversation `user_id` is a member of, with no cursor or
    /// `last_seq > cursor`: the conversation with members, its messages after the
    /// cursor (ascending, at most `limit`) and its id in `truncated` if more remain.
    /// Cursors of other conversations are ignored.
    ///
    /// Conversations carry `members`, `member_roles`, `topic` and the user's own
    /// fields exactly as in [`HistoryStore::list_conversations`] (raw muted_until_ms).
    /// Messages are in their current state as in [`HistoryStore::history_page`]
    /// (`mine` false). `dnd_until_ms` is left 0 (the service fills it from
    /// [`HistoryStore::dnd_until`]).
    async fn sync(
        &self,
        user_id: &str,
        cursors: &HashMap<String, u64>,
        limit: u32,
    ) -> Result<SyncResult>;

    /// Raise the user's read marker to `min(seq, last_seq)` (never lower it; its time
    /// changes only when it moves) and return the stored marker with kind "read".
    /// Raises the delivered marker to at least the same sequence (with the same time
    /// when it moves). `NotFound` / `NotMember` as usual.
    async fn set_read_marker(
        &self,
        conversation_id: &str,
        user_id: &str,
        seq: u64,
        now_ms: i64,
    ) -> Result<ReadMarker>;

    /// Raise the user's delivered marker to `min(seq, last_seq)` (never lower it) and
    /// return it with kind "delivered": `seq` = max(delivered, read) and `at_ms` the
    /// time the delivered marker last moved. `NotFound` / `NotMember` as usual.
    async fn set_delivered_marker(
        &self,
        conversation_id: &str,
        user_id: &str,
        seq: u64,
        now_ms: i64,
    ) -> Result<ReadMarker>;

    /// The event stored at `seq` (current state like a history row; `reactions` may
    /// be left empty), or `None` when there is none (also for an unknown conversation).
    /// Used to authorize events that refer to another one.
    async fn message_at(&self, conversation_id: &str, seq: u64) -> Result<Option<Message>>;

    /// Those of `user_ids` that are on the conversation's ban list (any order).
    async fn banned_among(&self, conversation_id: &str, user_ids: &[String])
        -> Result<Vec<String>>;

    /// The (seq, emoji) reactions `user_id` currently has on messages of the
    /// conversation with `from_seq <= seq <= to_seq` (any order). The service uses it
    /// to set `ReactionCount.mine` for the reader.
    async fn my_reactions(
        &self,
        conversation_id: &str,
        user_id: &str,
        from_seq: u64,
        to_seq: u64,
    ) -> Result<Vec<(u64, String)>>;

    /// A thread page (see [`ThreadPage`]); `NotFound` when the conversation is unknown
    /// or `root_seq` is not a stored "message". No membership check.
    async fn thread_page(&self, query: &ThreadQuery) -> Result<ThreadPage>;

    /// Every member's markers, sorted by user id (zeros for a member without any):
    /// `read_seq`, `delivered_seq` = max(read, delivered), `read_at_ms`. `NotFound`
    /// for an unknown conversation.
    async fn receipts(&self, conversation_id: &str) -> Result<Vec<MemberReceipt>>;

    /// Store a notification preference of `user_id`: with a `conversation_id`, the
    /// mute of that conversation; with an empty one, the user's do-not-disturb.
    /// `until_ms`: -1 forever, 0 off (the stored preference is removed), else until
    /// then. The service checks membership and values first.
    async fn set_notification(
        &self,
        user_id: &str,
        conversation_id: &str,
        until_ms: i64,
    ) -> Result<()>;

    /// The user's raw do-not-disturb value (-1, 0 or a time; 0 when never set).
    async fn dnd_until(&self, user_id: &str) -> Result<i64>;

    /// Every member of the conversation with their raw mute of it and their raw
    /// do-not-disturb (see [`MemberNotification`]), sorted by user id. `NotFound` for
    /// an unknown conversation.
    async fn notification_state(&self, conversation_id: &str) -> Result<Vec<MemberNotification>>;

    /// Those of `other_ids` that are contacts of `user_id`: they share at least one
    /// conversation with `user_id` in which they (the other) have appended an event
    /// of any kind. Being put into a conversation alone makes nobody a contact.
    /// Deduplicated, sorted; `user_id` itself is never in the answer.
    async fn shared_contacts(&self, user_id: &str, other_ids: &[String]) -> Result<Vec<String>>;

    /// Store a webhook, atomically with its two checks: the conversation exists
    /// (`NotFound`) and has fewer than `max_per_conversation` webhooks
    /// (`InvalidRequest` otherwise). `delivered_seq` starts at the conversation's
    /// current `last_seq`. Returns it with its secret.
    async fn put_webhook(&self, webhook: NewWebhook) -> Result<Webhook>;

    /// Webhooks with secrets, sorted by (conversation_id, webhook_id): of one
    /// conversation, or of every conversation when `conversation_id` is `None`.
    async fn list_webhooks(&self, conversation_id: Option<&str>) -> Result<Vec<Webhook>>;

    /// Delete a webhook of the conversation; `NotFound` when it has no such webhook.
    async fn delete_webhook(&self, conversation_id: &str, webhook_id: &str) -> Result<()>;

    /// Raise a webhook's delivered_seq to `delivered_seq` (never lower it) and return
    /// the stored webhook; `NotFound` when the conversation has no such webhook.
    async fn advance_webhook(
        &self,
        conversation_id: &str,
        webhook_id: &str,
        delivered_seq: u64,
    ) -> Result<Webhook>;

    /// Delete at most `max_rows` dedupe keys stored before `before_ms`; returns how many.
    /// A store whose keys expire by themselves deletes nothing.
    async fn purge_dedupe(&self, before_ms: i64, max_rows: u32) -> Result<u64>;

    /// True when dedupe keys expire by themselves (a TTL of the window): the purge
    /// then has nothing to do. Either way a key older than the window answers nothing.
    fn dedupe_keys_expire_by_themselves(&self) -> bool {
        false
    }
}
