//! Optional TLS for the public listener (rustls), offering HTTP/2 and HTTP/1.1 through ALPN so
//! browsers can use HTTP/2 (no six-streams-per-origin cap) directly.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::{ConfigError, TlsSettings};

/// Builds the acceptor from `[server.tls]`; errors name the key at fault.
pub(crate) fn acceptor(settings: &TlsSettings) -> Result<TlsAcceptor, ConfigError> {
    let invalid = |key: &'static str, message: String| ConfigError::Invalid { key, message };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&settings.cert_file)
        .and_then(|certs| certs.collect())
        .map_err(|e| {
            let path = settings.cert_file.display();
            invalid(
                "server.tls.cert_file",
                format!("cannot read certificates from {path}: {e}"),
            )
        })?;
    if certs.is_empty() {
        let path = settings.cert_file.display();
        return Err(invalid(
            "server.tls.cert_file",
            format!("no certificate in {path}"),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&settings.key_file).map_err(|e| {
        let path = settings.key_file.display();
        invalid(
            "server.tls.key_file",
            format!("cannot read a private key from {path}: {e}"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("server.tls", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid("server.tls.key_file", format!("certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
