//! The HTTP API for bots and integrations, served on the client listener next to
//! `/v1/connect` (documented in `docs/openapi.json`).
//!
//! Every endpoint that has a client request counterpart builds that
//! `client_frame::Request` and runs it through [`requests::dispatch`] with a
//! pseudo-session of the caller (user and bot flag from the verified token, device
//! `http`, session id `http-<uuid>`), so validation, backend calls and error codes are
//! the same as over WebSocket. The pseudo-session is never registered with presence
//! and receives no events. Presence reads and webhooks have no client request: they
//! call presence `Query` (a `presence_watch` would leave a watch behind) with the
//! WebSocket side's last-seen filter, and storage `PutWebhook` / `ListWebhooks` /
//! `DeleteWebhook`, directly.
//!
//! Errors are `{"code": "...", "message": "..."}` with the HTTP status of
//! [`http_status`]. Requests are limited per user by the token bucket a user's
//! WebSocket connections on this gateway also draw from (`gateway.requests_per_second`,
//! `gateway.request_burst`), and bodies by `Config::max_json_frame_bytes` (room for a
//! message body of `routing.max_body_bytes` in the worst JSON escaping).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, MethodRouter};
use axum::{Json, Router};
use prometheus::{IntCounterVec, Opts};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use switchboard_proto::codec::Encoding;
use switchboard_proto::v1::{self, ack, client_frame::Request};
use switchboard_proto::ErrorCode;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::error::GatewayError;
use crate::last_seen;
use crate::requests::{self, MAX_LIST};
use crate::sessions::{QueueLimits, Session};
use crate::Shared;

/// Device id of HTTP callers.
pub(crate) const HTTP_DEVICE: &str = "http";

/// One endpoint of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiRoute {
    /// HTTP method, upper case.
    pub method: &'static str,
    /// axum path syntax, which is also OpenAPI's (`{id}`).
    pub path: &'static str,
    /// The `operationId` in `docs/openapi.json`, and the metric label.
    pub operation: &'static str,
}

const fn route(method: &'static str, path: &'static str, operation: &'static str) -> ApiRoute {
    ApiRoute {
        method,
        path,
        operation,
    }
}

/// Every endpoint of the API: the router is built from this list, and a test checks
/// it against `docs/openapi.json` in both directions.
pub const API_ROUTES: &[ApiRoute] = &[
    route("POST", "/v1/conversations", "createConversation"),
    route("GET", "/v1/conversations", "listConversations"),
    route("GET", "/v1/conversations/{id}", "getConversation"),
    route("POST", "/v1/conversations/{id}/messages", "sendMessage"),
    route("GET", "/v1/conversations/{id}/messages", "getHistory"),
    route("GET", "/v1/presence", "getPresence"),
    route("POST", "/v1/conversations/{id}/webhooks", "createWebhook"),
    route("GET", "/v1/conversations/{id}/webhooks", "listWebhooks"),
    route(
        "DELETE",
        "/v1/conversations/{id}/webhooks/{webhook_id}",
        "deleteWebhook",
    ),
];

/// Longest `Idempotency-Key`, in bytes.
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

/// The HTTP status of an error code.
pub(crate) fn http_status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadFrame
        | ErrorCode::UnknownFrame
        | ErrorCode::InvalidRequest
        | ErrorCode::BodyTooLarge => StatusCode::BAD_REQUEST,
        ErrorCode::FrameTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::NotMember | ErrorCode::Forbidden | ErrorCode::Banned => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable | ErrorCode::Draining | ErrorCode::SlowConsumer => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A failed API call, as the client sees it.
struct ApiError(GatewayError);

impl From<GatewayError> for ApiError {
    fn from(e: GatewayError) -> Self {
        ApiError(e)
    }
}

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError(GatewayError::rejected(code, message))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let event = self.0.to_event();
        let code = self.0.code();
        let mut response = (
            http_status(code),
            Json(serde_json::json!({ "code": event.code, "message": event.message })),
        )
            .into_response();
        let headers = response.headers_mut();
        match code {
            ErrorCode::Unauthorized => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"switchboard\""),
                );
            }
            ErrorCode::RateLimited | ErrorCode::Draining | ErrorCode::Unavailable => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

type ApiResult = Result<Response, ApiError>;

/// State of the API handlers.
pub(crate) struct Api {
    shared: Arc<Shared>,
    /// Requests by operation and result code (`ok` or an error code).
    requests: IntCounterVec,
}

/// The verified caller of one request.
struct Caller {
    session: Arc<Session>,
}

impl Caller {
    fn user(&self) -> &str {
        &self.session.user_id
    }
}

/// The API's routes (with their state), to merge into the client listener's router.
pub(crate) fn router(shared: Arc<Shared>, registry: &prometheus::Registry) -> Router {
    let requests = IntCounterVec::new(
        Opts::new(
            "switchboard_gateway_http_requests_total",
            "HTTP API requests, by operation and result code",
        ),
        &["operation", "code"],
    )
    .expect("the metric's name and labels are valid");
    if let Err(e) = registry.register(Box::new(requests.clone())) {
        warn!(error = %e, "cannot register the HTTP API metric");
    }
    let api = Arc::new(Api {
        requests,
        shared: shared.clone(),
    });
    let mut router = Router::new();
    for route in API_ROUTES {
        router = router.route(route.path, method_router(route));
    }
    router
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                Json(serde_json::json!({
                    "code": ErrorCode::InvalidRequest.as_str(),
                    "message": "method not allowed on this path",
                })),
            )
        })
        .layer(DefaultBodyLimit::max(shared.config.max_json_frame_bytes()))
        .with_state(api)
}

/// The handler of one entry of [`API_ROUTES`].
fn method_router(route: &ApiRoute) -> MethodRouter<Arc<Api>> {
    match (route.method, route.operation) {
        ("POST", "createConversation") => post(create_conversation),
        ("GET", "listConversations") => get(list_conversations),
        ("GET", "getConversation") => get(get_conversation),
        ("POST", "sendMessage") => post(send_message),
        ("GET", "getHistory") => get(history),
        ("GET", "getPresence") => get(presence),
        ("POST", "createWebhook") => post(create_webhook),
        ("GET", "listWebhooks") => get(list_webhooks),
        ("DELETE", "deleteWebhook") => delete(delete_webhook),
        // API_ROUTES is a constant; a unit test builds the router from it.
        _ => unreachable!("API route {route:?} has no handler"),
    }
}

impl Api {
    /// Verify the bearer token, refuse while draining, and take a request from the
    /// caller's rate limit.
    fn authorize(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        if !headers.contains_key(header::AUTHORIZATION) {
            return Err(ApiError::new(ErrorCode::Unauthorized, "missing token"));
        }
        let token = crate::http::bearer(headers).ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "the Authorization header must be `Bearer <token>`",
            )
        })?;
        let claims = self
            .shared
            .verifier
            .verify(token)
            .map_err(|e| ApiError::new(ErrorCode::Unauthorized, e.to_string()))?;
        if self.shared.draining.is_cancelled() {
            return Err(ApiError::new(
                ErrorCode::Draining,
                "the gateway is shutting down; retry on another one",
            ));
        }
        if !self.shared.user_limiter.take(&claims.sub, Instant::now()) {
            return Err(ApiError::new(
                ErrorCode::RateLimited,
                "too many requests; slow down",
            ));
        }
        // Never registered nor given events: the queue is not used.
        let session = Session::for_account(
            format!("http-{}", uuid::Uuid::new_v4()).into(),
            claims.sub.into(),
            claims.bot,
            HTTP_DEVICE.into(),
            Encoding::Json,
            QueueLimits {
                frames: 1,
                bytes: 0,
            },
        );
        Ok(Caller { session })
    }

    /// Count the outcome and turn it into a response.
    fn finish(
        &self,
        operation: &'static str,
        caller: Option<&Caller>,
        result: ApiResult,
    ) -> Response {
        match result {
            Ok(response) => {
                self.requests.with_label_values(&[operation, "ok"]).inc();
                response
            }
            Err(e) => {
                let code = e.0.code();
                self.requests
                    .with_label_values(&[operation, code.as_str()])
                    .inc();
                let user = caller.map(Caller::user).unwrap_or_default();
                if matches!(
                    code,
                    ErrorCode::Internal | ErrorCode::Unavailable | ErrorCode::Timeout
                ) {
                    warn!(operation, user_id = %user, error = %e.0, "http request failed");
                } else {
                    debug!(operation, user_id = %user, code = %code, "http request refused");
                }
                e.into_response()
            }
        }
    }

    /// Authorize, run `call`, count and answer.
    async fn serve<F, Fut>(&self, operation: &'static str, headers: &HeaderMap, call: F) -> Response
    where
        F: FnOnce(Caller) -> Fut,
        Fut: std::future::Future<Output = (Caller, ApiResult)>,
    {
        let caller = match self.authorize(headers) {
            Ok(caller) => caller,
            Err(e) => return self.finish(operation, None, Err(e)),
        };
        let (caller, result) = call(caller).await;
        self.finish(operation, Some(&caller), result)
    }

    /// Run a client request through the WebSocket request path.
    async fn dispatch(&self, caller: &Caller, request: Request) -> Result<ack::Result, ApiError> {
        let accepted_at_ms = u64::try_from(crate::now_ms()).unwrap_or(0);
        Ok(requests::dispatch(&self.shared, &caller.session, request, accepted_at_ms).await?)
    }
}

fn json<T: Serialize>(value: &T) -> Response {
    Json(value).into_response()
}

/// A JSON request body; bad JSON is `bad_frame`, a body above the limit
/// `frame_too_large`.
fn parse_body<T: DeserializeOwned + Serialize>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::FrameTooLarge,
                "the request body is larger than the gateway accepts",
            )
        } else {
            ApiError::new(ErrorCode::BadFrame, rejection.body_text())
        }
    })?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::new(ErrorCode::BadFrame, "the body is not UTF-8"))?;
    switchboard_proto::codec::decode_json_object(text).map_err(|e| {
        ApiError::new(
            ErrorCode::BadFrame,
            format!("invalid JSON body: {}", e.message),
        )
    })
}

fn path<T>(path: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    path.map(|Path(p)| p)
        .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e.body_text()))
}

fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e.body_text()))
}

/// An ack result that is not the one the request gets: a bug, reported as internal
/// (not logged itself: it may hold message bodies).
fn unexpected(_result: &ack::Result) -> ApiError {
    ApiError::new(
        ErrorCode::Internal,
        "the request path answered with an unexpected result",
    )
}

// ------------------------------------------------------------------ handlers

async fn create_conversation(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    api.serve("createConversation", &headers, |caller| async {
        let result = async {
            let req: v1::ConversationCreateRequest = parse_body(body)?;
            match api
                .dispatch(&caller, Request::ConversationCreate(req))
                .await?
            {
                ack::Result::Conversation(c) => Ok(json(&c)),
                other => Err(unexpected(&other)),
            }
        }
        .await;
        (caller, result)
    })
    .await
}

async fn list_conversations(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    api.serve("listConversations", &headers, |caller| async {
        let result = async {
            match api
                .dispatch(
                    &caller,
                    Request::ConversationList(v1::ConversationListRequest {}),
                )
                .await?
            {
                ack::Result::Conversations(list) => Ok(json(&list)),
                other => Err(unexpected(&other)),
            }
        }
        .await;
        (caller, result)
    })
    .await
}

async fn get_conversation(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    api.serve("getConversation", &headers, |caller| async {
        let result = async {
            let conversation_id = path(id)?;
            let request = Request::ConversationMembers(v1::ConversationMembersRequest {
                conversation_id,
                action: "list".into(),
                user_ids: Vec::new(),
            });
            match api.dispatch(&caller, request).await? {
                ack::Result::Conversation(c) => Ok(json(&c)),
                other => Err(unexpected(&other)),
            }
        }
        .await;
        (caller, result)
    })
    .await
}

/// The idempotency key of a send: the body's `client_msg_id`, else the
/// `Idempotency-Key` header, else a new UUID. Both given and different is an error.
fn client_msg_id(body_key: String, headers: &HeaderMap) -> Result<String, ApiError> {
    let header_key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => {
            let key = value
                .to_str()
                .map_err(|_| {
                    ApiError::new(
                        ErrorCode::InvalidRequest,
                        "`Idempotency-Key` must be visible ASCII",
                    )
                })?
                .trim();
            if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("`Idempotency-Key` must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
                ));
            }
            Some(key.to_owned())
        }
    };
    match (body_key.is_empty(), header_key) {
        (true, None) => Ok(uuid::Uuid::new_v4().to_string()),
        (true, Some(key)) => Ok(key),
        (false, None) => Ok(body_key),
        (false, Some(key)) if key == body_key => Ok(key),
        (false, Some(_)) => Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "`client_msg_id` and `Idempotency-Key` differ",
        )),
    }
}

async fn send_message(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    api.serve("sendMessage", &headers, |caller| async {
        let result = async {
            let conversation_id = path(id)?;
            let mut req: v1::SendRequest = parse_body(body)?;
            if !req.conversation_id.is_empty() && req.conversation_id != conversation_id {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    "`conversation_id` in the body differs from the path",
                ));
            }
            req.conversation_id = conversation_id;
            req.client_msg_id = client_msg_id(std::mem::take(&mut req.client_msg_id), &headers)?;
            match api.dispatch(&caller, Request::Send(req)).await? {
                ack::Result::Send(sent) => {
                    api.shared.metrics.messages_accepted.inc();
                    Ok(json(&sent))
                }
                other => Err(unexpected(&other)),
            }
        }
        .await;
        (caller, result)
    })
    .await
}

#[derive(Debug, Default, Deserialize)]
struct HistoryParams {
    from_seq: Option<u64>,
    direction: Option<String>,
    limit: Option<u32>,
}

async fn history(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> Response {
    api.serve("getHistory", &headers, |caller| async {
        let result = async {
            let conversation_id = path(id)?;
            let params = query(params)?;
            let request = Request::History(v1::HistoryRequest {
                conversation_id,
                from_seq: params.from_seq.unwrap_or(0),
                direction: params.direction.unwrap_or_default(),
                limit: params.limit.unwrap_or(0),
            });
            match api.dispatch(&caller, request).await? {
                ack::Result::History(h) => Ok(json(&h)),
                other => Err(unexpected(&other)),
            }
        }
        .await;
        (caller, result)
    })
    .await
}

#[derive(Debug, Default, Deserialize)]
struct PresenceParams {
    user_ids: Option<String>,
}

/// The users of `?user_ids=a,b`: distinct, at most [`MAX_LIST`], none empty.
fn presence_users(params: PresenceParams) -> Result<Vec<String>, ApiError> {
    let list = params.user_ids.unwrap_or_default();
    let mut users: Vec<String> = Vec::new();
    for user in list.split(',').map(str::trim) {
        if user.is_empty() {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                "`user_ids` is a comma-separated list of user ids",
            ));
        }
        requests::check_user(user, "user_ids")?;
        if !users.iter().any(|u| u == user) {
            users.push(user.to_owned());
        }
    }
    if users.len() > MAX_LIST {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("`user_ids` holds more than {MAX_LIST} entries"),
        ));
    }
    Ok(users)
}

/// Presence of users as the caller may see it: presence answers the public view
/// (the caller's own true status); a last-seen time a user shows only to contacts is
/// cleared unless the caller is that user's contact (shares a conversation in which
/// that user has sent something), as for presence acks over WebSocket
/// ([`last_seen::filter`]).
async fn presence(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    params: Result<Query<PresenceParams>, QueryRejection>,
) -> Response {
    api.serve("getPresence", &headers, |caller| async {
        let result = async {
            let users = presence_users(query(params)?)?;
            let viewer = caller.user().to_owned();
            let mut found = api
                .shared
                .peers
                .presence
                .clone()
                .query(v1::QueryRequest {
                    user_ids: users,
                    viewer_id: viewer.clone(),
                })
                .await
                .map_err(GatewayError::backend("presence.query"))?
                .into_inner()
                .users;
            last_seen::filter(&api.shared, &viewer, &mut found).await;
            Ok(json(&v1::PresenceResult { users: found }))
        }
        .await;
        (caller, result)
    })
    .await
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default)]
struct WebhookBody {
    url: String,
}

async fn create_webhook(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    api.serve("createWebhook", &headers, |caller| async {
        let result = async {
            let conversation_id = path(id)?;
            requests::check_id(&conversation_id, "id")?;
            let body: WebhookBody = parse_body(body)?;
            if body.url.is_empty() {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    "`url` is required",
                ));
            }
            let webhook = api
                .shared
                .peers
                .storage
                .clone()
                .put_webhook(v1::PutWebhookRequest {
                    conversation_id: conversation_id.clone(),
                    actor_id: caller.user().to_owned(),
                    url: body.url,
                })
                .await
                .map_err(GatewayError::backend("storage.put_webhook"))?
                .into_inner();
            webhooks_changed(&api, conversation_id).await;
            Ok((StatusCode::CREATED, Json(webhook)).into_response())
        }
        .await;
        (caller, result)
    })
    .await
}

/// Tell routing that a conversation's webhooks changed, so its dispatcher starts or
/// stops them now rather than at its next periodic look. Best effort: the change is
/// stored, and routing finds it within its rediscovery period anyway.
async fn webhooks_changed(api: &Api, conversation_id: String) {
    let told = api
        .shared
        .peers
        .routing
        .publish(v1::PublishRequest {
            conversation_id,
            webhooks_changed: true,
            ..Default::default()
        })
        .await;
    if let Err(status) = told {
        tracing::warn!(code = ?status.code(), error = %status.message(), "routing not told of a webhook change; it finds it within 10 s");
    }
}

async fn list_webhooks(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    api.serve("listWebhooks", &headers, |caller| async {
        let result = async {
            let conversation_id = path(id)?;
            requests::check_id(&conversation_id, "id")?;
            let list = api
                .shared
                .peers
                .storage
                .clone()
                .list_webhooks(v1::ListWebhooksRequest {
                    conversation_id,
                    actor_id: caller.user().to_owned(),
                })
                .await
                .map_err(GatewayError::backend("storage.list_webhooks"))?
                .into_inner();
            Ok(json(&list))
        }
        .await;
        (caller, result)
    })
    .await
}

async fn delete_webhook(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    ids: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    api.serve("deleteWebhook", &headers, |caller| async {
        let result = async {
            let (conversation_id, webhook_id) = path(ids)?;
            requests::check_id(&conversation_id, "id")?;
            requests::check_id(&webhook_id, "webhook_id")?;
            api.shared
                .peers
                .storage
                .clone()
                .delete_webhook(v1::DeleteWebhookRequest {
                    conversation_id: conversation_id.clone(),
                    actor_id: caller.user().to_owned(),
                    webhook_id,
                })
                .await
                .map_err(GatewayError::backend("storage.delete_webhook"))?;
            webhooks_changed(&api, conversation_id).await;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await;
        (caller, result)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_has_a_handler() {
        for route in API_ROUTES {
            let _ = method_router(route);
        }
        let mut seen = std::collections::HashSet::new();
        for route in API_ROUTES {
            assert!(seen.insert((route.method, route.path)), "{route:?} twice");
            assert!(route.path.starts_with("/v1/"), "{route:?}");
        }
    }

    #[test]
    fn error_codes_map_to_the_documented_statuses() {
        use ErrorCode::*;
        for (code, status) in [
            (InvalidRequest, 400),
            (BadFrame, 400),
            (BodyTooLarge, 400),
            (FrameTooLarge, 413),
            (Unauthorized, 401),
            (NotMember, 403),
            (Forbidden, 403),
            (Banned, 403),
            (NotFound, 404),
            (RateLimited, 429),
            (Unavailable, 503),
            (Draining, 503),
            (Timeout, 504),
            (Internal, 500),
        ] {
            assert_eq!(http_status(code).as_u16(), status, "{code}");
        }
    }

    #[test]
    fn the_idempotency_key_comes_from_the_body_the_header_or_is_new() {
        let mut h = HeaderMap::new();
        let fresh = client_msg_id(String::new(), &h).ok().unwrap();
        assert!(uuid::Uuid::parse_str(&fresh).is_ok());
        assert_eq!(client_msg_id("k1".into(), &h).ok().unwrap(), "k1");
        h.insert("idempotency-key", HeaderValue::from_static("k2"));
        assert_eq!(client_msg_id(String::new(), &h).ok().unwrap(), "k2");
        assert_eq!(client_msg_id("k2".into(), &h).ok().unwrap(), "k2");
        let e = client_msg_id("k1".into(), &h).err().unwrap();
        assert_eq!(e.0.code(), ErrorCode::InvalidRequest);
        h.insert(
            "idempotency-key",
            HeaderValue::from_str(&"x".repeat(MAX_IDEMPOTENCY_KEY_BYTES + 1)).unwrap(),
        );
        assert!(client_msg_id(String::new(), &h).is_err());
    }

    #[test]
    fn presence_user_lists_are_split_deduplicated_and_bounded() {
        let users = |s: &str| {
            presence_users(PresenceParams {
                user_ids: Some(s.to_owned()),
            })
        };
        assert_eq!(users("a,b, a").ok().unwrap(), ["a", "b"]);
        assert!(users("a,,b").is_err());
        assert!(presence_users(PresenceParams::default()).is_err());
        let many: Vec<String> = (0..=MAX_LIST).map(|i| format!("u{i}")).collect();
        assert!(users(&many.join(",")).is_err());
    }
}
