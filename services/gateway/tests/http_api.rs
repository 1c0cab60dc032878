//! The HTTP API against fake presence, routing and storage servers on 127.0.0.1:0,
//! driven by a plain HTTP/1.1 client; and `docs/openapi.json` checked against the
//! served routes and the protocol's JSON forms.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use switchboard_config::Config;
use switchboard_gateway::{Gateway, Listeners, API_ROUTES};
use switchboard_proto::v1::{self, presence_server, routing_server, storage_server};
use switchboard_proto::{status, ErrorCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

const SECRET: &str = "http-api-test-secret-0123456789abcdef";
const FORBIDDEN: &str = "not-my-conversation";
const MISSING: &str = "no-such-conversation";
const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_FRAME_BYTES: usize = 8 * 1024;
const MAX_BODY_BYTES: usize = 4 * 1024;

// ---------------------------------------------------------------- fake backends

/// What the fakes were asked.
#[derive(Default)]
struct Calls {
    sends: Vec<v1::RouteSendRequest>,
    histories: Vec<v1::StorageHistoryRequest>,
    queries: Vec<v1::QueryRequest>,
    creates: Vec<v1::CreateConversationRequest>,
    put_webhooks: Vec<v1::PutWebhookRequest>,
    deleted_webhooks: Vec<v1::DeleteWebhookRequest>,
    registered: usize,
}

type Recorder = Arc<Mutex<Calls>>;

struct FakePresence(Recorder);

#[tonic::async_trait]
impl presence_server::Presence for FakePresence {
    async fn register_session(
        &self,
        _: Request<v1::RegisterSessionRequest>,
    ) -> Result<Response<v1::RegisterSessionResponse>, Status> {
        self.0.lock().unwrap().registered += 1;
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
        _: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
    async fn set_status(
        &self,
        _: Request<v1::SetStatusRequest>,
    ) -> Result<Response<v1::SetStatusResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
    /// Every user was last seen at 1000; "friend" and "stranger" show it to contacts
    /// only, everyone else to everyone.
    async fn query(
        &self,
        request: Request<v1::QueryRequest>,
    ) -> Result<Response<v1::QueryResponse>, Status> {
        let request = request.into_inner();
        let users = request
            .user_ids
            .iter()
            .map(|u| v1::UserPresence {
                user_id: u.clone(),
                status: "offline".into(),
                last_seen_ms: 1000,
                last_seen_privacy: if u == "friend" || u == "stranger" {
                    "contacts".into()
                } else {
                    "everyone".into()
                },
                ..Default::default()
            })
            .collect();
        self.0.lock().unwrap().queries.push(request);
        Ok(Response::new(v1::QueryResponse { users }))
    }
    async fn watch(
        &self,
        _: Request<v1::WatchRequest>,
    ) -> Result<Response<v1::QueryResponse>, Status> {
        Err(Status::unimplemented("the HTTP API must not watch"))
    }
    async fn route(
        &self,
        _: Request<v1::RouteRequest>,
    ) -> Result<Response<v1::RouteResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
    async fn drop_gateway(
        &self,
        _: Request<v1::DropGatewayRequest>,
    ) -> Result<Response<v1::DropGatewayResponse>, Status> {
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
        let mut calls = self.0.lock().unwrap();
        let duplicate = calls
            .sends
            .iter()
            .any(|s| s.client_msg_id == request.client_msg_id);
        let result = v1::SendResult {
            conversation_id: request.conversation_id.clone(),
            message_id: format!("msg-{}", request.client_msg_id),
            seq: calls.sends.len() as u64 + 1,
            duplicate,
            sent_at_ms: 42,
        };
        calls.sends.push(request);
        Ok(Response::new(result))
    }
    async fn publish(
        &self,
        _: Request<v1::PublishRequest>,
    ) -> Result<Response<v1::PublishResponse>, Status> {
        Ok(Response::new(v1::PublishResponse { gateways: 0 }))
    }
}

struct FakeStorage(Recorder);

fn conversation(id: &str, members: Vec<String>) -> v1::Conversation {
    v1::Conversation {
        conversation_id: id.into(),
        kind: "group".into(),
        owner_id: members.first().cloned().unwrap_or_default(),
        members,
        ..Default::default()
    }
}

fn membership(conversation_id: &str) -> Result<(), Status> {
    match conversation_id {
        FORBIDDEN => Err(status(
            ErrorCode::NotMember,
            "not a member of the conversation",
        )),
        MISSING => Err(status(ErrorCode::NotFound, "no such conversation")),
        _ => Ok(()),
    }
}

#[tonic::async_trait]
impl storage_server::Storage for FakeStorage {
    async fn create_conversation(
        &self,
        request: Request<v1::CreateConversationRequest>,
    ) -> Result<Response<v1::Conversation>, Status> {
        let request = request.into_inner();
        let mut members = vec![request.creator_id.clone()];
        members.extend(request.members.iter().cloned());
        let mut c = conversation("conv-1", members);
        c.kind = request.kind.clone();
        c.name = request.name.clone();
        self.0.lock().unwrap().creates.push(request);
        Ok(Response::new(c))
    }
    async fn get_conversation(
        &self,
        request: Request<v1::GetConversationRequest>,
    ) -> Result<Response<v1::Conversation>, Status> {
        let request = request.into_inner();
        membership(&request.conversation_id)?;
        Ok(Response::new(conversation(
            &request.conversation_id,
            vec![request.caller_id, "bob".into()],
        )))
    }
    async fn change_members(
        &self,
        _: Request<v1::ChangeMembersRequest>,
    ) -> Result<Response<v1::Conversation>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_conversations(
        &self,
        request: Request<v1::ListConversationsRequest>,
    ) -> Result<Response<v1::ConversationListResult>, Status> {
        let user = request.into_inner().user_id;
        Ok(Response::new(v1::ConversationListResult {
            conversations: vec![v1::Conversation {
                conversation_id: format!("{user}-conv"),
                unread_count: 3,
                ..Default::default()
            }],
        }))
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
        let request = request.into_inner();
        let inner = request.request.clone().unwrap_or_default();
        membership(&inner.conversation_id)?;
        self.0.lock().unwrap().histories.push(request);
        Ok(Response::new(v1::HistoryResult {
            conversation_id: inner.conversation_id.clone(),
            messages: vec![v1::Message {
                conversation_id: inner.conversation_id,
                seq: 7,
                body: "hello".into(),
                sender_id: "bob".into(),
                ..Default::default()
            }],
            has_more: true,
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
        _: Request<v1::SetReadMarkerRequest>,
    ) -> Result<Response<v1::ReadMarker>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn authorize(
        &self,
        _: Request<v1::AuthorizeRequest>,
    ) -> Result<Response<v1::AuthorizeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn thread(
        &self,
        _: Request<v1::StorageThreadRequest>,
    ) -> Result<Response<v1::ThreadResult>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn receipts(
        &self,
        _: Request<v1::StorageReceiptsRequest>,
    ) -> Result<Response<v1::ReceiptsResult>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn set_notification(
        &self,
        _: Request<v1::SetNotificationRequest>,
    ) -> Result<Response<v1::SetNotificationResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn notification_targets(
        &self,
        _: Request<v1::NotificationTargetsRequest>,
    ) -> Result<Response<v1::NotificationTargetsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    /// Everyone shares a conversation with "friend" only.
    async fn shared_contacts(
        &self,
        request: Request<v1::SharedContactsRequest>,
    ) -> Result<Response<v1::SharedContactsResponse>, Status> {
        let shared = request
            .into_inner()
            .other_ids
            .into_iter()
            .filter(|u| u == "friend")
            .collect();
        Ok(Response::new(v1::SharedContactsResponse { shared }))
    }
    async fn put_webhook(
        &self,
        request: Request<v1::PutWebhookRequest>,
    ) -> Result<Response<v1::Webhook>, Status> {
        let request = request.into_inner();
        membership(&request.conversation_id)?;
        if !request.url.starts_with("https://") && !request.url.starts_with("http://") {
            return Err(status(ErrorCode::InvalidRequest, "url must be http(s)"));
        }
        let webhook = v1::Webhook {
            webhook_id: "wh-1".into(),
            conversation_id: request.conversation_id.clone(),
            url: request.url.clone(),
            secret: "ab".repeat(32),
            created_by: request.actor_id.clone(),
            ..Default::default()
        };
        self.0.lock().unwrap().put_webhooks.push(request);
        Ok(Response::new(webhook))
    }
    async fn list_webhooks(
        &self,
        request: Request<v1::ListWebhooksRequest>,
    ) -> Result<Response<v1::ListWebhooksResponse>, Status> {
        let request = request.into_inner();
        membership(&request.conversation_id)?;
        Ok(Response::new(v1::ListWebhooksResponse {
            webhooks: vec![v1::Webhook {
                webhook_id: "wh-1".into(),
                conversation_id: request.conversation_id,
                url: "https://example.test/hook".into(),
                created_by: request.actor_id,
                ..Default::default()
            }],
        }))
    }
    async fn delete_webhook(
        &self,
        request: Request<v1::DeleteWebhookRequest>,
    ) -> Result<Response<v1::DeleteWebhookResponse>, Status> {
        let request = request.into_inner();
        membership(&request.conversation_id)?;
        if request.webhook_id != "wh-1" {
            return Err(status(ErrorCode::NotFound, "no such webhook"));
        }
        self.0.lock().unwrap().deleted_webhooks.push(request);
        Ok(Response::new(Default::default()))
    }
    async fn advance_webhook(
        &self,
        _: Request<v1::AdvanceWebhookRequest>,
    ) -> Result<Response<v1::Webhook>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

// ---------------------------------------------------------------- harness

struct Harness {
    calls: Recorder,
    http: SocketAddr,
    grpc: SocketAddr,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    signer: switchboard_auth::Signer,
}

async fn start(tweak: impl FnOnce(&mut Config)) -> Harness {
    let calls = Recorder::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backends = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(presence_server::PresenceServer::new(FakePresence(
            calls.clone(),
        )))
        .add_service(routing_server::RoutingServer::new(FakeRouting(
            calls.clone(),
        )))
        .add_service(storage_server::StorageServer::new(FakeStorage(
            calls.clone(),
        )));
    tokio::spawn(server.serve_with_incoming(TcpListenerStream::new(listener)));

    let mut config = Config::default();
    let url = format!("http://{backends}");
    config.cluster.presence_url = url.clone();
    config.cluster.routing_url = url.clone();
    config.cluster.storage_url = url;
    config.auth.hs256_secret = SECRET.into();
    config.gateway.advertise_url = "http://gateway-under-test:1".into();
    config.gateway.max_frame_bytes = MAX_FRAME_BYTES;
    config.routing.max_body_bytes = MAX_BODY_BYTES;
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
        http,
        grpc,
        shutdown,
        server,
        signer: switchboard_auth::Signer::hs256(SECRET.as_bytes()),
    }
}

/// One HTTP response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// Assert an error reply: status, code, JSON content type.
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.json()["code"], code, "{self:?}");
        assert!(self.json()["message"].is_string(), "{self:?}");
        assert_eq!(self.headers["content-type"], "application/json");
    }
}

impl Harness {
    fn token(&self, user: &str) -> String {
        self.signer.sign(user, Duration::from_secs(600)).unwrap()
    }

    fn bot_token(&self, user: &str) -> String {
        self.signer
            .sign_account(user, Duration::from_secs(600), true)
            .unwrap()
    }

    /// A request with `Connection: close`; `headers` are extra header lines.
    async fn raw(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(self.http).await.unwrap();
            let mut head = format!(
                "{method} {path} HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\ncontent-length: {}\r\n",
                body.len()
            );
            for (name, value) in headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("\r\n");
            stream.write_all(head.as_bytes()).await.unwrap();
            stream.write_all(body).await.unwrap();
            let mut out = Vec::new();
            stream.read_to_end(&mut out).await.unwrap();
            out
        };
        let out = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .expect("HTTP exchange timed out");
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap()[9..12].parse().unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Reply {
            status,
            headers,
            body: body.to_owned(),
        }
    }

    async fn call(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> Reply {
        let auth = format!("Bearer {token}");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.raw(
            method,
            path,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body.as_bytes(),
        )
        .await
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

/// `path` with its `{...}` parameters filled in.
fn concrete(path: &str) -> String {
    path.replace("{id}", "conv-1")
        .replace("{webhook_id}", "wh-1")
}

fn openapi() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
    let text = std::fs::read_to_string(path).expect("docs/openapi.json");
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

// ---------------------------------------------------------------- the document

#[tokio::test]
async fn every_documented_operation_is_served_and_every_served_route_is_documented() {
    let doc = openapi();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            documented.insert((
                method.to_ascii_uppercase(),
                path.clone(),
                operation["operationId"].as_str().unwrap().to_owned(),
            ));
        }
    }
    let served: BTreeSet<_> = API_ROUTES
        .iter()
        .map(|r| {
            (
                r.method.to_owned(),
                r.path.to_owned(),
                r.operation.to_owned(),
            )
        })
        .collect();
    assert_eq!(documented, served);

    // And the router really answers each of them: without a token every one is a
    // 401 from the API (an unrouted one would be 404 or 405).
    let h = start(|_| {}).await;
    for route in API_ROUTES {
        let reply = h.raw(route.method, &concrete(route.path), &[], b"").await;
        reply.assert_error(401, "unauthorized");
        assert!(
            reply.headers["www-authenticate"].starts_with("Bearer"),
            "{reply:?}"
        );
    }
    let reply = h.raw("GET", "/v1/not-an-endpoint", &[], b"").await;
    assert_eq!(reply.status, 404);
    h.stop().await;
}

/// Every `$ref` in `value` resolves in `doc`.
fn check_refs(doc: &Value, value: &Value) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(target)) = map.get("$ref") {
                let pointer = target.strip_prefix('#').expect("a local reference");
                assert!(doc.pointer(pointer).is_some(), "dangling $ref {target}");
            }
            map.values().for_each(|v| check_refs(doc, v));
        }
        Value::Array(items) => items.iter().for_each(|v| check_refs(doc, v)),
        _ => {}
    }
}

#[test]
fn documented_schemas_have_exactly_the_fields_of_the_protocol_json() {
    let doc = openapi();
    check_refs(&doc, &doc);
    let fields =
        |value: Value| -> BTreeSet<String> { value.as_object().unwrap().keys().cloned().collect() };
    let cases: Vec<(&str, Value)> = vec![
        ("Message", json!(v1::Message::default())),
        ("ReactionCount", json!(v1::ReactionCount::default())),
        ("SystemEvent", json!(v1::SystemEvent::default())),
        ("Member", json!(v1::Member::default())),
        ("Conversation", json!(v1::Conversation::default())),
        (
            "ConversationListResult",
            json!(v1::ConversationListResult::default()),
        ),
        (
            "ConversationCreateRequest",
            json!(v1::ConversationCreateRequest::default()),
        ),
        ("SendMessageRequest", json!(v1::SendRequest::default())),
        ("SendResult", json!(v1::SendResult::default())),
        ("HistoryResult", json!(v1::HistoryResult::default())),
        ("UserPresence", json!(v1::UserPresence::default())),
        ("PresenceResult", json!(v1::PresenceResult::default())),
        ("Webhook", json!(v1::Webhook::default())),
        (
            "ListWebhooksResponse",
            json!(v1::ListWebhooksResponse::default()),
        ),
    ];
    for (name, value) in cases {
        let schema = &doc["components"]["schemas"][name]["properties"];
        assert!(schema.is_object(), "schema {name} is not documented");
        assert_eq!(fields(schema.clone()), fields(value), "schema {name}");
    }
    // The error codes listed are the protocol's.
    let codes: BTreeSet<String> = doc["components"]["schemas"]["Error"]["properties"]["code"]
        ["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    let expected: BTreeSet<String> = ErrorCode::ALL
        .iter()
        .map(|c| c.as_str().to_owned())
        .collect();
    assert_eq!(codes, expected);
}

/// Every enum in the document lists values, none of them empty.
fn check_enums(value: &Value, at: &str) {
    match value {
        Value::Object(map) => {
            if let Some(values) = map.get("enum") {
                let values = values.as_array().expect("an enum is an array");
                assert!(!values.is_empty(), "empty enum at {at}");
                assert!(
                    !values.contains(&json!("")),
                    "empty string in the enum at {at}"
                );
            }
            for (key, v) in map {
                check_enums(v, &format!("{at}/{key}"));
            }
        }
        Value::Array(items) => items.iter().for_each(|v| check_enums(v, at)),
        _ => {}
    }
}

/// No control characters (what `char::is_control` matches: C0, DEL and C1).
const NO_CONTROL: &str = "\\u0000-\\u001F\\u007F-\\u009F";

#[test]
fn the_schema_refuses_what_the_server_refuses() {
    let doc = openapi();
    check_enums(&doc, "");
    let schemas = &doc["components"]["schemas"];
    let id = &schemas["Id"];
    assert_eq!(id["minLength"], 1);
    assert_eq!(id["maxLength"], switchboard_proto::ids::MAX_ID_BYTES);
    assert_eq!(id["pattern"], format!("^[^{NO_CONTROL}]+$"));
    let user = &schemas["UserId"];
    assert_eq!(user["minLength"], 1);
    assert_eq!(user["maxLength"], switchboard_auth::MAX_USER_ID_BYTES);
    assert_eq!(user["pattern"], format!("^[^\\s{NO_CONTROL}]+$"));
    // Every path parameter is an id.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for parameter in item["parameters"].as_array().into_iter().flatten() {
            if parameter["in"] == "path" {
                assert_eq!(
                    parameter["schema"]["$ref"], "#/components/schemas/Id",
                    "{path}: {parameter}"
                );
            }
        }
    }
    let user_ref = json!({"$ref": "#/components/schemas/UserId"});
    let create = &schemas["ConversationCreateRequest"]["properties"];
    assert_eq!(create["members"]["items"], user_ref);
    assert_eq!(create["members"]["maxItems"], 1000);
    let send = &schemas["SendMessageRequest"]["properties"];
    assert_eq!(send["mentions"]["items"], user_ref);
    assert_eq!(
        send["mentions"]["maxItems"],
        switchboard_proto::timeline::MAX_MENTIONS
    );
    for field in ["conversation_id", "client_msg_id"] {
        assert_eq!(send[field]["maxLength"], 128, "{field}");
        assert_eq!(
            send[field]["pattern"],
            format!("^[^{NO_CONTROL}]*$"),
            "{field}"
        );
    }
    let url = &schemas["WebhookCreateRequest"]["properties"]["url"];
    assert_eq!(url["minLength"], 1);
    assert_eq!(url["maxLength"], 2048);
}

#[tokio::test]
async fn the_server_refuses_ids_the_schema_refuses() {
    let h = start(|_| {}).await;
    let token = h.token("alice");
    for path in [
        "/v1/conversations/c%01x/messages",
        "/v1/conversations/c%7Fx",
        "/v1/presence?user_ids=a%0Ab",
        "/v1/presence?user_ids=a%20b",
        "/v1/conversations/c%01x/webhooks",
    ] {
        let reply = h.call("GET", path, &token, None).await;
        reply.assert_error(400, "invalid_request");
    }
    let long = "c".repeat(129);
    let reply = h
        .call("GET", &format!("/v1/conversations/{long}"), &token, None)
        .await;
    reply.assert_error(400, "invalid_request");
    let reply = h
        .call(
            "POST",
            "/v1/conversations",
            &token,
            Some(json!({"kind": "group", "members": ["bob", "eve\u{1}"]})),
        )
        .await;
    reply.assert_error(400, "invalid_request");
    h.stop().await;
}

#[test]
fn the_webhook_delivery_and_bearer_auth_are_documented() {
    let doc = openapi();
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerAuth"]["scheme"],
        "bearer"
    );
    let post = &doc["webhooks"]["conversationEvents"]["post"];
    let headers: BTreeSet<&str> = post["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["in"] == "header")
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        headers,
        BTreeSet::from([
            "X-Switchboard-Signature",
            "X-Switchboard-Timestamp",
            "X-Switchboard-Webhook-Id"
        ])
    );
    let description = post["description"].as_str().unwrap();
    assert!(description.contains("HMAC-SHA256"), "{description}");
    assert!(description.contains("<X-Switchboard-Timestamp>.<raw body>"));
    let delivery = &doc["components"]["schemas"]["WebhookDelivery"]["properties"];
    for field in ["webhook_id", "conversation_id", "events"] {
        assert!(delivery.get(field).is_some(), "{field}");
    }
}

// ---------------------------------------------------------------- auth and limits

#[tokio::test]
async fn missing_malformed_and_forged_tokens_get_401_with_a_bearer_challenge() {
    let h = start(|_| {}).await;
    let forged = switchboard_auth::Signer::hs256(b"not-the-gateway-secret-0123456789abc")
        .sign("alice", Duration::from_secs(60))
        .unwrap();
    let basic = [("authorization", "Basic YWxpY2U6cHc=")];
    let garbage = [("authorization", "Bearer garbage")];
    let forged = format!("Bearer {forged}");
    let forged = [("authorization", forged.as_str())];
    let cases: [&[(&str, &str)]; 4] = [&[], &basic, &garbage, &forged];
    for headers in cases {
        let reply = h.raw("GET", "/v1/conversations", headers, b"").await;
        reply.assert_error(401, "unauthorized");
        assert!(reply.headers["www-authenticate"].starts_with("Bearer"));
    }
    let token = h.token("alice");
    let reply = h.call("GET", "/v1/conversations", &token, None).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        h.calls.lock().unwrap().registered,
        0,
        "HTTP callers are not sessions in presence"
    );
    h.stop().await;
}

#[tokio::test]
async fn requests_beyond_the_per_user_rate_are_refused_with_429() {
    let h = start(|c| {
        c.gateway.requests_per_second = 1;
        c.gateway.request_burst = 2;
    })
    .await;
    let alice = h.token("alice");
    for _ in 0..2 {
        let reply = h.call("GET", "/v1/conversations", &alice, None).await;
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    // A new token of the same user shares the user's budget.
    let reply = h
        .call("GET", "/v1/conversations", &h.token("alice"), None)
        .await;
    reply.assert_error(429, "rate_limited");
    assert!(reply.headers.contains_key("retry-after"));
    let reply = h
        .call("GET", "/v1/conversations", &h.token("bob"), None)
        .await;
    assert_eq!(reply.status, 200, "another user has their own budget");
    h.stop().await;
}

#[tokio::test]
async fn bad_json_oversized_bodies_and_wrong_methods_get_json_errors() {
    let h = start(|_| {}).await;
    let token = h.token("alice");
    let auth = format!("Bearer {token}");
    let auth = [("authorization", auth.as_str())];

    let reply = h
        .raw(
            "POST",
            "/v1/conversations/conv-1/messages",
            &auth,
            b"{not json",
        )
        .await;
    reply.assert_error(400, "bad_frame");
    let reply = h
        .raw("POST", "/v1/conversations", &auth, br#"{"kind": 5}"#)
        .await;
    reply.assert_error(400, "bad_frame");
    // serde would read these positionally; the API takes objects only.
    let reply = h
        .raw(
            "POST",
            "/v1/conversations/conv-1/messages",
            &auth,
            br#"["conv-1", "m1", "hello"]"#,
        )
        .await;
    reply.assert_error(400, "bad_frame");
    let reply = h
        .raw("POST", "/v1/conversations", &auth, br#"[["bob"], "group"]"#)
        .await;
    reply.assert_error(400, "bad_frame");
    let reply = h
        .raw(
            "POST",
            "/v1/conversations/conv-1/webhooks",
            &auth,
            br#"["https://example.com/hook"]"#,
        )
        .await;
    reply.assert_error(400, "bad_frame");

    // Above the JSON limit: gateway.max_frame_bytes, raised to hold a body of
    // routing.max_body_bytes in the worst escaping (six times it plus 4 KiB).
    let json_limit = MAX_FRAME_BYTES.max(6 * MAX_BODY_BYTES + 4096);
    let huge = json!({ "body": "x".repeat(json_limit + 1) }).to_string();
    let reply = h
        .raw(
            "POST",
            "/v1/conversations/conv-1/messages",
            &auth,
            huge.as_bytes(),
        )
        .await;
    reply.assert_error(413, "frame_too_large");

    let reply = h.raw("PUT", "/v1/conversations", &auth, b"{}").await;
    reply.assert_error(405, "invalid_request");

    let reply = h
        .call(
            "GET",
            "/v1/conversations/conv-1/messages?limit=lots",
            &token,
            None,
        )
        .await;
    reply.assert_error(400, "invalid_request");
    assert!(h.calls.lock().unwrap().sends.is_empty());
    h.stop().await;
}

// ---------------------------------------------------------------- endpoints

#[tokio::test]
async fn messages_are_sent_through_routing_as_the_token_user_on_device_http() {
    let h = start(|_| {}).await;
    let bot = h.bot_token("relay-bot");
    let reply = h
        .raw(
            "POST",
            "/v1/conversations/conv-1/messages",
            &[
                ("authorization", &format!("Bearer {bot}")),
                ("idempotency-key", "build-1234"),
            ],
            json!({"body": "build passed", "content_type": "text/markdown", "mentions": ["bob"]})
                .to_string()
                .as_bytes(),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let result = reply.json();
    assert_eq!(result["conversation_id"], "conv-1");
    assert_eq!(result["seq"], 1);
    assert_eq!(result["message_id"], "msg-build-1234");
    assert_eq!(result["duplicate"], false);

    // A retry with the same key is a duplicate (routing decides; the key reaches it).
    let reply = h
        .raw(
            "POST",
            "/v1/conversations/conv-1/messages",
            &[
                ("authorization", &format!("Bearer {bot}")),
                ("idempotency-key", "build-1234"),
            ],
            json!({"body": "build passed"}).to_string().as_bytes(),
        )
        .await;
    assert_eq!(reply.json()["duplicate"], true, "{reply:?}");

    // A human without a key: a fresh UUID per request.
    let alice = h.token("alice");
    let reply = h
        .call(
            "POST",
            "/v1/conversations/conv-1/messages",
            &alice,
            Some(json!({"body": "hi"})),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");

    let sends = std::mem::take(&mut h.calls.lock().unwrap().sends);
    assert_eq!(sends.len(), 3);
    let first = &sends[0];
    assert_eq!(first.sender_id, "relay-bot");
    assert_eq!(first.sender_device, "http");
    assert!(
        first.session_id.starts_with("http-"),
        "{}",
        first.session_id
    );
    assert_eq!(first.conversation_id, "conv-1");
    assert_eq!(first.client_msg_id, "build-1234");
    assert_eq!(first.body, "build passed");
    assert_eq!(first.content_type, "text/markdown");
    assert_eq!(first.mentions, ["bob"]);
    assert!(first.from_bot, "a bot token's messages carry from_bot");
    assert_ne!(sends[0].session_id, sends[1].session_id);
    let human = &sends[2];
    assert_eq!(human.sender_id, "alice");
    assert!(!human.from_bot);
    assert!(uuid::Uuid::parse_str(&human.client_msg_id).is_ok());
    h.stop().await;
}

#[tokio::test]
async fn send_errors_carry_the_websocket_codes_and_http_statuses() {
    let h = start(|_| {}).await;
    let token = h.token("alice");
    let send = |conversation: &str, body: Value| {
        let path = format!("/v1/conversations/{conversation}/messages");
        let token = token.clone();
        let h = &h;
        async move { h.call("POST", &path, &token, Some(body)).await }
    };
    send(FORBIDDEN, json!({"body": "let me in"}))
        .await
        .assert_error(403, "not_member");
    send("conv-1", json!({"body": "x".repeat(MAX_BODY_BYTES + 1)}))
        .await
        .assert_error(400, "body_too_large");
    send(
        "conv-1",
        json!({"conversation_id": "conv-2", "body": "which one?"}),
    )
    .await
    .assert_error(400, "invalid_request");
    send("conv-1", json!({"client_msg_id": "a", "body": "ok"}))
        .await
        .status
        .eq(&200)
        .then_some(())
        .expect("a body key alone is fine");
    let reply = h
        .raw(
            "POST",
            "/v1/conversations/conv-1/messages",
            &[
                ("authorization", &format!("Bearer {token}")),
                ("idempotency-key", "b"),
            ],
            json!({"client_msg_id": "a", "body": "two keys"})
                .to_string()
                .as_bytes(),
        )
        .await;
    reply.assert_error(400, "invalid_request");
    assert_eq!(h.calls.lock().unwrap().sends.len(), 1);
    h.stop().await;
}

#[tokio::test]
async fn conversations_are_created_listed_and_read() {
    let h = start(|_| {}).await;
    let token = h.token("alice");
    let reply = h
        .call(
            "POST",
            "/v1/conversations",
            &token,
            Some(json!({"kind": "group", "members": ["bob", "carol"], "name": "ops"})),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let created = reply.json();
    assert_eq!(created["conversation_id"], "conv-1");
    assert_eq!(created["members"], json!(["alice", "bob", "carol"]));
    assert_eq!(created["name"], "ops");
    {
        let calls = h.calls.lock().unwrap();
        assert_eq!(calls.creates[0].creator_id, "alice");
        assert_eq!(calls.creates[0].kind, "group");
    }

    let reply = h.call("GET", "/v1/conversations", &token, None).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.json()["conversations"][0]["conversation_id"],
        "alice-conv"
    );
    assert_eq!(reply.json()["conversations"][0]["unread_count"], 3);

    let reply = h
        .call("GET", "/v1/conversations/conv-9", &token, None)
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["conversation_id"], "conv-9");
    assert_eq!(reply.json()["members"], json!(["alice", "bob"]));

    h.call("GET", &format!("/v1/conversations/{MISSING}"), &token, None)
        .await
        .assert_error(404, "not_found");
    h.call(
        "GET",
        &format!("/v1/conversations/{FORBIDDEN}"),
        &token,
        None,
    )
    .await
    .assert_error(403, "not_member");
    h.stop().await;
}

#[tokio::test]
async fn history_passes_its_query_parameters_and_returns_the_page() {
    let h = start(|_| {}).await;
    let token = h.token("alice");
    let reply = h
        .call(
            "GET",
            "/v1/conversations/conv-1/messages?from_seq=10&direction=forward&limit=20",
            &token,
            None,
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let page = reply.json();
    assert_eq!(page["conversation_id"], "conv-1");
    assert_eq!(page["has_more"], true);
    assert_eq!(page["messages"][0]["seq"], 7);
    assert_eq!(page["messages"][0]["body"], "hello");

    let reply = h
        .call("GET", "/v1/conversations/conv-1/messages", &token, None)
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    {
        let calls = h.calls.lock().unwrap();
        let first = &calls.histories[0];
        assert_eq!(first.user_id, "alice");
        let req = first.request.clone().unwrap();
        assert_eq!(
            (req.from_seq, req.direction.as_str(), req.limit),
            (10, "forward", 20)
        );
        let req = calls.histories[1].request.clone().unwrap();
        assert_eq!(
            (req.from_seq, req.direction.as_str(), req.limit),
            (0, "", 0),
            "absent parameters take the protocol defaults"
        );
    }
    h.call(
        "GET",
        &format!("/v1/conversations/{FORBIDDEN}/messages"),
        &token,
        None,
    )
    .await
    .assert_error(403, "not_member");
    h.stop().await;
}

#[tokio::test]
async fn presence_is_queried_as_the_caller_with_contacts_only_last_seen_hidden() {
    let h = start(|_| {}).await;
    let token = h.token("alice");
    let reply = h
        .call(
            "GET",
            "/v1/presence?user_ids=friend,stranger,public",
            &token,
            None,
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let users: HashMap<String, Value> = reply.json()["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["user_id"].as_str().unwrap().to_owned(), u.clone()))
        .collect();
    assert_eq!(
        users["friend"]["last_seen_ms"], 1000,
        "shares a conversation"
    );
    assert_eq!(users["stranger"]["last_seen_ms"], 0, "contacts only");
    assert_eq!(users["public"]["last_seen_ms"], 1000);
    {
        let calls = h.calls.lock().unwrap();
        assert_eq!(calls.queries[0].viewer_id, "alice");
        assert_eq!(calls.queries[0].user_ids, ["friend", "stranger", "public"]);
    }
    h.call("GET", "/v1/presence", &token, None)
        .await
        .assert_error(400, "invalid_request");
    h.call("GET", "/v1/presence?user_ids=a,,b", &token, None)
        .await
        .assert_error(400, "invalid_request");
    h.stop().await;
}

#[tokio::test]
async fn webhooks_are_added_listed_and_deleted_as_the_caller() {
    let h = start(|_| {}).await;
    let token = h.token("alice");
    let reply = h
        .call(
            "POST",
            "/v1/conversations/conv-1/webhooks",
            &token,
            Some(json!({"url": "https://ci.example.test/hook"})),
        )
        .await;
    assert_eq!(reply.status, 201, "{reply:?}");
    let webhook = reply.json();
    assert_eq!(webhook["webhook_id"], "wh-1");
    assert_eq!(webhook["secret"].as_str().unwrap().len(), 64);
    assert_eq!(webhook["created_by"], "alice");
    {
        let calls = h.calls.lock().unwrap();
        assert_eq!(calls.put_webhooks[0].actor_id, "alice");
        assert_eq!(calls.put_webhooks[0].conversation_id, "conv-1");
        assert_eq!(calls.put_webhooks[0].url, "https://ci.example.test/hook");
    }
    h.call(
        "POST",
        "/v1/conversations/conv-1/webhooks",
        &token,
        Some(json!({"url": "ftp://nope"})),
    )
    .await
    .assert_error(400, "invalid_request");
    h.call(
        "POST",
        "/v1/conversations/conv-1/webhooks",
        &token,
        Some(json!({})),
    )
    .await
    .assert_error(400, "invalid_request");

    let reply = h
        .call("GET", "/v1/conversations/conv-1/webhooks", &token, None)
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["webhooks"][0]["webhook_id"], "wh-1");

    let reply = h
        .call(
            "DELETE",
            "/v1/conversations/conv-1/webhooks/wh-1",
            &token,
            None,
        )
        .await;
    assert_eq!(reply.status, 204, "{reply:?}");
    assert!(reply.body.is_empty());
    assert_eq!(
        h.calls.lock().unwrap().deleted_webhooks[0].actor_id,
        "alice"
    );
    h.call(
        "DELETE",
        "/v1/conversations/conv-1/webhooks/wh-2",
        &token,
        None,
    )
    .await
    .assert_error(404, "not_found");
    h.call(
        "GET",
        &format!("/v1/conversations/{FORBIDDEN}/webhooks"),
        &token,
        None,
    )
    .await
    .assert_error(403, "not_member");
    h.stop().await;
}

#[tokio::test]
async fn a_draining_gateway_refuses_api_requests_with_503() {
    let h = start(|_| {}).await;
    let token = h.token("alice");
    let mut gateway = v1::gateway_client::GatewayClient::connect(format!("http://{}", h.grpc))
        .await
        .unwrap();
    gateway
        .drain(v1::DrainRequest { deadline_ms: 1_000 })
        .await
        .unwrap();
    let reply = h.call("GET", "/v1/conversations", &token, None).await;
    reply.assert_error(503, "draining");
    assert!(reply.headers.contains_key("retry-after"));
    h.stop().await;
}

#[tokio::test]
async fn a_bot_token_marks_websocket_sends_too() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    let h = start(|_| {}).await;
    for (token, bot) in [(h.bot_token("relay-bot"), true), (h.token("alice"), false)] {
        let url = format!("ws://{}/v1/connect?token={token}&device=d", h.http);
        let (mut ws, _) = tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timed out")
            .unwrap();
        let frame = json!({"id": "1", "send": {"conversation_id": "conv-1", "client_msg_id": format!("ws-{bot}"), "body": "hi"}});
        ws.send(WsMessage::Text(frame.to_string().into()))
            .await
            .unwrap();
        // The welcome, then the ack of the send.
        let ack = loop {
            let message = tokio::time::timeout(TIMEOUT, ws.next())
                .await
                .expect("no frame")
                .expect("connection open")
                .unwrap();
            let value: Value = serde_json::from_str(message.to_text().unwrap()).unwrap();
            if value.get("ack").is_some() {
                break value;
            }
        };
        assert_eq!(ack["ack"]["id"], "1", "{ack}");
        let sends = std::mem::take(&mut h.calls.lock().unwrap().sends);
        assert_eq!(sends.len(), 1);
        assert_eq!(sends[0].from_bot, bot, "{ack}");
    }
    h.stop().await;
}
