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

/// How far a JWT's clocks may be off: `exp`, `nbf` and `iat` are checked with this much
/// leeway, for relays and identity services whose clocks differ by a few seconds.
pub const JWT_LEEWAY_SECS: u64 = 30;

/// Claims of a user JWT.
///
/// Tokens the relay mints (HS256, `POST /v1/auth/token`) name the user by row id and carry
/// the id of the API key they came from, so deleting the user, re-creating a user of the
/// same name, or revoking (or expiring) that key ends them. Tokens an outside identity
/// service mints (RS256/EdDSA) name the user by username and carry no key id: that service
/// knows people by name, and their lifetime is its business.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserClaims {
    /// Relay-minted: the user's id, in decimal. Outside-minted: the username.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issued at, Unix seconds; one from the future (beyond the leeway) is refused.
    pub iat: u64,
    /// Not before, Unix seconds, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Always [`USER_AUDIENCE`]; keeps peer tokens and user tokens apart.
    pub aud: String,
    /// Relay-minted: the id of the API key this token was minted from (a token renewed
    /// from a token keeps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<i64>,
}

/// Who signed a valid token, which decides how its subject is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// Signed by a relay of this deployment: a user id and the API key behind it.
    Relay {
        /// The user's row id.
        user_id: i64,
        /// The API key's row id.
        key_id: i64,
    },
    /// Signed by the configured outside identity service: a username.
    Outside {
        /// The username.
        username: String,
    },
}

/// A token whose signature and claims checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedJwt {
    /// Whose it is.
    pub subject: Subject,
    /// Expiry, Unix seconds.
    pub exp: u64,
}

/// Whether a token's expiry is checked: always for a new request; not when re-checking a
/// token that opened a tunnel earlier (a short-lived token expiring does not cut the
/// tunnel it opened; revoking what stands behind it does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// `exp` must be in the future (within the leeway).
    Check,
    /// `exp` is not looked at; signature, audience, `nbf`, `iat` still are.
    Ignore,
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

    /// Mints an HS256 token for user `user_id` from API key `key_id`, valid for
    /// `ttl_secs`; returns it and its expiry.
    pub fn mint(&self, user_id: i64, key_id: i64, ttl_secs: u64) -> (String, u64) {
        let now = unix_now();
        let claims = UserClaims {
            sub: user_id.to_string(),
            exp: now + ttl_secs,
            iat: now,
            nbf: None,
            aud: USER_AUDIENCE.to_owned(),
            kid: Some(key_id),
        };
        // Encoding HS256 claims made of strings and integers cannot fail.
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default();
        (token, claims.exp)
    }

    /// The subject of a valid user token signed by us or the outside service: signature,
    /// audience, `nbf` and `iat` always checked, `exp` as `expiry` says, each with
    /// [`JWT_LEEWAY_SECS`].
    pub fn verify(&self, token: &str, expiry: Expiry) -> Option<VerifiedJwt> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        let (key, ours) = match header.alg {
            Algorithm::HS256 => (&self.hs256, true),
            alg => match &self.external {
                Some((key, ext_alg)) if *ext_alg == alg => (key, false),
                _ => return None,
            },
        };
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[USER_AUDIENCE]);
        validation.leeway = JWT_LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.validate_exp = expiry == Expiry::Check;
        if expiry == Expiry::Ignore {
            validation.required_spec_claims.remove("exp");
        }
        let claims = jsonwebtoken::decode::<UserClaims>(token, key, &validation)
            .ok()?
            .claims;
        if claims.iat > unix_now() + JWT_LEEWAY_SECS {
            return None;
        }
        let subject = if ours {
            Subject::Relay {
                user_id: claims.sub.parse().ok()?,
                key_id: claims.kid?,
            }
        } else {
            Subject::Outside {
                username: claims.sub,
            }
        };
        Some(VerifiedJwt {
            subject,
            exp: claims.exp,
        })
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

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn claims(sub: &str, kid: Option<i64>) -> UserClaims {
        UserClaims {
            sub: sub.into(),
            exp: unix_now() + 60,
            iat: unix_now(),
            nbf: None,
            aud: USER_AUDIENCE.into(),
            kid,
        }
    }

    fn sign(claims: &UserClaims) -> String {
        jsonwebtoken::encode(
            &Header::default(),
            claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    #[test]
    fn jwt_round_trip_and_rejections() {
        let keys = JwtKeys::new(SECRET, None).unwrap();
        let (token, exp) = keys.mint(7, 9, 60);
        let v = keys.verify(&token, Expiry::Check).unwrap();
        assert_eq!(
            v.subject,
            Subject::Relay {
                user_id: 7,
                key_id: 9
            }
        );
        assert_eq!(v.exp, exp);

        let other = JwtKeys::new(b"another secret, another relay....", None).unwrap();
        assert!(
            other.verify(&token, Expiry::Check).is_none(),
            "foreign signature accepted"
        );

        let expired = UserClaims {
            exp: unix_now() - JWT_LEEWAY_SECS - 10,
            iat: unix_now() - 100,
            ..claims("7", Some(9))
        };
        assert!(keys.verify(&sign(&expired), Expiry::Check).is_none());
        assert!(
            keys.verify(&sign(&expired), Expiry::Ignore).is_some(),
            "re-checks of open tunnels ignore expiry"
        );

        let wrong_aud = UserClaims {
            aud: "cloudlink-peer".into(),
            ..claims("7", Some(9))
        };
        assert!(
            keys.verify(&sign(&wrong_aud), Expiry::Check).is_none(),
            "peer token accepted as user token"
        );
        assert!(keys.verify("not.a.jwt", Expiry::Check).is_none());
    }

    #[test]
    fn relay_tokens_need_a_user_id_and_a_key_id() {
        let keys = JwtKeys::new(SECRET, None).unwrap();
        assert!(keys
            .verify(&sign(&claims("7", Some(9))), Expiry::Check)
            .is_some());
        assert!(
            keys.verify(&sign(&claims("alice", Some(9))), Expiry::Check)
                .is_none(),
            "a name where an id belongs"
        );
        assert!(
            keys.verify(&sign(&claims("7", None)), Expiry::Check)
                .is_none(),
            "no key id"
        );
    }

    #[test]
    fn clocks_are_checked_with_a_small_leeway() {
        let keys = JwtKeys::new(SECRET, None).unwrap();
        let now = unix_now();
        let future_nbf = UserClaims {
            nbf: Some(now + 600),
            ..claims("7", Some(9))
        };
        assert!(keys.verify(&sign(&future_nbf), Expiry::Check).is_none());
        let future_iat = UserClaims {
            iat: now + 600,
            ..claims("7", Some(9))
        };
        assert!(keys.verify(&sign(&future_iat), Expiry::Check).is_none());
        let slightly_ahead = UserClaims {
            iat: now + 5,
            nbf: Some(now + 5),
            ..claims("7", Some(9))
        };
        assert!(
            keys.verify(&sign(&slightly_ahead), Expiry::Check).is_some(),
            "within the leeway"
        );
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
        let claims = claims("carol", None);
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &service).unwrap();
        assert_eq!(
            keys.verify(&token, Expiry::Check).unwrap().subject,
            Subject::Outside {
                username: "carol".into()
            }
        );

        // Another service's key is not trusted.
        let stranger = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let forged = EncodingKey::from_ed_pem(stranger.serialize_pem().as_bytes()).unwrap();
        let token = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &forged).unwrap();
        assert!(keys.verify(&token, Expiry::Check).is_none());
        // Without a configured key, EdDSA tokens are refused outright.
        let plain = JwtKeys::new(b"0123456789abcdef0123456789abcdef", None).unwrap();
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &service).unwrap();
        assert!(plain.verify(&token, Expiry::Check).is_none());

        std::fs::write(&public, "not a key").unwrap();
        assert!(matches!(
            JwtKeys::new(b"0123456789abcdef0123456789abcdef", Some(&public)),
            Err(KeyError::Format(_))
        ));
    }
}
