//! The Redis store against a real Redis (`SB_TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`; start one with `deploy/local/up.sh redis`). Every store
//! gets its own random key prefix, and its keys are deleted when the test drops it.

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::*;
use crate::store::conformance::TTL;
use crate::store::interest::{members_fingerprint, INTEREST_TTL};
use crate::store::{PRIVACY_EVERYONE, PRIVACY_NOBODY};

fn redis_url() -> String {
    std::env::var("SB_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A blocking connection to the test Redis; fails the test with what to do when
/// Redis is not there.
fn require_redis() -> redis::Connection {
    let url = redis_url();
    redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c).map(|_| c))
        .unwrap_or_else(|e| {
            panic!(
                "Redis at {url} is not reachable ({e}): start it with \
                 `deploy/local/up.sh redis` or point SB_TEST_REDIS_URL at one"
            )
        })
}

fn unique_prefix() -> String {
    format!("sbtest:{:016x}", rand::random::<u64>())
}

fn options(url: &str, prefix: &str, ttl: Duration, timeouts: bool) -> RedisOptions {
    RedisOptions {
        url: url.to_owned(),
        connection: RedisConnection::default(),
        key_prefix: prefix.to_owned(),
        session_ttl: ttl,
        // Paused tokio time would fire these at once while Redis answers.
        connect_timeout: timeouts.then_some(CONNECT_TIMEOUT),
        response_timeout: timeouts.then_some(RESPONSE_TIMEOUT),
    }
}

/// Deletes every key under `prefix` when dropped.
struct Cleanup {
    prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(mut conn) = redis::Client::open(redis_url().as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query(&mut conn)
            .unwrap_or_default();
        for chunk in keys.chunks(500) {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(chunk).query(&mut conn);
        }
    }
}

/// A store for the conformance suite that cleans up after itself.
struct TestStore {
    store: RedisSessionStore,
    _cleanup: Cleanup,
}

fn test_store(ttl: Duration) -> Arc<dyn SessionStore> {
    require_redis();
    let prefix = unique_prefix();
    let store = RedisSessionStore::new(options(&redis_url(), &prefix, ttl, false), Clock::new())
        .expect("valid test url");
    Arc::new(TestStore {
        store,
        _cleanup: Cleanup { prefix },
    })
}

#[async_trait]
impl SessionStore for TestStore {
    fn now_ms(&self) -> i64 {
        self.store.now_ms()
    }
    async fn register(&self, s: NewSession) -> Result<PresenceUpdate, PresenceError> {
        self.store.register(s).await
    }
    async fn unregister(&self, id: &str) -> Result<Option<PresenceUpdate>, PresenceError> {
        self.store.unregister(id).await
    }
    async fn heartbeat(&self, gw: &str, ids: &[String]) -> Result<Vec<String>, PresenceError> {
        self.store.heartbeat(gw, ids).await
    }
    async fn set_status(
        &self,
        id: &str,
        change: &StatusChange,
    ) -> Result<PresenceUpdate, PresenceError> {
        self.store.set_status(id, change).await
    }
    async fn query(&self, users: &[String]) -> Result<Vec<PresenceState>, PresenceError> {
        self.store.query(users).await
    }
    async fn route(&self, users: &[String]) -> Result<Vec<GatewayRoute>, PresenceError> {
        self.store.route(users).await
    }
    async fn route_conversation(
        &self,
        conversation: &str,
        members: &[String],
    ) -> Result<ConversationRoutes, PresenceError> {
        self.store.route_conversation(conversation, members).await
    }
    async fn watch(&self, gw: &str, watcher: &str, users: &[String]) -> Result<(), PresenceError> {
        self.store.watch(gw, watcher, users).await
    }
    async fn watchers_of(&self, user: &str) -> Result<Vec<GatewayWatchers>, PresenceError> {
        self.store.watchers_of(user).await
    }
    async fn drop_gateway(&self, gw: &str) -> Result<DropOutcome, PresenceError> {
        self.store.drop_gateway(gw).await
    }
    async fn expire(&self, now_ms: i64) -> Result<Vec<PresenceState>, PresenceError> {
        self.store.expire(now_ms).await
    }
    async fn stats(&self) -> Result<StoreStats, PresenceError> {
        self.store.stats().await
    }
    async fn epoch(&self) -> Result<Epoch, PresenceError> {
        self.store.epoch().await
    }
}

crate::session_store_suite!(test_store);

fn session(sid: &str, user: &str, gw: &str) -> NewSession {
    NewSession {
        session_id: sid.into(),
        user_id: user.into(),
        device_id: String::new(),
        gateway_url: gw.into(),
        status: crate::store::SessionStatus::Online,
        automatic: false,
    }
}

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Two stores sharing one Redis and one key prefix, as two presence instances.
fn two_instances(ttl: Duration) -> (RedisSessionStore, RedisSessionStore, Cleanup) {
    require_redis();
    let prefix = unique_prefix();
    let clock = Clock::new();
    let make = || {
        RedisSessionStore::new(options(&redis_url(), &prefix, ttl, true), clock)
            .expect("valid test url")
    };
    (make(), make(), Cleanup { prefix })
}

const GW1: &str = "http://gw1:50051";
const GW2: &str = "http://gw2:50051";

#[tokio::test]
async fn instances_share_the_epoch_and_a_wiped_redis_gets_a_new_one() {
    let (a, b, cleanup) = two_instances(TTL);
    let first = a.epoch().await.unwrap();
    assert!(first.fresh);
    let seen = b.epoch().await.unwrap();
    assert_eq!(seen.id, first.id, "one Redis, one epoch");
    assert!(!seen.fresh);
    a.register(session("a1", "alice", GW1)).await.unwrap();
    // What a Redis restarted without its data looks like to the stores.
    drop(Cleanup {
        prefix: cleanup.prefix.clone(),
    });
    let after = b.epoch().await.unwrap();
    assert!(
        after.fresh,
        "the first to ask after the loss makes the new epoch"
    );
    assert_ne!(after.id, first.id);
    assert_eq!(a.epoch().await.unwrap().id, after.id);
}

#[tokio::test]
async fn a_change_through_one_instance_is_seen_by_the_other() {
    let (a, b, _cleanup) = two_instances(TTL);
    a.register(session("a1", "alice", GW1)).await.unwrap();
    let seen = b.query(&ids(&["alice"])).await.unwrap();
    assert_eq!(seen[0].status, "online");
    assert_eq!(
        b.route(&ids(&["alice"])).await.unwrap(),
        vec![GatewayRoute {
            gateway_addr: GW1.into(),
            user_ids: ids(&["alice"]),
        }]
    );

    // A watch registered through B is in the index A reads.
    b.register(session("b1", "bob", GW2)).await.unwrap();
    b.watch(GW2, "bob", &ids(&["alice"])).await.unwrap();
    assert_eq!(
        a.watchers_of("alice").await.unwrap(),
        vec![GatewayWatchers {
            gateway_url: GW2.into(),
            watcher_ids: ids(&["bob"]),
        }]
    );
    // A heartbeat through B keeps a session registered through A.
    assert!(b.heartbeat(GW1, &ids(&["a1"])).await.unwrap().is_empty());
    let update = b.unregister("a1").await.unwrap().expect("live");
    assert!(update.changed);
    assert_eq!(
        a.query(&ids(&["alice"])).await.unwrap()[0].status,
        "offline"
    );
}

#[tokio::test]
async fn a_change_published_by_one_instance_reaches_the_others_subscription() {
    let (a, b, _cleanup) = two_instances(TTL);
    let (tx, mut rx) = mpsc::channel(16);
    let stop = CancellationToken::new();
    let b_feed = b.feed().expect("redis store has a feed");
    let subscriber = tokio::spawn({
        let stop = stop.clone();
        async move { b_feed.run(tx, stop).await }
    });

    // Wait until B's subscription is registered in Redis (a deterministic signal;
    // publishing before it would be lost, as pub/sub keeps nothing).
    let channel = b.inner.keys.channel();
    let mut conn = require_redis();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, subscribers): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query(&mut conn)
            .unwrap();
        if subscribers >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "B never subscribed to {channel}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let change = UserPresence {
        user_id: "alice".into(),
        status: "online".into(),
        last_seen_ms: 42,
        sessions: 1,
        ..Default::default()
    };
    a.feed()
        .expect("feed")
        .publish(std::slice::from_ref(&change))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("B receives A's change")
        .expect("feed open");
    assert_eq!(got, change);
    stop.cancel();
    subscriber.await.unwrap();
}

#[tokio::test]
async fn exactly_one_live_instance_delivers_to_each_gateway() {
    let (a, b, _cleanup) = two_instances(TTL);
    a.refresh_instances().await.unwrap();
    b.refresh_instances().await.unwrap();
    let live = a.refresh_instances().await.unwrap();
    assert_eq!(live.len(), 2);
    let (fa, fb) = (a.feed().unwrap(), b.feed().unwrap());
    let mut by_a = 0;
    for i in 0..50 {
        let gw = format!("http://10.0.0.{i}:50051");
        assert!(
            fa.delivers_to(&gw) != fb.delivers_to(&gw),
            "one instance per gateway: {gw}"
        );
        by_a += usize::from(fa.delivers_to(&gw));
    }
    assert!(
        by_a > 0 && by_a < 50,
        "both instances get gateways ({by_a}/50 on A)"
    );
}

#[tokio::test]
async fn concurrent_sweeps_expire_each_session_once() {
    let ttl = Duration::from_secs(30);
    let (a, b, _cleanup) = two_instances(ttl);
    let users: Vec<String> = (0..300).map(|i| format!("u{i}")).collect();
    for (i, user) in users.iter().enumerate() {
        a.register(session(&format!("s{i}"), user, GW1))
            .await
            .unwrap();
    }
    let later = a.now_ms() + ttl.as_millis() as i64 + 1;
    let (ra, rb) = tokio::join!(a.expire(later), b.expire(later));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let mut all: Vec<&str> = ra.iter().chain(&rb).map(|p| p.user_id.as_str()).collect();
    all.sort();
    let mut expected: Vec<&str> = users.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(all, expected, "every user reported offline exactly once");
    assert_eq!(a.stats().await.unwrap(), StoreStats::default());
}

#[tokio::test]
async fn heartbeat_during_an_expiry_claim_is_refused_and_reregister_wins() {
    let ttl = Duration::from_secs(30);
    let (a, _b, _cleanup) = two_instances(ttl);
    a.register(session("s1", "alice", GW1)).await.unwrap();
    let later = a.now_ms() + ttl.as_millis() as i64 + 1;
    // Claim as a sweeper would, without finishing.
    let s = &*a.inner;
    let shard = shard_of("s1");
    let claimed: Vec<String> = s
        .script(
            "test",
            &s.scripts.shard_sweep,
            &[s.keys.sessions(shard), s.keys.deadlines(shard)],
            &[
                later.to_string(),
                (later + EXPIRY_LEASE_MS).to_string(),
                "10".into(),
            ],
        )
        .await
        .unwrap();
    assert_eq!(claimed[0], "s1");
    assert_eq!(a.heartbeat(GW1, &ids(&["s1"])).await.unwrap(), ids(&["s1"]));
    // The gateway registers it again: the late steps of the claim must not undo it.
    a.register(session("s1", "alice", GW1)).await.unwrap();
    let gen = claimed[2].clone();
    let changes = s
        .remove_user_entries("test", &[("s1".into(), "alice".into(), gen, later)])
        .await
        .unwrap();
    assert!(changes.is_empty(), "entry of a newer registration kept");
    assert_eq!(a.query(&ids(&["alice"])).await.unwrap()[0].status, "online");
    assert!(a.heartbeat(GW1, &ids(&["s1"])).await.unwrap().is_empty());
}

/// A TCP forwarder to the test Redis that can be cut and restored, standing for a
/// Redis that goes away and comes back on the same address.
struct Proxy {
    addr: std::net::SocketAddr,
    tasks: JoinSet<()>,
}

impl Proxy {
    async fn start(addr: std::net::SocketAddr) -> Proxy {
        let target = redis_url()
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind(addr).await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let target = target.clone();
                conns.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Proxy { addr, tasks }
    }

    /// Close the listener and every forwarded connection.
    async fn cut(mut self) -> std::net::SocketAddr {
        self.tasks.shutdown().await;
        self.addr
    }
}

#[tokio::test]
async fn unreachable_redis_fails_fast_and_recovery_is_automatic() {
    require_redis();
    // A port with nothing listening.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let prefix = unique_prefix();
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let url = format!("redis://{closed}");
    let store = RedisSessionStore::new(options(&url, &prefix, TTL, true), Clock::new()).unwrap();
    let err = store
        .register(session("s1", "alice", GW1))
        .await
        .unwrap_err();
    assert!(matches!(err, PresenceError::Unavailable(_)), "{err:?}");
    let err = store.query(&ids(&["alice"])).await.unwrap_err();
    assert!(matches!(err, PresenceError::Unavailable(_)), "{err:?}");

    // wait_ready keeps retrying until Redis appears, and gives up on shutdown.
    let stop = CancellationToken::new();
    stop.cancel();
    assert!(!store.wait_ready(&stop).await);

    // Redis appears on that address: the store connects without a restart.
    let proxy = Proxy::start(closed).await;
    assert!(store.wait_ready(&CancellationToken::new()).await);
    store.register(session("s1", "alice", GW1)).await.unwrap();

    // Redis goes away during operation: calls fail with unavailable, not hang.
    let addr = proxy.cut().await;
    let err = store.query(&ids(&["alice"])).await.unwrap_err();
    assert!(matches!(err, PresenceError::Unavailable(_)), "{err:?}");

    // It comes back: the connection manager reconnects on a later call.
    let _proxy = Proxy::start(addr).await;
    let mut recovered = None;
    for _ in 0..20 {
        match store.query(&ids(&["alice"])).await {
            Ok(p) => {
                recovered = Some(p);
                break;
            }
            Err(PresenceError::Unavailable(_)) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    let presence = recovered.expect("store recovers once Redis is back");
    assert_eq!(presence[0].status, "online");
}

#[tokio::test]
async fn a_computation_racing_an_invalidation_is_not_cached() {
    let (a, b, _cleanup) = two_instances(TTL);
    let s = &*a.inner;
    let members = ids(&["alice", "bob"]);
    a.register(session("a1", "alice", GW1)).await.unwrap();
    // Instance A starts computing the routes (reads the generation, records the
    // interest and reads bob's hash while bob is offline)...
    let cached = s.read_interest("conv").await.unwrap();
    let exp = s.clock.now_ms() + INTEREST_TTL.as_millis() as i64;
    let stale = s.compute_routes("conv", &members, exp).await.unwrap();
    assert_eq!(stale.len(), 1);
    // ...bob comes online through instance B before A stores its result...
    b.register(session("b1", "bob", GW2)).await.unwrap();
    // ...so A's stale result is refused rather than cached.
    let fp = format!("{:032x}", members_fingerprint(&members));
    let stored = s
        .store_interest("conv", &cached.gen, &fp, exp, &stale)
        .await
        .unwrap();
    assert!(
        !stored,
        "a result computed before an invalidation is not cached"
    );
    let answer = a.route_conversation("conv", &members).await.unwrap();
    assert!(!answer.cached);
    assert_eq!(answer.routes.len(), 2, "bob's gateway is there: {answer:?}");

    // Without a racing change, the same steps cache the entry.
    let cached = s.read_interest("conv2").await.unwrap();
    let routes = s.compute_routes("conv2", &members, exp).await.unwrap();
    assert!(s
        .store_interest("conv2", &cached.gen, &fp, exp, &routes)
        .await
        .unwrap());
    assert!(
        a.route_conversation("conv2", &members)
            .await
            .unwrap()
            .cached
    );
}

#[tokio::test]
async fn an_entry_cached_through_one_instance_is_invalidated_through_another() {
    let (a, b, _cleanup) = two_instances(TTL);
    let registry = prometheus::Registry::new();
    a.register_metrics(&registry).unwrap();
    a.register(session("a1", "alice", GW1)).await.unwrap();
    let members = ids(&["alice", "bob"]);
    assert!(!a.route_conversation("conv", &members).await.unwrap().cached);
    assert!(b.route_conversation("conv", &members).await.unwrap().cached);
    // bob comes online through B; A's next answer includes him.
    b.register(session("b1", "bob", GW2)).await.unwrap();
    let answer = a.route_conversation("conv", &members).await.unwrap();
    assert!(!answer.cached);
    assert_eq!(
        answer.routes,
        vec![
            GatewayRoute {
                gateway_addr: GW1.into(),
                user_ids: ids(&["alice"]),
            },
            GatewayRoute {
                gateway_addr: GW2.into(),
                user_ids: ids(&["bob"]),
            },
        ]
    );
    // The invalidation was made (and counted) by B; A counted none.
    assert_eq!(a.inner.metrics.interest_invalidations.get(), 0);
    assert_eq!(b.inner.metrics.interest_invalidations.get(), 1);
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(text.contains("switchboard_presence_interest_invalidations_total 0"));
}

#[tokio::test]
async fn interest_keys_expire_in_redis() {
    let (a, _b, _cleanup) = two_instances(TTL);
    a.register(session("a1", "alice", GW1)).await.unwrap();
    a.route_conversation("conv", &ids(&["alice", "bob"]))
        .await
        .unwrap();
    a.register(session("b1", "bob", GW1)).await.unwrap();
    let keys = &a.inner.keys;
    let mut conn = require_redis();
    let limit = 2 * INTEREST_TTL.as_millis() as i64;
    for key in [
        keys.interest("alice"),
        keys.interest("bob"),
        keys.routes_gen("conv"),
    ] {
        let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).unwrap();
        assert!(ttl > 0 && ttl <= limit, "{key} has TTL {ttl}");
    }
    a.route_conversation("conv", &ids(&["alice", "bob"]))
        .await
        .unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(keys.routes("conv"))
        .query(&mut conn)
        .unwrap();
    assert!(ttl > 0 && ttl <= limit, "routes key has TTL {ttl}");
}

#[tokio::test]
async fn settings_outlive_the_user_hash_and_go_with_their_defaults() {
    let (a, b, _cleanup) = two_instances(TTL);
    a.register(session("a1", "alice", GW1)).await.unwrap();
    let change = StatusChange {
        status_text: Some("away from desk".into()),
        last_seen_privacy: Some(PRIVACY_NOBODY.into()),
        ..Default::default()
    };
    a.set_status("a1", &change).await.unwrap();
    a.unregister("a1").await.unwrap();
    let keys = &a.inner.keys;
    let mut conn = require_redis();
    let pttl = |conn: &mut redis::Connection, key: &str| -> i64 {
        redis::cmd("PTTL").arg(key).query(conn).unwrap()
    };
    let user_ttl = pttl(&mut conn, &keys.user("alice"));
    assert!(
        user_ttl > 0 && user_ttl <= LAST_SEEN_RETENTION.as_millis() as i64,
        "an offline user's hash expires ({user_ttl})"
    );
    assert_eq!(
        pttl(&mut conn, &keys.settings("alice")),
        -1,
        "settings have no TTL"
    );
    // Read through another instance after the user hash is gone.
    let _: () = redis::cmd("DEL")
        .arg(keys.user("alice"))
        .query(&mut conn)
        .unwrap();
    let state = b.query(&ids(&["alice"])).await.unwrap().remove(0);
    assert_eq!(
        (state.status_text.as_str(), state.last_seen_privacy.as_str()),
        ("away from desk", PRIVACY_NOBODY)
    );

    b.register(session("a2", "alice", GW2)).await.unwrap();
    let defaults = StatusChange {
        status_text: Some(String::new()),
        last_seen_privacy: Some(PRIVACY_EVERYONE.into()),
        ..Default::default()
    };
    b.set_status("a2", &defaults).await.unwrap();
    let exists: i64 = redis::cmd("EXISTS")
        .arg(keys.settings("alice"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(exists, 0, "default settings cost no key");
}

#[test]
fn keys_of_one_operation_share_a_hash_tag() {
    let keys = Keys {
        prefix: "sb".into(),
    };
    let tag = |k: &str| {
        let open = k.find('{').expect("tagged");
        let close = k[open..].find('}').expect("closed") + open;
        k[open + 1..close].to_owned()
    };
    let shard = shard_of("session-1");
    assert_eq!(tag(&keys.sessions(shard)), tag(&keys.deadlines(shard)));
    assert_eq!(tag(&keys.sessions(shard)), tag(&keys.by_gateway(shard)));
    assert_eq!(tag(&keys.user("alice")), tag(&keys.watching("alice")));
    assert_eq!(tag(&keys.user("alice")), tag(&keys.interest("alice")));
    assert_eq!(tag(&keys.user("alice")), tag(&keys.settings("alice")));
    assert_eq!(tag(&keys.routes("c1")), tag(&keys.routes_gen("c1")));
    assert_eq!(tag(&keys.routes("c1")), "c:c1");
    assert_eq!(tag(&keys.user("alice")), "u:alice");
    assert!(keys.user("alice").starts_with("sb:"));
    assert!(shard < SHARDS);
}

#[test]
fn passwords_are_not_logged() {
    assert_eq!(
        redacted("redis://:secret@host:6379/0"),
        "redis://***@host:6379/0"
    );
    assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
}

/// Latency of the interest index against Route for a 10,000-member conversation with
/// 2,000 members online on 10 gateways. A measurement, not a test (no assertion on
/// time): `cargo test -p switchboard-presence --lib --release measure_interest -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn measure_interest_index_against_route() {
    let (store, _other, _cleanup) = two_instances(Duration::from_secs(600));
    let members: Vec<String> = (0..10_000).map(|i| format!("user-{i:05}")).collect();
    for (i, user) in members.iter().step_by(5).enumerate() {
        let gateway = format!("http://10.0.0.{}:50051", i % 10);
        store
            .register(session(&format!("s-{i}"), user, &gateway))
            .await
            .unwrap();
    }
    let fresh = store.route(&members).await.unwrap();
    assert_eq!(fresh.len(), 10);
    assert_eq!(fresh.iter().map(|r| r.user_ids.len()).sum::<usize>(), 2_000);

    async fn time<F, Fut>(n: usize, mut f: F) -> Vec<Duration>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let start = Instant::now();
            f(i).await;
            out.push(start.elapsed());
        }
        out.sort();
        out
    }
    fn report(name: &str, d: &[Duration]) {
        let mean = d.iter().sum::<Duration>() / d.len() as u32;
        println!(
            "{name:<44} n={:<4} p50={:>8.2?} p90={:>8.2?} max={:>8.2?} mean={:>8.2?}",
            d.len(),
            d[d.len() / 2],
            d[d.len() * 9 / 10],
            d[d.len() - 1],
            mean
        );
    }

    // Warm up the connection and scripts.
    store.route_conversation("warm", &members).await.unwrap();
    let route = time(30, |_| async {
        store.route(&members).await.unwrap();
    })
    .await;
    let miss = time(30, |i| {
        let (store, members) = (&store, &members);
        async move {
            let answer = store
                .route_conversation(&format!("miss-{i}"), members)
                .await
                .unwrap();
            assert!(!answer.cached);
        }
    })
    .await;
    store.route_conversation("hot", &members).await.unwrap();
    let hit = time(300, |_| async {
        let answer = store.route_conversation("hot", &members).await.unwrap();
        assert!(answer.cached);
    })
    .await;
    let fingerprint = time(300, |_| async {
        std::hint::black_box(members_fingerprint(std::hint::black_box(&members)));
    })
    .await;
    println!(
        "10,000 members, 2,000 online on 10 gateways, Redis at {}",
        redis_url()
    );
    report("Route(all members)", &route);
    report("RouteConversation, miss (compute + cache)", &miss);
    report("RouteConversation, hit", &hit);
    report("  of which fingerprint of 10,000 ids", &fingerprint);
}
