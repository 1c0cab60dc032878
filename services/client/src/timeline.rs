//! Per-conversation ordering on the client side: drop duplicates, hold messages that
//! arrive ahead of a gap, fill gaps from history, and produce sync cursors.
//!
//! Every timeline event counts, whatever its kind: edits, deletes, reactions and
//! system events have their own sequences like messages, so they are ordered, held
//! and filled the same way. The timeline keeps no delivered messages; it releases
//! events in sequence order, so an edit, delete or reaction always comes after the
//! message it targets, and the application applies it to the message it holds
//! with [`apply_event`]. (A held message is never edited in place: the events
//! targeting it are held too and released right after it.)
//!
//! [`Timeline`] is a plain struct; its async methods take the history source as an
//! argument ([`HistorySource`], implemented by [`Client`]), so it is tested without a
//! connection.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;

use switchboard_proto::v1::{HistoryResult, Message, ReactionCount, SyncCursor, SyncResult};

use crate::{Client, ClientError, Direction};

/// Messages asked for per history page while filling a gap (the server's maximum).
pub const FILL_PAGE: u32 = 200;

/// Default bound on messages held ahead of a gap, per conversation.
pub const DEFAULT_MAX_AHEAD: usize = 1024;

/// A hole in a conversation's timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub conversation_id: String,
    /// The next sequence the timeline needs.
    pub expected: u64,
    /// The sequence that showed the hole: the message that arrived ahead, or the
    /// highest sequence the server reported.
    pub got: u64,
}

/// What [`Timeline::observe`] made of one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    /// The message extended the timeline; it comes first, followed by any held
    /// messages it made contiguous, in sequence order. Also used, alone, for a
    /// message without a sequence (seq 0), which is passed through untracked.
    InOrder(Vec<Message>),
    /// The sequence was already seen (at or below the contiguous point, or already
    /// held): the message is dropped.
    Duplicate { seq: u64 },
    /// The message is ahead of the timeline and is held (or dropped, if the hold is
    /// full: filling from history fetches it again) until the gap is filled.
    Gap(Gap),
}

/// Where the timeline reads missing messages from.
pub trait HistorySource {
    /// Messages of `conversation_id` with sequence above `after_seq`, oldest first,
    /// at most `limit`.
    fn history_after(
        &self,
        conversation_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> impl Future<Output = Result<HistoryResult, ClientError>> + Send;
}

impl HistorySource for Client {
    fn history_after(
        &self,
        conversation_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> impl Future<Output = Result<HistoryResult, ClientError>> + Send {
        self.history(conversation_id, after_seq, Direction::Forward, limit)
    }
}

#[derive(Debug, Default)]
struct Track {
    /// Every sequence up to here was delivered.
    contiguous: u64,
    /// Highest sequence known to exist (seen or reported by the server).
    high_water: u64,
    /// Messages that arrived ahead of `contiguous + 1`, by sequence.
    ahead: BTreeMap<u64, Message>,
}

impl Track {
    fn gap(&self, conversation_id: &str) -> Option<Gap> {
        (self.contiguous < self.high_water).then(|| Gap {
            conversation_id: conversation_id.to_owned(),
            expected: self.contiguous + 1,
            got: self.ahead.keys().next().copied().unwrap_or(self.high_water),
        })
    }
}

/// The delivery state of every conversation a client follows.
#[derive(Debug)]
pub struct Timeline {
    conversations: HashMap<String, Track>,
    /// Bound on held messages per conversation.
    max_ahead: usize,
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline::new()
    }
}

impl Timeline {
    pub fn new() -> Timeline {
        Timeline::with_max_ahead(DEFAULT_MAX_AHEAD)
    }

    /// A timeline holding at most `max_ahead` messages ahead of a gap per conversation.
    pub fn with_max_ahead(max_ahead: usize) -> Timeline {
        Timeline {
            conversations: HashMap::new(),
            max_ahead,
        }
    }

    /// Start following a conversation from `last_seq` (messages up to it count as
    /// delivered), e.g. from a conversation's `last_seq` when it was created or
    /// listed. No effect on a conversation already followed. A conversation first
    /// met in [`Timeline::observe`] is followed from 0.
    pub fn track(&mut self, conversation_id: &str, last_seq: u64) {
        if !self.conversations.contains_key(conversation_id) {
            self.conversations.insert(
                conversation_id.to_owned(),
                Track {
                    contiguous: last_seq,
                    high_water: last_seq,
                    ahead: BTreeMap::new(),
                },
            );
        }
    }

    /// The server says the conversation holds messages up to `last_seq`: anything
    /// above the contiguous point becomes a gap to fill.
    pub fn note_last_seq(&mut self, conversation_id: &str, last_seq: u64) {
        let track = self.track_mut(conversation_id);
        track.high_water = track.high_water.max(last_seq);
    }

    fn track_mut(&mut self, conversation_id: &str) -> &mut Track {
        // Look up first so that following a known conversation does not allocate.
        if !self.conversations.contains_key(conversation_id) {
            self.conversations
                .insert(conversation_id.to_owned(), Track::default());
        }
        self.conversations
            .get_mut(conversation_id)
            .expect("inserted above")
    }

    /// Take one incoming message (from an event, a history page or a sync).
    pub fn observe(&mut self, message: Message) -> Observed {
        let seq = message.seq;
        if seq == 0 {
            return Observed::InOrder(vec![message]);
        }
        let max_ahead = self.max_ahead;
        let track = self.track_mut(&message.conversation_id);
        if seq <= track.contiguous || track.ahead.contains_key(&seq) {
            return Observed::Duplicate { seq };
        }
        track.high_water = track.high_water.max(seq);
        if seq == track.contiguous + 1 {
            track.contiguous = seq;
            let mut delivered = vec![message];
            while let Some(next) = track.ahead.remove(&(track.contiguous + 1)) {
                track.contiguous += 1;
                delivered.push(next);
            }
            return Observed::InOrder(delivered);
        }
        let gap = Gap {
            conversation_id: message.conversation_id.clone(),
            expected: track.contiguous + 1,
            got: seq,
        };
        if track.ahead.len() < max_ahead {
            track.ahead.insert(seq, message);
        }
        Observed::Gap(gap)
    }

    /// Observe several messages; returns those delivered in order.
    pub fn observe_all(&mut self, messages: impl IntoIterator<Item = Message>) -> Vec<Message> {
        let mut delivered = Vec::new();
        for message in messages {
            if let Observed::InOrder(mut in_order) = self.observe(message) {
                delivered.append(&mut in_order);
            }
        }
        delivered
    }

    /// The contiguous point of a conversation, if it is followed.
    pub fn last_seq(&self, conversation_id: &str) -> Option<u64> {
        self.conversations
            .get(conversation_id)
            .map(|t| t.contiguous)
    }

    /// Messages held ahead of a gap in a conversation.
    pub fn held(&self, conversation_id: &str) -> usize {
        self.conversations
            .get(conversation_id)
            .map_or(0, |t| t.ahead.len())
    }

    /// The gap of one conversation, if it has one.
    pub fn gap(&self, conversation_id: &str) -> Option<Gap> {
        self.conversations
            .get(conversation_id)
            .and_then(|t| t.gap(conversation_id))
    }

    /// Every open gap, by conversation id.
    pub fn gaps(&self) -> Vec<Gap> {
        let mut gaps: Vec<Gap> = self
            .conversations
            .iter()
            .filter_map(|(id, t)| t.gap(id))
            .collect();
        gaps.sort_by(|a, b| a.conversation_id.cmp(&b.conversation_id));
        gaps
    }

    /// Cursors for a `sync` after a reconnect: the contiguous point of every
    /// followed conversation, by conversation id.
    pub fn cursors(&self) -> Vec<SyncCursor> {
        let mut cursors: Vec<SyncCursor> = self
            .conversations
            .iter()
            .map(|(id, t)| SyncCursor {
                conversation_id: id.clone(),
                last_seq: t.contiguous,
            })
            .collect();
        cursors.sort_by(|a, b| a.conversation_id.cmp(&b.conversation_id));
        cursors
    }

    /// Fill a conversation's gap from history, page by page forward from the
    /// contiguous point, until no gap is left or history has nothing more. Returns
    /// the messages delivered in order (fetched ones and held ones they unblocked).
    pub async fn fill<H: HistorySource>(
        &mut self,
        source: &H,
        conversation_id: &str,
    ) -> Result<Vec<Message>, ClientError> {
        self.fill_pages(source, conversation_id, false).await
    }

    /// `fill`, but keep paging while history says it has more even with no known
    /// gap (for conversations a sync reported as truncated).
    async fn fill_pages<H: HistorySource>(
        &mut self,
        source: &H,
        conversation_id: &str,
        mut more: bool,
    ) -> Result<Vec<Message>, ClientError> {
        let mut delivered = Vec::new();
        loop {
            let track = self.track_mut(conversation_id);
            if track.contiguous >= track.high_water && !more {
                return Ok(delivered);
            }
            let before = track.contiguous;
            let page = source
                .history_after(conversation_id, before, FILL_PAGE)
                .await?;
            more = page.has_more;
            delivered.extend(self.observe_all(page.messages));
            let after = self.track_mut(conversation_id).contiguous;
            if after == before {
                // History did not advance the timeline: the missing sequences are
                // not (yet) available. Leave the gap open rather than loop.
                if after < self.track_mut(conversation_id).high_water {
                    tracing::debug!(
                        conversation_id,
                        expected = after + 1,
                        "gap not fillable from history yet"
                    );
                }
                return Ok(delivered);
            }
        }
    }

    /// Fill every open gap. Returns the messages delivered in order.
    pub async fn fill_gaps<H: HistorySource>(
        &mut self,
        source: &H,
    ) -> Result<Vec<Message>, ClientError> {
        let mut delivered = Vec::new();
        for gap in self.gaps() {
            delivered.extend(self.fill(source, &gap.conversation_id).await?);
        }
        Ok(delivered)
    }

    /// Take a sync result: follow new conversations, note every conversation's
    /// last sequence and observe the missed messages. Returns the messages delivered
    /// in order; conversations left with a gap (including truncated ones) need
    /// [`Timeline::fill`] (or use [`Timeline::resync`], which does both).
    pub fn apply_sync(&mut self, result: &SyncResult) -> Vec<Message> {
        for conversation in &result.conversations {
            self.note_last_seq(&conversation.conversation_id, conversation.last_seq);
        }
        self.observe_all(result.messages.iter().cloned())
    }

    /// After a reconnect: sync from the cursors, then fill what the sync left open
    /// (gaps and truncated conversations). Returns the messages delivered in order.
    pub async fn resync(
        &mut self,
        client: &Client,
        limit_per_conversation: u32,
    ) -> Result<Vec<Message>, ClientError> {
        let result = client.sync(self.cursors(), limit_per_conversation).await?;
        let mut delivered = self.apply_sync(&result);
        for conversation_id in &result.truncated {
            delivered.extend(self.fill_pages(client, conversation_id, true).await?);
        }
        delivered.extend(self.fill_gaps(client).await?);
        Ok(delivered)
    }
}

/// The kind of a timeline event (`Message::kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A message (also an empty kind).
    Message,
    /// A new body for the message at `target_seq`.
    Edit,
    /// The message at `target_seq` was deleted.
    Delete,
    /// A reaction added to (or, with `remove`, taken from) the message at `target_seq`.
    Reaction,
    /// A membership or settings change (`system`).
    System,
    /// A kind this client does not know; it still takes its place in the timeline.
    Other,
}

impl EventKind {
    pub fn of(message: &Message) -> EventKind {
        match message.kind.as_str() {
            "" | "message" => EventKind::Message,
            "edit" => EventKind::Edit,
            "delete" => EventKind::Delete,
            "reaction" => EventKind::Reaction,
            "system" => EventKind::System,
            _ => EventKind::Other,
        }
    }
}

/// Apply an edit, delete or reaction `event` to the message it targets, bringing a
/// held copy to the state history would return (`me` is the user the copy is held
/// for, who owns the `mine` flags). Returns false, changing nothing, when the event
/// is of another kind, targets another message, or no longer applies (the target
/// is deleted). Reactions of other users are counted as they arrive: an event the
/// server treated as a no-op (the same user adding the same emoji twice) can make
/// their counts differ from history's, which stays authoritative.
pub fn apply_event(target: &mut Message, event: &Message, me: &str) -> bool {
    if event.conversation_id != target.conversation_id
        || event.target_seq != target.seq
        || EventKind::of(target) != EventKind::Message
        || target.deleted
    {
        return false;
    }
    match EventKind::of(event) {
        EventKind::Edit => {
            target.body = event.body.clone();
            target.content_type = event.content_type.clone();
            target.edited_at_ms = event.sent_at_ms;
        }
        EventKind::Delete => {
            target.body.clear();
            target.content_type.clear();
            target.deleted = true;
            target.reactions.clear();
        }
        EventKind::Reaction => apply_reaction(target, event, me),
        _ => return false,
    }
    true
}

fn apply_reaction(target: &mut Message, event: &Message, me: &str) {
    let mine = event.sender_id == me;
    let index = target.reactions.iter().position(|r| r.emoji == event.emoji);
    match (index, event.remove) {
        (Some(i), true) => {
            let reaction = &mut target.reactions[i];
            if mine && !reaction.mine {
                return;
            }
            reaction.count = reaction.count.saturating_sub(1);
            reaction.mine &= !mine;
            if reaction.count == 0 {
                target.reactions.remove(i);
            }
        }
        (None, true) => {}
        (Some(i), false) => {
            let reaction = &mut target.reactions[i];
            if mine && reaction.mine {
                return;
            }
            reaction.count += 1;
            reaction.mine |= mine;
        }
        (None, false) => {
            target.reactions.push(ReactionCount {
                emoji: event.emoji.clone(),
                count: 1,
                mine,
            });
            target.reactions.sort_by(|a, b| a.emoji.cmp(&b.emoji));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn msg(conversation_id: &str, seq: u64) -> Message {
        Message {
            conversation_id: conversation_id.into(),
            seq,
            message_id: format!("{conversation_id}-{seq}"),
            ..Default::default()
        }
    }

    fn seqs(messages: &[Message]) -> Vec<u64> {
        messages.iter().map(|m| m.seq).collect()
    }

    /// History of one conversation, served in pages like the server does.
    struct FakeHistory {
        messages: Vec<Message>,
        page: usize,
        calls: AtomicUsize,
    }

    impl FakeHistory {
        fn new(conversation_id: &str, up_to: u64, page: usize) -> FakeHistory {
            FakeHistory {
                messages: (1..=up_to).map(|s| msg(conversation_id, s)).collect(),
                page,
                calls: AtomicUsize::new(0),
            }
        }
    }

    impl HistorySource for FakeHistory {
        fn history_after(
            &self,
            conversation_id: &str,
            after_seq: u64,
            limit: u32,
        ) -> impl Future<Output = Result<HistoryResult, ClientError>> + Send {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let limit = self.page.min(limit as usize);
            let after: Vec<Message> = self
                .messages
                .iter()
                .filter(|m| m.conversation_id == conversation_id && m.seq > after_seq)
                .cloned()
                .collect();
            let has_more = after.len() > limit;
            std::future::ready(Ok(HistoryResult {
                conversation_id: conversation_id.into(),
                messages: after.into_iter().take(limit).collect(),
                has_more,
            }))
        }
    }

    fn event(seq: u64, kind: &str, target_seq: u64, sender: &str) -> Message {
        Message {
            kind: kind.into(),
            target_seq,
            sender_id: sender.into(),
            ..msg("c", seq)
        }
    }

    #[test]
    fn every_event_kind_takes_its_place_and_gaps_count_them() {
        let mut t = Timeline::new();
        assert!(matches!(t.observe(msg("c", 1)), Observed::InOrder(_)));
        // 2 (an edit) and 3 (a reaction) are missing; the system event 4 is held.
        let system = Message {
            system: Some(switchboard_proto::v1::SystemEvent {
                action: "renamed".into(),
                name: "new".into(),
                ..Default::default()
            }),
            ..event(4, "system", 0, "alice")
        };
        assert_eq!(
            t.observe(system),
            Observed::Gap(Gap {
                conversation_id: "c".into(),
                expected: 2,
                got: 4
            })
        );
        assert!(matches!(
            t.observe(event(2, "edit", 1, "alice")),
            Observed::InOrder(_)
        ));
        let Observed::InOrder(released) = t.observe(event(3, "reaction", 1, "bob")) else {
            panic!("3 closes the gap");
        };
        assert_eq!(seqs(&released), vec![3, 4]);
        let kinds: Vec<EventKind> = released.iter().map(EventKind::of).collect();
        assert_eq!(kinds, [EventKind::Reaction, EventKind::System]);
        assert_eq!(t.last_seq("c"), Some(4));
        assert_eq!(EventKind::of(&msg("c", 9)), EventKind::Message);
    }

    #[test]
    fn edits_deletes_and_reactions_apply_to_the_held_message() {
        let mut original = Message {
            body: "helo".into(),
            content_type: "text/plain".into(),
            sender_id: "alice".into(),
            ..msg("c", 1)
        };
        let edit = Message {
            body: "hello".into(),
            content_type: "text/markdown".into(),
            sent_at_ms: 77,
            ..event(2, "edit", 1, "alice")
        };
        assert!(apply_event(&mut original, &edit, "bob"));
        assert_eq!(
            (original.body.as_str(), original.content_type.as_str()),
            ("hello", "text/markdown")
        );
        assert_eq!(original.edited_at_ms, 77);

        let react = |seq, sender: &str, emoji: &str, remove| Message {
            emoji: emoji.into(),
            remove,
            ..event(seq, "reaction", 1, sender)
        };
        assert!(apply_event(
            &mut original,
            &react(3, "bob", "👍", false),
            "bob"
        ));
        assert!(apply_event(
            &mut original,
            &react(4, "carol", "👍", false),
            "bob"
        ));
        assert!(apply_event(
            &mut original,
            &react(5, "carol", "🎉", false),
            "bob"
        ));
        // bob's second identical reaction is a no-op, as on the server.
        assert!(apply_event(
            &mut original,
            &react(6, "bob", "👍", false),
            "bob"
        ));
        let counts: Vec<(&str, u32, bool)> = original
            .reactions
            .iter()
            .map(|r| (r.emoji.as_str(), r.count, r.mine))
            .collect();
        // Sorted by emoji, as history returns them.
        assert_eq!(counts, [("🎉", 1, false), ("👍", 2, true)]);
        assert!(apply_event(
            &mut original,
            &react(7, "bob", "👍", true),
            "bob"
        ));
        assert!(apply_event(
            &mut original,
            &react(8, "carol", "🎉", true),
            "bob"
        ));
        let counts: Vec<(&str, u32, bool)> = original
            .reactions
            .iter()
            .map(|r| (r.emoji.as_str(), r.count, r.mine))
            .collect();
        assert_eq!(counts, [("👍", 1, false)]);

        // Events for another message or of another kind change nothing.
        assert!(!apply_event(
            &mut original,
            &event(9, "edit", 5, "alice"),
            "bob"
        ));
        assert!(!apply_event(
            &mut original,
            &event(9, "system", 1, "alice"),
            "bob"
        ));

        assert!(apply_event(
            &mut original,
            &event(10, "delete", 1, "alice"),
            "bob"
        ));
        assert!(original.deleted);
        assert!(original.body.is_empty() && original.content_type.is_empty());
        assert!(original.reactions.is_empty());
        // A deleted message takes no more edits or reactions.
        assert!(!apply_event(&mut original, &edit, "bob"));
        assert!(!apply_event(
            &mut original,
            &react(11, "bob", "👍", false),
            "bob"
        ));
        assert!(original.body.is_empty());
    }

    #[test]
    fn in_order_messages_pass_and_duplicates_are_dropped() {
        let mut t = Timeline::new();
        assert_eq!(t.observe(msg("c", 1)), Observed::InOrder(vec![msg("c", 1)]));
        assert_eq!(t.observe(msg("c", 2)), Observed::InOrder(vec![msg("c", 2)]));
        assert_eq!(t.observe(msg("c", 2)), Observed::Duplicate { seq: 2 });
        assert_eq!(t.observe(msg("c", 1)), Observed::Duplicate { seq: 1 });
        assert_eq!(t.last_seq("c"), Some(2));
        assert_eq!(t.gaps(), vec![]);
    }

    #[test]
    fn a_message_ahead_reports_the_gap_and_is_held_until_the_gap_closes() {
        let mut t = Timeline::new();
        t.track("c", 3);
        let gap = Gap {
            conversation_id: "c".into(),
            expected: 4,
            got: 6,
        };
        assert_eq!(t.observe(msg("c", 6)), Observed::Gap(gap.clone()));
        assert_eq!(t.observe(msg("c", 6)), Observed::Duplicate { seq: 6 });
        assert!(matches!(t.observe(msg("c", 7)), Observed::Gap(_)));
        assert_eq!(t.gap("c"), Some(gap));
        assert_eq!(t.held("c"), 2);
        assert_eq!(t.last_seq("c"), Some(3));

        assert_eq!(t.observe(msg("c", 4)), Observed::InOrder(vec![msg("c", 4)]));
        let Observed::InOrder(delivered) = t.observe(msg("c", 5)) else {
            panic!("5 closes the gap");
        };
        assert_eq!(seqs(&delivered), vec![5, 6, 7]);
        assert_eq!(t.last_seq("c"), Some(7));
        assert_eq!(t.held("c"), 0);
        assert_eq!(t.gaps(), vec![]);
    }

    #[test]
    fn conversations_are_independent_and_a_new_one_starts_at_zero() {
        let mut t = Timeline::new();
        t.track("a", 10);
        assert!(matches!(t.observe(msg("a", 11)), Observed::InOrder(_)));
        assert_eq!(
            t.observe(msg("b", 2)),
            Observed::Gap(Gap {
                conversation_id: "b".into(),
                expected: 1,
                got: 2
            })
        );
        // A second track does not move a followed conversation.
        t.track("a", 100);
        assert_eq!(t.last_seq("a"), Some(11));
    }

    #[test]
    fn the_hold_is_bounded() {
        let mut t = Timeline::with_max_ahead(2);
        for seq in 3..10 {
            assert!(matches!(t.observe(msg("c", seq)), Observed::Gap(_)));
        }
        assert_eq!(t.held("c"), 2);
        assert_eq!(t.gap("c").map(|g| (g.expected, g.got)), Some((1, 3)));
    }

    #[test]
    fn cursors_list_contiguous_points() {
        let mut t = Timeline::new();
        t.track("b", 5);
        t.observe(msg("a", 1));
        t.observe(msg("a", 3));
        let cursors = t.cursors();
        assert_eq!(
            cursors,
            vec![
                SyncCursor {
                    conversation_id: "a".into(),
                    last_seq: 1
                },
                SyncCursor {
                    conversation_id: "b".into(),
                    last_seq: 5
                },
            ]
        );
    }

    #[tokio::test]
    async fn fill_pages_history_forward_and_releases_held_messages() {
        let history = FakeHistory::new("c", 500, 200);
        let mut t = Timeline::new();
        t.track("c", 2);
        assert!(matches!(t.observe(msg("c", 450)), Observed::Gap(_)));
        let delivered = t.fill(&history, "c").await.unwrap();
        // Three pages: 3..=202, 203..=402, 403..=500. The held 450 is released
        // after 449; history's copy of 450 is dropped as a duplicate; the rest of
        // the last page extends the timeline too.
        assert_eq!(seqs(&delivered), (3..=500).collect::<Vec<_>>());
        assert_eq!(t.last_seq("c"), Some(500));
        assert_eq!(t.gaps(), vec![]);
        assert_eq!(history.calls.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn fill_without_a_gap_asks_nothing_and_an_unfillable_gap_stays_open() {
        let history = FakeHistory::new("c", 5, 200);
        let mut t = Timeline::new();
        t.track("c", 5);
        assert_eq!(t.fill(&history, "c").await.unwrap(), vec![]);
        assert_eq!(history.calls.load(Ordering::Relaxed), 0);

        // The server reports 8 but history has only 5: one page, no loop.
        t.note_last_seq("c", 8);
        assert_eq!(t.fill(&history, "c").await.unwrap(), vec![]);
        assert_eq!(history.calls.load(Ordering::Relaxed), 1);
        assert_eq!(t.gap("c").map(|g| g.expected), Some(6));
    }

    #[tokio::test]
    async fn fill_gaps_closes_every_gap_reported_by_sync() {
        let a = FakeHistory::new("a", 30, 200);
        let mut t = Timeline::new();
        t.track("a", 10);
        let sync = SyncResult {
            conversations: vec![switchboard_proto::v1::Conversation {
                conversation_id: "a".into(),
                last_seq: 30,
                ..Default::default()
            }],
            messages: (11..=20).map(|s| msg("a", s)).collect(),
            truncated: vec!["a".into()],
            ..Default::default()
        };
        assert_eq!(seqs(&t.apply_sync(&sync)), (11..=20).collect::<Vec<_>>());
        assert_eq!(
            t.gaps(),
            vec![Gap {
                conversation_id: "a".into(),
                expected: 21,
                got: 30
            }]
        );
        let filled = t.fill_gaps(&a).await.unwrap();
        assert_eq!(seqs(&filled), (21..=30).collect::<Vec<_>>());
        assert_eq!(t.cursors()[0].last_seq, 30);
    }
}
