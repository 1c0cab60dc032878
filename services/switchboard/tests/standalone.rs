//! End-to-end tests of `switchboard standalone`: real processes, real sockets, the Rust
//! client library. Each test names the promise of the delivery contract it checks.

mod common;

use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use switchboard_client::{ClientError, Direction, Encoding, Event, MembersAction};
use switchboard_proto::{ErrorCode, SyncCursor};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message as WsMessage};

#[tokio::test]
async fn messages_reach_every_session_of_every_member_in_order() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let token = setup.token("alice");
    let (alice_phone, mut alice_phone_ev) =
        connect_to(&setup.gateway, &token, "phone", Encoding::Json).await;
    let (_alice_laptop, mut alice_laptop_ev) =
        connect_to(&setup.gateway, &token, "laptop", Encoding::Proto).await;
    let (bob, mut bob_ev) = setup.connect("bob", "phone").await;

    let conv = alice_phone.create_direct("bob").await.unwrap();
    assert_eq!(conv.kind, "direct");
    let mut members = conv.members.clone();
    members.sort();
    assert_eq!(members, ["alice", "bob"]);

    // Many sends in flight at once from one connection are still sequenced in order.
    let bodies: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
    let sends = bodies
        .iter()
        .map(|b| alice_phone.send(&conv.conversation_id, b));
    let acks = futures::future::join_all(sends).await;
    let seqs: Vec<u64> = acks.into_iter().map(|a| a.unwrap().seq).collect();
    assert_eq!(seqs, (1..=30).collect::<Vec<_>>());

    for events in [&mut bob_ev, &mut alice_laptop_ev, &mut alice_phone_ev] {
        let got = messages(events, &conv.conversation_id, 30).await;
        let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
        let bodies: Vec<&str> = got.iter().map(|m| m.body.as_str()).collect();
        assert_eq!(bodies[0], "m0");
        assert_eq!(bodies[29], "m29");
        assert!(got
            .iter()
            .all(|m| m.sender_id == "alice" && m.sender_device == "phone"));
    }

    // And back.
    let reply = bob.send(&conv.conversation_id, "hi alice").await.unwrap();
    assert_eq!(reply.seq, 31);
    let m = messages(&mut alice_laptop_ev, &conv.conversation_id, 1).await;
    assert_eq!((m[0].seq, m[0].body.as_str()), (31, "hi alice"));
}

#[tokio::test]
async fn direct_conversation_is_created_once() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let (bob, _b) = setup.connect("bob", "d").await;
    let first = alice.create_direct("bob").await.unwrap();
    let again = alice.create_direct("bob").await.unwrap();
    let other_side = bob.create_direct("alice").await.unwrap();
    assert_eq!(first.conversation_id, again.conversation_id);
    assert_eq!(first.conversation_id, other_side.conversation_id);
    assert_eq!(alice.conversations().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_retry_with_the_same_client_msg_id_returns_the_original() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let conv = alice.create_direct("bob").await.unwrap();
    let id = &conv.conversation_id;
    let first = alice
        .send_with_id(id, "retry-1", "once", "text/plain")
        .await
        .unwrap();
    let retry = alice
        .send_with_id(id, "retry-1", "once", "text/plain")
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(retry.duplicate);
    assert_eq!(
        (retry.seq, &retry.message_id),
        (first.seq, &first.message_id)
    );
    // From another session of the same user, too.
    let (alice2, _a2) = setup.connect("alice", "other").await;
    let third = alice2
        .send_with_id(id, "retry-1", "once", "text/plain")
        .await
        .unwrap();
    assert_eq!(third.seq, first.seq);
    let next = alice.send(id, "next").await.unwrap();
    assert_eq!(next.seq, first.seq + 1);

    let page = alice.history(id, 0, Direction::Backward, 50).await.unwrap();
    let bodies: Vec<&str> = page.messages.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, ["once", "next"]);
}

#[tokio::test]
async fn non_members_can_neither_read_nor_write() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let (mallory, _m) = setup.connect("mallory", "d").await;
    let conv = alice.create_direct("bob").await.unwrap();
    alice.send(&conv.conversation_id, "secret").await.unwrap();
    let id = &conv.conversation_id;

    assert_eq!(
        code_of(mallory.send(id, "let me in").await),
        ErrorCode::NotMember
    );
    assert_eq!(
        code_of(mallory.history(id, 0, Direction::Backward, 10).await),
        ErrorCode::NotMember
    );
    assert_eq!(
        code_of(mallory.members_list(id).await),
        ErrorCode::NotMember
    );
    // Naming the conversation in sync reveals nothing either.
    let sync = mallory
        .sync(
            vec![SyncCursor {
                conversation_id: id.clone(),
                last_seq: 0,
            }],
            0,
        )
        .await
        .unwrap();
    assert!(sync.messages.is_empty() && sync.conversations.is_empty());
}

#[tokio::test]
async fn accepted_messages_survive_kill_9_and_restart() {
    let setup = Setup::new(true);
    let mut sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let conv = alice.create_direct("bob").await.unwrap();
    let id = conv.conversation_id.clone();
    let mut accepted = Vec::new();
    for i in 0..40 {
        let ack = alice.send(&id, &format!("durable {i}")).await.unwrap();
        accepted.push((ack.seq, format!("durable {i}")));
    }
    // No goodbye, no flush: the process dies right after the last ack.
    sb.kill9();
    drop(alice);

    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let page = alice
        .history(&id, 0, Direction::Forward, 200)
        .await
        .unwrap();
    let stored: Vec<(u64, String)> = page
        .messages
        .iter()
        .map(|m| (m.seq, m.body.clone()))
        .collect();
    assert_eq!(stored, accepted);
    assert_eq!(
        accepted.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=40).collect::<Vec<_>>()
    );
    // The sequence continues without a gap or reuse.
    assert_eq!(alice.send(&id, "after restart").await.unwrap().seq, 41);
}

#[tokio::test]
async fn sync_after_reconnect_returns_what_was_missed_and_new_conversations() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let direct = alice.create_direct("bob").await.unwrap();
    let d = direct.conversation_id.clone();

    let (bob, mut bob_ev) = setup.connect("bob", "d").await;
    alice.send(&d, "seen").await.unwrap();
    let seen = messages(&mut bob_ev, &d, 1).await;
    assert_eq!(seen[0].seq, 1);
    bob.close().await;
    drop(bob_ev);

    for i in 0..3 {
        alice.send(&d, &format!("missed {i}")).await.unwrap();
    }
    let group = alice
        .create_group("while away", ["bob", "carol"])
        .await
        .unwrap();
    alice.send(&group.conversation_id, "welcome").await.unwrap();

    let (bob, _bob_ev) = setup.connect("bob", "d").await;
    let sync = bob
        .sync(
            vec![SyncCursor {
                conversation_id: d.clone(),
                last_seq: 1,
            }],
            0,
        )
        .await
        .unwrap();
    let missed: Vec<(String, u64, String)> = sync
        .messages
        .iter()
        .map(|m| (m.conversation_id.clone(), m.seq, m.body.clone()))
        .collect();
    assert!(missed.contains(&(d.clone(), 2, "missed 0".into())));
    assert!(missed.contains(&(d.clone(), 4, "missed 2".into())));
    assert!(
        !missed.iter().any(|(c, s, _)| c == &d && *s == 1),
        "seq 1 was already seen"
    );
    assert!(missed.contains(&(group.conversation_id.clone(), 1, "welcome".into())));
    let convs: Vec<&str> = sync
        .conversations
        .iter()
        .map(|c| c.conversation_id.as_str())
        .collect();
    assert!(convs.contains(&d.as_str()));
    assert!(convs.contains(&group.conversation_id.as_str()));
    assert!(sync.truncated.is_empty());
}

#[tokio::test]
async fn history_pages_backward_and_forward_at_most_200() {
    let mut setup = Setup::new(true);
    // 230 pipelined sends: above the default flood limits, which are not under test here.
    setup.set("SWITCHBOARD_GATEWAY__REQUEST_BURST", "1000");
    setup.set("SWITCHBOARD_ROUTING__SEND_BURST_PER_USER", "1000");
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let conv = alice.create_direct("bob").await.unwrap();
    let id = &conv.conversation_id;
    let bodies: Vec<String> = (0..230).map(|i| format!("h{i}")).collect();
    let sends = bodies.iter().map(|b| alice.send(id, b));
    for ack in futures::future::join_all(sends).await {
        ack.unwrap();
    }
    let newest = alice
        .history(id, 0, Direction::Backward, 1000)
        .await
        .unwrap();
    assert_eq!(newest.messages.len(), 200);
    assert!(newest.has_more);
    assert_eq!(newest.messages.first().unwrap().seq, 31);
    assert_eq!(newest.messages.last().unwrap().seq, 230);
    let older = alice
        .history(id, 31, Direction::Backward, 50)
        .await
        .unwrap();
    assert_eq!(
        older.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=30).collect::<Vec<_>>()
    );
    assert!(!older.has_more);
    let forward = alice
        .history(id, 225, Direction::Forward, 50)
        .await
        .unwrap();
    assert_eq!(
        forward.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![226, 227, 228, 229, 230]
    );
    assert!(!forward.has_more);
}

#[tokio::test]
async fn history_and_sync_of_largest_messages_page_by_bytes() {
    let mut setup = Setup::new(true);
    // 64 sends of the largest body: above the default flood limits, not under test here.
    setup.set("SWITCHBOARD_GATEWAY__REQUEST_BURST", "1000");
    setup.set("SWITCHBOARD_ROUTING__SEND_BURST_PER_USER", "1000");
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let conv = alice.create_direct("bob").await.unwrap();
    let id = &conv.conversation_id;
    // 64 messages of 64 KiB, the documented largest body: 4 MiB of bodies.
    for i in 0..64u32 {
        let body = format!("{i:08}").repeat(64 * 1024 / 8);
        assert_eq!(alice.send(id, &body).await.unwrap().seq, u64::from(i) + 1);
    }
    let all: Vec<u64> = (1..=64).collect();
    let (bob, _b) = setup.connect("bob", "d").await;

    // History with limit 100 succeeds, stops early with has_more, and paging
    // backward returns every message exactly once.
    let mut seen: Vec<u64> = Vec::new();
    let mut from = 0;
    let mut pages = 0;
    loop {
        let page = bob
            .history(id, from, Direction::Backward, 100)
            .await
            .unwrap();
        pages += 1;
        assert!(!page.messages.is_empty());
        let mut page_seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        assert!(page.messages.iter().all(|m| m.body.len() == 64 * 1024));
        if pages == 1 {
            assert!(page.has_more, "the first page stops at the byte budget");
            assert!(page_seqs.len() < 64);
        }
        from = page_seqs[0];
        page_seqs.extend(seen);
        seen = page_seqs;
        if !page.has_more {
            break;
        }
    }
    assert_eq!(seen, all);

    // The default sync succeeds, says has_more, and history forward from the last
    // message it returned gives the rest, each message once.
    let sync = bob.sync(Vec::new(), 0).await.unwrap();
    assert!(sync.has_more);
    assert_eq!(sync.truncated, std::slice::from_ref(id));
    let mut seen: Vec<u64> = sync.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seen.first(), Some(&1));
    loop {
        let from = *seen.last().unwrap();
        let page = bob
            .history(id, from, Direction::Forward, 100)
            .await
            .unwrap();
        seen.extend(page.messages.iter().map(|m| m.seq));
        if !page.has_more {
            break;
        }
    }
    assert_eq!(seen, all);
}

#[tokio::test]
async fn bodies_above_the_limit_are_refused_with_a_clear_error() {
    let mut setup = Setup::new(true);
    setup.set("SWITCHBOARD_ROUTING__MAX_BODY_BYTES", "1000");
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let conv = alice.create_direct("bob").await.unwrap();
    assert_eq!(
        alice
            .send(&conv.conversation_id, &"x".repeat(1000))
            .await
            .unwrap()
            .seq,
        1
    );
    match alice.send(&conv.conversation_id, &"x".repeat(1001)).await {
        Err(ClientError::Server { code, message, .. }) => {
            assert_eq!(code, ErrorCode::BodyTooLarge);
            assert!(message.contains("1000"), "{message}");
        }
        other => panic!("expected body_too_large, got {other:?}"),
    }
}

/// Raw WebSocket frames, to send what a well-behaved client never would.
async fn raw_socket(
    setup: &Setup,
    user: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut req = setup.gateway.ws_url().into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", setup.token(user)).parse().unwrap(),
    );
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "switchboard.v1.json".parse().unwrap(),
    );
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "switchboard.v1.json"
    );
    ws
}

async fn next_json(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    key: &str,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {key} frame"))
            .expect("socket open")
            .expect("frame");
        if let WsMessage::Text(t) = frame {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v.get(key).is_some() {
                return v;
            }
        }
    }
}

#[tokio::test]
async fn malformed_and_unknown_frames_get_error_codes_and_the_connection_survives() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let mut ws = raw_socket(&setup, "alice").await;
    next_json(&mut ws, "welcome").await;

    ws.send(WsMessage::Text("{not json".into())).await.unwrap();
    let e = next_json(&mut ws, "error").await;
    assert_eq!(e["error"]["code"], "bad_frame");

    ws.send(WsMessage::Text(r#"{"id":"u1","teleport":{}}"#.into()))
        .await
        .unwrap();
    let a = next_json(&mut ws, "ack").await;
    assert_eq!(a["ack"]["id"], "u1");
    assert_eq!(a["ack"]["error"]["code"], "unknown_frame");

    ws.send(WsMessage::Text(r#"{"id":"b1","send":{"body":7}}"#.into()))
        .await
        .unwrap();
    let a = next_json(&mut ws, "ack").await;
    assert_eq!(a["ack"]["id"], "b1");
    assert_eq!(a["ack"]["error"]["code"], "bad_frame");

    ws.send(WsMessage::Binary(vec![0xff, 0x00, 0x13].into()))
        .await
        .unwrap();
    let e = next_json(&mut ws, "error").await;
    assert_eq!(e["error"]["code"], "bad_frame");

    ws.send(WsMessage::Text(
        r#"{"id":"n1","send":{"conversation_id":"nope","client_msg_id":"x","body":"hi"}}"#.into(),
    ))
    .await
    .unwrap();
    let a = next_json(&mut ws, "ack").await;
    assert_eq!(a["ack"]["id"], "n1");
    let code = a["ack"]["error"]["code"].as_str().unwrap().to_owned();
    // Like a conversation the user is not in: existence is not revealed.
    assert_eq!(code, "not_member");

    // Still open and serving.
    ws.send(WsMessage::Text(r#"{"id":"p1","ping":{}}"#.into()))
        .await
        .unwrap();
    let a = next_json(&mut ws, "ack").await;
    assert_eq!(a["ack"]["id"], "p1");
    assert!(a["ack"]["pong"]["server_time_ms"].as_i64().unwrap() > 0);
}

#[tokio::test]
async fn a_client_that_keeps_violating_the_protocol_is_disconnected() {
    let mut setup = Setup::new(true);
    setup.set("SWITCHBOARD_GATEWAY__MAX_VIOLATIONS", "3");
    let _sb = setup.standalone().await;
    let mut ws = raw_socket(&setup, "alice").await;
    next_json(&mut ws, "welcome").await;
    for _ in 0..3 {
        let _ = ws.send(WsMessage::Text("garbage".into())).await;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(WsMessage::Close(Some(frame))))) => {
                assert_eq!(u16::from(frame.code), 1008);
                break;
            }
            Ok(Some(Ok(WsMessage::Close(None)))) | Ok(None) | Ok(Some(Err(_))) => {
                panic!("closed without a policy-violation close frame")
            }
            Ok(Some(Ok(_))) => continue,
            Err(_) => panic!("connection not closed after repeated violations"),
        }
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_at_the_upgrade_with_a_reason() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let forged = switchboard_auth::Signer::hs256(b"not-the-server-secret-not-the-server")
        .sign("alice", Duration::from_secs(60))
        .unwrap();
    for (token, reason) in [
        ("", "missing"),
        ("garbage", "malformed"),
        (forged.as_str(), "signature"),
    ] {
        let options = switchboard_client::ConnectOptions::new(setup.gateway.ws_url(), token);
        match switchboard_client::Client::connect(options).await {
            Err(ClientError::Connect {
                status,
                reason: got,
            }) => {
                assert_eq!(status, Some(401));
                assert!(got.contains(reason), "{got}");
            }
            Ok(_) => panic!("token {token:?} was accepted"),
            Err(e) => panic!("unexpected error {e}"),
        }
    }
}

#[tokio::test]
async fn the_token_command_signs_with_the_secret_standalone_generated() {
    let setup = Setup::new(false);
    let _sb = setup.standalone().await;
    assert!(setup.data_dir().join("jwt-secret").exists());
    let out = std::process::Command::new(bin())
        .args(["token", "--user", "dave", "--ttl", "10m"])
        .env_clear()
        .envs(setup.env.iter().cloned())
        .current_dir(setup.data_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let (client, _ev) = connect_to(&setup.gateway, &token, "cli", Encoding::Proto).await;
    assert_eq!(client.welcome().user_id, "dave");
}

#[tokio::test]
async fn presence_watchers_see_users_come_online_and_leave() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (bob, mut bob_ev) = setup.connect("bob", "d").await;
    let now = bob.presence_watch(["alice"]).await.unwrap();
    assert_eq!(now.users[0].status, "offline");

    let (alice, _a) = setup.connect("alice", "d").await;
    let p = next_matching(&mut bob_ev, "alice online", |ev| match ev {
        Event::Presence(p) if p.user_id == "alice" && p.status == "online" => Some(p.clone()),
        _ => None,
    })
    .await;
    assert_eq!(p.sessions, 1);

    alice.presence_set("away").await.unwrap();
    next_matching(&mut bob_ev, "alice away", |ev| match ev {
        Event::Presence(p) if p.user_id == "alice" && p.status == "away" => Some(()),
        _ => None,
    })
    .await;

    alice.close().await;
    let p = next_matching(&mut bob_ev, "alice offline", |ev| match ev {
        Event::Presence(p) if p.user_id == "alice" && p.status == "offline" => Some(p.clone()),
        _ => None,
    })
    .await;
    assert!(p.last_seen_ms > 0);
}

#[tokio::test]
async fn groups_have_owners_members_and_conversation_events() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let (bob, mut bob_ev) = setup.connect("bob", "d").await;
    let (carol, mut carol_ev) = setup.connect("carol", "d").await;

    let group = alice.create_group("team", ["bob"]).await.unwrap();
    assert_eq!(group.owner_id, "alice");
    let id = group.conversation_id.clone();
    next_matching(&mut bob_ev, "created event", |ev| match ev {
        Event::Conversation(c) if c.change == "created" => Some(()),
        _ => None,
    })
    .await;

    assert_eq!(
        code_of(carol.send(&id, "not yet").await),
        ErrorCode::NotMember
    );
    assert_eq!(
        code_of(bob.members(&id, MembersAction::Add, ["dave"]).await),
        ErrorCode::Forbidden
    );
    alice
        .members(&id, MembersAction::Add, ["carol"])
        .await
        .unwrap();
    next_matching(&mut carol_ev, "members_added event", |ev| match ev {
        Event::Conversation(c) if c.change == "members_added" && c.user_ids == ["carol"] => {
            Some(())
        }
        _ => None,
    })
    .await;
    // The addition is the conversation's first timeline event; carol's message follows.
    let seq = carol.send(&id, "hello team").await.unwrap().seq;
    assert_eq!(seq, 2);
    let got = messages(&mut bob_ev, &id, 2).await;
    assert_eq!(got[0].seq, 1);
    assert_eq!(got[0].kind, "system");
    let change = got[0]
        .system
        .as_ref()
        .expect("a system event says what changed");
    assert_eq!(
        (
            change.action.as_str(),
            change.actor_id.as_str(),
            change.user_ids.as_slice()
        ),
        ("members_added", "alice", &["carol".to_owned()][..])
    );
    assert_eq!((got[1].seq, got[1].sender_id.as_str()), (2, "carol"));

    alice
        .members(&id, MembersAction::Remove, ["carol"])
        .await
        .unwrap();
    assert_eq!(
        code_of(carol.send(&id, "still here?").await),
        ErrorCode::NotMember
    );
    let members = alice.members_list(&id).await.unwrap().members;
    assert_eq!(members.len(), 2);
}

#[tokio::test]
async fn read_markers_and_typing_reach_the_other_members() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, mut alice_ev) = setup.connect("alice", "d").await;
    let (bob, _b) = setup.connect("bob", "d").await;
    let conv = alice.create_direct("bob").await.unwrap();
    let id = &conv.conversation_id;
    alice.send(id, "read me").await.unwrap();
    bob.typing(id, true).await.unwrap();
    next_matching(&mut alice_ev, "typing", |ev| match ev {
        Event::Typing(t) if t.user_id == "bob" && t.typing => Some(()),
        _ => None,
    })
    .await;
    bob.read(id, 1).await.unwrap();
    let marker = next_matching(&mut alice_ev, "receipt", |ev| match ev {
        Event::Receipt(r) if r.user_id == "bob" => Some(r.clone()),
        _ => None,
    })
    .await;
    assert_eq!(marker.seq, 1);
}

#[tokio::test]
async fn sigterm_sends_goaway_drains_and_exits_cleanly() {
    let mut setup = Setup::new(true);
    setup.set("SWITCHBOARD_GATEWAY__DRAIN_DEADLINE_MS", "2000");
    let mut sb = setup.standalone().await;
    let (alice, mut alice_ev) = setup.connect("alice", "d").await;
    let conv = alice.create_direct("bob").await.unwrap();
    let ack = alice
        .send(&conv.conversation_id, "before shutdown")
        .await
        .unwrap();

    let pid = sb.pid();
    let waiter = std::thread::spawn(move || {
        let status = sb.terminate(Duration::from_secs(20));
        (status, sb)
    });
    next_matching(&mut alice_ev, "goaway", |ev| match ev {
        Event::GoAway(g) => Some(g.clone()),
        _ => None,
    })
    .await;
    alice.close().await;
    let (status, sb) = waiter.join().unwrap();
    let status = status.unwrap_or_else(|| panic!("pid {pid} did not exit; log:\n{}", sb.output()));
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        sb.output()
    );
    drop(sb);

    // Nothing accepted was lost.
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let page = alice
        .history(&conv.conversation_id, 0, Direction::Backward, 10)
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].seq, ack.seq);
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, mut alice_ev) = setup.connect("alice", "d").await;
    let conv = alice.create_direct("bob").await.unwrap();
    alice.send(&conv.conversation_id, "count me").await.unwrap();
    messages(&mut alice_ev, &conv.conversation_id, 1).await;

    let (status, _) = http_get(setup.gateway.listen, "/healthz").await.unwrap();
    assert_eq!(status, 200);
    let (status, _) = http_get(setup.gateway.admin, "/readyz").await.unwrap();
    assert_eq!(status, 200);
    let (status, metrics) = http_get(setup.gateway.listen, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for name in [
        "connections",
        "messages_accepted",
        "messages_delivered",
        "send_to_deliver",
    ] {
        assert!(metrics.contains(name), "metric {name} missing:\n{metrics}");
    }
}

#[tokio::test]
async fn config_defaults_lists_every_setting() {
    let out = std::process::Command::new(bin())
        .args(["config", "defaults"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for (key, _) in switchboard_config::SETTINGS {
        let leaf = key.rsplit('.').next().unwrap();
        assert!(text.contains(&format!("\n{leaf} = ")), "{key} missing");
    }
}

#[tokio::test]
async fn migrate_brings_the_embedded_store_to_the_latest_schema() {
    let setup = Setup::new(true);
    let run = || {
        std::process::Command::new(bin())
            .arg("migrate")
            .env_clear()
            .envs(setup.env.iter().cloned())
            .output()
            .unwrap()
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let last_line = |out: Vec<u8>| {
        String::from_utf8(out)
            .unwrap()
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned()
    };
    let text = last_line(first.stdout);
    assert!(text.contains("sqlite backend) is at version 4"), "{text}");
    assert!(setup.data_dir().join("storage.sqlite3").exists());
    // Idempotent.
    let again = run();
    assert!(again.status.success());
    assert_eq!(last_line(again.stdout), text);
}

#[tokio::test]
async fn invalid_configuration_fails_before_binding() {
    let setup = Setup::new(true);
    let mut proc = setup.spawn(
        &["standalone"],
        &[(
            "SWITCHBOARD_GATEWAY__LISTEN".into(),
            "not-an-address".into(),
        )],
    );
    let start = std::time::Instant::now();
    while proc.is_running() && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !proc.is_running(),
        "standalone started with an invalid address"
    );
    assert!(
        proc.output().contains("gateway.listen"),
        "{}",
        proc.output()
    );
}

/// Wait (at most 10 s) for `proc` to exit.
async fn wait_exit(proc: &mut Proc) {
    let start = std::time::Instant::now();
    while proc.is_running() && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn with_the_operators_own_secret_there_is_no_dev_token_endpoint() {
    let setup = Setup::new(true);
    let sb = setup.standalone().await;
    let (status, _) = http_get(setup.gateway.listen, "/v1/dev/token?user=victim")
        .await
        .unwrap();
    assert_eq!(status, 404);
    let (status, _) = http_get(setup.gateway.listen, "/").await.unwrap();
    assert_eq!(status, 404);
    assert!(!sb.output().contains("dev mode is on"), "{}", sb.output());
}

#[tokio::test]
async fn dev_mode_with_the_generated_secret_warns_at_start() {
    let setup = Setup::new(false);
    let sb = setup.standalone().await;
    let (status, body) = http_get(setup.gateway.listen, "/v1/dev/token?user=dave")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let output = sb.output();
    assert!(output.contains("dev mode is on"), "{output}");
    assert!(output.contains("without credentials"), "{output}");
}

#[tokio::test]
async fn dev_mode_refuses_a_client_listener_beyond_loopback() {
    let setup = Setup::new(false);
    let mut env = setup.gateway.env();
    env.push((
        "SWITCHBOARD_GATEWAY__LISTEN".into(),
        format!("0.0.0.0:{}", setup.gateway.listen),
    ));
    let mut proc = setup.spawn(&["standalone"], &env);
    wait_exit(&mut proc).await;
    assert!(!proc.is_running(), "dev mode started on 0.0.0.0");
    let output = proc.output();
    assert!(
        output.contains("dev_mode") && output.contains("dev_mode_allow_remote"),
        "{output}"
    );
    assert!(!output.contains("Switchboard standalone:"), "{output}");
}

#[tokio::test]
async fn the_url_is_printed_only_once_every_port_is_bound() {
    let setup = Setup::new(true);
    // Something else holds the gateway's client port.
    let _taken = std::net::TcpListener::bind(("127.0.0.1", setup.gateway.listen)).unwrap();
    let mut proc = setup.spawn(&["standalone"], &setup.gateway.env());
    wait_exit(&mut proc).await;
    assert!(!proc.is_running(), "standalone started without its port");
    let output = proc.output();
    assert!(output.contains("gateway.listen"), "{output}");
    assert!(!output.contains("Switchboard standalone:"), "{output}");
    assert!(!output.contains("ws://"), "{output}");
}

#[tokio::test]
async fn config_check_prints_no_secret() {
    let setup = Setup::new(true);
    let out = std::process::Command::new(bin())
        .args(["config", "check"])
        .env_clear()
        .envs(setup.env.iter().cloned())
        .env(
            "SWITCHBOARD_PRESENCE__REDIS_PASSWORD",
            "redis-password-value",
        )
        .env(
            "SWITCHBOARD_PRESENCE__REDIS_URL",
            "redis://u:url-password-value@r:6379",
        )
        .current_dir(setup.data_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("configuration is valid"), "{text}");
    for secret in [
        SECRET,
        CLUSTER_CREDENTIAL,
        "redis-password-value",
        "url-password-value",
    ] {
        assert!(!text.contains(secret), "{secret} printed: {text}");
    }
    assert!(text.contains("<redacted>"), "{text}");
}

#[tokio::test]
async fn service_commands_refuse_to_start_without_a_cluster_credential() {
    let mut setup = Setup::new(true);
    setup
        .env
        .retain(|(k, _)| k != "SWITCHBOARD_CLUSTER__CREDENTIAL");
    for service in ["gateway", "presence", "routing", "storage"] {
        let mut proc = setup.spawn(&[service], &setup.gateway.env());
        wait_exit(&mut proc).await;
        assert!(!proc.is_running(), "{service} started without a credential");
        let output = proc.output();
        assert!(output.contains("no cluster credential"), "{output}");
    }
    // Unless told to run without one, loudly.
    setup.set("SWITCHBOARD_CLUSTER__INSECURE_NO_CREDENTIAL", "true");
    let port = setup
        .env
        .iter()
        .find(|(k, _)| k == "SWITCHBOARD_STORAGE__ADMIN_LISTEN")
        .and_then(|(_, v)| v.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("storage admin port");
    let storage = setup.spawn(&["storage"], &[]);
    wait_ready(port, &storage).await;
    assert!(
        storage.output().contains("insecure_no_credential is on"),
        "{}",
        storage.output()
    );
}

#[tokio::test]
async fn trace_logging_shows_no_message_content() {
    let mut setup = Setup::new(true);
    setup.set("SWITCHBOARD_LOG__LEVEL", "trace");
    let sb = setup.standalone().await;
    let (alice, _alice_ev) = setup.connect("alice", "phone").await;
    let (_bob, mut bob_ev) = setup.connect("bob", "phone").await;
    let conv = alice.create_direct("bob").await.unwrap();
    let id = conv.conversation_id.clone();
    let body = "secret-body-7f3a9c";
    let edited = "secret-edit-51b2d8";
    let sent = alice.send(&id, body).await.unwrap();
    alice.edit(&id, sent.seq, edited).await.unwrap();
    let got = messages(&mut bob_ev, &id, 1).await;
    assert_eq!(got[0].body, body);
    let output = sb.output();
    // Trace level is on (the log is not empty of Switchboard's own trace lines)...
    assert!(
        output.contains("TRACE") || output.contains("DEBUG"),
        "{output}"
    );
    // ...but no library logs the frames that carry content.
    for content in [body, edited] {
        assert!(!output.contains(content), "{content} logged");
    }
    assert!(!output.contains(SECRET), "the secret was logged");
}

/// A setup whose services listen on ports of their own but leave `cluster.*_url` at
/// the defaults: the documented way to run a second standalone on one machine.
fn setup_without_urls() -> Setup {
    let mut setup = Setup::new(true);
    setup
        .env
        .retain(|(k, _)| !(k.starts_with("SWITCHBOARD_CLUSTER__") && k.ends_with("_URL")));
    setup
}

#[tokio::test]
async fn two_standalones_on_one_machine_keep_their_data_apart() {
    let first = setup_without_urls();
    let second = setup_without_urls();
    let _a = first.standalone().await;
    let _b = second.standalone().await;
    let (alice_first, _e1) = first.connect("alice", "d").await;
    let (alice_second, _e2) = second.connect("alice", "d").await;
    let group = alice_first
        .create_group("first only", ["bob"])
        .await
        .unwrap();
    alice_first
        .send(&group.conversation_id, "hello first")
        .await
        .unwrap();
    let listed_first = alice_first.conversations().await.unwrap();
    assert_eq!(listed_first.len(), 1, "{listed_first:?}");
    let listed_second = alice_second.conversations().await.unwrap();
    assert!(
        listed_second.is_empty(),
        "the second standalone sees the first one's group: {listed_second:?}"
    );
    let refused = code_of(alice_second.send(&group.conversation_id, "x").await);
    assert!(
        matches!(refused, ErrorCode::NotFound | ErrorCode::NotMember),
        "a send into the other instance's group: {refused:?}"
    );
}

#[tokio::test]
async fn standalone_refuses_a_url_that_points_at_another_instance() {
    let first = setup_without_urls();
    let storage_of_first = first.port_of("SWITCHBOARD_STORAGE__GRPC_LISTEN");
    let second = setup_without_urls();
    let mut proc = second.spawn(
        &["standalone"],
        &[(
            "SWITCHBOARD_CLUSTER__STORAGE_URL".into(),
            format!("http://127.0.0.1:{storage_of_first}"),
        )],
    );
    wait_exit(&mut proc).await;
    assert!(
        !proc.is_running(),
        "standalone started with a foreign storage URL"
    );
    let output = proc.output();
    assert!(
        output.contains("cluster.storage_url") && output.contains("storage.grpc_listen"),
        "{output}"
    );
    assert!(!output.contains("open http"), "{output}");
    // Its own listener (as the test setups configure it) is fine.
    let own = Setup::new(true);
    let _running = own.standalone().await;
}

#[tokio::test]
async fn user_ids_no_token_could_carry_are_refused_where_they_enter() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let too_long = "u".repeat(129);
    for bad in ["bad user!", "tab\tbed", too_long.as_str()] {
        assert_eq!(
            code_of(alice.create_group("g", [bad]).await),
            ErrorCode::InvalidRequest,
            "group with {bad:?}"
        );
        assert_eq!(
            code_of(alice.create_direct(bad).await),
            ErrorCode::InvalidRequest,
            "direct with {bad:?}"
        );
    }
    let group = alice.create_group("g", ["bob"]).await.unwrap();
    assert_eq!(
        code_of(
            alice
                .members(&group.conversation_id, MembersAction::Add, ["bad user!"])
                .await
        ),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        alice.conversations().await.unwrap().len(),
        1,
        "nothing else created"
    );
}

#[tokio::test]
async fn another_device_alone_sends_no_presence_event_and_queries_count_devices() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (bob, mut bob_ev) = setup.connect("bob", "d").await;
    bob.presence_watch(["alice"]).await.unwrap();
    let (alice, _a) = setup.connect("alice", "d1").await;
    next_matching(&mut bob_ev, "alice online", |ev| match ev {
        Event::Presence(p) if p.user_id == "alice" && p.status == "online" => Some(()),
        _ => None,
    })
    .await;
    // 1 -> 2 -> 3 -> 2 sessions.
    let (second, _e2) = setup.connect("alice", "d2").await;
    let (third, _e3) = setup.connect("alice", "d3").await;
    third.close().await;
    let now = bob.presence_watch(["alice"]).await.unwrap();
    assert_eq!(now.users[0].sessions, 2, "{now:?}");
    // The next presence event about alice is the status text change, nothing before.
    alice
        .presence_update(switchboard_client::PresenceUpdate::new().status_text("lunch"))
        .await
        .unwrap();
    let first = next_matching(&mut bob_ev, "alice's next presence event", |ev| match ev {
        Event::Presence(p) if p.user_id == "alice" => Some(p.clone()),
        _ => None,
    })
    .await;
    assert_eq!(first.status_text, "lunch", "{first:?}");
    assert_eq!(first.sessions, 2);
    let _ = second;
}

#[tokio::test]
async fn a_user_removed_while_offline_learns_it_from_sync() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let group = alice.create_group("crew", ["bob"]).await.unwrap();
    let id = group.conversation_id.clone();
    let seen = alice.send(&id, "before").await.unwrap().seq;
    // bob is offline while alice removes him and the group goes on.
    alice
        .members(&id, MembersAction::Remove, ["bob"])
        .await
        .unwrap();
    alice.send(&id, "after").await.unwrap();

    let (bob, _b) = setup.connect("bob", "d").await;
    let sync = bob
        .sync(
            vec![SyncCursor {
                conversation_id: id.clone(),
                last_seq: seen,
            }],
            0,
        )
        .await
        .unwrap();
    assert!(
        sync.conversations.iter().all(|c| c.conversation_id != id),
        "{sync:?}"
    );
    assert!(sync.messages.iter().all(|m| m.conversation_id != id));
    assert_eq!(sync.removals.len(), 1, "{sync:?}");
    let removal = &sync.removals[0];
    assert_eq!(removal.conversation_id, id);
    let system = removal.system.as_ref().expect("a system event");
    assert_eq!(system.action, "members_removed");
    assert_eq!(system.user_ids, ["bob"]);
}
