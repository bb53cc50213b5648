//! The relay and the user commands: everything but the device agent, in the full build
//! (feature `relay`). `main.rs` dispatches here.

use anyhow::{Context, Result};
use clap::{CommandFactory, Subcommand};

use cloudlink::cli::{admin, login, settings, ssh, tunnel, JsonArg, Output};
use cloudlink::config::{RelayArgs, RelayConfig};
use cloudlink::relay::Relay;

use crate::{current_thread, fail, init_tracing, json_line, Errors, LogFormat};

/// A group of data commands, `--json` taken anywhere after the group's name.
#[derive(clap::Args)]
pub(crate) struct Group<C: clap::Subcommand> {
    /// Print results (and errors) as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: C,
}

/// The relay's and the user's commands.
#[derive(Subcommand)]
pub(crate) enum FullCommand {
    /// Run a relay (API, CONNECT proxy, device listener).
    Relay(Box<RelayArgs>),
    /// Apply database migrations and exit.
    Migrate {
        /// sqlite://PATH or postgres://…
        #[arg(long, env = "CLOUDLINK_DATABASE_URL")]
        database_url: String,
    },
    /// Check an API key against a relay and save the login (in the selected profile).
    Login {
        #[command(flatten)]
        args: login::LoginArgs,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Forget the selected profile's login.
    Logout(JsonArg),
    /// Show who you are logged in as, on which relay, in which profile.
    Whoami(JsonArg),
    /// Print an ssh_config snippet for plain `ssh <uuid>.balena` through the relay's SSH
    /// gateway (ProxyJump, the gateway's host key pinned).
    #[command(name = "ssh-config")]
    SshConfig,
    /// Manage users (admins).
    User(Group<admin::UserCmd>),
    /// Manage your API keys.
    #[command(name = "api-key")]
    ApiKey(Group<admin::ApiKeyCmd>),
    /// Manage fleets and their members.
    Fleet(Group<admin::FleetCmd>),
    /// List the fleets you can see (`fleet list`).
    Fleets(JsonArg),
    /// Reach devices (tunnel, ssh) and manage them (register, list, rm).
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Bridge stdin/stdout to a device port (for ssh's ProxyCommand).
    Proxy {
        /// Device uuid.
        uuid: String,
        /// Device port.
        port: u16,
        /// Reach the relay directly, ignoring HTTPS_PROXY.
        #[arg(long)]
        noproxy: bool,
        /// Also write a refusal's explanation to this file (for `device ssh`).
        #[arg(long, hide = true)]
        report: Option<std::path::PathBuf>,
    },
    /// Manage your SSH public keys.
    Key(Group<admin::KeyCmd>),
    /// Print a shell completion script: `cloudlink completions bash > /etc/bash_completion.d/cloudlink`.
    Completions {
        /// bash, zsh or fish.
        shell: CompletionShell,
    },
    /// Write a man page for every command into a directory (cloudlink.1, cloudlink-device-ssh.1 …).
    Manpages {
        /// The directory (created if missing).
        dir: std::path::PathBuf,
    },
    /// Copy a SQLite store to a new file while the relay runs (for Postgres: pg_dump).
    Backup {
        /// The new file (must not exist).
        file: std::path::PathBuf,
        /// The store [default: sqlite://<data-dir>/cloudlink.db].
        #[arg(long, env = "CLOUDLINK_DATABASE_URL")]
        database_url: Option<String>,
        /// The relay's data directory [default: ./cloudlink-data].
        #[arg(long, env = "CLOUDLINK_DATA_DIR")]
        data_dir: Option<std::path::PathBuf>,
    },
}

impl FullCommand {
    /// Whether this command was asked for JSON.
    fn json(&self) -> bool {
        match self {
            FullCommand::Login { json, .. } => json.json,
            FullCommand::Logout(j) | FullCommand::Whoami(j) | FullCommand::Fleets(j) => j.json,
            FullCommand::User(g) => g.json,
            FullCommand::ApiKey(g) => g.json,
            FullCommand::Fleet(g) => g.json,
            FullCommand::Key(g) => g.json,
            FullCommand::Device(DeviceCmd::Admin(cmd)) => cmd.json(),
            _ => false,
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum DeviceCmd {
    /// Forward local ports to the device's ports: -p R, R:L, R:ADDR or R:ADDR:L.
    Tunnel {
        /// Device uuid, short uuid (7+ characters) or name.
        uuid: String,
        /// Port spec (repeatable).
        #[arg(short = 'p', long = "port", required = true)]
        ports: Vec<String>,
    },
    /// SSH into the device (through the relay for a uuid, directly for an IP or *.local).
    Ssh(ssh::SshArgs),
    #[command(flatten)]
    Admin(admin::DeviceAdminCmd),
}

/// The shells `completions` writes for.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum CompletionShell {
    /// GNU bash.
    Bash,
    /// Z shell.
    Zsh,
    /// fish.
    Fish,
}

/// Prints the completion script for `shell`.
fn completions(shell: CompletionShell) -> Result<()> {
    let shell = match shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    let mut command = crate::Cli::command();
    // Into memory first: clap_complete panics on a write error (`| head`, a full disk).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "cloudlink", &mut script);
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(&script).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write the completion script")
        }
        _ => Ok(()),
    }
}

/// Writes `cloudlink.1` and one page per visible subcommand, `cloudlink-device-ssh.1` …
fn manpages(dir: &std::path::Path) -> Result<()> {
    fn write(command: &clap::Command, name: String, dir: &std::path::Path) -> Result<usize> {
        let page = command.clone().name(name.clone());
        let mut text = Vec::new();
        clap_mangen::Man::new(page)
            .render(&mut text)
            .context("cannot render a man page")?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        let mut written = 1;
        for sub in command.get_subcommands() {
            if sub.is_hide_set() || sub.get_name() == "help" {
                continue;
            }
            written += write(sub, format!("{name}-{}", sub.get_name()), dir)?;
        }
        Ok(written)
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut command = crate::Cli::command();
    command.build();
    let written = write(&command, "cloudlink".into(), dir)?;
    println!("wrote {written} man pages to {}", dir.display());
    Ok(())
}

/// Runs a relay or user command; `json` is the hidden top-level `--json` of older CLIs.
pub(crate) fn run(
    command: FullCommand,
    json: bool,
    profile: Option<String>,
    log_format: LogFormat,
) -> Result<()> {
    if json && !command.json() && !data_command(&command) {
        fail(
            Errors::Json,
            anyhow::anyhow!("--json applies to commands that print data (lists, show, whoami …)"),
        );
    }
    let json = json || command.json();
    let out = if json { Output::Json } else { Output::Table };
    let result = settings::select_profile(profile).and_then(|()| match command {
        FullCommand::Relay(args) => {
            init_tracing("info", log_format);
            run_relay(*args, log_format)
        }
        FullCommand::Device(DeviceCmd::Ssh(args)) => {
            init_tracing("warn", log_format);
            match ssh::run(args) {
                Ok(code) => std::process::exit(code),
                Err(e) => Err(e),
            }
        }
        command => {
            init_tracing("warn", log_format);
            current_thread().and_then(|rt| rt.block_on(run_command(command, out)))
        }
    });
    if let Err(e) = result {
        fail(
            if json {
                Errors::Json
            } else {
                log_format.into()
            },
            e,
        );
    }
    Ok(())
}

/// Whether a command prints data (and so takes `--json`).
fn data_command(command: &FullCommand) -> bool {
    matches!(
        command,
        FullCommand::Login { .. }
            | FullCommand::Logout(_)
            | FullCommand::Whoami(_)
            | FullCommand::User(_)
            | FullCommand::ApiKey(_)
            | FullCommand::Fleet(_)
            | FullCommand::Fleets(_)
            | FullCommand::Key(_)
            | FullCommand::Device(DeviceCmd::Admin(_))
    )
}

async fn run_command(command: FullCommand, out: Output) -> Result<()> {
    match command {
        FullCommand::Relay(_) | FullCommand::Device(DeviceCmd::Ssh(_)) => {
            unreachable!("handled in run")
        }
        FullCommand::Migrate { database_url } => {
            cloudlink::store::migrate(&database_url)
                .await
                .context("migration failed")?;
            println!("migrations applied");
            Ok(())
        }
        FullCommand::Login { args, .. } => login::login(args, out).await,
        FullCommand::Logout(_) => login::logout(out),
        FullCommand::Whoami(_) => login::whoami(out).await,
        FullCommand::SshConfig => login::ssh_config(),
        FullCommand::User(g) => admin::user(g.cmd, out).await,
        FullCommand::ApiKey(g) => admin::api_key(g.cmd, out).await,
        FullCommand::Fleet(g) => admin::fleet(g.cmd, out).await,
        FullCommand::Fleets(_) => admin::fleet(admin::FleetCmd::List, out).await,
        FullCommand::Device(DeviceCmd::Admin(cmd)) => admin::device(cmd, out).await,
        FullCommand::Device(DeviceCmd::Tunnel { uuid, ports }) => {
            tunnel::tunnel(&uuid, &ports).await
        }
        FullCommand::Proxy {
            uuid,
            port,
            noproxy,
            report,
        } => tunnel::proxy(&uuid, port, noproxy, report.as_deref()).await,
        FullCommand::Key(g) => admin::key(g.cmd, out).await,
        FullCommand::Completions { shell } => completions(shell),
        FullCommand::Manpages { dir } => manpages(&dir),
        FullCommand::Backup {
            file,
            database_url,
            data_dir,
        } => backup(&file, database_url, data_dir).await,
    }
}

fn run_relay(args: RelayArgs, log_format: LogFormat) -> Result<()> {
    let config = RelayConfig::load(&args)?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    // Sockets systemd binds for the relay (22, 443: ports it may not bind itself).
    cloudlink::relay::listen::adopt_inherited();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        runtime.worker_threads(config.worker_threads);
    }
    runtime
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(serve_relay(config, log_format))
}

async fn serve_relay(config: RelayConfig, log_format: LogFormat) -> Result<()> {
    cloudlink::tls_client::install_crypto();
    let relay = Relay::start(config).await?;
    // Two lines on stdout for whoever started the relay (scripts and the tests read the
    // addresses there): text as before, or JSON like every other line under
    // `--log-format json`, so that a log shipper reading the output reads only JSON.
    if let Some(path) = &relay.admin_key_path {
        let path = path.display().to_string();
        match log_format {
            LogFormat::Text => println!("bootstrap admin key written to {path}"),
            LogFormat::Json => println!(
                "{}",
                json_line("INFO", "bootstrap admin key written", &[("path", path)])
            ),
        }
    }
    let addrs = relay.addrs();
    tracing::info!(api = %addrs.api, api_tls = ?addrs.api_tls, proxy = %addrs.proxy, proxy_tls = ?addrs.proxy_tls, device = ?addrs.device, device_tcp = ?addrs.device_tcp, peer = ?addrs.peer, metrics = ?addrs.metrics, ssh = ?addrs.ssh, "relay listening");
    let listening: Vec<(&str, String)> = [
        ("api", Some(addrs.api)),
        ("api_tls", addrs.api_tls),
        ("proxy", Some(addrs.proxy)),
        ("proxy_tls", addrs.proxy_tls),
        ("device", addrs.device),
        ("device_tcp", addrs.device_tcp),
        ("peer", addrs.peer),
        ("metrics", addrs.metrics),
        ("ssh", addrs.ssh),
    ]
    .into_iter()
    .filter_map(|(name, addr)| addr.map(|a| (name, a.to_string())))
    .collect();
    match log_format {
        LogFormat::Text => {
            let fields: Vec<String> = listening.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("relay listening: {}", fields.join(" "));
        }
        LogFormat::Json => println!("{}", json_line("INFO", "relay listening", &listening)),
    }
    relay.run(crate::shutdown_signal()).await?;
    Ok(())
}

async fn backup(
    file: &std::path::Path,
    database_url: Option<String>,
    data_dir: Option<std::path::PathBuf>,
) -> Result<()> {
    let url = database_url.unwrap_or_else(|| {
        let dir = data_dir.unwrap_or_else(|| RelayConfig::default().data_dir);
        cloudlink::store::sqlite::default_url(&dir)
    });
    if !url.starts_with("sqlite:") {
        anyhow::bail!(
            "`cloudlink backup` copies SQLite stores; back up Postgres with pg_dump (docs/operations.md)"
        );
    }
    if file.exists() {
        anyhow::bail!("{} exists; back up to a new file", file.display());
    }
    cloudlink::store::sqlite::backup(&url, file)
        .await
        .with_context(|| format!("backup of {url} failed"))?;
    println!("backed up {url} to {}", file.display());
    Ok(())
}
