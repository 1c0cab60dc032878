//! The storage service's behaviour over any [`HistoryStore`]: request validation,
//! membership checks of reads, paging defaults, time, hot-read coalescing and the
//! dedupe purger; plus the gRPC `Storage` server that exposes it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use switchboard_config::StorageConfig;
use switchboard_proto::v1::storage_server::Storage;
use switchboard_proto::{
    AdvanceWebhookRequest, AppendBatchRequest, AppendBatchResponse, AppendRequest, AppendResponse,
    AuthorizeRequest, AuthorizeResponse, ChangeMembersRequest, Conversation,
    ConversationListResult, CreateConversationRequest, DeleteWebhookRequest, DeleteWebhookResponse,
    GetConversationRequest, HistoryResult, LastSeqRequest, LastSeqResponse,
    ListConversationsRequest, ListWebhooksRequest, ListWebhooksResponse, LookupDedupeRequest,
    LookupDedupeResponse, Message, NotificationTargetsRequest, NotificationTargetsResponse,
    PutWebhookRequest, ReadMarker, ReceiptsResult, SetNotificationRequest, SetNotificationResponse,
    SetReadMarkerRequest, SharedContactsRequest, SharedContactsResponse, StorageHistoryRequest,
    StorageReceiptsRequest, StorageSyncRequest, StorageThreadRequest, SyncResult, ThreadResult,
    Webhook,
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::coalesce::SingleFlight;
use crate::error::{Result, StorageError};
use crate::metrics::{Instrumented, StorageMetrics};
use crate::rules;
use crate::store::{
    actions, kinds, Appended, ConversationKind, Direction, HistoryStore, MarkerKind, MemberAction,
    MemberChange, NewConversation, NewWebhook, PageQuery, ThreadQuery,
};

/// Milliseconds since the Unix epoch, from a clock the service is given (tests pass a
/// manual one to move time across the dedupe window).
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The wall clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    })
}

/// How often expired dedupe keys are purged.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// Dedupe keys deleted per backend call while purging (keeps each write short).
const PURGE_BATCH: u32 = 5_000;

/// The settings the service logic needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceSettings {
    /// How long a (sender, client_msg_id) pair stays deduplicated.
    pub dedupe_window_ms: i64,
    /// Largest history page.
    pub max_page: u32,
    /// Byte budget of an answer carrying messages (history, sync, thread).
    pub max_answer_bytes: usize,
    /// Most conversations one user may create.
    pub max_conversations_created: u32,
}

impl ServiceSettings {
    pub fn from_config(storage: &StorageConfig) -> Self {
        ServiceSettings {
            dedupe_window_ms: i64::try_from(storage.dedupe_window_secs.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            max_page: storage.max_page,
            max_answer_bytes: storage.max_answer_bytes,
            max_conversations_created: storage.max_conversations_created,
        }
    }
}

type SharedPage = Result<Arc<HistoryResult>>;

/// The storage service, transport-agnostic: proto requests in, proto replies or
/// [`StorageError`] out.
pub struct StorageService {
    /// The backend, wrapped to record latency and errors.
    store: Arc<dyn HistoryStore>,
    settings: ServiceSettings,
    clock: Clock,
    metrics: StorageMetrics,
    /// Running history page queries, shared by identical concurrent requests.
    history_flights: SingleFlight<PageQuery, SharedPage>,
}

impl StorageService {
    pub fn new(
        store: Arc<dyn HistoryStore>,
        settings: ServiceSettings,
        clock: Clock,
        metrics: StorageMetrics,
    ) -> Self {
        StorageService {
            store: Arc::new(Instrumented::new(store, metrics.clone())),
            settings,
            clock,
            metrics,
            history_flights: SingleFlight::new(),
        }
    }

    fn now_ms(&self) -> i64 {
        (self.clock)()
    }

    /// The conversation with members, for a request naming `user_id` (empty = an
    /// internal caller): to a user an unknown conversation answers `not_member`, the
    /// same as one they are not in, so that no answer reveals which exist.
    async fn conversation_for(&self, conversation_id: &str, user_id: &str) -> Result<Conversation> {
        let found = self.store.get_conversation(conversation_id).await;
        hide_unknown(found, conversation_id, user_id)
    }

    /// Bytes the messages of one answer may take.
    fn message_budget(&self) -> usize {
        self.settings
            .max_answer_bytes
            .saturating_sub(rules::ANSWER_SLACK_BYTES)
    }

    fn dedupe_since_ms(&self) -> i64 {
        self.now_ms().saturating_sub(self.settings.dedupe_window_ms)
    }

    /// Create a direct conversation (idempotent per pair) or a group (creator = owner).
    pub async fn create_conversation(
        &self,
        req: CreateConversationRequest,
    ) -> Result<Conversation> {
        rules::validate_id("creator_id", &req.creator_id)?;
        let kind = ConversationKind::parse(&req.kind).ok_or_else(|| {
            StorageError::InvalidRequest(format!(
                "kind must be \"direct\" or \"group\", not {:?}",
                req.kind
            ))
        })?;
        let others: Vec<String> = rules::dedup_ids("members", &req.members)?
            .into_iter()
            .filter(|m| *m != req.creator_id)
            .collect();
        let (members, name) = match kind {
            ConversationKind::Direct => {
                if others.len() != 1 {
                    return Err(StorageError::InvalidRequest(
                        "a direct conversation needs exactly one other member".into(),
                    ));
                }
                // A direct conversation has no name: both sides see the other's.
                (
                    vec![req.creator_id.clone(), others[0].clone()],
                    String::new(),
                )
            }
            ConversationKind::Group => {
                rules::validate_name(&req.name)?;
                let mut members = Vec::with_capacity(others.len() + 1);
                members.push(req.creator_id.clone());
                members.extend(others);
                rules::check_member_count(members.len())?;
                (members, req.name)
            }
        };
        self.store
            .create_conversation(NewConversation {
                conversation_id: uuid::Uuid::now_v7().to_string(),
                kind,
                creator_id: req.creator_id,
                members,
                name,
                now_ms: self.now_ms(),
                max_created: self.settings.max_conversations_created,
            })
            .await
    }

    /// A conversation with members; a non-empty `caller_id` must be a member.
    pub async fn get_conversation(&self, req: GetConversationRequest) -> Result<Conversation> {
        rules::validate_id("conversation_id", &req.conversation_id)?;
        rules::validate_optional_id("caller_id", &req.caller_id)?;
        let conv = self
            .conversation_for(&req.conversation_id, &req.caller_id)
            .await?;
        if !req.caller_id.is_empty() && !conv.members.contains(&req.caller_id) {
            return Err(StorageError::not_member(
                &req.conversation_id,
                &req.caller_id,
            ));
        }
        Ok(conv)
    }

    /// Add or remove members of a group (owner adds/removes, members may leave).
    pub async fn change_members(&self, req: ChangeMembersRequest) -> Result<Conversation> {
        rules::validate_id("conversation_id", &req.conversation_id)?;
        rules::validate_id("actor_id", &req.actor_id)?;
        let action = MemberAction::parse(&req.action).ok_or_else(|| {
            StorageError::InvalidRequest(format!(
                "action must be \"add\" or \"remove\", not {:?}",
                req.action
            ))
        })?;
        let user_ids = rules::dedup_ids("user_ids", &req.user_ids)?;
        if user_ids.is_empty() {
            return Err(StorageError::InvalidRequest("user_ids is required".into()));
        }
        rules::check_member_count(user_ids.len())?;
        let changed = self
            .store
            .change_members(MemberChange {
                conversation_id: req.conversation_id.clone(),
                actor_id: req.actor_id.clone(),
                action,
                user_ids,
                now_ms: self.now_ms(),
            })
            .await;
        hide_unknown(changed, &req.conversation_id, &req.actor_id)
    }

    /// The user's conversations with `last_seq`, without members.
    pub async fn list_conversations(
        &self,
        req: ListConversationsRequest,
    ) -> Result<ConversationListResult> {
        rules::validate_id("user_id", &req.user_id)?;
        let mut conversations = self.store.list_conversations(&req.user_id).await?;
        let now_ms = self.now_ms();
        for conv in &mut conversations {
            conv.muted_until_ms = rules::active_until(conv.muted_until_ms, now_ms);
        }
        Ok(ConversationListResult { conversations })
    }

    pub async fn last_seq(&self, req: LastSeqRequest) -> Result<LastSeqResponse> {
        rules::validate_id("conversation_id", &req.conversation_id)?;
        let last_seq = self.store.last_seq(&req.conversation_id).await?;
        Ok(LastSeqResponse { last_seq })
    }

    /// Persist a sequenced message (gapless), or return the stored one for a known
    /// dedupe key. `message_id` and `sent_at_ms` are filled in when empty.
    pub async fn append(&self, req: AppendRequest) -> Result<AppendResponse> {
        let message = req
            .message
            .ok_or_else(|| StorageError::InvalidRequest("message is required".into()))?;
        check_seq(message.seq)?;
        let now_ms = self.now_ms();
        let message = prepare_append(message, now_ms)?;
        let since = now_ms.saturating_sub(self.settings.dedupe_window_ms);
        let appended = self.store.append(message, since, now_ms).await?;
        Ok(self.appended(appended).await)
    }

    /// [`StorageService::append`] of several events of one conversation in one store
    /// call (see `HistoryStore::append_batch`).
    pub async fn append_batch(&self, req: AppendBatchRequest) -> Result<AppendBatchResponse> {
        let Some(conversation_id) = req.messages.first().map(|m| m.conversation_id.clone()) else {
            return Err(StorageError::InvalidRequest("messages are required".into()));
        };
        if req.messages.len() > MAX_APPEND_BATCH {
            return Err(StorageError::InvalidRequest(format!(
                "at most {MAX_APPEND_BATCH} messages per batch"
            )));
        }
        check_seq(req.first_seq)?;
        let now_ms = self.now_ms();
        let mut messages = Vec::with_capacity(req.messages.len());
        for message in req.messages {
            if message.conversation_id != conversation_id {
                return Err(StorageError::InvalidRequest(
                    "a batch holds the events of one conversation".into(),
                ));
            }
            messages.push(prepare_append(message, now_ms)?);
        }
        let since = now_ms.saturating_sub(self.settings.dedupe_window_ms);
        let appended = self
            .store
            .append_batch(messages, req.first_seq, since, now_ms)
            .await?;
        let mut results = Vec::with_capacity(appended.len());
        for appended in appended {
            results.push(self.appended(appended).await);
        }
        Ok(AppendBatchResponse { results })
    }

    /// What follows a stored (or deduplicated) append, and its answer.
    async fn appended(&self, appended: Appended) -> AppendResponse {
        if appended.duplicate {
            tracing::debug!(
                conversation_id = %appended.message.conversation_id,
                seq = appended.message.seq,
                "duplicate append answered from the dedupe key"
            );
        } else {
            self.remove_revoked_webhooks(&appended.message).await;
        }
        AppendResponse {
            message: Some(appended.message),
            duplicate: appended.duplicate,
        }
    }

    pub async fn lookup_dedupe(&self, req: LookupDedupeRequest) -> Result<LookupDedupeResponse> {
        rules::validate_id("sender_id", &req.sender_id)?;
        rules::validate_id("client_msg_id", &req.client_msg_id)?;
        let message = self
            .store
            .lookup_dedupe(&req.sender_id, &req.client_msg_id, self.dedupe_since_ms())
            .await?;
        Ok(LookupDedupeResponse { message })
    }

    /// A history page for a member, or for an internal caller (empty `user_id`: no
    /// membership check, no `mine`; the webhook dispatcher reads this way). Identical
    /// concurrent pages share one backend query; the membership check runs for each
    /// caller. An unknown conversation answers `not_member` to users (existence is
    /// not revealed to non-members) and `not_found` to internal callers.
    pub async fn history(&self, req: StorageHistoryRequest) -> Result<HistoryResult> {
        rules::validate_optional_id("user_id", &req.user_id)?;
        rules::validate_optional_id("webhook_id", &req.webhook_id)?;
        if !req.user_id.is_empty() && !req.webhook_id.is_empty() {
            return Err(StorageError::InvalidRequest(
                "user_id and webhook_id exclude each other".into(),
            ));
        }
        let page = req
            .request
            .ok_or_else(|| StorageError::InvalidRequest("request is required".into()))?;
        rules::validate_id("conversation_id", &page.conversation_id)?;
        let direction = match page.direction.as_str() {
            "" | "backward" => Direction::Backward,
            "forward" => Direction::Forward,
            other => {
                return Err(StorageError::InvalidRequest(format!(
                    "direction must be \"backward\" or \"forward\", not {other:?}"
                )))
            }
        };
        let query = PageQuery {
            conversation_id: page.conversation_id,
            from_seq: page.from_seq,
            direction,
            limit: rules::history_limit(page.limit, self.settings.max_page),
        };
        let backward = direction == Direction::Backward;
        if req.user_id.is_empty() {
            // Internal: the conversation must exist (an empty page would hide a typo).
            self.store.last_seq(&query.conversation_id).await?;
        } else if !self
            .store
            .is_member(&query.conversation_id, &req.user_id)
            .await?
        {
            return Err(StorageError::not_member(
                &query.conversation_id,
                &req.user_id,
            ));
        }
        let store = Arc::clone(&self.store);
        let (page, coalesced) = self
            .history_flights
            .run(query.clone(), || async move {
                store.history_page(&query).await.map(Arc::new)
            })
            .await;
        if coalesced {
            self.metrics.coalesced_reads.inc();
        }
        let mut page = page.map(|p| HistoryResult::clone(&p))?;
        if !req.user_id.is_empty() {
            self.mark_mine(&page.conversation_id, &req.user_id, &mut page.messages)
                .await?;
        }
        if rules::trim_page(&mut page.messages, backward, self.message_budget()) {
            page.has_more = true;
        }
        if !req.webhook_id.is_empty() {
            self.cut_for_webhook(&req.webhook_id, &mut page).await?;
        }
        Ok(page)
    }

    /// A page read to deliver a webhook: `NotFound` when the webhook is gone; cut
    /// before the first event that takes its creator's right to it. When that event
    /// comes first, or the creator lacks the right now, the webhook is removed and
    /// the answer is `NotFound`: it never delivers what was sent after the loss.
    async fn cut_for_webhook(&self, webhook_id: &str, page: &mut HistoryResult) -> Result<()> {
        let id = page.conversation_id.clone();
        let hook = self
            .store
            .list_webhooks(Some(&id))
            .await?
            .into_iter()
            .find(|w| w.webhook_id == webhook_id)
            .ok_or_else(|| StorageError::NotFound(format!("webhook {webhook_id}")))?;
        let revoked_at = page
            .messages
            .iter()
            .position(|m| rules::webhook_rights_revoked(m).contains(&hook.created_by.as_str()));
        match revoked_at {
            Some(at) if at > 0 => {
                page.messages.truncate(at);
                page.has_more = true;
                return Ok(());
            }
            Some(_) => {}
            None => {
                let conv = self.store.get_conversation(&id).await?;
                if rules::authorize_webhook_admin(&conv, &hook.created_by).is_ok() {
                    return Ok(());
                }
            }
        }
        self.remove_webhook(&id, webhook_id).await?;
        Err(StorageError::NotFound(format!(
            "webhook {webhook_id} was removed: its creator lost the right to it"
        )))
    }

    /// Remove a webhook whose creator lost the right to it (gone already is fine).
    async fn remove_webhook(&self, conversation_id: &str, webhook_id: &str) -> Result<()> {
        match self.store.delete_webhook(conversation_id, webhook_id).await {
            Ok(()) | Err(StorageError::NotFound(_)) => {
                tracing::info!(
                    conversation_id,
                    webhook_id,
                    "webhook removed: its creator lost the right to it"
                );
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// After `event` was stored: remove the webhooks created by users it takes the
    /// right away from. The delivery read ([`Self::cut_for_webhook`]) stops at the
    /// event anyway, so a failure here leaks nothing; it is logged and retried there.
    async fn remove_revoked_webhooks(&self, event: &Message) {
        let revoked = rules::webhook_rights_revoked(event);
        if revoked.is_empty() {
            return;
        }
        let id = &event.conversation_id;
        let hooks = match self.store.list_webhooks(Some(id)).await {
            Ok(hooks) => hooks,
            Err(e) => {
                tracing::warn!(conversation_id = %id, error = %e, "listing webhooks to remove failed");
                return;
            }
        };
        for hook in hooks
            .iter()
            .filter(|w| revoked.contains(&w.created_by.as_str()))
        {
            if let Err(e) = self.remove_webhook(id, &hook.webhook_id).await {
                tracing::warn!(
                    conversation_id = %id,
                    webhook_id = %hook.webhook_id,
                    error = %e,
                    "removing a webhook whose creator lost the right failed"
                );
            }
        }
    }

    /// Set `ReactionCount.mine` for `reader` on messages of one conversation.
    async fn mark_mine(
        &self,
        conversation_id: &str,
        reader: &str,
        messages: &mut [Message],
    ) -> Result<()> {
        let reacted = messages.iter().filter(|m| !m.reactions.is_empty());
        let (Some(low), Some(high)) = (
            reacted.clone().map(|m| m.seq).min(),
            reacted.map(|m| m.seq).max(),
        ) else {
            return Ok(());
        };
        let mine = self
            .store
            .my_reactions(conversation_id, reader, low, high)
            .await?;
        if mine.is_empty() {
            return Ok(());
        }
        for m in messages.iter_mut() {
            for r in &mut m.reactions {
                r.mine = mine
                    .iter()
                    .any(|(seq, emoji)| *seq == m.seq && *emoji == r.emoji);
            }
        }
        Ok(())
    }

    /// What a user missed: changed and unknown conversations with their messages after
    /// the client's cursors. Cursors of conversations the user is not in are ignored.
    pub async fn sync(&self, req: StorageSyncRequest) -> Result<SyncResult> {
        rules::validate_id("user_id", &req.user_id)?;
        let sync = req.request.unwrap_or_default();
        let mut cursors = HashMap::with_capacity(sync.cursors.len());
        for cursor in sync.cursors {
            let seq = cursors.entry(cursor.conversation_id).or_insert(0);
            *seq = cursor.last_seq.max(*seq);
        }
        let limit = rules::sync_limit(sync.limit_per_conversation);
        let mut result = self.store.sync(&req.user_id, &cursors, limit).await?;
        let now_ms = self.now_ms();
        for conv in &mut result.conversations {
            conv.muted_until_ms = rules::active_until(conv.muted_until_ms, now_ms);
        }
        // Messages come grouped by conversation, each group in sequence order.
        let mut start = 0;
        while start < result.messages.len() {
            let id = result.messages[start].conversation_id.clone();
            let len = result.messages[start..]
                .iter()
                .take_while(|m| m.conversation_id == id)
                .count();
            self.mark_mine(&id, &req.user_id, &mut result.messages[start..start + len])
                .await?;
            start += len;
        }
        rules::trim_sync(&mut result, self.message_budget());
        result.dnd_until_ms =
            rules::active_until(self.store.dnd_until(&req.user_id).await?, now_ms);
        Ok(result)
    }

    /// Raise a member's read or delivered marker (clamped to `last_seq`, never lowered).
    pub async fn set_read_marker(&self, req: SetReadMarkerRequest) -> Result<ReadMarker> {
        rules::validate_id("conversation_id", &req.conversation_id)?;
        rules::validate_id("user_id", &req.user_id)?;
        let kind = MarkerKind::parse(&req.kind).ok_or_else(|| {
            StorageError::InvalidRequest(format!(
                "kind must be \"read\" or \"delivered\", not {:?}",
                req.kind
            ))
        })?;
        let (id, user, now_ms) = (&req.conversation_id, &req.user_id, self.now_ms());
        let marker = match kind {
            MarkerKind::Read => self.store.set_read_marker(id, user, req.seq, now_ms).await,
            MarkerKind::Delivered => {
                self.store
                    .set_delivered_marker(id, user, req.seq, now_ms)
                    .await
            }
        };
        hide_unknown(marker, id, user)
    }

    /// Fails with the error the client gets when `event` may not be appended now.
    pub async fn authorize(&self, req: AuthorizeRequest) -> Result<AuthorizeResponse> {
        let event = req
            .message
            .ok_or_else(|| StorageError::InvalidRequest("message is required".into()))?;
        rules::validate_event(&event)?;
        let conversation = self
            .conversation_for(&event.conversation_id, &event.sender_id)
            .await?;
        let id = event.conversation_id.as_str();
        let at = |seq: u64| async move {
            if seq == 0 {
                Ok(None)
            } else {
                self.store.message_at(id, seq).await
            }
        };
        let targeted = matches!(
            event.kind.as_str(),
            kinds::EDIT | kinds::DELETE | kinds::REACTION
        );
        let target = if targeted {
            at(event.target_seq).await?
        } else {
            None
        };
        let reply_to = at(event.reply_to_seq).await?;
        let thread_root = at(event.thread_root_seq).await?;
        let banned = match &event.system {
            Some(system)
                if event.kind == kinds::SYSTEM && system.action == actions::MEMBERS_ADDED =>
            {
                self.store.banned_among(id, &system.user_ids).await?
            }
            _ => Vec::new(),
        };
        rules::authorize_event(
            &event,
            &rules::EventFacts {
                conversation: &conversation,
                target: target.as_ref(),
                reply_to: reply_to.as_ref(),
                thread_root: thread_root.as_ref(),
                banned: &banned,
            },
        )?;
        Ok(AuthorizeResponse {})
    }

    /// `NotMember` unless `user_id` is a member (also for an unknown conversation).
    async fn require_member(&self, conversation_id: &str, user_id: &str) -> Result<()> {
        if self.store.is_member(conversation_id, user_id).await? {
            Ok(())
        } else {
            Err(StorageError::not_member(conversation_id, user_id))
        }
    }

    /// A thread's root and a page of its replies, for a member.
    pub async fn thread(&self, req: StorageThreadRequest) -> Result<ThreadResult> {
        rules::validate_id("user_id", &req.user_id)?;
        let thread = req
            .request
            .ok_or_else(|| StorageError::InvalidRequest("request is required".into()))?;
        rules::validate_id("conversation_id", &thread.conversation_id)?;
        if thread.root_seq == 0 || i64::try_from(thread.root_seq).is_err() {
            return Err(StorageError::InvalidRequest(format!(
                "root_seq {} is out of range",
                thread.root_seq
            )));
        }
        self.require_member(&thread.conversation_id, &req.user_id)
            .await?;
        let page = self
            .store
            .thread_page(&ThreadQuery {
                conversation_id: thread.conversation_id.clone(),
                root_seq: thread.root_seq,
                from_seq: thread.from_seq.min(i64::MAX as u64),
                limit: rules::thread_limit(thread.limit),
            })
            .await?;
        let mut messages = Vec::with_capacity(page.replies.len() + 1);
        messages.push(page.root);
        messages.extend(page.replies);
        self.mark_mine(&thread.conversation_id, &req.user_id, &mut messages)
            .await?;
        let root = messages.remove(0);
        let budget = self
            .message_budget()
            .saturating_sub(rules::encoded_bytes(&root));
        let cut = rules::trim_page(&mut messages, false, budget);
        Ok(ThreadResult {
            conversation_id: thread.conversation_id,
            root: Some(root),
            replies: messages,
            has_more: page.has_more || cut,
        })
    }

    /// Receipts of one message (0 = the latest) and every member's markers, for a member.
    pub async fn receipts(&self, req: StorageReceiptsRequest) -> Result<ReceiptsResult> {
        rules::validate_id("user_id", &req.user_id)?;
        let receipts = req
            .request
            .ok_or_else(|| StorageError::InvalidRequest("request is required".into()))?;
        let id = receipts.conversation_id.as_str();
        rules::validate_id("conversation_id", id)?;
        self.require_member(id, &req.user_id).await?;
        let last_seq = self.store.last_seq(id).await?;
        let seq = if receipts.seq == 0 {
            last_seq
        } else {
            receipts.seq
        };
        if seq > last_seq {
            return Err(StorageError::NotFound(format!("message {seq}")));
        }
        let members = self.store.receipts(id).await?;
        let (read_by, delivered_to) = if seq == 0 {
            (0, 0)
        } else {
            let sender = self
                .store
                .message_at(id, seq)
                .await?
                .map(|m| m.sender_id)
                .unwrap_or_default();
            rules::receipt_counts(&members, &sender, seq)
        };
        Ok(ReceiptsResult {
            conversation_id: receipts.conversation_id,
            seq,
            read_by,
            delivered_to,
            members,
        })
    }

    /// Mute a conversation (member) or set the user's do-not-disturb.
    pub async fn set_notification(
        &self,
        req: SetNotificationRequest,
    ) -> Result<SetNotificationResponse> {
        rules::validate_id("user_id", &req.user_id)?;
        rules::validate_optional_id("conversation_id", &req.conversation_id)?;
        rules::validate_until(req.until_ms)?;
        if !req.conversation_id.is_empty() {
            self.require_member(&req.conversation_id, &req.user_id)
                .await?;
        }
        self.store
            .set_notification(&req.user_id, &req.conversation_id, req.until_ms)
            .await?;
        Ok(SetNotificationResponse {})
    }

    /// Which members to notify of a new message, and which are silenced.
    pub async fn notification_targets(
        &self,
        req: NotificationTargetsRequest,
    ) -> Result<NotificationTargetsResponse> {
        rules::validate_id("conversation_id", &req.conversation_id)?;
        rules::validate_optional_id("sender_id", &req.sender_id)?;
        let now_ms = if req.now_ms > 0 {
            req.now_ms
        } else {
            self.now_ms()
        };
        let members = self.store.notification_state(&req.conversation_id).await?;
        let (notify, silenced) =
            rules::notification_targets(&members, &req.sender_id, &req.mentions, now_ms);
        Ok(NotificationTargetsResponse { notify, silenced })
    }

    /// Which of `other_ids` share a conversation with `user_id`.
    pub async fn shared_contacts(
        &self,
        req: SharedContactsRequest,
    ) -> Result<SharedContactsResponse> {
        rules::validate_id("user_id", &req.user_id)?;
        let others = rules::dedup_ids("other_ids", &req.other_ids)?;
        if others.len() > rules::MAX_MEMBERS {
            return Err(StorageError::InvalidRequest(format!(
                "at most {} other_ids",
                rules::MAX_MEMBERS
            )));
        }
        let shared = self.store.shared_contacts(&req.user_id, &others).await?;
        Ok(SharedContactsResponse { shared })
    }

    /// Add a webhook (group owner/admin, or a member of a direct conversation).
    pub async fn put_webhook(&self, req: PutWebhookRequest) -> Result<Webhook> {
        rules::validate_id("conversation_id", &req.conversation_id)?;
        rules::validate_id("actor_id", &req.actor_id)?;
        rules::validate_webhook_url(&req.url)?;
        let conv = self
            .conversation_for(&req.conversation_id, &req.actor_id)
            .await?;
        rules::authorize_webhook_admin(&conv, &req.actor_id)?;
        let hook = self
            .store
            .put_webhook(NewWebhook {
                webhook_id: uuid::Uuid::now_v7().to_string(),
                conversation_id: req.conversation_id,
                url: req.url,
                secret: new_secret()?,
                created_by: req.actor_id,
                created_at_ms: self.now_ms(),
                max_per_conversation: rules::MAX_WEBHOOKS,
            })
            .await?;
        tracing::info!(
            conversation_id = %hook.conversation_id,
            webhook_id = %hook.webhook_id,
            "webhook added"
        );
        Ok(hook)
    }

    /// A conversation's webhooks for a member (secrets only for owner/admin; the URL in
    /// full only for them and the webhook's creator, others see its origin), or,
    /// with an empty actor (internal callers), with secrets; with an empty
    /// conversation and actor, every webhook.
    pub async fn list_webhooks(&self, req: ListWebhooksRequest) -> Result<ListWebhooksResponse> {
        rules::validate_optional_id("conversation_id", &req.conversation_id)?;
        rules::validate_optional_id("actor_id", &req.actor_id)?;
        if req.conversation_id.is_empty() {
            if !req.actor_id.is_empty() {
                return Err(StorageError::InvalidRequest(
                    "conversation_id is required".into(),
                ));
            }
            let webhooks = self.store.list_webhooks(None).await?;
            return Ok(ListWebhooksResponse { webhooks });
        }
        let conv = self
            .conversation_for(&req.conversation_id, &req.actor_id)
            .await?;
        let mut show_secrets = true;
        if !req.actor_id.is_empty() {
            if rules::role_of(&conv, &req.actor_id).is_none() {
                return Err(StorageError::not_member(
                    &req.conversation_id,
                    &req.actor_id,
                ));
            }
            show_secrets = rules::authorize_webhook_admin(&conv, &req.actor_id).is_ok();
        }
        let mut webhooks = self.store.list_webhooks(Some(&req.conversation_id)).await?;
        for hook in &mut webhooks {
            hook.suspended = rules::authorize_webhook_admin(&conv, &hook.created_by).is_err();
        }
        if !show_secrets {
            for hook in &mut webhooks {
                hook.secret.clear();
                if hook.created_by != req.actor_id {
                    hook.url = rules::webhook_url_origin(&hook.url);
                }
            }
        }
        Ok(ListWebhooksResponse { webhooks })
    }

    /// Delete a webhook (who may add one may delete one).
    pub async fn delete_webhook(&self, req: DeleteWebhookRequest) -> Result<DeleteWebhookResponse> {
        rules::validate_id("conversation_id", &req.conversation_id)?;
        rules::validate_id("actor_id", &req.actor_id)?;
        rules::validate_id("webhook_id", &req.webhook_id)?;
        let conv = self
            .conversation_for(&req.conversation_id, &req.actor_id)
            .await?;
        rules::authorize_webhook_admin(&conv, &req.actor_id)?;
        self.store
            .delete_webhook(&req.conversation_id, &req.webhook_id)
            .await?;
        tracing::info!(
            conversation_id = %req.conversation_id,
            webhook_id = %req.webhook_id,
            "webhook deleted"
        );
        Ok(DeleteWebhookResponse {})
    }

    /// Record the highest sequence delivered to a webhook (never lowered).
    pub async fn advance_webhook(&self, req: AdvanceWebhookRequest) -> Result<Webhook> {
        rules::validate_id("conversation_id", &req.conversation_id)?;
        rules::validate_id("webhook_id", &req.webhook_id)?;
        if i64::try_from(req.delivered_seq).is_err() {
            return Err(StorageError::InvalidRequest(
                "delivered_seq is out of range".into(),
            ));
        }
        self.store
            .advance_webhook(&req.conversation_id, &req.webhook_id, req.delivered_seq)
            .await
    }

    /// True when the store's dedupe keys expire by themselves (no purge needed).
    pub fn dedupe_keys_expire_by_themselves(&self) -> bool {
        self.store.dedupe_keys_expire_by_themselves()
    }

    /// Delete every dedupe key older than the window; returns how many (none for a
    /// store whose keys expire by themselves).
    pub async fn purge_expired_dedupe(&self) -> Result<u64> {
        let before = self.dedupe_since_ms();
        let mut total = 0;
        loop {
            let deleted = self.store.purge_dedupe(before, PURGE_BATCH).await?;
            total += deleted;
            self.metrics.dedupe_purged.inc_by(deleted);
            if deleted < u64::from(PURGE_BATCH) {
                return Ok(total);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn history_participants(&self, query: &PageQuery) -> usize {
        self.history_flights.participants(query)
    }
}

/// `NotFound` of the conversation itself as `NotMember` when a user asked (see
/// [`StorageService::conversation_for`]); internal callers (empty `user_id`) keep it.
fn hide_unknown<T>(result: Result<T>, conversation_id: &str, user_id: &str) -> Result<T> {
    match result {
        Err(StorageError::NotFound(_)) if !user_id.is_empty() => {
            Err(StorageError::not_member(conversation_id, user_id))
        }
        other => other,
    }
}

/// A webhook secret: 32 random bytes, lowercase hex.
fn new_secret() -> Result<String> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| StorageError::Internal("no randomness for a webhook secret".into()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Purge expired dedupe keys every `every` until `stop` is cancelled; nothing to do
/// (the task ends at once) for a store whose keys expire by themselves.
pub fn spawn_dedupe_purger(
    service: Arc<StorageService>,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if service.dedupe_keys_expire_by_themselves() {
            return;
        }
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            // A purge in progress finishes its current batch before the stop is seen.
            match service.purge_expired_dedupe().await {
                Ok(0) => {}
                Ok(purged) => tracing::debug!(purged, "expired dedupe keys purged"),
                Err(e) => tracing::warn!(error = %e, "dedupe purge failed"),
            }
        }
    })
}

/// Most events in one `AppendBatch` (the partition owner sends at most a poll).
pub const MAX_APPEND_BATCH: usize = 512;

fn check_seq(seq: u64) -> Result<()> {
    if seq == 0 || i64::try_from(seq).is_err() {
        return Err(StorageError::InvalidRequest(format!(
            "seq {seq} is out of range"
        )));
    }
    Ok(())
}

/// Validate an event to append and fill what the owner may leave to storage (the
/// message id, the time).
fn prepare_append(mut message: Message, now_ms: i64) -> Result<Message> {
    rules::validate_id("conversation_id", &message.conversation_id)?;
    rules::validate_id("sender_id", &message.sender_id)?;
    rules::validate_optional_id("client_msg_id", &message.client_msg_id)?;
    rules::validate_optional_id("sender_device", &message.sender_device)?;
    if message.message_id.is_empty() {
        message.message_id = uuid::Uuid::now_v7().to_string();
    }
    if message.sent_at_ms == 0 {
        message.sent_at_ms = now_ms;
    }
    Ok(message)
}

/// The gRPC face of [`StorageService`].
#[derive(Clone)]
pub struct StorageGrpc {
    service: Arc<StorageService>,
}

impl StorageGrpc {
    pub fn new(service: Arc<StorageService>) -> Self {
        StorageGrpc { service }
    }
}

fn reply<T>(result: Result<T>) -> std::result::Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl Storage for StorageGrpc {
    async fn authorize(
        &self,
        request: Request<AuthorizeRequest>,
    ) -> std::result::Result<Response<AuthorizeResponse>, Status> {
        reply(self.service.authorize(request.into_inner()).await)
    }

    async fn thread(
        &self,
        request: Request<StorageThreadRequest>,
    ) -> std::result::Result<Response<ThreadResult>, Status> {
        reply(self.service.thread(request.into_inner()).await)
    }

    async fn receipts(
        &self,
        request: Request<StorageReceiptsRequest>,
    ) -> std::result::Result<Response<ReceiptsResult>, Status> {
        reply(self.service.receipts(request.into_inner()).await)
    }

    async fn set_notification(
        &self,
        request: Request<SetNotificationRequest>,
    ) -> std::result::Result<Response<SetNotificationResponse>, Status> {
        reply(self.service.set_notification(request.into_inner()).await)
    }

    async fn notification_targets(
        &self,
        request: Request<NotificationTargetsRequest>,
    ) -> std::result::Result<Response<NotificationTargetsResponse>, Status> {
        reply(
            self.service
                .notification_targets(request.into_inner())
                .await,
        )
    }

    async fn shared_contacts(
        &self,
        request: Request<SharedContactsRequest>,
    ) -> std::result::Result<Response<SharedContactsResponse>, Status> {
        reply(self.service.shared_contacts(request.into_inner()).await)
    }

    async fn put_webhook(
        &self,
        request: Request<PutWebhookRequest>,
    ) -> std::result::Result<Response<Webhook>, Status> {
        reply(self.service.put_webhook(request.into_inner()).await)
    }

    async fn list_webhooks(
        &self,
        request: Request<ListWebhooksRequest>,
    ) -> std::result::Result<Response<ListWebhooksResponse>, Status> {
        reply(self.service.list_webhooks(request.into_inner()).await)
    }

    async fn delete_webhook(
        &self,
        request: Request<DeleteWebhookRequest>,
    ) -> std::result::Result<Response<DeleteWebhookResponse>, Status> {
        reply(self.service.delete_webhook(request.into_inner()).await)
    }

    async fn advance_webhook(
        &self,
        request: Request<AdvanceWebhookRequest>,
    ) -> std::result::Result<Response<Webhook>, Status> {
        reply(self.service.advance_webhook(request.into_inner()).await)
    }

    async fn create_conversation(
        &self,
        request: Request<CreateConversationRequest>,
    ) -> std::result::Result<Response<Conversation>, Status> {
        reply(self.service.create_conversation(request.into_inner()).await)
    }

    async fn get_conversation(
        &self,
        request: Request<GetConversationRequest>,
    ) -> std::result::Result<Response<Conversation>, Status> {
        reply(self.service.get_conversation(request.into_inner()).await)
    }

    async fn change_members(
        &self,
        request: Request<ChangeMembersRequest>,
    ) -> std::result::Result<Response<Conversation>, Status> {
        reply(self.service.change_members(request.into_inner()).await)
    }

    async fn list_conversations(
        &self,
        request: Request<ListConversationsRequest>,
    ) -> std::result::Result<Response<ConversationListResult>, Status> {
        reply(self.service.list_conversations(request.into_inner()).await)
    }

    async fn last_seq(
        &self,
        request: Request<LastSeqRequest>,
    ) -> std::result::Result<Response<LastSeqResponse>, Status> {
        reply(self.service.last_seq(request.into_inner()).await)
    }

    async fn append(
        &self,
        request: Request<AppendRequest>,
    ) -> std::result::Result<Response<AppendResponse>, Status> {
        // Child of the partition owner's `routing.sequence` span.
        let message = request.get_ref().message.as_ref();
        let span = tracing::info_span!(
            "storage.Append",
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            service = "storage",
            conversation_id = message.map_or("", |m| m.conversation_id.as_str()),
            seq = message.map_or(0, |m| m.seq),
            duplicate = tracing::field::Empty,
        );
        switchboard_telemetry::set_parent(
            &span,
            switchboard_telemetry::extract(request.metadata()),
        );
        let result = self
            .service
            .append(request.into_inner())
            .instrument(span.clone())
            .await;
        match &result {
            Ok(r) => span.record("duplicate", r.duplicate),
            Err(_) => span.record("otel.status_code", "error"),
        };
        reply(result)
    }

    async fn append_batch(
        &self,
        request: Request<AppendBatchRequest>,
    ) -> std::result::Result<Response<AppendBatchResponse>, Status> {
        // Child of the `routing.sequence` span of the batch's first record.
        let first = request.get_ref().messages.first();
        let span = tracing::info_span!(
            "storage.AppendBatch",
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            service = "storage",
            conversation_id = first.map_or("", |m| m.conversation_id.as_str()),
            first_seq = request.get_ref().first_seq,
            messages = request.get_ref().messages.len(),
            duplicates = tracing::field::Empty,
        );
        switchboard_telemetry::set_parent(
            &span,
            switchboard_telemetry::extract(request.metadata()),
        );
        let result = self
            .service
            .append_batch(request.into_inner())
            .instrument(span.clone())
            .await;
        match &result {
            Ok(r) => span.record(
                "duplicates",
                r.results.iter().filter(|r| r.duplicate).count(),
            ),
            Err(_) => span.record("otel.status_code", "error"),
        };
        reply(result)
    }

    async fn lookup_dedupe(
        &self,
        request: Request<LookupDedupeRequest>,
    ) -> std::result::Result<Response<LookupDedupeResponse>, Status> {
        reply(self.service.lookup_dedupe(request.into_inner()).await)
    }

    async fn history(
        &self,
        request: Request<StorageHistoryRequest>,
    ) -> std::result::Result<Response<HistoryResult>, Status> {
        reply(self.service.history(request.into_inner()).await)
    }

    async fn sync(
        &self,
        request: Request<StorageSyncRequest>,
    ) -> std::result::Result<Response<SyncResult>, Status> {
        reply(self.service.sync(request.into_inner()).await)
    }

    async fn set_read_marker(
        &self,
        request: Request<SetReadMarkerRequest>,
    ) -> std::result::Result<Response<ReadMarker>, Status> {
        reply(self.service.set_read_marker(request.into_inner()).await)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use async_trait::async_trait;
    use switchboard_proto::{ErrorCode, Message};
    use tokio::sync::oneshot;

    use crate::conformance::{Harness, StoreFactory};
    use crate::sqlite::tests::SqliteFactory;
    use crate::store::{Appended, MemberChange, MemberNotification, NewConversation, ThreadPage};
    use switchboard_proto::MemberReceipt;

    /// Counts history queries and holds the first one until released.
    struct GatedStore {
        inner: Arc<dyn HistoryStore>,
        history_calls: AtomicUsize,
        gate: Mutex<Option<oneshot::Receiver<()>>>,
    }

    #[async_trait]
    impl HistoryStore for GatedStore {
        async fn create_conversation(&self, new: NewConversation) -> Result<Conversation> {
            self.inner.create_conversation(new).await
        }
        async fn get_conversation(&self, id: &str) -> Result<Conversation> {
            self.inner.get_conversation(id).await
        }
        async fn is_member(&self, id: &str, user: &str) -> Result<bool> {
            self.inner.is_member(id, user).await
        }
        async fn change_members(&self, change: MemberChange) -> Result<Conversation> {
            self.inner.change_members(change).await
        }
        async fn list_conversations(&self, user: &str) -> Result<Vec<Conversation>> {
            self.inner.list_conversations(user).await
        }
        async fn last_seq(&self, id: &str) -> Result<u64> {
            self.inner.last_seq(id).await
        }
        async fn append(&self, m: Message, since: i64, now: i64) -> Result<Appended> {
            self.inner.append(m, since, now).await
        }
        async fn append_batch(
            &self,
            m: Vec<Message>,
            first: u64,
            since: i64,
            now: i64,
        ) -> Result<Vec<Appended>> {
            self.inner.append_batch(m, first, since, now).await
        }
        async fn lookup_dedupe(&self, s: &str, c: &str, since: i64) -> Result<Option<Message>> {
            self.inner.lookup_dedupe(s, c, since).await
        }
        async fn history_page(&self, query: &PageQuery) -> Result<HistoryResult> {
            self.history_calls.fetch_add(1, Ordering::SeqCst);
            let gate = self.gate.lock().unwrap().take();
            if let Some(gate) = gate {
                let _ = gate.await;
            }
            self.inner.history_page(query).await
        }
        async fn sync(&self, u: &str, c: &HashMap<String, u64>, l: u32) -> Result<SyncResult> {
            self.inner.sync(u, c, l).await
        }
        async fn set_read_marker(&self, id: &str, u: &str, s: u64, now: i64) -> Result<ReadMarker> {
            self.inner.set_read_marker(id, u, s, now).await
        }
        async fn purge_dedupe(&self, before: i64, max: u32) -> Result<u64> {
            self.inner.purge_dedupe(before, max).await
        }
        fn dedupe_keys_expire_by_themselves(&self) -> bool {
            self.inner.dedupe_keys_expire_by_themselves()
        }
        async fn set_delivered_marker(
            &self,
            conversation_id: &str,
            user_id: &str,
            seq: u64,
            now_ms: i64,
        ) -> Result<ReadMarker> {
            self.inner
                .set_delivered_marker(conversation_id, user_id, seq, now_ms)
                .await
        }
        async fn message_at(&self, conversation_id: &str, seq: u64) -> Result<Option<Message>> {
            self.inner.message_at(conversation_id, seq).await
        }
        async fn banned_among(
            &self,
            conversation_id: &str,
            user_ids: &[String],
        ) -> Result<Vec<String>> {
            self.inner.banned_among(conversation_id, user_ids).await
        }
        async fn my_reactions(
            &self,
            conversation_id: &str,
            user_id: &str,
            from_seq: u64,
            to_seq: u64,
        ) -> Result<Vec<(u64, String)>> {
            self.inner
                .my_reactions(conversation_id, user_id, from_seq, to_seq)
                .await
        }
        async fn thread_page(&self, query: &ThreadQuery) -> Result<ThreadPage> {
            self.inner.thread_page(query).await
        }
        async fn receipts(&self, conversation_id: &str) -> Result<Vec<MemberReceipt>> {
            self.inner.receipts(conversation_id).await
        }
        async fn set_notification(
            &self,
            user_id: &str,
            conversation_id: &str,
            until_ms: i64,
        ) -> Result<()> {
            self.inner
                .set_notification(user_id, conversation_id, until_ms)
                .await
        }
        async fn dnd_until(&self, user_id: &str) -> Result<i64> {
            self.inner.dnd_until(user_id).await
        }
        async fn notification_state(
            &self,
            conversation_id: &str,
        ) -> Result<Vec<MemberNotification>> {
            self.inner.notification_state(conversation_id).await
        }
        async fn shared_contacts(
            &self,
            user_id: &str,
            other_ids: &[String],
        ) -> Result<Vec<String>> {
            self.inner.shared_contacts(user_id, other_ids).await
        }
        async fn put_webhook(&self, webhook: NewWebhook) -> Result<Webhook> {
            self.inner.put_webhook(webhook).await
        }
        async fn list_webhooks(&self, conversation_id: Option<&str>) -> Result<Vec<Webhook>> {
            self.inner.list_webhooks(conversation_id).await
        }
        async fn delete_webhook(&self, conversation_id: &str, webhook_id: &str) -> Result<()> {
            self.inner.delete_webhook(conversation_id, webhook_id).await
        }
        async fn advance_webhook(
            &self,
            conversation_id: &str,
            webhook_id: &str,
            delivered_seq: u64,
        ) -> Result<Webhook> {
            self.inner
                .advance_webhook(conversation_id, webhook_id, delivered_seq)
                .await
        }
    }

    #[tokio::test]
    async fn identical_concurrent_history_reads_share_one_backend_query() {
        let factory = SqliteFactory::new();
        identical_concurrent_reads_share_one_query(factory.open().await).await;
    }

    /// Sixteen members ask for the same page at once through the service: one backend
    /// query answers all of them. Run for every backend.
    pub(crate) async fn identical_concurrent_reads_share_one_query(inner: Arc<dyn HistoryStore>) {
        const READERS: usize = 16;
        let (release_tx, release_rx) = oneshot::channel();
        let gated = Arc::new(GatedStore {
            inner,
            history_calls: AtomicUsize::new(0),
            gate: Mutex::new(Some(release_rx)),
        });
        let h = Harness::over(gated.clone(), 200);
        let users: Vec<String> = (0..READERS).map(|i| format!("user{i}")).collect();
        let user_refs: Vec<&str> = users.iter().map(String::as_str).collect();
        let id = h.group("user0", &user_refs, "hot").await.conversation_id;
        h.fill(&id, "user1", 10).await;

        let request = |user: &str| StorageHistoryRequest {
            user_id: user.into(),
            request: Some(switchboard_proto::HistoryRequest {
                conversation_id: id.clone(),
                from_seq: 0,
                direction: String::new(),
                limit: 5,
            }),
            webhook_id: String::new(),
        };
        let tasks: Vec<_> = users
            .iter()
            .map(|user| {
                let (svc, req) = (Arc::clone(&h.svc), request(user));
                tokio::spawn(async move { svc.history(req).await })
            })
            .collect();
        let key = PageQuery {
            conversation_id: id.clone(),
            from_seq: 0,
            direction: Direction::Backward,
            limit: 5,
        };
        // Every reader has passed its membership check and joined the one query,
        // which is held by the gate.
        while h.svc.history_participants(&key) < READERS {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // A non-member asking for the same page is refused, not served from the flight.
        let outsider = h.svc.history(request("eve")).await;
        assert_eq!(outsider.unwrap_err().code(), ErrorCode::NotMember);

        release_tx.send(()).unwrap();
        for task in tasks {
            let page = task.await.unwrap().unwrap();
            let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
            assert_eq!((seqs, page.has_more), (vec![6, 7, 8, 9, 10], true));
        }
        assert_eq!(gated.history_calls.load(Ordering::SeqCst), 1);
        assert_eq!(h.metrics.coalesced_reads.get(), READERS as u64 - 1);

        // Once answered, the page is not cached: the next request reads again.
        h.fill(&id, "user1", 1).await;
        let page = h.svc.history(request("user3")).await.unwrap();
        assert_eq!(page.messages.last().map(|m| m.seq), Some(11));
        assert_eq!(gated.history_calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_purger_deletes_expired_keys_and_stops_on_cancel() {
        let factory = SqliteFactory::new();
        let h = Harness::over(factory.open().await, 200);
        let id = h.direct("alice", "bob").await.conversation_id;
        h.append(&id, 1, "alice", "k").await.unwrap();
        h.advance(crate::conformance::WINDOW_MS + 1);

        let stop = CancellationToken::new();
        let purger = spawn_dedupe_purger(Arc::clone(&h.svc), PURGE_INTERVAL, stop.clone());
        // The first tick is immediate; wait for its purge to land in the metric.
        while h.metrics.dedupe_purged.get() == 0 {
            tokio::task::yield_now().await;
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert_eq!(h.metrics.dedupe_purged.get(), 1);
        stop.cancel();
        purger.await.unwrap();
    }
}
