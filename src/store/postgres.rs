//! The Postgres backend: production, shared by every relay of a cluster.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::any::AnyPoolOptions;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyPool};
use tokio::sync::broadcast;

use super::model::{HeldLock, PresenceChange, Result, StartupLock};

/// The NOTIFY channel of presence changes.
const PRESENCE_CHANNEL: &str = "cloudlink_presence";

/// The advisory lock key for start-up ("clnkstrt").
const STARTUP_LOCK_KEY: i64 = 0x636c_6e6b_7374_7274;

/// Connects, applies `migrations/postgres`, and returns the pool.
///
/// The pool checks each connection before handing it out, so after the database restarts
/// the first request gets a fresh connection instead of a dead one; a short acquire timeout
/// turns an unreachable database into a prompt 503 instead of a hung request.
pub async fn pool(url: &str) -> Result<AnyPool> {
    sqlx::any::install_default_drivers();
    let pool = AnyPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(3))
        .test_before_acquire(true)
        .connect(url)
        .await?;
    super::migrations::migrator(super::migrations::POSTGRES)
        .run(&pool)
        .await?;
    Ok(pool)
}

/// Takes the start-up advisory lock on `conn` (a session lock: closing the connection
/// releases it too).
pub async fn startup_lock(mut conn: PoolConnection<Any>) -> Result<StartupLock> {
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(STARTUP_LOCK_KEY)
        .execute(&mut *conn)
        .await?;
    Ok(StartupLock::held(Box::new(AdvisoryLock(Some(conn)))))
}

/// The connection that holds the start-up advisory lock.
struct AdvisoryLock(Option<PoolConnection<Any>>);

#[async_trait]
impl HeldLock for AdvisoryLock {
    /// Unlocks; if that fails, the connection is closed, which ends the session and with
    /// it the lock.
    async fn release(mut self: Box<Self>) {
        if let Some(mut conn) = self.0.take() {
            let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(STARTUP_LOCK_KEY)
                .execute(&mut *conn)
                .await;
            if unlocked.is_err() {
                drop(conn.detach());
            }
        }
    }
}

impl Drop for AdvisoryLock {
    fn drop(&mut self) {
        // Not released (an error on the way): close the session rather than return a
        // locked connection to the pool.
        if let Some(conn) = self.0.take() {
            drop(conn.detach());
        }
    }
}

/// Announces `change` to every relay's listener, inside `tx`: delivered when (and only
/// if) it commits.
pub async fn notify_presence(
    tx: &mut sqlx::Transaction<'_, Any>,
    change: &PresenceChange,
) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(PRESENCE_CHANNEL)
        .bind(to_payload(change))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Forwards Postgres presence notifications to `tx` for the life of the process,
/// reconnecting after a lost connection. Changes sent meanwhile are missed: a session
/// that should have been superseded then lives on until its own connection ends (the
/// agent dropped it when it moved, so the relay's idle timeout closes it) or its relay
/// drains.
pub async fn listen_presence(url: String, tx: broadcast::Sender<PresenceChange>) {
    let mut announced = false;
    loop {
        match sqlx::postgres::PgListener::connect(&url).await {
            Ok(mut listener) => match listener.listen(PRESENCE_CHANNEL).await {
                Ok(()) => loop {
                    if !announced {
                        tracing::info!("listening for presence changes");
                        announced = true;
                    }
                    match listener.recv().await {
                        Ok(n) => {
                            if let Some(change) = from_payload(n.payload()) {
                                let _ = tx.send(change);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "presence listener lost its connection");
                            break;
                        }
                    }
                },
                Err(e) => tracing::warn!(error = %e, "cannot LISTEN for presence changes"),
            },
            Err(e) => tracing::warn!(error = %e, "presence listener cannot connect"),
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// A presence change as a NOTIFY payload: three space-free tokens separated by spaces.
fn to_payload(change: &PresenceChange) -> String {
    format!(
        "{} {} {}",
        change.device_uuid, change.relay_id, change.session
    )
}

/// Parses a NOTIFY payload; `None` for anything else (another writer on the channel).
/// Runs of spaces count as one: a token is never empty.
fn from_payload(payload: &str) -> Option<PresenceChange> {
    let mut parts = payload.split(' ').filter(|part| !part.is_empty());
    let (Some(d), Some(r), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    Some(PresenceChange {
        device_uuid: d.to_owned(),
        relay_id: r.to_owned(),
        session: s.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_presence_payload_reads_back_and_nothing_else_does() {
        let change = PresenceChange {
            device_uuid: "d1".into(),
            relay_id: "r1".into(),
            session: "s1".into(),
        };
        assert_eq!(from_payload(&to_payload(&change)), Some(change));
        for other in ["", "d1 r1", "d1 r1 s1 extra", "d1  r1", " "] {
            assert_eq!(from_payload(other), None, "{other:?}");
        }
    }
}
