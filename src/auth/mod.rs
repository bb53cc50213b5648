//! Who is calling ([`authenticate`]) and what they may reach ([`policy`]).

pub mod peer;
pub mod policy;
pub mod ssh_keys;
pub mod tokens;

use crate::store::{Device, Id, Millis, Store, StoreError, User};
use tokens::{Expiry, JwtKeys, Subject};

/// Which of a device's keys a presented key matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMatch {
    /// The current key.
    Current,
    /// The previous key, within its grace period after a rotation.
    Previous,
}

/// Whether `key_hash` (hex SHA-256 of a presented key) is `device`'s key at `now`,
/// compared in constant time.
pub fn device_key_matches(device: &Device, key_hash: &str, now: Millis) -> Option<KeyMatch> {
    use tokens::hashes_equal;
    if hashes_equal(&device.key_hash, key_hash) {
        return Some(KeyMatch::Current);
    }
    let previous_valid = device.prev_key_until.is_some_and(|until| until > now);
    match &device.prev_key_hash {
        Some(prev) if previous_valid && hashes_equal(prev, key_hash) => Some(KeyMatch::Previous),
        _ => None,
    }
}

/// How a principal proved who they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// An API key, by row id (revoking that row ends its access).
    ApiKey(Id),
    /// A JWT, valid until this Unix second.
    Jwt {
        /// Expiry, Unix seconds.
        exp: u64,
        /// The API key it was minted from (relay-minted tokens); `None` for tokens from an
        /// outside identity service.
        key: Option<Id>,
    },
    /// One of the user's SSH public keys, by row id, whose signature the SSH gateway
    /// verified (deleting the key ends its access).
    SshKey(Id),
}

impl Credential {
    /// The API key that stands behind this credential, if any: the key itself, or the key
    /// a relay-minted JWT came from.
    pub fn api_key(&self) -> Option<Id> {
        match self {
            Credential::ApiKey(id) => Some(*id),
            Credential::Jwt { key, .. } => *key,
            Credential::SshKey(_) => None,
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user, as the store has them now.
    pub user: User,
    /// What they presented.
    pub credential: Credential,
}

/// Why a token did not authenticate.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No such key, a revoked or expired key, a bad or expired JWT, a JWT whose key or
    /// user is gone, or a deleted user.
    #[error("the token is unknown, revoked or expired")]
    InvalidToken,
    /// The store could not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Resolves a bearer token (API key or JWT) for a new request. Recording an API key's use
/// (`last_used`) is the relay's business ([`crate::relay::state::Shared::record_key_use`]):
/// it is bookkeeping, and must never decide whether a valid key works.
pub async fn authenticate(
    store: &dyn Store,
    keys: &JwtKeys,
    token: &str,
) -> Result<Principal, AuthError> {
    identify(store, keys, token, Expiry::Check).await
}

/// Resolves a bearer token. With [`Expiry::Ignore`] it re-checks
/// a token that authorized something earlier (an open tunnel): the JWT's own expiry does
/// not matter then, but its user and its API key must still be there.
pub async fn identify(
    store: &dyn Store,
    keys: &JwtKeys,
    token: &str,
    expiry: Expiry,
) -> Result<Principal, AuthError> {
    let now = crate::store::now_ms();
    if tokens::is_api_key(token) {
        let hash = tokens::hash_secret(token);
        let (key, user) = store
            .api_key_by_hash(&hash)
            .await?
            .ok_or(AuthError::InvalidToken)?;
        if !tokens::hashes_equal(&key.key_hash, &hash) || !key.is_active(now) {
            return Err(AuthError::InvalidToken);
        }
        return Ok(Principal {
            user,
            credential: Credential::ApiKey(key.id),
        });
    }
    let verified = keys.verify(token, expiry).ok_or(AuthError::InvalidToken)?;
    match verified.subject {
        Subject::Relay { user_id, key_id } => {
            let user = store
                .user_by_id(user_id)
                .await?
                .ok_or(AuthError::InvalidToken)?;
            let key = store
                .api_key_by_id(key_id)
                .await?
                .ok_or(AuthError::InvalidToken)?;
            if key.user_id != user.id || !key.is_active(now) {
                return Err(AuthError::InvalidToken);
            }
            Ok(Principal {
                user,
                credential: Credential::Jwt {
                    exp: verified.exp,
                    key: Some(key_id),
                },
            })
        }
        Subject::Outside { username } => {
            let user = store
                .user_by_name(&username)
                .await?
                .ok_or(AuthError::InvalidToken)?;
            Ok(Principal {
                user,
                credential: Credential::Jwt {
                    exp: verified.exp,
                    key: None,
                },
            })
        }
    }
}
