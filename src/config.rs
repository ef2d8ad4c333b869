//! Layered configuration: embedded defaults → optional TOML file → `HERALD_*` environment.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Deserializer};

use crate::providers::AppConfig;

/// The commented default configuration, compiled into the binary.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// Sections whose keys may be set as `HERALD_<SECTION>_<KEY>`.
const ENV_SECTIONS: &[&str] = &[
    "database", "http", "auth", "webhooks", "queue", "dispatch", "updates",
];

/// Longest update retention (100 years: "keep forever" for any practical purpose).
const MAX_RETENTION_DAYS: u64 = 36_500;

/// Longest time between purges (a year), so timer arithmetic cannot overflow.
const MAX_PURGE_INTERVAL_SECS: u64 = 365 * 86_400;

/// Top-level keys settable as `HERALD_<KEY>`.
const TOP_LEVEL_KEYS: &[&str] = &["listen", "log", "log_format"];

/// A string that never prints itself: Debug and Display show `[redacted]`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself; call only where it is used, never to log.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Whether no value was configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "[unset]"
        } else {
            "[redacted]"
        })
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the HTTP API.
    pub listen: SocketAddr,
    /// tracing filter directive.
    pub log: String,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// Storage.
    pub database: DatabaseConfig,
    /// HTTP limits.
    pub http: HttpConfig,
    /// JWT verification.
    pub auth: AuthConfig,
    /// Webhook delivery.
    pub webhooks: WebhooksConfig,
    /// The durable queue and its in-process workers.
    pub queue: QueueConfig,
    /// The per-user update log's retention.
    pub updates: UpdatesConfig,
    /// Job kinds by name.
    pub kinds: BTreeMap<String, KindConfig>,
    /// Turning updates into pushes.
    pub dispatch: DispatchConfig,
    /// Push apps: the first is the default `appId`.
    #[serde(default)]
    pub apps: Vec<AppConfig>,
}

/// `[queue]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// In-process jobs run at once.
    pub concurrency: usize,
    /// Lease length, seconds.
    pub lease_secs: u64,
    /// Fallback poll interval, milliseconds.
    pub poll_interval_ms: u64,
    /// Backoff base, milliseconds.
    pub backoff_base_ms: u64,
    /// Backoff cap, milliseconds.
    pub backoff_max_ms: u64,
    /// Grace period for running jobs on shutdown, seconds.
    pub shutdown_grace_secs: u64,
}

/// `[dispatch]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatchConfig {
    /// Deliveries claimed at once (and in flight per node).
    pub batch_size: usize,
    /// Pushes in flight per app and provider.
    pub concurrency: usize,
    /// Attempts before a delivery fails.
    pub max_attempts: i32,
    /// Push lifetime, seconds.
    pub push_ttl_secs: u64,
    /// Backoff base, milliseconds.
    pub backoff_base_ms: u64,
    /// Backoff cap, milliseconds.
    pub backoff_max_ms: u64,
    /// Hold time for a misconfigured provider, seconds.
    pub hold_secs: u64,
    /// Lease on claimed deliveries, seconds.
    pub lease_secs: u64,
    /// Fallback poll interval, milliseconds.
    pub poll_interval_ms: u64,
    /// Hours a finished delivery's record (sent, failed, dropped) is kept; its update stays
    /// for the update log's retention.
    pub outcome_retention_hours: u64,
}

impl DispatchConfig {
    /// How long the records of finished deliveries are kept.
    pub fn outcome_retention(&self) -> Duration {
        Duration::from_secs(self.outcome_retention_hours.saturating_mul(3_600))
    }
}

/// `[updates]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdatesConfig {
    /// Days an update is kept before it is purged.
    pub retention_days: u64,
    /// Seconds between purges.
    pub purge_interval_secs: u64,
}

impl UpdatesConfig {
    /// How long updates are kept.
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_days.saturating_mul(86_400))
    }

    /// How often the purge runs.
    pub fn purge_interval(&self) -> Duration {
        Duration::from_secs(self.purge_interval_secs)
    }
}

/// `[kinds."name"]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindConfig {
    /// `echo`, `report.generate` or `external`.
    pub handler: String,
    /// Attempts before the job fails.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: i32,
}

fn default_max_attempts() -> i32 {
    5
}

impl KindConfig {
    /// Whether out-of-process workers run this kind.
    pub fn is_external(&self) -> bool {
        self.handler == "external"
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[database]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://FILE` or `postgres://…`; may carry a password, so it is a secret.
    pub url: Secret,
    /// Pool size.
    pub max_connections: u32,
    /// Pool acquire timeout, seconds.
    pub acquire_timeout_secs: u64,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Largest request body in bytes.
    pub body_limit: usize,
    /// Request timeout, seconds.
    pub request_timeout_secs: u64,
    /// Grace period on shutdown, seconds.
    pub shutdown_grace_secs: u64,
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 shared secret (empty = unset).
    pub hs256_secret: Secret,
    /// RS256/ES256 public key PEM file (empty = unset).
    pub public_key_file: String,
    /// JWKS URL (empty = unset).
    pub jwks_url: String,
    /// Required `iss` (empty = not checked).
    pub issuer: String,
    /// Required `aud` (empty = not checked).
    pub audience: String,
    /// Clock leeway, seconds.
    pub leeway_secs: u64,
    /// JWKS cache lifetime, seconds.
    pub jwks_cache_secs: u64,
    /// Minimum seconds between JWKS refetches triggered by unknown `kid`s.
    pub jwks_min_refetch_secs: u64,
}

/// `[webhooks]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Allow loopback/private targets.
    pub allow_private_targets: bool,
    /// Signing secret.
    pub secret: Secret,
}

/// Why configuration could not be loaded; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Load defaults, then `file` (if any), then the `HERALD_*` environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, Env::prefixed("HERALD_"))
    }

    /// Load with an explicit environment provider (tests use `Env::raw().only(..)` style maps).
    pub fn load_from(file: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        // Only keys that name a top-level setting or a section are configuration; other HERALD_*
        // variables (HERALD_CONFIG, HERALD_TEST_DATABASE_URL) belong to other tools.
        let env = env
            .filter(|key| is_config_key(key.as_str()))
            .map(|key| env_key(key.as_str()).into());
        let config: Config = figment
            .merge(env)
            .extract()
            .map_err(|e| ConfigError(one_line(&e)))?;
        config.validate()?;
        Ok(config)
    }

    /// The default configuration with no file and no environment.
    pub fn defaults() -> Result<Self, ConfigError> {
        Self::load_from(None, Env::prefixed("HERALD_DO_NOT_READ_"))
    }

    /// Checks serde cannot express; each error names its key.
    fn validate(&self) -> Result<(), ConfigError> {
        let url = self.database.url.expose();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(ConfigError(
                "database.url: must start with sqlite:, postgres:// or postgresql://".into(),
            ));
        }
        if self.database.max_connections == 0 {
            return Err(ConfigError(
                "database.max_connections: must be at least 1".into(),
            ));
        }
        if self.http.body_limit == 0 {
            return Err(ConfigError("http.body_limit: must be at least 1".into()));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log).is_err() {
            return Err(ConfigError(format!(
                "log: not a valid tracing filter: {:?}",
                self.log
            )));
        }
        if self.queue.concurrency == 0 {
            return Err(ConfigError("queue.concurrency: must be at least 1".into()));
        }
        if self.dispatch.batch_size == 0 || self.dispatch.concurrency == 0 {
            return Err(ConfigError(
                "dispatch.batch_size / dispatch.concurrency: must be at least 1".into(),
            ));
        }
        if self.dispatch.max_attempts < 1 {
            return Err(ConfigError(
                "dispatch.max_attempts: must be at least 1".into(),
            ));
        }
        if self.queue.lease_secs < 3 {
            return Err(ConfigError("queue.lease_secs: must be at least 3".into()));
        }
        // Bounded so lease arithmetic stays far from the calendar's limits.
        if !(2..=86_400).contains(&self.dispatch.lease_secs) {
            return Err(ConfigError(
                "dispatch.lease_secs: must be 2 to 86400".into(),
            ));
        }
        // The upper bound keeps `now - retention` far from the calendar's limits.
        if !(1..=MAX_RETENTION_DAYS).contains(&self.updates.retention_days) {
            return Err(ConfigError(format!(
                "updates.retention_days: must be 1 to {MAX_RETENTION_DAYS}"
            )));
        }
        if self.dispatch.outcome_retention_hours > MAX_RETENTION_DAYS * 24 {
            return Err(ConfigError(format!(
                "dispatch.outcome_retention_hours: must be 0 to {}",
                MAX_RETENTION_DAYS * 24
            )));
        }
        if !(1..=MAX_PURGE_INTERVAL_SECS).contains(&self.updates.purge_interval_secs) {
            return Err(ConfigError(format!(
                "updates.purge_interval_secs: must be 1 to {MAX_PURGE_INTERVAL_SECS}"
            )));
        }
        for (name, kind) in &self.kinds {
            if name.is_empty() || name.len() > 100 {
                return Err(ConfigError(format!(
                    "kinds.{name:?}: a kind name is 1 to 100 characters"
                )));
            }
            if !(kind.is_external() || crate::jobs::Registry::builtin(&kind.handler).is_some()) {
                return Err(ConfigError(format!(
                    "kinds.{name:?}.handler: unknown handler {:?} (echo, report.generate or external)",
                    kind.handler
                )));
            }
            if !(1..=100).contains(&kind.max_attempts) {
                return Err(ConfigError(format!(
                    "kinds.{name:?}.max_attempts: must be 1 to 100"
                )));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, app) in self.apps.iter().enumerate() {
            if app.id.trim().is_empty() {
                return Err(ConfigError(format!("apps[{i}].id: must not be empty")));
            }
            if !seen.insert(app.id.as_str()) {
                return Err(ConfigError(format!(
                    "apps[{i}].id: duplicate app id {:?}",
                    app.id
                )));
            }
        }
        Ok(())
    }

    /// The default `appId` for devices that name none.
    pub fn default_app_id(&self) -> Option<&str> {
        self.apps.first().map(|a| a.id.as_str())
    }

    /// Where the configured files are resolved from (the working directory).
    pub fn base_dir() -> PathBuf {
        PathBuf::from(".")
    }
}

/// Whether `HERALD_<key>` addresses this configuration.
fn is_config_key(key: &str) -> bool {
    let lower = key.to_ascii_lowercase();
    TOP_LEVEL_KEYS.contains(&lower.as_str())
        || ENV_SECTIONS
            .iter()
            .any(|s| lower.strip_prefix(s).is_some_and(|r| r.starts_with('_')))
}

/// Map `DATABASE_URL` → `database.url`, `LISTEN` → `listen`, `AUTH_HS256_SECRET` → `auth.hs256_secret`.
fn env_key(key: &str) -> String {
    let lower = key.to_ascii_lowercase();
    for section in ENV_SECTIONS {
        if let Some(rest) = lower
            .strip_prefix(section)
            .and_then(|r| r.strip_prefix('_'))
        {
            return format!("{section}.{rest}");
        }
    }
    lower
}

/// figment errors can span lines; operators get one line that names the key.
fn one_line(err: &figment::Error) -> String {
    let mut parts = Vec::new();
    for e in err.clone() {
        let key = if e.path.is_empty() {
            String::from("(root)")
        } else {
            e.path.join(".")
        };
        // `e.kind` never holds the value of a secret: figment reports the type, not the content.
        parts.push(format!("{key}: {}", e.kind));
    }
    parts.join("; ")
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_hide_secrets() {
        let config = Config::defaults().unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.database.url.expose(), "sqlite://herald.db");
        let printed = format!("{:?}", Secret::new("hunter2"));
        assert!(!printed.contains("hunter2"));
    }

    #[test]
    fn env_keys_map_to_sections() {
        assert_eq!(env_key("DATABASE_URL"), "database.url");
        assert_eq!(env_key("AUTH_HS256_SECRET"), "auth.hs256_secret");
        assert_eq!(env_key("LISTEN"), "listen");
        assert_eq!(env_key("LOG_FORMAT"), "log_format");
        assert!(is_config_key("DATABASE_URL") && is_config_key("LOG"));
        assert!(!is_config_key("TEST_DATABASE_URL") && !is_config_key("CONFIG"));
    }

    #[test]
    fn invalid_values_name_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("HERALD_LISTEN", "not-an-address");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("listen"), "{err}");
            assert!(!err.contains('\n'));
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.create_file("h.toml", "[http]\nbody_limt = 5\n")?;
            let err = Config::load(Some(Path::new("h.toml")))
                .unwrap_err()
                .to_string();
            assert!(err.contains("body_limt"), "{err}");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("HERALD_DATABASE_URL", "mysql://x");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("database.url"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn updates_retention_is_configurable_and_checked() {
        let config = Config::defaults().unwrap();
        assert_eq!(config.updates.retention_days, 30);
        assert_eq!(config.updates.retention(), Duration::from_secs(30 * 86_400));
        assert_eq!(config.updates.purge_interval(), Duration::from_secs(3600));
        figment::Jail::expect_with(|jail| {
            jail.set_env("HERALD_UPDATES_RETENTION_DAYS", "7");
            jail.set_env("HERALD_UPDATES_PURGE_INTERVAL_SECS", "60");
            let config = Config::load(None).unwrap();
            assert_eq!(config.updates.retention_days, 7);
            assert_eq!(config.updates.purge_interval_secs, 60);
            Ok(())
        });
        for (key, value) in [
            ("HERALD_UPDATES_RETENTION_DAYS", "0"),
            ("HERALD_UPDATES_RETENTION_DAYS", "36501"),
            ("HERALD_UPDATES_PURGE_INTERVAL_SECS", "0"),
            ("HERALD_UPDATES_PURGE_INTERVAL_SECS", "99999999999"),
        ] {
            figment::Jail::expect_with(|jail| {
                jail.set_env(key, value);
                let err = Config::load(None).unwrap_err().to_string();
                assert!(err.contains("updates."), "{err}");
                Ok(())
            });
        }
    }

    #[test]
    fn the_delivery_lease_is_bounded() {
        for value in ["1", "86401"] {
            figment::Jail::expect_with(|jail| {
                jail.set_env("HERALD_DISPATCH_LEASE_SECS", value);
                let err = Config::load(None).unwrap_err().to_string();
                assert!(err.contains("dispatch.lease_secs"), "{err}");
                Ok(())
            });
        }
        figment::Jail::expect_with(|jail| {
            jail.set_env("HERALD_DISPATCH_LEASE_SECS", "2");
            assert_eq!(Config::load(None).unwrap().dispatch.lease_secs, 2);
            Ok(())
        });
    }

    #[test]
    fn secret_values_never_appear_in_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("h.toml", "[auth]\nhs256_secret = 12345\n")?;
            let err = Config::load(Some(Path::new("h.toml")))
                .unwrap_err()
                .to_string();
            assert!(err.contains("auth.hs256_secret"), "{err}");
            Ok(())
        });
    }
}
