//! FCM HTTP v1 sender (service-account OAuth2).
//!
//! One [`FcmSender`] per app: it owns the service account, a cached access token and one
//! long-lived HTTP/2 connection, and turns every answer into a [`PushOutcome`]. The transport
//! is Herald's own — the same multiplexed connection code as APNs for `messages:send` (in the
//! pipeline bench it took dispatch CPU per push from 68 to 56 µs on PostgreSQL against reqwest),
//! reqwest for the rare OAuth exchange — so the base URL and token endpoint can point at the
//! fake (PROTOCOLS.md).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::providers::apns::connection::{ConnOptions, Endpoint, SendError};
use crate::providers::tls::{self, TlsError};
use crate::providers::{FcmAppConfig, PushOutcome};

pub mod classify;
pub mod message;
mod oauth;

use classify::Verdict;
use oauth::{AccessToken, ServiceAccount, TokenSource};

pub use oauth::{FCM_SCOPE, JWT_BEARER_GRANT};

/// Default bound on one `messages:send` exchange.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Answers are small JSON documents; anything bigger is truncated (and then unparseable).
const MAX_ANSWER: usize = 64 * 1024;

/// Why an FCM sender could not be set up. Names files and fields, never key material.
#[derive(Debug, thiserror::Error)]
pub enum FcmSetupError {
    /// The key file could not be read.
    #[error("fcm: cannot read service account file {path}: {source}")]
    Read {
        /// File path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The key file is not JSON of the expected shape.
    #[error("fcm: service account file {path} is not valid JSON ({detail})")]
    Parse {
        /// File path.
        path: String,
        /// Error category and position.
        detail: String,
    },
    /// A required field is missing or empty.
    #[error("fcm: service account file {path} has no `{field}`")]
    MissingField {
        /// File path.
        path: String,
        /// Field name.
        field: &'static str,
    },
    /// A field is present but unusable.
    #[error("fcm: service account file {path}: `{field}` {problem}")]
    Field {
        /// File path.
        path: String,
        /// Field name.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A configured URL is not an absolute http(s) URL.
    #[error("fcm: `{field}` {url:?} is not an absolute http(s) URL")]
    BadUrl {
        /// Config field.
        field: &'static str,
        /// The value.
        url: String,
    },
    /// The extra CA file could not be used.
    #[error("fcm: ca_file: {0}")]
    Tls(#[from] TlsError),
    /// The HTTP client could not be built.
    #[error("fcm: cannot build HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// A notification shown by the device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FcmNotification {
    /// Title line.
    pub title: String,
    /// Body text.
    pub body: String,
}

/// One push to one FCM registration token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FcmRequest {
    /// The device's FCM registration token.
    pub device_token: String,
    /// Visible notification; `None` sends a data-only (background) message.
    pub notification: Option<FcmNotification>,
    /// App data, string → string as FCM requires; reserved keys are refused as Permanent.
    pub data: BTreeMap<String, String>,
    /// Android HIGH priority; on iOS apns-priority 10 for visible notifications.
    pub high_priority: bool,
    /// How long FCM keeps the message for an offline device (clamped to 28 days).
    pub ttl: Option<Duration>,
    /// Android collapse_key, also apns-collapse-id when ≤ 64 bytes.
    pub collapse_key: Option<String>,
    /// Extra or overriding APNs headers for iOS devices (e.g. apns-topic).
    pub apns_headers: BTreeMap<String, String>,
    /// Ask FCM to validate without delivering.
    pub validate_only: bool,
}

/// Sends to FCM for one app. Cheap to clone; clones share the token cache and connections.
#[derive(Clone)]
pub struct FcmSender {
    inner: Arc<Inner>,
    request_timeout: Duration,
}

struct Inner {
    app_id: String,
    send_url: String,
    send_uri: http::Uri,
    endpoint: Endpoint,
    tokens: TokenSource,
}

impl std::fmt::Debug for FcmSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FcmSender")
            .field("app_id", &self.inner.app_id)
            .field("send_url", &self.inner.send_url)
            .finish_non_exhaustive()
    }
}

/// Accept only absolute http(s) URLs.
fn check_url(field: &'static str, value: &str) -> Result<url::Url, FcmSetupError> {
    match url::Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => Ok(u),
        _ => Err(FcmSetupError::BadUrl {
            field,
            url: value.to_owned(),
        }),
    }
}

impl FcmSender {
    /// Read the key file and build the clients; no network traffic yet.
    pub fn new(app_id: &str, cfg: &FcmAppConfig) -> Result<Self, FcmSetupError> {
        let account =
            ServiceAccount::from_file(&cfg.service_account_file, cfg.token_uri.as_deref())?;
        let base = check_url("base_url", &cfg.base_url)?;
        let extra_ca = cfg.ca_file.as_deref().map(tls::read_file).transpose()?;
        let client = |prior_knowledge: bool| -> Result<reqwest::Client, FcmSetupError> {
            let tls = tls::client_config(extra_ca.as_deref(), &[b"h2", b"http/1.1"])?;
            let mut b = reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .tcp_nodelay(true)
                // A redirect could carry the bearer token to another host; classify instead.
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .http2_keep_alive_timeout(Duration::from_secs(10))
                .http2_keep_alive_while_idle(true)
                .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")));
            if prior_knowledge {
                // Plain http (the fake, tests): h2c, as there is no ALPN to negotiate HTTP/2.
                b = b.http2_prior_knowledge();
            }
            Ok(b.build()?)
        };
        // The token endpoint gets its own client: it may be HTTP/1.1-only and is rarely used.
        let oauth_http = client(false)?;
        let bad_base = || FcmSetupError::BadUrl {
            field: "base_url",
            url: cfg.base_url.clone(),
        };
        if base.query().is_some() {
            return Err(bad_base());
        }
        // The connection is to the origin; a path on the base URL (a proxy's prefix) leads the
        // request path.
        let origin = base.origin().ascii_serialization();
        let prefix = base.path().trim_end_matches('/');
        let tls = Arc::new(tls::client_config(extra_ca.as_deref(), &[b"h2"])?);
        let endpoint = Endpoint::new(
            &origin,
            tls,
            ConnOptions {
                connect_timeout: CONNECT_TIMEOUT,
                // Unused: `post` bounds each exchange by the sender's `request_timeout`.
                request_timeout: DEFAULT_REQUEST_TIMEOUT,
                keepalive_interval: Duration::from_secs(30),
                keepalive_timeout: Duration::from_secs(10),
            },
        )
        .map_err(|_| bad_base())?;
        let path = format!("{prefix}/v1/projects/{}/messages:send", account.project_id);
        let send_uri = endpoint.uri(&path).map_err(|_| bad_base())?;
        let send_url = format!("{origin}{path}");
        Ok(Self {
            inner: Arc::new(Inner {
                app_id: app_id.to_owned(),
                send_url,
                send_uri,
                endpoint,
                tokens: TokenSource::new(account, oauth_http),
            }),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        })
    }

    /// The same sender with another bound on each `messages:send` exchange.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The app this sender serves.
    pub fn app_id(&self) -> &str {
        &self.inner.app_id
    }

    /// The Firebase project from the key file.
    pub fn project_id(&self) -> &str {
        &self.inner.tokens.account().project_id
    }

    /// Send one message and classify the result. Never panics.
    // Debug level, like the dispatcher's per-delivery span: a span per push at info is a
    // measurable share of the pipeline's CPU under the fmt subscriber.
    #[tracing::instrument(level = "debug", skip_all, fields(app = %self.inner.app_id))]
    pub async fn send(&self, req: FcmRequest) -> PushOutcome {
        let validate_only = req.validate_only;
        let body = match message::build_message(req, SystemTime::now())
            .and_then(|m| message::request_body(&m, validate_only))
        {
            Ok(body) => bytes::Bytes::from(body),
            Err(reason) => return PushOutcome::Permanent { reason },
        };
        let token = match self.inner.tokens.get().await {
            Ok(t) => t,
            Err(e) => return e.into_outcome(),
        };
        let outcome = match self.post(&body, &token).await {
            Verdict::Outcome(o) => o,
            Verdict::Unauthorized(first) => {
                // Our token was refused (revoked, expired early): refresh once and resend.
                tracing::info!(app = %self.inner.app_id, reason = %first, "fcm: access token refused, refreshing");
                self.inner.tokens.invalidate(&token);
                let fresh = match self.inner.tokens.get().await {
                    Ok(t) => t,
                    Err(e) => return e.into_outcome(),
                };
                match self.post(&body, &fresh).await {
                    Verdict::Outcome(o) => o,
                    Verdict::Unauthorized(reason) => PushOutcome::Misconfigured {
                        reason: format!("{reason} (again after refreshing the access token)"),
                    },
                }
            }
        };
        tracing::debug!(?outcome, "fcm: sent");
        outcome
    }

    async fn post(&self, body: &bytes::Bytes, token: &AccessToken) -> Verdict {
        let retry = |reason: String| {
            Verdict::Outcome(PushOutcome::Retry {
                retry_after: None,
                reason,
            })
        };
        let request = http::Request::post(self.inner.send_uri.clone())
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.secret()),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, USER_AGENT)
            .body(http_body_util::Full::new(body.clone()));
        let request = match request {
            Ok(r) => r,
            // Only a token with bytes a header cannot carry gets here.
            Err(_) => return retry("the access token is not a valid header value".into()),
        };
        let sent = self
            .inner
            .endpoint
            .send_within(request, self.request_timeout)
            .await;
        let answer = match sent {
            Ok(answer) => answer,
            Err(SendError::TimedOut) => {
                return retry("timeout: no answer from FCM in time".into());
            }
            Err(e) => {
                let kind = match e {
                    SendError::Connect(_) => "connect error",
                    _ => "transport error",
                };
                return retry(format!("{kind}: {e}"));
            }
        };
        let retry_after = answer
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok());
        let body = &answer.body[..answer.body.len().min(MAX_ANSWER)];
        classify::classify(answer.status.as_u16(), retry_after, body, SystemTime::now())
    }
}

const USER_AGENT: &str = concat!("herald/", env!("CARGO_PKG_VERSION"));

/// Up to [`MAX_ANSWER`] bytes of the body; what arrived before an error is kept.
async fn read_limited(mut response: reqwest::Response) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < MAX_ANSWER {
        match response.chunk().await {
            Ok(Some(chunk)) => out.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %describe_transport_error(&e), "fcm: answer body cut short");
                break;
            }
        }
    }
    out.truncate(MAX_ANSWER);
    out
}

/// A transport error with its cause chain (no headers, so no credentials).
fn describe_transport_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect error"
    } else {
        "transport error"
    };
    let mut out = format!("{kind}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
