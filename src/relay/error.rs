//! Why a relay could not start or serve.

use std::net::SocketAddr;

use super::{datadir, tls};
use crate::auth::tokens::KeyError;
use crate::store::StoreError;

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A file in the data directory.
    #[error("data directory: {0}")]
    DataDir(#[from] datadir::DataDirError),
    /// The store could not be opened or migrated.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// JWT key material.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The TLS certificate.
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    /// The SSH gateway's host key could not be made, kept or loaded.
    #[error("SSH gateway: {0}")]
    HostKey(String),
    /// `CLOUDLINK_BOOTSTRAP_ADMIN_KEY` is not an API key.
    #[error("CLOUDLINK_BOOTSTRAP_ADMIN_KEY must start with clk_ and be at least 36 characters")]
    BootstrapKey,
    /// A listener could not bind.
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A listener failed while serving.
    #[error("{what} listener failed: {source}")]
    Serve {
        /// Which listener.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}
