//! Send calls waiting for the partition owner to sequence their record.
//!
//! A send registers under (sender_id, client_msg_id) before appending, and the owner
//! completes every waiter of that key with the stored message. The map holds at most
//! one entry per in-flight send: the guard returned by [`Waiters::register`] removes
//! its entry when the send returns, times out or is cancelled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use switchboard_proto::v1::Message;
use tokio::sync::oneshot;

type Key = (String, String);
type WaiterMap = HashMap<Key, Vec<(u64, oneshot::Sender<Message>)>>;

#[derive(Default)]
pub(crate) struct Waiters {
    /// A std mutex: inserts and removals only.
    map: Mutex<WaiterMap>,
    next_id: AtomicU64,
}

/// A registered waiter; dropping it unregisters.
pub(crate) struct Waiter {
    waiters: Arc<Waiters>,
    key: Key,
    id: u64,
    /// Completed with the stored message once sequenced.
    pub rx: oneshot::Receiver<Message>,
}

impl Waiters {
    pub fn register(self: &Arc<Self>, sender_id: &str, client_msg_id: &str) -> Waiter {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let key = (sender_id.to_owned(), client_msg_id.to_owned());
        let (tx, rx) = oneshot::channel();
        self.lock().entry(key.clone()).or_default().push((id, tx));
        Waiter {
            waiters: self.clone(),
            key,
            id,
            rx,
        }
    }

    /// Wake every send waiting for (sender, client_msg_id) with the stored message.
    pub fn complete(&self, message: &Message) {
        let key = (message.sender_id.clone(), message.client_msg_id.clone());
        let Some(waiting) = self.lock().remove(&key) else {
            return;
        };
        for (_, tx) in waiting {
            let _ = tx.send(message.clone());
        }
    }

    /// Sends waiting now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WaiterMap> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut map = self.waiters.lock();
        if let Some(list) = map.get_mut(&self.key) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn complete_wakes_all_waiters_of_the_key_and_guards_clean_up() {
        let waiters = Arc::new(Waiters::default());
        let mut a = waiters.register("u", "c1");
        let mut b = waiters.register("u", "c1");
        let other = waiters.register("u", "c2");
        assert_eq!(waiters.len(), 3);
        let msg = Message {
            sender_id: "u".into(),
            client_msg_id: "c1".into(),
            seq: 7,
            ..Message::default()
        };
        waiters.complete(&msg);
        assert_eq!((&mut a.rx).await.unwrap().seq, 7);
        assert_eq!((&mut b.rx).await.unwrap().seq, 7);
        drop((a, b));
        assert_eq!(waiters.len(), 1);
        drop(other);
        assert_eq!(
            waiters.len(),
            0,
            "a dropped waiter (timeout) leaves nothing behind"
        );
    }
}
