//! How the store reaches Redis beyond the URL: ACL credentials given as settings (or in a
//! mounted file) and the TLS material of `rediss://` (a CA bundle, a client certificate
//! for mutual TLS). TLS is rustls with the ring provider; without a CA file the system's
//! trust store verifies the server.

use std::fmt;

use redis::{IntoConnectionInfo, TlsCertificates};
use switchboard_config::PresenceConfig;

/// Credentials and TLS files of the Redis connection; empty strings are unset.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisConnection {
    /// ACL user name; empty = the URL's.
    pub username: String,
    /// Password; empty = `password_file`'s, else the URL's.
    pub password: String,
    /// File holding the password.
    pub password_file: String,
    /// PEM CA bundle verifying the server (`rediss://`); empty = the system's roots.
    pub ca_file: String,
    /// PEM client certificate for mutual TLS (with `key_file`).
    pub cert_file: String,
    /// PEM private key of `cert_file`.
    pub key_file: String,
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConnection")
            .field("username", &self.username)
            .field(
                "password",
                &(!self.password.is_empty()).then_some("<redacted>"),
            )
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish()
    }
}

impl RedisConnection {
    /// The `presence.redis_*` credential and TLS settings.
    pub fn from_config(config: &PresenceConfig) -> RedisConnection {
        RedisConnection {
            username: config.redis_username.clone(),
            password: config.redis_password.expose().to_owned(),
            password_file: config.redis_password_file.clone(),
            ca_file: config.redis_ca_file.clone(),
            cert_file: config.redis_cert_file.clone(),
            key_file: config.redis_key_file.clone(),
        }
    }

    /// A client for `url` with these credentials (they override the URL's) and, for
    /// `rediss://`, this TLS material. Reads the files now; fails on an invalid URL, an
    /// unreadable file or TLS material without `rediss://`.
    pub fn client(&self, url: &str) -> anyhow::Result<redis::Client> {
        let mut info = url
            .into_connection_info()
            .map_err(|e| anyhow::anyhow!("invalid presence.redis_url: {e}"))?;
        if !self.username.is_empty() {
            info.redis.username = Some(self.username.clone());
        }
        let password = switchboard_config::read_secret(&self.password, &self.password_file)
            .map_err(|e| anyhow::anyhow!("presence.redis_password_file: {e}"))?;
        if !password.is_empty() {
            info.redis.password = Some(password);
        }
        let tls = matches!(info.addr, redis::ConnectionAddr::TcpTls { .. });
        let has_files = !(self.ca_file.is_empty() && self.cert_file.is_empty());
        if !has_files {
            return redis::Client::open(info)
                .map_err(|e| anyhow::anyhow!("invalid presence.redis_url: {e}"));
        }
        if !tls {
            anyhow::bail!("presence.redis_ca_file and redis_cert_file need a rediss:// URL");
        }
        let read = |key: &str, path: &str| -> anyhow::Result<Option<Vec<u8>>> {
            if path.is_empty() {
                return Ok(None);
            }
            std::fs::read(path)
                .map(Some)
                .map_err(|e| anyhow::anyhow!("presence.{key}: cannot read {path}: {e}"))
        };
        let root_cert = read("redis_ca_file", &self.ca_file)?;
        let client_tls = match (
            read("redis_cert_file", &self.cert_file)?,
            read("redis_key_file", &self.key_file)?,
        ) {
            (Some(client_cert), Some(client_key)) => Some(redis::ClientTlsConfig {
                client_cert,
                client_key,
            }),
            (None, None) => None,
            _ => anyhow::bail!("presence.redis_cert_file and redis_key_file go together"),
        };
        redis::Client::build_with_tls(
            info,
            TlsCertificates {
                client_tls,
                root_cert,
            },
        )
        .map_err(|e| anyhow::anyhow!("presence.redis_ca_file / redis_cert_file: {e}"))
    }
}

#[cfg(test)]
mod tests {
    //! Against the TLS listener of the local Redis (`deploy/local/up.sh redis`):
    //! `SB_TEST_REDIS_TLS_URL` (default `rediss://127.0.0.1:6380`), its CA and client
    //! certificate in `SB_TEST_TLS_DIR` (default `<repo>/.local/tls`), the ACL user
    //! `SB_TEST_REDIS_TLS_USER` / `SB_TEST_REDIS_TLS_PASSWORD` (defaults: up.sh's).

    use std::path::PathBuf;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::store::redis::{RedisOptions, RedisSessionStore};
    use crate::store::{Clock, SessionStore};

    fn env_or(name: &str, default: &str) -> String {
        std::env::var(name).unwrap_or_else(|_| default.to_owned())
    }

    fn tls_url() -> String {
        env_or("SB_TEST_REDIS_TLS_URL", "rediss://127.0.0.1:6380")
    }

    fn tls_file(name: &str) -> String {
        let dir = std::env::var("SB_TEST_TLS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.local/tls"));
        let path = dir.join(name);
        assert!(
            path.is_file(),
            "{} is missing: generate the local TLS material and listeners with \
             `deploy/local/up.sh redis` or point SB_TEST_TLS_DIR at them",
            path.display()
        );
        path.display().to_string()
    }

    /// The test user's settings, the password in a file as a mounted Secret gives it.
    fn connection(dir: &tempfile::TempDir) -> RedisConnection {
        let password_file = dir.path().join("redis-password");
        let password = env_or("SB_TEST_REDIS_TLS_PASSWORD", "sbtls-local-password");
        std::fs::write(&password_file, format!("{password}\n")).unwrap();
        RedisConnection {
            username: env_or("SB_TEST_REDIS_TLS_USER", "sbtls"),
            password_file: password_file.display().to_string(),
            ca_file: tls_file("ca.pem"),
            ..RedisConnection::default()
        }
    }

    /// SET then GET a unique key over a fresh connection of `client`; the error says
    /// where and what to start.
    async fn round_trip(client: &redis::Client) -> redis::RedisResult<()> {
        let mut conn = tokio::time::timeout(
            Duration::from_secs(5),
            client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::IoError, "connect timed out")))??;
        let key = format!("sbtest:tls:{:016x}", rand::random::<u64>());
        redis::cmd("SET")
            .arg(&key)
            .arg("over tls")
            .arg("EX")
            .arg(60)
            .exec_async(&mut conn)
            .await?;
        let got: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
        assert_eq!(got, "over tls");
        redis::cmd("DEL").arg(&key).exec_async(&mut conn).await?;
        Ok(())
    }

    fn unreachable(e: impl fmt::Display) -> String {
        format!(
            "Redis over TLS at {} failed ({e}): start it with `deploy/local/up.sh redis` \
             or point SB_TEST_REDIS_TLS_URL at one",
            tls_url()
        )
    }

    #[tokio::test]
    async fn rediss_with_a_ca_file_and_an_acl_user_from_settings() {
        let dir = tempfile::tempdir().unwrap();
        let client = connection(&dir).client(&tls_url()).unwrap();
        round_trip(&client)
            .await
            .unwrap_or_else(|e| panic!("{}", unreachable(e)));
    }

    #[tokio::test]
    async fn rediss_with_a_client_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let conn = RedisConnection {
            cert_file: tls_file("client.pem"),
            key_file: tls_file("client.key"),
            ..connection(&dir)
        };
        let client = conn.client(&tls_url()).unwrap();
        round_trip(&client)
            .await
            .unwrap_or_else(|e| panic!("{}", unreachable(e)));
    }

    #[tokio::test]
    async fn credentials_in_the_url_work_and_settings_override_them() {
        let dir = tempfile::tempdir().unwrap();
        let good = connection(&dir);
        let password = env_or("SB_TEST_REDIS_TLS_PASSWORD", "sbtls-local-password");
        let url = tls_url().replacen(
            "rediss://",
            &format!("rediss://{}:{password}@", good.username),
            1,
        );
        let in_url = RedisConnection {
            ca_file: good.ca_file.clone(),
            ..RedisConnection::default()
        };
        round_trip(&in_url.client(&url).unwrap())
            .await
            .unwrap_or_else(|e| panic!("{}", unreachable(e)));
        // A wrong password in the settings wins over the right one in the URL.
        let wrong = RedisConnection {
            password: "not-the-password".into(),
            ..in_url
        };
        let e = round_trip(&wrong.client(&url).unwrap()).await.unwrap_err();
        assert_eq!(e.kind(), redis::ErrorKind::AuthenticationFailed, "{e}");
    }

    #[tokio::test]
    async fn a_server_certificate_outside_the_trusted_cas_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // The system's trust store does not know the local CA.
        let conn = RedisConnection {
            ca_file: String::new(),
            ..connection(&dir)
        };
        let e = round_trip(&conn.client(&tls_url()).unwrap())
            .await
            .unwrap_err();
        assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    }

    #[tokio::test]
    async fn the_session_store_runs_over_tls() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = format!("sbtest:tls:{:016x}", rand::random::<u64>());
        let mut config = PresenceConfig {
            redis_url: tls_url().into(),
            redis_key_prefix: prefix,
            ..PresenceConfig::default()
        };
        let conn = connection(&dir);
        config.redis_username = conn.username.clone();
        config.redis_password_file = conn.password_file.clone();
        config.redis_ca_file = conn.ca_file.clone();
        let store =
            RedisSessionStore::new(RedisOptions::from_config(&config), Clock::new()).unwrap();
        let ready = tokio::time::timeout(
            Duration::from_secs(10),
            store.wait_ready(&CancellationToken::new()),
        )
        .await;
        assert!(
            matches!(ready, Ok(true)),
            "{}",
            unreachable("the store did not become ready")
        );
        // A write and a read through the store's own connection: this instance is live.
        let live = store.refresh_instances().await.expect("instances over tls");
        assert!(live.iter().any(|i| i == store.instance_id()), "{live:?}");
    }

    #[test]
    fn tls_material_needs_rediss_and_readable_files() {
        let conn = RedisConnection {
            ca_file: "/nonexistent/ca.pem".into(),
            ..RedisConnection::default()
        };
        let e = conn.client("rediss://127.0.0.1:6380").unwrap_err();
        assert!(e.to_string().contains("presence.redis_ca_file"), "{e}");
        let e = conn.client("redis://127.0.0.1:6379").unwrap_err();
        assert!(e.to_string().contains("rediss://"), "{e}");
        let debug = format!(
            "{:?}",
            RedisConnection {
                password: "hunter2".into(),
                ..RedisConnection::default()
            }
        );
        assert!(!debug.contains("hunter2"), "{debug}");
    }
}
