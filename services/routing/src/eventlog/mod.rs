//! The event log: routing's durable, partitioned pipeline between accepting a send
//! and sequencing it.
//!
//! [`EventLog`] is backend-neutral and shaped after a Kafka topic consumed by a
//! consumer group, so the embedded log and a Kafka implementation share one contract:
//!
//! - [`EventLog::append`] returns only once the record is durable (embedded: the
//!   SQLite transaction committed; Kafka: acks=all with an idempotent producer).
//! - Records are read per partition in offset order from any position
//!   ([`EventLog::poll`]); offsets start at 0 and grow by 1 per record.
//! - The partition owner commits the next offset it needs ([`EventLog::commit`],
//!   Kafka semantics: "everything below this is done"); after a restart reading
//!   resumes at [`EventLog::committed`].
//! - [`EventLog::assignment`] says which partitions this process owns now (embedded:
//!   all of them, forever; Kafka: whatever the group coordinator assigned).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use switchboard_config::Config;
use tokio::sync::watch;

mod embedded;
mod kafka;
pub use embedded::{EmbeddedLog, EmbeddedLogOptions};
pub use kafka::{KafkaLog, KafkaLogOptions, KafkaOpenError};

#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;

/// Broker address and unique names for tests against a real Kafka.
#[cfg(test)]
pub(crate) mod kafka_test_support {
    pub(crate) use super::kafka::tests::{require_kafka, unique};
}

/// A record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    /// Routing key (the conversation id); records with one key keep their order.
    pub key: Vec<u8>,
    /// Opaque payload (an encoded `Message`).
    pub value: Vec<u8>,
    /// W3C `traceparent` of the send that produced the record ("" when none).
    /// Kafka carries it in the record header `traceparent`.
    pub traceparent: String,
}

/// A record read back from a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub partition: u32,
    pub offset: u64,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// W3C `traceparent` the record was appended with ("" when none).
    pub traceparent: String,
    /// When the log accepted the record, ms since the Unix epoch.
    pub timestamp_ms: i64,
}

/// What can go wrong with the log. Every variant means "not done": an append that
/// failed is not durable and must not be acked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("event log unavailable: {0}")]
    Unavailable(String),
    #[error("event log is closed")]
    Closed,
    #[error("partition {partition} does not exist (log has {partitions})")]
    NoSuchPartition { partition: u32, partitions: u32 },
    #[error("offset {offset} is beyond the end of partition {partition} ({end})")]
    OffsetOutOfRange {
        partition: u32,
        offset: u64,
        end: u64,
    },
}

/// A durable partitioned log. See the module documentation for the contract.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Number of partitions of the log.
    fn partitions(&self) -> u32;

    /// The partitions this process owns now. The receiver sees every change; an owner
    /// of a partition that leaves the set must stop after the record in hand and
    /// commit.
    fn assignment(&self) -> watch::Receiver<Vec<u32>>;

    /// Append a record to `partition` and return its offset once it is durable.
    async fn append(&self, partition: u32, record: NewRecord) -> Result<u64, LogError>;

    /// Records of `partition` with offset >= `from`, in offset order, at most `max`.
    /// Waits up to `max_wait` for the first one and returns an empty batch if none
    /// arrived. Records below the log start (trimmed) are skipped: the batch then
    /// starts at the first record still held.
    async fn poll(
        &self,
        partition: u32,
        from: u64,
        max: usize,
        max_wait: Duration,
    ) -> Result<Vec<LogRecord>, LogError>;

    /// Record that every record of `partition` below `next_offset` is done.
    async fn commit(&self, partition: u32, next_offset: u64) -> Result<(), LogError>;

    /// The committed next offset of `partition` (0 if nothing was ever committed).
    async fn committed(&self, partition: u32) -> Result<u64, LogError>;

    /// The offset the next append to `partition` gets (the high-water mark).
    async fn end_offset(&self, partition: u32) -> Result<u64, LogError>;

    /// Drop records below the committed offsets now (the log also does this
    /// periodically by itself). Returns how many records were removed; a backend
    /// with its own retention may remove none.
    async fn trim(&self) -> Result<u64, LogError>;

    /// The owner of `partition` stopped after it left the assignment and made its
    /// last commit. Kafka waits for this in the revoke callback, so the next owner
    /// resumes exactly at that commit; the embedded log owns everything and ignores it.
    fn released(&self, _partition: u32) {}

    /// Whether this process is the only consumer of the log, for as long as it runs
    /// (embedded: true, it owns every partition forever; Kafka: false, other routing
    /// instances may own partitions now or later).
    fn sole_consumer(&self) -> bool {
        false
    }

    /// Flush and release the log. Later calls fail with [`LogError::Closed`].
    async fn close(&self);
}

/// Build the configured event log (`routing.backend`).
///
/// A Kafka cluster that cannot be reached is retried with capped, jittered backoff
/// until it answers (the caller races this with its shutdown and stays not ready
/// meanwhile); a configuration Kafka refuses (an existing topic with another
/// partition count, a bad replication factor) fails at once.
pub async fn open(config: &Config) -> anyhow::Result<Arc<dyn EventLog>> {
    match config.routing.backend.as_str() {
        "embedded" => {
            let path = config.data_dir.join("eventlog.sqlite3");
            let partitions = config.routing.partitions;
            let options = EmbeddedLogOptions {
                fsync: config.embedded_fsync(),
                ..EmbeddedLogOptions::default()
            };
            let log =
                tokio::task::spawn_blocking(move || EmbeddedLog::open(&path, partitions, options))
                    .await
                    .map_err(|e| anyhow::anyhow!("opening the event log panicked: {e}"))??;
            Ok(Arc::new(log))
        }
        "kafka" => {
            let options = KafkaLogOptions::from_config(config);
            let mut backoff = switchboard_rpc::Backoff::new(OPEN_BACKOFF_START, OPEN_BACKOFF_MAX);
            loop {
                match KafkaLog::open(options.clone()).await {
                    Ok(log) => return Ok(Arc::new(log)),
                    Err(KafkaOpenError::Unreachable(reason)) => {
                        let retry_in = backoff.next_wait();
                        tracing::error!(
                            brokers = %options.brokers,
                            topic = %options.topic,
                            error = %reason,
                            retry_in_ms = retry_in.as_millis() as u64,
                            "kafka unreachable; the event log is not open yet, retrying"
                        );
                        tokio::time::sleep(retry_in).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        other => anyhow::bail!("unknown routing.backend `{other}`"),
    }
}

const OPEN_BACKOFF_START: Duration = Duration::from_millis(500);
const OPEN_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The partition of a conversation: FNV-1a (64 bit) of its id modulo `partitions`.
///
/// Written out rather than taken from `std::hash` so that every process and every
/// version agrees: the partition decides which owner sequences a conversation.
pub fn partition_for(conversation_id: &str, partitions: u32) -> u32 {
    (fnv1a64(conversation_id.as_bytes()) % u64::from(partitions.max(1))) as u32
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(PRIME)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn partition_is_stable_and_in_range() {
        assert_eq!(
            partition_for("a", 16),
            (0xaf63_dc4c_8601_ec8c_u64 % 16) as u32
        );
        for i in 0..1000 {
            let id = format!("conv-{i}");
            let p = partition_for(&id, 7);
            assert!(p < 7);
            assert_eq!(p, partition_for(&id, 7));
        }
        assert_eq!(partition_for("x", 1), 0);
    }
}
