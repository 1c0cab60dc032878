//! One message's trace across four separate processes, exported over OTLP/gRPC to a
//! collector run by the test: the spans of the sending gateway, routing (Send, the
//! partition owner's sequence step continued from the event log record's
//! `traceparent`, the Deliver fan-out), storage (Append) and the delivering gateway
//! form one trace with the expected parents. Once on the embedded backends, once on
//! Redis, Kafka (the context in the record header) and the CQL server, and once to a
//! collector over TLS that wants a client certificate and a bearer token (the test
//! CA and certificates of `SB_TEST_TLS_DIR`, which `deploy/local/up.sh` generates).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value::Value, KeyValue};
use switchboard_client::{Encoding, Event};

/// One exported span, as the collector received it.
#[derive(Clone, Debug)]
struct Exported {
    /// `service.name` of the exporting process.
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: HashMap<String, String>,
}

/// An OTLP/gRPC trace collector that keeps every span it receives (with `token`,
/// only from exports that carry it as a bearer token).
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Exported>>>,
    token: Option<&'static str>,
    /// Exports refused for a missing or wrong token.
    refused: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if let Some(token) = self.token {
            let given = request.metadata().get("authorization");
            if given.and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {token}")) {
                self.refused.fetch_add(1, Ordering::SeqCst);
                return Err(tonic::Status::unauthenticated("no or a wrong token"));
            }
        }
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    received.push(Exported {
                        service: service.clone(),
                        name: span.name,
                        trace_id: span.trace_id,
                        span_id: span.span_id,
                        parent_span_id: span.parent_span_id,
                        attributes: attributes(&span.attributes),
                    });
                }
            }
        }
        self.spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .filter_map(|kv| {
            let value = match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => s.clone(),
                Value::BoolValue(b) => b.to_string(),
                Value::IntValue(i) => i.to_string(),
                Value::DoubleValue(d) => d.to_string(),
                _ => return None,
            };
            Some((kv.key.clone(), value))
        })
        .collect()
}

/// Start the collector on a free loopback port; returns its URL. With `tls` it serves
/// TLS with the test server certificate and requires a client certificate of the
/// test CA.
async fn start_collector(collector: Collector, tls: bool) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the collector");
    let addr = listener.local_addr().expect("collector address");
    let mut server = tonic::transport::Server::builder();
    if tls {
        let read = |name: &str| std::fs::read(tls_file(name)).expect("read the test TLS files");
        let config = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                read("server.pem"),
                read("server.key"),
            ))
            .client_ca_root(tonic::transport::Certificate::from_pem(read("ca.pem")));
        server = server.tls_config(config).expect("the collector's TLS");
    }
    tokio::spawn(
        server
            .add_service(TraceServiceServer::new(collector))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("{}://{addr}", if tls { "https" } else { "http" })
}

/// The one span named `name` among `spans`; panics (listing them) otherwise.
fn one<'a>(spans: &'a [&'a Exported], name: &str) -> &'a Exported {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one `{name}` span in the trace, got {}: {spans:#?}",
        found.len()
    );
    found[0]
}

// Two workers: the collector keeps answering while the test thread waits for the
// processes to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_is_one_trace_from_the_sending_to_the_delivering_gateway() {
    one_message_is_one_trace(Setup::new(true), Collector::default(), false).await;
}

/// The same through Kafka's record header (and Redis, and the CQL server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_context_crosses_kafka_in_the_record_header() {
    let mut setup = Setup::new(true);
    setup.real_backends();
    one_message_is_one_trace(setup, Collector::default(), false).await;
}

/// The same to an `https://` collector that checks the exporter's client certificate
/// and wants a bearer token, given in a headers file as a mounted Secret gives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_a_tls_collector_with_a_client_certificate_and_a_token() {
    let mut setup = Setup::new(true);
    let headers = setup.data_dir().join("otlp-headers");
    std::fs::write(&headers, "authorization=Bearer s3cret-token\n").expect("headers file");
    setup.set("SWITCHBOARD_TELEMETRY__OTLP_CA_FILE", &tls_file("ca.pem"));
    setup.set(
        "SWITCHBOARD_TELEMETRY__OTLP_CERT_FILE",
        &tls_file("client.pem"),
    );
    setup.set(
        "SWITCHBOARD_TELEMETRY__OTLP_KEY_FILE",
        &tls_file("client.key"),
    );
    setup.set(
        "SWITCHBOARD_TELEMETRY__OTLP_HEADERS_FILE",
        &headers.display().to_string(),
    );
    let collector = Collector {
        token: Some("s3cret-token"),
        ..Collector::default()
    };
    one_message_is_one_trace(setup, collector.clone(), true).await;
    assert_eq!(
        collector.refused.load(Ordering::SeqCst),
        0,
        "every export had the token"
    );
}

async fn one_message_is_one_trace(mut setup: Setup, collector: Collector, tls: bool) {
    let endpoint = start_collector(collector.clone(), tls).await;

    setup.set("SWITCHBOARD_TELEMETRY__OTLP_ENDPOINT", &endpoint);
    setup.set("SWITCHBOARD_GATEWAY__DRAIN_DEADLINE_MS", "500");
    let mut storage = setup.spawn(&["storage"], &[]);
    let mut presence = setup.spawn(&["presence"], &[]);
    let mut routing = setup.spawn(&["routing"], &[]);
    let mut sending = setup.spawn(&["gateway"], &setup.gateway.env());
    let second = GatewayPorts::new();
    let mut delivering = setup.spawn(&["gateway"], &second.env());
    for (setting, proc) in [
        ("SWITCHBOARD_STORAGE__ADMIN_LISTEN", &storage),
        ("SWITCHBOARD_PRESENCE__ADMIN_LISTEN", &presence),
        ("SWITCHBOARD_ROUTING__ADMIN_LISTEN", &routing),
    ] {
        wait_ready_long(setup.port_of(setting), proc).await;
    }
    wait_ready_long(setup.gateway.listen, &sending).await;
    wait_ready_long(second.listen, &delivering).await;

    // alice sends from the first gateway; bob is only on the second.
    let (alice, _alice_ev) = connect_to(
        &setup.gateway,
        &setup.token("alice"),
        "phone",
        Encoding::Json,
    )
    .await;
    let (bob, mut bob_ev) = connect_to(&second, &setup.token("bob"), "phone", Encoding::Json).await;
    let conversation = alice.create_direct("bob").await.expect("create");
    let id = conversation.conversation_id.clone();
    let ack = alice.send(&id, "traced").await.expect("send");
    let got = next_matching(&mut bob_ev, "the traced message", |ev| match ev {
        Event::Message(m) if m.conversation_id == id => Some(m.clone()),
        _ => None,
    })
    .await;
    // 0 when the owner sequenced it after the send's wait.
    if ack.seq != 0 {
        assert_eq!(ack.seq, got.seq);
    }
    let seq = got.seq.to_string();
    alice.close().await;
    bob.close().await;

    // Stopping flushes each process's queued spans before it exits.
    for proc in [
        &mut sending,
        &mut delivering,
        &mut routing,
        &mut storage,
        &mut presence,
    ] {
        let status = proc
            .terminate(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("no exit after SIGTERM; log:\n{}", proc.output()));
        assert!(status.success(), "exit {status:?}; log:\n{}", proc.output());
    }

    let all = collector
        .spans
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let send = all
        .iter()
        .find(|s| {
            s.name == "gateway.send"
                && s.attributes.get("conversation_id").map(String::as_str) == Some(id.as_str())
        })
        .unwrap_or_else(|| panic!("no gateway.send span for {id}; exported: {all:#?}"));
    let trace: Vec<&Exported> = all.iter().filter(|s| s.trace_id == send.trace_id).collect();

    // The sending gateway starts the trace.
    assert!(send.parent_span_id.is_empty(), "{send:#?}");
    assert_eq!(send.service, "switchboard-gateway");
    assert_eq!(send.attributes["seq"], ack.seq.to_string());
    assert_eq!(send.attributes["duplicate"], "false");

    // routing's Send is the server side of the gateway's call.
    let route = one(&trace, "routing.Send");
    assert_eq!(route.service, "switchboard-routing");
    assert_eq!(route.parent_span_id, send.span_id);
    assert_eq!(route.attributes["conversation_id"], id);

    // The partition owner continues from the record's traceparent, which names the
    // Send span that appended it.
    let sequence = one(&trace, "routing.sequence");
    assert_eq!(sequence.service, "switchboard-routing");
    assert_eq!(sequence.parent_span_id, route.span_id);
    assert_eq!(sequence.attributes["seq"], seq);
    assert_eq!(sequence.attributes["offset"], route.attributes["offset"]);

    // storage persists it (in a batch of the conversation's records of one poll,
    // this one alone) as a child of the sequencing step.
    let append = one(&trace, "storage.AppendBatch");
    assert_eq!(append.service, "switchboard-storage");
    assert_eq!(append.parent_span_id, sequence.span_id);
    assert_eq!(append.attributes["first_seq"], seq);
    assert_eq!(append.attributes["messages"], "1");
    assert_eq!(append.attributes["duplicates"], "0");
    assert_eq!(sequence.attributes["duplicate"], "false");

    // Fan-out to the gateway bob is on, and that gateway's Deliver under it.
    let second_url = format!("http://127.0.0.1:{}", second.grpc);
    let deliver = trace
        .iter()
        .find(|s| s.name == "routing.deliver" && s.attributes["gateway"] == second_url)
        .unwrap_or_else(|| panic!("no routing.deliver to {second_url}: {trace:#?}"));
    assert_eq!(deliver.service, "switchboard-routing");
    assert_eq!(deliver.parent_span_id, sequence.span_id);
    let delivered = trace
        .iter()
        .find(|s| s.name == "gateway.Deliver" && s.parent_span_id == deliver.span_id)
        .unwrap_or_else(|| panic!("no gateway.Deliver under the fan-out: {trace:#?}"));
    assert_eq!(delivered.service, "switchboard-gateway");
    let count: u32 = delivered.attributes["delivered"].parse().expect("a count");
    assert!(count >= 1, "{delivered:#?}");

    // No span of the trace carries the message body.
    for span in &trace {
        assert!(
            span.attributes.values().all(|v| !v.contains("traced")),
            "{span:#?}"
        );
    }
}
