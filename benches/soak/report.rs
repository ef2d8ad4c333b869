//! The report: one row per interval (a table line, the storage figures under it, and the
//! same as a `SOAK_JSON ` line), and a summary per engine set against the goals.

use std::collections::BTreeMap;
use std::time::Instant;

use herald::fakes::apns::LagHistogram;
use serde::Serialize;

use crate::procs::FakeStats;
use crate::storage::Sample;

const MIB: f64 = 1024.0 * 1024.0;

/// What the fake APNs received between two instants.
pub struct Pushes {
    pub per_s: Option<f64>,
    /// The lags of the fake's lines that arrived in the span (to its 1 s resolution).
    pub lags: LagHistogram,
}

/// From the fake's stats lines: the pushes accepted by `from` and by `to` (interpolated; a
/// line after `to` must have arrived, see [`FakeStats::wait_past`]), and the lag histograms of
/// the lines in between merged.
pub fn pushes_between(stats: &FakeStats, from: Instant, to: Instant) -> Pushes {
    let mut lags = LagHistogram::default();
    for line in stats.between(from, to) {
        lags.merge(&line.histogram());
    }
    let secs = to.saturating_duration_since(from).as_secs_f64();
    let per_s = match (stats.accepted_at(from), stats.accepted_at(to)) {
        (Some(a), Some(b)) if secs > 0.0 => Some((b - a).max(0.0) / secs),
        _ => None,
    };
    Pushes { per_s, lags }
}

fn ms(us: Option<u64>) -> Option<f64> {
    us.map(|us| us as f64 / 1e3)
}

/// One report interval.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub engine: String,
    pub elapsed_s: f64,
    pub acks_per_s: f64,
    /// Answers other than 202, by status ("io": the connection failed).
    pub errors: BTreeMap<String, u64>,
    pub ack_p50_ms: Option<f64>,
    pub ack_p99_ms: Option<f64>,
    pub ack_max_ms: Option<f64>,
    pub pushes_per_s: Option<f64>,
    pub lag_p50_ms: Option<f64>,
    pub lag_p99_ms: Option<f64>,
    pub lag_max_ms: Option<f64>,
    /// VmRSS of `herald serve`.
    pub rss_mib: Option<f64>,
    /// Events scheduled but not yet sent by the generator, at the end of the interval.
    pub backlog: u64,
    /// Longest time with no 202 completing.
    pub stall_ms: f64,
    pub acks_over_100ms: u64,
    pub storage: Option<Sample>,
    /// (database size now − size when the soak started) / pushes received since.
    pub bytes_per_push: Option<f64>,
}

impl Row {
    /// The interval's lag figures from the fake's histogram.
    pub fn lags(&mut self, lags: &LagHistogram) {
        self.lag_p50_ms = ms(lags.quantile_us(0.50));
        self.lag_p99_ms = ms(lags.quantile_us(0.99));
        self.lag_max_ms = ms((lags.count() > 0).then_some(lags.max_us()));
    }
}

fn opt(v: Option<f64>, width: usize, decimals: usize) -> String {
    match v {
        Some(v) => format!("{v:>width$.decimals$}"),
        None => format!("{:>width$}", "-"),
    }
}

pub fn print_header(engine: &str) {
    println!(
        "{engine}: every row is one interval; latencies in ms; ack latency from the scheduled \
         send time; lag = scheduled publish -> push received by the fake APNs"
    );
    println!(
        "{:>6} | {:>7} {:>6} | {:>7} {:>7} {:>7} | {:>7} | {:>7} {:>7} {:>7} | {:>7} | {:>7} | {:>8} {:>6} | {:>9}",
        "t s",
        "acks/s",
        "errors",
        "ack p50",
        "p99",
        "max",
        "push/s",
        "lag p50",
        "p99",
        "max",
        "RSS MiB",
        "backlog",
        "stall ms",
        ">100ms",
        "bytes/push"
    );
}

pub fn print_row(row: &Row) {
    let errors: u64 = row.errors.values().sum();
    println!(
        "{:>6.0} | {:>7.1} {:>6} | {} {} {} | {} | {} {} {} | {} | {:>7} | {:>8.1} {:>6} | {}",
        row.elapsed_s,
        row.acks_per_s,
        errors,
        opt(row.ack_p50_ms, 7, 1),
        opt(row.ack_p99_ms, 7, 1),
        opt(row.ack_max_ms, 7, 1),
        opt(row.pushes_per_s, 7, 1),
        opt(row.lag_p50_ms, 7, 1),
        opt(row.lag_p99_ms, 7, 1),
        opt(row.lag_max_ms, 7, 1),
        opt(row.rss_mib, 7, 1),
        row.backlog,
        row.stall_ms,
        row.acks_over_100ms,
        opt(row.bytes_per_push, 9, 0),
    );
    if !row.errors.is_empty() {
        println!("         errors by status: {:?}", row.errors);
    }
    match &row.storage {
        Some(Sample::Sqlite {
            db_bytes,
            wal_bytes,
            file_bytes,
            page_count,
            freelist_count,
        }) => println!(
            "         sqlite: db {:.1} MiB ({page_count} pages, {freelist_count} free), \
             file {:.1} MiB, wal {:.1} MiB",
            *db_bytes as f64 / MIB,
            *file_bytes as f64 / MIB,
            *wal_bytes as f64 / MIB,
        ),
        Some(Sample::Postgres { db_bytes, tables }) => {
            println!("         database {:.1} MiB", *db_bytes as f64 / MIB);
            for t in tables {
                // Empty tables (jobs, webhooks in this load) and the migration log say nothing.
                if t.name.starts_with("_sqlx") || (t.live == 0 && t.dead == 0 && t.upd == 0) {
                    continue;
                }
                let hot = if t.upd > 0 {
                    format!("{:>3.0}%", 100.0 * t.hot_upd as f64 / t.upd as f64)
                } else {
                    "   -".into()
                };
                println!(
                    "         {:<18} heap {:>8.1} MiB idx {:>8.1} MiB live {:>9} dead {:>9} \
                     upd {:>9} hot {hot} autovac {} vac {}",
                    t.name,
                    t.bytes as f64 / MIB,
                    t.index_bytes as f64 / MIB,
                    t.live,
                    t.dead,
                    t.upd,
                    t.last_autovacuum.as_deref().unwrap_or("-"),
                    t.last_vacuum.as_deref().unwrap_or("-"),
                );
            }
        }
        None => {}
    }
    match serde_json::to_string(row) {
        Ok(json) => println!("SOAK_JSON {json}"),
        Err(e) => println!("SOAK_JSON {{\"error\":\"{e}\"}}"),
    }
}

/// First or last window of a run.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Window {
    pub acks_per_s: f64,
    pub pushes_per_s: Option<f64>,
    pub ack_p99_ms: Option<f64>,
    pub lag_p99_ms: Option<f64>,
}

/// A run's summary.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub engine: String,
    pub users: usize,
    pub connections: usize,
    /// Events/s offered.
    pub rate: f64,
    /// How the rate was chosen.
    pub rate_from: String,
    pub secs: u64,
    /// Length of the first and last windows compared.
    pub window_s: u64,
    pub first: Window,
    pub last: Window,
    /// Largest dead-tuple count seen per table (PostgreSQL), and the count at the end.
    pub dead_tuples: BTreeMap<String, (i64, i64)>,
    /// Largest freelist seen (SQLite), pages.
    pub max_freelist: Option<i64>,
    pub max_stall_ms: f64,
    pub acks_over_100ms: u64,
    pub bytes_per_push: Option<f64>,
    pub total_acks: u64,
    pub total_pushes: u64,
    pub errors: BTreeMap<String, u64>,
    /// Largest backlog at a report.
    pub max_backlog: u64,
    pub max_rss_mib: Option<f64>,
}

fn ratio(last: Option<f64>, first: Option<f64>) -> Option<f64> {
    match (last, first) {
        (Some(l), Some(f)) if f > 0.0 => Some(l / f),
        _ => None,
    }
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "PASS",
        Some(false) => "FAIL",
        None => "n/a",
    }
}

impl Summary {
    pub fn print(&self) {
        let (f, l) = (&self.first, &self.last);
        let w = self.window_s;
        println!(
            "== soak summary, {}: {} s at {:.0} events/s ({}), {} users, {} connections",
            self.engine, self.secs, self.rate, self.rate_from, self.users, self.connections
        );
        let acks = ratio(Some(l.acks_per_s), Some(f.acks_per_s));
        let pushes = ratio(l.pushes_per_s, f.pushes_per_s);
        let throughput_ok = match (acks, pushes) {
            (Some(a), Some(p)) => Some(a >= 0.8 && p >= 0.8),
            _ => None,
        };
        println!(
            "  throughput  first {w} s: acks {:.1}/s pushes {}/s | last {w} s: acks {:.1}/s \
             pushes {}/s | last/first: acks {} pushes {} | {} (goal: last >= 0.8 x first)",
            f.acks_per_s,
            opt(f.pushes_per_s, 1, 1),
            l.acks_per_s,
            opt(l.pushes_per_s, 1, 1),
            opt(acks, 1, 2),
            opt(pushes, 1, 2),
            verdict(throughput_ok),
        );
        let p99 = ratio(l.ack_p99_ms, f.ack_p99_ms);
        println!(
            "  ack p99     first {} ms | last {} ms | last/first {} | {} (goal: last <= 1.2 x first)",
            opt(f.ack_p99_ms, 1, 1),
            opt(l.ack_p99_ms, 1, 1),
            opt(p99, 1, 2),
            verdict(p99.map(|r| r <= 1.2)),
        );
        println!(
            "  lag p99     first {} ms | last {} ms | last/first {} (publish -> push; no goal)",
            opt(f.lag_p99_ms, 1, 1),
            opt(l.lag_p99_ms, 1, 1),
            opt(ratio(l.lag_p99_ms, f.lag_p99_ms), 1, 2),
        );
        let stall_goal = if self.engine == "sqlite" {
            format!(
                "{} (goal on SQLite: no stall over 100 ms)",
                verdict(Some(self.max_stall_ms <= 100.0))
            )
        } else {
            "(the 100 ms goal is SQLite's)".into()
        };
        println!(
            "  stall       longest {:.1} ms without a 202; {} acks over 100 ms | {stall_goal}",
            self.max_stall_ms, self.acks_over_100ms
        );
        if !self.dead_tuples.is_empty() {
            let dead: Vec<String> = self
                .dead_tuples
                .iter()
                .filter(|(t, (max, _))| *max > 0 && !t.starts_with("_sqlx"))
                .map(|(t, (max, end))| format!("{t} {max} (end {end})"))
                .collect();
            println!(
                "  dead tuples max per table: {}",
                if dead.is_empty() {
                    "none".into()
                } else {
                    dead.join(", ")
                }
            );
        }
        if let Some(free) = self.max_freelist {
            println!("  freelist    largest {free} pages");
        }
        println!(
            "  bytes/push  {} | RSS max {} MiB | backlog max {}",
            opt(self.bytes_per_push, 1, 0),
            opt(self.max_rss_mib, 1, 1),
            self.max_backlog
        );
        let errors: u64 = self.errors.values().sum();
        println!(
            "  totals      acks {} | pushes {} | pushes behind acks at the end {} | errors {errors} {:?}",
            self.total_acks,
            self.total_pushes,
            self.total_acks.saturating_sub(self.total_pushes),
            self.errors
        );
        match serde_json::to_string(self) {
            Ok(json) => println!("SOAK_SUMMARY_JSON {json}"),
            Err(e) => println!("SOAK_SUMMARY_JSON {{\"error\":\"{e}\"}}"),
        }
    }
}
