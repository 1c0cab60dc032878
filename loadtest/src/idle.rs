//! The `idle` scenario: many connections that only keep alive (WebSocket pings),
//! held for a while, to measure connect latency and the server's memory per
//! connection.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use switchboard_auth::Signer;
use switchboard_client::{Client, Events};
use tokio::time::Instant;

use crate::connect::{self, ConnectSettings};
use crate::stats::LatencySummary;
use crate::system;

/// How often memory is sampled and stray events are discarded while holding.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Wait after closing before the last memory sample.
const AFTER_CLOSE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct IdleSettings {
    pub connect: ConnectSettings,
    pub clients: usize,
    /// How long the connections are held open after the last connect.
    pub hold: Duration,
    /// The server's process id, to report its memory per connection.
    pub server_pid: Option<u32>,
}

/// Resident memory of one process around the hold.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MemoryReport {
    pub pid: u32,
    /// Before the first connect.
    pub rss_kib_before: Option<u64>,
    /// At the end of the hold, every connection still open.
    pub rss_kib_held: Option<u64>,
    /// Highest sample during the hold.
    pub rss_kib_peak: Option<u64>,
    /// A moment after every connection was closed.
    pub rss_kib_after_close: Option<u64>,
    /// `(held - before) / connections`.
    pub kib_per_connection: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub scenario: &'static str,
    pub url: String,
    pub clients: usize,
    pub connected: usize,
    /// Connections still open at the end of the hold.
    pub alive_at_end: usize,
    pub hold_s: f64,
    pub connect_latency: LatencySummary,
    pub connect_failures: BTreeMap<String, u64>,
    pub connect_elapsed_s: f64,
    /// Generator CPU while connecting, in cores.
    pub generator_connect_cpu_cores: f64,
    pub generator: MemoryReport,
    pub server: Option<MemoryReport>,
}

/// Memory samples of one process.
struct Sampler {
    pid: u32,
    /// What `/proc` calls it: `self` for this process.
    proc_name: String,
    before: Option<u64>,
    peak: Option<u64>,
    last: Option<u64>,
}

impl Sampler {
    fn new(pid: u32, proc_name: String) -> Sampler {
        let before = system::rss_kib(&proc_name);
        Sampler {
            pid,
            proc_name,
            before,
            peak: None,
            last: None,
        }
    }

    fn sample(&mut self) {
        self.last = system::rss_kib(&self.proc_name);
        self.peak = self.peak.max(self.last);
    }

    fn report(&self, connections: usize) -> MemoryReport {
        let kib_per_connection = match (self.before, self.last, connections) {
            (Some(before), Some(held), n) if n > 0 => {
                Some((held as f64 - before as f64) / n as f64)
            }
            _ => None,
        };
        MemoryReport {
            pid: self.pid,
            rss_kib_before: self.before,
            rss_kib_held: self.last,
            rss_kib_peak: self.peak,
            rss_kib_after_close: None,
            kib_per_connection,
        }
    }
}

pub async fn run(settings: IdleSettings, signer: Signer) -> anyhow::Result<IdleReport> {
    anyhow::ensure!(settings.clients > 0, "--clients must be positive");
    let mut server = settings
        .server_pid
        .map(|pid| Sampler::new(pid, pid.to_string()));
    let mut generator = Sampler::new(std::process::id(), "self".into());

    tracing::info!(clients = settings.clients, "connecting");
    let cpu_before = system::cpu_time();
    let fleet = connect::connect_all(&settings.connect, &signer, settings.clients).await?;
    let generator_connect_cpu_cores =
        system::cores_used(system::cpu_time().saturating_sub(cpu_before), fleet.elapsed);
    let connected = fleet.connected();
    tracing::info!(connected, hold_s = settings.hold.as_secs_f64(), "holding");
    let (clients, mut events): (Vec<Client>, Vec<Events>) =
        fleet.clients.into_iter().flatten().unzip();

    let hold_end = Instant::now() + settings.hold;
    loop {
        // Nothing is expected; anything that arrives is dropped so that no
        // connection stops reading because its small event queue is full.
        for events in &mut events {
            while events.try_recv().is_some() {}
        }
        if let Some(server) = &mut server {
            server.sample();
        }
        generator.sample();
        let now = Instant::now();
        if now >= hold_end {
            break;
        }
        tokio::time::sleep_until(hold_end.min(now + SAMPLE_EVERY)).await;
    }
    let alive_at_end = clients.iter().filter(|c| !c.is_closed()).count();
    let server_report = server.as_ref().map(|s| s.report(alive_at_end));
    let generator_report = generator.report(alive_at_end);

    tracing::info!("closing");
    let not_closed = connect::close_all(clients, Duration::from_secs(30)).await;
    if not_closed > 0 {
        tracing::warn!(not_closed, "connections still closing at exit");
    }
    drop(events);
    tokio::time::sleep(AFTER_CLOSE).await;
    let server_report = server_report.map(|mut report| {
        report.rss_kib_after_close = system::rss_kib(&report.pid.to_string());
        report
    });

    Ok(IdleReport {
        scenario: "idle",
        url: settings.connect.url.clone(),
        clients: settings.clients,
        connected,
        alive_at_end,
        hold_s: settings.hold.as_secs_f64(),
        connect_latency: LatencySummary::of(&fleet.connect_latency),
        connect_failures: fleet.failures,
        connect_elapsed_s: fleet.elapsed.as_secs_f64(),
        generator_connect_cpu_cores,
        generator: generator_report,
        server: server_report,
    })
}

fn memory_line(out: &mut String, name: &str, m: &MemoryReport) {
    let kib = |v: Option<u64>| v.map_or("?".to_owned(), |v| v.to_string());
    let _ = writeln!(
        out,
        "  {name} (pid {}): rss before {} KiB, held {} KiB (peak {}), after close {} KiB; per connection {}",
        m.pid,
        kib(m.rss_kib_before),
        kib(m.rss_kib_held),
        kib(m.rss_kib_peak),
        kib(m.rss_kib_after_close),
        m.kib_per_connection
            .map_or("?".to_owned(), |v| format!("{v:.2} KiB")),
    );
}

/// The human-readable summary.
pub fn render(r: &IdleReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "idle  {}  clients={}  connected={}  alive at end of {}s hold={}",
        r.url, r.clients, r.connected, r.hold_s, r.alive_at_end
    );
    let _ = writeln!(
        out,
        "  connect: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({:.1} s in all, generator {:.2} cores)  failures {:?}",
        r.connect_latency.p50_ms,
        r.connect_latency.p90_ms,
        r.connect_latency.p99_ms,
        r.connect_latency.max_ms,
        r.connect_elapsed_s,
        r.generator_connect_cpu_cores,
        r.connect_failures
    );
    if let Some(server) = &r.server {
        memory_line(&mut out, "server", server);
    }
    memory_line(&mut out, "generator", &r.generator);
    out
}
