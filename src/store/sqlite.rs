//! SQLite engine: one writer connection (SQLite allows one writer anyway) plus a reader pool,
//! WAL, `synchronous=FULL` so an acknowledged write survives power loss.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use uuid::Uuid;

use super::rows::{self, DeviceRow};
use super::{Engine, Registered, Store, StoreError};
use crate::devices::{Device, NewDevice};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// The embedded store.
#[derive(Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    /// Open (creating if missing) the database file named by `url`.
    pub async fn connect(
        url: &str,
        readers: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(StoreError::from_sqlx)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(acquire_timeout)
            .connect_with(options.clone())
            .await
            .map_err(StoreError::from_sqlx)?;
        let reader = SqlitePoolOptions::new()
            .max_connections(readers.max(1))
            .acquire_timeout(acquire_timeout)
            .connect_with(options.read_only(true))
            .await
            .map_err(StoreError::from_sqlx)?;
        Ok(Self { writer, reader })
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn engine(&self) -> Engine {
        Engine::Sqlite
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.writer).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.reader)
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
        let now = Utc::now();
        let mut tx = self.writer.begin().await.map_err(StoreError::from_sqlx)?;
        let existing: Option<(Uuid, String)> =
            sqlx::query_as("SELECT id, user_id FROM devices WHERE platform = $1 AND token = $2")
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
        tx.commit().await.map_err(StoreError::from_sqlx)?;
        Ok(Registered {
            device: Device::try_from(row)?,
            created,
        })
    }

    async fn list_devices(&self, user_id: &str) -> Result<Vec<Device>, StoreError> {
        let rows: Vec<DeviceRow> = sqlx::query_as(rows::LIST_DEVICES)
            .bind(user_id)
            .fetch_all(&self.reader)
            .await
            .map_err(StoreError::from_sqlx)?;
        rows::devices(rows)
    }

    async fn delete_device(&self, user_id: &str, id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM devices WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(user_id)
            .execute(&self.writer)
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
            .execute(&self.writer)
            .await
            .map_err(StoreError::from_sqlx)?;
        Ok(done.rows_affected() > 0)
    }

    async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }
}
