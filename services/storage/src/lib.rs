//! Switchboard storage service: the only reader and writer of conversations, members,
//! message history, read markers and dedupe keys, served over the internal gRPC
//! `Storage` contract (`proto/switchboard/v1/storage.proto`).
//!
//! - [`HistoryStore`]: the backend trait (SQLite now in [`sqlite`], ScyllaDB later), chosen
//!   once at startup by [`build_store`] from `storage.backend`.
//! - [`StorageService`]: validation, membership checks of reads, paging defaults,
//!   coalescing of identical concurrent history reads, the dedupe purger.
//! - [`run`]: the service process (gRPC, health, admin endpoints, metrics).
//!
//! It does not assign sequence numbers (the routing partition owner does, and
//! [`HistoryStore::append`] only checks they are gapless), authenticate users (callers
//! pass verified ids) or deliver anything.

mod coalesce;
mod error;
mod metrics;
mod rules;
mod service;
pub mod sqlite;
mod store;

#[cfg(test)]
mod conformance;

use std::sync::Arc;

use anyhow::Context;
use switchboard_config::Config;
use switchboard_proto::v1::storage_server::StorageServer;
use switchboard_telemetry::Readiness;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use coalesce::SingleFlight;
pub use error::StorageError;
pub use metrics::{Instrumented, StorageMetrics};
pub use rules::{MAX_ID_BYTES, MAX_MEMBERS, MAX_NAME_BYTES};
pub use service::{
    spawn_dedupe_purger, system_clock, Clock, ServiceSettings, StorageGrpc, StorageService,
    PURGE_INTERVAL,
};
pub use store::{
    Appended, ConversationKind, Direction, HistoryStore, MemberAction, MemberChange,
    NewConversation, PageQuery,
};

/// The history store named by `storage.backend`. Opening blocks (file I/O,
/// migrations): call it from a blocking context.
pub fn build_store(config: &Config) -> anyhow::Result<Arc<dyn HistoryStore>> {
    match config.storage.backend.as_str() {
        "sqlite" => Ok(Arc::new(sqlite::SqliteStore::open(&config.sqlite_path())?)),
        other => anyhow::bail!("unknown storage.backend `{other}`"),
    }
}

/// Run the storage service until `shutdown` is cancelled.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let grpc = switchboard_telemetry::bind("storage.grpc_listen", &config.storage.grpc_listen)
        .await?;
    let admin =
        switchboard_telemetry::bind("storage.admin_listen", &config.storage.admin_listen).await?;
    serve(config, grpc, admin, shutdown).await
}

/// [`run`] on listeners bound by the caller (tests bind `127.0.0.1:0`).
pub async fn serve(
    config: Arc<Config>,
    grpc_listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let registry = prometheus::Registry::new();
    let metrics = StorageMetrics::register(&registry)?;
    let readiness = Readiness::new();
    // Stops the admin endpoints and the purger once the gRPC server has returned,
    // whether because of `shutdown` or because it failed.
    let local = shutdown.child_token();
    let admin = tokio::spawn(switchboard_telemetry::serve_admin(
        admin_listener,
        registry,
        readiness.clone(),
        local.clone(),
    ));
    {
        // Not ready as soon as draining starts.
        let (readiness, shutdown) = (readiness.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            readiness.set(false);
        });
    }

    let store_config = Arc::clone(&config);
    let store = tokio::task::spawn_blocking(move || build_store(&store_config))
        .await
        .context("opening the history store panicked")??;
    let service = Arc::new(StorageService::new(
        store,
        ServiceSettings::from_config(&config.storage),
        system_clock(),
        metrics,
    ));
    let purger = spawn_dedupe_purger(Arc::clone(&service), PURGE_INTERVAL, local.clone());

    let (reporter, health) = switchboard_rpc::health();
    reporter
        .set_serving::<StorageServer<StorageGrpc>>()
        .await;
    let routes = tonic::service::Routes::new(StorageServer::new(StorageGrpc::new(service)));
    let addr = grpc_listener.local_addr()?;
    if !shutdown.is_cancelled() {
        readiness.set(true);
    }
    tracing::info!(%addr, backend = %config.storage.backend, "storage service ready");
    let served = switchboard_rpc::serve(grpc_listener, routes, health, shutdown.clone()).await;
    readiness.set(false);
    local.cancel();
    let _ = purger.await;
    let admin_result = admin.await.context("admin server panicked")?;
    tracing::info!("storage service stopped");
    served?;
    admin_result
}
