//! Soak: Herald measured from outside under steady load for a long time, on each engine
//! (issue 20, item 3).
//!
//! Three processes: this one (the load generator and orchestrator), `herald serve` and
//! `herald fake-apns` (the binary cargo built, `CARGO_BIN_EXE_herald`), so the node's figures
//! (its RSS, its CPU) are its own. The node is configured with a TOML file in a temporary
//! directory (one app whose APNs endpoints are the fake, h2c on loopback, with the test-only
//! key in fixtures/) and HERALD_LISTEN / HERALD_DATABASE_URL.
//!
//! A run, per engine:
//! 1. a fresh database (SQLite: a file in a temporary directory; PostgreSQL: the database
//!    `herald_soak_<pid>` on the server, dropped at the end), the fake, the node (/readyz);
//! 2. SOAK_USERS users register one iPhone each (`POST /v1/devices`, APNs, production);
//! 3. the rate: SOAK_RATE, or half the measured maximum — every connection publishing back to
//!    back for SOAK_BURST_SECS (closed loop), the maximum being the lower of acknowledgments/s
//!    and pushes/s in that burst (a rate the dispatcher cannot follow would only grow a
//!    backlog) — then waiting for the burst's pushes to drain;
//! 4. the soak: `POST /v1/events` open loop at that rate over SOAK_CONNECTIONS HTTP/1.1
//!    keep-alive connections, round-robin over the users, each event carrying its scheduled
//!    send time (unix µs) at `data.t`. Latency is measured from the scheduled time, so a stall
//!    is not hidden by the generator waiting for it (no coordinated omission); events waiting
//!    for a free connection are the backlog. The fake reads `data.t` from every push it
//!    receives and prints counts and a lag histogram every second on its stdout;
//! 5. at half time, maintenance from a connection of the bench's own: PostgreSQL, a plain
//!    `VACUUM` of every table in `public`, one statement each; SQLite,
//!    `PRAGMA wal_checkpoint(TRUNCATE)`, and with SOAK_SQLITE_ANALYZE=1 `ANALYZE` with
//!    `analysis_limit` 400 (as `PRAGMA optimize` runs it: it holds the write lock for seconds
//!    at gigabytes, so it is not the default); each step timed and printed;
//! 6. every SOAK_REPORT_SECS a row: acknowledgments (202) per second, other answers by status,
//!    acknowledgment p50/p99/max, pushes per second and publish → push lag p50/p99/max (from
//!    the fake), the node's RSS, the generator's backlog, the longest stall (time with no 202
//!    completing) and acknowledgments over 100 ms, the storage (PostgreSQL: per table heap and
//!    index size, live and dead tuples, updates and HOT updates, last (auto)vacuum; SQLite:
//!    database, file and WAL size, page and freelist counts) and bytes per push (database
//!    growth since the soak began / pushes since). Each row is printed as a table line and as
//!    a `SOAK_JSON {...}` line;
//! 7. a summary: the first and the last window (a minute, or half the run if shorter) on
//!    throughput and acknowledgment p99 against the goal (last within 20% of the first: PASS
//!    or FAIL), lag p99, the longest stall (goal on SQLite: none over 100 ms), the most dead
//!    tuples per table, bytes per push, totals; also as `SOAK_SUMMARY_JSON {...}`.
//!
//! The exit code is non-zero only when the harness failed (a child died, set-up failed), not
//! when a goal was missed. On PostgreSQL the bench prints a warning when the server's
//! autovacuum is off (it changes no server setting). All processes share the machine: the
//! generator's own CPU competes with the node's, which the figures include.
//!
//! Run: `cargo bench --bench soak` (about 2 × 11 minutes; needs the test PostgreSQL).
//! A short run: `SOAK_SECS=60 SOAK_REPORT_SECS=10 SOAK_RATE=2000 cargo bench --bench soak`.
//!
//! Environment:
//! - SOAK_ENGINES: `sqlite,postgres` (default), or one of them;
//! - SOAK_SECS: length of the soak, default 600;
//! - SOAK_MAINTENANCE_SECS: when the maintenance runs, default half of SOAK_SECS;
//! - SOAK_SQLITE_ANALYZE: `1` adds ANALYZE to SQLite's maintenance;
//! - SOAK_REPORT_SECS: report interval, default 30;
//! - SOAK_RATE: events/s to offer (default: half the measured maximum);
//! - SOAK_USERS: users, one iPhone each, default 2000;
//! - SOAK_CONNECTIONS: HTTP/1.1 connections, default 256;
//! - SOAK_BURST_SECS: the closed-loop burst measuring the maximum, default 20;
//! - HERALD_TEST_DATABASE_URL: the PostgreSQL server, default
//!   postgres://postgres@127.0.0.1:5432/postgres (the bench creates and drops its own
//!   database there);
//! - other HERALD_* variables reach `herald serve` (e.g. HERALD_LOG, default `warn` here).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use herald::config::Secret;
use herald::fakes::apns::{TEST_KEY_ID, TEST_TEAM_ID};

mod load;
mod procs;
mod report;
mod storage;

use load::{Conn, OpenLoop, Recorder, Target};
use procs::{Fake, Herald};
use report::{Row, Summary, Window};
use storage::{Db, Sample};

const APP: &str = "com.example.soak";
const SECRET: &str = "soak-secret-0123456789abcdef0123456789";

/// The run's parameters, from the environment.
struct Settings {
    engines: Vec<String>,
    secs: u64,
    /// When the mid-run maintenance runs, seconds into the soak.
    maintenance_secs: u64,
    report_secs: u64,
    rate: Option<f64>,
    users: usize,
    connections: usize,
    burst_secs: u64,
    pg_base: String,
}

fn env_parse<T: std::str::FromStr>(key: &str, default: Option<T>) -> Result<Option<T>, String> {
    match std::env::var(key) {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{key}: cannot read {v:?}")),
        Err(_) => Ok(default),
    }
}

impl Settings {
    fn from_env() -> Result<Self, String> {
        let required = |v: Option<u64>, key: &str| v.ok_or_else(|| format!("{key} missing"));
        let s = Self {
            engines: std::env::var("SOAK_ENGINES")
                .unwrap_or_else(|_| "sqlite,postgres".into())
                .split(',')
                .map(|e| e.trim().to_string())
                .filter(|e| !e.is_empty())
                .collect(),
            secs: required(env_parse("SOAK_SECS", Some(600))?, "SOAK_SECS")?,
            maintenance_secs: 0,
            report_secs: required(env_parse("SOAK_REPORT_SECS", Some(30))?, "SOAK_REPORT_SECS")?,
            rate: env_parse::<f64>("SOAK_RATE", None)?,
            users: env_parse("SOAK_USERS", Some(2000))?.unwrap_or(2000),
            connections: env_parse("SOAK_CONNECTIONS", Some(256))?.unwrap_or(256),
            burst_secs: required(env_parse("SOAK_BURST_SECS", Some(20))?, "SOAK_BURST_SECS")?,
            pg_base: std::env::var("HERALD_TEST_DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        };
        if let Some(e) = s
            .engines
            .iter()
            .find(|e| !matches!(e.as_str(), "sqlite" | "postgres"))
        {
            return Err(format!(
                "SOAK_ENGINES: unknown engine {e:?} (sqlite, postgres)"
            ));
        }
        if s.secs < 2
            || s.report_secs == 0
            || s.users == 0
            || s.connections == 0
            || s.burst_secs == 0
        {
            return Err(
                "SOAK_SECS (>= 2), SOAK_REPORT_SECS, SOAK_USERS, SOAK_CONNECTIONS and \
                 SOAK_BURST_SECS must be positive"
                    .into(),
            );
        }
        if s.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
            return Err("SOAK_RATE must be a positive number of events/s".into());
        }
        let mut s = s;
        s.maintenance_secs = env_parse("SOAK_MAINTENANCE_SECS", Some(s.secs / 2))?
            .unwrap_or(s.secs / 2)
            .min(s.secs);
        Ok(s)
    }

    /// The first and last windows compared in the summary: a minute, or half a short run.
    fn window(&self) -> Duration {
        Duration::from_secs(60.min(self.secs / 2).max(1))
    }
}

fn user_id(u: usize) -> String {
    format!("soak-user-{u:06}")
}

/// A valid APNs device token: 64 hex digits, one per user.
fn device_token(u: usize) -> String {
    format!("{u:064x}")
}

fn mint(sub: &str, scope: Option<&str>) -> Result<String, String> {
    // A day: longer than any run.
    herald::auth::mint_hs256(
        &Secret::new(SECRET),
        sub,
        scope,
        Duration::from_secs(86_400),
        None,
        None,
    )
    .map_err(|e| format!("mint a token: {e}"))
}

/// The node's configuration file: one app whose APNs endpoints are the fake (h2c).
fn write_config(dir: &Path, fake_url: &str) -> Result<PathBuf, String> {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut apns = toml::Table::new();
    let key_file = fixtures.join("test-apns-AuthKey_TEST000001.p8");
    apns.insert("key_file".into(), key_file.display().to_string().into());
    apns.insert("key_id".into(), TEST_KEY_ID.into());
    apns.insert("team_id".into(), TEST_TEAM_ID.into());
    apns.insert("production_url".into(), fake_url.into());
    apns.insert("sandbox_url".into(), fake_url.into());
    let mut app = toml::Table::new();
    app.insert("id".into(), APP.into());
    app.insert("apns".into(), apns.into());
    let mut auth = toml::Table::new();
    auth.insert("hs256_secret".into(), SECRET.into());
    let mut root = toml::Table::new();
    // Warnings and errors only: the node's own log would compete with it for the CPU.
    root.insert("log".into(), "warn".into());
    root.insert("auth".into(), auth.into());
    root.insert("apps".into(), toml::Value::Array(vec![app.into()]));
    let text = toml::to_string(&root).map_err(|e| format!("config: {e}"))?;
    let path = dir.join("herald.toml");
    std::fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok(path)
}

async fn wait_ready(client: &reqwest::Client, addr: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("http://{addr}/readyz")).send().await
            && r.status() == 200
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("herald serve: /readyz did not answer 200 within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every user registers one iPhone, as the app would.
async fn register(client: &reqwest::Client, addr: &str, users: usize) -> Result<(), String> {
    let url = format!("http://{addr}/v1/devices");
    let results: Vec<Result<(), String>> = futures::stream::iter(0..users)
        .map(|u| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let token = mint(&user_id(u), None)?;
                let body = serde_json::json!({
                    "platform": "apns",
                    "token": device_token(u),
                    "environment": "production",
                });
                let r = client
                    .post(&url)
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .map_err(|e| format!("POST /v1/devices: {e}"))?;
                match r.status().as_u16() {
                    200 | 201 => Ok(()),
                    s => Err(format!(
                        "POST /v1/devices answered {s}: {}",
                        r.text().await.unwrap_or_default()
                    )),
                }
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Waits until the fake has accepted `target` pushes (or `limit` passes), saying how it goes.
async fn drain(fake: &Fake, target: u64, limit: Duration) -> bool {
    let start = Instant::now();
    let mut said = Instant::now();
    loop {
        let got = fake.accepted();
        if got >= target {
            println!(
                "  pushes drained after {:.1} s",
                start.elapsed().as_secs_f64()
            );
            return true;
        }
        if start.elapsed() > limit {
            println!(
                "  !! {} pushes still not sent after {:.0} s; soaking anyway (the first window \
                 includes them)",
                target - got,
                limit.as_secs_f64()
            );
            return false;
        }
        if said.elapsed() > Duration::from_secs(10) {
            println!("  waiting for {} pushes to drain", target - got);
            said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The closed-loop burst: the rate to soak at (half the maximum) and how it was chosen.
async fn measure_rate(
    s: &Settings,
    target: &Arc<Target>,
    conns: Vec<Conn>,
    fake: &Fake,
) -> Result<(f64, String, Vec<Conn>), String> {
    println!(
        "measuring the maximum: {} connections publishing back to back for {} s",
        s.connections, s.burst_secs
    );
    let before = fake.accepted();
    let start = Instant::now();
    let (burst, conns) = load::closed_loop(target, conns, Duration::from_secs(s.burst_secs)).await;
    let end = Instant::now();
    if conns.len() < s.connections {
        return Err("a connection task of the burst failed".into());
    }
    fake.stats.wait_past(end).await;
    let acks_per_s = burst.acks as f64 / burst.elapsed.as_secs_f64();
    let pushes = report::pushes_between(&fake.stats, start, end);
    let pushes_per_s = pushes.per_s.unwrap_or(0.0);
    println!(
        "  burst: {} acks in {:.1} s = {acks_per_s:.0}/s, pushes {pushes_per_s:.0}/s meanwhile, \
         errors {:?}",
        burst.acks,
        burst.elapsed.as_secs_f64(),
        burst.errors
    );
    if burst.acks == 0 {
        return Err("the burst got no 202 at all".into());
    }
    let max = acks_per_s.min(pushes_per_s.max(1.0));
    drain(fake, before + burst.acks, Duration::from_secs(300)).await;
    Ok((
        max / 2.0,
        format!(
            "half the measured maximum {max:.0}/s = min(acks {acks_per_s:.0}/s, pushes \
             {pushes_per_s:.0}/s) over a {} s closed-loop burst",
            s.burst_secs
        ),
        conns,
    ))
}

/// Tracks the figures the summary needs across rows.
#[derive(Default)]
struct Totals {
    acks: u64,
    errors: BTreeMap<String, u64>,
    max_stall_ms: f64,
    over_100ms: u64,
    max_backlog: u64,
    max_rss: Option<f64>,
    dead: BTreeMap<String, (i64, i64)>,
    max_freelist: Option<i64>,
}

impl Totals {
    fn add(&mut self, row: &Row) {
        self.max_stall_ms = self.max_stall_ms.max(row.stall_ms);
        self.over_100ms += row.acks_over_100ms;
        self.max_backlog = self.max_backlog.max(row.backlog);
        if let Some(rss) = row.rss_mib {
            self.max_rss = Some(self.max_rss.map_or(rss, |m: f64| m.max(rss)));
        }
        match &row.storage {
            Some(Sample::Postgres { tables, .. }) => {
                for t in tables {
                    let e = self.dead.entry(t.name.clone()).or_insert((0, 0));
                    *e = (e.0.max(t.dead), t.dead);
                }
            }
            Some(Sample::Sqlite { freelist_count, .. }) => {
                self.max_freelist = Some(self.max_freelist.unwrap_or(0).max(*freelist_count));
            }
            None => {}
        }
    }

    fn add_acc(&mut self, acc: &load::Acc) {
        self.acks += acc.acks;
        for (k, v) in &acc.errors {
            *self.errors.entry(k.clone()).or_insert(0) += v;
        }
    }
}

/// One engine, set-up to clean-up.
async fn run_engine(engine: &str, s: &Settings) -> Result<Summary, String> {
    println!(
        "\n=== soak on {engine}: {} users, {} connections, {} s, a row every {} s; {} CPUs",
        s.users,
        s.connections,
        s.secs,
        s.report_secs,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    // On any early return the children are killed (their guards drop) and a PostgreSQL
    // database is dropped WITH (FORCE), whatever sessions the node still has in it.
    let mut db: Option<Db> = None;
    let url = match engine {
        "postgres" => {
            let pg = Db::postgres(&s.pg_base).await?;
            let url = pg.postgres_url().unwrap_or_default().to_string();
            db = Some(pg);
            url
        }
        _ => Db::sqlite_url(dir.path()).0,
    };
    let mut fake = Fake::start().await?;
    let config = write_config(dir.path(), &fake.url)?;
    let mut herald = Herald::start(&config, &url, dir.path()).await?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    wait_ready(&client, &herald.addr).await?;
    let mut db = match db {
        Some(mut pg) => {
            pg.attach().await?;
            pg
        }
        None => Db::sqlite(Db::sqlite_url(dir.path()).1).await?,
    };
    println!(
        "herald serve (pid {}) on {}, fake APNs (pid {}) on {}",
        herald.proc.pid().unwrap_or(0),
        herald.addr,
        fake.proc.pid().unwrap_or(0),
        fake.url
    );

    let t = Instant::now();
    register(&client, &herald.addr, s.users).await?;
    println!(
        "{} devices registered in {:.1} s",
        s.users,
        t.elapsed().as_secs_f64()
    );
    let target = Arc::new(Target {
        addr: herald.addr.clone(),
        bearer: format!("Bearer {}", mint("soak-publisher", Some("events:publish"))?),
        users: (0..s.users).map(user_id).collect(),
    });
    let conns = load::connect_all(&target, s.connections).await?;
    let (rate, rate_from, conns) = match s.rate {
        Some(rate) => (rate, "SOAK_RATE".to_string(), conns),
        None => measure_rate(s, &target, conns, &fake).await?,
    };
    herald.proc.check_alive()?;

    // The soak.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = db.sample().await?;
    let duration = Duration::from_secs(s.secs);
    let report_every = Duration::from_secs(s.report_secs);
    let window = s.window();
    println!(
        "soaking at {rate:.0} events/s ({rate_from}) for {} s from {} (the clock of the \
         vacuum times below); maintenance at {} s",
        s.secs,
        chrono::Utc::now().format("%H:%M:%S UTC"),
        s.maintenance_secs
    );
    report::print_header(engine);
    // Started just after a line of the fake: nothing is in flight (drained), so its count is
    // the count at the start.
    fake.stats.wait_past(Instant::now()).await;
    let start = Instant::now();
    let pushes_before = fake.accepted();
    let recorder = Arc::new(Recorder::new(start, duration, window));
    let open = OpenLoop::start(&target, conns, rate, start, duration, recorder.clone());
    let mut totals = Totals::default();
    let mut maintenance: Option<tokio::task::JoinHandle<Result<(), String>>> = None;
    let maintenance_at = start + Duration::from_secs(s.maintenance_secs);
    let mut prev = start;
    let mut k = 1u32;
    loop {
        let tick = (start + report_every * k).min(start + duration);
        tokio::select! {
            _ = tokio::time::sleep_until(maintenance_at.into()), if maintenance.is_none() => {
                let job = db.maintenance()?;
                println!(
                    "  [{:>5.0} s] maintenance starts",
                    start.elapsed().as_secs_f64()
                );
                maintenance = Some(tokio::spawn(
                    job.run(move || start.elapsed().as_secs_f64()),
                ));
                continue;
            }
            _ = tokio::time::sleep_until(tick.into()) => {}
        }
        herald.proc.check_alive()?;
        fake.proc.check_alive()?;
        let now = Instant::now();
        let (mut acc, stall_ms) = recorder.take_interval(now);
        totals.add_acc(&acc);
        let secs = now.saturating_duration_since(prev).as_secs_f64();
        let (p50, p99, max) = acc
            .quantiles_ms()
            .map_or((None, None, None), |(a, b, c)| (Some(a), Some(b), Some(c)));
        let storage = db.sample().await?;
        fake.stats.wait_past(now).await;
        let pushes = report::pushes_between(&fake.stats, prev, now);
        let pushed_since_start = fake
            .stats
            .accepted_at(now)
            .map_or(0.0, |n| n - pushes_before as f64);
        let mut row = Row {
            engine: engine.to_string(),
            elapsed_s: now.saturating_duration_since(start).as_secs_f64(),
            acks_per_s: acc.acks as f64 / secs,
            errors: acc.errors.clone(),
            ack_p50_ms: p50,
            ack_p99_ms: p99,
            ack_max_ms: max,
            pushes_per_s: pushes.per_s,
            lag_p50_ms: None,
            lag_p99_ms: None,
            lag_max_ms: None,
            rss_mib: herald.proc.rss_mib(),
            backlog: open.backlog(),
            stall_ms,
            acks_over_100ms: acc.over_100ms,
            bytes_per_push: (pushed_since_start > 0.0)
                .then(|| (storage.db_bytes() - baseline.db_bytes()) as f64 / pushed_since_start),
            storage: Some(storage),
        };
        row.lags(&pushes.lags);
        report::print_row(&row);
        totals.add(&row);
        prev = now;
        if tick >= start + duration {
            break;
        }
        k += 1;
    }
    // Events still queued at the end are sent; their answers count in the totals only.
    let _conns = open.finish().await;
    let (leftover, _) = recorder.take_interval(Instant::now());
    totals.add_acc(&leftover);
    if let Some(m) = maintenance {
        m.await.map_err(|e| format!("maintenance task: {e}"))??;
    }
    herald.proc.check_alive()?;
    let end = start + duration;
    let (mut first_acc, mut last_acc) = recorder.windows();
    let first_pushes = report::pushes_between(&fake.stats, start, start + window);
    let last_pushes = report::pushes_between(&fake.stats, end - window, end);
    let window_of = |acc: &mut load::Acc, pushes: &report::Pushes| Window {
        acks_per_s: acc.acks as f64 / window.as_secs_f64(),
        pushes_per_s: pushes.per_s,
        ack_p99_ms: acc.quantiles_ms().map(|q| q.1),
        lag_p99_ms: pushes.lags.quantile_us(0.99).map(|us| us as f64 / 1e3),
    };
    let final_sample = db.sample().await?;
    // All the pushes of the soak's events, those still queued at the end included (they
    // count in the acknowledgment totals too).
    fake.stats.wait_past(Instant::now()).await;
    let total_pushes = fake.accepted().saturating_sub(pushes_before);
    let summary = Summary {
        engine: engine.to_string(),
        users: s.users,
        connections: s.connections,
        rate,
        rate_from,
        secs: s.secs,
        window_s: window.as_secs(),
        first: window_of(&mut first_acc, &first_pushes),
        last: window_of(&mut last_acc, &last_pushes),
        dead_tuples: totals.dead.clone(),
        max_freelist: totals.max_freelist,
        max_stall_ms: totals.max_stall_ms,
        acks_over_100ms: totals.over_100ms,
        bytes_per_push: (total_pushes > 0)
            .then(|| (final_sample.db_bytes() - baseline.db_bytes()) as f64 / total_pushes as f64),
        total_acks: totals.acks,
        total_pushes,
        errors: totals.errors.clone(),
        max_backlog: totals.max_backlog,
        max_rss_mib: totals.max_rss,
    };
    summary.print();
    herald.proc.stop().await;
    fake.proc.stop().await;
    db.close().await;
    Ok(summary)
}

fn main() -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("soak: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut summaries = Vec::new();
    let mut failed = false;
    for engine in &settings.engines {
        let outcome = runtime.block_on(async {
            tokio::select! {
                r = run_engine(engine, &settings) => r,
                _ = tokio::signal::ctrl_c() => Err("interrupted".to_string()),
            }
        });
        match outcome {
            Ok(summary) => summaries.push(summary),
            Err(e) => {
                eprintln!("soak: {engine}: harness failure: {e}");
                failed = true;
                if e == "interrupted" {
                    break;
                }
            }
        }
    }
    if summaries.len() > 1 {
        println!("\n=== all engines");
        for s in &summaries {
            s.print();
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
