//! Google service-account OAuth2: the key file, the RS256 assertion, and a cached access token
//! refreshed before expiry with at most one fetch in flight.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use super::{FcmSetupError, describe_transport_error, read_limited};
use crate::providers::PushOutcome;

/// The one scope FCM sends need.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// The JWT-bearer grant type (RFC 7523).
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Google's token endpoint, used when the key file names none.
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// Assertion lifetime: Google's maximum.
const ASSERTION_LIFETIME: u64 = 3600;
/// Refresh this long before the access token expires (PROTOCOLS.md: ~5 minutes).
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// Don't hand out a token this close to its expiry: it could die in flight.
const EXPIRY_SAFETY: Duration = Duration::from_secs(30);
/// Google omits nothing, but if `expires_in` is missing assume its usual value.
const DEFAULT_EXPIRES_IN: u64 = 3599;
/// Bound on one token request, so a hung endpoint can't hold the refresh lock forever.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(20);

/// The parts of a service-account JSON key Herald uses. `Debug` never shows the key.
pub(crate) struct ServiceAccount {
    pub project_id: String,
    pub client_email: String,
    key_id: Option<String>,
    key: EncodingKey,
    pub token_uri: String,
}

impl fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    project_id: Option<String>,
    private_key_id: Option<String>,
    private_key: Option<String>,
    client_email: Option<String>,
    token_uri: Option<String>,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

impl ServiceAccount {
    /// Read and check a key file; `token_uri` overrides the file's.
    pub fn from_file(path: &Path, token_uri: Option<&str>) -> Result<Self, FcmSetupError> {
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| FcmSetupError::Read {
            path: file.clone(),
            source,
        })?;
        // serde_json's message could quote file content: keep only its position.
        let key: KeyFile = serde_json::from_slice(&bytes).map_err(|e| FcmSetupError::Parse {
            path: file.clone(),
            detail: format!(
                "{:?} error at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            ),
        })?;
        let missing = |field: &'static str| FcmSetupError::MissingField {
            path: file.clone(),
            field,
        };
        if let Some(kind) = &key.kind
            && kind != "service_account"
        {
            return Err(FcmSetupError::Field {
                path: file,
                field: "type",
                problem: format!("is {kind:?}, expected \"service_account\""),
            });
        }
        let non_empty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        let project_id = non_empty(key.project_id).ok_or_else(|| missing("project_id"))?;
        let client_email = non_empty(key.client_email).ok_or_else(|| missing("client_email"))?;
        let pem = non_empty(key.private_key).ok_or_else(|| missing("private_key"))?;
        let signing_key =
            EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|_| FcmSetupError::Field {
                path: file.clone(),
                field: "private_key",
                problem: "is not an RSA private key in PEM form".into(),
            })?;
        let token_uri = token_uri
            .map(str::to_owned)
            .or(non_empty(key.token_uri))
            .unwrap_or_else(|| DEFAULT_TOKEN_URI.to_owned());
        super::check_url("token_uri", &token_uri)?;
        let account = ServiceAccount {
            project_id,
            client_email,
            key_id: non_empty(key.private_key_id),
            key: signing_key,
            token_uri,
        };
        // Sign once now so a key that parses but cannot sign fails at start, not at first send.
        account
            .assertion(SystemTime::now())
            .map_err(|_| FcmSetupError::Field {
                path: file,
                field: "private_key",
                problem: "cannot sign RS256 with this key".into(),
            })?;
        Ok(account)
    }

    /// A signed RS256 assertion valid for an hour from `now`.
    pub fn assertion(&self, now: SystemTime) -> Result<String, jsonwebtoken::errors::Error> {
        let iat = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.key_id.clone();
        let claims = Claims {
            iss: &self.client_email,
            scope: FCM_SCOPE,
            aud: &self.token_uri,
            iat,
            exp: iat + ASSERTION_LIFETIME,
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
    }
}

/// An OAuth2 access token. `Debug` is redacted so it never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct AccessToken(Arc<str>);

impl AccessToken {
    /// The bearer value, only for the Authorization header.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

/// Why no access token could be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenError {
    /// The endpoint refused us (invalid_grant, invalid_scope…) or answered nonsense.
    Rejected(String),
    /// Unreachable, timed out, 429 or 5xx: try later.
    Unavailable {
        reason: String,
        retry_after: Option<Duration>,
    },
}

impl TokenError {
    /// The push outcome for a send that could not get a token.
    pub fn into_outcome(self) -> PushOutcome {
        match self {
            TokenError::Rejected(reason) => PushOutcome::Misconfigured { reason },
            TokenError::Unavailable {
                reason,
                retry_after,
            } => PushOutcome::Retry {
                retry_after,
                reason,
            },
        }
    }
}

struct Cached {
    token: AccessToken,
    /// Past this, the next caller refreshes.
    refresh_at: Instant,
    /// Past this, the token may not be handed out at all.
    usable_until: Instant,
}

#[derive(Default)]
struct State {
    current: Option<Cached>,
    /// Completed fetches, so a waiter can tell that one finished while it waited.
    fetches: u64,
    last_failure: Option<TokenError>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    expires_in: Option<u64>,
    token_type: Option<String>,
}

#[derive(Deserialize)]
struct OAuthError {
    error: Option<String>,
    error_description: Option<String>,
}

/// Hands out a cached access token, fetching a new one (one at a time) when needed.
pub(crate) struct TokenSource {
    account: ServiceAccount,
    http: reqwest::Client,
    state: Mutex<State>,
    /// Held for the whole of a fetch: that is what makes it single-flight.
    refresh: tokio::sync::Mutex<()>,
}

impl TokenSource {
    /// A source for `account`, fetching through `http`.
    pub fn new(account: ServiceAccount, http: reqwest::Client) -> Self {
        Self {
            account,
            http,
            state: Mutex::new(State::default()),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    /// The service account this source signs for.
    pub fn account(&self) -> &ServiceAccount {
        &self.account
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding this lock; recover rather than propagate poison.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A token to send with: the cached one, or a fresh one.
    pub async fn get(&self) -> Result<AccessToken, TokenError> {
        let now = Instant::now();
        let (seen, still_usable) = {
            let s = self.lock();
            match &s.current {
                Some(c) if now < c.refresh_at => return Ok(c.token.clone()),
                Some(c) if now < c.usable_until => (s.fetches, Some(c.token.clone())),
                _ => (s.fetches, None),
            }
        };
        let _guard = match &still_usable {
            // Due for refresh but still valid: if someone is already refreshing, don't queue.
            Some(token) => match self.refresh.try_lock() {
                Ok(guard) => guard,
                Err(_) => return Ok(token.clone()),
            },
            None => self.refresh.lock().await,
        };
        {
            // Whoever held the lock before us may have just refreshed, or just failed.
            let s = self.lock();
            if let Some(c) = &s.current
                && Instant::now() < c.refresh_at
            {
                return Ok(c.token.clone());
            }
            if s.fetches != seen
                && let Some(failure) = &s.last_failure
            {
                return still_usable.ok_or_else(|| failure.clone());
            }
        }
        let started = Instant::now();
        let result = self.fetch().await;
        let mut s = self.lock();
        s.fetches += 1;
        match result {
            Ok((token, lifetime)) => {
                s.current = Some(Cached {
                    token: token.clone(),
                    refresh_at: started + lifetime.saturating_sub(REFRESH_MARGIN).max(lifetime / 2),
                    usable_until: started
                        + lifetime.saturating_sub(EXPIRY_SAFETY.min(lifetime / 4)),
                });
                s.last_failure = None;
                Ok(token)
            }
            Err(e) => {
                tracing::warn!(error = ?e, "fcm: access token fetch failed");
                s.last_failure = Some(e.clone());
                still_usable.ok_or(e)
            }
        }
    }

    /// FCM refused `token`: forget it, unless it was already replaced.
    pub fn invalidate(&self, token: &AccessToken) {
        let mut s = self.lock();
        if s.current.as_ref().is_some_and(|c| &c.token == token) {
            s.current = None;
        }
    }

    async fn fetch(&self) -> Result<(AccessToken, Duration), TokenError> {
        let assertion = self
            .account
            .assertion(SystemTime::now())
            .map_err(|e| TokenError::Rejected(format!("oauth: cannot sign assertion: {e}")))?;
        let response = self
            .http
            .post(&self.account.token_uri)
            .form(&[
                ("grant_type", JWT_BEARER_GRANT),
                ("assertion", assertion.as_str()),
            ])
            .timeout(TOKEN_TIMEOUT)
            .send()
            .await
            .map_err(|e| TokenError::Unavailable {
                reason: format!("oauth: {}", describe_transport_error(&e)),
                retry_after: None,
            })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| super::classify::parse_retry_after(v, SystemTime::now()));
        let body = read_limited(response).await;
        if status.is_success() {
            let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|_| {
                TokenError::Rejected("oauth: token endpoint answered 200 without JSON".into())
            })?;
            let token = answer
                .access_token
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    TokenError::Rejected(
                        "oauth: token endpoint answered without access_token".into(),
                    )
                })?;
            if let Some(kind) = answer.token_type
                && !kind.eq_ignore_ascii_case("bearer")
            {
                return Err(TokenError::Rejected(format!(
                    "oauth: unexpected token_type {kind:?}"
                )));
            }
            let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(DEFAULT_EXPIRES_IN));
            return Ok((AccessToken(token.into()), lifetime));
        }
        let detail = serde_json::from_slice::<OAuthError>(&body)
            .ok()
            .map(|e| {
                let mut d = e.error.unwrap_or_default();
                if let Some(desc) = e.error_description {
                    d.push_str(": ");
                    d.extend(desc.chars().take(200));
                }
                d
            })
            .unwrap_or_default();
        let reason = format!(
            "oauth: token endpoint answered {} {detail}",
            status.as_u16()
        );
        let reason = reason.trim_end().to_owned();
        if status.as_u16() == 429 || status.as_u16() == 408 || status.is_server_error() {
            Err(TokenError::Unavailable {
                reason,
                retry_after,
            })
        } else {
            // invalid_grant (bad key, wrong client_email, clock skew), invalid_scope, 404 on a
            // wrong token_uri…: only a person can fix these.
            Err(TokenError::Rejected(reason))
        }
    }
}
