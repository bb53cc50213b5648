//! `cloudlink`: argument parsing and dispatch; the work is in the library.

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use cloudlink::agent::{self, AgentArgs, AgentConfig};
use cloudlink::cli::{admin, healthcheck, login, settings, ssh, tunnel, JsonArg, Output};
use cloudlink::config::{RelayArgs, RelayConfig};
use cloudlink::relay::Relay;

/// Reach the devices of your fleets through a relay: SSH, tunnels, admin.
#[derive(Parser)]
#[command(name = "cloudlink", version, about, propagate_version = true)]
struct Cli {
    /// Before the subcommand, as older versions took it; commands that print data take
    /// `--json` themselves.
    #[arg(long, hide = true)]
    json: bool,
    /// Log lines as text or as one JSON object each.
    #[arg(
        long,
        global = true,
        env = "CLOUDLINK_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    /// The saved login to use: one profile per relay [default: default].
    #[arg(long, global = true, env = "CLOUDLINK_PROFILE")]
    profile: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// A group of data commands, `--json` taken anywhere after the group's name.
#[derive(clap::Args)]
struct Group<C: clap::Subcommand> {
    /// Print results (and errors) as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: C,
}

#[derive(Subcommand)]
enum Command {
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
    /// Run the device agent (dials the relay, serves tunnels).
    Agent {
        #[command(flatten)]
        args: AgentArgs,
        #[command(subcommand)]
        command: Option<AgentCmd>,
    },
    /// Manage your SSH public keys.
    Key(Group<admin::KeyCmd>),
    /// Exit 0 if the relay or agent running here is healthy (a container's HEALTHCHECK).
    Healthcheck(healthcheck::HealthArgs),
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

impl Command {
    /// Whether this command was asked for JSON.
    fn json(&self) -> bool {
        match self {
            Command::Login { json, .. } => json.json,
            Command::Logout(j) | Command::Whoami(j) | Command::Fleets(j) => j.json,
            Command::User(g) => g.json,
            Command::ApiKey(g) => g.json,
            Command::Fleet(g) => g.json,
            Command::Key(g) => g.json,
            Command::Device(DeviceCmd::Admin(cmd)) => cmd.json(),
            _ => false,
        }
    }
}

/// The shells `completions` writes for.
#[derive(Clone, Copy, clap::ValueEnum)]
enum CompletionShell {
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
    let mut command = Cli::command();
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
    let mut command = Cli::command();
    command.build();
    let written = write(&command, "cloudlink".into(), dir)?;
    println!("wrote {written} man pages to {}", dir.display());
    Ok(())
}

/// How log lines are written.
#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, span fields (tunnel id, user, device) included.
    Json,
}

#[derive(Subcommand)]
enum DeviceCmd {
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

#[derive(Subcommand)]
enum AgentCmd {
    /// Print a cloud user's SSH keys for this device (sshd's AuthorizedKeysCommand).
    AuthorizedKeys {
        /// The login name sshd asks about (%u).
        username: String,
    },
}

fn init_tracing(default: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

/// A single-threaded runtime: the agent serves one QUIC connection, whose work quinn
/// serialises anyway, and CLI commands are small; one thread saves the cross-thread
/// wake-ups that cost the agent up to a third of its throughput on a small machine.
fn current_thread() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn main() {
    let cli = Cli::parse();
    let json = cli.json || cli.command.json();
    if cli.json && !cli.command.json() && !data_command(&cli.command) {
        fail(
            json,
            anyhow::anyhow!("--json applies to commands that print data (lists, show, whoami …)"),
        );
    }
    let out = if json { Output::Json } else { Output::Table };
    let result = settings::select_profile(cli.profile).and_then(|()| match cli.command {
        Command::Relay(args) => {
            init_tracing("info", cli.log_format);
            run_relay(*args)
        }
        Command::Agent {
            args,
            command: None,
        } => {
            init_tracing("info", cli.log_format);
            current_thread().and_then(|rt| rt.block_on(run_agent(args)))
        }
        Command::Agent {
            args,
            command: Some(AgentCmd::AuthorizedKeys { username }),
        } => {
            init_tracing("warn", cli.log_format);
            current_thread().and_then(|rt| rt.block_on(authorized_keys(args, &username)))
        }
        Command::Device(DeviceCmd::Ssh(args)) => {
            init_tracing("warn", cli.log_format);
            match ssh::run(args) {
                Ok(code) => std::process::exit(code),
                Err(e) => Err(e),
            }
        }
        command => {
            init_tracing("warn", cli.log_format);
            current_thread().and_then(|rt| rt.block_on(run_command(command, out)))
        }
    });
    if let Err(e) = result {
        fail(json, e);
    }
}

/// Whether a command prints data (and so takes `--json`).
fn data_command(command: &Command) -> bool {
    matches!(
        command,
        Command::Login { .. }
            | Command::Logout(_)
            | Command::Whoami(_)
            | Command::User(_)
            | Command::ApiKey(_)
            | Command::Fleet(_)
            | Command::Fleets(_)
            | Command::Key(_)
            | Command::Device(DeviceCmd::Admin(_))
    )
}

/// Reports `e` on stderr (as `{"error":{"message":…}}` under `--json`) and exits 1.
fn fail(json: bool, e: anyhow::Error) -> ! {
    let message = describe(&e);
    if json {
        let body = serde_json::json!({ "error": { "message": message } });
        eprintln!("{body}");
    } else {
        eprintln!("error: {message}");
    }
    std::process::exit(1);
}

/// `outer: cause: …`, each cause once: errors that quote their source in their own
/// message would otherwise print it twice.
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

async fn run_command(command: Command, out: Output) -> Result<()> {
    match command {
        Command::Relay(_) | Command::Agent { .. } | Command::Device(DeviceCmd::Ssh(_)) => {
            unreachable!("handled in main")
        }
        Command::Migrate { database_url } => {
            cloudlink::store::migrate(&database_url)
                .await
                .context("migration failed")?;
            println!("migrations applied");
            Ok(())
        }
        Command::Login { args, .. } => login::login(args, out).await,
        Command::Logout(_) => login::logout(out),
        Command::Whoami(_) => login::whoami(out).await,
        Command::User(g) => admin::user(g.cmd, out).await,
        Command::ApiKey(g) => admin::api_key(g.cmd, out).await,
        Command::Fleet(g) => admin::fleet(g.cmd, out).await,
        Command::Fleets(_) => admin::fleet(admin::FleetCmd::List, out).await,
        Command::Device(DeviceCmd::Admin(cmd)) => admin::device(cmd, out).await,
        Command::Device(DeviceCmd::Tunnel { uuid, ports }) => tunnel::tunnel(&uuid, &ports).await,
        Command::Proxy {
            uuid,
            port,
            noproxy,
            report,
        } => tunnel::proxy(&uuid, port, noproxy, report.as_deref()).await,
        Command::Key(g) => admin::key(g.cmd, out).await,
        Command::Healthcheck(args) => healthcheck::run(args).await,
        Command::Completions { shell } => completions(shell),
        Command::Manpages { dir } => manpages(&dir),
        Command::Backup {
            file,
            database_url,
            data_dir,
        } => backup(&file, database_url, data_dir).await,
    }
}

fn run_relay(args: RelayArgs) -> Result<()> {
    let config = RelayConfig::load(&args)?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        runtime.worker_threads(config.worker_threads);
    }
    runtime
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(serve_relay(config))
}

async fn serve_relay(config: RelayConfig) -> Result<()> {
    cloudlink::tls_client::install_crypto();
    let relay = Relay::start(config).await?;
    if let Some(path) = &relay.admin_key_path {
        println!("bootstrap admin key written to {}", path.display());
    }
    let addrs = relay.addrs();
    tracing::info!(api = %addrs.api, api_tls = ?addrs.api_tls, proxy = %addrs.proxy, proxy_tls = ?addrs.proxy_tls, device = ?addrs.device, device_tcp = ?addrs.device_tcp, peer = ?addrs.peer, metrics = ?addrs.metrics, "relay listening");
    let optional = |name: &str, addr: Option<std::net::SocketAddr>| {
        addr.map(|a| format!(" {name}={a}")).unwrap_or_default()
    };
    println!(
        "relay listening: api={}{} proxy={}{}{}{}{}{}",
        addrs.api,
        optional("api_tls", addrs.api_tls),
        addrs.proxy,
        optional("proxy_tls", addrs.proxy_tls),
        optional("device", addrs.device),
        optional("device_tcp", addrs.device_tcp),
        optional("peer", addrs.peer),
        optional("metrics", addrs.metrics),
    );
    relay.run(shutdown_signal()).await?;
    Ok(())
}

async fn run_agent(args: AgentArgs) -> Result<()> {
    let config = AgentConfig::load(&args)?;
    cloudlink::tls_client::install_crypto();
    let stop = tokio_util::sync::CancellationToken::new();
    let trigger = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        trigger.cancel();
    });
    tracing::info!(uuid = %config.uuid, relays = ?config.relay, "agent starting");
    agent::run(config, stop).await?;
    Ok(())
}

async fn authorized_keys(args: AgentArgs, username: &str) -> Result<()> {
    let config = AgentConfig::load(&args)?;
    let keys = agent::authorized_keys::lookup(&config, username).await?;
    print!("{keys}");
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
            "`cloudlink backup` copies SQLite stores; back up Postgres with pg_dump (README, Operations)"
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

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the relay");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
