//! The status model of interface.md section 4, as one pure function.
//!
//! Every change of a device's status (a flush of heartbeats and Wills, the offline
//! check, a registration) goes through [`transition`], so the rules live in one place;
//! [`crate::rules`] applies it to the devices a store reads, and the stores only
//! persist what it decides.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Registered by an operator, never heard from. Never times out.
    Provisioning,
    /// Heartbeats arriving.
    Online,
    /// Silent for `offline_after`, or its Last Will arrived.
    Offline,
    /// Alive, but its last heartbeat said `"status":"error"`.
    Error,
}

impl Status {
    pub const ALL: [Status; 4] = [
        Status::Provisioning,
        Status::Online,
        Status::Offline,
        Status::Error,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Provisioning => "provisioning",
            Status::Online => "online",
            Status::Offline => "offline",
            Status::Error => "error",
        }
    }

    /// Whether silence can take this status to offline.
    pub const fn is_watched(self) -> bool {
        matches!(self, Status::Online | Status::Error)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status {0:?} (expected provisioning, online, offline or error)")]
pub struct UnknownStatus(pub String);

impl FromStr for Status {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// Why a transition happened; the `reason` field of a status event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The device's first event: registered by an operator, or by its first heartbeat.
    Registered,
    /// An ok heartbeat brought it (back) online.
    Heartbeat,
    /// Silent for `offline_after`.
    HeartbeatTimeout,
    /// Its Last Will arrived: the broker lost its connection.
    ConnectionLost,
    /// A heartbeat said `"status":"error"`.
    DeviceError,
}

impl Reason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Registered => "registered",
            Reason::Heartbeat => "heartbeat",
            Reason::HeartbeatTimeout => "heartbeat_timeout",
            Reason::ConnectionLost => "connection_lost",
            Reason::DeviceError => "device_error",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Reason {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Reason::Registered,
            Reason::Heartbeat,
            Reason::HeartbeatTimeout,
            Reason::ConnectionLost,
            Reason::DeviceError,
        ]
        .into_iter()
        .find(|reason| reason.as_str() == s)
        .ok_or_else(|| format!("unknown reason {s:?}"))
    }
}

/// Something the hub learned about a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A heartbeat; `healthy` is false when it said `"status":"error"`.
    Heartbeat { healthy: bool },
    /// The device's Last Will arrived.
    ConnectionLost,
    /// The offline checker found it silent past its deadline.
    Timeout,
    /// An operator registered it.
    Register,
}

/// A status change decided by [`transition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: Option<Status>,
    pub to: Status,
    pub reason: Reason,
}

/// What `signal` does to a device whose status is `current` (`None`: unknown device).
/// `None` means no transition; the caller may still record the heartbeat itself.
pub fn transition(current: Option<Status>, signal: Signal) -> Option<Transition> {
    let (to, reason) = match (current, signal) {
        (None, Signal::Register) => (Status::Provisioning, Reason::Registered),
        (None, Signal::Heartbeat { healthy }) => (heartbeat_status(healthy), Reason::Registered),
        (Some(from), Signal::Heartbeat { healthy }) => {
            let to = heartbeat_status(healthy);
            if from == to {
                return None;
            }
            let reason = if healthy {
                Reason::Heartbeat
            } else {
                Reason::DeviceError
            };
            (to, reason)
        }
        (Some(from), Signal::ConnectionLost) if from.is_watched() => {
            (Status::Offline, Reason::ConnectionLost)
        }
        (Some(from), Signal::Timeout) if from.is_watched() => {
            (Status::Offline, Reason::HeartbeatTimeout)
        }
        // A Will or a timeout for an unknown, provisioning or offline device, and a
        // second registration, change nothing.
        _ => return None,
    };
    Some(Transition {
        from: current,
        to,
        reason,
    })
}

const fn heartbeat_status(healthy: bool) -> Status {
    if healthy {
        Status::Online
    } else {
        Status::Error
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Signal::*;
    use Status::*;

    const OK: Signal = Heartbeat { healthy: true };
    const BAD: Signal = Heartbeat { healthy: false };

    fn t(from: Option<Status>, to: Status, reason: Reason) -> Option<Transition> {
        Some(Transition { from, to, reason })
    }

    #[test]
    fn first_heartbeat_registers_straight_to_online_or_error() {
        assert_eq!(transition(None, OK), t(None, Online, Reason::Registered));
        assert_eq!(transition(None, BAD), t(None, Error, Reason::Registered));
    }

    #[test]
    fn operator_registration_makes_provisioning_once() {
        assert_eq!(
            transition(None, Register),
            t(None, Provisioning, Reason::Registered)
        );
        for status in Status::ALL {
            assert_eq!(transition(Some(status), Register), None);
        }
    }

    #[test]
    fn heartbeats_move_between_online_and_error() {
        assert_eq!(transition(Some(Online), OK), None);
        assert_eq!(transition(Some(Error), BAD), None);
        assert_eq!(
            transition(Some(Online), BAD),
            t(Some(Online), Error, Reason::DeviceError)
        );
        assert_eq!(
            transition(Some(Error), OK),
            t(Some(Error), Online, Reason::Heartbeat)
        );
    }

    #[test]
    fn any_heartbeat_revives_offline_and_provisioning() {
        for from in [Offline, Provisioning] {
            assert_eq!(
                transition(Some(from), OK),
                t(Some(from), Online, Reason::Heartbeat)
            );
            assert_eq!(
                transition(Some(from), BAD),
                t(Some(from), Error, Reason::DeviceError)
            );
        }
    }

    #[test]
    fn silence_and_lost_connections_only_take_watched_devices_offline() {
        for from in [Online, Error] {
            assert_eq!(
                transition(Some(from), Timeout),
                t(Some(from), Offline, Reason::HeartbeatTimeout)
            );
            assert_eq!(
                transition(Some(from), ConnectionLost),
                t(Some(from), Offline, Reason::ConnectionLost)
            );
        }
        for current in [None, Some(Offline), Some(Provisioning)] {
            assert_eq!(transition(current, Timeout), None);
            assert_eq!(transition(current, ConnectionLost), None);
        }
    }

    #[test]
    fn status_words_round_trip() {
        for status in Status::ALL {
            assert_eq!(status.as_str().parse::<Status>(), Ok(status));
        }
        assert!("asleep".parse::<Status>().is_err());
    }
}
