//! Switchboard routing service: the owner of the event log.
//!
//! It validates sends (size, rate, membership), appends them durably to the
//! conversation's partition of the [`eventlog::EventLog`], and, as the owner of that
//! partition, assigns each conversation's gapless sequence, has storage persist the
//! message and fans it out to the gateways of the online members (one `Deliver`
//! batch per gateway; when presence is unreachable or rebuilding, to every gateway it
//! knows, see the `gateways` module). Ephemeral events (typing, receipts, conversation changes) go
//! through `Publish` and never touch the log or storage.
//!
//! The log backend is chosen by `routing.backend`: `embedded` (one SQLite file, one
//! instance owning every partition) or `kafka` (topic `routing.kafka_topic` with
//! `routing.partitions` partitions, key = conversation id, header `traceparent`;
//! consumer group `routing.kafka_group` decides which instance owns which
//! partition, offsets committed manually after storage persisted; see
//! [`eventlog::KafkaLog`]). Both map a conversation to its partition with the same
//! [`partition_for`], so the mapping never depends on the backend.
//!
//! Every timeline event kind (message, edit, delete, reaction, system) is a Send:
//! shapes are checked here, storage `Authorize` decides the rest before anything is
//! appended, and the event is sequenced, stored and fanned out like a message. A
//! system event also reaches the users it names and its actor, and drops the cached
//! member list of its conversation as soon as it is persisted.
//!
//! The partition owner of a conversation also dispatches its outgoing webhooks
//! (see `webhooks`): the events after each webhook's durable cursor, read back from
//! storage, POSTed in order with an HMAC signature, retried with backoff.
//!
//! It does not store history (storage does), know where sessions are (presence
//! does), or talk to clients (gateways do).
//!
//! Send's reply: an error means the message was not accepted (nothing durable, or a
//! validation failure); `SendResult` means it is durable in the log. `seq` is its
//! sequence when the partition owner sequenced it within `routing.sequence_wait_ms`,
//! else 0 (it then arrives as a `message` event). `duplicate` is true when the
//! message was already accepted under the same (sender, client_msg_id); the reply
//! then carries the original message id, sequence and time.

use std::sync::Arc;
use std::time::Duration;

use switchboard_config::Config;
use switchboard_proto::v1::routing_server::RoutingServer;
use switchboard_rpc::{MessageLimits as _, Peers};
use switchboard_telemetry::Readiness;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod egress;
mod error;
pub mod eventlog;
mod fanout;
mod gateways;
mod limiter;
mod members;
mod metrics;
mod node;
mod owner;
mod service;
mod waiters;
mod webhooks;

#[cfg(test)]
mod tests;

pub use error::RoutingError;
pub use eventlog::{partition_for, EventLog, LogError, LogRecord, NewRecord};
pub use service::RoutingService;

/// How long members stay cached when other routing instances may change them (see
/// `members` for the trade-off).
const MEMBER_TTL: Duration = Duration::from_secs(2);
/// How long members stay cached when this process is the log's only consumer: every
/// membership change passes through it and drops the entry at once, so the TTL is
/// only a safety net.
const MEMBER_TTL_SOLE_CONSUMER: Duration = Duration::from_secs(60);
const MAX_CACHED_MEMBER_LISTS: usize = 50_000;
/// How long queued deliveries may drain at shutdown.
const FANOUT_DRAIN: Duration = Duration::from_secs(2);

/// Run the routing service on `routing.grpc_listen` and `routing.admin_listen` until
/// `shutdown` is cancelled.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let grpc =
        switchboard_telemetry::bind("routing.grpc_listen", &config.routing.grpc_listen).await?;
    let admin =
        switchboard_telemetry::bind("routing.admin_listen", &config.routing.admin_listen).await?;
    let peers = Peers::remote(&config.cluster)?;
    serve(config, grpc, admin, peers, shutdown).await
}

/// Run the routing service on listeners bound by the caller (tests, or a process
/// that binds every port before starting anything). It calls storage, presence and
/// gateways through `peers` and registers itself there.
///
/// Shutdown order: readiness goes false and new sends are refused; the gRPC server
/// finishes in-flight calls (each bounded by `routing.sequence_wait_ms` plus the RPC
/// timeout) while the partition owners keep sequencing; then the owners finish the
/// record in hand and commit; queued deliveries drain briefly; the log is closed.
pub async fn serve(
    config: Arc<Config>,
    grpc_listener: TcpListener,
    admin_listener: TcpListener,
    peers: Peers,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // A child token: a failure here stops this service, not the caller's others.
    let shutdown = shutdown.child_token();
    let registry = prometheus::Registry::new();
    let metrics = Arc::new(metrics::Metrics::new(&registry)?);
    let readiness = Readiness::new();

    // Admin first: /healthz answers and /readyz says "not ready" while the log
    // opens (a Kafka cluster that is down is retried until it answers).
    let admin = tokio::spawn(switchboard_telemetry::serve_admin(
        admin_listener,
        registry,
        readiness.clone(),
        shutdown.clone(),
    ));
    let opened = tokio::select! {
        opened = eventlog::open(&config) => Some(opened),
        _ = shutdown.cancelled() => None,
    };
    let node = match opened {
        Some(Ok(log)) => build_node(config.clone(), log, &peers, metrics, readiness.clone()),
        Some(Err(e)) => Err(e),
        None => {
            // Stopped before the log opened.
            let _ = admin.await;
            return Ok(());
        }
    };
    let node = match node {
        Ok(node) => node,
        Err(e) => {
            shutdown.cancel();
            let _ = admin.await;
            return Err(e);
        }
    };

    let owners_stop = CancellationToken::new();
    let owners = tokio::spawn(owner::supervise(node.clone(), owners_stop.clone()));
    let dispatcher = tokio::spawn(webhooks::run(
        node.clone(),
        webhooks::DispatchOptions::from_config(&config.routing),
        owners_stop.clone(),
    ));

    let (health_reporter, health_service) = switchboard_rpc::health();
    health_reporter
        .set_serving::<RoutingServer<RoutingService>>()
        .await;
    let service = Arc::new(RoutingService::new(node.clone(), shutdown.clone()));
    peers.provide_routing(service.clone());
    let routes = tonic::service::Routes::new(
        RoutingServer::from_arc(service).message_limits(&config.cluster),
    );
    node.health.set_serving(true);
    tracing::info!(
        grpc = %config.routing.grpc_listen,
        partitions = node.log.partitions(),
        backend = %config.routing.backend,
        "routing serving"
    );

    let not_ready = {
        let node = node.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            node.health.set_serving(false);
        })
    };
    let served = switchboard_rpc::serve(
        grpc_listener,
        routes,
        health_service,
        &config.cluster,
        shutdown.clone(),
    )
    .await;
    // Also reached when the server failed on its own: stop everything the same way.
    shutdown.cancel();
    let _ = not_ready.await;
    owners_stop.cancel();
    let _ = owners.await;
    // Batches in flight are abandoned unacknowledged: the next owner sends them again.
    let _ = dispatcher.await;
    node.fanout.shutdown(FANOUT_DRAIN).await;
    node.log.close().await;
    match admin.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "admin server failed"),
        Err(e) => tracing::warn!(error = %e, "admin server task failed"),
        Ok(Ok(())) => {}
    }
    tracing::info!("routing stopped");
    served
}

/// Wire the shared state of the service around an opened log.
fn build_node(
    config: Arc<Config>,
    log: Arc<dyn EventLog>,
    peers: &Peers,
    metrics: Arc<metrics::Metrics>,
    readiness: Readiness,
) -> anyhow::Result<Arc<node::Node>> {
    let storage = peers.storage.clone();
    let fanout = fanout::Fanout::new(
        peers.gateways.clone(),
        fanout::FanoutOptions {
            queue: config.routing.deliver_queue,
            batch: config.routing.deliver_batch,
        },
        metrics.clone(),
    );
    let member_ttl = if log.sole_consumer() {
        MEMBER_TTL_SOLE_CONSUMER
    } else {
        MEMBER_TTL
    };
    Ok(Arc::new(node::Node {
        members: members::MemberCache::new(storage.clone(), member_ttl, MAX_CACHED_MEMBER_LISTS),
        health: node::Health::new(readiness, log.partitions()),
        waiters: Default::default(),
        config,
        log,
        storage,
        presence: peers.presence.clone(),
        interest: peers.interest.clone(),
        interest_supported: std::sync::atomic::AtomicBool::new(true),
        fanout,
        gateways: Default::default(),
        presence_hold_off: Default::default(),
        metrics,
        webhooks: Default::default(),
    }))
}
