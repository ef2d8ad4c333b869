//! The in-process workers: claim due jobs with a lease, run their handlers, record the outcome
//! fenced by the attempt held, retry with backoff, and drain on shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::QueueConfig;
use crate::jobs::handlers::Progress;
use crate::jobs::{ClaimedJob, HandlerError, JobContext, JobErrorInfo, Lease, Registry};
use crate::store::Store;

pub mod retry;
pub mod wakeup;

pub use retry::Backoff;
pub use wakeup::Wakeup;

/// How often expired leases are swept back into the queue.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

/// Runs the in-process kinds of one node.
pub struct Workers {
    store: Arc<dyn Store>,
    registry: Registry,
    config: QueueConfig,
    wakeup: Arc<Wakeup>,
    owner: String,
}

impl Workers {
    /// Workers for `registry`'s kinds; `owner` names this node in leases.
    pub fn new(
        store: Arc<dyn Store>,
        registry: Registry,
        config: QueueConfig,
        wakeup: Arc<Wakeup>,
        owner: String,
    ) -> Self {
        Self {
            store,
            registry,
            config,
            wakeup,
            owner,
        }
    }

    /// Claim and run jobs until `shutdown`; then finish or release what is held within the
    /// grace period.
    pub async fn run(self, shutdown: CancellationToken) {
        let kinds = self.registry.kinds();
        let slots = Arc::new(Semaphore::new(self.config.concurrency));
        let poll = Duration::from_millis(self.config.poll_interval_ms.max(10));
        let lease = Duration::from_secs(self.config.lease_secs);
        let backoff = Backoff::new(self.config.backoff_base_ms, self.config.backoff_max_ms);
        let stop_handlers = CancellationToken::new();
        let mut running = JoinSet::new();
        let mut last_sweep = Instant::now() - EXPIRE_EVERY;
        let mut db_backoff = Duration::from_millis(100);

        tracing::info!(owner = %self.owner, kinds = ?kinds, concurrency = self.config.concurrency, "workers started");
        while !shutdown.is_cancelled() {
            while running.try_join_next().is_some() {}
            if last_sweep.elapsed() >= EXPIRE_EVERY {
                last_sweep = Instant::now();
                match self.store.expire_leases().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(jobs = n, "expired leases returned to the queue"),
                    Err(err) => tracing::warn!(error = %err, "lease sweep failed"),
                }
            }
            let free = slots.available_permits();
            let mut claimed_all = false;
            if free > 0 && !kinds.is_empty() {
                match self
                    .store
                    .claim_jobs(&kinds, free as i64, &self.owner, lease)
                    .await
                {
                    Ok(jobs) => {
                        db_backoff = Duration::from_millis(100);
                        claimed_all = jobs.len() == free;
                        for job in jobs {
                            let Ok(permit) = slots.clone().try_acquire_owned() else {
                                break;
                            };
                            let Some(handler) = self.registry.get(&job.kind) else {
                                continue;
                            };
                            let run = JobRun {
                                store: self.store.clone(),
                                lease: Lease {
                                    job_id: job.id,
                                    owner: self.owner.clone(),
                                    attempt: Some(job.attempt),
                                },
                                lease_len: lease,
                                backoff,
                                stop: stop_handlers.clone(),
                            };
                            let wakeup = self.wakeup.clone();
                            let span = tracing::info_span!("job", tracking_id = %job.id, kind = %job.kind, attempt = job.attempt);
                            running.spawn(
                                async move {
                                    run.execute(job, handler).await;
                                    drop(permit);
                                    // A free slot is a reason to look for more work.
                                    wakeup.internal.notify_one();
                                }
                                .instrument(span),
                            );
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "claim failed; backing off");
                        tokio::select! {
                            _ = tokio::time::sleep(db_backoff) => {}
                            _ = shutdown.cancelled() => {}
                        }
                        db_backoff = (db_backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            if claimed_all {
                continue;
            }
            tokio::select! {
                _ = self.wakeup.internal.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                _ = shutdown.cancelled() => {}
            }
        }

        let grace = Duration::from_secs(self.config.shutdown_grace_secs);
        tracing::info!(running = running.len(), "workers draining");
        if tokio::time::timeout(grace, async {
            while running.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            // Handlers still running past the deadline are stopped; each releases its lease.
            stop_handlers.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while running.join_next().await.is_some() {}
            })
            .await;
        }
        tracing::info!("workers stopped");
    }
}

/// One attempt of one job.
struct JobRun {
    store: Arc<dyn Store>,
    lease: Lease,
    lease_len: Duration,
    backoff: Backoff,
    stop: CancellationToken,
}

enum Finish {
    Done(Result<serde_json::Value, HandlerError>),
    LeaseLost,
    Stopped,
}

impl JobRun {
    async fn execute(self, job: ClaimedJob, handler: Arc<dyn crate::jobs::JobHandler>) {
        let started = Instant::now();
        let (progress_tx, progress_rx) = mpsc::channel(16);
        let ctx = JobContext::new(job.input.clone(), job.attempt, progress_tx);
        // The handler runs in its own task so a panic becomes a retryable failure, not a lost job.
        let mut work = tokio::spawn(async move { handler.run(&ctx).await });
        let recorder = tokio::spawn(record_progress(
            self.store.clone(),
            self.lease.clone(),
            progress_rx,
        ));
        let mut beat = tokio::time::interval(self.lease_len / 3);
        beat.tick().await;
        let finish = loop {
            tokio::select! {
                joined = &mut work => {
                    break Finish::Done(joined.unwrap_or_else(|err| {
                        Err(HandlerError::retryable("handler_panic", format!("the handler stopped unexpectedly: {err}")))
                    }));
                }
                _ = beat.tick() => {
                    match self.store.heartbeat_job(&self.lease, self.lease_len).await {
                        Ok(Some(_)) => {}
                        Ok(None) => break Finish::LeaseLost,
                        Err(err) => tracing::warn!(error = %err, "heartbeat failed"),
                    }
                }
                _ = self.stop.cancelled() => break Finish::Stopped,
            }
        };
        if !matches!(finish, Finish::Done(_)) {
            work.abort();
        }
        // Progress is recorded before the outcome so the log never shows progress after the end.
        let _ = recorder.await;
        let kind = job.kind.clone();
        let (record, label) = match finish {
            Finish::Done(Ok(result)) => (Record::Complete(result), "completed"),
            Finish::Done(Err(HandlerError::Retryable { code, message })) => {
                let at = Utc::now()
                    + chrono::Duration::from_std(self.backoff.delay(job.attempt))
                        .unwrap_or_default();
                let label = if job.attempt < job.max_attempts {
                    "retry"
                } else {
                    "failed"
                };
                (
                    Record::Fail(JobErrorInfo { code, message }, Some(at)),
                    label,
                )
            }
            Finish::Done(Err(HandlerError::Permanent { code, message })) => {
                (Record::Fail(JobErrorInfo { code, message }, None), "failed")
            }
            Finish::Stopped => (Record::Release, "released"),
            Finish::LeaseLost => (Record::Nothing, "lease_lost"),
        };
        let outcome = self.record(&record).await.map(|held| (held, label));
        match outcome {
            Ok((true, label)) => {
                metrics::counter!("herald_jobs_finished_total", "kind" => kind, "outcome" => label)
                    .increment(1);
                tracing::info!(
                    outcome = label,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "job attempt finished"
                );
            }
            Ok((false, _)) => {
                metrics::counter!("herald_jobs_finished_total", "kind" => kind, "outcome" => "lease_lost").increment(1);
                tracing::warn!("lease lost (expired or canceled); the outcome was not recorded");
            }
            Err(err) => {
                tracing::error!(error = %err, "could not record the outcome; the lease will expire and the job rerun")
            }
        }
    }

    /// Record an outcome, retrying briefly through database hiccups.
    async fn record(&self, record: &Record) -> Result<bool, crate::store::StoreError> {
        let mut delay = Duration::from_millis(50);
        let mut tries = 0;
        loop {
            let written = match record {
                Record::Complete(result) => {
                    self.store.complete_job(&self.lease, result, None).await
                }
                Record::Fail(error, retry_at) => {
                    self.store.fail_job(&self.lease, error, *retry_at).await
                }
                Record::Release => self.store.release_job(&self.lease).await,
                Record::Nothing => Ok(false),
            };
            match written {
                Err(err) if tries < 5 => {
                    tracing::warn!(error = %err, "recording the outcome failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    tries += 1;
                }
                other => return other,
            }
        }
    }
}

/// What to write once an attempt ends.
enum Record {
    Complete(serde_json::Value),
    Fail(JobErrorInfo, Option<chrono::DateTime<Utc>>),
    Release,
    Nothing,
}

/// Persist progress reports, keeping only the newest when several are waiting.
async fn record_progress(store: Arc<dyn Store>, lease: Lease, mut rx: mpsc::Receiver<Progress>) {
    while let Some(mut report) = rx.recv().await {
        while let Ok(newer) = rx.try_recv() {
            report = newer;
        }
        if let Err(err) = store
            .progress_job(&lease, report.percent, report.data)
            .await
        {
            tracing::warn!(error = %err, "progress not recorded");
        }
    }
}
