//! Credentials and TLS of the CQL connections: the password (inline or from a mounted
//! file) and, with `storage.scylla_tls`, an OpenSSL context that verifies every node's
//! certificate against the CA file (or the system's trust store) and the node's IP
//! address, optionally presenting a client certificate.

use openssl::ssl::{SslConnector, SslConnectorBuilder, SslFiletype, SslMethod};
use switchboard_config::StorageConfig;

use super::OpenError;

/// The CQL password: `scylla_password` or the content of `scylla_password_file`.
pub(super) fn password(storage: &StorageConfig) -> Result<String, OpenError> {
    switchboard_config::read_secret(&storage.scylla_password, &storage.scylla_password_file)
        .map_err(|e| OpenError::Other(format!("storage.scylla_password_file: {e}")))
}

/// The TLS context of every connection, when `scylla_tls` is on.
pub(super) fn context(storage: &StorageConfig) -> Result<Option<SslConnectorBuilder>, OpenError> {
    if !storage.scylla_tls {
        return Ok(None);
    }
    let fail = |key: &str, path: &str, e: openssl::error::ErrorStack| {
        OpenError::Other(format!("storage.{key}: cannot use {path}: {e}"))
    };
    // Verifies the peer, trusting the system's roots as well as the CA file.
    let mut builder = SslConnector::builder(SslMethod::tls_client())
        .map_err(|e| OpenError::Other(format!("cannot create a TLS context: {e}")))?;
    if !storage.scylla_ca_file.is_empty() {
        builder
            .set_ca_file(&storage.scylla_ca_file)
            .map_err(|e| fail("scylla_ca_file", &storage.scylla_ca_file, e))?;
    }
    if !storage.scylla_cert_file.is_empty() {
        builder
            .set_certificate_chain_file(&storage.scylla_cert_file)
            .map_err(|e| fail("scylla_cert_file", &storage.scylla_cert_file, e))?;
        builder
            .set_private_key_file(&storage.scylla_key_file, SslFiletype::PEM)
            .map_err(|e| fail("scylla_key_file", &storage.scylla_key_file, e))?;
        builder
            .check_private_key()
            .map_err(|e| fail("scylla_key_file", &storage.scylla_key_file, e))?;
    }
    Ok(Some(builder))
}

#[cfg(test)]
mod tests {
    //! Against the local Cassandra, which takes TLS on its CQL port
    //! (`deploy/local/up.sh cassandra`): `SB_TEST_SCYLLA_TLS_NODES` (default
    //! `127.0.0.1:9042`), CA and client certificate in `SB_TEST_TLS_DIR` (default
    //! `<repo>/.local/tls`).

    use std::path::PathBuf;

    use switchboard_config::Config;

    use super::super::connect;
    use super::*;

    fn nodes() -> String {
        std::env::var("SB_TEST_SCYLLA_TLS_NODES").unwrap_or_else(|_| "127.0.0.1:9042".into())
    }

    fn tls_file(name: &str) -> String {
        let dir = std::env::var("SB_TEST_TLS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.local/tls"));
        let path = dir.join(name);
        assert!(
            path.is_file(),
            "{} is missing: generate the local TLS material with `deploy/local/up.sh cassandra` \
             or point SB_TEST_TLS_DIR at it",
            path.display()
        );
        path.display().to_string()
    }

    fn tls_config() -> Config {
        let mut config = Config::default();
        config.storage.backend = "scylla".into();
        config.storage.scylla_nodes = nodes();
        config.storage.scylla_tls = true;
        config.storage.scylla_ca_file = tls_file("ca.pem");
        config
    }

    /// Connect with `config` and read the server's version over the session.
    async fn release_version(config: &Config) -> Result<String, String> {
        let session = connect(config, None).await.map_err(|e| e.to_string())?;
        let (version,) = session
            .query_unpaged("SELECT release_version FROM system.local", ())
            .await
            .map_err(|e| e.to_string())?
            .into_rows_result()
            .map_err(|e| e.to_string())?
            .single_row::<(String,)>()
            .map_err(|e| e.to_string())?;
        Ok(version)
    }

    #[tokio::test]
    async fn cql_over_tls_with_a_ca_file() {
        let version = release_version(&tls_config()).await.unwrap_or_else(|e| {
            panic!(
                "CQL over TLS at {} failed ({e}): start it with `deploy/local/up.sh cassandra` \
                 or point SB_TEST_SCYLLA_TLS_NODES at a node with client encryption",
                nodes()
            )
        });
        assert!(!version.is_empty());
    }

    #[tokio::test]
    async fn cql_over_tls_with_a_client_certificate() {
        let mut config = tls_config();
        config.storage.scylla_cert_file = tls_file("client.pem");
        config.storage.scylla_key_file = tls_file("client.key");
        release_version(&config)
            .await
            .unwrap_or_else(|e| panic!("CQL over TLS at {} failed: {e}", nodes()));
    }

    #[tokio::test]
    async fn a_node_certificate_outside_the_trusted_cas_is_refused() {
        let mut config = tls_config();
        // The system's trust store does not know the local CA.
        config.storage.scylla_ca_file = String::new();
        let e = release_version(&config).await.unwrap_err();
        assert!(e.contains("certificate verify failed"), "{e}");
    }

    #[test]
    fn unusable_files_and_password_files_name_their_setting() {
        let mut config = tls_config();
        config.storage.scylla_ca_file = "/nonexistent/ca.pem".into();
        let e = context(&config.storage).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("storage.scylla_ca_file"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        config.storage.scylla_password_file = file.display().to_string();
        assert_eq!(password(&config.storage).unwrap(), "s3cret");
        config.storage.scylla_password_file = "/nonexistent/pw".into();
        let e = password(&config.storage).unwrap_err();
        assert!(
            e.to_string().contains("storage.scylla_password_file"),
            "{e}"
        );
        config.storage.scylla_tls = false;
        assert!(context(&config.storage).unwrap().is_none());
    }
}
