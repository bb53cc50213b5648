//! The queries both backends share, over `sqlx::Any`.
//!
//! Every query uses `$N` parameters (Postgres' form, which SQLite also reads positionally),
//! integers for flags and Unix milliseconds for time, so the same text runs on both.
//! Where a query is assembled with `format!` (shared column lists), every piece is a
//! constant of this file; values always travel as bound parameters, hence `AssertSqlSafe`.

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::{AnyPool, AssertSqlSafe, FromRow, Row};
use tokio::sync::broadcast;

use super::model::{
    format_ports, now_ms, parse_ports, ApiKey, Device, DeviceAccess, DeviceFilter, EphemeralKey,
    Fleet, Id, Member, Millis, Presence, PresenceChange, PresenceState, RelayRow, RelayStatus,
    Result, SshKey, StartupLock, Store, StoreError, TunnelClose, TunnelSession, User,
    RELAY_DEAD_AFTER_MS,
};
use crate::proto::api::Role;

/// A [`Store`] on an `AnyPool`, for either backend.
pub struct SqlStore {
    /// The connection pool; it reconnects by itself after the database comes back.
    pool: AnyPool,
    /// Which backend the pool talks to, for logs.
    backend: &'static str,
    /// Postgres: the URL the presence listener connects with. SQLite: `None`, and presence
    /// changes are published in-process (one relay per database).
    listen_url: Option<String>,
    /// Where presence changes go to every subscriber in this process.
    presence_tx: broadcast::Sender<PresenceChange>,
    /// Whether the Postgres listener task runs (started by the first subscriber).
    listening: std::sync::Once,
}

impl SqlStore {
    /// Wraps a pool whose migrations have been applied; `listen_url` is the Postgres URL
    /// for `LISTEN` (none on SQLite).
    pub fn new(pool: AnyPool, backend: &'static str, listen_url: Option<String>) -> Self {
        SqlStore {
            pool,
            backend,
            listen_url,
            presence_tx: broadcast::channel(1024).0,
            listening: std::sync::Once::new(),
        }
    }
}

const USER_COLUMNS: &str = "id, username, is_admin, created_at";

fn user_from_row(row: &AnyRow) -> sqlx::Result<User> {
    Ok(User {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        is_admin: row.try_get::<i64, _>("is_admin")? != 0,
        created_at: row.try_get("created_at")?,
    })
}

fn fleet_from_row(row: &AnyRow) -> sqlx::Result<Fleet> {
    Ok(Fleet {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        allowed_ports: parse_ports(&row.try_get::<String, _>("allowed_ports")?),
        created_at: row.try_get("created_at")?,
    })
}

fn role_from_row(row: &AnyRow, column: &str) -> sqlx::Result<Option<Role>> {
    let role: Option<String> = row.try_get(column)?;
    match role {
        None => Ok(None),
        Some(r) => Role::parse(&r)
            .map(Some)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown role {r:?}").into())),
    }
}

/// Device columns plus `relay`, the live relay holding it (if any), and the `transport`
/// of that session; binds `$1` as the
/// cut-off for live heartbeats.
const DEVICE_COLUMNS: &str = "d.uuid, d.fleet_id, f.name AS fleet, d.name, d.key_hash, \
     d.prev_key_hash, d.prev_key_until, d.created_at, d.last_seen, \
     (SELECT p.relay_id FROM presence p JOIN relays r ON r.id = p.relay_id \
       WHERE p.device_uuid = d.uuid AND r.heartbeat_at > $1) AS relay, \
     (SELECT p.transport FROM presence p JOIN relays r ON r.id = p.relay_id \
       WHERE p.device_uuid = d.uuid AND r.heartbeat_at > $1) AS transport, \
     (SELECT p.state FROM presence p JOIN relays r ON r.id = p.relay_id \
       WHERE p.device_uuid = d.uuid AND r.heartbeat_at > $1) AS presence, \
     f.allowed_ports";

/// The tables [`DEVICE_COLUMNS`] reads.
const DEVICE_FROM: &str = "FROM devices d JOIN fleets f ON f.id = d.fleet_id";

fn device_from_row(row: &AnyRow) -> sqlx::Result<Device> {
    Ok(Device {
        uuid: row.try_get("uuid")?,
        fleet_id: row.try_get("fleet_id")?,
        fleet: row.try_get("fleet")?,
        name: row.try_get("name")?,
        key_hash: row.try_get("key_hash")?,
        prev_key_hash: row.try_get("prev_key_hash")?,
        prev_key_until: row.try_get("prev_key_until")?,
        created_at: row.try_get("created_at")?,
        last_seen: row.try_get("last_seen")?,
        relay: row.try_get("relay")?,
        transport: row.try_get("transport")?,
        presence: row.try_get("presence")?,
    })
}

/// `FromRow` for the records read whole with `query_as`: written out rather than derived,
/// because sqlx's derive brings its query macros, which compile both database drivers a
/// second time (for the compiler) in every build.
macro_rules! from_row {
    ($($ty:ident { $($field:ident),* $(,)? })*) => {$(
        impl FromRow<'_, AnyRow> for $ty {
            fn from_row(row: &AnyRow) -> sqlx::Result<Self> {
                Ok($ty { $($field: row.try_get(stringify!($field))?),* })
            }
        }
    )*};
}

from_row! {
    ApiKey {
        id, user_id, name, key_hash, prefix, created_at, last_used_at, revoked_at, expires_at,
    }
    SshKey { id, user_id, title, public_key, fingerprint, created_at }
    Presence { device_uuid, relay_id, peer_addr, session, connected_at, ssh_login }
    EphemeralKey { id, device_uuid, login, user_id, public_key, expires_at }
    TunnelSession {
        id, user_id, username, device_uuid, port, relay_id, opened_at, closed_at, bytes_up,
        bytes_down, close_reason, device_relay, kind, resumes, replayed_bytes, waited_ms,
        resume_failure,
    }
}

/// The one row an `INSERT … RETURNING` gave back, from a statement run to its end.
///
/// SQLite hands out RETURNING rows before it commits, and commits when the statement is
/// stepped to completion. `fetch_one` stops after the first row, so a commit that then
/// failed (a full disk) went unnoticed and the API showed a key that was never stored.
/// Every RETURNING query therefore uses `fetch_all`, which steps to the end, where the
/// commit's error surfaces, and takes its row here.
fn returned<T>(rows: Vec<T>) -> Result<T> {
    rows.into_iter()
        .next()
        .ok_or(StoreError::Database(sqlx::Error::RowNotFound))
}

fn live_cutoff() -> i64 {
    now_ms() - RELAY_DEAD_AFTER_MS
}

#[async_trait]
impl Store for SqlStore {
    fn backend(&self) -> &'static str {
        self.backend
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_user(&self, username: &str, is_admin: bool) -> Result<User> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO users (username, is_admin, created_at) VALUES ($1, $2, $3) \
             RETURNING {USER_COLUMNS}"
        )))
        .bind(username)
        .bind(i64::from(is_admin))
        .bind(now_ms())
        .fetch_all(&self.pool)
        .await?;
        Ok(user_from_row(&returned(row)?)?)
    }

    async fn user_by_id(&self, id: Id) -> Result<Option<User>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS} FROM users WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(user_from_row).transpose()?)
    }

    async fn user_by_name(&self, username: &str) -> Result<Option<User>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS} FROM users WHERE username = $1"
        )))
        .bind(username)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(user_from_row).transpose()?)
    }

    async fn list_users(&self) -> Result<Vec<User>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS} FROM users ORDER BY username"
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(user_from_row)
            .collect::<sqlx::Result<_>>()?)
    }

    async fn delete_user(&self, id: Id) -> Result<bool> {
        let done = sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn count_users(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM users")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }

    async fn create_api_key(
        &self,
        user_id: Id,
        name: &str,
        key_hash: &str,
        prefix: &str,
        expires_at: Option<Millis>,
    ) -> Result<ApiKey> {
        Ok(sqlx::query_as(
            "INSERT INTO api_keys (user_id, name, key_hash, prefix, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
        )
        .bind(user_id)
        .bind(name)
        .bind(key_hash)
        .bind(prefix)
        .bind(now_ms())
        .bind(expires_at)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from)
        .and_then(returned)?)
    }

    async fn api_key_by_id(&self, key_id: Id) -> Result<Option<ApiKey>> {
        Ok(sqlx::query_as("SELECT * FROM api_keys WHERE id = $1")
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<(ApiKey, User)>> {
        let key: Option<ApiKey> =
            sqlx::query_as("SELECT * FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL")
                .bind(key_hash)
                .fetch_optional(&self.pool)
                .await?;
        let Some(key) = key else { return Ok(None) };
        Ok(self.user_by_id(key.user_id).await?.map(|user| (key, user)))
    }

    async fn list_api_keys(&self, user_id: Id) -> Result<Vec<ApiKey>> {
        Ok(
            sqlx::query_as("SELECT * FROM api_keys WHERE user_id = $1 ORDER BY id")
                .bind(user_id)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn revoke_api_key(&self, user_id: Id, key_id: Id) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 \
             WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(key_id)
        .bind(user_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn touch_api_key(&self, key_id: Id, now: i64) -> Result<()> {
        sqlx::query(
            "UPDATE api_keys SET last_used_at = $1 \
             WHERE id = $2 AND (last_used_at IS NULL OR last_used_at < $3)",
        )
        .bind(now)
        .bind(key_id)
        .bind(now - 60_000)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn add_ssh_key(
        &self,
        user_id: Id,
        title: &str,
        public_key: &str,
        fingerprint: &str,
    ) -> Result<SshKey> {
        Ok(sqlx::query_as(
            "INSERT INTO ssh_keys (user_id, title, public_key, fingerprint, created_at) \
             VALUES ($1, $2, $3, $4, $5) RETURNING *",
        )
        .bind(user_id)
        .bind(title)
        .bind(public_key)
        .bind(fingerprint)
        .bind(now_ms())
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from)
        .and_then(returned)?)
    }

    async fn list_ssh_keys(&self, user_id: Id) -> Result<Vec<SshKey>> {
        Ok(
            sqlx::query_as("SELECT * FROM ssh_keys WHERE user_id = $1 ORDER BY id")
                .bind(user_id)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn delete_ssh_key(&self, user_id: Id, key_id: Id) -> Result<bool> {
        let done = sqlx::query("DELETE FROM ssh_keys WHERE id = $1 AND user_id = $2")
            .bind(key_id)
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn create_fleet(
        &self,
        name: &str,
        allowed_ports: &[u16],
        owner: Option<Id>,
    ) -> Result<Fleet> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "INSERT INTO fleets (name, allowed_ports, created_at) VALUES ($1, $2, $3) \
             RETURNING id, name, allowed_ports, created_at",
        )
        .bind(name)
        .bind(format_ports(allowed_ports))
        .bind(now_ms())
        .fetch_all(&mut *tx)
        .await?;
        let fleet = fleet_from_row(&returned(row)?)?;
        if let Some(owner) = owner {
            sqlx::query("INSERT INTO fleet_members (fleet_id, user_id, role) VALUES ($1, $2, $3)")
                .bind(fleet.id)
                .bind(owner)
                .bind(Role::Owner.as_str())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(fleet)
    }

    async fn fleet_by_name(&self, name: &str) -> Result<Option<Fleet>> {
        let row = sqlx::query("SELECT * FROM fleets WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(fleet_from_row).transpose()?)
    }

    async fn list_fleets(&self, member: Option<Id>) -> Result<Vec<Fleet>> {
        let rows = match member {
            None => {
                sqlx::query("SELECT * FROM fleets ORDER BY name")
                    .fetch_all(&self.pool)
                    .await?
            }
            Some(user_id) => {
                sqlx::query(
                    "SELECT f.* FROM fleets f JOIN fleet_members m ON m.fleet_id = f.id \
                     WHERE m.user_id = $1 ORDER BY f.name",
                )
                .bind(user_id)
                .fetch_all(&self.pool)
                .await?
            }
        };
        Ok(rows
            .iter()
            .map(fleet_from_row)
            .collect::<sqlx::Result<_>>()?)
    }

    async fn set_fleet_ports(&self, fleet_id: Id, allowed_ports: &[u16]) -> Result<()> {
        sqlx::query("UPDATE fleets SET allowed_ports = $1 WHERE id = $2")
            .bind(format_ports(allowed_ports))
            .bind(fleet_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn delete_fleet(&self, fleet_id: Id) -> Result<bool> {
        let done = sqlx::query("DELETE FROM fleets WHERE id = $1")
            .bind(fleet_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn member_role(&self, fleet_id: Id, user_id: Id) -> Result<Option<Role>> {
        let row =
            sqlx::query("SELECT role FROM fleet_members WHERE fleet_id = $1 AND user_id = $2")
                .bind(fleet_id)
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?;
        match row {
            None => Ok(None),
            Some(row) => Ok(role_from_row(&row, "role")?),
        }
    }

    async fn set_member(&self, fleet_id: Id, user_id: Id, role: Role) -> Result<()> {
        sqlx::query(
            "INSERT INTO fleet_members (fleet_id, user_id, role) VALUES ($1, $2, $3) \
             ON CONFLICT (fleet_id, user_id) DO UPDATE SET role = excluded.role",
        )
        .bind(fleet_id)
        .bind(user_id)
        .bind(role.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_members(&self, fleet_id: Id) -> Result<Vec<Member>> {
        let rows = sqlx::query(
            "SELECT m.user_id, u.username, m.role FROM fleet_members m \
             JOIN users u ON u.id = m.user_id WHERE m.fleet_id = $1 ORDER BY u.username",
        )
        .bind(fleet_id)
        .fetch_all(&self.pool)
        .await?;
        let mut members = Vec::with_capacity(rows.len());
        for row in &rows {
            let role = role_from_row(row, "role")?
                .ok_or_else(|| StoreError::Database(sqlx::Error::RowNotFound))?;
            members.push(Member {
                user_id: row.try_get("user_id")?,
                username: row.try_get("username")?,
                role,
            });
        }
        Ok(members)
    }

    async fn remove_member(&self, fleet_id: Id, user_id: Id) -> Result<bool> {
        let done = sqlx::query("DELETE FROM fleet_members WHERE fleet_id = $1 AND user_id = $2")
            .bind(fleet_id)
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn create_device(
        &self,
        uuid: &str,
        fleet_id: Id,
        name: &str,
        key_hash: &str,
    ) -> Result<Device> {
        sqlx::query(
            "INSERT INTO devices (uuid, fleet_id, name, key_hash, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(uuid)
        .bind(fleet_id)
        .bind(name)
        .bind(key_hash)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        self.device(uuid)
            .await?
            .ok_or(StoreError::Database(sqlx::Error::RowNotFound))
    }

    async fn device(&self, uuid: &str) -> Result<Option<Device>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEVICE_COLUMNS} {DEVICE_FROM} WHERE d.uuid = $2"
        )))
        .bind(live_cutoff())
        .bind(uuid)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(device_from_row).transpose()?)
    }

    async fn list_devices(&self, member: Option<Id>, filter: &DeviceFilter) -> Result<Vec<Device>> {
        // A prefix of hex digits has no LIKE wildcards in it; the caller checked it.
        let prefix = filter.uuid_prefix.as_ref().map(|p| format!("{p}%"));
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEVICE_COLUMNS} {DEVICE_FROM} \
             WHERE ($2 IS NULL OR EXISTS (SELECT 1 FROM fleet_members m \
                    WHERE m.fleet_id = d.fleet_id AND m.user_id = $2)) \
               AND ($3 IS NULL OR d.uuid LIKE $3) \
               AND ($4 IS NULL OR d.name = $4) \
             ORDER BY f.name, d.name, d.uuid"
        )))
        .bind(live_cutoff())
        .bind(member)
        .bind(prefix)
        .bind(filter.name.as_deref())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(device_from_row)
            .collect::<sqlx::Result<_>>()?)
    }

    async fn device_by_key_hash(&self, key_hash: &str) -> Result<Option<Device>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEVICE_COLUMNS} {DEVICE_FROM} WHERE d.key_hash = $2 \
             OR (d.prev_key_hash = $2 AND d.prev_key_until > $3)"
        )))
        .bind(live_cutoff())
        .bind(key_hash)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(device_from_row).transpose()?)
    }

    async fn rotate_device_key(
        &self,
        uuid: &str,
        new_key_hash: &str,
        keep_old_until: Millis,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE devices SET prev_key_hash = key_hash, prev_key_until = $1, key_hash = $2 \
             WHERE uuid = $3",
        )
        .bind(keep_old_until)
        .bind(new_key_hash)
        .bind(uuid)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn forget_previous_device_key(&self, uuid: &str) -> Result<()> {
        sqlx::query(
            "UPDATE devices SET prev_key_hash = NULL, prev_key_until = NULL \
             WHERE uuid = $1 AND prev_key_hash IS NOT NULL",
        )
        .bind(uuid)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_device(&self, uuid: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM devices WHERE uuid = $1")
            .bind(uuid)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn device_access(&self, user_id: Id, uuid: &str) -> Result<Option<DeviceAccess>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEVICE_COLUMNS}, m.role {DEVICE_FROM} LEFT JOIN fleet_members m \
               ON m.fleet_id = d.fleet_id AND m.user_id = $2 \
             WHERE d.uuid = $3"
        )))
        .bind(live_cutoff())
        .bind(user_id)
        .bind(uuid)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(DeviceAccess {
            device: device_from_row(&row)?,
            allowed_ports: parse_ports(&row.try_get::<String, _>("allowed_ports")?),
            role: role_from_row(&row, "role")?,
        }))
    }

    async fn register_relay(&self, relay_id: &str, peer_addr: &str) -> Result<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO relays (id, peer_addr, started_at, heartbeat_at) VALUES ($1, $2, $3, $3) \
             ON CONFLICT (id) DO UPDATE SET peer_addr = excluded.peer_addr, \
             started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at",
        )
        .bind(relay_id)
        .bind(peer_addr)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn heartbeat(&self, relay_id: &str, status: RelayStatus) -> Result<()> {
        sqlx::query(
            "UPDATE relays SET heartbeat_at = $1, draining = $2, devices = $3, tunnels = $4 \
             WHERE id = $5",
        )
        .bind(now_ms())
        .bind(i64::from(status.draining))
        .bind(status.devices)
        .bind(status.tunnels)
        .bind(relay_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn remove_relay(&self, relay_id: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        // Its devices were last seen now, as each session's own end would have recorded.
        sqlx::query(
            "UPDATE devices SET last_seen = $1 WHERE uuid IN \
             (SELECT device_uuid FROM presence WHERE relay_id = $2)",
        )
        .bind(now_ms())
        .bind(relay_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM presence WHERE relay_id = $1")
            .bind(relay_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM relays WHERE id = $1")
            .bind(relay_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn prune_relays(&self, before: Millis) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM presence WHERE relay_id IN \
             (SELECT id FROM relays WHERE heartbeat_at < $1)",
        )
        .bind(before)
        .execute(&mut *tx)
        .await?;
        let done = sqlx::query("DELETE FROM relays WHERE heartbeat_at < $1")
            .bind(before)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn list_relays(&self) -> Result<Vec<RelayRow>> {
        let rows = sqlx::query(
            "SELECT id, peer_addr, started_at, heartbeat_at, draining, devices, tunnels \
             FROM relays ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        let relay = |row: &AnyRow| -> sqlx::Result<RelayRow> {
            Ok(RelayRow {
                id: row.try_get("id")?,
                peer_addr: row.try_get("peer_addr")?,
                started_at: row.try_get("started_at")?,
                heartbeat_at: row.try_get("heartbeat_at")?,
                draining: row.try_get::<i64, _>("draining")? != 0,
                devices: row.try_get("devices")?,
                tunnels: row.try_get("tunnels")?,
            })
        };
        Ok(rows.iter().map(relay).collect::<sqlx::Result<_>>()?)
    }

    async fn shared_secret(&self, name: &str, candidate: &str) -> Result<String> {
        sqlx::query(
            "INSERT INTO cluster_secrets (name, value, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(candidate)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT value FROM cluster_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("value")?)
    }

    async fn startup_lock(&self) -> Result<StartupLock> {
        if self.listen_url.is_none() {
            return Ok(StartupLock::none());
        }
        super::postgres::startup_lock(self.pool.acquire().await?).await
    }

    fn presence_changes(&self) -> broadcast::Receiver<PresenceChange> {
        let rx = self.presence_tx.subscribe();
        if let Some(url) = &self.listen_url {
            self.listening.call_once(|| {
                tokio::spawn(super::postgres::listen_presence(
                    url.clone(),
                    self.presence_tx.clone(),
                ));
            });
        }
        rx
    }

    async fn set_presence(
        &self,
        device_uuid: &str,
        relay_id: &str,
        session: &str,
        transport: &str,
        ssh_login: Option<&str>,
    ) -> Result<()> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO presence (device_uuid, relay_id, session, connected_at, transport, \
             ssh_login, state) VALUES ($1, $2, $3, $4, $5, $6, 'online') \
             ON CONFLICT (device_uuid) DO UPDATE SET \
             relay_id = excluded.relay_id, session = excluded.session, \
             connected_at = excluded.connected_at, transport = excluded.transport, \
             ssh_login = excluded.ssh_login, state = excluded.state",
        )
        .bind(device_uuid)
        .bind(relay_id)
        .bind(session)
        .bind(now)
        .bind(transport)
        .bind(ssh_login)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE devices SET last_seen = $1 WHERE uuid = $2")
            .bind(now)
            .bind(device_uuid)
            .execute(&mut *tx)
            .await?;
        let change = PresenceChange {
            device_uuid: device_uuid.to_owned(),
            relay_id: relay_id.to_owned(),
            session: session.to_owned(),
        };
        if self.listen_url.is_some() {
            // Delivered to every relay's LISTEN when (and only if) this commits.
            super::postgres::notify_presence(&mut tx, &change).await?;
        }
        tx.commit().await?;
        if self.listen_url.is_none() {
            let _ = self.presence_tx.send(change);
        }
        Ok(())
    }

    async fn clear_presence(&self, device_uuid: &str, session: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM presence WHERE device_uuid = $1 AND session = $2")
            .bind(device_uuid)
            .bind(session)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE devices SET last_seen = $1 WHERE uuid = $2")
            .bind(now_ms())
            .bind(device_uuid)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn clear_relay_presence(&self, relay_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM presence WHERE relay_id = $1")
            .bind(relay_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn presence(&self, device_uuid: &str) -> Result<Option<Presence>> {
        Ok(sqlx::query_as(
            "SELECT p.device_uuid, p.relay_id, r.peer_addr, p.session, p.connected_at, \
             p.ssh_login FROM presence p JOIN relays r ON r.id = p.relay_id \
             WHERE p.device_uuid = $1 AND r.heartbeat_at > $2",
        )
        .bind(device_uuid)
        .bind(live_cutoff())
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn set_presence_state(
        &self,
        device_uuid: &str,
        session: &str,
        state: PresenceState,
    ) -> Result<bool> {
        let done =
            sqlx::query("UPDATE presence SET state = $1 WHERE device_uuid = $2 AND session = $3")
                .bind(state.as_str())
                .bind(device_uuid)
                .bind(session)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn relay_presence(
        &self,
        relay_id: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT device_uuid, session FROM presence WHERE relay_id = $1 AND device_uuid > $2 \
             ORDER BY device_uuid LIMIT $3",
        )
        .bind(relay_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("device_uuid")?, r.try_get("session")?)))
            .collect()
    }

    async fn open_tunnel(&self, t: &TunnelSession) -> Result<()> {
        sqlx::query(
            "INSERT INTO tunnel_sessions (id, user_id, username, device_uuid, port, relay_id, \
             opened_at, device_relay, kind) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&t.id)
        .bind(t.user_id)
        .bind(&t.username)
        .bind(&t.device_uuid)
        .bind(t.port)
        .bind(&t.relay_id)
        .bind(t.opened_at)
        .bind(&t.device_relay)
        .bind(&t.kind)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn close_tunnel(&self, id: &str, close: &TunnelClose) -> Result<()> {
        sqlx::query(
            "UPDATE tunnel_sessions SET closed_at = $1, bytes_up = $2, bytes_down = $3, \
             close_reason = $4, resumes = $5, replayed_bytes = $6, waited_ms = $7, \
             resume_failure = $8 WHERE id = $9",
        )
        .bind(now_ms())
        .bind(close.bytes_up)
        .bind(close.bytes_down)
        .bind(&close.reason)
        .bind(close.resumes)
        .bind(close.replayed_bytes)
        .bind(close.waited_ms)
        .bind(&close.resume_failure)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn prune_tunnels(&self, before: Millis, batch: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM tunnel_sessions WHERE id IN \
             (SELECT id FROM tunnel_sessions WHERE opened_at < $1 ORDER BY opened_at LIMIT $2)",
        )
        .bind(before)
        .bind(batch)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn list_tunnels(
        &self,
        user_id: Option<Id>,
        device_uuid: Option<&str>,
        limit: i64,
    ) -> Result<Vec<TunnelSession>> {
        // `$n IS NULL OR …` keeps one statement for every filter (both backends plan it
        // well enough for an audit listing of at most 1000 rows).
        Ok(sqlx::query_as(
            "SELECT * FROM tunnel_sessions \
             WHERE ($1 IS NULL OR user_id = $1) AND ($2 IS NULL OR device_uuid = $2) \
             ORDER BY opened_at DESC LIMIT $3",
        )
        .bind(user_id)
        .bind(device_uuid)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn add_ephemeral_key(&self, key: &EphemeralKey) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM ephemeral_keys WHERE expires_at <= $1")
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO ephemeral_keys (id, device_uuid, login, user_id, public_key, \
             expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&key.id)
        .bind(&key.device_uuid)
        .bind(&key.login)
        .bind(key.user_id)
        .bind(&key.public_key)
        .bind(key.expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn ephemeral_keys(
        &self,
        device_uuid: &str,
        login: &str,
        now: Millis,
    ) -> Result<Vec<(EphemeralKey, String)>> {
        let rows = sqlx::query(
            "SELECT k.id, k.device_uuid, k.login, k.user_id, k.public_key, k.expires_at, \
             u.username FROM ephemeral_keys k JOIN users u ON u.id = k.user_id \
             WHERE k.device_uuid = $1 AND k.login = $2 AND k.expires_at > $3 ORDER BY k.id",
        )
        .bind(device_uuid)
        .bind(login)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    EphemeralKey::from_row(row)?,
                    row.try_get::<String, _>("username")?,
                ))
            })
            .collect()
    }

    async fn remove_ephemeral_key(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM ephemeral_keys WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
