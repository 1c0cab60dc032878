//! How the Kafka clients authenticate and encrypt: librdkafka's `security.protocol`,
//! SASL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) and SSL properties, from the
//! `routing.kafka_*` settings. TLS and SCRAM use the system's OpenSSL.

use std::fmt;

use rdkafka::config::ClientConfig;
use switchboard_config::RoutingConfig;

/// The security settings of every Kafka client of the log; empty strings are unset.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaSecurity {
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`; empty = plaintext.
    pub protocol: String,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (with `sasl_*`).
    pub sasl_mechanism: String,
    pub sasl_username: String,
    /// The password; empty = `sasl_password_file`'s, read by [`KafkaSecurity::resolve`].
    pub sasl_password: String,
    pub sasl_password_file: String,
    /// PEM CA bundle verifying the brokers; empty = the system's trust store.
    pub ssl_ca_file: String,
    /// PEM client certificate and key for mutual TLS.
    pub ssl_cert_file: String,
    pub ssl_key_file: String,
}

impl fmt::Debug for KafkaSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSecurity")
            .field("protocol", &self.protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field(
                "sasl_password",
                &(!self.sasl_password.is_empty()).then_some("<redacted>"),
            )
            .field("sasl_password_file", &self.sasl_password_file)
            .field("ssl_ca_file", &self.ssl_ca_file)
            .field("ssl_cert_file", &self.ssl_cert_file)
            .field("ssl_key_file", &self.ssl_key_file)
            .finish()
    }
}

impl KafkaSecurity {
    /// The `routing.kafka_security_protocol`, `kafka_sasl_*` and `kafka_ssl_*` settings.
    pub fn from_config(r: &RoutingConfig) -> KafkaSecurity {
        KafkaSecurity {
            protocol: r.kafka_security_protocol.clone(),
            sasl_mechanism: r.kafka_sasl_mechanism.clone(),
            sasl_username: r.kafka_sasl_username.clone(),
            sasl_password: r.kafka_sasl_password.expose().to_owned(),
            sasl_password_file: r.kafka_sasl_password_file.clone(),
            ssl_ca_file: r.kafka_ssl_ca_file.clone(),
            ssl_cert_file: r.kafka_ssl_cert_file.clone(),
            ssl_key_file: r.kafka_ssl_key_file.clone(),
        }
    }

    /// Read the password file (once, when the log opens) into `sasl_password`.
    pub fn resolve(&mut self) -> Result<(), String> {
        if self.sasl_password.is_empty() && !self.sasl_password_file.is_empty() {
            self.sasl_password = switchboard_config::read_secret("", &self.sasl_password_file)
                .map_err(|e| format!("routing.kafka_sasl_password_file: {e}"))?;
        }
        Ok(())
    }

    /// Set the client properties (after [`KafkaSecurity::resolve`]).
    pub(crate) fn apply(&self, c: &mut ClientConfig) {
        if self.protocol.is_empty() || self.protocol == "plaintext" {
            return;
        }
        c.set("security.protocol", &self.protocol);
        if self.protocol.starts_with("sasl_") {
            c.set("sasl.mechanisms", &self.sasl_mechanism)
                .set("sasl.username", &self.sasl_username)
                .set("sasl.password", &self.sasl_password);
        }
        if self.protocol.ends_with("ssl") {
            // Brokers are verified against their names or addresses (librdkafka's
            // default `ssl.endpoint.identification.algorithm=https`).
            for (key, path) in [
                ("ssl.ca.location", &self.ssl_ca_file),
                ("ssl.certificate.location", &self.ssl_cert_file),
                ("ssl.key.location", &self.ssl_key_file),
            ] {
                if !path.is_empty() {
                    c.set(key, path);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against the SASL_SSL listener of the local broker (`deploy/local/up.sh kafka`):
    //! `SB_TEST_KAFKA_SASL_SSL_BROKERS` (default `127.0.0.1:9094`), its CA and client
    //! certificate in `SB_TEST_TLS_DIR` (default `<repo>/.local/tls`), the user
    //! `SB_TEST_KAFKA_SASL_USER` / `SB_TEST_KAFKA_SASL_PASSWORD` (defaults: up.sh's,
    //! known to the broker for SCRAM-SHA-512 and PLAIN).

    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::eventlog::kafka::tests::{options, unique};
    use crate::eventlog::kafka::{KafkaLog, KafkaOpenError};
    use crate::eventlog::{EventLog, NewRecord};

    const WAIT: Duration = Duration::from_secs(60);

    fn env_or(name: &str, default: &str) -> String {
        std::env::var(name).unwrap_or_else(|_| default.to_owned())
    }

    fn brokers() -> String {
        let brokers = env_or("SB_TEST_KAFKA_SASL_SSL_BROKERS", "127.0.0.1:9094");
        let reachable = std::net::ToSocketAddrs::to_socket_addrs(brokers.as_str())
            .map(|mut a| {
                a.any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
            })
            .unwrap_or(false);
        assert!(
            reachable,
            "the SASL_SSL listener of kafka is not reachable at {brokers} \
             (SB_TEST_KAFKA_SASL_SSL_BROKERS); start it with `deploy/local/up.sh kafka`"
        );
        brokers
    }

    fn tls_file(name: &str) -> String {
        let dir = std::env::var("SB_TEST_TLS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.local/tls"));
        let path = dir.join(name);
        assert!(
            path.is_file(),
            "{} is missing: generate the local TLS material with `deploy/local/up.sh kafka` \
             or point SB_TEST_TLS_DIR at it",
            path.display()
        );
        path.display().to_string()
    }

    /// SASL_SSL with `mechanism`, the password in a file as a mounted Secret gives it.
    fn security(mechanism: &str, dir: &tempfile::TempDir) -> KafkaSecurity {
        let file = dir.path().join("kafka-password");
        let password = env_or("SB_TEST_KAFKA_SASL_PASSWORD", "sbtls-local-password");
        std::fs::write(&file, format!("{password}\n")).unwrap();
        KafkaSecurity {
            protocol: "sasl_ssl".into(),
            sasl_mechanism: mechanism.into(),
            sasl_username: env_or("SB_TEST_KAFKA_SASL_USER", "sbtls"),
            sasl_password_file: file.display().to_string(),
            ssl_ca_file: tls_file("ca.pem"),
            ..KafkaSecurity::default()
        }
    }

    /// Open a fresh one-partition log over `security`, append a record and read it back.
    async fn round_trip(name: &str, security: KafkaSecurity) -> Result<(), KafkaOpenError> {
        let topic = unique(name);
        let mut opts = options(&topic, 1);
        opts.brokers = brokers();
        opts.security = security;
        // The SASL_SSL listener must answer within a short bound when it refuses.
        opts.request_timeout = Duration::from_secs(5);
        let log = tokio::time::timeout(WAIT, KafkaLog::open(opts))
            .await
            .expect("open returns in time")?;
        let offset = log
            .append(
                0,
                NewRecord {
                    key: b"conv".to_vec(),
                    value: b"over sasl_ssl".to_vec(),
                    traceparent: String::new(),
                },
            )
            .await
            .expect("append over sasl_ssl");
        let batch = log
            .poll(0, offset, 1, WAIT)
            .await
            .expect("poll over sasl_ssl");
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].value, b"over sasl_ssl");
        log.close().await;
        Ok(())
    }

    #[tokio::test]
    async fn sasl_ssl_with_scram_sha_512_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        round_trip("tls-scram", security("SCRAM-SHA-512", &dir))
            .await
            .expect("open over sasl_ssl with SCRAM-SHA-512");
    }

    #[tokio::test]
    async fn sasl_ssl_with_plain_and_a_client_certificate_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let security = KafkaSecurity {
            ssl_cert_file: tls_file("client.pem"),
            ssl_key_file: tls_file("client.key"),
            ..security("PLAIN", &dir)
        };
        round_trip("tls-plain", security)
            .await
            .expect("open over sasl_ssl with PLAIN");
    }

    #[tokio::test]
    async fn a_wrong_password_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let security = KafkaSecurity {
            sasl_password: "not-the-password".into(),
            sasl_password_file: String::new(),
            ..security("SCRAM-SHA-512", &dir)
        };
        // librdkafka logs the SASL failure (through `LogContext`) and the metadata
        // request of the open fails: the log does not open, and start-up retries.
        let e = round_trip("tls-wrong", security).await.unwrap_err();
        assert!(matches!(e, KafkaOpenError::Unreachable(_)), "{e}");
    }

    #[test]
    fn properties_follow_the_protocol_and_the_password_stays_out_of_debug() {
        let mut c = ClientConfig::new();
        KafkaSecurity::default().apply(&mut c);
        assert_eq!(c.get("security.protocol"), None);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let mut s = KafkaSecurity {
            protocol: "sasl_ssl".into(),
            sasl_mechanism: "SCRAM-SHA-256".into(),
            sasl_username: "u".into(),
            sasl_password_file: file.display().to_string(),
            ssl_ca_file: "/ca.pem".into(),
            ..KafkaSecurity::default()
        };
        s.resolve().unwrap();
        s.apply(&mut c);
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanisms"), Some("SCRAM-SHA-256"));
        assert_eq!(c.get("sasl.password"), Some("s3cret"));
        assert_eq!(c.get("ssl.ca.location"), Some("/ca.pem"));
        assert_eq!(c.get("ssl.certificate.location"), None);
        assert!(!format!("{s:?}").contains("s3cret"));
        let mut missing = KafkaSecurity {
            sasl_password_file: "/nonexistent/pw".into(),
            ..KafkaSecurity::default()
        };
        let e = missing.resolve().unwrap_err();
        assert!(e.contains("routing.kafka_sasl_password_file"), "{e}");
    }
}
