//! Presence-change notifications, off the request path.
//!
//! Handlers hand each changed [`UserPresence`] to [`Notifications::publish`], which
//! never waits: it puts the change on a bounded queue ([`NOTIFY_QUEUE`]) or drops it and
//! counts the drop (presence is ephemeral; a watcher catches up on its next change or
//! query). One notifier task takes changes in order, looks up the user's watchers per
//! gateway, reads the user's presence as it is at that moment (so racing handlers
//! cannot leave watchers with a stale final status; a quick flip may instead be sent
//! twice with the same, current value), and hands one `Delivery` per gateway to that
//! gateway's outbox.
//!
//! With a store shared by several instances ([`PresenceFeed`]) the queue feeds a
//! publisher task instead, and the notifier takes the changes of every instance from
//! the feed, sending only to the gateways this instance is responsible for.
//!
//! Each gateway has its own outbox task with a bounded queue ([`OUTBOX_QUEUE`]) that
//! sends batches of up to [`DELIVER_BATCH`] deliveries per `Gateway.Deliver` call, one
//! call at a time, so events about a user reach a gateway in the order they happened
//! and a slow or dead gateway only fills (and drops from) its own queue. An outbox
//! exits after [`OUTBOX_IDLE`] without traffic and is recreated on demand.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use switchboard_proto::v1::{
    server_frame, DeliverRequest, Delivery, PresenceEvent, ServerFrame, UserPresence,
};
use switchboard_rpc::GatewayPool;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::metrics::{
    Metrics, DROP_DELIVER_FAILED, DROP_GATEWAY_QUEUE_FULL, DROP_LOOKUP_FAILED, DROP_PUBLISH_FAILED,
    DROP_QUEUE_FULL,
};
use crate::store::{PresenceFeed, SessionStore};

/// Presence changes waiting for the notifier.
pub const NOTIFY_QUEUE: usize = 4096;
/// Deliveries waiting for one gateway.
pub const OUTBOX_QUEUE: usize = 1024;
/// Most deliveries in one `Deliver` call.
pub const DELIVER_BATCH: usize = 256;
/// An outbox with no traffic for this long exits (its gateway may be gone).
pub const OUTBOX_IDLE: Duration = Duration::from_secs(60);

/// The sending side handlers use. Cloning shares the queue.
#[derive(Clone)]
pub(crate) struct Notifications {
    /// Bounded queue to the notifier task.
    tx: mpsc::Sender<UserPresence>,
    /// For counting drops.
    metrics: Metrics,
}

impl Notifications {
    /// A queue of `capacity` changes and its receiving end for [`run_notifier`].
    pub fn new(capacity: usize, metrics: Metrics) -> (Notifications, mpsc::Receiver<UserPresence>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Notifications { tx, metrics }, rx)
    }

    /// Queue a change of `presence` for its watchers; never waits.
    pub fn publish(&self, presence: UserPresence) {
        match self.tx.try_send(presence) {
            Ok(()) => {}
            Err(TrySendError::Full(p)) => {
                self.metrics.dropped(DROP_QUEUE_FULL, 1);
                tracing::debug!(user_id = %p.user_id, "presence queue full, event dropped");
            }
            Err(TrySendError::Closed(_)) => {
                // The notifier stopped (shutting down): nobody will deliver it.
                self.metrics.dropped(DROP_QUEUE_FULL, 1);
            }
        }
    }
}

/// Publish this instance's changes on the shared store's feed, in batches of up to
/// [`DELIVER_BATCH`], until `shutdown`.
pub(crate) async fn run_publisher(
    mut rx: mpsc::Receiver<UserPresence>,
    feed: Arc<dyn PresenceFeed>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            next = rx.recv() => match next {
                Some(p) => p,
                None => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < DELIVER_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        if let Err(e) = feed.publish(&batch).await {
            metrics.dropped(DROP_PUBLISH_FAILED, batch.len() as u64);
            tracing::warn!(events = batch.len(), error = %e, "cannot publish presence changes");
        }
    }
}

/// Take changes from `rx` and hand them to per-gateway outboxes until `shutdown`.
/// With a shared store's `feed`, only gateways this instance is responsible for.
pub(crate) async fn run_notifier(
    mut rx: mpsc::Receiver<UserPresence>,
    store: Arc<dyn SessionStore>,
    feed: Option<Arc<dyn PresenceFeed>>,
    pool: GatewayPool,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut outboxes: HashMap<String, mpsc::Sender<Delivery>> = HashMap::new();
    let mut tasks = JoinSet::new();
    loop {
        let presence = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {
                // An idle outbox exited; forget senders whose task is gone.
                outboxes.retain(|_, tx| !tx.is_closed());
                continue;
            }
            next = rx.recv() => match next {
                Some(p) => p,
                None => break,
            },
        };
        let watchers = match store.watchers_of(&presence.user_id).await {
            Ok(w) if w.is_empty() => continue,
            Ok(w) => w,
            Err(e) => {
                metrics.dropped(DROP_LOOKUP_FAILED, 1);
                tracing::warn!(user_id = %presence.user_id, error = %e, "cannot look up presence watchers");
                continue;
            }
        };
        // Send the presence as it is now, not as it was when the change was queued:
        // handlers racing on one user may queue their changes out of order, but the
        // last event processed then still carries the user's final presence. Watchers
        // are other users: they get the public view.
        let presence = match store.query(std::slice::from_ref(&presence.user_id)).await {
            Ok(mut now) if now.len() == 1 => now.remove(0).public_view(),
            Ok(_) => presence,
            Err(e) => {
                metrics.dropped(DROP_LOOKUP_FAILED, 1);
                tracing::warn!(user_id = %presence.user_id, error = %e, "cannot read presence to notify");
                continue;
            }
        };
        for group in watchers {
            if feed
                .as_ref()
                .is_some_and(|f| !f.delivers_to(&group.gateway_url))
            {
                continue;
            }
            let delivery = Delivery {
                event: Some(ServerFrame {
                    event: Some(server_frame::Event::Presence(PresenceEvent {
                        presence: Some(presence.clone()),
                    })),
                }),
                recipients: group.watcher_ids,
                exclude_session_id: String::new(),
                all_local_sessions: false,
            };
            let mut delivery = Some(delivery);
            // At most two rounds: the second after replacing an outbox that closed.
            for _ in 0..2 {
                let Some(d) = delivery.take() else { break };
                let tx = outboxes
                    .entry(group.gateway_url.clone())
                    .or_insert_with(|| {
                        let (tx, rx) = mpsc::channel(OUTBOX_QUEUE);
                        tasks.spawn(run_outbox(
                            group.gateway_url.clone(),
                            rx,
                            pool.clone(),
                            metrics.clone(),
                            shutdown.clone(),
                        ));
                        tx
                    });
                match tx.try_send(d) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        metrics.dropped(DROP_GATEWAY_QUEUE_FULL, 1);
                        tracing::debug!(gateway = %group.gateway_url, "gateway presence queue full, event dropped");
                    }
                    Err(TrySendError::Closed(d)) => {
                        outboxes.remove(&group.gateway_url);
                        delivery = Some(d);
                    }
                }
            }
        }
    }
    drop(outboxes);
    // Outboxes finish the call they are making, then stop (they watch `shutdown` too,
    // and see their queue closed when the notifier stopped for another reason).
    while tasks.join_next().await.is_some() {}
}

/// Send the deliveries queued for one gateway, one `Deliver` call at a time.
async fn run_outbox(
    gateway_url: String,
    mut rx: mpsc::Receiver<Delivery>,
    pool: GatewayPool,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            next = tokio::time::timeout(OUTBOX_IDLE, rx.recv()) => match next {
                Ok(Some(d)) => d,
                Ok(None) => return,
                Err(_idle) => {
                    // Close first so no new delivery can be queued, then send what
                    // was queued before: the notifier sees the queue closed and makes
                    // a new outbox for later deliveries, so nothing is lost.
                    rx.close();
                    let mut rest = Vec::new();
                    while let Ok(d) = rx.try_recv() {
                        rest.push(d);
                    }
                    for batch in rest.chunks(DELIVER_BATCH) {
                        deliver(&gateway_url, batch.to_vec(), &pool, &metrics).await;
                    }
                    return;
                }
            },
        };
        let mut batch = vec![first];
        while batch.len() < DELIVER_BATCH {
            match rx.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        deliver(&gateway_url, batch, &pool, &metrics).await;
    }
}

async fn deliver(
    gateway_url: &str,
    deliveries: Vec<Delivery>,
    pool: &GatewayPool,
    metrics: &Metrics,
) {
    let n = deliveries.len() as u64;
    let gateway = match pool.get(gateway_url) {
        Ok(gateway) => gateway,
        Err(e) => {
            metrics.deliver_failures.inc();
            metrics.dropped(DROP_DELIVER_FAILED, n);
            tracing::warn!(gateway = %gateway_url, error = %e, "cannot reach gateway for presence");
            return;
        }
    };
    match gateway.deliver(DeliverRequest { deliveries }).await {
        Ok(_) => metrics.events_sent.inc_by(n),
        Err(status) => {
            metrics.deliver_failures.inc();
            metrics.dropped(DROP_DELIVER_FAILED, n);
            tracing::warn!(
                gateway = %gateway_url,
                events = n,
                code = ?status.code(),
                error = %status.message(),
                "presence deliver failed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Registry;

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let metrics = Metrics::register(&Registry::new()).unwrap();
        let (notifications, mut rx) = Notifications::new(2, metrics.clone());
        for user in ["a", "b", "c"] {
            notifications.publish(UserPresence {
                user_id: user.into(),
                ..Default::default()
            });
        }
        let dropped = metrics.events_dropped.with_label_values(&[DROP_QUEUE_FULL]);
        assert_eq!(dropped.get(), 1);
        assert_eq!(rx.recv().await.unwrap().user_id, "a");
        assert_eq!(rx.recv().await.unwrap().user_id, "b");
        assert!(rx.try_recv().is_err());
    }
}
