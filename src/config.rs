//! Configuration (interface.md section 5): defaults, then an optional TOML file, then
//! `FLEETWATCH_SECTION__KEY` environment variables.
//!
//! Anything wrong stops start-up with one line naming the key: a value of the wrong
//! type, an out-of-range value, an unknown key in the file, and an unknown
//! `FLEETWATCH_*` variable (a misspelled override would otherwise be ignored in
//! silence, and the hub would run on a default the operator thought they had changed).

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::heartbeat::payload::DEFAULT_MAX_PAYLOAD;
use crate::mqtt::tls::{TlsError, TlsFiles};
use crate::notify::SinkSpec;
use crate::notify::filter::FilterSettings;
use crate::registration::Policy;

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_FILE: &str = "fleetwatch.toml";
const ENV_PREFIX: &str = "FLEETWATCH";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub mqtt: MqttSettings,
    pub database: DatabaseSettings,
    pub heartbeat: HeartbeatSettings,
    pub http: HttpSettings,
    pub health: HealthSettings,
    pub devices: DeviceSettings,
    pub notify: NotifySettings,
}

/// Notifications to people and systems (`[notify]`, and one `[[notify.sinks]]` table
/// per receiver).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySettings {
    /// The longest pause between two attempts at one notification.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// How long one attempt may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// A notification not delivered this long after its transition goes to the
    /// dead letters.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Transitions of one kind and group within this window (it opens with the
    /// group's first) are sent together; 0s: no waiting.
    #[serde(with = "humantime_serde")]
    pub group_wait: Duration,
    /// The labels whose values make a group (none: the whole fleet is one).
    /// (`FLEETWATCH_NOTIFY__GROUP_BY=site,kind` in the environment.)
    #[serde(default, deserialize_with = "list_or_commas")]
    pub group_by: Vec<String>,
    /// A group of at least this many transitions is one message; 0: never group.
    pub group_threshold: u32,
    /// An offline or error is told only if the device is still down this long after.
    #[serde(with = "humantime_serde")]
    pub min_offline: Duration,
    /// Remind of a device still down this often after it was told (none: never).
    #[serde(default, with = "humantime_serde")]
    pub repeat_after: Option<Duration>,
    /// The dashboard's address as people reach it, for links in grouped messages.
    #[serde(default)]
    pub dashboard_url: Option<String>,
    #[serde(default)]
    pub sinks: Vec<SinkSettings>,
}

/// One receiver as written in the file; [`Settings::sinks`] checks it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSettings {
    /// How the API and the metrics call it: letters, digits, `-` and `_`.
    pub name: String,
    /// `webhook`, `telegram` or `slack`.
    pub kind: String,
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// webhook, slack: where to POST.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<Secret>,
    /// webhook: the signing secret, `whsec_<base64>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secret>,
    /// telegram: the bot token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// telegram: the chat, a number or `@channel`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "text_or_number"
    )]
    pub chat_id: Option<String>,
    /// telegram: the Bot API's address (default the public one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    #[serde(default)]
    pub filter: FilterSettings,
}

fn enabled_by_default() -> bool {
    true
}

/// A TOML string or integer (Telegram chat ids are numbers, channels `@names`).
fn text_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum TextOrNumber {
        Text(String),
        Number(i64),
    }
    Ok(Option::<TextOrNumber>::deserialize(d)?.map(|v| match v {
        TextOrNumber::Text(text) => text,
        TextOrNumber::Number(n) => n.to_string(),
    }))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSettings {
    /// A first heartbeat from an unknown id registers it.
    pub auto_register: bool,
    /// The most devices the hub holds (0: no cap). New ids beyond it are refused.
    pub max_devices: u64,
    /// New devices per second by heartbeat (0: no limit), and how many may come at once.
    pub registration_rate: f64,
    pub registration_burst: u64,
}

impl DeviceSettings {
    pub fn policy(&self) -> Policy {
        Policy {
            auto_register: self.auto_register,
            max_devices: (self.max_devices > 0).then_some(self.max_devices),
            rate: (self.registration_rate > 0.0).then_some(self.registration_rate),
            burst: self.registration_burst,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerMode {
    /// rumqttd inside the hub, listening on `mqtt.listen`.
    Embedded,
    /// A broker of the operator's (Mosquitto, EMQX) at `mqtt.url`.
    External,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSettings {
    pub broker: BrokerMode,
    /// Where the embedded broker listens for devices.
    #[serde(with = "address")]
    pub listen: SocketAddr,
    /// The external broker: `mqtt://[USER:PASSWORD@]HOST[:PORT]`, or `mqtts://` for TLS.
    pub url: String,
    /// The hub's login on the external broker, kept out of `mqtt.url` (so the password
    /// can come from its own variable). Not both: [`Settings::external_broker`].
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// `mqtts://`: PEM certificates the broker's certificate must chain to (default:
    /// the Mozilla roots).
    pub ca_file: Option<PathBuf>,
    /// `mqtts://`: a PEM certificate chain and its private key, for brokers that ask
    /// clients for one.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Prefix of the hub's MQTT client ids; empty picks a unique one per start.
    pub client_id: String,
    /// Several hubs: the MQTT shared subscription group they read heartbeats through
    /// (`$share/{group}/devices/+/heartbeat`), so the broker hands each message to one
    /// of them. Empty: a plain subscription (one hub).
    pub shared_group: String,
    /// The embedded broker admits only registered devices with their secret
    /// (`POST /api/v1/devices/{id}/credentials`), client id = username = device id.
    pub require_login: bool,
}

impl<'de> Deserialize<'de> for BrokerMode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.as_str() {
            "embedded" => Ok(BrokerMode::Embedded),
            "external" => Ok(BrokerMode::External),
            other => Err(serde::de::Error::custom(format!(
                "{other:?} is not a broker mode (expected \"embedded\" or \"external\")"
            ))),
        }
    }
}

/// A TOML array of strings, or one string of comma-separated values (as an
/// environment variable gives it).
fn list_or_commas<'de, D: serde::Deserializer<'de>, T: From<String>>(
    deserializer: D,
) -> Result<Vec<T>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrString {
        List(Vec<String>),
        String(String),
    }
    let items = match ListOrString::deserialize(deserializer)? {
        ListOrString::List(items) => items,
        ListOrString::String(text) if text.trim().is_empty() => Vec::new(),
        ListOrString::String(text) => text.split(',').map(|s| s.trim().to_string()).collect(),
    };
    Ok(items.into_iter().map(T::from).collect())
}

/// Socket addresses with a message that shows the value and the expected form.
mod address {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(addr: &SocketAddr, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(addr)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(|_| {
            serde::de::Error::custom(format!(
                "{text:?} is not a socket address (expected IP:PORT, e.g. 0.0.0.0:1883)"
            ))
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite://PATH` (created if missing) or `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`.
    pub url: String,
    /// PostgreSQL: connections in the pool (SQLite keeps its own four).
    pub max_connections: u32,
    /// PostgreSQL: the server cancels a statement running longer than this.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
}

impl DatabaseSettings {
    /// The URL with any password replaced by `***`, for logs.
    pub fn redacted_url(&self) -> String {
        redact_password(&self.url)
    }

    /// The PostgreSQL store's settings.
    pub fn postgres(&self) -> crate::storage::postgres::PgSettings {
        crate::storage::postgres::PgSettings {
            max_connections: self.max_connections,
            statement_timeout: self.statement_timeout,
        }
    }
}

/// `scheme://user:secret@host/...` as `scheme://user:***@host/...`.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatSettings {
    /// Silence after which an online device is declared offline, unless it has an
    /// `offline_after` of its own, declares its interval or matches a label rule
    /// ([`crate::deadline`]).
    #[serde(with = "humantime_serde")]
    pub offline_after: Duration,
    /// A device that declares its heartbeat interval goes offline after this many
    /// of its heartbeats are missing.
    pub missed_beats: u32,
    /// `[[heartbeat.rules]]`: the `offline_after` of devices carrying some labels
    /// (and neither their own setting nor an interval); the first match wins.
    #[serde(default)]
    pub rules: Vec<crate::deadline::Rule>,
    /// How often the offline checker runs; detection lags a deadline by at most this
    /// plus one flush.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// Longest a received heartbeat waits before it is committed.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Messages the subscriber may queue for the handler before it stops reading.
    pub queue_capacity: usize,
    /// Distinct devices pending that trigger a flush before `flush_interval`.
    pub max_batch: usize,
    /// Largest accepted heartbeat payload, in bytes.
    pub max_payload: usize,
    /// Distinct devices whose heartbeats the hub holds while commits fail; past this
    /// it stops reading (the broker buffers; HTTP heartbeats get 503).
    pub max_uncommitted: usize,
    /// About how much memory those held heartbeats may take, in bytes (fields of
    /// 64 metrics with long names make one device's report tens of kilobytes).
    pub max_uncommitted_bytes: usize,
}

impl HeartbeatSettings {
    /// The fleet's rules for devices without an `offline_after` of their own.
    pub fn deadlines(&self) -> crate::deadline::Deadlines {
        crate::deadline::Deadlines {
            default: self.offline_after,
            missed_beats: self.missed_beats,
            rules: self.rules.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    /// `/healthz` and `/readyz` fail once a received heartbeat has waited this long to
    /// be committed.
    #[serde(with = "humantime_serde")]
    pub commit_lag: Duration,
    /// `/healthz` fails once status events have waited this long without the broker
    /// acknowledging any.
    #[serde(with = "humantime_serde")]
    pub publish_lag: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    #[serde(with = "address")]
    pub listen: SocketAddr,
    /// The API key clients send as `Authorization: Bearer <key>`.
    pub api_key: Option<Secret>,
    /// More accepted keys, for rotation: add the new key here, move clients over,
    /// then retire the old one. (`FLEETWATCH_HTTP__API_KEYS=a,b` in the environment.)
    #[serde(default, deserialize_with = "list_or_commas")]
    pub api_keys: Vec<Secret>,
    /// Open HTTP connections at once; more clients wait to be accepted. Lowered at
    /// start if the open-file limit has no room for it.
    pub max_connections: usize,
    /// Requests in progress at once (probes excepted); more are answered 503 at once.
    pub max_requests: usize,
    /// A connection that has not sent a whole request head within this (after it
    /// opened, or after its previous response) is closed.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A request not answered within this is answered 503.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl HttpSettings {
    /// Every accepted key.
    pub fn keys(&self) -> Vec<Secret> {
        self.api_key.iter().chain(&self.api_keys).cloned().collect()
    }
}

/// A value that never appears in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            mqtt: MqttSettings {
                broker: BrokerMode::Embedded,
                listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
                url: "mqtt://127.0.0.1:1883".into(),
                username: None,
                password: None,
                ca_file: None,
                client_cert: None,
                client_key: None,
                client_id: String::new(),
                shared_group: String::new(),
                require_login: false,
            },
            database: DatabaseSettings {
                url: "sqlite://fleetwatch.db".into(),
                max_connections: 10,
                statement_timeout: Duration::from_secs(30),
            },
            heartbeat: HeartbeatSettings {
                offline_after: Duration::from_secs(180),
                missed_beats: 3,
                rules: Vec::new(),
                check_interval: Duration::from_millis(250),
                flush_interval: Duration::from_millis(250),
                queue_capacity: 16_384,
                max_batch: 20_000,
                max_payload: DEFAULT_MAX_PAYLOAD,
                max_uncommitted: 200_000,
                max_uncommitted_bytes: 256 * 1024 * 1024,
            },
            http: HttpSettings {
                listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
                api_key: None,
                api_keys: Vec::new(),
                max_connections: 1024,
                max_requests: 256,
                header_timeout: Duration::from_secs(5),
                request_timeout: Duration::from_secs(10),
            },
            health: HealthSettings {
                commit_lag: Duration::from_secs(10),
                publish_lag: Duration::from_secs(30),
            },
            devices: DeviceSettings {
                auto_register: true,
                max_devices: 1_000_000,
                registration_rate: 1_000.0,
                registration_burst: 10_000,
            },
            notify: NotifySettings {
                retry_max: Duration::from_secs(60),
                timeout: Duration::from_secs(10),
                max_age: Duration::from_secs(24 * 3600),
                group_wait: Duration::from_secs(10),
                group_by: Vec::new(),
                group_threshold: 10,
                min_offline: Duration::ZERO,
                repeat_after: None,
                dashboard_url: None,
                sinks: Vec::new(),
            },
        }
    }
}

/// A configuration problem, as the one line start-up prints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn key(key: &str, problem: impl fmt::Display) -> Self {
        Self(format!("{key}: {problem}"))
    }
}

/// Where the file layer comes from.
enum FileLayer<'a> {
    Path(&'a Path),
    Text(&'a str),
}

impl From<TlsError> for ConfigError {
    fn from(error: TlsError) -> Self {
        Self::key(error.key, format!("{}: {}", error.path, error.problem))
    }
}

/// The parsed external broker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub credentials: Option<(String, String)>,
    /// `mqtts://`.
    pub tls: bool,
}

/// The external broker as the hub reaches it: `mqtt.url` with the login and TLS keys
/// folded in and checked against each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalBroker {
    pub host: String,
    pub port: u16,
    /// Username and password, from `mqtt.url` or from `mqtt.username`/`mqtt.password`.
    pub login: Option<(String, Secret)>,
    /// `Some` for `mqtts://`; the files are read when the hub starts.
    pub tls: Option<TlsFiles>,
}

impl Settings {
    /// Loads the layers from the real environment. `file`: `--config`, which must
    /// exist; without it `fleetwatch.toml` is read if present.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Loads the layers with `vars` as the environment.
    pub fn load_from(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let file = match file {
            Some(path) if !path.is_file() => {
                return Err(ConfigError(format!(
                    "--config {}: no such file",
                    path.display()
                )));
            }
            Some(path) => Some(path.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_FILE)).filter(|p| p.is_file()),
        };
        Self::load_layers(file.as_deref().map(FileLayer::Path), vars)
    }

    /// Loads the layers with `toml` as the configuration file's text and `vars` as the
    /// environment.
    pub fn load_from_toml(
        toml: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Self::load_layers(Some(FileLayer::Text(toml)), vars)
    }

    fn load_layers(
        file: Option<FileLayer<'_>>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(name, _)| name.starts_with(&format!("{ENV_PREFIX}_")))
            .collect();
        check_env_names(&vars)?;

        let defaults = config::Config::try_from(&Settings::default())
            .map_err(|e| ConfigError(format!("built-in defaults: {e}")))?;
        let mut builder = config::Config::builder().add_source(defaults);
        let file = match file {
            Some(FileLayer::Path(path)) => {
                builder = builder.add_source(config::File::from(path).required(true));
                Some(path)
            }
            Some(FileLayer::Text(text)) => {
                builder =
                    builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
                None
            }
            None => None,
        };
        let environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator("__")
            .source(Some(vars.iter().cloned().collect()));
        let merged = builder
            .add_source(environment)
            .build()
            .map_err(|e| describe(e, file, &vars))?;
        let settings: Settings = merged
            .try_deserialize()
            .map_err(|e| describe(e, file, &vars))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what types cannot: ranges and URLs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let hb = &self.heartbeat;
        for (key, value) in [
            ("heartbeat.offline_after", hb.offline_after),
            ("heartbeat.check_interval", hb.check_interval),
            ("heartbeat.flush_interval", hb.flush_interval),
            ("http.header_timeout", self.http.header_timeout),
            ("http.request_timeout", self.http.request_timeout),
            ("notify.retry_max", self.notify.retry_max),
            ("notify.timeout", self.notify.timeout),
            ("notify.max_age", self.notify.max_age),
            ("health.commit_lag", self.health.commit_lag),
            ("health.publish_lag", self.health.publish_lag),
            (
                "database.statement_timeout",
                self.database.statement_timeout,
            ),
        ] {
            if value.is_zero() {
                return Err(ConfigError::key(key, "must be greater than zero"));
            }
        }
        for (key, value, max) in [
            ("heartbeat.queue_capacity", hb.queue_capacity, 1_000_000),
            ("heartbeat.max_batch", hb.max_batch, 1_000_000),
            ("heartbeat.missed_beats", hb.missed_beats as usize, 1_000),
            ("heartbeat.max_payload", hb.max_payload, 16 * 1024 * 1024),
            ("heartbeat.max_uncommitted", hb.max_uncommitted, 100_000_000),
            (
                "heartbeat.max_uncommitted_bytes",
                hb.max_uncommitted_bytes,
                64 * 1024 * 1024 * 1024,
            ),
            ("http.max_connections", self.http.max_connections, 1_000_000),
            ("http.max_requests", self.http.max_requests, 1_000_000),
            (
                "database.max_connections",
                self.database.max_connections as usize,
                1_000,
            ),
        ] {
            if value == 0 || value > max {
                return Err(ConfigError::key(
                    key,
                    format!("{value} is out of range (1 to {max})"),
                ));
            }
        }
        for (n, rule) in hb.rules.iter().enumerate() {
            if rule.labels.is_empty() {
                return Err(ConfigError::key(
                    &format!("heartbeat.rules[{n}].labels"),
                    "must name at least one label (heartbeat.offline_after is the rule for every device)",
                ));
            }
            if let Err(why) = crate::deadline::bounded(rule.offline_after) {
                return Err(ConfigError::key(
                    &format!("heartbeat.rules[{n}].offline_after"),
                    why.to_string(),
                ));
            }
        }
        if hb.max_uncommitted < hb.max_batch {
            return Err(ConfigError::key(
                "heartbeat.max_uncommitted",
                format!(
                    "{} is below heartbeat.max_batch ({}): the hub could not hold one batch",
                    hb.max_uncommitted, hb.max_batch
                ),
            ));
        }
        let rate = self.devices.registration_rate;
        if !rate.is_finite() || rate < 0.0 {
            return Err(ConfigError::key(
                "devices.registration_rate",
                format!("{rate} is not a rate (new devices per second, 0 for no limit)"),
            ));
        }
        if self.devices.registration_burst == 0 {
            return Err(ConfigError::key(
                "devices.registration_burst",
                "must be at least 1",
            ));
        }
        self.sinks()?;
        self.policy()?;
        match self.mqtt.broker {
            BrokerMode::External => {
                self.external_broker()?;
            }
            BrokerMode::Embedded => {
                if let Some(key) = self.external_only_keys().first() {
                    return Err(ConfigError::key(
                        key,
                        "applies to an external broker: set mqtt.broker = \"external\"",
                    ));
                }
            }
        }
        let keys = self.http.keys();
        if keys.iter().any(|key| key.expose().trim().is_empty()) {
            return Err(ConfigError::key("http.api_key", "must not be empty"));
        }
        if keys.is_empty() && !self.http.listen.ip().is_loopback() {
            return Err(ConfigError::key(
                "http.listen",
                format!(
                    "{} is reachable from the network but no http.api_key is set; set \
                     FLEETWATCH_HTTP__API_KEY, or listen on 127.0.0.1",
                    self.http.listen
                ),
            ));
        }
        if !crate::storage::supported_url(&self.database.url) {
            return Err(ConfigError::key(
                "database.url",
                format!(
                    "{:?} is not supported (expected sqlite://PATH or postgres://USER@HOST/DB)",
                    self.database.redacted_url()
                ),
            ));
        }
        let group = &self.mqtt.shared_group;
        if !group.is_empty() {
            if !group
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(ConfigError::key(
                    "mqtt.shared_group",
                    format!("{group:?} may hold only letters, digits, '-', '_' and '.'"),
                ));
            }
            if self.mqtt.broker == BrokerMode::Embedded {
                return Err(ConfigError::key(
                    "mqtt.shared_group",
                    "several hubs share an external broker: set mqtt.broker = \"external\"",
                ));
            }
            if self.database.url.starts_with("sqlite:") {
                return Err(ConfigError::key(
                    "mqtt.shared_group",
                    "several hubs share one PostgreSQL database: set database.url to postgres://…",
                ));
            }
        }
        if self.mqtt.require_login && self.mqtt.broker == BrokerMode::External {
            return Err(ConfigError::key(
                "mqtt.require_login",
                "is the embedded broker's device login; an external broker checks its own \
                 (Mosquitto: password_file and acl_file): set mqtt.broker = \"embedded\" or \
                 leave mqtt.require_login off",
            ));
        }
        if !self.mqtt.client_id.is_empty()
            && !self
                .mqtt
                .client_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ConfigError::key(
                "mqtt.client_id",
                "may only contain letters, digits and - _ .",
            ));
        }
        Ok(())
    }

    /// The notification sinks, checked: each kind has what it needs, names are unique.
    pub fn sinks(&self) -> Result<Vec<SinkSpec>, ConfigError> {
        let mut seen = BTreeSet::new();
        let mut specs = Vec::with_capacity(self.notify.sinks.len());
        for (i, sink) in self.notify.sinks.iter().enumerate() {
            let key = format!("notify.sinks[{i}]");
            let spec = SinkSpec::parse(sink).map_err(|why| ConfigError::key(&key, why))?;
            if !seen.insert(spec.name.clone()) {
                return Err(ConfigError::key(
                    &key,
                    format!("a second sink named {:?}", spec.name),
                ));
            }
            specs.push(spec);
        }
        Ok(specs)
    }

    /// The alert policy (`notify.group_*`, `min_offline`, `repeat_after`), checked.
    pub fn policy(&self) -> Result<crate::notify::policy::PolicySettings, ConfigError> {
        let n = &self.notify;
        for (key, value, max) in [
            ("notify.group_wait", n.group_wait, Duration::from_secs(3600)),
            (
                "notify.min_offline",
                n.min_offline,
                Duration::from_secs(86_400),
            ),
        ] {
            if value > max {
                return Err(ConfigError::key(
                    key,
                    format!(
                        "{} is over {}",
                        humantime::format_duration(value),
                        humantime::format_duration(max)
                    ),
                ));
            }
        }
        if let Some(every) = n.repeat_after
            && (every < Duration::from_secs(1) || every > Duration::from_secs(30 * 86_400))
        {
            return Err(ConfigError::key(
                "notify.repeat_after",
                "must be between 1s and 30days (leave it out for no reminders)",
            ));
        }
        if n.group_threshold > 1_000_000 {
            return Err(ConfigError::key(
                "notify.group_threshold",
                format!(
                    "{} is out of range (0 to 1000000; 0: never group)",
                    n.group_threshold
                ),
            ));
        }
        if n.group_by.len() > crate::labels::MAX_LABELS
            || n.group_by.iter().any(|k| !crate::labels::valid_key(k))
        {
            return Err(ConfigError::key(
                "notify.group_by",
                "label keys (letters, digits, _ . / -; at most 16)",
            ));
        }
        if let Some(url) = &n.dashboard_url
            && !matches!(reqwest::Url::parse(url), Ok(u) if matches!(u.scheme(), "http" | "https"))
        {
            return Err(ConfigError::key(
                "notify.dashboard_url",
                format!("{url:?} is not an http(s) address"),
            ));
        }
        Ok(crate::notify::policy::PolicySettings {
            group_wait: n.group_wait,
            group_by: n.group_by.clone(),
            group_threshold: n.group_threshold,
            min_offline: n.min_offline,
            repeat_after: n.repeat_after,
            dashboard_url: n.dashboard_url.clone(),
            deadlines: self.heartbeat.deadlines(),
        })
    }

    /// `mqtt.url`, parsed.
    pub fn broker_url(&self) -> Result<BrokerUrl, ConfigError> {
        parse_broker_url(&self.mqtt.url).map_err(|why| ConfigError::key("mqtt.url", why))
    }

    /// The external broker with its login and TLS settings. Contradictions are refused
    /// rather than resolved by a precedence rule: a login both in `mqtt.url` and in
    /// `mqtt.username`/`mqtt.password`, TLS files with a plain `mqtt://` url (the
    /// scheme alone says whether the connection is encrypted), half a client
    /// certificate. An empty value counts as not set.
    pub fn external_broker(&self) -> Result<ExternalBroker, ConfigError> {
        let url = self.broker_url()?;
        let mqtt = &self.mqtt;
        let username = mqtt.username.as_ref().filter(|u| !u.is_empty());
        let password = mqtt.password.as_ref().filter(|p| !p.expose().is_empty());
        let login = match (url.credentials, username, password) {
            (Some(_), Some(_), _) | (Some(_), None, Some(_)) => {
                let key = if username.is_some() {
                    "mqtt.username"
                } else {
                    "mqtt.password"
                };
                return Err(ConfigError::key(
                    key,
                    "mqtt.url already carries a login (USER:PASSWORD@); give it in one place",
                ));
            }
            (Some((user, password)), None, None) => Some((user, Secret::new(password))),
            (None, Some(user), password) => Some((
                user.clone(),
                password.cloned().unwrap_or_else(|| Secret::new("")),
            )),
            (None, None, Some(_)) => {
                return Err(ConfigError::key(
                    "mqtt.password",
                    "is set but mqtt.username is not",
                ));
            }
            (None, None, None) => None,
        };
        let file = |path: &Option<PathBuf>| path.clone().filter(|p| !p.as_os_str().is_empty());
        let (ca_file, cert, key) = (
            file(&mqtt.ca_file),
            file(&mqtt.client_cert),
            file(&mqtt.client_key),
        );
        let client_auth = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::key(
                    "mqtt.client_key",
                    "mqtt.client_cert needs its private key",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::key(
                    "mqtt.client_cert",
                    "mqtt.client_key is set without its certificate",
                ));
            }
        };
        let tls = if url.tls {
            Some(TlsFiles {
                ca_file,
                client_auth,
            })
        } else {
            let given = [
                ("mqtt.ca_file", ca_file.is_some()),
                ("mqtt.client_cert", client_auth.is_some()),
            ];
            if let Some((key, _)) = given.iter().find(|(_, set)| *set) {
                return Err(ConfigError::key(
                    key,
                    format!(
                        "is for TLS, but mqtt.url {:?} is plain: use mqtts://HOST[:8883]",
                        redact_password(&mqtt.url)
                    ),
                ));
            }
            None
        };
        Ok(ExternalBroker {
            host: url.host,
            port: url.port,
            login,
            tls,
        })
    }

    /// The keys that only an external broker uses, among those set.
    fn external_only_keys(&self) -> Vec<&'static str> {
        let mqtt = &self.mqtt;
        let path = |p: &Option<PathBuf>| p.as_ref().is_some_and(|p| !p.as_os_str().is_empty());
        [
            (
                "mqtt.username",
                mqtt.username.as_ref().is_some_and(|u| !u.is_empty()),
            ),
            (
                "mqtt.password",
                mqtt.password
                    .as_ref()
                    .is_some_and(|p| !p.expose().is_empty()),
            ),
            ("mqtt.ca_file", path(&mqtt.ca_file)),
            ("mqtt.client_cert", path(&mqtt.client_cert)),
            ("mqtt.client_key", path(&mqtt.client_key)),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }
}

fn parse_broker_url(url: &str) -> Result<BrokerUrl, String> {
    // Error messages show the url without its password.
    let shown = redact_password(url);
    let (rest, tls) = match url.split_once("://") {
        Some(("mqtt" | "tcp", rest)) => (rest, false),
        Some(("mqtts", rest)) => (rest, true),
        Some((scheme, _)) => {
            return Err(format!(
                "{shown:?}: scheme {scheme:?} is not supported (expected mqtt://HOST:PORT or mqtts://HOST:PORT)"
            ));
        }
        None => {
            return Err(format!(
                "{shown:?} is not a URL (expected mqtt://HOST:PORT)"
            ));
        }
    };
    let rest = rest.trim_end_matches('/');
    let (credentials, address) = match rest.rsplit_once('@') {
        Some((userinfo, address)) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            (Some((user.to_string(), password.to_string())), address)
        }
        None => (None, rest),
    };
    let (host, port) = match address.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => {
            let port = port
                .parse::<u16>()
                .map_err(|_| format!("{shown:?}: {port:?} is not a port number"))?;
            (host, port)
        }
        _ => (address, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') || host.contains('?') {
        return Err(format!(
            "{shown:?} has no valid host (expected mqtt://HOST:PORT)"
        ));
    }
    Ok(BrokerUrl {
        host: host.to_string(),
        port,
        credentials,
        tls,
    })
}

/// Every key the settings have, as `section.key`.
fn known_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    if let Ok(serde_json::Value::Object(sections)) = serde_json::to_value(Settings::default()) {
        for (section, fields) in sections {
            if let serde_json::Value::Object(fields) = fields {
                keys.extend(fields.keys().map(|field| format!("{section}.{field}")));
            }
        }
    }
    keys
}

fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}_{}", key.replace('.', "__")).to_uppercase()
}

/// Refuses `FLEETWATCH_*` variables that name no setting, suggesting the right name.
fn check_env_names(vars: &[(String, String)]) -> Result<(), ConfigError> {
    let known = known_keys();
    for (name, _) in vars {
        let matches = known.iter().any(|key| env_name(key) == name.to_uppercase());
        if matches {
            continue;
        }
        let squashed = |s: &str| s.to_uppercase().replace('_', "");
        let suggestion = known
            .iter()
            .map(|key| env_name(key))
            .find(|candidate| squashed(candidate) == squashed(name));
        return Err(ConfigError(match suggestion {
            Some(right) => format!("{name} is not a setting; did you mean {right}?"),
            None => format!(
                "{name} is not a setting (expected FLEETWATCH_SECTION__KEY, e.g. FLEETWATCH_HEARTBEAT__OFFLINE_AFTER)"
            ),
        }));
    }
    Ok(())
}

/// Turns a `config` error into one line that names the key and where it came from.
fn describe(
    error: config::ConfigError,
    file: Option<&Path>,
    vars: &[(String, String)],
) -> ConfigError {
    use config::ConfigError as E;
    let line = match &error {
        E::Type {
            unexpected,
            expected,
            key,
            ..
        } => {
            let key = &dotted(key.as_deref().unwrap_or("?"));
            format!(
                "{key}: expected {expected}, found {unexpected}{}",
                origin(key, file, vars)
            )
        }
        E::At { error, key, .. } => {
            let key = &dotted(key.as_deref().unwrap_or("?"));
            let mut problem = one_line(&error.to_string());
            if problem.contains("expected a duration") {
                problem.push_str(" such as \"90s\" or \"3m\"");
            }
            format!("{key}: {problem}{}", origin(key, file, vars))
        }
        E::FileParse { uri, cause } => {
            let path = uri
                .clone()
                .or_else(|| file.map(|p| p.display().to_string()))
                .unwrap_or_default();
            format!("{path}: {}", one_line(&cause.to_string()))
        }
        other => one_line(&other.to_string()),
    };
    ConfigError(line)
}

/// A key as the configuration crate writes it, with the dot it leaves out after an
/// index put back: `heartbeat.rules[0]labels` as `heartbeat.rules[0].labels`.
fn dotted(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 2);
    let mut after_index = false;
    for c in key.chars() {
        if after_index && (c.is_alphanumeric() || c == '_') {
            out.push('.');
        }
        after_index = c == ']';
        out.push(c);
    }
    out
}

/// Where `key`'s value came from: its environment variable if set, else the file.
fn origin(key: &str, file: Option<&Path>, vars: &[(String, String)]) -> String {
    let var = env_name(key);
    if vars.iter().any(|(name, _)| name.eq_ignore_ascii_case(&var)) {
        format!(" (from {var})")
    } else if let Some(file) = file {
        format!(" (in {})", file.display())
    } else {
        String::new()
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Settings::load_from(None, vars)
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let settings = load(&[]).expect("defaults load");
        assert_eq!(settings, Settings::default());
        assert_eq!(settings.mqtt.broker, BrokerMode::Embedded);
        assert_eq!(settings.mqtt.listen.to_string(), "0.0.0.0:1883");
        assert_eq!(settings.heartbeat.offline_after, Duration::from_secs(180));
        assert_eq!(settings.http.listen.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn environment_overrides_take_effect() {
        let settings = load(&[
            ("FLEETWATCH_HEARTBEAT__OFFLINE_AFTER", "90s"),
            ("FLEETWATCH_HEARTBEAT__CHECK_INTERVAL", "100ms"),
            ("FLEETWATCH_HEARTBEAT__QUEUE_CAPACITY", "5"),
            ("FLEETWATCH_MQTT__BROKER", "external"),
            ("FLEETWATCH_MQTT__LISTEN", "127.0.0.1:1884"),
            ("FLEETWATCH_MQTT__URL", "mqtt://user:pw@broker.local:1885"),
            ("FLEETWATCH_DATABASE__URL", "sqlite:///tmp/x.db"),
            ("FLEETWATCH_HTTP__API_KEY", "12345"),
            ("FLEETWATCH_HTTP__MAX_CONNECTIONS", "300"),
            ("FLEETWATCH_HTTP__MAX_REQUESTS", "40"),
            ("FLEETWATCH_HTTP__HEADER_TIMEOUT", "2s"),
            ("FLEETWATCH_HTTP__REQUEST_TIMEOUT", "3s"),
            ("FLEETWATCH_HEARTBEAT__MAX_UNCOMMITTED", "1000"),
            ("FLEETWATCH_HEARTBEAT__MAX_BATCH", "500"),
            ("FLEETWATCH_HEARTBEAT__MAX_UNCOMMITTED_BYTES", "1000000"),
            ("FLEETWATCH_HEALTH__COMMIT_LAG", "4s"),
            ("FLEETWATCH_HEALTH__PUBLISH_LAG", "1m"),
            ("FLEETWATCH_DEVICES__AUTO_REGISTER", "false"),
            ("FLEETWATCH_DEVICES__MAX_DEVICES", "0"),
            ("FLEETWATCH_DEVICES__REGISTRATION_RATE", "2.5"),
            ("FLEETWATCH_DEVICES__REGISTRATION_BURST", "7"),
        ])
        .expect("overrides load");
        let postgres = load(&[
            (
                "FLEETWATCH_DATABASE__URL",
                "postgres://hub:s3cret@db.local/fleet",
            ),
            ("FLEETWATCH_DATABASE__MAX_CONNECTIONS", "25"),
            ("FLEETWATCH_MQTT__BROKER", "external"),
            ("FLEETWATCH_MQTT__SHARED_GROUP", "hubs"),
            ("FLEETWATCH_DATABASE__STATEMENT_TIMEOUT", "5s"),
        ])
        .expect("a PostgreSQL url loads");
        assert_eq!(
            postgres.database.postgres(),
            crate::storage::postgres::PgSettings {
                max_connections: 25,
                statement_timeout: Duration::from_secs(5),
            }
        );
        assert_eq!(postgres.mqtt.shared_group, "hubs");
        assert_eq!(
            postgres.database.redacted_url(),
            "postgres://hub:***@db.local/fleet",
            "the password never reaches a log line"
        );
        assert_eq!(
            settings.devices.policy(),
            Policy {
                auto_register: false,
                max_devices: None,
                rate: Some(2.5),
                burst: 7
            }
        );
        let http = &settings.http;
        assert_eq!((http.max_connections, http.max_requests), (300, 40));
        assert_eq!(
            (http.header_timeout, http.request_timeout),
            (Duration::from_secs(2), Duration::from_secs(3))
        );
        assert_eq!(settings.heartbeat.max_uncommitted, 1000);
        assert_eq!(settings.heartbeat.max_uncommitted_bytes, 1_000_000);
        assert_eq!(
            (settings.health.commit_lag, settings.health.publish_lag),
            (Duration::from_secs(4), Duration::from_secs(60))
        );
        assert_eq!(settings.heartbeat.offline_after, Duration::from_secs(90));
        assert_eq!(
            settings.heartbeat.check_interval,
            Duration::from_millis(100)
        );
        assert_eq!(settings.heartbeat.queue_capacity, 5);
        assert_eq!(settings.mqtt.broker, BrokerMode::External);
        assert_eq!(settings.mqtt.listen.to_string(), "127.0.0.1:1884");
        assert_eq!(settings.database.url, "sqlite:///tmp/x.db");
        assert_eq!(
            settings.http.api_key.as_ref().map(Secret::expose),
            Some("12345")
        );
        let url = settings.broker_url().expect("valid url");
        assert_eq!((url.host.as_str(), url.port), ("broker.local", 1885));
        assert_eq!(url.credentials, Some(("user".into(), "pw".into())));
        let broker = settings.external_broker().expect("external broker");
        assert_eq!(broker.login, Some(("user".into(), Secret::new("pw"))));
        assert_eq!(broker.tls, None, "mqtt:// is plain");

        let secure = load(&[
            ("FLEETWATCH_MQTT__BROKER", "external"),
            ("FLEETWATCH_MQTT__URL", "mqtts://broker.local"),
            ("FLEETWATCH_MQTT__USERNAME", "fleetwatch-hub"),
            ("FLEETWATCH_MQTT__PASSWORD", "s3cret"),
            ("FLEETWATCH_MQTT__CA_FILE", "/etc/fleetwatch/ca.crt"),
            ("FLEETWATCH_MQTT__CLIENT_CERT", "/etc/fleetwatch/hub.crt"),
            ("FLEETWATCH_MQTT__CLIENT_KEY", "/etc/fleetwatch/hub.key"),
        ])
        .expect("a TLS login loads");
        let broker = secure.external_broker().expect("external broker");
        assert_eq!((broker.host.as_str(), broker.port), ("broker.local", 8883));
        assert_eq!(
            broker.login,
            Some(("fleetwatch-hub".into(), Secret::new("s3cret")))
        );
        assert_eq!(
            broker.tls,
            Some(TlsFiles {
                ca_file: Some("/etc/fleetwatch/ca.crt".into()),
                client_auth: Some((
                    "/etc/fleetwatch/hub.crt".into(),
                    "/etc/fleetwatch/hub.key".into()
                )),
            })
        );
        assert!(!format!("{secure:?}").contains("s3cret"));
    }

    #[test]
    fn contradictory_broker_settings_name_their_key() {
        let external = |url: &'static str, more: &[(&'static str, &'static str)]| {
            let mut vars = vec![
                ("FLEETWATCH_MQTT__BROKER", "external"),
                ("FLEETWATCH_MQTT__URL", url),
            ];
            vars.extend_from_slice(more);
            load(&vars)
        };
        let cases = [
            (
                external("mqtt://u:p@b", &[("FLEETWATCH_MQTT__USERNAME", "hub")]),
                "mqtt.username",
            ),
            (
                external("mqtt://u:p@b", &[("FLEETWATCH_MQTT__PASSWORD", "pw")]),
                "mqtt.password",
            ),
            (
                external("mqtt://b", &[("FLEETWATCH_MQTT__PASSWORD", "pw")]),
                "mqtt.password",
            ),
            (
                external("mqtt://b", &[("FLEETWATCH_MQTT__CA_FILE", "/ca.crt")]),
                "mqtt.ca_file",
            ),
            (
                external("mqtts://b", &[("FLEETWATCH_MQTT__CLIENT_CERT", "/hub.crt")]),
                "mqtt.client_key",
            ),
            (
                external("mqtts://b", &[("FLEETWATCH_MQTT__CLIENT_KEY", "/hub.key")]),
                "mqtt.client_cert",
            ),
            (external("ssl://b", &[]), "mqtt.url"),
            (
                load(&[("FLEETWATCH_MQTT__USERNAME", "hub")]),
                "mqtt.username",
            ),
        ];
        for (i, (result, named)) in cases.into_iter().enumerate() {
            let error = result.expect_err(named).to_string();
            assert!(error.contains(named), "case {i}: {error}");
            assert!(!error.contains('\n'), "case {i}: {error}");
        }
        let error = external("mqtt://u:hunter2@b:port", &[])
            .expect_err("bad port")
            .to_string();
        assert!(!error.contains("hunter2"), "{error}");
        // An empty variable is as good as unset.
        let settings = external("mqtt://b", &[("FLEETWATCH_MQTT__CA_FILE", "")]).expect("loads");
        assert_eq!(settings.external_broker().expect("valid").tls, None);
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (
                "FLEETWATCH_HEARTBEAT__OFFLINE_AFTER",
                "banana",
                "heartbeat.offline_after",
            ),
            (
                "FLEETWATCH_HEARTBEAT__OFFLINE_AFTER",
                "0s",
                "heartbeat.offline_after",
            ),
            ("FLEETWATCH_MQTT__BROKER", "carrier_pigeon", "mqtt.broker"),
            ("FLEETWATCH_MQTT__LISTEN", "notanaddr", "mqtt.listen"),
            (
                "FLEETWATCH_HEARTBEAT__QUEUE_CAPACITY",
                "-3",
                "heartbeat.queue_capacity",
            ),
            ("FLEETWATCH_DATABASE__URL", "mysql://x", "database.url"),
            ("FLEETWATCH_MQTT__SHARED_GROUP", "a/b", "mqtt.shared_group"),
            (
                "FLEETWATCH_DATABASE__MAX_CONNECTIONS",
                "0",
                "database.max_connections",
            ),
            (
                "FLEETWATCH_DATABASE__STATEMENT_TIMEOUT",
                "0s",
                "database.statement_timeout",
            ),
            (
                "FLEETWATCH_HEARTBEAT_OFFLINE_AFTER",
                "90s",
                "FLEETWATCH_HEARTBEAT__OFFLINE_AFTER",
            ),
            ("FLEETWATCH_NOPE", "1", "FLEETWATCH_NOPE"),
            ("FLEETWATCH_HTTP__LISTEN", "0.0.0.0:8080", "http.listen"),
            ("FLEETWATCH_HTTP__API_KEY", "", "http.api_key"),
            (
                "FLEETWATCH_HTTP__MAX_CONNECTIONS",
                "0",
                "http.max_connections",
            ),
            (
                "FLEETWATCH_HTTP__HEADER_TIMEOUT",
                "0s",
                "http.header_timeout",
            ),
            ("FLEETWATCH_HEALTH__COMMIT_LAG", "soon", "health.commit_lag"),
            (
                "FLEETWATCH_DEVICES__REGISTRATION_RATE",
                "-1",
                "devices.registration_rate",
            ),
            (
                "FLEETWATCH_DEVICES__AUTO_REGISTER",
                "maybe",
                "devices.auto_register",
            ),
            (
                "FLEETWATCH_HEARTBEAT__MAX_UNCOMMITTED",
                "0",
                "heartbeat.max_uncommitted",
            ),
        ];
        for (var, value, named) in cases {
            let error = load(&[(var, value)]).expect_err(var).to_string();
            assert!(error.contains(named), "{var}={value}: {error}");
            assert!(
                !error.contains('\n'),
                "{var}={value}: not one line: {error}"
            );
        }
        let external = [
            ("FLEETWATCH_MQTT__BROKER", "external"),
            ("FLEETWATCH_MQTT__URL", "http://x"),
        ];
        let error = load(&external).expect_err("bad url").to_string();
        assert!(error.contains("mqtt.url"), "{error}");
    }

    #[test]
    fn a_file_given_as_text_loads_under_the_environment() {
        let toml = "[heartbeat]\noffline_after = \"3m\"\n\n[devices]\nmax_devices = 50\n";
        let vars = [(
            "FLEETWATCH_DEVICES__MAX_DEVICES".to_string(),
            "70".to_string(),
        )];
        let settings = Settings::load_from_toml(toml, vars).expect("loads");
        assert_eq!(settings.heartbeat.offline_after, Duration::from_secs(180));
        assert_eq!(settings.devices.max_devices, 70, "the environment wins");
        let error = Settings::load_from_toml("[heartbeat]\nofline_after = \"3m\"\n", [])
            .expect_err("unknown key")
            .to_string();
        assert!(error.contains("ofline_after"), "{error}");
        assert!(!error.contains('\n'), "{error}");
    }

    #[test]
    fn label_rules_load_in_order_and_a_bad_rule_names_its_key() {
        let toml = "[[heartbeat.rules]]\nlabels = { kind = \"sensor\", site = \"north\" }\n\
                    offline_after = \"2h\"\n\n[[heartbeat.rules]]\nlabels = { kind = \"pump\" }\n\
                    offline_after = \"30s\"\n";
        let settings = Settings::load_from_toml(toml, []).expect("loads");
        let rule = |pairs: &[(&str, &str)], secs| crate::deadline::Rule {
            labels: crate::labels::Labels::of(pairs),
            offline_after: Duration::from_secs(secs),
        };
        assert_eq!(
            settings.heartbeat.deadlines().rules,
            [
                rule(&[("kind", "sensor"), ("site", "north")], 7200),
                rule(&[("kind", "pump")], 30),
            ]
        );
        assert!(load(&[]).expect("loads").heartbeat.rules.is_empty());
        for (toml, key) in [
            (
                "[[heartbeat.rules]]\nlabels = {}\noffline_after = \"1h\"\n",
                "heartbeat.rules[0].labels",
            ),
            (
                "[[heartbeat.rules]]\nlabels = { a = \"b\" }\noffline_after = \"1h\"\n\n\
                 [[heartbeat.rules]]\nlabels = { a = \"c\" }\noffline_after = \"0s\"\n",
                "heartbeat.rules[1].offline_after",
            ),
            (
                "[[heartbeat.rules]]\nlabels = { \"a:b\" = \"c\" }\noffline_after = \"1h\"\n",
                "heartbeat.rules[0].labels: label key \"a:b\"",
            ),
            (
                "[[heartbeat.rules]]\nlabels = { a = \"b\" }\noffline_after = \"soon\"\n",
                "heartbeat.rules[0].offline_after: invalid value",
            ),
            (
                "[[heartbeat.rules]]\nlabels = { a = \"b\" }\nofline_after = \"1h\"\n",
                "ofline_after",
            ),
        ] {
            let error = Settings::load_from_toml(toml, [])
                .expect_err(key)
                .to_string();
            assert!(error.contains(key), "{toml}: {error}");
            assert!(!error.contains('\n'), "{error}");
        }
    }

    #[test]
    fn the_alert_policy_loads_and_a_bad_value_names_its_key() {
        let settings = load(&[
            ("FLEETWATCH_NOTIFY__GROUP_BY", "site,kind"),
            ("FLEETWATCH_NOTIFY__GROUP_WAIT", "30s"),
            ("FLEETWATCH_NOTIFY__GROUP_THRESHOLD", "50"),
            ("FLEETWATCH_NOTIFY__MIN_OFFLINE", "1m"),
            ("FLEETWATCH_NOTIFY__REPEAT_AFTER", "4h"),
            (
                "FLEETWATCH_NOTIFY__DASHBOARD_URL",
                "https://fleet.example.com",
            ),
        ])
        .expect("loads");
        let policy = settings.policy().expect("valid");
        assert_eq!(policy.group_by, ["site", "kind"]);
        assert_eq!(policy.group_wait, Duration::from_secs(30));
        assert_eq!(policy.group_threshold, 50);
        assert_eq!(policy.min_offline, Duration::from_secs(60));
        assert_eq!(policy.repeat_after, Some(Duration::from_secs(4 * 3600)));
        let defaults = load(&[]).expect("loads").policy().expect("valid");
        assert_eq!(
            (
                defaults.group_wait,
                defaults.group_threshold,
                defaults.repeat_after
            ),
            (Duration::from_secs(10), 10, None)
        );
        for (var, value, key) in [
            (
                "FLEETWATCH_NOTIFY__GROUP_BY",
                "site,no way",
                "notify.group_by",
            ),
            ("FLEETWATCH_NOTIFY__GROUP_WAIT", "2h", "notify.group_wait"),
            (
                "FLEETWATCH_NOTIFY__GROUP_THRESHOLD",
                "2000000",
                "notify.group_threshold",
            ),
            (
                "FLEETWATCH_NOTIFY__MIN_OFFLINE",
                "2days",
                "notify.min_offline",
            ),
            (
                "FLEETWATCH_NOTIFY__REPEAT_AFTER",
                "0s",
                "notify.repeat_after",
            ),
            (
                "FLEETWATCH_NOTIFY__DASHBOARD_URL",
                "fleet",
                "notify.dashboard_url",
            ),
        ] {
            let error = load(&[(var, value)]).expect_err(var).to_string();
            assert!(error.contains(key), "{var}={value}: {error}");
            assert!(!error.contains('\n'), "{error}");
        }
    }

    #[test]
    fn api_keys_for_rotation_come_from_a_list() {
        let settings = load(&[
            ("FLEETWATCH_HTTP__API_KEY", "current"),
            ("FLEETWATCH_HTTP__API_KEYS", "next,previous"),
            ("FLEETWATCH_HTTP__LISTEN", "0.0.0.0:8080"),
        ])
        .expect("keys load");
        let keys: Vec<_> = settings
            .http
            .keys()
            .iter()
            .map(|k| k.expose().to_string())
            .collect();
        assert_eq!(keys, ["current", "next", "previous"]);
    }

    #[test]
    fn require_login_is_for_the_embedded_broker_only() {
        let settings = load(&[("FLEETWATCH_MQTT__REQUIRE_LOGIN", "true")]).expect("loads");
        assert!(settings.mqtt.require_login);
        assert!(!Settings::default().mqtt.require_login, "off by default");
        let error = load(&[
            ("FLEETWATCH_MQTT__REQUIRE_LOGIN", "true"),
            ("FLEETWATCH_MQTT__BROKER", "external"),
        ])
        .expect_err("contradiction")
        .to_string();
        assert!(error.contains("mqtt.require_login"), "{error}");
        assert!(!error.contains('\n'), "{error}");
    }

    #[test]
    fn secrets_do_not_print() {
        let secret = Secret::new("hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
