//! Outgoing webhooks: a local HTTP receiver on 127.0.0.1:0 that checks every
//! signature, records the batches and can fail requests.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use super::*;
use crate::webhooks::{DispatchOptions, HEADER_SIGNATURE, HEADER_TIMESTAMP, HEADER_WEBHOOK_ID};

pub(super) const SECRET: &str = "8d7f0c4b1e2a3f5e6d7c8b9a0f1e2d3c4b5a69788796a5b4c3d2e1f0a9b8c7d6";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    /// The status it answered.
    status: u16,
    webhook_id: String,
    conversation_id: String,
    seqs: Vec<u64>,
}

#[derive(Default)]
struct ReceiverState {
    /// The webhook's secret the signatures are checked with.
    secret: String,
    /// Answer this many requests with 503 before accepting.
    fail_next: usize,
    requests: Vec<Received>,
    /// Requests whose signature, headers or body were wrong.
    malformed: Vec<String>,
}

#[derive(Clone)]
pub(super) struct Receiver {
    pub(super) url: String,
    state: Arc<Mutex<ReceiverState>>,
    /// Number of requests answered.
    count: Arc<watch::Sender<usize>>,
}

impl Receiver {
    async fn start(fail_next: usize) -> Receiver {
        Receiver::start_with(fail_next, SECRET).await
    }

    pub(super) async fn start_with(fail_next: usize, secret: &str) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let receiver = Receiver {
            url,
            state: Arc::new(Mutex::new(ReceiverState {
                fail_next,
                secret: secret.into(),
                ..Default::default()
            })),
            count: Arc::new(watch::Sender::new(0)),
        };
        let r = receiver.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let r = r.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let r = r.clone();
                        async move { Ok::<_, Infallible>(r.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        receiver
    }

    async fn handle(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<Full<Bytes>> {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        let content_type = header("content-type");
        let webhook_id = header(HEADER_WEBHOOK_ID);
        let timestamp = header(HEADER_TIMESTAMP);
        let signature = header(HEADER_SIGNATURE);
        let body = req.into_body().collect().await.unwrap().to_bytes();

        let mut problems = Vec::new();
        if method != hyper::Method::POST || path != "/hook" {
            problems.push(format!("{method} {path}"));
        }
        if content_type != "application/json" {
            problems.push(format!("content-type {content_type}"));
        }
        if timestamp.parse::<i64>().map_or(true, |t| t <= 0) {
            problems.push(format!("timestamp {timestamp:?}"));
        }
        // Verified independently of the sender's code: ring's HMAC over
        // "<timestamp>.<body>" with the secret's UTF-8 bytes.
        let secret = self.state.lock().unwrap().secret.clone();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let mut signed = format!("{timestamp}.").into_bytes();
        signed.extend_from_slice(&body);
        let tag = signature
            .strip_prefix("sha256=")
            .filter(|hex| {
                hex.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            })
            .and_then(decode_hex);
        match tag {
            Some(tag) if ring::hmac::verify(&key, &signed, &tag).is_ok() => {}
            _ => problems.push(format!("signature {signature:?}")),
        }
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let events = json["events"].as_array().cloned().unwrap_or_default();
        let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
        if seqs.len() != events.len() || events.is_empty() {
            problems.push(format!("events {events:?}"));
        }
        if json["webhook_id"] != webhook_id.as_str() {
            problems.push("webhook_id differs from the header".into());
        }

        let status = {
            let mut state = self.state.lock().unwrap();
            if !problems.is_empty() {
                state.malformed.push(problems.join("; "));
            }
            let status = if state.fail_next > 0 {
                state.fail_next -= 1;
                503
            } else {
                200
            };
            state.requests.push(Received {
                status,
                webhook_id,
                conversation_id: json["conversation_id"].as_str().unwrap_or("").into(),
                seqs,
            });
            status
        };
        self.count.send_modify(|c| *c += 1);
        hyper::Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(b"ok")))
            .unwrap()
    }

    /// The sequences acknowledged for one webhook, in the order received.
    pub(super) fn acknowledged_by(&self, webhook_id: &str) -> Vec<u64> {
        self.requests()
            .iter()
            .filter(|r| r.status == 200 && r.webhook_id == webhook_id)
            .flat_map(|r| r.seqs.clone())
            .collect()
    }

    /// Check the signatures of later requests with `secret`.
    pub(super) fn set_secret(&self, secret: &str) {
        self.state.lock().unwrap().secret = secret.into();
    }

    /// Wait until `seq` was acknowledged.
    pub(super) async fn wait_acknowledged(&self, seq: u64) {
        let mut rx = self.count.subscribe();
        tokio::time::timeout(WAIT, async {
            loop {
                rx.borrow_and_update();
                if self.acknowledged().contains(&seq) {
                    return;
                }
                rx.changed().await.expect("receiver alive");
            }
        })
        .await
        .expect("acknowledged in time");
    }

    fn requests(&self) -> Vec<Received> {
        self.state.lock().unwrap().requests.clone()
    }

    pub(super) fn malformed(&self) -> Vec<String> {
        self.state.lock().unwrap().malformed.clone()
    }

    /// Every sequence acknowledged with a 2xx, in the order received.
    pub(super) fn acknowledged(&self) -> Vec<u64> {
        self.requests()
            .iter()
            .filter(|r| r.status == 200)
            .flat_map(|r| r.seqs.clone())
            .collect()
    }
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

pub(super) fn webhook(id: &str, conversation: &str, url: &str, delivered_seq: u64) -> Webhook {
    Webhook {
        webhook_id: id.into(),
        conversation_id: conversation.into(),
        url: url.into(),
        secret: SECRET.into(),
        delivered_seq,
        created_at_ms: 1,
        created_by: "alice".into(),
        suspended: false,
    }
}

/// Partition owners and the dispatcher around an embedded log, with `options`.
struct Dispatching {
    node: Arc<crate::node::Node>,
    service: crate::RoutingService,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Dispatching {
    async fn start(p: &Peers, options: DispatchOptions) -> Dispatching {
        let node = node_with_untrimmed_log(p).await;
        let stop = CancellationToken::new();
        let tasks = vec![
            tokio::spawn(crate::owner::supervise(node.clone(), stop.clone())),
            tokio::spawn(crate::webhooks::run(node.clone(), options, stop.clone())),
        ];
        Dispatching {
            service: crate::RoutingService::new(node.clone(), CancellationToken::new()),
            node,
            stop,
            tasks,
        }
    }

    async fn send(&self, sender: &str, conversation: &str, id: &str) -> u64 {
        self.service
            .handle_send(send_req(sender, conversation, id, "hi"))
            .await
            .unwrap()
            .seq
    }

    async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("stops in time")
                .unwrap();
        }
        self.node.log.close().await;
    }
}

/// Short backoff for tests on real time; no periodic discovery or idle re-reads,
/// so delivery after the start relies on the owner's wake.
fn fast_options() -> DispatchOptions {
    DispatchOptions {
        timeout: Duration::from_secs(5),
        backoff_start: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        discover_every: Duration::from_secs(3600),
        idle_recheck: Duration::from_secs(3600),
        concurrency: 4,
        // The receivers listen on loopback.
        allow_private_networks: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_posted_in_order_signed_and_retried_until_acknowledged() {
    let p = peers().await;
    p.storage.add_conversation("c1", &["alice", "bob"]);
    // The first two POSTs fail: the first batch is sent again, nothing overtakes it.
    let receiver = Receiver::start(2).await;
    p.storage.put_webhook(webhook("w1", "c1", &receiver.url, 0));
    let d = Dispatching::start(&p, fast_options()).await;

    const N: u64 = 120;
    for i in 1..=N {
        let sender = if i % 2 == 0 { "alice" } else { "bob" };
        assert_eq!(d.send(sender, "c1", &format!("m{i}")).await, i);
    }
    p.storage.wait_delivered("w1", N).await;

    assert_eq!(receiver.malformed(), Vec::<String>::new());
    let requests = receiver.requests();
    assert!(requests
        .iter()
        .all(|r| r.webhook_id == "w1" && r.conversation_id == "c1"));
    assert!(
        requests.iter().all(|r| r.seqs.len() <= 50),
        "batches of at most 50"
    );
    assert_eq!(requests[0].status, 503);
    assert_eq!(requests[1].status, 503);
    assert_eq!(
        requests[1].seqs.first(),
        requests[0].seqs.first(),
        "a failed batch is retried from the same event"
    );
    assert_eq!(requests[2].seqs.first(), requests[0].seqs.first());
    // Every event acknowledged, once each here, in sequence order.
    assert_eq!(receiver.acknowledged(), (1..=N).collect::<Vec<_>>());
    assert!(
        p.storage
            .state
            .lock()
            .unwrap()
            .history_users
            .iter()
            .all(String::is_empty),
        "history is read as an internal caller"
    );
    assert_eq!(d.node.metrics.webhook_events.get(), N);
    assert_eq!(
        d.node
            .metrics
            .webhook_failures
            .with_label_values(&["status"])
            .get(),
        2
    );
    assert_eq!(d.node.metrics.webhooks_dispatching.get(), 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_added_later_start_at_their_cursor_and_deleted_ones_stop() {
    let p = peers().await;
    p.storage.add_conversation("c1", &["alice"]);
    p.storage.add_conversation("c2", &["alice"]);
    let receiver = Receiver::start(0).await;
    let d = Dispatching::start(
        &p,
        DispatchOptions {
            discover_every: Duration::from_millis(50),
            ..fast_options()
        },
    )
    .await;
    for i in 1..=3 {
        d.send("alice", "c1", &format!("a{i}")).await;
    }
    d.send("alice", "c2", "b1").await;

    // Added after three events: it receives what comes after its cursor only.
    p.storage.put_webhook(webhook("w1", "c1", &receiver.url, 3));
    p.storage.put_webhook(webhook("w2", "c2", &receiver.url, 0));
    p.storage.wait_delivered("w2", 1).await;
    assert_eq!(d.send("alice", "c1", "a4").await, 4);
    p.storage.wait_delivered("w1", 4).await;
    let for_c1: Vec<u64> = receiver
        .requests()
        .iter()
        .filter(|r| r.webhook_id == "w1")
        .flat_map(|r| r.seqs.clone())
        .collect();
    assert_eq!(for_c1, vec![4]);

    // Deleted: the next discovery stops its worker.
    p.storage.remove_webhook("w1");
    tokio::time::timeout(WAIT, async {
        while d.node.metrics.webhooks_dispatching.get() != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the deleted webhook's worker stopped");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_removed_by_storage_delivers_nothing_more_before_the_next_discovery() {
    let p = peers().await;
    p.storage.add_conversation("c1", &["alice"]);
    let receiver = Receiver::start(0).await;
    p.storage.put_webhook(webhook("w1", "c1", &receiver.url, 0));
    // No periodic discovery during the test: only the delivery read can stop the
    // worker.
    let d = Dispatching::start(
        &p,
        DispatchOptions {
            discover_every: Duration::from_secs(3600),
            ..fast_options()
        },
    )
    .await;
    d.send("alice", "c1", "a1").await;
    p.storage.wait_delivered("w1", 1).await;
    assert!(p
        .storage
        .state
        .lock()
        .unwrap()
        .history_webhooks
        .iter()
        .all(|w| w == "w1"));

    // Storage removes it (its creator was kicked): the next read says not_found and
    // the worker stops without posting what came after.
    let reads = || p.storage.state.lock().unwrap().history_webhooks.len();
    let before = reads();
    p.storage.remove_webhook("w1");
    d.send("alice", "c1", "after the kick").await;
    tokio::time::timeout(WAIT, async {
        while reads() == before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the worker read after the removal");
    // A worker that went on would post right after its read.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(reads(), before + 1, "the worker stopped after not_found");
    let seqs: Vec<u64> = receiver
        .requests()
        .iter()
        .flat_map(|r| r.seqs.clone())
        .collect();
    assert_eq!(seqs, vec![1]);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_receiver_is_retried_and_a_timeout_counts_as_a_failure() {
    let p = peers().await;
    p.storage.add_conversation("c1", &["alice"]);
    // A listener that accepts and never answers: every POST times out.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", silent.local_addr().unwrap());
    let held = Arc::new(Mutex::new(Vec::new()));
    {
        let held = held.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = silent.accept().await {
                held.lock().unwrap().push(stream);
            }
        });
    }
    p.storage.put_webhook(webhook("w1", "c1", &url, 0));
    let d = Dispatching::start(
        &p,
        DispatchOptions {
            timeout: Duration::from_millis(100),
            ..fast_options()
        },
    )
    .await;
    d.send("alice", "c1", "m1").await;
    let failures = d
        .node
        .metrics
        .webhook_failures
        .with_label_values(&["timeout"]);
    tokio::time::timeout(WAIT, async {
        while failures.get() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("timeouts counted and retried");
    assert_eq!(p.storage.delivered_seq("w1"), 0, "nothing acknowledged");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_destinations_are_refused_unless_allowed() {
    let p = peers().await;
    p.storage.add_conversation("c1", &["alice"]);
    // A listener that records every connection: none may arrive.
    let receiver = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = receiver.local_addr().unwrap().port();
    let connections = Arc::new(Mutex::new(0usize));
    {
        let connections = connections.clone();
        tokio::spawn(async move {
            while receiver.accept().await.is_ok() {
                *connections.lock().unwrap() += 1;
            }
        });
    }
    // An IP literal and a name that resolves to loopback.
    p.storage.put_webhook(webhook(
        "w1",
        "c1",
        &format!("http://127.0.0.1:{port}/hook"),
        0,
    ));
    p.storage.put_webhook(webhook(
        "w2",
        "c1",
        &format!("http://localhost:{port}/hook"),
        0,
    ));
    let d = Dispatching::start(
        &p,
        DispatchOptions {
            allow_private_networks: false,
            ..fast_options()
        },
    )
    .await;
    d.send("alice", "c1", "m1").await;
    let destination = d
        .node
        .metrics
        .webhook_failures
        .with_label_values(&["destination"]);
    let transport = d
        .node
        .metrics
        .webhook_failures
        .with_label_values(&["transport"]);
    tokio::time::timeout(WAIT, async {
        while destination.get() < 2 || transport.get() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the literal refused before connecting, the name by the resolver; both retried");
    assert_eq!(*connections.lock().unwrap(), 0, "no connection was made");
    assert_eq!(p.storage.delivered_seq("w1"), 0);
    assert_eq!(p.storage.delivered_seq("w2"), 0);
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failed_deliveries_back_off_from_one_second_doubling() {
    let p = peers().await;
    p.storage.add_conversation("c1", &["alice"]);
    // Already stored: the dispatcher alone runs (no log, whose SQLite thread would
    // let the paused clock run past the append timeout).
    p.storage.state.lock().unwrap().messages.insert(
        "c1".into(),
        vec![Message {
            conversation_id: "c1".into(),
            seq: 1,
            message_id: "id1".into(),
            sender_id: "alice".into(),
            client_msg_id: "m1".into(),
            body: "hi".into(),
            content_type: "text/plain".into(),
            sent_at_ms: 1,
            ..Default::default()
        }],
    );
    let receiver = Receiver::start(3).await;
    p.storage.put_webhook(webhook("w1", "c1", &receiver.url, 0));
    let node = node_with_untrimmed_log(&p).await;
    let stop = CancellationToken::new();
    // The production schedule (1 s doubling, jittered by 0.5..1), on paused time.
    let dispatcher = tokio::spawn(crate::webhooks::run(
        node.clone(),
        DispatchOptions::from_config(&p.config.routing),
        stop.clone(),
    ));
    let mut count = receiver.count.subscribe();
    let mut at = Vec::new();
    for n in 1..=4 {
        tokio::time::timeout(WAIT * 10, count.wait_for(|c| *c >= n))
            .await
            .expect("request in time")
            .expect("counter alive");
        at.push(tokio::time::Instant::now());
    }
    p.storage.wait_delivered("w1", 1).await;
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, step) in gaps.iter().zip([1u64, 2, 4]) {
        let step = Duration::from_secs(step);
        assert!(
            *gap >= step / 2 && *gap <= step + Duration::from_millis(100),
            "waits {gaps:?} do not follow 1 s doubling"
        );
    }
    assert_eq!(receiver.acknowledged(), vec![1]);
    assert_eq!(
        node.metrics
            .webhook_failures
            .with_label_values(&["status"])
            .get(),
        3
    );
    stop.cancel();
    dispatcher.await.unwrap();
    node.log.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_urls_are_posted_over_tls() {
    use tokio::io::AsyncReadExt as _;
    let p = peers().await;
    p.storage.add_conversation("c1", &["alice"]);
    // Not a TLS server: it only reads what the client sends first.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/hook", listener.local_addr().unwrap());
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut head = [0u8; 3];
        stream.read_exact(&mut head).await.unwrap();
        let _ = first_tx.send(head);
    });
    p.storage.put_webhook(webhook("w1", "c1", &url, 0));
    let d = Dispatching::start(&p, fast_options()).await;
    d.send("alice", "c1", "m1").await;
    let head = tokio::time::timeout(WAIT, first_rx)
        .await
        .expect("connection in time")
        .unwrap();
    // A TLS record of type handshake (a ClientHello), not an HTTP request line.
    assert_eq!(head[0], 0x16, "{head:?}");
    assert_eq!(head[1], 0x03, "{head:?}");
    d.stop().await;
}
