//! A relay on SQLite in a temp dir with its admin's API client: most tests start here.

use super::*;

/// A relay with a logged-in CLI config and an admin API client.
pub struct World {
    pub dir: tempfile::TempDir,
    pub relay: Relay,
    pub admin: Api,
}

impl World {
    /// A relay on SQLite in a temp dir, with test-friendly limits merged into `config`.
    pub fn new(config: &str) -> World {
        World::with(config, &[], &[])
    }

    /// Like [`World::new`] with extra relay flags and env.
    pub fn with(config: &str, extra: &[&str], env: &[(&str, &str)]) -> World {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(&file, config).unwrap();
        let mut args = vec!["--config", file.to_str().unwrap()];
        args.extend_from_slice(extra);
        let relay = Relay::start(&dir.path().join("data"), &args, env);
        let admin = Api::new(relay.api, &relay.admin_key());
        World { dir, relay, admin }
    }

    /// The CLI config dir of this world.
    pub fn xdg(&self) -> PathBuf {
        self.dir.path().join("xdg")
    }

    /// Runs the CLI with this world's config dir; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        cli_in(&self.xdg(), args, None)
    }

    /// Logs a CLI config dir in with `key`.
    pub fn login_in(&self, xdg: &Path, key: &str) {
        let (ok, _, err) = cli_in(
            xdg,
            &[
                "login",
                "--api",
                &format!("http://{}", self.relay.api),
                "--proxy",
                &self.relay.proxy.to_string(),
                "--key",
                key,
            ],
            None,
        );
        assert!(ok, "login failed: {err}");
    }

    /// Runs the CLI and insists it succeeds; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.cli(args);
        assert!(ok, "cloudlink {args:?} failed: {err}");
        out
    }

    /// Logs the CLI in with `key`.
    pub fn login(&self, key: &str) {
        self.login_in(&self.xdg(), key);
    }

    /// Creates a fleet (owned by the admin) and a device in it; returns (uuid, key).
    pub async fn device_in(&self, fleet: &str) -> (String, String) {
        self.admin.register_device(fleet).await
    }

    /// Creates a user; returns their API key.
    pub async fn user(&self, name: &str) -> String {
        let (status, u) = self
            .admin
            .call("POST", "/v1/users", Some(json!({ "username": name })))
            .await;
        assert_eq!(status, 201, "{u}");
        u["api_key"].as_str().unwrap().to_owned()
    }
}
