//! The dispatcher: claims due deliveries from the outbox, sends them through APNs and FCM with
//! bounded concurrency per app and provider, and records the outcomes in batches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::DispatchConfig;
use crate::devices::{ApnsEnvironment, Platform};
use crate::providers::{Providers, PushOutcome, apns};
use crate::queue::Backoff;
use crate::store::{DeliveryOutcome, DeliveryResult, DueDelivery, Handoff, HandoffSink, Store};

pub mod payload;

/// How often deliveries whose sender vanished are made due again.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Shortest time between two claims while appends keep coming (each wakes the dispatcher).
const CLAIM_GAP: Duration = Duration::from_millis(5);

/// Most outcomes recorded in one transaction.
const RECORD_MAX: usize = 512;

/// How long a small batch of outcomes waits for more before it is recorded.
const RECORD_LINGER: Duration = Duration::from_millis(10);

/// Shared by every send task.
struct Context {
    providers: Providers,
    config: DispatchConfig,
    backoff: Backoff,
    /// Pushes in flight per (app, platform).
    gates: Mutex<HashMap<(String, Platform), Arc<Semaphore>>>,
    /// Providers that rejected our credentials, held until the instant given.
    holds: Mutex<HashMap<(String, Platform), DateTime<Utc>>>,
}

impl Context {
    fn gate(&self, app: &str, platform: Platform) -> Arc<Semaphore> {
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        gates
            .entry((app.to_string(), platform))
            .or_insert_with(|| Arc::new(Semaphore::new(self.config.concurrency)))
            .clone()
    }

    fn held_until(&self, app: &str, platform: Platform) -> Option<DateTime<Utc>> {
        let holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        holds
            .get(&(app.to_string(), platform))
            .copied()
            .filter(|until| *until > Utc::now())
    }

    fn hold(&self, app: &str, platform: Platform, until: DateTime<Utc>) {
        let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        holds.insert((app.to_string(), platform), until);
    }
}

/// Deliveries this node's appends wrote as claimed by it, waiting to be sent: they skip the
/// claim from the outbox (a transaction, and most of the dispatcher's database work).
pub struct Handoffs {
    owner: String,
    lease: Duration,
    /// Most deliveries waiting here; beyond that appends leave them pending in the outbox.
    room: usize,
    queue: Mutex<Vec<DueDelivery>>,
    ready: tokio::sync::Notify,
    /// Set when the dispatcher stops: later appends leave their deliveries pending, for
    /// whichever node runs next, instead of leasing them to a dispatcher that is gone.
    closed: std::sync::atomic::AtomicBool,
}

impl Handoffs {
    fn take(&self) -> Vec<DueDelivery> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl HandoffSink for Handoffs {
    fn lease(&self) -> Option<Handoff> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let queued = self.queue.lock().unwrap_or_else(|p| p.into_inner()).len();
        let lease = chrono::Duration::from_std(self.lease).unwrap_or(chrono::Duration::seconds(60));
        (queued < self.room).then(|| Handoff {
            owner: self.owner.clone(),
            until: Utc::now() + lease,
        })
    }

    fn hand_over(&self, claimed: Vec<DueDelivery>) {
        if claimed.is_empty() {
            return;
        }
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(claimed);
        self.ready.notify_one();
    }
}

/// Sends every update to every active device of its user.
pub struct Dispatcher {
    store: Arc<dyn Store>,
    context: Arc<Context>,
    handoffs: Arc<Handoffs>,
}

impl Dispatcher {
    /// A dispatcher sending through `providers`.
    pub fn new(store: Arc<dyn Store>, providers: Providers, config: DispatchConfig) -> Self {
        let backoff = Backoff::new(config.backoff_base_ms, config.backoff_max_ms);
        let handoffs = Arc::new(Handoffs {
            owner: format!("handoff:{}", uuid::Uuid::now_v7()),
            lease: Duration::from_secs(config.lease_secs),
            room: config.batch_size,
            queue: Mutex::new(Vec::new()),
            ready: tokio::sync::Notify::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        Self {
            store,
            handoffs,
            context: Arc::new(Context {
                providers,
                config,
                backoff,
                gates: Mutex::new(HashMap::new()),
                holds: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Where this node's appends hand their deliveries over.
    pub fn handoffs(&self) -> Arc<Handoffs> {
        self.handoffs.clone()
    }

    /// Start sending `delivery` once a slot in `inflight` is free.
    async fn spawn_send(
        &self,
        delivery: DueDelivery,
        inflight: &Arc<Semaphore>,
        results: &mpsc::Sender<DeliveryResult>,
    ) {
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            return;
        };
        let context = self.context.clone();
        let results = results.clone();
        let span = tracing::info_span!(
            "delivery",
            tracking_id = ?delivery.update.tracking_id,
            device_id = %delivery.device_id,
            seq = delivery.update.seq,
            attempt = delivery.attempt,
        );
        tokio::spawn(
            async move {
                let result = send_one(&context, delivery).await;
                let _ = results.send(result).await;
                drop(permit);
            }
            .instrument(span),
        );
    }

    /// Claim, send and record until `shutdown`; in-flight sends are finished and recorded.
    pub async fn run(self, shutdown: CancellationToken) {
        let config = &self.context.config;
        let inflight = Arc::new(Semaphore::new(config.batch_size));
        // Claims wait until at least half the slots are free (see below).
        let low_water = config.batch_size.div_ceil(2).max(1);
        let low_water_permits = u32::try_from(low_water).unwrap_or(u32::MAX);
        let (results, results_rx) = mpsc::channel(config.batch_size * 2);
        let recorder = tokio::spawn(record_loop(self.store.clone(), results_rx));
        let appended = self.store.appended();
        let poll = Duration::from_millis(config.poll_interval_ms.max(10));
        let lease = Duration::from_secs(config.lease_secs);
        let mut last_sweep = Instant::now() - SWEEP_EVERY;
        let mut db_backoff = Duration::from_millis(100);
        // Whether the outbox may hold due deliveries: after an append signal, the poll timer or
        // a full claim. A wake-up by handed-over deliveries alone does not query the outbox.
        let mut look = true;
        let mut claimed_at = tokio::time::Instant::now();
        while !shutdown.is_cancelled() {
            if last_sweep.elapsed() >= SWEEP_EVERY {
                last_sweep = Instant::now();
                match self.store.expire_delivery_leases().await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(deliveries = n, "expired delivery leases made due again")
                    }
                    Err(err) => tracing::warn!(error = %err, "delivery lease sweep failed"),
                }
            }
            // Handed over by appends: already claimed, sent first.
            for delivery in self.handoffs.take() {
                self.spawn_send(delivery, &inflight, &results).await;
            }
            let free = inflight.available_permits();
            if free < low_water {
                // More than half the slots are busy, enough to keep the providers busy: claim
                // again when half are free, so claims stay large instead of one transaction per
                // finished push.
                tokio::select! {
                    permit = inflight.acquire_many(low_water_permits) => drop(permit),
                    _ = self.handoffs.ready.notified() => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            if look {
                claimed_at = tokio::time::Instant::now();
                let claimed = match self.store.claim_deliveries(free as i64, lease).await {
                    Ok(claimed) => {
                        db_backoff = Duration::from_millis(100);
                        claimed
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "claiming deliveries failed; backing off");
                        tokio::select! {
                            _ = tokio::time::sleep(db_backoff) => {}
                            _ = shutdown.cancelled() => break,
                        }
                        db_backoff = (db_backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                };
                // As many as asked for: more may be due, look again at once.
                look = claimed.len() >= free;
                for delivery in claimed {
                    self.spawn_send(delivery, &inflight, &results).await;
                }
                if look {
                    continue;
                }
            }
            // Wait for the next append (an append signal is remembered, so none is missed
            // between the claim and here) or handed-over deliveries, rather than running
            // another claim that would find little or nothing.
            tokio::select! {
                _ = appended.notified() => look = true,
                _ = self.handoffs.ready.notified() => {}
                _ = tokio::time::sleep(poll) => look = true,
                _ = shutdown.cancelled() => break,
            }
            if look {
                // Under a stream of appends, at most one claim per CLAIM_GAP: the updates of
                // that moment are claimed together instead of one transaction each. After a
                // quiet spell the claim runs at once.
                tokio::select! {
                    _ = tokio::time::sleep_until(claimed_at + CLAIM_GAP) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
        // No more handoffs; what was handed over already is sent with the rest (anything handed
        // over after this point waits for its lease to run out, then any node sends it).
        self.handoffs
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        for delivery in self.handoffs.take() {
            self.spawn_send(delivery, &inflight, &results).await;
        }
        // Let in-flight sends finish (provider requests time out on their own), then record.
        let all = u32::try_from(config.batch_size).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(Duration::from_secs(35), inflight.acquire_many(all)).await;
        drop(results);
        let _ = recorder.await;
        tracing::info!("dispatcher stopped");
    }
}

/// Persist outcomes in batches: whatever arrived while the previous batch was written, topped
/// up for a moment when that is little.
async fn record_loop(store: Arc<dyn Store>, mut rx: mpsc::Receiver<DeliveryResult>) {
    let mut batch = Vec::with_capacity(RECORD_MAX);
    while rx.recv_many(&mut batch, RECORD_MAX).await > 0 {
        // A small batch waits a moment for more: fewer, larger transactions (on SQLite each one
        // takes the single writer and an fsync away from appends). The pushes are already out;
        // only the bookkeeping waits.
        let linger = tokio::time::Instant::now() + RECORD_LINGER;
        while batch.len() < RECORD_MAX / 2 {
            let room = RECORD_MAX - batch.len();
            match tokio::time::timeout_at(linger, rx.recv_many(&mut batch, room)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let mut delay = Duration::from_millis(50);
        for attempt in 0..6 {
            match store.record_deliveries(&batch).await {
                Ok(()) => break,
                Err(err) if attempt < 5 => {
                    tracing::warn!(error = %err, "recording delivery outcomes failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(err) => {
                    // The leases expire and these deliveries are sent again: at least once.
                    tracing::error!(error = %err, deliveries = batch.len(), "could not record delivery outcomes");
                }
            }
        }
        batch.clear();
    }
}

fn provider_label(platform: Platform) -> &'static str {
    match platform {
        Platform::Apns => "apns",
        Platform::Fcm => "fcm",
    }
}

/// Send one delivery and decide what to record.
async fn send_one(context: &Context, delivery: DueDelivery) -> DeliveryResult {
    let config = &context.config;
    let platform = delivery.platform;
    let app = delivery.app_id.clone();
    let ttl =
        chrono::Duration::seconds(i64::try_from(config.push_ttl_secs).unwrap_or(i64::MAX / 2));
    let expires = delivery.update.created_at + ttl;
    let now = Utc::now();
    let outcome = if now >= expires {
        DeliveryOutcome::Failed {
            reason: "expired before it could be delivered".into(),
        }
    } else if let Some(until) = context.held_until(&app, platform) {
        DeliveryOutcome::Hold {
            until,
            reason: "provider credentials rejected; holding".into(),
        }
    } else {
        let gate = context.gate(&app, platform);
        let _slot = gate.acquire_owned().await;
        let pushed = push(context, &delivery, expires).await;
        classify(context, &delivery, pushed, expires)
    };
    let label = match &outcome {
        DeliveryOutcome::Sent { .. } => {
            let lag = (Utc::now() - delivery.update.created_at)
                .to_std()
                .unwrap_or_default();
            metrics::histogram!("herald_delivery_lag_seconds", "provider" => provider_label(platform))
                .record(lag.as_secs_f64());
            "delivered"
        }
        DeliveryOutcome::Retry { .. } => "retry",
        DeliveryOutcome::Failed { .. } => "failed",
        DeliveryOutcome::InvalidToken { .. } => {
            metrics::counter!("herald_pruned_tokens_total", "provider" => provider_label(platform), "app" => app.clone())
                .increment(1);
            "invalid_token"
        }
        DeliveryOutcome::Hold { .. } => "held",
    };
    metrics::counter!("herald_pushes_total", "provider" => provider_label(platform), "app" => app, "outcome" => label)
        .increment(1);
    tracing::debug!(outcome = label, "push attempt finished");
    DeliveryResult {
        update_id: delivery.update.id,
        device_id: delivery.device_id,
        attempt: delivery.attempt,
        outcome,
    }
}

/// The provider call; `Err` is a reason this delivery can never be sent.
async fn push(
    context: &Context,
    delivery: &DueDelivery,
    expires: DateTime<Utc>,
) -> Result<PushOutcome, String> {
    match delivery.platform {
        Platform::Apns => {
            let sender = context
                .providers
                .apns(&delivery.app_id)
                .ok_or_else(|| format!("app {} has no APNs credentials", delivery.app_id))?;
            let environment = match delivery.environment {
                Some(ApnsEnvironment::Sandbox) => apns::Environment::Sandbox,
                _ => apns::Environment::Production,
            };
            let request =
                payload::apns_request(&delivery.update, &delivery.token, environment, expires)
                    .map_err(|e| e.to_string())?;
            Ok(sender.send(&request).await)
        }
        Platform::Fcm => {
            let sender = context
                .providers
                .fcm(&delivery.app_id)
                .ok_or_else(|| format!("app {} has no FCM credentials", delivery.app_id))?;
            let left = (expires - Utc::now()).to_std().unwrap_or_default();
            let request = payload::fcm_request(&delivery.update, &delivery.token, left);
            Ok(sender.send(&request).await)
        }
    }
}

/// Map the provider's class to what the outbox records.
fn classify(
    context: &Context,
    delivery: &DueDelivery,
    pushed: Result<PushOutcome, String>,
    expires: DateTime<Utc>,
) -> DeliveryOutcome {
    let config = &context.config;
    match pushed {
        Err(reason) => DeliveryOutcome::Failed { reason },
        Ok(PushOutcome::Delivered { provider_id }) => DeliveryOutcome::Sent { provider_id },
        Ok(PushOutcome::InvalidToken { reason, since }) => {
            DeliveryOutcome::InvalidToken { reason, since }
        }
        Ok(PushOutcome::Permanent { reason }) => DeliveryOutcome::Failed { reason },
        Ok(PushOutcome::Misconfigured { reason }) => {
            let until = Utc::now()
                + chrono::Duration::seconds(i64::try_from(config.hold_secs).unwrap_or(60));
            context.hold(&delivery.app_id, delivery.platform, until);
            metrics::counter!("herald_provider_misconfigured_total", "provider" => provider_label(delivery.platform), "app" => delivery.app_id.clone())
                .increment(1);
            tracing::error!(app = %delivery.app_id, provider = provider_label(delivery.platform), %reason,
                "provider rejected Herald's credentials; holding its deliveries");
            DeliveryOutcome::Hold { until, reason }
        }
        Ok(PushOutcome::Retry {
            retry_after,
            reason,
        }) => {
            let backoff = context.backoff.delay(delivery.attempt);
            // Never earlier than the provider asked.
            let wait = retry_after.map_or(backoff, |after| after.max(backoff));
            let at = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
            if delivery.attempt >= config.max_attempts || at >= expires {
                DeliveryOutcome::Failed {
                    reason: format!("gave up after {} attempts: {reason}", delivery.attempt),
                }
            } else {
                DeliveryOutcome::Retry { at, reason }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::updates::Update;

    fn handoffs(room: usize) -> Handoffs {
        Handoffs {
            owner: "handoff:test".into(),
            lease: Duration::from_secs(60),
            room,
            queue: Mutex::new(Vec::new()),
            ready: tokio::sync::Notify::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn delivery() -> DueDelivery {
        DueDelivery {
            update: Update {
                seq: 1,
                id: uuid::Uuid::now_v7(),
                kind: "order.shipped".into(),
                tracking_id: None,
                status: None,
                data: None,
                notification: None,
                created_at: Utc::now(),
            },
            user_id: "alice".into(),
            device_id: uuid::Uuid::now_v7(),
            platform: Platform::Fcm,
            token: "t".into(),
            environment: None,
            app_id: "com.example.app".into(),
            attempt: 1,
        }
    }

    #[test]
    fn leases_only_while_open_and_with_room() {
        let h = handoffs(2);
        let lease = h.lease().expect("open and empty");
        assert_eq!(lease.owner, "handoff:test");
        assert!(lease.until > Utc::now() + chrono::Duration::seconds(59));
        h.hand_over(vec![delivery(), delivery()]);
        assert!(
            h.lease().is_none(),
            "full: appends leave deliveries pending"
        );
        assert_eq!(h.take().len(), 2);
        assert!(h.lease().is_some(), "room again once taken");
        h.closed.store(true, Ordering::Release);
        assert!(h.lease().is_none(), "a stopped dispatcher takes no more");
    }
}
