//! Peer tokens (PROTOCOL.md §3): how a relay of a cluster proves to another that it
//! authorized a tunnel, signed with the cluster secret.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::tokens::unix_now;

/// The audience of peer tokens: never accepted as a user token, and the other way round.
pub const PEER_AUDIENCE: &str = "cloudlink-peer";

/// The peer link's minor version within protocol 1. A relay sends its own and accepts any
/// other: fields it does not know are ignored, so relays one version apart interoperate
/// during a rolling upgrade.
pub const PEER_VERSION: u32 = 1;

/// How long a peer token is valid: long enough for one dial, short enough to be useless
/// when stolen off the private network later.
const PEER_TOKEN_SECS: u64 = 30;

/// Claims of a peer token (PROTOCOL.md §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerClaims {
    /// The user's id.
    pub sub: i64,
    /// The user's name (for the device's logs).
    pub usr: String,
    /// The device uuid.
    pub dev: String,
    /// The device port.
    pub port: u16,
    /// The tunnel id (the entry relay's), so both relays' logs name the same tunnel.
    pub tid: String,
    /// Relay hops so far; the owner refuses more than one.
    pub hop: u32,
    /// The sender's [`PEER_VERSION`].
    pub ver: u32,
    /// Audience, [`PEER_AUDIENCE`].
    pub aud: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expiry, Unix seconds.
    pub exp: u64,
}

/// Signs and checks peer tokens with the cluster secret.
pub struct PeerKeys {
    /// Signs.
    encoding: EncodingKey,
    /// Checks.
    decoding: DecodingKey,
}

impl PeerKeys {
    /// Keys from the cluster secret.
    pub fn new(secret: &[u8]) -> PeerKeys {
        PeerKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        }
    }

    /// A token for one forwarded tunnel: `tunnel` (its id) from user `user_id`
    /// (`username`) to `device`'s `port`.
    pub fn mint(
        &self,
        user_id: i64,
        username: &str,
        device: &str,
        port: u16,
        tunnel: &str,
    ) -> String {
        let now = unix_now();
        let claims = PeerClaims {
            sub: user_id,
            usr: username.to_owned(),
            dev: device.to_owned(),
            port,
            tid: tunnel.to_owned(),
            hop: 1,
            ver: PEER_VERSION,
            aud: PEER_AUDIENCE.to_owned(),
            iat: now,
            exp: now + PEER_TOKEN_SECS,
        };
        // HS256 over strings and integers cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default()
    }

    /// The claims of a valid, unexpired peer token signed with this cluster's secret.
    pub fn verify(&self, token: &str) -> Option<PeerClaims> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[PEER_AUDIENCE]);
        validation.leeway = crate::auth::tokens::JWT_LEEWAY_SECS;
        jsonwebtoken::decode::<PeerClaims>(token, &self.decoding, &validation)
            .ok()
            .map(|d| d.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_tokens_are_bound_to_the_cluster_secret() {
        let keys = PeerKeys::new(b"cluster-secret-cluster-secret-cl");
        let now = unix_now();
        let claims = PeerClaims {
            sub: 1,
            usr: "u".into(),
            dev: "d".into(),
            port: 22,
            tid: "t".into(),
            hop: 1,
            ver: PEER_VERSION,
            aud: PEER_AUDIENCE.into(),
            iat: now,
            exp: now + 30,
        };
        let token = jsonwebtoken::encode(&Header::default(), &claims, &keys.encoding).unwrap();
        assert_eq!(keys.verify(&token), Some(claims.clone()));
        let other = PeerKeys::new(b"another-secret-another-secret-an");
        assert_eq!(other.verify(&token), None);
        // A user token's audience is not a peer token's.
        let user = PeerClaims {
            aud: super::super::tokens::USER_AUDIENCE.into(),
            ..claims
        };
        let token = jsonwebtoken::encode(&Header::default(), &user, &keys.encoding).unwrap();
        assert_eq!(keys.verify(&token), None);
    }
}
