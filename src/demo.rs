//! `herald demo`: the whole pattern in one command, on this machine only. A Herald node on an
//! embedded SQLite file, fake APNs and FCM on loopback, and a scripted app that registers two
//! phones, submits a job (202 + tracking id), receives the pushes and syncs what it missed.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Secret};
use crate::fakes::apns::{FakeApns, FakeApnsOptions};
use crate::fakes::fcm::{FakeFcm, FakeFcmOptions};
use crate::providers::{ApnsAppConfig, AppConfig, FcmAppConfig};

/// The demo app id (test-only credentials from fixtures/).
const APP: &str = "com.example.herald-demo";
/// Test-only service account matching the fake FCM (public on purpose, never for real use).
const SERVICE_ACCOUNT: &[u8] = include_bytes!("../fixtures/test-fcm-service-account.json");

type DemoResult<T> = Result<T, String>;

fn step(n: u32, text: &str) {
    println!("\n{n}. {text}");
}

/// Run the demo; everything it starts stops when it returns.
pub async fn run() -> DemoResult<()> {
    let dir = tempfile_dir()?;
    let path = |name: &str| dir.join(name);
    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(dir.join(name), bytes).map_err(|e| format!("demo: {e}"))
    };
    write("AuthKey_TEST000001.p8", crate::fakes::apns::TEST_KEY_P8)?;
    write("service-account.json", SERVICE_ACCOUNT)?;
    write("test-ca.pem", crate::providers::tls::TEST_CA_PEM)?;

    let apns = FakeApns::start(FakeApnsOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let fcm = FakeFcm::start(FakeFcmOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut config = Config::defaults().map_err(|e| e.to_string())?;
    config.database.url = Secret::new(format!("sqlite://{}", path("herald-demo.db").display()));
    config.auth.hs256_secret = Secret::new(format!("demo-{}", uuid::Uuid::new_v4()));
    config.apps.push(AppConfig {
        id: APP.into(),
        apns: Some(ApnsAppConfig {
            key_file: path("AuthKey_TEST000001.p8"),
            key_id: crate::fakes::apns::TEST_KEY_ID.into(),
            team_id: crate::fakes::apns::TEST_TEAM_ID.into(),
            topic: None,
            production_url: apns.url(),
            sandbox_url: apns.url(),
            ca_file: Some(path("test-ca.pem")),
        }),
        fcm: Some(FcmAppConfig {
            service_account_file: path("service-account.json"),
            base_url: fcm.base_url(),
            token_uri: Some(fcm.token_uri()),
            ca_file: None,
        }),
    });
    let secret = config.auth.hs256_secret.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let shutdown = CancellationToken::new();
    let node = crate::server::start(config, listener, shutdown.clone())
        .await
        .map_err(|e| e.to_string())?;
    let base = format!("http://{}", node.addr);
    println!(
        "Herald demo: node {base}, SQLite in {}, fake APNs {}, fake FCM {}",
        dir.display(),
        apns.url(),
        fcm.base_url()
    );

    let token =
        crate::auth::mint_hs256(&secret, "alice", None, Duration::from_secs(600), None, None)
            .map_err(|e| e.to_string())?;
    let client = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut req = client
            .request(method, format!("{base}{path}"))
            .bearer_auth(&token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        async move {
            let response = req.send().await.map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            Ok::<_, String>((status, body))
        }
    };

    step(
        1,
        "alice's app registers an iPhone (APNs) and an Android phone (FCM)",
    );
    let iphone = json!({"platform": "apns", "token": "ab".repeat(32), "environment": "sandbox"});
    let (status, _) = call(reqwest::Method::POST, "/v1/devices", Some(iphone)).await?;
    println!("   POST /v1/devices (apns) → {status}");
    let (status, _) = call(
        reqwest::Method::POST,
        "/v1/devices",
        Some(json!({"platform": "fcm", "token": "demo-android-1"})),
    )
    .await?;
    println!("   POST /v1/devices (fcm)  → {status}");

    step(2, "the app submits a report job and is answered at once");
    let records: Vec<Value> = (0..2000)
        .map(|i| {
            let group = ["eu", "us", "apac"][i % 3];
            json!({"group": group, "amount": (i % 50) as f64 + 0.5})
        })
        .collect();
    let job = json!({"kind": "report.generate", "input": {"records": records},
                     "notify": {"title": "Your report is ready", "body": "2,000 records aggregated"}});
    let started = Instant::now();
    let (status, accepted) = call(reqwest::Method::POST, "/v1/jobs", Some(job)).await?;
    let id = accepted["trackingId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    println!(
        "   POST /v1/jobs → {status} in {:?}: {accepted}",
        started.elapsed()
    );

    step(
        3,
        "the queue runs it; the dispatcher pushes every update to both phones",
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let done = |apns_n: usize, fcm_n: usize| apns_n > 0 && fcm_n > 0;
    loop {
        let on_apns = apns
            .requests()
            .iter()
            .filter(|r| {
                r.status == 200 && String::from_utf8_lossy(&r.body).contains("job.completed")
            })
            .count();
        let on_fcm = fcm
            .requests()
            .iter()
            .filter(|r| r.status == 200 && r.body.to_string().contains("job.completed"))
            .count();
        if done(on_apns, on_fcm) {
            break;
        }
        if Instant::now() > deadline {
            return Err("demo: the completion push did not arrive within 15 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in apns.requests() {
        println!(
            "   fake APNs got {} {} ({} {})",
            r.headers
                .get("apns-push-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?"),
            String::from_utf8_lossy(&r.body),
            r.status,
            r.reason.unwrap_or_default()
        );
    }
    for r in fcm.requests() {
        println!("   fake FCM got {} ({})", r.body["message"], r.status);
    }

    step(
        4,
        "the app was closed meanwhile: on launch it syncs what it missed",
    );
    let (_, page) = call(reqwest::Method::GET, "/v1/updates?after=0", None).await?;
    for u in page["updates"].as_array().cloned().unwrap_or_default() {
        println!("   seq {} {} {}", u["seq"], u["type"], u["data"]);
    }
    let (_, job) = call(reqwest::Method::GET, &format!("/v1/jobs/{id}"), None).await?;
    println!(
        "   GET /v1/jobs/{id} → {} result {}",
        job["status"], job["result"]
    );

    shutdown.cancel();
    let _ = node.wait().await;
    println!("\nDone. Run `herald serve` for the real thing.");
    Ok(())
}

fn tempfile_dir() -> DemoResult<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("herald-demo-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("demo: cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}
