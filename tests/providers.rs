//! Several apps in one Herald: each device's `appId` selects its own credentials and topic.

use std::path::PathBuf;

use herald::fakes::apns::{FakeApns, FakeApnsOptions};
use herald::fakes::fcm::{FakeFcm, FakeFcmOptions};
use herald::providers::apns::{ApnsRequest, Environment};
use herald::providers::{ApnsAppConfig, AppConfig, FcmAppConfig, Providers, PushOutcome};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn apns(url: &str, topic: &str) -> ApnsAppConfig {
    ApnsAppConfig {
        key_file: fixture("test-apns-AuthKey_TEST000001.p8"),
        key_id: herald::fakes::apns::TEST_KEY_ID.into(),
        team_id: herald::fakes::apns::TEST_TEAM_ID.into(),
        topic: Some(topic.into()),
        production_url: url.into(),
        sandbox_url: url.into(),
        ca_file: Some(fixture("test-ca.pem")),
    }
}

#[tokio::test]
async fn each_app_uses_its_own_credentials() {
    let fake_apns = FakeApns::start(FakeApnsOptions::default()).await.unwrap();
    let fake_fcm = FakeFcm::start(FakeFcmOptions::default()).await.unwrap();
    let apps = vec![
        AppConfig {
            id: "com.example.one".into(),
            apns: Some(apns(&fake_apns.url(), "com.example.one")),
            fcm: None,
        },
        AppConfig {
            id: "com.example.two".into(),
            apns: Some(apns(&fake_apns.url(), "com.example.two")),
            fcm: Some(FcmAppConfig {
                service_account_file: fixture("test-fcm-service-account.json"),
                base_url: fake_fcm.base_url(),
                token_uri: Some(fake_fcm.token_uri()),
                ca_file: None,
            }),
        },
    ];
    let providers = Providers::from_config(&apps).unwrap();
    assert!(providers.fcm("com.example.one").is_none());
    assert!(providers.fcm("com.example.two").is_some());
    assert!(providers.apns("com.unknown").is_none());

    for app in ["com.example.one", "com.example.two"] {
        let request = ApnsRequest {
            device_token: "ab".repeat(32),
            environment: Environment::Production,
            payload: bytes::Bytes::from_static(br#"{"aps":{"alert":"hi"}}"#),
            ..Default::default()
        };
        let outcome = providers.apns(app).unwrap().send(&request).await;
        assert!(
            matches!(outcome, PushOutcome::Delivered { .. }),
            "{app}: {outcome:?}"
        );
    }
    let topics: Vec<String> = fake_apns
        .requests()
        .iter()
        .filter_map(|r| {
            r.headers
                .get("apns-topic")
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        })
        .collect();
    assert_eq!(topics, ["com.example.one", "com.example.two"]);
}

#[test]
fn bad_credentials_name_the_app_key() {
    let apps = vec![
        AppConfig {
            id: "a".into(),
            apns: None,
            fcm: None,
        },
        AppConfig {
            id: "b".into(),
            apns: Some(ApnsAppConfig {
                key_file: fixture("missing.p8"),
                ..apns("https://127.0.0.1:1", "b")
            }),
            fcm: None,
        },
    ];
    let err = Providers::from_config(&apps)
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.starts_with("apps[1].apns: "), "{err}");
}
