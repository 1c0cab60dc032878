//! Switchboard presence service: who is online, on which gateway, and who wants to know.
//!
//! It owns, through the session store ([`SessionStore`], picked by [`build_store`] from
//! `presence.backend`):
//! - live sessions (session id, user, device, the gateway's advertised gRPC URL), their
//!   status (`online` at register, `away`, `busy`, `invisible`; an `away` set by the
//!   gateway's idle timer is marked automatic) and their TTL: a session not
//!   heartbeated for `presence.session_ttl_ms` expires, so a crashed gateway's users go
//!   offline by themselves (a sweeper task runs every `ttl/4`, clamped to 10 ms..1 s);
//! - each user's settings: `status_text` (at most [`store::MAX_STATUS_TEXT_BYTES`]
//!   bytes, no control characters) and `last_seen_privacy` (`everyone`, `contacts`,
//!   `nobody`), kept until changed, whether or not the user is online;
//! - each user's aggregated presence: the most available device wins
//!   (`online` > `away` > `busy` > `invisible`), no live session is `offline`;
//!   `last_seen_ms` is the last register, heartbeat or unregister of any of the
//!   user's sessions, kept after they go offline for [`store::LAST_SEEN_RETENTION`]
//!   (30 days) and for at most [`store::MAX_OFFLINE_LAST_SEEN`] users (oldest
//!   forgotten first);
//! - two views of it ([`store::PresenceState`]): the TRUE view, for the user
//!   themselves (`Query.viewer_id` or `Watch.watcher_id` equal to the user, and the
//!   `RegisterSession` / `SetStatus` responses), and the PUBLIC view for everyone
//!   else: `invisible` reads `offline` with 0 sessions and `last_seen_ms` frozen at
//!   when the user was last visibly present; privacy `nobody` reads
//!   `last_seen_ms = 0`; `contacts` is returned as is (the gateway clears it for
//!   viewers who share no conversation with the user);
//! - the route table (user -> gateways with a live session of theirs);
//! - the interest index (conversation -> gateways holding a member's session), served
//!   by `PresenceInterest.RouteConversation`: cached per conversation and member set,
//!   dropped when a member's gateways change, recomputed at least every
//!   [`store::INTEREST_TTL`] (see [`store::interest`]);
//! - presence watches (watched user -> gateway -> watcher ids). A watch lives while the
//!   watcher has a session on that gateway; at most [`store::MAX_WATCHED_PER_WATCHER`]
//!   users per watcher and gateway.
//!
//! When a user's PUBLIC view changes (its status, status text or privacy: through
//! register, unregister, expiry, set status or a dropped gateway; not a last-seen tick,
//! another device, or an invisible user going offline), the service sends a `presence`
//! event carrying the public view through `Gateway.Deliver` to every gateway holding
//! watchers of that user, with the watchers as recipients. This
//! happens off the request path through bounded queues that drop (and count) when full:
//! presence is ephemeral. See [`notifier`].
//!
//! With `presence.backend = "redis"` several presence instances share that state in
//! Redis, and changes travel between them by Redis pub/sub: each instance delivers the
//! changes of all of them to the gateways it is responsible for
//! ([`store::PresenceFeed`]; layout and consistency in [`store::redis`]).
//!
//! It notices when the store's state is new or was lost (its epoch changed, see
//! [`rebuild`]): `Heartbeat` answers carry the epoch, so gateways register their
//! sessions again at once, and for `presence.rebuild_window_ms` its routes say
//! `partial`, so routing delivers to every gateway it knows meanwhile.
//!
//! It does not own: client connections or the client protocol (gateway), who may
//! watch whom (the gateway decides before calling `Watch`), conversations and their
//! members (storage; routing passes the member list with each `RouteConversation`),
//! message delivery (routing).

use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use switchboard_config::Config;
use switchboard_proto::v1::presence_interest_server::PresenceInterestServer;
use switchboard_proto::v1::presence_server::PresenceServer;
use switchboard_rpc::{MessageLimits as _, Peers};
use switchboard_telemetry::Readiness;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod error;
mod metrics;
pub mod notifier;
mod rebuild;
mod service;
pub mod store;

pub use error::PresenceError;
pub use service::{MAX_HEARTBEAT_SESSIONS, MAX_ID_BYTES, MAX_URL_BYTES, MAX_USERS_PER_REQUEST};
pub use store::{
    build_store, Clock, MemorySessionStore, PresenceFeed, RedisSessionStore, SessionStatus,
    SessionStore,
};

use metrics::Metrics;
use notifier::{Notifications, NOTIFY_QUEUE};
use service::{InterestService, PresenceService};

/// Run the presence service: bind `presence.grpc_listen` and `presence.admin_listen`,
/// build the store from config, and serve until `shutdown` is cancelled.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = build_store(&config.presence)?;
    let grpc =
        switchboard_telemetry::bind("presence.grpc_listen", &config.presence.grpc_listen).await?;
    let admin =
        switchboard_telemetry::bind("presence.admin_listen", &config.presence.admin_listen).await?;
    let peers = Peers::remote(&config.cluster)?;
    serve(config, grpc, admin, store, peers, shutdown).await
}

/// Serve presence on already bound listeners with the given store, until `shutdown`
/// is cancelled; it reaches gateways through `peers` and registers itself there (so
/// that services of the same process call it directly). In-flight requests finish first; then the sweeper and the notifier
/// stop (a `Deliver` call in flight completes, queued presence events are dropped).
pub async fn serve(
    config: Arc<Config>,
    grpc: TcpListener,
    admin: TcpListener,
    store: Arc<dyn SessionStore>,
    peers: Peers,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let grpc_addr = grpc.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let registry = Registry::new();
    let metrics = Metrics::register(&registry)?;
    store.register_metrics(&registry)?;
    let readiness = Readiness::new();

    // Workers stop after the gRPC server has finished its in-flight requests, so those
    // can still queue their notifications; `admin_stop` also stops admin if gRPC fails.
    let workers = CancellationToken::new();
    let admin_stop = shutdown.child_token();

    let admin_task = tokio::spawn(switchboard_telemetry::serve_admin(
        admin,
        registry,
        readiness.clone(),
        admin_stop.clone(),
    ));

    let pool = peers.gateways.clone();
    let (notifications, local_rx) = Notifications::new(NOTIFY_QUEUE, metrics.clone());
    // A store shared by several instances carries changes through its feed: this
    // instance publishes its own and delivers, from everyone's, those for the gateways
    // it is responsible for. A private store's changes go straight to the notifier.
    let feed = store.feed();
    let mut feed_tasks = Vec::new();
    let notify_rx = match &feed {
        None => local_rx,
        Some(feed) => {
            let (changes_tx, changes_rx) = tokio::sync::mpsc::channel(NOTIFY_QUEUE);
            feed_tasks.push((
                "publisher",
                tokio::spawn(notifier::run_publisher(
                    local_rx,
                    feed.clone(),
                    metrics.clone(),
                    workers.clone(),
                )),
            ));
            let (feed_run, stop) = (feed.clone(), workers.clone());
            feed_tasks.push((
                "feed",
                tokio::spawn(async move { feed_run.run(changes_tx, stop).await }),
            ));
            changes_rx
        }
    };
    let notifier_task = tokio::spawn(notifier::run_notifier(
        notify_rx,
        store.clone(),
        feed,
        pool.clone(),
        metrics.clone(),
        workers.clone(),
    ));
    let sweep_every = sweep_interval(Duration::from_millis(config.presence.session_ttl_ms));
    let sweeper_task = tokio::spawn(run_sweeper(
        store.clone(),
        notifications.clone(),
        metrics.clone(),
        sweep_every,
        workers.clone(),
    ));

    let state = Arc::new(rebuild::StateWatch::new(
        store.clone(),
        Duration::from_millis(config.presence.rebuild_window_ms),
        metrics.clone(),
    ));
    let state_task = tokio::spawn(rebuild::run(state.clone(), workers.clone()));

    let (health_reporter, health_service) = switchboard_rpc::health();
    health_reporter
        .set_serving::<PresenceServer<PresenceService>>()
        .await;
    health_reporter
        .set_serving::<PresenceInterestServer<InterestService>>()
        .await;
    // Ready once the backend answers (at once for the memory store); until then
    // calls fail with `unavailable` and /readyz says not ready.
    let ready_task = tokio::spawn({
        let (store, readiness, stop) = (store.clone(), readiness.clone(), workers.clone());
        async move {
            if store.wait_ready(&stop).await && !stop.is_cancelled() {
                readiness.set(true);
                tracing::info!("presence ready");
            }
        }
    });
    let presence = Arc::new(PresenceService::new(
        store.clone(),
        notifications,
        pool,
        metrics.clone(),
        state.clone(),
    ));
    let interest = Arc::new(InterestService::new(store, metrics, state));
    peers.provide_presence(presence.clone(), interest.clone());
    let routes = tonic::service::Routes::new(
        PresenceServer::from_arc(presence).message_limits(&config.cluster),
    )
    .add_service(PresenceInterestServer::from_arc(interest).message_limits(&config.cluster));
    tracing::info!(
        grpc = %grpc_addr,
        admin = %admin_addr,
        backend = %config.presence.backend,
        session_ttl_ms = config.presence.session_ttl_ms,
        "presence serving"
    );

    let served = switchboard_rpc::serve(
        grpc,
        routes,
        health_service,
        &config.cluster,
        shutdown.clone(),
    )
    .await;
    workers.cancel();
    if let Err(e) = ready_task.await {
        tracing::error!(task = "ready", error = %e, "presence task failed");
    }
    readiness.set(false);
    admin_stop.cancel();
    let tasks = [
        ("sweeper", sweeper_task),
        ("notifier", notifier_task),
        ("state", state_task),
    ];
    for (name, task) in tasks.into_iter().chain(feed_tasks) {
        if let Err(e) = task.await {
            tracing::error!(task = name, error = %e, "presence task failed");
        }
    }
    let admin_result = admin_task
        .await
        .map_err(|e| anyhow::anyhow!("admin server task failed: {e}"))?;
    served?;
    admin_result?;
    tracing::info!("presence stopped");
    Ok(())
}

/// How often expiry runs: a quarter of the TTL (a session lives at most ttl * 1.25
/// without heartbeats), at least every second and at most every 10 ms.
fn sweep_interval(ttl: Duration) -> Duration {
    (ttl / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Expire sessions, publish the resulting changes and refresh the gauges, every
/// `every`, until `shutdown`.
async fn run_sweeper(
    store: Arc<dyn SessionStore>,
    notifications: Notifications,
    metrics: Metrics,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.expire(store.now_ms()).await {
            Ok(changed) => {
                metrics.expired_offline.inc_by(changed.len() as u64);
                for state in changed {
                    notifications.publish(state.public_view());
                }
            }
            Err(e) => tracing::warn!(error = %e, "session expiry failed"),
        }
        match store.stats().await {
            Ok(stats) => {
                metrics.sessions.set(stats.sessions as i64);
                metrics.online_users.set(stats.online_users as i64);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read session store stats"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_interval_is_a_quarter_of_the_ttl_within_bounds() {
        assert_eq!(
            sweep_interval(Duration::from_secs(30)),
            Duration::from_secs(1)
        );
        assert_eq!(
            sweep_interval(Duration::from_millis(400)),
            Duration::from_millis(100)
        );
        assert_eq!(
            sweep_interval(Duration::from_millis(1)),
            Duration::from_millis(10)
        );
    }
}
