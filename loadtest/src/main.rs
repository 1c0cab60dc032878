//! `switchboard-load`: the load harness's command line.
//!
//! - `switchboard-load run SCENARIO.toml --report-dir DIR`: one scenario (users,
//!   devices, conversation mix, open-loop rate, churn, thresholds), every delivery
//!   checked; a live progress line, a summary, and JSON, Markdown and SVG reports.
//!   Exits 1 when correctness or a threshold failed, 2 on an error.
//! - `switchboard-load max-throughput SCENARIO.toml`: steps the rate up until e2e
//!   p99 passes a target; reports the knee.
//! - `switchboard-load merge DIR... --report-dir OUT`: one report from the raw
//!   files of several agents (`run --agent-index i --agent-count n`).
//! - `switchboard-load check-ledger FILE --url URL`: compares the file of sends a
//!   run wrote (`run --ledger FILE`) with the history the server holds.
//! - `switchboard-load chat-1to1 ...` and `idle ...`: the earlier fixed scenarios.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use switchboard_auth::Signer;
use switchboard_client::Encoding;
use switchboard_load::acklog;
use switchboard_load::chat::{self, ChatSettings};
use switchboard_load::connect::ConnectSettings;
use switchboard_load::idle::{self, IdleSettings};
use switchboard_load::report::{self, MaxThroughputReport};
use switchboard_load::runner::{self, RunOptions, Steps};
use switchboard_load::scenario::{Overrides, Scenario};
use switchboard_load::{parse_duration, system};

/// Shortest HS256 secret accepted, as on the server.
const MIN_SECRET_BYTES: usize = 32;

/// Open-file limit asked for at start: sockets on both ends of loopback fit.
const WANTED_NOFILE: u64 = 65_536;

#[derive(Parser)]
#[command(name = "switchboard-load", version, about = "Switchboard load harness")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario file.
    Run(RunArgs),
    /// Step a scenario's rate up until e2e p99 passes a target; report the knee.
    #[command(name = "max-throughput")]
    MaxThroughput(MaxThroughputArgs),
    /// Merge the raw files of a distributed run's agents into one report.
    Merge(MergeArgs),
    /// Check the file of sends a run wrote (`run --ledger`) against storage: every
    /// accepted message stored once at its acked sequence, no refused one, no gaps.
    #[command(name = "check-ledger")]
    CheckLedger(CheckLedgerArgs),
    /// Pairs of clients in direct conversations, sending on an open-loop schedule;
    /// every delivery is checked.
    #[command(name = "chat-1to1")]
    Chat1to1(ChatArgs),
    /// Idle connections held open (they only keep alive).
    Idle(IdleArgs),
}

#[derive(Args)]
struct ScenarioArgs {
    /// The scenario file (TOML).
    scenario: PathBuf,
    /// Write raw-agent-<i>.json, report.json, report.md and SVG plots here.
    #[arg(long)]
    report_dir: Option<PathBuf>,
    /// Gateway endpoint(s), replacing the scenario's `target.urls` (repeatable).
    #[arg(long = "url")]
    urls: Vec<String>,
    /// Local source address(es) for the connections, round-robin, replacing the
    /// scenario's `target.source_addrs` (repeatable).
    #[arg(long = "source-addr")]
    source_addrs: Vec<IpAddr>,
    /// HS256 secret the server verifies tokens with.
    #[arg(long, env = "SWITCHBOARD_LOAD_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// File holding the HS256 secret (else the scenario's `target.secret_file`).
    #[arg(long, conflicts_with = "secret")]
    secret_file: Option<PathBuf>,
    /// Replaces the scenario's measured duration.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Replaces the scenario's warmup.
    #[arg(long, value_parser = parse_duration)]
    warmup: Option<Duration>,
    /// This agent's index in a distributed run (0-based).
    #[arg(long, env = "JOB_COMPLETION_INDEX", default_value_t = 0)]
    agent_index: usize,
    /// Agents in the distributed run.
    #[arg(long, default_value_t = 1)]
    agent_count: usize,
    /// Process id of the server, to report its CPU and memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// No progress line on stderr.
    #[arg(long)]
    quiet: bool,
    /// Write every send's outcome to this file (JSON lines) for `check-ledger`.
    #[arg(long)]
    ledger: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    scenario: ScenarioArgs,
    /// Replaces the scenario's message rate (msg/s over all agents).
    #[arg(long)]
    rate: Option<f64>,
}

#[derive(Args)]
struct MaxThroughputArgs {
    #[command(flatten)]
    scenario: ScenarioArgs,
    /// First rate (msg/s over all agents); default from `[max_throughput]`.
    #[arg(long)]
    start: Option<f64>,
    #[arg(long)]
    step: Option<f64>,
    #[arg(long)]
    max: Option<f64>,
    /// A step passes while e2e p99 is at most this many milliseconds.
    #[arg(long)]
    target_p99_ms: Option<f64>,
    /// Measured length of each step.
    #[arg(long, value_parser = parse_duration)]
    step_duration: Option<Duration>,
}

#[derive(Args)]
struct CheckLedgerArgs {
    /// The file `run --ledger` wrote.
    file: PathBuf,
    /// A gateway endpoint of the server the run went to.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/connect")]
    url: String,
    /// HS256 secret the server verifies tokens with.
    #[arg(long, env = "SWITCHBOARD_LOAD_SECRET", hide_env_values = true)]
    secret: Option<String>,
    #[arg(long, conflicts_with = "secret")]
    secret_file: Option<PathBuf>,
}

#[derive(Args)]
struct MergeArgs {
    /// Report directories of the agents (or raw-agent-*.json files).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Where the merged report goes.
    #[arg(long)]
    report_dir: PathBuf,
}

/// The HS256 signer from a secret, a secret file, or the scenario's secret file.
fn signer_from(
    secret: Option<&str>,
    secret_file: Option<&PathBuf>,
    fallback_file: Option<&PathBuf>,
) -> anyhow::Result<Signer> {
    let secret = match (secret, secret_file.or(fallback_file)) {
        (Some(secret), _) => secret.as_bytes().to_vec(),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the secret from {}", path.display()))?;
            text.trim().as_bytes().to_vec()
        }
        (None, None) => anyhow::bail!(
            "give the server's HS256 secret with --secret, SWITCHBOARD_LOAD_SECRET or --secret-file"
        ),
    };
    anyhow::ensure!(
        secret.len() >= MIN_SECRET_BYTES,
        "the HS256 secret must be at least {MIN_SECRET_BYTES} bytes"
    );
    Ok(Signer::hs256(&secret))
}

impl ScenarioArgs {
    fn load(&self, rate: Option<f64>) -> anyhow::Result<(Scenario, Signer)> {
        let mut scenario = Scenario::load(&self.scenario)?;
        scenario.apply(&Overrides {
            urls: self.urls.clone(),
            source_addrs: self.source_addrs.clone(),
            duration: self.duration,
            warmup: self.warmup,
            rate,
        })?;
        let signer = signer_from(
            self.secret.as_deref(),
            self.secret_file.as_ref(),
            scenario.target.secret_file.as_ref(),
        )?;
        Ok((scenario, signer))
    }

    fn options(&self, scenario: Scenario) -> RunOptions {
        RunOptions {
            scenario,
            agent_index: self.agent_index,
            agent_count: self.agent_count,
            server_pid: self.server_pid,
            progress: !self.quiet,
            ledger: self.ledger.clone(),
        }
    }
}

/// Print the summary and write the files of a finished run; returns whether it passed.
fn conclude(
    raw: &switchboard_load::measure::RawRun,
    dir: Option<&PathBuf>,
) -> anyhow::Result<bool> {
    let built = report::build(raw)?;
    print!("{}", report::render_text(&built.report));
    if let Some(dir) = dir {
        report::write_raw(dir, raw)?;
        report::write_all(dir, &built)?;
        println!("  reports in {}", dir.display());
    }
    Ok(built.report.passed)
}

#[derive(Args)]
struct Common {
    /// The gateway's client endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/connect")]
    url: String,
    /// Local source address(es) for the connections, round-robin (repeatable).
    #[arg(long = "source-addr")]
    source_addrs: Vec<IpAddr>,
    /// HS256 secret the server verifies tokens with.
    #[arg(long, env = "SWITCHBOARD_LOAD_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// File holding the HS256 secret (e.g. ./switchboard-data/jwt-secret).
    #[arg(long, conflicts_with = "secret")]
    secret_file: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Wire::Json)]
    encoding: Wire,
    /// New connections per second.
    #[arg(long, default_value_t = 500.0)]
    connect_rate: f64,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    connect_timeout: Duration,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// WebSocket read buffer per connection, in bytes.
    #[arg(long, default_value_t = 4096)]
    read_buffer: usize,
    /// WebSocket write buffer per connection, in bytes.
    #[arg(long, default_value_t = 4096)]
    write_buffer: usize,
    /// Process id of the server, to report its CPU and memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    common: Common,
    /// Number of clients (even; client 2k and 2k+1 share a conversation).
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Messages per second offered, over all senders.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Measured part of the send phase.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Sends before the measured part (checked, not measured).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    warmup: Duration,
    /// Longest wait after the last send for missing acks and deliveries.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    drain: Duration,
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
    /// Sends awaiting an ack per client before due sends are skipped (and counted
    /// as generator saturation).
    #[arg(long, default_value_t = 32)]
    max_in_flight: usize,
    /// Events queued per client before its connection stops reading.
    #[arg(long, default_value_t = 256)]
    event_queue: usize,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// How long the connections stay open after the last connect.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    hold: Duration,
}

#[derive(Clone, Copy, ValueEnum)]
enum Wire {
    Json,
    Proto,
}

impl From<Wire> for Encoding {
    fn from(wire: Wire) -> Encoding {
        match wire {
            Wire::Json => Encoding::Json,
            Wire::Proto => Encoding::Proto,
        }
    }
}

impl Common {
    fn signer(&self) -> anyhow::Result<Signer> {
        signer_from(self.secret.as_deref(), self.secret_file.as_ref(), None)
    }

    fn connect_settings(
        &self,
        run_length: Duration,
        max_in_flight: usize,
        event_queue: usize,
    ) -> ConnectSettings {
        ConnectSettings {
            url: self.url.clone(),
            source_addrs: self.source_addrs.clone(),
            encoding: self.encoding.into(),
            rate: self.connect_rate,
            // Outlives the run, the connect ramp and a generous margin.
            token_ttl: run_length + Duration::from_secs(3_600),
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            max_in_flight,
            outbound_queue: max_in_flight.max(8),
            event_queue,
            read_buffer: self.read_buffer,
            write_buffer: self.write_buffer,
        }
    }

    fn write_json(&self, report: &impl serde::Serialize) -> anyhow::Result<()> {
        if let Some(path) = &self.json {
            let text = serde_json::to_string_pretty(report).context("encoding the report")?;
            std::fs::write(path, text + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Returns whether the run passed.
fn run(cli: Cli) -> anyhow::Result<bool> {
    match system::raise_nofile_limit(WANTED_NOFILE) {
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "could not raise the open-file limit"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    match cli.command {
        Command::Run(args) => {
            let (scenario, signer) = args.scenario.load(args.rate)?;
            let options = args.scenario.options(scenario);
            let raw = runtime.block_on(runner::run(options, signer))?;
            conclude(&raw, args.scenario.report_dir.as_ref())
        }
        Command::MaxThroughput(args) => {
            let (scenario, signer) = args.scenario.load(None)?;
            let defaults = scenario.max_throughput.clone();
            let steps = Steps {
                start: args.start.unwrap_or(defaults.start),
                step: args.step.unwrap_or(defaults.step),
                max: args.max.unwrap_or(defaults.max),
                target_p99_ms: args.target_p99_ms.unwrap_or(defaults.target_p99_ms),
                step_duration: args.step_duration.unwrap_or(defaults.step_duration),
            };
            anyhow::ensure!(
                steps.start > 0.0 && steps.step > 0.0 && steps.max >= steps.start,
                "max-throughput needs --start > 0, --step > 0 and --max >= --start"
            );
            let name = scenario.name.clone();
            let options = args.scenario.options(scenario);
            let (raw, results) =
                runtime.block_on(runner::max_throughput(options, signer, steps))?;
            let summary = MaxThroughputReport {
                scenario: name,
                target_p99_ms: steps.target_p99_ms,
                knee: runner::knee(&results),
                steps: results,
            };
            // The whole run's thresholds include the failing step by design; the
            // outcome is correctness and whether some rate passed.
            conclude(&raw, args.scenario.report_dir.as_ref())?;
            print!("{}", report::render_steps(&summary));
            if let Some(dir) = &args.scenario.report_dir {
                report::write_steps(dir, &summary)?;
            }
            Ok(!raw.correctness.violated() && summary.knee.is_some())
        }
        Command::Merge(args) => {
            let raw = report::merge_paths(&args.inputs)?;
            let built = report::build(&raw)?;
            print!("{}", report::render_text(&built.report));
            report::write_all(&args.report_dir, &built)?;
            println!("  reports in {}", args.report_dir.display());
            Ok(built.report.passed)
        }
        Command::CheckLedger(args) => {
            let signer = signer_from(args.secret.as_deref(), args.secret_file.as_ref(), None)?;
            let check = runtime.block_on(acklog::check(&args.file, &args.url, &signer))?;
            println!("{}", serde_json::to_string_pretty(&check)?);
            Ok(!check.violated())
        }
        Command::Chat1to1(args) => {
            let common = &args.common;
            let signer = common.signer()?;
            let settings = ChatSettings {
                connect: common.connect_settings(
                    args.warmup + args.duration + args.drain,
                    args.max_in_flight,
                    args.event_queue,
                ),
                clients: args.clients,
                rate: args.rate,
                duration: args.duration,
                warmup: args.warmup,
                drain: args.drain,
                body_bytes: args.body_bytes,
                max_in_flight: args.max_in_flight,
                // Messages sent and not yet fully delivered: the in-flight sends
                // of both members plus deliveries trailing behind their acks.
                track_capacity: (args.max_in_flight * 64).max(1024),
                server_pid: common.server_pid,
            };
            let report = runtime.block_on(chat::run(settings, signer))?;
            print!("{}", chat::render(&report));
            common.write_json(&report)?;
            Ok(report.failures.is_empty())
        }
        Command::Idle(args) => {
            let common = &args.common;
            let signer = common.signer()?;
            // Idle connections receive nothing: the smallest queues will do.
            let settings = IdleSettings {
                connect: common.connect_settings(args.hold, 2, 4),
                clients: args.clients,
                hold: args.hold,
                server_pid: common.server_pid,
            };
            let report = runtime.block_on(idle::run(settings, signer))?;
            print!("{}", idle::render(&report));
            common.write_json(&report)?;
            Ok(report.alive_at_end == report.clients)
        }
    }
}
