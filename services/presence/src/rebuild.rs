//! Noticing that the session store lost its state, and saying so while it is rebuilt.
//!
//! The store's state has an identity, its epoch ([`SessionStore::epoch`]): a Redis
//! that restarted without its data, or a memory store that is new, has a new one. This
//! instance reads it on every `Heartbeat` (gateways probe every
//! `gateway.presence_probe_ms` and register all their sessions again when it changed)
//! and every [`CHECK_EVERY`] on its own. From the moment it sees a new epoch, and for
//! `presence.rebuild_window_ms`, its `Route` and `RouteConversation` answers say
//! `partial`: sessions are still being registered again, so an answer can miss some,
//! and routing delivers to every gateway it knows instead.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::PresenceError;
use crate::metrics::Metrics;
use crate::store::SessionStore;

/// How often the epoch is read when no heartbeat asks for it.
pub(crate) const CHECK_EVERY: Duration = Duration::from_millis(500);

/// The epoch this instance last saw, and until when its routes are partial.
pub(crate) struct StateWatch {
    store: Arc<dyn SessionStore>,
    window: Duration,
    metrics: Metrics,
    inner: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    epoch: Option<String>,
    partial_until: Option<Instant>,
}

impl StateWatch {
    pub fn new(store: Arc<dyn SessionStore>, window: Duration, metrics: Metrics) -> StateWatch {
        StateWatch {
            store,
            window,
            metrics,
            inner: Mutex::new(Seen::default()),
        }
    }

    /// Read the store's epoch; a fresh one, or one other than the last seen, starts
    /// the rebuild window. Returns the epoch.
    pub async fn check(&self) -> Result<String, PresenceError> {
        let epoch = self.store.epoch().await?;
        let mut seen = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let changed = seen.epoch.as_deref().is_some_and(|e| e != epoch.id);
        if epoch.fresh || changed {
            seen.partial_until = Some(Instant::now() + self.window);
            self.metrics.state_losses.inc();
            tracing::warn!(
                epoch = %epoch.id,
                window_ms = self.window.as_millis() as u64,
                "the session store's state is new or was lost; routes are partial while gateways register their sessions again"
            );
        }
        seen.epoch = Some(epoch.id.clone());
        Ok(epoch.id)
    }

    /// Whether routes may miss sessions (within the rebuild window).
    pub fn partial(&self) -> bool {
        let mut seen = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match seen.partial_until {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                seen.partial_until = None;
                tracing::info!("rebuild window over; routes are complete again");
                false
            }
            None => false,
        }
    }
}

/// Read the epoch every [`CHECK_EVERY`] until `stop` (failures are logged: the store
/// being unreachable is seen by every call anyway).
pub(crate) async fn run(watch: Arc<StateWatch>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = watch.check().await {
            tracing::debug!(error = %e, "cannot read the session store's epoch");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemorySessionStore;

    #[tokio::test(start_paused = true)]
    async fn a_new_state_makes_routes_partial_for_the_window_only() {
        let registry = prometheus::Registry::new();
        let metrics = Metrics::register(&registry).unwrap();
        let store: Arc<dyn SessionStore> =
            Arc::new(MemorySessionStore::new(Duration::from_secs(30)));
        let watch = StateWatch::new(store, Duration::from_secs(10), metrics.clone());
        assert!(!watch.partial(), "nothing seen yet");
        let epoch = watch.check().await.unwrap();
        assert!(watch.partial(), "a fresh store's routes are partial");
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(watch.check().await.unwrap(), epoch);
        assert!(watch.partial(), "still within the window");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!watch.partial(), "the window is over");
        assert_eq!(metrics.state_losses.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn another_epoch_than_the_last_seen_starts_the_window() {
        let registry = prometheus::Registry::new();
        let metrics = Metrics::register(&registry).unwrap();
        let store: Arc<dyn SessionStore> =
            Arc::new(MemorySessionStore::new(Duration::from_secs(30)));
        // Another instance made the store's epoch: this one does not see it fresh.
        assert!(store.epoch().await.unwrap().fresh);
        let watch = StateWatch {
            store,
            window: Duration::from_secs(1),
            metrics: metrics.clone(),
            inner: Mutex::new(Seen {
                epoch: Some("before-the-loss".into()),
                partial_until: None,
            }),
        };
        watch.check().await.unwrap();
        assert!(watch.partial(), "a changed epoch is a lost state");
        assert_eq!(metrics.state_losses.get(), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        watch.check().await.unwrap();
        assert!(!watch.partial(), "the same epoch again starts nothing");
        assert_eq!(metrics.state_losses.get(), 1);
    }
}
