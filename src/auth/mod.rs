//! JWT verification and the request extractors that carry the authenticated user.
//!
//! The verification key and its algorithm come from configuration (HS256 secret, RS256/ES256
//! PEM, or a JWKS URL), never from the token, so a token cannot pick how it is checked.
//! Tokens are never logged: rejections carry a short fixed reason only.

mod dev;
mod jwks;
mod verifier;

#[cfg(test)]
mod tests;

use axum::extract::{FromRef, FromRequestParts};
use http::header::AUTHORIZATION;
use http::request::Parts;

use crate::error::ApiError;

pub use dev::{MintError, mint_hs256, parse_ttl};
pub use verifier::{AuthSetupError, Authenticator};

/// The authenticated caller: the token's `sub` and its OAuth scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user id (`sub` claim).
    pub sub: String,
    /// Scopes from the space-separated `scope` claim.
    pub scopes: Vec<String>,
}

impl Principal {
    /// Whether the token grants `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// 403 unless the token grants `scope`.
    pub fn require_scope(&self, scope: &str) -> Result<(), ApiError> {
        if self.has_scope(scope) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "missing required scope: {scope}"
            )))
        }
    }
}

/// Why a bearer token was refused; every variant is a 401 and its text is safe to send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header (or `access_token` where allowed).
    #[error("missing bearer token")]
    MissingCredentials,
    /// Not a well-formed bearer JWT; the reason is a fixed text, never token content.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The signature does not verify with the configured key.
    #[error("invalid token signature")]
    BadSignature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token has expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token is not valid yet")]
    NotYetValid,
    /// The header `alg` is not the algorithm of the configured key.
    #[error("token algorithm is not accepted")]
    WrongAlgorithm,
    /// `iss` is missing or not the configured issuer.
    #[error("token issuer is not accepted")]
    WrongIssuer,
    /// `aud` is missing or does not include the configured audience.
    #[error("token audience is not accepted")]
    WrongAudience,
    /// `sub` is missing, empty or not a string.
    #[error("token has no subject")]
    MissingSub,
    /// The token's `kid` is not in the JWKS, even after a refetch.
    #[error("token signing key is not known")]
    UnknownKey,
    /// The JWKS could not be fetched and no cached key matches.
    #[error("token signing keys are unavailable")]
    JwksUnavailable,
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        // The Display text is fixed per variant, so the token never reaches the response.
        match err {
            // Not the client's fault: a 401 could make an app log its user out.
            AuthError::JwksUnavailable => {
                ApiError::Unavailable("the token's signing keys cannot be fetched right now".into())
            }
            other => ApiError::Unauthorized(other.to_string()),
        }
    }
}

/// Extractor for an authenticated request (`Authorization: Bearer <jwt>` only).
#[derive(Debug, Clone)]
pub struct AuthUser(pub Principal);

/// Extractor for streaming endpoints: also accepts `?access_token=` (EventSource cannot set headers).
#[derive(Debug, Clone)]
pub struct StreamUser(pub Principal);

impl<S> FromRequestParts<S> for AuthUser
where
    Authenticator: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        authenticate(parts, &Authenticator::from_ref(state), false)
            .await
            .map(AuthUser)
    }
}

impl<S> FromRequestParts<S> for StreamUser
where
    Authenticator: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        authenticate(parts, &Authenticator::from_ref(state), true)
            .await
            .map(StreamUser)
    }
}

async fn authenticate(
    parts: &Parts,
    auth: &Authenticator,
    allow_query: bool,
) -> Result<Principal, ApiError> {
    let result = match credentials(parts, allow_query) {
        Ok(token) => auth.verify(&token).await,
        Err(err) => Err(err),
    };
    result.map_err(|err| {
        // Only the fixed reason is logged; the token itself never is.
        tracing::debug!(reason = %err, "bearer token rejected");
        ApiError::from(err)
    })
}

/// The bearer token of a request, if any; `allow_query` also accepts `?access_token=`.
pub fn bearer_token(parts: &Parts, allow_query: bool) -> Option<String> {
    credentials(parts, allow_query).ok()
}

/// The header wins over the query parameter, and a present but unusable header is an error
/// rather than a reason to fall back, so a client sees why its header was refused.
fn credentials(parts: &Parts, allow_query: bool) -> Result<String, AuthError> {
    let Some(value) = parts.headers.get(AUTHORIZATION) else {
        return if allow_query {
            query_token(parts).ok_or(AuthError::MissingCredentials)
        } else {
            Err(AuthError::MissingCredentials)
        };
    };
    let value = value
        .to_str()
        .map_err(|_| AuthError::Malformed("the Authorization header is not valid text"))?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::Malformed(
        "expected Authorization: Bearer <token>",
    ))?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthError::Malformed(
            "expected Authorization: Bearer <token>",
        ));
    }
    Ok(token.to_owned())
}

fn query_token(parts: &Parts) -> Option<String> {
    let query = parts.uri.query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "access_token")
        .map(|(_, value)| value.into_owned())
        .filter(|value| !value.is_empty())
}
