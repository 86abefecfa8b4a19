//! Pieces every background worker (repair, scrub, garbage collection)
//! shares: a byte-rate limit so they never starve foreground reads and
//! writes, and a rate meter for progress and ETA.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket in bytes per second, with one second of burst.
pub struct RateLimit {
    per_sec: f64,
    // tokio's clock, so tests can run it paused.
    state: Mutex<(tokio::time::Instant, f64)>,
}

impl RateLimit {
    /// `bytes_per_sec` 0 means unlimited.
    pub fn new(bytes_per_sec: u64) -> Self {
        RateLimit {
            per_sec: bytes_per_sec as f64,
            state: Mutex::new((tokio::time::Instant::now(), bytes_per_sec as f64)),
        }
    }

    /// Waits until `bytes` may be spent.
    pub async fn take(&self, bytes: u64) {
        if self.per_sec <= 0.0 {
            return;
        }
        let wait = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = tokio::time::Instant::now();
            let refill = now.duration_since(st.0).as_secs_f64() * self.per_sec;
            st.1 = (st.1 + refill).min(self.per_sec);
            st.0 = now;
            st.1 -= bytes as f64;
            if st.1 >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-st.1 / self.per_sec)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// An exponentially weighted rate (units per second) over roughly the
/// last ten seconds.
pub struct Meter {
    state: Mutex<(Instant, f64, f64)>,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            state: Mutex::new((Instant::now(), 0.0, 0.0)),
        }
    }
}

const METER_WINDOW_SECS: f64 = 10.0;

impl Meter {
    pub fn add(&self, n: u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Self::decay(&mut st);
        st.2 += n as f64;
    }

    /// Units per second.
    pub fn rate(&self) -> f64 {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Self::decay(&mut st);
        st.1
    }

    /// Folds units counted since the last fold into the rate, once a
    /// second or more has passed.
    fn decay(st: &mut (Instant, f64, f64)) {
        let dt = st.0.elapsed().as_secs_f64();
        if dt < 1.0 {
            return;
        }
        let alpha = 1.0 - (-dt / METER_WINDOW_SECS).exp();
        st.1 += alpha * (st.2 / dt - st.1);
        st.2 = 0.0;
        st.0 = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limit_spreads_work_over_time() {
        let limit = RateLimit::new(1000);
        let start = tokio::time::Instant::now();
        // The first second's worth is the burst; the next 2,000 bytes wait.
        for _ in 0..30 {
            limit.take(100).await;
        }
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(1900), "{waited:?}");
        assert!(waited <= Duration::from_millis(2100), "{waited:?}");
    }

    #[tokio::test]
    async fn unlimited_never_waits() {
        let limit = RateLimit::new(0);
        for _ in 0..1000 {
            limit.take(1 << 30).await;
        }
    }
}
