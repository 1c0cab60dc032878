//! The delivery checker of scenario runs, for conversations of any size and for
//! sessions that disconnect and come back.
//!
//! The contract checked (docs/architecture.md, delivery contract): a conversation's
//! sequence is gapless (`1, 2, 3, ...`), so after the run every session of every
//! member must hold every sequence number above the conversation's baseline up to
//! the highest one seen; on one connection a session receives them in increasing
//! order and never twice; what a session missed while disconnected it recovers with
//! `sync` (and `history` pages) after reconnecting, and such messages count as
//! recovered, not lost. Every message maps to one sequence number and back.
//!
//! A [`Cursor`] is one session's view of one conversation (owned by that session's
//! task, no lock); a [`Ledger`] is the conversation's shared record of which message
//! got which sequence. Plain data, no clock and no I/O.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// Sequence numbers above a session's contiguous prefix remembered per
/// conversation; beyond that they are counted as untracked.
const MAX_AHEAD: usize = 65_536;

/// What a live delivery (an event on the current connection) meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    /// A sequence number the session did not have; `gap` numbers between the
    /// previous delivery on this connection and this one were skipped.
    New { gap: u64 },
    /// Lower than one already delivered on this connection and not yet held.
    Reorder,
    /// Lower than one already delivered on this connection and already held.
    Duplicate,
    /// Higher than anything on this connection but already recovered by sync.
    Overlap,
    /// At or below the conversation's baseline (older than the run).
    Stale,
}

/// One session's received sequence numbers in one conversation.
#[derive(Debug, Clone)]
pub struct Cursor {
    baseline: u64,
    /// Every number in `(baseline, contiguous]` is held.
    contiguous: u64,
    /// Held numbers above `contiguous + 1`.
    ahead: BTreeSet<u64>,
    /// Held numbers not remembered because `ahead` was full.
    untracked: u64,
    /// Highest number delivered on the current connection; `None` right after a
    /// reconnect, when the first live delivery may be anywhere above the cursor.
    conn_last: Option<u64>,
}

impl Cursor {
    /// A session connected when the conversation's highest sequence was `baseline`.
    pub fn new(baseline: u64) -> Cursor {
        Cursor {
            baseline,
            contiguous: baseline,
            ahead: BTreeSet::new(),
            untracked: 0,
            conn_last: Some(baseline),
        }
    }

    fn holds(&self, seq: u64) -> bool {
        seq <= self.contiguous || self.ahead.contains(&seq)
    }

    fn insert(&mut self, seq: u64) {
        if seq == self.contiguous + 1 {
            self.contiguous = seq;
            while self.ahead.remove(&(self.contiguous + 1)) {
                self.contiguous += 1;
            }
        } else if self.ahead.len() < MAX_AHEAD {
            self.ahead.insert(seq);
        } else {
            self.untracked += 1;
        }
    }

    /// Numbers in `(from, to)` not held.
    fn not_held_between(&self, from: u64, to: u64) -> u64 {
        let lo = from.max(self.contiguous) + 1;
        if lo >= to {
            return 0;
        }
        (to - lo) - self.ahead.range(lo..to).count() as u64
    }

    /// A message event with `seq` arrived on the current connection.
    pub fn live(&mut self, seq: u64) -> Live {
        if seq <= self.baseline {
            return Live::Stale;
        }
        match self.conn_last {
            Some(last) if seq <= last => {
                if self.holds(seq) {
                    Live::Duplicate
                } else {
                    self.insert(seq);
                    Live::Reorder
                }
            }
            last => {
                self.conn_last = Some(seq);
                if self.holds(seq) {
                    return Live::Overlap;
                }
                let gap = last.map_or(0, |last| self.not_held_between(last, seq));
                self.insert(seq);
                Live::New { gap }
            }
        }
    }

    /// A message with `seq` came back from `sync` or `history`; true when the
    /// session did not hold it yet.
    pub fn recovered(&mut self, seq: u64) -> bool {
        if seq <= self.baseline || self.holds(seq) {
            return false;
        }
        self.insert(seq);
        true
    }

    /// A new connection starts: its first delivery sets the order baseline.
    pub fn reconnected(&mut self) {
        self.conn_last = None;
    }

    /// The `sync` cursor: everything up to here is held.
    pub fn sync_from(&self) -> u64 {
        self.contiguous
    }

    /// Numbers in `(baseline, max_seq]` this session does not hold.
    pub fn missing(&self, max_seq: u64) -> u64 {
        if max_seq <= self.contiguous {
            return 0;
        }
        let above = self.ahead.range(..=max_seq).count() as u64;
        (max_seq - self.contiguous).saturating_sub(above + self.untracked)
    }

    pub fn untracked(&self) -> u64 {
        self.untracked
    }
}

/// Contract violations and bookkeeping found by a [`Ledger`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerCounts {
    /// Deliveries of sequence numbers whose message is not one of this run's.
    pub unknown: u64,
    /// Deliveries of a message whose send was refused.
    pub refused_delivered: u64,
    /// One message under two sequence numbers.
    pub duplicate_messages: u64,
    /// One sequence number carrying two messages, or an ack and a delivery that
    /// disagree.
    pub seq_mismatches: u64,
}

/// What a conversation's messages got as sequence numbers.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    pub baseline: u64,
    /// Highest sequence number acked or seen.
    max_seq: u64,
    /// Message number of each sequence number seen (`None`: not this run's).
    seq_msg: HashMap<u64, Option<u64>>,
    msg_seq: HashMap<u64, u64>,
    /// Accepted before sequencing (ack seq 0) and not seen in any delivery yet.
    acked_unsequenced: HashSet<u64>,
    refused: HashSet<u64>,
    counts: LedgerCounts,
}

impl Ledger {
    pub fn new(baseline: u64) -> Ledger {
        Ledger {
            baseline,
            max_seq: baseline,
            ..Ledger::default()
        }
    }

    fn bind(&mut self, msg: u64, seq: u64) {
        self.max_seq = self.max_seq.max(seq);
        match self.msg_seq.get(&msg) {
            Some(&known) if known != seq => self.counts.duplicate_messages += 1,
            Some(_) => {}
            None => {
                self.msg_seq.insert(msg, seq);
            }
        }
        match self.seq_msg.get(&seq) {
            Some(&known) if known != Some(msg) => self.counts.seq_mismatches += 1,
            Some(_) => {}
            None => {
                self.seq_msg.insert(seq, Some(msg));
            }
        }
        self.acked_unsequenced.remove(&msg);
    }

    /// Send `msg` was accepted with `seq` (0: durable, not yet sequenced).
    pub fn accepted(&mut self, msg: u64, seq: u64) {
        if seq == 0 {
            if !self.msg_seq.contains_key(&msg) {
                self.acked_unsequenced.insert(msg);
            }
        } else {
            self.bind(msg, seq);
        }
    }

    /// Send `msg` was refused: it must never be delivered.
    pub fn refused(&mut self, msg: u64) {
        self.refused.insert(msg);
    }

    /// A session received `seq` carrying `msg` (`None`: not one of this run's ids)
    /// for the first time.
    pub fn received(&mut self, msg: Option<u64>, seq: u64) {
        if seq <= self.baseline {
            return;
        }
        match msg {
            Some(msg) => {
                if self.refused.contains(&msg) && !self.msg_seq.contains_key(&msg) {
                    self.counts.refused_delivered += 1;
                }
                self.bind(msg, seq);
            }
            None => {
                self.max_seq = self.max_seq.max(seq);
                match self.seq_msg.get(&seq) {
                    Some(Some(_)) => self.counts.seq_mismatches += 1,
                    Some(None) => {}
                    None => {
                        self.counts.unknown += 1;
                        self.seq_msg.insert(seq, None);
                    }
                }
            }
        }
    }

    pub fn max_seq(&self) -> u64 {
        self.max_seq
    }

    /// Sequence numbers each member session must hold by the end.
    pub fn expected_per_session(&self) -> u64 {
        self.max_seq - self.baseline
    }

    /// Accepted messages still waiting for their sequence number.
    pub fn acked_unsequenced(&self) -> usize {
        self.acked_unsequenced.len()
    }

    pub fn counts(&self) -> LedgerCounts {
        self.counts
    }
}

/// The correctness part of a report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Correctness {
    /// Deliveries expected: for every conversation, its messages times its member
    /// sessions that connected.
    pub expected: u64,
    /// First receipts on a live connection.
    pub delivered: u64,
    /// First receipts through `sync` or `history` after a reconnect.
    pub recovered: u64,
    /// Expected deliveries neither delivered nor recovered by the end.
    pub lost: u64,
    /// Deliveries of a sequence number a connection had already received.
    pub duplicates: u64,
    /// Deliveries lower than an earlier one on the same connection.
    pub reorders: u64,
    /// Sequence numbers skipped on a live connection that no `resync` announced.
    pub gaps: u64,
    /// Sequence numbers skipped on a live connection and announced by a `resync`
    /// (the server knew its fan-out may have missed them; the client synced): not a
    /// violation, as long as nothing is `lost`.
    #[serde(default)]
    pub gaps_resynced: u64,
    /// Accepted messages (ack without a sequence) never seen delivered.
    pub accepted_not_delivered: u64,
    pub unknown: u64,
    pub refused_delivered: u64,
    pub duplicate_messages: u64,
    pub seq_mismatches: u64,
    /// Sends whose outcome stayed unknown (no ack: timeout or lost connection);
    /// if the server created them they are in `expected` like any other.
    pub unresolved_sends: u64,
    /// Live deliveries of something a reconnect had already recovered (fine).
    pub sync_overlap: u64,
    /// Sessions not connected at the end (their missing messages are in `lost`).
    pub sessions_offline_at_end: u64,
    /// Held sequence numbers the checker could not remember (makes `lost` a lower
    /// bound).
    pub untracked: u64,
}

impl Correctness {
    pub fn violated(&self) -> bool {
        self.lost
            + self.duplicates
            + self.reorders
            + self.gaps
            + self.accepted_not_delivered
            + self.unknown
            + self.refused_delivered
            + self.duplicate_messages
            + self.seq_mismatches
            > 0
    }

    /// Received (live or recovered) over expected; 1 when nothing was expected.
    pub fn delivered_ratio(&self) -> f64 {
        if self.expected == 0 {
            return 1.0;
        }
        (self.delivered + self.recovered).min(self.expected) as f64 / self.expected as f64
    }

    pub fn add(&mut self, o: &Correctness) {
        self.expected += o.expected;
        self.delivered += o.delivered;
        self.recovered += o.recovered;
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.reorders += o.reorders;
        self.gaps += o.gaps;
        self.gaps_resynced += o.gaps_resynced;
        self.accepted_not_delivered += o.accepted_not_delivered;
        self.unknown += o.unknown;
        self.refused_delivered += o.refused_delivered;
        self.duplicate_messages += o.duplicate_messages;
        self.seq_mismatches += o.seq_mismatches;
        self.unresolved_sends += o.unresolved_sends;
        self.sync_overlap += o.sync_overlap;
        self.sessions_offline_at_end += o.sessions_offline_at_end;
        self.untracked += o.untracked;
    }

    /// The violations as `name=count` pairs, for failure messages.
    pub fn violations(&self) -> Vec<String> {
        [
            ("lost", self.lost),
            ("duplicates", self.duplicates),
            ("reorders", self.reorders),
            ("gaps", self.gaps),
            ("accepted_not_delivered", self.accepted_not_delivered),
            ("unknown", self.unknown),
            ("refused_delivered", self.refused_delivered),
            ("duplicate_messages", self.duplicate_messages),
            ("seq_mismatches", self.seq_mismatches),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(name, n)| format!("{name}={n}"))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_live_deliveries_are_new_without_gaps() {
        let mut c = Cursor::new(10);
        assert_eq!(c.live(11), Live::New { gap: 0 });
        assert_eq!(c.live(12), Live::New { gap: 0 });
        assert_eq!(c.missing(12), 0);
        assert_eq!(c.missing(15), 3);
        assert_eq!(c.live(9), Live::Stale);
    }

    #[test]
    fn a_skip_on_one_connection_is_a_gap_and_a_late_arrival_a_reorder() {
        let mut c = Cursor::new(0);
        c.live(1);
        assert_eq!(c.live(4), Live::New { gap: 2 });
        assert_eq!(c.missing(4), 2);
        assert_eq!(c.live(2), Live::Reorder);
        assert_eq!(c.live(2), Live::Duplicate);
        assert_eq!(c.live(4), Live::Duplicate);
        assert_eq!(c.missing(4), 1);
    }

    #[test]
    fn what_was_missed_while_away_is_recovered_not_a_gap() {
        let mut c = Cursor::new(0);
        c.live(1);
        c.live(2);
        c.reconnected();
        assert_eq!(c.sync_from(), 2);
        // Live traffic on the new connection starts at 6 before the sync answer.
        assert_eq!(c.live(6), Live::New { gap: 0 });
        for seq in 3..=6 {
            assert_eq!(c.recovered(seq), seq != 6, "seq {seq}");
        }
        assert_eq!(c.live(7), Live::New { gap: 0 });
        assert_eq!(c.missing(7), 0);
        // Recovered first, then delivered live: an overlap, not a duplicate.
        c.reconnected();
        assert!(c.recovered(8));
        assert_eq!(c.live(8), Live::Overlap);
        assert_eq!(c.live(9), Live::New { gap: 0 });
    }

    #[test]
    fn the_ledger_binds_messages_to_sequences_once() {
        let mut l = Ledger::new(5);
        l.accepted(1, 6);
        l.received(Some(1), 6);
        l.accepted(2, 0);
        assert_eq!(l.acked_unsequenced(), 1);
        l.received(Some(2), 7);
        assert_eq!(l.acked_unsequenced(), 0);
        assert_eq!(l.max_seq(), 7);
        assert_eq!(l.expected_per_session(), 2);
        assert_eq!(l.counts(), LedgerCounts::default());
        // The same message again under a new number, and a number with another message.
        l.received(Some(1), 8);
        l.received(Some(3), 7);
        let counts = l.counts();
        assert_eq!(counts.duplicate_messages, 1);
        assert_eq!(counts.seq_mismatches, 1);
    }

    #[test]
    fn foreign_and_refused_messages_are_violations() {
        let mut l = Ledger::new(0);
        l.received(None, 1);
        l.received(None, 1);
        l.refused(9);
        l.received(Some(9), 2);
        let counts = l.counts();
        assert_eq!(counts.unknown, 1);
        assert_eq!(counts.refused_delivered, 1);
    }

    #[test]
    fn correctness_ratio_and_violations() {
        let mut c = Correctness {
            expected: 10,
            delivered: 7,
            recovered: 2,
            lost: 1,
            ..Correctness::default()
        };
        assert!((c.delivered_ratio() - 0.9).abs() < 1e-9);
        assert!(c.violated());
        assert_eq!(c.violations(), ["lost=1"]);
        c.lost = 0;
        c.unresolved_sends = 3;
        c.sync_overlap = 2;
        assert!(!c.violated());
        assert_eq!(Correctness::default().delivered_ratio(), 1.0);
    }
}
