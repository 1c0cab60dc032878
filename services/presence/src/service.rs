//! The `Presence` gRPC service: input validation, the store call, and queueing
//! presence-change notifications. No presence logic lives here; the store owns it.

use std::sync::Arc;
use std::time::Instant;

use switchboard_proto::v1::presence_interest_server::PresenceInterest;
use switchboard_proto::v1::presence_server::Presence;
use switchboard_proto::v1::{
    DropGatewayRequest, DropGatewayResponse, HeartbeatRequest, HeartbeatResponse, QueryRequest,
    QueryResponse, RegisterSessionRequest, RegisterSessionResponse, RouteConversationRequest,
    RouteRequest, RouteResponse, SetStatusRequest, SetStatusResponse, UnregisterSessionRequest,
    UnregisterSessionResponse, WatchRequest,
};
use switchboard_rpc::GatewayPool;
use tonic::{Request, Response, Status};

use crate::error::PresenceError;
use crate::metrics::{Metrics, INTEREST_HIT, INTEREST_MISS};
use crate::notifier::Notifications;
use crate::rebuild::StateWatch;
use crate::store::{
    is_privacy, NewSession, SessionStatus, SessionStore, StatusChange, MAX_STATUS_TEXT_BYTES,
};

/// Longest id (session, user, device) accepted, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Longest gateway URL accepted, in bytes.
pub const MAX_URL_BYTES: usize = 512;
/// Most users in one Query, Route or Watch, and most members in one RouteConversation
/// (storage's member cap).
pub const MAX_USERS_PER_REQUEST: usize = 10_000;
/// Most sessions in one Heartbeat (gateways with more split the batch).
pub const MAX_HEARTBEAT_SESSIONS: usize = 100_000;

/// Handlers of `switchboard.v1.Presence`.
pub(crate) struct PresenceService {
    /// Where all presence state lives.
    store: Arc<dyn SessionStore>,
    /// Queue of presence changes to tell watchers about.
    notifications: Notifications,
    /// Channels to gateways; a dropped gateway's channel is forgotten.
    gateways: GatewayPool,
    metrics: Metrics,
    /// The store's epoch, and whether routes are partial while it is rebuilt.
    state: Arc<StateWatch>,
}

impl PresenceService {
    pub fn new(
        store: Arc<dyn SessionStore>,
        notifications: Notifications,
        gateways: GatewayPool,
        metrics: Metrics,
        state: Arc<StateWatch>,
    ) -> Self {
        PresenceService {
            store,
            notifications,
            gateways,
            metrics,
            state,
        }
    }

    fn timer(&self, method: &str) -> RpcTimer {
        RpcTimer {
            histogram: self.metrics.rpc_seconds.with_label_values(&[method]),
            start: Instant::now(),
        }
    }
}

/// Handlers of `switchboard.v1.PresenceInterest` (the interest index).
pub(crate) struct InterestService {
    /// Where the interest index lives.
    store: Arc<dyn SessionStore>,
    metrics: Metrics,
    state: Arc<StateWatch>,
}

impl InterestService {
    pub fn new(store: Arc<dyn SessionStore>, metrics: Metrics, state: Arc<StateWatch>) -> Self {
        InterestService {
            store,
            metrics,
            state,
        }
    }
}

#[tonic::async_trait]
impl PresenceInterest for InterestService {
    async fn route_conversation(
        &self,
        request: Request<RouteConversationRequest>,
    ) -> Result<Response<RouteResponse>, Status> {
        let _timer = RpcTimer {
            histogram: self
                .metrics
                .rpc_seconds
                .with_label_values(&["route_conversation"]),
            start: Instant::now(),
        };
        let req = request.into_inner();
        check_id("conversation_id", &req.conversation_id)?;
        check_ids("member_ids", &req.member_ids, MAX_USERS_PER_REQUEST)?;
        let answer = self
            .store
            .route_conversation(&req.conversation_id, &req.member_ids)
            .await?;
        let result = if answer.cached {
            INTEREST_HIT
        } else {
            INTEREST_MISS
        };
        self.metrics
            .interest_lookups
            .with_label_values(&[result])
            .inc();
        Ok(Response::new(RouteResponse {
            routes: answer.routes,
            partial: self.state.partial(),
        }))
    }
}

/// Observes a method's latency when dropped (on every return path).
struct RpcTimer {
    histogram: prometheus::Histogram,
    start: Instant,
}

impl Drop for RpcTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

fn invalid(msg: impl Into<String>) -> PresenceError {
    PresenceError::InvalidRequest(msg.into())
}

fn check_id(field: &str, value: &str) -> Result<(), PresenceError> {
    if value.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    check_len(field, value, MAX_ID_BYTES)
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), PresenceError> {
    if value.len() > max {
        return Err(invalid(format!("{field} is longer than {max} bytes")));
    }
    Ok(())
}

fn check_gateway_url(value: &str) -> Result<(), PresenceError> {
    if value.is_empty() {
        return Err(invalid("gateway_addr is required"));
    }
    check_len("gateway_addr", value, MAX_URL_BYTES)?;
    if !(value.starts_with("http://") || value.starts_with("https://")) {
        return Err(invalid("gateway_addr must be an http(s) URL"));
    }
    Ok(())
}

fn check_ids(field: &str, values: &[String], max: usize) -> Result<(), PresenceError> {
    if values.len() > max {
        return Err(invalid(format!("{field} has more than {max} entries")));
    }
    values.iter().try_for_each(|v| check_id(field, v))
}

/// Parse a session status; `None` when empty.
fn parse_status(status: &str) -> Result<Option<SessionStatus>, PresenceError> {
    match status {
        "" => Ok(None),
        s => SessionStatus::parse(s)
            .map(Some)
            .ok_or_else(|| invalid("status must be `online`, `away`, `busy` or `invisible`")),
    }
}

/// Validate a `SetStatus` request into the session id and the change it asks for.
fn status_change(req: SetStatusRequest) -> Result<(String, StatusChange), PresenceError> {
    let status = parse_status(&req.status)?;
    if req.automatic && !matches!(status, Some(SessionStatus::Away | SessionStatus::Online)) {
        return Err(invalid("an automatic status is `away` or `online`"));
    }
    if let Some(text) = &req.status_text {
        check_len("status_text", text, MAX_STATUS_TEXT_BYTES)?;
        if text.chars().any(char::is_control) {
            return Err(invalid("status_text must not contain control characters"));
        }
    }
    let last_seen_privacy = match req.last_seen_privacy.as_str() {
        "" => None,
        p if is_privacy(p) => Some(p.to_owned()),
        _ => {
            return Err(invalid(
                "last_seen_privacy must be `everyone`, `contacts` or `nobody`",
            ))
        }
    };
    Ok((
        req.session_id,
        StatusChange {
            status,
            automatic: req.automatic,
            status_text: req.status_text,
            last_seen_privacy,
        },
    ))
}

#[tonic::async_trait]
impl Presence for PresenceService {
    async fn register_session(
        &self,
        request: Request<RegisterSessionRequest>,
    ) -> Result<Response<RegisterSessionResponse>, Status> {
        let _timer = self.timer("register_session");
        let session = request
            .into_inner()
            .session
            .ok_or_else(|| invalid("session is required"))?;
        check_id("session_id", &session.session_id)?;
        check_id("user_id", &session.user_id)?;
        check_len("device_id", &session.device_id, MAX_ID_BYTES)?;
        check_gateway_url(&session.gateway_addr)?;
        let status = parse_status(&session.status)?.unwrap_or(SessionStatus::Online);
        if session.automatic && status != SessionStatus::Away {
            return Err(invalid("an automatic status at registration is `away`").into());
        }
        let update = self
            .store
            .register(NewSession {
                session_id: session.session_id,
                user_id: session.user_id,
                device_id: session.device_id,
                gateway_url: session.gateway_addr,
                status,
                automatic: session.automatic,
            })
            .await?;
        if update.changed {
            self.notifications.publish(update.presence.public_view());
        }
        // The response goes to the user themselves: the true view.
        Ok(Response::new(RegisterSessionResponse {
            presence: Some(update.presence.true_view()),
        }))
    }

    async fn unregister_session(
        &self,
        request: Request<UnregisterSessionRequest>,
    ) -> Result<Response<UnregisterSessionResponse>, Status> {
        let _timer = self.timer("unregister_session");
        let session_id = request.into_inner().session_id;
        check_id("session_id", &session_id)?;
        if let Some(update) = self.store.unregister(&session_id).await? {
            if update.changed {
                self.notifications.publish(update.presence.public_view());
            }
        }
        Ok(Response::new(UnregisterSessionResponse {}))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let _timer = self.timer("heartbeat");
        let req = request.into_inner();
        check_gateway_url(&req.gateway_addr)?;
        check_ids("session_ids", &req.session_ids, MAX_HEARTBEAT_SESSIONS)?;
        self.metrics
            .heartbeat_sessions
            .observe(req.session_ids.len() as f64);
        // The epoch first: a gateway that sees it change registers everything again.
        let epoch = self.state.check().await?;
        let unknown = if req.session_ids.is_empty() {
            Vec::new()
        } else {
            self.store
                .heartbeat(&req.gateway_addr, &req.session_ids)
                .await?
        };
        self.metrics.heartbeat_unknown.inc_by(unknown.len() as u64);
        Ok(Response::new(HeartbeatResponse {
            unknown_session_ids: unknown,
            epoch,
        }))
    }

    async fn set_status(
        &self,
        request: Request<SetStatusRequest>,
    ) -> Result<Response<SetStatusResponse>, Status> {
        let _timer = self.timer("set_status");
        let req = request.into_inner();
        check_id("session_id", &req.session_id)?;
        let (session_id, change) = status_change(req)?;
        let update = self.store.set_status(&session_id, &change).await?;
        if update.changed {
            self.notifications.publish(update.presence.public_view());
        }
        // The response goes to the user themselves: the true view.
        Ok(Response::new(SetStatusResponse {
            presence: Some(update.presence.true_view()),
        }))
    }

    async fn query(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<QueryResponse>, Status> {
        let _timer = self.timer("query");
        let req = request.into_inner();
        check_ids("user_ids", &req.user_ids, MAX_USERS_PER_REQUEST)?;
        check_len("viewer_id", &req.viewer_id, MAX_ID_BYTES)?;
        let users = self
            .store
            .query(&req.user_ids)
            .await?
            .iter()
            .map(|state| state.view_for(&req.viewer_id))
            .collect();
        Ok(Response::new(QueryResponse { users }))
    }

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<QueryResponse>, Status> {
        let _timer = self.timer("watch");
        let req = request.into_inner();
        check_gateway_url(&req.gateway_addr)?;
        check_id("watcher_id", &req.watcher_id)?;
        check_ids("user_ids", &req.user_ids, MAX_USERS_PER_REQUEST)?;
        self.store
            .watch(&req.gateway_addr, &req.watcher_id, &req.user_ids)
            .await?;
        // The watcher is the viewer (watching oneself gives the true view).
        let users = self
            .store
            .query(&req.user_ids)
            .await?
            .iter()
            .map(|state| state.view_for(&req.watcher_id))
            .collect();
        Ok(Response::new(QueryResponse { users }))
    }

    async fn route(
        &self,
        request: Request<RouteRequest>,
    ) -> Result<Response<RouteResponse>, Status> {
        let _timer = self.timer("route");
        let req = request.into_inner();
        check_ids("user_ids", &req.user_ids, MAX_USERS_PER_REQUEST)?;
        let routes = self.store.route(&req.user_ids).await?;
        Ok(Response::new(RouteResponse {
            routes,
            partial: self.state.partial(),
        }))
    }

    async fn drop_gateway(
        &self,
        request: Request<DropGatewayRequest>,
    ) -> Result<Response<DropGatewayResponse>, Status> {
        let _timer = self.timer("drop_gateway");
        let gateway_url = request.into_inner().gateway_addr;
        check_gateway_url(&gateway_url)?;
        let outcome = self.store.drop_gateway(&gateway_url).await?;
        self.gateways.remove(&gateway_url);
        tracing::info!(
            gateway = %gateway_url,
            sessions = outcome.sessions,
            changed_users = outcome.changed.len(),
            "gateway dropped"
        );
        for state in outcome.changed {
            self.notifications.publish(state.public_view());
        }
        Ok(Response::new(DropGatewayResponse {
            sessions: outcome.sessions,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_urls_are_validated() {
        assert!(check_id("user_id", "").is_err());
        assert!(check_id("user_id", &"x".repeat(MAX_ID_BYTES)).is_ok());
        assert!(check_id("user_id", &"x".repeat(MAX_ID_BYTES + 1)).is_err());
        assert!(check_gateway_url("http://10.0.0.1:50051").is_ok());
        assert!(check_gateway_url("https://gw.example").is_ok());
        assert!(check_gateway_url("").is_err());
        assert!(check_gateway_url("10.0.0.1:50051").is_err());
        assert!(check_ids("user_ids", &["a".into(), String::new()], 10).is_err());
        assert!(check_ids("user_ids", &["a".into(), "b".into()], 1).is_err());
        assert!(check_ids("user_ids", &[], 1).is_ok());
    }

    fn request(status: &str, automatic: bool) -> SetStatusRequest {
        SetStatusRequest {
            session_id: "s1".into(),
            status: status.into(),
            automatic,
            ..Default::default()
        }
    }

    #[test]
    fn set_status_requests_are_validated() {
        for status in ["online", "away", "busy", "invisible"] {
            let (_, change) = status_change(request(status, false)).unwrap();
            assert_eq!(change.status, SessionStatus::parse(status));
        }
        let (_, change) = status_change(request("", false)).unwrap();
        assert_eq!(change, StatusChange::default(), "empty leaves everything");
        for status in ["offline", "Online", "dnd"] {
            assert!(status_change(request(status, false)).is_err(), "{status}");
        }
        assert!(status_change(request("away", true)).unwrap().1.automatic);
        assert!(status_change(request("online", true)).is_ok());
        for status in ["busy", "invisible", ""] {
            assert!(status_change(request(status, true)).is_err(), "{status}");
        }

        let with_text = |text: &str| SetStatusRequest {
            status_text: Some(text.into()),
            ..request("", false)
        };
        assert_eq!(
            status_change(with_text("")).unwrap().1.status_text,
            Some(String::new()),
            "an empty text clears it"
        );
        assert!(
            status_change(with_text(&"é".repeat(64))).is_ok(),
            "128 bytes"
        );
        assert!(status_change(with_text(&"x".repeat(129))).is_err());
        assert!(status_change(with_text("line\nbreak")).is_err());
        assert!(status_change(with_text("nul\0")).is_err());

        let with_privacy = |privacy: &str| SetStatusRequest {
            last_seen_privacy: privacy.into(),
            ..request("", false)
        };
        for privacy in ["everyone", "contacts", "nobody"] {
            let (_, change) = status_change(with_privacy(privacy)).unwrap();
            assert_eq!(change.last_seen_privacy.as_deref(), Some(privacy));
        }
        assert!(status_change(with_privacy("friends")).is_err());
    }
}
