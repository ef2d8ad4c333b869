//! Dev tokens for `herald token`: HS256 tokens signed with the configured secret.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::config::Secret;

/// Why a dev token could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// Dev tokens are HS256 and need the shared secret.
    #[error("auth.hs256_secret is not set; dev tokens are signed with it")]
    NoSecret,
    /// `--sub` was empty.
    #[error("sub must not be empty")]
    EmptySubject,
    /// `--ttl` was zero or too large.
    #[error("ttl must be at least one second and end before the year 292277026596")]
    BadTtl,
    /// Signing failed (the message comes from jsonwebtoken and holds no key material).
    #[error("could not sign the token: {0}")]
    Signing(#[from] jsonwebtoken::errors::Error),
}

#[derive(Serialize)]
struct DevClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Mint an HS256 token with `sub`, `iat`, `exp` and, when given, `scope`, `iss` and `aud`.
pub fn mint_hs256(
    secret: &Secret,
    sub: &str,
    scope: Option<&str>,
    ttl: Duration,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<String, MintError> {
    if secret.is_empty() {
        return Err(MintError::NoSecret);
    }
    if sub.trim().is_empty() {
        return Err(MintError::EmptySubject);
    }
    if ttl.as_secs() == 0 {
        return Err(MintError::BadTtl);
    }
    let iat = jsonwebtoken::get_current_timestamp();
    let exp = iat.checked_add(ttl.as_secs()).ok_or(MintError::BadTtl)?;
    // Empty strings mean "not configured" in AuthConfig; an empty claim would only confuse.
    let claims = DevClaims {
        sub,
        iat,
        exp,
        scope: non_empty(scope),
        iss: non_empty(issuer),
        aud: non_empty(audience),
    };
    let key = EncodingKey::from_secret(secret.expose().as_bytes());
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &key,
    )?)
}

fn non_empty(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|v| !v.is_empty())
}

/// Parse `30s`, `15m`, `1h`, `7d` or plain seconds into a positive duration.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "invalid ttl {s:?}: use seconds or a number with s, m, h or d (e.g. 30s, 15m, 1h, 7d)"
        )
    };
    let trimmed = s.trim();
    let (digits, unit_secs) = match trimmed.as_bytes().last() {
        Some(b's') => (&trimmed[..trimmed.len() - 1], 1),
        Some(b'm') => (&trimmed[..trimmed.len() - 1], 60),
        Some(b'h') => (&trimmed[..trimmed.len() - 1], 3600),
        Some(b'd') => (&trimmed[..trimmed.len() - 1], 86_400),
        _ => (trimmed, 1),
    };
    // u64::from_str accepts a leading '+'; insist on plain digits.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let count: u64 = digits.parse().map_err(|_| bad())?;
    let secs = count.checked_mul(unit_secs).ok_or_else(bad)?;
    if secs == 0 {
        return Err(format!("invalid ttl {s:?}: must be at least one second"));
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_ttl_accepts_units_and_plain_seconds() {
        assert_eq!(parse_ttl("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_ttl("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl(" 2h "), Ok(Duration::from_secs(7200)));
    }

    #[test]
    fn parse_ttl_rejects_nonsense() {
        for bad in [
            "",
            "h",
            "0",
            "0s",
            "-5",
            "+5",
            "1.5h",
            "1w",
            "1h30m",
            "abc",
            "99999999999999999999d",
        ] {
            let err = parse_ttl(bad).unwrap_err();
            assert!(err.contains("ttl"), "{bad}: {err}");
        }
    }

    #[test]
    fn mint_refuses_missing_inputs() {
        let secret = Secret::new("a-test-secret-that-is-long-enough-1234");
        let hour = Duration::from_secs(3600);
        assert!(matches!(
            mint_hs256(&Secret::default(), "alice", None, hour, None, None),
            Err(MintError::NoSecret)
        ));
        assert!(matches!(
            mint_hs256(&secret, " ", None, hour, None, None),
            Err(MintError::EmptySubject)
        ));
        assert!(matches!(
            mint_hs256(&secret, "alice", None, Duration::ZERO, None, None),
            Err(MintError::BadTtl)
        ));
        assert!(matches!(
            mint_hs256(
                &secret,
                "alice",
                None,
                Duration::from_secs(u64::MAX),
                None,
                None
            ),
            Err(MintError::BadTtl)
        ));
    }
}
