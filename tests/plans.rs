//! PostgreSQL under the maintenance a production server performs: the hot statements keep
//! plans whose cost does not grow with the backlog, whatever the table statistics say.
//!
//! Mostly PostgreSQL, whose autovacuum refreshes statistics on its own. SQLite's planner reads
//! statistics too once ANALYZE has run (an operator's, or `PRAGMA optimize`): its case is last.
//!
//! "Cost" here is buffers touched (EXPLAIN ANALYZE BUFFERS), not time: it is deterministic,
//! and a plan that walks the backlog touches hundreds of times more buffers than one that
//! stops after its batch (measured before this was fixed: 617,688 buffers for a claim of 512 at
//! a backlog of 600,000, against about 8,000).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Engine, TestDb};
use herald::store::{Store, pg_statements, sqlite_statements};
use serde_json::Value;
use sqlx::PgPool;

/// Every table Herald writes under load.
const TABLES: &[&str] = &[
    "deliveries",
    "sent_deliveries",
    "jobs",
    "updates",
    "user_seqs",
    "devices",
    "device_cursors",
];

/// Users in the burst, one device each.
const USERS: i64 = 2_000;

/// Deliveries claimed at once: the dispatcher's batch.
const BATCH: i64 = 512;

/// The cases run one at a time: an open transaction anywhere on the server (another case's)
/// keeps VACUUM from removing what it would remove in production.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Buffers a claim may touch per row claimed (about 15 are needed: the row, its new version's
/// index entries, its device and update), and a constant for the plan's fixed costs. A plan
/// that scans the backlog exceeds this a hundredfold.
const BUFFERS_PER_ROW: i64 = 40;
const BUFFERS_FIXED: i64 = 2_000;

async fn open() -> (TestDb, Arc<dyn Store>, PgPool) {
    let (db, store) = common::open_store(Engine::Postgres, 4).await;
    let raw = PgPool::connect(&db.url).await.expect("raw pool");
    (db, store, raw)
}

async fn run(raw: &PgPool, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(raw)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn maintain(raw: &PgPool, command: &str) {
    for table in TABLES {
        run(raw, &format!("{command} {table}")).await;
    }
}

/// `USERS` active devices.
async fn devices(raw: &PgPool) {
    run(
        raw,
        &format!(
            "INSERT INTO devices (id, user_id, platform, token, environment, app_id, status, \
             created_at, registered_at, last_seen_at) \
             SELECT gen_random_uuid(), 'user-' || g, 'apns', lpad(to_hex(g), 64, '0'), \
             'production', 'com.example.app', 'active', now(), now(), now() \
             FROM generate_series(1, {USERS}) g"
        ),
    )
    .await;
}

/// `per_user` updates for every user, each with a pending delivery to the user's device: a
/// backlog the dispatcher has not reached. Update ids are UUIDv7-like (time-ordered) as the
/// node makes them.
async fn backlog(raw: &PgPool, per_user: i64) {
    run(
        raw,
        &format!(
            "WITH u AS (INSERT INTO updates (id, user_id, seq, type, data, created_at) \
             SELECT gen_random_uuid(), v.user_id, \
             COALESCE((SELECT last_seq FROM user_seqs s WHERE s.user_id = v.user_id), 0) + g, \
             'soak.tick', '{{\"n\": 1}}', now() \
             FROM devices v CROSS JOIN generate_series(1, {per_user}) g RETURNING id, user_id) \
             INSERT INTO deliveries (update_id, device_id, user_id, status, attempts, \
             next_attempt_at, created_at, updated_at) \
             SELECT u.id, v.id, u.user_id, 'pending', 0, now() - interval '1 second', now(), now() \
             FROM u JOIN devices v ON v.user_id = u.user_id"
        ),
    )
    .await;
    run(
        raw,
        &format!(
            "INSERT INTO user_seqs (user_id, last_seq) SELECT user_id, {per_user} FROM devices \
             ON CONFLICT (user_id) DO UPDATE SET last_seq = user_seqs.last_seq + {per_user}"
        ),
    )
    .await;
}

/// `n` pending jobs, due now.
async fn pending_jobs(raw: &PgPool, n: i64) {
    run(
        raw,
        &format!(
            "INSERT INTO jobs (id, user_id, kind, input, status, attempts, max_attempts, run_at, \
             created_at, updated_at) \
             SELECT gen_random_uuid(), 'user-' || (g % {USERS} + 1), 'echo', '{{}}', 'pending', 0, \
             5, now() - interval '1 second', now(), now() FROM generate_series(1, {n}) g"
        ),
    )
    .await;
}

/// Buffers the statement touched (hit or read, its nested function included) and the rows it
/// gave, run under EXPLAIN ANALYZE in a transaction that is rolled back.
async fn measured_claim(raw: &PgPool, sql: &str, max: i64, kinds: bool) -> (i64, i64) {
    let mut tx = raw.begin().await.unwrap();
    let explain = format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}");
    let now = chrono::Utc::now();
    let mut query = sqlx::query_scalar::<_, Value>(sqlx::AssertSqlSafe(explain))
        .bind("plan-check")
        .bind(now + chrono::Duration::seconds(60))
        .bind(now)
        .bind(max);
    if kinds {
        query = query.bind(vec!["echo".to_string()]);
    }
    let plan = query.fetch_one(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    let top = &plan[0]["Plan"];
    let buffers = top["Shared Hit Blocks"].as_i64().unwrap_or(0)
        + top["Shared Read Blocks"].as_i64().unwrap_or(0);
    (buffers, top["Actual Rows"].as_i64().unwrap_or(0))
}

fn assert_bounded(what: &str, (buffers, rows): (i64, i64), expected_rows: i64) {
    assert_eq!(rows, expected_rows, "{what}: rows claimed");
    let bound = BUFFERS_PER_ROW * expected_rows + BUFFERS_FIXED;
    assert!(
        buffers <= bound,
        "{what}: {buffers} buffers for {rows} rows (bound {bound}): the plan scans the backlog"
    );
}

/// Every (node type, relation, index) in a JSON plan.
fn scans(node: &Value, out: &mut Vec<(String, String, String)>) {
    if let Some(kind) = node["Node Type"].as_str() {
        out.push((
            kind.to_string(),
            node["Relation Name"].as_str().unwrap_or("").to_string(),
            node["Index Name"].as_str().unwrap_or("").to_string(),
        ));
    }
    if let Some(children) = node["Plans"].as_array() {
        for child in children {
            scans(child, out);
        }
    }
}

fn assert_no_seq_scan(what: &str, plan: &Value, tables: &[&str]) {
    let mut found = Vec::new();
    scans(&plan[0]["Plan"], &mut found);
    for (kind, relation, _) in &found {
        assert!(
            !(kind == "Seq Scan" && tables.contains(&relation.as_str())),
            "{what}: sequential scan of {relation}: {found:?}"
        );
    }
}

/// The outbox is read only by row address (TID scan) or by primary key: any other access is
/// a walk of an index or of the table, whose cost grows with the backlog or the in-flight set.
fn assert_outbox_by_address_or_key(what: &str, plan: &Value) {
    let mut found = Vec::new();
    scans(&plan[0]["Plan"], &mut found);
    for (kind, relation, index) in &found {
        if relation != "deliveries" || kind == "ModifyTable" {
            continue;
        }
        let by_key =
            matches!(kind.as_str(), "Index Scan" | "Index Only Scan") && index == "deliveries_pkey";
        assert!(
            kind == "Tid Scan" || by_key,
            "{what}: the outbox is read by {kind} {index}: {found:?}"
        );
    }
}

/// Statistics taken on empty tables, then a burst: the planner believes every queue table is
/// empty while it holds a backlog. Claims still walk their due index and stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_stay_bounded_after_analyze_on_empty_tables_then_a_burst() {
    let _serial = SERIAL.lock().await;
    let (_db, store, raw) = open().await;
    maintain(&raw, "ANALYZE").await;
    devices(&raw).await;
    backlog(&raw, 50).await;
    pending_jobs(&raw, 50_000).await;

    let claim = measured_claim(&raw, pg_statements::CLAIM_DELIVERIES, BATCH, false).await;
    assert_bounded("delivery claim", claim, BATCH);
    let claim = measured_claim(&raw, pg_statements::CLAIM_JOBS, 64, true).await;
    assert_bounded("job claim", claim, 64);

    // The store's own claim agrees.
    let due = store
        .claim_deliveries(BATCH, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(due.len() as i64, BATCH);
    store.close().await;
    raw.close().await;
}

/// A queue churned through (what autovacuum finds: few live rows among many dead), then
/// `VACUUM ANALYZE` of every table, then a backlog that outgrows the statistics: the claims
/// touch what they touched before the vacuum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_stay_bounded_across_vacuum_analyze_mid_load() {
    let _serial = SERIAL.lock().await;
    let (_db, store, raw) = open().await;
    devices(&raw).await;
    backlog(&raw, 20).await;
    pending_jobs(&raw, 20_000).await;
    let before = measured_claim(&raw, pg_statements::CLAIM_DELIVERIES, BATCH, false).await;
    assert_bounded("delivery claim before the vacuum", before, BATCH);
    // The churn: that backlog and a burst handed off (written in flight) and nearly all sent,
    // so that what the vacuum finds alive is a few deliveries in flight and none pending; the
    // jobs likewise, a few finished and none pending.
    backlog(&raw, 100).await;
    run(
        &raw,
        "UPDATE deliveries SET status = 'sending', attempts = 1, lease_owner = 'other', \
         lease_expires_at = now() + interval '1 minute'",
    )
    .await;
    run(
        &raw,
        "DELETE FROM deliveries WHERE ctid IN \
         (SELECT ctid FROM deliveries ORDER BY update_id OFFSET 2000)",
    )
    .await;
    run(&raw, "UPDATE jobs SET status = 'completed'").await;
    run(
        &raw,
        "DELETE FROM jobs WHERE ctid IN (SELECT ctid FROM jobs ORDER BY id OFFSET 100)",
    )
    .await;
    maintain(&raw, "VACUUM ANALYZE").await;
    // The backlog grows past what the statistics saw.
    backlog(&raw, 100).await;
    pending_jobs(&raw, 50_000).await;
    let after = measured_claim(&raw, pg_statements::CLAIM_DELIVERIES, BATCH, false).await;
    assert_bounded("delivery claim after the vacuum", after, BATCH);
    assert!(
        after.0 <= before.0 * 2 + BUFFERS_FIXED,
        "a claim touched {} buffers after the vacuum, {} before",
        after.0,
        before.0
    );
    let jobs = measured_claim(&raw, pg_statements::CLAIM_JOBS, 64, true).await;
    assert_bounded("job claim after the vacuum", jobs, 64);

    // Draining through the store keeps taking full batches from the backlog.
    for _ in 0..5 {
        let due = store
            .claim_deliveries(BATCH, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(due.len() as i64, BATCH);
    }
    store.close().await;
    raw.close().await;
}

/// The Sent batch and the append, planned with statistics that say nothing is in flight
/// while everything is, reach the outbox and the log by key or address, never by a scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_and_append_plans_never_scan_the_queue() {
    let _serial = SERIAL.lock().await;
    let (_db, store, raw) = open().await;
    devices(&raw).await;
    backlog(&raw, 50).await;
    // Statistics taken while the backlog waited, then all of it claimed: the planner believes
    // nothing is in flight while everything is.
    maintain(&raw, "ANALYZE").await;
    run(
        &raw,
        "UPDATE deliveries SET status = 'sending', attempts = 1, lease_owner = 'other', \
         lease_expires_at = now() + interval '1 minute'",
    )
    .await;

    // A Sent batch of 512 in-flight rows, by address, then by key.
    let rows: Vec<(uuid::Uuid, uuid::Uuid, String)> = sqlx::query_as(
        "SELECT update_id, device_id, ctid::text FROM deliveries ORDER BY update_id LIMIT 512",
    )
    .fetch_all(&raw)
    .await
    .unwrap();
    let updates: Vec<uuid::Uuid> = rows.iter().map(|r| r.0).collect();
    let devices: Vec<uuid::Uuid> = rows.iter().map(|r| r.1).collect();
    let attempts: Vec<i32> = vec![1; rows.len()];
    let providers: Vec<Option<String>> = vec![None; rows.len()];
    let now = chrono::Utc::now();
    for (what, tids) in [
        (
            "by address",
            rows.iter().map(|r| Some(r.2.clone())).collect(),
        ),
        ("by key", vec![None::<String>; rows.len()]),
    ] {
        let mut tx = raw.begin().await.unwrap();
        let plan: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (ANALYZE, FORMAT JSON) {}",
            pg_statements::RECORD_SENT
        )))
        .bind(&updates)
        .bind(&devices)
        .bind(&attempts)
        .bind(&providers)
        .bind(now)
        .bind(&devices)
        .bind(now)
        .bind(&tids)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        let moved: i64 = sqlx::query_scalar("SELECT count(*) FROM sent_deliveries")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(
            moved, 512,
            "Sent batch {what}: rows moved to sent_deliveries"
        );
        assert_outbox_by_address_or_key(&format!("Sent batch {what}"), &plan);
    }

    // An append of 256 events for 256 users, handed off.
    let n = 256;
    let ids: Vec<uuid::Uuid> = (0..n).map(|_| uuid::Uuid::now_v7()).collect();
    let users: Vec<String> = (1..=n).map(|u| format!("user-{u}")).collect();
    let kinds = vec!["soak.tick".to_string(); n];
    let tracking: Vec<Option<uuid::Uuid>> = vec![None; n];
    let texts: Vec<Option<String>> = vec![None; n];
    let ones: Vec<i64> = vec![1; n];
    let behind: Vec<i64> = vec![0; n];
    let plan: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (FORMAT JSON) {}",
        pg_statements::APPEND_EVENTS
    )))
    .bind(&ids)
    .bind(&users)
    .bind(&kinds)
    .bind(&tracking)
    .bind(&texts)
    .bind(&texts)
    .bind(&texts)
    .bind(now)
    .bind("herald_updates")
    .bind("sending")
    .bind(1_i32)
    .bind(Some("plan-check"))
    .bind(Some(now))
    .bind(false)
    .bind(&behind)
    .bind(&users)
    .bind(&ones)
    .fetch_one(&raw)
    .await
    .unwrap();
    assert_no_seq_scan(
        "append",
        &plan,
        &["devices", "updates", "deliveries", "user_seqs"],
    );
    store.close().await;
    raw.close().await;
}

/// The suite runs against PostgreSQL as production runs it: with autovacuum on
/// (`scripts/local-postgres` turns it on for this machine's server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_server_runs_autovacuum() {
    let (_db, store, raw) = open().await;
    let autovacuum: String = sqlx::query_scalar("SHOW autovacuum")
        .fetch_one(&raw)
        .await
        .unwrap();
    assert_eq!(
        autovacuum, "on",
        "the test PostgreSQL runs with autovacuum off, unlike any production server: \
         run scripts/local-postgres (or turn it on in postgresql.conf)"
    );
    store.close().await;
    raw.close().await;
}

/// SQLite, with the statistics an ANALYZE took in the soak benchmark (millions of finished
/// deliveries, a handful in flight): the Sent batch still finds each row by its primary key.
/// Before the in-flight index was keyed on the lease, this plan walked that index and probed
/// the whole batch for each row in it (the writer fell to a third of its rate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_sent_batch_finds_rows_by_key_whatever_the_statistics() {
    let (db, store) = common::open_store(Engine::Sqlite, 2).await;
    let raw = sqlx::SqlitePool::connect(&db.url).await.expect("raw pool");
    // The soak's statistics, for whichever partial indexes the schema has.
    run_sqlite(&raw, "ANALYZE sqlite_schema").await;
    let indexes: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT tbl_name, name, sql FROM sqlite_schema WHERE type = 'index' \
         AND tbl_name IN ('deliveries', 'updates', 'devices')",
    )
    .fetch_all(&raw)
    .await
    .unwrap();
    run_sqlite(&raw, "DELETE FROM sqlite_stat1").await;
    for (table, index, sql) in &indexes {
        let stat = if table == "deliveries" {
            if sql.contains("WHERE") {
                // Partial indexes: pending ones and in-flight ones, few.
                if sql.contains("pending") {
                    "0 0"
                } else {
                    "21 7"
                }
            } else {
                "3966573 1 1"
            }
        } else if table == "updates" {
            "3966573 401 1"
        } else {
            "2000 1 1"
        };
        sqlx::query("INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES ($1, $2, $3)")
            .bind(table)
            .bind(index)
            .bind(stat)
            .execute(&raw)
            .await
            .unwrap();
    }
    // Reload the statistics into the planner of this connection.
    run_sqlite(&raw, "ANALYZE sqlite_schema").await;
    let batch = serde_json::json!([["00", "00", 1, "apns-1"]]).to_string();
    let statements: Vec<&str> = sqlite_statements::RECORD_SENT_AT_ONCE
        .split("; ")
        .map(str::trim)
        .filter(|s| !s.is_empty() && !s.starts_with("BEGIN") && !s.starts_with("COMMIT"))
        .collect();
    assert!(!statements.is_empty());
    let mut conn = raw.acquire().await.unwrap();
    for statement in statements {
        let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN {statement}"
        )))
        .bind(chrono::Utc::now())
        .bind(&batch)
        .bind("[]")
        .bind(chrono::Utc::now())
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        let details: Vec<&str> = plan.iter().map(|row| row.3.as_str()).collect();
        for detail in &details {
            if detail.contains("deliveries") {
                assert!(
                    detail
                        .starts_with("SEARCH deliveries USING INDEX sqlite_autoindex_deliveries_1")
                        || detail.starts_with("SEARCH deliveries USING PRIMARY KEY"),
                    "the Sent batch reads the outbox by {detail}: {details:?}"
                );
            }
        }
    }
    drop(conn);
    store.close().await;
    raw.close().await;
}

async fn run_sqlite(raw: &sqlx::SqlitePool, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(raw)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}
