//! The real APNs sender against the fake APNs over real loopback sockets.

#[path = "apns/fake.rs"]
mod fake;
#[path = "apns/support.rs"]
mod support;

use std::time::Duration;

use bytes::Bytes;
use herald::fakes::apns::{Behaviour, FakeApnsOptions, TEST_KEY_ID, TEST_TEAM_ID};
use herald::providers::PushOutcome;
use herald::providers::apns::{
    ApnsSender, Clock, Environment, PayloadContent, PayloadSpec, PushType, build_payload,
};

use support::*;

#[tokio::test]
async fn delivers_over_tls_with_every_header() {
    bounded(async {
        let (fake, sender, clock) = setup(true).await;
        let id = uuid::Uuid::new_v4();
        let mut n = alert(&token(1));
        n.apns_id = Some(id);
        n.expiration = Some(1_900_000_000);
        n.collapse_id = Some("job-42".into());
        let out = sender.send(&n).await;
        assert_eq!(
            out,
            PushOutcome::Delivered {
                provider_id: Some(id.to_string())
            }
        );
        let reqs = fake.requests();
        assert_eq!(reqs.len(), 1);
        let r = &reqs[0];
        assert_eq!((r.method.as_str(), r.status), ("POST", 200));
        assert_eq!(r.path, format!("/3/device/{}", token(1)));
        assert_eq!(r.header("apns-topic"), Some(TOPIC));
        assert_eq!(r.header("apns-push-type"), Some("alert"));
        assert_eq!(r.header("apns-priority"), Some("10"));
        assert_eq!(r.header("apns-expiration"), Some("1900000000"));
        assert_eq!(r.header("apns-collapse-id"), Some("job-42"));
        assert_eq!(r.header("apns-id"), Some(id.to_string().as_str()));
        assert!(r.header("authorization").unwrap().starts_with("bearer "));
        assert_eq!(r.kid.as_deref(), Some(TEST_KEY_ID));
        let claims = r.claims.as_ref().unwrap();
        assert_eq!(claims.iss, TEST_TEAM_ID);
        assert!((claims.iat - clock.now()).abs() <= 2);
        assert_eq!(r.body, n.payload);
        assert_eq!(fake.connections(), 1);
    })
    .await;
}

#[tokio::test]
async fn delivers_over_h2c_and_reuses_one_connection() {
    bounded(async {
        let (fake, sender, _) = setup(false).await;
        assert!(fake.url().starts_with("http://"));
        for i in 0..5 {
            assert!(delivered(&sender.send(&alert(&token(i))).await));
        }
        assert_eq!(fake.connections(), 1);
        let tokens: Vec<_> = fake
            .requests()
            .iter()
            .map(|r| r.header("authorization").map(str::to_owned))
            .collect();
        assert!(
            tokens.windows(2).all(|w| w[0] == w[1]),
            "one provider token reused"
        );
    })
    .await;
}

#[tokio::test]
async fn environments_use_their_own_endpoint_and_background_defaults() {
    bounded(async {
        let prod = fake_with(FakeApnsOptions::default()).await;
        let sandbox = fake_with(FakeApnsOptions::default()).await;
        let sender = ApnsSender::with_options(
            "app",
            &config(&prod.url(), &sandbox.url()),
            options(&Clock::system()),
        )
        .unwrap();
        let spec = PayloadSpec {
            content: PayloadContent::Background,
            thread_id: None,
            data: None,
        };
        let mut n = alert(&token(7));
        n.environment = Environment::Sandbox;
        n.payload = build_payload(&spec).unwrap();
        n.push_type = spec.content.push_type();
        n.priority = spec.content.priority();
        assert!(delivered(&sender.send(&n).await));
        assert!(prod.requests().is_empty());
        let r = &sandbox.requests()[0];
        assert_eq!(r.header("apns-push-type"), Some("background"));
        assert_eq!(r.header("apns-priority"), Some("5"));
        // VoIP: the default topic gets Apple's required suffix, and 5120 bytes are allowed.
        let mut voip = alert(&token(8));
        voip.push_type = PushType::Voip;
        voip.payload = Bytes::from(format!("{{\"x\":\"{}\"}}", "v".repeat(5110)));
        assert_eq!(voip.payload.len(), 5118);
        assert!(delivered(&sender.send(&voip).await));
        assert_eq!(
            prod.requests()[0].header("apns-topic"),
            Some("com.example.herald.voip")
        );
    })
    .await;
}

#[tokio::test]
async fn every_error_class_with_reasons_timestamps_and_retry_after() {
    bounded(async {
        let (fake, sender, _) = setup(true).await;
        fake.script(&token(1), Behaviour::bad_device_token());
        fake.script(&token(2), Behaviour::unregistered(1_700_000_000_123));
        fake.script(&token(3), Behaviour::too_many_requests(Some(17)));
        fake.script(&token(4), Behaviour::internal_error());
        fake.script(&token(5), Behaviour::reject(400, "BadTopic"));
        fake.script(&token(6), Behaviour::reject(403, "InvalidProviderToken"));
        fake.script(&token(7), Behaviour::reject(400, "SomethingApple Added"));
        fake.script(
            &token(8),
            Behaviour::reject(429, "TooManyProviderTokenUpdates"),
        );
        let send = |i| {
            let sender = sender.clone();
            async move { sender.send(&alert(&token(i))).await }
        };
        assert_eq!(
            send(1).await,
            PushOutcome::InvalidToken {
                reason: "BadDeviceToken".into(),
                since: None
            }
        );
        assert_eq!(
            send(2).await,
            PushOutcome::InvalidToken {
                reason: "Unregistered".into(),
                since: chrono::DateTime::from_timestamp_millis(1_700_000_000_123),
            }
        );
        assert_eq!(
            send(3).await,
            PushOutcome::Retry {
                retry_after: Some(Duration::from_secs(17)),
                reason: "TooManyRequests".into()
            }
        );
        assert_eq!(
            send(4).await,
            PushOutcome::Retry {
                retry_after: None,
                reason: "InternalServerError".into()
            }
        );
        assert_eq!(
            send(5).await,
            PushOutcome::Permanent {
                reason: "BadTopic".into()
            }
        );
        assert_eq!(
            send(6).await,
            PushOutcome::Misconfigured {
                reason: "InvalidProviderToken".into()
            }
        );
        assert_eq!(
            send(7).await,
            PushOutcome::Permanent {
                reason: "SomethingApple Added".into()
            }
        );
        assert!(matches!(send(8).await, PushOutcome::Retry { .. }));
        // None of these replaced the connection.
        assert_eq!(fake.connections(), 1);
    })
    .await;
}

#[tokio::test]
async fn unavailable_retries_after_and_moves_to_a_new_connection() {
    bounded(async {
        let (fake, sender, _) = setup(true).await;
        fake.script_seq(&token(1), [Behaviour::unavailable(Some(9))]);
        assert_eq!(
            sender.send(&alert(&token(1))).await,
            PushOutcome::Retry {
                retry_after: Some(Duration::from_secs(9)),
                reason: "ServiceUnavailable".into()
            }
        );
        assert!(delivered(&sender.send(&alert(&token(1))).await));
        let conns: Vec<_> = fake.requests().iter().map(|r| r.connection).collect();
        assert_eq!(conns, [1, 2]);
    })
    .await;
}

#[tokio::test]
async fn unrelated_key_id_reconnects_and_retries_once() {
    bounded(async {
        let (fake, sender, _) = setup(true).await;
        fake.script_seq(&token(1), [Behaviour::reject(403, "UnrelatedKeyIdInToken")]);
        assert!(delivered(&sender.send(&alert(&token(1))).await));
        let conns: Vec<_> = fake
            .requests()
            .iter()
            .map(|r| (r.connection, r.status))
            .collect();
        assert_eq!(conns, [(1, 403), (2, 200)]);
    })
    .await;
}

#[tokio::test]
async fn wrong_key_team_or_topic_is_caught_by_the_fake() {
    bounded(async {
        let clock = Clock::system();
        let fake = fake_with(FakeApnsOptions {
            topics: vec![TOPIC.into()],
            ..Default::default()
        })
        .await;
        let mut cfg = config(&fake.url(), &fake.url());
        cfg.key_file = fixture("test-apns-AuthKey_OTHER00001.p8");
        let wrong_key = ApnsSender::with_options("app", &cfg, options(&clock)).unwrap();
        assert_eq!(
            wrong_key.send(&alert(&token(1))).await,
            PushOutcome::Misconfigured {
                reason: "InvalidProviderToken".into()
            }
        );
        let mut cfg = config(&fake.url(), &fake.url());
        cfg.team_id = "OTHERTEAM1".into();
        let wrong_team = ApnsSender::with_options("app", &cfg, options(&clock)).unwrap();
        assert_eq!(
            wrong_team.send(&alert(&token(1))).await,
            PushOutcome::Misconfigured {
                reason: "InvalidProviderToken".into()
            }
        );
        let right =
            ApnsSender::with_options("app", &config(&fake.url(), &fake.url()), options(&clock))
                .unwrap();
        let mut n = alert(&token(1));
        n.topic = Some("com.example.other".into());
        assert_eq!(
            right.send(&n).await,
            PushOutcome::Permanent {
                reason: "TopicDisallowed".into()
            }
        );
    })
    .await;
}

#[tokio::test]
async fn expired_provider_token_is_resigned_and_retried_once() {
    bounded(async {
        let (fake, sender, clock) = setup(true).await;
        assert!(delivered(&sender.send(&alert(&token(1))).await));
        clock.advance(Duration::from_secs(30 * MIN));
        fake.script_seq(&token(1), [Behaviour::reject(403, "ExpiredProviderToken")]);
        assert!(delivered(&sender.send(&alert(&token(1))).await));
        let reqs = fake.requests();
        let seen: Vec<_> = reqs
            .iter()
            .map(|r| (r.connection, r.status, r.claims.as_ref().unwrap().iat))
            .collect();
        let (iat1, iat2) = (seen[0].2, seen[2].2);
        assert_eq!(seen, [(1, 200, iat1), (1, 403, iat1), (1, 200, iat2)]);
        assert!(
            iat2 - iat1 >= (30 * MIN) as i64,
            "re-signed with a fresh iat"
        );
    })
    .await;
}

#[tokio::test]
async fn expired_provider_token_younger_than_20_minutes_backs_off() {
    bounded(async {
        let (fake, sender, clock) = setup(true).await;
        let before = sender.tokens().issued_at();
        clock.advance(Duration::from_secs(5 * MIN));
        fake.script_seq(&token(1), [Behaviour::reject(403, "ExpiredProviderToken")]);
        assert_eq!(
            sender.send(&alert(&token(1))).await,
            PushOutcome::Retry {
                retry_after: Some(Duration::from_secs(15 * MIN)),
                reason: "ExpiredProviderToken".into()
            }
        );
        assert_eq!(
            sender.tokens().issued_at(),
            before,
            "no renewal inside 20 minutes"
        );
        assert_eq!(fake.requests().len(), 1, "no immediate retry");
    })
    .await;
}

#[tokio::test]
async fn token_renewed_at_50_minutes_and_fake_enforces_age_rules() {
    bounded(async {
        let (fake, sender, clock) = setup(true).await;
        assert!(delivered(&sender.send(&alert(&token(1))).await));
        clock.advance(Duration::from_secs(49 * MIN));
        assert!(delivered(&sender.send(&alert(&token(1))).await));
        clock.advance(Duration::from_secs(2 * MIN));
        assert!(delivered(&sender.send(&alert(&token(1))).await));
        let iats: Vec<_> = fake
            .requests()
            .iter()
            .map(|r| r.claims.as_ref().unwrap().iat)
            .collect();
        assert_eq!(iats[0], iats[1]);
        assert!(iats[2] > iats[1]);
        assert_eq!(
            fake.connections(),
            1,
            "renewal accepted on the same connection"
        );
    })
    .await;
}

#[tokio::test]
async fn payload_limits_are_checked_before_sending() {
    bounded(async {
        let (fake, sender, _) = setup(true).await;
        let mut n = alert(&token(1));
        n.payload = Bytes::from(vec![b' '; 4097]);
        assert_eq!(
            sender.send(&n).await,
            PushOutcome::Permanent {
                reason: "PayloadTooLarge".into()
            }
        );
        n.device_token = "not-hex".into();
        assert!(matches!(
            sender.send(&n).await,
            PushOutcome::InvalidToken { .. }
        ));
        assert!(fake.requests().is_empty());
        assert_eq!(fake.connections(), 0, "connections are opened lazily");
    })
    .await;
}

#[tokio::test]
async fn goaway_mid_burst_loses_nothing_and_sends_nothing_twice() {
    bounded(async {
        let (fake, sender, _) = setup(true).await;
        const N: usize = 120;
        // A short delay keeps the whole burst in flight when the GOAWAY arrives.
        for i in 0..N {
            fake.script(
                &token(i),
                Behaviour::Accept.after(Duration::from_millis(20)),
            );
        }
        fake.goaway_after(30);
        let mut tasks = Vec::new();
        for i in 0..N {
            let sender = sender.clone();
            tasks.push(tokio::spawn(
                async move { sender.send(&alert(&token(i))).await },
            ));
        }
        for t in tasks {
            let out = t.await.unwrap();
            assert!(delivered(&out), "{out:?}");
        }
        let reqs = fake.requests();
        let mut ids: Vec<_> = reqs
            .iter()
            .filter(|r| r.status == 200)
            .map(|r| r.apns_id.clone())
            .collect();
        assert_eq!(reqs.len(), N, "every notification processed exactly once");
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), N, "no apns-id processed twice");
        assert!(fake.refused() > 0, "the GOAWAY cut streams off");
        assert_eq!(reqs.iter().filter(|r| r.connection == 1).count(), 30);
        assert!(fake.connections() >= 2);
    })
    .await;
}

#[tokio::test]
async fn scripted_goaway_resends_the_unprocessed_stream() {
    bounded(async {
        let (fake, sender, _) = setup(false).await;
        assert!(delivered(&sender.send(&alert(&token(1))).await));
        fake.script_seq(&token(2), [Behaviour::GoAway]);
        assert!(delivered(&sender.send(&alert(&token(2))).await));
        assert_eq!(fake.refused(), 1);
        let seen: Vec<_> = fake
            .requests()
            .iter()
            .map(|r| (r.connection, r.status))
            .collect();
        assert_eq!(seen, [(1, 200), (2, 200)]);
    })
    .await;
}

#[tokio::test]
async fn connection_loss_is_retry_and_the_next_send_reconnects() {
    bounded(async {
        let (fake, sender, _) = setup(true).await;
        fake.script_seq(
            &token(1),
            [Behaviour::Accept.after(Duration::from_secs(10))],
        );
        let pending = {
            let sender = sender.clone();
            tokio::spawn(async move { sender.send(&alert(&token(1))).await })
        };
        while fake.peak_in_flight() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        fake.drop_connections();
        let out = pending.await.unwrap();
        assert!(matches!(out, PushOutcome::Retry { .. }), "{out:?}");
        assert!(delivered(&sender.send(&alert(&token(2))).await));
        assert_eq!(fake.connections(), 2);
    })
    .await;
}

#[tokio::test]
async fn unreachable_endpoint_is_retry() {
    bounded(async {
        // Bind then drop a listener: the port is very likely closed now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("https://127.0.0.1:{port}");
        let sender =
            ApnsSender::with_options("app", &config(&url, &url), options(&Clock::system()))
                .unwrap();
        let out = sender.send(&alert(&token(1))).await;
        assert!(
            matches!(&out, PushOutcome::Retry { reason, .. } if reason.contains("connect")),
            "{out:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn in_flight_streams_respect_the_servers_cap() {
    bounded(async {
        let fake = fake_with(FakeApnsOptions {
            max_concurrent_streams: Some(4),
            ..Default::default()
        })
        .await;
        let sender = ApnsSender::with_options(
            "app",
            &config(&fake.url(), &fake.url()),
            options(&Clock::system()),
        )
        .unwrap();
        for i in 0..40 {
            fake.script(
                &token(i),
                Behaviour::Accept.after(Duration::from_millis(10)),
            );
        }
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let sender = sender.clone();
                tokio::spawn(async move { sender.send(&alert(&token(i))).await })
            })
            .collect();
        for t in tasks {
            let out = t.await.unwrap();
            assert!(delivered(&out), "{out:?}");
        }
        assert!(fake.peak_in_flight() <= 4, "peak {}", fake.peak_in_flight());
        assert!(fake.peak_in_flight() >= 2, "still multiplexed");
        assert_eq!(fake.connections(), 1);
    })
    .await;
}

#[test]
fn setup_errors_name_the_file_or_key_never_the_key_material() {
    let mut cfg = config("https://127.0.0.1:1", "https://127.0.0.1:1");
    cfg.key_file = fixture("missing.p8");
    let err = ApnsSender::new("app", &cfg).unwrap_err().to_string();
    assert!(err.contains("missing.p8"), "{err}");

    let mut cfg = config("https://127.0.0.1:1", "https://127.0.0.1:1");
    cfg.key_file = fixture("test-ca.pem");
    let err = ApnsSender::new("app", &cfg).unwrap_err().to_string();
    assert!(
        err.contains(TEST_KEY_ID) && err.contains("test-ca.pem"),
        "{err}"
    );
    let key = std::fs::read_to_string(fixture("test-ca.pem")).unwrap();
    let line = key.lines().nth(1).unwrap();
    assert!(!err.contains(line), "key material leaked: {err}");

    let cfg = config("http://10.1.2.3:8080", "https://127.0.0.1:1");
    let err = ApnsSender::new("app", &cfg).unwrap_err().to_string();
    assert!(err.contains("loopback"), "{err}");
}
