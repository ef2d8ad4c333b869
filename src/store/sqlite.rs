//! SQLite engine: one writer connection (SQLite allows one writer anyway) plus a reader pool,
//! WAL, `synchronous=FULL` so an acknowledged write survives power loss, and a connection of
//! its own that checkpoints the WAL into the database file in the background.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::append::impl_append;
use super::outbox::impl_outbox;
use super::rows::{self, ClaimRow};
use super::shared::impl_store;
use super::touched::RecentTouches;
use super::{Engine, StoreError};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// How often the background connection checkpoints the WAL. Left to the writer, a checkpoint
/// runs inside the commit that crosses SQLite's threshold (1000 pages) and ends in an fsync of
/// the pages it copied, scattered over the file: measured here 13-18 ms, during which no
/// append or outcome can be written. A quarter of a second of WAL is about what that
/// threshold held under the pipeline bench.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// WAL pages after which the writer checkpoints after all: a backstop that bounds the WAL
/// should the background checkpoints fall behind or fail (64 MiB of 4 KiB pages).
const WRITER_CHECKPOINT_PAGES: u32 = 16_000;

/// One append transaction (see `append_updates_at_once`). `jsonb_each` hands each row over as
/// JSONB, which `->>` reads in place; over `json_each`'s text every extraction parsed the row
/// again (a fifth of the writer thread's time, profiled). `OR FAIL`: a failing statement need
/// not undo only itself, as the whole transaction is rolled back (the profile still shows
/// statement-journal writes, from a statement not yet found).
const APPEND_AT_ONCE: &str = "BEGIN IMMEDIATE; \
     INSERT INTO user_seqs (user_id, last_seq) SELECT key, value FROM json_each($1) WHERE true \
     ON CONFLICT (user_id) DO UPDATE SET last_seq = user_seqs.last_seq + excluded.last_seq; \
     INSERT OR FAIL INTO updates (id, user_id, seq, type, tracking_id, status, data, notification, created_at) \
     SELECT unhex(e.value ->> 0), e.value ->> 1, \
     (SELECT last_seq FROM user_seqs WHERE user_id = e.value ->> 1) - (e.value ->> 2) + (e.value ->> 3), \
     e.value ->> 4, unhex(e.value ->> 5), e.value ->> 6, nullif(e.value -> 7, 'null'), \
     nullif(e.value -> 8, 'null'), $3 \
     FROM jsonb_each($2) e; \
     INSERT OR FAIL INTO deliveries (update_id, device_id, user_id, status, attempts, lease_owner, \
     lease_expires_at, next_attempt_at, created_at, updated_at) \
     SELECT u.id, v.id, v.user_id, $4, $5, $6, $7, u.created_at, u.created_at, u.created_at \
     FROM updates u JOIN devices v ON v.user_id = u.user_id AND v.status = 'active' \
     WHERE u.id IN (SELECT unhex(value ->> 0) FROM jsonb_each($2)); \
     SELECT json_array(\
     (SELECT json_group_array(json_array(user_id, last_seq)) FROM user_seqs \
     WHERE user_id IN (SELECT key FROM json_each($1))), \
     CASE WHEN $8 THEN (SELECT json_group_array(json_array(hex(id), platform, token, environment, \
     app_id, user_id)) FROM devices WHERE status = 'active' \
     AND user_id IN (SELECT key FROM json_each($1))) ELSE json_array() END); \
     COMMIT";

/// One transaction of Sent outcomes (see `record_sent_at_once`).
pub const RECORD_SENT_AT_ONCE: &str = "BEGIN IMMEDIATE; \
     UPDATE OR FAIL deliveries SET status = 'sent', provider_id = b.value ->> 3, updated_at = $1, \
     lease_owner = NULL, lease_expires_at = NULL FROM jsonb_each($2) b \
     WHERE update_id = unhex(b.value ->> 0) AND device_id = unhex(b.value ->> 1) \
     AND status = 'sending' AND attempts = (b.value ->> 2); \
     UPDATE OR FAIL devices SET last_push_at = $1 WHERE id IN (SELECT unhex(value) FROM json_each($3)) \
     AND (last_push_at IS NULL OR last_push_at < $4); \
     COMMIT";

/// The embedded store.
#[derive(Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    checkpointer: SqlitePool,
    /// Stops the background checkpoints (on close).
    stop_checkpoints: CancellationToken,
    /// Stops them when the last clone of the store goes unclosed.
    _checkpoints: Arc<DropGuard>,
    appended: Arc<Notify>,
    /// Devices whose `last_push_at` this node wrote lately.
    touched: Arc<RecentTouches>,
}

impl SqliteStore {
    /// The retention purge's delete of deliveries before an update id `$1` (delivered ones
    /// stay in the outbox, marked sent), at most `$2` rows per statement.
    const PURGE_DELIVERIES: &'static [&'static str] = &["DELETE FROM deliveries WHERE rowid IN \
         (SELECT rowid FROM deliveries WHERE update_id < $1 LIMIT $2)"];

    /// The outcome purge's delete of finished deliveries before an update id `$1`, at most
    /// `$2` rows per statement.
    const PURGE_OUTCOMES: &'static [&'static str] = &[
        "DELETE FROM deliveries WHERE rowid IN (SELECT rowid FROM deliveries \
         WHERE update_id < $1 AND status IN ('sent', 'failed', 'dropped') LIMIT $2)",
    ];

    /// The retention purge's delete of updates before an id `$1`, at most `$2` per statement.
    const PURGE_UPDATES: &'static str =
        "DELETE FROM updates WHERE rowid IN (SELECT rowid FROM updates WHERE id < $1 LIMIT $2)";

    fn rows_affected(done: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        done.rows_affected()
    }

    /// Open (creating if missing) the database file named by `url`.
    pub async fn connect(
        url: &str,
        readers: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        // No ping before each acquire: the database is an in-process file, and the ping is a
        // round trip to the connection's thread that every transaction waited for (measured:
        // ~2 ms of a 7 ms group commit under load).
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .acquire_timeout(acquire_timeout)
            .connect_with(
                options
                    .clone()
                    .pragma("wal_autocheckpoint", WRITER_CHECKPOINT_PAGES.to_string()),
            )
            .await?;
        let checkpointer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .acquire_timeout(acquire_timeout)
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(readers.max(1))
            .test_before_acquire(false)
            .acquire_timeout(acquire_timeout)
            .connect_with(options.read_only(true))
            .await?;
        let stop = CancellationToken::new();
        tokio::spawn(checkpoint_loop(checkpointer.clone(), stop.clone()));
        Ok(Self {
            writer,
            reader,
            checkpointer,
            stop_checkpoints: stop.clone(),
            _checkpoints: Arc::new(stop.drop_guard()),
            appended: Arc::new(Notify::new()),
            touched: Arc::default(),
        })
    }

    /// Close the pools; the checkpointer's goes last, so its connection, the last one, folds
    /// the WAL into the database file as it closes.
    async fn close_pools(&self) {
        self.stop_checkpoints.cancel();
        self.writer.close().await;
        self.reader.close().await;
        self.checkpointer.close().await;
    }

    fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    fn migrator() -> &'static sqlx::migrate::Migrator {
        &MIGRATOR
    }

    /// The one-statement claim; the single writer makes row locks unnecessary.
    async fn claim_rows(
        tx: &mut Transaction<'_, Sqlite>,
        kinds: &[String],
        max: i64,
        owner: &str,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Vec<ClaimRow>, sqlx::Error> {
        sqlx::query_as(
            "UPDATE jobs SET status = 'processing', attempts = attempts + 1, lease_owner = $1, \
             lease_expires_at = $2, updated_at = $3 \
             WHERE id IN (SELECT id FROM jobs WHERE status = 'pending' AND run_at <= $3 \
                          AND kind IN (SELECT value FROM json_each($5)) ORDER BY run_at, id LIMIT $4) \
             RETURNING id, user_id, kind, input, attempts, max_attempts, lease_expires_at",
        )
        .bind(owner)
        .bind(until)
        .bind(now)
        .bind(max)
        .bind(sqlx::types::Json(kinds))
        .fetch_all(&mut **tx)
        .await
    }

    /// The single writer makes per-row inserts cheap; no bulk path needed.
    async fn insert_jobs_at_once(
        &self,
        _jobs: &[crate::jobs::NewJob],
        _now: DateTime<Utc>,
    ) -> Result<Option<Vec<rows::JobRow>>, sqlx::Error> {
        Ok(None)
    }

    /// A batch of published events appended in one transaction sent to the connection's thread
    /// as one query (see [`write_at_once`]) instead of seven round trips: the writer is the one
    /// serial resource of a SQLite node, and while the task that holds it waits to be
    /// scheduled between statements nothing else can be written. The steps are
    /// those of `append_updates_leased`: counters bumped once per user, updates numbered in
    /// batch order from the bumped counters, one delivery per active device (claimed under
    /// `handoff` when given). The batch travels as JSON, so the query text, and its prepared
    /// statements, are the same whatever the batch.
    async fn append_updates_at_once(
        &self,
        events: &[(&str, &crate::updates::NewUpdate)],
        now: DateTime<Utc>,
        handoff: Option<&super::Handoff>,
    ) -> Result<Option<super::Appended>, StoreError> {
        use std::collections::HashMap;
        let json = |e: serde_json::Error| StoreError::Corrupt(format!("append batch: {e}"));
        let (counts, places) = super::append::places(events);
        let ids: Vec<uuid::Uuid> = events.iter().map(|_| uuid::Uuid::now_v7()).collect();
        // Each row a JSON array (a tuple serializes as one), data and notification inline as
        // JSON: the query stores the JSON text `->` gives back for them, so nothing is escaped
        // into a string here to be unescaped there.
        let rows: Vec<_> = events
            .iter()
            .zip(&ids)
            .zip(&places)
            .map(|(((user, new), id), place)| {
                (
                    id.simple().to_string(),
                    user,
                    counts.get(user).copied().unwrap_or(1),
                    place,
                    new.kind.as_str(),
                    new.tracking_id.map(|t| t.simple().to_string()),
                    new.status.as_deref(),
                    new.data.as_ref(),
                    new.notification.as_ref(),
                )
            })
            .collect();
        let counts_json = serde_json::to_string(&counts).map_err(json)?;
        let rows_json = serde_json::to_string(&rows).map_err(json)?;
        let (status, attempts) = if handoff.is_some() {
            ("sending", 1)
        } else {
            ("pending", 0)
        };
        let owner = handoff.map(|h| h.owner.clone());
        let until = handoff.map(|h| h.until);
        let handed_off = handoff.is_some();
        let found: Vec<(String,)> = write_at_once(self.writer.clone(), move |conn| {
            Box::pin(async move {
                sqlx::query_as(APPEND_AT_ONCE)
                    .bind(counts_json)
                    .bind(rows_json)
                    .bind(now)
                    .bind(status)
                    .bind(attempts)
                    .bind(owner)
                    .bind(until)
                    .bind(handed_off)
                    .fetch_all(conn)
                    .await
            })
        })
        .await?;
        let [(answer,)] = <[(String,); 1]>::try_from(found)
            .map_err(|_| StoreError::Corrupt("the append returned no answer".into()))?;
        let (counters, devices): (Vec<(String, i64)>, Vec<DeviceJson>) =
            serde_json::from_str(&answer).map_err(json)?;
        let last: HashMap<String, i64> = counters.into_iter().collect();
        let mut updates = Vec::with_capacity(events.len());
        for (((user, new), id), place) in events.iter().zip(&ids).zip(&places) {
            let (Some(last), Some(n)) = (last.get(*user), counts.get(user)) else {
                return Err(StoreError::Corrupt(format!(
                    "no counter came back for {user}"
                )));
            };
            updates.push(Arc::new(new.appended(*id, last - n + place, now)));
        }
        let mut claimed = Vec::new();
        if let Some(handoff) = handoff {
            let devices = super::claimed::by_user(device_rows(devices)?);
            let of_user = events.iter().map(|(user, _)| *user).zip(&updates);
            claimed = super::claimed::hand_off(of_user, &devices, handoff)?;
        }
        Ok(Some(super::Appended { updates, claimed }))
    }

    /// A batch of outcomes that are all Sent (nearly every batch) recorded in one transaction
    /// sent as one query, whatever its size (see [`Self::append_updates_at_once`]): the rows go
    /// as JSON. Fenced by attempt, and every device pushed to touched unless it was within
    /// [`super::outbox::LAST_PUSH_RESOLUTION`], as in the general path. False when the batch
    /// holds another outcome.
    async fn record_sent_at_once(
        &self,
        results: &[super::DeliveryResult],
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let mut sent = Vec::with_capacity(results.len());
        let mut devices = Vec::with_capacity(results.len());
        for r in results {
            let super::DeliveryOutcome::Sent { provider_id } = &r.outcome else {
                return Ok(false);
            };
            sent.push((
                r.update_id.simple().to_string(),
                r.device_id.simple().to_string(),
                r.attempt,
                provider_id.as_deref(),
            ));
            devices.push(r.device_id);
        }
        devices.sort_unstable();
        devices.dedup();
        let touched = self.touched.stale(devices, now);
        let devices: Vec<String> = touched.iter().map(|d| d.simple().to_string()).collect();
        let json = |e: serde_json::Error| StoreError::Corrupt(format!("outcome batch: {e}"));
        let sent = serde_json::to_string(&sent).map_err(json)?;
        let devices = serde_json::to_string(&devices).map_err(json)?;
        let touched_before = now - super::outbox::LAST_PUSH_RESOLUTION;
        write_at_once(self.writer.clone(), move |conn| {
            Box::pin(async move {
                sqlx::query(RECORD_SENT_AT_ONCE)
                    .bind(now)
                    .bind(sent)
                    .bind(devices)
                    .bind(touched_before)
                    .execute(conn)
                    .await
            })
        })
        .await?;
        self.touched.written(&touched, now);
        Ok(true)
    }

    /// Claim up to `max` due deliveries under `owner` until `until`, and read them back, oldest
    /// update first, in one JSON row (see [`Self::bump_counters`]). They are read back by their
    /// lease, through the in-flight index (partial on the lease: migration 0008). The single writer makes row
    /// locks unnecessary; and no delivery outlives its device here although deliveries carry no
    /// foreign keys (migration 0005), as the writer runs a device's delete (which takes its
    /// open deliveries) and an append (which reads the active devices) one after the other.
    /// (The bundled SQLite is 3.50: ORDER BY inside an aggregate needs 3.44.)
    async fn claim_due(
        &self,
        max: i64,
        owner: &str,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Vec<super::DueDelivery>, StoreError> {
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "UPDATE deliveries SET status = 'sending', attempts = attempts + 1, lease_owner = $1, \
             lease_expires_at = $2, updated_at = $3 WHERE (update_id, device_id) IN \
             (SELECT update_id, device_id FROM deliveries WHERE status = 'pending' AND next_attempt_at <= $3 \
             ORDER BY next_attempt_at LIMIT $4)",
        )
        .bind(owner)
        .bind(until)
        .bind(now)
        .bind(max)
        .execute(&mut *tx)
        .await?;
        let json: String = sqlx::query_scalar(
            "SELECT json_group_array(json_array(hex(d.update_id), hex(d.device_id), d.user_id, d.attempts, \
             v.platform, v.token, v.environment, v.app_id, u.seq, u.type, \
             CASE WHEN u.tracking_id IS NULL THEN NULL ELSE hex(u.tracking_id) END, u.status, \
             json(u.data), json(u.notification), u.created_at) ORDER BY u.created_at) \
             FROM (SELECT * FROM deliveries WHERE lease_expires_at = $2 AND lease_owner = $1 \
             AND status = 'sending') d \
             JOIN updates u ON u.id = d.update_id JOIN devices v ON v.id = d.device_id",
        )
        .bind(owner)
        .bind(until)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        super::claimed::due_from_json(&json, until)
    }

    /// Move each user's counter on by its count; the new values come back in one JSON row,
    /// not a row per user: every row is a message from the connection's thread (measured:
    /// flume sends, wake-ups and row copies were ~10% of the pipeline's CPU).
    async fn bump_counters(
        tx: &mut Transaction<'_, Sqlite>,
        counts: &[(&str, i64)],
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let mut bump =
            sqlx::QueryBuilder::<Sqlite>::new("INSERT INTO user_seqs (user_id, last_seq) ");
        bump.push_values(counts, |mut row, (user, n)| {
            row.push_bind(*user).push_bind(*n);
        });
        bump.push(
            " ON CONFLICT (user_id) DO UPDATE SET last_seq = user_seqs.last_seq + excluded.last_seq",
        );
        bump.build().execute(&mut **tx).await?;
        let mut read = sqlx::QueryBuilder::<Sqlite>::new(
            "SELECT json_group_array(json_array(user_id, last_seq)) FROM user_seqs WHERE user_id IN (",
        );
        let mut ids = read.separated(", ");
        for (user, _) in counts {
            ids.push_bind(*user);
        }
        read.push(")");
        let json: String = read.build_query_scalar().fetch_one(&mut **tx).await?;
        serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(format!("user counters: {e}")))
    }

    /// The active devices of `users`, in one JSON row (see [`Self::bump_counters`]).
    async fn active_devices(
        tx: &mut Transaction<'_, Sqlite>,
        users: &[&str],
    ) -> Result<Vec<super::claimed::UserDeviceRow>, StoreError> {
        let mut query = sqlx::QueryBuilder::<Sqlite>::new(
            "SELECT json_group_array(json_array(hex(id), platform, token, environment, app_id, user_id)) \
             FROM devices WHERE status = 'active' AND user_id IN (",
        );
        let mut ids = query.separated(", ");
        for user in users {
            ids.push_bind(*user);
        }
        query.push(")");
        let json: String = query.build_query_scalar().fetch_one(&mut **tx).await?;
        let rows: Vec<DeviceJson> = serde_json::from_str(&json)
            .map_err(|e| StoreError::Corrupt(format!("devices: {e}")))?;
        device_rows(rows)
    }

    /// In-process wake-ups are enough for a single node.
    async fn notify_updates(_tx: &mut Transaction<'_, Sqlite>) -> Result<(), sqlx::Error> {
        Ok(())
    }

    /// In-process wake-ups are enough for a single node.
    async fn notify_jobs(
        _tx: &mut Transaction<'_, Sqlite>,
        _kind: &str,
    ) -> Result<(), sqlx::Error> {
        Ok(())
    }
}

/// A device as the JSON rows of this engine carry it: id in hex, platform, token,
/// environment, app, user.
type DeviceJson = (String, String, String, Option<String>, String, String);

/// Devices out of [`DeviceJson`] rows.
fn device_rows(rows: Vec<DeviceJson>) -> Result<Vec<super::claimed::UserDeviceRow>, StoreError> {
    rows.into_iter()
        .map(|(id, platform, token, environment, app_id, user)| {
            let id = uuid::Uuid::parse_str(&id)
                .map_err(|e| StoreError::Corrupt(format!("device id {id:?}: {e}")))?;
            Ok((id, platform, token, environment, app_id, user))
        })
        .collect()
}

/// Checkpoint the WAL every [`CHECKPOINT_EVERY`] until `stop`. PASSIVE: it copies what no
/// reader still needs and never waits for, or blocks, the writer.
async fn checkpoint_loop(pool: SqlitePool, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECKPOINT_EVERY) => {}
            _ = stop.cancelled() => break,
        }
        if pool.is_closed() {
            break;
        }
        if let Err(err) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            // The writer's own checkpoints take over past WRITER_CHECKPOINT_PAGES.
            tracing::warn!(error = %err, "background WAL checkpoint failed");
        }
    }
}

impl_append!(SqliteStore, Sqlite);
impl_store!(SqliteStore, Sqlite, Engine::Sqlite, "");
impl_outbox!(SqliteStore, Sqlite, "MAX");

/// Run `write`, a whole transaction in one command (`BEGIN IMMEDIATE; …; COMMIT`), on the
/// writer: one round trip to the connection's thread instead of three. The writer is a SQLite
/// node's one serial resource, and between round trips it waits, held, for its task to be
/// scheduled again. The write runs in a task of its own so that it finishes even if its caller
/// is dropped: cut off between its BEGIN and its COMMIT, it would leave the writer inside a
/// transaction. On error the transaction is rolled back; if that fails too the connection is
/// closed rather than reused.
async fn write_at_once<T, F>(writer: SqlitePool, write: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: for<'c> FnOnce(
            &'c mut sqlx::SqliteConnection,
        ) -> futures::future::BoxFuture<'c, Result<T, sqlx::Error>>
        + Send
        + 'static,
{
    let task = tokio::spawn(async move {
        let mut conn = writer.acquire().await?;
        let written = write(&mut conn).await;
        if written.is_err() && sqlx::query("ROLLBACK").execute(&mut *conn).await.is_err() {
            conn.close_on_drop();
        }
        written
    });
    match task.await {
        Ok(written) => Ok(written?),
        // Only a panic or the runtime shutting down ends it early: the writer is unavailable,
        // no row is corrupt.
        Err(e) => {
            tracing::error!(error = %e, "a SQLite write task ended before answering");
            Err(StoreError::Unavailable(sqlx::Error::WorkerCrashed))
        }
    }
}
