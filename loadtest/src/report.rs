//! Reports of scenario runs: built from a [`RawRun`] (one agent's, or several
//! merged), judged against the scenario's thresholds, and written as a terminal
//! summary, JSON, Markdown and SVG plots.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::ledger::Correctness;
use crate::measure::{self, Counters, Phases, RawRun, Usage, INTERVAL};
use crate::runner::StepResult;
use crate::stats::LatencySummary;
use crate::svg::{Chart, Series, XAxis};

/// Deepest point of the percentile curve, in nines (99.999 %).
const MAX_NINES: f64 = 5.0;

#[derive(Debug, Clone, Serialize)]
pub struct Latencies {
    /// Intended send time to receipt by another session of the conversation.
    pub e2e: LatencySummary,
    /// Intended send time to receipt by the sending session itself.
    pub echo: LatencySummary,
    /// Intended send time to the accepted ack.
    pub ack: LatencySummary,
    pub connect: LatencySummary,
    /// How late the generator's 10 ms probe woke up (its own saturation).
    pub generator_lag: LatencySummary,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Throughput {
    /// Messages per second the schedule offered.
    pub offered_per_s: f64,
    /// Per second of the measured window, counted when they happened.
    pub sent_per_s: f64,
    pub accepted_per_s: f64,
    pub delivered_per_s: f64,
}

/// One interval of the time series.
#[derive(Debug, Clone, Serialize)]
pub struct IntervalRow {
    /// Seconds since the epoch at the interval's end.
    pub t_s: f64,
    pub counters: Counters,
    pub online: u64,
    pub cpu_cores: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p90_ms: f64,
    pub e2e_p99_ms: f64,
    pub e2e_max_ms: f64,
    pub ack_p99_ms: f64,
    pub lag_max_ms: f64,
}

/// One threshold and how the run did against it.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub limit: f64,
    pub actual: f64,
    pub passed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub description: String,
    pub agents: Vec<usize>,
    pub agent_count: usize,
    pub urls: Vec<String>,
    pub epoch_unix_ms: u64,
    pub phases: Phases,
    pub sessions: u64,
    pub connected: u64,
    pub conversations: u64,
    pub measured_s: f64,
    pub throughput: Throughput,
    pub latency: Latencies,
    pub totals: Counters,
    pub errors: BTreeMap<String, u64>,
    pub correctness: Correctness,
    pub delivered_ratio: f64,
    pub generator: Usage,
    /// Generator CPU averaged over the measured intervals, in cores.
    pub generator_cpu_cores: f64,
    pub server: Option<Usage>,
    pub thresholds: Vec<Check>,
    /// Why the run failed; empty when it passed.
    pub failures: Vec<String>,
    pub passed: bool,
    pub intervals: Vec<IntervalRow>,
}

/// A report and the histograms its plots need.
pub struct Built {
    pub report: Report,
    pub e2e: Histogram<u64>,
    pub ack: Histogram<u64>,
}

pub fn build(raw: &RawRun) -> anyhow::Result<Built> {
    let hists = raw.histograms.decode()?;
    let phases = raw.phases;
    let measured_s = (phases.measure_end_s - phases.measure_start_s).max(f64::MIN_POSITIVE);
    let interval_s = INTERVAL.as_secs_f64();
    let mut intervals = Vec::with_capacity(raw.intervals.len());
    let mut window = Counters::default();
    let mut cpu_sum = 0.0;
    let mut cpu_n = 0usize;
    for (i, interval) in raw.intervals.iter().enumerate() {
        let start = i as f64 * interval_s;
        if start >= phases.measure_start_s - 1e-6
            && start + interval_s <= phases.measure_end_s + 1e-6
        {
            window.add(&interval.counters);
            cpu_sum += interval.cpu_cores;
            cpu_n += 1;
        }
        let e2e = LatencySummary::of(&measure::decode(&interval.e2e)?);
        let ack = LatencySummary::of(&measure::decode(&interval.ack)?);
        let lag = LatencySummary::of(&measure::decode(&interval.lag)?);
        intervals.push(IntervalRow {
            t_s: start + interval_s,
            counters: interval.counters,
            online: interval.online,
            cpu_cores: interval.cpu_cores,
            e2e_p50_ms: e2e.p50_ms,
            e2e_p90_ms: e2e.p90_ms,
            e2e_p99_ms: e2e.p99_ms,
            e2e_max_ms: e2e.max_ms,
            ack_p99_ms: ack.p99_ms,
            lag_max_ms: lag.max_ms,
        });
    }
    let latency = Latencies {
        e2e: LatencySummary::of(&hists.e2e),
        echo: LatencySummary::of(&hists.echo),
        ack: LatencySummary::of(&hists.ack),
        connect: LatencySummary::of(&hists.connect),
        generator_lag: LatencySummary::of(&hists.lag),
    };
    let throughput = Throughput {
        offered_per_s: raw.offered_rate,
        sent_per_s: window.sent as f64 / measured_s,
        accepted_per_s: window.accepted as f64 / measured_s,
        delivered_per_s: window.delivered as f64 / measured_s,
    };
    let correctness = raw.correctness;
    let delivered_ratio = correctness.delivered_ratio();

    let t = &raw.scenario.thresholds;
    let mut checks = Vec::new();
    let mut at_most = |name: &str, limit: Option<f64>, actual: f64| {
        if let Some(limit) = limit {
            checks.push(Check {
                name: name.into(),
                limit,
                actual,
                passed: actual <= limit,
            });
        }
    };
    at_most("e2e_p99_ms", t.e2e_p99_ms, latency.e2e.p99_ms);
    at_most("e2e_p999_ms", t.e2e_p999_ms, latency.e2e.p999_ms);
    at_most("ack_p99_ms", t.ack_p99_ms, latency.ack.p99_ms);
    at_most("connect_p99_ms", t.connect_p99_ms, latency.connect.p99_ms);
    at_most(
        "max_errors",
        t.max_errors.map(|n| n as f64),
        raw.totals.errors as f64,
    );
    at_most(
        "max_connect_failures",
        t.max_connect_failures.map(|n| n as f64),
        raw.totals.connect_failures as f64,
    );
    at_most(
        "max_skipped_sends",
        t.max_skipped_sends.map(|n| n as f64),
        raw.totals.skipped as f64,
    );
    if let Some(limit) = t.min_delivered_ratio {
        checks.push(Check {
            name: "min_delivered_ratio".into(),
            limit,
            actual: delivered_ratio,
            passed: delivered_ratio >= limit,
        });
    }

    let mut failures = Vec::new();
    if correctness.violated() {
        failures.push(format!(
            "delivery contract violated: {}",
            correctness.violations().join(", ")
        ));
    }
    if raw.scenario.has_traffic() && raw.totals.accepted == 0 {
        failures.push("no message was accepted".into());
    }
    for check in checks.iter().filter(|c| !c.passed) {
        failures.push(format!(
            "threshold {}: {} (limit {})",
            check.name,
            round(check.actual),
            round(check.limit)
        ));
    }
    let generator_cpu_cores = if cpu_n > 0 {
        cpu_sum / cpu_n as f64
    } else {
        raw.generator.cpu_cores
    };
    let report = Report {
        scenario: raw.scenario.name.clone(),
        description: raw.scenario.description.clone(),
        agents: raw.agents.clone(),
        agent_count: raw.agent_count,
        urls: raw.scenario.target.urls.clone(),
        epoch_unix_ms: raw.epoch_unix_ms,
        phases,
        sessions: raw.sessions,
        connected: raw.connected,
        conversations: raw.conversations,
        measured_s,
        throughput,
        latency,
        totals: raw.totals,
        errors: raw.errors.clone(),
        correctness,
        delivered_ratio,
        generator: raw.generator,
        generator_cpu_cores,
        server: raw.server,
        thresholds: checks,
        passed: failures.is_empty(),
        failures,
        intervals,
    };
    Ok(Built {
        report,
        e2e: hists.e2e,
        ack: hists.ack,
    })
}

fn round(value: f64) -> String {
    if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.3}")
    }
}

fn latency_row(out: &mut String, name: &str, s: &LatencySummary) {
    let _ = writeln!(
        out,
        "  {:<22} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        name, s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms
    );
}

/// The terminal summary.
pub fn render_text(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "scenario {}  agents {:?} of {}  sessions {} (connected {})  conversations {}  measured {:.0} s",
        r.scenario, r.agents, r.agent_count, r.sessions, r.connected, r.conversations, r.measured_s
    );
    let tp = &r.throughput;
    let _ = writeln!(
        out,
        "  throughput: offered {:.1}/s  sent {:.1}/s  accepted {:.1}/s  delivered {:.1}/s",
        tp.offered_per_s, tp.sent_per_s, tp.accepted_per_s, tp.delivered_per_s
    );
    let _ = writeln!(
        out,
        "  {:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    latency_row(&mut out, "e2e (other sessions)", &r.latency.e2e);
    latency_row(&mut out, "echo (own session)", &r.latency.echo);
    latency_row(&mut out, "ack (accepted)", &r.latency.ack);
    latency_row(&mut out, "connect", &r.latency.connect);
    latency_row(&mut out, "generator lag", &r.latency.generator_lag);
    let c = &r.totals;
    let _ = writeln!(
        out,
        "  sends: scheduled {}  sent {}  accepted {}  refused {}  unresolved {}  skipped {} (offline {})  retries {}",
        c.scheduled, c.sent, c.accepted, c.refused, c.unresolved, c.skipped, c.skipped_offline, c.retries
    );
    let _ = writeln!(
        out,
        "  connections: connects {}  failures {}  reconnects {}  resyncs {}",
        c.connects, c.connect_failures, c.reconnects, c.resyncs
    );
    let _ = writeln!(
        out,
        "  ephemeral (not in the delivery check): reads acked {}  receipts received {}  typing acked {}  typing received {}",
        c.reads_acked, c.receipts_received, c.typing_acked, c.typing_received
    );
    let k = &r.correctness;
    let _ = writeln!(
        out,
        "  correctness: expected {}  delivered {}  recovered {}  lost {}  duplicates {}  reorders {}  gaps {} (+{} resynced)  (ratio {:.6})",
        k.expected, k.delivered, k.recovered, k.lost, k.duplicates, k.reorders, k.gaps, k.gaps_resynced, r.delivered_ratio
    );
    let _ = writeln!(
        out,
        "               unknown {}  refused delivered {}  duplicate messages {}  seq mismatches {}  accepted not delivered {}  unresolved sends {}  sync overlap {}  offline at end {}",
        k.unknown, k.refused_delivered, k.duplicate_messages, k.seq_mismatches, k.accepted_not_delivered, k.unresolved_sends, k.sync_overlap, k.sessions_offline_at_end
    );
    let _ = writeln!(out, "  errors: {:?}", r.errors);
    let _ = writeln!(
        out,
        "  generator: {:.2} cores, lag p99 {:.2} ms max {:.2} ms, rss {} KiB",
        r.generator_cpu_cores,
        r.latency.generator_lag.p99_ms,
        r.latency.generator_lag.max_ms,
        r.generator.rss_kib_end.unwrap_or_default()
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
    for check in &r.thresholds {
        let _ = writeln!(
            out,
            "  threshold {:<22} {:>12} limit {:>10}  {}",
            check.name,
            round(check.actual),
            round(check.limit),
            if check.passed { "ok" } else { "FAILED" }
        );
    }
    if r.passed {
        let _ = writeln!(out, "  result: PASS");
    } else {
        for failure in &r.failures {
            let _ = writeln!(out, "  FAIL: {failure}");
        }
    }
    out
}

fn md_latency(out: &mut String, name: &str, s: &LatencySummary) {
    let _ = writeln!(
        out,
        "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms
    );
}

/// The Markdown report.
pub fn render_markdown(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Load run: `{}`\n", r.scenario);
    if !r.description.is_empty() {
        let _ = writeln!(out, "{}\n", r.description);
    }
    let _ = writeln!(
        out,
        "**Result: {}**\n",
        if r.passed { "PASS" } else { "FAIL" }
    );
    for failure in &r.failures {
        let _ = writeln!(out, "- {failure}");
    }
    if !r.failures.is_empty() {
        out.push('\n');
    }
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| targets | {} |", r.urls.join(", "));
    let _ = writeln!(out, "| agents | {:?} of {} |", r.agents, r.agent_count);
    let _ = writeln!(
        out,
        "| sessions | {} ({} connected) |",
        r.sessions, r.connected
    );
    let _ = writeln!(out, "| conversations | {} |", r.conversations);
    let _ = writeln!(
        out,
        "| measured window | {:.0} s (from {:.0} s to {:.0} s after the start) |",
        r.measured_s, r.phases.measure_start_s, r.phases.measure_end_s
    );
    let tp = &r.throughput;
    let _ = writeln!(
        out,
        "| throughput | offered {:.1}/s, sent {:.1}/s, accepted {:.1}/s, delivered {:.1}/s |",
        tp.offered_per_s, tp.sent_per_s, tp.accepted_per_s, tp.delivered_per_s
    );
    let _ = writeln!(
        out,
        "| generator | {:.2} cores, event-loop lag p99 {:.2} ms, max {:.2} ms |",
        r.generator_cpu_cores, r.latency.generator_lag.p99_ms, r.latency.generator_lag.max_ms
    );
    if let Some(server) = &r.server {
        let _ = writeln!(
            out,
            "| server | {:.2} cores, RSS {} -> {} KiB |",
            server.cpu_cores,
            server.rss_kib_start.unwrap_or_default(),
            server.rss_kib_end.unwrap_or_default()
        );
    }
    let _ = writeln!(
        out,
        "\n## Latency (ms, from the intended send time)\n\n| | count | p50 | p90 | p99 | p99.9 | max |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    md_latency(&mut out, "e2e (other sessions)", &r.latency.e2e);
    md_latency(&mut out, "echo (own session)", &r.latency.echo);
    md_latency(&mut out, "ack (accepted)", &r.latency.ack);
    md_latency(&mut out, "connect", &r.latency.connect);
    md_latency(&mut out, "generator lag", &r.latency.generator_lag);
    let k = &r.correctness;
    let _ = writeln!(
        out,
        "\n## Correctness\n\n| | |\n|---|---:|\n| expected deliveries | {} |\n| delivered live | {} |\n| recovered (after a reconnect or a resync) | {} |\n| lost | {} |\n| duplicates | {} |\n| reorders | {} |\n| gaps (not announced) / announced by resync | {} / {} |\n| accepted, never delivered | {} |\n| unknown / refused delivered | {} / {} |\n| duplicate messages / seq mismatches | {} / {} |\n| unresolved sends | {} |\n| delivered ratio | {:.6} |",
        k.expected, k.delivered, k.recovered, k.lost, k.duplicates, k.reorders, k.gaps, k.gaps_resynced,
        k.accepted_not_delivered, k.unknown, k.refused_delivered, k.duplicate_messages,
        k.seq_mismatches, k.unresolved_sends, r.delivered_ratio
    );
    let c = &r.totals;
    let _ = writeln!(
        out,
        "\n## Counts\n\n| scheduled | sent | accepted | refused | unresolved | skipped | skipped offline | retries | connects | connect failures | reconnects | resyncs |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        c.scheduled, c.sent, c.accepted, c.refused, c.unresolved, c.skipped, c.skipped_offline,
        c.retries, c.connects, c.connect_failures, c.reconnects, c.resyncs
    );
    let _ = writeln!(
        out,
        "\n## Receipts and typing\n\nEphemeral traffic next to the messages; never counted as deliveries or losses.\n\n| read markers acked | receipt events received | typing acked | typing events received |\n|---:|---:|---:|---:|\n| {} | {} | {} | {} |",
        c.reads_acked, c.receipts_received, c.typing_acked, c.typing_received
    );
    if !r.errors.is_empty() {
        let _ = writeln!(out, "\n## Errors\n\n| error | count |\n|---|---:|");
        for (label, n) in &r.errors {
            let _ = writeln!(out, "| `{label}` | {n} |");
        }
    }
    if !r.thresholds.is_empty() {
        let _ = writeln!(
            out,
            "\n## Thresholds\n\n| threshold | limit | actual | |\n|---|---:|---:|---|"
        );
        for check in &r.thresholds {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                check.name,
                round(check.limit),
                round(check.actual),
                if check.passed { "ok" } else { "**failed**" }
            );
        }
    }
    let _ = writeln!(
        out,
        "\n## Plots\n\n![latency over time](latency-over-time.svg)\n\n![throughput over time](throughput-over-time.svg)\n\n![latency distribution](latency-distribution.svg)"
    );
    let _ = writeln!(
        out,
        "\n## Per interval\n\n| t (s) | online | sent | accepted | delivered | recovered | errors | e2e p50 | e2e p99 | e2e max | ack p99 | lag max | cpu |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for row in &r.intervals {
        let c = &row.counters;
        let _ = writeln!(
            out,
            "| {:.0} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            row.t_s, row.online, c.sent, c.accepted, c.delivered, c.recovered, c.errors,
            row.e2e_p50_ms, row.e2e_p99_ms, row.e2e_max_ms, row.ack_p99_ms, row.lag_max_ms, row.cpu_cores
        );
    }
    out
}

fn phase_markers(p: &Phases) -> Vec<(f64, String)> {
    vec![
        (p.send_start_s, "send".into()),
        (p.measure_start_s, "measure".into()),
        (p.measure_end_s, "drain".into()),
    ]
}

/// Latency percentiles per interval.
pub fn latency_chart(r: &Report) -> Chart {
    let pick = |f: fn(&IntervalRow) -> f64| -> Vec<(f64, f64)> {
        r.intervals
            .iter()
            // Intervals with measured deliveries only (warmup ones have none).
            .filter(|row| row.e2e_max_ms > 0.0)
            .map(|row| (row.t_s, f(row)))
            .collect()
    };
    Chart {
        title: format!("{}: e2e latency per second", r.scenario),
        x_label: "time since start (s)".into(),
        y_label: "latency (ms)".into(),
        x_axis: XAxis::Linear,
        series: vec![
            Series::new("e2e p50", pick(|row| row.e2e_p50_ms)),
            Series::new("e2e p90", pick(|row| row.e2e_p90_ms)),
            Series::new("e2e p99", pick(|row| row.e2e_p99_ms)),
            Series::new("e2e max", pick(|row| row.e2e_max_ms)),
            Series::new("ack p99", pick(|row| row.ack_p99_ms)),
        ],
        markers: phase_markers(&r.phases),
    }
}

/// Events per second.
pub fn throughput_chart(r: &Report) -> Chart {
    let pick = |f: fn(&Counters) -> u64| -> Vec<(f64, f64)> {
        r.intervals
            .iter()
            .map(|row| (row.t_s, f(&row.counters) as f64))
            .collect()
    };
    Chart {
        title: format!("{}: throughput per second", r.scenario),
        x_label: "time since start (s)".into(),
        y_label: "per second".into(),
        x_axis: XAxis::Linear,
        series: vec![
            Series::new("sent", pick(|c| c.sent)),
            Series::new("accepted", pick(|c| c.accepted)),
            Series::new("delivered", pick(|c| c.delivered)),
            Series::new("recovered", pick(|c| c.recovered)),
            Series::new("connects", pick(|c| c.connects + c.reconnects)),
            Series::new("errors", pick(|c| c.errors)),
        ],
        markers: phase_markers(&r.phases),
    }
}

/// The percentile curve of a histogram on the "nines" axis.
pub fn percentile_curve(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
    if histogram.is_empty() {
        return Vec::new();
    }
    // No deeper than the sample count resolves.
    let deepest = (histogram.len() as f64).log10().min(MAX_NINES);
    let mut points = Vec::new();
    let mut x: f64 = 0.0;
    while x <= deepest + 1e-9 {
        let q = 1.0 - 10f64.powf(-x);
        points.push((x, histogram.value_at_quantile(q) as f64 / 1_000.0));
        x += 0.05;
    }
    points.push((deepest.max(x - 0.05), histogram.max() as f64 / 1_000.0));
    points
}

pub fn distribution_chart(scenario: &str, e2e: &Histogram<u64>, ack: &Histogram<u64>) -> Chart {
    Chart {
        title: format!("{scenario}: latency by percentile (measured window)"),
        x_label: "percentile".into(),
        y_label: "latency (ms)".into(),
        x_axis: XAxis::Nines,
        series: vec![
            Series::new("e2e", percentile_curve(e2e)),
            Series::new("ack", percentile_curve(ack)),
        ],
        markers: Vec::new(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Write the report files into `dir`: report.json, report.md and the plots.
pub fn write_all(dir: &Path, built: &Built) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let r = &built.report;
    let json = serde_json::to_string_pretty(r).context("encoding the report")?;
    write(dir, "report.json", &(json + "\n"))?;
    write(dir, "report.md", &render_markdown(r))?;
    write(dir, "latency-over-time.svg", &latency_chart(r).render())?;
    write(
        dir,
        "throughput-over-time.svg",
        &throughput_chart(r).render(),
    )?;
    write(
        dir,
        "latency-distribution.svg",
        &distribution_chart(&r.scenario, &built.e2e, &built.ack).render(),
    )?;
    Ok(())
}

/// Write an agent's raw file into `dir`.
pub fn write_raw(dir: &Path, raw: &RawRun) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let agent = raw.agents.first().copied().unwrap_or_default();
    let json = serde_json::to_string(raw).context("encoding the raw run")?;
    write(dir, &RawRun::file_name(agent), &(json + "\n"))
}

/// Read the raw files in `paths` (files, or directories holding `raw-agent-*.json`)
/// and merge them.
pub fn merge_paths(paths: &[PathBuf]) -> anyhow::Result<RawRun> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("raw-agent-") && n.ends_with(".json"))
                })
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    anyhow::ensure!(!files.is_empty(), "no raw-agent-*.json files found");
    let mut merged: Option<RawRun> = None;
    for file in &files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let raw: RawRun = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a raw run", file.display()))?;
        match &mut merged {
            None => merged = Some(raw),
            Some(into) => into
                .merge(&raw)
                .with_context(|| format!("merging {}", file.display()))?,
        }
    }
    let merged = merged.expect("at least one file was read");
    if merged.agents.len() != merged.agent_count {
        tracing::warn!(
            have = ?merged.agents,
            of = merged.agent_count,
            "not every agent's raw file was merged"
        );
    }
    Ok(merged)
}

/// The `max-throughput` summary.
#[derive(Debug, Clone, Serialize)]
pub struct MaxThroughputReport {
    pub scenario: String,
    pub target_p99_ms: f64,
    /// The last rate that passed (messages per second offered by this agent).
    pub knee: Option<f64>,
    pub steps: Vec<StepResult>,
}

pub fn render_steps(r: &MaxThroughputReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| offered msg/s | accepted/s | delivered/s | e2e p50 | e2e p99 | e2e max | ack p99 | result |\n|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for s in &r.steps {
        let _ = writeln!(
            out,
            "| {:.0} | {:.1} | {:.1} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {} |",
            s.rate,
            s.accepted_per_s,
            s.delivered_per_s,
            s.e2e.p50_ms,
            s.e2e.p99_ms,
            s.e2e.max_ms,
            s.ack.p99_ms,
            if s.passed {
                "pass".to_owned()
            } else {
                format!("fail: {}", s.reason.clone().unwrap_or_default())
            }
        );
    }
    match r.knee {
        Some(knee) => {
            let _ = writeln!(
                out,
                "\nknee: {knee:.0} msg/s (last rate with e2e p99 <= {} ms)",
                r.target_p99_ms
            );
        }
        None => {
            let _ = writeln!(
                out,
                "\nknee: none (the first rate already missed e2e p99 <= {} ms)",
                r.target_p99_ms
            );
        }
    }
    out
}

pub fn write_steps(dir: &Path, r: &MaxThroughputReport) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(r).context("encoding the steps")?;
    write(dir, "max-throughput.json", &(json + "\n"))?;
    write(
        dir,
        "max-throughput.md",
        &format!("# Max throughput: `{}`\n\n{}", r.scenario, render_steps(r)),
    )?;
    let curve = |f: fn(&StepResult) -> f64| r.steps.iter().map(|s| (s.rate, f(s))).collect();
    let latency = Chart {
        title: format!("{}: e2e latency by offered rate", r.scenario),
        x_label: "offered messages per second".into(),
        y_label: "latency (ms)".into(),
        x_axis: XAxis::Linear,
        series: vec![
            Series::new("e2e p50", curve(|s| s.e2e.p50_ms)),
            Series::new("e2e p99", curve(|s| s.e2e.p99_ms)),
            Series::new("target p99", curve(|_| f64::NAN)),
        ],
        markers: r
            .knee
            .map(|k| vec![(k, "knee".to_owned())])
            .unwrap_or_default(),
    };
    let mut latency = latency;
    if let (Some(first), Some(last)) = (r.steps.first(), r.steps.last()) {
        latency.series[2].points =
            vec![(first.rate, r.target_p99_ms), (last.rate, r.target_p99_ms)];
    }
    write(dir, "max-throughput-latency.svg", &latency.render())?;
    let carried = Chart {
        title: format!("{}: carried by offered rate", r.scenario),
        x_label: "offered messages per second".into(),
        y_label: "per second".into(),
        x_axis: XAxis::Linear,
        series: vec![
            Series::new("offered", curve(|s| s.rate)),
            Series::new("accepted", curve(|s| s.accepted_per_s)),
            Series::new("delivered", curve(|s| s.delivered_per_s)),
        ],
        markers: Vec::new(),
    };
    write(dir, "max-throughput-rate.svg", &carried.render())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats;
    use std::time::Duration;

    #[test]
    fn the_percentile_curve_rises_to_the_max() {
        let mut h = stats::histogram();
        for ms in 1..=1000u64 {
            stats::record(&mut h, Duration::from_millis(ms));
        }
        let curve = percentile_curve(&h);
        assert!((curve[0].1 - 1.0).abs() < 0.01, "{:?}", curve[0]);
        assert!(curve.windows(2).all(|w| w[1].1 >= w[0].1));
        let last = curve.last().expect("points");
        assert!((last.0 - 3.0).abs() < 0.06, "{last:?}");
        assert!((last.1 - 1000.0).abs() < 1.0, "{last:?}");
        assert!(percentile_curve(&stats::histogram()).is_empty());
    }
}
