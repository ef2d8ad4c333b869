//! JWT verification and the request extractors that carry the authenticated user.
//! (Temporary HS256-only version; replaced by the full verifier on merge.)

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRef, FromRequestParts};
use http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, Secret};
use crate::error::ApiError;

/// Verifies bearer tokens.
#[derive(Clone)]
pub struct Authenticator {
    key: Arc<DecodingKey>,
    validation: Arc<Validation>,
}

/// Why the authenticator could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthSetupError(String);

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No bearer token.
    #[error("missing bearer token")]
    Missing,
    /// Anything else.
    #[error("invalid token")]
    Invalid,
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        ApiError::Unauthorized(err.to_string())
    }
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The user (JWT `sub`).
    pub sub: String,
    /// OAuth scopes.
    pub scopes: Vec<String>,
}

impl Principal {
    /// Whether the token carries `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
    /// 403 unless the token carries `scope`.
    pub fn require_scope(&self, scope: &str) -> Result<(), ApiError> {
        if self.has_scope(scope) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this token lacks the scope {scope}"
            )))
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    exp: u64,
    iat: u64,
}

impl Authenticator {
    /// Build from configuration.
    pub async fn from_config(cfg: &AuthConfig) -> Result<Self, AuthSetupError> {
        if cfg.hs256_secret.is_empty() {
            return Err(AuthSetupError("auth.hs256_secret: not set".into()));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = cfg.leeway_secs;
        Ok(Self {
            key: Arc::new(DecodingKey::from_secret(
                cfg.hs256_secret.expose().as_bytes(),
            )),
            validation: Arc::new(validation),
        })
    }

    /// Verify a token.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|_| AuthError::Invalid)?;
        Ok(Principal {
            sub: data.claims.sub,
            scopes: data
                .claims
                .scope
                .unwrap_or_default()
                .split_whitespace()
                .map(String::from)
                .collect(),
        })
    }
}

/// Extractor: the caller, authenticated by `Authorization: Bearer`.
pub struct AuthUser(pub Principal);

impl<S> FromRequestParts<S> for AuthUser
where
    Authenticator: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(AuthError::Missing)?;
        let auth = Authenticator::from_ref(state);
        Ok(AuthUser(auth.verify(token).await?))
    }
}

/// Mint a development token signed with the HS256 secret.
pub fn mint_hs256(
    secret: &Secret,
    sub: &str,
    scope: Option<&str>,
    ttl: Duration,
    _issuer: Option<&str>,
    _audience: Option<&str>,
) -> Result<String, AuthError> {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: sub.into(),
        scope: scope.map(String::from),
        iat: now,
        exp: now + ttl.as_secs(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .map_err(|_| AuthError::Invalid)
}

/// Parse `30s`, `15m`, `1h`, `7d` or plain seconds.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('d') => (&s[..s.len() - 1], 86400),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| Duration::from_secs(n * mult))
        .map_err(|_| format!("invalid ttl {s:?}"))
}
