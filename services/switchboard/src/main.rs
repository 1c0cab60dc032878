//! The `switchboard` binary: thin wiring around the service crates.
//!
//! - `switchboard standalone`: all four services in one process on embedded backends.
//! - `switchboard gateway|presence|routing|storage`: one service per process.
//! - `switchboard token --user alice`: a development token signed with the configured
//!   HS256 secret (in standalone's data directory, the generated one); `--bot` marks
//!   a bot account (for the HTTP API's integrations).
//! - `switchboard config defaults|check`: every setting with its default and meaning;
//!   validate a configuration.
//! - `switchboard migrate`: apply pending storage schema migrations and exit.
//!
//! Configuration is loaded and validated before any port is bound. Services run until
//! SIGTERM or Ctrl-C; the gateway drains first, then the others stop.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use switchboard_config::Config;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "switchboard", version, about = "Switchboard messaging backend")]
struct Cli {
    /// TOML configuration file. Settings can also be overridden by SWITCHBOARD_* variables.
    #[arg(long, short, global = true, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run all four services in one process on embedded backends (development, demos,
    /// small installs). Development mode (chat page, /v1/dev/token) is on unless set.
    Standalone,
    /// Run the gateway service.
    Gateway,
    /// Run the presence service.
    Presence,
    /// Run the routing service.
    Routing,
    /// Run the storage service.
    Storage,
    /// Print a token for a user, signed with the configured HS256 secret.
    Token {
        /// User id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
        /// Mark the account as a bot: its messages carry `from_bot`.
        #[arg(long)]
        bot: bool,
    },
    /// Apply pending schema migrations of the configured history store, then exit.
    Migrate,
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print every setting with its default and meaning (valid TOML).
    Defaults,
    /// Validate the configuration (file plus environment) and print it.
    Check,
}

/// Standalone's defaults on top of the built-in ones: development conveniences on.
const STANDALONE_BASE: &str = "dev_mode = true\n";

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{s}` needs a unit: s, m, h or d"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("unknown unit `{unit}` (use s, m, h or d)")),
    };
    if secs == 0 {
        return Err("ttl must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let env = std::env::vars();
    match cli.command {
        Command::Config {
            command: ConfigCommand::Defaults,
        } => {
            print!("{}", switchboard_config::describe_defaults());
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            let config = Config::load(cli.config.as_deref(), env)?;
            println!("configuration is valid");
            println!("{config:#?}");
            Ok(())
        }
        Command::Migrate => {
            let config = Config::load(cli.config.as_deref(), env)?;
            let version = runtime()?.block_on(async {
                let _tracing =
                    switchboard_telemetry::init_tracing(&config.log, &config.telemetry, "migrate")?;
                switchboard_storage::migrate(&config).await
            })?;
            println!(
                "storage schema ({} backend) is at version {version}",
                config.storage.backend
            );
            Ok(())
        }
        Command::Token { user, ttl, bot } => {
            let mut config = Config::load_with_base(STANDALONE_BASE, cli.config.as_deref(), env)?;
            switchboard_auth::ensure_dev_secret(&mut config.auth, &config.data_dir)?;
            let token = switchboard_auth::Signer::from_config(&config.auth)?
                .sign_account(&user, ttl, bot)?;
            println!("{token}");
            Ok(())
        }
        Command::Standalone => {
            let mut config = Config::load_with_base(STANDALONE_BASE, cli.config.as_deref(), env)?;
            let generated =
                switchboard_auth::ensure_dev_secret(&mut config.auth, &config.data_dir)?;
            // Refuse a bad key before binding anything.
            switchboard_auth::Verifier::from_config(&config.auth)?;
            runtime()?.block_on(standalone(Arc::new(config), generated.is_some()))
        }
        Command::Gateway | Command::Presence | Command::Routing | Command::Storage => {
            let config = Config::load(cli.config.as_deref(), env)?;
            if matches!(cli.command, Command::Gateway) {
                switchboard_auth::Verifier::from_config(&config.auth)
                    .context("the gateway needs a token verification key")?;
            }
            let config = Arc::new(config);
            runtime()?.block_on(single(config, cli.command))
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Resolves on SIGTERM or Ctrl-C.
async fn terminate_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

async fn single(config: Arc<Config>, command: Command) -> anyhow::Result<()> {
    let service = match command {
        Command::Gateway => "gateway",
        Command::Presence => "presence",
        Command::Routing => "routing",
        Command::Storage => "storage",
        _ => unreachable!("single() is only called with a service command"),
    };
    // Held until the service stopped, so its last spans are flushed.
    let _tracing = switchboard_telemetry::init_tracing(&config.log, &config.telemetry, service)?;
    let shutdown = CancellationToken::new();
    let (name, task) = match command {
        Command::Gateway => (
            "gateway",
            tokio::spawn(switchboard_gateway::run(config.clone(), shutdown.clone())),
        ),
        Command::Presence => (
            "presence",
            tokio::spawn(switchboard_presence::run(config.clone(), shutdown.clone())),
        ),
        Command::Routing => (
            "routing",
            tokio::spawn(switchboard_routing::run(config.clone(), shutdown.clone())),
        ),
        Command::Storage => (
            "storage",
            tokio::spawn(switchboard_storage::run(config.clone(), shutdown.clone())),
        ),
        _ => unreachable!("single() is only called with a service command"),
    };
    tracing::info!(service = name, "starting");
    let mut task = task;
    tokio::select! {
        res = &mut task => return flatten(name, res),
        _ = terminate_signal() => tracing::info!(service = name, "shutting down"),
    }
    shutdown.cancel();
    flatten(name, task.await)
}

fn flatten(
    name: &str,
    res: Result<anyhow::Result<()>, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    match res {
        Ok(r) => r.with_context(|| format!("{name} service failed")),
        Err(e) => Err(anyhow::anyhow!("{name} service panicked: {e}")),
    }
}

async fn standalone(config: Arc<Config>, generated_secret: bool) -> anyhow::Result<()> {
    // One exporter for the four services, named `<prefix>-standalone`; each span
    // names its service in its `service` field.
    let _tracing =
        switchboard_telemetry::init_tracing(&config.log, &config.telemetry, "standalone")?;
    // Backends stop only after the gateway has drained, so no accepted message is cut
    // off mid-flight.
    let backend_stop = CancellationToken::new();
    let gateway_stop = CancellationToken::new();
    let mut backends = JoinSet::new();
    {
        let (c, s) = (config.clone(), backend_stop.clone());
        backends.spawn(async move { ("storage", switchboard_storage::run(c, s).await) });
        let (c, s) = (config.clone(), backend_stop.clone());
        backends.spawn(async move { ("presence", switchboard_presence::run(c, s).await) });
        let (c, s) = (config.clone(), backend_stop.clone());
        backends.spawn(async move { ("routing", switchboard_routing::run(c, s).await) });
    }
    let mut gateway = tokio::spawn(switchboard_gateway::run(
        config.clone(),
        gateway_stop.clone(),
    ));

    let url = client_url(&config.gateway.listen);
    tracing::info!(
        data_dir = %config.data_dir.display(),
        url = %url,
        "switchboard standalone is starting"
    );
    println!(
        "Switchboard standalone: open {url}/ (chat page), connect clients to {}/v1/connect",
        url.replace("http", "ws")
    );
    println!(
        "Get a token: switchboard token --user alice{}",
        if generated_secret {
            format!(
                "   (run from this directory; secret in {})",
                config.data_dir.join("jwt-secret").display()
            )
        } else {
            String::new()
        }
    );

    let mut failure = None;
    tokio::select! {
        _ = terminate_signal() => tracing::info!("shutting down: draining the gateway"),
        res = &mut gateway => {
            failure = flatten("gateway", res).err();
        }
        Some(res) = backends.join_next() => {
            failure = Some(match res {
                Ok((name, Ok(()))) => anyhow::anyhow!("{name} service stopped unexpectedly"),
                Ok((name, Err(e))) => e.context(format!("{name} service failed")),
                Err(e) => anyhow::anyhow!("a service panicked: {e}"),
            });
        }
    }
    gateway_stop.cancel();
    if !gateway.is_finished() {
        if let Err(e) = flatten("gateway", gateway.await) {
            failure.get_or_insert(e);
        }
    }
    backend_stop.cancel();
    while let Some(res) = backends.join_next().await {
        match res {
            Ok((_, Ok(()))) => {}
            Ok((name, Err(e))) => {
                failure.get_or_insert(e.context(format!("{name} service failed")));
            }
            Err(e) => {
                failure.get_or_insert(anyhow::anyhow!("a service panicked: {e}"));
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

/// The URL a person on this machine opens for a listen address.
fn client_url(listen: &str) -> String {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => format!("http://127.0.0.1:{}", a.port()),
        Ok(a) => format!("http://{a}"),
        Err(_) => format!("http://{listen}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert!(parse_ttl("10").is_err());
        assert!(parse_ttl("0m").is_err());
        assert!(parse_ttl("5y").is_err());
    }

    #[test]
    fn client_url_for_unspecified_listen() {
        assert_eq!(client_url("0.0.0.0:8080"), "http://127.0.0.1:8080");
        assert_eq!(client_url("127.0.0.2:9000"), "http://127.0.0.2:9000");
    }

    #[test]
    fn cli_parses() {
        Cli::try_parse_from(["switchboard", "token", "--user", "alice", "--ttl", "2h"]).unwrap();
        let bot =
            Cli::try_parse_from(["switchboard", "token", "--user", "relay", "--bot"]).unwrap();
        assert!(matches!(bot.command, Command::Token { bot: true, .. }));
        Cli::try_parse_from(["switchboard", "--config", "x.toml", "standalone"]).unwrap();
        Cli::try_parse_from(["switchboard", "config", "defaults"]).unwrap();
        Cli::try_parse_from(["switchboard", "migrate"]).unwrap();
        assert!(Cli::try_parse_from(["switchboard", "token"]).is_err());
    }
}
