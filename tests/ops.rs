//! Operations endpoints and cross-cutting HTTP behaviour.

mod common;

use std::time::Duration;

use common::{Engine, TestApp, expect_problem};
use reqwest::Method;
use serde_json::{Value, json};

async fn health_and_readiness(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let health: Value = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health, json!({"status": "ok"}));
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
}

async fn unknown_routes_and_methods_are_problems(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    expect_problem(
        app.client.get(app.url("/v1/nope")).send().await.unwrap(),
        404,
    )
    .await;
    expect_problem(
        app.call(Method::PUT, "/v1/devices", Some("alice"), None)
            .await,
        405,
    )
    .await;
}

async fn request_ids_are_generated_and_echoed(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let generated = app.client.get(app.url("/healthz")).send().await.unwrap();
    let id = generated.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "generated id {id}");
    let echoed = app
        .client
        .get(app.url("/v1/nope"))
        .header("x-request-id", "client-chosen-42")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "client-chosen-42");
}

async fn metrics_count_requests_by_route_and_status(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    app.get("/v1/devices", "alice").await;
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(
            r#"herald_http_requests_total{route="/v1/devices",method="GET",status="200"}"#
        ),
        "{text}"
    );
    assert!(
        text.contains("herald_http_request_duration_seconds_bucket{"),
        "{text}"
    );
}

async fn openapi_describes_the_routes(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let doc: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/v1/devices",
        "/v1/devices/{id}",
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/updates",
        "/v1/updates/ack",
        "/v1/events",
    ] {
        assert!(doc["paths"][path].is_object(), "missing {path}");
    }
    assert!(doc["paths"]["/v1/devices"]["post"]["responses"]["201"].is_object());
}

both_engines!(
    health_and_readiness,
    unknown_routes_and_methods_are_problems,
    request_ids_are_generated_and_echoed,
    metrics_count_requests_by_route_and_status,
    openapi_describes_the_routes,
);

/// A database of its own on the test PostgreSQL, for a node whose database a test takes away:
/// the admin pool, the database's name and its URL.
async fn own_database(prefix: &str) -> (sqlx::PgPool, String, String) {
    let base = common::pg_base_url();
    let name = format!("herald_{prefix}_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&base)
        .await
        .expect("PostgreSQL must be running for this test");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .unwrap();
    let mut url = url::Url::parse(&base).unwrap();
    url.set_path(&name);
    (admin, name, url.to_string())
}

/// /readyz answers 503 while PostgreSQL is unreachable: the node's database is dropped under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_when_postgres_is_gone() {
    let (admin, name, url) = own_database("ready").await;
    let app = TestApp::spawn_with(Engine::Sqlite, |c| {
        c.database.url = herald::config::Secret::new(url.clone());
        c.database.acquire_timeout_secs = 1;
    })
    .await;
    assert_eq!(
        app.client
            .get(app.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await
    .unwrap();
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    // Requests that need the database say so with a problem, not a hang.
    let devices = tokio::time::timeout(Duration::from_secs(10), app.get("/v1/devices", "alice"))
        .await
        .unwrap();
    assert!(devices.status().is_server_error());
    assert_eq!(
        app.client
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    admin.close().await;
}

/// Database trouble is a 503 with `Retry-After`, never a 500: PostgreSQL terminating the
/// node's backends (an administrator, a restart, a failover) and then refusing new connections.
/// Once it serves again, so does the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outages_answer_503_with_retry_after() {
    let (admin, name, url) = own_database("outage").await;
    let app = TestApp::spawn_with(Engine::Sqlite, |c| {
        c.database.url = herald::config::Secret::new(url.clone());
        c.database.acquire_timeout_secs = 1;
    })
    .await;
    let device = serde_json::json!({"platform": "fcm", "token": "outage-token-1"});
    assert_eq!(
        app.post("/v1/devices", "alice", device.clone())
            .await
            .status(),
        201
    );
    let terminate = format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    );
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut check = |response: &reqwest::Response, phase: &str| {
        let status = response.status().as_u16();
        *statuses.entry(status).or_default() += 1;
        assert_ne!(status, 500, "{phase}: a 500 for database trouble");
        if status == 503 {
            assert!(
                response.headers().contains_key("retry-after"),
                "{phase}: a 503 without Retry-After"
            );
        }
    };
    // Backends terminated under the pool, again and again.
    for _ in 0..5 {
        sqlx::query(sqlx::AssertSqlSafe(terminate.clone()))
            .execute(&admin)
            .await
            .unwrap();
        let listed = app.get("/v1/devices", "alice").await;
        check(&listed, "terminated backends");
        let registered = app.post("/v1/devices", "alice", device.clone()).await;
        check(&registered, "terminated backends");
    }
    // New connections refused.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS false"
    )))
    .execute(&admin)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(terminate.clone()))
        .execute(&admin)
        .await
        .unwrap();
    let refused = app.get("/v1/devices", "alice").await;
    assert_eq!(refused.status(), 503, "connections refused");
    check(&refused, "connections refused");
    // Back again.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS true"
    )))
    .execute(&admin)
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listed = app.get("/v1/devices", "alice").await;
        check(&listed, "recovery");
        if listed.status() == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never recovered: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(app);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await
    .unwrap();
    admin.close().await;
}
