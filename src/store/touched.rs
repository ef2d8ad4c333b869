//! Devices whose `last_push_at` this node wrote within [`LAST_PUSH_RESOLUTION`]: a batch of
//! Sent outcomes leaves them out of its device update. The statement's own condition already
//! skips a device written within the resolution, but only after looking its row up, once per
//! push at full load. Measured on the pipeline bench (PostgreSQL): the whole device write was
//! about a tenth of the server's CPU per push; this filter won back part of it (ratio to raw
//! 0.47–0.48 → 0.48–0.50). Other nodes' writes are not known here: the statement still
//! checks them.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::outbox::LAST_PUSH_RESOLUTION;

/// Entries kept before the first sweep of stale ones.
const SWEEP_FLOOR: usize = 4096;

/// When this node last wrote each device's `last_push_at`.
#[derive(Default)]
pub(super) struct RecentTouches {
    inner: Mutex<Touches>,
}

#[derive(Default)]
struct Touches {
    at: HashMap<Uuid, DateTime<Utc>>,
    /// Size at which stale entries are next swept out.
    sweep_at: usize,
}

impl RecentTouches {
    /// Of `devices`, those this node has not written within the resolution before `now`.
    pub(super) fn stale(&self, devices: Vec<Uuid>, now: DateTime<Utc>) -> Vec<Uuid> {
        let since = now - LAST_PUSH_RESOLUTION;
        let touches = self.lock();
        devices
            .into_iter()
            .filter(|d| touches.at.get(d).is_none_or(|at| *at < since))
            .collect()
    }

    /// Note that `devices` were written at `now` (call once their transaction committed).
    pub(super) fn written(&self, devices: &[Uuid], now: DateTime<Utc>) {
        let mut touches = self.lock();
        for device in devices {
            touches.at.insert(*device, now);
        }
        // Swept when it doubled since the last sweep: amortised constant time per entry, and
        // bounded by twice the devices pushed to within the resolution.
        if touches.at.len() >= touches.sweep_at.max(SWEEP_FLOOR) {
            let since = now - LAST_PUSH_RESOLUTION;
            touches.at.retain(|_, at| *at >= since);
            touches.sweep_at = touches.at.len() * 2;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Touches> {
        // Nothing held here can be left half-updated by a panic: a poisoned map is still valid.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_is_left_out_only_within_the_resolution_after_it_was_written() {
        let touches = RecentTouches::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let t0 = Utc::now();
        assert_eq!(touches.stale(vec![a, b], t0), vec![a, b]);
        touches.written(&[a], t0);
        let soon = t0 + chrono::Duration::milliseconds(999);
        assert_eq!(touches.stale(vec![a, b], soon), vec![b]);
        let later = t0 + LAST_PUSH_RESOLUTION + chrono::Duration::milliseconds(1);
        assert_eq!(touches.stale(vec![a, b], later), vec![a, b]);
    }

    #[test]
    fn stale_entries_are_swept_out() {
        let touches = RecentTouches::default();
        let t0 = Utc::now();
        let old: Vec<Uuid> = (0..SWEEP_FLOOR).map(|_| Uuid::now_v7()).collect();
        touches.written(&old[..SWEEP_FLOOR - 1], t0);
        assert_eq!(touches.lock().at.len(), SWEEP_FLOOR - 1);
        let later = t0 + LAST_PUSH_RESOLUTION * 2;
        touches.written(&old[SWEEP_FLOOR - 1..], later);
        assert_eq!(touches.lock().at.len(), 1, "only the fresh entry is kept");
    }
}
