//! The record of a run's sends written to a file (`run --ledger FILE`), and the
//! check of such a file against what storage holds (`check-ledger FILE`).
//!
//! One JSON line per send once its outcome is known: the conversation, the
//! `client_msg_id`, the sending user, the outcome (`accepted` with the ack's sequence,
//! `refused`, or `unresolved` when no answer came, retries included). The live check of a run
//! ([`crate::ledger`]) proves what sessions received; this file lets a run be checked
//! afterwards against history, so that an accepted message is shown to be stored
//! exactly once at the sequence its ack gave, a refused one never, and every
//! conversation's sequence gapless.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead as _, BufReader, BufWriter, Write as _};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use switchboard_auth::Signer;
use switchboard_client::{Client, ConnectOptions};

/// Messages per `history` page when checking.
const PAGE: u32 = 200;

/// Most `history` pages read per conversation when checking.
const MAX_PAGES: usize = 100_000;

/// What became of one send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Acked: durable. `seq` is the ack's sequence (0: sequenced after the ack).
    Accepted,
    /// Refused with an error that says it was not taken.
    Refused,
    /// No answer (timeout, connection lost): it may or may not have been taken.
    Unresolved,
}

/// One line of the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub conversation: String,
    pub client_msg_id: String,
    /// The sending user (a member, so the check can read the history as them).
    pub sender: String,
    pub outcome: Outcome,
    #[serde(default)]
    pub seq: u64,
}

/// Appends entries to the file as sends settle; shared by a run's dispatchers.
pub struct Writer {
    out: Mutex<BufWriter<File>>,
    failed: AtomicBool,
}

impl Writer {
    pub fn create(path: &Path) -> anyhow::Result<Writer> {
        let file = File::create(path)
            .with_context(|| format!("creating the ledger file {}", path.display()))?;
        Ok(Writer {
            out: Mutex::new(BufWriter::new(file)),
            failed: AtomicBool::new(false),
        })
    }

    /// Append one entry (buffered). A write error is remembered and reported by
    /// [`Writer::finish`]: the run goes on.
    pub fn record(&self, entry: &Entry) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let written = serde_json::to_writer(&mut *out, entry)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"));
        if written.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
    }

    /// Flush the file; fails if any entry could not be written.
    pub fn finish(&self) -> anyhow::Result<()> {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        out.flush().context("flushing the ledger file")?;
        anyhow::ensure!(
            !self.failed.load(Ordering::Relaxed),
            "some entries of the ledger file could not be written"
        );
        Ok(())
    }
}

/// Read a ledger file.
pub fn read(path: &Path) -> anyhow::Result<Vec<Entry>> {
    let file =
        File::open(path).with_context(|| format!("opening the ledger file {}", path.display()))?;
    let mut entries = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let entry = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}: not a ledger entry", path.display(), n + 1))?;
        entries.push(entry);
    }
    Ok(entries)
}

/// The file compared with storage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StoredCheck {
    pub conversations: u64,
    pub accepted: u64,
    pub refused: u64,
    pub unresolved: u64,
    /// Unresolved sends that storage holds (the server took them; fine).
    pub unresolved_stored: u64,
    /// Accepted sends storage does not hold.
    pub accepted_missing: u64,
    /// Accepted sends stored under another sequence than their ack's.
    pub seq_mismatches: u64,
    /// Refused sends that storage holds.
    pub refused_stored: u64,
    /// Sends of the file stored more than once.
    pub duplicates_stored: u64,
    /// Sequence numbers missing below a conversation's highest one.
    pub gaps: u64,
}

impl StoredCheck {
    pub fn violated(&self) -> bool {
        self.accepted_missing
            + self.seq_mismatches
            + self.refused_stored
            + self.duplicates_stored
            + self.gaps
            > 0
    }
}

/// Compare `entries` with `stored`: each conversation's history as
/// `(seq, client_msg_id)` in any order.
pub fn compare(entries: &[Entry], stored: &HashMap<String, Vec<(u64, String)>>) -> StoredCheck {
    let mut check = StoredCheck::default();
    let mut by_conversation: HashMap<&str, Vec<&Entry>> = HashMap::new();
    for entry in entries {
        by_conversation
            .entry(entry.conversation.as_str())
            .or_default()
            .push(entry);
    }
    let empty = Vec::new();
    for (conversation, entries) in by_conversation {
        check.conversations += 1;
        let history = stored.get(conversation).unwrap_or(&empty);
        let mut seqs_of: HashMap<&str, Vec<u64>> = HashMap::new();
        let mut seqs = HashSet::new();
        for (seq, id) in history {
            seqs_of.entry(id.as_str()).or_default().push(*seq);
            seqs.insert(*seq);
        }
        let max = seqs.iter().copied().max().unwrap_or(0);
        check.gaps += max - seqs.len() as u64;
        let mut seen = HashSet::new();
        for entry in entries {
            let found = seqs_of.get(entry.client_msg_id.as_str());
            let times = found.map_or(0, Vec::len);
            if times > 1 && seen.insert(entry.client_msg_id.as_str()) {
                check.duplicates_stored += times as u64 - 1;
            }
            match entry.outcome {
                Outcome::Accepted => {
                    check.accepted += 1;
                    match found {
                        None => check.accepted_missing += 1,
                        Some(at) if entry.seq != 0 && !at.contains(&entry.seq) => {
                            check.seq_mismatches += 1
                        }
                        Some(_) => {}
                    }
                }
                Outcome::Refused => {
                    check.refused += 1;
                    if times > 0 {
                        check.refused_stored += 1;
                    }
                }
                Outcome::Unresolved => {
                    check.unresolved += 1;
                    if times > 0 {
                        check.unresolved_stored += 1;
                    }
                }
            }
        }
    }
    check
}

/// Check the ledger file at `path` against the history the server at `url` holds,
/// reading each conversation as one of its senders.
pub async fn check(path: &Path, url: &str, signer: &Signer) -> anyhow::Result<StoredCheck> {
    let entries = read(path)?;
    let mut reader_of: HashMap<&str, &str> = HashMap::new();
    for entry in &entries {
        reader_of
            .entry(entry.conversation.as_str())
            .or_insert(entry.sender.as_str());
    }
    let mut clients: HashMap<&str, Client> = HashMap::new();
    let mut stored = HashMap::new();
    for (conversation, user) in reader_of {
        if !clients.contains_key(user) {
            let token = signer
                .sign(user, std::time::Duration::from_secs(3_600))
                .context("signing a token")?;
            let options = ConnectOptions::new(url, token).device("ledger-check");
            let (client, _events) = Client::connect(options)
                .await
                .with_context(|| format!("connecting to {url} as {user}"))?;
            clients.insert(user, client);
        }
        let history = crate::history_after(&clients[user], conversation, 0, PAGE, MAX_PAGES)
            .await
            .with_context(|| format!("reading the history of {conversation}"))?;
        stored.insert(
            conversation.to_owned(),
            history
                .into_iter()
                .map(|m| (m.seq, m.client_msg_id))
                .collect(),
        );
    }
    for client in clients.into_values() {
        client.close().await;
    }
    Ok(compare(&entries, &stored))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, outcome: Outcome, seq: u64) -> Entry {
        Entry {
            conversation: "c".into(),
            client_msg_id: id.into(),
            sender: "u".into(),
            outcome,
            seq,
        }
    }

    fn history(items: &[(u64, &str)]) -> HashMap<String, Vec<(u64, String)>> {
        HashMap::from([(
            "c".to_owned(),
            items.iter().map(|(s, id)| (*s, (*id).to_owned())).collect(),
        )])
    }

    #[test]
    fn a_file_that_matches_storage_passes() {
        let entries = [
            entry("a", Outcome::Accepted, 1),
            entry("b", Outcome::Accepted, 0),
            entry("c", Outcome::Unresolved, 0),
            entry("d", Outcome::Refused, 0),
        ];
        let check = compare(&entries, &history(&[(1, "a"), (2, "b"), (3, "c")]));
        assert!(!check.violated(), "{check:?}");
        assert_eq!(check.accepted, 2);
        assert_eq!(check.unresolved_stored, 1);
        assert_eq!(check.refused, 1);
        assert_eq!(check.conversations, 1);
    }

    #[test]
    fn every_kind_of_disagreement_is_counted() {
        let entries = [
            entry("a", Outcome::Accepted, 1),
            entry("b", Outcome::Accepted, 2),
            entry("missing", Outcome::Accepted, 0),
            entry("d", Outcome::Refused, 0),
            entry("e", Outcome::Unresolved, 0),
        ];
        // b stored at 3 (its ack said 2), d stored though refused, e twice, 6 missing.
        let stored = history(&[(1, "a"), (2, "e"), (3, "b"), (4, "d"), (5, "e"), (7, "x")]);
        let check = compare(&entries, &stored);
        assert_eq!(check.accepted_missing, 1);
        assert_eq!(check.seq_mismatches, 1);
        assert_eq!(check.refused_stored, 1);
        assert_eq!(check.duplicates_stored, 1);
        assert_eq!(check.gaps, 1);
        assert!(check.violated());
    }

    #[test]
    fn the_file_round_trips() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("ledger.jsonl");
        let writer = Writer::create(&path).expect("create");
        let entries = [
            entry("a", Outcome::Accepted, 1),
            entry("b", Outcome::Unresolved, 0),
        ];
        for e in &entries {
            writer.record(e);
        }
        writer.finish().expect("flush");
        assert_eq!(read(&path).expect("read"), entries);
    }
}
