//! The tunnels open on this relay, with the limits on them. (Device sessions are
//! presence's: `presence.rs`.)
//!
//! The maps are touched once when something opens or closes, never per chunk, so a plain
//! mutex (never held across an await) is enough.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio_util::sync::CancellationToken;

use crate::config::Limits;
use crate::store::Id;

/// One open tunnel, as revocation checks and limits need it.
pub struct TunnelEntry {
    /// Tunnel id.
    pub id: String,
    /// The user who opened it.
    pub user_id: Id,
    /// The device.
    pub device: String,
    /// The device port.
    pub port: u16,
    /// What authorized it, re-checked every few seconds so that revoking a key or
    /// membership ends the tunnel. Kept in memory only.
    pub proof: Proof,
    /// What opened it (the audit row's `kind`).
    pub kind: TunnelKind,
    /// Cancelling it ends the tunnel.
    pub cancel: CancellationToken,
    /// Why it was cancelled, set once before `cancel` fires.
    pub reason: OnceLock<&'static str>,
    /// Bytes moved so far, read by `/metrics` while the tunnel runs.
    pub counters: crate::forward::Counters,
}

/// What a user presented for a tunnel, kept with it so that revalidation asks again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Proof {
    /// An API key or a JWT, as presented (a CONNECT, the browser terminal).
    Token(String),
    /// One of the user's SSH keys, by row id, which the SSH gateway verified: deleting
    /// the key (or the user) ends the tunnel.
    SshKey {
        /// The user.
        user: Id,
        /// The key's row.
        key: Id,
    },
    /// Checked by another relay: a tunnel that came in over the peer link is re-checked by
    /// the relay the user came to, which holds the proof.
    Peer,
}

/// What opened a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelKind {
    /// A CONNECT from a user's client.
    Connect,
    /// The browser terminal (PROTOCOL.md §5).
    Terminal,
    /// A ProxyJump channel through the SSH gateway.
    Jump,
    /// A `host` or `enter` session through the SSH gateway.
    Gateway,
}

impl TunnelKind {
    /// As the audit row stores it.
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelKind::Connect => "connect",
            TunnelKind::Terminal => "terminal",
            TunnelKind::Jump => "jump",
            TunnelKind::Gateway => "ssh-gateway",
        }
    }

    /// Every kind, for metrics that list them all from the start.
    pub const ALL: [TunnelKind; 4] = [
        TunnelKind::Connect,
        TunnelKind::Terminal,
        TunnelKind::Jump,
        TunnelKind::Gateway,
    ];
}

impl TunnelEntry {
    /// Ends the tunnel, recording why (the first reason wins).
    pub fn end(&self, reason: &'static str) {
        let _ = self.reason.set(reason);
        self.cancel.cancel();
    }
}

/// Which limit refused a new tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    /// The user has too many open tunnels.
    User,
    /// The user has too many open tunnels to this device.
    UserDevice,
    /// The device has too many open tunnels.
    Device,
    /// The relay has too many open tunnels.
    Relay,
}

#[derive(Default)]
struct Tunnels {
    by_id: HashMap<String, Arc<TunnelEntry>>,
    per_user: HashMap<Id, usize>,
    per_device: HashMap<String, usize>,
    per_user_device: HashMap<(Id, String), usize>,
}

/// Takes one from a count, removing the entry at zero so the maps only hold what is open.
fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// The registry of this relay's tunnels.
#[derive(Default)]
pub struct Registry {
    tunnels: Mutex<Tunnels>,
    /// Tunnels that have ended since the relay started.
    ended: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps half-updated in a way that
    // matters more than refusing service, so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// Admits a tunnel under the limits, or says which limit refused it.
    pub fn admit_tunnel(&self, entry: Arc<TunnelEntry>, limits: &Limits) -> Result<(), LimitHit> {
        let mut t = lock(&self.tunnels);
        let pair = (entry.user_id, entry.device.clone());
        let count = |n: Option<&usize>| n.copied().unwrap_or(0);
        if t.by_id.len() >= limits.tunnels_per_relay {
            return Err(LimitHit::Relay);
        }
        if count(t.per_user.get(&entry.user_id)) >= limits.tunnels_per_user {
            return Err(LimitHit::User);
        }
        if count(t.per_user_device.get(&pair)) >= limits.tunnels_per_user_device {
            return Err(LimitHit::UserDevice);
        }
        if count(t.per_device.get(&entry.device)) >= limits.tunnels_per_device {
            return Err(LimitHit::Device);
        }
        *t.per_user.entry(entry.user_id).or_default() += 1;
        *t.per_device.entry(entry.device.clone()).or_default() += 1;
        *t.per_user_device.entry(pair).or_default() += 1;
        t.by_id.insert(entry.id.clone(), entry);
        Ok(())
    }

    /// Forgets a tunnel that ended.
    pub fn remove_tunnel(&self, id: &str) {
        let mut t = lock(&self.tunnels);
        let Some(entry) = t.by_id.remove(id) else {
            return;
        };
        self.ended.fetch_add(1, Ordering::Relaxed);
        release(&mut t.per_user, &entry.user_id);
        release(&mut t.per_device, &entry.device);
        release(
            &mut t.per_user_device,
            &(entry.user_id, entry.device.clone()),
        );
    }

    /// Every open tunnel.
    pub fn tunnels(&self) -> Vec<Arc<TunnelEntry>> {
        lock(&self.tunnels).by_id.values().cloned().collect()
    }

    /// The open tunnel with this id.
    pub fn tunnel(&self, id: &str) -> Option<Arc<TunnelEntry>> {
        lock(&self.tunnels).by_id.get(id).cloned()
    }

    /// How many tunnels are open.
    pub fn tunnel_count(&self) -> usize {
        lock(&self.tunnels).by_id.len()
    }

    /// How many tunnels have ended since the relay started.
    pub fn ended(&self) -> u64 {
        self.ended.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metric_lists_every_tunnel_kind() {
        let kinds: Vec<&str> = TunnelKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(kinds, crate::relay::metrics::TUNNEL_KINDS);
    }

    fn entry(id: &str, user: Id, device: &str) -> Arc<TunnelEntry> {
        Arc::new(TunnelEntry {
            id: id.into(),
            user_id: user,
            device: device.into(),
            port: 22,
            proof: Proof::Token(String::new()),
            kind: TunnelKind::Connect,
            cancel: CancellationToken::new(),
            reason: OnceLock::new(),
            counters: Default::default(),
        })
    }

    fn limits(user: usize, user_device: usize, device: usize, relay: usize) -> Limits {
        Limits {
            tunnels_per_user: user,
            tunnels_per_user_device: user_device,
            tunnels_per_device: device,
            tunnels_per_relay: relay,
            ..Limits::default()
        }
    }

    #[test]
    fn tunnel_limits_count_and_release() {
        let r = Registry::default();
        let l = limits(2, 2, 2, 3);
        r.admit_tunnel(entry("a", 1, "d1"), &l).unwrap();
        r.admit_tunnel(entry("b", 1, "d2"), &l).unwrap();
        assert_eq!(r.admit_tunnel(entry("c", 1, "d3"), &l), Err(LimitHit::User));
        r.admit_tunnel(entry("c", 2, "d1"), &l).unwrap();
        let more = limits(2, 2, 2, 4);
        assert_eq!(
            r.admit_tunnel(entry("d", 3, "d1"), &more),
            Err(LimitHit::Device)
        );
        assert_eq!(
            r.admit_tunnel(entry("d", 3, "d9"), &l),
            Err(LimitHit::Relay)
        );
        r.remove_tunnel("a");
        r.remove_tunnel("a");
        assert_eq!(r.tunnel_count(), 2);
        r.admit_tunnel(entry("e", 1, "d1"), &l).unwrap();
    }

    #[test]
    fn one_user_cannot_hold_a_device() {
        let r = Registry::default();
        let l = limits(10, 2, 3, 100);
        r.admit_tunnel(entry("a", 1, "d1"), &l).unwrap();
        r.admit_tunnel(entry("b", 1, "d1"), &l).unwrap();
        assert_eq!(
            r.admit_tunnel(entry("c", 1, "d1"), &l),
            Err(LimitHit::UserDevice)
        );
        r.admit_tunnel(entry("c", 2, "d1"), &l).unwrap();
        r.admit_tunnel(entry("d", 1, "d2"), &l).unwrap();
    }
}
