//! Distributed tracing: the OpenTelemetry pipeline behind [`init_tracing`](crate::init_tracing)
//! and the W3C trace context carried between services.
//!
//! Services create ordinary `tracing` spans; when `telemetry.otlp_endpoint` is set a
//! `tracing-opentelemetry` layer turns them into OpenTelemetry spans and a batch
//! processor exports them over OTLP/gRPC (plain HTTP/2, or TLS to an `https://`
//! endpoint, optionally mutual, with the metadata of `telemetry.otlp_headers` on
//! every export). The context crosses process boundaries as a
//! W3C `traceparent`:
//! - in gRPC metadata: [`inject`] on the client's request, [`extract`] on the server,
//!   then [`set_parent`] on the server span;
//! - as a plain string where a message carries it (the event log's record header):
//!   [`traceparent`] and [`context_from_traceparent`].
//!
//! Without an exporter no OpenTelemetry layer is installed: contexts are empty,
//! nothing is injected, and these helpers cost a failed downcast each.

use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use switchboard_config::TelemetryConfig;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The OpenTelemetry context of a span or a remote caller (empty when tracing is
/// not exported). Cheap to clone.
pub use opentelemetry::Context as TraceContext;

/// The W3C header (and gRPC metadata key) that carries the trace context.
pub const TRACEPARENT: &str = "traceparent";

/// How long one export to the collector may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long flushing at exit may take.
pub(crate) const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// A tracer provider exporting to `config.otlp_endpoint` as `service_name`.
/// Must run inside a tokio runtime (the gRPC channel is spawned on it).
pub(crate) fn provider(
    config: &TelemetryConfig,
    service_name: &str,
) -> anyhow::Result<SdkTracerProvider> {
    if tokio::runtime::Handle::try_current().is_err() {
        anyhow::bail!("exporting traces needs the async runtime to be running");
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(config.otlp_endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .with_metadata(export_metadata(config)?);
    if config.otlp_endpoint.starts_with("https://") {
        builder = builder.with_tls_config(tls_config(config)?);
    }
    let exporter = builder.build().map_err(|e| {
        anyhow::anyhow!(
            "cannot build the OTLP exporter for `{}` (telemetry.otlp_endpoint): {e}",
            config.otlp_endpoint
        )
    })?;
    let resource = Resource::builder()
        .with_service_name(service_name.to_owned())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    // A trace started upstream keeps its decision; new ones are sampled by ratio.
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio)));
    // The batch processor's queue is bounded (2048 spans by default): past it, spans
    // are dropped rather than held in memory.
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(resource)
        .build())
}

/// The metadata every export carries (`telemetry.otlp_headers` or the file of
/// `telemetry.otlp_headers_file`).
fn export_metadata(config: &TelemetryConfig) -> anyhow::Result<MetadataMap> {
    let text =
        switchboard_config::read_secret(config.otlp_headers.expose(), &config.otlp_headers_file)
            .map_err(|e| anyhow::anyhow!("telemetry.otlp_headers_file: {e}"))?;
    let pairs = switchboard_config::parse_metadata_pairs(&text)
        .map_err(|e| anyhow::anyhow!("telemetry.otlp_headers: {e}"))?;
    let mut metadata = MetadataMap::new();
    for (key, value) in pairs {
        let name = MetadataKey::from_bytes(key.as_bytes()).map_err(|_| {
            anyhow::anyhow!("telemetry.otlp_headers: `{key}` is not a metadata key")
        })?;
        let value = MetadataValue::try_from(value.as_str()).map_err(|_| {
            anyhow::anyhow!("telemetry.otlp_headers: the value of `{key}` is invalid")
        })?;
        metadata.append(name, value);
    }
    Ok(metadata)
}

/// TLS to an `https://` collector: its CA (`telemetry.otlp_ca_file`, else the public
/// web roots built in) and, for mutual TLS, the client certificate and key. The
/// server name checked is the endpoint's host.
fn tls_config(config: &TelemetryConfig) -> anyhow::Result<ClientTlsConfig> {
    let read = |key: &str, path: &str| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("telemetry.{key} `{path}`: {e}"))
    };
    let mut tls = ClientTlsConfig::new();
    tls = if config.otlp_ca_file.is_empty() {
        tls.with_webpki_roots()
    } else {
        tls.ca_certificate(Certificate::from_pem(read(
            "otlp_ca_file",
            &config.otlp_ca_file,
        )?))
    };
    if !config.otlp_cert_file.is_empty() {
        tls = tls.identity(Identity::from_pem(
            read("otlp_cert_file", &config.otlp_cert_file)?,
            read("otlp_key_file", &config.otlp_key_file)?,
        ));
    }
    Ok(tls)
}

/// The `tracing` layer that records spans into `provider`.
pub(crate) fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("switchboard"))
        // Busy/idle times per span cost a clock read on every poll.
        .with_tracked_inactivity(false)
        .with_threads(false)
}

/// The current span's context (empty when tracing is not exported).
pub fn current_context() -> TraceContext {
    tracing::Span::current().context()
}

/// Make `cx` (a remote caller's context) the parent of `span`. Call before the span
/// is first entered; a no-op when tracing is not exported or `cx` is empty.
pub fn set_parent(span: &tracing::Span, cx: TraceContext) {
    if cx.span().span_context().is_valid() {
        // Fails only without the OpenTelemetry layer or after the span started.
        let _ = span.set_parent(cx);
    }
}

/// Link `span` to the span of `cx` (for work that serves several traces at once,
/// such as one batch carrying several messages). Call before the span is entered.
pub fn add_link(span: &tracing::Span, cx: &TraceContext) {
    let linked = cx.span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}

/// Whether `cx` names a span (false for an empty context).
pub fn has_span(cx: &TraceContext) -> bool {
    cx.span().span_context().is_valid()
}

/// Whether two contexts belong to the same span (both empty counts as the same).
pub fn same_span(a: &TraceContext, b: &TraceContext) -> bool {
    let (a, b) = (a.span(), b.span());
    let (a, b) = (a.span_context(), b.span_context());
    a.trace_id() == b.trace_id() && a.span_id() == b.span_id()
}

/// Put the current span's context into a gRPC request's metadata.
pub fn inject<T>(request: &mut tonic::Request<T>) {
    inject_context(&current_context(), request.metadata_mut());
}

/// Put `cx` into gRPC metadata (nothing when it has no valid span).
pub fn inject_context(cx: &TraceContext, metadata: &mut MetadataMap) {
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(cx, &mut MetadataInjector(metadata));
    }
}

/// The caller's context from gRPC metadata (empty when it sent none).
pub fn extract(metadata: &MetadataMap) -> TraceContext {
    if !metadata.contains_key(TRACEPARENT) {
        return TraceContext::new();
    }
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// `cx` as a W3C `traceparent` string ("" when it has no valid span).
pub fn traceparent(cx: &TraceContext) -> String {
    if !cx.span().span_context().is_valid() {
        return String::new();
    }
    let mut carrier = TraceparentCarrier(String::new());
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    carrier.0
}

/// The context a W3C `traceparent` string names (empty for "" or a malformed one).
pub fn context_from_traceparent(traceparent: &str) -> TraceContext {
    if traceparent.is_empty() {
        return TraceContext::new();
    }
    TraceContextPropagator::new().extract(&TraceparentCarrier(traceparent.to_owned()))
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// A carrier holding only `traceparent` (the record header has no room for
/// `tracestate`).
struct TraceparentCarrier(String);

impl Injector for TraceparentCarrier {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.0 = value;
        }
    }
}

impl Extractor for TraceparentCarrier {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn remote() -> TraceContext {
        TraceContext::new().with_remote_span_context(SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ))
    }

    #[test]
    fn traceparent_strings_round_trip() {
        assert_eq!(traceparent(&remote()), TP);
        let cx = context_from_traceparent(TP);
        assert!(same_span(&cx, &remote()));
        assert!(cx.span().span_context().is_remote());
        assert!(cx.span().span_context().is_sampled());
    }

    #[test]
    fn empty_and_malformed_traceparents_give_empty_contexts() {
        for bad in [
            "",
            "garbage",
            "00-xyz-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            let cx = context_from_traceparent(bad);
            assert!(!cx.span().span_context().is_valid(), "{bad}");
        }
        assert_eq!(traceparent(&TraceContext::new()), "");
    }

    #[test]
    fn grpc_metadata_carries_the_context() {
        let mut request = tonic::Request::new(());
        inject_context(&remote(), request.metadata_mut());
        assert_eq!(
            request
                .metadata()
                .get(TRACEPARENT)
                .unwrap()
                .to_str()
                .unwrap(),
            TP
        );
        assert!(same_span(&extract(request.metadata()), &remote()));
    }

    #[test]
    fn an_empty_context_injects_nothing() {
        let mut request = tonic::Request::new(());
        inject_context(&TraceContext::new(), request.metadata_mut());
        assert!(request.metadata().is_empty());
        // Without the OpenTelemetry layer the current span has no context either.
        inject(&mut request);
        assert!(request.metadata().is_empty());
        assert!(!extract(request.metadata()).span().span_context().is_valid());
    }

    #[test]
    fn a_span_whose_parent_is_remote_continues_the_trace_and_passes_it_on() {
        use tracing_subscriber::layer::SubscriberExt as _;
        // A provider without an exporter still assigns ids.
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry().with(layer(&provider));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("server");
            set_parent(&span, context_from_traceparent(TP));
            let _entered = span.enter();
            let cx = current_context();
            let sc = cx.span().span_context().clone();
            assert_eq!(sc.trace_id(), remote().span().span_context().trace_id());
            assert_ne!(sc.span_id(), remote().span().span_context().span_id());

            // What the next hop receives names this span, in the same trace.
            let mut request = tonic::Request::new(());
            inject(&mut request);
            assert!(same_span(&extract(request.metadata()), &cx));
            let carried = traceparent(&cx);
            assert!(
                carried.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{carried}"
            );
            assert!(same_span(&context_from_traceparent(&carried), &cx));

            // A child span stays in the trace, under the server span.
            let child = tracing::info_span!("child");
            let child_cx = child.context();
            assert_eq!(child_cx.span().span_context().trace_id(), sc.trace_id());
            assert!(!same_span(&child_cx, &cx));
        });
    }
}
