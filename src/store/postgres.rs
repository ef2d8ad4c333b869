//! PostgreSQL engine: the cluster store. Claims skip rows other nodes hold locked, and a
//! NOTIFY at commit wakes the workers of every node.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use tokio::sync::Notify;

use super::append::impl_append;
use super::outbox::impl_outbox;
use super::rows::{self, ClaimRow};
use super::shared::impl_store;
use super::touched::RecentTouches;
use super::{Engine, StoreError};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// NOTIFY channel announcing appended updates.
pub const UPDATES_CHANNEL: &str = "herald_updates";

/// NOTIFY channel announcing new or requeued jobs.
pub const JOBS_CHANNEL: &str = "herald_jobs";

/// Claim due jobs: `$1` owner, `$2` lease end, `$3` now, `$4` most rows, `$5` kinds.
/// `herald_claim_jobs` (migration 0011) picks the rows in due order, skipping what other nodes
/// hold, and leases them, with a plan that no table statistics can change.
pub const CLAIM_JOBS: &str = "SELECT id, user_id, kind, input, attempts, max_attempts, lease_expires_at \
     FROM herald_claim_jobs($1, $2, $3, $4, $5)";

/// Claim due deliveries and read them back with their update and device, oldest update first:
/// `$1` owner, `$2` lease end, `$3` now, `$4` most rows. `herald_claim_deliveries` (migration
/// 0011) picks rows by address (locked first, skipping what other nodes hold) with a plan no
/// table statistics can change, and never looks rows up by lease owner through the in-flight
/// index, which holds an entry for every delivery sent since the last vacuum. Deliveries carry
/// no foreign keys (migration 0005), so a device deleted while an update for its user was being
/// appended can leave one behind: the claim drops it instead of sending it.
pub const CLAIM_DELIVERIES: &str = "SELECT p.update_id, p.device_id, p.user_id, p.attempts, \
     v.platform, v.token, v.environment, v.app_id, u.seq, u.type AS kind, u.tracking_id, \
     u.status AS update_status, u.data, u.notification, u.created_at, p.row_id \
     FROM herald_claim_deliveries($1, $2, $3, $4) \
     AS p (update_id, device_id, user_id, attempts, status, row_id) \
     JOIN updates u ON u.id = p.update_id JOIN devices v ON v.id = p.device_id \
     WHERE p.status = 'sending' ORDER BY u.created_at";

/// Append a batch of published events with their deliveries, NOTIFY included (see
/// `PgStore::append_updates_at_once` for the parameters).
pub const APPEND_EVENTS: &str = "WITH ev AS (SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::text[], \
             $6::text[], $7::text[], $15::int8[]) AS t(id, user_id, type, tracking_id, status, data, notification, behind)), \
             bumped AS (INSERT INTO user_seqs (user_id, last_seq) \
             SELECT * FROM UNNEST($16::text[], $17::int8[]) AS c(user_id, n) ORDER BY user_id \
             ON CONFLICT (user_id) DO UPDATE SET last_seq = user_seqs.last_seq + excluded.last_seq \
             RETURNING user_id, last_seq), \
             numbered AS (SELECT ev.*, b.last_seq - ev.behind AS seq FROM ev JOIN bumped b USING (user_id)), \
             inserted AS (INSERT INTO updates (id, user_id, seq, type, tracking_id, status, data, notification, created_at) \
             SELECT id, user_id, seq, type, tracking_id, status, data::json, notification::json, $8 FROM numbered \
             RETURNING id, user_id, seq), \
             targets AS (SELECT i.id AS update_id, v.* FROM inserted i CROSS JOIN LATERAL \
             (SELECT id, user_id, platform, token, environment, app_id FROM devices \
             WHERE user_id = i.user_id AND status = 'active' OFFSET 0) v), \
             outbox AS (INSERT INTO deliveries (update_id, device_id, user_id, status, attempts, lease_owner, lease_expires_at, \
             next_attempt_at, created_at, updated_at) SELECT update_id, id, user_id, $10, $11, $12::text, $13::timestamptz, $8, $8, $8 \
             FROM targets RETURNING update_id, device_id, ctid AS row_id), \
             announce AS (SELECT CASE WHEN $14 THEN pg_notify($9, '') END AS notified) \
             SELECT i.id, i.seq, t.id, t.platform, t.token, t.environment, t.app_id, o.row_id \
             FROM inserted i LEFT JOIN targets t ON t.update_id = i.id \
             LEFT JOIN outbox o ON o.update_id = t.update_id AND o.device_id = t.id \
             CROSS JOIN announce";

/// Record a batch of Sent outcomes (see `PgStore::record_sent_at_once` for the parameters):
/// each delivered row leaves the outbox for `sent_deliveries`, found by its address or key
/// (no index but the primary key can serve its fence: migration 0011).
pub const RECORD_SENT: &str = "WITH b AS (SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int[], $4::text[], $8::tid[]) \
             AS t(update_id, device_id, attempt, provider_id, row_id)), \
             by_row AS (DELETE FROM deliveries d USING b WHERE b.row_id IS NOT NULL AND d.ctid = b.row_id \
             AND d.update_id = b.update_id AND d.device_id = b.device_id AND d.status = 'sending' \
             AND d.attempts = b.attempt \
             RETURNING d.update_id, d.device_id, d.user_id, d.attempts, d.created_at, b.provider_id), \
             by_key AS (DELETE FROM deliveries d USING b WHERE b.row_id IS NULL AND d.update_id = b.update_id \
             AND d.device_id = b.device_id AND d.status = 'sending' AND d.attempts = b.attempt \
             RETURNING d.update_id, d.device_id, d.user_id, d.attempts, d.created_at, b.provider_id), \
             logged AS (INSERT INTO sent_deliveries (update_id, device_id, user_id, attempts, \
             provider_id, created_at, sent_at) \
             SELECT update_id, device_id, user_id, attempts, provider_id, created_at, $5 FROM by_row \
             UNION ALL SELECT update_id, device_id, user_id, attempts, provider_id, created_at, $5 FROM by_key), \
             touched AS (UPDATE devices SET last_push_at = $5 WHERE id = ANY($6::uuid[]) \
             AND (last_push_at IS NULL OR last_push_at < $7)) \
             SELECT set_config('synchronous_commit', 'off', true)";

/// The PostgreSQL store.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    appended: Arc<Notify>,
    touched: Arc<RecentTouches>,
}

impl PgStore {
    /// The retention purge's deletes of deliveries before an update id `$1`, at most `$2` rows
    /// per statement: open and finished ones in the outbox, delivered ones in their log.
    const PURGE_DELIVERIES: &'static [&'static str] = &[
        "DELETE FROM deliveries WHERE ctid = ANY(ARRAY(\
         SELECT ctid FROM deliveries WHERE update_id < $1 LIMIT $2))",
        "DELETE FROM sent_deliveries WHERE ctid = ANY(ARRAY(\
         SELECT ctid FROM sent_deliveries WHERE update_id < $1 LIMIT $2))",
    ];

    /// The outcome purge's deletes of finished deliveries before an update id `$1`, at most
    /// `$2` rows per statement: failed and dropped ones in the outbox, delivered ones in their
    /// log.
    const PURGE_OUTCOMES: &'static [&'static str] = &[
        "DELETE FROM deliveries WHERE ctid = ANY(ARRAY(SELECT ctid FROM deliveries \
         WHERE update_id < $1 AND status IN ('failed', 'dropped') LIMIT $2))",
        "DELETE FROM sent_deliveries WHERE ctid = ANY(ARRAY(\
         SELECT ctid FROM sent_deliveries WHERE update_id < $1 LIMIT $2))",
    ];

    /// The retention purge's delete of updates before an id `$1`, at most `$2` per statement.
    const PURGE_UPDATES: &'static str = "DELETE FROM updates WHERE ctid = ANY(ARRAY(\
         SELECT ctid FROM updates WHERE id < $1 LIMIT $2))";

    fn rows_affected(done: &sqlx::postgres::PgQueryResult) -> u64 {
        done.rows_affected()
    }

    /// Connect a pool to `url` (no migrations are run here).
    pub async fn connect(
        url: &str,
        max: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(acquire_timeout)
            .connect_with(options)
            .await?;
        Ok(Self {
            pool,
            appended: Arc::new(Notify::new()),
            touched: Arc::default(),
        })
    }

    /// The pool, for engine-specific work (LISTEN) elsewhere in the crate.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn writer(&self) -> &PgPool {
        &self.pool
    }

    fn reader(&self) -> &PgPool {
        &self.pool
    }

    fn migrator() -> &'static sqlx::migrate::Migrator {
        &MIGRATOR
    }

    /// Close the pool (readers and writers share it).
    async fn close_pools(&self) {
        self.pool.close().await;
    }

    /// The one-statement claim ([`CLAIM_JOBS`]); SKIP LOCKED lets nodes claim side by side
    /// without waiting.
    async fn claim_rows(
        tx: &mut Transaction<'_, Postgres>,
        kinds: &[String],
        max: i64,
        owner: &str,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Vec<ClaimRow>, sqlx::Error> {
        sqlx::query_as(CLAIM_JOBS)
            .bind(owner)
            .bind(until)
            .bind(now)
            .bind(max)
            .bind(kinds)
            .fetch_all(&mut **tx)
            .await
    }

    /// One round trip for a whole batch of submissions, committed on its own (a single
    /// statement autocommits: no BEGIN/COMMIT round trips), NOTIFY included. A round trip per
    /// row or per step is what limits a group commit on PostgreSQL. Rows come back in input
    /// order.
    async fn insert_jobs_at_once(
        &self,
        jobs: &[crate::jobs::NewJob],
        now: DateTime<Utc>,
    ) -> Result<Option<Vec<rows::JobRow>>, sqlx::Error> {
        let ids: Vec<uuid::Uuid> = jobs.iter().map(|_| uuid::Uuid::now_v7()).collect();
        let users: Vec<&str> = jobs.iter().map(|j| j.user_id.as_str()).collect();
        let kinds: Vec<&str> = jobs.iter().map(|j| j.kind.as_str()).collect();
        let inputs: Vec<sqlx::types::Json<&serde_json::Value>> =
            jobs.iter().map(|j| sqlx::types::Json(&j.input)).collect();
        let max_attempts: Vec<i32> = jobs.iter().map(|j| j.max_attempts).collect();
        let callbacks: Vec<Option<&str>> = jobs.iter().map(|j| j.callback_url.as_deref()).collect();
        let notifies: Vec<Option<sqlx::types::Json<&crate::jobs::Notify>>> = jobs
            .iter()
            .map(|j| j.notify.as_ref().map(sqlx::types::Json))
            .collect();
        let hashes: Vec<&str> = jobs.iter().map(|j| j.request_hash.as_str()).collect();
        // The one-row `announce` runs once per statement, inside it (and so inside the same
        // transaction as the insert): one NOTIFY per kind, heard by every node at commit.
        let inserted: Vec<rows::JobRow> = sqlx::query_as(concat!(
            "WITH inserted AS (INSERT INTO jobs (id, user_id, kind, input, status, attempts, max_attempts, \
             callback_url, notify, request_hash, run_at, created_at, updated_at) \
             SELECT id, user_id, kind, input, 'pending', 0, max_attempts, callback_url, notify, request_hash, $9, $9, $9 \
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::int[], $6::text[], $7::jsonb[], $8::text[]) \
             AS t(id, user_id, kind, input, max_attempts, callback_url, notify, request_hash) RETURNING ",
            job_columns!(),
            "), announce AS (SELECT count(pg_notify($10, kind)) AS notified FROM (SELECT DISTINCT unnest($3::text[])) \
             AS kinds(kind)) SELECT inserted.*, announce.notified FROM inserted CROSS JOIN announce"
        ))
        .bind(&ids)
        .bind(&users)
        .bind(&kinds)
        .bind(&inputs)
        .bind(&max_attempts)
        .bind(&callbacks)
        .bind(&notifies)
        .bind(&hashes)
        .bind(now)
        .bind(JOBS_CHANNEL)
        .fetch_all(&self.pool)
        .await?;
        // RETURNING order is not promised: put rows back in input order by id.
        let mut by_id: std::collections::HashMap<uuid::Uuid, rows::JobRow> =
            inserted.into_iter().map(|row| (row.id, row)).collect();
        let ordered: Option<Vec<rows::JobRow>> = ids.iter().map(|id| by_id.remove(id)).collect();
        ordered.map(Some).ok_or_else(|| {
            sqlx::Error::Protocol("bulk insert returned fewer rows than it was given".into())
        })
    }

    /// A batch of published events appended in one autocommitted statement (the same steps as
    /// `append_updates_leased`: counters bumped once per user in user order, updates numbered in
    /// batch order, one delivery per active device, claimed under `handoff` when given, NOTIFY):
    /// one round trip instead of six.
    async fn append_updates_at_once(
        &self,
        events: &[(&str, &crate::updates::NewUpdate)],
        now: DateTime<Utc>,
        handoff: Option<&super::Handoff>,
    ) -> Result<Option<super::Appended>, StoreError> {
        type Row = (
            uuid::Uuid,
            i64,
            Option<uuid::Uuid>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<super::row_hint::Tid>,
        );
        let ids: Vec<uuid::Uuid> = events.iter().map(|_| uuid::Uuid::now_v7()).collect();
        let users: Vec<&str> = events.iter().map(|(user, _)| *user).collect();
        // Counted and placed here rather than by the statement (a hash aggregate, and a sort
        // for a window function: 10% of the statement's time in EXPLAIN ANALYZE): per user, how
        // many updates, and for each update how many of its user's follow it, so that its seq
        // is the bumped counter minus that.
        let (counts, places) = super::append::places(events);
        let behind: Vec<i64> = users
            .iter()
            .zip(&places)
            .map(|(user, place)| counts.get(user).map_or(0, |n| n - place))
            .collect();
        let (distinct, per_user): (Vec<&str>, Vec<i64>) = counts.into_iter().unzip();
        let kinds: Vec<&str> = events.iter().map(|(_, u)| u.kind.as_str()).collect();
        let tracking: Vec<Option<uuid::Uuid>> = events.iter().map(|(_, u)| u.tracking_id).collect();
        let statuses: Vec<Option<&str>> = events.iter().map(|(_, u)| u.status.as_deref()).collect();
        let json = |e: serde_json::Error| StoreError::Corrupt(format!("update payload: {e}"));
        let data = events
            .iter()
            .map(|(_, u)| u.data.as_ref().map(serde_json::to_string).transpose())
            .collect::<Result<Vec<Option<String>>, _>>()
            .map_err(json)?;
        let notifications = events
            .iter()
            .map(|(_, u)| {
                u.notification
                    .as_ref()
                    .map(serde_json::to_string)
                    .transpose()
            })
            .collect::<Result<Vec<Option<String>>, _>>()
            .map_err(json)?;
        let (status, attempts) = if handoff.is_some() {
            ("sending", 1)
        } else {
            ("pending", 0)
        };
        // One row per delivery written (or per update without any), with what a claimed
        // delivery needs to be sent.
        let rows: Vec<Row> = sqlx::query_as(APPEND_EVENTS)
            .bind(&ids)
            .bind(&users)
            .bind(&kinds)
            .bind(&tracking)
            .bind(&statuses)
            .bind(&data)
            .bind(&notifications)
            .bind(now)
            .bind(UPDATES_CHANNEL)
            .bind(status)
            .bind(attempts)
            .bind(handoff.map(|h| h.owner.as_str()))
            .bind(handoff.map(|h| h.until))
            // Handed-off deliveries are this node's already: no other dispatcher need look.
            .bind(handoff.is_none())
            .bind(&behind)
            .bind(&distinct)
            .bind(&per_user)
            .fetch_all(&self.pool)
            .await?;
        let mut seqs: std::collections::HashMap<uuid::Uuid, i64> = std::collections::HashMap::new();
        let mut devices: Vec<(uuid::Uuid, super::claimed::DeviceRow, super::RowHint)> = Vec::new();
        for (update_id, seq, device, platform, token, environment, app_id, row) in rows {
            seqs.insert(update_id, seq);
            if let (Some(device), Some(platform), Some(token), Some(app_id)) =
                (device, platform, token, app_id)
            {
                devices.push((
                    update_id,
                    (device, platform, token, environment, app_id),
                    super::RowHint(row),
                ));
            }
        }
        let updates = ids
            .iter()
            .zip(events)
            .map(|(id, (_, new))| {
                let seq = seqs.get(id).copied().ok_or_else(|| {
                    StoreError::Corrupt("bulk append returned fewer rows than it was given".into())
                })?;
                Ok(Arc::new(new.appended(*id, seq, now)))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let mut claimed = Vec::new();
        if let Some(handoff) = handoff {
            // The appended copy of each update, shared by its deliveries.
            let by_id: std::collections::HashMap<uuid::Uuid, (&str, &Arc<crate::updates::Update>)> =
                events
                    .iter()
                    .zip(&updates)
                    .map(|((user, _), u)| (u.id, (*user, u)))
                    .collect();
            for (update_id, device, row) in devices {
                let Some((user, update)) = by_id.get(&update_id) else {
                    return Err(StoreError::Corrupt(
                        "a handed-off delivery lost its update".into(),
                    ));
                };
                claimed.push(super::claimed::handed_off(
                    update, user, device, handoff, row,
                )?);
            }
        }
        Ok(Some(super::Appended { updates, claimed }))
    }

    /// The Sent outcomes of a batch (nearly all of any batch; the others are left to the
    /// general path) recorded in one autocommitted statement over arrays: one round trip, and
    /// one statement text whatever the batch size, so it is planned once. Each delivered row
    /// leaves the outbox for `sent_deliveries` (migration 0009: a delete and an append instead
    /// of a non-HOT rewrite), found by its [`super::RowHint`] where it has one, else by key.
    /// Each row is fenced by its attempt as in the general path; every
    /// device pushed to is touched whether or not its fence held, unless it was touched within
    /// [`super::outbox::LAST_PUSH_RESOLUTION`] (by this node: [`RecentTouches`]). Always true.
    ///
    /// Committed without waiting for its WAL flush (`synchronous_commit` off for this
    /// transaction only). A server crash can lose the last fraction of a second of such
    /// outcomes; those deliveries then stay `sending` until their lease ends and are sent
    /// again — the same repeat as a node crashing between a push and its outcome, which
    /// processing at least once already allows. Appends (what a 202 promises) still wait.
    async fn record_sent_at_once(
        &self,
        results: &[super::DeliveryResult],
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let mut updates = Vec::with_capacity(results.len());
        let mut devices = Vec::with_capacity(results.len());
        let mut attempts = Vec::with_capacity(results.len());
        let mut provider_ids = Vec::with_capacity(results.len());
        let mut rows = Vec::with_capacity(results.len());
        for r in results {
            let super::DeliveryOutcome::Sent { provider_id } = &r.outcome else {
                continue;
            };
            updates.push(r.update_id);
            devices.push(r.device_id);
            attempts.push(r.attempt);
            provider_ids.push(provider_id.as_deref());
            rows.push(r.row.0);
        }
        if updates.is_empty() {
            return Ok(true);
        }
        // Locked in one order by every recorder of the cluster: no deadlock between nodes.
        let mut touched = devices.clone();
        touched.sort_unstable();
        touched.dedup();
        let touched = self.touched.stale(touched, now);
        sqlx::query(RECORD_SENT)
            .bind(&updates)
            .bind(&devices)
            .bind(&attempts)
            .bind(&provider_ids)
            .bind(now)
            .bind(&touched)
            .bind(now - super::outbox::LAST_PUSH_RESOLUTION)
            .bind(&rows)
            .execute(&self.pool)
            .await?;
        self.touched.written(&touched, now);
        Ok(true)
    }

    /// Claim up to `max` due deliveries under `owner` until `until` and read them back, oldest
    /// update first, in one autocommitted statement ([`CLAIM_DELIVERIES`]).
    async fn claim_due(
        &self,
        max: i64,
        owner: &str,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Vec<super::DueDelivery>, StoreError> {
        let rows: Vec<super::claimed::DueRow> = sqlx::query_as(CLAIM_DELIVERIES)
            .bind(owner)
            .bind(until)
            .bind(now)
            .bind(max)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(|row| row.into_due(until)).collect()
    }

    /// Move each user's counter on by its count; the new values come back.
    async fn bump_counters(
        tx: &mut Transaction<'_, Postgres>,
        counts: &[(&str, i64)],
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let mut bump =
            sqlx::QueryBuilder::<Postgres>::new("INSERT INTO user_seqs (user_id, last_seq) ");
        bump.push_values(counts, |mut row, (user, n)| {
            row.push_bind(*user).push_bind(*n);
        });
        bump.push(
            " ON CONFLICT (user_id) DO UPDATE SET last_seq = user_seqs.last_seq + excluded.last_seq \
             RETURNING user_id, last_seq",
        );
        Ok(bump.build_query_as().fetch_all(&mut **tx).await?)
    }

    /// The active devices of `users`.
    async fn active_devices(
        tx: &mut Transaction<'_, Postgres>,
        users: &[&str],
    ) -> Result<Vec<super::claimed::UserDeviceRow>, StoreError> {
        let mut query = sqlx::QueryBuilder::<Postgres>::new(
            "SELECT id, platform, token, environment, app_id, user_id FROM devices \
             WHERE status = 'active' AND user_id IN (",
        );
        let mut ids = query.separated(", ");
        for user in users {
            ids.push_bind(*user);
        }
        query.push(")");
        Ok(query.build_query_as().fetch_all(&mut **tx).await?)
    }

    /// Tells every node's dispatcher and live streams that updates were appended.
    async fn notify_updates(tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(UPDATES_CHANNEL)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Delivered at commit to every node listening, so they claim at once.
    async fn notify_jobs(
        tx: &mut Transaction<'_, Postgres>,
        kind: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(JOBS_CHANNEL)
            .bind(kind)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

impl_append!(PgStore, Postgres);
impl_store!(PgStore, Postgres, Engine::Postgres, " FOR UPDATE");
impl_outbox!(PgStore, Postgres, "GREATEST");
