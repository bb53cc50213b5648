//! The one question the proxy asks: may this token reach device D on port P?

use super::tokens::JwtKeys;
use super::{authenticate, AuthError, Principal};
use crate::store::{Device, Id, Store, StoreError, User};

/// The answer to "may this token reach device D on port P".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Yes: who asked, and the device they reach.
    Allow {
        /// The caller.
        principal: Principal,
        /// The device (boxed: the answer is cached and moved around; the device row is big).
        device: Box<Device>,
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
    Ok(
        match reach(store, &principal.user, device_uuid, port).await? {
            Some(device) => Decision::Allow {
                principal,
                device: Box::new(device),
            },
            None => Decision::Forbidden,
        },
    )
}

/// Whether `user` may reach `device_uuid` on `port`, by the same rule as [`may_reach`]:
/// for callers that already know the user (the devices' authorized-keys lookup).
pub async fn user_may_reach(
    store: &dyn Store,
    user: &User,
    device_uuid: &str,
    port: u16,
) -> Result<bool, StoreError> {
    Ok(reach(store, user, device_uuid, port).await?.is_some())
}

/// Every user who may reach `device_uuid` on `port`: the device's fleet members and the
/// admins, by the same rule as [`user_may_reach`].
pub async fn users_reaching(
    store: &dyn Store,
    device_uuid: &str,
    port: u16,
) -> Result<Vec<User>, StoreError> {
    let Some(device) = store.device(device_uuid).await? else {
        return Ok(Vec::new());
    };
    let members: std::collections::HashSet<_> = store
        .list_members(device.fleet_id)
        .await?
        .into_iter()
        .map(|m| m.user_id)
        .collect();
    let mut out = Vec::new();
    for user in store.list_users().await? {
        // Only candidates are checked by the rule itself, one store read each.
        if (user.is_admin || members.contains(&user.id))
            && reach(store, &user, device_uuid, port).await?.is_some()
        {
            out.push(user);
        }
    }
    Ok(out)
}

/// The reach rule itself, in this one place: the device if `user` may reach it on `port`.
async fn reach(
    store: &dyn Store,
    user: &User,
    device_uuid: &str,
    port: u16,
) -> Result<Option<Device>, StoreError> {
    let Some(access) = store.device_access(user.id, device_uuid).await? else {
        return Ok(None);
    };
    let port_open = access.allowed_ports.is_empty() || access.allowed_ports.contains(&port);
    let allowed = (user.is_admin || access.role.is_some()) && port_open;
    Ok(allowed.then_some(access.device))
}

/// The principal behind SSH key `key` of user `user`, if both still exist (the SSH
/// gateway verified the key's signature when the session began; this is what revalidation
/// asks again).
pub async fn ssh_key_principal(
    store: &dyn Store,
    user: Id,
    key: Id,
) -> Result<Option<Principal>, StoreError> {
    let Some(user) = store.user_by_id(user).await? else {
        return Ok(None);
    };
    let keys = store.list_ssh_keys(user.id).await?;
    let principal = Principal {
        user,
        credential: super::Credential::SshKey(key),
    };
    Ok(keys.iter().any(|k| k.id == key).then_some(principal))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::tokens::{self, UserClaims, USER_AUDIENCE};
    use crate::proto::api::Role;
    use crate::store::{self, Id};
    use std::sync::Arc;

    const UUID: &str = "0123456789abcdef0123456789abcdef";
    const OTHER_UUID: &str = "fedcba9876543210fedcba9876543210";

    struct World {
        _dir: tempfile::TempDir,
        store: Arc<dyn Store>,
        keys: JwtKeys,
    }

    impl World {
        async fn new() -> World {
            let dir = tempfile::tempdir().unwrap();
            let store = store::open(&store::sqlite::default_url(dir.path()))
                .await
                .unwrap();
            let keys = JwtKeys::new(b"policy-test-secret-policy-test-secret", None).unwrap();
            World {
                _dir: dir,
                store,
                keys,
            }
        }

        /// A user with an API key; returns their id and the key.
        async fn user(&self, name: &str, admin: bool) -> (Id, String) {
            let user = self.store.create_user(name, admin).await.unwrap();
            let key = tokens::new_api_key();
            self.store
                .create_api_key(user.id, "k", &tokens::hash_secret(&key), "p", None)
                .await
                .unwrap();
            (user.id, key)
        }

        /// A relay JWT for the user, minted from their first API key.
        async fn jwt(&self, user_id: Id) -> String {
            let key = self.store.list_api_keys(user_id).await.unwrap()[0].id;
            self.keys.mint(user_id, key, 60).0
        }

        async fn check(&self, token: &str, uuid: &str, port: u16) -> &'static str {
            match authorize(self.store.as_ref(), &self.keys, token, uuid, port)
                .await
                .unwrap()
            {
                Decision::Allow { device, .. } => {
                    assert_eq!(device.uuid, uuid);
                    "allow"
                }
                Decision::Unauthenticated => "unauthenticated",
                Decision::Forbidden => "forbidden",
            }
        }
    }

    /// Fleet `a` (ports 22222 and 80) holds UUID; fleet `b` (every port) holds OTHER_UUID.
    async fn fleets(w: &World, owner: Id, member: Id) -> (Id, Id) {
        let a = w
            .store
            .create_fleet("a", &[22222, 80], Some(owner))
            .await
            .unwrap();
        let b = w.store.create_fleet("b", &[], None).await.unwrap();
        w.store
            .set_member(a.id, member, Role::Member)
            .await
            .unwrap();
        w.store.create_device(UUID, a.id, "d1", "h1").await.unwrap();
        w.store
            .create_device(OTHER_UUID, b.id, "d2", "h2")
            .await
            .unwrap();
        (a.id, b.id)
    }

    #[tokio::test]
    async fn who_may_reach_what() {
        let w = World::new().await;
        let (_, admin) = w.user("root", true).await;
        let (owner_id, owner) = w.user("olga", false).await;
        let (member_id, member) = w.user("mike", false).await;
        let (_, stranger) = w.user("sam", false).await;
        fleets(&w, owner_id, member_id).await;

        assert_eq!(w.check(&admin, UUID, 22222).await, "allow");
        assert_eq!(w.check(&admin, OTHER_UUID, 9999).await, "allow");
        assert_eq!(
            w.check(&admin, UUID, 9999).await,
            "forbidden",
            "allowlist binds admins"
        );
        assert_eq!(w.check(&owner, UUID, 22222).await, "allow");
        assert_eq!(w.check(&member, UUID, 80).await, "allow");
        assert_eq!(
            w.check(&member, UUID, 443).await,
            "forbidden",
            "port not allowed"
        );
        assert_eq!(
            w.check(&member, OTHER_UUID, 22222).await,
            "forbidden",
            "other fleet"
        );
        assert_eq!(
            w.check(&stranger, UUID, 22222).await,
            "forbidden",
            "non-member"
        );
        assert_eq!(
            w.check(&stranger, "00000000000000000000000000000000", 22222)
                .await,
            "forbidden",
            "unknown device reads like a forbidden one"
        );
        assert_eq!(
            w.check("clk_nonsense", UUID, 22222).await,
            "unauthenticated"
        );
        assert_eq!(w.check("", UUID, 22222).await, "unauthenticated");
    }

    #[tokio::test]
    async fn an_ssh_key_stands_for_its_user_while_both_exist() {
        let w = World::new().await;
        let (mike, _) = w.user("mike", false).await;
        let (sam, _) = w.user("sam", false).await;
        let key = w
            .store
            .add_ssh_key(mike, "laptop", "ssh-ed25519 AAAAC3Nza mike", "SHA256:mike")
            .await
            .unwrap();
        let found = ssh_key_principal(w.store.as_ref(), mike, key.id)
            .await
            .unwrap();
        let principal = found.expect("mike's key stands for mike");
        assert_eq!(principal.user.id, mike);
        assert_eq!(
            principal.credential,
            crate::auth::Credential::SshKey(key.id)
        );
        assert_eq!(principal.credential.api_key(), None);
        // Another user's id with mike's key is nobody.
        assert!(ssh_key_principal(w.store.as_ref(), sam, key.id)
            .await
            .unwrap()
            .is_none());
        assert!(w.store.delete_ssh_key(mike, key.id).await.unwrap());
        assert!(ssh_key_principal(w.store.as_ref(), mike, key.id)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn revoked_keys_deleted_users_and_devices_lose_access() {
        let w = World::new().await;
        let (owner_id, owner) = w.user("olga", false).await;
        let (member_id, member) = w.user("mike", false).await;
        let (fleet_a, _) = fleets(&w, owner_id, member_id).await;

        // Revoked key.
        let keys = w.store.list_api_keys(member_id).await.unwrap();
        assert!(w.store.revoke_api_key(member_id, keys[0].id).await.unwrap());
        assert_eq!(w.check(&member, UUID, 22222).await, "unauthenticated");

        // Removed membership.
        assert_eq!(w.check(&owner, UUID, 22222).await, "allow");
        assert!(w.store.remove_member(fleet_a, owner_id).await.unwrap());
        assert_eq!(w.check(&owner, UUID, 22222).await, "forbidden");
        w.store
            .set_member(fleet_a, owner_id, Role::Owner)
            .await
            .unwrap();

        // Deleted device.
        assert!(w.store.delete_device(UUID).await.unwrap());
        assert_eq!(w.check(&owner, UUID, 22222).await, "forbidden");

        // Deleted user, by key and by JWT.
        let jwt = w.jwt(owner_id).await;
        assert_eq!(w.check(&jwt, OTHER_UUID, 1).await, "forbidden");
        assert!(w.store.delete_user(owner_id).await.unwrap());
        assert_eq!(w.check(&owner, OTHER_UUID, 1).await, "unauthenticated");
        assert_eq!(w.check(&jwt, OTHER_UUID, 1).await, "unauthenticated");
    }

    #[tokio::test]
    async fn jwts_are_checked_like_keys_and_expire() {
        let w = World::new().await;
        let (owner_id, _) = w.user("olga", false).await;
        let (member_id, _) = w.user("mike", false).await;
        fleets(&w, owner_id, member_id).await;

        let jwt = w.jwt(member_id).await;
        assert_eq!(w.check(&jwt, UUID, 22222).await, "allow");
        assert_eq!(w.check(&jwt, OTHER_UUID, 22222).await, "forbidden");

        let now = tokens::unix_now();
        let key = w.store.list_api_keys(member_id).await.unwrap()[0].id;
        let expired = UserClaims {
            sub: member_id.to_string(),
            exp: now - tokens::JWT_LEEWAY_SECS - 1,
            iat: now - 3600,
            nbf: None,
            aud: USER_AUDIENCE.into(),
            kid: Some(key),
        };
        let expired = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &expired,
            &jsonwebtoken::EncodingKey::from_secret(b"policy-test-secret-policy-test-secret"),
        )
        .unwrap();
        assert_eq!(w.check(&expired, UUID, 22222).await, "unauthenticated");
    }
}
