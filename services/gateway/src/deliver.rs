//! The internal `Gateway` gRPC service: `Deliver` pushes events into local sessions'
//! outbound queues, `Drain` starts draining.

use std::sync::Arc;

use switchboard_proto::codec::Encoding;
use switchboard_proto::v1::{
    self, gateway_server::Gateway, server_frame::Event, DeliverRequest, DeliverResponse,
    DrainRequest, DrainResponse,
};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::last_seen::{self, ContactsCache, Visibility};
use crate::sessions::{lock, FrameKind, OutFrame, PushError, Session};
use crate::Shared;

pub(crate) struct GatewayService {
    pub shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        // The server side of routing's `routing.deliver` span.
        let span = tracing::info_span!(
            "gateway.Deliver",
            otel.kind = "server",
            service = "gateway",
            deliveries = request.get_ref().deliveries.len(),
            delivered = tracing::field::Empty,
        );
        switchboard_telemetry::set_parent(
            &span,
            switchboard_telemetry::extract(request.metadata()),
        );
        let _entered = span.enter();
        let response = deliver(&self.shared, request.into_inner());
        span.record("delivered", response.delivered);
        Ok(Response::new(response))
    }

    async fn drain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        let deadline_ms = match request.into_inner().deadline_ms {
            0 => self.shared.config.gateway.drain_deadline_ms,
            ms => u64::from(ms),
        };
        let sessions = self.shared.sessions.len();
        info!(sessions, deadline_ms, "drain requested");
        self.shared.start_drain(deadline_ms);
        Ok(Response::new(DrainResponse {
            sessions: u32::try_from(sessions).unwrap_or(u32::MAX),
        }))
    }
}

/// Each event encoded at most once per encoding, on first use.
#[derive(Default)]
struct Encoded {
    json: Option<Arc<OutFrame>>,
    proto: Option<Arc<OutFrame>>,
}

impl Encoded {
    fn get(&mut self, frame: &v1::ServerFrame, encoding: Encoding) -> Arc<OutFrame> {
        let slot = match encoding {
            Encoding::Json => &mut self.json,
            Encoding::Proto => &mut self.proto,
        };
        slot.get_or_insert_with(|| Arc::new(OutFrame::encode(frame, encoding)))
            .clone()
    }
}

/// Queue an ephemeral event (presence, typing, receipt) for one session, or drop it
/// when the session's queue is more than half full. Presence events only reach a
/// session that watches the user. True when queued.
pub(crate) fn push_ephemeral(shared: &Shared, session: &Session, frame: &v1::ServerFrame) -> bool {
    let kind = FrameKind::of(frame);
    debug_assert!(kind.is_ephemeral());
    if session.is_slow() {
        return false;
    }
    let out = Arc::new(OutFrame::encode(frame, session.encoding));
    let mut state = lock(&session.delivery);
    if let Some(Event::Presence(p)) = &frame.event {
        let user = p.presence.as_ref().map_or("", |p| p.user_id.as_str());
        if !state.watched.contains(user) {
            return false;
        }
    }
    match state.push(out, session.queue) {
        Ok(()) => {
            drop(state);
            session.wake_writer();
            shared.metrics.outbound_queued.inc();
            true
        }
        Err(PushError::Full) => {
            shared
                .metrics
                .events_dropped
                .with_label_values(&[kind.as_str()])
                .inc();
            false
        }
        Err(PushError::Closed) => false,
    }
}

/// Tell one session it may have missed events (`resync`): the client syncs from its
/// cursors. Not ephemeral: a session whose queue is full is disconnected as a slow
/// consumer, and its client syncs when it reconnects anyway. True when queued.
pub(crate) fn push_resync(
    shared: &Shared,
    session: &Session,
    reason: &str,
    conversation_id: &str,
) -> bool {
    let out = resync_frame(reason, conversation_id, session.encoding);
    let mut state = lock(&session.delivery);
    push_or_close(shared, session, &mut state, out, FrameKind::Resync)
}

/// A `resync` event, encoded for one session.
fn resync_frame(reason: &str, conversation_id: &str, encoding: Encoding) -> Arc<OutFrame> {
    let frame = v1::ServerFrame {
        event: Some(Event::Resync(v1::Resync {
            reason: reason.to_owned(),
            conversation_id: conversation_id.to_owned(),
        })),
    };
    Arc::new(OutFrame::encode(&frame, encoding))
}

/// Close a session that cannot keep up (once): out of the registry at once, so later
/// deliveries skip it, and its connection closes with `slow_consumer`.
fn close_slow(shared: &Shared, session: &Session) {
    if session.mark_slow() {
        shared.sessions.remove(&session.session_id);
        shared.metrics.slow_consumer_disconnects.inc();
        info!(
            session_id = %session.session_id,
            user_id = %session.user_id,
            "slow consumer, closing"
        );
    }
}

/// Push a frame that must not be lost: a full queue closes the session as a slow
/// consumer (its client reconnects and syncs). True when queued.
fn push_or_close(
    shared: &Shared,
    session: &Session,
    state: &mut crate::sessions::DeliveryState,
    out: Arc<OutFrame>,
    kind: FrameKind,
) -> bool {
    match state.push(out, session.queue) {
        Ok(()) => {
            session.wake_writer();
            shared.metrics.outbound_queued.inc();
            true
        }
        Err(PushError::Full) if kind.is_ephemeral() => false,
        Err(PushError::Full) => {
            close_slow(shared, session);
            false
        }
        Err(PushError::Closed) => false,
    }
}

/// Enqueue each delivery for the local sessions of its recipients. Never waits: an
/// ephemeral event is dropped for a session whose queue is more than half full, a
/// full queue disconnects the session as a slow consumer. A presence event whose
/// `last_seen_ms` a viewer may not see is queued without it (see [`last_seen`]).
pub(crate) fn deliver(shared: &Arc<Shared>, request: DeliverRequest) -> DeliverResponse {
    let mut delivered: u32 = 0;
    let mut absent = Vec::new();
    let mut targets: Vec<Arc<Session>> = Vec::new();
    for delivery in request.deliveries {
        let Some(frame) = delivery.event else {
            continue;
        };
        let kind = FrameKind::of(&frame);
        // Only events travel through Deliver; anything else is a caller bug.
        if !matches!(
            kind,
            FrameKind::Message
                | FrameKind::Receipt
                | FrameKind::Typing
                | FrameKind::Presence
                | FrameKind::Conversation
                | FrameKind::Resync
        ) {
            continue;
        }
        targets.clear();
        if delivery.all_local_sessions && kind == FrameKind::Resync {
            targets.extend(shared.sessions.all());
        } else {
            for user in &delivery.recipients {
                if !shared.sessions.sessions_of(user, &mut targets) && !absent.contains(user) {
                    absent.push(user.clone());
                }
            }
        }
        if kind == FrameKind::Resync {
            shared
                .metrics
                .resyncs_sent
                .with_label_values(&["delivery_failed"])
                .inc_by(targets.len() as u64);
        }
        // The same user listed twice must not get the event twice.
        targets.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        targets.dedup_by(|a, b| a.session_id == b.session_id);
        let message_key = match &frame.event {
            Some(Event::Message(m)) => m
                .message
                .as_ref()
                .map(|m| (m.conversation_id.as_str(), m.seq, m.sent_at_ms)),
            _ => None,
        };
        // A presence event without its presence names nobody and reaches no one.
        let empty_presence = v1::UserPresence::default();
        let presence = match &frame.event {
            Some(Event::Presence(p)) => Some(p.presence.as_ref().unwrap_or(&empty_presence)),
            _ => None,
        };
        let mut encoded = Encoded::default();
        // The same event without last_seen_ms, for viewers who may not see it.
        let mut hidden: Option<(v1::ServerFrame, Encoded)> = None;
        for session in &targets {
            if *session.session_id == *delivery.exclude_session_id || session.is_slow() {
                continue;
            }
            let mut visible = true;
            if let Some(p) = presence {
                // Presence events go only to sessions that watch the user (nobody
                // unwatches, so this cannot change before the push below).
                if !lock(&session.delivery).watched.contains(&p.user_id) {
                    continue;
                }
                if last_seen::needs_check(&session.user_id, p) {
                    match ContactsCache::visibility(shared, session, p) {
                        Visibility::Known(v) => visible = v,
                        Visibility::Deferred => continue,
                    }
                }
            }
            let out = if visible {
                encoded.get(&frame, session.encoding)
            } else {
                let (frame, encoded) = hidden.get_or_insert_with(|| {
                    let p = last_seen::hidden(presence.expect("only presence is hidden"));
                    (
                        v1::ServerFrame {
                            event: Some(Event::Presence(v1::PresenceEvent { presence: Some(p) })),
                        },
                        Encoded::default(),
                    )
                });
                encoded.get(frame, session.encoding)
            };
            let mut state = lock(&session.delivery);
            // A sequence past the next one this connection expects: something before
            // it did not reach this session (a failed delivery, routes missing it).
            let mut gap = false;
            if let Some((conversation, seq, _)) = message_key {
                let last = state.last_seq.get(conversation).copied().unwrap_or(0);
                // seq 0 is a message not sequenced yet; it cannot be deduplicated.
                if seq != 0 && seq <= last {
                    continue;
                }
                gap = last != 0 && seq > last + 1;
            }
            match state.push(out, session.queue) {
                Ok(()) => {
                    if let Some((conversation, seq, sent_at_ms)) = message_key {
                        if seq != 0 {
                            state.last_seq.insert(conversation.to_owned(), seq);
                        }
                        if gap {
                            let out = resync_frame("gap", conversation, session.encoding);
                            if push_or_close(shared, session, &mut state, out, FrameKind::Resync) {
                                shared
                                    .metrics
                                    .resyncs_sent
                                    .with_label_values(&["gap"])
                                    .inc();
                            }
                        }
                        shared.metrics.messages_delivered.inc();
                        let latency_ms = crate::now_ms().saturating_sub(sent_at_ms).max(0);
                        shared
                            .metrics
                            .send_to_deliver
                            .observe(latency_ms as f64 / 1000.0);
                    }
                    drop(state);
                    session.wake_writer();
                    delivered += 1;
                    shared.metrics.outbound_queued.inc();
                }
                Err(PushError::Full) if kind.is_ephemeral() => {
                    shared
                        .metrics
                        .events_dropped
                        .with_label_values(&[kind.as_str()])
                        .inc();
                }
                Err(PushError::Full) => {
                    drop(state);
                    close_slow(shared, session);
                }
                // The connection is ending; its session leaves the registry soon.
                Err(PushError::Closed) => {}
            }
        }
    }
    DeliverResponse { delivered, absent }
}
