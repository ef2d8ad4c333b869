//! Row types shared by both engines, decoded with sqlx and converted to domain types.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use super::StoreError;
use crate::devices::{ApnsEnvironment, Device, DeviceStatus, Platform};
use crate::jobs::{ClaimedJob, Job, JobErrorInfo, JobStatus, Notification};
use crate::updates::Update;

/// The `devices` columns, in the order every `SELECT`/`RETURNING` lists them.
macro_rules! device_columns {
    () => {
        "id, user_id, platform, token, environment, app_id, locale, app_version, \
         status, invalid_reason, created_at, registered_at, last_seen_at, last_push_at"
    };
}

/// Refresh a device the user already owns: $1 env, $2 app, $3 locale, $4 version, $5 now, $6 id.
pub(super) const UPDATE_DEVICE: &str = concat!(
    "UPDATE devices SET environment = $1, app_id = $2, locale = $3, app_version = $4, \
     status = 'active', invalid_reason = NULL, registered_at = $5, last_seen_at = $5 \
     WHERE id = $6 RETURNING ",
    device_columns!()
);

/// Insert a device: $1 id, $2 user, $3 platform, $4 token, $5 env, $6 app, $7 locale, $8 version, $9 now.
pub(super) const INSERT_DEVICE: &str = concat!(
    "INSERT INTO devices (id, user_id, platform, token, environment, app_id, locale, \
     app_version, status, created_at, registered_at, last_seen_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'active', $9, $9, $9) RETURNING ",
    device_columns!()
);

/// This user's devices, oldest first.
pub(super) const LIST_DEVICES: &str = concat!(
    "SELECT ",
    device_columns!(),
    " FROM devices WHERE user_id = $1 ORDER BY created_at, id"
);

/// Invalidate: $1 id, $2 reason, $3 `since` (NULL = unconditional).
pub(super) const INVALIDATE_DEVICE: &str = "UPDATE devices SET status = 'invalid', invalid_reason = $2 \
     WHERE id = $1 AND status = 'active' AND ($3 IS NULL OR registered_at <= $3)";

#[derive(Debug, sqlx::FromRow)]
pub(super) struct DeviceRow {
    id: Uuid,
    #[allow(dead_code)]
    user_id: String,
    platform: String,
    token: String,
    environment: Option<String>,
    app_id: String,
    locale: Option<String>,
    app_version: Option<String>,
    status: String,
    invalid_reason: Option<String>,
    created_at: DateTime<Utc>,
    registered_at: DateTime<Utc>,
    last_seen_at: DateTime<Utc>,
    last_push_at: Option<DateTime<Utc>>,
}

impl TryFrom<DeviceRow> for Device {
    type Error = StoreError;

    fn try_from(row: DeviceRow) -> Result<Self, StoreError> {
        let platform = Platform::parse(&row.platform)
            .ok_or_else(|| StoreError::Corrupt(format!("device platform {:?}", row.platform)))?;
        let environment = match row.environment.as_deref() {
            None => None,
            Some(e) => Some(
                ApnsEnvironment::parse(e)
                    .ok_or_else(|| StoreError::Corrupt(format!("device environment {e:?}")))?,
            ),
        };
        let status = DeviceStatus::parse(&row.status)
            .ok_or_else(|| StoreError::Corrupt(format!("device status {:?}", row.status)))?;
        Ok(Device {
            id: row.id,
            platform,
            token: row.token,
            environment,
            app_id: row.app_id,
            locale: row.locale,
            app_version: row.app_version,
            status,
            invalid_reason: row.invalid_reason,
            created_at: row.created_at,
            last_seen_at: row.last_seen_at,
            last_push_at: row.last_push_at,
            unseen: None,
            registered_at: row.registered_at,
        })
    }
}

/// Convert a batch of rows.
pub(super) fn devices(rows: Vec<DeviceRow>) -> Result<Vec<Device>, StoreError> {
    rows.into_iter().map(Device::try_from).collect()
}

/// The `jobs` columns the API shows, in the order [`JobRow`] reads them.
macro_rules! job_columns {
    () => {
        "id, user_id, kind, status, progress, attempts, result, error_code, error_message, \
         created_at, updated_at, completed_at, request_hash"
    };
}

/// The fence every lease holder's write carries: $1 id, $2 owner, $3 attempt (NULL = any), and
/// the lease must not have run out at $4 (now).
macro_rules! lease_fence {
    () => {
        " WHERE id = $1 AND status = 'processing' AND lease_owner = $2 \
          AND ($3 IS NULL OR attempts = $3) AND lease_expires_at > $4"
    };
}

/// Insert a job unless the user already used its idempotency key.
pub(super) const INSERT_JOB: &str = concat!(
    "INSERT INTO jobs (id, user_id, kind, input, status, attempts, max_attempts, callback_url, notify, \
     idempotency_key, request_hash, run_at, created_at, updated_at) \
     VALUES ($1, $2, $3, $4, 'pending', 0, $5, $6, $7, $8, $9, $10, $10, $10) \
     ON CONFLICT (user_id, idempotency_key) DO NOTHING RETURNING ",
    job_columns!()
);
/// The job a user created under an idempotency key.
pub(super) const JOB_BY_KEY: &str = concat!(
    "SELECT ",
    job_columns!(),
    " FROM jobs WHERE user_id = $1 AND idempotency_key = $2"
);
/// One of a user's jobs.
pub(super) const GET_JOB: &str = concat!(
    "SELECT ",
    job_columns!(),
    " FROM jobs WHERE id = $1 AND user_id = $2"
);
/// A page of a user's jobs, newest first: $2 status filter, $3 cursor (older than), $4 limit.
pub(super) const LIST_JOBS: &str = concat!(
    "SELECT ",
    job_columns!(),
    " FROM jobs WHERE user_id = $1 AND ($2 IS NULL OR status = $2) AND ($3 IS NULL OR id < $3) \
     ORDER BY id DESC LIMIT $4"
);
/// Cancel a pending or processing job.
pub(super) const CANCEL_JOB: &str = concat!(
    "UPDATE jobs SET status = 'canceled', updated_at = $3, completed_at = $3, lease_owner = NULL, \
     lease_expires_at = NULL WHERE id = $1 AND user_id = $2 AND status IN ('pending', 'processing') RETURNING ",
    job_columns!()
);
/// Extend a lease: $5 new expiry.
pub(super) const HEARTBEAT_JOB: &str = concat!(
    "UPDATE jobs SET lease_expires_at = $5",
    lease_fence!(),
    " RETURNING lease_expires_at"
);
/// Record progress: $5 percent.
pub(super) const PROGRESS_JOB: &str = concat!(
    "UPDATE jobs SET progress = $5, updated_at = $4",
    lease_fence!(),
    " RETURNING user_id"
);
/// Complete: $5 result.
pub(super) const COMPLETE_JOB: &str = concat!(
    "UPDATE jobs SET status = 'completed', result = $5, progress = 100, completed_at = $4, updated_at = $4, \
     lease_owner = NULL, lease_expires_at = NULL",
    lease_fence!(),
    " RETURNING user_id, notify"
);
/// Back to the queue for a retry: $5 run_at, $6 code, $7 message.
pub(super) const RETRY_JOB: &str = concat!(
    "UPDATE jobs SET status = 'pending', run_at = $5, error_code = $6, error_message = $7, updated_at = $4, \
     lease_owner = NULL, lease_expires_at = NULL",
    lease_fence!()
);
/// Fail for good: $5 code, $6 message.
pub(super) const FAIL_JOB: &str = concat!(
    "UPDATE jobs SET status = 'failed', error_code = $5, error_message = $6, completed_at = $4, updated_at = $4, \
     lease_owner = NULL, lease_expires_at = NULL",
    lease_fence!()
);
/// Give a job back without using up the attempt (graceful shutdown).
pub(super) const RELEASE_JOB: &str = concat!(
    "UPDATE jobs SET status = 'pending', attempts = attempts - 1, run_at = $4, updated_at = $4, \
     lease_owner = NULL, lease_expires_at = NULL",
    lease_fence!()
);
/// Expired leases with attempts left go back to the queue.
pub(super) const REQUEUE_EXPIRED: &str = "UPDATE jobs SET status = 'pending', lease_owner = NULL, \
     lease_expires_at = NULL, run_at = $1, updated_at = $1 \
     WHERE status = 'processing' AND lease_expires_at <= $1 AND attempts < max_attempts";
/// Expired leases with no attempts left fail.
pub(super) const FAIL_EXPIRED: &str = "UPDATE jobs SET status = 'failed', error_code = 'lease_expired', \
     error_message = 'the worker holding the job stopped answering', completed_at = $1, updated_at = $1, \
     lease_owner = NULL, lease_expires_at = NULL \
     WHERE status = 'processing' AND lease_expires_at <= $1 AND attempts >= max_attempts RETURNING id, user_id";

/// A page of a user's log after a seq.
pub(super) const LIST_UPDATES: &str = "SELECT seq, id, type, tracking_id, status, data, notification, created_at \
     FROM updates WHERE user_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";

#[derive(Debug, sqlx::FromRow)]
pub(super) struct JobRow {
    pub(super) id: Uuid,
    #[allow(dead_code)]
    user_id: String,
    kind: String,
    status: String,
    progress: Option<i32>,
    attempts: i32,
    result: Option<Json<Value>>,
    error_code: Option<String>,
    error_message: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    completed_at: Option<DateTime<Utc>>,
    pub(super) request_hash: Option<String>,
}

impl TryFrom<JobRow> for Job {
    type Error = StoreError;

    fn try_from(row: JobRow) -> Result<Self, StoreError> {
        let status = JobStatus::parse(&row.status)
            .ok_or_else(|| StoreError::Corrupt(format!("job status {:?}", row.status)))?;
        // A retried job keeps its last error for the record, but only a failed job shows one.
        let error = match (status, row.error_code, row.error_message) {
            (JobStatus::Failed, Some(code), message) => Some(JobErrorInfo {
                code,
                message: message.unwrap_or_default(),
            }),
            _ => None,
        };
        Ok(Job {
            tracking_id: row.id,
            kind: row.kind,
            status,
            progress: row.progress,
            attempts: row.attempts,
            result: row.result.map(|j| j.0),
            error,
            created_at: row.created_at,
            updated_at: row.updated_at,
            completed_at: row.completed_at,
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(super) struct ClaimRow {
    pub(super) id: Uuid,
    pub(super) user_id: String,
    pub(super) kind: String,
    pub(super) input: Json<Value>,
    pub(super) attempts: i32,
    pub(super) max_attempts: i32,
    pub(super) lease_expires_at: Option<DateTime<Utc>>,
}

impl ClaimRow {
    pub(super) fn into_claimed(self, lease_expires_at: DateTime<Utc>) -> ClaimedJob {
        ClaimedJob {
            id: self.id,
            user_id: self.user_id,
            kind: self.kind,
            input: self.input.0,
            attempt: self.attempts,
            max_attempts: self.max_attempts,
            lease_expires_at: self.lease_expires_at.unwrap_or(lease_expires_at),
        }
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(super) struct UpdateRow {
    seq: i64,
    id: Uuid,
    #[sqlx(rename = "type")]
    kind: String,
    tracking_id: Option<Uuid>,
    status: Option<String>,
    data: Option<Json<Value>>,
    notification: Option<Json<Notification>>,
    created_at: DateTime<Utc>,
}

impl From<UpdateRow> for Update {
    fn from(row: UpdateRow) -> Self {
        Update {
            seq: row.seq,
            id: row.id,
            kind: row.kind,
            tracking_id: row.tracking_id,
            status: row.status,
            data: row.data.map(|j| j.0),
            notification: row.notification.map(|j| j.0),
            created_at: row.created_at,
        }
    }
}

/// What was still to be sent to a device that is going away, one statement per index that
/// finds it: pending deliveries by device (deliveries_device_pending_idx), in-flight ones among
/// the in-flight (the index partial on the lease; on SQLite, on the status). Its finished deliveries stay until the retention purge
/// takes them with their updates (no foreign keys on deliveries: migrations 0005).
pub(super) const DELETE_OPEN_DELIVERIES: [&str; 2] = [
    "DELETE FROM deliveries WHERE device_id = $1 AND status = 'pending'",
    "DELETE FROM deliveries WHERE device_id = $1 AND status = 'sending' \
     AND lease_expires_at IS NOT NULL",
];
