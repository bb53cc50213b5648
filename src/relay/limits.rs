//! Per-source limits that guard authentication against guessing.
//!
//! The limiter only ever refuses *unproven* credentials: a caller is authenticated first,
//! and a valid key or token goes through whatever its address did before, so a colleague
//! behind the same office NAT as a misconfigured script (or an attacker) keeps working.
//! Only a failed authentication from an address over its limit is answered 429 instead of
//! 401/407. Addresses are counted per IPv4 address and per IPv6 /64 (one host usually
//! holds a whole /64), in a table with a hard size bound.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);

/// The most sources tracked at once. Past it, stale windows are dropped first; if every
/// window is fresh, new sources go uncounted rather than let the table grow without bound.
pub const MAX_SOURCES: usize = 100_000;

/// The unit failures are counted in: an IPv4 address (IPv4-mapped IPv6 included), or an
/// IPv6 /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Counts failed authentications per source in one-minute windows.
///
/// Only failures touch it (and one lookup per failure), so a mutex is cheap enough; it is
/// never held across an await.
pub struct AuthFailures {
    /// Failures allowed per window before further failures are answered 429.
    per_minute: u32,
    /// Window start and count per source key, and when the table was last pruned.
    windows: Mutex<Windows>,
}

/// The limiter's table.
struct Windows {
    /// Window start and failure count per source key.
    by_source: HashMap<IpAddr, (Instant, u32)>,
    /// When stale windows were last dropped; a full table is pruned at most once a
    /// second, so a flood of new sources costs a hash lookup each, not a scan each.
    pruned: Option<Instant>,
}

impl AuthFailures {
    /// A limiter allowing `per_minute` failures per source per minute.
    pub fn new(per_minute: u32) -> AuthFailures {
        AuthFailures {
            per_minute,
            windows: Mutex::new(Windows {
                by_source: HashMap::new(),
                pruned: None,
            }),
        }
    }

    /// If `ip`'s source is over its limit, how long until its window ends.
    pub fn retry_after(&self, ip: IpAddr) -> Option<Duration> {
        let windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let (start, count) = windows.by_source.get(&source_key(ip))?;
        let elapsed = start.elapsed();
        (elapsed < WINDOW && *count >= self.per_minute).then(|| WINDOW - elapsed)
    }

    /// Records one failure from `ip`; returns how long to wait if the source is now over
    /// its limit (the caller answers 429 instead of 401/407).
    pub fn record(&self, ip: IpAddr) -> Option<Duration> {
        let key = source_key(ip);
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if windows.by_source.len() >= MAX_SOURCES && !windows.by_source.contains_key(&key) {
            let due = windows
                .pruned
                .is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
            if due {
                windows
                    .by_source
                    .retain(|_, (start, _)| start.elapsed() < WINDOW);
                windows.pruned = Some(Instant::now());
            }
            if windows.by_source.len() >= MAX_SOURCES {
                return None;
            }
        }
        let entry = windows.by_source.entry(key).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(1);
        (entry.1 > self.per_minute).then(|| WINDOW.saturating_sub(entry.0.elapsed()))
    }

    /// How many sources are tracked (for tests of the bound).
    pub fn tracked(&self) -> usize {
        self.windows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_source
            .len()
    }
}

/// Connections per source address that have not authenticated yet, each held by a
/// [`SourceSlot`] that gives its place back when dropped.
pub struct SourceSlots {
    /// The most a single source may hold.
    per_source: usize,
    /// Held slots per source key (see [`source_key`]); entries at zero are removed.
    held: std::sync::Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One connection's place among its source's unauthenticated connections.
pub struct SourceSlot {
    /// The source it counts against.
    key: IpAddr,
    /// The table to give the place back to.
    held: std::sync::Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl SourceSlots {
    /// A table allowing `per_source` slots per source.
    pub fn new(per_source: usize) -> SourceSlots {
        SourceSlots {
            per_source,
            held: Default::default(),
        }
    }

    /// A slot for `ip`, or `None` when its source holds all of its slots already.
    pub fn take(&self, ip: IpAddr) -> Option<SourceSlot> {
        let key = source_key(ip);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(key).or_insert(0);
        if *n >= self.per_source {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            key,
            held: self.held.clone(),
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttles_failures_after_the_limit_per_source() {
        let limiter = AuthFailures::new(3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(limiter.record(a), None);
        }
        assert_eq!(limiter.retry_after(a).map(|_| ()), Some(()));
        let wait = limiter.record(a).expect("the fourth failure is throttled");
        assert!(wait <= WINDOW);
        assert_eq!(limiter.retry_after(b), None);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let limiter = AuthFailures::new(2);
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        limiter.record(one);
        limiter.record(same_64);
        assert!(limiter.retry_after(one).is_some(), "one /64 is one source");
        assert!(limiter.retry_after(other_64).is_none());
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(source_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn source_slots_are_given_back() {
        let slots = SourceSlots::new(2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = slots.take(ip).unwrap();
        let _b = slots.take(ip).unwrap();
        assert!(slots.take(ip).is_none());
        assert!(slots.take("192.0.2.2".parse().unwrap()).is_some());
        drop(a);
        assert!(slots.take(ip).is_some());
    }

    #[test]
    fn the_table_is_bounded() {
        let limiter = AuthFailures::new(1);
        for i in 0..(MAX_SOURCES as u32 + 5_000) {
            limiter.record(IpAddr::V4(i.into()));
        }
        assert_eq!(limiter.tracked(), MAX_SOURCES);
    }
}
