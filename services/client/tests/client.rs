//! The client against a small fake Switchboard server on 127.0.0.1:0, written with
//! tokio-tungstenite's server side. Each test scripts what the server does.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use switchboard_client::{
    send_reliable, Client, ClientError, ConnectOptions, Direction, Encoding, ErrorCode, Event,
    Reconnector, RetryPolicy, Timeline, TokenPlacement,
};
use switchboard_proto::codec::{self, Payload};
use switchboard_proto::v1::{
    ack, client_frame::Request, server_frame, Ack, ClientFrame, Conversation,
    ConversationListResult, ErrorEvent, GoAway, HistoryResult, Message, MessageEvent, PongResult,
    SendRequest, SendResult, ServerFrame, SyncResult, TypingEvent, Welcome,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as HsRequest, Response,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

/// What the fake server saw in an upgrade request.
#[derive(Debug, Clone, Default)]
struct Upgrade {
    path_and_query: String,
    authorization: Option<String>,
    subprotocol: Option<String>,
}

/// One accepted connection, as the server sees it.
struct Conn {
    ws: WebSocketStream<TcpStream>,
    encoding: Encoding,
    upgrade: Upgrade,
    /// 0 for the first connection to this server, 1 for the next, ...
    index: usize,
    /// The client's address as the server's accept saw it.
    peer: SocketAddr,
}

impl Conn {
    async fn send(&mut self, event: server_frame::Event) {
        let frame = ServerFrame { event: Some(event) };
        let message = match codec::encode(&frame, self.encoding) {
            Payload::Text(t) => WsMessage::text(t),
            Payload::Binary(b) => WsMessage::binary(b),
        };
        self.ws.send(message).await.expect("server send");
    }

    async fn welcome(&mut self) {
        self.send(server_frame::Event::Welcome(Welcome {
            user_id: "alice".into(),
            device_id: "phone".into(),
            session_id: format!("s{}", self.index),
            max_body_bytes: 4096,
            server_time_ms: 1,
            heartbeat_interval_ms: 0,
        }))
        .await;
    }

    async fn ack(&mut self, id: &str, result: ack::Result) {
        self.send(server_frame::Event::Ack(Ack {
            id: id.into(),
            result: Some(result),
        }))
        .await;
    }

    /// The next client frame, `None` when the client is gone.
    async fn recv(&mut self) -> Option<ClientFrame> {
        loop {
            let payload = match self.ws.next().await? {
                Ok(WsMessage::Text(t)) => Payload::Text(t.as_str().to_owned()),
                Ok(WsMessage::Binary(b)) => Payload::Binary(b.to_vec()),
                Ok(WsMessage::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            };
            return Some(
                codec::decode_client_frame(&payload, self.encoding).expect("client frame decodes"),
            );
        }
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let _ = self
            .ws
            .send(WsMessage::Close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.to_owned().into(),
            })))
            .await;
        // Read until the client's close reply ends the connection.
        while let Some(Ok(_)) = self.ws.next().await {}
    }
}

/// Start a fake server; `handler` runs for each accepted connection. Tokens
/// starting with "expired" are refused with 401 and body "token expired".
// The handshake callback's error type is fixed by tungstenite.
#[allow(clippy::result_large_err)]
async fn fake_server<F, Fut>(handler: F) -> String
where
    F: Fn(Conn) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(handler);
    let connections = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            let handler = handler.clone();
            let index = connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let seen = Arc::new(Mutex::new(Upgrade::default()));
                let seen_in_callback = seen.clone();
                let callback = move |req: &HsRequest, mut resp: Response| {
                    let header = |name: &str| {
                        req.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let path_and_query = req
                        .uri()
                        .path_and_query()
                        .map(|p| p.to_string())
                        .unwrap_or_default();
                    let authorization = header("authorization");
                    let token = authorization
                        .as_deref()
                        .and_then(|a| a.strip_prefix("Bearer "))
                        .map(str::to_owned)
                        .or_else(|| {
                            path_and_query
                                .split_once("token=")
                                .map(|(_, t)| t.split('&').next().unwrap_or_default().to_owned())
                        });
                    if token.as_deref().is_none_or(|t| t.starts_with("expired")) {
                        let refusal: ErrorResponse = http::Response::builder()
                            .status(401)
                            .body(Some("token expired".to_owned()))
                            .unwrap();
                        return Err(refusal);
                    }
                    let subprotocol = header("sec-websocket-protocol").and_then(|list| {
                        list.split(',')
                            .map(str::trim)
                            .find(|p| Encoding::from_subprotocol(p).is_some())
                            .map(str::to_owned)
                    });
                    if let Some(p) = &subprotocol {
                        resp.headers_mut()
                            .insert("sec-websocket-protocol", p.parse().unwrap());
                    }
                    *seen_in_callback.lock().unwrap() = Upgrade {
                        path_and_query,
                        authorization,
                        subprotocol,
                    };
                    Ok(resp)
                };
                let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                    return;
                };
                let upgrade = seen.lock().unwrap().clone();
                let encoding = upgrade
                    .subprotocol
                    .as_deref()
                    .and_then(Encoding::from_subprotocol)
                    .unwrap_or(Encoding::Json);
                handler(Conn {
                    ws,
                    encoding,
                    upgrade,
                    index,
                    peer,
                })
                .await;
            });
        }
    });
    format!("ws://{addr}/v1/connect")
}

fn options(url: &str, encoding: Encoding) -> ConnectOptions {
    ConnectOptions::new(url, "good-token")
        .encoding(encoding)
        .request_timeout(Duration::from_secs(5))
}

fn pong(ms: i64) -> ack::Result {
    ack::Result::Pong(PongResult { server_time_ms: ms })
}

#[tokio::test]
async fn welcome_then_acks_in_both_encodings() {
    for encoding in [Encoding::Json, Encoding::Proto] {
        let (upgrade_tx, mut upgrade_rx) = mpsc::channel(1);
        let url = fake_server(move |mut conn| {
            let upgrade_tx = upgrade_tx.clone();
            async move {
                upgrade_tx.send(conn.upgrade.clone()).await.unwrap();
                conn.welcome().await;
                while let Some(frame) = conn.recv().await {
                    assert!(matches!(frame.request, Some(Request::Ping(_))));
                    conn.ack(&frame.id, pong(42)).await;
                }
            }
        })
        .await;

        let (client, _events) = Client::connect(options(&url, encoding).device("phone 1"))
            .await
            .unwrap();
        assert_eq!(client.welcome().user_id, "alice");
        assert_eq!(client.welcome().session_id, "s0");
        assert_eq!(client.encoding(), encoding);
        assert_eq!(client.ping().await.unwrap().server_time_ms, 42);
        assert_eq!(client.ping().await.unwrap().server_time_ms, 42);

        let upgrade = upgrade_rx.recv().await.unwrap();
        assert_eq!(upgrade.authorization.as_deref(), Some("Bearer good-token"));
        assert_eq!(upgrade.subprotocol.as_deref(), Some(encoding.subprotocol()));
        assert_eq!(upgrade.path_and_query, "/v1/connect?device=phone%201");
        client.close().await;
        assert!(client.is_closed());
    }
}

#[tokio::test]
async fn the_initial_status_travels_in_the_query() {
    let (upgrade_tx, mut upgrade_rx) = mpsc::channel(1);
    let url = fake_server(move |mut conn| {
        let upgrade_tx = upgrade_tx.clone();
        async move {
            upgrade_tx.send(conn.upgrade.clone()).await.unwrap();
            conn.welcome().await;
            while conn.recv().await.is_some() {}
        }
    })
    .await;
    let opts = options(&url, Encoding::Json)
        .device("phone")
        .initial_status("invisible");
    let (_client, _events) = Client::connect(opts).await.unwrap();
    let upgrade = upgrade_rx.recv().await.unwrap();
    assert_eq!(
        upgrade.path_and_query,
        "/v1/connect?device=phone&status=invisible"
    );
}

#[tokio::test]
async fn token_can_travel_in_the_query() {
    let (upgrade_tx, mut upgrade_rx) = mpsc::channel(1);
    let url = fake_server(move |mut conn| {
        let upgrade_tx = upgrade_tx.clone();
        async move {
            upgrade_tx.send(conn.upgrade.clone()).await.unwrap();
            conn.welcome().await;
            while conn.recv().await.is_some() {}
        }
    })
    .await;
    let mut opts = options(&url, Encoding::Json);
    opts.token_placement = TokenPlacement::Query;
    let (_client, _events) = Client::connect(opts).await.unwrap();
    let upgrade = upgrade_rx.recv().await.unwrap();
    assert_eq!(upgrade.authorization, None);
    assert_eq!(upgrade.path_and_query, "/v1/connect?token=good-token");
}

#[tokio::test]
async fn local_addr_sets_the_source_address() {
    let (peer_tx, mut peer_rx) = mpsc::channel(1);
    let url = fake_server(move |mut conn| {
        let peer_tx = peer_tx.clone();
        async move {
            peer_tx.send(conn.peer).await.unwrap();
            conn.welcome().await;
            while conn.recv().await.is_some() {}
        }
    })
    .await;
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let (client, _events) = Client::connect(options(&url, Encoding::Json).local_addr(source))
        .await
        .unwrap();
    assert_eq!(client.welcome().user_id, "alice");
    assert_eq!(peer_rx.recv().await.unwrap().ip(), source);
    client.close().await;

    // Without it the system picks the source, which for 127.0.0.1 is 127.0.0.1.
    let (client, _events) = Client::connect(options(&url, Encoding::Json))
        .await
        .unwrap();
    assert_eq!(
        peer_rx.recv().await.unwrap().ip(),
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    );
    client.close().await;
}

#[tokio::test]
async fn local_addr_of_another_family_is_a_connect_error() {
    let url = fake_server(|_conn| async {}).await;
    let source = IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);
    let error = Client::connect(options(&url, Encoding::Json).local_addr(source))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ClientError::Connect { status: None, reason } if reason.contains("family")),
        "{error:?}"
    );
}

#[tokio::test]
async fn acks_out_of_order_reach_their_own_requests() {
    let url = fake_server(|mut conn| async move {
        conn.welcome().await;
        let mut frames = Vec::new();
        for _ in 0..3 {
            frames.push(conn.recv().await.unwrap());
        }
        // Reply in reverse order of arrival.
        for frame in frames.into_iter().rev() {
            let result = match frame.request {
                Some(Request::Ping(_)) => pong(7),
                Some(Request::ConversationList(_)) => {
                    ack::Result::Conversations(ConversationListResult {
                        conversations: vec![Conversation {
                            conversation_id: "c1".into(),
                            ..Default::default()
                        }],
                    })
                }
                Some(Request::History(h)) => ack::Result::History(HistoryResult {
                    conversation_id: h.conversation_id,
                    messages: vec![],
                    has_more: false,
                }),
                other => panic!("unexpected request {other:?}"),
            };
            conn.ack(&frame.id, result).await;
        }
        while conn.recv().await.is_some() {}
    })
    .await;

    let (client, _events) = Client::connect(options(&url, Encoding::Json))
        .await
        .unwrap();
    let (pong, list, history) = tokio::join!(
        client.ping(),
        client.conversations(),
        client.history("c9", 0, Direction::Backward, 10),
    );
    assert_eq!(pong.unwrap().server_time_ms, 7);
    assert_eq!(list.unwrap()[0].conversation_id, "c1");
    assert_eq!(history.unwrap().conversation_id, "c9");
    assert_eq!(client.in_flight(), 0);
}

#[tokio::test]
async fn error_ack_becomes_a_server_error_with_its_code() {
    let url = fake_server(|mut conn| async move {
        conn.welcome().await;
        while let Some(frame) = conn.recv().await {
            conn.ack(
                &frame.id,
                ack::Result::Error(ErrorEvent {
                    code: "not_member".into(),
                    message: "not a member of c1".into(),
                    ..Default::default()
                }),
            )
            .await;
        }
    })
    .await;
    let (client, _events) = Client::connect(options(&url, Encoding::Proto))
        .await
        .unwrap();
    let error = client.send("c1", "hi").await.unwrap_err();
    assert_eq!(
        error,
        ClientError::Server {
            code: ErrorCode::NotMember,
            message: "not a member of c1".into(),
            retry_after_ms: 0,
        }
    );
}

#[tokio::test]
async fn unanswered_request_times_out_and_its_late_ack_is_ignored() {
    let url = fake_server(|mut conn| async move {
        conn.welcome().await;
        let first = conn.recv().await.unwrap();
        // No ack for the first request until the second one arrives (after the
        // client gave up on the first); then both, stale one first.
        let second = conn.recv().await.unwrap();
        conn.ack(&first.id, pong(1)).await;
        conn.ack(&second.id, pong(2)).await;
        while conn.recv().await.is_some() {}
    })
    .await;
    let (client, _events) = Client::connect(options(&url, Encoding::Json))
        .await
        .unwrap();
    let first = client
        .request_within(
            Request::Ping(Default::default()),
            Duration::from_millis(100),
        )
        .await;
    assert_eq!(first.unwrap_err(), ClientError::Timeout);
    assert_eq!(client.in_flight(), 0);
    assert_eq!(client.ping().await.unwrap().server_time_ms, 2);
    assert!(!client.is_closed());
}

#[tokio::test]
async fn refused_upgrade_surfaces_status_and_reason() {
    let url = fake_server(|_conn| async {}).await;
    let error = Client::connect(ConnectOptions::new(&url, "expired-token"))
        .await
        .unwrap_err();
    assert_eq!(
        error,
        ClientError::Connect {
            status: Some(401),
            reason: "token expired".into()
        }
    );
}

#[tokio::test]
async fn connect_to_nothing_is_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let error = Client::connect(ConnectOptions::new(format!("ws://{addr}/v1/connect"), "t"))
        .await
        .unwrap_err();
    assert!(
        matches!(error, ClientError::Connect { status: None, .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn first_frame_must_be_welcome() {
    let url = fake_server(|mut conn| async move {
        conn.ack("1", pong(1)).await;
        while conn.recv().await.is_some() {}
    })
    .await;
    let error = Client::connect(options(&url, Encoding::Json))
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Protocol(_)), "{error:?}");
}

#[tokio::test]
async fn events_arrive_in_order_and_a_server_close_ends_everything() {
    let url = fake_server(|mut conn| async move {
        conn.welcome().await;
        // Wait for a request so the client is ready, and leave it unanswered.
        let _pending = conn.recv().await.unwrap();
        conn.send(server_frame::Event::Message(MessageEvent {
            message: Some(Message {
                conversation_id: "c1".into(),
                seq: 1,
                body: "hello".into(),
                ..Default::default()
            }),
        }))
        .await;
        conn.send(server_frame::Event::Typing(TypingEvent {
            conversation_id: "c1".into(),
            user_id: "bob".into(),
            typing: true,
            ..Default::default()
        }))
        .await;
        conn.send(server_frame::Event::Goaway(GoAway {
            reason: "draining".into(),
            reconnect_after_ms: 100,
        }))
        .await;
        conn.close(4008, "slow_consumer").await;
    })
    .await;
    let (client, mut events) = Client::connect(options(&url, Encoding::Proto))
        .await
        .unwrap();
    let pending = tokio::spawn({
        let client = client.clone();
        async move { client.ping().await }
    });

    let Some(Event::Message(message)) = events.recv().await else {
        panic!("message first");
    };
    assert_eq!((message.seq, message.body.as_str()), (1, "hello"));
    assert!(matches!(events.recv().await, Some(Event::Typing(t)) if t.user_id == "bob"));
    assert!(matches!(events.recv().await, Some(Event::GoAway(g)) if g.reason == "draining"));
    assert_eq!(events.recv().await, None);

    let closed = ClientError::Closed {
        code: Some(4008),
        reason: "slow_consumer".into(),
    };
    assert_eq!(pending.await.unwrap().unwrap_err(), closed);
    assert_eq!(events.close_reason(), Some(closed.clone()));
    assert!(client.is_closed());
    assert_eq!(client.ping().await.unwrap_err(), closed);
}

/// Shared record of the client_msg_ids the fake server received, per connection.
type Seen = Arc<Mutex<Vec<(usize, String)>>>;

fn send_result(request: &SendRequest, duplicate: bool) -> ack::Result {
    ack::Result::Send(SendResult {
        conversation_id: request.conversation_id.clone(),
        message_id: "m1".into(),
        seq: 1,
        duplicate,
        sent_at_ms: 1,
    })
}

#[tokio::test]
async fn send_reliable_reconnects_and_retries_with_the_same_id() {
    let seen: Seen = Arc::default();
    let seen_by_server = seen.clone();
    let url = fake_server(move |mut conn| {
        let seen = seen_by_server.clone();
        async move {
            conn.welcome().await;
            while let Some(frame) = conn.recv().await {
                let Some(Request::Send(send)) = frame.request else {
                    continue;
                };
                seen.lock()
                    .unwrap()
                    .push((conn.index, send.client_msg_id.clone()));
                if conn.index == 0 {
                    // The message was accepted but the ack is lost with the connection.
                    return;
                }
                conn.ack(&frame.id, send_result(&send, true)).await;
            }
        }
    })
    .await;

    let mut reconnector = Reconnector::new(options(&url, Encoding::Json));
    let policy = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
    };
    let request = SendRequest {
        conversation_id: "c1".into(),
        client_msg_id: String::new(),
        body: "hello".into(),
        content_type: "text/plain".into(),
        ..Default::default()
    };
    let result = send_reliable(&mut reconnector, request, &policy)
        .await
        .unwrap();
    assert!(result.duplicate);
    assert_eq!(reconnector.connects(), 2);

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!((seen[0].0, seen[1].0), (0, 1));
    assert_eq!(seen[0].1, seen[1].1, "retry kept the client_msg_id");
    assert!(!seen[0].1.is_empty());
}

#[tokio::test]
async fn send_reliable_on_one_connection_retries_a_timed_out_send_with_the_same_id() {
    let seen: Seen = Arc::default();
    let seen_by_server = seen.clone();
    let url = fake_server(move |mut conn| {
        let seen = seen_by_server.clone();
        async move {
            conn.welcome().await;
            let mut sends = 0;
            while let Some(frame) = conn.recv().await {
                let Some(Request::Send(send)) = frame.request else {
                    continue;
                };
                seen.lock()
                    .unwrap()
                    .push((conn.index, send.client_msg_id.clone()));
                sends += 1;
                // Drop the first ack; answer the retry.
                if sends > 1 {
                    conn.ack(&frame.id, send_result(&send, true)).await;
                }
            }
        }
    })
    .await;
    let opts = options(&url, Encoding::Proto).request_timeout(Duration::from_millis(200));
    let (client, _events) = Client::connect(opts).await.unwrap();
    let policy = RetryPolicy {
        max_attempts: 5,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
    };
    let request = SendRequest {
        conversation_id: "c1".into(),
        client_msg_id: "fixed-id".into(),
        body: "hello".into(),
        content_type: String::new(),
        ..Default::default()
    };
    let result = client.send_reliable(request, &policy).await.unwrap();
    assert!(result.duplicate);
    // At least the dropped attempt and the answered one (a slow machine may time
    // out more), all on the one connection and all with the same id.
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(
        seen.iter().all(|s| *s == (0, "fixed-id".to_owned())),
        "{seen:?}"
    );
}

#[tokio::test]
async fn timeline_resync_fills_truncated_conversations_from_history() {
    let url = fake_server(|mut conn| async move {
        conn.welcome().await;
        let msg = |seq| Message {
            conversation_id: "c1".into(),
            seq,
            ..Default::default()
        };
        while let Some(frame) = conn.recv().await {
            let result = match frame.request {
                Some(Request::Sync(sync)) => {
                    assert_eq!(sync.cursors.len(), 1);
                    assert_eq!(sync.cursors[0].last_seq, 2);
                    ack::Result::Sync(SyncResult {
                        conversations: vec![Conversation {
                            conversation_id: "c1".into(),
                            last_seq: 6,
                            ..Default::default()
                        }],
                        messages: vec![msg(3), msg(4)],
                        truncated: vec!["c1".into()],
                        ..Default::default()
                    })
                }
                Some(Request::History(h)) => {
                    assert_eq!(h.direction, "forward");
                    ack::Result::History(HistoryResult {
                        conversation_id: h.conversation_id,
                        messages: (h.from_seq + 1..=6).map(msg).collect(),
                        has_more: false,
                    })
                }
                other => panic!("unexpected request {other:?}"),
            };
            conn.ack(&frame.id, result).await;
        }
    })
    .await;
    let (client, _events) = Client::connect(options(&url, Encoding::Json))
        .await
        .unwrap();
    let mut timeline = Timeline::new();
    timeline.track("c1", 2);
    let delivered = timeline.resync(&client, 0).await.unwrap();
    let seqs: Vec<u64> = delivered.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![3, 4, 5, 6]);
    assert_eq!(timeline.last_seq("c1"), Some(6));
    assert!(timeline.gaps().is_empty());
}

#[tokio::test]
async fn a_full_event_queue_pauses_reading_without_losing_events() {
    let url = fake_server(|mut conn| async move {
        conn.welcome().await;
        for seq in 1..=50 {
            conn.send(server_frame::Event::Message(MessageEvent {
                message: Some(Message {
                    conversation_id: "c1".into(),
                    seq,
                    ..Default::default()
                }),
            }))
            .await;
        }
        // The ack comes after every event, so it waits until they were taken.
        let frame = conn.recv().await.unwrap();
        conn.ack(&frame.id, pong(9)).await;
        while conn.recv().await.is_some() {}
    })
    .await;
    let mut opts = options(&url, Encoding::Json);
    opts.event_queue = 2;
    let (client, mut events) = Client::connect(opts).await.unwrap();
    let ping = tokio::spawn({
        let client = client.clone();
        async move { client.ping().await }
    });
    let mut timeline = Timeline::new();
    for seq in 1..=50 {
        let Some(Event::Message(message)) = events.recv().await else {
            panic!("message {seq} expected");
        };
        assert_eq!(message.seq, seq);
        assert!(matches!(
            timeline.observe(message),
            switchboard_client::Observed::InOrder(_)
        ));
    }
    assert_eq!(ping.await.unwrap().unwrap().server_time_ms, 9);
}

#[tokio::test]
async fn dropping_every_handle_closes_the_connection() {
    let (closed_tx, mut closed_rx) = mpsc::channel(1);
    let url = fake_server(move |mut conn| {
        let closed_tx = closed_tx.clone();
        async move {
            conn.welcome().await;
            // recv returns None on the client's close frame.
            while conn.recv().await.is_some() {}
            closed_tx.send(()).await.unwrap();
        }
    })
    .await;
    let (client, mut events) = Client::connect(options(&url, Encoding::Json))
        .await
        .unwrap();
    let second_handle = client.clone();
    drop(client);
    drop(second_handle);
    closed_rx.recv().await.unwrap();
    assert_eq!(events.recv().await, None);
    assert!(matches!(
        events.close_reason(),
        Some(ClientError::Closed {
            code: Some(1000),
            ..
        })
    ));
}

/// The fake server's answer to each conversation-feature request, and what it saw.
fn feature_ack(request: &Request) -> ack::Result {
    use switchboard_proto::v1::{ReceiptsResult, ThreadResult};
    let sent = |conversation_id: &str, seq| {
        ack::Result::Send(SendResult {
            conversation_id: conversation_id.into(),
            message_id: format!("m{seq}"),
            seq,
            duplicate: false,
            sent_at_ms: 1,
        })
    };
    match request {
        Request::Send(s) => sent(&s.conversation_id, 2),
        Request::Edit(e) => sent(&e.conversation_id, 3),
        Request::Delete(d) => sent(&d.conversation_id, 4),
        Request::React(r) => sent(&r.conversation_id, 5),
        Request::ConversationUpdate(u) => sent(&u.conversation_id, 6),
        Request::Thread(t) => ack::Result::Thread(ThreadResult {
            conversation_id: t.conversation_id.clone(),
            root: Some(Message {
                seq: t.root_seq,
                reply_count: 1,
                ..Default::default()
            }),
            replies: vec![],
            has_more: false,
        }),
        Request::Receipts(r) => ack::Result::Receipts(ReceiptsResult {
            conversation_id: r.conversation_id.clone(),
            seq: 7,
            read_by: 1,
            delivered_to: 2,
            members: vec![],
        }),
        Request::Read(_) | Request::NotificationSet(_) | Request::PresenceSet(_) => {
            ack::Result::Ok(Default::default())
        }
        other => panic!("unexpected request {other:?}"),
    }
}

#[tokio::test]
async fn conversation_feature_requests_carry_their_fields_and_read_their_acks() {
    use switchboard_client::{MarkerKind, PresenceUpdate, SendOptions};

    for encoding in [Encoding::Json, Encoding::Proto] {
        let (seen_tx, mut seen_rx) = mpsc::channel(64);
        let url = fake_server(move |mut conn| {
            let seen_tx = seen_tx.clone();
            async move {
                conn.welcome().await;
                while let Some(frame) = conn.recv().await {
                    let request = frame.request.expect("a request");
                    let result = feature_ack(&request);
                    seen_tx.send(request).await.unwrap();
                    conn.ack(&frame.id, result).await;
                }
            }
        })
        .await;
        let (client, _events) = Client::connect(options(&url, encoding)).await.unwrap();
        let mut next = || seen_rx.try_recv().expect("the server saw the request");

        let options = SendOptions::new().reply_to(1).in_thread(1).mention("bob");
        assert_eq!(client.send_with("c", "re", &options).await.unwrap().seq, 2);
        let Request::Send(send) = next() else {
            panic!("send")
        };
        assert_eq!((send.reply_to_seq, send.thread_root_seq), (1, 1));
        assert_eq!(send.mentions, ["bob"]);
        assert_eq!(send.content_type, "text/plain");
        assert!(!send.client_msg_id.is_empty());

        assert_eq!(client.edit("c", 2, "fixed").await.unwrap().seq, 3);
        let Request::Edit(edit) = next() else {
            panic!("edit")
        };
        assert_eq!((edit.seq, edit.body.as_str()), (2, "fixed"));
        assert!(!edit.client_msg_id.is_empty());

        assert_eq!(client.delete("c", 2).await.unwrap().seq, 4);
        assert!(matches!(next(), Request::Delete(d) if d.seq == 2 && !d.client_msg_id.is_empty()));

        assert_eq!(client.react("c", 1, "👍").await.unwrap().seq, 5);
        assert!(matches!(next(), Request::React(r) if r.emoji == "👍" && !r.remove && r.seq == 1));
        client.unreact("c", 1, "👍").await.unwrap();
        assert!(matches!(next(), Request::React(r) if r.remove));

        let thread = client.thread("c", 1, 0, 10).await.unwrap();
        assert_eq!(thread.root.map(|r| r.reply_count), Some(1));
        assert!(matches!(next(), Request::Thread(t) if t.root_seq == 1 && t.limit == 10));

        let receipts = client.receipts("c", 0).await.unwrap();
        assert_eq!(
            (receipts.seq, receipts.read_by, receipts.delivered_to),
            (7, 1, 2)
        );
        assert!(matches!(next(), Request::Receipts(r) if r.seq == 0));

        client.mark("c", 7, MarkerKind::Delivered).await.unwrap();
        assert!(matches!(next(), Request::Read(r) if r.kind == "delivered" && r.seq == 7));
        client.read("c", 7).await.unwrap();
        assert!(matches!(next(), Request::Read(r) if r.kind.is_empty() || r.kind == "read"));

        let updates: Vec<(&str, Result<SendResult, ClientError>)> = vec![
            ("rename", client.rename("c", "team").await),
            ("topic", client.set_topic("c", "plans").await),
            ("add", client.add_members("c", ["dave"]).await),
            ("kick", client.kick("c", ["dave"]).await),
            ("ban", client.ban("c", ["eve"]).await),
            ("unban", client.unban("c", ["eve"]).await),
            ("role", client.set_role("c", ["bob"], "admin").await),
            ("leave", client.leave("c").await),
        ];
        for (action, result) in updates {
            assert_eq!(result.unwrap().seq, 6, "{action}");
            let Request::ConversationUpdate(update) = next() else {
                panic!("conversation_update")
            };
            assert_eq!(update.action, action);
            assert!(!update.client_msg_id.is_empty());
            match action {
                "rename" => assert_eq!(update.name, "team"),
                "topic" => assert_eq!(update.topic, "plans"),
                "role" => assert_eq!(
                    (update.user_ids.as_slice(), update.role.as_str()),
                    (&["bob".to_owned()][..], "admin")
                ),
                "leave" => assert!(update.user_ids.is_empty()),
                _ => assert_eq!(update.user_ids.len(), 1),
            }
        }

        client.mute("c", -1).await.unwrap();
        assert!(
            matches!(next(), Request::NotificationSet(n) if n.conversation_id == "c" && n.until_ms == -1)
        );
        client.do_not_disturb(123).await.unwrap();
        assert!(
            matches!(next(), Request::NotificationSet(n) if n.conversation_id.is_empty() && n.until_ms == 123)
        );

        client
            .presence_update(
                PresenceUpdate::new()
                    .status("busy")
                    .status_text("in a meeting"),
            )
            .await
            .unwrap();
        let Request::PresenceSet(presence) = next() else {
            panic!("presence_set")
        };
        assert_eq!(presence.status, "busy");
        assert_eq!(presence.status_text.as_deref(), Some("in a meeting"));
        assert_eq!(presence.last_seen_privacy, "");
        client
            .presence_update(PresenceUpdate::new().last_seen_privacy("contacts"))
            .await
            .unwrap();
        let Request::PresenceSet(presence) = next() else {
            panic!("presence_set")
        };
        assert_eq!((presence.status.as_str(), presence.status_text), ("", None));
        assert_eq!(presence.last_seen_privacy, "contacts");
        client.close().await;
    }
}

#[tokio::test]
async fn a_feature_request_acked_with_the_wrong_result_is_a_protocol_error() {
    let url = fake_server(|mut conn| async move {
        conn.welcome().await;
        while let Some(frame) = conn.recv().await {
            conn.ack(&frame.id, pong(1)).await;
        }
    })
    .await;
    let (client, _events) = Client::connect(options(&url, Encoding::Json))
        .await
        .unwrap();
    let error = client.edit("c", 1, "x").await.unwrap_err();
    assert!(
        matches!(error, ClientError::Protocol(ref m) if m.contains("edit")),
        "{error:?}"
    );
    assert!(matches!(
        client.receipts("c", 0).await,
        Err(ClientError::Protocol(_))
    ));
}
