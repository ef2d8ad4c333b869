//! What a long-running fake received, for a load generator in another process
//! (`herald fake-apns --stats-ms N`, used by `benches/soak`): cumulative counts, and the
//! publish → push lag of the pushes of each interval as a mergeable histogram.
//!
//! The lag is `now - t`, where `t` (unix microseconds) is the value the publisher put at
//! `data.t` of the event; the dispatcher copies the event's data to the APNs body's `data` key
//! (`dispatch::payload`). Both ends run on one machine, so they share the clock.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two, as a bit count: 32, so a bucket is at most ~3% wide.
const SUB_BITS: u32 = 5;

/// The bucket holding `us`: its lower bound and width. Exact below 64 µs, then 32 buckets per
/// power of two, so percentiles of a merged histogram are within ~3% of the true ones.
fn bucket(us: u64) -> (u64, u64) {
    if us < 1 << (SUB_BITS + 1) {
        return (us, 1);
    }
    let shift = (63 - us.leading_zeros()) - SUB_BITS;
    ((us >> shift) << shift, 1 << shift)
}

/// Durations in microseconds, log-bucketed: a few hundred buckets cover 1 µs to minutes, so a
/// histogram per second fits on one JSON line and histograms of many seconds merge exactly
/// (to bucket precision), which percentiles of each second would not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LagHistogram {
    /// Bucket lower bound → count.
    buckets: BTreeMap<u64, u64>,
    count: u64,
    max_us: u64,
}

impl LagHistogram {
    /// Count one value.
    pub fn record(&mut self, us: u64) {
        *self.buckets.entry(bucket(us).0).or_insert(0) += 1;
        self.count += 1;
        self.max_us = self.max_us.max(us);
    }

    /// Add `other`'s values to these.
    pub fn merge(&mut self, other: &LagHistogram) {
        for (&lower, &n) in &other.buckets {
            *self.buckets.entry(lower).or_insert(0) += n;
        }
        self.count += other.count;
        self.max_us = self.max_us.max(other.max_us);
    }

    /// Values counted.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest value counted (exact), 0 when empty.
    pub fn max_us(&self) -> u64 {
        self.max_us
    }

    /// The `q` quantile (0..=1): the upper end of the bucket it falls in, never above the
    /// maximum, so it is never under-reported. None when empty.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        // The rank of the value wanted, 1-based: at least the first, at most the last.
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (&lower, &n) in &self.buckets {
            seen += n;
            if seen >= rank {
                let (_, width) = bucket(lower);
                return Some((lower + width - 1).min(self.max_us));
            }
        }
        Some(self.max_us)
    }

    /// `(bucket lower bound µs, count)` pairs, ascending: the histogram's form on a stats line.
    pub fn to_pairs(&self) -> Vec<(u64, u64)> {
        self.buckets.iter().map(|(&k, &v)| (k, v)).collect()
    }

    /// Rebuilt from [`Self::to_pairs`] and the exact maximum.
    pub fn from_pairs(pairs: &[(u64, u64)], max_us: u64) -> Self {
        let mut h = Self::default();
        for &(lower, n) in pairs {
            // Re-bucketed, so a line written by another bucketing still lands somewhere sane.
            *h.buckets.entry(bucket(lower).0).or_insert(0) += n;
            h.count += n;
        }
        h.max_us = max_us;
        h
    }
}

/// One line of `herald fake-apns --stats-ms N` (JSON, camelCase): counts since start and the
/// lag of the pushes answered 200 since the previous line.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatsLine {
    /// Milliseconds since the fake started (the denominator for rates between two lines).
    pub elapsed_ms: u64,
    /// Requests answered since start, whatever the status.
    pub received: u64,
    /// Requests answered 200 since start.
    pub accepted: u64,
    /// Pushes of this interval that carried a lag marker.
    pub lag_count: u64,
    /// Their lag's median, ms.
    pub lag_p50_ms: Option<f64>,
    /// Their lag's 99th percentile, ms.
    pub lag_p99_ms: Option<f64>,
    /// Their largest lag, ms (exact).
    pub lag_max_ms: Option<f64>,
    /// Their lag histogram: `[bucket lower bound µs, count]` pairs, to merge intervals.
    pub lag_hist: Vec<(u64, u64)>,
}

impl StatsLine {
    /// The line for `lags` (one interval's) and the counts so far.
    pub fn new(elapsed_ms: u64, received: u64, accepted: u64, lags: &LagHistogram) -> Self {
        let ms = |us: Option<u64>| us.map(|us| us as f64 / 1e3);
        Self {
            elapsed_ms,
            received,
            accepted,
            lag_count: lags.count(),
            lag_p50_ms: ms(lags.quantile_us(0.50)),
            lag_p99_ms: ms(lags.quantile_us(0.99)),
            lag_max_ms: ms((lags.count() > 0).then_some(lags.max_us())),
            lag_hist: lags.to_pairs(),
        }
    }

    /// The interval's lag histogram, to merge with others.
    pub fn histogram(&self) -> LagHistogram {
        let max_us = self.lag_max_ms.map_or(0, |ms| (ms * 1e3).round() as u64);
        LagHistogram::from_pairs(&self.lag_hist, max_us)
    }
}

/// The marker in an APNs body: `{"data": {"t": <unix µs>}, ...}`. Other keys are skipped.
#[derive(Deserialize)]
struct Body {
    data: Option<Marker>,
}

#[derive(Deserialize)]
struct Marker {
    t: Option<u64>,
}

/// Microseconds since the publish time marked in `body`, if it carries one.
pub(super) fn lag_us(body: &[u8]) -> Option<u64> {
    let t = serde_json::from_slice::<Body>(body).ok()?.data?.t?;
    let now = u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()?
            .as_micros(),
    )
    .ok()?;
    Some(now.saturating_sub(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_exact_low_and_narrow_high() {
        assert_eq!(bucket(0), (0, 1));
        assert_eq!(bucket(63), (63, 1));
        assert_eq!(bucket(64), (64, 2));
        assert_eq!(bucket(65), (64, 2));
        assert_eq!(bucket(128), (128, 4));
        for us in [100u64, 1_000, 12_345, 1_000_000, 987_654_321] {
            let (lower, width) = bucket(us);
            assert!(lower <= us && us < lower + width);
            assert!(width as f64 / lower as f64 <= 1.0 / 32.0);
            assert_eq!(bucket(lower), (lower, width));
        }
    }

    #[test]
    fn quantiles_merge_and_round_trip() {
        let mut a = LagHistogram::default();
        let mut b = LagHistogram::default();
        for us in 1..=1000 {
            a.record(us);
            b.record(us + 1000);
        }
        a.merge(&b);
        assert_eq!(a.count(), 2000);
        assert_eq!(a.max_us(), 2000);
        let p50 = a.quantile_us(0.5).unwrap();
        assert!((1000..=1032).contains(&p50), "{p50}");
        let p99 = a.quantile_us(0.99).unwrap();
        assert!((1980..=2000).contains(&p99), "{p99}");
        assert_eq!(a.quantile_us(1.0), Some(2000));
        let line = StatsLine::new(1000, 5, 4, &a);
        let json = serde_json::to_string(&line).unwrap();
        let back: StatsLine = serde_json::from_str(&json).unwrap();
        assert_eq!(back.histogram(), a);
        assert_eq!(LagHistogram::default().quantile_us(0.5), None);
    }

    #[test]
    fn lag_is_read_from_the_data_marker() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        let body = format!(
            r#"{{"aps":{{"alert":"x"}},"seq":1,"data":{{"t":{}}}}}"#,
            now - 5000
        );
        let lag = lag_us(body.as_bytes()).unwrap();
        assert!((5000..5_000_000).contains(&lag), "{lag}");
        assert_eq!(lag_us(br#"{"aps":{},"data":{"k":1}}"#), None);
        assert_eq!(lag_us(br#"{"aps":{},"data":"text"}"#), None);
        assert_eq!(lag_us(b"not json"), None);
    }
}
