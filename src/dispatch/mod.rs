//! The dispatcher: claims due deliveries from the outbox, sends them through APNs and FCM with
//! bounded concurrency per app and provider, and records the outcomes in batches.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::DispatchConfig;
use crate::providers::Providers;
use crate::queue::Backoff;
use crate::store::{DeliveryResult, DueDelivery, Handoff, HandoffSink, Store};

mod lane;
pub mod payload;

use lane::{Context, Lanes};

/// How often deliveries whose sender vanished are made due again.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Shortest time between two claims while appends keep coming (each wakes the dispatcher).
const CLAIM_GAP: Duration = Duration::from_millis(5);

/// Handed-off deliveries waiting to be sent, in batches: beyond that, appends leave theirs
/// pending in the outbox. A burst that outruns the providers is sent from memory instead of
/// being written pending and claimed back (on PostgreSQL a claim rewrites every row, with an
/// index entry each); a push that waited too long for its lease is released, not sent late.
const HANDOFF_BATCHES: usize = 4;

/// Most outcomes recorded in one transaction. The recorder waits for half this many (or
/// [`RECORD_LINGER`]). On PostgreSQL a statement's fixed cost is worth sharing: the pipeline
/// bench went 0.46–0.47 → 0.48 of the raw rate from 512 to 1,024 (three runs each), and from
/// 1,024 with 10 ms to 2,048 with 20 ms, medians 0.47 → 0.48 (nine and ten runs).
const RECORD_MAX: usize = 2048;

/// How long a small batch of outcomes waits for more before it is recorded. Only bookkeeping
/// waits: the pushes are out, and a slot is freed once its outcome is queued here.
const RECORD_LINGER: Duration = Duration::from_millis(20);

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
            room: config.batch_size.saturating_mul(HANDOFF_BATCHES),
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
            }),
        }
    }

    /// Where this node's appends hand their deliveries over.
    pub fn handoffs(&self) -> Arc<Handoffs> {
        self.handoffs.clone()
    }

    /// Queue `delivery` on its lane once a slot in `inflight` is free.
    async fn enqueue(&self, lanes: &mut Lanes, delivery: DueDelivery, inflight: &Arc<Semaphore>) {
        let Ok(slot) = inflight.clone().acquire_owned().await else {
            return;
        };
        lanes.queue(delivery, slot);
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
        let mut lanes = Lanes::new(self.context.clone(), results.clone());
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
                self.enqueue(&mut lanes, delivery, &inflight).await;
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
                    self.enqueue(&mut lanes, delivery, &inflight).await;
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
            self.enqueue(&mut lanes, delivery, &inflight).await;
        }
        // Let in-flight sends finish (provider requests time out on their own), then record.
        let all = u32::try_from(config.batch_size).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(Duration::from_secs(35), inflight.acquire_many(all)).await;
        // Closing the lanes' queues stops their senders, whose result senders then go too.
        drop(lanes);
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::devices::Platform;
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
            update: Arc::new(Update {
                seq: 1,
                id: uuid::Uuid::now_v7(),
                kind: "order.shipped".into(),
                tracking_id: None,
                status: None,
                data: None,
                notification: None,
                created_at: Utc::now(),
            }),
            user_id: "alice".into(),
            device_id: uuid::Uuid::now_v7(),
            platform: Platform::Fcm,
            token: "t".into(),
            environment: None,
            app_id: "com.example.app".into(),
            attempt: 1,
            lease_until: Utc::now() + chrono::Duration::seconds(60),
            row: Default::default(),
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
