//! The client HTTP listener: the WebSocket upgrade at `/v1/connect`, the HTTP API
//! (`crate::api`), health and metrics, and in dev mode the chat page and the token
//! endpoint.
//!
//! Its accept loop ([`serve_clients`]) is the gateway's own rather than
//! `axum::serve`, for what unauthenticated clients must not hold: a complete request
//! header within `gateway.header_read_timeout_ms`, at most
//! `gateway.max_pending_upgrades` connections not yet upgraded, at most
//! `gateway.max_connections_per_ip` connections from one address.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Extension, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use switchboard_proto::codec::Encoding;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::connection::{self, hard_frame_cap, SessionGuard};
use crate::limits::{IpGuard, PendingGuard};
use crate::sessions::{lock, Session};
use crate::Shared;

/// Pause after a failed accept (out of file descriptors, for example), so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What one accepted TCP connection holds against the listener's caps, shared with
/// its requests (as a request extension) so that `/v1/connect` can hand the
/// per-IP count to the WebSocket and release the pending count at the upgrade.
pub(crate) struct ConnectionCaps {
    /// Released when the connection is upgraded (or closes).
    pending: Mutex<Option<PendingGuard>>,
    /// Moved to the WebSocket's session at the upgrade, else released at close.
    ip: Mutex<Option<IpGuard>>,
}

/// Serve the client listener until `stop`: each connection gets hyper's HTTP/1
/// server with the header read timeout and upgrades, counted against the pending
/// and per-IP caps; connections over a cap are closed at once.
pub(crate) async fn serve_clients(
    listener: TcpListener,
    app: Router,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let header_read_timeout = Duration::from_millis(shared.config.gateway.header_read_timeout_ms);
    loop {
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let rejected = |reason: &str| {
            shared
                .metrics
                .connections_rejected
                .with_label_values(&[reason])
                .inc();
        };
        let Some(ip) = shared.per_ip.try_acquire(peer.ip()) else {
            rejected("per_ip");
            debug!(peer = %peer.ip(), "connection refused: per-ip limit");
            continue;
        };
        let Some(pending) = shared.pending_upgrades.try_acquire() else {
            rejected("pending_upgrades");
            debug!("connection refused: too many pending upgrades");
            continue;
        };
        // Small frames (an ack, then the message event) must not wait for the
        // client's delayed ACK: no Nagle on client sockets.
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let caps = Arc::new(ConnectionCaps {
            pending: Mutex::new(Some(pending)),
            ip: Mutex::new(Some(ip)),
        });
        let app = app.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |mut request: axum::http::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(caps.clone());
                    let mut app = app.clone();
                    async move {
                        tower_service::Service::call(&mut app, request.map(axum::body::Body::new))
                            .await
                    }
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(error = %e, "client connection ended with an error");
            }
        });
    }
}

/// The development chat page (plain HTML and JavaScript, no build step).
const CHAT_PAGE: &str = include_str!("../assets/chat.html");
/// Lifetime of development tokens.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest device id, in bytes.
pub(crate) const MAX_DEVICE_BYTES: usize = 64;

pub(crate) fn router(
    shared: Arc<Shared>,
    registry: prometheus::Registry,
    readiness: switchboard_telemetry::Readiness,
) -> Router {
    let mut routes = Router::new().route("/v1/connect", get(connect));
    if shared.config.dev_mode {
        routes = routes
            .route("/", get(|| async { Html(CHAT_PAGE) }))
            .route("/v1/dev/token", get(dev_token));
    }
    let api = crate::api::router(shared.clone(), &registry);
    routes
        .with_state(shared)
        .merge(api)
        .merge(switchboard_telemetry::admin_router(registry, readiness))
}

#[derive(Debug, Default, Deserialize)]
struct ConnectParams {
    token: Option<String>,
    device: Option<String>,
    /// The session's initial presence status (default `online`).
    status: Option<String>,
}

/// A refused upgrade: `{"error": code, "message": reason}`.
fn refuse(
    shared: &Shared,
    status: StatusCode,
    label: &str,
    code: &str,
    message: String,
) -> Response {
    shared
        .metrics
        .connections_rejected
        .with_label_values(&[label])
        .inc();
    (
        status,
        Json(serde_json::json!({ "error": code, "message": message })),
    )
        .into_response()
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The encoding for the offered subprotocols: the first known one in the client's
/// order; JSON when none is offered; `Err` when only unknown ones are.
fn choose_encoding(headers: &HeaderMap) -> Result<Option<Encoding>, String> {
    let offered: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        return Ok(None);
    }
    offered
        .iter()
        .find_map(|p| Encoding::from_subprotocol(p))
        .map(Some)
        .ok_or_else(|| {
            format!(
                "no supported subprotocol offered (supported: {}, {})",
                Encoding::Json.subprotocol(),
                Encoding::Proto.subprotocol()
            )
        })
}

fn validate_device(device: &str) -> Result<(), String> {
    if device.is_empty() || device.len() > MAX_DEVICE_BYTES {
        return Err(format!("device must be 1 to {MAX_DEVICE_BYTES} bytes"));
    }
    if !device
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err("device may hold only letters, digits and - _ . :".into());
    }
    Ok(())
}

async fn connect(
    State(shared): State<Arc<Shared>>,
    caps: Option<Extension<Arc<ConnectionCaps>>>,
    headers: HeaderMap,
    query: Result<Query<ConnectParams>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let params = match query {
        Ok(Query(params)) => params,
        Err(e) => {
            return refuse(
                &shared,
                StatusCode::BAD_REQUEST,
                "bad_request",
                "invalid_request",
                e.body_text(),
            )
        }
    };
    let token = bearer(&headers).or(params.token.as_deref());
    let claims = match token {
        None => Err("missing token".to_owned()),
        Some(token) => shared.verifier.verify(token).map_err(|e| e.to_string()),
    };
    let claims = match claims {
        Ok(claims) => claims,
        Err(reason) => {
            return refuse(
                &shared,
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unauthorized",
                reason,
            )
        }
    };
    let encoding = match choose_encoding(&headers) {
        Ok(encoding) => encoding,
        Err(reason) => {
            return refuse(
                &shared,
                StatusCode::BAD_REQUEST,
                "bad_subprotocol",
                "invalid_request",
                reason,
            )
        }
    };
    let device = params.device.unwrap_or_else(|| "default".to_owned());
    if let Err(reason) = validate_device(&device) {
        return refuse(
            &shared,
            StatusCode::BAD_REQUEST,
            "bad_device",
            "invalid_request",
            reason,
        );
    }
    let status = match params.status.as_deref() {
        None | Some("") => crate::sessions::SESSION_STATUSES[0],
        Some(s) => match crate::sessions::session_status(s) {
            Some(status) => status,
            None => {
                return refuse(
                    &shared,
                    StatusCode::BAD_REQUEST,
                    "bad_status",
                    "invalid_request",
                    "status must be `online`, `away`, `busy` or `invisible`".into(),
                )
            }
        },
    };
    if shared.draining.is_cancelled() {
        return refuse(
            &shared,
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "draining",
            "the gateway is shutting down; connect to another one".into(),
        );
    }
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let Some(slot) = shared.slots.try_acquire() else {
        return refuse(
            &shared,
            StatusCode::SERVICE_UNAVAILABLE,
            "at_capacity",
            "unavailable",
            "the gateway is at its connection limit".into(),
        );
    };

    let config = &shared.config.gateway;
    let session_id: Arc<str> = uuid::Uuid::new_v4().to_string().into();
    let session = Session::for_account(
        session_id,
        claims.sub.into(),
        claims.bot,
        device.into(),
        encoding.unwrap_or(Encoding::Json),
        crate::sessions::QueueLimits {
            frames: config.outbound_queue,
            bytes: config.outbound_queue_bytes,
        },
    );
    // Registered with its status from the start: a session opened invisible never
    // shows its user online, not even for a moment.
    session.choose_status(status);
    // Local first: an event routed to the session right after presence knows it
    // finds it here and waits in its queue until the connection task starts.
    let per_user = config.max_connections_per_user;
    if !shared.sessions.try_insert(session.clone(), per_user) {
        return refuse(
            &shared,
            StatusCode::TOO_MANY_REQUESTS,
            "per_user",
            "rate_limited",
            format!("a user may have at most {per_user} connections on this gateway"),
        );
    }
    let (pending, ip) = match &caps {
        Some(Extension(caps)) => (lock(&caps.pending).take(), lock(&caps.ip).take()),
        None => (None, None),
    };
    let guard = SessionGuard {
        shared: shared.clone(),
        session: session.clone(),
        token_exp_secs: claims.exp,
        _slot: slot,
        _ip: ip,
    };
    if let Err(status) = shared.register(&session).await {
        let code = switchboard_proto::status_error_code(&status);
        if matches!(
            code,
            switchboard_proto::ErrorCode::Unavailable | switchboard_proto::ErrorCode::Timeout
        ) {
            // Presence is unreachable: the session is served anyway. The heartbeat
            // registers it once presence answers (it reports the session unknown) and
            // then tells it to resync; until then its user shows offline, and routing
            // reaches this gateway through the known-gateway superset.
            warn!(error = %status.message(), "presence unreachable; session registered later");
            shared.metrics.registrations_deferred.inc();
        } else {
            warn!(error = %status.message(), "cannot register session with presence");
            drop(guard);
            return refuse(
                &shared,
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "unavailable",
                "the session cannot be registered, retry later".into(),
            );
        }
    }
    debug!(session_id = %session.session_id, user_id = %session.user_id, "upgrading");

    let hard_cap = hard_frame_cap(shared.config.max_json_frame_bytes());
    let mut upgrade = upgrade
        .read_buffer_size(config.read_buffer_bytes)
        .write_buffer_size(config.write_buffer_bytes)
        .max_message_size(hard_cap)
        .max_frame_size(hard_cap);
    if let Some(encoding) = encoding {
        upgrade = upgrade.protocols([encoding.subprotocol()]);
    }
    // If the upgrade fails, the callback is dropped with the guard, which releases
    // the session.
    upgrade.on_upgrade(move |socket| {
        // Upgraded: no longer pending; the per-IP count lives as long as the session.
        drop(pending);
        connection::serve(socket, guard)
    })
}

#[derive(Debug, Deserialize)]
struct DevTokenParams {
    user: Option<String>,
}

async fn dev_token(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<DevTokenParams>, QueryRejection>,
) -> Response {
    let bad = |message: String| {
        (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": "invalid_request", "message": message })),
        )
            .into_response()
    };
    let user = match query {
        Ok(Query(DevTokenParams { user: Some(user) })) => user,
        Ok(_) => return bad("`user` is required".into()),
        Err(e) => return bad(e.body_text()),
    };
    if let Err(e) = switchboard_auth::validate_user_id(&user) {
        return bad(e.to_string());
    }
    let Some(signer) = &shared.signer else {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": "not_found", "message": "dev mode is off" })),
        )
            .into_response();
    };
    match signer.sign(&user, DEV_TOKEN_TTL) {
        Ok(token) => Json(serde_json::json!({ "token": token, "user_id": user })).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({ "error": "internal", "message": e.to_string() })),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(protocols: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for p in protocols {
            h.append(header::SEC_WEBSOCKET_PROTOCOL, p.parse().unwrap());
        }
        h
    }

    #[test]
    fn subprotocol_choice_follows_the_client_order() {
        assert_eq!(choose_encoding(&headers(&[])), Ok(None));
        assert_eq!(
            choose_encoding(&headers(&[
                "foo, switchboard.v1.proto, switchboard.v1.json"
            ])),
            Ok(Some(Encoding::Proto))
        );
        assert_eq!(
            choose_encoding(&headers(&["switchboard.v1.json"])),
            Ok(Some(Encoding::Json))
        );
        assert!(choose_encoding(&headers(&["graphql-ws"])).is_err());
    }

    #[test]
    fn device_ids_are_validated() {
        assert!(validate_device("phone-1").is_ok());
        assert!(validate_device("").is_err());
        assert!(validate_device("a b").is_err());
        assert!(validate_device(&"x".repeat(65)).is_err());
    }

    #[test]
    fn bearer_tokens_are_read_from_the_header() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
