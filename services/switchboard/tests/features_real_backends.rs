//! Edits, deletes, reactions, receipts and webhooks end to end with the four
//! services as separate processes on the real servers: Redis (presence), Kafka
//! (routing) and the CQL server (storage), as started by `deploy/local/up.sh`. The
//! effects of timeline events are applied by the CQL store's roll-forward; history
//! must show them, and a webhook must receive every event in order.

mod common;
mod http_support;

use std::time::{Duration, Instant};

use common::*;
use http_support::*;
use switchboard_client::{Client, Direction, MarkerKind};
use switchboard_proto::{ErrorCode, Message};

async fn start(setup: Setup) -> Services {
    // A broker that has just started creates its consumer-offsets topic on the first
    // group join, which can outlast the default wait for a sequence: wait longer, so
    // every ack carries the sequence the next request refers to.
    setup
        .start_services(&[(
            "SWITCHBOARD_ROUTING__SEQUENCE_WAIT_MS".into(),
            "30000".into(),
        )])
        .await
}

/// The conversation's history once `done` holds for it (the log is persisted by
/// the partition owner after the ack), or a panic with what it was after 60 s.
async fn history_when(
    client: &Client,
    conversation_id: &str,
    done: impl Fn(&[Message]) -> bool,
) -> Vec<Message> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let page = client
            .history(conversation_id, 0, Direction::Forward, 200)
            .await
            .expect("history");
        if done(&page.messages) {
            return page.messages;
        }
        assert!(
            Instant::now() < deadline,
            "history did not settle within 60 s: {:?}",
            page.messages
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn reactions(m: &Message) -> Vec<(String, u32, bool)> {
    m.reactions
        .iter()
        .map(|r| (r.emoji.clone(), r.count, r.mine))
        .collect()
}

#[tokio::test]
async fn edits_deletes_reactions_and_receipts_on_redis_kafka_and_cql() {
    let mut setup = Setup::new(true);
    setup.real_backends();
    allow_loopback_webhooks(&mut setup);
    let s = start(setup).await;
    let (alice, _a) = s.setup.connect("alice", "phone").await;
    let (bob, _b) = s.setup.connect("bob", "phone").await;
    let (carol, _c) = s.setup.connect("carol", "phone").await;
    let group = alice.create_group("real", ["bob", "carol"]).await.unwrap();
    let id = &group.conversation_id;
    // The receiver fails its first request: the dispatcher retries in order.
    let (url, mut deliveries) = webhook_receiver(1).await;
    let (status, body) =
        put_webhook(s.setup.gateway.listen, &s.setup.token("alice"), id, &url).await;
    let webhook = parse_webhook(status, &body);

    let first = alice.send(id, "frist").await.unwrap().seq;
    let second = alice.send(id, "to be deleted").await.unwrap().seq;
    let third = bob.send(id, "third").await.unwrap().seq;
    alice.edit(id, first, "first").await.unwrap();
    bob.react(id, first, "👍").await.unwrap();
    carol.react(id, first, "👍").await.unwrap();
    carol.react(id, first, "🎉").await.unwrap();
    alice.edit(id, second, "still to be deleted").await.unwrap();
    let last = alice.delete(id, second).await.unwrap().seq;
    assert_eq!(last, 9, "every event has its own sequence");
    assert_eq!(
        code_of(bob.edit(id, first, "mine now").await),
        ErrorCode::Forbidden
    );
    assert_eq!(code_of(bob.react(id, 42, "👍").await), ErrorCode::NotFound);

    let stored = history_when(&bob, id, |h| {
        h.len() as u64 == last && h.iter().any(|m| m.seq == second && m.deleted)
    })
    .await;
    assert_eq!(
        stored.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>()
    );
    let message = &stored[(first - 1) as usize];
    assert_eq!(message.body, "first");
    assert!(message.edited_at_ms > 0);
    assert_eq!(
        reactions(message),
        [("🎉".to_owned(), 1, false), ("👍".to_owned(), 2, true)]
    );
    let deleted = &stored[(second - 1) as usize];
    assert!(deleted.deleted && deleted.body.is_empty());
    assert!(
        stored.iter().all(|m| !m.body.contains("deleted")),
        "the deleted body and its edit's body are gone: {stored:?}"
    );
    let kinds: Vec<&str> = stored
        .iter()
        .map(|m| {
            if m.kind.is_empty() {
                "message"
            } else {
                m.kind.as_str()
            }
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "message", "message", "message", "edit", "reaction", "reaction", "reaction", "edit",
            "delete"
        ]
    );

    let (events, _) = receive_until(&mut deliveries, &webhook, last, Duration::from_secs(90)).await;
    assert_eq!(
        events.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>(),
        "the webhook got every event once acknowledged, in order"
    );
    assert_eq!(events[3].kind, "edit");

    // Receipts: carol read up to the third message, bob's device got everything.
    carol.read(id, third).await.unwrap();
    bob.mark(id, last, MarkerKind::Delivered).await.unwrap();
    let receipts = alice.receipts(id, first).await.unwrap();
    assert_eq!((receipts.read_by, receipts.delivered_to), (1, 2));
    let receipts = alice.receipts(id, third).await.unwrap();
    // bob sent the third message: only carol counts.
    assert_eq!((receipts.read_by, receipts.delivered_to), (1, 1));
    let receipts = alice.receipts(id, 0).await.unwrap();
    assert_eq!(receipts.seq, last);
    assert_eq!((receipts.read_by, receipts.delivered_to), (0, 1));

    // carol's unread: nothing after her marker is a message from someone else.
    let listed = carol
        .conversations()
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.conversation_id == *id)
        .expect("listed");
    assert_eq!(listed.read_seq, third);
    assert_eq!(listed.unread_count, 0);
    let listed = bob
        .conversations()
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.conversation_id == *id)
        .expect("listed");
    // alice's first message; the deleted one does not count, bob's own neither.
    assert_eq!((listed.unread_count, listed.delivered_seq), (1, last));

    let path = format!("/v1/conversations/{id}/webhooks/{}", webhook.webhook_id);
    let (status, body) = http(
        s.setup.gateway.listen,
        "DELETE",
        &path,
        &s.setup.token("alice"),
        None,
    )
    .await;
    assert_eq!(status, 204, "{body}");
}
