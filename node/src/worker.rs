//! The shape every background worker (repair, scrub, garbage collection)
//! shares: a byte-rate limit so it never starves foreground reads and
//! writes, a rate meter, progress with an ETA, and its last error.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Wall-clock milliseconds since 1970.
pub fn now_ms() -> u64 {
    proto::meta::Timespec::now().as_millis()
}

/// What every background worker has: a byte-rate limit, a rate meter,
/// progress of its current pass, and its last error, reported in one shape
/// (`WorkerStatus`) by `musicfs status`.
pub struct Worker {
    name: &'static str,
    unit: &'static str,
    limit: RateLimit,
    limit_bytes_per_sec: u64,
    bytes: std::sync::atomic::AtomicU64,
    meter: Meter,
    pass: Mutex<Pass>,
}

#[derive(Default)]
struct Pass {
    state: String,
    done: u64,
    total: u64,
    /// When the state last changed, and `done` then (for the ETA).
    started: Option<Instant>,
    first_done: u64,
    last_error: String,
}

impl Worker {
    /// A worker counting its progress in `unit`s, limited to
    /// `bytes_per_sec` (0: unlimited).
    pub fn new(name: &'static str, unit: &'static str, bytes_per_sec: u64) -> Self {
        Worker {
            name,
            unit,
            limit: RateLimit::new(bytes_per_sec),
            limit_bytes_per_sec: bytes_per_sec,
            bytes: std::sync::atomic::AtomicU64::new(0),
            meter: Meter::default(),
            pass: Mutex::new(Pass {
                state: "idle".into(),
                ..Default::default()
            }),
        }
    }

    /// Waits until `bytes` may be moved.
    pub async fn throttle(&self, bytes: u64) {
        self.limit.take(bytes).await;
    }

    /// Counts bytes moved.
    pub fn moved(&self, bytes: u64) {
        self.bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        self.meter.add(bytes);
        crate::metrics::worker_bytes(self.name, bytes);
    }

    /// Sets what the worker does and how far its pass is; the ETA counts
    /// from when the state last changed.
    pub fn set(&self, state: &str, done: u64, total: u64) {
        let mut p = self.pass.lock().unwrap_or_else(|e| e.into_inner());
        if p.state != state {
            p.state = state.to_string();
            p.started = Some(Instant::now());
            p.first_done = done;
        }
        p.done = done;
        p.total = total.max(done);
        crate::metrics::worker_progress(self.name, p.done, p.total);
    }

    /// Nothing to do until the next pass.
    pub fn idle(&self) {
        self.set("idle", 0, 0);
    }

    pub fn error(&self, e: String) {
        tracing::warn!(worker = self.name, error = %e, "background work");
        crate::metrics::worker_error(self.name);
        self.pass
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_error = e;
    }

    pub fn status(&self) -> proto::admin::WorkerStatus {
        let p = self.pass.lock().unwrap_or_else(|e| e.into_inner());
        let eta_secs = match p.started {
            Some(t) if p.done > p.first_done && p.total > p.done => {
                let per_unit = t.elapsed().as_secs_f64() / (p.done - p.first_done) as f64;
                (per_unit * (p.total - p.done) as f64).ceil() as u64
            }
            _ => 0,
        };
        proto::admin::WorkerStatus {
            name: self.name.into(),
            state: p.state.clone(),
            done: p.done,
            total: p.total,
            unit: self.unit.into(),
            bytes: self.bytes.load(std::sync::atomic::Ordering::Relaxed),
            bytes_per_sec: self.meter.rate() as u64,
            limit_bytes_per_sec: self.limit_bytes_per_sec,
            eta_secs,
            last_error: p.last_error.clone(),
        }
    }
}

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
