//! The embedded event log: a durable partitioned log in one SQLite file
//! (`<data_dir>/eventlog.sqlite3`), for one routing process that owns every partition.
//!
//! On disk, in WAL mode: with `synchronous=NORMAL` (the default,
//! `embedded_durability = "process"`) a committed transaction is in the operating
//! system's page cache and survives a crash of the process, `kill -9` included, as
//! the history store's commits do; with `synchronous=FULL` (`"machine"`,
//! [`EmbeddedLogOptions::fsync`]) every transaction also waits for an fsync and
//! survives a power loss or kernel crash.
//!
//! - `records(part, log_offset, key, value, timestamp_ms, traceparent)`, primary
//!   key `(part, log_offset)`: the records still held (`traceparent` was added
//!   later; files without it get the column on open).
//! - `partitions(part, next_offset, committed_offset)`: per partition the end offset
//!   as of the last trim and the owner's committed offset. The end offset is the
//!   larger of `next_offset` and the highest record's offset + 1: an append writes
//!   only its record (one page less per transaction than keeping `next_offset`
//!   current), records at or above the committed offset are never deleted, and a
//!   trim writes every partition's end into `next_offset` in the transaction that
//!   deletes, so the end survives trimming everything.
//! - `meta(key, value)`: the partition count the file was created with.
//!
//! One writer thread owns the write connection. Appends and commits are sent to it
//! over a bounded channel; it takes everything queued (up to `max_batch`), writes it
//! in one transaction, and only after the commit completes every caller and publishes
//! the new end offsets (group commit: one fsync serves many concurrent sends).
//! Consumers wait on a per-partition `watch` of the end offset instead of polling
//! the file. Records below the committed offset are deleted by the writer at most
//! every `trim_interval`, so the file stays bounded by what is not yet consumed.
//!
//! The newest records of each partition also stay in memory after their
//! transaction committed (the tail, at most `tail_bytes` over all partitions): a
//! consumer that keeps up, as a partition owner does, reads from it without a
//! database read on a blocking thread; one that lags behind the tail reads the file.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot, watch};

use super::{EventLog, LogError, LogRecord, NewRecord};

/// Tuning of the embedded log.
#[derive(Debug, Clone)]
pub struct EmbeddedLogOptions {
    /// Least time between two trims of consumed records.
    pub trim_interval: Duration,
    /// Most commands written in one transaction.
    pub max_batch: usize,
    /// Commands queued for the writer before appenders wait.
    pub queue: usize,
    /// Every transaction waits for an fsync (`synchronous=FULL`): commits survive a
    /// power loss, not only a crash of the process.
    pub fsync: bool,
    /// Bytes (keys, values, traceparents) of the newest records kept in memory for consumers,
    /// over all partitions; 0 = every poll reads the file.
    pub tail_bytes: usize,
}

impl Default for EmbeddedLogOptions {
    fn default() -> Self {
        EmbeddedLogOptions {
            trim_interval: Duration::from_secs(30),
            max_batch: 1024,
            queue: 8192,
            fsync: false,
            tail_bytes: 8 << 20,
        }
    }
}

/// Readers kept open for reuse; more may exist briefly under concurrency.
const IDLE_READERS: usize = 4;

/// The embedded partitioned log. See the module documentation.
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

struct Inner {
    /// The database file, for opening readers.
    path: PathBuf,
    partitions: u32,
    /// Commands to the writer thread (bounded: appenders wait when it falls behind).
    writer_tx: mpsc::Sender<Command>,
    /// Per partition, the end offset (next offset to be written), published after
    /// each commit; consumers wait on it.
    ends: Arc<Vec<watch::Sender<u64>>>,
    /// Per partition, the newest committed records (written before `ends` moves).
    tails: Arc<Vec<Mutex<Tail>>>,
    /// Idle read connections. A std mutex: only taken for a push or pop, never
    /// across an await, and only on blocking threads.
    readers: Mutex<Vec<Connection>>,
    /// This process owns every partition, always.
    assignment: watch::Sender<Vec<u32>>,
    /// The writer thread, joined by `close`.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The newest committed records of one partition, contiguous in offset order.
#[derive(Default)]
struct Tail {
    records: VecDeque<LogRecord>,
    /// Key, value and traceparent bytes of `records`.
    bytes: usize,
}

impl Tail {
    /// Add the record at the end (offsets come in order), then drop the oldest
    /// records until the tail fits `budget`.
    fn push(&mut self, record: LogRecord, budget: usize) {
        if self
            .records
            .back()
            .is_some_and(|r| r.offset + 1 != record.offset)
        {
            self.records.clear();
            self.bytes = 0;
        }
        self.bytes += record_bytes(&record);
        self.records.push_back(record);
        while self.bytes > budget {
            match self.records.pop_front() {
                Some(r) => self.bytes -= record_bytes(&r),
                None => break,
            }
        }
    }

    /// Up to `max` records from offset `from`, if the tail holds `from`.
    fn read(&self, from: u64, max: usize) -> Option<Vec<LogRecord>> {
        let first = self.records.front()?.offset;
        let skip = usize::try_from(from.checked_sub(first)?).ok()?;
        if skip >= self.records.len() {
            return None;
        }
        Some(self.records.iter().skip(skip).take(max).cloned().collect())
    }
}

fn record_bytes(r: &LogRecord) -> usize {
    r.key.len() + r.value.len() + r.traceparent.len()
}

type AppendCmd = (u32, NewRecord, oneshot::Sender<Result<u64, LogError>>);
type CommitCmd = (u32, u64, oneshot::Sender<Result<(), LogError>>);

enum Command {
    Append {
        partition: u32,
        record: NewRecord,
        reply: oneshot::Sender<Result<u64, LogError>>,
    },
    Commit {
        partition: u32,
        next_offset: u64,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
    Trim {
        reply: oneshot::Sender<Result<u64, LogError>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

fn sql_err(e: rusqlite::Error) -> LogError {
    LogError::Unavailable(e.to_string())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn configure(conn: &Connection, fsync: bool) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", if fsync { "FULL" } else { "NORMAL" })?;
    Ok(())
}

impl EmbeddedLog {
    /// Open (or create) the log at `path` with `partitions` partitions. Blocking: call
    /// from a blocking context.
    ///
    /// Changing the partition count of an existing log is refused while any
    /// partition holds records that were not consumed, because their conversations
    /// would then be sequenced by two owners.
    pub fn open(
        path: &Path,
        partitions: u32,
        options: EmbeddedLogOptions,
    ) -> Result<EmbeddedLog, LogError> {
        if partitions == 0 {
            return Err(LogError::Unavailable(
                "the log needs at least one partition".into(),
            ));
        }
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    LogError::Unavailable(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
        }
        let mut conn = Connection::open(path).map_err(sql_err)?;
        configure(&conn, options.fsync).map_err(sql_err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS records (
                 part INTEGER NOT NULL,
                 log_offset INTEGER NOT NULL,
                 key BLOB NOT NULL,
                 value BLOB NOT NULL,
                 timestamp_ms INTEGER NOT NULL,
                 traceparent TEXT NOT NULL DEFAULT '',
                 PRIMARY KEY (part, log_offset));
             CREATE TABLE IF NOT EXISTS partitions (
                 part INTEGER PRIMARY KEY,
                 next_offset INTEGER NOT NULL,
                 committed_offset INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
        )
        .map_err(sql_err)?;
        add_traceparent_column(&conn).map_err(sql_err)?;
        let next = init_partitions(&mut conn, partitions)?;

        let ends: Arc<Vec<watch::Sender<u64>>> =
            Arc::new(next.iter().map(|n| watch::Sender::new(*n)).collect());
        let tails: Arc<Vec<Mutex<Tail>>> =
            Arc::new((0..partitions).map(|_| Mutex::default()).collect());
        let queue = options.queue.max(1);
        let (writer_tx, writer_rx) = mpsc::channel(queue);
        let writer = {
            let ends = ends.clone();
            let tails = tails.clone();
            std::thread::Builder::new()
                .name("eventlog-writer".into())
                .spawn(move || Writer::new(conn, ends, tails, next, options).run(writer_rx))
                .map_err(|e| LogError::Unavailable(format!("cannot start writer: {e}")))?
        };
        Ok(EmbeddedLog {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                partitions,
                writer_tx,
                ends,
                tails,
                readers: Mutex::new(Vec::new()),
                assignment: watch::Sender::new((0..partitions).collect()),
                writer: Mutex::new(Some(writer)),
            }),
        })
    }

    fn check_partition(&self, partition: u32) -> Result<(), LogError> {
        if partition < self.inner.partitions {
            Ok(())
        } else {
            Err(LogError::NoSuchPartition {
                partition,
                partitions: self.inner.partitions,
            })
        }
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, LogError>>) -> Command,
    ) -> Result<T, LogError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .writer_tx
            .send(make(reply))
            .await
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Run `f` with a read connection on a blocking thread.
    async fn with_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, LogError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = inner
                .readers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop();
            let conn = match pooled {
                Some(c) => c,
                None => {
                    let c = Connection::open(&inner.path).map_err(sql_err)?;
                    c.busy_timeout(Duration::from_secs(5)).map_err(sql_err)?;
                    c
                }
            };
            let result = f(&conn).map_err(sql_err);
            let mut idle = inner.readers.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < IDLE_READERS {
                idle.push(conn);
            }
            result
        })
        .await
        .map_err(|e| LogError::Unavailable(format!("log reader failed: {e}")))?
    }
}

/// Files created before records carried a `traceparent` get the column.
fn add_traceparent_column(conn: &Connection) -> rusqlite::Result<()> {
    let mut columns = conn.prepare("SELECT name FROM pragma_table_info('records')")?;
    let names = columns
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    if !names.iter().any(|n| n == "traceparent") {
        conn.execute_batch("ALTER TABLE records ADD COLUMN traceparent TEXT NOT NULL DEFAULT ''")?;
    }
    Ok(())
}

/// Make sure `partitions` has one row per partition and return the end offsets.
fn init_partitions(conn: &mut Connection, partitions: u32) -> Result<Vec<u64>, LogError> {
    init_partitions_sql(conn, partitions).map_err(sql_err)?
}

/// `Ok(Err(..))` when the file's partition count cannot change now.
fn init_partitions_sql(
    conn: &mut Connection,
    partitions: u32,
) -> rusqlite::Result<Result<Vec<u64>, LogError>> {
    let tx = conn.transaction()?;
    let stored: Option<i64> = tx
        .query_row("SELECT value FROM meta WHERE key = 'partitions'", [], |r| {
            r.get(0)
        })
        .optional()?;
    if let Some(stored) = stored {
        if stored != i64::from(partitions) {
            // Unconsumed records: those at or above their partition's committed offset.
            let pending: i64 = tx.query_row(
                "SELECT COUNT(*) FROM records JOIN partitions USING (part)
                 WHERE records.log_offset >= partitions.committed_offset",
                [],
                |r| r.get(0),
            )?;
            if pending > 0 {
                return Ok(Err(LogError::Unavailable(format!(
                    "the event log has {stored} partitions with unconsumed records; \
                     it cannot be reopened with {partitions} until they are consumed"
                ))));
            }
            tx.execute("DELETE FROM partitions WHERE part >= ?1", [partitions])?;
            tx.execute("DELETE FROM records WHERE part >= ?1", [partitions])?;
        }
    }
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('partitions', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [partitions],
    )?;
    let mut next = Vec::with_capacity(partitions as usize);
    for p in 0..partitions {
        tx.execute(
            "INSERT OR IGNORE INTO partitions (part, next_offset, committed_offset) VALUES (?1, 0, 0)",
            [p],
        )?;
        let n: i64 = tx.query_row(
            "SELECT MAX(next_offset,
                        COALESCE((SELECT MAX(log_offset) + 1 FROM records WHERE part = ?1), 0))
             FROM partitions WHERE part = ?1",
            [p],
            |r| r.get(0),
        )?;
        next.push(n as u64);
    }
    tx.commit()?;
    Ok(Ok(next))
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    ends: Arc<Vec<watch::Sender<u64>>>,
    tails: Arc<Vec<Mutex<Tail>>>,
    /// Tail bytes per partition.
    tail_budget: usize,
    /// End offset per partition as of the last committed transaction.
    next: Vec<u64>,
    options: EmbeddedLogOptions,
    last_trim: Instant,
}

impl Writer {
    fn new(
        conn: Connection,
        ends: Arc<Vec<watch::Sender<u64>>>,
        tails: Arc<Vec<Mutex<Tail>>>,
        next: Vec<u64>,
        options: EmbeddedLogOptions,
    ) -> Writer {
        let tail_budget = options.tail_bytes / tails.len().max(1);
        Writer {
            conn,
            ends,
            tails,
            tail_budget,
            next,
            options,
            last_trim: Instant::now(),
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let max_batch = self.options.max_batch.max(1);
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            if let Some(close) = self.write_batch(batch) {
                let _ = close.send(());
                return;
            }
        }
    }

    /// Write one batch; returns the reply of a close request, if the batch had one.
    fn write_batch(&mut self, batch: Vec<Command>) -> Option<oneshot::Sender<()>> {
        let mut appends = Vec::new();
        let mut commits = Vec::new();
        let mut trims = Vec::new();
        let mut close = None;
        for cmd in batch {
            match cmd {
                Command::Append {
                    partition,
                    record,
                    reply,
                } => appends.push((partition, record, reply)),
                Command::Commit {
                    partition,
                    next_offset,
                    reply,
                } => commits.push((partition, next_offset, reply)),
                Command::Trim { reply } => trims.push(reply),
                Command::Close { reply } => close = Some(reply),
            }
        }

        // A periodic trim runs first, against the offsets committed by earlier
        // batches, as soon as any command arrives after its interval (an idle log
        // has nothing new to trim).
        if trims.is_empty() && self.last_trim.elapsed() >= self.options.trim_interval {
            if let Err(e) = self.trim() {
                tracing::warn!(error = %e, "event log trim failed");
            }
        }
        let mut next = self.next.clone();
        let mut offsets = Vec::with_capacity(appends.len());
        for (partition, _, _) in &appends {
            let slot = &mut next[*partition as usize];
            offsets.push(*slot);
            *slot += 1;
        }
        // Commits beyond the end (including this batch's appends) are refused alone.
        let mut valid_commits = Vec::with_capacity(commits.len());
        for (partition, offset, reply) in commits {
            let end = next[partition as usize];
            if offset > end {
                let _ = reply.send(Err(LogError::OffsetOutOfRange {
                    partition,
                    offset,
                    end,
                }));
            } else {
                valid_commits.push((partition, offset, reply));
            }
        }

        if !appends.is_empty() || !valid_commits.is_empty() {
            let ts = now_ms();
            let written = self.write_transaction(&appends, &offsets, &valid_commits, ts);
            match written {
                Ok(()) => {
                    self.next = next;
                    let mut replies = Vec::with_capacity(appends.len());
                    for ((partition, record, reply), offset) in appends.into_iter().zip(offsets) {
                        if self.tail_budget > 0 {
                            let record = LogRecord {
                                partition,
                                offset,
                                key: record.key,
                                value: record.value,
                                traceparent: record.traceparent,
                                timestamp_ms: ts,
                            };
                            self.tails[partition as usize]
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(record, self.tail_budget);
                        }
                        replies.push((reply, offset));
                    }
                    for (p, end) in self.next.iter().enumerate() {
                        self.ends[p].send_if_modified(|current| {
                            let changed = *current != *end;
                            *current = *end;
                            changed
                        });
                    }
                    for (reply, offset) in replies {
                        let _ = reply.send(Ok(offset));
                    }
                    for (_, _, reply) in valid_commits {
                        let _ = reply.send(Ok(()));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "event log write failed");
                    let err = sql_err(e);
                    for (_, _, reply) in appends {
                        let _ = reply.send(Err(err.clone()));
                    }
                    for (_, _, reply) in valid_commits {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
            }
        }

        // Requested trims run after this batch's commits.
        if !trims.is_empty() {
            let trimmed = self.trim().map_err(sql_err);
            for reply in trims {
                let _ = reply.send(trimmed.clone());
            }
        }
        close
    }

    fn write_transaction(
        &mut self,
        appends: &[AppendCmd],
        offsets: &[u64],
        commits: &[CommitCmd],
        ts: i64,
    ) -> rusqlite::Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO records (part, log_offset, key, value, timestamp_ms, traceparent)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for ((partition, record, _), offset) in appends.iter().zip(offsets) {
                insert.execute(params![
                    partition,
                    *offset as i64,
                    record.key,
                    record.value,
                    ts,
                    record.traceparent
                ])?;
            }
            let mut set_committed =
                tx.prepare_cached("UPDATE partitions SET committed_offset = ?2 WHERE part = ?1")?;
            for (partition, offset, _) in commits {
                set_committed.execute(params![partition, *offset as i64])?;
            }
        }
        tx.commit()
    }

    fn trim(&mut self) -> rusqlite::Result<u64> {
        self.last_trim = Instant::now();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // The ends first: the records that tell them may be deleted next.
        {
            let mut set_next =
                tx.prepare_cached("UPDATE partitions SET next_offset = ?2 WHERE part = ?1")?;
            for (p, end) in self.next.iter().enumerate() {
                set_next.execute(params![p as i64, *end as i64])?;
            }
        }
        let removed = tx.execute(
            "DELETE FROM records WHERE log_offset < (
                 SELECT committed_offset FROM partitions WHERE partitions.part = records.part)",
            [],
        )?;
        tx.commit()?;
        if removed > 0 {
            tracing::debug!(removed, "event log trimmed");
        }
        Ok(removed as u64)
    }
}

#[async_trait]
impl EventLog for EmbeddedLog {
    fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    fn assignment(&self) -> watch::Receiver<Vec<u32>> {
        self.inner.assignment.subscribe()
    }

    fn sole_consumer(&self) -> bool {
        true
    }

    async fn append(&self, partition: u32, record: NewRecord) -> Result<u64, LogError> {
        self.check_partition(partition)?;
        self.request(|reply| Command::Append {
            partition,
            record,
            reply,
        })
        .await
    }

    async fn poll(
        &self,
        partition: u32,
        from: u64,
        max: usize,
        max_wait: Duration,
    ) -> Result<Vec<LogRecord>, LogError> {
        self.check_partition(partition)?;
        let mut end_rx = self.inner.ends[partition as usize].subscribe();
        let deadline = tokio::time::Instant::now() + max_wait;
        loop {
            let end = *end_rx.borrow_and_update();
            if end > from {
                break;
            }
            tokio::select! {
                changed = end_rx.changed() => {
                    if changed.is_err() {
                        return Err(LogError::Closed);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
            }
        }
        let max = max.max(1);
        let tail = self.inner.tails[partition as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read(from, max);
        if let Some(records) = tail {
            return Ok(records);
        }
        let limit = max as i64;
        self.with_reader(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT log_offset, key, value, timestamp_ms, traceparent FROM records
                 WHERE part = ?1 AND log_offset >= ?2 ORDER BY log_offset LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![partition, from as i64, limit], |row| {
                Ok(LogRecord {
                    partition,
                    offset: row.get::<_, i64>(0)? as u64,
                    key: row.get(1)?,
                    value: row.get(2)?,
                    timestamp_ms: row.get(3)?,
                    traceparent: row.get(4)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn commit(&self, partition: u32, next_offset: u64) -> Result<(), LogError> {
        self.check_partition(partition)?;
        self.request(|reply| Command::Commit {
            partition,
            next_offset,
            reply,
        })
        .await
    }

    async fn committed(&self, partition: u32) -> Result<u64, LogError> {
        self.check_partition(partition)?;
        self.with_reader(move |conn| {
            conn.query_row(
                "SELECT committed_offset FROM partitions WHERE part = ?1",
                [partition],
                |r| r.get::<_, i64>(0),
            )
            .map(|v| v as u64)
        })
        .await
    }

    async fn end_offset(&self, partition: u32) -> Result<u64, LogError> {
        self.check_partition(partition)?;
        Ok(*self.inner.ends[partition as usize].borrow())
    }

    async fn trim(&self) -> Result<u64, LogError> {
        self.request(|reply| Command::Trim { reply }).await
    }

    async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self
            .inner
            .writer_tx
            .send(Command::Close { reply })
            .await
            .is_ok()
        {
            let _ = done.await;
        }
        let handle = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        self.inner
            .readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, options: EmbeddedLogOptions) -> EmbeddedLog {
        EmbeddedLog::open(&dir.join("eventlog.sqlite3"), 4, options).expect("open log")
    }

    async fn open_log(dir: PathBuf) -> Arc<dyn EventLog> {
        Arc::new(open(&dir, EmbeddedLogOptions::default()))
    }

    crate::event_log_conformance_suite!(open_log);

    /// The same contract when every poll reads the file.
    mod without_tail {
        use super::*;

        async fn open_log(dir: PathBuf) -> Arc<dyn EventLog> {
            let options = EmbeddedLogOptions {
                tail_bytes: 0,
                ..EmbeddedLogOptions::default()
            };
            Arc::new(open(&dir, options))
        }

        crate::event_log_conformance_suite!(open_log);
    }

    /// The same contract with an fsync per transaction.
    mod with_fsync {
        use super::*;

        async fn open_log(dir: PathBuf) -> Arc<dyn EventLog> {
            let options = EmbeddedLogOptions {
                fsync: true,
                ..EmbeddedLogOptions::default()
            };
            Arc::new(open(&dir, options))
        }

        crate::event_log_conformance_suite!(open_log);
    }

    fn record(i: u32) -> NewRecord {
        NewRecord {
            key: b"k".to_vec(),
            value: i.to_be_bytes().to_vec(),
            traceparent: String::new(),
        }
    }

    fn count_rows(dir: &Path) -> i64 {
        let conn = Connection::open(dir.join("eventlog.sqlite3")).unwrap();
        conn.query_row("SELECT COUNT(*) FROM records", [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn trim_deletes_consumed_records_from_disk_and_keeps_the_end_offset() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), EmbeddedLogOptions::default());
        for i in 0..10 {
            log.append(1, record(i)).await.unwrap();
        }
        log.commit(1, 10).await.unwrap();
        assert_eq!(log.trim().await.unwrap(), 10);
        assert_eq!(count_rows(dir.path()), 0);
        log.close().await;

        // Everything was trimmed, yet offsets continue where they were.
        let log = open(dir.path(), EmbeddedLogOptions::default());
        assert_eq!(log.end_offset(1).await.unwrap(), 10);
        assert_eq!(log.append(1, record(10)).await.unwrap(), 10);
        log.close().await;
    }

    #[tokio::test]
    async fn a_consumer_behind_the_tail_reads_the_file_and_gets_the_same_records() {
        let dir = tempfile::tempdir().unwrap();
        // 4 partitions share 84 bytes: partition 2 keeps 21 bytes, the last 3 records
        // of 7 bytes each (1-byte key, 4-byte value, 2-byte traceparent).
        let log = open(
            dir.path(),
            EmbeddedLogOptions {
                tail_bytes: 84,
                ..EmbeddedLogOptions::default()
            },
        );
        for i in 0..10 {
            let mut r = record(i);
            r.traceparent = format!("t{i}");
            assert_eq!(log.append(2, r).await.unwrap(), u64::from(i));
        }
        let tail = log.inner.tails[2].lock().unwrap().records.len();
        assert_eq!(tail, 3, "the tail holds what its budget allows");

        let wait = Duration::from_millis(100);
        let from_file = log.poll(2, 0, 100, wait).await.unwrap();
        let from_tail = log.poll(2, 7, 100, wait).await.unwrap();
        assert_eq!(from_file.len(), 10);
        assert_eq!(
            &from_file[7..],
            &from_tail[..],
            "both paths read the same records"
        );
        for (i, r) in from_file.iter().enumerate() {
            assert_eq!(r.offset, i as u64);
            assert_eq!(r.value, (i as u32).to_be_bytes().to_vec());
            assert_eq!(r.traceparent, format!("t{i}"));
        }
        // A poll's limit holds on the tail too.
        let two = log.poll(2, 7, 2, wait).await.unwrap();
        assert_eq!(two.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![7, 8]);
        // Past the end there is nothing yet.
        assert!(log.poll(2, 10, 100, wait).await.unwrap().is_empty());
        log.close().await;
    }

    #[tokio::test]
    async fn the_end_offset_survives_reopening_with_and_without_trims() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), EmbeddedLogOptions::default());
        for i in 0..5 {
            log.append(0, record(i)).await.unwrap();
        }
        log.close().await;
        // Appends wrote only their records: the end comes from the highest one.
        let log = open(dir.path(), EmbeddedLogOptions::default());
        assert_eq!(log.end_offset(0).await.unwrap(), 5);
        assert_eq!(log.end_offset(1).await.unwrap(), 0);
        assert_eq!(log.append(0, record(5)).await.unwrap(), 5);
        log.commit(0, 3).await.unwrap();
        assert_eq!(log.trim().await.unwrap(), 3);
        log.close().await;

        let log = open(dir.path(), EmbeddedLogOptions::default());
        assert_eq!(log.end_offset(0).await.unwrap(), 6);
        log.commit(0, 6).await.unwrap();
        assert_eq!(log.trim().await.unwrap(), 3);
        assert_eq!(count_rows(dir.path()), 0);
        log.close().await;
        // Nothing left on disk: the trim wrote the end down.
        let log = open(dir.path(), EmbeddedLogOptions::default());
        assert_eq!(log.end_offset(0).await.unwrap(), 6);
        assert_eq!(log.append(0, record(6)).await.unwrap(), 6);
        log.close().await;
    }

    #[tokio::test]
    async fn trim_runs_by_itself_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(
            dir.path(),
            EmbeddedLogOptions {
                trim_interval: Duration::ZERO,
                ..EmbeddedLogOptions::default()
            },
        );
        for i in 0..5 {
            log.append(0, record(i)).await.unwrap();
        }
        log.commit(0, 3).await.unwrap();
        // The next command's batch starts with the due trim.
        log.append(0, record(5)).await.unwrap();
        assert_eq!(count_rows(dir.path()), 3);
        log.close().await;
    }

    #[tokio::test]
    async fn changing_partitions_with_unconsumed_records_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eventlog.sqlite3");
        let log = EmbeddedLog::open(&path, 4, EmbeddedLogOptions::default()).unwrap();
        log.append(3, record(0)).await.unwrap();
        log.close().await;
        assert!(EmbeddedLog::open(&path, 8, EmbeddedLogOptions::default()).is_err());

        let log = EmbeddedLog::open(&path, 4, EmbeddedLogOptions::default()).unwrap();
        log.commit(3, 1).await.unwrap();
        log.close().await;
        let log = EmbeddedLog::open(&path, 2, EmbeddedLogOptions::default()).unwrap();
        assert_eq!(log.partitions(), 2);
        assert!(log.append(3, record(1)).await.is_err());
        log.close().await;
    }

    #[tokio::test]
    async fn closed_log_fails_fast() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), EmbeddedLogOptions::default());
        log.close().await;
        assert!(matches!(
            log.append(0, record(0)).await,
            Err(LogError::Closed)
        ));
    }
}
