//! What `cloudlink login` saves: the relay's API and proxy addresses and the user's key.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

/// The saved login, `$XDG_CONFIG_HOME/cloudlink/config.toml` (mode 0600).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The relay's API base URL, e.g. `http://relay.example.com:8080`.
    pub api: String,
    /// The relay's CONNECT proxy, `HOST:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// Whether the proxy address is the relay's TLS listener.
    #[serde(default)]
    pub proxy_tls: bool,
    /// A CA (or pinned self-signed) certificate for the TLS proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The API key.
    pub key: String,
    /// The cloud username the key belongs to (the default ssh login name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The command `device ssh DEVICE SERVICE` runs to enter a service's container;
    /// `{service}` is replaced by the service name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_command: Option<String>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("api", &self.api)
            .field("proxy", &self.proxy)
            .field("proxy_tls", &self.proxy_tls)
            .field("ca", &self.ca)
            .field("key", &"***")
            .field("username", &self.username)
            .finish()
    }
}

/// `$XDG_CONFIG_HOME/cloudlink` or `~/.config/cloudlink`.
pub fn config_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("cloudlink"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| anyhow!("neither XDG_CONFIG_HOME nor HOME is set"))?;
    Ok(PathBuf::from(home).join(".config").join("cloudlink"))
}

impl Settings {
    /// The saved login's path.
    pub fn path() -> Result<PathBuf> {
        Ok(config_dir()?.join("config.toml"))
    }

    /// Reads the saved login; an absent one says to log in.
    pub fn load() -> Result<Settings> {
        let path = Settings::path()?;
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(anyhow!(
                    "not logged in: run `cloudlink login --api URL --key-file FILE` first"
                ))
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
    }

    /// Writes the login (directory 0700, file 0600), replacing any earlier one atomically.
    pub fn save(&self) -> Result<PathBuf> {
        let dir = config_dir()?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("config.toml");
        let tmp = dir.join(".config.toml.tmp");
        let text = toml::to_string_pretty(self)?;
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        file.write_all(text.as_bytes())
            .and_then(|_| file.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }
}
