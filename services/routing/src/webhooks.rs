//! Outgoing webhooks: the conversation's new timeline events POSTed to the URLs its
//! members registered (storage `PutWebhook`), in order, at least once.
//!
//! The routing instance that owns a conversation's log partition dispatches its
//! webhooks, one worker task per webhook. The durable cursor is storage's
//! `delivered_seq`: a worker reads the events after it with storage `History`
//! (forward, [`BATCH`] at a time), POSTs them as one JSON batch, and records the
//! batch's last sequence with `AdvanceWebhook` after a 2xx answer. Anything else (a
//! status, a transport error, the timeout `routing.webhook_timeout_ms`) is retried
//! with jittered exponential backoff (1 s doubling to 5 min) forever, until the
//! webhook is deleted; nothing after a failed batch is sent before it. So a receiver
//! sees every event at least once and in sequence order (a batch is repeated when the
//! answer or the `AdvanceWebhook` after it was lost, or when a new owner took over
//! the partition meanwhile).
//!
//! Discovery: `ListWebhooks("", "")` at start, every [`DISCOVER_EVERY`], when the
//! set of owned partitions changes, and at once when the gateway says a webhook was
//! created or deleted (`Publish` with `webhooks_changed`, to the instance that takes
//! the call) starts workers for the webhooks of owned partitions and stops those of
//! webhooks that were deleted or whose partition left. A deleted webhook's worker
//! also finds it gone at its next storage read, which precedes every POST: after the
//! delete, at most the one POST whose events were read before it can still arrive.
//! The partition owner wakes a conversation's workers through [`WebhookWake`] when it
//! persisted an event, so delivery does not wait for a poll; an idle worker also looks
//! again every [`IDLE_RECHECK`] (events persisted by another instance before a
//! takeover).
//!
//! Bounds: one POST in flight per webhook, at most [`MAX_CONCURRENT_DELIVERIES`]
//! webhooks reading and posting at once, a timeout on every request, a cap on the
//! answer body read.
//!
//! Request: `POST <url>` with `Content-Type: application/json`,
//! `X-Switchboard-Webhook-Id`, `X-Switchboard-Timestamp` (ms since the Unix epoch) and
//! `X-Switchboard-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`;
//! body `{"webhook_id", "conversation_id", "events": [Message, ...]}` with each
//! message in the protocol's JSON form.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use switchboard_config::RoutingConfig;
use switchboard_proto::v1::{
    AdvanceWebhookRequest, HistoryRequest, ListWebhooksRequest, Message, StorageHistoryRequest,
    Webhook,
};
use switchboard_proto::ErrorCode;
use switchboard_rpc::Backoff;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::egress::GuardedResolver;
use crate::eventlog::partition_for;
use crate::node::Node;

/// Most events in one POST.
pub(crate) const BATCH: u32 = 50;
/// How often the webhook list is read again (webhooks added or deleted, takeovers).
pub(crate) const DISCOVER_EVERY: Duration = Duration::from_secs(10);
/// How long an idle worker waits for a wake before it looks for new events anyway.
pub(crate) const IDLE_RECHECK: Duration = Duration::from_secs(60);
/// Webhooks reading history and posting at the same time (one POST each).
pub(crate) const MAX_CONCURRENT_DELIVERIES: usize = 64;
/// First retry wait after a failed delivery; doubles up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(5 * 60);
/// Most bytes of a receiver's answer read (and then ignored).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

pub(crate) const HEADER_WEBHOOK_ID: &str = "x-switchboard-webhook-id";
pub(crate) const HEADER_TIMESTAMP: &str = "x-switchboard-timestamp";
pub(crate) const HEADER_SIGNATURE: &str = "x-switchboard-signature";

/// Wakes the workers of a conversation. The partition owner calls [`wake`] after
/// every persisted event; only conversations with a running worker have an entry, so
/// the map holds at most one entry per dispatched webhook.
///
/// [`wake`]: WebhookWake::wake
#[derive(Default)]
pub(crate) struct WebhookWake {
    /// A std mutex: map operations only, never held across an await.
    conversations: Mutex<HashMap<String, watch::Sender<()>>>,
    /// Asks the dispatcher to read the webhook list now (a permit is kept when it
    /// is busy, so no request is lost).
    rediscover: tokio::sync::Notify,
}

impl WebhookWake {
    /// Webhooks were created or deleted: read the list again now.
    pub fn rediscover(&self) {
        self.rediscover.notify_one();
    }

    /// New events of `conversation_id` were persisted.
    pub fn wake(&self, conversation_id: &str) {
        if let Some(tx) = self.lock().get(conversation_id) {
            tx.send_replace(());
        }
    }

    fn subscribe(&self, conversation_id: &str) -> watch::Receiver<()> {
        self.lock()
            .entry(conversation_id.to_owned())
            .or_insert_with(|| watch::Sender::new(()))
            .subscribe()
    }

    /// Drop the entry of a conversation whose last worker stopped (its receiver must
    /// be dropped before).
    fn release(&self, conversation_id: &str) {
        let mut map = self.lock();
        if map
            .get(conversation_id)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            map.remove(conversation_id);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<()>>> {
        self.conversations.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Timing and limits of the dispatcher (constants in production; tests shorten them).
#[derive(Debug, Clone)]
pub(crate) struct DispatchOptions {
    /// Timeout of one POST: connect, send and the answer.
    pub timeout: Duration,
    pub backoff_start: Duration,
    pub backoff_max: Duration,
    pub discover_every: Duration,
    pub idle_recheck: Duration,
    pub concurrency: usize,
    /// `routing.webhook_allow_private_networks` (see [`crate::egress`]).
    pub allow_private_networks: bool,
}

impl DispatchOptions {
    pub fn from_config(config: &RoutingConfig) -> DispatchOptions {
        DispatchOptions {
            timeout: Duration::from_millis(config.webhook_timeout_ms),
            backoff_start: BACKOFF_START,
            backoff_max: BACKOFF_MAX,
            discover_every: DISCOVER_EVERY,
            idle_recheck: IDLE_RECHECK,
            concurrency: MAX_CONCURRENT_DELIVERIES,
            allow_private_networks: config.webhook_allow_private_networks,
        }
    }
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector<GuardedResolver>>, Full<Bytes>>;

/// The HTTP(S) client of the dispatcher: HTTP/1.1, rustls with the ring provider and
/// the webpki root certificates for https:// URLs, connecting only where
/// [`crate::egress`] allows.
fn http_client(timeout: Duration, allow_private_networks: bool) -> anyhow::Result<HttpClient> {
    let mut http = HttpConnector::new_with_resolver(GuardedResolver::new(allow_private_networks));
    http.enforce_http(false);
    http.set_connect_timeout(Some(timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// A running worker, as the dispatcher tracks it.
struct WorkerHandle {
    partition: u32,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Dispatch the webhooks of the partitions this instance owns until `stop`.
pub(crate) async fn run(node: Arc<Node>, options: DispatchOptions, stop: CancellationToken) {
    let client = match http_client(options.timeout, options.allow_private_networks) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhook client cannot be built; webhooks are not dispatched");
            return;
        }
    };
    let shared = Arc::new(Shared {
        node: node.clone(),
        client,
        permits: Semaphore::new(options.concurrency.max(1)),
        options: options.clone(),
    });
    let mut assignment = node.log.assignment();
    let mut workers: HashMap<String, WorkerHandle> = HashMap::new();
    let mut tick = tokio::time::interval(options.discover_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut assignment_open = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = node.webhooks.rediscover.notified() => {}
            changed = assignment.changed(), if assignment_open => {
                if changed.is_err() {
                    assignment_open = false;
                }
            }
            _ = stop.cancelled() => break,
        }
        let owned: HashSet<u32> = assignment.borrow_and_update().iter().copied().collect();
        // A partition that left stops its workers at once; the new owner resumes
        // from the durable cursor.
        workers.retain(|_, w| {
            let keep = owned.contains(&w.partition) && !w.task.is_finished();
            if !keep {
                w.stop.cancel();
            }
            keep
        });
        let listed = tokio::select! {
            listed = list_webhooks(&node) => listed,
            _ = stop.cancelled() => break,
        };
        let Some(listed) = listed else {
            // Keep what runs; the next tick asks again.
            node.metrics.webhooks_dispatching.set(workers.len() as i64);
            continue;
        };
        let partitions = node.log.partitions();
        let wanted: HashMap<String, Webhook> = listed
            .into_iter()
            .filter(|w| owned.contains(&partition_for(&w.conversation_id, partitions)))
            .map(|w| (w.webhook_id.clone(), w))
            .collect();
        workers.retain(|id, w| {
            let keep = wanted.contains_key(id);
            if !keep {
                tracing::info!(webhook_id = %id, "webhook gone; its worker stops");
                w.stop.cancel();
            }
            keep
        });
        for (id, webhook) in wanted {
            if workers.contains_key(&id) {
                continue;
            }
            let partition = partition_for(&webhook.conversation_id, partitions);
            let worker_stop = stop.child_token();
            let task = tokio::spawn(run_worker(shared.clone(), webhook, worker_stop.clone()));
            workers.insert(
                id,
                WorkerHandle {
                    partition,
                    stop: worker_stop,
                    task,
                },
            );
        }
        node.metrics.webhooks_dispatching.set(workers.len() as i64);
    }
    for (_, w) in workers.iter() {
        w.stop.cancel();
    }
    for (_, w) in workers {
        let _ = w.task.await;
    }
    node.metrics.webhooks_dispatching.set(0);
}

/// Every webhook with its secret, or None (logged) when storage did not answer.
async fn list_webhooks(node: &Node) -> Option<Vec<Webhook>> {
    match node
        .storage
        .clone()
        .list_webhooks(ListWebhooksRequest {
            conversation_id: String::new(),
            actor_id: String::new(),
        })
        .await
    {
        Ok(r) => Some(r.into_inner().webhooks),
        Err(st) => {
            tracing::warn!(code = ?st.code(), error = %st.message(), "webhook list failed");
            None
        }
    }
}

/// What every worker uses.
struct Shared {
    node: Arc<Node>,
    client: HttpClient,
    /// Bounds the webhooks reading and posting at the same time.
    permits: Semaphore,
    options: DispatchOptions,
}

/// Why one delivery attempt did not complete.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// Storage did not answer History or AdvanceWebhook.
    #[error("storage: {0}")]
    Storage(String),
    /// The receiver answered with a status other than 2xx.
    #[error("receiver answered {0}")]
    Status(u16),
    /// Connecting, sending or reading failed.
    #[error("transport: {0}")]
    Transport(String),
    #[error("no answer within the timeout")]
    Timeout,
    /// The URL names an address webhooks may not go to.
    #[error("destination refused: {0}")]
    Destination(String),
    /// The webhook no longer exists (History or AdvanceWebhook said not_found).
    #[error("webhook deleted")]
    Deleted,
}

impl Failure {
    fn reason(&self) -> &'static str {
        match self {
            Failure::Storage(_) => "storage",
            Failure::Status(_) => "status",
            Failure::Transport(_) => "transport",
            Failure::Timeout => "timeout",
            Failure::Destination(_) => "destination",
            Failure::Deleted => "deleted",
        }
    }
}

/// Deliver one webhook's events in order until `stop` or until it is deleted.
async fn run_worker(shared: Arc<Shared>, webhook: Webhook, stop: CancellationToken) {
    let wake = &shared.node.webhooks;
    let mut wake_rx = wake.subscribe(&webhook.conversation_id);
    tracing::info!(
        webhook_id = %webhook.webhook_id,
        conversation_id = %webhook.conversation_id,
        delivered_seq = webhook.delivered_seq,
        "webhook worker started"
    );
    let mut worker = Worker {
        shared: &shared,
        cursor: webhook.delivered_seq,
        unrecorded: None,
        webhook,
    };
    let options = &shared.options;
    let mut backoff = Backoff::new(options.backoff_start, options.backoff_max);
    loop {
        // Seen before reading: a wake after this point is not lost.
        wake_rx.borrow_and_update();
        let attempt = tokio::select! {
            attempt = worker.deliver_next() => attempt,
            _ = stop.cancelled() => break,
        };
        match attempt {
            Ok(true) => backoff = Backoff::new(options.backoff_start, options.backoff_max),
            Ok(false) => {
                // Caught up: wait for new events.
                tokio::select! {
                    _ = wake_rx.changed() => {}
                    _ = tokio::time::sleep(options.idle_recheck) => {}
                    _ = stop.cancelled() => break,
                }
            }
            Err(Failure::Deleted) => {
                tracing::info!(webhook_id = %worker.webhook.webhook_id, "webhook deleted; worker stops");
                break;
            }
            Err(failure) => {
                shared
                    .node
                    .metrics
                    .webhook_failures
                    .with_label_values(&[failure.reason()])
                    .inc();
                let wait = backoff.next_wait();
                tracing::warn!(
                    webhook_id = %worker.webhook.webhook_id,
                    conversation_id = %worker.webhook.conversation_id,
                    after_seq = worker.cursor,
                    failure = %failure,
                    retry_in_ms = wait.as_millis() as u64,
                    "webhook delivery failed"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
    }
    let conversation_id = worker.webhook.conversation_id.clone();
    drop(wake_rx);
    wake.release(&conversation_id);
}

struct Worker<'a> {
    shared: &'a Shared,
    webhook: Webhook,
    /// Highest sequence the receiver acknowledged (in storage, or in `unrecorded`).
    cursor: u64,
    /// Acknowledged by the receiver, not yet recorded with AdvanceWebhook.
    unrecorded: Option<u64>,
}

impl Worker<'_> {
    /// Deliver the next batch: Ok(true) when one was delivered, Ok(false) when there
    /// is nothing after the cursor.
    async fn deliver_next(&mut self) -> Result<bool, Failure> {
        let _permit = self
            .shared
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        if let Some(seq) = self.unrecorded {
            self.advance(seq).await?;
        }
        let events = self.read_after_cursor().await?;
        let Some(last) = events.last().map(|m| m.seq) else {
            return Ok(false);
        };
        self.post(&events).await?;
        let metrics = &self.shared.node.metrics;
        metrics.webhook_deliveries.inc();
        metrics.webhook_events.inc_by(events.len() as u64);
        if let Some(newest) = events.last() {
            let age_ms = now_ms().saturating_sub(newest.sent_at_ms).max(0);
            metrics.webhook_lag_seconds.observe(age_ms as f64 / 1000.0);
        }
        // The receiver has them: never send them again from this worker, even if
        // recording the cursor has to be retried.
        self.cursor = last;
        self.unrecorded = Some(last);
        self.advance(last).await?;
        Ok(true)
    }

    /// The next events after the cursor, in sequence order, at most [`BATCH`], read
    /// from storage as an internal caller for this webhook (empty user id: no
    /// membership check, and no reader-relative `mine` flags on reactions; the
    /// webhook id: the page stops before its creator lost the right to it, and a
    /// removed webhook reads as deleted).
    async fn read_after_cursor(&self) -> Result<Vec<Message>, Failure> {
        let reply = self
            .shared
            .node
            .storage
            .clone()
            .history(StorageHistoryRequest {
                user_id: String::new(),
                request: Some(HistoryRequest {
                    conversation_id: self.webhook.conversation_id.clone(),
                    from_seq: self.cursor,
                    direction: "forward".into(),
                    limit: BATCH,
                }),
                webhook_id: self.webhook.webhook_id.clone(),
            })
            .await
            .map_err(|st| {
                // Gone, or removed because its creator lost the right to it.
                if switchboard_proto::status_error_code(&st) == ErrorCode::NotFound {
                    Failure::Deleted
                } else {
                    Failure::Storage(format!("history: {}", st.message()))
                }
            })?;
        let cursor = self.cursor;
        let mut events: Vec<Message> = reply
            .into_inner()
            .messages
            .into_iter()
            .filter(|m| m.seq > cursor)
            .collect();
        events.sort_by_key(|m| m.seq);
        events.truncate(BATCH as usize);
        Ok(events)
    }

    /// Record that the receiver acknowledged everything up to `seq`.
    async fn advance(&mut self, seq: u64) -> Result<(), Failure> {
        let reply = self
            .shared
            .node
            .storage
            .clone()
            .advance_webhook(AdvanceWebhookRequest {
                conversation_id: self.webhook.conversation_id.clone(),
                webhook_id: self.webhook.webhook_id.clone(),
                delivered_seq: seq,
            })
            .await;
        match reply {
            Ok(_) => {
                self.unrecorded = None;
                Ok(())
            }
            Err(st) if switchboard_proto::status_error_code(&st) == ErrorCode::NotFound => {
                Err(Failure::Deleted)
            }
            Err(st) => Err(Failure::Storage(format!(
                "advance_webhook: {}",
                st.message()
            ))),
        }
    }

    /// POST one batch; Ok only for a 2xx answer within the timeout.
    async fn post(&self, events: &[Message]) -> Result<(), Failure> {
        let body = serde_json::to_vec(&Batch {
            webhook_id: &self.webhook.webhook_id,
            conversation_id: &self.webhook.conversation_id,
            events,
        })
        .map_err(|e| Failure::Transport(format!("encode: {e}")))?;
        crate::egress::check_literal(
            &self.webhook.url,
            self.shared.options.allow_private_networks,
        )
        .map_err(Failure::Destination)?;
        let timestamp = now_ms().to_string();
        let signature = sign(&self.webhook.secret, &timestamp, &body);
        let request = http::Request::post(self.webhook.url.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "switchboard-webhooks")
            .header(HEADER_WEBHOOK_ID, self.webhook.webhook_id.as_str())
            .header(HEADER_TIMESTAMP, timestamp)
            .header(HEADER_SIGNATURE, signature)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Failure::Transport(format!("bad request: {e}")))?;
        let exchange = async {
            let response = self
                .shared
                .client
                .request(request)
                .await
                .map_err(|e| Failure::Transport(error_chain(&e)))?;
            let status = response.status();
            // Read (a bounded part of) the answer so the connection can be reused.
            let _ = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await;
            if status.is_success() {
                Ok(())
            } else {
                Err(Failure::Status(status.as_u16()))
            }
        };
        match tokio::time::timeout(self.shared.options.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Timeout),
        }
    }
}

/// The POST body.
#[derive(Serialize)]
struct Batch<'a> {
    webhook_id: &'a str,
    conversation_id: &'a str,
    events: &'a [Message],
}

/// `sha256=<lowercase hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub(crate) fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// An error with its sources, for logs.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body_in_lowercase_hex() {
        // Computed independently: Python's hmac.new(key, b"<ts>.<body>", sha256).
        assert_eq!(
            sign("4f1c0ffee", "1700000000000", br#"{"events":[]}"#),
            "sha256=59d4692829800787baad4360a773e8a8d4940df5b43ce9aa7b50191bf22bb60c"
        );
    }

    #[test]
    fn wake_reaches_subscribers_and_release_drops_idle_entries() {
        let wake = WebhookWake::default();
        wake.wake("c1"); // nobody listens: no entry is created
        assert!(wake.lock().is_empty());
        let mut rx = wake.subscribe("c1");
        rx.borrow_and_update();
        wake.wake("c1");
        assert!(rx.has_changed().unwrap());
        wake.release("c1");
        assert_eq!(wake.lock().len(), 1, "a live receiver keeps the entry");
        drop(rx);
        wake.release("c1");
        assert!(wake.lock().is_empty());
    }
}
