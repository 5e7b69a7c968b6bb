//! Rejected input: counted always, logged without letting one noisy device flood the
//! log.

use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::registration::Refusal;

/// Why a message was dropped without touching state; a label on the rejection counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    InvalidDeviceId,
    UnknownTopic,
    TooLarge,
    InvalidUtf8,
    TooDeep,
    NotAnObject,
    MalformedJson,
    InvalidField,
    /// A retained heartbeat or Will, replayed by the broker on subscribe: old news.
    Retained,
    /// An unknown device with `devices.auto_register` off.
    Unregistered,
    /// An unknown device while the hub holds `devices.max_devices`.
    DeviceLimit,
    /// An unknown device beyond `devices.registration_rate`.
    RegistrationRate,
}

impl From<Refusal> for RejectReason {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::NotRegistered => RejectReason::Unregistered,
            Refusal::DeviceLimit => RejectReason::DeviceLimit,
            Refusal::RateLimited => RejectReason::RegistrationRate,
        }
    }
}

impl RejectReason {
    pub const ALL: [RejectReason; 12] = [
        RejectReason::InvalidDeviceId,
        RejectReason::UnknownTopic,
        RejectReason::TooLarge,
        RejectReason::InvalidUtf8,
        RejectReason::TooDeep,
        RejectReason::NotAnObject,
        RejectReason::MalformedJson,
        RejectReason::InvalidField,
        RejectReason::Retained,
        RejectReason::Unregistered,
        RejectReason::DeviceLimit,
        RejectReason::RegistrationRate,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            RejectReason::InvalidDeviceId => "invalid_device_id",
            RejectReason::UnknownTopic => "unknown_topic",
            RejectReason::TooLarge => "too_large",
            RejectReason::InvalidUtf8 => "invalid_utf8",
            RejectReason::TooDeep => "too_deep",
            RejectReason::NotAnObject => "not_an_object",
            RejectReason::MalformedJson => "malformed_json",
            RejectReason::InvalidField => "invalid_field",
            RejectReason::Retained => "retained",
            RejectReason::Unregistered => "unregistered",
            RejectReason::DeviceLimit => "device_limit",
            RejectReason::RegistrationRate => "registration_rate",
        }
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

/// Counts every rejection and logs at most `PER_WINDOW` of them per `WINDOW`, then one
/// line saying how many were not logged.
pub struct RejectLog {
    metrics: Arc<Metrics>,
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

impl RejectLog {
    const WINDOW: Duration = Duration::from_secs(10);
    const PER_WINDOW: u32 = 50;

    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            window_start: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    pub fn reject(&mut self, reason: RejectReason, topic: &str, error: &dyn Display) {
        self.metrics.reject(reason);
        if self.window_start.elapsed() >= Self::WINDOW {
            if self.suppressed > 0 {
                tracing::warn!(
                    suppressed = self.suppressed,
                    "more messages were rejected than logged (see the rejection counters)"
                );
            }
            self.window_start = Instant::now();
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < Self::PER_WINDOW {
            self.logged += 1;
            tracing::warn!(reason = reason.as_str(), topic, error = %error, "message rejected");
        } else {
            self.suppressed += 1;
        }
    }
}
