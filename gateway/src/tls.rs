//! TLS for listeners configured with a certificate and key (rustls, ring provider). The firehose and attachment downloads copy through TLS instead of using `sendfile` (no kTLS in this kernel).

use std::sync::Arc;

use anyhow::Context;

use crate::config::TlsFile;

/// Loads the PEM certificate chain and private key into a rustls server config.
pub fn server_config(tls: &TlsFile) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(&tls.cert_path)
            .with_context(|| format!("tls.cert_path {}", tls.cert_path.display()))?,
    ))
    .collect::<Result<_, _>>()
    .with_context(|| {
        format!(
            "tls.cert_path {}: not PEM certificates",
            tls.cert_path.display()
        )
    })?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(&tls.key_path)
            .with_context(|| format!("tls.key_path {}", tls.key_path.display()))?,
    ))
    .with_context(|| format!("tls.key_path {}", tls.key_path.display()))?
    .with_context(|| format!("tls.key_path {}: no private key", tls.key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("tls protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("tls certificate and key do not match")?;
    Ok(Arc::new(config))
}
