//! Logs, metrics and health endpoints, the same for every service.
//!
//! - [`init_tracing`]: `tracing` output as text or JSON, filtered by `log.level` (third-party
//!   crates at most `info`: they log frame contents below), and
//!   spans exported by OpenTelemetry OTLP/gRPC when `telemetry.otlp_endpoint` is set.
//! - [`trace`]: the W3C trace context across services (gRPC metadata and the event
//!   log's `traceparent` record header).
//! - [`Readiness`]: the flag behind `/readyz` (false until a service can serve, and
//!   false again as soon as it starts draining).
//! - [`admin_router`] / [`serve_admin`]: `/healthz`, `/readyz` and Prometheus
//!   `/metrics` on a service's admin port (the gateway also mounts them on its client
//!   port).
//!
//! Services own their metric definitions; this crate only exposes a registry.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use prometheus::{Encoder, Registry, TextEncoder};
use switchboard_config::{LogConfig, TelemetryConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Level;
use tracing_subscriber::filter::{FilterExt as _, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{fmt, EnvFilter, Layer as _};

pub mod trace;

pub use trace::{
    add_link, context_from_traceparent, current_context, extract, has_span, inject, inject_context,
    same_span, set_parent, traceparent, TraceContext,
};

/// Install the global tracing subscriber: log lines (text or JSON, filtered by
/// `log.level`) and, when `telemetry.otlp_endpoint` is set, spans exported over
/// OTLP/gRPC as the service `<telemetry.service_name_prefix>-<service>` (one name
/// per process: `switchboard-routing`, or `switchboard-standalone` for all four).
///
/// Call once per process, inside the tokio runtime when exporting. Keep the guard
/// until exit: dropping it flushes the spans still queued (waiting at most a few
/// seconds for the collector).
pub fn init_tracing(
    log: &LogConfig,
    telemetry: &TelemetryConfig,
    service: &str,
) -> anyhow::Result<TracingGuard> {
    let filter = EnvFilter::try_new(&log.level)
        .map_err(|e| anyhow::anyhow!("invalid log.level `{}`: {e}", log.level))?
        .and(content_free_targets());
    // Colours only for a person at a terminal, not in files or log collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let fmt_layer = if log.format == "json" {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_target(true)
            .boxed()
    } else {
        fmt::layer().with_target(true).with_ansi(ansi).boxed()
    };
    let provider = if telemetry.otlp_endpoint.is_empty() {
        None
    } else {
        Some(trace::provider(
            telemetry,
            &format!("{}-{service}", telemetry.service_name_prefix),
        )?)
    };
    // Spans are exported independently of `log.level`: Switchboard's own spans and
    // the events inside them, at info and above.
    let otel_layer = provider.as_ref().map(|p| {
        trace::layer(p).with_filter(Targets::new().with_target("switchboard", Level::INFO))
    });
    tracing_subscriber::registry()
        .with(fmt_layer.with_filter(filter))
        .with(otel_layer)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install tracing subscriber: {e}"))?;
    if provider.is_some() {
        tracing::info!(
            endpoint = %telemetry.otlp_endpoint,
            sample_ratio = telemetry.sample_ratio,
            "exporting traces"
        );
    }
    Ok(TracingGuard { provider })
}

/// The most a target may log whatever `log.level` says: Switchboard's own crates
/// everything (they never log message content), third-party crates `info` at most. At
/// debug and trace the WebSocket, HTTP/2 and gRPC libraries log whole frames and
/// headers (message bodies, topics, tokens), so a verbose `log.level` never reaches them.
pub fn content_free_targets() -> Targets {
    Targets::new()
        .with_target("switchboard", Level::TRACE)
        .with_default(Level::INFO)
}

/// Keeps the span exporter of [`init_tracing`] alive; dropping it flushes what is
/// queued and stops the exporter. Drop it on a multi-threaded runtime or outside the
/// runtime (the flush blocks the dropping thread while the runtime sends).
#[must_use = "dropping the guard stops exporting traces"]
pub struct TracingGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown_with_timeout(trace::SHUTDOWN_TIMEOUT) {
                // The subscriber may already be gone: say it plainly on stderr.
                eprintln!("cannot flush traces at exit: {e}");
            }
        }
    }
}

/// Whether a service is ready for traffic. Cloning shares the flag.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AdminState {
    registry: Registry,
    readiness: Readiness,
}

/// `/healthz` (process alive), `/readyz` (ready for traffic) and `/metrics`.
pub fn admin_router(registry: Registry, readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState {
            registry,
            readiness,
        })
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut buf) {
        Ok(()) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            buf,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            format!("cannot encode metrics: {e}\n").into_bytes(),
        ),
    }
}

/// Serve the admin endpoints on `listener` until `shutdown` is cancelled.
pub async fn serve_admin(
    listener: TcpListener,
    registry: Registry,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    axum::serve(listener, admin_router(registry, readiness))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

/// Bind a listener, naming the setting in the error.
pub async fn bind(setting: &str, addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({setting}): {e}"))
}

/// Prometheus latency buckets from 100 µs to 10 s, in seconds.
pub fn latency_buckets() -> Vec<f64> {
    vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::IntCounter;

    async fn get_text(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out[9..12].parse().unwrap();
        (code, out)
    }

    #[test]
    fn third_party_targets_never_log_below_info() {
        let targets = content_free_targets();
        for target in [
            "tungstenite::protocol",
            "tokio_tungstenite",
            "h2::codec::framed_read",
            "hyper_util::client",
            "tonic::transport",
            "axum::serve",
        ] {
            assert!(!targets.would_enable(target, &Level::TRACE), "{target}");
            assert!(!targets.would_enable(target, &Level::DEBUG), "{target}");
            assert!(targets.would_enable(target, &Level::INFO), "{target}");
        }
        assert!(targets.would_enable("switchboard_gateway::http", &Level::TRACE));
        assert!(targets.would_enable("switchboard", &Level::DEBUG));
    }

    #[tokio::test]
    async fn admin_endpoints_report_health_readiness_and_metrics() {
        let registry = Registry::new();
        let counter = IntCounter::new("test_things_total", "things").unwrap();
        registry.register(Box::new(counter.clone())).unwrap();
        counter.inc_by(3);
        let readiness = Readiness::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve_admin(
            listener,
            registry,
            readiness.clone(),
            shutdown.clone(),
        ));

        assert_eq!(get_text(addr, "/healthz").await.0, 200);
        assert_eq!(get_text(addr, "/readyz").await.0, 503);
        readiness.set(true);
        assert_eq!(get_text(addr, "/readyz").await.0, 200);
        let (code, body) = get_text(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("test_things_total 3"), "{body}");

        shutdown.cancel();
        task.await.unwrap().unwrap();
    }
}
