//! Notifications that reach people: each committed transition a sink's filter
//! matches becomes a notification for that sink, delivered once, in order per
//! device, across the hub's restarts and the receiver's outages.
//!
//! - [`filter`]: which transitions a sink hears of.
//! - [`message`]: what it is told ([`message::Notice`], [`message::GroupNotice`]), as
//!   JSON or as text.
//! - [`policy`]: who is told what and when: flap damping, dependencies, storm
//!   grouping, silences, reminders.
//! - [`sign`]: Standard Webhooks signatures.
//! - [`target`]: the webhook, Telegram and Slack receivers, and what their answers mean.
//! - [`delivery`]: one task per sink: takes new transitions from the event log into
//!   the sink's queue, sends, retries with backoff, dead-letters.
//! - [`Sinks`]: the running sinks, for the HTTP API and the metrics.
//!
//! The status events on MQTT are unchanged: sinks are an addition.

pub mod delivery;
pub mod filter;
pub mod message;
pub mod policy;
pub mod sign;
pub mod target;

pub use delivery::{Pacing, SinkError, SinkReport, Sinks, TestResult};

use self::filter::Filter;
use self::sign::SigningKey;
use self::target::{SecretUrl, Target};
use crate::config::SinkSettings;

/// The public Bot API.
pub const TELEGRAM_API: &str = "https://api.telegram.org";

/// A sink, checked.
#[derive(Debug, Clone)]
pub struct SinkSpec {
    pub name: String,
    pub enabled: bool,
    pub filter: Filter,
    pub target: Target,
}

impl SinkSpec {
    /// Checks a sink as configured; the error names the sink and the field.
    pub fn parse(settings: &SinkSettings) -> Result<Self, String> {
        let name = settings.name.clone();
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid_name {
            return Err(format!(
                "name {name:?}: 1 to 64 letters, digits, - and _ (it is part of URLs)"
            ));
        }
        let field = |f: &str| format!("({name}) {f}");
        let need = |value: Option<&str>, f: &str| {
            value
                .filter(|v| !v.trim().is_empty())
                .map(str::to_string)
                .ok_or_else(|| format!("{}: a {} sink needs it", field(f), settings.kind))
        };
        let url = || {
            let text = need(settings.url.as_ref().map(|u| u.expose()), "url")?;
            SecretUrl::parse(&text).map_err(|e| format!("{}: {e}", field("url")))
        };
        let target = match settings.kind.as_str() {
            "webhook" => Target::Webhook {
                url: url()?,
                key: SigningKey::parse(&need(
                    settings.secret.as_ref().map(|s| s.expose()),
                    "secret",
                )?)
                .map_err(|e| format!("{}: {e}", field("secret")))?,
            },
            "telegram" => {
                let api = settings.api_url.as_deref().unwrap_or(TELEGRAM_API);
                let api_url = SecretUrl::parse(api)
                    .map_err(|e| format!("{}: {e}", field("api_url")))?
                    .url()
                    .clone();
                Target::Telegram {
                    api_url,
                    token: crate::config::Secret::new(need(
                        settings.token.as_ref().map(|t| t.expose()),
                        "token",
                    )?),
                    chat_id: need(settings.chat_id.as_deref(), "chat_id")?,
                }
            }
            "slack" => Target::Slack { url: url()? },
            other => {
                return Err(format!(
                    "{}: {other:?} is not a sink kind (expected webhook, telegram or slack)",
                    field("kind")
                ));
            }
        };
        let filter = Filter::parse(&settings.filter).map_err(|e| field(&e))?;
        Ok(Self {
            name,
            enabled: settings.enabled,
            filter,
            target,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Settings;

    #[test]
    fn each_kind_of_sink_loads_from_the_file() {
        let toml = r#"
[notify]
retry_max = "30s"

[[notify.sinks]]
name = "ops-webhook"
kind = "webhook"
url = "https://ops.example.com/hooks/fleetwatch"
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

[[notify.sinks]]
name = "oncall"
kind = "telegram"
token = "123456:ABC"
chat_id = -1001234567890
enabled = false
[notify.sinks.filter]
statuses = ["offline"]
devices = "pump-*"

[[notify.sinks]]
name = "team"
kind = "slack"
url = "https://hooks.slack.com/services/T0/B0/XYZ"
"#;
        let settings = Settings::load_from_toml(toml, []).expect("loads");
        let sinks = settings.sinks().expect("valid sinks");
        let kinds: Vec<_> = sinks
            .iter()
            .map(|s| (s.name.as_str(), s.target.kind(), s.enabled))
            .collect();
        assert_eq!(
            kinds,
            [
                ("ops-webhook", "webhook", true),
                ("oncall", "telegram", false),
                ("team", "slack", true)
            ]
        );
        assert!(matches!(
            &sinks[1].target,
            super::Target::Telegram { chat_id, api_url, .. }
                if chat_id == "-1001234567890" && api_url.as_str() == "https://api.telegram.org/"
        ));
        assert_eq!(
            settings.notify.retry_max,
            std::time::Duration::from_secs(30)
        );
        let printed = format!("{sinks:?}");
        for secret in ["MfKQ9r8", "123456:ABC", "XYZ"] {
            assert!(!printed.contains(secret), "{printed}");
        }
    }

    #[test]
    fn two_sinks_of_one_name_are_refused() {
        let toml = "[[notify.sinks]]\nname = \"a\"\nkind = \"slack\"\nurl = \"http://x\"\n\
                    [[notify.sinks]]\nname = \"a\"\nkind = \"slack\"\nurl = \"http://y\"\n";
        let error = Settings::load_from_toml(toml, [])
            .expect_err("duplicate")
            .to_string();
        assert!(
            error.contains("notify.sinks[1]") && error.contains("second sink"),
            "{error}"
        );
    }
}
