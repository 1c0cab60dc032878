//! The presence service over real gRPC on 127.0.0.1, with a fake gateway that records
//! the `Deliver` calls presence makes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchboard_config::Config;
use switchboard_presence::{build_store, serve};
use switchboard_proto::v1::gateway_server::{Gateway, GatewayServer};
use switchboard_proto::v1::presence_client::PresenceClient;
use switchboard_proto::v1::presence_interest_client::PresenceInterestClient;
use switchboard_proto::v1::{
    server_frame, DeliverRequest, DeliverResponse, DrainRequest, DrainResponse, DropGatewayRequest,
    GatewayRoute, HeartbeatRequest, QueryRequest, RegisterSessionRequest, RouteConversationRequest,
    RouteRequest, SessionInfo, SetStatusRequest, UnregisterSessionRequest, UserPresence,
    WatchRequest,
};
use switchboard_proto::{status_error_code, ErrorCode};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// How long a test waits for an expected event before failing.
const WAIT: Duration = Duration::from_secs(10);

/// A gateway that forwards every `Deliver` request to the test.
struct FakeGateway {
    delivered_tx: mpsc::Sender<DeliverRequest>,
}

#[tonic::async_trait]
impl Gateway for FakeGateway {
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let req = request.into_inner();
        let delivered = req.deliveries.len() as u32;
        self.delivered_tx
            .send(req)
            .await
            .map_err(|_| Status::internal("test stopped listening"))?;
        Ok(Response::new(DeliverResponse {
            delivered,
            absent: Vec::new(),
        }))
    }

    async fn drain(&self, _: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        Ok(Response::new(DrainResponse { sessions: 0 }))
    }
}

struct Harness {
    client: PresenceClient<Channel>,
    /// The interest index service, on the same port.
    interest: PresenceInterestClient<Channel>,
    /// URL of the fake gateway (where watchers sit).
    gateway_url: String,
    delivered_rx: mpsc::Receiver<DeliverRequest>,
    admin_addr: SocketAddr,
    shutdown: CancellationToken,
    presence_task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(session_ttl_ms: u64) -> Harness {
    start_on(session_ttl_ms, None).await
}

/// A Redis prefix used by one test; its keys are deleted when dropped.
struct RedisPrefix {
    url: String,
    prefix: String,
}

impl RedisPrefix {
    fn new() -> RedisPrefix {
        RedisPrefix {
            url: std::env::var("SB_TEST_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            prefix: format!("sbtest:{:016x}", rand::random::<u64>()),
        }
    }

    fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .unwrap_or_else(|e| {
                panic!(
                    "Redis at {} is not reachable ({e}): start it with \
                     `deploy/local/up.sh redis` or point SB_TEST_REDIS_URL at one",
                    self.url
                )
            })
    }

    /// Wait until presence subscribed to its change channel (pub/sub keeps nothing,
    /// so a change published before would reach no one).
    async fn wait_subscribed(&self) {
        let channel = format!("{}:presence", self.prefix);
        let mut conn = self.connection();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (_, subscribers): (String, i64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query(&mut conn)
                .unwrap();
            if subscribers >= 1 {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "never subscribed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for RedisPrefix {
    fn drop(&mut self) {
        let mut conn = self.connection();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query(&mut conn)
            .unwrap_or_default();
        for chunk in keys.chunks(500) {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(chunk).query(&mut conn);
        }
    }
}

/// Start presence on the memory store, or on Redis under `redis`'s prefix.
async fn start_on(session_ttl_ms: u64, redis: Option<&RedisPrefix>) -> Harness {
    let shutdown = CancellationToken::new();

    let gateway_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway_url = format!("http://{}", gateway_listener.local_addr().unwrap());
    let (delivered_tx, delivered_rx) = mpsc::channel(64);
    let (_reporter, health) = switchboard_rpc::health();
    tokio::spawn(switchboard_rpc::serve(
        gateway_listener,
        tonic::service::Routes::new(GatewayServer::new(FakeGateway { delivered_tx })),
        health,
        &Config::default().cluster,
        shutdown.clone(),
    ));

    let mut config = Config::default();
    config.presence.session_ttl_ms = session_ttl_ms;
    config.gateway.heartbeat_interval_ms = session_ttl_ms / 10;
    if let Some(redis) = redis {
        config.presence.backend = "redis".into();
        config.presence.redis_url = redis.url.clone().into();
        config.presence.redis_key_prefix = redis.prefix.clone();
    }
    config.validate().unwrap();
    let config = Arc::new(config);
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let store = build_store(&config.presence).unwrap();
    let peers = switchboard_rpc::Peers::remote(&config.cluster).unwrap();
    let presence_task = tokio::spawn(serve(config, grpc, admin, store, peers, shutdown.clone()));

    let client = PresenceClient::connect(format!("http://{grpc_addr}"))
        .await
        .unwrap();
    let interest = PresenceInterestClient::connect(format!("http://{grpc_addr}"))
        .await
        .unwrap();
    Harness {
        client,
        interest,
        gateway_url,
        delivered_rx,
        admin_addr,
        shutdown,
        presence_task,
    }
}

impl Harness {
    async fn register(
        &mut self,
        session_id: &str,
        user_id: &str,
        gateway_url: &str,
    ) -> UserPresence {
        self.register_as(session_id, user_id, gateway_url, "").await
    }

    /// Register a session with an initial `status` ("" = online).
    async fn register_as(
        &mut self,
        session_id: &str,
        user_id: &str,
        gateway_url: &str,
        status: &str,
    ) -> UserPresence {
        self.client
            .register_session(RegisterSessionRequest {
                session: Some(SessionInfo {
                    session_id: session_id.into(),
                    user_id: user_id.into(),
                    device_id: "device".into(),
                    gateway_addr: gateway_url.into(),
                    status: status.into(),
                    automatic: false,
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .presence
            .unwrap()
    }

    /// The next Deliver call the fake gateway got, as (recipients, presence) pairs.
    async fn next_delivery(&mut self) -> Vec<(Vec<String>, UserPresence)> {
        let req = tokio::time::timeout(WAIT, self.delivered_rx.recv())
            .await
            .expect("a Deliver call in time")
            .expect("fake gateway running");
        req.deliveries
            .into_iter()
            .map(|d| {
                let event = d.event.and_then(|f| f.event);
                let Some(server_frame::Event::Presence(p)) = event else {
                    panic!("not a presence event: {event:?}");
                };
                (d.recipients, p.presence.expect("presence set"))
            })
            .collect()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.presence_task.await.unwrap().unwrap();
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn watcher_hears_when_a_user_connects_and_when_the_session_expires() {
    const TTL_MS: u64 = 1_000;
    let mut h = start(TTL_MS).await;
    let gw = h.gateway_url.clone();
    // Alice sits on another gateway: events go to where the watcher is.
    let alice_gw = "http://127.0.0.1:9".to_string();

    h.register("w1", "watcher", &gw).await;
    let now = h
        .client
        .watch(WatchRequest {
            gateway_addr: gw.clone(),
            watcher_id: "watcher".into(),
            user_ids: vec!["alice".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now.users.len(), 1);
    assert_eq!(now.users[0].status, "offline");

    let registered = h.register("a1", "alice", &alice_gw).await;
    assert_eq!(registered.status, "online");
    let online = h.next_delivery().await;
    assert_eq!(online.len(), 1);
    assert_eq!(online[0].0, vec!["watcher".to_string()]);
    assert_eq!(online[0].1.user_id, "alice");
    assert_eq!(online[0].1.status, "online");
    assert_eq!(online[0].1.sessions, 1);

    // Keep the watcher's session alive (its watches live only as long as it does)
    // and let alice's session expire; the offline event is the signal we wait for.
    let deadline = tokio::time::Instant::now() + WAIT;
    let offline = loop {
        tokio::select! {
            req = h.delivered_rx.recv() => break req.expect("fake gateway running"),
            _ = tokio::time::sleep(Duration::from_millis(TTL_MS / 10)) => {
                assert!(tokio::time::Instant::now() < deadline, "no offline event in time");
                let unknown = h
                    .client
                    .heartbeat(HeartbeatRequest {
                        gateway_addr: gw.clone(),
                        session_ids: vec!["w1".into()],
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .unknown_session_ids;
                assert!(unknown.is_empty(), "the watcher's session must stay alive");
            }
        }
    };
    assert_eq!(offline.deliveries.len(), 1);
    assert_eq!(
        offline.deliveries[0].recipients,
        vec!["watcher".to_string()]
    );
    let Some(server_frame::Event::Presence(event)) =
        offline.deliveries[0].event.clone().and_then(|f| f.event)
    else {
        panic!("not a presence event");
    };
    let p = event.presence.unwrap();
    assert_eq!(
        (p.user_id.as_str(), p.status.as_str(), p.sessions),
        ("alice", "offline", 0)
    );
    assert_eq!(p.last_seen_ms, registered.last_seen_ms);

    let query = h
        .client
        .query(QueryRequest {
            user_ids: vec!["alice".into(), "watcher".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(query.users[0].status, "offline");
    assert_eq!(query.users[1].status, "online");

    let metrics = http_get(h.admin_addr, "/metrics").await;
    for name in [
        "switchboard_presence_sessions",
        "switchboard_presence_online_users",
        "switchboard_presence_events_sent_total",
        "presence_heartbeat_sessions_count",
        "switchboard_presence_expired_users_total 1",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    assert!(http_get(h.admin_addr, "/readyz")
        .await
        .starts_with("HTTP/1.1 200"));
    h.stop().await;
}

#[tokio::test]
async fn status_changes_and_dropped_gateways_notify_watchers() {
    let mut h = start(30_000).await;
    let gw = h.gateway_url.clone();
    let other_gw = "http://127.0.0.1:9".to_string();

    h.register("w1", "watcher", &gw).await;
    h.register("w2", "second", &gw).await;
    for watcher in ["watcher", "second"] {
        h.client
            .watch(WatchRequest {
                gateway_addr: gw.clone(),
                watcher_id: watcher.into(),
                user_ids: vec!["bob".into()],
            })
            .await
            .unwrap();
    }

    // Each change is awaited before the next: the notifier sends a user's presence as
    // it is when it gets to the change, so only then is each status observable.
    let expect = |deliveries: Vec<(Vec<String>, UserPresence)>, status: &str| {
        assert_eq!(deliveries.len(), 1, "{deliveries:?}");
        let (recipients, p) = &deliveries[0];
        assert_eq!(
            recipients,
            &vec!["second".to_string(), "watcher".to_string()]
        );
        assert_eq!((p.user_id.as_str(), p.status.as_str()), ("bob", status));
    };
    h.register("b1", "bob", &other_gw).await;
    expect(h.next_delivery().await, "online");

    // A second device changes nothing visible: no event.
    h.register("b2", "bob", &other_gw).await;
    h.client
        .set_status(SetStatusRequest {
            session_id: "b1".into(),
            status: "away".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    h.client
        .set_status(SetStatusRequest {
            session_id: "b2".into(),
            status: "away".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let away = h.next_delivery().await;
    assert_eq!(away[0].1.sessions, 2);
    expect(away, "away");

    let dropped = h
        .client
        .drop_gateway(DropGatewayRequest {
            gateway_addr: other_gw.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dropped.sessions, 2);
    expect(h.next_delivery().await, "offline");
    assert!(
        h.delivered_rx.try_recv().is_err(),
        "one event per change of the aggregated status"
    );
    h.stop().await;
}

#[tokio::test]
async fn invalid_requests_get_stable_error_codes() {
    let mut h = start(30_000).await;
    let gw = h.gateway_url.clone();

    let err = h
        .client
        .register_session(RegisterSessionRequest {
            session: Some(SessionInfo {
                session_id: "s1".into(),
                user_id: String::new(),
                device_id: String::new(),
                gateway_addr: gw.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status_error_code(&err), ErrorCode::InvalidRequest);

    // An initial status must be one a session can have; automatic only with away.
    for (status, automatic) in [("offline", false), ("Online", false), ("busy", true)] {
        let err = h
            .client
            .register_session(RegisterSessionRequest {
                session: Some(SessionInfo {
                    session_id: "s1".into(),
                    user_id: "alice".into(),
                    device_id: String::new(),
                    gateway_addr: gw.clone(),
                    status: status.into(),
                    automatic,
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(
            status_error_code(&err),
            ErrorCode::InvalidRequest,
            "{status} automatic={automatic}"
        );
    }
    assert_eq!(
        h.query_as("alice", "alice").await.sessions,
        0,
        "a refused registration adds no session"
    );

    let err = h
        .client
        .set_status(SetStatusRequest {
            session_id: "ghost".into(),
            status: "away".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status_error_code(&err), ErrorCode::NotFound);

    h.register("s1", "alice", &gw).await;
    let err = h
        .client
        .set_status(SetStatusRequest {
            session_id: "s1".into(),
            status: "dnd".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status_error_code(&err), ErrorCode::InvalidRequest);
    let invalid_changes = [
        SetStatusRequest {
            status_text: Some("x".repeat(129)),
            ..Default::default()
        },
        SetStatusRequest {
            status_text: Some("two\nlines".into()),
            ..Default::default()
        },
        SetStatusRequest {
            last_seen_privacy: "friends".into(),
            ..Default::default()
        },
        SetStatusRequest {
            status: "busy".into(),
            automatic: true,
            ..Default::default()
        },
    ];
    for change in invalid_changes {
        let err = h
            .client
            .set_status(SetStatusRequest {
                session_id: "s1".into(),
                ..change.clone()
            })
            .await
            .unwrap_err();
        assert_eq!(
            status_error_code(&err),
            ErrorCode::InvalidRequest,
            "{change:?}"
        );
    }
    let err = h
        .client
        .query(QueryRequest {
            user_ids: vec!["alice".into()],
            viewer_id: "v".repeat(257),
        })
        .await
        .unwrap_err();
    assert_eq!(status_error_code(&err), ErrorCode::InvalidRequest);

    let err = h
        .client
        .heartbeat(HeartbeatRequest {
            gateway_addr: "not a url".into(),
            session_ids: vec!["s1".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(status_error_code(&err), ErrorCode::InvalidRequest);

    let too_many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let err = h
        .client
        .watch(WatchRequest {
            gateway_addr: gw.clone(),
            watcher_id: "alice".into(),
            user_ids: too_many,
        })
        .await
        .unwrap_err();
    assert_eq!(status_error_code(&err), ErrorCode::InvalidRequest);

    let err = h
        .client
        .watch(WatchRequest {
            gateway_addr: gw.clone(),
            watcher_id: "nobody-here".into(),
            user_ids: vec!["alice".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(status_error_code(&err), ErrorCode::NotFound);
    h.stop().await;
}

#[tokio::test]
async fn route_conversation_follows_members_and_counts_hits_and_misses() {
    let mut h = start(30_000).await;
    let (gw1, gw2) = ("http://gw1.test:50051", "http://gw2.test:50051");
    h.register("a1", "alice", gw1).await;
    h.register("b1", "bob", gw2).await;
    let members: Vec<String> = ["alice", "bob", "carol"].map(String::from).to_vec();
    let ask = |members: Vec<String>| RouteConversationRequest {
        conversation_id: "c1".into(),
        member_ids: members,
    };
    let routes = |users: &[(&str, &[&str])]| -> Vec<GatewayRoute> {
        users
            .iter()
            .map(|(gw, ids)| GatewayRoute {
                gateway_addr: gw.to_string(),
                user_ids: ids.iter().map(|s| s.to_string()).collect(),
            })
            .collect()
    };

    for _ in 0..3 {
        let got = h
            .interest
            .route_conversation(ask(members.clone()))
            .await
            .unwrap();
        assert_eq!(
            got.into_inner().routes,
            routes(&[(gw1, &["alice"]), (gw2, &["bob"])])
        );
    }
    // carol comes online on GW1; bob leaves.
    h.register("c1", "carol", gw1).await;
    h.client
        .unregister_session(UnregisterSessionRequest {
            session_id: "b1".into(),
        })
        .await
        .unwrap();
    let got = h.interest.route_conversation(ask(members)).await.unwrap();
    assert_eq!(
        got.into_inner().routes,
        routes(&[(gw1, &["alice", "carol"])])
    );

    let metrics = http_get(h.admin_addr, "/metrics").await;
    for line in [
        "switchboard_presence_interest_lookups_total{result=\"hit\"} 2",
        "switchboard_presence_interest_lookups_total{result=\"miss\"} 2",
        "switchboard_presence_interest_invalidations_total 1",
    ] {
        assert!(metrics.contains(line), "missing `{line}` in:\n{metrics}");
    }

    let err = h
        .interest
        .route_conversation(ask(vec!["alice".into(), String::new()]))
        .await
        .unwrap_err();
    assert_eq!(status_error_code(&err), ErrorCode::InvalidRequest);
    let too_many: Vec<String> = (0..10_001).map(|i| format!("u{i}")).collect();
    let err = h
        .interest
        .route_conversation(ask(too_many))
        .await
        .unwrap_err();
    assert_eq!(status_error_code(&err), ErrorCode::InvalidRequest);
    let err = h
        .interest
        .route_conversation(RouteConversationRequest {
            conversation_id: String::new(),
            member_ids: vec!["alice".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(status_error_code(&err), ErrorCode::InvalidRequest);
    h.stop().await;
}

impl Harness {
    async fn set_status(&mut self, req: SetStatusRequest) -> UserPresence {
        self.client
            .set_status(req)
            .await
            .unwrap()
            .into_inner()
            .presence
            .unwrap()
    }

    async fn query_as(&mut self, viewer_id: &str, user_id: &str) -> UserPresence {
        self.client
            .query(QueryRequest {
                user_ids: vec![user_id.into()],
                viewer_id: viewer_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .users
            .remove(0)
    }

    /// The next presence event: exactly one delivery, to `watcher`.
    async fn next_event(&mut self) -> UserPresence {
        let mut deliveries = self.next_delivery().await;
        assert_eq!(deliveries.len(), 1, "{deliveries:?}");
        let (recipients, presence) = deliveries.remove(0);
        assert_eq!(recipients, vec!["watcher".to_string()]);
        presence
    }
}

fn status(session_id: &str, status: &str, automatic: bool) -> SetStatusRequest {
    SetStatusRequest {
        session_id: session_id.into(),
        status: status.into(),
        automatic,
        ..Default::default()
    }
}

#[tokio::test]
async fn others_see_the_public_view_and_hear_only_its_changes() {
    let mut h = start(30_000).await;
    public_view_scenario(&mut h).await;
    h.stop().await;
}

#[tokio::test]
async fn others_see_the_public_view_and_hear_only_its_changes_on_redis() {
    let redis = RedisPrefix::new();
    let mut h = start_on(30_000, Some(&redis)).await;
    redis.wait_subscribed().await;
    public_view_scenario(&mut h).await;
    h.stop().await;
}

#[tokio::test]
async fn a_session_opened_invisible_is_never_announced_online() {
    let mut h = start(30_000).await;
    opened_invisible_scenario(&mut h).await;
    h.stop().await;
}

#[tokio::test]
async fn a_session_opened_invisible_is_never_announced_online_on_redis() {
    let redis = RedisPrefix::new();
    let mut h = start_on(30_000, Some(&redis)).await;
    redis.wait_subscribed().await;
    opened_invisible_scenario(&mut h).await;
    h.stop().await;
}

/// Alice, watched by "watcher", connects invisible: she sees herself invisible,
/// everyone else offline, and the watcher's gateway gets no "online" event (the first
/// event it gets is a later, public change).
async fn opened_invisible_scenario(h: &mut Harness) {
    let gw = h.gateway_url.clone();
    let alice_gw = "http://127.0.0.1:9".to_string();
    h.register("w1", "watcher", &gw).await;
    h.client
        .watch(WatchRequest {
            gateway_addr: gw.clone(),
            watcher_id: "watcher".into(),
            user_ids: vec!["alice".into()],
        })
        .await
        .unwrap();

    let own = h.register_as("a1", "alice", &alice_gw, "invisible").await;
    assert_eq!((own.status.as_str(), own.sessions), ("invisible", 1));
    let seen = h.query_as("bob", "alice").await;
    assert_eq!((seen.status.as_str(), seen.sessions), ("offline", 0));
    assert_eq!(
        h.client
            .route(RouteRequest {
                user_ids: vec!["alice".into()],
            })
            .await
            .unwrap()
            .into_inner()
            .routes
            .len(),
        1,
        "an invisible session still gets messages"
    );

    // Events reach a gateway in order: had the registration been announced, the
    // watcher would see it before this status text.
    h.set_status(SetStatusRequest {
        session_id: "a1".into(),
        status_text: Some("hidden".into()),
        ..Default::default()
    })
    .await;
    let event = h.next_event().await;
    assert_eq!(
        (
            event.status.as_str(),
            event.sessions,
            event.status_text.as_str()
        ),
        ("offline", 0, "hidden")
    );

    // A second session opened busy makes her visible, as busy.
    let own = h.register_as("a2", "alice", &alice_gw, "busy").await;
    assert_eq!((own.status.as_str(), own.sessions), ("busy", 2));
    let event = h.next_event().await;
    assert_eq!((event.status.as_str(), event.sessions), ("busy", 2));
}

/// Views and events of a user going through text, invisible, offline, privacy and
/// idle changes, watched by "watcher" on the harness gateway.
async fn public_view_scenario(h: &mut Harness) {
    let gw = h.gateway_url.clone();
    let alice_gw = "http://127.0.0.1:9".to_string();
    h.register("w1", "watcher", &gw).await;
    h.client
        .watch(WatchRequest {
            gateway_addr: gw.clone(),
            watcher_id: "watcher".into(),
            user_ids: vec!["alice".into()],
        })
        .await
        .unwrap();

    h.register("a1", "alice", &alice_gw).await;
    assert_eq!(h.next_event().await.status, "online");

    // Status text: announced, and shown to everyone.
    let own = h
        .set_status(SetStatusRequest {
            session_id: "a1".into(),
            status_text: Some("lunch".into()),
            ..Default::default()
        })
        .await;
    assert_eq!(
        (own.status.as_str(), own.status_text.as_str()),
        ("online", "lunch")
    );
    let event = h.next_event().await;
    assert_eq!(
        (event.status.as_str(), event.status_text.as_str()),
        ("online", "lunch")
    );

    // Invisible: the user sees the truth, everyone else (watchers too) offline.
    let own = h.set_status(status("a1", "invisible", false)).await;
    assert_eq!((own.status.as_str(), own.sessions), ("invisible", 1));
    let event = h.next_event().await;
    assert_eq!((event.status.as_str(), event.sessions), ("offline", 0));
    assert!(event.last_seen_ms > 0);
    assert_eq!(event.status_text, "lunch");
    let frozen = event.last_seen_ms;
    assert_eq!(h.query_as("alice", "alice").await.status, "invisible");
    for viewer in ["bob", ""] {
        let seen = h.query_as(viewer, "alice").await;
        assert_eq!(
            (seen.status.as_str(), seen.sessions, seen.last_seen_ms),
            ("offline", 0, frozen),
            "viewer {viewer:?}"
        );
    }
    let watched = h
        .client
        .watch(WatchRequest {
            gateway_addr: gw.clone(),
            watcher_id: "watcher".into(),
            user_ids: vec!["alice".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(watched.users[0].status, "offline");

    // Leaving while invisible announces nothing: the next event the gateway gets
    // (events reach a gateway in order) is alice coming back.
    h.client
        .unregister_session(UnregisterSessionRequest {
            session_id: "a1".into(),
        })
        .await
        .unwrap();
    assert_eq!(h.query_as("bob", "alice").await.last_seen_ms, frozen);
    h.register("a2", "alice", &alice_gw).await;
    let event = h.next_event().await;
    assert_eq!((event.status.as_str(), event.sessions), ("online", 1));

    // Privacy nobody: hidden from others, not from the user.
    let own = h
        .set_status(SetStatusRequest {
            session_id: "a2".into(),
            last_seen_privacy: "nobody".into(),
            ..Default::default()
        })
        .await;
    assert!(own.last_seen_ms > 0);
    assert_eq!(own.last_seen_privacy, "nobody");
    let event = h.next_event().await;
    assert_eq!(
        (event.last_seen_privacy.as_str(), event.last_seen_ms),
        ("nobody", 0)
    );
    assert_eq!(h.query_as("bob", "alice").await.last_seen_ms, 0);

    // The idle timer: away replaces online, activity undoes it.
    h.set_status(status("a2", "away", true)).await;
    assert_eq!(h.next_event().await.status, "away");
    h.set_status(status("a2", "online", true)).await;
    assert_eq!(h.next_event().await.status, "online");
    // ...but never a status the user chose: no event, the next one is the user's.
    h.set_status(status("a2", "busy", false)).await;
    assert_eq!(h.next_event().await.status, "busy");
    let own = h.set_status(status("a2", "away", true)).await;
    assert_eq!(own.status, "busy");
    h.set_status(status("a2", "online", false)).await;
    assert_eq!(h.next_event().await.status, "online");
    assert!(h.delivered_rx.try_recv().is_err());
}
