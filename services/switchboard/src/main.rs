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
//!
//! The four service commands need the cluster credential (`cluster.credential` or
//! `cluster.credential_file`) that authenticates internal gRPC calls, unless
//! `cluster.insecure_no_credential` is set; standalone generates one per process.

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
    /// small installs). Without a configured token key, it generates a secret and turns
    /// development mode (chat page, /v1/dev/token) on, listening on loopback.
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

/// Standalone's defaults on top of the built-in ones when it generates the token secret
/// itself: development conveniences on, and so the client listener on loopback only
/// (`/v1/dev/token` mints a token for any user). The file and environment override it.
const STANDALONE_DEV_BASE: &str = "dev_mode = true\n[gateway]\nlisten = \"127.0.0.1:8080\"\n";

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
            let mut config = Config::load(cli.config.as_deref(), env)?;
            switchboard_auth::ensure_dev_secret(&mut config.auth, &config.data_dir)?;
            let token = switchboard_auth::Signer::from_config(&config.auth)?
                .sign_account(&user, ttl, bot)?;
            println!("{token}");
            Ok(())
        }
        Command::Standalone => {
            let (mut config, generated) = load_standalone(cli.config.as_deref(), env.collect())?;
            // Refuse a bad key before binding anything.
            switchboard_auth::Verifier::from_config(&config.auth)?;
            // The four services talk over loopback inside this process: a credential
            // of its own unless one is configured.
            config.cluster.credential = config.cluster.read_credential()?;
            config.cluster.credential_file.clear();
            if config.cluster.credential.is_empty() {
                config.cluster.credential = switchboard_auth::generate_secret().into();
            }
            refuse_foreign_urls(&config)?;
            runtime()?.block_on(standalone(Arc::new(config), generated))
        }
        Command::Gateway | Command::Presence | Command::Routing | Command::Storage => {
            let mut config = Config::load(cli.config.as_deref(), env)?;
            resolve_cluster_credential(&mut config.cluster)?;
            if matches!(cli.command, Command::Gateway) {
                switchboard_auth::Verifier::from_config(&config.auth)
                    .context("the gateway needs a token verification key")?;
            }
            let config = Arc::new(config);
            runtime()?.block_on(single(config, cli.command))
        }
    }
}

/// Standalone's configuration and whether it generated the token secret. Development
/// mode is on by default only when no token key is configured (standalone then uses
/// the secret it generates in the data directory); with the operator's own key it is
/// on only when `dev_mode` is set explicitly.
fn load_standalone(
    file: Option<&std::path::Path>,
    env: Vec<(String, String)>,
) -> anyhow::Result<(Config, bool)> {
    let plain = Config::load(file, env.clone())?;
    if switchboard_auth::key_configured(&plain.auth) {
        return Ok((plain, false));
    }
    let mut config = Config::load_with_base(STANDALONE_DEV_BASE, file, env)?;
    let generated = switchboard_auth::ensure_dev_secret(&mut config.auth, &config.data_dir)?;
    Ok((config, generated.is_some()))
}

/// Standalone calls its own services in the process and never uses `cluster.*_url`.
/// A URL set to anything but the default or this process's own listener shows that
/// the operator expected another instance's service to be used: refuse, and say so,
/// rather than silently ignore it.
fn refuse_foreign_urls(config: &Config) -> anyhow::Result<()> {
    let defaults = switchboard_config::ClusterConfig::default();
    let urls = [
        (
            "cluster.presence_url",
            &config.cluster.presence_url,
            &defaults.presence_url,
            "presence.grpc_listen",
            &config.presence.grpc_listen,
        ),
        (
            "cluster.routing_url",
            &config.cluster.routing_url,
            &defaults.routing_url,
            "routing.grpc_listen",
            &config.routing.grpc_listen,
        ),
        (
            "cluster.storage_url",
            &config.cluster.storage_url,
            &defaults.storage_url,
            "storage.grpc_listen",
            &config.storage.grpc_listen,
        ),
    ];
    for (setting, url, default, listen_setting, listen) in urls {
        let url = url.trim_end_matches('/');
        let own = client_url(listen);
        let own_localhost = own.replace("127.0.0.1", "localhost");
        if url == default.trim_end_matches('/') || url == own || url == own_localhost {
            continue;
        }
        anyhow::bail!(
            "{setting} = {url} points elsewhere than this process's {listen_setting}              ({listen}): standalone runs the four services in one process and calls them              directly, so it would not use that service; remove the setting, or run the              services separately (switchboard gateway|presence|routing|storage)"
        );
    }
    Ok(())
}

/// Read the cluster credential once (from its file if so configured), so every
/// channel and server uses the same value; refuse to go on without one unless
/// `cluster.insecure_no_credential` says so.
fn resolve_cluster_credential(
    cluster: &mut switchboard_config::ClusterConfig,
) -> anyhow::Result<()> {
    cluster.credential = cluster.read_credential()?;
    cluster.credential_file.clear();
    if cluster.credential.is_empty() && !cluster.insecure_no_credential {
        anyhow::bail!(
            "no cluster credential: set cluster.credential_file (or \
             SWITCHBOARD_CLUSTER__CREDENTIAL) to the same secret of at least 32 bytes on \
             every service, for example from `openssl rand -base64 48`; \
             cluster.insecure_no_credential = true runs without one (anyone who reaches \
             the gRPC ports can then read and write every user's data)"
        );
    }
    Ok(())
}

/// The warnings of settings that open the service up, logged at start.
fn warn_insecure(config: &Config, service: &str) {
    if config.dev_mode && matches!(service, "gateway" | "standalone") {
        tracing::warn!(
            listen = %config.gateway.listen,
            "dev mode is on: /v1/dev/token gives anyone who reaches this listener a token \
             for any user; turn dev_mode off for real users"
        );
    }
    if config.cluster.credential.is_empty() && service != "standalone" {
        tracing::warn!(
            "cluster.insecure_no_credential is on: internal gRPC calls are not \
             authenticated, anyone who reaches the gRPC port can call them"
        );
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
    warn_insecure(&config, service);
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
    warn_insecure(&config, "standalone");
    // Every port is bound before anything is announced, so a port in use fails the
    // start here, before the URL is printed.
    let bind = switchboard_telemetry::bind;
    let storage_grpc = bind("storage.grpc_listen", &config.storage.grpc_listen).await?;
    let storage_admin = bind("storage.admin_listen", &config.storage.admin_listen).await?;
    let presence_store = switchboard_presence::build_store(&config.presence)?;
    let presence_grpc = bind("presence.grpc_listen", &config.presence.grpc_listen).await?;
    let presence_admin = bind("presence.admin_listen", &config.presence.admin_listen).await?;
    let routing_grpc = bind("routing.grpc_listen", &config.routing.grpc_listen).await?;
    let routing_admin = bind("routing.admin_listen", &config.routing.admin_listen).await?;
    // The services call each other in this process, straight to the implementation;
    // the gRPC listeners serve outside callers only (operators' tools, probes).
    let peers = switchboard_rpc::Peers::in_process(&config.cluster);
    let gateway_service = switchboard_gateway::Gateway::with_peers(config.clone(), peers.clone())?;
    let gateway_listeners = switchboard_gateway::Listeners::bind(&config).await?;
    let url = client_url(&gateway_listeners.http.local_addr()?.to_string());

    // Backends stop only after the gateway has drained, so no accepted message is cut
    // off mid-flight.
    let backend_stop = CancellationToken::new();
    let gateway_stop = CancellationToken::new();
    let mut backends = JoinSet::new();
    {
        let (c, p, s) = (config.clone(), peers.clone(), backend_stop.clone());
        backends.spawn(async move {
            let served = switchboard_storage::serve(c, storage_grpc, storage_admin, p, s).await;
            ("storage", served)
        });
        let (c, p, s) = (config.clone(), peers.clone(), backend_stop.clone());
        backends.spawn(async move {
            let served =
                switchboard_presence::serve(c, presence_grpc, presence_admin, presence_store, p, s)
                    .await;
            ("presence", served)
        });
        let (c, p, s) = (config.clone(), peers, backend_stop.clone());
        backends.spawn(async move {
            let served = switchboard_routing::serve(c, routing_grpc, routing_admin, p, s).await;
            ("routing", served)
        });
    }
    let mut gateway = tokio::spawn(gateway_service.serve(gateway_listeners, gateway_stop.clone()));

    tracing::info!(
        data_dir = %config.data_dir.display(),
        url = %url,
        dev_mode = config.dev_mode,
        "switchboard standalone is listening"
    );
    if config.dev_mode {
        println!(
            "Switchboard standalone: open {url}/ (chat page), connect clients to {}/v1/connect",
            url.replace("http", "ws")
        );
        println!(
            "Development mode: {url}/v1/dev/token gives a token for any user, without credentials."
        );
    } else {
        println!(
            "Switchboard standalone: connect clients to {}/v1/connect",
            url.replace("http", "ws")
        );
    }
    if generated_secret {
        println!(
            "Get a token: switchboard token --user alice   (run from this directory; secret in {})",
            config.data_dir.join("jwt-secret").display()
        );
    } else {
        println!("Get a token: switchboard token --user alice");
    }

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
