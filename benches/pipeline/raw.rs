//! The pipeline bench's baseline: a minimal hyper HTTP/2 client sending prebuilt requests
//! straight to the same fakes, at the dispatcher's concurrency.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use herald::dispatch::payload;
use herald::fakes::apns::{TEST_KEY_ID, TEST_KEY_P8, TEST_TEAM_ID};
use herald::providers::apns::{Clock, Environment, TokenCache};
use herald::providers::fcm::{FCM_SCOPE, JWT_BEARER_GRANT, message};
use herald::providers::tls::{TEST_CA_PEM, client_config};
use herald::updates::Update;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use serde_json::Value;

use super::{APP, Fakes, Params, apns_token, cpu_time, fcm_token, fixture, new_update};

/// A minimal client: hyper HTTP/2 straight to the fakes, requests built ahead of time.
pub(super) struct Raw {
    apns: SendRequest<Full<Bytes>>,
    apns_url: String,
    apns_payload: Bytes,
    apns_jwt: Arc<str>,
    expiration: String,
    fcm: SendRequest<Full<Bytes>>,
    fcm_url: String,
    fcm_bearer: Arc<str>,
    /// One `messages:send` body per user's Android phone.
    fcm_bodies: Vec<Bytes>,
}

fn sample_update(k: usize) -> Update {
    let new = new_update(k);
    Update {
        seq: 1,
        id: uuid::Uuid::now_v7(),
        kind: new.kind,
        tracking_id: new.tracking_id,
        status: new.status,
        data: new.data,
        notification: new.notification,
        created_at: chrono::Utc::now(),
    }
}

async fn fcm_access_token(fakes: &Fakes) -> String {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        iss: &'a str,
        scope: &'a str,
        aud: &'a str,
        iat: u64,
        exp: u64,
    }
    let account: Value = serde_json::from_slice(
        &std::fs::read(fixture("test-fcm-service-account.json")).expect("service account"),
    )
    .expect("service account json");
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(
        account["private_key"].as_str().expect("key").as_bytes(),
    )
    .expect("rsa key");
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let token_uri = fakes.fcm.token_uri();
    let claims = Claims {
        iss: account["client_email"].as_str().expect("email"),
        scope: FCM_SCOPE,
        aud: &token_uri,
        iat,
        exp: iat + 3600,
    };
    let assertion = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &key,
    )
    .expect("assertion");
    let form = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", JWT_BEARER_GRANT)
        .append_pair("assertion", &assertion)
        .finish();
    let answer: Value = reqwest::Client::new()
        .post(&token_uri)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .expect("token request")
        .json()
        .await
        .expect("token answer");
    answer["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

async fn h2_apns(url: &str) -> SendRequest<Full<Bytes>> {
    let addr = url.trim_start_matches("https://");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(
        client_config(Some(TEST_CA_PEM), &[b"h2"]).expect("tls config"),
    ));
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let tls = tls.connect(name, tcp).await.expect("tls");
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .expect("h2");
    tokio::spawn(conn);
    tx
}

async fn h2c(url: &str) -> SendRequest<Full<Bytes>> {
    let addr = url.trim_start_matches("http://");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .expect("h2c");
    tokio::spawn(conn);
    tx
}

impl Raw {
    pub(super) async fn connect(fakes: &Fakes, users: usize) -> Self {
        let sample = sample_update(usize::MAX);
        let expires = chrono::Utc::now() + chrono::Duration::days(1);
        let apns_payload =
            payload::apns_request(&sample, &apns_token(0), Environment::Production, expires)
                .expect("apns payload")
                .payload;
        let fcm_bodies = (0..users)
            .map(|u| {
                let req = payload::fcm_request(&sample, &fcm_token(u), Duration::from_secs(86400));
                let msg = message::build_message(req, SystemTime::now()).expect("message");
                Bytes::from(message::request_body(&msg, false).expect("body"))
            })
            .collect();
        let apns_jwt = TokenCache::new(TEST_KEY_P8, TEST_KEY_ID, TEST_TEAM_ID, Clock::system())
            .expect("key")
            .current()
            .expect("jwt");
        Self {
            apns: h2_apns(&fakes.apns.url()).await,
            apns_url: fakes.apns.url(),
            apns_payload,
            apns_jwt,
            expiration: expires.timestamp().to_string(),
            fcm: h2c(&fakes.fcm.base_url()).await,
            fcm_url: format!(
                "{}/v1/projects/{}/messages:send",
                fakes.fcm.base_url(),
                fakes.fcm.project_id()
            ),
            fcm_bearer: format!("Bearer {}", fcm_access_token(fakes).await).into(),
            fcm_bodies,
        }
    }

    async fn send_apns(&self, user: usize) -> bool {
        let req = http::Request::post(format!("{}/3/device/{}", self.apns_url, apns_token(user)))
            .header("authorization", format!("bearer {}", self.apns_jwt))
            .header("content-type", "application/json")
            .header("apns-topic", APP)
            .header("apns-push-type", "alert")
            .header("apns-priority", "10")
            .header("apns-expiration", self.expiration.as_str())
            .header("apns-collapse-id", "0190f3e2-7c1a-7000-8000-000000000000")
            .header("apns-id", uuid::Uuid::new_v4().to_string())
            .body(Full::new(self.apns_payload.clone()))
            .expect("request");
        let Ok(resp) = self.apns.clone().send_request(req).await else {
            return false;
        };
        let ok = resp.status() == 200;
        let _ = resp.into_body().collect().await;
        ok
    }

    async fn send_fcm(&self, user: usize) -> bool {
        let req = http::Request::post(self.fcm_url.as_str())
            .header("authorization", &*self.fcm_bearer)
            .header("content-type", "application/json")
            .body(Full::new(self.fcm_bodies[user].clone()))
            .expect("request");
        let Ok(resp) = self.fcm.clone().send_request(req).await else {
            return false;
        };
        let ok = resp.status() == 200;
        let _ = resp.into_body().collect().await;
        ok
    }

    /// `pushes` sends, half to each fake, `concurrency` closed loops per fake; pushes/s and CPU
    /// time per push.
    pub(super) async fn run(self: &Arc<Self>, p: Params) -> (f64, Duration) {
        let per_fake = p.pushes / 2;
        let cpu = cpu_time();
        let start = Instant::now();
        let mut workers = Vec::new();
        for fcm in [false, true] {
            for w in 0..p.concurrency {
                let raw = self.clone();
                workers.push(tokio::spawn(async move {
                    for i in (w..per_fake).step_by(p.concurrency) {
                        let user = i % p.users;
                        let ok = if fcm {
                            raw.send_fcm(user).await
                        } else {
                            raw.send_apns(user).await
                        };
                        assert!(ok, "raw push {i} failed");
                    }
                }));
            }
        }
        for w in workers {
            w.await.expect("raw worker");
        }
        let elapsed = start.elapsed();
        let cpu = cpu_time().saturating_sub(cpu);
        (
            (2 * per_fake) as f64 / elapsed.as_secs_f64(),
            cpu / (2 * per_fake) as u32,
        )
    }
}
