//! The external worker lease API, on both engines.

mod common;

use std::time::{Duration, Instant};

use common::{Engine, TestApp, expect_problem};
use reqwest::Response;
use serde_json::{Value, json};

const WORKER: &str = "render-farm";

async fn worker_call(app: &TestApp, path: &str, body: Value) -> Response {
    app.client
        .post(app.url(path))
        .bearer_auth(app.token_with(WORKER, Some("jobs:work")))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn lease(app: &TestApp, body: Value) -> Vec<Value> {
    let response = worker_call(app, "/v1/worker/lease", body).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    body["jobs"].as_array().cloned().unwrap_or_default()
}

async fn scope_is_required(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let response = app
        .post(
            "/v1/worker/lease",
            "alice",
            json!({"kinds": ["render.video"]}),
        )
        .await;
    expect_problem(response, 403).await;
    let response = app
        .call(
            reqwest::Method::POST,
            "/v1/worker/lease",
            None,
            Some(json!({})),
        )
        .await;
    expect_problem(response, 401).await;
}

async fn lease_progress_complete(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    assert!(
        lease(&app, json!({"kinds": ["render.video"]}))
            .await
            .is_empty()
    );
    let id = app
        .submit(
            "alice",
            json!({"kind": "render.video", "input": {"clip": 1}}),
        )
        .await;
    let jobs = lease(
        &app,
        json!({"kinds": ["render.video"], "max": 10, "leaseSeconds": 30}),
    )
    .await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["trackingId"], id.as_str());
    assert_eq!(jobs[0]["input"], json!({"clip": 1}));
    assert_eq!(jobs[0]["attempt"], 1);
    assert!(
        lease(&app, json!({"kinds": ["render.video"]}))
            .await
            .is_empty(),
        "a leased job is not leased twice"
    );

    let progress = worker_call(
        &app,
        &format!("/v1/worker/jobs/{id}/progress"),
        json!({"progress": 40, "data": {"frame": 12}}),
    )
    .await;
    assert_eq!(progress.status(), 204);
    let job: Value = app
        .get(&format!("/v1/jobs/{id}"), "alice")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(job["status"], "processing");
    assert_eq!(job["progress"], 40);
    let beat = worker_call(
        &app,
        &format!("/v1/worker/jobs/{id}/heartbeat"),
        json!({"leaseSeconds": 60}),
    )
    .await;
    assert_eq!(beat.status(), 200);
    let beat: Value = beat.json().await.unwrap();
    assert!(beat["leaseExpiresAt"].is_string());

    let done = worker_call(
        &app,
        &format!("/v1/worker/jobs/{id}/complete"),
        json!({"result": {"url": "https://cdn/x.mp4"}, "notification": {"title": "Ready", "body": "Your video"}}),
    )
    .await;
    assert_eq!(done.status(), 204);
    let job: Value = app
        .get(&format!("/v1/jobs/{id}"), "alice")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(job["status"], "completed");
    assert_eq!(job["result"], json!({"url": "https://cdn/x.mp4"}));
    let log = app.updates("alice").await;
    let last = log.last().unwrap();
    assert_eq!(last.kind, "job.completed");
    assert_eq!(
        last.notification.as_ref().unwrap().title.as_deref(),
        Some("Ready")
    );
    assert!(
        log.iter()
            .any(|u| u.data.as_ref().and_then(|d| d.get("progress")) == Some(&json!(40)))
    );

    for call in ["complete", "heartbeat", "progress", "fail"] {
        let body = json!({"result": {}, "progress": 1, "error": {"code": "x"}});
        expect_problem(
            worker_call(&app, &format!("/v1/worker/jobs/{id}/{call}"), body).await,
            409,
        )
        .await;
    }
}

async fn retryable_failure_returns_the_job(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let id = app.submit("alice", json!({"kind": "render.video"})).await;
    lease(&app, json!({"kinds": ["render.video"]})).await;
    let before = app.fingerprint().await;
    let bad = worker_call(
        &app,
        &format!("/v1/worker/jobs/{id}/fail"),
        json!({"retryable": true}),
    )
    .await;
    expect_problem(bad, 422).await;
    assert_eq!(app.fingerprint().await, before);
    let failed = worker_call(
        &app,
        &format!("/v1/worker/jobs/{id}/fail"),
        json!({"error": {"code": "gpu_busy", "message": "try later"}, "retryable": true}),
    )
    .await;
    assert_eq!(failed.status(), 204);
    // Long-poll until the backoff has passed; the job comes back as attempt 2.
    let jobs = lease(&app, json!({"kinds": ["render.video"], "waitSeconds": 5})).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["attempt"], 2);
    let failed = worker_call(
        &app,
        &format!("/v1/worker/jobs/{id}/fail"),
        json!({"error": {"code": "corrupt", "message": "bad source"}, "retryable": false}),
    )
    .await;
    assert_eq!(failed.status(), 204);
    let job: Value = app
        .get(&format!("/v1/jobs/{id}"), "alice")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(job["status"], "failed");
    assert_eq!(
        job["error"],
        json!({"code": "corrupt", "message": "bad source"})
    );
}

async fn long_poll_wakes_on_submit(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let started = Instant::now();
    let waiting = {
        let client = app.client.clone();
        let url = app.url("/v1/worker/lease");
        let token = app.token_with(WORKER, Some("jobs:work"));
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .json(&json!({"kinds": ["render.video"], "waitSeconds": 10}))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = app.submit("alice", json!({"kind": "render.video"})).await;
    let answer = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer["jobs"][0]["trackingId"], id.as_str());
    // Not asserting a latency: only that it did not wait out the full 10 s.
    assert!(started.elapsed() < Duration::from_secs(9));
}

async fn lease_validation(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    for body in [
        json!({}),
        json!({"kinds": []}),
        json!({"kinds": ["echo"]}),
        json!({"kinds": ["render.video"], "max": 0}),
        json!({"kinds": ["render.video"], "leaseSeconds": 1}),
        json!({"kinds": ["render.video"], "waitSeconds": 31}),
    ] {
        expect_problem(worker_call(&app, "/v1/worker/lease", body).await, 422).await;
    }
}

both_engines!(
    scope_is_required,
    lease_progress_complete,
    retryable_failure_returns_the_job,
    long_poll_wakes_on_submit,
    lease_validation,
);
