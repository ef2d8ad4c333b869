//! Lanes: the senders of one app and provider, in closed loops on one queue, which is what
//! bounds the pushes in flight per app and provider; and what one push attempt records.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tracing::Instrument;

use super::payload;
use crate::config::DispatchConfig;
use crate::devices::{ApnsEnvironment, Platform};
use crate::providers::{Providers, PushOutcome, apns};
use crate::queue::Backoff;
use crate::store::{DeliveryOutcome, DeliveryResult, DueDelivery};

/// Shared by every lane.
pub(super) struct Context {
    pub(super) providers: Providers,
    pub(super) config: DispatchConfig,
    pub(super) backoff: Backoff,
}

/// Counters and the lag histogram of one lane, registered once rather than looked up by
/// their labels on every push.
struct LaneMetrics {
    delivered: metrics::Counter,
    retry: metrics::Counter,
    failed: metrics::Counter,
    invalid_token: metrics::Counter,
    held: metrics::Counter,
    pruned: metrics::Counter,
    misconfigured: metrics::Counter,
    released: metrics::Counter,
    lag: metrics::Histogram,
}

impl LaneMetrics {
    fn new(app: &str, platform: Platform) -> Self {
        let provider = provider_label(platform);
        let pushes = |outcome: &'static str| metrics::counter!("herald_pushes_total", "provider" => provider, "app" => app.to_string(), "outcome" => outcome);
        Self {
            delivered: pushes("delivered"),
            retry: pushes("retry"),
            failed: pushes("failed"),
            invalid_token: pushes("invalid_token"),
            held: pushes("held"),
            pruned: metrics::counter!("herald_pruned_tokens_total", "provider" => provider, "app" => app.to_string()),
            misconfigured: metrics::counter!("herald_provider_misconfigured_total", "provider" => provider, "app" => app.to_string()),
            released: metrics::counter!("herald_deliveries_released_total", "provider" => provider, "app" => app.to_string()),
            lag: metrics::histogram!("herald_delivery_lag_seconds", "provider" => provider),
        }
    }
}

/// What the senders of one (app, provider) share.
struct LaneState {
    app: String,
    platform: Platform,
    /// The provider rejected our credentials: its deliveries are held until then.
    held: Mutex<Option<DateTime<Utc>>>,
    metrics: LaneMetrics,
}

impl LaneState {
    fn held_until(&self) -> Option<DateTime<Utc>> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .filter(|until| *until > Utc::now())
    }

    fn hold(&self, until: DateTime<Utc>) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
    }
}

/// A delivery on its way to a lane, holding its slot of the dispatcher's batch.
type Queued = (DueDelivery, OwnedSemaphorePermit);

/// One (app, provider): `dispatch.concurrency` senders in closed loops on one queue, which is
/// what bounds the pushes in flight per app and provider (no task or semaphore wait per push).
struct Lane {
    queue: flume::Sender<Queued>,
}

/// Every lane of a dispatcher, started the first time its app and provider come up.
pub(super) struct Lanes {
    context: Arc<Context>,
    results: mpsc::Sender<DeliveryResult>,
    /// By app, then platform (APNs, FCM).
    by_app: HashMap<String, [Option<Lane>; 2]>,
}

impl Lanes {
    /// No lanes yet; their senders will report to `results`.
    pub(super) fn new(context: Arc<Context>, results: mpsc::Sender<DeliveryResult>) -> Self {
        Self {
            context,
            results,
            by_app: HashMap::new(),
        }
    }

    /// Hand `delivery` to the senders of its app and provider. Dropping the lanes stops them
    /// once their queues are empty.
    pub(super) fn queue(&mut self, delivery: DueDelivery, slot: OwnedSemaphorePermit) {
        if !self.by_app.contains_key(delivery.app_id.as_str()) {
            self.by_app.insert(delivery.app_id.clone(), [None, None]);
        }
        let Some(of_app) = self.by_app.get_mut(delivery.app_id.as_str()) else {
            return;
        };
        let (context, results) = (&self.context, &self.results);
        let lane = of_app[lane_index(delivery.platform)].get_or_insert_with(|| {
            let (queue, taken) = flume::unbounded();
            let state = Arc::new(LaneState {
                app: delivery.app_id.clone(),
                platform: delivery.platform,
                held: Mutex::new(None),
                metrics: LaneMetrics::new(&delivery.app_id, delivery.platform),
            });
            for _ in 0..context.config.concurrency.max(1) {
                tokio::spawn(lane_sender(
                    context.clone(),
                    state.clone(),
                    taken.clone(),
                    results.clone(),
                ));
            }
            Lane { queue }
        });
        // The senders stop only when the queue is dropped, with the lanes: this cannot fail, and
        // if it did the delivery's lease would run out and it would be sent again.
        let _ = lane.queue.send((delivery, slot));
    }
}

fn lane_index(platform: Platform) -> usize {
    match platform {
        Platform::Apns => 0,
        Platform::Fcm => 1,
    }
}

/// A lane's sender: takes the next delivery, sends it, hands the outcome to the recorder.
async fn lane_sender(
    context: Arc<Context>,
    lane: Arc<LaneState>,
    queue: flume::Receiver<Queued>,
    results: mpsc::Sender<DeliveryResult>,
) {
    while let Ok((delivery, slot)) = queue.recv_async().await {
        // Debug level: at info, the fmt subscriber's bookkeeping for this span and FCM's (a
        // record per span, its fields formatted, an enter and exit per poll) took 4% of the
        // pipeline's CPU (profiled). Events worth an info line carry their own fields.
        let span = tracing::debug_span!(
            "delivery",
            tracking_id = ?delivery.update.tracking_id,
            device_id = %delivery.device_id,
            seq = delivery.update.seq,
            attempt = delivery.attempt,
        );
        let result = send_one(&context, &lane, delivery).instrument(span).await;
        let _ = results.send(result).await;
        drop(slot);
    }
}

fn provider_label(platform: Platform) -> &'static str {
    match platform {
        Platform::Apns => "apns",
        Platform::Fcm => "fcm",
    }
}

/// Send one delivery and decide what to record.
async fn send_one(context: &Context, lane: &LaneState, delivery: DueDelivery) -> DeliveryResult {
    let config = &context.config;
    let ttl =
        chrono::Duration::seconds(i64::try_from(config.push_ttl_secs).unwrap_or(i64::MAX / 2));
    let expires = delivery.update.created_at + ttl;
    let now = Utc::now();
    let metrics = &lane.metrics;
    // A push started this late could still be in flight when the lease runs out and the sweep
    // hands the delivery to another sender: the device would get it twice. Half the lease is
    // the room a push needs to finish (the providers' request timeout) and be recorded.
    let margin = chrono::Duration::milliseconds(
        i64::try_from(config.lease_secs.saturating_mul(500)).unwrap_or(i64::MAX / 2),
    );
    let outcome = if now
        .checked_add_signed(margin)
        .is_none_or(|latest| latest > delivery.lease_until)
    {
        DeliveryOutcome::Released
    } else if now >= expires {
        DeliveryOutcome::Failed {
            reason: "expired before it could be delivered".into(),
        }
    } else if let Some(until) = lane.held_until() {
        DeliveryOutcome::Hold {
            until,
            reason: "provider credentials rejected; holding".into(),
        }
    } else {
        let pushed = push(context, &delivery, expires).await;
        classify(context, lane, &delivery, pushed, expires)
    };
    let label = match &outcome {
        DeliveryOutcome::Sent { .. } => {
            let lag = (Utc::now() - delivery.update.created_at)
                .to_std()
                .unwrap_or_default();
            metrics.lag.record(lag.as_secs_f64());
            metrics.delivered.increment(1);
            "delivered"
        }
        DeliveryOutcome::Retry { .. } => {
            metrics.retry.increment(1);
            "retry"
        }
        DeliveryOutcome::Failed { .. } => {
            metrics.failed.increment(1);
            "failed"
        }
        DeliveryOutcome::InvalidToken { .. } => {
            metrics.pruned.increment(1);
            metrics.invalid_token.increment(1);
            "invalid_token"
        }
        DeliveryOutcome::Hold { .. } => {
            metrics.held.increment(1);
            "held"
        }
        DeliveryOutcome::Released => {
            metrics.released.increment(1);
            "released"
        }
    };
    tracing::debug!(outcome = label, "push attempt finished");
    DeliveryResult::of(&delivery, outcome)
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
            Ok(sender.send(request).await)
        }
    }
}

/// Map the provider's class to what the outbox records.
fn classify(
    context: &Context,
    lane: &LaneState,
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
            lane.hold(until);
            lane.metrics.misconfigured.increment(1);
            tracing::error!(app = %lane.app, provider = provider_label(lane.platform), %reason,
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
