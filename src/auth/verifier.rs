//! Token verification: one configured key source, one algorithm per key, claims checked by policy.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use super::jwks::{JwksCache, JwksSettings};
use super::{AuthError, Principal};
use crate::config::AuthConfig;

/// Longest token accepted; real JWTs are far smaller, and the cap bounds the parsing work.
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why the authenticator could not be built; names the config key, never secret material.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// No key source is configured (the caller decides whether dev mode may go on without one).
    #[error(
        "no JWT verification key configured: set one of auth.hs256_secret / auth.public_key_file / auth.jwks_url"
    )]
    NoKeySource,
    /// A configured key source is unusable.
    #[error("{key}: {reason}")]
    Invalid {
        /// The config key, e.g. `auth.public_key_file`.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> AuthSetupError {
    AuthSetupError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// Verifies bearer JWTs against the configured key source; cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    keys: KeySource,
    /// iss/aud/leeway policy; `algorithms` is replaced per token with the key's one algorithm.
    validation: Validation,
}

enum KeySource {
    /// HS256 secret or PEM public key: the algorithm is fixed when the key is loaded.
    Static { alg: Algorithm, key: DecodingKey },
    /// JWKS: each key carries its own algorithm.
    Jwks(JwksCache),
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match &self.inner.keys {
            KeySource::Static { alg, .. } => format!("{alg:?} key"),
            KeySource::Jwks(_) => "JWKS".to_string(),
        };
        f.debug_struct("Authenticator")
            .field("keys", &source)
            .finish()
    }
}

impl Authenticator {
    /// Build from `[auth]`: hs256_secret, else public_key_file, else jwks_url.
    pub async fn from_config(cfg: &AuthConfig) -> Result<Self, AuthSetupError> {
        if !cfg.hs256_secret.is_empty() {
            if is_set(&cfg.public_key_file) || is_set(&cfg.jwks_url) {
                tracing::warn!(
                    "auth.hs256_secret is set, so auth.public_key_file and auth.jwks_url are ignored"
                );
            }
            if cfg.hs256_secret.expose().len() < 32 {
                tracing::warn!(
                    "auth.hs256_secret is shorter than 32 bytes; use a long random secret"
                );
            }
            let key = DecodingKey::from_secret(cfg.hs256_secret.expose().as_bytes());
            return Ok(Self::new(
                KeySource::Static {
                    alg: Algorithm::HS256,
                    key,
                },
                cfg,
            ));
        }
        if is_set(&cfg.public_key_file) {
            if is_set(&cfg.jwks_url) {
                tracing::warn!("auth.public_key_file is set, so auth.jwks_url is ignored");
            }
            let path = cfg.public_key_file.trim();
            let pem = tokio::fs::read(path)
                .await
                .map_err(|e| invalid("auth.public_key_file", format!("cannot read {path}: {e}")))?;
            let (alg, key) = key_from_pem(&pem)
                .map_err(|reason| invalid("auth.public_key_file", format!("{path}: {reason}")))?;
            tracing::info!(algorithm = ?alg, "verifying tokens with the public key from auth.public_key_file");
            return Ok(Self::new(KeySource::Static { alg, key }, cfg));
        }
        if is_set(&cfg.jwks_url) {
            let settings = JwksSettings {
                cache_ttl: Duration::from_secs(cfg.jwks_cache_secs),
                min_refetch: Duration::from_secs(cfg.jwks_min_refetch_secs),
            };
            let client = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(10))
                .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|_| invalid("auth.jwks_url", "cannot build the HTTP client"))?;
            return Self::from_jwks(cfg, settings, client).await;
        }
        Err(AuthSetupError::NoKeySource)
    }

    /// JWKS source with explicit timings and client (tests use sub-second windows, no proxy).
    pub(super) async fn from_jwks(
        cfg: &AuthConfig,
        settings: JwksSettings,
        client: reqwest::Client,
    ) -> Result<Self, AuthSetupError> {
        let jwks = JwksCache::new(cfg.jwks_url.trim(), settings, client)?;
        // Warm the cache so the first requests do not wait; a failure is logged, not fatal,
        // because an identity provider outage should not stop Herald from starting.
        jwks.warm_up().await;
        Ok(Self::new(KeySource::Jwks(jwks), cfg))
    }

    fn new(keys: KeySource, cfg: &AuthConfig) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = cfg.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        if is_set(&cfg.issuer) {
            validation.set_issuer(&[cfg.issuer.trim()]);
            // Without this a token that simply omits `iss` would pass the check.
            validation.required_spec_claims.insert("iss".to_owned());
        }
        if is_set(&cfg.audience) {
            validation.set_audience(&[cfg.audience.trim()]);
            validation.required_spec_claims.insert("aud".to_owned());
        } else {
            // The aud check is opt-in: unconfigured, tokens from IdPs that always set aud still pass.
            validation.validate_aud = false;
        }
        Self {
            inner: Arc::new(Inner { keys, validation }),
        }
    }

    /// Verify a bearer JWT and return who it names.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = peek_header(token)?;
        let entry;
        let (alg, key) = match &self.inner.keys {
            KeySource::Static { alg, key } => (*alg, key),
            KeySource::Jwks(jwks) => {
                // An HMAC or unknown alg can never match a JWKS key, so it must not cost a refetch.
                let alg = header.alg.ok_or(AuthError::WrongAlgorithm)?;
                if alg.family() == AlgorithmFamily::Hmac {
                    return Err(AuthError::WrongAlgorithm);
                }
                entry = jwks.key_for(header.kid.as_deref()).await?;
                (entry.alg, &entry.key)
            }
        };
        // The configured algorithm decides; the header only has to agree with it.
        if header.alg != Some(alg) {
            return Err(AuthError::WrongAlgorithm);
        }
        let mut validation = self.inner.validation.clone();
        validation.algorithms = vec![alg];
        let data =
            jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(map_jwt_error)?;
        principal_from_claims(data.claims)
    }
}

fn is_set(value: &str) -> bool {
    !value.trim().is_empty()
}

/// The header fields needed before verification: which key and which algorithm.
struct PeekedHeader {
    /// `None` when the header names an algorithm jsonwebtoken does not know (e.g. `none`).
    alg: Option<Algorithm>,
    kid: Option<String>,
}

fn peek_header(token: &str) -> Result<PeekedHeader, AuthError> {
    #[derive(Deserialize)]
    struct RawHeader {
        alg: String,
        #[serde(default)]
        kid: Option<String>,
        #[serde(default)]
        crit: Option<Value>,
    }
    const NOT_A_JWT: AuthError = AuthError::Malformed("not a signed JWT");
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(NOT_A_JWT);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(NOT_A_JWT);
    };
    if signature.is_empty() {
        return Err(NOT_A_JWT);
    }
    let bytes = URL_SAFE_NO_PAD.decode(header).map_err(|_| NOT_A_JWT)?;
    let raw: RawHeader = serde_json::from_slice(&bytes).map_err(|_| NOT_A_JWT)?;
    if raw.crit.is_some() {
        // RFC 7515 §4.1.11: extensions we do not implement must make the token invalid.
        return Err(AuthError::Malformed("unsupported critical header"));
    }
    Ok(PeekedHeader {
        alg: Algorithm::from_str(&raw.alg).ok(),
        kid: raw.kid,
    })
}

/// Only the claims Herald reads; kept as raw JSON so a wrong type is reported precisely.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Value,
    #[serde(default)]
    scope: Value,
}

fn principal_from_claims(claims: Claims) -> Result<Principal, AuthError> {
    let sub = match claims.sub {
        Value::String(sub) if !sub.trim().is_empty() => sub,
        _ => return Err(AuthError::MissingSub),
    };
    let scopes = match claims.scope {
        Value::Null => Vec::new(),
        // OAuth style (RFC 8693 §4.2): one space-separated string.
        Value::String(scope) => scope.split_whitespace().map(str::to_owned).collect(),
        // Some identity providers send an array; accept it when every item is a string.
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                _ => Err(AuthError::Malformed("scope claim must be a string")),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(AuthError::Malformed("scope claim must be a string")),
    };
    Ok(Principal { sub, scopes })
}

fn map_jwt_error(err: jsonwebtoken::errors::Error) -> AuthError {
    match err.kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm => AuthError::WrongAlgorithm,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "iss" => AuthError::WrongIssuer,
            "aud" => AuthError::WrongAudience,
            "exp" => AuthError::Malformed("token has no exp claim"),
            _ => AuthError::Malformed("token lacks a required claim"),
        },
        ErrorKind::InvalidClaimFormat(_) => AuthError::Malformed("a time claim is not a number"),
        // Keys are checked when loaded, so a key that cannot verify means the signature is bad.
        ErrorKind::InvalidKeyFormat
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey => AuthError::BadSignature,
        _ => AuthError::Malformed("not a signed JWT"),
    }
}

/// Load a PEM public key; the algorithm follows from the key type, never from a token.
pub(super) fn key_from_pem(pem: &[u8]) -> Result<(Algorithm, DecodingKey), String> {
    let text = std::str::from_utf8(pem).map_err(|_| "not a PEM file".to_string())?;
    if text.contains("PRIVATE KEY-----") {
        return Err("holds a private key; configure the public key (openssl pkey -pubout)".into());
    }
    if text.contains("CERTIFICATE-----") {
        return Err(
            "holds a certificate; configure its public key (openssl x509 -pubkey -noout)".into(),
        );
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        // from_rsa_pem only reads the PEM structure; parsing (n, e) now makes a broken key fail
        // at startup instead of turning every request into "invalid signature".
        Jwk::from_decoding_key(&key, Some(Algorithm::RS256))
            .map_err(|_| "not a valid RSA public key".to_string())?;
        return Ok((Algorithm::RS256, key));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        let point_len = key.try_get_as_bytes().map(<[u8]>::len).unwrap_or(0);
        if point_len != 65 {
            return Err("EC key is not on curve P-256; only P-256 (ES256) is supported".into());
        }
        check_ec_point(&key, Algorithm::ES256)
            .map_err(|_| "not a valid EC P-256 public key".to_string())?;
        return Ok((Algorithm::ES256, key));
    }
    Err("not an RSA or EC P-256 public key in PEM format".into())
}

/// Building the verifier parses the point and rejects one that is not on the curve.
pub(super) fn check_ec_point(key: &DecodingKey, alg: Algorithm) -> Result<(), ()> {
    jsonwebtoken::crypto::verify("", b"", key, alg)
        .map(|_| ())
        .map_err(|_| ())
}
