//! Appends on CQL without a lightweight transaction per event.
//!
//! The routing partition owner is the only sequencer of a conversation, and what it
//! writes is a function of the event log: every record carries its `message_id`,
//! `sent_at_ms` and content, the owner reads its conversation's records in offset
//! order, and every value an append writes is computed from the record and from the
//! stored state of the log prefix before it. Two owners of one partition at once (a
//! former owner paused past its session, then resumed) therefore write the same
//! rows at the same sequences, and every write carries a timestamp derived from the
//! event's sequence ([`event_ts`]), so whatever order their writes land in, a cell
//! ends with the value of the latest event that wrote it. No compare-and-set is
//! needed on the hot path; the argument and its limits are in docs/architecture.md
//! ("Sequencing on CQL").
//!
//! One batch of events of conversation `c` from `first_seq`:
//! 1. *Read* in parallel: each distinct dedupe key (a key names a stored message of
//!    the same sender and client id, created at or after the event's
//!    `sent_at_ms - window`: a decision that depends on the record, not on the clock
//!    of whoever processes it), the stored `(seq, message_id)` from `first_seq - 1`
//!    on, and for `first_seq = 1` the conversation row.
//! 2. *Plan* in order: a known key is a duplicate (it takes no sequence), unless the
//!    message it names is this very record already placed at the sequence the plan
//!    gives it (another writer, or an earlier attempt, got there first); else the
//!    event takes the next sequence. `first_seq - 1` must be stored and every stored
//!    row in the planned range must be the planned record (`SequenceConflict`,
//!    nothing written): a safety net against a second sequencer that is not
//!    replaying the same log.
//! 3. *Keys first*: the dedupe keys (`USING TIMESTAMP` the event's `sent_at_ms` in
//!    microseconds, `USING TTL` the window plus how late the write is: they expire
//!    by themselves), so that a stored row always has its key (a retry finds it);
//!    the senders set at the same time.
//! 4. *Rows in order*: consecutive events without effects go into one unlogged batch
//!    per `messages` partition (atomic within the partition); an event with effects
//!    (edit, delete, reaction, thread reply, system event) first writes the rows
//!    before it, then its effects, and its row joins the next batch. A stored row
//!    therefore means its effects and every row before it are in place: the stored
//!    rows of a conversation are always a gapless prefix.
//! 5. *Head*: `last_seq` (`USING TIMESTAMP event_ts(last)`: it never moves back) and
//!    `updated_at_ms` in one single-partition batch. The head may lag the rows after
//!    a crash; `LastSeq` reads the rows above it ([`ScyllaStore::stored_head`]).

use std::collections::{HashMap, HashSet};

use ::scylla::client::session::Session;
use ::scylla::errors::ExecutionError;
use ::scylla::statement::batch::{Batch, BatchType};
use ::scylla::statement::prepared::PreparedStatement;
use switchboard_proto::Message;

use super::{bucket_of, classify, seq_i64, ScyllaStore, BUCKET_SIZE, FANOUT};
use crate::error::{Result, StorageError};
use crate::store::{kinds, Appended};

/// Write timestamps of event-derived cells: `TS_BASE + seq`. Above every wall-clock
/// timestamp in microseconds until the year 2112, so rows and effects written by
/// earlier versions (default timestamps) always lose to the events that follow.
pub(super) const TS_BASE: i64 = 1 << 52;

/// The write timestamp of everything event `seq` writes.
pub(super) fn event_ts(seq: u64) -> i64 {
    TS_BASE.saturating_add(seq_i64(seq))
}

/// The write timestamp of a dedupe key: its event's `sent_at_ms` in microseconds.
fn key_ts(m: &Message) -> i64 {
    m.sent_at_ms.saturating_mul(1000)
}

/// Statements of the append path.
pub(super) struct AppendStatements {
    msg_insert: PreparedStatement,
    ids_from: PreparedStatement,
    top_of_bucket: PreparedStatement,
    key_insert: PreparedStatement,
    head: PreparedStatement,
    touched: PreparedStatement,
}

impl AppendStatements {
    pub(super) async fn prepare(
        session: &Session,
        ks: &str,
    ) -> std::result::Result<AppendStatements, ExecutionError> {
        let prep = |cql: String| async move {
            let mut st = session.prepare(cql).await?;
            // Every statement here is a read or writes a value fixed by the event
            // with a fixed timestamp: the driver may retry it.
            st.set_is_idempotent(true);
            Ok::<_, ExecutionError>(st)
        };
        Ok(AppendStatements {
            msg_insert: prep(format!(
                "INSERT INTO {ks}.messages (conversation_id, bucket, seq, message_id, \
                 sender_id, sender_device, client_msg_id, body, content_type, sent_at_ms, \
                 kind, target_seq, reply_to_seq, thread_root_seq, mentions, emoji, \
                 reaction_remove, system_event, from_bot) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 USING TIMESTAMP ?"
            ))
            .await?,
            ids_from: prep(format!(
                "SELECT seq, message_id FROM {ks}.messages WHERE conversation_id = ? \
                 AND bucket = ? AND seq >= ? ORDER BY seq ASC LIMIT ?"
            ))
            .await?,
            top_of_bucket: prep(format!(
                "SELECT seq FROM {ks}.messages WHERE conversation_id = ? AND bucket = ? LIMIT 1"
            ))
            .await?,
            key_insert: prep(format!(
                "INSERT INTO {ks}.dedupe_keys (sender_id, client_msg_id, conversation_id, \
                 seq, created_at_ms) VALUES (?, ?, ?, ?, ?) USING TTL ? AND TIMESTAMP ?"
            ))
            .await?,
            head: prep(format!(
                "UPDATE {ks}.conversations USING TIMESTAMP ? SET last_seq = ? \
                 WHERE conversation_id = ?"
            ))
            .await?,
            touched: prep(format!(
                "UPDATE {ks}.conversations USING TIMESTAMP ? SET updated_at_ms = ? \
                 WHERE conversation_id = ?"
            ))
            .await?,
        })
    }
}

/// The values of `msg_insert`: every stored field of an event, none of its state,
/// and the write timestamp.
#[derive(::scylla::SerializeRow)]
#[scylla(crate = ::scylla, flavor = "enforce_order", skip_name_checks)]
struct MessageInsert<'a> {
    conversation_id: &'a str,
    bucket: i64,
    seq: i64,
    message_id: &'a str,
    sender_id: &'a str,
    sender_device: &'a str,
    client_msg_id: &'a str,
    body: &'a str,
    content_type: &'a str,
    sent_at_ms: i64,
    kind: &'a str,
    target_seq: i64,
    reply_to_seq: i64,
    thread_root_seq: i64,
    mentions: &'a [String],
    emoji: &'a str,
    reaction_remove: bool,
    system_event: Option<Vec<u8>>,
    from_bot: bool,
    timestamp: i64,
}

impl<'a> MessageInsert<'a> {
    fn of(m: &'a Message) -> MessageInsert<'a> {
        use prost::Message as _;
        MessageInsert {
            conversation_id: &m.conversation_id,
            bucket: bucket_of(m.seq),
            seq: seq_i64(m.seq),
            message_id: &m.message_id,
            sender_id: &m.sender_id,
            sender_device: &m.sender_device,
            client_msg_id: &m.client_msg_id,
            body: &m.body,
            content_type: &m.content_type,
            sent_at_ms: m.sent_at_ms,
            kind: &m.kind,
            target_seq: seq_i64(m.target_seq),
            reply_to_seq: seq_i64(m.reply_to_seq),
            thread_root_seq: seq_i64(m.thread_root_seq),
            mentions: &m.mentions,
            emoji: &m.emoji,
            reaction_remove: m.remove,
            system_event: m.system.as_ref().map(|e| e.encode_to_vec()),
            from_bot: m.from_bot,
            timestamp: event_ts(m.seq),
        }
    }
}

/// What the plan decided for one event of a batch.
enum Planned {
    /// Known key: the stored message answers; nothing is written.
    Duplicate(Message),
    /// This record, already stored at its sequence: nothing is written.
    Placed(Message),
    /// To store at `message.seq`.
    New(Message),
    /// A repeat of the batch's event at this index (same key).
    RepeatOf(usize),
}

/// Whether an event changes state beyond its own row.
fn has_effects(m: &Message) -> bool {
    match m.kind.as_str() {
        kinds::EDIT | kinds::DELETE | kinds::REACTION | kinds::SYSTEM => true,
        kind => kinds::is_message(kind) && m.thread_root_seq > 0,
    }
}

/// The events of `plan` to store, in order.
fn new_rows(plan: &[Planned]) -> Vec<&Message> {
    plan.iter()
        .filter_map(|p| match p {
            Planned::New(m) => Some(m),
            _ => None,
        })
        .collect()
}

impl ScyllaStore {
    /// See the module documentation. `window_ms` is the dedupe window.
    pub(super) async fn append_events(
        &self,
        messages: Vec<Message>,
        first_seq: u64,
        window_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<Appended>> {
        let Some(id) = messages.first().map(|m| m.conversation_id.clone()) else {
            return Ok(Vec::new());
        };
        if first_seq == 0 {
            return Err(StorageError::InvalidRequest("seq starts at 1".into()));
        }
        // 1. Reads.
        let mut distinct: Vec<&Message> = Vec::new();
        let mut seen: HashSet<(&str, &str)> = HashSet::new();
        for m in &messages {
            if !m.client_msg_id.is_empty()
                && seen.insert((m.sender_id.as_str(), m.client_msg_id.as_str()))
            {
                distinct.push(m);
            }
        }
        let keys = async {
            let mut found: Vec<((String, String), Option<Message>)> = Vec::new();
            for group in distinct.chunks(FANOUT) {
                let lookups = group.iter().map(|m| {
                    let since = m.sent_at_ms.saturating_sub(window_ms);
                    self.lookup_key(&m.sender_id, &m.client_msg_id, since)
                });
                let answers = futures::future::try_join_all(lookups).await?;
                for (m, known) in group.iter().zip(answers) {
                    found.push(((m.sender_id.clone(), m.client_msg_id.clone()), known));
                }
            }
            Ok::<_, StorageError>(found)
        };
        let from = first_seq.saturating_sub(1).max(1);
        let stored = self.stored_ids(&id, from, messages.len() + 1);
        let exists = async {
            if first_seq == 1 {
                Ok::<bool, StorageError>(self.head_row(&id).await?.is_some())
            } else {
                Ok(true)
            }
        };
        let (keys, stored, exists) = tokio::try_join!(keys, stored, exists)?;
        let known: HashMap<(String, String), Option<Message>> = keys.into_iter().collect();
        if !exists {
            return Err(StorageError::NotFound(id));
        }
        let stored: HashMap<u64, String> = stored.into_iter().collect();
        if first_seq > 1 && !stored.contains_key(&(first_seq - 1)) {
            return Err(self.conflict(&id, first_seq).await);
        }

        // 2. Plan.
        let mut plan: Vec<Planned> = Vec::with_capacity(messages.len());
        let mut in_batch: HashMap<(String, String), usize> = HashMap::new();
        let mut next = first_seq;
        for mut m in messages {
            m.seq = next;
            let key = (!m.client_msg_id.is_empty())
                .then(|| (m.sender_id.clone(), m.client_msg_id.clone()));
            if let Some(key) = &key {
                if let Some(&i) = in_batch.get(key) {
                    plan.push(Planned::RepeatOf(i));
                    continue;
                }
                if let Some(Some(found)) = known.get(key) {
                    let placed = found.conversation_id == m.conversation_id && found.seq >= next;
                    if !placed {
                        in_batch.insert(key.clone(), plan.len());
                        plan.push(Planned::Duplicate(found.clone()));
                        continue;
                    }
                    if found.seq != next || found.message_id != m.message_id {
                        // The key names a later sequence than this record can take:
                        // another sequencer that does not replay the same log.
                        return Err(self.conflict(&id, first_seq).await);
                    }
                }
            }
            match stored.get(&next) {
                Some(message_id) if *message_id != m.message_id => {
                    return Err(self.conflict(&id, first_seq).await);
                }
                Some(_) => {
                    let placed = self.load_message(&id, next).await?.ok_or_else(|| {
                        StorageError::Unavailable(format!("{id} seq {next} moved; try again"))
                    })?;
                    if let Some(key) = key {
                        in_batch.insert(key, plan.len());
                    }
                    plan.push(Planned::Placed(placed));
                }
                None => {
                    // The current-state fields start empty: effects of later events
                    // fill them.
                    m.edited_at_ms = 0;
                    m.deleted = false;
                    m.reactions.clear();
                    m.reply_count = 0;
                    if let Some(key) = key {
                        in_batch.insert(key, plan.len());
                    }
                    plan.push(Planned::New(m));
                }
            }
            next += 1;
        }

        // 3. Keys and the senders, before any row.
        let window_secs = i32::try_from((window_ms.max(1) + 999) / 1000).unwrap_or(i32::MAX);
        let mut senders: Vec<&str> = Vec::new();
        let key_writes = plan.iter().filter_map(|p| match p {
            Planned::New(m) => {
                if !senders.contains(&m.sender_id.as_str()) {
                    senders.push(m.sender_id.as_str());
                }
                (!m.client_msg_id.is_empty()).then_some(m)
            }
            _ => None,
        });
        let key_writes: Vec<&Message> = key_writes.collect();
        let keys_written = async {
            for group in key_writes.chunks(FANOUT) {
                let writes = group.iter().map(|m| self.write_key(m, window_secs, now_ms));
                futures::future::try_join_all(writes).await?;
            }
            Ok::<_, StorageError>(())
        };
        // The senders set (shared contacts) has no order with the rows.
        let senders_written = async {
            for group in senders.chunks(FANOUT) {
                let writes = group.iter().map(|s| self.add_sender(&id, s));
                futures::future::try_join_all(writes).await?;
            }
            Ok::<_, StorageError>(())
        };
        tokio::try_join!(keys_written, senders_written)?;

        // 4. Effects and rows, in order: the rows since the last event with effects
        // go out before that event's effects.
        let mut pending = 0;
        for i in 0..plan.len() {
            if !matches!(&plan[i], Planned::New(m) if has_effects(m)) {
                continue;
            }
            self.write_rows(&new_rows(&plan[pending..i])).await?;
            pending = i;
            let Planned::New(m) = &mut plan[i] else {
                continue;
            };
            if m.kind == kinds::EDIT && self.edits_a_deleted_message(m).await? {
                // A late edit of a deleted message is stored without its text.
                m.body.clear();
                m.content_type.clear();
            }
            self.apply_effects(m, now_ms).await?;
        }
        self.write_rows(&new_rows(&plan[pending..])).await?;

        // 5. Head.
        if let Some(last) = new_rows(&plan).last() {
            self.write_head(&id, last.seq, last.sent_at_ms).await?;
        }

        let mut out: Vec<Appended> = Vec::with_capacity(plan.len());
        for planned in plan {
            let appended = match planned {
                Planned::Duplicate(message) => Appended {
                    message,
                    duplicate: true,
                },
                Planned::Placed(message) | Planned::New(message) => Appended {
                    message,
                    duplicate: false,
                },
                Planned::RepeatOf(j) => Appended {
                    message: out[j].message.clone(),
                    duplicate: true,
                },
            };
            out.push(appended);
        }
        Ok(out)
    }

    /// The error for a batch that cannot start at `got`, naming the real next one.
    async fn conflict(&self, id: &str, got: u64) -> StorageError {
        match self.head_row(id).await {
            Ok(Some(last)) => match self.stored_head(id, last).await {
                Ok(head) => StorageError::SequenceConflict {
                    conversation_id: id.to_owned(),
                    expected: head + 1,
                    got,
                },
                Err(e) => e,
            },
            Ok(None) => StorageError::NotFound(id.to_owned()),
            Err(e) => e,
        }
    }

    /// The stored message a dedupe key names, if the key was created at or after
    /// `since_ms` and the message is stored under the same sender and client id.
    pub(super) async fn lookup_key(
        &self,
        sender_id: &str,
        client_msg_id: &str,
        since_ms: i64,
    ) -> Result<Option<Message>> {
        let key = self
            .first::<(String, i64, i64)>(&self.st.dedupe_select, (sender_id, client_msg_id))
            .await?;
        let Some((conv, seq, created)) = key else {
            return Ok(None);
        };
        if created < since_ms {
            return Ok(None);
        }
        // A key whose append has not stored its row (yet, or ever) answers nothing.
        Ok(self
            .load_message(&conv, seq.max(0) as u64)
            .await?
            .filter(|m| m.sender_id == sender_id && m.client_msg_id == client_msg_id))
    }

    pub(super) async fn write_key(&self, m: &Message, window_secs: i32, now_ms: i64) -> Result<()> {
        // Lives for the window after its event, plus how late this write is.
        let late_secs =
            i32::try_from(now_ms.saturating_sub(m.sent_at_ms).max(0) / 1000).unwrap_or(i32::MAX);
        let ttl = window_secs.saturating_add(late_secs).max(1);
        let (sender, cmid) = (m.sender_id.as_str(), m.client_msg_id.as_str());
        self.exec(
            &self.at.key_insert,
            (
                sender,
                cmid,
                m.conversation_id.as_str(),
                seq_i64(m.seq),
                m.sent_at_ms,
                ttl,
                key_ts(m),
            ),
        )
        .await?;
        Ok(())
    }

    /// Rows of consecutive events: one unlogged batch per `messages` partition,
    /// partitions in sequence order.
    pub(super) async fn write_rows(&self, rows: &[&Message]) -> Result<()> {
        let mut start = 0;
        while start < rows.len() {
            let bucket = bucket_of(rows[start].seq);
            let end = rows[start..]
                .iter()
                .position(|m| bucket_of(m.seq) != bucket)
                .map_or(rows.len(), |n| start + n);
            let values: Vec<MessageInsert<'_>> = rows[start..end]
                .iter()
                .map(|m| MessageInsert::of(m))
                .collect();
            if values.len() == 1 {
                self.exec(&self.at.msg_insert, &values[0]).await?;
            } else {
                let mut batch = Batch::new(BatchType::Unlogged);
                for _ in &values {
                    batch.append_statement(self.at.msg_insert.clone());
                }
                batch.set_is_idempotent(true);
                self.session
                    .batch(&batch, values)
                    .await
                    .map_err(|e| classify(&e))?;
            }
            start = end;
        }
        Ok(())
    }

    /// Write one event's row (also the roll-forward of an append committed by an
    /// earlier version of this store).
    pub(super) async fn write_message(&self, m: &Message) -> Result<()> {
        self.write_rows(&[m]).await
    }

    pub(super) async fn write_head(&self, id: &str, last: u64, sent_at_ms: i64) -> Result<()> {
        let mut batch = Batch::new(BatchType::Unlogged);
        batch.append_statement(self.at.head.clone());
        batch.append_statement(self.at.touched.clone());
        batch.set_is_idempotent(true);
        self.session
            .batch(
                &batch,
                (
                    (event_ts(last), seq_i64(last), id),
                    (sent_at_ms.saturating_mul(1000), sent_at_ms, id),
                ),
            )
            .await
            .map_err(|e| classify(&e))?;
        Ok(())
    }

    /// The conversation row's `last_seq` (None: unknown conversation).
    pub(super) async fn head_row(&self, id: &str) -> Result<Option<u64>> {
        Ok(self
            .first::<(i64,)>(&self.st.conv_last_seq, (id,))
            .await?
            .map(|(l,)| l.max(0) as u64))
    }

    /// The highest stored sequence at or above `from` (stored rows are a gapless
    /// prefix: the top row of the bucket above, walking up while a bucket is full).
    pub(super) async fn stored_head(&self, id: &str, from: u64) -> Result<u64> {
        let mut head = from;
        let mut bucket = (from + 1) / BUCKET_SIZE;
        loop {
            let top = self
                .first::<(i64,)>(&self.at.top_of_bucket, (id, seq_i64(bucket)))
                .await?
                .map(|(s,)| s.max(0) as u64);
            match top {
                Some(top) if top > head => {
                    head = top;
                    if top == (bucket + 1) * BUCKET_SIZE - 1 {
                        bucket += 1;
                        continue;
                    }
                    return Ok(head);
                }
                _ => return Ok(head),
            }
        }
    }

    /// Stored `(seq, message_id)` from `from` on, at most `want`, walking buckets up.
    async fn stored_ids(&self, id: &str, from: u64, want: usize) -> Result<Vec<(u64, String)>> {
        let mut out: Vec<(u64, String)> = Vec::new();
        let mut at = from;
        loop {
            let bucket = at / BUCKET_SIZE;
            let limit = i32::try_from(want - out.len()).unwrap_or(i32::MAX);
            let rows = self
                .rows::<(i64, Option<String>)>(
                    &self.at.ids_from,
                    (id, seq_i64(bucket), seq_i64(at), limit),
                )
                .await?;
            let last = rows.last().map(|(s, _)| (*s).max(0) as u64);
            out.extend(
                rows.into_iter()
                    .map(|(s, m)| (s.max(0) as u64, m.unwrap_or_default())),
            );
            let bucket_end = (bucket + 1) * BUCKET_SIZE - 1;
            if out.len() >= want || last != Some(bucket_end) {
                return Ok(out);
            }
            at = bucket_end + 1;
        }
    }

    /// Point the conversation's head at the highest stored row, if it lags (a crash
    /// between the rows and the head write).
    pub(super) async fn settle_head(&self, id: &str, last: u64) -> Result<u64> {
        let head = self.stored_head(id, last).await?;
        if head > last {
            let sent_at_ms = self
                .load_message(id, head)
                .await?
                .map_or(0, |m| m.sent_at_ms);
            self.write_head(id, head, sent_at_ms).await?;
        }
        Ok(head)
    }
}
