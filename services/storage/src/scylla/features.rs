//! Timeline effects and the conversation features of the ScyllaDB/Cassandra store:
//! the effects an append rolls forward (edits, deletes, reactions, thread replies,
//! system events), current-state reads (reactions, threads, unread counts, markers,
//! receipts), notification preferences, shared contacts and webhooks. The layout and
//! the reasoning behind it are in the module header of [`super`] and in [`super::schema`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use ::scylla::client::session::Session;
use ::scylla::errors::ExecutionError;
use ::scylla::statement::prepared::PreparedStatement;
use prost::Message as _;
use switchboard_proto::{Member, MemberReceipt, Message, ReactionCount, SystemEvent, Webhook};

use super::append::event_ts;
use super::{
    bucket_of, seq_i64, ConvRow, MessageRow, PendingMember, PendingMembers, ScyllaStore,
    BUCKET_SIZE, FANOUT, IN_CHUNK, MAX_LWT_ATTEMPTS, PAGE_SIZE,
};
use crate::error::{Result, StorageError};
use crate::store::{
    actions, kinds, roles, ConversationKind, MemberNotification, NewWebhook, ThreadPage,
    ThreadQuery,
};

/// (conversation, sender) pairs one process remembers as recorded; past this the
/// set starts over (the rows stay; a few are written again).
const MAX_KNOWN_SENDERS: usize = 100_000;

/// Unread counts (and unread mention counts) stop here.
pub(super) const UNREAD_CAP: u32 = 1000;
/// Rows read per request by the unread scan.
const UNREAD_SCAN_PAGE: i32 = 500;
/// Most events the unread scan reads after a read marker. Unread counts stop at
/// [`UNREAD_CAP`]; this bounds the work when most events after the marker are
/// not countable (the user's own messages, reactions, edits).
pub(super) const UNREAD_SCAN_MAX_EVENTS: usize = 5_000;
/// Partitions of the webhook index (`webhooks_by_shard`).
pub(super) const WEBHOOK_SHARDS: i32 = 16;

/// The statements of the conversation features, prepared once.
pub(super) struct FeatureStatements {
    thread_insert: PreparedStatement,
    thread_after: PreparedStatement,
    msg_reply_count: PreparedStatement,
    msg_edit: PreparedStatement,
    msg_delete: PreparedStatement,
    msg_clear_body: PreparedStatement,
    msg_in: PreparedStatement,
    msg_scan_after: PreparedStatement,
    reaction_insert: PreparedStatement,
    reaction_delete: PreparedStatement,
    reaction_user_insert: PreparedStatement,
    reaction_user_delete: PreparedStatement,
    reactions_of_target: PreparedStatement,
    reactions_delete_target: PreparedStatement,
    reactions_range: PreparedStatement,
    reactions_in: PreparedStatement,
    my_reactions: PreparedStatement,
    pub(super) conv_commit_system: PreparedStatement,
    pub(super) members_full: PreparedStatement,
    member_role: PreparedStatement,
    pub(super) ban_insert: PreparedStatement,
    pub(super) ban_delete: PreparedStatement,
    pub(super) departure_insert: PreparedStatement,
    pub(super) departure_delete: PreparedStatement,
    pub(super) departure_select: PreparedStatement,
    bans_among: PreparedStatement,
    markers_all: PreparedStatement,
    delivered_select: PreparedStatement,
    delivered_insert: PreparedStatement,
    delivered_raise: PreparedStatement,
    delivered_all: PreparedStatement,
    mute_select: PreparedStatement,
    mutes_all: PreparedStatement,
    mute_upsert: PreparedStatement,
    mute_delete: PreparedStatement,
    dnd_select: PreparedStatement,
    dnd_among: PreparedStatement,
    dnd_upsert: PreparedStatement,
    dnd_delete: PreparedStatement,
    webhook_slots: PreparedStatement,
    webhook_insert: PreparedStatement,
    webhook_delete: PreparedStatement,
    webhook_advance: PreparedStatement,
    webhook_index_insert: PreparedStatement,
    webhook_index_delete: PreparedStatement,
    webhook_index_shard: PreparedStatement,
    sender_insert: PreparedStatement,
    sender_exists: PreparedStatement,
    pub(super) creator_insert: PreparedStatement,
    pub(super) creator_count: PreparedStatement,
    pub(super) pair_conversation: PreparedStatement,
}

impl FeatureStatements {
    pub(super) async fn prepare(
        session: &Session,
        ks: &str,
    ) -> std::result::Result<FeatureStatements, ExecutionError> {
        // `idempotent`: safe for the driver to retry; `paged`: read with `all_rows`.
        let prep = |cql: String, idempotent: bool, paged: bool| async move {
            let mut st = session.prepare(cql).await?;
            st.set_is_idempotent(idempotent);
            if paged {
                st.set_page_size(PAGE_SIZE);
            }
            Ok::<_, ExecutionError>(st)
        };
        let columns = super::MESSAGE_COLUMNS;
        let key = "WHERE conversation_id = ? AND bucket = ? AND seq = ?";
        Ok(FeatureStatements {
            thread_insert: prep(
                format!(
                    "INSERT INTO {ks}.thread_replies (conversation_id, root_seq, seq) \
                     VALUES (?, ?, ?) USING TIMESTAMP ?"
                ),
                true,
                false,
            )
            .await?,
            thread_after: prep(
                format!(
                    "SELECT seq FROM {ks}.thread_replies WHERE conversation_id = ? \
                     AND root_seq = ? AND seq > ? ORDER BY seq ASC LIMIT ?"
                ),
                true,
                false,
            )
            .await?,
            msg_reply_count: prep(
                format!(
                    "UPDATE {ks}.messages USING TIMESTAMP ? SET reply_count = ?, \
                     reply_last_seq = ? {key}"
                ),
                true,
                false,
            )
            .await?,
            msg_edit: prep(
                format!(
                    "UPDATE {ks}.messages USING TIMESTAMP ? SET body = ?, content_type = ?, \
                     edited_at_ms = ?, edit_seqs = edit_seqs + ? {key}"
                ),
                true,
                false,
            )
            .await?,
            msg_delete: prep(
                format!(
                    "UPDATE {ks}.messages USING TIMESTAMP ? SET body = '', content_type = '', \
                     deleted = true {key}"
                ),
                true,
                false,
            )
            .await?,
            msg_clear_body: prep(
                format!(
                    "UPDATE {ks}.messages USING TIMESTAMP ? SET body = '', content_type = '' {key}"
                ),
                true,
                false,
            )
            .await?,
            msg_in: prep(
                format!(
                    "SELECT {columns} FROM {ks}.messages \
                     WHERE conversation_id = ? AND bucket = ? AND seq IN ?"
                ),
                true,
                false,
            )
            .await?,
            msg_scan_after: prep(
                format!(
                    "SELECT seq, sender_id, kind, deleted, mentions FROM {ks}.messages \
                     WHERE conversation_id = ? AND bucket = ? AND seq > ? \
                     ORDER BY seq ASC LIMIT ?"
                ),
                true,
                false,
            )
            .await?,
            reaction_insert: prep(
                format!(
                    "INSERT INTO {ks}.reactions (conversation_id, bucket, target_seq, emoji, \
                     user_id, at_ms) VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
                ),
                true,
                false,
            )
            .await?,
            reaction_delete: prep(
                format!(
                    "DELETE FROM {ks}.reactions USING TIMESTAMP ? WHERE conversation_id = ? \
                     AND bucket = ? AND target_seq = ? AND emoji = ? AND user_id = ?"
                ),
                true,
                false,
            )
            .await?,
            reaction_user_insert: prep(
                format!(
                    "INSERT INTO {ks}.reactions_by_user (conversation_id, user_id, target_seq, \
                     emoji) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
                ),
                true,
                false,
            )
            .await?,
            reaction_user_delete: prep(
                format!(
                    "DELETE FROM {ks}.reactions_by_user USING TIMESTAMP ? WHERE conversation_id = ? \
                     AND user_id = ? AND target_seq = ? AND emoji = ?"
                ),
                true,
                false,
            )
            .await?,
            reactions_of_target: prep(
                format!(
                    "SELECT emoji, user_id FROM {ks}.reactions WHERE conversation_id = ? \
                     AND bucket = ? AND target_seq = ?"
                ),
                true,
                true,
            )
            .await?,
            reactions_delete_target: prep(
                format!(
                    "DELETE FROM {ks}.reactions USING TIMESTAMP ? WHERE conversation_id = ? \
                     AND bucket = ? AND target_seq = ?"
                ),
                true,
                false,
            )
            .await?,
            reactions_range: prep(
                format!(
                    "SELECT target_seq, emoji FROM {ks}.reactions WHERE conversation_id = ? \
                     AND bucket = ? AND target_seq >= ? AND target_seq <= ?"
                ),
                true,
                true,
            )
            .await?,
            reactions_in: prep(
                format!(
                    "SELECT target_seq, emoji FROM {ks}.reactions WHERE conversation_id = ? \
                     AND bucket = ? AND target_seq IN ?"
                ),
                true,
                true,
            )
            .await?,
            my_reactions: prep(
                format!(
                    "SELECT target_seq, emoji FROM {ks}.reactions_by_user \
                     WHERE conversation_id = ? AND user_id = ? \
                     AND target_seq >= ? AND target_seq <= ?"
                ),
                true,
                true,
            )
            .await?,
            conv_commit_system: prep(
                format!(
                    "UPDATE {ks}.conversations SET members_version = ?, member_count = ?, \
                     pending_members = ?, name = ?, topic = ?, owner_id = ?, members_seq = ? \
                     WHERE conversation_id = ? IF members_version = ?"
                ),
                false,
                false,
            )
            .await?,
            members_full: prep(
                format!(
                    "SELECT user_id, role, joined_at_ms FROM {ks}.members_by_conversation \
                     WHERE conversation_id = ?"
                ),
                true,
                true,
            )
            .await?,
            member_role: prep(
                format!(
                    "SELECT role FROM {ks}.members_by_conversation \
                     WHERE conversation_id = ? AND user_id = ?"
                ),
                true,
                false,
            )
            .await?,
            ban_insert: prep(
                format!(
                    "INSERT INTO {ks}.bans (conversation_id, user_id, banned_at_ms) \
                     VALUES (?, ?, ?) USING TIMESTAMP ?"
                ),
                true,
                false,
            )
            .await?,
            ban_delete: prep(
                format!(
                    "DELETE FROM {ks}.bans USING TIMESTAMP ? \
                     WHERE conversation_id = ? AND user_id = ?"
                ),
                true,
                false,
            )
            .await?,
            departure_insert: prep(
                format!(
                    "INSERT INTO {ks}.departures_by_user (user_id, conversation_id, seq) \
                     VALUES (?, ?, ?) USING TIMESTAMP ?"
                ),
                true,
                false,
            )
            .await?,
            departure_delete: prep(
                format!(
                    "DELETE FROM {ks}.departures_by_user USING TIMESTAMP ? \
                     WHERE user_id = ? AND conversation_id = ?"
                ),
                true,
                false,
            )
            .await?,
            departure_select: prep(
                format!(
                    "SELECT seq FROM {ks}.departures_by_user \
                     WHERE user_id = ? AND conversation_id = ?"
                ),
                true,
                false,
            )
            .await?,
            bans_among: prep(
                format!("SELECT user_id FROM {ks}.bans WHERE conversation_id = ? AND user_id IN ?"),
                true,
                false,
            )
            .await?,
            markers_all: prep(
                format!(
                    "SELECT user_id, seq, at_ms FROM {ks}.read_markers WHERE conversation_id = ?"
                ),
                true,
                true,
            )
            .await?,
            delivered_select: prep(
                format!(
                    "SELECT seq, at_ms FROM {ks}.delivered_markers \
                     WHERE conversation_id = ? AND user_id = ?"
                ),
                true,
                false,
            )
            .await?,
            delivered_insert: prep(
                format!(
                    "INSERT INTO {ks}.delivered_markers (conversation_id, user_id, seq, at_ms) \
                     VALUES (?, ?, ?, ?) IF NOT EXISTS"
                ),
                false,
                false,
            )
            .await?,
            delivered_raise: prep(
                format!(
                    "UPDATE {ks}.delivered_markers SET seq = ?, at_ms = ? \
                     WHERE conversation_id = ? AND user_id = ? IF seq < ?"
                ),
                false,
                false,
            )
            .await?,
            delivered_all: prep(
                format!(
                    "SELECT user_id, seq, at_ms FROM {ks}.delivered_markers \
                     WHERE conversation_id = ?"
                ),
                true,
                true,
            )
            .await?,
            mute_select: prep(
                format!(
                    "SELECT until_ms FROM {ks}.mutes WHERE conversation_id = ? AND user_id = ?"
                ),
                true,
                false,
            )
            .await?,
            mutes_all: prep(
                format!("SELECT user_id, until_ms FROM {ks}.mutes WHERE conversation_id = ?"),
                true,
                true,
            )
            .await?,
            mute_upsert: prep(
                format!(
                    "INSERT INTO {ks}.mutes (conversation_id, user_id, until_ms) VALUES (?, ?, ?)"
                ),
                true,
                false,
            )
            .await?,
            mute_delete: prep(
                format!("DELETE FROM {ks}.mutes WHERE conversation_id = ? AND user_id = ?"),
                true,
                false,
            )
            .await?,
            dnd_select: prep(
                format!("SELECT until_ms FROM {ks}.do_not_disturb WHERE user_id = ?"),
                true,
                false,
            )
            .await?,
            dnd_among: prep(
                format!("SELECT user_id, until_ms FROM {ks}.do_not_disturb WHERE user_id IN ?"),
                true,
                false,
            )
            .await?,
            dnd_upsert: prep(
                format!("INSERT INTO {ks}.do_not_disturb (user_id, until_ms) VALUES (?, ?)"),
                true,
                false,
            )
            .await?,
            dnd_delete: prep(
                format!("DELETE FROM {ks}.do_not_disturb WHERE user_id = ?"),
                true,
                false,
            )
            .await?,
            webhook_slots: prep(
                format!(
                    "SELECT slot, webhook_id, url, secret, delivered_seq, created_at_ms, \
                     created_by FROM {ks}.webhooks WHERE conversation_id = ?"
                ),
                true,
                false,
            )
            .await?,
            webhook_insert: prep(
                format!(
                    "INSERT INTO {ks}.webhooks (conversation_id, slot, webhook_id, url, secret, \
                     delivered_seq, created_at_ms, created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
                     IF NOT EXISTS"
                ),
                false,
                false,
            )
            .await?,
            webhook_delete: prep(
                format!(
                    "DELETE FROM {ks}.webhooks WHERE conversation_id = ? AND slot = ? \
                     IF webhook_id = ?"
                ),
                false,
                false,
            )
            .await?,
            webhook_advance: prep(
                format!(
                    "UPDATE {ks}.webhooks SET delivered_seq = ? WHERE conversation_id = ? \
                     AND slot = ? IF webhook_id = ? AND delivered_seq < ?"
                ),
                false,
                false,
            )
            .await?,
            webhook_index_insert: prep(
                format!(
                    "INSERT INTO {ks}.webhooks_by_shard (shard, conversation_id, webhook_id) \
                     VALUES (?, ?, ?)"
                ),
                true,
                false,
            )
            .await?,
            webhook_index_delete: prep(
                format!(
                    "DELETE FROM {ks}.webhooks_by_shard WHERE shard = ? AND conversation_id = ? \
                     AND webhook_id = ?"
                ),
                true,
                false,
            )
            .await?,
            webhook_index_shard: prep(
                format!(
                    "SELECT conversation_id, webhook_id FROM {ks}.webhooks_by_shard WHERE shard = ?"
                ),
                true,
                true,
            )
            .await?,
            sender_insert: prep(
                format!("INSERT INTO {ks}.senders (conversation_id, user_id) VALUES (?, ?)"),
                true,
                false,
            )
            .await?,
            sender_exists: prep(
                format!(
                    "SELECT user_id FROM {ks}.senders WHERE conversation_id = ? AND user_id = ?"
                ),
                true,
                false,
            )
            .await?,
            creator_insert: prep(
                format!(
                    "INSERT INTO {ks}.conversations_by_creator (creator_id, conversation_id) \
                     VALUES (?, ?)"
                ),
                true,
                false,
            )
            .await?,
            creator_count: prep(
                format!("SELECT COUNT(*) FROM {ks}.conversations_by_creator WHERE creator_id = ?"),
                true,
                false,
            )
            .await?,
            pair_conversation: prep(
                format!("SELECT conversation_id FROM {ks}.direct_pairs WHERE pair_key = ?"),
                true,
                false,
            )
            .await?,
        })
    }
}

/// A member row with its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MemberInfo {
    pub(super) user_id: String,
    pub(super) role: String,
    pub(super) joined_at_ms: i64,
}

/// What a system event changes, computed from the state before it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct SystemPlan {
    /// Members written (new, or with a new role), with role and join time.
    pub(super) upserts: Vec<PendingMember>,
    pub(super) removes: Vec<String>,
    pub(super) banned: Vec<String>,
    pub(super) unbanned: Vec<String>,
    pub(super) name: String,
    pub(super) topic: String,
    pub(super) owner_id: String,
    pub(super) member_count: usize,
}

/// The changes of system event `event` by `actor` on a group with `members`, name,
/// topic and owner as given; the same rules as the SQLite store's (see
/// [`crate::store::HistoryStore::append`]).
pub(super) fn plan_system(
    members: &[MemberInfo],
    name: &str,
    topic: &str,
    owner_id: &str,
    actor: &str,
    event: &SystemEvent,
    now_ms: i64,
) -> SystemPlan {
    let mut current: BTreeMap<String, MemberInfo> = members
        .iter()
        .map(|m| (m.user_id.clone(), m.clone()))
        .collect();
    let mut removed: BTreeSet<String> = BTreeSet::new();
    let mut banned: Vec<String> = Vec::new();
    let mut unbanned: Vec<String> = Vec::new();
    let mut name = name.to_owned();
    let mut topic = topic.to_owned();
    let mut owner = owner_id.to_owned();
    let users = &event.user_ids;
    let mut remove = |current: &mut BTreeMap<String, MemberInfo>, user: &str| {
        if current.remove(user).is_some() {
            removed.insert(user.to_owned());
        }
    };
    match event.action.as_str() {
        actions::MEMBERS_ADDED => {
            for user in users {
                current.entry(user.clone()).or_insert_with(|| MemberInfo {
                    user_id: user.clone(),
                    role: roles::MEMBER.to_owned(),
                    joined_at_ms: now_ms,
                });
            }
        }
        actions::MEMBERS_REMOVED => {
            for user in users {
                remove(&mut current, user);
            }
        }
        actions::MEMBERS_BANNED => {
            for user in users {
                remove(&mut current, user);
                if !banned.contains(user) {
                    banned.push(user.clone());
                }
            }
        }
        actions::MEMBERS_UNBANNED => {
            for user in users {
                if !unbanned.contains(user) {
                    unbanned.push(user.clone());
                }
            }
        }
        actions::MEMBER_LEFT => remove(&mut current, actor),
        actions::ROLE_CHANGED if event.role == roles::OWNER => {
            if let [new_owner] = users.as_slice() {
                if current.contains_key(new_owner) {
                    for m in current.values_mut() {
                        if m.role == roles::OWNER {
                            m.role = roles::ADMIN.to_owned();
                        }
                    }
                    if let Some(m) = current.get_mut(new_owner) {
                        m.role = roles::OWNER.to_owned();
                    }
                    owner = new_owner.clone();
                }
            }
        }
        actions::ROLE_CHANGED if event.role == roles::ADMIN || event.role == roles::MEMBER => {
            for user in users {
                if let Some(m) = current.get_mut(user) {
                    if m.role != roles::OWNER {
                        m.role = event.role.clone();
                    }
                }
            }
        }
        actions::RENAMED => name = event.name.clone(),
        actions::TOPIC_CHANGED => topic = event.topic.clone(),
        _ => {}
    }
    // The group keeps an owner while it has members.
    if !current.values().any(|m| m.role == roles::OWNER) {
        let heir = current
            .values()
            .min_by(|a, b| {
                let rank = |m: &MemberInfo| u8::from(m.role != roles::ADMIN);
                (rank(a), a.joined_at_ms, &a.user_id).cmp(&(rank(b), b.joined_at_ms, &b.user_id))
            })
            .map(|m| m.user_id.clone());
        if let Some(heir) = heir {
            if let Some(m) = current.get_mut(&heir) {
                m.role = roles::OWNER.to_owned();
            }
            owner = heir;
        }
    }
    let before: HashMap<&str, &MemberInfo> =
        members.iter().map(|m| (m.user_id.as_str(), m)).collect();
    let upserts = current
        .values()
        .filter(|m| before.get(m.user_id.as_str()) != Some(m))
        .map(|m| PendingMember {
            user_id: m.user_id.clone(),
            role: m.role.clone(),
            joined_at_ms: m.joined_at_ms,
        })
        .collect();
    SystemPlan {
        upserts,
        removes: removed.into_iter().collect(),
        banned,
        unbanned,
        name,
        topic,
        owner_id: owner,
        member_count: current.len(),
    }
}

impl SystemPlan {
    fn changes_nothing(&self, row: &ConvRow) -> bool {
        self.upserts.is_empty()
            && self.removes.is_empty()
            && self.banned.is_empty()
            && self.unbanned.is_empty()
            && self.name == row.name
            && self.topic == row.topic
            && self.owner_id == row.owner_id
    }
}

/// `(effective delivered seq, its time)`: the delivered marker is at least the read
/// marker; when the read marker is ahead, the delivered one moved with it.
fn effective_delivered(read: (i64, i64), delivered: Option<(i64, i64)>) -> (i64, i64) {
    match delivered {
        Some((d, at)) if d >= read.0 => (d, at),
        _ => read,
    }
}

/// Stable shard of a conversation in the webhook index (FNV-1a).
fn webhook_shard(conversation_id: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in conversation_id.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % WEBHOOK_SHARDS as u32) as i32
}

type WebhookRow = (
    i32,
    String,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<String>,
);

fn webhook_from_row(conversation_id: &str, row: WebhookRow) -> (i32, Webhook) {
    let (slot, webhook_id, url, secret, delivered, created, by) = row;
    (
        slot,
        Webhook {
            webhook_id,
            conversation_id: conversation_id.to_owned(),
            url: url.unwrap_or_default(),
            secret: secret.unwrap_or_default(),
            delivered_seq: delivered.unwrap_or(0).max(0) as u64,
            created_at_ms: created.unwrap_or(0),
            created_by: by.unwrap_or_default(),
            suspended: false,
        },
    )
}

/// The user's own fields of a conversation.
pub(super) struct UserFields {
    role: String,
    read_seq: u64,
    delivered_seq: u64,
    unread: u32,
    mentions: u32,
    muted_until_ms: i64,
}

impl UserFields {
    pub(super) fn apply(self, conv: &mut switchboard_proto::Conversation) {
        conv.my_role = self.role;
        conv.read_seq = self.read_seq;
        conv.delivered_seq = self.delivered_seq;
        conv.unread_count = self.unread;
        conv.unread_mentions = self.mentions;
        conv.muted_until_ms = self.muted_until_ms;
    }
}

// Effects of appended events.
impl ScyllaStore {
    /// The effects of a committed event (see [`crate::store::HistoryStore::append`]).
    /// Idempotent: every step writes a value computed from the event and from state
    /// that earlier steps of the same event do not change in a way that alters the
    /// outcome.
    pub(super) async fn apply_effects(&self, m: &Message, now_ms: i64) -> Result<()> {
        match m.kind.as_str() {
            kinds::EDIT => self.apply_edit(m).await,
            kinds::DELETE => self.apply_delete(m).await,
            kinds::REACTION => self.apply_reaction(m).await,
            kinds::SYSTEM => self.apply_system(m, now_ms).await,
            kind if kinds::is_message(kind) && m.thread_root_seq > 0 => {
                self.add_thread_reply(m).await
            }
            _ => Ok(()),
        }
    }

    /// Record that `sender` sent in the conversation (shared contacts); skipped when
    /// this process recorded it already (rows of `senders` are never deleted).
    pub(super) async fn add_sender(&self, conversation_id: &str, sender: &str) -> Result<()> {
        let key = (conversation_id.to_owned(), sender.to_owned());
        if self.known_senders().contains(&key) {
            return Ok(());
        }
        self.exec(&self.xt.sender_insert, (conversation_id, sender))
            .await?;
        let mut known = self.known_senders();
        if known.len() >= MAX_KNOWN_SENDERS {
            known.clear();
        }
        known.insert(key);
        Ok(())
    }

    fn known_senders(&self) -> std::sync::MutexGuard<'_, HashSet<(String, String)>> {
        // Only set operations under the lock: a poisoned set is still a valid cache.
        self.known_senders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A target of an edit, delete or reaction: a stored "message".
    async fn message_target(&self, m: &Message) -> Result<Option<MessageRow>> {
        if m.target_seq == 0 || m.target_seq >= m.seq {
            return Ok(None);
        }
        Ok(self
            .load_row(&m.conversation_id, m.target_seq)
            .await?
            .filter(MessageRow::is_message))
    }

    /// The reply's row in the thread, and the root's reply count. The count is
    /// raised only while the root's `reply_last_seq` is below this reply (one row
    /// write carries both), so running it again counts nothing twice.
    async fn add_thread_reply(&self, m: &Message) -> Result<()> {
        let (id, root_seq) = (m.conversation_id.as_str(), m.thread_root_seq);
        if root_seq >= m.seq {
            return Ok(());
        }
        let Some(root) = self
            .load_row(id, root_seq)
            .await?
            .filter(MessageRow::is_message)
        else {
            return Ok(());
        };
        self.exec(
            &self.xt.thread_insert,
            (id, seq_i64(root_seq), seq_i64(m.seq), event_ts(m.seq)),
        )
        .await?;
        if root.reply_last_seq.unwrap_or(0) < seq_i64(m.seq) {
            let count = root.reply_count.unwrap_or(0).max(0).saturating_add(1);
            self.exec(
                &self.xt.msg_reply_count,
                (
                    event_ts(m.seq),
                    count,
                    seq_i64(m.seq),
                    id,
                    bucket_of(root_seq),
                    seq_i64(root_seq),
                ),
            )
            .await?;
        }
        Ok(())
    }

    async fn apply_edit(&self, m: &Message) -> Result<()> {
        let Some(target) = self.message_target(m).await? else {
            return Ok(());
        };
        if target.is_deleted() {
            return Ok(());
        }
        let t = m.target_seq;
        self.exec(
            &self.xt.msg_edit,
            (
                event_ts(m.seq),
                m.body.as_str(),
                m.content_type.as_str(),
                m.sent_at_ms,
                vec![seq_i64(m.seq)],
                m.conversation_id.as_str(),
                bucket_of(t),
                seq_i64(t),
            ),
        )
        .await?;
        Ok(())
    }

    /// Clears the target and every edit of it, and removes its reactions. Also runs
    /// on a target already marked deleted (a repeat of this same delete finishing
    /// what a crash interrupted; clearing twice changes nothing).
    async fn apply_delete(&self, m: &Message) -> Result<()> {
        let Some(target) = self.message_target(m).await? else {
            return Ok(());
        };
        let id = m.conversation_id.as_str();
        let t = m.target_seq;
        let (bucket, ts) = (bucket_of(t), seq_i64(t));
        let at = event_ts(m.seq);
        // The per-user copies first: they are found through the target's rows.
        let reactions = self
            .all_rows::<(String, String)>(&self.xt.reactions_of_target, (id, bucket, ts))
            .await?;
        for group in reactions.chunks(FANOUT) {
            let deletes = group.iter().map(|(emoji, user)| {
                self.exec(
                    &self.xt.reaction_user_delete,
                    (at, id, user.as_str(), ts, emoji.as_str()),
                )
            });
            futures::future::try_join_all(deletes).await?;
        }
        self.exec(&self.xt.reactions_delete_target, (at, id, bucket, ts))
            .await?;
        let edits: Vec<i64> = target.edit_seqs.clone().unwrap_or_default();
        for group in edits.chunks(FANOUT) {
            let clears = group.iter().map(|&e| {
                self.exec(
                    &self.xt.msg_clear_body,
                    (at, id, bucket_of(e.max(0) as u64), e),
                )
            });
            futures::future::try_join_all(clears).await?;
        }
        self.exec(&self.xt.msg_delete, (at, id, bucket, ts)).await?;
        Ok(())
    }

    async fn apply_reaction(&self, m: &Message) -> Result<()> {
        let Some(target) = self.message_target(m).await? else {
            return Ok(());
        };
        if target.is_deleted() || m.emoji.is_empty() {
            return Ok(());
        }
        let id = m.conversation_id.as_str();
        let (user, emoji) = (m.sender_id.as_str(), m.emoji.as_str());
        let t = m.target_seq;
        let (bucket, ts) = (bucket_of(t), seq_i64(t));
        let at = event_ts(m.seq);
        if m.remove {
            tokio::try_join!(
                self.exec(&self.xt.reaction_delete, (at, id, bucket, ts, emoji, user)),
                self.exec(&self.xt.reaction_user_delete, (at, id, user, ts, emoji)),
            )?;
        } else {
            tokio::try_join!(
                self.exec(
                    &self.xt.reaction_insert,
                    (id, bucket, ts, emoji, user, m.sent_at_ms, at)
                ),
                self.exec(&self.xt.reaction_user_insert, (id, user, ts, emoji, at)),
            )?;
        }
        Ok(())
    }

    /// A system event goes through the conversation row like a membership change:
    /// `IF members_version = v` commits the members, bans, name, topic and owner it
    /// results in, plus `members_seq` = the event's sequence, which makes a repeat
    /// of the same event a no-op. The member and ban rows follow through the
    /// membership roll-forward.
    async fn apply_system(&self, m: &Message, now_ms: i64) -> Result<()> {
        let Some(event) = &m.system else {
            return Ok(());
        };
        let id = m.conversation_id.as_str();
        let seq = seq_i64(m.seq);
        for _ in 0..MAX_LWT_ATTEMPTS {
            let Some(row) = self.conv_row(id, true).await? else {
                return Ok(());
            };
            if row.kind != ConversationKind::Group.as_str() {
                return Ok(());
            }
            self.roll_forward_members(id, &row).await?;
            if row.members_seq >= seq {
                return Ok(()); // committed by an earlier run, rolled forward just now
            }
            let members = self.member_infos(id).await?;
            let plan = plan_system(
                &members,
                &row.name,
                &row.topic,
                &row.owner_id,
                &m.sender_id,
                event,
                now_ms,
            );
            if plan.changes_nothing(&row) {
                return Ok(());
            }
            let version = row.members_version + 1;
            let pending = PendingMembers {
                version,
                at_ms: now_ms,
                upserts: plan.upserts.clone(),
                removes: plan.removes.clone(),
                banned: plan.banned.clone(),
                unbanned: plan.unbanned.clone(),
                seq,
                ..Default::default()
            };
            let blob = pending.encode_to_vec();
            let committed = self
                .lwt(
                    &self.xt.conv_commit_system,
                    (
                        version,
                        i32::try_from(plan.member_count).unwrap_or(i32::MAX),
                        blob.clone(),
                        plan.name.as_str(),
                        plan.topic.as_str(),
                        plan.owner_id.as_str(),
                        seq,
                        id,
                        row.members_version,
                    ),
                )
                .await?;
            if !committed.applied {
                continue; // a concurrent change: plan again on the new state
            }
            let applied = ConvRow {
                members_version: version,
                applied_members_version: row.members_version,
                pending_members: Some(blob),
                members_seq: seq,
                ..row
            };
            self.roll_forward_members(id, &applied).await?;
            return Ok(());
        }
        Err(StorageError::Unavailable(format!(
            "membership of {id} keeps changing; try again"
        )))
    }
}

// Reads with current state.
impl ScyllaStore {
    /// Every member with role and join time, sorted by user id.
    pub(super) async fn member_infos(&self, id: &str) -> Result<Vec<MemberInfo>> {
        let mut members: Vec<MemberInfo> = self
            .all_rows::<(String, Option<String>, Option<i64>)>(&self.xt.members_full, (id,))
            .await?
            .into_iter()
            .map(|(user_id, role, joined)| MemberInfo {
                user_id,
                role: role.unwrap_or_else(|| roles::MEMBER.to_owned()),
                joined_at_ms: joined.unwrap_or(0),
            })
            .collect();
        members.sort_unstable_by(|a, b| a.user_id.cmp(&b.user_id));
        Ok(members)
    }

    /// `members` and `member_roles` of a conversation.
    pub(super) async fn fill_members(
        &self,
        conv: &mut switchboard_proto::Conversation,
    ) -> Result<()> {
        let infos = self.member_infos(&conv.conversation_id).await?;
        conv.members = infos.iter().map(|m| m.user_id.clone()).collect();
        conv.member_roles = infos
            .into_iter()
            .map(|m| Member {
                user_id: m.user_id,
                role: m.role,
                joined_at_ms: m.joined_at_ms,
            })
            .collect();
        Ok(())
    }

    /// Reaction counts of the "message" rows of `messages` (one conversation), one
    /// range read per bucket the page touches.
    pub(super) async fn fill_reactions(&self, id: &str, messages: &mut [Message]) -> Result<()> {
        let mut ranges: BTreeMap<i64, (u64, u64)> = BTreeMap::new();
        for m in messages.iter() {
            if kinds::is_message(&m.kind) && !m.deleted {
                let range = ranges.entry(bucket_of(m.seq)).or_insert((m.seq, m.seq));
                range.0 = range.0.min(m.seq);
                range.1 = range.1.max(m.seq);
            }
        }
        if ranges.is_empty() {
            return Ok(());
        }
        let reads = ranges.iter().map(|(bucket, (lo, hi))| {
            self.all_rows::<(i64, String)>(
                &self.xt.reactions_range,
                (id, *bucket, seq_i64(*lo), seq_i64(*hi)),
            )
        });
        let mut counts: HashMap<u64, BTreeMap<String, u32>> = HashMap::new();
        for rows in futures::future::try_join_all(reads).await? {
            for (seq, emoji) in rows {
                *counts
                    .entry(seq.max(0) as u64)
                    .or_default()
                    .entry(emoji)
                    .or_default() += 1;
            }
        }
        attach_reactions(messages, counts);
        Ok(())
    }

    /// Rows at `seqs` (one conversation), in the order of `seqs`; missing ones skipped.
    async fn messages_at(&self, id: &str, seqs: &[u64]) -> Result<Vec<Message>> {
        let mut by_bucket: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        for &seq in seqs {
            by_bucket
                .entry(bucket_of(seq))
                .or_default()
                .push(seq_i64(seq));
        }
        let mut found: HashMap<u64, Message> = HashMap::with_capacity(seqs.len());
        for (bucket, seqs) in by_bucket {
            for chunk in seqs.chunks(IN_CHUNK) {
                let rows = self
                    .rows::<MessageRow>(&self.xt.msg_in, (id, bucket, chunk.to_vec()))
                    .await?;
                for row in rows {
                    let m = row.into_message()?;
                    found.insert(m.seq, m);
                }
            }
        }
        Ok(seqs.iter().filter_map(|s| found.remove(s)).collect())
    }

    pub(super) async fn thread(&self, query: &ThreadQuery) -> Result<ThreadPage> {
        let id = query.conversation_id.as_str();
        let root = self
            .load_row(id, query.root_seq)
            .await?
            .filter(MessageRow::is_message)
            .ok_or_else(|| StorageError::NotFound(format!("message {} of {id}", query.root_seq)))?;
        let limit = query.limit as usize;
        let seqs: Vec<u64> = self
            .rows::<(i64,)>(
                &self.xt.thread_after,
                (
                    id,
                    seq_i64(query.root_seq),
                    seq_i64(query.from_seq),
                    i32::try_from(limit + 1).unwrap_or(i32::MAX),
                ),
            )
            .await?
            .into_iter()
            .map(|(s,)| s.max(0) as u64)
            .collect();
        let has_more = seqs.len() > limit;
        let seqs = &seqs[..seqs.len().min(limit)];
        let mut replies = self.messages_at(id, seqs).await?;
        let mut root = vec![root.into_message()?];
        // Replies spread over buckets: their reactions by exact sequence.
        let reply_seqs: Vec<u64> = replies
            .iter()
            .filter(|m| !m.deleted)
            .map(|m| m.seq)
            .collect();
        let (root_result, counts) = tokio::join!(
            self.fill_reactions(id, &mut root),
            self.reaction_counts_at(id, &reply_seqs)
        );
        root_result?;
        attach_reactions(&mut replies, counts?);
        Ok(ThreadPage {
            root: root.pop().expect("the root was pushed"),
            replies,
            has_more,
        })
    }

    async fn reaction_counts_at(
        &self,
        id: &str,
        seqs: &[u64],
    ) -> Result<HashMap<u64, BTreeMap<String, u32>>> {
        let mut by_bucket: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        for &seq in seqs {
            by_bucket
                .entry(bucket_of(seq))
                .or_default()
                .push(seq_i64(seq));
        }
        let mut counts: HashMap<u64, BTreeMap<String, u32>> = HashMap::new();
        for (bucket, seqs) in by_bucket {
            for chunk in seqs.chunks(IN_CHUNK) {
                let rows = self
                    .all_rows::<(i64, String)>(&self.xt.reactions_in, (id, bucket, chunk.to_vec()))
                    .await?;
                for (seq, emoji) in rows {
                    *counts
                        .entry(seq.max(0) as u64)
                        .or_default()
                        .entry(emoji)
                        .or_default() += 1;
                }
            }
        }
        Ok(counts)
    }

    pub(super) async fn reactions_of_user(
        &self,
        id: &str,
        user: &str,
        from_seq: u64,
        to_seq: u64,
    ) -> Result<Vec<(u64, String)>> {
        Ok(self
            .all_rows::<(i64, String)>(
                &self.xt.my_reactions,
                (id, user, seq_i64(from_seq), seq_i64(to_seq)),
            )
            .await?
            .into_iter()
            .map(|(seq, emoji)| (seq.max(0) as u64, emoji))
            .collect())
    }

    /// Unread "message" events from others after `read_seq` that are not deleted,
    /// and how many of them mention `user`: a scan of the events after the marker,
    /// stopping at [`UNREAD_CAP`] unread or [`UNREAD_SCAN_MAX_EVENTS`] events.
    async fn unread(
        &self,
        id: &str,
        user: &str,
        read_seq: u64,
        last_seq: u64,
    ) -> Result<(u32, u32)> {
        let cap = UNREAD_CAP;
        let (mut unread, mut mentions) = (0u32, 0u32);
        let mut after = read_seq;
        let mut scanned = 0usize;
        type ScanRow = (
            i64,
            String,
            Option<String>,
            Option<bool>,
            Option<Vec<String>>,
        );
        while after < last_seq && unread < cap && scanned < UNREAD_SCAN_MAX_EVENTS {
            let bucket = (after + 1) / BUCKET_SIZE;
            let rows = self
                .rows::<ScanRow>(
                    &self.xt.msg_scan_after,
                    (id, seq_i64(bucket), seq_i64(after), UNREAD_SCAN_PAGE),
                )
                .await?;
            let Some(last) = rows.last().map(|r| r.0) else {
                break; // gapless sequences: nothing after `after` in its bucket
            };
            scanned += rows.len();
            for (_, sender, kind, deleted, mentioned) in rows {
                if sender == user
                    || !kinds::is_message(kind.as_deref().unwrap_or_default())
                    || deleted.unwrap_or(false)
                    || unread >= cap
                {
                    continue;
                }
                unread += 1;
                if mentioned.is_some_and(|ms| ms.iter().any(|m| m == user)) {
                    mentions += 1;
                }
            }
            after = last.max(0) as u64;
        }
        Ok((unread, mentions))
    }

    /// The user's own fields of a conversation.
    pub(super) async fn user_fields(
        &self,
        id: &str,
        row: &ConvRow,
        user: &str,
    ) -> Result<UserFields> {
        let (role, read, delivered, mute) = tokio::try_join!(
            self.first::<(Option<String>,)>(&self.xt.member_role, (id, user)),
            self.first::<(i64, i64)>(&self.st.marker_select, (id, user)),
            self.first::<(i64, i64)>(&self.xt.delivered_select, (id, user)),
            self.first::<(Option<i64>,)>(&self.xt.mute_select, (id, user)),
        )?;
        let read = read.unwrap_or((0, 0));
        let (delivered, _) = effective_delivered(read, delivered);
        let read_seq = read.0.max(0) as u64;
        let last = row.last_seq.max(0) as u64;
        let (unread, mentions) = self.unread(id, user, read_seq, last).await?;
        Ok(UserFields {
            role: role
                .and_then(|(r,)| r)
                .unwrap_or_else(|| roles::MEMBER.to_owned()),
            read_seq,
            delivered_seq: delivered.max(0) as u64,
            unread,
            mentions,
            muted_until_ms: mute.and_then(|(m,)| m).unwrap_or(0),
        })
    }

    pub(super) async fn delivered_marker(
        &self,
        id: &str,
        user: &str,
        seq: u64,
        now_ms: i64,
    ) -> Result<switchboard_proto::ReadMarker> {
        let (last, is_member) = tokio::try_join!(
            self.first::<(i64,)>(&self.st.conv_last_seq, (id,)),
            self.member_exists(id, user)
        )?;
        let last = last.ok_or_else(|| StorageError::NotFound(id.to_owned()))?.0;
        if !is_member {
            return Err(StorageError::not_member(id, user));
        }
        let wanted = seq_i64(seq).min(last.max(0));
        let marker = |(seq, at_ms): (i64, i64)| switchboard_proto::ReadMarker {
            conversation_id: id.to_owned(),
            user_id: user.to_owned(),
            seq: seq.max(0) as u64,
            at_ms,
            kind: "delivered".to_owned(),
        };
        for _ in 0..MAX_LWT_ATTEMPTS {
            let (read, delivered) = tokio::try_join!(
                self.first::<(i64, i64)>(&self.st.marker_select, (id, user)),
                self.first::<(i64, i64)>(&self.xt.delivered_select, (id, user)),
            )?;
            let effective = effective_delivered(read.unwrap_or((0, 0)), delivered);
            if effective.0 >= wanted {
                return Ok(marker(effective));
            }
            let moved = match delivered {
                Some(_) => {
                    self.lwt(&self.xt.delivered_raise, (wanted, now_ms, id, user, wanted))
                        .await?
                }
                None => {
                    self.lwt(&self.xt.delivered_insert, (id, user, wanted, now_ms))
                        .await?
                }
            };
            if moved.applied {
                return Ok(marker((wanted, now_ms)));
            }
        }
        Err(StorageError::Unavailable(format!(
            "delivered marker of {user} keeps changing; try again"
        )))
    }

    pub(super) async fn member_receipts(&self, id: &str) -> Result<Vec<MemberReceipt>> {
        if self
            .first::<(i64,)>(&self.st.conv_last_seq, (id,))
            .await?
            .is_none()
        {
            return Err(StorageError::NotFound(id.to_owned()));
        }
        let (members, read, delivered) = tokio::try_join!(
            self.member_infos(id),
            self.all_rows::<(String, i64, i64)>(&self.xt.markers_all, (id,)),
            self.all_rows::<(String, i64, i64)>(&self.xt.delivered_all, (id,)),
        )?;
        let read: HashMap<String, (i64, i64)> =
            read.into_iter().map(|(u, s, at)| (u, (s, at))).collect();
        let delivered: HashMap<String, (i64, i64)> = delivered
            .into_iter()
            .map(|(u, s, at)| (u, (s, at)))
            .collect();
        Ok(members
            .into_iter()
            .map(|m| {
                let r = read.get(&m.user_id).copied().unwrap_or((0, 0));
                let (d, _) = effective_delivered(r, delivered.get(&m.user_id).copied());
                MemberReceipt {
                    user_id: m.user_id,
                    read_seq: r.0.max(0) as u64,
                    delivered_seq: d.max(0) as u64,
                    read_at_ms: r.1,
                }
            })
            .collect())
    }

    pub(super) async fn banned(&self, id: &str, users: &[String]) -> Result<Vec<String>> {
        let mut found = Vec::new();
        for group in users.chunks(IN_CHUNK * FANOUT) {
            let probes = group
                .chunks(IN_CHUNK)
                .map(|chunk| self.rows::<(String,)>(&self.xt.bans_among, (id, chunk.to_vec())));
            for rows in futures::future::try_join_all(probes).await? {
                found.extend(rows.into_iter().map(|(u,)| u));
            }
        }
        Ok(found)
    }
}

fn attach_reactions(messages: &mut [Message], mut counts: HashMap<u64, BTreeMap<String, u32>>) {
    for m in messages.iter_mut() {
        if !kinds::is_message(&m.kind) || m.deleted {
            continue;
        }
        if let Some(emojis) = counts.remove(&m.seq) {
            m.reactions = emojis
                .into_iter()
                .map(|(emoji, count)| ReactionCount {
                    emoji,
                    count,
                    mine: false,
                })
                .collect();
        }
    }
}

// Notification preferences, shared contacts, webhooks.
impl ScyllaStore {
    pub(super) async fn store_notification(
        &self,
        user: &str,
        conversation_id: &str,
        until_ms: i64,
    ) -> Result<()> {
        match (conversation_id.is_empty(), until_ms == 0) {
            (true, true) => self.exec(&self.xt.dnd_delete, (user,)).await?,
            (true, false) => self.exec(&self.xt.dnd_upsert, (user, until_ms)).await?,
            (false, true) => {
                self.exec(&self.xt.mute_delete, (conversation_id, user))
                    .await?
            }
            (false, false) => {
                self.exec(&self.xt.mute_upsert, (conversation_id, user, until_ms))
                    .await?
            }
        };
        Ok(())
    }

    pub(super) async fn dnd(&self, user: &str) -> Result<i64> {
        Ok(self
            .first::<(Option<i64>,)>(&self.xt.dnd_select, (user,))
            .await?
            .and_then(|(u,)| u)
            .unwrap_or(0))
    }

    pub(super) async fn notification_states(&self, id: &str) -> Result<Vec<MemberNotification>> {
        if self
            .first::<(i64,)>(&self.st.conv_last_seq, (id,))
            .await?
            .is_none()
        {
            return Err(StorageError::NotFound(id.to_owned()));
        }
        let (members, mutes) = tokio::try_join!(
            self.members_of(id),
            self.all_rows::<(String, Option<i64>)>(&self.xt.mutes_all, (id,)),
        )?;
        let mutes: HashMap<String, i64> = mutes
            .into_iter()
            .map(|(u, until)| (u, until.unwrap_or(0)))
            .collect();
        let mut dnd: HashMap<String, i64> = HashMap::new();
        for group in members.chunks(IN_CHUNK * FANOUT) {
            let probes = group.chunks(IN_CHUNK).map(|chunk| {
                self.rows::<(String, Option<i64>)>(&self.xt.dnd_among, (chunk.to_vec(),))
            });
            for rows in futures::future::try_join_all(probes).await? {
                dnd.extend(rows.into_iter().map(|(u, until)| (u, until.unwrap_or(0))));
            }
        }
        Ok(members
            .into_iter()
            .map(|user_id| MemberNotification {
                muted_until_ms: mutes.get(&user_id).copied().unwrap_or(0),
                dnd_until_ms: dnd.get(&user_id).copied().unwrap_or(0),
                user_id,
            })
            .collect())
    }

    pub(super) async fn shared(&self, user: &str, others: &[String]) -> Result<Vec<String>> {
        let others: BTreeSet<&String> = others.iter().filter(|o| *o != user).collect();
        if others.is_empty() {
            return Ok(Vec::new());
        }
        let mine: HashSet<String> = self
            .all_rows::<(String,)>(&self.st.user_convs, (user,))
            .await?
            .into_iter()
            .map(|(c,)| c)
            .collect();
        if mine.is_empty() {
            return Ok(Vec::new());
        }
        let others: Vec<&String> = others.into_iter().collect();
        let mut shared = Vec::new();
        for group in others.chunks(FANOUT) {
            let reads = group
                .iter()
                .map(|other| self.all_rows::<(String,)>(&self.st.user_convs, (other.as_str(),)));
            for (other, convs) in group
                .iter()
                .zip(futures::future::try_join_all(reads).await?)
            {
                // A contact shares a conversation in which they sent something.
                for (conv,) in convs.iter().filter(|(c,)| mine.contains(c)) {
                    let sent = self
                        .first::<(String,)>(&self.xt.sender_exists, (conv, other.as_str()))
                        .await?;
                    if sent.is_some() {
                        shared.push((*other).clone());
                        break;
                    }
                }
            }
        }
        Ok(shared)
    }

    /// The webhooks of a conversation with their slots.
    async fn webhook_slots(&self, id: &str) -> Result<Vec<(i32, Webhook)>> {
        Ok(self
            .rows::<WebhookRow>(&self.xt.webhook_slots, (id,))
            .await?
            .into_iter()
            .map(|row| webhook_from_row(id, row))
            .collect())
    }

    /// A webhook takes the lowest free slot `0..max` of its conversation with
    /// `IF NOT EXISTS`: the limit holds however many are added at once.
    pub(super) async fn add_webhook(&self, new: NewWebhook) -> Result<Webhook> {
        let id = new.conversation_id.as_str();
        let last = self
            .first::<(i64,)>(&self.st.conv_last_seq, (id,))
            .await?
            .ok_or_else(|| StorageError::NotFound(id.to_owned()))?
            .0;
        let shard = webhook_shard(id);
        // Index first: the dispatcher finds every stored webhook (an index row
        // without its webhook is ignored).
        self.exec(
            &self.xt.webhook_index_insert,
            (shard, id, new.webhook_id.as_str()),
        )
        .await?;
        for _ in 0..MAX_LWT_ATTEMPTS {
            let taken: HashSet<i32> = self
                .webhook_slots(id)
                .await?
                .into_iter()
                .map(|(slot, _)| slot)
                .collect();
            let max = i32::try_from(new.max_per_conversation).unwrap_or(i32::MAX);
            let Some(slot) = (0..max).find(|s| !taken.contains(s)) else {
                self.exec(
                    &self.xt.webhook_index_delete,
                    (shard, id, new.webhook_id.as_str()),
                )
                .await?;
                return Err(StorageError::InvalidRequest(format!(
                    "a conversation has at most {} webhooks",
                    new.max_per_conversation
                )));
            };
            let inserted = self
                .lwt(
                    &self.xt.webhook_insert,
                    (
                        id,
                        slot,
                        new.webhook_id.as_str(),
                        new.url.as_str(),
                        new.secret.as_str(),
                        last.max(0),
                        new.created_at_ms,
                        new.created_by.as_str(),
                    ),
                )
                .await?;
            if inserted.applied {
                return Ok(Webhook {
                    webhook_id: new.webhook_id,
                    conversation_id: new.conversation_id,
                    url: new.url,
                    secret: new.secret,
                    delivered_seq: last.max(0) as u64,
                    created_at_ms: new.created_at_ms,
                    created_by: new.created_by,
                    suspended: false,
                });
            }
        }
        Err(StorageError::Unavailable(format!(
            "webhooks of {id} keep changing; try again"
        )))
    }

    pub(super) async fn webhooks(&self, conversation_id: Option<&str>) -> Result<Vec<Webhook>> {
        let ids: Vec<String> = match conversation_id {
            Some(id) => vec![id.to_owned()],
            None => {
                let reads = (0..WEBHOOK_SHARDS).map(|shard| {
                    self.all_rows::<(String, String)>(&self.xt.webhook_index_shard, (shard,))
                });
                let mut ids: BTreeSet<String> = BTreeSet::new();
                for rows in futures::future::try_join_all(reads).await? {
                    ids.extend(rows.into_iter().map(|(c, _)| c));
                }
                ids.into_iter().collect()
            }
        };
        let mut out = Vec::new();
        for group in ids.chunks(FANOUT) {
            let reads = group.iter().map(|id| self.webhook_slots(id));
            for slots in futures::future::try_join_all(reads).await? {
                out.extend(slots.into_iter().map(|(_, w)| w));
            }
        }
        out.sort_by(|a, b| {
            (&a.conversation_id, &a.webhook_id).cmp(&(&b.conversation_id, &b.webhook_id))
        });
        Ok(out)
    }

    async fn webhook_slot(&self, id: &str, webhook_id: &str) -> Result<(i32, Webhook)> {
        self.webhook_slots(id)
            .await?
            .into_iter()
            .find(|(_, w)| w.webhook_id == webhook_id)
            .ok_or_else(|| StorageError::NotFound(format!("webhook {webhook_id} of {id}")))
    }

    pub(super) async fn remove_webhook(&self, id: &str, webhook_id: &str) -> Result<()> {
        let (slot, _) = self.webhook_slot(id, webhook_id).await?;
        let deleted = self
            .lwt(&self.xt.webhook_delete, (id, slot, webhook_id))
            .await?;
        self.exec(
            &self.xt.webhook_index_delete,
            (webhook_shard(id), id, webhook_id),
        )
        .await?;
        if !deleted.applied {
            return Err(StorageError::NotFound(format!(
                "webhook {webhook_id} of {id}"
            )));
        }
        Ok(())
    }

    pub(super) async fn raise_webhook(
        &self,
        id: &str,
        webhook_id: &str,
        delivered_seq: u64,
    ) -> Result<Webhook> {
        for _ in 0..MAX_LWT_ATTEMPTS {
            let (slot, mut webhook) = self.webhook_slot(id, webhook_id).await?;
            if webhook.delivered_seq >= delivered_seq {
                return Ok(webhook);
            }
            let wanted = seq_i64(delivered_seq);
            let raised = self
                .lwt(
                    &self.xt.webhook_advance,
                    (wanted, id, slot, webhook_id, wanted),
                )
                .await?;
            if raised.applied {
                webhook.delivered_seq = delivered_seq;
                return Ok(webhook);
            }
        }
        Err(StorageError::Unavailable(format!(
            "webhook {webhook_id} keeps changing; try again"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(user: &str, role: &str, joined: i64) -> MemberInfo {
        MemberInfo {
            user_id: user.into(),
            role: role.into(),
            joined_at_ms: joined,
        }
    }

    fn event(action: &str, users: &[&str], role: &str) -> SystemEvent {
        SystemEvent {
            action: action.into(),
            user_ids: users.iter().map(|u| u.to_string()).collect(),
            role: role.into(),
            ..Default::default()
        }
    }

    fn group() -> Vec<MemberInfo> {
        vec![
            member("ann", roles::OWNER, 1),
            member("bob", roles::MEMBER, 2),
            member("cat", roles::ADMIN, 5),
            member("dan", roles::MEMBER, 3),
        ]
    }

    #[test]
    fn owner_leaving_passes_to_the_earliest_admin_else_member() {
        let plan = plan_system(
            &group(),
            "g",
            "",
            "ann",
            "ann",
            &event(actions::MEMBER_LEFT, &[], ""),
            9,
        );
        assert_eq!(plan.owner_id, "cat");
        assert_eq!(plan.removes, ["ann"]);
        assert_eq!(plan.member_count, 3);
        assert_eq!(
            plan.upserts,
            [PendingMember {
                user_id: "cat".into(),
                role: roles::OWNER.into(),
                joined_at_ms: 5
            }]
        );
        let no_admin: Vec<MemberInfo> =
            group().into_iter().filter(|m| m.user_id != "cat").collect();
        let plan = plan_system(
            &no_admin,
            "g",
            "",
            "ann",
            "ann",
            &event(actions::MEMBER_LEFT, &[], ""),
            9,
        );
        assert_eq!(plan.owner_id, "bob");
        let alone = vec![member("ann", roles::OWNER, 1)];
        let plan = plan_system(
            &alone,
            "g",
            "",
            "ann",
            "ann",
            &event(actions::MEMBER_LEFT, &[], ""),
            9,
        );
        assert_eq!((plan.owner_id.as_str(), plan.member_count), ("ann", 0));
    }

    #[test]
    fn adds_bans_and_roles_write_only_what_changes() {
        let plan = plan_system(
            &group(),
            "g",
            "",
            "ann",
            "ann",
            &event(actions::MEMBERS_ADDED, &["bob", "eve"], ""),
            7,
        );
        assert_eq!(
            plan.upserts,
            [PendingMember {
                user_id: "eve".into(),
                role: roles::MEMBER.into(),
                joined_at_ms: 7
            }]
        );
        assert_eq!(plan.member_count, 5);
        let plan = plan_system(
            &group(),
            "g",
            "",
            "ann",
            "cat",
            &event(actions::MEMBERS_BANNED, &["dan", "zed"], ""),
            7,
        );
        assert_eq!(plan.removes, ["dan"]);
        assert_eq!(plan.banned, ["dan", "zed"]);
        let plan = plan_system(
            &group(),
            "g",
            "",
            "ann",
            "ann",
            &event(actions::ROLE_CHANGED, &["dan"], roles::OWNER),
            7,
        );
        assert_eq!(plan.owner_id, "dan");
        let roles_of: Vec<(&str, &str)> = plan
            .upserts
            .iter()
            .map(|m| (m.user_id.as_str(), m.role.as_str()))
            .collect();
        assert_eq!(roles_of, [("ann", roles::ADMIN), ("dan", roles::OWNER)]);
        let plan = plan_system(
            &group(),
            "g",
            "",
            "ann",
            "ann",
            &event(actions::ROLE_CHANGED, &["ann", "bob"], roles::ADMIN),
            7,
        );
        assert_eq!(plan.upserts.len(), 1, "the owner keeps their role");
        assert_eq!(plan.upserts[0].user_id, "bob");
    }

    #[test]
    fn delivered_follows_a_read_marker_ahead_of_it() {
        assert_eq!(effective_delivered((5, 10), None), (5, 10));
        assert_eq!(effective_delivered((5, 10), Some((3, 4))), (5, 10));
        assert_eq!(effective_delivered((5, 10), Some((5, 4))), (5, 4));
        assert_eq!(effective_delivered((5, 10), Some((7, 12))), (7, 12));
    }
}
