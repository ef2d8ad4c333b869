//! PostgreSQL engine: the cluster store. Row locks serialize concurrent registrations of one
//! token; every node shares the same tables.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use uuid::Uuid;

use super::rows::{self, DeviceRow};
use super::{Engine, Registered, Store, StoreError};
use crate::devices::{Device, NewDevice};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Unique violation: another transaction inserted the same key first.
const UNIQUE_VIOLATION: &str = "23505";

/// The PostgreSQL store.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connect a pool to `url` (no migrations are run here).
    pub async fn connect(
        url: &str,
        max: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(StoreError::from_sqlx)?;
        let pool = PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(acquire_timeout)
            .connect_with(options)
            .await
            .map_err(StoreError::from_sqlx)?;
        Ok(Self { pool })
    }

    /// The pool, for engine-specific work (LISTEN/NOTIFY) elsewhere in the crate.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn try_upsert(&self, user_id: &str, new: &NewDevice) -> Result<Registered, sqlx::Error> {
        let now = Utc::now();
        let mut tx = self.pool.begin().await?;
        let existing: Option<(Uuid, String)> = sqlx::query_as(
            "SELECT id, user_id FROM devices WHERE platform = $1 AND token = $2 FOR UPDATE",
        )
        .bind(new.platform.as_str())
        .bind(&new.token)
        .fetch_optional(&mut *tx)
        .await?;
        let (row, created) = match existing {
            Some((id, owner)) if owner == user_id => {
                let row: DeviceRow = sqlx::query_as(rows::UPDATE_DEVICE)
                    .bind(new.environment.map(|e| e.as_str()))
                    .bind(&new.app_id)
                    .bind(&new.locale)
                    .bind(&new.app_version)
                    .bind(now)
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await?;
                (row, false)
            }
            other => {
                if let Some((id, _)) = other {
                    // The token moved to another user: the old owner's record (and anything queued
                    // for it) goes, so nothing of theirs reaches the new owner.
                    sqlx::query("DELETE FROM devices WHERE id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                let row: DeviceRow = sqlx::query_as(rows::INSERT_DEVICE)
                    .bind(Uuid::now_v7())
                    .bind(user_id)
                    .bind(new.platform.as_str())
                    .bind(&new.token)
                    .bind(new.environment.map(|e| e.as_str()))
                    .bind(&new.app_id)
                    .bind(&new.locale)
                    .bind(&new.app_version)
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await?;
                (row, true)
            }
        };
        tx.commit().await?;
        Device::try_from(row)
            .map(|device| Registered { device, created })
            .map_err(|e| sqlx::Error::Protocol(e.to_string()))
    }
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some(UNIQUE_VIOLATION))
}

#[async_trait]
impl Store for PgStore {
    fn engine(&self) -> Engine {
        Engine::Postgres
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await
                .map_err(StoreError::from_sqlx)?;
        if applied.unwrap_or(0) < latest {
            return Err(StoreError::Corrupt("migrations are not applied".into()));
        }
        Ok(())
    }

    async fn upsert_device(
        &self,
        user_id: &str,
        new: &NewDevice,
    ) -> Result<Registered, StoreError> {
        // Two first registrations of one token race on the unique key; the loser retries and
        // then finds the winner's row under its lock.
        let mut attempt = 0;
        loop {
            match self.try_upsert(user_id, new).await {
                Err(err) if is_unique_violation(&err) && attempt < 3 => attempt += 1,
                other => return other.map_err(StoreError::from_sqlx),
            }
        }
    }

    async fn list_devices(&self, user_id: &str) -> Result<Vec<Device>, StoreError> {
        let rows: Vec<DeviceRow> = sqlx::query_as(rows::LIST_DEVICES)
            .bind(user_id)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from_sqlx)?;
        rows::devices(rows)
    }

    async fn delete_device(&self, user_id: &str, id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM devices WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(user_id)
            .execute(&self.pool)
            .await
            .map_err(StoreError::from_sqlx)?;
        Ok(done.rows_affected() > 0)
    }

    async fn invalidate_device(
        &self,
        id: Uuid,
        reason: &str,
        since: Option<DateTime<Utc>>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(rows::INVALIDATE_DEVICE)
            .bind(id)
            .bind(reason)
            .bind(since)
            .execute(&self.pool)
            .await
            .map_err(StoreError::from_sqlx)?;
        Ok(done.rows_affected() > 0)
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
