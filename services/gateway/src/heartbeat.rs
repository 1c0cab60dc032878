//! Keeping this gateway's sessions in presence, and putting them back when presence
//! lost them.
//!
//! Every `gateway.heartbeat_interval_ms` one `Heartbeat` per chunk of session ids
//! keeps the sessions alive. Between those, every `gateway.presence_probe_ms`, a
//! heartbeat without sessions asks only for presence's epoch (the identity of its
//! state). When the epoch changed (Redis came back empty, a memory store restarted)
//! or presence answers again after failing, the full heartbeat runs at once: the
//! sessions presence no longer knows are registered again, with their status and
//! their presence watches, and each of them gets a `resync` event, since events may
//! have been routed past it while presence did not know it.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use switchboard_proto::v1;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::deliver::push_resync;
use crate::sessions::{lock, Session};
use crate::Shared;

/// Session ids per `Presence.Heartbeat` call.
const HEARTBEAT_CHUNK: usize = 1_000;
/// Sessions registered again at once (each a `RegisterSession`, and a `Watch` when
/// it watches anyone).
const REGISTER_CONCURRENCY: usize = 32;
/// The reason of the `resync` a session gets when presence had forgotten it.
const REASON: &str = "presence_lost";

/// Run until `stop`.
pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let config = &shared.config.gateway;
    let full_every = Duration::from_millis(config.heartbeat_interval_ms);
    let probe_every = Duration::from_millis(config.presence_probe_ms).min(full_every);
    let mut ticker = tokio::time::interval_at(Instant::now() + probe_every, probe_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_full = Instant::now();
    let mut state = PresenceView::default();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let due = last_full.elapsed() >= full_every;
        if !due {
            let probe = v1::HeartbeatRequest {
                gateway_addr: shared.advertise_url.clone(),
                session_ids: Vec::new(),
            };
            match shared.peers.presence.clone().heartbeat(probe).await {
                Ok(response) => {
                    if !state.answered(&response.into_inner().epoch) {
                        continue;
                    }
                    shared.metrics.presence_rebuilds.inc();
                    info!("presence lost its state or was unreachable: registering every session again");
                }
                Err(status) => {
                    state.failed(&status);
                    continue;
                }
            }
        }
        let started = Instant::now();
        let again = full_heartbeat(&shared, &mut state).await;
        last_full = Instant::now();
        if again > 0 {
            info!(
                sessions = again,
                ms = started.elapsed().as_millis() as u64,
                "sessions registered again with presence"
            );
        }
    }
}

/// What this gateway knows of presence between calls.
#[derive(Default)]
struct PresenceView {
    /// The epoch presence last answered.
    epoch: Option<String>,
    /// A call failed since the last answer.
    unreachable: bool,
}

impl PresenceView {
    /// Presence answered with `epoch`: true when everything must be registered again
    /// (the epoch changed, or presence was unreachable until now).
    fn answered(&mut self, epoch: &str) -> bool {
        let changed = !epoch.is_empty() && self.epoch.as_deref().is_some_and(|e| e != epoch);
        let recovered = std::mem::take(&mut self.unreachable);
        if !epoch.is_empty() {
            self.epoch = Some(epoch.to_owned());
        }
        changed || recovered
    }

    fn failed(&mut self, status: &tonic::Status) {
        if !self.unreachable {
            warn!(error = %status.message(), "presence unreachable");
        }
        self.unreachable = true;
    }
}

/// Heartbeat every session; register again (and tell to resync) those presence does
/// not know. Returns how many were registered again.
async fn full_heartbeat(shared: &Arc<Shared>, state: &mut PresenceView) -> usize {
    let ids = shared.sessions.session_ids();
    let mut again = 0;
    for chunk in ids.chunks(HEARTBEAT_CHUNK) {
        let request = v1::HeartbeatRequest {
            gateway_addr: shared.advertise_url.clone(),
            session_ids: chunk.iter().map(|id| id.to_string()).collect(),
        };
        let unknown = match shared.peers.presence.clone().heartbeat(request).await {
            Ok(response) => {
                let response = response.into_inner();
                // A change noticed here is handled by this same pass: every session
                // presence forgot is in `unknown`.
                state.answered(&response.epoch);
                response.unknown_session_ids
            }
            Err(status) => {
                state.failed(&status);
                warn!(error = %status.message(), sessions = chunk.len(), "heartbeat failed");
                continue;
            }
        };
        let sessions: Vec<Arc<Session>> = unknown
            .iter()
            .filter_map(|id| shared.sessions.get(id))
            .collect();
        again += futures::stream::iter(sessions)
            .map(|session| register_again(shared, session))
            .buffer_unordered(REGISTER_CONCURRENCY)
            .filter(|ok| futures::future::ready(*ok))
            .count()
            .await;
    }
    again
}

/// Register a session presence forgot, with its status and watches, then tell it to
/// sync. False when presence refused or failed (the next heartbeat tries again).
async fn register_again(shared: &Arc<Shared>, session: Arc<Session>) -> bool {
    if let Err(status) = shared.register(&session).await {
        warn!(session_id = %session.session_id, error = %status.message(), "re-register failed");
        return false;
    }
    let watched: Vec<String> = lock(&session.delivery).watched.iter().cloned().collect();
    if !watched.is_empty() {
        let watch = v1::WatchRequest {
            gateway_addr: shared.advertise_url.clone(),
            watcher_id: session.user_id.to_string(),
            user_ids: watched,
        };
        if let Err(status) = shared.peers.presence.clone().watch(watch).await {
            warn!(session_id = %session.session_id, error = %status.message(), "watching again failed");
        }
    }
    if push_resync(shared, &session, REASON, "") {
        shared
            .metrics
            .resyncs_sent
            .with_label_values(&[REASON])
            .inc();
    }
    debug!(session_id = %session.session_id, "session registered again");
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_epoch_or_an_answer_after_failures_means_register_again() {
        let mut view = PresenceView::default();
        assert!(!view.answered("e1"), "the first epoch is no change");
        assert!(!view.answered("e1"));
        assert!(view.answered("e2"), "presence lost its state");
        assert!(!view.answered("e2"));
        view.failed(&tonic::Status::unavailable("down"));
        view.failed(&tonic::Status::unavailable("still down"));
        assert!(view.answered("e2"), "presence is back: check every session");
        assert!(!view.answered("e2"));
        assert!(!view.answered(""), "an older presence without epochs");
        assert!(!view.answered("e2"));
    }
}
