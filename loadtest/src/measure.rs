//! Measurements of a scenario run: HDR histograms overall and per interval, counters
//! per interval, the generator's event-loop lag and CPU, the live progress line,
//! and the raw form an agent writes (histograms serialized as HdrHistogram V2,
//! base64) that `merge` adds up.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::ledger::Correctness;
use crate::scenario::Scenario;
use crate::stats::{self, LatencySummary};
use crate::system;

/// Length of one interval of the time series.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Period of the event-loop lag probe.
pub const LAG_PROBE: Duration = Duration::from_millis(10);

/// Highest value the per-interval histograms tell apart: one minute, in us.
const INTERVAL_MAX_MICROS: u64 = 60_000_000;

/// Version of the raw file format.
pub const RAW_FORMAT: u32 = 1;

/// A per-interval histogram: 2 significant digits, up to a minute (more saturates).
pub fn interval_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, INTERVAL_MAX_MICROS, 2).expect("valid fixed histogram bounds")
}

/// Serialize a histogram as base64 of its HdrHistogram V2 encoding.
pub fn encode(histogram: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(histogram, &mut bytes)
        .expect("serializing a histogram into memory cannot fail");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The inverse of [`encode`].
pub fn decode(text: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .context("histogram is not base64")?;
    Deserializer::new()
        .deserialize(&mut std::io::Cursor::new(bytes))
        .map_err(|e| anyhow::anyhow!("histogram is not HdrHistogram V2: {e:?}"))
}

/// Add `other` (encoded) into `into` (encoded).
fn add_encoded(into: &mut String, other: &str) -> anyhow::Result<()> {
    let mut sum = decode(into)?;
    sum.add(decode(other)?)
        .map_err(|e| anyhow::anyhow!("adding histograms: {e:?}"))?;
    *into = encode(&sum);
    Ok(())
}

/// Event counts, per interval and in total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub connects: u64,
    pub connect_failures: u64,
    pub reconnects: u64,
    /// Due sends (the open-loop schedule).
    pub scheduled: u64,
    pub sent: u64,
    /// Due sends not made: the session had `max_in_flight` sends waiting.
    pub skipped: u64,
    /// Due sends not made: the session was disconnected (churn).
    pub skipped_offline: u64,
    pub accepted: u64,
    pub refused: u64,
    pub unresolved: u64,
    /// First receipts on a live connection.
    pub delivered: u64,
    /// First receipts through sync or history after a reconnect.
    pub recovered: u64,
    pub errors: u64,
    /// Read markers sent (and acked) for a share of the deliveries
    /// (`load.read_fraction`). Ephemeral traffic: never part of the delivery check.
    #[serde(default)]
    pub reads_acked: u64,
    /// `receipt` events received (other sessions' read markers).
    #[serde(default)]
    pub receipts_received: u64,
    /// `typing` requests sent (and acked) before a share of the sends
    /// (`load.typing_fraction`).
    #[serde(default)]
    pub typing_acked: u64,
    /// `typing` events received.
    #[serde(default)]
    pub typing_received: u64,
    /// `resync` events received (the server's fan-out may have missed the session;
    /// it synced).
    #[serde(default)]
    pub resyncs: u64,
    /// Sends made again with the same `client_msg_id` after an unknown outcome
    /// (`load.retry_for`).
    #[serde(default)]
    pub retries: u64,
}

/// Which counter an event bumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Connect,
    ConnectFailure,
    Reconnect,
    Scheduled,
    Sent,
    Skipped,
    SkippedOffline,
    Accepted,
    Refused,
    Unresolved,
    Delivered,
    Recovered,
    Error,
    ReadAcked,
    ReceiptReceived,
    TypingAcked,
    TypingReceived,
    Resync,
    Retry,
}

impl Counters {
    fn slot(&mut self, which: Count) -> &mut u64 {
        match which {
            Count::Connect => &mut self.connects,
            Count::ConnectFailure => &mut self.connect_failures,
            Count::Reconnect => &mut self.reconnects,
            Count::Scheduled => &mut self.scheduled,
            Count::Sent => &mut self.sent,
            Count::Skipped => &mut self.skipped,
            Count::SkippedOffline => &mut self.skipped_offline,
            Count::Accepted => &mut self.accepted,
            Count::Refused => &mut self.refused,
            Count::Unresolved => &mut self.unresolved,
            Count::Delivered => &mut self.delivered,
            Count::Recovered => &mut self.recovered,
            Count::Error => &mut self.errors,
            Count::ReadAcked => &mut self.reads_acked,
            Count::ReceiptReceived => &mut self.receipts_received,
            Count::TypingAcked => &mut self.typing_acked,
            Count::TypingReceived => &mut self.typing_received,
            Count::Resync => &mut self.resyncs,
            Count::Retry => &mut self.retries,
        }
    }

    pub fn add(&mut self, o: &Counters) {
        self.connects += o.connects;
        self.connect_failures += o.connect_failures;
        self.reconnects += o.reconnects;
        self.scheduled += o.scheduled;
        self.sent += o.sent;
        self.skipped += o.skipped;
        self.skipped_offline += o.skipped_offline;
        self.accepted += o.accepted;
        self.refused += o.refused;
        self.unresolved += o.unresolved;
        self.delivered += o.delivered;
        self.recovered += o.recovered;
        self.errors += o.errors;
        self.reads_acked += o.reads_acked;
        self.receipts_received += o.receipts_received;
        self.typing_acked += o.typing_acked;
        self.typing_received += o.typing_received;
        self.resyncs += o.resyncs;
        self.retries += o.retries;
    }
}

/// Which latency a sample is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lat {
    /// Intended send time to receipt by another session of the conversation.
    E2e,
    /// Intended send time to receipt by the sending session itself.
    Echo,
    /// Intended send time to the accepted ack.
    Ack,
    /// Start of the TCP connect to the server's `welcome`.
    Connect,
    /// How late the lag probe woke up.
    Lag,
}

/// The overall histograms (3 significant digits, up to an hour).
#[derive(Debug, Clone)]
pub struct Hists {
    pub e2e: Histogram<u64>,
    pub echo: Histogram<u64>,
    pub ack: Histogram<u64>,
    pub connect: Histogram<u64>,
    pub lag: Histogram<u64>,
}

impl Default for Hists {
    fn default() -> Self {
        Hists {
            e2e: stats::histogram(),
            echo: stats::histogram(),
            ack: stats::histogram(),
            connect: stats::histogram(),
            lag: stats::histogram(),
        }
    }
}

impl Hists {
    fn get(&mut self, which: Lat) -> &mut Histogram<u64> {
        match which {
            Lat::E2e => &mut self.e2e,
            Lat::Echo => &mut self.echo,
            Lat::Ack => &mut self.ack,
            Lat::Connect => &mut self.connect,
            Lat::Lag => &mut self.lag,
        }
    }
}

/// The interval being recorded.
struct LiveInterval {
    counters: Counters,
    e2e: Histogram<u64>,
    ack: Histogram<u64>,
    lag: Histogram<u64>,
}

impl LiveInterval {
    fn new() -> LiveInterval {
        LiveInterval {
            counters: Counters::default(),
            e2e: interval_histogram(),
            ack: interval_histogram(),
            lag: interval_histogram(),
        }
    }
}

/// One finished interval as written to the raw file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RawInterval {
    pub counters: Counters,
    /// Sessions connected at the end of the interval.
    pub online: u64,
    /// Generator CPU during the interval, in cores.
    pub cpu_cores: f64,
    pub e2e: String,
    pub ack: String,
    pub lag: String,
}

struct State {
    total: Counters,
    /// Reset by [`Recorder::take_step`] (one step of `max-throughput`).
    step: Counters,
    hists: Hists,
    step_hists: Hists,
    finished: Vec<RawInterval>,
    /// What the progress line shows of each finished interval.
    progress: Vec<Progress>,
    /// Finished intervals already handed to the progress line.
    reported: usize,
    live: LiveInterval,
    /// Index of `live`.
    live_index: usize,
    errors: BTreeMap<String, u64>,
}

/// Everything measured during a run. One lock: a record takes well under a
/// microsecond and a run makes at most some hundred thousand per second.
pub struct Recorder {
    epoch: Instant,
    state: Mutex<State>,
    /// Sessions connected right now.
    pub online: AtomicI64,
}

/// What the progress line shows of one finished interval.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub index: usize,
    pub counters: Counters,
    pub e2e_p99_ms: f64,
    pub lag_max_ms: f64,
    pub online: u64,
    pub cpu_cores: f64,
}

impl Recorder {
    pub fn new(epoch: Instant) -> Recorder {
        Recorder {
            epoch,
            state: Mutex::new(State {
                total: Counters::default(),
                step: Counters::default(),
                hists: Hists::default(),
                step_hists: Hists::default(),
                finished: Vec::new(),
                progress: Vec::new(),
                reported: 0,
                live: LiveInterval::new(),
                live_index: 0,
                errors: BTreeMap::new(),
            }),
            online: AtomicI64::new(0),
        }
    }

    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state with its live interval moved up to now.
    fn current(&self) -> MutexGuard<'_, State> {
        let index = (Instant::now()
            .saturating_duration_since(self.epoch)
            .as_nanos()
            / INTERVAL.as_nanos()) as usize;
        let mut state = self.state();
        while state.live_index < index {
            let online = self.online.load(Ordering::Relaxed).max(0) as u64;
            finish(&mut state, online, 0.0);
        }
        state
    }

    pub fn count(&self, which: Count) {
        self.count_n(which, 1);
    }

    pub fn count_n(&self, which: Count, n: u64) {
        let mut state = self.current();
        *state.total.slot(which) += n;
        *state.step.slot(which) += n;
        *state.live.counters.slot(which) += n;
    }

    /// Count an error under its label.
    pub fn error(&self, label: impl Into<String>) {
        let mut state = self.current();
        *state.errors.entry(label.into()).or_default() += 1;
        state.total.errors += 1;
        state.step.errors += 1;
        state.live.counters.errors += 1;
    }

    pub fn latency(&self, which: Lat, latency: Duration) {
        let mut state = self.current();
        stats::record(state.hists.get(which), latency);
        stats::record(state.step_hists.get(which), latency);
        let live = match which {
            Lat::E2e => Some(&mut state.live.e2e),
            Lat::Ack => Some(&mut state.live.ack),
            Lat::Lag => Some(&mut state.live.lag),
            Lat::Echo | Lat::Connect => None,
        };
        if let Some(histogram) = live {
            stats::record(histogram, latency);
        }
    }

    /// Close intervals up to now and give the last closed one `cpu_cores` (the
    /// generator's CPU since the previous tick). Returns the intervals finished
    /// since the previous tick, for the progress line.
    pub fn tick(&self, cpu_cores: f64) -> Vec<Progress> {
        let mut state = self.current();
        if let Some(last) = state.finished.last_mut() {
            last.cpu_cores = cpu_cores;
        }
        if let Some(last) = state.progress.last_mut() {
            last.cpu_cores = cpu_cores;
        }
        let new = state.progress[state.reported..].to_vec();
        state.reported = state.progress.len();
        new
    }

    pub fn totals(&self) -> Counters {
        self.state().total
    }

    /// The counters and histograms of the step so far, and a fresh step.
    pub fn take_step(&self) -> (Counters, Hists) {
        let mut state = self.state();
        let counters = std::mem::take(&mut state.step);
        let hists = std::mem::take(&mut state.step_hists);
        (counters, hists)
    }

    /// Everything recorded (closing the live interval).
    pub fn finish(&self) -> (Counters, Hists, Vec<RawInterval>, BTreeMap<String, u64>) {
        let mut state = self.current();
        let online = self.online.load(Ordering::Relaxed).max(0) as u64;
        finish(&mut state, online, 0.0);
        (
            state.total,
            state.hists.clone(),
            state.finished.clone(),
            state.errors.clone(),
        )
    }
}

fn finish(state: &mut State, online: u64, cpu_cores: f64) -> Progress {
    let live = std::mem::replace(&mut state.live, LiveInterval::new());
    let progress = Progress {
        index: state.live_index,
        counters: live.counters,
        e2e_p99_ms: LatencySummary::of(&live.e2e).p99_ms,
        lag_max_ms: live.lag.max() as f64 / 1_000.0,
        online,
        cpu_cores,
    };
    state.finished.push(RawInterval {
        counters: live.counters,
        online,
        cpu_cores,
        e2e: encode(&live.e2e),
        ack: encode(&live.ack),
        lag: encode(&live.lag),
    });
    state.live_index += 1;
    state.progress.push(progress);
    progress
}

/// The generator's background probes: the lag probe (a 10 ms sleep whose lateness
/// is recorded) and the once-a-second ticker that closes intervals, samples CPU
/// and prints the progress line.
pub struct Probes {
    /// Set to end both tasks (each checks it at least every second).
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What the progress line says about the phase.
pub type PhaseName = Arc<Mutex<&'static str>>;

impl Probes {
    pub fn start(recorder: Arc<Recorder>, phase: PhaseName, progress: bool) -> Probes {
        let stop = Arc::new(AtomicBool::new(false));
        let lag = {
            let recorder = recorder.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let target = Instant::now() + LAG_PROBE;
                    tokio::time::sleep_until(target).await;
                    recorder.latency(Lat::Lag, Instant::now().saturating_duration_since(target));
                }
            })
        };
        let ticker = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut next = recorder.epoch() + INTERVAL;
                let mut cpu = system::cpu_time();
                let mut at = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep_until(next).await;
                    next += INTERVAL;
                    let now_cpu = system::cpu_time();
                    let now = Instant::now();
                    let cores = system::cores_used(now_cpu.saturating_sub(cpu), now - at);
                    (cpu, at) = (now_cpu, now);
                    let finished = recorder.tick(cores);
                    if progress {
                        let name = *phase.lock().unwrap_or_else(|e| e.into_inner());
                        for p in &finished {
                            progress_line(p, name);
                        }
                    }
                }
            })
        };
        Probes {
            stop,
            tasks: vec![lag, ticker],
        }
    }

    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

fn progress_line(p: &Progress, phase: &str) {
    let c = &p.counters;
    let line = format!(
        "[{:>4}s] {:<8} online {:>6}  conn +{} (fail {})  sent {:>6}/s  acked {:>6}/s  delivered {:>7}/s  recovered {:>5}  e2e p99 {:>8.1} ms  errors {}  skipped {}  lag max {:.1} ms  cpu {:.2}\n",
        p.index + 1,
        phase,
        p.online,
        c.connects,
        c.connect_failures,
        c.sent,
        c.accepted,
        c.delivered,
        c.recovered,
        p.e2e_p99_ms,
        c.errors,
        c.skipped + c.skipped_offline,
        p.lag_max_ms,
        p.cpu_cores
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Seconds from the run's epoch at which its phases began.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Phases {
    pub connect_end_s: f64,
    pub send_start_s: f64,
    pub measure_start_s: f64,
    pub measure_end_s: f64,
    pub end_s: f64,
}

/// CPU and memory of a process over the measured window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub pid: u32,
    /// Average cores busy during the measured window.
    pub cpu_cores: f64,
    pub rss_kib_start: Option<u64>,
    pub rss_kib_end: Option<u64>,
}

/// The overall histograms of a raw file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RawHists {
    pub e2e: String,
    pub echo: String,
    pub ack: String,
    pub connect: String,
    pub lag: String,
}

impl RawHists {
    pub fn of(h: &Hists) -> RawHists {
        RawHists {
            e2e: encode(&h.e2e),
            echo: encode(&h.echo),
            ack: encode(&h.ack),
            connect: encode(&h.connect),
            lag: encode(&h.lag),
        }
    }

    pub fn decode(&self) -> anyhow::Result<Hists> {
        Ok(Hists {
            e2e: decode(&self.e2e)?,
            echo: decode(&self.echo)?,
            ack: decode(&self.ack)?,
            connect: decode(&self.connect)?,
            lag: decode(&self.lag)?,
        })
    }
}

/// What one agent measured, complete enough to be merged with other agents' and
/// turned into a report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RawRun {
    pub format: u32,
    pub scenario: Scenario,
    /// The agents this holds (one for an agent's own file, several once merged).
    pub agents: Vec<usize>,
    pub agent_count: usize,
    /// Wall clock of the epoch, milliseconds since the Unix epoch.
    pub epoch_unix_ms: u64,
    pub phases: Phases,
    pub sessions: u64,
    pub connected: u64,
    pub conversations: u64,
    /// Messages per second offered.
    pub offered_rate: f64,
    pub totals: Counters,
    pub errors: BTreeMap<String, u64>,
    pub correctness: Correctness,
    pub histograms: RawHists,
    pub intervals: Vec<RawInterval>,
    pub generator: Usage,
    pub server: Option<Usage>,
}

impl RawRun {
    /// The file an agent writes into its report directory.
    pub fn file_name(agent: usize) -> String {
        format!("raw-agent-{agent}.json")
    }

    /// Add another agent's run (its intervals aligned by wall clock).
    pub fn merge(&mut self, other: &RawRun) -> anyhow::Result<()> {
        anyhow::ensure!(
            other.format == self.format,
            "raw files of different formats ({} and {})",
            self.format,
            other.format
        );
        anyhow::ensure!(
            other.scenario.name == self.scenario.name,
            "raw files of different scenarios (`{}` and `{}`)",
            self.scenario.name,
            other.scenario.name
        );
        for agent in &other.agents {
            anyhow::ensure!(
                !self.agents.contains(agent),
                "agent {agent} appears twice among the raw files"
            );
        }
        // Shift both onto the earlier epoch, in whole intervals.
        let interval_ms = INTERVAL.as_millis() as i64;
        let delta = other.epoch_unix_ms as i64 - self.epoch_unix_ms as i64;
        let steps = (delta as f64 / interval_ms as f64).round() as i64;
        let (mine, theirs) = if steps >= 0 {
            (0usize, steps as usize)
        } else {
            ((-steps) as usize, 0usize)
        };
        if mine > 0 {
            let pad = (0..mine).map(|_| empty_interval());
            self.intervals.splice(0..0, pad);
            self.epoch_unix_ms = other.epoch_unix_ms;
            self.phases = shift(self.phases, mine as f64);
        }
        let their_phases = shift(other.phases, theirs as f64);
        self.phases = Phases {
            connect_end_s: self.phases.connect_end_s.max(their_phases.connect_end_s),
            send_start_s: self.phases.send_start_s.min(their_phases.send_start_s),
            measure_start_s: self
                .phases
                .measure_start_s
                .min(their_phases.measure_start_s),
            measure_end_s: self.phases.measure_end_s.max(their_phases.measure_end_s),
            end_s: self.phases.end_s.max(their_phases.end_s),
        };
        for (i, interval) in other.intervals.iter().enumerate() {
            let at = i + theirs;
            while self.intervals.len() <= at {
                self.intervals.push(empty_interval());
            }
            let into = &mut self.intervals[at];
            into.counters.add(&interval.counters);
            into.online += interval.online;
            into.cpu_cores += interval.cpu_cores;
            add_encoded(&mut into.e2e, &interval.e2e)?;
            add_encoded(&mut into.ack, &interval.ack)?;
            add_encoded(&mut into.lag, &interval.lag)?;
        }
        self.agents.extend(other.agents.iter().copied());
        self.agents.sort_unstable();
        self.agent_count = self.agent_count.max(other.agent_count);
        self.sessions += other.sessions;
        self.connected += other.connected;
        self.conversations += other.conversations;
        self.offered_rate += other.offered_rate;
        self.totals.add(&other.totals);
        for (label, n) in &other.errors {
            *self.errors.entry(label.clone()).or_default() += n;
        }
        self.correctness.add(&other.correctness);
        add_encoded(&mut self.histograms.e2e, &other.histograms.e2e)?;
        add_encoded(&mut self.histograms.echo, &other.histograms.echo)?;
        add_encoded(&mut self.histograms.ack, &other.histograms.ack)?;
        add_encoded(&mut self.histograms.connect, &other.histograms.connect)?;
        add_encoded(&mut self.histograms.lag, &other.histograms.lag)?;
        self.generator.cpu_cores += other.generator.cpu_cores;
        self.generator.rss_kib_end =
            add_opt(self.generator.rss_kib_end, other.generator.rss_kib_end);
        self.generator.rss_kib_start =
            add_opt(self.generator.rss_kib_start, other.generator.rss_kib_start);
        if self.server.is_none() {
            self.server = other.server;
        }
        Ok(())
    }
}

fn add_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

fn shift(p: Phases, by: f64) -> Phases {
    Phases {
        connect_end_s: p.connect_end_s + by,
        send_start_s: p.send_start_s + by,
        measure_start_s: p.measure_start_s + by,
        measure_end_s: p.measure_end_s + by,
        end_s: p.end_s + by,
    }
}

fn empty_interval() -> RawInterval {
    let empty = encode(&interval_histogram());
    RawInterval {
        counters: Counters::default(),
        online: 0,
        cpu_cores: 0.0,
        e2e: empty.clone(),
        ack: empty.clone(),
        lag: empty,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_v2_base64() {
        let mut h = stats::histogram();
        for ms in 1..=1000u64 {
            stats::record(&mut h, Duration::from_micros(ms * 997));
        }
        let back = decode(&encode(&h)).expect("decodes");
        assert_eq!(back.len(), h.len());
        assert_eq!(back.value_at_quantile(0.99), h.value_at_quantile(0.99));
        assert_eq!(back.max(), h.max());
        assert!(decode("not base64!").is_err());
        assert!(decode("AAAA").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn counts_and_latencies_land_in_their_interval() {
        let recorder = Recorder::new(Instant::now());
        recorder.count(Count::Sent);
        recorder.latency(Lat::E2e, Duration::from_millis(5));
        tokio::time::advance(Duration::from_millis(2_500)).await;
        recorder.count_n(Count::Delivered, 3);
        recorder.error("timeout");
        let (total, hists, intervals, errors) = recorder.finish();
        assert_eq!(intervals.len(), 3);
        assert_eq!(intervals[0].counters.sent, 1);
        assert_eq!(intervals[1].counters, Counters::default());
        assert_eq!(intervals[2].counters.delivered, 3);
        assert_eq!(intervals[2].counters.errors, 1);
        assert_eq!(decode(&intervals[0].e2e).expect("decodes").len(), 1);
        assert_eq!(total.sent, 1);
        assert_eq!(total.errors, 1);
        assert_eq!(hists.e2e.len(), 1);
        assert_eq!(errors.get("timeout"), Some(&1));
    }

    #[tokio::test(start_paused = true)]
    async fn every_finished_interval_reaches_the_progress_line_once() {
        let recorder = Recorder::new(Instant::now());
        recorder.count(Count::Sent);
        tokio::time::advance(Duration::from_millis(1_500)).await;
        // A record closes interval 0 before the ticker runs.
        recorder.count(Count::Sent);
        tokio::time::advance(Duration::from_millis(1_000)).await;
        let progress = recorder.tick(0.5);
        let indices: Vec<usize> = progress.iter().map(|p| p.index).collect();
        assert_eq!(indices, [0, 1]);
        assert_eq!(progress[1].counters.sent, 1);
        assert_eq!(progress[1].cpu_cores, 0.5);
        assert!(recorder.tick(0.1).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_is_taken_and_reset() {
        let recorder = Recorder::new(Instant::now());
        recorder.count(Count::Accepted);
        recorder.latency(Lat::Ack, Duration::from_millis(1));
        let (counters, hists) = recorder.take_step();
        assert_eq!((counters.accepted, hists.ack.len()), (1, 1));
        let (counters, hists) = recorder.take_step();
        assert_eq!((counters.accepted, hists.ack.len()), (0, 0));
        assert_eq!(recorder.totals().accepted, 1);
    }

    fn raw(agent: usize, epoch_unix_ms: u64, sent: &[u64]) -> RawRun {
        let scenario = Scenario::parse("name = \"m\"\n[users]\ncount = 2\n").expect("valid");
        let mut h = stats::histogram();
        stats::record(&mut h, Duration::from_millis(10 * (agent as u64 + 1)));
        let hists = RawHists::of(&Hists {
            e2e: h,
            ..Hists::default()
        });
        RawRun {
            format: RAW_FORMAT,
            scenario,
            agents: vec![agent],
            agent_count: 2,
            epoch_unix_ms,
            phases: Phases {
                connect_end_s: 1.0,
                send_start_s: 1.0,
                measure_start_s: 2.0,
                measure_end_s: 3.0,
                end_s: 4.0,
            },
            sessions: 2,
            connected: 2,
            conversations: 1,
            offered_rate: 10.0,
            totals: Counters {
                sent: sent.iter().sum(),
                ..Counters::default()
            },
            errors: BTreeMap::from([("timeout".to_owned(), 1)]),
            correctness: Correctness {
                expected: 4,
                delivered: 4,
                ..Correctness::default()
            },
            histograms: hists,
            intervals: sent
                .iter()
                .map(|&n| RawInterval {
                    counters: Counters {
                        sent: n,
                        ..Counters::default()
                    },
                    ..empty_interval()
                })
                .collect(),
            generator: Usage::default(),
            server: None,
        }
    }

    #[test]
    fn merging_adds_counts_and_histograms_aligned_by_wall_clock() {
        let mut a = raw(0, 10_000, &[1, 2, 3]);
        // Agent 1 started a second later.
        let b = raw(1, 11_000, &[10, 20, 30]);
        a.merge(&b).expect("merges");
        let sent: Vec<u64> = a.intervals.iter().map(|i| i.counters.sent).collect();
        assert_eq!(sent, [1, 12, 23, 30]);
        assert_eq!(a.totals.sent, 66);
        assert_eq!(a.agents, [0, 1]);
        assert_eq!(a.errors.get("timeout"), Some(&2));
        assert_eq!(a.correctness.expected, 8);
        assert_eq!(decode(&a.histograms.e2e).expect("decodes").len(), 2);
        assert_eq!(a.phases.measure_start_s, 2.0);
        assert_eq!(a.phases.end_s, 5.0);
        // The same agent twice is refused.
        assert!(a.merge(&raw(1, 11_000, &[1])).is_err());
        // An earlier agent moves the epoch.
        let mut c = raw(0, 12_000, &[5]);
        c.merge(&raw(1, 10_000, &[7, 7])).expect("merges");
        let sent: Vec<u64> = c.intervals.iter().map(|i| i.counters.sent).collect();
        assert_eq!(sent, [7, 7, 5]);
        assert_eq!(c.epoch_unix_ms, 10_000);
    }
}
