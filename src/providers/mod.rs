//! Push providers: APNs and FCM senders, their configuration, and the one outcome type the
//! dispatcher decides on.

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;

pub mod apns;
pub mod fcm;
pub mod registry;
pub mod tls;

pub use registry::{AppSenders, Providers, ProvidersError};

/// One push app: a device's `appId` selects it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// The device's `appId`; also the default APNs topic.
    pub id: String,
    /// APNs credentials; absent = this app has no iOS push.
    #[serde(default)]
    pub apns: Option<ApnsAppConfig>,
    /// FCM credentials; absent = this app has no Android push.
    #[serde(default)]
    pub fcm: Option<FcmAppConfig>,
}

/// `[apps.apns]`: token-based (.p8) APNs credentials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsAppConfig {
    /// PKCS#8 .p8 file holding the ES256 signing key.
    pub key_file: PathBuf,
    /// The key's 10-character id (`kid`).
    pub key_id: String,
    /// The developer team id (`iss`).
    pub team_id: String,
    /// `apns-topic`; defaults to the app id.
    #[serde(default)]
    pub topic: Option<String>,
    /// Production endpoint.
    #[serde(default = "default_apns_production")]
    pub production_url: String,
    /// Sandbox endpoint.
    #[serde(default = "default_apns_sandbox")]
    pub sandbox_url: String,
    /// Extra trusted root certificates (PEM), e.g. the test CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// `[apps.fcm]`: FCM HTTP v1 with a service account.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmAppConfig {
    /// Google service-account JSON key (project_id, client_email, private_key, token_uri).
    pub service_account_file: PathBuf,
    /// FCM endpoint.
    #[serde(default = "default_fcm_base")]
    pub base_url: String,
    /// Overrides the key file's `token_uri`.
    #[serde(default)]
    pub token_uri: Option<String>,
    /// Extra trusted root certificates (PEM), e.g. the test CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_apns_production() -> String {
    "https://api.push.apple.com".into()
}
fn default_apns_sandbox() -> String {
    "https://api.sandbox.push.apple.com".into()
}
fn default_fcm_base() -> String {
    "https://fcm.googleapis.com".into()
}

/// What became of one push: the dispatcher decides on this class, never on raw status codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// Accepted by the provider; its message id when it gave one.
    Delivered {
        /// `apns-id` or FCM message name.
        provider_id: Option<String>,
    },
    /// Try again later (429, 5xx, timeouts, connection loss).
    Retry {
        /// Never retry before this (the server's Retry-After), when given.
        retry_after: Option<Duration>,
        /// Provider reason or transport error, for the record.
        reason: String,
    },
    /// The token is dead: prune the device.
    InvalidToken {
        /// Provider reason, e.g. `Unregistered`, `UNREGISTERED`.
        reason: String,
        /// APNs 410 timestamp: the token was invalid since then.
        since: Option<DateTime<Utc>>,
    },
    /// This message can never be delivered (payload too large, bad header...).
    Permanent {
        /// Provider reason.
        reason: String,
    },
    /// Credentials or configuration are wrong: hold deliveries and alert, never drop.
    Misconfigured {
        /// Provider reason.
        reason: String,
    },
}
