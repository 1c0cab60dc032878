//! The `Routing` gRPC service: Send (validate, rate-limit, dedupe, check
//! membership, have storage authorize events other than plain messages, append
//! durably, wait briefly for the sequence) and Publish (ephemeral fan-out).
//!
//! Send takes every timeline kind (message, edit, delete, reaction, system): the
//! shapes are checked here ([`EventKind::validate`]); what depends on the
//! conversation's state (the target exists, the actor's role allows it, nobody
//! banned is added) is storage `Authorize`'s answer, refused with its code before
//! anything reaches the log. A retry with the same (sender, client_msg_id) returns
//! the original event for every kind, even one that would now be refused (a
//! repeated delete, or a leave from someone no longer a member).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message as _;
use switchboard_proto::timeline::{emoji_problem, kinds, MAX_MENTIONS};
use switchboard_proto::v1::routing_server::Routing;
use switchboard_proto::v1::server_frame::Event;
use switchboard_proto::v1::{
    AuthorizeRequest, Delivery, LookupDedupeRequest, Message, PublishRequest, PublishResponse,
    RouteSendRequest, SendResult,
};
use switchboard_proto::ErrorCode;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::error::RoutingError;
use crate::eventlog::{partition_for, NewRecord};
use crate::limiter::{self, RateLimiter};
use crate::node::Node;

/// Longest conversation id and client message id, in bytes.
const MAX_ID_BYTES: usize = 128;
/// Most sends handled at once; beyond it sends fail fast with `unavailable`. This
/// also bounds the waiter map.
const MAX_INFLIGHT_SENDS: usize = 16_384;
/// Users tracked by the rate limiter.
const MAX_RATE_LIMITED_USERS: usize = 100_000;
/// Most explicit recipients of one Publish.
const MAX_PUBLISH_USERS: usize = 10_000;
const DEFAULT_CONTENT_TYPE: &str = "text/plain";
/// Longest `traceparent` carried into the log (version 00 has 55 bytes; later
/// versions may append fields).
const TRACEPARENT_MAX_BYTES: usize = 128;
/// Most users one system event names (storage applies the member limit).
const MAX_SYSTEM_USERS: usize = 10_000;

/// The kinds of timeline events a Send appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    Message,
    Edit,
    Delete,
    Reaction,
    System,
}

impl EventKind {
    /// The kind of a send, after the cheap shape checks that need no storage read
    /// (references, emoji, the system event's actor). Storage `Authorize` checks the
    /// rest against the conversation's state.
    pub(crate) fn validate(req: &RouteSendRequest) -> Result<EventKind, RoutingError> {
        let invalid = |why: &str| Err(RoutingError::InvalidRequest(why.to_owned()));
        let kind = match req.kind.as_str() {
            "" | kinds::MESSAGE => EventKind::Message,
            kinds::EDIT => EventKind::Edit,
            kinds::DELETE => EventKind::Delete,
            kinds::REACTION => EventKind::Reaction,
            kinds::SYSTEM => EventKind::System,
            _ => return invalid("kind must be one of message, edit, delete, reaction, system"),
        };
        let targets = matches!(
            kind,
            EventKind::Edit | EventKind::Delete | EventKind::Reaction
        );
        if targets && req.target_seq == 0 {
            return invalid("target_seq is required for edit, delete and reaction");
        }
        if !targets && req.target_seq != 0 {
            return invalid("target_seq is only for edit, delete and reaction");
        }
        if kind != EventKind::Message
            && (req.reply_to_seq != 0 || req.thread_root_seq != 0 || !req.mentions.is_empty())
        {
            return invalid("reply_to_seq, thread_root_seq and mentions are only for messages");
        }
        if req.mentions.len() > MAX_MENTIONS {
            return invalid("at most 50 mentions");
        }
        if req
            .mentions
            .iter()
            .any(|m| m.is_empty() || m.len() > MAX_ID_BYTES)
        {
            return invalid("a mention is empty or longer than 128 bytes");
        }
        if kind == EventKind::Reaction {
            if let Some(problem) = emoji_problem(&req.emoji) {
                return invalid(&problem);
            }
        } else if !req.emoji.is_empty() || req.remove {
            return invalid("emoji and remove are only for reactions");
        }
        if matches!(
            kind,
            EventKind::Delete | EventKind::Reaction | EventKind::System
        ) && !req.body.is_empty()
        {
            return invalid("body must be empty for delete, reaction and system events");
        }
        match (&req.system, kind) {
            (Some(system), EventKind::System) => {
                if system.actor_id != req.sender_id {
                    return invalid("system.actor_id must be the sender");
                }
                if system.action.is_empty() {
                    return invalid("system.action is required");
                }
                if system.user_ids.len() > MAX_SYSTEM_USERS {
                    return invalid("system.user_ids names too many users");
                }
            }
            (None, EventKind::System) => return invalid("system is required for kind system"),
            (Some(_), _) => return invalid("system is only for kind system"),
            (None, _) => {}
        }
        Ok(kind)
    }

    /// Whether storage must authorize the event before it is appended: everything
    /// but a plain message without references.
    pub(crate) fn needs_authorization(self, req: &RouteSendRequest) -> bool {
        self != EventKind::Message
            || req.reply_to_seq != 0
            || req.thread_root_seq != 0
            || !req.mentions.is_empty()
    }
}

/// `ids` without repeats, in first-seen order.
fn distinct(ids: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    ids.into_iter()
        .filter(|id| seen.insert(id.clone()))
        .collect()
}

/// The gRPC service. Cloning is not needed: tonic wraps it in an `Arc`.
pub struct RoutingService {
    node: Arc<Node>,
    limiter: RateLimiter,
    inflight: Semaphore,
    /// Cancelled when the service starts shutting down: new sends are refused.
    draining: CancellationToken,
}

impl RoutingService {
    pub(crate) fn new(node: Arc<Node>, draining: CancellationToken) -> RoutingService {
        let r = &node.config.routing;
        RoutingService {
            limiter: RateLimiter::new(
                r.send_rate_per_user,
                r.send_burst_per_user,
                MAX_RATE_LIMITED_USERS,
            ),
            inflight: Semaphore::new(MAX_INFLIGHT_SENDS),
            draining,
            node,
        }
    }

    pub(crate) async fn handle_send(
        &self,
        req: RouteSendRequest,
    ) -> Result<SendResult, RoutingError> {
        if self.draining.is_cancelled() {
            return Err(RoutingError::Draining);
        }
        let limits = &self.node.config.routing;
        validate_id("sender_id", &req.sender_id)?;
        validate_id("conversation_id", &req.conversation_id)?;
        validate_id("client_msg_id", &req.client_msg_id)?;
        if req.body.len() > limits.max_body_bytes {
            return Err(RoutingError::BodyTooLarge {
                size: req.body.len(),
                limit: limits.max_body_bytes,
            });
        }
        if req.content_type.len() > MAX_ID_BYTES {
            return Err(RoutingError::InvalidRequest(format!(
                "content_type is longer than {MAX_ID_BYTES} bytes"
            )));
        }
        let kind = EventKind::validate(&req)?;
        let charged_at = limiter::charge_time(req.accepted_at_ms, now_ms(), Instant::now());
        if !self.limiter.try_acquire(&req.sender_id, charged_at) {
            return Err(RoutingError::RateLimited);
        }
        let _permit = self
            .inflight
            .try_acquire()
            .map_err(|_| RoutingError::Unavailable("routing is overloaded; retry".into()))?;

        let members = self
            .node
            .members
            .get_checking(&req.conversation_id, &req.sender_id)
            .await?;
        let member = members.contains(&req.sender_id);
        let needs_authorization = kind.needs_authorization(&req);

        // A retry of an event that is already stored returns the original. A plain
        // message from a member needs no lookup here: the partition owner's Append
        // finds its dedupe key and answers with the stored message, so the common
        // send saves a storage round trip. Everything else is looked up before the
        // checks, which a retried delete, kick or leave (or a message sent before
        // the sender left) would fail now that the first attempt took effect (only
        // the sender's own events are found this way).
        if !member || needs_authorization || kind != EventKind::Message {
            let known = self
                .node
                .storage
                .clone()
                .lookup_dedupe(LookupDedupeRequest {
                    sender_id: req.sender_id.clone(),
                    client_msg_id: req.client_msg_id.clone(),
                })
                .await
                .map_err(|st| RoutingError::peer("storage LookupDedupe", &st))?
                .into_inner()
                .message;
            if let Some(stored) = known {
                tracing::Span::current().record("seq", stored.seq);
                return Ok(result_of(&stored, true));
            }
        }
        if !member {
            return Err(RoutingError::NotMember(req.conversation_id));
        }
        let content_type = match kind {
            EventKind::Message | EventKind::Edit if req.content_type.is_empty() => {
                DEFAULT_CONTENT_TYPE.to_owned()
            }
            _ => req.content_type,
        };
        let message = Message {
            conversation_id: req.conversation_id,
            seq: 0,
            message_id: uuid::Uuid::now_v7().to_string(),
            sender_id: req.sender_id,
            sender_device: req.sender_device,
            client_msg_id: req.client_msg_id,
            body: req.body,
            content_type,
            sent_at_ms: now_ms(),
            kind: req.kind,
            target_seq: req.target_seq,
            reply_to_seq: req.reply_to_seq,
            thread_root_seq: req.thread_root_seq,
            mentions: distinct(req.mentions),
            emoji: req.emoji,
            remove: req.remove,
            system: req.system,
            from_bot: req.from_bot,
            ..Default::default()
        };
        if needs_authorization {
            self.authorize(&message).await?;
        }
        let partition = partition_for(&message.conversation_id, self.node.log.partitions());
        // Register before appending so the owner cannot complete before we listen.
        let mut waiter = self
            .node
            .waiters
            .register(&message.sender_id, &message.client_msg_id);
        let record = NewRecord {
            key: message.conversation_id.as_bytes().to_vec(),
            value: message.encode_to_vec(),
            traceparent: record_traceparent(req.traceparent),
        };
        let append_timeout = Duration::from_millis(self.node.config.cluster.rpc_timeout_ms);
        let started = Instant::now();
        match tokio::time::timeout(append_timeout, self.node.log.append(partition, record)).await {
            Ok(Ok(offset)) => {
                self.node
                    .metrics
                    .log_append_seconds
                    .observe(started.elapsed().as_secs_f64());
                let span = tracing::Span::current();
                span.record("partition", partition);
                span.record("offset", offset);
                tracing::debug!(conversation_id = %message.conversation_id, partition, offset, "message appended");
            }
            Ok(Err(e)) => return Err(RoutingError::Unavailable(e.to_string())),
            Err(_) => {
                return Err(RoutingError::Unavailable(
                    "the event log did not confirm the append in time; retry".into(),
                ))
            }
        }

        // Durable from here on: whatever happens next, the answer is "accepted".
        let wait = Duration::from_millis(limits.sequence_wait_ms);
        // The owner wakes local waiters; when another instance owns the partition the
        // sequence is read back from storage as soon as that owner stored it.
        let owned_here = self.node.log.assignment().borrow().contains(&partition);
        let waited = tokio::time::timeout(wait, async {
            if owned_here {
                return (&mut waiter.rx).await.ok();
            }
            tokio::select! {
                woken = &mut waiter.rx => woken.ok(),
                stored = self.stored_by_other_owner(&message) => Some(stored),
            }
        })
        .await
        .ok()
        .flatten();
        if kind == EventKind::System {
            // The partition owner (maybe another instance) dropped its cached members
            // when it persisted the change; drop ours too, so the next send through
            // this instance is checked against the new membership.
            self.node.members.invalidate(&message.conversation_id);
        }
        match waited {
            Some(stored) => {
                let duplicate = stored.message_id != message.message_id;
                tracing::Span::current().record("seq", stored.seq);
                Ok(result_of(&stored, duplicate))
            }
            _ => {
                self.node.metrics.sequence_wait_timeouts.inc();
                Ok(result_of(&message, false))
            }
        }
    }

    /// The stored form of `message`, sequenced by another instance's partition owner:
    /// its dedupe key is looked up with backoff (2 ms doubling to 50 ms) until found.
    /// The caller bounds the wait.
    async fn stored_by_other_owner(&self, message: &Message) -> Message {
        let mut backoff = Duration::from_millis(2);
        loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(50));
            let found = self
                .node
                .storage
                .clone()
                .lookup_dedupe(LookupDedupeRequest {
                    sender_id: message.sender_id.clone(),
                    client_msg_id: message.client_msg_id.clone(),
                })
                .await;
            if let Ok(Some(stored)) = found.map(|r| r.into_inner().message) {
                self.node.metrics.sequences_read_back.inc();
                return stored;
            }
        }
    }

    /// Ask storage whether `message` may be appended now; its refusal is the
    /// client's error (not_found, forbidden, not_member, banned, invalid_request).
    async fn authorize(&self, message: &Message) -> Result<(), RoutingError> {
        let mut request = Request::new(AuthorizeRequest {
            message: Some(message.clone()),
        });
        switchboard_telemetry::inject(&mut request);
        match self.node.storage.clone().authorize(request).await {
            Ok(_) => Ok(()),
            Err(st) => {
                let code = switchboard_proto::status_error_code(&st);
                match code {
                    ErrorCode::NotFound
                    | ErrorCode::Forbidden
                    | ErrorCode::NotMember
                    | ErrorCode::Banned
                    | ErrorCode::InvalidRequest => Err(RoutingError::Refused {
                        code,
                        message: st.message().to_owned(),
                    }),
                    _ => Err(RoutingError::peer("storage Authorize", &st)),
                }
            }
        }
    }

    pub(crate) async fn handle_publish(
        &self,
        req: PublishRequest,
    ) -> Result<PublishResponse, RoutingError> {
        if req.webhooks_changed {
            validate_id("conversation_id", &req.conversation_id)?;
            self.node.webhooks.rediscover();
            return Ok(PublishResponse { gateways: 0 });
        }
        let event = req
            .event
            .ok_or_else(|| RoutingError::InvalidRequest("event is required".into()))?;
        if req.user_ids.len() > MAX_PUBLISH_USERS {
            return Err(RoutingError::InvalidRequest(format!(
                "at most {MAX_PUBLISH_USERS} user_ids"
            )));
        }
        if !req.conversation_id.is_empty() {
            validate_id("conversation_id", &req.conversation_id)?;
            if matches!(event.event, Some(Event::Conversation(_))) {
                // Membership changed: fan this and later events out to the new set.
                self.node.members.invalidate(&req.conversation_id);
            }
        }
        let members = if req.conversation_id.is_empty() {
            None
        } else if !req.actor_id.is_empty() {
            Some(
                self.node
                    .members
                    .get_checking(&req.conversation_id, &req.actor_id)
                    .await?,
            )
        } else if req.user_ids.is_empty() {
            Some(self.node.members.get(&req.conversation_id).await?)
        } else {
            None
        };
        if !req.actor_id.is_empty() {
            if let Some(members) = &members {
                if !members.contains(&req.actor_id) {
                    return Err(RoutingError::NotMember(req.conversation_id));
                }
            }
        }
        let routes = if !req.user_ids.is_empty() {
            self.node.route(&req.user_ids).await?.routes
        } else if let Some(members) = &members {
            // Typing and receipts go to the whole conversation: the interest index.
            self.node
                .route_conversation(&req.conversation_id, members.as_slice())
                .await?
                .routes
        } else {
            return Err(RoutingError::InvalidRequest(
                "conversation_id or user_ids is required".into(),
            ));
        };
        let mut gateways = 0;
        for route in routes {
            if route.user_ids.is_empty() {
                continue;
            }
            let delivery = Delivery {
                event: Some(event.clone()),
                recipients: route.user_ids,
                exclude_session_id: req.exclude_session_id.clone(),
                all_local_sessions: false,
            };
            if self
                .node
                .fanout
                .enqueue_ephemeral(&route.gateway_addr, delivery)
            {
                gateways += 1;
            }
        }
        self.node.metrics.published.inc();
        Ok(PublishResponse { gateways })
    }
}

#[tonic::async_trait]
impl Routing for RoutingService {
    async fn send(
        &self,
        request: Request<RouteSendRequest>,
    ) -> Result<Response<SendResult>, Status> {
        let metrics = &self.node.metrics;
        let span = send_span(&request);
        let result = self
            .handle_send(request.into_inner())
            .instrument(span.clone())
            .await;
        match result {
            Ok(result) => {
                let duplicate = if result.duplicate { "true" } else { "false" };
                span.record("duplicate", result.duplicate);
                metrics.sends_accepted.with_label_values(&[duplicate]).inc();
                Ok(Response::new(result))
            }
            Err(e) => {
                span.record("otel.status_code", "error");
                span.record("error.code", e.code().as_str());
                metrics
                    .sends_rejected
                    .with_label_values(&[e.code().as_str()])
                    .inc();
                Err(e.into())
            }
        }
    }

    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        self.handle_publish(request.into_inner())
            .await
            .map(Response::new)
            .map_err(Into::into)
    }
}

fn validate_id(field: &str, value: &str) -> Result<(), RoutingError> {
    if value.is_empty() {
        return Err(RoutingError::InvalidRequest(format!("{field} is required")));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(RoutingError::InvalidRequest(format!(
            "{field} is longer than {MAX_ID_BYTES} bytes"
        )));
    }
    Ok(())
}

/// The server span of a Send, child of the caller's span: from the gRPC metadata,
/// else from the request's `traceparent` field (callers that only fill the field).
fn send_span(request: &Request<RouteSendRequest>) -> tracing::Span {
    let span = tracing::info_span!(
        "routing.Send",
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        service = "routing",
        conversation_id = %request.get_ref().conversation_id,
        partition = tracing::field::Empty,
        offset = tracing::field::Empty,
        seq = tracing::field::Empty,
        duplicate = tracing::field::Empty,
        error.code = tracing::field::Empty,
    );
    let mut parent = switchboard_telemetry::extract(request.metadata());
    if !switchboard_telemetry::has_span(&parent) {
        parent = switchboard_telemetry::context_from_traceparent(&carried_traceparent(
            request.get_ref().traceparent.clone(),
        ));
    }
    switchboard_telemetry::set_parent(&span, parent);
    span
}

/// The `traceparent` written into the record: the Send span's own context when
/// traces are exported (the partition owner's `sequence` span continues from it),
/// else the caller's as it came.
fn record_traceparent(caller: String) -> String {
    let own = switchboard_telemetry::traceparent(&switchboard_telemetry::current_context());
    if own.is_empty() {
        carried_traceparent(caller)
    } else {
        own
    }
}

/// The caller's `traceparent` as the record carries it: a malformed or oversized
/// one is dropped (tracing is best effort and must never refuse a send).
fn carried_traceparent(traceparent: String) -> String {
    // W3C: version-traceid-parentid-flags, 55 visible ASCII characters in version 00.
    let plausible = traceparent.len() <= TRACEPARENT_MAX_BYTES
        && traceparent.bytes().all(|b| b.is_ascii_graphic())
        && traceparent.split('-').count() >= 4;
    if plausible {
        traceparent
    } else {
        String::new()
    }
}

fn result_of(message: &Message, duplicate: bool) -> SendResult {
    SendResult {
        conversation_id: message.conversation_id.clone(),
        message_id: message.message_id.clone(),
        seq: message.seq,
        duplicate,
        sent_at_ms: message.sent_at_ms,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod trace_tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn without_an_exported_span_the_record_carries_the_callers_traceparent() {
        assert_eq!(record_traceparent(TP.to_owned()), TP);
        assert_eq!(record_traceparent(String::new()), "");
        // Malformed or oversized context is dropped, never refused.
        assert_eq!(record_traceparent("not a traceparent".to_owned()), "");
        assert_eq!(record_traceparent(format!("{TP}-{}", "x".repeat(200))), "");
    }
}
