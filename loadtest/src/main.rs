//! `switchboard-load`: the load harness's command line.
//!
//! - `switchboard-load chat-1to1 ...`: 1:1 traffic on an open-loop schedule, every
//!   delivery checked; exits non-zero when the delivery contract was broken.
//! - `switchboard-load idle ...`: many idle connections held open; connect latency
//!   and the server's memory per connection.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use switchboard_auth::Signer;
use switchboard_client::Encoding;
use switchboard_load::chat::{self, ChatSettings};
use switchboard_load::connect::ConnectSettings;
use switchboard_load::idle::{self, IdleSettings};
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
    /// Pairs of clients in direct conversations, sending on an open-loop schedule;
    /// every delivery is checked.
    #[command(name = "chat-1to1")]
    Chat1to1(ChatArgs),
    /// Idle connections held open (they only keep alive).
    Idle(IdleArgs),
}

#[derive(Args)]
struct Common {
    /// The gateway's client endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/connect")]
    url: String,
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
        let secret = match (&self.secret, &self.secret_file) {
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

    fn connect_settings(
        &self,
        run_length: Duration,
        max_in_flight: usize,
        event_queue: usize,
    ) -> ConnectSettings {
        ConnectSettings {
            url: self.url.clone(),
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
