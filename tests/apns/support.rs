//! Helpers shared by the APNs integration tests.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use herald::fakes::apns::{FakeApns, FakeApnsHandle, FakeApnsOptions, TEST_KEY_ID, TEST_TEAM_ID};
use herald::providers::apns::{
    ApnsRequest, ApnsSender, Clock, ConnOptions, PayloadContent, PayloadSpec, SenderOptions,
    build_payload,
};
use herald::providers::{ApnsAppConfig, PushOutcome};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

pub(crate) const TOPIC: &str = "com.example.herald";
pub(crate) const MIN: u64 = 60;

pub(crate) fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Every test is bounded: a hang fails instead of blocking the suite.
pub(crate) async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("test timed out");
}

pub(crate) fn token(i: usize) -> String {
    format!("{i:064x}")
}

pub(crate) fn config(production: &str, sandbox: &str) -> ApnsAppConfig {
    ApnsAppConfig {
        key_file: fixture("test-apns-AuthKey_TEST000001.p8"),
        key_id: TEST_KEY_ID.into(),
        team_id: TEST_TEAM_ID.into(),
        topic: Some(TOPIC.into()),
        production_url: production.into(),
        sandbox_url: sandbox.into(),
        ca_file: Some(fixture("test-ca.pem")),
    }
}

pub(crate) fn options(clock: &Clock) -> SenderOptions {
    SenderOptions {
        clock: clock.clone(),
        conn: ConnOptions {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(5),
        },
        ..SenderOptions::default()
    }
}

pub(crate) async fn fake_with(opts: FakeApnsOptions) -> FakeApnsHandle {
    FakeApns::start(opts).await.expect("fake APNs starts")
}

pub(crate) async fn setup(tls: bool) -> (FakeApnsHandle, ApnsSender, Clock) {
    let clock = Clock::system();
    let fake = fake_with(FakeApnsOptions {
        tls,
        clock: clock.clone(),
        ..Default::default()
    })
    .await;
    let sender =
        ApnsSender::with_options("app", &config(&fake.url(), &fake.url()), options(&clock))
            .expect("sender");
    (fake, sender, clock)
}

pub(crate) fn alert(device: &str) -> ApnsRequest {
    let payload = build_payload(&PayloadSpec {
        content: PayloadContent::Alert {
            title: Some("Export"),
            body: "Your export is ready",
        },
        thread_id: Some("exports"),
        data: None,
    })
    .unwrap();
    ApnsRequest {
        device_token: device.into(),
        payload,
        ..Default::default()
    }
}

pub(crate) fn delivered(o: &PushOutcome) -> bool {
    matches!(o, PushOutcome::Delivered { .. })
}

/// A bare HTTP/2 client, to send the fake what Herald's sender never would.
pub(crate) async fn raw(
    fake: &FakeApnsHandle,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(fake.addr()).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", fake.url()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tx
        .send_request(req.body(Full::new(Bytes::copy_from_slice(body))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let reason = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["reason"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (status, reason)
}
