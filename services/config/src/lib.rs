//! Switchboard's configuration: every setting of every service, its default and its
//! meaning, in one place.
//!
//! Configuration comes from one TOML file plus environment overrides named
//! `SWITCHBOARD_<SECTION>__<KEY>` (double underscore between section and key, for
//! example `SWITCHBOARD_GATEWAY__LISTEN=0.0.0.0:9000`; top-level keys are
//! `SWITCHBOARD_<KEY>`). Unknown keys are errors, and [`Config::validate`] runs before
//! any port is bound. This crate only parses and checks; it reads no environment
//! itself except through [`Config::load`]'s explicit `env` argument.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod secret;
mod settings;
pub use secret::{Secret, SecretUrl, REDACTED};
pub use settings::{describe_defaults, SETTINGS};

/// Shortest accepted HS256 secret and cluster credential, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "SWITCHBOARD_";

/// The variable naming the configuration file; not a setting itself.
pub const CONFIG_FILE_ENV: &str = "SWITCHBOARD_CONFIG";

/// Room a message's fields other than its body may take in an answer (ids, mentions,
/// reactions, framing): `storage.max_answer_bytes` leaves at least this much beside
/// one largest body.
pub const MESSAGE_FIELDS_BYTES: usize = 64 * 1024;
/// Largest `storage.max_answer_bytes`: under the 4 MiB a gRPC peer decodes by default.
pub const MAX_ANSWER_BYTES: usize = 3 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid setting `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// All settings. Sections belong to one service each, except the shared ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory for embedded backends' data and the generated development secret.
    pub data_dir: PathBuf,
    /// Development conveniences: the `/v1/dev/token` endpoint and the chat page.
    pub dev_mode: bool,
    /// Allow `dev_mode` with a client listener (`gateway.listen`) beyond loopback:
    /// anyone who reaches it can then mint a token for any user.
    pub dev_mode_allow_remote: bool,
    /// What a commit of the embedded backends (the embedded event log and the SQLite
    /// history store) survives: `process` (a crash of any process, `kill -9`
    /// included: the commit is in the operating system's page cache) or `machine`
    /// (also a power loss or kernel crash: every commit waits for an fsync).
    pub embedded_durability: String,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
    pub auth: AuthConfig,
    pub cluster: ClusterConfig,
    pub gateway: GatewayConfig,
    pub presence: PresenceConfig,
    pub routing: RoutingConfig,
    pub storage: StorageConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./switchboard-data"),
            dev_mode: false,
            dev_mode_allow_remote: false,
            embedded_durability: "process".into(),
            log: LogConfig::default(),
            telemetry: TelemetryConfig::default(),
            auth: AuthConfig::default(),
            cluster: ClusterConfig::default(),
            gateway: GatewayConfig::default(),
            presence: PresenceConfig::default(),
            routing: RoutingConfig::default(),
            storage: StorageConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter, for example `info` or `switchboard_gateway=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// Distributed tracing: spans exported to an OpenTelemetry collector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `http://` or `https://` URL of an OTLP/gRPC collector (port 4317 by
    /// convention); empty = no export (spans stay local to the logs).
    pub otlp_endpoint: String,
    /// PEM CA bundle that signs an `https://` collector's certificate; empty = the
    /// public web roots built into the binary.
    pub otlp_ca_file: String,
    /// PEM client certificate for mutual TLS to the collector (with `otlp_key_file`).
    pub otlp_cert_file: String,
    /// PEM private key of `otlp_cert_file`.
    pub otlp_key_file: String,
    /// gRPC metadata sent with every export, `key=value` pairs separated by commas
    /// (as `OTEL_EXPORTER_OTLP_HEADERS`), e.g. `authorization=Bearer abc` for a
    /// collector that wants a token (a [`Secret`]: never printed). Prefer
    /// `otlp_headers_file` for credentials.
    pub otlp_headers: Secret,
    /// A file holding `otlp_headers` (a mounted Secret).
    pub otlp_headers_file: String,
    /// Exported service names are `<prefix>-<command>`, e.g. `switchboard-routing`.
    pub service_name_prefix: String,
    /// Share of new traces recorded, 0.0 to 1.0. A trace started elsewhere keeps
    /// the sampling decision of its parent.
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: String::new(),
            otlp_ca_file: String::new(),
            otlp_cert_file: String::new(),
            otlp_key_file: String::new(),
            otlp_headers: Secret::default(),
            otlp_headers_file: String::new(),
            service_name_prefix: "switchboard".into(),
            sample_ratio: 1.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 shared secret (prefer `hs256_secret_file`), at least 32 bytes.
    pub hs256_secret: Secret,
    /// File holding the HS256 secret. In standalone, generated on first start when
    /// no key is configured.
    pub hs256_secret_file: String,
    /// PEM public key file (RS256 or ES256).
    pub public_key_file: String,
    /// JWKS file with RS256/ES256 public keys selected by `kid`.
    pub jwks_file: String,
    /// Required `iss` claim; empty = not checked.
    pub issuer: String,
    /// Required `aud` claim; empty = not checked.
    pub audience: String,
    /// Allowed clock skew when checking `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            hs256_secret: Secret::default(),
            hs256_secret_file: String::new(),
            public_key_file: String::new(),
            jwks_file: String::new(),
            issuer: String::new(),
            audience: String::new(),
            leeway_secs: 30,
        }
    }
}

/// Where the services reach each other (gRPC URLs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    pub presence_url: String,
    pub routing_url: String,
    pub storage_url: String,
    /// Timeout of one internal gRPC call, in milliseconds.
    pub rpc_timeout_ms: u64,
    /// Timeout of establishing a gRPC connection, in milliseconds.
    pub connect_timeout_ms: u64,
    /// The shared credential every internal gRPC call carries and every service
    /// checks (at least 32 bytes of visible ASCII; prefer `credential_file`).
    pub credential: Secret,
    /// File holding the cluster credential (trailing newline ignored).
    pub credential_file: String,
    /// Run the internal gRPC services without a credential: anyone who reaches
    /// their ports can read and write every user's data. Tests and trusted networks only.
    pub insecure_no_credential: bool,
    /// Largest internal gRPC message sent or received, in bytes (above any answer
    /// storage produces).
    pub max_message_bytes: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            presence_url: "http://127.0.0.1:50052".into(),
            routing_url: "http://127.0.0.1:50053".into(),
            storage_url: "http://127.0.0.1:50054".into(),
            rpc_timeout_ms: 5_000,
            connect_timeout_ms: 2_000,
            credential: Secret::default(),
            credential_file: String::new(),
            insecure_no_credential: false,
            max_message_bytes: 8 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Client listener (WebSocket, health, metrics).
    pub listen: String,
    /// Internal gRPC listener (Deliver, Drain).
    pub grpc_listen: String,
    /// URL other services use to reach this gateway's gRPC; empty = derived from
    /// `grpc_listen` (with 127.0.0.1 for an unspecified address).
    pub advertise_url: String,
    /// Admin listener (health, readiness, metrics).
    pub admin_listen: String,
    /// Maximum concurrent client connections.
    pub max_connections: usize,
    /// Largest client frame accepted, in bytes (JSON frames: at least six times
    /// routing.max_body_bytes plus 4 KiB, the worst escaping of a body).
    pub max_frame_bytes: usize,
    /// WebSocket read buffer per connection, in bytes.
    pub read_buffer_bytes: usize,
    /// WebSocket write buffer per connection, in bytes.
    pub write_buffer_bytes: usize,
    /// Frames queued per connection before the client counts as slow.
    pub outbound_queue: usize,
    /// Encoded bytes queued per connection before the client counts as slow (a
    /// single larger frame still goes into an empty queue).
    pub outbound_queue_bytes: usize,
    /// Interval of the batched presence heartbeat, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// Interval of the cheap presence probe (a heartbeat without sessions) that
    /// notices a presence that lost its state or was unreachable, in milliseconds:
    /// how soon the gateway registers its sessions again.
    pub presence_probe_ms: u64,
    /// Close a connection that sent nothing (not even a ping) for this long, in ms.
    pub client_idle_timeout_ms: u64,
    /// How long draining waits for clients to leave before closing them, in ms.
    pub drain_deadline_ms: u64,
    /// Sustained requests per second allowed per connection.
    pub requests_per_second: u32,
    /// Burst of requests allowed per connection above the sustained rate.
    pub request_burst: u32,
    /// Protocol violations tolerated on one connection before it is closed.
    pub max_violations: u32,
    /// `TypingEvent.expires_in_ms`: clients treat a typing user as stopped after
    /// this long without another typing event, in ms.
    pub typing_expiry_ms: u64,
    /// Least time between two forwarded `typing: true` of one session in one
    /// conversation, in ms (sooner ones are answered `rate_limited`; 0 = no limit).
    pub typing_interval_ms: u64,
    /// A session that sent no frame other than ping for this long is set to "away"
    /// (automatically, undone by its next frame), in ms; 0 = never.
    pub idle_away_after_ms: u64,
    /// Most open connections of one user on this gateway (per gateway instance,
    /// not cluster-wide); more are refused with 429 `rate_limited`.
    pub max_connections_per_user: usize,
    /// A client connection must send a complete HTTP request header within this
    /// long (also between requests on a keep-alive connection), in ms.
    pub header_read_timeout_ms: u64,
    /// Most client TCP connections accepted but not upgraded to a WebSocket
    /// (unfinished requests, HTTP API keep-alive connections); more are closed at once.
    pub max_pending_upgrades: usize,
    /// Most open client TCP connections from one IP address, upgraded or not;
    /// 0 = no limit (behind a proxy every client has the proxy's address).
    pub max_connections_per_ip: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "0.0.0.0:8080".into(),
            grpc_listen: "127.0.0.1:50051".into(),
            advertise_url: String::new(),
            admin_listen: "127.0.0.1:9191".into(),
            max_connections: 100_000,
            max_frame_bytes: 128 * 1024,
            // Allocated up front per connection: the largest part of an idle
            // connection's memory. Larger frames are still read (in more syscalls).
            read_buffer_bytes: 1024,
            write_buffer_bytes: 4 * 1024,
            outbound_queue: 256,
            outbound_queue_bytes: 4 * 1024 * 1024,
            heartbeat_interval_ms: 10_000,
            presence_probe_ms: 1_000,
            client_idle_timeout_ms: 90_000,
            drain_deadline_ms: 10_000,
            requests_per_second: 50,
            request_burst: 100,
            max_violations: 10,
            typing_expiry_ms: 6_000,
            typing_interval_ms: 1_000,
            idle_away_after_ms: 300_000,
            max_connections_per_user: 32,
            header_read_timeout_ms: 10_000,
            max_pending_upgrades: 1_024,
            max_connections_per_ip: 1_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    pub grpc_listen: String,
    pub admin_listen: String,
    /// Session store: `memory` or `redis`.
    pub backend: String,
    /// A session not heartbeated for this long goes offline, in milliseconds.
    pub session_ttl_ms: u64,
    /// After presence lost its state (a store that came back empty), how long its
    /// routes are marked partial while gateways register their sessions again, in
    /// milliseconds; routing delivers to every gateway it knows meanwhile.
    pub rebuild_window_ms: u64,
    /// Redis URL for the `redis` backend (`redis://[user:password@]host:port[/db]`, or
    /// `rediss://` for TLS).
    pub redis_url: SecretUrl,
    /// Prefix of every Redis key this service writes.
    pub redis_key_prefix: String,
    /// Redis ACL user name; empty = the URL's (or none).
    pub redis_username: String,
    /// Redis password; empty = the URL's or `redis_password_file`'s (or none).
    pub redis_password: Secret,
    /// File holding the Redis password (trailing newline ignored).
    pub redis_password_file: String,
    /// PEM file of the CA(s) that sign the Redis server certificate (`rediss://`);
    /// empty = the system's trust store.
    pub redis_ca_file: String,
    /// PEM client certificate for mutual TLS (with `redis_key_file`).
    pub redis_cert_file: String,
    /// PEM private key of `redis_cert_file`.
    pub redis_key_file: String,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            grpc_listen: "127.0.0.1:50052".into(),
            admin_listen: "127.0.0.1:9192".into(),
            backend: "memory".into(),
            session_ttl_ms: 30_000,
            rebuild_window_ms: 10_000,
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_key_prefix: "sb".into(),
            redis_username: String::new(),
            redis_password: Secret::default(),
            redis_password_file: String::new(),
            redis_ca_file: String::new(),
            redis_cert_file: String::new(),
            redis_key_file: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    pub grpc_listen: String,
    pub admin_listen: String,
    /// Event log: `embedded` (durable in-process partitioned log under data_dir) or
    /// `kafka`.
    pub backend: String,
    /// Kafka bootstrap servers for the `kafka` backend, comma-separated.
    pub kafka_brokers: String,
    /// Kafka topic of the message log (created with `partitions` if absent).
    pub kafka_topic: String,
    /// Kafka consumer group of the routing instances (partition owners).
    pub kafka_group: String,
    /// Replication factor used when the topic is created.
    pub kafka_replication_factor: u32,
    /// Kafka `security.protocol`: `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub kafka_security_protocol: String,
    /// SASL mechanism with `sasl_*`: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub kafka_sasl_mechanism: String,
    /// SASL user name.
    pub kafka_sasl_username: String,
    /// SASL password (prefer `kafka_sasl_password_file`).
    pub kafka_sasl_password: Secret,
    /// File holding the SASL password (trailing newline ignored).
    pub kafka_sasl_password_file: String,
    /// PEM file of the CA(s) that sign the broker certificates (`ssl`, `sasl_ssl`);
    /// empty = the system's trust store.
    pub kafka_ssl_ca_file: String,
    /// PEM client certificate for mutual TLS (with `kafka_ssl_key_file`).
    pub kafka_ssl_cert_file: String,
    /// PEM private key of `kafka_ssl_cert_file`.
    pub kafka_ssl_key_file: String,
    /// Number of log partitions (conversations are hashed onto them).
    pub partitions: u32,
    /// Largest message body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Sustained messages per second allowed per user.
    pub send_rate_per_user: u32,
    /// Burst of messages allowed per user above the sustained rate.
    pub send_burst_per_user: u32,
    /// How long Send waits for the sequence number before acking without it, in ms.
    pub sequence_wait_ms: u64,
    /// Most events in one Deliver call to a gateway.
    pub deliver_batch: usize,
    /// Events queued per gateway before the partition owner waits.
    pub deliver_queue: usize,
    /// Timeout of one outgoing webhook POST (connect, send and response), in ms.
    pub webhook_timeout_ms: u64,
    /// Let webhooks go to loopback, private, link-local and other non-public
    /// addresses (off: only globally routable addresses are connected to).
    pub webhook_allow_private_networks: bool,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            grpc_listen: "127.0.0.1:50053".into(),
            admin_listen: "127.0.0.1:9193".into(),
            backend: "embedded".into(),
            kafka_brokers: "127.0.0.1:9092".into(),
            kafka_topic: "switchboard.messages".into(),
            kafka_group: "switchboard-routing".into(),
            kafka_replication_factor: 1,
            kafka_security_protocol: "plaintext".into(),
            kafka_sasl_mechanism: String::new(),
            kafka_sasl_username: String::new(),
            kafka_sasl_password: Secret::default(),
            kafka_sasl_password_file: String::new(),
            kafka_ssl_ca_file: String::new(),
            kafka_ssl_cert_file: String::new(),
            kafka_ssl_key_file: String::new(),
            partitions: 16,
            max_body_bytes: 64 * 1024,
            send_rate_per_user: 50,
            send_burst_per_user: 100,
            sequence_wait_ms: 3_000,
            deliver_batch: 256,
            deliver_queue: 4_096,
            webhook_timeout_ms: 10_000,
            webhook_allow_private_networks: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub grpc_listen: String,
    pub admin_listen: String,
    /// History store: `sqlite` or `scylla` (ScyllaDB or Cassandra over CQL).
    pub backend: String,
    /// CQL contact points for the `scylla` backend, comma-separated `host:port`.
    pub scylla_nodes: String,
    /// Keyspace of the `scylla` backend.
    pub scylla_keyspace: String,
    /// Replication factor used when the keyspace is created.
    pub scylla_replication_factor: u32,
    /// Local datacenter name: NetworkTopologyStrategy and DC-aware routing when set.
    pub scylla_datacenter: String,
    /// CQL user name; empty = no authentication.
    pub scylla_username: String,
    /// CQL password (prefer `scylla_password_file`).
    pub scylla_password: Secret,
    /// File holding the CQL password (trailing newline ignored).
    pub scylla_password_file: String,
    /// Connect to the CQL nodes over TLS.
    pub scylla_tls: bool,
    /// PEM file of the CA(s) that sign the node certificates (with `scylla_tls`);
    /// empty = the system's trust store.
    pub scylla_ca_file: String,
    /// PEM client certificate for mutual TLS (with `scylla_key_file`).
    pub scylla_cert_file: String,
    /// PEM private key of `scylla_cert_file`.
    pub scylla_key_file: String,
    /// Run pending schema migrations when the storage service starts.
    pub migrate_on_start: bool,
    /// SQLite database file; empty = `<data_dir>/storage.sqlite3`.
    pub sqlite_path: String,
    /// How long a (sender, client_msg_id) pair stays deduplicated, in seconds.
    pub dedupe_window_secs: u64,
    /// Largest history page, in messages.
    pub max_page: u32,
    /// Byte budget of every answer that carries messages (history, sync, thread): a
    /// page stops before it and says there is more. Well under the 4 MiB a gRPC
    /// peer accepts by default; at least one largest message plus its fields.
    pub max_answer_bytes: usize,
    /// Most conversations (direct and groups) one user may create.
    pub max_conversations_created: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            grpc_listen: "127.0.0.1:50054".into(),
            admin_listen: "127.0.0.1:9194".into(),
            backend: "sqlite".into(),
            scylla_nodes: "127.0.0.1:9042".into(),
            scylla_keyspace: "switchboard".into(),
            scylla_replication_factor: 1,
            scylla_datacenter: String::new(),
            scylla_username: String::new(),
            scylla_password: Secret::default(),
            scylla_password_file: String::new(),
            scylla_tls: false,
            scylla_ca_file: String::new(),
            scylla_cert_file: String::new(),
            scylla_key_file: String::new(),
            migrate_on_start: true,
            sqlite_path: String::new(),
            dedupe_window_secs: 24 * 3600,
            max_page: 200,
            max_answer_bytes: 1024 * 1024,
            max_conversations_created: 1000,
        }
    }
}

impl Config {
    /// Load from an optional TOML file, then apply `SWITCHBOARD_` overrides from `env`,
    /// then validate.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match file {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        Config::from_toml_and_env(&text, env)
    }

    /// Like [`Config::load`], but starting from `base` (TOML) instead of the built-in
    /// defaults alone: the file and the environment still override it. Standalone uses
    /// this to turn `dev_mode` on (on loopback) when it generates the token secret itself.
    pub fn load_with_base(
        base: &str,
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match file {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        let mut table: toml::Table =
            toml::from_str(base).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let over: toml::Table =
            toml::from_str(&text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        merge(&mut table, over);
        Config::from_table_and_env(table, env)
    }

    /// Parse TOML text, apply overrides, validate.
    pub fn from_toml_and_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        Config::from_table_and_env(table, env)
    }

    fn from_table_and_env(
        mut table: toml::Table,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        for (key, value) in env {
            let Some(rest) = key.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if key == CONFIG_FILE_ENV {
                continue;
            }
            apply_override(&mut table, rest, &value)?;
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Check every setting that could fail later, so nothing fails after a port is bound.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn addr(key: &'static str, v: &str) -> Result<(), ConfigError> {
            v.parse::<SocketAddr>()
                .map(|_| ())
                .map_err(|e| ConfigError::Invalid {
                    key,
                    reason: format!("`{v}` is not a socket address: {e}"),
                })
        }
        fn url(key: &'static str, v: &str) -> Result<(), ConfigError> {
            if v.starts_with("http://") || v.starts_with("https://") {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    key,
                    reason: format!("`{v}` is not an http(s) URL"),
                })
            }
        }
        fn positive(key: &'static str, v: u64) -> Result<(), ConfigError> {
            if v == 0 {
                Err(ConfigError::Invalid {
                    key,
                    reason: "must be greater than 0".into(),
                })
            } else {
                Ok(())
            }
        }
        fn one_of(key: &'static str, v: &str, allowed: &[&str]) -> Result<(), ConfigError> {
            if allowed.contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    key,
                    reason: format!("`{v}` is not one of {allowed:?}"),
                })
            }
        }
        one_of("log.format", &self.log.format, &["text", "json"])?;
        one_of(
            "embedded_durability",
            &self.embedded_durability,
            &["process", "machine"],
        )?;
        let t = &self.telemetry;
        let https = t.otlp_endpoint.starts_with("https://");
        if !t.otlp_endpoint.is_empty() && !https && !t.otlp_endpoint.starts_with("http://") {
            return Err(ConfigError::Invalid {
                key: "telemetry.otlp_endpoint",
                reason: format!("`{}` is not an http:// or https:// URL", t.otlp_endpoint),
            });
        }
        tls_files(
            https,
            "an https:// telemetry.otlp_endpoint",
            [
                ("telemetry.otlp_ca_file", &t.otlp_ca_file),
                ("telemetry.otlp_cert_file", &t.otlp_cert_file),
                ("telemetry.otlp_key_file", &t.otlp_key_file),
            ],
        )?;
        secret_source(
            "telemetry.otlp_headers",
            "telemetry.otlp_headers_file",
            t.otlp_headers.expose(),
            &t.otlp_headers_file,
        )?;
        if let Err(reason) = parse_metadata_pairs(t.otlp_headers.expose()) {
            return Err(ConfigError::Invalid {
                key: "telemetry.otlp_headers",
                reason,
            });
        }
        let prefix_ok = !t.service_name_prefix.is_empty()
            && t.service_name_prefix.len() <= 64
            && t.service_name_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !prefix_ok {
            return Err(ConfigError::Invalid {
                key: "telemetry.service_name_prefix",
                reason: "letters, digits, `-`, `_` and `.` only, 1 to 64".into(),
            });
        }
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return Err(ConfigError::Invalid {
                key: "telemetry.sample_ratio",
                reason: format!("{} is not between 0.0 and 1.0", t.sample_ratio),
            });
        }
        url("cluster.presence_url", &self.cluster.presence_url)?;
        url("cluster.routing_url", &self.cluster.routing_url)?;
        url("cluster.storage_url", &self.cluster.storage_url)?;
        positive("cluster.rpc_timeout_ms", self.cluster.rpc_timeout_ms)?;
        positive(
            "cluster.connect_timeout_ms",
            self.cluster.connect_timeout_ms,
        )?;
        secret_source(
            "cluster.credential",
            "cluster.credential_file",
            &self.cluster.credential,
            &self.cluster.credential_file,
        )?;
        if !self.cluster.credential.is_empty() {
            check_credential("cluster.credential", &self.cluster.credential)?;
        }
        // Below 64 KiB even a page of small messages would not fit.
        if self.cluster.max_message_bytes < 64 * 1024 {
            return Err(ConfigError::Invalid {
                key: "cluster.max_message_bytes",
                reason: "must be at least 65536".into(),
            });
        }
        let a = &self.auth;
        if !a.hs256_secret.is_empty() && a.hs256_secret.len() < MIN_SECRET_BYTES {
            return Err(ConfigError::Invalid {
                key: "auth.hs256_secret",
                reason: format!(
                    "is {} bytes; an HS256 secret must be at least {MIN_SECRET_BYTES} bytes \
                     (for example `openssl rand -base64 48`)",
                    a.hs256_secret.len()
                ),
            });
        }

        let g = &self.gateway;
        addr("gateway.listen", &g.listen)?;
        if self.dev_mode && !self.dev_mode_allow_remote && !is_loopback(&g.listen) {
            return Err(ConfigError::Invalid {
                key: "dev_mode",
                reason: format!(
                    "serves /v1/dev/token (a token for any user, without credentials) on \
                     gateway.listen `{}`, which is not a loopback address; listen on \
                     127.0.0.1, turn dev_mode off, or set dev_mode_allow_remote = true",
                    g.listen
                ),
            });
        }
        addr("gateway.grpc_listen", &g.grpc_listen)?;
        addr("gateway.admin_listen", &g.admin_listen)?;
        if !g.advertise_url.is_empty() {
            url("gateway.advertise_url", &g.advertise_url)?;
        }
        positive("gateway.max_connections", g.max_connections as u64)?;
        positive("gateway.read_buffer_bytes", g.read_buffer_bytes as u64)?;
        positive("gateway.write_buffer_bytes", g.write_buffer_bytes as u64)?;
        positive("gateway.outbound_queue", g.outbound_queue as u64)?;
        positive(
            "gateway.outbound_queue_bytes",
            g.outbound_queue_bytes as u64,
        )?;
        positive("gateway.heartbeat_interval_ms", g.heartbeat_interval_ms)?;
        positive("gateway.presence_probe_ms", g.presence_probe_ms)?;
        positive("gateway.client_idle_timeout_ms", g.client_idle_timeout_ms)?;
        positive("gateway.requests_per_second", g.requests_per_second as u64)?;
        positive("gateway.max_violations", g.max_violations as u64)?;
        positive(
            "gateway.max_connections_per_user",
            g.max_connections_per_user as u64,
        )?;
        positive("gateway.header_read_timeout_ms", g.header_read_timeout_ms)?;
        positive(
            "gateway.max_pending_upgrades",
            g.max_pending_upgrades as u64,
        )?;
        positive("gateway.typing_expiry_ms", g.typing_expiry_ms)?;
        if g.typing_expiry_ms > u64::from(u32::MAX) {
            return Err(ConfigError::Invalid {
                key: "gateway.typing_expiry_ms",
                reason: format!("must be at most {}", u32::MAX),
            });
        }

        let p = &self.presence;
        addr("presence.grpc_listen", &p.grpc_listen)?;
        addr("presence.admin_listen", &p.admin_listen)?;
        one_of("presence.backend", &p.backend, &["memory", "redis"])?;
        if p.backend == "redis" {
            let tls = p.redis_url.starts_with("rediss://");
            if !tls && !p.redis_url.starts_with("redis://") {
                return Err(ConfigError::Invalid {
                    key: "presence.redis_url",
                    reason: format!("`{}` is not a redis:// or rediss:// URL", p.redis_url),
                });
            }
            secret_source(
                "presence.redis_password",
                "presence.redis_password_file",
                &p.redis_password,
                &p.redis_password_file,
            )?;
            tls_files(
                tls,
                "a rediss:// presence.redis_url",
                [
                    ("presence.redis_ca_file", &p.redis_ca_file),
                    ("presence.redis_cert_file", &p.redis_cert_file),
                    ("presence.redis_key_file", &p.redis_key_file),
                ],
            )?;
        }
        positive("presence.session_ttl_ms", p.session_ttl_ms)?;
        positive("presence.rebuild_window_ms", p.rebuild_window_ms)?;
        if g.heartbeat_interval_ms >= p.session_ttl_ms {
            return Err(ConfigError::Invalid {
                key: "gateway.heartbeat_interval_ms",
                reason: format!(
                    "must be shorter than presence.session_ttl_ms ({})",
                    p.session_ttl_ms
                ),
            });
        }

        let r = &self.routing;
        addr("routing.grpc_listen", &r.grpc_listen)?;
        addr("routing.admin_listen", &r.admin_listen)?;
        one_of("routing.backend", &r.backend, &["embedded", "kafka"])?;
        if r.backend == "kafka" {
            if r.kafka_brokers.trim().is_empty() {
                return Err(ConfigError::Invalid {
                    key: "routing.kafka_brokers",
                    reason: "must name at least one broker".into(),
                });
            }
            if r.kafka_topic.is_empty() || r.kafka_group.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "routing.kafka_topic",
                    reason: "kafka_topic and kafka_group must be set".into(),
                });
            }
            positive(
                "routing.kafka_replication_factor",
                r.kafka_replication_factor as u64,
            )?;
            kafka_security(r)?;
        }
        positive("routing.partitions", r.partitions as u64)?;
        positive("routing.max_body_bytes", r.max_body_bytes as u64)?;
        positive("routing.send_rate_per_user", r.send_rate_per_user as u64)?;
        positive("routing.deliver_batch", r.deliver_batch as u64)?;
        positive("routing.deliver_queue", r.deliver_queue as u64)?;
        positive("routing.webhook_timeout_ms", r.webhook_timeout_ms)?;
        // A body must fit in a frame with room for the envelope.
        if r.max_body_bytes + 1024 > g.max_frame_bytes {
            return Err(ConfigError::Invalid {
                key: "routing.max_body_bytes",
                reason: format!(
                    "must be at least 1024 bytes below gateway.max_frame_bytes ({})",
                    g.max_frame_bytes
                ),
            });
        }

        let s = &self.storage;
        addr("storage.grpc_listen", &s.grpc_listen)?;
        addr("storage.admin_listen", &s.admin_listen)?;
        one_of("storage.backend", &s.backend, &["sqlite", "scylla"])?;
        if s.backend == "scylla" {
            if s.scylla_nodes.trim().is_empty() {
                return Err(ConfigError::Invalid {
                    key: "storage.scylla_nodes",
                    reason: "must name at least one node".into(),
                });
            }
            let valid_keyspace = !s.scylla_keyspace.is_empty()
                && s.scylla_keyspace.len() <= 48
                && s.scylla_keyspace
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_keyspace {
                return Err(ConfigError::Invalid {
                    key: "storage.scylla_keyspace",
                    reason: "letters, digits and _ only, at most 48".into(),
                });
            }
            positive(
                "storage.scylla_replication_factor",
                s.scylla_replication_factor as u64,
            )?;
            secret_source(
                "storage.scylla_password",
                "storage.scylla_password_file",
                &s.scylla_password,
                &s.scylla_password_file,
            )?;
            let has_password = !s.scylla_password.is_empty() || !s.scylla_password_file.is_empty();
            if has_password && s.scylla_username.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "storage.scylla_username",
                    reason: "must be set when a CQL password is".into(),
                });
            }
            tls_files(
                s.scylla_tls,
                "storage.scylla_tls = true",
                [
                    ("storage.scylla_ca_file", &s.scylla_ca_file),
                    ("storage.scylla_cert_file", &s.scylla_cert_file),
                    ("storage.scylla_key_file", &s.scylla_key_file),
                ],
            )?;
        }
        positive("storage.dedupe_window_secs", s.dedupe_window_secs)?;
        if s.max_answer_bytes < self.routing.max_body_bytes + MESSAGE_FIELDS_BYTES
            || s.max_answer_bytes > MAX_ANSWER_BYTES
        {
            return Err(ConfigError::Invalid {
                key: "storage.max_answer_bytes",
                reason: format!(
                    "must be between routing.max_body_bytes + {MESSAGE_FIELDS_BYTES} and \
                     {MAX_ANSWER_BYTES}"
                ),
            });
        }
        positive(
            "storage.max_conversations_created",
            u64::from(s.max_conversations_created),
        )?;
        if s.max_page == 0 || s.max_page > 200 {
            return Err(ConfigError::Invalid {
                key: "storage.max_page",
                reason: "must be between 1 and 200".into(),
            });
        }
        Ok(())
    }

    /// Whether every commit of the embedded backends waits for an fsync
    /// (`embedded_durability = "machine"`).
    pub fn embedded_fsync(&self) -> bool {
        self.embedded_durability == "machine"
    }

    /// The SQLite file of the storage service.
    pub fn sqlite_path(&self) -> PathBuf {
        if self.storage.sqlite_path.is_empty() {
            self.data_dir.join("storage.sqlite3")
        } else {
            PathBuf::from(&self.storage.sqlite_path)
        }
    }

    /// The largest JSON (text) frame or HTTP API body the gateway reads:
    /// `gateway.max_frame_bytes`, raised when needed to hold a body of
    /// `routing.max_body_bytes` written entirely in JSON `\u` escapes (six bytes per
    /// body byte, the worst escaping) plus 4 KiB for the other fields. So a body within
    /// its limit always fits its frame; protobuf frames have no escaping and keep
    /// `gateway.max_frame_bytes`.
    pub fn max_json_frame_bytes(&self) -> usize {
        self.gateway.max_frame_bytes.max(
            self.routing
                .max_body_bytes
                .saturating_mul(6)
                .saturating_add(4096),
        )
    }

    /// The URL other services use to reach this gateway.
    pub fn gateway_advertise_url(&self) -> String {
        if !self.gateway.advertise_url.is_empty() {
            return self.gateway.advertise_url.clone();
        }
        match self.gateway.grpc_listen.parse::<SocketAddr>() {
            Ok(a) if a.ip().is_unspecified() => format!("http://127.0.0.1:{}", a.port()),
            Ok(a) => format!("http://{a}"),
            Err(_) => format!("http://{}", self.gateway.grpc_listen),
        }
    }
}

/// Whether a listen address (already checked to parse) is on loopback only.
fn is_loopback(listen: &str) -> bool {
    listen
        .parse::<SocketAddr>()
        .map(|a| a.ip().is_loopback())
        .unwrap_or(false)
}

/// A cluster credential is long enough and fits in gRPC metadata (visible ASCII).
pub fn check_credential(key: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.len() < MIN_SECRET_BYTES {
        return Err(ConfigError::Invalid {
            key,
            reason: format!(
                "is {} bytes; it must be at least {MIN_SECRET_BYTES} \
                 (for example `openssl rand -base64 48`)",
                value.len()
            ),
        });
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::Invalid {
            key,
            reason: "must be visible ASCII characters only (no spaces)".into(),
        });
    }
    Ok(())
}

impl ClusterConfig {
    /// The cluster credential: `credential`, else `credential_file`'s content (read
    /// now, checked like an inline one), else empty.
    pub fn read_credential(&self) -> Result<Secret, ConfigError> {
        let value = read_secret(&self.credential, &self.credential_file).map_err(|e| {
            ConfigError::Invalid {
                key: "cluster.credential_file",
                reason: e.to_string(),
            }
        })?;
        if !value.is_empty() {
            let key = if self.credential.is_empty() {
                "cluster.credential_file"
            } else {
                "cluster.credential"
            };
            check_credential(key, &value)?;
        }
        Ok(Secret::new(value))
    }
}

/// A secret given inline or in a file (e.g. a mounted Kubernetes Secret): the inline
/// value when set, else the file's content without its trailing newline, else empty.
/// [`Config::validate`] has checked that at most one is set and that the file is readable.
pub fn read_secret(inline: &str, file: &str) -> std::io::Result<String> {
    if !inline.is_empty() || file.is_empty() {
        return Ok(inline.to_owned());
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot read {file}: {e}")))?;
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}

/// The setting `key` names a file this process can read.
fn readable_file(key: &'static str, path: &str) -> Result<(), ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid { key, reason };
    let meta =
        std::fs::metadata(path).map_err(|e| invalid(format!("cannot read `{path}`: {e}")))?;
    if !meta.is_file() {
        return Err(invalid(format!("`{path}` is not a file")));
    }
    std::fs::File::open(path).map_err(|e| invalid(format!("cannot read `{path}`: {e}")))?;
    Ok(())
}

/// `key=value` pairs separated by commas (the form of `OTEL_EXPORTER_OTLP_HEADERS`),
/// as gRPC metadata: keys lowercase ASCII letters, digits, `-`, `_` and `.` (and not
/// ending in `-bin`), values visible ASCII or spaces, both trimmed. Empty = none.
pub fn parse_metadata_pairs(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((key, value)) = item.split_once('=') else {
            // Not echoed: it may be a credential missing its key.
            return Err("an entry is not key=value".into());
        };
        let (key, value) = (key.trim().to_ascii_lowercase(), value.trim());
        let key_ok = !key.is_empty()
            && !key.ends_with("-bin")
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !key_ok {
            return Err(format!("`{key}` is not a metadata key"));
        }
        // The value is not echoed: it is often a credential.
        if value.is_empty() || !value.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
            return Err(format!("the value of `{key}` must be visible ASCII"));
        }
        pairs.push((key, value.to_owned()));
    }
    Ok(pairs)
}

/// A secret setting `key` and its file setting `file_key` are not both set; the file
/// is readable.
fn secret_source(
    key: &'static str,
    file_key: &'static str,
    inline: &str,
    file: &str,
) -> Result<(), ConfigError> {
    if !inline.is_empty() && !file.is_empty() {
        return Err(ConfigError::Invalid {
            key,
            reason: format!("set either {key} or {file_key}, not both"),
        });
    }
    if !file.is_empty() {
        readable_file(file_key, file)?;
    }
    Ok(())
}

/// The CA, certificate and key files (in this order) of one TLS connection: used only
/// when `enabled` (`what` says how to enable it), certificate and key together, every
/// one given readable.
fn tls_files(
    enabled: bool,
    what: &str,
    files: [(&'static str, &String); 3],
) -> Result<(), ConfigError> {
    for (key, path) in files {
        if path.is_empty() {
            continue;
        }
        if !enabled {
            return Err(ConfigError::Invalid {
                key,
                reason: format!("is used only with {what}"),
            });
        }
        readable_file(key, path)?;
    }
    let [_, (cert_key, cert), (key_key, key)] = files;
    if cert.is_empty() != key.is_empty() {
        let missing = if cert.is_empty() { cert_key } else { key_key };
        return Err(ConfigError::Invalid {
            key: missing,
            reason: format!(
                "must be set together with {}",
                if cert.is_empty() { key_key } else { cert_key }
            ),
        });
    }
    Ok(())
}

/// The SASL and TLS settings of the Kafka clients agree with the security protocol.
fn kafka_security(r: &RoutingConfig) -> Result<(), ConfigError> {
    const PROTOCOLS: &[&str] = &["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];
    const MECHANISMS: &[&str] = &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];
    let protocol = r.kafka_security_protocol.as_str();
    if !PROTOCOLS.contains(&protocol) {
        return Err(ConfigError::Invalid {
            key: "routing.kafka_security_protocol",
            reason: format!("`{protocol}` is not one of {PROTOCOLS:?}"),
        });
    }
    let sasl = protocol.starts_with("sasl_");
    let has_password = !r.kafka_sasl_password.is_empty() || !r.kafka_sasl_password_file.is_empty();
    if sasl {
        if !MECHANISMS.contains(&r.kafka_sasl_mechanism.as_str()) {
            return Err(ConfigError::Invalid {
                key: "routing.kafka_sasl_mechanism",
                reason: format!(
                    "`{}` is not one of {MECHANISMS:?} (required with security protocol {protocol})",
                    r.kafka_sasl_mechanism
                ),
            });
        }
        if r.kafka_sasl_username.is_empty() {
            return Err(ConfigError::Invalid {
                key: "routing.kafka_sasl_username",
                reason: format!("is required with SASL mechanism {}", r.kafka_sasl_mechanism),
            });
        }
        if !has_password {
            return Err(ConfigError::Invalid {
                key: "routing.kafka_sasl_password",
                reason: format!(
                    "kafka_sasl_password or kafka_sasl_password_file is required with SASL \
                     mechanism {}",
                    r.kafka_sasl_mechanism
                ),
            });
        }
        secret_source(
            "routing.kafka_sasl_password",
            "routing.kafka_sasl_password_file",
            &r.kafka_sasl_password,
            &r.kafka_sasl_password_file,
        )?;
    } else {
        for (key, set) in [
            (
                "routing.kafka_sasl_mechanism",
                !r.kafka_sasl_mechanism.is_empty(),
            ),
            (
                "routing.kafka_sasl_username",
                !r.kafka_sasl_username.is_empty(),
            ),
            ("routing.kafka_sasl_password", has_password),
        ] {
            if set {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!(
                        "is used only with routing.kafka_security_protocol sasl_plaintext or \
                         sasl_ssl (not {protocol})"
                    ),
                });
            }
        }
    }
    tls_files(
        protocol.ends_with("ssl"),
        "routing.kafka_security_protocol ssl or sasl_ssl",
        [
            ("routing.kafka_ssl_ca_file", &r.kafka_ssl_ca_file),
            ("routing.kafka_ssl_cert_file", &r.kafka_ssl_cert_file),
            ("routing.kafka_ssl_key_file", &r.kafka_ssl_key_file),
        ],
    )
}

/// Deep-merge `over` into `base` (tables merge, other values replace).
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

/// Set `rest` (`SECTION__KEY` or `KEY`) in the table to `raw`, parsed as a TOML value
/// when it is one (numbers, booleans, arrays), else taken as a string.
fn apply_override(table: &mut toml::Table, rest: &str, raw: &str) -> Result<(), ConfigError> {
    let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(ConfigError::Parse(format!(
            "bad environment override name {ENV_PREFIX}{rest}"
        )));
    }
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    let (last, sections) = path.split_last().expect("split produces at least one part");
    let mut cursor = table;
    for section in sections {
        let entry = cursor
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cursor = entry.as_table_mut().ok_or_else(|| {
            ConfigError::Parse(format!("{ENV_PREFIX}{rest}: `{section}` is not a section"))
        })?;
    }
    cursor.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
        assert_eq!(
            Config::from_toml_and_env("", env(&[])).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn file_then_env_overrides() {
        let c = Config::from_toml_and_env(
            "[gateway]\nlisten = \"127.0.0.1:9000\"\nmax_connections = 5\n",
            env(&[
                ("SWITCHBOARD_GATEWAY__MAX_CONNECTIONS", "7"),
                ("SWITCHBOARD_DEV_MODE", "true"),
                ("SWITCHBOARD_DATA_DIR", "/tmp/x"),
                ("OTHER_VAR", "ignored"),
                ("SWITCHBOARD_CONFIG", "/etc/switchboard.toml"),
            ]),
        )
        .unwrap();
        assert_eq!(c.gateway.listen, "127.0.0.1:9000");
        assert_eq!(c.gateway.max_connections, 7);
        assert!(c.dev_mode);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn base_is_overridden_by_file_and_env() {
        let dir = tempfile_dir();
        let file = dir.join("c.toml");
        std::fs::write(&file, "[gateway]\nmax_connections = 9\n").unwrap();
        let base = "dev_mode = true\n[gateway]\nlisten = \"127.0.0.1:8080\"\nmax_connections = 3\n\
                    max_violations = 4\n";
        let c = Config::load_with_base(base, Some(&file), env(&[])).unwrap();
        assert!(c.dev_mode);
        assert_eq!(c.gateway.max_connections, 9);
        assert_eq!(c.gateway.max_violations, 4);
        let c =
            Config::load_with_base(base, None, env(&[("SWITCHBOARD_DEV_MODE", "false")])).unwrap();
        assert!(!c.dev_mode);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(Config::from_toml_and_env("[gateway]\nlisen = \"x\"\n", env(&[])).is_err());
        assert!(Config::from_toml_and_env("", env(&[("SWITCHBOARD_GATEWAY__NOPE", "1")])).is_err());
    }

    #[test]
    fn invalid_values_name_the_setting() {
        let e =
            Config::from_toml_and_env("[gateway]\nlisten = \"nowhere\"\n", env(&[])).unwrap_err();
        assert!(e.to_string().contains("gateway.listen"), "{e}");
        let e = Config::from_toml_and_env("[routing]\nmax_body_bytes = 1000000\n", env(&[]))
            .unwrap_err();
        assert!(e.to_string().contains("routing.max_body_bytes"), "{e}");
        let e =
            Config::from_toml_and_env("[presence]\nbackend = \"etcd\"\n", env(&[])).unwrap_err();
        assert!(e.to_string().contains("presence.backend"), "{e}");
    }

    #[test]
    fn telemetry_settings_are_validated() {
        let c = Config::from_toml_and_env(
            "",
            env(&[
                (
                    "SWITCHBOARD_TELEMETRY__OTLP_ENDPOINT",
                    "http://collector:4317",
                ),
                ("SWITCHBOARD_TELEMETRY__SAMPLE_RATIO", "0.25"),
            ]),
        )
        .unwrap();
        assert_eq!(c.telemetry.otlp_endpoint, "http://collector:4317");
        assert_eq!(c.telemetry.sample_ratio, 0.25);
        // https, with a CA, a client certificate and headers.
        let c = Config::from_toml_and_env(
            "[telemetry]\notlp_endpoint = \"https://collector:4317\"\n\
             otlp_ca_file = \"Cargo.toml\"\notlp_cert_file = \"Cargo.toml\"\n\
             otlp_key_file = \"Cargo.toml\"\n\
             otlp_headers = \"Authorization=Bearer abc, x-team = core\"\n",
            env(&[]),
        )
        .unwrap();
        assert_eq!(
            parse_metadata_pairs(c.telemetry.otlp_headers.expose()).unwrap(),
            [
                ("authorization".to_owned(), "Bearer abc".to_owned()),
                ("x-team".to_owned(), "core".to_owned())
            ]
        );
        assert_eq!(parse_metadata_pairs(" , ").unwrap(), []);
        assert!(
            !format!("{c:?}").contains("Bearer abc"),
            "the headers are redacted"
        );
        assert_eq!(c.telemetry.service_name_prefix, "switchboard");
        // An integer is a ratio too.
        let c = Config::from_toml_and_env("[telemetry]\nsample_ratio = 0\n", env(&[])).unwrap();
        assert_eq!(c.telemetry.sample_ratio, 0.0);
        for (toml, key) in [
            (
                "otlp_endpoint = \"collector:4317\"",
                "telemetry.otlp_endpoint",
            ),
            (
                "otlp_endpoint = \"grpcs://collector:4317\"",
                "telemetry.otlp_endpoint",
            ),
            // TLS files only with https, the certificate with its key, files readable.
            (
                "otlp_endpoint = \"http://c:4317\"\notlp_ca_file = \"Cargo.toml\"",
                "telemetry.otlp_ca_file",
            ),
            (
                "otlp_endpoint = \"https://c:4317\"\notlp_cert_file = \"Cargo.toml\"",
                "telemetry.otlp_key_file",
            ),
            (
                "otlp_endpoint = \"https://c:4317\"\notlp_ca_file = \"/nonexistent/ca.pem\"",
                "telemetry.otlp_ca_file",
            ),
            // Headers: key=value pairs of gRPC metadata, inline or from a file.
            ("otlp_headers = \"authorization\"", "telemetry.otlp_headers"),
            ("otlp_headers = \"bad key=1\"", "telemetry.otlp_headers"),
            ("otlp_headers = \"x-bin=1\"", "telemetry.otlp_headers"),
            ("otlp_headers = \"k=caf\\u00e9\"", "telemetry.otlp_headers"),
            (
                "otlp_headers = \"a=1\"\notlp_headers_file = \"Cargo.toml\"",
                "telemetry.otlp_headers",
            ),
            ("sample_ratio = 1.5", "telemetry.sample_ratio"),
            ("sample_ratio = -0.1", "telemetry.sample_ratio"),
            ("sample_ratio = nan", "telemetry.sample_ratio"),
            (
                "service_name_prefix = \"\"",
                "telemetry.service_name_prefix",
            ),
            (
                "service_name_prefix = \"a b\"",
                "telemetry.service_name_prefix",
            ),
        ] {
            let e =
                Config::from_toml_and_env(&format!("[telemetry]\n{toml}\n"), env(&[])).unwrap_err();
            assert!(e.to_string().contains(key), "{toml}: {e}");
        }
    }

    #[test]
    fn backend_tls_and_credentials_are_validated() {
        // Not under tempfile_dir(): another test removes that one.
        let dir = std::env::temp_dir().join(format!("sb-config-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "pem").unwrap();
        let pw = dir.join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let (ca, pw) = (ca.display().to_string(), pw.display().to_string());
        let missing = dir.join("missing.pem").display().to_string();
        let ok = |toml: &str| {
            Config::from_toml_and_env(toml, env(&[])).unwrap_or_else(|e| panic!("{toml}: {e}"))
        };
        let refused = |toml: &str, key: &str, words: &str| {
            let e = Config::from_toml_and_env(toml, env(&[]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key) && e.contains(words), "{toml}: {e}");
        };

        let c = ok(&format!(
            "[presence]\nbackend = \"redis\"\nredis_url = \"rediss://r:6380\"\n\
             redis_ca_file = \"{ca}\"\nredis_password_file = \"{pw}\"\n"
        ));
        assert_eq!(
            read_secret(&c.presence.redis_password, &c.presence.redis_password_file).unwrap(),
            "s3cret"
        );
        refused(
            &format!("[presence]\nbackend = \"redis\"\nredis_url = \"rediss://r\"\nredis_ca_file = \"{missing}\"\n"),
            "presence.redis_ca_file",
            "cannot read",
        );
        refused(
            &format!("[presence]\nbackend = \"redis\"\nredis_ca_file = \"{ca}\"\n"),
            "presence.redis_ca_file",
            "rediss://",
        );
        refused(
            &format!("[presence]\nbackend = \"redis\"\nredis_url = \"rediss://r\"\nredis_cert_file = \"{ca}\"\n"),
            "presence.redis_key_file",
            "together",
        );
        refused(
            &format!("[presence]\nbackend = \"redis\"\nredis_password = \"x\"\nredis_password_file = \"{pw}\"\n"),
            "presence.redis_password",
            "not both",
        );

        let kafka = "[routing]\nbackend = \"kafka\"\n";
        ok(&format!(
            "{kafka}kafka_security_protocol = \"sasl_ssl\"\nkafka_sasl_mechanism = \"SCRAM-SHA-512\"\n\
             kafka_sasl_username = \"u\"\nkafka_sasl_password_file = \"{pw}\"\nkafka_ssl_ca_file = \"{ca}\"\n"
        ));
        ok(&format!("{kafka}kafka_security_protocol = \"ssl\"\n"));
        refused(
            &format!("{kafka}kafka_security_protocol = \"tls\"\n"),
            "routing.kafka_security_protocol",
            "not one of",
        );
        refused(
            &format!("{kafka}kafka_security_protocol = \"sasl_ssl\"\nkafka_sasl_mechanism = \"GSSAPI\"\n"),
            "routing.kafka_sasl_mechanism",
            "not one of",
        );
        refused(
            &format!("{kafka}kafka_security_protocol = \"sasl_plaintext\"\nkafka_sasl_mechanism = \"PLAIN\"\n"),
            "routing.kafka_sasl_username",
            "required",
        );
        refused(
            &format!("{kafka}kafka_security_protocol = \"sasl_plaintext\"\nkafka_sasl_mechanism = \"PLAIN\"\nkafka_sasl_username = \"u\"\n"),
            "routing.kafka_sasl_password",
            "required",
        );
        refused(
            &format!("{kafka}kafka_sasl_mechanism = \"PLAIN\"\n"),
            "routing.kafka_sasl_mechanism",
            "sasl_ssl",
        );
        refused(
            &format!("{kafka}kafka_ssl_ca_file = \"{ca}\"\n"),
            "routing.kafka_ssl_ca_file",
            "ssl",
        );
        refused(
            &format!("{kafka}kafka_security_protocol = \"sasl_ssl\"\nkafka_sasl_mechanism = \"PLAIN\"\nkafka_sasl_username = \"u\"\nkafka_sasl_password_file = \"{missing}\"\n"),
            "routing.kafka_sasl_password_file",
            "cannot read",
        );

        let scylla = "[storage]\nbackend = \"scylla\"\n";
        ok(&format!(
            "{scylla}scylla_tls = true\nscylla_ca_file = \"{ca}\"\nscylla_username = \"u\"\nscylla_password_file = \"{pw}\"\n"
        ));
        refused(
            &format!("{scylla}scylla_ca_file = \"{ca}\"\n"),
            "storage.scylla_ca_file",
            "scylla_tls",
        );
        refused(
            &format!("{scylla}scylla_password = \"p\"\n"),
            "storage.scylla_username",
            "must be set",
        );
        refused(
            &format!("{scylla}scylla_tls = true\nscylla_key_file = \"{ca}\"\n"),
            "storage.scylla_cert_file",
            "together",
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn printed_configuration_shows_no_secret() {
        let secrets = [
            (
                "SWITCHBOARD_AUTH__HS256_SECRET",
                "hs256-secret-value-0123456789abcdef",
            ),
            (
                "SWITCHBOARD_CLUSTER__CREDENTIAL",
                "cluster-credential-0123456789abcdef",
            ),
            (
                "SWITCHBOARD_PRESENCE__REDIS_PASSWORD",
                "redis-password-value",
            ),
            (
                "SWITCHBOARD_ROUTING__KAFKA_SASL_PASSWORD",
                "kafka-password-value",
            ),
            (
                "SWITCHBOARD_STORAGE__SCYLLA_PASSWORD",
                "scylla-password-value",
            ),
        ];
        let mut vars = env(&secrets);
        vars.extend(env(&[
            (
                "SWITCHBOARD_PRESENCE__REDIS_URL",
                "redis://u:redis-url-password@r:6379",
            ),
            (
                "SWITCHBOARD_ROUTING__KAFKA_SECURITY_PROTOCOL",
                "sasl_plaintext",
            ),
            ("SWITCHBOARD_ROUTING__KAFKA_SASL_MECHANISM", "PLAIN"),
            ("SWITCHBOARD_ROUTING__KAFKA_SASL_USERNAME", "u"),
            ("SWITCHBOARD_STORAGE__SCYLLA_USERNAME", "u"),
        ]));
        let c = Config::from_toml_and_env(
            "[presence]\nbackend = \"redis\"\n[routing]\nbackend = \"kafka\"\n\
             [storage]\nbackend = \"scylla\"\n",
            vars,
        )
        .unwrap();
        assert_eq!(
            c.routing.kafka_sasl_password.expose(),
            "kafka-password-value"
        );
        assert_eq!(
            c.presence.redis_url.expose(),
            "redis://u:redis-url-password@r:6379"
        );
        for printed in [format!("{c:?}"), format!("{c:#?}")] {
            for (_, value) in secrets {
                assert!(!printed.contains(value), "{value} printed");
            }
            assert!(!printed.contains("redis-url-password"));
            assert!(printed.contains(REDACTED));
        }
    }

    #[test]
    fn short_hs256_secrets_are_refused() {
        let e = Config::from_toml_and_env("[auth]\nhs256_secret = \"short-secret\"\n", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("auth.hs256_secret") && e.contains("at least 32"),
            "{e}"
        );
        let e = Config::from_toml_and_env(
            "",
            env(&[("SWITCHBOARD_AUTH__HS256_SECRET", &"x".repeat(31))]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("auth.hs256_secret"), "{e}");
        let c = Config::from_toml_and_env(
            "",
            env(&[("SWITCHBOARD_AUTH__HS256_SECRET", &"x".repeat(32))]),
        )
        .unwrap();
        assert_eq!(c.auth.hs256_secret.len(), 32);
    }

    #[test]
    fn cluster_credentials_are_checked() {
        let dir = std::env::temp_dir().join(format!("sb-config-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = "c".repeat(40);
        let file = dir.join("credential");
        std::fs::write(&file, format!("{good}\n")).unwrap();
        let short = dir.join("short");
        std::fs::write(&short, "too-short\n").unwrap();
        let from_file = |path: &Path| {
            Config::from_toml_and_env(
                "",
                env(&[(
                    "SWITCHBOARD_CLUSTER__CREDENTIAL_FILE",
                    &path.display().to_string(),
                )]),
            )
            .unwrap()
            .cluster
            .read_credential()
        };
        assert_eq!(from_file(&file).unwrap().expose(), good);
        let e = from_file(&short).unwrap_err().to_string();
        assert!(
            e.contains("cluster.credential_file") && e.contains("at least 32"),
            "{e}"
        );
        let inline = |value: &str| {
            Config::from_toml_and_env("", env(&[("SWITCHBOARD_CLUSTER__CREDENTIAL", value)]))
        };
        assert_eq!(
            inline(&good)
                .unwrap()
                .cluster
                .read_credential()
                .unwrap()
                .expose(),
            good
        );
        let e = inline("short").unwrap_err().to_string();
        assert!(
            e.contains("cluster.credential") && e.contains("at least 32"),
            "{e}"
        );
        let e = inline(&format!("{good} with spaces"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("visible ASCII"), "{e}");
        assert!(Config::default()
            .cluster
            .read_credential()
            .unwrap()
            .is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn dev_mode_beyond_loopback_needs_to_be_forced() {
        let e = Config::from_toml_and_env(
            "dev_mode = true\n[gateway]\nlisten = \"0.0.0.0:8080\"\n",
            env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("dev_mode") && e.contains("loopback"), "{e}");
        Config::from_toml_and_env(
            "dev_mode = true\n[gateway]\nlisten = \"127.0.0.1:8080\"\n",
            env(&[]),
        )
        .unwrap();
        Config::from_toml_and_env(
            "dev_mode = true\ndev_mode_allow_remote = true\n[gateway]\nlisten = \"0.0.0.0:8080\"\n",
            env(&[]),
        )
        .unwrap();
    }

    #[test]
    fn advertise_url_is_derived_from_grpc_listen() {
        let mut c = Config::default();
        c.gateway.grpc_listen = "0.0.0.0:6000".into();
        assert_eq!(c.gateway_advertise_url(), "http://127.0.0.1:6000");
        c.gateway.advertise_url = "http://gw-1:6000".into();
        assert_eq!(c.gateway_advertise_url(), "http://gw-1:6000");
    }
}
