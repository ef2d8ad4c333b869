//! Appending to the per-user update log, shared by both engines: the counters, the updates
//! and their outbox rows, in a transaction the caller owns (a job transition, a published
//! batch). Expanded once per engine like `shared`.

/// Implement the append helpers for `$ty` on database `$db`.
macro_rules! impl_append {
    ($ty:ty, $db:ty) => {
        impl $ty {
            /// Append one update to `user_id`'s log inside `tx`.
            async fn append_update(
                tx: &mut sqlx::Transaction<'_, $db>,
                user_id: &str,
                new: &$crate::updates::NewUpdate,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<$crate::updates::Update, super::StoreError> {
                let mut appended = Self::append_updates(tx, &[(user_id, new)], now).await?;
                appended.pop().ok_or_else(|| super::StoreError::Corrupt("no update appended".into()))
            }

            /// Append updates to their users' logs inside `tx`, in order, each with one
            /// delivery per active device of its user (the outbox).
            async fn append_updates(
                tx: &mut sqlx::Transaction<'_, $db>,
                events: &[(&str, &$crate::updates::NewUpdate)],
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<Vec<$crate::updates::Update>, super::StoreError> {
                let appended = Self::append_updates_leased(tx, events, now, None).await?;
                // Nothing was handed off, so nothing else holds these: no copy is made.
                Ok(appended.updates.into_iter().map(std::sync::Arc::unwrap_or_clone).collect())
            }

            /// [`Self::append_updates`], with the deliveries written as claimed under
            /// `handoff` (and returned) when given. A few statements per chunk of rows however
            /// many updates there are.
            async fn append_updates_leased(
                tx: &mut sqlx::Transaction<'_, $db>,
                events: &[(&str, &$crate::updates::NewUpdate)],
                now: chrono::DateTime<chrono::Utc>,
                handoff: Option<&super::outbox::Handoff>,
            ) -> Result<super::outbox::Appended, super::StoreError> {
                use std::collections::{BTreeMap, HashMap};
                // Each user's counter moves once per batch, and the counters are taken in one
                // order (sorted by user) by every writer, so concurrent batches cannot deadlock.
                let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
                for (user, _) in events {
                    *counts.entry(*user).or_default() += 1;
                }
                let of_user: HashMap<&str, i64> = counts.iter().map(|(u, n)| (*u, *n)).collect();
                let counts: Vec<(&str, i64)> = counts.into_iter().collect();
                let mut next: HashMap<String, i64> = HashMap::with_capacity(counts.len());
                for chunk in super::outbox::chunked(&counts) {
                    let bumped = Self::bump_counters(tx, chunk).await?;
                    for (user, last) in bumped {
                        let n = of_user.get(user.as_str()).copied().unwrap_or(1);
                        next.insert(user, last - n + 1);
                    }
                }
                let mut appended = Vec::with_capacity(events.len());
                for (user, new) in events {
                    let seq = next.get_mut(*user).ok_or_else(|| {
                        sqlx::Error::Protocol(format!("no sequence returned for user {user}"))
                    })?;
                    appended.push(std::sync::Arc::new(new.appended(uuid::Uuid::now_v7(), *seq, now)));
                    *seq += 1;
                }
                let rows: Vec<(&str, &std::sync::Arc<$crate::updates::Update>)> =
                    events.iter().map(|(user, _)| *user).zip(&appended).collect();
                let (status, attempts) = if handoff.is_some() { ("sending", 1) } else { ("pending", 0) };
                for chunk in super::outbox::chunked(&rows) {
                    let mut insert = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO updates (id, user_id, seq, type, tracking_id, status, data, notification, created_at) ",
                    );
                    insert.push_values(chunk, |mut row, (user, u)| {
                        row.push_bind(u.id)
                            .push_bind(*user)
                            .push_bind(u.seq)
                            .push_bind(&u.kind)
                            .push_bind(u.tracking_id)
                            .push_bind(&u.status)
                            .push_bind(u.data.as_ref().map(sqlx::types::Json))
                            .push_bind(u.notification.as_ref().map(sqlx::types::Json))
                            .push_bind(u.created_at);
                    });
                    insert.build().execute(&mut **tx).await?;
                    // The outbox: one delivery per active device, committed with the update itself.
                    let mut outbox = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO deliveries (update_id, device_id, user_id, status, attempts, lease_owner, \
                         lease_expires_at, next_attempt_at, created_at, updated_at) SELECT u.id, v.id, v.user_id, ",
                    );
                    outbox.push_bind(status);
                    outbox.push(", ");
                    outbox.push_bind(attempts);
                    outbox.push(", ");
                    outbox.push_bind(handoff.map(|h| h.owner.as_str()));
                    outbox.push(", ");
                    outbox.push_bind(handoff.map(|h| h.until));
                    outbox.push(
                        ", u.created_at, u.created_at, u.created_at FROM updates u JOIN devices v \
                         ON v.user_id = u.user_id AND v.status = 'active' WHERE u.id IN (",
                    );
                    let mut ids = outbox.separated(", ");
                    for (_, u) in chunk {
                        ids.push_bind(u.id);
                    }
                    outbox.push(")");
                    outbox.build().execute(&mut **tx).await?;
                }
                // Handed-off deliveries are this node's already: no other dispatcher need look.
                if handoff.is_none() {
                    Self::notify_updates(tx).await?;
                }
                let mut claimed = Vec::new();
                if let Some(handoff) = handoff {
                    // The devices the outbox rows were just written for (same transaction, so the
                    // same set), read by user: no row per delivery comes back from the insert.
                    let users: Vec<&str> = of_user.keys().copied().collect();
                    let mut found = Vec::new();
                    for chunk in super::outbox::chunked(&users) {
                        found.extend(Self::active_devices(tx, chunk).await?);
                    }
                    let devices = super::claimed::by_user(found);
                    claimed = super::claimed::hand_off(rows.iter().copied(), &devices, handoff)?;
                }
                Ok(super::outbox::Appended { updates: appended, claimed })
            }
        }
    };
}

pub(super) use impl_append;

/// Per user of a batch of events, how many it has (sorted by user: the order every writer locks
/// counters in), and each event's place among its user's, from 1: what both engines' one-statement
/// appends number updates by.
pub(super) fn places<'a>(
    events: &[(&'a str, &crate::updates::NewUpdate)],
) -> (std::collections::BTreeMap<&'a str, i64>, Vec<i64>) {
    let mut counts = std::collections::BTreeMap::new();
    let mut places = Vec::with_capacity(events.len());
    for (user, _) in events {
        let n = counts.entry(*user).or_default();
        *n += 1;
        places.push(*n);
    }
    (counts, places)
}
