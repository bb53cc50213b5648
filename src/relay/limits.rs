//! Per-source limits that guard authentication against guessing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);

/// Counts failed authentications per source address in one-minute windows.
///
/// Only failures touch it (and one lookup per request), so a mutex is cheap enough; it is
/// never held across an await.
pub struct AuthFailures {
    /// Failures allowed per window before the source is refused with 429.
    per_minute: u32,
    /// Window start and count per source.
    windows: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl AuthFailures {
    /// A limiter allowing `per_minute` failures per source per minute.
    pub fn new(per_minute: u32) -> AuthFailures {
        AuthFailures {
            per_minute,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// If `ip` is over its limit, how long until it may try again.
    pub fn retry_after(&self, ip: IpAddr) -> Option<Duration> {
        let windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let (start, count) = windows.get(&ip)?;
        let elapsed = start.elapsed();
        (elapsed < WINDOW && *count >= self.per_minute).then(|| WINDOW - elapsed)
    }

    /// Records one failure from `ip`.
    pub fn record(&self, ip: IpAddr) {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if windows.len() > 100_000 {
            windows.retain(|_, (start, _)| start.elapsed() < WINDOW);
        }
        let entry = windows.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_per_source() {
        let limiter = AuthFailures::new(3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..2 {
            limiter.record(a);
        }
        assert_eq!(limiter.retry_after(a), None);
        limiter.record(a);
        let wait = limiter.retry_after(a).expect("blocked after 3 failures");
        assert!(wait <= WINDOW);
        assert_eq!(limiter.retry_after(b), None);
    }
}
