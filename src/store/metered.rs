//! A [`Store`] that times every call and counts its failures for `/metrics`
//! (`cloudlink_store_query_seconds`, `cloudlink_store_errors_total`), then hands it to the
//! real store unchanged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus::{HistogramVec, IntCounterVec};
use tokio::sync::broadcast;

use super::*;
use crate::proto::api::Role;

/// The wrapped store and the two metrics it feeds.
pub struct Metered {
    inner: Arc<dyn Store>,
    queries: HistogramVec,
    errors: IntCounterVec,
}

impl Metered {
    /// Wraps `inner`; `queries` is labelled by `op`, `errors` by `kind`.
    pub fn new(inner: Arc<dyn Store>, queries: HistogramVec, errors: IntCounterVec) -> Metered {
        Metered {
            inner,
            queries,
            errors,
        }
    }

    fn record<T>(&self, op: &str, took: Duration, result: &Result<T>) {
        self.queries
            .with_label_values(&[op])
            .observe(took.as_secs_f64());
        let kind = match result {
            Ok(_) | Err(StoreError::Conflict) => return,
            Err(StoreError::Unavailable(_)) => "unavailable",
            Err(_) => "database",
        };
        self.errors.with_label_values(&[kind]).inc();
    }
}

/// The `Store` impl: each listed method times the inner call under its own name and counts
/// a failure. (The whole impl comes out of the macro so that `async_trait` sees the
/// methods.)
macro_rules! metered {
    ($( fn $name:ident(&self $(, $arg:ident : $ty:ty)* ) -> $ret:ty; )*) => {
        #[async_trait]
        impl Store for Metered {
            fn backend(&self) -> &'static str {
                self.inner.backend()
            }

            fn presence_changes(&self) -> broadcast::Receiver<PresenceChange> {
                self.inner.presence_changes()
            }

            $(
                async fn $name(&self $(, $arg: $ty)*) -> $ret {
                    let start = Instant::now();
                    let result = self.inner.$name($($arg),*).await;
                    self.record(stringify!($name), start.elapsed(), &result);
                    result
                }
            )*
        }
    };
}

metered! {
    fn ping(&self) -> Result<()>;
    fn create_user(&self, username: &str, is_admin: bool) -> Result<User>;
    fn user_by_id(&self, id: Id) -> Result<Option<User>>;
    fn user_by_name(&self, username: &str) -> Result<Option<User>>;
    fn list_users(&self) -> Result<Vec<User>>;
    fn delete_user(&self, id: Id) -> Result<bool>;
    fn count_users(&self) -> Result<i64>;
    fn create_api_key(&self, user_id: Id, name: &str, key_hash: &str, prefix: &str,
        expires_at: Option<Millis>) -> Result<ApiKey>;
    fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<(ApiKey, User)>>;
    fn api_key_by_id(&self, key_id: Id) -> Result<Option<ApiKey>>;
    fn list_api_keys(&self, user_id: Id) -> Result<Vec<ApiKey>>;
    fn revoke_api_key(&self, user_id: Id, key_id: Id) -> Result<bool>;
    fn touch_api_key(&self, key_id: Id, now: Millis) -> Result<()>;
    fn add_ssh_key(&self, user_id: Id, title: &str, public_key: &str, fingerprint: &str)
        -> Result<SshKey>;
    fn list_ssh_keys(&self, user_id: Id) -> Result<Vec<SshKey>>;
    fn delete_ssh_key(&self, user_id: Id, key_id: Id) -> Result<bool>;
    fn create_fleet(&self, name: &str, allowed_ports: &[u16], owner: Option<Id>)
        -> Result<Fleet>;
    fn fleet_by_name(&self, name: &str) -> Result<Option<Fleet>>;
    fn list_fleets(&self, member: Option<Id>) -> Result<Vec<Fleet>>;
    fn set_fleet_ports(&self, fleet_id: Id, allowed_ports: &[u16]) -> Result<()>;
    fn delete_fleet(&self, fleet_id: Id) -> Result<bool>;
    fn member_role(&self, fleet_id: Id, user_id: Id) -> Result<Option<Role>>;
    fn set_member(&self, fleet_id: Id, user_id: Id, role: Role) -> Result<()>;
    fn list_members(&self, fleet_id: Id) -> Result<Vec<Member>>;
    fn remove_member(&self, fleet_id: Id, user_id: Id) -> Result<bool>;
    fn create_device(&self, uuid: &str, fleet_id: Id, name: &str, key_hash: &str)
        -> Result<Device>;
    fn device(&self, uuid: &str) -> Result<Option<Device>>;
    fn list_devices(&self, member: Option<Id>, filter: &DeviceFilter) -> Result<Vec<Device>>;
    fn device_by_key_hash(&self, key_hash: &str) -> Result<Option<Device>>;
    fn rotate_device_key(&self, uuid: &str, new_key_hash: &str, keep_old_until: Millis)
        -> Result<bool>;
    fn forget_previous_device_key(&self, uuid: &str) -> Result<()>;
    fn delete_device(&self, uuid: &str) -> Result<bool>;
    fn device_access(&self, user_id: Id, uuid: &str) -> Result<Option<DeviceAccess>>;
    fn register_relay(&self, relay_id: &str, peer_addr: &str) -> Result<()>;
    fn heartbeat(&self, relay_id: &str, status: RelayStatus) -> Result<()>;
    fn remove_relay(&self, relay_id: &str) -> Result<()>;
    fn prune_relays(&self, before: Millis) -> Result<u64>;
    fn list_relays(&self) -> Result<Vec<RelayRow>>;
    fn shared_secret(&self, name: &str, candidate: &str) -> Result<String>;
    fn startup_lock(&self) -> Result<StartupLock>;
    fn set_presence(&self, device_uuid: &str, relay_id: &str, session: &str,
        transport: &str, ssh_login: Option<&str>) -> Result<()>;
    fn clear_presence(&self, device_uuid: &str, session: &str) -> Result<()>;
    fn clear_relay_presence(&self, relay_id: &str) -> Result<()>;
    fn presence(&self, device_uuid: &str) -> Result<Option<Presence>>;
    fn set_presence_state(&self, device_uuid: &str, session: &str, state: PresenceState)
        -> Result<bool>;
    fn relay_presence(&self, relay_id: &str, after: &str, limit: i64)
        -> Result<Vec<(String, String)>>;
    fn open_tunnel(&self, t: &TunnelSession) -> Result<()>;
    fn close_tunnel(&self, id: &str, close: &TunnelClose) -> Result<()>;
    fn prune_tunnels(&self, before: Millis, batch: i64) -> Result<u64>;
    fn list_tunnels(&self, user_id: Option<Id>, device_uuid: Option<&str>, limit: i64)
        -> Result<Vec<TunnelSession>>;
    fn add_ephemeral_key(&self, key: &EphemeralKey) -> Result<()>;
    fn ephemeral_keys(&self, device_uuid: &str, login: &str, now: Millis)
        -> Result<Vec<(EphemeralKey, String)>>;
    fn remove_ephemeral_key(&self, id: &str) -> Result<()>;
}
