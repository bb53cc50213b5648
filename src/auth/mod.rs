//! Who is calling ([`authenticate`]) and what they may reach ([`policy`]).

pub mod policy;
pub mod ssh_keys;
pub mod tokens;

use crate::store::{Id, Store, StoreError, User};
use tokens::JwtKeys;

/// How a principal proved who they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// An API key, by row id (revoking that row ends its access).
    ApiKey(Id),
    /// A JWT, valid until this Unix second.
    Jwt {
        /// Expiry, Unix seconds.
        exp: u64,
    },
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
    /// No such key, a revoked key, a bad or expired JWT, or a deleted user.
    #[error("the token is unknown, revoked or expired")]
    InvalidToken,
    /// The store could not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Resolves a bearer token (API key or JWT) to the user it belongs to, and records the
/// use of an API key (`last_used`, at most once a minute).
pub async fn authenticate(
    store: &dyn Store,
    keys: &JwtKeys,
    token: &str,
) -> Result<Principal, AuthError> {
    let principal = identify(store, keys, token).await?;
    if let Credential::ApiKey(id) = principal.credential {
        store.touch_api_key(id, crate::store::now_ms()).await?;
    }
    Ok(principal)
}

/// Resolves a bearer token without recording a use: for re-checking a token that
/// authorized something earlier (an open tunnel), which is not a new use of it.
pub async fn identify(
    store: &dyn Store,
    keys: &JwtKeys,
    token: &str,
) -> Result<Principal, AuthError> {
    if tokens::is_api_key(token) {
        let hash = tokens::hash_secret(token);
        let (key, user) = store
            .api_key_by_hash(&hash)
            .await?
            .ok_or(AuthError::InvalidToken)?;
        if !tokens::hashes_equal(&key.key_hash, &hash) {
            return Err(AuthError::InvalidToken);
        }
        Ok(Principal {
            user,
            credential: Credential::ApiKey(key.id),
        })
    } else {
        let claims = keys.verify(token).ok_or(AuthError::InvalidToken)?;
        let user = store
            .user_by_name(&claims.sub)
            .await?
            .ok_or(AuthError::InvalidToken)?;
        Ok(Principal {
            user,
            credential: Credential::Jwt { exp: claims.exp },
        })
    }
}
