//! The CQL schema of the ScyllaDB/Cassandra history store and its versioned migrations.
//!
//! # Keyspace
//!
//! `storage.scylla_keyspace`, created by the first migration run with
//! `SimpleStrategy` and `storage.scylla_replication_factor`, or with
//! `NetworkTopologyStrategy {<storage.scylla_datacenter>: rf}` when a datacenter is set.
//! An existing keyspace is never altered (change its replication by hand).
//!
//! # Tables
//!
//! | table | partition key | clustering key | other columns | TTL |
//! |---|---|---|---|---|
//! | `schema_version` | `version` | | `applied_at_ms` | |
//! | `migration_lock` | `name` | | `holder`, `acquired_at_ms` (see `migration_lock`) | 120 s, renewed |
//! | `conversations` | `conversation_id` | | `kind`, `name`, `owner_id`, `created_at_ms`, `updated_at_ms`, `last_seq`, `pending_seq`, `pending_message`, `members_version`, `member_count`, `applied_members_version`, `pending_members`; since 2: `topic`, `members_seq` | |
//! | `members_by_conversation` | `conversation_id` | `user_id` | `role`, `joined_at_ms` | |
//! | `conversations_by_user` | `user_id` | `conversation_id` | `joined_at_ms` | |
//! | `messages` | `(conversation_id, bucket)` | `seq DESC` | `message_id`, `sender_id`, `sender_device`, `client_msg_id`, `body`, `content_type`, `sent_at_ms`; since 2, the event: `kind`, `target_seq`, `reply_to_seq`, `thread_root_seq`, `mentions`, `emoji`, `reaction_remove`, `system_event`, `from_bot`; and its state: `edited_at_ms`, `deleted`, `reply_count`, `reply_last_seq`, `edit_seqs` | |
//! | `direct_pairs` | `pair_key` | | `conversation_id`, `creator_id`, `other_id`, `created_at_ms` | |
//! | `dedupe_keys` | `(sender_id, client_msg_id)` | | `conversation_id`, `seq`, `created_at_ms` | dedupe window |
//! | `dedupe_keys_by_age` | `(hour, shard)` | `created_at_ms, sender_id, client_msg_id` | | dedupe window |
//! | `read_markers` | `conversation_id` | `user_id` | `seq`, `at_ms` | |
//! | `reactions` (2) | `(conversation_id, bucket)` | `target_seq, emoji, user_id` | `at_ms` | |
//! | `reactions_by_user` (2) | `(conversation_id, user_id)` | `target_seq, emoji` | | |
//! | `thread_replies` (2) | `(conversation_id, root_seq)` | `seq` | | |
//! | `delivered_markers` (2) | `conversation_id` | `user_id` | `seq`, `at_ms` | |
//! | `bans` (2) | `conversation_id` | `user_id` | `banned_at_ms` | |
//! | `mutes` (2) | `conversation_id` | `user_id` | `until_ms` | |
//! | `do_not_disturb` (2) | `user_id` | | `until_ms` | |
//! | `webhooks` (2) | `conversation_id` | `slot` | `webhook_id`, `url`, `secret`, `delivered_seq`, `created_at_ms`, `created_by` | |
//! | `webhooks_by_shard` (2) | `shard` | `conversation_id, webhook_id` | | |
//!
//! - `conversations` is the one row per conversation. Membership changes advance
//!   `members_version` with `IF members_version = v` and carry the change in
//!   `pending_members` (a protobuf `ChangeMembersRequest` holding only the users that
//!   actually change); `applied_members_version` says which change the member tables
//!   already show. `last_seq` is the head of the history, written plainly
//!   `USING TIMESTAMP` derived from the sequence (it never moves back), and
//!   `updated_at_ms` with the event's time; no conditional update reads either
//!   cell. `pending_seq` / `pending_message` are only read: an earlier version
//!   committed each append there (`IF last_seq = seq - 1`) and `LastSeq` still
//!   finishes such a commit.
//! - `members_by_conversation` and `conversations_by_user` are the two sides of
//!   membership (members of a conversation; conversations of a user). Their rows are
//!   written with `USING TIMESTAMP <members_version + 1>`, so a late write of an older
//!   change can never undo a newer one, whatever order they arrive in.
//! - `messages` partitions hold [`super::BUCKET_SIZE`] sequences each
//!   (`bucket = seq / BUCKET_SIZE`), so a partition stays bounded (about 1000 messages,
//!   well under a megabyte for chat-sized bodies) however long a conversation lives;
//!   history pages walk from one bucket to the next. Newest first on disk, since most
//!   reads are "the latest page". Rows, their state columns and the reaction and
//!   thread rows are written `USING TIMESTAMP 2^52 + seq` of the event that writes
//!   them, so the latest event wins whatever order writes land in; nothing may
//!   write these cells with a default (wall-clock) timestamp.
//! - `direct_pairs` makes a direct conversation unique per pair (`IF NOT EXISTS` on the
//!   sorted pair of user ids) and holds what is needed to finish creating it.
//! - `dedupe_keys` maps (sender, client message id) to the stored message's
//!   `(conversation_id, seq)`, written before the message's row `USING TTL` the
//!   dedupe window (plus how late the write is) and `USING TIMESTAMP` the event's
//!   time, so Cassandra/ScyllaDB deletes keys by itself. `created_at_ms` (the
//!   event's `sent_at_ms`) decides whether a key is live for a later event: against
//!   that event's own time when appending, against the service clock for lookups.
//! - `dedupe_keys_by_age` indexed dedupe keys by creation hour and one of 16 shards,
//!   for a purge of keys whose window ended before their TTL did (a service clock
//!   ahead of the database's, or a shortened window). It is no longer written or
//!   read: such a key answers nothing anyway (its `created_at_ms` is older than the
//!   window) and goes with its TTL, and the index cost a write per message and a read
//!   and two deletes per key. Its remaining rows expire by their own TTL.
//!   Both dedupe tables use `TimeWindowCompactionStrategy`: every row has the same TTL,
//!   so whole SSTables expire together.
//! - `read_markers` rise only through `IF seq < ?`.
//!
//! Since version 2 (conversation features):
//! - `messages` rows carry the whole event (the columns of `Message` up to
//!   `from_bot`; `system_event` is a protobuf `SystemEvent`) and the state that later
//!   events give a "message": the edited body and `edited_at_ms`, `deleted`,
//!   `reply_count` with `reply_last_seq` (the last reply counted, which makes the
//!   count idempotent), and `edit_seqs` (the edit events of the message, whose bodies
//!   a delete clears). Old rows read with an empty kind ("message") and no state.
//! - `reactions` sit in the partition of their target's bucket, so a history page
//!   counts the reactions of its messages with one range read per bucket it touches
//!   (usually one). `reactions_by_user` holds the same rows per (conversation, user)
//!   for the reader's own reactions (`mine`) over a range of sequences.
//! - `thread_replies` lists a thread's replies in order: a thread page is one slice
//!   of one partition, then the replies' rows by `seq IN (...)` per bucket.
//! - `delivered_markers` is the delivered marker, apart from the read marker so that
//!   both rise with their own `IF seq < ?`; the delivered marker shown is the higher
//!   of the two. Receipts read both partitions of a conversation.
//! - `bans` is the ban list, written with the member rows of the system event that
//!   changes it (same `USING TIMESTAMP`). Roles live in `members_by_conversation.role`.
//! - `mutes` are per conversation (read for one member in lists and sync, for all
//!   members by the push hook); `do_not_disturb` per user (probed with `IN` for the
//!   members of a conversation).
//! - `webhooks` of a conversation occupy slots `0..max`: a new one takes a free slot
//!   with `IF NOT EXISTS`, which enforces the per-conversation limit atomically; every
//!   write of a webhook row is conditional. `webhooks_by_shard` (16
//!   partitions by hash of the conversation) lets the
//!   dispatcher list every webhook without a scan; an index row whose webhook is gone
//!   is ignored.
//! - `ALTER TABLE ... ADD` statements are made idempotent by the runner, which adds only
//!   the columns a table lacks (CQL has no portable `ADD IF NOT EXISTS`).

/// Schema migrations, in order; migration `i` brings the schema to version `i + 1`.
/// Each is a list of CQL statements (one request each), every one idempotent
/// (`IF NOT EXISTS`) so that a migration interrupted half-way is simply run again.
/// Never edit a released migration: append a new one.
pub const MIGRATIONS: &[&[&str]] = &[
    // 1: conversations, members, messages, direct pairs, dedupe keys, read markers.
    &[
        "CREATE TABLE IF NOT EXISTS conversations (
            conversation_id         text PRIMARY KEY,
            kind                    text,
            name                    text,
            owner_id                text,
            created_at_ms           bigint,
            updated_at_ms           bigint,
            last_seq                bigint,
            pending_seq             bigint,
            pending_message         blob,
            members_version         bigint,
            member_count            int,
            applied_members_version bigint,
            pending_members         blob
        )",
        "CREATE TABLE IF NOT EXISTS members_by_conversation (
            conversation_id text,
            user_id         text,
            role            text,
            joined_at_ms    bigint,
            PRIMARY KEY ((conversation_id), user_id)
        )",
        "CREATE TABLE IF NOT EXISTS conversations_by_user (
            user_id         text,
            conversation_id text,
            joined_at_ms    bigint,
            PRIMARY KEY ((user_id), conversation_id)
        )",
        "CREATE TABLE IF NOT EXISTS messages (
            conversation_id text,
            bucket          bigint,
            seq             bigint,
            message_id      text,
            sender_id       text,
            sender_device   text,
            client_msg_id   text,
            body            text,
            content_type    text,
            sent_at_ms      bigint,
            PRIMARY KEY ((conversation_id, bucket), seq)
        ) WITH CLUSTERING ORDER BY (seq DESC)",
        "CREATE TABLE IF NOT EXISTS direct_pairs (
            pair_key        text PRIMARY KEY,
            conversation_id text,
            creator_id      text,
            other_id        text,
            created_at_ms   bigint
        )",
        "CREATE TABLE IF NOT EXISTS dedupe_keys (
            sender_id       text,
            client_msg_id   text,
            conversation_id text,
            seq             bigint,
            created_at_ms   bigint,
            PRIMARY KEY ((sender_id, client_msg_id))
        ) WITH compaction = {'class': 'TimeWindowCompactionStrategy',
                             'compaction_window_unit': 'HOURS', 'compaction_window_size': 1}",
        "CREATE TABLE IF NOT EXISTS dedupe_keys_by_age (
            hour            bigint,
            shard           int,
            created_at_ms   bigint,
            sender_id       text,
            client_msg_id   text,
            PRIMARY KEY ((hour, shard), created_at_ms, sender_id, client_msg_id)
        ) WITH compaction = {'class': 'TimeWindowCompactionStrategy',
                             'compaction_window_unit': 'HOURS', 'compaction_window_size': 1}",
        "CREATE TABLE IF NOT EXISTS read_markers (
            conversation_id text,
            user_id         text,
            seq             bigint,
            at_ms           bigint,
            PRIMARY KEY ((conversation_id), user_id)
        )",
    ],
    // 2: timeline events (edits, deletes, reactions, threads, mentions, system
    // events), roles and bans, delivered markers, notification preferences, webhooks.
    &[
        "ALTER TABLE conversations ADD (topic text, members_seq bigint)",
        "ALTER TABLE messages ADD (kind text, target_seq bigint, reply_to_seq bigint,
            thread_root_seq bigint, mentions list<text>, emoji text, reaction_remove boolean,
            system_event blob, from_bot boolean, edited_at_ms bigint, deleted boolean,
            reply_count int, reply_last_seq bigint, edit_seqs set<bigint>)",
        "CREATE TABLE IF NOT EXISTS reactions (
            conversation_id text,
            bucket          bigint,
            target_seq      bigint,
            emoji           text,
            user_id         text,
            at_ms           bigint,
            PRIMARY KEY ((conversation_id, bucket), target_seq, emoji, user_id)
        )",
        "CREATE TABLE IF NOT EXISTS reactions_by_user (
            conversation_id text,
            user_id         text,
            target_seq      bigint,
            emoji           text,
            PRIMARY KEY ((conversation_id, user_id), target_seq, emoji)
        )",
        "CREATE TABLE IF NOT EXISTS thread_replies (
            conversation_id text,
            root_seq        bigint,
            seq             bigint,
            PRIMARY KEY ((conversation_id, root_seq), seq)
        )",
        "CREATE TABLE IF NOT EXISTS delivered_markers (
            conversation_id text,
            user_id         text,
            seq             bigint,
            at_ms           bigint,
            PRIMARY KEY ((conversation_id), user_id)
        )",
        "CREATE TABLE IF NOT EXISTS bans (
            conversation_id text,
            user_id         text,
            banned_at_ms    bigint,
            PRIMARY KEY ((conversation_id), user_id)
        )",
        "CREATE TABLE IF NOT EXISTS mutes (
            conversation_id text,
            user_id         text,
            until_ms        bigint,
            PRIMARY KEY ((conversation_id), user_id)
        )",
        "CREATE TABLE IF NOT EXISTS do_not_disturb (
            user_id         text PRIMARY KEY,
            until_ms        bigint
        )",
        "CREATE TABLE IF NOT EXISTS webhooks (
            conversation_id text,
            slot            int,
            webhook_id      text,
            url             text,
            secret          text,
            delivered_seq   bigint,
            created_at_ms   bigint,
            created_by      text,
            PRIMARY KEY ((conversation_id), slot)
        )",
        "CREATE TABLE IF NOT EXISTS webhooks_by_shard (
            shard           int,
            conversation_id text,
            webhook_id      text,
            PRIMARY KEY ((shard), conversation_id, webhook_id)
        )",
    ],
    // 3: who has sent an event in each conversation (contacts for last-seen
    // privacy). Not backfilled: a pair becomes contacts again when one of them sends
    // something in a shared conversation (until then their last-seen stays hidden).
    &[
        "CREATE TABLE IF NOT EXISTS senders (
            conversation_id text,
            user_id         text,
            PRIMARY KEY ((conversation_id), user_id)
        )",
        // Conversations by creator (storage.max_conversations_created), written after
        // a conversation is created; those created before version 3 are not counted.
        "CREATE TABLE IF NOT EXISTS conversations_by_creator (
            creator_id      text,
            conversation_id text,
            PRIMARY KEY ((creator_id), conversation_id)
        )",
    ],
    // 4: the system event that took each user out of a conversation (removed,
    // banned, left), until they are added again: what sync reports to a user who
    // was away. Written by the membership roll-forward; departures before version 4
    // are not known.
    &["CREATE TABLE IF NOT EXISTS departures_by_user (
            user_id         text,
            conversation_id text,
            seq             bigint,
            PRIMARY KEY ((user_id), conversation_id)
        )"],
];

/// The columns an `ALTER TABLE <table> ADD (<column> <type>, ...)` migration statement
/// adds, as `(table, [(column, definition)])`; `None` for any other statement.
/// CQL has no portable `ADD IF NOT EXISTS`, so the migration runner adds only the
/// columns the table lacks, which makes these statements idempotent too.
pub fn alter_add(cql: &str) -> Option<(String, Vec<(String, String)>)> {
    let rest = cql.trim().strip_prefix("ALTER TABLE ")?;
    let (table, rest) = rest.split_once(' ')?;
    let list = rest
        .trim()
        .strip_prefix("ADD")?
        .trim()
        .strip_prefix('(')?
        .strip_suffix(')')?;
    let columns = list
        .split(',')
        .map(|def| {
            let def = def.split_whitespace().collect::<Vec<_>>().join(" ");
            let name = def.split(' ').next().unwrap_or_default().to_owned();
            (name, def)
        })
        .collect();
    Some((table.to_owned(), columns))
}

/// The schema version this build needs.
pub fn latest_version() -> u32 {
    MIGRATIONS.len() as u32
}

/// `CREATE KEYSPACE IF NOT EXISTS` for the configured replication.
pub fn create_keyspace_cql(keyspace: &str, replication_factor: u32, datacenter: &str) -> String {
    let replication = if datacenter.is_empty() {
        format!("{{'class': 'SimpleStrategy', 'replication_factor': {replication_factor}}}")
    } else {
        format!(
            "{{'class': 'NetworkTopologyStrategy', '{}': {replication_factor}}}",
            datacenter.replace('\'', "''")
        )
    };
    format!("CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication}")
}

/// The table that records applied migrations.
pub const SCHEMA_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_version (
    version       int PRIMARY KEY,
    applied_at_ms bigint
)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyspace_replication_follows_the_datacenter_setting() {
        assert_eq!(
            create_keyspace_cql("sb", 3, ""),
            "CREATE KEYSPACE IF NOT EXISTS sb WITH replication = \
             {'class': 'SimpleStrategy', 'replication_factor': 3}"
        );
        assert_eq!(
            create_keyspace_cql("sb", 2, "eu'1"),
            "CREATE KEYSPACE IF NOT EXISTS sb WITH replication = \
             {'class': 'NetworkTopologyStrategy', 'eu''1': 2}"
        );
    }

    #[test]
    fn every_statement_is_idempotent() {
        for migration in MIGRATIONS {
            for cql in *migration {
                assert!(
                    cql.contains("IF NOT EXISTS") || alter_add(cql).is_some(),
                    "{cql}"
                );
            }
        }
    }

    #[test]
    fn added_columns_are_read_from_alter_statements() {
        let (table, columns) =
            alter_add("ALTER TABLE messages ADD (kind text,\n   mentions list<text>, n int)")
                .unwrap();
        assert_eq!(table, "messages");
        let columns: Vec<(&str, &str)> = columns
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_str()))
            .collect();
        assert_eq!(
            columns,
            [
                ("kind", "kind text"),
                ("mentions", "mentions list<text>"),
                ("n", "n int")
            ]
        );
        assert!(alter_add("CREATE TABLE IF NOT EXISTS x (a int PRIMARY KEY)").is_none());
    }
}
