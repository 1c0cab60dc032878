//! `serve` and `channel` over real loopback TCP: the cluster credential is checked on
//! every call, and the message size limits apply in both directions.

use switchboard_config::ClusterConfig;
use switchboard_proto::v1::gateway_client::GatewayClient;
use switchboard_proto::v1::gateway_server::{Gateway, GatewayServer};
use switchboard_proto::v1::{
    DeliverRequest, DeliverResponse, Delivery, DrainRequest, DrainResponse,
};
use switchboard_rpc::MessageLimits as _;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

const CREDENTIAL: &str = "rpc-serve-test-credential-0123456789abcdef";
const LIMIT: usize = 64 * 1024;

/// Answers Deliver with twice the recipients it was sent (to make big answers).
struct Echo;

#[tonic::async_trait]
impl Gateway for Echo {
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let deliveries = request.into_inner().deliveries;
        Ok(Response::new(DeliverResponse {
            delivered: deliveries.len() as u32,
            absent: deliveries
                .into_iter()
                .flat_map(|d| d.recipients.clone().into_iter().chain(d.recipients))
                .collect(),
        }))
    }

    async fn drain(&self, _: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        Ok(Response::new(DrainResponse { sessions: 7 }))
    }
}

fn cluster(credential: &str, max_message_bytes: usize) -> ClusterConfig {
    ClusterConfig {
        credential: credential.into(),
        max_message_bytes,
        ..ClusterConfig::default()
    }
}

/// A gateway server with `server`'s settings; its URL.
async fn start(server: &ClusterConfig, shutdown: &CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (_reporter, health) = switchboard_rpc::health();
    let routes = tonic::service::Routes::new(GatewayServer::new(Echo).message_limits(server));
    tokio::spawn(switchboard_rpc::serve(
        listener,
        routes,
        health,
        server,
        shutdown.clone(),
    ));
    url
}

fn client(url: &str, cluster: &ClusterConfig) -> GatewayClient<switchboard_rpc::Channel> {
    GatewayClient::new(switchboard_rpc::channel(url, cluster).unwrap()).message_limits(cluster)
}

fn deliver_of(bytes: usize) -> DeliverRequest {
    DeliverRequest {
        deliveries: vec![Delivery {
            recipients: vec!["r".repeat(bytes)],
            ..Delivery::default()
        }],
    }
}

#[tokio::test]
async fn channels_carry_the_credential_the_server_checks() {
    let shutdown = CancellationToken::new();
    let url = start(&cluster(CREDENTIAL, LIMIT), &shutdown).await;
    let answer = client(&url, &cluster(CREDENTIAL, LIMIT))
        .drain(DrainRequest { deadline_ms: 1 })
        .await
        .unwrap();
    assert_eq!(answer.into_inner().sessions, 7);
    let other = format!("{}x", &CREDENTIAL[1..]);
    for credential in ["", other.as_str()] {
        let refused = client(&url, &cluster(credential, LIMIT))
            .drain(DrainRequest { deadline_ms: 1 })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{credential}");
    }
    shutdown.cancel();
}

#[tokio::test]
async fn message_sizes_are_limited_both_ways() {
    let shutdown = CancellationToken::new();
    let url = start(&cluster(CREDENTIAL, LIMIT), &shutdown).await;
    let limited = cluster(CREDENTIAL, LIMIT);
    let roomy = cluster(CREDENTIAL, 4 * LIMIT);

    // Under the limit both ways.
    let answer = client(&url, &limited)
        .deliver(deliver_of(LIMIT / 4))
        .await
        .unwrap();
    assert_eq!(answer.into_inner().absent.len(), 2);
    // The client does not send more than its limit (it resets the stream)...
    let refused = client(&url, &limited)
        .deliver(deliver_of(2 * LIMIT))
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused.code(),
            tonic::Code::OutOfRange | tonic::Code::Internal
        ),
        "{refused:?}"
    );
    // ...and the server does not accept it from a client that would.
    let refused = client(&url, &roomy)
        .deliver(deliver_of(2 * LIMIT))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    shutdown.cancel();

    // A server allowed to answer more than its client accepts: the request fits, the
    // answer (twice its size) does not, and the client refuses to decode it.
    let shutdown = CancellationToken::new();
    let url = start(&roomy, &shutdown).await;
    let refused = client(&url, &limited)
        .deliver(deliver_of(LIMIT * 3 / 4))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    shutdown.cancel();
}

/// Takes a Deliver call, says so, and never answers.
struct Hang(std::sync::Arc<tokio::sync::Notify>);

#[tonic::async_trait]
impl Gateway for Hang {
    async fn deliver(
        &self,
        _: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        self.0.notify_one();
        std::future::pending().await
    }

    async fn drain(&self, _: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        std::future::pending().await
    }
}

#[tokio::test]
async fn a_server_that_dies_during_a_call_is_unavailable_to_the_caller() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let called = std::sync::Arc::new(tokio::sync::Notify::new());
    let (kill_tx, kill_rx) = std::sync::mpsc::channel::<()>();
    // The server runs on a runtime of its own: dropping it is the process dying,
    // with the call in flight.
    let server = {
        let called = called.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.spawn(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tonic::transport::Server::builder()
                    .add_service(GatewayServer::new(Hang(called)))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                    .await
            });
            let _ = kill_rx.recv();
            runtime.shutdown_background();
        })
    };
    let config = cluster(CREDENTIAL, LIMIT);
    let mut client = GatewayClient::new(switchboard_rpc::channel(&url, &config).unwrap());
    let call = tokio::spawn(async move {
        client
            .deliver(DeliverRequest {
                deliveries: vec![Delivery::default()],
            })
            .await
    });
    called.notified().await;
    kill_tx.send(()).unwrap();
    server.join().unwrap();
    let status = call.await.unwrap().expect_err("the server died");
    assert_eq!(
        switchboard_proto::status_error_code(&status),
        switchboard_proto::ErrorCode::Unavailable,
        "{status:?}"
    );
}
