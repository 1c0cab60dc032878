//! The four services as separate processes (plus a second gateway), passing messages
//! through each other over gRPC on loopback.

mod common;

use std::time::Duration;

use common::*;
use switchboard_client::{Direction, Encoding, Event};
use switchboard_proto::SyncCursor;

/// storage, presence, routing and two gateways, each its own process.
struct Cluster {
    setup: Setup,
    second: GatewayPorts,
    _storage: Proc,
    _presence: Proc,
    routing: Proc,
    gateway1: Proc,
    gateway2: Proc,
}

async fn cluster(extra: &[(&str, &str)]) -> Cluster {
    let mut setup = Setup::new(true);
    for (k, v) in extra {
        setup.set(k, v);
    }
    let storage = setup.spawn(&["storage"], &[]);
    let presence = setup.spawn(&["presence"], &[]);
    let routing = setup.spawn(&["routing"], &[]);
    let gateway1 = setup.spawn(&["gateway"], &setup.gateway.env());
    let second = GatewayPorts::new();
    let gateway2 = setup.spawn(&["gateway"], &second.env());
    // Every service's admin port answers /readyz.
    for (setting, proc) in [
        ("SWITCHBOARD_STORAGE__ADMIN_LISTEN", &storage),
        ("SWITCHBOARD_PRESENCE__ADMIN_LISTEN", &presence),
        ("SWITCHBOARD_ROUTING__ADMIN_LISTEN", &routing),
    ] {
        wait_ready(setup.port_of(setting), proc).await;
    }
    wait_ready(setup.gateway.listen, &gateway1).await;
    wait_ready(second.listen, &gateway2).await;
    Cluster {
        setup,
        second,
        _storage: storage,
        _presence: presence,
        routing,
        gateway1,
        gateway2,
    }
}

#[tokio::test]
async fn messages_pass_through_four_separate_processes_and_two_gateways() {
    let c = cluster(&[]).await;
    let alice_token = c.setup.token("alice");
    let bob_token = c.setup.token("bob");
    let (alice, mut alice_ev) =
        connect_to(&c.setup.gateway, &alice_token, "phone", Encoding::Proto).await;
    let (_alice_web, mut alice_web_ev) =
        connect_to(&c.second, &alice_token, "web", Encoding::Json).await;
    let (bob, mut bob_ev) = connect_to(&c.second, &bob_token, "phone", Encoding::Json).await;

    let conv = alice.create_direct("bob").await.unwrap();
    let id = conv.conversation_id.clone();
    for i in 1..=10 {
        let ack = alice.send(&id, &format!("across {i}")).await.unwrap();
        assert_eq!(ack.seq, i);
    }
    for events in [&mut bob_ev, &mut alice_web_ev, &mut alice_ev] {
        let got = messages(events, &id, 10).await;
        assert_eq!(
            got.iter().map(|m| m.seq).collect::<Vec<_>>(),
            (1..=10).collect::<Vec<_>>()
        );
    }
    let reply = bob.send(&id, "back across").await.unwrap();
    assert_eq!(reply.seq, 11);
    let got = messages(&mut alice_ev, &id, 1).await;
    assert_eq!(got[0].body, "back across");

    let page = bob.history(&id, 0, Direction::Backward, 50).await.unwrap();
    assert_eq!(page.messages.len(), 11);
    let sync = bob
        .sync(
            vec![SyncCursor {
                conversation_id: id.clone(),
                last_seq: 8,
            }],
            0,
        )
        .await
        .unwrap();
    assert_eq!(
        sync.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![9, 10, 11]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_delayed_by_a_paused_routing_are_not_rate_limited() {
    // 10 sends a second per user with a burst of 9; alice sends 6 a second, evenly,
    // from 6 devices, while routing is frozen. A connection has one request in
    // flight, the gateway queues the rest in order: on resume routing gets 6 sends
    // at once (in any order; the burst covers them), then the queued ones. Charged
    // when the gateway took them they are within the limit (the burst leaves room
    // for sends a loaded test machine fires late and together); charged when routing
    // resumes they would be one burst of 18, twice the burst.
    let c = cluster(&[
        ("SWITCHBOARD_ROUTING__SEND_RATE_PER_USER", "10"),
        ("SWITCHBOARD_ROUTING__SEND_BURST_PER_USER", "9"),
    ])
    .await;
    const DEVICES: u64 = 6;
    const ROUNDS: u64 = 3;
    let token = c.setup.token("alice");
    let mut clients = Vec::new();
    for d in 0..DEVICES {
        let (client, events) =
            connect_to(&c.setup.gateway, &token, &format!("d{d}"), Encoding::Json).await;
        clients.push((client, events));
    }
    let conv = clients[0].0.create_direct("bob").await.unwrap();
    let id = conv.conversation_id;

    c.routing.pause();
    let start = tokio::time::Instant::now();
    let mut sends = Vec::new();
    for round in 0..ROUNDS {
        for (d, (client, _)) in clients.iter().enumerate() {
            let due = Duration::from_millis(1000 * round + 1000 * d as u64 / DEVICES);
            let (client, id) = (client.clone(), id.clone());
            sends.push(tokio::spawn(async move {
                tokio::time::sleep_until(start + due).await;
                client.send(&id, &format!("d{d} r{round}")).await
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(1000 * ROUNDS + 500)).await;
    c.routing.resume();

    let mut seqs = Vec::new();
    for send in sends {
        let ack = send.await.unwrap();
        match ack {
            Ok(ack) => seqs.push(ack.seq),
            Err(e) => panic!("a send delayed by the paused routing failed: {e}"),
        }
    }
    seqs.sort_unstable();
    let expected: Vec<u64> = (1..=DEVICES * ROUNDS).collect();
    assert_eq!(seqs, expected, "every send acked once, gapless");
}

#[tokio::test]
async fn users_of_a_gateway_killed_without_goodbye_go_offline_by_ttl() {
    let mut c = cluster(&[
        ("SWITCHBOARD_PRESENCE__SESSION_TTL_MS", "1500"),
        ("SWITCHBOARD_GATEWAY__HEARTBEAT_INTERVAL_MS", "300"),
    ])
    .await;
    let (bob, mut bob_ev) = connect_to(&c.second, &c.setup.token("bob"), "d", Encoding::Json).await;
    let (_alice, _alice_ev) = connect_to(
        &c.setup.gateway,
        &c.setup.token("alice"),
        "d",
        Encoding::Json,
    )
    .await;
    let now = bob.presence_watch(["alice"]).await.unwrap();
    assert_eq!(now.users[0].status, "online");

    // Heartbeats keep alice online well past the TTL while her gateway lives.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let still = bob.presence_watch(["alice"]).await.unwrap();
    assert_eq!(still.users[0].status, "online");

    c.gateway1.kill9();
    let gone = next_matching(
        &mut bob_ev,
        "alice offline after her gateway died",
        |ev| match ev {
            Event::Presence(p) if p.user_id == "alice" && p.status == "offline" => Some(p.clone()),
            _ => None,
        },
    )
    .await;
    assert_eq!(gone.sessions, 0);
    assert!(gone.last_seen_ms > 0);
    assert!(c.gateway2.is_running());
}

/// A request carrying `credential` (if any) as the cluster credential.
fn with_credential<T>(message: T, credential: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(credential) = credential {
        request.metadata_mut().insert(
            "x-switchboard-cluster-credential",
            credential.parse().expect("ascii credential"),
        );
    }
    request
}

async fn grpc_channel(port: u16) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("grpc url")
        .connect()
        .await
        .expect("connect to the gRPC port")
}

#[tokio::test]
async fn internal_grpc_refuses_calls_without_the_cluster_credential() {
    use switchboard_proto::v1;
    let c = cluster(&[]).await;
    let (alice, _alice_ev) = c.setup.connect("alice", "phone").await;
    let conv = alice.create_direct("bob").await.unwrap();
    let id = conv.conversation_id.clone();
    alice.send(&id, "between alice and bob").await.unwrap();

    let mut storage = v1::storage_client::StorageClient::new(
        grpc_channel(c.setup.port_of("SWITCHBOARD_STORAGE__GRPC_LISTEN")).await,
    );
    let mut routing = v1::routing_client::RoutingClient::new(
        grpc_channel(c.setup.port_of("SWITCHBOARD_ROUTING__GRPC_LISTEN")).await,
    );
    let gateway_channel = grpc_channel(c.second.grpc).await;
    let mut gateway = v1::gateway_client::GatewayClient::new(gateway_channel.clone());
    let history = |user: &str| v1::StorageHistoryRequest {
        user_id: user.into(),
        request: Some(v1::HistoryRequest {
            conversation_id: id.clone(),
            from_seq: 0,
            direction: "backward".into(),
            limit: 50,
        }),
        webhook_id: String::new(),
    };
    let list_webhooks = || v1::ListWebhooksRequest {
        conversation_id: id.clone(),
        actor_id: "alice".into(),
    };
    let send = |client_msg_id: &str| v1::RouteSendRequest {
        sender_id: "alice".into(),
        sender_device: "phone".into(),
        conversation_id: id.clone(),
        client_msg_id: client_msg_id.into(),
        body: "in alice's name".into(),
        ..Default::default()
    };

    // Without the credential, with a wrong one of the same length and with a short one.
    let wrong = "x".repeat(CLUSTER_CREDENTIAL.len());
    for credential in [None, Some(wrong.as_str()), Some("short")] {
        let refused = [
            storage
                .history(with_credential(history(""), credential))
                .await
                .map(|_| ())
                .unwrap_err(),
            storage
                .list_webhooks(with_credential(list_webhooks(), credential))
                .await
                .map(|_| ())
                .unwrap_err(),
            routing
                .send(with_credential(send("forged"), credential))
                .await
                .map(|_| ())
                .unwrap_err(),
            gateway
                .drain(with_credential(
                    v1::DrainRequest { deadline_ms: 0 },
                    credential,
                ))
                .await
                .map(|_| ())
                .unwrap_err(),
        ];
        for status in refused {
            assert_eq!(
                status.code(),
                tonic::Code::Unauthenticated,
                "{credential:?}: {status:?}"
            );
            assert_eq!(status.message(), "missing or wrong cluster credential");
        }
    }
    // Nothing was appended under alice's name.
    let page = storage
        .history(with_credential(history("alice"), Some(CLUSTER_CREDENTIAL)))
        .await
        .expect("history with the credential")
        .into_inner();
    let bodies: Vec<&str> = page.messages.iter().map(|m| m.body.as_str()).collect();
    assert!(bodies.contains(&"between alice and bob"), "{bodies:?}");
    assert!(!bodies.contains(&"in alice's name"), "{bodies:?}");

    // Health checks stay open for probes.
    let health = tonic_health::pb::health_client::HealthClient::new(gateway_channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health without the credential")
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // With the credential every call is served.
    storage
        .list_webhooks(with_credential(list_webhooks(), Some(CLUSTER_CREDENTIAL)))
        .await
        .expect("list webhooks with the credential");
    let sent = routing
        .send(with_credential(send("peer"), Some(CLUSTER_CREDENTIAL)))
        .await
        .expect("send with the credential")
        .into_inner();
    assert!(!sent.message_id.is_empty(), "{sent:?}");
    gateway
        .drain(with_credential(
            v1::DrainRequest { deadline_ms: 100 },
            Some(CLUSTER_CREDENTIAL),
        ))
        .await
        .expect("drain with the credential");
}
