//! The whole dispatch pipeline in pushes per second, on SQLite and PostgreSQL: updates appended
//! (through the node's event group commit, the path `POST /v1/events` takes: concurrent appends
//! share a transaction, one delivery per device in it) → deliveries claimed →
//! sent to the fake APNs (TLS) and fake FCM (h2c) → outcomes recorded. Next to it, in the same
//! run and against the same fakes, a minimal hyper HTTP/2 client sends equivalent requests at the
//! same concurrency (the dispatcher's per-provider limit); the ratio is Herald / raw. Raw and
//! Herald runs alternate for several rounds, each Herald run set against the raw runs either
//! side of it, and the round with the median ratio is reported: this machine's speed drifts
//! by tens of per cent within seconds.
//!
//! Latency is from "update committed" (the instant `publish_event` returned) to "push received
//! by the fake" (`received_at` of the fakes' records), matched through a marker in the update's
//! data. It is reported at full load (appends as fast as they go: mostly queueing) and in a
//! second run paced at half the throughput just measured.
//!
//! Run: `cargo bench --bench pipeline` (needs the test PostgreSQL). Environment:
//! PIPELINE_PUSHES (pushes per run, default 20000; two per update), PIPELINE_PACED_RATE (pushes/s
//! of the paced run instead of half the measured rate, to compare changes), PIPELINE_USERS (default
//! 1000, each with an iPhone and an Android phone), PIPELINE_APPENDERS (concurrent appenders,
//! default 512: many services publishing at once, enough that appends are not capped by one
//! commit's round trip), PIPELINE_ENGINES (`sqlite,postgres`), PIPELINE_ONLY=apart (only the
//! append and dispatch stages measured apart, for profiling), PIPELINE_PERF_CTL (the control FIFO of
//! `perf record --control=fifo:FIFO -D -1`: only the last round's full-load run is recorded;
//! with PIPELINE_PERF_RUN=raw the raw run after it instead), PIPELINE_ROUNDS (rounds of raw
//! and Herald runs, default 5), PIPELINE_LOG (the tracing filter; default the node's, `info`,
//! with its subscriber installed as `herald serve` does), HERALD_TEST_DATABASE_URL (default
//! postgres://postgres@127.0.0.1:5432/postgres).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use herald::config::{Config, KindConfig, Secret};
use herald::devices::{ApnsEnvironment, NewDevice, Platform};
use herald::fakes::apns::{FakeApns, FakeApnsHandle, FakeApnsOptions, TEST_KEY_ID};
use herald::fakes::apns::{RecordedRequest, TEST_TEAM_ID};
use herald::fakes::fcm::{FakeFcm, FakeFcmHandle, FakeFcmOptions, FakeFcmRequest};
use herald::jobs::Notification;
use herald::providers::{ApnsAppConfig, AppConfig, FcmAppConfig};
use herald::store::{EventIntake, Store, event_intake};
use herald::updates::NewUpdate;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

mod raw;
use raw::Raw;

/// The allocator the `herald` binary runs with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const APP: &str = "com.example.herald";
const SECRET: &str = "bench-secret-0123456789abcdef01234567";

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn apns_token(user: usize) -> String {
    format!("{user:064x}")
}

fn fcm_token(user: usize) -> String {
    format!("bench-android-{user:06}:APA91bFakeRegistrationToken")
}

fn user_id(user: usize) -> String {
    format!("user-{user:06}")
}

/// CPU time (user + system) used so far by this process: node, fakes and clients alike,
/// threads that ended included (SQLite's connection threads end when a store closes). From
/// /proc/self/stat in clock ticks (10 ms); zero where that is unavailable.
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// CPU time (user + system, all processes) the whole machine has used so far, from the first
/// line of /proc/stat in clock ticks (10 ms); zero where that is unavailable. Less this
/// process's own, it is what the PostgreSQL server (and anything else running) used.
fn machine_cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return Duration::ZERO;
    };
    let Some(cpu) = stat.lines().next() else {
        return Duration::ZERO;
    };
    // cpu user nice system idle iowait irq softirq steal: all but idle and iowait.
    let ticks: u64 = cpu
        .split_whitespace()
        .skip(1)
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .filter_map(|(_, t)| t.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

#[derive(Clone, Copy)]
struct Params {
    /// Pushes per run (two per update).
    pushes: usize,
    users: usize,
    appenders: usize,
    /// The dispatcher's per-(app, provider) concurrency; the raw client uses the same.
    concurrency: usize,
}

impl Params {
    fn updates(&self) -> usize {
        self.pushes / 2
    }
}

/// The update every run appends; `k` is the latency marker.
fn new_update(k: usize) -> NewUpdate {
    NewUpdate {
        kind: "job.completed".into(),
        tracking_id: Some(uuid::Uuid::now_v7()),
        status: Some("completed".into()),
        data: Some(json!({"k": k, "result": {"rows": 1250, "url": "https://example.com/r/abc"}})),
        notification: Some(Notification {
            title: Some("Export ready".into()),
            body: Some("Your export finished; tap to open it".into()),
        }),
    }
}

struct Fakes {
    apns: FakeApnsHandle,
    fcm: FakeFcmHandle,
}

impl Fakes {
    async fn start() -> Self {
        let apns = FakeApns::start(FakeApnsOptions {
            max_recorded: 1_000_000,
            ..FakeApnsOptions::default()
        })
        .await
        .expect("fake APNs");
        let fcm = FakeFcm::start(FakeFcmOptions::default())
            .await
            .expect("fake FCM");
        Self { apns, fcm }
    }

    /// Pushes the fakes received (and still hold) so far.
    fn received(&self) -> usize {
        self.apns.request_count() + self.fcm.request_count()
    }

    fn app(&self) -> AppConfig {
        AppConfig {
            id: APP.into(),
            apns: Some(ApnsAppConfig {
                key_file: fixture("test-apns-AuthKey_TEST000001.p8"),
                key_id: TEST_KEY_ID.into(),
                team_id: TEST_TEAM_ID.into(),
                topic: None,
                production_url: self.apns.url(),
                sandbox_url: self.apns.url(),
                ca_file: Some(fixture("test-ca.pem")),
            }),
            fcm: Some(FcmAppConfig {
                service_account_file: fixture("test-fcm-service-account.json"),
                base_url: self.fcm.base_url(),
                token_uri: Some(self.fcm.token_uri()),
                ca_file: None,
            }),
        }
    }
}

struct Running {
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    node: herald::server::Node,
}

fn node_config(url: &str, fakes: &Fakes) -> Config {
    let mut config = Config::defaults().expect("config");
    config.database.url = Secret::new(url);
    config.auth.hs256_secret = Secret::new(SECRET);
    config.log = "error".into();
    // No in-process job handlers: only the dispatcher works.
    config.kinds.clear();
    config.kinds.insert(
        "bench".into(),
        KindConfig {
            handler: "external".into(),
            max_attempts: 3,
        },
    );
    config.apps.push(fakes.app());
    config
}

async fn start_node(url: &str, fakes: &Fakes) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let shutdown = CancellationToken::new();
    let node = herald::server::start(node_config(url, fakes), listener, shutdown.clone())
        .await
        .expect("start");
    Running {
        store: node.store.clone(),
        shutdown,
        node,
    }
}

async fn register(store: &Arc<dyn Store>, users: usize) {
    futures::stream::iter(0..users)
        .for_each_concurrent(16, |u| {
            let store = store.clone();
            async move {
                let user = user_id(u);
                for (platform, token, environment) in [
                    (
                        Platform::Apns,
                        apns_token(u),
                        Some(ApnsEnvironment::Production),
                    ),
                    (Platform::Fcm, fcm_token(u), None),
                ] {
                    let device = NewDevice {
                        platform,
                        token,
                        environment,
                        app_id: APP.into(),
                        locale: None,
                        app_version: None,
                    };
                    store.upsert_device(&user, &device).await.expect("device");
                }
            }
        })
        .await;
}

/// When each update of a run committed, by marker offset.
struct Commits {
    base: usize,
    at: Vec<OnceLock<Instant>>,
}

impl Commits {
    fn new(base: usize, n: usize) -> Arc<Self> {
        Arc::new(Self {
            base,
            at: (0..n).map(|_| OnceLock::new()).collect(),
        })
    }
}

async fn publish(events: &EventIntake, commits: &Commits, j: usize, users: usize) {
    let k = commits.base + j;
    events
        .submit((user_id(j % users), new_update(k)))
        .await
        .expect("publish");
    let _ = commits.at[j].set(Instant::now());
}

/// Wait until every delivery has an outcome recorded, the fakes having received `pushes` more
/// than `before`. The fakes count arrivals in memory, so they are watched first: the store is
/// polled (a count over the outbox, which on PostgreSQL cost as much server CPU as a batch of
/// outcomes while the in-flight index was full of entries awaiting vacuum) only once every push
/// arrived, instead of every 10 ms throughout the run, competing with it.
async fn drained(store: &Arc<dyn Store>, fakes: &Fakes, before: usize, pushes: usize) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while fakes.received() < before + pushes {
        assert!(Instant::now() < deadline, "pushes not received");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    loop {
        if store.pending_deliveries().await.expect("pending") == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "deliveries not drained");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One Herald run at full load and the raw rate around it.
struct Round {
    ratio: f64,
    full: Run,
    /// Harmonic mean of the raw runs before and after.
    raw_rate: f64,
    raw_runs: (f64, f64),
    raw_cpu: Duration,
}

struct Run {
    pushes_per_sec: f64,
    /// Time until the last append returned.
    appended: Duration,
    elapsed: Duration,
    cpu_per_push: Duration,
    /// CPU per push of every other process (the PostgreSQL server), when measured.
    others_per_push: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

/// Appends the run's updates as fast as `appenders` closed loops can.
async fn flood(events: &EventIntake, p: Params, commits: &Arc<Commits>) {
    let n = commits.at.len();
    let appenders: Vec<_> = (0..p.appenders)
        .map(|a| {
            let (events, commits) = (events.clone(), commits.clone());
            tokio::spawn(async move {
                // Appender a only writes users ≡ a (mod appenders): no row-lock contention on
                // the users' sequence counters between appenders.
                for j in (a..n).step_by(p.appenders) {
                    publish(&events, &commits, j, p.users).await;
                }
            })
        })
        .collect();
    for a in appenders {
        a.await.expect("appender");
    }
}

/// Appends as fast as it can while the node dispatches, then waits for every outcome;
/// `profiled`: the run a profiler records (see PIPELINE_PERF_CTL).
async fn full_load(
    running: &Running,
    fakes: &Fakes,
    p: Params,
    base: usize,
    profiled: bool,
) -> Run {
    let store = &running.store;
    let commits = Commits::new(base, p.updates());
    if profiled {
        perf_control("enable");
    }
    let before = fakes.received();
    let (cpu, machine) = (cpu_time(), machine_cpu_time());
    let start = Instant::now();
    flood(&running.node.events, p, &commits).await;
    let appended = start.elapsed();
    drained(store, fakes, before, p.pushes).await;
    let elapsed = start.elapsed();
    if profiled {
        perf_control("disable");
    }
    let cpu = cpu_time().saturating_sub(cpu);
    let others = machine_cpu_time()
        .saturating_sub(machine)
        .saturating_sub(cpu);
    Run {
        others_per_push: others / p.pushes as u32,
        ..finish(fakes, &commits, elapsed, appended, cpu)
    }
}

/// Appends at `updates_per_sec` from an open-loop pacer, then waits for every outcome.
async fn paced_load(
    running: &Running,
    fakes: &Fakes,
    p: Params,
    base: usize,
    updates_per_sec: f64,
) -> Run {
    let store = &running.store;
    let n = p.updates();
    let commits = Commits::new(base, n);
    let before = fakes.received();
    let cpu = cpu_time();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for j in 0..n {
        let at = start + Duration::from_secs_f64(j as f64 / updates_per_sec);
        tokio::time::sleep_until(at.into()).await;
        let (events, commits) = (running.node.events.clone(), commits.clone());
        tasks.push(tokio::spawn(async move {
            publish(&events, &commits, j, p.users).await;
        }));
    }
    for t in tasks {
        t.await.expect("append");
    }
    let appended = start.elapsed();
    drained(store, fakes, before, p.pushes).await;
    let elapsed = start.elapsed();
    let cpu = cpu_time().saturating_sub(cpu);
    finish(fakes, &commits, elapsed, appended, cpu)
}

fn apns_marker(r: &RecordedRequest) -> Option<usize> {
    let body: Value = serde_json::from_slice(&r.body).ok()?;
    body["data"]["k"].as_u64().map(|k| k as usize)
}

fn fcm_marker(r: &FakeFcmRequest) -> Option<usize> {
    let data = r.body["message"]["data"]["data"].as_str()?;
    let data: Value = serde_json::from_str(data).ok()?;
    data["k"].as_u64().map(|k| k as usize)
}

/// Check both fakes got every push of the run and compute the latencies.
fn finish(
    fakes: &Fakes,
    commits: &Commits,
    elapsed: Duration,
    appended: Duration,
    cpu: Duration,
) -> Run {
    let n = commits.at.len();
    let range = commits.base..commits.base + n;
    let mut seen = [vec![false; n], vec![false; n]];
    let mut latencies = Vec::with_capacity(2 * n);
    let mut note = |which: usize, k: Option<usize>, status: u16, received: Instant| {
        let Some(k) = k.filter(|k| range.contains(k)) else {
            return;
        };
        assert_eq!(status, 200, "the fakes accept every push");
        let j = k - commits.base;
        // At least once: a resend after a lost outcome would count once, at its first arrival.
        if std::mem::replace(&mut seen[which][j], true) {
            return;
        }
        let committed = *commits.at[j].get().expect("commit time");
        latencies.push(received.saturating_duration_since(committed));
    };
    for r in fakes.apns.requests() {
        note(0, apns_marker(&r), r.status, r.received_at);
    }
    fakes.apns.clear_requests();
    for r in fakes.fcm.requests() {
        note(1, fcm_marker(&r), r.status, r.received_at);
    }
    for (which, name) in [(0, "APNs"), (1, "FCM")] {
        let missing = seen[which].iter().filter(|s| !**s).count();
        assert_eq!(missing, 0, "{missing} pushes never reached the fake {name}");
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let pushes = 2 * n;
    Run {
        pushes_per_sec: pushes as f64 / elapsed.as_secs_f64(),
        appended,
        elapsed,
        cpu_per_push: cpu / pushes as u32,
        others_per_push: Duration::ZERO,
        p50: at(0.50),
        p99: at(0.99),
        max: latencies[latencies.len() - 1],
    }
}

async fn fresh_pg_url(base: &str) -> (String, String) {
    let admin = sqlx::PgPool::connect(base)
        .await
        .expect("PostgreSQL (HERALD_TEST_DATABASE_URL)");
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await
        .expect("schema");
    admin.close().await;
    let sep = if base.contains('?') { '&' } else { '?' };
    (
        format!("{base}{sep}options=-c%20search_path%3D{schema}"),
        schema,
    )
}

async fn drop_schema(base: &str, schema: &str) {
    if let Ok(admin) = sqlx::PgPool::connect(base).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE"
        )))
        .execute(&admin)
        .await;
        admin.close().await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// With PIPELINE_PERF_CTL naming the control FIFO of `perf record --control=fifo:… -D -1`,
/// only the full-load run is profiled.
fn perf_control(command: &str) {
    if let Ok(fifo) = std::env::var("PIPELINE_PERF_CTL") {
        let _ = std::fs::write(fifo, format!("{command}\n"));
    }
}

async fn bench_engine(engine: &str, url: &str, p: Params) {
    let fakes = Fakes::start().await;
    let raw = Arc::new(Raw::connect(&fakes, p.users).await);

    // The two halves apart. Appends alone: the store open without a node, so nothing dispatches.
    let store = herald::server::open_store(&node_config(url, &fakes))
        .await
        .expect("store");
    register(&store, p.users).await;
    let backlog = Commits::new(0, p.updates());
    let stop = CancellationToken::new();
    let max_connections = node_config(url, &fakes).database.max_connections;
    // No node runs: nothing to hand deliveries to, so they wait in the outbox.
    let (events, events_task) = event_intake(store.clone(), max_connections, None, stop.clone());
    let (cpu, machine) = (cpu_time(), machine_cpu_time());
    let start = Instant::now();
    flood(&events, p, &backlog).await;
    let append_only = p.pushes as f64 / start.elapsed().as_secs_f64();
    let append_cpu = cpu_time().saturating_sub(cpu);
    let append_others = machine_cpu_time()
        .saturating_sub(machine)
        .saturating_sub(append_cpu);
    stop.cancel();
    let _ = events_task.await;
    store.close().await;
    // Dispatch alone: a node started on that backlog drains it (start-up and connecting
    // included).
    if std::env::var("PIPELINE_ONLY").is_ok_and(|v| v == "apart") {
        // A cue for attaching a profiler to the dispatch stage alone.
        eprintln!("dispatch stage starts");
    }
    let before = fakes.received();
    let (cpu, machine) = (cpu_time(), machine_cpu_time());
    let start = Instant::now();
    let running = start_node(url, &fakes).await;
    let store = running.store.clone();
    drained(&store, &fakes, before, p.pushes).await;
    let elapsed = start.elapsed();
    let dispatch_cpu = cpu_time().saturating_sub(cpu);
    let dispatch_others = machine_cpu_time()
        .saturating_sub(machine)
        .saturating_sub(dispatch_cpu);
    let dispatch_only = finish(&fakes, &backlog, elapsed, elapsed, dispatch_cpu);
    if std::env::var("PIPELINE_ONLY").is_ok_and(|v| v == "apart") {
        println!(
            "  {engine}: appends alone {append_only:.0} pushes/s, {:.1} us CPU/push (+{:.1} in \
             other processes); dispatch alone {:.0} pushes/s, {:.1} us CPU/push (+{:.1})",
            us(append_cpu / p.pushes as u32),
            us(append_others / p.pushes as u32),
            dispatch_only.pushes_per_sec,
            us(dispatch_only.cpu_per_push),
            us(dispatch_others / p.pushes as u32),
        );
        running.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), running.node.wait()).await;
        return;
    }
    let mut base = p.updates();

    // The whole pipeline. Warm up both paths first (statement caches, allocator, HPACK).
    let warm = Params {
        pushes: (p.pushes / 5).max(2) / 2 * 2,
        ..p
    };
    let _ = full_load(&running, &fakes, warm, base, false).await;
    base += warm.updates();
    let _ = raw.run(warm).await;
    // Load on a shared machine drifts, within seconds: rounds of raw, Herald, raw, Herald, ...,
    // raw; each Herald run is set against the raw runs either side of it, and the round with
    // the median ratio is the one reported.
    let rounds = env_usize("PIPELINE_ROUNDS", 5).max(1);
    let profile_raw = std::env::var("PIPELINE_PERF_RUN").is_ok_and(|v| v == "raw");
    let (mut raw_before, mut raw_cpu_before) = raw.run(p).await;
    let mut measured = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        // Only the last round is profiled.
        let profiled = round == rounds;
        let full = full_load(&running, &fakes, p, base, profiled && !profile_raw).await;
        base += p.updates();
        if profiled && profile_raw {
            perf_control("enable");
        }
        let (raw_after, raw_cpu_after) = raw.run(p).await;
        if profiled && profile_raw {
            perf_control("disable");
        }
        let raw_rate = 2.0 / (1.0 / raw_before + 1.0 / raw_after);
        measured.push(Round {
            ratio: full.pushes_per_sec / raw_rate,
            full,
            raw_rate,
            raw_runs: (raw_before, raw_after),
            raw_cpu: (raw_cpu_before + raw_cpu_after) / 2,
        });
        (raw_before, raw_cpu_before) = (raw_after, raw_cpu_after);
    }
    measured.sort_by(|a, b| a.ratio.total_cmp(&b.ratio));
    let ratios: Vec<String> = measured.iter().map(|r| format!("{:.2}", r.ratio)).collect();
    let Round {
        ratio,
        full,
        raw_rate,
        raw_runs: (raw_before, raw_after),
        raw_cpu,
    } = measured.swap_remove(measured.len() / 2);
    // Half load: paced at half the pushes/s just measured (two pushes per update).
    let half_rate = std::env::var("PIPELINE_PACED_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(full.pushes_per_sec / 2.0);
    let half = paced_load(&running, &fakes, p, base, half_rate / 2.0).await;

    running.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.node.wait()).await;

    println!(
        "  {engine}: apart: appends alone {append_only:.0} pushes/s ({:.0} updates/s, {:.1} us \
         CPU/push + {:.1} in other processes); dispatch alone (node started on that backlog) \
         {:.0} pushes/s = {:.2} x raw, {:.1} us CPU/push + {:.1} in other processes",
        append_only / 2.0,
        us(append_cpu / p.pushes as u32),
        us(append_others / p.pushes as u32),
        dispatch_only.pushes_per_sec,
        dispatch_only.pushes_per_sec / raw_rate,
        us(dispatch_only.cpu_per_push),
        us(dispatch_others / p.pushes as u32),
    );
    println!(
        "  {engine}: full load: {} pushes in {:.2} s (appends done at {:.2} s), {:.0} us CPU/push \
         (raw {:.0} us) and {:.0} us in other processes (the database server, if any); raw runs \
         {raw_before:.0}/s and {raw_after:.0}/s; latency max {:.1} ms",
        p.pushes,
        full.elapsed.as_secs_f64(),
        full.appended.as_secs_f64(),
        us(full.cpu_per_push),
        us(raw_cpu),
        us(full.others_per_push),
        ms(full.max),
    );
    println!(
        "  {engine}: half load: offered {half_rate:.0} pushes/s, achieved {:.0}/s, {:.0} us \
         CPU/push; latency max {:.1} ms",
        half.pushes_per_sec,
        us(half.cpu_per_push),
        ms(half.max),
    );
    println!(
        "  {engine}: ratios of the {rounds} rounds, sorted: {}; the median round is reported",
        ratios.join(" "),
    );
    println!(
        "{engine:<9} herald {:>6.0} pushes/s | raw h2 {:>6.0} pushes/s | ratio {ratio:.2} (goal >= 0.50) \
         | full load p50 {:>6.1} ms p99 {:>6.1} ms | half load ({half_rate:.0}/s) p50 {:>5.1} ms \
         p99 {:>5.1} ms (goal < 50)",
        full.pushes_per_sec,
        raw_rate,
        ms(full.p50),
        ms(full.p99),
        ms(half.p50),
        ms(half.p99),
    );
}

fn main() {
    let p = Params {
        pushes: env_usize("PIPELINE_PUSHES", 20_000).max(4) / 2 * 2,
        users: 0,
        appenders: env_usize("PIPELINE_APPENDERS", 512).max(1),
        concurrency: Config::defaults().expect("config").dispatch.concurrency,
    };
    // A multiple of the appender count, so each user belongs to one appender.
    let users = env_usize("PIPELINE_USERS", 1000)
        .max(1)
        .div_ceil(p.appenders)
        * p.appenders;
    let p = Params { users, ..p };
    // Logging as `herald serve` sets it up (the default filter unless PIPELINE_LOG says
    // otherwise), so the spans and events it costs are measured too.
    let defaults = Config::defaults().expect("config");
    let filter = std::env::var("PIPELINE_LOG").unwrap_or(defaults.log);
    herald::telemetry::init_tracing(&filter, defaults.log_format);
    let engines = std::env::var("PIPELINE_ENGINES").unwrap_or_else(|_| "sqlite,postgres".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        println!(
            "dispatch pipeline: {} pushes per run ({} updates x 2 devices), {} users, {} appenders, \
             {} in flight per provider; {} CPUs",
            p.pushes,
            p.updates(),
            p.users,
            p.appenders,
            p.concurrency,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
        );
        for engine in engines.split(',').map(str::trim) {
            match engine {
                "sqlite" => {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let url = format!("sqlite://{}", dir.path().join("herald.db").display());
                    bench_engine("sqlite", &url, p).await;
                }
                "postgres" => {
                    let base = std::env::var("HERALD_TEST_DATABASE_URL").unwrap_or_else(|_| {
                        "postgres://postgres@127.0.0.1:5432/postgres".into()
                    });
                    let (url, schema) = fresh_pg_url(&base).await;
                    bench_engine("postgres", &url, p).await;
                    drop_schema(&base, &schema).await;
                }
                other => panic!("unknown engine {other:?} in PIPELINE_ENGINES"),
            }
        }
    });
}
