//! Gateway tests against fake presence, routing and storage servers on 127.0.0.1:0,
//! driven by a real WebSocket client.
//!
//! The tests run on tokio's current-thread runtime: a `Deliver` call then enqueues
//! its whole batch before any connection task runs, which makes queue overflow
//! deterministic.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use prost::Message as _;
use serde_json::{json, Value};
use switchboard_config::Config;
use switchboard_gateway::{close_code, Gateway, Listeners};
use switchboard_proto::v1::{
    self, gateway_client::GatewayClient, presence_server, routing_server, server_frame::Event,
    storage_server,
};
use switchboard_proto::{status, ErrorCode};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

const SECRET: &str = "gateway-test-secret-0123456789abcdef";
const FORBIDDEN: &str = "not-my-conversation";
const TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- fake backends

/// What the fakes were asked.
#[derive(Default)]
struct Calls {
    registered: Vec<v1::SessionInfo>,
    sends: Vec<v1::RouteSendRequest>,
    publishes: Vec<v1::PublishRequest>,
    watches: Vec<v1::WatchRequest>,
    dropped_gateways: Vec<String>,
    /// Heartbeats naming sessions (probes without sessions are not recorded).
    heartbeats: Vec<v1::HeartbeatRequest>,
    /// The epoch the fake presence answers ("e1" while empty).
    epoch: String,
    /// RegisterSession fails with `unavailable` (presence unreachable).
    presence_down: bool,
    statuses: Vec<v1::SetStatusRequest>,
    threads: Vec<v1::StorageThreadRequest>,
    receipts: Vec<v1::StorageReceiptsRequest>,
    notifications: Vec<v1::SetNotificationRequest>,
    read_markers: Vec<v1::SetReadMarkerRequest>,
    gets: Vec<v1::GetConversationRequest>,
    shared_contacts: Vec<v1::SharedContactsRequest>,
}

type Recorder = Arc<Mutex<Calls>>;

/// A conversation id `error:<code>` makes the fake backends fail with that code.
fn injected(conversation_id: &str) -> Result<(), Status> {
    match conversation_id.strip_prefix("error:") {
        Some(code) => Err(status(
            ErrorCode::parse(code).expect("a known error code"),
            format!("injected {code}"),
        )),
        None => Ok(()),
    }
}

/// Users whose last-seen privacy the fake presence reports as "contacts".
fn fake_privacy(user: &str) -> String {
    if user.contains("private") {
        "contacts".into()
    } else {
        String::new()
    }
}

struct FakePresence(Recorder, Arc<tokio::sync::Notify>);

#[tonic::async_trait]
impl presence_server::Presence for FakePresence {
    async fn register_session(
        &self,
        request: Request<v1::RegisterSessionRequest>,
    ) -> Result<Response<v1::RegisterSessionResponse>, Status> {
        let session = request.into_inner().session.unwrap_or_default();
        if self.0.lock().unwrap().presence_down {
            return Err(Status::unavailable("presence is down"));
        }
        self.0.lock().unwrap().registered.push(session);
        self.1.notify_waiters();
        Ok(Response::new(Default::default()))
    }
    async fn unregister_session(
        &self,
        _: Request<v1::UnregisterSessionRequest>,
    ) -> Result<Response<v1::UnregisterSessionResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        // Presence "forgot" every session (as after a restart of an in-memory store).
        let request = request.into_inner();
        let unknown_session_ids = request.session_ids.clone();
        let mut calls = self.0.lock().unwrap();
        if !request.session_ids.is_empty() {
            calls.heartbeats.push(request);
        }
        let epoch = match calls.epoch.as_str() {
            "" => "e1".to_owned(),
            e => e.to_owned(),
        };
        Ok(Response::new(v1::HeartbeatResponse {
            unknown_session_ids,
            epoch,
        }))
    }
    async fn set_status(
        &self,
        request: Request<v1::SetStatusRequest>,
    ) -> Result<Response<v1::SetStatusResponse>, Status> {
        let request = request.into_inner();
        let presence = v1::UserPresence {
            user_id: "me".into(),
            status: request.status.clone(),
            status_text: request.status_text.clone().unwrap_or_default(),
            ..Default::default()
        };
        self.0.lock().unwrap().statuses.push(request);
        self.1.notify_waiters();
        Ok(Response::new(v1::SetStatusResponse {
            presence: Some(presence),
        }))
    }
    async fn query(
        &self,
        _: Request<v1::QueryRequest>,
    ) -> Result<Response<v1::QueryResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<v1::QueryResponse>, Status> {
        let request = request.into_inner();
        if request.user_ids.iter().any(|u| u.starts_with("refused")) {
            self.0.lock().unwrap().watches.push(request);
            return Err(status(ErrorCode::InvalidRequest, "unknown user"));
        }
        let users = request
            .user_ids
            .iter()
            .map(|u| v1::UserPresence {
                user_id: u.clone(),
                status: "online".into(),
                last_seen_ms: 1,
                sessions: 1,
                last_seen_privacy: fake_privacy(u),
                ..Default::default()
            })
            .collect();
        self.0.lock().unwrap().watches.push(request);
        Ok(Response::new(v1::QueryResponse { users }))
    }
    async fn route(
        &self,
        _: Request<v1::RouteRequest>,
    ) -> Result<Response<v1::RouteResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
    async fn drop_gateway(
        &self,
        request: Request<v1::DropGatewayRequest>,
    ) -> Result<Response<v1::DropGatewayResponse>, Status> {
        let addr = request.into_inner().gateway_addr;
        self.0.lock().unwrap().dropped_gateways.push(addr);
        Ok(Response::new(Default::default()))
    }
}

struct FakeRouting(Recorder);

#[tonic::async_trait]
impl routing_server::Routing for FakeRouting {
    async fn send(
        &self,
        request: Request<v1::RouteSendRequest>,
    ) -> Result<Response<v1::SendResult>, Status> {
        let request = request.into_inner();
        if request.conversation_id == FORBIDDEN {
            return Err(status(
                ErrorCode::NotMember,
                "not a member of the conversation",
            ));
        }
        injected(&request.conversation_id)?;
        let result = v1::SendResult {
            conversation_id: request.conversation_id.clone(),
            message_id: format!("msg-{}", request.client_msg_id),
            seq: 1,
            duplicate: false,
            sent_at_ms: 1,
        };
        self.0.lock().unwrap().sends.push(request);
        Ok(Response::new(result))
    }
    async fn publish(
        &self,
        request: Request<v1::PublishRequest>,
    ) -> Result<Response<v1::PublishResponse>, Status> {
        self.0.lock().unwrap().publishes.push(request.into_inner());
        Ok(Response::new(v1::PublishResponse { gateways: 1 }))
    }
}

struct FakeStorage(Recorder, Arc<tokio::sync::Notify>);

#[tonic::async_trait]
impl storage_server::Storage for FakeStorage {
    async fn authorize(
        &self,
        _request: tonic::Request<switchboard_proto::v1::AuthorizeRequest>,
    ) -> Result<tonic::Response<switchboard_proto::v1::AuthorizeResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("authorize"))
    }
    async fn thread(
        &self,
        request: Request<v1::StorageThreadRequest>,
    ) -> Result<Response<v1::ThreadResult>, Status> {
        let request = request.into_inner();
        let inner = request.request.clone().unwrap_or_default();
        injected(&inner.conversation_id)?;
        self.0.lock().unwrap().threads.push(request);
        Ok(Response::new(v1::ThreadResult {
            conversation_id: inner.conversation_id,
            root: Some(v1::Message {
                seq: inner.root_seq,
                reply_count: 1,
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
    async fn receipts(
        &self,
        request: Request<v1::StorageReceiptsRequest>,
    ) -> Result<Response<v1::ReceiptsResult>, Status> {
        let request = request.into_inner();
        let inner = request.request.clone().unwrap_or_default();
        injected(&inner.conversation_id)?;
        self.0.lock().unwrap().receipts.push(request);
        Ok(Response::new(v1::ReceiptsResult {
            conversation_id: inner.conversation_id,
            seq: inner.seq.max(7),
            read_by: 2,
            delivered_to: 3,
            ..Default::default()
        }))
    }
    async fn set_notification(
        &self,
        request: Request<v1::SetNotificationRequest>,
    ) -> Result<Response<v1::SetNotificationResponse>, Status> {
        let request = request.into_inner();
        injected(&request.conversation_id)?;
        self.0.lock().unwrap().notifications.push(request);
        Ok(Response::new(Default::default()))
    }
    async fn notification_targets(
        &self,
        _request: tonic::Request<switchboard_proto::v1::NotificationTargetsRequest>,
    ) -> Result<tonic::Response<switchboard_proto::v1::NotificationTargetsResponse>, tonic::Status>
    {
        Err(tonic::Status::unimplemented("notification_targets"))
    }
    /// Users whose id starts with "friend" share a conversation with everyone.
    async fn shared_contacts(
        &self,
        request: Request<v1::SharedContactsRequest>,
    ) -> Result<Response<v1::SharedContactsResponse>, Status> {
        let request = request.into_inner();
        let shared = request
            .other_ids
            .iter()
            .filter(|u| u.starts_with("friend"))
            .cloned()
            .collect();
        self.0.lock().unwrap().shared_contacts.push(request);
        self.1.notify_waiters();
        Ok(Response::new(v1::SharedContactsResponse { shared }))
    }
    async fn put_webhook(
        &self,
        _request: tonic::Request<switchboard_proto::v1::PutWebhookRequest>,
    ) -> Result<tonic::Response<switchboard_proto::v1::Webhook>, tonic::Status> {
        Err(tonic::Status::unimplemented("put_webhook"))
    }
    async fn list_webhooks(
        &self,
        _request: tonic::Request<switchboard_proto::v1::ListWebhooksRequest>,
    ) -> Result<tonic::Response<switchboard_proto::v1::ListWebhooksResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("list_webhooks"))
    }
    async fn delete_webhook(
        &self,
        _request: tonic::Request<switchboard_proto::v1::DeleteWebhookRequest>,
    ) -> Result<tonic::Response<switchboard_proto::v1::DeleteWebhookResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("delete_webhook"))
    }
    async fn advance_webhook(
        &self,
        _request: tonic::Request<switchboard_proto::v1::AdvanceWebhookRequest>,
    ) -> Result<tonic::Response<switchboard_proto::v1::Webhook>, tonic::Status> {
        Err(tonic::Status::unimplemented("advance_webhook"))
    }
    async fn create_conversation(
        &self,
        request: Request<v1::CreateConversationRequest>,
    ) -> Result<Response<v1::Conversation>, Status> {
        let request = request.into_inner();
        let mut members = vec![request.creator_id.clone()];
        members.extend(request.members);
        Ok(Response::new(v1::Conversation {
            conversation_id: "conv-1".into(),
            kind: request.kind,
            owner_id: request.creator_id,
            members,
            ..Default::default()
        }))
    }
    async fn get_conversation(
        &self,
        request: Request<v1::GetConversationRequest>,
    ) -> Result<Response<v1::Conversation>, Status> {
        let request = request.into_inner();
        injected(&request.conversation_id)?;
        let conversation = v1::Conversation {
            conversation_id: request.conversation_id.clone(),
            kind: "group".into(),
            members: vec![request.caller_id.clone(), "dave".into()],
            ..Default::default()
        };
        self.0.lock().unwrap().gets.push(request);
        Ok(Response::new(conversation))
    }
    async fn change_members(
        &self,
        _: Request<v1::ChangeMembersRequest>,
    ) -> Result<Response<v1::Conversation>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_conversations(
        &self,
        _: Request<v1::ListConversationsRequest>,
    ) -> Result<Response<v1::ConversationListResult>, Status> {
        Ok(Response::new(Default::default()))
    }
    async fn last_seq(
        &self,
        _: Request<v1::LastSeqRequest>,
    ) -> Result<Response<v1::LastSeqResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn append(
        &self,
        _: Request<v1::AppendRequest>,
    ) -> Result<Response<v1::AppendResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn append_batch(
        &self,
        _: Request<v1::AppendBatchRequest>,
    ) -> Result<Response<v1::AppendBatchResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn lookup_dedupe(
        &self,
        _: Request<v1::LookupDedupeRequest>,
    ) -> Result<Response<v1::LookupDedupeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn history(
        &self,
        request: Request<v1::StorageHistoryRequest>,
    ) -> Result<Response<v1::HistoryResult>, Status> {
        let request = request.into_inner().request.unwrap_or_default();
        if request.conversation_id == FORBIDDEN {
            return Err(status(
                ErrorCode::NotMember,
                "not a member of the conversation",
            ));
        }
        Ok(Response::new(v1::HistoryResult {
            conversation_id: request.conversation_id,
            ..Default::default()
        }))
    }
    async fn sync(
        &self,
        _: Request<v1::StorageSyncRequest>,
    ) -> Result<Response<v1::SyncResult>, Status> {
        Ok(Response::new(Default::default()))
    }
    async fn set_read_marker(
        &self,
        request: Request<v1::SetReadMarkerRequest>,
    ) -> Result<Response<v1::ReadMarker>, Status> {
        let request = request.into_inner();
        injected(&request.conversation_id)?;
        let marker = v1::ReadMarker {
            conversation_id: request.conversation_id.clone(),
            user_id: request.user_id.clone(),
            seq: request.seq,
            at_ms: 1,
            kind: if request.kind.is_empty() {
                "read".into()
            } else {
                request.kind.clone()
            },
        };
        self.0.lock().unwrap().read_markers.push(request);
        Ok(Response::new(marker))
    }
}

// ---------------------------------------------------------------- harness

struct Harness {
    calls: Recorder,
    /// Notified (notify_waiters) on every RegisterSession, SetStatus and
    /// SharedContacts.
    registered: Arc<tokio::sync::Notify>,
    http: SocketAddr,
    grpc: SocketAddr,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    signer: switchboard_auth::Signer,
}

async fn start_backends(calls: &Recorder, registered: &Arc<tokio::sync::Notify>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(presence_server::PresenceServer::new(FakePresence(
            calls.clone(),
            registered.clone(),
        )))
        .add_service(routing_server::RoutingServer::new(FakeRouting(
            calls.clone(),
        )))
        .add_service(storage_server::StorageServer::new(FakeStorage(
            calls.clone(),
            registered.clone(),
        )));
    tokio::spawn(server.serve_with_incoming(TcpListenerStream::new(listener)));
    addr
}

async fn start(tweak: impl FnOnce(&mut Config)) -> Harness {
    let calls = Recorder::default();
    let registered = Arc::new(tokio::sync::Notify::new());
    let backends = start_backends(&calls, &registered).await;
    let mut config = Config::default();
    let url = format!("http://{backends}");
    config.cluster.presence_url = url.clone();
    config.cluster.routing_url = url.clone();
    config.cluster.storage_url = url;
    config.auth.hs256_secret = SECRET.into();
    config.gateway.advertise_url = "http://gateway-under-test:1".into();
    config.gateway.max_frame_bytes = 8 * 1024;
    config.routing.max_body_bytes = 4 * 1024;
    config.gateway.max_violations = 10;
    // Tests that end with clients still connected stop quickly.
    config.gateway.drain_deadline_ms = 300;
    tweak(&mut config);

    let gateway = Gateway::new(Arc::new(config)).unwrap();
    let listeners = Listeners {
        http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        grpc: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let http = listeners.http.local_addr().unwrap();
    let grpc = listeners.grpc.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(gateway.serve(listeners, shutdown.clone()));
    Harness {
        calls,
        registered,
        http,
        grpc,
        shutdown,
        server,
        signer: switchboard_auth::Signer::hs256(SECRET.as_bytes()),
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl Harness {
    fn token(&self, user: &str) -> String {
        self.signer.sign(user, Duration::from_secs(600)).unwrap()
    }

    /// Wait until the recorded calls satisfy `done` (re-checked after each call
    /// that notifies).
    async fn wait_for(&self, what: &str, done: impl Fn(&Calls) -> bool) {
        tokio::time::timeout(TIMEOUT, async {
            loop {
                let notified = self.registered.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if done(&self.calls.lock().unwrap()) {
                    return;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    async fn try_connect(&self, query: &str, protocol: Option<&str>) -> Result<Ws, WsError> {
        let mut request = format!("ws://{}/v1/connect?{query}", self.http)
            .into_client_request()
            .unwrap();
        if let Some(p) = protocol {
            request
                .headers_mut()
                .insert("sec-websocket-protocol", p.parse().unwrap());
        }
        tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect timed out")
            .map(|(ws, _)| ws)
    }

    /// Connect as `user` with JSON frames and read the welcome.
    async fn connect(&self, user: &str) -> (Ws, Value) {
        let query = format!("token={}&device=phone", self.token(user));
        let mut ws = self
            .try_connect(&query, Some("switchboard.v1.json"))
            .await
            .unwrap();
        let welcome = recv(&mut ws).await;
        assert!(welcome.get("welcome").is_some(), "{welcome}");
        (ws, welcome)
    }

    async fn deliver(&self, deliveries: Vec<v1::Delivery>) -> v1::DeliverResponse {
        let mut client = GatewayClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap();
        client
            .deliver(v1::DeliverRequest { deliveries })
            .await
            .unwrap()
            .into_inner()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(TIMEOUT, self.server)
            .await
            .expect("gateway did not stop")
            .unwrap()
            .unwrap();
    }
}

/// The next data frame as JSON (pings and pongs skipped).
async fn recv(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .expect("no frame in time")
            .expect("stream ended")
            .expect("read failed");
        match message {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Read until the server closes; returns the data frames seen and the close code.
async fn recv_until_close(ws: &mut Ws) -> (Vec<Value>, Option<CloseCode>) {
    let mut frames = Vec::new();
    loop {
        let next = tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .expect("no close in time");
        match next {
            Some(Ok(Message::Text(text))) => frames.push(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(frame))) => return (frames, frame.map(|f| f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (frames, None),
        }
    }
}

async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::text(frame.to_string())).await.unwrap();
}

fn ack_error(frame: &Value) -> &str {
    frame["ack"]["error"]["code"].as_str().unwrap_or("")
}

async fn assert_alive(ws: &mut Ws) {
    send(ws, json!({"id": "alive", "ping": {}})).await;
    let pong = recv(ws).await;
    assert_eq!(pong["ack"]["id"], "alive", "{pong}");
    assert!(pong["ack"]["pong"]["server_time_ms"].as_i64().unwrap() > 0);
}

fn message_delivery(recipients: &[&str], conversation: &str, seq: u64) -> v1::Delivery {
    v1::Delivery {
        event: Some(v1::ServerFrame {
            event: Some(Event::Message(v1::MessageEvent {
                message: Some(v1::Message {
                    conversation_id: conversation.into(),
                    seq,
                    message_id: format!("m{seq}"),
                    sender_id: "alice".into(),
                    body: format!("hello {seq}"),
                    sent_at_ms: 1,
                    ..Default::default()
                }),
            })),
        }),
        recipients: recipients.iter().map(|s| s.to_string()).collect(),
        exclude_session_id: String::new(),
        all_local_sessions: false,
    }
}

fn typing_delivery(recipient: &str) -> v1::Delivery {
    v1::Delivery {
        event: Some(v1::ServerFrame {
            event: Some(Event::Typing(v1::TypingEvent {
                conversation_id: "c".into(),
                user_id: "alice".into(),
                typing: true,
                ..Default::default()
            })),
        }),
        recipients: vec![recipient.into()],
        exclude_session_id: String::new(),
        all_local_sessions: false,
    }
}

fn presence_delivery(watcher: &str, user: &str) -> v1::Delivery {
    v1::Delivery {
        event: Some(v1::ServerFrame {
            event: Some(Event::Presence(v1::PresenceEvent {
                presence: Some(v1::UserPresence {
                    user_id: user.into(),
                    status: "online".into(),
                    last_seen_ms: 1,
                    sessions: 1,
                    ..Default::default()
                }),
            })),
        }),
        recipients: vec![watcher.into()],
        exclude_session_id: String::new(),
        all_local_sessions: false,
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn missing_or_invalid_tokens_get_401_with_a_reason() {
    let h = start(|_| {}).await;
    for (query, reason) in [
        ("", "missing token"),
        ("token=not-a-jwt", "malformed token"),
    ] {
        match h.try_connect(query, None).await {
            Err(WsError::Http(response)) => {
                assert_eq!(response.status(), 401);
                let body: Value =
                    serde_json::from_slice(response.body().as_deref().unwrap()).expect("json body");
                assert_eq!(body["error"], "unauthorized");
                assert_eq!(body["message"], reason);
            }
            other => panic!("expected 401, got {:?}", other.map(|_| ())),
        }
    }
    let wrong_key = switchboard_auth::Signer::hs256(b"some-other-secret-0123456789abcdef")
        .sign("alice", Duration::from_secs(60))
        .unwrap();
    match h.try_connect(&format!("token={wrong_key}"), None).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
    h.stop().await;
}

#[tokio::test]
async fn unknown_subprotocols_are_refused_and_protobuf_is_spoken() {
    let h = start(|_| {}).await;
    let query = format!("token={}", h.token("alice"));
    match h.try_connect(&query, Some("graphql-ws")).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 400),
        other => panic!("expected 400, got {:?}", other.map(|_| ())),
    }
    let mut ws = h
        .try_connect(&query, Some("switchboard.v1.proto"))
        .await
        .unwrap();
    let Some(Ok(Message::Binary(bytes))) = ws.next().await else {
        panic!("expected a binary welcome");
    };
    let frame = v1::ServerFrame::decode(bytes.as_ref()).unwrap();
    let Some(Event::Welcome(welcome)) = frame.event else {
        panic!("expected welcome, got {frame:?}");
    };
    assert_eq!(welcome.user_id, "alice");
    assert_eq!(welcome.device_id, "default");
    h.stop().await;
}

#[tokio::test]
async fn welcome_then_send_carries_the_token_identity() {
    let h = start(|_| {}).await;
    let (mut ws, welcome) = h.connect("alice").await;
    let w = &welcome["welcome"];
    assert_eq!(w["user_id"], "alice");
    assert_eq!(w["device_id"], "phone");
    assert_eq!(w["max_body_bytes"], 4096);
    let session_id = w["session_id"].as_str().unwrap().to_owned();
    {
        let calls = h.calls.lock().unwrap();
        assert_eq!(calls.registered.len(), 1);
        assert_eq!(calls.registered[0].session_id, session_id);
        assert_eq!(calls.registered[0].user_id, "alice");
        assert_eq!(
            calls.registered[0].gateway_addr,
            "http://gateway-under-test:1"
        );
    }

    send(
        &mut ws,
        json!({"id": "s1", "send": {"conversation_id": "c1", "client_msg_id": "k1", "body": "hi"}}),
    )
    .await;
    let ack = recv(&mut ws).await;
    assert_eq!(ack["ack"]["id"], "s1");
    assert_eq!(ack["ack"]["send"]["message_id"], "msg-k1");
    {
        let calls = h.calls.lock().unwrap();
        let sent = &calls.sends[0];
        assert_eq!(sent.sender_id, "alice");
        assert_eq!(sent.sender_device, "phone");
        assert_eq!(sent.session_id, session_id);
        assert_eq!(sent.body, "hi");
    }

    send(
        &mut ws,
        json!({"id": "s2", "send": {"conversation_id": "c1", "body": "x"}}),
    )
    .await;
    let ack = recv(&mut ws).await;
    assert_eq!(ack["ack"]["id"], "s2");
    assert_eq!(ack_error(&ack), "invalid_request");

    send(
        &mut ws,
        json!({"id": "s3", "send": {"conversation_id": FORBIDDEN, "client_msg_id": "k3", "body": "x"}}),
    )
    .await;
    assert_eq!(ack_error(&recv(&mut ws).await), "not_member");
    assert_eq!(h.calls.lock().unwrap().sends.len(), 1);
    h.stop().await;
}

#[tokio::test]
async fn requests_are_acked_in_order() {
    let h = start(|_| {}).await;
    let (mut ws, _) = h.connect("alice").await;
    for i in 0..5 {
        send(
            &mut ws,
            json!({"id": format!("r{i}"), "send": {"conversation_id": "c1", "client_msg_id": format!("k{i}"), "body": "b"}}),
        )
        .await;
    }
    for i in 0..5 {
        assert_eq!(recv(&mut ws).await["ack"]["id"], format!("r{i}"));
    }
    let keys: Vec<String> = h
        .calls
        .lock()
        .unwrap()
        .sends
        .iter()
        .map(|s| s.client_msg_id.clone())
        .collect();
    assert_eq!(keys, ["k0", "k1", "k2", "k3", "k4"]);
    h.stop().await;
}

#[tokio::test]
async fn malformed_and_unknown_frames_get_error_codes_and_the_connection_stays() {
    let h = start(|_| {}).await;
    let (mut ws, _) = h.connect("alice").await;

    ws.send(Message::text("{not json")).await.unwrap();
    let frame = recv(&mut ws).await;
    assert_eq!(frame["error"]["code"], "bad_frame", "{frame}");

    send(&mut ws, json!({"id": "u1", "teleport": {}})).await;
    let frame = recv(&mut ws).await;
    assert_eq!(frame["ack"]["id"], "u1");
    assert_eq!(ack_error(&frame), "unknown_frame");

    send(&mut ws, json!({"id": "b1", "send": {"body": 5}})).await;
    assert_eq!(ack_error(&recv(&mut ws).await), "bad_frame");

    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(recv(&mut ws).await["error"]["code"], "bad_frame");

    send(
        &mut ws,
        json!({"id": "h1", "history": {"conversation_id": FORBIDDEN}}),
    )
    .await;
    assert_eq!(ack_error(&recv(&mut ws).await), "not_member");

    assert_alive(&mut ws).await;
    h.stop().await;
}

#[tokio::test]
async fn too_many_violations_close_with_policy_violation() {
    let h = start(|c| c.gateway.max_violations = 3).await;
    let (mut ws, _) = h.connect("alice").await;
    for _ in 0..3 {
        ws.send(Message::text("nope")).await.unwrap();
    }
    let (frames, code) = recv_until_close(&mut ws).await;
    assert_eq!(frames.len(), 3);
    assert!(frames.iter().all(|f| f["error"]["code"] == "bad_frame"));
    assert_eq!(code, Some(CloseCode::Policy));
    assert_eq!(u16::from(CloseCode::Policy), close_code::POLICY_VIOLATION);
    h.stop().await;
}

#[tokio::test]
async fn floods_are_rate_limited() {
    let h = start(|c| {
        c.gateway.requests_per_second = 1;
        c.gateway.request_burst = 2;
    })
    .await;
    let (mut ws, _) = h.connect("alice").await;
    for i in 0..10 {
        send(&mut ws, json!({"id": format!("p{i}"), "ping": {}})).await;
    }
    let mut limited = 0;
    for _ in 0..10 {
        let frame = recv(&mut ws).await;
        if ack_error(&frame) == "rate_limited" {
            limited += 1;
        }
    }
    // Two come from the burst; at one per second, ten frames cannot all pass.
    assert!(limited >= 1, "no request was rate limited");
    h.stop().await;
}

#[tokio::test]
async fn a_flood_is_throttled_and_never_closes_the_connection() {
    let h = start(|c| {
        c.gateway.requests_per_second = 50;
        c.gateway.request_burst = 2;
        c.gateway.max_violations = 3;
    })
    .await;
    let (mut ws, _) = h.connect("alice").await;
    // Far more over-limit requests than max_violations, all at once.
    for i in 0..40 {
        send(&mut ws, json!({"id": format!("p{i}"), "ping": {}})).await;
    }
    let mut acked = std::collections::HashMap::new();
    let mut limited = 0;
    while acked.len() < 40 {
        let frame = recv(&mut ws).await;
        let id = frame["ack"]["id"].as_str().expect("an ack").to_owned();
        if ack_error(&frame) == "rate_limited" {
            limited += 1;
            let retry = frame["ack"]["error"]["retry_after_ms"].as_u64().unwrap();
            assert!((1..=1_000).contains(&retry), "{frame}");
        } else {
            assert!(frame["ack"]["pong"].is_object(), "{frame}");
        }
        assert!(acked.insert(id, ()).is_none(), "a second ack: {frame}");
    }
    assert!(limited >= 1, "no request was rate limited");
    // Limited, not closed: the next request is served.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_alive(&mut ws).await;
    h.stop().await;
}

#[tokio::test]
async fn requests_waiting_when_the_connection_closes_still_get_their_ack() {
    let h = start(|c| c.gateway.max_violations = 1).await;
    let (mut ws, _) = h.connect("alice").await;
    for i in 0..5 {
        send(
            &mut ws,
            json!({"id": format!("s{i}"), "send": {"conversation_id": "c1", "client_msg_id": format!("k{i}"), "body": "b"}}),
        )
        .await;
    }
    // One violation closes this connection while the sends wait behind each other.
    ws.send(Message::text("nope")).await.unwrap();
    let (frames, code) = recv_until_close(&mut ws).await;
    assert_eq!(code, Some(CloseCode::Policy));
    let mut ids: Vec<&str> = frames
        .iter()
        .filter_map(|f| f["ack"]["id"].as_str())
        .collect();
    ids.sort();
    assert_eq!(ids, ["s0", "s1", "s2", "s3", "s4"], "{frames:#?}");
    for frame in frames.iter().filter(|f| f.get("ack").is_some()) {
        let ack = &frame["ack"];
        assert!(
            ack["send"].is_object() || ack["error"]["code"] == "unavailable",
            "{frame}"
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn oversized_frames_get_frame_too_large_and_huge_ones_close_with_1009() {
    let h = start(|_| {}).await;
    let (mut ws, _) = h.connect("alice").await;
    // A JSON frame may be six times the body limit (4 KiB) plus 4 KiB: 28 KiB. Above
    // that but under the hard cap: answered, connection kept.
    let big = format!(
        r#"{{"id":"x","ping":{{}},"pad":"{}"}}"#,
        "a".repeat(29 * 1024)
    );
    ws.send(Message::text(big)).await.unwrap();
    assert_eq!(recv(&mut ws).await["error"]["code"], "frame_too_large");
    assert_alive(&mut ws).await;

    // Above the hard cap: the WebSocket layer refuses it and the connection closes.
    ws.send(Message::text("a".repeat(64 * 1024))).await.unwrap();
    let (_, code) = recv_until_close(&mut ws).await;
    assert_eq!(code, Some(CloseCode::Size));
    assert_eq!(u16::from(CloseCode::Size), close_code::MESSAGE_TOO_BIG);
    h.stop().await;
}

#[tokio::test]
async fn a_body_within_its_limit_fits_its_frame_in_any_json_escaping() {
    let h = start(|_| {}).await;
    let (mut ws, _) = h.connect("alice").await;
    // 4 KiB of body (the limit), every byte written as a `\u` escape: a 24 KiB frame,
    // three times gateway.max_frame_bytes.
    let escaped = "\\u0061".repeat(4 * 1024);
    let frame = format!(
        r#"{{"id":"e1","send":{{"conversation_id":"c1","client_msg_id":"k1","body":"{escaped}"}}}}"#
    );
    assert!(frame.len() > 3 * 8 * 1024);
    ws.send(Message::text(frame)).await.unwrap();
    let ack = recv(&mut ws).await;
    assert_eq!(ack["ack"]["id"], "e1", "{ack}");
    assert!(ack["ack"]["send"].is_object(), "{ack}");
    let sent = h
        .calls
        .lock()
        .unwrap()
        .sends
        .last()
        .cloned()
        .expect("routing got the send");
    assert_eq!(sent.body, "a".repeat(4 * 1024));
    // One byte more is over the body limit, and says so.
    let frame = format!(
        r#"{{"id":"e2","send":{{"conversation_id":"c1","client_msg_id":"k2","body":"{escaped}a"}}}}"#
    );
    ws.send(Message::text(frame)).await.unwrap();
    assert_eq!(ack_error(&recv(&mut ws).await), "body_too_large");
    assert_alive(&mut ws).await;
    h.stop().await;
}

#[tokio::test]
async fn deliver_reaches_the_client_once_per_sequence() {
    let h = start(|_| {}).await;
    let (mut ws, _) = h.connect("bob").await;

    let response = h
        .deliver(vec![message_delivery(&["bob", "carol"], "c1", 1)])
        .await;
    assert_eq!(response.delivered, 1);
    assert_eq!(response.absent, ["carol"]);
    let frame = recv(&mut ws).await;
    assert_eq!(frame["message"]["message"]["seq"], 1);
    assert_eq!(frame["message"]["message"]["body"], "hello 1");

    let response = h
        .deliver(vec![
            message_delivery(&["bob"], "c1", 1),
            message_delivery(&["bob"], "c1", 2),
            message_delivery(&["bob"], "c1", 2),
        ])
        .await;
    assert_eq!(response.delivered, 1);
    let frame = recv(&mut ws).await;
    assert_eq!(frame["message"]["message"]["seq"], 2);
    // Nothing else is queued: the next frame is the answer to this ping.
    assert_alive(&mut ws).await;
    h.stop().await;
}

#[tokio::test]
async fn a_gap_in_a_conversations_sequence_tells_the_session_to_sync() {
    let h = start(|_| {}).await;
    let (mut ws, _) = h.connect("bob").await;
    h.deliver(vec![message_delivery(&["bob"], "c1", 1)]).await;
    assert_eq!(recv(&mut ws).await["message"]["message"]["seq"], 1);
    // 2 and 3 never came: 4 shows the gap, and a resync follows it.
    h.deliver(vec![message_delivery(&["bob"], "c1", 4)]).await;
    assert_eq!(recv(&mut ws).await["message"]["message"]["seq"], 4);
    let resync = recv(&mut ws).await;
    assert_eq!(resync["resync"]["reason"], "gap", "{resync}");
    assert_eq!(resync["resync"]["conversation_id"], "c1");
    // In order again: no resync.
    h.deliver(vec![message_delivery(&["bob"], "c1", 5)]).await;
    assert_eq!(recv(&mut ws).await["message"]["message"]["seq"], 5);
    assert_alive(&mut ws).await;
    h.stop().await;
}

#[tokio::test]
async fn a_resync_delivery_reaches_its_recipients_or_every_local_session() {
    let h = start(|_| {}).await;
    let (mut bob, _) = h.connect("bob").await;
    let (mut carol, _) = h.connect("carol").await;
    let resync = |recipients: &[&str], all: bool| v1::Delivery {
        event: Some(v1::ServerFrame {
            event: Some(Event::Resync(v1::Resync {
                reason: "delivery_failed".into(),
                conversation_id: String::new(),
            })),
        }),
        recipients: recipients.iter().map(|s| s.to_string()).collect(),
        exclude_session_id: String::new(),
        all_local_sessions: all,
    };
    let response = h.deliver(vec![resync(&["bob", "dave"], false)]).await;
    assert_eq!(response.delivered, 1);
    assert_eq!(response.absent, ["dave"]);
    assert_eq!(recv(&mut bob).await["resync"]["reason"], "delivery_failed");
    assert_alive(&mut carol).await;
    let response = h.deliver(vec![resync(&[], true)]).await;
    assert_eq!(response.delivered, 2);
    assert_eq!(recv(&mut bob).await["resync"]["reason"], "delivery_failed");
    assert_eq!(
        recv(&mut carol).await["resync"]["reason"],
        "delivery_failed"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_connection_opened_while_presence_is_down_is_served_and_registered_later() {
    let h = start(|c| c.gateway.heartbeat_interval_ms = 100).await;
    h.calls.lock().unwrap().presence_down = true;
    let (mut ws, welcome) = h.connect("alice").await;
    let session_id = session_id_of(&welcome);
    assert!(h.calls.lock().unwrap().registered.is_empty());
    h.deliver(vec![message_delivery(&["alice"], "c1", 1)]).await;
    assert_eq!(recv(&mut ws).await["message"]["message"]["seq"], 1);

    h.calls.lock().unwrap().presence_down = false;
    h.wait_for("the session registered once presence answers", |calls| {
        calls.registered.iter().any(|s| s.session_id == session_id)
    })
    .await;
    let resync = recv(&mut ws).await;
    assert_eq!(resync["resync"]["reason"], "presence_lost", "{resync}");
    h.stop().await;
}

#[tokio::test]
async fn presence_that_lost_its_state_gets_every_session_back_with_its_watches() {
    let h = start(|c| {
        c.gateway.heartbeat_interval_ms = 60_000;
        c.gateway.presence_probe_ms = 50;
    })
    .await;
    let (mut ws, welcome) = h.connect("alice").await;
    let session_id = session_id_of(&welcome);
    let ack = request(
        &mut ws,
        "w",
        json!({"presence_watch": {"user_ids": ["bob"]}}),
    )
    .await;
    assert!(ack["presence"].is_object(), "{ack}");
    // Probes see the same epoch: nothing is registered again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.calls.lock().unwrap().registered.len(), 1);
    assert!(h.calls.lock().unwrap().heartbeats.is_empty());

    h.calls.lock().unwrap().epoch = "e2".into();
    h.wait_for("the session registered again", |calls| {
        calls.registered.len() >= 2
    })
    .await;
    // The watches follow the registration.
    tokio::time::timeout(TIMEOUT, async {
        while h.calls.lock().unwrap().watches.len() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("watching again in time");
    {
        let calls = h.calls.lock().unwrap();
        assert_eq!(calls.registered[1].session_id, session_id);
        assert_eq!(calls.heartbeats[0].session_ids, vec![session_id.clone()]);
        let watch = calls.watches.last().unwrap();
        assert_eq!(
            (watch.watcher_id.as_str(), watch.user_ids.clone()),
            ("alice", vec!["bob".to_string()])
        );
    }
    let resync = recv(&mut ws).await;
    assert_eq!(resync["resync"]["reason"], "presence_lost", "{resync}");
    h.stop().await;
}

#[tokio::test]
async fn presence_events_reach_only_watching_sessions() {
    let h = start(|_| {}).await;
    let (mut ws, _) = h.connect("bob").await;
    let response = h.deliver(vec![presence_delivery("bob", "alice")]).await;
    assert_eq!(response.delivered, 0);

    send(
        &mut ws,
        json!({"id": "w", "presence_watch": {"user_ids": ["alice"]}}),
    )
    .await;
    let ack = recv(&mut ws).await;
    assert_eq!(ack["ack"]["presence"]["users"][0]["user_id"], "alice");
    assert_eq!(h.calls.lock().unwrap().watches[0].watcher_id, "bob");

    let response = h.deliver(vec![presence_delivery("bob", "alice")]).await;
    assert_eq!(response.delivered, 1);
    let frame = recv(&mut ws).await;
    assert_eq!(frame["presence"]["presence"]["user_id"], "alice");
    h.stop().await;
}

#[tokio::test]
async fn typing_and_conversation_changes_are_published() {
    let h = start(|_| {}).await;
    let (mut ws, welcome) = h.connect("alice").await;
    let session_id = welcome["welcome"]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    send(
        &mut ws,
        json!({"id": "t", "typing": {"conversation_id": "c1", "typing": true}}),
    )
    .await;
    assert!(recv(&mut ws).await["ack"]["ok"].is_object());
    send(
        &mut ws,
        json!({"id": "c", "conversation_create": {"kind": "direct", "members": ["bob"]}}),
    )
    .await;
    let ack = recv(&mut ws).await;
    assert_eq!(ack["ack"]["conversation"]["conversation_id"], "conv-1");
    {
        let calls = h.calls.lock().unwrap();
        let typing = &calls.publishes[0];
        assert_eq!(typing.conversation_id, "c1");
        assert_eq!(typing.exclude_session_id, session_id);
        assert_eq!(typing.actor_id, "alice");
        let created = &calls.publishes[1];
        assert_eq!(created.user_ids, ["alice", "bob"]);
        let Some(Event::Conversation(event)) = created.event.as_ref().and_then(|e| e.event.clone())
        else {
            panic!("expected a conversation event");
        };
        assert_eq!(event.change, "created");
    }
    h.stop().await;
}

#[tokio::test]
async fn slow_consumer_loses_typing_first_then_is_closed() {
    let h = start(|c| c.gateway.outbound_queue = 4).await;
    let (mut ws, _) = h.connect("bob").await;

    // Ten typing events into a queue of four: once it is more than half full (three
    // queued) the rest are dropped, bob stays.
    let response = h
        .deliver((0..10).map(|_| typing_delivery("bob")).collect())
        .await;
    assert_eq!(response.delivered, 3);
    for _ in 0..3 {
        assert!(recv(&mut ws).await.get("typing").is_some());
    }
    assert_alive(&mut ws).await;

    // Messages cannot be dropped: overflowing the queue closes the session.
    let response = h
        .deliver(
            (1..=10)
                .map(|seq| message_delivery(&["bob"], "c1", seq))
                .collect(),
        )
        .await;
    assert_eq!(response.delivered, 4);
    let (frames, code) = recv_until_close(&mut ws).await;
    let last = frames.last().expect("an error frame before the close");
    assert_eq!(last["error"]["code"], "slow_consumer", "{frames:?}");
    assert_eq!(code, Some(CloseCode::from(close_code::SLOW_CONSUMER)));

    // The session is gone: later deliveries find nobody.
    let response = h.deliver(vec![message_delivery(&["bob"], "c1", 11)]).await;
    assert_eq!(response.delivered, 0);
    h.stop().await;
}

#[tokio::test]
async fn drain_sends_goaway_refuses_new_connections_and_closes_at_the_deadline() {
    let h = start(|_| {}).await;
    let (mut ws, _) = h.connect("alice").await;
    let mut client = GatewayClient::connect(format!("http://{}", h.grpc))
        .await
        .unwrap();
    let response = client
        .drain(v1::DrainRequest { deadline_ms: 300 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.sessions, 1);

    let goaway = recv(&mut ws).await;
    assert_eq!(goaway["goaway"]["reason"], "shutdown");
    assert_eq!(goaway["goaway"]["reconnect_after_ms"], 300);

    let query = format!("token={}", h.token("carol"));
    match h.try_connect(&query, None).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }

    // alice stays past the deadline and is closed with 1001.
    let (_, code) = recv_until_close(&mut ws).await;
    assert_eq!(code, Some(CloseCode::Away));
    h.shutdown.cancel();
    tokio::time::timeout(TIMEOUT, h.server)
        .await
        .expect("gateway did not stop")
        .unwrap()
        .unwrap();
    assert_eq!(
        h.calls.lock().unwrap().dropped_gateways,
        ["http://gateway-under-test:1"]
    );
}

#[tokio::test]
async fn shutdown_drains_and_returns_once_clients_leave() {
    let h = start(|c| c.gateway.drain_deadline_ms = 60_000).await;
    let (mut ws, _) = h.connect("alice").await;
    h.shutdown.cancel();
    let goaway = recv(&mut ws).await;
    assert_eq!(goaway["goaway"]["reason"], "shutdown");
    ws.close(None).await.unwrap();
    tokio::time::timeout(TIMEOUT, h.server)
        .await
        .expect("gateway did not stop after the client left")
        .unwrap()
        .unwrap();
    assert_eq!(h.calls.lock().unwrap().dropped_gateways.len(), 1);
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    (out[9..12].parse().unwrap(), out)
}

#[tokio::test]
async fn dev_mode_serves_the_chat_page_and_tokens() {
    let h = start(|c| c.dev_mode = true).await;
    let (code, page) = http_get(h.http, "/").await;
    assert_eq!(code, 200);
    for id in [
        "user",
        "login",
        "peer",
        "open",
        "text",
        "send",
        "messages",
        "peer-presence",
    ] {
        assert!(
            page.contains(&format!("id=\"{id}\"")),
            "chat page lacks #{id}"
        );
    }
    let (code, response) = http_get(h.http, "/v1/dev/token?user=alice").await;
    assert_eq!(code, 200);
    let body: Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["user_id"], "alice");
    let verifier = switchboard_auth::Verifier::from_config(&switchboard_config::AuthConfig {
        hs256_secret: SECRET.into(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        verifier
            .verify(body["token"].as_str().unwrap())
            .unwrap()
            .sub,
        "alice"
    );
    let (code, _) = http_get(h.http, "/v1/dev/token?user=a%20b").await;
    assert_eq!(code, 400);
    let (code, metrics) = http_get(h.http, "/metrics").await;
    assert_eq!(code, 200);
    assert!(metrics.contains("switchboard_gateway_connections"));
    h.stop().await;
}

#[tokio::test]
async fn without_dev_mode_there_is_no_chat_page_or_token_endpoint() {
    let h = start(|_| {}).await;
    assert_eq!(http_get(h.http, "/").await.0, 404);
    assert_eq!(http_get(h.http, "/v1/dev/token?user=alice").await.0, 404);
    assert_eq!(http_get(h.http, "/readyz").await.0, 200);
    h.stop().await;
}

#[tokio::test]
async fn heartbeats_batch_sessions_and_register_unknown_ones_again() {
    let h = start(|c| c.gateway.heartbeat_interval_ms = 50).await;
    let (_ws, welcome) = h.connect("alice").await;
    let session_id = welcome["welcome"]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The first registration happened during the upgrade; wait for the second one,
    // triggered by the heartbeat that reported the session unknown.
    h.wait_for("the session registered again", |calls| {
        calls.registered.len() >= 2
    })
    .await;
    {
        let calls = h.calls.lock().unwrap();
        assert_eq!(calls.registered[1].session_id, session_id);
        assert_eq!(calls.heartbeats[0].session_ids, vec![session_id]);
        assert_eq!(
            calls.heartbeats[0].gateway_addr,
            "http://gateway-under-test:1"
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn silent_clients_are_closed_and_pings_keep_them_open() {
    let h = start(|c| c.gateway.client_idle_timeout_ms = 1_000).await;
    let (mut chatty, _) = h.connect("alice").await;
    let (mut silent, _) = h.connect("bob").await;
    // WebSocket pings count as activity and are answered.
    // Six pings 250 ms apart span longer than the idle timeout.
    for _ in 0..6 {
        chatty.send(Message::Ping(vec![1u8].into())).await.unwrap();
        let pong = tokio::time::timeout(TIMEOUT, chatty.next()).await.unwrap();
        assert!(matches!(pong, Some(Ok(Message::Pong(_)))), "{pong:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (_, code) = recv_until_close(&mut silent).await;
    assert_eq!(code, Some(CloseCode::from(close_code::IDLE_TIMEOUT)));
    assert_alive(&mut chatty).await;
    // Activity moved the deadline on, it did not disarm it: once the chatty client
    // goes quiet it is closed too, a timeout after its last frame.
    let quiet_since = std::time::Instant::now();
    let (_, code) = recv_until_close(&mut chatty).await;
    assert_eq!(code, Some(CloseCode::from(close_code::IDLE_TIMEOUT)));
    let waited = quiet_since.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < TIMEOUT,
        "closed {waited:?} after the last frame"
    );
    h.stop().await;
}

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Open an idle connection with a bare TCP stream (a hand-written upgrade request),
/// so the client side adds almost nothing to this process's memory.
async fn raw_connect(addr: SocketAddr, token: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /v1/connect?token={token} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n\
         connection: upgrade\r\nsec-websocket-version: 13\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    // Read the 101 response and the welcome frame (both small).
    let mut buf = vec![0u8; 2048];
    let mut got = 0;
    while !buf[..got].windows(7).any(|w| w == b"welcome") {
        let n = s.read(&mut buf[got..]).await.unwrap();
        assert!(n > 0, "connection closed during upgrade");
        got += n;
    }
    s
}

/// Measures gateway memory per idle connection (RSS delta over many connections;
/// includes the fake presence's record of each session, about 200 bytes). Run with
/// `cargo test -p switchboard-gateway --release -- --ignored --nocapture idle_memory`.
#[tokio::test]
#[ignore = "measurement, not a check"]
async fn idle_memory_per_connection() {
    let h = start(|c| c.gateway.heartbeat_interval_ms = 60_000).await;
    let token = h.token("idle");
    let mut streams = Vec::new();
    for _ in 0..100 {
        streams.push(raw_connect(h.http, &token).await);
    }
    let before = rss_bytes();
    const N: usize = 5_000;
    for _ in 0..N {
        streams.push(raw_connect(h.http, &token).await);
    }
    let after = rss_bytes();
    println!(
        "idle connections: {N}, rss delta {} KiB, {} bytes per connection",
        (after - before) / 1024,
        (after - before) / N
    );
    drop(streams);
    h.stop().await;
}

// ---------------------------------------------------------------- conversation features

/// An int64 field in protocol JSON (a number or a string; absent = 0).
fn int(v: &Value) -> i64 {
    match v {
        Value::Number(n) => n.as_i64().unwrap(),
        Value::String(s) => s.parse().unwrap(),
        _ => 0,
    }
}

/// Send one request and return its ack (the next frame must be it).
/// Send a request and read its ack. `resync` events may come first (the fake
/// presence forgets every session at each heartbeat, so sessions are told to sync).
async fn request(ws: &mut Ws, id: &str, body: Value) -> Value {
    let mut frame = body;
    frame["id"] = json!(id);
    send(ws, frame).await;
    let ack = loop {
        let frame = recv(ws).await;
        if frame.get("resync").is_none() {
            break frame;
        }
    };
    assert_eq!(ack["ack"]["id"], id, "{ack}");
    ack["ack"].clone()
}

fn session_id_of(welcome: &Value) -> String {
    welcome["welcome"]["session_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn timeline_requests_reach_routing_with_their_fields() {
    let h = start(|_| {}).await;
    let (mut ws, welcome) = h.connect("alice").await;
    let session_id = session_id_of(&welcome);

    let ack = request(
        &mut ws,
        "s",
        json!({"send": {"conversation_id": "c1", "client_msg_id": "k1", "body": "re",
            "reply_to_seq": 3, "thread_root_seq": 2, "mentions": ["bob", "carol"]}}),
    )
    .await;
    assert_eq!(ack["send"]["message_id"], "msg-k1");
    let ack = request(
        &mut ws,
        "e",
        json!({"edit": {"conversation_id": "c1", "seq": 4, "client_msg_id": "k2",
            "body": "fixed", "content_type": "text/markdown"}}),
    )
    .await;
    assert_eq!(ack["send"]["message_id"], "msg-k2");
    let ack = request(
        &mut ws,
        "d",
        json!({"delete": {"conversation_id": "c1", "seq": 5, "client_msg_id": "k3"}}),
    )
    .await;
    assert_eq!(ack["send"]["message_id"], "msg-k3");
    let ack = request(
        &mut ws,
        "r",
        json!({"react": {"conversation_id": "c1", "seq": 6, "emoji": "👍", "remove": true,
            "client_msg_id": "k4"}}),
    )
    .await;
    assert_eq!(ack["send"]["message_id"], "msg-k4");

    {
        let calls = h.calls.lock().unwrap();
        assert_eq!(calls.sends.len(), 4);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        for sent in &calls.sends {
            assert_eq!(sent.sender_id, "alice");
            assert_eq!(sent.sender_device, "phone");
            assert_eq!(sent.session_id, session_id);
            assert!(!sent.from_bot);
            // Stamped when the gateway took it, for routing's rate limiter.
            assert!(
                sent.accepted_at_ms <= now_ms && sent.accepted_at_ms + 60_000 > now_ms,
                "accepted_at_ms {} vs now {now_ms}",
                sent.accepted_at_ms
            );
        }
        let send = &calls.sends[0];
        assert_eq!(send.kind, "");
        assert_eq!((send.reply_to_seq, send.thread_root_seq), (3, 2));
        assert_eq!(send.mentions, ["bob", "carol"]);
        let edit = &calls.sends[1];
        assert_eq!(edit.kind, "edit");
        assert_eq!(edit.target_seq, 4);
        assert_eq!(
            (edit.body.as_str(), edit.content_type.as_str()),
            ("fixed", "text/markdown")
        );
        let delete = &calls.sends[2];
        assert_eq!(delete.kind, "delete");
        assert_eq!(delete.target_seq, 5);
        assert_eq!(delete.body, "");
        let react = &calls.sends[3];
        assert_eq!(react.kind, "reaction");
        assert_eq!(react.target_seq, 6);
        assert_eq!(react.emoji, "👍");
        assert!(react.remove);
    }

    // Refused before routing is called.
    let too_many: Vec<String> = (0..51).map(|i| format!("u{i}")).collect();
    for (id, body, code) in [
        (
            "m1",
            json!({"send": {"conversation_id": "c1", "client_msg_id": "k", "mentions": too_many}}),
            "invalid_request",
        ),
        (
            "m2",
            json!({"send": {"conversation_id": "c1", "client_msg_id": "k", "mentions": [""]}}),
            "invalid_request",
        ),
        (
            "e1",
            json!({"edit": {"conversation_id": "c1", "seq": 1, "body": "x"}}),
            "invalid_request",
        ),
        (
            "e2",
            json!({"edit": {"conversation_id": "c1", "client_msg_id": "k", "body": "x"}}),
            "invalid_request",
        ),
        (
            "e3",
            json!({"edit": {"conversation_id": "c1", "seq": 1, "client_msg_id": "k", "body": "x".repeat(4097)}}),
            "body_too_large",
        ),
        (
            "d1",
            json!({"delete": {"conversation_id": "c1", "seq": 1}}),
            "invalid_request",
        ),
        (
            "r1",
            json!({"react": {"conversation_id": "c1", "seq": 1, "client_msg_id": "k"}}),
            "invalid_request",
        ),
        (
            "r2",
            json!({"react": {"conversation_id": "c1", "seq": 1, "client_msg_id": "k", "emoji": "x".repeat(33)}}),
            "invalid_request",
        ),
    ] {
        let ack = request(&mut ws, id, body).await;
        assert_eq!(ack["error"]["code"], code, "{id}: {ack}");
    }
    assert_eq!(h.calls.lock().unwrap().sends.len(), 4);
    assert_alive(&mut ws).await;
    h.stop().await;
}

#[tokio::test]
async fn backend_error_codes_reach_the_client() {
    let h = start(|_| {}).await;
    let (mut ws, _) = h.connect("alice").await;
    for code in ["forbidden", "not_found", "banned", "invalid_request"] {
        let conversation = format!("error:{code}");
        for (i, body) in [
            json!({"edit": {"conversation_id": conversation, "seq": 1, "client_msg_id": "k", "body": "x"}}),
            json!({"delete": {"conversation_id": conversation, "seq": 1, "client_msg_id": "k"}}),
            json!({"react": {"conversation_id": conversation, "seq": 1, "client_msg_id": "k", "emoji": "x"}}),
            json!({"conversation_update": {"conversation_id": conversation, "action": "add", "user_ids": ["bob"]}}),
            json!({"conversation_members": {"conversation_id": conversation, "action": "add", "user_ids": ["bob"]}}),
            json!({"thread": {"conversation_id": conversation, "root_seq": 1}}),
            json!({"receipts": {"conversation_id": conversation}}),
            json!({"notification_set": {"conversation_id": conversation, "until_ms": -1}}),
            json!({"read": {"conversation_id": conversation, "seq": 1, "kind": "delivered"}}),
        ]
        .into_iter()
        .enumerate()
        {
            let ack = request(&mut ws, &format!("{code}-{i}"), body).await;
            assert_eq!(ack["error"]["code"], code, "{ack}");
            assert_eq!(ack["error"]["message"], format!("injected {code}"));
        }
    }
    // None of these is a protocol violation: the connection stays.
    assert_alive(&mut ws).await;
    h.stop().await;
}

#[tokio::test]
async fn conversation_updates_become_system_events() {
    let h = start(|_| {}).await;
    let (mut ws, _) = h.connect("alice").await;
    let cases = [
        (json!({"action": "rename", "name": "Team"}), "renamed"),
        (
            json!({"action": "topic", "topic": "plans"}),
            "topic_changed",
        ),
        (
            json!({"action": "add", "user_ids": ["bob"]}),
            "members_added",
        ),
        (
            json!({"action": "kick", "user_ids": ["bob"]}),
            "members_removed",
        ),
        (
            json!({"action": "ban", "user_ids": ["bob"]}),
            "members_banned",
        ),
        (
            json!({"action": "unban", "user_ids": ["bob"]}),
            "members_unbanned",
        ),
        (
            json!({"action": "role", "user_ids": ["bob"], "role": "admin"}),
            "role_changed",
        ),
        (
            json!({"action": "leave", "client_msg_id": "bye"}),
            "member_left",
        ),
    ];
    for (i, (mut update, _)) in cases.clone().into_iter().enumerate() {
        update["conversation_id"] = json!("g1");
        let ack = request(
            &mut ws,
            &format!("u{i}"),
            json!({"conversation_update": update}),
        )
        .await;
        assert_eq!(ack["send"]["conversation_id"], "g1", "{ack}");
    }
    {
        let calls = h.calls.lock().unwrap();
        assert_eq!(calls.sends.len(), cases.len());
        for ((update, action), sent) in cases.iter().zip(&calls.sends) {
            assert_eq!(sent.kind, "system");
            assert_eq!(sent.conversation_id, "g1");
            assert_eq!(sent.sender_id, "alice");
            let system = sent.system.as_ref().expect("a system event");
            assert_eq!(system.action, *action);
            assert_eq!(system.actor_id, "alice");
            match *action {
                "renamed" => assert_eq!(system.name, "Team"),
                "topic_changed" => assert_eq!(system.topic, "plans"),
                "role_changed" => {
                    assert_eq!(system.role, "admin");
                    assert_eq!(system.user_ids, ["bob"]);
                }
                "member_left" => {
                    assert_eq!(system.user_ids, ["alice"]);
                    assert_eq!(sent.client_msg_id, "bye");
                }
                _ => assert_eq!(system.user_ids, ["bob"]),
            }
            if update.get("client_msg_id").is_none() {
                // A new idempotency key per request when the client gives none.
                assert!(
                    uuid::Uuid::parse_str(&sent.client_msg_id).is_ok(),
                    "{}",
                    sent.client_msg_id
                );
            }
        }
        let mut keys: Vec<&str> = calls
            .sends
            .iter()
            .map(|s| s.client_msg_id.as_str())
            .collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), cases.len());
    }
    for (id, update) in [
        ("x1", json!({"conversation_id": "g1", "action": "teleport"})),
        ("x2", json!({"conversation_id": "g1", "action": "kick"})),
        (
            "x3",
            json!({"conversation_id": "g1", "action": "role", "user_ids": ["bob"]}),
        ),
        ("x4", json!({"action": "leave"})),
    ] {
        let ack = request(&mut ws, id, json!({"conversation_update": update})).await;
        assert_eq!(ack["error"]["code"], "invalid_request", "{id}: {ack}");
    }
    assert_eq!(h.calls.lock().unwrap().sends.len(), cases.len());
    h.stop().await;
}

#[tokio::test]
async fn member_changes_go_through_the_log_and_ack_the_conversation() {
    let h = start(|_| {}).await;
    let (mut ws, _) = h.connect("alice").await;
    let ack = request(
        &mut ws,
        "a",
        json!({"conversation_members": {"conversation_id": "g1", "action": "add", "user_ids": ["dave"]}}),
    )
    .await;
    assert_eq!(ack["conversation"]["conversation_id"], "g1", "{ack}");
    assert_eq!(ack["conversation"]["members"], json!(["alice", "dave"]));
    let ack = request(
        &mut ws,
        "r",
        json!({"conversation_members": {"conversation_id": "g1", "action": "remove", "user_ids": ["alice"]}}),
    )
    .await;
    assert_eq!(ack["conversation"]["conversation_id"], "g1", "{ack}");
    {
        let calls = h.calls.lock().unwrap();
        let added = calls.sends[0].system.as_ref().unwrap();
        assert_eq!(calls.sends[0].kind, "system");
        assert_eq!(added.action, "members_added");
        assert_eq!(added.user_ids, ["dave"]);
        // Removing only oneself is leaving.
        let left = calls.sends[1].system.as_ref().unwrap();
        assert_eq!(left.action, "member_left");
        assert_eq!(left.user_ids, ["alice"]);
        assert_eq!(calls.gets.len(), 2);
        assert_eq!(calls.gets[0].caller_id, "alice");
        // The conversation event of the add still reaches members and the added user.
        let announced = &calls.publishes[0];
        let Some(Event::Conversation(event)) =
            announced.event.as_ref().and_then(|e| e.event.clone())
        else {
            panic!("expected a conversation event");
        };
        assert_eq!(event.change, "members_added");
        assert_eq!(event.user_ids, ["dave"]);
    }
    h.stop().await;
}

#[tokio::test]
async fn reads_receipts_threads_and_notifications_reach_storage() {
    let h = start(|_| {}).await;
    let (mut ws, welcome) = h.connect("alice").await;
    let session_id = session_id_of(&welcome);

    let ack = request(
        &mut ws,
        "t",
        json!({"thread": {"conversation_id": "c1", "root_seq": 4, "from_seq": 5, "limit": 10}}),
    )
    .await;
    assert_eq!(ack["thread"]["root"]["seq"], 4, "{ack}");
    let ack = request(
        &mut ws,
        "rc",
        json!({"receipts": {"conversation_id": "c1", "seq": 9}}),
    )
    .await;
    assert_eq!(ack["receipts"]["read_by"], 2, "{ack}");
    let ack = request(
        &mut ws,
        "n",
        json!({"notification_set": {"conversation_id": "c1", "until_ms": -1}}),
    )
    .await;
    assert!(ack["ok"].is_object(), "{ack}");
    let ack = request(
        &mut ws,
        "dnd",
        json!({"notification_set": {"until_ms": 5000}}),
    )
    .await;
    assert!(ack["ok"].is_object(), "{ack}");
    let ack = request(
        &mut ws,
        "rd",
        json!({"read": {"conversation_id": "c1", "seq": 8, "kind": "delivered"}}),
    )
    .await;
    assert!(ack["ok"].is_object(), "{ack}");
    for (id, body) in [
        (
            "bad-kind",
            json!({"read": {"conversation_id": "c1", "seq": 8, "kind": "seen"}}),
        ),
        ("bad-until", json!({"notification_set": {"until_ms": -2}})),
        ("no-root", json!({"thread": {"conversation_id": "c1"}})),
    ] {
        let ack = request(&mut ws, id, body).await;
        assert_eq!(ack["error"]["code"], "invalid_request", "{id}: {ack}");
    }

    {
        let calls = h.calls.lock().unwrap();
        let thread = &calls.threads[0];
        assert_eq!(thread.user_id, "alice");
        let t = thread.request.as_ref().unwrap();
        assert_eq!((t.root_seq, t.from_seq, t.limit), (4, 5, 10));
        assert_eq!(calls.receipts[0].user_id, "alice");
        assert_eq!(calls.receipts[0].request.as_ref().unwrap().seq, 9);
        assert_eq!(calls.notifications.len(), 2);
        assert_eq!(calls.notifications[0].user_id, "alice");
        assert_eq!(calls.notifications[0].conversation_id, "c1");
        assert_eq!(calls.notifications[0].until_ms, -1);
        assert_eq!(calls.notifications[1].conversation_id, "");
        assert_eq!(calls.notifications[1].until_ms, 5000);
        assert_eq!(calls.read_markers.len(), 1);
        assert_eq!(calls.read_markers[0].kind, "delivered");
        assert_eq!(calls.read_markers[0].seq, 8);
        // The marker (with its kind) is fanned out to the others.
        let receipt = &calls.publishes[0];
        assert_eq!(receipt.exclude_session_id, session_id);
        let Some(Event::Receipt(event)) = receipt.event.as_ref().and_then(|e| e.event.clone())
        else {
            panic!("expected a receipt event");
        };
        assert_eq!(event.marker.unwrap().kind, "delivered");
    }
    h.stop().await;
}

#[tokio::test]
async fn presence_set_passes_text_and_privacy_without_a_status() {
    let h = start(|_| {}).await;
    let (mut ws, welcome) = h.connect("alice").await;
    let ack = request(
        &mut ws,
        "p1",
        json!({"presence_set": {"status_text": "in a meeting", "last_seen_privacy": "contacts"}}),
    )
    .await;
    assert_eq!(
        ack["presence"]["users"][0]["status_text"], "in a meeting",
        "{ack}"
    );
    let ack = request(&mut ws, "p2", json!({"presence_set": {"status": "busy"}})).await;
    assert!(ack["presence"].is_object(), "{ack}");
    let ack = request(&mut ws, "p3", json!({"presence_set": {}})).await;
    assert_eq!(ack["error"]["code"], "invalid_request");
    {
        let calls = h.calls.lock().unwrap();
        assert_eq!(calls.statuses.len(), 2);
        let first = &calls.statuses[0];
        assert_eq!(first.session_id, session_id_of(&welcome));
        assert_eq!(first.status, "");
        assert_eq!(first.status_text.as_deref(), Some("in a meeting"));
        assert_eq!(first.last_seen_privacy, "contacts");
        assert!(!first.automatic);
        let second = &calls.statuses[1];
        assert_eq!(second.status, "busy");
        assert_eq!(second.status_text, None);
    }
    h.stop().await;
}

#[tokio::test]
async fn typing_is_rate_limited_per_conversation_and_carries_its_expiry() {
    let h = start(|c| {
        c.gateway.typing_interval_ms = 60_000;
        c.gateway.typing_expiry_ms = 4_000;
        // Throttled typing must not count as violations.
        c.gateway.max_violations = 2;
    })
    .await;
    let (mut ws, _) = h.connect("alice").await;
    let typing = |conversation: &str, typing: bool| json!({"typing": {"conversation_id": conversation, "typing": typing}});
    assert!(request(&mut ws, "t1", typing("c1", true)).await["ok"].is_object());
    for i in 0..3 {
        let ack = request(&mut ws, &format!("again{i}"), typing("c1", true)).await;
        assert_eq!(ack["error"]["code"], "rate_limited", "{ack}");
    }
    // Another conversation has its own limit; stopping is always forwarded.
    assert!(request(&mut ws, "t2", typing("c2", true)).await["ok"].is_object());
    assert!(request(&mut ws, "t3", typing("c1", false)).await["ok"].is_object());
    assert!(request(&mut ws, "t4", typing("c1", false)).await["ok"].is_object());
    assert_alive(&mut ws).await;

    {
        let calls = h.calls.lock().unwrap();
        let forwarded: Vec<(String, bool, u32)> = calls
            .publishes
            .iter()
            .map(|p| match p.event.as_ref().and_then(|e| e.event.clone()) {
                Some(Event::Typing(t)) => (t.conversation_id, t.typing, t.expires_in_ms),
                other => panic!("expected typing, got {other:?}"),
            })
            .collect();
        assert_eq!(
            forwarded,
            [
                ("c1".to_owned(), true, 4_000),
                ("c2".to_owned(), true, 4_000),
                ("c1".to_owned(), false, 4_000),
                ("c1".to_owned(), false, 4_000),
            ]
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn typing_is_forwarded_again_after_the_interval() {
    let h = start(|c| c.gateway.typing_interval_ms = 50).await;
    let (mut ws, _) = h.connect("alice").await;
    let typing = json!({"typing": {"conversation_id": "c1", "typing": true}});
    assert!(request(&mut ws, "t1", typing.clone()).await["ok"].is_object());
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(request(&mut ws, "t2", typing).await["ok"].is_object());
    assert_eq!(h.calls.lock().unwrap().publishes.len(), 2);
    h.stop().await;
}

#[tokio::test]
async fn ephemeral_events_are_dropped_once_the_queue_is_half_full() {
    let h = start(|c| c.gateway.outbound_queue = 4).await;
    let (mut ws, _) = h.connect("bob").await;
    // One Deliver call fills the queue before the connection task runs: three
    // messages make it more than half full, so the typing event after them is
    // dropped while the fourth message is still queued.
    let response = h
        .deliver(vec![
            message_delivery(&["bob"], "c1", 1),
            message_delivery(&["bob"], "c1", 2),
            message_delivery(&["bob"], "c1", 3),
            typing_delivery("bob"),
            message_delivery(&["bob"], "c1", 4),
        ])
        .await;
    assert_eq!(response.delivered, 4);
    for seq in 1..=4 {
        assert_eq!(recv(&mut ws).await["message"]["message"]["seq"], seq);
    }
    // Nothing else was queued, and bob is still connected.
    assert_alive(&mut ws).await;
    let (_, metrics) = http_get(h.http, "/metrics").await;
    assert!(
        metrics.contains("switchboard_gateway_events_dropped_total{type=\"typing\"} 1"),
        "{metrics}"
    );
    h.stop().await;
}

#[tokio::test]
async fn idle_sessions_are_set_away_and_back_online() {
    let h = start(|c| c.gateway.idle_away_after_ms = 300).await;
    let (mut ws, welcome) = h.connect("alice").await;
    let session_id = session_id_of(&welcome);
    // Protocol pings do not count as activity: keep pinging until presence hears
    // "away" (if pings reset the timer, this would time out).
    let mut away = false;
    for i in 0..100 {
        let ack = request(&mut ws, &format!("p{i}"), json!({"ping": {}})).await;
        assert!(ack["pong"].is_object());
        if !h.calls.lock().unwrap().statuses.is_empty() {
            away = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(away, "no automatic away after 5 s of pings only");
    // Any other request brings the session back.
    request(&mut ws, "l", json!({"conversation_list": {}})).await;
    h.wait_for("the automatic online", |calls| calls.statuses.len() >= 2)
        .await;
    {
        let calls = h.calls.lock().unwrap();
        let statuses: Vec<(&str, bool, &str)> = calls
            .statuses
            .iter()
            .map(|s| (s.status.as_str(), s.automatic, s.session_id.as_str()))
            .collect();
        assert_eq!(
            statuses,
            [
                ("away", true, session_id.as_str()),
                ("online", true, session_id.as_str())
            ]
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn idle_away_can_be_turned_off() {
    let h = start(|c| c.gateway.idle_away_after_ms = 0).await;
    let (mut ws, _) = h.connect("alice").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_alive(&mut ws).await;
    assert!(h.calls.lock().unwrap().statuses.is_empty());
    h.stop().await;
}

fn presence_event(watcher: &str, user: &str, privacy: &str) -> v1::Delivery {
    let mut delivery = presence_delivery(watcher, user);
    if let Some(Event::Presence(p)) = delivery.event.as_mut().and_then(|e| e.event.as_mut()) {
        let presence = p.presence.as_mut().unwrap();
        presence.last_seen_privacy = privacy.into();
        presence.last_seen_ms = 42;
    }
    delivery
}

#[tokio::test]
async fn last_seen_for_contacts_only_is_hidden_from_others() {
    let h = start(|_| {}).await;
    let (mut ws, _) = h.connect("bob").await;
    let ack = request(
        &mut ws,
        "w",
        json!({"presence_watch": {"user_ids": ["friend-private", "stranger-private", "stranger", "friend", "bob-private", "bob"]}}),
    )
    .await;
    let seen: Vec<(String, i64)> = ack["presence"]["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["user_id"].as_str().unwrap().to_owned(),
                int(&u["last_seen_ms"]),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("friend-private".to_owned(), 1),
            ("stranger-private".to_owned(), 0),
            ("stranger".to_owned(), 1),
            ("friend".to_owned(), 1),
            ("bob-private".to_owned(), 0),
            ("bob".to_owned(), 1),
        ]
    );
    {
        let calls = h.calls.lock().unwrap();
        assert_eq!(calls.watches[0].watcher_id, "bob");
        // One lookup for the users who show last-seen to contacts only.
        assert_eq!(calls.shared_contacts.len(), 1);
        assert_eq!(calls.shared_contacts[0].user_id, "bob");
        assert_eq!(
            calls.shared_contacts[0].other_ids,
            ["friend-private", "stranger-private", "bob-private"]
        );
    }

    // Events for users whose answer is cached: filtered at once, no new lookup.
    let response = h
        .deliver(vec![
            presence_event("bob", "friend-private", "contacts"),
            presence_event("bob", "stranger-private", "contacts"),
        ])
        .await;
    assert_eq!(response.delivered, 2);
    let first = recv(&mut ws).await;
    assert_eq!(first["presence"]["presence"]["user_id"], "friend-private");
    assert_eq!(int(&first["presence"]["presence"]["last_seen_ms"]), 42);
    let second = recv(&mut ws).await;
    assert_eq!(
        second["presence"]["presence"]["user_id"],
        "stranger-private"
    );
    assert_eq!(int(&second["presence"]["presence"]["last_seen_ms"]), 0);
    assert_eq!(h.calls.lock().unwrap().shared_contacts.len(), 1);

    // Users who switched to "contacts" after the watch: not cached, looked up
    // before the event is queued.
    h.deliver(vec![presence_event("bob", "stranger", "contacts")])
        .await;
    let frame = recv(&mut ws).await;
    assert_eq!(frame["presence"]["presence"]["user_id"], "stranger");
    assert_eq!(int(&frame["presence"]["presence"]["last_seen_ms"]), 0);
    h.deliver(vec![presence_event("bob", "friend", "contacts")])
        .await;
    let frame = recv(&mut ws).await;
    assert_eq!(frame["presence"]["presence"]["user_id"], "friend");
    assert_eq!(int(&frame["presence"]["presence"]["last_seen_ms"]), 42);
    // The user's own presence is never hidden from them.
    h.deliver(vec![presence_event("bob", "bob", "contacts")])
        .await;
    let frame = recv(&mut ws).await;
    assert_eq!(int(&frame["presence"]["presence"]["last_seen_ms"]), 42);
    {
        let calls = h.calls.lock().unwrap();
        let looked_up: Vec<&[String]> = calls
            .shared_contacts
            .iter()
            .map(|c| c.other_ids.as_slice())
            .collect();
        assert_eq!(
            looked_up,
            [
                &["friend-private", "stranger-private", "bob-private"][..],
                &["stranger"][..],
                &["friend"][..]
            ]
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn bot_tokens_mark_sends_from_bot() {
    let h = start(|_| {}).await;
    let token = h
        .signer
        .sign_account("helper-bot", Duration::from_secs(600), true)
        .unwrap();
    let mut ws = h
        .try_connect(&format!("token={token}"), Some("switchboard.v1.json"))
        .await
        .unwrap();
    assert!(recv(&mut ws).await.get("welcome").is_some());
    request(
        &mut ws,
        "s",
        json!({"send": {"conversation_id": "c1", "client_msg_id": "k1", "body": "beep"}}),
    )
    .await;
    request(
        &mut ws,
        "r",
        json!({"react": {"conversation_id": "c1", "seq": 1, "emoji": "x", "client_msg_id": "k2"}}),
    )
    .await;
    request(
        &mut ws,
        "u",
        json!({"conversation_update": {"conversation_id": "g1", "action": "topic", "topic": "t"}}),
    )
    .await;
    let (mut human, _) = h.connect("alice").await;
    request(
        &mut human,
        "s",
        json!({"send": {"conversation_id": "c1", "client_msg_id": "k3", "body": "hi"}}),
    )
    .await;
    {
        let calls = h.calls.lock().unwrap();
        let flags: Vec<(&str, bool)> = calls
            .sends
            .iter()
            .map(|s| (s.sender_id.as_str(), s.from_bot))
            .collect();
        assert_eq!(
            flags,
            [
                ("helper-bot", true),
                ("helper-bot", true),
                ("helper-bot", true),
                ("alice", false)
            ]
        );
    }
    h.stop().await;
}

/// (status, automatic) of every registration of `session_id` so far.
fn registrations(calls: &Calls, session_id: &str) -> Vec<(String, bool)> {
    calls
        .registered
        .iter()
        .filter(|s| s.session_id == session_id)
        .map(|s| (s.status.clone(), s.automatic))
        .collect()
}

#[tokio::test]
async fn sessions_register_with_the_status_asked_on_connect_and_come_back_with_the_last_one() {
    // The fake presence forgets every session at each heartbeat, so the gateway keeps
    // registering them again.
    let h = start(|c| c.gateway.heartbeat_interval_ms = 50).await;
    let query = format!("token={}&status=invisible", h.token("alice"));
    let mut ws = h
        .try_connect(&query, Some("switchboard.v1.json"))
        .await
        .unwrap();
    let welcome = recv(&mut ws).await;
    let session_id = session_id_of(&welcome);
    // The registration made during the upgrade already carries the status: presence
    // never sees the session online.
    assert_eq!(
        registrations(&h.calls.lock().unwrap(), &session_id)[0],
        ("invisible".to_string(), false)
    );

    let ack = request(&mut ws, "p1", json!({"presence_set": {"status": "busy"}})).await;
    assert!(ack["presence"].is_object(), "{ack}");
    h.wait_for("a registration with the status set last", |calls| {
        registrations(calls, &session_id)
            .last()
            .is_some_and(|(status, _)| status == "busy")
    })
    .await;
    // A status text alone leaves the remembered status as it is.
    let ack = request(
        &mut ws,
        "p2",
        json!({"presence_set": {"status_text": "lunch"}}),
    )
    .await;
    assert!(ack["presence"].is_object(), "{ack}");
    let seen = h.calls.lock().unwrap().registered.len();
    h.wait_for("another registration", |calls| {
        calls.registered.len() > seen
    })
    .await;
    let all = registrations(&h.calls.lock().unwrap(), &session_id);
    let first_busy = all.iter().position(|(s, _)| s == "busy").unwrap();
    assert!(
        all[..first_busy]
            .iter()
            .all(|r| *r == ("invisible".into(), false))
            && all[first_busy..]
                .iter()
                .all(|r| *r == ("busy".into(), false)),
        "invisible until the change, busy after it, never online: {all:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn an_idle_session_is_registered_again_as_automatically_away() {
    let h = start(|c| {
        c.gateway.heartbeat_interval_ms = 50;
        c.gateway.idle_away_after_ms = 300;
    })
    .await;
    let (mut ws, welcome) = h.connect("alice").await;
    let session_id = session_id_of(&welcome);
    h.wait_for("a registration as automatically away", |calls| {
        registrations(calls, &session_id).last() == Some(&("away".into(), true))
    })
    .await;
    // Activity brings it back: registered online again.
    request(&mut ws, "l", json!({"conversation_list": {}})).await;
    h.wait_for("a registration as online", |calls| {
        registrations(calls, &session_id).last() == Some(&("online".into(), false))
    })
    .await;
    h.stop().await;
}

#[tokio::test]
async fn an_unknown_initial_status_is_refused() {
    let h = start(|_| {}).await;
    for status in ["offline", "Online"] {
        let query = format!("token={}&status={status}", h.token("alice"));
        match h.try_connect(&query, None).await {
            Err(WsError::Http(response)) => {
                assert_eq!(response.status(), 400);
                let body: Value =
                    serde_json::from_slice(response.body().as_deref().unwrap()).expect("json body");
                assert_eq!(body["error"], "invalid_request");
                assert_eq!(
                    body["message"],
                    "status must be `online`, `away`, `busy` or `invisible`"
                );
            }
            other => panic!("expected 400, got {:?}", other.map(|_| ())),
        }
    }
    assert!(h.calls.lock().unwrap().registered.is_empty());
    h.stop().await;
}

// ---------------------------------------------------------------- hardening

#[tokio::test]
async fn refused_watches_keep_nothing_and_leave_the_quota_alone() {
    let h = start(|_| {}).await;
    let (mut ws, _) = h.connect("watcher").await;
    // Presence refuses these: before, every refused id stayed in the session's
    // watched set (memory and quota); 4 x 300 ids exceed the 1,000-user quota.
    for round in 0..4 {
        let ids: Vec<String> = (0..300).map(|i| format!("refused-{round}-{i}")).collect();
        let ack = request(
            &mut ws,
            &format!("r{round}"),
            json!({"presence_watch": {"user_ids": ids}}),
        )
        .await;
        assert_eq!(ack["error"]["code"], "invalid_request", "{ack}");
    }
    let ids: Vec<String> = (0..300).map(|i| format!("friend-{i}")).collect();
    let ack = request(&mut ws, "ok", json!({"presence_watch": {"user_ids": ids}})).await;
    assert_eq!(
        ack["presence"]["users"].as_array().unwrap().len(),
        300,
        "{ack}"
    );
    // A refused id is not watched: its presence events do not reach the session.
    let response = h
        .deliver(vec![presence_delivery("watcher", "refused-0-1")])
        .await;
    assert_eq!(response.delivered, 0);
    let response = h
        .deliver(vec![presence_delivery("watcher", "friend-1")])
        .await;
    assert_eq!(response.delivered, 1);
    let event = recv(&mut ws).await;
    assert_eq!(
        event["presence"]["presence"]["user_id"], "friend-1",
        "{event}"
    );
    h.stop().await;
}

#[tokio::test]
async fn bad_watch_ids_are_refused_before_presence_hears_them() {
    let h = start(|_| {}).await;
    let (mut ws, _) = h.connect("watcher").await;
    let long = "x".repeat(129);
    for (i, id) in ["bad\u{1}id", "two words", long.as_str(), ""]
        .iter()
        .enumerate()
    {
        let ack = request(
            &mut ws,
            &format!("w{i}"),
            json!({"presence_watch": {"user_ids": ["fine", id]}}),
        )
        .await;
        assert_eq!(ack["error"]["code"], "invalid_request", "{ack}");
    }
    assert!(h.calls.lock().unwrap().watches.is_empty());
    h.stop().await;
}

#[tokio::test]
async fn control_characters_in_ids_are_invalid_request() {
    let h = start(|_| {}).await;
    let (mut ws, _) = h.connect("alice").await;
    let frames = [
        json!({"send": {"conversation_id": "c\u{1}", "client_msg_id": "m1", "body": "x"}}),
        json!({"send": {"conversation_id": "c1", "client_msg_id": "m\n1", "body": "x"}}),
        json!({"send": {"conversation_id": "c".repeat(129), "client_msg_id": "m1", "body": "x"}}),
        json!({"edit": {"conversation_id": "c\u{7f}", "seq": 1, "client_msg_id": "m", "body": "x"}}),
        json!({"history": {"conversation_id": "c\u{0}"}}),
        json!({"typing": {"conversation_id": "c\u{1b}", "typing": true}}),
        json!({"read": {"conversation_id": "c\r", "seq": 1}}),
        json!({"sync": {"cursors": [{"conversation_id": "c\u{1}", "last_seq": 1}]}}),
        json!({"conversation_create": {"kind": "group", "members": ["bob", "eve\u{1}"]}}),
        json!({"conversation_members": {"conversation_id": "c1", "action": "add", "user_ids": ["b\tb"]}}),
        json!({"conversation_update": {"conversation_id": "c1", "action": "kick", "user_ids": ["x\u{0}"]}}),
        json!({"notification_set": {"conversation_id": "c\u{1}", "until_ms": 0}}),
    ];
    for (i, frame) in frames.into_iter().enumerate() {
        let ack = request(&mut ws, &format!("f{i}"), frame).await;
        assert_eq!(ack["error"]["code"], "invalid_request", "frame {i}: {ack}");
    }
    {
        let calls = h.calls.lock().unwrap();
        assert!(calls.sends.is_empty() && calls.publishes.is_empty());
    }
    h.stop().await;
}

#[tokio::test]
async fn bad_bodies_of_known_requests_are_bad_frame_and_arrays_are_refused() {
    let h = start(|_| {}).await;
    let (mut ws, _) = h.connect("alice").await;
    let frames = [
        json!({"edit": {"conversation_id": "c1", "seq": "not a number"}}),
        json!({"delete": 5}),
        json!({"react": {"emoji": 1}}),
        json!({"thread": []}),
        json!({"receipts": "c1"}),
        json!({"conversation_update": {"user_ids": 3}}),
        json!({"notification_set": {"until_ms": "x"}}),
        // Read positionally by serde as conversation_id, client_msg_id, body.
        json!({"send": ["c1", "m1", "hello"]}),
    ];
    for (i, frame) in frames.into_iter().enumerate() {
        let ack = request(&mut ws, &format!("b{i}"), frame).await;
        assert_eq!(ack["error"]["code"], "bad_frame", "frame {i}: {ack}");
    }
    assert!(h.calls.lock().unwrap().sends.is_empty());
    h.stop().await;
}

#[tokio::test]
async fn a_user_has_at_most_max_connections_per_user() {
    let h = start(|c| c.gateway.max_connections_per_user = 2).await;
    let (first, _) = h.connect("greedy").await;
    let (_second, _) = h.connect("greedy").await;
    let query = format!("token={}", h.token("greedy"));
    match h.try_connect(&query, None).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 429),
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    // Another user is not affected.
    let (_other, _) = h.connect("someone-else").await;
    // A closed connection gives its place back.
    drop(first);
    tokio::time::timeout(TIMEOUT, async {
        while h.try_connect(&query, None).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a place is free again");
    h.stop().await;
}

#[tokio::test]
async fn sessions_close_with_4002_when_their_token_expires() {
    let h = start(|c| c.auth.leeway_secs = 0).await;
    let token = h.signer.sign("short", Duration::from_secs(2)).unwrap();
    let mut ws = h
        .try_connect(&format!("token={token}"), Some("switchboard.v1.json"))
        .await
        .unwrap();
    let welcome = recv(&mut ws).await;
    assert!(welcome.get("welcome").is_some(), "{welcome}");
    let (frames, code) = recv_until_close(&mut ws).await;
    assert_eq!(code, Some(CloseCode::from(close_code::TOKEN_EXPIRED)));
    assert!(
        frames.iter().any(|f| f["error"]["code"] == "unauthorized"),
        "{frames:?}"
    );
    h.stop().await;
}

/// Read until the server closes the connection (EOF or reset).
async fn read_until_closed(stream: &mut tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    tokio::time::timeout(TIMEOUT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server closed the connection");
}

/// A TCP connection that has sent half a request header.
async fn half_request(addr: SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /v1/connect HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    s
}

#[tokio::test]
async fn unfinished_request_headers_are_timed_out() {
    let h = start(|c| c.gateway.header_read_timeout_ms = 200).await;
    let mut slow = half_request(h.http).await;
    read_until_closed(&mut slow).await;
    // A connection that sends nothing at all is closed too.
    let mut silent = tokio::net::TcpStream::connect(h.http).await.unwrap();
    read_until_closed(&mut silent).await;
    // And a keep-alive connection idle after its request.
    {
        use tokio::io::AsyncWriteExt;
        let mut idle = tokio::net::TcpStream::connect(h.http).await.unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        read_until_closed(&mut idle).await;
    }
    h.stop().await;
}

#[tokio::test]
async fn connections_not_yet_upgraded_are_capped() {
    let h = start(|c| {
        c.gateway.max_pending_upgrades = 2;
        c.gateway.header_read_timeout_ms = 60_000;
    })
    .await;
    // Upgraded connections do not count: more of them than the cap open fine.
    let mut sockets = Vec::new();
    for i in 0..3 {
        sockets.push(h.connect(&format!("user{i}")).await.0);
    }
    let first = half_request(h.http).await;
    let _second = half_request(h.http).await;
    let mut third = half_request(h.http).await;
    read_until_closed(&mut third).await;
    assert!(h
        .try_connect(&format!("token={}", h.token("late")), None)
        .await
        .is_err());
    drop(first);
    tokio::time::timeout(TIMEOUT, async {
        while h
            .try_connect(&format!("token={}", h.token("late")), None)
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a pending place is free again");
    h.stop().await;
}

#[tokio::test]
async fn connections_per_ip_are_capped() {
    let h = start(|c| c.gateway.max_connections_per_ip = 2).await;
    let (a, _) = h.connect("a").await;
    let (_b, _) = h.connect("b").await;
    let mut extra = tokio::net::TcpStream::connect(h.http).await.unwrap();
    read_until_closed(&mut extra).await;
    drop(a);
    tokio::time::timeout(TIMEOUT, async {
        while h
            .try_connect(&format!("token={}", h.token("c")), None)
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the address has a place again");
    h.stop().await;
}

#[tokio::test]
async fn a_users_connections_share_one_request_budget() {
    let h = start(|c| {
        c.gateway.requests_per_second = 1;
        c.gateway.request_burst = 3;
    })
    .await;
    let (mut one, _) = h.connect("reader").await;
    let (mut two, _) = h.connect("reader").await;
    for i in 0..3 {
        let ack = request(&mut one, &format!("p{i}"), json!({"ping": {}})).await;
        assert!(ack["pong"].is_object(), "{ack}");
    }
    // Each connection has a burst of 3 of its own; the user's budget is spent.
    let mut limited = 0;
    for i in 0..2 {
        let ack = request(&mut two, &format!("q{i}"), json!({"ping": {}})).await;
        if ack["error"]["code"] == "rate_limited" {
            limited += 1;
        }
    }
    assert!(limited >= 1, "the second connection got its own budget");
    h.stop().await;
}
