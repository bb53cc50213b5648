//! Cloudlink: a relay that gives people SSH and port access to devices behind NAT.
//!
//! Devices dial out to a relay and keep one QUIC connection open; people reach a device's
//! ports through the relay's HTTP CONNECT proxy, after the relay checks who they are
//! against its store of users, fleets, devices and keys.
//!
//! # Layout
//!
//! - [`addr`]: `HOST:PORT` and URL splitting, one reading for the agent, CLI and healthcheck.
//! - [`config`]: relay settings, layered defaults < TOML file < `CLOUDLINK_*` env < flags.
//! - [`store`]: the [`store::Store`] trait and its backends. One set of queries over
//!   `sqlx::Any` serves both SQLite (embedded default) and Postgres; the backend modules hold
//!   only what differs (connect options, migrations). This deviates from "one full
//!   implementation per backend" on purpose: the dialects differ in nothing the queries use.
//! - [`auth`]: tokens (API keys, device keys, JWTs), authentication, the reach policy, and
//!   OpenSSH public key checks.
//! - [`proto`]: bytes on the wire, no I/O policy: CONNECT heads, frames, messages (with
//!   the hello's and welcome's `features`), the UDP probe (`probe.rs`).
//! - [`quic`]: UDP sockets and transport settings shared by relay and agent; `bbr.rs` the
//!   device link's congestion controller (BBR's model on quinn's controller trait);
//!   `probes.rs` the relay's QUIC socket, which also answers UDP probes.
//! - [`forward`]: the hot path, one device-link stream joined to one socket.
//! - [`link`]: the device link's two transports behind one face: QUIC, and TLS over TCP
//!   with HTTP/2 streams (`link/h2.rs`) where UDP is blocked.
//! - [`splice`]: TCP to TCP through a pipe with `splice(2)`, for forwarded tunnels.
//! - [`logsafe`]: the one escaping path for peer-supplied text on its way to a log line.
//! - [`relay`]: the server. `mod.rs` starts and stops the listeners together; `listen.rs`
//!   one service's plain and TLS listeners with a capped accept loop; `api/` is the REST API
//!   (served by hyper with header and body timeouts); `devices/` the device listeners
//!   (`mod.rs` a session whichever link carries it, `quic.rs` QUIC and its admission,
//!   `tcp.rs` TLS over TCP with HTTP/2 streams); `listen.rs` also routes a TLS port shared
//!   by several services by ALPN; `proxy/` the CONNECT listeners (`mod.rs` the edge,
//!   `admit.rs` credentials, policy, limits and the device stream, `tunnel.rs` the joined
//!   streams and their audit row, `refusal.rs` each refusal's side and answer);
//!   `revalidate.rs` revocation of open tunnels; `registry.rs` who is connected;
//!   `authcache.rs` recent authorization answers; `tls.rs` the certificate; `state.rs` what
//!   the listeners share; `datadir.rs` the generated files; `limits.rs` per-source limits
//!   (failed authentications, unauthenticated connections); `metrics.rs`.
//! - [`agent`]: the device side. `mod.rs` picks a relay and a transport (QUIC, TLS over
//!   TCP as the fallback, the probe back to QUIC), serves tunnels and reconnects with
//!   backoff; `link.rs` dials either link, says hello and watches the QUIC link's
//!   silence; `probe.rs` the UDP probe and its backoff; `proxy.rs` `HTTPS_PROXY`;
//!   `tunnel.rs` one tunnel; `config.rs` its settings; `authorized_keys.rs` answers sshd's
//!   `AuthorizedKeysCommand`.
//! - [`tls_client`]: which servers the agent and CLI trust (system roots, a CA file, none),
//!   and the HTTP client both use for a relay's API.
//! - [`cli`]: the user commands: `admin.rs` (users, keys, fleets, devices), `login.rs`
//!   (login, logout, whoami), `client.rs` (the API client and table/JSON output),
//!   `resolve.rs` (a device by uuid, prefix or name, and what a refusal means),
//!   `connect.rs` (CONNECT through the relay), `tunnel.rs` (`device tunnel`, `proxy`),
//!   `ssh.rs` (`device ssh`), `settings.rs` (saved logins, one per profile),
//!   `healthcheck.rs` (the container healthcheck for either role).
//!
//! Secrets (API keys, device keys) are stored only as SHA-256 and never logged.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod addr;
pub mod agent;
#[cfg(feature = "relay")]
pub mod auth;
#[cfg(feature = "relay")]
pub mod balena;
pub mod cli;
#[cfg(feature = "relay")]
pub mod config;
#[cfg(feature = "relay")]
pub mod duration;
pub mod forward;
pub mod healthcheck;
pub mod https_proxy;
pub mod link;
pub mod logsafe;
pub mod proto;
pub mod quic;
#[cfg(feature = "relay")]
pub mod relay;
pub mod splice;
#[cfg(feature = "relay")]
pub mod store;
pub mod tls_client;
