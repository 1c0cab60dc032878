//! Client requests: each decoded request becomes backend calls and exactly one ack.
//!
//! | request | backend calls | ack result |
//! |---|---|---|
//! | `send` | Routing.Send (kind message) | `send` |
//! | `edit`, `delete`, `react` | Routing.Send (kind edit, delete, reaction) | `send` |
//! | `conversation_update` | Routing.Send (kind system) | `send` |
//! | `history` | Storage.History | `history` |
//! | `sync` | Storage.Sync | `sync` |
//! | `thread` | Storage.Thread | `thread` |
//! | `receipts` | Storage.Receipts | `receipts` |
//! | `read` | Storage.SetReadMarker, then Routing.Publish(receipt) | `ok` |
//! | `notification_set` | Storage.SetNotification | `ok` |
//! | `typing` | Routing.Publish(typing, without this session), rate limited | `ok` |
//! | `presence_set` | Presence.SetStatus | `presence` |
//! | `presence_watch` | Presence.Watch (+ Storage.SharedContacts for last-seen privacy) | `presence` |
//! | `conversation_create` | Storage.CreateConversation, then Routing.Publish(created) | `conversation` |
//! | `conversation_members` | Storage.GetConversation, or Routing.Send (kind system), GetConversation, Routing.Publish | `conversation` |
//! | `conversation_list` | Storage.ListConversations | `conversations` |
//! | `ping` | none | `pong` |
//!
//! Identity (user, device, session, bot) always comes from the session, never from
//! the frame. [`dispatch`] is the one place that turns a request into backend calls,
//! for WebSocket connections and for HTTP requests alike.

use std::sync::Arc;
use std::time::Duration;

use switchboard_proto::timeline::{kinds, MAX_MENTIONS};
use switchboard_proto::v1::{
    self, ack, client_frame::Request, server_frame::Event, Ack, ServerFrame,
};
use switchboard_proto::ErrorCode;
use tokio::time::Instant;
use tracing::{debug, warn, Instrument as _};

use crate::error::GatewayError;
use crate::last_seen;
use crate::sessions::{lock, Session};
use crate::Shared;

/// Most user ids in one request (watch, members, create).
pub(crate) const MAX_LIST: usize = 1_000;
/// Most users one session may watch.
pub(crate) const MAX_WATCHED: usize = 1_000;

/// Handle one request and build its ack. Also returns the error code when the
/// failure counts as the client's fault (toward `gateway.max_violations`).
/// `accepted_at_ms` is when the frame arrived (see [`dispatch`]).
pub(crate) async fn handle(
    shared: Arc<Shared>,
    session: Arc<Session>,
    frame: v1::ClientFrame,
    accepted_at_ms: u64,
) -> (Ack, Option<ErrorCode>) {
    let result = match frame.request {
        Some(request) => dispatch(&shared, &session, request, accepted_at_ms).await,
        None => Err(GatewayError::rejected(
            ErrorCode::UnknownFrame,
            "frame names no known request",
        )),
    };
    let mut fault = None;
    let result = match result {
        Ok(result) => result,
        Err(e) => {
            if matches!(
                e.code(),
                ErrorCode::Internal | ErrorCode::Unavailable | ErrorCode::Timeout
            ) {
                warn!(session_id = %session.session_id, error = %e, "request failed");
            }
            // The typing limit is an answer ("not so often"), not misbehaviour.
            if !e.is_typing_throttle() {
                fault = Some(e.code());
            }
            ack::Result::Error(e.to_event())
        }
    };
    if matches!(result, ack::Result::Send(_)) {
        shared.metrics.messages_accepted.inc();
    }
    let ack = Ack {
        id: frame.id,
        result: Some(result),
    };
    (ack, fault)
}

fn require(value: &str, field: &str) -> Result<(), GatewayError> {
    if value.is_empty() {
        return Err(GatewayError::invalid(format!("`{field}` is required")));
    }
    Ok(())
}

fn require_seq(seq: u64, field: &str) -> Result<(), GatewayError> {
    if seq == 0 {
        return Err(GatewayError::invalid(format!("`{field}` is required")));
    }
    Ok(())
}

/// A conversation id or client message id: the protocol's id rule
/// (`switchboard_proto::ids`), checked here so a bad one is `invalid_request`
/// before any backend is called.
pub(crate) fn check_id(value: &str, field: &str) -> Result<(), GatewayError> {
    match switchboard_proto::ids::id_problem(value) {
        None => Ok(()),
        Some(_) if value.is_empty() => Err(GatewayError::invalid(format!("`{field}` is required"))),
        Some(problem) => Err(GatewayError::invalid(format!("`{field}` {problem}"))),
    }
}

/// Like [`check_id`], but empty means "none" (the server picks one).
fn check_optional_id(value: &str, field: &str) -> Result<(), GatewayError> {
    if value.is_empty() {
        return Ok(());
    }
    check_id(value, field)
}

/// A user id, with the rule of a token's `sub`.
pub(crate) fn check_user(value: &str, field: &str) -> Result<(), GatewayError> {
    switchboard_auth::validate_user_id(value)
        .map_err(|e| GatewayError::invalid(format!("`{field}`: {e}")))
}

/// A list of user ids: at most [`MAX_LIST`], each a valid user id.
fn bounded_list(list: &[String], field: &str) -> Result<(), GatewayError> {
    if list.len() > MAX_LIST {
        return Err(GatewayError::invalid(format!(
            "`{field}` holds more than {MAX_LIST} entries"
        )));
    }
    for user in list {
        check_user(user, field)?;
    }
    Ok(())
}

fn check_body(shared: &Shared, body: &str) -> Result<(), GatewayError> {
    let max_body = shared.config.routing.max_body_bytes;
    if body.len() > max_body {
        return Err(GatewayError::rejected(
            ErrorCode::BodyTooLarge,
            format!("body is larger than {max_body} bytes"),
        ));
    }
    Ok(())
}

fn check_mentions(mentions: &[String]) -> Result<(), GatewayError> {
    if mentions.len() > MAX_MENTIONS {
        return Err(GatewayError::invalid(format!(
            "`mentions` holds more than {MAX_MENTIONS} users"
        )));
    }
    for user in mentions {
        switchboard_auth::validate_user_id(user)
            .map_err(|e| GatewayError::invalid(format!("`mentions`: {e}")))?;
    }
    Ok(())
}

fn event(event: Event) -> Option<ServerFrame> {
    Some(ServerFrame { event: Some(event) })
}

/// The system event action of a `conversation_update` action.
fn system_action(action: &str) -> Result<&'static str, GatewayError> {
    Ok(match action {
        "rename" => "renamed",
        "topic" => "topic_changed",
        "add" => "members_added",
        "kick" => "members_removed",
        "ban" => "members_banned",
        "unban" => "members_unbanned",
        "leave" => "member_left",
        "role" => "role_changed",
        other => {
            return Err(GatewayError::invalid(format!(
                "unknown action `{other}` (rename, topic, add, kick, ban, unban, leave or role)"
            )))
        }
    })
}

/// The client's idempotency key, or a new one when it sent none.
fn msg_id_or_new(client_msg_id: String) -> String {
    if client_msg_id.is_empty() {
        uuid::Uuid::new_v4().to_string()
    } else {
        client_msg_id
    }
}

/// Append one timeline event through routing. Identity (sender, device, session,
/// bot) comes from the session; the caller fills the event's fields.
async fn route_send(
    shared: &Shared,
    session: &Session,
    accepted_at_ms: u64,
    mut send: v1::RouteSendRequest,
) -> Result<v1::SendResult, GatewayError> {
    send.sender_id = session.user_id.to_string();
    send.sender_device = session.device_id.to_string();
    send.session_id = session.session_id.to_string();
    send.from_bot = session.bot;
    send.accepted_at_ms = accepted_at_ms;
    // The root of the event's trace (the client protocol carries no trace context
    // of its own).
    let span = tracing::info_span!(
        "gateway.send",
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        service = "gateway",
        conversation_id = %send.conversation_id,
        session_id = %session.session_id,
        kind = %if send.kind.is_empty() { kinds::MESSAGE } else { send.kind.as_str() },
        seq = tracing::field::Empty,
        duplicate = tracing::field::Empty,
    );
    let call = async {
        // Also in the metadata; the field is what routing writes into the event
        // log's record when it exports no span of its own.
        send.traceparent =
            switchboard_telemetry::traceparent(&switchboard_telemetry::current_context());
        let mut request = tonic::Request::new(send);
        switchboard_telemetry::inject(&mut request);
        shared.peers.routing.clone().send(request).await
    };
    let result = call.instrument(span.clone()).await;
    match &result {
        Ok(r) => {
            span.record("seq", r.get_ref().seq);
            span.record("duplicate", r.get_ref().duplicate);
        }
        Err(_) => {
            span.record("otel.status_code", "error");
        }
    }
    Ok(result
        .map_err(GatewayError::backend("routing.send"))?
        .into_inner())
}

/// Turn one client request into backend calls and its ack result. `session` is the
/// caller: a WebSocket connection, or a stand-in for one HTTP request.
/// `accepted_at_ms` (Unix ms) is when the gateway took the request, before it waited
/// behind the connection's earlier requests: routing charges sends to the sender's
/// rate limit at that time.
pub(crate) async fn dispatch(
    shared: &Shared,
    session: &Session,
    request: Request,
    accepted_at_ms: u64,
) -> Result<ack::Result, GatewayError> {
    let user = &*session.user_id;
    let peers = &shared.peers;
    match request {
        Request::Send(req) => {
            check_id(&req.conversation_id, "conversation_id")?;
            check_id(&req.client_msg_id, "client_msg_id")?;
            check_body(shared, &req.body)?;
            check_mentions(&req.mentions)?;
            let result = route_send(
                shared,
                session,
                accepted_at_ms,
                v1::RouteSendRequest {
                    conversation_id: req.conversation_id,
                    client_msg_id: req.client_msg_id,
                    body: req.body,
                    content_type: req.content_type,
                    reply_to_seq: req.reply_to_seq,
                    thread_root_seq: req.thread_root_seq,
                    mentions: req.mentions,
                    ..Default::default()
                },
            )
            .await?;
            Ok(ack::Result::Send(result))
        }
        Request::Edit(req) => {
            check_id(&req.conversation_id, "conversation_id")?;
            require_seq(req.seq, "seq")?;
            check_id(&req.client_msg_id, "client_msg_id")?;
            check_body(shared, &req.body)?;
            let result = route_send(
                shared,
                session,
                accepted_at_ms,
                v1::RouteSendRequest {
                    kind: kinds::EDIT.into(),
                    conversation_id: req.conversation_id,
                    client_msg_id: req.client_msg_id,
                    target_seq: req.seq,
                    body: req.body,
                    content_type: req.content_type,
                    ..Default::default()
                },
            )
            .await?;
            Ok(ack::Result::Send(result))
        }
        Request::Delete(req) => {
            check_id(&req.conversation_id, "conversation_id")?;
            require_seq(req.seq, "seq")?;
            check_id(&req.client_msg_id, "client_msg_id")?;
            let result = route_send(
                shared,
                session,
                accepted_at_ms,
                v1::RouteSendRequest {
                    kind: kinds::DELETE.into(),
                    conversation_id: req.conversation_id,
                    client_msg_id: req.client_msg_id,
                    target_seq: req.seq,
                    ..Default::default()
                },
            )
            .await?;
            Ok(ack::Result::Send(result))
        }
        Request::React(req) => {
            check_id(&req.conversation_id, "conversation_id")?;
            require_seq(req.seq, "seq")?;
            check_id(&req.client_msg_id, "client_msg_id")?;
            if let Some(problem) = switchboard_proto::timeline::emoji_problem(&req.emoji) {
                return Err(GatewayError::invalid(problem));
            }
            let result = route_send(
                shared,
                session,
                accepted_at_ms,
                v1::RouteSendRequest {
                    kind: kinds::REACTION.into(),
                    conversation_id: req.conversation_id,
                    client_msg_id: req.client_msg_id,
                    target_seq: req.seq,
                    emoji: req.emoji,
                    remove: req.remove,
                    ..Default::default()
                },
            )
            .await?;
            Ok(ack::Result::Send(result))
        }
        Request::ConversationUpdate(req) => {
            check_id(&req.conversation_id, "conversation_id")?;
            check_optional_id(&req.client_msg_id, "client_msg_id")?;
            let action = system_action(&req.action)?;
            let user_ids = match action {
                "member_left" => vec![user.to_owned()],
                "members_added" | "members_removed" | "members_banned" | "members_unbanned"
                | "role_changed" => {
                    bounded_list(&req.user_ids, "user_ids")?;
                    if req.user_ids.is_empty() {
                        return Err(GatewayError::invalid("`user_ids` is required"));
                    }
                    req.user_ids
                }
                _ => Vec::new(),
            };
            match action {
                "renamed" => require(&req.name, "name")?,
                "role_changed" => require(&req.role, "role")?,
                _ => {}
            }
            let system = v1::SystemEvent {
                action: action.to_owned(),
                actor_id: user.to_owned(),
                user_ids,
                name: req.name,
                topic: req.topic,
                role: req.role,
            };
            let result = route_send(
                shared,
                session,
                accepted_at_ms,
                system_send(
                    req.conversation_id,
                    msg_id_or_new(req.client_msg_id),
                    system,
                ),
            )
            .await?;
            Ok(ack::Result::Send(result))
        }
        Request::History(req) => {
            check_id(&req.conversation_id, "conversation_id")?;
            let result = peers
                .storage
                .clone()
                .history(v1::StorageHistoryRequest {
                    user_id: user.to_owned(),
                    request: Some(req),
                    webhook_id: String::new(),
                })
                .await
                .map_err(GatewayError::backend("storage.history"))?;
            Ok(ack::Result::History(result.into_inner()))
        }
        Request::Sync(req) => {
            for cursor in &req.cursors {
                check_id(&cursor.conversation_id, "cursors.conversation_id")?;
            }
            let result = peers
                .storage
                .clone()
                .sync(v1::StorageSyncRequest {
                    user_id: user.to_owned(),
                    request: Some(req),
                })
                .await
                .map_err(GatewayError::backend("storage.sync"))?;
            Ok(ack::Result::Sync(result.into_inner()))
        }
        Request::Thread(req) => {
            check_id(&req.conversation_id, "conversation_id")?;
            require_seq(req.root_seq, "root_seq")?;
            let result = peers
                .storage
                .clone()
                .thread(v1::StorageThreadRequest {
                    user_id: user.to_owned(),
                    request: Some(req),
                })
                .await
                .map_err(GatewayError::backend("storage.thread"))?;
            Ok(ack::Result::Thread(result.into_inner()))
        }
        Request::Receipts(req) => {
            check_id(&req.conversation_id, "conversation_id")?;
            let result = peers
                .storage
                .clone()
                .receipts(v1::StorageReceiptsRequest {
                    user_id: user.to_owned(),
                    request: Some(req),
                })
                .await
                .map_err(GatewayError::backend("storage.receipts"))?;
            Ok(ack::Result::Receipts(result.into_inner()))
        }
        Request::Read(req) => {
            check_id(&req.conversation_id, "conversation_id")?;
            if !matches!(req.kind.as_str(), "" | "read" | "delivered") {
                return Err(GatewayError::invalid(format!(
                    "unknown kind `{}` (read or delivered)",
                    req.kind
                )));
            }
            let marker = peers
                .storage
                .clone()
                .set_read_marker(v1::SetReadMarkerRequest {
                    conversation_id: req.conversation_id.clone(),
                    user_id: user.to_owned(),
                    seq: req.seq,
                    kind: req.kind,
                })
                .await
                .map_err(GatewayError::backend("storage.set_read_marker"))?
                .into_inner();
            // The marker is stored: a failed fan-out only delays others' view of it.
            publish(
                shared,
                v1::PublishRequest {
                    event: event(Event::Receipt(v1::ReceiptEvent {
                        marker: Some(marker),
                    })),
                    conversation_id: req.conversation_id,
                    user_ids: Vec::new(),
                    exclude_session_id: session.session_id.to_string(),
                    actor_id: user.to_owned(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_or_else(|e| warn!(error = %e, "receipt fan-out failed"));
            Ok(ack::Result::Ok(v1::Empty {}))
        }
        Request::NotificationSet(req) => {
            // No conversation: the user's global do-not-disturb.
            check_optional_id(&req.conversation_id, "conversation_id")?;
            if req.until_ms < -1 {
                return Err(GatewayError::invalid(
                    "`until_ms` is -1 (forever), 0 (off) or a time in ms since the epoch",
                ));
            }
            peers
                .storage
                .clone()
                .set_notification(v1::SetNotificationRequest {
                    user_id: user.to_owned(),
                    conversation_id: req.conversation_id,
                    until_ms: req.until_ms,
                })
                .await
                .map_err(GatewayError::backend("storage.set_notification"))?;
            Ok(ack::Result::Ok(v1::Empty {}))
        }
        Request::Typing(req) => {
            check_id(&req.conversation_id, "conversation_id")?;
            let gateway = &shared.config.gateway;
            let interval = Duration::from_millis(gateway.typing_interval_ms);
            let now = Instant::now();
            if req.typing && !session.typing_allowed(&req.conversation_id, now, interval) {
                return Err(GatewayError::typing_throttle(format!(
                    "typing events at most every {} ms per conversation",
                    gateway.typing_interval_ms
                )));
            }
            publish(
                shared,
                v1::PublishRequest {
                    event: event(Event::Typing(v1::TypingEvent {
                        conversation_id: req.conversation_id.clone(),
                        user_id: user.to_owned(),
                        typing: req.typing,
                        expires_in_ms: u32::try_from(gateway.typing_expiry_ms).unwrap_or(u32::MAX),
                    })),
                    conversation_id: req.conversation_id.clone(),
                    user_ids: Vec::new(),
                    exclude_session_id: session.session_id.to_string(),
                    actor_id: user.to_owned(),
                    ..Default::default()
                },
            )
            .await?;
            if req.typing {
                session.typing_forwarded(&req.conversation_id, now, interval);
            }
            Ok(ack::Result::Ok(v1::Empty {}))
        }
        Request::PresenceSet(req) => {
            if req.status.is_empty()
                && req.status_text.is_none()
                && req.last_seen_privacy.is_empty()
            {
                return Err(GatewayError::invalid(
                    "one of `status`, `status_text` or `last_seen_privacy` is required",
                ));
            }
            // Remembered before presence hears it, so that a registration racing with
            // this change (presence forgot the session) does not bring back the old
            // status; an unknown status is left for presence to refuse.
            if let Some(status) = crate::sessions::session_status(&req.status) {
                session.choose_status(status);
            }
            let response = peers
                .presence
                .clone()
                .set_status(v1::SetStatusRequest {
                    session_id: session.session_id.to_string(),
                    status: req.status,
                    status_text: req.status_text,
                    last_seen_privacy: req.last_seen_privacy,
                    automatic: false,
                })
                .await
                .map_err(GatewayError::backend("presence.set_status"))?
                .into_inner();
            // The user's own presence: nothing to hide from them.
            Ok(ack::Result::Presence(v1::PresenceResult {
                users: response.presence.into_iter().collect(),
            }))
        }
        Request::PresenceWatch(req) => {
            // Every id is a valid user id (at most 128 bytes) before any is stored:
            // the watched set is bounded by bytes, MAX_WATCHED ids of at most 128.
            bounded_list(&req.user_ids, "user_ids")?;
            let added: Vec<String> = {
                // Remember the watch before registering it, so no event that presence
                // sends right after registering is filtered out here.
                let mut delivery = lock(&session.delivery);
                let mut added: Vec<String> = Vec::new();
                for id in &req.user_ids {
                    if !delivery.watched.contains(id) && !added.contains(id) {
                        added.push(id.clone());
                    }
                }
                if delivery.watched.len() + added.len() > MAX_WATCHED {
                    return Err(GatewayError::invalid(format!(
                        "a session watches at most {MAX_WATCHED} users"
                    )));
                }
                delivery.watched.extend(added.iter().cloned());
                added
            };
            let watched = peers
                .presence
                .clone()
                .watch(v1::WatchRequest {
                    gateway_addr: shared.advertise_url.clone(),
                    watcher_id: user.to_owned(),
                    user_ids: req.user_ids,
                })
                .await;
            let mut users = match watched {
                Ok(response) => response.into_inner().users,
                Err(status) => {
                    // Refused (or failed): what this request added is forgotten, so
                    // refused ids hold neither memory nor the session's watch quota.
                    let mut delivery = lock(&session.delivery);
                    for id in &added {
                        delivery.watched.remove(id);
                    }
                    if delivery.watched.is_empty() {
                        delivery.watched = Default::default();
                    }
                    return Err(GatewayError::backend("presence.watch")(status));
                }
            };
            last_seen::filter(shared, user, &mut users).await;
            Ok(ack::Result::Presence(v1::PresenceResult { users }))
        }
        Request::ConversationCreate(req) => {
            bounded_list(&req.members, "members")?;
            let conversation = peers
                .storage
                .clone()
                .create_conversation(v1::CreateConversationRequest {
                    creator_id: user.to_owned(),
                    kind: req.kind,
                    members: req.members,
                    name: req.name,
                })
                .await
                .map_err(GatewayError::backend("storage.create_conversation"))?
                .into_inner();
            announce(shared, session, "created", &conversation, Vec::new()).await;
            Ok(ack::Result::Conversation(conversation))
        }
        Request::ConversationMembers(req) => {
            check_id(&req.conversation_id, "conversation_id")?;
            let change = match req.action.as_str() {
                "" | "list" => None,
                "add" => Some("members_added"),
                "remove" => Some("members_removed"),
                other => {
                    return Err(GatewayError::invalid(format!(
                        "unknown action `{other}` (list, add or remove)"
                    )))
                }
            };
            let get = v1::GetConversationRequest {
                conversation_id: req.conversation_id.clone(),
                caller_id: user.to_owned(),
            };
            let Some(change) = change else {
                let conversation = peers
                    .storage
                    .clone()
                    .get_conversation(get)
                    .await
                    .map_err(GatewayError::backend("storage.get_conversation"))?
                    .into_inner();
                return Ok(ack::Result::Conversation(conversation));
            };
            bounded_list(&req.user_ids, "user_ids")?;
            if req.user_ids.is_empty() {
                return Err(GatewayError::invalid("`user_ids` is required"));
            }
            // Removing only oneself is leaving.
            let leaving = change == "members_removed" && req.user_ids.iter().all(|u| u == user);
            let system = v1::SystemEvent {
                action: if leaving { "member_left" } else { change }.to_owned(),
                actor_id: user.to_owned(),
                user_ids: if leaving {
                    vec![user.to_owned()]
                } else {
                    req.user_ids.clone()
                },
                ..Default::default()
            };
            route_send(
                shared,
                session,
                accepted_at_ms,
                system_send(
                    req.conversation_id.clone(),
                    msg_id_or_new(String::new()),
                    system,
                ),
            )
            .await?;
            let read_back = peers.storage.clone().get_conversation(get).await;
            let conversation = match read_back {
                Ok(conversation) => conversation.into_inner(),
                // The caller left and may no longer read the conversation.
                Err(_) if leaving => v1::Conversation {
                    conversation_id: req.conversation_id,
                    ..Default::default()
                },
                Err(status) => {
                    return Err(GatewayError::backend("storage.get_conversation")(status))
                }
            };
            if !leaving {
                // Clients of the `conversation` event learn the change as before;
                // the system event in the timeline is the durable record.
                announce(shared, session, change, &conversation, req.user_ids).await;
            }
            Ok(ack::Result::Conversation(conversation))
        }
        Request::ConversationList(_) => {
            let result = peers
                .storage
                .clone()
                .list_conversations(v1::ListConversationsRequest {
                    user_id: user.to_owned(),
                })
                .await
                .map_err(GatewayError::backend("storage.list_conversations"))?;
            Ok(ack::Result::Conversations(result.into_inner()))
        }
        Request::Ping(_) => Ok(ack::Result::Pong(v1::PongResult {
            server_time_ms: crate::now_ms(),
        })),
    }
}

/// A `system` timeline event for routing.
fn system_send(
    conversation_id: String,
    client_msg_id: String,
    system: v1::SystemEvent,
) -> v1::RouteSendRequest {
    v1::RouteSendRequest {
        kind: kinds::SYSTEM.into(),
        conversation_id,
        client_msg_id,
        system: Some(system),
        ..Default::default()
    }
}

/// Set the session's status on behalf of the idle timer (`automatic`): "away" after
/// `gateway.idle_away_after_ms` without a frame other than ping, "online" at the
/// next one. Presence never lets this override a status the user chose.
pub(crate) async fn set_automatic_status(shared: &Shared, session: &Session, status: &str) {
    let result = shared
        .peers
        .presence
        .clone()
        .set_status(v1::SetStatusRequest {
            session_id: session.session_id.to_string(),
            status: status.to_owned(),
            automatic: true,
            ..Default::default()
        })
        .await;
    if let Err(e) = result {
        debug!(
            session_id = %session.session_id,
            status,
            error = %e.message(),
            "automatic status change failed"
        );
    }
}

async fn publish(shared: &Shared, request: v1::PublishRequest) -> Result<(), GatewayError> {
    shared
        .peers
        .routing
        .clone()
        .publish(request)
        .await
        .map_err(GatewayError::backend("routing.publish"))?;
    Ok(())
}

/// Tell the members (and the users added or removed) about a conversation change. The
/// change is already stored; a failed fan-out is logged, clients catch up with `sync`.
async fn announce(
    shared: &Shared,
    session: &Session,
    change: &str,
    conversation: &v1::Conversation,
    affected: Vec<String>,
) {
    let mut recipients = conversation.members.clone();
    for user in &affected {
        if !recipients.contains(user) {
            recipients.push(user.clone());
        }
    }
    let request = v1::PublishRequest {
        event: event(Event::Conversation(v1::ConversationEvent {
            change: change.to_owned(),
            conversation: Some(conversation.clone()),
            actor_id: session.user_id.to_string(),
            user_ids: affected,
        })),
        // Naming the conversation makes routing drop its cached member list at once.
        // No actor check: the actor may just have left the conversation.
        conversation_id: conversation.conversation_id.clone(),
        user_ids: recipients,
        exclude_session_id: session.session_id.to_string(),
        actor_id: String::new(),
        webhooks_changed: false,
    };
    if let Err(e) = publish(shared, request).await {
        warn!(
            conversation_id = %conversation.conversation_id,
            change,
            error = %e,
            "conversation change fan-out failed"
        );
    }
}
