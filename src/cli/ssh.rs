//! `cloudlink device ssh`: the system `ssh`, through the relay for a uuid, direct otherwise.

use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{anyhow, Context, Result};

use super::settings::{self, config_dir, Settings};
use super::{resolve, ApiClient};
use crate::proto::api::SshKeyView;

use crate::balena::DEFAULT_SERVICE_COMMAND;

/// `cloudlink device ssh` arguments (balena CLI's, plus `-l` and `--service-command`).
#[derive(Debug, clap::Args)]
pub struct SshArgs {
    /// Device uuid, short uuid (7+ characters) or name; or an IP address / `*.local` name
    /// to reach directly on the LAN.
    pub target: String,
    /// Enter this service's container instead of the host OS.
    pub service: Option<String>,
    /// The device's SSH port.
    #[arg(short = 'p', long, default_value_t = 22222)]
    pub port: u16,
    /// Force a terminal even when a command is given or stdin is not one (ssh -t).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Have ssh say what it does (ssh -v).
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Reach the relay directly, ignoring HTTPS_PROXY / HTTP_PROXY in the environment.
    #[arg(long)]
    pub noproxy: bool,
    /// Login name [default: your cloud username].
    #[arg(short = 'l', long = "login")]
    pub user: Option<String>,
    /// Command that enters a service container; `{service}` is replaced by its name
    /// [default: a balena-engine exec, or `service_command` in the CLI config].
    #[arg(long, env = "CLOUDLINK_SERVICE_COMMAND")]
    pub service_command: Option<String>,
    /// Extra arguments for ssh (after `--`).
    #[arg(last = true)]
    pub ssh_args: Vec<String>,
}

/// Whether `target` is reached directly rather than through the relay.
fn is_direct(target: &str) -> bool {
    target.parse::<IpAddr>().is_ok() || target.ends_with(".local")
}

/// How the relay is reached for a device: its uuid, and where `cloudlink proxy` reports a
/// refusal for `device ssh` to repeat.
pub struct ViaRelay<'a> {
    /// The device's full uuid.
    pub uuid: &'a str,
    /// The file `cloudlink proxy --report` writes.
    pub report: &'a Path,
}

/// Builds the ssh command line (without running it); `relay` is `None` for a LAN target.
pub fn command(
    args: &SshArgs,
    settings: &Settings,
    exe: &Path,
    relay: Option<ViaRelay<'_>>,
) -> Result<std::process::Command> {
    let user = args
        .user
        .clone()
        .or_else(|| settings.username.clone())
        .ok_or_else(|| anyhow!("no login name: pass -l USER (or log in again to save yours)"))?;
    let mut cmd = std::process::Command::new("ssh");
    cmd.arg("-p").arg(args.port.to_string());
    cmd.arg("-l").arg(&user);
    let host = match relay {
        None => args.target.clone(),
        Some(ViaRelay { uuid, report }) => {
            let known_hosts = config_dir()?.join("known_hosts");
            // No prompt the first time; a changed host key afterwards is refused by ssh, loudly.
            cmd.arg("-o")
                .arg(format!("UserKnownHostsFile={}", known_hosts.display()));
            cmd.arg("-o").arg("StrictHostKeyChecking=accept-new");
            cmd.arg("-o").arg(format!("HostKeyAlias={uuid}"));
            let profile = match settings::profile() {
                settings::DEFAULT_PROFILE => String::new(),
                name => format!("--profile {name} "),
            };
            cmd.arg("-o").arg(format!(
                "ProxyCommand={} {profile}proxy {}--report {} {uuid} {}",
                shell_quote(&exe.display().to_string()),
                if args.noproxy { "--noproxy " } else { "" },
                shell_quote(&report.display().to_string()),
                args.port
            ));
            uuid.to_owned()
        }
    };
    if args.verbose {
        cmd.arg("-v");
    }
    if args.service.is_some() || args.tty {
        cmd.arg("-t");
    } else if !std::io::stdin().is_terminal() {
        // Commands on stdin (`echo uptime | cloudlink device ssh …`): no tty, and no
        // warning from ssh about not allocating one.
        cmd.arg("-T");
    }
    cmd.args(&args.ssh_args);
    cmd.arg(&host);
    if let Some(service) = &args.service {
        let template = args
            .service_command
            .clone()
            .or_else(|| settings.service_command.clone())
            .unwrap_or_else(|| DEFAULT_SERVICE_COMMAND.to_owned());
        cmd.arg(template.replace("{service}", service));
    }
    Ok(cmd)
}

/// Runs ssh and returns its exit code. For a device reached through the relay, what can be
/// known beforehand is checked first (login, device, online, port allowed), and when ssh
/// fails the cause is said last, in our words: the relay's refusal, or which keys sshd
/// turned down.
pub fn run(args: SshArgs) -> Result<i32> {
    let settings = Settings::load()?;
    let exe = std::env::current_exe().context("cannot find the cloudlink binary")?;
    if is_direct(&args.target) {
        let status = command(&args, &settings, &exe, None)?
            .status()
            .context("cannot run ssh (is OpenSSH's client installed?)")?;
        return Ok(status.code().unwrap_or(255));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let client = ApiClient::new(
        &settings.api,
        &settings.key,
        settings.ca.as_deref(),
        args.noproxy,
    )?;
    let device = runtime.block_on(resolve::reachable(&client, &args.target, &[args.port]))?;
    let dir = config_dir()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let report = report_in(&dir);
    let relay = ViaRelay {
        uuid: &device.uuid,
        report: &report.0,
    };
    let mut cmd = command(&args, &settings, &exe, Some(relay))?;
    let (status, denied) = run_watching_stderr(&mut cmd)?;
    let code = status.code().unwrap_or(255);
    if code == 255 {
        let refusal = std::fs::read_to_string(&report.0).unwrap_or_default();
        if !refusal.trim().is_empty() {
            return Err(anyhow!("{}", refusal.trim()));
        }
        if denied {
            let user = args.user.clone().or_else(|| settings.username.clone());
            let why = runtime.block_on(keys_refused(&client, &args, &device.uuid, user));
            return Err(anyhow!(why));
        }
    }
    Ok(code)
}

/// A file name for `cloudlink proxy --report`, removed when dropped.
struct Report(std::path::PathBuf);

impl Drop for Report {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn report_in(dir: &Path) -> Report {
    let name = format!(
        ".ssh-report-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    );
    Report(dir.join(name))
}

/// Runs ssh with its stderr passed through line by line, noting whether sshd refused
/// authentication ("Permission denied (publickey…)").
fn run_watching_stderr(
    cmd: &mut std::process::Command,
) -> Result<(std::process::ExitStatus, bool)> {
    use std::io::{BufRead, Write};
    let mut child = cmd
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run ssh (is OpenSSH's client installed?)")?;
    let stderr = child.stderr.take().context("ssh's stderr")?;
    let watcher = std::thread::spawn(move || {
        let mut denied = false;
        let mut reader = std::io::BufReader::new(stderr);
        let mut line = Vec::new();
        let mut out = std::io::stderr();
        while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            denied |= line.windows(19).any(|w| w == b"Permission denied (");
            let _ = out.write_all(&line);
            let _ = out.flush();
            line.clear();
        }
        denied
    });
    let status = child.wait().context("ssh did not run")?;
    let denied = watcher.join().unwrap_or(false);
    Ok((status, denied))
}

/// Why sshd refused: which key files ssh offered, and whether any of them is among the
/// person's cloud keys (the ones the device's `authorized-keys` lookup serves).
async fn keys_refused(
    client: &ApiClient,
    args: &SshArgs,
    uuid: &str,
    user: Option<String>,
) -> String {
    let offered = offered_keys(args);
    let cloud: Vec<SshKeyView> = client
        .call(reqwest::Method::GET, "/v1/ssh-keys", None)
        .await
        .unwrap_or_default();
    let login = user.unwrap_or_else(|| "?".into());
    let mut lines = vec![format!(
        "sshd on device {uuid} refused every key offered for login {login}"
    )];
    if offered.is_empty() {
        lines.push(
            "  ssh had no key file to offer (keys held by an ssh-agent are not listed here)".into(),
        );
    }
    let mut any_known = false;
    for (path, fingerprint) in &offered {
        let known = fingerprint
            .as_ref()
            .is_some_and(|f| cloud.iter().any(|k| &k.fingerprint == f));
        any_known |= known;
        lines.push(format!(
            "  offered {} ({}){}",
            path.display(),
            fingerprint
                .as_deref()
                .unwrap_or("no readable .pub next to it"),
            if known {
                ", one of your cloud keys"
            } else {
                ", not one of your cloud keys"
            }
        ));
    }
    if any_known {
        lines.push(format!(
            "A key of yours was refused: check that the device's sshd asks \
             `cloudlink agent authorized-keys %u` (README) and that login {login} exists there."
        ));
    } else {
        let example = offered
            .first()
            .map(|(p, _)| format!("{}.pub", p.display()))
            .unwrap_or_else(|| "~/.ssh/id_ed25519.pub".into());
        lines.push(format!(
            "Add the public key of the one you use: `cloudlink key add NAME {example}` \
             (no key yet? `ssh-keygen -t ed25519`)."
        ));
    }
    lines.join("\n")
}

/// The private key files ssh would offer (from `ssh -G`: the identity files that exist),
/// each with the SHA-256 fingerprint of its `.pub`, when that is readable.
fn offered_keys(args: &SshArgs) -> Vec<(std::path::PathBuf, Option<String>)> {
    let output = std::process::Command::new("ssh")
        .arg("-G")
        .args(&args.ssh_args)
        .arg("device")
        .stderr(std::process::Stdio::null())
        .output();
    let Ok(output) = output else {
        return Vec::new();
    };
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("identityfile "))
        .map(|p| match (p.strip_prefix("~/"), &home) {
            (Some(rest), Some(home)) => home.join(rest),
            _ => std::path::PathBuf::from(p),
        })
        .filter(|p| p.is_file())
        .map(|p| {
            let public = std::fs::read_to_string(format!("{}.pub", p.display())).ok();
            let fingerprint = public
                .and_then(|text| crate::auth::ssh_keys::parse(&text).ok())
                .map(|k| k.fingerprint);
            (p, fingerprint)
        })
        .collect()
}

fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            api: "http://r:8080".into(),
            proxy: Some("r:3128".into()),
            proxy_tls: false,
            ca: None,
            key: "clk_x".into(),
            username: Some("alice".into()),
            gateway: None,
            gateway_host_key: None,
            service_command: None,
        }
    }

    fn args(target: &str, service: Option<&str>) -> SshArgs {
        SshArgs {
            target: target.into(),
            service: service.map(String::from),
            port: 22222,
            tty: false,
            verbose: false,
            noproxy: false,
            user: None,
            service_command: None,
            ssh_args: vec!["-v".into()],
        }
    }

    fn line(cmd: &std::process::Command) -> Vec<String> {
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn uuid_goes_through_the_relay_with_pinned_host_keys() {
        let uuid = "7a3c9e0f2b5d41c8a6e4f1b2c3d4e5f6";
        let relay = ViaRelay {
            uuid,
            report: Path::new("/tmp/r"),
        };
        let mut a = args("7a3c9e0", None);
        a.tty = true;
        a.verbose = true;
        let cmd = command(
            &a,
            &settings(),
            Path::new("/usr/bin/cloudlink"),
            Some(relay),
        )
        .unwrap();
        let l = line(&cmd);
        assert!(l.contains(&"alice".to_string()));
        assert!(l.contains(&"StrictHostKeyChecking=accept-new".to_string()));
        assert!(l.contains(&format!("HostKeyAlias={uuid}")));
        assert!(l.contains(&format!(
            "ProxyCommand=/usr/bin/cloudlink proxy --report /tmp/r {uuid} 22222"
        )));
        assert!(l.contains(&"-t".to_string()) && l.contains(&"-v".to_string()));
        assert_eq!(l.last().unwrap(), uuid);
    }

    #[test]
    fn lan_targets_are_direct_and_services_get_a_command() {
        let cmd = command(
            &args("192.168.1.20", Some("main")),
            &settings(),
            Path::new("/x"),
            None,
        )
        .unwrap();
        let l = line(&cmd);
        assert!(!l.iter().any(|a| a.starts_with("ProxyCommand")));
        assert!(l.contains(&"-t".to_string()));
        assert!(l.last().unwrap().contains("name=^main_"));
        let mut s = settings();
        s.service_command = Some("enter {service}".into());
        let cmd = command(&args("device.local", Some("db")), &s, Path::new("/x"), None).unwrap();
        assert_eq!(line(&cmd).last().unwrap(), "enter db");
    }
}
