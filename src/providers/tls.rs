//! rustls configuration shared by the provider clients and the fake servers.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The PEM held nothing usable.
    #[error("{0}")]
    Invalid(String),
    /// rustls refused the material.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parse every certificate in a PEM blob.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut BufReader::new(pem))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid(format!("bad certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Invalid("no certificate in PEM".into()));
    }
    Ok(certs)
}

/// Parse the first private key in a PEM blob.
pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut BufReader::new(pem))
        .map_err(|e| TlsError::Invalid(format!("bad private key PEM: {e}")))?
        .ok_or_else(|| TlsError::Invalid("no private key in PEM".into()))
}

/// Read a file, naming it in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// A client config trusting the web PKI roots plus `extra_ca_pem`, offering `alpn` protocols.
pub fn client_config(
    extra_ca_pem: Option<&[u8]>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_ca_pem {
        for cert in certs_from_pem(pem)? {
            roots.add(cert)?;
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A server config presenting `cert_pem` / `key_pem`, offering `alpn` protocols.
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs_from_pem(cert_pem)?, key_from_pem(key_pem)?)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The committed test-only CA (`fixtures/test-ca.pem`), for tests and the demo.
pub const TEST_CA_PEM: &[u8] = include_bytes!("../../fixtures/test-ca.pem");
/// The committed test-only server certificate for localhost/127.0.0.1/::1.
pub const TEST_SERVER_CERT_PEM: &[u8] = include_bytes!("../../fixtures/test-server.pem");
/// Its private key (test-only, public on purpose).
pub const TEST_SERVER_KEY_PEM: &[u8] = include_bytes!("../../fixtures/test-server.key");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_fixtures_load() {
        client_config(Some(TEST_CA_PEM), &[b"h2"]).unwrap();
        server_config(TEST_SERVER_CERT_PEM, TEST_SERVER_KEY_PEM, &[b"h2"]).unwrap();
    }
}
