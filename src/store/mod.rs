//! The storage interface and its two engines: embedded SQLite and PostgreSQL.
//!
//! Everything durable goes through [`Store`]. Both engines pass the same conformance suite
//! (`tests/store.rs`), which is how queries written at runtime for two dialects are kept honest.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::config::DatabaseConfig;
use crate::devices::{Device, NewDevice};

mod postgres;
mod rows;
mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Storage failures; callers map them to problems, the cause is logged once.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or the pool timed out.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Any other database error.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations could not be applied.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value could not be decoded (a bug or a hand-edited row).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Classify a sqlx error: pool and I/O trouble means "unavailable", not "broken".
    pub(crate) fn from_sqlx(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                Self::Unavailable(err)
            }
            other => Self::Database(other),
        }
    }
}

impl From<StoreError> for crate::error::ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(_) => {
                tracing::warn!(error = %err, "database unavailable");
                crate::error::ApiError::Unavailable(
                    "the database is unavailable; retry later".into(),
                )
            }
            other => crate::error::ApiError::internal(other),
        }
    }
}

/// Which engine a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Embedded, single node.
    Sqlite,
    /// Shared by a cluster of nodes.
    Postgres,
}

/// Result of registering a device.
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    /// The device as stored now.
    pub device: Device,
    /// True when the device is new to this user (201), false when refreshed (200).
    pub created: bool,
}

/// The one storage interface.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The engine behind this store.
    fn engine(&self) -> Engine;

    /// Apply pending migrations.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Cheap round trip; also checks migrations are applied.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Register or refresh a device keyed by (platform, token); moves it between users.
    async fn upsert_device(
        &self,
        user_id: &str,
        device: &NewDevice,
    ) -> Result<Registered, StoreError>;

    /// This user's devices, oldest first.
    async fn list_devices(&self, user_id: &str) -> Result<Vec<Device>, StoreError>;

    /// Delete one of this user's devices; false when it is not theirs or does not exist.
    async fn delete_device(&self, user_id: &str, id: Uuid) -> Result<bool, StoreError>;

    /// Stop targeting a device whose token the provider rejected. With `since` (APNs 410), a
    /// device re-registered after that moment keeps its status. True when it was invalidated.
    async fn invalidate_device(
        &self,
        id: Uuid,
        reason: &str,
        since: Option<DateTime<Utc>>,
    ) -> Result<bool, StoreError>;

    /// Close the pools, waiting for connections to finish.
    async fn close(&self);
}

/// Open the store named by the configuration (no migrations are run here).
pub async fn connect(config: &DatabaseConfig) -> Result<Arc<dyn Store>, StoreError> {
    let url = config.url.expose();
    let timeout = Duration::from_secs(config.acquire_timeout_secs);
    if url.starts_with("sqlite:") {
        Ok(Arc::new(
            SqliteStore::connect(url, config.max_connections, timeout).await?,
        ))
    } else {
        Ok(Arc::new(
            PgStore::connect(url, config.max_connections, timeout).await?,
        ))
    }
}

/// A short description of where the data lives, with any password removed.
pub fn describe_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "(unparseable database url)".into(),
    }
}
