//! `/v1/devices` over HTTP, on both engines.

mod common;

use common::{Engine, TestApp, apns_token, error_fields, expect_problem};
use herald::providers::AppConfig;
use reqwest::Method;
use serde_json::{Value, json};

fn iphone(n: u32) -> Value {
    json!({"platform": "apns", "token": apns_token(n), "environment": "sandbox",
           "appId": "com.example.app", "locale": "en-US", "appVersion": "2.3.1"})
}

fn with_apps(config: &mut herald::config::Config) {
    for id in ["com.example.app", "com.example.other"] {
        config.apps.push(AppConfig {
            id: id.into(),
            apns: None,
            fcm: None,
        });
    }
}

async fn register_then_refresh(engine: Engine) {
    let app = TestApp::spawn_with(engine, with_apps).await;
    let first = app.post("/v1/devices", "alice", iphone(1)).await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["platform"], "apns");
    assert_eq!(first["environment"], "sandbox");
    assert_eq!(first["appId"], "com.example.app");
    assert_eq!(first["status"], "active");
    assert!(first["invalidReason"].is_null() && first["lastPushAt"].is_null());
    assert_eq!(
        uuid::Uuid::parse_str(first["id"].as_str().unwrap())
            .unwrap()
            .get_version_num(),
        7
    );

    let mut changed = iphone(1);
    changed["appVersion"] = json!("2.4.0");
    let second = app.post("/v1/devices", "alice", changed).await;
    assert_eq!(second.status(), 200);
    let second: Value = second.json().await.unwrap();
    assert_eq!(second["id"], first["id"]);
    assert_eq!(second["appVersion"], "2.4.0");
    assert_eq!(second["createdAt"], first["createdAt"]);

    let listed = app.devices("alice").await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["appVersion"], "2.4.0");
    assert!(app.devices("bob").await.is_empty());
}

async fn defaults_apply(engine: Engine) {
    let app = TestApp::spawn_with(engine, with_apps).await;
    let dev = app
        .register_device("alice", json!({"platform": "apns", "token": apns_token(2)}))
        .await;
    assert_eq!(dev["environment"], "production");
    assert_eq!(
        dev["appId"], "com.example.app",
        "the first configured app is the default"
    );
    let fcm = app
        .register_device(
            "alice",
            json!({"platform": "fcm", "token": "fcm:tok-1_2.3", "appId": "com.example.other"}),
        )
        .await;
    assert!(fcm["environment"].is_null());
    assert_eq!(fcm["appId"], "com.example.other");
}

async fn token_moves_to_the_new_user(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    app.register_device("alice", iphone(3)).await;
    let moved = app.post("/v1/devices", "bob", iphone(3)).await;
    assert_eq!(moved.status(), 201);
    assert!(app.devices("alice").await.is_empty());
    assert_eq!(app.devices("bob").await.len(), 1);
}

async fn invalid_token_becomes_active_again(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let dev = app.register_device("alice", iphone(4)).await;
    let id = uuid::Uuid::parse_str(dev["id"].as_str().unwrap()).unwrap();
    assert!(
        app.store
            .invalidate_device(id, "BadDeviceToken", None)
            .await
            .unwrap()
    );
    let listed = app.devices("alice").await;
    assert_eq!(listed[0]["status"], "invalid");
    assert_eq!(listed[0]["invalidReason"], "BadDeviceToken");
    let again = app.post("/v1/devices", "alice", iphone(4)).await;
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["status"], "active");
    assert!(again["invalidReason"].is_null());
}

async fn validation_names_each_field_and_changes_nothing(engine: Engine) {
    let app = TestApp::spawn_with(engine, with_apps).await;
    app.register_device("alice", iphone(5)).await;
    let before = app.fingerprint().await;
    let long_version = "x".repeat(65);
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (json!({}), vec!["platform", "token"]),
        (json!({"platform": "web", "token": "abc"}), vec!["platform"]),
        (json!({"platform": "apns", "token": "abc"}), vec!["token"]),
        (
            json!({"platform": "apns", "token": format!("{}a", apns_token(5))}),
            vec!["token"],
        ),
        (
            json!({"platform": "apns", "token": "zz".repeat(32)}),
            vec!["token"],
        ),
        (
            json!({"platform": "apns", "token": "ab".repeat(101)}),
            vec!["token"],
        ),
        (
            json!({"platform": "fcm", "token": "has space"}),
            vec!["token"],
        ),
        (
            json!({"platform": "fcm", "token": "a".repeat(4097)}),
            vec!["token"],
        ),
        (json!({"platform": "fcm", "token": ""}), vec!["token"]),
        (json!({"platform": "apns", "token": 42}), vec!["token"]),
        (
            json!({"platform": "apns", "token": apns_token(6), "environment": "staging"}),
            vec!["environment"],
        ),
        (
            json!({"platform": "fcm", "token": "abc", "environment": "sandbox"}),
            vec!["environment"],
        ),
        (
            json!({"platform": "apns", "token": apns_token(6), "appId": "com.unknown"}),
            vec!["appId"],
        ),
        (
            json!({"platform": "apns", "token": apns_token(6), "locale": "en US"}),
            vec!["locale"],
        ),
        (
            json!({"platform": "apns", "token": apns_token(6), "appVersion": long_version}),
            vec!["appVersion"],
        ),
        // The existing device, refreshed with one bad field, must not be refreshed either.
        (
            json!({"platform": "apns", "token": apns_token(5), "locale": "!!"}),
            vec!["locale"],
        ),
    ];
    for (body, fields) in cases {
        let problem =
            expect_problem(app.post("/v1/devices", "alice", body.clone()).await, 422).await;
        assert_eq!(error_fields(&problem), fields, "body {body}");
    }
    assert_eq!(
        app.fingerprint().await,
        before,
        "rejected requests changed the database"
    );
}

async fn malformed_bodies_are_problems_and_change_nothing(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    app.register_device("alice", iphone(7)).await;
    let before = app.fingerprint().await;
    let token = app.token("alice");
    let send = |body: Vec<u8>, content_type: &'static str| {
        app.client
            .post(app.url("/v1/devices"))
            .bearer_auth(&token)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    expect_problem(
        send(b"{\"platform\": ".to_vec(), "application/json")
            .await
            .unwrap(),
        400,
    )
    .await;
    expect_problem(
        send(b"[1,2]".to_vec(), "application/json").await.unwrap(),
        422,
    )
    .await;
    expect_problem(
        send(
            b"platform=apns".to_vec(),
            "application/x-www-form-urlencoded",
        )
        .await
        .unwrap(),
        415,
    )
    .await;
    let mut big = serde_json::to_vec(&iphone(8)).unwrap();
    big.truncate(big.len() - 1);
    big.extend(format!(", \"pad\": \"{}\"}}", "x".repeat(70 * 1024)).bytes());
    expect_problem(send(big, "application/json").await.unwrap(), 413).await;
    assert_eq!(app.fingerprint().await, before);
}

async fn delete_answers_404_for_anything_not_yours(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let dev = app.register_device("alice", iphone(9)).await;
    let path = format!("/v1/devices/{}", dev["id"].as_str().unwrap());
    expect_problem(
        app.call(Method::DELETE, &path, Some("bob"), None).await,
        404,
    )
    .await;
    expect_problem(
        app.call(
            Method::DELETE,
            "/v1/devices/not-a-uuid",
            Some("alice"),
            None,
        )
        .await,
        404,
    )
    .await;
    let gone = app.call(Method::DELETE, &path, Some("alice"), None).await;
    assert_eq!(gone.status(), 204);
    expect_problem(
        app.call(Method::DELETE, &path, Some("alice"), None).await,
        404,
    )
    .await;
    assert!(app.devices("alice").await.is_empty());
}

async fn auth_is_required_and_checked(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let before = app.fingerprint().await;
    let missing = app
        .call(Method::POST, "/v1/devices", None, Some(iphone(10)))
        .await;
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    expect_problem(missing, 401).await;
    for bad in ["garbage", "a.b.c", "Basic dXNlcjpwYXNz"] {
        let response = app
            .client
            .get(app.url("/v1/devices"))
            .header("authorization", format!("Bearer {bad}"))
            .send()
            .await
            .unwrap();
        expect_problem(response, 401).await;
    }
    let other_secret = herald::auth::mint_hs256(
        &herald::config::Secret::new("another-secret-another-secret-00"),
        "alice",
        None,
        std::time::Duration::from_secs(60),
        None,
        None,
    )
    .unwrap();
    let response = app
        .client
        .get(app.url("/v1/devices"))
        .bearer_auth(other_secret)
        .send()
        .await
        .unwrap();
    expect_problem(response, 401).await;
    assert_eq!(app.fingerprint().await, before);
}

both_engines!(
    register_then_refresh,
    defaults_apply,
    token_moves_to_the_new_user,
    invalid_token_becomes_active_again,
    validation_names_each_field_and_changes_nothing,
    malformed_bodies_are_problems_and_change_nothing,
    delete_answers_404_for_anything_not_yours,
    auth_is_required_and_checked,
);
