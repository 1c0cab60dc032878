//! In-process session store: the embedded default, for one presence instance.
//!
//! All state sits behind one `std::sync::Mutex`. That is right here: every critical
//! section is a few map operations, never held across an `.await`. Operations over
//! many sessions (heartbeat batches, expiry, dropping a gateway) take the lock once per
//! chunk of [`CHUNK`] sessions and yield between chunks, so a 100k-session heartbeat
//! never holds the lock (or a runtime worker) for long.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use switchboard_proto::v1::GatewayRoute;

use super::interest::{self, ConversationRoutes, InterestIndex};
use super::{
    is_visible, Clock, DropOutcome, Epoch, GatewayWatchers, NewSession, PresenceState,
    PresenceUpdate, SessionStatus, SessionStore, StatusChange, StoreStats, LAST_SEEN_RETENTION,
    MAX_OFFLINE_LAST_SEEN, MAX_WATCHED_PER_WATCHER, PRIVACY_EVERYONE, STATUS_OFFLINE,
};
use crate::error::PresenceError;

/// Sessions handled per lock acquisition in batch operations.
const CHUNK: usize = 512;

/// The in-memory [`SessionStore`].
pub struct MemorySessionStore {
    /// Source of "now" for deadlines and last-seen times.
    clock: Clock,
    /// How long a session lives without a heartbeat, in ms.
    ttl_ms: i64,
    /// All state; see the module comment for why a std mutex.
    state: Mutex<State>,
    /// Dropped interest entries (also held by `State::interest`), for `register_metrics`.
    interest_invalidations: prometheus::IntCounter,
    /// The identity of this store's state: the state lives exactly as long as the store.
    epoch: String,
    /// Whether [`SessionStore::epoch`] was asked yet (the first answer is `fresh`).
    epoch_asked: std::sync::atomic::AtomicBool,
}

/// One live session.
struct Session {
    user_id: String,
    /// Kept for diagnostics (logged on expiry).
    device_id: String,
    gateway_url: String,
    status: SessionStatus,
    /// The status is an `away` set automatically (by the gateway's idle timer): only
    /// such an `away` is undone by an automatic `online`.
    auto_away: bool,
    /// Last register or heartbeat of this session: the user's last visible moment
    /// when this session was the last visible one and expires.
    last_seen_ms: i64,
    /// When the session expires unless heartbeated (ms since epoch); also its key in
    /// `State::deadlines`.
    expires_at_ms: i64,
}

/// A user with at least one live session.
struct OnlineUser {
    /// Ids of the user's live sessions.
    sessions: HashSet<String>,
    /// Last register, heartbeat or unregister of any of the sessions.
    last_seen_ms: i64,
    /// See [`PresenceState::visible_seen_ms`].
    visible_seen_ms: i64,
}

/// What is kept of a user with no live session.
#[derive(Clone, Copy)]
struct OfflineSeen {
    last_seen_ms: i64,
    visible_seen_ms: i64,
}

/// A user's non-default presence settings (users with defaults have no entry).
#[derive(Default)]
struct UserSettings {
    /// Empty when unset.
    status_text: String,
    /// `contacts` or `nobody` (`everyone` is the default: no entry).
    privacy: Option<String>,
}

struct State {
    /// Live sessions by id.
    sessions: HashMap<String, Session>,
    /// Users with live sessions (the route table is derived from their sessions).
    users: HashMap<String, OnlineUser>,
    /// Session ids per gateway URL, for heartbeat checks and dropping a gateway.
    gateways: HashMap<String, HashSet<String>>,
    /// (expires_at_ms, session_id) of every live session, oldest first, so expiry
    /// touches only what is due.
    deadlines: BTreeSet<(i64, String)>,
    /// Last-seen times of users with no live session, bounded by
    /// `LAST_SEEN_RETENTION` and `MAX_OFFLINE_LAST_SEEN`.
    offline_seen: HashMap<String, OfflineSeen>,
    /// (last_seen_ms, user_id) of every entry of `offline_seen`, oldest first, so the
    /// bounds are enforced without a scan.
    offline_order: BTreeSet<(i64, String)>,
    /// Watched user -> gateway URL -> watcher ids on that gateway.
    watchers: HashMap<String, HashMap<String, HashSet<String>>>,
    /// (gateway URL, watcher id) -> users watched there. An entry exists only while the
    /// watcher has a live session on that gateway.
    watching: HashMap<(String, String), HashSet<String>>,
    /// Cached conversation routes; an entry goes when a member's gateways change.
    interest: InterestIndex,
    /// Status text and last-seen privacy of users who set non-default values. They
    /// outlive sessions (a privacy choice must survive going offline), so this grows
    /// with the number of users who ever changed them, like a profile table; setting
    /// both back to their defaults removes the entry.
    settings: HashMap<String, UserSettings>,
}

impl MemorySessionStore {
    /// A store whose sessions live `ttl` without a heartbeat.
    pub fn new(ttl: Duration) -> Self {
        Self::with_clock(ttl, Clock::new())
    }

    /// A store using an explicit clock.
    pub fn with_clock(ttl: Duration, clock: Clock) -> Self {
        let interest_invalidations = interest::invalidations_counter();
        MemorySessionStore {
            clock,
            ttl_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2),
            state: Mutex::new(State {
                sessions: HashMap::new(),
                users: HashMap::new(),
                gateways: HashMap::new(),
                deadlines: BTreeSet::new(),
                offline_seen: HashMap::new(),
                offline_order: BTreeSet::new(),
                watchers: HashMap::new(),
                watching: HashMap::new(),
                interest: InterestIndex::new(interest_invalidations.clone()),
                settings: HashMap::new(),
            }),
            interest_invalidations,
            epoch: format!("{:016x}", rand::random::<u64>()),
            epoch_asked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way
        // that breaks memory safety; keep serving rather than cascading the panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn status_of(&self, user_id: &str) -> &'static str {
        match self.users.get(user_id) {
            Some(user) => user
                .sessions
                .iter()
                .filter_map(|id| self.sessions.get(id))
                .map(|s| s.status)
                .max()
                .map(SessionStatus::as_str)
                .unwrap_or(STATUS_OFFLINE),
            None => STATUS_OFFLINE,
        }
    }

    fn presence_of(&self, user_id: &str) -> PresenceState {
        let (last_seen_ms, visible_seen_ms, sessions) = match self.users.get(user_id) {
            Some(user) => (
                user.last_seen_ms,
                user.visible_seen_ms,
                user.sessions.len() as u32,
            ),
            None => {
                let seen = self.offline_seen.get(user_id);
                (
                    seen.map_or(0, |s| s.last_seen_ms),
                    seen.map_or(0, |s| s.visible_seen_ms),
                    0,
                )
            }
        };
        let settings = self.settings.get(user_id);
        PresenceState {
            user_id: user_id.to_owned(),
            status: self.status_of(user_id).to_owned(),
            last_seen_ms,
            sessions,
            status_text: settings.map(|s| s.status_text.clone()).unwrap_or_default(),
            last_seen_privacy: settings
                .and_then(|s| s.privacy.clone())
                .unwrap_or_else(|| PRIVACY_EVERYONE.to_owned()),
            visible_seen_ms,
        }
    }

    /// Record that the user stopped being visibly present at `at_ms` when the status
    /// went from visible (`before`) to invisible or offline (now).
    fn note_visibility(&mut self, user_id: &str, before: &str, at_ms: i64) {
        if !is_visible(before) || is_visible(self.status_of(user_id)) {
            return;
        }
        if let Some(user) = self.users.get_mut(user_id) {
            user.visible_seen_ms = user.visible_seen_ms.max(at_ms);
        } else if let Some(seen) = self.offline_seen.get_mut(user_id) {
            seen.visible_seen_ms = seen.visible_seen_ms.max(at_ms);
        }
    }

    /// Apply the per-user part of a status change (status text, privacy).
    fn apply_settings(&mut self, user_id: &str, change: &StatusChange) {
        if change.status_text.is_none() && change.last_seen_privacy.is_none() {
            return;
        }
        let entry = self.settings.entry(user_id.to_owned()).or_default();
        if let Some(text) = &change.status_text {
            entry.status_text = text.clone();
        }
        if let Some(privacy) = &change.last_seen_privacy {
            entry.privacy = (privacy != PRIVACY_EVERYONE).then(|| privacy.clone());
        }
        if entry.status_text.is_empty() && entry.privacy.is_none() {
            self.settings.remove(user_id);
        }
    }

    fn has_session_on(&self, user_id: &str, gateway_url: &str) -> bool {
        self.users.get(user_id).is_some_and(|u| {
            u.sessions
                .iter()
                .filter_map(|id| self.sessions.get(id))
                .any(|s| s.gateway_url == gateway_url)
        })
    }

    fn forget_offline_seen(&mut self, user_id: &str) -> Option<OfflineSeen> {
        let seen = self.offline_seen.remove(user_id)?;
        self.offline_order
            .remove(&(seen.last_seen_ms, user_id.to_owned()));
        Some(seen)
    }

    fn remember_offline_seen(&mut self, user_id: &str, seen: OfflineSeen) {
        self.forget_offline_seen(user_id);
        self.offline_seen.insert(user_id.to_owned(), seen);
        self.offline_order
            .insert((seen.last_seen_ms, user_id.to_owned()));
        while self.offline_seen.len() > MAX_OFFLINE_LAST_SEEN {
            self.pop_oldest_offline_seen();
        }
    }

    fn pop_oldest_offline_seen(&mut self) {
        if let Some((_, user)) = self.offline_order.pop_first() {
            self.offline_seen.remove(&user);
        }
    }

    /// Remove one live session; `seen_ms` (if any) is a last-seen time to record
    /// (otherwise the session's own last seen is when it was last alive).
    fn remove_session(&mut self, session_id: &str, seen_ms: Option<i64>) -> Option<Session> {
        let user_id = self.sessions.get(session_id)?.user_id.clone();
        let before = self.status_of(&user_id);
        let session = self.remove_session_entry(session_id, seen_ms)?;
        let at_ms = seen_ms.unwrap_or(session.last_seen_ms);
        self.note_visibility(&user_id, before, at_ms);
        Some(session)
    }

    fn remove_session_entry(&mut self, session_id: &str, seen_ms: Option<i64>) -> Option<Session> {
        let session = self.sessions.remove(session_id)?;
        self.deadlines
            .remove(&(session.expires_at_ms, session_id.to_owned()));
        if let Some(ids) = self.gateways.get_mut(&session.gateway_url) {
            ids.remove(session_id);
            if ids.is_empty() {
                self.gateways.remove(&session.gateway_url);
            }
        }
        let mut offline_since = None;
        if let Some(user) = self.users.get_mut(&session.user_id) {
            user.sessions.remove(session_id);
            if let Some(seen) = seen_ms {
                user.last_seen_ms = user.last_seen_ms.max(seen);
            }
            if user.sessions.is_empty() {
                offline_since = Some(OfflineSeen {
                    last_seen_ms: user.last_seen_ms,
                    visible_seen_ms: user.visible_seen_ms,
                });
            }
        }
        if let Some(seen) = offline_since {
            self.users.remove(&session.user_id);
            self.remember_offline_seen(&session.user_id, seen);
        }
        if !self.has_session_on(&session.user_id, &session.gateway_url) {
            self.drop_watches_of(&session.gateway_url, &session.user_id);
            self.interest.invalidate_member(&session.user_id);
        }
        Some(session)
    }

    /// Forget every watch `watcher_id` holds through `gateway_url`.
    fn drop_watches_of(&mut self, gateway_url: &str, watcher_id: &str) {
        let key = (gateway_url.to_owned(), watcher_id.to_owned());
        let Some(watched) = self.watching.remove(&key) else {
            return;
        };
        for user in watched {
            let Some(by_gateway) = self.watchers.get_mut(&user) else {
                continue;
            };
            if let Some(ids) = by_gateway.get_mut(gateway_url) {
                ids.remove(watcher_id);
                if ids.is_empty() {
                    by_gateway.remove(gateway_url);
                }
            }
            if by_gateway.is_empty() {
                self.watchers.remove(&user);
            }
        }
    }

    /// The users in `befores` whose public view now differs from the recorded one.
    fn changed_since(&self, befores: &HashMap<String, PresenceState>) -> Vec<PresenceState> {
        let mut changed: Vec<PresenceState> = befores
            .iter()
            .map(|(user, before)| (before, self.presence_of(user)))
            .filter(|(before, after)| before.public_key() != after.public_key())
            .map(|(_, after)| after)
            .collect();
        changed.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        changed
    }
}

use interest::distinct;

/// A session's status and "away set automatically" mark after `change`: an explicit
/// status replaces it (and clears the mark); an automatic `away` replaces only
/// `online`, an automatic `online` only undoes an automatic `away`.
pub(super) fn next_status(
    current: SessionStatus,
    auto_away: bool,
    change: &StatusChange,
) -> (SessionStatus, bool) {
    match (change.status, change.automatic) {
        (None, _) => (current, auto_away),
        (Some(status), false) => (status, false),
        (Some(SessionStatus::Away), true) if current == SessionStatus::Online => {
            (SessionStatus::Away, true)
        }
        (Some(SessionStatus::Online), true) if current == SessionStatus::Away && auto_away => {
            (SessionStatus::Online, false)
        }
        (Some(_), true) => (current, auto_away),
    }
}

#[async_trait]
impl SessionStore for MemorySessionStore {
    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    async fn register(&self, new: NewSession) -> Result<PresenceUpdate, PresenceError> {
        let now = self.clock.now_ms();
        let expires_at_ms = now + self.ttl_ms;
        let mut st = self.lock();
        let before = st.presence_of(&new.user_id);
        if let Some(old) = st.sessions.get(&new.session_id) {
            if old.user_id != new.user_id {
                return Err(PresenceError::InvalidRequest(format!(
                    "session {} is live for another user",
                    new.session_id
                )));
            }
            // Re-registering a live session refreshes it (and moves it if it changed
            // gateway); its status and its watches on an unchanged gateway stay.
            let old_gateway = old.gateway_url.clone();
            let had_new_gateway = st.has_session_on(&new.user_id, &new.gateway_url);
            let old_deadline = (old.expires_at_ms, new.session_id.clone());
            st.deadlines.remove(&old_deadline);
            st.deadlines.insert((expires_at_ms, new.session_id.clone()));
            if let Some(user) = st.users.get_mut(&new.user_id) {
                user.last_seen_ms = user.last_seen_ms.max(now);
            }
            if let Some(session) = st.sessions.get_mut(&new.session_id) {
                session.expires_at_ms = expires_at_ms;
                session.last_seen_ms = session.last_seen_ms.max(now);
                session.device_id = new.device_id;
                session.gateway_url = new.gateway_url.clone();
            }
            if old_gateway != new.gateway_url {
                if let Some(ids) = st.gateways.get_mut(&old_gateway) {
                    ids.remove(&new.session_id);
                    if ids.is_empty() {
                        st.gateways.remove(&old_gateway);
                    }
                }
                st.gateways
                    .entry(new.gateway_url)
                    .or_default()
                    .insert(new.session_id);
                let left_old_gateway = !st.has_session_on(&new.user_id, &old_gateway);
                if left_old_gateway {
                    st.drop_watches_of(&old_gateway, &new.user_id);
                }
                if left_old_gateway || !had_new_gateway {
                    st.interest.invalidate_member(&new.user_id);
                }
            }
            let presence = st.presence_of(&new.user_id);
            let changed = presence.public_key() != before.public_key();
            return Ok(PresenceUpdate { presence, changed });
        }
        let offline = st.forget_offline_seen(&new.user_id);
        if !st.has_session_on(&new.user_id, &new.gateway_url) {
            st.interest.invalidate_member(&new.user_id);
        }
        let user = st
            .users
            .entry(new.user_id.clone())
            .or_insert_with(|| OnlineUser {
                sessions: HashSet::new(),
                last_seen_ms: now,
                visible_seen_ms: offline.map_or(0, |o| o.visible_seen_ms),
            });
        user.sessions.insert(new.session_id.clone());
        user.last_seen_ms = user.last_seen_ms.max(now);
        st.gateways
            .entry(new.gateway_url.clone())
            .or_default()
            .insert(new.session_id.clone());
        st.deadlines.insert((expires_at_ms, new.session_id.clone()));
        let user_id = new.user_id.clone();
        st.sessions.insert(
            new.session_id,
            Session {
                user_id: new.user_id,
                device_id: new.device_id,
                gateway_url: new.gateway_url,
                status: new.status,
                auto_away: new.automatic && new.status == SessionStatus::Away,
                last_seen_ms: now,
                expires_at_ms,
            },
        );
        let presence = st.presence_of(&user_id);
        let changed = presence.public_key() != before.public_key();
        Ok(PresenceUpdate { presence, changed })
    }

    async fn unregister(&self, session_id: &str) -> Result<Option<PresenceUpdate>, PresenceError> {
        let now = self.clock.now_ms();
        let mut st = self.lock();
        let Some(user_id) = st.sessions.get(session_id).map(|s| s.user_id.clone()) else {
            return Ok(None);
        };
        let before = st.presence_of(&user_id);
        st.remove_session(session_id, Some(now));
        let presence = st.presence_of(&user_id);
        let changed = presence.public_key() != before.public_key();
        Ok(Some(PresenceUpdate { presence, changed }))
    }

    async fn heartbeat(
        &self,
        gateway_url: &str,
        session_ids: &[String],
    ) -> Result<Vec<String>, PresenceError> {
        let mut unknown = Vec::new();
        for (i, chunk) in session_ids.chunks(CHUNK).enumerate() {
            if i > 0 {
                tokio::task::yield_now().await;
            }
            let now = self.clock.now_ms();
            let expires_at_ms = now + self.ttl_ms;
            let mut st = self.lock();
            let st = &mut *st;
            for id in chunk {
                let Some(session) = st.sessions.get_mut(id) else {
                    unknown.push(id.clone());
                    continue;
                };
                if session.gateway_url != gateway_url {
                    unknown.push(id.clone());
                    continue;
                }
                let old = (session.expires_at_ms, id.clone());
                session.expires_at_ms = expires_at_ms;
                session.last_seen_ms = session.last_seen_ms.max(now);
                let user_id = &session.user_id;
                if let Some(user) = st.users.get_mut(user_id) {
                    user.last_seen_ms = user.last_seen_ms.max(now);
                }
                st.deadlines.remove(&old);
                st.deadlines.insert((expires_at_ms, old.1));
            }
        }
        Ok(unknown)
    }

    async fn set_status(
        &self,
        session_id: &str,
        change: &StatusChange,
    ) -> Result<PresenceUpdate, PresenceError> {
        let now = self.clock.now_ms();
        let mut st = self.lock();
        let Some(session) = st.sessions.get_mut(session_id) else {
            return Err(PresenceError::NotFound(format!(
                "session {session_id} is not live"
            )));
        };
        let user_id = session.user_id.clone();
        let (status, auto_away) = next_status(session.status, session.auto_away, change);
        let before = st.presence_of(&user_id);
        if let Some(session) = st.sessions.get_mut(session_id) {
            session.status = status;
            session.auto_away = auto_away;
        }
        st.apply_settings(&user_id, change);
        st.note_visibility(&user_id, &before.status, now);
        let presence = st.presence_of(&user_id);
        let changed = presence.public_key() != before.public_key();
        Ok(PresenceUpdate { presence, changed })
    }

    async fn query(&self, user_ids: &[String]) -> Result<Vec<PresenceState>, PresenceError> {
        let st = self.lock();
        Ok(distinct(user_ids)
            .into_iter()
            .map(|u| st.presence_of(u))
            .collect())
    }

    async fn route(&self, user_ids: &[String]) -> Result<Vec<GatewayRoute>, PresenceError> {
        let st = self.lock();
        let mut routes: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for user_id in distinct(user_ids) {
            let Some(user) = st.users.get(user_id) else {
                continue;
            };
            for session in user.sessions.iter().filter_map(|id| st.sessions.get(id)) {
                let users = routes.entry(session.gateway_url.as_str()).or_default();
                // Users are processed one at a time, so a second session of the same
                // user on the same gateway shows up as the last element.
                if users.last() != Some(user_id) {
                    users.push(user_id.clone());
                }
            }
        }
        Ok(routes
            .into_iter()
            .map(|(gateway_addr, user_ids)| GatewayRoute {
                gateway_addr: gateway_addr.to_owned(),
                user_ids,
            })
            .collect())
    }

    async fn route_conversation(
        &self,
        conversation_id: &str,
        member_ids: &[String],
    ) -> Result<ConversationRoutes, PresenceError> {
        let fingerprint = interest::members_fingerprint(member_ids);
        let now = self.clock.now_ms();
        let mut st = self.lock();
        if let Some(routes) = st.interest.get(conversation_id, fingerprint, now) {
            return Ok(ConversationRoutes {
                routes,
                cached: true,
            });
        }
        let members = distinct(member_ids);
        let routes = {
            let st = &*st;
            interest::routes_from(members.iter().flat_map(|user_id| {
                st.users
                    .get(*user_id)
                    .into_iter()
                    .flat_map(|user| user.sessions.iter())
                    .filter_map(|sid| st.sessions.get(sid))
                    .map(|session| (user_id.as_str(), session.gateway_url.as_str()))
            }))
        };
        let members = members.into_iter().cloned().collect();
        st.interest
            .insert(conversation_id, fingerprint, members, routes.clone(), now);
        Ok(ConversationRoutes {
            routes,
            cached: false,
        })
    }

    async fn watch(
        &self,
        gateway_url: &str,
        watcher_id: &str,
        user_ids: &[String],
    ) -> Result<(), PresenceError> {
        let mut st = self.lock();
        if !st.has_session_on(watcher_id, gateway_url) {
            return Err(PresenceError::NotFound(format!(
                "watcher {watcher_id} has no live session on {gateway_url}"
            )));
        }
        let key = (gateway_url.to_owned(), watcher_id.to_owned());
        let current = st.watching.get(&key);
        let added = distinct(user_ids)
            .into_iter()
            .filter(|u| current.is_none_or(|c| !c.contains(*u)))
            .count();
        let total = current.map_or(0, HashSet::len) + added;
        if total > MAX_WATCHED_PER_WATCHER {
            return Err(PresenceError::InvalidRequest(format!(
                "a watcher may watch at most {MAX_WATCHED_PER_WATCHER} users per gateway \
                 ({total} requested)"
            )));
        }
        let watching = st.watching.entry(key).or_default();
        for user in user_ids {
            watching.insert(user.clone());
        }
        for user in user_ids {
            st.watchers
                .entry(user.clone())
                .or_default()
                .entry(gateway_url.to_owned())
                .or_default()
                .insert(watcher_id.to_owned());
        }
        Ok(())
    }

    async fn watchers_of(&self, user_id: &str) -> Result<Vec<GatewayWatchers>, PresenceError> {
        let st = self.lock();
        let Some(by_gateway) = st.watchers.get(user_id) else {
            return Ok(Vec::new());
        };
        let mut out: Vec<GatewayWatchers> = by_gateway
            .iter()
            .map(|(gateway_url, ids)| {
                let mut watcher_ids: Vec<String> = ids.iter().cloned().collect();
                watcher_ids.sort();
                GatewayWatchers {
                    gateway_url: gateway_url.clone(),
                    watcher_ids,
                }
            })
            .collect();
        out.sort_by(|a, b| a.gateway_url.cmp(&b.gateway_url));
        Ok(out)
    }

    async fn drop_gateway(&self, gateway_url: &str) -> Result<DropOutcome, PresenceError> {
        let mut befores: HashMap<String, PresenceState> = HashMap::new();
        let mut removed = 0u32;
        loop {
            let now = self.clock.now_ms();
            {
                let mut st = self.lock();
                let batch: Vec<String> = match st.gateways.get(gateway_url) {
                    Some(ids) => ids.iter().take(CHUNK).cloned().collect(),
                    None => Vec::new(),
                };
                if batch.is_empty() {
                    let changed = st.changed_since(&befores);
                    return Ok(DropOutcome {
                        sessions: removed,
                        changed,
                    });
                }
                for id in batch {
                    let Some(user_id) = st.sessions.get(&id).map(|s| s.user_id.clone()) else {
                        continue;
                    };
                    if let Entry::Vacant(entry) = befores.entry(user_id) {
                        let before = st.presence_of(entry.key());
                        entry.insert(before);
                    }
                    if st.remove_session(&id, Some(now)).is_some() {
                        removed += 1;
                    }
                }
            }
            tokio::task::yield_now().await;
        }
    }

    async fn expire(&self, now_ms: i64) -> Result<Vec<PresenceState>, PresenceError> {
        let mut befores: HashMap<String, PresenceState> = HashMap::new();
        loop {
            {
                let mut st = self.lock();
                let due: Vec<String> = st
                    .deadlines
                    .iter()
                    .take_while(|(deadline, _)| *deadline <= now_ms)
                    .take(CHUNK)
                    .map(|(_, id)| id.clone())
                    .collect();
                if due.is_empty() {
                    st.interest.purge_expired(now_ms);
                    let retain_after =
                        now_ms.saturating_sub(LAST_SEEN_RETENTION.as_millis() as i64);
                    while st
                        .offline_order
                        .first()
                        .is_some_and(|(seen, _)| *seen < retain_after)
                    {
                        st.pop_oldest_offline_seen();
                    }
                    return Ok(st.changed_since(&befores));
                }
                for id in due {
                    let Some(user_id) = st.sessions.get(&id).map(|s| s.user_id.clone()) else {
                        continue;
                    };
                    if let Entry::Vacant(entry) = befores.entry(user_id) {
                        let before = st.presence_of(entry.key());
                        entry.insert(before);
                    }
                    if let Some(session) = st.remove_session(&id, None) {
                        tracing::debug!(
                            session_id = %id,
                            user_id = %session.user_id,
                            device_id = %session.device_id,
                            gateway = %session.gateway_url,
                            "session expired"
                        );
                    }
                }
            }
            tokio::task::yield_now().await;
        }
    }

    async fn stats(&self) -> Result<StoreStats, PresenceError> {
        let st = self.lock();
        Ok(StoreStats {
            sessions: st.sessions.len() as u64,
            online_users: st.users.len() as u64,
        })
    }

    async fn epoch(&self) -> Result<Epoch, PresenceError> {
        let asked = self
            .epoch_asked
            .swap(true, std::sync::atomic::Ordering::SeqCst);
        Ok(Epoch {
            id: self.epoch.clone(),
            fresh: !asked,
        })
    }

    fn register_metrics(&self, registry: &prometheus::Registry) -> anyhow::Result<()> {
        registry.register(Box::new(self.interest_invalidations.clone()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::session_store_suite!(|ttl| std::sync::Arc::new(MemorySessionStore::new(ttl)));

    #[tokio::test(start_paused = true)]
    async fn offline_last_seen_is_forgotten_after_retention() {
        let store = MemorySessionStore::new(Duration::from_secs(30));
        let s = NewSession {
            session_id: "s1".into(),
            user_id: "alice".into(),
            device_id: "d".into(),
            gateway_url: "http://gw1".into(),
            status: SessionStatus::Online,
            automatic: false,
        };
        store.register(s).await.unwrap();
        store.unregister("s1").await.unwrap();
        let seen = store.query(&["alice".into()]).await.unwrap()[0].last_seen_ms;
        assert!(seen > 0);

        let day = Duration::from_secs(24 * 3600);
        tokio::time::advance(LAST_SEEN_RETENTION - day).await;
        store.expire(store.now_ms()).await.unwrap();
        assert_eq!(
            store.query(&["alice".into()]).await.unwrap()[0].last_seen_ms,
            seen
        );

        tokio::time::advance(2 * day).await;
        store.expire(store.now_ms()).await.unwrap();
        assert_eq!(
            store.query(&["alice".into()]).await.unwrap()[0].last_seen_ms,
            0
        );
        let st = store.lock();
        assert!(st.offline_seen.is_empty() && st.offline_order.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn state_is_empty_after_every_session_and_watch_is_gone() {
        let store = MemorySessionStore::new(Duration::from_secs(30));
        for (sid, user, gw) in [("s1", "alice", "http://gw1"), ("s2", "bob", "http://gw2")] {
            store
                .register(NewSession {
                    session_id: sid.into(),
                    user_id: user.into(),
                    device_id: String::new(),
                    gateway_url: gw.into(),
                    status: SessionStatus::Online,
                    automatic: false,
                })
                .await
                .unwrap();
        }
        store
            .watch("http://gw1", "alice", &["bob".into(), "carol".into()])
            .await
            .unwrap();
        store.unregister("s1").await.unwrap();
        store.drop_gateway("http://gw2").await.unwrap();
        let st = store.lock();
        assert!(st.sessions.is_empty());
        assert!(st.users.is_empty());
        assert!(st.gateways.is_empty());
        assert!(st.deadlines.is_empty());
        assert!(st.watchers.is_empty());
        assert!(st.watching.is_empty());
    }
}
