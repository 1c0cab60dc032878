//! The meaning of every setting, for `switchboard config defaults` and the docs.
//! A test checks that this list and the [`Config`](crate::Config) struct agree.

use crate::Config;

/// Every setting's dotted key and meaning.
pub const SETTINGS: &[(&str, &str)] = &[
    ("data_dir", "directory for embedded backends' data and the generated development secret"),
    ("dev_mode", "serve the chat page and /v1/dev/token, which mints a token for any user (standalone turns it on, on loopback, only with the secret it generates)"),
    ("dev_mode_allow_remote", "allow dev_mode with gateway.listen beyond loopback (anyone reaching it can mint tokens for any user)"),
    ("embedded_durability", "what a commit of the embedded event log and SQLite history store survives: process (a crash of any process, kill -9 included) or machine (also a power loss: an fsync per commit)"),
    ("log.format", "log format: text or json"),
    ("log.level", "tracing filter, e.g. info or switchboard_gateway=debug,info"),
    ("telemetry.otlp_endpoint", "http:// or https:// URL of an OTLP/gRPC collector that receives spans; empty = no export"),
    ("telemetry.otlp_ca_file", "PEM CA bundle of an https:// collector's certificate; empty = the public web roots built in"),
    ("telemetry.otlp_cert_file", "PEM client certificate for mutual TLS to the collector (with otlp_key_file)"),
    ("telemetry.otlp_key_file", "PEM private key of otlp_cert_file"),
    ("telemetry.otlp_headers", "gRPC metadata sent with every export: key=value pairs separated by commas, e.g. authorization=Bearer abc (prefer otlp_headers_file)"),
    ("telemetry.otlp_headers_file", "file holding telemetry.otlp_headers (e.g. a mounted Secret)"),
    ("telemetry.service_name_prefix", "exported service names are <prefix>-<command>, e.g. switchboard-routing"),
    ("telemetry.sample_ratio", "share of new traces recorded, 0.0 to 1.0 (a trace started upstream keeps its decision)"),
    ("auth.hs256_secret", "HS256 shared secret, at least 32 bytes (prefer hs256_secret_file)"),
    ("auth.hs256_secret_file", "file holding the HS256 secret; standalone generates <data_dir>/jwt-secret when no key is set"),
    ("auth.public_key_file", "PEM public key (RS256 or ES256) that verifies tokens"),
    ("auth.jwks_file", "JWKS file of RS256/ES256 public keys, chosen by the token's kid"),
    ("auth.issuer", "required iss claim; empty = not checked"),
    ("auth.audience", "required aud claim; empty = not checked"),
    ("auth.leeway_secs", "allowed clock skew for exp and nbf, seconds"),
    ("cluster.presence_url", "gRPC URL of the presence service"),
    ("cluster.routing_url", "gRPC URL of the routing service"),
    ("cluster.storage_url", "gRPC URL of the storage service"),
    ("cluster.rpc_timeout_ms", "timeout of one internal gRPC call, ms"),
    ("cluster.connect_timeout_ms", "timeout of opening an internal gRPC connection, ms"),
    ("cluster.credential", "shared credential sent and checked on every internal gRPC call, at least 32 bytes of visible ASCII (prefer credential_file); required by the service commands"),
    ("cluster.credential_file", "file holding the cluster credential (trailing newline ignored)"),
    ("cluster.insecure_no_credential", "run the service commands without a cluster credential: anyone reaching the gRPC ports can read and write all data"),
    ("cluster.max_message_bytes", "largest internal gRPC message sent or received, bytes (at least 65536)"),
    ("gateway.listen", "client listener: WebSocket /v1/connect, /healthz, /readyz, /metrics"),
    ("gateway.grpc_listen", "internal gRPC listener (Deliver, Drain, health)"),
    ("gateway.advertise_url", "URL other services use for this gateway's gRPC; empty = from grpc_listen"),
    ("gateway.admin_listen", "admin listener: /healthz, /readyz, /metrics"),
    ("gateway.max_connections", "maximum concurrent client connections"),
    ("gateway.max_frame_bytes", "largest client frame accepted, bytes"),
    ("gateway.read_buffer_bytes", "WebSocket read buffer per connection, bytes"),
    ("gateway.write_buffer_bytes", "WebSocket write buffer per connection, bytes"),
    ("gateway.outbound_queue", "frames queued per connection before the client counts as slow"),
    ("gateway.outbound_queue_bytes", "encoded bytes queued per connection before the client counts as slow (one larger frame still fits an empty queue)"),
    ("gateway.heartbeat_interval_ms", "interval of the batched presence heartbeat, ms (below presence.session_ttl_ms)"),
    ("gateway.presence_probe_ms", "interval of the cheap presence probe that notices a presence that lost its state or was unreachable (sessions are then registered again), ms"),
    ("gateway.client_idle_timeout_ms", "close a connection silent for this long, ms"),
    ("gateway.drain_deadline_ms", "how long draining waits for clients before closing them, ms"),
    ("gateway.requests_per_second", "sustained requests per second per connection"),
    ("gateway.request_burst", "request burst per connection above the sustained rate"),
    ("gateway.max_violations", "protocol violations tolerated per connection before it is closed"),
    ("gateway.typing_expiry_ms", "typing events tell clients to treat the user as stopped after this long, ms"),
    ("gateway.typing_interval_ms", "least time between forwarded typing=true per session and conversation, ms; 0 = no limit"),
    ("gateway.idle_away_after_ms", "set a session away after this long without a frame other than ping, ms; 0 = never"),
    ("gateway.max_connections_per_user", "most open connections of one user on this gateway (per instance); more get 429 rate_limited"),
    ("gateway.header_read_timeout_ms", "a client must send a complete HTTP request header within this long (also between keep-alive requests), ms"),
    ("gateway.max_pending_upgrades", "most client TCP connections accepted but not yet upgraded to a WebSocket; more are closed at once"),
    ("gateway.max_connections_per_ip", "most open client TCP connections from one IP address; 0 = no limit (raise or disable behind a proxy)"),
    ("presence.grpc_listen", "presence gRPC listener"),
    ("presence.admin_listen", "presence admin listener: /healthz, /readyz, /metrics"),
    ("presence.backend", "session store: memory or redis"),
    ("presence.redis_url", "Redis URL of the redis backend: redis://[user:password@]host:port[/db], rediss:// for TLS"),
    ("presence.redis_key_prefix", "prefix of every Redis key presence writes"),
    ("presence.redis_username", "Redis ACL user name; empty = the URL's (or none)"),
    ("presence.redis_password", "Redis password, overrides the URL's (prefer redis_password_file)"),
    ("presence.redis_password_file", "file holding the Redis password (trailing newline ignored)"),
    ("presence.redis_ca_file", "PEM CA file that signs the Redis server certificate (rediss://); empty = system trust store"),
    ("presence.redis_cert_file", "PEM client certificate for mutual TLS to Redis (with redis_key_file)"),
    ("presence.redis_key_file", "PEM private key of redis_cert_file"),
    ("presence.session_ttl_ms", "a session not heartbeated for this long goes offline, ms"),
    ("presence.rebuild_window_ms", "after the store lost its state, how long routes are marked partial while gateways register again, ms"),
    ("routing.grpc_listen", "routing gRPC listener"),
    ("routing.admin_listen", "routing admin listener: /healthz, /readyz, /metrics"),
    ("routing.backend", "event log: embedded (durable in-process partitioned log under data_dir) or kafka"),
    ("routing.kafka_brokers", "Kafka bootstrap servers of the kafka backend, comma-separated"),
    ("routing.kafka_topic", "Kafka topic of the message log, created with `partitions` partitions if absent"),
    ("routing.kafka_group", "Kafka consumer group of the routing instances (the partition owners)"),
    ("routing.kafka_replication_factor", "replication factor used when the topic is created"),
    ("routing.kafka_security_protocol", "Kafka security protocol: plaintext, ssl, sasl_plaintext or sasl_ssl"),
    ("routing.kafka_sasl_mechanism", "SASL mechanism with sasl_*: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"),
    ("routing.kafka_sasl_username", "SASL user name (required with sasl_*)"),
    ("routing.kafka_sasl_password", "SASL password (prefer kafka_sasl_password_file)"),
    ("routing.kafka_sasl_password_file", "file holding the SASL password (trailing newline ignored)"),
    ("routing.kafka_ssl_ca_file", "PEM CA file that signs the broker certificates (ssl, sasl_ssl); empty = system trust store"),
    ("routing.kafka_ssl_cert_file", "PEM client certificate for mutual TLS to Kafka (with kafka_ssl_key_file)"),
    ("routing.kafka_ssl_key_file", "PEM private key of kafka_ssl_cert_file"),
    ("routing.partitions", "number of log partitions conversations are hashed onto"),
    ("routing.max_body_bytes", "largest message body accepted, bytes"),
    ("routing.send_rate_per_user", "sustained messages per second per user"),
    ("routing.send_burst_per_user", "message burst per user above the sustained rate"),
    ("routing.sequence_wait_ms", "how long send waits for the sequence before acking without it, ms"),
    ("routing.deliver_batch", "most events in one Deliver call to a gateway"),
    ("routing.deliver_queue", "events queued per gateway before the partition owner waits"),
    ("routing.webhook_timeout_ms", "timeout of one outgoing webhook POST (connect, send, response), ms"),
    ("routing.webhook_allow_private_networks", "let webhooks reach loopback, private and link-local addresses (off: public addresses only)"),
    ("storage.grpc_listen", "storage gRPC listener"),
    ("storage.admin_listen", "storage admin listener: /healthz, /readyz, /metrics"),
    ("storage.backend", "history store: sqlite or scylla (ScyllaDB or Cassandra over CQL)"),
    ("storage.scylla_nodes", "CQL contact points of the scylla backend, comma-separated host:port"),
    ("storage.scylla_keyspace", "keyspace of the scylla backend"),
    ("storage.scylla_replication_factor", "replication factor used when the keyspace is created"),
    ("storage.scylla_datacenter", "local datacenter: NetworkTopologyStrategy and DC-aware routing when set"),
    ("storage.scylla_username", "CQL user name; empty = no authentication"),
    ("storage.scylla_password", "CQL password (prefer scylla_password_file)"),
    ("storage.scylla_password_file", "file holding the CQL password (trailing newline ignored)"),
    ("storage.scylla_tls", "connect to the CQL nodes over TLS (certificates must name the nodes' IP addresses)"),
    ("storage.scylla_ca_file", "PEM CA file that signs the node certificates (with scylla_tls); empty = system trust store"),
    ("storage.scylla_cert_file", "PEM client certificate for mutual TLS to the CQL nodes (with scylla_key_file)"),
    ("storage.scylla_key_file", "PEM private key of scylla_cert_file"),
    ("storage.migrate_on_start", "run pending schema migrations when storage starts"),
    ("storage.sqlite_path", "SQLite file; empty = <data_dir>/storage.sqlite3"),
    ("storage.dedupe_window_secs", "how long (sender, client_msg_id) stays deduplicated, seconds"),
    ("storage.max_page", "largest history page, messages (at most 200)"),
    ("storage.max_answer_bytes", "byte budget of a history, sync or thread answer: a page stops before it and says has_more (at most 3 MiB)"),
    ("storage.max_conversations_created", "most conversations one user may create (direct and groups); more are refused with limit_exceeded"),
];

/// The default configuration as commented TOML: every setting, its default and meaning.
pub fn describe_defaults() -> String {
    let value = toml::Value::try_from(Config::default()).expect("the default config serializes");
    let mut out = String::from(
        "# Switchboard configuration: every setting with its default.\n\
         # Override any key with SWITCHBOARD_<SECTION>__<KEY>, e.g. SWITCHBOARD_GATEWAY__LISTEN.\n",
    );
    let mut tables = Vec::new();
    if let toml::Value::Table(root) = value {
        for (key, v) in &root {
            match v {
                toml::Value::Table(t) => tables.push((key.clone(), t.clone())),
                other => push_line(&mut out, key, key, other),
            }
        }
        for (section, table) in tables {
            out.push_str(&format!("\n[{section}]\n"));
            for (key, v) in &table {
                push_line(&mut out, &format!("{section}.{key}"), key, v);
            }
        }
    }
    out
}

fn push_line(out: &mut String, dotted: &str, key: &str, value: &toml::Value) {
    let meaning = SETTINGS
        .iter()
        .find(|(k, _)| *k == dotted)
        .map(|(_, m)| *m)
        .unwrap_or("(undocumented)");
    out.push_str(&format!("# {meaning}\n{key} = {value}\n"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<String> {
        let value = toml::Value::try_from(Config::default()).unwrap();
        let mut keys = Vec::new();
        if let toml::Value::Table(root) = value {
            for (k, v) in root {
                match v {
                    toml::Value::Table(t) => keys.extend(t.keys().map(|s| format!("{k}.{s}"))),
                    _ => keys.push(k),
                }
            }
        }
        keys
    }

    #[test]
    fn every_setting_is_documented_and_every_documented_setting_exists() {
        let keys = keys();
        for k in &keys {
            assert!(
                SETTINGS.iter().any(|(s, _)| s == k),
                "undocumented setting {k}"
            );
        }
        for (s, _) in SETTINGS {
            assert!(
                keys.iter().any(|k| k == s),
                "documented setting {s} does not exist"
            );
        }
    }

    #[test]
    fn described_defaults_parse_back_to_the_defaults() {
        let text = describe_defaults();
        assert!(!text.contains("(undocumented)"));
        let parsed = Config::from_toml_and_env(&text, Vec::new()).unwrap();
        assert_eq!(parsed, Config::default());
    }
}
