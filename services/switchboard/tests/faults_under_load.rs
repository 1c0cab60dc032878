//! The delivery contract under faults, judged by the load harness: the four services
//! as separate processes on Redis, Kafka and the CQL server (`deploy/local/up.sh`),
//! two gateways, 32 sessions (16 users with 2 devices) in direct and group
//! conversations sending on an open-loop schedule (a send of unknown outcome retried
//! with the same id, as a client would), and one fault in the middle of the traffic. The harness checks every delivery (a session that stayed connected
//! gets every message live or syncs after a `resync`; one that reconnected recovers
//! by sync) and writes its ledger of sends, which is then checked against storage.
//! Every run must end with nothing lost, duplicated, reordered or skipped unannounced,
//! every accepted message stored once at its acked sequence.
//!
//! The runs take turns (one lock): each is a cluster plus the harness on a 2-core
//! machine, and two of them restart the shared Kafka and CQL server.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use switchboard_load::acklog;
use switchboard_load::report;
use switchboard_load::runner::{self, RunOptions};
use switchboard_load::scenario::Scenario;

/// One run at a time in this test binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The traffic: 30 messages/s for 10 s over 4 direct and 2 group conversations.
const SCENARIO: &str = r#"
name = "faults"
description = "Traffic across one fault"

[users]
count = 16
devices = 2
connect_rate = 100

[[conversations]]
kind = "direct"
count = 4

[[conversations]]
kind = "group"
count = 2
size = 4

[load]
rate = 30
body_bytes = 64
warmup = "1s"
duration = "10s"
drain = "90s"
retry_for = "120s"
read_fraction = 0.1
typing_fraction = 0.05
"#;

/// When the fault starts, after the harness started (connects, conversations and the
/// warmup take about 2 s), and how long the outage lasts.
const FAULT_AT: Duration = Duration::from_secs(4);
/// When the early freeze starts: the sessions are connected, no message has reached
/// them yet.
const EARLY_FAULT_AT: Duration = Duration::from_secs(1);
const OUTAGE: Duration = Duration::from_secs(3);
/// How long the early freeze lasts. A Deliver batch fails for good only when all
/// its attempts (3 of `SHORT_RPC_TIMEOUT_MS` plus backoff, about 2.6 s) fall inside
/// the freeze, and the first message to the frozen gateway's sessions may come
/// seconds after the freeze began (the harness still creates conversations and
/// warms up): with a 3 s freeze a slow start lets every batch succeed on its last
/// attempt after the resume, and nobody is told to resync.
const EARLY_OUTAGE: Duration = Duration::from_secs(7);

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillPresence,
    StopPresence,
    KillRedis,
    ShutDownRedis,
    /// The second gateway frozen (SIGSTOP) long enough for routing's Deliver calls to
    /// it to fail every attempt, then resumed.
    FreezeGateway,
    /// The same freeze before any message reached the gateway's sessions: the gateway
    /// cannot see a gap on a connection that had no message yet, so only routing's
    /// `resync` announces what they missed.
    FreezeGatewayEarly,
    KillGateway,
    KillRouting,
    KillStorage,
    RestartKafka,
    RestartCassandra,
}

/// Routing's timeout of one internal call in the frozen-gateway run: short, so that
/// a Deliver batch fails all its attempts within the outage.
const SHORT_RPC_TIMEOUT_MS: &str = "800";

/// A cluster with a second gateway and, for the Redis faults, a Redis of its own.
struct Cluster {
    s: Services,
    second: GatewayPorts,
    gateway2: Proc,
    redis: Option<(Proc, u16)>,
}

impl Cluster {
    async fn start(fault: Fault) -> Cluster {
        let mut setup = Setup::new(true);
        setup.real_backends();
        let redis = match fault {
            Fault::KillRedis | Fault::ShutDownRedis => {
                let port = free_port();
                let redis = spawn_redis(&setup, port);
                wait_redis(port).await;
                setup.set(
                    "SWITCHBOARD_PRESENCE__REDIS_URL",
                    &format!("redis://127.0.0.1:{port}"),
                );
                Some((redis, port))
            }
            _ => None,
        };
        let routing_env = match fault {
            Fault::FreezeGateway | Fault::FreezeGatewayEarly => vec![(
                "SWITCHBOARD_CLUSTER__RPC_TIMEOUT_MS".to_owned(),
                SHORT_RPC_TIMEOUT_MS.to_owned(),
            )],
            _ => Vec::new(),
        };
        let s = setup.start_services(&routing_env).await;
        let second = GatewayPorts::new();
        let gateway2 = s.setup.spawn_gateway(&second).await;
        Cluster {
            s,
            second,
            gateway2,
            redis,
        }
    }

    /// Apply `fault` and, after the outage, repair it.
    async fn inflict(&mut self, fault: Fault) {
        let setup = &self.s.setup;
        match fault {
            Fault::KillPresence | Fault::StopPresence => {
                if matches!(fault, Fault::KillPresence) {
                    self.s.presence.kill9();
                } else {
                    let stopped = self.s.presence.terminate(Duration::from_secs(10));
                    assert!(stopped.is_some(), "presence stops on SIGTERM");
                }
                tokio::time::sleep(OUTAGE).await;
                self.s.presence = setup.spawn_ready("presence", &[]).await;
            }
            Fault::KillRedis | Fault::ShutDownRedis => {
                let (redis, port) = self.redis.as_mut().expect("a Redis of the test's own");
                let port = *port;
                if matches!(fault, Fault::KillRedis) {
                    redis.kill9();
                } else {
                    shut_down_redis(redis, port);
                }
                tokio::time::sleep(OUTAGE).await;
                // Back without its data: presence forgot every session.
                *redis = spawn_redis(setup, port);
                wait_redis(port).await;
            }
            Fault::FreezeGateway | Fault::FreezeGatewayEarly => {
                self.gateway2.pause();
                let outage = match fault {
                    Fault::FreezeGatewayEarly => EARLY_OUTAGE,
                    _ => OUTAGE,
                };
                tokio::time::sleep(outage).await;
                self.gateway2.resume();
            }
            Fault::KillGateway => {
                self.gateway2.kill9();
                tokio::time::sleep(OUTAGE).await;
                self.gateway2 = setup.spawn_gateway(&self.second).await;
            }
            Fault::KillRouting => {
                self.s.routing.kill9();
                tokio::time::sleep(OUTAGE).await;
                self.s.routing = setup.spawn_ready("routing", &[]).await;
            }
            Fault::KillStorage => {
                self.s.storage.kill9();
                tokio::time::sleep(OUTAGE).await;
                self.s.storage = setup.spawn_ready("storage", &[]).await;
            }
            Fault::RestartKafka => restart_local_server("kafka").await,
            Fault::RestartCassandra => restart_local_server("cassandra").await,
        }
    }

    fn logs(&self) -> String {
        let tail = |name: &str, p: &Proc| {
            let out = p.output();
            let lines: Vec<&str> = out.lines().rev().take(30).collect();
            let lines: Vec<&str> = lines.into_iter().rev().collect();
            format!("--- {name}\n{}\n", lines.join("\n"))
        };
        [
            tail("storage", &self.s.storage),
            tail("presence", &self.s.presence),
            tail("routing", &self.s.routing),
            tail("gateway 1", &self.s.gateway),
            tail("gateway 2", &self.gateway2),
        ]
        .concat()
    }
}

/// Stop one of `deploy/local/up.sh`'s servers gracefully and start it again with
/// its data (the script waits until it answers).
async fn restart_local_server(name: &'static str) {
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/local");
    tokio::task::spawn_blocking(move || {
        for script in ["down.sh", "up.sh"] {
            let status = std::process::Command::new(scripts.join(script))
                .arg(name)
                .status()
                .unwrap_or_else(|e| panic!("run deploy/local/{script}: {e}"));
            assert!(status.success(), "deploy/local/{script} {name} failed");
        }
    })
    .await
    .expect("restart task");
}

/// Run the scenario against the cluster with `fault` in the middle; assert the
/// harness's verdict and the ledger's check against storage. Returns the report.
async fn under_load(fault: Fault) -> report::Report {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(fault).await;
    let mut scenario = Scenario::parse(SCENARIO).expect("scenario");
    let urls = vec![cluster.s.setup.gateway.ws_url(), cluster.second.ws_url()];
    scenario.target.urls = urls.clone();
    let ledger: PathBuf = cluster.s.setup.data_dir().join("ledger.jsonl");
    let signer = || switchboard_auth::Signer::hs256(SECRET.as_bytes());
    let options = RunOptions {
        scenario,
        agent_index: 0,
        agent_count: 1,
        server_pid: None,
        progress: false,
        ledger: Some(ledger.clone()),
    };
    let run = tokio::spawn(runner::run(options, signer()));
    tokio::time::sleep(match fault {
        Fault::FreezeGatewayEarly => EARLY_FAULT_AT,
        _ => FAULT_AT,
    })
    .await;
    cluster.inflict(fault).await;
    let raw = run
        .await
        .expect("the harness task")
        .unwrap_or_else(|e| panic!("{fault:?}: the harness failed: {e:#}\n{}", cluster.logs()));
    let built = report::build(&raw).expect("report");
    let r = built.report;
    let text = report::render_text(&r);
    let k = &r.correctness;
    assert!(
        k.violations().is_empty(),
        "{fault:?}: contract violated: {:?}\n{text}\n{}",
        k.violations(),
        cluster.logs()
    );
    assert!(k.expected > 0, "{fault:?}: no traffic\n{text}");
    assert_eq!(
        k.delivered + k.recovered,
        k.expected,
        "{fault:?}: every expected delivery arrived\n{text}"
    );
    assert_eq!(
        k.sessions_offline_at_end, 0,
        "{fault:?}: every session is connected at the end\n{text}"
    );
    assert!(
        r.totals.accepted >= 200,
        "{fault:?}: the traffic went on across the fault\n{text}"
    );

    let check = acklog::check(&ledger, &urls[0], &signer())
        .await
        .expect("check the ledger against storage");
    assert!(
        !check.violated(),
        "{fault:?}: the ledger disagrees with storage: {check:?}\n{text}"
    );
    assert_eq!(
        check.accepted, r.totals.accepted,
        "{fault:?}: every ack is in the ledger"
    );
    eprintln!("{fault:?}:\n{text}\nledger check: {check:?}");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_killed_under_load_loses_nothing() {
    under_load(Fault::KillPresence).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_restarted_gracefully_under_load_loses_nothing() {
    under_load(Fault::StopPresence).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_back_empty_under_load_loses_nothing() {
    let r = under_load(Fault::KillRedis).await;
    // Presence lost every session: the gateways registered them again and told them.
    assert!(r.totals.resyncs > 0, "sessions were told to resync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_shut_down_and_back_empty_under_load_loses_nothing() {
    let r = under_load(Fault::ShutDownRedis).await;
    assert!(r.totals.resyncs > 0, "sessions were told to resync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_deliver_fails_for_a_while_loses_nothing() {
    let r = under_load(Fault::FreezeGateway).await;
    // Deliveries to the frozen gateway failed: its sessions were told to resync (by
    // routing, or by their gateway seeing the gap) and recovered by sync.
    assert!(r.totals.resyncs > 0, "sessions were told to resync");
    assert!(r.correctness.recovered > 0, "missed messages were synced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_frozen_before_its_sessions_had_traffic_loses_nothing() {
    let r = under_load(Fault::FreezeGatewayEarly).await;
    // Routing's `resync` is the only notice; live deliveries may overtake the sync it
    // asked for, and the sync brings back everything missed.
    assert!(r.totals.resyncs > 0, "sessions were told to resync");
    assert!(r.correctness.recovered > 0, "missed messages were synced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_under_load_loses_nothing() {
    let r = under_load(Fault::KillGateway).await;
    assert!(r.totals.reconnects > 0, "its sessions reconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_killed_under_load_loses_nothing() {
    under_load(Fault::KillRouting).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_killed_under_load_loses_nothing() {
    under_load(Fault::KillStorage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_restarted_under_load_loses_nothing() {
    under_load(Fault::RestartKafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_restarted_under_load_loses_nothing() {
    under_load(Fault::RestartCassandra).await;
}
