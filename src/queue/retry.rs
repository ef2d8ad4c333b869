//! Retry delays: exponential backoff with full jitter.

use std::time::Duration;

use rand::Rng;

/// `random(0 ..= min(max, base * 2^(attempt-1)))`, so retries of many jobs spread out.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    base_ms: u64,
    max_ms: u64,
}

impl Backoff {
    /// A policy with `base_ms` for the first retry, capped at `max_ms`.
    pub fn new(base_ms: u64, max_ms: u64) -> Self {
        Self {
            base_ms,
            max_ms: max_ms.max(base_ms),
        }
    }

    /// The ceiling for the retry after `attempt` (1-based).
    pub fn ceiling(&self, attempt: i32) -> Duration {
        let shift = u32::try_from(attempt.saturating_sub(1))
            .unwrap_or(0)
            .min(32);
        let ms = self.base_ms.saturating_mul(1u64 << shift).min(self.max_ms);
        Duration::from_millis(ms)
    }

    /// A jittered delay for the retry after `attempt`.
    pub fn delay(&self, attempt: i32) -> Duration {
        let ceiling = self.ceiling(attempt).as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(0..=ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff::new(100, 1000);
        assert_eq!(b.ceiling(1), Duration::from_millis(100));
        assert_eq!(b.ceiling(2), Duration::from_millis(200));
        assert_eq!(b.ceiling(4), Duration::from_millis(800));
        assert_eq!(b.ceiling(5), Duration::from_millis(1000));
        assert_eq!(b.ceiling(500), Duration::from_millis(1000));
    }

    proptest! {
        #[test]
        fn delay_never_exceeds_ceiling(attempt in -5i32..200, base in 0u64..10_000, max in 0u64..1_000_000) {
            let b = Backoff::new(base, max);
            prop_assert!(b.delay(attempt) <= b.ceiling(attempt));
        }
    }
}
