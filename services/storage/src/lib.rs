//! Switchboard storage service: the only reader and writer of conversations, members
//! and their roles, bans, the timeline (messages, edits, deletes, reactions, system
//! events) with its current state, read and delivered markers, notification
//! preferences, webhooks and dedupe keys, served over the internal gRPC `Storage`
//! contract (`proto/switchboard/v1/storage.proto`).
//!
//! - [`HistoryStore`]: the backend trait, chosen once at startup by [`build_store`] from
//!   `storage.backend`: `sqlite` ([`sqlite`], embedded) or `scylla` ([`scylla`], ScyllaDB
//!   or Cassandra over CQL, for several storage instances). [`migrate`] applies pending
//!   schema migrations of either.
//! - [`StorageService`]: validation, authorization of timeline events (`Authorize`,
//!   rules written once in `rules.rs` over facts read from the store), membership
//!   checks of reads, paging defaults, the reader's own reactions, expiry of mutes and
//!   do-not-disturb, webhook secrets, coalescing of identical concurrent history
//!   reads, the dedupe purger.
//! - [`run`]: the service process (gRPC, health, admin endpoints, metrics). It waits
//!   for an unreachable backend (retrying with backoff, not ready meanwhile) and refuses
//!   to start on a schema that is behind when `storage.migrate_on_start` is off.
//!
//! It does not assign sequence numbers (the routing partition owner does, and
//! [`HistoryStore::append`] only checks they are gapless), authenticate users (callers
//! pass verified ids) or deliver anything (webhook deliveries are routing's; storage
//! keeps their cursors).

mod coalesce;
mod error;
mod metrics;
mod rules;
pub mod scylla;
mod service;
pub mod sqlite;
mod store;

#[cfg(test)]
mod conformance;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use switchboard_config::Config;
use switchboard_proto::v1::storage_server::StorageServer;
use switchboard_rpc::{MessageLimits as _, Peers};
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
    actions, kinds, roles, Appended, ConversationKind, Direction, HistoryStore, MarkerKind,
    MemberAction, MemberChange, MemberNotification, NewConversation, NewWebhook, PageQuery,
    ThreadPage, ThreadQuery,
};

/// The history store named by `storage.backend`, opened once (no retry): SQLite on a
/// blocking thread; ScyllaDB/Cassandra connected, migrated when
/// `storage.migrate_on_start` (else refused when its schema is behind) and prepared.
/// A backend that cannot be reached yet fails with a [`scylla::OpenError`] for which
/// [`scylla::OpenError::is_transient`] is true.
pub async fn build_store(config: &Config) -> anyhow::Result<Arc<dyn HistoryStore>> {
    match config.storage.backend.as_str() {
        "sqlite" => {
            let path = config.sqlite_path();
            let fsync = config.embedded_fsync();
            let store =
                tokio::task::spawn_blocking(move || sqlite::SqliteStore::open_with(&path, fsync))
                    .await
                    .context("opening the history store panicked")??;
            Ok(Arc::new(store))
        }
        "scylla" => Ok(Arc::new(scylla::ScyllaStore::open(config).await?)),
        other => anyhow::bail!("unknown storage.backend `{other}`"),
    }
}

/// Apply the pending schema migrations of the configured backend (`switchboard
/// migrate`); returns the schema version.
pub async fn migrate(config: &Config) -> anyhow::Result<u32> {
    match config.storage.backend.as_str() {
        "sqlite" => {
            // Opening a SQLite store migrates it.
            build_store(config).await?;
            Ok(sqlite::MIGRATIONS.len() as u32)
        }
        "scylla" => scylla::migrate(config).await,
        other => anyhow::bail!("unknown storage.backend `{other}`"),
    }
}

/// First wait between attempts to open an unreachable backend.
const OPEN_BACKOFF_START: Duration = Duration::from_millis(500);
/// Longest wait between attempts to open an unreachable backend.
const OPEN_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// [`build_store`], retried with backoff while the backend is unreachable; `None` when
/// `shutdown` came first. Other failures (bad configuration, a schema that is behind)
/// are returned at once.
async fn open_store(
    config: &Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Arc<dyn HistoryStore>>> {
    let mut backoff = switchboard_rpc::Backoff::new(OPEN_BACKOFF_START, OPEN_BACKOFF_MAX);
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            attempt = build_store(config) => attempt,
        };
        match attempt {
            Ok(store) => return Ok(Some(store)),
            Err(e)
                if e.downcast_ref::<scylla::OpenError>()
                    .is_some_and(scylla::OpenError::is_transient) =>
            {
                let wait = backoff.next_wait();
                tracing::warn!(
                    error = %e,
                    retry_in_ms = wait.as_millis() as u64,
                    "history store unreachable; not ready, retrying"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Run the storage service until `shutdown` is cancelled.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let grpc =
        switchboard_telemetry::bind("storage.grpc_listen", &config.storage.grpc_listen).await?;
    let admin =
        switchboard_telemetry::bind("storage.admin_listen", &config.storage.admin_listen).await?;
    let peers = Peers::remote(&config.cluster)?;
    serve(config, grpc, admin, peers, shutdown).await
}

/// [`run`] on listeners bound by the caller (tests bind `127.0.0.1:0`). The service
/// registers itself with `peers`, so that services of the same process call it
/// directly.
pub async fn serve(
    config: Arc<Config>,
    grpc_listener: TcpListener,
    admin_listener: TcpListener,
    peers: Peers,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let registry = prometheus::Registry::new();
    let metrics = StorageMetrics::register(&registry)?;
    let readiness = Readiness::new();
    // Stops the admin endpoints and the purger once this function returns, whether
    // because of `shutdown`, a failed gRPC server or a store that cannot be opened.
    let local = shutdown.child_token();
    let _stop_local = local.clone().drop_guard();
    let admin = tokio::spawn(switchboard_telemetry::serve_admin(
        admin_listener,
        registry,
        readiness.clone(),
        local.clone(),
    ));
    {
        // Not ready as soon as draining starts.
        let (readiness, local) = (readiness.clone(), local.clone());
        tokio::spawn(async move {
            local.cancelled().await;
            readiness.set(false);
        });
    }

    let Some(store) = open_store(&config, &shutdown).await? else {
        tracing::info!("storage service stopped before its history store opened");
        local.cancel();
        return admin.await.context("admin server panicked")?;
    };
    let service = Arc::new(StorageService::new(
        store,
        ServiceSettings::from_config(&config.storage),
        system_clock(),
        metrics,
    ));
    let purger = spawn_dedupe_purger(Arc::clone(&service), PURGE_INTERVAL, local.clone());

    let (reporter, health) = switchboard_rpc::health();
    reporter.set_serving::<StorageServer<StorageGrpc>>().await;
    let grpc = Arc::new(StorageGrpc::new(service));
    peers.provide_storage(grpc.clone());
    let routes =
        tonic::service::Routes::new(StorageServer::from_arc(grpc).message_limits(&config.cluster));
    let addr = grpc_listener.local_addr()?;
    if !shutdown.is_cancelled() {
        readiness.set(true);
    }
    tracing::info!(%addr, backend = %config.storage.backend, "storage service ready");
    let served = switchboard_rpc::serve(
        grpc_listener,
        routes,
        health,
        &config.cluster,
        shutdown.clone(),
    )
    .await;
    readiness.set(false);
    local.cancel();
    let _ = purger.await;
    let admin_result = admin.await.context("admin server panicked")?;
    tracing::info!("storage service stopped");
    served?;
    admin_result
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use switchboard_proto::v1::storage_client::StorageClient;

    /// The peers of a storage service alone in its process: it calls no one.
    pub(crate) fn peers() -> Peers {
        Peers::remote(&switchboard_config::ClusterConfig::default()).unwrap()
    }
    use switchboard_proto::{
        status_error_code, AppendRequest, CreateConversationRequest, ErrorCode, HistoryRequest,
        LastSeqRequest, Message, StorageHistoryRequest,
    };

    async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        (out[9..12].parse().unwrap(), out)
    }

    #[tokio::test]
    async fn the_factory_refuses_unknown_backends() {
        let mut config = Config::default();
        config.storage.backend = "mongo".into();
        let err = build_store(&config)
            .await
            .err()
            .expect("unknown backend refused");
        assert!(err.to_string().contains("mongo"), "{err}");
        let err = migrate(&config).await.expect_err("unknown backend refused");
        assert!(err.to_string().contains("mongo"), "{err}");
    }

    #[tokio::test]
    async fn a_store_that_cannot_open_fails_the_service() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        // A directory where the database file should be.
        config.storage.sqlite_path = dir.path().display().to_string();
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let result = serve(
            Arc::new(config),
            grpc,
            admin,
            peers(),
            CancellationToken::new(),
        )
        .await;
        assert!(result.is_err());
    }

    #[tokio::test]
    async fn grpc_round_trip_with_error_codes_health_and_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc_addr, admin_addr) = (grpc.local_addr().unwrap(), admin.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            Arc::new(config),
            grpc,
            admin,
            peers(),
            shutdown.clone(),
        ));

        let mut client = StorageClient::connect(format!("http://{grpc_addr}"))
            .await
            .unwrap();
        let conv = client
            .create_conversation(CreateConversationRequest {
                creator_id: "alice".into(),
                kind: "direct".into(),
                members: vec!["bob".into()],
                name: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(conv.members, ["alice", "bob"]);
        let appended = client
            .append(AppendRequest {
                message: Some(Message {
                    conversation_id: conv.conversation_id.clone(),
                    seq: 1,
                    sender_id: "alice".into(),
                    client_msg_id: "c1".into(),
                    body: "hi".into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!appended.duplicate);
        let history = |user: &str| StorageHistoryRequest {
            user_id: user.into(),
            request: Some(HistoryRequest {
                conversation_id: conv.conversation_id.clone(),
                ..Default::default()
            }),
            webhook_id: String::new(),
        };
        let page = client.history(history("bob")).await.unwrap().into_inner();
        assert_eq!(page.messages.len(), 1);
        assert_eq!(page.messages[0].body, "hi");

        let denied = client.history(history("eve")).await.unwrap_err();
        assert_eq!(status_error_code(&denied), ErrorCode::NotMember);
        let unknown = client
            .last_seq(LastSeqRequest {
                conversation_id: "missing".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status_error_code(&unknown), ErrorCode::NotFound);

        assert_eq!(http_get(admin_addr, "/readyz").await.0, 200);
        let (code, metrics) = http_get(admin_addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(
            metrics.contains("switchboard_storage_backend_duration_seconds_count{op=\"append\"} 1"),
            "{metrics}"
        );
        assert!(
            metrics.contains(
                "switchboard_storage_backend_errors_total{code=\"not_found\",op=\"last_seq\"} 1"
            ),
            "{metrics}"
        );

        shutdown.cancel();
        server.await.unwrap().unwrap();
        assert!(dir.path().join("data/storage.sqlite3").exists());
    }

    /// The conversation-feature RPCs over gRPC: results, and error codes (banned,
    /// forbidden, invalid_request, not_member, not_found) carried to the caller.
    #[tokio::test]
    async fn grpc_conversation_features() {
        use switchboard_proto::{
            AdvanceWebhookRequest, AuthorizeRequest, DeleteWebhookRequest, ListWebhooksRequest,
            NotificationTargetsRequest, PutWebhookRequest, ReceiptsRequest, SetNotificationRequest,
            SetReadMarkerRequest, SharedContactsRequest, StorageReceiptsRequest,
            StorageThreadRequest, SystemEvent, ThreadRequest,
        };

        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_addr = grpc.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            Arc::new(config),
            grpc,
            admin,
            peers(),
            shutdown.clone(),
        ));
        let mut client = StorageClient::connect(format!("http://{grpc_addr}"))
            .await
            .unwrap();

        let g = client
            .create_conversation(CreateConversationRequest {
                creator_id: "olga".into(),
                kind: "group".into(),
                members: vec!["bob".into()],
                name: "g".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .conversation_id;
        let mut seq = 0;
        let mut send = |client: &mut StorageClient<tonic::transport::Channel>, m: Message| {
            seq += 1;
            let mut client = client.clone();
            let m = Message { seq, ..m };
            async move {
                client
                    .authorize(AuthorizeRequest {
                        message: Some(Message {
                            seq: 0,
                            ..m.clone()
                        }),
                    })
                    .await?;
                client.append(AppendRequest { message: Some(m) }).await
            }
        };
        let base = Message {
            conversation_id: g.clone(),
            sender_id: "olga".into(),
            body: "root".into(),
            ..Default::default()
        };
        send(&mut client, base.clone()).await.unwrap();
        send(
            &mut client,
            Message {
                sender_id: "bob".into(),
                thread_root_seq: 1,
                body: "reply".into(),
                ..base.clone()
            },
        )
        .await
        .unwrap();
        let ban = Message {
            kind: "system".into(),
            body: String::new(),
            system: Some(SystemEvent {
                action: "members_banned".into(),
                user_ids: vec!["eve".into()],
                ..Default::default()
            }),
            ..base.clone()
        };
        send(&mut client, ban.clone()).await.unwrap();
        let add_eve = Message {
            system: Some(SystemEvent {
                action: "members_added".into(),
                user_ids: vec!["eve".into()],
                ..Default::default()
            }),
            ..ban.clone()
        };
        let denied = client
            .authorize(AuthorizeRequest {
                message: Some(add_eve),
            })
            .await
            .unwrap_err();
        assert_eq!(status_error_code(&denied), ErrorCode::Banned);
        let edit_by_olga = Message {
            kind: "edit".into(),
            target_seq: 2,
            body: "x".into(),
            ..base.clone()
        };
        let denied = client
            .authorize(AuthorizeRequest {
                message: Some(edit_by_olga),
            })
            .await
            .unwrap_err();
        assert_eq!(status_error_code(&denied), ErrorCode::Forbidden);

        let thread = client
            .thread(StorageThreadRequest {
                user_id: "bob".into(),
                request: Some(ThreadRequest {
                    conversation_id: g.clone(),
                    root_seq: 1,
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(thread.root.unwrap().reply_count, 1);
        assert_eq!(thread.replies.len(), 1);

        let marker = client
            .set_read_marker(SetReadMarkerRequest {
                conversation_id: g.clone(),
                user_id: "bob".into(),
                seq: 1,
                kind: "delivered".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((marker.kind.as_str(), marker.seq), ("delivered", 1));
        let receipts = client
            .receipts(StorageReceiptsRequest {
                user_id: "olga".into(),
                request: Some(ReceiptsRequest {
                    conversation_id: g.clone(),
                    seq: 1,
                }),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((receipts.read_by, receipts.delivered_to), (0, 1));

        client
            .set_notification(SetNotificationRequest {
                user_id: "bob".into(),
                conversation_id: g.clone(),
                until_ms: -1,
            })
            .await
            .unwrap();
        let targets = client
            .notification_targets(NotificationTargetsRequest {
                conversation_id: g.clone(),
                sender_id: "olga".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (targets.notify, targets.silenced),
            (vec![], vec!["bob".to_string()])
        );
        let shared = client
            .shared_contacts(SharedContactsRequest {
                user_id: "bob".into(),
                other_ids: vec!["olga".into(), "eve".into()],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(shared.shared, ["olga"]);

        let bad_url = client
            .put_webhook(PutWebhookRequest {
                conversation_id: g.clone(),
                actor_id: "olga".into(),
                url: "gopher://x".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status_error_code(&bad_url), ErrorCode::InvalidRequest);
        let hook = client
            .put_webhook(PutWebhookRequest {
                conversation_id: g.clone(),
                actor_id: "olga".into(),
                url: "https://example.com/in".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((hook.delivered_seq, hook.secret.len()), (3, 64));
        let advanced = client
            .advance_webhook(AdvanceWebhookRequest {
                conversation_id: g.clone(),
                webhook_id: hook.webhook_id.clone(),
                delivered_seq: 3,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(advanced.delivered_seq, 3);
        let listed = client
            .list_webhooks(ListWebhooksRequest {
                conversation_id: g.clone(),
                actor_id: "bob".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .webhooks;
        assert_eq!(listed.len(), 1);
        assert!(listed[0].secret.is_empty(), "members do not see secrets");
        let outsider = client
            .list_webhooks(ListWebhooksRequest {
                conversation_id: g.clone(),
                actor_id: "eve".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status_error_code(&outsider), ErrorCode::NotMember);
        client
            .delete_webhook(DeleteWebhookRequest {
                conversation_id: g.clone(),
                actor_id: "olga".into(),
                webhook_id: hook.webhook_id.clone(),
            })
            .await
            .unwrap();
        let gone = client
            .delete_webhook(DeleteWebhookRequest {
                conversation_id: g.clone(),
                actor_id: "olga".into(),
                webhook_id: hook.webhook_id,
            })
            .await
            .unwrap_err();
        assert_eq!(status_error_code(&gone), ErrorCode::NotFound);

        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
