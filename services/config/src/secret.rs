//! [`Secret`]: a setting whose value never appears in `Debug` or `Display` output, so
//! printing a configuration (`switchboard config check`, an error, a log line) cannot
//! leak a password, signing secret or credential.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What `Debug` and `Display` print instead of a set secret.
pub const REDACTED: &str = "<redacted>";

/// A secret setting (a password, a signing secret, a credential). Parsed and written
/// as a plain string; `Debug` and `Display` print [`REDACTED`] when it is set and `""`
/// when it is empty (so a check still shows whether it was given). Read the value with
/// [`Secret::expose`] (or through `Deref`, where a `&str` is expected).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret's value, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Secret {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret(value.to_owned())
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str(REDACTED)
        }
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            f.write_str(REDACTED)
        }
    }
}

/// A URL that may carry a password (`redis://user:password@host`): parsed and written
/// as a plain string, printed by `Debug` and `Display` with the password replaced by
/// [`REDACTED`].
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// The URL with its password, for the one place that connects with it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with the password of its user info (if any) replaced.
    pub fn redacted(&self) -> String {
        let url = &self.0;
        let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
            return url.clone();
        };
        let rest = &url[scheme_end..];
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        let Some(at) = authority.rfind('@') else {
            return url.clone();
        };
        let userinfo = &authority[..at];
        let user = match userinfo.find(':') {
            Some(colon) => &userinfo[..colon],
            None => userinfo,
        };
        // A lone `user@` may be a password (`redis://password@host` is read that way by
        // some clients): redact everything before `@` unless there is a `user:` part.
        let shown = if userinfo.contains(':') {
            format!("{user}:{REDACTED}")
        } else {
            REDACTED.to_owned()
        };
        format!(
            "{}{shown}{}",
            &url[..scheme_end],
            &rest[at..] // from the `@` on
        )
    }
}

impl std::ops::Deref for SecretUrl {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for SecretUrl {
    fn from(value: &str) -> SecretUrl {
        SecretUrl(value.to_owned())
    }
}

impl From<String> for SecretUrl {
    fn from(value: String) -> SecretUrl {
        SecretUrl(value)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_print_a_placeholder() {
        let s = Secret::from("hunter2-hunter2-hunter2");
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(format!("{s}"), REDACTED);
        assert_eq!(s.expose(), "hunter2-hunter2-hunter2");
        assert_eq!(format!("{:?}", Secret::default()), "\"\"");
        assert_eq!(format!("{}", Secret::default()), "");
    }

    #[test]
    fn url_passwords_print_a_placeholder() {
        for (url, shown) in [
            ("redis://u:pw@h:6379/0", "redis://u:<redacted>@h:6379/0"),
            ("rediss://:pw@h", "rediss://:<redacted>@h"),
            ("redis://pw@h", "redis://<redacted>@h"),
            ("redis://h:6379", "redis://h:6379"),
            ("redis://h/0?x=a@b", "redis://h/0?x=a@b"),
            ("not a url", "not a url"),
        ] {
            let u = SecretUrl::from(url);
            assert_eq!(u.redacted(), shown, "{url}");
            assert_eq!(format!("{u}"), shown);
            assert_eq!(format!("{u:?}"), format!("{shown:?}"));
            assert_eq!(u.expose(), url);
        }
    }
}
