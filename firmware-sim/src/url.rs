use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

/// Where the broker is and how to reach it:
/// `mqtt://[USER[:PASSWORD]@]HOST[:PORT]` (also `tcp://`, or a bare `HOST:PORT`; port
/// 1883), or `mqtts://…` for TLS (port 8883). Every connection made with it logs in
/// as `login`; a broker whose ACL names devices by username needs one url per device
/// ([`BrokerUrl::with_login`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub login: Option<Login>,
    /// `Some`: TLS.
    pub tls: Option<Tls>,
}

/// A username and password; the password never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Login({:?}, ***)", self.username)
    }
}

/// What a TLS connection trusts: the certificates of a CA file, or the Mozilla roots.
/// The rustls configuration is built once and shared by every connection.
#[derive(Clone)]
pub struct Tls {
    ca_pem: Option<Arc<[u8]>>,
    config: Arc<ClientConfig>,
}

impl Tls {
    /// Trusts the Mozilla roots, as a public broker's certificate needs.
    pub fn public_roots() -> Self {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        Self {
            ca_pem: None,
            config: client_config(roots),
        }
    }

    /// Trusts only the certificates in `pem` (a test CA, a private broker's CA).
    pub fn with_ca(pem: &[u8]) -> Result<Self, std::io::Error> {
        let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| invalid(format!("not PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| invalid(format!("not a usable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(invalid("holds no PEM certificate".into()));
        }
        Ok(Self {
            ca_pem: Some(pem.into()),
            config: client_config(roots),
        })
    }
}

fn client_config(roots: RootCertStore) -> Arc<ClientConfig> {
    // ring, named: the provider the workspace already builds (see Cargo.toml).
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    Arc::new(config)
}

impl PartialEq for Tls {
    fn eq(&self, other: &Self) -> bool {
        self.ca_pem == other.ca_pem
    }
}

impl Eq for Tls {}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.ca_pem {
            Some(pem) => write!(f, "Tls(CA file, {} bytes)", pem.len()),
            None => f.write_str("Tls(Mozilla roots)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid broker url {0:?}: expected mqtt://[USER:PASSWORD@]HOST:PORT or mqtts://…")]
pub struct UrlError(pub String);

impl BrokerUrl {
    /// Plain TCP, no login.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            login: None,
            tls: None,
        }
    }

    /// The same broker, logged into as `username`.
    pub fn with_login(mut self, username: impl Into<String>, password: impl Into<String>) -> Self {
        self.login = Some(Login {
            username: username.into(),
            password: password.into(),
        });
        self
    }

    /// The same broker over TLS, trusting only the CA certificates in the PEM file
    /// at `path`.
    pub fn with_ca_file(mut self, path: impl AsRef<Path>) -> Result<Self, std::io::Error> {
        self.tls = Some(Tls::with_ca(&std::fs::read(path)?)?);
        Ok(self)
    }

    /// Client options for a connection to this broker as `client_id`: address,
    /// login and TLS.
    pub fn mqtt_options(&self, client_id: impl Into<String>) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, self.host.clone(), self.port);
        if let Some(login) = &self.login {
            options.set_credentials(login.username.clone(), login.password.clone());
        }
        if let Some(tls) = &self.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::clone(&tls.config),
            )));
        }
        options
    }
}

impl FromStr for BrokerUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The error shows what was typed, minus a password.
        let err = || {
            UrlError(match (&s.find("://"), s.rfind('@')) {
                (Some(scheme), Some(at)) if s[scheme + 3..at].contains(':') => {
                    let colon = scheme + 3 + s[scheme + 3..at].find(':').unwrap_or(0);
                    format!("{}:***{}", &s[..colon], &s[at..])
                }
                _ => s.to_string(),
            })
        };
        let (rest, tls) = match s.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => (rest, false),
            Some(("mqtts", rest)) => (rest, true),
            Some(_) => return Err(err()),
            None => (s, false),
        };
        let rest = rest.trim_end_matches('/');
        let (login, address) = match rest.rsplit_once('@') {
            Some((userinfo, address)) => {
                let (username, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                if username.is_empty() {
                    return Err(err());
                }
                let login = Login {
                    username: username.to_string(),
                    password: password.to_string(),
                };
                (Some(login), address)
            }
            None => (None, rest),
        };
        let (host, port) = match address.rsplit_once(':') {
            // An IPv6 literal without a port, e.g. [::1]
            Some((host, port)) if !port.contains(']') => {
                (host, port.parse::<u16>().map_err(|_| err())?)
            }
            _ => (address, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(err());
        }
        Ok(Self {
            login,
            tls: tls.then(Tls::public_roots),
            ..Self::new(host, port)
        })
    }
}

/// The url without its password (`mqtts://device-7@broker:8883`).
impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls.is_some() { "mqtts" } else { "mqtt" };
        let user = match &self.login {
            Some(login) => format!("{}@", login.username),
            None => String::new(),
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://{user}[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{user}{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_users_type() {
        assert_eq!(
            "mqtt://127.0.0.1:1884".parse(),
            Ok(BrokerUrl::new("127.0.0.1", 1884))
        );
        assert_eq!("tcp://broker".parse(), Ok(BrokerUrl::new("broker", 1883)));
        assert_eq!("localhost:1".parse(), Ok(BrokerUrl::new("localhost", 1)));
        assert_eq!("mqtt://[::1]:1885".parse(), Ok(BrokerUrl::new("::1", 1885)));
        assert!("http://x:1".parse::<BrokerUrl>().is_err());
        assert!("mqtt://x:port".parse::<BrokerUrl>().is_err());
        assert!("mqtt://:1883".parse::<BrokerUrl>().is_err());
    }

    #[test]
    fn a_login_and_tls_come_from_the_url_and_the_password_never_prints() {
        let url: BrokerUrl = "mqtts://pump-7:s3cret@broker.example".parse().expect("url");
        assert_eq!((url.host.as_str(), url.port), ("broker.example", 8883));
        assert_eq!(
            url.login,
            Some(Login {
                username: "pump-7".into(),
                password: "s3cret".into()
            })
        );
        assert!(url.tls.is_some());
        assert_eq!(url.to_string(), "mqtts://pump-7@broker.example:8883");
        assert!(!format!("{url:?}").contains("s3cret"));
        let error = "mqtts://pump-7:s3cret@broker:nope"
            .parse::<BrokerUrl>()
            .expect_err("bad port")
            .to_string();
        assert!(!error.contains("s3cret"), "{error}");
        assert!(
            BrokerUrl::new("h", 1)
                .with_ca_file("/nonexistent/ca.pem")
                .is_err()
        );
    }
}
