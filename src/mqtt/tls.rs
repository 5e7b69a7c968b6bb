//! TLS to an external broker: the rustls client configuration the hub's connections
//! share, built once at start from `mqtt.ca_file` (or the Mozilla roots) and the
//! optional client certificate, so a missing or broken file stops start-up instead of
//! failing every reconnect.
//!
//! The crypto provider is ring, named here rather than taken from the process default:
//! reqwest already brings it, and a default chosen by whichever crate installs one
//! first could differ between the hub and its tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// What the hub trusts and, optionally, shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificates the broker's chain must end in; `None`: the Mozilla roots.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain and private key, for brokers that ask for one.
    pub client_auth: Option<(PathBuf, PathBuf)>,
}

/// A TLS file that cannot be used, naming the setting it came from.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {path}: {problem}")]
pub struct TlsError {
    pub key: &'static str,
    pub path: String,
    pub problem: String,
}

impl TlsError {
    fn new(key: &'static str, path: &Path, problem: impl ToString) -> Self {
        Self {
            key,
            path: path.display().to_string(),
            problem: problem.to_string(),
        }
    }
}

impl TlsFiles {
    /// Reads the files and builds the configuration every connection uses.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let mut roots = RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                for cert in read_certs("mqtt.ca_file", path)? {
                    roots
                        .add(cert)
                        .map_err(|e| TlsError::new("mqtt.ca_file", path, e))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default TLS versions")
                .with_root_certificates(roots);
        let config = match &self.client_auth {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = read_certs("mqtt.client_cert", cert)?;
                let key_der = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| TlsError::new("mqtt.client_key", key, pem_problem(e)))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| TlsError::new("mqtt.client_key", key, e))?
            }
        };
        Ok(Arc::new(config))
    }
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::new(key, path, pem_problem(e)))?;
    if certs.is_empty() {
        return Err(TlsError::new(key, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn pem_problem(error: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match error {
        Error::Io(e) => e.to_string(),
        Error::NoItemsFound => "holds no PEM item of the expected kind".into(),
        other => format!("not PEM: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_files_name_their_key() {
        let dir = std::env::temp_dir().join(format!("fleetwatch-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let missing = TlsFiles {
            ca_file: Some(dir.join("nope.pem")),
            client_auth: None,
        };
        let error = missing.client_config().expect_err("missing file");
        assert_eq!(error.key, "mqtt.ca_file");
        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").expect("write");
        let error = TlsFiles {
            ca_file: Some(garbage.clone()),
            client_auth: None,
        }
        .client_config()
        .expect_err("no certificate");
        assert!(error.to_string().starts_with("mqtt.ca_file: "), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn without_a_ca_file_the_mozilla_roots_are_trusted() {
        let files = TlsFiles {
            ca_file: None,
            client_auth: None,
        };
        assert!(files.client_config().is_ok());
    }
}
