//! Internal gRPC plumbing shared by the services: lazily connected channels to peer
//! services with the cluster's timeouts, and serving a service's gRPC routes with the
//! standard health-checking protocol and graceful shutdown.
//!
//! It owns no contract (those are in `switchboard-proto`) and no service behaviour.

use std::time::Duration;

use switchboard_config::ClusterConfig;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

pub use tonic_health::server::HealthReporter;

/// A channel to a peer service. It connects lazily and reconnects by itself, so a
/// peer that is down at start only makes calls fail (with `unavailable`) until it is up.
pub fn channel(url: &str, cluster: &ClusterConfig) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| anyhow::anyhow!("invalid gRPC URL `{url}`: {e}"))?
        .connect_timeout(Duration::from_millis(cluster.connect_timeout_ms))
        .timeout(Duration::from_millis(cluster.rpc_timeout_ms))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}

/// Serve `routes` plus `grpc.health.v1.Health` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    routes: tonic::service::Routes,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_routes(routes)
        .add_service(health)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutdown.cancelled().await
        })
        .await
        .map_err(|e| anyhow::anyhow!("gRPC server failed: {e}"))
}

/// A fresh health service and its reporter.
pub fn health() -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    tonic_health::server::health_reporter()
}

/// Channels to peers known only at run time (gateways, by the URL they advertise),
/// created on first use and shared afterwards.
#[derive(Clone)]
pub struct ChannelPool {
    cluster: ClusterConfig,
    channels: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Channel>>>,
}

impl ChannelPool {
    pub fn new(cluster: ClusterConfig) -> Self {
        ChannelPool {
            cluster,
            channels: Default::default(),
        }
    }

    /// The channel to `url`, creating it on first use.
    pub fn get(&self, url: &str) -> anyhow::Result<Channel> {
        // A std mutex is right here: the critical section is a map lookup or insert,
        // never held across an await.
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(ch) = channels.get(url) {
            return Ok(ch.clone());
        }
        let ch = channel(url, &self.cluster)?;
        channels.insert(url.to_owned(), ch.clone());
        Ok(ch)
    }

    /// Forget a peer (for example a gateway that went away).
    pub fn remove(&self, url: &str) {
        self.channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(url);
    }
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
