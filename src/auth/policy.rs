//! The one question the proxy asks: may this token reach device D on port P?

use super::tokens::JwtKeys;
use super::{authenticate, AuthError, Principal};
use crate::store::{Device, Store, StoreError};

/// The answer to "may this token reach device D on port P".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Yes: who asked, and the device they reach.
    Allow {
        /// The caller.
        principal: Principal,
        /// The device.
        device: Device,
    },
    /// The token proves nobody (unknown, revoked, expired, deleted user): 407 / 401.
    Unauthenticated,
    /// Somebody, but not allowed: no such device, not their fleet, or a closed port.
    /// One answer for all three, so nobody can list devices by probing.
    Forbidden,
}

/// Whether `principal` may reach `device_uuid` on `port`.
///
/// Admins and members (any role) of the device's fleet may, on the ports the fleet allows
/// (an empty allowlist allows every port; the allowlist binds admins too).
pub async fn may_reach(
    store: &dyn Store,
    principal: Principal,
    device_uuid: &str,
    port: u16,
) -> Result<Decision, StoreError> {
    let Some(access) = store.device_access(principal.user.id, device_uuid).await? else {
        return Ok(Decision::Forbidden);
    };
    let port_open = access.allowed_ports.is_empty() || access.allowed_ports.contains(&port);
    let allowed = (principal.user.is_admin || access.role.is_some()) && port_open;
    Ok(if allowed {
        Decision::Allow {
            principal,
            device: access.device,
        }
    } else {
        Decision::Forbidden
    })
}

/// Authenticates `token` and asks [`may_reach`]: the whole check a CONNECT needs.
pub async fn authorize(
    store: &dyn Store,
    keys: &JwtKeys,
    token: &str,
    device_uuid: &str,
    port: u16,
) -> Result<Decision, StoreError> {
    match authenticate(store, keys, token).await {
        Ok(principal) => may_reach(store, principal, device_uuid, port).await,
        Err(AuthError::InvalidToken) => Ok(Decision::Unauthenticated),
        Err(AuthError::Store(e)) => Err(e),
    }
}
