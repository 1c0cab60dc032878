//! Identity for Switchboard: verifying the JWTs that the operator's auth system signs,
//! and minting tokens for development.
//!
//! Switchboard owns no user accounts. A token's `sub` claim is the user id; nothing
//! else identifies a client. Accepted keys: an HS256 shared secret, or RS256/ES256
//! public keys from a PEM file or a JWKS file (chosen by the token's `kid`). This crate
//! does not read the network; the gateway calls [`Verifier::verify`] at the upgrade.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{
    decode, decode_header, encode, errors::ErrorKind, jwk::JwkSet, Algorithm, DecodingKey,
    EncodingKey, Header, Validation,
};
use serde::{Deserialize, Serialize};
use switchboard_config::{AuthConfig, MIN_SECRET_BYTES};

/// Longest user id accepted, in bytes.
pub const MAX_USER_ID_BYTES: usize = 128;

/// The claims Switchboard reads from a token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch. Required.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    #[serde(default)]
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// `"bot": true` marks a bot account (its messages carry `from_bot`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bot: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("invalid signature")]
    BadSignature,
    #[error("token algorithm not accepted")]
    BadAlgorithm,
    #[error("no key for the token's kid")]
    UnknownKey,
    #[error("invalid issuer")]
    BadIssuer,
    #[error("invalid audience")]
    BadAudience,
    #[error("invalid subject: {0}")]
    BadSubject(&'static str),
    #[error("malformed token")]
    Malformed,
    #[error("auth configuration: {0}")]
    Config(String),
}

/// Check a user id: non-empty, at most [`MAX_USER_ID_BYTES`], no control characters or
/// whitespace.
pub fn validate_user_id(user: &str) -> Result<(), AuthError> {
    if user.is_empty() {
        return Err(AuthError::BadSubject("empty"));
    }
    if user.len() > MAX_USER_ID_BYTES {
        return Err(AuthError::BadSubject("longer than 128 bytes"));
    }
    if user.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(AuthError::BadSubject(
            "contains whitespace or control characters",
        ));
    }
    Ok(())
}

/// The keys a token may be verified with.
enum Keys {
    /// One key and its algorithms (HS256 secret or a PEM public key).
    Single(DecodingKey, Vec<Algorithm>),
    /// JWKS keys by `kid`.
    ByKid(HashMap<String, (DecodingKey, Algorithm)>),
}

/// Verifies tokens against the configured keys.
pub struct Verifier {
    keys: Keys,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_secs: u64,
}

impl Verifier {
    /// Build from configuration; exactly one key source must be configured.
    pub fn from_config(auth: &AuthConfig) -> Result<Verifier, AuthError> {
        let sources = [
            !auth.hs256_secret.is_empty(),
            !auth.hs256_secret_file.is_empty(),
            !auth.public_key_file.is_empty(),
            !auth.jwks_file.is_empty(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        if sources != 1 {
            return Err(AuthError::Config(format!(
                "configure exactly one of auth.hs256_secret, auth.hs256_secret_file, \
                 auth.public_key_file, auth.jwks_file (found {sources})"
            )));
        }
        let keys = if let Some(secret) = hs256_secret(auth)? {
            Keys::Single(DecodingKey::from_secret(&secret), vec![Algorithm::HS256])
        } else if !auth.public_key_file.is_empty() {
            let pem = read(Path::new(&auth.public_key_file))?;
            pem_key(&pem)?
        } else {
            let text = read(Path::new(&auth.jwks_file))?;
            let set: JwkSet = serde_json::from_slice(&text).map_err(|e| {
                AuthError::Config(format!("invalid JWKS in {}: {e}", auth.jwks_file))
            })?;
            let mut by_kid = HashMap::new();
            for jwk in &set.keys {
                let Some(kid) = jwk.common.key_id.clone() else {
                    continue;
                };
                let alg = match &jwk.algorithm {
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                    _ => continue,
                };
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| AuthError::Config(format!("invalid JWK {kid}: {e}")))?;
                by_kid.insert(kid, (key, alg));
            }
            if by_kid.is_empty() {
                return Err(AuthError::Config(format!(
                    "no RSA or EC key with a kid in {}",
                    auth.jwks_file
                )));
            }
            Keys::ByKid(by_kid)
        };
        Ok(Verifier {
            keys,
            issuer: (!auth.issuer.is_empty()).then(|| auth.issuer.clone()),
            audience: (!auth.audience.is_empty()).then(|| auth.audience.clone()),
            leeway_secs: auth.leeway_secs,
        })
    }

    /// Verify a token and return its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = decode_header(token).map_err(|_| AuthError::Malformed)?;
        let (key, algs) = match &self.keys {
            Keys::Single(key, algs) => (key, algs.clone()),
            Keys::ByKid(map) => {
                let kid = header.kid.as_deref().ok_or(AuthError::UnknownKey)?;
                let (key, alg) = map.get(kid).ok_or(AuthError::UnknownKey)?;
                (key, vec![*alg])
            }
        };
        if !algs.contains(&header.alg) {
            return Err(AuthError::BadAlgorithm);
        }
        let mut validation = Validation::new(header.alg);
        validation.algorithms = algs;
        validation.leeway = self.leeway_secs;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
        }
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let data = decode::<Claims>(token, key, &validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm => AuthError::BadAlgorithm,
            ErrorKind::InvalidIssuer => AuthError::BadIssuer,
            ErrorKind::InvalidAudience => AuthError::BadAudience,
            ErrorKind::MissingRequiredClaim(c) if c == "iss" => AuthError::BadIssuer,
            ErrorKind::MissingRequiredClaim(c) if c == "aud" => AuthError::BadAudience,
            _ => AuthError::Malformed,
        })?;
        validate_user_id(&data.claims.sub)?;
        Ok(data.claims)
    }
}

fn pem_key(pem: &[u8]) -> Result<Keys, AuthError> {
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Ok(Keys::Single(key, vec![Algorithm::RS256]));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        return Ok(Keys::Single(key, vec![Algorithm::ES256]));
    }
    Err(AuthError::Config(
        "auth.public_key_file holds no RSA or EC public key in PEM".into(),
    ))
}

fn read(path: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path)
        .map_err(|e| AuthError::Config(format!("cannot read {}: {e}", path.display())))
}

/// The configured HS256 secret, if HS256 is configured.
fn hs256_secret(auth: &AuthConfig) -> Result<Option<Vec<u8>>, AuthError> {
    if !auth.hs256_secret.is_empty() {
        let secret = auth.hs256_secret.expose();
        if secret.len() < MIN_SECRET_BYTES {
            return Err(AuthError::Config(format!(
                "auth.hs256_secret is shorter than {MIN_SECRET_BYTES} bytes"
            )));
        }
        return Ok(Some(secret.as_bytes().to_vec()));
    }
    if !auth.hs256_secret_file.is_empty() {
        let bytes = read(Path::new(&auth.hs256_secret_file))?;
        let trimmed = String::from_utf8_lossy(&bytes).trim().as_bytes().to_vec();
        if trimmed.len() < MIN_SECRET_BYTES {
            return Err(AuthError::Config(format!(
                "the HS256 secret in {} is shorter than {MIN_SECRET_BYTES} bytes",
                auth.hs256_secret_file
            )));
        }
        return Ok(Some(trimmed));
    }
    Ok(None)
}

/// Mints HS256 tokens with the configured secret (development and tests).
pub struct Signer {
    key: EncodingKey,
}

impl Signer {
    pub fn hs256(secret: &[u8]) -> Signer {
        Signer {
            key: EncodingKey::from_secret(secret),
        }
    }

    /// A signer for the configured HS256 secret. Public-key configurations cannot sign.
    pub fn from_config(auth: &AuthConfig) -> Result<Signer, AuthError> {
        match hs256_secret(auth)? {
            Some(secret) => Ok(Signer::hs256(&secret)),
            None => Err(AuthError::Config(
                "tokens can only be minted with an HS256 secret (auth.hs256_secret or \
                 auth.hs256_secret_file); public-key setups are signed by your identity provider"
                    .into(),
            )),
        }
    }

    /// A token for `user_id` valid for `ttl`.
    pub fn sign(&self, user_id: &str, ttl: Duration) -> Result<String, AuthError> {
        self.sign_account(user_id, ttl, false)
    }

    /// A token for `user_id` valid for `ttl`, marked as a bot account when `bot`.
    pub fn sign_account(
        &self,
        user_id: &str,
        ttl: Duration,
        bot: bool,
    ) -> Result<String, AuthError> {
        validate_user_id(user_id)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = Claims {
            sub: user_id.to_owned(),
            exp: now + ttl.as_secs().max(1),
            iat: now,
            iss: None,
            bot,
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.key)
            .map_err(|e| AuthError::Config(format!("cannot sign: {e}")))
    }
}

/// A fresh random secret: 48 random bytes, URL-safe base64 (64 visible ASCII
/// characters), usable as an HS256 secret or a cluster credential.
pub fn generate_secret() -> String {
    use base64::Engine as _;
    use rand::RngCore as _;
    let mut bytes = [0u8; 48];
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Whether the operator configured a token key (any of the four sources).
pub fn key_configured(auth: &AuthConfig) -> bool {
    !auth.hs256_secret.is_empty()
        || !auth.hs256_secret_file.is_empty()
        || !auth.public_key_file.is_empty()
        || !auth.jwks_file.is_empty()
}

/// Standalone convenience: when no key is configured, use (and on first start create)
/// an HS256 secret in `<data_dir>/jwt-secret`, readable only by its owner. Returns the
/// secret file path when it was chosen this way.
pub fn ensure_dev_secret(
    auth: &mut AuthConfig,
    data_dir: &Path,
) -> Result<Option<PathBuf>, AuthError> {
    if key_configured(auth) {
        return Ok(None);
    }
    let path = data_dir.join("jwt-secret");
    if !path.exists() {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| AuthError::Config(format!("cannot create {}: {e}", data_dir.display())))?;
        write_private(&path, generate_secret().as_bytes())?;
    }
    auth.hs256_secret_file = path.display().to_string();
    Ok(Some(path))
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), AuthError> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|e| AuthError::Config(format!("cannot create {}: {e}", path.display())))?;
    file.write_all(contents)
        .and_then(|_| file.sync_all())
        .map_err(|e| AuthError::Config(format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs_config(secret: &str) -> AuthConfig {
        AuthConfig {
            hs256_secret: secret.into(),
            ..AuthConfig::default()
        }
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn signed_token_verifies_to_its_user() {
        let cfg = hs_config(SECRET);
        let token = Signer::from_config(&cfg)
            .unwrap()
            .sign("alice", Duration::from_secs(60))
            .unwrap();
        let claims = Verifier::from_config(&cfg).unwrap().verify(&token).unwrap();
        assert_eq!(claims.sub, "alice");
    }

    #[test]
    fn wrong_secret_expired_and_garbage_are_refused_with_reasons() {
        let token = Signer::hs256(b"another-secret-another-secret-xx")
            .sign("alice", Duration::from_secs(60))
            .unwrap();
        let v = Verifier::from_config(&hs_config(SECRET)).unwrap();
        assert_eq!(v.verify(&token), Err(AuthError::BadSignature));
        assert_eq!(v.verify(""), Err(AuthError::Missing));
        assert_eq!(v.verify("not.a.token"), Err(AuthError::Malformed));

        let expired = encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: "alice".into(),
                exp: 1_000,
                iat: 0,
                iss: None,
                bot: false,
            },
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(v.verify(&expired), Err(AuthError::Expired));
        assert_eq!(AuthError::Expired.to_string(), "token expired");
    }

    fn hs_token(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn issuer_and_audience_are_enforced_when_configured() {
        let mut cfg = hs_config(SECRET);
        cfg.issuer = "https://id.example".into();
        cfg.audience = "switchboard".into();
        let v = Verifier::from_config(&cfg).unwrap();
        let good = hs_token(serde_json::json!({
            "sub": "bob", "exp": 4_000_000_000u64, "iss": "https://id.example", "aud": "switchboard"
        }));
        assert_eq!(v.verify(&good).unwrap().sub, "bob");
        let wrong_iss = hs_token(serde_json::json!({
            "sub": "bob", "exp": 4_000_000_000u64, "iss": "https://evil", "aud": "switchboard"
        }));
        assert_eq!(v.verify(&wrong_iss), Err(AuthError::BadIssuer));
        let wrong_aud = hs_token(serde_json::json!({
            "sub": "bob", "exp": 4_000_000_000u64, "iss": "https://id.example", "aud": "other"
        }));
        assert_eq!(v.verify(&wrong_aud), Err(AuthError::BadAudience));
    }

    #[test]
    fn token_without_exp_is_refused() {
        let v = Verifier::from_config(&hs_config(SECRET)).unwrap();
        assert!(v
            .verify(&hs_token(serde_json::json!({"sub": "bob"})))
            .is_err());
    }

    fn fixture(name: &str) -> String {
        format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    fn sign_with(alg: Algorithm, key: EncodingKey, kid: Option<&str>, sub: &str) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        encode(
            &header,
            &serde_json::json!({"sub": sub, "exp": 4_000_000_000u64}),
            &key,
        )
        .unwrap()
    }

    #[test]
    fn es256_pem_public_key_verifies() {
        let cfg = AuthConfig {
            public_key_file: fixture("ec-public.pem"),
            ..AuthConfig::default()
        };
        let v = Verifier::from_config(&cfg).unwrap();
        let pem = std::fs::read(fixture("ec-private.pk8.pem")).unwrap();
        let token = sign_with(
            Algorithm::ES256,
            EncodingKey::from_ec_pem(&pem).unwrap(),
            None,
            "erin",
        );
        assert_eq!(v.verify(&token).unwrap().sub, "erin");
        // An HS256 token must not be accepted by a public-key verifier.
        let hs = Signer::hs256(SECRET.as_bytes())
            .sign("erin", Duration::from_secs(60))
            .unwrap();
        assert_eq!(v.verify(&hs), Err(AuthError::BadAlgorithm));
    }

    #[test]
    fn rs256_pem_and_jwks_verify() {
        let pem = std::fs::read(fixture("rsa-private.pem")).unwrap();
        let key = EncodingKey::from_rsa_pem(&pem).unwrap();
        let pem_cfg = AuthConfig {
            public_key_file: fixture("rsa-public.pem"),
            ..AuthConfig::default()
        };
        let token = sign_with(Algorithm::RS256, key.clone(), None, "frank");
        assert_eq!(
            Verifier::from_config(&pem_cfg)
                .unwrap()
                .verify(&token)
                .unwrap()
                .sub,
            "frank"
        );

        let jwks_cfg = AuthConfig {
            jwks_file: fixture("jwks.json"),
            ..AuthConfig::default()
        };
        let v = Verifier::from_config(&jwks_cfg).unwrap();
        let with_kid = sign_with(Algorithm::RS256, key.clone(), Some("rsa-1"), "gina");
        assert_eq!(v.verify(&with_kid).unwrap().sub, "gina");
        let unknown_kid = sign_with(Algorithm::RS256, key, Some("rsa-9"), "gina");
        assert_eq!(v.verify(&unknown_kid), Err(AuthError::UnknownKey));
    }

    #[test]
    fn bad_subjects_are_refused() {
        assert!(validate_user_id("").is_err());
        assert!(validate_user_id("a b").is_err());
        assert!(validate_user_id(&"x".repeat(129)).is_err());
        assert!(validate_user_id("alice@example.com").is_ok());
        assert!(Signer::hs256(SECRET.as_bytes())
            .sign("a\nb", Duration::from_secs(1))
            .is_err());
    }

    #[test]
    fn short_inline_hs256_secrets_are_refused() {
        let short = &SECRET[..MIN_SECRET_BYTES - 1];
        let e = Verifier::from_config(&hs_config(short)).err().unwrap();
        assert!(e.to_string().contains("shorter than 32 bytes"), "{e}");
        assert!(Signer::from_config(&hs_config(short)).is_err());
        assert!(Verifier::from_config(&hs_config(SECRET)).is_ok());
    }

    #[test]
    fn generated_secrets_are_long_visible_ascii_and_differ() {
        let (a, b) = (generate_secret(), generate_secret());
        assert!(a.len() >= MIN_SECRET_BYTES && a.bytes().all(|c| c.is_ascii_graphic()));
        assert_ne!(a, b);
    }

    #[test]
    fn exactly_one_key_source_is_required() {
        assert!(Verifier::from_config(&AuthConfig::default()).is_err());
        let mut cfg = hs_config(SECRET);
        cfg.jwks_file = "/x".into();
        assert!(Verifier::from_config(&cfg).is_err());
    }

    #[test]
    fn dev_secret_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = AuthConfig::default();
        let path = ensure_dev_secret(&mut a, dir.path()).unwrap().unwrap();
        let first = std::fs::read(&path).unwrap();
        let token = Signer::from_config(&a)
            .unwrap()
            .sign("carol", Duration::from_secs(60))
            .unwrap();

        let mut b = AuthConfig::default();
        ensure_dev_secret(&mut b, dir.path()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), first);
        assert_eq!(
            Verifier::from_config(&b)
                .unwrap()
                .verify(&token)
                .unwrap()
                .sub,
            "carol"
        );

        let mut configured = hs_config(SECRET);
        assert_eq!(
            ensure_dev_secret(&mut configured, dir.path()).unwrap(),
            None
        );
    }
}
