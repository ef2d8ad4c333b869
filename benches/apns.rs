//! Pushes per second from Herald's APNs sender to the fake over one TLS connection, next to a
//! minimal hyper HTTP/2 client sending the same requests to the same fake in the same run.
//!
//! `cargo bench --profile dev --bench apns` (env: `APNS_BENCH_N`, `APNS_BENCH_CONCURRENCY`,
//! `APNS_BENCH_ROUNDS`). The goal is sender ≥ 0.9 × raw.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald::fakes::apns::{FakeApns, FakeApnsOptions, TEST_KEY_ID, TEST_KEY_P8, TEST_TEAM_ID};
use herald::providers::ApnsAppConfig;
use herald::providers::apns::{
    ApnsRequest, ApnsSender, Clock, PayloadContent, PayloadSpec, TokenCache, build_payload,
};
use herald::providers::tls::{TEST_CA_PEM, client_config};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;

/// The allocator the `herald` binary runs with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOPIC: &str = "com.example.herald";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn token(i: usize) -> String {
    format!("{i:064x}")
}

/// CPU time used so far by every thread of this process (client and fake alike), from
/// /proc/self/task/*/schedstat (ns); zero where that is unavailable.
fn cpu_time() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// Runs `n` sends from `concurrency` closed-loop workers; returns the time taken.
async fn drive<F, Fut>(n: usize, concurrency: usize, send: F) -> Duration
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let send = send.clone();
            tokio::spawn(async move {
                let mut i = w;
                while i < n {
                    assert!(send(i).await, "push {i} failed");
                    i += concurrency;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
    start.elapsed()
}

async fn raw_client(url: &str) -> SendRequest<Full<Bytes>> {
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

#[tokio::main]
async fn main() {
    let n = env("APNS_BENCH_N", 5_000);
    let concurrency = env("APNS_BENCH_CONCURRENCY", 100);
    let rounds = env("APNS_BENCH_ROUNDS", 10).max(1);
    // For profiling one side: APNS_BENCH_ONLY=sender or raw.
    let only = std::env::var("APNS_BENCH_ONLY").unwrap_or_default();
    let fake = FakeApns::start(FakeApnsOptions::default())
        .await
        .expect("fake");
    let url = fake.url();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let cfg = ApnsAppConfig {
        key_file: fixtures.join("test-apns-AuthKey_TEST000001.p8"),
        key_id: TEST_KEY_ID.into(),
        team_id: TEST_TEAM_ID.into(),
        topic: Some(TOPIC.into()),
        production_url: url.clone(),
        sandbox_url: url.clone(),
        ca_file: Some(fixtures.join("test-ca.pem")),
    };
    let sender = ApnsSender::new("bench", &cfg).expect("sender");
    let payload = build_payload(&PayloadSpec {
        content: PayloadContent::Alert {
            title: Some("Export"),
            body: "Your export is ready",
        },
        thread_id: Some("exports"),
        data: None,
    })
    .expect("payload");
    let jwt: Arc<str> = TokenCache::new(TEST_KEY_P8, TEST_KEY_ID, TEST_TEAM_ID, Clock::system())
        .expect("key")
        .current()
        .expect("jwt");
    let raw = raw_client(&url).await;
    let tokens: Arc<Vec<String>> = Arc::new((0..n.max(2_000)).map(token).collect());

    let sender_send = {
        let (sender, payload, tokens) = (sender.clone(), payload.clone(), tokens.clone());
        move |i: usize| {
            let (sender, payload, tokens) = (sender.clone(), payload.clone(), tokens.clone());
            async move {
                let n = ApnsRequest {
                    device_token: tokens[i].clone(),
                    payload,
                    ..Default::default()
                };
                matches!(
                    sender.send(&n).await,
                    herald::providers::PushOutcome::Delivered { .. }
                )
            }
        }
    };
    let raw_send = {
        let (url, payload, tokens) = (url.clone(), payload.clone(), tokens.clone());
        move |i: usize| {
            let (mut tx, payload, jwt) = (raw.clone(), payload.clone(), jwt.clone());
            let uri = format!("{url}/3/device/{}", tokens[i]);
            async move {
                let req = http::Request::post(uri)
                    .header("authorization", format!("bearer {jwt}"))
                    .header("content-type", "application/json")
                    .header("apns-topic", TOPIC)
                    .header("apns-push-type", "alert")
                    .header("apns-priority", "10")
                    .header("apns-id", uuid::Uuid::new_v4().to_string())
                    .body(Full::new(payload))
                    .expect("request");
                let Ok(resp) = tx.send_request(req).await else {
                    return false;
                };
                let ok = resp.status() == 200;
                let _ = resp.into_body().collect().await;
                ok
            }
        }
    };

    // Warm both paths (TLS session, HPACK tables, allocator) before measuring.
    drive(2_000.min(n), concurrency, sender_send.clone()).await;
    drive(2_000.min(n), concurrency, raw_send.clone()).await;
    fake.clear_requests();

    // Load on a shared box drifts: interleave short runs (ABBA order) and sum the time each
    // client spent, so both see the same conditions.
    let (mut sender_time, mut raw_time) = (Duration::ZERO, Duration::ZERO);
    let (mut sender_cpu, mut raw_cpu) = (Duration::ZERO, Duration::ZERO);
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let order = if round % 2 == 1 {
            [false, true]
        } else {
            [true, false]
        };
        let (mut s, mut r) = (Duration::ZERO, Duration::ZERO);
        for is_sender in order {
            if only == if is_sender { "raw" } else { "sender" } {
                continue;
            }
            let cpu = cpu_time();
            if is_sender {
                s = drive(n, concurrency, sender_send.clone()).await;
                sender_cpu += cpu_time().saturating_sub(cpu);
            } else {
                r = drive(n, concurrency, raw_send.clone()).await;
                raw_cpu += cpu_time().saturating_sub(cpu);
            }
            fake.clear_requests();
        }
        let rate = |t: Duration| n as f64 / t.as_secs_f64();
        println!(
            "round {round:>2}: raw hyper {:>7.0}/s   herald sender {:>7.0}/s   ratio {:.2}",
            rate(r),
            rate(s),
            rate(s) / rate(r)
        );
        ratios.push(rate(s) / rate(r));
        sender_time += s;
        raw_time += r;
    }
    ratios.sort_by(f64::total_cmp);
    let total = (n * rounds) as f64;
    let (sender_rate, raw_rate) = (
        total / sender_time.as_secs_f64(),
        total / raw_time.as_secs_f64(),
    );
    println!(
        "apns: {rounds} rounds x {n} pushes per client, {concurrency} in flight, one TLS connection each"
    );
    println!(
        "herald sender {sender_rate:.0}/s, raw hyper {raw_rate:.0}/s, ratio {:.2} (median per round {:.2}; goal >= 0.90)",
        sender_rate / raw_rate,
        ratios[ratios.len() / 2]
    );
    // CPU per push (client + fake, same process) is what load from other processes disturbs least.
    let per_push = |t: Duration| t.as_secs_f64() * 1e6 / total;
    println!(
        "cpu per push (client + fake): herald sender {:.1} us, raw hyper {:.1} us, ratio {:.2}",
        per_push(sender_cpu),
        per_push(raw_cpu),
        per_push(raw_cpu) / per_push(sender_cpu)
    );
    assert_eq!(fake.connections(), 2, "one connection per client");
}
