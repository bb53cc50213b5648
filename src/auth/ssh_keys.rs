//! OpenSSH public keys: which ones we accept, and their fingerprints.

use ssh_key::{Algorithm, HashAlg, PublicKey};

/// Why a public key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SshKeyError {
    /// Not a one-line OpenSSH public key.
    #[error("not an OpenSSH public key (expected one line like \"ssh-ed25519 AAAA… comment\")")]
    Malformed,
    /// A key type we do not accept (DSA, security keys, certificates…).
    #[error("unsupported key type {0}: use ed25519, ecdsa or rsa")]
    Unsupported(String),
    /// An RSA key below 2048 bits.
    #[error("RSA key of {0} bits is too short: at least 2048 are needed")]
    RsaTooShort(usize),
}

/// An accepted key, normalised to one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey {
    /// `type base64 [comment]`, whitespace trimmed.
    pub openssh: String,
    /// `SHA256:…` as `ssh-keygen -lf` prints it.
    pub fingerprint: String,
}

/// Parses and checks one OpenSSH public key line.
pub fn parse(line: &str) -> Result<ParsedKey, SshKeyError> {
    let line = line.trim();
    if line.contains('\n') || line.is_empty() {
        return Err(SshKeyError::Malformed);
    }
    let key = PublicKey::from_openssh(line).map_err(|_| SshKeyError::Malformed)?;
    match key.algorithm() {
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. } => {}
        Algorithm::Rsa { .. } => {
            let bits = key
                .key_data()
                .rsa()
                .and_then(|rsa| rsa.n.as_positive_bytes())
                .map(|n| n.len() * 8 - n.first().map_or(8, |b| b.leading_zeros() as usize))
                .ok_or(SshKeyError::Malformed)?;
            if bits < 2048 {
                return Err(SshKeyError::RsaTooShort(bits));
            }
        }
        other => return Err(SshKeyError::Unsupported(other.to_string())),
    }
    Ok(ParsedKey {
        openssh: line.split_whitespace().collect::<Vec<_>>().join(" "),
        fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Generated with `ssh-keygen -t ed25519`; fingerprint from `ssh-keygen -lf`.
    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAII/Hvbt8FLxaYtdZv3WeFjGcQvtgFIyIyn5kLztvBv4O test@cloudlink";
    const RSA_1024: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC1BojMPSb5n/fG/3wZDcDrFpSBw8VLt8YPS6dmsx3LbWITbWnJ5F6EFX3qtzTM9bHEn041yznirhI5SH5n1abehYA052H1B4Gd+0SGkodcUXTf2VtAs1tbuU20vzBwx/dbIzjIUUcKyJ370kvai6Wyf3yzEDX2xhSRWXqPebu7Bw== root@vm";

    #[test]
    fn accepts_ed25519_with_ssh_keygen_fingerprint() {
        let parsed = parse(&format!("  {ED25519}\n")).unwrap();
        assert_eq!(parsed.openssh, ED25519);
        assert_eq!(
            parsed.fingerprint,
            "SHA256:n+342FvzCL/Dhm/r0FfIAXeIBAwnWb3yXuu5ByA+Gfs"
        );
    }

    #[test]
    fn accepts_ecdsa() {
        // `ssh-keygen -t ecdsa`, as macOS and many hardware tokens make them. Without
        // ssh-key's `ecdsa` feature this was refused as malformed, though the error text
        // promised ecdsa was accepted.
        let k = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBLJiakeNo6367eo9DmcxFARDDSkr1+lGrgvyGAM0LLXHKupGeiSrq9I8jTda3bzo4snOHhKOn7Jxt34vXqwbnAg=";
        assert_eq!(
            parse(k).unwrap().fingerprint,
            "SHA256:GSaPs7H7NOIW7T+mwkatTgI1d5qDRnbO7pbEl/IljPM"
        );
    }

    #[test]
    fn refuses_short_rsa() {
        assert_eq!(parse(RSA_1024), Err(SshKeyError::RsaTooShort(1024)));
    }

    #[test]
    fn refuses_junk() {
        assert_eq!(parse(""), Err(SshKeyError::Malformed));
        assert_eq!(parse("hello world"), Err(SshKeyError::Malformed));
        assert_eq!(parse("ssh-ed25519 AAAA"), Err(SshKeyError::Malformed));
        assert_eq!(
            parse(&format!("{ED25519}\n{ED25519}")),
            Err(SshKeyError::Malformed)
        );
    }
}
