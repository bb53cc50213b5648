//! The browser terminal's session over its WebSocket (PROTOCOL.md §5; the upgrade is
//! `api/terminal.rs`).
//!
//! The browser proves who it is in its first message; the relay admits a tunnel to the
//! device's port 22222 through the one admission CONNECT uses (so credentials, limits,
//! revocation, cluster forwarding and the audit row are the CLI's), logs in to the
//! device's sshd with a key minted for the session, and carries terminal bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use serde::{Deserialize, Serialize};

use crate::relay::device_shell::{self as ssh, LoginError, OpenFailure, Opened, PtyRequest};
use crate::relay::proxy::Refusal;
use crate::relay::registry::{Proof, TunnelEntry, TunnelKind};
use crate::relay::state::Shared;

/// How long the browser has to send its first message.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the relay pings an idle browser (keeps proxies in between from cutting it).
const PING_EVERY: Duration = Duration::from_secs(30);
/// The largest message the browser may send (a paste).
pub const MAX_MESSAGE: usize = 1024 * 1024;

/// Whether `name` may be a service name: 1 to 63 of `A-Za-z0-9_.-`, starting with a
/// letter or digit. It goes into a command line on the device.
pub fn is_valid_service(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=63).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Messages from the browser.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum FromBrowser {
    Auth {
        token: String,
        #[serde(default = "default_cols")]
        cols: u32,
        #[serde(default = "default_rows")]
        rows: u32,
    },
    Resize {
        cols: u32,
        rows: u32,
    },
    #[serde(other)]
    Unknown,
}

fn default_cols() -> u32 {
    80
}

fn default_rows() -> u32 {
    24
}

/// Control messages to the browser.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ToBrowser<'a> {
    Started {
        login: &'a str,
    },
    Exit {
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
    },
    Error {
        code: &'static str,
        message: String,
    },
}

/// Why a session could not start or was ended, as the browser is told.
struct Failure {
    code: &'static str,
    message: String,
}

fn fail(code: &'static str, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// One terminal session, from the first message to the close.
pub async fn session(
    mut socket: WebSocket,
    state: Arc<Shared>,
    uuid: String,
    service: Option<String>,
    peer: SocketAddr,
) {
    let outcome = match start(&mut socket, &state, &uuid, service.as_deref(), peer).await {
        Ok((shell, entry)) => run(&mut socket, &state, shell, &entry).await,
        Err(failure) => Err(failure),
    };
    let close = match outcome {
        Ok(exit) => {
            let _ = send_json(&mut socket, &exit).await;
            CloseFrame {
                code: axum::extract::ws::close_code::NORMAL,
                reason: "exit".into(),
            }
        }
        Err(f) => {
            tracing::info!(device = %uuid, code = f.code, "terminal ended: {}", f.message);
            let _ = send_json(
                &mut socket,
                &ToBrowser::Error {
                    code: f.code,
                    message: f.message,
                },
            )
            .await;
            CloseFrame {
                code: axum::extract::ws::close_code::POLICY,
                reason: f.code.into(),
            }
        }
    };
    let _ = socket.send(Message::Close(Some(close))).await;
}

/// Authenticates the first message, checks reach, opens the tunnel and logs in.
async fn start(
    socket: &mut WebSocket,
    state: &Arc<Shared>,
    uuid: &str,
    service: Option<&str>,
    peer: SocketAddr,
) -> Result<(ssh::Shell, Arc<TunnelEntry>), Failure> {
    let (token, cols, rows) = match tokio::time::timeout(AUTH_TIMEOUT, socket.recv()).await {
        Err(_) => return Err(fail("bad_request", "No authentication arrived in time.")),
        Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str(text.as_str()) {
            Ok(FromBrowser::Auth { token, cols, rows }) => (token, cols, rows),
            _ => {
                return Err(fail(
                    "bad_request",
                    "The first message must be {\"type\":\"auth\",\"token\":…}.",
                ))
            }
        },
        Ok(_) => return Err(fail("bad_request", "The first message must be text.")),
    };
    let (cols, rows) = (cols.clamp(1, 1000), rows.clamp(1, 1000));
    // A token is printable ASCII; anything else never authenticates (and is not counted
    // as a failed attempt, as before).
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(fail(
            "unauthorized",
            "A valid API key or token is required.",
        ));
    }
    // One admission for the terminal, the gateway and CONNECT alike: credentials
    // (failures throttled per address), reach to the device's SSH port, limits, and the
    // route (this relay or the one that holds the device); then the session's own key.
    let command = service.map(|s| state.config.service_command.replace("{service}", s));
    let pty = PtyRequest {
        term: "xterm-256color".into(),
        cols,
        rows,
        modes: Vec::new(),
    };
    let opened = ssh::open(
        state,
        peer,
        uuid,
        Proof::Token(token),
        TunnelKind::Terminal,
        command,
        Some(pty),
    )
    .await
    .map_err(|failure| match failure {
        OpenFailure::Refused(r) => refused(&r),
        OpenFailure::Store(e) => unavailable(e),
        OpenFailure::Cut(Some(entry)) => cut(&entry),
        OpenFailure::Cut(None) => fail("ended", "The tunnel to the device ended at once."),
        OpenFailure::Login(e @ LoginError::Timeout) => fail("timeout", format!("{e}.")),
        OpenFailure::Login(e) => fail("refused", format!("{e}.")),
    })?;
    let Opened {
        shell,
        entry,
        login,
        username,
    } = opened;
    tracing::info!(tunnel = %entry.id, user = %username, device = %uuid, %login, service = ?service, "terminal started");
    send_json(socket, &ToBrowser::Started { login: &login })
        .await
        .map_err(|_| fail("ended", "The browser left."))?;
    Ok((shell, entry))
}

fn unavailable(e: crate::store::StoreError) -> Failure {
    tracing::warn!(error = %e, "terminal: store unavailable");
    fail(
        "unavailable",
        "The relay's store is unavailable; try again shortly.",
    )
}

/// A refused admission, as the browser is told.
fn refused(refusal: &Refusal) -> Failure {
    match refusal {
        Refusal::AuthRequired => fail("unauthorized", "A valid API key or token is required."),
        Refusal::Forbidden => fail("forbidden", "You may not open a terminal on that device."),
        Refusal::TooMany(secs, what) if *what == "failed attempts" => fail(
            "too_many_requests",
            format!("Too many failed attempts; try again in {secs} seconds."),
        ),
        Refusal::StoreUnavailable => fail(
            "unavailable",
            "The relay's store is unavailable; try again shortly.",
        ),
        Refusal::RelayBusy => fail("unavailable", refusal.message()),
        other => {
            let code = match other.status().0 {
                400 => "bad_request",
                403 => "forbidden",
                407 => "unauthorized",
                429 => "too_many_requests",
                502 => "refused",
                503 => "offline",
                504 => "timeout",
                _ => "ended",
            };
            fail(code, other.message())
        }
    }
}

/// Why a tunnel's entry was cancelled, as the browser is told.
fn cut(entry: &TunnelEntry) -> Failure {
    match entry.reason.get().copied() {
        Some("revoked") => fail("revoked", "Your access to this device has ended."),
        Some("shutdown") => fail(
            "ended",
            "The relay is shutting down; open the terminal again.",
        ),
        Some(other) => fail(
            "ended",
            format!("The tunnel to the device ended ({other})."),
        ),
        None => fail("ended", "The tunnel to the device ended."),
    }
}

/// Carries bytes both ways until the shell exits, the browser leaves, or the tunnel is
/// cut; returns the exit message for the browser.
async fn run(
    socket: &mut WebSocket,
    state: &Shared,
    mut shell: ssh::Shell,
    entry: &TunnelEntry,
) -> Result<ToBrowser<'static>, Failure> {
    use russh::ChannelMsg;
    let mut status = None;
    let mut signal = None;
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.reset();
    loop {
        tokio::select! {
            msg = shell.read.wait() => match msg {
                Some(ChannelMsg::Data { data }) | Some(ChannelMsg::ExtendedData { data, .. }) => {
                    if socket.send(Message::Binary(data.to_vec().into())).await.is_err() {
                        return Err(fail("ended", "The browser left."));
                    }
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status),
                Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                    signal = Some(format!("{signal_name:?}"));
                }
                Some(ChannelMsg::Close) | None => break,
                Some(_) => {}
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(bytes))) => {
                    if shell.write.data(&bytes[..]).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Text(text))) => match serde_json::from_str(text.as_str()) {
                    Ok(FromBrowser::Resize { cols, rows }) => {
                        let (cols, rows) = (cols.clamp(1, 1000), rows.clamp(1, 1000));
                        let _ = shell.write.window_change(cols, rows, 0, 0).await;
                    }
                    Ok(_) => {}
                    Err(_) => return Err(fail("bad_request", "A text message was not JSON.")),
                },
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    let _ = shell.write.close().await;
                    return Err(fail("ended", "The browser closed the terminal."));
                }
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => {
                let _ = socket.send(Message::Ping(Vec::new().into())).await;
            }
            _ = entry.cancel.cancelled() => return Err(cut(entry)),
            _ = state.shutdown.cancelled() => {
                return Err(fail("ended", "The relay is shutting down; open the terminal again."));
            }
        }
    }
    if entry.cancel.is_cancelled() {
        return Err(cut(entry));
    }
    match (status, signal) {
        (None, None) => Err(fail("ended", "The session ended without an exit status.")),
        (status, signal) => Ok(ToBrowser::Exit { status, signal }),
    }
}

async fn send_json<T: Serialize>(socket: &mut WebSocket, msg: &T) -> Result<(), axum::Error> {
    let text = serde_json::to_string(msg).unwrap_or_default();
    socket.send(Message::Text(text.into())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        for ok in ["main", "my-app_2", "a.b", &"x".repeat(63)] {
            assert!(is_valid_service(ok), "{ok}");
        }
        for bad in [
            "",
            "-x",
            ".x",
            "a b",
            "a;id",
            "$(id)",
            "a/b",
            &"x".repeat(64),
        ] {
            assert!(!is_valid_service(bad), "{bad}");
        }
    }
}
