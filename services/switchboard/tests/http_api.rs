//! End-to-end tests of the gateway's HTTP API on `switchboard standalone`: real
//! process, real backends, plain HTTP/1.1 next to WebSocket clients on the same port.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    fn expect(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{self:?}");
        if self.body.is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }

    fn expect_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.json()["code"], code, "{self:?}");
    }
}

fn dechunk(mut body: &str) -> String {
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

/// One request to the gateway's client port (`token` empty: no Authorization).
async fn call(
    port: u16,
    method: &str,
    path: &str,
    token: &str,
    extra: &[(&str, &str)],
    body: Option<Value>,
) -> Reply {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    if !token.is_empty() {
        head.push_str(&format!("authorization: Bearer {token}\r\n"));
    }
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to the gateway");
        s.write_all(head.as_bytes()).await.expect("write head");
        s.write_all(body.as_bytes()).await.expect("write body");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read response");
        out
    };
    let out = tokio::time::timeout(WAIT, exchange)
        .await
        .expect("HTTP exchange timed out");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.get(9..12))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Reply {
        status,
        headers,
        body,
    }
}

/// `switchboard token` with the setup's secret.
fn token_command(setup: &Setup, args: &[&str]) -> String {
    let out = std::process::Command::new(bin())
        .arg("token")
        .args(args)
        .env_clear()
        .envs(setup.env.iter().cloned())
        .current_dir(setup.data_dir())
        .output()
        .expect("run switchboard token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8 token")
        .trim()
        .to_owned()
}

#[tokio::test]
async fn an_integration_creates_sends_reads_and_sees_presence_over_http() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let port = setup.gateway.listen;
    let (bob, mut bob_ev) = setup.connect("bob", "phone").await;
    let token = token_command(&setup, &["--user", "ci-bot", "--bot", "--ttl", "10m"]);

    // A group with bob, created over HTTP.
    let created = call(
        port,
        "POST",
        "/v1/conversations",
        &token,
        &[],
        Some(json!({"kind": "group", "members": ["bob"], "name": "builds"})),
    )
    .await
    .expect(200);
    let id = created["conversation_id"].as_str().unwrap().to_owned();
    let mut members: Vec<&str> = created["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    members.sort();
    assert_eq!(members, ["bob", "ci-bot"]);
    assert_eq!(created["owner_id"], "ci-bot");

    // A send with an idempotency key reaches bob live, marked as a bot's; the retry
    // is answered with the original.
    let messages_path = format!("/v1/conversations/{id}/messages");
    let key = [("idempotency-key", "build-77")];
    let sent = call(
        port,
        "POST",
        &messages_path,
        &token,
        &key,
        Some(json!({"body": "build 77 passed", "content_type": "text/plain"})),
    )
    .await
    .expect(200);
    let seq = sent["seq"].as_u64().unwrap();
    assert!(seq >= 1, "{sent}");
    assert_eq!(sent["duplicate"], false);
    let live = messages(&mut bob_ev, &id, 1).await;
    assert_eq!(live[0].seq, seq);
    assert_eq!(live[0].sender_id, "ci-bot");
    assert_eq!(live[0].sender_device, "http");
    assert_eq!(live[0].client_msg_id, "build-77");
    assert!(live[0].from_bot);
    let retry = call(
        port,
        "POST",
        &messages_path,
        &token,
        &key,
        Some(json!({"body": "build 77 passed"})),
    )
    .await
    .expect(200);
    assert_eq!(retry["seq"].as_u64(), Some(seq));
    assert_eq!(retry["duplicate"], true);
    assert_eq!(retry["message_id"], sent["message_id"]);

    // bob answers over WebSocket; the integration reads the timeline forward.
    let reply = bob.send(&id, "thanks").await.unwrap();
    let page = call(
        port,
        "GET",
        &format!("{messages_path}?from_seq={seq}&direction=forward&limit=10"),
        &token,
        &[],
        None,
    )
    .await
    .expect(200);
    let bodies: Vec<(u64, &str)> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["kind"] == "" || m["kind"] == "message")
        .map(|m| (m["seq"].as_u64().unwrap(), m["body"].as_str().unwrap()))
        .collect();
    assert_eq!(bodies, [(reply.seq, "thanks")]);
    assert_eq!(page["has_more"], false);

    // The conversation as read and listed by the integration.
    let got = call(
        port,
        "GET",
        &format!("/v1/conversations/{id}"),
        &token,
        &[],
        None,
    )
    .await
    .expect(200);
    assert_eq!(got["conversation_id"], id.as_str());
    assert_eq!(got["name"], "builds");
    let list = call(port, "GET", "/v1/conversations", &token, &[], None)
        .await
        .expect(200);
    assert!(list["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["conversation_id"] == id.as_str()));

    // bob is online on his phone; nobody is "ghost".
    let presence = call(
        port,
        "GET",
        "/v1/presence?user_ids=bob,ghost",
        &token,
        &[],
        None,
    )
    .await
    .expect(200);
    let users: HashMap<&str, &Value> = presence["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["user_id"].as_str().unwrap(), u))
        .collect();
    assert_eq!(users["bob"]["status"], "online", "{presence}");
    assert!(users["bob"]["sessions"].as_u64().unwrap() >= 1);
    assert_eq!(users["ghost"]["status"], "offline");
    // The HTTP caller is not a session: its own presence stays offline.
    let me = call(
        port,
        "GET",
        "/v1/presence?user_ids=ci-bot",
        &token,
        &[],
        None,
    )
    .await
    .expect(200);
    assert_eq!(me["users"][0]["status"], "offline", "{me}");
}

#[tokio::test]
async fn http_errors_use_the_protocol_codes_and_statuses() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let port = setup.gateway.listen;
    let (alice, _alice_ev) = setup.connect("alice", "d").await;
    let conv = alice.create_direct("bob").await.unwrap();
    let id = &conv.conversation_id;

    let reply = call(port, "GET", "/v1/conversations", "", &[], None).await;
    reply.expect_error(401, "unauthorized");
    assert!(reply.headers["www-authenticate"].starts_with("Bearer"));
    let forged = switchboard_auth::Signer::hs256(b"not-the-server-secret-not-the-server")
        .sign("alice", Duration::from_secs(60))
        .unwrap();
    call(port, "GET", "/v1/conversations", &forged, &[], None)
        .await
        .expect_error(401, "unauthorized");

    let mallory = setup.token("mallory");
    call(
        port,
        "POST",
        &format!("/v1/conversations/{id}/messages"),
        &mallory,
        &[],
        Some(json!({"body": "let me in"})),
    )
    .await
    .expect_error(403, "not_member");
    call(
        port,
        "GET",
        &format!("/v1/conversations/{id}/messages"),
        &mallory,
        &[],
        None,
    )
    .await
    .expect_error(403, "not_member");

    let alice_token = setup.token("alice");
    let reply = call(
        port,
        "GET",
        "/v1/conversations/no-such-conversation",
        &alice_token,
        &[],
        None,
    )
    .await;
    // The same answer as for a conversation she is not in: existence is not revealed.
    reply.expect_error(403, "not_member");
    let raw = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let body = "{\"body\": ";
        s.write_all(
            format!(
                "POST /v1/conversations/{id}/messages HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
                 authorization: Bearer {alice_token}\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let out = tokio::time::timeout(WAIT, raw).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("bad_frame"), "{out}");

    // A body above routing.max_body_bytes (64 KiB by default) is refused like over
    // WebSocket.
    call(
        port,
        "POST",
        &format!("/v1/conversations/{id}/messages"),
        &alice_token,
        &[],
        Some(json!({"body": "x".repeat(70 * 1024)})),
    )
    .await
    .expect_error(400, "body_too_large");
}

#[tokio::test]
async fn every_documented_operation_is_answered_by_a_real_gateway() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let port = setup.gateway.listen;
    let doc: Value = serde_json::from_str(include_str!("../../../docs/openapi.json")).unwrap();
    let token = setup.token("alice");
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if method == "parameters" {
                continue;
            }
            let concrete = path
                .replace("{id}", "missing-conversation")
                .replace("{webhook_id}", "missing-webhook");
            let concrete = if path == "/v1/presence" {
                format!("{concrete}?user_ids=bob")
            } else {
                concrete
            };
            let body = (method == "post").then(|| json!({}));
            let reply = call(
                port,
                &method.to_ascii_uppercase(),
                &concrete,
                &token,
                &[],
                body,
            )
            .await;
            // Routed: a JSON answer of the API (an unrouted path is a bare 404, a
            // wrong method 405).
            assert_ne!(reply.status, 405, "{method} {path}: {reply:?}");
            if reply.status >= 400 {
                let error = reply.json();
                assert!(error["code"].is_string(), "{method} {path}: {reply:?}");
            }
        }
    }
}

#[tokio::test]
async fn webhooks_are_managed_over_http() {
    let setup = Setup::new(true);
    let _sb = setup.standalone().await;
    let port = setup.gateway.listen;
    let (alice, _alice_ev) = setup.connect("alice", "d").await;
    let group = alice.create_group("hooks", ["bob"]).await.unwrap();
    let id = &group.conversation_id;
    let alice_token = setup.token("alice");
    let path = format!("/v1/conversations/{id}/webhooks");

    let created = call(
        port,
        "POST",
        &path,
        &alice_token,
        &[],
        Some(json!({"url": "https://hooks.example.test/in"})),
    )
    .await
    .expect(201);
    let webhook_id = created["webhook_id"].as_str().unwrap().to_owned();
    assert_eq!(created["secret"].as_str().unwrap().len(), 64);
    assert_eq!(created["created_by"], "alice");

    let listed = call(port, "GET", &path, &alice_token, &[], None)
        .await
        .expect(200);
    assert_eq!(listed["webhooks"][0]["webhook_id"], webhook_id.as_str());
    assert_eq!(listed["webhooks"][0]["secret"], created["secret"]);
    let as_member = call(port, "GET", &path, &setup.token("bob"), &[], None)
        .await
        .expect(200);
    assert_eq!(
        as_member["webhooks"][0]["secret"], "",
        "secrets are for admins"
    );

    call(
        port,
        "DELETE",
        &format!("{path}/{webhook_id}"),
        &setup.token("bob"),
        &[],
        None,
    )
    .await
    .expect_error(403, "forbidden");
    let deleted = call(
        port,
        "DELETE",
        &format!("{path}/{webhook_id}"),
        &alice_token,
        &[],
        None,
    )
    .await;
    assert_eq!(deleted.status, 204, "{deleted:?}");
    call(
        port,
        "DELETE",
        &format!("{path}/{webhook_id}"),
        &alice_token,
        &[],
        None,
    )
    .await
    .expect_error(404, "not_found");
    let listed = call(port, "GET", &path, &alice_token, &[], None)
        .await
        .expect(200);
    assert_eq!(listed["webhooks"].as_array().map(Vec::len).unwrap_or(0), 0);
}
