//! Row types shared by both engines, decoded with sqlx and converted to domain types.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::StoreError;
use crate::devices::{ApnsEnvironment, Device, DeviceStatus, Platform};

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
            registered_at: row.registered_at,
        })
    }
}

/// Convert a batch of rows.
pub(super) fn devices(rows: Vec<DeviceRow>) -> Result<Vec<Device>, StoreError> {
    rows.into_iter().map(Device::try_from).collect()
}
