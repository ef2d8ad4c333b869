//! Claimed deliveries as the store builds them: returned by a claim (rows on PostgreSQL,
//! one JSON row on SQLite) or handed off by an append.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::StoreError;
use super::outbox::DueDelivery;
use super::row_hint::{RowHint, Tid};
use crate::devices::{ApnsEnvironment, Platform};
use crate::updates::Update;

/// A device as a claimed delivery needs it: id, platform, token, environment, app.
pub(super) type DeviceRow = (Uuid, String, String, Option<String>, String);

/// A [`DeviceRow`] and its user.
pub(super) type UserDeviceRow = (Uuid, String, String, Option<String>, String, String);

/// The delivery of `update` to the device `(id, platform, token, environment, app)` as
/// stored at `row`, at `attempt`, leased until `lease_until`.
fn due(
    update: Arc<Update>,
    user_id: String,
    (device_id, platform, token, environment, app_id): DeviceRow,
    attempt: i32,
    lease_until: DateTime<Utc>,
    row: RowHint,
) -> Result<DueDelivery, StoreError> {
    let platform = Platform::parse(&platform)
        .ok_or_else(|| StoreError::Corrupt(format!("device platform {platform:?}")))?;
    Ok(DueDelivery {
        update,
        user_id,
        device_id,
        platform,
        token,
        environment: environment.as_deref().and_then(ApnsEnvironment::parse),
        app_id,
        attempt,
        lease_until,
        row,
    })
}

/// The claimed delivery of `update` to `device`, first attempt, under `handoff`, written at
/// `row`.
pub(super) fn handed_off(
    update: &Arc<Update>,
    user_id: &str,
    device: DeviceRow,
    handoff: &super::outbox::Handoff,
    row: RowHint,
) -> Result<DueDelivery, StoreError> {
    due(
        update.clone(),
        user_id.to_string(),
        device,
        1,
        handoff.until,
        row,
    )
}

/// `rows` grouped by their user.
pub(super) fn by_user(
    rows: impl IntoIterator<Item = UserDeviceRow>,
) -> std::collections::HashMap<String, Vec<DeviceRow>> {
    let mut devices: std::collections::HashMap<String, Vec<DeviceRow>> =
        std::collections::HashMap::new();
    for (id, platform, token, environment, app_id, user) in rows {
        devices
            .entry(user)
            .or_default()
            .push((id, platform, token, environment, app_id));
    }
    devices
}

/// The deliveries an append claimed under `handoff`: each of `updates` (with its user) to each
/// of that user's `devices`, sharing the appended copy of the update.
pub(super) fn hand_off<'a>(
    updates: impl IntoIterator<Item = (&'a str, &'a Arc<Update>)>,
    devices: &std::collections::HashMap<String, Vec<DeviceRow>>,
    handoff: &super::outbox::Handoff,
) -> Result<Vec<DueDelivery>, StoreError> {
    let mut claimed = Vec::new();
    for (user, update) in updates {
        for device in devices.get(user).into_iter().flatten() {
            claimed.push(handed_off(
                update,
                user,
                device.clone(),
                handoff,
                RowHint::default(),
            )?);
        }
    }
    Ok(claimed)
}

#[derive(Debug, sqlx::FromRow)]
pub(super) struct DueRow {
    update_id: Uuid,
    device_id: Uuid,
    user_id: String,
    attempts: i32,
    platform: String,
    token: String,
    environment: Option<String>,
    app_id: String,
    seq: i64,
    kind: String,
    tracking_id: Option<Uuid>,
    update_status: Option<String>,
    data: Option<sqlx::types::Json<serde_json::Value>>,
    notification: Option<sqlx::types::Json<crate::jobs::Notification>>,
    created_at: DateTime<Utc>,
    row_id: Option<Tid>,
}

impl DueRow {
    /// The claimed delivery this row is, leased until `lease_until`.
    pub(super) fn into_due(self, lease_until: DateTime<Utc>) -> Result<DueDelivery, StoreError> {
        let row = self;
        let update = Update {
            seq: row.seq,
            id: row.update_id,
            kind: row.kind,
            tracking_id: row.tracking_id,
            status: row.update_status,
            data: row.data.map(|j| j.0),
            notification: row.notification.map(|j| j.0),
            created_at: row.created_at,
        };
        let device = (
            row.device_id,
            row.platform,
            row.token,
            row.environment,
            row.app_id,
        );
        due(
            Arc::new(update),
            row.user_id,
            device,
            row.attempts,
            lease_until,
            RowHint(row.row_id),
        )
    }
}

/// One claimed delivery as the SQLite claim's JSON row carries it (ids in hex, times in
/// RFC 3339, as they are stored).
type JsonDue = (
    String,
    String,
    String,
    i32,
    String,
    String,
    Option<String>,
    String,
    i64,
    String,
    Option<String>,
    Option<String>,
    Option<serde_json::Value>,
    Option<crate::jobs::Notification>,
    String,
);

/// Claimed deliveries out of a JSON array of [`JsonDue`] rows, leased until `lease_until`.
pub(super) fn due_from_json(
    json: &str,
    lease_until: DateTime<Utc>,
) -> Result<Vec<DueDelivery>, StoreError> {
    let corrupt =
        |what: &str, e: &dyn std::fmt::Display| StoreError::Corrupt(format!("claimed {what}: {e}"));
    let uuid = |hex: &str| Uuid::parse_str(hex).map_err(|e| corrupt("id", &e));
    let rows: Vec<JsonDue> = serde_json::from_str(json).map_err(|e| corrupt("rows", &e))?;
    rows.into_iter()
        .map(|row| {
            let (update_id, device_id, user_id, attempts, platform, token, environment, app_id) =
                (row.0, row.1, row.2, row.3, row.4, row.5, row.6, row.7);
            let (seq, kind, tracking_id, status, data, notification, created_at) =
                (row.8, row.9, row.10, row.11, row.12, row.13, row.14);
            let update = Update {
                seq,
                id: uuid(&update_id)?,
                kind,
                tracking_id: tracking_id.as_deref().map(uuid).transpose()?,
                status,
                data,
                notification,
                created_at: DateTime::parse_from_rfc3339(&created_at)
                    .map_err(|e| corrupt("created_at", &e))?
                    .with_timezone(&Utc),
            };
            let device = (uuid(&device_id)?, platform, token, environment, app_id);
            due(
                Arc::new(update),
                user_id,
                device,
                attempts,
                lease_until,
                RowHint::default(),
            )
        })
        .collect()
}
