//! `cloudlink agent authorized-keys USER`: the device's sshd `AuthorizedKeysCommand`.
//!
//! Prints the cloud user's public keys, as the relay answers for this device, and nothing
//! else on stdout; for `root` with `root_login = "fleet-members"`, the keys of every user who
//! may reach the device, each commented with its owner's cloud username. It fails closed:
//! if the relay cannot be asked, no key is printed, unless a cache directory is configured,
//! in which case the last good answer for that user is.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use super::AgentConfig;

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
    let client = crate::tls_client::http_client(
        api,
        config.trust(),
        Duration::from_secs(config.authorized_keys_timeout_secs.max(1)),
    )
    .map_err(|e| KeysError::Config(format!("{e:#}")))?;
    // With root logins on, `root` is every user who may reach this device (PROTOCOL.md §4).
    let all_members =
        username == "root" && config.root_login == super::config::RootLogin::FleetMembers;
    let url = format!(
        "{}/auth/v1/public-keys/{username}{}",
        api.trim_end_matches('/'),
        if all_members { "?all_members=true" } else { "" }
    );
    let response = client
        .get(url)
        .bearer_auth(&config.key.0)
        .send()
        .await
        .map_err(|e| KeysError::Unreachable(crate::tls_client::chain(&e)))?;
    match response.status().as_u16() {
        200 => {}
        401 => return Err(KeysError::Unauthorized),
        other => return Err(KeysError::Status(other)),
    }
    let body = response
        .text()
        .await
        .map_err(|e| KeysError::Unreachable(e.to_string()))?;
    // Only lines that look like keys go to sshd.
    let mut keys = String::new();
    for line in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if crate::auth::ssh_keys::parse(line).is_ok() {
            keys.push_str(line);
            keys.push('\n');
        }
    }
    Ok(keys)
}

fn store_cache(dir: &Path, username: &str, keys: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = dir.join(format!(".{username}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(keys.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(tmp, dir.join(username))
}
