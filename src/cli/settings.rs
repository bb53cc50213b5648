//! What `cloudlink login` saves: per profile, the relay's API and proxy addresses and the
//! user's key. One file, `$XDG_CONFIG_HOME/cloudlink/config.toml` (mode 0600):
//!
//! ```toml
//! [profiles.default]
//! api = "https://relay.example.com:8443"
//! key = "clk_…"
//! ```
//!
//! A file from before profiles (the login's fields at the top level) is read as the
//! `default` profile and rewritten in this form at the next login or logout.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

/// One profile's saved login.
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
    /// The relay's SSH gateway, `HOST:PORT`, as the relay said at login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// The gateway's host key (one OpenSSH public key line), as the relay said at login
    /// over its verified API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_host_key: Option<String>,
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
            .field("gateway", &self.gateway)
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

/// The profile used when neither `--profile` nor `CLOUDLINK_PROFILE` names one.
pub const DEFAULT_PROFILE: &str = "default";

static PROFILE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Chooses this process's profile (from `--profile` / `CLOUDLINK_PROFILE`); call once, first.
pub fn select_profile(name: Option<String>) -> Result<()> {
    let name = name.unwrap_or_else(|| DEFAULT_PROFILE.to_owned());
    if name.is_empty()
        || name.len() > 63
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(anyhow!(
            "profile {name:?}: a profile name is 1 to 63 letters, digits, - and _"
        ));
    }
    let _ = PROFILE.set(name);
    Ok(())
}

/// This process's profile.
pub fn profile() -> &'static str {
    PROFILE.get().map_or(DEFAULT_PROFILE, String::as_str)
}

/// Every saved profile, by name.
#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Profiles {
    #[serde(default)]
    profiles: BTreeMap<String, Settings>,
}

impl Profiles {
    fn read() -> Result<Profiles> {
        let path = Settings::path()?;
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Profiles::default()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let table: toml::Table =
            toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?;
        if table.contains_key("api") {
            // The single login of a CLI from before profiles: the default profile.
            let old: Settings = toml::from_str(&text)
                .with_context(|| format!("{} is not valid", path.display()))?;
            return Ok(Profiles {
                profiles: BTreeMap::from([(DEFAULT_PROFILE.to_owned(), old)]),
            });
        }
        toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
    }

    /// Writes the file (directory 0700, file 0600) atomically; none at all when empty.
    fn write(&self) -> Result<PathBuf> {
        let dir = config_dir()?;
        let path = dir.join("config.toml");
        if self.profiles.is_empty() {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove {}", path.display()))
                }
            }
            return Ok(path);
        }
        crate::private_file::ensure_dir(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let text = toml::to_string_pretty(self)?;
        crate::private_file::replace_private(&path, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }
}

impl Settings {
    /// The file that holds every profile.
    pub fn path() -> Result<PathBuf> {
        Ok(config_dir()?.join("config.toml"))
    }

    /// The selected profile's login; an absent one says how to log in.
    pub fn load() -> Result<Settings> {
        Settings::load_profile(profile())?.ok_or_else(|| {
            let name = profile();
            let others: Vec<String> = Profiles::read()
                .map(|p| p.profiles.into_keys().collect())
                .unwrap_or_default();
            let flag = if name == DEFAULT_PROFILE {
                String::new()
            } else {
                format!(" --profile {name}")
            };
            let mut message = format!(
                "not logged in (profile {name}): run `cloudlink{flag} login --api URL` first"
            );
            if !others.is_empty() {
                message.push_str(&format!(
                    "; saved profiles: {} (choose one with --profile or CLOUDLINK_PROFILE)",
                    others.join(", ")
                ));
            }
            anyhow!(message)
        })
    }

    /// A profile's login, if it has one.
    pub fn load_profile(name: &str) -> Result<Option<Settings>> {
        Ok(Profiles::read()?.profiles.remove(name))
    }

    /// Saves this login as the selected profile, replacing its earlier one; returns the
    /// file and the login it replaced.
    pub fn save(&self) -> Result<(PathBuf, Option<Settings>)> {
        let mut all = Profiles::read()?;
        let old = all.profiles.insert(profile().to_owned(), self.clone());
        Ok((all.write()?, old))
    }

    /// Forgets the selected profile's login; returns it, or `None` if there was none.
    pub fn remove() -> Result<Option<Settings>> {
        let mut all = Profiles::read()?;
        let old = all.profiles.remove(profile());
        if old.is_some() {
            all.write()?;
        }
        Ok(old)
    }
}
