//! Per-user send rate limiting: one token bucket per user in a bounded map.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Token buckets by user id. A bucket refills at `rate` tokens per second up to
/// `capacity`; a send takes one token.
///
/// The map is bounded by `max_users`. When it is full, buckets that have refilled
/// completely are removed first (a full bucket behaves exactly like no bucket, so
/// that loses nothing); if that is not enough, arbitrary buckets go, which at worst
/// gives those users a fresh burst.
///
/// A send is charged at the time its gateway accepted it (see [`charge_time`]), so
/// charges can arrive out of order: a bucket never moves its clock back, and a
/// charge older than the bucket's clock gets no refill.
pub(crate) struct RateLimiter {
    rate: f64,
    capacity: f64,
    max_users: usize,
    /// A std mutex: the critical section is a map lookup and some arithmetic.
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant, rate: f64, capacity: f64) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(capacity);
        self.updated = self.updated.max(now);
    }
}

/// Furthest in the past a send is charged: bounds what a gateway's clock ahead of
/// ours, or a very old request, can do to a bucket.
pub(crate) const ACCEPT_TIME_CREDIT: Duration = Duration::from_secs(60);

/// When to charge a send that its gateway accepted at `accepted_at_ms` (Unix ms, 0 =
/// unknown), given our wall clock `now_ms` and monotonic `now`: that moment on our
/// monotonic clock, never in the future and at most [`ACCEPT_TIME_CREDIT`] back.
/// Sends that waited in a paused or slow instance are so charged as they were sent,
/// not as one burst when it resumes.
pub(crate) fn charge_time(accepted_at_ms: u64, now_ms: i64, now: Instant) -> Instant {
    let now_ms = u64::try_from(now_ms).unwrap_or(0);
    if accepted_at_ms == 0 || accepted_at_ms >= now_ms {
        return now;
    }
    let waited = Duration::from_millis(now_ms - accepted_at_ms).min(ACCEPT_TIME_CREDIT);
    now.checked_sub(waited).unwrap_or(now)
}

impl RateLimiter {
    pub fn new(rate_per_sec: u32, burst: u32, max_users: usize) -> RateLimiter {
        RateLimiter {
            rate: f64::from(rate_per_sec),
            capacity: f64::from(burst.max(1)),
            max_users: max_users.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Take one token for `user`; false when the user is over the limit.
    pub fn try_acquire(&self, user: &str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(user) && buckets.len() >= self.max_users {
            self.evict(&mut buckets, now);
        }
        let bucket = buckets.entry(user.to_owned()).or_insert(Bucket {
            tokens: self.capacity,
            updated: now,
        });
        bucket.refill(now, self.rate, self.capacity);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn evict(&self, buckets: &mut HashMap<String, Bucket>, now: Instant) {
        let (rate, capacity) = (self.rate, self.capacity);
        buckets.retain(|_, b| {
            b.refill(now, rate, capacity);
            b.tokens < capacity
        });
        let target = self.max_users - self.max_users / 10 - 1;
        if buckets.len() > target {
            let excess: Vec<String> = buckets
                .keys()
                .take(buckets.len() - target)
                .cloned()
                .collect();
            for user in excess {
                buckets.remove(&user);
            }
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill_at_the_rate() {
        let limiter = RateLimiter::new(2, 3, 100);
        let t0 = Instant::now();
        assert!(limiter.try_acquire("u", t0));
        assert!(limiter.try_acquire("u", t0));
        assert!(limiter.try_acquire("u", t0));
        assert!(!limiter.try_acquire("u", t0), "burst exhausted");
        assert!(limiter.try_acquire("other", t0), "buckets are per user");
        // 2 tokens per second: one after 500 ms, not two.
        let t1 = t0 + Duration::from_millis(500);
        assert!(limiter.try_acquire("u", t1));
        assert!(!limiter.try_acquire("u", t1));
        // Never more than the capacity, however long the pause.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(limiter.try_acquire("u", t2));
        }
        assert!(!limiter.try_acquire("u", t2));
    }

    #[test]
    fn sends_charged_when_accepted_pass_a_pause_that_a_burst_would_not() {
        // 2 per second, burst 3: 20 sends accepted 0.5 s apart are within the rate.
        let t0 = Instant::now();
        let accepted: Vec<Instant> = (0..20)
            .map(|i| t0 + Duration::from_millis(500 * i))
            .collect();
        // All processed at once after a pause, charged when they were accepted.
        let stamped = RateLimiter::new(2, 3, 100);
        assert!(accepted.iter().all(|&at| stamped.try_acquire("u", at)));
        // The same, charged at processing time: one burst, mostly refused.
        let late = RateLimiter::new(2, 3, 100);
        let processed = t0 + Duration::from_secs(15);
        let admitted = accepted
            .iter()
            .filter(|_| late.try_acquire("u", processed))
            .count();
        assert_eq!(admitted, 3);
    }

    #[test]
    fn an_older_charge_gets_no_refill_twice() {
        let limiter = RateLimiter::new(1, 2, 100);
        let t0 = Instant::now();
        assert!(limiter.try_acquire("u", t0));
        assert!(limiter.try_acquire("u", t0));
        let t5 = t0 + Duration::from_secs(5);
        // Refilled to the capacity (2) at t5, both spent.
        assert!(limiter.try_acquire("u", t5));
        assert!(limiter.try_acquire("u", t5));
        // A charge stamped before t5 must not earn the 5 s again.
        let t1 = t0 + Duration::from_secs(1);
        assert!(!limiter.try_acquire("u", t1));
        assert!(!limiter.try_acquire("u", t5));
    }

    #[test]
    fn charge_time_is_the_accept_time_bounded() {
        let now = Instant::now() + Duration::from_secs(3600);
        let now_ms: i64 = 1_800_000_000_000;
        let ms = now_ms as u64;
        assert_eq!(charge_time(0, now_ms, now), now, "unknown");
        assert_eq!(charge_time(ms + 5_000, now_ms, now), now, "in our future");
        assert_eq!(
            charge_time(ms - 2_500, now_ms, now),
            now - Duration::from_millis(2_500)
        );
        assert_eq!(
            charge_time(ms - 3_600_000, now_ms, now),
            now - ACCEPT_TIME_CREDIT,
            "at most the credit back"
        );
    }

    #[test]
    fn map_stays_bounded_and_idle_buckets_go_first() {
        let limiter = RateLimiter::new(1, 1, 10);
        let t0 = Instant::now();
        for i in 0..10 {
            assert!(limiter.try_acquire(&format!("u{i}"), t0));
        }
        assert_eq!(limiter.tracked(), 10);
        // After a second every bucket has refilled: all are idle and evictable.
        let t1 = t0 + Duration::from_secs(1);
        assert!(limiter.try_acquire("new", t1));
        assert_eq!(limiter.tracked(), 1);
        for i in 0..1000 {
            limiter.try_acquire(&format!("flood{i}"), t1);
            assert!(limiter.tracked() <= 10);
        }
    }
}
