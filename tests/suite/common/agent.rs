//! An agent process for a test, against one relay or several.

use super::*;

/// An agent process.
pub struct Agent {
    child: Option<Child>,
    pub stderr: Lines,
}

impl Agent {
    /// Starts an agent for `uuid`/`key` against `relay`; returns once it is connected.
    pub fn start(relay: &Relay, uuid: &str, key: &str, extra: &[&str]) -> Agent {
        let agent = Agent::spawn(relay, uuid, key, extra);
        agent.stderr.wait_for("connected to relay");
        agent
    }

    /// Starts an agent without waiting.
    pub fn spawn(relay: &Relay, uuid: &str, key: &str, extra: &[&str]) -> Agent {
        Agent::spawn_to(&[relay], uuid, key, extra)
    }

    /// Starts an agent that knows several relays (a cluster), tried in turn; returns once
    /// it is connected.
    pub fn start_to(relays: &[&Relay], uuid: &str, key: &str, extra: &[&str]) -> Agent {
        let agent = Agent::spawn_to(relays, uuid, key, extra);
        agent.stderr.wait_for("connected to relay");
        agent
    }

    /// Starts an agent for several relays without waiting.
    pub fn spawn_to(relays: &[&Relay], uuid: &str, key: &str, extra: &[&str]) -> Agent {
        let addrs: Vec<String> = relays.iter().map(|r| r.device.to_string()).collect();
        Agent::spawn_with(&addrs, &relays[0].cert(), uuid, key, extra, &[])
    }

    /// Starts an agent with `--relay` entries as given (`quic://`, `tcp://` or bare),
    /// trusting `cert`, with extra flags and environment, without waiting.
    pub fn spawn_with(
        relays: &[String],
        cert: &Path,
        uuid: &str,
        key: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        Agent::spawn_wrapped(&[], relays, cert, uuid, key, extra, env)
    }

    /// [`Agent::spawn_with`] with `wrapper` in front of the binary (e.g. the rig's
    /// `ip netns exec DEVICE`).
    pub fn spawn_wrapped(
        wrapper: &[String],
        relays: &[String],
        cert: &Path,
        uuid: &str,
        key: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let mut cmd = command_under(wrapper);
        cmd.arg("agent");
        for relay in relays {
            cmd.arg("--relay").arg(relay);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .arg("--ca")
            .arg(cert)
            .args(["--server-name", "localhost"])
            .args(extra)
            .env("CLOUDLINK_DEVICE_UUID", uuid)
            .env("CLOUDLINK_DEVICE_KEY", key)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("agent starts");
        let stderr = Lines::spawn(child.stderr.take().unwrap(), None);
        Agent {
            child: Some(child),
            stderr,
        }
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, like a device losing power.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}
