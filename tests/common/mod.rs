//! Test support: a real Herald node on 127.0.0.1:0 with a fresh SQLite file or a fresh
//! PostgreSQL schema, and a client that talks to it over HTTP.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use herald::config::{Config, Secret};
use herald::server::{self, Node};
use herald::store::Store;
use reqwest::{Client, Method, Response};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Database engine under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// The HS256 secret every test node trusts.
pub const SECRET: &str = "test-secret-0123456789abcdef0123456789";

/// Where the test PostgreSQL lives.
pub fn pg_base_url() -> String {
    std::env::var("HERALD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh database: a temporary SQLite file, or a new schema in the test PostgreSQL.
pub struct TestDb {
    pub engine: Engine,
    pub url: String,
    schema: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn new(engine: Engine) -> Self {
        match engine {
            Engine::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                let url = format!("sqlite://{}", dir.path().join("herald.db").display());
                Self {
                    engine,
                    url,
                    schema: None,
                    _dir: Some(dir),
                }
            }
            Engine::Postgres => {
                let base = pg_base_url();
                let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
                let admin = connect_admin(&base).await;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                    .execute(&admin)
                    .await
                    .expect("create schema");
                admin.close().await;
                let sep = if base.contains('?') { '&' } else { '?' };
                let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
                Self {
                    engine,
                    url,
                    schema: Some(schema),
                    _dir: None,
                }
            }
        }
    }
}

/// A migrated store on a fresh database of `engine`, for tests below the HTTP API.
pub async fn open_store(engine: Engine, max_connections: u32) -> (TestDb, Arc<dyn Store>) {
    let db = TestDb::new(engine).await;
    let config = herald::config::DatabaseConfig {
        url: Secret::new(db.url.clone()),
        max_connections,
        acquire_timeout_secs: 5,
    };
    let store = herald::store::connect(&config).await.expect("connect");
    store.migrate().await.expect("migrate");
    (db, store)
}

async fn connect_admin(base: &str) -> sqlx::PgPool {
    match sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(base)
        .await
    {
        Ok(pool) => pool,
        Err(err) => panic!(
            "PostgreSQL is not reachable at {base} ({err}). Start it with \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` \
             or point HERALD_TEST_DATABASE_URL at one. PostgreSQL tests are never skipped."
        ),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(schema) = self.schema.take() else {
            return;
        };
        let base = pg_base_url();
        // Drop runs inside the test's runtime; a separate thread owns its own runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(pool) = sqlx::PgPool::connect(&base).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP SCHEMA IF EXISTS {schema} CASCADE"
                    )))
                    .execute(&pool)
                    .await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}

/// A configuration for a test node on `db`.
pub fn test_config(db: &TestDb) -> Config {
    let mut config = Config::defaults().expect("defaults");
    config.database.url = Secret::new(db.url.clone());
    config.database.max_connections = 5;
    config.auth.hs256_secret = Secret::new(SECRET);
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.http.shutdown_grace_secs = 2;
    config.queue.backoff_base_ms = 10;
    config.queue.backoff_max_ms = 50;
    config.queue.poll_interval_ms = 200;
    config.queue.shutdown_grace_secs = 2;
    config.webhooks.allow_private_targets = false;
    config.kinds.insert(
        "render.video".into(),
        herald::config::KindConfig {
            handler: "external".into(),
            max_attempts: 3,
        },
    );
    config
}

/// A running node and a client for it.
pub struct TestApp {
    pub base: String,
    pub client: Client,
    pub store: Arc<dyn Store>,
    pub db: TestDb,
    shutdown: CancellationToken,
    node: Option<Node>,
}

impl TestApp {
    pub async fn spawn(engine: Engine) -> Self {
        Self::spawn_with(engine, |_| {}).await
    }

    pub async fn spawn_with(engine: Engine, adjust: impl FnOnce(&mut Config)) -> Self {
        let db = TestDb::new(engine).await;
        Self::spawn_on(db, adjust).await
    }

    /// Start a node on an existing database.
    pub async fn spawn_on(db: TestDb, adjust: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config(&db);
        adjust(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let shutdown = CancellationToken::new();
        let node = server::start(config, listener, shutdown.clone())
            .await
            .expect("start");
        let base = format!("http://{}", node.addr);
        let client = Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("client");
        Self {
            base,
            client,
            store: node.store.clone(),
            db,
            shutdown,
            node: Some(node),
        }
    }

    /// Stop the node and wait for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(node) = self.node.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), node.wait()).await;
        }
    }

    pub fn token(&self, sub: &str) -> String {
        self.token_with(sub, None)
    }

    pub fn token_with(&self, sub: &str, scope: Option<&str>) -> String {
        herald::auth::mint_hs256(
            &Secret::new(SECRET),
            sub,
            scope,
            Duration::from_secs(600),
            None,
            None,
        )
        .expect("mint")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Send `method path` as `user` with an optional JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        user: Option<&str>,
        body: Option<Value>,
    ) -> Response {
        let mut req = self.client.request(method, self.url(path));
        if let Some(user) = user {
            req = req.bearer_auth(self.token(user));
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        req.send().await.expect("request")
    }

    pub async fn post(&self, path: &str, user: &str, body: Value) -> Response {
        self.call(Method::POST, path, Some(user), Some(body)).await
    }

    pub async fn get(&self, path: &str, user: &str) -> Response {
        self.call(Method::GET, path, Some(user), None).await
    }

    /// Register a device and return its JSON.
    pub async fn register_device(&self, user: &str, body: Value) -> Value {
        let response = self.post("/v1/devices", user, body).await;
        assert!(
            response.status().is_success(),
            "register: {}",
            response.status()
        );
        response.json().await.expect("json")
    }

    pub async fn devices(&self, user: &str) -> Vec<Value> {
        let body: Value = self
            .get("/v1/devices", user)
            .await
            .json()
            .await
            .expect("json");
        body["devices"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A valid APNs token derived from `n`.
pub fn apns_token(n: u32) -> String {
    format!("{n:08x}").repeat(8)
}

/// Run each listed `async fn name(engine: Engine)` once per engine, as `sqlite::name` and
/// `postgres::name`.
#[macro_export]
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Engine::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Engine::Postgres).await
                }
            )*
        }
    };
}

impl TestApp {
    /// Every stored row that a request could change, as text: equal fingerprints mean an
    /// unchanged database.
    pub async fn fingerprint(&self) -> String {
        let queries = [
            "SELECT user_id || '|' || platform || '|' || token || '|' || status || '|' || app_id \
             || '|' || COALESCE(environment, '') || '|' || COALESCE(app_version, '') || '|' \
             || COALESCE(locale, '') || '|' || last_seen_at FROM devices ORDER BY 1",
            "SELECT user_id || '|' || kind || '|' || status || '|' || attempts || '|' || updated_at \
             || '|' || COALESCE(idempotency_key, '') FROM jobs ORDER BY 1",
            "SELECT user_id || '|' || seq || '|' || type FROM updates ORDER BY 1",
            // Through the token: the id column is a blob on SQLite and a uuid on PostgreSQL.
            "SELECT v.token || '|' || c.seq FROM device_cursors c JOIN devices v ON v.id = c.device_id \
             ORDER BY 1",
        ];
        let mut out = Vec::new();
        for sql in queries {
            let rows: Vec<String> = match self.db.engine {
                Engine::Sqlite => {
                    let pool = sqlx::SqlitePool::connect(&self.db.url)
                        .await
                        .expect("sqlite");
                    let rows = sqlx::query_scalar(sql)
                        .fetch_all(&pool)
                        .await
                        .expect("fingerprint");
                    pool.close().await;
                    rows
                }
                Engine::Postgres => {
                    let pool = sqlx::PgPool::connect(&self.db.url).await.expect("pg");
                    let rows = sqlx::query_scalar(sql)
                        .fetch_all(&pool)
                        .await
                        .expect("fingerprint");
                    pool.close().await;
                    rows
                }
            };
            out.push(rows.join("\n"));
        }
        out.join("\n--\n")
    }

    /// Submit a job and return its tracking id.
    pub async fn submit(&self, user: &str, body: Value) -> String {
        let response = self.post("/v1/jobs", user, body).await;
        assert_eq!(response.status(), 202, "submit");
        let body: Value = response.json().await.expect("json");
        body["trackingId"].as_str().expect("trackingId").to_string()
    }

    /// Poll a job until `done(job)` or the deadline; returns the last state.
    pub async fn wait_job(&self, user: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let job: Value = self
                .get(&format!("/v1/jobs/{id}"), user)
                .await
                .json()
                .await
                .expect("json");
            if done(&job) {
                return job;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "job {id} never got there: {job}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait until the job is finished (completed, failed or canceled).
    pub async fn wait_finished(&self, user: &str, id: &str) -> Value {
        self.wait_job(user, id, |j| {
            matches!(
                j["status"].as_str(),
                Some("completed" | "failed" | "canceled")
            )
        })
        .await
    }

    /// One `GET /v1/updates?<query>` page as `user`, which must answer 200.
    pub async fn sync_page(&self, user: &str, query: &str) -> Value {
        let response = self.get(&format!("/v1/updates?{query}"), user).await;
        assert_eq!(response.status(), 200, "sync {query}");
        response.json().await.expect("json")
    }

    /// Sync like an app: page through `GET /v1/updates` from `after` until `hasMore` is false;
    /// returns every update received and the final cursor.
    pub async fn sync_after(&self, user: &str, after: i64, limit: i64) -> (Vec<Value>, i64) {
        let mut cursor = after;
        let mut received = Vec::new();
        for _ in 0..1000 {
            let page = self
                .sync_page(user, &format!("after={cursor}&limit={limit}"))
                .await;
            let updates = page["updates"].as_array().cloned().unwrap_or_default();
            assert!(updates.len() as i64 <= limit, "page over limit");
            received.extend(updates);
            cursor = page["lastSeq"].as_i64().expect("lastSeq");
            if page["hasMore"] == false {
                return (received, cursor);
            }
        }
        panic!("sync never finished");
    }

    /// The user's update log, directly from the store (the source of truth sync is checked against).
    pub async fn updates(&self, user: &str) -> Vec<herald::updates::Update> {
        self.store
            .list_updates(user, 0, 10_000)
            .await
            .expect("updates")
    }
}

/// Assert a problem document with `status`, returning its body.
pub async fn expect_problem(response: Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status, "status");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.expect("problem json");
    assert_eq!(body["status"].as_u64(), Some(u64::from(status)));
    assert!(body["type"].is_string() && body["title"].is_string());
    body
}

/// The field names listed in a 422's `errors[]`.
pub fn error_fields(problem: &Value) -> Vec<String> {
    problem["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .filter_map(|e| e["field"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}
