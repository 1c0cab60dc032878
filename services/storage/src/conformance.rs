//! The conformance suite every [`HistoryStore`] implementation must pass, run through
//! [`StorageService`] so that the service's semantics (not only the trait's) are what
//! is checked. Instantiate it with [`history_store_conformance!`] and a factory that
//! opens the same data on every call (reopening checks durability).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use switchboard_proto::{
    AdvanceWebhookRequest, AppendBatchRequest, AppendRequest, AppendResponse, AuthorizeRequest,
    ChangeMembersRequest, Conversation, CreateConversationRequest, DeleteWebhookRequest, ErrorCode,
    GetConversationRequest, HistoryRequest, HistoryResult, LastSeqRequest,
    ListConversationsRequest, ListWebhooksRequest, LookupDedupeRequest, Message,
    NotificationTargetsRequest, PutWebhookRequest, ReactionCount, ReadMarker, ReceiptsRequest,
    ReceiptsResult, SetNotificationRequest, SetReadMarkerRequest, SharedContactsRequest,
    StorageHistoryRequest, StorageReceiptsRequest, StorageSyncRequest, StorageThreadRequest,
    SyncCursor, SyncRequest, SyncResult, SystemEvent, ThreadRequest, ThreadResult, Webhook,
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
/// `storage.max_answer_bytes` of the harness (the default).
pub(crate) const ANSWER_BYTES: usize = 1024 * 1024;
/// `storage.max_conversations_created` of the harness (small, to reach it).
pub(crate) const MAX_CREATED: u32 = 20;
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
                max_answer_bytes: ANSWER_BYTES,
                max_conversations_created: MAX_CREATED,
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
                webhook_id: String::new(),
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

impl Harness {
    /// What routing does: authorize, then append at the next sequence. Returns the
    /// stored event.
    pub async fn send(&self, event: Message) -> Result<Message, StorageError> {
        self.authorize(event.clone()).await?;
        self.append_event(event).await
    }

    /// Append without authorizing (a partition owner replaying an authorized event).
    pub async fn append_event(&self, mut event: Message) -> Result<Message, StorageError> {
        event.seq = self.last_seq(&event.conversation_id).await + 1;
        let appended = self
            .svc
            .append(AppendRequest {
                message: Some(event),
            })
            .await?;
        Ok(appended.message.expect("appended message"))
    }

    pub async fn authorize(&self, event: Message) -> Result<(), StorageError> {
        self.svc
            .authorize(AuthorizeRequest {
                message: Some(event),
            })
            .await
            .map(|_| ())
    }

    /// Send a plain message; returns its sequence.
    pub async fn say(&self, conv: &str, sender: &str, body: &str) -> u64 {
        self.send(text(conv, sender, body)).await.unwrap().seq
    }

    /// Send a system event.
    pub async fn admin(
        &self,
        conv: &str,
        actor: &str,
        action: &str,
        users: &[&str],
    ) -> Result<Message, StorageError> {
        self.send(system(
            conv,
            actor,
            SystemEvent {
                action: action.into(),
                user_ids: users.iter().map(|u| u.to_string()).collect(),
                ..Default::default()
            },
        ))
        .await
    }

    /// One event of the history as `reader` sees it.
    pub async fn event(&self, reader: &str, conv: &str, seq: u64) -> Message {
        let page = self
            .history(reader, conv, seq - 1, "forward", 1)
            .await
            .unwrap();
        page.messages.into_iter().next().expect("event exists")
    }

    pub async fn marker(
        &self,
        conv: &str,
        user: &str,
        seq: u64,
        kind: &str,
    ) -> Result<ReadMarker, StorageError> {
        self.svc
            .set_read_marker(SetReadMarkerRequest {
                conversation_id: conv.into(),
                user_id: user.into(),
                seq,
                kind: kind.into(),
            })
            .await
    }

    pub async fn receipts(
        &self,
        user: &str,
        conv: &str,
        seq: u64,
    ) -> Result<ReceiptsResult, StorageError> {
        self.svc
            .receipts(StorageReceiptsRequest {
                user_id: user.into(),
                request: Some(ReceiptsRequest {
                    conversation_id: conv.into(),
                    seq,
                }),
            })
            .await
    }

    pub async fn thread(
        &self,
        user: &str,
        conv: &str,
        root_seq: u64,
        from_seq: u64,
        limit: u32,
    ) -> Result<ThreadResult, StorageError> {
        self.svc
            .thread(StorageThreadRequest {
                user_id: user.into(),
                request: Some(ThreadRequest {
                    conversation_id: conv.into(),
                    root_seq,
                    from_seq,
                    limit,
                }),
            })
            .await
    }

    /// The user's view of one conversation in ListConversations.
    pub async fn listed(&self, user: &str, conv: &str) -> Conversation {
        self.svc
            .list_conversations(ListConversationsRequest {
                user_id: user.into(),
            })
            .await
            .unwrap()
            .conversations
            .into_iter()
            .find(|c| c.conversation_id == conv)
            .expect("listed")
    }

    pub async fn sync_all(&self, user: &str) -> SyncResult {
        self.svc
            .sync(StorageSyncRequest {
                user_id: user.into(),
                request: Some(SyncRequest::default()),
            })
            .await
            .unwrap()
    }

    pub async fn notify(&self, user: &str, conv: &str, until_ms: i64) -> Result<(), StorageError> {
        self.svc
            .set_notification(SetNotificationRequest {
                user_id: user.into(),
                conversation_id: conv.into(),
                until_ms,
            })
            .await
            .map(|_| ())
    }

    pub async fn put_hook(
        &self,
        conv: &str,
        actor: &str,
        url: &str,
    ) -> Result<Webhook, StorageError> {
        self.svc
            .put_webhook(PutWebhookRequest {
                conversation_id: conv.into(),
                actor_id: actor.into(),
                url: url.into(),
            })
            .await
    }

    pub async fn hooks(&self, conv: &str, actor: &str) -> Result<Vec<Webhook>, StorageError> {
        self.svc
            .list_webhooks(ListWebhooksRequest {
                conversation_id: conv.into(),
                actor_id: actor.into(),
            })
            .await
            .map(|r| r.webhooks)
    }
}

/// A plain message (no client id: never deduplicated).
pub(crate) fn text(conv: &str, sender: &str, body: &str) -> Message {
    Message {
        conversation_id: conv.into(),
        sender_id: sender.into(),
        sender_device: "phone".into(),
        kind: "message".into(),
        body: body.into(),
        content_type: "text/plain".into(),
        ..Default::default()
    }
}

pub(crate) fn edit(conv: &str, sender: &str, target: u64, body: &str) -> Message {
    Message {
        kind: "edit".into(),
        target_seq: target,
        content_type: "text/markdown".into(),
        ..text(conv, sender, body)
    }
}

pub(crate) fn delete(conv: &str, sender: &str, target: u64) -> Message {
    Message {
        kind: "delete".into(),
        target_seq: target,
        content_type: String::new(),
        ..text(conv, sender, "")
    }
}

pub(crate) fn react(conv: &str, sender: &str, target: u64, emoji: &str, remove: bool) -> Message {
    Message {
        kind: "reaction".into(),
        target_seq: target,
        emoji: emoji.into(),
        remove,
        content_type: String::new(),
        ..text(conv, sender, "")
    }
}

pub(crate) fn system(conv: &str, actor: &str, mut event: SystemEvent) -> Message {
    event.actor_id = actor.into();
    Message {
        kind: "system".into(),
        system: Some(event),
        content_type: String::new(),
        ..text(conv, actor, "")
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
        ErrorCode::NotMember
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
        ErrorCode::NotMember
    );
    assert_eq!(
        h.history("bob", id, 0, "", 0).await.unwrap().messages.len(),
        2
    );
    // Internal callers (empty user) read any conversation that exists.
    assert_eq!(h.history("", id, 0, "", 0).await.unwrap().messages.len(), 2);
    assert_eq!(
        code(h.history("", "no-such", 0, "", 0).await),
        ErrorCode::NotFound
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

pub(crate) async fn batches_append_in_order_like_single_appends(factory: &dyn StoreFactory) {
    let id = {
        let h = Harness::open(factory, 200).await;
        let id = h.direct("alice", "bob").await.conversation_id;
        let first = h.append(&id, 1, "alice", "c1").await.unwrap();
        let first = first.message.unwrap();
        let with_id = |mut m: Message, client_msg_id: &str| {
            m.client_msg_id = client_msg_id.into();
            m
        };
        let batch = vec![
            with_id(text(&id, "alice", "two"), "c2"),
            // Known from an earlier append, and from earlier in this batch.
            with_id(text(&id, "alice", "again"), "c1"),
            with_id(text(&id, "alice", "two again"), "c2"),
            with_id(text(&id, "bob", "three"), "c3"),
            // An effect on an event of the same batch.
            with_id(edit(&id, "alice", 2, "two, edited"), "c4"),
            // No client id: never a duplicate.
            text(&id, "bob", "five"),
        ];
        let reply = h
            .svc
            .append_batch(AppendBatchRequest {
                messages: batch,
                first_seq: 2,
            })
            .await
            .unwrap();
        let answered: Vec<(u64, bool)> = reply
            .results
            .iter()
            .map(|r| (r.message.as_ref().unwrap().seq, r.duplicate))
            .collect();
        assert_eq!(
            answered,
            [
                (2, false),
                (1, true),
                (2, true),
                (3, false),
                (4, false),
                (5, false)
            ]
        );
        assert_eq!(reply.results[1].message.as_ref(), Some(&first));
        assert_eq!(reply.results[2].message.as_ref().unwrap().body, "two");
        assert!(reply.results.iter().all(|r| {
            let m = r.message.as_ref().unwrap();
            !m.message_id.is_empty() && m.sent_at_ms == T0
        }));
        assert_eq!(h.last_seq(&id).await, 5);

        // A batch that does not start at the next sequence writes nothing.
        let stale = h
            .svc
            .append_batch(AppendBatchRequest {
                messages: vec![
                    with_id(text(&id, "alice", "x"), "c6"),
                    with_id(text(&id, "alice", "y"), "c7"),
                ],
                first_seq: 5,
            })
            .await
            .unwrap_err();
        assert!(
            stale.to_string().contains("expected seq 6, got 5"),
            "{stale}"
        );
        assert_eq!(h.last_seq(&id).await, 5);
        assert_eq!(h.lookup("alice", "c6").await, None);

        let empty = h
            .svc
            .append_batch(AppendBatchRequest {
                messages: vec![],
                first_seq: 6,
            })
            .await;
        assert_eq!(code(empty), ErrorCode::InvalidRequest);
        let other = h.direct("alice", "carol").await.conversation_id;
        let mixed = h
            .svc
            .append_batch(AppendBatchRequest {
                messages: vec![text(&id, "alice", "x"), text(&other, "alice", "y")],
                first_seq: 6,
            })
            .await;
        assert_eq!(code(mixed), ErrorCode::InvalidRequest);
        assert_eq!(h.last_seq(&other).await, 0, "nothing of a refused batch");
        id
    };
    // Durable like single appends.
    let h = Harness::open(factory, 200).await;
    let page = h.history("bob", &id, 0, "forward", 0).await.unwrap();
    assert_eq!(seqs(&page.messages), [1, 2, 3, 4, 5]);
    assert_eq!(page.messages[1].body, "two, edited");
    assert!(page.messages[1].edited_at_ms > 0);
    assert_eq!(page.messages[2].sender_id, "bob");
    assert!(!h.append(&id, 6, "alice", "c3").await.unwrap().duplicate);
    assert!(h.append(&id, 7, "bob", "c3").await.unwrap().duplicate);
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
            webhook_id: String::new(),
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

pub(crate) async fn sync_reports_removals_since_the_cursor(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let g = h
        .group("olga", &["bob", "carol", "dave"], "crew")
        .await
        .conversation_id;
    h.say(&g, "olga", "hello").await;
    let cursor = h.last_seq(&g).await;
    let removed = h
        .admin(&g, "olga", "members_removed", &["bob"])
        .await
        .unwrap()
        .seq;
    let banned = h
        .admin(&g, "olga", "members_banned", &["carol"])
        .await
        .unwrap()
        .seq;
    let left = h.admin(&g, "dave", "member_left", &[]).await.unwrap().seq;
    h.say(&g, "olga", "after").await;

    let sync = |user: &'static str, seq: u64| {
        let svc = Arc::clone(&h.svc);
        let g = g.clone();
        async move {
            svc.sync(StorageSyncRequest {
                user_id: user.into(),
                request: Some(SyncRequest {
                    cursors: vec![SyncCursor {
                        conversation_id: g,
                        last_seq: seq,
                    }],
                    limit_per_conversation: 0,
                }),
            })
            .await
            .unwrap()
        }
    };
    let removal = |r: &SyncResult| -> Vec<(u64, String)> {
        r.removals
            .iter()
            .map(|m| (m.seq, m.system.as_ref().unwrap().action.clone()))
            .collect()
    };
    for (user, seq, action) in [
        ("bob", removed, "members_removed"),
        ("carol", banned, "members_banned"),
        ("dave", left, "member_left"),
    ] {
        let r = sync(user, cursor).await;
        assert!(
            r.conversations.iter().all(|c| c.conversation_id != g),
            "{user} is not a member: {r:?}"
        );
        assert_eq!(removal(&r), [(seq, action.to_string())], "{user}");
        assert_eq!(r.removals[0].conversation_id, g);
        // Already seen: nothing to report.
        assert!(sync(user, seq).await.removals.is_empty(), "{user}");
    }
    // Someone who was never a member learns nothing.
    assert!(sync("eve", cursor).await.removals.is_empty());
    // Added back: a member again, no removal.
    h.admin(&g, "olga", "members_added", &["bob"])
        .await
        .unwrap();
    let r = sync("bob", cursor).await;
    assert!(r.removals.is_empty(), "{r:?}");
    assert!(r.conversations.iter().any(|c| c.conversation_id == g));
    // Removed again later: the latest removal counts.
    let again = h
        .admin(&g, "olga", "members_removed", &["bob"])
        .await
        .unwrap()
        .seq;
    assert_eq!(
        removal(&sync("bob", cursor).await),
        [(again, "members_removed".to_string())]
    );
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

    // The purge deletes keys older than the window and keeps the others; a store
    // whose keys expire by their TTL deletes nothing, and its lookups already ignore
    // keys older than the window.
    h.advance(WINDOW_MS / 2);
    if h.svc.dedupe_keys_expire_by_themselves() {
        assert_eq!(h.svc.purge_expired_dedupe().await.unwrap(), 0);
        assert_eq!(h.lookup("alice", "young").await, None);
        assert_eq!(h.lookup("alice", "old").await.map(|m| m.seq), Some(3));
        h.advance(WINDOW_MS);
        assert_eq!(h.lookup("alice", "old").await, None);
        assert_eq!(h.lookup("bob", "bobs").await, None);
        let page = h.history("alice", &id, 0, "", 0).await.unwrap();
        assert_eq!(seqs(&page.messages), [1, 2, 3, 4]);
        return;
    }
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

fn reactions(m: &Message) -> Vec<(&str, u32, bool)> {
    m.reactions
        .iter()
        .map(|r: &ReactionCount| (r.emoji.as_str(), r.count, r.mine))
        .collect()
}

fn roles_of(conv: &Conversation) -> Vec<(&str, &str)> {
    conv.member_roles
        .iter()
        .map(|m| (m.user_id.as_str(), m.role.as_str()))
        .collect()
}

pub(crate) async fn edits_replace_the_body_and_only_the_sender_edits(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let id = h.direct("alice", "bob").await.conversation_id;
    let m1 = h.say(&id, "alice", "helo").await;
    assert_eq!(
        code(h.send(edit(&id, "bob", m1, "hijack")).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(h.send(edit(&id, "eve", m1, "x")).await),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(h.send(edit(&id, "alice", 99, "x")).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(h.send(edit("no-such", "alice", 1, "x")).await),
        ErrorCode::NotMember
    );
    h.advance(5_000);
    let e = h.send(edit(&id, "alice", m1, "hello")).await.unwrap();
    assert_eq!(e.seq, 2, "an edit has its own sequence");
    assert_eq!(h.last_seq(&id).await, 2);
    // An edit event is not a message: it cannot be edited itself.
    assert_eq!(
        code(h.send(edit(&id, "alice", e.seq, "x")).await),
        ErrorCode::NotFound
    );

    let page = h.history("bob", &id, 0, "forward", 0).await.unwrap();
    assert_eq!(seqs(&page.messages), [1, 2]);
    let original = &page.messages[0];
    assert_eq!(
        (
            original.body.as_str(),
            original.content_type.as_str(),
            original.edited_at_ms,
            original.deleted
        ),
        ("hello", "text/markdown", T0 + 5_000, false),
        "history carries the current state"
    );
    let stored_edit = &page.messages[1];
    assert_eq!(
        (
            stored_edit.kind.as_str(),
            stored_edit.target_seq,
            stored_edit.body.as_str()
        ),
        ("edit", 1, "hello"),
        "the edit event is returned as stored"
    );
    // Sync shows the same state.
    let sync = h.sync_all("bob").await;
    assert_eq!(sync.messages[0].body, "hello");
    assert_eq!(sync.messages[0].edited_at_ms, T0 + 5_000);
}

pub(crate) async fn deletes_remove_the_body_from_storage(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let g = h
        .group("olga", &["alice", "bob"], "g")
        .await
        .conversation_id;
    let m1 = h.say(&g, "alice", "secret v1").await;
    h.send(edit(&g, "alice", m1, "secret v2")).await.unwrap();
    h.send(react(&g, "bob", m1, "👍", false)).await.unwrap();
    let m4 = h.say(&g, "bob", "bob's").await;

    // A member deletes only their own messages; owner and admins delete any.
    assert_eq!(
        code(h.send(delete(&g, "bob", m1)).await),
        ErrorCode::Forbidden
    );
    let d = h.send(delete(&g, "alice", m1)).await.unwrap();
    assert_eq!((d.kind.as_str(), d.target_seq), ("delete", m1));
    h.send(delete(&g, "olga", m4)).await.unwrap();

    let gone = h.event("bob", &g, m1).await;
    assert!(gone.deleted);
    assert_eq!((gone.body.as_str(), gone.content_type.as_str()), ("", ""));
    assert!(gone.reactions.is_empty(), "reactions removed");
    let edit_row = h.event("bob", &g, 2).await;
    assert_eq!(
        (edit_row.kind.as_str(), edit_row.body.as_str()),
        ("edit", ""),
        "edit bodies of a deleted message are cleared"
    );
    // Nothing stored still holds the text.
    let all = h.history("olga", &g, 0, "forward", 0).await.unwrap();
    assert!(
        all.messages.iter().all(|m| !m.body.contains("secret")),
        "{:?}",
        all.messages
    );
    assert!(h.event("olga", &g, m4).await.deleted);

    // A deleted message is gone for edits, deletes and reactions.
    assert_eq!(
        code(h.send(edit(&g, "alice", m1, "again")).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(h.send(delete(&g, "alice", m1)).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(h.send(react(&g, "bob", m1, "👍", false)).await),
        ErrorCode::NotFound
    );
    // Append does not re-authorize: a late edit of a deleted message is stored
    // without its text, and the message stays deleted.
    let late = h
        .append_event(edit(&g, "alice", m1, "secret v3"))
        .await
        .unwrap();
    assert_eq!(late.body, "");
    assert_eq!(h.event("olga", &g, late.seq).await.body, "");
    assert!(h.event("olga", &g, m1).await.deleted);

    // In a direct conversation only the sender deletes.
    let ab = h.direct("alice", "bob").await.conversation_id;
    let m = h.say(&ab, "alice", "hi").await;
    assert_eq!(
        code(h.send(delete(&ab, "bob", m)).await),
        ErrorCode::Forbidden
    );
    h.send(delete(&ab, "alice", m)).await.unwrap();
}

pub(crate) async fn reactions_count_per_emoji(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let g = h
        .group("olga", &["alice", "bob"], "g")
        .await
        .conversation_id;
    let m1 = h.say(&g, "olga", "vote").await;
    h.send(react(&g, "alice", m1, "👍", false)).await.unwrap();
    h.send(react(&g, "bob", m1, "👍", false)).await.unwrap();
    h.send(react(&g, "bob", m1, "❤", false)).await.unwrap();
    // Idempotent: a second identical reaction changes nothing.
    h.send(react(&g, "bob", m1, "❤", false)).await.unwrap();

    let seen_by = |user: &'static str| {
        let (h, g) = (&h, g.clone());
        async move { h.event(user, &g, m1).await }
    };
    assert_eq!(
        reactions(&seen_by("alice").await),
        [("❤", 1, false), ("👍", 2, true)],
        "sorted by emoji, `mine` for the reader"
    );
    assert_eq!(
        reactions(&seen_by("bob").await),
        [("❤", 1, true), ("👍", 2, true)]
    );
    assert_eq!(
        reactions(&seen_by("olga").await),
        [("❤", 1, false), ("👍", 2, false)]
    );
    let internal = h.history("", &g, 0, "forward", 1).await.unwrap();
    assert_eq!(
        reactions(&internal.messages[0]),
        [("❤", 1, false), ("👍", 2, false)],
        "internal reads have counts, no `mine`"
    );
    h.send(react(&g, "bob", m1, "👍", true)).await.unwrap();
    h.send(react(&g, "bob", m1, "❤", true)).await.unwrap();
    h.send(react(&g, "bob", m1, "❤", true)).await.unwrap();
    assert_eq!(reactions(&seen_by("bob").await), [("👍", 1, false)]);
    let sync = h.sync_all("alice").await;
    let synced = sync.messages.iter().find(|m| m.seq == m1).unwrap();
    assert_eq!(reactions(synced), [("👍", 1, true)]);
    // Reaction events are stored and returned as such.
    let r = h.event("olga", &g, 2).await;
    assert_eq!(
        (r.kind.as_str(), r.target_seq, r.emoji.as_str(), r.remove),
        ("reaction", m1, "👍", false)
    );

    assert_eq!(
        code(h.send(react(&g, "bob", 999, "👍", false)).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(h.send(react(&g, "bob", 2, "👍", false)).await),
        ErrorCode::NotFound,
        "only messages take reactions"
    );
    for emoji in ["", "x\u{7}", &"a".repeat(33)] {
        assert_eq!(
            code(h.send(react(&g, "bob", m1, emoji, false)).await),
            ErrorCode::InvalidRequest,
            "{emoji:?}"
        );
    }
    assert!(h
        .send(react(&g, "bob", m1, &"a".repeat(32), false))
        .await
        .is_ok());
    assert_eq!(
        code(h.send(react(&g, "eve", m1, "👍", false)).await),
        ErrorCode::NotMember
    );
}

pub(crate) async fn replies_and_threads(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let g = h
        .group("olga", &["alice", "bob"], "g")
        .await
        .conversation_id;
    let root = h.say(&g, "olga", "root").await;
    let reply = |sender: &str, thread_root_seq, reply_to_seq| Message {
        thread_root_seq,
        reply_to_seq,
        ..text(&g, sender, "re")
    };
    assert_eq!(
        code(h.send(reply("alice", 0, 42)).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(h.send(reply("alice", 42, 0)).await),
        ErrorCode::NotFound
    );
    let mut replies = Vec::new();
    for i in 0..5 {
        let sender = if i % 2 == 0 { "alice" } else { "bob" };
        replies.push(h.send(reply(sender, root, root)).await.unwrap().seq);
        h.say(&g, "olga", "outside the thread").await;
    }
    assert_eq!(
        code(h.send(reply("alice", replies[0], 0)).await),
        ErrorCode::InvalidRequest,
        "a thread reply is not a root"
    );
    let reaction = h
        .send(react(&g, "bob", replies[1], "👀", false))
        .await
        .unwrap()
        .seq;
    assert_eq!(
        code(h.send(reply("alice", reaction, 0)).await),
        ErrorCode::NotFound,
        "a root is a message"
    );
    // A plain reply (not in a thread) to a thread reply is fine.
    h.send(reply("alice", 0, replies[0])).await.unwrap();

    let page = h.thread("bob", &g, root, 0, 2).await.unwrap();
    let root_msg = page.root.as_ref().unwrap();
    assert_eq!((root_msg.seq, root_msg.reply_count), (root, 5));
    assert_eq!(seqs(&page.replies), replies[..2]);
    assert!(page.has_more);
    assert_eq!(page.replies[1].reactions[0].emoji, "👀");
    assert!(page.replies[1].reactions[0].mine, "mine for the reader");
    let rest = h.thread("alice", &g, root, replies[1], 0).await.unwrap();
    assert_eq!(seqs(&rest.replies), replies[2..]);
    assert!(!rest.has_more);
    assert!(!h.thread("alice", &g, root, 0, 2).await.unwrap().replies[1].reactions[0].mine);
    assert_eq!(h.event("bob", &g, root).await.reply_count, 5);
    assert_eq!(h.event("bob", &g, replies[0]).await.thread_root_seq, root);

    assert_eq!(
        code(h.thread("eve", &g, root, 0, 0).await),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(h.thread("bob", &g, 999, 0, 0).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(h.thread("bob", &g, reaction, 0, 0).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(h.thread("bob", &g, 0, 0, 0).await),
        ErrorCode::InvalidRequest
    );
}

pub(crate) async fn unread_counts_and_mentions(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let g = h
        .group("olga", &["alice", "bob"], "g")
        .await
        .conversation_id;
    let mention = |sender: &str, users: &[&str]| Message {
        mentions: users.iter().map(|u| u.to_string()).collect(),
        ..text(&g, sender, "hey")
    };
    let m1 = h.say(&g, "olga", "one").await;
    h.send(mention("olga", &["alice"])).await.unwrap();
    h.send(mention("bob", &["alice", "olga"])).await.unwrap();
    h.say(&g, "alice", "mine").await;
    let m5 = h.send(mention("bob", &["alice"])).await.unwrap().seq;
    h.send(react(&g, "bob", m1, "👍", false)).await.unwrap();
    h.send(delete(&g, "bob", m5)).await.unwrap();

    let alice = h.listed("alice", &g).await;
    assert_eq!(
        (alice.unread_count, alice.unread_mentions),
        (3, 2),
        "messages from others, not deleted; reactions and deletes are not messages"
    );
    assert_eq!(
        (alice.my_role.as_str(), alice.read_seq, alice.delivered_seq),
        ("member", 0, 0)
    );
    assert!(alice.members.is_empty());
    let olga = h.listed("olga", &g).await;
    assert_eq!((olga.unread_count, olga.unread_mentions), (2, 1));
    assert_eq!(olga.my_role, "owner");

    h.marker(&g, "alice", 2, "read").await.unwrap();
    let alice = h.listed("alice", &g).await;
    assert_eq!(
        (alice.unread_count, alice.unread_mentions, alice.read_seq),
        (1, 1, 2)
    );
    // Sync carries the same per-user fields, with members and roles.
    let sync = h.sync_all("alice").await;
    let conv = &sync.conversations[0];
    assert_eq!((conv.unread_count, conv.unread_mentions), (1, 1));
    assert_eq!(
        roles_of(conv),
        [("alice", "member"), ("bob", "member"), ("olga", "owner")]
    );
    assert_eq!(conv.members, ["alice", "bob", "olga"]);
    h.marker(&g, "alice", 0, "read").await.unwrap();
    let stored = h
        .history("alice", &g, 2, "forward", 1)
        .await
        .unwrap()
        .messages[0]
        .clone();
    assert_eq!(stored.mentions, ["alice", "olga"]);

    // Mentions: members only, at most 50, distinct.
    assert_eq!(
        code(h.send(mention("olga", &["eve"])).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(h.send(mention("olga", &["bob", "bob"])).await),
        ErrorCode::InvalidRequest
    );
    let many: Vec<String> = (0..51).map(|i| format!("u{i}")).collect();
    let too_many = Message {
        mentions: many,
        ..text(&g, "olga", "all")
    };
    assert_eq!(code(h.send(too_many).await), ErrorCode::InvalidRequest);

    // The count stops at 1000.
    let busy = h.direct("alice", "bob").await.conversation_id;
    h.fill(&busy, "bob", 1001).await;
    assert_eq!(h.listed("alice", &busy).await.unread_count, 1000);
    assert_eq!(h.listed("bob", &busy).await.unread_count, 0);
}

pub(crate) async fn markers_and_receipts(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let g = h
        .group("olga", &["alice", "bob"], "g")
        .await
        .conversation_id;
    let empty = h.receipts("alice", &g, 0).await.unwrap();
    assert_eq!((empty.seq, empty.read_by, empty.delivered_to), (0, 0, 0));
    h.fill(&g, "olga", 4).await;

    let d = h.marker(&g, "alice", 3, "delivered").await.unwrap();
    assert_eq!((d.kind.as_str(), d.seq, d.at_ms), ("delivered", 3, T0));
    h.advance(10);
    let r = h.marker(&g, "alice", 2, "read").await.unwrap();
    assert_eq!((r.kind.as_str(), r.seq, r.at_ms), ("read", 2, T0 + 10));
    let d = h.marker(&g, "alice", 1, "delivered").await.unwrap();
    assert_eq!(d.seq, 3, "delivered never goes back");
    h.advance(10);
    let r = h.marker(&g, "bob", 9, "").await.unwrap();
    assert_eq!(
        (r.kind.as_str(), r.seq),
        ("read", 4),
        "clamped, read is the default"
    );
    let d = h.marker(&g, "bob", 1, "delivered").await.unwrap();
    assert_eq!(d.seq, 4, "read raises delivered");
    assert_eq!(
        code(h.marker(&g, "alice", 1, "seen").await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(h.marker(&g, "eve", 1, "delivered").await),
        ErrorCode::NotMember
    );

    let latest = h.receipts("alice", &g, 0).await.unwrap();
    assert_eq!(latest.seq, 4);
    assert_eq!((latest.read_by, latest.delivered_to), (1, 1), "bob only");
    let m3 = h.receipts("alice", &g, 3).await.unwrap();
    assert_eq!((m3.read_by, m3.delivered_to), (1, 2));
    let m2 = h.receipts("alice", &g, 2).await.unwrap();
    assert_eq!((m2.read_by, m2.delivered_to), (2, 2));
    let members: Vec<(&str, u64, u64, i64)> = m2
        .members
        .iter()
        .map(|m| {
            (
                m.user_id.as_str(),
                m.read_seq,
                m.delivered_seq,
                m.read_at_ms,
            )
        })
        .collect();
    assert_eq!(
        members,
        [
            ("alice", 2, 3, T0 + 10),
            ("bob", 4, 4, T0 + 20),
            ("olga", 0, 0, 0)
        ]
    );
    // The sender's own markers never count for their message.
    let bobs = h.say(&g, "bob", "mine").await;
    h.marker(&g, "olga", bobs, "read").await.unwrap();
    let r = h.receipts("bob", &g, bobs).await.unwrap();
    assert_eq!((r.read_by, r.delivered_to), (1, 1));
    let listed = h.listed("alice", &g).await;
    assert_eq!((listed.read_seq, listed.delivered_seq), (2, 3));

    assert_eq!(code(h.receipts("eve", &g, 0).await), ErrorCode::NotMember);
    assert_eq!(code(h.receipts("alice", &g, 99).await), ErrorCode::NotFound);
}

pub(crate) async fn group_administration_follows_roles(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let g = h
        .group("olga", &["adam", "bob", "carl"], "g")
        .await
        .conversation_id;
    let role_by = |actor: &str, user: &str, role: &str| {
        system(
            &g,
            actor,
            SystemEvent {
                action: "role_changed".into(),
                user_ids: vec![user.into()],
                role: role.into(),
                ..Default::default()
            },
        )
    };
    let role = |user: &str, role: &str| role_by("olga", user, role);
    // Members do not administer.
    assert_eq!(
        code(h.admin(&g, "bob", "members_removed", &["carl"]).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(h.admin(&g, "bob", "members_added", &["dora"]).await),
        ErrorCode::Forbidden
    );
    let rename = |actor: &str, name: &str| {
        system(
            &g,
            actor,
            SystemEvent {
                action: "renamed".into(),
                name: name.into(),
                ..Default::default()
            },
        )
    };
    assert_eq!(
        code(h.send(rename("bob", "mine")).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(h.send(role_by("bob", "carl", "admin")).await),
        ErrorCode::Forbidden
    );

    let promoted = h.send(role("adam", "admin")).await.unwrap();
    assert_eq!(promoted.system.as_ref().unwrap().role, "admin");
    let conv = h.get(&g, "adam").await.unwrap();
    assert_eq!(
        roles_of(&conv),
        [
            ("adam", "admin"),
            ("bob", "member"),
            ("carl", "member"),
            ("olga", "owner")
        ]
    );
    // Only the owner changes roles, even admins cannot.
    assert_eq!(
        code(h.send(role_by("adam", "bob", "admin")).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(h.send(role("olga", "member")).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(h.send(role("zed", "admin")).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(h.send(role("bob", "king")).await),
        ErrorCode::InvalidRequest
    );

    // An admin administers members, not the owner or other admins, never themselves.
    h.send(rename("adam", "renamed")).await.unwrap();
    let topic = |actor: &str, topic: String| {
        system(
            &g,
            actor,
            SystemEvent {
                action: "topic_changed".into(),
                topic,
                ..Default::default()
            },
        )
    };
    h.send(topic("adam", "the topic".into())).await.unwrap();
    assert_eq!(
        code(h.send(topic("adam", "x".repeat(1025))).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(h.send(topic("bob", "nope".into())).await),
        ErrorCode::Forbidden
    );
    let conv = h.get(&g, "").await.unwrap();
    assert_eq!(
        (conv.name.as_str(), conv.topic.as_str()),
        ("renamed", "the topic")
    );
    h.admin(&g, "adam", "members_added", &["dora", "bob"])
        .await
        .unwrap();
    h.admin(&g, "adam", "members_removed", &["carl"])
        .await
        .unwrap();
    assert_eq!(
        code(h.admin(&g, "adam", "members_removed", &["olga"]).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(h.admin(&g, "adam", "members_removed", &["adam"]).await),
        ErrorCode::Forbidden
    );
    h.send(role("bob", "admin")).await.unwrap();
    assert_eq!(
        code(h.admin(&g, "adam", "members_removed", &["bob"]).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(h.admin(&g, "olga", "members_removed", &["olga"]).await),
        ErrorCode::Forbidden
    );
    h.admin(&g, "olga", "members_removed", &["bob"])
        .await
        .unwrap();
    let conv = h.get(&g, "").await.unwrap();
    assert_eq!(conv.members, ["adam", "dora", "olga"]);
    assert_eq!(h.listed("dora", &g).await.my_role, "member");
    assert_eq!(code(h.get(&g, "carl").await), ErrorCode::NotMember);
    // The kicked see nothing more.
    assert_eq!(
        code(h.history("carl", &g, 0, "", 0).await),
        ErrorCode::NotMember
    );
    // Events are malformed without a known action or the users they need.
    assert_eq!(
        code(h.admin(&g, "olga", "members_exploded", &["dora"]).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(h.admin(&g, "olga", "members_added", &[]).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(h.admin(&g, "olga", "member_left", &["dora"]).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(
            h.send(Message {
                kind: "poke".into(),
                ..text(&g, "olga", "")
            })
            .await
        ),
        ErrorCode::InvalidRequest
    );

    // Direct conversations have no system events.
    let ab = h.direct("alice", "bob").await.conversation_id;
    assert_eq!(
        code(h.admin(&ab, "alice", "members_added", &["carl"]).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(h.admin(&ab, "alice", "member_left", &["alice"]).await),
        ErrorCode::Forbidden
    );
    // The member cap holds for additions.
    let crowd: Vec<String> = (0..crate::rules::MAX_MEMBERS)
        .map(|i| format!("u{i}"))
        .collect();
    let crowd: Vec<&str> = crowd.iter().map(String::as_str).collect();
    assert_eq!(
        code(h.admin(&g, "olga", "members_added", &crowd).await),
        ErrorCode::InvalidRequest
    );
}

pub(crate) async fn bans_keep_users_out(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let g = h
        .group("olga", &["bob", "mallory"], "g")
        .await
        .conversation_id;
    h.admin(&g, "olga", "members_banned", &["mallory", "trudy"])
        .await
        .unwrap();
    assert_eq!(h.get(&g, "").await.unwrap().members, ["bob", "olga"]);
    for user in ["mallory", "trudy"] {
        assert_eq!(
            code(h.admin(&g, "olga", "members_added", &[user]).await),
            ErrorCode::Banned
        );
    }
    assert_eq!(
        code(
            h.admin(&g, "olga", "members_added", &["carol", "trudy"])
                .await
        ),
        ErrorCode::Banned,
        "nobody is added when one of them is banned"
    );
    assert_eq!(h.get(&g, "").await.unwrap().members, ["bob", "olga"]);
    assert_eq!(
        code(h.admin(&g, "bob", "members_unbanned", &["mallory"]).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(h.admin(&g, "olga", "members_banned", &["olga"]).await),
        ErrorCode::Forbidden
    );
    h.admin(&g, "olga", "members_unbanned", &["mallory"])
        .await
        .unwrap();
    h.admin(&g, "olga", "members_added", &["mallory"])
        .await
        .unwrap();
    assert_eq!(
        h.get(&g, "").await.unwrap().members,
        ["bob", "mallory", "olga"]
    );
    assert_eq!(
        code(h.admin(&g, "olga", "members_added", &["trudy"]).await),
        ErrorCode::Banned
    );
}

pub(crate) async fn ownership_passes_on(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let g = h.group("olga", &["ann"], "g").await.conversation_id;
    h.advance(1);
    h.admin(&g, "olga", "members_added", &["zoe"])
        .await
        .unwrap();
    h.advance(1);
    h.admin(&g, "olga", "members_added", &["abe"])
        .await
        .unwrap();
    let transfer = |from: &str, to: &str| {
        system(
            &g,
            from,
            SystemEvent {
                action: "role_changed".into(),
                user_ids: vec![to.into()],
                role: "owner".into(),
                ..Default::default()
            },
        )
    };
    let two = Message {
        system: Some(SystemEvent {
            user_ids: vec!["ann".into(), "zoe".into()],
            ..transfer("olga", "ann").system.unwrap()
        }),
        ..transfer("olga", "ann")
    };
    assert_eq!(code(h.send(two).await), ErrorCode::InvalidRequest);
    assert_eq!(
        code(h.send(transfer("ann", "zoe")).await),
        ErrorCode::Forbidden
    );
    h.send(transfer("olga", "zoe")).await.unwrap();
    let conv = h.get(&g, "").await.unwrap();
    assert_eq!(conv.owner_id, "zoe");
    assert_eq!(
        roles_of(&conv),
        [
            ("abe", "member"),
            ("ann", "member"),
            ("olga", "admin"),
            ("zoe", "owner")
        ]
    );
    // The owner leaving: the earliest-joined admin takes over.
    h.admin(&g, "zoe", "member_left", &["zoe"]).await.unwrap();
    let conv = h.get(&g, "").await.unwrap();
    assert_eq!(conv.owner_id, "olga");
    assert_eq!(h.listed("olga", &g).await.my_role, "owner");
    // No admin left: the earliest-joined member (ann joined with the group).
    h.admin(&g, "olga", "member_left", &[]).await.unwrap();
    let conv = h.get(&g, "").await.unwrap();
    assert_eq!(conv.owner_id, "ann");
    assert_eq!(roles_of(&conv), [("abe", "member"), ("ann", "owner")]);
    // Any member leaves.
    h.admin(&g, "abe", "member_left", &["abe"]).await.unwrap();
    assert_eq!(h.get(&g, "").await.unwrap().members, ["ann"]);
    assert_eq!(
        code(h.admin(&g, "abe", "member_left", &["abe"]).await),
        ErrorCode::NotMember
    );
}

pub(crate) async fn notification_preferences(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let g = h
        .group("olga", &["ann", "bob", "cid", "dan"], "g")
        .await
        .conversation_id;
    let targets = |sender: &str, mentions: &[&str]| {
        let svc = Arc::clone(&h.svc);
        let req = NotificationTargetsRequest {
            conversation_id: g.clone(),
            sender_id: sender.into(),
            mentions: mentions.iter().map(|m| m.to_string()).collect(),
            now_ms: 0,
        };
        async move {
            let r = svc.notification_targets(req).await.unwrap();
            (r.notify, r.silenced)
        }
    };
    assert_eq!(
        targets("olga", &[]).await,
        (
            vec!["ann".into(), "bob".into(), "cid".into(), "dan".into()],
            vec![]
        )
    );
    // ann mutes forever, bob for 1 s, cid turns on do-not-disturb for 1 s, dan forever.
    h.notify("ann", &g, -1).await.unwrap();
    h.notify("bob", &g, T0 + 1_000).await.unwrap();
    h.notify("cid", "", T0 + 1_000).await.unwrap();
    h.notify("dan", "", -1).await.unwrap();
    assert_eq!(
        targets("olga", &[]).await,
        (
            vec![],
            vec!["ann".into(), "bob".into(), "cid".into(), "dan".into()]
        )
    );
    assert_eq!(
        targets("olga", &["ann", "cid"]).await,
        (
            vec!["ann".into()],
            vec!["bob".into(), "cid".into(), "dan".into()]
        ),
        "a mention passes a mute, not do-not-disturb"
    );
    assert_eq!(h.listed("ann", &g).await.muted_until_ms, -1);
    assert_eq!(h.listed("bob", &g).await.muted_until_ms, T0 + 1_000);
    assert_eq!(h.sync_all("cid").await.dnd_until_ms, T0 + 1_000);
    assert_eq!(h.sync_all("dan").await.dnd_until_ms, -1);
    assert_eq!(
        h.sync_all("bob").await.conversations[0].muted_until_ms,
        T0 + 1_000
    );

    // Expired preferences read as off.
    h.advance(1_000);
    assert_eq!(h.listed("bob", &g).await.muted_until_ms, 0);
    assert_eq!(h.sync_all("bob").await.conversations[0].muted_until_ms, 0);
    assert_eq!(h.sync_all("cid").await.dnd_until_ms, 0);
    assert_eq!(
        targets("ann", &[]).await,
        (
            vec!["bob".into(), "cid".into(), "olga".into()],
            vec!["dan".into()]
        ),
        "the sender is in neither list"
    );
    // Turning off.
    h.notify("ann", &g, 0).await.unwrap();
    h.notify("dan", "", 0).await.unwrap();
    assert_eq!(h.listed("ann", &g).await.muted_until_ms, 0);
    assert_eq!(h.sync_all("dan").await.dnd_until_ms, 0);
    assert_eq!(targets("olga", &[]).await.1, Vec::<String>::new());

    assert_eq!(code(h.notify("eve", &g, -1).await), ErrorCode::NotMember);
    assert_eq!(
        code(h.notify("ann", &g, -2).await),
        ErrorCode::InvalidRequest
    );
    let unknown = h
        .svc
        .notification_targets(NotificationTargetsRequest {
            conversation_id: "no-such".into(),
            sender_id: "olga".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(unknown), ErrorCode::NotFound);
}

pub(crate) async fn contacts_are_co_members_who_sent(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let shared = |user: &str, others: &[&str]| {
        let svc = Arc::clone(&h.svc);
        let req = SharedContactsRequest {
            user_id: user.into(),
            other_ids: others.iter().map(|o| o.to_string()).collect(),
        };
        async move { svc.shared_contacts(req).await.map(|r| r.shared) }
    };
    let none = Vec::<String>::new();

    // A stranger cannot make himself a contact alone: not by opening a direct
    // conversation, writing in it, nor by putting the victim in a group.
    let d = h.direct("mallory", "victim").await.conversation_id;
    assert_eq!(shared("mallory", &["victim"]).await.unwrap(), none);
    h.say(&d, "mallory", "hello?").await;
    let g = h
        .group("mallory", &["victim"], "trap")
        .await
        .conversation_id;
    h.say(&g, "mallory", "hi all").await;
    assert_eq!(shared("mallory", &["victim"]).await.unwrap(), none);
    // The victim sees mallory's (mallory wrote), not the other way round.
    assert_eq!(shared("victim", &["mallory"]).await.unwrap(), ["mallory"]);
    // Once the victim answers, they are contacts.
    h.say(&d, "victim", "who is this?").await;
    assert_eq!(shared("mallory", &["victim"]).await.unwrap(), ["victim"]);

    // Groups: members count once they sent something (any event), and not after
    // leaving.
    let g = h
        .group("carol", &["alice", "dan"], "g")
        .await
        .conversation_id;
    h.group("erin", &["frank"], "other").await;
    assert_eq!(shared("alice", &["carol", "dan"]).await.unwrap(), none);
    h.send(system(
        &g,
        "carol",
        SystemEvent {
            action: "renamed".into(),
            name: "g2".into(),
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    assert_eq!(
        shared("alice", &["frank", "dan", "carol", "zed", "alice", "carol"])
            .await
            .unwrap(),
        ["carol"]
    );
    h.say(&g, "dan", "hey").await;
    assert_eq!(
        shared("alice", &["dan", "carol"]).await.unwrap(),
        ["carol", "dan"]
    );
    assert_eq!(shared("nobody", &["alice"]).await.unwrap(), none);
    h.admin(&g, "dan", "member_left", &["dan"]).await.unwrap();
    assert_eq!(shared("alice", &["dan", "carol"]).await.unwrap(), ["carol"]);
    assert_eq!(code(shared("", &["a"]).await), ErrorCode::InvalidRequest);
}

pub(crate) async fn webhooks_are_managed_by_admins(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let g = h.group("olga", &["adam", "bob"], "g").await.conversation_id;
    h.send(system(
        &g,
        "olga",
        SystemEvent {
            action: "role_changed".into(),
            user_ids: vec!["adam".into()],
            role: "admin".into(),
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    h.fill(&g, "bob", 3).await;

    for url in [
        "ftp://example.com/hook",
        "example.com/hook",
        "https://",
        "https:///path",
        "http://exa mple.com/",
        "javascript:alert(1)",
    ] {
        assert_eq!(
            code(h.put_hook(&g, "olga", url).await),
            ErrorCode::InvalidRequest,
            "{url}"
        );
    }
    let long = format!("https://example.com/{}", "a".repeat(2048));
    assert_eq!(
        code(h.put_hook(&g, "olga", &long).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(h.put_hook(&g, "bob", "https://example.com/h").await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(h.put_hook(&g, "eve", "https://example.com/h").await),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(h.put_hook("no-such", "olga", "https://example.com/h").await),
        ErrorCode::NotMember
    );

    let hook = h
        .put_hook(&g, "adam", "https://hooks.example.com:8443/in?x=1")
        .await
        .unwrap();
    assert!(uuid::Uuid::parse_str(&hook.webhook_id).is_ok());
    assert_eq!(hook.secret.len(), 64);
    assert!(hook
        .secret
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    assert_eq!(
        (
            hook.delivered_seq,
            hook.created_by.as_str(),
            hook.created_at_ms
        ),
        (4, "adam", T0),
        "delivery starts after the events that exist"
    );
    let second = h.put_hook(&g, "olga", "http://10.0.0.1/x").await.unwrap();
    assert_ne!(second.secret, hook.secret);

    // Plain members see a url's origin only (no userinfo, path or query), only owner
    // and admins see secrets and whole urls; internal callers see all.
    let creds = h
        .put_hook(&g, "olga", "https://u:pw@hooks.example.com/T0/tok?key=s")
        .await
        .unwrap();
    let seen = h.hooks(&g, "bob").await.unwrap();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|w| w.secret.is_empty()));
    let urls: Vec<&str> = seen.iter().map(|w| w.url.as_str()).collect();
    assert!(urls.contains(&"https://hooks.example.com"), "{urls:?}");
    assert!(urls.contains(&"https://hooks.example.com:8443"), "{urls:?}");
    assert!(
        urls.iter()
            .all(|u| !u.contains("pw") && !u.contains('?') && !u.contains("tok")),
        "{urls:?}"
    );
    let seen = h.hooks(&g, "adam").await.unwrap();
    assert!(seen.iter().all(|w| w.secret.len() == 64));
    assert!(seen.iter().any(|w| w.url == creds.url));
    let svc = Arc::clone(&h.svc);
    svc.delete_webhook(DeleteWebhookRequest {
        conversation_id: g.clone(),
        actor_id: "olga".into(),
        webhook_id: creds.webhook_id.clone(),
    })
    .await
    .unwrap();
    assert_eq!(code(h.hooks(&g, "eve").await), ErrorCode::NotMember);
    let ab = h.direct("alice", "bob").await.conversation_id;
    let direct = h
        .put_hook(&ab, "bob", "https://example.com/d")
        .await
        .unwrap();
    assert_eq!(direct.delivered_seq, 0);
    let everything = h.hooks("", "").await.unwrap();
    assert_eq!(everything.len(), 3);
    assert!(everything.iter().all(|w| !w.secret.is_empty()));

    // The cursor only moves forward.
    let advance = |seq| {
        let svc = Arc::clone(&h.svc);
        let req = AdvanceWebhookRequest {
            conversation_id: g.clone(),
            webhook_id: hook.webhook_id.clone(),
            delivered_seq: seq,
        };
        async move { svc.advance_webhook(req).await }
    };
    assert_eq!(advance(6).await.unwrap().delivered_seq, 6);
    assert_eq!(advance(5).await.unwrap().delivered_seq, 6);
    let stored = h.hooks(&g, "").await.unwrap();
    let stored = stored
        .iter()
        .find(|w| w.webhook_id == hook.webhook_id)
        .unwrap();
    assert_eq!(
        (stored.delivered_seq, stored.secret.as_str()),
        (6, hook.secret.as_str())
    );

    // Deleting: who may add may delete; unknown ids are not found.
    let del = |actor: &str, conv: &str, id: &str| {
        let svc = Arc::clone(&h.svc);
        let req = DeleteWebhookRequest {
            conversation_id: conv.into(),
            actor_id: actor.into(),
            webhook_id: id.into(),
        };
        async move { svc.delete_webhook(req).await.map(|_| ()) }
    };
    assert_eq!(
        code(del("bob", &g, &hook.webhook_id).await),
        ErrorCode::Forbidden
    );
    assert_eq!(code(del("olga", &g, "missing").await), ErrorCode::NotFound);
    assert_eq!(
        code(del("alice", &ab, &hook.webhook_id).await),
        ErrorCode::NotFound,
        "a webhook of another conversation"
    );
    del("olga", &g, &hook.webhook_id).await.unwrap();
    assert_eq!(
        code(del("olga", &g, &hook.webhook_id).await),
        ErrorCode::NotFound
    );
    assert_eq!(code(advance(7).await), ErrorCode::NotFound);
    del("alice", &ab, &direct.webhook_id).await.unwrap();
    assert_eq!(h.hooks("", "").await.unwrap().len(), 1);

    // At most 10 per conversation.
    for i in 1..10 {
        h.put_hook(&g, "olga", &format!("https://example.com/{i}"))
            .await
            .unwrap();
    }
    assert_eq!(
        code(h.put_hook(&g, "olga", "https://example.com/11").await),
        ErrorCode::InvalidRequest
    );
}

pub(crate) async fn conversation_state_survives_reopening(factory: &dyn StoreFactory) {
    let (g, m1) = {
        let h = Harness::open(factory, 200).await;
        let g = h.group("olga", &["bob"], "g").await.conversation_id;
        let m1 = h.say(&g, "bob", "first").await;
        h.send(edit(&g, "bob", m1, "edited")).await.unwrap();
        h.send(react(&g, "olga", m1, "👍", false)).await.unwrap();
        h.admin(&g, "olga", "members_banned", &["eve"])
            .await
            .unwrap();
        h.notify("bob", &g, -1).await.unwrap();
        h.marker(&g, "olga", 1, "delivered").await.unwrap();
        h.put_hook(&g, "olga", "https://example.com/h")
            .await
            .unwrap();
        (g, m1)
    };
    let h = Harness::open(factory, 200).await;
    let m = h.event("olga", &g, m1).await;
    assert_eq!(
        (m.body.as_str(), reactions(&m)),
        ("edited", vec![("👍", 1, true)])
    );
    assert_eq!(
        code(h.admin(&g, "olga", "members_added", &["eve"]).await),
        ErrorCode::Banned
    );
    assert_eq!(h.listed("bob", &g).await.muted_until_ms, -1);
    assert_eq!(h.listed("olga", &g).await.delivered_seq, 1);
    assert_eq!(h.hooks(&g, "olga").await.unwrap().len(), 1);
}

pub(crate) async fn unknown_conversations_answer_like_foreign_ones(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let g = h.group("olga", &["bob"], "g").await.conversation_id;
    h.say(&g, "bob", "hi").await;
    let hook = h
        .put_hook(&g, "olga", "https://example.com/h")
        .await
        .unwrap();
    // Every request a user makes that names a conversation: eve gets the same answer
    // for a conversation she is not in and for one that does not exist.
    for conv in [g.as_str(), "0193aaaa-no-such-conversation"] {
        let svc = Arc::clone(&h.svc);
        let codes = [
            ("get", code(h.get(conv, "eve").await)),
            (
                "change",
                code(h.change(conv, "eve", "remove", &["eve"]).await),
            ),
            ("history", code(h.history("eve", conv, 0, "", 0).await)),
            ("read", code(h.marker(conv, "eve", 1, "read").await)),
            (
                "delivered",
                code(h.marker(conv, "eve", 1, "delivered").await),
            ),
            ("send", code(h.send(text(conv, "eve", "x")).await)),
            ("edit", code(h.send(edit(conv, "eve", 2, "x")).await)),
            (
                "react",
                code(h.send(react(conv, "eve", 2, "👍", false)).await),
            ),
            (
                "leave",
                code(h.admin(conv, "eve", "member_left", &["eve"]).await),
            ),
            ("thread", code(h.thread("eve", conv, 2, 0, 0).await)),
            ("receipts", code(h.receipts("eve", conv, 0).await)),
            ("mute", code(h.notify("eve", conv, -1).await)),
            (
                "put_hook",
                code(h.put_hook(conv, "eve", "https://example.com/x").await),
            ),
            ("hooks", code(h.hooks(conv, "eve").await)),
            (
                "delete_hook",
                code(
                    svc.delete_webhook(DeleteWebhookRequest {
                        conversation_id: conv.into(),
                        actor_id: "eve".into(),
                        webhook_id: hook.webhook_id.clone(),
                    })
                    .await,
                ),
            ),
        ];
        for (request, got) in codes {
            assert_eq!(got, ErrorCode::NotMember, "{request} of {conv}");
        }
    }
    // Internal callers (no user) still learn that a conversation does not exist.
    assert_eq!(code(h.get("no-such", "").await), ErrorCode::NotFound);
    assert_eq!(
        code(h.history("", "no-such", 0, "", 0).await),
        ErrorCode::NotFound
    );
}

pub(crate) async fn webhooks_end_with_their_creators_right(factory: &dyn StoreFactory) {
    let store = factory.open().await;
    let h = Harness::over(Arc::clone(&store), 200);
    let g = h.group("olga", &["adam", "bob"], "g").await.conversation_id;
    let role = |user: &str, role: &str| {
        system(
            &g,
            "olga",
            SystemEvent {
                action: "role_changed".into(),
                user_ids: vec![user.into()],
                role: role.into(),
                ..Default::default()
            },
        )
    };
    h.send(role("adam", "admin")).await.unwrap();
    let delivery = |hook: &Webhook, from_seq: u64| {
        let svc = Arc::clone(&h.svc);
        let req = StorageHistoryRequest {
            user_id: String::new(),
            request: Some(HistoryRequest {
                conversation_id: hook.conversation_id.clone(),
                from_seq,
                direction: "forward".into(),
                limit: 50,
            }),
            webhook_id: hook.webhook_id.clone(),
        };
        async move { svc.history(req).await }
    };
    let ids =
        |hooks: Vec<Webhook>| -> Vec<String> { hooks.into_iter().map(|w| w.webhook_id).collect() };

    // Removed with the event that takes the right away: gone from the listing, and
    // its delivery read answers not_found.
    let kicked = h
        .put_hook(&g, "adam", "https://example.com/adam")
        .await
        .unwrap();
    let owners = h
        .put_hook(&g, "olga", "https://example.com/olga")
        .await
        .unwrap();
    h.say(&g, "bob", "before").await;
    assert_eq!(
        delivery(&kicked, kicked.delivered_seq)
            .await
            .unwrap()
            .messages
            .len(),
        1
    );
    h.admin(&g, "olga", "members_removed", &["adam"])
        .await
        .unwrap();
    h.say(&g, "bob", "after the kick").await;
    assert_eq!(
        ids(h.hooks(&g, "olga").await.unwrap()),
        std::slice::from_ref(&owners.webhook_id)
    );
    assert_eq!(
        code(delivery(&kicked, kicked.delivered_seq).await),
        ErrorCode::NotFound
    );
    // Back as an admin, the old webhook stays gone: nothing sent meanwhile leaks.
    h.admin(&g, "olga", "members_added", &["adam"])
        .await
        .unwrap();
    h.send(role("adam", "admin")).await.unwrap();
    assert_eq!(
        code(delivery(&kicked, kicked.delivered_seq).await),
        ErrorCode::NotFound
    );
    assert_eq!(h.hooks(&g, "adam").await.unwrap().len(), 1);

    // Demoted, or leaving, removes it too.
    let demoted = h
        .put_hook(&g, "adam", "https://example.com/a2")
        .await
        .unwrap();
    h.send(role("adam", "member")).await.unwrap();
    assert!(!ids(h.hooks(&g, "olga").await.unwrap()).contains(&demoted.webhook_id));
    h.send(role("adam", "admin")).await.unwrap();
    let left = h
        .put_hook(&g, "adam", "https://example.com/a3")
        .await
        .unwrap();
    h.admin(&g, "adam", "member_left", &["adam"]).await.unwrap();
    assert!(!ids(h.hooks(&g, "olga").await.unwrap()).contains(&left.webhook_id));

    // Should the removal not have happened with the event (the event written by a
    // partition owner straight to the store), delivery stops right before it and
    // the webhook is removed when it is reached.
    h.admin(&g, "olga", "members_added", &["adam"])
        .await
        .unwrap();
    h.send(role("adam", "admin")).await.unwrap();
    let raced = h
        .put_hook(&g, "adam", "https://example.com/a4")
        .await
        .unwrap();
    let before = h.say(&g, "bob", "still allowed").await;
    let mut kick = system(
        &g,
        "olga",
        SystemEvent {
            action: "members_banned".into(),
            user_ids: vec!["adam".into()],
            ..Default::default()
        },
    );
    kick.seq = before + 1;
    kick.message_id = "kick".into();
    kick.sent_at_ms = T0;
    store.append(kick, 0, T0).await.unwrap();
    h.say(&g, "bob", "secret").await;
    let listed = h.hooks(&g, "olga").await.unwrap();
    let shown = listed
        .iter()
        .find(|w| w.webhook_id == raced.webhook_id)
        .unwrap();
    assert!(
        shown.suspended,
        "listed as suspended while its creator lacks the right"
    );
    let page = delivery(&raced, raced.delivered_seq).await.unwrap();
    assert_eq!(seqs(&page.messages), [before]);
    assert!(page.has_more);
    assert_eq!(code(delivery(&raced, before).await), ErrorCode::NotFound);
    assert!(!ids(h.hooks(&g, "olga").await.unwrap()).contains(&raced.webhook_id));

    // Any current owner or admin deletes a suspended webhook (here suspended by a
    // membership change that wrote no event).
    h.admin(&g, "olga", "members_unbanned", &["adam"])
        .await
        .unwrap();
    h.admin(&g, "olga", "members_added", &["adam", "cleo"])
        .await
        .unwrap();
    h.send(role("adam", "admin")).await.unwrap();
    h.send(role("cleo", "admin")).await.unwrap();
    let quiet = h
        .put_hook(&g, "adam", "https://example.com/a5")
        .await
        .unwrap();
    h.change(&g, "olga", "remove", &["adam"]).await.unwrap();
    let listed = h.hooks(&g, "cleo").await.unwrap();
    assert!(listed
        .iter()
        .any(|w| w.webhook_id == quiet.webhook_id && w.suspended));
    h.svc
        .delete_webhook(DeleteWebhookRequest {
            conversation_id: g.clone(),
            actor_id: "cleo".into(),
            webhook_id: quiet.webhook_id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        ids(h.hooks(&g, "olga").await.unwrap()),
        std::slice::from_ref(&owners.webhook_id)
    );
}

pub(crate) async fn conversations_created_are_capped(factory: &dyn StoreFactory) {
    let h = Harness::open(factory, 200).await;
    let create = |creator: &str, kind: &str, members: &[&str]| {
        let svc = Arc::clone(&h.svc);
        let req = CreateConversationRequest {
            creator_id: creator.into(),
            kind: kind.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
            name: String::new(),
        };
        async move { svc.create_conversation(req).await }
    };
    let first = h.direct("maker", "peer0").await.conversation_id;
    for i in 1..MAX_CREATED {
        let kind = if i % 2 == 0 { "direct" } else { "group" };
        create("maker", kind, &[&format!("peer{i}")]).await.unwrap();
    }
    // Being put into others' conversations does not count.
    h.group("other", &["maker"], "theirs").await;
    let refused = create("maker", "group", &["x"]).await;
    match &refused {
        Err(StorageError::InvalidRequest(message)) => {
            assert!(message.contains(&MAX_CREATED.to_string()), "{message}")
        }
        other => panic!("expected invalid_request, got {other:?}"),
    }
    assert_eq!(
        code(create("maker", "direct", &["someone-new"]).await),
        ErrorCode::InvalidRequest
    );
    // An existing direct pair is still answered, from either side.
    assert_eq!(
        create("maker", "direct", &["peer0"])
            .await
            .unwrap()
            .conversation_id,
        first
    );
    assert_eq!(
        create("peer0", "direct", &["maker"])
            .await
            .unwrap()
            .conversation_id,
        first
    );
    // Others are not affected.
    create("other", "group", &["maker"]).await.unwrap();
}

/// The largest body the gateway accepts by default (`routing.max_body_bytes`).
const LARGEST_BODY: usize = 64 * 1024;

pub(crate) async fn answers_stay_under_the_byte_budget(factory: &dyn StoreFactory) {
    use prost::Message as _;
    let h = Harness::open(factory, 200).await;
    let g = h.group("olga", &["bob"], "big").await.conversation_id;
    let first = h.last_seq(&g).await + 1;
    let big = |i: u64| format!("{i:08}").repeat(LARGEST_BODY / 8);
    for i in 0..64 {
        h.say(&g, "bob", &big(i)).await;
    }
    let last = h.last_seq(&g).await;
    let all: Vec<u64> = (1..=last).collect();

    // Backward from the newest with a limit above what fits: every page fits, says
    // has_more until the first event, and the pages cover every event once.
    let mut seen = Vec::new();
    let mut from = 0;
    loop {
        let page = h.history("bob", &g, from, "backward", 100).await.unwrap();
        assert!(page.encoded_len() <= ANSWER_BYTES, "{}", page.encoded_len());
        assert!(!page.messages.is_empty());
        assert!(page.messages.len() < 64, "a page stops at the byte budget");
        let mut page_seqs = seqs(&page.messages);
        from = page_seqs[0];
        page_seqs.extend(seen);
        seen = page_seqs;
        if !page.has_more {
            break;
        }
    }
    assert_eq!(seen, all, "backward pages return every event exactly once");

    // Forward from the start, the same.
    let mut seen = Vec::new();
    let mut from = 0;
    loop {
        let page = h.history("bob", &g, from, "forward", 200).await.unwrap();
        assert!(page.encoded_len() <= ANSWER_BYTES);
        seen.extend(seqs(&page.messages));
        from = *seen.last().expect("a page");
        if !page.has_more {
            break;
        }
    }
    assert_eq!(seen, all, "forward pages return every event exactly once");
    for m in &h
        .history("bob", &g, first - 1, "forward", 3)
        .await
        .unwrap()
        .messages
    {
        assert_eq!(m.body.len(), LARGEST_BODY, "bodies are whole");
    }

    // The default sync fits, says has_more and lists the conversation as truncated;
    // history forward from the last event it returned gives the rest exactly once.
    let sync = h.sync_all("bob").await;
    assert!(sync.encoded_len() <= ANSWER_BYTES, "{}", sync.encoded_len());
    assert!(sync.has_more);
    assert_eq!(sync.truncated, std::slice::from_ref(&g));
    let mut seen = seqs(&sync.messages);
    assert_eq!(seen[0], 1);
    loop {
        let from = *seen.last().expect("sync returned events");
        let page = h.history("bob", &g, from, "forward", 100).await.unwrap();
        seen.extend(seqs(&page.messages));
        if !page.has_more {
            break;
        }
    }
    assert_eq!(
        seen, all,
        "sync then history return every event exactly once"
    );

    // A small conversation after a full one is truncated too, not dropped.
    let ab = h.direct("bob", "alice").await.conversation_id;
    h.say(&ab, "alice", "hi").await;
    let sync = h.sync_all("bob").await;
    assert!(sync.encoded_len() <= ANSWER_BYTES);
    assert!(sync.has_more);
    let listed: Vec<&str> = sync
        .conversations
        .iter()
        .map(|c| c.conversation_id.as_str())
        .collect();
    for id in [&g, &ab] {
        assert!(listed.contains(&id.as_str()));
        let returned = sync
            .messages
            .iter()
            .filter(|m| m.conversation_id == *id)
            .count();
        let last = h.last_seq(id).await as usize;
        assert!(
            returned == last || sync.truncated.contains(id),
            "{id}: {returned} of {last} returned and not truncated"
        );
    }

    // A thread of large replies pages the same way.
    let root = h.say(&g, "olga", "root").await;
    for i in 0..24 {
        let mut reply = text(&g, "bob", &big(i));
        reply.thread_root_seq = root;
        h.send(reply).await.unwrap();
    }
    let mut replies = Vec::new();
    let mut from = 0;
    loop {
        let page = h.thread("olga", &g, root, from, 0).await.unwrap();
        assert!(page.encoded_len() <= ANSWER_BYTES);
        replies.extend(seqs(&page.replies));
        from = *replies.last().expect("replies");
        if !page.has_more {
            break;
        }
    }
    assert_eq!(replies, (root + 1..=root + 24).collect::<Vec<_>>());
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
            batches_append_in_order_like_single_appends,
            stored_data_survives_reopening,
            history_pages_both_directions,
            sync_returns_what_was_missed,
            sync_reports_removals_since_the_cursor,
            read_markers_only_move_forward,
            dedupe_keys_expire,
            edits_replace_the_body_and_only_the_sender_edits,
            deletes_remove_the_body_from_storage,
            reactions_count_per_emoji,
            replies_and_threads,
            unread_counts_and_mentions,
            markers_and_receipts,
            group_administration_follows_roles,
            bans_keep_users_out,
            ownership_passes_on,
            notification_preferences,
            contacts_are_co_members_who_sent,
            webhooks_are_managed_by_admins,
            conversation_state_survives_reopening,
            answers_stay_under_the_byte_budget,
            unknown_conversations_answer_like_foreign_ones,
            webhooks_end_with_their_creators_right,
            conversations_created_are_capped,
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
