//! A real OpenSSH `sshd` for tests, in inetd mode (`sshd -i`) behind a listener on port 0,
//! whose `AuthorizedKeysCommand` is the built `cloudlink agent authorized-keys`.
//!
//! sshd refuses an `AuthorizedKeysCommand` below a group- or world-writable directory (such
//! as /tmp), so the binary and its config are copied to a fresh root-owned 0755 directory
//! under /run. Running sshd this way needs root; without it the SSH tests fail (see
//! [`super::require`]).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{is_root, Agent, World};

/// Where `sshd` is, if installed.
pub fn sshd_path() -> Option<PathBuf> {
    ["/usr/sbin/sshd", "/usr/bin/sshd", "/sbin/sshd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Requires what the SSH tests run: root and OpenSSH, server and client (see
/// [`super::require`]).
pub fn require() {
    let ok = sshd_path().is_some()
        && is_root()
        && Path::new("/usr/bin/ssh").is_file()
        && Path::new("/usr/bin/ssh-keygen").is_file();
    super::require(ok, "root and OpenSSH (sshd, ssh, ssh-keygen)");
}

/// A running inetd-style sshd.
pub struct Sshd {
    /// The root-owned directory holding the binary copy, config and host keys.
    pub dir: PathBuf,
    /// The port sshd answers on (127.0.0.1).
    pub port: u16,
    /// sshd's config file; rewrite it to change the host key.
    pub config: PathBuf,
    /// The accept loop.
    task: tokio::task::JoinHandle<()>,
}

fn keygen(path: &Path) {
    keygen_of(path, "ed25519");
}

fn keygen_of(path: &Path, kind: &str) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", "", "-f"])
        .arg(path)
        .stdout(Stdio::null())
        .status()
        .expect("ssh-keygen runs");
    assert!(status.success());
}

impl Sshd {
    /// Starts sshd whose keys come from the relay at `api` for device `uuid`/`key`.
    pub async fn start(api: std::net::SocketAddr, uuid: &str, key: &str) -> Sshd {
        Sshd::start_with(api, uuid, key, "").await
    }

    /// Like [`Sshd::start`], with `extra` lines in the agent.toml its key lookup reads
    /// (`root_login = "fleet-members"`).
    pub async fn start_with(api: std::net::SocketAddr, uuid: &str, key: &str, extra: &str) -> Sshd {
        // Privilege separation needs this directory (Debian creates it only at service start).
        std::fs::create_dir_all("/run/sshd").unwrap();
        let dir = PathBuf::from(format!(
            "/run/cloudlink-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.join("cloudlink");
        std::fs::copy(super::bin(), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let agent_config = dir.join("agent.toml");
        std::fs::write(
            &agent_config,
            format!("api = \"http://{api}\"\nuuid = \"{uuid}\"\nkey = \"{key}\"\n{extra}"),
        )
        .unwrap();
        // Readable by the AuthorizedKeysCommandUser (nobody); a real device uses a group.
        std::fs::set_permissions(&agent_config, std::fs::Permissions::from_mode(0o644)).unwrap();
        keygen(&dir.join("host_a"));
        keygen(&dir.join("host_b"));
        container_engine(&dir.join("bin"));
        let config = dir.join("sshd_config");
        write_config(&dir, &config, "host_a");

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let sshd_bin = sshd_path().expect("sshd installed");
        let log = dir.join("sshd.log");
        let sshd_config = config.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let stream = stream.into_std().unwrap();
                stream.set_nonblocking(false).unwrap();
                let stdout = stream.try_clone().unwrap();
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap();
                let child = Command::new(&sshd_bin)
                    .arg("-i")
                    .arg("-e")
                    .arg("-f")
                    .arg(&config)
                    .stdin(Stdio::from(std::os::fd::OwnedFd::from(stream)))
                    .stdout(Stdio::from(std::os::fd::OwnedFd::from(stdout)))
                    .stderr(Stdio::from(log))
                    .spawn();
                if let Ok(mut child) = child {
                    tokio::task::spawn_blocking(move || child.wait());
                }
            }
        });
        Sshd {
            dir,
            port,
            config: sshd_config,
            task,
        }
    }

    /// Rewrites the config with host key `host_key` (a file name in [`Sshd::dir`]).
    pub fn write_config(&self, host_key: &str) {
        write_config(&self.dir, &self.config, host_key);
    }

    /// What sshd logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
}

fn write_config(dir: &Path, config: &Path, host_key: &str) {
    let bin = dir.join("cloudlink");
    let agent_config = dir.join("agent.toml");
    let text = format!(
        "HostKey {dir}/{host_key}\n\
             AuthorizedKeysFile none\n\
             AuthorizedKeysCommand {bin} agent authorized-keys --config {cfg} %u\n\
             AuthorizedKeysCommandUser nobody\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n\
             UsePAM no\n\
             LogLevel VERBOSE\n\
             Subsystem sftp internal-sftp\n\
             SetEnv PATH={dir}/bin:/usr/local/bin:/usr/bin:/bin\n",
        dir = dir.display(),
        bin = bin.display(),
        cfg = agent_config.display(),
    );
    std::fs::write(config, text).unwrap();
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// ssh client options for tests: only `key`, no prompts, no user config.
pub fn ssh_opts(key: &Path) -> Vec<String> {
    [
        "-i",
        key.to_str().unwrap(),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=20",
        "-F",
        "/dev/null",
    ]
    .map(String::from)
    .to_vec()
}

/// A user key pair for the ssh client; returns the private key path.
pub fn user_key(dir: &Path) -> PathBuf {
    user_key_of(dir, "ed25519")
}

/// A user key pair of `kind` (`ed25519`, `ecdsa`, `rsa`), as `ssh-keygen -t` makes it.
pub fn user_key_of(dir: &Path, kind: &str) -> PathBuf {
    let path = dir.join(format!("id_{kind}"));
    keygen_of(&path, kind);
    path
}

/// The one container the stand-in engine knows.
pub const CONTAINER: &str = "c0ffee123456";

/// A stand-in for the device's container engine (`balena-engine`, and `docker` as the
/// balena CLI may call it), first on the PATH of sshd's sessions: `ps` lists one container
/// of service `main`, `exec [-i] [-t] <id> <command…>` says on stderr that it entered and
/// whether with a TTY, then runs the command here; another id is refused as the engine
/// refuses it.
fn container_engine(bin: &Path) {
    std::fs::create_dir_all(bin).unwrap();
    let script = format!(
        "#!/bin/sh
         case \"$1\" in
         ps) echo \"{CONTAINER} main_1_1_localrelease\"; exit 0;;
         exec) shift; tty=no
           while [ \"${{1#-}}\" != \"$1\" ]; do [ \"$1\" = -t ] && tty=yes; shift; done
           [ \"$1\" = {CONTAINER} ] || {{ echo \"Error response from daemon: No such container: $1\" >&2; exit 1; }}
           shift; echo \"entered {CONTAINER} tty=$tty\" >&2; exec \"$@\";;
         esac
         echo \"stand-in engine: unknown command $1\" >&2; exit 2
"
    );
    for name in ["balena-engine", "docker"] {
        let path = bin.join(name);
        std::fs::write(&path, &script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// A device with a real sshd behind its agent, root logins on; returns the uuid, the
/// device key, the sshd and the agent.
pub async fn device_with_sshd(w: &World, fleet: &str) -> (String, String, Sshd, Agent) {
    let (uuid, key) = w.device_in(fleet).await;
    let sshd = Sshd::start_with(w.relay.api, &uuid, &key, "root_login = \"fleet-members\"\n").await;
    let config = w.dir.path().join(format!("agent-{uuid}.toml"));
    std::fs::write(
        &config,
        format!("root_login = \"fleet-members\"\nssh_port = {}\n", sshd.port),
    )
    .unwrap();
    let agent = Agent::start(
        &w.relay,
        &uuid,
        &key,
        &["--config", config.to_str().unwrap()],
    );
    (uuid, key, sshd, agent)
}
