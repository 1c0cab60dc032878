//! Limits that hold across connections: the per-user request budget shared by a
//! user's WebSocket connections and HTTP API calls on this gateway, and the caps of
//! the client listener on connections not yet upgraded and connections per IP.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::connection::TokenBucket;
use crate::sessions::lock;

/// Users whose buckets are tracked before idle (full) buckets are forgotten.
const MAX_TRACKED_USERS: usize = 10_000;

/// Per-user token buckets with `gateway.requests_per_second` and
/// `gateway.request_burst`: every connection of a user on this gateway and the
/// user's HTTP API calls draw from one bucket, so opening more connections does
/// not buy more reads.
pub(crate) struct UserRateLimiter {
    rate: u32,
    burst: u32,
    /// A bucket idle for this long is full again, so forgetting it loses nothing.
    refill: Duration,
    buckets: Mutex<HashMap<Arc<str>, (TokenBucket, Instant)>>,
}

impl UserRateLimiter {
    pub(crate) fn new(rate: u32, burst: u32) -> Self {
        let refill = Duration::from_secs_f64(f64::from(burst.max(1)) / f64::from(rate.max(1)));
        UserRateLimiter {
            rate,
            burst,
            refill: refill + Duration::from_secs(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Take one request from `user`'s bucket.
    ///
    /// The map holds only users whose bucket is not yet full again: when it reaches
    /// [`MAX_TRACKED_USERS`] the idle ones are dropped, so its size is bounded by the
    /// users active within one refill period (user ids are at most 128 bytes).
    pub(crate) fn take(&self, user: &str, now: Instant) -> bool {
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= MAX_TRACKED_USERS && !buckets.contains_key(user) {
            let refill = self.refill;
            buckets.retain(|_, (_, last)| now.saturating_duration_since(*last) < refill);
        }
        let (bucket, last) = buckets
            .entry(user.into())
            .or_insert_with(|| (TokenBucket::new(self.rate, self.burst, now), now));
        *last = now;
        bucket.take(now)
    }

    /// How long until `user`'s bucket holds a request again (zero if it does).
    pub(crate) fn wait(&self, user: &str, now: Instant) -> Duration {
        lock(&self.buckets)
            .get(user)
            .map_or(Duration::ZERO, |(bucket, _)| bucket.wait(now))
    }

    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        lock(&self.buckets).len()
    }
}

/// Counts client TCP connections accepted but not upgraded to a WebSocket
/// (`gateway.max_pending_upgrades`).
pub(crate) struct PendingUpgrades {
    open: AtomicUsize,
    max: usize,
}

impl PendingUpgrades {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(PendingUpgrades {
            open: AtomicUsize::new(0),
            max,
        })
    }

    /// Count one more pending connection, or `None` at the cap.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<PendingGuard> {
        self.open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| PendingGuard(self.clone()))
    }

    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// One pending connection, released on drop (at the upgrade or when it closes).
pub(crate) struct PendingGuard(Arc<PendingUpgrades>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Open client TCP connections per IP address (`gateway.max_connections_per_ip`,
/// 0 = no limit). Holds only addresses with open connections, at most
/// `gateway.max_connections + gateway.max_pending_upgrades` of them.
pub(crate) struct PerIpConnections {
    open: Mutex<HashMap<IpAddr, usize>>,
    max: usize,
}

impl PerIpConnections {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(PerIpConnections {
            open: Mutex::new(HashMap::new()),
            max,
        })
    }

    /// Count one more connection from `ip`, or `None` when it has `max` already.
    pub(crate) fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpGuard> {
        if self.max > 0 {
            let mut open = lock(&self.open);
            let n = open.entry(ip).or_insert(0);
            if *n >= self.max {
                return None;
            }
            *n += 1;
        }
        Some(IpGuard {
            counter: self.clone(),
            ip,
        })
    }

    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        lock(&self.open).len()
    }
}

/// One open connection from an address, released on drop.
pub(crate) struct IpGuard {
    counter: Arc<PerIpConnections>,
    ip: IpAddr,
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        if self.counter.max == 0 {
            return;
        }
        let mut open = lock(&self.counter.open);
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_request_budget_is_per_user_and_refills() {
        let limiter = UserRateLimiter::new(1, 2);
        let now = Instant::now();
        assert!(limiter.take("alice", now));
        assert!(limiter.take("alice", now));
        assert!(!limiter.take("alice", now));
        assert!(limiter.take("bob", now));
        assert!(limiter.take("alice", now + Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_buckets_are_forgotten_when_many_users_are_tracked() {
        let limiter = UserRateLimiter::new(10, 10);
        let start = Instant::now();
        for i in 0..MAX_TRACKED_USERS {
            limiter.take(&format!("u{i}"), start);
        }
        assert_eq!(limiter.tracked(), MAX_TRACKED_USERS);
        limiter.take("late", start + Duration::from_secs(10));
        assert_eq!(limiter.tracked(), 1);
    }

    #[test]
    fn pending_connections_are_capped_and_released() {
        let pending = PendingUpgrades::new(2);
        let a = pending.try_acquire().unwrap();
        let _b = pending.try_acquire().unwrap();
        assert!(pending.try_acquire().is_none());
        drop(a);
        assert_eq!(pending.open(), 1);
        assert!(pending.try_acquire().is_some());
    }

    #[test]
    fn connections_per_ip_are_capped_and_forgotten_when_closed() {
        let per_ip = PerIpConnections::new(2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let a = per_ip.try_acquire(ip).unwrap();
        let b = per_ip.try_acquire(ip).unwrap();
        assert!(per_ip.try_acquire(ip).is_none());
        let c = per_ip.try_acquire(other).unwrap();
        drop((a, b, c));
        assert_eq!(per_ip.tracked(), 0);
        let unlimited = PerIpConnections::new(0);
        let guards: Vec<_> = (0..10).filter_map(|_| unlimited.try_acquire(ip)).collect();
        assert_eq!(guards.len(), 10);
        assert_eq!(unlimited.tracked(), 0);
    }
}
