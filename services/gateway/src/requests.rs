//! Client requests: each decoded request becomes backend calls and exactly one ack.
//!
//! | request | backend calls | ack result |
//! |---|---|---|
//! | `send` | Routing.Send | `send` |
//! | `history` | Storage.History | `history` |
//! | `sync` | Storage.Sync | `sync` |
//! | `read` | Storage.SetReadMarker, then Routing.Publish(receipt) | `ok` |
//! | `typing` | Routing.Publish(typing, without this session) | `ok` |
//! | `presence_set` | Presence.SetStatus | `presence` |
//! | `presence_watch` | Presence.Watch | `presence` |
//! | `conversation_create` | Storage.CreateConversation, then Routing.Publish(created) | `conversation` |
//! | `conversation_members` | Storage.GetConversation, or ChangeMembers then Routing.Publish | `conversation` |
//! | `conversation_list` | Storage.ListConversations | `conversations` |
//! | `ping` | none | `pong` |
//!
//! Identity (user, device, session) always comes from the connection, never from the frame.

use std::sync::Arc;

use switchboard_proto::v1::{
    self, ack, client_frame::Request, server_frame::Event, Ack, ServerFrame,
};
use switchboard_proto::ErrorCode;
use tonic::transport::Channel;
use tracing::{warn, Instrument as _};

use crate::error::GatewayError;
use crate::sessions::{lock, Session};
use crate::Shared;

/// Most user ids in one request (watch, members, create).
pub(crate) const MAX_LIST: usize = 1_000;
/// Most users one session may watch.
pub(crate) const MAX_WATCHED: usize = 1_000;

/// The gRPC clients of the peer services. Channels are lazy and shared; clones are cheap.
#[derive(Clone)]
pub(crate) struct Peers {
    pub presence: v1::presence_client::PresenceClient<Channel>,
    pub routing: v1::routing_client::RoutingClient<Channel>,
    pub storage: v1::storage_client::StorageClient<Channel>,
}

impl Peers {
    pub(crate) fn from_config(config: &switchboard_config::Config) -> anyhow::Result<Peers> {
        let cluster = &config.cluster;
        Ok(Peers {
            presence: v1::presence_client::PresenceClient::new(switchboard_rpc::channel(
                &cluster.presence_url,
                cluster,
            )?),
            routing: v1::routing_client::RoutingClient::new(switchboard_rpc::channel(
                &cluster.routing_url,
                cluster,
            )?),
            storage: v1::storage_client::StorageClient::new(switchboard_rpc::channel(
                &cluster.storage_url,
                cluster,
            )?),
        })
    }
}

/// Handle one request and build its ack.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    session: Arc<Session>,
    frame: v1::ClientFrame,
) -> Ack {
    let result = match frame.request {
        Some(request) => dispatch(&shared, &session, request).await,
        None => Err(GatewayError::rejected(
            ErrorCode::UnknownFrame,
            "frame names no known request",
        )),
    };
    let result = match result {
        Ok(result) => result,
        Err(e) => {
            if e.code() == ErrorCode::Internal || e.code() == ErrorCode::Unavailable {
                warn!(session_id = %session.session_id, error = %e, "request failed");
            }
            ack::Result::Error(e.to_event())
        }
    };
    if matches!(result, ack::Result::Send(_)) {
        shared.metrics.messages_accepted.inc();
    }
    Ack {
        id: frame.id,
        result: Some(result),
    }
}

fn require(value: &str, field: &str) -> Result<(), GatewayError> {
    if value.is_empty() {
        return Err(GatewayError::invalid(format!("`{field}` is required")));
    }
    Ok(())
}

fn bounded_list(list: &[String], field: &str) -> Result<(), GatewayError> {
    if list.len() > MAX_LIST {
        return Err(GatewayError::invalid(format!(
            "`{field}` holds more than {MAX_LIST} entries"
        )));
    }
    if list.iter().any(|u| u.is_empty()) {
        return Err(GatewayError::invalid(format!(
            "`{field}` holds an empty id"
        )));
    }
    Ok(())
}

fn event(event: Event) -> Option<ServerFrame> {
    Some(ServerFrame { event: Some(event) })
}

pub(crate) async fn dispatch(
    shared: &Shared,
    session: &Session,
    request: Request,
) -> Result<ack::Result, GatewayError> {
    let user = &*session.user_id;
    let peers = &shared.peers;
    match request {
        Request::Send(req) => {
            require(&req.conversation_id, "conversation_id")?;
            require(&req.client_msg_id, "client_msg_id")?;
            let max_body = shared.config.routing.max_body_bytes;
            if req.body.len() > max_body {
                return Err(GatewayError::rejected(
                    ErrorCode::BodyTooLarge,
                    format!("body is larger than {max_body} bytes"),
                ));
            }
            // The root of the message's trace (the client protocol carries no
            // trace context of its own).
            let span = tracing::info_span!(
                "gateway.send",
                otel.kind = "server",
                otel.status_code = tracing::field::Empty,
                service = "gateway",
                conversation_id = %req.conversation_id,
                session_id = %session.session_id,
                seq = tracing::field::Empty,
                duplicate = tracing::field::Empty,
            );
            let send = async {
                let mut request = tonic::Request::new(v1::RouteSendRequest {
                    sender_id: user.to_owned(),
                    sender_device: session.device_id.to_string(),
                    session_id: session.session_id.to_string(),
                    conversation_id: req.conversation_id,
                    client_msg_id: req.client_msg_id,
                    body: req.body,
                    content_type: req.content_type,
                    // Also in the metadata; the field is what routing writes into
                    // the event log's record when it exports no span of its own.
                    traceparent: switchboard_telemetry::traceparent(
                        &switchboard_telemetry::current_context(),
                    ),
                    ..Default::default()
                });
                switchboard_telemetry::inject(&mut request);
                peers.routing.clone().send(request).await
            };
            let result = send.instrument(span.clone()).await;
            match &result {
                Ok(r) => {
                    span.record("seq", r.get_ref().seq);
                    span.record("duplicate", r.get_ref().duplicate);
                }
                Err(_) => {
                    span.record("otel.status_code", "error");
                }
            }
            let result = result.map_err(GatewayError::backend("routing.send"))?;
            Ok(ack::Result::Send(result.into_inner()))
        }
        Request::History(req) => {
            require(&req.conversation_id, "conversation_id")?;
            let result = peers
                .storage
                .clone()
                .history(v1::StorageHistoryRequest {
                    user_id: user.to_owned(),
                    request: Some(req),
                })
                .await
                .map_err(GatewayError::backend("storage.history"))?;
            Ok(ack::Result::History(result.into_inner()))
        }
        Request::Sync(req) => {
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
        Request::Read(req) => {
            require(&req.conversation_id, "conversation_id")?;
            let marker = peers
                .storage
                .clone()
                .set_read_marker(v1::SetReadMarkerRequest {
                    conversation_id: req.conversation_id.clone(),
                    user_id: user.to_owned(),
                    seq: req.seq,
                    ..Default::default()
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
                },
            )
            .await
            .unwrap_or_else(|e| warn!(error = %e, "receipt fan-out failed"));
            Ok(ack::Result::Ok(v1::Empty {}))
        }
        Request::Typing(req) => {
            require(&req.conversation_id, "conversation_id")?;
            publish(
                shared,
                v1::PublishRequest {
                    event: event(Event::Typing(v1::TypingEvent {
                        conversation_id: req.conversation_id.clone(),
                        user_id: user.to_owned(),
                        typing: req.typing,
                        ..Default::default()
                    })),
                    conversation_id: req.conversation_id,
                    user_ids: Vec::new(),
                    exclude_session_id: session.session_id.to_string(),
                    actor_id: user.to_owned(),
                },
            )
            .await?;
            Ok(ack::Result::Ok(v1::Empty {}))
        }
        Request::PresenceSet(req) => {
            require(&req.status, "status")?;
            let response = peers
                .presence
                .clone()
                .set_status(v1::SetStatusRequest {
                    session_id: session.session_id.to_string(),
                    status: req.status,
                    ..Default::default()
                })
                .await
                .map_err(GatewayError::backend("presence.set_status"))?
                .into_inner();
            Ok(ack::Result::Presence(v1::PresenceResult {
                users: response.presence.into_iter().collect(),
            }))
        }
        Request::PresenceWatch(req) => {
            bounded_list(&req.user_ids, "user_ids")?;
            {
                // Remember the watch before registering it, so no event that presence
                // sends right after registering is filtered out here.
                let mut delivery = lock(&session.delivery);
                let new = req
                    .user_ids
                    .iter()
                    .filter(|u| !delivery.watched.contains(*u))
                    .count();
                if delivery.watched.len() + new > MAX_WATCHED {
                    return Err(GatewayError::invalid(format!(
                        "a session watches at most {MAX_WATCHED} users"
                    )));
                }
                delivery.watched.extend(req.user_ids.iter().cloned());
            }
            let response = peers
                .presence
                .clone()
                .watch(v1::WatchRequest {
                    gateway_addr: shared.advertise_url.clone(),
                    watcher_id: user.to_owned(),
                    user_ids: req.user_ids,
                })
                .await
                .map_err(GatewayError::backend("presence.watch"))?
                .into_inner();
            Ok(ack::Result::Presence(v1::PresenceResult {
                users: response.users,
            }))
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
            require(&req.conversation_id, "conversation_id")?;
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
            let Some(change) = change else {
                let conversation = peers
                    .storage
                    .clone()
                    .get_conversation(v1::GetConversationRequest {
                        conversation_id: req.conversation_id,
                        caller_id: user.to_owned(),
                    })
                    .await
                    .map_err(GatewayError::backend("storage.get_conversation"))?
                    .into_inner();
                return Ok(ack::Result::Conversation(conversation));
            };
            bounded_list(&req.user_ids, "user_ids")?;
            if req.user_ids.is_empty() {
                return Err(GatewayError::invalid("`user_ids` is required"));
            }
            let conversation = peers
                .storage
                .clone()
                .change_members(v1::ChangeMembersRequest {
                    conversation_id: req.conversation_id,
                    actor_id: user.to_owned(),
                    action: req.action,
                    user_ids: req.user_ids.clone(),
                })
                .await
                .map_err(GatewayError::backend("storage.change_members"))?
                .into_inner();
            announce(shared, session, change, &conversation, req.user_ids).await;
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
        _ => Err(GatewayError::rejected(
            ErrorCode::UnknownFrame,
            "this request is not served by this gateway yet",
        )),
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
