//! The part of the store both engines share: the same SQL (from `rows`) and the same
//! transaction logic, expanded once per engine so each binds its own concrete sqlx types.
//! Engine-specific pieces are hooks on the engine type: `writer()`, `reader()`, `migrator()`,
//! `claim_rows()` (SKIP LOCKED on PostgreSQL) and `notify_jobs()` (NOTIFY on PostgreSQL).

/// Implement [`super::Store`] for `$ty` on database `$db`; `$lock` is appended to the row
/// lookups that must lock (empty on SQLite, whose single writer already serializes).
macro_rules! impl_store {
    ($ty:ty, $db:ty, $engine:expr, $lock:literal) => {
        impl $ty {
            async fn try_upsert(
                &self,
                user_id: &str,
                new: &$crate::devices::NewDevice,
            ) -> Result<super::Registered, super::StoreError> {
                let now = chrono::Utc::now();
                let mut tx = self.writer().begin().await?;
                let existing: Option<(uuid::Uuid, String)> = sqlx::query_as(concat!(
                    "SELECT id, user_id FROM devices WHERE platform = $1 AND token = $2",
                    $lock
                ))
                .bind(new.platform.as_str())
                .bind(&new.token)
                .fetch_optional(&mut *tx)
                .await?;
                let (row, created) = match existing {
                    Some((id, owner)) if owner == user_id => {
                        let row: rows::DeviceRow = sqlx::query_as(rows::UPDATE_DEVICE)
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
                            // The token moved to another user: the old owner's record (and
                            // anything queued for it) goes, so nothing of theirs reaches the new one.
                            for sql in rows::DELETE_OPEN_DELIVERIES {
                                sqlx::query(sql).bind(id).execute(&mut *tx).await?;
                            }
                            sqlx::query("DELETE FROM devices WHERE id = $1").bind(id).execute(&mut *tx).await?;
                        }
                        let row: rows::DeviceRow = sqlx::query_as(rows::INSERT_DEVICE)
                            .bind(uuid::Uuid::now_v7())
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
                Ok(super::Registered {
                    device: $crate::devices::Device::try_from(row)?,
                    created,
                })
            }

            /// Wake in-process listeners after a commit that appended updates.
            fn signal_appended(&self) {
                self.appended.notify_waiters();
                self.appended.notify_one();
            }

            /// Find the held job's counters under the fence; `None` when the lease is lost.
            async fn fenced(
                tx: &mut sqlx::Transaction<'_, $db>,
                lease: &$crate::jobs::Lease,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<Option<(i32, i32, String)>, sqlx::Error> {
                sqlx::query_as(concat!("SELECT attempts, max_attempts, user_id FROM jobs", lease_fence!(), $lock))
                    .bind(lease.job_id)
                    .bind(&lease.owner)
                    .bind(lease.attempt)
                    .bind(now)
                    .fetch_optional(&mut **tx)
                    .await
            }
        }

        #[async_trait::async_trait]
        impl super::Store for $ty {
            fn engine(&self) -> super::Engine {
                $engine
            }

            async fn migrate(&self) -> Result<(), super::StoreError> {
                Self::migrator().run(self.writer()).await?;
                Ok(())
            }

            async fn ping(&self) -> Result<(), super::StoreError> {
                let latest = Self::migrator().iter().map(|m| m.version).max().unwrap_or(0);
                let applied: Option<i64> =
                    sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                        .fetch_one(self.reader())
                        .await?;
                if applied.unwrap_or(0) < latest {
                    return Err(super::StoreError::Corrupt("migrations are not applied".into()));
                }
                Ok(())
            }

            async fn upsert_device(
                &self,
                user_id: &str,
                new: &$crate::devices::NewDevice,
            ) -> Result<super::Registered, super::StoreError> {
                // Two first registrations of one token race on the unique key; the loser
                // retries and then finds the winner's row.
                let mut attempt = 0;
                loop {
                    match self.try_upsert(user_id, new).await {
                        Err(super::StoreError::Database(err)) if super::is_unique_violation(&err) && attempt < 3 => {
                            attempt += 1
                        }
                        other => return other,
                    }
                }
            }

            async fn list_devices(&self, user_id: &str) -> Result<Vec<$crate::devices::Device>, super::StoreError> {
                let found: Vec<rows::DeviceRow> =
                    sqlx::query_as(rows::LIST_DEVICES).bind(user_id).fetch_all(self.reader()).await?;
                rows::devices(found)
            }

            async fn delete_device(&self, user_id: &str, id: uuid::Uuid) -> Result<bool, super::StoreError> {
                let mut tx = self.writer().begin().await?;
                let deleted = sqlx::query("DELETE FROM devices WHERE id = $1 AND user_id = $2")
                    .bind(id)
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                    > 0;
                // Only the owner's delete takes the device's queue with it.
                if deleted {
                    for sql in rows::DELETE_OPEN_DELIVERIES {
                        sqlx::query(sql).bind(id).execute(&mut *tx).await?;
                    }
                }
                tx.commit().await?;
                Ok(deleted)
            }

            async fn invalidate_device(
                &self,
                id: uuid::Uuid,
                reason: &str,
                since: Option<chrono::DateTime<chrono::Utc>>,
            ) -> Result<bool, super::StoreError> {
                let done = sqlx::query(rows::INVALIDATE_DEVICE)
                    .bind(id)
                    .bind(reason)
                    .bind(since)
                    .execute(self.writer())
                    .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn create_jobs(
                &self,
                jobs: &[$crate::jobs::NewJob],
            ) -> Result<Vec<$crate::jobs::CreateOutcome>, super::StoreError> {
                use $crate::jobs::CreateOutcome;
                let now = chrono::Utc::now();
                // Without idempotency keys nothing can conflict, so an engine may insert the
                // whole batch in one statement.
                if jobs.iter().all(|j| j.idempotency_key.is_none())
                    && let Some(rows) = self.insert_jobs_at_once(jobs, now).await?
                {
                    return rows
                        .into_iter()
                        .map(|row| Ok(CreateOutcome::Created(row.try_into()?)))
                        .collect();
                }
                let mut tx = self.writer().begin().await?;
                let mut outcomes = Vec::with_capacity(jobs.len());
                let mut created: Vec<&str> = Vec::new();
                for job in jobs {
                    let inserted: Option<rows::JobRow> = sqlx::query_as(rows::INSERT_JOB)
                        .bind(uuid::Uuid::now_v7())
                        .bind(&job.user_id)
                        .bind(&job.kind)
                        .bind(sqlx::types::Json(&job.input))
                        .bind(job.max_attempts)
                        .bind(&job.callback_url)
                        .bind(job.notify.as_ref().map(sqlx::types::Json))
                        .bind(&job.idempotency_key)
                        .bind(&job.request_hash)
                        .bind(now)
                        .fetch_optional(&mut *tx)
                        .await?;
                    outcomes.push(match inserted {
                        Some(row) => {
                            created.push(&job.kind);
                            CreateOutcome::Created(row.try_into()?)
                        }
                        None => {
                            // The key was used before: by a committed transaction (ON CONFLICT
                            // waited for it) or earlier in this very batch.
                            let existing: rows::JobRow = sqlx::query_as(rows::JOB_BY_KEY)
                                .bind(&job.user_id)
                                .bind(&job.idempotency_key)
                                .fetch_one(&mut *tx)
                                .await?;
                            if existing.request_hash.as_deref() == Some(job.request_hash.as_str()) {
                                CreateOutcome::Replayed(existing.try_into()?)
                            } else {
                                CreateOutcome::KeyReused
                            }
                        }
                    });
                }
                created.sort_unstable();
                created.dedup();
                for kind in created {
                    Self::notify_jobs(&mut tx, kind).await?;
                }
                tx.commit().await?;
                Ok(outcomes)
            }

            async fn get_job(
                &self,
                user_id: &str,
                id: uuid::Uuid,
            ) -> Result<Option<$crate::jobs::Job>, super::StoreError> {
                let row: Option<rows::JobRow> =
                    sqlx::query_as(rows::GET_JOB).bind(id).bind(user_id).fetch_optional(self.reader()).await?;
                row.map(TryInto::try_into).transpose()
            }

            async fn list_jobs(
                &self,
                user_id: &str,
                status: Option<$crate::jobs::JobStatus>,
                before: Option<uuid::Uuid>,
                limit: i64,
            ) -> Result<Vec<$crate::jobs::Job>, super::StoreError> {
                let found: Vec<rows::JobRow> = sqlx::query_as(rows::LIST_JOBS)
                    .bind(user_id)
                    .bind(status.map(|s| s.as_str()))
                    .bind(before)
                    .bind(limit)
                    .fetch_all(self.reader())
                    .await?;
                found.into_iter().map(TryInto::try_into).collect()
            }

            async fn cancel_job(
                &self,
                user_id: &str,
                id: uuid::Uuid,
            ) -> Result<$crate::jobs::CancelOutcome, super::StoreError> {
                use $crate::jobs::{CancelOutcome, Job};
                let now = chrono::Utc::now();
                let mut tx = self.writer().begin().await?;
                let canceled: Option<rows::JobRow> =
                    sqlx::query_as(rows::CANCEL_JOB).bind(id).bind(user_id).bind(now).fetch_optional(&mut *tx).await?;
                let outcome = match canceled {
                    Some(row) => {
                        let job = Job::try_from(row)?;
                        let update = $crate::updates::NewUpdate {
                            kind: "job.canceled".into(),
                            tracking_id: Some(id),
                            status: Some("canceled".into()),
                            data: None,
                            notification: None,
                        };
                        Self::append_update(&mut tx, user_id, &update, now).await?;
                        CancelOutcome::Canceled(job)
                    }
                    None => {
                        let row: Option<rows::JobRow> =
                            sqlx::query_as(rows::GET_JOB).bind(id).bind(user_id).fetch_optional(&mut *tx).await?;
                        match row {
                            Some(row) => CancelOutcome::Finished(row.try_into()?),
                            None => CancelOutcome::NotFound,
                        }
                    }
                };
                tx.commit().await?;
                self.signal_appended();
                Ok(outcome)
            }

            async fn claim_jobs(
                &self,
                kinds: &[String],
                max: i64,
                owner: &str,
                lease: std::time::Duration,
            ) -> Result<Vec<$crate::jobs::ClaimedJob>, super::StoreError> {
                if kinds.is_empty() || max <= 0 {
                    return Ok(Vec::new());
                }
                let now = chrono::Utc::now();
                let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(30));
                let mut tx = self.writer().begin().await?;
                let mut claimed = Self::claim_rows(&mut tx, kinds, max, owner, until, now).await?;
                claimed.sort_by(|a, b| a.user_id.cmp(&b.user_id).then(a.id.cmp(&b.id)));
                let updates: Vec<$crate::updates::NewUpdate> = claimed
                    .iter()
                    .map(|row| $crate::updates::NewUpdate {
                        kind: "job.processing".into(),
                        tracking_id: Some(row.id),
                        status: Some("processing".into()),
                        data: Some(serde_json::json!({ "attempt": row.attempts })),
                        notification: None,
                    })
                    .collect();
                let events: Vec<(&str, &$crate::updates::NewUpdate)> =
                    claimed.iter().map(|row| row.user_id.as_str()).zip(&updates).collect();
                if !events.is_empty() {
                    Self::append_updates(&mut tx, &events, now).await?;
                }
                tx.commit().await?;
                self.signal_appended();
                Ok(claimed.into_iter().map(|row| row.into_claimed(until)).collect())
            }

            async fn heartbeat_job(
                &self,
                lease: &$crate::jobs::Lease,
                extend: std::time::Duration,
            ) -> Result<Option<chrono::DateTime<chrono::Utc>>, super::StoreError> {
                let now = chrono::Utc::now();
                let until = now + chrono::Duration::from_std(extend).unwrap_or(chrono::Duration::seconds(30));
                let row: Option<(Option<chrono::DateTime<chrono::Utc>>,)> = sqlx::query_as(rows::HEARTBEAT_JOB)
                    .bind(lease.job_id)
                    .bind(&lease.owner)
                    .bind(lease.attempt)
                    .bind(now)
                    .bind(until)
                    .fetch_optional(self.writer())
                    .await?;
                Ok(row.map(|(at,)| at.unwrap_or(until)))
            }

            async fn progress_job(
                &self,
                lease: &$crate::jobs::Lease,
                percent: i32,
                data: Option<serde_json::Value>,
            ) -> Result<bool, super::StoreError> {
                let now = chrono::Utc::now();
                let mut tx = self.writer().begin().await?;
                let user: Option<(String,)> = sqlx::query_as(rows::PROGRESS_JOB)
                    .bind(lease.job_id)
                    .bind(&lease.owner)
                    .bind(lease.attempt)
                    .bind(now)
                    .bind(percent)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some((user_id,)) = user else { return Ok(false) };
                let mut payload = serde_json::json!({ "progress": percent });
                if let Some(data) = data {
                    payload["data"] = data;
                }
                let update = $crate::updates::NewUpdate {
                    kind: "job.processing".into(),
                    tracking_id: Some(lease.job_id),
                    status: Some("processing".into()),
                    data: Some(payload),
                    notification: None,
                };
                Self::append_update(&mut tx, &user_id, &update, now).await?;
                tx.commit().await?;
                self.signal_appended();
                Ok(true)
            }

            async fn complete_job(
                &self,
                lease: &$crate::jobs::Lease,
                result: &serde_json::Value,
                notification: Option<&$crate::jobs::Notification>,
            ) -> Result<bool, super::StoreError> {
                let now = chrono::Utc::now();
                let mut tx = self.writer().begin().await?;
                let row: Option<(String, Option<sqlx::types::Json<$crate::jobs::Notify>>)> =
                    sqlx::query_as(rows::COMPLETE_JOB)
                        .bind(lease.job_id)
                        .bind(&lease.owner)
                        .bind(lease.attempt)
                        .bind(now)
                        .bind(sqlx::types::Json(result))
                        .fetch_optional(&mut *tx)
                        .await?;
                let Some((user_id, notify)) = row else { return Ok(false) };
                let notification = notification.cloned().or_else(|| notify.and_then(|n| n.0.alert()));
                let update = $crate::updates::NewUpdate {
                    kind: "job.completed".into(),
                    tracking_id: Some(lease.job_id),
                    status: Some("completed".into()),
                    data: Some(serde_json::json!({ "result": result })),
                    notification,
                };
                Self::append_update(&mut tx, &user_id, &update, now).await?;
                tx.commit().await?;
                self.signal_appended();
                Ok(true)
            }

            async fn fail_job(
                &self,
                lease: &$crate::jobs::Lease,
                error: &$crate::jobs::JobErrorInfo,
                retry_at: Option<chrono::DateTime<chrono::Utc>>,
            ) -> Result<bool, super::StoreError> {
                let now = chrono::Utc::now();
                let mut tx = self.writer().begin().await?;
                let Some((attempts, max_attempts, user_id)) = Self::fenced(&mut tx, lease, now).await? else {
                    return Ok(false);
                };
                match retry_at {
                    Some(at) if attempts < max_attempts => {
                        sqlx::query(rows::RETRY_JOB)
                            .bind(lease.job_id)
                            .bind(&lease.owner)
                            .bind(lease.attempt)
                            .bind(now)
                            .bind(at)
                            .bind(&error.code)
                            .bind(&error.message)
                            .execute(&mut *tx)
                            .await?;
                    }
                    _ => {
                        sqlx::query(rows::FAIL_JOB)
                            .bind(lease.job_id)
                            .bind(&lease.owner)
                            .bind(lease.attempt)
                            .bind(now)
                            .bind(&error.code)
                            .bind(&error.message)
                            .execute(&mut *tx)
                            .await?;
                        let update = $crate::updates::NewUpdate {
                            kind: "job.failed".into(),
                            tracking_id: Some(lease.job_id),
                            status: Some("failed".into()),
                            data: Some(serde_json::json!({ "error": error })),
                            notification: None,
                        };
                        Self::append_update(&mut tx, &user_id, &update, now).await?;
                    }
                }
                tx.commit().await?;
                self.signal_appended();
                Ok(true)
            }

            async fn release_job(&self, lease: &$crate::jobs::Lease) -> Result<bool, super::StoreError> {
                let now = chrono::Utc::now();
                let done = sqlx::query(rows::RELEASE_JOB)
                    .bind(lease.job_id)
                    .bind(&lease.owner)
                    .bind(lease.attempt)
                    .bind(now)
                    .execute(self.writer())
                    .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn expire_leases(&self) -> Result<u64, super::StoreError> {
                let now = chrono::Utc::now();
                let mut tx = self.writer().begin().await?;
                let requeued = sqlx::query(rows::REQUEUE_EXPIRED).bind(now).execute(&mut *tx).await?.rows_affected();
                let mut failed: Vec<(uuid::Uuid, String)> =
                    sqlx::query_as(rows::FAIL_EXPIRED).bind(now).fetch_all(&mut *tx).await?;
                failed.sort_by(|a, b| a.1.cmp(&b.1));
                for (id, user_id) in &failed {
                    let update = $crate::updates::NewUpdate {
                        kind: "job.failed".into(),
                        tracking_id: Some(*id),
                        status: Some("failed".into()),
                        data: Some(serde_json::json!({ "error": {
                            "code": "lease_expired",
                            "message": "the worker holding the job stopped answering"
                        }})),
                        notification: None,
                    };
                    Self::append_update(&mut tx, user_id, &update, now).await?;
                }
                if requeued > 0 {
                    Self::notify_jobs(&mut tx, "").await?;
                }
                tx.commit().await?;
                self.signal_appended();
                Ok(requeued + failed.len() as u64)
            }

            async fn job_counts(&self) -> Result<Vec<(String, i64)>, super::StoreError> {
                Ok(sqlx::query_as("SELECT status, count(*) FROM jobs GROUP BY status")
                    .fetch_all(self.reader())
                    .await?)
            }

            async fn list_updates(
                &self,
                user_id: &str,
                after: i64,
                limit: i64,
            ) -> Result<Vec<$crate::updates::Update>, super::StoreError> {
                let found: Vec<rows::UpdateRow> = sqlx::query_as(rows::LIST_UPDATES)
                    .bind(user_id)
                    .bind(after)
                    .bind(limit)
                    .fetch_all(self.reader())
                    .await?;
                Ok(found.into_iter().map(Into::into).collect())
            }

            async fn close(&self) {
                self.close_pools().await;
            }
        }
    };
}

pub(super) use impl_store;
