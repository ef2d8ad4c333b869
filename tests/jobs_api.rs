//! `/v1/jobs` and the in-process queue over HTTP, on both engines.

mod common;

use std::collections::HashSet;

use common::{Engine, TestApp, error_fields, expect_problem};
use reqwest::Method;
use serde_json::{Value, json};

async fn submit_answers_202_then_completes(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let response = app
        .post(
            "/v1/jobs",
            "alice",
            json!({"kind": "echo", "input": {"hello": "world"}}),
        )
        .await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let body: Value = response.json().await.unwrap();
    let id = body["trackingId"].as_str().unwrap().to_string();
    assert_eq!(body["status"], "pending");
    assert_eq!(body["statusUrl"], format!("/v1/jobs/{id}"));
    assert_eq!(location, format!("/v1/jobs/{id}"));
    assert!(body["createdAt"].is_string());

    let job = app.wait_finished("alice", &id).await;
    assert_eq!(job["status"], "completed");
    assert_eq!(job["result"], json!({"hello": "world"}));
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["kind"], "echo");
    assert!(job["completedAt"].is_string() && job["error"].is_null());

    let log = app.updates("alice").await;
    let kinds: Vec<&str> = log.iter().map(|u| u.kind.as_str()).collect();
    assert_eq!(kinds, ["job.processing", "job.completed"]);
    assert!(
        log.windows(2).all(|w| w[0].seq < w[1].seq),
        "seq strictly increases"
    );
    assert_eq!(
        log[1].data.as_ref().unwrap()["result"],
        json!({"hello": "world"})
    );
    expect_problem(app.get(&format!("/v1/jobs/{id}"), "bob").await, 404).await;
}

async fn report_generate_aggregates_and_fails_bad_records(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let records: Vec<Value> = (0..1500)
        .map(|i| json!({"group": if i % 2 == 0 { "eu" } else { "us" }, "amount": 2.0}))
        .collect();
    let id = app
        .submit(
            "alice",
            json!({"kind": "report.generate", "input": {"records": records}}),
        )
        .await;
    let job = app.wait_finished("alice", &id).await;
    assert_eq!(job["status"], "completed");
    assert_eq!(
        job["result"],
        json!({"count": 1500, "total": 3000.0, "byGroup": {"eu": 1500.0, "us": 1500.0}})
    );
    let progress: Vec<i64> = app
        .updates("alice")
        .await
        .iter()
        .filter_map(|u| u.data.as_ref()?.get("progress")?.as_i64())
        .collect();
    assert!(!progress.is_empty(), "progress updates were recorded");

    let bad = app
        .submit(
            "alice",
            json!({"kind": "report.generate", "input": {"records": [{"group": "eu"}]}}),
        )
        .await;
    let job = app.wait_finished("alice", &bad).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["attempts"], 1, "a permanent error is not retried");
    assert_eq!(job["error"]["code"], "invalid_record");
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .contains("records[0]")
    );
}

async fn retryable_failures_back_off_then_succeed_or_fail(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let id = app
        .submit("alice", json!({"kind": "echo", "input": {"failTimes": 2}}))
        .await;
    let job = app.wait_finished("alice", &id).await;
    assert_eq!(job["status"], "completed");
    assert_eq!(job["attempts"], 3);

    // echo allows 5 attempts: failing 9 times exhausts them.
    let id = app
        .submit("alice", json!({"kind": "echo", "input": {"failTimes": 9}}))
        .await;
    let job = app.wait_finished("alice", &id).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["attempts"], 5);
    assert_eq!(job["error"]["code"], "echo_fail");
    let failed = app
        .updates("alice")
        .await
        .into_iter()
        .filter(|u| u.kind == "job.failed")
        .count();
    assert_eq!(failed, 1, "only the final failure is an update");
}

async fn idempotency_key_replays_and_refuses_other_bodies(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let send = |body: Value, key: &'static str| {
        app.client
            .post(app.url("/v1/jobs"))
            .bearer_auth(app.token("alice"))
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };
    let body = json!({"kind": "render.video", "input": {"n": 1}});
    let first = send(body.clone(), "key-1").await.unwrap();
    assert_eq!(first.status(), 202);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    let again = send(body.clone(), "key-1").await.unwrap();
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["trackingId"], first["trackingId"]);
    let before = app.fingerprint().await;
    let other = send(json!({"kind": "render.video", "input": {"n": 2}}), "key-1")
        .await
        .unwrap();
    let problem = expect_problem(other, 422).await;
    assert_eq!(error_fields(&problem), ["Idempotency-Key"]);
    assert_eq!(app.fingerprint().await, before);
    // Another user's identical key is theirs alone.
    let bob = app
        .client
        .post(app.url("/v1/jobs"))
        .bearer_auth(app.token("bob"))
        .header("idempotency-key", "key-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    let bob: Value = bob.json().await.unwrap();
    assert_ne!(bob["trackingId"], first["trackingId"]);

    // Concurrent first uses of one key make one job.
    let body = json!({"kind": "render.video", "input": {"clip": 7}});
    let mut handles = Vec::new();
    for _ in 0..10 {
        let request = app
            .client
            .post(app.url("/v1/jobs"))
            .bearer_auth(app.token("carol"))
            .header("idempotency-key", "race")
            .json(&body)
            .send();
        handles.push(tokio::spawn(request));
    }
    let mut ids = HashSet::new();
    for handle in handles {
        let response = handle.await.unwrap().unwrap();
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        ids.insert(body["trackingId"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 1);
    let page: Value = app.get("/v1/jobs", "carol").await.json().await.unwrap();
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1);
}

async fn bad_submissions_are_422_and_store_nothing(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    app.submit("alice", json!({"kind": "render.video"})).await;
    let before = app.fingerprint().await;
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (json!({}), vec!["kind"]),
        (json!({"kind": "nope"}), vec!["kind"]),
        (json!({"kind": 5}), vec!["kind"]),
        (json!({"kind": "echo", "input": [1]}), vec!["input"]),
        (
            json!({"kind": "echo", "callbackUrl": "http://127.0.0.1/hook"}),
            vec!["callbackUrl"],
        ),
        (
            json!({"kind": "echo", "callbackUrl": "not a url"}),
            vec!["callbackUrl"],
        ),
        (
            json!({"kind": "echo", "notify": {"title": 5, "silent": "yes"}}),
            vec!["notify.title", "notify.silent"],
        ),
        (json!({"kind": "echo", "notify": "hi"}), vec!["notify"]),
    ];
    for (body, fields) in cases {
        let problem = expect_problem(app.post("/v1/jobs", "alice", body.clone()).await, 422).await;
        assert_eq!(error_fields(&problem), fields, "body {body}");
    }
    let long_key = "k".repeat(256);
    let response = app
        .client
        .post(app.url("/v1/jobs"))
        .bearer_auth(app.token("alice"))
        .header("idempotency-key", long_key)
        .json(&json!({"kind": "echo"}))
        .send()
        .await
        .unwrap();
    expect_problem(response, 422).await;
    let response = app
        .client
        .post(app.url("/v1/jobs"))
        .bearer_auth(app.token("alice"))
        .header("content-type", "application/json")
        .body("{\"kind\":")
        .send()
        .await
        .unwrap();
    expect_problem(response, 400).await;
    expect_problem(
        app.call(
            Method::POST,
            "/v1/jobs",
            None,
            Some(json!({"kind": "echo"})),
        )
        .await,
        401,
    )
    .await;
    assert_eq!(app.fingerprint().await, before);
}

async fn list_filters_and_pages_newest_first(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            app.submit("alice", json!({"kind": "render.video", "input": {"i": i}}))
                .await,
        );
    }
    let done = app.submit("alice", json!({"kind": "echo"})).await;
    app.wait_finished("alice", &done).await;
    app.submit("bob", json!({"kind": "render.video"})).await;

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let path = match &cursor {
            Some(c) => format!("/v1/jobs?status=pending&limit=2&cursor={c}"),
            None => "/v1/jobs?status=pending&limit=2".into(),
        };
        let page: Value = app.get(&path, "alice").await.json().await.unwrap();
        for job in page["jobs"].as_array().unwrap() {
            assert_eq!(job["status"], "pending");
            seen.push(job["trackingId"].as_str().unwrap().to_string());
        }
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "every pending job once, newest first");
    let all: Value = app.get("/v1/jobs", "alice").await.json().await.unwrap();
    assert_eq!(all["jobs"].as_array().unwrap().len(), 6);
    assert!(all["nextCursor"].is_null());
    for bad in [
        "/v1/jobs?status=done",
        "/v1/jobs?limit=0",
        "/v1/jobs?limit=501",
        "/v1/jobs?cursor=zzz",
    ] {
        expect_problem(app.get(bad, "alice").await, 422).await;
    }
}

async fn cancel_moves_forward_only(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let id = app.submit("alice", json!({"kind": "render.video"})).await;
    let path = format!("/v1/jobs/{id}/cancel");
    expect_problem(app.call(Method::POST, &path, Some("bob"), None).await, 404).await;
    let canceled = app.call(Method::POST, &path, Some("alice"), None).await;
    assert_eq!(canceled.status(), 200);
    let canceled: Value = canceled.json().await.unwrap();
    assert_eq!(canceled["status"], "canceled");
    let before = app.fingerprint().await;
    expect_problem(
        app.call(Method::POST, &path, Some("alice"), None).await,
        409,
    )
    .await;
    assert_eq!(app.fingerprint().await, before);
    let log = app.updates("alice").await;
    assert_eq!(log.last().unwrap().kind, "job.canceled");

    let done = app.submit("alice", json!({"kind": "echo"})).await;
    app.wait_finished("alice", &done).await;
    expect_problem(
        app.call(
            Method::POST,
            &format!("/v1/jobs/{done}/cancel"),
            Some("alice"),
            None,
        )
        .await,
        409,
    )
    .await;
    expect_problem(
        app.call(
            Method::POST,
            "/v1/jobs/not-an-id/cancel",
            Some("alice"),
            None,
        )
        .await,
        404,
    )
    .await;
}

async fn a_crashed_worker_loses_nothing(engine: Engine) {
    let app = TestApp::spawn_with(engine, |c| c.queue.concurrency = 1).await;
    // A "worker" that claims echo jobs and then dies: it never heartbeats or completes.
    let ids: Vec<String> = futures::future::join_all(
        (0..5).map(|i| app.submit("alice", json!({"kind": "echo", "input": {"i": i}}))),
    )
    .await;
    let kinds = vec!["echo".to_string()];
    let mut held = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while held.is_empty() && std::time::Instant::now() < deadline {
        held = app
            .store
            .claim_jobs(&kinds, 5, "crashed-node", std::time::Duration::from_secs(1))
            .await
            .unwrap();
    }
    for id in &ids {
        let job = app.wait_finished("alice", id).await;
        assert_eq!(job["status"], "completed");
    }
    // The dead worker wakes up and tries to finish: it is fenced out.
    for job in &held {
        let lease = herald::jobs::Lease {
            job_id: job.id,
            owner: "crashed-node".into(),
            attempt: Some(job.attempt),
        };
        assert!(
            !app.store
                .complete_job(&lease, &json!({"late": true}), None)
                .await
                .unwrap()
        );
    }
    let log = app.updates("alice").await;
    for id in &ids {
        let completions = log
            .iter()
            .filter(|u| {
                u.kind == "job.completed"
                    && u.tracking_id.map(|t| t.to_string()).as_deref() == Some(id)
            })
            .count();
        assert_eq!(completions, 1, "job {id} completed exactly once");
    }
    for job in &held {
        let shown = app.wait_finished("alice", &job.id.to_string()).await;
        assert_eq!(
            shown["attempts"], 2,
            "the held job ran again after its lease expired"
        );
    }
}

both_engines!(
    submit_answers_202_then_completes,
    report_generate_aggregates_and_fails_bad_records,
    retryable_failures_back_off_then_succeed_or_fail,
    idempotency_key_replays_and_refuses_other_bodies,
    bad_submissions_are_422_and_store_nothing,
    list_filters_and_pages_newest_first,
    cancel_moves_forward_only,
    a_crashed_worker_loses_nothing,
);
