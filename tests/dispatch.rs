//! Dispatch end to end over real sockets: jobs → update log → outbox → fake APNs / fake FCM.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Engine, TestApp, apns_token};
use herald::fakes::apns::{Behaviour as ApnsBehaviour, FakeApns, FakeApnsHandle, FakeApnsOptions};
use herald::fakes::fcm::{Behaviour as FcmBehaviour, FakeFcm, FakeFcmHandle, FakeFcmOptions};
use herald::providers::{ApnsAppConfig, AppConfig, FcmAppConfig};
use serde_json::{Value, json};

const APP: &str = "com.example.app";
const ANDROID: &str = "android-token-1:abc";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

struct World {
    app: TestApp,
    apns: FakeApnsHandle,
    fcm: FakeFcmHandle,
}

async fn world(engine: Engine) -> World {
    world_with(engine, |_| {}).await
}

async fn world_with(engine: Engine, tweak: impl FnOnce(&mut herald::config::Config)) -> World {
    let apns = FakeApns::start(FakeApnsOptions::default()).await.unwrap();
    let fcm = FakeFcm::start(FakeFcmOptions::default()).await.unwrap();
    let (apns_url, fcm_base, token_uri) = (apns.url(), fcm.base_url(), fcm.token_uri());
    let app = TestApp::spawn_with(engine, move |c| {
        c.apps.push(AppConfig {
            id: APP.into(),
            apns: Some(ApnsAppConfig {
                key_file: fixture("test-apns-AuthKey_TEST000001.p8"),
                key_id: herald::fakes::apns::TEST_KEY_ID.into(),
                team_id: herald::fakes::apns::TEST_TEAM_ID.into(),
                topic: None,
                production_url: apns_url.clone(),
                sandbox_url: apns_url,
                ca_file: Some(fixture("test-ca.pem")),
            }),
            fcm: Some(FcmAppConfig {
                service_account_file: fixture("test-fcm-service-account.json"),
                base_url: fcm_base,
                token_uri: Some(token_uri),
                ca_file: None,
            }),
        });
        c.dispatch.backoff_base_ms = 20;
        c.dispatch.backoff_max_ms = 100;
        c.dispatch.poll_interval_ms = 200;
        tweak(c);
    })
    .await;
    World { app, apns, fcm }
}

async fn register_phones(w: &World, user: &str) -> (Value, Value) {
    let iphone = w
        .app
        .register_device(
            user,
            json!({"platform": "apns", "token": apns_token(1), "environment": "sandbox"}),
        )
        .await;
    let android = w
        .app
        .register_device(user, json!({"platform": "fcm", "token": ANDROID}))
        .await;
    (iphone, android)
}

/// Wait until `check` holds, polling the fakes' records.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn apns_bodies(fake: &FakeApnsHandle, token: &str) -> Vec<(Value, http::HeaderMap, u16)> {
    fake.requests()
        .into_iter()
        .filter(|r| r.device_token.as_deref() == Some(token))
        .map(|r| {
            (
                serde_json::from_slice(&r.body).unwrap_or(Value::Null),
                r.headers,
                r.status,
            )
        })
        .collect()
}

fn fcm_messages(fake: &FakeFcmHandle, token: &str) -> Vec<(Value, u16)> {
    fake.requests()
        .into_iter()
        .filter(|r| r.device_token.as_deref() == Some(token))
        .map(|r| (r.body["message"].clone(), r.status))
        .collect()
}

fn completed(messages: &[(Value, http::HeaderMap, u16)]) -> Option<(Value, http::HeaderMap)> {
    messages
        .iter()
        .find(|(b, _, s)| *s == 200 && b["type"] == "job.completed")
        .map(|(b, h, _)| (b.clone(), h.clone()))
}

async fn a_job_reaches_the_iphone_and_the_android(engine: Engine) {
    let w = world(engine).await;
    let (iphone, android) = register_phones(&w, "alice").await;
    let id = w
        .app
        .submit("alice", json!({"kind": "echo", "input": {"x": 1}, "notify": {"title": "Report ready", "body": "Tap to open"}}))
        .await;
    let iphone_token = iphone["token"].as_str().unwrap().to_string();
    eventually("the completion push on APNs", || {
        completed(&apns_bodies(&w.apns, &iphone_token)).is_some()
    })
    .await;
    eventually("the completion push on FCM", || {
        fcm_messages(&w.fcm, ANDROID)
            .iter()
            .any(|(m, s)| *s == 200 && m["data"]["type"] == "job.completed")
    })
    .await;

    let (body, headers) = completed(&apns_bodies(&w.apns, &iphone_token)).unwrap();
    assert_eq!(headers["apns-push-type"], "alert");
    assert_eq!(headers["apns-priority"], "10");
    assert_eq!(headers["apns-topic"], APP);
    assert_eq!(headers["apns-collapse-id"], id.as_str());
    assert!(headers.contains_key("apns-expiration"));
    assert_eq!(body["aps"]["alert"]["title"], "Report ready");
    assert_eq!(body["aps"]["thread-id"], id.as_str());
    assert_eq!(body["trackingId"], id.as_str());
    assert_eq!(body["data"]["result"], json!({"x": 1}));
    let seq = body["seq"].as_i64().unwrap();
    let log = w.app.updates("alice").await;
    assert_eq!(
        log.iter().find(|u| u.kind == "job.completed").unwrap().seq,
        seq
    );

    // The processing update went out as a background push.
    let background = apns_bodies(&w.apns, &iphone_token)
        .into_iter()
        .find(|(b, _, _)| b["type"] == "job.processing")
        .expect("processing push");
    assert_eq!(background.1["apns-push-type"], "background");
    assert_eq!(background.1["apns-priority"], "5");
    assert_eq!(background.0["aps"]["content-available"], 1);

    let fcm = fcm_messages(&w.fcm, ANDROID);
    let (message, _) = fcm
        .iter()
        .find(|(m, _)| m["data"]["type"] == "job.completed")
        .unwrap();
    assert_eq!(message["notification"]["title"], "Report ready");
    assert_eq!(message["data"]["trackingId"], id.as_str());
    assert_eq!(message["data"]["seq"], seq.to_string());
    assert_eq!(message["android"]["collapse_key"], id.as_str());
    assert_eq!(message["android"]["priority"], "HIGH");
    assert!(message["android"]["ttl"].as_str().unwrap().ends_with('s'));

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let devices = w.app.devices("alice").await;
        if devices.iter().all(|d| d["lastPushAt"].is_string()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lastPushAt not recorded: {devices:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = android;
}

async fn an_unregistered_token_is_pruned_and_the_other_device_still_served(engine: Engine) {
    let w = world(engine).await;
    let (iphone, _) = register_phones(&w, "alice").await;
    w.fcm.script(ANDROID, FcmBehaviour::Unregistered);
    w.app.submit("alice", json!({"kind": "echo"})).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let devices = w.app.devices("alice").await;
        let android = devices.iter().find(|d| d["platform"] == "fcm").unwrap();
        if android["status"] == "invalid" {
            assert!(
                android["invalidReason"]
                    .as_str()
                    .unwrap()
                    .starts_with("UNREGISTERED")
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "android was not invalidated: {devices:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let android_before = fcm_messages(&w.fcm, ANDROID).len();
    let id = w
        .app
        .submit("alice", json!({"kind": "echo", "input": {"second": true}}))
        .await;
    let iphone_token = iphone["token"].as_str().unwrap().to_string();
    eventually("the iPhone still gets pushes", || {
        apns_bodies(&w.apns, &iphone_token).iter().any(|(b, _, s)| {
            *s == 200 && b["trackingId"] == id.as_str() && b["type"] == "job.completed"
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        fcm_messages(&w.fcm, ANDROID).len(),
        android_before,
        "an invalid device is never targeted again"
    );
    // Nothing is left waiting for the invalid device. The iPhone's last pushes may still be
    // in flight (their Sent outcomes are recorded in batches): they settle within the deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pending = w.app.store.pending_deliveries().await.unwrap();
        if pending <= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{pending} deliveries still open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_503_is_retried_and_delivered_once(engine: Engine) {
    let w = world(engine).await;
    let (iphone, _) = register_phones(&w, "alice").await;
    let token = iphone["token"].as_str().unwrap().to_string();
    w.apns
        .script_seq(&token, [ApnsBehaviour::unavailable(None)]);
    w.apns.script(&token, ApnsBehaviour::Accept);
    let event = w
        .app
        .client
        .post(w.app.url("/v1/events"))
        .bearer_auth(w.app.token_with("shipping-service", Some("events:publish")))
        .json(&json!({"userId": "alice", "type": "order.shipped", "data": {"carrier": "DHL"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(event.status(), 202);
    eventually("a successful retry", || {
        apns_bodies(&w.apns, &token)
            .iter()
            .any(|(b, _, s)| *s == 200 && b["type"] == "order.shipped")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let attempts: Vec<u16> = apns_bodies(&w.apns, &token)
        .into_iter()
        .filter(|(b, _, _)| b["type"] == "order.shipped")
        .map(|(_, _, s)| s)
        .collect();
    assert_eq!(
        attempts,
        [503, 200],
        "one failure, then delivered exactly once"
    );
}

async fn a_push_that_could_outlive_its_lease_is_released_not_sent_twice(engine: Engine) {
    // One sender per provider, a lease of 2 s and 0.4 s per push: of a burst only the first
    // pushes start while half their lease is left. Started later, the rest would still be
    // queued or in flight when the sweep (every 5 s) finds their leases run out and hands them
    // out again: the iPhone would get them twice. Released instead, they are claimed afresh.
    let w = world_with(engine, |c| {
        c.dispatch.concurrency = 1;
        c.dispatch.lease_secs = 2;
    })
    .await;
    let iphone = w
        .app
        .register_device(
            "alice",
            json!({"platform": "apns", "token": apns_token(1), "environment": "sandbox"}),
        )
        .await;
    let token = iphone["token"].as_str().unwrap().to_string();
    w.apns.script(
        &token,
        ApnsBehaviour::Accept.after(Duration::from_millis(400)),
    );
    const BURST: i64 = 16;
    for i in 0..BURST {
        let published = w
            .app
            .client
            .post(w.app.url("/v1/events"))
            .bearer_auth(w.app.token_with("shipping-service", Some("events:publish")))
            .json(&json!({"userId": "alice", "type": "order.updated", "data": {"i": i}}))
            .send()
            .await
            .unwrap();
        assert_eq!(published.status(), 202);
    }
    let sent = || -> Vec<i64> {
        let mut sent: Vec<i64> = apns_bodies(&w.apns, &token)
            .iter()
            .filter(|(_, _, s)| *s == 200)
            .filter_map(|(b, _, _)| b["data"]["i"].as_i64())
            .collect();
        sent.sort_unstable();
        sent
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    while w.app.store.pending_deliveries().await.unwrap() > 0 {
        assert!(
            Instant::now() < deadline,
            "the burst was not delivered: {:?}",
            sent()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A copy sent after its lease ran out would have been claimed again (a second attempt)
    // and sent before the last outcome was recorded.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        sent(),
        (0..BURST).collect::<Vec<_>>(),
        "each update reached the iPhone exactly once"
    );
}

async fn an_old_410_does_not_invalidate_a_fresh_registration(engine: Engine) {
    let w = world(engine).await;
    let (iphone, _) = register_phones(&w, "alice").await;
    let token = iphone["token"].as_str().unwrap().to_string();
    let an_hour_ago = (chrono::Utc::now() - chrono::Duration::hours(1)).timestamp_millis();
    w.apns
        .script(&token, ApnsBehaviour::unregistered(an_hour_ago));
    w.app.submit("alice", json!({"kind": "echo"})).await;
    eventually("the 410 answer", || {
        apns_bodies(&w.apns, &token)
            .iter()
            .any(|(_, _, s)| *s == 410)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let devices = w.app.devices("alice").await;
    let device = devices.iter().find(|d| d["platform"] == "apns").unwrap();
    assert_eq!(
        device["status"], "active",
        "re-registered after Apple's timestamp"
    );
}

async fn deliveries_committed_before_a_crash_are_sent_after_restart(engine: Engine) {
    // A node that never started dispatching: the updates and their deliveries are only in the
    // database, as after a crash between "job completed" and "push sent".
    let db = common::TestDb::new(engine).await;
    {
        let mut config = common::test_config(&db);
        config.dispatch.poll_interval_ms = 200;
        let store = herald::server::open_store(&config).await.unwrap();
        let device = herald::devices::NewDevice {
            platform: herald::devices::Platform::Fcm,
            token: ANDROID.into(),
            environment: None,
            app_id: APP.into(),
            locale: None,
            app_version: None,
        };
        store.upsert_device("alice", &device).await.unwrap();
        for i in 0..3 {
            let update = herald::updates::NewUpdate {
                kind: "order.updated".into(),
                tracking_id: None,
                status: None,
                data: Some(json!({"i": i})),
                notification: None,
            };
            store.publish_event("alice", &update).await.unwrap();
        }
        assert_eq!(store.pending_deliveries().await.unwrap(), 3);
        store.close().await;
    }
    let fcm = FakeFcm::start(FakeFcmOptions::default()).await.unwrap();
    let (base, token_uri) = (fcm.base_url(), fcm.token_uri());
    let app = TestApp::spawn_on(db, move |c| {
        c.apps.push(AppConfig {
            id: APP.into(),
            apns: None,
            fcm: Some(FcmAppConfig {
                service_account_file: fixture("test-fcm-service-account.json"),
                base_url: base,
                token_uri: Some(token_uri),
                ca_file: None,
            }),
        });
    })
    .await;
    eventually("the three pushes", || {
        fcm_messages(&fcm, ANDROID)
            .iter()
            .filter(|(_, s)| *s == 200)
            .count()
            == 3
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.store.pending_deliveries().await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "outcomes not recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

both_engines!(
    a_job_reaches_the_iphone_and_the_android,
    an_unregistered_token_is_pruned_and_the_other_device_still_served,
    a_503_is_retried_and_delivered_once,
    a_push_that_could_outlive_its_lease_is_released_not_sent_twice,
    an_old_410_does_not_invalidate_a_fresh_registration,
    deliveries_committed_before_a_crash_are_sent_after_restart,
);
