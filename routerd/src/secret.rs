//! Secrets (API keys): never printed. `Debug`, `Display` and `Serialize` all show
//! `<redacted>`, so a secret cannot leak through a log line, `GET /admin/config` or an error
//! message by accident; the value is read only where it is used (`expose`). Checking a key a
//! client sent takes the same time wherever the first difference is.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use subtle::ConstantTimeEq;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

pub const REDACTED: &str = "<redacted>";

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` is this secret, compared in constant time (only the length can be
    /// learnt from timing).
    pub fn matches(&self, given: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(given).into()
    }

    /// Whether an `Authorization` header value is `Bearer <this secret>` (the scheme is
    /// case-insensitive, as HTTP says).
    pub fn matches_bearer(&self, header: Option<&[u8]>) -> bool {
        let Some(h) = header else { return false };
        if h.len() < 7 || !h[..7].eq_ignore_ascii_case(b"bearer ") {
            return false;
        }
        self.matches(h[7..].trim_ascii())
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(s))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_shown_and_compared_exactly() {
        let s = Secret::new("k-123");
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
        assert_eq!(serde_json::to_string(&Some(s.clone())).unwrap(), "\"<redacted>\"");
        assert!(s.matches(b"k-123"));
        assert!(!s.matches(b"k-124") && !s.matches(b"k-12") && !s.matches(b"k-1234"));
        assert!(s.matches_bearer(Some(b"Bearer k-123")));
        assert!(s.matches_bearer(Some(b"bearer  k-123 ")));
        assert!(!s.matches_bearer(Some(b"Basic k-123")));
        assert!(!s.matches_bearer(Some(b"Bearer")));
        assert!(!s.matches_bearer(Some(b"k-123")));
        assert!(!s.matches_bearer(None));
    }
}
