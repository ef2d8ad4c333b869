//! The fake APNs on its own: it must refuse what Apple refuses.

use std::time::Duration;

use bytes::Bytes;
use herald::fakes::apns::{FakeApnsOptions, TEST_KEY_ID, TEST_KEY_P8, TEST_TEAM_ID};
use herald::providers::apns::{Clock, TokenCache};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::support::*;

/// One malformed request and what Apple answers to it.
struct Case {
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    expect: (u16, &'static str),
}

#[tokio::test]
async fn fake_verifies_what_apns_verifies() {
    bounded(async {
        let clock = Clock::system();
        let fake = fake_with(FakeApnsOptions {
            tls: false,
            clock: clock.clone(),
            ..Default::default()
        })
        .await;
        let jwt = TokenCache::new(TEST_KEY_P8, TEST_KEY_ID, TEST_TEAM_ID, clock.clone())
            .unwrap()
            .current()
            .unwrap();
        let bearer = format!("bearer {jwt}");
        let path = format!("/3/device/{}", token(1));
        let ok: Vec<(&str, &str)> = vec![
            ("authorization", &bearer),
            ("apns-topic", TOPIC),
            ("apns-push-type", "alert"),
        ];
        let body = br#"{"aps":{}}"#;
        assert_eq!(
            raw(&fake, "POST", &path, &ok, body).await,
            (200, String::new())
        );
        let collapse = "c".repeat(65);
        let case = |method, path: &str, headers: Vec<(&'static str, &str)>, expect| Case {
            method,
            path: path.to_owned(),
            headers: headers
                .into_iter()
                .map(|(k, v)| (k, v.to_owned()))
                .collect(),
            body: body.to_vec(),
            expect,
        };
        let plus = |extra: (&'static str, &'static str)| {
            let mut h = ok.clone();
            h.push(extra);
            h
        };
        let mut cases = vec![
            case("GET", &path, ok.clone(), (405, "MethodNotAllowed")),
            case("POST", "/3/other/ab", ok.clone(), (404, "BadPath")),
            case(
                "POST",
                "/3/device/",
                ok.clone(),
                (400, "MissingDeviceToken"),
            ),
            case("POST", "/3/device/zz", ok.clone(), (400, "BadDeviceToken")),
            case(
                "POST",
                &path,
                ok[1..].to_vec(),
                (403, "MissingProviderToken"),
            ),
            case(
                "POST",
                &path,
                vec![("authorization", "bearer x.y.z"), ("apns-topic", TOPIC)],
                (403, "InvalidProviderToken"),
            ),
            case("POST", &path, vec![ok[0], ok[2]], (400, "MissingTopic")),
            case(
                "POST",
                &path,
                plus(("apns-topic", "dup")),
                (400, "DuplicateHeaders"),
            ),
            case(
                "POST",
                &path,
                vec![ok[0], ok[1], ("apns-push-type", "fax")],
                (400, "InvalidPushType"),
            ),
            case(
                "POST",
                &path,
                plus(("apns-priority", "7")),
                (400, "BadPriority"),
            ),
            case(
                "POST",
                &path,
                vec![
                    ok[0],
                    ok[1],
                    ("apns-push-type", "background"),
                    ("apns-priority", "10"),
                ],
                (400, "BadPriority"),
            ),
            case(
                "POST",
                &path,
                plus(("apns-id", "0A1B2C3D-0000-4000-8000-000000000001")),
                (400, "BadMessageId"),
            ),
            case(
                "POST",
                &path,
                plus(("apns-expiration", "soon")),
                (400, "BadExpirationDate"),
            ),
        ];
        let mut long_collapse = case("POST", &path, ok.clone(), (400, "BadCollapseId"));
        long_collapse.headers.push(("apns-collapse-id", collapse));
        cases.push(long_collapse);
        let mut empty = case("POST", &path, ok.clone(), (400, "PayloadEmpty"));
        empty.body.clear();
        cases.push(empty);
        let mut large = case("POST", &path, ok.clone(), (413, "PayloadTooLarge"));
        large.body = vec![b' '; 4097];
        cases.push(large);
        for c in cases {
            let headers: Vec<(&str, &str)> =
                c.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_eq!(
                raw(&fake, c.method, &c.path, &headers, &c.body).await,
                (c.expect.0, c.expect.1.to_owned()),
                "{} {} {headers:?}",
                c.method,
                c.path
            );
        }
        // Token age: older than an hour is expired.
        let old = TokenCache::new(TEST_KEY_P8, TEST_KEY_ID, TEST_TEAM_ID, clock.clone())
            .unwrap()
            .current()
            .unwrap();
        clock.advance(Duration::from_secs(61 * MIN));
        let stale = format!("bearer {old}");
        let h = [("authorization", stale.as_str()), ("apns-topic", TOPIC)];
        assert_eq!(
            raw(&fake, "POST", &path, &h, body).await,
            (403, "ExpiredProviderToken".into())
        );
    })
    .await;
}

#[tokio::test]
async fn fake_enforces_20_minute_renewal_rule_per_connection() {
    bounded(async {
        let clock = Clock::system();
        let fake = fake_with(FakeApnsOptions {
            tls: false,
            clock: clock.clone(),
            ..Default::default()
        })
        .await;
        let first = TokenCache::new(TEST_KEY_P8, TEST_KEY_ID, TEST_TEAM_ID, clock.clone())
            .unwrap()
            .current()
            .unwrap();
        clock.advance(Duration::from_secs(MIN));
        let second = TokenCache::new(TEST_KEY_P8, TEST_KEY_ID, TEST_TEAM_ID, clock.clone())
            .unwrap()
            .current()
            .unwrap();
        assert_ne!(first, second);
        let tcp = tokio::net::TcpStream::connect(fake.addr()).await.unwrap();
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut send = |jwt: &str| {
            let req = http::Request::post(format!("{}/3/device/{}", fake.url(), token(1)))
                .header("authorization", format!("bearer {jwt}"))
                .header("apns-topic", TOPIC)
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap();
            tx.send_request(req)
        };
        assert_eq!(send(&first).await.unwrap().status(), 200);
        assert_eq!(send(&second).await.unwrap().status(), 429);
        assert_eq!(
            fake.requests()[1].reason.as_deref(),
            Some("TooManyProviderTokenUpdates")
        );
        // Another connection may start with the new token.
        let bearer = format!("bearer {second}");
        let h = [("authorization", bearer.as_str()), ("apns-topic", TOPIC)];
        assert_eq!(
            raw(&fake, "POST", &format!("/3/device/{}", token(1)), &h, b"{}")
                .await
                .0,
            200
        );
    })
    .await;
}

#[tokio::test]
async fn fake_cli_binds_loopback_only() {
    let err =
        herald::fakes::apns::run_cli("0.0.0.0:0".parse().unwrap(), FakeApnsOptions::default())
            .await;
    assert!(err.is_err());
}
