//! The delivery outbox and the sync log's read side: what the dispatcher claims and records,
//! and what apps ask for when they catch up.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::StoreError;
use crate::devices::{ApnsEnvironment, Platform};
use crate::updates::{NewUpdate, Update};

/// A delivery claimed for sending, with everything needed to build the push.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    /// The update, shared by its deliveries to each of the user's devices.
    pub update: std::sync::Arc<Update>,
    /// Its owner.
    pub user_id: String,
    /// Target device.
    pub device_id: Uuid,
    /// Device platform.
    pub platform: Platform,
    /// Device token.
    pub token: String,
    /// APNs environment.
    pub environment: Option<ApnsEnvironment>,
    /// App whose credentials to use.
    pub app_id: String,
    /// This attempt (1-based); fences the outcome.
    pub attempt: i32,
    /// When the claim's lease runs out and the delivery is due again for any sender.
    pub lease_until: DateTime<Utc>,
    /// Where the claim left its outbox row, for the outcome to find it by.
    pub row: super::RowHint,
}

/// What to record for one sent (or not sent) delivery.
#[derive(Debug, Clone)]
pub enum DeliveryOutcome {
    /// The provider accepted it.
    Sent {
        /// Provider message id.
        provider_id: Option<String>,
    },
    /// Try again at `at`.
    Retry {
        /// Next attempt.
        at: DateTime<Utc>,
        /// Why this one failed.
        reason: String,
    },
    /// Give up on this delivery.
    Failed {
        /// Why.
        reason: String,
    },
    /// The token is dead: invalidate the device (unless it re-registered after `since`) and
    /// drop its pending deliveries.
    InvalidToken {
        /// Provider reason.
        reason: String,
        /// APNs 410 timestamp.
        since: Option<DateTime<Utc>>,
    },
    /// The provider is misconfigured: keep the delivery due at `until` without spending the
    /// attempt.
    Hold {
        /// Next attempt.
        until: DateTime<Utc>,
        /// Why.
        reason: String,
    },
    /// Not sent: too little of the lease was left for a push to finish inside it. Due again
    /// at once, for any sender, without spending the attempt.
    Released,
}

/// One outcome, fenced by the attempt that was claimed.
#[derive(Debug, Clone)]
pub struct DeliveryResult {
    /// Update.
    pub update_id: Uuid,
    /// Device.
    pub device_id: Uuid,
    /// Claimed attempt.
    pub attempt: i32,
    /// What happened.
    pub outcome: DeliveryOutcome,
    /// The claim's [`DueDelivery::row`]; the default finds the row by key.
    pub row: super::RowHint,
}

impl DeliveryResult {
    /// The outcome of `delivery`'s claimed attempt.
    pub fn of(delivery: &DueDelivery, outcome: DeliveryOutcome) -> Self {
        Self {
            update_id: delivery.update.id,
            device_id: delivery.device_id,
            attempt: delivery.attempt,
            outcome,
            row: delivery.row,
        }
    }
}

/// A lease taken while appending: the appending node's dispatcher sends the new deliveries
/// straight away instead of claiming them from the outbox (they are written as claimed by it).
#[derive(Debug, Clone)]
pub struct Handoff {
    /// Lease owner written on the deliveries.
    pub owner: String,
    /// Until when; after that they are due again like any expired claim.
    pub until: DateTime<Utc>,
}

/// Where deliveries claimed at append time go: this node's dispatcher.
pub trait HandoffSink: Send + Sync + 'static {
    /// A lease for an append about to commit, or none when the dispatcher has no room (the
    /// deliveries then wait in the outbox as pending and are claimed as usual).
    fn lease(&self) -> Option<Handoff>;

    /// Take what an append claimed, once it committed.
    fn hand_over(&self, claimed: Vec<DueDelivery>);
}

/// What an append wrote.
#[derive(Debug, Default)]
pub struct Appended {
    /// The updates, in the order given; each is the copy its handed-off deliveries share.
    pub updates: Vec<std::sync::Arc<Update>>,
    /// Their deliveries, when they were appended with a [`Handoff`].
    pub claimed: Vec<DueDelivery>,
}

/// What an acknowledgment did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// Recorded (or ignored as lower than the device's cursor).
    Recorded,
    /// The device is not this user's.
    NoSuchDevice,
    /// `seq` is beyond the user's newest update, which is this one (0: none yet).
    Beyond(i64),
}

/// Delivery and sync storage.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Claim up to `max` due deliveries under a lease of `lease`.
    async fn claim_deliveries(
        &self,
        max: i64,
        lease: Duration,
    ) -> Result<Vec<DueDelivery>, StoreError>;

    /// Record a batch of outcomes in one transaction.
    async fn record_deliveries(&self, results: &[DeliveryResult]) -> Result<(), StoreError>;

    /// Deliveries whose sender vanished go back to pending.
    async fn expire_delivery_leases(&self) -> Result<u64, StoreError>;

    /// Append published events (user, update) to their users' logs, with their deliveries, in
    /// one transaction; with `handoff` the deliveries are written as claimed under it and come
    /// back for this node's dispatcher.
    async fn append_events(
        &self,
        events: &[(String, NewUpdate)],
        handoff: Option<&Handoff>,
    ) -> Result<Appended, StoreError>;

    /// Append published events (user, update) to their users' logs, with their deliveries, in
    /// one transaction; the appended updates come back in order.
    async fn publish_events(
        &self,
        events: &[(String, NewUpdate)],
    ) -> Result<Vec<Update>, StoreError> {
        let appended = self.append_events(events, None).await?;
        // Nothing was handed off, so nothing else holds these: no copy is made.
        Ok(appended
            .updates
            .into_iter()
            .map(std::sync::Arc::unwrap_or_clone)
            .collect())
    }

    /// Append one published event to `user_id`'s log (with its deliveries).
    async fn publish_event(&self, user_id: &str, update: &NewUpdate) -> Result<Update, StoreError> {
        let mut appended = self
            .publish_events(&[(user_id.to_string(), update.clone())])
            .await?;
        appended
            .pop()
            .ok_or_else(|| StoreError::Corrupt("no update appended".into()))
    }

    /// Record that `device_id` (the user's) has seen up to `seq`.
    async fn ack_updates(
        &self,
        user_id: &str,
        device_id: Uuid,
        seq: i64,
    ) -> Result<Acked, StoreError>;

    /// Updates each of the user's devices has not acknowledged.
    async fn unseen_counts(&self, user_id: &str) -> Result<HashMap<Uuid, i64>, StoreError>;

    /// Delete updates older than `before`, and with them their deliveries; returns how many
    /// updates. Runs in bounded batches, so writers are never held up for long.
    async fn purge(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Delete the records of finished deliveries (sent, failed, dropped) of updates older than
    /// `before`, keeping the updates themselves; returns how many records. Pending and
    /// in-flight deliveries stay. Runs in bounded batches.
    async fn purge_outcomes(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Pending or in-flight deliveries (a gauge for /metrics and tests).
    async fn pending_deliveries(&self) -> Result<i64, StoreError>;

    /// Notified after every commit that appended updates (in-process wake-up for dispatch
    /// and live streams; other nodes learn through PostgreSQL NOTIFY).
    fn appended(&self) -> std::sync::Arc<tokio::sync::Notify>;
}

/// How stale a device's `last_push_at` may be before a Sent outcome rewrites it. Under a burst
/// a device is pushed many times a second; writing the row once per second instead of once per
/// push (a row rewrite, and on SQLite a WAL page, per device per batch) is what `relatime` does
/// for file access times. `lastPushAt` is exact to this much.
pub(super) const LAST_PUSH_RESOLUTION: chrono::Duration = chrono::Duration::seconds(1);

/// Rows per statement when recording a batch: the largest power of two up to `left` (at most
/// 256), so a handful of statement shapes cover every batch and stay prepared.
pub(super) fn chunk_len(left: usize) -> usize {
    const MAX_CHUNK: usize = 256;
    if left >= MAX_CHUNK {
        MAX_CHUNK
    } else {
        1 << left.max(1).ilog2()
    }
}

/// `items` in [`chunk_len`] pieces, in order.
pub(super) fn chunked<T>(items: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (chunk, tail) = rest.split_at(chunk_len(rest.len()));
        rest = tail;
        Some(chunk)
    })
}

/// Implement [`Outbox`] for `$ty` on `$db`; `$greatest` is the two-argument maximum function of
/// the dialect. The claim itself is the engine's `claim_due`.
macro_rules! impl_outbox {
    ($ty:ty, $db:ty, $greatest:literal) => {
        #[async_trait::async_trait]
        impl super::outbox::Outbox for $ty {
            async fn claim_deliveries(
                &self,
                max: i64,
                lease: std::time::Duration,
            ) -> Result<Vec<super::outbox::DueDelivery>, super::StoreError> {
                let now = chrono::Utc::now();
                let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(60));
                let token = uuid::Uuid::new_v4().to_string();
                self.claim_due(max, &token, until, now).await
            }

            async fn record_deliveries(
                &self,
                results: &[super::outbox::DeliveryResult],
            ) -> Result<(), super::StoreError> {
                use super::outbox::DeliveryOutcome;
                if results.is_empty() {
                    return Ok(());
                }
                let now = chrono::Utc::now();
                // The engine's one-statement path for Sent outcomes; on SQLite only when the
                // whole batch is Sent (one transaction for all), on PostgreSQL always.
                let sent_recorded = self.record_sent_at_once(results, now).await?;
                let is_sent = |r: &super::outbox::DeliveryResult| matches!(r.outcome, DeliveryOutcome::Sent { .. });
                if sent_recorded && results.iter().all(is_sent) {
                    return Ok(());
                }
                let mut tx = self.writer().begin().await?;
                // Sent, nearly every outcome, is written a chunk of rows per statement; each row
                // is still fenced: only the attempt that was claimed may write its outcome.
                let unrecorded: &[super::outbox::DeliveryResult] = if sent_recorded { &[] } else { results };
                let sent: Vec<_> = unrecorded
                    .iter()
                    .filter_map(|r| match &r.outcome {
                        DeliveryOutcome::Sent { provider_id } => {
                            Some((r.update_id, r.device_id, r.attempt, provider_id.as_deref()))
                        }
                        _ => None,
                    })
                    .collect();
                for chunk in super::outbox::chunked(&sent) {
                    let mut update = sqlx::QueryBuilder::<$db>::new(
                        "WITH sent_batch (b_update, b_device, b_attempt, b_provider) AS (",
                    );
                    update.push_values(chunk, |mut row, (update_id, device_id, attempt, provider_id)| {
                        row.push_bind(*update_id)
                            .push_bind(*device_id)
                            .push_bind(*attempt)
                            .push_bind(*provider_id);
                    });
                    update.push(
                        ") UPDATE deliveries SET status = 'sent', provider_id = b_provider, updated_at = ",
                    );
                    update.push_bind(now);
                    update.push(
                        ", lease_owner = NULL, lease_expires_at = NULL FROM sent_batch \
                         WHERE update_id = b_update AND device_id = b_device AND status = 'sending' \
                         AND attempts = b_attempt",
                    );
                    update.build().execute(&mut *tx).await?;
                    // Every device of the chunk was pushed to, whether or not its row's fence held
                    // (a lost lease only means another sender may push it again), so all are
                    // touched and nothing needs to come back from the update above.
                    let mut devices: Vec<uuid::Uuid> = chunk.iter().map(|(_, device_id, _, _)| *device_id).collect();
                    devices.sort_unstable();
                    devices.dedup();
                    // Padded to the chunk's length with a repeated id (harmless in IN): as few
                    // distinct statements as chunk lengths, so prepared statements are reused.
                    let last = devices[devices.len() - 1];
                    devices.resize(chunk.len(), last);
                    let mut touch = sqlx::QueryBuilder::<$db>::new("UPDATE devices SET last_push_at = ");
                    touch.push_bind(now);
                    touch.push(" WHERE id IN (");
                    let mut ids = touch.separated(", ");
                    for id in &devices {
                        ids.push_bind(*id);
                    }
                    touch.push(") AND (last_push_at IS NULL OR last_push_at < ");
                    touch.push_bind(now - super::outbox::LAST_PUSH_RESOLUTION);
                    touch.push(")");
                    touch.build().execute(&mut *tx).await?;
                }
                // The other outcomes are rare (errors): one fenced statement each.
                for r in results {
                    let (sql, extra_a, extra_b): (&'static str, Option<String>, Option<chrono::DateTime<chrono::Utc>>) =
                        match &r.outcome {
                            DeliveryOutcome::Sent { .. } => continue,
                            DeliveryOutcome::Retry { at, reason } => (
                                concat!(
                                    "UPDATE deliveries SET status = 'pending', last_error = $4, updated_at = $5, \
                                     next_attempt_at = $6, lease_owner = NULL, lease_expires_at = NULL",
                                    " WHERE update_id = $1 AND device_id = $2 AND status = 'sending' AND attempts = $3"
                                ),
                                Some(reason.clone()),
                                Some(*at),
                            ),
                            DeliveryOutcome::Hold { until, reason } => (
                                concat!(
                                    "UPDATE deliveries SET status = 'pending', attempts = attempts - 1, last_error = $4, \
                                     updated_at = $5, next_attempt_at = $6, lease_owner = NULL, lease_expires_at = NULL",
                                    " WHERE update_id = $1 AND device_id = $2 AND status = 'sending' AND attempts = $3"
                                ),
                                Some(reason.clone()),
                                Some(*until),
                            ),
                            DeliveryOutcome::Released => (
                                concat!(
                                    "UPDATE deliveries SET status = 'pending', attempts = attempts - 1, \
                                     last_error = COALESCE($4, last_error), updated_at = $5, next_attempt_at = $5, \
                                     lease_owner = NULL, lease_expires_at = NULL",
                                    " WHERE update_id = $1 AND device_id = $2 AND status = 'sending' AND attempts = $3"
                                ),
                                None,
                                None,
                            ),
                            DeliveryOutcome::Failed { reason } | DeliveryOutcome::InvalidToken { reason, .. } => (
                                concat!(
                                    "UPDATE deliveries SET status = 'failed', last_error = $4, updated_at = $5, \
                                     lease_owner = NULL, lease_expires_at = NULL",
                                    " WHERE update_id = $1 AND device_id = $2 AND status = 'sending' AND attempts = $3"
                                ),
                                Some(reason.clone()),
                                None,
                            ),
                        };
                    let mut query = sqlx::query(sql)
                        .bind(r.update_id)
                        .bind(r.device_id)
                        .bind(r.attempt)
                        .bind(extra_a)
                        .bind(now);
                    if let Some(at) = extra_b {
                        query = query.bind(at);
                    }
                    let done = query.execute(&mut *tx).await?;
                    if done.rows_affected() == 0 {
                        continue;
                    }
                    match &r.outcome {
                        DeliveryOutcome::InvalidToken { reason, since } => {
                            let invalidated = sqlx::query(rows::INVALIDATE_DEVICE)
                                .bind(r.device_id)
                                .bind(reason)
                                .bind(*since)
                                .execute(&mut *tx)
                                .await?
                                .rows_affected();
                            if invalidated > 0 {
                                // Never targeted again: what was still queued for it goes.
                                sqlx::query(
                                    "UPDATE deliveries SET status = 'dropped', last_error = $2, updated_at = $3 \
                                     WHERE device_id = $1 AND status = 'pending'",
                                )
                                .bind(r.device_id)
                                .bind(format!("device invalid: {reason}"))
                                .bind(now)
                                .execute(&mut *tx)
                                .await?;
                            }
                        }
                        _ => {}
                    }
                }
                tx.commit().await?;
                Ok(())
            }

            async fn expire_delivery_leases(&self) -> Result<u64, super::StoreError> {
                let now = chrono::Utc::now();
                let done = sqlx::query(
                    "UPDATE deliveries SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL, \
                     next_attempt_at = $1 WHERE status = 'sending' AND lease_expires_at <= $1",
                )
                .bind(now)
                .execute(self.writer())
                .await?;
                Ok(done.rows_affected())
            }

            async fn append_events(
                &self,
                events: &[(String, $crate::updates::NewUpdate)],
                handoff: Option<&super::outbox::Handoff>,
            ) -> Result<super::outbox::Appended, super::StoreError> {
                if events.is_empty() {
                    return Ok(super::outbox::Appended::default());
                }
                let now = chrono::Utc::now();
                let events: Vec<(&str, &$crate::updates::NewUpdate)> =
                    events.iter().map(|(user, update)| (user.as_str(), update)).collect();
                let appended = match self.append_updates_at_once(&events, now, handoff).await? {
                    Some(appended) => appended,
                    None => {
                        let mut tx = self.writer().begin().await?;
                        let appended = Self::append_updates_leased(&mut tx, &events, now, handoff).await?;
                        tx.commit().await?;
                        appended
                    }
                };
                // Handed-off deliveries reach the dispatcher through the handoff, not a claim.
                if handoff.is_none() {
                    self.signal_appended();
                }
                Ok(appended)
            }

            async fn ack_updates(
                &self,
                user_id: &str,
                device_id: uuid::Uuid,
                seq: i64,
            ) -> Result<super::outbox::Acked, super::StoreError> {
                use super::outbox::Acked;
                // A cursor past the newest update would hide updates appended later.
                let done = sqlx::query(concat!(
                    "INSERT INTO device_cursors (device_id, seq) SELECT id, $3 FROM devices WHERE id = $1 AND user_id = $2 \
                     AND $3 <= COALESCE((SELECT last_seq FROM user_seqs WHERE user_id = $2), 0) \
                     ON CONFLICT (device_id) DO UPDATE SET seq = ",
                    $greatest,
                    "(device_cursors.seq, excluded.seq)"
                ))
                .bind(device_id)
                .bind(user_id)
                .bind(seq)
                .execute(self.writer())
                .await?;
                if done.rows_affected() > 0 {
                    return Ok(Acked::Recorded);
                }
                let (owned, last): (bool, i64) = sqlx::query_as(
                    "SELECT EXISTS (SELECT 1 FROM devices WHERE id = $1 AND user_id = $2), \
                     COALESCE((SELECT last_seq FROM user_seqs WHERE user_id = $2), 0)",
                )
                .bind(device_id)
                .bind(user_id)
                .fetch_one(self.reader())
                .await?;
                Ok(if owned { Acked::Beyond(last) } else { Acked::NoSuchDevice })
            }

            async fn unseen_counts(
                &self,
                user_id: &str,
            ) -> Result<std::collections::HashMap<uuid::Uuid, i64>, super::StoreError> {
                let rows: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
                    "SELECT v.id, (SELECT count(*) FROM updates u WHERE u.user_id = v.user_id \
                     AND u.seq > COALESCE(c.seq, 0)) FROM devices v LEFT JOIN device_cursors c ON c.device_id = v.id \
                     WHERE v.user_id = $1",
                )
                .bind(user_id)
                .fetch_all(self.reader())
                .await?;
                Ok(rows.into_iter().collect())
            }

            async fn purge(&self, before: chrono::DateTime<chrono::Utc>) -> Result<u64, super::StoreError> {
                // Deliveries, finished or not, go with their update (explicitly: neither engine
                // keeps a foreign key from deliveries to updates), first, so that a purge cut
                // short leaves no delivery without its update. Both by id range: see
                // `first_id_at`.
                let bound = super::purge::first_id_at(before);
                for sql in Self::PURGE_DELIVERIES {
                    super::purge::delete_in_batches(self.writer(), sql, bound, Self::rows_affected).await?;
                }
                super::purge::delete_in_batches(self.writer(), Self::PURGE_UPDATES, bound, Self::rows_affected).await
            }

            async fn purge_outcomes(&self, before: chrono::DateTime<chrono::Utc>) -> Result<u64, super::StoreError> {
                let bound = super::purge::first_id_at(before);
                let mut purged = 0;
                for sql in Self::PURGE_OUTCOMES {
                    purged += super::purge::delete_in_batches(self.writer(), sql, bound, Self::rows_affected).await?;
                }
                Ok(purged)
            }

            fn appended(&self) -> std::sync::Arc<tokio::sync::Notify> {
                self.appended.clone()
            }

            async fn pending_deliveries(&self) -> Result<i64, super::StoreError> {
                // Two counts, each over its partial index, instead of a scan of every delivery.
                Ok(sqlx::query_scalar(
                    "SELECT (SELECT count(*) FROM deliveries WHERE status = 'pending') \
                     + (SELECT count(*) FROM deliveries WHERE status = 'sending' \
                     AND lease_expires_at IS NOT NULL)",
                )
                .fetch_one(self.reader())
                .await?)
            }
        }
    };
}

pub(super) use impl_outbox;
