//! One WebSocket connection: the handshake, the background task that owns the
//! socket, and the correlation of acks with waiting requests.
//!
//! Each connection costs one task, one bounded outbound queue, one bounded event
//! queue and a pending map bounded by `max_in_flight`; the WebSocket read and write
//! buffers are configurable so that many thousands of clients fit in one process.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use switchboard_proto::codec::{self, Encoding, Payload};
use switchboard_proto::v1::{
    ack, client_frame::Request, server_frame, ClientFrame, ConversationEvent, ErrorEvent, GoAway,
    Message, ReadMarker, Resync, ServerFrame, TypingEvent, UserPresence, Welcome,
};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{
    self, client::IntoClientRequest, error::ProtocolError, protocol::frame::coding::CloseCode,
    protocol::CloseFrame, protocol::WebSocketConfig, Message as WsMessage,
};
use tokio_tungstenite::WebSocketStream;

use crate::ClientError;

/// Path of the client endpoint, for building URLs from a host.
pub const CONNECT_PATH: &str = "/v1/connect";

/// Longest part of a refused upgrade's body kept as the error reason.
const MAX_REASON_BYTES: usize = 1024;

/// Most queued frames written before one flush.
const WRITE_BATCH: usize = 32;

/// How the token travels to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenPlacement {
    /// `Authorization: Bearer <token>` header.
    Header,
    /// `?token=<token>` query parameter (what browsers must use).
    Query,
}

/// Everything needed to open one connection. Defaults are sized for many small
/// clients in one process; raise the buffers for a few busy ones.
#[derive(Clone)]
pub struct ConnectOptions {
    /// WebSocket URL of the endpoint, e.g. `ws://127.0.0.1:8080/v1/connect`.
    pub url: String,
    /// The JWT; `None` connects without one (the server should refuse).
    pub token: Option<String>,
    /// Header (default) or query parameter.
    pub token_placement: TokenPlacement,
    /// Sent as `?device=<id>`; the server picks one when absent.
    pub device_id: Option<String>,
    /// Sent as `?status=<status>`: the session's presence status from the moment it
    /// connects (`online`, `away`, `busy` or `invisible`; the server refuses anything
    /// else with 400). `None` connects `online`. Connecting `invisible` this way, rather
    /// than with `presence_set` after `welcome`, never shows the user online.
    pub initial_status: Option<String>,
    /// JSON text frames or protobuf binary frames.
    pub encoding: Encoding,
    /// Limit on TCP connect, WebSocket handshake and the wait for `welcome`, together.
    pub connect_timeout: Duration,
    /// Limit on one request, from the call until its ack (including the wait for an
    /// in-flight slot and for room in the outbound queue).
    pub request_timeout: Duration,
    /// Requests awaiting an ack at once; further requests wait for a slot.
    pub max_in_flight: usize,
    /// Frames queued for the socket writer.
    pub outbound_queue: usize,
    /// Events queued for the application. When it is full the connection stops
    /// reading from the socket (so acks wait too) until the application catches up:
    /// a client that does not drain its events is a slow consumer, as on the server.
    pub event_queue: usize,
    /// WebSocket read buffer, allocated up front per connection.
    pub read_buffer_size: usize,
    /// WebSocket write buffer target before a write to the socket.
    pub write_buffer_size: usize,
    /// Largest accepted incoming WebSocket message.
    pub max_message_size: usize,
    /// Send a WebSocket ping after this long without writing anything. `None` uses
    /// the `heartbeat_interval_ms` of the server's welcome (no pings when it is 0).
    pub ping_interval: Option<Duration>,
    /// Disable Nagle's algorithm on the TCP socket (lower latency for small frames).
    pub nodelay: bool,
    /// Source address of the TCP connection (port chosen by the system). `None`
    /// lets the system pick. One source address gives at most about 64k connections
    /// to one server address and port; spreading clients over several local
    /// addresses (127.0.0.0/8 is all loopback on Linux) lifts that limit.
    pub local_addr: Option<IpAddr>,
}

impl ConnectOptions {
    /// Options with the defaults for `url` and `token`.
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> ConnectOptions {
        ConnectOptions {
            url: url.into(),
            token: Some(token.into()),
            token_placement: TokenPlacement::Header,
            device_id: None,
            initial_status: None,
            encoding: Encoding::Json,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            max_in_flight: 64,
            outbound_queue: 64,
            event_queue: 256,
            read_buffer_size: 4 * 1024,
            write_buffer_size: 4 * 1024,
            max_message_size: 16 * 1024 * 1024,
            ping_interval: None,
            nodelay: true,
            local_addr: None,
        }
    }

    pub fn device(mut self, device_id: impl Into<String>) -> ConnectOptions {
        self.device_id = Some(device_id.into());
        self
    }

    /// Connect with this presence status (see [`ConnectOptions::initial_status`]).
    pub fn initial_status(mut self, status: impl Into<String>) -> ConnectOptions {
        self.initial_status = Some(status.into());
        self
    }

    pub fn encoding(mut self, encoding: Encoding) -> ConnectOptions {
        self.encoding = encoding;
        self
    }

    pub fn request_timeout(mut self, timeout: Duration) -> ConnectOptions {
        self.request_timeout = timeout;
        self
    }

    /// Bind the TCP connection to this source address before connecting.
    pub fn local_addr(mut self, ip: IpAddr) -> ConnectOptions {
        self.local_addr = Some(ip);
        self
    }

    /// The URL actually requested: `url` plus the `device`, `status` and (for
    /// [`TokenPlacement::Query`]) `token` query parameters.
    pub fn request_url(&self) -> String {
        let mut url = self.url.clone();
        let mut params = Vec::new();
        if let Some(device) = &self.device_id {
            params.push(("device", device.as_str()));
        }
        if let Some(status) = &self.initial_status {
            params.push(("status", status.as_str()));
        }
        if let (TokenPlacement::Query, Some(token)) = (self.token_placement, &self.token) {
            params.push(("token", token.as_str()));
        }
        for (name, value) in params {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(name);
            url.push('=');
            url.push_str(&percent_encode(value));
        }
        url
    }
}

impl std::fmt::Debug for ConnectOptions {
    // By hand, so that the token never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_placement", &self.token_placement)
            .field("device_id", &self.device_id)
            .field("initial_status", &self.initial_status)
            .field("encoding", &self.encoding)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_in_flight", &self.max_in_flight)
            .field("outbound_queue", &self.outbound_queue)
            .field("event_queue", &self.event_queue)
            .field("read_buffer_size", &self.read_buffer_size)
            .field("write_buffer_size", &self.write_buffer_size)
            .field("max_message_size", &self.max_message_size)
            .field("ping_interval", &self.ping_interval)
            .field("nodelay", &self.nodelay)
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

/// Percent-encode a query parameter value (RFC 3986 unreserved characters kept).
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A server event (anything but an ack or the welcome).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Message(Message),
    Receipt(ReadMarker),
    Typing(TypingEvent),
    Presence(UserPresence),
    Conversation(ConversationEvent),
    /// The server asks for a reconnect elsewhere and will close soon.
    GoAway(GoAway),
    /// An error not tied to a request (for example a frame without a usable id).
    Error(ErrorEvent),
    /// The server may have failed to deliver events to this session: sync from the
    /// cursors, as after a reconnect ([`crate::Timeline::resync`] does it).
    Resync(Resync),
}

/// What a waiting request receives: the ack's result or the connection's end.
type AckOutcome = Result<ack::Result, ClientError>;

/// State shared by the client handles, the event receiver and the connection task.
struct Shared {
    /// Requests awaiting an ack, and the connection's end once it ended. One lock so
    /// that a request can never be registered after the pending map was drained.
    state: Mutex<State>,
    /// Bounds the pending map: one permit per request awaiting its ack.
    in_flight: Semaphore,
    /// Flips to true when the connection task has ended.
    closed_tx: watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    /// Waiting requests by request id.
    pending: HashMap<u64, oneshot::Sender<AckOutcome>>,
    /// Why the connection ended, once it has.
    end: Option<ClientError>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves the map consistent (single
        // inserts and removes), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record the end of the connection and fail every waiting request with it.
    fn finish(&self, end: ClientError) {
        let pending = {
            let mut state = self.state();
            if state.end.is_none() {
                state.end = Some(end.clone());
            }
            std::mem::take(&mut state.pending)
        };
        for (_, waiter) in pending {
            let _ = waiter.send(Err(end.clone()));
        }
        self.in_flight.close();
        self.closed_tx.send_replace(true);
    }

    fn end(&self) -> Option<ClientError> {
        self.state().end.clone()
    }

    fn end_or_closed(&self) -> ClientError {
        self.end().unwrap_or_else(|| ClientError::Closed {
            code: None,
            reason: "connection task ended".into(),
        })
    }
}

/// Removes a request from the pending map when the request is dropped (timeout or
/// cancellation) before its ack arrived, so late acks find nothing and are ignored.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.state().pending.remove(&self.id);
    }
}

enum Outbound {
    Frame(WsMessage),
    Close,
}

struct Inner {
    outbound_tx: mpsc::Sender<Outbound>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    encoding: Encoding,
    request_timeout: Duration,
    welcome: Welcome,
}

/// A handle to one connection. Cheap to clone; all clones share the connection.
/// The connection closes when [`Client::close`] is called or every handle is dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("user_id", &self.inner.welcome.user_id)
            .field("device_id", &self.inner.welcome.device_id)
            .field("session_id", &self.inner.welcome.session_id)
            .field("encoding", &self.inner.encoding)
            .finish()
    }
}

/// The events of one connection, in the order the server sent them. Ends (`None`)
/// when the connection has ended; [`Events::close_reason`] then says why.
pub struct Events {
    rx: mpsc::Receiver<Event>,
    shared: Arc<Shared>,
}

impl Events {
    /// The next event, or `None` once the connection has ended and every event was
    /// received.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is queued.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<ClientError> {
        self.shared.end()
    }
}

impl futures::Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Client {
    /// Open a connection: WebSocket handshake with the token, subprotocol and device,
    /// then wait for the server's `welcome`. A refused upgrade is
    /// [`ClientError::Connect`] with the HTTP status and the response body as reason.
    pub async fn connect(options: ConnectOptions) -> Result<(Client, Events), ClientError> {
        let connect_timeout = options.connect_timeout;
        let (ws, welcome) = tokio::time::timeout(connect_timeout, open(&options))
            .await
            .map_err(|_| ClientError::Connect {
                status: None,
                reason: format!("no welcome within {connect_timeout:?}"),
            })??;

        let (outbound_tx, outbound_rx) = mpsc::channel(options.outbound_queue.max(1));
        let (events_tx, events_rx) = mpsc::channel(options.event_queue.max(1));
        let (closed_tx, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            in_flight: Semaphore::new(options.max_in_flight.max(1)),
            closed_tx,
        });
        let ping_interval = options.ping_interval.or_else(|| {
            (welcome.heartbeat_interval_ms > 0)
                .then(|| Duration::from_millis(welcome.heartbeat_interval_ms.into()))
        });
        let task = ConnectionTask {
            ws,
            outbound_rx,
            events_tx,
            shared: shared.clone(),
            encoding: options.encoding,
            ping_interval,
            close_timeout: options.request_timeout,
        };
        tokio::spawn(task.run());
        tracing::debug!(
            user_id = %welcome.user_id,
            device_id = %welcome.device_id,
            session_id = %welcome.session_id,
            "client connected"
        );
        let client = Client {
            inner: Arc::new(Inner {
                outbound_tx,
                shared: shared.clone(),
                next_id: AtomicU64::new(1),
                encoding: options.encoding,
                request_timeout: options.request_timeout,
                welcome,
            }),
        };
        Ok((
            client,
            Events {
                rx: events_rx,
                shared,
            },
        ))
    }

    /// The server's `welcome` frame of this connection.
    pub fn welcome(&self) -> &Welcome {
        &self.inner.welcome
    }

    /// The encoding negotiated for this connection.
    pub fn encoding(&self) -> Encoding {
        self.inner.encoding
    }

    /// Whether the connection has ended. True as soon as the end is recorded,
    /// before waiting requests are failed, so a caller that saw its request fail
    /// with [`ClientError::Closed`] also sees `is_closed`.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.state().end.is_some()
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<ClientError> {
        self.inner.shared.end()
    }

    /// Resolves when the connection has ended.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut closed_rx = self.inner.shared.closed_tx.subscribe();
        async move {
            // Err only if the sender is gone, which means the task ended too.
            let _ = closed_rx.wait_for(|closed| *closed).await;
        }
    }

    /// Requests awaiting their ack right now.
    pub fn in_flight(&self) -> usize {
        self.inner.shared.state().pending.len()
    }

    /// Close the connection (normal close frame) and wait until it has ended.
    /// Requests still waiting fail with [`ClientError::Closed`].
    pub async fn close(&self) {
        let closed = self.closed();
        // Err: the task already ended.
        let _ = self.inner.outbound_tx.send(Outbound::Close).await;
        closed.await;
    }

    /// Send one request and wait for its ack, within the request timeout. An error
    /// ack becomes [`ClientError::Server`]; otherwise the ack's result is returned.
    pub async fn request(&self, request: Request) -> Result<ack::Result, ClientError> {
        self.request_within(request, self.inner.request_timeout)
            .await
    }

    /// [`Client::request`] with its own timeout instead of the connection's.
    pub async fn request_within(
        &self,
        request: Request,
        timeout: Duration,
    ) -> Result<ack::Result, ClientError> {
        let deadline = Instant::now() + timeout;
        tokio::time::timeout_at(deadline, self.request_untimed(request))
            .await
            .unwrap_or(Err(ClientError::Timeout))
    }

    async fn request_untimed(&self, request: Request) -> Result<ack::Result, ClientError> {
        let shared = &*self.inner.shared;
        let _permit = shared
            .in_flight
            .acquire()
            .await
            .map_err(|_| shared.end_or_closed())?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (ack_tx, ack_rx) = oneshot::channel();
        let _guard = {
            let mut state = shared.state();
            if let Some(end) = &state.end {
                return Err(end.clone());
            }
            state.pending.insert(id, ack_tx);
            PendingGuard { shared, id }
        };
        let frame = ClientFrame {
            id: id.to_string(),
            request: Some(request),
        };
        let message = match codec::encode(&frame, self.inner.encoding) {
            Payload::Text(text) => WsMessage::text(text),
            Payload::Binary(bytes) => WsMessage::binary(bytes),
        };
        self.inner
            .outbound_tx
            .send(Outbound::Frame(message))
            .await
            .map_err(|_| shared.end_or_closed())?;
        match ack_rx.await {
            Ok(Ok(ack::Result::Error(error))) => Err(ClientError::from_error_event(error)),
            Ok(outcome) => outcome,
            Err(_) => Err(shared.end_or_closed()),
        }
    }
}

type Socket = WebSocketStream<TcpStream>;

/// TCP connect, WebSocket handshake, and the `welcome` frame.
async fn open(options: &ConnectOptions) -> Result<(Socket, Welcome), ClientError> {
    let connect_error = |reason: String| ClientError::Connect {
        status: None,
        reason,
    };
    let mut request = options
        .request_url()
        .into_client_request()
        .map_err(|e| connect_error(format!("invalid url: {e}")))?;
    let headers = request.headers_mut();
    headers.insert(
        http::header::SEC_WEBSOCKET_PROTOCOL,
        http::HeaderValue::from_static(options.encoding.subprotocol()),
    );
    if let (TokenPlacement::Header, Some(token)) = (options.token_placement, &options.token) {
        let value = http::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| connect_error("token is not a valid header value".into()))?;
        headers.insert(http::header::AUTHORIZATION, value);
    }
    let uri = request.uri();
    let host = uri.host().unwrap_or_default();
    let port = uri.port_u16().unwrap_or(80);
    if uri.scheme_str() != Some("ws") {
        return Err(connect_error(format!(
            "unsupported url scheme {:?} (only ws:// is supported)",
            uri.scheme_str()
        )));
    }
    let tcp = tcp_connect(
        host.trim_start_matches('[').trim_end_matches(']'),
        port,
        options.local_addr,
    )
    .await
    .map_err(|e| connect_error(format!("tcp connect to {host}:{port}: {e}")))?;
    if options.nodelay {
        let _ = tcp.set_nodelay(true);
    }
    let config = WebSocketConfig::default()
        .read_buffer_size(options.read_buffer_size)
        .write_buffer_size(options.write_buffer_size)
        // Room for one whole frame of the largest kind beside what is buffered: a
        // send of the largest body (64 KiB plus its JSON) must not fail as "full".
        .max_write_buffer_size(
            options
                .write_buffer_size
                .saturating_mul(4)
                .max(options.max_message_size),
        )
        .max_message_size(Some(options.max_message_size))
        .max_frame_size(Some(options.max_message_size));
    let (mut ws, _response) =
        tokio_tungstenite::client_async_with_config(request, tcp, Some(config))
            .await
            .map_err(handshake_error)?;

    let welcome = loop {
        let Some(message) = ws.next().await else {
            return Err(ClientError::Closed {
                code: None,
                reason: "connection closed before welcome".into(),
            });
        };
        let frame = match message {
            Ok(WsMessage::Close(frame)) => return Err(closed_by(frame.as_ref())),
            Ok(message) => match decode(message, options.encoding)? {
                Some(frame) => frame,
                None => continue,
            },
            Err(e) => return Err(read_error(e, None)),
        };
        match frame.event {
            Some(server_frame::Event::Welcome(welcome)) => break welcome,
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected welcome as the first frame, got {}",
                    event_name(other.as_ref())
                )))
            }
        }
    };
    Ok((ws, welcome))
}

/// Open the TCP stream to `host:port`, from `local_addr` when one is given (the
/// first resolved server address of the same family is used then).
async fn tcp_connect(
    host: &str,
    port: u16,
    local_addr: Option<IpAddr>,
) -> std::io::Result<TcpStream> {
    let Some(local_ip) = local_addr else {
        return TcpStream::connect((host, port)).await;
    };
    let remote = tokio::net::lookup_host((host, port))
        .await?
        .find(|remote| remote.is_ipv4() == local_ip.is_ipv4())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::AddrNotAvailable,
                format!("no address of {host} in the family of source address {local_ip}"),
            )
        })?;
    let socket = match local_ip {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket
        .bind(SocketAddr::new(local_ip, 0))
        .map_err(|e| std::io::Error::new(e.kind(), format!("bind {local_ip}: {e}")))?;
    socket.connect(remote).await
}

/// A refused upgrade keeps its status and body; anything else is a plain connect error.
fn handshake_error(error: tungstenite::Error) -> ClientError {
    match error {
        tungstenite::Error::Http(response) => {
            let status = response.status();
            let body = response.body().as_deref().unwrap_or_default();
            let body = &body[..body.len().min(MAX_REASON_BYTES)];
            let reason = String::from_utf8_lossy(body).trim().to_owned();
            let reason = if reason.is_empty() {
                status.canonical_reason().unwrap_or_default().to_owned()
            } else {
                reason
            };
            ClientError::Connect {
                status: Some(status.as_u16()),
                reason,
            }
        }
        other => ClientError::Connect {
            status: None,
            reason: format!("websocket handshake: {other}"),
        },
    }
}

/// Decode a data frame; `Ok(None)` for control frames, which carry no protocol frame.
fn decode(message: WsMessage, encoding: Encoding) -> Result<Option<ServerFrame>, ClientError> {
    let decoded = match (message, encoding) {
        (WsMessage::Text(text), Encoding::Json) => codec::decode_json(text.as_str()),
        (WsMessage::Binary(bytes), Encoding::Proto) => codec::decode_proto(&bytes),
        (WsMessage::Text(_), Encoding::Proto) | (WsMessage::Binary(_), Encoding::Json) => {
            return Err(ClientError::Protocol(format!(
                "frame type does not match subprotocol {}",
                encoding.subprotocol()
            )))
        }
        _ => return Ok(None),
    };
    decoded
        .map(Some)
        .map_err(|e| ClientError::Protocol(e.message))
}

fn closed_by(frame: Option<&CloseFrame>) -> ClientError {
    match frame {
        Some(frame) => ClientError::Closed {
            code: Some(frame.code.into()),
            reason: frame.reason.as_str().to_owned(),
        },
        None => ClientError::Closed {
            code: None,
            reason: "closed by server".into(),
        },
    }
}

/// The end of a connection after a read error. A close frame seen earlier wins,
/// since the read error is then only the socket going away after it.
fn read_error(error: tungstenite::Error, close: Option<ClientError>) -> ClientError {
    if let Some(close) = close {
        return close;
    }
    match error {
        tungstenite::Error::Capacity(e) => ClientError::Protocol(format!("capacity: {e}")),
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            ClientError::Closed {
                code: None,
                reason: "connection reset".into(),
            }
        }
        tungstenite::Error::Protocol(e) => ClientError::Protocol(e.to_string()),
        tungstenite::Error::Utf8(e) => ClientError::Protocol(format!("invalid utf-8: {e}")),
        other => ClientError::Closed {
            code: None,
            reason: other.to_string(),
        },
    }
}

fn event_name(event: Option<&server_frame::Event>) -> &'static str {
    use server_frame::Event as E;
    match event {
        None => "an empty frame",
        Some(E::Ack(_)) => "ack",
        Some(E::Message(_)) => "message",
        Some(E::Receipt(_)) => "receipt",
        Some(E::Typing(_)) => "typing",
        Some(E::Presence(_)) => "presence",
        Some(E::Conversation(_)) => "conversation",
        Some(E::Goaway(_)) => "goaway",
        Some(E::Error(_)) => "error",
        Some(E::Welcome(_)) => "welcome",
        Some(E::Resync(_)) => "resync",
    }
}

/// The one task per connection: owns the socket, writes queued frames, reads
/// frames, routes acks to waiting requests and events to the event queue.
struct ConnectionTask {
    ws: Socket,
    outbound_rx: mpsc::Receiver<Outbound>,
    events_tx: mpsc::Sender<Event>,
    shared: Arc<Shared>,
    encoding: Encoding,
    /// Idle time after which a WebSocket ping is sent.
    ping_interval: Option<Duration>,
    /// How long to wait for the server's close reply after sending a close.
    close_timeout: Duration,
}

/// What the task does next, decided by one round of `select!`.
enum Step<'a> {
    Read(Option<Result<WsMessage, tungstenite::Error>>),
    Write(Option<Outbound>),
    Deliver(Result<mpsc::Permit<'a, Event>, mpsc::error::SendError<()>>),
    Ping,
    CloseTimedOut,
}

impl ConnectionTask {
    async fn run(mut self) {
        let end = self.serve().await;
        match &end {
            ClientError::Closed { code, reason } => {
                tracing::debug!(code = ?code, reason = %reason, "client connection closed")
            }
            other => tracing::debug!(error = %other, "client connection ended"),
        }
        self.shared.finish(end);
    }

    async fn serve(&mut self) -> ClientError {
        // An event read while the event queue was full; reading pauses until it is
        // delivered (bounded memory, backpressure to the server).
        let mut held_event: Option<Event> = None;
        // Whether the application still receives events.
        let mut events_open = true;
        let mut outbound_open = true;
        // The server's close frame, once seen.
        let mut close: Option<ClientError> = None;
        // Set once this side sent a close: give up waiting for the reply then.
        let mut close_deadline: Option<Instant> = None;
        let mut last_write = Instant::now();
        let ping_interval = self.ping_interval;
        let events_tx = self.events_tx.clone();

        loop {
            let ping_at = ping_interval.map(|interval| last_write + interval);
            let step = tokio::select! {
                message = self.ws.next(), if held_event.is_none() => Step::Read(message),
                outbound = self.outbound_rx.recv(), if outbound_open && close_deadline.is_none() => {
                    Step::Write(outbound)
                }
                permit = events_tx.reserve(), if held_event.is_some() => Step::Deliver(permit),
                _ = sleep_until(ping_at), if ping_at.is_some() && close_deadline.is_none() => {
                    Step::Ping
                }
                _ = sleep_until(close_deadline), if close_deadline.is_some() => {
                    Step::CloseTimedOut
                }
            };
            match step {
                Step::Read(None) => {
                    return close.unwrap_or_else(|| ClientError::Closed {
                        code: None,
                        reason: "connection lost".into(),
                    })
                }
                Step::Read(Some(Err(tungstenite::Error::ConnectionClosed))) => {
                    return close.unwrap_or_else(|| closed_by(None));
                }
                Step::Read(Some(Err(e))) => return read_error(e, close),
                Step::Read(Some(Ok(WsMessage::Close(frame)))) => {
                    // tungstenite queues the close reply; keep reading until the
                    // socket ends so that the reply is flushed.
                    close = Some(closed_by(frame.as_ref()));
                }
                Step::Read(Some(Ok(message))) => match decode(message, self.encoding) {
                    Err(e) => {
                        tracing::warn!(error = %e, "undecodable server frame");
                        let _ = self.send_close(CloseCode::Protocol, "bad frame").await;
                        return e;
                    }
                    Ok(None) => {}
                    Ok(Some(frame)) => match self.route(frame) {
                        Err(e) => {
                            tracing::warn!(error = %e, "invalid server frame");
                            let _ = self.send_close(CloseCode::Protocol, "bad frame").await;
                            return e;
                        }
                        Ok(Some(event)) if events_open => match events_tx.try_send(event) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(event)) => held_event = Some(event),
                            Err(mpsc::error::TrySendError::Closed(_)) => events_open = false,
                        },
                        Ok(_) => {}
                    },
                },
                Step::Deliver(Ok(permit)) => {
                    if let Some(event) = held_event.take() {
                        permit.send(event);
                    }
                }
                Step::Deliver(Err(_)) => {
                    events_open = false;
                    held_event = None;
                }
                Step::Write(Some(Outbound::Frame(message))) => {
                    let close_requested = match self.write_batch(message).await {
                        Ok(close_requested) => close_requested,
                        Err(e) => return read_error(e, close),
                    };
                    last_write = Instant::now();
                    if close_requested {
                        outbound_open = false;
                        if let Err(e) = self.begin_close(&mut close, &mut close_deadline).await {
                            return read_error(e, close);
                        }
                    }
                }
                Step::Write(Some(Outbound::Close)) | Step::Write(None) => {
                    // Closed by the application, or every handle was dropped.
                    outbound_open = false;
                    if let Err(e) = self.begin_close(&mut close, &mut close_deadline).await {
                        return read_error(e, close);
                    }
                }
                Step::Ping => {
                    if let Err(e) = self.ws.send(WsMessage::Ping(Default::default())).await {
                        return read_error(e, close);
                    }
                    last_write = Instant::now();
                }
                Step::CloseTimedOut => {
                    return close.unwrap_or_else(|| closed_by(None));
                }
            }
        }
    }

    /// Write one frame and whatever else is already queued (up to a batch), then
    /// flush. Returns whether a close request was met in the queue.
    async fn write_batch(&mut self, first: WsMessage) -> Result<bool, tungstenite::Error> {
        self.ws.feed(first).await?;
        let mut close_requested = false;
        for _ in 1..WRITE_BATCH {
            match self.outbound_rx.try_recv() {
                Ok(Outbound::Frame(message)) => self.ws.feed(message).await?,
                Ok(Outbound::Close) => {
                    close_requested = true;
                    break;
                }
                Err(_) => break,
            }
        }
        self.ws.flush().await?;
        Ok(close_requested)
    }

    /// Send a normal close (unless the server already closed) and start waiting,
    /// bounded, for the server's reply.
    async fn begin_close(
        &mut self,
        close: &mut Option<ClientError>,
        close_deadline: &mut Option<Instant>,
    ) -> Result<(), tungstenite::Error> {
        if close.is_some() || close_deadline.is_some() {
            return Ok(());
        }
        self.send_close(CloseCode::Normal, "client closing").await?;
        *close = Some(ClientError::Closed {
            code: Some(CloseCode::Normal.into()),
            reason: "closed by client".into(),
        });
        *close_deadline = Some(Instant::now() + self.close_timeout);
        Ok(())
    }

    async fn send_close(
        &mut self,
        code: CloseCode,
        reason: &str,
    ) -> Result<(), tungstenite::Error> {
        self.ws
            .send(WsMessage::Close(Some(CloseFrame {
                code,
                reason: reason.to_owned().into(),
            })))
            .await
    }

    /// Deliver an ack to its request; turn anything else into an event.
    fn route(&self, frame: ServerFrame) -> Result<Option<Event>, ClientError> {
        use server_frame::Event as E;
        let missing = |what: &str| ClientError::Protocol(format!("{what} event without payload"));
        Ok(Some(match frame.event {
            Some(E::Ack(ack)) => {
                self.complete(ack);
                return Ok(None);
            }
            Some(E::Message(m)) => Event::Message(m.message.ok_or_else(|| missing("message"))?),
            Some(E::Receipt(r)) => Event::Receipt(r.marker.ok_or_else(|| missing("receipt"))?),
            Some(E::Typing(t)) => Event::Typing(t),
            Some(E::Presence(p)) => Event::Presence(p.presence.ok_or_else(|| missing("presence"))?),
            Some(E::Conversation(c)) => Event::Conversation(c),
            Some(E::Goaway(g)) => Event::GoAway(g),
            Some(E::Error(e)) => Event::Error(e),
            Some(E::Resync(r)) => Event::Resync(r),
            Some(E::Welcome(_)) => {
                return Err(ClientError::Protocol("second welcome frame".into()));
            }
            // A newer server's event this client does not know.
            None => return Ok(None),
        }))
    }

    fn complete(&self, ack: switchboard_proto::v1::Ack) {
        let waiter = ack
            .id
            .parse::<u64>()
            .ok()
            .and_then(|id| self.shared.state().pending.remove(&id));
        let Some(waiter) = waiter else {
            // The request timed out or was dropped before its ack arrived.
            tracing::debug!(request_id = %ack.id, "ack for no waiting request");
            return;
        };
        let outcome = ack
            .result
            .ok_or_else(|| ClientError::Protocol(format!("ack {} without result", ack.id)));
        let _ = waiter.send(outcome);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
