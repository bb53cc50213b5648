//! Revocation of open tunnels: every few seconds each tunnel's authorization is checked
//! again, without the cache, and tunnels whose access is gone are cut.

use std::sync::Arc;
use std::time::Duration;

use super::registry::{Proof, TunnelEntry};
use super::state::Shared;
use crate::auth::policy::{self, Decision};
use crate::auth::tokens::Expiry;
use crate::auth::AuthError;

/// Every few seconds, re-checks each open tunnel's authorization without the cache and ends
/// those whose key, membership, user, device or port is gone, so revocation takes effect
/// within [`REVALIDATE_EVERY`] plus one store round trip.
pub async fn revalidate(state: Arc<Shared>) {
    let mut tick = tokio::time::interval(REVALIDATE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.shutdown.cancelled() => return,
        }
        let mut answers: std::collections::HashMap<(Proof, String, u16), bool> =
            std::collections::HashMap::new();
        for entry in state.registry.tunnels() {
            if entry.proof == Proof::Peer {
                // Came over the peer link: the entry relay holds the proof and re-checks.
                continue;
            }
            let key = (entry.proof.clone(), entry.device.clone(), entry.port);
            let allowed = match answers.get(&key) {
                Some(allowed) => *allowed,
                None => match still_allowed(&state, &entry).await {
                    Some(allowed) => {
                        answers.insert(key, allowed);
                        allowed
                    }
                    // The store is down: keep tunnels running rather than cut everyone off.
                    None => continue,
                },
            };
            if !allowed {
                state.auth_cache.clear();
                tracing::info!(tunnel = %entry.id, user_id = entry.user_id, device = %entry.device, "access revoked; ending tunnel");
                entry.end("revoked");
            }
        }
    }
}

/// How often open tunnels are re-authorized (a revocation ends open tunnels within 5 s).
pub const REVALIDATE_EVERY: Duration = Duration::from_secs(2);

/// Whether the tunnel's user may still reach its device and port; `None` if the store
/// cannot say. A JWT that expired after the tunnel opened does not end it; the user, the
/// API key behind the token, the membership and the port must still be there.
async fn still_allowed(state: &Shared, entry: &TunnelEntry) -> Option<bool> {
    let store = state.store.as_ref();
    // The token must still stand for the same user: an API key unrevoked and unexpired, a
    // relay JWT whose user and key are still there (its own short expiry does not matter
    // now), an outside JWT whose username still names the user who opened the tunnel.
    // Re-checking is not a use of the key.
    let principal = match &entry.proof {
        Proof::Token(token) => {
            match crate::auth::identify(store, &state.jwt, token, Expiry::Ignore).await {
                Ok(principal) if principal.user.id == entry.user_id => principal,
                Ok(_) | Err(AuthError::InvalidToken) => return Some(false),
                Err(AuthError::Store(_)) => return None,
            }
        }
        // The key must still be the user's, and the user still there.
        Proof::SshKey { user, key } => match policy::ssh_key_principal(store, *user, *key).await {
            Ok(Some(principal)) => principal,
            Ok(None) => return Some(false),
            Err(_) => return None,
        },
        Proof::Peer => return Some(true),
    };
    policy::may_reach(store, principal, &entry.device, entry.port)
        .await
        .ok()
        .map(|d| matches!(d, Decision::Allow { .. }))
}

/// Cuts every open tunnel (after the shutdown grace period).
pub fn cut_all(state: &Shared, reason: &'static str) {
    for entry in state.registry.tunnels() {
        entry.end(reason);
    }
}
