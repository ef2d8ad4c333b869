//! The storage interface and its two engines: embedded SQLite and PostgreSQL.
//!
//! Everything durable goes through [`Store`]. Both engines pass the same conformance suite
//! (`tests/store.rs`), which is how queries written at runtime for two dialects are kept honest.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::config::DatabaseConfig;
use crate::devices::{Device, NewDevice};
use crate::jobs::{
    CancelOutcome, ClaimedJob, CreateOutcome, Job, JobErrorInfo, JobStatus, Lease, NewJob,
    Notification,
};
use crate::updates::Update;

mod append;
mod claimed;
pub mod group_commit;
mod row_hint;
#[macro_use]
mod rows;
pub mod outbox;
pub(crate) mod postgres;
mod purge;
mod shared;
mod sqlite;
mod touched;

pub use group_commit::{EventIntake, GroupCommit, JobIntake, event_intake, job_intake};
pub use outbox::{
    Acked, Appended, DeliveryOutcome, DeliveryResult, DueDelivery, Handoff, HandoffSink, Outbox,
};
pub use postgres::PgStore;
/// PostgreSQL's hot statements, for the plan checks in the test suite (tests/plans.rs).
pub mod pg_statements {
    pub use super::postgres::{APPEND_EVENTS, CLAIM_DELIVERIES, CLAIM_JOBS, RECORD_SENT};
}
/// SQLite's hot statements, for the plan checks in the test suite (tests/plans.rs).
pub mod sqlite_statements {
    pub use super::sqlite::RECORD_SENT_AT_ONCE;
}
pub use row_hint::RowHint;
pub use sqlite::SqliteStore;

/// Storage failures; callers map them to problems, the cause is logged once.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or the pool timed out.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Any other database error.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// Migrations could not be applied.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A group commit failed; every request in it gets this.
    #[error("{0}")]
    Shared(std::sync::Arc<StoreError>),
    /// A stored value could not be decoded (a bug or a hand-edited row).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Classify a sqlx error: the database being unreachable, restarting, failing over or out
    /// of connections means "unavailable" (retry later), not "broken".
    pub(crate) fn from_sqlx(err: sqlx::Error) -> Self {
        if is_unavailable(&err) {
            Self::Unavailable(err)
        } else {
            Self::Database(err)
        }
    }
}

/// Whether `err` says the database cannot serve now, rather than that the request or the
/// data is wrong.
fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            if db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                db.code().is_some_and(|code| pg_unavailable(&code))
            } else if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                db.code().is_some_and(|code| sqlite_unavailable(&code))
            } else {
                false
            }
        }
        _ => false,
    }
}

/// PostgreSQL SQLSTATEs of a server that cannot serve this node now: connection exceptions
/// (class 08), administrator shutdown or termination and "cannot connect now" (57P01-57P03),
/// insufficient resources (class 53: too many connections, out of memory or disk), a read-only
/// transaction (25006: a standby after failover, before the new primary is found), and the
/// refusals of a new connection: the database not accepting connections (55000), gone (3D000)
/// or refusing the node's credentials (class 28). The last ones need an operator, but to a
/// client they are the same: not now, retry later (and /readyz says so).
fn pg_unavailable(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("28")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "25006" | "55000" | "3D000"
        )
}

/// SQLite result codes (sqlx gives the extended code; its low byte is the primary one) of a
/// database that cannot serve now: busy or locked past the busy timeout, I/O error, disk full,
/// cannot open, read-only file.
fn sqlite_unavailable(code: &str) -> bool {
    const BUSY: i64 = 5;
    const LOCKED: i64 = 6;
    const READONLY: i64 = 8;
    const IOERR: i64 = 10;
    const FULL: i64 = 13;
    const CANTOPEN: i64 = 14;
    code.parse::<i64>().is_ok_and(|extended| {
        matches!(
            extended & 0xff,
            BUSY | LOCKED | READONLY | IOERR | FULL | CANTOPEN
        )
    })
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        Self::from_sqlx(err)
    }
}

impl From<StoreError> for crate::error::ApiError {
    fn from(err: StoreError) -> Self {
        let unavailable = match &err {
            StoreError::Shared(inner) => matches!(**inner, StoreError::Unavailable(_)),
            other => matches!(other, StoreError::Unavailable(_)),
        };
        match err {
            _ if unavailable => {
                tracing::warn!(error = %err, "database unavailable");
                crate::error::ApiError::Unavailable(
                    "the database is unavailable; retry later".into(),
                )
            }
            other => crate::error::ApiError::internal(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{pg_unavailable, sqlite_unavailable};

    #[test]
    fn server_trouble_is_unavailable_and_bad_data_is_not() {
        for code in [
            "08006", "08001", "57P01", "57P02", "57P03", "53300", "53100", "25006",
        ] {
            assert!(pg_unavailable(code), "{code}");
        }
        for code in ["23505", "22P05", "22021", "42P01", "40001", "XX000"] {
            assert!(!pg_unavailable(code), "{code}");
        }
        // SQLITE_BUSY, SQLITE_BUSY_SNAPSHOT (517), SQLITE_IOERR_FSYNC (1034), SQLITE_FULL.
        for code in ["5", "517", "1034", "13", "14", "8"] {
            assert!(sqlite_unavailable(code), "{code}");
        }
        // SQLITE_CONSTRAINT_UNIQUE (2067), SQLITE_CORRUPT, SQLITE_ERROR.
        for code in ["2067", "11", "1"] {
            assert!(!sqlite_unavailable(code), "{code}");
        }
    }
}

/// Unique violation (SQLSTATE 23505 on PostgreSQL, extended code 2067 on SQLite).
pub(crate) fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
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
pub trait Store: outbox::Outbox + Send + Sync + 'static {
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

    /// Commit new jobs in one transaction (group commit); one outcome per job, in order. A job
    /// whose idempotency key was used before (even earlier in the same batch) is a replay.
    async fn create_jobs(&self, jobs: &[NewJob]) -> Result<Vec<CreateOutcome>, StoreError>;

    /// Commit one new job (or find the one its idempotency key already made).
    async fn create_job(&self, job: &NewJob) -> Result<CreateOutcome, StoreError> {
        self.create_jobs(std::slice::from_ref(job))
            .await?
            .pop()
            .ok_or_else(|| StoreError::Corrupt("no outcome for a submitted job".into()))
    }

    /// One of this user's jobs.
    async fn get_job(&self, user_id: &str, id: Uuid) -> Result<Option<Job>, StoreError>;

    /// This user's jobs, newest first, older than `before` when given.
    async fn list_jobs(
        &self,
        user_id: &str,
        status: Option<JobStatus>,
        before: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Job>, StoreError>;

    /// Cancel a pending or processing job, appending `job.canceled`.
    async fn cancel_job(&self, user_id: &str, id: Uuid) -> Result<CancelOutcome, StoreError>;

    /// Claim up to `max` due jobs of `kinds` in one statement that also sets the lease and
    /// bumps the attempt; appends `job.processing` for each.
    async fn claim_jobs(
        &self,
        kinds: &[String],
        max: i64,
        owner: &str,
        lease: Duration,
    ) -> Result<Vec<ClaimedJob>, StoreError>;

    /// Extend a held lease; the new expiry, or `None` when the lease is no longer held.
    async fn heartbeat_job(
        &self,
        lease: &Lease,
        extend: Duration,
    ) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// Record progress (0–100) and append `job.processing`; false when the lease is lost.
    async fn progress_job(
        &self,
        lease: &Lease,
        percent: i32,
        data: Option<Value>,
    ) -> Result<bool, StoreError>;

    /// Complete and append `job.completed`; false when the lease is lost.
    async fn complete_job(
        &self,
        lease: &Lease,
        result: &Value,
        notification: Option<&Notification>,
    ) -> Result<bool, StoreError>;

    /// Fail: back to the queue at `retry_at` while attempts remain, else `failed` with
    /// `job.failed`. False when the lease is lost.
    async fn fail_job(
        &self,
        lease: &Lease,
        error: &JobErrorInfo,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<bool, StoreError>;

    /// Give a held job back without using up its attempt.
    async fn release_job(&self, lease: &Lease) -> Result<bool, StoreError>;

    /// Return jobs whose lease ran out to the queue (or fail them when out of attempts).
    async fn expire_leases(&self) -> Result<u64, StoreError>;

    /// Jobs per status (for the `herald_jobs` gauge).
    async fn job_counts(&self) -> Result<Vec<(String, i64)>, StoreError>;

    /// This user's updates after `after`, ascending.
    async fn list_updates(
        &self,
        user_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Update>, StoreError>;

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
