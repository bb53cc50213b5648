//! Short-lived caches of answers that would otherwise cost a store round trip per CONNECT:
//! "token T may reach device D on port P" ([`AuthCache`]) and "device D is on relay R"
//! (the peer hop's owner cache).
//!
//! A repeated CONNECT within the TTL costs a hash lookup. Only `Allow` answers are
//! cached, and only for a few seconds (within the 5 s revocation bound); the revalidation loop ends
//! tunnels whose access was revoked, cache or no cache. A revocation made through this
//! relay's API clears the auth cache at once, and so does the revalidation loop when it
//! finds access gone, so a revoked token gets no new tunnel on this relay after either.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::auth::policy::Decision;

/// Answers by key, each reused for `ttl`; a TTL of zero turns the cache off.
pub struct TtlCache<K, V> {
    /// How long an answer is reused.
    ttl: Duration,
    /// Answers, with when they were made.
    entries: Mutex<HashMap<K, (Instant, V)>>,
}

/// The most entries kept; past it, stale ones are dropped first (and then all, so a
/// flood of distinct keys cannot grow it without bound).
const MAX_ENTRIES: usize = 50_000;

/// "Token T may reach device D on port P", by (token, device, port).
pub type AuthCache = TtlCache<(String, String, u16), Decision>;

impl<K: Hash + Eq, V: Clone> TtlCache<K, V> {
    /// A cache whose answers live `ttl`.
    pub fn new(ttl: Duration) -> Self {
        TtlCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<K, (Instant, V)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh cached answer, if there is one.
    pub fn get(&self, key: &K) -> Option<V> {
        if self.ttl.is_zero() {
            return None;
        }
        self.entries()
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, v)| v.clone())
    }

    /// Remembers an answer.
    pub fn put(&self, key: K, value: V) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries();
        if entries.len() >= MAX_ENTRIES {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(key, (Instant::now(), value));
    }

    /// Forgets one answer.
    pub fn remove(&self, key: &K) {
        self.entries().remove(key);
    }

    /// Forgets every answer (after a revocation: cheaper than finding the affected ones).
    pub fn clear(&self) {
        self.entries().clear();
    }
}
