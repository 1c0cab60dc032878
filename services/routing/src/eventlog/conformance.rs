//! The conformance suite every [`EventLog`] implementation must pass.
//!
//! Each check is a generic async fn taking an `open` function that opens the log
//! stored at a location (a fresh temporary directory per check; opening the same
//! location again must see the same log). [`event_log_conformance_suite!`] turns them
//! into `#[tokio::test]`s:
//!
//! ```ignore
//! async fn open_log(dir: std::path::PathBuf) -> std::sync::Arc<dyn EventLog> { ... }
//! switchboard_routing::event_log_conformance_suite!(open_log);
//! ```
//!
//! The log must have at least 2 partitions.

use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{EventLog, NewRecord};

/// Long enough to never fire when the log works; only bounds a broken one.
const WAIT: Duration = Duration::from_secs(10);

fn record(key: &str, value: &str) -> NewRecord {
    NewRecord {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        traceparent: String::new(),
    }
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn read_all(log: &dyn EventLog, partition: u32, from: u64) -> Vec<(u64, String)> {
    let end = log.end_offset(partition).await.expect("end offset");
    let mut out = Vec::new();
    let mut pos = from;
    while pos < end {
        let batch = log.poll(partition, pos, 7, WAIT).await.expect("poll");
        assert!(
            !batch.is_empty(),
            "poll returned nothing below the end offset"
        );
        for r in batch {
            assert_eq!(r.partition, partition);
            assert!(r.offset >= pos, "records come in offset order");
            pos = r.offset + 1;
            out.push((r.offset, String::from_utf8(r.value).expect("utf8 value")));
        }
    }
    out
}

pub async fn append_and_read_in_order_per_partition<F, Fut>(open: F)
where
    F: Fn(PathBuf) -> Fut,
    Fut: Future<Output = Arc<dyn EventLog>>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path().to_owned()).await;
    assert!(log.partitions() >= 2);
    for i in 0..5u64 {
        assert_eq!(
            log.append(0, record("a", &format!("a{i}"))).await.unwrap(),
            i
        );
        assert_eq!(
            log.append(1, record("b", &format!("b{i}"))).await.unwrap(),
            i
        );
    }
    assert_eq!(log.end_offset(0).await.unwrap(), 5);
    let p0 = read_all(log.as_ref(), 0, 0).await;
    let expected: Vec<(u64, String)> = (0..5).map(|i| (i, format!("a{i}"))).collect();
    assert_eq!(p0, expected);
    let p1_from_3 = read_all(log.as_ref(), 1, 3).await;
    assert_eq!(p1_from_3, vec![(3, "b3".to_owned()), (4, "b4".to_owned())]);

    let limited = log.poll(0, 1, 2, WAIT).await.unwrap();
    assert_eq!(
        limited.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(limited[0].key, b"a".to_vec());
    assert_eq!(limited[0].traceparent, "");

    // The trace context travels with the record.
    let traced = NewRecord {
        traceparent: TRACEPARENT.to_owned(),
        ..record("a", "traced")
    };
    assert_eq!(log.append(0, traced).await.unwrap(), 5);
    let back = log.poll(0, 5, 1, WAIT).await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].traceparent, TRACEPARENT);
    assert_eq!(back[0].value, b"traced".to_vec());

    let assignment = log.assignment().borrow().clone();
    assert!(assignment.iter().all(|p| *p < log.partitions()));
    assert!(log
        .append(log.partitions(), record("x", "x"))
        .await
        .is_err());
    log.close().await;
}

pub async fn poll_waits_for_new_records<F, Fut>(open: F)
where
    F: Fn(PathBuf) -> Fut,
    Fut: Future<Output = Arc<dyn EventLog>>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path().to_owned()).await;
    let empty = log.poll(0, 0, 10, Duration::from_millis(20)).await.unwrap();
    assert!(empty.is_empty());

    let reader = {
        let log = log.clone();
        tokio::spawn(async move { log.poll(0, 0, 10, WAIT).await })
    };
    tokio::task::yield_now().await;
    log.append(0, record("k", "v")).await.unwrap();
    let got = reader.await.expect("reader task").unwrap();
    assert_eq!(got.len(), 1, "the waiting poll is woken by the append");
    assert_eq!(got[0].value, b"v".to_vec());
    log.close().await;
}

pub async fn appends_are_durable_across_reopen<F, Fut>(open: F)
where
    F: Fn(PathBuf) -> Fut,
    Fut: Future<Output = Arc<dyn EventLog>>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path().to_owned()).await;
    for i in 0..20 {
        log.append(1, record("k", &format!("v{i}"))).await.unwrap();
    }
    log.close().await;
    drop(log);

    let log = open(dir.path().to_owned()).await;
    let all = read_all(log.as_ref(), 1, 0).await;
    let expected: Vec<(u64, String)> = (0..20).map(|i| (i, format!("v{i}"))).collect();
    assert_eq!(all, expected);
    assert_eq!(log.append(1, record("k", "v20")).await.unwrap(), 20);
    log.close().await;
}

pub async fn committed_offset_resumes_after_reopen<F, Fut>(open: F)
where
    F: Fn(PathBuf) -> Fut,
    Fut: Future<Output = Arc<dyn EventLog>>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path().to_owned()).await;
    assert_eq!(log.committed(0).await.unwrap(), 0);
    for i in 0..6 {
        log.append(0, record("k", &format!("v{i}"))).await.unwrap();
    }
    log.commit(0, 4).await.unwrap();
    assert_eq!(log.committed(0).await.unwrap(), 4);
    assert_eq!(log.committed(1).await.unwrap(), 0);
    assert!(
        log.commit(0, 7).await.is_err(),
        "committing beyond the end is refused"
    );
    log.close().await;
    drop(log);

    let log = open(dir.path().to_owned()).await;
    let resume = log.committed(0).await.unwrap();
    assert_eq!(resume, 4);
    let rest = read_all(log.as_ref(), 0, resume).await;
    assert_eq!(rest, vec![(4, "v4".to_owned()), (5, "v5".to_owned())]);
    log.close().await;
}

pub async fn trim_keeps_unconsumed_records<F, Fut>(open: F)
where
    F: Fn(PathBuf) -> Fut,
    Fut: Future<Output = Arc<dyn EventLog>>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path().to_owned()).await;
    for i in 0..10 {
        log.append(0, record("k", &format!("v{i}"))).await.unwrap();
        log.append(1, record("k", &format!("w{i}"))).await.unwrap();
    }
    log.commit(0, 6).await.unwrap();
    log.trim().await.unwrap();

    // Reading from the start skips what was trimmed but never a record at or above
    // the committed offset.
    let p0 = log.poll(0, 0, 100, WAIT).await.unwrap();
    let first = p0.first().expect("records remain").offset;
    assert!(first <= 6);
    let offsets: Vec<u64> = p0.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (first..10).collect::<Vec<_>>());
    // Uncommitted partitions are untouched.
    assert_eq!(read_all(log.as_ref(), 1, 0).await.len(), 10);
    log.close().await;
}

pub async fn concurrent_appends_are_all_durable_and_ordered<F, Fut>(open: F)
where
    F: Fn(PathBuf) -> Fut,
    Fut: Future<Output = Arc<dyn EventLog>>,
{
    const N: usize = 300;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path().to_owned()).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let log = log.clone();
        tasks.spawn(async move {
            let partition = (i % 2) as u32;
            let value = format!("v{i}");
            let offset = log
                .append(partition, record("k", &value))
                .await
                .expect("append");
            (partition, offset, value)
        });
    }
    let mut acked = Vec::new();
    while let Some(done) = tasks.join_next().await {
        acked.push(done.expect("append task"));
    }
    log.close().await;
    drop(log);

    let log = open(dir.path().to_owned()).await;
    for partition in 0..2u32 {
        let stored = read_all(log.as_ref(), partition, 0).await;
        let mut mine: Vec<(u64, String)> = acked
            .iter()
            .filter(|(p, _, _)| *p == partition)
            .map(|(_, o, v)| (*o, v.clone()))
            .collect();
        mine.sort();
        // Every acked append is there, at the offset it was acked with, gapless.
        assert_eq!(stored, mine);
        assert_eq!(
            stored.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            (0..(N / 2) as u64).collect::<Vec<_>>()
        );
        let values: HashSet<&String> = stored.iter().map(|(_, v)| v).collect();
        assert_eq!(values.len(), N / 2);
    }
    log.close().await;
}

/// Generate the conformance tests for a log opened by `$open`, an
/// `async fn(std::path::PathBuf) -> std::sync::Arc<dyn EventLog>`.
#[macro_export]
macro_rules! event_log_conformance_suite {
    ($open:path) => {
        mod event_log_conformance {
            use super::*;
            use $crate::eventlog::conformance as suite;

            #[tokio::test]
            async fn append_and_read_in_order_per_partition() {
                suite::append_and_read_in_order_per_partition($open).await;
            }
            #[tokio::test]
            async fn poll_waits_for_new_records() {
                suite::poll_waits_for_new_records($open).await;
            }
            #[tokio::test]
            async fn appends_are_durable_across_reopen() {
                suite::appends_are_durable_across_reopen($open).await;
            }
            #[tokio::test]
            async fn committed_offset_resumes_after_reopen() {
                suite::committed_offset_resumes_after_reopen($open).await;
            }
            #[tokio::test]
            async fn trim_keeps_unconsumed_records() {
                suite::trim_keeps_unconsumed_records($open).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_appends_are_all_durable_and_ordered() {
                suite::concurrent_appends_are_all_durable_and_ordered($open).await;
            }
        }
    };
}
