//! The session store: the one place presence state lives, behind [`SessionStore`].
//!
//! Every backend implements the same trait and passes the same conformance suite
//! (`conformance.rs`). The backend is picked once at startup by [`build_store`]:
//! `memory` ([`MemorySessionStore`], one instance) or `redis` ([`RedisSessionStore`],
//! several instances sharing one Redis; key layout and consistency in [`redis`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use switchboard_config::PresenceConfig;
use switchboard_proto::v1::{GatewayRoute, UserPresence};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::PresenceError;

pub mod interest;
mod memory;
pub mod redis;

#[cfg(test)]
mod conformance;

pub use interest::{ConversationRoutes, INTEREST_TTL};
pub use memory::MemorySessionStore;
pub use redis::RedisSessionStore;

/// Aggregated status of a user with at least one live session whose devices are all away.
pub const STATUS_AWAY: &str = "away";
/// Aggregated status of a user with at least one live session marked online.
pub const STATUS_ONLINE: &str = "online";
/// Aggregated status of a user with no live session.
pub const STATUS_OFFLINE: &str = "offline";

/// Most users one watcher may watch through one gateway. Each watch costs an entry in
/// two indexes for as long as the watcher's session lives; the cap keeps a single
/// client from growing them without bound (a contact list of 1000 is plenty for
/// presence; larger audiences belong to conversations, not watches).
pub const MAX_WATCHED_PER_WATCHER: usize = 1000;

/// How long the last-seen time of an offline user is kept. Older entries are forgotten
/// (the user then reads as `last_seen_ms = 0`, "never seen").
pub const LAST_SEEN_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Most offline users whose last-seen time is kept; beyond it the oldest are forgotten
/// first. With ~150 bytes per entry this bounds the map near 150 MB.
pub const MAX_OFFLINE_LAST_SEEN: usize = 1_000_000;

/// The status one session can have. The ordering is availability: the most available
/// device of a user decides the user's aggregated status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SessionStatus {
    /// The client said it is away (idle, in the background).
    Away,
    /// The default of a fresh session.
    Online,
}

impl SessionStatus {
    /// Parse a status a client may set: `online` or `away`.
    pub fn parse(s: &str) -> Option<SessionStatus> {
        match s {
            STATUS_ONLINE => Some(SessionStatus::Online),
            STATUS_AWAY => Some(SessionStatus::Away),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Online => STATUS_ONLINE,
            SessionStatus::Away => STATUS_AWAY,
        }
    }
}

/// A session to register (inputs already validated by the service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    pub session_id: String,
    pub user_id: String,
    /// May be empty when the client named no device.
    pub device_id: String,
    /// The gateway's advertised gRPC URL (where `Deliver` reaches it).
    pub gateway_url: String,
}

/// A user's presence after an operation and whether the aggregated status changed.
#[derive(Debug, Clone, PartialEq)]
pub struct PresenceUpdate {
    pub presence: UserPresence,
    /// True when the aggregated status (`online`/`away`/`offline`) differs from before.
    pub changed: bool,
}

/// Result of forgetting a gateway.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DropOutcome {
    /// Sessions removed.
    pub sessions: u32,
    /// Users whose aggregated status changed, with their new presence.
    pub changed: Vec<UserPresence>,
}

/// The watchers of one user that sit on one gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayWatchers {
    pub gateway_url: String,
    /// Sorted, without duplicates.
    pub watcher_ids: Vec<String>,
}

/// Sizes for the gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Live sessions.
    pub sessions: u64,
    /// Users with at least one live session.
    pub online_users: u64,
}

/// The clock sessions are stamped with: milliseconds since the Unix epoch, advanced by
/// tokio's clock so tests can pause and advance time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Wall-clock time at `anchor`.
    anchor_ms: i64,
    /// The tokio instant the wall clock was read at.
    anchor: tokio::time::Instant,
}

impl Clock {
    pub fn new() -> Clock {
        let anchor_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Clock {
            anchor_ms,
            anchor: tokio::time::Instant::now(),
        }
    }

    /// Now, in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        self.anchor_ms + self.anchor.elapsed().as_millis() as i64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Live sessions, their status and TTL, last-seen times, the route table and presence
/// watches.
///
/// Contracts every backend keeps (checked by the conformance suite):
/// - A session expires `ttl` after its last register or heartbeat; expiry happens in
///   [`SessionStore::expire`], which the service calls periodically.
/// - A user's status is the most available status of their live sessions
///   (`online` > `away`), or `offline` with no live session.
/// - `last_seen_ms` is the last register, heartbeat or unregister time of any of the
///   user's sessions, kept after the user goes offline within the bounds
///   [`LAST_SEEN_RETENTION`] and [`MAX_OFFLINE_LAST_SEEN`].
/// - A watch lives only while the watcher has a session on the watch's gateway: when
///   the watcher's last session there goes away, its watches there go too.
/// - [`SessionStore::route_conversation`] answers what `route` would (users sorted per
///   gateway), from a cached entry only when that entry was computed from the same
///   member set, within [`INTEREST_TTL`], and no member's set of gateways changed
///   since (see [`interest`]).
#[async_trait::async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// The store's current time (ms since epoch), as used for deadlines and last-seen.
    fn now_ms(&self) -> i64;

    /// Add a live session, or refresh it when `session_id` is already live (its status
    /// is kept; it moves if the gateway differs). A session id live for another user
    /// is an invalid request.
    async fn register(&self, session: NewSession) -> Result<PresenceUpdate, PresenceError>;

    /// Remove a session (clean close). `None` when it was not live (already expired).
    async fn unregister(&self, session_id: &str) -> Result<Option<PresenceUpdate>, PresenceError>;

    /// Keep the listed sessions of `gateway_url` alive. Returns the ids that are not
    /// live sessions of that gateway (expired or never registered): the gateway
    /// registers those again.
    async fn heartbeat(
        &self,
        gateway_url: &str,
        session_ids: &[String],
    ) -> Result<Vec<String>, PresenceError>;

    /// Set the status of one live session; `NotFound` when it is not live.
    async fn set_status(
        &self,
        session_id: &str,
        status: SessionStatus,
    ) -> Result<PresenceUpdate, PresenceError>;

    /// Aggregated presence of users, one entry per distinct user in request order.
    async fn query(&self, user_ids: &[String]) -> Result<Vec<UserPresence>, PresenceError>;

    /// Gateways where the users have live sessions, sorted by gateway URL; per gateway
    /// the users there in request order. Users with no live session appear nowhere.
    async fn route(&self, user_ids: &[String]) -> Result<Vec<GatewayRoute>, PresenceError>;

    /// The routes of a conversation's members (`member_ids` is its complete member
    /// list, in any order): gateways sorted by URL, per gateway the online members
    /// there sorted by id. Answered from the interest index when its entry for the
    /// conversation is valid for this member set; otherwise computed and cached.
    async fn route_conversation(
        &self,
        conversation_id: &str,
        member_ids: &[String],
    ) -> Result<ConversationRoutes, PresenceError>;

    /// Add watches of `watcher_id` (on `gateway_url`) on `user_ids`. The watcher must
    /// have a live session on that gateway (`NotFound` otherwise), and may watch at
    /// most [`MAX_WATCHED_PER_WATCHER`] users there (`InvalidRequest` above it; then
    /// nothing is added).
    async fn watch(
        &self,
        gateway_url: &str,
        watcher_id: &str,
        user_ids: &[String],
    ) -> Result<(), PresenceError>;

    /// Who watches `user_id`, grouped by gateway, sorted by gateway URL.
    async fn watchers_of(&self, user_id: &str) -> Result<Vec<GatewayWatchers>, PresenceError>;

    /// Remove every session of a gateway (and with them the watches held there).
    async fn drop_gateway(&self, gateway_url: &str) -> Result<DropOutcome, PresenceError>;

    /// Remove sessions whose deadline is at or before `now_ms` and forget last-seen
    /// entries beyond the bounds. Returns the new presence of users whose aggregated
    /// status changed.
    async fn expire(&self, now_ms: i64) -> Result<Vec<UserPresence>, PresenceError>;

    /// Sizes for the gauges.
    async fn stats(&self) -> Result<StoreStats, PresenceError>;

    /// Wait until the backend answers, retrying with backoff and logging failures.
    /// Returns false when `shutdown` fires first. An in-process store is ready at once.
    async fn wait_ready(&self, _shutdown: &CancellationToken) -> bool {
        true
    }

    /// The change feed of a store shared by several presence instances; `None` for a
    /// store private to this instance, whose changes this instance delivers itself.
    fn feed(&self) -> Option<Arc<dyn PresenceFeed>> {
        None
    }

    /// Register the backend's own metrics (if any) in the service's registry.
    fn register_metrics(&self, _registry: &prometheus::Registry) -> anyhow::Result<()> {
        Ok(())
    }
}

/// How presence changes travel between the instances sharing one store.
///
/// Every instance publishes the changes it makes; every instance receives all of them
/// and sends each to the gateways it is responsible for ([`PresenceFeed::delivers_to`]):
/// exactly one live instance per gateway, so the events about a user reach a gateway
/// through one ordered outbox whichever instance made the change.
#[async_trait::async_trait]
pub trait PresenceFeed: Send + Sync + 'static {
    /// Publish changes to every instance (this one included).
    async fn publish(&self, changes: &[UserPresence]) -> Result<(), PresenceError>;

    /// Receive the changes published by every instance into `changes_tx` until
    /// `shutdown`, reconnecting on its own; also keeps this instance in the set of live
    /// instances that [`PresenceFeed::delivers_to`] chooses from.
    async fn run(&self, changes_tx: mpsc::Sender<UserPresence>, shutdown: CancellationToken);

    /// Whether this instance sends presence events to `gateway_url`.
    fn delivers_to(&self, gateway_url: &str) -> bool;
}

/// Build the session store selected by `presence.backend`.
pub fn build_store(config: &PresenceConfig) -> anyhow::Result<Arc<dyn SessionStore>> {
    let ttl = Duration::from_millis(config.session_ttl_ms);
    match config.backend.as_str() {
        "memory" => Ok(Arc::new(MemorySessionStore::new(ttl))),
        "redis" => Ok(Arc::new(RedisSessionStore::new(
            redis::RedisOptions::from_config(config),
            Clock::new(),
        )?)),
        other => anyhow::bail!("unknown presence.backend `{other}` (expected `memory` or `redis`)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_parse_and_order_by_availability() {
        assert_eq!(SessionStatus::parse("online"), Some(SessionStatus::Online));
        assert_eq!(SessionStatus::parse("away"), Some(SessionStatus::Away));
        assert_eq!(SessionStatus::parse("offline"), None);
        assert_eq!(SessionStatus::parse(""), None);
        assert!(SessionStatus::Online > SessionStatus::Away);
    }

    #[test]
    fn factory_picks_memory_or_redis_and_rejects_unknown_backends() {
        let mut config = PresenceConfig::default();
        assert!(build_store(&config).is_ok());
        // The redis store connects on first use, so it builds without a server.
        config.backend = "redis".into();
        config.redis_url = "redis://127.0.0.1:1".into();
        assert!(build_store(&config).is_ok());
        config.backend = "nope".into();
        let err = build_store(&config)
            .err()
            .expect("unknown backend must fail");
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn clock_follows_tokio_time() {
        let clock = Clock::new();
        let t0 = clock.now_ms();
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(clock.now_ms() - t0, 1500);
    }
}
