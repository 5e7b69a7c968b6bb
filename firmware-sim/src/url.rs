use std::fmt;
use std::str::FromStr;

/// `mqtt://HOST:PORT` (also `tcp://`, or a bare `HOST:PORT`); the port defaults to 1883.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid broker url {0:?}: expected mqtt://HOST:PORT")]
pub struct UrlError(pub String);

impl BrokerUrl {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
        }
    }
}

impl FromStr for BrokerUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || UrlError(s.to_string());
        let rest = match s.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => rest,
            Some(_) => return Err(err()),
            None => s,
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            // An IPv6 literal without a port, e.g. [::1]
            Some((host, port)) if !port.contains(']') => {
                (host, port.parse::<u16>().map_err(|_| err())?)
            }
            _ => (rest, 1883),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(err());
        }
        Ok(Self::new(host, port))
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "mqtt://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "mqtt://{}:{}", self.host, self.port)
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
}
