//! The interest index: per conversation, the gateways holding a live session of a
//! member, cached so that routing a message to a hot conversation costs one read
//! whatever the member count.
//!
//! An entry is keyed by conversation id and holds the fingerprint of the member set it
//! was computed from ([`members_fingerprint`]), the routes (gateway -> online members)
//! and an expiry ([`INTEREST_TTL`] after it was computed). It answers a
//! [`SessionStore::route_conversation`](super::SessionStore::route_conversation) call
//! only when the fingerprints match and it has not expired; otherwise the store
//! computes the routes as `route` does and caches them.
//!
//! Freshness: whenever a user's set of gateways changes (first session on a gateway,
//! last session on a gateway gone by unregister, expiry or dropped gateway), every
//! cached entry whose member set contains the user is dropped, found through a reverse
//! index member -> cached conversations. Status changes do not touch routes. The TTL
//! is the safety net of the shared store (a presence instance that dies between a
//! session change and the invalidation it owes leaves an entry stale for at most the
//! TTL); entries are not refreshed by hits, so every entry is recomputed at least once
//! per TTL.
//!
//! This module holds what both backends share (fingerprint, bounds) and the in-memory
//! index of [`MemorySessionStore`](super::MemorySessionStore); the Redis layout is in
//! [`redis`](super::redis).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use prometheus::IntCounter;
use switchboard_proto::v1::GatewayRoute;

/// How long a cached entry answers after it was computed. Hits do not extend it.
pub const INTEREST_TTL: Duration = Duration::from_secs(60);

/// Most conversations the in-memory index caches; beyond it the least recently used
/// entry is evicted.
pub const MAX_INTEREST_CONVERSATIONS: usize = 10_000;

/// Most member references (the sum of the member counts of the cached entries) the
/// in-memory index keeps: each costs a member id in the entry and a conversation id
/// in the reverse index, ~150 bytes, so ~150 MB at the bound (100 conversations of
/// 10,000 members). Beyond it the least recently used entries are evicted.
pub const MAX_INTEREST_MEMBER_REFS: usize = 1_000_000;

/// The routes of a conversation and whether they came from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationRoutes {
    /// Gateways sorted by URL; per gateway the online members there, sorted by id and
    /// distinct.
    pub routes: Vec<GatewayRoute>,
    /// True when answered from a cached entry (for the hit/miss metrics).
    pub cached: bool,
}

const FNV_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// A second, unrelated FNV offset basis, for the second half of the fingerprint.
const FNV_BASIS_2: u64 = 0x84222325_cbf29ce4;

/// FNV-1a, 64 bit: stable across builds and processes (unlike std's hasher).
pub(crate) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = FNV_BASIS;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(FNV_PRIME);
        }
    }
    h
}

/// MurmurHash3's finalizer: spreads FNV's weakly mixed last bytes over all bits.
pub(crate) fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The fingerprint of a member list: 128 bits, independent of order, stable across
/// processes and builds (instances sharing a Redis compare them).
///
/// Each id is hashed twice (FNV-1a from two offset bases, each finalized by `fmix64`);
/// the halves are the wrapping sums of those hashes over the list, the first mixed with
/// the list's length. A duplicated id changes the fingerprint (harmless: the entry is
/// recomputed). Two different member sets share a fingerprint with probability about
/// 2^-128 for ids nobody crafted against these public hash functions.
pub fn members_fingerprint(member_ids: &[String]) -> u128 {
    let (mut a, mut b) = (0u64, 0u64);
    for id in member_ids {
        let (mut h1, mut h2) = (FNV_BASIS, FNV_BASIS_2);
        for byte in id.as_bytes() {
            h1 = (h1 ^ u64::from(*byte)).wrapping_mul(FNV_PRIME);
            h2 = (h2 ^ u64::from(*byte)).wrapping_mul(FNV_PRIME);
        }
        a = a.wrapping_add(fmix64(h1));
        b = b.wrapping_add(fmix64(h2 ^ 0x9e37_79b9_7f4a_7c15));
    }
    a ^= fmix64(member_ids.len() as u64);
    (u128::from(a) << 64) | u128::from(b)
}

/// Distinct ids in first-seen order.
pub(crate) fn distinct(ids: &[String]) -> Vec<&String> {
    let mut seen = HashSet::with_capacity(ids.len());
    ids.iter().filter(|id| seen.insert(id.as_str())).collect()
}

/// Routes from (user, gateway) pairs: gateways sorted, users per gateway sorted and
/// distinct.
pub(crate) fn routes_from<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<GatewayRoute> {
    let mut by_gateway: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (user, gateway) in pairs {
        by_gateway.entry(gateway).or_default().insert(user);
    }
    by_gateway
        .into_iter()
        .map(|(gateway, users)| GatewayRoute {
            gateway_addr: gateway.to_owned(),
            user_ids: users.into_iter().map(str::to_owned).collect(),
        })
        .collect()
}

/// The counter of dropped entries (`switchboard_presence_interest_invalidations_total`),
/// one per store, registered by the store's `register_metrics`.
pub(crate) fn invalidations_counter() -> IntCounter {
    IntCounter::new(
        "switchboard_presence_interest_invalidations_total",
        "cached conversation routes dropped because a member's gateways changed",
    )
    .expect("a constant, valid metric name and help")
}

/// One cached conversation of the in-memory index.
struct Entry {
    fingerprint: u128,
    /// Distinct members the entry was computed from (keys of the reverse index).
    members: Vec<String>,
    routes: Vec<GatewayRoute>,
    /// When the entry stops answering (store clock, ms).
    expires_at_ms: i64,
    /// Last use, the entry's key in `InterestIndex::lru`.
    used: u64,
}

/// The in-memory interest index, kept in the memory store's state (under its mutex).
pub(crate) struct InterestIndex {
    entries: HashMap<String, Entry>,
    /// Member -> conversations whose cached entry lists the member.
    by_member: HashMap<String, HashSet<String>>,
    /// (last use, conversation), least recently used first.
    lru: BTreeSet<(u64, String)>,
    /// (expiry, conversation), soonest first, so expired entries are purged without
    /// a scan.
    by_expiry: BTreeSet<(i64, String)>,
    /// Use counter (the LRU clock).
    tick: u64,
    /// Sum of the member counts of the entries.
    member_refs: usize,
    max_conversations: usize,
    max_member_refs: usize,
    ttl_ms: i64,
    invalidations: IntCounter,
}

impl InterestIndex {
    pub fn new(invalidations: IntCounter) -> InterestIndex {
        Self::with_bounds(
            MAX_INTEREST_CONVERSATIONS,
            MAX_INTEREST_MEMBER_REFS,
            invalidations,
        )
    }

    pub fn with_bounds(
        max_conversations: usize,
        max_member_refs: usize,
        invalidations: IntCounter,
    ) -> InterestIndex {
        InterestIndex {
            entries: HashMap::new(),
            by_member: HashMap::new(),
            lru: BTreeSet::new(),
            by_expiry: BTreeSet::new(),
            tick: 0,
            member_refs: 0,
            max_conversations,
            max_member_refs,
            ttl_ms: INTEREST_TTL.as_millis() as i64,
            invalidations,
        }
    }

    /// The cached routes of `conversation_id` when its entry was computed from a member
    /// set with `fingerprint` and is live at `now_ms`; a stale entry is dropped.
    pub fn get(
        &mut self,
        conversation_id: &str,
        fingerprint: u128,
        now_ms: i64,
    ) -> Option<Vec<GatewayRoute>> {
        let entry = self.entries.get(conversation_id)?;
        if entry.fingerprint != fingerprint || entry.expires_at_ms <= now_ms {
            self.remove(conversation_id);
            return None;
        }
        let old = (entry.used, conversation_id.to_owned());
        self.tick += 1;
        let tick = self.tick;
        let entry = self
            .entries
            .get_mut(conversation_id)
            .expect("entry checked above under the same borrow of the index");
        entry.used = tick;
        let routes = entry.routes.clone();
        self.lru.remove(&old);
        self.lru.insert((tick, old.1));
        Some(routes)
    }

    /// Cache routes computed now from `members` (distinct), evicting the least
    /// recently used entries beyond the bounds. An entry alone above the member bound
    /// is not cached.
    pub fn insert(
        &mut self,
        conversation_id: &str,
        fingerprint: u128,
        members: Vec<String>,
        routes: Vec<GatewayRoute>,
        now_ms: i64,
    ) {
        self.remove(conversation_id);
        if members.len() > self.max_member_refs || self.max_conversations == 0 {
            return;
        }
        while self.entries.len() >= self.max_conversations
            || self.member_refs + members.len() > self.max_member_refs
        {
            let Some((_, oldest)) = self.lru.first().cloned() else {
                break;
            };
            self.remove(&oldest);
        }
        for member in &members {
            self.by_member
                .entry(member.clone())
                .or_default()
                .insert(conversation_id.to_owned());
        }
        self.tick += 1;
        let expires_at_ms = now_ms.saturating_add(self.ttl_ms);
        self.member_refs += members.len();
        self.lru.insert((self.tick, conversation_id.to_owned()));
        self.by_expiry
            .insert((expires_at_ms, conversation_id.to_owned()));
        self.entries.insert(
            conversation_id.to_owned(),
            Entry {
                fingerprint,
                members,
                routes,
                expires_at_ms,
                used: self.tick,
            },
        );
    }

    /// Drop every entry whose member set contains `user_id` (its gateways changed).
    pub fn invalidate_member(&mut self, user_id: &str) {
        let Some(conversations) = self.by_member.get(user_id) else {
            return;
        };
        let conversations: Vec<String> = conversations.iter().cloned().collect();
        for conversation_id in conversations {
            if self.remove(&conversation_id) {
                self.invalidations.inc();
            }
        }
    }

    /// Drop the entries expired at `now_ms`.
    pub fn purge_expired(&mut self, now_ms: i64) {
        while let Some((expires_at_ms, conversation_id)) = self.by_expiry.first().cloned() {
            if expires_at_ms > now_ms {
                break;
            }
            self.remove(&conversation_id);
        }
    }

    /// Cached conversations.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Sum of the member counts of the cached entries.
    #[cfg(test)]
    pub fn member_refs(&self) -> usize {
        self.member_refs
    }

    fn remove(&mut self, conversation_id: &str) -> bool {
        let Some(entry) = self.entries.remove(conversation_id) else {
            return false;
        };
        self.lru.remove(&(entry.used, conversation_id.to_owned()));
        self.by_expiry
            .remove(&(entry.expires_at_ms, conversation_id.to_owned()));
        self.member_refs -= entry.members.len();
        for member in &entry.members {
            if let Some(conversations) = self.by_member.get_mut(member) {
                conversations.remove(conversation_id);
                if conversations.is_empty() {
                    self.by_member.remove(member);
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn fingerprint_ignores_order_and_sees_any_change() {
        let fp = members_fingerprint(&ids(&["alice", "bob", "carol"]));
        assert_eq!(fp, members_fingerprint(&ids(&["carol", "alice", "bob"])));
        assert_ne!(fp, members_fingerprint(&ids(&["alice", "bob"])));
        assert_ne!(fp, members_fingerprint(&ids(&["alice", "bob", "carl"])));
        assert_ne!(
            fp,
            members_fingerprint(&ids(&["alice", "bob", "carol", "dave"]))
        );
        assert_ne!(members_fingerprint(&[]), members_fingerprint(&ids(&[""])));
        // Stable across builds: instances sharing a Redis compare fingerprints.
        assert_eq!(
            format!("{:032x}", members_fingerprint(&ids(&["alice"]))),
            format!("{:032x}", members_fingerprint(&ids(&["alice"])))
        );
    }

    #[test]
    fn routes_are_sorted_and_distinct() {
        let routes = routes_from([
            ("bob", "gw2"),
            ("alice", "gw2"),
            ("bob", "gw2"),
            ("carol", "gw1"),
        ]);
        assert_eq!(
            routes,
            vec![
                GatewayRoute {
                    gateway_addr: "gw1".into(),
                    user_ids: ids(&["carol"]),
                },
                GatewayRoute {
                    gateway_addr: "gw2".into(),
                    user_ids: ids(&["alice", "bob"]),
                },
            ]
        );
    }

    fn counter() -> IntCounter {
        invalidations_counter()
    }

    #[test]
    fn least_recently_used_entries_are_evicted_beyond_the_bounds() {
        let mut index = InterestIndex::with_bounds(2, 5, counter());
        let fp = |m: &[String]| members_fingerprint(m);
        let (a, b, c) = (ids(&["u1", "u2"]), ids(&["u3"]), ids(&["u4", "u5"]));
        index.insert("a", fp(&a), a.clone(), Vec::new(), 0);
        index.insert("b", fp(&b), b.clone(), Vec::new(), 0);
        assert!(
            index.get("a", fp(&a), 1).is_some(),
            "a is now the most recent"
        );
        index.insert("c", fp(&c), c.clone(), Vec::new(), 0);
        assert_eq!(index.len(), 2);
        assert!(
            index.get("b", fp(&b), 1).is_none(),
            "b was least recently used"
        );
        assert!(index.get("a", fp(&a), 1).is_some());
        assert!(index.get("c", fp(&c), 1).is_some());
        assert_eq!(index.member_refs(), 4);

        // The member bound: 4 + 3 > 5 evicts the least recently used (a).
        let d = ids(&["u6", "u7", "u8"]);
        index.insert("d", fp(&d), d.clone(), Vec::new(), 0);
        assert!(index.get("a", fp(&a), 1).is_none());
        assert_eq!(index.member_refs(), 5);
        // An entry alone above the bound is not cached.
        let big = ids(&["1", "2", "3", "4", "5", "6"]);
        index.insert("big", fp(&big), big.clone(), Vec::new(), 0);
        assert!(index.get("big", fp(&big), 1).is_none());
        assert!(index.by_member.keys().all(|m| m.starts_with('u')));
    }

    #[test]
    fn entries_expire_and_invalidation_follows_the_reverse_index() {
        let inv = counter();
        let mut index = InterestIndex::with_bounds(10, 100, inv.clone());
        let a = ids(&["alice", "bob"]);
        let b = ids(&["bob", "carol"]);
        index.insert("a", members_fingerprint(&a), a.clone(), Vec::new(), 0);
        index.insert("b", members_fingerprint(&b), b.clone(), Vec::new(), 0);
        index.invalidate_member("alice");
        assert_eq!(inv.get(), 1);
        assert!(index.get("a", members_fingerprint(&a), 1).is_none());
        assert!(index.get("b", members_fingerprint(&b), 1).is_some());
        assert!(!index.by_member.contains_key("alice"));

        let ttl = INTEREST_TTL.as_millis() as i64;
        index.purge_expired(ttl - 1);
        assert_eq!(index.len(), 1);
        index.purge_expired(ttl);
        assert_eq!(index.len(), 0);
        assert!(index.by_member.is_empty() && index.lru.is_empty());
        assert_eq!(index.member_refs(), 0);
    }
}
