//! Provider-token (ES256 JWT) signing and caching, and the clock both the sender and the fake read.
//!
//! APNs wants one token per key reused for a long time: renewing more often than every 20 minutes
//! is answered with 429 `TooManyProviderTokenUpdates`, using one older than 60 minutes with 403
//! `ExpiredProviderToken`. We renew at 50 minutes, which keeps clear of both.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

/// A token is renewed proactively once it is this old.
pub const RENEW_AFTER: Duration = Duration::from_secs(50 * 60);
/// APNs refuses a new token on a connection sooner than this after the previous one.
pub const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(20 * 60);
/// APNs rejects tokens older than this.
pub const MAX_TOKEN_AGE: Duration = Duration::from_secs(60 * 60);

/// Wall clock in UNIX seconds, with an offset tests can advance (shared by sender and fake).
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_secs: Arc<AtomicI64>,
}

impl Clock {
    /// The system clock (no offset).
    pub fn system() -> Self {
        Self::default()
    }

    /// Current UNIX time in seconds, offset included.
    pub fn now(&self) -> i64 {
        let sys = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        sys + self.offset_secs.load(Ordering::Relaxed)
    }

    /// Moves this clock (and every clone of it) forward; for tests of the token-age rules.
    pub fn advance(&self, by: Duration) {
        self.offset_secs
            .fetch_add(by.as_secs() as i64, Ordering::Relaxed);
    }
}

/// The claims of an APNs provider token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderClaims {
    /// Team id.
    pub iss: String,
    /// Issued at, UNIX seconds.
    pub iat: i64,
}

/// Why a provider token could not be produced.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// Signing failed (the key is not a usable P-256 key).
    #[error("cannot sign an APNs provider token with key {key_id}: {reason}")]
    Sign {
        /// Key id, never the key.
        key_id: String,
        /// jsonwebtoken's error text.
        reason: String,
    },
    /// A renewal now would break the 20-minute rule; wait this long.
    #[error("provider token renewed too recently; retry in {0:?}")]
    TooSoon(Duration),
}

#[derive(Debug, Clone)]
struct Issued {
    jwt: Arc<str>,
    // `bearer <jwt>`, built once per token rather than once per request.
    bearer: HeaderValue,
    iat: i64,
}

/// One key's signer and its cached token.
pub struct TokenCache {
    key: EncodingKey,
    key_id: String,
    team_id: String,
    clock: Clock,
    current: Mutex<Option<Issued>>,
}

impl std::fmt::Debug for TokenCache {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .finish_non_exhaustive()
    }
}

impl TokenCache {
    /// A cache for the PKCS#8 PEM key `p8`; signs once now so a bad key fails at setup.
    pub fn new(p8: &[u8], key_id: &str, team_id: &str, clock: Clock) -> Result<Self, TokenError> {
        let key = EncodingKey::from_ec_pem(p8).map_err(|e| TokenError::Sign {
            key_id: key_id.to_owned(),
            reason: e.to_string(),
        })?;
        let cache = Self {
            key,
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
            clock,
            current: Mutex::new(None),
        };
        cache.current()?;
        Ok(cache)
    }

    fn sign(&self, iat: i64) -> Result<Issued, TokenError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        // Apple documents only alg and kid; drop the default `typ` to match it exactly.
        header.typ = None;
        let claims = ProviderClaims {
            iss: self.team_id.clone(),
            iat,
        };
        let jwt =
            jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| TokenError::Sign {
                key_id: self.key_id.clone(),
                reason: e.to_string(),
            })?;
        let bearer =
            HeaderValue::try_from(format!("bearer {jwt}")).map_err(|e| TokenError::Sign {
                key_id: self.key_id.clone(),
                reason: e.to_string(),
            })?;
        tracing::debug!(key_id = %self.key_id, iat, "signed a new APNs provider token");
        Ok(Issued {
            jwt: jwt.into(),
            bearer,
            iat,
        })
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Issued>> {
        // A poisoned lock only means another sender panicked mid-update of a plain value.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The token to use now: the cached one, or a fresh one once the cached is 50 minutes old.
    pub fn current(&self) -> Result<Arc<str>, TokenError> {
        self.current_with_header().map(|(jwt, _)| jwt)
    }

    /// [`Self::current`] plus its ready-made `authorization` header value.
    pub fn current_with_header(&self) -> Result<(Arc<str>, HeaderValue), TokenError> {
        let now = self.clock.now();
        let mut slot = self.slot();
        if let Some(issued) = slot.as_ref()
            && now - issued.iat < RENEW_AFTER.as_secs() as i64
        {
            return Ok((issued.jwt.clone(), issued.bearer.clone()));
        }
        let issued = self.sign(now)?;
        let out = (issued.jwt.clone(), issued.bearer.clone());
        *slot = Some(issued);
        Ok(out)
    }

    /// APNs said `rejected` expired: renew unless another caller already did, or unless it is
    /// younger than 20 minutes (then renewing would only earn `TooManyProviderTokenUpdates`).
    pub fn renew_after_rejection(&self, rejected: &str) -> Result<(), TokenError> {
        let now = self.clock.now();
        let mut slot = self.slot();
        if let Some(issued) = slot.as_ref() {
            if &*issued.jwt != rejected {
                return Ok(());
            }
            let age = now - issued.iat;
            let min = MIN_RENEWAL_INTERVAL.as_secs() as i64;
            if age < min {
                return Err(TokenError::TooSoon(Duration::from_secs((min - age) as u64)));
            }
        }
        *slot = Some(self.sign(now)?);
        Ok(())
    }

    /// Issued-at of the cached token (for tests and diagnostics).
    pub fn issued_at(&self) -> Option<i64> {
        self.slot().as_ref().map(|i| i.iat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P8: &[u8] = include_bytes!("../../../fixtures/test-apns-AuthKey_TEST000001.p8");
    const PUB: &[u8] = include_bytes!("../../../fixtures/test-apns-AuthKey_TEST000001.pub.pem");

    fn cache(clock: &Clock) -> TokenCache {
        TokenCache::new(P8, "TEST000001", "TEAM000001", clock.clone()).unwrap()
    }

    #[test]
    fn token_is_es256_with_kid_iss_iat_and_verifies() {
        let clock = Clock::system();
        let c = cache(&clock);
        let jwt = c.current().unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::ES256);
        v.required_spec_claims.clear();
        v.validate_exp = false;
        let key = jsonwebtoken::DecodingKey::from_ec_pem(PUB).unwrap();
        let data = jsonwebtoken::decode::<ProviderClaims>(&*jwt, &key, &v).unwrap();
        assert_eq!(data.header.kid.as_deref(), Some("TEST000001"));
        assert_eq!(data.header.alg, Algorithm::ES256);
        assert_eq!(data.claims.iss, "TEAM000001");
        assert!((data.claims.iat - clock.now()).abs() <= 1);
        // RFC 7515: unpadded base64url, raw r||s signature (64 bytes -> 86 chars).
        assert!(!jwt.contains('='));
        assert_eq!(jwt.rsplit('.').next().unwrap().len(), 86);
    }

    #[test]
    fn token_reused_until_50_minutes_then_renewed() {
        let clock = Clock::system();
        let c = cache(&clock);
        let first = c.current().unwrap();
        clock.advance(Duration::from_secs(49 * 60));
        assert_eq!(c.current().unwrap(), first);
        clock.advance(Duration::from_secs(60));
        assert_ne!(c.current().unwrap(), first);
    }

    #[test]
    fn rejection_renewal_respects_20_minutes() {
        let clock = Clock::system();
        let c = cache(&clock);
        let first = c.current().unwrap();
        clock.advance(Duration::from_secs(5 * 60));
        match c.renew_after_rejection(&first) {
            Err(TokenError::TooSoon(wait)) => assert_eq!(wait, Duration::from_secs(15 * 60)),
            other => panic!("expected TooSoon, got {other:?}"),
        }
        assert_eq!(c.current().unwrap(), first);
        clock.advance(Duration::from_secs(16 * 60));
        c.renew_after_rejection(&first).unwrap();
        let second = c.current().unwrap();
        assert_ne!(second, first);
        // A late rejection of the old token must not renew again.
        c.renew_after_rejection(&first).unwrap();
        assert_eq!(c.current().unwrap(), second);
    }

    #[test]
    fn bad_key_is_named_not_printed() {
        let err = TokenCache::new(b"not a key", "KEY1234567", "T", Clock::system()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("KEY1234567"), "{text}");
    }
}
