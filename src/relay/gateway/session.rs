//! `host` and `enter` sessions, as balena's SSH gateway serves them to the balena CLI:
//! `ssh user@gateway host <device> [command…]` opens a shell (or runs the command) on the
//! device's host OS, `enter <device> <container>` a shell in one of its containers. The
//! relay logs in to the device's sshd for the user over a tunnel of kind `ssh-gateway`
//! ([`device_shell::open`], the browser terminal's path) and carries the session: input,
//! output, stderr, window changes, signals and the exit status.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use russh::server::{Handle, Msg};
use russh::{Channel, ChannelMsg, ChannelWriteHalf};

use super::target::{explain, resolve, LoggedIn};
use crate::relay::device_shell::{self, OpenFailure, PtyRequest};
use crate::relay::registry::{Proof, TunnelEntry, TunnelKind};
use crate::relay::state::Shared;

/// What a session asks for, read from its `exec` request.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// A shell, or `command` verbatim, on the device's host OS.
    Host {
        /// The device as given: a uuid, a short uuid or a name.
        device: String,
        /// Everything after the device, as sent.
        command: Option<String>,
    },
    /// A shell in a container on the device.
    Enter {
        /// The device as given.
        device: String,
        /// The container's id or name, validated.
        container: String,
    },
}

/// What the gateway says to a session it cannot serve.
pub const USAGE: &str = "usage: host <device> [command...] | enter <device> <container>";

/// How long a session channel may wait before it says what it wants.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// After the user's side has closed, how long the device's side has to finish.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Whether `id` may name a container: a hex id of 12 to 64 digits, or a name of 1 to
/// 128 of `A-Za-z0-9_.-` starting with a letter or digit. It goes into a command line on
/// the device.
pub fn is_valid_container(id: &str) -> bool {
    let b = id.as_bytes();
    (1..=128).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Reads an `exec` request: `host <device> [command…]` (the command passed on exactly as
/// sent) or `enter <device> <container>`.
pub fn parse(request: &[u8]) -> Result<Command, String> {
    let text = std::str::from_utf8(request).map_err(|_| USAGE.to_owned())?;
    let (verb, rest) = word(text);
    let (device, rest) = word(rest);
    if device.is_empty() {
        return Err(USAGE.to_owned());
    }
    let device = device.to_owned();
    match verb {
        "host" => {
            let command = rest.trim_start();
            Ok(Command::Host {
                device,
                command: (!command.trim().is_empty()).then(|| command.to_owned()),
            })
        }
        "enter" => {
            let (container, rest) = word(rest);
            if container.is_empty() || !rest.trim().is_empty() {
                return Err(USAGE.to_owned());
            }
            if !is_valid_container(container) {
                return Err(format!("{container:?} is not a container id or name"));
            }
            Ok(Command::Enter {
                device,
                container: container.to_owned(),
            })
        }
        _ => Err(USAGE.to_owned()),
    }
}

/// The first whitespace-separated word of `s`, and what follows it.
fn word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    }
}

/// The command that enters `container` through the device's engine (balenaOS's
/// `balena-engine`, else `balena` or `docker`), with a TTY when the session has one, in
/// bash where the container has it.
pub fn enter_command(container: &str, tty: bool) -> String {
    let t = if tty { " -t" } else { "" };
    format!(
        "sh -c 'e=$(command -v balena-engine || command -v balena || command -v docker) || \
         {{ echo \"no container engine on this device\" >&2; exit 127; }}; \
         exec \"$e\" exec -i{t} {container} /bin/sh -c \
         \"if [ -e /bin/bash ]; then exec /bin/bash; else exec /bin/sh; fi\"'"
    )
}

/// One session channel, from its requests to its close.
pub async fn run(
    state: Arc<Shared>,
    peer: SocketAddr,
    who: LoggedIn,
    mut channel: Channel<Msg>,
    handle: Handle,
) {
    // The requests before the command: a PTY (and its size changing meanwhile), then
    // `exec` or `shell`.
    let mut pty: Option<PtyRequest> = None;
    let asked = tokio::time::timeout(REQUEST_TIMEOUT, async {
        loop {
            match channel.wait().await {
                Some(ChannelMsg::RequestPty {
                    term,
                    col_width,
                    row_height,
                    terminal_modes,
                    ..
                }) => {
                    pty = Some(PtyRequest {
                        term,
                        cols: col_width,
                        rows: row_height,
                        modes: terminal_modes,
                    })
                }
                Some(ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    ..
                }) => {
                    if let Some(pty) = &mut pty {
                        pty.cols = col_width;
                        pty.rows = row_height;
                    }
                }
                Some(ChannelMsg::Exec { command, .. }) => return Some(parse(&command)),
                Some(ChannelMsg::RequestShell { .. }) => return Some(Err(USAGE.to_owned())),
                Some(ChannelMsg::Close) | None => return None,
                Some(_) => {}
            }
        }
    })
    .await;
    let (read, write) = channel.split();
    let command = match asked {
        Ok(Some(Ok(command))) => command,
        Ok(Some(Err(message))) => return refuse(&write, &message, 2).await,
        Ok(None) => return,
        Err(_) => return refuse(&write, "no command arrived in time", 2).await,
    };
    let (target, device_command) = match &command {
        Command::Host { device, command } => (device, command.clone()),
        Command::Enter { device, container } => {
            (device, Some(enter_command(container, pty.is_some())))
        }
    };
    let uuid = match resolve(&state, who, target).await {
        Ok(uuid) => uuid,
        Err(refusal) => return refuse(&write, &refusal.message(), 1).await,
    };
    let proof = Proof::SshKey {
        user: who.user,
        key: who.key,
    };
    let kind = TunnelKind::Gateway;
    let opened = device_shell::open(&state, peer, &uuid, proof, kind, device_command, pty).await;
    let opened = match opened {
        Ok(opened) => opened,
        Err(failure) => {
            let message = match failure {
                OpenFailure::Refused(r) => explain(&state, &uuid, &r).await,
                OpenFailure::Store(e) => {
                    tracing::warn!(error = %e, "gateway: cannot keep a session key");
                    "The relay's store is unavailable; try again shortly.".into()
                }
                OpenFailure::Cut(Some(entry)) => cut(&entry),
                OpenFailure::Cut(None) => "The tunnel to the device ended at once.".into(),
                OpenFailure::Login(e) => format!("{e}."),
            };
            tracing::info!(%peer, device = %uuid, "gateway session refused: {message}");
            return refuse(&write, &message, 1).await;
        }
    };
    tracing::info!(%peer, tunnel = %opened.entry.id, user = %opened.username, device = %uuid,
        login = %opened.login, ?command, "gateway session started");
    let device_shell::Opened { shell, entry, .. } = opened;
    let id = write.id();
    let cut_short = {
        let mut up = Box::pin(user_to_device(read, &shell.write));
        let mut down = Box::pin(device_to_user(shell.read, &write, &handle, id));
        tokio::select! {
            _ = &mut down => false,
            _ = &mut up => {
                // The user closed the channel; the device closes its side in turn.
                tokio::select! {
                    _ = tokio::time::timeout(CLOSE_GRACE, &mut down) => false,
                    _ = entry.cancel.cancelled() => true,
                }
            }
            _ = entry.cancel.cancelled() => true,
        }
    };
    let _ = shell.write.close().await;
    if cut_short || entry.cancel.is_cancelled() {
        refuse(&write, &cut(&entry), 255).await;
    } else {
        let _ = write.eof().await;
        let _ = write.close().await;
    }
}

/// The user's input, window changes and signals, to the device, until the user closes.
async fn user_to_device(
    mut from: russh::ChannelReadHalf,
    to: &ChannelWriteHalf<russh::client::Msg>,
) {
    while let Some(msg) = from.wait().await {
        let sent = match msg {
            ChannelMsg::Data { data } => to.data(&data[..]).await,
            ChannelMsg::Eof => to.eof().await,
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            } => {
                to.window_change(col_width, row_height, pix_width, pix_height)
                    .await
            }
            ChannelMsg::Signal { signal } => to.signal(signal).await,
            ChannelMsg::Close => return,
            _ => Ok(()),
        };
        if sent.is_err() {
            return;
        }
    }
}

/// The device's output, stderr, exit status or signal, and EOF, to the user, until the
/// device closes.
async fn device_to_user(
    mut from: russh::ChannelReadHalf,
    to: &ChannelWriteHalf<Msg>,
    handle: &Handle,
    id: russh::ChannelId,
) {
    while let Some(msg) = from.wait().await {
        let sent = match msg {
            ChannelMsg::Data { data } => to.data(&data[..]).await.is_ok(),
            ChannelMsg::ExtendedData { data, ext } => {
                to.extended_data(ext, &data[..]).await.is_ok()
            }
            ChannelMsg::ExitStatus { exit_status } => to.exit_status(exit_status).await.is_ok(),
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => handle
                .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                .await
                .is_ok(),
            ChannelMsg::Eof => to.eof().await.is_ok(),
            ChannelMsg::Close => return,
            _ => true,
        };
        if !sent {
            return;
        }
    }
}

/// Ends a session that cannot go on: one line on its stderr, an exit status, the close.
async fn refuse(to: &ChannelWriteHalf<Msg>, message: &str, status: u32) {
    let line = format!("cloudlink: {message}\r\n");
    let _ = to.extended_data(1, line.as_bytes()).await;
    let _ = to.exit_status(status).await;
    let _ = to.eof().await;
    let _ = to.close().await;
}

/// Why a session's tunnel was cut, as its user is told.
fn cut(entry: &TunnelEntry) -> String {
    match entry.reason.get().copied() {
        Some("revoked") => "Your access to this device has ended.".into(),
        Some("shutdown") => "The relay is shutting down; connect again.".into(),
        Some(other) => format!("The tunnel to the device ended ({other})."),
        None => "The tunnel to the device ended.".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_passes_the_command_on_verbatim() {
        assert_eq!(
            parse(b"host abc1234").unwrap(),
            Command::Host {
                device: "abc1234".into(),
                command: None
            }
        );
        // What the balena CLI sends to find a service's container.
        let balena = r#"host 0123456789abcdef0123456789abcdef "$(if [ -f /usr/bin/balena ]; then echo "balena"; else echo "docker"; fi)" ps --format "{{.ID}} {{.Names}}""#;
        match parse(balena.as_bytes()).unwrap() {
            Command::Host { device, command } => {
                assert_eq!(device, "0123456789abcdef0123456789abcdef");
                assert_eq!(
                    command.unwrap(),
                    &balena["host 0123456789abcdef0123456789abcdef ".len()..]
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse(b"host  dev   echo  a   b").unwrap(),
            Command::Host {
                device: "dev".into(),
                command: Some("echo  a   b".into())
            }
        );
    }

    #[test]
    fn enter_takes_one_valid_container() {
        assert_eq!(
            parse(b"enter dev c0ffee123456").unwrap(),
            Command::Enter {
                device: "dev".into(),
                container: "c0ffee123456".into()
            }
        );
        for bad in [
            &b"enter dev"[..],
            b"enter dev a b",
            b"enter dev $(id)",
            b"enter dev a;id",
            b"enter dev -it",
            b"enter",
            b"host",
            b"exec dev",
            b"",
            b"\xff\xfe",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(is_valid_container(&"a".repeat(128)));
        assert!(!is_valid_container(&"a".repeat(129)));
    }

    #[test]
    fn the_enter_command_asks_for_a_tty_only_with_a_pty() {
        assert!(enter_command("c0ffee", true).contains("exec -i -t c0ffee "));
        assert!(enter_command("c0ffee", false).contains("exec -i c0ffee "));
    }
}
