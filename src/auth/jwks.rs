//! JWKS key cache: keys by `kid`, refreshed when stale or when an unknown `kid` shows up, with
//! every fetch rate-limited and shared, and the last good keys kept while the endpoint is down.

use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde::Deserialize;
use serde_json::Value;

use super::AuthError;
use super::verifier::{AuthSetupError, check_ec_point};

/// Largest JWKS document read; real ones are a few KiB, and the cap bounds memory.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Cache timings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct JwksSettings {
    /// How long fetched keys count as fresh.
    pub cache_ttl: Duration,
    /// Minimum time between two fetches, whatever triggered them.
    pub min_refetch: Duration,
}

/// One usable verification key from the set.
pub(crate) struct JwkKey {
    pub kid: Option<String>,
    /// From the JWK's `alg`, else its key type and curve; the token header must agree.
    pub alg: Algorithm,
    pub key: DecodingKey,
}

pub(crate) struct JwksCache {
    url: reqwest::Url,
    client: reqwest::Client,
    settings: JwksSettings,
    state: RwLock<State>,
    /// Held for the whole fetch so concurrent misses wait for one fetch instead of stampeding.
    fetch_lock: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    keys: Vec<Arc<JwkKey>>,
    /// Last successful fetch.
    fetched_at: Option<Instant>,
    /// Last attempt, successful or not: the rate limit counts failures too, so a dead
    /// endpoint is not hammered.
    attempted_at: Option<Instant>,
    /// Number of completed attempts; lets a waiter see that someone else just fetched.
    attempts: u64,
    last_failed: bool,
}

impl State {
    fn find(&self, kid: Option<&str>) -> Option<Arc<JwkKey>> {
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .cloned(),
            // Without a kid the choice is only unambiguous when the set holds one key.
            None if self.keys.len() == 1 => self.keys.first().cloned(),
            None => None,
        }
    }

    fn is_fresh(&self, now: Instant, ttl: Duration) -> bool {
        self.fetched_at
            .is_some_and(|at| now.saturating_duration_since(at) < ttl)
    }

    fn may_fetch(&self, now: Instant, min_refetch: Duration) -> bool {
        self.attempted_at
            .is_none_or(|at| now.saturating_duration_since(at) >= min_refetch)
    }

    fn miss(&self) -> AuthError {
        if self.last_failed {
            AuthError::JwksUnavailable
        } else {
            AuthError::UnknownKey
        }
    }
}

impl JwksCache {
    pub(crate) fn new(
        url: &str,
        settings: JwksSettings,
        client: reqwest::Client,
    ) -> Result<Self, AuthSetupError> {
        let url = reqwest::Url::parse(url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .ok_or_else(|| AuthSetupError::Invalid {
                key: "auth.jwks_url",
                reason: "must be an absolute http(s) URL".into(),
            })?;
        if url.scheme() == "http" && !is_loopback(&url) {
            tracing::warn!(
                host = url.host_str().unwrap_or_default(),
                "auth.jwks_url uses plain http: anyone on the path can substitute signing keys"
            );
        }
        Ok(Self {
            url,
            client,
            settings,
            state: RwLock::new(State::default()),
            fetch_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// First fetch at startup; failure is logged and retried on demand.
    pub(crate) async fn warm_up(&self) {
        let seen = self.read().attempts;
        self.refresh(seen).await;
    }

    /// The key a token names, refetching the set when it is stale or lacks the kid.
    pub(crate) async fn key_for(&self, kid: Option<&str>) -> Result<Arc<JwkKey>, AuthError> {
        let (found, fetch, seen) = {
            let state = self.read();
            let now = Instant::now();
            let found = state.find(kid);
            let wanted = found.is_none() || !state.is_fresh(now, self.settings.cache_ttl);
            (
                found,
                wanted && state.may_fetch(now, self.settings.min_refetch),
                state.attempts,
            )
        };
        if !fetch {
            // Fresh hit, or rate-limited: a stale key stays usable until a fetch replaces it.
            return found.ok_or_else(|| self.read().miss());
        }
        self.refresh(seen).await;
        let state = self.read();
        // After a failed fetch the old keys are still here; after a good one, a key that
        // disappeared from the set is refused (that is how an IdP revokes a key).
        state.find(kid).ok_or_else(|| state.miss())
    }

    async fn refresh(&self, seen: u64) {
        let _fetching = self.fetch_lock.lock().await;
        {
            let state = self.read();
            // Another task fetched while this one queued: its result answers us too.
            if state.attempts != seen || !state.may_fetch(Instant::now(), self.settings.min_refetch)
            {
                return;
            }
        }
        let result = self.fetch().await;
        let mut state = self.write();
        state.attempts += 1;
        state.attempted_at = Some(Instant::now());
        match result {
            Ok(keys) => {
                tracing::debug!(keys = keys.len(), "fetched JWKS");
                state.keys = keys;
                state.fetched_at = state.attempted_at;
                state.last_failed = false;
            }
            Err(reason) => {
                tracing::warn!(
                    host = self.url.host_str().unwrap_or_default(),
                    %reason,
                    cached_keys = state.keys.len(),
                    "JWKS fetch failed; keeping the cached keys"
                );
                state.last_failed = true;
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<Arc<JwkKey>>, String> {
        // without_url(): the URL may carry credentials and must not reach the log.
        let mut response = self
            .client
            .get(self.url.clone())
            .header(
                http::header::ACCEPT,
                "application/jwk-set+json, application/json",
            )
            .send()
            .await
            .map_err(|e| format!("request failed: {}", e.without_url()))?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("reading the body failed: {}", e.without_url()))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("document larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let keys = parse_jwks(&body)?;
        if keys.is_empty() {
            // Replacing good keys with none would lock every user out; treat it as a failure.
            return Err("no usable signing keys in the set".into());
        }
        Ok(keys)
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // The lock guards plain data updated in one step, so a poisoned one is still consistent.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Parse a JWK set, keeping the keys Herald can verify with and skipping the rest.
pub(crate) fn parse_jwks(body: &[u8]) -> Result<Vec<Arc<JwkKey>>, String> {
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<Value>,
    }
    let set: RawSet = serde_json::from_slice(body).map_err(|_| "not a JWK set".to_string())?;
    let mut keys = Vec::with_capacity(set.keys.len());
    for raw in set.keys {
        // One odd key (encryption, unknown type) must not make the whole set unusable.
        let kid = raw.get("kid").and_then(Value::as_str).map(str::to_owned);
        match serde_json::from_value::<Jwk>(raw)
            .ok()
            .and_then(|jwk| key_from_jwk(&jwk))
        {
            Some(key) => keys.push(Arc::new(key)),
            None => tracing::debug!(kid = ?kid, "skipping a JWKS key that cannot verify tokens"),
        }
    }
    Ok(keys)
}

fn key_from_jwk(jwk: &Jwk) -> Option<JwkKey> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    // The algorithm the key material implies. Symmetric (`oct`) keys are refused: a secret
    // published at a URL is not a secret, and accepting one would let anyone mint tokens.
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    let alg = match jwk.common.key_algorithm {
        Some(declared) => Algorithm::try_from(declared).ok()?,
        None => implied,
    };
    // A declared alg must fit the key: RS* vs PS* share RSA keys, but an EC curve fixes its alg.
    let fits = match implied.family() {
        AlgorithmFamily::Ec => alg == implied,
        family => alg.family() == family,
    };
    if !fits {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    if implied.family() == AlgorithmFamily::Ec {
        let expected_len = if implied == Algorithm::ES256 { 65 } else { 97 };
        if key.try_get_as_bytes().map(<[u8]>::len).ok()? != expected_len {
            return None;
        }
        check_ec_point(&key, alg).ok()?;
    }
    Some(JwkKey {
        kid: jwk.common.key_id.clone(),
        alg,
        key,
    })
}
