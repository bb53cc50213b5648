//! `cloudlink`: argument parsing and dispatch; the work is in the library.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use cloudlink::agent::{self, AgentArgs, AgentConfig};
use cloudlink::healthcheck;

#[cfg(feature = "relay")]
mod commands;

/// Reach the devices of your fleets through a relay: SSH, tunnels, admin.
#[derive(Parser)]
#[command(name = "cloudlink", version, about, propagate_version = true)]
struct Cli {
    /// Before the subcommand, as older versions took it; commands that print data take
    /// `--json` themselves.
    #[cfg(feature = "relay")]
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
    #[cfg(feature = "relay")]
    #[arg(long, global = true, env = "CLOUDLINK_PROFILE")]
    profile: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[cfg(feature = "relay")]
    #[command(flatten)]
    Full(commands::FullCommand),
    /// Run the device agent (dials the relay, serves tunnels).
    Agent {
        #[command(flatten)]
        args: Box<AgentArgs>,
        #[command(subcommand)]
        command: Option<AgentCmd>,
    },
    /// Exit 0 if the relay or agent running here is healthy (a container's HEALTHCHECK).
    Healthcheck(healthcheck::HealthArgs),
}

/// How log lines are written.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, span fields (tunnel id, user, device) included.
    Json,
}

#[derive(Subcommand)]
enum AgentCmd {
    /// Print a cloud user's SSH keys for this device (sshd's AuthorizedKeysCommand).
    AuthorizedKeys {
        /// The login name sshd asks about (%u).
        username: String,
    },
}

/// Logs to stderr at `RUST_LOG`'s levels (`info`, `cloudlink=debug,sqlx=warn`: per-target
/// levels; no span or field filters, which would bring a regex engine to every device),
/// else at `default`.
fn init_tracing(default: &str, format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let default: Targets = default.parse().unwrap_or_default();
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) => value.parse().unwrap_or_else(|e| {
            let warning =
                format!("RUST_LOG={value:?} ignored ({e}); logging at the default levels");
            match format {
                LogFormat::Text => eprintln!("warning: {warning}"),
                LogFormat::Json => eprintln!("{}", json_line("WARN", &warning, &[])),
            }
            default
        }),
        Err(_) => default,
    };
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry();
    match format {
        LogFormat::Text => registry
            .with(layer.with_ansi(
                std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
            ))
            .with(filter)
            .init(),
        LogFormat::Json => registry
            .with(layer.json().with_current_span(true).with_span_list(true))
            .with(filter)
            .init(),
    }
}

/// One line in the shape of the JSON log lines (`timestamp`, `level`, `fields` with the
/// `message`, `target`), for what is written outside the logger under `--log-format json`:
/// the relay's announcements on stdout, the error a command exits with.
pub(crate) fn json_line(level: &str, message: &str, fields: &[(&str, String)]) -> String {
    use tracing_subscriber::fmt::{format::Writer, time::FormatTime};
    let mut timestamp = String::new();
    let _ = tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut timestamp));
    let mut all = serde_json::Map::new();
    all.insert("message".into(), message.into());
    for (key, value) in fields {
        all.insert((*key).into(), value.as_str().into());
    }
    serde_json::json!({
        "timestamp": timestamp,
        "level": level,
        "fields": all,
        "target": "cloudlink",
    })
    .to_string()
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
    #[cfg(feature = "relay")]
    if cli.json && !matches!(cli.command, Command::Full(_)) {
        fail(
            Errors::Json,
            anyhow::anyhow!("--json applies to commands that print data (lists, show, whoami …)"),
        );
    }
    let result = match cli.command {
        #[cfg(feature = "relay")]
        Command::Full(command) => commands::run(command, cli.json, cli.profile, cli.log_format),
        Command::Agent {
            args,
            command: None,
        } => {
            init_tracing("info", cli.log_format);
            current_thread().and_then(|rt| rt.block_on(run_agent(*args)))
        }
        Command::Agent {
            args,
            command: Some(AgentCmd::AuthorizedKeys { username }),
        } => {
            init_tracing("warn", cli.log_format);
            current_thread().and_then(|rt| rt.block_on(authorized_keys(*args, &username)))
        }
        Command::Healthcheck(args) => {
            init_tracing("warn", cli.log_format);
            current_thread().and_then(|rt| rt.block_on(healthcheck::run(args)))
        }
    };
    if let Err(e) = result {
        fail(Errors::from(cli.log_format), e);
    }
}

/// How a command's final error is written.
#[derive(Clone, Copy)]
pub(crate) enum Errors {
    /// `error: …`.
    Text,
    /// `{"error":{"message":…}}`: a data command's `--json` output.
    #[cfg_attr(not(feature = "relay"), allow(dead_code))]
    Json,
    /// A log line like the others under `--log-format json`.
    LogLine,
}

impl From<LogFormat> for Errors {
    fn from(format: LogFormat) -> Errors {
        match format {
            LogFormat::Text => Errors::Text,
            LogFormat::Json => Errors::LogLine,
        }
    }
}

/// Reports `e` on stderr as `how` says and exits 1.
fn fail(how: Errors, e: anyhow::Error) -> ! {
    // Each cause once: errors that quote their source would otherwise print it twice.
    let message = cloudlink::tls_client::chain(e.as_ref());
    match how {
        Errors::Text => eprintln!("error: {message}"),
        Errors::Json => {
            let body = serde_json::json!({ "error": { "message": message } });
            eprintln!("{body}");
        }
        Errors::LogLine => eprintln!("{}", json_line("ERROR", &message, &[])),
    }
    std::process::exit(1);
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
