//! The four services as separate processes on the TLS listeners of the real servers
//! that `deploy/local/up.sh` opens next to the plain ones: Redis over `rediss://` with
//! an ACL user, Kafka over SASL_SSL with SCRAM-SHA-512, the CQL server over TLS; the
//! CA from `.local/tls` and every password from a file, as a mounted Secret gives it.
//! Addresses: `SB_TEST_REDIS_TLS_URL` (default `rediss://127.0.0.1:6380`),
//! `SB_TEST_KAFKA_SASL_SSL_BROKERS` (`127.0.0.1:9094`), `SB_TEST_SCYLLA_TLS_NODES`
//! (`127.0.0.1:9042`), `SB_TEST_TLS_DIR` (`<repo>/.local/tls`).

mod common;

use std::time::Duration;

use common::*;
use switchboard_client::{Direction, Event};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn require(what: &str, addr: &str) {
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map(|mut a| {
            a.any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
        })
        .unwrap_or(false);
    assert!(
        reachable,
        "{what} is not reachable at {addr}: start the local servers with their TLS listeners \
         with `deploy/local/up.sh`"
    );
}

/// The real backends, then their TLS listeners and credentials on top.
fn tls_setup() -> Setup {
    let mut setup = Setup::new(true);
    setup.real_backends();
    let ca = tls_file("ca.pem");
    let redis = env_or("SB_TEST_REDIS_TLS_URL", "rediss://127.0.0.1:6380");
    let kafka = env_or("SB_TEST_KAFKA_SASL_SSL_BROKERS", "127.0.0.1:9094");
    let scylla = env_or("SB_TEST_SCYLLA_TLS_NODES", "127.0.0.1:9042");
    require("Redis (TLS)", redis.trim_start_matches("rediss://"));
    require(
        "Kafka (SASL_SSL)",
        kafka.split(',').next().unwrap_or_default(),
    );
    require(
        "the CQL server",
        scylla.split(',').next().unwrap_or_default(),
    );

    let write = |name: &str, var: &str| {
        let path = setup.data_dir().join(name);
        std::fs::write(&path, format!("{}\n", env_or(var, "sbtls-local-password")))
            .expect("write password file");
        path.display().to_string()
    };
    let redis_password = write("redis-password", "SB_TEST_REDIS_TLS_PASSWORD");
    let kafka_password = write("kafka-password", "SB_TEST_KAFKA_SASL_PASSWORD");
    for (k, v) in [
        ("SWITCHBOARD_PRESENCE__REDIS_URL", redis),
        (
            "SWITCHBOARD_PRESENCE__REDIS_USERNAME",
            env_or("SB_TEST_REDIS_TLS_USER", "sbtls"),
        ),
        ("SWITCHBOARD_PRESENCE__REDIS_PASSWORD_FILE", redis_password),
        ("SWITCHBOARD_PRESENCE__REDIS_CA_FILE", ca.clone()),
        ("SWITCHBOARD_ROUTING__KAFKA_BROKERS", kafka),
        (
            "SWITCHBOARD_ROUTING__KAFKA_SECURITY_PROTOCOL",
            "sasl_ssl".into(),
        ),
        (
            "SWITCHBOARD_ROUTING__KAFKA_SASL_MECHANISM",
            "SCRAM-SHA-512".into(),
        ),
        (
            "SWITCHBOARD_ROUTING__KAFKA_SASL_USERNAME",
            env_or("SB_TEST_KAFKA_SASL_USER", "sbtls"),
        ),
        (
            "SWITCHBOARD_ROUTING__KAFKA_SASL_PASSWORD_FILE",
            kafka_password,
        ),
        ("SWITCHBOARD_ROUTING__KAFKA_SSL_CA_FILE", ca.clone()),
        ("SWITCHBOARD_STORAGE__SCYLLA_NODES", scylla),
        ("SWITCHBOARD_STORAGE__SCYLLA_TLS", "true".into()),
        ("SWITCHBOARD_STORAGE__SCYLLA_CA_FILE", ca),
    ] {
        setup.set(k, &v);
    }
    setup
}

#[tokio::test]
async fn messages_flow_through_redis_kafka_and_cql_over_tls() {
    // A broker that has just started creates its consumer-offsets topic on the first
    // group join, which can outlast the default wait for a sequence: wait longer, so
    // every ack below carries its sequence.
    let s = tls_setup()
        .start_services(&[(
            "SWITCHBOARD_ROUTING__SEQUENCE_WAIT_MS".into(),
            "30000".into(),
        )])
        .await;
    let setup = &s.setup;

    let (alice, mut alice_ev) = setup.connect("alice", "phone").await;
    let (bob, mut bob_ev) = setup.connect("bob", "phone").await;
    // Presence state written and read through Redis over TLS.
    let watch = bob.presence_watch(["alice"]).await.unwrap();
    assert_eq!(watch.users[0].status, "online");

    // Sequenced through Kafka over SASL_SSL, stored through CQL over TLS.
    let conv = alice.create_direct("bob").await.unwrap();
    let id = conv.conversation_id.clone();
    for i in 1..=10u64 {
        let ack = alice.send(&id, &format!("tls {i}")).await.unwrap();
        assert_eq!(ack.seq, i);
    }
    for events in [&mut bob_ev, &mut alice_ev] {
        let got = messages(events, &id, 10).await;
        assert_eq!(
            got.iter().map(|m| m.seq).collect::<Vec<_>>(),
            (1..=10).collect::<Vec<_>>()
        );
    }
    // Read back from CQL over TLS (persisting may trail delivery: poll until stored).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let page = bob
            .history(&id, 0, Direction::Forward, 20)
            .await
            .expect("history over tls");
        if page.messages.len() == 10 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "history holds {} of 10 messages",
            page.messages.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    alice.close().await;
    next_matching(&mut bob_ev, "alice offline", |ev| match ev {
        Event::Presence(p) if p.user_id == "alice" && p.status == "offline" => Some(()),
        _ => None,
    })
    .await;
}
