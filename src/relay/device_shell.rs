//! A shell on a device, for the browser terminal and the SSH gateway alike: one tunnel to
//! the device's SSH port through the one admission, a key minted for that login only and
//! offered to that device briefly (PROTOCOL.md §5), and one SSH client that logs in over
//! the tunnel and opens the session (a PTY or not, a shell or a command).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{ChannelReadHalf, ChannelWriteHalf, Pty};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::proto::SSH_PORT;
use crate::relay::proxy::admit::Ask;
use crate::relay::proxy::{self, InProcess, Refusal};
use crate::relay::registry::{Proof, TunnelEntry, TunnelKind};
use crate::relay::state::Shared;
use crate::store::{EphemeralKey, Id, Store, StoreError};

/// How long a minted key is offered to the device's lookup at most.
pub const KEY_WINDOW: Duration = Duration::from_secs(60);
/// The SSH handshake and login, from first byte to an open shell.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A key for one terminal session: the private half stays in this process.
pub struct SessionKey {
    /// The row the device's lookup reads.
    pub row: EphemeralKey,
    /// The private half.
    pub private: Arc<PrivateKey>,
}

impl SessionKey {
    /// Mints a fresh Ed25519 key for `login` on `device`, valid for [`KEY_WINDOW`] from
    /// `now` (milliseconds).
    pub fn mint(id: &str, device: &str, login: &str, user_id: Id, now: i64) -> SessionKey {
        let seed: [u8; 32] = rand::random();
        let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
        let private = PrivateKey::from(pair);
        let public_key = private.public_key().to_openssh().unwrap_or_default();
        SessionKey {
            row: EphemeralKey {
                id: id.to_owned(),
                device_uuid: device.to_owned(),
                login: login.to_owned(),
                user_id,
                public_key,
                expires_at: now + KEY_WINDOW.as_millis() as i64,
            },
            private: Arc::new(private),
        }
    }
}

/// Why no shell opened.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The device's sshd did not take the key (or asked for more than it).
    #[error("the device's SSH server refused the login as {0}")]
    Refused(String),
    /// SSH itself failed: the stream ended, a protocol error, no PTY or shell.
    #[error("SSH to the device failed: {0}")]
    Ssh(String),
    /// The handshake and login took longer than [`LOGIN_TIMEOUT`].
    #[error("the device's SSH server did not answer in time")]
    Timeout,
}

/// A terminal for the session, as the client asked for it.
#[derive(Debug, Clone)]
pub struct PtyRequest {
    /// `TERM`.
    pub term: String,
    /// Columns.
    pub cols: u32,
    /// Rows.
    pub rows: u32,
    /// The client's terminal modes, passed on.
    pub modes: Vec<(Pty, u32)>,
}

/// What is asked of the device's sshd.
pub struct ShellRequest<'a> {
    /// The account to log in as.
    pub login: &'a str,
    /// A command instead of a login shell (a service, a gateway `host <uuid> <command>`).
    pub command: Option<String>,
    /// A PTY, or none (piped input and output).
    pub pty: Option<PtyRequest>,
}

/// An open shell: its input, its output and status, and the connection that carries them.
pub struct Shell {
    /// Output, window changes, EOF.
    pub read: ChannelReadHalf,
    /// Input and window changes.
    pub write: ChannelWriteHalf<client::Msg>,
    /// Kept so that the connection lives as long as the shell.
    pub handle: Handle<AcceptDevice>,
}

/// Accepts the device's host key: the stream reached the device over its own
/// authenticated link (PROTOCOL.md §5), so only that device can answer on it.
pub struct AcceptDevice;

impl client::Handler for AcceptDevice {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// Logs in over `stream` with `key` and opens a session with a shell (or `command`), in a
/// PTY if asked. The key leaves the store as soon as authentication has ended, whichever
/// way it ended.
pub async fn login<S>(
    stream: S,
    key: &SessionKey,
    store: &dyn Store,
    request: ShellRequest<'_>,
) -> Result<Shell, LoginError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let login = request.login.to_owned();
    let config = Arc::new(client::Config {
        // The session's own keep-alive: a device that vanishes is noticed even while the
        // terminal is idle.
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_max: 3,
        ..Default::default()
    });
    let authenticate = async {
        let mut handle = client::connect_stream(config, stream, AcceptDevice)
            .await
            .map_err(|e| LoginError::Ssh(e.to_string()))?;
        let result = handle
            .authenticate_publickey(
                &login,
                PrivateKeyWithHashAlg::new(key.private.clone(), None),
            )
            .await;
        Ok::<_, LoginError>((handle, result))
    };
    let outcome = tokio::time::timeout(LOGIN_TIMEOUT, authenticate).await;
    // Authentication is over (or abandoned): the key's window closes now, not at expiry.
    if let Err(e) = store.remove_ephemeral_key(&key.row.id).await {
        tracing::warn!(error = %e, "cannot remove a terminal key; it expires by itself");
    }
    let (handle, result) = outcome.map_err(|_| LoginError::Timeout)??;
    match result {
        Ok(auth) if auth.success() => {}
        Ok(_) => return Err(LoginError::Refused(login)),
        Err(e) => return Err(LoginError::Ssh(e.to_string())),
    }
    let shell = async {
        let channel = handle.channel_open_session().await?;
        if let Some(pty) = &request.pty {
            channel
                .request_pty(false, &pty.term, pty.cols, pty.rows, 0, 0, &pty.modes)
                .await?;
        }
        match &request.command {
            Some(command) => channel.exec(false, command.as_bytes()).await?,
            None => channel.request_shell(false).await?,
        }
        Ok::<_, russh::Error>(channel)
    };
    let channel = tokio::time::timeout(LOGIN_TIMEOUT, shell)
        .await
        .map_err(|_| LoginError::Timeout)?
        .map_err(|e| LoginError::Ssh(e.to_string()))?;
    let (read, write) = channel.split();
    Ok(Shell {
        read,
        write,
        handle,
    })
}

/// Why no shell opened on the device.
pub enum OpenFailure {
    /// Admission refused the tunnel (credentials, reach, limits, the device's state).
    Refused(Refusal),
    /// The store could not keep the session's key.
    Store(StoreError),
    /// The tunnel ended before the login did (revocation, shutdown); its entry says why
    /// (none: it ended at once).
    Cut(Option<Arc<TunnelEntry>>),
    /// The device's sshd did not let the session in.
    Login(LoginError),
}

/// An open session on a device, with the tunnel under it.
pub struct Opened {
    /// The session.
    pub shell: Shell,
    /// The tunnel's registry entry: cancelled on revocation and shutdown, with a reason.
    pub entry: Arc<TunnelEntry>,
    /// The account logged in as.
    pub login: String,
    /// The user it was opened for.
    pub username: String,
}

/// Opens a session on `device` for `proof` (a browser's token, a gateway user's key):
/// a tunnel of `kind` to its SSH port through the one admission (credentials, reach,
/// limits, the route to whichever relay holds it, the audit row), a key minted for the
/// login (what the device announced, else the user's own name), then the login and a
/// session running `command` (else a shell), in `pty` if one is given.
pub async fn open(
    state: &Arc<Shared>,
    peer: SocketAddr,
    device: &str,
    proof: Proof,
    kind: TunnelKind,
    command: Option<String>,
    pty: Option<PtyRequest>,
) -> Result<Opened, OpenFailure> {
    let id = crate::auth::tokens::new_device_uuid();
    let ask = Ask {
        device: device.to_owned(),
        port: SSH_PORT,
        proof,
        version: "HTTP/1.1",
        user: crate::credit::UserQueue::IN_PROCESS,
        resumable: false,
    };
    let InProcess {
        stream,
        user_id,
        username,
        ssh_login,
    } = proxy::open_in_process(state, peer, ask, kind, &id)
        .await
        .map_err(OpenFailure::Refused)?;
    let store = state.store.as_ref();
    let login = ssh_login.unwrap_or_else(|| username.clone());
    let key = SessionKey::mint(&id, device, &login, user_id, crate::store::now_ms());
    store
        .add_ephemeral_key(&key.row)
        .await
        .map_err(OpenFailure::Store)?;
    let Some(entry) = state.registry.tunnel(&id) else {
        let _ = store.remove_ephemeral_key(&id).await;
        return Err(OpenFailure::Cut(None));
    };
    let request = ShellRequest {
        login: &login,
        command,
        pty,
    };
    let shell = tokio::select! {
        shell = self::login(stream, &key, store, request) => shell,
        _ = entry.cancel.cancelled() => {
            let _ = store.remove_ephemeral_key(&id).await;
            return Err(OpenFailure::Cut(Some(entry)));
        }
    };
    match shell {
        Ok(shell) => Ok(Opened {
            shell,
            entry,
            login,
            username,
        }),
        Err(e) => Err(OpenFailure::Login(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_minted_key_is_offered_for_its_device_and_login_for_sixty_seconds() {
        let dir = tempfile::tempdir().unwrap();
        let url = crate::store::sqlite::default_url(dir.path());
        let store = crate::store::open(&url).await.unwrap();
        let alice = store.create_user("alice", false).await.unwrap();
        let t0 = 1_000_000;
        let key = SessionKey::mint("s1", "dev1", "root", alice.id, t0);
        assert!(
            key.row.public_key.starts_with("ssh-ed25519 "),
            "{}",
            key.row.public_key
        );
        assert_eq!(key.row.expires_at - t0, 60_000);
        store.add_ephemeral_key(&key.row).await.unwrap();
        let offered = |device: &'static str, login: &'static str, at: i64| {
            let store = store.clone();
            async move { store.ephemeral_keys(device, login, at).await.unwrap().len() }
        };
        assert_eq!(offered("dev1", "root", t0).await, 1);
        assert_eq!(offered("dev1", "root", t0 + 59_999).await, 1);
        assert_eq!(
            offered("dev1", "root", t0 + 60_000).await,
            0,
            "the window has closed"
        );
        assert_eq!(offered("dev2", "root", t0).await, 0, "another device");
        assert_eq!(offered("dev1", "alice", t0).await, 0, "another login");
        // Two sessions never share a key.
        let other = SessionKey::mint("s2", "dev1", "root", alice.id, t0);
        assert_ne!(other.row.public_key, key.row.public_key);
        store.remove_ephemeral_key("s1").await.unwrap();
        assert_eq!(
            offered("dev1", "root", t0).await,
            0,
            "removed once authenticated"
        );
    }
}
