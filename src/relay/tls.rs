//! The relay's certificate: from `--tls-cert`/`--tls-key`, or a self-signed dev certificate
//! generated once into the data directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::datadir;
use crate::config::{RelayConfig, DEV_CERT, DEV_KEY};
use crate::proto::ALPN;
use crate::store::{Store, StoreError};

/// Errors loading or generating the certificate.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Generating the dev certificate failed.
    #[error("cannot generate the dev certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// Writing it failed.
    #[error(transparent)]
    DataDir(#[from] datadir::DataDirError),
    /// rustls refused the certificate or key.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the TLS configuration.
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
    /// The store could not share the dev certificate.
    #[error("dev certificate in the store: {0}")]
    Store(#[from] StoreError),
}

/// A certificate chain and its key, as every TLS listener serves it.
pub struct Material {
    /// Where the chain came from.
    pub cert_path: PathBuf,
    /// Where the key came from.
    pub key_path: PathBuf,
    /// What new handshakes get: swapped by [`watch`] when the files change, so open
    /// connections and tunnels keep their session while new ones see the new certificate.
    pub resolver: Arc<Reloadable>,
}

/// The certificate new handshakes get; replaceable while the relay runs.
#[derive(Debug)]
pub struct Reloadable(std::sync::RwLock<Arc<CertifiedKey>>);

impl Reloadable {
    fn current(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn replace(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = key;
    }
}

impl rustls::server::ResolvesServerCert for Reloadable {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn pem_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

impl Material {
    /// The chain and key in these PEM files.
    pub fn from_files(cert_path: &Path, key_path: &Path) -> Result<Material, TlsError> {
        load(cert_path, key_path)
    }
}

fn load(cert_path: &Path, key_path: &Path) -> Result<Material, TlsError> {
    Ok(Material {
        cert_path: cert_path.to_owned(),
        key_path: key_path.to_owned(),
        resolver: Arc::new(Reloadable(std::sync::RwLock::new(Arc::new(certified_key(
            cert_path, key_path,
        )?)))),
    })
}

/// The chain and key from their PEM files, checked to belong together.
fn certified_key(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| pem_error(cert_path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(cert_path, e))?;
    if certs.is_empty() {
        return Err(pem_error(cert_path, "no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| pem_error(key_path, e))?;
    let certified = CertifiedKey::from_der(certs, key, &provider()).map_err(|e| {
        pem_error(
            key_path,
            format!("does not go with {}: {e}", cert_path.display()),
        )
    })?;
    Ok(certified)
}

/// What [`watch`] compares to see a change: each file's modification time and length.
fn stamp(paths: [&Path; 2]) -> Vec<Option<(std::time::SystemTime, u64)>> {
    paths
        .iter()
        .map(|p| {
            let meta = std::fs::metadata(p).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        })
        .collect()
}

/// Reloads the certificate and key when their files change (checked every `every`) or on
/// SIGHUP, until `stop`. A pair that does not load (half-written, mismatched) is logged
/// and the served one kept; the next change or SIGHUP tries again.
pub async fn watch(
    material: &Material,
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let paths = [material.cert_path.as_path(), material.key_path.as_path()];
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGHUP; certificate files are still watched");
            None
        }
    };
    let mut seen = stamp(paths);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let asked = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => false,
            Some(()) = async { match &mut hup { Some(h) => h.recv().await, None => None } } => true,
        };
        let now = stamp(paths);
        if !asked && now == seen {
            continue;
        }
        seen = now;
        match certified_key(paths[0], paths[1]) {
            Ok(key) => {
                material.resolver.replace(Arc::new(key));
                tracing::info!(cert = %paths[0].display(), on_signal = asked, "TLS certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate not reloaded; still serving the previous one")
            }
        }
    }
}

/// The name of the dev certificate's row in the store's shared secrets.
const DEV_TLS_SECRET: &str = "dev-tls";

/// The configured certificate, or the dev certificate with SANs `localhost`, `127.0.0.1`,
/// `::1` and every `tls_names` entry.
///
/// The dev certificate is one per store: the first relay's (carried over from its data
/// directory, or generated) is kept in the store, and every relay of a cluster serves that
/// one, so an agent pinned with `--ca` can fail over to any relay. Each relay writes it to
/// its data directory too, for the agents' `--ca` and the CLI's.
pub async fn material(config: &RelayConfig, store: &dyn Store) -> Result<Material, TlsError> {
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        return load(cert, key);
    }
    let cert_path = config.data_dir.join(DEV_CERT);
    let key_path = config.data_dir.join(DEV_KEY);
    let on_disk = match (
        std::fs::read_to_string(&cert_path),
        std::fs::read_to_string(&key_path),
    ) {
        (Ok(cert), Ok(key)) => Some((cert, key)),
        _ => None,
    };
    let candidate = match &on_disk {
        Some((cert, key)) => format!("{cert}{key}"),
        None => {
            let mut names: Vec<String> =
                ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
            names.extend(config.tls_names.iter().cloned());
            let generated = rcgen::generate_simple_self_signed(names)?;
            format!(
                "{}{}",
                generated.cert.pem(),
                generated.signing_key.serialize_pem()
            )
        }
    };
    let shared = store.shared_secret(DEV_TLS_SECRET, &candidate).await?;
    let (cert, key) = split_pem_pair(&shared)
        .ok_or_else(|| pem_error(&cert_path, "the store's dev certificate is malformed"))?;
    if on_disk.as_ref().map(|(c, k)| (c.as_str(), k.as_str())) != Some((cert, key)) {
        // Remove an old or half-written pair so both files are made together.
        let _ = std::fs::remove_file(&cert_path);
        let _ = std::fs::remove_file(&key_path);
        datadir::write_private(&key_path, key.as_bytes())?;
        datadir::write_private(&cert_path, cert.as_bytes())?;
        tracing::info!(path = %cert_path.display(), "wrote the cluster's self-signed dev certificate");
    }
    load(&cert_path, &key_path)
}

/// Splits "certificate PEM, then key PEM" at the end of the last certificate.
fn split_pem_pair(pem: &str) -> Option<(&str, &str)> {
    const END: &str = "-----END CERTIFICATE-----";
    let at = pem.rfind(END)? + END.len();
    let at = at + pem[at..].len() - pem[at..].trim_start_matches(['\r', '\n']).len();
    let (cert, key) = pem.split_at(at);
    (!key.trim().is_empty()).then_some((cert, key))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The QUIC server configuration for the device listener.
pub fn quic_server(
    material: &Material,
    transport: quinn::TransportConfig,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(material.resolver.clone());
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// TLS settings for a TCP listener (API, CONNECT proxy) offering `alpn`.
pub fn tcp_server(
    material: &Material,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(material.resolver.clone());
    crypto.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(crypto))
}

/// TLS settings for the TLS/TCP device link: TLS 1.3 only and ALPN `cloudlink-tcp/1`,
/// as on the QUIC link (PROTOCOL.md §2b).
pub fn device_tcp_server(material: &Material) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(material.resolver.clone());
    crypto.alpn_protocols = vec![crate::link::TCP_ALPN.to_vec()];
    Ok(Arc::new(crypto))
}

/// A TLS acceptor for a TCP listener (API, CONNECT proxy) offering `alpn`.
pub fn tcp_acceptor(
    material: &Material,
    alpn: &[&[u8]],
) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    Ok(tokio_rustls::TlsAcceptor::from(tcp_server(material, alpn)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls_client::{self, Trust};
    use rustls::pki_types::ServerName;

    /// A TLS handshake over an in-memory pipe, the client checking `name`.
    async fn handshake(material: &Material, name: &str) -> bool {
        let acceptor = tcp_acceptor(material, &[]).unwrap();
        let client = tls_client::config(Trust::CaFile(&material.cert_path), &[]).unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move { acceptor.accept(b).await.is_ok() });
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let ok = connector.connect(name, a).await.is_ok();
        let _ = server.await;
        ok
    }

    #[tokio::test]
    async fn dev_certificate_names_and_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let config = RelayConfig {
            data_dir: dir.path().to_owned(),
            tls_names: vec!["relay.example.com".into(), "192.0.2.7".into()],
            ..RelayConfig::default()
        };
        let store = crate::store::open(&crate::store::sqlite::default_url(dir.path()))
            .await
            .unwrap();
        let material = material(&config, store.as_ref()).await.unwrap();
        for name in [
            "localhost",
            "127.0.0.1",
            "::1",
            "relay.example.com",
            "192.0.2.7",
        ] {
            assert!(
                handshake(&material, name).await,
                "{name} is not in the certificate"
            );
        }
        assert!(!handshake(&material, "other.example.com").await);
        let key_mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(DEV_KEY))
                .unwrap()
                .permissions(),
        );
        assert_eq!(key_mode & 0o777, 0o600);
        // Generated once: a second start loads the same certificate.
        let again = super::material(&config, store.as_ref()).await.unwrap();
        assert_eq!(
            again.resolver.current().cert,
            material.resolver.current().cert
        );
        // A second relay on the same store, with a data dir of its own, serves the same one.
        let other = tempfile::tempdir().unwrap();
        let config = RelayConfig {
            data_dir: other.path().to_owned(),
            ..config
        };
        let shared = super::material(&config, store.as_ref()).await.unwrap();
        assert_eq!(
            shared.resolver.current().cert,
            material.resolver.current().cert
        );
    }
}
