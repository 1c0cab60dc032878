//! Tests of the Kafka event log against a real broker: `SB_TEST_KAFKA_BROKERS`
//! (default `127.0.0.1:9092`, started by `deploy/local/up.sh kafka`). Every test
//! uses its own topic and group (`sbtest-<run>-<name>`); every wait is bounded.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::*;

/// Bounds every wait on the broker; only a broken log or broker reaches it.
const WAIT: Duration = Duration::from_secs(60);
const PARTITIONS: u32 = 4;

pub(crate) fn test_brokers() -> String {
    std::env::var("SB_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Fail (never skip) with a clear message when the broker is not there.
pub(crate) fn require_kafka() -> String {
    let brokers = test_brokers();
    let first = brokers
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let addrs: Vec<std::net::SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&first)
        .map(|a| a.collect())
        .unwrap_or_default();
    let reachable = addrs
        .iter()
        .any(|a| std::net::TcpStream::connect_timeout(a, Duration::from_secs(2)).is_ok());
    assert!(
        reachable,
        "kafka is not reachable at {brokers} (SB_TEST_KAFKA_BROKERS); \
         start it with `deploy/local/up.sh kafka`"
    );
    brokers
}

/// A name unique to this test run.
pub(crate) fn unique(name: &str) -> String {
    static RUN: OnceLock<String> = OnceLock::new();
    let run = RUN.get_or_init(|| format!("{:08x}", rand::Rng::gen::<u32>(&mut rand::thread_rng())));
    format!("sbtest-{run}-{name}")
}

pub(crate) fn options(name: &str, partitions: u32) -> KafkaLogOptions {
    KafkaLogOptions {
        brokers: require_kafka(),
        topic: name.to_owned(),
        group: format!("{name}-group"),
        partitions,
        replication_factor: 1,
        delivery_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(10),
        session_timeout: Duration::from_secs(6),
        release_timeout: Duration::from_secs(10),
        security: KafkaSecurity::default(),
    }
}

async fn wait_assignment(log: &dyn EventLog, want: impl Fn(&[u32]) -> bool) -> Vec<u32> {
    let mut rx = log.assignment();
    let got = tokio::time::timeout(WAIT, rx.wait_for(|a| want(a)))
        .await
        .expect("kafka assignment in time")
        .expect("assignment watch alive");
    got.clone()
}

async fn open_owning_all(options: KafkaLogOptions) -> KafkaLog {
    let partitions = options.partitions;
    let log = tokio::time::timeout(WAIT, KafkaLog::open(options))
        .await
        .expect("open in time")
        .expect("open kafka log");
    wait_assignment(&log, |a| a.len() == partitions as usize).await;
    log
}

async fn delete_topic(topic: &str) {
    let admin: AdminClient<LogContext> = base_config(&options(topic, 1))
        .create_with_context(LogContext)
        .expect("admin client");
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let _ = tokio::time::timeout(WAIT, admin.delete_topics(&[topic], &opts)).await;
}

/// The conformance factory: the directory's name names the topic and the group,
/// so opening the same directory again opens the same log.
async fn open_log(dir: PathBuf) -> Arc<dyn EventLog> {
    let name = dir
        .file_name()
        .expect("temporary directory has a name")
        .to_string_lossy()
        .trim_start_matches('.')
        .to_ascii_lowercase();
    Arc::new(open_owning_all(options(&unique(&name), PARTITIONS)).await)
}

crate::event_log_conformance_suite!(open_log);

fn record(key: &str, value: &str) -> NewRecord {
    NewRecord {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        traceparent: String::new(),
    }
}

async fn read_range(log: &dyn EventLog, partition: u32, from: u64, to: u64) -> Vec<LogRecord> {
    let mut out = Vec::new();
    let mut pos = from;
    while pos < to {
        let batch = log
            .poll(partition, pos, (to - pos) as usize, WAIT)
            .await
            .expect("poll");
        assert!(!batch.is_empty(), "records below the end arrive in time");
        for r in batch {
            assert_eq!(r.offset, pos, "gapless offset order");
            pos += 1;
            out.push(r);
        }
    }
    out
}

/// Stand-in for the owner supervisor of one instance: releases every partition
/// that leaves the assignment (after `before_release` ran for it).
fn release_revoked(log: Arc<KafkaLog>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut rx = log.assignment();
        let mut owned: Vec<u32> = rx.borrow_and_update().clone();
        while rx.changed().await.is_ok() {
            let now = rx.borrow_and_update().clone();
            for p in owned.iter().filter(|p| !now.contains(p)) {
                log.released(*p);
            }
            owned = now;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_takes_over_at_the_committed_offset() {
    let topic = unique("takeover");
    let a = Arc::new(open_owning_all(options(&topic, PARTITIONS)).await);
    let a_releases = release_revoked(a.clone());
    for p in 0..PARTITIONS {
        for i in 0..10 {
            a.append(p, record(&format!("c{p}"), &format!("p{p}-{i}")))
                .await
                .expect("append");
        }
    }
    // Instance A consumes part of every partition and commits it.
    for p in 0..PARTITIONS {
        let got = read_range(a.as_ref(), p, 0, 6).await;
        assert_eq!(got.last().map(|r| r.offset), Some(5));
        a.commit(p, 6).await.expect("commit while owning");
    }

    // Instance B joins: the partitions are split between A and B.
    let b = Arc::new(
        tokio::time::timeout(WAIT, KafkaLog::open(options(&topic, PARTITIONS)))
            .await
            .expect("open b in time")
            .expect("open b"),
    );
    let b_releases = release_revoked(b.clone());
    let b_first = wait_assignment(b.as_ref(), |a| !a.is_empty()).await;
    let a_now = wait_assignment(a.as_ref(), |a| a.len() < PARTITIONS as usize).await;
    for p in &b_first {
        assert!(!a_now.contains(p), "partition {p} has one owner");
        assert!(
            a.commit(*p, 7).await.is_err(),
            "a commit for a released partition is refused"
        );
    }

    // A reads one more record of a partition it keeps and stops: B gets them all.
    let kept = *a_now.first().expect("a keeps a partition");
    read_range(a.as_ref(), kept, 6, 7).await;
    a.commit(kept, 7).await.expect("commit kept partition");
    a.close().await;
    a_releases.abort();
    wait_assignment(b.as_ref(), |a| a.len() == PARTITIONS as usize).await;

    for p in 0..PARTITIONS {
        let resume = b.committed(p).await.expect("committed");
        let expected = if p == kept { 7 } else { 6 };
        assert_eq!(resume, expected, "partition {p} resumes at the last commit");
        let rest = read_range(b.as_ref(), p, resume, 10).await;
        let values: Vec<String> = rest
            .iter()
            .map(|r| String::from_utf8(r.value.clone()).unwrap())
            .collect();
        let want: Vec<String> = (resume..10).map(|i| format!("p{p}-{i}")).collect();
        assert_eq!(values, want);
        // B continues the log where A's records end.
        assert_eq!(b.append(p, record("c", "next")).await.unwrap(), 10);
    }
    b.close().await;
    b_releases.abort();
    delete_topic(&topic).await;
}

#[tokio::test]
async fn a_topic_with_another_partition_count_is_refused() {
    let topic = unique("mismatch");
    let log = open_owning_all(options(&topic, 2)).await;
    log.close().await;
    let refused = tokio::time::timeout(WAIT, KafkaLog::open(options(&topic, 3)))
        .await
        .expect("answer in time");
    match refused {
        Err(KafkaOpenError::Refused(msg)) => {
            assert!(msg.contains("2 partitions"), "{msg}");
            assert!(msg.contains("routing.partitions is 3"), "{msg}");
        }
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("a topic with 2 partitions opened as 3"),
    }
    delete_topic(&topic).await;
}

#[tokio::test]
async fn unreachable_brokers_are_reported_as_unreachable() {
    let mut opts = options(&unique("nobroker"), 2);
    // Nothing listens on port 1.
    opts.brokers = "127.0.0.1:1".into();
    opts.request_timeout = Duration::from_secs(2);
    let result = tokio::time::timeout(WAIT, KafkaLog::open(opts))
        .await
        .expect("open gives up within its request timeout");
    match result {
        Err(KafkaOpenError::Unreachable(msg)) => assert!(msg.contains("127.0.0.1:1"), "{msg}"),
        Err(other) => panic!("expected unreachable, got {other}"),
        Ok(_) => panic!("opened a log without a broker"),
    }
}

#[tokio::test]
async fn appends_without_a_broker_fail_within_the_delivery_timeout() {
    let mut opts = options(&unique("nodelivery"), 2);
    opts.brokers = "127.0.0.1:1".into();
    opts.delivery_timeout = Duration::from_secs(1);
    let producer = create_producer(&opts).expect("producer");
    let sent = tokio::time::timeout(
        WAIT,
        producer.send(
            FutureRecord::to(&opts.topic)
                .partition(0)
                .key("k")
                .payload("v"),
            opts.delivery_timeout,
        ),
    )
    .await
    .expect("the delivery fails instead of hanging");
    assert!(sent.is_err(), "no broker, no delivery");
}

#[tokio::test]
async fn traceparent_travels_in_a_record_header() {
    let topic = unique("headers");
    let log = open_owning_all(options(&topic, 2)).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    log.append(
        1,
        NewRecord {
            traceparent: traceparent.into(),
            ..record("conv", "v")
        },
    )
    .await
    .unwrap();
    // Read with a plain consumer: the header is Kafka's, not an encoding of ours.
    let consumer: BaseConsumer = base_config(&options(&topic, 2))
        .set("group.id", format!("{topic}-plain"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 1, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let header = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                assert_eq!(m.key(), Some(&b"conv"[..]));
                return m.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == TRACEPARENT_HEADER)
                        .and_then(|h| h.value.map(|v| v.to_vec()))
                });
            }
        }
        panic!("record not read in time");
    })
    .await
    .unwrap();
    assert_eq!(header.as_deref(), Some(traceparent.as_bytes()));
    log.close().await;
    delete_topic(&topic).await;
}

/// Not a check: prints append latency (acks=all) against the broker.
/// `cargo test -p switchboard-routing --lib append_latency -- --ignored --nocapture`
#[tokio::test]
#[ignore = "measurement, run by hand"]
async fn append_latency() {
    let topic = unique("latency");
    let log = open_owning_all(options(&topic, PARTITIONS)).await;
    for i in 0..50 {
        log.append(i % PARTITIONS, record("w", "warm"))
            .await
            .unwrap();
    }
    let mut sequential = Vec::new();
    for i in 0..2000u32 {
        let started = Instant::now();
        log.append(i % PARTITIONS, record("k", &format!("v{i}")))
            .await
            .unwrap();
        sequential.push(started.elapsed());
    }
    let log = Arc::new(log);
    let mut concurrent = Vec::new();
    for round in 0..20u32 {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..64u32 {
            let log = log.clone();
            tasks.spawn(async move {
                let started = Instant::now();
                log.append((round + i) % PARTITIONS, record("k", "v"))
                    .await
                    .unwrap();
                started.elapsed()
            });
        }
        while let Some(d) = tasks.join_next().await {
            concurrent.push(d.unwrap());
        }
    }
    for (name, mut v) in [("sequential", sequential), ("64 concurrent", concurrent)] {
        v.sort();
        let q = |f: f64| v[((v.len() as f64 * f) as usize).min(v.len() - 1)];
        println!(
            "append latency {name}: n={} p50={:?} p99={:?} max={:?}",
            v.len(),
            q(0.50),
            q(0.99),
            v[v.len() - 1]
        );
    }
    log.close().await;
    delete_topic(&topic).await;
}
