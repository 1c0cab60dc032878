//! Tests of the ScyllaDB/Cassandra store against a real server at `SB_TEST_SCYLLA_NODES`
//! (default `127.0.0.1:9042`; locally `deploy/local/up.sh cassandra`). A server that is
//! not reachable fails the tests with a message saying so; nothing is skipped.
//!
//! Isolation: every test gets a keyspace of its own (`sbt_<random>`), created by the
//! migrations and dropped when the test's factory is dropped. The conformance suite
//! uses fixed user ids ("alice", "bob") and dedupe keys, so sharing a keyspace
//! between tests would make them see each other's data; a keyspace per test costs
//! about a second of schema changes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use switchboard_config::Config;
use switchboard_proto::ErrorCode;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::conformance::{Harness, StoreFactory, WINDOW_MS};

fn test_nodes() -> String {
    std::env::var("SB_TEST_SCYLLA_NODES").unwrap_or_else(|_| "127.0.0.1:9042".into())
}

fn unreachable_hint(e: &dyn std::fmt::Display) -> String {
    format!(
        "Cassandra/ScyllaDB test server at {} (SB_TEST_SCYLLA_NODES): {e}; \
         start one with `deploy/local/up.sh cassandra`",
        test_nodes()
    )
}

/// A configuration for a fresh, unique keyspace on the test server.
fn test_config() -> Config {
    let mut config = Config::default();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    config.storage.backend = "scylla".into();
    config.storage.scylla_nodes = test_nodes();
    config.storage.scylla_keyspace = format!("sbt_{}", &suffix[..20]);
    config.storage.dedupe_window_secs = (WINDOW_MS / 1000) as u64;
    config
}

/// Drops a test keyspace. Runs on a thread of its own so that it also works from
/// `Drop` inside a test's runtime.
fn drop_keyspace(config: &Config) {
    let keyspace = config.storage.scylla_keyspace.clone();
    let config = config.clone();
    let dropped = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime for dropping a keyspace");
        runtime.block_on(async {
            let session = connect(&config, None).await.ok()?;
            run_ddl(
                &session,
                &format!("DROP KEYSPACE IF EXISTS {}", config.storage.scylla_keyspace),
            )
            .await
            .ok()
        })
    })
    .join();
    if !matches!(dropped, Ok(Some(()))) {
        eprintln!("test keyspace {keyspace} not dropped");
    }
}

/// A unique keyspace; every `open` opens a store on it (the first one migrates).
pub(crate) struct ScyllaFactory {
    config: Config,
}

impl ScyllaFactory {
    pub(crate) fn new() -> Self {
        ScyllaFactory {
            config: test_config(),
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) async fn store(&self) -> ScyllaStore {
        ScyllaStore::open(&self.config)
            .await
            .unwrap_or_else(|e| panic!("{}", unreachable_hint(&e)))
    }
}

impl Drop for ScyllaFactory {
    fn drop(&mut self) {
        drop_keyspace(&self.config);
    }
}

#[async_trait]
impl StoreFactory for ScyllaFactory {
    async fn open(&self) -> Arc<dyn HistoryStore> {
        Arc::new(self.store().await)
    }
}

mod conformance {
    crate::conformance::history_store_conformance!(super::ScyllaFactory::new);
}

#[tokio::test]
async fn identical_concurrent_history_reads_share_one_backend_query() {
    let factory = ScyllaFactory::new();
    crate::service::tests::identical_concurrent_reads_share_one_query(factory.open().await).await;
}

/// Versions recorded in the keyspace, ascending.
async fn recorded_versions(config: &Config) -> Vec<i32> {
    let session = connect(config, None)
        .await
        .unwrap_or_else(|e| panic!("{}", unreachable_hint(&e)));
    let result = session
        .query_unpaged(
            format!(
                "SELECT version FROM {}.schema_version",
                config.storage.scylla_keyspace
            ),
            (),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap();
    let mut versions: Vec<i32> = result
        .rows::<(i32,)>()
        .unwrap()
        .map(|r| r.unwrap().0)
        .collect();
    versions.sort_unstable();
    versions
}

#[tokio::test]
async fn migrations_are_recorded_and_running_them_again_is_a_no_op() {
    let factory = ScyllaFactory::new();
    let config = &factory.config;
    let latest = schema::latest_version();
    assert_eq!(crate::migrate(config).await.unwrap(), latest);
    assert_eq!(crate::migrate(config).await.unwrap(), latest);
    let want: Vec<i32> = (1..=latest as i32).collect();
    assert_eq!(recorded_versions(config).await, want);
    // A store opens on it without migrating.
    let mut no_migrate = config.clone();
    no_migrate.storage.migrate_on_start = false;
    let store = crate::build_store(&no_migrate).await.unwrap();
    assert!(matches!(
        store.last_seq("none").await,
        Err(StorageError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_schema_behind_is_refused_without_migrate_on_start() {
    let factory = ScyllaFactory::new();
    let mut config = factory.config.clone();
    config.storage.migrate_on_start = false;
    let err = ScyllaStore::open(&config)
        .await
        .err()
        .expect("an empty keyspace is behind");
    assert!(
        matches!(err, OpenError::SchemaBehind { current: 0, .. }),
        "{err}"
    );
    assert!(!err.is_transient());
    assert!(err.to_string().contains("switchboard migrate"), "{err}");
    // The service refuses to start on it, with the same message.
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let served = crate::serve(
        Arc::new(config),
        grpc,
        admin,
        crate::tests::peers(),
        CancellationToken::new(),
    )
    .await;
    let err = served.expect_err("refused");
    assert!(err.to_string().contains("switchboard migrate"), "{err}");
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let factory = ScyllaFactory::new();
    let config = &factory.config;
    crate::migrate(config).await.unwrap();
    let session = connect(config, None).await.unwrap();
    session
        .query_unpaged(
            format!(
                "INSERT INTO {}.schema_version (version, applied_at_ms) VALUES (?, 0)",
                config.storage.scylla_keyspace
            ),
            (schema::latest_version() as i32 + 1,),
        )
        .await
        .unwrap();
    let err = ScyllaStore::open(config)
        .await
        .err()
        .expect("newer refused");
    assert!(matches!(err, OpenError::SchemaNewer { .. }), "{err}");
}

#[tokio::test]
async fn an_unreachable_server_is_a_transient_open_error() {
    let mut config = test_config();
    // Nothing listens on a port just released.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    config.storage.scylla_nodes = format!("127.0.0.1:{port}");
    let err = ScyllaStore::open(&config).await.err().expect("unreachable");
    assert!(err.is_transient(), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

/// What an earlier version of this store left after an append that crashed right
/// after its conditional commit: `last_seq = m.seq` with the message in
/// `pending_message`, no row. Returns whether the commit applied.
pub(crate) async fn legacy_commit(store: &ScyllaStore, m: &Message) -> bool {
    let ks = store
        .st
        .conv_select
        .get_keyspace_name()
        .expect("prepared against a keyspace")
        .to_owned();
    let seq = seq_i64(m.seq);
    let cql = format!(
        "UPDATE {ks}.conversations SET last_seq = ?, updated_at_ms = ?, pending_seq = ?, \
         pending_message = ? WHERE conversation_id = ? IF last_seq = ?"
    );
    let prepared = store.session.prepare(cql).await.unwrap();
    store
        .lwt(
            &prepared,
            (
                seq,
                m.sent_at_ms,
                seq,
                m.encode_to_vec(),
                m.conversation_id.as_str(),
                seq - 1,
            ),
        )
        .await
        .unwrap()
        .applied
}

/// The crash points of an append (see `append.rs`), replayed: keys written but no
/// row, rows written but no head, a whole batch written again by a second writer
/// (a paused former partition owner) after the first moved on, and a commit left by
/// an earlier version of this store.
#[tokio::test]
async fn interrupted_appends_converge() {
    let factory = ScyllaFactory::new();
    let store = factory.store().await;
    let h = Harness::over(Arc::new(factory.store().await), 200);
    let id = h.direct("alice", "bob").await.conversation_id;
    h.fill(&id, "alice", 2).await;
    let record = |seq: u64, sender: &str, key: &str| Message {
        message_id: format!("m{seq}-{key}"),
        sent_at_ms: T_NOW,
        ..crate::conformance::message(&id, seq, sender, key)
    };

    // Keys written, then a crash before the rows: the same batch again stores it
    // at the same sequences (the key names no stored row: not a duplicate).
    let (m3, m4) = (record(3, "alice", "k3"), record(4, "bob", "k4"));
    store.write_key(&m3, 3600, T_NOW).await.unwrap();
    store.write_key(&m4, 3600, T_NOW).await.unwrap();
    assert_eq!(h.lookup("alice", "k3").await, None);
    let again = store
        .append_batch(vec![m3.clone(), m4.clone()], 3, T_NOW - WINDOW_MS, T_NOW)
        .await
        .unwrap();
    let answered: Vec<(u64, bool)> = again.iter().map(|a| (a.message.seq, a.duplicate)).collect();
    assert_eq!(answered, [(3, false), (4, false)]);

    // Rows written, then a crash before the head: LastSeq (a new owner) finds
    // them and moves the head; the replayed record is found stored.
    let (m5, m6) = (record(5, "alice", "k5"), record(6, "alice", "k6"));
    store.write_key(&m5, 3600, T_NOW).await.unwrap();
    store.write_key(&m6, 3600, T_NOW).await.unwrap();
    store.write_rows(&[&m5, &m6]).await.unwrap();
    assert_eq!(store.head_row(&id).await.unwrap(), Some(4));
    assert_eq!(h.last_seq(&id).await, 6);
    assert_eq!(store.head_row(&id).await.unwrap(), Some(6));
    let replay = store
        .append_batch(vec![m6.clone()], 7, T_NOW - WINDOW_MS, T_NOW)
        .await
        .unwrap();
    assert!(replay[0].duplicate);
    assert_eq!(replay[0].message, m6);

    // A second writer replaying records 3..=6 (a former owner that was paused)
    // after the conversation moved on: it finds every record placed, writes
    // nothing new, and the head stays.
    h.fill(&id, "bob", 2).await;
    let late = store
        .append_batch(
            vec![m3.clone(), m4.clone(), m5.clone(), m6.clone()],
            3,
            T_NOW - WINDOW_MS,
            T_NOW,
        )
        .await
        .unwrap();
    let answered: Vec<(u64, bool)> = late.iter().map(|a| (a.message.seq, a.duplicate)).collect();
    assert_eq!(answered, [(3, false), (4, false), (5, false), (6, false)]);
    assert_eq!(h.last_seq(&id).await, 8);
    // A different record offered a taken sequence is a conflict, not a second
    // message, and writes nothing.
    let conflict = store
        .append(record(6, "bob", "other"), T_NOW - WINDOW_MS, T_NOW)
        .await
        .unwrap_err();
    assert!(
        matches!(
            conflict,
            StorageError::SequenceConflict {
                expected: 9,
                got: 6,
                ..
            }
        ),
        "{conflict:?}"
    );
    assert_eq!(h.lookup("bob", "other").await, None);

    assert!(!h.append(&id, 9, "alice", "k9").await.unwrap().duplicate);

    // Committed by an earlier version of this store, never written: LastSeq writes
    // it before answering, and the next append continues after it.
    let old = h.direct("carol", "dave").await.conversation_id;
    let legacy = Message {
        message_id: "legacy".into(),
        sent_at_ms: T_NOW,
        ..crate::conformance::message(&old, 1, "carol", "")
    };
    assert!(legacy_commit(&store, &legacy).await);
    assert_eq!(store.load_message(&old, 1).await.unwrap(), None);
    assert_eq!(h.last_seq(&old).await, 1);
    assert_eq!(store.load_message(&old, 1).await.unwrap(), Some(legacy));
    assert!(!h.append(&old, 2, "dave", "d2").await.unwrap().duplicate);
    assert_eq!(h.last_seq(&old).await, 2);

    let page = h.history("bob", &id, 0, "forward", 0).await.unwrap();
    let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=9).collect::<Vec<_>>());
}

/// Concurrent writers of one conversation row go through its conditional updates:
/// one direct conversation per pair, every membership change kept (with the count),
/// read markers ending at the highest value.
#[tokio::test]
async fn concurrent_changes_serialize_through_conditional_updates() {
    let factory = ScyllaFactory::new();
    let store = Arc::new(factory.store().await);
    let h = Harness::over(store.clone(), 200);

    let creates: Vec<_> = (0..6)
        .map(|i| {
            let svc = Arc::clone(&h.svc);
            let (a, b) = if i % 2 == 0 {
                ("ann", "ben")
            } else {
                ("ben", "ann")
            };
            tokio::spawn(async move {
                svc.create_conversation(switchboard_proto::CreateConversationRequest {
                    creator_id: a.into(),
                    kind: "direct".into(),
                    members: vec![b.into()],
                    name: String::new(),
                })
                .await
                .map(|c| c.conversation_id)
            })
        })
        .collect();
    let mut ids = Vec::new();
    for create in creates {
        ids.push(create.await.unwrap().unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one conversation per pair: {ids:?}");

    let group = h.group("owner", &[], "busy").await.conversation_id;
    let adds: Vec<_> = (0..5)
        .map(|i| {
            let svc = Arc::clone(&h.svc);
            let group = group.clone();
            tokio::spawn(async move {
                svc.change_members(switchboard_proto::ChangeMembersRequest {
                    conversation_id: group,
                    actor_id: "owner".into(),
                    action: "add".into(),
                    user_ids: vec![format!("u{i}"), "shared".into()],
                })
                .await
            })
        })
        .collect();
    for add in adds {
        add.await.unwrap().unwrap();
    }
    let members = h.get(&group, "").await.unwrap().members;
    assert_eq!(members, ["owner", "shared", "u0", "u1", "u2", "u3", "u4"]);
    let row = store.conv_row(&group, true).await.unwrap().unwrap();
    assert_eq!(row.member_count, 7);
    assert_eq!(row.applied_members_version, row.members_version);

    h.fill(&group, "owner", 9).await;
    let reads: Vec<_> = (1..=9)
        .map(|seq| {
            let svc = Arc::clone(&h.svc);
            let group = group.clone();
            tokio::spawn(async move {
                svc.set_read_marker(switchboard_proto::SetReadMarkerRequest {
                    conversation_id: group,
                    user_id: "u0".into(),
                    seq,
                    ..Default::default()
                })
                .await
            })
        })
        .collect();
    for read in reads {
        read.await.unwrap().unwrap();
    }
    assert_eq!(h.read(&group, "u0", 1).await.unwrap(), 9);
}

/// The harness clock's start, so that claims made here count as live for it.
const T_NOW: i64 = 1_700_000_000_000;

#[tokio::test]
async fn history_pages_cross_bucket_boundaries() {
    let factory = ScyllaFactory::new();
    let store = factory.store().await;
    let h = Harness::over(Arc::new(factory.store().await), 200);
    let id = h.direct("alice", "bob").await.conversation_id;
    // Sequences 990..=1010 straddle buckets 0 and 1; write them directly (the commit
    // path is covered elsewhere) and move last_seq there.
    for seq in 990..=1010u64 {
        let mut m = crate::conformance::message(&id, seq, "alice", "");
        m.message_id = format!("m{seq}");
        store.write_message(&m).await.unwrap();
    }
    store.write_head(&id, 1010, 1).await.unwrap();
    let seqs = |r: &HistoryResult| r.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
    let newest = h.history("bob", &id, 0, "", 15).await.unwrap();
    assert_eq!(seqs(&newest), (996..=1010).collect::<Vec<_>>());
    assert!(newest.has_more);
    let older = h.history("bob", &id, 1003, "backward", 10).await.unwrap();
    assert_eq!(seqs(&older), (993..=1002).collect::<Vec<_>>());
    let forward = h.history("bob", &id, 995, "forward", 10).await.unwrap();
    assert_eq!(seqs(&forward), (996..=1005).collect::<Vec<_>>());
    let to_end = h.history("bob", &id, 998, "forward", 50).await.unwrap();
    assert_eq!(seqs(&to_end), (999..=1010).collect::<Vec<_>>());
    assert!(!to_end.has_more);
}

// ----------------------------------------------------------------- faults

/// A TCP proxy in front of the test server that can be taken down (connections cut,
/// port refusing) and brought back on the same port.
struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    stop: Option<CancellationToken>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let mut proxy = Proxy {
            addr: "127.0.0.1:0".parse().unwrap(),
            upstream,
            stop: None,
        };
        proxy.up().await;
        proxy
    }

    async fn up(&mut self) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(self.addr).unwrap();
        let listener = socket.listen(64).unwrap();
        self.addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let (upstream, accept_stop) = (self.upstream, stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = accept_stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => return,
                    },
                };
                let conn_stop = accept_stop.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let mut client = client;
                    tokio::select! {
                        _ = conn_stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        self.stop = Some(stop);
    }

    fn down(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.cancel();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.down();
    }
}

async fn resolve(node: &str) -> SocketAddr {
    tokio::net::lookup_host(node)
        .await
        .unwrap()
        .next()
        .expect("test node address")
}

/// What the server calls itself (the address the driver connects to after discovery).
async fn advertised_address(config: &Config) -> SocketAddr {
    let session = connect(config, None)
        .await
        .unwrap_or_else(|e| panic!("{}", unreachable_hint(&e)));
    let result = session
        .query_unpaged(
            "SELECT rpc_address, rpc_port FROM system.local WHERE key = 'local'",
            (),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap();
    let (ip, port) = result.first_row::<(std::net::IpAddr, i32)>().unwrap();
    SocketAddr::new(ip, port as u16)
}

#[tokio::test]
async fn a_lost_server_fails_calls_fast_and_recovery_is_automatic() {
    let factory = ScyllaFactory::new();
    let config = factory.config.clone();
    drop(factory.store().await); // migrate through the direct route
    let node = advertised_address(&config).await;
    let mut proxy = Proxy::start(resolve(&test_nodes()).await).await;
    let mut via_proxy = config.clone();
    via_proxy.storage.scylla_nodes = proxy.addr.to_string();
    // The driver knows the node by its advertised address (from `system.peers`) or by
    // the contact point it reached it through: both go through the proxy.
    let translator: HashMap<SocketAddr, SocketAddr> =
        [(node, proxy.addr), (proxy.addr, proxy.addr)].into();
    let store = ScyllaStore::open_with(&via_proxy, Some(Arc::new(translator)))
        .await
        .unwrap_or_else(|e| panic!("{}", unreachable_hint(&e)));
    let h = Harness::over(Arc::new(store), 200);
    let id = h.direct("alice", "bob").await.conversation_id;
    h.fill(&id, "alice", 1).await;

    proxy.down();
    let started = Instant::now();
    let lost = h.append(&id, 2, "alice", "during-outage").await;
    let waited = started.elapsed();
    assert_eq!(
        lost.as_ref().map_err(StorageError::code).err(),
        Some(ErrorCode::Unavailable),
        "{lost:?}"
    );
    eprintln!("append during the outage failed after {waited:?}");
    let read = h.history("bob", &id, 0, "", 0).await;
    assert_eq!(
        read.map_err(|e| e.code()).err(),
        Some(ErrorCode::Unavailable)
    );

    proxy.up().await;
    // The driver reconnects by itself; the partition owner's retry then succeeds.
    let deadline = Instant::now() + Duration::from_secs(60);
    let appended = loop {
        match h.append(&id, 2, "alice", "during-outage").await {
            Ok(done) => break done,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.code(), ErrorCode::Unavailable, "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no recovery within a minute: {e}"),
        }
    };
    assert_eq!(appended.message.map(|m| m.seq), Some(2));
    assert_eq!(h.last_seq(&id).await, 2);
}

async fn http_status(addr: SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out[9..12].parse().unwrap()
}

#[tokio::test]
async fn the_service_waits_for_an_unreachable_server_and_becomes_ready_when_it_answers() {
    let factory = ScyllaFactory::new();
    let mut proxy = Proxy::start(resolve(&test_nodes()).await).await;
    proxy.down();
    let mut config = factory.config.clone();
    config.storage.scylla_nodes = proxy.addr.to_string();

    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(crate::serve(
        Arc::new(config),
        grpc,
        admin,
        crate::tests::peers(),
        shutdown.clone(),
    ));
    // Admin endpoints answer while the store is being waited for: alive, not ready.
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(admin_addr).await.is_err() {
        assert!(Instant::now() < deadline, "admin endpoint never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(http_status(admin_addr, "/healthz").await, 200);
    assert_eq!(http_status(admin_addr, "/readyz").await, 503);
    assert!(!server.is_finished(), "an unreachable server is retried");

    proxy.up().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_status(admin_addr, "/readyz").await != 200 {
        assert!(Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_while_waiting_for_the_server_returns() {
    let mut config = test_config();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    config.storage.scylla_nodes = format!("127.0.0.1:{port}");
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(crate::serve(
        Arc::new(config),
        grpc,
        admin,
        crate::tests::peers(),
        shutdown.clone(),
    ));
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

// ----------------------------------------------------------------- figures

/// Not a test of behaviour: prints append and history latencies against the test
/// server. `cargo test -p switchboard-storage --lib scylla::tests::latency_figures
/// -- --ignored --nocapture`
#[tokio::test]
#[ignore]
async fn latency_figures() {
    const APPENDS: u64 = 1000;
    const PAGES: usize = 300;
    let factory = ScyllaFactory::new();
    let h = Harness::over(factory.open().await, 200);
    let id = h.direct("alice", "bob").await.conversation_id;
    let mut append_us = Vec::with_capacity(APPENDS as usize);
    for seq in 1..=APPENDS {
        let started = Instant::now();
        h.append(&id, seq, "alice", &format!("lat-{seq}"))
            .await
            .unwrap();
        append_us.push(started.elapsed().as_micros() as u64);
    }
    let mut page_us = Vec::with_capacity(PAGES);
    for i in 0..PAGES {
        // Newest page, and pages further back (some crossing a bucket boundary).
        let from = if i % 2 == 0 {
            0
        } else {
            1 + (i as u64 * 7) % APPENDS
        };
        let started = Instant::now();
        let page = h.history("bob", &id, from, "backward", 50).await.unwrap();
        page_us.push(started.elapsed().as_micros() as u64);
        assert!(!page.messages.is_empty() || from <= 1);
    }
    let pct = |v: &mut Vec<u64>, p: f64| {
        v.sort_unstable();
        v[((v.len() as f64 * p).ceil() as usize).saturating_sub(1)] as f64 / 1000.0
    };
    eprintln!(
        "append (keyed, through the service): n={APPENDS} p50={:.2} ms p99={:.2} ms",
        pct(&mut append_us, 0.50),
        pct(&mut append_us, 0.99)
    );
    eprintln!(
        "history page of 50 (membership check + page): n={PAGES} p50={:.2} ms p99={:.2} ms",
        pct(&mut page_us, 0.50),
        pct(&mut page_us, 0.99)
    );
}

/// Whether `keyspace`'s migration lock row exists.
async fn migration_locked(session: &Session, keyspace: &str) -> bool {
    session
        .query_unpaged(
            format!("SELECT holder FROM {keyspace}.migration_lock WHERE name = 'schema'"),
            (),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .rows_num()
        > 0
}

#[tokio::test]
async fn concurrent_migrations_of_a_keyspace_all_succeed_and_give_the_lock_back() {
    let factory = ScyllaFactory::new();
    let config = &factory.config;
    let latest = schema::latest_version();
    let (a, b, c) = tokio::join!(
        crate::migrate(config),
        crate::migrate(config),
        crate::migrate(config)
    );
    for result in [a, b, c] {
        assert_eq!(
            result.unwrap_or_else(|e| panic!("{}", unreachable_hint(&e))),
            latest
        );
    }
    let want: Vec<i32> = (1..=latest as i32).collect();
    assert_eq!(recorded_versions(config).await, want, "each migration once");
    let session = connect(config, None).await.unwrap();
    assert!(
        !migration_locked(&session, &config.storage.scylla_keyspace).await,
        "the lock is given back"
    );
}

#[tokio::test]
async fn a_held_migration_lock_makes_migrate_wait_for_it() {
    let factory = ScyllaFactory::new();
    let config = &factory.config;
    let keyspace = config.storage.scylla_keyspace.clone();
    crate::migrate(config)
        .await
        .unwrap_or_else(|e| panic!("{}", unreachable_hint(&e)));
    let session = connect(config, None).await.unwrap();
    let take = format!(
        "INSERT INTO {keyspace}.migration_lock (name, holder, acquired_at_ms) \
         VALUES ('schema', 'the other migrator', 0) USING TTL 60"
    );
    session.query_unpaged(take.clone(), ()).await.unwrap();

    // Held for longer than the wait: refused, naming the holder.
    let err = migrate_session_waiting(&session, config, Duration::from_secs(1))
        .await
        .expect_err("the lock is held");
    assert!(err.to_string().contains("the other migrator"), "{err}");
    assert!(
        migration_locked(&session, &keyspace).await,
        "not taken from its holder"
    );

    // Given back while waiting: the migration goes on.
    let release = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        session
            .query_unpaged(
                format!("DELETE FROM {keyspace}.migration_lock WHERE name = 'schema'"),
                (),
            )
            .await
            .unwrap();
    };
    let (migrated, ()) = tokio::join!(
        migrate_session_waiting(&session, config, Duration::from_secs(20)),
        release
    );
    assert_eq!(migrated.unwrap(), schema::latest_version());
    assert!(!migration_locked(&session, &keyspace).await);
}
