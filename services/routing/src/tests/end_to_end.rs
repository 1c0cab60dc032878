//! The routing service against the real storage service (SQLite on a temporary
//! directory): timeline events authorized by storage's rules, membership changes
//! applied by its Append, and a webhook fed from its history and cursor.

use switchboard_proto::v1::storage_client::StorageClient;

use super::webhooks::Receiver;
use super::*;

/// Start storage on 127.0.0.1:0; returns its URL and its stop token.
async fn start_storage(config: &Config) -> (String, CancellationToken) {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", grpc.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(switchboard_storage::serve(
        Arc::new(config.clone()),
        grpc,
        admin,
        switchboard_rpc::Peers::remote(&config.cluster).unwrap(),
        shutdown.clone(),
    ));
    (url, shutdown)
}

fn event(sender: &str, cid: &str, id: &str, kind: &str, target_seq: u64) -> RouteSendRequest {
    RouteSendRequest {
        kind: kind.into(),
        target_seq,
        ..send_req(sender, cid, id, "")
    }
}

fn code(r: Result<tonic::Response<SendResult>, Status>) -> ErrorCode {
    status_error_code(&r.expect_err("refused"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_authorized_by_storage_reach_members_and_a_webhook_in_order() {
    let mut p = peers().await;
    let (storage_url, storage_stop) = start_storage(&p.config).await;
    p.config.cluster.storage_url = storage_url.clone();
    p.online("bob", &p.gateway_b_url);
    let mut storage =
        StorageClient::new(switchboard_rpc::channel(&storage_url, &p.config.cluster).unwrap());
    let group = tokio::time::timeout(WAIT, async {
        loop {
            let created = storage
                .create_conversation(CreateConversationRequest {
                    creator_id: "alice".into(),
                    kind: "group".into(),
                    members: vec!["alice".into(), "bob".into(), "carol".into()],
                    name: "team".into(),
                })
                .await;
            match created {
                Ok(c) => return c.into_inner(),
                // Still opening its database.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("storage answers");
    let cid = group.conversation_id.as_str();

    // The first POST fails: the batch is sent again.
    let receiver = Receiver::start_with(1, "").await;
    let hook = storage
        .put_webhook(PutWebhookRequest {
            conversation_id: cid.into(),
            actor_id: "alice".into(),
            url: receiver.url.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    receiver.set_secret(&hook.secret);
    let routing = start(&p.config).await;
    let mut client = routing.client.clone();

    let m1 = client
        .send(RouteSendRequest {
            mentions: vec!["carol".into()],
            ..send_req("bob", cid, "m1", "hello")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m1.seq, 1);
    // Storage's rules, through routing.
    let edit_by_other = RouteSendRequest {
        body: "not yours".into(),
        ..event("alice", cid, "e0", "edit", 1)
    };
    assert_eq!(code(client.send(edit_by_other).await), ErrorCode::Forbidden);
    let react_missing = RouteSendRequest {
        emoji: "👍".into(),
        ..event("alice", cid, "r0", "reaction", 9)
    };
    assert_eq!(code(client.send(react_missing).await), ErrorCode::NotFound);
    let mention_outsider = RouteSendRequest {
        mentions: vec!["mallory".into()],
        ..send_req("bob", cid, "m0", "psst")
    };
    assert_eq!(
        code(client.send(mention_outsider).await),
        ErrorCode::InvalidRequest
    );

    let edit = RouteSendRequest {
        body: "hello, edited".into(),
        ..event("bob", cid, "e1", "edit", 1)
    };
    assert_eq!(client.send(edit).await.unwrap().into_inner().seq, 2);
    let react = RouteSendRequest {
        emoji: "👍".into(),
        ..event("alice", cid, "r1", "reaction", 1)
    };
    assert_eq!(client.send(react).await.unwrap().into_inner().seq, 3);
    let kick = RouteSendRequest {
        system: Some(SystemEvent {
            action: "members_removed".into(),
            actor_id: "alice".into(),
            user_ids: vec!["bob".into()],
            ..Default::default()
        }),
        ..event("alice", cid, "k1", "system", 0)
    };
    assert_eq!(client.send(kick).await.unwrap().into_inner().seq, 4);
    // Storage removed bob; routing sees it at once, and bob saw his removal.
    assert_eq!(
        code(client.send(send_req("bob", cid, "m2", "hi?")).await),
        ErrorCode::NotMember
    );
    let at_b = p.gateway_b.wait_deliveries(4).await;
    assert_eq!(message_seqs(&at_b), vec![1, 2, 3, 4]);

    // The webhook got all four in order, signed with its secret, and its cursor
    // is stored.
    receiver.wait_acknowledged(4).await;
    assert_eq!(receiver.malformed(), Vec::<String>::new());
    assert_eq!(receiver.acknowledged(), vec![1, 2, 3, 4]);
    let delivered = tokio::time::timeout(WAIT, async {
        loop {
            let listed = storage
                .list_webhooks(ListWebhooksRequest {
                    conversation_id: cid.into(),
                    actor_id: "alice".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .webhooks;
            if listed[0].delivered_seq == 4 {
                return listed[0].delivered_seq;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("cursor stored");
    assert_eq!(delivered, 4);
    routing.stop().await;
    storage_stop.cancel();
}
