//! Last-seen privacy "contacts". Presence gives every viewer the `last_seen_ms` of a
//! user whose privacy is "contacts"; the gateway clears it for viewers who share no
//! conversation with that user (storage `SharedContacts`), remembering each answer
//! per (viewer, user) for [`CACHE_TTL`].
//!
//! Presence acks (watch, query) ask storage before answering. `Deliver` never waits:
//! a presence event whose answer is not cached waits in a per-(viewer, user) list
//! while one task asks storage, and is queued (filtered) when the answer arrives. A
//! later event for the same key joins the list (replacing the session's older one),
//! so a session still sees one user's presence events in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard_proto::v1::{self, server_frame::Event, ServerFrame, UserPresence};
use tokio::time::Instant;
use tracing::debug;

use crate::sessions::{lock, Session};
use crate::Shared;

/// How long a `SharedContacts` answer is used.
pub(crate) const CACHE_TTL: Duration = Duration::from_secs(60);
/// Most cached answers; when full, expired ones go first, then all of them.
const MAX_CACHED: usize = 100_000;
/// Most (viewer, user) lookups in flight for `Deliver`; beyond that an event whose
/// answer is unknown is delivered with `last_seen_ms` cleared (privacy first).
const MAX_PENDING: usize = 10_000;

/// The privacy value that needs the check.
const CONTACTS: &str = "contacts";

/// Whether `viewer` may see `presence.last_seen_ms` only if they are the user's contact:
/// they share a conversation in which the user has sent something (storage decides).
pub(crate) fn needs_check(viewer: &str, presence: &UserPresence) -> bool {
    presence.last_seen_privacy == CONTACTS
        && presence.last_seen_ms != 0
        && presence.user_id != viewer
}

/// `presence` as a viewer who shares no conversation with the user sees it.
pub(crate) fn hidden(presence: &UserPresence) -> UserPresence {
    UserPresence {
        last_seen_ms: 0,
        ..presence.clone()
    }
}

type Key = (Box<str>, Box<str>);

fn key(viewer: &str, user: &str) -> Key {
    (viewer.into(), user.into())
}

/// What `Deliver` does with one presence event for one session.
pub(crate) enum Visibility {
    /// The answer is known: true when the viewer may see `last_seen_ms`.
    Known(bool),
    /// Parked until storage answers; the event is queued then.
    Deferred,
}

#[derive(Default)]
struct Inner {
    /// Answers: whether viewer is a contact of user, and when that was asked.
    known: HashMap<Key, (bool, Instant)>,
    /// Events waiting for an answer being fetched, at most one per session.
    pending: HashMap<Key, Vec<(Arc<Session>, UserPresence)>>,
}

/// Cached `SharedContacts` answers and the events waiting for one.
#[derive(Default)]
pub(crate) struct ContactsCache {
    inner: Mutex<Inner>,
}

impl Inner {
    fn get(&self, key: &Key, now: Instant) -> Option<bool> {
        self.known
            .get(key)
            .filter(|(_, at)| now.saturating_duration_since(*at) < CACHE_TTL)
            .map(|(shared, _)| *shared)
    }

    fn put(&mut self, key: Key, shared: bool, now: Instant) {
        if self.known.len() >= MAX_CACHED && !self.known.contains_key(&key) {
            self.known
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < CACHE_TTL);
            if self.known.len() >= MAX_CACHED {
                self.known.clear();
            }
        }
        self.known.insert(key, (shared, now));
    }
}

impl ContactsCache {
    /// The cached answer for (viewer, user), if fresh.
    pub(crate) fn get(&self, viewer: &str, user: &str) -> Option<bool> {
        lock(&self.inner).get(&key(viewer, user), Instant::now())
    }

    pub(crate) fn put(&self, viewer: &str, user: &str, shared: bool) {
        lock(&self.inner).put(key(viewer, user), shared, Instant::now());
    }

    /// Cached entries (for tests and metrics).
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.inner).known.len()
    }

    /// Decide for a presence event to `session` that [`needs_check`]. When the
    /// answer is not cached the event is parked and a lookup started (once per key).
    pub(crate) fn visibility(
        shared: &Arc<Shared>,
        session: &Arc<Session>,
        presence: &UserPresence,
    ) -> Visibility {
        let cache = &shared.contacts;
        let key = key(&session.user_id, &presence.user_id);
        let mut inner = lock(&cache.inner);
        if let Some(known) = inner.get(&key, Instant::now()) {
            return Visibility::Known(known);
        }
        if let Some(waiting) = inner.pending.get_mut(&key) {
            // The newer event replaces this session's older one: presence events
            // carry the whole state.
            waiting.retain(|(s, _)| s.session_id != session.session_id);
            waiting.push((session.clone(), presence.clone()));
            return Visibility::Deferred;
        }
        if inner.pending.len() >= MAX_PENDING {
            return Visibility::Known(false);
        }
        inner
            .pending
            .insert(key.clone(), vec![(session.clone(), presence.clone())]);
        drop(inner);
        tokio::spawn(lookup_and_flush(shared.clone(), key));
        Visibility::Deferred
    }
}

/// Ask storage for one (viewer, user) pair, cache the answer and queue the events
/// that waited for it. A failed lookup is not cached; its events lose last_seen_ms.
async fn lookup_and_flush(shared: Arc<Shared>, key: Key) {
    let (viewer, user) = (&*key.0, &*key.1);
    let answer = shared
        .peers
        .storage
        .clone()
        .shared_contacts(v1::SharedContactsRequest {
            user_id: viewer.to_owned(),
            other_ids: vec![user.to_owned()],
        })
        .await;
    let visible = match answer {
        Ok(response) => Some(response.into_inner().shared.iter().any(|u| u == user)),
        Err(status) => {
            debug!(viewer, user, error = %status.message(), "shared contacts lookup failed");
            None
        }
    };
    let cache = &shared.contacts;
    // Queued under the cache lock, so an event delivered after the answer is cached
    // cannot overtake the ones that waited for it.
    let mut inner = lock(&cache.inner);
    if let Some(visible) = visible {
        inner.put(key.clone(), visible, Instant::now());
    }
    let waiting = inner.pending.remove(&key).unwrap_or_default();
    for (session, presence) in waiting {
        let presence = if visible == Some(true) {
            presence
        } else {
            hidden(&presence)
        };
        let frame = ServerFrame {
            event: Some(Event::Presence(v1::PresenceEvent {
                presence: Some(presence),
            })),
        };
        crate::deliver::push_ephemeral(&shared, &session, &frame);
    }
}

/// Clear `last_seen_ms` in `users` where `viewer` shares no conversation with the
/// user (one `SharedContacts` call for the answers not cached). A failed lookup
/// clears it.
pub(crate) async fn filter(shared: &Shared, viewer: &str, users: &mut [UserPresence]) {
    let mut unknown: Vec<String> = Vec::new();
    for presence in users.iter() {
        if needs_check(viewer, presence)
            && shared.contacts.get(viewer, &presence.user_id).is_none()
            && !unknown.contains(&presence.user_id)
        {
            unknown.push(presence.user_id.clone());
        }
    }
    let mut fetched: Option<Vec<String>> = None;
    if !unknown.is_empty() {
        let answer = shared
            .peers
            .storage
            .clone()
            .shared_contacts(v1::SharedContactsRequest {
                user_id: viewer.to_owned(),
                other_ids: unknown.clone(),
            })
            .await;
        match answer {
            Ok(response) => {
                let shared_ids = response.into_inner().shared;
                for user in &unknown {
                    shared.contacts.put(viewer, user, shared_ids.contains(user));
                }
                fetched = Some(shared_ids);
            }
            Err(status) => {
                debug!(viewer, error = %status.message(), "shared contacts lookup failed");
            }
        }
    }
    for presence in users.iter_mut() {
        if !needs_check(viewer, presence) {
            continue;
        }
        let visible = match shared.contacts.get(viewer, &presence.user_id) {
            Some(visible) => visible,
            None => fetched
                .as_ref()
                .is_some_and(|ids| ids.contains(&presence.user_id)),
        };
        if !visible {
            presence.last_seen_ms = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presence(user: &str, privacy: &str, last_seen_ms: i64) -> UserPresence {
        UserPresence {
            user_id: user.into(),
            status: "offline".into(),
            last_seen_ms,
            last_seen_privacy: privacy.into(),
            ..Default::default()
        }
    }

    #[test]
    fn only_contacts_privacy_of_others_is_checked() {
        assert!(needs_check("bob", &presence("alice", "contacts", 5)));
        assert!(!needs_check("alice", &presence("alice", "contacts", 5)));
        assert!(!needs_check("bob", &presence("alice", "everyone", 5)));
        assert!(!needs_check("bob", &presence("alice", "contacts", 0)));
        assert_eq!(hidden(&presence("alice", "contacts", 5)).last_seen_ms, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn answers_expire_after_the_ttl() {
        let cache = ContactsCache::default();
        cache.put("bob", "alice", true);
        cache.put("carol", "alice", false);
        assert_eq!(cache.get("bob", "alice"), Some(true));
        assert_eq!(cache.get("carol", "alice"), Some(false));
        assert_eq!(cache.get("alice", "bob"), None);
        tokio::time::advance(CACHE_TTL).await;
        assert_eq!(cache.get("bob", "alice"), None);
        assert_eq!(cache.len(), 2);
    }
}
