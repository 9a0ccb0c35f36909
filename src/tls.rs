//! TLS for the standalone server: `tls_cert` / `tls_key` make the listener speak only TLS, serving `https://` and `wss://` on one port.
//!
//! The certificate chain and the private key are PEM files (the key in PKCS#8, PKCS#1 or SEC1
//! form). They are read when the engine is built, so a missing or broken file is a
//! configuration error at startup, never at the first connection. The server uses rustls with
//! the `ring` provider, TLS 1.2 and 1.3, and announces ALPN `http/1.1`. The TLS handshake
//! counts against `handshake_timeout` and `max_pending_handshakes` like the HTTP request head
//! does. To rotate the certificate, replace the files and restart (or drain) the process.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A self-signed certificate for the example; use your real chain and key in production.
//! let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
//! let dir = std::env::temp_dir().join(format!("wsengine-tls-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! std::fs::write(dir.join("cert.pem"), made.cert.pem())?;
//! std::fs::write(dir.join("key.pem"), made.signing_key.serialize_pem())?;
//!
//! let config = wsengine::Config {
//!     tls_cert: Some(dir.join("cert.pem").display().to_string()),
//!     tls_key: Some(dir.join("key.pem").display().to_string()),
//!     ..wsengine::Config::default()
//! };
//! let engine = wsengine::Engine::builder(config).build()?; // reads and checks both files
//! # drop(engine);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```

use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, ConfigError};

/// A rustls server configuration from a PEM certificate chain and a PEM private key.
pub fn server_config(cert_path: &str, key_path: &str) -> Result<Arc<ServerConfig>, ConfigError> {
    let chain = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ConfigError::new("tls_cert", format!("cannot read certificates from {cert_path:?}: {e}")))?;
    if chain.is_empty() {
        return Err(ConfigError::new("tls_cert", format!("{cert_path:?} holds no PEM certificate")));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| ConfigError::new("tls_key", format!("cannot read a private key from {key_path:?}: {e}")))?;
    // An explicit provider: the process-wide default is ambiguous when another dependency
    // enables a second rustls backend.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new("tls_cert", format!("TLS setup failed: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| ConfigError::new("tls_key", format!("the key does not fit the certificate: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The acceptor for the configured certificate, or `None` without `tls_cert` / `tls_key`.
pub(crate) fn acceptor_from_config(config: &Config) -> Result<Option<TlsAcceptor>, ConfigError> {
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Ok(Some(TlsAcceptor::from(server_config(cert, key)?))),
        _ => Ok(None),
    }
}
