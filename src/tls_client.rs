//! Client-side TLS for the agent (QUIC, authorized-keys) and the CLI (API, TLS proxy): which
//! servers to trust, and the HTTP client both use for a relay's API.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{self, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Which certificates to trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust<'a> {
    /// The system's roots.
    System,
    /// The certificates in a PEM file: a private CA, or a relay's self-signed dev certificate.
    CaFile(&'a Path),
    /// Any certificate at all: for development only; the link is encrypted but not
    /// authenticated.
    Insecure,
}

/// Errors building a client TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsClientError {
    /// The CA file is unreadable or holds no certificate.
    #[error("CA file {path}: {message}")]
    CaFile {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The system has no usable root certificates.
    #[error("no system root certificates found; pass a CA file")]
    NoSystemRoots,
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The HTTP client could not be built.
    #[error("cannot set up the HTTP client: {0}")]
    Http(String),
}

/// Installs the ring crypto provider once for rustls users in this process.
pub fn install_crypto() {
    // Fails only if a provider is installed already, which is what we want anyway.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(feature = "relay")]
/// A reqwest client for a relay's API: HTTPS verified against `trust` (system roots or a
/// CA file; the same options as the device link), or plain HTTP for an `http://` URL.
pub fn http_client(
    base: &str,
    trust: Trust<'_>,
    timeout: std::time::Duration,
) -> Result<reqwest::Client, TlsClientError> {
    http_client_builder(base, trust, timeout)?
        .build()
        .map_err(|e| TlsClientError::Http(e.to_string()))
}

#[cfg(feature = "relay")]
/// What [`http_client`] builds, for a caller that sets more (a redirect policy).
pub fn http_client_builder(
    base: &str,
    trust: Trust<'_>,
    timeout: std::time::Duration,
) -> Result<reqwest::ClientBuilder, TlsClientError> {
    install_crypto();
    let builder = reqwest::Client::builder()
        .timeout(timeout)
        .user_agent(concat!("cloudlink/", env!("CARGO_PKG_VERSION")));
    // Always a configuration of ours: left alone, reqwest loads the system's roots itself,
    // and fails where there are none (a minimal container) even for plain http://.
    let tls = if base.starts_with("https://") {
        config(trust, &[b"http/1.1"])?
    } else {
        // Plain HTTP: TLS is never used, so it trusts nothing.
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth()
    };
    Ok(builder.tls_backend_preconfigured(tls))
}

/// An error with its causes, `outer: inner: innermost`: reqwest's own message hides the
/// part a person needs ("connection refused", "invalid peer certificate").
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// What to do about a failure whose text (from [`chain`], or a QUIC or TLS error) says the
/// relay's certificate is not trusted; `None` for every other failure.
pub fn trust_hint(text: &str) -> Option<&'static str> {
    const SIGNS: [&str; 4] = [
        "UnknownIssuer",
        "invalid peer certificate",
        "certificate verify failed",
        "NotValidForName",
    ];
    SIGNS.iter().any(|s| text.contains(s)).then_some(
        "the relay's certificate is not trusted here: pass --ca FILE with the CA that signed it \
         (for a relay's self-signed dev certificate: <data-dir>/relay-cert.pem)",
    )
}

/// [`chain`] followed by the [`trust_hint`], when there is one.
pub fn explain(e: &dyn std::error::Error) -> String {
    let text = chain(e);
    match trust_hint(&text) {
        Some(hint) => format!("{text}\nhint: {hint}"),
        None => text,
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(crypto::ring::default_provider())
}

fn roots(trust: &Trust<'_>) -> Result<RootCertStore, TlsClientError> {
    let mut store = RootCertStore::empty();
    match trust {
        Trust::CaFile(path) => {
            let shown = path.display().to_string();
            let err = |message: String| TlsClientError::CaFile {
                path: shown.clone(),
                message,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| err(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| err(e.to_string()))?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(err("no usable certificate in the file".into()));
            }
        }
        Trust::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsClientError::NoSystemRoots);
            }
        }
        Trust::Insecure => {}
    }
    Ok(store)
}

/// A client configuration trusting `trust`, offering `alpn`.
pub fn config(trust: Trust<'_>, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, TlsClientError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let mut config = if trust == Trust::Insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider())))
            .with_no_client_auth()
    } else {
        builder
            .with_root_certificates(roots(&trust)?)
            .with_no_client_auth()
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Accepts any certificate, but still checks handshake signatures (so the peer must hold
/// the key of the certificate it shows).
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
