//! The local sessions of this gateway: who is connected, their bounded outbound
//! queues, and the per-session delivery state (watched users, last delivered sequence).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::Message as WsMessage;
use switchboard_proto::codec::{encode, Encoding, Payload};
use switchboard_proto::v1::{server_frame::Event, ServerFrame};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// Lock a std mutex, ignoring poisoning: every critical section here is a few map
/// operations that leave the data consistent even if a panic interrupted them.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The type of a server frame, for metrics and for the slow-consumer policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameKind {
    Welcome,
    Ack,
    Message,
    Receipt,
    Typing,
    Presence,
    Conversation,
    GoAway,
    Error,
    Resync,
    Empty,
}

impl FrameKind {
    pub(crate) fn of(frame: &ServerFrame) -> FrameKind {
        match &frame.event {
            Some(Event::Welcome(_)) => FrameKind::Welcome,
            Some(Event::Ack(_)) => FrameKind::Ack,
            Some(Event::Message(_)) => FrameKind::Message,
            Some(Event::Receipt(_)) => FrameKind::Receipt,
            Some(Event::Typing(_)) => FrameKind::Typing,
            Some(Event::Presence(_)) => FrameKind::Presence,
            Some(Event::Conversation(_)) => FrameKind::Conversation,
            Some(Event::Goaway(_)) => FrameKind::GoAway,
            Some(Event::Error(_)) => FrameKind::Error,
            Some(Event::Resync(_)) => FrameKind::Resync,
            None => FrameKind::Empty,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FrameKind::Welcome => "welcome",
            FrameKind::Ack => "ack",
            FrameKind::Message => "message",
            FrameKind::Receipt => "receipt",
            FrameKind::Typing => "typing",
            FrameKind::Presence => "presence",
            FrameKind::Conversation => "conversation",
            FrameKind::GoAway => "goaway",
            FrameKind::Error => "error",
            FrameKind::Resync => "resync",
            FrameKind::Empty => "empty",
        }
    }

    /// Ephemeral events may be dropped for a slow client; losing any other event
    /// would break the delivery contract, so the client is disconnected instead.
    pub(crate) fn is_ephemeral(self) -> bool {
        matches!(
            self,
            FrameKind::Typing | FrameKind::Presence | FrameKind::Receipt
        )
    }
}

/// A server frame encoded for one encoding. Shared (`Arc`) by every session of that
/// encoding that receives it, so a fan-out encodes each event at most twice.
#[derive(Debug)]
pub(crate) struct OutFrame {
    pub kind: FrameKind,
    pub message: WsMessage,
    /// Encoded size, counted against the queue's byte bound.
    pub bytes: usize,
}

impl OutFrame {
    pub(crate) fn encode(frame: &ServerFrame, encoding: Encoding) -> OutFrame {
        let payload = encode(frame, encoding);
        let bytes = payload.len();
        let message = match payload {
            Payload::Text(text) => WsMessage::Text(text.into()),
            Payload::Binary(bytes) => WsMessage::Binary(bytes.into()),
        };
        OutFrame {
            kind: FrameKind::of(frame),
            message,
            bytes,
        }
    }
}

/// Bounds of one session's outbound queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueLimits {
    /// Most frames queued (`gateway.outbound_queue`).
    pub frames: usize,
    /// Most encoded bytes queued (`gateway.outbound_queue_bytes`); a frame larger
    /// than this alone is still queued into an empty queue.
    pub bytes: usize,
}

/// Why a frame could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The queue holds `gateway.outbound_queue` frames or `gateway.outbound_queue_bytes`
    /// bytes already, or, for an ephemeral event, more than half of either: a client
    /// that falls behind loses typing, presence and receipts first, keeping room for
    /// the events it must not lose.
    Full,
    /// The connection is ending.
    Closed,
}

/// What the delivery path remembers per session, and its outbound queue.
#[derive(Default)]
pub(crate) struct DeliveryState {
    /// Frames waiting for the connection task, within `Session::queue`.
    /// A plain deque under the session's lock rather than a channel: an idle
    /// connection's empty deque allocates nothing.
    queue: VecDeque<Arc<OutFrame>>,
    /// Encoded bytes of the frames in `queue`.
    queued_bytes: usize,
    /// Set when the connection task stopped taking frames.
    closed: bool,
    /// Users whose presence events this session asked for (presence_watch).
    pub watched: HashSet<String>,
    /// Highest message sequence enqueued per conversation: a session never gets the
    /// same sequence twice on one connection. Holds only conversations that had
    /// traffic during this connection.
    pub last_seq: HashMap<String, u64>,
}

impl DeliveryState {
    /// Queue a frame without waiting.
    pub(crate) fn push(
        &mut self,
        frame: Arc<OutFrame>,
        limits: QueueLimits,
    ) -> Result<(), PushError> {
        if self.closed {
            return Err(PushError::Closed);
        }
        let bytes = self.queued_bytes.saturating_add(frame.bytes);
        let over_bytes = !self.queue.is_empty() && bytes > limits.bytes;
        if self.queue.len() >= limits.frames
            || over_bytes
            || (frame.kind.is_ephemeral()
                && (self.queue.len() * 2 > limits.frames
                    || (!self.queue.is_empty() && bytes.saturating_mul(2) > limits.bytes)))
        {
            return Err(PushError::Full);
        }
        self.queued_bytes = bytes;
        self.queue.push_back(frame);
        Ok(())
    }
}

/// The statuses a session can have in presence; the first is the default.
pub(crate) const SESSION_STATUSES: [&str; 4] = ["online", "away", "busy", "invisible"];

/// `status` as one of [`SESSION_STATUSES`], or `None` when it is not one.
pub(crate) fn session_status(status: &str) -> Option<&'static str> {
    SESSION_STATUSES.into_iter().find(|s| *s == status)
}

/// What a session is registered with in presence: the status the client last asked
/// for (the `status` connect parameter, then `presence_set`) and whether the idle
/// timer has set the session away. Presence may forget a session (a restart of its
/// memory store); registered again, the session must come back as it was, not as a
/// fresh "online" one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PresenceStatus {
    /// One of [`SESSION_STATUSES`].
    chosen: &'static str,
    /// The idle timer's automatic "away" is in effect.
    idle_away: bool,
}

/// Most conversations whose last forwarded typing time a session remembers; beyond
/// that, entries older than the typing interval are forgotten first.
const MAX_TYPING_CONVERSATIONS: usize = 256;

/// One connected client (one WebSocket), or the stand-in for one HTTP request.
pub(crate) struct Session {
    pub session_id: Arc<str>,
    pub user_id: Arc<str>,
    pub device_id: Arc<str>,
    /// The token's `bot` claim: sends of this session carry `from_bot`.
    pub bot: bool,
    pub encoding: Encoding,
    /// Bounds of the outbound queue.
    pub queue: QueueLimits,
    /// Delivery state and outbound queue, locked only for map and queue operations
    /// (never across an await), so "seq not yet delivered" and the enqueue are atomic.
    pub delivery: Mutex<DeliveryState>,
    /// Wakes the connection task when frames were queued.
    outbound_notify: Notify,
    /// Set once when the session must close because its queue overflowed.
    slow: AtomicBool,
    /// Wakes the connection task when `slow` is set.
    slow_notify: Notify,
    /// When this session last forwarded `typing: true`, per conversation (the
    /// typing rate limit). Empty, and allocation free, until the client types.
    typing: Mutex<HashMap<Box<str>, Instant>>,
    /// The status to register the session with (see [`PresenceStatus`]).
    presence_status: Mutex<PresenceStatus>,
}

impl Session {
    /// A session of a human account; see [`Session::for_account`].
    #[cfg(test)]
    pub(crate) fn new(
        session_id: Arc<str>,
        user_id: Arc<str>,
        device_id: Arc<str>,
        encoding: Encoding,
        queue_capacity: usize,
    ) -> Arc<Session> {
        Session::for_account(
            session_id,
            user_id,
            false,
            device_id,
            encoding,
            QueueLimits {
                frames: queue_capacity,
                bytes: usize::MAX,
            },
        )
    }

    /// A session of `user_id`, a bot account when `bot` (the token's `bot` claim).
    pub(crate) fn for_account(
        session_id: Arc<str>,
        user_id: Arc<str>,
        bot: bool,
        device_id: Arc<str>,
        encoding: Encoding,
        queue: QueueLimits,
    ) -> Arc<Session> {
        Arc::new(Session {
            session_id,
            user_id,
            device_id,
            bot,
            encoding,
            queue,
            delivery: Mutex::new(DeliveryState::default()),
            outbound_notify: Notify::new(),
            slow: AtomicBool::new(false),
            slow_notify: Notify::new(),
            typing: Mutex::new(HashMap::new()),
            presence_status: Mutex::new(PresenceStatus {
                chosen: SESSION_STATUSES[0],
                idle_away: false,
            }),
        })
    }

    /// Remember the status the client asked for (one of [`SESSION_STATUSES`]).
    pub(crate) fn choose_status(&self, status: &'static str) {
        lock(&self.presence_status).chosen = status;
    }

    /// Remember whether the idle timer's automatic "away" is in effect.
    pub(crate) fn set_idle_away(&self, idle_away: bool) {
        lock(&self.presence_status).idle_away = idle_away;
    }

    /// The status and `automatic` flag to register the session with: what the client
    /// chose, or an automatic "away" when the idle timer set a session the client
    /// left "online" away (presence lets an automatic away replace only "online").
    pub(crate) fn registration_status(&self) -> (&'static str, bool) {
        let status = *lock(&self.presence_status);
        if status.idle_away && status.chosen == SESSION_STATUSES[0] {
            ("away", true)
        } else {
            (status.chosen, false)
        }
    }

    /// Whether a `typing: true` in `conversation` may be forwarded at `now`: false
    /// when the last forwarded one was less than `interval` ago.
    pub(crate) fn typing_allowed(
        &self,
        conversation: &str,
        now: Instant,
        interval: Duration,
    ) -> bool {
        lock(&self.typing)
            .get(conversation)
            .is_none_or(|last| now.saturating_duration_since(*last) >= interval)
    }

    /// Remember that a `typing: true` in `conversation` was forwarded at `now`.
    pub(crate) fn typing_forwarded(&self, conversation: &str, now: Instant, interval: Duration) {
        let mut typing = lock(&self.typing);
        if typing.len() >= MAX_TYPING_CONVERSATIONS && !typing.contains_key(conversation) {
            typing.retain(|_, last| now.saturating_duration_since(*last) < interval);
            if typing.len() >= MAX_TYPING_CONVERSATIONS {
                // Every entry is recent: forgetting them lets at most one extra typing
                // event per conversation through.
                typing.clear();
            }
        }
        typing.insert(conversation.into(), now);
    }

    /// Tell the connection task that frames are queued (call after unlocking).
    pub(crate) fn wake_writer(&self) {
        // notify_one keeps a permit when the task is busy, so no wakeup is lost.
        self.outbound_notify.notify_one();
    }

    /// Completes after `wake_writer`: frames were queued, or the connection must look
    /// at the session's and the gateway's state (slow mark, drain, close).
    pub(crate) async fn outbound_ready(&self) {
        self.outbound_notify.notified().await;
    }

    /// Move up to `max` queued frames into `out`; true when more remain.
    pub(crate) fn take_batch(&self, out: &mut Vec<Arc<OutFrame>>, max: usize) -> bool {
        let mut state = lock(&self.delivery);
        let n = state.queue.len().min(max);
        let start = out.len();
        out.extend(state.queue.drain(..n));
        let taken: usize = out[start..].iter().map(|f| f.bytes).sum();
        state.queued_bytes = state.queued_bytes.saturating_sub(taken);
        if state.queue.is_empty() && state.queue.capacity() > 16 {
            // Give back what a burst needed; idle connections stay small.
            state.queue.shrink_to_fit();
        }
        !state.queue.is_empty()
    }

    /// Stop accepting frames; returns how many queued frames are dropped.
    pub(crate) fn close_outbound(&self) -> usize {
        let mut state = lock(&self.delivery);
        state.closed = true;
        let dropped = state.queue.len();
        state.queue = VecDeque::new();
        state.queued_bytes = 0;
        dropped
    }

    /// Mark the session as a slow consumer. Returns true the first time.
    pub(crate) fn mark_slow(&self) -> bool {
        let first = !self.slow.swap(true, Ordering::SeqCst);
        if first {
            // notify_one stores a permit when nobody waits, so the wakeup is not lost:
            // one for a write in progress, one for the connection's loop.
            self.slow_notify.notify_one();
            self.wake_writer();
        }
        first
    }

    pub(crate) fn is_slow(&self) -> bool {
        self.slow.load(Ordering::SeqCst)
    }

    /// Completes when the session was marked slow.
    pub(crate) async fn slow_marked(&self) {
        if self.is_slow() {
            return;
        }
        self.slow_notify.notified().await;
    }
}

/// Every session on this gateway, by id and by user.
#[derive(Default)]
pub(crate) struct SessionRegistry {
    inner: Mutex<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    by_id: HashMap<Arc<str>, Arc<Session>>,
    /// A user's sessions on this gateway (usually one or two devices).
    by_user: HashMap<Arc<str>, Vec<Arc<Session>>>,
}

impl SessionRegistry {
    #[cfg(test)]
    pub(crate) fn insert(&self, session: Arc<Session>) {
        assert!(self.try_insert(session, usize::MAX));
    }

    /// Add a session unless its user has `max_per_user` sessions here already
    /// (`gateway.max_connections_per_user`); false when refused.
    pub(crate) fn try_insert(&self, session: Arc<Session>, max_per_user: usize) -> bool {
        let mut inner = lock(&self.inner);
        let list = inner.by_user.entry(session.user_id.clone()).or_default();
        if list.len() >= max_per_user {
            if list.is_empty() {
                inner.by_user.remove(&session.user_id);
            }
            return false;
        }
        list.push(session.clone());
        inner.by_id.insert(session.session_id.clone(), session);
        true
    }

    /// Remove a session; false when it was not (or no longer) registered.
    pub(crate) fn remove(&self, session_id: &str) -> bool {
        let mut inner = lock(&self.inner);
        let Some(session) = inner.by_id.remove(session_id) else {
            return false;
        };
        if let Some(list) = inner.by_user.get_mut(&session.user_id) {
            list.retain(|s| &*s.session_id != session_id);
            if list.is_empty() {
                inner.by_user.remove(&session.user_id);
            }
        }
        true
    }

    pub(crate) fn get(&self, session_id: &str) -> Option<Arc<Session>> {
        lock(&self.inner).by_id.get(session_id).cloned()
    }

    /// The sessions of `user`, appended to `out`; false when the user has none here.
    pub(crate) fn sessions_of(&self, user: &str, out: &mut Vec<Arc<Session>>) -> bool {
        match lock(&self.inner).by_user.get(user) {
            Some(list) => {
                out.extend(list.iter().cloned());
                true
            }
            None => false,
        }
    }

    /// Every live session.
    pub(crate) fn all(&self) -> Vec<Arc<Session>> {
        lock(&self.inner).by_id.values().cloned().collect()
    }

    pub(crate) fn session_ids(&self) -> Vec<Arc<str>> {
        lock(&self.inner).by_id.keys().cloned().collect()
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.inner).by_id.len()
    }
}

/// Counts open connections (from the accepted upgrade request to the end of the
/// connection task) against `gateway.max_connections`, and lets draining wait for zero.
pub(crate) struct ConnectionSlots {
    open: watch::Sender<usize>,
    max: usize,
    gauge: prometheus::IntGauge,
}

impl ConnectionSlots {
    pub(crate) fn new(max: usize, gauge: prometheus::IntGauge) -> Arc<ConnectionSlots> {
        Arc::new(ConnectionSlots {
            open: watch::Sender::new(0),
            max,
            gauge,
        })
    }

    /// Take a slot, or None at capacity.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<SlotGuard> {
        let max = self.max;
        let taken = self.open.send_if_modified(|n| {
            if *n >= max {
                false
            } else {
                *n += 1;
                true
            }
        });
        taken.then(|| {
            self.gauge.inc();
            SlotGuard(self.clone())
        })
    }

    pub(crate) fn open(&self) -> usize {
        *self.open.borrow()
    }

    /// Completes when no connection is open.
    pub(crate) async fn all_closed(&self) {
        let mut rx = self.open.subscribe();
        // The sender lives as long as `self`, so wait_for cannot fail here.
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

/// One open connection's slot, released on drop.
pub(crate) struct SlotGuard(Arc<ConnectionSlots>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.open.send_modify(|n| *n = n.saturating_sub(1));
        self.0.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str, user: &str) -> Arc<Session> {
        Session::new(id.into(), user.into(), "d".into(), Encoding::Json, 4)
    }

    #[test]
    fn registry_indexes_by_user_and_forgets_removed_sessions() {
        let reg = SessionRegistry::default();
        reg.insert(session("s1", "alice"));
        reg.insert(session("s2", "alice"));
        reg.insert(session("s3", "bob"));
        let mut out = Vec::new();
        assert!(reg.sessions_of("alice", &mut out));
        assert_eq!(out.len(), 2);
        assert!(reg.remove("s1"));
        assert!(!reg.remove("s1"));
        assert!(reg.remove("s2"));
        out.clear();
        assert!(!reg.sessions_of("alice", &mut out));
        assert_eq!(reg.len(), 1);
    }

    #[test]
    fn a_user_has_at_most_max_sessions_and_gets_room_back_on_close() {
        let reg = SessionRegistry::default();
        assert!(reg.try_insert(session("s1", "alice"), 2));
        assert!(reg.try_insert(session("s2", "alice"), 2));
        assert!(!reg.try_insert(session("s3", "alice"), 2));
        assert!(reg.get("s3").is_none());
        assert!(reg.try_insert(session("s4", "bob"), 2));
        assert!(reg.remove("s1"));
        assert!(reg.try_insert(session("s3", "alice"), 2));
    }

    #[tokio::test]
    async fn slots_cap_connections_and_report_when_all_closed() {
        let gauge = prometheus::IntGauge::new("g", "g").unwrap();
        let slots = ConnectionSlots::new(2, gauge.clone());
        let a = slots.try_acquire().unwrap();
        let b = slots.try_acquire().unwrap();
        assert!(slots.try_acquire().is_none());
        assert_eq!(gauge.get(), 2);
        drop(a);
        assert_eq!(slots.open(), 1);
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.all_closed().await })
        };
        drop(b);
        waiter.await.unwrap();
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn the_outbound_queue_is_bounded_and_closable() {
        let s = session("s", "u");
        let frame = Arc::new(OutFrame::encode(&ServerFrame::default(), Encoding::Json));
        let mut state = lock(&s.delivery);
        for _ in 0..4 {
            state.push(frame.clone(), s.queue).unwrap();
        }
        assert_eq!(state.push(frame.clone(), s.queue), Err(PushError::Full));
        drop(state);
        let mut out = Vec::new();
        assert!(s.take_batch(&mut out, 3));
        assert!(!s.take_batch(&mut out, 3));
        assert_eq!(out.len(), 4);
        lock(&s.delivery).push(frame.clone(), s.queue).unwrap();
        assert_eq!(s.close_outbound(), 1);
        assert_eq!(
            lock(&s.delivery).push(frame, s.queue),
            Err(PushError::Closed)
        );
    }

    #[test]
    fn ephemeral_events_stop_at_half_the_queue_and_messages_do_not() {
        let s = session("s", "u");
        let typing = Arc::new(OutFrame::encode(
            &ServerFrame {
                event: Some(Event::Typing(Default::default())),
            },
            Encoding::Json,
        ));
        let message = Arc::new(OutFrame::encode(
            &ServerFrame {
                event: Some(Event::Message(Default::default())),
            },
            Encoding::Json,
        ));
        let mut state = lock(&s.delivery);
        // Capacity 4: ephemeral events fit while at most 2 frames are queued.
        state.push(typing.clone(), s.queue).unwrap();
        state.push(typing.clone(), s.queue).unwrap();
        state.push(typing.clone(), s.queue).unwrap();
        assert_eq!(state.push(typing.clone(), s.queue), Err(PushError::Full));
        state.push(message.clone(), s.queue).unwrap();
        assert_eq!(state.push(message, s.queue), Err(PushError::Full));
    }

    #[test]
    fn the_outbound_queue_is_bounded_by_bytes_too() {
        let message = |body: usize| {
            Arc::new(OutFrame::encode(
                &ServerFrame {
                    event: Some(Event::Message(switchboard_proto::v1::MessageEvent {
                        message: Some(switchboard_proto::v1::Message {
                            body: "x".repeat(body),
                            ..Default::default()
                        }),
                    })),
                },
                Encoding::Json,
            ))
        };
        let typing = Arc::new(OutFrame::encode(
            &ServerFrame {
                event: Some(Event::Typing(Default::default())),
            },
            Encoding::Json,
        ));
        let m = message(1_000);
        assert!(typing.bytes * 2 < m.bytes);
        let s = Session::for_account(
            "s".into(),
            "u".into(),
            false,
            "d".into(),
            Encoding::Json,
            QueueLimits {
                frames: 100,
                bytes: 3 * m.bytes,
            },
        );
        // One frame above the bound still goes into an empty queue, alone.
        lock(&s.delivery).push(message(10_000), s.queue).unwrap();
        assert_eq!(
            lock(&s.delivery).push(m.clone(), s.queue),
            Err(PushError::Full)
        );
        let mut out = Vec::new();
        assert!(!s.take_batch(&mut out, 10));
        // Taken frames give their bytes back.
        let mut state = lock(&s.delivery);
        for _ in 0..3 {
            state.push(m.clone(), s.queue).unwrap();
        }
        assert_eq!(state.push(m.clone(), s.queue), Err(PushError::Full));
        drop(state);
        out.clear();
        s.take_batch(&mut out, 10);
        // Ephemeral events stop at half the bytes.
        let mut state = lock(&s.delivery);
        state.push(m.clone(), s.queue).unwrap();
        state.push(typing.clone(), s.queue).unwrap();
        state.push(m.clone(), s.queue).unwrap();
        assert_eq!(state.push(typing, s.queue), Err(PushError::Full));
    }

    #[test]
    fn typing_is_limited_per_conversation() {
        let s = session("s", "u");
        let start = Instant::now();
        let interval = Duration::from_secs(1);
        assert!(s.typing_allowed("c1", start, interval));
        s.typing_forwarded("c1", start, interval);
        assert!(!s.typing_allowed("c1", start + interval / 2, interval));
        assert!(s.typing_allowed("c2", start, interval));
        assert!(s.typing_allowed("c1", start + interval, interval));
        // The memory is bounded: old entries go first.
        for i in 0..MAX_TYPING_CONVERSATIONS + 10 {
            s.typing_forwarded(&format!("x{i}"), start + interval * 2, interval);
        }
        assert!(lock(&s.typing).len() <= MAX_TYPING_CONVERSATIONS);
    }

    #[tokio::test]
    async fn slow_mark_wakes_a_later_waiter() {
        let s = session("s", "u");
        assert!(s.mark_slow());
        assert!(!s.mark_slow());
        s.slow_marked().await;
    }
}
