//! Shared set-up for the FCM integration tests.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use herald::fakes::fcm::{FakeFcm, FakeFcmHandle, FakeFcmOptions};
use herald::providers::fcm::{FcmNotification, FcmRequest, FcmSender};
use herald::providers::{FcmAppConfig, PushOutcome};

pub const SERVICE_ACCOUNT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/test-fcm-service-account.json"
);
pub const TEST_CA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/test-ca.pem");

/// Every test finishes within this, or fails.
pub async fn bounded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(Duration::from_secs(20), test)
        .await
        .expect("test took longer than 20 s");
}

pub fn config(fake: &FakeFcmHandle) -> FcmAppConfig {
    FcmAppConfig {
        service_account_file: PathBuf::from(SERVICE_ACCOUNT),
        base_url: fake.base_url(),
        token_uri: Some(fake.token_uri()),
        ca_file: Some(PathBuf::from(TEST_CA)),
    }
}

pub async fn start(tls: bool) -> (FakeFcmHandle, FcmSender) {
    let fake = FakeFcm::start(FakeFcmOptions {
        tls,
        ..Default::default()
    })
    .await
    .unwrap();
    let sender = FcmSender::new("com.example.app", &config(&fake)).unwrap();
    (fake, sender)
}

pub fn push(token: &str) -> FcmRequest {
    FcmRequest {
        device_token: token.into(),
        notification: Some(FcmNotification {
            title: "Export ready".into(),
            body: "Tap to open".into(),
        }),
        data: BTreeMap::from([("jobId".into(), "42".into())]),
        ..Default::default()
    }
}

/// `send` as an owned future, for join_all.
pub fn send_owned(
    sender: &FcmSender,
    req: FcmRequest,
) -> impl Future<Output = PushOutcome> + use<> {
    let sender = sender.clone();
    async move { sender.send(req).await }
}

/// A closed loopback port: bind, note, release.
pub async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// A copy of the test key file with some fields replaced.
pub fn key_file_with(changes: serde_json::Value) -> tempfile::NamedTempFile {
    let mut key: serde_json::Value =
        serde_json::from_slice(&std::fs::read(SERVICE_ACCOUNT).unwrap()).unwrap();
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            key.as_object_mut().unwrap().remove(k);
        } else {
            key[k] = v.clone();
        }
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), key.to_string()).unwrap();
    file
}

/// The reason carried by any non-delivered outcome.
pub fn reason_of(outcome: &PushOutcome) -> &str {
    match outcome {
        PushOutcome::InvalidToken { reason, .. }
        | PushOutcome::Retry { reason, .. }
        | PushOutcome::Permanent { reason }
        | PushOutcome::Misconfigured { reason } => reason,
        PushOutcome::Delivered { .. } => "",
    }
}
