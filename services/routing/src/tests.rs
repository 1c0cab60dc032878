//! Service-level tests: the routing service over real gRPC against fake storage,
//! presence and gateway servers on 127.0.0.1:0.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use switchboard_config::Config;
use switchboard_proto::timeline::kinds;
use switchboard_proto::v1::gateway_server::{Gateway, GatewayServer};
use switchboard_proto::v1::presence_server::{Presence, PresenceServer};
use switchboard_proto::v1::routing_client::RoutingClient;
use switchboard_proto::v1::server_frame::Event;
use switchboard_proto::v1::storage_server::{Storage, StorageServer};
use switchboard_proto::v1::*;
use switchboard_proto::{status_error_code, ErrorCode};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::eventlog::{EmbeddedLog, EmbeddedLogOptions, EventLog};
use crate::node::RouteMemo;

/// Bounds every wait for a deterministic signal; only a broken service hits it.
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- fake storage

#[derive(Default)]
struct StorageState {
    members: HashMap<String, Vec<String>>,
    messages: HashMap<String, Vec<Message>>,
    dedupe: HashMap<(String, String), Message>,
    /// Fail this many Append calls with `unavailable` before succeeding.
    fail_appends: usize,
    /// Every event Authorize was asked about.
    authorized: Vec<Message>,
    /// Authorize refuses the event with this client_msg_id with this code.
    refuse: HashMap<String, ErrorCode>,
    /// (conversation, seq) of deleted messages (Append applies deletes).
    deleted: HashSet<(String, u64)>,
    /// (conversation, user) bans (Append applies members_banned).
    banned: HashSet<(String, String)>,
    webhooks: Vec<Webhook>,
    /// LookupDedupe calls answered.
    lookups: usize,
    /// The user_id of every History call.
    history_users: Vec<String>,
    /// The webhook_id of every History call.
    history_webhooks: Vec<String>,
    /// Fail this many GetConversation calls with `unavailable` before answering.
    fail_gets: usize,
    /// GetConversation calls received.
    gets: usize,
}

#[derive(Clone)]
struct FakeStorage {
    state: Arc<Mutex<StorageState>>,
    /// Number of Append calls answered successfully (new or duplicate).
    appends: Arc<watch::Sender<usize>>,
    /// Changes on every successful AdvanceWebhook.
    advanced: Arc<watch::Sender<()>>,
}

impl FakeStorage {
    fn new() -> FakeStorage {
        FakeStorage {
            state: Default::default(),
            appends: Arc::new(watch::Sender::new(0)),
            advanced: Arc::new(watch::Sender::new(())),
        }
    }

    fn members(&self, conversation_id: &str) -> Vec<String> {
        self.state.lock().unwrap().members[conversation_id].clone()
    }

    fn refuse(&self, client_msg_id: &str, code: ErrorCode) {
        self.state
            .lock()
            .unwrap()
            .refuse
            .insert(client_msg_id.into(), code);
    }

    fn authorized(&self) -> Vec<Message> {
        self.state.lock().unwrap().authorized.clone()
    }

    fn put_webhook(&self, webhook: Webhook) {
        self.state.lock().unwrap().webhooks.push(webhook);
    }

    fn remove_webhook(&self, webhook_id: &str) {
        self.state
            .lock()
            .unwrap()
            .webhooks
            .retain(|w| w.webhook_id != webhook_id);
    }

    fn delivered_seq(&self, webhook_id: &str) -> u64 {
        self.state
            .lock()
            .unwrap()
            .webhooks
            .iter()
            .find(|w| w.webhook_id == webhook_id)
            .map_or(0, |w| w.delivered_seq)
    }

    /// Wait until the webhook's stored cursor reaches `seq`.
    async fn wait_delivered(&self, webhook_id: &str, seq: u64) {
        let mut rx = self.advanced.subscribe();
        tokio::time::timeout(WAIT, async {
            loop {
                rx.borrow_and_update();
                if self.delivered_seq(webhook_id) >= seq {
                    return;
                }
                rx.changed().await.expect("sender alive");
            }
        })
        .await
        .expect("webhook cursor advanced in time");
    }

    fn add_conversation(&self, id: &str, members: &[&str]) {
        self.state
            .lock()
            .unwrap()
            .members
            .insert(id.into(), members.iter().map(|m| m.to_string()).collect());
    }

    fn stored(&self, conversation_id: &str) -> Vec<Message> {
        self.state
            .lock()
            .unwrap()
            .messages
            .get(conversation_id)
            .cloned()
            .unwrap_or_default()
    }

    fn set_fail_appends(&self, n: usize) {
        self.state.lock().unwrap().fail_appends = n;
    }

    async fn wait_appends(&self, n: usize) {
        let mut rx = self.appends.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|c| *c >= n))
            .await
            .expect("storage appends in time")
            .expect("counter alive");
    }
}

#[tonic::async_trait]
impl Storage for FakeStorage {
    async fn authorize(
        &self,
        request: tonic::Request<switchboard_proto::v1::AuthorizeRequest>,
    ) -> Result<tonic::Response<switchboard_proto::v1::AuthorizeResponse>, tonic::Status> {
        let message = request
            .into_inner()
            .message
            .expect("authorize carries the event");
        assert_eq!(message.seq, 0, "authorized before it is sequenced");
        let mut state = self.state.lock().unwrap();
        state.authorized.push(message.clone());
        if let Some(code) = state.refuse.get(&message.client_msg_id) {
            return Err(switchboard_proto::status(*code, "refused by the test"));
        }
        let last = state
            .messages
            .get(&message.conversation_id)
            .and_then(|m| m.last())
            .map_or(0, |m| m.seq);
        let references = [
            message.target_seq,
            message.reply_to_seq,
            message.thread_root_seq,
        ];
        if references.iter().any(|&seq| seq > last)
            || state
                .deleted
                .contains(&(message.conversation_id.clone(), message.target_seq))
        {
            return Err(switchboard_proto::status(
                ErrorCode::NotFound,
                "no such message",
            ));
        }
        if let Some(system) = &message.system {
            if system.action == "members_added"
                && system.user_ids.iter().any(|u| {
                    state
                        .banned
                        .contains(&(message.conversation_id.clone(), u.clone()))
                })
            {
                return Err(switchboard_proto::status(ErrorCode::Banned, "banned"));
            }
        }
        Ok(tonic::Response::new(AuthorizeResponse {}))
    }
    async fn thread(
        &self,
        _request: tonic::Request<switchboard_proto::v1::StorageThreadRequest>,
    ) -> Result<tonic::Response<switchboard_proto::v1::ThreadResult>, tonic::Status> {
        Err(tonic::Status::unimplemented("thread"))
    }
    async fn receipts(
        &self,
        _request: tonic::Request<switchboard_proto::v1::StorageReceiptsRequest>,
    ) -> Result<tonic::Response<switchboard_proto::v1::ReceiptsResult>, tonic::Status> {
        Err(tonic::Status::unimplemented("receipts"))
    }
    async fn set_notification(
        &self,
        _request: tonic::Request<switchboard_proto::v1::SetNotificationRequest>,
    ) -> Result<tonic::Response<switchboard_proto::v1::SetNotificationResponse>, tonic::Status>
    {
        Err(tonic::Status::unimplemented("set_notification"))
    }
    async fn notification_targets(
        &self,
        _request: tonic::Request<switchboard_proto::v1::NotificationTargetsRequest>,
    ) -> Result<tonic::Response<switchboard_proto::v1::NotificationTargetsResponse>, tonic::Status>
    {
        Err(tonic::Status::unimplemented("notification_targets"))
    }
    async fn shared_contacts(
        &self,
        _request: tonic::Request<switchboard_proto::v1::SharedContactsRequest>,
    ) -> Result<tonic::Response<switchboard_proto::v1::SharedContactsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("shared_contacts"))
    }
    async fn put_webhook(
        &self,
        _request: tonic::Request<switchboard_proto::v1::PutWebhookRequest>,
    ) -> Result<tonic::Response<switchboard_proto::v1::Webhook>, tonic::Status> {
        Err(tonic::Status::unimplemented("put_webhook"))
    }
    async fn list_webhooks(
        &self,
        request: tonic::Request<switchboard_proto::v1::ListWebhooksRequest>,
    ) -> Result<tonic::Response<switchboard_proto::v1::ListWebhooksResponse>, tonic::Status> {
        let req = request.into_inner();
        assert!(
            req.conversation_id.is_empty() && req.actor_id.is_empty(),
            "the dispatcher lists every webhook"
        );
        Ok(tonic::Response::new(ListWebhooksResponse {
            webhooks: self.state.lock().unwrap().webhooks.clone(),
        }))
    }
    async fn delete_webhook(
        &self,
        _request: tonic::Request<switchboard_proto::v1::DeleteWebhookRequest>,
    ) -> Result<tonic::Response<switchboard_proto::v1::DeleteWebhookResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("delete_webhook"))
    }
    async fn advance_webhook(
        &self,
        request: tonic::Request<switchboard_proto::v1::AdvanceWebhookRequest>,
    ) -> Result<tonic::Response<switchboard_proto::v1::Webhook>, tonic::Status> {
        let req = request.into_inner();
        let mut state = self.state.lock().unwrap();
        let Some(webhook) = state
            .webhooks
            .iter_mut()
            .find(|w| w.webhook_id == req.webhook_id && w.conversation_id == req.conversation_id)
        else {
            return Err(switchboard_proto::status(
                ErrorCode::NotFound,
                "no such webhook",
            ));
        };
        webhook.delivered_seq = webhook.delivered_seq.max(req.delivered_seq);
        let webhook = webhook.clone();
        drop(state);
        self.advanced.send_modify(|_| {});
        Ok(tonic::Response::new(webhook))
    }
    async fn create_conversation(
        &self,
        _: Request<CreateConversationRequest>,
    ) -> Result<Response<Conversation>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn get_conversation(
        &self,
        request: Request<GetConversationRequest>,
    ) -> Result<Response<Conversation>, Status> {
        let req = request.into_inner();
        assert!(
            req.caller_id.is_empty(),
            "routing looks members up as an internal caller"
        );
        let mut state = self.state.lock().unwrap();
        state.gets += 1;
        if state.fail_gets > 0 {
            state.fail_gets -= 1;
            return Err(Status::unavailable("storage hiccup"));
        }
        match state.members.get(&req.conversation_id) {
            Some(members) => Ok(Response::new(Conversation {
                conversation_id: req.conversation_id,
                kind: "group".into(),
                members: members.clone(),
                ..Conversation::default()
            })),
            None => Err(switchboard_proto::status(
                ErrorCode::NotFound,
                "no such conversation",
            )),
        }
    }

    async fn change_members(
        &self,
        _: Request<ChangeMembersRequest>,
    ) -> Result<Response<Conversation>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_conversations(
        &self,
        _: Request<ListConversationsRequest>,
    ) -> Result<Response<ConversationListResult>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn last_seq(
        &self,
        request: Request<LastSeqRequest>,
    ) -> Result<Response<LastSeqResponse>, Status> {
        let req = request.into_inner();
        let state = self.state.lock().unwrap();
        let last_seq = state
            .messages
            .get(&req.conversation_id)
            .and_then(|m| m.last())
            .map_or(0, |m| m.seq);
        Ok(Response::new(LastSeqResponse { last_seq }))
    }

    async fn append(
        &self,
        request: Request<AppendRequest>,
    ) -> Result<Response<AppendResponse>, Status> {
        let message = request
            .into_inner()
            .message
            .expect("append carries a message");
        let reply = {
            let mut state = self.state.lock().unwrap();
            if state.fail_appends > 0 {
                state.fail_appends -= 1;
                return Err(Status::unavailable("storage is down"));
            }
            let key = (message.sender_id.clone(), message.client_msg_id.clone());
            if let Some(stored) = state.dedupe.get(&key) {
                AppendResponse {
                    message: Some(stored.clone()),
                    duplicate: true,
                }
            } else {
                let list = state
                    .messages
                    .entry(message.conversation_id.clone())
                    .or_default();
                let last = list.last().map_or(0, |m| m.seq);
                if message.seq != last + 1 {
                    return Err(Status::already_exists("sequence already taken"));
                }
                list.push(message.clone());
                state.dedupe.insert(key, message.clone());
                apply_effects(&mut state, &message);
                AppendResponse {
                    message: Some(message),
                    duplicate: false,
                }
            }
        };
        self.appends.send_modify(|c| *c += 1);
        Ok(Response::new(reply))
    }

    /// Single appends one after the other, stopping at the first failure once one
    /// succeeded, as a store without transactions does.
    async fn append_batch(
        &self,
        request: Request<AppendBatchRequest>,
    ) -> Result<Response<AppendBatchResponse>, Status> {
        let request = request.into_inner();
        let mut next = request.first_seq;
        let mut results = Vec::new();
        for mut message in request.messages {
            message.seq = next;
            let call = Request::new(AppendRequest {
                message: Some(message),
            });
            match self.append(call).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    if !reply.duplicate {
                        next += 1;
                    }
                    results.push(reply);
                }
                Err(status) if results.is_empty() => return Err(status),
                Err(_) => break,
            }
        }
        Ok(Response::new(AppendBatchResponse { results }))
    }

    async fn lookup_dedupe(
        &self,
        request: Request<LookupDedupeRequest>,
    ) -> Result<Response<LookupDedupeResponse>, Status> {
        let req = request.into_inner();
        let mut state = self.state.lock().unwrap();
        state.lookups += 1;
        Ok(Response::new(LookupDedupeResponse {
            message: state
                .dedupe
                .get(&(req.sender_id, req.client_msg_id))
                .cloned(),
        }))
    }

    async fn history(
        &self,
        request: Request<StorageHistoryRequest>,
    ) -> Result<Response<HistoryResult>, Status> {
        let req = request.into_inner();
        let page = req.request.expect("history carries a request");
        assert_eq!(page.direction, "forward", "the dispatcher reads forward");
        let mut state = self.state.lock().unwrap();
        state.history_users.push(req.user_id);
        state.history_webhooks.push(req.webhook_id.clone());
        // Like storage: a read for a webhook that is gone (deleted, or removed when
        // its creator lost the right to it) is not_found.
        if !req.webhook_id.is_empty()
            && !state
                .webhooks
                .iter()
                .any(|w| w.webhook_id == req.webhook_id)
        {
            return Err(switchboard_proto::status(
                ErrorCode::NotFound,
                format!("webhook {}", req.webhook_id),
            ));
        }
        let limit = if page.limit == 0 {
            50
        } else {
            page.limit as usize
        };
        let after: Vec<Message> = state
            .messages
            .get(&page.conversation_id)
            .map(|list| {
                list.iter()
                    .filter(|m| m.seq > page.from_seq)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        Ok(Response::new(HistoryResult {
            conversation_id: page.conversation_id,
            has_more: after.len() > limit,
            messages: after.into_iter().take(limit).collect(),
        }))
    }

    async fn sync(&self, _: Request<StorageSyncRequest>) -> Result<Response<SyncResult>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn set_read_marker(
        &self,
        _: Request<SetReadMarkerRequest>,
    ) -> Result<Response<ReadMarker>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// What storage's Append does besides storing, as far as these tests need it.
fn apply_effects(state: &mut StorageState, message: &Message) {
    let conversation = message.conversation_id.clone();
    match message.kind.as_str() {
        "delete" => {
            state.deleted.insert((conversation, message.target_seq));
        }
        "system" => {
            let system = message.system.clone().unwrap_or_default();
            let members = state.members.entry(conversation.clone()).or_default();
            match system.action.as_str() {
                "members_added" => {
                    for u in system.user_ids {
                        if !members.contains(&u) {
                            members.push(u);
                        }
                    }
                }
                "members_removed" | "member_left" | "members_banned" => {
                    members.retain(|m| !system.user_ids.contains(m));
                    if system.action == "members_banned" {
                        for u in system.user_ids {
                            state.banned.insert((conversation.clone(), u));
                        }
                    }
                }
                _ => {}
            }
        }
        _ => {}
    }
}

// --------------------------------------------------------------- fake presence

#[derive(Clone, Default)]
struct FakePresence {
    /// user -> gateway URL of its session.
    routes: Arc<Mutex<HashMap<String, String>>>,
    /// Route fails with `unavailable` (presence or Redis down).
    down: Arc<std::sync::atomic::AtomicBool>,
    /// Route answers `partial` (presence rebuilding its state).
    partial: Arc<std::sync::atomic::AtomicBool>,
    /// Route calls received.
    route_calls: Arc<std::sync::atomic::AtomicUsize>,
}

#[tonic::async_trait]
impl Presence for FakePresence {
    async fn register_session(
        &self,
        _: Request<RegisterSessionRequest>,
    ) -> Result<Response<RegisterSessionResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn unregister_session(
        &self,
        _: Request<UnregisterSessionRequest>,
    ) -> Result<Response<UnregisterSessionResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn heartbeat(
        &self,
        _: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn set_status(
        &self,
        _: Request<SetStatusRequest>,
    ) -> Result<Response<SetStatusResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn query(&self, _: Request<QueryRequest>) -> Result<Response<QueryResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<QueryResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn route(
        &self,
        request: Request<RouteRequest>,
    ) -> Result<Response<RouteResponse>, Status> {
        use std::sync::atomic::Ordering::SeqCst;
        self.route_calls.fetch_add(1, SeqCst);
        if self.down.load(SeqCst) {
            return Err(Status::unavailable("presence is down"));
        }
        let routes = self.routes.lock().unwrap();
        let mut by_gateway: HashMap<String, Vec<String>> = HashMap::new();
        for user in request.into_inner().user_ids {
            if let Some(gw) = routes.get(&user) {
                by_gateway.entry(gw.clone()).or_default().push(user);
            }
        }
        Ok(Response::new(RouteResponse {
            routes: by_gateway
                .into_iter()
                .map(|(gateway_addr, user_ids)| GatewayRoute {
                    gateway_addr,
                    user_ids,
                })
                .collect(),
            partial: self.partial.load(SeqCst),
        }))
    }
    async fn drop_gateway(
        &self,
        _: Request<DropGatewayRequest>,
    ) -> Result<Response<DropGatewayResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

// ---------------------------------------------------------------- fake gateway

#[derive(Clone)]
struct FakeGateway {
    received: Arc<Mutex<Vec<Delivery>>>,
    /// Number of deliveries received.
    count: Arc<watch::Sender<usize>>,
    /// Fail this many Deliver calls before accepting.
    fail_calls: Arc<Mutex<usize>>,
}

impl FakeGateway {
    fn new() -> FakeGateway {
        FakeGateway {
            received: Default::default(),
            count: Arc::new(watch::Sender::new(0)),
            fail_calls: Default::default(),
        }
    }

    async fn wait_deliveries(&self, n: usize) -> Vec<Delivery> {
        let mut rx = self.count.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|c| *c >= n))
            .await
            .expect("deliveries in time")
            .expect("counter alive");
        self.received.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl Gateway for FakeGateway {
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        {
            let mut fail = self.fail_calls.lock().unwrap();
            if *fail > 0 {
                *fail -= 1;
                return Err(Status::unavailable("gateway hiccup"));
            }
        }
        let deliveries = request.into_inner().deliveries;
        let n = deliveries.len();
        self.received.lock().unwrap().extend(deliveries);
        self.count.send_modify(|c| *c += n);
        Ok(Response::new(DeliverResponse {
            delivered: n as u32,
            absent: Vec::new(),
        }))
    }

    async fn drain(&self, _: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

fn message_seqs(deliveries: &[Delivery]) -> Vec<u64> {
    deliveries
        .iter()
        .filter_map(|d| match d.event.as_ref()?.event.as_ref()? {
            Event::Message(m) => m.message.as_ref().map(|m| m.seq),
            _ => None,
        })
        .collect()
}

// --------------------------------------------------------------------- harness

async fn spawn_grpc(routes: tonic::service::Routes) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

struct Peers {
    storage: FakeStorage,
    presence: FakePresence,
    gateway_a: FakeGateway,
    gateway_a_url: String,
    gateway_b: FakeGateway,
    gateway_b_url: String,
    config: Config,
    dir: tempfile::TempDir,
}

async fn peers() -> Peers {
    let storage = FakeStorage::new();
    let presence = FakePresence::default();
    let gateway_a = FakeGateway::new();
    let gateway_b = FakeGateway::new();
    let storage_url = spawn_grpc(tonic::service::Routes::new(StorageServer::new(
        storage.clone(),
    )))
    .await;
    let presence_url = spawn_grpc(tonic::service::Routes::new(PresenceServer::new(
        presence.clone(),
    )))
    .await;
    let gateway_a_url = spawn_grpc(tonic::service::Routes::new(GatewayServer::new(
        gateway_a.clone(),
    )))
    .await;
    let gateway_b_url = spawn_grpc(tonic::service::Routes::new(GatewayServer::new(
        gateway_b.clone(),
    )))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };
    config.cluster.storage_url = storage_url;
    config.cluster.presence_url = presence_url;
    config.routing.partitions = 4;
    config.routing.send_rate_per_user = 100_000;
    config.routing.send_burst_per_user = 100_000;
    config.routing.sequence_wait_ms = WAIT.as_millis() as u64;
    config.routing.deliver_batch = 8;
    // Test webhook receivers listen on loopback.
    config.routing.webhook_allow_private_networks = true;
    Peers {
        storage,
        presence,
        gateway_a,
        gateway_a_url,
        gateway_b,
        gateway_b_url,
        config,
        dir,
    }
}

impl Peers {
    fn online(&self, user: &str, gateway_url: &str) {
        self.presence
            .routes
            .lock()
            .unwrap()
            .insert(user.into(), gateway_url.into());
    }
}

/// The routing service running through `serve`, reached over gRPC.
struct Running {
    client: RoutingClient<switchboard_rpc::Channel>,
    admin: std::net::SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(config: &Config) -> Running {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(crate::serve(
        Arc::new(config.clone()),
        grpc,
        admin,
        switchboard_rpc::Peers::remote(&config.cluster).unwrap(),
        shutdown.clone(),
    ));
    let channel =
        switchboard_rpc::channel(&format!("http://{grpc_addr}"), &config.cluster).unwrap();
    Running {
        client: RoutingClient::new(channel),
        admin: admin_addr,
        shutdown,
        task,
    }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("routing stops in time")
            .expect("routing task")
            .expect("routing exits cleanly");
    }
}

fn send_req(sender: &str, conversation: &str, client_msg_id: &str, body: &str) -> RouteSendRequest {
    RouteSendRequest {
        sender_id: sender.into(),
        sender_device: "d1".into(),
        session_id: "s1".into(),
        conversation_id: conversation.into(),
        client_msg_id: client_msg_id.into(),
        body: body.into(),
        content_type: String::new(),
        traceparent: String::new(),
        ..Default::default()
    }
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

// ----------------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_to_one_conversation_get_a_gapless_sequence() {
    let p = peers().await;
    let users: Vec<String> = (0..8).map(|i| format!("u{i}")).collect();
    let user_refs: Vec<&str> = users.iter().map(String::as_str).collect();
    p.storage.add_conversation("c1", &user_refs);
    let routing = start(&p.config).await;

    const N: usize = 200;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let mut client = routing.client.clone();
        let sender = users[i % users.len()].clone();
        tasks.spawn(async move {
            let id = format!("m{i}");
            let r = client.send(send_req(&sender, "c1", &id, "hi")).await;
            (id, r.expect("send accepted").into_inner())
        });
    }
    let mut by_client_id = HashMap::new();
    while let Some(done) = tasks.join_next().await {
        let (id, result) = done.unwrap();
        assert!(!result.duplicate);
        assert_eq!(result.conversation_id, "c1");
        by_client_id.insert(id, result.seq);
    }
    let seqs: BTreeSet<u64> = by_client_id.values().copied().collect();
    assert_eq!(
        seqs,
        (1..=N as u64).collect::<BTreeSet<_>>(),
        "every send got its own sequence, gapless"
    );

    let stored = p.storage.stored("c1");
    assert_eq!(
        stored.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=N as u64).collect::<Vec<_>>()
    );
    for m in &stored {
        assert_eq!(
            by_client_id[&m.client_msg_id], m.seq,
            "the ack names the stored sequence"
        );
        assert_eq!(m.content_type, "text/plain");
        assert!(!m.message_id.is_empty() && m.sent_at_ms > 0);
    }

    let metrics = http_get(routing.admin, "/metrics").await;
    assert!(
        metrics.contains(&format!("switchboard_routing_messages_sequenced_total {N}")),
        "{metrics}"
    );
    assert!(http_get(routing.admin, "/readyz")
        .await
        .starts_with("HTTP/1.1 200"));
    routing.stop().await;

    // Shutdown committed everything that was sequenced.
    let log = EmbeddedLog::open(
        &p.dir.path().join("eventlog.sqlite3"),
        4,
        EmbeddedLogOptions::default(),
    )
    .unwrap();
    let partition = crate::partition_for("c1", 4);
    assert_eq!(log.end_offset(partition).await.unwrap(), N as u64);
    assert_eq!(log.committed(partition).await.unwrap(), N as u64);
    log.close().await;
}

/// With the embedded log this instance is the only one: every membership change
/// passes through it, so members stay cached past the 2 s that apply when other
/// instances exist, and a conversation with steady traffic costs no storage read per
/// message.
#[tokio::test]
async fn the_sole_routing_instance_reads_members_once_while_messages_flow() {
    let p = peers().await;
    p.storage.add_conversation("c1", &["alice", "bob"]);
    p.online("bob", &p.gateway_a_url);
    let routing = start(&p.config).await;
    let mut client = routing.client.clone();
    for i in 0..4 {
        let id = format!("m{i}");
        let reply = client.send(send_req("alice", "c1", &id, "hi")).await;
        assert_eq!(reply.unwrap().into_inner().seq, i + 1);
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    assert_eq!(
        p.storage.state.lock().unwrap().gets,
        1,
        "one read of the members for 4 sends and fan-outs over 3.6 s"
    );
    routing.stop().await;
}

#[tokio::test]
async fn duplicate_client_msg_id_returns_the_original_message() {
    let p = peers().await;
    p.storage.add_conversation("c1", &["alice", "bob"]);
    p.online("bob", &p.gateway_a_url);
    let routing = start(&p.config).await;
    let mut client = routing.client.clone();

    let first = client
        .send(send_req("alice", "c1", "same", "hello"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.seq, 1);
    assert!(!first.duplicate);
    let again = client
        .send(send_req("alice", "c1", "same", "hello"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate);
    assert_eq!(
        (again.seq, &again.message_id, again.sent_at_ms),
        (1, &first.message_id, first.sent_at_ms)
    );

    // Two racing sends of one id both reach the log; the owner maps the second record
    // to the stored message.
    let (mut c1, mut c2) = (client.clone(), client.clone());
    let (a, b) = tokio::join!(
        c1.send(send_req("alice", "c1", "race", "x")),
        c2.send(send_req("alice", "c1", "race", "x")),
    );
    let (a, b) = (a.unwrap().into_inner(), b.unwrap().into_inner());
    assert_eq!(a.seq, 2);
    assert_eq!(b.seq, 2);
    assert_eq!(a.message_id, b.message_id);
    assert!(
        a.duplicate != b.duplicate,
        "exactly one of them created the message"
    );

    let next = client
        .send(send_req("bob", "c1", "other", "y"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.seq, 3, "duplicates do not advance the sequence");
    assert_eq!(p.storage.stored("c1").len(), 3);
    // Members' plain messages are deduplicated by the owner's Append: no lookup
    // before the log.
    assert_eq!(p.storage.state.lock().unwrap().lookups, 0);
    // Each message reached bob's gateway once: the retries' records did not deliver
    // it again (only the record that stored a message fans it out).
    let at_a = p.gateway_a.wait_deliveries(3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let at_a_later = p.gateway_a.wait_deliveries(3).await;
    assert_eq!(message_seqs(&at_a), vec![1, 2, 3]);
    assert_eq!(message_seqs(&at_a_later), vec![1, 2, 3], "no redelivery");
    routing.stop().await;
}

#[tokio::test]
async fn invalid_sends_are_rejected_with_their_codes() {
    let mut p = peers().await;
    p.config.routing.max_body_bytes = 1000;
    p.storage.add_conversation("c1", &["alice"]);
    let routing = start(&p.config).await;
    let mut client = routing.client.clone();
    let code = |r: Result<tonic::Response<SendResult>, Status>| {
        status_error_code(&r.expect_err("rejected"))
    };

    let too_big = client
        .send(send_req("alice", "c1", "m1", &"x".repeat(1001)))
        .await
        .expect_err("too big");
    assert_eq!(status_error_code(&too_big), ErrorCode::BodyTooLarge);
    assert!(too_big.message().contains("1000"), "{}", too_big.message());
    let at_limit = client
        .send(send_req("alice", "c1", "m2", &"x".repeat(1000)))
        .await
        .unwrap();
    assert_eq!(at_limit.into_inner().seq, 1);

    assert_eq!(
        code(client.send(send_req("mallory", "c1", "m3", "hi")).await),
        ErrorCode::NotMember
    );
    // An unknown conversation answers like a foreign one: existence is not revealed.
    assert_eq!(
        code(client.send(send_req("alice", "nope", "m4", "hi")).await),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(client.send(send_req("alice", "c1", "", "hi")).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(client.send(send_req("alice", "", "m5", "hi")).await),
        ErrorCode::InvalidRequest
    );
    let long_id = "i".repeat(129);
    assert_eq!(
        code(client.send(send_req("alice", "c1", &long_id, "hi")).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        p.storage.stored("c1").len(),
        1,
        "nothing rejected was stored"
    );

    let metrics = http_get(routing.admin, "/metrics").await;
    assert!(
        // mallory's send and the one to an unknown conversation.
        metrics.contains("switchboard_routing_sends_rejected_total{code=\"not_member\"} 2"),
        "{metrics}"
    );
    routing.stop().await;
}

/// Routing limiting each user to 1 send per second with a burst of 3, and a
/// conversation `c1` of alice and bob.
async fn rate_limited_routing() -> (Peers, Running) {
    let mut p = peers().await;
    p.config.routing.send_rate_per_user = 1;
    p.config.routing.send_burst_per_user = 3;
    p.storage.add_conversation("c1", &["alice", "bob"]);
    let routing = start(&p.config).await;
    (p, routing)
}

#[tokio::test]
async fn sends_over_the_burst_are_rate_limited() {
    let (_p, routing) = rate_limited_routing().await;
    let mut client = routing.client.clone();

    // 3 tokens plus 1 per second: 8 sends finishing within 5 s must hit the limit,
    // and the first 3 never do.
    let mut codes = Vec::new();
    for i in 0..8 {
        let r = client
            .send(send_req("alice", "c1", &format!("m{i}"), "hi"))
            .await;
        codes.push(r.err().map(|st| status_error_code(&st)));
    }
    assert_eq!(&codes[..3], &[None, None, None]);
    assert!(codes.contains(&Some(ErrorCode::RateLimited)), "{codes:?}");
    assert!(codes
        .iter()
        .all(|c| c.is_none() || *c == Some(ErrorCode::RateLimited)));
    // Another user has their own bucket.
    assert!(client.send(send_req("bob", "c1", "b1", "hi")).await.is_ok());
    routing.stop().await;
}

#[tokio::test]
async fn sends_delayed_before_routing_took_them_are_charged_when_accepted() {
    let (_p, routing) = rate_limited_routing().await;
    let mut client = routing.client.clone();

    // 8 sends a gateway accepted one second apart, arriving together (as from a
    // paused instance resuming): within 1 per second, so none is limited; the same
    // 8 arriving at once unstamped are (sends_over_the_burst_are_rate_limited).
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for i in 0..8u64 {
        let mut req = send_req("alice", "c1", &format!("m{i}"), "hi");
        req.accepted_at_ms = now_ms - (8 - i) * 1000;
        let r = client.send(req).await;
        assert!(r.is_ok(), "send {i}: {r:?}");
    }
    routing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_gateway_gets_the_conversation_in_sequence_order() {
    let p = peers().await;
    p.storage
        .add_conversation("c1", &["u1", "u2", "u3", "offline"]);
    p.online("u1", &p.gateway_a_url);
    p.online("u3", &p.gateway_a_url);
    p.online("u2", &p.gateway_b_url);
    // The first call to A fails: the batch is retried, not reordered or lost.
    *p.gateway_a.fail_calls.lock().unwrap() = 1;
    let routing = start(&p.config).await;

    const N: usize = 60;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let mut client = routing.client.clone();
        let sender = ["u1", "u2", "u3"][i % 3];
        tasks.spawn(async move {
            client
                .send(send_req(sender, "c1", &format!("m{i}"), "hi"))
                .await
                .unwrap();
        });
    }
    while tasks.join_next().await.is_some() {}

    let expected: Vec<u64> = (1..=N as u64).collect();
    let at_a = p.gateway_a.wait_deliveries(N).await;
    assert_eq!(message_seqs(&at_a), expected);
    for d in &at_a {
        // One delivery per event per gateway, naming the recipients there.
        let mut r = d.recipients.clone();
        r.sort();
        assert_eq!(r, vec!["u1", "u3"]);
    }
    let at_b = p.gateway_b.wait_deliveries(N).await;
    assert_eq!(message_seqs(&at_b), expected);
    assert!(at_b.iter().all(|d| d.recipients == vec!["u2"]));

    let metrics = http_get(routing.admin, "/metrics").await;
    assert!(
        metrics.contains("switchboard_routing_deliver_failures_total 1"),
        "{metrics}"
    );
    routing.stop().await;
}

#[tokio::test]
async fn storage_outage_is_retried_without_gaps_and_acks_stay_durable() {
    let mut p = peers().await;
    p.storage.add_conversation("c1", &["alice"]);
    p.config.routing.sequence_wait_ms = 200;
    p.storage.set_fail_appends(usize::MAX);
    let routing = start(&p.config).await;
    let mut client = routing.client.clone();

    // Storage is down: the message is durable in the log, so the send is accepted
    // without its sequence once the wait runs out.
    let r = client
        .send(send_req("alice", "c1", "m1", "hi"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.seq, 0);
    assert!(!r.duplicate);
    assert!(!r.message_id.is_empty());
    let metrics = http_get(routing.admin, "/metrics").await;
    assert!(
        metrics.contains("switchboard_routing_sequence_wait_timeouts_total 1"),
        "{metrics}"
    );

    // Storage comes back: the owner's retry persists it as seq 1, then the next.
    p.storage.set_fail_appends(0);
    p.storage.wait_appends(1).await;
    let stored = p.storage.stored("c1");
    assert_eq!(stored.len(), 1);
    assert_eq!((stored[0].seq, &stored[0].message_id), (1, &r.message_id));
    let next = client
        .send(send_req("alice", "c1", "m2", "hi"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.seq, 2);
    routing.stop().await;
}

#[tokio::test]
async fn publish_reaches_online_members_and_checks_the_actor() {
    let p = peers().await;
    p.storage.add_conversation("c1", &["alice", "bob", "carol"]);
    p.online("alice", &p.gateway_a_url);
    p.online("bob", &p.gateway_b_url);
    let routing = start(&p.config).await;
    let mut client = routing.client.clone();
    let typing = ServerFrame {
        event: Some(Event::Typing(TypingEvent {
            conversation_id: "c1".into(),
            user_id: "alice".into(),
            typing: true,
            ..Default::default()
        })),
    };

    let reply = client
        .publish(PublishRequest {
            event: Some(typing.clone()),
            conversation_id: "c1".into(),
            user_ids: vec![],
            exclude_session_id: "alice-session".into(),
            actor_id: "alice".into(),
            webhooks_changed: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.gateways, 2);
    let at_a = p.gateway_a.wait_deliveries(1).await;
    assert_eq!(at_a[0].event.as_ref(), Some(&typing));
    assert_eq!(at_a[0].exclude_session_id, "alice-session");
    assert_eq!(at_a[0].recipients, vec!["alice"]);
    assert_eq!(
        p.gateway_b.wait_deliveries(1).await[0].recipients,
        vec!["bob"]
    );

    let denied = client
        .publish(PublishRequest {
            event: Some(typing.clone()),
            conversation_id: "c1".into(),
            user_ids: vec![],
            exclude_session_id: String::new(),
            actor_id: "mallory".into(),
            webhooks_changed: false,
        })
        .await
        .expect_err("not a member");
    assert_eq!(status_error_code(&denied), ErrorCode::NotMember);

    // Explicit users, no conversation: only bob's gateway.
    let reply = client
        .publish(PublishRequest {
            event: Some(typing),
            conversation_id: String::new(),
            user_ids: vec!["bob".into()],
            exclude_session_id: String::new(),
            actor_id: String::new(),
            webhooks_changed: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.gateways, 1);
    assert_eq!(p.gateway_b.wait_deliveries(2).await.len(), 2);
    assert!(p.storage.stored("c1").is_empty(), "publish stores nothing");
    routing.stop().await;
}

/// Conversation "c1" of u1 (online on gateway a) and u2 (on gateway b), and a node
/// to fan its messages out.
async fn two_members_on_two_gateways() -> (Peers, Arc<crate::node::Node>, CancellationToken) {
    let p = peers().await;
    p.storage.add_conversation("c1", &["u1", "u2"]);
    p.online("u1", &p.gateway_a_url);
    p.online("u2", &p.gateway_b_url);
    let node = node_with_untrimmed_log(&p).await;
    (p, node, CancellationToken::new())
}

/// Build the service around an embedded log that never trims, for tests that
/// restart owners from older offsets.
async fn node_with_untrimmed_log(p: &Peers) -> Arc<crate::node::Node> {
    let log = EmbeddedLog::open(
        &p.dir.path().join("eventlog.sqlite3"),
        p.config.routing.partitions,
        EmbeddedLogOptions {
            trim_interval: Duration::MAX,
            ..EmbeddedLogOptions::default()
        },
    )
    .unwrap();
    let registry = prometheus::Registry::new();
    let metrics = Arc::new(crate::metrics::Metrics::new(&registry).unwrap());
    crate::build_node(
        Arc::new(p.config.clone()),
        Arc::new(log),
        &switchboard_rpc::Peers::remote(&p.config.cluster).unwrap(),
        metrics,
        switchboard_telemetry::Readiness::new(),
    )
    .unwrap()
}

#[tokio::test]
async fn replayed_records_map_to_their_stored_sequence() {
    let p = peers().await;
    p.storage.add_conversation("c1", &["alice"]);
    let node = node_with_untrimmed_log(&p).await;
    let service = crate::RoutingService::new(node.clone(), CancellationToken::new());
    let partition = crate::partition_for("c1", p.config.routing.partitions);

    let owners_stop = CancellationToken::new();
    let owners = tokio::spawn(crate::owner::supervise(node.clone(), owners_stop.clone()));
    for i in 1..=3u64 {
        let r = service
            .handle_send(send_req("alice", "c1", &format!("m{i}"), "hi"))
            .await
            .unwrap();
        assert_eq!(r.seq, i);
    }
    owners_stop.cancel();
    owners.await.unwrap();
    assert_eq!(node.log.committed(partition).await.unwrap(), 3);

    // As if the owner crashed before committing: a new owner starts from offset 0.
    let stop = CancellationToken::new();
    let owner = tokio::spawn(crate::owner::run_owner(
        node.clone(),
        partition,
        Some(0),
        stop.clone(),
    ));
    p.storage.wait_appends(6).await;
    let stored = p.storage.stored("c1");
    assert_eq!(
        stored.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "the replay created nothing new"
    );

    let r = service
        .handle_send(send_req("alice", "c1", "m4", "hi"))
        .await
        .unwrap();
    assert_eq!(
        r.seq, 4,
        "the sequence continues without a gap after the replay"
    );
    // The same owner handled the replayed records before this one.
    assert_eq!(node.metrics.duplicates_sequenced.get(), 3);
    stop.cancel();
    owner.await.unwrap();
    assert_eq!(node.log.committed(partition).await.unwrap(), 4);
    node.log.close().await;
}

/// A stored message of `conversation` with `seq`, as a partition owner fans it out.
fn stored(conversation: &str, seq: u64) -> Message {
    Message {
        conversation_id: conversation.into(),
        seq,
        message_id: format!("m{seq}"),
        sender_id: "u1".into(),
        body: "hi".into(),
        ..Default::default()
    }
}

fn recipients_of(deliveries: &[Delivery], seq: u64) -> Vec<String> {
    let mut r: Vec<String> = deliveries
        .iter()
        .filter(|d| message_seqs(std::slice::from_ref(d)) == [seq])
        .flat_map(|d| d.recipients.clone())
        .collect();
    r.sort();
    r
}

#[tokio::test]
async fn the_messages_of_one_stored_batch_share_one_route_lookup() {
    use std::sync::atomic::Ordering::SeqCst;
    let (p, node, stop) = two_members_on_two_gateways().await;
    let mut memo = RouteMemo::default();
    for seq in 1..=3 {
        node.fan_out_in_batch(&stored("c1", seq), &mut memo, &stop)
            .await
            .ok();
    }
    assert_eq!(
        p.presence.route_calls.load(SeqCst),
        1,
        "one lookup for three"
    );
    assert_eq!(node.metrics.routes_reused.get(), 2);
    for (gateway, user) in [(&p.gateway_a, "u1"), (&p.gateway_b, "u2")] {
        let deliveries = gateway.wait_deliveries(3).await;
        assert_eq!(message_seqs(&deliveries), [1, 2, 3], "in order");
        for seq in 1..=3 {
            assert_eq!(recipients_of(&deliveries, seq), [user]);
        }
    }

    // A system event may change the members: it and the message after it look
    // their routes up again.
    let mut system = stored("c1", 4);
    system.kind = kinds::SYSTEM.into();
    node.fan_out_in_batch(&system, &mut memo, &stop).await.ok();
    node.fan_out_in_batch(&stored("c1", 5), &mut memo, &stop)
        .await
        .ok();
    node.fan_out_in_batch(&stored("c1", 6), &mut memo, &stop)
        .await
        .ok();
    assert_eq!(p.presence.route_calls.load(SeqCst), 3);
    assert_eq!(node.metrics.routes_reused.get(), 3);
    assert_eq!(
        message_seqs(&p.gateway_a.wait_deliveries(6).await),
        [1, 2, 3, 4, 5, 6]
    );
    // Without a shared memo every message looks up its own routes.
    node.fan_out_message(&stored("c1", 7), &stop).await.ok();
    node.fan_out_message(&stored("c1", 8), &stop).await.ok();
    assert_eq!(p.presence.route_calls.load(SeqCst), 5);
    node.log.close().await;
}

#[tokio::test]
async fn without_presence_a_message_goes_to_every_known_gateway() {
    let (p, node, stop) = two_members_on_two_gateways().await;
    node.fan_out_message(&stored("c1", 1), &stop).await.ok();
    assert_eq!(
        recipients_of(&p.gateway_a.wait_deliveries(1).await, 1),
        ["u1"]
    );
    assert_eq!(
        recipients_of(&p.gateway_b.wait_deliveries(1).await, 1),
        ["u2"]
    );

    // Presence is down: after a few quick retries the message goes to both
    // gateways routing has seen, for every member; none is dropped.
    p.presence
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    node.fan_out_message(&stored("c1", 2), &stop).await.ok();
    assert_eq!(
        recipients_of(&p.gateway_a.wait_deliveries(2).await, 2),
        ["u1", "u2"]
    );
    assert_eq!(
        recipients_of(&p.gateway_b.wait_deliveries(2).await, 2),
        ["u1", "u2"]
    );
    assert_eq!(node.metrics.superset_fanouts.get(), 1);
    assert!(node.metrics.route_failures.get() >= 3);
    node.log.close().await;
}

#[tokio::test]
async fn a_partial_answer_goes_to_every_known_gateway() {
    let (p, node, stop) = two_members_on_two_gateways().await;
    node.fan_out_message(&stored("c1", 1), &stop).await.ok();
    p.gateway_b.wait_deliveries(1).await;

    // Presence lost its state and u2's gateway has not registered again yet.
    p.presence.routes.lock().unwrap().remove("u2");
    p.presence
        .partial
        .store(true, std::sync::atomic::Ordering::SeqCst);
    node.fan_out_message(&stored("c1", 2), &stop).await.ok();
    assert_eq!(
        recipients_of(&p.gateway_b.wait_deliveries(2).await, 2),
        ["u1", "u2"]
    );
    assert_eq!(node.metrics.superset_fanouts.get(), 1);

    // Complete again: only where the members are.
    p.presence
        .partial
        .store(false, std::sync::atomic::Ordering::SeqCst);
    node.fan_out_message(&stored("c1", 3), &stop).await.ok();
    assert_eq!(
        recipients_of(&p.gateway_a.wait_deliveries(3).await, 3),
        ["u1"]
    );
    assert_eq!(node.metrics.superset_fanouts.get(), 1);
    node.log.close().await;
}

#[tokio::test]
async fn with_no_gateway_known_the_route_lookup_is_retried_until_presence_answers() {
    let p = peers().await;
    p.storage.add_conversation("c1", &["u1"]);
    p.online("u1", &p.gateway_a_url);
    p.presence
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let node = node_with_untrimmed_log(&p).await;
    let stop = CancellationToken::new();
    let fan_out = {
        let node = node.clone();
        let stop = stop.clone();
        tokio::spawn(async move { node.fan_out_message(&stored("c1", 1), &stop).await.is_ok() })
    };
    while node.metrics.route_failures.get() < 5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !fan_out.is_finished(),
        "nothing to fall back to: it keeps trying"
    );
    p.presence
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(tokio::time::timeout(WAIT, fan_out).await.unwrap().unwrap());
    assert_eq!(
        recipients_of(&p.gateway_a.wait_deliveries(1).await, 1),
        ["u1"]
    );

    // A stop while it retries ends it without a delivery (the record is replayed).
    let q = peers().await;
    q.storage.add_conversation("c1", &["u1"]);
    q.presence
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let other = node_with_untrimmed_log(&q).await;
    let stop = CancellationToken::new();
    stop.cancel();
    assert!(other
        .fan_out_message(&stored("c1", 2), &stop)
        .await
        .is_err());
    node.log.close().await;
    other.log.close().await;
}

#[tokio::test]
async fn the_member_lookup_of_a_fan_out_is_retried_until_storage_answers() {
    let p = peers().await;
    p.storage.add_conversation("c1", &["u1"]);
    p.online("u1", &p.gateway_a_url);
    p.storage.state.lock().unwrap().fail_gets = 4;
    let node = node_with_untrimmed_log(&p).await;
    let stop = CancellationToken::new();
    node.fan_out_message(&stored("c1", 1), &stop)
        .await
        .ok()
        .expect("delivered once storage answered");
    assert_eq!(
        recipients_of(&p.gateway_a.wait_deliveries(1).await, 1),
        ["u1"]
    );
    assert_eq!(p.storage.state.lock().unwrap().fail_gets, 0);
    assert_eq!(node.metrics.route_failures.get(), 4);
    node.log.close().await;
}

#[tokio::test]
async fn a_gateway_whose_deliveries_failed_is_told_to_resync_those_users() {
    let p = peers().await;
    p.storage.add_conversation("c1", &["u1", "u2"]);
    p.online("u1", &p.gateway_a_url);
    p.online("u2", &p.gateway_a_url);
    // Every attempt of the batch fails, and the first resync attempt too.
    *p.gateway_a.fail_calls.lock().unwrap() = 4;
    let node = node_with_untrimmed_log(&p).await;
    let stop = CancellationToken::new();
    node.fan_out_message(&stored("c1", 1), &stop).await.ok();
    let received = p.gateway_a.wait_deliveries(1).await;
    let resync: Vec<&Delivery> = received
        .iter()
        .filter(|d| {
            matches!(
                d.event.as_ref().and_then(|e| e.event.as_ref()),
                Some(Event::Resync(_))
            )
        })
        .collect();
    assert_eq!(resync.len(), 1, "{received:?}");
    let mut users = resync[0].recipients.clone();
    users.sort();
    assert_eq!(users, ["u1", "u2"]);
    assert!(!resync[0].all_local_sessions);
    assert!(
        message_seqs(&received).is_empty(),
        "the message itself was dropped"
    );
    // Counted once the gateway's answer is back.
    tokio::time::timeout(WAIT, async {
        while node.metrics.resyncs_delivered.get() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the resync counted");
    assert_eq!(node.metrics.resyncs_delivered.get(), 1);
    node.log.close().await;
}

#[test]
fn missed_users_turn_into_everyone_past_the_bound() {
    use crate::fanout::{Missed, MAX_MISSED_USERS};
    let mut missed = Missed::default();
    assert!(missed.delivery().is_none());
    let users: Vec<String> = (0..MAX_MISSED_USERS).map(|i| format!("u{i}")).collect();
    missed.add(users.iter());
    assert!(matches!(&missed, Missed::Users(set) if set.len() == MAX_MISSED_USERS));
    missed.add([&"u0".to_string()]);
    assert!(
        matches!(missed, Missed::Users(_)),
        "a known user adds nothing"
    );
    missed.add([&"one-more".to_string()]);
    assert_eq!(missed, Missed::Everyone);
    let delivery = missed.delivery().unwrap();
    assert!(delivery.all_local_sessions && delivery.recipients.is_empty());
}

#[tokio::test]
async fn a_failing_log_makes_send_unavailable() {
    let p = peers().await;
    p.storage.add_conversation("c1", &["alice"]);
    let node = node_with_untrimmed_log(&p).await;
    let service = crate::RoutingService::new(node.clone(), CancellationToken::new());
    node.log.close().await;
    let err = service
        .handle_send(send_req("alice", "c1", "m1", "hi"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable);
    assert_eq!(
        node.waiters.len(),
        0,
        "the waiter left with the failed send"
    );
}

/// The service with the Kafka log: two instances in one consumer group.
mod kafka;

/// Timeline event kinds through Send: shapes, authorization, dedupe, system events.
mod timeline;

/// Outgoing webhooks against a local HTTP receiver.
mod webhooks;

/// Send, authorization and webhooks against the real storage service (SQLite).
mod end_to_end;
