//! Running a scenario: connect the sessions on a ramp, form the conversations,
//! send on the open-loop schedule while reconnect churn runs, drain, then check
//! every expected delivery.
//!
//! Each session is one task that owns its connection and its [`Cursor`]s, so the
//! per-session checks need no lock; it reconnects (churn, or an unexpected close)
//! and recovers what it missed with `sync` and `history`. One dispatcher task per
//! conversation class makes the sends at their due times without waiting for
//! answers; latency is measured from the due time.
//!
//! Next to the messages, a scenario can add ephemeral traffic: receiving sessions
//! send read markers for a share of the deliveries (`load.read_fraction`) and
//! senders send `typing` before a share of their sends (`load.typing_fraction`).
//! The `receipt` and `typing` events this produces are counted; they are not
//! timeline events, so they never enter the delivery check.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use futures::stream::FuturesUnordered;
use futures::StreamExt as _;
use serde::Serialize;
use switchboard_auth::Signer;
use switchboard_client::{Client, ClientError, Event, Events, MembersAction, DEFAULT_CONTENT_TYPE};
use switchboard_proto::v1::{Message, SendResult, SyncCursor};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::acklog::{self, Outcome};
use crate::connect::ConnectSettings;
use crate::ledger::{Correctness, Cursor, Ledger, Live};
use crate::measure::{
    Count, Lat, PhaseName, Phases, Probes, RawHists, RawRun, Recorder, Usage, RAW_FORMAT,
};
use crate::plan::{ConversationSpec, Plan, SenderSlot};
use crate::scenario::{ConversationKind, Scenario, WireEncoding};
use crate::schedule::Schedule;
use crate::stats::{self, LatencySummary};
use crate::{chat, user_id};

/// Conversations created at once.
const CREATE_CONCURRENCY: usize = 32;

/// Most user ids in one create or members request (the gateway's limit).
const MEMBERS_PER_REQUEST: usize = 1_000;

/// Lead time between the end of setup and the first due send.
const SCHEDULE_LEAD: Duration = Duration::from_millis(300);

/// How often the drain checks whether every delivery arrived.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Messages per conversation asked of `sync`, and per `history` page.
const SYNC_LIMIT: u32 = 200;

/// Most `history` pages one recovery reads per conversation.
const MAX_HISTORY_PAGES: usize = 10_000;

/// Pause between two reconnect attempts of one session, doubled up to the maximum.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(100);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Pause before retrying a send of unknown outcome, doubled up to the maximum.
const RETRY_BACKOFF: Duration = Duration::from_millis(250);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Longest wait for the sessions to close at the end.
const CLOSE_LIMIT: Duration = Duration::from_secs(30);

/// Commands queued per session (churn orders are dropped when it is busy).
const COMMAND_QUEUE: usize = 4;

/// Read markers awaiting their ack per session; a read due beyond that is not sent.
const MAX_READS_IN_FLIGHT: usize = 4;

/// Least time between two `typing` of one sender in one conversation: above the
/// server's default `gateway.typing_interval_ms` (1 s), so none is rate limited.
const TYPING_MIN_GAP: Duration = Duration::from_secs(2);

/// What a run needs besides the scenario.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub scenario: Scenario,
    pub agent_index: usize,
    pub agent_count: usize,
    /// The server's process id, to report its CPU and memory.
    pub server_pid: Option<u32>,
    /// Print the progress line on stderr once per second.
    pub progress: bool,
    /// Write every send's outcome here ([`acklog`]).
    pub ledger: Option<std::path::PathBuf>,
}

/// `max-throughput`'s steps.
#[derive(Debug, Clone, Copy)]
pub struct Steps {
    pub start: f64,
    pub step: f64,
    pub max: f64,
    pub target_p99_ms: f64,
    pub step_duration: Duration,
}

/// One step of `max-throughput`.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    /// Messages per second offered.
    pub rate: f64,
    /// Acks per second for sends due in the measured window.
    pub accepted_per_s: f64,
    /// Deliveries per second of messages due in the measured window.
    pub delivered_per_s: f64,
    pub e2e: LatencySummary,
    pub ack: LatencySummary,
    pub skipped: u64,
    pub unresolved: u64,
    pub errors: u64,
    /// Every delivery arrived within the drain.
    pub caught_up: bool,
    pub passed: bool,
    /// Why it did not pass.
    pub reason: Option<String>,
}

/// A session's command.
#[derive(Debug, Clone, Copy)]
enum Command {
    /// Disconnect, stay away for the downtime, reconnect and recover.
    Churn,
    /// Close for good and report.
    Stop,
}

/// The parts of a message id: `<run>-<msg>-<session>-<due us since epoch>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MsgId {
    msg: u64,
    session: usize,
    due_us: u64,
}

/// A session's connection slot, read by the dispatchers.
struct SessionSlot {
    client: Mutex<Option<Client>>,
    commands: mpsc::Sender<Command>,
}

impl SessionSlot {
    fn client(&self) -> MutexGuard<'_, Option<Client>> {
        // Replacing an Option cannot leave it inconsistent: a poisoned lock is usable.
        self.client.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One created conversation.
struct Conv {
    id: Arc<str>,
    ledger: Mutex<Ledger>,
    /// Member sessions that connected: each must hold every message by the end.
    sessions: u64,
    /// First receipts (live or recovered) over all its sessions.
    received: AtomicU64,
}

impl Conv {
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // Every ledger method leaves it consistent: a poisoned lock is usable.
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn caught_up(&self) -> bool {
        let ledger = self.ledger();
        ledger.acked_unsequenced() == 0
            && self.received.load(Ordering::Relaxed)
                >= ledger.expected_per_session() * self.sessions
    }
}

struct Convs {
    list: Vec<Option<Conv>>,
    by_id: HashMap<Arc<str>, usize>,
}

/// State shared by every task of a run.
struct Ctx {
    run_id: String,
    scenario: Scenario,
    plan: Plan,
    signer: Signer,
    connect: ConnectSettings,
    recorder: Arc<Recorder>,
    sessions: Vec<SessionSlot>,
    convs: OnceLock<Convs>,
    next_msg: AtomicU64,
    /// Sends due in `[measure_from, measure_until)` (us since the epoch) are measured.
    measure_from: AtomicU64,
    measure_until: AtomicU64,
    /// Reconnect attempts stop after this (us since the epoch).
    reconnect_until: AtomicU64,
    /// Set before the sessions are told to stop: closes are then expected.
    stopping: AtomicBool,
    /// Sends whose outcome stayed unknown.
    unresolved: AtomicU64,
    /// Where each send's outcome is written, when asked.
    acklog: Option<acklog::Writer>,
}

impl Ctx {
    fn since_epoch(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.recorder.epoch())
            .as_micros() as u64
    }

    fn at(&self, micros: u64) -> Instant {
        self.recorder.epoch() + Duration::from_micros(micros)
    }

    fn measured(&self, due_us: u64) -> bool {
        due_us >= self.measure_from.load(Ordering::Relaxed)
            && due_us < self.measure_until.load(Ordering::Relaxed)
    }

    fn msg_id(&self, id: MsgId) -> String {
        format!("{}-{}-{}-{}", self.run_id, id.msg, id.session, id.due_us)
    }

    fn parse_msg_id(&self, text: &str) -> Option<MsgId> {
        parse_msg_id(&self.run_id, text)
    }

    fn convs(&self) -> Option<&Convs> {
        self.convs.get()
    }
}

/// The parts of one of run `run_id`'s message ids; `None` for any other id.
fn parse_msg_id(run_id: &str, text: &str) -> Option<MsgId> {
    let mut parts = text.rsplitn(4, '-');
    let due_us = parts.next()?.parse().ok()?;
    let session = parts.next()?.parse().ok()?;
    let msg = parts.next()?.parse().ok()?;
    (parts.next()? == run_id).then_some(MsgId {
        msg,
        session,
        due_us,
    })
}

/// A random-enough id for this run's messages (no `-` in it).
fn run_id(agent: usize) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
        .unwrap_or_default();
    format!("sl{:08x}{:x}a{agent}", nanos, std::process::id())
}

/// What a session reports when it ends.
#[derive(Debug, Default)]
struct SessionEnd {
    connected: bool,
    online: bool,
    cursors: Vec<(usize, Cursor)>,
    delivered: u64,
    recovered: u64,
    duplicates: u64,
    reorders: u64,
    /// Skipped on a live connection and never announced by a `resync`.
    gaps: u64,
    /// Skipped on a live connection and announced by a `resync` (then synced).
    gaps_resynced: u64,
    overlap: u64,
}

type Recovery = Pin<Box<dyn Future<Output = Result<Vec<Message>, ClientError>> + Send>>;

/// One session's task state.
struct Session {
    ctx: Arc<Ctx>,
    index: usize,
    events: Option<Events>,
    end: SessionEnd,
    cursors_ready: bool,
    /// Accumulates `load.read_fraction` per delivery; a read marker is due at 1.
    read_credit: f64,
    /// Read markers sent and not yet acked (bounded by [`MAX_READS_IN_FLIGHT`]).
    reads_in_flight: Arc<AtomicUsize>,
    /// The server sent `resync`: sync from the cursors on this connection (what a
    /// client does), once no recovery is running.
    resync: bool,
    /// A `resync` came on this connection and the sync it asked for has not answered
    /// yet. Whatever the server failed to deliver before sending it is stored, so
    /// that sync brings it back: a live delivery that skips numbers meanwhile (it
    /// can overtake the sync's answer) skips what the `resync` already announced.
    /// Numbers the sync then does not bring are still `lost` at the end.
    resync_open: bool,
    /// Sequence numbers skipped on this connection that no `resync` has announced
    /// yet: a contract violation unless one comes before the connection ends.
    unannounced_gaps: u64,
}

impl Session {
    fn slot(&self) -> &SessionSlot {
        &self.ctx.sessions[self.index]
    }

    async fn connect_once(&self) -> Result<(Client, Events), ClientError> {
        let spec = &self.ctx.plan.sessions[self.index];
        let user = user_id(spec.user);
        let token = self
            .ctx
            .signer
            .sign(&user, self.ctx.connect.token_ttl)
            .map_err(|e| ClientError::Protocol(format!("signing a token: {e}")))?;
        let url = &self.ctx.scenario.target.urls[spec.url];
        let mut options =
            self.ctx
                .connect
                .options_for(url, token, format!("load-d{}", spec.device));
        options.local_addr = spec
            .source
            .map(|source| self.ctx.scenario.target.source_addrs[source]);
        Client::connect(options).await
    }

    fn online(&mut self, client: Client, events: Events) {
        *self.slot().client() = Some(client);
        self.events = Some(events);
        self.end.online = true;
        self.ctx.recorder.online.fetch_add(1, Ordering::Relaxed);
    }

    fn offline(&mut self) -> Option<Client> {
        if self.end.online {
            self.end.online = false;
            self.ctx.recorder.online.fetch_sub(1, Ordering::Relaxed);
        }
        self.slot().client().take()
    }

    /// Build the cursors once the conversations exist.
    fn ensure_cursors(&mut self) {
        if self.cursors_ready {
            return;
        }
        let Some(convs) = self.ctx.convs() else {
            return;
        };
        for &ci in &self.ctx.plan.sessions[self.index].conversations {
            if let Some(conv) = &convs.list[ci] {
                let baseline = conv.ledger().baseline;
                self.end.cursors.push((ci, Cursor::new(baseline)));
            }
        }
        self.cursors_ready = true;
    }

    fn cursor(&mut self, ci: usize) -> Option<&mut Cursor> {
        self.end
            .cursors
            .iter_mut()
            .find(|(c, _)| *c == ci)
            .map(|(_, cursor)| cursor)
    }

    /// One event from the current connection.
    fn handle(&mut self, event: Event) {
        let recorder = self.ctx.recorder.clone();
        match event {
            Event::Message(message) => {
                let at = Instant::now();
                self.ensure_cursors();
                let ctx = self.ctx.clone();
                let Some(convs) = ctx.convs() else {
                    recorder.error("message_before_start");
                    return;
                };
                let Some(&ci) = convs.by_id.get(message.conversation_id.as_str()) else {
                    recorder.error("message_in_unknown_conversation");
                    return;
                };
                let Some(cursor) = self.cursor(ci) else {
                    recorder.error("message_in_other_conversation");
                    return;
                };
                match cursor.live(message.seq) {
                    Live::Duplicate | Live::Stale => self.end.duplicates += 1,
                    Live::Overlap => self.end.overlap += 1,
                    outcome @ (Live::New { .. } | Live::Reorder) => {
                        match outcome {
                            Live::New { gap } if self.resync_open => self.end.gaps_resynced += gap,
                            Live::New { gap } => self.unannounced_gaps += gap,
                            _ => self.end.reorders += 1,
                        }
                        let id = ctx.parse_msg_id(&message.client_msg_id);
                        let conv = convs.list[ci]
                            .as_ref()
                            .expect("cursors exist only for created conversations");
                        conv.ledger().received(id.map(|id| id.msg), message.seq);
                        conv.received.fetch_add(1, Ordering::Relaxed);
                        self.end.delivered += 1;
                        recorder.count(Count::Delivered);
                        if id.is_some_and(|id| id.session != self.index) {
                            self.maybe_read(&conv.id, message.seq);
                        }
                        if let Some(id) = id.filter(|id| ctx.measured(id.due_us)) {
                            let which = if id.session == self.index {
                                Lat::Echo
                            } else {
                                Lat::E2e
                            };
                            recorder
                                .latency(which, at.saturating_duration_since(ctx.at(id.due_us)));
                        }
                    }
                }
            }
            Event::Receipt(_) => recorder.count(Count::ReceiptReceived),
            Event::Typing(_) => recorder.count(Count::TypingReceived),
            Event::GoAway(_) => recorder.error("goaway"),
            Event::Error(error) => recorder.error(format!("error_event_{}", error.code)),
            Event::Resync(resync) => {
                tracing::debug!(session = self.index, reason = %resync.reason, "resync asked");
                recorder.count(Count::Resync);
                self.resync = true;
                self.resync_open = true;
                self.end.gaps_resynced += std::mem::take(&mut self.unannounced_gaps);
            }
            // Conversation events from forming the groups, presence.
            _ => {}
        }
    }

    /// Send a read marker for `seq` if one is due (`load.read_fraction` of the
    /// deliveries), without waiting for its ack.
    fn maybe_read(&mut self, conversation_id: &Arc<str>, seq: u64) {
        let fraction = self.ctx.scenario.load.read_fraction;
        if fraction <= 0.0 || self.ctx.stopping.load(Ordering::Relaxed) {
            return;
        }
        self.read_credit += fraction;
        if self.read_credit < 1.0 {
            return;
        }
        self.read_credit -= 1.0;
        if self.reads_in_flight.load(Ordering::Relaxed) >= MAX_READS_IN_FLIGHT {
            return;
        }
        let Some(client) = self.slot().client().clone() else {
            return;
        };
        let in_flight = self.reads_in_flight.clone();
        in_flight.fetch_add(1, Ordering::Relaxed);
        let recorder = self.ctx.recorder.clone();
        let conversation_id = conversation_id.clone();
        tokio::spawn(async move {
            match client.read(&conversation_id, seq).await {
                Ok(()) => recorder.count(Count::ReadAcked),
                // The connection closed under it (churn or the end of the run).
                Err(ClientError::Closed { .. }) => {}
                Err(error) => recorder.error(format!("read_{}", stats::error_label(&error))),
            }
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Messages that came back from sync or history.
    fn apply_recovered(&mut self, messages: Vec<Message>) {
        tracing::debug!(
            session = self.index,
            messages = messages.len(),
            "recovered after reconnect"
        );
        let ctx = self.ctx.clone();
        let Some(convs) = ctx.convs() else {
            return;
        };
        for message in messages {
            let Some(&ci) = convs.by_id.get(message.conversation_id.as_str()) else {
                // Another run's conversation of the same user.
                continue;
            };
            let Some(cursor) = self.cursor(ci) else {
                continue;
            };
            if cursor.recovered(message.seq) {
                let conv = convs.list[ci]
                    .as_ref()
                    .expect("cursors exist only for created conversations");
                let id = ctx.parse_msg_id(&message.client_msg_id);
                conv.ledger().received(id.map(|id| id.msg), message.seq);
                conv.received.fetch_add(1, Ordering::Relaxed);
                self.end.recovered += 1;
                ctx.recorder.count(Count::Recovered);
            } else {
                self.end.overlap += 1;
            }
        }
    }

    /// Close the connection, handling every event it still delivers.
    async fn disconnect(&mut self) {
        let client = self.offline();
        let Some(mut events) = self.events.take() else {
            return;
        };
        if let Some(client) = client {
            let closing = client.close();
            tokio::pin!(closing);
            loop {
                tokio::select! {
                    () = &mut closing => break,
                    event = events.recv() => match event {
                        Some(event) => self.handle(event),
                        None => break,
                    },
                }
            }
        }
        while let Some(event) = events.recv().await {
            self.handle(event);
        }
        self.connection_ended();
    }

    /// The current connection is gone: gaps on it that no `resync` announced count.
    fn connection_ended(&mut self) {
        self.resync_open = false;
        self.end.gaps += std::mem::take(&mut self.unannounced_gaps);
    }

    /// Where `sync` starts for each of this session's conversations.
    fn sync_cursors(&self) -> Vec<SyncCursor> {
        match self.ctx.convs() {
            Some(convs) => self
                .end
                .cursors
                .iter()
                .filter_map(|(ci, cursor)| {
                    convs.list[*ci].as_ref().map(|conv| SyncCursor {
                        conversation_id: conv.id.to_string(),
                        last_seq: cursor.sync_from(),
                    })
                })
                .collect(),
            None => Vec::new(),
        }
    }

    /// The recovery a `resync` asked for, on the current connection; `None` when
    /// none is due (or there is nothing to sync).
    fn take_resync(&mut self) -> Option<Recovery> {
        if !std::mem::take(&mut self.resync) {
            return None;
        }
        let client = self.slot().client().clone()?;
        let cursors = self.sync_cursors();
        if cursors.is_empty() {
            return None;
        }
        Some(Box::pin(recover(client, cursors)))
    }

    /// Reconnect (with backoff, until the reconnect deadline) and start recovering.
    async fn reconnect(&mut self) -> Option<Recovery> {
        let mut backoff = RECONNECT_BACKOFF;
        loop {
            let began = Instant::now();
            match self.connect_once().await {
                Ok((client, events)) => {
                    // Reconnects are connects too: their time is in the same histogram.
                    self.ctx.recorder.latency(Lat::Connect, began.elapsed());
                    self.ctx.recorder.count(Count::Reconnect);
                    self.online(client.clone(), events);
                    for (_, cursor) in &mut self.end.cursors {
                        cursor.reconnected();
                    }
                    let cursors = self.sync_cursors();
                    if cursors.is_empty() {
                        return None;
                    }
                    return Some(Box::pin(recover(client, cursors)));
                }
                Err(error) => {
                    self.ctx
                        .recorder
                        .error(format!("reconnect_{}", stats::error_label(&error)));
                    let until = self
                        .ctx
                        .at(self.ctx.reconnect_until.load(Ordering::Relaxed));
                    if Instant::now() + backoff >= until {
                        tracing::warn!(session = self.index, %error, "giving up reconnecting");
                        return None;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                }
            }
        }
    }
}

/// What a reconnected session missed: `sync` from its cursors, then `history`
/// pages for conversations the sync answer truncated.
async fn recover(client: Client, cursors: Vec<SyncCursor>) -> Result<Vec<Message>, ClientError> {
    let result = client.sync(cursors.clone(), SYNC_LIMIT).await?;
    let mut messages = result.messages;
    for conversation_id in result.truncated {
        let Some(cursor) = cursors
            .iter()
            .find(|c| c.conversation_id == conversation_id)
        else {
            continue;
        };
        let from = messages
            .iter()
            .filter(|m| m.conversation_id == conversation_id)
            .map(|m| m.seq)
            .max()
            .unwrap_or(cursor.last_seq);
        let rest = crate::history_after(
            &client,
            &conversation_id,
            from,
            SYNC_LIMIT,
            MAX_HISTORY_PAGES,
        )
        .await?;
        messages.extend(rest);
    }
    Ok(messages)
}

/// The whole life of one session.
async fn session_task(
    ctx: Arc<Ctx>,
    index: usize,
    due: Instant,
    mut commands: mpsc::Receiver<Command>,
    mut start: watch::Receiver<bool>,
    connected: oneshot::Sender<bool>,
) -> SessionEnd {
    let mut session = Session {
        ctx: ctx.clone(),
        index,
        events: None,
        end: SessionEnd::default(),
        cursors_ready: false,
        read_credit: 0.0,
        reads_in_flight: Arc::new(AtomicUsize::new(0)),
        resync: false,
        resync_open: false,
        unannounced_gaps: 0,
    };
    tokio::time::sleep_until(due).await;
    let began = Instant::now();
    match session.connect_once().await {
        Ok((client, events)) => {
            ctx.recorder.latency(Lat::Connect, began.elapsed());
            ctx.recorder.count(Count::Connect);
            session.online(client, events);
            session.end.connected = true;
            let _ = connected.send(true);
        }
        Err(error) => {
            ctx.recorder.count(Count::ConnectFailure);
            ctx.recorder
                .error(format!("connect_{}", stats::error_label(&error)));
            let _ = connected.send(false);
            return session.end;
        }
    }

    let mut recovery: Option<Recovery> = None;
    let mut watching_start = true;
    loop {
        tokio::select! {
            biased;
            command = commands.recv() => match command {
                Some(Command::Churn) if session.events.is_some() => {
                    // A recovery of the old connection is moot.
                    drop(recovery.take());
                    session.disconnect().await;
                    let downtime = ctx.scenario.churn.as_ref().map(|c| c.downtime).unwrap_or_default();
                    tokio::time::sleep(downtime).await;
                    recovery = session.reconnect().await;
                }
                Some(Command::Churn) => {}
                Some(Command::Stop) | None => break,
            },
            changed = start.changed(), if watching_start => {
                watching_start = false;
                if changed.is_ok() {
                    session.ensure_cursors();
                }
            }
            recovered = async { recovery.as_mut().expect("guarded").await }, if recovery.is_some() => {
                match recovered {
                    Ok(messages) => session.apply_recovered(messages),
                    Err(error) => ctx.recorder.error(format!("recovery_{}", stats::error_label(&error))),
                }
                // Every resync so far was answered, unless one came while that ran.
                session.resync_open = session.resync;
                // A resync asked while that ran.
                recovery = session.take_resync();
            }
            event = async { session.events.as_mut().expect("guarded").recv().await }, if session.events.is_some() => match event {
                Some(event) => {
                    session.handle(event);
                    if recovery.is_none() {
                        recovery = session.take_resync();
                    }
                }
                None => {
                    // The server ended the connection.
                    let reason = session.events.as_ref().and_then(Events::close_reason);
                    session.events = None;
                    session.offline();
                    session.connection_ended();
                    recovery = None;
                    if ctx.stopping.load(Ordering::Relaxed) {
                        break;
                    }
                    let label = reason.as_ref().map(stats::error_label).unwrap_or_else(|| "closed".into());
                    ctx.recorder.error(format!("disconnect_{label}"));
                    tracing::warn!(session = index, ?reason, "connection ended during the run; reconnecting");
                    recovery = session.reconnect().await;
                }
            },
        }
    }
    // A recovery still running at the stop is finished first.
    if let Some(recovery) = recovery.take() {
        if let Ok(messages) = recovery.await {
            session.apply_recovered(messages);
        }
    }
    let online_at_stop = session.end.online;
    session.disconnect().await;
    session.end.online = online_at_stop;
    session.end
}

/// Create the plan's conversations from their first connected member.
async fn create_conversations(ctx: &Arc<Ctx>, connected: &[bool]) -> Convs {
    let permits = Arc::new(Semaphore::new(CREATE_CONCURRENCY));
    let mut creating = JoinSet::new();
    for (index, spec) in ctx.plan.conversations.iter().enumerate() {
        let member_sessions: Vec<usize> = ctx.plan.member_sessions(index).collect();
        let online = member_sessions.iter().filter(|&&s| connected[s]).count() as u64;
        let creator = member_sessions.iter().copied().find(|&s| connected[s]);
        let client = creator.and_then(|s| ctx.sessions[s].client().clone());
        let Some(client) = client else {
            ctx.recorder.error("create_no_member_connected");
            continue;
        };
        let spec = spec.clone();
        let permits = permits.clone();
        creating.spawn(async move {
            let _permit = permits.acquire_owned().await;
            (index, online, create_one(&client, &spec, index).await)
        });
    }
    let mut list: Vec<Option<Conv>> = (0..ctx.plan.conversations.len()).map(|_| None).collect();
    let mut by_id = HashMap::new();
    while let Some(joined) = creating.join_next().await {
        let Ok((index, sessions, result)) = joined else {
            ctx.recorder.error("create_panicked");
            continue;
        };
        match result {
            Ok((id, baseline)) => {
                let id: Arc<str> = id.into();
                by_id.insert(id.clone(), index);
                list[index] = Some(Conv {
                    id,
                    ledger: Mutex::new(Ledger::new(baseline)),
                    sessions,
                    received: AtomicU64::new(0),
                });
            }
            Err(error) => {
                tracing::warn!(conversation = index, %error, "creating a conversation failed");
                ctx.recorder
                    .error(format!("create_{}", stats::error_label(&error)));
            }
        }
    }
    Convs { list, by_id }
}

/// Create one conversation; returns its id and highest sequence (after adding
/// members beyond the first request, which the timeline records as events).
async fn create_one(
    client: &Client,
    spec: &ConversationSpec,
    index: usize,
) -> Result<(String, u64), ClientError> {
    let others: Vec<String> = spec.members[1..].iter().map(|&u| user_id(u)).collect();
    match spec.kind {
        ConversationKind::Direct => {
            let conversation = client.create_direct(&others[0]).await?;
            Ok((conversation.conversation_id, conversation.last_seq))
        }
        ConversationKind::Group => {
            // The creator counts against the per-request limit too.
            let first = others.len().min(MEMBERS_PER_REQUEST - 1);
            let conversation = client
                .create_group(&format!("load group {index}"), others[..first].to_vec())
                .await?;
            let mut last_seq = conversation.last_seq;
            for chunk in others[first..].chunks(MEMBERS_PER_REQUEST) {
                let added = client
                    .members(
                        &conversation.conversation_id,
                        MembersAction::Add,
                        chunk.to_vec(),
                    )
                    .await?;
                // Adding members appends a system event: the run starts after it.
                if let Some(added) = added {
                    last_seq = last_seq.max(added.last_seq);
                }
            }
            Ok((conversation.conversation_id, last_seq))
        }
    }
}

/// One class's sends: global send `g` is due at `start + g / rate` and made by
/// slot `g % slots`, whether or not earlier sends were answered.
async fn dispatch(
    ctx: Arc<Ctx>,
    schedule: Schedule,
    slots: Vec<SenderSlot>,
    body: Arc<str>,
    max_in_flight: usize,
) {
    let recorder = ctx.recorder.clone();
    let mut waiting = vec![0usize; slots.len()];
    let typing_fraction = ctx.scenario.load.typing_fraction;
    let mut typing_credit = 0.0f64;
    let mut last_typing: Vec<Option<Instant>> = vec![None; slots.len()];
    let mut in_flight = FuturesUnordered::new();
    let mut global = 0u64;
    while let Some(due) = schedule.due_global(global) {
        let slot_index = schedule.sender_of(global);
        global += 1;
        loop {
            tokio::select! {
                biased;
                Some(sent) = in_flight.next(), if !in_flight.is_empty() => settle(&ctx, &mut waiting, sent),
                () = tokio::time::sleep_until(due) => break,
            }
        }
        recorder.count(Count::Scheduled);
        if waiting[slot_index] >= max_in_flight {
            recorder.count(Count::Skipped);
            continue;
        }
        let slot = slots[slot_index];
        let client = ctx.sessions[slot.session].client().clone();
        let Some(client) = client else {
            recorder.count(Count::SkippedOffline);
            continue;
        };
        let Some(conv) = ctx.convs().and_then(|c| c.list[slot.conversation].as_ref()) else {
            continue;
        };
        let id = MsgId {
            msg: ctx.next_msg.fetch_add(1, Ordering::Relaxed),
            session: slot.session,
            due_us: ctx.since_epoch(due),
        };
        let client_msg_id = ctx.msg_id(id);
        let conversation_id = conv.id.clone();
        let body = body.clone();
        waiting[slot_index] += 1;
        recorder.count(Count::Sent);
        typing_credit += typing_fraction;
        let typing = typing_credit >= 1.0
            && last_typing[slot_index]
                .is_none_or(|at| due.saturating_duration_since(at) >= TYPING_MIN_GAP);
        if typing {
            typing_credit -= 1.0;
            last_typing[slot_index] = Some(due);
        }
        let ctx = ctx.clone();
        in_flight.push(async move {
            let send = client.send_with_id(
                &conversation_id,
                &client_msg_id,
                &body,
                DEFAULT_CONTENT_TYPE,
            );
            // `join` polls the typing request first, so its frame goes out first.
            let (typed, mut result) = if typing {
                let (typed, result) = tokio::join!(client.typing(&conversation_id, true), send);
                (Some(typed), result)
            } else {
                (None, send.await)
            };
            // Unknown outcome: the same send again, while `load.retry_for` allows.
            let retry_until = due + ctx.scenario.load.retry_for;
            let mut backoff = RETRY_BACKOFF;
            let mut retried = false;
            while matches!(&result, Err(e) if !chat::outcome_known(e))
                && Instant::now() + backoff <= retry_until
            {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                // The connection the session has now (it may have reconnected).
                let Some(client) = ctx.sessions[slot.session].client().clone() else {
                    continue;
                };
                ctx.recorder.count(Count::Retry);
                retried = true;
                result = client
                    .send_with_id(
                        &conversation_id,
                        &client_msg_id,
                        &body,
                        DEFAULT_CONTENT_TYPE,
                    )
                    .await;
            }
            Sent {
                slot: slot_index,
                conversation: slot.conversation,
                id,
                result,
                typed,
                retried,
                at: Instant::now(),
            }
        });
    }
    while let Some(sent) = in_flight.next().await {
        settle(&ctx, &mut waiting, sent);
    }
}

/// What one send came to.
struct Sent {
    slot: usize,
    conversation: usize,
    id: MsgId,
    result: Result<SendResult, ClientError>,
    /// The outcome of the `typing` sent before it, if one was.
    typed: Option<Result<(), ClientError>>,
    /// Made more than once (the last outcome is `result`).
    retried: bool,
    at: Instant,
}

fn settle(ctx: &Ctx, waiting: &mut [usize], sent: Sent) {
    waiting[sent.slot] -= 1;
    let recorder = &ctx.recorder;
    match &sent.typed {
        Some(Ok(())) => recorder.count(Count::TypingAcked),
        Some(Err(ClientError::Closed { .. })) | None => {}
        Some(Err(error)) => recorder.error(format!("typing_{}", stats::error_label(error))),
    }
    let Some(conv) = ctx.convs().and_then(|c| c.list[sent.conversation].as_ref()) else {
        return;
    };
    if let Some(log) = &ctx.acklog {
        let (outcome, seq) = match &sent.result {
            Ok(result) => (Outcome::Accepted, result.seq),
            Err(error) if chat::outcome_known(error) => (Outcome::Refused, 0),
            Err(_) => (Outcome::Unresolved, 0),
        };
        log.record(&acklog::Entry {
            conversation: conv.id.to_string(),
            client_msg_id: ctx.msg_id(sent.id),
            sender: user_id(ctx.plan.sessions[sent.id.session].user),
            outcome,
            seq,
        });
    }
    match sent.result {
        Ok(result) => {
            recorder.count(Count::Accepted);
            // A retry of a send that was taken is acked as a duplicate, as it should.
            if result.duplicate && !sent.retried {
                recorder.error("duplicate_ack");
            }
            if ctx.measured(sent.id.due_us) {
                recorder.latency(
                    Lat::Ack,
                    sent.at.saturating_duration_since(ctx.at(sent.id.due_us)),
                );
            }
            conv.ledger().accepted(sent.id.msg, result.seq);
        }
        Err(error) => {
            recorder.error(stats::error_label(&error));
            if chat::outcome_known(&error) {
                recorder.count(Count::Refused);
                conv.ledger().refused(sent.id.msg);
            } else {
                recorder.count(Count::Unresolved);
                ctx.unresolved.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Sessions that disconnect every churn interval, rotating through all of them.
async fn churn(ctx: Arc<Ctx>, until: Instant) {
    let Some(churn) = ctx.scenario.churn.clone() else {
        return;
    };
    let count = ctx.sessions.len();
    if count == 0 {
        return;
    }
    // A fixed stride coprime with the count visits every session once per round.
    let stride = (1..count)
        .rev()
        .find(|s| gcd(*s, count) == 1 && *s <= count / 2 + 1)
        .unwrap_or(1);
    let mut next = 0usize;
    let mut at = Instant::now() + churn.interval;
    while at < until {
        tokio::time::sleep_until(at).await;
        at += churn.interval;
        let online = ctx.recorder.online.load(Ordering::Relaxed).max(0) as f64;
        let mut picked = (online * churn.fraction).round() as usize;
        let mut tries = 0;
        while picked > 0 && tries < count {
            tries += 1;
            next = (next + stride) % count;
            let slot = &ctx.sessions[next];
            if slot.client().is_some() && slot.commands.try_send(Command::Churn).is_ok() {
                picked -= 1;
            }
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A run in progress: connected sessions and formed conversations.
struct Fleet {
    ctx: Arc<Ctx>,
    tasks: JoinSet<SessionEnd>,
    connected: Vec<bool>,
    phase: PhaseName,
    probes: Probes,
    epoch_unix_ms: u64,
    connect_end: Instant,
    _start_tx: watch::Sender<bool>,
}

/// Connect every session on the ramp and form the conversations.
async fn set_up(options: &RunOptions, signer: Signer, total: Duration) -> anyhow::Result<Fleet> {
    let scenario = options.scenario.clone();
    let plan = Plan::new(&scenario, options.agent_index, options.agent_count)?;
    if plan.max_rate_per_user() > 40.0 {
        tracing::warn!(
            per_user = plan.max_rate_per_user(),
            "a user sends more than 40 msg/s; the server's default limit is 50/s per user"
        );
    }
    let epoch = Instant::now();
    let epoch_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    let recorder = Arc::new(Recorder::new(epoch));
    let phase: PhaseName = Arc::new(Mutex::new("connect"));
    let probes = Probes::start(recorder.clone(), phase.clone(), options.progress);
    let client = &scenario.client;
    let max_in_flight = scenario.load.max_in_flight;
    let connect = ConnectSettings {
        url: scenario.target.urls[0].clone(),
        source_addrs: scenario.target.source_addrs.clone(),
        encoding: match scenario.target.encoding {
            WireEncoding::Json => switchboard_client::Encoding::Json,
            WireEncoding::Proto => switchboard_client::Encoding::Proto,
        },
        rate: scenario.users.connect_rate,
        token_ttl: total + Duration::from_secs(3_600),
        connect_timeout: client.connect_timeout,
        request_timeout: client.request_timeout,
        max_in_flight: max_in_flight + 8,
        outbound_queue: (max_in_flight + 8).max(16),
        event_queue: client.event_queue,
        read_buffer: client.read_buffer,
        write_buffer: client.write_buffer,
    };

    let acklog = options
        .ledger
        .as_deref()
        .map(acklog::Writer::create)
        .transpose()?;
    let mut receivers = Vec::new();
    let mut sessions = Vec::new();
    for _ in 0..plan.sessions.len() {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        sessions.push(SessionSlot {
            client: Mutex::new(None),
            commands: tx,
        });
        receivers.push(rx);
    }
    let ctx = Arc::new(Ctx {
        run_id: run_id(options.agent_index),
        scenario: scenario.clone(),
        plan,
        signer,
        connect,
        recorder: recorder.clone(),
        sessions,
        convs: OnceLock::new(),
        next_msg: AtomicU64::new(0),
        measure_from: AtomicU64::new(u64::MAX),
        measure_until: AtomicU64::new(u64::MAX),
        reconnect_until: AtomicU64::new(u64::MAX),
        stopping: AtomicBool::new(false),
        unresolved: AtomicU64::new(0),
        acklog,
    });

    tracing::info!(
        sessions = ctx.sessions.len(),
        conversations = ctx.plan.conversations.len(),
        agent = options.agent_index,
        "connecting"
    );
    let (start_tx, start_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut outcomes = Vec::new();
    let ramp = scenario.users.connect_rate;
    for (index, commands) in receivers.into_iter().enumerate() {
        let (tx, rx) = oneshot::channel();
        outcomes.push(rx);
        let due = Instant::now() + Duration::from_secs_f64(index as f64 / ramp);
        tasks.spawn(session_task(
            ctx.clone(),
            index,
            due,
            commands,
            start_rx.clone(),
            tx,
        ));
    }
    let mut connected = Vec::with_capacity(outcomes.len());
    for outcome in outcomes {
        connected.push(outcome.await.unwrap_or(false));
    }
    let connect_end = Instant::now();
    let up = connected.iter().filter(|&&c| c).count();
    tracing::info!(connected = up, of = connected.len(), "connected");

    *phase.lock().unwrap_or_else(|e| e.into_inner()) = "create";
    let convs = create_conversations(&ctx, &connected).await;
    let created = convs.list.iter().filter(|c| c.is_some()).count();
    tracing::info!(created, of = convs.list.len(), "conversations formed");
    if ctx.convs.set(convs).is_err() {
        anyhow::bail!("the conversations were formed twice");
    }
    let _ = start_tx.send(true);
    Ok(Fleet {
        ctx,
        tasks,
        connected,
        phase,
        probes,
        epoch_unix_ms,
        connect_end,
        _start_tx: start_tx,
    })
}

impl Fleet {
    fn set_phase(&self, name: &'static str) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = name;
    }

    /// The next measured window after `warmup`, aligned to whole intervals.
    fn window(&self, warmup: Duration, duration: Duration) -> (Instant, Instant) {
        let epoch = self.ctx.recorder.epoch();
        let earliest = Instant::now() + SCHEDULE_LEAD + warmup;
        let whole = earliest
            .saturating_duration_since(epoch)
            .as_secs_f64()
            .ceil();
        let measure_start = epoch + Duration::from_secs_f64(whole);
        (measure_start, measure_start + duration)
    }

    /// Send at `scale` times the plan's rates: `warmup` unmeasured, then the
    /// measured window.
    async fn send(
        &self,
        scale: f64,
        warmup: Duration,
        (measure_start, measure_end): (Instant, Instant),
    ) {
        let ctx = &self.ctx;
        let send_start = measure_start - warmup;
        ctx.measure_from
            .store(ctx.since_epoch(measure_start), Ordering::Relaxed);
        ctx.measure_until
            .store(ctx.since_epoch(measure_end), Ordering::Relaxed);
        ctx.reconnect_until.store(
            ctx.since_epoch(measure_end + ctx.scenario.load.drain),
            Ordering::Relaxed,
        );
        self.set_phase("warmup");
        let body: Arc<str> = "x".repeat(ctx.scenario.load.body_bytes).into();
        let mut senders = JoinSet::new();
        for class in &ctx.plan.classes {
            let rate = class.rate * scale;
            let slots: Vec<SenderSlot> = class
                .slots
                .iter()
                .copied()
                .filter(|s| {
                    ctx.convs()
                        .is_some_and(|c| c.list[s.conversation].is_some())
                })
                .collect();
            if rate <= 0.0 || slots.is_empty() {
                continue;
            }
            let schedule = Schedule::new(send_start, measure_end, slots.len(), rate);
            senders.spawn(dispatch(
                ctx.clone(),
                schedule,
                slots,
                body.clone(),
                ctx.scenario.load.max_in_flight,
            ));
        }
        let churning = ctx
            .scenario
            .churn
            .as_ref()
            .map(|_| tokio::spawn(churn(ctx.clone(), measure_end)));
        tokio::time::sleep_until(measure_start).await;
        self.set_phase("measure");
        tokio::time::sleep_until(measure_end).await;
        self.set_phase("settle");
        while let Some(joined) = senders.join_next().await {
            if joined.is_err() {
                ctx.recorder.error("sender_panicked");
            }
        }
        if let Some(churning) = churning {
            let _ = churning.await;
        }
    }

    /// Wait until every expected delivery arrived, at most until `deadline`.
    async fn drain(&self, deadline: Instant) -> bool {
        self.set_phase("drain");
        let connected = self.connected.iter().filter(|&&c| c).count() as i64;
        loop {
            let all_online = self.ctx.recorder.online.load(Ordering::Relaxed) >= connected;
            let caught_up = all_online
                && self
                    .ctx
                    .convs()
                    .is_some_and(|convs| convs.list.iter().flatten().all(Conv::caught_up));
            if caught_up {
                return true;
            }
            if Instant::now() >= deadline {
                tracing::warn!("drain period over with deliveries still missing");
                return false;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    /// Stop every session and check what they hold.
    async fn finish(
        mut self,
        phases: Phases,
        offered_rate: f64,
        generator: Usage,
        server: Option<Usage>,
    ) -> anyhow::Result<RawRun> {
        self.set_phase("close");
        let ctx = self.ctx.clone();
        ctx.stopping.store(true, Ordering::Relaxed);
        for slot in &ctx.sessions {
            let _ = slot.commands.try_send(Command::Stop);
        }
        let mut ends = Vec::new();
        let deadline = Instant::now() + CLOSE_LIMIT;
        while let Ok(Some(joined)) = tokio::time::timeout_at(deadline, self.tasks.join_next()).await
        {
            ends.push(joined.context("a session task panicked")?);
        }
        if !self.tasks.is_empty() {
            tracing::warn!(left = self.tasks.len(), "sessions still closing at exit");
            self.tasks.shutdown().await;
        }
        let end = Instant::now();
        self.probes.stop().await;
        if let Some(log) = &ctx.acklog {
            log.finish()?;
        }

        let mut correctness = Correctness {
            unresolved_sends: ctx.unresolved.load(Ordering::Relaxed),
            ..Correctness::default()
        };
        let convs = ctx.convs();
        for session in &ends {
            correctness.delivered += session.delivered;
            correctness.recovered += session.recovered;
            correctness.duplicates += session.duplicates;
            correctness.reorders += session.reorders;
            correctness.gaps += session.gaps;
            correctness.gaps_resynced += session.gaps_resynced;
            correctness.sync_overlap += session.overlap;
            let mut missing_here = 0;
            for (ci, cursor) in &session.cursors {
                let Some(conv) = convs.and_then(|c| c.list[*ci].as_ref()) else {
                    continue;
                };
                let ledger = conv.ledger();
                correctness.expected += ledger.expected_per_session();
                missing_here += cursor.missing(ledger.max_seq());
                correctness.untracked += cursor.untracked();
            }
            correctness.lost += missing_here;
        }
        // Sessions that were connected but are gone at the end: a failed reconnect.
        correctness.sessions_offline_at_end =
            ends.iter().filter(|s| s.connected && !s.online).count() as u64;
        if let Some(convs) = convs {
            for conv in convs.list.iter().flatten() {
                let ledger = conv.ledger();
                let counts = ledger.counts();
                correctness.unknown += counts.unknown;
                correctness.refused_delivered += counts.refused_delivered;
                correctness.duplicate_messages += counts.duplicate_messages;
                correctness.seq_mismatches += counts.seq_mismatches;
                correctness.accepted_not_delivered += ledger.acked_unsequenced() as u64;
            }
        }

        let (totals, hists, intervals, errors) = ctx.recorder.finish();
        let epoch = ctx.recorder.epoch();
        let secs = |at: Instant| at.saturating_duration_since(epoch).as_secs_f64();
        Ok(RawRun {
            format: RAW_FORMAT,
            scenario: ctx.scenario.clone(),
            agents: vec![ctx.plan.agent_index],
            agent_count: ctx.plan.agent_count,
            epoch_unix_ms: self.epoch_unix_ms,
            phases: Phases {
                end_s: secs(end),
                ..phases
            },
            sessions: ctx.sessions.len() as u64,
            connected: self.connected.iter().filter(|&&c| c).count() as u64,
            conversations: convs.map_or(0, |c| c.list.iter().flatten().count()) as u64,
            offered_rate,
            totals,
            errors,
            correctness,
            histograms: RawHists::of(&hists),
            intervals,
            generator,
            server,
        })
    }

    fn phases(&self, send_start: Instant, measure_start: Instant, measure_end: Instant) -> Phases {
        let epoch = self.ctx.recorder.epoch();
        let secs = |at: Instant| at.saturating_duration_since(epoch).as_secs_f64();
        Phases {
            connect_end_s: secs(self.connect_end),
            send_start_s: secs(send_start),
            measure_start_s: secs(measure_start),
            measure_end_s: secs(measure_end),
            end_s: 0.0,
        }
    }
}

fn usage(report: chat::ProcessReport) -> Usage {
    Usage {
        pid: report.pid,
        cpu_cores: report.cpu_cores,
        rss_kib_start: report.rss_kib_start,
        rss_kib_end: report.rss_kib_end,
    }
}

/// Run a scenario once.
pub async fn run(options: RunOptions, signer: Signer) -> anyhow::Result<RawRun> {
    let load = &options.scenario.load;
    let total = load.warmup + load.duration + load.drain;
    let fleet = set_up(&options, signer, total).await?;
    let ctx = fleet.ctx.clone();
    let traffic = options.scenario.has_traffic();
    let warmup = if traffic { load.warmup } else { Duration::ZERO };

    let (measure_start, measure_end) = fleet.window(warmup, load.duration);
    let usage_probe = tokio::spawn(chat::measure_usage(
        measure_start,
        measure_end,
        options.server_pid,
    ));
    fleet.send(1.0, warmup, (measure_start, measure_end)).await;
    let caught_up = fleet.drain(measure_end + load.drain).await;
    if !caught_up {
        ctx.recorder.error("drain_incomplete");
    }
    let (generator, server) = usage_probe.await.context("the usage probe panicked")?;
    let phases = fleet.phases(measure_start - warmup, measure_start, measure_end);
    let offered = ctx.plan.rate();
    fleet
        .finish(phases, offered, usage(generator), server.map(usage))
        .await
}

/// Step the rate up until e2e p99 passes the target; returns the whole run and
/// the steps.
pub async fn max_throughput(
    options: RunOptions,
    signer: Signer,
    steps: Steps,
) -> anyhow::Result<(RawRun, Vec<StepResult>)> {
    let base = options.scenario.load.rate;
    anyhow::ensure!(
        options.scenario.has_traffic() && base > 0.0,
        "max-throughput needs a scenario with conversations and a positive load.rate"
    );
    let load = options.scenario.load.clone();
    let count = ((steps.max - steps.start) / steps.step).floor() as usize + 1;
    let total = (load.warmup + steps.step_duration + load.drain) * count as u32;
    let fleet = set_up(&options, signer, total).await?;
    let ctx = fleet.ctx.clone();
    let agent_share = ctx.plan.rate() / base;
    let mut results = Vec::new();
    let mut first: Option<(Instant, Instant)> = None;
    let mut last_end = Instant::now();
    for n in 0..count {
        let rate = steps.start + steps.step * n as f64;
        tracing::info!(rate, "step");
        ctx.recorder.take_step();
        let (start, end) = fleet.window(load.warmup, steps.step_duration);
        fleet.send(rate / base, load.warmup, (start, end)).await;
        first.get_or_insert((start, end));
        last_end = end;
        let caught_up = fleet.drain(end + load.drain).await;
        let (counters, hists) = ctx.recorder.take_step();
        let seconds = steps.step_duration.as_secs_f64();
        let e2e = LatencySummary::of(&hists.e2e);
        let mut reasons = Vec::new();
        if e2e.count == 0 {
            reasons.push("no delivery measured".to_owned());
        } else if e2e.p99_ms > steps.target_p99_ms {
            reasons.push(format!(
                "e2e p99 {:.1} ms above {} ms",
                e2e.p99_ms, steps.target_p99_ms
            ));
        }
        if counters.skipped > 0 {
            reasons.push(format!("{} due sends skipped", counters.skipped));
        }
        if counters.unresolved > 0 {
            reasons.push(format!("{} sends without an ack", counters.unresolved));
        }
        if !caught_up {
            reasons.push("deliveries still missing after the drain".into());
        }
        let passed = reasons.is_empty();
        results.push(StepResult {
            rate: rate * agent_share,
            accepted_per_s: hists.ack.len() as f64 / seconds,
            delivered_per_s: (hists.e2e.len() + hists.echo.len()) as f64 / seconds,
            e2e,
            ack: LatencySummary::of(&hists.ack),
            skipped: counters.skipped,
            unresolved: counters.unresolved,
            errors: counters.errors,
            caught_up,
            passed,
            reason: (!passed).then(|| reasons.join("; ")),
        });
        if !passed {
            break;
        }
    }
    // Every step was measured: the whole run's histograms cover them all.
    let (measure_start, _) = first.unwrap_or((Instant::now(), Instant::now()));
    let phases = fleet.phases(measure_start - load.warmup, measure_start, last_end);
    let offered = results.last().map_or(0.0, |s| s.rate);
    let generator = Usage {
        pid: std::process::id(),
        ..Usage::default()
    };
    let raw = fleet.finish(phases, offered, generator, None).await?;
    Ok((raw, results))
}

/// The last passing rate of a series of steps.
pub fn knee(steps: &[StepResult]) -> Option<f64> {
    steps.iter().take_while(|s| s.passed).last().map(|s| s.rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_round_trip() {
        let id = MsgId {
            msg: 42,
            session: 7,
            due_us: 1_234_567,
        };
        let text = format!("slabc-{}-{}-{}", id.msg, id.session, id.due_us);
        assert_eq!(parse_msg_id("slabc", &text), Some(id));
        assert_eq!(parse_msg_id("slxyz", &text), None);
        assert_eq!(parse_msg_id("slabc", "slabc-1-2"), None);
        assert_eq!(parse_msg_id("slabc", "5f0c2b"), None);
        assert!(!run_id(3).contains('-'));
    }

    #[test]
    fn the_knee_is_the_last_passing_step() {
        let step = |rate: f64, passed: bool| StepResult {
            rate,
            accepted_per_s: rate,
            delivered_per_s: rate,
            e2e: LatencySummary::default(),
            ack: LatencySummary::default(),
            skipped: 0,
            unresolved: 0,
            errors: 0,
            caught_up: passed,
            passed,
            reason: None,
        };
        assert_eq!(
            knee(&[step(100.0, true), step(200.0, true), step(300.0, false)]),
            Some(200.0)
        );
        assert_eq!(knee(&[step(100.0, false)]), None);
    }
}
