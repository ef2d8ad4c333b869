//! The per-user update log: every change a user should learn about, in `seq` order, and
//! the retention task that purges it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::jobs::Notification;
use crate::store::Store;

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

impl NewUpdate {
    /// The update this becomes once appended as `id` with `seq` at `created_at`.
    pub fn appended(&self, id: Uuid, seq: i64, created_at: DateTime<Utc>) -> Update {
        Update {
            seq,
            id,
            kind: self.kind.clone(),
            tracking_id: self.tracking_id,
            status: self.status.clone(),
            data: self.data.clone(),
            notification: self.notification.clone(),
            created_at,
        }
    }
}

/// The first purge waits this long (or one interval, if shorter) so start-up is not slowed.
const FIRST_PURGE_DELAY: Duration = Duration::from_secs(5);

/// Longest period between purges the loop accepts (a year).
const MAX_PERIOD: Duration = Duration::from_secs(365 * 86_400);

/// What the retention task keeps, and how often it purges.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// How long an update stays in its user's log.
    pub updates: Duration,
    /// How long a finished delivery's record stays (never longer than its update).
    pub outcomes: Duration,
    /// Time between purges.
    pub every: Duration,
}

/// `now - keep`, or none when that reaches past the calendar's start (nothing is that old).
fn older_than(keep: Duration) -> Option<chrono::DateTime<Utc>> {
    chrono::TimeDelta::from_std(keep)
        .ok()
        .and_then(|keep| Utc::now().checked_sub_signed(keep))
}

/// Purge what `retention` no longer keeps, every `retention.every`, until `shutdown`: updates
/// (with their deliveries) past the log's retention, then finished deliveries' records past
/// theirs. Failures are logged and retried at the next interval.
pub async fn run_retention(
    store: Arc<dyn Store>,
    retention: Retention,
    shutdown: CancellationToken,
) {
    // A zero period would make `interval_at` panic and a huge one overflow its arithmetic;
    // configuration forbids both, this keeps the function safe on its own.
    let every = retention.every.clamp(Duration::from_millis(1), MAX_PERIOD);
    let first = tokio::time::Instant::now() + FIRST_PURGE_DELAY.min(every);
    let mut ticks = tokio::time::interval_at(first, every);
    // After a slow purge the next one waits a full interval rather than running back to back.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        // A purge in progress is not interrupted by shutdown: it is a series of short
        // statements, and what it has not reached waits for the next run.
        if let Some(before) = older_than(retention.updates) {
            match store.purge(before).await {
                Ok(0) => tracing::debug!(%before, "retention: no update to purge"),
                Ok(purged) => {
                    metrics::counter!("herald_purged_total").increment(purged);
                    tracing::info!(purged, %before, "retention: purged old updates and deliveries");
                }
                Err(err) => {
                    tracing::warn!(error = %err, "retention: purge failed; retrying next interval")
                }
            }
        }
        if let Some(before) = older_than(retention.outcomes.min(retention.updates)) {
            match store.purge_outcomes(before).await {
                Ok(0) => tracing::debug!(%before, "retention: no delivery record to purge"),
                Ok(purged) => {
                    metrics::counter!("herald_purged_outcomes_total").increment(purged);
                    tracing::info!(purged, %before, "retention: purged finished deliveries' records");
                }
                Err(err) => tracing::warn!(
                    error = %err,
                    "retention: delivery record purge failed; retrying next interval"
                ),
            }
        }
    }
    tracing::debug!("retention task stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    #[tokio::test]
    async fn retention_purges_and_stops_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("herald.db").display());
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::connect(&url, 2, Duration::from_secs(5))
                .await
                .unwrap(),
        );
        store.migrate().await.unwrap();
        let event = NewUpdate {
            kind: "order.shipped".into(),
            tracking_id: None,
            status: None,
            data: None,
            notification: None,
        };
        store.publish_event("alice", &event).await.unwrap();
        let shutdown = CancellationToken::new();
        // Zero retention: everything already written is old enough.
        let task = tokio::spawn(run_retention(
            store.clone(),
            Retention {
                updates: Duration::ZERO,
                outcomes: Duration::ZERO,
                every: Duration::from_millis(20),
            },
            shutdown.clone(),
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !store.list_updates("alice", 0, 10).await.unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never purged");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("stops promptly on shutdown")
            .unwrap();
        store.close().await;
    }
}
