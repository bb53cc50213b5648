//! A short-lived cache of "token T may reach device D on port P" answers.
//!
//! Setting up a tunnel would otherwise cost two or three store queries; a repeated CONNECT
//! within the TTL costs a hash lookup. Only `Allow` answers are cached, and only for a few
//! seconds (DESIGN.md allows that); the revalidation loop ends tunnels whose access was
//! revoked, cache or no cache. A revocation made through this relay's API clears the cache
//! at once, and so does the revalidation loop when it finds access gone, so a revoked
//! token gets no new tunnel on this relay after either.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::auth::policy::Decision;

type Key = (String, String, u16);

/// The cache; see the module docs.
pub struct AuthCache {
    /// How long an answer is reused.
    ttl: Duration,
    /// Answers by (token, device, port), with when they were made.
    entries: Mutex<HashMap<Key, (Instant, Decision)>>,
}

const MAX_ENTRIES: usize = 50_000;

impl AuthCache {
    /// A cache whose answers live `ttl`.
    pub fn new(ttl: Duration) -> AuthCache {
        AuthCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// A fresh cached answer, if there is one.
    pub fn get(&self, token: &str, device: &str, port: u16) -> Option<Decision> {
        if self.ttl.is_zero() {
            return None;
        }
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let key = (token.to_owned(), device.to_owned(), port);
        entries
            .get(&key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, d)| d.clone())
    }

    /// Forgets every answer (after a revocation: cheaper than finding the affected ones).
    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Remembers an answer (only `Allow` answers are kept).
    pub fn put(&self, token: &str, device: &str, port: u16, decision: &Decision) {
        if self.ttl.is_zero() || !matches!(decision, Decision::Allow { .. }) {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_ENTRIES {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| at.elapsed() < ttl);
        }
        entries.insert(
            (token.to_owned(), device.to_owned(), port),
            (Instant::now(), decision.clone()),
        );
    }
}
