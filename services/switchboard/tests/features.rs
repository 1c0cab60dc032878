//! End-to-end tests of the conversation features against `switchboard standalone`:
//! rich presence, typing expiry and its rate limit, delivery and read receipts with
//! unread counts, edits, deletes, reactions, replies and threads, mutes and do not
//! disturb, group administration as timeline events, and webhooks. Each test names
//! the behaviour of docs/protocol.md it checks; refusals are checked by their error
//! codes.

mod common;
mod http_support;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use http_support::*;
use switchboard_client::{
    Client, Direction, Event, Events, MarkerKind, MembersAction, PresenceUpdate, SendOptions,
};
use switchboard_proto::{ErrorCode, Message, UserPresence};

/// The whole history of a conversation, oldest first, as `client` sees it.
async fn history(client: &Client, conversation_id: &str) -> Vec<Message> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let page = client
            .history(conversation_id, from, Direction::Forward, 200)
            .await
            .expect("history");
        from = page.messages.last().map_or(from, |m| m.seq);
        out.extend(page.messages);
        if !page.has_more {
            return out;
        }
    }
}

fn at(history: &[Message], seq: u64) -> &Message {
    history
        .iter()
        .find(|m| m.seq == seq)
        .unwrap_or_else(|| panic!("seq {seq} in history {history:?}"))
}

/// The next message event of `kind` in a conversation.
async fn next_event(events: &mut Events, conversation_id: &str, kind: &str) -> Message {
    next_matching(events, kind, |ev| match ev {
        Event::Message(m) if m.conversation_id == conversation_id && m.kind == kind => {
            Some(m.clone())
        }
        _ => None,
    })
    .await
}

/// The next system event of a conversation with `action`.
async fn next_system(events: &mut Events, conversation_id: &str, action: &str) -> Message {
    next_matching(events, action, |ev| match ev {
        Event::Message(m)
            if m.conversation_id == conversation_id
                && m.kind == "system"
                && m.system.as_ref().is_some_and(|s| s.action == action) =>
        {
            Some(m.clone())
        }
        _ => None,
    })
    .await
}

/// The next presence event of `user` that `pred` accepts.
async fn next_presence(
    events: &mut Events,
    user: &str,
    what: &str,
    pred: impl Fn(&UserPresence) -> bool,
) -> UserPresence {
    next_matching(events, what, |ev| match ev {
        Event::Presence(p) if p.user_id == user && pred(p) => Some(p.clone()),
        _ => None,
    })
    .await
}

/// The conversation as `client` lists it.
async fn listed(client: &Client, conversation_id: &str) -> switchboard_proto::Conversation {
    client
        .conversations()
        .await
        .expect("conversation list")
        .into_iter()
        .find(|c| c.conversation_id == conversation_id)
        .expect("listed")
}

// ---------------------------------------------------------------------------------
// Presence

#[tokio::test]
async fn busy_status_and_status_text_reach_watchers() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (bob, mut bob_ev) = setup.connect("bob", "d").await;
    let (alice, _a) = setup.connect("alice", "d").await;
    bob.presence_watch(["alice"]).await.unwrap();

    alice
        .presence_update(
            PresenceUpdate::new()
                .status("busy")
                .status_text("in a meeting"),
        )
        .await
        .unwrap();
    let p = next_presence(&mut bob_ev, "alice", "alice busy", |p| {
        p.status == "busy" && p.status_text == "in a meeting"
    })
    .await;
    assert_eq!(p.sessions, 1);

    // The text alone changes too, and "" clears it.
    alice
        .presence_update(PresenceUpdate::new().status_text(""))
        .await
        .unwrap();
    next_presence(&mut bob_ev, "alice", "text cleared", |p| {
        p.status == "busy" && p.status_text.is_empty()
    })
    .await;
    let now = bob.presence_watch(["alice"]).await.unwrap();
    assert_eq!(now.users[0].status, "busy");

    assert_eq!(
        code_of(
            alice
                .presence_update(PresenceUpdate::new().status_text("x".repeat(129)))
                .await
        ),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code_of(alice.presence_set("sleeping").await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code_of(
            alice
                .presence_update(PresenceUpdate::new().last_seen_privacy("friends"))
                .await
        ),
        ErrorCode::InvalidRequest
    );
}

#[tokio::test]
async fn presence_is_the_most_available_of_the_users_devices() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (bob, mut bob_ev) = setup.connect("bob", "d").await;
    bob.presence_watch(["alice"]).await.unwrap();
    let (phone, _p) = setup.connect("alice", "phone").await;
    phone.presence_set("busy").await.unwrap();
    next_presence(&mut bob_ev, "alice", "busy on one device", |p| {
        p.status == "busy" && p.sessions == 1
    })
    .await;

    let (laptop, _l) = setup.connect("alice", "laptop").await;
    next_presence(&mut bob_ev, "alice", "online wins over busy", |p| {
        p.status == "online" && p.sessions == 2
    })
    .await;
    laptop.presence_set("away").await.unwrap();
    next_presence(&mut bob_ev, "alice", "away wins over busy", |p| {
        p.status == "away" && p.sessions == 2
    })
    .await;
    laptop.close().await;
    next_presence(&mut bob_ev, "alice", "busy again", |p| {
        p.status == "busy" && p.sessions == 1
    })
    .await;
    let now = bob.presence_watch(["alice"]).await.unwrap();
    assert_eq!(
        (now.users[0].status.as_str(), now.users[0].sessions),
        ("busy", 1)
    );
}

#[tokio::test]
async fn invisible_users_look_offline_to_others_but_not_to_themselves() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (bob, mut bob_ev) = setup.connect("bob", "d").await;
    bob.presence_watch(["alice"]).await.unwrap();
    let (alice, _a) = setup.connect("alice", "d").await;
    let online = next_presence(&mut bob_ev, "alice", "alice online", |p| {
        p.status == "online"
    })
    .await;
    assert_eq!(online.sessions, 1);

    alice.presence_set("invisible").await.unwrap();
    let hidden = next_presence(&mut bob_ev, "alice", "alice offline", |p| {
        p.status == "offline"
    })
    .await;
    assert_eq!(
        hidden.sessions, 0,
        "sessions must not reveal an invisible user"
    );
    let seen_by_bob = bob.presence_watch(["alice"]).await.unwrap().users[0].clone();
    assert_eq!(
        (seen_by_bob.status.as_str(), seen_by_bob.sessions),
        ("offline", 0)
    );
    // last_seen is frozen at the last visible moment: it does not move on.
    let again = bob.presence_watch(["alice"]).await.unwrap().users[0].clone();
    assert_eq!(again.last_seen_ms, seen_by_bob.last_seen_ms);

    let own = alice.presence_watch(["alice"]).await.unwrap().users[0].clone();
    assert_eq!((own.status.as_str(), own.sessions), ("invisible", 1));

    alice.presence_set("online").await.unwrap();
    next_presence(&mut bob_ev, "alice", "alice visible again", |p| {
        p.status == "online" && p.sessions == 1
    })
    .await;
}

#[tokio::test]
async fn last_seen_privacy_hides_last_seen_from_non_contacts_or_everyone() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let (bob, mut bob_ev) = setup.connect("bob", "d").await;
    let (carol, mut carol_ev) = setup.connect("carol", "d").await;
    // bob shares a conversation in which alice wrote; carol opened a direct
    // conversation with alice and wrote in it, which makes nobody a contact alone.
    let ab = alice.create_direct("bob").await.unwrap().conversation_id;
    alice.send(&ab, "hi bob").await.unwrap();
    let ca = carol.create_direct("alice").await.unwrap().conversation_id;
    carol.send(&ca, "hello alice").await.unwrap();
    carol.create_group("trap", ["alice"]).await.unwrap();
    bob.presence_watch(["alice"]).await.unwrap();
    carol.presence_watch(["alice"]).await.unwrap();
    alice
        .presence_update(PresenceUpdate::new().last_seen_privacy("contacts"))
        .await
        .unwrap();
    alice.close().await;

    let to_bob = next_presence(&mut bob_ev, "alice", "alice offline", |p| {
        p.status == "offline"
    })
    .await;
    assert!(
        to_bob.last_seen_ms > 0,
        "a contact sees last seen: {to_bob:?}"
    );
    let to_carol = next_presence(&mut carol_ev, "alice", "alice offline", |p| {
        p.status == "offline"
    })
    .await;
    assert_eq!(
        to_carol.last_seen_ms, 0,
        "a stranger who opened a conversation alone does not: {to_carol:?}"
    );
    let queried = carol.presence_watch(["alice"]).await.unwrap().users[0].clone();
    assert_eq!(
        (queried.status.as_str(), queried.last_seen_ms),
        ("offline", 0)
    );
    let queried = bob.presence_watch(["alice"]).await.unwrap().users[0].clone();
    assert_eq!(queried.last_seen_ms, to_bob.last_seen_ms);

    let (alice, _a) = setup.connect("alice", "d").await;
    next_presence(&mut bob_ev, "alice", "alice online", |p| {
        p.status == "online"
    })
    .await;
    alice
        .presence_update(PresenceUpdate::new().last_seen_privacy("nobody"))
        .await
        .unwrap();
    alice.close().await;
    let to_bob = next_presence(&mut bob_ev, "alice", "alice offline again", |p| {
        p.status == "offline"
    })
    .await;
    assert_eq!(to_bob.last_seen_ms, 0, "nobody: hidden from contacts too");
    let queried = bob.presence_watch(["alice"]).await.unwrap().users[0].clone();
    assert_eq!(queried.last_seen_ms, 0);
}

#[tokio::test]
async fn idle_sessions_turn_away_and_come_back_online_on_activity() {
    let mut setup = Setup::new(true);
    setup.set("SWITCHBOARD_GATEWAY__IDLE_AWAY_AFTER_MS", "300");
    let _sb = setup.standalone().await;
    let (watcher, mut watcher_ev) = setup.connect("watcher", "d").await;
    watcher.presence_watch(["alice", "bob"]).await.unwrap();
    let (alice, _a) = setup.connect("alice", "d").await;
    next_presence(&mut watcher_ev, "alice", "alice away after idling", |p| {
        p.status == "away"
    })
    .await;
    alice.conversations().await.unwrap();
    next_presence(&mut watcher_ev, "alice", "alice online again", |p| {
        p.status == "online"
    })
    .await;

    // A status the user chose is never overridden: alice goes busy, then bob
    // connects and idles. Bob's idle timer started after alice's last frame, so by
    // the time bob turns away, alice's would have fired too.
    alice.presence_set("busy").await.unwrap();
    let (_bob, _b) = setup.connect("bob", "d").await;
    next_presence(&mut watcher_ev, "bob", "bob away after idling", |p| {
        p.status == "away"
    })
    .await;
    let now = watcher.presence_watch(["alice"]).await.unwrap();
    assert_eq!(now.users[0].status, "busy", "idling never overrides busy");
}

// ---------------------------------------------------------------------------------
// Typing

#[tokio::test]
async fn typing_events_carry_their_expiry_and_fast_repeats_are_rate_limited() {
    let mut setup = Setup::new(true);
    setup.set("SWITCHBOARD_GATEWAY__TYPING_EXPIRY_MS", "4321");
    // Long enough that the second typing below always falls inside it.
    setup.set("SWITCHBOARD_GATEWAY__TYPING_INTERVAL_MS", "60000");
    // A throttled typing is not a protocol violation: three of them do not close.
    setup.set("SWITCHBOARD_GATEWAY__MAX_VIOLATIONS", "2");
    let _sb = setup.standalone().await;
    let (alice, mut alice_ev) = setup.connect("alice", "d").await;
    let (bob, _b) = setup.connect("bob", "d").await;
    let conv = alice.create_direct("bob").await.unwrap();
    let id = &conv.conversation_id;

    bob.typing(id, true).await.unwrap();
    let t = next_matching(&mut alice_ev, "typing", |ev| match ev {
        Event::Typing(t) if t.user_id == "bob" && t.typing => Some(t.clone()),
        _ => None,
    })
    .await;
    assert_eq!(t.expires_in_ms, 4321);

    for _ in 0..3 {
        assert_eq!(code_of(bob.typing(id, true).await), ErrorCode::RateLimited);
    }
    // The connection stays, and stopping is always forwarded.
    bob.typing(id, false).await.unwrap();
    next_matching(&mut alice_ev, "typing stopped", |ev| match ev {
        Event::Typing(t) if t.user_id == "bob" && !t.typing => Some(()),
        _ => None,
    })
    .await;
    // Another session of the same user has its own allowance, and the typer's
    // other devices see the typing too (never the typing session itself).
    let (bob2, _b2) = setup.connect("bob", "d2").await;
    let (_bob3, mut bob3_ev) = setup.connect("bob", "d3").await;
    bob2.typing(id, true).await.unwrap();
    next_matching(
        &mut bob3_ev,
        "own typing on another device",
        |ev| match ev {
            Event::Typing(t) if t.user_id == "bob" && t.typing => Some(()),
            _ => None,
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------
// Receipts and unread counts

#[tokio::test]
async fn delivered_and_read_receipts_are_counted_per_message() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, mut alice_ev) = setup.connect("alice", "d").await;
    let (bob, _b) = setup.connect("bob", "d").await;
    let (carol, _c) = setup.connect("carol", "d").await;
    let group = alice.create_group("team", ["bob", "carol"]).await.unwrap();
    let id = &group.conversation_id;
    alice.send(id, "one").await.unwrap();
    alice.send(id, "two").await.unwrap();

    bob.delivered(id, 2).await.unwrap();
    let marker = next_matching(&mut alice_ev, "delivered receipt", |ev| match ev {
        Event::Receipt(r) if r.user_id == "bob" => Some(r.clone()),
        _ => None,
    })
    .await;
    assert_eq!((marker.seq, marker.kind.as_str()), (2, "delivered"));
    carol.read(id, 1).await.unwrap();
    let marker = next_matching(&mut alice_ev, "read receipt", |ev| match ev {
        Event::Receipt(r) if r.user_id == "carol" => Some(r.clone()),
        _ => None,
    })
    .await;
    assert_eq!(marker.seq, 1);
    assert!(marker.kind.is_empty() || marker.kind == "read");

    let first = alice.receipts(id, 1).await.unwrap();
    assert_eq!((first.seq, first.read_by, first.delivered_to), (1, 1, 2));
    let latest = alice.receipts(id, 0).await.unwrap();
    assert_eq!((latest.seq, latest.read_by, latest.delivered_to), (2, 0, 1));
    let members: Vec<(&str, u64, u64)> = latest
        .members
        .iter()
        .map(|m| (m.user_id.as_str(), m.read_seq, m.delivered_seq))
        .collect();
    assert_eq!(
        members,
        [("alice", 0, 0), ("bob", 0, 2), ("carol", 1, 1)],
        "read raises delivered; sorted by user"
    );
    assert!(latest.members[2].read_at_ms > 0);

    // Markers never go down and stop at the last sequence.
    carol.read(id, 100).await.unwrap();
    carol.read(id, 1).await.unwrap();
    let latest = alice.receipts(id, 2).await.unwrap();
    assert_eq!((latest.read_by, latest.delivered_to), (1, 2));
    let carol_marker = latest
        .members
        .iter()
        .find(|m| m.user_id == "carol")
        .unwrap();
    assert_eq!(carol_marker.read_seq, 2);

    let unknown_kind = bob
        .request(switchboard_proto::v1::client_frame::Request::Read(
            switchboard_proto::v1::ReadRequest {
                conversation_id: id.clone(),
                seq: 1,
                kind: "seen".into(),
            },
        ))
        .await;
    assert_eq!(code_of(unknown_kind), ErrorCode::InvalidRequest);
    let (dave, _d) = setup.connect("dave", "d").await;
    assert_eq!(code_of(dave.receipts(id, 0).await), ErrorCode::NotMember);
    assert_eq!(
        code_of(dave.mark(id, 1, MarkerKind::Delivered).await),
        ErrorCode::NotMember
    );
}

#[tokio::test]
async fn lists_and_sync_report_unread_counts_and_mentions() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let (bob, mut bob_ev) = setup.connect("bob", "d").await;
    let group = alice.create_group("team", ["bob", "carol"]).await.unwrap();
    let id = &group.conversation_id;
    alice.send(id, "one").await.unwrap();
    alice
        .send_with(id, "bob, look", &SendOptions::new().mention("bob"))
        .await
        .unwrap();
    alice.send(id, "three").await.unwrap();
    let doomed = alice.send(id, "four").await.unwrap().seq;
    alice.delete(id, doomed).await.unwrap();
    let own = bob.send(id, "mine does not count").await.unwrap().seq;
    // Everything is stored once bob has been sent all of it.
    next_matching(&mut bob_ev, "bob's own message", |ev| match ev {
        Event::Message(m) if m.conversation_id == *id && m.seq == own => Some(()),
        _ => None,
    })
    .await;

    let conv = listed(&bob, id).await;
    assert_eq!(conv.my_role, "member");
    assert_eq!(conv.read_seq, 0);
    assert_eq!(
        (conv.unread_count, conv.unread_mentions),
        (3, 1),
        "messages from others, not deleted; one mentions bob"
    );

    bob.read(id, 2).await.unwrap();
    let conv = listed(&bob, id).await;
    assert_eq!((conv.read_seq, conv.delivered_seq), (2, 2));
    assert_eq!((conv.unread_count, conv.unread_mentions), (1, 0));

    let sync = bob.sync(vec![], 0).await.unwrap();
    let synced = sync
        .conversations
        .iter()
        .find(|c| c.conversation_id == *id)
        .expect("the group in sync");
    assert_eq!((synced.unread_count, synced.unread_mentions), (1, 0));
    assert_eq!(synced.my_role, "member");
    assert_eq!(listed(&alice, id).await.my_role, "owner");
}

// ---------------------------------------------------------------------------------
// Edits and deletes

#[tokio::test]
async fn edits_replace_the_body_in_history_and_reach_every_member() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let (_bob, mut bob_ev) = setup.connect("bob", "d").await;
    let conv = alice.create_direct("bob").await.unwrap();
    let id = &conv.conversation_id;
    let original = alice.send(id, "helo").await.unwrap().seq;
    let edit = alice.edit(id, original, "hello").await.unwrap();
    assert_eq!(edit.seq, original + 1, "an edit has its own sequence");

    let live = next_event(&mut bob_ev, id, "edit").await;
    assert_eq!(
        (live.target_seq, live.body.as_str(), live.sender_id.as_str()),
        (original, "hello", "alice")
    );

    let stored = history(&alice, id).await;
    let message = at(&stored, original);
    assert_eq!(message.body, "hello");
    assert!(message.edited_at_ms > 0);
    assert!(!message.deleted);
    let edit_row = at(&stored, edit.seq);
    assert_eq!(
        (edit_row.kind.as_str(), edit_row.target_seq),
        ("edit", original)
    );
}

#[tokio::test]
async fn only_the_sender_edits_and_only_existing_messages() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let (bob, _b) = setup.connect("bob", "d").await;
    let (mallory, _m) = setup.connect("mallory", "d").await;
    let conv = alice.create_direct("bob").await.unwrap();
    let id = &conv.conversation_id;
    let seq = alice.send(id, "mine").await.unwrap().seq;

    assert_eq!(
        code_of(bob.edit(id, seq, "yours?").await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code_of(alice.edit(id, 99, "nothing").await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code_of(mallory.edit(id, seq, "let me").await),
        ErrorCode::NotMember
    );
    // An edit event is not a message: it cannot be edited itself.
    let edit = alice.edit(id, seq, "mine!").await.unwrap().seq;
    assert_eq!(
        code_of(alice.edit(id, edit, "again").await),
        ErrorCode::NotFound
    );
    assert_eq!(history(&alice, id).await.len() as u64, edit);
}

#[tokio::test]
async fn deleted_messages_lose_their_body_and_their_edits_bodies() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let (bob, mut bob_ev) = setup.connect("bob", "d").await;
    let conv = alice.create_direct("bob").await.unwrap();
    let id = &conv.conversation_id;
    let seq = alice.send(id, "oops").await.unwrap().seq;
    let edit = alice.edit(id, seq, "oops, secret").await.unwrap().seq;
    bob.react(id, seq, "👍").await.unwrap();
    let delete = alice.delete(id, seq).await.unwrap().seq;
    let live = next_event(&mut bob_ev, id, "delete").await;
    assert_eq!((live.target_seq, live.body.as_str()), (seq, ""));

    let stored = history(&bob, id).await;
    let message = at(&stored, seq);
    assert!(message.deleted);
    assert!(message.body.is_empty() && message.content_type.is_empty());
    assert!(message.reactions.is_empty());
    assert!(
        at(&stored, edit).body.is_empty(),
        "the edit's body is removed too"
    );
    assert_eq!(at(&stored, delete).kind, "delete");
    assert!(
        stored.iter().all(|m| !m.body.contains("oops")),
        "no trace of the body: {stored:?}"
    );

    // A deleted message takes no edits, reactions or second delete.
    assert_eq!(
        code_of(alice.edit(id, seq, "back").await),
        ErrorCode::NotFound
    );
    assert_eq!(code_of(bob.react(id, seq, "👍").await), ErrorCode::NotFound);
    assert_eq!(code_of(alice.delete(id, seq).await), ErrorCode::NotFound);
}

#[tokio::test]
async fn members_delete_their_own_messages_and_group_admins_anyones() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let (bob, _b) = setup.connect("bob", "d").await;
    let (carol, _c) = setup.connect("carol", "d").await;
    let group = alice.create_group("team", ["bob", "carol"]).await.unwrap();
    let id = &group.conversation_id;
    let from_bob = bob.send(id, "bob's").await.unwrap().seq;
    let from_carol = carol.send(id, "carol's").await.unwrap().seq;

    assert_eq!(
        code_of(carol.delete(id, from_bob).await),
        ErrorCode::Forbidden
    );
    carol.delete(id, from_carol).await.unwrap();
    // The owner deletes a member's message; an admin does too.
    alice.delete(id, from_bob).await.unwrap();
    let again = bob.send(id, "bob's again").await.unwrap().seq;
    alice.set_role(id, ["carol"], "admin").await.unwrap();
    carol.delete(id, again).await.unwrap();
    let stored = history(&alice, id).await;
    for seq in [from_bob, from_carol, again] {
        assert!(at(&stored, seq).deleted, "seq {seq} deleted");
    }

    // In a direct conversation nobody deletes the other's messages.
    let direct = alice.create_direct("bob").await.unwrap();
    let d = &direct.conversation_id;
    let seq = bob.send(d, "hi").await.unwrap().seq;
    assert_eq!(code_of(alice.delete(d, seq).await), ErrorCode::Forbidden);
}

// ---------------------------------------------------------------------------------
// Reactions

#[tokio::test]
async fn reactions_are_counted_per_emoji_with_the_readers_own() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let (bob, _b) = setup.connect("bob", "d").await;
    let (carol, mut carol_ev) = setup.connect("carol", "d").await;
    let group = alice.create_group("team", ["bob", "carol"]).await.unwrap();
    let id = &group.conversation_id;
    let seq = alice.send(id, "react to me").await.unwrap().seq;

    let r = bob.react(id, seq, "👍").await.unwrap();
    assert_eq!(r.seq, seq + 1, "a reaction has its own sequence");
    carol.react(id, seq, "👍").await.unwrap();
    carol.react(id, seq, "🎉").await.unwrap();
    // Reacting twice with the same emoji counts once.
    bob.react(id, seq, "👍").await.unwrap();
    let live = next_event(&mut carol_ev, id, "reaction").await;
    assert_eq!(
        (
            live.target_seq,
            live.emoji.as_str(),
            live.sender_id.as_str(),
            live.remove
        ),
        (seq, "👍", "bob", false)
    );

    let counts = |m: &Message| -> Vec<(String, u32, bool)> {
        m.reactions
            .iter()
            .map(|r| (r.emoji.clone(), r.count, r.mine))
            .collect()
    };
    let as_bob = history(&bob, id).await;
    assert_eq!(
        counts(at(&as_bob, seq)),
        [("🎉".to_owned(), 1, false), ("👍".to_owned(), 2, true)]
    );
    let as_alice = history(&alice, id).await;
    assert_eq!(
        counts(at(&as_alice, seq)),
        [("🎉".to_owned(), 1, false), ("👍".to_owned(), 2, false)]
    );

    carol.unreact(id, seq, "👍").await.unwrap();
    carol.unreact(id, seq, "🎉").await.unwrap();
    let as_carol = history(&carol, id).await;
    assert_eq!(counts(at(&as_carol, seq)), [("👍".to_owned(), 1, false)]);
}

#[tokio::test]
async fn reacting_to_a_missing_message_or_with_a_bad_emoji_is_refused() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let conv = alice.create_direct("bob").await.unwrap();
    let id = &conv.conversation_id;
    let seq = alice.send(id, "hi").await.unwrap().seq;
    assert_eq!(
        code_of(alice.react(id, 42, "👍").await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code_of(alice.react(id, seq, "").await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code_of(alice.react(id, seq, &"x".repeat(33)).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code_of(alice.react(id, seq, "\u{7}").await),
        ErrorCode::InvalidRequest
    );
    // A reaction event is not a message either.
    let reaction = alice.react(id, seq, "👍").await.unwrap().seq;
    assert_eq!(
        code_of(alice.react(id, reaction, "👍").await),
        ErrorCode::NotFound
    );
}

// ---------------------------------------------------------------------------------
// Replies, threads, mentions

#[tokio::test]
async fn replies_and_threads_reference_their_messages() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let (bob, _b) = setup.connect("bob", "d").await;
    let (carol, mut carol_ev) = setup.connect("carol", "d").await;
    let group = alice.create_group("team", ["bob", "carol"]).await.unwrap();
    let id = &group.conversation_id;
    let root = alice.send(id, "root").await.unwrap().seq;
    let reply = bob
        .send_with(id, "a reply", &SendOptions::new().reply_to(root))
        .await
        .unwrap()
        .seq;
    let first = carol
        .send_with(id, "in thread", &SendOptions::new().in_thread(root))
        .await
        .unwrap()
        .seq;
    let second = bob
        .send_with(
            id,
            "@alice in thread",
            &SendOptions::new().in_thread(root).mention("alice"),
        )
        .await
        .unwrap()
        .seq;
    let live = next_matching(&mut carol_ev, "thread reply", |ev| match ev {
        Event::Message(m) if m.seq == second => Some(m.clone()),
        _ => None,
    })
    .await;
    assert_eq!(live.thread_root_seq, root);
    assert_eq!(live.mentions, ["alice"]);

    let stored = history(&alice, id).await;
    assert_eq!(at(&stored, reply).reply_to_seq, root);
    assert_eq!(at(&stored, root).reply_count, 2);

    let thread = alice.thread(id, root, 0, 0).await.unwrap();
    let root_message = thread.root.expect("root");
    assert_eq!((root_message.seq, root_message.reply_count), (root, 2));
    let seqs: Vec<u64> = thread.replies.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [first, second]);
    assert!(!thread.has_more);
    let page = alice.thread(id, root, 0, 1).await.unwrap();
    assert_eq!(page.replies.len(), 1);
    assert!(page.has_more);
    let rest = alice.thread(id, root, first, 1).await.unwrap();
    assert_eq!(rest.replies[0].seq, second);

    // A thread reply cannot root a thread; references must exist.
    assert_eq!(
        code_of(
            bob.send_with(id, "nested", &SendOptions::new().in_thread(first))
                .await
        ),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code_of(
            bob.send_with(id, "to nothing", &SendOptions::new().reply_to(999))
                .await
        ),
        ErrorCode::NotFound
    );
    assert_eq!(
        code_of(
            bob.send_with(id, "nothing", &SendOptions::new().in_thread(999))
                .await
        ),
        ErrorCode::NotFound
    );
    assert_eq!(
        code_of(alice.thread(id, 999, 0, 0).await),
        ErrorCode::NotFound
    );
}

#[tokio::test]
async fn mentions_must_name_members() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let group = alice.create_group("team", ["bob"]).await.unwrap();
    let id = &group.conversation_id;
    assert_eq!(
        code_of(
            alice
                .send_with(id, "hi mallory", &SendOptions::new().mention("mallory"))
                .await
        ),
        ErrorCode::InvalidRequest
    );
    let mut too_many = SendOptions::new();
    for _ in 0..51 {
        too_many = too_many.mention("bob");
    }
    assert_eq!(
        code_of(alice.send_with(id, "everyone", &too_many).await),
        ErrorCode::InvalidRequest
    );
    alice
        .send_with(id, "hi bob", &SendOptions::new().mention("bob"))
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------
// Notification preferences

#[tokio::test]
async fn mutes_and_do_not_disturb_are_returned_by_sync() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let (bob, _b) = setup.connect("bob", "d").await;
    let group = alice.create_group("loud", ["bob"]).await.unwrap();
    let direct = alice.create_direct("bob").await.unwrap();
    let (g, d) = (&group.conversation_id, &direct.conversation_id);

    let dnd_until = now_ms() + 3_600_000;
    bob.mute(g, -1).await.unwrap();
    bob.mute(d, now_ms() - 1_000).await.unwrap();
    bob.do_not_disturb(dnd_until).await.unwrap();
    let sync = bob.sync(vec![], 0).await.unwrap();
    assert_eq!(sync.dnd_until_ms, dnd_until);
    let muted: HashMap<&str, i64> = sync
        .conversations
        .iter()
        .map(|c| (c.conversation_id.as_str(), c.muted_until_ms))
        .collect();
    assert_eq!(muted[g.as_str()], -1);
    assert_eq!(muted[d.as_str()], 0, "an expired mute reads as not muted");
    assert_eq!(listed(&bob, g).await.muted_until_ms, -1);
    // Preferences are the user's own.
    assert_eq!(listed(&alice, g).await.muted_until_ms, 0);

    bob.mute(g, 0).await.unwrap();
    bob.do_not_disturb(0).await.unwrap();
    let sync = bob.sync(vec![], 0).await.unwrap();
    assert_eq!(sync.dnd_until_ms, 0);
    assert!(sync.conversations.iter().all(|c| c.muted_until_ms == 0));
}

// ---------------------------------------------------------------------------------
// Group administration

#[tokio::test]
async fn group_changes_are_timeline_events_every_member_sees() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, mut alice_ev) = setup.connect("alice", "d").await;
    let (bob, mut bob_ev) = setup.connect("bob", "d").await;
    let (carol, mut carol_ev) = setup.connect("carol", "d").await;
    let (dave, mut dave_ev) = setup.connect("dave", "d").await;
    let group = alice
        .create_group("team", ["bob", "carol", "dave"])
        .await
        .unwrap();
    let id = &group.conversation_id;

    let promoted = alice.set_role(id, ["bob"], "admin").await.unwrap();
    let event = next_system(&mut carol_ev, id, "role_changed").await;
    let system = event.system.clone().unwrap();
    assert_eq!(event.seq, promoted.seq);
    assert_eq!(
        (
            system.actor_id.as_str(),
            system.user_ids.as_slice(),
            system.role.as_str()
        ),
        ("alice", &["bob".to_owned()][..], "admin")
    );

    bob.rename(id, "the team").await.unwrap();
    bob.set_topic(id, "shipping friday").await.unwrap();
    let renamed = next_system(&mut dave_ev, id, "renamed").await;
    assert_eq!(renamed.system.unwrap().name, "the team");
    let topic = next_system(&mut alice_ev, id, "topic_changed").await;
    assert_eq!(topic.system.unwrap().topic, "shipping friday");
    let conv = alice.members_list(id).await.unwrap();
    assert_eq!(
        (conv.name.as_str(), conv.topic.as_str()),
        ("the team", "shipping friday")
    );
    let roles: HashMap<&str, &str> = conv
        .member_roles
        .iter()
        .map(|m| (m.user_id.as_str(), m.role.as_str()))
        .collect();
    assert_eq!(
        roles,
        HashMap::from([
            ("alice", "owner"),
            ("bob", "admin"),
            ("carol", "member"),
            ("dave", "member")
        ])
    );

    // The kicked user sees their own removal, then is out.
    bob.kick(id, ["carol"]).await.unwrap();
    let kicked = next_system(&mut carol_ev, id, "members_removed").await;
    let system = kicked.system.unwrap();
    assert_eq!(
        (system.actor_id.as_str(), system.user_ids.as_slice()),
        ("bob", &["carol".to_owned()][..])
    );
    next_system(&mut alice_ev, id, "members_removed").await;
    assert_eq!(
        code_of(carol.send(id, "still here?").await),
        ErrorCode::NotMember
    );

    // A ban removes and keeps out until lifted.
    alice.ban(id, ["dave"]).await.unwrap();
    next_system(&mut dave_ev, id, "members_banned").await;
    assert_eq!(code_of(dave.send(id, "hello?").await), ErrorCode::NotMember);
    assert_eq!(
        code_of(alice.add_members(id, ["dave"]).await),
        ErrorCode::Banned
    );
    assert_eq!(
        code_of(alice.members(id, MembersAction::Add, ["dave"]).await),
        ErrorCode::Banned
    );
    alice.unban(id, ["dave"]).await.unwrap();
    alice.add_members(id, ["dave"]).await.unwrap();
    next_system(&mut dave_ev, id, "members_added").await;
    dave.send(id, "back").await.unwrap();

    // The older members request is recorded the same way, and still acked with
    // the conversation.
    let conv = alice
        .members(id, MembersAction::Add, ["erin"])
        .await
        .unwrap()
        .expect("conversation ack");
    assert!(conv.members.contains(&"erin".to_owned()));
    next_system(&mut bob_ev, id, "members_added").await;

    let actions: Vec<String> = history(&alice, id)
        .await
        .iter()
        .filter(|m| m.kind == "system")
        .map(|m| m.system.as_ref().unwrap().action.clone())
        .collect();
    assert_eq!(
        actions,
        [
            "role_changed",
            "renamed",
            "topic_changed",
            "members_removed",
            "members_banned",
            "members_unbanned",
            "members_added",
            "members_added",
        ]
    );
}

#[tokio::test]
async fn only_owners_and_admins_administer_a_group() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let (bob, _b) = setup.connect("bob", "d").await;
    let (carol, _c) = setup.connect("carol", "d").await;
    let group = alice
        .create_group("team", ["bob", "carol", "dave"])
        .await
        .unwrap();
    let id = &group.conversation_id;

    // A member: no kick, rename, topic, add, ban or role change.
    assert_eq!(
        code_of(carol.kick(id, ["dave"]).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code_of(carol.rename(id, "mine").await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code_of(carol.set_topic(id, "mine").await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code_of(carol.add_members(id, ["erin"]).await),
        ErrorCode::Forbidden
    );
    assert_eq!(code_of(carol.ban(id, ["dave"]).await), ErrorCode::Forbidden);
    assert_eq!(
        code_of(carol.set_role(id, ["carol"], "admin").await),
        ErrorCode::Forbidden
    );

    // An admin cannot remove the owner or another admin, nor change roles.
    alice.set_role(id, ["bob", "carol"], "admin").await.unwrap();
    assert_eq!(code_of(bob.kick(id, ["alice"]).await), ErrorCode::Forbidden);
    assert_eq!(code_of(bob.ban(id, ["carol"]).await), ErrorCode::Forbidden);
    assert_eq!(
        code_of(bob.set_role(id, ["dave"], "admin").await),
        ErrorCode::Forbidden
    );
    // Nobody removes themselves that way (leave is for that).
    let own = code_of(alice.kick(id, ["alice"]).await);
    assert!(
        matches!(own, ErrorCode::Forbidden | ErrorCode::InvalidRequest),
        "{own:?}"
    );
    // Bad values.
    assert_eq!(
        code_of(alice.set_role(id, ["dave"], "king").await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code_of(alice.set_topic(id, &"t".repeat(1025)).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code_of(alice.set_role(id, ["bob", "carol"], "owner").await),
        ErrorCode::InvalidRequest
    );

    // Direct conversations have no administration.
    let direct = alice.create_direct("bob").await.unwrap();
    assert_eq!(
        code_of(alice.rename(&direct.conversation_id, "us").await),
        ErrorCode::Forbidden
    );
    let (mallory, _m) = setup.connect("mallory", "d").await;
    assert_eq!(
        code_of(mallory.rename(id, "pwned").await),
        ErrorCode::NotMember
    );
}

#[tokio::test]
async fn ownership_transfers_and_passes_on_when_the_owner_leaves() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let (bob, _b) = setup.connect("bob", "d").await;
    let (carol, mut carol_ev) = setup.connect("carol", "d").await;
    let group = alice.create_group("team", ["bob", "carol"]).await.unwrap();
    let id = &group.conversation_id;
    let role = |conv: &switchboard_proto::Conversation, user: &str| {
        conv.member_roles
            .iter()
            .find(|m| m.user_id == user)
            .map(|m| m.role.clone())
    };

    // Transfer: the new owner takes over, the old one becomes admin.
    alice.set_role(id, ["bob"], "owner").await.unwrap();
    let conv = carol.members_list(id).await.unwrap();
    assert_eq!(conv.owner_id, "bob");
    assert_eq!(role(&conv, "bob").as_deref(), Some("owner"));
    assert_eq!(role(&conv, "alice").as_deref(), Some("admin"));

    // The owner leaves: the earliest-joined admin (alice) becomes owner; the one
    // who left sees their own departure.
    let (_bob2, mut bob_ev) = setup.connect("bob", "d2").await;
    bob.leave(id).await.unwrap();
    let left = next_system(&mut bob_ev, id, "member_left").await;
    assert_eq!(left.system.unwrap().user_ids, ["bob"]);
    next_system(&mut carol_ev, id, "member_left").await;
    let conv = carol.members_list(id).await.unwrap();
    assert_eq!(conv.owner_id, "alice");
    assert_eq!(role(&conv, "alice").as_deref(), Some("owner"));
    assert_eq!(role(&conv, "bob"), None);
    assert_eq!(code_of(bob.send(id, "bye?").await), ErrorCode::NotMember);

    // Leaving is for any member; a removed member cannot leave again.
    carol.leave(id).await.unwrap();
    assert_eq!(code_of(carol.leave(id).await), ErrorCode::NotMember);
    assert_eq!(alice.members_list(id).await.unwrap().members, ["alice"]);
}

// ---------------------------------------------------------------------------------
// HTTP API and webhooks

#[tokio::test]
async fn webhooks_receive_signed_events_in_order() {
    let mut setup = Setup::new(true);
    allow_loopback_webhooks(&mut setup);
    let _sb = setup.standalone().await;
    let port = setup.gateway.listen;
    let (alice, _a) = setup.connect("alice", "d").await;
    let (bob, _b) = setup.connect("bob", "d").await;
    let group = alice.create_group("hooked", ["bob"]).await.unwrap();
    let id = &group.conversation_id;
    let before = alice.send(id, "before the webhook").await.unwrap().seq;

    let (url, mut rx) = webhook_receiver(0).await;
    let (status, body) = put_webhook(port, &setup.token("alice"), id, &url).await;
    let webhook = parse_webhook(status, &body);
    assert_eq!(webhook.url, url);
    assert_eq!(webhook.secret.len(), 64, "32 random bytes in hex");
    assert_eq!(webhook.delivered_seq, before, "starts after what exists");

    let mut expected = Vec::new();
    for i in 0..5 {
        expected.push(alice.send(id, &format!("m{i}")).await.unwrap().seq);
    }
    expected.push(bob.react(id, expected[0], "👍").await.unwrap().seq);
    expected.push(alice.edit(id, expected[1], "m1 edited").await.unwrap().seq);
    expected.push(alice.set_topic(id, "hooks").await.unwrap().seq);
    let last = *expected.last().unwrap();

    let (events, _) = receive_until(&mut rx, &webhook, last, WAIT).await;
    let seqs: Vec<u64> = events.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, expected);
    assert_eq!(events[0].body, "m0");
    let kinds: Vec<&str> = events[5..].iter().map(|m| m.kind.as_str()).collect();
    assert_eq!(kinds, ["reaction", "edit", "system"]);

    // Listing: members see it, only owners and admins see the secret.
    let path = format!("/v1/conversations/{id}/webhooks");
    let (status, body) = http(port, "GET", &path, &setup.token("bob"), None).await;
    assert_eq!(status, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        list["webhooks"][0]["webhook_id"],
        webhook.webhook_id.as_str()
    );
    assert!(list["webhooks"][0]["secret"]
        .as_str()
        .unwrap_or("")
        .is_empty());
    let (_, body) = http(port, "GET", &path, &setup.token("alice"), None).await;
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["webhooks"][0]["secret"], webhook.secret.as_str());

    // Deleted: no more deliveries are attempted for new events... and it is gone.
    let (status, body) = http(
        port,
        "DELETE",
        &format!("{path}/{}", webhook.webhook_id),
        &setup.token("alice"),
        None,
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = http(
        port,
        "DELETE",
        &format!("{path}/{}", webhook.webhook_id),
        &setup.token("alice"),
        None,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (_, body) = http(port, "GET", &path, &setup.token("alice"), None).await;
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        list["webhooks"].as_array().is_none_or(|a| a.is_empty()),
        "{body}"
    );
}

#[tokio::test]
async fn a_new_webhook_starts_at_once_and_a_deleted_one_sends_nothing_more() {
    let mut setup = Setup::new(true);
    allow_loopback_webhooks(&mut setup);
    let _sb = setup.standalone().await;
    let port = setup.gateway.listen;
    let (alice, _a) = setup.connect("alice", "d").await;
    let group = alice.create_group("prompt", ["bob"]).await.unwrap();
    let id = &group.conversation_id;
    // Past the dispatcher's first look at start: only a prompt start is fast now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (url, mut rx) = webhook_receiver(0).await;
    let (status, body) = put_webhook(port, &setup.token("alice"), id, &url).await;
    let webhook = parse_webhook(status, &body);
    let created = std::time::Instant::now();
    let seq = alice.send(id, "first").await.unwrap().seq;
    // The periodic rediscovery is every 10 s; a started webhook delivers in well
    // under that.
    let (events, _) = receive_until(&mut rx, &webhook, seq, Duration::from_secs(3)).await;
    assert_eq!(events.last().map(|m| m.seq), Some(seq));
    assert!(created.elapsed() < Duration::from_secs(3));

    let path = format!("/v1/conversations/{id}/webhooks/{}", webhook.webhook_id);
    let (status, body) = http(port, "DELETE", &path, &setup.token("alice"), None).await;
    assert_eq!(status, 204, "{body}");
    alice.send(id, "after the delete").await.unwrap();
    if let Ok(Some(late)) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
        panic!("a POST after the delete returned: {}", late.body);
    }
}

#[tokio::test]
async fn a_webhook_receiver_that_fails_at_first_still_gets_everything_in_order() {
    let mut setup = Setup::new(true);
    allow_loopback_webhooks(&mut setup);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let conv = alice.create_direct("bob").await.unwrap();
    let id = &conv.conversation_id;
    let (url, mut rx) = webhook_receiver(2).await;
    let (status, body) = put_webhook(setup.gateway.listen, &setup.token("alice"), id, &url).await;
    let webhook = parse_webhook(status, &body);

    let mut expected = Vec::new();
    for i in 0..12 {
        expected.push(alice.send(id, &format!("m{i}")).await.unwrap().seq);
    }
    // Two failures: retries after about 1 s and 2 s (jittered).
    let (events, deliveries) = receive_until(
        &mut rx,
        &webhook,
        *expected.last().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    let seqs: Vec<u64> = events.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, expected);
    let statuses: Vec<u16> = deliveries.iter().map(|d| d.status).collect();
    assert_eq!(&statuses[..3], [500, 500, 200]);
    // The failed batches are retried from the same place.
    let first_seq = |d: &Delivery| verify(d, &webhook.webhook_id, id, &webhook.secret)[0].seq;
    assert_eq!(first_seq(&deliveries[0]), expected[0]);
    assert_eq!(first_seq(&deliveries[1]), expected[0]);
    assert_eq!(first_seq(&deliveries[2]), expected[0]);
}

#[tokio::test]
async fn webhook_urls_and_roles_are_checked_by_the_http_api() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let port = setup.gateway.listen;
    let (alice, _a) = setup.connect("alice", "d").await;
    let group = alice.create_group("team", ["bob"]).await.unwrap();
    let id = &group.conversation_id;
    let alice_token = setup.token("alice");

    for url in ["ftp://example.com/hook", "not a url", "http://", ""] {
        let (status, body) = put_webhook(port, &alice_token, id, url).await;
        assert_eq!(status, 400, "{url}: {body}");
        let error: serde_json::Value = serde_json::from_str(&body).expect("error json");
        assert_eq!(error["code"], "invalid_request", "{url}");
    }
    let long = format!("https://example.com/{}", "a".repeat(2048));
    assert_eq!(put_webhook(port, &alice_token, id, &long).await.0, 400);

    let (status, body) = put_webhook(port, &setup.token("bob"), id, "https://example.com/h").await;
    assert_eq!(status, 403, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["code"], "forbidden");
    let (status, body) =
        put_webhook(port, &setup.token("mallory"), id, "https://example.com/h").await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = put_webhook(port, "not-a-token", id, "https://example.com/h").await;
    assert_eq!(status, 401);

    // At most 10 per conversation.
    for i in 0..10 {
        let (status, body) =
            put_webhook(port, &alice_token, id, &format!("https://example.com/{i}")).await;
        parse_webhook(status, &body);
    }
    let (status, body) = put_webhook(port, &alice_token, id, "https://example.com/11").await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn bots_post_over_the_http_api_and_their_messages_are_marked() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let port = setup.gateway.listen;
    let (alice, mut alice_ev) = setup.connect("alice", "d").await;
    let group = alice.create_group("team", ["bot1"]).await.unwrap();
    let id = &group.conversation_id;
    let bot_token = switchboard_auth::Signer::hs256(SECRET.as_bytes())
        .sign_account("bot1", Duration::from_secs(3600), true)
        .expect("bot token");

    let (status, body) = http(
        port,
        "POST",
        &format!("/v1/conversations/{id}/messages"),
        &bot_token,
        Some(r#"{"body": "build passed", "content_type": "text/plain"}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let sent: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(sent["seq"], 1);
    let live = messages(&mut alice_ev, id, 1).await;
    assert!(live[0].from_bot);
    assert_eq!(
        (live[0].sender_id.as_str(), live[0].body.as_str()),
        ("bot1", "build passed")
    );

    let (status, body) = http(
        port,
        "GET",
        &format!("/v1/conversations/{id}/messages?direction=forward"),
        &bot_token,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let page: switchboard_proto::HistoryResult = serde_json::from_str(&body).unwrap();
    assert!(page.messages[0].from_bot);
    // A person's messages are not marked.
    alice.send(id, "thanks").await.unwrap();
    assert!(!history(&alice, id).await[1].from_bot);
}

// ---------------------------------------------------------------------------------
// The client library with timeline events

#[tokio::test]
async fn a_client_timeline_orders_every_event_kind_and_applies_them_like_history() {
    use switchboard_client::{apply_event, EventKind, Observed, Timeline};

    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let (alice, _a) = setup.connect("alice", "d").await;
    let (bob, mut bob_ev) = setup.connect("bob", "d").await;
    let (carol, _c) = setup.connect("carol", "d").await;
    let group = alice.create_group("team", ["bob", "carol"]).await.unwrap();
    let id = &group.conversation_id;
    let mut timeline = Timeline::new();
    timeline.track(id, group.last_seq);

    let kept = alice.send(id, "keep").await.unwrap().seq;
    let gone = carol.send(id, "gone").await.unwrap().seq;
    alice.edit(id, kept, "kept").await.unwrap();
    bob.react(id, kept, "👍").await.unwrap();
    carol.react(id, kept, "🎉").await.unwrap();
    carol.unreact(id, kept, "🎉").await.unwrap();
    carol.delete(id, gone).await.unwrap();
    let last = alice.rename(id, "the team").await.unwrap().seq;

    // bob's copies of the messages, brought up to date by the live events.
    let mut held: Vec<Message> = Vec::new();
    let mut kinds = Vec::new();
    while timeline.last_seq(id) < Some(last) {
        let event = messages(&mut bob_ev, id, 1).await.remove(0);
        let Observed::InOrder(delivered) = timeline.observe(event) else {
            panic!("live events of one connection arrive in order without gaps");
        };
        for event in delivered {
            kinds.push(EventKind::of(&event));
            match EventKind::of(&event) {
                EventKind::Message => held.push(event),
                _ => {
                    for message in &mut held {
                        apply_event(message, &event, "bob");
                    }
                }
            }
        }
    }
    assert_eq!(
        kinds,
        [
            EventKind::Message,
            EventKind::Message,
            EventKind::Edit,
            EventKind::Reaction,
            EventKind::Reaction,
            EventKind::Reaction,
            EventKind::Delete,
            EventKind::System,
        ]
    );
    assert!(timeline.gaps().is_empty());

    let stored = history(&bob, id).await;
    for message in &held {
        let current = at(&stored, message.seq);
        assert_eq!(
            (&message.body, message.deleted, &message.reactions),
            (&current.body, current.deleted, &current.reactions),
            "seq {}",
            message.seq
        );
        assert_eq!(message.edited_at_ms, current.edited_at_ms);
    }
}
