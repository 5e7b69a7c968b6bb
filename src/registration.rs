//! Who may become a device. With auto-registration (the default) a first heartbeat
//! registers an unknown id, so anyone who can publish could fill the database with
//! invented ids; this module bounds that: a cap on devices, a rate of new ones, or no
//! auto-registration at all. Existing devices are never affected.
//!
//! The decision is a pure function, [`admit`], that a store applies inside the write
//! that would register; the rate is a token bucket the heartbeat handler keeps.

use std::collections::HashMap;
use std::fmt;

use std::time::Duration;

use tokio::time::Instant;

use crate::clock::Timestamp;
use crate::device::DeviceId;

/// The registration rules, from configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Unknown ids become devices on their first heartbeat.
    pub auto_register: bool,
    /// The most devices the hub holds; `None`: no cap.
    pub max_devices: Option<u64>,
    /// New devices per second by heartbeat, and how many may come at once; a rate of
    /// `None` is no limit.
    pub rate: Option<f64>,
    pub burst: u64,
}

/// Why an unknown device was not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// `devices.auto_register` is off and nobody registered the id.
    NotRegistered,
    /// The hub holds `devices.max_devices` devices.
    DeviceLimit,
    /// More new devices than `devices.registration_rate` allows right now.
    RateLimited,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::NotRegistered => {
                "unknown device and devices.auto_register is off: register it first"
            }
            Refusal::DeviceLimit => "devices.max_devices reached",
            Refusal::RateLimited => "too many new devices (devices.registration_rate)",
        })
    }
}

/// What one write may register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewDevices {
    pub auto_register: bool,
    /// Registrations the rate allows now.
    pub allowed: u64,
    pub max_devices: Option<u64>,
}

impl NewDevices {
    /// No limits: every unknown device is registered.
    pub const UNLIMITED: NewDevices = NewDevices {
        auto_register: true,
        allowed: u64::MAX,
        max_devices: None,
    };
}

/// Decides which unknown devices a write registers. `candidates` are the unknown ids
/// with the arrival of their first heartbeat; `stored` is how many devices exist (needed
/// only with a cap). The earliest arrivals are admitted first; the rest are refused,
/// by the cap before the rate.
pub fn admit(
    mut candidates: Vec<(DeviceId, Timestamp)>,
    stored: u64,
    new: NewDevices,
) -> HashMap<DeviceId, Refusal> {
    if !new.auto_register {
        return candidates
            .into_iter()
            .map(|(id, _)| (id, Refusal::NotRegistered))
            .collect();
    }
    let room = new
        .max_devices
        .map_or(u64::MAX, |max| max.saturating_sub(stored));
    if (candidates.len() as u64) <= room.min(new.allowed) {
        return HashMap::new();
    }
    candidates.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    candidates
        .into_iter()
        .enumerate()
        .filter_map(|(i, (id, _))| {
            let i = i as u64;
            if i >= room {
                Some((id, Refusal::DeviceLimit))
            } else if i >= new.allowed {
                Some((id, Refusal::RateLimited))
            } else {
                None
            }
        })
        .collect()
}

/// A token bucket of registrations: `burst` at most, refilled at `rate` per second.
#[derive(Debug)]
pub struct RateLimit {
    rate: Option<f64>,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl RateLimit {
    pub fn new(rate: Option<f64>, burst: u64) -> Self {
        let burst = burst.max(1) as f64;
        Self {
            rate,
            burst,
            tokens: burst,
            updated: Instant::now(),
        }
    }

    /// Registrations allowed now.
    pub fn available(&mut self) -> u64 {
        let Some(rate) = self.rate else {
            return u64::MAX;
        };
        let now = Instant::now();
        let elapsed = now.duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(self.burst);
        self.updated = now;
        self.tokens.floor() as u64
    }

    /// How long until the next registration is allowed (zero if one is now).
    pub fn next_in(&mut self) -> Duration {
        let Some(rate) = self.rate else {
            return Duration::ZERO;
        };
        let missing = (1.0 - self.tokens).max(0.0);
        if self.available() > 0 || rate <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((missing / rate).min(86_400.0))
    }

    /// `n` registrations were made.
    pub fn spend(&mut self, n: u64) {
        if self.rate.is_some() {
            self.tokens = (self.tokens - n as f64).max(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates(n: usize) -> Vec<(DeviceId, Timestamp)> {
        (0..n)
            .map(|i| {
                (
                    DeviceId::parse(&format!("d{i:03}")).expect("valid id"),
                    Timestamp::from_unix_millis(1_000 + i as i64),
                )
            })
            .collect()
    }

    fn refused(result: &HashMap<DeviceId, Refusal>, why: Refusal) -> Vec<String> {
        let mut ids: Vec<_> = result
            .iter()
            .filter(|(_, r)| **r == why)
            .map(|(id, _)| id.to_string())
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn without_limits_everyone_is_admitted() {
        assert!(admit(candidates(100), 1_000_000, NewDevices::UNLIMITED).is_empty());
    }

    #[test]
    fn the_cap_admits_the_earliest_arrivals_and_refuses_the_rest() {
        let new = NewDevices {
            max_devices: Some(10),
            ..NewDevices::UNLIMITED
        };
        let result = admit(candidates(5), 8, new);
        assert_eq!(
            refused(&result, Refusal::DeviceLimit),
            ["d002", "d003", "d004"]
        );
        let full = admit(candidates(2), 10, new);
        assert_eq!(full.len(), 2);
    }

    #[test]
    fn the_rate_refuses_what_the_bucket_cannot_pay_for_and_the_cap_comes_first() {
        let new = NewDevices {
            allowed: 2,
            max_devices: Some(4),
            ..NewDevices::UNLIMITED
        };
        let result = admit(candidates(6), 0, new);
        assert_eq!(refused(&result, Refusal::RateLimited), ["d002", "d003"]);
        assert_eq!(refused(&result, Refusal::DeviceLimit), ["d004", "d005"]);
    }

    #[test]
    fn without_auto_registration_nobody_new_is_admitted() {
        let new = NewDevices {
            auto_register: false,
            ..NewDevices::UNLIMITED
        };
        let result = admit(candidates(3), 0, new);
        assert_eq!(refused(&result, Refusal::NotRegistered).len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_starts_full_and_refills_at_the_rate() {
        let mut bucket = RateLimit::new(Some(10.0), 50);
        assert_eq!(bucket.available(), 50);
        bucket.spend(50);
        assert_eq!(bucket.available(), 0);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(bucket.available(), 5);
        bucket.spend(5);
        assert_eq!(bucket.next_in(), Duration::from_millis(100));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(bucket.available(), 50, "never more than the burst");
        assert_eq!(bucket.next_in(), Duration::ZERO);
        let mut unlimited = RateLimit::new(None, 1);
        unlimited.spend(1_000);
        assert_eq!(unlimited.available(), u64::MAX);
    }
}
