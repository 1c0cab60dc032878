//! Per-user send rate limiting: one token bucket per user in a bounded map.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::time::Instant;

/// Token buckets by user id. A bucket refills at `rate` tokens per second up to
/// `capacity`; a send takes one token.
///
/// The map is bounded by `max_users`. When it is full, buckets that have refilled
/// completely are removed first (a full bucket behaves exactly like no bucket, so
/// that loses nothing); if that is not enough, arbitrary buckets go, which at worst
/// gives those users a fresh burst.
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
        self.updated = now;
    }
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
