//! The per-user update log: every change a user should learn about, in `seq` order.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::jobs::Notification;

/// One entry of a user's log, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Update {
    /// Per-user, strictly increasing.
    pub seq: i64,
    /// Update id.
    pub id: Uuid,
    /// e.g. `job.completed`, `order.shipped`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The job (or the publisher's reference) this is about.
    pub tracking_id: Option<Uuid>,
    /// Job status after the change, for job updates.
    pub status: Option<String>,
    /// Details: progress, result, error, or the event's data.
    pub data: Option<Value>,
    /// What to show the user, when anything.
    pub notification: Option<Notification>,
    /// When it was appended.
    pub created_at: DateTime<Utc>,
}

/// An update about to be appended.
#[derive(Debug, Clone)]
pub struct NewUpdate {
    /// e.g. `job.completed`.
    pub kind: String,
    /// Related job.
    pub tracking_id: Option<Uuid>,
    /// Job status after the change.
    pub status: Option<String>,
    /// Details.
    pub data: Option<Value>,
    /// Alert text.
    pub notification: Option<Notification>,
}
