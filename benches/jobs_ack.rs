//! Durable `POST /v1/jobs` acknowledgments per second and latency at a fixed concurrency, on
//! SQLite and PostgreSQL, next to the raw rate of inserting the same row with sqlx at the same
//! concurrency in the same run. Run: `cargo bench --bench jobs_ack` (needs the test PostgreSQL).
//!
//! Both paths are warmed up first, then rounds alternate (Herald, raw, Herald, raw, ...) and the
//! median round of each is compared.
//!
//! Environment: BENCH_REQUESTS (per round, default 4000), BENCH_ROUNDS (default 3),
//! BENCH_CONCURRENCY (default 32),
//! HERALD_TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres).

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::config::{Config, KindConfig, Secret};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The allocator the `herald` binary runs with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SECRET: &str = "bench-secret-0123456789abcdef01234567";

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Figures {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

fn figures(mut latencies: Vec<Duration>, elapsed: Duration) -> Figures {
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Figures {
        per_sec: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
    }
}

/// Run `n` operations with `concurrency` in flight; returns per-operation latencies.
async fn drive<F, Fut>(n: usize, concurrency: usize, op: F) -> (Vec<Duration>, Duration)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let gate = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await.expect("semaphore");
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            op(i).await;
            drop(permit);
            t.elapsed()
        }));
    }
    let mut latencies = Vec::with_capacity(n);
    for t in tasks {
        latencies.push(t.await.expect("task"));
    }
    (latencies, started.elapsed())
}

async fn fresh_pg_url(base: &str) -> String {
    let admin = sqlx::PgPool::connect(base)
        .await
        .expect("PostgreSQL (HERALD_TEST_DATABASE_URL)");
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await
        .expect("schema");
    admin.close().await;
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options=-c%20search_path%3D{schema}")
}

/// A running node and a client for it.
struct Herald {
    node: herald::server::Node,
    shutdown: CancellationToken,
    client: reqwest::Client,
    url: String,
    token: String,
}

impl Herald {
    async fn start(url: &str, concurrency: usize) -> Self {
        let mut config = Config::defaults().expect("config");
        config.database.url = Secret::new(url);
        config.auth.hs256_secret = Secret::new(SECRET);
        config.log = "error".into();
        // An external kind: nothing runs the jobs, so only acknowledgments are measured.
        config.kinds.insert(
            "bench".into(),
            KindConfig {
                handler: "external".into(),
                max_attempts: 3,
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let shutdown = CancellationToken::new();
        let node = herald::server::start(config, listener, shutdown.clone())
            .await
            .expect("start");
        let url = format!("http://{}/v1/jobs", node.addr);
        let token = herald::auth::mint_hs256(
            &Secret::new(SECRET),
            "bench",
            None,
            Duration::from_secs(3600),
            None,
            None,
        )
        .expect("token");
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(concurrency)
            .build()
            .expect("client");
        Self {
            node,
            shutdown,
            client,
            url,
            token,
        }
    }

    async fn run(&self, n: usize, concurrency: usize) -> Figures {
        let (client, url, token) = (self.client.clone(), self.url.clone(), self.token.clone());
        let (latencies, elapsed) = drive(n, concurrency, move |i| {
            let (client, url, token) = (client.clone(), url.clone(), token.clone());
            async move {
                let response = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(
                        &json!({"kind": "bench", "input": {"i": i, "payload": "0123456789abcdef"}}),
                    )
                    .send()
                    .await
                    .expect("request");
                assert_eq!(response.status(), 202);
            }
        })
        .await;
        figures(latencies, elapsed)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.node.wait().await;
    }
}

const RAW_INSERT: &str = "INSERT INTO jobs (id, user_id, kind, input, status, attempts, max_attempts, callback_url, \
     notify, idempotency_key, request_hash, run_at, created_at, updated_at) \
     VALUES ($1, $2, $3, $4, 'pending', 0, $5, NULL, NULL, NULL, $6, $7, $7, $7)";

/// One raw insert of the row Herald writes, on either engine's pool.
macro_rules! raw_insert {
    ($pool:expr, $i:expr) => {
        sqlx::query(RAW_INSERT)
            .bind(uuid::Uuid::now_v7())
            .bind("bench")
            .bind("bench")
            .bind(sqlx::types::Json(json!({"i": $i, "payload": "0123456789abcdef"})))
            .bind(3)
            .bind("hash")
            .bind(chrono::Utc::now())
            .execute($pool)
            .await
            .expect("insert")
    };
}

/// The baseline: the same row inserted with sqlx, one statement per insert.
enum Raw {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Raw {
    async fn sqlite(url: &str) -> Self {
        use sqlx::sqlite::{
            SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
        };
        use std::str::FromStr;
        let options = SqliteConnectOptions::from_str(url)
            .expect("url")
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30));
        // One connection: SQLite has one writer, so more connections only add lock waits.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .expect("sqlite");
        Self::Sqlite(pool)
    }

    async fn postgres(url: &str, pool_size: u32) -> Self {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(pool_size)
            .connect(url)
            .await
            .expect("pg");
        Self::Postgres(pool)
    }

    async fn run(&self, n: usize, concurrency: usize) -> Figures {
        // The pools are different types: one body, expanded for each.
        macro_rules! inserts {
            ($pool:expr) => {{
                let pool = $pool.clone();
                drive(n, concurrency, move |i| {
                    let pool = pool.clone();
                    async move {
                        raw_insert!(&pool, i);
                    }
                })
                .await
            }};
        }
        let (latencies, elapsed) = match self {
            Self::Sqlite(pool) => inserts!(pool),
            Self::Postgres(pool) => inserts!(pool),
        };
        figures(latencies, elapsed)
    }
}

/// Warm both paths up (connections, prepared statements, caches), then alternate rounds so
/// drifting load on a shared machine hits both alike; the median round of each is reported.
async fn compare(engine: &str, herald: Herald, raw: Raw, n: usize, concurrency: usize) {
    let warm = (n / 4).max(1);
    let _ = herald.run(warm, concurrency).await;
    let _ = raw.run(warm, concurrency).await;
    let rounds = env_usize("BENCH_ROUNDS", 3).max(1);
    let (mut h, mut r) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        h.push(herald.run(n, concurrency).await);
        r.push(raw.run(n, concurrency).await);
    }
    herald.stop().await;
    let median = |mut v: Vec<Figures>| {
        v.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
        v.swap_remove(v.len() / 2)
    };
    print(engine, &median(h), &median(r));
}

async fn schema(url: &str) {
    let mut config = Config::defaults().expect("config");
    config.database.url = Secret::new(url);
    herald::server::open_store(&config)
        .await
        .expect("schema")
        .close()
        .await;
}

fn print(engine: &str, herald: &Figures, raw: &Figures) {
    println!(
        "{engine:<10} herald {:>8.0} acks/s  p50 {:>7.2} ms  p99 {:>7.2} ms | raw sqlx {:>8.0} inserts/s  p50 {:>7.2} ms  p99 {:>7.2} ms | ratio {:.2}x",
        herald.per_sec,
        herald.p50.as_secs_f64() * 1e3,
        herald.p99.as_secs_f64() * 1e3,
        raw.per_sec,
        raw.p50.as_secs_f64() * 1e3,
        raw.p99.as_secs_f64() * 1e3,
        herald.per_sec / raw.per_sec
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let n = env_usize("BENCH_REQUESTS", 4000);
    let concurrency = env_usize("BENCH_CONCURRENCY", 32);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        println!("POST /v1/jobs durable acknowledgments: {n} requests, {concurrency} in flight");
        let dir = tempfile::tempdir().expect("tempdir");
        // Herald and the raw baseline each get a fresh database of the same schema.
        let herald_url = format!("sqlite://{}", dir.path().join("herald.db").display());
        let raw_url = format!("sqlite://{}", dir.path().join("raw.db").display());
        let herald = Herald::start(&herald_url, concurrency).await;
        schema(&raw_url).await;
        let raw = Raw::sqlite(&raw_url).await;
        compare("sqlite", herald, raw, n, concurrency).await;

        let base = std::env::var("HERALD_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let herald_url = fresh_pg_url(&base).await;
        let raw_url = fresh_pg_url(&base).await;
        let herald = Herald::start(&herald_url, concurrency).await;
        schema(&raw_url).await;
        let pool_size = Config::defaults().expect("config").database.max_connections;
        let raw = Raw::postgres(&raw_url, pool_size).await;
        compare("postgres", herald, raw, n, concurrency).await;
    });
}
