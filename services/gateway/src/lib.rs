//! Switchboard gateway: terminates client WebSocket connections, verifies their
//! tokens, speaks the client protocol (JSON or protobuf frames), keeps one bounded
//! outbound queue per connection, calls presence, routing and storage over gRPC, and
//! serves the internal `Gateway` gRPC service whose `Deliver` pushes events to its
//! local sessions.
//!
//! It owns no durable state: sessions live in presence, messages in routing and
//! storage. It does not decide who receives an event (routing does) nor check
//! membership (the backends do); it only filters what reaches each local connection
//! (excluded session, presence watches, last-seen privacy, duplicate sequences, slow
//! consumers). When presence lost its state or was unreachable it registers its
//! sessions again and tells them to `resync` (the `heartbeat` module); it also tells a session
//! to resync when a conversation skips a sequence on its connection.

mod api;
mod connection;
mod deliver;
mod error;
mod heartbeat;
mod http;
mod last_seen;
mod limits;
mod metrics;
mod requests;
mod sessions;

use std::sync::Arc;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::atomic::{AtomicU64, Ordering};
use switchboard_auth::{Signer, Verifier};
use switchboard_config::Config;
use switchboard_proto::v1;
use switchboard_rpc::MessageLimits as _;
use switchboard_telemetry::Readiness;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use api::{ApiRoute, API_ROUTES};
pub use connection::{close_code, MAX_PENDING_REQUESTS};

use metrics::Metrics;
use sessions::{ConnectionSlots, Session, SessionRegistry};
use switchboard_rpc::Peers;

/// After the drain deadline, how long closing connections get to finish.
const CLOSE_GRACE: Duration = Duration::from_secs(3);
/// Closed sessions waiting to be unregistered from presence. When many connections
/// close at once the excess is not unregistered explicitly: those sessions expire by
/// `presence.session_ttl_ms` (the heartbeat no longer names them).
const UNREGISTER_QUEUE: usize = 10_000;
/// `UnregisterSession` calls in flight at once.
const UNREGISTER_CONCURRENCY: usize = 16;

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// State shared by the HTTP handlers, the connection tasks and the gRPC service.
pub(crate) struct Shared {
    pub config: Arc<Config>,
    pub verifier: Verifier,
    /// Mints development tokens; present only in dev mode.
    pub signer: Option<Signer>,
    pub peers: Peers,
    pub sessions: SessionRegistry,
    /// Who is whose contact (a shared conversation the user wrote in), for last-seen
    /// privacy "contacts".
    pub contacts: last_seen::ContactsCache,
    pub slots: Arc<ConnectionSlots>,
    /// The request budget each user's connections and HTTP API calls share.
    pub user_limiter: limits::UserRateLimiter,
    /// Client connections accepted but not upgraded (`gateway.max_pending_upgrades`).
    pub pending_upgrades: Arc<limits::PendingUpgrades>,
    /// Client connections per IP address (`gateway.max_connections_per_ip`).
    pub per_ip: Arc<limits::PerIpConnections>,
    pub metrics: Metrics,
    pub readiness: Readiness,
    /// The URL presence hands to routing for `Deliver` calls to this gateway.
    pub advertise_url: String,
    /// Cancelled when draining starts: upgrades are refused, sessions get `goaway`.
    pub draining: CancellationToken,
    /// Cancelled at the drain deadline: remaining sessions close with 1001.
    pub closing: CancellationToken,
    /// Cancelled when draining has finished (all sessions gone, presence told).
    pub drained: CancellationToken,
    /// The deadline of the drain in progress, in ms.
    drain_deadline_ms: AtomicU64,
    /// Sessions to unregister from presence, drained by one worker (bounded, so a
    /// mass disconnect does not start one RPC per session at once).
    unregister_tx: tokio::sync::mpsc::Sender<String>,
}

impl Shared {
    /// Register a session with presence, with the status it has (see
    /// [`Session::registration_status`]).
    pub(crate) async fn register(&self, session: &Session) -> Result<(), tonic::Status> {
        let (status, automatic) = session.registration_status();
        self.peers
            .presence
            .clone()
            .register_session(v1::RegisterSessionRequest {
                session: Some(v1::SessionInfo {
                    session_id: session.session_id.to_string(),
                    user_id: session.user_id.to_string(),
                    device_id: session.device_id.to_string(),
                    gateway_addr: self.advertise_url.clone(),
                    status: status.to_owned(),
                    automatic,
                }),
            })
            .await?;
        Ok(())
    }

    /// Queue a closed session for `UnregisterSession`; when the queue is full the
    /// session is left to expire by TTL.
    pub(crate) fn unregister(&self, session_id: String) {
        if self.unregister_tx.try_send(session_id).is_err() {
            self.metrics.unregister_skipped.inc();
        }
    }

    pub(crate) fn drain_deadline_ms(&self) -> u64 {
        self.drain_deadline_ms.load(Ordering::SeqCst)
    }

    /// Wake every session's connection loop, which then looks at `draining` and
    /// `closing`. A connection whose loop starts later looks at them first.
    fn wake_sessions(&self) {
        for session in self.sessions.all() {
            session.wake_writer();
        }
    }

    /// Start draining (once; later calls do nothing): not ready, no new connections,
    /// `goaway` to every session, then close what is left at the deadline and tell
    /// presence to forget this gateway.
    pub(crate) fn start_drain(self: &Arc<Self>, deadline_ms: u64) {
        if self.draining.is_cancelled() {
            return;
        }
        self.drain_deadline_ms.store(deadline_ms, Ordering::SeqCst);
        self.readiness.set(false);
        self.draining.cancel();
        self.wake_sessions();
        let shared = self.clone();
        tokio::spawn(async move {
            let open = shared.slots.open();
            info!(connections = open, deadline_ms, "draining");
            let deadline = Duration::from_millis(deadline_ms);
            if tokio::time::timeout(deadline, shared.slots.all_closed())
                .await
                .is_err()
            {
                info!(
                    connections = shared.slots.open(),
                    "drain deadline passed, closing the rest"
                );
            }
            shared.closing.cancel();
            shared.wake_sessions();
            if tokio::time::timeout(CLOSE_GRACE, shared.slots.all_closed())
                .await
                .is_err()
            {
                warn!(
                    connections = shared.slots.open(),
                    "connections still open after close"
                );
            }
            let dropped = shared
                .peers
                .presence
                .clone()
                .drop_gateway(v1::DropGatewayRequest {
                    gateway_addr: shared.advertise_url.clone(),
                })
                .await;
            if let Err(status) = dropped {
                warn!(error = %status.message(), "cannot tell presence this gateway is gone");
            }
            shared.drained.cancel();
        });
    }
}

/// The three listeners of a gateway.
pub struct Listeners {
    /// Client connections (`gateway.listen`).
    pub http: TcpListener,
    /// Internal gRPC (`gateway.grpc_listen`).
    pub grpc: TcpListener,
    /// Health, readiness and metrics (`gateway.admin_listen`).
    pub admin: TcpListener,
}

impl Listeners {
    /// Bind the addresses of `config.gateway`.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let g = &config.gateway;
        Ok(Listeners {
            http: switchboard_telemetry::bind("gateway.listen", &g.listen).await?,
            grpc: switchboard_telemetry::bind("gateway.grpc_listen", &g.grpc_listen).await?,
            admin: switchboard_telemetry::bind("gateway.admin_listen", &g.admin_listen).await?,
        })
    }
}

/// A gateway built from configuration, ready to serve on its listeners.
pub struct Gateway {
    shared: Arc<Shared>,
    registry: prometheus::Registry,
    unregister_rx: tokio::sync::mpsc::Receiver<String>,
}

impl Gateway {
    /// Build from configuration: token verifier (and in dev mode the signer), peer
    /// channels (lazy) and metrics. Fails on bad auth settings, before any port is bound.
    pub fn new(config: Arc<Config>) -> anyhow::Result<Gateway> {
        let peers = Peers::remote(&config.cluster)?;
        Gateway::with_peers(config, peers)
    }

    /// [`Gateway::new`] calling the services through `peers`; with in-process peers
    /// the gateway registers itself there when it serves, so that deliveries from
    /// the same process reach it directly.
    pub fn with_peers(config: Arc<Config>, peers: Peers) -> anyhow::Result<Gateway> {
        let verifier = Verifier::from_config(&config.auth)
            .map_err(|e| anyhow::anyhow!("gateway auth: {e}"))?;
        let signer = if config.dev_mode {
            Some(
                Signer::from_config(&config.auth)
                    .map_err(|e| anyhow::anyhow!("dev_mode token signer: {e}"))?,
            )
        } else {
            None
        };
        let registry = prometheus::Registry::new();
        let metrics = Metrics::new(&registry)?;
        let (unregister_tx, unregister_rx) = tokio::sync::mpsc::channel(UNREGISTER_QUEUE);
        let shared = Arc::new(Shared {
            unregister_tx,
            verifier,
            signer,
            peers,
            sessions: SessionRegistry::default(),
            contacts: last_seen::ContactsCache::default(),
            slots: ConnectionSlots::new(
                config.gateway.max_connections,
                metrics.connections.clone(),
            ),
            user_limiter: limits::UserRateLimiter::new(
                config.gateway.requests_per_second,
                config.gateway.request_burst,
            ),
            pending_upgrades: limits::PendingUpgrades::new(config.gateway.max_pending_upgrades),
            per_ip: limits::PerIpConnections::new(config.gateway.max_connections_per_ip),
            metrics,
            readiness: Readiness::new(),
            advertise_url: config.gateway_advertise_url(),
            draining: CancellationToken::new(),
            closing: CancellationToken::new(),
            drained: CancellationToken::new(),
            drain_deadline_ms: AtomicU64::new(config.gateway.drain_deadline_ms),
            config,
        });
        Ok(Gateway {
            shared,
            registry,
            unregister_rx,
        })
    }

    /// Serve until `shutdown` is cancelled, then drain (goaway, wait up to
    /// `gateway.drain_deadline_ms`, close the rest with 1001, presence DropGateway)
    /// and stop the servers.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let shared = self.shared;
        let stop = CancellationToken::new();
        info!(
            listen = %listeners.http.local_addr()?,
            grpc = %listeners.grpc.local_addr()?,
            admin = %listeners.admin.local_addr()?,
            advertise_url = %shared.advertise_url,
            "gateway listening"
        );

        let (reporter, health) = switchboard_rpc::health();
        reporter
            .set_serving::<v1::gateway_server::GatewayServer<deliver::GatewayService>>()
            .await;
        let service = Arc::new(deliver::GatewayService {
            shared: shared.clone(),
        });
        shared.peers.provide_gateway(
            &shared.advertise_url,
            service.clone(),
            &shared.config.cluster,
        );
        let routes = tonic::service::Routes::new(
            v1::gateway_server::GatewayServer::from_arc(service)
                .message_limits(&shared.config.cluster),
        );
        // The three servers; any of them stopping before shutdown is a failure.
        let mut servers = tokio::task::JoinSet::new();
        servers.spawn(switchboard_rpc::serve(
            listeners.grpc,
            routes,
            health,
            &shared.config.cluster,
            stop.clone(),
        ));
        servers.spawn(switchboard_telemetry::serve_admin(
            listeners.admin,
            self.registry.clone(),
            shared.readiness.clone(),
            stop.clone(),
        ));
        let app = http::router(shared.clone(), self.registry, shared.readiness.clone());
        servers.spawn(http::serve_clients(
            listeners.http,
            app,
            shared.clone(),
            stop.clone(),
        ));
        let heartbeat = tokio::spawn(heartbeat::run(shared.clone(), shared.drained.clone()));
        let unregister = tokio::spawn(unregister_worker(
            shared.clone(),
            self.unregister_rx,
            shared.drained.clone(),
        ));
        shared.readiness.set(true);

        let mut failure: Option<anyhow::Error> = None;
        tokio::select! {
            () = shutdown.cancelled() => {}
            Some(ended) = servers.join_next() => {
                let e = match ended {
                    Ok(Ok(())) => anyhow::anyhow!("a gateway server stopped unexpectedly"),
                    Ok(Err(e)) => e,
                    Err(e) => anyhow::anyhow!("a gateway server panicked: {e}"),
                };
                warn!(error = %e, "gateway server stopped, draining");
                failure = Some(e);
            }
        }
        shared.start_drain(shared.config.gateway.drain_deadline_ms);
        shared.drained.cancelled().await;
        stop.cancel();
        let _ = heartbeat.await;
        let _ = unregister.await;
        while let Some(ended) = servers.join_next().await {
            match ended {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(e) => {
                    failure = failure.or(Some(anyhow::anyhow!("gateway server panicked: {e}")))
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        info!("gateway stopped");
        Ok(())
    }
}

/// Unregister closed sessions from presence, a few calls at a time, until `stop`
/// (after draining, presence has dropped the whole gateway anyway).
async fn unregister_worker(
    shared: Arc<Shared>,
    rx: tokio::sync::mpsc::Receiver<String>,
    stop: CancellationToken,
) {
    use futures::StreamExt as _;
    let calls = tokio_stream::wrappers::ReceiverStream::new(rx).for_each_concurrent(
        UNREGISTER_CONCURRENCY,
        |session_id| {
            let presence = shared.peers.presence.clone();
            async move {
                // Bounded by the channel's RPC timeout; if it fails the session
                // expires by TTL.
                if let Err(status) = presence
                    .unregister_session(v1::UnregisterSessionRequest {
                        session_id: session_id.clone(),
                    })
                    .await
                {
                    debug!(%session_id, error = %status.message(), "unregister failed");
                }
            }
        },
    );
    tokio::select! {
        () = calls => {}
        () = stop.cancelled() => {}
    }
}

/// Run the gateway until `shutdown` is cancelled (used by `switchboard gateway` and
/// `switchboard standalone`).
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let gateway = Gateway::new(config.clone())?;
    let listeners = Listeners::bind(&config).await?;
    gateway.serve(listeners, shutdown).await
}
