//! The SSH gateway (PROTOCOL.md §1c): plain OpenSSH and the balena CLI reach devices
//! through the relay.
//!
//! Users log in as their cloud username with one of their cloud SSH keys, public key only.
//! Two kinds of channel go on from there, both through the one admission under the key's
//! proof (the reach policy, the limits, revalidation: a deleted key, user or membership
//! cuts them; the audit row):
//! - `direct-tcpip` (ProxyJump, `ssh -J user@relay -p 22222 root@<uuid>.balena`): a device
//!   port, named as a CONNECT target names it, or by a short uuid or a device name; kind
//!   `jump`. The inner SSH session runs end to end between the user's ssh and the
//!   device's sshd; the relay carries ciphertext.
//! - a session with `host <device> [command…]` or `enter <device> <container>` (balena's
//!   gateway commands, [`session`]); kind `ssh-gateway`. The relay logs in to the device
//!   for the user, as the browser terminal does, and so sees the session in clear.

mod session;
mod target;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::{HashAlg, PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::proxy::{self, admit::Ask, Pending, Refusal};
use super::registry::{Proof, TunnelKind};
use super::state::Shared;
use target::{explain, resolve, LoggedIn};

/// How long a connection may take to authenticate, as sshd's `LoginGraceTime`.
pub const LOGIN_GRACE: Duration = Duration::from_secs(30);

/// The name of the gateway's host key among the store's shared secrets: generated once,
/// so every relay of a cluster presents the same one.
const HOST_KEY_SECRET: &str = "ssh-host-key";

/// The gateway's host key: the store's, or (first relay) a new Ed25519 key put there.
pub async fn host_key(store: &dyn crate::store::Store) -> Result<PrivateKey, String> {
    let seed: [u8; 32] = rand::random();
    let new = PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
        &seed,
    ));
    let candidate = new
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| format!("cannot make an SSH host key: {e}"))?
        .to_string();
    let stored = store
        .shared_secret(HOST_KEY_SECRET, &candidate)
        .await
        .map_err(|e| format!("cannot keep the SSH host key in the store: {e}"))?;
    PrivateKey::from_openssh(stored.as_bytes())
        .map_err(|e| format!("the store's SSH host key does not load: {e}"))
}

/// The server settings: publickey only, the host key, at most a few keys tried per
/// connection (as sshd's `MaxAuthTries`), a failed attempt answered after a pause.
pub fn server_config(key: PrivateKey) -> Arc<russh::server::Config> {
    Arc::new(russh::server::Config {
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        keys: vec![key],
        max_auth_attempts: 6,
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: None,
        nodelay: true,
        ..Default::default()
    })
}

/// Accepts gateway connections until the relay drains. Connections that have not
/// authenticated yet take the same places as unauthenticated CONNECTs (in total and per
/// source), so a flood of half-open SSH connections cannot starve the relay.
pub async fn run(listener: TcpListener, state: Arc<Shared>, config: Arc<russh::server::Config>) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "SSH gateway accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = state.draining.cancelled() => return,
        };
        let pending = match Pending::take(&state, peer.ip()) {
            Ok(pending) => pending,
            Err(refusal) => {
                tracing::info!(%peer, refusal = %refusal.message(), "SSH gateway connection refused");
                continue;
            }
        };
        let state = state.clone();
        let config = config.clone();
        tokio::spawn(async move { serve(stream, peer, state, config, pending).await });
    }
}

/// One connection: the SSH handshake and login within [`LOGIN_GRACE`], then its channels
/// until it closes. A connection that ends without logging in counts one failed attempt
/// for its address, however many keys it offered.
async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<Shared>,
    config: Arc<russh::server::Config>,
    pending: Pending,
) {
    let (logged_in, login) = oneshot::channel();
    let conn = Conn {
        state: state.clone(),
        peer,
        user: None,
        logged_in: Some(logged_in),
        pending: Some(pending),
    };
    let session = match russh::server::run_stream(config, stream, conn).await {
        Ok(session) => session,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "SSH handshake failed");
            state.auth_failed(Some(peer.ip()));
            return;
        }
    };
    let handle = session.handle();
    tokio::pin!(session);
    let in_time = tokio::select! {
        _ = &mut session => false,
        got = tokio::time::timeout(LOGIN_GRACE, login) => matches!(got, Ok(Ok(()))),
    };
    if !in_time {
        state.auth_failed(Some(peer.ip()));
        let _ = handle
            .disconnect(
                russh::Disconnect::NoMoreAuthMethodsAvailable,
                "not logged in".into(),
                String::new(),
            )
            .await;
        return;
    }
    if let Err(e) = session.await {
        tracing::debug!(%peer, error = %e, "SSH gateway session ended");
    }
}

/// One connection's handler.
struct Conn {
    state: Arc<Shared>,
    peer: SocketAddr,
    user: Option<LoggedIn>,
    logged_in: Option<oneshot::Sender<()>>,
    /// The unauthenticated connection's places, given back at login.
    pending: Option<Pending>,
}

impl Conn {
    /// The row of `key` among `username`'s cloud SSH keys, if it is one of them.
    async fn key_of(
        &self,
        username: &str,
        key: &PublicKey,
    ) -> Result<Option<LoggedIn>, russh::Error> {
        let store = self.state.store.as_ref();
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let found = async {
            let Some(user) = store.user_by_name(username).await? else {
                return Ok(None);
            };
            let keys = store.list_ssh_keys(user.id).await?;
            Ok::<_, crate::store::StoreError>(
                keys.into_iter()
                    .find(|k| k.fingerprint == fingerprint)
                    .map(|k| LoggedIn {
                        user: user.id,
                        key: k.id,
                        is_admin: user.is_admin,
                    }),
            )
        };
        match found.await {
            Ok(found) => Ok(found),
            Err(e) => {
                tracing::warn!(error = %e, "cannot check an SSH gateway login");
                Err(russh::Error::Disconnect)
            }
        }
    }
}

impl Conn {
    /// Refuses a key. Clients offer several keys in turn, so one refusal is not yet a
    /// failed attempt (that is counted once, for a connection that never logs in); but an
    /// address already throttled for failed attempts is disconnected at its first wrong
    /// key, so it cannot go on trying keys over many connections.
    fn rejected(&self) -> Result<Auth, russh::Error> {
        if self
            .state
            .auth_failures
            .retry_after(self.peer.ip())
            .is_some()
        {
            tracing::info!(peer = %self.peer, "SSH gateway: too many failed attempts from this address");
            return Err(russh::Error::Disconnect);
        }
        Ok(Auth::reject())
    }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        match self.key_of(user, offer.public_key).await? {
            Some(_) => Ok(Auth::Accept),
            None => self.rejected(),
        }
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let Some(found) = self.key_of(user, key.public_key).await? else {
            return self.rejected();
        };
        self.user = Some(found);
        self.pending = None;
        if let Some(tx) = self.logged_in.take() {
            let _ = tx.send(());
        }
        tracing::info!(peer = %self.peer, user = %crate::logsafe::Peer(user), "SSH gateway login");
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(who) = self.user else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        reply.accept().await;
        let state = self.state.clone();
        let peer = self.peer;
        let handle = session.handle();
        // The session's requests come to its channel; admission and the device's login
        // run in the session's own task, so this connection's other channels keep moving.
        tokio::spawn(session::run(state, peer, who, channel, handle));
        Ok(())
    }

    // A session's requests are answered here, where russh expects the answer; the
    // session's task reads the same requests from its channel.

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _cols: u32,
        _rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Accepted so that the session can say, on its stderr, what the gateway serves.
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // sftp and the rest run on the device: `sftp -J`.
        session.channel_failure(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(who) = self.user else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let target = format!("{host_to_connect}:{port_to_connect}");
        let state = self.state.clone();
        let peer = self.peer;
        // Admission and the device open wait on the store and the device: a task of their
        // own, so this connection's other channels keep moving meanwhile.
        tokio::spawn(async move { jump(state, peer, who, target, channel, reply).await });
        Ok(())
    }
}

/// One ProxyJump channel: admitted as a tunnel of kind `jump`, then joined to the device
/// until either side ends.
async fn jump(
    state: Arc<Shared>,
    peer: SocketAddr,
    who: LoggedIn,
    target: String,
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
) {
    let (host, port) = match target.rsplit_once(':') {
        Some((host, port)) => (host, port),
        None => (target.as_str(), ""),
    };
    let ask = match crate::proto::connect::parse_port(port) {
        Err(e) => Err(Refusal::BadRequest(e.to_string())),
        Ok(port) => match resolve(&state, who, host).await {
            Err(refusal) => Err(refusal),
            Ok(device) => Ok(Ask {
                device,
                port,
                proof: Proof::SshKey {
                    user: who.user,
                    key: who.key,
                },
                version: "HTTP/1.1",
                user: crate::credit::UserQueue::IN_PROCESS,
                resumable: false,
            }),
        },
    };
    let id = crate::auth::tokens::new_device_uuid();
    let device = ask
        .as_ref()
        .map(|ask| ask.device.clone())
        .unwrap_or_default();
    let opened = match ask {
        Ok(ask) => proxy::open_in_process(&state, peer, ask, TunnelKind::Jump, &id).await,
        Err(refusal) => Err(refusal),
    };
    let mut device = match opened {
        Ok(opened) => opened.stream,
        Err(refusal) => {
            let reason = explain(&state, &device, &refusal).await;
            tracing::info!(%peer, target = %crate::logsafe::Peer(&target), refusal = %reason, "ProxyJump refused");
            let code = match refusal {
                Refusal::TooMany(..) | Refusal::RelayBusy => ChannelOpenFailure::ResourceShortage,
                Refusal::DeviceOffline | Refusal::DeviceRefused(_) | Refusal::DeviceTimeout => {
                    ChannelOpenFailure::ConnectFailed
                }
                _ => ChannelOpenFailure::AdministrativelyProhibited,
            };
            reply
                .reject(ChannelOpenFailure::Other {
                    code: code.code(),
                    reason,
                })
                .await;
            return;
        }
    };
    reply.accept().await;
    let mut user = channel.into_stream();
    // The tunnel's own task counts the bytes, keeps the audit row and ends it on
    // revocation; here the two in-process ends are joined, FIN for FIN.
    let _ = tokio::io::copy_bidirectional(&mut user, &mut device).await;
}
