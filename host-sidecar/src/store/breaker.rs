//! A circuit breaker in front of Redis: after a few consecutive failures (a refused connection,
//! a timeout) every call fails at once for a short while instead of each waiting out its own
//! timeout, so a sidecar whose Redis is down answers 503 in microseconds (the filter then applies
//! each route's failure mode within its deadline) and does not pile up waiting requests. After
//! the pause one caller is let through to probe (the engine sends a PING: see
//! `Engine::redis_down`); any successful call closes the breaker.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Consecutive failures that open the breaker.
const TRIP_AFTER: u32 = 3;
/// How long it stays open before a probe is let through.
const OPEN_FOR_MS: u64 = 1_000;

#[derive(Default)]
pub struct Breaker {
    failures: AtomicU32,
    /// Unix ms until which calls fail fast (0: closed).
    open_until: AtomicU64,
    /// Times it opened (a counter for /metrics).
    pub trips: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Breaker {
    /// Whether a call may go to Redis now. While open, false; once the pause is over, the first
    /// caller re-arms the pause and probes, the others keep failing fast until it succeeds.
    pub fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = now_ms();
        now >= until
            && self
                .open_until
                .compare_exchange(
                    until,
                    now + OPEN_FOR_MS,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    pub fn success(&self) {
        self.failures.store(0, Ordering::Release);
        self.open_until.store(0, Ordering::Release);
    }

    pub fn failure(&self) {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= TRIP_AFTER {
            let was = self
                .open_until
                .swap(now_ms() + OPEN_FOR_MS, Ordering::AcqRel);
            if was == 0 {
                self.trips.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "Redis unreachable: failing fast for {OPEN_FOR_MS} ms, then probing"
                );
            }
        }
    }

    /// Whether Redis is taken to be up (the breaker is closed).
    pub fn closed(&self) -> bool {
        self.open_until.load(Ordering::Acquire) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_closes_on_success() {
        let b = Breaker::default();
        assert!(b.allow());
        b.failure();
        b.failure();
        assert!(b.allow() && b.closed(), "two failures are not enough");
        b.failure();
        assert!(!b.closed());
        assert!(!b.allow(), "open: fail fast");
        assert_eq!(b.trips.load(Ordering::Relaxed), 1);
        // Past the pause one probe goes through, the next caller still fails fast.
        b.open_until.store(now_ms() - 1, Ordering::Release);
        assert!(b.allow());
        assert!(!b.allow());
        b.success();
        assert!(b.allow() && b.closed());
    }
}
