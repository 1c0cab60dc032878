//! Fan-out to gateways: one bounded, ordered queue per gateway, drained by one
//! sender task that batches deliveries into `Deliver` calls.
//!
//! Every push into a queue happens under the queue map's lock (with `try_send`), so
//! removing an idle queue (also under the lock, only when it is empty) can never
//! lose a delivery, and a gateway's deliveries keep the order they were queued in.
//!
//! Sequenced messages wait for room when a queue is full (backpressure on the
//! partition owner); ephemeral events are dropped and counted instead. A `Deliver`
//! that still fails after a few retries drops its batch and the rest of that
//! gateway's queue, and remembers whom the dropped messages were for (bounded: past
//! [`MAX_MISSED_USERS`] users, "everyone on that gateway"). A retry task then sends
//! that gateway a `resync` delivery for those users, with backoff, until it answers
//! or [`MISSED_RETRY_FOR`] passed (by then its clients have reconnected elsewhere and
//! synced): a session that stayed connected is told to sync, instead of waiting for
//! the next message to reveal the gap.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use switchboard_proto::v1::{server_frame, DeliverRequest, Delivery, Resync, ServerFrame};
use switchboard_rpc::{GatewayApi, GatewayPool};
use switchboard_telemetry::TraceContext;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::metrics::Metrics;

/// Attempts of one Deliver batch before it is dropped.
const DELIVER_ATTEMPTS: u32 = 3;
/// Backoff before the first retry; doubles each time.
const DELIVER_BACKOFF: Duration = Duration::from_millis(50);
/// A queue with nothing to send for this long is removed with its task.
const IDLE_QUEUE: Duration = Duration::from_secs(60);
/// Encoded size a batch stops growing at, well below gRPC's 4 MiB default limit.
const MAX_BATCH_BYTES: usize = 2 * 1024 * 1024;
/// Users remembered per gateway as having missed a delivery; past it the whole
/// gateway is told to resync.
pub(crate) const MAX_MISSED_USERS: usize = 10_000;
/// Gateways with missed deliveries remembered at once; past it the missed deliveries
/// of further gateways are only counted (their clients see the gap at the next
/// message, or sync when they reconnect).
const MAX_MISSED_GATEWAYS: usize = 1_024;
/// How long the resync of a gateway is retried.
pub(crate) const MISSED_RETRY_FOR: Duration = Duration::from_secs(600);
/// Backoff of the resync retries: from the first to the max, doubling.
const MISSED_BACKOFF: Duration = Duration::from_millis(200);
const MISSED_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Limits of the gateway queues.
#[derive(Debug, Clone)]
pub(crate) struct FanoutOptions {
    /// Deliveries queued per gateway.
    pub queue: usize,
    /// Most deliveries per Deliver call.
    pub batch: usize,
}

#[derive(Clone)]
pub(crate) struct Fanout {
    inner: Arc<Inner>,
}

struct Inner {
    pool: GatewayPool,
    options: FanoutOptions,
    metrics: Arc<Metrics>,
    /// Queues by gateway URL. A std mutex: only map operations and `try_send`.
    queues: Mutex<HashMap<String, Queue>>,
    /// Tells queue generations apart, so a task removes only its own entry.
    generation: AtomicU64,
    /// Stop taking deliveries and let the tasks finish what is queued.
    closing: CancellationToken,
    /// Give up on in-flight Deliver calls (the drain deadline passed).
    abort: CancellationToken,
    /// Each sender task holds a clone; `shutdown` waits for all of them to be gone.
    /// Taken (None) once shutting down so no new task starts.
    done_tx: Mutex<Option<mpsc::Sender<()>>>,
    done_rx: tokio::sync::Mutex<mpsc::Receiver<()>>,
    /// Whom failed deliveries were for, by gateway URL, until a resync reaches it.
    missed: Mutex<HashMap<String, Missed>>,
}

/// Who on one gateway missed a delivery.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) enum Missed {
    #[default]
    Nobody,
    Users(std::collections::BTreeSet<String>),
    /// More than [`MAX_MISSED_USERS`]: every session of the gateway.
    Everyone,
}

impl Missed {
    pub fn add<'a>(&mut self, users: impl IntoIterator<Item = &'a String>) {
        if *self == Missed::Everyone {
            return;
        }
        let mut set = match std::mem::take(self) {
            Missed::Users(set) => set,
            _ => Default::default(),
        };
        for user in users {
            if set.contains(user) {
                continue;
            }
            if set.len() >= MAX_MISSED_USERS {
                *self = Missed::Everyone;
                return;
            }
            set.insert(user.clone());
        }
        *self = if set.is_empty() {
            Missed::Nobody
        } else {
            Missed::Users(set)
        };
    }

    pub fn merge(&mut self, other: Missed) {
        match other {
            Missed::Nobody => {}
            Missed::Everyone => *self = Missed::Everyone,
            Missed::Users(set) => self.add(set.iter()),
        }
    }

    /// The `resync` delivery that tells these users' sessions to sync.
    pub fn delivery(&self) -> Option<Delivery> {
        let (recipients, all_local_sessions) = match self {
            Missed::Nobody => return None,
            Missed::Users(set) => (set.iter().cloned().collect(), false),
            Missed::Everyone => (Vec::new(), true),
        };
        Some(Delivery {
            event: Some(ServerFrame {
                event: Some(server_frame::Event::Resync(Resync {
                    reason: "delivery_failed".into(),
                    conversation_id: String::new(),
                })),
            }),
            recipients,
            exclude_session_id: String::new(),
            all_local_sessions,
        })
    }
}

struct Queue {
    tx: mpsc::Sender<Queued>,
    generation: u64,
}

/// A delivery waiting for its gateway, with the trace context of the work that
/// queued it (the partition owner's `sequence` span; empty when not exported).
struct Queued {
    delivery: Delivery,
    trace: TraceContext,
}

impl Fanout {
    pub fn new(pool: GatewayPool, options: FanoutOptions, metrics: Arc<Metrics>) -> Fanout {
        // Nothing is ever sent on this channel; it only tracks live sender tasks.
        let (done_tx, done_rx) = mpsc::channel(1);
        Fanout {
            inner: Arc::new(Inner {
                pool,
                options: FanoutOptions {
                    queue: options.queue.max(1),
                    batch: options.batch.max(1),
                },
                metrics,
                queues: Mutex::new(HashMap::new()),
                generation: AtomicU64::new(0),
                closing: CancellationToken::new(),
                abort: CancellationToken::new(),
                done_tx: Mutex::new(Some(done_tx)),
                done_rx: tokio::sync::Mutex::new(done_rx),
                missed: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Queue a delivery of a sequenced message, waiting while the queue is full.
    pub async fn enqueue_ordered(&self, gateway: &str, delivery: Delivery) {
        let mut queued = Queued {
            delivery,
            trace: switchboard_telemetry::current_context(),
        };
        loop {
            match self.inner.try_enqueue(gateway, queued) {
                Ok(()) => return,
                Err(Enqueue::Full(d, tx)) => {
                    queued = *d;
                    // Wait for room outside the lock, then push again under it. A
                    // closed queue (failed gateway) is replaced on the next attempt.
                    tokio::select! {
                        permit = tx.reserve() => drop(permit),
                        _ = self.inner.closing.cancelled() => {}
                    }
                }
                Err(Enqueue::Closed) => {
                    self.inner.dropped("shutdown", 1);
                    return;
                }
            }
        }
    }

    /// Queue an ephemeral delivery; false (and counted) if the queue is full.
    pub fn enqueue_ephemeral(&self, gateway: &str, delivery: Delivery) -> bool {
        let queued = Queued {
            delivery,
            trace: switchboard_telemetry::current_context(),
        };
        match self.inner.try_enqueue(gateway, queued) {
            Ok(()) => true,
            Err(Enqueue::Full(..)) => {
                self.inner.dropped("queue_full", 1);
                false
            }
            Err(Enqueue::Closed) => {
                self.inner.dropped("shutdown", 1);
                false
            }
        }
    }

    /// Stop taking deliveries, let the queues drain for up to `deadline`, then
    /// abandon what is left.
    pub async fn shutdown(&self, deadline: Duration) {
        self.inner.closing.cancel();
        self.inner
            .done_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let mut done_rx = self.inner.done_rx.lock().await;
        if tokio::time::timeout(deadline, done_rx.recv())
            .await
            .is_err()
        {
            self.inner.abort.cancel();
            let _ = done_rx.recv().await;
        }
    }
}

/// Why a delivery was not queued.
enum Enqueue {
    /// The queue is full: the delivery back, and the queue to wait on.
    Full(Box<Queued>, mpsc::Sender<Queued>),
    /// Shutting down.
    Closed,
}

impl Inner {
    fn try_enqueue(self: &Arc<Self>, gateway: &str, delivery: Queued) -> Result<(), Enqueue> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let mut delivery = delivery;
        // At most two rounds: a closed queue is replaced once by a fresh one.
        for _ in 0..2 {
            if !queues.contains_key(gateway) {
                let Some(queue) = self.spawn_queue(gateway) else {
                    return Err(Enqueue::Closed);
                };
                queues.insert(gateway.to_owned(), queue);
            }
            let queue = queues.get(gateway).expect("inserted above");
            match queue.tx.try_send(delivery) {
                Ok(()) => {
                    self.set_depth(gateway, &queue.tx);
                    return Ok(());
                }
                Err(TrySendError::Full(d)) => {
                    return Err(Enqueue::Full(Box::new(d), queue.tx.clone()));
                }
                Err(TrySendError::Closed(d)) => {
                    delivery = d;
                    queues.remove(gateway);
                }
            }
        }
        drop(delivery);
        Err(Enqueue::Closed)
    }

    /// A new queue and its sender task; None once shutting down.
    fn spawn_queue(self: &Arc<Self>, gateway: &str) -> Option<Queue> {
        if self.closing.is_cancelled() {
            return None;
        }
        let done = self
            .done_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let (tx, rx) = mpsc::channel(self.options.queue);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let inner = self.clone();
        let url = gateway.to_owned();
        tokio::spawn(async move {
            inner.run_sender(url, generation, rx).await;
            drop(done);
        });
        Some(Queue { tx, generation })
    }

    fn set_depth(&self, gateway: &str, tx: &mpsc::Sender<Queued>) {
        let depth = tx.max_capacity() - tx.capacity();
        self.metrics
            .gateway_queue_depth
            .with_label_values(&[gateway])
            .set(depth as i64);
    }

    fn dropped(&self, reason: &str, n: usize) {
        self.metrics
            .deliveries_dropped
            .with_label_values(&[reason])
            .inc_by(n as u64);
    }

    /// Remove this task's queue from the map. With `only_if_empty`, only when
    /// nothing is queued (checked under the lock every push takes).
    fn remove_queue(
        &self,
        gateway: &str,
        generation: u64,
        rx: &mpsc::Receiver<Queued>,
        only_if_empty: bool,
    ) -> bool {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if only_if_empty && !rx.is_empty() {
            return false;
        }
        if queues
            .get(gateway)
            .is_some_and(|q| q.generation == generation)
        {
            queues.remove(gateway);
            let _ = self
                .metrics
                .gateway_queue_depth
                .remove_label_values(&[gateway]);
        }
        true
    }

    async fn run_sender(
        self: &Arc<Self>,
        url: String,
        generation: u64,
        mut rx: mpsc::Receiver<Queued>,
    ) {
        let client = match self.pool.get(&url) {
            Ok(gateway) => gateway,
            Err(e) => {
                tracing::warn!(gateway = %url, error = %e, "cannot reach gateway");
                self.remove_queue(&url, generation, &rx, false);
                self.drop_queued(&url, &mut rx);
                return;
            }
        };
        loop {
            let first = tokio::select! {
                biased;
                d = rx.recv() => d,
                _ = self.closing.cancelled(), if rx.is_empty() => None,
                _ = tokio::time::sleep(IDLE_QUEUE) => {
                    if self.remove_queue(&url, generation, &rx, true) {
                        return;
                    }
                    continue;
                }
            };
            let Some(first) = first else {
                self.remove_queue(&url, generation, &rx, false);
                return;
            };
            let mut size = first.delivery.encoded_len();
            let mut batch = vec![first.delivery];
            let mut traces = vec![first.trace];
            while batch.len() < self.options.batch && size < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(q) => {
                        size += q.delivery.encoded_len();
                        batch.push(q.delivery);
                        traces.push(q.trace);
                    }
                    Err(_) => break,
                }
            }
            self.metrics
                .gateway_queue_depth
                .with_label_values(&[url.as_str()])
                .set(rx.len() as i64);
            let span = deliver_span(&url, batch.len(), &traces);
            drop(traces);
            if !self.deliver(&client, &url, batch).instrument(span).await {
                // Give up on this gateway for now: drop what is queued and let the
                // next event open a fresh queue (and connection).
                self.remove_queue(&url, generation, &rx, false);
                self.pool.remove(&url);
                self.drop_queued(&url, &mut rx);
                return;
            }
        }
    }

    /// One batch with retries; false if it was dropped.
    async fn deliver(
        self: &Arc<Self>,
        client: &GatewayApi,
        url: &str,
        batch: Vec<Delivery>,
    ) -> bool {
        let n = batch.len();
        let request = DeliverRequest { deliveries: batch };
        let result = self.deliver_request(client, url, &request, n).await;
        if !result {
            self.note_missed(url, &request.deliveries);
        }
        result
    }

    /// Close the queue of a gateway given up on, dropping (and noting) what it holds.
    fn drop_queued(self: &Arc<Self>, url: &str, rx: &mut mpsc::Receiver<Queued>) {
        rx.close();
        let mut dropped = Vec::new();
        while let Ok(q) = rx.try_recv() {
            dropped.push(q.delivery);
        }
        self.dropped("deliver_failed", dropped.len());
        self.note_missed(url, &dropped);
    }

    /// Remember whom the dropped sequenced deliveries were for, and start the
    /// gateway's resync retries if they are not running.
    fn note_missed(self: &Arc<Self>, url: &str, dropped: &[Delivery]) {
        let users: Vec<&String> = dropped
            .iter()
            .filter(|d| {
                matches!(
                    d.event.as_ref().and_then(|e| e.event.as_ref()),
                    Some(server_frame::Event::Message(_) | server_frame::Event::Conversation(_))
                )
            })
            .flat_map(|d| d.recipients.iter())
            .collect();
        if users.is_empty() {
            return;
        }
        let start = {
            let mut missed = self.missed.lock().unwrap_or_else(|p| p.into_inner());
            if !missed.contains_key(url) && missed.len() >= MAX_MISSED_GATEWAYS {
                self.dropped("resync_untracked", users.len());
                return;
            }
            let entry = missed.entry(url.to_owned());
            let start = matches!(entry, std::collections::hash_map::Entry::Vacant(_));
            entry.or_default().add(users);
            start
        };
        if start {
            let inner = self.clone();
            let url = url.to_owned();
            tokio::spawn(async move { inner.run_resync(url).await });
        }
    }

    /// Deliver the gateway's `resync` until it answers, [`MISSED_RETRY_FOR`] passed or
    /// the fan-out shuts down; the entry is removed when this ends.
    async fn run_resync(self: Arc<Self>, url: String) {
        let started = tokio::time::Instant::now();
        let mut backoff = MISSED_BACKOFF;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.abort.cancelled() => break,
            }
            backoff = (backoff * 2).min(MISSED_BACKOFF_MAX);
            let missed = {
                let mut map = self.missed.lock().unwrap_or_else(|p| p.into_inner());
                match map.get_mut(&url) {
                    Some(m) => std::mem::take(m),
                    None => return,
                }
            };
            let Some(delivery) = missed.delivery() else {
                break;
            };
            let sent = match self.pool.get(&url) {
                Ok(gateway) => gateway
                    .deliver(DeliverRequest {
                        deliveries: vec![delivery],
                    })
                    .await
                    .is_ok(),
                Err(_) => false,
            };
            let mut map = self.missed.lock().unwrap_or_else(|p| p.into_inner());
            if sent {
                self.metrics.resyncs_delivered.inc();
                tracing::info!(gateway = %url, "sessions told to sync after failed deliveries");
                // Deliveries that failed meanwhile are retried at once.
                if map.get(&url).is_some_and(|m| *m != Missed::Nobody) {
                    backoff = MISSED_BACKOFF;
                    continue;
                }
                map.remove(&url);
                return;
            }
            if let Some(m) = map.get_mut(&url) {
                m.merge(missed);
            }
            if started.elapsed() >= MISSED_RETRY_FOR {
                tracing::warn!(gateway = %url, "gateway unreachable for too long; its clients sync when they reconnect");
                break;
            }
        }
        self.missed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&url);
    }

    /// One Deliver request with retries; false if it still failed.
    async fn deliver_request(
        &self,
        client: &GatewayApi,
        url: &str,
        request: &DeliverRequest,
        n: usize,
    ) -> bool {
        let mut backoff = DELIVER_BACKOFF;
        for attempt in 1..=DELIVER_ATTEMPTS {
            self.metrics.deliver_calls.inc();
            tracing::Span::current().record("attempts", attempt);
            let mut call = tonic::Request::new(request.clone());
            switchboard_telemetry::inject(&mut call);
            let call = client.deliver(call);
            let result = tokio::select! {
                r = call => r,
                _ = self.abort.cancelled() => {
                    self.dropped("shutdown", n);
                    return false;
                }
            };
            match result {
                Ok(_) => return true,
                Err(status) => {
                    self.metrics.deliver_failures.inc();
                    tracing::warn!(gateway = %url, attempt, code = ?status.code(), error = %status.message(), "deliver failed");
                    if attempt < DELIVER_ATTEMPTS {
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = self.abort.cancelled() => {}
                        }
                        backoff *= 2;
                    }
                }
            }
        }
        self.dropped("deliver_failed", n);
        tracing::Span::current().record("otel.status_code", "error");
        false
    }
}

/// The span of one Deliver batch. Its parent is the trace of the batch's first
/// traced delivery; the other messages' traces are linked (one call serves them all).
fn deliver_span(gateway: &str, deliveries: usize, traces: &[TraceContext]) -> tracing::Span {
    let span = tracing::info_span!(
        parent: None,
        "routing.deliver",
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        service = "routing",
        gateway = %gateway,
        deliveries,
        attempts = tracing::field::Empty,
    );
    let mut traced = traces.iter().filter(|t| switchboard_telemetry::has_span(t));
    if let Some(parent) = traced.next() {
        switchboard_telemetry::set_parent(&span, parent.clone());
        let mut previous = parent;
        for trace in traced {
            if !switchboard_telemetry::same_span(trace, previous) {
                switchboard_telemetry::add_link(&span, trace);
            }
            previous = trace;
        }
    }
    span
}
