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

/// Status of a session whose user is available.
pub const STATUS_ONLINE: &str = "online";
/// Status of a session whose user is away (idle, in the background).
pub const STATUS_AWAY: &str = "away";
/// Status of a session whose user does not want to be disturbed.
pub const STATUS_BUSY: &str = "busy";
/// Status of a session whose user is connected but appears offline to everyone else.
pub const STATUS_INVISIBLE: &str = "invisible";
/// Aggregated status of a user with no live session.
pub const STATUS_OFFLINE: &str = "offline";

/// Last-seen privacy: everyone sees `last_seen_ms` (the default).
pub const PRIVACY_EVERYONE: &str = "everyone";
/// Last-seen privacy: only users sharing a conversation see it. Presence returns it
/// as is; the gateway clears it for other viewers.
pub const PRIVACY_CONTACTS: &str = "contacts";
/// Last-seen privacy: nobody else sees it (`last_seen_ms` = 0 in the public view).
pub const PRIVACY_NOBODY: &str = "nobody";

/// Longest status text, in bytes.
pub const MAX_STATUS_TEXT_BYTES: usize = 128;

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
/// device of a user decides the user's aggregated status
/// (`online` > `away` > `busy` > `invisible`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SessionStatus {
    /// Connected, but shown as offline to everyone but the user.
    Invisible,
    /// Do not disturb.
    Busy,
    /// Idle or in the background (set by the client, or by the gateway's idle timer).
    Away,
    /// The default of a fresh session.
    Online,
}

impl SessionStatus {
    /// Parse a status a session may have: `online`, `away`, `busy` or `invisible`.
    pub fn parse(s: &str) -> Option<SessionStatus> {
        match s {
            STATUS_ONLINE => Some(SessionStatus::Online),
            STATUS_AWAY => Some(SessionStatus::Away),
            STATUS_BUSY => Some(SessionStatus::Busy),
            STATUS_INVISIBLE => Some(SessionStatus::Invisible),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Online => STATUS_ONLINE,
            SessionStatus::Away => STATUS_AWAY,
            SessionStatus::Busy => STATUS_BUSY,
            SessionStatus::Invisible => STATUS_INVISIBLE,
        }
    }
}

/// Whether an aggregated status (`online`, `away`, `busy`, `invisible`, `offline`)
/// shows the user as present to others.
pub fn is_visible(status: &str) -> bool {
    matches!(status, STATUS_ONLINE | STATUS_AWAY | STATUS_BUSY)
}

/// Whether `s` is a last-seen privacy setting.
pub fn is_privacy(s: &str) -> bool {
    matches!(s, PRIVACY_EVERYONE | PRIVACY_CONTACTS | PRIVACY_NOBODY)
}

/// A change asked by `SetStatus` (inputs already validated by the service).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatusChange {
    /// The session's new status; `None` leaves it unchanged.
    pub status: Option<SessionStatus>,
    /// Set by the gateway's idle timer: `Away` then replaces only `Online`, and
    /// `Online` only undoes an automatic `Away`; a status the user chose stays.
    pub automatic: bool,
    /// The user's status text (all devices); `None` leaves it, `""` clears it.
    pub status_text: Option<String>,
    /// The user's last-seen privacy; `None` leaves it.
    pub last_seen_privacy: Option<String>,
}

/// Everything the store knows about a user's presence: the TRUE aggregate (what the
/// user sees of themselves) plus what the public view needs. Turn it into what a
/// viewer gets with [`PresenceState::view_for`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PresenceState {
    pub user_id: String,
    /// The most available status of the live sessions, `invisible` included;
    /// `offline` without live session.
    pub status: String,
    /// Last register, heartbeat or unregister of any of the user's sessions.
    pub last_seen_ms: i64,
    /// Live sessions.
    pub sessions: u32,
    /// Per user; empty when unset.
    pub status_text: String,
    /// Per user: `everyone` (default), `contacts` or `nobody`.
    pub last_seen_privacy: String,
    /// Last-seen time as of the moment the user last stopped being visibly present
    /// (the last visible session removed, or the user turned invisible): what others
    /// see as last seen while the user is invisible or offline. 0 = never.
    pub visible_seen_ms: i64,
}

impl PresenceState {
    /// What `viewer_id` sees: the true state for the user themselves, the public view
    /// for everyone else (an empty viewer is "everyone else").
    pub fn view_for(&self, viewer_id: &str) -> UserPresence {
        if !viewer_id.is_empty() && viewer_id == self.user_id {
            self.true_view()
        } else {
            self.public_view()
        }
    }

    /// The user's own view: `invisible` shown as such, live sessions counted.
    pub fn true_view(&self) -> UserPresence {
        UserPresence {
            user_id: self.user_id.clone(),
            status: self.status.clone(),
            last_seen_ms: self.last_seen_ms,
            sessions: self.sessions,
            status_text: self.status_text.clone(),
            last_seen_privacy: self.last_seen_privacy.clone(),
        }
    }

    /// What everyone else sees: an invisible user is `offline` with no sessions and
    /// the last-seen time frozen at when they were last visibly present; with privacy
    /// `nobody` last seen is 0 (`contacts` is left to the gateway). The status text
    /// and privacy are settings the user publishes: they show, and a change of them
    /// is announced, also while the user is invisible.
    pub fn public_view(&self) -> UserPresence {
        let (status, sessions, last_seen_ms) = if is_visible(&self.status) {
            (self.status.clone(), self.sessions, self.last_seen_ms)
        } else {
            (STATUS_OFFLINE.to_owned(), 0, self.visible_seen_ms)
        };
        UserPresence {
            user_id: self.user_id.clone(),
            status,
            last_seen_ms: if self.last_seen_privacy == PRIVACY_NOBODY {
                0
            } else {
                last_seen_ms
            },
            sessions,
            status_text: self.status_text.clone(),
            last_seen_privacy: self.last_seen_privacy.clone(),
        }
    }

    /// What presence events are about: a change of any of these is announced to
    /// watchers (a last-seen tick or another device of a present user is not).
    pub fn public_key(&self) -> (&str, &str, &str) {
        let status = if is_visible(&self.status) {
            self.status.as_str()
        } else {
            STATUS_OFFLINE
        };
        (status, &self.status_text, &self.last_seen_privacy)
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
    /// The status of a new session (a live session re-registered keeps its own), so
    /// that a session opened invisible never shows its user online.
    pub status: SessionStatus,
    /// With `Away`: set automatically (the gateway's idle timer), so an automatic
    /// `online` undoes it. Ignored with any other status.
    pub automatic: bool,
}

/// A user's presence after an operation and whether the public view changed.
#[derive(Debug, Clone, PartialEq)]
pub struct PresenceUpdate {
    pub presence: PresenceState,
    /// True when what watchers see changed ([`PresenceState::public_key`]): the
    /// public status (an invisible user is `offline`), status text or privacy.
    pub changed: bool,
}

/// Result of forgetting a gateway.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DropOutcome {
    /// Sessions removed.
    pub sessions: u32,
    /// Users whose public view changed, with their new presence.
    pub changed: Vec<PresenceState>,
}

/// The watchers of one user that sit on one gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayWatchers {
    pub gateway_url: String,
    /// Sorted, without duplicates.
    pub watcher_ids: Vec<String>,
}

/// The identity of a store's state ([`SessionStore::epoch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epoch {
    /// The same for as long as the state lives; a new one once it was lost.
    pub id: String,
    /// This call found no identity and made one: the state is new or was lost (a
    /// Redis that restarted without its data, or was flushed).
    pub fresh: bool,
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
///   (`online` > `away` > `busy` > `invisible`), or `offline` with no live session.
///   A fresh session has the status it is registered with ([`NewSession::status`],
///   `online` by default); re-registering a live session keeps its status.
/// - `last_seen_ms` is the last register, heartbeat or unregister time of any of the
///   user's sessions, kept after the user goes offline within the bounds
///   [`LAST_SEEN_RETENTION`] and [`MAX_OFFLINE_LAST_SEEN`].
/// - `visible_seen_ms` is raised when the user stops being visibly present (status
///   `online`/`away`/`busy` before, `invisible`/`offline` after): to "now" by
///   set_status, unregister and drop_gateway, to the removed session's last seen by
///   expiry. It has the same retention as `last_seen_ms`.
/// - `status_text` and `last_seen_privacy` are per user, outlive the sessions and
///   are kept until changed (a user with default settings costs nothing).
/// - `changed` (and the users returned by expire and drop_gateway) means the public
///   view changed ([`PresenceState::public_key`]).
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

    /// Apply a `SetStatus` through one live session (its status, its user's status
    /// text and privacy) atomically; `NotFound` when the session is not live (then
    /// nothing changes). An automatic status applies only as [`StatusChange`] says;
    /// an explicit one clears the session's "set automatically" mark.
    async fn set_status(
        &self,
        session_id: &str,
        change: &StatusChange,
    ) -> Result<PresenceUpdate, PresenceError>;

    /// Presence state of users, one entry per distinct user in request order.
    async fn query(&self, user_ids: &[String]) -> Result<Vec<PresenceState>, PresenceError>;

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
    /// entries beyond the bounds. Returns the new presence of users whose public view
    /// changed.
    async fn expire(&self, now_ms: i64) -> Result<Vec<PresenceState>, PresenceError>;

    /// Sizes for the gauges.
    async fn stats(&self) -> Result<StoreStats, PresenceError>;

    /// The identity of the state: stays while the state lives, changes when it is
    /// lost. Exactly one caller sees `fresh` per new identity (the one that made it).
    async fn epoch(&self) -> Result<Epoch, PresenceError>;

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
        assert_eq!(SessionStatus::parse("busy"), Some(SessionStatus::Busy));
        assert_eq!(
            SessionStatus::parse("invisible"),
            Some(SessionStatus::Invisible)
        );
        assert_eq!(SessionStatus::parse("offline"), None);
        assert_eq!(SessionStatus::parse(""), None);
        assert!(SessionStatus::Online > SessionStatus::Away);
        assert!(SessionStatus::Away > SessionStatus::Busy);
        assert!(SessionStatus::Busy > SessionStatus::Invisible);
        for s in [
            SessionStatus::Online,
            SessionStatus::Away,
            SessionStatus::Busy,
            SessionStatus::Invisible,
        ] {
            assert_eq!(SessionStatus::parse(s.as_str()), Some(s));
        }
    }

    fn state(status: &str, privacy: &str) -> PresenceState {
        PresenceState {
            user_id: "alice".into(),
            status: status.into(),
            last_seen_ms: 2_000,
            sessions: 2,
            status_text: "lunch".into(),
            last_seen_privacy: privacy.into(),
            visible_seen_ms: 1_000,
        }
    }

    #[test]
    fn the_user_sees_the_truth_and_everyone_else_the_public_view() {
        let s = state(STATUS_INVISIBLE, PRIVACY_EVERYONE);
        let own = s.view_for("alice");
        assert_eq!(
            (own.status.as_str(), own.sessions, own.last_seen_ms),
            (STATUS_INVISIBLE, 2, 2_000)
        );
        for viewer in ["bob", ""] {
            let other = s.view_for(viewer);
            assert_eq!(
                (other.status.as_str(), other.sessions, other.last_seen_ms),
                (STATUS_OFFLINE, 0, 1_000),
                "invisible looks offline, last seen frozen"
            );
            assert_eq!(other.status_text, "lunch");
        }
        let busy = state(STATUS_BUSY, PRIVACY_EVERYONE).public_view();
        assert_eq!(
            (busy.status.as_str(), busy.sessions, busy.last_seen_ms),
            (STATUS_BUSY, 2, 2_000)
        );
        let hidden = state(STATUS_ONLINE, PRIVACY_NOBODY);
        assert_eq!(hidden.public_view().last_seen_ms, 0);
        assert_eq!(hidden.true_view().last_seen_ms, 2_000);
        let contacts = state(STATUS_AWAY, PRIVACY_CONTACTS).public_view();
        assert_eq!(contacts.last_seen_ms, 2_000, "the gateway filters contacts");
        assert_eq!(contacts.last_seen_privacy, PRIVACY_CONTACTS);
    }

    #[test]
    fn public_key_hides_invisible_and_ignores_last_seen_and_devices() {
        let invisible = state(STATUS_INVISIBLE, PRIVACY_EVERYONE);
        let offline = PresenceState {
            status: STATUS_OFFLINE.into(),
            sessions: 0,
            last_seen_ms: 9_000,
            ..invisible.clone()
        };
        assert_eq!(invisible.public_key(), offline.public_key());
        let online = state(STATUS_ONLINE, PRIVACY_EVERYONE);
        let more = PresenceState {
            sessions: 3,
            last_seen_ms: 5_000,
            ..online.clone()
        };
        assert_eq!(online.public_key(), more.public_key());
        assert_ne!(online.public_key(), invisible.public_key());
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
