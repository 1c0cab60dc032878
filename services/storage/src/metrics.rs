//! The storage service's metrics, and a [`HistoryStore`] decorator that records every
//! backend operation's latency and errors.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};
use switchboard_proto::{
    Conversation, HistoryResult, MemberReceipt, Message, ReadMarker, SyncResult, Webhook,
};

use crate::error::Result;
use crate::store::{
    Appended, HistoryStore, MemberChange, MemberNotification, NewConversation, NewWebhook,
    PageQuery, ThreadPage, ThreadQuery,
};

/// Metrics of the storage service.
#[derive(Clone)]
pub struct StorageMetrics {
    /// Latency of each backend operation, by `op`.
    pub backend_seconds: HistogramVec,
    /// Failed backend operations, by `op` and client error `code` (rule outcomes such
    /// as `not_member` included, so dashboards filter by code).
    pub backend_errors: IntCounterVec,
    /// History requests answered by another request's backend query.
    pub coalesced_reads: IntCounter,
    /// Expired dedupe keys deleted by the purger.
    pub dedupe_purged: IntCounter,
}

impl StorageMetrics {
    /// Create the metrics and register them in `registry`.
    pub fn register(registry: &Registry) -> anyhow::Result<StorageMetrics> {
        let metrics = StorageMetrics {
            backend_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "switchboard_storage_backend_duration_seconds",
                    "latency of history store operations",
                )
                .buckets(switchboard_telemetry::latency_buckets()),
                &["op"],
            )?,
            backend_errors: IntCounterVec::new(
                Opts::new(
                    "switchboard_storage_backend_errors_total",
                    "failed history store operations",
                ),
                &["op", "code"],
            )?,
            coalesced_reads: IntCounter::new(
                "switchboard_storage_coalesced_reads_total",
                "history requests served by another identical request's backend query",
            )?,
            dedupe_purged: IntCounter::new(
                "switchboard_storage_dedupe_purged_total",
                "expired dedupe keys deleted",
            )?,
        };
        registry.register(Box::new(metrics.backend_seconds.clone()))?;
        registry.register(Box::new(metrics.backend_errors.clone()))?;
        registry.register(Box::new(metrics.coalesced_reads.clone()))?;
        registry.register(Box::new(metrics.dedupe_purged.clone()))?;
        Ok(metrics)
    }
}

/// A store that records latency and errors of the store it wraps.
pub struct Instrumented {
    inner: Arc<dyn HistoryStore>,
    metrics: StorageMetrics,
}

impl Instrumented {
    pub fn new(inner: Arc<dyn HistoryStore>, metrics: StorageMetrics) -> Self {
        Instrumented { inner, metrics }
    }

    async fn observe<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let started = Instant::now();
        let result = call.await;
        self.metrics
            .backend_seconds
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.metrics
                .backend_errors
                .with_label_values(&[op, e.code().as_str()])
                .inc();
        }
        result
    }
}

#[async_trait]
impl HistoryStore for Instrumented {
    async fn create_conversation(&self, new: NewConversation) -> Result<Conversation> {
        self.observe("create_conversation", self.inner.create_conversation(new))
            .await
    }

    async fn get_conversation(&self, conversation_id: &str) -> Result<Conversation> {
        self.observe(
            "get_conversation",
            self.inner.get_conversation(conversation_id),
        )
        .await
    }

    async fn is_member(&self, conversation_id: &str, user_id: &str) -> Result<bool> {
        self.observe("is_member", self.inner.is_member(conversation_id, user_id))
            .await
    }

    async fn change_members(&self, change: MemberChange) -> Result<Conversation> {
        self.observe("change_members", self.inner.change_members(change))
            .await
    }

    async fn list_conversations(&self, user_id: &str) -> Result<Vec<Conversation>> {
        self.observe("list_conversations", self.inner.list_conversations(user_id))
            .await
    }

    async fn last_seq(&self, conversation_id: &str) -> Result<u64> {
        self.observe("last_seq", self.inner.last_seq(conversation_id))
            .await
    }

    async fn append(
        &self,
        message: Message,
        dedupe_since_ms: i64,
        now_ms: i64,
    ) -> Result<Appended> {
        self.observe(
            "append",
            self.inner.append(message, dedupe_since_ms, now_ms),
        )
        .await
    }

    async fn append_batch(
        &self,
        messages: Vec<Message>,
        first_seq: u64,
        dedupe_since_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<Appended>> {
        self.observe(
            "append_batch",
            self.inner
                .append_batch(messages, first_seq, dedupe_since_ms, now_ms),
        )
        .await
    }

    async fn lookup_dedupe(
        &self,
        sender_id: &str,
        client_msg_id: &str,
        since_ms: i64,
    ) -> Result<Option<Message>> {
        self.observe(
            "lookup_dedupe",
            self.inner.lookup_dedupe(sender_id, client_msg_id, since_ms),
        )
        .await
    }

    async fn history_page(&self, query: &PageQuery) -> Result<HistoryResult> {
        self.observe("history_page", self.inner.history_page(query))
            .await
    }

    async fn sync(
        &self,
        user_id: &str,
        cursors: &HashMap<String, u64>,
        limit: u32,
    ) -> Result<SyncResult> {
        self.observe("sync", self.inner.sync(user_id, cursors, limit))
            .await
    }

    async fn set_read_marker(
        &self,
        conversation_id: &str,
        user_id: &str,
        seq: u64,
        now_ms: i64,
    ) -> Result<ReadMarker> {
        self.observe(
            "set_read_marker",
            self.inner
                .set_read_marker(conversation_id, user_id, seq, now_ms),
        )
        .await
    }

    async fn set_delivered_marker(
        &self,
        conversation_id: &str,
        user_id: &str,
        seq: u64,
        now_ms: i64,
    ) -> Result<ReadMarker> {
        self.observe(
            "set_delivered_marker",
            self.inner
                .set_delivered_marker(conversation_id, user_id, seq, now_ms),
        )
        .await
    }

    async fn message_at(&self, conversation_id: &str, seq: u64) -> Result<Option<Message>> {
        self.observe("message_at", self.inner.message_at(conversation_id, seq))
            .await
    }

    async fn banned_among(
        &self,
        conversation_id: &str,
        user_ids: &[String],
    ) -> Result<Vec<String>> {
        self.observe(
            "banned_among",
            self.inner.banned_among(conversation_id, user_ids),
        )
        .await
    }

    async fn my_reactions(
        &self,
        conversation_id: &str,
        user_id: &str,
        from_seq: u64,
        to_seq: u64,
    ) -> Result<Vec<(u64, String)>> {
        self.observe(
            "my_reactions",
            self.inner
                .my_reactions(conversation_id, user_id, from_seq, to_seq),
        )
        .await
    }

    async fn thread_page(&self, query: &ThreadQuery) -> Result<ThreadPage> {
        self.observe("thread_page", self.inner.thread_page(query))
            .await
    }

    async fn receipts(&self, conversation_id: &str) -> Result<Vec<MemberReceipt>> {
        self.observe("receipts", self.inner.receipts(conversation_id))
            .await
    }

    async fn set_notification(
        &self,
        user_id: &str,
        conversation_id: &str,
        until_ms: i64,
    ) -> Result<()> {
        self.observe(
            "set_notification",
            self.inner
                .set_notification(user_id, conversation_id, until_ms),
        )
        .await
    }

    async fn dnd_until(&self, user_id: &str) -> Result<i64> {
        self.observe("dnd_until", self.inner.dnd_until(user_id))
            .await
    }

    async fn notification_state(&self, conversation_id: &str) -> Result<Vec<MemberNotification>> {
        self.observe(
            "notification_state",
            self.inner.notification_state(conversation_id),
        )
        .await
    }

    async fn shared_contacts(&self, user_id: &str, other_ids: &[String]) -> Result<Vec<String>> {
        self.observe(
            "shared_contacts",
            self.inner.shared_contacts(user_id, other_ids),
        )
        .await
    }

    async fn put_webhook(&self, webhook: NewWebhook) -> Result<Webhook> {
        self.observe("put_webhook", self.inner.put_webhook(webhook))
            .await
    }

    async fn list_webhooks(&self, conversation_id: Option<&str>) -> Result<Vec<Webhook>> {
        self.observe("list_webhooks", self.inner.list_webhooks(conversation_id))
            .await
    }

    async fn delete_webhook(&self, conversation_id: &str, webhook_id: &str) -> Result<()> {
        self.observe(
            "delete_webhook",
            self.inner.delete_webhook(conversation_id, webhook_id),
        )
        .await
    }

    async fn advance_webhook(
        &self,
        conversation_id: &str,
        webhook_id: &str,
        delivered_seq: u64,
    ) -> Result<Webhook> {
        self.observe(
            "advance_webhook",
            self.inner
                .advance_webhook(conversation_id, webhook_id, delivered_seq),
        )
        .await
    }

    async fn purge_dedupe(&self, before_ms: i64, max_rows: u32) -> Result<u64> {
        self.observe("purge_dedupe", self.inner.purge_dedupe(before_ms, max_rows))
            .await
    }

    fn dedupe_keys_expire_by_themselves(&self) -> bool {
        self.inner.dedupe_keys_expire_by_themselves()
    }
}
