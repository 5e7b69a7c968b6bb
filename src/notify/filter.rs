//! Which status events a sink is told of.
//!
//! Without a filter a sink hears what wakes a person: offline, error, and recovery
//! (online again after offline or error). A registration (a fleet roll-out) is no
//! alarm: a sink hears of it only when its filter names the status or the reason.

use serde::{Deserialize, Serialize};

use crate::device::DeviceId;
use crate::event::StatusEvent;
use crate::status::{Reason, Status};

/// A sink's filter, as configured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSettings {
    /// New statuses to hear of (`provisioning`, `online`, `offline`, `error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statuses: Option<Vec<Status>>,
    /// Reasons to hear of (`registered`, `heartbeat`, `heartbeat_timeout`,
    /// `connection_lost`, `device_error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasons: Option<Vec<String>>,
    /// Device ids to hear of: a pattern where `*` is any run of characters and `?`
    /// one character, e.g. `pump-*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<String>,
}

/// A checked filter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    statuses: Option<Vec<Status>>,
    reasons: Option<Vec<Reason>>,
    devices: Option<Glob>,
}

impl Filter {
    /// Checks `settings`; the error names the offending part.
    pub fn parse(settings: &FilterSettings) -> Result<Self, String> {
        let reasons = settings
            .reasons
            .as_ref()
            .map(|reasons| {
                reasons
                    .iter()
                    .map(|r| r.parse::<Reason>())
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()
            .map_err(|e| format!("filter.reasons: {e}"))?;
        let devices = settings
            .devices
            .as_deref()
            .map(Glob::parse)
            .transpose()
            .map_err(|e| format!("filter.devices: {e}"))?;
        Ok(Self {
            statuses: settings.statuses.clone(),
            reasons,
            devices,
        })
    }

    pub fn matches(&self, event: &StatusEvent) -> bool {
        let device = self
            .devices
            .as_ref()
            .is_none_or(|glob| glob.matches(&event.device_id));
        let kind = if self.statuses.is_none() && self.reasons.is_none() {
            is_alarm(event)
        } else {
            self.statuses
                .as_ref()
                .is_none_or(|statuses| statuses.contains(&event.status))
                && self
                    .reasons
                    .as_ref()
                    .is_none_or(|reasons| reasons.contains(&event.reason))
        };
        device && kind
    }
}

/// Offline, error, or back online after either.
pub fn is_alarm(event: &StatusEvent) -> bool {
    match event.status {
        Status::Offline | Status::Error => true,
        Status::Online => is_recovery(event),
        Status::Provisioning => false,
    }
}

/// Online again after offline or error.
pub fn is_recovery(event: &StatusEvent) -> bool {
    event.status == Status::Online
        && matches!(event.previous_status, Some(Status::Offline | Status::Error))
}

/// A device-id pattern: `*` any run of characters, `?` one character, anything else
/// itself. Ids are ASCII, so bytes are characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("an empty pattern matches nothing".into());
        }
        if !pattern
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-*?".contains(&b))
        {
            return Err(format!(
                "{pattern:?} may only hold id characters and the wildcards * and ?"
            ));
        }
        Ok(Self(pattern.to_string()))
    }

    pub fn matches(&self, id: &DeviceId) -> bool {
        glob_match(self.0.as_bytes(), id.as_str().as_bytes())
    }
}

/// Iterative wildcard match with one backtrack point: linear in practice, and never
/// exponential however many `*` a pattern has.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::status::Transition;

    fn event(id: &str, from: Option<Status>, to: Status, reason: Reason) -> StatusEvent {
        StatusEvent::new(
            DeviceId::parse(id).expect("id"),
            Transition { from, to, reason },
            None,
            Timestamp::from_unix_millis(0),
        )
    }

    #[test]
    fn by_default_a_sink_hears_offline_error_and_recovery_only() {
        let filter = Filter::default();
        let cases = [
            (None, Status::Online, Reason::Registered, false),
            (None, Status::Provisioning, Reason::Registered, false),
            (
                Some(Status::Provisioning),
                Status::Online,
                Reason::Heartbeat,
                false,
            ),
            (
                Some(Status::Online),
                Status::Offline,
                Reason::HeartbeatTimeout,
                true,
            ),
            (
                Some(Status::Online),
                Status::Offline,
                Reason::ConnectionLost,
                true,
            ),
            (
                Some(Status::Online),
                Status::Error,
                Reason::DeviceError,
                true,
            ),
            (
                Some(Status::Offline),
                Status::Online,
                Reason::Heartbeat,
                true,
            ),
            (Some(Status::Error), Status::Online, Reason::Heartbeat, true),
        ];
        for (from, to, reason, heard) in cases {
            assert_eq!(
                filter.matches(&event("a", from, to, reason)),
                heard,
                "{from:?} -> {to} ({reason})"
            );
        }
    }

    #[test]
    fn a_filter_names_what_it_wants() {
        let roll_out = Filter::parse(&FilterSettings {
            reasons: Some(vec!["registered".into()]),
            devices: Some("pump-*".into()),
            ..FilterSettings::default()
        })
        .expect("valid");
        assert!(roll_out.matches(&event("pump-7", None, Status::Online, Reason::Registered)));
        assert!(!roll_out.matches(&event("valve-1", None, Status::Online, Reason::Registered)));
        assert!(!roll_out.matches(&event(
            "pump-7",
            Some(Status::Online),
            Status::Offline,
            Reason::HeartbeatTimeout
        )));
        let wills = Filter::parse(&FilterSettings {
            statuses: Some(vec![Status::Offline]),
            reasons: Some(vec!["connection_lost".into()]),
            ..FilterSettings::default()
        })
        .expect("valid");
        assert!(wills.matches(&event(
            "a",
            Some(Status::Online),
            Status::Offline,
            Reason::ConnectionLost
        )));
        assert!(!wills.matches(&event(
            "a",
            Some(Status::Online),
            Status::Offline,
            Reason::HeartbeatTimeout
        )));
        assert!(
            Filter::parse(&FilterSettings {
                reasons: Some(vec!["bored".into()]),
                ..FilterSettings::default()
            })
            .is_err()
        );
    }

    #[test]
    fn patterns_match_whole_ids_with_star_and_question_mark() {
        let id = |s: &str| DeviceId::parse(s).expect("id");
        let glob = |p: &str| Glob::parse(p).expect("pattern");
        assert!(glob("pump-*").matches(&id("pump-7")));
        assert!(glob("pump-*").matches(&id("pump-")));
        assert!(!glob("pump-*").matches(&id("xpump-7")));
        assert!(glob("*-7").matches(&id("pump-7")));
        assert!(glob("p?mp-*-?").matches(&id("pump-north-7")));
        assert!(!glob("p?mp").matches(&id("pmp")));
        assert!(glob("*a*b*c*").matches(&id("xxaxxbxxcxx")));
        assert!(!glob("*a*b*c*d").matches(&id(&"a".repeat(100))));
        assert!(Glob::parse("pump/7").is_err());
        assert!(Glob::parse("").is_err());
    }
}
