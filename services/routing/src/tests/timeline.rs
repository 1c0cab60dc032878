//! Edits, deletes, reactions, replies and system events through Send.

use super::*;

fn event(sender: &str, conversation: &str, client_msg_id: &str, kind: &str) -> RouteSendRequest {
    RouteSendRequest {
        kind: kind.into(),
        ..send_req(sender, conversation, client_msg_id, "")
    }
}

fn system(
    actor: &str,
    conversation: &str,
    client_msg_id: &str,
    action: &str,
    users: &[&str],
) -> RouteSendRequest {
    RouteSendRequest {
        system: Some(SystemEvent {
            action: action.into(),
            actor_id: actor.into(),
            user_ids: users.iter().map(|u| u.to_string()).collect(),
            ..Default::default()
        }),
        ..event(actor, conversation, client_msg_id, "system")
    }
}

fn code(r: Result<tonic::Response<SendResult>, Status>) -> ErrorCode {
    status_error_code(&r.expect_err("rejected"))
}

#[tokio::test]
async fn malformed_events_are_invalid_requests_without_a_storage_call() {
    let p = peers().await;
    p.storage.add_conversation("c1", &["alice", "bob"]);
    let routing = start(&p.config).await;
    let mut client = routing.client.clone();

    let bad = vec![
        ("unknown kind", event("alice", "c1", "b1", "poke")),
        ("edit without target", event("alice", "c1", "b2", "edit")),
        (
            "delete without target",
            event("alice", "c1", "b3", "delete"),
        ),
        (
            "reaction without emoji",
            RouteSendRequest {
                target_seq: 1,
                ..event("alice", "c1", "b4", "reaction")
            },
        ),
        (
            "emoji over 32 bytes",
            RouteSendRequest {
                target_seq: 1,
                emoji: "x".repeat(33),
                ..event("alice", "c1", "b5", "reaction")
            },
        ),
        (
            "emoji with a control character",
            RouteSendRequest {
                target_seq: 1,
                emoji: "\u{7}".into(),
                ..event("alice", "c1", "b6", "reaction")
            },
        ),
        (
            "system without the event",
            event("alice", "c1", "b7", "system"),
        ),
        (
            "system acted by someone else",
            system("alice", "c1", "b8", "renamed", &[])
                .tap(|r| r.system.as_mut().unwrap().actor_id = "bob".into()),
        ),
        (
            "system event on a message",
            system("alice", "c1", "b9", "renamed", &[]).tap(|r| r.kind = "message".into()),
        ),
        (
            "target on a plain message",
            RouteSendRequest {
                target_seq: 1,
                ..send_req("alice", "c1", "b10", "hi")
            },
        ),
        (
            "body on a delete",
            RouteSendRequest {
                target_seq: 1,
                ..send_req("alice", "c1", "b11", "hi")
            }
            .tap(|r| r.kind = "delete".into()),
        ),
        (
            "too many mentions",
            RouteSendRequest {
                mentions: (0..51).map(|i| format!("u{i}")).collect(),
                ..send_req("alice", "c1", "b12", "hi")
            },
        ),
    ];
    for (what, req) in bad {
        assert_eq!(
            code(client.send(req).await),
            ErrorCode::InvalidRequest,
            "{what}"
        );
    }
    assert!(
        p.storage.authorized().is_empty(),
        "shape errors never reach storage"
    );
    assert!(p.storage.stored("c1").is_empty());
    routing.stop().await;
}

trait Tap: Sized {
    fn tap(self, f: impl FnOnce(&mut Self)) -> Self;
}

impl Tap for RouteSendRequest {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}

#[tokio::test]
async fn events_are_authorized_refused_before_the_log_and_sequenced_with_their_fields() {
    let p = peers().await;
    p.storage.add_conversation("c1", &["alice", "bob"]);
    let routing = start(&p.config).await;
    let mut client = routing.client.clone();

    let first = client
        .send(send_req("alice", "c1", "m1", "hello"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.seq, 1);
    assert!(
        p.storage.authorized().is_empty(),
        "a plain message is not authorized"
    );

    // Each refusal carries storage's code, and nothing reaches the log.
    for (id, refusal) in [
        ("r1", ErrorCode::Forbidden),
        ("r2", ErrorCode::NotMember),
        ("r3", ErrorCode::Banned),
        ("r4", ErrorCode::InvalidRequest),
        ("r5", ErrorCode::NotFound),
    ] {
        p.storage.refuse(id, refusal);
        let edit = RouteSendRequest {
            target_seq: 1,
            body: "changed".into(),
            ..event("bob", "c1", id, "edit")
        };
        assert_eq!(code(client.send(edit).await), refusal);
    }
    // A reference to a message that does not exist.
    let reply = RouteSendRequest {
        reply_to_seq: 9,
        ..send_req("bob", "c1", "r6", "re")
    };
    assert_eq!(code(client.send(reply).await), ErrorCode::NotFound);

    // Accepted events carry every field into the stored message, gapless.
    let accepted = vec![
        RouteSendRequest {
            reply_to_seq: 1,
            thread_root_seq: 1,
            mentions: vec!["alice".into(), "alice".into()],
            from_bot: true,
            ..send_req("bob", "c1", "a1", "re")
        },
        RouteSendRequest {
            target_seq: 1,
            body: "hello, edited".into(),
            ..event("alice", "c1", "a2", "edit")
        },
        RouteSendRequest {
            target_seq: 1,
            emoji: "👍".into(),
            remove: true,
            ..event("bob", "c1", "a3", "reaction")
        },
        system("alice", "c1", "a4", "renamed", &[])
            .tap(|r| r.system.as_mut().unwrap().name = "Team".into()),
    ];
    for (i, req) in accepted.into_iter().enumerate() {
        let r = client.send(req).await.unwrap().into_inner();
        assert_eq!(r.seq, i as u64 + 2);
    }
    let stored = p.storage.stored("c1");
    assert_eq!(
        stored.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5],
        "refused events took no sequence"
    );
    let reply = &stored[1];
    assert_eq!(reply.kind, "");
    assert_eq!((reply.reply_to_seq, reply.thread_root_seq), (1, 1));
    assert_eq!(reply.mentions, vec!["alice"], "mentions are distinct");
    assert!(reply.from_bot);
    let edit = &stored[2];
    assert_eq!(
        (edit.kind.as_str(), edit.target_seq, edit.body.as_str()),
        ("edit", 1, "hello, edited")
    );
    assert_eq!(edit.content_type, "text/plain");
    let reaction = &stored[3];
    assert_eq!(
        (
            reaction.kind.as_str(),
            reaction.emoji.as_str(),
            reaction.remove
        ),
        ("reaction", "👍", true)
    );
    assert_eq!(reaction.content_type, "");
    let renamed = &stored[4];
    assert_eq!(renamed.kind, "system");
    assert_eq!(renamed.system.as_ref().unwrap().name, "Team");
    // Every event but the plain message was authorized, as it was then appended.
    let authorized: Vec<String> = p
        .storage
        .authorized()
        .into_iter()
        .map(|m| m.client_msg_id)
        .collect();
    assert_eq!(
        authorized,
        vec!["r1", "r2", "r3", "r4", "r5", "r6", "a1", "a2", "a3", "a4"]
    );
    let metrics = http_get(routing.admin, "/metrics").await;
    assert!(
        metrics.contains("switchboard_routing_sends_rejected_total{code=\"banned\"} 1"),
        "{metrics}"
    );
    routing.stop().await;

    // Nothing refused was appended to the log: its end is the accepted count.
    let log = EmbeddedLog::open(
        &p.dir.path().join("eventlog.sqlite3"),
        4,
        EmbeddedLogOptions::default(),
    )
    .unwrap();
    let partition = crate::partition_for("c1", 4);
    assert_eq!(log.end_offset(partition).await.unwrap(), 5);
    log.close().await;
}

#[tokio::test]
async fn a_retried_event_returns_the_original_even_when_it_would_now_be_refused() {
    let p = peers().await;
    p.storage.add_conversation("c1", &["alice", "bob"]);
    let routing = start(&p.config).await;
    let mut client = routing.client.clone();
    client
        .send(send_req("alice", "c1", "m1", "hello"))
        .await
        .unwrap();

    let delete = RouteSendRequest {
        target_seq: 1,
        ..event("alice", "c1", "d1", "delete")
    };
    let first = client.send(delete.clone()).await.unwrap().into_inner();
    assert_eq!((first.seq, first.duplicate), (2, false));
    // Authorize would now say not_found (the target is deleted): the retry is
    // answered from the dedupe key instead.
    let again = client.send(delete.clone()).await.unwrap().into_inner();
    assert!(again.duplicate);
    assert_eq!(
        (again.seq, &again.message_id),
        (first.seq, &first.message_id)
    );
    let other = RouteSendRequest {
        client_msg_id: "d2".into(),
        ..delete
    };
    assert_eq!(code(client.send(other).await), ErrorCode::NotFound);

    // The same for leaving: the retry comes from someone no longer a member.
    let leave = system("bob", "c1", "l1", "member_left", &["bob"]);
    let left = client.send(leave.clone()).await.unwrap().into_inner();
    assert_eq!(left.seq, 3);
    let again = client.send(leave).await.unwrap().into_inner();
    assert!(again.duplicate);
    assert_eq!(again.seq, 3);
    assert_eq!(p.storage.stored("c1").len(), 3);
    routing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_events_reach_the_users_they_name_and_membership_changes_apply_at_once() {
    let p = peers().await;
    p.storage.add_conversation("g1", &["alice", "bob", "carol"]);
    p.online("alice", &p.gateway_a_url);
    p.online("carol", &p.gateway_a_url);
    p.online("bob", &p.gateway_b_url);
    p.online("dave", &p.gateway_b_url);
    let routing = start(&p.config).await;
    let mut client = routing.client.clone();

    // bob's send fills the member cache (TTL 2 s).
    assert_eq!(
        client
            .send(send_req("bob", "g1", "m1", "hi"))
            .await
            .unwrap()
            .into_inner()
            .seq,
        1
    );
    let kick = client
        .send(system("alice", "g1", "k1", "members_removed", &["bob"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kick.seq, 2);
    assert_eq!(p.storage.members("g1"), vec!["alice", "carol"]);
    // Within the cache TTL: the cached list that still had bob was dropped.
    assert_eq!(
        code(
            client
                .send(send_req("bob", "g1", "m2", "still here?"))
                .await
        ),
        ErrorCode::NotMember
    );

    // The kicked user got the event (2 deliveries at B: the message and the kick),
    // the remaining members too (A).
    let at_b = p.gateway_b.wait_deliveries(2).await;
    assert_eq!(message_seqs(&at_b), vec![1, 2]);
    assert_eq!(at_b[1].recipients, vec!["bob"]);
    let at_a = p.gateway_a.wait_deliveries(2).await;
    assert_eq!(message_seqs(&at_a), vec![1, 2]);
    let mut recipients = at_a[1].recipients.clone();
    recipients.sort();
    assert_eq!(recipients, vec!["alice", "carol"]);

    // A new member is delivered to at once, and a leaving member sees their leave.
    client
        .send(system("alice", "g1", "add1", "members_added", &["dave"]))
        .await
        .unwrap();
    client
        .send(send_req("carol", "g1", "m3", "welcome"))
        .await
        .unwrap();
    client
        .send(system("carol", "g1", "left1", "member_left", &["carol"]))
        .await
        .unwrap();
    let at_b = p.gateway_b.wait_deliveries(5).await;
    assert_eq!(message_seqs(&at_b), vec![1, 2, 3, 4, 5]);
    assert!(at_b[2..].iter().all(|d| d.recipients == vec!["dave"]));
    let at_a = p.gateway_a.wait_deliveries(5).await;
    assert_eq!(message_seqs(&at_a), vec![1, 2, 3, 4, 5]);
    let mut last = at_a[4].recipients.clone();
    last.sort();
    assert_eq!(last, vec!["alice", "carol"], "the leaver sees the leave");
    assert_eq!(
        code(client.send(send_req("carol", "g1", "m4", "bye")).await),
        ErrorCode::NotMember
    );
    routing.stop().await;
}
