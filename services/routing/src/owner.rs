//! Partition owners: the one place a conversation's sequence is assigned.
//!
//! One task per owned partition reads the log in offset order from the committed
//! offset. The records of one poll are grouped by conversation (the record key); for
//! each conversation, storage persists all its records of the poll in one
//! `AppendBatch` call (one SQLite transaction; split only by the message size limit)
//! with sequences from the conversation's next one (cached, initialised from storage
//! `LastSeq` on first touch), retried with capped backoff forever, so no record is
//! ever skipped and the sequence stays gapless. Then each record, in offset order,
//! wakes the send waiting for it and is fanned out. A conversation's records are
//! handled strictly in offset order; the conversations of one poll proceed side by
//! side (at most [`CONCURRENT_CONVERSATIONS`] at once), so one slow conversation does
//! not hold up the rest of the partition, and a busy conversation pays one storage
//! round trip per poll, not per message. Offsets are committed only after storage has
//! persisted every record below them (a whole poll), every [`COMMIT_EVERY`] records
//! or [`COMMIT_INTERVAL`], when the partition goes idle and when the owner stops: a
//! commit is a log write of its own, so a partition with a message every few
//! milliseconds must not commit after each. A crash replays at most what came after
//! the last commit. Replaying records after a crash is safe: `AppendBatch`
//! dedupes by (sender, client_msg_id) and returns the stored message, and gateways
//! drop sequences a session already has.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use std::time::Duration;

use prost::Message as _;
use switchboard_proto::timeline::kinds;
use switchboard_proto::v1::{AppendBatchRequest, LastSeqRequest, Message};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::eventlog::LogRecord;
use crate::node::{Node, RouteMemo, Stopped};

const COMMIT_EVERY: u64 = 256;
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);
const POLL_MAX: usize = 256;
/// Most records of one conversation in one storage AppendBatch call (storage takes
/// up to 512).
const MAX_APPEND_BATCH: usize = 256;
const POLL_WAIT: Duration = Duration::from_millis(500);
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Conversations whose next sequence one owner keeps in memory. Past this the
/// cache is cleared; entries reload from storage, which holds every sequence this
/// owner assigned (the cache is only updated after storage persisted).
const MAX_CACHED_CONVERSATIONS: usize = 100_000;
/// Conversations of one polled batch persisted and fanned out at the same time.
const CONCURRENT_CONVERSATIONS: usize = 32;

/// Own the partitions the log assigns to this process until `stop`.
pub(crate) async fn supervise(node: Arc<Node>, stop: CancellationToken) {
    let mut assignment = node.log.assignment();
    let mut owners: HashMap<u32, (CancellationToken, tokio::task::JoinHandle<()>)> = HashMap::new();
    loop {
        let wanted: HashSet<u32> = assignment.borrow_and_update().iter().copied().collect();
        let revoked: Vec<u32> = owners
            .keys()
            .filter(|p| !wanted.contains(p))
            .copied()
            .collect();
        for partition in revoked {
            if let Some((token, handle)) = owners.remove(&partition) {
                token.cancel();
                let _ = handle.await;
                node.log.released(partition);
                tracing::info!(partition, "partition released");
            }
        }
        for partition in wanted {
            owners.entry(partition).or_insert_with(|| {
                let token = stop.child_token();
                let handle = tokio::spawn(run_owner(node.clone(), partition, None, token.clone()));
                (token, handle)
            });
        }
        node.metrics.partitions_owned.set(owners.len() as i64);
        tokio::select! {
            changed = assignment.changed() => {
                if changed.is_err() {
                    // The assignment can no longer change: keep what we own.
                    stop.cancelled().await;
                    break;
                }
            }
            _ = stop.cancelled() => break,
        }
    }
    for (partition, (token, handle)) in owners {
        token.cancel();
        let _ = handle.await;
        node.log.released(partition);
    }
    node.metrics.partitions_owned.set(0);
}

/// Own one partition: sequence, persist and fan out its records from `start` (or
/// the committed offset) until `stop`, then commit and return.
pub(crate) async fn run_owner(
    node: Arc<Node>,
    partition: u32,
    start: Option<u64>,
    stop: CancellationToken,
) {
    let owner = Owner {
        node,
        partition,
        seqs: Mutex::new(HashMap::new()),
        stop,
    };
    let Ok(mut position) = owner.start_position(start).await else {
        return;
    };
    tracing::info!(partition, offset = position, "partition owner started");
    let mut committed = position;
    let mut last_commit = Instant::now();
    'records: while !owner.stop.is_cancelled() {
        let polled = tokio::select! {
            r = owner.node.log.poll(partition, position, POLL_MAX, POLL_WAIT) => r,
            _ = owner.stop.cancelled() => break,
        };
        let records = match polled {
            Ok(records) => records,
            Err(e) => {
                tracing::warn!(partition, error = %e, "event log read failed");
                if owner.sleep(BACKOFF_START * 4).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let idle = records.is_empty();
        if let Some(end) = records.last().map(|r| r.offset + 1) {
            if owner.stop.is_cancelled() || owner.process_batch(records).await.is_err() {
                break 'records;
            }
            position = end;
            if position - committed >= COMMIT_EVERY || last_commit.elapsed() >= COMMIT_INTERVAL {
                owner.commit(position, &mut committed).await;
                last_commit = Instant::now();
            }
        }
        if idle && position > committed {
            owner.commit(position, &mut committed).await;
            last_commit = Instant::now();
        }
    }
    if position > committed {
        owner.commit(position, &mut committed).await;
    }
    tracing::info!(partition, offset = position, "partition owner stopped");
}

struct Owner {
    node: Arc<Node>,
    partition: u32,
    /// Last assigned sequence per conversation of this partition. A std mutex: only
    /// lookups and inserts, never held across an await; a conversation's entry is
    /// only touched by the one task handling that conversation's records.
    seqs: Mutex<HashMap<String, u64>>,
    stop: CancellationToken,
}

impl Owner {
    async fn start_position(&self, start: Option<u64>) -> Result<u64, Stopped> {
        if let Some(offset) = start {
            return Ok(offset);
        }
        let mut backoff = BACKOFF_START;
        loop {
            match self.node.log.committed(self.partition).await {
                Ok(offset) => return Ok(offset),
                Err(e) => {
                    tracing::warn!(partition = self.partition, error = %e, "cannot read committed offset");
                    self.sleep(backoff).await?;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    async fn sleep(&self, d: Duration) -> Result<(), Stopped> {
        tokio::select! {
            _ = tokio::time::sleep(d) => Ok(()),
            _ = self.stop.cancelled() => Err(Stopped),
        }
    }

    async fn commit(&self, position: u64, committed: &mut u64) {
        match self.node.log.commit(self.partition, position).await {
            Ok(()) => *committed = position,
            // Not fatal: the next commit covers it; a crash before it only replays.
            Err(e) => {
                tracing::warn!(partition = self.partition, offset = position, error = %e, "commit failed")
            }
        }
    }

    /// Process one polled batch: its records grouped by conversation (the record key),
    /// each group in offset order, groups side by side. Returns once every record is
    /// persisted and fanned out, or `Stopped` (then nothing after the last commit is
    /// counted as done, and those records are replayed by the next owner).
    async fn process_batch(&self, records: Vec<LogRecord>) -> Result<(), Stopped> {
        let mut index: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut groups: Vec<Vec<LogRecord>> = Vec::new();
        for record in records {
            match index.get(&record.key) {
                Some(&i) => groups[i].push(record),
                None => {
                    index.insert(record.key.clone(), groups.len());
                    groups.push(vec![record]);
                }
            }
        }
        let results: Vec<Result<(), Stopped>> = futures::stream::iter(groups)
            .map(|group| self.process_conversation(group))
            .buffer_unordered(CONCURRENT_CONVERSATIONS)
            .collect()
            .await;
        results.into_iter().collect()
    }

    fn cached_seq(&self, conversation_id: &str) -> Option<u64> {
        self.seqs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(conversation_id)
            .copied()
    }

    fn cache_seq(&self, conversation_id: &str, seq: Option<u64>) {
        let mut seqs = self.seqs.lock().unwrap_or_else(|p| p.into_inner());
        match seq {
            Some(seq) => {
                if seqs.len() >= MAX_CACHED_CONVERSATIONS && !seqs.contains_key(conversation_id) {
                    seqs.clear();
                }
                seqs.insert(conversation_id.to_owned(), seq);
            }
            None => {
                seqs.remove(conversation_id);
            }
        }
    }

    /// Sequence, persist and fan out the records of one conversation (one key) of a
    /// poll, in offset order: storage persists them in as few AppendBatch calls as
    /// the message size limit allows, then each is completed and fanned out in order.
    /// Each record has a `routing.sequence` span that continues the trace of the Send
    /// that appended it (the record's `traceparent`); the storage call is a child of
    /// the first record's.
    async fn process_conversation(&self, records: Vec<LogRecord>) -> Result<(), Stopped> {
        let mut spans: Vec<tracing::Span> = Vec::with_capacity(records.len());
        let mut messages: Vec<Message> = Vec::with_capacity(records.len());
        for record in records {
            let span = tracing::info_span!(
                parent: None,
                "routing.sequence",
                otel.kind = "consumer",
                service = "routing",
                partition = self.partition,
                offset = record.offset,
                conversation_id = tracing::field::Empty,
                seq = tracing::field::Empty,
                duplicate = tracing::field::Empty,
            );
            switchboard_telemetry::set_parent(
                &span,
                switchboard_telemetry::context_from_traceparent(&record.traceparent),
            );
            match Message::decode(record.value.as_slice()) {
                Ok(m) if !m.conversation_id.is_empty() => {
                    span.record("conversation_id", m.conversation_id.as_str());
                    spans.push(span);
                    messages.push(m);
                }
                other => {
                    // Only this service writes records; this is corruption, and no
                    // retry can make it a message.
                    tracing::error!(
                        partition = self.partition,
                        offset = record.offset,
                        decoded = other.is_ok(),
                        "undecodable record skipped"
                    );
                }
            }
        }
        let mut start = 0;
        while start < messages.len() {
            let end = chunk_end(
                &messages[start..],
                self.node.config.cluster.max_message_bytes / 2,
            ) + start;
            let chunk = &messages[start..end];
            let stored = self.persist(chunk, &spans[start]).await?;
            let mut routes = RouteMemo::default();
            for ((span, message), (stored, duplicate)) in
                spans[start..end].iter().zip(chunk).zip(stored)
            {
                span.record("seq", stored.seq);
                span.record("duplicate", duplicate);
                self.sequenced(&message.message_id, stored, &mut routes)
                    .instrument(span.clone())
                    .await?;
            }
            start = end;
        }
        Ok(())
    }

    /// What follows persisting one record: wake its Send, and fan the message out if
    /// this record stored it (with the routes of the batch's earlier messages).
    async fn sequenced(
        &self,
        message_id: &str,
        stored: Message,
        routes: &mut RouteMemo,
    ) -> Result<(), Stopped> {
        if stored.kind == kinds::SYSTEM {
            // Storage applied the membership change with the event: the next send's
            // membership check and this event's fan-out read the new member list.
            self.node.members.invalidate(&stored.conversation_id);
        }
        // The sender is waiting for this; its other devices can be a moment later.
        self.node.waiters.complete(&stored);
        if stored.message_id != message_id {
            // A retry of a message another record stored (Send assigns a fresh id to
            // every attempt): that record fans it out, or its replay does if the
            // owner stopped first. Only the record that stored a message (first
            // time or replayed) delivers it, so a retry never delivers it again to
            // sessions that already hold it.
            return Ok(());
        }
        self.node.webhooks.wake(&stored.conversation_id);
        self.node
            .fan_out_in_batch(&stored, routes, &self.stop)
            .await
    }

    /// Have storage persist `messages` (one conversation's records, in offset
    /// order), assigning the next sequences; returns the stored message of each (the
    /// earlier one for a duplicate) and whether it was one, in order. Retried with capped backoff until it
    /// succeeds (or the owner stops), so no record is skipped and the sequence stays
    /// gapless. `first_span` is the first record's span, the parent of the calls.
    async fn persist(
        &self,
        messages: &[Message],
        first_span: &tracing::Span,
    ) -> Result<Vec<(Message, bool)>, Stopped> {
        let conversation_id = messages[0].conversation_id.clone();
        let mut stored: Vec<(Message, bool)> = Vec::with_capacity(messages.len());
        let mut backoff = BACKOFF_START;
        while stored.len() < messages.len() {
            let last = match self.cached_seq(&conversation_id) {
                Some(last) => last,
                None => self.load_last_seq(&conversation_id).await?,
            };
            let rest = messages[stored.len()..].to_vec();
            let sent = rest.len();
            let started = Instant::now();
            let mut request = tonic::Request::new(AppendBatchRequest {
                messages: rest,
                first_seq: last + 1,
            });
            first_span.in_scope(|| switchboard_telemetry::inject(&mut request));
            let reply = self
                .node
                .storage
                .append_batch(request)
                .instrument(first_span.clone())
                .await;
            self.node
                .metrics
                .storage_append_seconds
                .observe(started.elapsed().as_secs_f64());
            match reply.map(|r| r.into_inner()) {
                Ok(reply) if !reply.results.is_empty() && reply.results.len() <= sent => {
                    self.node.health.set_failing(self.partition, false);
                    self.node
                        .metrics
                        .storage_append_batch
                        .observe(reply.results.len() as f64);
                    let mut incomplete = false;
                    for result in reply.results {
                        let Some(message) = result.message else {
                            tracing::error!(conversation_id = %conversation_id, "storage append returned no message");
                            incomplete = true;
                            break;
                        };
                        if result.duplicate {
                            // A retry or a replay: it keeps its stored sequence and
                            // the conversation's sequence does not advance.
                            self.node.metrics.duplicates_sequenced.inc();
                        } else {
                            self.cache_seq(&conversation_id, Some(message.seq));
                            self.node.metrics.messages_sequenced.inc();
                            tracing::debug!(conversation_id = %conversation_id, seq = message.seq, "message sequenced");
                        }
                        stored.push((message, result.duplicate));
                    }
                    if incomplete {
                        // The rest is sent again, after a pause.
                        self.sleep(backoff).await?;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    } else {
                        backoff = BACKOFF_START;
                    }
                }
                Ok(reply) => {
                    tracing::error!(conversation_id = %conversation_id, results = reply.results.len(), sent, "storage append batch answered a wrong number of results");
                    self.cache_seq(&conversation_id, None);
                    self.sleep(backoff).await?;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Err(status) if is_sequence_conflict(&status) => {
                    // Someone else wrote this sequence: our cache is stale.
                    tracing::warn!(conversation_id = %conversation_id, seq = last + 1, "sequence conflict; reloading last sequence");
                    self.cache_seq(&conversation_id, None);
                    self.sleep(BACKOFF_START).await?;
                }
                Err(status) => {
                    self.node.metrics.storage_append_failures.inc();
                    self.node.health.set_failing(self.partition, true);
                    tracing::warn!(partition = self.partition, conversation_id = %conversation_id, code = ?status.code(), error = %status.message(), "storage append failed; retrying");
                    self.sleep(backoff).await?;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        Ok(stored)
    }

    async fn load_last_seq(&self, conversation_id: &str) -> Result<u64, Stopped> {
        let mut backoff = BACKOFF_START;
        loop {
            let reply = self
                .node
                .storage
                .clone()
                .last_seq(LastSeqRequest {
                    conversation_id: conversation_id.to_owned(),
                })
                .await;
            match reply {
                Ok(r) => {
                    let last = r.into_inner().last_seq;
                    self.cache_seq(conversation_id, Some(last));
                    return Ok(last);
                }
                Err(status) => {
                    self.node.health.set_failing(self.partition, true);
                    tracing::warn!(partition = self.partition, conversation_id, error = %status.message(), "storage last_seq failed; retrying");
                    self.sleep(backoff).await?;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// Whether storage refused an Append because the sequence is taken by another
/// message (a second writer). Storage reports it as `already_exists`, or as
/// `failed_precondition`/`aborted` (the codes a compare-and-set failure maps to).
fn is_sequence_conflict(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::AlreadyExists | tonic::Code::FailedPrecondition | tonic::Code::Aborted
    )
}

/// The end of the first chunk of `records` that fits one storage call: as many as
/// keep the encoded messages within `max_bytes` (at least one: a single record always
/// fits, the gateway bounds its size), and at most the store's batch limit.
fn chunk_end(records: &[Message], max_bytes: usize) -> usize {
    let mut bytes = 0;
    for (i, message) in records.iter().enumerate() {
        bytes += message.encoded_len() + 8;
        if i > 0 && (bytes > max_bytes || i >= MAX_APPEND_BATCH) {
            return i;
        }
    }
    records.len()
}
