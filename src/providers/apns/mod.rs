//! APNs HTTP/2 provider API sender (token auth).
//!
//! One [`ApnsSender`] per app: an ES256 provider token cached per key, one long-lived multiplexed
//! HTTP/2 connection per environment (opened on first use, replaced after GOAWAY, loss or 503),
//! and every answer or failure classified into a [`PushOutcome`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::Full;
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::{ApnsAppConfig, PushOutcome};

pub mod classify;
pub mod connection;
pub mod payload;
pub mod token;

pub use classify::{ApnsReason, classify, classify_transport};
pub use connection::{ConnOptions, ConnectionGone, SendError};
pub use payload::{PayloadContent, PayloadError, PayloadSpec, build_payload, build_payload_with};
pub use token::{Clock, ProviderClaims, TokenCache, TokenError};

use classify::Action;
use connection::Endpoint;

/// Largest payload APNs accepts for most push types.
pub const MAX_PAYLOAD: usize = 4096;
/// Largest VoIP payload.
pub const MAX_VOIP_PAYLOAD: usize = 5120;
/// Longest `apns-collapse-id`, in bytes.
pub const MAX_COLLAPSE_ID: usize = 64;

/// Which APNs environment a device token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Environment {
    /// `api.push.apple.com`: App Store and TestFlight builds.
    #[default]
    Production,
    /// `api.sandbox.push.apple.com`: development builds.
    Sandbox,
}

/// `apns-push-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[allow(missing_docs)] // Apple's push types verbatim.
pub enum PushType {
    #[default]
    Alert,
    Background,
    Voip,
    Location,
    Complication,
    FileProvider,
    Mdm,
    LiveActivity,
    PushToTalk,
}

impl PushType {
    /// The header value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Alert => "alert",
            Self::Background => "background",
            Self::Voip => "voip",
            Self::Location => "location",
            Self::Complication => "complication",
            Self::FileProvider => "fileprovider",
            Self::Mdm => "mdm",
            Self::LiveActivity => "liveactivity",
            Self::PushToTalk => "pushtotalk",
        }
    }

    /// Parses a header value.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Alert,
            Self::Background,
            Self::Voip,
            Self::Location,
            Self::Complication,
            Self::FileProvider,
            Self::Mdm,
            Self::LiveActivity,
            Self::PushToTalk,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }

    /// Largest payload for this type.
    pub fn max_payload(&self) -> usize {
        match self {
            Self::Voip => MAX_VOIP_PAYLOAD,
            _ => MAX_PAYLOAD,
        }
    }

    /// What Apple requires after the bundle id in `apns-topic` for this type.
    pub fn topic_suffix(&self) -> &'static str {
        match self {
            Self::Voip => ".voip",
            Self::Complication => ".complication",
            Self::FileProvider => ".pushkit.fileprovider",
            Self::Location => ".location-query",
            Self::LiveActivity => ".push-type.liveactivity",
            Self::PushToTalk => ".voip-ptt",
            Self::Alert | Self::Background | Self::Mdm => "",
        }
    }
}

/// One notification to one device.
#[derive(Debug, Clone)]
pub struct ApnsRequest {
    /// Hex device token.
    pub device_token: String,
    /// Environment the token was issued for.
    pub environment: Environment,
    /// `apns-push-type`.
    pub push_type: PushType,
    /// `apns-priority`: 10, 5 or 1 (background pushes must use 5).
    pub priority: u8,
    /// `apns-expiration` (UNIX seconds; 0 = deliver now or never); none = APNs default.
    pub expiration: Option<i64>,
    /// `apns-collapse-id` (≤ 64 bytes).
    pub collapse_id: Option<String>,
    /// `apns-id`; generated when absent so that resends keep the same id.
    pub apns_id: Option<Uuid>,
    /// `apns-topic`; default: the app's topic (or app id) plus the push type's required suffix.
    pub topic: Option<String>,
    /// JSON payload (see [`build_payload`]).
    pub payload: Bytes,
}

impl Default for ApnsRequest {
    /// An immediate production alert with no token or payload yet.
    fn default() -> Self {
        Self {
            device_token: String::new(),
            environment: Environment::Production,
            push_type: PushType::Alert,
            priority: 10,
            expiration: None,
            collapse_id: None,
            apns_id: None,
            topic: None,
            payload: Bytes::new(),
        }
    }
}

/// Why a sender could not be set up. Names files and key ids, never key material.
#[derive(Debug, thiserror::Error)]
pub enum ApnsSetupError {
    /// The .p8 file could not be read.
    #[error("app {app}: cannot read APNs key file {path}: {source}")]
    KeyFile {
        /// App id.
        app: String,
        /// Key file path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The .p8 file is not a usable ES256 key.
    #[error("app {app}: APNs key {key_id} ({path}) is not a usable P-256 PKCS#8 key: {reason}")]
    Key {
        /// App id.
        app: String,
        /// Key id.
        key_id: String,
        /// Key file path.
        path: String,
        /// Cause, without key material.
        reason: String,
    },
    /// A required setting is empty.
    #[error("app {app}: APNs {field} must not be empty")]
    Empty {
        /// App id.
        app: String,
        /// Setting name.
        field: &'static str,
    },
    /// An endpoint URL is unusable.
    #[error("app {app}: APNs {which} URL {url:?}: {reason}")]
    Url {
        /// App id.
        app: String,
        /// `production` or `sandbox`.
        which: &'static str,
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The extra CA file or TLS setup failed.
    #[error("app {app}: APNs TLS setup: {source}")]
    Tls {
        /// App id.
        app: String,
        /// Cause.
        source: crate::providers::tls::TlsError,
    },
}

/// Sender tuning; [`Default`] suits production.
#[derive(Debug, Clone)]
pub struct SenderOptions {
    /// Clock for token ages (tests advance it).
    pub clock: Clock,
    /// Most requests in flight per sender (both environments); more wait their turn.
    pub max_in_flight: usize,
    /// Resends of requests APNs provably did not process (GOAWAY) before giving up with Retry.
    pub max_resends: u32,
    /// Connection tuning.
    pub conn: ConnOptions,
}

impl Default for SenderOptions {
    fn default() -> Self {
        Self {
            clock: Clock::system(),
            max_in_flight: 1000,
            max_resends: 3,
            conn: ConnOptions {
                connect_timeout: Duration::from_secs(10),
                request_timeout: Duration::from_secs(30),
                keepalive_interval: Duration::from_secs(60),
                keepalive_timeout: Duration::from_secs(20),
            },
        }
    }
}

/// Sends notifications for one app; cheap to clone.
#[derive(Clone, Debug)]
pub struct ApnsSender {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    topic: String,
    tokens: TokenCache,
    production: Endpoint,
    sandbox: Endpoint,
    in_flight: Semaphore,
    max_resends: u32,
}

static APNS_TOPIC: HeaderName = HeaderName::from_static("apns-topic");
static APNS_PUSH_TYPE: HeaderName = HeaderName::from_static("apns-push-type");
static APNS_PRIORITY: HeaderName = HeaderName::from_static("apns-priority");
static APNS_ID: HeaderName = HeaderName::from_static("apns-id");
static APNS_EXPIRATION: HeaderName = HeaderName::from_static("apns-expiration");
static APNS_COLLAPSE_ID: HeaderName = HeaderName::from_static("apns-collapse-id");

fn permanent(reason: &str) -> PushOutcome {
    PushOutcome::Permanent {
        reason: reason.to_owned(),
    }
}

impl ApnsSender {
    /// A sender for `app_id` with production defaults; reads the .p8 now.
    pub fn new(app_id: &str, cfg: &ApnsAppConfig) -> Result<Self, ApnsSetupError> {
        Self::with_options(app_id, cfg, SenderOptions::default())
    }

    /// A sender with explicit tuning (tests: a shared [`Clock`], short timeouts).
    pub fn with_options(
        app_id: &str,
        cfg: &ApnsAppConfig,
        opts: SenderOptions,
    ) -> Result<Self, ApnsSetupError> {
        let app = || app_id.to_owned();
        for (field, value) in [("key_id", &cfg.key_id), ("team_id", &cfg.team_id)] {
            if value.trim().is_empty() {
                return Err(ApnsSetupError::Empty { app: app(), field });
            }
        }
        let path = cfg.key_file.display().to_string();
        let p8 = std::fs::read(&cfg.key_file).map_err(|source| ApnsSetupError::KeyFile {
            app: app(),
            path: path.clone(),
            source,
        })?;
        let tokens =
            TokenCache::new(&p8, &cfg.key_id, &cfg.team_id, opts.clock.clone()).map_err(|e| {
                ApnsSetupError::Key {
                    app: app(),
                    key_id: cfg.key_id.clone(),
                    path,
                    reason: match e {
                        TokenError::Sign { reason, .. } => reason,
                        other => other.to_string(),
                    },
                }
            })?;
        let tls_err = |source| ApnsSetupError::Tls { app: app(), source };
        let extra_ca = match &cfg.ca_file {
            Some(p) => Some(crate::providers::tls::read_file(p).map_err(tls_err)?),
            None => None,
        };
        let tls = Arc::new(
            crate::providers::tls::client_config(extra_ca.as_deref(), &[b"h2"]).map_err(tls_err)?,
        );
        let endpoint = |which, url: &str| {
            Endpoint::new(url, tls.clone(), opts.conn.clone()).map_err(|reason| {
                ApnsSetupError::Url {
                    app: app(),
                    which,
                    url: url.to_owned(),
                    reason,
                }
            })
        };
        let topic = cfg.topic.clone().unwrap_or_else(app);
        if topic.is_empty() {
            return Err(ApnsSetupError::Empty {
                app: app(),
                field: "topic",
            });
        }
        Ok(Self {
            inner: Arc::new(Inner {
                topic,
                production: endpoint("production", &cfg.production_url)?,
                sandbox: endpoint("sandbox", &cfg.sandbox_url)?,
                tokens,
                in_flight: Semaphore::new(opts.max_in_flight.max(1)),
                max_resends: opts.max_resends,
            }),
        })
    }

    /// The provider-token cache (diagnostics and tests).
    pub fn tokens(&self) -> &TokenCache {
        &self.inner.tokens
    }

    /// Sends one notification; every failure is classified, nothing panics.
    pub async fn send(&self, n: &ApnsRequest) -> PushOutcome {
        if let Err(outcome) = precheck(n) {
            return outcome;
        }
        let inner = &self.inner;
        let Ok(_permit) = inner.in_flight.acquire().await else {
            return classify_transport("sender shut down");
        };
        let endpoint = match n.environment {
            Environment::Production => &inner.production,
            Environment::Sandbox => &inner.sandbox,
        };
        let topic = match &n.topic {
            Some(t) => t.clone(),
            None => format!("{}{}", inner.topic, n.push_type.topic_suffix()),
        };
        let apns_id = n.apns_id.unwrap_or_else(Uuid::new_v4);
        let (mut renewed, mut reconnected, mut resends) = (false, false, 0);
        loop {
            let (jwt, bearer) = match inner.tokens.current_with_header() {
                Ok(token) => token,
                Err(e) => {
                    return PushOutcome::Misconfigured {
                        reason: e.to_string(),
                    };
                }
            };
            let req = match build_request(endpoint, n, &topic, apns_id, bearer) {
                Ok(req) => req,
                Err(outcome) => return outcome,
            };
            let answer = match endpoint.send(req).await {
                Ok(answer) => answer,
                Err(SendError::Unprocessed(why, _)) if resends < inner.max_resends => {
                    resends += 1;
                    tracing::debug!(%apns_id, error = %why, "resending a request APNs did not process");
                    continue;
                }
                Err(e) => return classify_transport(&e.to_string()),
            };
            let verdict = classify(answer.status, &answer.headers, &answer.body);
            match verdict.action {
                Action::None => return verdict.outcome,
                Action::RenewToken if !renewed => match inner.tokens.renew_after_rejection(&jwt) {
                    Ok(()) => renewed = true,
                    Err(TokenError::TooSoon(wait)) => {
                        tracing::warn!(
                            topic = %inner.topic,
                            "APNs says our provider token expired, but it is younger than 20 minutes: clock skew?"
                        );
                        return PushOutcome::Retry {
                            retry_after: Some(wait),
                            reason: "ExpiredProviderToken".into(),
                        };
                    }
                    Err(e) => {
                        return PushOutcome::Misconfigured {
                            reason: e.to_string(),
                        };
                    }
                },
                Action::RenewToken => return verdict.outcome,
                Action::Reconnect => {
                    endpoint.invalidate(answer.generation);
                    return verdict.outcome;
                }
                Action::ReconnectAndRetry => {
                    endpoint.invalidate(answer.generation);
                    if reconnected {
                        return verdict.outcome;
                    }
                    reconnected = true;
                }
            }
        }
    }
}

/// Refuses locally what APNs would refuse, without spending a stream on it.
fn precheck(n: &ApnsRequest) -> Result<(), PushOutcome> {
    let token = &n.device_token;
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        // Such a token can never address a device: prune it.
        return Err(PushOutcome::InvalidToken {
            reason: "BadDeviceToken".into(),
            since: None,
        });
    }
    if !matches!(n.priority, 1 | 5 | 10)
        || (n.push_type == PushType::Background && n.priority == 10)
    {
        return Err(permanent("BadPriority"));
    }
    if n.collapse_id
        .as_ref()
        .is_some_and(|c| c.len() > MAX_COLLAPSE_ID)
    {
        return Err(permanent("BadCollapseId"));
    }
    if n.expiration.is_some_and(|e| e < 0) {
        return Err(permanent("BadExpirationDate"));
    }
    if n.topic.as_ref().is_some_and(|t| t.is_empty()) {
        return Err(permanent("MissingTopic"));
    }
    if n.payload.is_empty() {
        return Err(permanent("PayloadEmpty"));
    }
    if n.payload.len() > n.push_type.max_payload() {
        return Err(permanent("PayloadTooLarge"));
    }
    Ok(())
}

fn build_request(
    endpoint: &Endpoint,
    n: &ApnsRequest,
    topic: &str,
    apns_id: Uuid,
    bearer: HeaderValue,
) -> Result<Request<Full<Bytes>>, PushOutcome> {
    let value = |v: &str, reason: &str| HeaderValue::from_str(v).map_err(|_| permanent(reason));
    let uri = endpoint
        .uri(&format!("/3/device/{}", n.device_token))
        .map_err(|_| permanent("BadPath"))?;
    let mut req = Request::new(Full::new(n.payload.clone()));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri;
    let h = req.headers_mut();
    h.insert(AUTHORIZATION, bearer);
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(APNS_TOPIC.clone(), value(topic, "BadTopic")?);
    h.insert(
        APNS_PUSH_TYPE.clone(),
        HeaderValue::from_static(n.push_type.as_str()),
    );
    h.insert(
        APNS_PRIORITY.clone(),
        HeaderValue::from(u16::from(n.priority)),
    );
    let mut id = Uuid::encode_buffer();
    h.insert(
        APNS_ID.clone(),
        value(apns_id.hyphenated().encode_lower(&mut id), "BadMessageId")?,
    );
    if let Some(exp) = n.expiration {
        h.insert(APNS_EXPIRATION.clone(), HeaderValue::from(exp));
    }
    if let Some(c) = &n.collapse_id {
        h.insert(APNS_COLLAPSE_ID.clone(), value(c, "BadCollapseId")?);
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> ApnsRequest {
        ApnsRequest {
            device_token: "ab12".into(),
            priority: 10,
            payload: Bytes::from_static(b"{}"),
            ..Default::default()
        }
    }

    #[test]
    fn precheck_rows() {
        assert_eq!(precheck(&req()), Ok(()));
        let bad = |f: &dyn Fn(&mut ApnsRequest)| {
            let mut r = req();
            f(&mut r);
            precheck(&r).unwrap_err()
        };
        assert!(matches!(
            bad(&|r| r.device_token = "xyz".into()),
            PushOutcome::InvalidToken { .. }
        ));
        assert_eq!(bad(&|r| r.priority = 7), permanent("BadPriority"));
        assert_eq!(
            bad(&|r| r.push_type = PushType::Background),
            permanent("BadPriority")
        );
        assert_eq!(
            bad(&|r| r.collapse_id = Some("x".repeat(65))),
            permanent("BadCollapseId")
        );
        assert_eq!(
            bad(&|r| r.expiration = Some(-1)),
            permanent("BadExpirationDate")
        );
        assert_eq!(
            bad(&|r| r.payload = Bytes::new()),
            permanent("PayloadEmpty")
        );
        let big = Bytes::from(vec![b' '; 4097]);
        assert_eq!(
            bad(&|r| r.payload = big.clone()),
            permanent("PayloadTooLarge")
        );
        let mut voip = req();
        voip.push_type = PushType::Voip;
        voip.payload = Bytes::from(vec![b' '; 5120]);
        assert_eq!(precheck(&voip), Ok(()));
    }

    #[test]
    fn push_types_round_trip() {
        for t in [
            PushType::Alert,
            PushType::Complication,
            PushType::PushToTalk,
        ] {
            assert_eq!(PushType::parse(t.as_str()), Some(t));
        }
        assert_eq!(PushType::parse("nope"), None);
    }
}
