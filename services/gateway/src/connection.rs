//! One client connection: a single task that `select!`s over the socket, the session's
//! wakeup (frames queued by `Deliver`, a slow mark, the gateway's drain and close), the
//! in-flight request and one timer for its deadlines: the client's idle timeout, the
//! token's expiry, the end of a rate-limit pause and the idle-away time
//! (`gateway.idle_away_after_ms`: no frame other than a ping for that long sets the
//! session "away" in presence, automatically; the next such frame sets it back
//! "online"). An idle connection's task is small because of that: one waiter, one
//! timer, and the socket.
//!
//! Requests are processed one at a time in arrival order. This keeps one client's
//! sends in order (a client's later message never overtakes an earlier one), while
//! events keep flowing to the client during a request: the in-flight request is just
//! one more future polled by the loop, and its ack is written when it completes. Up to
//! [`MAX_PENDING_REQUESTS`] decoded requests wait behind it; beyond that the loop stops
//! reading the socket, which pushes back on the client through TCP.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket};
use futures::future::BoxFuture;
use futures::SinkExt;
use switchboard_proto::codec::{decode_client_frame, Payload};
use switchboard_proto::v1::{self, ack, server_frame::Event, ServerFrame};
use switchboard_proto::ErrorCode;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::limits::IpGuard;
use crate::sessions::{OutFrame, Session, SlotGuard};
use crate::Shared;

/// Close codes the gateway uses (besides 1000 when the client closes first).
pub mod close_code {
    /// The gateway is shutting down (after `goaway` and the drain deadline).
    pub const GOING_AWAY: u16 = 1001;
    /// Too many protocol violations on this connection.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A frame above the hard size cap; the stream cannot be resumed after it.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The client did not read its events fast enough; it must reconnect and `sync`.
    pub const SLOW_CONSUMER: u16 = 4000;
    /// The client sent nothing (not even a ping) for `gateway.client_idle_timeout_ms`.
    pub const IDLE_TIMEOUT: u16 = 4001;
    /// The session's token expired (its `exp`); reconnect with a fresh token.
    pub const TOKEN_EXPIRED: u16 = 4002;
}

/// Decoded requests waiting behind the in-flight one.
pub const MAX_PENDING_REQUESTS: usize = 16;
/// Outbound frames written before one flush.
const WRITE_BATCH: usize = 32;
/// A write that makes no progress for this long ends the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long closing waits for the client's close reply.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Codes that count as protocol violations toward `gateway.max_violations`. Being
/// rate limited is not one: a limited connection is throttled instead (its frames are
/// not read until the budget holds a request again), never closed for it.
fn is_violation(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::BadFrame
            | ErrorCode::UnknownFrame
            | ErrorCode::FrameTooLarge
            | ErrorCode::NotMember
    )
}

/// The hard cap on a WebSocket message: a bit above the frame limit (the JSON one,
/// the larger, see `Config::max_json_frame_bytes`), so that a slightly oversized frame
/// can still be read and answered with `frame_too_large` while the connection stays
/// usable. Anything larger closes with 1009.
pub(crate) fn hard_frame_cap(max_frame_bytes: usize) -> usize {
    max_frame_bytes + (max_frame_bytes / 8).max(4096)
}

/// Why the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client closed or the socket failed: nothing more to send.
    Gone,
    SlowConsumer,
    Shutdown,
    Idle,
    Violations,
    TooBig,
    /// The token's `exp` passed.
    TokenExpired,
}

/// The connection's session, released when the connection ends (or never starts:
/// the guard is dropped with the upgrade callback when the upgrade fails).
pub(crate) struct SessionGuard {
    pub shared: Arc<Shared>,
    pub session: Arc<Session>,
    /// The token's `exp` (seconds since the epoch): the session closes then.
    pub token_exp_secs: u64,
    pub _slot: SlotGuard,
    /// The connection's count toward `gateway.max_connections_per_ip`.
    pub _ip: Option<IpGuard>,
}

/// How long from now until `exp_secs` (seconds since the epoch); zero when past.
fn until_expiry(exp_secs: u64) -> Duration {
    let exp_ms = i64::try_from(exp_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let left = exp_ms.saturating_sub(crate::now_ms()).max(0);
    Duration::from_millis(u64::try_from(left).unwrap_or(0))
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.shared.sessions.remove(&self.session.session_id);
        self.shared.unregister(self.session.session_id.to_string());
    }
}

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
pub(crate) struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            tokens: burst,
            rate: f64::from(rate),
            burst,
            last: now,
        }
    }

    /// The tokens the bucket holds at `now` (refilled since the last take).
    fn tokens_at(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * self.rate).min(self.burst)
    }

    pub(crate) fn take(&mut self, now: Instant) -> bool {
        self.tokens = self.tokens_at(now);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until the bucket holds a request again (zero if it does).
    pub(crate) fn wait(&self, now: Instant) -> Duration {
        let tokens = self.tokens_at(now);
        if tokens >= 1.0 {
            Duration::ZERO
        } else if self.rate <= 0.0 {
            Duration::from_secs(1)
        } else {
            Duration::from_secs_f64((1.0 - tokens) / self.rate)
        }
    }
}

/// The state of one connection's loop.
struct Connection {
    shared: Arc<Shared>,
    session: Arc<Session>,
    socket: WebSocket,
    limiter: TokenBucket,
    violations: u32,
    /// The latest automatic status change sent to presence (idle away / back).
    status_change: Option<tokio::task::JoinHandle<()>>,
}

fn server_frame(event: Event) -> ServerFrame {
    ServerFrame { event: Some(event) }
}

fn error_frame(code: ErrorCode, message: impl Into<String>) -> ServerFrame {
    server_frame(Event::Error(v1::ErrorEvent {
        code: code.as_str().to_owned(),
        message: message.into(),
        retry_after_ms: 0,
    }))
}

/// A frame refused before it became a request.
struct Rejection {
    /// The request id, when it could be read: the reply is then that request's ack.
    id: Option<String>,
    code: ErrorCode,
    message: String,
    /// For `rate_limited`: when the budget holds a request again.
    retry_after: Duration,
}

impl Rejection {
    /// The reply: an ack when the id is known, else an `error` frame.
    fn reply(self) -> ServerFrame {
        let error = v1::ErrorEvent {
            code: self.code.as_str().to_owned(),
            message: self.message,
            retry_after_ms: u32::try_from(self.retry_after.as_millis()).unwrap_or(u32::MAX),
        };
        match self.id {
            Some(id) => server_frame(Event::Ack(v1::Ack {
                id,
                result: Some(ack::Result::Error(error)),
            })),
            None => server_frame(Event::Error(error)),
        }
    }
}

/// A request's ack, encoded, and, when its failure is the client's fault, the error
/// code. Encoded inside the request's (boxed) future, so that the connection's
/// future does not hold room for an `Ack`, the largest frame, across its awaits.
type Handled = (Arc<OutFrame>, Option<ErrorCode>);

async fn next_ack(inflight: &mut Option<BoxFuture<'static, Handled>>) -> Handled {
    match inflight {
        Some(request) => request.await,
        None => std::future::pending().await,
    }
}

/// Serve one upgraded connection until it ends.
pub(crate) async fn serve(socket: WebSocket, guard: SessionGuard) {
    let shared = guard.shared.clone();
    let session = guard.session.clone();
    let config = &shared.config.gateway;
    let mut conn = Connection {
        shared: shared.clone(),
        session: session.clone(),
        socket,
        limiter: TokenBucket::new(
            config.requests_per_second,
            config.request_burst,
            Instant::now(),
        ),
        violations: 0,
        status_change: None,
    };
    debug!(session_id = %session.session_id, user_id = %session.user_id, "connected");

    let welcome = server_frame(Event::Welcome(v1::Welcome {
        user_id: session.user_id.to_string(),
        device_id: session.device_id.to_string(),
        session_id: session.session_id.to_string(),
        max_body_bytes: u32::try_from(shared.config.routing.max_body_bytes).unwrap_or(u32::MAX),
        server_time_ms: crate::now_ms(),
        heartbeat_interval_ms: u32::try_from(config.heartbeat_interval_ms).unwrap_or(u32::MAX),
    }));
    let expiry = until_expiry(guard.token_exp_secs);
    let mut requests = Requests::default();
    let end = match conn.write(welcome).await {
        Ok(()) => conn.run(expiry, &mut requests).await,
        Err(end) => end,
    };
    // Frames still queued are dropped: account for them in the depth gauge.
    let dropped = session.close_outbound();
    shared.metrics.outbound_queued.sub(dropped as i64);
    debug!(session_id = %session.session_id, ?end, "connection ended");
    // Boxed: the closing handshake is needed once, so its state is not carried in
    // every idle connection's future.
    Box::pin(conn.finish(end, requests)).await;
    drop(guard);
}

/// The deadlines of a connection's loop, served by one timer: an idle connection's
/// task carries one timer instead of four, and a frame from the client only moves a
/// deadline later (the timer, when it fires early, finds that and waits again)
/// instead of re-registering timers on every frame.
struct Deadlines {
    /// The token's `exp`: the connection closes with `token_expired`.
    expiry: Instant,
    /// No frame from the client until then: the connection closes (`idle_timeout`).
    idle: Instant,
    /// When the session turns away automatically; `None` when that is off
    /// (`gateway.idle_away_after_ms = 0`) or it is away already.
    away: Option<Instant>,
    /// After a `rate_limited` answer no frame is read until then: a flood is
    /// throttled by TCP backpressure instead of being answered frame by frame, and
    /// the connection stays open.
    resume: Option<Instant>,
}

/// `at + wait`, or a time decades away when that is past what an `Instant` holds (a
/// token whose `exp` is far in the future).
fn after(at: Instant, wait: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 86_400);
    at.checked_add(wait).unwrap_or_else(|| at + FAR)
}

impl Deadlines {
    /// The earliest deadline.
    fn next(&self) -> Instant {
        [self.away, self.resume]
            .into_iter()
            .flatten()
            .fold(self.expiry.min(self.idle), Instant::min)
    }

    /// Bring the timer forward when a deadline moved before it.
    fn arm(&self, timer: std::pin::Pin<&mut tokio::time::Sleep>) {
        let next = self.next();
        if next < timer.deadline() {
            timer.reset(next);
        }
    }
}

/// The requests of a connection not yet answered: the one in flight and those
/// waiting behind it, each with when it arrived.
#[derive(Default)]
struct Requests {
    inflight: Option<BoxFuture<'static, Handled>>,
    pending: VecDeque<(Box<v1::ClientFrame>, u64)>,
}

impl Connection {
    async fn run(&mut self, token_expiry: Duration, requests: &mut Requests) -> End {
        let shared = self.shared.clone();
        let session = self.session.clone();
        let now = Instant::now();
        let idle_timeout = Duration::from_millis(shared.config.gateway.client_idle_timeout_ms);
        // Automatic away: armed while the client is active (0 = off).
        let away_after = Duration::from_millis(shared.config.gateway.idle_away_after_ms);
        let mut deadlines = Deadlines {
            expiry: after(now, token_expiry),
            idle: after(now, idle_timeout),
            away: (!away_after.is_zero()).then(|| after(now, away_after)),
            resume: None,
        };
        let timer = tokio::time::sleep_until(deadlines.next());
        tokio::pin!(timer);
        let Requests { inflight, pending } = requests;
        let mut goaway_sent = false;
        let mut batch: Vec<Arc<OutFrame>> = Vec::new();

        loop {
            // A slow mark, the drain and the close wake the session's writer (the
            // gateway wakes every session after starting either) and are checked
            // here, before anything else: an idle connection's task then waits on
            // one wakeup instead of holding a waiter for each.
            if session.is_slow() {
                return End::SlowConsumer;
            }
            if shared.closing.is_cancelled() {
                return End::Shutdown;
            }
            if !goaway_sent && shared.draining.is_cancelled() {
                goaway_sent = true;
                let deadline = shared.drain_deadline_ms();
                let goaway = server_frame(Event::Goaway(v1::GoAway {
                    reason: "shutdown".into(),
                    reconnect_after_ms: u32::try_from(deadline).unwrap_or(u32::MAX),
                }));
                if let Err(end) = self.write(goaway).await {
                    return end;
                }
            }
            tokio::select! {
                biased;
                (ack, code) = next_ack(inflight) => {
                    *inflight = None;
                    deadlines.idle = after(Instant::now(), idle_timeout);
                    // Frames already queued (often the session's copy of the message
                    // this acks) follow the ack in the same write: one flush, one
                    // segment to the client, instead of one each.
                    batch.push(ack);
                    if let Err(end) = self.write_queued(&mut batch).await {
                        return end;
                    }
                    if let Some(code) = code {
                        if self.violation(code) {
                            return End::Violations;
                        }
                    }
                    if let Some((next, accepted_at_ms)) = pending.pop_front() {
                        *inflight = Some(self.start(*next, accepted_at_ms));
                    }
                }
                // Frames queued, or a wakeup for the checks above.
                () = session.outbound_ready() => {
                    if let Err(end) = self.write_queued(&mut batch).await {
                        return end;
                    }
                }
                incoming = self.socket.recv(), if pending.len() < MAX_PENDING_REQUESTS && deadlines.resume.is_none() => {
                    let payload = match incoming {
                        None => return End::Gone,
                        Some(Err(e)) => return if is_too_large(e) { End::TooBig } else { End::Gone },
                        Some(Ok(message)) => {
                            // Any frame, control frames included, shows the client is
                            // alive. (The timer is not moved: when it fires it finds
                            // the later deadline and waits again.)
                            deadlines.idle = after(Instant::now(), idle_timeout);
                            match message {
                                WsMessage::Text(text) => Payload::Text(text.as_str().to_owned()),
                                WsMessage::Binary(bytes) => Payload::Binary(bytes.to_vec()),
                                // Pings are answered by the WebSocket layer itself.
                                WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
                                WsMessage::Close(_) => return End::Gone,
                            }
                        }
                    };
                    // The refusal is written after the match: the decoded frame's
                    // room is then not part of the connection's future.
                    let rejection = match self.accept(payload) {
                        Ok(frame) => {
                            if !matches!(frame.request, Some(v1::client_frame::Request::Ping(_))) {
                                // Activity: the client is back if it was set away.
                                if !away_after.is_zero() {
                                    let was_away = deadlines.away.is_none();
                                    deadlines.away = Some(after(Instant::now(), away_after));
                                    if was_away {
                                        self.session.set_idle_away(false);
                                        self.set_automatic_status("online");
                                        deadlines.arm(timer.as_mut());
                                    }
                                }
                            }
                            let accepted_at_ms = u64::try_from(crate::now_ms()).unwrap_or(0);
                            if inflight.is_none() {
                                *inflight = Some(self.start(frame, accepted_at_ms));
                            } else {
                                pending.push_back((Box::new(frame), accepted_at_ms));
                            }
                            continue;
                        }
                        Err(rejection) => rejection,
                    };
                    let code = rejection.code;
                    let retry_after = rejection.retry_after;
                    if let Err(end) = self.write(rejection.reply()).await {
                        return end;
                    }
                    if code == ErrorCode::RateLimited {
                        deadlines.resume = Some(after(Instant::now(), retry_after));
                        deadlines.arm(timer.as_mut());
                    }
                    if self.violation(code) {
                        return End::Violations;
                    }
                }
                () = &mut timer => {
                    let now = Instant::now().max(timer.deadline());
                    if now >= deadlines.idle {
                        return End::Idle;
                    }
                    if now >= deadlines.expiry {
                        return End::TokenExpired;
                    }
                    if deadlines.away.is_some_and(|at| now >= at) {
                        deadlines.away = None;
                        self.session.set_idle_away(true);
                        self.set_automatic_status("away");
                    }
                    if deadlines.resume.is_some_and(|at| now >= at) {
                        deadlines.resume = None;
                    }
                    timer.as_mut().reset(deadlines.next());
                }
            }
        }
    }

    /// Tell presence about an automatic status change without holding up the loop.
    /// Changes run one after another (each waits for the previous one), so "online"
    /// never overtakes the "away" it undoes.
    fn set_automatic_status(&mut self, status: &'static str) {
        let previous = self.status_change.take();
        let shared = self.shared.clone();
        let session = self.session.clone();
        self.status_change = Some(tokio::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            crate::requests::set_automatic_status(&shared, &session, status).await;
        }));
    }

    /// Run one request, which arrived at `accepted_at_ms` (Unix ms).
    fn start(&self, frame: v1::ClientFrame, accepted_at_ms: u64) -> BoxFuture<'static, Handled> {
        let encoding = self.session.encoding;
        let handled = crate::requests::handle(
            self.shared.clone(),
            self.session.clone(),
            frame,
            accepted_at_ms,
        );
        Box::pin(async move {
            let (ack, code) = handled.await;
            let ack = OutFrame::encode(&server_frame(Event::Ack(ack)), encoding);
            (Arc::new(ack), code)
        })
    }

    /// Check one data frame: size, decoding, rate. Returns the request to run or the
    /// reply to send instead (with its error code).
    fn accept(&mut self, payload: Payload) -> Result<v1::ClientFrame, Rejection> {
        let metrics = &self.shared.metrics;
        let max = match payload {
            Payload::Text(_) => self.shared.config.max_json_frame_bytes(),
            Payload::Binary(_) => self.shared.config.gateway.max_frame_bytes,
        };
        if payload.len() > max {
            metrics.frames_in.with_label_values(&["too_large"]).inc();
            return Err(Rejection {
                id: None,
                code: ErrorCode::FrameTooLarge,
                message: format!("frame is larger than {max} bytes"),
                retry_after: Duration::ZERO,
            });
        }
        let frame = match decode_client_frame(&payload, self.session.encoding) {
            Ok(frame) => frame,
            Err(e) => {
                metrics.frames_in.with_label_values(&["invalid"]).inc();
                return Err(Rejection {
                    id: e.id,
                    code: e.code,
                    message: e.message,
                    retry_after: Duration::ZERO,
                });
            }
        };
        metrics
            .frames_in
            .with_label_values(&[request_name(&frame)])
            .inc();
        // The connection's own bucket, then the budget all of the user's connections
        // (and HTTP API calls) on this gateway share.
        let now = Instant::now();
        if !self.limiter.take(now) || !self.shared.user_limiter.take(&self.session.user_id, now) {
            let retry_after = self
                .limiter
                .wait(now)
                .max(self.shared.user_limiter.wait(&self.session.user_id, now))
                .max(Duration::from_millis(1));
            return Err(Rejection {
                id: Some(frame.id),
                code: ErrorCode::RateLimited,
                message: format!(
                    "too many requests, retry after {} ms",
                    retry_after.as_millis().max(1)
                ),
                retry_after,
            });
        }
        Ok(frame)
    }

    /// Count a violation; true when the connection must close.
    fn violation(&mut self, code: ErrorCode) -> bool {
        if !is_violation(code) {
            return false;
        }
        self.shared
            .metrics
            .violations
            .with_label_values(&[code.as_str()])
            .inc();
        self.violations += 1;
        self.violations >= self.shared.config.gateway.max_violations
    }

    /// The acks of the requests a closing connection did not answer yet.
    async fn answer_all(&mut self, requests: Requests) {
        if let Some(inflight) = requests.inflight {
            let (ack, _) = inflight.await;
            if self.write_batch(std::slice::from_ref(&ack)).await.is_err() {
                return;
            }
        }
        for (frame, _) in requests.pending {
            let refused = Rejection {
                id: Some(frame.id),
                code: ErrorCode::Unavailable,
                message: "the connection closed before this request was processed; retry".into(),
                retry_after: Duration::ZERO,
            };
            if self.write(refused.reply()).await.is_err() {
                return;
            }
        }
    }

    /// Write one frame. It is encoded before the returned future exists, so the
    /// (large) `ServerFrame` is not kept in the connection's future while writing.
    fn write(&mut self, frame: ServerFrame) -> impl Future<Output = Result<(), End>> + '_ {
        let frame = Arc::new(OutFrame::encode(&frame, self.session.encoding));
        async move { self.write_batch(std::slice::from_ref(&frame)).await }
    }

    /// Write the frames in `batch` (an encoded ack, or none) followed by up to
    /// [`WRITE_BATCH`] frames queued for the session, in one flush, and empty
    /// `batch`; nothing to write (an ack took the queued frames along) writes nothing.
    async fn write_queued(&mut self, batch: &mut Vec<Arc<OutFrame>>) -> Result<(), End> {
        let own = batch.len();
        if self.session.take_batch(batch, WRITE_BATCH) {
            // More is queued: come back after the other branches had a turn.
            self.session.wake_writer();
        }
        if batch.is_empty() {
            return Ok(());
        }
        let queued = batch.len() - own;
        self.shared.metrics.outbound_queued.sub(queued as i64);
        let result = self.write_batch(batch).await;
        batch.clear();
        result
    }

    /// Write frames and flush, unless the session turns slow, the gateway closes, or
    /// the client stops reading for [`WRITE_TIMEOUT`].
    async fn write_batch(&mut self, frames: &[Arc<OutFrame>]) -> Result<(), End> {
        let shared = &self.shared;
        let session = &self.session;
        let socket = &mut self.socket;
        let write = async {
            for frame in frames {
                socket.feed(frame.message.clone()).await?;
                shared
                    .metrics
                    .frames_out
                    .with_label_values(&[frame.kind.as_str()])
                    .inc();
            }
            socket.flush().await
        };
        // Boxed: an idle connection's future then carries only a pointer for the write
        // path (its timer and sink futures exist only while writing).
        Box::pin(async move {
            tokio::select! {
                result = write => result.map_err(|_| End::Gone),
                () = session.slow_marked() => Err(End::SlowConsumer),
                () = shared.closing.cancelled() => Err(End::Shutdown),
                () = tokio::time::sleep(WRITE_TIMEOUT) => {
                    info!(session_id = %session.session_id, "write timed out");
                    Err(End::Gone)
                }
            }
        })
        .await
    }

    /// Say goodbye the way `end` requires, bounded in time. Every request still
    /// unanswered gets its one ack first: the one in flight its result (it is waited
    /// for, within the close timeout), those not started `unavailable`.
    async fn finish(mut self, end: End, requests: Requests) {
        if matches!(end, End::Gone) {
            return;
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.answer_all(requests)).await;
        let (code, reason) = match end {
            End::Gone => return,
            End::SlowConsumer => {
                let error = error_frame(
                    ErrorCode::SlowConsumer,
                    "events were not read fast enough; reconnect and sync",
                );
                let frame = OutFrame::encode(&error, self.session.encoding);
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.socket.send(frame.message)).await;
                (close_code::SLOW_CONSUMER, "slow_consumer")
            }
            End::TokenExpired => {
                let error = error_frame(
                    ErrorCode::Unauthorized,
                    "the token expired; reconnect with a fresh token",
                );
                let frame = OutFrame::encode(&error, self.session.encoding);
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.socket.send(frame.message)).await;
                (close_code::TOKEN_EXPIRED, "token_expired")
            }
            End::Shutdown => (close_code::GOING_AWAY, "shutdown"),
            End::Idle => (close_code::IDLE_TIMEOUT, "idle_timeout"),
            End::Violations => (close_code::POLICY_VIOLATION, "too many protocol violations"),
            End::TooBig => (close_code::MESSAGE_TOO_BIG, "frame too large"),
        };
        let close = WsMessage::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }));
        let socket = &mut self.socket;
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if socket.send(close).await.is_err() {
                return;
            }
            // Read until the client's close reply, so unread input does not turn the
            // TCP close into a reset that could discard our close frame at the client.
            while let Some(Ok(_)) = socket.recv().await {}
        })
        .await;
    }
}

/// The metrics label of a request.
fn request_name(frame: &v1::ClientFrame) -> &'static str {
    use v1::client_frame::Request as R;
    match &frame.request {
        Some(R::Send(_)) => "send",
        Some(R::History(_)) => "history",
        Some(R::Sync(_)) => "sync",
        Some(R::Read(_)) => "read",
        Some(R::Typing(_)) => "typing",
        Some(R::PresenceSet(_)) => "presence_set",
        Some(R::PresenceWatch(_)) => "presence_watch",
        Some(R::ConversationCreate(_)) => "conversation_create",
        Some(R::ConversationMembers(_)) => "conversation_members",
        Some(R::ConversationList(_)) => "conversation_list",
        Some(R::Ping(_)) => "ping",
        Some(R::Edit(_)) => "edit",
        Some(R::Delete(_)) => "delete",
        Some(R::React(_)) => "react",
        Some(R::Thread(_)) => "thread",
        Some(R::Receipts(_)) => "receipts",
        Some(R::ConversationUpdate(_)) => "conversation_update",
        Some(R::NotificationSet(_)) => "notification_set",
        None => "invalid",
    }
}

/// Whether a read error is the WebSocket layer refusing a message above the hard cap.
fn is_too_large(error: axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error as WsError;
    error
        .into_inner()
        .downcast_ref::<WsError>()
        .is_some_and(|e| matches!(e, WsError::Capacity(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_the_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2, 3, start);
        assert!((0..3).all(|_| bucket.take(start)));
        assert!(!bucket.take(start));
        let later = start + Duration::from_millis(500);
        assert!(bucket.take(later));
        assert!(!bucket.take(later));
        let much_later = later + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| bucket.take(much_later)).count(), 3);
    }

    #[test]
    fn hard_cap_leaves_room_above_the_frame_limit() {
        assert_eq!(hard_frame_cap(128 * 1024), 128 * 1024 + 16 * 1024);
        assert_eq!(hard_frame_cap(8 * 1024), 8 * 1024 + 4096);
    }

    #[test]
    fn violations_are_client_faults_only() {
        assert!(is_violation(ErrorCode::BadFrame));
        assert!(is_violation(ErrorCode::NotMember));
        assert!(!is_violation(ErrorCode::Unavailable));
        assert!(!is_violation(ErrorCode::InvalidRequest));
    }
}
