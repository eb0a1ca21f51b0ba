//! Per-source rate limits for requests that arrive from the network (repair requests, gvd's
//! QUERYs): a token bucket per source, in a table of bounded size, on the caller's clock.
//!
//! # Examples
//!
//! ```
//! use std::time::{Duration, Instant};
//! use grapevine_core::limit::SourceLimiter;
//!
//! // 10 requests per second per source, bursts of 5, at most 1000 sources remembered.
//! let mut limiter = SourceLimiter::new(10.0, 5.0, 1000);
//! let now = Instant::now();
//! let admitted = (0..20).filter(|_| limiter.admit(now, "10.0.0.7", 1.0)).count();
//! assert_eq!(admitted, 5);
//! assert!(limiter.admit(now, "10.0.0.8", 1.0), "another source has its own bucket");
//! assert!(limiter.admit(now + Duration::from_millis(100), "10.0.0.7", 1.0), "refilled");
//! ```

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets per source, bounded in number.
///
/// When the table is full, sources whose bucket has refilled (idle ones) are forgotten; if none
/// has, a new source is refused until one does, so a flood of spoofed sources costs a bounded
/// amount of memory and work.
#[derive(Debug)]
pub struct SourceLimiter<K> {
    rate: f64,
    burst: f64,
    max_sources: usize,
    buckets: HashMap<K, Bucket>,
    last_sweep: Option<Instant>,
    refused: u64,
}

impl<K: Hash + Eq + Clone> SourceLimiter<K> {
    /// `rate` units per second per source, bursts of `burst`, at most `max_sources` remembered.
    pub fn new(rate: f64, burst: f64, max_sources: usize) -> Self {
        Self {
            rate: rate.max(f64::MIN_POSITIVE),
            burst: burst.max(1.0),
            max_sources: max_sources.max(1),
            buckets: HashMap::new(),
            last_sweep: None,
            refused: 0,
        }
    }

    /// Whether `source` may spend `cost` units now; spends them if so.
    pub fn admit(&mut self, now: Instant, source: K, cost: f64) -> bool {
        if !self.buckets.contains_key(&source) && self.buckets.len() >= self.max_sources {
            self.sweep(now);
            if self.buckets.len() >= self.max_sources {
                self.refused += 1;
                return false;
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        let bucket = self.buckets.entry(source).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let earned = now.saturating_duration_since(bucket.at).as_secs_f64() * rate;
        bucket.tokens = (bucket.tokens + earned).min(burst);
        bucket.at = now;
        if bucket.tokens >= cost {
            bucket.tokens -= cost;
            true
        } else {
            self.refused += 1;
            false
        }
    }

    /// Requests refused so far (over a source's rate, or no room for a new source).
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Sources remembered now.
    pub fn sources(&self) -> usize {
        self.buckets.len()
    }

    /// Forgets sources whose bucket is full again; at most once per refill period, so a full
    /// table of busy sources is not scanned on every request.
    fn sweep(&mut self, now: Instant) {
        let refill = Duration::from_secs_f64((self.burst / self.rate).min(3600.0));
        if self.last_sweep.is_some_and(|at| {
            now.saturating_duration_since(at) < refill.min(Duration::from_secs(1))
        }) {
            return;
        }
        self.last_sweep = Some(now);
        let (rate, burst) = (self.rate, self.burst);
        self.buckets.retain(|_, bucket| {
            let earned = now.saturating_duration_since(bucket.at).as_secs_f64() * rate;
            bucket.tokens + earned < burst
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_stays_bounded_and_idle_sources_make_room() {
        let now = Instant::now();
        let mut limiter = SourceLimiter::new(10.0, 2.0, 100);
        for source in 0..10_000u32 {
            limiter.admit(now, source, 1.0);
        }
        assert_eq!(limiter.sources(), 100);
        assert_eq!(limiter.refused(), 10_000 - 100);
        // A second later every bucket has refilled: new sources get in again.
        let later = now + Duration::from_secs(1);
        assert!(limiter.admit(later, 20_000, 1.0));
        assert!(limiter.sources() <= 100);
    }

    #[test]
    fn a_source_gets_its_rate_and_no_more() {
        let start = Instant::now();
        let mut limiter = SourceLimiter::new(50.0, 10.0, 10);
        let mut admitted = 0;
        for ms in 0..10_000u64 {
            let now = start + Duration::from_millis(ms);
            admitted += (0..10).filter(|_| limiter.admit(now, "flood", 1.0)).count();
        }
        // 10 s at 50/s plus one burst.
        assert!((500..=511).contains(&admitted), "{admitted}");
    }
}
