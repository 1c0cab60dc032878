//! Internal gRPC plumbing shared by the services: lazily connected channels to peer
//! services with the cluster's timeouts, and serving a service's gRPC routes with the
//! standard health-checking protocol and graceful shutdown.
//!
//! Internal calls are authenticated here, once for every service: every [`Channel`]
//! sends the cluster credential (`cluster.credential`) as the [`CREDENTIAL_METADATA`]
//! metadata, and [`serve`] refuses any call without it (or with another value) with
//! `unauthenticated`, except the standard health service (kubelet probes). An empty
//! credential means no check at all: the binary allows that only with
//! `cluster.insecure_no_credential`. The message size limits (`cluster.max_message_bytes`)
//! are applied by [`MessageLimits`], on every generated client and server.
//!
//! [`Peers`] is the one place a process builds the handles of the services it calls:
//! over gRPC, or straight to the implementation when the services share the process
//! (see [`peers`]).
//!
//! It owns no contract (those are in `switchboard-proto`) and no service behaviour.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use switchboard_config::ClusterConfig;
use switchboard_proto::v1;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Endpoint;

pub use tonic_health::server::HealthReporter;

pub mod peers;
pub use peers::{
    GatewayApi, GatewayPool, Peers, PresenceApi, PresenceInterestApi, RoutingApi, StorageApi,
};

/// The metadata key of the cluster credential on internal calls.
pub const CREDENTIAL_METADATA: &str = "x-switchboard-cluster-credential";

/// The path prefix of the standard health service, served without the credential.
const HEALTH_PATH: &str = "/grpc.health.v1.Health/";

/// A channel to a peer service that sends the cluster credential with every call.
pub type Channel = InterceptedService<tonic::transport::Channel, AttachCredential>;

/// Adds the cluster credential to every outgoing call of a [`Channel`].
#[derive(Clone)]
pub struct AttachCredential {
    /// `None` without a credential (`cluster.insecure_no_credential`).
    credential: Option<MetadataValue<Ascii>>,
}

impl AttachCredential {
    /// The interceptor for `cluster`'s credential.
    pub fn from_cluster(cluster: &ClusterConfig) -> anyhow::Result<AttachCredential> {
        let credential = cluster
            .read_credential()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if credential.is_empty() {
            return Ok(AttachCredential { credential: None });
        }
        let mut value: MetadataValue<Ascii> = credential.expose().parse().map_err(|_| {
            anyhow::anyhow!("cluster.credential: must be visible ASCII characters only")
        })?;
        // Kept out of HTTP/2 header compression tables.
        value.set_sensitive(true);
        Ok(AttachCredential {
            credential: Some(value),
        })
    }
}

impl tonic::service::Interceptor for AttachCredential {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(credential) = &self.credential {
            request
                .metadata_mut()
                .insert(CREDENTIAL_METADATA, credential.clone());
        }
        Ok(request)
    }
}

/// A channel to a peer service. It connects lazily and reconnects by itself, so a
/// peer that is down at start only makes calls fail (with `unavailable`) until it is up.
/// Every call carries the cluster credential.
pub fn channel(url: &str, cluster: &ClusterConfig) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| anyhow::anyhow!("invalid gRPC URL `{url}`: {e}"))?
        .connect_timeout(Duration::from_millis(cluster.connect_timeout_ms))
        .timeout(Duration::from_millis(cluster.rpc_timeout_ms))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    Ok(InterceptedService::new(
        endpoint.connect_lazy(),
        AttachCredential::from_cluster(cluster)?,
    ))
}

/// Serve `routes` plus `grpc.health.v1.Health` on `listener` until `shutdown`. Every
/// call except health checks must carry `cluster`'s credential. The settings are read
/// now; the returned future borrows nothing (it can be spawned).
pub fn serve(
    listener: TcpListener,
    routes: tonic::service::Routes,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    cluster: &ClusterConfig,
    shutdown: CancellationToken,
) -> impl Future<Output = anyhow::Result<()>> + Send + 'static {
    let credential = cluster.read_credential();
    let routes = routes.add_service(health).prepare();
    async move {
        let credential = credential.map_err(|e| anyhow::anyhow!("{e}"))?;
        let service = RequireCredential {
            inner: routes,
            expected: (!credential.is_empty()).then(|| Arc::from(credential.expose().as_bytes())),
        };
        tonic::transport::Server::builder()
            .serve_with_incoming_shutdown(service, accepted(listener), async move {
                shutdown.cancelled().await
            })
            .await
            .map_err(|e| anyhow::anyhow!("gRPC server failed: {e}"))
    }
}

/// The connections `listener` accepts, each with `TCP_NODELAY` set. The server
/// builder's `tcp_nodelay` applies only to listeners it binds itself; without it a
/// reply written in several small segments (HTTP/2 headers, data, trailers) waits
/// for the peer's delayed ACK, about 40 ms per call on an otherwise idle connection.
fn accepted(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

/// The server side of the credential check, in front of every route of [`serve`].
#[derive(Clone)]
struct RequireCredential {
    inner: tonic::service::Routes,
    /// `None`: no credential configured, every call is let through.
    expected: Option<Arc<[u8]>>,
}

impl RequireCredential {
    fn allows(&self, request: &http::Request<tonic::body::Body>) -> bool {
        let Some(expected) = &self.expected else {
            return true;
        };
        if request.uri().path().starts_with(HEALTH_PATH) {
            return true;
        }
        match request.headers().get(CREDENTIAL_METADATA) {
            Some(given) => constant_time_eq(given.as_bytes(), expected),
            None => false,
        }
    }
}

impl tower_service::Service<http::Request<tonic::body::Body>> for RequireCredential {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower_service::Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if self.allows(&request) {
            return Box::pin(self.inner.call(request));
        }
        tracing::warn!(
            path = request.uri().path(),
            "internal call refused: missing or wrong cluster credential"
        );
        let status = tonic::Status::unauthenticated("missing or wrong cluster credential");
        Box::pin(std::future::ready(Ok(status.into_http())))
    }
}

/// Equality of two byte strings in a time that depends on their lengths only, not on
/// where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The deliberate message size limits (`cluster.max_message_bytes`, both directions)
/// on a generated gRPC client or server. Every internal client and server is built
/// with it: tonic's defaults (4 MiB received, unbounded sent) are not a choice.
pub trait MessageLimits: Sized {
    fn message_limits(self, cluster: &ClusterConfig) -> Self;
}

macro_rules! message_limits {
    ($($client:ident :: $client_ty:ident),* ; $($server:ident :: $server_ty:ident : $service:ident),*) => {
        $(
            impl MessageLimits for v1::$client::$client_ty<Channel> {
                fn message_limits(self, cluster: &ClusterConfig) -> Self {
                    self.max_decoding_message_size(cluster.max_message_bytes)
                        .max_encoding_message_size(cluster.max_message_bytes)
                }
            }
        )*
        $(
            impl<T: v1::$server::$service> MessageLimits for v1::$server::$server_ty<T> {
                fn message_limits(self, cluster: &ClusterConfig) -> Self {
                    self.max_decoding_message_size(cluster.max_message_bytes)
                        .max_encoding_message_size(cluster.max_message_bytes)
                }
            }
        )*
    };
}

message_limits!(
    gateway_client::GatewayClient,
    presence_client::PresenceClient,
    presence_interest_client::PresenceInterestClient,
    routing_client::RoutingClient,
    storage_client::StorageClient;
    gateway_server::GatewayServer: Gateway,
    presence_server::PresenceServer: Presence,
    presence_interest_server::PresenceInterestServer: PresenceInterest,
    routing_server::RoutingServer: Routing,
    storage_server::StorageServer: Storage
);

/// A fresh health service and its reporter.
pub fn health() -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    tonic_health::server::health_reporter()
}

/// Exponential backoff with jitter, for retrying a peer or backend that is away: each
/// wait is the current step scaled by a random factor in [0.5, 1.0] (so restarted
/// instances spread out), and the step doubles up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(start: Duration, max: Duration) -> Backoff {
        Backoff {
            step: start.min(max),
            max,
        }
    }

    /// How long to wait before the next attempt.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self
            .step
            .mul_f64(rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..=1.0));
        self.step = (self.step * 2).min(self.max);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_service::Service as _;

    #[tokio::test]
    async fn accepted_connections_do_not_wait_for_delayed_acks() {
        use tokio_stream::StreamExt as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(accepted(listener));
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let server_side = incoming.next().await.unwrap().unwrap();
        assert!(
            server_side.nodelay().unwrap(),
            "TCP_NODELAY on the accepted socket"
        );
    }

    const CREDENTIAL: &str = "rpc-test-credential-0123456789abcdef";

    fn checker(credential: &str) -> RequireCredential {
        let cluster = ClusterConfig {
            credential: credential.into(),
            ..ClusterConfig::default()
        };
        let credential = cluster.read_credential().unwrap();
        RequireCredential {
            // No routes: a call let through is answered `unimplemented`.
            inner: tonic::service::Routes::default(),
            expected: (!credential.is_empty()).then(|| Arc::from(credential.expose().as_bytes())),
        }
    }

    /// The gRPC status code of a call to `path` carrying `credential`.
    async fn call(service: &mut RequireCredential, path: &str, credential: Option<&str>) -> i32 {
        let mut request = http::Request::builder()
            .method("POST")
            .uri(format!("http://peer{path}"))
            .header("content-type", "application/grpc");
        if let Some(credential) = credential {
            request = request.header(CREDENTIAL_METADATA, credential);
        }
        let response = service
            .call(request.body(tonic::body::Body::empty()).unwrap())
            .await
            .unwrap();
        tonic::Status::from_header_map(response.headers())
            .map(|s| s.code() as i32)
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn calls_without_the_right_credential_are_refused_except_health() {
        let unauthenticated = tonic::Code::Unauthenticated as i32;
        let unimplemented = tonic::Code::Unimplemented as i32;
        let mut service = checker(CREDENTIAL);
        let history = "/switchboard.v1.Storage/History";
        assert_eq!(call(&mut service, history, None).await, unauthenticated);
        let wrong = "x".repeat(CREDENTIAL.len());
        assert_eq!(
            call(&mut service, history, Some(&wrong)).await,
            unauthenticated
        );
        let prefix = &CREDENTIAL[..CREDENTIAL.len() - 1];
        assert_eq!(
            call(&mut service, history, Some(prefix)).await,
            unauthenticated
        );
        let longer = format!("{CREDENTIAL}x");
        assert_eq!(
            call(&mut service, history, Some(&longer)).await,
            unauthenticated
        );
        assert_eq!(
            call(&mut service, history, Some(CREDENTIAL)).await,
            unimplemented
        );
        let health = "/grpc.health.v1.Health/Check";
        assert_eq!(call(&mut service, health, None).await, unimplemented);
        // Without a configured credential (insecure mode) nothing is checked.
        let mut open = checker("");
        assert_eq!(call(&mut open, history, None).await, unimplemented);
    }

    #[test]
    fn channels_attach_the_credential() {
        use tonic::service::Interceptor as _;
        let cluster = ClusterConfig {
            credential: CREDENTIAL.into(),
            ..ClusterConfig::default()
        };
        let mut attach = AttachCredential::from_cluster(&cluster).unwrap();
        let request = attach.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get(CREDENTIAL_METADATA).unwrap(),
            CREDENTIAL
        );
        let mut none = AttachCredential::from_cluster(&ClusterConfig::default()).unwrap();
        let request = none.call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get(CREDENTIAL_METADATA).is_none());
    }

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let steps = [100, 200, 350, 350];
        for step in steps {
            let wait = b.next_wait();
            let step = Duration::from_millis(step);
            assert!(
                wait >= step / 2 && wait <= step,
                "{wait:?} outside [{:?}, {step:?}]",
                step / 2
            );
        }
    }
}
