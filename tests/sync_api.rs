//! `/v1/updates` (sync and ack), `unseen` on devices, `/v1/events` and retention, over HTTP on
//! both engines.

mod common;

use std::collections::{BTreeSet, HashMap};

use common::{Engine, TestApp, apns_token, error_fields, expect_problem};
use reqwest::{Method, Response};
use serde_json::{Value, json};

const PUBLISHER: &str = "orders-service";

async fn publish_as(app: &TestApp, scope: Option<&str>, body: Value) -> Response {
    app.client
        .post(app.url("/v1/events"))
        .bearer_auth(app.token_with(PUBLISHER, scope))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Publish an event that must be accepted; returns the 202 body.
async fn publish(app: &TestApp, body: Value) -> Value {
    let response = publish_as(app, Some("events:publish"), body).await;
    assert_eq!(response.status(), 202, "publish");
    response.json().await.unwrap()
}

async fn ack(app: &TestApp, user: &str, device: &Value, seq: i64) -> Response {
    app.post(
        "/v1/updates/ack",
        user,
        json!({"deviceId": device["id"], "seq": seq}),
    )
    .await
}

/// `unseen` of each of the user's devices, by device id.
async fn unseen(app: &TestApp, user: &str) -> HashMap<String, i64> {
    app.devices(user)
        .await
        .iter()
        .map(|d| {
            let id = d["id"].as_str().unwrap().to_string();
            (id, d["unseen"].as_i64().expect("unseen is shown"))
        })
        .collect()
}

fn seqs(updates: &[Value]) -> Vec<i64> {
    updates.iter().map(|u| u["seq"].as_i64().unwrap()).collect()
}

fn types(updates: &[Value]) -> Vec<&str> {
    updates
        .iter()
        .map(|u| u["type"].as_str().unwrap())
        .collect()
}

fn echo(i: i64) -> Value {
    json!({"kind": "echo", "input": {"i": i}})
}

async fn offline_app_syncs_exactly_what_it_missed(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    // Before going offline the app synced once and kept its cursor.
    let first = app.submit("alice", echo(0)).await;
    app.wait_finished("alice", &first).await;
    let (seen, cursor) = app.sync_after("alice", 0, 100).await;
    assert_eq!(types(&seen), ["job.processing", "job.completed"]);
    assert_eq!(cursor, seen[1]["seq"].as_i64().unwrap());

    // Offline: jobs finish and a service publishes, for alice and for bob.
    let mut jobs = Vec::new();
    for i in 1..=3 {
        jobs.push(app.submit("alice", echo(i)).await);
    }
    let bobs = app.submit("bob", echo(9)).await;
    for id in &jobs {
        app.wait_finished("alice", id).await;
    }
    app.wait_finished("bob", &bobs).await;
    publish(&app, json!({"userId": "alice", "type": "order.shipped"})).await;
    publish(&app, json!({"userId": "bob", "type": "order.shipped"})).await;
    publish(&app, json!({"userId": "alice", "type": "order.delivered"})).await;

    // Back online: pages of 3 from the cursor.
    let (missed, last) = app.sync_after("alice", cursor, 3).await;
    let truth = app
        .store
        .list_updates("alice", cursor, 10_000)
        .await
        .unwrap();
    assert_eq!(missed.len(), 3 * 2 + 2, "three jobs and two events");
    assert_eq!(
        seqs(&missed),
        truth.iter().map(|u| u.seq).collect::<Vec<_>>(),
        "exactly the log after the cursor, in order"
    );
    let ids: Vec<&str> = missed.iter().map(|u| u["id"].as_str().unwrap()).collect();
    let truth_ids: Vec<String> = truth.iter().map(|u| u.id.to_string()).collect();
    assert_eq!(ids, truth_ids);
    assert!(seqs(&missed).windows(2).all(|w| w[0] < w[1]));
    assert!(
        seqs(&missed)[0] > cursor,
        "nothing already seen is sent again"
    );
    for id in &jobs {
        let of_job: Vec<&str> = missed
            .iter()
            .filter(|u| u["trackingId"] == id.as_str())
            .map(|u| u["type"].as_str().unwrap())
            .collect();
        assert_eq!(of_job, ["job.processing", "job.completed"], "job {id}");
    }
    assert_eq!(
        types(&missed[6..]),
        ["order.shipped", "order.delivered"],
        "events follow in publishing order"
    );
    assert!(missed.iter().all(|u| u["trackingId"] != bobs.as_str()));
    assert_eq!(last, *seqs(&missed).last().unwrap());

    // Caught up: the next call is empty and keeps the cursor.
    let page = app.sync_page("alice", &format!("after={last}")).await;
    assert_eq!(
        page,
        json!({"updates": [], "lastSeq": last, "hasMore": false})
    );
    // One big page gives the same as the small ones.
    let (whole, whole_last) = app.sync_after("alice", cursor, 500).await;
    assert_eq!(whole, missed);
    assert_eq!(whole_last, last);
}

async fn pages_report_last_seq_and_has_more(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let empty = json!({"updates": [], "lastSeq": 0, "hasMore": false});
    assert_eq!(app.sync_page("alice", "").await, empty);
    assert_eq!(
        app.sync_page("alice", "after=41").await,
        json!({"updates": [], "lastSeq": 41, "hasMore": false}),
        "an empty page answers the cursor it was given"
    );

    let tracking = uuid::Uuid::now_v7().to_string();
    let mut published = Vec::new();
    for i in 0..3 {
        published.push(
            publish(
                &app,
                json!({"userId": "alice", "type": "note.added", "trackingId": tracking,
                       "data": {"i": i}, "notification": {"title": "T", "body": "B"}}),
            )
            .await,
        );
    }
    let s: Vec<i64> = published
        .iter()
        .map(|p| p["seq"].as_i64().unwrap())
        .collect();

    let exact = app.sync_page("alice", "limit=3").await;
    assert_eq!(seqs(exact["updates"].as_array().unwrap()), s);
    assert_eq!(exact["lastSeq"], s[2]);
    assert_eq!(exact["hasMore"], false, "a page exactly full has no more");
    let first = app.sync_page("alice", "limit=2").await;
    assert_eq!(seqs(first["updates"].as_array().unwrap()), s[..2]);
    assert_eq!(first["lastSeq"], s[1]);
    assert_eq!(first["hasMore"], true);
    let rest = app
        .sync_page("alice", &format!("after={}&limit=2", s[1]))
        .await;
    assert_eq!(seqs(rest["updates"].as_array().unwrap()), s[2..]);
    assert_eq!(rest["lastSeq"], s[2]);
    assert_eq!(rest["hasMore"], false);

    let update = &exact["updates"][0];
    let keys: BTreeSet<&str> = update
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "seq",
            "id",
            "type",
            "trackingId",
            "status",
            "data",
            "notification",
            "createdAt"
        ])
    );
    assert_eq!(update["id"], published[0]["id"]);
    assert_eq!(update["type"], "note.added");
    assert_eq!(update["trackingId"], tracking.as_str());
    assert!(update["status"].is_null(), "events have no status");
    assert_eq!(update["data"], json!({"i": 0}));
    assert_eq!(update["notification"], json!({"title": "T", "body": "B"}));
    assert!(update["createdAt"].is_string());
    assert_eq!(
        app.sync_page("bob", "").await,
        empty,
        "only the caller's log"
    );

    // The default page is 100.
    let event = herald::updates::NewUpdate {
        kind: "bulk.item".into(),
        tracking_id: None,
        status: None,
        data: None,
        notification: None,
    };
    for _ in 0..98 {
        app.store.publish_event("alice", &event).await.unwrap();
    }
    let page = app.sync_page("alice", "").await;
    assert_eq!(page["updates"].as_array().unwrap().len(), 100);
    assert_eq!(page["hasMore"], true);
    let page = app.sync_page("alice", "limit=500").await;
    assert_eq!(page["updates"].as_array().unwrap().len(), 101);
    assert_eq!(page["hasMore"], false);

    for (query, fields) in [
        ("after=-1", vec!["after"]),
        ("after=abc", vec!["after"]),
        ("after=1.5", vec!["after"]),
        ("after=", vec!["after"]),
        ("limit=0", vec!["limit"]),
        ("limit=501", vec!["limit"]),
        ("limit=ten", vec!["limit"]),
        ("after=-1&limit=0", vec!["after", "limit"]),
    ] {
        let problem =
            expect_problem(app.get(&format!("/v1/updates?{query}"), "alice").await, 422).await;
        assert_eq!(error_fields(&problem), fields, "{query}");
    }
    expect_problem(app.call(Method::GET, "/v1/updates", None, None).await, 401).await;
}

async fn ack_moves_each_device_cursor_forward(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let phone = app
        .register_device("alice", json!({"platform": "apns", "token": apns_token(1)}))
        .await;
    assert!(
        phone.get("unseen").is_none(),
        "POST /v1/devices answers are unchanged"
    );
    let tablet = app
        .register_device(
            "alice",
            json!({"platform": "fcm", "token": "tablet:token-1"}),
        )
        .await;
    let bob_phone = app
        .register_device("bob", json!({"platform": "apns", "token": apns_token(2)}))
        .await;
    let (phone_id, tablet_id) = (
        phone["id"].as_str().unwrap().to_string(),
        tablet["id"].as_str().unwrap().to_string(),
    );
    let counts = unseen(&app, "alice").await;
    assert_eq!(counts[&phone_id], 0);
    assert_eq!(counts[&tablet_id], 0);

    let mut s = Vec::new();
    for i in 0..5 {
        let p = publish(
            &app,
            json!({"userId": "alice", "type": "chat.message", "data": {"i": i}}),
        )
        .await;
        s.push(p["seq"].as_i64().unwrap());
    }
    let counts = unseen(&app, "alice").await;
    assert_eq!((counts[&phone_id], counts[&tablet_id]), (5, 5));

    assert_eq!(ack(&app, "alice", &phone, s[2]).await.status(), 204);
    let counts = unseen(&app, "alice").await;
    assert_eq!(
        (counts[&phone_id], counts[&tablet_id]),
        (2, 5),
        "per device"
    );
    // A late, lower ack (another screen, a retry) never moves the cursor back.
    assert_eq!(ack(&app, "alice", &phone, s[0]).await.status(), 204);
    assert_eq!(ack(&app, "alice", &phone, 0).await.status(), 204);
    assert_eq!(unseen(&app, "alice").await[&phone_id], 2);
    assert_eq!(ack(&app, "alice", &phone, s[2]).await.status(), 204);
    assert_eq!(ack(&app, "alice", &tablet, s[4]).await.status(), 204);
    let counts = unseen(&app, "alice").await;
    assert_eq!((counts[&phone_id], counts[&tablet_id]), (2, 0));

    let before = app.fingerprint().await;
    for (user, device_id) in [
        ("alice", bob_phone["id"].clone()),
        ("bob", phone["id"].clone()),
        ("alice", json!("not-a-uuid")),
        ("alice", json!(uuid::Uuid::now_v7().to_string())),
    ] {
        let response = app
            .post(
                "/v1/updates/ack",
                user,
                json!({"deviceId": device_id, "seq": s[4]}),
            )
            .await;
        expect_problem(response, 404).await;
    }
    for (body, fields) in [
        (json!({}), vec!["deviceId", "seq"]),
        (json!({"deviceId": phone["id"], "seq": -1}), vec!["seq"]),
        (json!({"deviceId": phone["id"], "seq": "9"}), vec!["seq"]),
        (json!({"deviceId": phone["id"], "seq": 1.5}), vec!["seq"]),
        (json!({"deviceId": 5, "seq": 9}), vec!["deviceId"]),
        // Beyond alice's newest update: a cursor there would hide what is appended next.
        (
            json!({"deviceId": phone["id"], "seq": s[4] + 1}),
            vec!["seq"],
        ),
    ] {
        let response = app.post("/v1/updates/ack", "alice", body.clone()).await;
        let problem = expect_problem(response, 422).await;
        assert_eq!(error_fields(&problem), fields, "{body}");
    }
    let anonymous = app
        .call(
            Method::POST,
            "/v1/updates/ack",
            None,
            Some(json!({"deviceId": phone["id"], "seq": s[4]})),
        )
        .await;
    expect_problem(anonymous, 401).await;
    assert_eq!(
        app.fingerprint().await,
        before,
        "rejected acks change nothing"
    );
    let counts = unseen(&app, "alice").await;
    assert_eq!((counts[&phone_id], counts[&tablet_id]), (2, 0));
}

async fn events_reach_their_user_only(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let job = app.submit("alice", echo(1)).await;
    app.wait_finished("alice", &job).await;
    let job_seq = app.updates("alice").await.last().unwrap().seq;

    let tracking = uuid::Uuid::now_v7();
    let mut alice_seqs = Vec::new();
    let mut alice_ids = Vec::new();
    for i in 0..3 {
        let body = publish(
            &app,
            json!({"userId": "alice", "type": "order.shipped",
                   "trackingId": tracking.simple().to_string(), "data": {"order": i}}),
        )
        .await;
        let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 2, "{body}");
        uuid::Uuid::parse_str(body["id"].as_str().unwrap()).unwrap();
        alice_seqs.push(body["seq"].as_i64().unwrap());
        alice_ids.push(body["id"].clone());
    }
    assert!(alice_seqs[0] > job_seq, "one seq space for jobs and events");
    assert!(alice_seqs.windows(2).all(|w| w[0] < w[1]));
    // Any token holding the scope among others may publish.
    let response = publish_as(
        &app,
        Some("jobs:work events:publish"),
        json!({"userId": "bob", "type": "invoice.paid", "notification": {}}),
    )
    .await;
    assert_eq!(response.status(), 202);
    let bob_event: Value = response.json().await.unwrap();

    let (alice_log, _) = app.sync_after("alice", job_seq, 100).await;
    assert_eq!(seqs(&alice_log), alice_seqs);
    assert_eq!(
        alice_log
            .iter()
            .map(|u| u["id"].clone())
            .collect::<Vec<_>>(),
        alice_ids
    );
    for (i, update) in alice_log.iter().enumerate() {
        assert_eq!(update["type"], "order.shipped");
        assert_eq!(update["trackingId"], tracking.to_string());
        assert!(update["status"].is_null());
        assert_eq!(update["data"], json!({"order": i}));
        assert!(update["notification"].is_null());
    }
    let (bob_log, _) = app.sync_after("bob", 0, 100).await;
    assert_eq!(bob_log.len(), 1);
    assert_eq!(bob_log[0]["id"], bob_event["id"]);
    assert_eq!(bob_log[0]["seq"], bob_event["seq"]);
    assert!(
        bob_log[0]["notification"].is_null(),
        "an empty notification means a background push"
    );
    let (publisher_log, _) = app.sync_after(PUBLISHER, 0, 100).await;
    assert!(
        publisher_log.is_empty(),
        "the publisher's own log is untouched"
    );
}

async fn rejected_events_store_nothing(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    app.register_device("alice", json!({"platform": "apns", "token": apns_token(3)}))
        .await;
    publish(&app, json!({"userId": "alice", "type": "order.shipped"})).await;
    let before = app.fingerprint().await;
    let valid = json!({"userId": "alice", "type": "order.shipped"});

    expect_problem(app.post("/v1/events", "alice", valid.clone()).await, 403).await;
    expect_problem(
        publish_as(&app, Some("jobs:work"), valid.clone()).await,
        403,
    )
    .await;
    expect_problem(
        app.call(Method::POST, "/v1/events", None, Some(valid.clone()))
            .await,
        401,
    )
    .await;
    // Without the scope nothing about the body is judged.
    let response = app
        .client
        .post(app.url("/v1/events"))
        .bearer_auth(app.token("alice"))
        .header("content-type", "application/json")
        .body("{\"userId\":")
        .send()
        .await
        .unwrap();
    expect_problem(response, 403).await;

    let long_title = "t".repeat(257);
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (json!({}), vec!["userId", "type"]),
        (json!({"userId": "", "type": "a"}), vec!["userId"]),
        (
            json!({"userId": "u".repeat(256), "type": "a"}),
            vec!["userId"],
        ),
        (json!({"userId": 5, "type": "a"}), vec!["userId"]),
        (json!({"userId": "alice", "type": ""}), vec!["type"]),
        (
            json!({"userId": "alice", "type": "has space"}),
            vec!["type"],
        ),
        (
            json!({"userId": "alice", "type": "x".repeat(101)}),
            vec!["type"],
        ),
        (json!({"userId": "alice", "type": 5}), vec!["type"]),
        (
            json!({"userId": "alice", "type": "a", "trackingId": "nope"}),
            vec!["trackingId"],
        ),
        (
            json!({"userId": "alice", "type": "a", "trackingId": 5}),
            vec!["trackingId"],
        ),
        (
            json!({"userId": "alice", "type": "a", "data": [1]}),
            vec!["data"],
        ),
        (
            json!({"userId": "alice", "type": "a", "data": "x"}),
            vec!["data"],
        ),
        (
            json!({"userId": "alice", "type": "a", "notification": "hi"}),
            vec!["notification"],
        ),
        (
            json!({"userId": "alice", "type": "a",
                   "notification": {"title": 5, "body": "b".repeat(2049)}}),
            vec!["notification.title", "notification.body"],
        ),
        (
            json!({"userId": "", "type": "job.x", "trackingId": "n", "data": 1,
                   "notification": {"title": long_title}}),
            vec!["userId", "type", "trackingId", "data", "notification.title"],
        ),
    ];
    for (body, fields) in cases {
        let response = publish_as(&app, Some("events:publish"), body.clone()).await;
        let problem = expect_problem(response, 422).await;
        assert_eq!(error_fields(&problem), fields, "{body}");
    }
    for reserved in ["job.completed", "JOB.failed"] {
        let body = json!({"userId": "alice", "type": reserved});
        let problem =
            expect_problem(publish_as(&app, Some("events:publish"), body).await, 422).await;
        assert_eq!(error_fields(&problem), ["type"]);
        let message = problem["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains("reserved"), "{message}");
    }

    let publisher = app.token_with(PUBLISHER, Some("events:publish"));
    let raw = |content_type: &'static str, body: String| {
        app.client
            .post(app.url("/v1/events"))
            .bearer_auth(&publisher)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    expect_problem(
        raw("application/json", "{\"userId\":".into())
            .await
            .unwrap(),
        400,
    )
    .await;
    expect_problem(raw("application/json", "[1]".into()).await.unwrap(), 422).await;
    expect_problem(raw("text/plain", valid.to_string()).await.unwrap(), 415).await;
    let huge = json!({"userId": "alice", "type": "a", "data": {"blob": "x".repeat(70_000)}});
    expect_problem(
        raw("application/json", huge.to_string()).await.unwrap(),
        413,
    )
    .await;

    assert_eq!(
        app.fingerprint().await,
        before,
        "rejected events change nothing"
    );
}

async fn retention_purges_old_updates(engine: Engine) {
    // APNs that nobody answers: deliveries stay queued (retrying), so the purge has some to take.
    let app = TestApp::spawn_with(engine, |c| {
        let fixture = |name: &str| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures")
                .join(name)
        };
        c.apps.push(herald::providers::AppConfig {
            id: "com.example.app".into(),
            apns: Some(herald::providers::ApnsAppConfig {
                key_file: fixture("test-apns-AuthKey_TEST000001.p8"),
                key_id: herald::fakes::apns::TEST_KEY_ID.into(),
                team_id: herald::fakes::apns::TEST_TEAM_ID.into(),
                topic: None,
                production_url: "http://127.0.0.1:1".into(),
                sandbox_url: "http://127.0.0.1:1".into(),
                ca_file: None,
            }),
            fcm: None,
        });
        c.dispatch.backoff_base_ms = 60_000;
    })
    .await;
    let phone = app
        .register_device("alice", json!({"platform": "apns", "token": apns_token(4)}))
        .await;
    let mut s = Vec::new();
    for i in 0..3 {
        let p = publish(
            &app,
            json!({"userId": "alice", "type": "news.item", "data": {"i": i}}),
        )
        .await;
        s.push(p["seq"].as_i64().unwrap());
    }
    publish(&app, json!({"userId": "bob", "type": "news.item"})).await;
    assert_eq!(ack(&app, "alice", &phone, s[0]).await.status(), 204);
    assert!(app.store.pending_deliveries().await.unwrap() > 0);

    // Nothing is older than yesterday.
    let yesterday = chrono::Utc::now() - chrono::Duration::days(1);
    assert_eq!(app.store.purge(yesterday).await.unwrap(), 0);
    assert_eq!(app.sync_after("alice", 0, 100).await.0.len(), 3);

    // A cutoff in the future makes everything old.
    let soon = chrono::Utc::now() + chrono::Duration::minutes(1);
    assert!(app.store.purge(soon).await.unwrap() >= 4, "four updates");
    assert_eq!(
        app.sync_page("alice", "").await,
        json!({"updates": [], "lastSeq": 0, "hasMore": false})
    );
    assert_eq!(
        app.sync_page("alice", &format!("after={}", s[0])).await,
        json!({"updates": [], "lastSeq": s[0], "hasMore": false})
    );
    assert!(app.sync_after("bob", 0, 100).await.0.is_empty());
    let phone_id = phone["id"].as_str().unwrap();
    assert_eq!(unseen(&app, "alice").await[phone_id], 0);
    assert_eq!(
        app.store.pending_deliveries().await.unwrap(),
        0,
        "deliveries of purged updates go with them"
    );

    // A purge never lets seq go back: an app's cursor stays valid.
    let next = publish(&app, json!({"userId": "alice", "type": "news.item"})).await;
    assert!(next["seq"].as_i64().unwrap() > s[2]);
    let (log, last) = app.sync_after("alice", s[2], 100).await;
    assert_eq!(log.len(), 1);
    assert_eq!(last, next["seq"].as_i64().unwrap());
    assert_eq!(unseen(&app, "alice").await[phone_id], 1);
}

both_engines!(
    offline_app_syncs_exactly_what_it_missed,
    pages_report_last_seq_and_has_more,
    ack_moves_each_device_cursor_forward,
    events_reach_their_user_only,
    rejected_events_store_nothing,
    retention_purges_old_updates,
);
