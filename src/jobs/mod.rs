//! Jobs: what apps submit, the states they move through, and the handlers that run them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

pub mod handlers;

pub use handlers::{HandlerError, JobContext, JobHandler, Registry};

/// Where a job is in its life. It only moves forward:
/// `pending → processing → completed|failed`, `pending|processing → canceled`, and a retry moves
/// `processing → pending`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Waiting in the queue (first run or retry).
    Pending,
    /// Held by a worker under a lease.
    Processing,
    /// Finished with a result.
    Completed,
    /// Finished with an error.
    Failed,
    /// Canceled by the user.
    Canceled,
}

impl JobStatus {
    /// Wire and database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }

    /// Parse the wire spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "processing" => Self::Processing,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "canceled" => Self::Canceled,
            _ => return None,
        })
    }

    /// Whether the job can no longer change.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Canceled)
    }
}

/// A job's error, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobErrorInfo {
    /// Machine-readable code, e.g. `invalid_input`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

/// A user-visible notification (title and body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Notification {
    /// Title line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Body text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// The `notify` option of a job: what the completion push says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Notify {
    /// Title line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Body text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// When true, only a background push is sent.
    #[serde(default)]
    pub silent: bool,
}

impl Notify {
    /// The alert to show on completion, unless silent or empty.
    pub fn alert(&self) -> Option<Notification> {
        if self.silent || (self.title.is_none() && self.body.is_none()) {
            return None;
        }
        Some(Notification {
            title: self.title.clone(),
            body: self.body.clone(),
        })
    }
}

/// A job as `GET /v1/jobs/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    /// The job id.
    pub tracking_id: Uuid,
    /// Its kind.
    pub kind: String,
    /// Current status.
    pub status: JobStatus,
    /// 0–100 while processing, when the handler reports it.
    pub progress: Option<i32>,
    /// Attempts started so far.
    pub attempts: i32,
    /// The handler's result once completed.
    pub result: Option<Value>,
    /// The last error once failed.
    pub error: Option<JobErrorInfo>,
    /// Submission time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// When it finished.
    pub completed_at: Option<DateTime<Utc>>,
}

/// A validated submission.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Owner (JWT `sub`).
    pub user_id: String,
    /// A configured kind.
    pub kind: String,
    /// Handler input.
    pub input: Value,
    /// Webhook target.
    pub callback_url: Option<String>,
    /// Completion notification.
    pub notify: Option<Notify>,
    /// `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// Hash of the request body, to tell a replay from a different request under one key.
    pub request_hash: String,
    /// From the kind's configuration.
    pub max_attempts: i32,
}

/// What `create_job` did.
#[derive(Debug, Clone)]
pub enum CreateOutcome {
    /// A new job was committed.
    Created(Job),
    /// The same key and body were seen before: the original job.
    Replayed(Job),
    /// The key was used before with a different body.
    KeyReused,
}

/// What `cancel_job` did.
#[derive(Debug, Clone)]
pub enum CancelOutcome {
    /// Canceled now.
    Canceled(Job),
    /// Already finished: nothing changed.
    Finished(Job),
    /// Not this user's job.
    NotFound,
}

/// A job a worker holds under a lease.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    /// Job id.
    pub id: Uuid,
    /// Owner.
    pub user_id: String,
    /// Kind.
    pub kind: String,
    /// Input.
    pub input: Value,
    /// This attempt's number (1-based); fences every later write.
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// When the lease runs out unless extended.
    pub lease_expires_at: DateTime<Utc>,
}

/// Identifies a held lease: the worker and (when known) the attempt it holds.
#[derive(Debug, Clone)]
pub struct Lease {
    /// Job id.
    pub job_id: Uuid,
    /// Lease owner (node worker id or `worker:<sub>`).
    pub owner: String,
    /// The attempt held; `None` when an external worker did not say.
    pub attempt: Option<i32>,
}
