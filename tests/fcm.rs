//! The real FCM sender against the fake FCM (+ OAuth endpoint) over real loopback sockets.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use herald::fakes::fcm::{Behaviour, FakeFcm, FakeFcmOptions, TokenFailure};
use herald::providers::fcm::{FcmSender, FcmSetupError};
use herald::providers::{FcmAppConfig, PushOutcome};
use serde_json::json;

#[path = "fcm/support.rs"]
mod support;
use support::*;

#[tokio::test]
async fn success_over_tls_uses_http2_and_sends_the_full_message() {
    bounded(async {
        let (fake, sender) = start(true).await;
        let mut req = push("device-a");
        req.high_priority = true;
        req.ttl = Some(Duration::from_secs(600));
        req.collapse_key = Some("job-42".into());
        req.apns_headers = BTreeMap::from([("apns-topic".into(), "com.example.app".into())]);
        match sender.send(req.clone()).await {
            PushOutcome::Delivered { provider_id } => {
                assert!(
                    provider_id
                        .unwrap()
                        .starts_with("projects/herald-test/messages/0:")
                )
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(fake.token_requests(), 1);
        let seen = fake.requests();
        assert_eq!(seen.len(), 1);
        let r = &seen[0];
        assert_eq!(r.version, http::Version::HTTP_2);
        assert!(r.authorized);
        assert_eq!(r.path, "/v1/projects/herald-test/messages:send");
        assert_eq!(r.device_token.as_deref(), Some("device-a"));
        assert!(!r.validate_only);
        let m = &r.body["message"];
        assert_eq!(m["data"], json!({"jobId": "42"}));
        assert_eq!(m["notification"]["title"], "Export ready");
        assert_eq!(
            m["android"],
            json!({"priority": "HIGH", "ttl": "600s", "collapse_key": "job-42"})
        );
        assert_eq!(m["apns"]["headers"]["apns-priority"], "10");
        assert_eq!(m["apns"]["headers"]["apns-push-type"], "alert");
        assert_eq!(m["apns"]["headers"]["apns-collapse-id"], "job-42");
        assert_eq!(m["apns"]["headers"]["apns-topic"], "com.example.app");
    })
    .await;
}

#[tokio::test]
async fn success_over_plain_http_uses_h2c() {
    bounded(async {
        let (fake, sender) = start(false).await;
        let outcome = sender.send(push("device-a")).await;
        assert!(
            matches!(
                outcome,
                PushOutcome::Delivered {
                    provider_id: Some(_)
                }
            ),
            "{outcome:?}"
        );
        assert_eq!(fake.requests()[0].version, http::Version::HTTP_2);
    })
    .await;
}

#[tokio::test]
async fn validate_only_is_honoured() {
    bounded(async {
        let (fake, sender) = start(false).await;
        let mut req = push("device-a");
        req.validate_only = true;
        assert_eq!(
            sender.send(req.clone()).await,
            PushOutcome::Delivered {
                provider_id: Some("projects/herald-test/messages/fake_message_id".into())
            }
        );
        assert!(fake.requests()[0].validate_only);
    })
    .await;
}

#[tokio::test]
async fn every_error_class_end_to_end() {
    bounded(async {
        let (fake, sender) = start(true).await;
        let secs = |s| Some(Duration::from_secs(s));
        let raw = |status: u16, body: &str, retry_after: Option<&str>| Behaviour::Raw {
            status,
            body: body.into(),
            retry_after: retry_after.map(str::to_owned),
        };
        let unknown_code = json!({"error": {"code": 400, "message": "new", "status": "INVALID_ARGUMENT",
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "SOMETHING_NEW"}]}})
        .to_string();
        type Check = fn(&PushOutcome) -> bool;
        let cases: Vec<(Behaviour, &str, Check)> = vec![
            (Behaviour::Unregistered, "UNREGISTERED (404)", |o| matches!(o, PushOutcome::InvalidToken { since: None, .. })),
            (Behaviour::InvalidToken, "INVALID_ARGUMENT (400): The registration token", |o| matches!(o, PushOutcome::InvalidToken { .. })),
            (Behaviour::SenderIdMismatch, "SENDER_ID_MISMATCH (403)", |o| matches!(o, PushOutcome::InvalidToken { .. })),
            (Behaviour::ThirdPartyAuthError, "THIRD_PARTY_AUTH_ERROR (401)", |o| matches!(o, PushOutcome::Misconfigured { .. })),
            (Behaviour::Internal, "INTERNAL (500)", |o| matches!(o, PushOutcome::Retry { .. })),
            (Behaviour::Unavailable { retry_after: None }, "UNAVAILABLE (503)", |o| matches!(o, PushOutcome::Retry { .. })),
            (Behaviour::QuotaExceeded { retry_after: None }, "QUOTA_EXCEEDED (429)", |o| matches!(o, PushOutcome::Retry { .. })),
            (raw(400, &unknown_code, None), "SOMETHING_NEW (400)", |o| matches!(o, PushOutcome::Permanent { .. })),
            (raw(418, "I'm a teapot", None), "HTTP (418)", |o| matches!(o, PushOutcome::Permanent { .. })),
            (raw(502, "<html>bad gateway</html>", None), "HTTP (502)", |o| matches!(o, PushOutcome::Retry { .. })),
        ];
        for (i, (behaviour, reason_prefix, check)) in cases.into_iter().enumerate() {
            let token = format!("device-{i}");
            fake.script(&token, behaviour.clone());
            let outcome = sender.send(push(&token)).await;
            assert!(check(&outcome), "{behaviour:?} → {outcome:?}");
            let reason = reason_of(&outcome);
            assert!(reason.starts_with(reason_prefix), "{behaviour:?} → {reason}");
        }
        // Retry-After surfaced when given; FCM's documented floors otherwise.
        let cases = [
            (Behaviour::QuotaExceeded { retry_after: Some(7) }, secs(7)),
            (Behaviour::QuotaExceeded { retry_after: None }, secs(60)),
            (Behaviour::Unavailable { retry_after: Some(2) }, secs(2)),
            (Behaviour::Unavailable { retry_after: None }, secs(10)),
            (Behaviour::Internal, secs(10)),
            (raw(503, "", Some("4")), secs(4)),
        ];
        for (behaviour, expected) in cases {
            fake.script("device-r", behaviour.clone());
            match sender.send(push("device-r")).await {
                PushOutcome::Retry { retry_after, .. } => assert_eq!(retry_after, expected, "{behaviour:?}"),
                o => panic!("{behaviour:?} → {o:?}"),
            }
        }
        // One token for all of it.
        assert_eq!(fake.token_requests(), 1);
    })
    .await;
}

#[tokio::test]
async fn scripted_sequence_then_recovery() {
    bounded(async {
        let (fake, sender) = start(false).await;
        fake.script_sequence(
            "device-a",
            vec![
                Behaviour::Unavailable {
                    retry_after: Some(1),
                },
                Behaviour::Success,
            ],
        );
        assert!(matches!(
            sender.send(push("device-a")).await,
            PushOutcome::Retry { .. }
        ));
        assert!(matches!(
            sender.send(push("device-a")).await,
            PushOutcome::Delivered { .. }
        ));
        assert!(matches!(
            sender.send(push("device-a")).await,
            PushOutcome::Delivered { .. }
        ));
    })
    .await;
}

#[tokio::test]
async fn bad_messages_are_permanent() {
    bounded(async {
        let (fake, sender) = start(false).await;
        // Refused before sending: reserved data key.
        let mut req = push("device-a");
        req.data.insert("google.sent_time".into(), "1".into());
        match sender.send(req.clone()).await {
            PushOutcome::Permanent { reason } => {
                assert!(reason.contains("google.sent_time"), "{reason}")
            }
            o => panic!("{o:?}"),
        }
        assert!(fake.requests().is_empty());
        assert_eq!(fake.token_requests(), 0);
        // Refused by FCM: payload over 4096 bytes.
        let mut req = push("device-a");
        req.data.insert("blob".into(), "x".repeat(5000));
        match sender.send(req.clone()).await {
            PushOutcome::Permanent { reason } => {
                assert!(reason.starts_with("INVALID_ARGUMENT (400)"), "{reason}")
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(fake.requests()[0].status, 400);
    })
    .await;
}

#[tokio::test]
async fn revoked_token_is_refreshed_once_then_succeeds() {
    bounded(async {
        let (fake, sender) = start(true).await;
        assert!(matches!(
            sender.send(push("device-a")).await,
            PushOutcome::Delivered { .. }
        ));
        fake.revoke_tokens();
        assert!(matches!(
            sender.send(push("device-a")).await,
            PushOutcome::Delivered { .. }
        ));
        assert_eq!(fake.token_requests(), 2);
        let statuses: Vec<u16> = fake.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [200, 401, 200]);
    })
    .await;
}

#[tokio::test]
async fn second_401_is_misconfigured() {
    bounded(async {
        let (fake, sender) = start(false).await;
        let body = json!({"error": {"code": 401, "message": "Request had invalid authentication credentials.",
            "status": "UNAUTHENTICATED"}});
        fake.script("device-a", Behaviour::Raw { status: 401, body: body.to_string(), retry_after: None });
        match sender.send(push("device-a")).await {
            PushOutcome::Misconfigured { reason } => assert!(reason.contains("again after refreshing"), "{reason}"),
            o => panic!("{o:?}"),
        }
        assert_eq!(fake.token_requests(), 2);
        assert_eq!(fake.requests().len(), 2);
    })
    .await;
}

#[tokio::test]
async fn concurrent_sends_share_one_token_fetch() {
    bounded(async {
        let (fake, sender) = start(true).await;
        fake.set_token_delay(Duration::from_millis(200));
        let sends = (0..16).map(|i| send_owned(&sender, push(&format!("device-{i}"))));
        let outcomes = futures::future::join_all(sends).await;
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, PushOutcome::Delivered { .. })),
            "{outcomes:?}"
        );
        assert_eq!(fake.token_requests(), 1);

        // Revoked under load: every send sees 401, yet only one refresh happens.
        fake.revoke_tokens();
        let sends = (0..8).map(|i| send_owned(&sender, push(&format!("device-{i}"))));
        let outcomes = futures::future::join_all(sends).await;
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, PushOutcome::Delivered { .. })),
            "{outcomes:?}"
        );
        assert_eq!(fake.token_requests(), 2);
    })
    .await;
}

#[tokio::test]
async fn token_is_refreshed_before_it_expires() {
    bounded(async {
        let (fake, sender) = start(false).await;
        // A 2 s token is refreshed after half its life (the 5-minute margin doesn't fit).
        fake.set_token_lifetime(Duration::from_secs(2));
        assert!(matches!(
            sender.send(push("device-a")).await,
            PushOutcome::Delivered { .. }
        ));
        assert!(matches!(
            sender.send(push("device-a")).await,
            PushOutcome::Delivered { .. }
        ));
        assert_eq!(fake.token_requests(), 1);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        // Due for refresh but still valid: one send refreshes, the others keep the old token
        // rather than queue behind the (slow) fetch.
        fake.set_token_delay(Duration::from_millis(300));
        let sends = (0..4).map(|_| send_owned(&sender, push("device-a")));
        let outcomes = futures::future::join_all(sends).await;
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, PushOutcome::Delivered { .. })),
            "{outcomes:?}"
        );
        assert_eq!(fake.token_requests(), 2);
        // Refreshed proactively: FCM never had to refuse a token.
        assert!(fake.requests().iter().all(|r| r.status == 200));
    })
    .await;
}

#[tokio::test]
async fn token_endpoint_refusals_are_misconfigured() {
    bounded(async {
        let (fake, sender) = start(false).await;
        fake.fail_token_requests(Some(TokenFailure::InvalidGrant));
        match sender.send(push("device-a")).await {
            PushOutcome::Misconfigured { reason } => {
                assert!(reason.contains("invalid_grant"), "{reason}")
            }
            o => panic!("{o:?}"),
        }
        assert!(fake.requests().is_empty());

        // A real refusal: the fake checks iss against the service account's client_email.
        let key =
            key_file_with(json!({"client_email": "intruder@herald-test.iam.gserviceaccount.com"}));
        fake.fail_token_requests(None);
        let mut cfg = config(&fake);
        cfg.service_account_file = key.path().to_owned();
        let sender = FcmSender::new("com.example.app", &cfg).unwrap();
        match sender.send(push("device-a")).await {
            PushOutcome::Misconfigured { reason } => {
                assert!(reason.contains("invalid_grant"), "{reason}")
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(fake.tokens_issued(), 0);
    })
    .await;
}

#[tokio::test]
async fn token_endpoint_outages_are_retried() {
    bounded(async {
        let (fake, sender) = start(false).await;
        fake.fail_token_requests(Some(TokenFailure::Unavailable));
        match sender.send(push("device-a")).await {
            PushOutcome::Retry {
                retry_after,
                reason,
            } => {
                assert_eq!(retry_after, Some(Duration::from_secs(5)));
                assert!(reason.contains("503"), "{reason}");
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(fake.token_requests(), 1);
        // Sends queued behind a failing fetch share its failure instead of each fetching again.
        fake.set_token_delay(Duration::from_millis(200));
        let sends = (0..8).map(|_| send_owned(&sender, push("device-a")));
        let outcomes = futures::future::join_all(sends).await;
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, PushOutcome::Retry { .. })),
            "{outcomes:?}"
        );
        assert_eq!(fake.token_requests(), 2);
        fake.set_token_delay(Duration::ZERO);
        fake.fail_token_requests(None);
        assert!(matches!(
            sender.send(push("device-a")).await,
            PushOutcome::Delivered { .. }
        ));

        let mut cfg = config(&fake);
        cfg.token_uri = Some(format!("http://127.0.0.1:{}/token", closed_port().await));
        let sender = FcmSender::new("com.example.app", &cfg).unwrap();
        match sender.send(push("device-a")).await {
            PushOutcome::Retry {
                retry_after: None,
                reason,
            } => assert!(reason.starts_with("oauth: connect error"), "{reason}"),
            o => panic!("{o:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn transport_failures_are_retried() {
    bounded(async {
        let (fake, sender) = start(false).await;
        // Timeout: the fake holds the answer longer than the sender waits.
        fake.script(
            "slow",
            Behaviour::Delay(Duration::from_secs(3), Box::new(Behaviour::Success)),
        );
        let sender = sender.with_request_timeout(Duration::from_millis(200));
        match sender.send(push("slow")).await {
            PushOutcome::Retry {
                retry_after: None,
                reason,
            } => assert!(reason.starts_with("timeout"), "{reason}"),
            o => panic!("{o:?}"),
        }
        // A short delay is just a slow success.
        fake.script(
            "slowish",
            Behaviour::Delay(Duration::from_millis(50), Box::new(Behaviour::Success)),
        );
        assert!(matches!(
            sender.send(push("slowish")).await,
            PushOutcome::Delivered { .. }
        ));

        // Connection refused once the fake is gone.
        fake.shutdown().await;
        match sender.send(push("device-a")).await {
            PushOutcome::Retry {
                retry_after: None, ..
            } => {}
            o => panic!("{o:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn wrong_project_or_url_is_misconfigured() {
    bounded(async {
        let fake = FakeFcm::start(FakeFcmOptions {
            project_id: "another-project".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let sender = FcmSender::new("com.example.app", &config(&fake)).unwrap();
        match sender.send(push("device-a")).await {
            PushOutcome::Misconfigured { reason } => {
                assert!(reason.starts_with("PERMISSION_DENIED (403)"), "{reason}")
            }
            o => panic!("{o:?}"),
        }
        let mut cfg = config(&fake);
        cfg.base_url = format!("{}/not-fcm", fake.base_url());
        let sender = FcmSender::new("com.example.app", &cfg).unwrap();
        assert!(matches!(
            sender.send(push("device-a")).await,
            PushOutcome::Misconfigured { .. }
        ));
    })
    .await;
}

#[tokio::test]
async fn token_uri_comes_from_the_key_file_unless_overridden() {
    bounded(async {
        let fake = FakeFcm::start(FakeFcmOptions {
            tls: true,
            ..Default::default()
        })
        .await
        .unwrap();
        let key = key_file_with(json!({"token_uri": fake.token_uri()}));
        let mut cfg = config(&fake);
        cfg.service_account_file = key.path().to_owned();
        cfg.token_uri = None;
        let sender = FcmSender::new("com.example.app", &cfg).unwrap();
        assert!(matches!(
            sender.send(push("device-a")).await,
            PushOutcome::Delivered { .. }
        ));
        assert_eq!(fake.token_requests(), 1);
    })
    .await;
}

#[tokio::test]
async fn tls_needs_the_test_ca() {
    bounded(async {
        let fake = FakeFcm::start(FakeFcmOptions {
            tls: true,
            ..Default::default()
        })
        .await
        .unwrap();
        let mut cfg = config(&fake);
        cfg.ca_file = None;
        let sender = FcmSender::new("com.example.app", &cfg).unwrap();
        // The token endpoint's certificate is not trusted: nothing reaches the fake's handlers.
        assert!(matches!(
            sender.send(push("device-a")).await,
            PushOutcome::Retry { .. }
        ));
        assert_eq!(fake.token_requests(), 0);
    })
    .await;
}

#[test]
fn setup_errors_name_the_file_and_field_never_the_key() {
    let fake_cfg = |path: PathBuf| FcmAppConfig {
        service_account_file: path,
        base_url: "https://fcm.googleapis.com".into(),
        token_uri: None,
        ca_file: None,
    };
    let err = FcmSender::new("a", &fake_cfg("/nonexistent/key.json".into())).unwrap_err();
    assert!(matches!(err, FcmSetupError::Read { .. }));
    assert!(err.to_string().contains("/nonexistent/key.json"));

    let key = key_file_with(json!({"private_key": null}));
    let err = FcmSender::new("a", &fake_cfg(key.path().into())).unwrap_err();
    assert!(err.to_string().contains("`private_key`"), "{err}");

    let secret = "-----BEGIN PRIVATE KEY-----\nTOPSECRETMATERIAL\n-----END PRIVATE KEY-----\n";
    let key = key_file_with(json!({"private_key": secret}));
    let err = FcmSender::new("a", &fake_cfg(key.path().into())).unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(
        shown.contains("private_key") && !shown.contains("TOPSECRET"),
        "{shown}"
    );

    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), r#"{"private_key": ["TOPSECRET"]}"#).unwrap();
    let err = FcmSender::new("a", &fake_cfg(file.path().into())).unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(
        matches!(err, FcmSetupError::Parse { .. }) && !shown.contains("TOPSECRET"),
        "{shown}"
    );

    let mut cfg = fake_cfg(SERVICE_ACCOUNT.into());
    cfg.base_url = "fcm.googleapis.com".into();
    assert!(matches!(
        FcmSender::new("a", &cfg),
        Err(FcmSetupError::BadUrl {
            field: "base_url",
            ..
        })
    ));

    let sender = FcmSender::new("a", &fake_cfg(SERVICE_ACCOUNT.into())).unwrap();
    assert_eq!(sender.project_id(), "herald-test");
    assert!(!format!("{sender:?}").contains("PRIVATE"));
}

#[tokio::test]
async fn fake_checks_credentials_and_binds_only_loopback() {
    bounded(async {
        let err = FakeFcm::start_on("0.0.0.0:0".parse().unwrap(), FakeFcmOptions::default()).await;
        assert!(err.is_err());
        let fake = FakeFcm::start(FakeFcmOptions::default()).await.unwrap();
        let client = reqwest::Client::new();
        let url = format!("{}/v1/projects/herald-test/messages:send", fake.base_url());
        let body = json!({"message": {"token": "t"}});
        // No token, then a token the fake never issued.
        let r = client.post(&url).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let r = client
            .post(&url)
            .bearer_auth("ya29.made-up")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        // A token request with a garbage assertion.
        let r = client
            .post(fake.token_uri())
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", "a.b.c"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"], "invalid_grant");
        assert_eq!(fake.tokens_issued(), 0);
        assert_eq!(fake.requests().len(), 2);
        assert!(fake.requests().iter().all(|r| !r.authorized));
    })
    .await;
}
