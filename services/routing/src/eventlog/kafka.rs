//! The Kafka event log (`routing.backend = "kafka"`): the log of a routing tier
//! with several instances, each owning the partitions the consumer group gives it.
//!
//! Layout:
//!
//! - One topic, `routing.kafka_topic`, with exactly `routing.partitions` partitions
//!   and `routing.kafka_replication_factor` replicas. It is created when absent; an
//!   existing topic with another partition count is refused at start, because the
//!   partition of a conversation is [`partition_for`](super::partition_for) modulo
//!   the count (the same hash as the embedded log: the mapping never depends on the
//!   backend), and a different count would give conversations two owners.
//! - Record: key = conversation id, value = encoded `Message`, header
//!   `traceparent` = the sender's W3C trace context (absent when empty), partition
//!   chosen explicitly by the caller.
//! - One consumer group, `routing.kafka_group` (cooperative-sticky assignment):
//!   the member assigned a partition is its owner and the only one that sequences
//!   its conversations. The group's committed offset of a partition is the owner's
//!   "everything below is persisted by storage"; commits are manual
//!   (`enable.auto.commit=false`) and only come from [`EventLog::commit`].
//!
//! Three librdkafka clients per instance:
//!
//! - Producer: idempotent (`enable.idempotence=true`, `acks=all`), so an append
//!   resolves only when every in-sync replica has the record, retries never
//!   duplicate or reorder, and `message.timeout.ms` bounds the whole delivery (then
//!   the append fails with `unavailable`). A producer that hits a fatal idempotence
//!   error is replaced by a fresh one.
//! - Group member: subscribes to the topic only for membership and commits. A
//!   dedicated thread polls it to serve rebalance callbacks; assigned partitions are
//!   paused at once, it never reads records. An assignment adds partitions to
//!   [`EventLog::assignment`]; a revocation removes them and then blocks the
//!   callback until the owners released them ([`EventLog::released`], after their
//!   last commit) or `release_timeout`, so the next owner resumes exactly at the
//!   last commit. Commits are accepted only for partitions this member holds
//!   (assigned, or revoked and not yet released): a zombie cannot move the offset.
//! - Reader: a consumer with manual assignment (never joins a group), one split
//!   queue per partition. [`EventLog::poll`] keeps a cursor per partition: the
//!   first poll assigns the partition at `from`, a poll at another offset than
//!   the cursor seeks (librdkafka drops what was fetched before the seek), and
//!   records are returned in offset order as the queue yields them. A released
//!   partition is unassigned from the reader, so only owned partitions are fetched.
//!
//! After a rebalance or a crash the new owner reads the committed offset and
//! continues from there; records after it may be replayed and storage's `Append`
//! dedupes them to their stored sequence (see `owner`), so a conversation's sequence
//! has no gap and no number twice. Retention is the topic's own (`trim` removes
//! nothing).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use switchboard_config::Config;
use tokio::sync::watch;

use super::{EventLog, LogError, LogRecord, NewRecord};

mod security;
pub use security::KafkaSecurity;

/// The record header carrying the W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// Settings of a [`KafkaLog`].
#[derive(Debug, Clone)]
pub struct KafkaLogOptions {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    pub topic: String,
    pub group: String,
    /// Partitions of the topic (created with this many; an existing topic must match).
    pub partitions: u32,
    /// Replicas of each partition when the topic is created.
    pub replication_factor: u32,
    /// Longest one append may take, retries included (`message.timeout.ms`).
    pub delivery_timeout: Duration,
    /// Longest one metadata, offset or commit request may take.
    pub request_timeout: Duration,
    /// Group session timeout: how long a crashed member keeps its partitions.
    pub session_timeout: Duration,
    /// Longest a revocation waits for the owners to release their partitions.
    pub release_timeout: Duration,
    /// Security protocol, SASL credentials and TLS files of every client.
    pub security: KafkaSecurity,
}

impl KafkaLogOptions {
    /// The options `routing.*` and `cluster.rpc_timeout_ms` give.
    pub fn from_config(config: &Config) -> KafkaLogOptions {
        let r = &config.routing;
        let rpc = Duration::from_millis(config.cluster.rpc_timeout_ms);
        KafkaLogOptions {
            brokers: r.kafka_brokers.clone(),
            topic: r.kafka_topic.clone(),
            group: r.kafka_group.clone(),
            partitions: r.partitions,
            replication_factor: r.kafka_replication_factor,
            delivery_timeout: rpc,
            request_timeout: rpc,
            session_timeout: Duration::from_secs(10),
            release_timeout: Duration::from_secs(30),
            security: KafkaSecurity::from_config(r),
        }
    }
}

/// Why [`KafkaLog::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum KafkaOpenError {
    /// No answer from the brokers (retry later).
    #[error("kafka at {0}")]
    Unreachable(String),
    /// Kafka answered and refused the configuration (retrying does not help).
    #[error("{0}")]
    Refused(String),
}

/// Forwards librdkafka's own log lines and errors to `tracing`.
#[derive(Clone, Default)]
struct LogContext;

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(facility = fac, "librdkafka: {log_message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(facility = fac, "librdkafka: {log_message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(facility = fac, "librdkafka: {log_message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(facility = fac, "librdkafka: {log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for LogContext {}

/// Which partitions this member owns, shared by the group thread's rebalance
/// callbacks and the log's methods.
struct Ownership {
    state: Mutex<OwnState>,
    /// Signalled when a partition is released or the log closes.
    released: Condvar,
    assignment: watch::Sender<Vec<u32>>,
    release_timeout: Duration,
}

#[derive(Default)]
struct OwnState {
    /// Assigned by the group coordinator now.
    assigned: BTreeSet<u32>,
    /// Assigned, or revoked and not yet released by its owner: commits allowed.
    held: BTreeSet<u32>,
    /// The log is closing: revocations do not wait.
    closing: bool,
}

impl Ownership {
    fn lock(&self) -> std::sync::MutexGuard<'_, OwnState> {
        // Only plain set operations happen under the lock; a panic cannot leave
        // the sets half-updated in a way that matters.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, state: &OwnState) {
        let now: Vec<u32> = state.assigned.iter().copied().collect();
        self.assignment.send_if_modified(|current| {
            let changed = *current != now;
            *current = now;
            changed
        });
    }

    fn assign(&self, partitions: &[u32]) {
        let mut state = self.lock();
        for p in partitions {
            state.assigned.insert(*p);
            state.held.insert(*p);
        }
        self.publish(&state);
        tracing::info!(partitions = ?partitions, "kafka partitions assigned");
    }

    /// Remove `partitions` from the assignment; unless `lost`, wait (bounded) for
    /// their owners to release them.
    fn revoke(&self, partitions: &[u32], lost: bool) {
        let mut state = self.lock();
        for p in partitions {
            state.assigned.remove(p);
            if lost {
                // Another member may own them already: no commit from us.
                state.held.remove(p);
            }
        }
        self.publish(&state);
        tracing::info!(partitions = ?partitions, lost, "kafka partitions revoked");
        let deadline = Instant::now() + self.release_timeout;
        while !state.closing && partitions.iter().any(|p| state.held.contains(p)) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(partitions = ?partitions, "owners did not release revoked partitions in time; the next owner may replay");
                for p in partitions {
                    state.held.remove(p);
                }
                break;
            }
            state = self
                .released
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn release(&self, partition: u32) {
        let mut state = self.lock();
        if !state.assigned.contains(&partition) {
            state.held.remove(&partition);
        }
        drop(state);
        self.released.notify_all();
    }

    fn holds(&self, partition: u32) -> bool {
        self.lock().held.contains(&partition)
    }

    fn close(&self) {
        let mut state = self.lock();
        state.closing = true;
        state.assigned.clear();
        state.held.clear();
        self.publish(&state);
        drop(state);
        self.released.notify_all();
    }
}

/// The group member's context: rebalance callbacks drive [`Ownership`].
struct GroupContext {
    topic: String,
    ownership: Arc<Ownership>,
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        LogContext.log(level, fac, log_message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        LogContext.error(error, reason)
    }
}

impl GroupContext {
    fn partitions_of(&self, tpl: &TopicPartitionList) -> Vec<u32> {
        tpl.elements()
            .iter()
            .filter(|e| e.topic() == self.topic && e.partition() >= 0)
            .map(|e| e.partition() as u32)
            .collect()
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                self.ownership
                    .revoke(&self.partitions_of(tpl), consumer.assignment_lost());
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "kafka rebalance failed"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // This member only holds the partitions; the reader fetches them.
            if let Err(e) = consumer.pause(tpl) {
                tracing::warn!(error = %e, "cannot pause assigned partitions");
            }
            self.ownership.assign(&self.partitions_of(tpl));
        }
    }
}

type GroupConsumer = BaseConsumer<GroupContext>;
type ReaderConsumer = StreamConsumer<LogContext>;

/// The reading position of one partition in the reader.
#[derive(Default)]
struct Cursor {
    queue: Option<StreamPartitionQueue<LogContext>>,
    /// The reader has the partition assigned.
    assigned: bool,
    /// Offset of the next record the queue yields.
    next: u64,
}

/// The Kafka event log. See the module documentation.
pub struct KafkaLog {
    inner: Arc<Inner>,
}

struct Inner {
    options: KafkaLogOptions,
    /// Replaced when librdkafka reports a fatal (idempotence) error. The lock is
    /// only taken to clone or swap the `Arc`.
    producer: RwLock<Arc<FutureProducer<LogContext>>>,
    /// `None` once closed.
    group: RwLock<Option<Arc<GroupConsumer>>>,
    group_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    stop_group: Arc<AtomicBool>,
    reader: RwLock<Option<Arc<ReaderConsumer>>>,
    /// Serves the reader's main queue (errors and events; records go to the
    /// partition queues).
    reader_events: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// One cursor per partition. An async mutex on purpose: a cursor is one
    /// position in one queue, so two polls of a partition must take turns, and the
    /// turn lasts while the poll waits for records.
    cursors: Vec<tokio::sync::Mutex<Cursor>>,
    /// Highest end offset seen per partition (from appends, reads and watermarks),
    /// to check commits without a round trip.
    known_ends: Vec<AtomicU64>,
    ownership: Arc<Ownership>,
    closed: AtomicBool,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(format!("kafka {what}: {e}"))
}

fn base_config(options: &KafkaLogOptions) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &options.brokers)
        .set("allow.auto.create.topics", "false")
        .set(
            "socket.connection.setup.timeout.ms",
            // librdkafka's lower bound for this setting is one second.
            options.request_timeout.as_millis().max(1000).to_string(),
        )
        .set("reconnect.backoff.max.ms", "2000")
        .set_log_level(RDKafkaLogLevel::Warning);
    options.security.apply(&mut c);
    c
}

fn create_producer(options: &KafkaLogOptions) -> Result<FutureProducer<LogContext>, KafkaError> {
    let mut c = base_config(options);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            options.delivery_timeout.as_millis().to_string(),
        )
        .set(
            "request.timeout.ms",
            options.request_timeout.as_millis().to_string(),
        )
        // A short linger: concurrent sends still share a produce request.
        .set("linger.ms", "1")
        // The bounded local queue; a full queue makes `append` wait up to the
        // delivery timeout.
        .set("queue.buffering.max.messages", "100000");
    c.create_with_context(LogContext)
}

impl KafkaLog {
    /// Connect, create or check the topic, join the group and start reading.
    pub async fn open(mut options: KafkaLogOptions) -> Result<KafkaLog, KafkaOpenError> {
        options
            .security
            .resolve()
            .map_err(KafkaOpenError::Refused)?;
        if options.partitions == 0 || options.partitions > i32::MAX as u32 {
            return Err(KafkaOpenError::Refused(format!(
                "routing.partitions must be between 1 and {}",
                i32::MAX
            )));
        }
        ensure_topic(&options).await?;
        let refused = |what: &str, e: KafkaError| {
            KafkaOpenError::Refused(format!("cannot create the kafka {what}: {e}"))
        };
        let producer = create_producer(&options).map_err(|e| refused("producer", e))?;

        let ownership = Arc::new(Ownership {
            state: Mutex::new(OwnState::default()),
            released: Condvar::new(),
            assignment: watch::Sender::new(Vec::new()),
            release_timeout: options.release_timeout,
        });
        let group: GroupConsumer = {
            let mut c = base_config(&options);
            c.set("group.id", &options.group)
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("partition.assignment.strategy", "cooperative-sticky")
                .set(
                    "session.timeout.ms",
                    options.session_timeout.as_millis().to_string(),
                )
                .set("heartbeat.interval.ms", "1000");
            c.create_with_context(GroupContext {
                topic: options.topic.clone(),
                ownership: ownership.clone(),
            })
            .map_err(|e| refused("group consumer", e))?
        };
        group
            .subscribe(&[&options.topic])
            .map_err(|e| refused("group subscription", e))?;
        let group = Arc::new(group);

        let reader: ReaderConsumer = {
            let mut c = base_config(&options);
            // A group id is required for assignment; the reader never joins or
            // commits, so its own id keeps it out of the owners' group.
            c.set("group.id", format!("{}.reader", options.group))
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                // Reading below the log start (retention) continues at the start.
                .set("auto.offset.reset", "earliest")
                .set("fetch.wait.max.ms", "100")
                .set("queued.max.messages.kbytes", "16384");
            c.create_with_context(LogContext)
                .map_err(|e| refused("reader", e))?
        };
        let reader = Arc::new(reader);

        let stop_group = Arc::new(AtomicBool::new(false));
        let group_thread = {
            let group = group.clone();
            let stop = stop_group.clone();
            std::thread::Builder::new()
                .name("kafka-group".into())
                .spawn(move || run_group(group, stop))
                .map_err(|e| KafkaOpenError::Refused(format!("cannot start a thread: {e}")))?
        };
        let reader_events = {
            let reader = reader.clone();
            tokio::spawn(async move {
                loop {
                    match reader.recv().await {
                        // Every partition has its own queue before it is assigned.
                        Ok(m) => tracing::debug!(
                            partition = m.partition(),
                            offset = m.offset(),
                            "record on the reader's main queue dropped"
                        ),
                        Err(e) => tracing::warn!(error = %e, "kafka reader error"),
                    }
                }
            })
        };
        tracing::info!(
            brokers = %options.brokers,
            topic = %options.topic,
            group = %options.group,
            partitions = options.partitions,
            "kafka event log open"
        );
        Ok(KafkaLog {
            inner: Arc::new(Inner {
                cursors: (0..options.partitions)
                    .map(|_| Default::default())
                    .collect(),
                known_ends: (0..options.partitions).map(|_| AtomicU64::new(0)).collect(),
                producer: RwLock::new(Arc::new(producer)),
                group: RwLock::new(Some(group)),
                group_thread: Mutex::new(Some(group_thread)),
                stop_group,
                reader: RwLock::new(Some(reader)),
                reader_events: Mutex::new(Some(reader_events)),
                ownership,
                closed: AtomicBool::new(false),
                options,
            }),
        })
    }

    fn check(&self, partition: u32) -> Result<(), LogError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(LogError::Closed);
        }
        if partition < self.inner.options.partitions {
            Ok(())
        } else {
            Err(LogError::NoSuchPartition {
                partition,
                partitions: self.inner.options.partitions,
            })
        }
    }

    fn group(&self) -> Result<Arc<GroupConsumer>, LogError> {
        self.inner
            .group
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(LogError::Closed)
    }

    fn reader(&self) -> Result<Arc<ReaderConsumer>, LogError> {
        self.inner
            .reader
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(LogError::Closed)
    }

    fn producer(&self) -> Arc<FutureProducer<LogContext>> {
        self.inner
            .producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn note_end(&self, partition: u32, end: u64) {
        self.inner.known_ends[partition as usize].fetch_max(end, Ordering::SeqCst);
    }

    /// A producer that reported a fatal error can never send again: replace it.
    fn replace_producer_if_fatal(&self, failed: &Arc<FutureProducer<LogContext>>) {
        let Some((code, reason)) = failed.client().fatal_error() else {
            return;
        };
        let mut slot = self
            .inner
            .producer
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if !Arc::ptr_eq(&slot, failed) {
            return; // Another append replaced it already.
        }
        match create_producer(&self.inner.options) {
            Ok(fresh) => {
                tracing::warn!(code = ?code, reason, "kafka producer failed fatally; replaced");
                *slot = Arc::new(fresh);
            }
            Err(e) => tracing::error!(error = %e, "cannot replace the failed kafka producer"),
        }
    }

    /// Run a blocking librdkafka call off the runtime, bounded by the request
    /// timeout (plus a margin for the call's own timeout to fire first).
    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
    ) -> Result<T, LogError> {
        let bound = self.inner.options.request_timeout + Duration::from_secs(1);
        match tokio::time::timeout(bound, tokio::task::spawn_blocking(f)).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(unavailable(what, e)),
            Ok(Err(e)) => Err(unavailable(what, e)),
            Err(_) => Err(unavailable(what, "timed out")),
        }
    }

    /// Make the cursor of `partition` yield `from` next.
    async fn position(
        &self,
        cursor: &mut Cursor,
        partition: u32,
        from: u64,
    ) -> Result<(), LogError> {
        let reader = self.reader()?;
        let topic = self.inner.options.topic.clone();
        if cursor.queue.is_none() {
            // Split before assigning: the partition's records never reach the
            // main queue (librdkafka keeps an application's forwarding).
            cursor.queue = Some(
                reader
                    .split_partition_queue(&topic, partition as i32)
                    .ok_or_else(|| unavailable("reader", "cannot split the partition queue"))?,
            );
        }
        if !cursor.assigned {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, partition as i32, Offset::Offset(from as i64))
                .map_err(|e| unavailable("reader", e))?;
            self.blocking("assign", move || reader.incremental_assign(&tpl))
                .await?;
            cursor.assigned = true;
            cursor.next = from;
        } else if cursor.next != from {
            let timeout = self.inner.options.request_timeout;
            self.blocking("seek", move || {
                // Right after an assignment the fetcher may not accept a seek yet.
                let mut attempts = 0;
                loop {
                    match reader.seek(
                        &topic,
                        partition as i32,
                        Offset::Offset(from as i64),
                        timeout,
                    ) {
                        Err(KafkaError::Seek(ref s)) if attempts < 20 && s.contains("State") => {
                            attempts += 1;
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        other => return other,
                    }
                }
            })
            .await?;
            cursor.next = from;
        }
        Ok(())
    }
}

/// The group member's thread: serve callbacks until stopped, then leave the group.
fn run_group(group: Arc<GroupConsumer>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match group.poll(Duration::from_millis(100)) {
            // Assigned partitions are paused; one fetched before the pause is
            // not ours to read here.
            Some(Ok(_)) | None => {}
            Some(Err(e)) => tracing::warn!(error = %e, "kafka group member error"),
        }
    }
    group.unsubscribe();
    // The last reference closes the consumer (leaving the group) in this thread.
    drop(group);
}

fn to_log_record(partition: u32, m: &impl Message) -> LogRecord {
    let traceparent = m
        .headers()
        .and_then(|h| {
            h.iter()
                .find(|h| h.key == TRACEPARENT_HEADER)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        })
        .unwrap_or_default();
    LogRecord {
        partition,
        offset: m.offset().max(0) as u64,
        key: m.key().map(<[u8]>::to_vec).unwrap_or_default(),
        value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        traceparent,
        timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
    }
}

/// Create the topic if absent; refuse one with another partition count.
async fn ensure_topic(options: &KafkaLogOptions) -> Result<(), KafkaOpenError> {
    let admin: AdminClient<LogContext> = base_config(options)
        .create_with_context(LogContext)
        .map_err(|e| KafkaOpenError::Refused(format!("cannot create a kafka admin client: {e}")))?;
    let admin = Arc::new(admin);
    let unreachable = |e: &dyn std::fmt::Display| {
        KafkaOpenError::Unreachable(format!("{} did not answer: {e}", options.brokers))
    };
    let existing = topic_partitions(&admin, options).await?;
    match existing {
        Some(n) => return check_partitions(options, n),
        None => {
            let rf = i32::try_from(options.replication_factor).unwrap_or(i32::MAX);
            let topic = NewTopic::new(
                &options.topic,
                options.partitions as i32,
                TopicReplication::Fixed(rf),
            );
            let admin_options = AdminOptions::new()
                .request_timeout(Some(options.request_timeout))
                .operation_timeout(Some(options.request_timeout));
            let results = admin
                .create_topics([&topic], &admin_options)
                .await
                .map_err(|e| unreachable(&e))?;
            for result in results {
                match result {
                    Ok(_) => tracing::info!(
                        topic = %options.topic,
                        partitions = options.partitions,
                        replication_factor = options.replication_factor,
                        "kafka topic created"
                    ),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, code @ (RDKafkaErrorCode::RequestTimedOut
                    | RDKafkaErrorCode::OperationTimedOut
                    | RDKafkaErrorCode::BrokerNotAvailable
                    | RDKafkaErrorCode::NotController))) => {
                        return Err(unreachable(&code));
                    }
                    Err((_, code)) => {
                        return Err(KafkaOpenError::Refused(format!(
                            "kafka refused to create topic `{}` with {} partitions and replication factor {}: {code}",
                            options.topic, options.partitions, options.replication_factor
                        )))
                    }
                }
            }
        }
    }
    // The topic's metadata can lag its creation briefly.
    let deadline = Instant::now() + options.request_timeout;
    loop {
        match topic_partitions(&admin, options).await? {
            Some(n) => return check_partitions(options, n),
            None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            None => {
                return Err(unreachable(&format!(
                    "topic `{}` was created but has no metadata yet",
                    options.topic
                )))
            }
        }
    }
}

fn check_partitions(options: &KafkaLogOptions, found: u32) -> Result<(), KafkaOpenError> {
    if found == options.partitions {
        Ok(())
    } else {
        Err(KafkaOpenError::Refused(format!(
            "kafka topic `{}` has {found} partitions but routing.partitions is {}; \
             conversations are hashed onto the partition count, so it must match \
             (use another routing.kafka_topic or set routing.partitions = {found})",
            options.topic, options.partitions
        )))
    }
}

/// The partition count of the topic, `None` if it does not exist.
async fn topic_partitions(
    admin: &Arc<AdminClient<LogContext>>,
    options: &KafkaLogOptions,
) -> Result<Option<u32>, KafkaOpenError> {
    let admin = admin.clone();
    let topic = options.topic.clone();
    let timeout = options.request_timeout;
    let metadata = tokio::task::spawn_blocking(move || {
        admin
            .inner()
            .fetch_metadata(Some(&topic), timeout)
            .map(|m| {
                m.topics()
                    .iter()
                    .find(|t| t.name() == topic)
                    .map(|t| (t.error(), t.partitions().len() as u32))
            })
    })
    .await
    .map_err(|e| KafkaOpenError::Refused(format!("metadata task failed: {e}")))?
    .map_err(|e| KafkaOpenError::Unreachable(format!("{} did not answer: {e}", options.brokers)))?;
    match metadata {
        None => Ok(None),
        Some((Some(_), _)) => Ok(None), // unknown topic (or not ready yet)
        Some((None, 0)) => Ok(None),
        Some((None, n)) => Ok(Some(n)),
    }
}

#[async_trait]
impl EventLog for KafkaLog {
    fn partitions(&self) -> u32 {
        self.inner.options.partitions
    }

    fn assignment(&self) -> watch::Receiver<Vec<u32>> {
        self.inner.ownership.assignment.subscribe()
    }

    async fn append(&self, partition: u32, record: NewRecord) -> Result<u64, LogError> {
        self.check(partition)?;
        let producer = self.producer();
        let mut headers = OwnedHeaders::new();
        if !record.traceparent.is_empty() {
            headers = headers.insert(Header {
                key: TRACEPARENT_HEADER,
                value: Some(record.traceparent.as_bytes()),
            });
        }
        let kafka_record = FutureRecord::to(&self.inner.options.topic)
            .partition(partition as i32)
            .key(&record.key)
            .payload(&record.value)
            .headers(headers);
        // `send` waits for queue room at most the delivery timeout, then the
        // delivery itself is bounded by message.timeout.ms.
        match producer
            .send(kafka_record, self.inner.options.delivery_timeout)
            .await
        {
            Ok(delivery) => {
                let offset = delivery.offset.max(0) as u64;
                self.note_end(partition, offset + 1);
                Ok(offset)
            }
            Err((e, _)) => {
                self.replace_producer_if_fatal(&producer);
                Err(unavailable("append", e))
            }
        }
    }

    async fn poll(
        &self,
        partition: u32,
        from: u64,
        max: usize,
        max_wait: Duration,
    ) -> Result<Vec<LogRecord>, LogError> {
        self.check(partition)?;
        let mut cursor = self.inner.cursors[partition as usize].lock().await;
        self.position(&mut cursor, partition, from).await?;
        let deadline = tokio::time::Instant::now() + max_wait;
        let mut out = Vec::new();
        while out.len() < max.max(1) {
            let Some(queue) = cursor.queue.as_ref() else {
                break;
            };
            // Wait for the first record; after it take only what is ready.
            let until = if out.is_empty() {
                deadline
            } else {
                tokio::time::Instant::now()
            };
            let received = match tokio::time::timeout_at(until, queue.recv()).await {
                Err(_) => break,
                Ok(received) => received.map(|m| to_log_record(partition, &m)),
            };
            match received {
                Ok(record) if record.offset < cursor.next => {} // fetched before a seek
                Ok(record) => {
                    cursor.next = record.offset + 1;
                    out.push(record);
                }
                Err(e) if out.is_empty() => return Err(unavailable("read", e)),
                Err(e) => {
                    tracing::warn!(partition, error = %e, "kafka read error after records");
                    break;
                }
            }
        }
        self.note_end(partition, cursor.next);
        Ok(out)
    }

    async fn commit(&self, partition: u32, next_offset: u64) -> Result<(), LogError> {
        self.check(partition)?;
        if !self.inner.ownership.holds(partition) {
            return Err(LogError::Unavailable(format!(
                "partition {partition} is not owned by this instance; commit refused"
            )));
        }
        if next_offset > self.inner.known_ends[partition as usize].load(Ordering::SeqCst) {
            let end = self.end_offset(partition).await?;
            if next_offset > end {
                return Err(LogError::OffsetOutOfRange {
                    partition,
                    offset: next_offset,
                    end,
                });
            }
        }
        let group = self.group()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            &self.inner.options.topic,
            partition as i32,
            Offset::Offset(next_offset as i64),
        )
        .map_err(|e| unavailable("commit", e))?;
        self.blocking("commit", move || group.commit(&tpl, CommitMode::Sync))
            .await
    }

    async fn committed(&self, partition: u32) -> Result<u64, LogError> {
        self.check(partition)?;
        let group = self.group()?;
        let topic = self.inner.options.topic.clone();
        let timeout = self.inner.options.request_timeout;
        let offset = self
            .blocking("committed offsets", move || {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&topic, partition as i32);
                let committed = group.committed_offsets(tpl, timeout)?;
                Ok(committed
                    .find_partition(&topic, partition as i32)
                    .map(|e| e.offset()))
            })
            .await?;
        Ok(match offset {
            Some(Offset::Offset(n)) if n >= 0 => n as u64,
            _ => 0,
        })
    }

    async fn end_offset(&self, partition: u32) -> Result<u64, LogError> {
        self.check(partition)?;
        let reader = self.reader()?;
        let topic = self.inner.options.topic.clone();
        let timeout = self.inner.options.request_timeout;
        let (_, high) = self
            .blocking("watermarks", move || {
                reader.fetch_watermarks(&topic, partition as i32, timeout)
            })
            .await?;
        let end = high.max(0) as u64;
        self.note_end(partition, end);
        Ok(end)
    }

    async fn trim(&self) -> Result<u64, LogError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(LogError::Closed);
        }
        // The topic's retention removes old records.
        Ok(0)
    }

    fn released(&self, partition: u32) {
        if partition >= self.inner.options.partitions {
            return;
        }
        self.inner.ownership.release(partition);
        // Stop fetching it; a later poll assigns it again at the offset it asks.
        let Ok(mut cursor) = self.inner.cursors[partition as usize].try_lock() else {
            return; // A poll is running; the partition stays assigned to the reader.
        };
        if !cursor.assigned {
            return;
        }
        let Ok(reader) = self.reader() else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.inner.options.topic, partition as i32);
        cursor.assigned = false;
        // The unassign is a local, non-blocking librdkafka operation on an op queue.
        if let Err(e) = reader.incremental_unassign(&tpl) {
            tracing::warn!(partition, error = %e, "cannot unassign a released partition");
        }
    }

    async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.inner.ownership.close();
        let producer = self.producer();
        let flush_for = self.inner.options.delivery_timeout;
        let _ = tokio::task::spawn_blocking(move || producer.flush(flush_for)).await;

        // Leave the group: the group thread unsubscribes and closes the member.
        self.inner
            .group
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.inner.stop_group.store(true, Ordering::SeqCst);
        let thread = self
            .inner
            .group_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }

        let reader_events = self
            .inner
            .reader_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = reader_events {
            task.abort();
            let _ = task.await;
        }
        for cursor in &self.inner.cursors {
            cursor.lock().await.queue = None;
        }
        let reader = self
            .inner
            .reader
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // Closing a consumer blocks briefly: not on the runtime.
        let _ = tokio::task::spawn_blocking(move || drop(reader)).await;
        tracing::info!(topic = %self.inner.options.topic, "kafka event log closed");
    }
}

#[cfg(test)]
pub(crate) mod tests;
