//! The `chat-1to1` scenario: clients in pairs, each pair a direct conversation,
//! both members sending on an open-loop schedule; every delivery checked.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use futures::stream::FuturesUnordered;
use futures::StreamExt as _;
use serde::Serialize;
use switchboard_auth::Signer;
use switchboard_client::{Client, ClientError, ErrorCode, Event, Events};
use switchboard_client::{Encoding, DEFAULT_CONTENT_TYPE};
use switchboard_proto::v1::SendResult;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::check::{ConversationCheck, Counts, Delivery, Side};
use crate::connect::{self, ConnectSettings};
use crate::schedule::Schedule;
use crate::stats::{self, ErrorCounts, Latencies, Latency, LatencySummary};
use crate::system;

/// Conversations created at once while pairing.
const CREATE_CONCURRENCY: usize = 64;

/// Lead time between the end of pairing and the first scheduled send, so that
/// every sender task is waiting before its first send is due.
const SCHEDULE_LEAD: Duration = Duration::from_millis(200);

/// How often the drain looks for stragglers.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Everything the scenario needs.
#[derive(Debug, Clone)]
pub struct ChatSettings {
    pub connect: ConnectSettings,
    /// Number of clients (even: they form pairs).
    pub clients: usize,
    /// Messages per second offered, over all senders.
    pub rate: f64,
    /// The measured part of the send phase.
    pub duration: Duration,
    /// Sends before the measured part (checked, not measured).
    pub warmup: Duration,
    /// Longest wait after the last send for acks and deliveries still missing.
    pub drain: Duration,
    /// Size of each message body.
    pub body_bytes: usize,
    /// Sends awaiting an ack per client; a due send that finds this many waiting
    /// is not made and counts as generator saturation.
    pub max_in_flight: usize,
    /// Messages tracked per conversation (sent and not yet fully delivered).
    pub track_capacity: usize,
    /// The server's process id, to report its CPU and memory.
    pub server_pid: Option<u32>,
}

/// Counters bumped by the sender and receiver tasks.
#[derive(Debug, Default)]
struct Counters {
    scheduled: AtomicU64,
    sent: AtomicU64,
    /// Due sends not made: the in-flight bound or the checker was full.
    saturated: AtomicU64,
    accepted: AtomicU64,
    /// Acks that arrived inside the measured window.
    accepted_in_window: AtomicU64,
    /// Acks flagged `duplicate` although every send used a fresh id.
    duplicate_acks: AtomicU64,
    refused: AtomicU64,
    unresolved: AtomicU64,
    delivered_to_peer: AtomicU64,
    delivered_to_sender: AtomicU64,
    /// Peer deliveries that arrived inside the measured window.
    delivered_in_window: AtomicU64,
    disconnects: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// State shared by every task of a run.
struct Run {
    /// Prefix of every `client_msg_id` of this run, so that leftovers of another
    /// run are recognised as not ours.
    run_id: String,
    /// Sends intended from here on are measured.
    measure_start: Instant,
    /// End of the measured window (and of the schedule).
    measure_end: Instant,
    latencies: Latencies,
    errors: ErrorCounts,
    counters: Counters,
    /// Set before the harness closes its connections: ends are then expected.
    stopping: AtomicBool,
}

impl Run {
    fn in_window(&self, at: Instant) -> bool {
        at >= self.measure_start && at < self.measure_end
    }

    fn msg_id(&self, msg: u64) -> String {
        format!("{}-{msg}", self.run_id)
    }

    fn parse_msg_id(&self, client_msg_id: &str) -> Option<u64> {
        let (run, msg) = client_msg_id.rsplit_once('-')?;
        (run == self.run_id).then(|| msg.parse().ok())?
    }
}

/// One direct conversation and its checker.
struct Pair {
    conversation_id: Arc<str>,
    check: Mutex<ConversationCheck>,
}

impl Pair {
    fn check(&self) -> MutexGuard<'_, ConversationCheck> {
        // Every checker method leaves it consistent, so a poisoned lock is usable.
        self.check.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The outcome of a run, printed as a table and optionally written as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct ChatReport {
    pub scenario: &'static str,
    pub url: String,
    pub encoding: &'static str,
    pub clients: usize,
    pub connected: usize,
    pub rate: f64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub drain_s: f64,
    pub body_bytes: usize,
    pub max_in_flight: usize,
    pub connect: ConnectReport,
    pub counts: SendCounts,
    pub throughput: Throughput,
    pub latency: ChatLatency,
    pub errors: BTreeMap<String, u64>,
    pub correctness: Counts,
    pub disconnects: u64,
    /// Reasons the run failed; empty when it passed.
    pub failures: Vec<String>,
    pub generator: ProcessReport,
    pub server: Option<ProcessReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectReport {
    pub latency: LatencySummary,
    pub failures: BTreeMap<String, u64>,
    pub elapsed_s: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct SendCounts {
    pub scheduled: u64,
    pub sent: u64,
    pub saturated: u64,
    pub accepted: u64,
    pub duplicate_acks: u64,
    pub refused: u64,
    pub unresolved: u64,
    pub delivered_to_peer: u64,
    pub delivered_to_sender: u64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Throughput {
    /// Accepted acks per second that arrived in the measured window.
    pub accepted_per_s: f64,
    /// Deliveries to the peer per second that arrived in the measured window.
    pub delivered_per_s: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ChatLatency {
    /// Intended send time to receipt by the peer.
    pub e2e: LatencySummary,
    /// Intended send time to receipt by the sender's own session.
    pub echo: LatencySummary,
    /// Intended send time to the accepted ack.
    pub ack: LatencySummary,
}

/// CPU and memory of a process over the measured window.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProcessReport {
    pub pid: u32,
    /// Average cores busy during the measured window.
    pub cpu_cores: f64,
    pub rss_kib_start: Option<u64>,
    pub rss_kib_end: Option<u64>,
}

/// Run the scenario against a server.
pub async fn run(settings: ChatSettings, signer: Signer) -> anyhow::Result<ChatReport> {
    anyhow::ensure!(
        settings.clients >= 2 && settings.clients & 1 == 0,
        "--clients must be an even number of at least 2 (got {})",
        settings.clients
    );
    anyhow::ensure!(settings.rate > 0.0, "--rate must be positive");

    tracing::info!(clients = settings.clients, "connecting");
    let fleet = connect::connect_all(&settings.connect, &signer, settings.clients).await?;
    let connected = fleet.connected();
    let connect_report = ConnectReport {
        latency: LatencySummary::of(&fleet.connect_latency),
        failures: fleet.failures.clone(),
        elapsed_s: fleet.elapsed.as_secs_f64(),
    };
    if connected < settings.clients {
        anyhow::bail!(
            "only {connected} of {} clients connected ({:?}); every pair needs both",
            settings.clients,
            fleet.failures
        );
    }
    let (clients, events): (Vec<Client>, Vec<Events>) = fleet.clients.into_iter().flatten().unzip();

    tracing::info!(pairs = clients.len() / 2, "creating conversations");
    let pairs = create_pairs(&clients, settings.track_capacity).await?;

    let start = Instant::now() + SCHEDULE_LEAD;
    let measure_start = start + settings.warmup;
    let measure_end = measure_start + settings.duration;
    let schedule = Schedule::new(start, measure_end, clients.len(), settings.rate);
    let run = Arc::new(Run {
        run_id: run_id(),
        measure_start,
        measure_end,
        latencies: Latencies::default(),
        errors: ErrorCounts::default(),
        counters: Counters::default(),
        stopping: AtomicBool::new(false),
    });

    let mut receivers = JoinSet::new();
    for (index, events) in events.into_iter().enumerate() {
        let pair = pairs[index / 2].clone();
        receivers.spawn(receive(run.clone(), pair, index % 2, events));
    }
    let body: Arc<str> = "x".repeat(settings.body_bytes).into();
    let mut senders = JoinSet::new();
    for (index, client) in clients.iter().enumerate() {
        senders.spawn(send_loop(SendLoop {
            run: run.clone(),
            schedule,
            index,
            client: client.clone(),
            pair: pairs[index / 2].clone(),
            side: index % 2,
            body: body.clone(),
            max_in_flight: settings.max_in_flight.max(1),
        }));
    }
    tracing::info!(
        rate = settings.rate,
        warmup_s = settings.warmup.as_secs_f64(),
        duration_s = settings.duration.as_secs_f64(),
        "sending"
    );
    let usage = tokio::spawn(measure_usage(
        measure_start,
        measure_end,
        settings.server_pid,
    ));

    while let Some(joined) = senders.join_next().await {
        joined.context("a sender task panicked")?;
    }
    let drain_deadline = Instant::now() + settings.drain;
    loop {
        let awaiting: usize = pairs.iter().map(|p| p.check().awaiting()).sum();
        if awaiting == 0 || Instant::now() >= drain_deadline {
            if awaiting > 0 {
                tracing::warn!(awaiting, "drain period over with messages still missing");
            }
            break;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let (generator, server) = usage.await.context("the usage task panicked")?;

    run.stopping.store(true, Ordering::Relaxed);
    let not_closed = connect::close_all(clients, Duration::from_secs(10)).await;
    if not_closed > 0 {
        tracing::warn!(not_closed, "connections still closing at exit");
    }
    receivers.shutdown().await;

    let mut correctness = Counts::default();
    for pair in &pairs {
        correctness.add(&pair.check().finish());
    }
    let c = &run.counters;
    let counts = SendCounts {
        scheduled: get(&c.scheduled),
        sent: get(&c.sent),
        saturated: get(&c.saturated),
        accepted: get(&c.accepted),
        duplicate_acks: get(&c.duplicate_acks),
        refused: get(&c.refused),
        unresolved: get(&c.unresolved),
        delivered_to_peer: get(&c.delivered_to_peer),
        delivered_to_sender: get(&c.delivered_to_sender),
    };
    let window = settings.duration.as_secs_f64().max(f64::MIN_POSITIVE);
    let throughput = Throughput {
        accepted_per_s: get(&c.accepted_in_window) as f64 / window,
        delivered_per_s: get(&c.delivered_in_window) as f64 / window,
    };
    let histograms = run.latencies.snapshot();
    let disconnects = get(&c.disconnects);

    let mut failures = Vec::new();
    if correctness.violated() {
        failures.push(format!("delivery contract violated: {correctness:?}"));
    }
    if counts.duplicate_acks > 0 {
        failures.push(format!(
            "{} sends with fresh ids were acked as duplicates",
            counts.duplicate_acks
        ));
    }
    if disconnects > 0 {
        failures.push(format!("{disconnects} connections ended during the run"));
    }
    if counts.accepted == 0 {
        failures.push("no message was accepted".into());
    }

    Ok(ChatReport {
        scenario: "chat-1to1",
        url: settings.connect.url.clone(),
        encoding: match settings.connect.encoding {
            Encoding::Json => "json",
            Encoding::Proto => "proto",
        },
        clients: settings.clients,
        connected,
        rate: settings.rate,
        duration_s: settings.duration.as_secs_f64(),
        warmup_s: settings.warmup.as_secs_f64(),
        drain_s: settings.drain.as_secs_f64(),
        body_bytes: settings.body_bytes,
        max_in_flight: settings.max_in_flight,
        connect: connect_report,
        counts,
        throughput,
        latency: ChatLatency {
            e2e: LatencySummary::of(&histograms.e2e),
            echo: LatencySummary::of(&histograms.echo),
            ack: LatencySummary::of(&histograms.ack),
        },
        errors: run.errors.snapshot(),
        correctness,
        disconnects,
        failures,
        generator,
        server,
    })
}

/// A random-enough prefix for this run's message ids.
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
        .unwrap_or_default();
    format!("lt{:08x}{:x}", nanos, std::process::id())
}

/// Client `2p` creates the direct conversation with client `2p + 1`.
async fn create_pairs(clients: &[Client], track_capacity: usize) -> anyhow::Result<Vec<Arc<Pair>>> {
    let permits = Arc::new(tokio::sync::Semaphore::new(CREATE_CONCURRENCY));
    let mut creating = JoinSet::new();
    for pair in 0..clients.len() / 2 {
        let creator = clients[2 * pair].clone();
        let peer = crate::user_id(2 * pair + 1);
        let permits = permits.clone();
        creating.spawn(async move {
            let _permit = permits.acquire_owned().await;
            (pair, creator.create_direct(&peer).await)
        });
    }
    let mut pairs: Vec<Option<Arc<Pair>>> = (0..clients.len() / 2).map(|_| None).collect();
    while let Some(joined) = creating.join_next().await {
        let (index, result) = joined.context("a create task panicked")?;
        let conversation = result.with_context(|| {
            format!(
                "creating the direct conversation of {} and {}",
                crate::user_id(2 * index),
                crate::user_id(2 * index + 1)
            )
        })?;
        pairs[index] = Some(Arc::new(Pair {
            conversation_id: conversation.conversation_id.into(),
            check: Mutex::new(ConversationCheck::new(
                conversation.last_seq,
                track_capacity,
            )),
        }));
    }
    Ok(pairs
        .into_iter()
        .map(|p| p.expect("every create task reported"))
        .collect())
}

/// Read one client's events and check every message against its conversation.
async fn receive(run: Arc<Run>, pair: Arc<Pair>, side: Side, mut events: Events) {
    let counters = &run.counters;
    while let Some(event) = events.recv().await {
        match event {
            Event::Message(message) => {
                let at = Instant::now();
                if *message.conversation_id != *pair.conversation_id {
                    run.errors.add("message_in_other_conversation");
                    continue;
                }
                let msg = run.parse_msg_id(&message.client_msg_id);
                let delivery = pair.check().delivered(side, msg, message.seq);
                let Delivery::First {
                    intended,
                    to_sender,
                    ..
                } = delivery
                else {
                    continue;
                };
                let measured = intended >= run.measure_start;
                if to_sender {
                    bump(&counters.delivered_to_sender);
                    if measured {
                        run.latencies.record(Latency::Echo, at - intended);
                    }
                } else {
                    bump(&counters.delivered_to_peer);
                    if run.in_window(at) {
                        bump(&counters.delivered_in_window);
                    }
                    if measured {
                        run.latencies.record(Latency::E2e, at - intended);
                    }
                }
            }
            Event::GoAway(_) => run.errors.add("goaway"),
            Event::Error(error) => run.errors.add(format!("error_event_{}", error.code)),
            // This benchmark neither reconnects nor syncs: a session told it may have
            // missed messages is counted, and what it missed shows as lost.
            Event::Resync(_) => run.errors.add("resync"),
            // Conversation events from pairing, receipts, presence: not checked here.
            _ => {}
        }
    }
    if !run.stopping.load(Ordering::Relaxed) {
        bump(&counters.disconnects);
        let label = events
            .close_reason()
            .map(|e| stats::error_label(&e))
            .unwrap_or_else(|| "closed".into());
        run.errors.add(format!("disconnect_{label}"));
        tracing::warn!(reason = ?events.close_reason(), "connection ended during the run");
    }
}

/// One client's sends.
struct SendLoop {
    run: Arc<Run>,
    schedule: Schedule,
    /// The client's index: its place in the schedule.
    index: usize,
    client: Client,
    pair: Arc<Pair>,
    side: Side,
    body: Arc<str>,
    max_in_flight: usize,
}

/// What one send came to.
struct Sent {
    msg: u64,
    result: Result<SendResult, ClientError>,
    /// When the ack (or the failure) arrived.
    at: Instant,
}

async fn send_one(
    client: Client,
    conversation_id: Arc<str>,
    id: String,
    body: Arc<str>,
    msg: u64,
) -> Sent {
    let result = client
        .send_with_id(&conversation_id, &id, &body, DEFAULT_CONTENT_TYPE)
        .await;
    Sent {
        msg,
        result,
        at: Instant::now(),
    }
}

/// Make each scheduled send at its due time without waiting for earlier acks;
/// when `max_in_flight` sends are already waiting, skip the send and count it.
async fn send_loop(s: SendLoop) {
    let counters = &s.run.counters;
    let mut in_flight = FuturesUnordered::new();
    let mut n = 0;
    while let Some(due) = s.schedule.due(s.index, n) {
        n += 1;
        loop {
            tokio::select! {
                biased;
                Some(sent) = in_flight.next(), if !in_flight.is_empty() => settle(&s, sent),
                () = tokio::time::sleep_until(due) => break,
            }
        }
        bump(&counters.scheduled);
        if in_flight.len() >= s.max_in_flight {
            bump(&counters.saturated);
            continue;
        }
        let Some(msg) = s.pair.check().begin(s.side, due) else {
            bump(&counters.saturated);
            continue;
        };
        bump(&counters.sent);
        in_flight.push(send_one(
            s.client.clone(),
            s.pair.conversation_id.clone(),
            s.run.msg_id(msg),
            s.body.clone(),
            msg,
        ));
    }
    while let Some(sent) = in_flight.next().await {
        settle(&s, sent);
    }
}

/// Account for one answered (or failed) send.
fn settle(s: &SendLoop, sent: Sent) {
    let run = &s.run;
    let counters = &run.counters;
    match sent.result {
        Ok(result) => {
            bump(&counters.accepted);
            if result.duplicate {
                bump(&counters.duplicate_acks);
            }
            if run.in_window(sent.at) {
                bump(&counters.accepted_in_window);
            }
            let accepted = s.pair.check().accepted(sent.msg, result.seq);
            if let Some(accepted) = accepted {
                if accepted.intended >= run.measure_start {
                    run.latencies
                        .record(Latency::Ack, sent.at - accepted.intended);
                }
            }
        }
        Err(error) => {
            run.errors.add(stats::error_label(&error));
            if outcome_known(&error) {
                bump(&counters.refused);
                s.pair.check().refused(sent.msg);
            } else {
                bump(&counters.unresolved);
                s.pair.check().unresolved(sent.msg);
            }
        }
    }
}

/// Whether a failed send certainly did not create a message. Timeouts, lost
/// connections and the server's own timeout or unavailability leave it open.
pub(crate) fn outcome_known(error: &ClientError) -> bool {
    match error {
        ClientError::Server { code, .. } => !matches!(
            code,
            ErrorCode::Timeout | ErrorCode::Unavailable | ErrorCode::Internal
        ),
        ClientError::Connect { .. } | ClientError::Protocol(_) => true,
        ClientError::Timeout | ClientError::Closed { .. } => false,
    }
}

/// CPU and memory of the generator and (when known) the server over the window.
pub(crate) async fn measure_usage(
    start: Instant,
    end: Instant,
    server_pid: Option<u32>,
) -> (ProcessReport, Option<ProcessReport>) {
    tokio::time::sleep_until(start).await;
    let own_pid = std::process::id();
    let own_cpu = system::cpu_time();
    let own_rss = system::rss_kib("self");
    let server_start = server_pid.map(|pid| {
        (
            system::process_cpu_time(pid),
            system::rss_kib(&pid.to_string()),
        )
    });
    tokio::time::sleep_until(end).await;
    let wall = end - start;
    let generator = ProcessReport {
        pid: own_pid,
        cpu_cores: system::cores_used(system::cpu_time().saturating_sub(own_cpu), wall),
        rss_kib_start: own_rss,
        rss_kib_end: system::rss_kib("self"),
    };
    let server = server_pid.zip(server_start).map(|(pid, (cpu, rss))| {
        let cpu_end = system::process_cpu_time(pid);
        let used = cpu.zip(cpu_end).map(|(a, b)| b.saturating_sub(a));
        ProcessReport {
            pid,
            cpu_cores: used.map_or(0.0, |u| system::cores_used(u, wall)),
            rss_kib_start: rss,
            rss_kib_end: system::rss_kib(&pid.to_string()),
        }
    });
    (generator, server)
}

/// Why the offered rate was not carried, if it was not: sends skipped by the
/// generator, or sends whose ack never came. Latency figures of such a run
/// describe an overloaded system (and acks that timed out are not in them).
pub fn overload(r: &ChatReport) -> Option<String> {
    let c = &r.counts;
    if c.saturated == 0 && c.unresolved == 0 {
        return None;
    }
    let share = |n: u64| 100.0 * n as f64 / c.scheduled.max(1) as f64;
    Some(format!(
        "{:.1}% of due sends skipped at the in-flight bound, {:.1}% without an ack",
        share(c.saturated),
        share(c.unresolved)
    ))
}

/// The human-readable summary.
pub fn render(report: &ChatReport) -> String {
    let mut out = String::new();
    let r = report;
    let _ = writeln!(
        out,
        "chat-1to1  {}  encoding={}  clients={} (connected {})  rate={}/s  duration={}s  warmup={}s  body={}B",
        r.url, r.encoding, r.clients, r.connected, r.rate, r.duration_s, r.warmup_s, r.body_bytes
    );
    let _ = writeln!(
        out,
        "  connect: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} in {:.1} s, failures {:?})",
        r.connect.latency.p50_ms,
        r.connect.latency.p99_ms,
        r.connect.latency.max_ms,
        r.connect.latency.count,
        r.connect.elapsed_s,
        r.connect.failures
    );
    let _ = writeln!(
        out,
        "  throughput: accepted {:.1}/s  delivered {:.1}/s (to the peer, in the measured window)",
        r.throughput.accepted_per_s, r.throughput.delivered_per_s
    );
    let c = &r.counts;
    let _ = writeln!(
        out,
        "  sends: scheduled {}  sent {}  saturated {}  accepted {}  refused {}  unresolved {}  duplicate acks {}",
        c.scheduled, c.sent, c.saturated, c.accepted, c.refused, c.unresolved, c.duplicate_acks
    );
    let _ = writeln!(
        out,
        "  deliveries: to peer {}  to sender {}",
        c.delivered_to_peer, c.delivered_to_sender
    );
    out.push_str(&stats::latency_table(&[
        ("e2e (to peer)", r.latency.e2e),
        ("echo (to sender)", r.latency.echo),
        ("ack (accepted)", r.latency.ack),
    ]));
    let k = &r.correctness;
    let _ = writeln!(
        out,
        "  correctness: lost to peer {}  lost to sender {}  duplicates {}  gaps {}  reorders {}  unfilled gaps {}  unknown {}  seq mismatches {}  unresolved {}  disconnects {}",
        k.lost_to_peer, k.lost_to_sender, k.duplicates, k.gaps, k.reorders, k.unfilled_gaps, k.unknown, k.seq_mismatches, k.unresolved, r.disconnects
    );
    let _ = writeln!(out, "  errors: {:?}", r.errors);
    if let Some(overload) = overload(r) {
        let _ = writeln!(out, "  OVERLOADED: {overload}");
    }
    let _ = writeln!(
        out,
        "  generator: {:.2} cores, rss {} KiB{}",
        r.generator.cpu_cores,
        r.generator.rss_kib_end.unwrap_or_default(),
        if c.saturated > 0 {
            "  (SATURATED: sends were skipped)"
        } else {
            ""
        }
    );
    if let Some(server) = &r.server {
        let _ = writeln!(
            out,
            "  server (pid {}): {:.2} cores, rss {} -> {} KiB",
            server.pid,
            server.cpu_cores,
            server.rss_kib_start.unwrap_or_default(),
            server.rss_kib_end.unwrap_or_default()
        );
    }
    if r.failures.is_empty() {
        let _ = writeln!(out, "  result: PASS (delivery contract held)");
    } else {
        for failure in &r.failures {
            let _ = writeln!(out, "  FAIL: {failure}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_state() -> Run {
        let now = Instant::now();
        Run {
            run_id: "ltabc".into(),
            measure_start: now,
            measure_end: now + Duration::from_secs(1),
            latencies: Latencies::default(),
            errors: ErrorCounts::default(),
            counters: Counters::default(),
            stopping: AtomicBool::new(false),
        }
    }

    #[test]
    fn message_ids_round_trip_and_foreign_ids_are_rejected() {
        let run = run_state();
        assert_eq!(run.msg_id(17), "ltabc-17");
        assert_eq!(run.parse_msg_id("ltabc-17"), Some(17));
        assert_eq!(run.parse_msg_id("ltzzz-17"), None);
        assert_eq!(run.parse_msg_id("ltabc-x"), None);
        assert_eq!(run.parse_msg_id("5f0c2b"), None);
    }

    fn report(saturated: u64, unresolved: u64) -> ChatReport {
        let process = ProcessReport {
            pid: 1,
            cpu_cores: 0.0,
            rss_kib_start: None,
            rss_kib_end: None,
        };
        ChatReport {
            scenario: "chat-1to1",
            url: "ws://127.0.0.1:8080/v1/connect".into(),
            encoding: "json",
            clients: 2,
            connected: 2,
            rate: 10.0,
            duration_s: 1.0,
            warmup_s: 0.0,
            drain_s: 1.0,
            body_bytes: 1,
            max_in_flight: 1,
            connect: ConnectReport {
                latency: LatencySummary::default(),
                failures: BTreeMap::new(),
                elapsed_s: 0.0,
            },
            counts: SendCounts {
                scheduled: 200,
                sent: 200 - saturated,
                saturated,
                accepted: 200 - saturated - unresolved,
                duplicate_acks: 0,
                refused: 0,
                unresolved,
                delivered_to_peer: 0,
                delivered_to_sender: 0,
            },
            throughput: Throughput {
                accepted_per_s: 0.0,
                delivered_per_s: 0.0,
            },
            latency: ChatLatency {
                e2e: LatencySummary::default(),
                echo: LatencySummary::default(),
                ack: LatencySummary::default(),
            },
            errors: BTreeMap::new(),
            correctness: Counts::default(),
            disconnects: 0,
            failures: Vec::new(),
            generator: process,
            server: None,
        }
    }

    #[test]
    fn a_run_that_did_not_carry_its_rate_is_marked_overloaded() {
        assert_eq!(overload(&report(0, 0)), None);
        let text = overload(&report(20, 10)).expect("overloaded");
        assert!(text.contains("10.0% of due sends skipped"), "{text}");
        assert!(text.contains("5.0% without an ack"), "{text}");
        let rendered = render(&report(20, 10));
        assert!(rendered.contains("OVERLOADED"), "{rendered}");
        assert!(rendered.contains("result: PASS"), "{rendered}");
    }

    #[test]
    fn only_refusals_are_known_outcomes() {
        let refused = ClientError::Server {
            code: ErrorCode::RateLimited,
            message: String::new(),
            retry_after_ms: 0,
        };
        assert!(outcome_known(&refused));
        assert!(!outcome_known(&ClientError::Timeout));
        let unavailable = ClientError::Server {
            code: ErrorCode::Unavailable,
            message: String::new(),
            retry_after_ms: 0,
        };
        assert!(!outcome_known(&unavailable));
    }
}
