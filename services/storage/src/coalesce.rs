//! Single-flight: concurrent identical reads share one backend query.
//!
//! The first caller of a key runs the query; callers arriving while it runs wait for
//! its result instead of querying again. Once the result is in, the key is forgotten,
//! so a later request queries afresh. A coalesced caller may get a result whose query
//! started (at most one query duration) before its own request arrived; for history
//! pages that is the same staleness any concurrent read has.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::OnceCell;

/// In-flight queries by key.
pub struct SingleFlight<K, V> {
    /// The result cell of each running query. A std mutex is right here: it guards
    /// map lookups and inserts only, never held across an await.
    inflight: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
}

impl<K: Hash + Eq + Clone, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            inflight: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> SingleFlight<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of `query` for `key`, and whether it came from another caller's query
    /// (true = this call was coalesced). If the caller running the query is cancelled,
    /// one of the waiting callers runs it instead.
    pub async fn run<F, Fut>(&self, key: K, query: F) -> (V, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let cell = Arc::clone(self.lock().entry(key.clone()).or_default());
        let participant = Participant {
            flight: self,
            key,
            cell: Some(cell),
        };
        let mut ran = false;
        let value = participant
            .cell()
            .get_or_init(|| {
                ran = true;
                query()
            })
            .await
            .clone();
        drop(participant);
        (value, !ran)
    }

    /// Callers currently sharing the query of `key` (for tests and debugging).
    pub fn participants(&self, key: &K) -> usize {
        self.lock()
            .get(key)
            .map(|cell| Arc::strong_count(cell) - 1)
            .unwrap_or(0)
    }

    /// Keys with a query in flight.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, Arc<OnceCell<V>>>> {
        self.inflight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One caller of a key. On drop (finished or cancelled) it removes the key's entry
/// when the result is in, or when it was the last caller; the Arc is cloned and dropped
/// only under the map lock, so the reference count is exact there.
struct Participant<'a, K: Hash + Eq + Clone, V: Clone> {
    flight: &'a SingleFlight<K, V>,
    key: K,
    cell: Option<Arc<OnceCell<V>>>,
}

impl<K: Hash + Eq + Clone, V: Clone> Participant<'_, K, V> {
    fn cell(&self) -> &OnceCell<V> {
        self.cell.as_ref().expect("cell is set until drop")
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Drop for Participant<'_, K, V> {
    fn drop(&mut self) {
        let mut map = self.flight.lock();
        let Some(cell) = self.cell.take() else {
            return;
        };
        let ours = map
            .get(&self.key)
            .is_some_and(|current| Arc::ptr_eq(current, &cell));
        if ours && (cell.initialized() || Arc::strong_count(&cell) == 2) {
            map.remove(&self.key);
        }
        drop(cell);
        drop(map);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_query_and_the_key_is_forgotten_after() {
        let flight = Arc::new(SingleFlight::<u32, u64>::new());
        let queries = Arc::new(AtomicUsize::new(0));
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (flight, queries, mut release_rx) =
                (flight.clone(), queries.clone(), release_rx.clone());
            tasks.push(tokio::spawn(async move {
                flight
                    .run(7, || async move {
                        queries.fetch_add(1, Ordering::SeqCst);
                        let _ = release_rx.wait_for(|go| *go).await;
                        42
                    })
                    .await
            }));
        }
        while flight.participants(&7) < 8 {
            tokio::task::yield_now().await;
        }
        release_tx.send(true).unwrap();
        let mut coalesced = 0;
        for t in tasks {
            let (v, shared) = t.await.unwrap();
            assert_eq!(v, 42);
            coalesced += usize::from(shared);
        }
        assert_eq!(queries.load(Ordering::SeqCst), 1);
        assert_eq!(coalesced, 7);
        assert!(flight.is_empty());

        let (v, shared) = flight.run(7, || async { 43 }).await;
        assert_eq!((v, shared), (43, false), "a later call queries afresh");
    }

    #[tokio::test]
    async fn a_cancelled_runner_hands_over_and_leaves_nothing_behind() {
        let flight = Arc::new(SingleFlight::<u32, u64>::new());
        let leader = {
            let flight = flight.clone();
            tokio::spawn(async move { flight.run(1, std::future::pending::<u64>).await })
        };
        while flight.participants(&1) < 1 {
            tokio::task::yield_now().await;
        }
        let follower = {
            let flight = flight.clone();
            tokio::spawn(async move { flight.run(1, || async { 5 }).await })
        };
        while flight.participants(&1) < 2 {
            tokio::task::yield_now().await;
        }
        leader.abort();
        let (v, shared) = follower.await.unwrap();
        assert_eq!((v, shared), (5, false), "the follower ran the query itself");
        assert!(flight.is_empty());

        let lone = {
            let flight = flight.clone();
            tokio::spawn(async move { flight.run(2, std::future::pending::<u64>).await })
        };
        while flight.participants(&2) < 1 {
            tokio::task::yield_now().await;
        }
        lone.abort();
        let _ = lone.await;
        assert!(flight.is_empty(), "a cancelled last caller removes its key");
    }
}
