//! Secrets and tokens: API keys, device keys, JWTs.
//!
//! A secret is 32 random bytes, shown once and stored only as its SHA-256. Lookups go by hash
//! (an index), and the stored hash is compared again in constant time, so neither the query
//! nor the comparison tells an attacker how close a guess came.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What every API key starts with, so people (and secret scanners) can recognise one.
pub const API_KEY_PREFIX: &str = "clk_";

/// The JWT audience of user tokens.
pub const USER_AUDIENCE: &str = "cloudlink";

fn random_bytes() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// A new API key: `clk_` and 64 hex characters.
pub fn new_api_key() -> String {
    format!("{API_KEY_PREFIX}{}", hex::encode(random_bytes()))
}

/// A new device key: 64 hex characters, as balenaOS device keys look.
pub fn new_device_key() -> String {
    hex::encode(random_bytes())
}

/// A new device uuid: 32 lowercase hex characters.
pub fn new_device_uuid() -> String {
    hex::encode(&random_bytes()[..16])
}

/// The part of an API key that may be shown later: `clk_` and 8 characters.
pub fn display_prefix(key: &str) -> String {
    key.chars().take(API_KEY_PREFIX.len() + 8).collect()
}

/// Hex SHA-256 of a secret: the only form a secret is stored in.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether two stored-form hashes are equal, in time independent of where they differ.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Whether a presented token has the shape of an API key (as opposed to a JWT).
pub fn is_api_key(token: &str) -> bool {
    token.starts_with(API_KEY_PREFIX)
}

/// Claims of a user JWT.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserClaims {
    /// The username. Outside identity services know people by name, not by our row ids.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Always [`USER_AUDIENCE`]; keeps peer tokens and user tokens apart.
    pub aud: String,
}

/// Errors from reading key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The public key file could not be read.
    #[error("cannot read JWT public key {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not an RSA or Ed25519 public key in PEM form.
    #[error("JWT public key {0} is neither an RSA nor an Ed25519 PEM public key")]
    Format(String),
}

/// The keys that sign and check user JWTs.
pub struct JwtKeys {
    /// Signs the relay's own HS256 tokens (`POST /v1/auth/token`).
    encoding: EncodingKey,
    /// Checks them.
    hs256: DecodingKey,
    /// An outside identity service's public key, if one is configured.
    external: Option<(DecodingKey, Algorithm)>,
}

impl JwtKeys {
    /// Keys from the relay's secret and an optional PEM public key file (RS256 or EdDSA).
    pub fn new(secret: &[u8], public_key: Option<&std::path::Path>) -> Result<JwtKeys, KeyError> {
        let external = match public_key {
            None => None,
            Some(path) => {
                let shown = path.display().to_string();
                let pem = std::fs::read(path).map_err(|source| KeyError::Read {
                    path: shown.clone(),
                    source,
                })?;
                if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
                    Some((key, Algorithm::EdDSA))
                } else if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                    Some((key, Algorithm::RS256))
                } else {
                    return Err(KeyError::Format(shown));
                }
            }
        };
        Ok(JwtKeys {
            encoding: EncodingKey::from_secret(secret),
            hs256: DecodingKey::from_secret(secret),
            external,
        })
    }

    /// Mints an HS256 token for `username`, valid for `ttl_secs`; returns it and its expiry.
    pub fn mint(&self, username: &str, ttl_secs: u64) -> (String, u64) {
        let now = unix_now();
        let claims = UserClaims {
            sub: username.to_owned(),
            exp: now + ttl_secs,
            iat: now,
            aud: USER_AUDIENCE.to_owned(),
        };
        // Encoding HS256 claims made of strings and integers cannot fail.
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default();
        (token, claims.exp)
    }

    /// The claims of a valid, unexpired user token signed by us or the outside service.
    pub fn verify(&self, token: &str) -> Option<UserClaims> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        let key = match header.alg {
            Algorithm::HS256 => &self.hs256,
            alg => match &self.external {
                Some((key, ext_alg)) if *ext_alg == alg => key,
                _ => return None,
            },
        };
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[USER_AUDIENCE]);
        validation.leeway = 0;
        jsonwebtoken::decode::<UserClaims>(token, key, &validation)
            .ok()
            .map(|data| data.claims)
    }
}

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_are_unique_prefixed_and_hash_stably() {
        let a = new_api_key();
        let b = new_api_key();
        assert_ne!(a, b);
        assert!(is_api_key(&a));
        assert_eq!(a.len(), 4 + 64);
        assert_eq!(hash_secret(&a), hash_secret(&a));
        assert_ne!(hash_secret(&a), hash_secret(&b));
        assert!(hashes_equal(&hash_secret(&a), &hash_secret(&a)));
        assert!(!hashes_equal(&hash_secret(&a), &hash_secret(&b)));
        assert_eq!(display_prefix(&a).len(), 12);
    }

    #[test]
    fn jwt_round_trip_and_rejections() {
        let keys = JwtKeys::new(b"0123456789abcdef0123456789abcdef", None).unwrap();
        let (token, exp) = keys.mint("alice", 60);
        let claims = keys.verify(&token).unwrap();
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.exp, exp);

        let other = JwtKeys::new(b"another secret, another relay....", None).unwrap();
        assert!(other.verify(&token).is_none(), "foreign signature accepted");

        let expired = UserClaims {
            sub: "alice".into(),
            exp: unix_now() - 10,
            iat: unix_now() - 100,
            aud: USER_AUDIENCE.into(),
        };
        let token = jsonwebtoken::encode(&Header::default(), &expired, &keys.encoding).unwrap();
        assert!(keys.verify(&token).is_none(), "expired token accepted");

        let wrong_aud = UserClaims {
            aud: "cloudlink-peer".into(),
            exp: unix_now() + 60,
            ..expired
        };
        let token = jsonwebtoken::encode(&Header::default(), &wrong_aud, &keys.encoding).unwrap();
        assert!(
            keys.verify(&token).is_none(),
            "peer token accepted as user token"
        );
        assert!(keys.verify("not.a.jwt").is_none());
    }

    #[test]
    fn tokens_from_an_outside_identity_service() {
        // The service holds an Ed25519 private key; the relay is given its public key.
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let public = dir.path().join("idp.pem");
        std::fs::write(&public, pair.public_key_pem()).unwrap();
        let keys = JwtKeys::new(b"0123456789abcdef0123456789abcdef", Some(&public)).unwrap();
        let service = EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap();
        let claims = UserClaims {
            sub: "carol".into(),
            exp: unix_now() + 60,
            iat: unix_now(),
            aud: USER_AUDIENCE.into(),
        };
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &service).unwrap();
        assert_eq!(keys.verify(&token).unwrap().sub, "carol");

        // Another service's key is not trusted.
        let stranger = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let forged = EncodingKey::from_ed_pem(stranger.serialize_pem().as_bytes()).unwrap();
        let token = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &forged).unwrap();
        assert!(keys.verify(&token).is_none());
        // Without a configured key, EdDSA tokens are refused outright.
        let plain = JwtKeys::new(b"0123456789abcdef0123456789abcdef", None).unwrap();
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &service).unwrap();
        assert!(plain.verify(&token).is_none());

        std::fs::write(&public, "not a key").unwrap();
        assert!(matches!(
            JwtKeys::new(b"0123456789abcdef0123456789abcdef", Some(&public)),
            Err(KeyError::Format(_))
        ));
    }
}
