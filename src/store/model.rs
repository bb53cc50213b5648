//! What the store holds and promises: its rows, its errors, and the [`Store`] trait both
//! backends implement.

use crate::proto::api::Role;
use async_trait::async_trait;
use sqlx::error::DatabaseError as _;

/// A row id (users, keys, fleets): the same id the API shows.
pub use crate::proto::api::Id;

/// Unix time in milliseconds; every timestamp in the store has this form.
pub type Millis = i64;

/// The current time as [`Millis`].
pub fn now_ms() -> Millis {
    chrono::Utc::now().timestamp_millis()
}

/// Errors from the store, sorted by what a caller can do about them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached right now; the caller should answer 503 and try later.
    #[error("the store is unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// A unique constraint refused the write (duplicate name, key, member).
    #[error("already exists")]
    Conflict,
    /// The URL names no backend we know.
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
    /// Applying migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Any other database error: a bug or a broken schema, logged and answered as 500.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict,
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => StoreError::Unavailable(e),
            // Postgres shutting down or restarting answers with class 57 (operator intervention)
            // or 08 (connection exception); both mean "try again later", not "bug".
            sqlx::Error::Database(db)
                if db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some_and(|pg| {
                        let c = pg.code();
                        c.starts_with("57") || c.starts_with("08") || c.starts_with("53")
                    }) =>
            {
                StoreError::Unavailable(e)
            }
            // SQLite's faults of the machine rather than of the query: a full disk, an I/O
            // error, a database busy or locked past the busy timeout, a read-only or
            // unopenable file. The operator fixes them and the relay carries on.
            sqlx::Error::Database(db)
                if db
                    .try_downcast_ref::<sqlx::sqlite::SqliteError>()
                    .and_then(|e| e.code())
                    .and_then(|c| c.parse::<i32>().ok())
                    .is_some_and(|c| SQLITE_TRANSIENT.contains(&(c & 0xff))) =>
            {
                StoreError::Unavailable(e)
            }
            _ => StoreError::Database(e),
        }
    }
}

/// SQLite primary result codes that mean "the machine, not the query": SQLITE_BUSY (5),
/// SQLITE_LOCKED (6), SQLITE_NOMEM (7), SQLITE_READONLY (8), SQLITE_IOERR (10),
/// SQLITE_FULL (13), SQLITE_CANTOPEN (14).
const SQLITE_TRANSIENT: [i32; 7] = [5, 6, 7, 8, 10, 13, 14];

/// Shorthand for store results.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A person (or a script) with an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Row id; JWTs and audit rows name users by it.
    pub id: Id,
    /// Unique login name, `[a-z0-9][a-z0-9_-]{0,62}`.
    pub username: String,
    /// Admins may do everything, on every fleet.
    pub is_admin: bool,
    /// When the account was made.
    pub created_at: Millis,
}

/// An API key's metadata; the secret itself is never stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Row id, used to revoke it.
    pub id: Id,
    /// The owner.
    pub user_id: Id,
    /// The owner's label for it.
    pub name: String,
    /// Hex SHA-256 of the key; what a presented key is compared against.
    pub key_hash: String,
    /// The first characters of the key, so people can tell their keys apart.
    pub prefix: String,
    /// When it was made.
    pub created_at: Millis,
    /// When it last authenticated a request (updated at most once a minute).
    pub last_used_at: Option<Millis>,
    /// When it was revoked; a revoked key never authenticates again.
    pub revoked_at: Option<Millis>,
    /// When it stops working, if it was made with an expiry.
    pub expires_at: Option<Millis>,
}

impl ApiKey {
    /// Whether the key authenticates at `now`: not revoked and not expired.
    pub fn is_active(&self, now: Millis) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|at| at > now)
    }
}

/// A user's public SSH key, served to devices' sshd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshKey {
    /// Row id, used to remove it.
    pub id: Id,
    /// The owner.
    pub user_id: Id,
    /// The owner's label for it.
    pub title: String,
    /// The key in OpenSSH one-line form (`ssh-ed25519 AAAA… comment`).
    pub public_key: String,
    /// `SHA256:…`, as `ssh-keygen -lf` prints it.
    pub fingerprint: String,
    /// When it was added.
    pub created_at: Millis,
}

/// A group of devices and the people who may reach them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fleet {
    /// Row id.
    pub id: Id,
    /// Unique name.
    pub name: String,
    /// Ports members may reach on the fleet's devices; empty means every port.
    pub allowed_ports: Vec<u16>,
    /// When it was made.
    pub created_at: Millis,
}

impl Fleet {
    /// Whether `port` is open to the fleet's members.
    pub fn allows_port(&self, port: u16) -> bool {
        self.allowed_ports.is_empty() || self.allowed_ports.contains(&port)
    }
}

/// One row of a fleet's member list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The member.
    pub user_id: Id,
    /// Their name, for display.
    pub username: String,
    /// What they may do.
    pub role: Role,
}

/// Narrows a device listing; the default matches every device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFilter {
    /// Only uuids that start with this (lowercase hex; checked by the caller).
    pub uuid_prefix: Option<String>,
    /// Only devices with exactly this name.
    pub name: Option<String>,
}

/// A device registered in a fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// 32 lowercase hex characters.
    pub uuid: String,
    /// The fleet it belongs to.
    pub fleet_id: Id,
    /// That fleet's name, joined in for display.
    pub fleet: String,
    /// A label.
    pub name: String,
    /// Hex SHA-256 of the device key.
    pub key_hash: String,
    /// After a key rotation: hex SHA-256 of the previous key, still accepted until
    /// `prev_key_until` or until the agent connects with the new key.
    pub prev_key_hash: Option<String>,
    /// Until when the previous key is accepted.
    pub prev_key_until: Option<Millis>,
    /// When it was registered.
    pub created_at: Millis,
    /// When its agent last connected or disconnected.
    pub last_seen: Option<Millis>,
    /// The live relay that holds a session for it right now, if one does.
    pub relay: Option<String>,
    /// How that session reaches the relay (`quic` or `tcp`), while there is one.
    pub transport: Option<String>,
    /// That session's state (`online` or `reconnecting`), while there is one.
    pub presence: Option<String>,
}

impl Device {
    /// Whether a live relay holds a live session for it right now.
    pub fn online(&self) -> bool {
        self.state() == PresenceState::Online.as_str()
    }

    /// `online`, `reconnecting` (a relay holds tunnels for it while its link is gone or
    /// silent) or `offline`.
    pub fn state(&self) -> &str {
        match (&self.relay, &self.presence) {
            (None, _) => "offline",
            (Some(_), Some(state)) => state,
            (Some(_), None) => PresenceState::Online.as_str(),
        }
    }
}

/// A presence row's state (PROTOCOL.md §2e, "Presence").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceState {
    /// Its link is live.
    Online,
    /// The relay holds tunnels for it while its link is gone, or has heard nothing on the
    /// link for longer than the agent's keep-alive allows.
    Reconnecting,
}

impl PresenceState {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceState::Online => "online",
            PresenceState::Reconnecting => "reconnecting",
        }
    }
}

/// What the policy needs to know about one device for one user, in one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAccess {
    /// The device.
    pub device: Device,
    /// Its fleet's port allowlist; empty means every port.
    pub allowed_ports: Vec<u16>,
    /// The user's role in that fleet, if any.
    pub role: Option<Role>,
}

/// Where a device is connected right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// The device.
    pub device_uuid: String,
    /// The relay that holds its connection.
    pub relay_id: String,
    /// That relay's peer address, for forwarding.
    pub peer_addr: String,
    /// The session id the relay gave it; a newer session replaces an older one.
    pub session: String,
    /// When the session began.
    pub connected_at: Millis,
    /// The account the device's sshd logs users in as, if its agent names one.
    pub ssh_login: Option<String>,
}

/// A key a relay minted for one browser terminal session (PROTOCOL.md §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EphemeralKey {
    /// The terminal session's id (its tunnel id).
    pub id: String,
    /// The only device whose lookup returns it.
    pub device_uuid: String,
    /// The only account it is returned for.
    pub login: String,
    /// The user the session belongs to.
    pub user_id: Id,
    /// One OpenSSH public key line.
    pub public_key: String,
    /// After this the lookup no longer returns it.
    pub expires_at: Millis,
}

/// A tunnel as the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSession {
    /// Tunnel id (also sent to the device in the `open` frame).
    pub id: String,
    /// Who opened it.
    pub user_id: Id,
    /// Their name at the time.
    pub username: String,
    /// To which device.
    pub device_uuid: String,
    /// Which port on the device.
    pub port: i64,
    /// Which relay carried it.
    pub relay_id: String,
    /// When the device accepted it.
    pub opened_at: Millis,
    /// When it ended; `None` while open.
    pub closed_at: Option<Millis>,
    /// Bytes from the user to the device.
    pub bytes_up: i64,
    /// Bytes from the device to the user.
    pub bytes_down: i64,
    /// Why it ended (`closed`, `reset`, `revoked`, `shutdown`, …).
    pub close_reason: Option<String>,
    /// For a tunnel forwarded to another relay: the relay that held the device.
    pub device_relay: Option<String>,
    /// What opened it: `connect` or `terminal`.
    pub kind: String,
    /// How often it resumed on a new device link (PROTOCOL.md §2e).
    pub resumes: i64,
    /// Bytes the relay sent again after those resumes.
    pub replayed_bytes: i64,
    /// Milliseconds it spent waiting for the device.
    pub waited_ms: i64,
    /// Why its last resume failed (`expired`, `gone`, …), if one did.
    pub resume_failure: Option<String>,
}

/// How a tunnel ended, for its audit row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelClose {
    /// Bytes from the user to the device.
    pub bytes_up: i64,
    /// Bytes from the device to the user.
    pub bytes_down: i64,
    /// Why it ended.
    pub reason: String,
    /// How often it resumed.
    pub resumes: i64,
    /// Bytes sent again after resumes.
    pub replayed_bytes: i64,
    /// Milliseconds spent waiting for the device.
    pub waited_ms: i64,
    /// Why its last resume failed, if one did.
    pub resume_failure: Option<String>,
}

/// A relay of the cluster as `GET /v1/relays` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayRow {
    /// Its id.
    pub id: String,
    /// The address other relays dial (its API address on a single relay).
    pub peer_addr: String,
    /// When it started.
    pub started_at: Millis,
    /// Its last heartbeat.
    pub heartbeat_at: Millis,
    /// Whether it is draining (SIGTERM received).
    pub draining: bool,
    /// Devices connected to it, as of its last heartbeat.
    pub devices: i64,
    /// Tunnels open on it, as of its last heartbeat.
    pub tunnels: i64,
}

impl RelayRow {
    /// Whether its heartbeat is fresh at `now`.
    pub fn alive(&self, now: Millis) -> bool {
        self.heartbeat_at > now - RELAY_DEAD_AFTER_MS
    }
}

/// What a relay reports with each heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStatus {
    /// Draining: no new tunnels or devices.
    pub draining: bool,
    /// Devices connected now.
    pub devices: i64,
    /// Tunnels open now.
    pub tunnels: i64,
}

/// A device's presence moved: it connected to `relay_id` in `session`. Every relay hears
/// it (Postgres `LISTEN/NOTIFY`, encoded in `postgres.rs`; in-process on SQLite), and a
/// relay holding an older session of the device supersedes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    /// The device.
    pub device_uuid: String,
    /// The relay it connected to.
    pub relay_id: String,
    /// The new session.
    pub session: String,
}

/// Held while a relay does its start-up writes (bootstrap admin, shared secrets), so
/// relays starting at the same moment on an empty database take turns. Postgres holds a
/// session advisory lock (`postgres.rs`); SQLite holds nothing (one relay per database).
pub struct StartupLock(Option<Box<dyn HeldLock>>);

/// What a backend holds for a [`StartupLock`]. Dropped without [`HeldLock::release`], it
/// must still let the lock go (close its session rather than keep it locked).
#[async_trait]
pub trait HeldLock: Send {
    /// Gives the lock back.
    async fn release(self: Box<Self>);
}

impl StartupLock {
    /// A lock that locks nothing (SQLite: one relay per database).
    pub fn none() -> StartupLock {
        StartupLock(None)
    }

    /// A lock a backend holds.
    pub fn held(lock: Box<dyn HeldLock>) -> StartupLock {
        StartupLock(Some(lock))
    }

    /// Gives the lock back.
    pub async fn release(mut self) {
        if let Some(lock) = self.0.take() {
            lock.release().await;
        }
    }
}

/// The store interface. Every method is one short transaction; none holds a lock across calls.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `postgres` or `sqlite`, for logs and `/readyz`.
    fn backend(&self) -> &'static str;
    /// Succeeds when the database answers a trivial query.
    async fn ping(&self) -> Result<()>;

    /// Creates a user; [`StoreError::Conflict`] when the name is taken.
    async fn create_user(&self, username: &str, is_admin: bool) -> Result<User>;
    /// Looks a user up by id.
    async fn user_by_id(&self, id: Id) -> Result<Option<User>>;
    /// Looks a user up by name.
    async fn user_by_name(&self, username: &str) -> Result<Option<User>>;
    /// Every user, by name.
    async fn list_users(&self) -> Result<Vec<User>>;
    /// Deletes a user and everything they own (keys, memberships); false if there was none.
    async fn delete_user(&self, id: Id) -> Result<bool>;
    /// How many users exist (zero means a first start: bootstrap the admin).
    async fn count_users(&self) -> Result<i64>;

    /// Stores a new API key's hash; [`StoreError::Conflict`] if that hash exists.
    async fn create_api_key(
        &self,
        user_id: Id,
        name: &str,
        key_hash: &str,
        prefix: &str,
        expires_at: Option<Millis>,
    ) -> Result<ApiKey>;
    /// The unrevoked key with this hash and its user (expiry is the caller's to check).
    async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<(ApiKey, User)>>;
    /// A key by row id, revoked or not.
    async fn api_key_by_id(&self, key_id: Id) -> Result<Option<ApiKey>>;
    /// A user's keys, revoked ones included, oldest first.
    async fn list_api_keys(&self, user_id: Id) -> Result<Vec<ApiKey>>;
    /// Revokes one of a user's keys; false if it is not theirs or already revoked.
    async fn revoke_api_key(&self, user_id: Id, key_id: Id) -> Result<bool>;
    /// Records that a key was used, at most once a minute per key.
    async fn touch_api_key(&self, key_id: Id, now: Millis) -> Result<()>;

    /// Adds an SSH key; [`StoreError::Conflict`] if the user has that fingerprint already.
    async fn add_ssh_key(
        &self,
        user_id: Id,
        title: &str,
        public_key: &str,
        fingerprint: &str,
    ) -> Result<SshKey>;
    /// A user's SSH keys, oldest first.
    async fn list_ssh_keys(&self, user_id: Id) -> Result<Vec<SshKey>>;
    /// Removes one of a user's SSH keys; false if it is not theirs.
    async fn delete_ssh_key(&self, user_id: Id, key_id: Id) -> Result<bool>;

    /// Creates a fleet, with `owner` (if any) as its first owner, in one transaction.
    async fn create_fleet(
        &self,
        name: &str,
        allowed_ports: &[u16],
        owner: Option<Id>,
    ) -> Result<Fleet>;
    /// Looks a fleet up by name.
    async fn fleet_by_name(&self, name: &str) -> Result<Option<Fleet>>;
    /// Every fleet (`None`) or the fleets a user belongs to, by name.
    async fn list_fleets(&self, member: Option<Id>) -> Result<Vec<Fleet>>;
    /// Replaces a fleet's port allowlist.
    async fn set_fleet_ports(&self, fleet_id: Id, allowed_ports: &[u16]) -> Result<()>;
    /// Deletes a fleet with its devices and memberships; false if there was none.
    async fn delete_fleet(&self, fleet_id: Id) -> Result<bool>;
    /// A user's role in a fleet, if any.
    async fn member_role(&self, fleet_id: Id, user_id: Id) -> Result<Option<Role>>;
    /// Adds a member or changes their role.
    async fn set_member(&self, fleet_id: Id, user_id: Id, role: Role) -> Result<()>;
    /// A fleet's members, by name.
    async fn list_members(&self, fleet_id: Id) -> Result<Vec<Member>>;
    /// Removes a member; false if they were not one.
    async fn remove_member(&self, fleet_id: Id, user_id: Id) -> Result<bool>;

    /// Registers a device; [`StoreError::Conflict`] if the uuid exists.
    async fn create_device(
        &self,
        uuid: &str,
        fleet_id: Id,
        name: &str,
        key_hash: &str,
    ) -> Result<Device>;
    /// Looks a device up by uuid.
    async fn device(&self, uuid: &str) -> Result<Option<Device>>;
    /// Every device (`None`) or those in fleets the user belongs to, narrowed by `filter`,
    /// by fleet then name.
    async fn list_devices(&self, member: Option<Id>, filter: &DeviceFilter) -> Result<Vec<Device>>;
    /// The device whose key (or previous key, within its grace period) has this hash.
    async fn device_by_key_hash(&self, key_hash: &str) -> Result<Option<Device>>;
    /// Replaces a device's key, keeping the old one acceptable until `keep_old_until`;
    /// false if there is no such device.
    async fn rotate_device_key(
        &self,
        uuid: &str,
        new_key_hash: &str,
        keep_old_until: Millis,
    ) -> Result<bool>;
    /// Stops accepting a device's previous key (its agent has connected with the new one).
    async fn forget_previous_device_key(&self, uuid: &str) -> Result<()>;
    /// Deletes a device; false if there was none.
    async fn delete_device(&self, uuid: &str) -> Result<bool>;
    /// The device, its fleet's ports and the user's role there: everything the policy needs.
    async fn device_access(&self, user_id: Id, uuid: &str) -> Result<Option<DeviceAccess>>;

    /// Registers (or re-registers) a relay and its peer address.
    async fn register_relay(&self, relay_id: &str, peer_addr: &str) -> Result<()>;
    /// Marks a relay alive now, with its state.
    async fn heartbeat(&self, relay_id: &str, status: RelayStatus) -> Result<()>;
    /// Removes a relay's row and its presence rows (a clean stop).
    async fn remove_relay(&self, relay_id: &str) -> Result<()>;
    /// Removes relays whose heartbeat is older than `before`, with their presence rows;
    /// how many.
    async fn prune_relays(&self, before: Millis) -> Result<u64>;
    /// Every registered relay, by id.
    async fn list_relays(&self) -> Result<Vec<RelayRow>>;
    /// The value of the cluster-wide secret `name`: `candidate` if nobody stored one yet
    /// (the first relay's wins; later callers get that one).
    async fn shared_secret(&self, name: &str, candidate: &str) -> Result<String>;
    /// Takes the start-up lock (see [`StartupLock`]).
    async fn startup_lock(&self) -> Result<StartupLock>;
    /// Presence changes from every relay, as they happen.
    fn presence_changes(&self) -> tokio::sync::broadcast::Receiver<PresenceChange>;
    /// Records that a device is connected to a relay in a session, replacing any older row.
    async fn set_presence(
        &self,
        device_uuid: &str,
        relay_id: &str,
        session: &str,
        transport: &str,
        ssh_login: Option<&str>,
    ) -> Result<()>;
    /// Removes a device's presence row if it still names this session, and sets `last_seen`.
    async fn clear_presence(&self, device_uuid: &str, session: &str) -> Result<()>;
    /// Removes every presence row of a relay (at its start and clean exit).
    async fn clear_relay_presence(&self, relay_id: &str) -> Result<()>;
    /// Where a device is connected, counting only relays whose heartbeat is fresh.
    async fn presence(&self, device_uuid: &str) -> Result<Option<Presence>>;
    /// Sets the state of a device's presence row if it still names `session`; whether it
    /// did.
    async fn set_presence_state(
        &self,
        device_uuid: &str,
        session: &str,
        state: PresenceState,
    ) -> Result<bool>;
    /// The presence rows of a relay as `(device, session)`, in device order after
    /// `after`, at most `limit`: a relay pages through its own rows to reconcile them.
    async fn relay_presence(
        &self,
        relay_id: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<(String, String)>>;

    /// Writes the audit row of a tunnel the device accepted.
    async fn open_tunnel(&self, t: &TunnelSession) -> Result<()>;
    /// Completes a tunnel's audit row.
    async fn close_tunnel(&self, id: &str, close: &TunnelClose) -> Result<()>;
    /// Deletes at most `batch` audit rows of tunnels opened before `before`, oldest first;
    /// how many. Callers loop in small batches so that no statement holds locks long.
    async fn prune_tunnels(&self, before: Millis, batch: i64) -> Result<u64>;
    /// The newest tunnels, all (`None`) or one user's, to any device (`None`) or one, at
    /// most `limit`.
    async fn list_tunnels(
        &self,
        user_id: Option<Id>,
        device_uuid: Option<&str>,
        limit: i64,
    ) -> Result<Vec<TunnelSession>>;

    /// Stores a terminal session's key, and drops every key whose window has passed.
    async fn add_ephemeral_key(&self, key: &EphemeralKey) -> Result<()>;
    /// The keys for `login` on `device_uuid` whose window is open at `now`, with their
    /// users' names.
    async fn ephemeral_keys(
        &self,
        device_uuid: &str,
        login: &str,
        now: Millis,
    ) -> Result<Vec<(EphemeralKey, String)>>;
    /// Ends a key's window (its session authenticated, or gave up).
    async fn remove_ephemeral_key(&self, id: &str) -> Result<()>;
}

pub use crate::proto::is_valid_name;

/// Heartbeats older than this mean the relay is dead and its presence rows do not count.
pub const RELAY_DEAD_AFTER_MS: Millis = 15_000;

/// Parses the stored allowlist form (`"22222,80"`); junk entries are skipped.
pub(crate) fn parse_ports(s: &str) -> Vec<u16> {
    s.split(',').filter_map(|p| p.trim().parse().ok()).collect()
}

/// The stored allowlist form of a port list.
pub(crate) fn format_ports(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
