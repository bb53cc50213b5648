//! Cloudlink: a relay that gives people SSH and port access to devices behind NAT.
//!
//! Devices dial out to a relay and keep one QUIC connection open; people reach a device's
//! ports through the relay's HTTP CONNECT proxy, after the relay checks who they are
//! against its store of users, fleets, devices and keys.
//!
//! # Layout
//!
//! The modules' layers are declared in `src/layers.toml` and checked by a test: a module
//! imports only from layers below its own.
//!
//! - [`addr`]: `HOST:PORT` and URL splitting, one reading for the agent, CLI and healthcheck.
//! - [`duration`]: durations as people write them (`90s`, `12h`, `30d`).
//! - [`balena`]: balenaOS conventions the CLI and relay share (entering a service).
//! - [`config`]: relay settings, layered defaults < TOML file < `CLOUDLINK_*` env < flags,
//!   and the names of the files the relay generates in its data directory.
//! - [`store`]: the [`store::Store`] trait and its rows and errors (`model.rs`), and its
//!   backends. One set of queries over `sqlx::Any` (`sql.rs`) serves both SQLite
//!   (`sqlite.rs`, the embedded default) and Postgres (`postgres.rs`, which also holds what
//!   only Postgres has: `LISTEN/NOTIFY` for presence, the advisory start-up lock);
//!   `migrations.rs` both schemas; `metered.rs` times every call for `/metrics`. This
//!   deviates from "one full implementation per backend" on purpose: the dialects differ in
//!   nothing the shared queries use.
//! - [`auth`]: who is calling and what they reach: `tokens.rs` (API keys, device keys,
//!   JWTs), `peer.rs` (the cluster's peer tokens), `mod.rs` (authentication, device keys
//!   included), `policy.rs` (the reach rule), `ssh_keys.rs` (OpenSSH public key checks).
//! - [`proto`]: bytes on the wire, no I/O policy: `connect.rs` CONNECT heads, `frame.rs`
//!   and `messages.rs` the device link's frames and messages (with the hello's and
//!   welcome's `features`), `probe.rs` the UDP probe, `api.rs` the REST API's request and
//!   response bodies, shared by the relay and the CLI.
//! - [`quic`]: UDP sockets and transport settings shared by relay and agent; `bbr.rs` the
//!   device link's congestion controller (BBR's model on quinn's controller trait);
//!   `probes.rs` the relay's QUIC socket, which also answers UDP probes.
//! - [`link`]: the device link's two transports behind one face (`chunks.rs`: the tunnel
//!   stream's halves as the chunk traits the hot path drives, and how a stream ends): QUIC
//!   (`quic.rs`), and TLS over TCP with HTTP/2 streams (`h2.rs`) where UDP is blocked;
//!   `device.rs` the relay's end of a device's connection, which opens tunnel streams.
//! - [`credit`]: tunnel credit (PROTOCOL.md §2d): the agent's gates, the relay's grants,
//!   the session's outbox of new limits and the relay-wide budget of buffered bytes.
//! - [`sockinfo`]: how many bytes a TCP socket has not sent yet (`TCP_INFO`), and its
//!   retransmission timeout's ceiling (`TCP_RTO_MAX_MS`); with
//!   [`heap`] (the relay's freed memory handed back to the kernel) the crate's only `unsafe`.
//! - [`forward`]: the hot path, one device-link stream joined to one socket, with the
//!   tunnel's byte counters (up: user to device; down: back) and reset-on-crash.
//! - [`splice`]: the one join of two byte streams outside the device link (the peer hop,
//!   the CLI's local tunnel): `splice(2)` through a pipe when both are plain TCP, else a copy.
//! - [`overlay`]: settings in layers (defaults < file < env and flags) for both roles.
//! - [`logsafe`]: the one escaping path for peer-supplied text on its way to a log line.
//! - [`private_file`]: files written whole or not at all, 0600 unless said otherwise (saved
//!   logins, the relay's generated secrets, the agent's key cache and status file).
//! - [`https_proxy`]: outbound `HTTPS_PROXY`/`NO_PROXY` for the agent's TLS/TCP link and the
//!   CLI.
//! - [`tls_client`]: which servers the agent and CLI trust (system roots, a CA file, none),
//!   and the HTTP client both use for a relay's API.
//! - [`relay`]: the server. `mod.rs` starts and stops the listeners together (`error.rs`
//!   why it could not); `cluster.rs` the start-up writes relays sharing a store agree on
//!   and the heartbeat with its pruning; `listen.rs`
//!   one service's plain and TLS listeners with a capped accept loop, and the routing of a
//!   TLS port shared by several services by ALPN, and the sockets systemd binds for it;
//!   `api/` is the REST API (served by hyper
//!   with header and body timeouts), a file per route family (`users.rs`, `api_keys.rs`,
//!   `tokens.rs`, `ssh_keys.rs`, `fleets.rs`, `devices.rs`, `tunnels.rs`, `relays.rs`,
//!   `endpoints.rs` where the listeners are, `public_keys.rs`, `terminal.rs` the terminal's WebSocket upgrade; `extract.rs` the
//!   authenticated caller and JSON bodies, `fields.rs` field names and times, `error.rs`
//!   the error shape); `web/` the dashboard and the browser terminal
//!   (`terminal.rs` the WebSocket); `device_shell.rs` a shell on a device for the terminal
//!   and the gateway (the tunnel, the minted key, the SSH client that logs in);
//!   `devices/` the device listeners (`mod.rs` a session whichever link carries it,
//!   `quic.rs` QUIC and its admission, `tcp.rs` TLS over TCP with HTTP/2 streams);
//!   `proxy/` the CONNECT listeners (`mod.rs` the edge and the terminal's in-process
//!   tunnels, `client.rs` the client connection and edge caps, `admit.rs` the one
//!   admission: credentials, policy, limits and the device stream, `tunnel.rs` the joined
//!   streams and their audit row, `to_owner.rs` the hop to the relay that holds a device,
//!   `refusal.rs` each refusal's side and answer); `peer.rs` the owner side of that hop,
//!   which serves other relays of a cluster; `gateway/` the SSH gateway, where cloud users log
//!   in with their cloud SSH keys (`mod.rs` the server and its channels, `session.rs`
//!   `host` and `enter` sessions, `target.rs` who is logged in, which device they mean); `revalidate.rs` revocation of open tunnels;
//!   `presence.rs` where devices are (the sessions here, the store's rows, the cache of
//!   other relays' and the watch that supersedes moved sessions); `registry.rs` the open
//!   tunnels and their limits; `authcache.rs` recent authorization answers;
//!   `github.rs` importing a user's public keys from GitHub; `tls.rs` the certificate;
//!   `state.rs` what the listeners share; `datadir.rs` the generated files; `limits.rs`
//!   per-source limits (failed authentications, unauthenticated connections);
//!   `metrics.rs`.
//! - [`agent`]: the device side. `mod.rs` picks a relay and a transport (QUIC, TLS over
//!   TCP as the fallback, the probe back to QUIC), serves tunnels and reconnects with
//!   backoff; `link.rs` dials either link, says hello and watches the QUIC link's
//!   silence; `probe.rs` the UDP probe and its backoff; `tunnel.rs` one tunnel; `http.rs`
//!   its one HTTP GET to the relay's API (for `authorized-keys`); `config.rs` its settings;
//!   `authorized_keys.rs` answers sshd's `AuthorizedKeysCommand`.
//! - [`cli`]: the user commands: `admin.rs` (users, keys, fleets, devices), `login.rs`
//!   (login, logout, whoami), `client.rs` (the API client and table/JSON output),
//!   `resolve.rs` (a device by uuid, prefix or name, and what a refusal means),
//!   `connect.rs` (CONNECT through the relay), `tunnel.rs` (`device tunnel`, `proxy`),
//!   `ssh.rs` (`device ssh`), `settings.rs` (saved logins, one per profile).
//! - [`healthcheck`]: the container healthcheck for either role (it reads both roles'
//!   settings, so it sits above them).
//!
//! Secrets (API keys, device keys) are stored only as SHA-256 and never logged.

// `deny`, not `forbid`: `sockinfo` and `heap` allow it, for one documented `getsockopt(2)`,
// one `setsockopt(2)` and one `malloc_trim(3)`.
#![deny(unsafe_code)]
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
pub mod credit;
#[cfg(feature = "relay")]
pub mod duration;
pub mod forward;
pub mod healthcheck;
#[cfg(feature = "relay")]
pub mod heap;
pub mod https_proxy;
pub mod link;
pub mod logsafe;
pub mod overlay;
#[cfg(feature = "relay")]
pub mod peerhop;
pub mod private_file;
pub mod proto;
pub mod quic;
#[cfg(feature = "relay")]
pub mod relay;
pub mod resume;
pub mod sockinfo;
pub mod splice;
#[cfg(feature = "relay")]
pub mod store;
pub mod tls_client;
