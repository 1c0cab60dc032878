//! The history store for scale: ScyllaDB (or Apache Cassandra) over CQL with the
//! `scylla` driver. Schema and table layout: [`schema`].
//!
//! # Driver setup
//!
//! Every statement is prepared once at start ([`Statements`]) and runs through the
//! driver's default load balancing policy: token-aware (requests go to a replica of the
//! partition; on ScyllaDB also to the owning shard), preferring `storage.scylla_datacenter`
//! when set. Consistency `LOCAL_QUORUM` for reads and writes, `LOCAL_SERIAL` for
//! conditional updates and serial reads: a deployment writes from one datacenter (the
//! routing partition owner is unique cluster-wide), which is what `LOCAL_SERIAL` needs.
//! Requests time out after [`REQUEST_TIMEOUT`]; reads and plain upserts are marked
//! idempotent (the driver may retry them), conditional updates are not.
//!
//! # Correctness without transactions
//!
//! There is no multi-row transaction, so each operation is built from single-partition
//! steps that are either conditional (Paxos, "lightweight transaction", LWT) or
//! idempotent, ordered so that a crash between any two steps leaves a state that the
//! next attempt (or the next reader) completes, and never a second version of the truth.
//!
//! **Append** takes no conditional update: the routing partition owner is the only
//! sequencer, what it writes is a function of the event log, and every row and
//! effect is written with a timestamp derived from its event's sequence, so a
//! second writer replaying the same log (a former owner resumed after a pause) can
//! only write the same values or older ones that lose. The steps, crash points and
//! checks are in [`append`]: keys first, then rows in sequence order (one unlogged
//! batch per `messages` partition, an event's effects before its row), then the head
//! (`last_seq`). The stored rows of a conversation are always a gapless prefix;
//! `LastSeq` (a new owner) reads past a head that lags them and moves it. A record
//! replayed after a crash finds its key naming its stored row (a duplicate, or the
//! record itself "placed" at the sequence it would take), so it is never stored
//! twice. Conversations last appended to by an earlier version of this store (a
//! conditional commit carrying the message in `pending_message`) are finished by
//! `LastSeq` the same way as before.
//!
//! Limits of this scheme: dedupe is exact for the events of one conversation (one
//! log partition). Two appends of the same key in *different* conversations at the
//! same instant (one sender reusing a client id) can both be stored; the sequence
//! stays gapless regardless.
//!
//! **Effects of timeline events** (edits, deletes, reactions, thread replies,
//! system events) are written *before the event's own row*, so a stored row means
//! its effects are in place (a replay that finds the row applies nothing).
//! A crash between the effects and the row is repaired by the replay of the record,
//! which applies the effects again. Each effect is idempotent and written `USING
//! TIMESTAMP` of its event (`append::event_ts`), so it also commutes with the
//! effects of later events written before it:
//! - edit: the target's body, content_type, `edited_at_ms` and `edit_seqs + {e}` are
//!   set to values taken from the event; skipped if the target is deleted (and an
//!   edit of a target already deleted at append time is stored without its text);
//! - delete: reactions of the target removed (the per-user copies first, found
//!   through the target's rows), bodies of the edits in `edit_seqs` cleared, then the
//!   target cleared and marked deleted; running it again clears what is clear;
//! - reaction: a row inserted or deleted in both reaction tables;
//! - thread reply: the reply's `thread_replies` row, and `reply_count + 1` on the
//!   root written together with `reply_last_seq = e` in one row write, only while
//!   `reply_last_seq < e`;
//! - system event: planned from the current members, roles, name, topic and owner,
//!   then committed like a membership change (`IF members_version = v`) with the new
//!   name, topic, owner_id, member count and `members_seq = e`; the member rows (with
//!   roles and join times) and ban rows follow through the membership roll-forward.
//!   A repeat finds `members_seq >= e` and only finishes the roll-forward.
//!
//! Effects are applied in sequence order by each writer (a batch writes the rows
//! before an event with effects first); a second writer applying an older event's
//! effects late loses to the later events by timestamp. The read-modify-write
//! effects (the thread count, the edit of a deleted message) read the state of the
//! prefix or a later one, and a later state either skips the write or is overwritten
//! by the later event's own write. Readers never roll anything forward.
//!
//! **Reads with current state**: history, sync and thread pages read the rows (state
//! included) and count reactions per bucket (`mine` is filled by the service from
//! `reactions_by_user`). Unread counts scan the events after the user's read marker
//! (`seq, sender_id, kind, deleted, mentions` only) and stop at 1000 unread or after
//! 5000 events (beyond that the count is a lower bound); nothing is scanned when the
//! read marker is at `last_seq`. Lists and sync read per conversation the member's
//! role, both markers and the mute (four single-row reads).
//!
//! **Direct conversations**: `INSERT INTO direct_pairs ... IF NOT EXISTS` on the sorted
//! pair decides the conversation id; its row holds everything needed to finish
//! creating it (members, then the conversation row `IF NOT EXISTS`), so whoever finds
//! the pair without its conversation finishes the job. A group's member rows are
//! written before its conversation row, so a conversation is never visible without
//! its members (an interrupted creation leaves only unreachable member rows).
//!
//! **Membership changes**: read, authorize, then `UPDATE conversations SET
//! members_version = v + 1, member_count = n, pending_members = change
//! IF members_version = v` (a concurrent change makes this fail and the whole
//! check runs again: the owner check and the member cap are atomic with the change).
//! The member rows follow, written `USING TIMESTAMP v + 2` so that a late write of an
//! older change never undoes a newer one, then `applied_members_version` is raised. A
//! change interrupted after its commit is finished by the next `GetConversation` or
//! membership change of that conversation.
//!
//! **Read and delivered markers** rise with `IF seq < wanted` (or `IF NOT EXISTS` for
//! the first one), each in its own table; a read marker ahead of the delivered one
//! counts as delivered (with its time) without a second write.
//!
//! **Webhooks** take a slot `0..max` of their conversation with `IF NOT EXISTS` (the
//! limit holds under concurrent additions), advance with
//! `IF webhook_id = ? AND delivered_seq < ?` and are deleted with `IF webhook_id = ?`.
//! **Notification preferences** and **shared contacts** are plain reads and upserts.
//!
//! # Faults
//!
//! Opening fails with [`OpenError::Unreachable`] when no node answers; the service
//! retries with backoff and stays not ready meanwhile. During operation, a lost node
//! makes requests fail within [`REQUEST_TIMEOUT`] (at once when no connection is
//! left) with `unavailable`; the driver reconnects by itself.

mod append;
mod features;
mod migration_lock;
pub mod schema;
mod tls;

#[cfg(test)]
mod feature_tests;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ::scylla::client::execution_profile::ExecutionProfile;
use ::scylla::client::session::Session;
use ::scylla::client::session_builder::SessionBuilder;
use ::scylla::deserialize::row::DeserializeRow;
use ::scylla::errors::{
    ExecutionError, NewSessionError, NextPageError, NextRowError, PagerExecutionError,
    RequestAttemptError, RequestError,
};
use ::scylla::frame::types::{Consistency, SerialConsistency};
use ::scylla::policies::address_translator::AddressTranslator;
use ::scylla::policies::load_balancing::DefaultPolicy;
use ::scylla::response::query_result::QueryResult;
use ::scylla::serialize::row::SerializeRow;
use ::scylla::statement::prepared::PreparedStatement;
use ::scylla::value::{CqlValue, Row};
use async_trait::async_trait;
use futures::TryStreamExt;
use prost::Message as _;
use switchboard_config::Config;
use switchboard_proto::{
    Conversation, HistoryResult, MemberReceipt, Message, ReadMarker, SyncResult, SystemEvent,
    Webhook,
};

use crate::error::{Result, StorageError};
use crate::rules;
use crate::store::{
    kinds, Appended, ConversationKind, Direction, HistoryStore, MemberAction, MemberChange,
    MemberNotification, NewConversation, NewWebhook, PageQuery, ThreadPage, ThreadQuery,
};

/// Sequences per `messages` partition: `bucket = seq / BUCKET_SIZE`. Fixed forever
/// (changing it would hide stored messages).
pub const BUCKET_SIZE: u64 = 1000;
/// Client-side deadline of one request (including the driver's retries).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline of schema changes, which wait for every node to agree.
const SCHEMA_TIMEOUT: Duration = Duration::from_secs(60);
/// How long opening a connection to a node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Conditional updates tried per operation before giving up with `unavailable`
/// (only reached under contention that a single partition owner never causes).
const MAX_LWT_ATTEMPTS: usize = 8;
/// Requests one operation keeps in flight when it fans out (members, conversations).
const FANOUT: usize = 32;
/// Users per `IN (...)` membership probe.
const IN_CHUNK: usize = 100;
/// Rows per page of multi-page reads (members of a conversation, a user's conversations).
const PAGE_SIZE: i32 = 1000;
const ROLE_OWNER: &str = "owner";
const ROLE_MEMBER: &str = "member";
/// Separates the two ids of a direct pair key; ids never contain control characters.
const PAIR_SEPARATOR: char = '\u{1f}';

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No node answered (or answered only with timeouts): worth retrying.
    #[error("cannot reach ScyllaDB/Cassandra at {nodes}: {reason}")]
    Unreachable { nodes: String, reason: String },
    /// The keyspace's schema is older than this build and migrations are not to be
    /// applied at start.
    #[error(
        "keyspace {keyspace} has schema version {current}, this build needs {needed}: \
         run `switchboard migrate` (or set storage.migrate_on_start = true)"
    )]
    SchemaBehind {
        keyspace: String,
        current: u32,
        needed: u32,
    },
    /// The schema was migrated by a newer build.
    #[error(
        "keyspace {keyspace} has schema version {current}, newer than this build knows ({known})"
    )]
    SchemaNewer {
        keyspace: String,
        current: u32,
        known: u32,
    },
    /// Anything else (bad configuration, a refused statement).
    #[error("{0}")]
    Other(String),
}

impl OpenError {
    /// Whether trying again later can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, OpenError::Unreachable { .. })
    }
}

/// Apply pending schema migrations to the configured keyspace (creating it if needed);
/// returns the schema version.
pub async fn migrate(config: &Config) -> anyhow::Result<u32> {
    let session = connect(config, None).await?;
    Ok(migrate_session(&session, config).await?)
}

/// The ScyllaDB/Cassandra history store. Cheap to share behind an `Arc`.
pub struct ScyllaStore {
    session: Session,
    st: Statements,
    xt: features::FeatureStatements,
    at: append::AppendStatements,
    /// (conversation, sender) pairs already in `senders`: see `add_sender`.
    known_senders: std::sync::Mutex<HashSet<(String, String)>>,
}

impl ScyllaStore {
    /// Connect, migrate (when `storage.migrate_on_start`) or check the schema version,
    /// and prepare every statement.
    pub async fn open(config: &Config) -> std::result::Result<ScyllaStore, OpenError> {
        Self::open_with(config, None).await
    }

    /// [`ScyllaStore::open`] with node addresses rewritten by `translator` (tests put a
    /// proxy between the store and the server).
    pub async fn open_with(
        config: &Config,
        translator: Option<Arc<dyn AddressTranslator>>,
    ) -> std::result::Result<ScyllaStore, OpenError> {
        let session = connect(config, translator).await?;
        let storage = &config.storage;
        let version = if storage.migrate_on_start {
            migrate_session(&session, config).await?
        } else {
            let current = schema_version(&session, &storage.scylla_keyspace).await?;
            check_version(&storage.scylla_keyspace, current, false)?;
            current
        };
        let st = Statements::prepare(&session, &storage.scylla_keyspace)
            .await
            .map_err(|e| open_error(&config.storage.scylla_nodes, e))?;
        let xt = features::FeatureStatements::prepare(&session, &storage.scylla_keyspace)
            .await
            .map_err(|e| open_error(&config.storage.scylla_nodes, e))?;
        let at = append::AppendStatements::prepare(&session, &storage.scylla_keyspace)
            .await
            .map_err(|e| open_error(&config.storage.scylla_nodes, e))?;
        tracing::info!(
            nodes = %storage.scylla_nodes,
            keyspace = %storage.scylla_keyspace,
            schema_version = version,
            "history store connected"
        );
        Ok(ScyllaStore {
            session,
            st,
            xt,
            at,
            known_senders: std::sync::Mutex::new(HashSet::new()),
        })
    }
}

fn nodes_of(config: &Config) -> Vec<String> {
    config
        .storage
        .scylla_nodes
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn connect(
    config: &Config,
    translator: Option<Arc<dyn AddressTranslator>>,
) -> std::result::Result<Session, OpenError> {
    let storage = &config.storage;
    let mut policy = DefaultPolicy::builder().token_aware(true);
    if !storage.scylla_datacenter.is_empty() {
        policy = policy
            .prefer_datacenter(storage.scylla_datacenter.clone())
            .permit_dc_failover(false);
    }
    let profile = ExecutionProfile::builder()
        .consistency(Consistency::LocalQuorum)
        .serial_consistency(Some(SerialConsistency::LocalSerial))
        .request_timeout(Some(REQUEST_TIMEOUT))
        .load_balancing_policy(policy.build())
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(nodes_of(config))
        .connection_timeout(CONNECT_TIMEOUT)
        .schema_agreement_timeout(SCHEMA_TIMEOUT)
        .default_execution_profile_handle(profile.into_handle());
    if !storage.scylla_username.is_empty() {
        builder = builder.user(&storage.scylla_username, tls::password(storage)?);
    }
    if let Some(context) = tls::context(storage)? {
        builder = builder.tls_context(Some(context));
    }
    if let Some(translator) = translator {
        builder = builder.address_translator(translator);
    }
    builder.build().await.map_err(|e| {
        let reason = e.to_string();
        match e {
            NewSessionError::EmptyKnownNodesList | NewSessionError::IllegalConfig(_) => {
                OpenError::Other(format!("storage.scylla_nodes: {reason}"))
            }
            _ => OpenError::Unreachable {
                nodes: storage.scylla_nodes.clone(),
                reason,
            },
        }
    })
}

fn open_error(nodes: &str, e: ExecutionError) -> OpenError {
    match classify(&e) {
        StorageError::Unavailable(reason) => OpenError::Unreachable {
            nodes: nodes.to_owned(),
            reason,
        },
        other => OpenError::Other(other.to_string()),
    }
}

/// Run a schema statement with the schema deadline.
async fn run_ddl(session: &Session, cql: &str) -> std::result::Result<(), ExecutionError> {
    let mut statement = ::scylla::statement::unprepared::Statement::new(cql);
    statement.set_request_timeout(Some(SCHEMA_TIMEOUT));
    session.query_unpaged(statement, ()).await?;
    Ok(())
}

/// The recorded schema version of `keyspace` (0 when the keyspace or the table is missing).
async fn schema_version(session: &Session, keyspace: &str) -> std::result::Result<u32, OpenError> {
    let nodes = "the cluster";
    let tables = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ? AND table_name = 'schema_version'",
            (keyspace,),
        )
        .await
        .map_err(|e| open_error(nodes, e))?
        .into_rows_result()
        .map_err(|e| OpenError::Other(e.to_string()))?
        .rows_num();
    if tables == 0 {
        return Ok(0);
    }
    let result = session
        .query_unpaged(format!("SELECT version FROM {keyspace}.schema_version"), ())
        .await
        .map_err(|e| open_error(nodes, e))?
        .into_rows_result()
        .map_err(|e| OpenError::Other(e.to_string()))?;
    let mut current = 0u32;
    for row in result
        .rows::<(i32,)>()
        .map_err(|e| OpenError::Other(e.to_string()))?
    {
        let (version,) = row.map_err(|e| OpenError::Other(e.to_string()))?;
        current = current.max(u32::try_from(version).unwrap_or(0));
    }
    Ok(current)
}

fn check_version(
    keyspace: &str,
    current: u32,
    will_migrate: bool,
) -> std::result::Result<(), OpenError> {
    let known = schema::latest_version();
    if current > known {
        return Err(OpenError::SchemaNewer {
            keyspace: keyspace.to_owned(),
            current,
            known,
        });
    }
    if current < known && !will_migrate {
        return Err(OpenError::SchemaBehind {
            keyspace: keyspace.to_owned(),
            current,
            needed: known,
        });
    }
    Ok(())
}

/// Create the keyspace and apply every migration it lacks, holding the keyspace's
/// migration lock ([`migration_lock`]) so that migrators take turns. Every statement is
/// idempotent, so an interrupted run is completed by the next one.
async fn migrate_session(
    session: &Session,
    config: &Config,
) -> std::result::Result<u32, OpenError> {
    migrate_session_waiting(session, config, migration_lock::LOCK_WAIT).await
}

/// [`migrate_session`], waiting up to `wait` for another migrator's lock.
async fn migrate_session_waiting(
    session: &Session,
    config: &Config,
    wait: Duration,
) -> std::result::Result<u32, OpenError> {
    let storage = &config.storage;
    let keyspace = storage.scylla_keyspace.as_str();
    let nodes = storage.scylla_nodes.as_str();
    run_ddl(
        session,
        &schema::create_keyspace_cql(
            keyspace,
            storage.scylla_replication_factor,
            &storage.scylla_datacenter,
        ),
    )
    .await
    .map_err(|e| open_error(nodes, e))?;
    let qualified = schema::SCHEMA_VERSION_TABLE.replacen(
        "schema_version",
        &format!("{keyspace}.schema_version"),
        1,
    );
    run_ddl(session, &qualified)
        .await
        .map_err(|e| open_error(nodes, e))?;
    run_ddl(session, &qualify(migration_lock::LOCK_TABLE, keyspace))
        .await
        .map_err(|e| open_error(nodes, e))?;
    let lock = migration_lock::MigrationLock::acquire(session, keyspace, wait).await?;
    let migrated = apply_migrations(session, keyspace, nodes, &lock).await;
    let released = lock.release(session).await;
    let version = migrated?;
    released?;
    Ok(version)
}

/// The migrations `keyspace` lacks (read under the lock: another migrator may have
/// applied them while this one waited), renewing the lock after each.
async fn apply_migrations(
    session: &Session,
    keyspace: &str,
    nodes: &str,
    lock: &migration_lock::MigrationLock,
) -> std::result::Result<u32, OpenError> {
    let current = schema_version(session, keyspace).await?;
    check_version(keyspace, current, true)?;
    for (i, statements) in schema::MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as u32 + 1;
        for cql in *statements {
            if let Some((table, columns)) = schema::alter_add(cql) {
                add_missing_columns(session, keyspace, &table, &columns).await?;
                continue;
            }
            let cql = qualify(cql, keyspace);
            run_ddl(session, &cql)
                .await
                .map_err(|e| open_error(nodes, e))?;
        }
        session
            .query_unpaged(
                format!(
                    "INSERT INTO {keyspace}.schema_version (version, applied_at_ms) VALUES (?, ?)"
                ),
                (version as i32, now_ms()),
            )
            .await
            .map_err(|e| open_error(nodes, e))?;
        tracing::info!(keyspace, schema_version = version, "history store migrated");
        lock.renew(session).await?;
    }
    Ok(schema::latest_version())
}

/// Add those of `columns` (name, definition) that `table` lacks, in one statement.
async fn add_missing_columns(
    session: &Session,
    keyspace: &str,
    table: &str,
    columns: &[(String, String)],
) -> std::result::Result<(), OpenError> {
    let nodes = "the cluster";
    let existing: HashSet<String> = session
        .query_unpaged(
            "SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ?",
            (keyspace, table),
        )
        .await
        .map_err(|e| open_error(nodes, e))?
        .into_rows_result()
        .map_err(|e| OpenError::Other(e.to_string()))?
        .rows::<(String,)>()
        .map_err(|e| OpenError::Other(e.to_string()))?
        .filter_map(|r| r.ok().map(|(c,)| c))
        .collect();
    let missing: Vec<&str> = columns
        .iter()
        .filter(|(name, _)| !existing.contains(name))
        .map(|(_, def)| def.as_str())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let cql = format!(
        "ALTER TABLE {keyspace}.{table} ADD ({})",
        missing.join(", ")
    );
    run_ddl(session, &cql)
        .await
        .map_err(|e| open_error(nodes, e))
}

/// Prefix the table of a `CREATE TABLE IF NOT EXISTS <table>` with the keyspace.
fn qualify(cql: &str, keyspace: &str) -> String {
    const PREFIX: &str = "CREATE TABLE IF NOT EXISTS ";
    match cql.find(PREFIX) {
        Some(at) => {
            let split = at + PREFIX.len();
            format!("{}{keyspace}.{}", &cql[..split], &cql[split..])
        }
        None => cql.to_owned(),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The gRPC-facing class of a driver error: `unavailable` for anything that may pass
/// (timeouts, lost connections, overloaded or missing replicas), `internal` for a
/// statement the server refuses.
fn classify(e: &ExecutionError) -> StorageError {
    use ::scylla::errors::DbError;
    let transient = match e {
        ExecutionError::BadQuery(_) | ExecutionError::PrepareError(_) => false,
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(db, _)) => !matches!(
            db,
            DbError::SyntaxError
                | DbError::Invalid
                | DbError::AlreadyExists { .. }
                | DbError::Unauthorized
                | DbError::ConfigError
                | DbError::ProtocolError
                | DbError::FunctionFailure { .. }
                | DbError::AuthenticationError
        ),
        ExecutionError::LastAttemptError(
            RequestAttemptError::SerializationError(_)
            | RequestAttemptError::CqlRequestSerialization(_)
            | RequestAttemptError::CqlResultParseError(_),
        ) => false,
        _ => true,
    };
    if transient {
        StorageError::Unavailable(format!("cql: {e}"))
    } else {
        StorageError::Internal(format!("cql: {e}"))
    }
}

/// [`classify`] for the errors of multi-page reads.
fn classify_request(e: &RequestError) -> StorageError {
    match e {
        RequestError::LastAttemptError(attempt) => {
            classify(&ExecutionError::LastAttemptError(attempt.clone()))
        }
        other => StorageError::Unavailable(format!("cql: {other}")),
    }
}

fn classify_pager(e: &PagerExecutionError) -> StorageError {
    match e {
        PagerExecutionError::NextPageError(NextPageError::RequestFailure(r)) => classify_request(r),
        other => StorageError::Internal(format!("cql: {other}")),
    }
}

/// A lightweight transaction's answer: whether it applied, and the current values
/// (by column) when it did not.
fn lwt_outcome(
    result: QueryResult,
) -> std::result::Result<(bool, HashMap<String, CqlValue>), String> {
    let rows = result.into_rows_result().map_err(|e| e.to_string())?;
    let names: Vec<String> = rows
        .column_specs()
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    let row = rows
        .maybe_first_row::<Row>()
        .map_err(|e| e.to_string())?
        .ok_or("the conditional write returned no row")?;
    let mut applied = false;
    let mut current = HashMap::new();
    for (name, value) in names.into_iter().zip(row.columns) {
        if name == "[applied]" {
            applied = matches!(value, Some(CqlValue::Boolean(true)));
        } else if let Some(value) = value {
            current.insert(name, value);
        }
    }
    Ok((applied, current))
}

fn decode_error(e: impl std::fmt::Display) -> StorageError {
    StorageError::Internal(format!("cql result: {e}"))
}

fn seq_i64(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn bucket_of(seq: u64) -> i64 {
    seq_i64(seq / BUCKET_SIZE)
}

fn direct_key(members: &[String]) -> String {
    let mut pair: Vec<&str> = members.iter().map(String::as_str).collect();
    pair.sort_unstable();
    pair.join(&PAIR_SEPARATOR.to_string())
}

/// Write timestamp of member rows written for `members_version` (creation is 0).
fn member_timestamp(members_version: i64) -> i64 {
    members_version + 1
}

/// A membership change committed to the conversation row, replayed onto the member
/// tables until `applied_members_version` reaches its version.
#[derive(Clone, PartialEq, prost::Message)]
struct PendingMembers {
    #[prost(int64, tag = "1")]
    version: i64,
    #[prost(bool, tag = "2")]
    add: bool,
    /// Only users whose membership actually changes.
    #[prost(string, repeated, tag = "3")]
    user_ids: Vec<String>,
    #[prost(int64, tag = "4")]
    at_ms: i64,
    /// A system event's change (when `user_ids` is empty): members written with
    /// their role and join time, members removed, ban list changes.
    #[prost(message, repeated, tag = "5")]
    upserts: Vec<PendingMember>,
    #[prost(string, repeated, tag = "6")]
    removes: Vec<String>,
    #[prost(string, repeated, tag = "7")]
    banned: Vec<String>,
    #[prost(string, repeated, tag = "8")]
    unbanned: Vec<String>,
    /// Sequence of the system event (0 for a membership change).
    #[prost(int64, tag = "9")]
    seq: i64,
}

/// A member row written by a system event.
#[derive(Clone, PartialEq, Eq, prost::Message)]
struct PendingMember {
    #[prost(string, tag = "1")]
    user_id: String,
    #[prost(string, tag = "2")]
    role: String,
    #[prost(int64, tag = "3")]
    joined_at_ms: i64,
}

/// The outcome of a conditional statement: whether it applied and, when it did not,
/// the current values the server sent back (absent when the row does not exist).
struct Lwt {
    applied: bool,
    current: HashMap<String, CqlValue>,
}

impl Lwt {
    fn text(&self, column: &str) -> Option<String> {
        match self.current.get(column) {
            Some(CqlValue::Text(s)) | Some(CqlValue::Ascii(s)) => Some(s.clone()),
            _ => None,
        }
    }

    fn bigint(&self, column: &str) -> Option<i64> {
        match self.current.get(column) {
            Some(CqlValue::BigInt(v)) => Some(*v),
            _ => None,
        }
    }
}

/// The conversation row as most operations need it.
struct ConvRow {
    kind: String,
    name: String,
    owner_id: String,
    created_at_ms: i64,
    updated_at_ms: i64,
    last_seq: i64,
    members_version: i64,
    member_count: i32,
    applied_members_version: i64,
    pending_members: Option<Vec<u8>>,
    topic: String,
    /// Sequence of the last system event committed to the membership (0 = none).
    members_seq: i64,
}

type ConvTuple = (
    String,
    Option<String>,
    Option<String>,
    i64,
    i64,
    i64,
    i64,
    i32,
    i64,
    Option<Vec<u8>>,
    Option<String>,
    Option<i64>,
);

impl ConvRow {
    fn from_tuple(t: ConvTuple) -> Self {
        ConvRow {
            kind: t.0,
            name: t.1.unwrap_or_default(),
            owner_id: t.2.unwrap_or_default(),
            created_at_ms: t.3,
            updated_at_ms: t.4,
            last_seq: t.5,
            members_version: t.6,
            member_count: t.7,
            applied_members_version: t.8,
            pending_members: t.9,
            topic: t.10.unwrap_or_default(),
            members_seq: t.11.unwrap_or(0),
        }
    }

    fn conversation(&self, id: &str, members: Vec<String>) -> Conversation {
        Conversation {
            conversation_id: id.to_owned(),
            kind: self.kind.clone(),
            name: self.name.clone(),
            owner_id: self.owner_id.clone(),
            members,
            last_seq: self.last_seq.max(0) as u64,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            topic: self.topic.clone(),
            ..Default::default()
        }
    }
}

/// A `messages` row: the stored event plus its current state.
#[derive(::scylla::DeserializeRow)]
#[scylla(crate = ::scylla)]
struct MessageRow {
    conversation_id: String,
    seq: i64,
    // Optional like every non-key column: a row is read whatever wrote it.
    message_id: Option<String>,
    sender_id: Option<String>,
    sender_device: Option<String>,
    client_msg_id: Option<String>,
    body: Option<String>,
    content_type: Option<String>,
    sent_at_ms: Option<i64>,
    kind: Option<String>,
    target_seq: Option<i64>,
    reply_to_seq: Option<i64>,
    thread_root_seq: Option<i64>,
    mentions: Option<Vec<String>>,
    emoji: Option<String>,
    reaction_remove: Option<bool>,
    system_event: Option<Vec<u8>>,
    from_bot: Option<bool>,
    edited_at_ms: Option<i64>,
    deleted: Option<bool>,
    reply_count: Option<i32>,
    reply_last_seq: Option<i64>,
    edit_seqs: Option<Vec<i64>>,
}

fn seq_u64(seq: Option<i64>) -> u64 {
    seq.unwrap_or(0).max(0) as u64
}

impl MessageRow {
    fn is_message(&self) -> bool {
        kinds::is_message(self.kind.as_deref().unwrap_or_default())
    }

    fn is_deleted(&self) -> bool {
        self.deleted.unwrap_or(false)
    }

    /// The event in its current state (reactions are added by the reader).
    fn into_message(self) -> Result<Message> {
        let system = match &self.system_event {
            Some(blob) if !blob.is_empty() => {
                Some(SystemEvent::decode(blob.as_slice()).map_err(decode_error)?)
            }
            _ => None,
        };
        Ok(Message {
            conversation_id: self.conversation_id,
            seq: self.seq.max(0) as u64,
            message_id: self.message_id.unwrap_or_default(),
            sender_id: self.sender_id.unwrap_or_default(),
            sender_device: self.sender_device.unwrap_or_default(),
            client_msg_id: self.client_msg_id.unwrap_or_default(),
            body: self.body.unwrap_or_default(),
            content_type: self.content_type.unwrap_or_default(),
            sent_at_ms: self.sent_at_ms.unwrap_or(0),
            kind: self.kind.unwrap_or_default(),
            target_seq: seq_u64(self.target_seq),
            reply_to_seq: seq_u64(self.reply_to_seq),
            thread_root_seq: seq_u64(self.thread_root_seq),
            mentions: self.mentions.unwrap_or_default(),
            emoji: self.emoji.unwrap_or_default(),
            remove: self.reaction_remove.unwrap_or(false),
            system,
            from_bot: self.from_bot.unwrap_or(false),
            edited_at_ms: self.edited_at_ms.unwrap_or(0),
            deleted: self.deleted.unwrap_or(false),
            reactions: Vec::new(),
            reply_count: u32::try_from(self.reply_count.unwrap_or(0).max(0)).unwrap_or(0),
        })
    }
}

const CONV_COLUMNS: &str = "kind, name, owner_id, created_at_ms, updated_at_ms, last_seq, \
     members_version, member_count, applied_members_version, pending_members, topic, members_seq";
const MESSAGE_COLUMNS: &str = "conversation_id, seq, message_id, sender_id, sender_device, \
     client_msg_id, body, content_type, sent_at_ms, kind, target_seq, reply_to_seq, \
     thread_root_seq, mentions, emoji, reaction_remove, system_event, from_bot, edited_at_ms, \
     deleted, reply_count, reply_last_seq, edit_seqs";

/// Every statement, prepared once.
struct Statements {
    conv_insert: PreparedStatement,
    conv_select: PreparedStatement,
    conv_select_serial: PreparedStatement,
    conv_last_seq: PreparedStatement,
    conv_last_seq_serial: PreparedStatement,
    conv_commit_members: PreparedStatement,
    conv_members_applied: PreparedStatement,
    member_insert: PreparedStatement,
    member_delete: PreparedStatement,
    member_select: PreparedStatement,
    members_among: PreparedStatement,
    members_all: PreparedStatement,
    user_conv_insert: PreparedStatement,
    user_conv_delete: PreparedStatement,
    user_convs: PreparedStatement,
    msg_select: PreparedStatement,
    msg_after: PreparedStatement,
    msg_upto: PreparedStatement,
    pair_insert: PreparedStatement,
    dedupe_select: PreparedStatement,
    marker_select: PreparedStatement,
    marker_insert: PreparedStatement,
    marker_raise: PreparedStatement,
}

impl Statements {
    async fn prepare(
        session: &Session,
        ks: &str,
    ) -> std::result::Result<Statements, ExecutionError> {
        // `idempotent`: safe for the driver to retry (reads, plain upserts, deletes).
        let prep = |cql: String, idempotent: bool, serial_read: bool| async move {
            let mut st = session.prepare(cql).await?;
            st.set_is_idempotent(idempotent);
            if serial_read {
                st.set_consistency(Consistency::LocalSerial);
            }
            Ok::<_, ExecutionError>(st)
        };
        let conv_select_cql =
            format!("SELECT {CONV_COLUMNS} FROM {ks}.conversations WHERE conversation_id = ?");
        let last_seq_cql = format!(
            "SELECT last_seq, pending_seq, pending_message FROM {ks}.conversations WHERE conversation_id = ?"
        );
        Ok(Statements {
            conv_insert: prep(
                format!(
                    "INSERT INTO {ks}.conversations (conversation_id, kind, name, owner_id, \
                     created_at_ms, updated_at_ms, last_seq, members_version, member_count, \
                     applied_members_version) VALUES (?, ?, ?, ?, ?, ?, 0, 0, ?, 0) IF NOT EXISTS"
                ),
                false,
                false,
            )
            .await?,
            conv_select: prep(conv_select_cql.clone(), true, false).await?,
            conv_select_serial: prep(conv_select_cql, true, true).await?,
            conv_last_seq: prep(
                format!("SELECT last_seq FROM {ks}.conversations WHERE conversation_id = ?"),
                true,
                false,
            )
            .await?,
            conv_last_seq_serial: prep(last_seq_cql, true, true).await?,
            conv_commit_members: prep(
                format!(
                    "UPDATE {ks}.conversations SET members_version = ?, member_count = ?, \
                     pending_members = ?, updated_at_ms = ? WHERE conversation_id = ? \
                     IF members_version = ?"
                ),
                false,
                false,
            )
            .await?,
            conv_members_applied: prep(
                format!(
                    "UPDATE {ks}.conversations SET applied_members_version = ? \
                     WHERE conversation_id = ? IF applied_members_version < ?"
                ),
                false,
                false,
            )
            .await?,
            member_insert: prep(
                format!(
                    "INSERT INTO {ks}.members_by_conversation (conversation_id, user_id, role, \
                     joined_at_ms) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
                ),
                true,
                false,
            )
            .await?,
            member_delete: prep(
                format!(
                    "DELETE FROM {ks}.members_by_conversation USING TIMESTAMP ? \
                     WHERE conversation_id = ? AND user_id = ?"
                ),
                true,
                false,
            )
            .await?,
            member_select: prep(
                format!(
                    "SELECT user_id FROM {ks}.members_by_conversation \
                     WHERE conversation_id = ? AND user_id = ?"
                ),
                true,
                false,
            )
            .await?,
            members_among: prep(
                format!(
                    "SELECT user_id FROM {ks}.members_by_conversation \
                     WHERE conversation_id = ? AND user_id IN ?"
                ),
                true,
                false,
            )
            .await?,
            members_all: {
                let mut st = prep(
                    format!(
                        "SELECT user_id FROM {ks}.members_by_conversation WHERE conversation_id = ?"
                    ),
                    true,
                    false,
                )
                .await?;
                st.set_page_size(PAGE_SIZE);
                st
            },
            user_conv_insert: prep(
                format!(
                    "INSERT INTO {ks}.conversations_by_user (user_id, conversation_id, joined_at_ms) \
                     VALUES (?, ?, ?) USING TIMESTAMP ?"
                ),
                true,
                false,
            )
            .await?,
            user_conv_delete: prep(
                format!(
                    "DELETE FROM {ks}.conversations_by_user USING TIMESTAMP ? \
                     WHERE user_id = ? AND conversation_id = ?"
                ),
                true,
                false,
            )
            .await?,
            user_convs: {
                let mut st = prep(
                    format!(
                        "SELECT conversation_id FROM {ks}.conversations_by_user WHERE user_id = ?"
                    ),
                    true,
                    false,
                )
                .await?;
                st.set_page_size(PAGE_SIZE);
                st
            },
            msg_select: prep(
                format!(
                    "SELECT {MESSAGE_COLUMNS} FROM {ks}.messages \
                     WHERE conversation_id = ? AND bucket = ? AND seq = ?"
                ),
                true,
                false,
            )
            .await?,
            msg_after: prep(
                format!(
                    "SELECT {MESSAGE_COLUMNS} FROM {ks}.messages \
                     WHERE conversation_id = ? AND bucket = ? AND seq > ? \
                     ORDER BY seq ASC LIMIT ?"
                ),
                true,
                false,
            )
            .await?,
            msg_upto: prep(
                format!(
                    "SELECT {MESSAGE_COLUMNS} FROM {ks}.messages \
                     WHERE conversation_id = ? AND bucket = ? AND seq <= ? \
                     ORDER BY seq DESC LIMIT ?"
                ),
                true,
                false,
            )
            .await?,
            pair_insert: prep(
                format!(
                    "INSERT INTO {ks}.direct_pairs (pair_key, conversation_id, creator_id, \
                     other_id, created_at_ms) VALUES (?, ?, ?, ?, ?) IF NOT EXISTS"
                ),
                false,
                false,
            )
            .await?,
            dedupe_select: prep(
                format!(
                    "SELECT conversation_id, seq, created_at_ms FROM {ks}.dedupe_keys \
                     WHERE sender_id = ? AND client_msg_id = ?"
                ),
                true,
                false,
            )
            .await?,
            marker_select: prep(
                format!(
                    "SELECT seq, at_ms FROM {ks}.read_markers \
                     WHERE conversation_id = ? AND user_id = ?"
                ),
                true,
                false,
            )
            .await?,
            marker_insert: prep(
                format!(
                    "INSERT INTO {ks}.read_markers (conversation_id, user_id, seq, at_ms) \
                     VALUES (?, ?, ?, ?) IF NOT EXISTS"
                ),
                false,
                false,
            )
            .await?,
            marker_raise: prep(
                format!(
                    "UPDATE {ks}.read_markers SET seq = ?, at_ms = ? \
                     WHERE conversation_id = ? AND user_id = ? IF seq < ?"
                ),
                false,
                false,
            )
            .await?,
        })
    }
}

/// What claiming a dedupe key found.
impl ScyllaStore {
    async fn exec(&self, st: &PreparedStatement, values: impl SerializeRow) -> Result<QueryResult> {
        self.session
            .execute_unpaged(st, values)
            .await
            .map_err(|e| classify(&e))
    }

    async fn rows<T>(&self, st: &PreparedStatement, values: impl SerializeRow) -> Result<Vec<T>>
    where
        T: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        let result = self.exec(st, values).await?;
        let rows = result.into_rows_result().map_err(decode_error)?;
        let out = rows
            .rows::<T>()
            .map_err(decode_error)?
            .collect::<std::result::Result<Vec<T>, _>>()
            .map_err(decode_error)?;
        Ok(out)
    }

    async fn first<T>(&self, st: &PreparedStatement, values: impl SerializeRow) -> Result<Option<T>>
    where
        T: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        Ok(self.rows::<T>(st, values).await?.into_iter().next())
    }

    /// Every row of a multi-page query.
    async fn all_rows<T>(&self, st: &PreparedStatement, values: impl SerializeRow) -> Result<Vec<T>>
    where
        T: for<'f, 'm> DeserializeRow<'f, 'm> + 'static,
    {
        let pager = self
            .session
            .execute_iter(st.clone(), values)
            .await
            .map_err(|e| classify_pager(&e))?;
        pager
            .rows_stream::<T>()
            .map_err(decode_error)?
            .map_err(|e| match e {
                NextRowError::NextPageError(NextPageError::RequestFailure(r)) => {
                    classify_request(&r)
                }
                other => decode_error(other),
            })
            .try_collect()
            .await
    }

    async fn lwt(&self, st: &PreparedStatement, values: impl SerializeRow) -> Result<Lwt> {
        let result = self.exec(st, values).await?;
        let (applied, current) = lwt_outcome(result).map_err(decode_error)?;
        Ok(Lwt { applied, current })
    }

    async fn conv_row(&self, id: &str, serial: bool) -> Result<Option<ConvRow>> {
        let st = if serial {
            &self.st.conv_select_serial
        } else {
            &self.st.conv_select
        };
        Ok(self
            .first::<ConvTuple>(st, (id,))
            .await?
            .map(ConvRow::from_tuple))
    }

    async fn members_of(&self, id: &str) -> Result<Vec<String>> {
        let mut members: Vec<String> = self
            .all_rows::<(String,)>(&self.st.members_all, (id,))
            .await?
            .into_iter()
            .map(|(u,)| u)
            .collect();
        members.sort_unstable();
        Ok(members)
    }

    async fn member_exists(&self, id: &str, user: &str) -> Result<bool> {
        Ok(self
            .first::<(String,)>(&self.st.member_select, (id, user))
            .await?
            .is_some())
    }

    /// Which of `users` are members of `id`.
    async fn members_among(&self, id: &str, users: &[String]) -> Result<HashSet<String>> {
        let mut found = HashSet::new();
        for group in users.chunks(IN_CHUNK * FANOUT) {
            let probes = group
                .chunks(IN_CHUNK)
                .map(|chunk| self.rows::<(String,)>(&self.st.members_among, (id, chunk.to_vec())));
            for rows in futures::future::try_join_all(probes).await? {
                found.extend(rows.into_iter().map(|(u,)| u));
            }
        }
        Ok(found)
    }

    /// Write (or delete) the member rows of `users` on both sides, at `timestamp`.
    async fn write_members(
        &self,
        id: &str,
        users: &[(String, &'static str)],
        add: bool,
        at_ms: i64,
        timestamp: i64,
    ) -> Result<()> {
        for group in users.chunks(FANOUT) {
            let writes = group
                .iter()
                .map(|(user, role)| self.write_member(id, user, role, add, at_ms, timestamp));
            futures::future::try_join_all(writes).await?;
        }
        Ok(())
    }

    /// Both rows of one membership (both idempotent at a fixed timestamp).
    async fn write_member(
        &self,
        id: &str,
        user: &str,
        role: &str,
        add: bool,
        at_ms: i64,
        timestamp: i64,
    ) -> Result<()> {
        if add {
            let by_conversation =
                self.exec(&self.st.member_insert, (id, user, role, at_ms, timestamp));
            let by_user = self.exec(&self.st.user_conv_insert, (user, id, at_ms, timestamp));
            tokio::try_join!(by_conversation, by_user)?;
        } else {
            let by_conversation = self.exec(&self.st.member_delete, (timestamp, id, user));
            let by_user = self.exec(&self.st.user_conv_delete, (timestamp, user, id));
            tokio::try_join!(by_conversation, by_user)?;
        }
        Ok(())
    }

    /// Finish a committed membership change that the member tables do not show yet.
    async fn roll_forward_members(&self, id: &str, row: &ConvRow) -> Result<()> {
        if row.applied_members_version >= row.members_version {
            return Ok(());
        }
        let Some(blob) = &row.pending_members else {
            return Err(StorageError::Internal(format!(
                "conversation {id}: members version {} without its change",
                row.members_version
            )));
        };
        let pending = PendingMembers::decode(blob.as_slice()).map_err(decode_error)?;
        if pending.version != row.members_version {
            return Err(StorageError::Internal(format!(
                "conversation {id}: pending change {} under members version {}",
                pending.version, row.members_version
            )));
        }
        let timestamp = member_timestamp(pending.version);
        let users: Vec<(String, &'static str)> = pending
            .user_ids
            .iter()
            .map(|u| (u.clone(), ROLE_MEMBER))
            .collect();
        self.write_members(id, &users, pending.add, pending.at_ms, timestamp)
            .await?;
        for group in pending.upserts.chunks(FANOUT) {
            let writes = group.iter().map(|m| {
                self.write_member(id, &m.user_id, &m.role, true, m.joined_at_ms, timestamp)
            });
            futures::future::try_join_all(writes).await?;
        }
        for group in pending.removes.chunks(FANOUT) {
            let writes = group
                .iter()
                .map(|u| self.write_member(id, u, "", false, pending.at_ms, timestamp));
            futures::future::try_join_all(writes).await?;
        }
        if pending.seq > 0 {
            // What sync tells a user who was away: the event that took them out,
            // until they are added again (same timestamp: idempotent, ordered).
            for group in pending.removes.chunks(FANOUT) {
                let writes = group.iter().map(|u| {
                    self.exec(
                        &self.xt.departure_insert,
                        (u.as_str(), id, pending.seq, timestamp),
                    )
                });
                futures::future::try_join_all(writes).await?;
            }
            for group in pending.upserts.chunks(FANOUT) {
                let writes = group.iter().map(|m| {
                    self.exec(
                        &self.xt.departure_delete,
                        (timestamp, m.user_id.as_str(), id),
                    )
                });
                futures::future::try_join_all(writes).await?;
            }
        }
        for group in pending.banned.chunks(FANOUT) {
            let writes = group.iter().map(|u| {
                self.exec(
                    &self.xt.ban_insert,
                    (id, u.as_str(), pending.at_ms, timestamp),
                )
            });
            futures::future::try_join_all(writes).await?;
        }
        for group in pending.unbanned.chunks(FANOUT) {
            let writes = group
                .iter()
                .map(|u| self.exec(&self.xt.ban_delete, (timestamp, id, u.as_str())));
            futures::future::try_join_all(writes).await?;
        }
        self.lwt(
            &self.st.conv_members_applied,
            (pending.version, id, pending.version),
        )
        .await?;
        tracing::debug!(conversation_id = %id, members_version = pending.version, "membership change applied");
        Ok(())
    }

    async fn load_row(&self, id: &str, seq: u64) -> Result<Option<MessageRow>> {
        self.first::<MessageRow>(&self.st.msg_select, (id, bucket_of(seq), seq_i64(seq)))
            .await
    }

    async fn load_message(&self, id: &str, seq: u64) -> Result<Option<Message>> {
        self.load_row(id, seq)
            .await?
            .map(MessageRow::into_message)
            .transpose()
    }

    /// Whether `m` (an edit) targets a message that is deleted already. Decided
    /// before the commit, so that the committed copy (what a roll-forward writes)
    /// is already the one without text.
    async fn edits_a_deleted_message(&self, m: &Message) -> Result<bool> {
        if m.target_seq == 0 || m.target_seq >= m.seq {
            return Ok(false);
        }
        Ok(self
            .load_row(&m.conversation_id, m.target_seq)
            .await?
            .is_some_and(|t| t.is_deleted()))
    }

    /// Roll a committed event forward: its effects, then its own row. The row comes
    /// last, so a stored row means its effects are in place (a retry that finds the
    /// row answers "duplicate" without applying anything again). Every step is
    /// idempotent: running it again after a crash anywhere in between is safe.
    async fn roll_forward(&self, m: &Message, now_ms: i64) -> Result<()> {
        self.apply_effects(m, now_ms).await?;
        self.add_sender(&m.conversation_id, &m.sender_id).await?;
        self.write_message(m).await
    }

    /// Messages with `seq > after`, ascending, at most `want`, walking buckets upwards.
    async fn messages_after(&self, id: &str, after: u64, want: usize) -> Result<Vec<Message>> {
        let mut out: Vec<Message> = Vec::with_capacity(want.min(256));
        let mut bucket = after.saturating_add(1) / BUCKET_SIZE;
        loop {
            let limit = i32::try_from(want - out.len()).unwrap_or(i32::MAX);
            let rows = self
                .rows::<MessageRow>(
                    &self.st.msg_after,
                    (id, seq_i64(bucket), seq_i64(after), limit),
                )
                .await?;
            let last = rows.last().map(|r| r.seq);
            for row in rows {
                out.push(row.into_message()?);
            }
            let bucket_end = seq_i64((bucket + 1) * BUCKET_SIZE - 1);
            // Sequences are gapless: a bucket read short of its end is where data ends.
            if out.len() >= want || last != Some(bucket_end) {
                return Ok(out);
            }
            bucket += 1;
        }
    }

    /// Messages with `seq <= upper`, newest first, at most `want`, walking buckets down.
    async fn messages_upto(&self, id: &str, upper: u64, want: usize) -> Result<Vec<Message>> {
        let mut out: Vec<Message> = Vec::with_capacity(want.min(256));
        let mut bucket = upper / BUCKET_SIZE;
        loop {
            let limit = i32::try_from(want - out.len()).unwrap_or(i32::MAX);
            let rows = self
                .rows::<MessageRow>(
                    &self.st.msg_upto,
                    (id, seq_i64(bucket), seq_i64(upper), limit),
                )
                .await?;
            let lowest = rows.last().map(|r| r.seq);
            for row in rows {
                out.push(row.into_message()?);
            }
            if out.len() >= want || bucket == 0 || lowest != Some(seq_i64(bucket * BUCKET_SIZE)) {
                return Ok(out);
            }
            bucket -= 1;
        }
    }

    /// `last_seq` and, for a conversation last appended to by an earlier version of
    /// this store (a conditional commit that carried the message), the committed
    /// message at `last_seq`; read serially so that such a commit is settled first.
    async fn committed(&self, id: &str) -> Result<Option<(u64, Option<Message>)>> {
        let row = self
            .first::<(i64, Option<i64>, Option<Vec<u8>>)>(&self.st.conv_last_seq_serial, (id,))
            .await?;
        let Some((last, pending_seq, pending)) = row else {
            return Ok(None);
        };
        let last = last.max(0) as u64;
        let pending = match (pending_seq, pending) {
            (Some(pseq), Some(blob)) if pseq == seq_i64(last) && last > 0 => {
                Some(Message::decode(blob.as_slice()).map_err(decode_error)?)
            }
            _ => None,
        };
        Ok(Some((last, pending)))
    }

    /// All conversation rows of a user (without members), most recently updated first.
    async fn user_conversations(&self, user_id: &str) -> Result<Vec<(String, ConvRow)>> {
        let ids: Vec<String> = self
            .all_rows::<(String,)>(&self.st.user_convs, (user_id,))
            .await?
            .into_iter()
            .map(|(id,)| id)
            .collect();
        let mut rows: Vec<(String, ConvRow)> = Vec::with_capacity(ids.len());
        for group in ids.chunks(FANOUT) {
            let reads = group.iter().map(|id| self.conv_row(id, false));
            let found = futures::future::try_join_all(reads).await?;
            // A member row without its conversation is an interrupted creation: skipped.
            rows.extend(
                group
                    .iter()
                    .zip(found)
                    .filter_map(|(id, row)| row.map(|row| (id.clone(), row))),
            );
        }
        rows.sort_by(|a, b| {
            b.1.updated_at_ms
                .cmp(&a.1.updated_at_ms)
                .then_with(|| a.0.cmp(&b.0))
        });
        Ok(rows)
    }

    /// One conversation of a sync: with members, its messages after `cursor` (at most
    /// `limit`) and whether more remain.
    async fn sync_one(
        &self,
        id: &str,
        row: &ConvRow,
        user_id: &str,
        cursor: u64,
        limit: usize,
    ) -> Result<(Conversation, Vec<Message>, bool)> {
        self.roll_forward_members(id, row).await?;
        let mut conv = row.conversation(id, Vec::new());
        let (mut messages, (), fields) = tokio::try_join!(
            self.messages_after(id, cursor, limit + 1),
            self.fill_members(&mut conv),
            self.user_fields(id, row, user_id),
        )?;
        fields.apply(&mut conv);
        let truncated = messages.len() > limit;
        messages.truncate(limit);
        self.fill_reactions(id, &mut messages).await?;
        Ok((conv, messages, truncated))
    }

    async fn create_direct(&self, new: NewConversation) -> Result<Conversation> {
        let other = new
            .members
            .iter()
            .find(|m| **m != new.creator_id)
            .cloned()
            .ok_or_else(|| StorageError::Internal("direct conversation without a peer".into()))?;
        let pair = direct_key(&new.members);
        let claim = self
            .lwt(
                &self.st.pair_insert,
                (
                    pair.as_str(),
                    new.conversation_id.as_str(),
                    new.creator_id.as_str(),
                    other.as_str(),
                    new.now_ms,
                ),
            )
            .await?;
        let (id, creator, other, created) = if claim.applied {
            (new.conversation_id, new.creator_id, other, new.now_ms)
        } else {
            let existing = (
                claim.text("conversation_id"),
                claim.text("creator_id"),
                claim.text("other_id"),
                claim.bigint("created_at_ms"),
            );
            let (Some(id), Some(creator), Some(other), Some(created)) = existing else {
                return Err(StorageError::Unavailable(
                    "direct pair changed while being read; try again".into(),
                ));
            };
            if self.conv_row(&id, false).await?.is_some() {
                return self.get_conversation(&id).await;
            }
            (id, creator, other, created)
        };
        // Members first, then the conversation row: it is never visible without them.
        let users = vec![(creator, ROLE_MEMBER), (other, ROLE_MEMBER)];
        self.write_members(&id, &users, true, created, member_timestamp(0))
            .await?;
        self.lwt(
            &self.st.conv_insert,
            (
                id.as_str(),
                ConversationKind::Direct.as_str(),
                "",
                "",
                created,
                created,
                2i32,
            ),
        )
        .await?;
        self.get_conversation(&id).await
    }

    async fn create_group(&self, new: NewConversation) -> Result<Conversation> {
        let id = new.conversation_id.as_str();
        let users: Vec<(String, &'static str)> = new
            .members
            .iter()
            .map(|u| {
                let role = if *u == new.creator_id {
                    ROLE_OWNER
                } else {
                    ROLE_MEMBER
                };
                (u.clone(), role)
            })
            .collect();
        self.write_members(id, &users, true, new.now_ms, member_timestamp(0))
            .await?;
        let count = i32::try_from(new.members.len()).unwrap_or(i32::MAX);
        let created = self
            .lwt(
                &self.st.conv_insert,
                (
                    id,
                    ConversationKind::Group.as_str(),
                    new.name.as_str(),
                    new.creator_id.as_str(),
                    new.now_ms,
                    new.now_ms,
                    count,
                ),
            )
            .await?;
        if !created.applied {
            return Err(StorageError::Internal(format!(
                "conversation id {id} already taken"
            )));
        }
        let mut members = new.members;
        members.sort_unstable();
        Ok(Conversation {
            conversation_id: new.conversation_id,
            kind: ConversationKind::Group.as_str().to_owned(),
            name: new.name,
            owner_id: new.creator_id,
            members,
            last_seq: 0,
            created_at_ms: new.now_ms,
            updated_at_ms: new.now_ms,
            ..Default::default()
        })
    }
}

#[async_trait]
impl HistoryStore for ScyllaStore {
    async fn create_conversation(&self, new: NewConversation) -> Result<Conversation> {
        // The cap is read before the creation, not with it: requests of one user
        // racing each other may pass it by as many as run at once.
        let created = self
            .first::<(i64,)>(&self.xt.creator_count, (new.creator_id.as_str(),))
            .await?
            .map_or(0, |(n,)| n.max(0) as u64);
        if let Err(refused) = rules::created_cap(created, new.max_created) {
            // An existing direct pair is still returned.
            if new.kind == ConversationKind::Direct {
                let pair = direct_key(&new.members);
                if let Some((id,)) = self
                    .first::<(String,)>(&self.xt.pair_conversation, (pair.as_str(),))
                    .await?
                {
                    if self.conv_row(&id, false).await?.is_some() {
                        return self.get_conversation(&id).await;
                    }
                }
            }
            return Err(refused);
        }
        let (creator, fresh_id) = (new.creator_id.clone(), new.conversation_id.clone());
        let conv = match new.kind {
            ConversationKind::Direct => self.create_direct(new).await?,
            ConversationKind::Group => self.create_group(new).await?,
        };
        if conv.conversation_id == fresh_id {
            self.exec(
                &self.xt.creator_insert,
                (creator.as_str(), fresh_id.as_str()),
            )
            .await?;
        }
        Ok(conv)
    }

    async fn get_conversation(&self, conversation_id: &str) -> Result<Conversation> {
        let row = self
            .conv_row(conversation_id, false)
            .await?
            .ok_or_else(|| StorageError::NotFound(conversation_id.to_owned()))?;
        self.roll_forward_members(conversation_id, &row).await?;
        let mut conv = row.conversation(conversation_id, Vec::new());
        self.fill_members(&mut conv).await?;
        Ok(conv)
    }

    async fn is_member(&self, conversation_id: &str, user_id: &str) -> Result<bool> {
        self.member_exists(conversation_id, user_id).await
    }

    async fn change_members(&self, change: MemberChange) -> Result<Conversation> {
        let id = change.conversation_id.as_str();
        for _ in 0..MAX_LWT_ATTEMPTS {
            let row = self
                .conv_row(id, true)
                .await?
                .ok_or_else(|| StorageError::NotFound(id.to_owned()))?;
            let kind = ConversationKind::parse(&row.kind).ok_or_else(|| {
                StorageError::Internal(format!("conversation {id} has kind {}", row.kind))
            })?;
            self.roll_forward_members(id, &row).await?;
            let actor_is_member = self.member_exists(id, &change.actor_id).await?;
            rules::authorize_member_change(
                id,
                kind,
                &row.owner_id,
                &change.actor_id,
                actor_is_member,
                change.action,
                &change.user_ids,
            )?;
            let present = self.members_among(id, &change.user_ids).await?;
            let add = change.action == MemberAction::Add;
            let delta: Vec<String> = change
                .user_ids
                .iter()
                .filter(|u| present.contains(*u) != add)
                .cloned()
                .collect();
            if delta.is_empty() {
                return self.get_conversation(id).await;
            }
            let count = usize::try_from(row.member_count.max(0)).unwrap_or(0);
            let new_count = if add {
                rules::check_member_count(count + delta.len())?;
                count + delta.len()
            } else {
                count.saturating_sub(delta.len())
            };
            let version = row.members_version + 1;
            let pending = PendingMembers {
                version,
                add,
                user_ids: delta,
                at_ms: change.now_ms,
                ..Default::default()
            };
            let committed = self
                .lwt(
                    &self.st.conv_commit_members,
                    (
                        version,
                        i32::try_from(new_count).unwrap_or(i32::MAX),
                        pending.encode_to_vec(),
                        change.now_ms,
                        id,
                        row.members_version,
                    ),
                )
                .await?;
            if !committed.applied {
                continue; // another change got in first: check again
            }
            let applied = ConvRow {
                members_version: version,
                applied_members_version: row.members_version,
                pending_members: Some(pending.encode_to_vec()),
                ..row
            };
            self.roll_forward_members(id, &applied).await?;
            return self.get_conversation(id).await;
        }
        Err(StorageError::Unavailable(format!(
            "membership of {id} keeps changing; try again"
        )))
    }

    async fn list_conversations(&self, user_id: &str) -> Result<Vec<Conversation>> {
        let rows = self.user_conversations(user_id).await?;
        let mut out = Vec::with_capacity(rows.len());
        for group in rows.chunks(FANOUT) {
            let fields = group
                .iter()
                .map(|(id, row)| self.user_fields(id, row, user_id));
            let fields = futures::future::try_join_all(fields).await?;
            for ((id, row), fields) in group.iter().zip(fields) {
                let mut conv = row.conversation(id, Vec::new());
                fields.apply(&mut conv);
                out.push(conv);
            }
        }
        Ok(out)
    }

    async fn last_seq(&self, conversation_id: &str) -> Result<u64> {
        let (last, pending) = self
            .committed(conversation_id)
            .await?
            .ok_or_else(|| StorageError::NotFound(conversation_id.to_owned()))?;
        if let Some(pending) = pending {
            // Committed by an earlier version of this store and maybe never written:
            // the partition owner continues from here, so store it first.
            if self.load_row(conversation_id, last).await?.is_none() {
                self.roll_forward(&pending, now_ms()).await?;
            }
        }
        // Rows written after the head by an append that stopped before its head.
        self.settle_head(conversation_id, last).await
    }

    async fn append_batch(
        &self,
        messages: Vec<Message>,
        first_seq: u64,
        dedupe_since_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<Appended>> {
        let window_ms = now_ms.saturating_sub(dedupe_since_ms);
        self.append_events(messages, first_seq, window_ms, now_ms)
            .await
    }

    async fn append(
        &self,
        message: Message,
        dedupe_since_ms: i64,
        now_ms: i64,
    ) -> Result<Appended> {
        let (id, seq) = (message.conversation_id.clone(), message.seq);
        let window_ms = now_ms.saturating_sub(dedupe_since_ms);
        self.append_events(vec![message], seq, window_ms, now_ms)
            .await?
            .pop()
            .ok_or_else(|| StorageError::Internal(format!("append to {id} answered nothing")))
    }

    async fn lookup_dedupe(
        &self,
        sender_id: &str,
        client_msg_id: &str,
        since_ms: i64,
    ) -> Result<Option<Message>> {
        self.lookup_key(sender_id, client_msg_id, since_ms).await
    }

    async fn history_page(&self, query: &PageQuery) -> Result<HistoryResult> {
        let id = query.conversation_id.as_str();
        let limit = query.limit as usize;
        let (messages, has_more) = match query.direction {
            Direction::Forward => {
                let mut rows = self.messages_after(id, query.from_seq, limit + 1).await?;
                let more = rows.len() > limit;
                rows.truncate(limit);
                (rows, more)
            }
            Direction::Backward => {
                let last = self
                    .first::<(i64,)>(&self.st.conv_last_seq, (id,))
                    .await?
                    .map(|(l,)| l.max(0) as u64)
                    .unwrap_or(0);
                let upper = if query.from_seq == 0 {
                    last
                } else {
                    (query.from_seq - 1).min(last)
                };
                if upper == 0 {
                    (Vec::new(), false)
                } else {
                    let mut rows = self.messages_upto(id, upper, limit + 1).await?;
                    let more = rows.len() > limit;
                    rows.truncate(limit);
                    rows.reverse();
                    (rows, more)
                }
            }
        };
        let mut messages = messages;
        self.fill_reactions(id, &mut messages).await?;
        Ok(HistoryResult {
            conversation_id: query.conversation_id.clone(),
            messages,
            has_more,
        })
    }

    async fn sync(
        &self,
        user_id: &str,
        cursors: &HashMap<String, u64>,
        limit: u32,
    ) -> Result<SyncResult> {
        let convs = self.user_conversations(user_id).await?;
        let member_of: HashSet<String> = convs.iter().map(|(id, _)| id.clone()).collect();
        let wanted: Vec<(String, ConvRow, u64)> = convs
            .into_iter()
            .filter_map(|(id, row)| {
                let cursor = cursors.get(&id).copied();
                let last = row.last_seq.max(0) as u64;
                match cursor {
                    Some(c) if last <= c => None,
                    _ => Some((id, row, cursor.unwrap_or(0))),
                }
            })
            .collect();
        let limit = limit as usize;
        let mut result = SyncResult::default();
        for group in wanted.chunks(FANOUT) {
            let parts = group
                .iter()
                .map(|(id, row, cursor)| self.sync_one(id, row, user_id, *cursor, limit));
            for (conv, messages, truncated) in futures::future::try_join_all(parts).await? {
                if truncated {
                    result.truncated.push(conv.conversation_id.clone());
                }
                result.messages.extend(messages);
                result.conversations.push(conv);
            }
        }
        // Conversations the client knows and the user is no longer in.
        let gone: Vec<(&String, u64)> = cursors
            .iter()
            .filter(|(id, _)| !member_of.contains(id.as_str()))
            .map(|(id, c)| (id, *c))
            .collect();
        for group in gone.chunks(FANOUT) {
            let found = group.iter().map(|(id, cursor)| async move {
                let departed = self
                    .first::<(i64,)>(&self.xt.departure_select, (user_id, id.as_str()))
                    .await?;
                match departed {
                    Some((seq,)) if seq.max(0) as u64 > *cursor => {
                        self.load_message(id, seq.max(0) as u64).await
                    }
                    _ => Ok(None),
                }
            });
            for removal in futures::future::try_join_all(found).await? {
                result.removals.extend(removal);
            }
        }
        Ok(result)
    }

    async fn set_read_marker(
        &self,
        conversation_id: &str,
        user_id: &str,
        seq: u64,
        now_ms: i64,
    ) -> Result<ReadMarker> {
        let id = conversation_id;
        let (last, is_member) = tokio::try_join!(
            self.first::<(i64,)>(&self.st.conv_last_seq, (id,)),
            self.member_exists(id, user_id)
        )?;
        let last = last.ok_or_else(|| StorageError::NotFound(id.to_owned()))?.0;
        if !is_member {
            return Err(StorageError::not_member(id, user_id));
        }
        let wanted = seq_i64(seq).min(last.max(0));
        let marker = |seq: i64, at_ms: i64| ReadMarker {
            conversation_id: id.to_owned(),
            user_id: user_id.to_owned(),
            seq: seq.max(0) as u64,
            at_ms,
            kind: "read".to_owned(),
        };
        for _ in 0..MAX_LWT_ATTEMPTS {
            let stored = self
                .first::<(i64, i64)>(&self.st.marker_select, (id, user_id))
                .await?;
            match stored {
                Some((stored_seq, at_ms)) if stored_seq >= wanted => {
                    return Ok(marker(stored_seq, at_ms))
                }
                Some(_) => {
                    let raised = self
                        .lwt(&self.st.marker_raise, (wanted, now_ms, id, user_id, wanted))
                        .await?;
                    if raised.applied {
                        return Ok(marker(wanted, now_ms));
                    }
                }
                None => {
                    let inserted = self
                        .lwt(&self.st.marker_insert, (id, user_id, wanted, now_ms))
                        .await?;
                    if inserted.applied {
                        return Ok(marker(wanted, now_ms));
                    }
                }
            }
            // Moved by someone else meanwhile: read it again.
        }
        Err(StorageError::Unavailable(format!(
            "read marker of {user_id} keeps changing; try again"
        )))
    }

    async fn set_delivered_marker(
        &self,
        conversation_id: &str,
        user_id: &str,
        seq: u64,
        now_ms: i64,
    ) -> Result<ReadMarker> {
        self.delivered_marker(conversation_id, user_id, seq, now_ms)
            .await
    }

    async fn message_at(&self, conversation_id: &str, seq: u64) -> Result<Option<Message>> {
        if seq == 0 {
            return Ok(None);
        }
        self.load_message(conversation_id, seq).await
    }

    async fn banned_among(
        &self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> Result<Vec<String>> {
        self.banned(conversation_id, user_ids).await
    }

    async fn my_reactions(
        &self,
        conversation_id: &str,
        user_id: &str,
        from_seq: u64,
        to_seq: u64,
    ) -> Result<Vec<(u64, String)>> {
        self.reactions_of_user(conversation_id, user_id, from_seq, to_seq)
            .await
    }

    async fn thread_page(&self, query: &ThreadQuery) -> Result<ThreadPage> {
        self.thread(query).await
    }

    async fn receipts(&self, conversation_id: &str) -> Result<Vec<MemberReceipt>> {
        self.member_receipts(conversation_id).await
    }

    async fn set_notification(
        &self,
        user_id: &str,
        conversation_id: &str,
        until_ms: i64,
    ) -> Result<()> {
        self.store_notification(user_id, conversation_id, until_ms)
            .await
    }

    async fn dnd_until(&self, user_id: &str) -> Result<i64> {
        self.dnd(user_id).await
    }

    async fn notification_state(&self, conversation_id: &str) -> Result<Vec<MemberNotification>> {
        self.notification_states(conversation_id).await
    }

    async fn shared_contacts(&self, user_id: &str, other_ids: &[String]) -> Result<Vec<String>> {
        self.shared(user_id, other_ids).await
    }

    async fn put_webhook(&self, webhook: NewWebhook) -> Result<Webhook> {
        self.add_webhook(webhook).await
    }

    async fn list_webhooks(&self, conversation_id: Option<&str>) -> Result<Vec<Webhook>> {
        self.webhooks(conversation_id).await
    }

    async fn delete_webhook(&self, conversation_id: &str, webhook_id: &str) -> Result<()> {
        self.remove_webhook(conversation_id, webhook_id).await
    }

    async fn advance_webhook(
        &self,
        conversation_id: &str,
        webhook_id: &str,
        delivered_seq: u64,
    ) -> Result<Webhook> {
        self.raise_webhook(conversation_id, webhook_id, delivered_seq)
            .await
    }

    /// Nothing to delete: a key expires by its TTL (the window plus how late it was
    /// written), and a key older than the window answers nothing before that.
    async fn purge_dedupe(&self, _before_ms: i64, _max_rows: u32) -> Result<u64> {
        Ok(0)
    }

    fn dedupe_keys_expire_by_themselves(&self) -> bool {
        true
    }
}
