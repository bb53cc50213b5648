//! `cloudlink agent authorized-keys USER`: the device's sshd `AuthorizedKeysCommand`.
//!
//! Prints the cloud user's public keys, as the relay answers for this device, and nothing
//! else on stdout; for `root` with `root_login = "fleet-members"`, the keys of every user who
//! may reach the device, each commented with its owner's cloud username. It fails closed:
//! if the relay cannot be asked, no key is printed, unless a cache directory is configured,
//! in which case the last good answer for that user is.

use std::path::Path;
use std::time::Duration;

use super::config::AgentConfig;

/// Why no fresh answer came from the relay.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The config lacks `api`, `uuid` or `key`.
    #[error("{0}")]
    Config(String),
    /// The relay could not be reached or did not answer in time.
    #[error("cannot reach the relay API: {0}")]
    Unreachable(String),
    /// The relay refused the device key.
    #[error("the relay refused this device's key")]
    Unauthorized,
    /// The relay answered something else.
    #[error("the relay answered {0}")]
    Status(u16),
}

/// The keys for `username`: fresh from the relay, or (when configured) from the cache.
pub async fn lookup(config: &AgentConfig, username: &str) -> Result<String, KeysError> {
    // Names that cannot be cloud usernames have no keys; nothing to ask.
    if !crate::proto::is_valid_name(username) {
        return Ok(String::new());
    }
    match fetch(config, username).await {
        Ok(keys) => {
            if let Some(dir) = &config.authorized_keys_cache_dir {
                if let Err(e) = store_cache(dir, username, &keys) {
                    tracing::warn!(error = %e, "cannot update the authorized-keys cache");
                }
            }
            Ok(keys)
        }
        Err(e @ (KeysError::Unreachable(_) | KeysError::Status(_))) => {
            match config
                .authorized_keys_cache_dir
                .as_deref()
                .and_then(|dir| std::fs::read_to_string(dir.join(username)).ok())
            {
                Some(cached) => {
                    tracing::warn!(error = %e, "relay unreachable; answering from the cache");
                    Ok(cached)
                }
                None => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

async fn fetch(config: &AgentConfig, username: &str) -> Result<String, KeysError> {
    let api = config
        .api
        .as_deref()
        .ok_or_else(|| KeysError::Config("no `api` in the agent config".into()))?;
    if config.key.0.is_empty() {
        return Err(KeysError::Config(
            "no device `key` in the agent config".into(),
        ));
    }
    // With root logins on, `root` is every user who may reach this device (PROTOCOL.md §4).
    let all_members =
        username == "root" && config.root_login == super::config::RootLogin::FleetMembers;
    let url = format!(
        "{}/auth/v1/public-keys/{username}{}",
        api.trim_end_matches('/'),
        if all_members { "?all_members=true" } else { "" }
    );
    let answer = super::http::get(
        &url,
        &config.key.0,
        config.trust(),
        Duration::from_secs(config.authorized_keys_timeout_secs.max(1)),
    )
    .await
    .map_err(KeysError::Unreachable)?;
    match answer.status {
        200 => {}
        401 => return Err(KeysError::Unauthorized),
        other => return Err(KeysError::Status(other)),
    }
    let body = answer.body;
    // Only lines that look like keys go to sshd.
    let mut keys = String::new();
    for line in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if is_public_key_line(line) {
            keys.push_str(line);
            keys.push('\n');
        }
    }
    Ok(keys)
}

fn store_cache(dir: &Path, username: &str, keys: &str) -> std::io::Result<()> {
    crate::private_file::ensure_dir(dir)?;
    crate::private_file::replace_private(&dir.join(username), keys.as_bytes())
}

/// Whether `line` is `ALGORITHM BASE64 [comment]` with an algorithm sshd takes for user
/// keys and a blob that names the same algorithm: no `authorized_keys` options (`command=`,
/// `from=` …) can ride along, whatever the relay sends. sshd checks the key itself.
fn is_public_key_line(line: &str) -> bool {
    use base64::Engine;
    const ALGORITHMS: [&str; 7] = [
        "ssh-ed25519",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "ssh-rsa",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    let mut fields = line.split_ascii_whitespace();
    let (Some(algorithm), Some(blob)) = (fields.next(), fields.next()) else {
        return false;
    };
    if !ALGORITHMS.contains(&algorithm) {
        return false;
    }
    let Ok(blob) = base64::engine::general_purpose::STANDARD.decode(blob) else {
        return false;
    };
    // The blob starts with the algorithm's name as an SSH string: u32 length, bytes.
    let named = blob
        .get(..4)
        .map(|n| u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize)
        .and_then(|n| blob.get(4..4 + n));
    named == Some(algorithm.as_bytes()) && blob.len() > 4 + algorithm.len()
}

#[cfg(test)]
mod tests {
    use super::is_public_key_line;

    #[test]
    fn only_plain_key_lines_reach_sshd() {
        let ed25519 =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAII/Hvbt8FLxaYtdZv3WeFjGcQvtgFIyIyn5kLztvBv4O";
        assert!(is_public_key_line(ed25519));
        assert!(is_public_key_line(&format!(
            "{ed25519} me@laptop with spaces"
        )));
        for bad in [
            format!("command=\"sh\" {ed25519}"),
            format!("from=\"10.0.0.1\" {ed25519}"),
            // The blob names another algorithm than the line.
            ed25519.replacen("ssh-ed25519", "ssh-rsa", 1),
            "ssh-ed25519 not-base64!".into(),
            "ssh-ed25519".into(),
            "ssh-dss AAAAB3NzaC1kc3MAAACBAP".into(),
            // Only the name, no key after it.
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5".into(),
            String::new(),
        ] {
            assert!(!is_public_key_line(&bad), "{bad:?}");
        }
    }
}
