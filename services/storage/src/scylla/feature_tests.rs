//! ScyllaDB/Cassandra-specific tests of the conversation features (the shared
//! behaviour is checked by the conformance suite in `tests.rs`): effects of an append
//! interrupted before its row are completed by the replay, and exactly once however
//! often they run; effects written late by a second writer (a paused former
//! partition owner) lose to those of later events; a keyspace written by schema
//! version 1 is upgraded in place.

use switchboard_proto::{Message, SystemEvent};

use super::tests::ScyllaFactory;
use super::*;
use crate::conformance::WINDOW_MS;
use crate::store::{actions, roles, Direction, PageQuery, ThreadQuery};

const NOW: i64 = 1_700_000_000_000;

fn event(conv: &str, sender: &str, kind: &str, target: u64, body: &str) -> Message {
    Message {
        conversation_id: conv.into(),
        sender_id: sender.into(),
        sender_device: "phone".into(),
        kind: kind.into(),
        target_seq: target,
        body: body.into(),
        content_type: if body.is_empty() { "" } else { "text/plain" }.into(),
        ..Default::default()
    }
}

fn system(conv: &str, actor: &str, action: &str, users: &[&str], role: &str) -> Message {
    Message {
        system: Some(SystemEvent {
            action: action.into(),
            actor_id: actor.into(),
            user_ids: users.iter().map(|u| u.to_string()).collect(),
            role: role.into(),
            ..Default::default()
        }),
        ..event(conv, actor, "system", 0, "")
    }
}

/// Give `m` the next sequence and an id.
async fn sequenced(store: &ScyllaStore, mut m: Message) -> Message {
    m.seq = store.last_seq(&m.conversation_id).await.unwrap() + 1;
    m.message_id = format!("id-{}", m.seq);
    m.sent_at_ms = NOW + m.seq as i64;
    m
}

async fn append(store: &ScyllaStore, m: Message) -> Message {
    let m = sequenced(store, m).await;
    store.append(m, NOW - WINDOW_MS, NOW).await.unwrap().message
}

/// An append of `m` that stopped after its key and its effects, before its row (a
/// crash, or a partition owner paused there): nothing of it is visible as stored.
async fn commit_only(store: &ScyllaStore, m: Message) -> Message {
    let m = sequenced(store, m).await;
    store.write_key(&m, 3600, NOW).await.unwrap();
    store.apply_effects(&m, NOW).await.unwrap();
    assert_eq!(
        store.load_message(&m.conversation_id, m.seq).await.unwrap(),
        None
    );
    m
}

/// The same record appended again (the next owner's replay): stored, effects once.
async fn replay(store: &ScyllaStore, m: &Message) {
    let again = store.append(m.clone(), NOW - WINDOW_MS, NOW).await.unwrap();
    assert!(!again.duplicate);
    assert_eq!(store.last_seq(&m.conversation_id).await.unwrap(), m.seq);
}

/// Event `seq` as history returns it (current state, reactions counted).
async fn current(store: &ScyllaStore, conv: &str, seq: u64) -> Message {
    let page = store
        .history_page(&PageQuery {
            conversation_id: conv.into(),
            from_seq: seq - 1,
            direction: Direction::Forward,
            limit: 1,
        })
        .await
        .unwrap();
    page.messages.into_iter().next().expect("stored")
}

fn group(id: &str, owner: &str, members: &[&str]) -> NewConversation {
    NewConversation {
        conversation_id: id.into(),
        kind: ConversationKind::Group,
        creator_id: owner.into(),
        members: members.iter().map(|m| m.to_string()).collect(),
        name: "g".into(),
        now_ms: NOW,
        max_created: u32::MAX,
    }
}

#[tokio::test]
async fn effects_of_an_interrupted_append_are_rolled_forward_exactly_once() {
    let factory = ScyllaFactory::new();
    let store = factory.store().await;
    let g = store
        .create_conversation(group("g", "olga", &["olga", "alice", "bob"]))
        .await
        .unwrap()
        .conversation_id;
    let m1 = append(&store, event(&g, "alice", "message", 0, "v1"))
        .await
        .seq;

    // An edit stopped before its row: the replay stores it.
    let edit = commit_only(&store, event(&g, "alice", "edit", m1, "v2")).await;
    replay(&store, &edit).await;
    let now = current(&store, &g, m1).await;
    assert_eq!(
        (now.body.as_str(), now.edited_at_ms),
        ("v2", edit.sent_at_ms)
    );
    assert_eq!(current(&store, &g, edit.seq).await.body, "v2");

    // A reaction committed; the retry of the same record finishes it, and rolling
    // it forward again counts nothing twice.
    let reaction = commit_only(
        &store,
        Message {
            emoji: "👍".into(),
            ..event(&g, "bob", "reaction", m1, "")
        },
    )
    .await;
    replay(&store, &reaction).await;
    store.roll_forward(&reaction, NOW).await.unwrap();
    let counts: Vec<(String, u32)> = current(&store, &g, m1)
        .await
        .reactions
        .into_iter()
        .map(|r| (r.emoji, r.count))
        .collect();
    assert_eq!(counts, [("👍".to_string(), 1)]);
    assert_eq!(
        store.my_reactions(&g, "bob", 0, 100).await.unwrap(),
        [(m1, "👍".to_string())]
    );

    // A thread reply committed and rolled forward twice: one reply.
    let reply = commit_only(
        &store,
        Message {
            thread_root_seq: m1,
            ..event(&g, "bob", "message", 0, "re")
        },
    )
    .await;
    replay(&store, &reply).await;
    store.roll_forward(&reply, NOW).await.unwrap();
    assert_eq!(current(&store, &g, m1).await.reply_count, 1);
    let thread = store
        .thread_page(&ThreadQuery {
            conversation_id: g.clone(),
            root_seq: m1,
            from_seq: 0,
            limit: 10,
        })
        .await
        .unwrap();
    let replies: Vec<u64> = thread.replies.iter().map(|m| m.seq).collect();
    assert_eq!((replies, thread.has_more), (vec![reply.seq], false));

    // System events committed and rolled forward twice: applied once.
    let added = commit_only(
        &store,
        system(&g, "olga", actions::MEMBERS_ADDED, &["carol"], ""),
    )
    .await;
    replay(&store, &added).await;
    let joined = |conv: &Conversation| {
        conv.member_roles
            .iter()
            .find(|m| m.user_id == "carol")
            .map(|m| m.joined_at_ms)
    };
    let first = joined(&store.get_conversation(&g).await.unwrap());
    assert!(first.is_some());
    store.roll_forward(&added, NOW + 5).await.unwrap();
    let transfer = commit_only(
        &store,
        system(&g, "olga", actions::ROLE_CHANGED, &["bob"], roles::OWNER),
    )
    .await;
    replay(&store, &transfer).await;
    store.roll_forward(&transfer, NOW).await.unwrap();
    let conv = store.get_conversation(&g).await.unwrap();
    assert_eq!(conv.owner_id, "bob");
    let member_roles: Vec<(&str, &str)> = conv
        .member_roles
        .iter()
        .map(|m| (m.user_id.as_str(), m.role.as_str()))
        .collect();
    assert_eq!(
        member_roles,
        [
            ("alice", roles::MEMBER),
            ("bob", roles::OWNER),
            ("carol", roles::MEMBER),
            ("olga", roles::ADMIN)
        ]
    );
    assert_eq!(joined(&conv), first, "joined when first applied");
    let row = store.conv_row(&g, true).await.unwrap().unwrap();
    assert_eq!(row.member_count, 4);
    assert_eq!(row.members_seq, seq_i64(transfer.seq));
    assert_eq!(row.applied_members_version, row.members_version);

    // A delete committed: rolled forward twice, nothing of the text or its
    // reactions stays.
    let delete = commit_only(&store, event(&g, "alice", "delete", m1, "")).await;
    replay(&store, &delete).await;
    store.roll_forward(&delete, NOW).await.unwrap();
    let gone = current(&store, &g, m1).await;
    assert!(gone.deleted);
    assert_eq!((gone.body.as_str(), gone.reactions.len()), ("", 0));
    assert_eq!(current(&store, &g, edit.seq).await.body, "");
    assert!(store
        .my_reactions(&g, "bob", 0, 100)
        .await
        .unwrap()
        .is_empty());
    // A reaction arriving after the delete (authorized before it) is stored
    // without effect.
    append(
        &store,
        Message {
            emoji: "🎉".into(),
            ..event(&g, "carol", "reaction", m1, "")
        },
    )
    .await;
    assert!(current(&store, &g, m1).await.reactions.is_empty());
}

/// A former partition owner that was paused writes an older event's row and
/// effects again after later events took effect: every cell keeps the value of the
/// latest event (the write timestamps follow the sequence), not the latest write.
#[tokio::test]
async fn late_writes_of_older_events_lose_to_later_events() {
    let factory = ScyllaFactory::new();
    let store = factory.store().await;
    let g = store
        .create_conversation(group("late", "olga", &["olga", "alice", "bob"]))
        .await
        .unwrap()
        .conversation_id;
    let m1 = append(&store, event(&g, "alice", "message", 0, "v1")).await;
    let e1 = append(&store, event(&g, "alice", "edit", m1.seq, "v2")).await;
    let e2 = append(&store, event(&g, "alice", "edit", m1.seq, "v3")).await;
    let add = append(
        &store,
        Message {
            emoji: "👍".into(),
            ..event(&g, "bob", "reaction", m1.seq, "")
        },
    )
    .await;
    append(
        &store,
        Message {
            emoji: "👍".into(),
            remove: true,
            ..event(&g, "bob", "reaction", m1.seq, "")
        },
    )
    .await;
    assert_eq!(current(&store, &g, m1.seq).await.body, "v3");

    // The late writer: the original row, the first edit, the reaction's add.
    store.write_message(&m1).await.unwrap();
    store.roll_forward(&e1, NOW).await.unwrap();
    store.roll_forward(&add, NOW).await.unwrap();
    let now = current(&store, &g, m1.seq).await;
    assert_eq!(
        (now.body.as_str(), now.edited_at_ms, now.reactions.len()),
        ("v3", e2.sent_at_ms, 0)
    );
    assert!(store
        .my_reactions(&g, "bob", 0, 100)
        .await
        .unwrap()
        .is_empty());

    // After a delete, late writes of the message and its edits bring no text back.
    let delete = append(&store, event(&g, "alice", "delete", m1.seq, "")).await;
    store.write_message(&m1).await.unwrap();
    store.roll_forward(&e2, NOW).await.unwrap();
    store.write_message(&e1).await.unwrap();
    let gone = current(&store, &g, m1.seq).await;
    assert!(gone.deleted);
    assert_eq!(gone.body, "");
    assert_eq!(current(&store, &g, e1.seq).await.body, "");
    assert_eq!(current(&store, &g, e2.seq).await.body, "");
    // The head never moves back either.
    store.write_head(&g, m1.seq, m1.sent_at_ms).await.unwrap();
    assert_eq!(store.head_row(&g).await.unwrap(), Some(delete.seq));
}

#[tokio::test]
async fn unread_counts_stop_at_the_cap() {
    let factory = ScyllaFactory::new();
    let store = factory.store().await;
    let g = store
        .create_conversation(group("u", "olga", &["olga", "bob"]))
        .await
        .unwrap()
        .conversation_id;
    // More messages than the cap, across a bucket boundary, a few mentioning bob.
    let total = u64::from(features::UNREAD_CAP) + 30;
    for i in 0..total {
        let mentions = if i % 100 == 0 {
            vec!["bob".to_string()]
        } else {
            Vec::new()
        };
        append(
            &store,
            Message {
                mentions,
                ..event(&g, "olga", "message", 0, "x")
            },
        )
        .await;
    }
    let listed = store.list_conversations("bob").await.unwrap();
    let conv = listed.iter().find(|c| c.conversation_id == g).unwrap();
    assert_eq!(conv.unread_count, features::UNREAD_CAP);
    assert_eq!(conv.unread_mentions, 10, "the mentions among the counted");
    // After reading up to the last 30: 30 unread, those from bob's own not counted.
    store
        .set_read_marker(&g, "bob", total - 30, NOW)
        .await
        .unwrap();
    append(&store, event(&g, "bob", "message", 0, "mine")).await;
    let listed = store.list_conversations("bob").await.unwrap();
    let conv = listed.iter().find(|c| c.conversation_id == g).unwrap();
    assert_eq!((conv.unread_count, conv.read_seq), (30, total - 30));
}

#[tokio::test]
async fn a_version_1_keyspace_is_upgraded_in_place() {
    let factory = ScyllaFactory::new();
    let config = factory.config();
    let ks = config.storage.scylla_keyspace.clone();
    let session = connect(config, None).await.expect("test server reachable");
    run_ddl(&session, &schema::create_keyspace_cql(&ks, 1, ""))
        .await
        .unwrap();
    let version_table =
        schema::SCHEMA_VERSION_TABLE.replacen("schema_version", &format!("{ks}.schema_version"), 1);
    run_ddl(&session, &version_table).await.unwrap();
    for cql in schema::MIGRATIONS[0] {
        run_ddl(&session, &qualify(cql, &ks)).await.unwrap();
    }
    // Data as version 1 wrote it: a group of two with one message.
    let statements = [
        format!("INSERT INTO {ks}.schema_version (version, applied_at_ms) VALUES (1, 0)"),
        format!(
            "INSERT INTO {ks}.conversations (conversation_id, kind, name, owner_id, \
             created_at_ms, updated_at_ms, last_seq, members_version, member_count, \
             applied_members_version) VALUES ('g', 'group', 'old', 'olga', 1, 1, 1, 0, 2, 0)"
        ),
        format!(
            "INSERT INTO {ks}.members_by_conversation (conversation_id, user_id, role, \
             joined_at_ms) VALUES ('g', 'olga', 'owner', 1)"
        ),
        format!(
            "INSERT INTO {ks}.members_by_conversation (conversation_id, user_id, role, \
             joined_at_ms) VALUES ('g', 'bob', 'member', 2)"
        ),
        format!("INSERT INTO {ks}.conversations_by_user (user_id, conversation_id, joined_at_ms) VALUES ('olga', 'g', 1)"),
        format!("INSERT INTO {ks}.conversations_by_user (user_id, conversation_id, joined_at_ms) VALUES ('bob', 'g', 2)"),
        format!(
            "INSERT INTO {ks}.messages (conversation_id, bucket, seq, message_id, sender_id, \
             sender_device, client_msg_id, body, content_type, sent_at_ms) \
             VALUES ('g', 0, 1, 'm1', 'bob', 'phone', '', 'old text', 'text/plain', 1)"
        ),
    ];
    for cql in statements {
        session.query_unpaged(cql, ()).await.unwrap();
    }

    // Opening migrates (storage.migrate_on_start) and reads the old rows.
    let store = factory.store().await;
    assert_eq!(
        schema_version(&session, &ks).await.unwrap(),
        schema::latest_version()
    );
    let conv = store.get_conversation("g").await.unwrap();
    let member_roles: Vec<(&str, &str, i64)> = conv
        .member_roles
        .iter()
        .map(|m| (m.user_id.as_str(), m.role.as_str(), m.joined_at_ms))
        .collect();
    assert_eq!(
        member_roles,
        [("bob", roles::MEMBER, 2), ("olga", roles::OWNER, 1)]
    );
    let old = current(&store, "g", 1).await;
    assert_eq!(
        (old.kind.as_str(), old.body.as_str(), old.deleted),
        ("", "old text", false)
    );
    // New events apply to old rows.
    let edit = append(&store, event("g", "bob", "edit", 1, "new text")).await;
    append(
        &store,
        Message {
            emoji: "👍".into(),
            ..event("g", "olga", "reaction", 1, "")
        },
    )
    .await;
    let now = current(&store, "g", 1).await;
    assert_eq!(
        (now.body.as_str(), now.edited_at_ms, now.reactions.len()),
        ("new text", edit.sent_at_ms, 1)
    );
    let listed = store.list_conversations("olga").await.unwrap();
    assert_eq!(
        (listed[0].unread_count, listed[0].my_role.as_str()),
        (1, roles::OWNER)
    );
    // Migrating again changes nothing.
    assert_eq!(
        crate::migrate(config).await.unwrap(),
        schema::latest_version()
    );
}

#[tokio::test]
async fn the_webhook_limit_holds_under_concurrent_additions() {
    let factory = ScyllaFactory::new();
    let store = factory.store().await;
    let g = store
        .create_conversation(group("w", "olga", &["olga", "bob"]))
        .await
        .unwrap()
        .conversation_id;
    let other = store
        .create_conversation(group("v", "olga", &["olga"]))
        .await
        .unwrap()
        .conversation_id;
    let hook = |conversation_id: &str, n: usize| NewWebhook {
        webhook_id: format!("hook-{conversation_id}-{n:02}"),
        conversation_id: conversation_id.to_owned(),
        url: format!("https://example.com/{n}"),
        secret: "00".repeat(32),
        created_by: "olga".into(),
        created_at_ms: NOW,
        max_per_conversation: 3,
    };
    let puts = (0..6).map(|n| store.put_webhook(hook(&g, n)));
    let results = futures::future::join_all(puts).await;
    let stored = results.iter().filter(|r| r.is_ok()).count();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(StorageError::InvalidRequest(_))))
        .count();
    assert_eq!((stored, refused), (3, 3), "{results:?}");
    store.put_webhook(hook(&other, 0)).await.unwrap();

    // The dispatcher's list has every webhook, refused ones not among them.
    let all = store.list_webhooks(None).await.unwrap();
    let mut want: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.ok().map(|w| w.webhook_id))
        .collect();
    want.push(hook(&other, 0).webhook_id);
    want.sort();
    let mut listed: Vec<String> = all.iter().map(|w| w.webhook_id.clone()).collect();
    listed.sort();
    assert_eq!(listed, want);
    // A freed slot is taken again.
    let first = all
        .iter()
        .find(|w| w.conversation_id == g)
        .map(|w| w.webhook_id.clone())
        .unwrap();
    store.delete_webhook(&g, &first).await.unwrap();
    assert!(matches!(
        store.delete_webhook(&g, &first).await,
        Err(StorageError::NotFound(_))
    ));
    store.put_webhook(hook(&g, 9)).await.unwrap();
    assert_eq!(store.list_webhooks(Some(&g)).await.unwrap().len(), 3);
}
