//! Cloudlink: a relay that gives people SSH and port access to devices behind NAT.
//!
//! Devices dial out to a relay and keep one QUIC connection open; people reach a device's
//! ports through the relay's HTTP CONNECT proxy, after the relay checks who they are
//! against its store of users, fleets, devices and keys.
//!
//! # Layout
//!
//! - [`config`]: relay settings, layered defaults < TOML file < `CLOUDLINK_*` env < flags.
//! - [`store`]: the [`store::Store`] trait and its backends. One set of queries over
//!   `sqlx::Any` serves both SQLite (embedded default) and Postgres; the backend modules hold
//!   only what differs (connect options, migrations). This deviates from "one full
//!   implementation per backend" on purpose: the dialects differ in nothing the queries use.
//! - [`auth`]: tokens (API keys, device keys, JWTs), authentication, the reach policy, and
//!   OpenSSH public key checks.
//! - [`relay`]: the server. `mod.rs` starts and stops the listeners together; `api/` is the
//!   REST API; `state.rs` what the listeners share; `datadir.rs` the generated files;
//!   `limits.rs` per-source auth limits; `metrics.rs` Prometheus.
//! - [`cli`]: the user commands (login, users, keys, fleets, devices).
//!
//! Secrets (API keys, device keys) are stored only as SHA-256 and never logged.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod cli;
pub mod config;
pub mod relay;
pub mod store;
