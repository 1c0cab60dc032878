//! HTTP helpers of the end-to-end tests of the HTTP API and webhooks: raw HTTP/1.1
//! requests to the gateway, and a webhook receiver on 127.0.0.1:0 that checks the
//! signature and the order of every delivery.

#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use switchboard_proto::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Webhooks go only to public addresses unless allowed: the test receivers listen
/// on loopback.
pub fn allow_loopback_webhooks(setup: &mut super::common::Setup) {
    setup.set(
        "SWITCHBOARD_ROUTING__WEBHOOK_ALLOW_PRIVATE_NETWORKS",
        "true",
    );
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One HTTP/1.1 request to the gateway's HTTP API: (status, body).
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&str>,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the gateway");
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read response");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

pub fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// One POST the webhook receiver got.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub headers: HashMap<String, String>,
    pub body: String,
    /// The status the receiver answered with.
    pub status: u16,
}

/// A webhook receiver on 127.0.0.1:0 that answers 500 to its first `fail_first`
/// requests and 200 after; every request is reported on the returned channel.
pub async fn webhook_receiver(fail_first: usize) -> (String, mpsc::Receiver<Delivery>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        let mut served = 0usize;
        while let Ok((mut socket, _)) = listener.accept().await {
            // Requests are served one at a time: the order of arrival is the order
            // of the report.
            loop {
                let Some((headers, body)) = read_request(&mut socket).await else {
                    break;
                };
                let status = if served < fail_first { 500 } else { 200 };
                served += 1;
                let reason = if status == 200 {
                    "OK"
                } else {
                    "Internal Server Error"
                };
                let response = format!(
                    "HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\nconnection: keep-alive\r\n\r\n"
                );
                let _ = tx
                    .send(Delivery {
                        headers,
                        body,
                        status,
                    })
                    .await;
                if socket.write_all(response.as_bytes()).await.is_err() {
                    break;
                }
            }
        }
    });
    (format!("http://{addr}/hook"), rx)
}

/// Read one HTTP/1.1 request (headers lowercased, body by content-length).
pub async fn read_request(
    socket: &mut tokio::net::TcpStream,
) -> Option<(HashMap<String, String>, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let headers: HashMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((headers, String::from_utf8_lossy(&body).into_owned()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Check a delivery's signature and return its events.
pub fn verify(
    delivery: &Delivery,
    webhook_id: &str,
    conversation_id: &str,
    secret: &str,
) -> Vec<Message> {
    let h = &delivery.headers;
    assert_eq!(
        h.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(
        h.get("x-switchboard-webhook-id").map(String::as_str),
        Some(webhook_id)
    );
    let timestamp = h.get("x-switchboard-timestamp").expect("timestamp header");
    let sent_at: i64 = timestamp.parse().expect("timestamp in ms");
    assert!(
        (sent_at - now_ms()).abs() < 600_000,
        "timestamp {sent_at} is ms since epoch"
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let expected =
        hex(ring::hmac::sign(&key, format!("{timestamp}.{}", delivery.body).as_bytes()).as_ref());
    assert_eq!(
        h.get("x-switchboard-signature").map(String::as_str),
        Some(format!("sha256={expected}").as_str()),
        "signature over \"<timestamp>.<body>\" with the secret"
    );
    let payload: serde_json::Value = serde_json::from_str(&delivery.body).expect("json body");
    assert_eq!(payload["webhook_id"], webhook_id);
    assert_eq!(payload["conversation_id"], conversation_id);
    serde_json::from_value(payload["events"].clone()).expect("events are protocol messages")
}

/// Receive deliveries until the events up to `last_seq` arrived; checks each
/// delivery's signature and that events come in order without gaps (a retried batch
/// may repeat events already delivered, never skip any). Returns the events
/// (deduplicated) and every delivery.
pub async fn receive_until(
    rx: &mut mpsc::Receiver<Delivery>,
    webhook: &switchboard_proto::v1::Webhook,
    last_seq: u64,
    limit: Duration,
) -> (Vec<Message>, Vec<Delivery>) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut events: Vec<Message> = Vec::new();
    let mut deliveries = Vec::new();
    let mut acknowledged = webhook.delivered_seq;
    while acknowledged < last_seq {
        let delivery = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("webhook events up to {last_seq} not delivered within {limit:?}; got {events:?}")
            })
            .expect("receiver running");
        let batch = verify(
            &delivery,
            &webhook.webhook_id,
            &webhook.conversation_id,
            &webhook.secret,
        );
        assert!(
            !batch.is_empty() && batch.len() <= 50,
            "1..=50 events per POST"
        );
        let seqs: Vec<u64> = batch.iter().map(|m| m.seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "a batch is in order without gaps: {seqs:?}"
        );
        assert!(
            seqs[0] <= acknowledged + 1,
            "no event skipped: batch {seqs:?} after {acknowledged} acknowledged"
        );
        if delivery.status == 200 {
            for m in batch {
                if m.seq > acknowledged {
                    acknowledged = m.seq;
                    events.push(m);
                }
            }
        }
        deliveries.push(delivery);
    }
    (events, deliveries)
}

pub async fn put_webhook(
    port: u16,
    token: &str,
    conversation_id: &str,
    url: &str,
) -> (u16, String) {
    http(
        port,
        "POST",
        &format!("/v1/conversations/{conversation_id}/webhooks"),
        token,
        Some(&serde_json::json!({ "url": url }).to_string()),
    )
    .await
}

pub fn parse_webhook(status: u16, body: &str) -> switchboard_proto::v1::Webhook {
    assert!(
        status == 200 || status == 201,
        "webhook created: {status} {body}"
    );
    serde_json::from_str(body).expect("a webhook")
}
