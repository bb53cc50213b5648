//! `cloudlink device ssh`: the system `ssh`, through the relay for a uuid, direct otherwise.

use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{anyhow, Context, Result};

use super::settings::{config_dir, Settings};
use super::tunnel::normalise_uuid;

use crate::config::DEFAULT_SERVICE_COMMAND;

/// `cloudlink device ssh` arguments.
#[derive(Debug, clap::Args)]
pub struct SshArgs {
    /// Device uuid, or an IP address / `*.local` name to reach directly on the LAN.
    pub target: String,
    /// Enter this service's container instead of the host OS.
    pub service: Option<String>,
    /// The device's SSH port.
    #[arg(long, default_value_t = 22222)]
    pub port: u16,
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

/// Builds the ssh command line (without running it).
pub fn command(args: &SshArgs, settings: &Settings, exe: &Path) -> Result<std::process::Command> {
    let user = args
        .user
        .clone()
        .or_else(|| settings.username.clone())
        .ok_or_else(|| anyhow!("no login name: pass -l USER (or log in again to save yours)"))?;
    let mut cmd = std::process::Command::new("ssh");
    cmd.arg("-p").arg(args.port.to_string());
    cmd.arg("-l").arg(&user);
    let host = if is_direct(&args.target) {
        args.target.clone()
    } else {
        let uuid = normalise_uuid(&args.target)?;
        let known_hosts = config_dir()?.join("known_hosts");
        // No prompt the first time; a changed host key afterwards is refused by ssh, loudly.
        cmd.arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()));
        cmd.arg("-o").arg("StrictHostKeyChecking=accept-new");
        cmd.arg("-o").arg(format!("HostKeyAlias={uuid}"));
        cmd.arg("-o").arg(format!(
            "ProxyCommand={} proxy {uuid} {}",
            shell_quote(&exe.display().to_string()),
            args.port
        ));
        uuid
    };
    if args.service.is_some() {
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

/// Runs ssh and returns its exit code.
pub fn run(args: SshArgs) -> Result<i32> {
    let settings = Settings::load()?;
    let exe = std::env::current_exe().context("cannot find the cloudlink binary")?;
    if let Some(dir) = config_dir().ok().filter(|d| !d.exists()) {
        let _ = std::fs::create_dir_all(dir);
    }
    let status = command(&args, &settings, &exe)?
        .status()
        .context("cannot run ssh (is OpenSSH's client installed?)")?;
    Ok(status.code().unwrap_or(255))
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
            service_command: None,
        }
    }

    fn args(target: &str, service: Option<&str>) -> SshArgs {
        SshArgs {
            target: target.into(),
            service: service.map(String::from),
            port: 22222,
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
        let uuid = "7A3C9E0F2B5D41C8A6E4F1B2C3D4E5F6";
        let cmd = command(
            &args(uuid, None),
            &settings(),
            Path::new("/usr/bin/cloudlink"),
        )
        .unwrap();
        let l = line(&cmd);
        assert!(l.contains(&"alice".to_string()));
        assert!(l.contains(&"StrictHostKeyChecking=accept-new".to_string()));
        assert!(l.contains(&format!("HostKeyAlias={}", uuid.to_lowercase())));
        assert!(l.contains(&format!(
            "ProxyCommand=/usr/bin/cloudlink proxy {} 22222",
            uuid.to_lowercase()
        )));
        assert_eq!(l.last().unwrap(), &uuid.to_lowercase());
    }

    #[test]
    fn lan_targets_are_direct_and_services_get_a_command() {
        let cmd = command(
            &args("192.168.1.20", Some("main")),
            &settings(),
            Path::new("/x"),
        )
        .unwrap();
        let l = line(&cmd);
        assert!(!l.iter().any(|a| a.starts_with("ProxyCommand")));
        assert!(l.contains(&"-t".to_string()));
        assert!(l.last().unwrap().contains("name=^main_"));
        let mut s = settings();
        s.service_command = Some("enter {service}".into());
        let cmd = command(&args("device.local", Some("db")), &s, Path::new("/x")).unwrap();
        assert_eq!(line(&cmd).last().unwrap(), "enter db");
        assert!(command(&args("not-a-uuid", None), &s, Path::new("/x")).is_err());
    }
}
