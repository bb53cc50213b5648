//! One service's TCP listeners (plain, and TLS with its acceptor) and a capped accept loop
//! over both, shared by the API and the CONNECT proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// A service's listeners: always a plain one, and a TLS one when enabled.
pub struct Listeners {
    /// Plain TCP.
    pub plain: TcpListener,
    /// TLS over TCP, with the acceptor that does the handshake.
    pub tls: Option<(TcpListener, TlsAcceptor)>,
}

/// An accepted connection and its place under the cap.
pub struct Accepted {
    /// The socket.
    pub stream: TcpStream,
    /// Who connected.
    pub peer: SocketAddr,
    /// `Some` when it came to the TLS listener: the handshake is the caller's to do.
    pub tls: Option<TlsAcceptor>,
    /// Its place under the cap; dropping it frees the place.
    pub permit: OwnedSemaphorePermit,
}

impl Listeners {
    /// Where the plain and TLS listeners are bound.
    pub fn addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        (
            self.plain.local_addr().ok(),
            self.tls.as_ref().and_then(|(l, _)| l.local_addr().ok()),
        )
    }

    /// Waits for a free place under `cap`, then for a connection on either listener;
    /// `None` once `shutdown` fires.
    ///
    /// The place is taken *before* accepting (as mini-redis does): at the cap, nothing is
    /// accepted and new connections wait in the kernel's backlog instead of taking file
    /// descriptors. One loop serves both listeners so that waiting holds no place idle.
    pub async fn next(
        &self,
        cap: &Arc<Semaphore>,
        shutdown: &CancellationToken,
    ) -> Option<Accepted> {
        loop {
            let permit = tokio::select! {
                permit = cap.clone().acquire_owned() => permit.ok()?,
                _ = shutdown.cancelled() => return None,
            };
            let accepted = tokio::select! {
                r = self.plain.accept() => r.map(|(s, p)| (s, p, None)),
                r = accept_tls(&self.tls) => r,
                _ = shutdown.cancelled() => return None,
            };
            match accepted {
                Ok((stream, peer, tls)) => {
                    let _ = stream.set_nodelay(true);
                    return Some(Accepted {
                        stream,
                        peer,
                        tls,
                        permit,
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Accepts on the TLS listener, or never when there is none.
async fn accept_tls(
    tls: &Option<(TcpListener, TlsAcceptor)>,
) -> std::io::Result<(TcpStream, SocketAddr, Option<TlsAcceptor>)> {
    match tls {
        Some((listener, acceptor)) => listener
            .accept()
            .await
            .map(|(s, p)| (s, p, Some(acceptor.clone()))),
        None => std::future::pending().await,
    }
}
