//! The delivery checker: for one 1:1 conversation, which messages were sent, which
//! were accepted, and which arrived where, in what order.
//!
//! The contract checked (docs/architecture.md, delivery contract): every accepted
//! message reaches each online session of the conversation (the peer's and the
//! sender's own) exactly once, and each session sees the conversation's sequence
//! numbers strictly increasing by one. The checker is plain data with no clock and
//! no I/O; the scenario feeds it sends, acks and deliveries.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;
use tokio::time::Instant;

/// Which member of a pair: 0 is the one that created the conversation, 1 its peer.
pub type Side = usize;

/// Most sequence numbers remembered as missing per session; beyond that a gap is
/// still counted but a late arrival of those numbers counts as a duplicate.
const MAX_MISSING: usize = 4_096;

/// How one delivery fits the session's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The next sequence number.
    InOrder,
    /// Ahead of the next one: this many numbers were skipped.
    Gap(u64),
    /// A number skipped earlier, arriving late.
    Late,
    /// A number this session already received.
    Duplicate,
}

/// The sequence numbers one session has received in one conversation.
#[derive(Debug, Clone)]
pub struct SessionOrder {
    /// Highest sequence number received (or the baseline before any).
    last_seq: u64,
    /// Numbers below `last_seq` skipped and not yet received.
    missing: BTreeSet<u64>,
    /// Skipped numbers not remembered because `missing` was full.
    missing_overflow: u64,
}

impl SessionOrder {
    /// A session that expects `baseline + 1` next.
    pub fn new(baseline: u64) -> SessionOrder {
        SessionOrder {
            last_seq: baseline,
            missing: BTreeSet::new(),
            missing_overflow: 0,
        }
    }

    pub fn observe(&mut self, seq: u64) -> Arrival {
        if seq == self.last_seq + 1 {
            self.last_seq = seq;
            Arrival::InOrder
        } else if seq > self.last_seq {
            let skipped = seq - self.last_seq - 1;
            for missing in self.last_seq + 1..seq {
                if self.missing.len() < MAX_MISSING {
                    self.missing.insert(missing);
                } else {
                    self.missing_overflow += 1;
                }
            }
            self.last_seq = seq;
            Arrival::Gap(skipped)
        } else if self.missing.remove(&seq) {
            Arrival::Late
        } else {
            Arrival::Duplicate
        }
    }

    /// Numbers skipped and never received.
    pub fn unfilled(&self) -> u64 {
        self.missing.len() as u64 + self.missing_overflow
    }
}

/// Correctness counters; zero everywhere but `unresolved` means the contract held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Sequence numbers skipped when they should have come next.
    pub gaps: u64,
    /// Deliveries of a skipped number after a higher one (out of order).
    pub reorders: u64,
    /// Deliveries of a sequence number, or of a message, a session already had.
    pub duplicates: u64,
    /// Skipped sequence numbers never delivered by the end.
    pub unfilled_gaps: u64,
    /// Deliveries of messages this run did not send, or whose send was refused.
    pub unknown: u64,
    /// Deliveries whose sequence number differs from the ack's or the other session's.
    pub seq_mismatches: u64,
    /// Accepted messages never delivered to the peer's session.
    pub lost_to_peer: u64,
    /// Accepted messages never delivered to the sender's own session.
    pub lost_to_sender: u64,
    /// Sends whose outcome is unknown (timed out or connection lost before the ack).
    pub unresolved: u64,
}

impl Counts {
    /// Whether any counter shows a broken delivery contract.
    pub fn violated(&self) -> bool {
        self.gaps
            + self.reorders
            + self.duplicates
            + self.unfilled_gaps
            + self.unknown
            + self.seq_mismatches
            + self.lost_to_peer
            + self.lost_to_sender
            > 0
    }

    pub fn add(&mut self, other: &Counts) {
        self.gaps += other.gaps;
        self.reorders += other.reorders;
        self.duplicates += other.duplicates;
        self.unfilled_gaps += other.unfilled_gaps;
        self.unknown += other.unknown;
        self.seq_mismatches += other.seq_mismatches;
        self.lost_to_peer += other.lost_to_peer;
        self.lost_to_sender += other.lost_to_sender;
        self.unresolved += other.unresolved;
    }
}

/// One message in flight or awaiting deliveries.
#[derive(Debug, Clone)]
struct Pending {
    /// When the schedule wanted it sent.
    intended: Instant,
    sender: Side,
    /// `Some` once accepted: the acked sequence (0 when acked before sequencing).
    acked_seq: Option<u64>,
    /// The sequence number of its first delivery.
    delivered_seq: Option<u64>,
    /// Per side, whether its session received it.
    delivered: [bool; 2],
    /// The send's outcome is unknown (no ack will come).
    unresolved: bool,
}

impl Pending {
    fn complete(&self) -> bool {
        self.delivered[0] && self.delivered[1] && (self.acked_seq.is_some() || self.unresolved)
    }
}

/// What an ack meant for a tracked message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub intended: Instant,
}

/// What a delivery meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The first delivery of a tracked message to this session.
    First {
        intended: Instant,
        /// Whether this session is the sender's own.
        to_sender: bool,
        arrival: Arrival,
    },
    /// A delivery this session already had.
    Repeat,
    /// A message this run did not send (or whose send was refused).
    Unknown,
}

/// The checker of one 1:1 conversation.
#[derive(Debug)]
pub struct ConversationCheck {
    /// Tracked messages by message number (the number in their `client_msg_id`).
    pending: HashMap<u64, Pending>,
    /// Per side, the sequence numbers its session received.
    order: [SessionOrder; 2],
    /// Number of the next message sent in this conversation.
    next_msg: u64,
    /// Most tracked messages at once.
    capacity: usize,
    counts: Counts,
}

impl ConversationCheck {
    /// A conversation whose highest stored sequence is `baseline`, tracking at most
    /// `capacity` messages at once.
    pub fn new(baseline: u64, capacity: usize) -> ConversationCheck {
        ConversationCheck {
            pending: HashMap::new(),
            order: [SessionOrder::new(baseline), SessionOrder::new(baseline)],
            next_msg: 0,
            capacity: capacity.max(1),
            counts: Counts::default(),
        }
    }

    /// Start tracking a send; returns its message number, or `None` when the
    /// checker is full (the generator cannot keep up with its own bookkeeping).
    pub fn begin(&mut self, sender: Side, intended: Instant) -> Option<u64> {
        if self.pending.len() >= self.capacity {
            return None;
        }
        let msg = self.next_msg;
        self.next_msg += 1;
        self.pending.insert(
            msg,
            Pending {
                intended,
                sender,
                acked_seq: None,
                delivered_seq: None,
                delivered: [false; 2],
                unresolved: false,
            },
        );
        Some(msg)
    }

    /// The send was accepted with sequence `seq` (0 when not yet sequenced).
    pub fn accepted(&mut self, msg: u64, seq: u64) -> Option<Accepted> {
        let pending = self.pending.get_mut(&msg)?;
        pending.acked_seq = Some(seq);
        if seq != 0 && pending.delivered_seq.is_some_and(|s| s != seq) {
            self.counts.seq_mismatches += 1;
        }
        let accepted = Accepted {
            intended: pending.intended,
        };
        if pending.complete() {
            self.pending.remove(&msg);
        }
        Some(accepted)
    }

    /// The server refused the send: it must never be delivered.
    pub fn refused(&mut self, msg: u64) {
        self.pending.remove(&msg);
    }

    /// No ack will come (timeout, lost connection): the message may or may not
    /// have been accepted. Deliveries still count; missing ones are not losses.
    pub fn unresolved(&mut self, msg: u64) {
        if let Some(pending) = self.pending.get_mut(&msg) {
            pending.unresolved = true;
            if pending.complete() {
                self.pending.remove(&msg);
            }
        }
    }

    /// Session `side` received sequence `seq`, carrying message number `msg`
    /// (`None` when its `client_msg_id` was not one of this run's).
    pub fn delivered(&mut self, side: Side, msg: Option<u64>, seq: u64) -> Delivery {
        let arrival = self.order[side].observe(seq);
        match arrival {
            Arrival::Gap(skipped) => self.counts.gaps += skipped,
            Arrival::Late => self.counts.reorders += 1,
            Arrival::Duplicate => {
                self.counts.duplicates += 1;
                return Delivery::Repeat;
            }
            Arrival::InOrder => {}
        }
        let Some(pending) = msg.and_then(|msg| self.pending.get_mut(&msg)) else {
            self.counts.unknown += 1;
            return Delivery::Unknown;
        };
        if pending.delivered[side] {
            // A new sequence number for a message this session already had.
            self.counts.duplicates += 1;
            return Delivery::Repeat;
        }
        pending.delivered[side] = true;
        let acked = pending.acked_seq.filter(|&s| s != 0);
        if acked.is_some_and(|s| s != seq) || pending.delivered_seq.is_some_and(|s| s != seq) {
            self.counts.seq_mismatches += 1;
        }
        pending.delivered_seq.get_or_insert(seq);
        let delivery = Delivery::First {
            intended: pending.intended,
            to_sender: pending.sender == side,
            arrival,
        };
        if pending.complete() {
            if let Some(msg) = msg {
                self.pending.remove(&msg);
            }
        }
        delivery
    }

    /// Messages still waited for: accepted or unanswered sends missing a delivery.
    pub fn awaiting(&self) -> usize {
        self.pending.len()
    }

    /// The final counts: what is still missing now is lost.
    pub fn finish(&self) -> Counts {
        let mut counts = self.counts;
        for pending in self.pending.values() {
            let peer = 1 - pending.sender;
            if pending.acked_seq.is_some() {
                counts.lost_to_peer += u64::from(!pending.delivered[peer]);
                counts.lost_to_sender += u64::from(!pending.delivered[pending.sender]);
            } else {
                counts.unresolved += 1;
            }
        }
        counts.unfilled_gaps = self.order.iter().map(SessionOrder::unfilled).sum();
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check() -> ConversationCheck {
        ConversationCheck::new(10, 16)
    }

    #[test]
    fn sequences_in_order_gaps_late_and_duplicates() {
        let mut order = SessionOrder::new(0);
        assert_eq!(order.observe(1), Arrival::InOrder);
        assert_eq!(order.observe(2), Arrival::InOrder);
        assert_eq!(order.observe(5), Arrival::Gap(2));
        assert_eq!(order.unfilled(), 2);
        assert_eq!(order.observe(3), Arrival::Late);
        assert_eq!(order.observe(3), Arrival::Duplicate);
        assert_eq!(order.observe(5), Arrival::Duplicate);
        assert_eq!(order.unfilled(), 1);
        assert_eq!(order.observe(6), Arrival::InOrder);
    }

    #[test]
    fn a_message_delivered_to_both_sessions_once_is_clean() {
        let mut c = check();
        let t = Instant::now();
        let msg = c.begin(0, t).expect("room");
        assert_eq!(c.accepted(msg, 11), Some(Accepted { intended: t }));
        assert_eq!(
            c.delivered(1, Some(msg), 11),
            Delivery::First {
                intended: t,
                to_sender: false,
                arrival: Arrival::InOrder
            }
        );
        assert_eq!(c.awaiting(), 1, "the sender's own session still waits");
        assert!(matches!(
            c.delivered(0, Some(msg), 11),
            Delivery::First {
                to_sender: true,
                ..
            }
        ));
        assert_eq!(c.awaiting(), 0);
        let counts = c.finish();
        assert!(!counts.violated(), "{counts:?}");
        assert_eq!(counts.unresolved, 0);
    }

    #[test]
    fn the_echo_may_arrive_before_the_ack() {
        let mut c = check();
        let t = Instant::now();
        let msg = c.begin(1, t).expect("room");
        c.delivered(1, Some(msg), 11);
        c.delivered(0, Some(msg), 11);
        assert_eq!(c.awaiting(), 1, "not complete before the ack");
        c.accepted(msg, 11);
        assert_eq!(c.awaiting(), 0);
        assert!(!c.finish().violated());
    }

    #[test]
    fn an_accepted_message_missing_at_the_end_is_lost() {
        let mut c = check();
        let msg = c.begin(0, Instant::now()).expect("room");
        c.accepted(msg, 11);
        c.delivered(0, Some(msg), 11);
        let counts = c.finish();
        assert_eq!(counts.lost_to_peer, 1);
        assert_eq!(counts.lost_to_sender, 0);
        assert!(counts.violated());
    }

    #[test]
    fn a_second_delivery_is_a_duplicate() {
        let mut c = check();
        let msg = c.begin(0, Instant::now()).expect("room");
        c.accepted(msg, 11);
        c.delivered(1, Some(msg), 11);
        assert_eq!(c.delivered(1, Some(msg), 11), Delivery::Repeat);
        assert_eq!(c.finish().duplicates, 1);
    }

    #[test]
    fn the_same_message_under_a_new_sequence_is_a_duplicate() {
        let mut c = check();
        let msg = c.begin(0, Instant::now()).expect("room");
        c.accepted(msg, 11);
        c.delivered(1, Some(msg), 11);
        assert_eq!(c.delivered(1, Some(msg), 12), Delivery::Repeat);
        assert_eq!(c.finish().duplicates, 1);
    }

    #[test]
    fn out_of_order_delivery_counts_a_gap_and_a_reorder() {
        let mut c = check();
        let t = Instant::now();
        let a = c.begin(0, t).expect("room");
        let b = c.begin(0, t).expect("room");
        c.accepted(a, 11);
        c.accepted(b, 12);
        c.delivered(1, Some(b), 12);
        c.delivered(1, Some(a), 11);
        let counts = c.finish();
        assert_eq!(counts.gaps, 1);
        assert_eq!(counts.reorders, 1);
        assert_eq!(counts.unfilled_gaps, 0);
    }

    #[test]
    fn foreign_and_refused_messages_are_unknown() {
        let mut c = check();
        assert_eq!(c.delivered(1, None, 11), Delivery::Unknown);
        let msg = c.begin(0, Instant::now()).expect("room");
        c.refused(msg);
        assert_eq!(c.delivered(1, Some(msg), 12), Delivery::Unknown);
        assert_eq!(c.finish().unknown, 2);
    }

    #[test]
    fn a_sequence_different_from_the_ack_is_a_mismatch() {
        let mut c = check();
        let msg = c.begin(0, Instant::now()).expect("room");
        c.accepted(msg, 11);
        c.delivered(1, Some(msg), 12);
        assert_eq!(c.finish().seq_mismatches, 1);
    }

    #[test]
    fn an_unanswered_send_is_unresolved_not_lost() {
        let mut c = check();
        let msg = c.begin(0, Instant::now()).expect("room");
        c.unresolved(msg);
        let counts = c.finish();
        assert_eq!(counts.unresolved, 1);
        assert_eq!(counts.lost_to_peer, 0);
        assert!(!counts.violated());
    }

    #[test]
    fn an_unresolved_send_delivered_everywhere_completes() {
        let mut c = check();
        let msg = c.begin(0, Instant::now()).expect("room");
        c.unresolved(msg);
        c.delivered(0, Some(msg), 11);
        c.delivered(1, Some(msg), 11);
        assert_eq!(c.awaiting(), 0);
    }

    #[test]
    fn a_full_checker_refuses_to_track_more() {
        let mut c = ConversationCheck::new(0, 2);
        let t = Instant::now();
        assert!(c.begin(0, t).is_some());
        assert!(c.begin(1, t).is_some());
        assert_eq!(c.begin(0, t), None);
    }
}
