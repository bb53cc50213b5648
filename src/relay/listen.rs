//! The relay's TCP listeners: each service's plain and TLS sources with a capped accept
//! loop (shared by the API, the CONNECT proxy and the TLS/TCP device link), the ALPN
//! router for services that share one TLS address (everything on 443), and the sockets
//! systemd hands over (socket activation, so that an unprivileged relay serves 22 and 443).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{LazyConfigAcceptor, StartHandshake, TlsAcceptor};
use tokio_util::sync::CancellationToken;

/// Listening TCP sockets handed over by systemd's socket activation (sd_listen_fds(3):
/// `LISTEN_FDS` sockets from fd 3, for the process `LISTEN_PID` names), until a listener
/// configured for the same address takes one. With none, every listener binds its
/// address itself.
static INHERITED: std::sync::OnceLock<std::sync::Mutex<Vec<std::net::TcpListener>>> =
    std::sync::OnceLock::new();

/// Takes the sockets systemd passed, once. Call it before the runtime starts: reading
/// them removes `LISTEN_FDS` and `LISTEN_PID` from the environment, which must not happen
/// while other threads may read it.
pub fn adopt_inherited() {
    inherited();
}

fn inherited() -> &'static std::sync::Mutex<Vec<std::net::TcpListener>> {
    INHERITED.get_or_init(|| {
        let mut fds = listenfd::ListenFd::from_env();
        let mut sockets = Vec::new();
        for i in 0..fds.len() {
            match fds.take_tcp_listener(i) {
                Ok(Some(socket)) => {
                    if let Ok(addr) = socket.local_addr() {
                        tracing::info!(%addr, "a listening socket from the service manager");
                    }
                    sockets.push(socket);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, fd = i + 3, "the service manager passed a socket that is not a TCP listener"),
            }
        }
        std::sync::Mutex::new(sockets)
    })
}

/// Binds `addr`, or takes the socket systemd passed for exactly that address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let handed = {
        let mut sockets = inherited().lock().unwrap_or_else(|e| e.into_inner());
        let at = sockets
            .iter()
            .position(|s| s.local_addr().is_ok_and(|a| a == addr));
        at.map(|at| sockets.remove(at))
    };
    match handed {
        Some(socket) => {
            socket.set_nonblocking(true)?;
            TcpListener::from_std(socket)
        }
        None => TcpListener::bind(addr).await,
    }
}

/// Says which sockets systemd passed that no listener took (a unit and a configuration
/// that disagree), and closes them.
pub fn unclaimed_inherited() {
    let mut sockets = inherited().lock().unwrap_or_else(|e| e.into_inner());
    for socket in sockets.drain(..) {
        if let Ok(addr) = socket.local_addr() {
            tracing::warn!(%addr, "the service manager passed a socket for an address no listener is configured for; closed");
        }
    }
}

/// A service that takes TLS connections over TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// The REST API (HTTPS).
    Api,
    /// The CONNECT proxy over TLS.
    Proxy,
    /// The TLS/TCP device link.
    Device,
}

impl Service {
    /// For bind errors and logs.
    pub fn what(self) -> &'static str {
        match self {
            Service::Api => "the API over TLS",
            Service::Proxy => "CONNECT over TLS",
            Service::Device => "devices (TCP)",
        }
    }
}

/// A connection the router read the ClientHello of, and who made it.
type Routed = (Box<StartHandshake<TcpStream>>, SocketAddr);

/// Where a service's TLS connections come from.
pub enum TlsSource {
    /// Its own listener.
    Own(TcpListener, TlsAcceptor),
    /// A listener shared with other services: the [`Router`] reads each ClientHello and
    /// hands over the connections whose ALPN names this service.
    Routed {
        /// Connections for this service.
        rx: tokio::sync::Mutex<mpsc::Receiver<Routed>>,
        /// This service's TLS settings, to finish the handshake with.
        config: Arc<rustls::ServerConfig>,
        /// The shared listener's address.
        addr: SocketAddr,
    },
}

/// A service's listeners: a plain one, a TLS source, or both.
pub struct Listeners {
    /// Plain TCP.
    pub plain: Option<TcpListener>,
    /// TLS over TCP.
    pub tls: Option<TlsSource>,
}

/// A TLS connection whose handshake is the receiver's to finish (in its own task, under
/// its own timeout).
pub enum PendingTls {
    /// Nothing read yet.
    Fresh(TcpStream, TlsAcceptor),
    /// The router has read the ClientHello (boxed: it holds the hello's buffers).
    Started(Box<StartHandshake<TcpStream>>, Arc<rustls::ServerConfig>),
}

impl PendingTls {
    /// Finishes the handshake.
    pub async fn finish(self) -> std::io::Result<TlsStream<TcpStream>> {
        match self {
            PendingTls::Fresh(stream, acceptor) => acceptor.accept(stream).await,
            PendingTls::Started(start, config) => start.into_stream(config).await,
        }
    }
}

/// An accepted connection.
pub enum Conn {
    /// From the plain listener.
    Plain(TcpStream),
    /// From the TLS source.
    Tls(PendingTls),
}

/// An accepted connection and its place under the cap.
pub struct Accepted {
    /// The connection.
    pub conn: Conn,
    /// Who connected.
    pub peer: SocketAddr,
    /// Its place under the cap; dropping it frees the place.
    pub permit: OwnedSemaphorePermit,
}

impl Listeners {
    /// Where the plain and TLS listeners are bound.
    pub fn addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        let tls = match &self.tls {
            Some(TlsSource::Own(l, _)) => l.local_addr().ok(),
            Some(TlsSource::Routed { addr, .. }) => Some(*addr),
            None => None,
        };
        (self.plain.as_ref().and_then(|l| l.local_addr().ok()), tls)
    }

    /// Waits for a free place under `cap`, then for a connection from any source;
    /// `None` once `shutdown` fires.
    ///
    /// The place is taken *before* accepting (as mini-redis does): at the cap, nothing is
    /// accepted and new connections wait in the kernel's backlog instead of taking file
    /// descriptors. One loop serves every source so that waiting holds no place idle.
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
                r = accept_plain(&self.plain) => r,
                r = accept_tls(&self.tls) => r,
                _ = shutdown.cancelled() => return None,
            };
            match accepted {
                Ok((conn, peer)) => {
                    return Some(Accepted { conn, peer, permit });
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

async fn accept_plain(plain: &Option<TcpListener>) -> std::io::Result<(Conn, SocketAddr)> {
    match plain {
        Some(listener) => {
            let (stream, peer) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            Ok((Conn::Plain(stream), peer))
        }
        None => std::future::pending().await,
    }
}

/// Accepts from the TLS source, or never when there is none.
async fn accept_tls(tls: &Option<TlsSource>) -> std::io::Result<(Conn, SocketAddr)> {
    match tls {
        Some(TlsSource::Own(listener, acceptor)) => {
            let (stream, peer) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            Ok((Conn::Tls(PendingTls::Fresh(stream, acceptor.clone())), peer))
        }
        Some(TlsSource::Routed { rx, config, .. }) => match rx.lock().await.recv().await {
            Some((start, peer)) => {
                Ok((Conn::Tls(PendingTls::Started(start, config.clone())), peer))
            }
            // The router is gone (shutdown): nothing more comes.
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// One TLS address shared by several services: reads each ClientHello and hands the
/// connection to the service its ALPN names (PROTOCOL.md §2b).
pub struct Router {
    listener: TcpListener,
    routes: Vec<(Service, mpsc::Sender<Routed>)>,
}

/// ClientHellos being read at once on one shared address; past it, connections wait in the
/// kernel's backlog.
const ROUTER_PENDING_MAX: usize = 1024;

/// Connections routed to a service but not yet taken by its accept loop.
const ROUTED_QUEUE: usize = 64;

impl Router {
    /// Routes connections until `shutdown`, giving each client `timeout` to send its
    /// ClientHello.
    pub async fn run(self, timeout: Duration, shutdown: CancellationToken) {
        let pending = Arc::new(Semaphore::new(ROUTER_PENDING_MAX));
        let routes = Arc::new(self.routes);
        let services: Vec<Service> = routes.iter().map(|(s, _)| *s).collect();
        loop {
            let permit = tokio::select! {
                p = pending.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = shutdown.cancelled() => return,
            };
            let (stream, peer) = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok(ok) => ok,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            let _ = stream.set_nodelay(true);
            let routes = routes.clone();
            let services = services.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let hello = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
                let start = match tokio::time::timeout(timeout, hello).await {
                    Ok(Ok(start)) => start,
                    Ok(Err(e)) => {
                        return tracing::debug!(client = %peer, error = %e, "bad ClientHello")
                    }
                    Err(_) => return tracing::debug!(client = %peer, "no ClientHello in time"),
                };
                let offered: Vec<Vec<u8>> = start
                    .client_hello()
                    .alpn()
                    .map(|a| a.map(<[u8]>::to_vec).collect())
                    .unwrap_or_default();
                let service = route(&offered, &services);
                if let Some((_, tx)) = routes.iter().find(|(s, _)| *s == service) {
                    let _ = tx.send((Box::new(start), peer)).await;
                }
            });
        }
    }
}

/// Which of `services` a client offering `alpn` gets: `cloudlink-tcp/1` the device link,
/// `http/1.1` the API, anything else (usually nothing) the CONNECT proxy; failing those,
/// the API, then the device link.
pub fn route(alpn: &[Vec<u8>], services: &[Service]) -> Service {
    let offers = |p: &[u8]| alpn.iter().any(|a| a == p);
    let has = |s| services.contains(&s);
    if offers(crate::link::TCP_ALPN) && has(Service::Device) {
        Service::Device
    } else if offers(b"http/1.1") && has(Service::Api) {
        Service::Api
    } else if has(Service::Proxy) {
        Service::Proxy
    } else if has(Service::Api) {
        Service::Api
    } else {
        Service::Device
    }
}

/// The TLS sources of every service, and the routers of shared addresses.
#[derive(Default)]
pub struct TlsBound {
    /// Each service's source, in the order asked.
    pub sources: Vec<(Service, TlsSource)>,
    /// Routers to run, one per shared address.
    pub routers: Vec<Router>,
}

impl TlsBound {
    /// Takes `service`'s source.
    pub fn take(&mut self, service: Service) -> Option<TlsSource> {
        let at = self.sources.iter().position(|(s, _)| *s == service)?;
        Some(self.sources.remove(at).1)
    }
}

/// Binds the TLS listeners: a service alone on its address gets its own listener; services
/// given the same address (with a port, not 0) share one, behind a [`Router`].
pub async fn bind_tls(
    wanted: Vec<(Service, SocketAddr, Arc<rustls::ServerConfig>)>,
) -> Result<TlsBound, (Service, SocketAddr, std::io::Error)> {
    let mut by_addr: BTreeMap<SocketAddr, Vec<(Service, Arc<rustls::ServerConfig>)>> =
        BTreeMap::new();
    let mut alone = Vec::new();
    for (service, addr, config) in wanted {
        if addr.port() == 0 {
            alone.push((service, addr, config));
        } else {
            by_addr.entry(addr).or_default().push((service, config));
        }
    }
    let mut bound = TlsBound::default();
    for (addr, services) in by_addr {
        if services.len() == 1 {
            let (service, config) = services.into_iter().next().expect("one");
            alone.push((service, addr, config));
            continue;
        }
        let first = services[0].0;
        let listener = bind(addr).await.map_err(|e| (first, addr, e))?;
        let local = listener.local_addr().map_err(|e| (first, addr, e))?;
        let mut routes = Vec::new();
        for (service, config) in services {
            let (tx, rx) = mpsc::channel(ROUTED_QUEUE);
            routes.push((service, tx));
            bound.sources.push((
                service,
                TlsSource::Routed {
                    rx: tokio::sync::Mutex::new(rx),
                    config,
                    addr: local,
                },
            ));
        }
        tracing::info!(addr = %local, services = ?routes.iter().map(|(s, _)| *s).collect::<Vec<_>>(), "TLS services share an address; ALPN routes");
        bound.routers.push(Router { listener, routes });
    }
    for (service, addr, config) in alone {
        let listener = bind(addr).await.map_err(|e| (service, addr, e))?;
        bound
            .sources
            .push((service, TlsSource::Own(listener, TlsAcceptor::from(config))));
    }
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpn_picks_the_service() {
        let all = [Service::Api, Service::Proxy, Service::Device];
        let offer = |p: &[&[u8]]| p.iter().map(|a| a.to_vec()).collect::<Vec<_>>();
        assert_eq!(route(&offer(&[b"cloudlink-tcp/1"]), &all), Service::Device);
        assert_eq!(route(&offer(&[b"h2", b"http/1.1"]), &all), Service::Api);
        assert_eq!(route(&offer(&[]), &all), Service::Proxy);
        // Without the proxy, a client that offers nothing gets the API.
        let two = [Service::Api, Service::Device];
        assert_eq!(route(&offer(&[]), &two), Service::Api);
        assert_eq!(
            route(
                &offer(&[b"cloudlink-tcp/1"]),
                &[Service::Api, Service::Proxy]
            ),
            Service::Proxy
        );
    }
}
