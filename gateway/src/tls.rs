//! TLS for listeners configured with a certificate and key (rustls, ring provider). The firehose and attachment downloads copy through TLS instead of using `sendfile` (no kTLS in this kernel).

use std::path::Path;
use std::sync::Arc;

use crate::config::{ConfigError, TlsFile};

const CERT_KEY: &str = "tls.cert_path";
const KEY_KEY: &str = "tls.key_path";

/// Loads the PEM certificate chain and private key into a rustls server config. Errors are
/// bad config: they name `tls.cert_path` or `tls.key_path`, the file, and what is wrong.
pub fn server_config(tls: &TlsFile) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    let (cert_path, key_path) = (&tls.cert_path, &tls.key_path);
    let bad = |key: &str, path: &Path, problem: String| {
        ConfigError::new(key, format!("{}: {problem}", path.display()))
    };
    let certs: Vec<_> = rustls_pemfile::certs(&mut open(CERT_KEY, cert_path)?)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(CERT_KEY, cert_path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad(CERT_KEY, cert_path, "holds no PEM certificate".into()));
    }
    let key = rustls_pemfile::private_key(&mut open(KEY_KEY, key_path)?)
        .map_err(|e| bad(KEY_KEY, key_path, format!("not a PEM private key: {e}")))?
        .ok_or_else(|| bad(KEY_KEY, key_path, "holds no PEM private key".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new("tls", format!("protocol versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            bad(
                KEY_KEY,
                key_path,
                format!("{e} (with the certificate of {CERT_KEY})"),
            )
        })?;
    Ok(Arc::new(config))
}

fn open(key: &str, path: &Path) -> Result<std::io::BufReader<std::fs::File>, ConfigError> {
    std::fs::File::open(path)
        .map(std::io::BufReader::new)
        .map_err(|e| ConfigError::new(key, format!("{}: {e}", path.display())))
}
