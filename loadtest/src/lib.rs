//! Switchboard's load harness: an open-loop traffic generator that checks every
//! delivery against the delivery contract while it measures.
//!
//! It owns: scenario files ([`scenario`]) and an agent's share of one ([`plan`]);
//! running a scenario ([`runner`]: the connect ramp, conversation forming, the
//! open-loop send schedule ([`schedule`]), reconnect churn with sync recovery, the
//! drain, `max-throughput` steps); the delivery checkers ([`ledger`] for scenario
//! runs, [`check`] for `chat-1to1`); the file of a run's sends and its check
//! against storage ([`acklog`]); measurements ([`measure`]: HDR histograms
//! overall and per interval, counters, event-loop lag, CPU, the raw files that
//! distributed agents write and `merge` adds up); reports ([`report`], plots in
//! [`svg`]); connecting many clients ([`connect`]); process measurements
//! ([`system`]); and the earlier fixed scenarios ([`chat`], [`idle`]).
//!
//! It does not own: the client protocol (that is `switchboard-client`), starting or
//! configuring the server, or scheduling distributed agents (a Kubernetes Indexed
//! Job does, `loadtest/k8s/job.yaml`; each agent is one `run` process).

pub mod acklog;
pub mod chat;
pub mod check;
pub mod connect;
pub mod idle;
pub mod ledger;
pub mod measure;
pub mod plan;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod schedule;
pub mod stats;
pub mod svg;
pub mod system;

use std::time::Duration;

use switchboard_client::{Client, ClientError, Direction};
use switchboard_proto::v1::Message;

/// Parse a duration such as `30s`, `500ms`, `2m` or `1h` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (examples: 30s, 500ms, 2m)"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1_000.0,
        "m" => value * 60.0,
        "h" => value * 3_600.0,
        other => return Err(format!("unknown unit `{other}` (use ms, s, m or h)")),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("`{text}` is not a duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// The user id of the `index`th load client.
pub fn user_id(index: usize) -> String {
    format!("load-u{index}")
}

/// Every message of `conversation_id` after sequence `after`, oldest first, read
/// with `history` pages of `page` messages, at most `max_pages` of them.
pub async fn history_after(
    client: &Client,
    conversation_id: &str,
    mut after: u64,
    page: u32,
    max_pages: usize,
) -> Result<Vec<Message>, ClientError> {
    let mut messages = Vec::new();
    for _ in 0..max_pages {
        let answer = client
            .history(conversation_id, after, Direction::Forward, page)
            .await?;
        let Some(last) = answer.messages.iter().map(|m| m.seq).max() else {
            break;
        };
        after = last;
        messages.extend(answer.messages);
        if !answer.has_more {
            break;
        }
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_with_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn user_ids_are_numbered() {
        assert_eq!(user_id(0), "load-u0");
        assert_eq!(user_id(41), "load-u41");
    }
}
