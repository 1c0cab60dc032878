//! The embedded history store: SQLite (rusqlite, bundled) in WAL mode on local disk.
//!
//! Threads: SQLite calls block, so they never run on the async runtime. One writer
//! thread owns the only read-write connection (SQLite allows one writer at a time
//! anyway, and a single writer makes every read-check-write transaction, such as the
//! gapless append, trivially serial). [`READER_THREADS`] threads share one queue of
//! read jobs, each with its own read-only connection; in WAL mode readers never block
//! the writer and see every transaction committed before they start. Both queues are
//! bounded ([`QUEUE_DEPTH`] jobs): a caller waits for room rather than piling up work.
//!
//! Durability: `journal_mode=WAL` with `synchronous=NORMAL` by default
//! (`embedded_durability = "process"`). A commit appends its pages to the `-wal` file
//! with `write()` before `COMMIT` returns; `fsync` happens at checkpoints only. A
//! killed process (even `kill -9`) leaves those writes in the kernel's page cache,
//! which reaches the disk regardless, and the next open replays the WAL, so every
//! acknowledged transaction survives the crash of the process. Only a power loss or
//! kernel crash can lose the last transactions (never corrupting the file);
//! `embedded_durability = "machine"` ([`SqliteStore::open_with`]) sets
//! `synchronous=FULL`, which covers that at the price of an fsync per commit.
//!
//! Schema: versioned migrations ([`MIGRATIONS`], applied in order inside transactions
//! and recorded in `schema_version`); a file written by a newer version is refused.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use prost::Message as _;
use rusqlite::types::Type;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior};
use switchboard_proto::{
    Conversation, HistoryResult, Member, MemberReceipt, Message, ReactionCount, ReadMarker,
    SyncResult, SystemEvent, Webhook,
};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Result, StorageError};
use crate::rules;
use crate::store::{
    actions, kinds, roles, Appended, ConversationKind, Direction, HistoryStore, MarkerKind,
    MemberAction, MemberChange, MemberNotification, NewConversation, NewWebhook, PageQuery,
    ThreadPage, ThreadQuery,
};

/// Read-only connections (and threads) serving reads.
pub const READER_THREADS: usize = 4;
/// Jobs waiting per queue (writer, readers) before callers wait for room.
pub const QUEUE_DEPTH: usize = 1024;
/// How long a connection waits for a lock held by another connection (for example a
/// checkpoint, or a second process opening the file) before failing with `unavailable`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema migrations, in order; migration `i` brings the schema to version `i + 1`.
/// Never edit a released migration: append a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: conversations, members, messages, dedupe keys, read markers.
    r#"
    CREATE TABLE conversations (
        conversation_id TEXT PRIMARY KEY,
        kind            TEXT NOT NULL,
        name            TEXT NOT NULL,
        owner_id        TEXT NOT NULL,
        -- sorted member pair of a direct conversation (one per pair); NULL for groups
        direct_key      TEXT UNIQUE,
        last_seq        INTEGER NOT NULL,
        created_at_ms   INTEGER NOT NULL,
        updated_at_ms   INTEGER NOT NULL
    );
    CREATE TABLE members (
        conversation_id TEXT NOT NULL,
        user_id         TEXT NOT NULL,
        role            TEXT NOT NULL,
        joined_at_ms    INTEGER NOT NULL,
        PRIMARY KEY (conversation_id, user_id)
    ) WITHOUT ROWID;
    CREATE INDEX members_by_user ON members (user_id, conversation_id);
    CREATE TABLE messages (
        conversation_id TEXT NOT NULL,
        seq             INTEGER NOT NULL,
        message_id      TEXT NOT NULL,
        sender_id       TEXT NOT NULL,
        sender_device   TEXT NOT NULL,
        client_msg_id   TEXT NOT NULL,
        body            TEXT NOT NULL,
        content_type    TEXT NOT NULL,
        sent_at_ms      INTEGER NOT NULL,
        PRIMARY KEY (conversation_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE dedupe_keys (
        sender_id       TEXT NOT NULL,
        client_msg_id   TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        seq             INTEGER NOT NULL,
        created_at_ms   INTEGER NOT NULL,
        PRIMARY KEY (sender_id, client_msg_id)
    ) WITHOUT ROWID;
    CREATE INDEX dedupe_keys_by_age ON dedupe_keys (created_at_ms);
    CREATE TABLE read_markers (
        conversation_id TEXT NOT NULL,
        user_id         TEXT NOT NULL,
        seq             INTEGER NOT NULL,
        at_ms           INTEGER NOT NULL,
        PRIMARY KEY (conversation_id, user_id)
    ) WITHOUT ROWID;
    "#,
    // 2: timeline event kinds and their current-state columns, mentions, reactions,
    // roles (existing groups: owner_id is the owner, everyone else a member), bans,
    // topics, delivered markers, notification preferences, webhooks.
    r#"
    ALTER TABLE conversations ADD COLUMN topic TEXT NOT NULL DEFAULT '';
    ALTER TABLE messages ADD COLUMN kind TEXT NOT NULL DEFAULT '';
    ALTER TABLE messages ADD COLUMN target_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN reply_to_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN thread_root_seq INTEGER NOT NULL DEFAULT 0;
    -- mentioned user ids joined by U+001F ('' = none)
    ALTER TABLE messages ADD COLUMN mentions TEXT NOT NULL DEFAULT '';
    ALTER TABLE messages ADD COLUMN emoji TEXT NOT NULL DEFAULT '';
    ALTER TABLE messages ADD COLUMN remove INTEGER NOT NULL DEFAULT 0;
    -- protobuf-encoded SystemEvent of a system event, else NULL
    ALTER TABLE messages ADD COLUMN system BLOB;
    ALTER TABLE messages ADD COLUMN from_bot INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN edited_at_ms INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN reply_count INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX messages_by_thread ON messages (conversation_id, thread_root_seq, seq)
        WHERE thread_root_seq > 0;
    CREATE INDEX messages_by_target ON messages (conversation_id, target_seq)
        WHERE target_seq > 0;
    CREATE TABLE mentions (
        conversation_id TEXT NOT NULL,
        user_id         TEXT NOT NULL,
        seq             INTEGER NOT NULL,
        PRIMARY KEY (conversation_id, user_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE reactions (
        conversation_id TEXT NOT NULL,
        seq             INTEGER NOT NULL,
        emoji           TEXT NOT NULL,
        user_id         TEXT NOT NULL,
        PRIMARY KEY (conversation_id, seq, emoji, user_id)
    ) WITHOUT ROWID;
    CREATE INDEX reactions_by_user ON reactions (conversation_id, user_id, seq);
    CREATE TABLE bans (
        conversation_id TEXT NOT NULL,
        user_id         TEXT NOT NULL,
        banned_at_ms    INTEGER NOT NULL,
        PRIMARY KEY (conversation_id, user_id)
    ) WITHOUT ROWID;
    UPDATE members SET role = CASE
        WHEN user_id = (SELECT c.owner_id FROM conversations c
                        WHERE c.conversation_id = members.conversation_id)
        THEN 'owner' ELSE 'member' END;
    ALTER TABLE read_markers ADD COLUMN delivered_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE read_markers ADD COLUMN delivered_at_ms INTEGER NOT NULL DEFAULT 0;
    UPDATE read_markers SET delivered_seq = seq, delivered_at_ms = at_ms;
    -- conversation_id '' = the user's do-not-disturb
    CREATE TABLE notification_prefs (
        user_id         TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        until_ms        INTEGER NOT NULL,
        PRIMARY KEY (user_id, conversation_id)
    ) WITHOUT ROWID;
    CREATE TABLE webhooks (
        webhook_id      TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL,
        url             TEXT NOT NULL,
        secret          TEXT NOT NULL,
        delivered_seq   INTEGER NOT NULL,
        created_at_ms   INTEGER NOT NULL,
        created_by      TEXT NOT NULL
    );
    CREATE INDEX webhooks_by_conversation ON webhooks (conversation_id, webhook_id);
    "#,
    // 3: who has sent an event in each conversation: contacts for last-seen privacy
    // are users who shared a conversation and sent something in it.
    r#"
    CREATE TABLE senders (
        conversation_id TEXT NOT NULL,
        user_id         TEXT NOT NULL,
        PRIMARY KEY (conversation_id, user_id)
    ) WITHOUT ROWID;
    INSERT OR IGNORE INTO senders (conversation_id, user_id)
        SELECT DISTINCT conversation_id, sender_id FROM messages;
    -- who created a conversation (storage.max_conversations_created); groups made
    -- before this version count for their owner, direct ones for nobody
    ALTER TABLE conversations ADD COLUMN created_by TEXT NOT NULL DEFAULT '';
    UPDATE conversations SET created_by = owner_id WHERE kind = 'group';
    CREATE INDEX conversations_by_creator ON conversations (created_by);
    "#,
    // 4: the system event that took each user out of a conversation (removed, banned,
    // left), until they are added again: what sync reports to a user who was away.
    // Departures before this version are not known.
    r#"
    CREATE TABLE departures (
        user_id         TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        seq             INTEGER NOT NULL,
        PRIMARY KEY (user_id, conversation_id)
    ) WITHOUT ROWID;
    "#,
];

const ROLE_OWNER: &str = roles::OWNER;
const ROLE_MEMBER: &str = roles::MEMBER;
/// Separates the two ids of a direct pair key; ids never contain control characters.
const PAIR_SEPARATOR: char = '\u{1f}';

const CONVERSATION_COLUMNS: &str =
    "conversation_id, kind, name, owner_id, last_seq, created_at_ms, updated_at_ms, topic";
/// [`CONVERSATION_COLUMNS`] of `c`, then the user's own: role, read and delivered
/// markers, raw mute (joined as `m`, `r` and `np`).
const USER_CONVERSATION_SELECT: &str =
    "SELECT c.conversation_id, c.kind, c.name, c.owner_id, c.last_seq, c.created_at_ms,
            c.updated_at_ms, c.topic, m.role, COALESCE(r.seq, 0),
            COALESCE(r.delivered_seq, 0), COALESCE(np.until_ms, 0)
     FROM members m
     JOIN conversations c ON c.conversation_id = m.conversation_id
     LEFT JOIN read_markers r
         ON r.conversation_id = m.conversation_id AND r.user_id = m.user_id
     LEFT JOIN notification_prefs np
         ON np.user_id = m.user_id AND np.conversation_id = m.conversation_id
     WHERE m.user_id = ?1
     ORDER BY c.updated_at_ms DESC, c.conversation_id";
const MESSAGE_COLUMNS: &str = "conversation_id, seq, message_id, sender_id, sender_device, \
     client_msg_id, body, content_type, sent_at_ms, kind, target_seq, reply_to_seq, \
     thread_root_seq, mentions, emoji, remove, system, from_bot, edited_at_ms, deleted, \
     reply_count";
/// SQL condition: the row is a plain message.
const IS_MESSAGE: &str = "kind IN ('', 'message')";

/// A failure inside a job: a database error or a storage rule.
enum Fail {
    Db(rusqlite::Error),
    Store(StorageError),
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Db(e)
    }
}

impl From<StorageError> for Fail {
    fn from(e: StorageError) -> Self {
        Fail::Store(e)
    }
}

impl From<Fail> for StorageError {
    fn from(f: Fail) -> Self {
        match f {
            Fail::Store(e) => e,
            Fail::Db(e) => match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                    StorageError::Unavailable(e.to_string())
                }
                _ => StorageError::Internal(format!("sqlite: {e}")),
            },
        }
    }
}

type DbResult<T> = std::result::Result<T, Fail>;
type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// Threads that own connections and run jobs from one bounded queue.
struct Workers {
    jobs_tx: mpsc::Sender<Job>,
}

impl Workers {
    fn spawn(name: &str, connections: Vec<Connection>) -> std::io::Result<Workers> {
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>(QUEUE_DEPTH);
        // A std mutex is right here: it only hands the next job to one of the threads;
        // it is held by a plain thread while it waits for a job, never by async code.
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        for (i, mut conn) in connections.into_iter().enumerate() {
            let jobs_rx = Arc::clone(&jobs_rx);
            std::thread::Builder::new()
                .name(format!("sqlite-{name}-{i}"))
                .spawn(move || loop {
                    let job = jobs_rx
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .blocking_recv();
                    let Some(job) = job else {
                        // Every sender is gone: the store was dropped. Closing the
                        // connection here checkpoints the WAL when it is the last one.
                        break;
                    };
                    // A panicking job drops its reply sender (the caller sees an
                    // internal error) and rolls back its transaction; the thread lives on.
                    let _ =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut conn)));
                })?;
        }
        Ok(Workers { jobs_tx })
    }

    async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> DbResult<T> + Send + 'static,
    {
        let (reply_tx, reply_rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = reply_tx.send(f(conn).map_err(StorageError::from));
        });
        self.jobs_tx
            .send(job)
            .await
            .map_err(|_| StorageError::Unavailable("history store is closed".into()))?;
        reply_rx
            .await
            .map_err(|_| StorageError::Internal("history store job failed".into()))?
    }
}

/// The SQLite history store. Cheap to share behind an `Arc`; dropping the last
/// reference lets its threads finish queued jobs and close their connections.
pub struct SqliteStore {
    writer: Workers,
    readers: Workers,
}

impl SqliteStore {
    /// Open (creating if needed) the database at `path`, creating its parent
    /// directory, and migrate it; commits survive a crash of the process. Blocking:
    /// call from a blocking context.
    pub fn open(path: &Path) -> anyhow::Result<SqliteStore> {
        SqliteStore::open_with(path, false)
    }

    /// [`SqliteStore::open`], with `fsync` every commit waiting for an fsync so it
    /// also survives a power loss (`synchronous=FULL`).
    pub fn open_with(path: &Path, fsync: bool) -> anyhow::Result<SqliteStore> {
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    anyhow::anyhow!("cannot create directory {}: {e}", parent.display())
                })?;
            }
        }
        let context = |e: rusqlite::Error| anyhow::anyhow!("sqlite {}: {e}", path.display());
        let mut writer = Connection::open(path).map_err(context)?;
        writer.busy_timeout(BUSY_TIMEOUT).map_err(context)?;
        // Switching a new file to WAL answers "busy" at once, without the busy
        // timeout, while another process opens it too: retried like a busy wait.
        let mode: String =
            while_busy(|| writer.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)))
                .map_err(context)?;
        if !mode.eq_ignore_ascii_case("wal") {
            anyhow::bail!("sqlite {}: cannot enable WAL (mode {mode})", path.display());
        }
        writer
            .execute_batch(if fsync {
                "PRAGMA synchronous=FULL;"
            } else {
                "PRAGMA synchronous=NORMAL;"
            })
            .map_err(context)?;
        let version = migrate(&mut writer, now_ms()).map_err(|e| match e {
            Fail::Db(e) => context(e),
            Fail::Store(e) => anyhow::anyhow!("sqlite {}: {e}", path.display()),
        })?;
        tracing::info!(path = %path.display(), schema_version = version, "history store opened");

        let mut readers = Vec::with_capacity(READER_THREADS);
        for _ in 0..READER_THREADS {
            let reader = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(context)?;
            reader.busy_timeout(BUSY_TIMEOUT).map_err(context)?;
            readers.push(reader);
        }
        Ok(SqliteStore {
            writer: Workers::spawn("writer", vec![writer])?,
            readers: Workers::spawn("reader", readers)?,
        })
    }
}

impl SqliteStore {
    /// Raise one of a member's markers (see [`HistoryStore::set_read_marker`] and
    /// [`HistoryStore::set_delivered_marker`]).
    async fn move_marker(
        &self,
        conversation_id: &str,
        user_id: &str,
        kind: MarkerKind,
        seq: u64,
        now_ms: i64,
    ) -> Result<ReadMarker> {
        let (id, user) = (conversation_id.to_owned(), user_id.to_owned());
        self.writer
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let conv = require_conversation(&tx, &id)?;
                if !member_exists(&tx, &id, &user)? {
                    return Err(StorageError::not_member(&id, &user).into());
                }
                let wanted = seq.min(conv.last_seq);
                let (mut read, mut read_at, mut delivered, mut delivered_at) =
                    load_markers(&tx, &id, &user)?;
                let mut moved = false;
                if kind == MarkerKind::Read && wanted > read {
                    (read, read_at, moved) = (wanted, now_ms, true);
                }
                if wanted > delivered {
                    (delivered, delivered_at, moved) = (wanted, now_ms, true);
                }
                if moved {
                    store_markers(&tx, &id, &user, (read, read_at, delivered, delivered_at))?;
                }
                tx.commit()?;
                let (seq, at_ms) = match kind {
                    MarkerKind::Read => (read, read_at),
                    MarkerKind::Delivered => (delivered.max(read), delivered_at),
                };
                Ok(ReadMarker {
                    conversation_id: id,
                    user_id: user,
                    seq,
                    at_ms,
                    kind: kind.as_str().to_owned(),
                })
            })
            .await
    }
}

/// Apply the migrations the file lacks; returns the schema version.
/// Apply the migrations the file lacks, all in one immediate transaction that also
/// reads the version: two processes migrating the same file at once (a `switchboard
/// migrate` next to a starting storage service) take turns on SQLite's write lock
/// (waiting up to the connection's busy timeout), and the second finds the work done.
fn migrate(conn: &mut Connection, now_ms: i64) -> DbResult<u32> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version       INTEGER PRIMARY KEY,
             applied_at_ms INTEGER NOT NULL
         );",
    )?;
    let current: u32 = tx.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_version",
        [],
        |r| r.get(0),
    )?;
    let known = MIGRATIONS.len() as u32;
    if current > known {
        return Err(StorageError::Internal(format!(
            "schema version {current} is newer than this build knows ({known})"
        ))
        .into());
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as u32 + 1;
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_at_ms) VALUES (?1, ?2)",
            params![version, now_ms],
        )?;
        tracing::info!(schema_version = version, "history store migrated");
    }
    tx.commit()?;
    Ok(known)
}

/// Run `op` again while SQLite answers "busy", for up to [`BUSY_TIMEOUT`].
fn while_busy<T>(mut op: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match op() {
            Err(e)
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            result => return result,
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Sequences are stored as SQLite integers (i64); the service rejects larger ones.
fn seq_param(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn conversation_from_row(row: &Row<'_>) -> rusqlite::Result<Conversation> {
    Ok(Conversation {
        conversation_id: row.get(0)?,
        kind: row.get(1)?,
        name: row.get(2)?,
        owner_id: row.get(3)?,
        members: Vec::new(),
        last_seq: row.get::<_, i64>(4)? as u64,
        created_at_ms: row.get(5)?,
        updated_at_ms: row.get(6)?,
        topic: row.get(7)?,
        ..Default::default()
    })
}

/// A row of [`USER_CONVERSATION_SELECT`], without the unread counts.
fn user_conversation_from_row(row: &Row<'_>) -> rusqlite::Result<Conversation> {
    let mut conv = conversation_from_row(row)?;
    conv.my_role = row.get(8)?;
    conv.read_seq = row.get::<_, i64>(9)? as u64;
    conv.delivered_seq = (row.get::<_, i64>(10)? as u64).max(conv.read_seq);
    conv.muted_until_ms = row.get(11)?;
    Ok(conv)
}

/// The user's conversations with their own fields, unread counts included.
fn user_conversations(conn: &Connection, user: &str) -> DbResult<Vec<Conversation>> {
    let mut convs = conn
        .prepare_cached(USER_CONVERSATION_SELECT)?
        .query_map([user], user_conversation_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    for conv in &mut convs {
        fill_unread(conn, conv, user)?;
    }
    Ok(convs)
}

/// `unread_count` and `unread_mentions` of `user` (capped at [`rules::MAX_UNREAD`]).
fn fill_unread(conn: &Connection, conv: &mut Conversation, user: &str) -> DbResult<()> {
    if conv.last_seq <= conv.read_seq {
        return Ok(());
    }
    let read = seq_param(conv.read_seq);
    let cap = i64::from(rules::MAX_UNREAD);
    let count: i64 = conn
        .prepare_cached(&format!(
            "SELECT COUNT(*) FROM (SELECT 1 FROM messages
             WHERE conversation_id = ?1 AND seq > ?2 AND sender_id <> ?3 AND {IS_MESSAGE}
               AND deleted = 0
             LIMIT ?4)"
        ))?
        .query_row(params![conv.conversation_id, read, user, cap], |r| r.get(0))?;
    let mentions: i64 = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM (SELECT 1 FROM mentions n
             JOIN messages g ON g.conversation_id = n.conversation_id AND g.seq = n.seq
             WHERE n.conversation_id = ?1 AND n.user_id = ?3 AND n.seq > ?2
               AND g.sender_id <> ?3 AND g.deleted = 0
             LIMIT ?4)",
        )?
        .query_row(params![conv.conversation_id, read, user, cap], |r| r.get(0))?;
    conv.unread_count = count as u32;
    conv.unread_mentions = mentions as u32;
    Ok(())
}

fn message_from_row(row: &Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        conversation_id: row.get(0)?,
        seq: row.get::<_, i64>(1)? as u64,
        message_id: row.get(2)?,
        sender_id: row.get(3)?,
        sender_device: row.get(4)?,
        client_msg_id: row.get(5)?,
        body: row.get(6)?,
        content_type: row.get(7)?,
        sent_at_ms: row.get(8)?,
        kind: row.get(9)?,
        target_seq: row.get::<_, i64>(10)? as u64,
        reply_to_seq: row.get::<_, i64>(11)? as u64,
        thread_root_seq: row.get::<_, i64>(12)? as u64,
        mentions: split_ids(&row.get::<_, String>(13)?),
        emoji: row.get(14)?,
        remove: row.get(15)?,
        system: match row.get::<_, Option<Vec<u8>>>(16)? {
            None => None,
            Some(bytes) => Some(SystemEvent::decode(bytes.as_slice()).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(16, Type::Blob, Box::new(e))
            })?),
        },
        from_bot: row.get(17)?,
        edited_at_ms: row.get(18)?,
        deleted: row.get(19)?,
        reactions: Vec::new(),
        reply_count: row.get::<_, i64>(20)? as u32,
    })
}

fn join_ids(ids: &[String]) -> String {
    ids.join(&PAIR_SEPARATOR.to_string())
}

fn split_ids(joined: &str) -> Vec<String> {
    if joined.is_empty() {
        Vec::new()
    } else {
        joined.split(PAIR_SEPARATOR).map(str::to_owned).collect()
    }
}

/// Attach reaction counts (sorted by emoji, `mine` false) to the live "message" rows
/// of one conversation.
fn attach_reactions(conn: &Connection, id: &str, messages: &mut [Message]) -> DbResult<()> {
    let live = |m: &&mut Message| kinds::is_message(&m.kind) && !m.deleted;
    let (Some(low), Some(high)) = (
        messages.iter_mut().filter(live).map(|m| m.seq).min(),
        messages.iter_mut().filter(live).map(|m| m.seq).max(),
    ) else {
        return Ok(());
    };
    let mut counts: HashMap<u64, Vec<ReactionCount>> = HashMap::new();
    let mut stmt = conn.prepare_cached(
        "SELECT seq, emoji, COUNT(*) FROM reactions
         WHERE conversation_id = ?1 AND seq BETWEEN ?2 AND ?3
         GROUP BY seq, emoji ORDER BY seq, emoji",
    )?;
    let rows = stmt.query_map(params![id, seq_param(low), seq_param(high)], |r| {
        Ok((
            r.get::<_, i64>(0)? as u64,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    for row in rows {
        let (seq, emoji, count) = row?;
        counts.entry(seq).or_default().push(ReactionCount {
            emoji,
            count: count as u32,
            mine: false,
        });
    }
    for m in messages.iter_mut() {
        if kinds::is_message(&m.kind) && !m.deleted {
            if let Some(r) = counts.remove(&m.seq) {
                m.reactions = r;
            }
        }
    }
    Ok(())
}

fn load_conversation(conn: &Connection, id: &str) -> DbResult<Option<Conversation>> {
    let conv = conn
        .prepare_cached(&format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE conversation_id = ?1"
        ))?
        .query_row([id], conversation_from_row)
        .optional()?;
    Ok(conv)
}

/// Fill `members` and `member_roles` (sorted by user id).
fn load_members(conn: &Connection, conv: &mut Conversation) -> DbResult<()> {
    let mut stmt = conn.prepare_cached(
        "SELECT user_id, role, joined_at_ms FROM members
         WHERE conversation_id = ?1 ORDER BY user_id",
    )?;
    let roles = stmt
        .query_map([&conv.conversation_id], |r| {
            Ok(Member {
                user_id: r.get(0)?,
                role: r.get(1)?,
                joined_at_ms: r.get(2)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<Member>>>()?;
    conv.members = roles.iter().map(|m| m.user_id.clone()).collect();
    conv.member_roles = roles;
    Ok(())
}

fn load_conversation_with_members(conn: &Connection, id: &str) -> DbResult<Conversation> {
    let mut conv =
        load_conversation(conn, id)?.ok_or_else(|| StorageError::NotFound(id.to_owned()))?;
    load_members(conn, &mut conv)?;
    Ok(conv)
}

fn require_conversation(conn: &Connection, id: &str) -> DbResult<Conversation> {
    Ok(load_conversation(conn, id)?.ok_or_else(|| StorageError::NotFound(id.to_owned()))?)
}

fn member_exists(conn: &Connection, id: &str, user_id: &str) -> DbResult<bool> {
    let found = conn
        .prepare_cached("SELECT 1 FROM members WHERE conversation_id = ?1 AND user_id = ?2")?
        .query_row([id, user_id], |_| Ok(()))
        .optional()?;
    Ok(found.is_some())
}

fn load_message(conn: &Connection, id: &str, seq: i64) -> DbResult<Option<Message>> {
    let msg = conn
        .prepare_cached(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?1 AND seq = ?2"
        ))?
        .query_row(params![id, seq], message_from_row)
        .optional()?;
    Ok(msg)
}

/// The message a live dedupe key points at.
fn dedupe_hit(
    conn: &Connection,
    sender_id: &str,
    client_msg_id: &str,
    since_ms: i64,
) -> DbResult<Option<Message>> {
    let key: Option<(String, i64, i64)> = conn
        .prepare_cached(
            "SELECT conversation_id, seq, created_at_ms FROM dedupe_keys
             WHERE sender_id = ?1 AND client_msg_id = ?2",
        )?
        .query_row([sender_id, client_msg_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    match key {
        Some((conversation_id, seq, created_at_ms)) if created_at_ms >= since_ms => {
            let msg = load_message(conn, &conversation_id, seq)?.ok_or_else(|| {
                StorageError::Internal(format!(
                    "dedupe key points at missing message {conversation_id}/{seq}"
                ))
            })?;
            Ok(Some(msg))
        }
        _ => Ok(None),
    }
}

/// Messages with `seq > after`, ascending, at most `limit + 1` (to tell whether more remain).
fn messages_after(conn: &Connection, id: &str, after: i64, limit: u32) -> DbResult<Vec<Message>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages
         WHERE conversation_id = ?1 AND seq > ?2 ORDER BY seq ASC LIMIT ?3"
    ))?;
    let rows = stmt
        .query_map(params![id, after, i64::from(limit) + 1], message_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// Messages with `seq < before`, newest first, at most `limit + 1`.
fn messages_before(conn: &Connection, id: &str, before: i64, limit: u32) -> DbResult<Vec<Message>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages
         WHERE conversation_id = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3"
    ))?;
    let rows = stmt
        .query_map(params![id, before, i64::from(limit) + 1], message_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

fn direct_key(members: &[String]) -> String {
    let mut pair: Vec<&str> = members.iter().map(String::as_str).collect();
    pair.sort_unstable();
    pair.join(&PAIR_SEPARATOR.to_string())
}

/// Append one event inside the caller's write transaction (see
/// [`HistoryStore::append`]): answered from its dedupe key, or stored with its effects
/// at `message.seq`, which must be the conversation's next sequence.
fn append_in(
    tx: &Connection,
    message: Message,
    dedupe_since_ms: i64,
    now_ms: i64,
) -> DbResult<Appended> {
    if !message.client_msg_id.is_empty() {
        if let Some(stored) = dedupe_hit(
            tx,
            &message.sender_id,
            &message.client_msg_id,
            dedupe_since_ms,
        )? {
            return Ok(Appended {
                message: stored,
                duplicate: true,
            });
        }
    }
    let id = &message.conversation_id;
    let last: Option<i64> = tx
        .prepare_cached("SELECT last_seq FROM conversations WHERE conversation_id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    let last = last.ok_or_else(|| StorageError::NotFound(id.clone()))? as u64;
    if message.seq != last + 1 {
        return Err(StorageError::SequenceConflict {
            conversation_id: id.clone(),
            expected: last + 1,
            got: message.seq,
        }
        .into());
    }
    let seq = seq_param(message.seq);
    let mut message = message;
    message.edited_at_ms = 0;
    message.deleted = false;
    message.reactions.clear();
    message.reply_count = 0;
    apply_effects(tx, &mut message, now_ms)?;
    let id = &message.conversation_id;
    tx.prepare_cached(
        "INSERT INTO messages (conversation_id, seq, message_id, sender_id,
             sender_device, client_msg_id, body, content_type, sent_at_ms, kind,
             target_seq, reply_to_seq, thread_root_seq, mentions, emoji, remove,
             system, from_bot)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15,
             ?16, ?17, ?18)",
    )?
    .execute(params![
        id,
        seq,
        message.message_id,
        message.sender_id,
        message.sender_device,
        message.client_msg_id,
        message.body,
        message.content_type,
        message.sent_at_ms,
        message.kind,
        seq_param(message.target_seq),
        seq_param(message.reply_to_seq),
        seq_param(message.thread_root_seq),
        join_ids(&message.mentions),
        message.emoji,
        message.remove,
        message.system.as_ref().map(|s| s.encode_to_vec()),
        message.from_bot
    ])?;
    tx.prepare_cached("INSERT OR IGNORE INTO senders (conversation_id, user_id) VALUES (?1, ?2)")?
        .execute(params![id, message.sender_id])?;
    if kinds::is_message(&message.kind) {
        let mut insert = tx.prepare_cached(
            "INSERT OR IGNORE INTO mentions (conversation_id, user_id, seq)
             VALUES (?1, ?2, ?3)",
        )?;
        for user in &message.mentions {
            insert.execute(params![id, user, seq])?;
        }
    }
    if !message.client_msg_id.is_empty() {
        // Replaces an expired key of the same pair, if any.
        tx.prepare_cached(
            "INSERT OR REPLACE INTO dedupe_keys
                 (sender_id, client_msg_id, conversation_id, seq, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            message.sender_id,
            message.client_msg_id,
            id,
            seq,
            now_ms
        ])?;
    }
    tx.prepare_cached(
        "UPDATE conversations SET last_seq = ?2, updated_at_ms = ?3
         WHERE conversation_id = ?1",
    )?
    .execute(params![id, seq, now_ms])?;
    Ok(Appended {
        message,
        duplicate: false,
    })
}

/// The effects of appending `event` (see [`HistoryStore::append`]), inside the
/// append's transaction. May clear the event's own body: an edit of a message that
/// is already deleted keeps no copy of the text.
fn apply_effects(tx: &Connection, event: &mut Message, now_ms: i64) -> DbResult<()> {
    let id = event.conversation_id.as_str();
    let target = seq_param(event.target_seq);
    match event.kind.as_str() {
        kinds::EDIT => {
            let changed = tx
                .prepare_cached(&format!(
                    "UPDATE messages SET body = ?3, content_type = ?4, edited_at_ms = ?5
                     WHERE conversation_id = ?1 AND seq = ?2 AND {IS_MESSAGE} AND deleted = 0"
                ))?
                .execute(params![
                    id,
                    target,
                    event.body,
                    event.content_type,
                    event.sent_at_ms
                ])?;
            if changed == 0 {
                let deleted = tx
                    .prepare_cached(
                        "SELECT 1 FROM messages WHERE conversation_id = ?1 AND seq = ?2
                         AND deleted = 1",
                    )?
                    .query_row(params![id, target], |_| Ok(()))
                    .optional()?;
                if deleted.is_some() {
                    event.body.clear();
                    event.content_type.clear();
                }
            }
        }
        kinds::DELETE => {
            let changed = tx
                .prepare_cached(&format!(
                    "UPDATE messages SET body = '', content_type = '', deleted = 1
                     WHERE conversation_id = ?1 AND seq = ?2 AND {IS_MESSAGE} AND deleted = 0"
                ))?
                .execute(params![id, target])?;
            if changed > 0 {
                tx.prepare_cached("DELETE FROM reactions WHERE conversation_id = ?1 AND seq = ?2")?
                    .execute(params![id, target])?;
                tx.prepare_cached(
                    "UPDATE messages SET body = '', content_type = ''
                     WHERE conversation_id = ?1 AND target_seq = ?2 AND kind = 'edit'",
                )?
                .execute(params![id, target])?;
            }
        }
        kinds::REACTION => {
            let live = tx
                .prepare_cached(&format!(
                    "SELECT 1 FROM messages WHERE conversation_id = ?1 AND seq = ?2
                     AND {IS_MESSAGE} AND deleted = 0"
                ))?
                .query_row(params![id, target], |_| Ok(()))
                .optional()?;
            if live.is_some() {
                let sql = if event.remove {
                    "DELETE FROM reactions
                     WHERE conversation_id = ?1 AND seq = ?2 AND emoji = ?3 AND user_id = ?4"
                } else {
                    "INSERT OR IGNORE INTO reactions (conversation_id, seq, emoji, user_id)
                     VALUES (?1, ?2, ?3, ?4)"
                };
                tx.prepare_cached(sql)?.execute(params![
                    id,
                    target,
                    event.emoji,
                    event.sender_id
                ])?;
            }
        }
        kinds::SYSTEM => {
            if let Some(system) = &event.system {
                apply_system(tx, id, &event.sender_id, system, event.seq, now_ms)?;
            }
        }
        _ => {
            if event.thread_root_seq > 0 {
                tx.prepare_cached(&format!(
                    "UPDATE messages SET reply_count = reply_count + 1
                     WHERE conversation_id = ?1 AND seq = ?2 AND {IS_MESSAGE}"
                ))?
                .execute(params![id, seq_param(event.thread_root_seq)])?;
            }
        }
    }
    Ok(())
}

/// Membership, roles, bans, name and topic changes of a system event (groups only).
fn apply_system(
    tx: &Connection,
    id: &str,
    actor: &str,
    system: &SystemEvent,
    seq: u64,
    now_ms: i64,
) -> DbResult<()> {
    let Some(conv) = load_conversation(tx, id)? else {
        return Ok(());
    };
    if conv.kind != ConversationKind::Group.as_str() {
        return Ok(());
    }
    let users = &system.user_ids;
    // A member taken out is recorded with this event, for sync.
    let remove = |user: &str| -> DbResult<()> {
        let removed = tx
            .prepare_cached("DELETE FROM members WHERE conversation_id = ?1 AND user_id = ?2")?
            .execute(params![id, user])?;
        if removed > 0 {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO departures (user_id, conversation_id, seq)
                 VALUES (?1, ?2, ?3)",
            )?
            .execute(params![user, id, seq_param(seq)])?;
        }
        Ok(())
    };
    match system.action.as_str() {
        actions::MEMBERS_ADDED => {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO members (conversation_id, user_id, role, joined_at_ms)
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut back = tx.prepare_cached(
                "DELETE FROM departures WHERE user_id = ?1 AND conversation_id = ?2",
            )?;
            for user in users {
                insert.execute(params![id, user, ROLE_MEMBER, now_ms])?;
                back.execute(params![user, id])?;
            }
        }
        actions::MEMBERS_REMOVED => {
            for user in users {
                remove(user)?;
            }
        }
        actions::MEMBERS_BANNED => {
            let mut ban = tx.prepare_cached(
                "INSERT OR IGNORE INTO bans (conversation_id, user_id, banned_at_ms)
                 VALUES (?1, ?2, ?3)",
            )?;
            for user in users {
                remove(user)?;
                ban.execute(params![id, user, now_ms])?;
            }
        }
        actions::MEMBERS_UNBANNED => {
            let mut unban =
                tx.prepare_cached("DELETE FROM bans WHERE conversation_id = ?1 AND user_id = ?2")?;
            for user in users {
                unban.execute(params![id, user])?;
            }
        }
        actions::MEMBER_LEFT => remove(actor)?,
        actions::ROLE_CHANGED if system.role == roles::OWNER => {
            if let [new_owner] = users.as_slice() {
                if member_exists(tx, id, new_owner)? {
                    tx.prepare_cached(
                        "UPDATE members SET role = ?2 WHERE conversation_id = ?1 AND role = ?3",
                    )?
                    .execute(params![id, roles::ADMIN, roles::OWNER])?;
                    set_owner(tx, id, new_owner)?;
                }
            }
        }
        actions::ROLE_CHANGED if system.role == roles::ADMIN || system.role == roles::MEMBER => {
            let mut update = tx.prepare_cached(
                "UPDATE members SET role = ?3
                 WHERE conversation_id = ?1 AND user_id = ?2 AND role <> ?4",
            )?;
            for user in users {
                update.execute(params![id, user, system.role, roles::OWNER])?;
            }
        }
        actions::RENAMED => {
            tx.prepare_cached("UPDATE conversations SET name = ?2 WHERE conversation_id = ?1")?
                .execute(params![id, system.name])?;
        }
        actions::TOPIC_CHANGED => {
            tx.prepare_cached("UPDATE conversations SET topic = ?2 WHERE conversation_id = ?1")?
                .execute(params![id, system.topic])?;
        }
        _ => {}
    }
    // The group keeps an owner while it has members.
    let has_owner = tx
        .prepare_cached("SELECT 1 FROM members WHERE conversation_id = ?1 AND role = ?2")?
        .query_row(params![id, roles::OWNER], |_| Ok(()))
        .optional()?
        .is_some();
    if !has_owner {
        let heir: Option<String> = tx
            .prepare_cached(
                "SELECT user_id FROM members WHERE conversation_id = ?1
                 ORDER BY CASE role WHEN ?2 THEN 0 ELSE 1 END, joined_at_ms, user_id
                 LIMIT 1",
            )?
            .query_row(params![id, roles::ADMIN], |r| r.get(0))
            .optional()?;
        if let Some(heir) = heir {
            set_owner(tx, id, &heir)?;
        }
    }
    Ok(())
}

fn set_owner(tx: &Connection, id: &str, user: &str) -> DbResult<()> {
    tx.prepare_cached("UPDATE members SET role = ?3 WHERE conversation_id = ?1 AND user_id = ?2")?
        .execute(params![id, user, roles::OWNER])?;
    tx.prepare_cached("UPDATE conversations SET owner_id = ?2 WHERE conversation_id = ?1")?
        .execute(params![id, user])?;
    Ok(())
}

/// A user's markers: (read_seq, read_at_ms, delivered_seq, delivered_at_ms), zeros
/// when none are stored.
fn load_markers(tx: &Connection, id: &str, user: &str) -> DbResult<(u64, i64, u64, i64)> {
    let stored: Option<(i64, i64, i64, i64)> = tx
        .prepare_cached(
            "SELECT seq, at_ms, delivered_seq, delivered_at_ms FROM read_markers
             WHERE conversation_id = ?1 AND user_id = ?2",
        )?
        .query_row([id, user], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    let (read, read_at, delivered, delivered_at) = stored.unwrap_or_default();
    Ok((read as u64, read_at, delivered as u64, delivered_at))
}

fn store_markers(
    tx: &Connection,
    id: &str,
    user: &str,
    (read, read_at, delivered, delivered_at): (u64, i64, u64, i64),
) -> DbResult<()> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO read_markers
             (conversation_id, user_id, seq, at_ms, delivered_seq, delivered_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        id,
        user,
        seq_param(read),
        read_at,
        seq_param(delivered),
        delivered_at
    ])?;
    Ok(())
}

fn webhook_from_row(row: &Row<'_>) -> rusqlite::Result<Webhook> {
    Ok(Webhook {
        webhook_id: row.get(0)?,
        conversation_id: row.get(1)?,
        url: row.get(2)?,
        secret: row.get(3)?,
        delivered_seq: row.get::<_, i64>(4)? as u64,
        created_at_ms: row.get(5)?,
        created_by: row.get(6)?,
        suspended: false,
    })
}

const WEBHOOK_COLUMNS: &str =
    "webhook_id, conversation_id, url, secret, delivered_seq, created_at_ms, created_by";

fn load_webhook(conn: &Connection, id: &str, webhook_id: &str) -> DbResult<Webhook> {
    let hook = conn
        .prepare_cached(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE webhook_id = ?1 AND conversation_id = ?2"
        ))?
        .query_row([webhook_id, id], webhook_from_row)
        .optional()?;
    Ok(hook.ok_or_else(|| StorageError::NotFound(format!("webhook {webhook_id}")))?)
}

#[async_trait]
impl HistoryStore for SqliteStore {
    async fn create_conversation(&self, new: NewConversation) -> Result<Conversation> {
        self.writer
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let (owner_id, pair) = match new.kind {
                    ConversationKind::Direct => (String::new(), Some(direct_key(&new.members))),
                    ConversationKind::Group => (new.creator_id.clone(), None),
                };
                if let Some(pair) = &pair {
                    let existing: Option<String> = tx
                        .prepare_cached(
                            "SELECT conversation_id FROM conversations WHERE direct_key = ?1",
                        )?
                        .query_row([pair], |r| r.get(0))
                        .optional()?;
                    if let Some(id) = existing {
                        let conv = load_conversation_with_members(&tx, &id)?;
                        tx.commit()?;
                        return Ok(conv);
                    }
                }
                let created: i64 = tx
                    .prepare_cached("SELECT COUNT(*) FROM conversations WHERE created_by = ?1")?
                    .query_row([&new.creator_id], |r| r.get(0))?;
                rules::created_cap(created.max(0) as u64, new.max_created)?;
                tx.execute(
                    "INSERT INTO conversations (conversation_id, kind, name, owner_id, direct_key,
                         last_seq, created_at_ms, updated_at_ms, created_by)
                     VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?6, ?7)",
                    params![
                        new.conversation_id,
                        new.kind.as_str(),
                        new.name,
                        owner_id,
                        pair,
                        new.now_ms,
                        new.creator_id
                    ],
                )?;
                {
                    let mut insert = tx.prepare_cached(
                        "INSERT OR IGNORE INTO members (conversation_id, user_id, role, joined_at_ms)
                         VALUES (?1, ?2, ?3, ?4)",
                    )?;
                    for user in &new.members {
                        let role = if *user == owner_id { ROLE_OWNER } else { ROLE_MEMBER };
                        insert.execute(params![new.conversation_id, user, role, new.now_ms])?;
                    }
                }
                let conv = load_conversation_with_members(&tx, &new.conversation_id)?;
                tx.commit()?;
                Ok(conv)
            })
            .await
    }

    async fn get_conversation(&self, conversation_id: &str) -> Result<Conversation> {
        let id = conversation_id.to_owned();
        self.readers
            .call(move |conn| {
                let tx = conn.transaction()?;
                let conv = load_conversation_with_members(&tx, &id)?;
                tx.commit()?;
                Ok(conv)
            })
            .await
    }

    async fn is_member(&self, conversation_id: &str, user_id: &str) -> Result<bool> {
        let (id, user) = (conversation_id.to_owned(), user_id.to_owned());
        self.readers
            .call(move |conn| member_exists(conn, &id, &user))
            .await
    }

    async fn change_members(&self, change: MemberChange) -> Result<Conversation> {
        self.writer
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let id = &change.conversation_id;
                let conv = load_conversation(&tx, id)?
                    .ok_or_else(|| StorageError::NotFound(id.clone()))?;
                let kind = ConversationKind::parse(&conv.kind).ok_or_else(|| {
                    StorageError::Internal(format!("conversation {id} has kind {}", conv.kind))
                })?;
                let actor_is_member = member_exists(&tx, id, &change.actor_id)?;
                rules::authorize_member_change(
                    id,
                    kind,
                    &conv.owner_id,
                    &change.actor_id,
                    actor_is_member,
                    change.action,
                    &change.user_ids,
                )?;
                let mut changed = 0usize;
                match change.action {
                    MemberAction::Add => {
                        let count: i64 = tx.query_row(
                            "SELECT COUNT(*) FROM members WHERE conversation_id = ?1",
                            [id],
                            |r| r.get(0),
                        )?;
                        let mut insert = tx.prepare_cached(
                            "INSERT OR IGNORE INTO members (conversation_id, user_id, role, joined_at_ms)
                             VALUES (?1, ?2, ?3, ?4)",
                        )?;
                        for user in &change.user_ids {
                            changed +=
                                insert.execute(params![id, user, ROLE_MEMBER, change.now_ms])?;
                        }
                        rules::check_member_count(count as usize + changed)?;
                    }
                    MemberAction::Remove => {
                        let mut delete = tx.prepare_cached(
                            "DELETE FROM members WHERE conversation_id = ?1 AND user_id = ?2",
                        )?;
                        for user in &change.user_ids {
                            changed += delete.execute(params![id, user])?;
                        }
                    }
                }
                if changed > 0 {
                    tx.execute(
                        "UPDATE conversations SET updated_at_ms = ?2 WHERE conversation_id = ?1",
                        params![id, change.now_ms],
                    )?;
                }
                let conv = load_conversation_with_members(&tx, id)?;
                // An error above (for example the member cap) drops `tx`: rolled back.
                tx.commit()?;
                Ok(conv)
            })
            .await
    }

    async fn list_conversations(&self, user_id: &str) -> Result<Vec<Conversation>> {
        let user = user_id.to_owned();
        self.readers
            .call(move |conn| {
                let tx = conn.transaction()?;
                let convs = user_conversations(&tx, &user)?;
                tx.commit()?;
                Ok(convs)
            })
            .await
    }

    async fn last_seq(&self, conversation_id: &str) -> Result<u64> {
        let id = conversation_id.to_owned();
        self.readers
            .call(move |conn| {
                let seq: Option<i64> = conn
                    .prepare_cached(
                        "SELECT last_seq FROM conversations WHERE conversation_id = ?1",
                    )?
                    .query_row([&id], |r| r.get(0))
                    .optional()?;
                let seq = seq.ok_or(StorageError::NotFound(id))?;
                Ok(seq as u64)
            })
            .await
    }

    async fn append(
        &self,
        message: Message,
        dedupe_since_ms: i64,
        now_ms: i64,
    ) -> Result<Appended> {
        self.writer
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let appended = append_in(&tx, message, dedupe_since_ms, now_ms)?;
                tx.commit()?;
                Ok(appended)
            })
            .await
    }

    async fn append_batch(
        &self,
        messages: Vec<Message>,
        first_seq: u64,
        dedupe_since_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<Appended>> {
        // All or nothing: one transaction (one commit) for the whole batch.
        self.writer
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let mut next = first_seq;
                let mut results = Vec::with_capacity(messages.len());
                for mut message in messages {
                    message.seq = next;
                    let appended = append_in(&tx, message, dedupe_since_ms, now_ms)?;
                    if !appended.duplicate {
                        next += 1;
                    }
                    results.push(appended);
                }
                tx.commit()?;
                Ok(results)
            })
            .await
    }

    async fn lookup_dedupe(
        &self,
        sender_id: &str,
        client_msg_id: &str,
        since_ms: i64,
    ) -> Result<Option<Message>> {
        let (sender, client_msg_id) = (sender_id.to_owned(), client_msg_id.to_owned());
        self.readers
            .call(move |conn| {
                let tx = conn.transaction()?;
                let hit = dedupe_hit(&tx, &sender, &client_msg_id, since_ms)?;
                tx.commit()?;
                Ok(hit)
            })
            .await
    }

    async fn history_page(&self, query: &PageQuery) -> Result<HistoryResult> {
        let query = query.clone();
        self.readers
            .call(move |conn| {
                let id = &query.conversation_id;
                let limit = query.limit as usize;
                let (mut messages, has_more) = match query.direction {
                    Direction::Forward => {
                        let mut rows =
                            messages_after(conn, id, seq_param(query.from_seq), query.limit)?;
                        let more = rows.len() > limit;
                        rows.truncate(limit);
                        (rows, more)
                    }
                    Direction::Backward => {
                        let before = if query.from_seq == 0 {
                            i64::MAX
                        } else {
                            seq_param(query.from_seq)
                        };
                        let mut rows = messages_before(conn, id, before, query.limit)?;
                        let more = rows.len() > limit;
                        rows.truncate(limit);
                        (rows, more)
                    }
                };
                if query.direction == Direction::Backward {
                    messages.reverse();
                }
                attach_reactions(conn, id, &mut messages)?;
                Ok(HistoryResult {
                    conversation_id: query.conversation_id,
                    messages,
                    has_more,
                })
            })
            .await
    }

    async fn sync(
        &self,
        user_id: &str,
        cursors: &HashMap<String, u64>,
        limit: u32,
    ) -> Result<SyncResult> {
        let user = user_id.to_owned();
        let cursors = cursors.clone();
        self.readers
            .call(move |conn| {
                // One read transaction: a consistent snapshot of every conversation.
                let tx = conn.transaction()?;
                let convs = user_conversations(&tx, &user)?;
                let member_of: std::collections::HashSet<String> =
                    convs.iter().map(|c| c.conversation_id.clone()).collect();
                let mut result = SyncResult::default();
                for mut conv in convs {
                    let cursor = cursors.get(&conv.conversation_id).copied();
                    if matches!(cursor, Some(c) if conv.last_seq <= c) {
                        continue;
                    }
                    let after = seq_param(cursor.unwrap_or(0));
                    let mut messages = messages_after(&tx, &conv.conversation_id, after, limit)?;
                    if messages.len() > limit as usize {
                        messages.truncate(limit as usize);
                        result.truncated.push(conv.conversation_id.clone());
                    }
                    attach_reactions(&tx, &conv.conversation_id, &mut messages)?;
                    load_members(&tx, &mut conv)?;
                    result.messages.extend(messages);
                    result.conversations.push(conv);
                }
                // Conversations the client knows and the user is no longer in.
                for (id, cursor) in &cursors {
                    if member_of.contains(id) {
                        continue;
                    }
                    let departed: Option<i64> = tx
                        .prepare_cached(
                            "SELECT seq FROM departures WHERE user_id = ?1 AND conversation_id = ?2",
                        )?
                        .query_row(params![user, id], |r| r.get(0))
                        .optional()?;
                    match departed {
                        Some(seq) if seq.max(0) as u64 > *cursor => {
                            result.removals.extend(load_message(&tx, id, seq)?);
                        }
                        _ => {}
                    }
                }
                tx.commit()?;
                Ok(result)
            })
            .await
    }

    async fn set_read_marker(
        &self,
        conversation_id: &str,
        user_id: &str,
        seq: u64,
        now_ms: i64,
    ) -> Result<ReadMarker> {
        self.move_marker(conversation_id, user_id, MarkerKind::Read, seq, now_ms)
            .await
    }

    async fn set_delivered_marker(
        &self,
        conversation_id: &str,
        user_id: &str,
        seq: u64,
        now_ms: i64,
    ) -> Result<ReadMarker> {
        self.move_marker(conversation_id, user_id, MarkerKind::Delivered, seq, now_ms)
            .await
    }

    async fn message_at(&self, conversation_id: &str, seq: u64) -> Result<Option<Message>> {
        let id = conversation_id.to_owned();
        self.readers
            .call(move |conn| load_message(conn, &id, seq_param(seq)))
            .await
    }

    async fn banned_among(
        &self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> Result<Vec<String>> {
        let (id, users) = (conversation_id.to_owned(), user_ids.to_vec());
        self.readers
            .call(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT 1 FROM bans WHERE conversation_id = ?1 AND user_id = ?2",
                )?;
                let mut banned = Vec::new();
                for user in users {
                    if stmt
                        .query_row([&id, &user], |_| Ok(()))
                        .optional()?
                        .is_some()
                    {
                        banned.push(user);
                    }
                }
                Ok(banned)
            })
            .await
    }

    async fn my_reactions(
        &self,
        conversation_id: &str,
        user_id: &str,
        from_seq: u64,
        to_seq: u64,
    ) -> Result<Vec<(u64, String)>> {
        let (id, user) = (conversation_id.to_owned(), user_id.to_owned());
        self.readers
            .call(move |conn| {
                let rows = conn
                    .prepare_cached(
                        "SELECT seq, emoji FROM reactions
                         WHERE conversation_id = ?1 AND user_id = ?2 AND seq BETWEEN ?3 AND ?4",
                    )?
                    .query_map(
                        params![id, user, seq_param(from_seq), seq_param(to_seq)],
                        |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await
    }

    async fn thread_page(&self, query: &ThreadQuery) -> Result<ThreadPage> {
        let query = query.clone();
        self.readers
            .call(move |conn| {
                let tx = conn.transaction()?;
                let id = query.conversation_id.as_str();
                let root = load_message(&tx, id, seq_param(query.root_seq))?
                    .filter(|m| kinds::is_message(&m.kind))
                    .ok_or_else(|| {
                        StorageError::NotFound(format!("thread root {}", query.root_seq))
                    })?;
                let mut replies = tx
                    .prepare_cached(&format!(
                        "SELECT {MESSAGE_COLUMNS} FROM messages
                         WHERE conversation_id = ?1 AND thread_root_seq = ?2 AND seq > ?3
                           AND {IS_MESSAGE}
                         ORDER BY seq ASC LIMIT ?4"
                    ))?
                    .query_map(
                        params![
                            id,
                            seq_param(query.root_seq),
                            seq_param(query.from_seq),
                            i64::from(query.limit) + 1
                        ],
                        message_from_row,
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let has_more = replies.len() > query.limit as usize;
                replies.truncate(query.limit as usize);
                let mut root = [root];
                attach_reactions(&tx, id, &mut root)?;
                attach_reactions(&tx, id, &mut replies)?;
                tx.commit()?;
                let [root] = root;
                Ok(ThreadPage {
                    root,
                    replies,
                    has_more,
                })
            })
            .await
    }

    async fn receipts(&self, conversation_id: &str) -> Result<Vec<MemberReceipt>> {
        let id = conversation_id.to_owned();
        self.readers
            .call(move |conn| {
                let tx = conn.transaction()?;
                require_conversation(&tx, &id)?;
                let rows = tx
                    .prepare_cached(
                        "SELECT m.user_id, COALESCE(r.seq, 0), COALESCE(r.delivered_seq, 0),
                                COALESCE(r.at_ms, 0)
                         FROM members m LEFT JOIN read_markers r
                             ON r.conversation_id = m.conversation_id AND r.user_id = m.user_id
                         WHERE m.conversation_id = ?1 ORDER BY m.user_id",
                    )?
                    .query_map([&id], |r| {
                        let read = r.get::<_, i64>(1)? as u64;
                        Ok(MemberReceipt {
                            user_id: r.get(0)?,
                            read_seq: read,
                            delivered_seq: (r.get::<_, i64>(2)? as u64).max(read),
                            read_at_ms: r.get(3)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                tx.commit()?;
                Ok(rows)
            })
            .await
    }

    async fn set_notification(
        &self,
        user_id: &str,
        conversation_id: &str,
        until_ms: i64,
    ) -> Result<()> {
        let (user, id) = (user_id.to_owned(), conversation_id.to_owned());
        self.writer
            .call(move |conn| {
                if until_ms == 0 {
                    conn.prepare_cached(
                        "DELETE FROM notification_prefs WHERE user_id = ?1 AND conversation_id = ?2",
                    )?
                    .execute(params![user, id])?;
                } else {
                    conn.prepare_cached(
                        "INSERT OR REPLACE INTO notification_prefs (user_id, conversation_id, until_ms)
                         VALUES (?1, ?2, ?3)",
                    )?
                    .execute(params![user, id, until_ms])?;
                }
                Ok(())
            })
            .await
    }

    async fn dnd_until(&self, user_id: &str) -> Result<i64> {
        let user = user_id.to_owned();
        self.readers
            .call(move |conn| {
                let until: Option<i64> = conn
                    .prepare_cached(
                        "SELECT until_ms FROM notification_prefs
                         WHERE user_id = ?1 AND conversation_id = ''",
                    )?
                    .query_row([&user], |r| r.get(0))
                    .optional()?;
                Ok(until.unwrap_or(0))
            })
            .await
    }

    async fn notification_state(&self, conversation_id: &str) -> Result<Vec<MemberNotification>> {
        let id = conversation_id.to_owned();
        self.readers
            .call(move |conn| {
                let tx = conn.transaction()?;
                require_conversation(&tx, &id)?;
                let rows = tx
                    .prepare_cached(
                        "SELECT m.user_id, COALESCE(mute.until_ms, 0), COALESCE(dnd.until_ms, 0)
                         FROM members m
                         LEFT JOIN notification_prefs mute
                             ON mute.user_id = m.user_id AND mute.conversation_id = m.conversation_id
                         LEFT JOIN notification_prefs dnd
                             ON dnd.user_id = m.user_id AND dnd.conversation_id = ''
                         WHERE m.conversation_id = ?1 ORDER BY m.user_id",
                    )?
                    .query_map([&id], |r| {
                        Ok(MemberNotification {
                            user_id: r.get(0)?,
                            muted_until_ms: r.get(1)?,
                            dnd_until_ms: r.get(2)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                tx.commit()?;
                Ok(rows)
            })
            .await
    }

    async fn shared_contacts(&self, user_id: &str, other_ids: &[String]) -> Result<Vec<String>> {
        let (user, mut others) = (user_id.to_owned(), other_ids.to_vec());
        others.sort_unstable();
        others.dedup();
        self.readers
            .call(move |conn| {
                let tx = conn.transaction()?;
                let mut stmt = tx.prepare_cached(
                    "SELECT 1 FROM members me
                     JOIN members o ON o.conversation_id = me.conversation_id
                     JOIN senders s ON s.conversation_id = o.conversation_id
                         AND s.user_id = o.user_id
                     WHERE me.user_id = ?1 AND o.user_id = ?2 LIMIT 1",
                )?;
                let mut shared = Vec::new();
                for other in others.into_iter().filter(|o| *o != user) {
                    if stmt
                        .query_row([&user, &other], |_| Ok(()))
                        .optional()?
                        .is_some()
                    {
                        shared.push(other);
                    }
                }
                drop(stmt);
                tx.commit()?;
                Ok(shared)
            })
            .await
    }

    async fn put_webhook(&self, webhook: NewWebhook) -> Result<Webhook> {
        self.writer
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let conv = require_conversation(&tx, &webhook.conversation_id)?;
                let count: i64 = tx
                    .prepare_cached("SELECT COUNT(*) FROM webhooks WHERE conversation_id = ?1")?
                    .query_row([&webhook.conversation_id], |r| r.get(0))?;
                if count as usize >= webhook.max_per_conversation {
                    return Err(StorageError::InvalidRequest(format!(
                        "a conversation has at most {} webhooks",
                        webhook.max_per_conversation
                    ))
                    .into());
                }
                let stored = Webhook {
                    webhook_id: webhook.webhook_id,
                    conversation_id: webhook.conversation_id,
                    url: webhook.url,
                    secret: webhook.secret,
                    delivered_seq: conv.last_seq,
                    created_at_ms: webhook.created_at_ms,
                    created_by: webhook.created_by,
                    suspended: false,
                };
                tx.prepare_cached(&format!(
                    "INSERT INTO webhooks ({WEBHOOK_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
                ))?
                .execute(params![
                    stored.webhook_id,
                    stored.conversation_id,
                    stored.url,
                    stored.secret,
                    seq_param(stored.delivered_seq),
                    stored.created_at_ms,
                    stored.created_by
                ])?;
                tx.commit()?;
                Ok(stored)
            })
            .await
    }

    async fn list_webhooks(&self, conversation_id: Option<&str>) -> Result<Vec<Webhook>> {
        let id = conversation_id.map(str::to_owned);
        self.readers
            .call(move |conn| {
                let hooks = match &id {
                    Some(id) => conn
                        .prepare_cached(&format!(
                            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE conversation_id = ?1
                             ORDER BY webhook_id"
                        ))?
                        .query_map([id], webhook_from_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()?,
                    None => conn
                        .prepare_cached(&format!(
                            "SELECT {WEBHOOK_COLUMNS} FROM webhooks
                             ORDER BY conversation_id, webhook_id"
                        ))?
                        .query_map([], webhook_from_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()?,
                };
                Ok(hooks)
            })
            .await
    }

    async fn delete_webhook(&self, conversation_id: &str, webhook_id: &str) -> Result<()> {
        let (id, hook) = (conversation_id.to_owned(), webhook_id.to_owned());
        self.writer
            .call(move |conn| {
                let deleted = conn
                    .prepare_cached(
                        "DELETE FROM webhooks WHERE webhook_id = ?1 AND conversation_id = ?2",
                    )?
                    .execute([&hook, &id])?;
                if deleted == 0 {
                    return Err(StorageError::NotFound(format!("webhook {hook}")).into());
                }
                Ok(())
            })
            .await
    }

    async fn advance_webhook(
        &self,
        conversation_id: &str,
        webhook_id: &str,
        delivered_seq: u64,
    ) -> Result<Webhook> {
        let (id, hook) = (conversation_id.to_owned(), webhook_id.to_owned());
        self.writer
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                tx.prepare_cached(
                    "UPDATE webhooks SET delivered_seq = ?3
                     WHERE webhook_id = ?1 AND conversation_id = ?2 AND delivered_seq < ?3",
                )?
                .execute(params![hook, id, seq_param(delivered_seq)])?;
                let stored = load_webhook(&tx, &id, &hook)?;
                tx.commit()?;
                Ok(stored)
            })
            .await
    }

    async fn purge_dedupe(&self, before_ms: i64, max_rows: u32) -> Result<u64> {
        self.writer
            .call(move |conn| {
                let deleted = conn
                    .prepare_cached(
                        "DELETE FROM dedupe_keys WHERE (sender_id, client_msg_id) IN (
                             SELECT sender_id, client_msg_id FROM dedupe_keys
                             WHERE created_at_ms < ?1 LIMIT ?2)",
                    )?
                    .execute(params![before_ms, i64::from(max_rows)])?;
                Ok(deleted as u64)
            })
            .await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::conformance::{Harness, StoreFactory};

    /// A SQLite file in a temporary directory; every `open` opens the same file.
    pub(crate) struct SqliteFactory {
        dir: tempfile::TempDir,
    }

    impl SqliteFactory {
        pub(crate) fn new() -> Self {
            SqliteFactory {
                dir: tempfile::tempdir().expect("temporary directory"),
            }
        }

        fn path(&self) -> std::path::PathBuf {
            self.dir.path().join("storage.sqlite3")
        }
    }

    #[async_trait]
    impl StoreFactory for SqliteFactory {
        async fn open(&self) -> Arc<dyn HistoryStore> {
            let path = self.path();
            let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                .await
                .expect("open task")
                .expect("open sqlite store");
            Arc::new(store)
        }
    }

    mod conformance {
        crate::conformance::history_store_conformance!(super::SqliteFactory::new);
    }

    /// `kill -9` leaves the database and its WAL as they were when the last commit
    /// returned (no close, no checkpoint). Copying both files while the store is still
    /// open gives exactly that state; opening the copy must recover every appended
    /// message.
    #[tokio::test]
    async fn acknowledged_appends_survive_a_killed_process() {
        let factory = SqliteFactory::new();
        let h = Harness::open(&factory, 200).await;
        let id = h.direct("alice", "bob").await.conversation_id;
        h.fill(&id, "alice", 20).await;

        let crashed = tempfile::tempdir().unwrap();
        let copy = crashed.path().join("storage.sqlite3");
        let wal = factory.path().with_extension("sqlite3-wal");
        assert!(
            std::fs::metadata(&wal)
                .map(|m| m.len() > 0)
                .unwrap_or(false),
            "commits are in the WAL, not yet checkpointed"
        );
        std::fs::copy(factory.path(), &copy).unwrap();
        std::fs::copy(&wal, copy.with_extension("sqlite3-wal")).unwrap();

        let path = copy.clone();
        let reopened = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
            .await
            .unwrap()
            .unwrap();
        let after = Harness::over(Arc::new(reopened), 200);
        assert_eq!(after.last_seq(&id).await, 20);
        let page = after.history("bob", &id, 0, "", 0).await.unwrap();
        assert_eq!(page.messages.len(), 20);
        assert!(
            after
                .append(&id, 21, "alice", &format!("{id}-m20"))
                .await
                .unwrap()
                .duplicate
        );
        drop(h);
    }

    /// The versions recorded in `schema_version`, ascending.
    fn recorded_versions(conn: &Connection) -> Vec<u32> {
        conn.prepare("SELECT version FROM schema_version ORDER BY version")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    #[test]
    fn migrations_are_recorded_and_reopening_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/db.sqlite3");
        drop(SqliteStore::open(&path).unwrap());
        drop(SqliteStore::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        assert_eq!(
            recorded_versions(&conn),
            (1..=MIGRATIONS.len() as u32).collect::<Vec<_>>()
        );
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    /// Processes that open (and so migrate) a new file at the same moment take turns:
    /// every open succeeds and each migration is recorded once.
    #[test]
    fn concurrent_migrations_of_one_file_apply_each_migration_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite3");
        let start = std::sync::Arc::new(std::sync::Barrier::new(4));
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let (path, start) = (path.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    SqliteStore::open(&path)
                        .map(drop)
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        for open in opens {
            open.join().unwrap().unwrap();
        }
        let conn = Connection::open(&path).unwrap();
        assert_eq!(
            recorded_versions(&conn),
            (1..=MIGRATIONS.len() as u32).collect::<Vec<_>>()
        );
    }

    /// A database written by the first schema: after the upgrade, the group's owner has
    /// role owner and everyone else member, read markers are also delivered markers,
    /// and old messages are messages that take edits and reactions.
    #[tokio::test]
    async fn a_first_schema_database_upgrades() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("storage.sqlite3");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_version (version INTEGER PRIMARY KEY,
                                              applied_at_ms INTEGER NOT NULL);
                 INSERT INTO schema_version VALUES (1, 0);
                 INSERT INTO conversations VALUES ('g', 'group', 'old', 'olga', NULL, 2, 1, 1);
                 INSERT INTO conversations VALUES ('d', 'direct', '', '', 'a\x1fb', 0, 1, 1);
                 INSERT INTO members VALUES ('g', 'olga', 'member', 1);
                 INSERT INTO members VALUES ('g', 'bob', 'whatever', 1);
                 INSERT INTO members VALUES ('d', 'a', 'member', 1);
                 INSERT INTO members VALUES ('d', 'b', 'member', 1);
                 INSERT INTO messages VALUES ('g', 1, 'm1', 'bob', 'p', 'c1', 'one', 'text/plain', 5);
                 INSERT INTO messages VALUES ('g', 2, 'm2', 'olga', 'p', 'c2', 'two', 'text/plain', 6);
                 INSERT INTO read_markers VALUES ('g', 'bob', 2, 7);",
            )
            .unwrap();
        }
        let store = tokio::task::spawn_blocking({
            let path = path.clone();
            move || SqliteStore::open(&path)
        })
        .await
        .unwrap()
        .unwrap();
        let h = Harness::over(Arc::new(store), 200);
        let g = h.get("g", "").await.unwrap();
        let roles: Vec<(&str, &str)> = g
            .member_roles
            .iter()
            .map(|m| (m.user_id.as_str(), m.role.as_str()))
            .collect();
        assert_eq!(roles, [("bob", "member"), ("olga", "owner")]);
        assert_eq!(g.topic, "");
        let d = h.get("d", "").await.unwrap();
        assert!(d.member_roles.iter().all(|m| m.role == "member"));
        let bob = h.listed("bob", "g").await;
        assert_eq!(
            (bob.read_seq, bob.delivered_seq, bob.unread_count),
            (2, 2, 0)
        );
        assert_eq!(h.listed("olga", "g").await.unread_count, 1);

        let old = h.event("olga", "g", 1).await;
        assert_eq!((old.kind.as_str(), old.body.as_str()), ("", "one"));
        h.send(crate::conformance::edit("g", "bob", 1, "uno"))
            .await
            .unwrap();
        h.send(crate::conformance::react("g", "olga", 1, "👍", false))
            .await
            .unwrap();
        let old = h.event("bob", "g", 1).await;
        assert_eq!((old.body.as_str(), old.reactions.len()), ("uno", 1));
        assert_eq!(
            h.admin("g", "olga", "renamed", &[])
                .await
                .map(|m| m.seq)
                .unwrap(),
            5,
            "the owner administers"
        );
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite3");
        drop(SqliteStore::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.execute(
            "INSERT INTO schema_version (version, applied_at_ms) VALUES (?1, 0)",
            [MIGRATIONS.len() as u32 + 1],
        )
        .unwrap();
        drop(conn);
        let err = SqliteStore::open(&path)
            .err()
            .expect("newer schema refused");
        assert!(err.to_string().contains("newer"), "{err}");
    }
}
