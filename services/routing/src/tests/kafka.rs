//! The routing service over gRPC with the Kafka event log (a real broker, see
//! `eventlog::kafka::tests`): two instances in one consumer group share the
//! partitions, one stops mid-stream and the other continues every conversation's
//! sequence without a gap or a number used twice.

use super::webhooks::{webhook, Receiver, SECRET};
use super::*;
use crate::eventlog::kafka_test_support::{require_kafka, unique};

const CONVERSATIONS: usize = 8;

fn kafka_config(p: &Peers, name: &str) -> Config {
    let mut config = p.config.clone();
    config.routing.backend = "kafka".into();
    config.routing.kafka_brokers = require_kafka();
    config.routing.kafka_topic = unique(name);
    config.routing.kafka_group = format!("{}-group", unique(name));
    config.routing.partitions = 4;
    config
}

async fn wait_ready(admin: std::net::SocketAddr) {
    tokio::time::timeout(WAIT * 3, async {
        loop {
            if http_get(admin, "/readyz").await.starts_with("HTTP/1.1 200") {
                return;
            }
            // Readiness has no push signal over HTTP: poll it.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("routing ready in time");
}

/// The `switchboard_routing_partitions_owned` gauge of an instance.
async fn owned(admin: std::net::SocketAddr) -> u32 {
    let metrics = http_get(admin, "/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("switchboard_routing_partitions_owned "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Wait until the instances own `want` partitions each.
async fn wait_owned(admins: &[std::net::SocketAddr], want: impl Fn(&[u32]) -> bool) {
    tokio::time::timeout(WAIT * 3, async {
        loop {
            let mut counts = Vec::new();
            for a in admins {
                counts.push(owned(*a).await);
            }
            if want(&counts) {
                return;
            }
            // The gauge has no push signal over HTTP: poll it.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("partition ownership in time");
}

async fn send_all(
    client: &RoutingClient<switchboard_rpc::Channel>,
    range: std::ops::Range<usize>,
) -> Vec<(String, SendResult)> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in range {
        let mut client = client.clone();
        tasks.spawn(async move {
            let conversation = format!("kc{}", i % CONVERSATIONS);
            let id = format!("m{i}");
            let sent = client
                .send(send_req("u0", &conversation, &id, "hi"))
                .await
                .expect("send accepted")
                .into_inner();
            (id, sent)
        });
    }
    let mut out = Vec::new();
    while let Some(done) = tasks.join_next().await {
        out.push(done.expect("send task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_partitions_and_one_takes_over_gaplessly() {
    let p = peers().await;
    for c in 0..CONVERSATIONS {
        p.storage.add_conversation(&format!("kc{c}"), &["u0", "u1"]);
    }
    let mut config = kafka_config(&p, "takeover-service");
    // A send acked before its owner sequenced it reports seq 0; storage has the truth.
    config.routing.sequence_wait_ms = 2_000;
    let a = start(&config).await;
    wait_ready(a.admin).await;
    wait_owned(&[a.admin], |c| c[0] == 4).await;
    let b = start(&config).await;
    wait_ready(b.admin).await;
    // The group splits the partitions between the two instances.
    wait_owned(&[a.admin, b.admin], |c| {
        c[0] > 0 && c[1] > 0 && c[0] + c[1] == 4
    })
    .await;

    const N: usize = 160;
    let mut sent = send_all(&a.client, 0..N / 4).await;
    sent.extend(send_all(&b.client, N / 4..N / 2).await);

    // A stops while B keeps sending: A's partitions move to B mid-stream.
    let during = {
        let client = b.client.clone();
        tokio::spawn(async move { send_all(&client, N / 2..3 * N / 4).await })
    };
    a.stop().await;
    sent.extend(during.await.expect("sends during the takeover"));
    wait_owned(&[b.admin], |c| c[0] == 4).await;
    sent.extend(send_all(&b.client, 3 * N / 4..N).await);
    assert_eq!(sent.len(), N);
    assert!(sent.iter().all(|(_, r)| !r.duplicate));

    // Every message gets sequenced (by A before it stopped, or by B after).
    let mut appends = p.storage.appends.subscribe();
    tokio::time::timeout(
        WAIT * 3,
        appends.wait_for(|_| {
            (0..CONVERSATIONS)
                .map(|c| p.storage.stored(&format!("kc{c}")).len())
                .sum::<usize>()
                >= N
        }),
    )
    .await
    .expect("all messages stored in time")
    .expect("counter alive");

    let mut stored_ids = BTreeSet::new();
    for c in 0..CONVERSATIONS {
        let stored = p.storage.stored(&format!("kc{c}"));
        let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
        assert_eq!(
            seqs,
            (1..=stored.len() as u64).collect::<Vec<_>>(),
            "conversation kc{c} is gapless with no sequence used twice"
        );
        for m in stored {
            assert!(stored_ids.insert(m.client_msg_id.clone()), "stored once");
        }
    }
    assert_eq!(stored_ids.len(), N);
    // Acks that carried a sequence name the stored one.
    for (id, result) in &sent {
        if result.seq != 0 {
            let stored = p.storage.stored(&result.conversation_id);
            let m = stored
                .iter()
                .find(|m| &m.client_msg_id == id)
                .expect("acked message is stored");
            assert_eq!(m.seq, result.seq);
            assert_eq!(m.message_id, result.message_id);
        }
    }
    b.stop().await;
}

/// The `switchboard_routing_webhooks_dispatching` gauge of an instance.
async fn dispatching(admin: std::net::SocketAddr) -> u32 {
    let metrics = http_get(admin, "/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("switchboard_routing_webhooks_dispatching "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_owner_dispatches_webhooks_and_a_takeover_continues_from_the_cursor() {
    let p = peers().await;
    let receiver = Receiver::start_with(0, SECRET).await;
    for c in 0..CONVERSATIONS {
        let cid = format!("kc{c}");
        p.storage.add_conversation(&cid, &["u0", "u1"]);
        p.storage
            .put_webhook(webhook(&format!("w{c}"), &cid, &receiver.url, 0));
    }
    let mut config = kafka_config(&p, "takeover-webhooks");
    config.routing.sequence_wait_ms = 2_000;
    let a = start(&config).await;
    wait_ready(a.admin).await;
    wait_owned(&[a.admin], |c| c[0] == 4).await;
    let b = start(&config).await;
    wait_ready(b.admin).await;
    wait_owned(&[a.admin, b.admin], |c| {
        c[0] > 0 && c[1] > 0 && c[0] + c[1] == 4
    })
    .await;
    // Each webhook is dispatched by exactly one instance: its partition's owner.
    tokio::time::timeout(WAIT * 3, async {
        loop {
            if dispatching(a.admin).await + dispatching(b.admin).await == CONVERSATIONS as u32 {
                return;
            }
            // The gauge has no push signal over HTTP: poll it.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("every webhook dispatched once");

    const N: usize = 80;
    send_all(&a.client, 0..N / 4).await;
    send_all(&b.client, N / 4..N / 2).await;
    a.stop().await;
    wait_owned(&[b.admin], |c| c[0] == 4).await;
    send_all(&b.client, N / 2..N).await;

    // Every event of every conversation reaches its webhook: at least once, in
    // sequence order (a batch in flight at the takeover may come twice), and the
    // stored cursor ends at the conversation's last sequence.
    for c in 0..CONVERSATIONS {
        let cid = format!("kc{c}");
        let id = format!("w{c}");
        let mut appends = p.storage.appends.subscribe();
        tokio::time::timeout(
            WAIT * 3,
            appends.wait_for(|_| p.storage.stored(&cid).len() == N / CONVERSATIONS),
        )
        .await
        .expect("stored in time")
        .expect("counter alive");
        let last = (N / CONVERSATIONS) as u64;
        p.storage.wait_delivered(&id, last).await;
        let acked = receiver.acknowledged_by(&id);
        let mut highest = 0;
        for seq in &acked {
            assert!(*seq <= highest + 1, "{id}: {acked:?} skips past {highest}");
            highest = highest.max(*seq);
        }
        assert_eq!(highest, last, "{id}: {acked:?}");
    }
    assert_eq!(receiver.malformed(), Vec::<String>::new());
    b.stop().await;
}

#[tokio::test]
async fn readiness_stays_false_while_kafka_is_unreachable() {
    let p = peers().await;
    let mut config = kafka_config(&p, "unreachable");
    // Nothing listens on port 1: the log keeps retrying to open.
    config.routing.kafka_brokers = "127.0.0.1:1".into();
    config.cluster.rpc_timeout_ms = 500;
    let routing = start(&config).await;
    // No signal says "an attempt failed": give a few attempts (each bounded by
    // the 500 ms request timeout) time to fail, then look.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !routing.task.is_finished(),
        "an unreachable kafka is retried, not fatal"
    );
    let ready = http_get(routing.admin, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(http_get(routing.admin, "/healthz")
        .await
        .starts_with("HTTP/1.1 200"));
    // Shutdown ends the retries.
    routing.stop().await;
}
