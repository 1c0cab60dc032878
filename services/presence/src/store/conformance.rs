//! The conformance suite every [`SessionStore`] backend passes.
//!
//! Each check is a generic async fn taking a factory `ttl -> store`; the
//! [`session_store_suite!`](crate::session_store_suite) macro turns them into tests for
//! one backend. Tests run on paused tokio time: a backend must take "now" from
//! [`Clock`](super::Clock) (tokio's clock) so that `tokio::time::advance` drives TTLs.

use std::sync::Arc;
use std::time::Duration;

use switchboard_proto::v1::GatewayRoute;

use super::{
    GatewayWatchers, NewSession, PresenceState, SessionStatus, SessionStore, StatusChange,
    StoreStats, INTEREST_TTL, LAST_SEEN_RETENTION, MAX_WATCHED_PER_WATCHER, PRIVACY_CONTACTS,
    PRIVACY_EVERYONE, PRIVACY_NOBODY, STATUS_AWAY, STATUS_BUSY, STATUS_INVISIBLE, STATUS_OFFLINE,
    STATUS_ONLINE,
};
use crate::error::PresenceError;

/// Session TTL used by the suite.
pub const TTL: Duration = Duration::from_secs(30);

/// Generate one `#[tokio::test]` per conformance check for the backend built by
/// `$factory` (an expression of type `Fn(Duration) -> Arc<dyn SessionStore>`).
#[macro_export]
#[doc(hidden)]
macro_rules! session_store_suite {
    ($factory:expr) => {
        $crate::session_store_suite!(@tests $factory;
            register_makes_user_online,
            unregister_makes_user_offline_and_keeps_last_seen,
            heartbeat_reports_unknown_and_foreign_sessions,
            heartbeat_updates_last_seen,
            sessions_expire_after_ttl_without_heartbeat,
            status_aggregates_across_devices,
            set_status_of_unknown_session_is_not_found,
            reregister_keeps_status_and_moves_gateway,
            session_id_of_another_user_is_rejected,
            query_reports_unknown_users_offline_once_each,
            route_groups_users_by_gateway,
            watch_requires_a_session_of_the_watcher_on_that_gateway,
            watches_are_dropped_with_the_watchers_last_session_on_a_gateway,
            watches_are_dropped_when_the_watcher_expires,
            watch_cap_rejects_without_adding,
            drop_gateway_removes_its_sessions_and_watches,
            stats_count_sessions_and_online_users,
            conversation_routes_equal_fresh_routes_and_are_cached,
            conversation_routes_see_a_member_on_a_new_gateway,
            conversation_routes_lose_a_gateway_with_its_last_member_session,
            conversation_routes_follow_expiry_and_dropped_gateways,
            conversation_routes_recompute_when_the_member_set_changes,
            conversation_routes_are_not_invalidated_by_other_changes,
            conversation_routes_expire_after_the_interest_ttl,
            status_aggregates_by_availability_across_all_statuses,
            invisible_users_look_offline_with_a_frozen_last_seen,
            a_visible_session_expiring_next_to_an_invisible_one_freezes_last_seen,
            only_public_changes_are_reported_by_expiry_and_dropped_gateways,
            status_text_and_privacy_are_per_user_and_outlive_sessions,
            status_text_privacy_and_status_change_together_or_not_at_all,
            automatic_status_never_overrides_the_users_choice,
            a_session_registered_invisible_never_shows_online,
            a_forgotten_session_registered_again_gets_the_status_it_had,
            the_epoch_is_fresh_once_and_stays_while_the_state_lives,
        );
    };
    (@tests $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(start_paused = true)]
            async fn $name() {
                let factory = $factory;
                $crate::store::conformance::$name(
                    |ttl| -> std::sync::Arc<dyn $crate::store::SessionStore> { factory(ttl) },
                )
                .await;
            }
        )*
    };
}

fn session(session_id: &str, user_id: &str, gateway_url: &str) -> NewSession {
    NewSession {
        session_id: session_id.into(),
        user_id: user_id.into(),
        device_id: format!("device-of-{session_id}"),
        gateway_url: gateway_url.into(),
        status: SessionStatus::Online,
        automatic: false,
    }
}

/// A session registered with an initial status.
fn session_as(
    session_id: &str,
    user_id: &str,
    gateway_url: &str,
    status: SessionStatus,
    automatic: bool,
) -> NewSession {
    NewSession {
        status,
        automatic,
        ..session(session_id, user_id, gateway_url)
    }
}

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A status the user chose.
fn explicit(status: SessionStatus) -> StatusChange {
    StatusChange {
        status: Some(status),
        ..Default::default()
    }
}

/// A status set by the gateway's idle timer.
fn automatic(status: SessionStatus) -> StatusChange {
    StatusChange {
        status: Some(status),
        automatic: true,
        ..Default::default()
    }
}

async fn presence(store: &dyn SessionStore, user: &str) -> PresenceState {
    store
        .query(&ids(&[user]))
        .await
        .expect("query")
        .pop()
        .expect("one entry per user")
}

async fn advance_ms(ms: u64) {
    tokio::time::advance(Duration::from_millis(ms)).await;
}

const GW1: &str = "http://gw1:50051";
const GW2: &str = "http://gw2:50051";

pub async fn register_makes_user_online<F: Fn(Duration) -> Arc<dyn SessionStore>>(factory: F) {
    let store = factory(TTL);
    let now = store.now_ms();
    let update = store.register(session("s1", "alice", GW1)).await.unwrap();
    assert!(update.changed);
    assert_eq!(update.presence.user_id, "alice");
    assert_eq!(update.presence.status, STATUS_ONLINE);
    assert_eq!(update.presence.sessions, 1);
    assert_eq!(update.presence.last_seen_ms, now);
    assert_eq!(presence(&*store, "alice").await, update.presence);

    let second = store.register(session("s2", "alice", GW2)).await.unwrap();
    assert!(
        !second.changed,
        "a second device does not change the status"
    );
    assert_eq!(second.presence.sessions, 2);
}

pub async fn unregister_makes_user_offline_and_keeps_last_seen<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("s1", "alice", GW1)).await.unwrap();
    advance_ms(5_000).await;
    let closed_at = store.now_ms();
    let update = store.unregister("s1").await.unwrap().expect("was live");
    assert!(update.changed);
    assert_eq!(update.presence.status, STATUS_OFFLINE);
    assert_eq!(update.presence.sessions, 0);
    assert_eq!(update.presence.last_seen_ms, closed_at);

    advance_ms(60_000).await;
    store.expire(store.now_ms()).await.unwrap();
    let later = presence(&*store, "alice").await;
    assert_eq!(later.status, STATUS_OFFLINE);
    assert_eq!(
        later.last_seen_ms, closed_at,
        "last seen survives going offline"
    );

    assert_eq!(store.unregister("s1").await.unwrap(), None, "idempotent");
    assert_eq!(store.unregister("never").await.unwrap(), None);
}

pub async fn heartbeat_reports_unknown_and_foreign_sessions<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("s1", "alice", GW1)).await.unwrap();
    store.register(session("s2", "bob", GW2)).await.unwrap();
    let unknown = store
        .heartbeat(GW1, &ids(&["s1", "ghost", "s2"]))
        .await
        .unwrap();
    assert_eq!(
        unknown,
        ids(&["ghost", "s2"]),
        "s2 lives on another gateway"
    );
    assert!(store.heartbeat(GW1, &[]).await.unwrap().is_empty());

    // A batch larger than one internal chunk.
    let many: Vec<String> = (0..1500).map(|i| format!("x{i}")).collect();
    for id in many.iter().step_by(2) {
        store.register(session(id, "carol", GW1)).await.unwrap();
    }
    let unknown = store.heartbeat(GW1, &many).await.unwrap();
    let expected: Vec<String> = many.iter().skip(1).step_by(2).cloned().collect();
    assert_eq!(unknown, expected);
}

pub async fn heartbeat_updates_last_seen<F: Fn(Duration) -> Arc<dyn SessionStore>>(factory: F) {
    let store = factory(TTL);
    store.register(session("s1", "alice", GW1)).await.unwrap();
    advance_ms(10_000).await;
    let beat_at = store.now_ms();
    store.heartbeat(GW1, &ids(&["s1"])).await.unwrap();
    assert_eq!(presence(&*store, "alice").await.last_seen_ms, beat_at);

    // Expiry keeps the last time the session was seen alive, not the expiry time.
    advance_ms(TTL.as_millis() as u64).await;
    let changed = store.expire(store.now_ms()).await.unwrap();
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].status, STATUS_OFFLINE);
    assert_eq!(changed[0].last_seen_ms, beat_at);
    assert_eq!(presence(&*store, "alice").await.last_seen_ms, beat_at);
}

pub async fn sessions_expire_after_ttl_without_heartbeat<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("s1", "alice", GW1)).await.unwrap();
    store.register(session("s2", "bob", GW1)).await.unwrap();

    advance_ms(20_000).await;
    assert!(store
        .heartbeat(GW1, &ids(&["s1"]))
        .await
        .unwrap()
        .is_empty());
    advance_ms(9_999).await;
    assert!(
        store.expire(store.now_ms()).await.unwrap().is_empty(),
        "nothing is due before the TTL"
    );

    advance_ms(1).await; // bob's session is now TTL old; alice's was heartbeated
    let changed = store.expire(store.now_ms()).await.unwrap();
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].user_id, "bob");
    assert_eq!(changed[0].status, STATUS_OFFLINE);
    assert_eq!(presence(&*store, "alice").await.status, STATUS_ONLINE);
    assert_eq!(
        store.heartbeat(GW1, &ids(&["s2"])).await.unwrap(),
        ids(&["s2"])
    );

    advance_ms(20_000).await; // alice's deadline: heartbeat at 20 s + TTL
    let changed = store.expire(store.now_ms()).await.unwrap();
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].user_id, "alice");
    assert!(store.expire(store.now_ms()).await.unwrap().is_empty());
    assert!(store
        .route(&ids(&["alice", "bob"]))
        .await
        .unwrap()
        .is_empty());
}

pub async fn status_aggregates_across_devices<F: Fn(Duration) -> Arc<dyn SessionStore>>(
    factory: F,
) {
    let store = factory(TTL);
    store
        .register(session("phone", "alice", GW1))
        .await
        .unwrap();
    store
        .register(session("laptop", "alice", GW2))
        .await
        .unwrap();

    let u = store
        .set_status("phone", &explicit(SessionStatus::Away))
        .await
        .unwrap();
    assert_eq!(
        (u.presence.status.as_str(), u.changed),
        (STATUS_ONLINE, false)
    );
    let u = store
        .set_status("laptop", &explicit(SessionStatus::Away))
        .await
        .unwrap();
    assert_eq!((u.presence.status.as_str(), u.changed), (STATUS_AWAY, true));
    assert_eq!(u.presence.sessions, 2);
    let u = store
        .set_status("laptop", &explicit(SessionStatus::Away))
        .await
        .unwrap();
    assert!(!u.changed, "same status again is no change");
    let u = store
        .set_status("phone", &explicit(SessionStatus::Online))
        .await
        .unwrap();
    assert_eq!(
        (u.presence.status.as_str(), u.changed),
        (STATUS_ONLINE, true)
    );

    let u = store.unregister("phone").await.unwrap().unwrap();
    assert_eq!((u.presence.status.as_str(), u.changed), (STATUS_AWAY, true));
    assert_eq!(u.presence.sessions, 1);
    let u = store.unregister("laptop").await.unwrap().unwrap();
    assert_eq!(
        (u.presence.status.as_str(), u.changed),
        (STATUS_OFFLINE, true)
    );

    // Expiry of several devices at once reports the user once, with the final status.
    store.register(session("a", "bob", GW1)).await.unwrap();
    store.register(session("b", "bob", GW1)).await.unwrap();
    store
        .set_status("b", &explicit(SessionStatus::Away))
        .await
        .unwrap();
    advance_ms(TTL.as_millis() as u64).await;
    let changed = store.expire(store.now_ms()).await.unwrap();
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].status, STATUS_OFFLINE);
}

pub async fn set_status_of_unknown_session_is_not_found<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    let err = store
        .set_status("ghost", &explicit(SessionStatus::Away))
        .await
        .unwrap_err();
    assert!(matches!(err, PresenceError::NotFound(_)), "{err:?}");
}

pub async fn reregister_keeps_status_and_moves_gateway<F: Fn(Duration) -> Arc<dyn SessionStore>>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("s1", "alice", GW1)).await.unwrap();
    store
        .set_status("s1", &explicit(SessionStatus::Away))
        .await
        .unwrap();
    advance_ms(20_000).await;
    let u = store.register(session("s1", "alice", GW1)).await.unwrap();
    assert_eq!(
        (u.presence.status.as_str(), u.changed),
        (STATUS_AWAY, false)
    );
    assert_eq!(u.presence.sessions, 1);

    // Re-registering refreshed the deadline.
    advance_ms(20_000).await;
    assert!(store.expire(store.now_ms()).await.unwrap().is_empty());

    let u = store.register(session("s1", "alice", GW2)).await.unwrap();
    assert_eq!(u.presence.sessions, 1);
    assert_eq!(
        store.route(&ids(&["alice"])).await.unwrap(),
        vec![GatewayRoute {
            gateway_addr: GW2.into(),
            user_ids: ids(&["alice"]),
        }]
    );
    assert_eq!(
        store.heartbeat(GW1, &ids(&["s1"])).await.unwrap(),
        ids(&["s1"])
    );
    assert!(store
        .heartbeat(GW2, &ids(&["s1"]))
        .await
        .unwrap()
        .is_empty());
}

pub async fn session_id_of_another_user_is_rejected<F: Fn(Duration) -> Arc<dyn SessionStore>>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("s1", "alice", GW1)).await.unwrap();
    let err = store
        .register(session("s1", "mallory", GW1))
        .await
        .unwrap_err();
    assert!(matches!(err, PresenceError::InvalidRequest(_)), "{err:?}");
    assert_eq!(presence(&*store, "mallory").await.status, STATUS_OFFLINE);
    assert_eq!(presence(&*store, "alice").await.sessions, 1);
}

pub async fn query_reports_unknown_users_offline_once_each<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("s1", "alice", GW1)).await.unwrap();
    let got = store
        .query(&ids(&["nobody", "alice", "nobody"]))
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[0],
        PresenceState {
            user_id: "nobody".into(),
            status: STATUS_OFFLINE.into(),
            last_seen_ms: 0,
            sessions: 0,
            status_text: String::new(),
            last_seen_privacy: PRIVACY_EVERYONE.into(),
            visible_seen_ms: 0,
        }
    );
    assert_eq!(got[1].user_id, "alice");
    assert_eq!(got[1].status, STATUS_ONLINE);
}

pub async fn route_groups_users_by_gateway<F: Fn(Duration) -> Arc<dyn SessionStore>>(factory: F) {
    let store = factory(TTL);
    store.register(session("a1", "alice", GW1)).await.unwrap();
    store.register(session("a2", "alice", GW2)).await.unwrap();
    store.register(session("b1", "bob", GW1)).await.unwrap();
    store.register(session("c1", "carol", GW2)).await.unwrap();
    store.register(session("c2", "carol", GW2)).await.unwrap();
    let routes = store
        .route(&ids(&["carol", "alice", "bob", "dave", "alice"]))
        .await
        .unwrap();
    assert_eq!(
        routes,
        vec![
            GatewayRoute {
                gateway_addr: GW1.into(),
                user_ids: ids(&["alice", "bob"]),
            },
            GatewayRoute {
                gateway_addr: GW2.into(),
                user_ids: ids(&["carol", "alice"]),
            },
        ]
    );
}

pub async fn watch_requires_a_session_of_the_watcher_on_that_gateway<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    let err = store.watch(GW1, "alice", &ids(&["bob"])).await.unwrap_err();
    assert!(matches!(err, PresenceError::NotFound(_)), "{err:?}");
    store.register(session("s1", "alice", GW2)).await.unwrap();
    let err = store.watch(GW1, "alice", &ids(&["bob"])).await.unwrap_err();
    assert!(matches!(err, PresenceError::NotFound(_)), "{err:?}");
    assert!(store.watchers_of("bob").await.unwrap().is_empty());

    store
        .watch(GW2, "alice", &ids(&["bob", "bob"]))
        .await
        .unwrap();
    assert_eq!(
        store.watchers_of("bob").await.unwrap(),
        vec![GatewayWatchers {
            gateway_url: GW2.into(),
            watcher_ids: ids(&["alice"]),
        }]
    );
}

pub async fn watches_are_dropped_with_the_watchers_last_session_on_a_gateway<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("a1", "alice", GW1)).await.unwrap();
    store.register(session("a2", "alice", GW1)).await.unwrap();
    store.register(session("a3", "alice", GW2)).await.unwrap();
    store.register(session("c1", "carol", GW1)).await.unwrap();
    store.watch(GW1, "alice", &ids(&["bob"])).await.unwrap();
    store.watch(GW2, "alice", &ids(&["bob"])).await.unwrap();
    store.watch(GW1, "carol", &ids(&["bob"])).await.unwrap();
    assert_eq!(
        store.watchers_of("bob").await.unwrap(),
        vec![
            GatewayWatchers {
                gateway_url: GW1.into(),
                watcher_ids: ids(&["alice", "carol"]),
            },
            GatewayWatchers {
                gateway_url: GW2.into(),
                watcher_ids: ids(&["alice"]),
            },
        ]
    );

    // Refreshing a session on the same gateway keeps its watches.
    store.register(session("a1", "alice", GW1)).await.unwrap();
    store.unregister("a1").await.unwrap();
    assert_eq!(
        store.watchers_of("bob").await.unwrap().len(),
        2,
        "a2 still on GW1"
    );
    store.unregister("a2").await.unwrap();
    assert_eq!(
        store.watchers_of("bob").await.unwrap(),
        vec![
            GatewayWatchers {
                gateway_url: GW1.into(),
                watcher_ids: ids(&["carol"]),
            },
            GatewayWatchers {
                gateway_url: GW2.into(),
                watcher_ids: ids(&["alice"]),
            },
        ]
    );

    // Moving the last session off a gateway drops the watches held through it.
    store.register(session("c1", "carol", GW2)).await.unwrap();
    store.unregister("a3").await.unwrap();
    assert!(store.watchers_of("bob").await.unwrap().is_empty());
}

pub async fn watches_are_dropped_when_the_watcher_expires<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("a1", "alice", GW1)).await.unwrap();
    store
        .watch(GW1, "alice", &ids(&["bob", "carol"]))
        .await
        .unwrap();
    assert_eq!(store.watchers_of("carol").await.unwrap().len(), 1);
    advance_ms(TTL.as_millis() as u64).await;
    store.expire(store.now_ms()).await.unwrap();
    assert!(store.watchers_of("bob").await.unwrap().is_empty());
    assert!(store.watchers_of("carol").await.unwrap().is_empty());

    // A new session starts with no watches, and the cap starts from zero again.
    store.register(session("a2", "alice", GW1)).await.unwrap();
    assert!(store.watchers_of("bob").await.unwrap().is_empty());
    let many: Vec<String> = (0..MAX_WATCHED_PER_WATCHER)
        .map(|i| format!("u{i}"))
        .collect();
    store.watch(GW1, "alice", &many).await.unwrap();
}

pub async fn watch_cap_rejects_without_adding<F: Fn(Duration) -> Arc<dyn SessionStore>>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("a1", "alice", GW1)).await.unwrap();
    let many: Vec<String> = (0..MAX_WATCHED_PER_WATCHER)
        .map(|i| format!("u{i}"))
        .collect();
    store.watch(GW1, "alice", &many[..10]).await.unwrap();
    store.watch(GW1, "alice", &many).await.unwrap();
    store
        .watch(GW1, "alice", &ids(&["u0", "u1"]))
        .await
        .expect("re-watching watched users adds nothing");

    let err = store
        .watch(GW1, "alice", &ids(&["u0", "extra"]))
        .await
        .unwrap_err();
    assert!(matches!(err, PresenceError::InvalidRequest(_)), "{err:?}");
    assert!(store.watchers_of("extra").await.unwrap().is_empty());

    // The cap is per watcher and gateway.
    store.register(session("c1", "carol", GW1)).await.unwrap();
    store.watch(GW1, "carol", &ids(&["extra"])).await.unwrap();
}

pub async fn drop_gateway_removes_its_sessions_and_watches<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("a1", "alice", GW1)).await.unwrap();
    store.register(session("a2", "alice", GW2)).await.unwrap();
    store.register(session("b1", "bob", GW1)).await.unwrap();
    store.register(session("c1", "carol", GW1)).await.unwrap();
    store.register(session("e1", "erin", GW2)).await.unwrap();
    store.watch(GW1, "carol", &ids(&["alice"])).await.unwrap();
    store.watch(GW2, "erin", &ids(&["bob"])).await.unwrap();
    for i in 0..1200 {
        store
            .register(session(&format!("m{i}"), &format!("many{}", i % 7), GW1))
            .await
            .unwrap();
    }
    advance_ms(1_000).await;
    let dropped_at = store.now_ms();

    let outcome = store.drop_gateway(GW1).await.unwrap();
    assert_eq!(outcome.sessions, 1203);
    let mut changed: Vec<&str> = outcome.changed.iter().map(|p| p.user_id.as_str()).collect();
    changed.sort();
    let mut expected = vec!["bob", "carol"];
    let many: Vec<String> = (0..7).map(|i| format!("many{i}")).collect();
    expected.extend(many.iter().map(String::as_str));
    expected.sort();
    assert_eq!(changed, expected, "alice stays online on GW2");
    for p in &outcome.changed {
        assert_eq!(p.status, STATUS_OFFLINE);
        assert_eq!(p.last_seen_ms, dropped_at);
    }

    assert!(store.watchers_of("alice").await.unwrap().is_empty());
    assert_eq!(
        store.watchers_of("bob").await.unwrap(),
        vec![GatewayWatchers {
            gateway_url: GW2.into(),
            watcher_ids: ids(&["erin"]),
        }]
    );
    assert_eq!(
        store.route(&ids(&["alice", "bob"])).await.unwrap(),
        vec![GatewayRoute {
            gateway_addr: GW2.into(),
            user_ids: ids(&["alice"]),
        }]
    );
    assert_eq!(store.drop_gateway(GW1).await.unwrap().sessions, 0);
    assert_eq!(
        store.heartbeat(GW1, &ids(&["b1"])).await.unwrap(),
        ids(&["b1"])
    );
}

pub async fn stats_count_sessions_and_online_users<F: Fn(Duration) -> Arc<dyn SessionStore>>(
    factory: F,
) {
    let store = factory(TTL);
    assert_eq!(store.stats().await.unwrap(), StoreStats::default());
    store.register(session("a1", "alice", GW1)).await.unwrap();
    store.register(session("a2", "alice", GW2)).await.unwrap();
    store.register(session("b1", "bob", GW1)).await.unwrap();
    assert_eq!(
        store.stats().await.unwrap(),
        StoreStats {
            sessions: 3,
            online_users: 2,
        }
    );
    store.unregister("b1").await.unwrap();
    assert_eq!(
        store.stats().await.unwrap(),
        StoreStats {
            sessions: 2,
            online_users: 1,
        }
    );
}

pub async fn the_epoch_is_fresh_once_and_stays_while_the_state_lives<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    let first = store.epoch().await.unwrap();
    assert!(first.fresh, "a new store's first epoch is fresh");
    assert!(!first.id.is_empty());
    store.register(session("a1", "alice", GW1)).await.unwrap();
    store.unregister("a1").await.unwrap();
    let again = store.epoch().await.unwrap();
    assert_eq!(again.id, first.id, "operations keep the epoch");
    assert!(
        !again.fresh,
        "only the call that made the epoch sees it fresh"
    );
    let other = factory(TTL).epoch().await.unwrap();
    assert_ne!(
        other.id, first.id,
        "another store's state has another epoch"
    );
}

/// `route` with users sorted per gateway: what `route_conversation` must answer.
async fn fresh_routes(store: &dyn SessionStore, members: &[String]) -> Vec<GatewayRoute> {
    let mut routes = store.route(members).await.expect("route");
    for route in &mut routes {
        route.user_ids.sort();
    }
    routes
}

/// Conversation routes, and whether they came from the cache.
async fn conv_routes(
    store: &dyn SessionStore,
    conversation: &str,
    members: &[String],
) -> (Vec<GatewayRoute>, bool) {
    let answer = store
        .route_conversation(conversation, members)
        .await
        .expect("route_conversation");
    (answer.routes, answer.cached)
}

fn route(gateway: &str, users: &[&str]) -> GatewayRoute {
    GatewayRoute {
        gateway_addr: gateway.into(),
        user_ids: ids(users),
    }
}

const GW3: &str = "http://gw3:50051";

pub async fn conversation_routes_equal_fresh_routes_and_are_cached<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("a1", "alice", GW1)).await.unwrap();
    store.register(session("a2", "alice", GW2)).await.unwrap();
    store.register(session("b1", "bob", GW1)).await.unwrap();
    store.register(session("b2", "bob", GW1)).await.unwrap();
    store.register(session("c1", "carol", GW2)).await.unwrap();
    store
        .register(session("x1", "outsider", GW3))
        .await
        .unwrap();
    let members = ids(&["carol", "dave", "bob", "alice", "bob"]);
    let expected = vec![
        route(GW1, &["alice", "bob"]),
        route(GW2, &["alice", "carol"]),
    ];
    assert_eq!(fresh_routes(&*store, &members).await, expected);

    let (routes, cached) = conv_routes(&*store, "conv", &members).await;
    assert_eq!(
        (routes, cached),
        (expected.clone(), false),
        "first call computes"
    );
    let (routes, cached) = conv_routes(&*store, "conv", &members).await;
    assert_eq!(
        (routes, cached),
        (expected.clone(), true),
        "second call is cached"
    );
    // The same set in another order is the same entry.
    let reordered = ids(&["bob", "alice", "dave", "carol", "bob"]);
    let (routes, cached) = conv_routes(&*store, "conv", &reordered).await;
    assert_eq!((routes, cached), (expected, true));

    // A conversation with nobody online is cached too, as no routes.
    let offline = ids(&["dave", "erin"]);
    assert_eq!(
        conv_routes(&*store, "quiet", &offline).await,
        (Vec::new(), false)
    );
    assert_eq!(
        conv_routes(&*store, "quiet", &offline).await,
        (Vec::new(), true)
    );
    assert_eq!(conv_routes(&*store, "empty", &[]).await.0, Vec::new());
}

pub async fn conversation_routes_see_a_member_on_a_new_gateway<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("a1", "alice", GW1)).await.unwrap();
    let members = ids(&["alice", "bob", "carol"]);
    conv_routes(&*store, "conv", &members).await;
    assert!(conv_routes(&*store, "conv", &members).await.1);

    // An offline member comes online.
    store.register(session("b1", "bob", GW2)).await.unwrap();
    let (routes, cached) = conv_routes(&*store, "conv", &members).await;
    assert!(!cached, "the entry was dropped when bob's gateways changed");
    assert_eq!(routes, vec![route(GW1, &["alice"]), route(GW2, &["bob"])]);
    assert_eq!(routes, fresh_routes(&*store, &members).await);

    // An online member opens a session on another gateway.
    store.register(session("a2", "alice", GW3)).await.unwrap();
    let (routes, cached) = conv_routes(&*store, "conv", &members).await;
    assert!(!cached);
    assert_eq!(
        routes,
        vec![
            route(GW1, &["alice"]),
            route(GW2, &["bob"]),
            route(GW3, &["alice"])
        ]
    );

    // A session that moves to another gateway (registered again there).
    assert!(conv_routes(&*store, "conv", &members).await.1);
    store.register(session("b1", "bob", GW1)).await.unwrap();
    let (routes, cached) = conv_routes(&*store, "conv", &members).await;
    assert!(!cached);
    assert_eq!(
        routes,
        vec![route(GW1, &["alice", "bob"]), route(GW3, &["alice"])]
    );
    assert_eq!(routes, fresh_routes(&*store, &members).await);
}

pub async fn conversation_routes_lose_a_gateway_with_its_last_member_session<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("a1", "alice", GW1)).await.unwrap();
    store.register(session("b1", "bob", GW2)).await.unwrap();
    store.register(session("b2", "bob", GW2)).await.unwrap();
    let members = ids(&["alice", "bob"]);
    conv_routes(&*store, "conv", &members).await;

    // One of two sessions on a gateway leaving changes no route: still cached.
    store.unregister("b1").await.unwrap();
    let (routes, cached) = conv_routes(&*store, "conv", &members).await;
    assert!(cached, "bob still has a session on GW2");
    assert_eq!(routes, vec![route(GW1, &["alice"]), route(GW2, &["bob"])]);

    // The last one leaving removes the gateway.
    store.unregister("b2").await.unwrap();
    let (routes, cached) = conv_routes(&*store, "conv", &members).await;
    assert!(!cached);
    assert_eq!(routes, vec![route(GW1, &["alice"])]);
    assert_eq!(routes, fresh_routes(&*store, &members).await);
}

pub async fn conversation_routes_follow_expiry_and_dropped_gateways<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("a1", "alice", GW1)).await.unwrap();
    store.register(session("b1", "bob", GW2)).await.unwrap();
    store.register(session("c1", "carol", GW3)).await.unwrap();
    let members = ids(&["alice", "bob", "carol"]);
    conv_routes(&*store, "conv", &members).await;

    // bob's session expires (the others are heartbeated).
    advance_ms(TTL.as_millis() as u64 / 2).await;
    store.heartbeat(GW1, &ids(&["a1"])).await.unwrap();
    store.heartbeat(GW3, &ids(&["c1"])).await.unwrap();
    assert!(
        conv_routes(&*store, "conv", &members).await.1,
        "heartbeats change no route"
    );
    advance_ms(TTL.as_millis() as u64 / 2).await;
    store.expire(store.now_ms()).await.unwrap();
    let (routes, cached) = conv_routes(&*store, "conv", &members).await;
    assert!(!cached);
    assert_eq!(routes, vec![route(GW1, &["alice"]), route(GW3, &["carol"])]);

    // GW1 is dropped.
    store.drop_gateway(GW1).await.unwrap();
    let (routes, cached) = conv_routes(&*store, "conv", &members).await;
    assert!(!cached);
    assert_eq!(routes, vec![route(GW3, &["carol"])]);
    assert_eq!(routes, fresh_routes(&*store, &members).await);
}

pub async fn conversation_routes_recompute_when_the_member_set_changes<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("a1", "alice", GW1)).await.unwrap();
    store.register(session("b1", "bob", GW2)).await.unwrap();
    store.register(session("c1", "carol", GW3)).await.unwrap();
    let before = ids(&["alice", "bob"]);
    conv_routes(&*store, "conv", &before).await;
    assert!(conv_routes(&*store, "conv", &before).await.1);

    // carol joins: her gateway appears although nothing about sessions changed.
    let joined = ids(&["alice", "bob", "carol"]);
    let (routes, cached) = conv_routes(&*store, "conv", &joined).await;
    assert!(!cached);
    assert_eq!(routes, fresh_routes(&*store, &joined).await);
    assert_eq!(routes.len(), 3);

    // bob leaves: he is not routed to any more.
    let left = ids(&["alice", "carol"]);
    let (routes, cached) = conv_routes(&*store, "conv", &left).await;
    assert!(!cached);
    assert_eq!(routes, vec![route(GW1, &["alice"]), route(GW3, &["carol"])]);

    // The entry now follows the new member set: a gateway change of carol (who
    // joined after the first computation) invalidates it. (A former member's change
    // may invalidate it too: a backend may keep stale reverse entries until they
    // expire, which costs a recomputation, never a wrong answer.)
    assert!(conv_routes(&*store, "conv", &left).await.1);
    store.register(session("c2", "carol", GW1)).await.unwrap();
    let (routes, cached) = conv_routes(&*store, "conv", &left).await;
    assert!(!cached);
    assert_eq!(
        routes,
        vec![route(GW1, &["alice", "carol"]), route(GW3, &["carol"])]
    );
}

pub async fn conversation_routes_are_not_invalidated_by_other_changes<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("a1", "alice", GW1)).await.unwrap();
    store.register(session("b1", "bob", GW2)).await.unwrap();
    let first = ids(&["alice", "carol"]);
    let second = ids(&["bob", "dave"]);
    conv_routes(&*store, "first", &first).await;
    conv_routes(&*store, "second", &second).await;

    // Status changes do not change routes.
    store
        .set_status("a1", &explicit(SessionStatus::Away))
        .await
        .unwrap();
    store
        .set_status("a1", &explicit(SessionStatus::Online))
        .await
        .unwrap();
    assert!(conv_routes(&*store, "first", &first).await.1);
    // A refresh of a session on the same gateway does not either.
    store.register(session("a1", "alice", GW1)).await.unwrap();
    assert!(conv_routes(&*store, "first", &first).await.1);
    // A member of another conversation coming online leaves this one cached.
    store.register(session("d1", "dave", GW3)).await.unwrap();
    assert!(conv_routes(&*store, "first", &first).await.1);
    let (routes, cached) = conv_routes(&*store, "second", &second).await;
    assert!(!cached);
    assert_eq!(routes, vec![route(GW2, &["bob"]), route(GW3, &["dave"])]);
    // A watch is no route change either.
    store.watch(GW1, "alice", &ids(&["bob"])).await.unwrap();
    assert!(conv_routes(&*store, "first", &first).await.1);
}

pub async fn conversation_routes_expire_after_the_interest_ttl<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    // Sessions outlive the interest TTL here, so only the entry's age matters.
    let store = factory(INTEREST_TTL * 10);
    store.register(session("a1", "alice", GW1)).await.unwrap();
    let members = ids(&["alice"]);
    conv_routes(&*store, "conv", &members).await;
    advance_ms(INTEREST_TTL.as_millis() as u64 - 1).await;
    assert!(conv_routes(&*store, "conv", &members).await.1);
    advance_ms(1).await;
    store.expire(store.now_ms()).await.unwrap();
    let (routes, cached) = conv_routes(&*store, "conv", &members).await;
    assert!(
        !cached,
        "an entry answers for INTEREST_TTL after it was computed, hits or not"
    );
    assert_eq!(routes, vec![route(GW1, &["alice"])]);
    assert!(conv_routes(&*store, "conv", &members).await.1);
}

fn text(t: &str) -> StatusChange {
    StatusChange {
        status_text: Some(t.into()),
        ..Default::default()
    }
}

fn privacy(p: &str) -> StatusChange {
    StatusChange {
        last_seen_privacy: Some(p.into()),
        ..Default::default()
    }
}

pub async fn status_aggregates_by_availability_across_all_statuses<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    use SessionStatus::{Away, Busy, Invisible, Online};
    let store = factory(TTL);
    store.register(session("s1", "alice", GW1)).await.unwrap();
    store.register(session("s2", "alice", GW2)).await.unwrap();
    store.register(session("s3", "alice", GW1)).await.unwrap();
    // (session, status, aggregate after, public view changed)
    let steps = [
        ("s1", Invisible, STATUS_ONLINE, false),
        ("s2", Busy, STATUS_ONLINE, false),
        ("s3", Away, STATUS_AWAY, true),
        ("s3", Busy, STATUS_BUSY, true),
        ("s2", Invisible, STATUS_BUSY, false),
        ("s3", Invisible, STATUS_INVISIBLE, true),
        ("s2", Busy, STATUS_BUSY, true),
        ("s1", Away, STATUS_AWAY, true),
        ("s3", Online, STATUS_ONLINE, true),
    ];
    for (sid, status, aggregate, changed) in steps {
        let u = store.set_status(sid, &explicit(status)).await.unwrap();
        assert_eq!(
            (u.presence.status.as_str(), u.changed),
            (aggregate, changed),
            "{sid} -> {status:?}"
        );
        assert_eq!(u.presence.sessions, 3);
        assert_eq!(presence(&*store, "alice").await, u.presence);
    }
    // The aggregate follows sessions leaving too.
    let u = store.unregister("s3").await.unwrap().unwrap();
    assert_eq!((u.presence.status.as_str(), u.changed), (STATUS_AWAY, true));
    store.set_status("s2", &explicit(Invisible)).await.unwrap();
    let u = store.set_status("s1", &explicit(Invisible)).await.unwrap();
    assert_eq!(
        (u.presence.status.as_str(), u.changed),
        (STATUS_INVISIBLE, true)
    );
    let u = store.unregister("s2").await.unwrap().unwrap();
    assert_eq!(
        (u.presence.status.as_str(), u.changed, u.presence.sessions),
        (STATUS_INVISIBLE, false, 1),
        "one invisible device less is invisible to others"
    );
}

pub async fn invisible_users_look_offline_with_a_frozen_last_seen<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("s1", "alice", GW1)).await.unwrap();
    advance_ms(1_000).await;
    let beat = store.now_ms();
    store.heartbeat(GW1, &ids(&["s1"])).await.unwrap();
    advance_ms(1_000).await;
    let hidden_at = store.now_ms();
    let u = store
        .set_status("s1", &explicit(SessionStatus::Invisible))
        .await
        .unwrap();
    assert!(u.changed, "others see alice go offline");
    assert_eq!(u.presence.status, STATUS_INVISIBLE);
    let own = u.presence.true_view();
    assert_eq!(
        (own.status.as_str(), own.sessions, own.last_seen_ms),
        (STATUS_INVISIBLE, 1, beat)
    );
    let public = u.presence.public_view();
    assert_eq!(
        (public.status.as_str(), public.sessions, public.last_seen_ms),
        (STATUS_OFFLINE, 0, hidden_at)
    );

    // Heartbeats while invisible do not move what others see.
    advance_ms(1_000).await;
    store.heartbeat(GW1, &ids(&["s1"])).await.unwrap();
    let state = presence(&*store, "alice").await;
    assert_eq!(state.true_view().last_seen_ms, store.now_ms());
    assert_eq!(state.public_view(), public);
    assert_eq!(state.view_for("bob"), public);
    assert_eq!(state.view_for("alice"), state.true_view());
    assert_eq!(
        store.route(&ids(&["alice"])).await.unwrap(),
        vec![route(GW1, &["alice"])],
        "an invisible user still gets messages"
    );

    // Going offline while invisible changes nothing others can see.
    advance_ms(1_000).await;
    let closed_at = store.now_ms();
    let u = store.unregister("s1").await.unwrap().unwrap();
    assert!(!u.changed, "invisible -> offline is no public change");
    assert_eq!(u.presence.status, STATUS_OFFLINE);
    assert_eq!(u.presence.true_view().last_seen_ms, closed_at);
    assert_eq!(
        u.presence.public_view(),
        public,
        "the close time stays hidden"
    );
    assert_eq!(presence(&*store, "alice").await.public_view(), public);

    // Back online: visible again, with the current last seen.
    advance_ms(1_000).await;
    let back = store.now_ms();
    let u = store.register(session("s2", "alice", GW1)).await.unwrap();
    assert!(u.changed);
    let public = u.presence.public_view();
    assert_eq!(
        (public.status.as_str(), public.sessions, public.last_seen_ms),
        (STATUS_ONLINE, 1, back)
    );
    // Leaving while visible: others see the close time.
    advance_ms(1_000).await;
    let left = store.now_ms();
    let u = store.unregister("s2").await.unwrap().unwrap();
    assert!(u.changed);
    assert_eq!(u.presence.public_view().last_seen_ms, left);
    assert_eq!(u.presence.true_view().last_seen_ms, left);
}

pub async fn a_visible_session_expiring_next_to_an_invisible_one_freezes_last_seen<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    let start = store.now_ms();
    store
        .register(session("laptop", "alice", GW1))
        .await
        .unwrap();
    store
        .register(session("phone", "alice", GW2))
        .await
        .unwrap();
    store
        .set_status("phone", &explicit(SessionStatus::Invisible))
        .await
        .unwrap();
    advance_ms(10_000).await;
    store.heartbeat(GW2, &ids(&["phone"])).await.unwrap();
    advance_ms(TTL.as_millis() as u64 - 10_000).await;
    let changed = store.expire(store.now_ms()).await.unwrap();
    assert_eq!(changed.len(), 1, "others see alice go offline");
    let state = &changed[0];
    assert_eq!(
        (state.status.as_str(), state.sessions),
        (STATUS_INVISIBLE, 1)
    );
    let public = state.public_view();
    assert_eq!(
        (public.status.as_str(), public.sessions, public.last_seen_ms),
        (STATUS_OFFLINE, 0, start),
        "last visible moment: the laptop's last sign of life"
    );
    assert_eq!(state.true_view().last_seen_ms, start + 10_000);
}

pub async fn only_public_changes_are_reported_by_expiry_and_dropped_gateways<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("a1", "alice", GW1)).await.unwrap();
    store.register(session("b1", "bob", GW1)).await.unwrap();
    store
        .set_status("a1", &explicit(SessionStatus::Invisible))
        .await
        .unwrap();
    let outcome = store.drop_gateway(GW1).await.unwrap();
    assert_eq!(outcome.sessions, 2);
    let changed: Vec<&str> = outcome.changed.iter().map(|p| p.user_id.as_str()).collect();
    assert_eq!(
        changed,
        vec!["bob"],
        "invisible alice was offline to others"
    );
    assert_eq!(presence(&*store, "alice").await.status, STATUS_OFFLINE);

    store.register(session("a2", "alice", GW2)).await.unwrap();
    store
        .set_status("a2", &explicit(SessionStatus::Invisible))
        .await
        .unwrap();
    store.register(session("c1", "carol", GW2)).await.unwrap();
    advance_ms(TTL.as_millis() as u64).await;
    let changed = store.expire(store.now_ms()).await.unwrap();
    let changed: Vec<&str> = changed.iter().map(|p| p.user_id.as_str()).collect();
    assert_eq!(changed, vec!["carol"]);
    assert_eq!(presence(&*store, "alice").await.status, STATUS_OFFLINE);
}

pub async fn status_text_and_privacy_are_per_user_and_outlive_sessions<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("s1", "alice", GW1)).await.unwrap();
    store.register(session("s2", "alice", GW2)).await.unwrap();
    let fresh = presence(&*store, "alice").await;
    assert_eq!(
        (fresh.status_text.as_str(), fresh.last_seen_privacy.as_str()),
        ("", PRIVACY_EVERYONE)
    );

    let u = store.set_status("s1", &text("in a meeting")).await.unwrap();
    assert!(u.changed);
    assert_eq!(u.presence.status_text, "in a meeting");
    assert_eq!(u.presence.status, STATUS_ONLINE, "status untouched");
    assert_eq!(u.presence.public_view().status_text, "in a meeting");
    let again = store.set_status("s2", &text("in a meeting")).await.unwrap();
    assert!(!again.changed, "the same text through another device");

    let u = store
        .set_status("s2", &privacy(PRIVACY_NOBODY))
        .await
        .unwrap();
    assert!(u.changed);
    assert_eq!(u.presence.last_seen_privacy, PRIVACY_NOBODY);
    assert_eq!(u.presence.public_view().last_seen_ms, 0);
    assert_eq!(u.presence.true_view().last_seen_ms, store.now_ms());
    let u = store
        .set_status("s2", &privacy(PRIVACY_CONTACTS))
        .await
        .unwrap();
    assert!(u.changed);
    assert_eq!(
        u.presence.public_view().last_seen_ms,
        store.now_ms(),
        "contacts is filtered by the gateway"
    );
    store
        .set_status("s1", &privacy(PRIVACY_NOBODY))
        .await
        .unwrap();

    // Settings outlive the sessions.
    store.unregister("s1").await.unwrap();
    advance_ms(1_000).await;
    let u = store.unregister("s2").await.unwrap().unwrap();
    assert_eq!(u.presence.status_text, "in a meeting");
    assert_eq!(u.presence.last_seen_privacy, PRIVACY_NOBODY);
    let offline = presence(&*store, "alice").await;
    assert_eq!(offline.status, STATUS_OFFLINE);
    assert_eq!(
        offline.public_view().last_seen_ms,
        0,
        "hidden while offline"
    );
    assert!(offline.true_view().last_seen_ms > 0);
    advance_ms(LAST_SEEN_RETENTION.as_millis() as u64 + 1).await;
    store.expire(store.now_ms()).await.unwrap();
    let u = store.register(session("s3", "alice", GW1)).await.unwrap();
    assert_eq!(
        (
            u.presence.status_text.as_str(),
            u.presence.last_seen_privacy.as_str()
        ),
        ("in a meeting", PRIVACY_NOBODY),
        "a privacy choice survives even the last-seen retention"
    );

    // Clearing returns to the defaults; other users were never affected.
    let u = store.set_status("s3", &text("")).await.unwrap();
    assert!(u.changed);
    let u = store
        .set_status("s3", &privacy(PRIVACY_EVERYONE))
        .await
        .unwrap();
    assert!(u.changed);
    assert_eq!(
        (
            u.presence.status_text.as_str(),
            u.presence.last_seen_privacy.as_str()
        ),
        ("", PRIVACY_EVERYONE)
    );
    let bob = presence(&*store, "bob").await;
    assert_eq!(
        (bob.status_text.as_str(), bob.last_seen_privacy.as_str()),
        ("", PRIVACY_EVERYONE)
    );
}

pub async fn status_text_privacy_and_status_change_together_or_not_at_all<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    let store = factory(TTL);
    store.register(session("s1", "alice", GW1)).await.unwrap();
    let all = StatusChange {
        status: Some(SessionStatus::Busy),
        automatic: false,
        status_text: Some("focus".into()),
        last_seen_privacy: Some(PRIVACY_NOBODY.into()),
    };
    let u = store.set_status("s1", &all).await.unwrap();
    assert!(u.changed);
    assert_eq!(
        (
            u.presence.status.as_str(),
            u.presence.status_text.as_str(),
            u.presence.last_seen_privacy.as_str()
        ),
        (STATUS_BUSY, "focus", PRIVACY_NOBODY)
    );
    let u = store.set_status("s1", &all).await.unwrap();
    assert!(!u.changed, "the same again is no change");

    let err = store.set_status("ghost", &text("x")).await.unwrap_err();
    assert!(matches!(err, PresenceError::NotFound(_)), "{err:?}");
    assert_eq!(presence(&*store, "alice").await.status_text, "focus");
    let err = store
        .set_status("ghost", &StatusChange::default())
        .await
        .unwrap_err();
    assert!(matches!(err, PresenceError::NotFound(_)), "{err:?}");
    let u = store
        .set_status("s1", &StatusChange::default())
        .await
        .unwrap();
    assert!(!u.changed, "an empty change changes nothing");
    assert_eq!(u.presence.status, STATUS_BUSY);
}

pub async fn automatic_status_never_overrides_the_users_choice<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    use SessionStatus::{Away, Busy, Invisible, Online};
    let store = factory(TTL);
    store.register(session("s1", "alice", GW1)).await.unwrap();
    // (change, session status after)
    let steps = [
        (automatic(Away), STATUS_AWAY),
        (automatic(Away), STATUS_AWAY),
        (automatic(Online), STATUS_ONLINE),
        (automatic(Online), STATUS_ONLINE),
        // An away the user chose is not undone by activity.
        (explicit(Away), STATUS_AWAY),
        (automatic(Online), STATUS_AWAY),
        // An automatic away the user then confirms is theirs.
        (explicit(Online), STATUS_ONLINE),
        (automatic(Away), STATUS_AWAY),
        (explicit(Away), STATUS_AWAY),
        (automatic(Online), STATUS_AWAY),
        // Idleness does not replace busy or invisible.
        (explicit(Busy), STATUS_BUSY),
        (automatic(Away), STATUS_BUSY),
        (automatic(Online), STATUS_BUSY),
        (explicit(Invisible), STATUS_INVISIBLE),
        (automatic(Away), STATUS_INVISIBLE),
        (automatic(Online), STATUS_INVISIBLE),
        // The user's choice always applies, also over an automatic away.
        (explicit(Online), STATUS_ONLINE),
        (automatic(Away), STATUS_AWAY),
        (explicit(Busy), STATUS_BUSY),
        (automatic(Online), STATUS_BUSY),
    ];
    for (i, (change, expected)) in steps.iter().enumerate() {
        let u = store.set_status("s1", change).await.unwrap();
        assert_eq!(u.presence.status, *expected, "step {i}: {change:?}");
    }

    // The automatic mark is per session and survives a refresh of the session.
    store.set_status("s1", &explicit(Online)).await.unwrap();
    store.set_status("s1", &automatic(Away)).await.unwrap();
    store.register(session("s2", "alice", GW2)).await.unwrap();
    store.set_status("s2", &explicit(Away)).await.unwrap();
    store.register(session("s1", "alice", GW1)).await.unwrap();
    assert_eq!(presence(&*store, "alice").await.status, STATUS_AWAY);
    store.set_status("s2", &automatic(Online)).await.unwrap();
    assert_eq!(presence(&*store, "alice").await.status, STATUS_AWAY);
    let u = store.set_status("s1", &automatic(Online)).await.unwrap();
    assert_eq!(
        (u.presence.status.as_str(), u.changed),
        (STATUS_ONLINE, true)
    );
}

pub async fn a_session_registered_invisible_never_shows_online<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    use SessionStatus::{Busy, Invisible};
    let store = factory(TTL);
    // Alice was visibly online once, then left.
    store.register(session("s0", "alice", GW1)).await.unwrap();
    advance_ms(1_000).await;
    let left = store.now_ms();
    store.unregister("s0").await.unwrap();

    advance_ms(1_000).await;
    let now = store.now_ms();
    let u = store
        .register(session_as("s1", "alice", GW1, Invisible, false))
        .await
        .unwrap();
    assert!(
        !u.changed,
        "others see no change: alice stays offline to them"
    );
    let own = u.presence.true_view();
    assert_eq!(
        (own.status.as_str(), own.sessions, own.last_seen_ms),
        (STATUS_INVISIBLE, 1, now)
    );
    let public = u.presence.public_view();
    assert_eq!(
        (public.status.as_str(), public.sessions, public.last_seen_ms),
        (STATUS_OFFLINE, 0, left),
        "last seen stays at when she was last visible"
    );
    assert_eq!(presence(&*store, "alice").await.public_view(), public);
    assert_eq!(
        store.route(&ids(&["alice"])).await.unwrap(),
        vec![route(GW1, &["alice"])],
        "an invisible session still gets messages"
    );

    // Re-registering the live session keeps its status, whatever the registration says.
    let u = store.register(session("s1", "alice", GW1)).await.unwrap();
    assert_eq!(
        (u.presence.status.as_str(), u.changed),
        (STATUS_INVISIBLE, false)
    );

    // A second session opened busy makes her visible, as busy.
    let u = store
        .register(session_as("s2", "alice", GW2, Busy, false))
        .await
        .unwrap();
    assert!(u.changed);
    assert_eq!(
        (u.presence.status.as_str(), u.presence.sessions),
        (STATUS_BUSY, 2)
    );
    // Closing it hides her again.
    let u = store.unregister("s2").await.unwrap().unwrap();
    assert!(u.changed);
    assert_eq!(u.presence.public_view().status, STATUS_OFFLINE);
    assert_eq!(u.presence.status, STATUS_INVISIBLE);
}

pub async fn a_forgotten_session_registered_again_gets_the_status_it_had<
    F: Fn(Duration) -> Arc<dyn SessionStore>,
>(
    factory: F,
) {
    use SessionStatus::{Away, Busy, Online};
    let store = factory(TTL);
    let u = store
        .register(session_as("s1", "alice", GW1, Busy, false))
        .await
        .unwrap();
    assert_eq!((u.presence.status.as_str(), u.changed), (STATUS_BUSY, true));

    // Presence forgets the session (no heartbeat within the TTL)...
    advance_ms(TTL.as_millis() as u64).await;
    store.expire(store.now_ms()).await.unwrap();
    assert_eq!(presence(&*store, "alice").await.status, STATUS_OFFLINE);
    assert_eq!(
        store.heartbeat(GW1, &ids(&["s1"])).await.unwrap(),
        ids(&["s1"])
    );
    // ...and the gateway registers it again with the status the client last set.
    let u = store
        .register(session_as("s1", "alice", GW1, Away, false))
        .await
        .unwrap();
    assert_eq!(
        (u.presence.status.as_str(), u.presence.sessions),
        (STATUS_AWAY, 1)
    );
    // An away the user chose is not undone by activity...
    let u = store.set_status("s1", &automatic(Online)).await.unwrap();
    assert_eq!(u.presence.status, STATUS_AWAY);

    // ...but an automatic one (the idle timer had set it) is.
    store
        .register(session_as("s2", "bob", GW1, Away, true))
        .await
        .unwrap();
    assert_eq!(presence(&*store, "bob").await.status, STATUS_AWAY);
    let u = store.set_status("s2", &automatic(Online)).await.unwrap();
    assert_eq!(u.presence.status, STATUS_ONLINE);
}
