//! Logs (tracing) and metrics (Prometheus) set-up, and the HTTP metrics middleware.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Latency buckets in seconds: sub-millisecond to ten seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Install the global tracing subscriber (once per process; later calls are ignored).
pub fn init_tracing(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr so stdout carries only what commands print (the listen line, tokens).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The process-wide Prometheus recorder (metrics macros report to one global recorder).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; we still render our own.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Count requests by route, method and status, and time them.
pub async fn record_http_metrics(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("herald_http_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("herald_http_request_duration_seconds", "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    response
}

/// How often recorded histogram samples are folded into their buckets.
const METRICS_UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Fold the histograms' recorded samples into their buckets every few seconds until
/// `shutdown`. The recorder keeps every sample until it is folded, which otherwise happens only
/// when /metrics is scraped: a node nobody scrapes grew by two samples per push (the soak
/// benchmark measured its RSS rising steadily under load).
pub async fn run_metrics_upkeep(
    handle: PrometheusHandle,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut ticks = tokio::time::interval(METRICS_UPKEEP);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => handle.run_upkeep(),
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Refresh the storage gauges (jobs by status, queue depth, deliveries waiting) every `every`
/// until `shutdown`; each node reports the shared database's view.
pub async fn run_gauges(
    store: std::sync::Arc<dyn crate::store::Store>,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    const STATUSES: [&str; 5] = ["pending", "processing", "completed", "failed", "canceled"];
    loop {
        if let Ok(counts) = store.job_counts().await {
            for status in STATUSES {
                let n = counts
                    .iter()
                    .find(|(s, _)| s == status)
                    .map_or(0, |(_, n)| *n);
                metrics::gauge!("herald_jobs", "status" => status).set(n as f64);
            }
            let depth = counts
                .iter()
                .filter(|(s, _)| s == "pending")
                .map(|(_, n)| *n)
                .sum::<i64>();
            metrics::gauge!("herald_queue_depth").set(depth as f64);
        }
        if let Ok(n) = store.pending_deliveries().await {
            metrics::gauge!("herald_deliveries_pending").set(n as f64);
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
