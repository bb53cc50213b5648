//! What a relay does as one member of the relays sharing a store: the start-up writes they
//! must agree on (the bootstrap admin, the shared secrets), and the heartbeat that marks
//! it alive, counts the live relays and prunes the dead ones and old audit rows.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::datadir;
use super::error::RelayError;
use super::state::Shared;
use crate::auth::tokens;
use crate::config::RelayConfig;
use crate::store::{self, StoreError};

/// Name of the bootstrap admin's key file in the data directory.
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// A secret every relay of the store must share: the store's, or (first relay) the one in
/// this data directory from before clusters (so upgrading keeps tokens valid), or new.
pub async fn shared_secret(
    store: &dyn store::Store,
    config: &RelayConfig,
    name: &str,
) -> Result<String, RelayError> {
    let candidate = match datadir::read_trimmed(&config.data_dir.join(name))? {
        Some(old) if !old.is_empty() => old,
        _ => tokens::new_device_key(),
    };
    Ok(store.shared_secret(name, &candidate).await?)
}

/// How often a relay marks itself alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// Relays dead this long are removed from `relays` (with their presence rows).
const PRUNE_DEAD_AFTER_MS: i64 = 3_600_000;

/// Marks this relay alive every 5 s (with its device and tunnel counts and whether it
/// drains) so other relays count its devices; once a minute, counts the live relays and
/// prunes those dead for an hour.
pub async fn heartbeat(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    let mut failing = false;
    let mut beats: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let beat = shared
            .store
            .heartbeat(&shared.relay_id, shared.status())
            .await;
        let ready = beat.is_ok() && !shared.draining.is_cancelled();
        shared.metrics.ready.set(i64::from(ready));
        match beat {
            Ok(()) if failing => {
                tracing::info!("store reachable again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!(error = %e, "heartbeat failed; will keep trying");
                failing = true;
            }
            Err(_) => {}
        }
        if beats.is_multiple_of(12) {
            prune_audit(&shared).await;
            let now = store::now_ms();
            if let Ok(relays) = shared.store.list_relays().await {
                let alive = relays.iter().filter(|r| r.alive(now)).count();
                shared.metrics.relays_alive.set(alive as i64);
            }
            match shared.store.prune_relays(now - PRUNE_DEAD_AFTER_MS).await {
                Ok(0) | Err(_) => {}
                Ok(n) => tracing::info!(relays = n, "pruned relays dead for an hour"),
            }
        }
        beats += 1;
    }
}

/// Statements [`prune_audit`] makes per round: it runs between heartbeats, which must not
/// wait on a large backlog (that goes at up to 20 batches a minute instead).
const PRUNE_BATCHES_PER_ROUND: usize = 20;

/// Deletes audit rows older than `--audit-retention`, a small batch per statement, until
/// none is left, the round's batches are spent, or the relay stops.
async fn prune_audit(shared: &Shared) {
    let keep = shared.config.audit_retention_secs;
    if keep == 0 {
        return;
    }
    let before = store::now_ms()
        .saturating_sub(i64::try_from(keep.saturating_mul(1000)).unwrap_or(i64::MAX));
    let batch = shared.config.limits.audit_prune_batch.max(1);
    let mut total = 0;
    for _ in 0..PRUNE_BATCHES_PER_ROUND {
        if shared.shutdown.is_cancelled() {
            break;
        }
        match shared.store.prune_tunnels(before, batch).await {
            Ok(n) => {
                total += n;
                if n < batch as u64 {
                    break;
                }
                // Let other store work in between batches.
                tokio::task::yield_now().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot delete old audit rows; will try again");
                break;
            }
        }
    }
    if total > 0 {
        tracing::info!(
            rows = total,
            days = keep / 86_400,
            "deleted audit rows past the retention period"
        );
    }
}

/// On a store with no users, creates `admin` and writes its key to `<data-dir>/admin.key`.
pub async fn bootstrap_admin(
    store: &dyn store::Store,
    config: &RelayConfig,
) -> Result<Option<PathBuf>, RelayError> {
    if store.count_users().await? > 0 {
        return Ok(None);
    }
    let key = match std::env::var("CLOUDLINK_BOOTSTRAP_ADMIN_KEY") {
        Ok(key) if tokens::is_api_key(&key) && key.len() >= 36 => key,
        Ok(_) => return Err(RelayError::BootstrapKey),
        Err(_) => tokens::new_api_key(),
    };
    let path = config.data_dir.join(ADMIN_KEY_FILE);
    // A key file left from an earlier store would be a lie about this one.
    if path.exists() {
        std::fs::remove_file(&path).map_err(|source| datadir::DataDirError {
            path: path.clone(),
            source,
        })?;
    }
    datadir::write_private(&path, format!("{key}\n").as_bytes())?;
    let admin = match store.create_user("admin", true).await {
        Ok(admin) => admin,
        // Another relay of the cluster bootstrapped the same empty store first.
        Err(StoreError::Conflict) => {
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    store
        .create_api_key(
            admin.id,
            "bootstrap",
            &tokens::hash_secret(&key),
            &tokens::display_prefix(&key),
            None,
        )
        .await?;
    Ok(Some(path))
}
