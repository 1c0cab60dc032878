//! The conformance suite every [`HistoryStore`] implementation must pass, run through
//! [`StorageService`] so that the service's semantics (not only the trait's) are what
//! is checked. Instantiate it with [`history_store_conformance!`] and a factory that
//! opens the same data on every call (reopening checks durability).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use switchboard_proto::{
    AppendRequest, AppendResponse, ChangeMembersRequest, Conversation, CreateConversationRequest,
    ErrorCode, GetConversationRequest, HistoryRequest, HistoryResult, LastSeqRequest,
    ListConversationsRequest, LookupDedupeRequest, Message, SetReadMarkerRequest,
    StorageHistoryRequest, StorageSyncRequest, SyncCursor, SyncRequest,
};

use crate::error::StorageError;
use crate::metrics::StorageMetrics;
use crate::service::{ServiceSettings, StorageService};
use crate::store::HistoryStore;

/// Opens the implementation under test, on the same data each time.
#[async_trait]
pub(crate) trait StoreFactory: Send + Sync {
    async fn open(&self) -> Arc<dyn HistoryStore>;
}

pub(crate) const WINDOW_MS: i64 = 3_600_000;
const T0: i64 = 1_700_000_000_000;

/// A service over a fresh store with a manual clock.
pub(crate) struct Harness {
    pub svc: Arc<StorageService>,
    pub clock: Arc<AtomicI64>,
    pub metrics: StorageMetrics,
}

impl Harness {
    pub async fn open(factory: &dyn StoreFactory, max_page: u32) -> Harness {
        Self::over(factory.open().await, max_page)
    }

    pub fn over(store: Arc<dyn HistoryStore>, max_page: u32) -> Harness {
        let clock = Arc::new(AtomicI64::new(T0));
        let metrics = StorageMetrics::register(&prometheus::Registry::new()).unwrap();
        let now = Arc::clone(&clock);
        let svc = Arc::new(StorageService::new(
            store,
            ServiceSettings {
                dedupe_window_ms: WINDOW_MS,
                max_page,
            },
            Arc::new(move || now.load(Ordering::SeqCst)),
            metrics.clone(),
        ));
        Harness {
            svc,
            clock,
            metrics,
        }
    }

    pub fn advance(&self, ms: i64) {
        self.clock.fetch_add(ms, Ordering::SeqCst);
    }

    pub async fn direct(&self, creator: &str, other: &str) -> Conversation {
        self.svc
            .create_conversation(CreateConversationRequest {
                creator_id: creator.into(),
                kind: "direct".into(),
                members: vec![other.into()],
                name: String::new(),
            })
            .await
            .unwrap()
    }

    pub async fn group(&self, owner: &str, members: &[&str], name: &str) -> Conversation {
        self.svc
            .create_conversation(CreateConversationRequest {
                creator_id: owner.into(),
                kind: "group".into(),
                members: members.iter().map(|m| m.to_string()).collect(),
                name: name.into(),
            })
            .await
            .unwrap()
    }

    pub async fn change(
        &self,
        conv: &str,
        actor: &str,
        action: &str,
        users: &[&str],
    ) -> Result<Conversation, StorageError> {
        self.svc
            .change_members(ChangeMembersRequest {
                conversation_id: conv.into(),
                actor_id: actor.into(),
                action: action.into(),
                user_ids: users.iter().map(|u| u.to_string()).collect(),
            })
            .await
    }

    pub async fn append(
        &self,
        conv: &str,
        seq: u64,
        sender: &str,
        client_msg_id: &str,
    ) -> Result<AppendResponse, StorageError> {
        self.svc
            .append(AppendRequest {
                message: Some(message(conv, seq, sender, client_msg_id)),
            })
            .await
    }

    /// Append messages `1..=n` (client ids `m1..`) from `sender`.
    pub async fn fill(&self, conv: &str, sender: &str, n: u64) {
        let last = self.last_seq(conv).await;
        for seq in last + 1..=last + n {
            self.append(conv, seq, sender, &format!("{conv}-m{seq}"))
                .await
                .unwrap();
        }
    }

    pub async fn last_seq(&self, conv: &str) -> u64 {
        self.svc
            .last_seq(LastSeqRequest {
                conversation_id: conv.into(),
            })
            .await
            .unwrap()
            .last_seq
    }

    pub async fn history(
        &self,
        user: &str,
        conv: &str,
        from_seq: u64,
        direction: &str,
        limit: u32,
    ) -> Result<HistoryResult, StorageError> {
        self.svc
            .history(StorageHistoryRequest {
                user_id: user.into(),
                request: Some(HistoryRequest {
                    conversation_id: conv.into(),
                    from_seq,
                    direction: direction.into(),
                    limit,
                }),
            })
            .await
    }

    pub async fn get(&self, conv: &str, caller: &str) -> Result<Conversation, StorageError> {
        self.svc
            .get_conversation(GetConversationRequest {
                conversation_id: conv.into(),
                caller_id: caller.into(),
            })
            .await
    }

    pub async fn lookup(&self, sender: &str, client_msg_id: &str) -> Option<Message> {
        self.svc
            .lookup_dedupe(LookupDedupeRequest {
                sender_id: sender.into(),
                client_msg_id: client_msg_id.into(),
            })
            .await
            .unwrap()
            .message
    }

    pub async fn read(&self, conv: &str, user: &str, seq: u64) -> Result<u64, StorageError> {
        self.svc
            .set_read_marker(SetReadMarkerRequest {
                conversation_id: conv.into(),
                user_id: user.into(),
                seq,
                ..Default::default()
            })
            .await
            .map(|m| m.seq)
    }
}

pub(crate) fn message(conv: &str, seq: u64, sender: &str, client_msg_id: &str) -> Message {
    Message {
        conversation_id: conv.into(),
        seq,
        message_id: String::new(),
        sender_id: sender.into(),
        sender_device: "phone".into(),
        client_msg_id: client_msg_id.into(),
        body: format!("body {seq}"),
        content_type: "text/plain".into(),
        sent_at_ms: 0,
        ..Default::default()
    }
}

fn code<T: std::fmt::Debug>(result: Result<T, StorageError>) -> ErrorCode {
    result.expect_err("an error").code()
}

fn seqs(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

pub(crate) async fn direct_conversations_are_one_per_pair(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let ab = h.direct("alice", "bob").await;
    assert_eq!(ab.kind, "direct");
    assert_eq!(ab.members, ["alice", "bob"]);
    assert_eq!(ab.last_seq, 0);
    assert!(uuid::Uuid::parse_str(&ab.conversation_id).is_ok());
    assert_eq!(
        h.direct("alice", "bob").await.conversation_id,
        ab.conversation_id
    );
    assert_eq!(
        h.direct("bob", "alice").await.conversation_id,
        ab.conversation_id
    );
    // Listing the creator too is the same pair.
    let again = h
        .svc
        .create_conversation(CreateConversationRequest {
            creator_id: "bob".into(),
            kind: "direct".into(),
            members: vec!["alice".into(), "bob".into()],
            name: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(again.conversation_id, ab.conversation_id);
    assert_ne!(
        h.direct("alice", "carol").await.conversation_id,
        ab.conversation_id
    );

    for members in [vec![], vec!["alice"], vec!["bob", "carol"]] {
        let err = h
            .svc
            .create_conversation(CreateConversationRequest {
                creator_id: "alice".into(),
                kind: "direct".into(),
                members: members.iter().map(|m| m.to_string()).collect(),
                name: String::new(),
            })
            .await;
        assert_eq!(code(err), ErrorCode::InvalidRequest, "members {members:?}");
    }
    let bad_kind = h
        .svc
        .create_conversation(CreateConversationRequest {
            creator_id: "alice".into(),
            kind: "channel".into(),
            members: vec!["bob".into()],
            name: String::new(),
        })
        .await;
    assert_eq!(code(bad_kind), ErrorCode::InvalidRequest);
    let bad_id = h
        .svc
        .create_conversation(CreateConversationRequest {
            creator_id: "alice".into(),
            kind: "group".into(),
            members: vec!["b\u{0}b".into()],
            name: String::new(),
        })
        .await;
    assert_eq!(code(bad_id), ErrorCode::InvalidRequest);
}

pub(crate) async fn groups_have_an_owner_and_member_rules(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let g = h
        .group("olga", &["bob", "alice", "bob", "olga"], "team")
        .await;
    let id = g.conversation_id.as_str();
    assert_eq!(g.kind, "group");
    assert_eq!(g.name, "team");
    assert_eq!(g.owner_id, "olga");
    assert_eq!(g.members, ["alice", "bob", "olga"]);

    // Only the owner adds.
    assert_eq!(
        code(h.change(id, "bob", "add", &["carol"]).await),
        ErrorCode::Forbidden
    );
    let added = h
        .change(id, "olga", "add", &["carol", "dan", "alice"])
        .await
        .unwrap();
    assert_eq!(added.members, ["alice", "bob", "carol", "dan", "olga"]);
    // Members remove only themselves; nobody removes the owner.
    assert_eq!(
        code(h.change(id, "bob", "remove", &["carol"]).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(h.change(id, "olga", "remove", &["olga"]).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(h.change(id, "bob", "remove", &["olga"]).await),
        ErrorCode::Forbidden
    );
    let left = h.change(id, "bob", "remove", &["bob"]).await.unwrap();
    assert_eq!(left.members, ["alice", "carol", "dan", "olga"]);
    let removed = h.change(id, "olga", "remove", &["dan"]).await.unwrap();
    assert_eq!(removed.members, ["alice", "carol", "olga"]);
    // Former and never members act as non-members.
    assert_eq!(
        code(h.change(id, "bob", "remove", &["bob"]).await),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(h.change(id, "zed", "add", &["zed"]).await),
        ErrorCode::NotMember
    );
    assert_eq!(
        h.get(id, "").await.unwrap().members,
        ["alice", "carol", "olga"]
    );

    assert_eq!(
        code(h.change(id, "olga", "promote", &["alice"]).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(h.change(id, "olga", "add", &[]).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(h.change("nope", "olga", "add", &["x"]).await),
        ErrorCode::NotFound
    );
    let direct = h.direct("alice", "bob").await;
    assert_eq!(
        code(
            h.change(&direct.conversation_id, "alice", "add", &["carol"])
                .await
        ),
        ErrorCode::Forbidden
    );
    // A group without a name, of the creator alone.
    let solo = h.group("sam", &[], "").await;
    assert_eq!(
        (solo.name.as_str(), solo.members.as_slice()),
        ("", &["sam".to_string()][..])
    );
}

pub(crate) async fn member_count_is_capped(factory: &dyn StoreFactory) {
    use crate::rules::MAX_MEMBERS;
    let h = Harness::open(factory, 200).await;
    let others: Vec<String> = (0..MAX_MEMBERS).map(|i| format!("u{i}")).collect();
    let too_many = h
        .svc
        .create_conversation(CreateConversationRequest {
            creator_id: "olga".into(),
            kind: "group".into(),
            members: others.clone(),
            name: String::new(),
        })
        .await;
    assert_eq!(code(too_many), ErrorCode::InvalidRequest);
    let full = h
        .svc
        .create_conversation(CreateConversationRequest {
            creator_id: "olga".into(),
            kind: "group".into(),
            members: others[..MAX_MEMBERS - 1].to_vec(),
            name: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(full.members.len(), MAX_MEMBERS);
    let id = full.conversation_id.as_str();
    assert_eq!(
        code(h.change(id, "olga", "add", &["late"]).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        h.get(id, "").await.unwrap().members.len(),
        MAX_MEMBERS,
        "nothing added"
    );
    assert_eq!(code(h.get(id, "late").await), ErrorCode::NotMember);
    // Adding someone already in is not growth.
    let same = h.change(id, "olga", "add", &["u0"]).await.unwrap();
    assert_eq!(same.members.len(), MAX_MEMBERS);
}

pub(crate) async fn reads_require_membership(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let ab = h.direct("alice", "bob").await;
    let id = ab.conversation_id.as_str();
    h.fill(id, "alice", 2).await;

    assert_eq!(h.get(id, "bob").await.unwrap().members, ["alice", "bob"]);
    assert_eq!(h.get(id, "").await.unwrap().last_seq, 2);
    assert_eq!(code(h.get(id, "eve").await), ErrorCode::NotMember);
    assert_eq!(code(h.get("no-such", "").await), ErrorCode::NotFound);
    assert_eq!(
        code(h.history("eve", id, 0, "", 0).await),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(h.history("eve", "no-such", 0, "", 0).await),
        ErrorCode::NotMember
    );
    assert_eq!(code(h.read(id, "eve", 1).await), ErrorCode::NotMember);
    assert_eq!(
        code(h.read("no-such", "alice", 1).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        h.history("bob", id, 0, "", 0).await.unwrap().messages.len(),
        2
    );

    let g = h.group("carol", &["alice"], "g").await;
    let list = |user: &'static str| {
        let svc = Arc::clone(&h.svc);
        async move {
            svc.list_conversations(ListConversationsRequest {
                user_id: user.into(),
            })
            .await
            .unwrap()
            .conversations
        }
    };
    let alice = list("alice").await;
    let mut ids: Vec<&str> = alice.iter().map(|c| c.conversation_id.as_str()).collect();
    ids.sort_unstable();
    let mut want = vec![id, g.conversation_id.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want);
    assert!(
        alice.iter().all(|c| c.members.is_empty()),
        "lists carry no members"
    );
    let listed_ab = alice.iter().find(|c| c.conversation_id == id).unwrap();
    assert_eq!(listed_ab.last_seq, 2);
    assert_eq!(list("bob").await.len(), 1);
    assert!(list("eve").await.is_empty());
}

pub(crate) async fn appends_are_gapless_and_deduplicated(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let id = h.direct("alice", "bob").await.conversation_id;

    let first = h.append(&id, 1, "alice", "c1").await.unwrap();
    assert!(!first.duplicate);
    let stored = first.message.unwrap();
    assert_eq!(stored.seq, 1);
    assert!(!stored.message_id.is_empty(), "message id assigned");
    assert_eq!(stored.sent_at_ms, T0, "sent_at filled from the clock");

    let gap = h.append(&id, 3, "alice", "c3").await.unwrap_err();
    assert_eq!(gap.code(), ErrorCode::Internal);
    assert!(gap.to_string().contains("expected seq 2, got 3"), "{gap}");
    let replay = h.append(&id, 1, "alice", "c1b").await.unwrap_err();
    assert!(
        replay.to_string().contains("expected seq 2, got 1"),
        "{replay}"
    );

    // A retry with the same (sender, client_msg_id) returns the original, writes nothing.
    let dup = h.append(&id, 2, "alice", "c1").await.unwrap();
    assert!(dup.duplicate);
    assert_eq!(dup.message.as_ref(), Some(&stored));
    assert_eq!(h.last_seq(&id).await, 1);
    // The same client id from another sender is another message.
    let bobs = h.append(&id, 2, "bob", "c1").await.unwrap();
    assert!(!bobs.duplicate);
    // Messages without a client id are never deduplicated.
    assert!(!h.append(&id, 3, "alice", "").await.unwrap().duplicate);
    assert!(!h.append(&id, 4, "alice", "").await.unwrap().duplicate);
    assert_eq!(h.last_seq(&id).await, 4);

    assert_eq!(h.lookup("alice", "c1").await, Some(stored));
    assert_eq!(h.lookup("alice", "unknown").await, None);
    let page = h.history("bob", &id, 0, "forward", 0).await.unwrap();
    assert_eq!(seqs(&page.messages), [1, 2, 3, 4]);
    assert_eq!(page.messages[1].sender_id, "bob");

    assert_eq!(
        code(h.append("no-such", 1, "alice", "x").await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(h.append(&id, 0, "alice", "x").await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(h.append(&id, 5, "", "x").await),
        ErrorCode::InvalidRequest
    );
    let missing = h.svc.append(AppendRequest { message: None }).await;
    assert_eq!(code(missing), ErrorCode::InvalidRequest);
    let conv = h.get(&id, "").await.unwrap();
    assert_eq!(conv.last_seq, 4);
}

pub(crate) async fn stored_data_survives_reopening(factory: &dyn StoreFactory) {
    let (id, marker) = {
        let h = Harness::open(factory, 200).await;
        let g = h.group("olga", &["bob"], "durable").await;
        h.fill(&g.conversation_id, "bob", 3).await;
        let marker = h.read(&g.conversation_id, "olga", 2).await.unwrap();
        (g.conversation_id, marker)
    };
    let h = Harness::open(factory, 200).await;
    assert_eq!(h.last_seq(&id).await, 3);
    let conv = h.get(&id, "olga").await.unwrap();
    assert_eq!((conv.name.as_str(), conv.members.len()), ("durable", 2));
    let page = h.history("olga", &id, 0, "", 0).await.unwrap();
    assert_eq!(seqs(&page.messages), [1, 2, 3]);
    assert_eq!(
        h.lookup("bob", &format!("{id}-m2")).await.map(|m| m.seq),
        Some(2)
    );
    let dup = h.append(&id, 4, "bob", &format!("{id}-m3")).await.unwrap();
    assert!(dup.duplicate, "dedupe keys survive reopening");
    assert_eq!(h.read(&id, "olga", 1).await.unwrap(), marker);
    h.fill(&id, "olga", 1).await;
    assert_eq!(h.last_seq(&id).await, 4);
}

pub(crate) async fn history_pages_both_directions(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let id = h.direct("alice", "bob").await.conversation_id;
    let empty = h.history("alice", &id, 0, "", 0).await.unwrap();
    assert!(empty.messages.is_empty() && !empty.has_more);
    h.fill(&id, "alice", 7).await;

    let page = |from, dir: &'static str, limit| {
        let id = id.clone();
        let h = &h;
        async move {
            let r = h.history("bob", &id, from, dir, limit).await.unwrap();
            assert_eq!(r.conversation_id, id);
            (seqs(&r.messages), r.has_more)
        }
    };
    assert_eq!(page(0, "", 3).await, (vec![5, 6, 7], true));
    assert_eq!(page(0, "backward", 3).await, (vec![5, 6, 7], true));
    assert_eq!(page(5, "backward", 3).await, (vec![2, 3, 4], true));
    assert_eq!(page(2, "backward", 3).await, (vec![1], false));
    assert_eq!(page(4, "backward", 3).await, (vec![1, 2, 3], false));
    assert_eq!(page(1, "backward", 3).await, (vec![], false));
    assert_eq!(page(0, "backward", 7).await, ((1..=7).collect(), false));
    assert_eq!(page(0, "forward", 3).await, (vec![1, 2, 3], true));
    assert_eq!(page(3, "forward", 3).await, (vec![4, 5, 6], true));
    assert_eq!(page(4, "forward", 3).await, (vec![5, 6, 7], false));
    assert_eq!(page(6, "forward", 3).await, (vec![7], false));
    assert_eq!(page(7, "forward", 3).await, (vec![], false));
    assert_eq!(page(100, "backward", 2).await, (vec![6, 7], true));
    assert_eq!(page(0, "", 0).await, ((1..=7).collect(), false));
    assert_eq!(
        code(h.history("bob", &id, 0, "sideways", 3).await),
        ErrorCode::InvalidRequest
    );
    let no_request = h
        .svc
        .history(StorageHistoryRequest {
            user_id: "bob".into(),
            request: None,
        })
        .await;
    assert_eq!(code(no_request), ErrorCode::InvalidRequest);

    // Limits: 0 means 50, and no page is larger than max_page.
    h.fill(&id, "bob", 60).await;
    assert_eq!(page(0, "", 0).await.0.len(), 50);
    let small = Harness::over(factory.open().await, 4);
    let capped = small.history("bob", &id, 0, "forward", 1000).await.unwrap();
    assert_eq!(
        (seqs(&capped.messages), capped.has_more),
        (vec![1, 2, 3, 4], true)
    );
}

pub(crate) async fn sync_returns_what_was_missed(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let ab = h.direct("alice", "bob").await.conversation_id;
    let team = h.group("alice", &["bob"], "team").await.conversation_id;
    let other = h.group("carol", &["dan"], "secret").await.conversation_id;
    h.fill(&ab, "bob", 3).await;
    h.fill(&team, "bob", 2).await;
    h.fill(&other, "carol", 2).await;

    let sync = |user: &'static str, cursors: Vec<(&str, u64)>, limit| {
        let svc = Arc::clone(&h.svc);
        let cursors = cursors
            .into_iter()
            .map(|(c, s)| SyncCursor {
                conversation_id: c.to_string(),
                last_seq: s,
            })
            .collect();
        async move {
            svc.sync(StorageSyncRequest {
                user_id: user.into(),
                request: Some(SyncRequest {
                    cursors,
                    limit_per_conversation: limit,
                }),
            })
            .await
            .unwrap()
        }
    };
    let ids = |convs: &[Conversation]| {
        let mut ids: Vec<String> = convs.iter().map(|c| c.conversation_id.clone()).collect();
        ids.sort();
        ids
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };

    // Up to date on `team`, behind on `ab`, a cursor on a conversation alice is not in.
    let r = sync("alice", vec![(&ab, 1), (&team, 2), (&other, 0)], 0).await;
    assert_eq!(ids(&r.conversations), std::slice::from_ref(&ab));
    assert_eq!(r.conversations[0].members, ["alice", "bob"]);
    assert_eq!(r.conversations[0].last_seq, 3);
    assert_eq!(seqs(&r.messages), [2, 3]);
    assert!(r.messages.iter().all(|m| m.conversation_id == ab));
    assert!(r.truncated.is_empty());

    // Nothing known: every conversation, with all its messages.
    let r = sync("alice", vec![], 0).await;
    assert_eq!(
        ids(&r.conversations),
        sorted(vec![ab.clone(), team.clone()])
    );
    assert_eq!(r.messages.len(), 5);
    assert!(
        r.messages.iter().all(|m| m.conversation_id != other),
        "never leaks"
    );
    for conv in [&ab, &team] {
        let mine: Vec<u64> = r
            .messages
            .iter()
            .filter(|m| m.conversation_id == *conv)
            .map(|m| m.seq)
            .collect();
        assert!(
            mine.windows(2).all(|w| w[0] + 1 == w[1]),
            "ascending: {mine:?}"
        );
    }

    // A conversation created while away shows up even without messages.
    let fresh = h.group("bob", &["alice"], "new").await.conversation_id;
    let r = sync("alice", vec![(&ab, 3), (&team, 2)], 0).await;
    assert_eq!(ids(&r.conversations), std::slice::from_ref(&fresh));
    assert_eq!(r.conversations[0].members, ["alice", "bob"]);
    assert!(r.messages.is_empty());

    // More missed than the limit: the first ones after the cursor, and truncated.
    let r = sync("alice", vec![(&ab, 0), (&team, 0), (&fresh, 0)], 1).await;
    assert_eq!(
        ids(&r.conversations),
        sorted(vec![ab.clone(), team.clone()])
    );
    assert_eq!(
        sorted(r.truncated.clone()),
        sorted(vec![ab.clone(), team.clone()])
    );
    let mut got: Vec<(String, u64)> = r
        .messages
        .iter()
        .map(|m| (m.conversation_id.clone(), m.seq))
        .collect();
    got.sort();
    let mut want = vec![(ab.clone(), 1), (team.clone(), 1)];
    want.sort();
    assert_eq!(got, want);
    let r = sync("alice", vec![(&ab, 1), (&team, 2), (&fresh, 0)], 2).await;
    assert_eq!(seqs(&r.messages), [2, 3]);
    assert!(
        r.truncated.is_empty(),
        "exactly the limit left is not truncated"
    );

    // A user who left a group no longer syncs it.
    h.change(&team, "bob", "remove", &["bob"]).await.unwrap();
    let r = sync("bob", vec![], 0).await;
    assert_eq!(
        ids(&r.conversations),
        sorted(vec![ab.clone(), fresh.clone()])
    );
    let r = sync("eve", vec![(&ab, 0)], 0).await;
    assert!(r.conversations.is_empty() && r.messages.is_empty());
}

pub(crate) async fn read_markers_only_move_forward(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let id = h.direct("alice", "bob").await.conversation_id;
    assert_eq!(
        h.read(&id, "alice", 4).await.unwrap(),
        0,
        "clamped to empty"
    );
    h.fill(&id, "bob", 5).await;
    assert_eq!(h.read(&id, "alice", 3).await.unwrap(), 3);
    h.advance(1_000);
    let back = h
        .svc
        .set_read_marker(SetReadMarkerRequest {
            conversation_id: id.clone(),
            user_id: "alice".into(),
            seq: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        (back.seq, back.at_ms),
        (3, T0),
        "never goes back, keeps its time"
    );
    let ahead = h
        .svc
        .set_read_marker(SetReadMarkerRequest {
            conversation_id: id.clone(),
            user_id: "alice".into(),
            seq: 99,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        (
            ahead.conversation_id.as_str(),
            ahead.user_id.as_str(),
            ahead.seq,
            ahead.at_ms
        ),
        (id.as_str(), "alice", 5, T0 + 1_000),
        "clamped to last_seq"
    );
    assert_eq!(
        h.read(&id, "bob", 1).await.unwrap(),
        1,
        "markers are per user"
    );
}

pub(crate) async fn dedupe_keys_expire(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let id = h.direct("alice", "bob").await.conversation_id;
    h.append(&id, 1, "alice", "old").await.unwrap();
    h.advance(WINDOW_MS / 2);
    h.append(&id, 2, "alice", "young").await.unwrap();
    h.advance(WINDOW_MS / 2);
    // Exactly at the edge of the window a key still counts.
    assert_eq!(h.lookup("alice", "old").await.map(|m| m.seq), Some(1));
    h.advance(1);
    assert_eq!(h.lookup("alice", "old").await, None);
    assert_eq!(h.lookup("alice", "young").await.map(|m| m.seq), Some(2));

    // An expired key no longer deduplicates: the retry is a new message.
    let again = h.append(&id, 3, "alice", "old").await.unwrap();
    assert!(!again.duplicate);
    assert_eq!(h.lookup("alice", "old").await.map(|m| m.seq), Some(3));
    h.append(&id, 4, "bob", "bobs").await.unwrap();

    // The purge deletes keys older than the window and keeps the others.
    h.advance(WINDOW_MS / 2);
    assert_eq!(
        h.svc.purge_expired_dedupe().await.unwrap(),
        1,
        "only `young` expired"
    );
    assert_eq!(h.metrics.dedupe_purged.get(), 1);
    assert_eq!(h.lookup("alice", "young").await, None);
    assert_eq!(h.lookup("alice", "old").await.map(|m| m.seq), Some(3));
    h.advance(WINDOW_MS);
    assert_eq!(h.svc.purge_expired_dedupe().await.unwrap(), 2);
    assert_eq!(h.svc.purge_expired_dedupe().await.unwrap(), 0);
    // History is untouched by the purge.
    let page = h.history("alice", &id, 0, "", 0).await.unwrap();
    assert_eq!(seqs(&page.messages), [1, 2, 3, 4]);
}

/// One `#[tokio::test]` per conformance case for the factory built by `$factory()`.
macro_rules! history_store_conformance {
    ($factory:expr) => {
        $crate::conformance::history_store_conformance!(@cases $factory;
            direct_conversations_are_one_per_pair,
            groups_have_an_owner_and_member_rules,
            member_count_is_capped,
            reads_require_membership,
            appends_are_gapless_and_deduplicated,
            stored_data_survives_reopening,
            history_pages_both_directions,
            sync_returns_what_was_missed,
            read_markers_only_move_forward,
            dedupe_keys_expire,
        );
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                let factory = $factory();
                $crate::conformance::$case(&factory).await;
            }
        )*
    };
}
pub(crate) use history_store_conformance;
