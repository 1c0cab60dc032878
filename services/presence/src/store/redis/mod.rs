//! Redis session store: the state of every presence instance sharing one Redis.
//!
//! # Key layout
//!
//! `<p>` is `presence.redis_key_prefix`. Keys in braces share a Redis Cluster hash tag:
//! every script and multi-key command touches keys of ONE tag only (one shard or one
//! user), so the layout works unchanged on Redis Cluster.
//!
//! | key | type | content |
//! | --- | --- | --- |
//! | `<p>:{x<n>}:sess` | hash | session id -> session record (JSON: user, gateway, device, deadline, last seen, generation) |
//! | `<p>:{x<n>}:dl` | sorted set | session id, score = deadline ms (the expiry index) |
//! | `<p>:{x<n>}:gw` | sorted set | `<gateway>\0<session id>`, score 0 (sessions by gateway, read by lex range) |
//! | `<p>:{u:<user>}` | hash | `s:<session id>` -> `{status, generation, gateway, automatic-away mark}` for each live session (status aggregation, route table); `seen` -> last seen of the user's removed sessions; `vseen` -> visible last seen (when the user last stopped being visibly present: the public last seen while invisible or offline). Without sessions it expires after [`LAST_SEEN_RETENTION`](super::LAST_SEEN_RETENTION) |
//! | `<p>:{u:<user>}:settings` | hash | the user's presence settings: `text` -> status text, `privacy` -> `contacts` or `nobody` (absent = default `""` / `everyone`; the key is deleted when both are defaults). No TTL: a privacy choice outlives sessions and last-seen retention |
//! | `<p>:{u:<user>}:watching` | sorted set | `<gateway>\0<watched user>`: what the user watches, per gateway (cap, cleanup) |
//! | `<p>:{u:<user>}:watchers` | hash | `<gateway>\0<watcher>` -> `1`: who watches the user (presence watches) |
//! | `<p>:{u:<user>}:convs` | sorted set | conversation id, score = expiry ms of a cached routes entry listing the user as a member (reverse interest index). Key TTL 2 x [`INTEREST_TTL`](super::INTEREST_TTL), refreshed when such an entry is computed |
//! | `<p>:{c:<conv>}:routes` | hash | the conversation's cached routes: `fp` -> member fingerprint (32 hex), `exp` -> expiry ms (store clock), `g:<gateway>` -> JSON array of the online members there, sorted. Key TTL 2 x `INTEREST_TTL` |
//! | `<p>:{c:<conv>}:gen` | string | counter of invalidations of the conversation's entry. Key TTL 2 x `INTEREST_TTL` after the last one |
//! | `<p>:online_users` | string | counter of users with a live session (the gauge) |
//! | `<p>:instances` | sorted set | presence instance id, score = deadline ms (live instances) |
//! | `<p>:presence` | pub/sub channel | protobuf `UserPresence` of every change |
//!
//! A session lives in shard `n = fnv1a64(session id) % SHARDS` ([`SHARDS`] = 32): the
//! gateway's heartbeat names only session ids, so sessions are grouped by id and a
//! heartbeat batch is one pipelined round trip of one script call per shard (and per
//! [`HEARTBEAT_CHUNK`] sessions).
//!
//! # Consistency
//!
//! Each script is atomic on its tag. An operation that spans a shard and a user runs
//! in steps, shard first: register (shard record, then user entry), unregister (shard,
//! then user), expiry (claim in the shard, remove the user entry, then delete the
//! claimed record). A registration generation (`gen`, random per register) on both the
//! record and the user entry keeps a late step of one operation from undoing a newer
//! registration of the same session id.
//!
//! Expiry: every instance sweeps every shard each sweep interval with an atomic script
//! that claims due sessions (marks them, moves their deadline to a lease end of
//! [`EXPIRY_LEASE_MS`]) and returns them, so exactly one instance expires each session;
//! a sweeper that dies after claiming is replaced when the lease ends. Time is the
//! store's [`Clock`], never Redis `TIME`, so tokio's paused clock drives TTLs in tests;
//! instances must have synchronized clocks (deadlines are compared across them).
//!
//! Watches are recorded on the watcher's side first (cap check and session check are
//! atomic there), then in each watched user's `watchers` hash; cleanup runs in the same
//! order. A watch racing the removal of the watcher's last session on that gateway can
//! leave a stale `watchers` entry: the gateway then reports that watcher absent.
//! `online_users` is adjusted after the user step; a crash in between skews the gauge.
//!
//! # Interest index
//!
//! `route_conversation` reads `routes` and `gen` (one tag, one round trip) and answers
//! from `routes` when `fp` matches the request's member list and `exp` is ahead of the
//! store clock. Otherwise it computes (R1..R3) and answers:
//! - R1: the `gen` read with the entry;
//! - R2: one pipeline that, per member, `ZADD`s the conversation to the member's
//!   `convs` (score = the new entry's expiry), refreshes its TTL, then `HGETALL`s the
//!   member's user hash (same tag, so these run in this order even on Cluster);
//! - R3: a script on the conversation's tag writes the entry only if `gen` still has
//!   the value read in R1.
//!
//! A user's gateway set changes inside the user scripts (`USER_ADD`, `USER_REMOVE`),
//! which in the same atomic step read (and trim) the user's `convs` (U1). The caller
//! then runs, per conversation listed, a script that increments `gen` and deletes
//! `routes` (U2). Why a racing computation cannot cache a stale entry: if R2 read a
//! member's hash before U1 changed it, then R2's `ZADD` preceded U1 (same key order),
//! so U1 lists the conversation and U2 runs after R2, hence after R1: either U2 bumps
//! `gen` before R3 (which then refuses to cache) or U2 deletes what R3 wrote. The
//! remaining windows are bounded by the entry's expiry ([`INTEREST_TTL`](super::INTEREST_TTL),
//! 60 s, judged on the store clock; hits do not extend it): an instance dying between
//! U1 and U2 (or U2 failing), and a computation stalled between R1 and R3 for longer
//! than the `gen` key's TTL. Invalidation may also be broader than needed (`convs`
//! keeps conversations a user has left until their entries expire): that costs a
//! recomputation, never a wrong answer. Status changes and heartbeats touch no route.
//!
//! Cost: a hit is one round trip; a miss is three, with 3 commands per member.
//!
//! # Notifications across instances
//!
//! Every change is published on `<p>:presence` by the instance that made it. Every
//! instance subscribes and sends each change to the watchers on the gateways it is
//! responsible for: the live instances (`<p>:instances`, refreshed every
//! [`INSTANCE_REFRESH`]) are ranked per gateway by rendezvous hashing and the first
//! one delivers. So each gateway gets the events of every user from one instance, in
//! one ordered outbox that reads the presence current at send time, whichever instance
//! made the change (no stale final status, no duplicates while membership is stable).
//!
//! # Faults
//!
//! The connection is made on first use (or by [`SessionStore::wait_ready`], which
//! retries with backoff and logs each failure). Connect and response timeouts make
//! every call fail fast with `Unavailable` while Redis is away; the connection manager
//! reconnects on the next call. Scripts are loaded on connect and again after a
//! `NOSCRIPT` answer (a restarted Redis).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};
use prost::Message;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, FromRedisValue, Pipeline, RedisError, Script};
use serde::Deserialize;
use switchboard_config::PresenceConfig;
use switchboard_proto::v1::{GatewayRoute, UserPresence};
use tokio::sync::{mpsc, OnceCell};
use tokio_util::sync::CancellationToken;

use super::interest::{distinct, fmix64, fnv1a, ConversationRoutes};
use super::{
    is_visible, Clock, DropOutcome, Epoch, GatewayWatchers, NewSession, PresenceFeed,
    PresenceState, PresenceUpdate, SessionStatus, SessionStore, StatusChange, StoreStats,
    LAST_SEEN_RETENTION, MAX_WATCHED_PER_WATCHER, PRIVACY_EVERYONE, STATUS_OFFLINE,
};
use crate::error::PresenceError;

mod connect;
mod interest;
mod scripts;
#[cfg(test)]
mod tests;

pub use connect::RedisConnection;
use scripts::Scripts;

/// Shards of the session records and the expiry index. Fixed: every instance sharing
/// a Redis must use the same value (changing it orphans existing sessions).
pub const SHARDS: u64 = 32;
/// Most session ids in one heartbeat script call.
pub const HEARTBEAT_CHUNK: usize = 1000;
/// Most sessions claimed (or dropped) per shard and round in expiry and gateway drops.
const SWEEP_BATCH: usize = 500;
/// How long a claimed expiry may take before another sweeper retries it.
pub const EXPIRY_LEASE_MS: i64 = 10_000;
/// How often an instance refreshes its entry in `<p>:instances` and reads the others.
pub const INSTANCE_REFRESH: Duration = Duration::from_secs(1);
/// An instance not refreshed for this long is no longer live.
const INSTANCE_TTL_MS: i64 = 5_000;
/// Bound of one connection attempt.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound of one command or pipeline answer.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Backoff between connection attempts while Redis is unreachable.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How to reach Redis and name keys.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://` URL, or `rediss://` for TLS.
    pub url: String,
    /// Credentials and TLS files beyond the URL.
    pub connection: RedisConnection,
    /// Prefix of every key and channel.
    pub key_prefix: String,
    /// Session TTL without heartbeat.
    pub session_ttl: Duration,
    /// Bound of one connection attempt; `None` waits as long as the OS does (tests on
    /// paused tokio time, where a timer would fire at once while Redis answers).
    pub connect_timeout: Option<Duration>,
    /// Bound of one answer; `None` as above.
    pub response_timeout: Option<Duration>,
}

impl RedisOptions {
    /// Options from the presence section, with the default timeouts.
    pub fn from_config(config: &PresenceConfig) -> RedisOptions {
        RedisOptions {
            url: config.redis_url.expose().to_owned(),
            connection: RedisConnection::from_config(config),
            key_prefix: config.redis_key_prefix.clone(),
            session_ttl: Duration::from_millis(config.session_ttl_ms),
            connect_timeout: Some(CONNECT_TIMEOUT),
            response_timeout: Some(RESPONSE_TIMEOUT),
        }
    }
}

/// Key names (see the module documentation).
struct Keys {
    prefix: String,
}

impl Keys {
    fn sessions(&self, shard: u64) -> String {
        format!("{}:{{x{shard}}}:sess", self.prefix)
    }
    fn deadlines(&self, shard: u64) -> String {
        format!("{}:{{x{shard}}}:dl", self.prefix)
    }
    fn by_gateway(&self, shard: u64) -> String {
        format!("{}:{{x{shard}}}:gw", self.prefix)
    }
    fn user(&self, user: &str) -> String {
        format!("{}:{{u:{user}}}", self.prefix)
    }
    fn watching(&self, user: &str) -> String {
        format!("{}:{{u:{user}}}:watching", self.prefix)
    }
    fn watchers(&self, user: &str) -> String {
        format!("{}:{{u:{user}}}:watchers", self.prefix)
    }
    fn settings(&self, user: &str) -> String {
        format!("{}:{{u:{user}}}:settings", self.prefix)
    }
    fn interest(&self, user: &str) -> String {
        format!("{}:{{u:{user}}}:convs", self.prefix)
    }
    fn routes(&self, conversation: &str) -> String {
        format!("{}:{{c:{conversation}}}:routes", self.prefix)
    }
    fn routes_gen(&self, conversation: &str) -> String {
        format!("{}:{{c:{conversation}}}:gen", self.prefix)
    }
    fn online_users(&self) -> String {
        format!("{}:online_users", self.prefix)
    }
    fn instances(&self) -> String {
        format!("{}:instances", self.prefix)
    }
    fn channel(&self) -> String {
        format!("{}:presence", self.prefix)
    }
    /// The identity of the state in this Redis: gone with the data (no TTL), so a
    /// Redis that comes back empty gets a new one.
    fn epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }
}

fn shard_of(session_id: &str) -> u64 {
    fnv1a(&[session_id.as_bytes()]) % SHARDS
}

fn member(gateway_url: &str, id: &str) -> String {
    format!("{gateway_url}\0{id}")
}

/// Redis command metrics of the store.
#[derive(Clone)]
struct RedisMetrics {
    /// Latency of each store operation's Redis calls, by operation.
    seconds: HistogramVec,
    /// Failed Redis calls, by operation.
    errors: IntCounterVec,
    /// Changes received from the feed but dropped because the notifier queue was full.
    feed_dropped: IntCounter,
    /// Cached conversation routes dropped because a member's gateways changed.
    interest_invalidations: IntCounter,
}

impl RedisMetrics {
    fn new() -> anyhow::Result<RedisMetrics> {
        Ok(RedisMetrics {
            seconds: HistogramVec::new(
                HistogramOpts::new(
                    "switchboard_presence_redis_seconds",
                    "latency of the session store's Redis calls, by operation",
                )
                .buckets(switchboard_telemetry::latency_buckets()),
                &["op"],
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "switchboard_presence_redis_errors_total",
                    "failed Redis calls of the session store, by operation",
                ),
                &["op"],
            )?,
            feed_dropped: IntCounter::new(
                "switchboard_presence_feed_dropped_total",
                "presence changes received from Redis pub/sub and dropped (notifier queue full)",
            )?,
            interest_invalidations: super::interest::invalidations_counter(),
        })
    }
}

/// The user-side result of a session change (see `scripts::USER_LIB`).
struct UserChange {
    user_id: String,
    before: String,
    after: String,
    sessions: u32,
    /// Stored last seen (of removed sessions and registrations).
    seen: i64,
    /// Live session ids after the change.
    session_ids: Vec<String>,
    /// Gateway through which the user lost its watches ("" when none).
    unlinked_gateway: String,
    /// Users the user stopped watching there.
    unlinked: Vec<String>,
    /// Conversations with a possibly cached interest entry listing the user, when the
    /// user's set of gateways changed (empty otherwise): their entries are dropped.
    interested: Vec<String>,
    /// The visible last seen after the change.
    visible_seen: i64,
}

type UserReply = (
    String,
    String,
    u32,
    i64,
    Vec<String>,
    String,
    Vec<String>,
    Vec<String>,
    i64,
);

/// The settings part of a `USER_STATUS` reply: text, privacy, whether they changed.
type SettingsReply = (String, String, i64);

impl UserChange {
    fn from_reply(user_id: &str, r: UserReply) -> UserChange {
        UserChange {
            user_id: user_id.to_owned(),
            before: r.0,
            after: r.1,
            sessions: r.2,
            seen: r.3,
            session_ids: r.4,
            unlinked_gateway: r.5,
            unlinked: r.6,
            interested: r.7,
            visible_seen: r.8,
        }
    }

    /// Whether the public status changed (an invisible user is offline to others).
    fn public_status_changed(&self) -> bool {
        public_status(&self.before) != public_status(&self.after)
    }
}

/// The status others see for an aggregated status.
fn public_status(status: &str) -> &str {
    if is_visible(status) {
        status
    } else {
        STATUS_OFFLINE
    }
}

/// What the Rust side reads of a session record.
#[derive(Deserialize)]
struct SessionRecord {
    u: String,
    sn: f64,
}

/// A live session entry in a user hash.
#[derive(Deserialize)]
struct UserEntry {
    st: String,
    g: String,
}

/// The [`SessionStore`] on Redis. Cloning shares the connection.
#[derive(Clone)]
pub struct RedisSessionStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Opens connections (the command connection and the pub/sub one).
    client: redis::Client,
    opts: RedisOptions,
    keys: Keys,
    /// Source of "now" for deadlines, last seen and instance liveness.
    clock: Clock,
    ttl_ms: i64,
    /// Multiplexed command connection, made on first use; it reconnects by itself.
    conn: OnceCell<ConnectionManager>,
    scripts: Scripts,
    metrics: RedisMetrics,
    /// This instance's id in `<p>:instances`.
    instance_id: String,
    /// Live instances, sorted, as last read (empty until the first read).
    live_instances: RwLock<Vec<String>>,
}

fn redis_error(e: &RedisError) -> PresenceError {
    let unavailable = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
        || matches!(
            e.kind(),
            ErrorKind::BusyLoadingError | ErrorKind::TryAgain | ErrorKind::ReadOnly
        );
    if unavailable {
        PresenceError::Unavailable(format!("redis: {e}"))
    } else {
        PresenceError::Internal(format!("redis: {e}"))
    }
}

impl RedisSessionStore {
    /// A store on `opts.url`; no connection is made until first use or
    /// [`SessionStore::wait_ready`]. Fails only on an invalid URL or unreadable
    /// credential or TLS files.
    pub fn new(opts: RedisOptions, clock: Clock) -> anyhow::Result<RedisSessionStore> {
        let client = opts.connection.client(&opts.url)?;
        Ok(RedisSessionStore {
            inner: Arc::new(Inner {
                client,
                keys: Keys {
                    prefix: opts.key_prefix.clone(),
                },
                clock,
                ttl_ms: i64::try_from(opts.session_ttl.as_millis()).unwrap_or(i64::MAX / 4),
                opts,
                conn: OnceCell::new(),
                scripts: Scripts::new(),
                metrics: RedisMetrics::new()?,
                instance_id: format!("{:016x}", rand::random::<u64>()),
                live_instances: RwLock::new(Vec::new()),
            }),
        })
    }

    /// Read the live instances now (the feed does it every [`INSTANCE_REFRESH`]).
    pub async fn refresh_instances(&self) -> Result<Vec<String>, PresenceError> {
        self.inner.refresh_instances().await
    }

    /// This instance's id in the set of live instances.
    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }
}

impl Inner {
    async fn connect(&self) -> Result<ConnectionManager, PresenceError> {
        let mut config = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_max_delay(500);
        if let Some(t) = self.opts.connect_timeout {
            config = config.set_connection_timeout(t);
        }
        if let Some(t) = self.opts.response_timeout {
            config = config.set_response_timeout(t);
        }
        let mut conn = ConnectionManager::new_with_config(self.client.clone(), config)
            .await
            .map_err(|e| redis_error(&e))?;
        self.load_scripts(&mut conn).await?;
        Ok(conn)
    }

    async fn load_scripts(&self, conn: &mut ConnectionManager) -> Result<(), PresenceError> {
        for script in self.scripts.all() {
            script.load_async(conn).await.map_err(|e| redis_error(&e))?;
        }
        Ok(())
    }

    async fn conn(&self) -> Result<ConnectionManager, PresenceError> {
        self.conn.get_or_try_init(|| self.connect()).await.cloned()
    }

    fn observe<T>(&self, op: &str, start: Instant, result: &Result<T, RedisError>) {
        self.metrics
            .seconds
            .with_label_values(&[op])
            .observe(start.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics.errors.with_label_values(&[op]).inc();
        }
    }

    /// Run a pipeline (possibly of `EVALSHA`s), loading the scripts again after a
    /// `NOSCRIPT` answer.
    async fn pipe<T: FromRedisValue>(&self, op: &str, pipe: &Pipeline) -> Result<T, PresenceError> {
        let mut conn = match self.conn().await {
            Ok(c) => c,
            Err(e) => {
                self.metrics.errors.with_label_values(&[op]).inc();
                return Err(e);
            }
        };
        let start = Instant::now();
        let mut result = pipe.query_async(&mut conn).await;
        if matches!(&result, Err(e) if e.kind() == ErrorKind::NoScriptError) {
            self.load_scripts(&mut conn).await?;
            result = pipe.query_async(&mut conn).await;
        }
        self.observe(op, start, &result);
        result.map_err(|e| redis_error(&e))
    }

    /// Invoke one script (the client loads it on `NOSCRIPT`).
    async fn script<T: FromRedisValue>(
        &self,
        op: &str,
        script: &Script,
        keys: &[String],
        args: &[String],
    ) -> Result<T, PresenceError> {
        let mut conn = self.conn().await?;
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(k);
        }
        for a in args {
            invocation.arg(a);
        }
        let start = Instant::now();
        let result = invocation.invoke_async(&mut conn).await;
        self.observe(op, start, &result);
        result.map_err(|e| redis_error(&e))
    }

    fn shard_keys(&self, shard: u64) -> [String; 3] {
        [
            self.keys.sessions(shard),
            self.keys.deadlines(shard),
            self.keys.by_gateway(shard),
        ]
    }

    fn user_keys(&self, user: &str) -> [String; 3] {
        [
            self.keys.user(user),
            self.keys.watching(user),
            self.keys.interest(user),
        ]
    }

    /// Remove the user entries of removed sessions: `(sid, user, gen, seen at)`.
    async fn remove_user_entries(
        &self,
        op: &str,
        removed: &[(String, String, String, i64)],
    ) -> Result<Vec<UserChange>, PresenceError> {
        let retention = LAST_SEEN_RETENTION.as_millis().to_string();
        let mut changes = Vec::new();
        for chunk in removed.chunks(SWEEP_BATCH) {
            let mut pipe = redis::pipe();
            for (sid, user, gen, seen_at) in chunk {
                let mut inv = self.scripts.user_remove.prepare_invoke();
                let [k1, k2, k3] = self.user_keys(user);
                inv.key(k1)
                    .key(k2)
                    .key(k3)
                    .arg(sid)
                    .arg(gen)
                    .arg(*seen_at)
                    .arg(&retention);
                pipe.invoke_script(&inv);
            }
            let replies: Vec<Option<UserReply>> = self.pipe(op, &pipe).await?;
            for ((_, user, _, _), reply) in chunk.iter().zip(replies) {
                if let Some(r) = reply {
                    changes.push(UserChange::from_reply(user, r));
                }
            }
        }
        self.settle(op, &changes).await?;
        Ok(changes)
    }

    /// The cross-tag follow-ups of user changes: unlink dropped watches from the
    /// watched users' `watchers` hashes, adjust the online-users counter, and drop the
    /// interest entries of the conversations of users whose gateways changed.
    async fn settle(&self, op: &str, changes: &[UserChange]) -> Result<(), PresenceError> {
        self.settle_watches(op, changes).await?;
        let conversations: BTreeSet<&str> = changes
            .iter()
            .flat_map(|c| c.interested.iter().map(String::as_str))
            .collect();
        self.invalidate_interest(op, &conversations).await
    }

    async fn settle_watches(&self, op: &str, changes: &[UserChange]) -> Result<(), PresenceError> {
        let mut pipe = redis::pipe();
        let mut commands = 0;
        let mut online_delta: i64 = 0;
        for c in changes {
            for watched in &c.unlinked {
                pipe.hdel(
                    self.keys.watchers(watched),
                    member(&c.unlinked_gateway, &c.user_id),
                )
                .ignore();
                commands += 1;
            }
            match (c.before == STATUS_OFFLINE, c.after == STATUS_OFFLINE) {
                (true, false) => online_delta += 1,
                (false, true) => online_delta -= 1,
                _ => {}
            }
        }
        if online_delta != 0 {
            pipe.incr(self.keys.online_users(), online_delta).ignore();
            commands += 1;
        }
        if commands == 0 {
            return Ok(());
        }
        self.pipe::<()>(op, &pipe).await
    }

    /// Last-seen times of live sessions, by session id (missing records are skipped),
    /// and the settings (status text, privacy) of `users`, in one round trip.
    async fn live_seen_and_settings(
        &self,
        op: &str,
        session_ids: &[&String],
        users: &[&String],
    ) -> Result<(HashMap<String, i64>, Vec<(String, String)>), PresenceError> {
        if session_ids.is_empty() && users.is_empty() {
            return Ok((HashMap::new(), Vec::new()));
        }
        let mut pipe = redis::pipe();
        for sid in session_ids {
            pipe.hget(self.keys.sessions(shard_of(sid)), sid.as_str());
        }
        for user in users {
            let key = self.keys.settings(user);
            pipe.hget(&key, "text").hget(&key, "privacy");
        }
        let mut raws: Vec<Option<String>> = self.pipe(op, &pipe).await?;
        let settings_raw = raws.split_off(session_ids.len().min(raws.len()));
        let seen = session_ids
            .iter()
            .zip(raws)
            .filter_map(|(sid, raw)| {
                let record: SessionRecord = serde_json::from_str(raw.as_deref()?).ok()?;
                Some(((*sid).clone(), record.sn as i64))
            })
            .collect();
        let settings = settings_raw
            .chunks(2)
            .map(|pair| {
                (
                    pair.first().cloned().flatten().unwrap_or_default(),
                    pair.get(1)
                        .cloned()
                        .flatten()
                        .unwrap_or_else(|| PRIVACY_EVERYONE.to_owned()),
                )
            })
            .collect();
        Ok((seen, settings))
    }

    /// The presence after a user change: last seen is the stored one or the latest
    /// heartbeat of a live session; settings as stored (or as `settings` says).
    async fn state_after(
        &self,
        op: &str,
        change: &UserChange,
        settings: Option<(String, String)>,
    ) -> Result<PresenceState, PresenceError> {
        let sids: Vec<&String> = change.session_ids.iter().collect();
        let read_settings = if settings.is_none() {
            vec![&change.user_id]
        } else {
            Vec::new()
        };
        let (seen, stored) = self
            .live_seen_and_settings(op, &sids, &read_settings)
            .await?;
        let (status_text, last_seen_privacy) = settings
            .or_else(|| stored.into_iter().next())
            .unwrap_or_else(|| (String::new(), PRIVACY_EVERYONE.to_owned()));
        Ok(PresenceState {
            user_id: change.user_id.clone(),
            status: change.after.clone(),
            last_seen_ms: seen.values().copied().fold(change.seen, i64::max),
            sessions: change.sessions,
            status_text,
            last_seen_privacy,
            visible_seen_ms: change.visible_seen,
        })
    }

    fn update(&self, presence: PresenceState, change: &UserChange) -> PresenceUpdate {
        PresenceUpdate {
            presence,
            changed: change.public_status_changed(),
        }
    }

    /// Read the user hashes of `users` (one pipelined round trip).
    async fn user_hashes(
        &self,
        op: &str,
        users: &[&String],
    ) -> Result<Vec<HashMap<String, String>>, PresenceError> {
        let mut pipe = redis::pipe();
        for u in users {
            pipe.hgetall(self.keys.user(u));
        }
        self.pipe(op, &pipe).await
    }

    async fn refresh_instances(&self) -> Result<Vec<String>, PresenceError> {
        let now = self.clock.now_ms();
        let key = self.keys.instances();
        let mut pipe = redis::pipe();
        pipe.zadd(&key, &self.instance_id, now + INSTANCE_TTL_MS)
            .ignore()
            .zrembyscore(&key, "-inf", now)
            .ignore()
            .zrange(&key, 0, -1);
        let (mut live,): (Vec<String>,) = self.pipe("instances", &pipe).await?;
        live.sort();
        *self
            .live_instances
            .write()
            .unwrap_or_else(|p| p.into_inner()) = live.clone();
        Ok(live)
    }

    async fn leave(&self) {
        let mut pipe = redis::pipe();
        pipe.zrem(self.keys.instances(), &self.instance_id);
        if let Err(e) = self.pipe::<()>("instances", &pipe).await {
            tracing::debug!(error = %e, "cannot leave the presence instance set");
        }
    }

    /// Keep this instance in `<p>:instances` until `shutdown`.
    async fn run_membership(&self, shutdown: &CancellationToken) {
        let mut tick = tokio::time::interval(INSTANCE_REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.refresh_instances().await {
                tracing::warn!(error = %e, "cannot refresh the presence instance set");
            }
        }
        self.leave().await;
    }

    /// Subscribe to `<p>:presence` and forward changes until `shutdown`.
    async fn run_subscription(
        &self,
        changes_tx: &mpsc::Sender<UserPresence>,
        shutdown: &CancellationToken,
    ) {
        let channel = self.keys.channel();
        let mut backoff = BACKOFF_MIN;
        loop {
            let connect = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, RedisError>(pubsub)
            };
            let bound = self.opts.connect_timeout.unwrap_or(Duration::MAX);
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(bound, connect) => r,
            };
            let pubsub = match attempt {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, channel = %channel, retry_in = ?backoff, "cannot subscribe to presence changes");
                    if !sleep_or_shutdown(backoff, shutdown).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
                Err(_) => {
                    tracing::warn!(channel = %channel, retry_in = ?backoff, "subscribing to presence changes timed out");
                    if !sleep_or_shutdown(backoff, shutdown).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            backoff = BACKOFF_MIN;
            tracing::info!(channel = %channel, "subscribed to presence changes");
            let mut messages = pubsub.into_on_message();
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = messages.next() => m,
                };
                let Some(msg) = msg else {
                    tracing::warn!(channel = %channel, "presence change subscription lost, resubscribing");
                    break;
                };
                match UserPresence::decode(msg.get_payload_bytes()) {
                    Ok(p) => {
                        if changes_tx.try_send(p).is_err() {
                            self.metrics.feed_dropped.inc();
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "undecodable presence change"),
                }
            }
        }
    }
}

/// Sleep `d` unless `shutdown` fires first (then false).
async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// The gateways of the live sessions in a user hash.
fn session_gateways(hash: &HashMap<String, String>) -> Result<BTreeSet<String>, PresenceError> {
    let mut gateways = BTreeSet::new();
    for (field, value) in hash {
        if field.starts_with("s:") {
            let entry: UserEntry = serde_json::from_str(value)
                .map_err(|e| PresenceError::Internal(format!("bad user entry: {e}")))?;
            gateways.insert(entry.g);
        }
    }
    Ok(gateways)
}

/// Records of sessions removed from shards: `(sid, user, gen)` triples flattened.
fn triples(flat: Vec<String>) -> Vec<(String, String, String)> {
    let mut out = Vec::with_capacity(flat.len() / 3);
    let mut it = flat.into_iter();
    while let (Some(a), Some(b), Some(c)) = (it.next(), it.next(), it.next()) {
        out.push((a, b, c));
    }
    out
}

/// Users whose public status differs between the first status before and the last
/// status after, over a sequence of changes.
fn net_changes(changes: &[UserChange]) -> Vec<String> {
    let mut first_last: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
    for c in changes {
        first_last
            .entry(c.user_id.as_str())
            .and_modify(|e| e.1 = c.after.as_str())
            .or_insert((c.before.as_str(), c.after.as_str()));
    }
    first_last
        .into_iter()
        .filter(|(_, (before, after))| public_status(before) != public_status(after))
        .map(|(user, _)| user.to_owned())
        .collect()
}

#[async_trait]
impl SessionStore for RedisSessionStore {
    fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    async fn register(&self, new: NewSession) -> Result<PresenceUpdate, PresenceError> {
        let s = &*self.inner;
        let now = s.clock.now_ms();
        let gen = format!("{:016x}", rand::random::<u64>());
        let shard = shard_of(&new.session_id);
        let reply: Vec<String> = s
            .script(
                "register",
                &s.scripts.shard_register,
                &s.shard_keys(shard),
                &[
                    new.session_id.clone(),
                    new.user_id.clone(),
                    new.gateway_url.clone(),
                    new.device_id.clone(),
                    now.to_string(),
                    (now + s.ttl_ms).to_string(),
                    gen.clone(),
                ],
            )
            .await?;
        if reply.first().map(String::as_str) != Some("ok") {
            return Err(PresenceError::InvalidRequest(format!(
                "session {} is live for another user",
                new.session_id
            )));
        }
        let r: UserReply = s
            .script(
                "register",
                &s.scripts.user_add,
                &s.user_keys(&new.user_id),
                &[
                    new.session_id,
                    gen,
                    new.gateway_url,
                    now.to_string(),
                    new.status.as_str().to_owned(),
                    if new.automatic && new.status == SessionStatus::Away {
                        "1".to_owned()
                    } else {
                        String::new()
                    },
                ],
            )
            .await?;
        let change = UserChange::from_reply(&new.user_id, r);
        s.settle("register", std::slice::from_ref(&change)).await?;
        let presence = s.state_after("register", &change, None).await?;
        Ok(s.update(presence, &change))
    }

    async fn unregister(&self, session_id: &str) -> Result<Option<PresenceUpdate>, PresenceError> {
        let s = &*self.inner;
        let now = s.clock.now_ms();
        let removed: Option<(String, String, String)> = s
            .script(
                "unregister",
                &s.scripts.shard_remove,
                &s.shard_keys(shard_of(session_id)),
                &[session_id.to_owned()],
            )
            .await?;
        let Some((user_id, _gateway, gen)) = removed else {
            return Ok(None);
        };
        let changes = s
            .remove_user_entries(
                "unregister",
                &[(session_id.to_owned(), user_id.clone(), gen, now)],
            )
            .await?;
        let Some(change) = changes.first() else {
            // The user entry was already replaced or removed by a racing operation.
            let presence = self.query(&[user_id]).await?.remove(0);
            return Ok(Some(PresenceUpdate {
                presence,
                changed: false,
            }));
        };
        let presence = s.state_after("unregister", change, None).await?;
        Ok(Some(s.update(presence, change)))
    }

    async fn heartbeat(
        &self,
        gateway_url: &str,
        session_ids: &[String],
    ) -> Result<Vec<String>, PresenceError> {
        if session_ids.is_empty() {
            return Ok(Vec::new());
        }
        let s = &*self.inner;
        let now = s.clock.now_ms();
        let mut by_shard: BTreeMap<u64, Vec<&String>> = BTreeMap::new();
        for sid in session_ids {
            by_shard.entry(shard_of(sid)).or_default().push(sid);
        }
        let mut pipe = redis::pipe();
        let (now_arg, deadline_arg) = (now.to_string(), (now + s.ttl_ms).to_string());
        for (shard, sids) in &by_shard {
            for chunk in sids.chunks(HEARTBEAT_CHUNK) {
                let mut inv = s.scripts.shard_heartbeat.prepare_invoke();
                inv.key(s.keys.sessions(*shard))
                    .key(s.keys.deadlines(*shard))
                    .arg(gateway_url)
                    .arg(&now_arg)
                    .arg(&deadline_arg);
                for sid in chunk {
                    inv.arg(sid.as_str());
                }
                pipe.invoke_script(&inv);
            }
        }
        let replies: Vec<Vec<String>> = s.pipe("heartbeat", &pipe).await?;
        let unknown: HashSet<String> = replies.into_iter().flatten().collect();
        Ok(session_ids
            .iter()
            .filter(|id| unknown.contains(*id))
            .cloned()
            .collect())
    }

    async fn set_status(
        &self,
        session_id: &str,
        change: &StatusChange,
    ) -> Result<PresenceUpdate, PresenceError> {
        let s = &*self.inner;
        let not_found = || PresenceError::NotFound(format!("session {session_id} is not live"));
        let mut pipe = redis::pipe();
        pipe.hget(s.keys.sessions(shard_of(session_id)), session_id);
        let (raw,): (Option<String>,) = s.pipe("set_status", &pipe).await?;
        let record: SessionRecord = match raw {
            Some(raw) => serde_json::from_str(&raw)
                .map_err(|e| PresenceError::Internal(format!("bad session record: {e}")))?,
            None => return Err(not_found()),
        };
        let [k1, k2, k3] = s.user_keys(&record.u);
        let keys = [k1, k2, k3, s.keys.settings(&record.u)];
        let args = [
            session_id.to_owned(),
            change.status.map_or("", SessionStatus::as_str).to_owned(),
            if change.automatic { "1" } else { "0" }.to_owned(),
            if change.status_text.is_some() {
                "1"
            } else {
                "0"
            }
            .to_owned(),
            change.status_text.clone().unwrap_or_default(),
            change.last_seen_privacy.clone().unwrap_or_default(),
            s.clock.now_ms().to_string(),
        ];
        let r: Option<(UserReply, SettingsReply)> = s
            .script("set_status", &s.scripts.user_status, &keys, &args)
            .await?;
        let (user_reply, (text, privacy, settings_changed)) = r.ok_or_else(not_found)?;
        let change = UserChange::from_reply(&record.u, user_reply);
        let presence = s
            .state_after("set_status", &change, Some((text, privacy)))
            .await?;
        Ok(PresenceUpdate {
            presence,
            changed: change.public_status_changed() || settings_changed != 0,
        })
    }

    async fn query(&self, user_ids: &[String]) -> Result<Vec<PresenceState>, PresenceError> {
        let s = &*self.inner;
        let users = distinct(user_ids);
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let hashes = s.user_hashes("query", &users).await?;
        let mut out = Vec::with_capacity(users.len());
        let mut live: Vec<Vec<String>> = Vec::with_capacity(users.len());
        for (user, hash) in users.iter().zip(&hashes) {
            let mut best: Option<SessionStatus> = None;
            let mut sids = Vec::new();
            for (field, value) in hash {
                let Some(sid) = field.strip_prefix("s:") else {
                    continue;
                };
                let entry: UserEntry = serde_json::from_str(value)
                    .map_err(|e| PresenceError::Internal(format!("bad user entry: {e}")))?;
                best = best.max(SessionStatus::parse(&entry.st));
                sids.push(sid.to_owned());
            }
            let number = |field: &str| {
                hash.get(field)
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0)
            };
            out.push(PresenceState {
                user_id: (*user).clone(),
                status: best
                    .map_or(STATUS_OFFLINE, SessionStatus::as_str)
                    .to_owned(),
                last_seen_ms: number("seen"),
                sessions: sids.len() as u32,
                status_text: String::new(),
                last_seen_privacy: PRIVACY_EVERYONE.to_owned(),
                visible_seen_ms: number("vseen"),
            });
            live.push(sids);
        }
        let all: Vec<&String> = live.iter().flatten().collect();
        let (seen, settings) = s.live_seen_and_settings("query", &all, &users).await?;
        for ((presence, sids), (text, privacy)) in out.iter_mut().zip(&live).zip(settings) {
            presence.status_text = text;
            presence.last_seen_privacy = privacy;
            for sid in sids {
                if let Some(t) = seen.get(sid) {
                    presence.last_seen_ms = presence.last_seen_ms.max(*t);
                }
            }
        }
        Ok(out)
    }

    async fn route(&self, user_ids: &[String]) -> Result<Vec<GatewayRoute>, PresenceError> {
        let s = &*self.inner;
        let users = distinct(user_ids);
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let hashes = s.user_hashes("route", &users).await?;
        let mut routes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (user, hash) in users.iter().zip(hashes) {
            for gateway in session_gateways(&hash)? {
                routes.entry(gateway).or_default().push((*user).clone());
            }
        }
        Ok(routes
            .into_iter()
            .map(|(gateway_addr, user_ids)| GatewayRoute {
                gateway_addr,
                user_ids,
            })
            .collect())
    }

    async fn route_conversation(
        &self,
        conversation_id: &str,
        member_ids: &[String],
    ) -> Result<ConversationRoutes, PresenceError> {
        self.inner
            .route_conversation(conversation_id, member_ids)
            .await
    }

    async fn watch(
        &self,
        gateway_url: &str,
        watcher_id: &str,
        user_ids: &[String],
    ) -> Result<(), PresenceError> {
        let s = &*self.inner;
        let users = distinct(user_ids);
        let mut args = vec![gateway_url.to_owned(), MAX_WATCHED_PER_WATCHER.to_string()];
        args.extend(users.iter().map(|u| (*u).clone()));
        let (code, total): (i64, i64) = s
            .script(
                "watch",
                &s.scripts.user_watch,
                &s.user_keys(watcher_id),
                &args,
            )
            .await?;
        match code {
            0 => {}
            1 => {
                return Err(PresenceError::NotFound(format!(
                    "watcher {watcher_id} has no live session on {gateway_url}"
                )))
            }
            _ => {
                return Err(PresenceError::InvalidRequest(format!(
                    "a watcher may watch at most {MAX_WATCHED_PER_WATCHER} users per gateway \
                     ({total} requested)"
                )))
            }
        }
        if users.is_empty() {
            return Ok(());
        }
        let field = member(gateway_url, watcher_id);
        let mut pipe = redis::pipe();
        for u in users {
            pipe.hset(s.keys.watchers(u), &field, 1).ignore();
        }
        s.pipe::<()>("watch", &pipe).await
    }

    async fn watchers_of(&self, user_id: &str) -> Result<Vec<GatewayWatchers>, PresenceError> {
        let s = &*self.inner;
        let mut pipe = redis::pipe();
        pipe.hkeys(s.keys.watchers(user_id));
        let (fields,): (Vec<String>,) = s.pipe("watchers_of", &pipe).await?;
        let mut by_gateway: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for field in fields {
            if let Some((gateway, watcher)) = field.split_once('\0') {
                by_gateway
                    .entry(gateway.to_owned())
                    .or_default()
                    .insert(watcher.to_owned());
            }
        }
        Ok(by_gateway
            .into_iter()
            .map(|(gateway_url, ids)| GatewayWatchers {
                gateway_url,
                watcher_ids: ids.into_iter().collect(),
            })
            .collect())
    }

    async fn drop_gateway(&self, gateway_url: &str) -> Result<DropOutcome, PresenceError> {
        let s = &*self.inner;
        let mut changes = Vec::new();
        let mut removed_total = 0u32;
        loop {
            let now = s.clock.now_ms();
            let mut pipe = redis::pipe();
            for shard in 0..SHARDS {
                let mut inv = s.scripts.shard_drop.prepare_invoke();
                let [k1, k2, k3] = s.shard_keys(shard);
                inv.key(k1)
                    .key(k2)
                    .key(k3)
                    .arg(gateway_url)
                    .arg(SWEEP_BATCH);
                pipe.invoke_script(&inv);
            }
            let replies: Vec<Vec<String>> = s.pipe("drop_gateway", &pipe).await?;
            let removed: Vec<(String, String, String, i64)> = replies
                .into_iter()
                .flat_map(triples)
                .map(|(sid, user, gen)| (sid, user, gen, now))
                .collect();
            if removed.is_empty() {
                break;
            }
            removed_total += removed.len() as u32;
            changes.extend(s.remove_user_entries("drop_gateway", &removed).await?);
        }
        let changed_users = net_changes(&changes);
        let changed = if changed_users.is_empty() {
            Vec::new()
        } else {
            self.query(&changed_users).await?
        };
        Ok(DropOutcome {
            sessions: removed_total,
            changed,
        })
    }

    async fn expire(&self, now_ms: i64) -> Result<Vec<PresenceState>, PresenceError> {
        let s = &*self.inner;
        let mut changes = Vec::new();
        let (now_arg, lease_arg) = (now_ms.to_string(), (now_ms + EXPIRY_LEASE_MS).to_string());
        loop {
            let mut pipe = redis::pipe();
            for shard in 0..SHARDS {
                let mut inv = s.scripts.shard_sweep.prepare_invoke();
                inv.key(s.keys.sessions(shard))
                    .key(s.keys.deadlines(shard))
                    .arg(&now_arg)
                    .arg(&lease_arg)
                    .arg(SWEEP_BATCH);
                pipe.invoke_script(&inv);
            }
            let replies: Vec<Vec<String>> = s.pipe("expire", &pipe).await?;
            let mut claimed: Vec<(String, String, String, i64)> = Vec::new();
            for flat in replies {
                let mut it = flat.into_iter();
                while let (Some(sid), Some(user), Some(gen), Some(seen)) =
                    (it.next(), it.next(), it.next(), it.next())
                {
                    claimed.push((sid, user, gen, seen.parse().unwrap_or(0)));
                }
            }
            if claimed.is_empty() {
                break;
            }
            changes.extend(s.remove_user_entries("expire", &claimed).await?);
            let mut by_shard: BTreeMap<u64, Vec<(&String, &String)>> = BTreeMap::new();
            for (sid, _, gen, _) in &claimed {
                by_shard.entry(shard_of(sid)).or_default().push((sid, gen));
            }
            let mut pipe = redis::pipe();
            for (shard, sessions) in by_shard {
                let mut inv = s.scripts.shard_finish.prepare_invoke();
                let [k1, k2, k3] = s.shard_keys(shard);
                inv.key(k1).key(k2).key(k3);
                for (sid, gen) in sessions {
                    inv.arg(sid.as_str()).arg(gen.as_str());
                }
                pipe.invoke_script(&inv);
            }
            s.pipe::<Vec<i64>>("expire", &pipe).await?;
            for (sid, user, _, _) in &claimed {
                tracing::debug!(session_id = %sid, user_id = %user, "session expired");
            }
        }
        let changed_users = net_changes(&changes);
        if changed_users.is_empty() {
            return Ok(Vec::new());
        }
        self.query(&changed_users).await
    }

    async fn stats(&self) -> Result<StoreStats, PresenceError> {
        let s = &*self.inner;
        let mut pipe = redis::pipe();
        for shard in 0..SHARDS {
            pipe.hlen(s.keys.sessions(shard));
        }
        pipe.get(s.keys.online_users());
        let mut replies: Vec<Option<i64>> = s.pipe("stats", &pipe).await?;
        let online = replies.pop().flatten().unwrap_or(0);
        let sessions: i64 = replies.into_iter().flatten().sum();
        Ok(StoreStats {
            sessions: sessions.max(0) as u64,
            online_users: online.max(0) as u64,
        })
    }

    async fn epoch(&self) -> Result<Epoch, PresenceError> {
        let s = &*self.inner;
        let candidate = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(s.keys.epoch())
            .arg(&candidate)
            .arg("NX")
            .get(s.keys.epoch());
        let (created, id): (Option<String>, Option<String>) = s.pipe("epoch", &pipe).await?;
        let id = id.ok_or_else(|| PresenceError::Unavailable("the epoch key vanished".into()))?;
        Ok(Epoch {
            fresh: created.is_some() && id == candidate,
            id,
        })
    }

    async fn wait_ready(&self, shutdown: &CancellationToken) -> bool {
        let s = &*self.inner;
        let mut backoff = BACKOFF_MIN;
        loop {
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return false,
                r = s.conn() => r,
            };
            match attempt {
                Ok(mut conn) => match redis::cmd("PING").query_async::<String>(&mut conn).await {
                    Ok(_) => {
                        tracing::info!(url = %redacted(&s.opts.url), "connected to redis");
                        return true;
                    }
                    Err(e) => tracing::error!(
                        url = %redacted(&s.opts.url),
                        error = %e,
                        retry_in = ?backoff,
                        "redis does not answer; presence is not ready"
                    ),
                },
                Err(e) => tracing::error!(
                    url = %redacted(&s.opts.url),
                    error = %e,
                    retry_in = ?backoff,
                    "cannot connect to redis; presence is not ready"
                ),
            }
            if !sleep_or_shutdown(backoff, shutdown).await {
                return false;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn feed(&self) -> Option<Arc<dyn PresenceFeed>> {
        Some(self.inner.clone())
    }

    fn register_metrics(&self, registry: &Registry) -> anyhow::Result<()> {
        let m = &self.inner.metrics;
        registry.register(Box::new(m.seconds.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        registry.register(Box::new(m.feed_dropped.clone()))?;
        registry.register(Box::new(m.interest_invalidations.clone()))?;
        Ok(())
    }
}

/// The URL without a password, for logs.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[async_trait]
impl PresenceFeed for Inner {
    async fn publish(&self, changes: &[UserPresence]) -> Result<(), PresenceError> {
        if changes.is_empty() {
            return Ok(());
        }
        let channel = self.keys.channel();
        let mut pipe = redis::pipe();
        for change in changes {
            pipe.publish(&channel, change.encode_to_vec()).ignore();
        }
        self.pipe::<()>("publish", &pipe).await
    }

    async fn run(&self, changes_tx: mpsc::Sender<UserPresence>, shutdown: CancellationToken) {
        tokio::join!(
            self.run_membership(&shutdown),
            self.run_subscription(&changes_tx, &shutdown)
        );
    }

    fn delivers_to(&self, gateway_url: &str) -> bool {
        let live = self
            .live_instances
            .read()
            .unwrap_or_else(|p| p.into_inner());
        match rendezvous(&live, gateway_url) {
            // Not known yet (or not refreshed): deliver rather than lose events.
            None => true,
            Some(owner) => owner == self.instance_id,
        }
    }
}

/// The instance responsible for a gateway: highest hash of (instance, gateway). FNV
/// alone mixes the last bytes too weakly for ranking (URLs that differ only at the end
/// would all rank the same instance first), hence `fmix64`.
fn rendezvous<'a>(instances: &'a [String], gateway_url: &str) -> Option<&'a str> {
    instances
        .iter()
        .max_by_key(|id| fmix64(fnv1a(&[id.as_bytes(), b"\0", gateway_url.as_bytes()])))
        .map(String::as_str)
}
