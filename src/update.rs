//! What the hub heard from its devices between two flushes, in the shape the store
//! takes it.
//!
//! A [`Heartbeat`] is a valid heartbeat (the parser is [`crate::heartbeat::payload`]).
//! A [`Batch`] coalesces heartbeats and Wills per device, so one database row is
//! written per device per flush, without hiding a status change: a device that says
//! error and then ok within one flush still produces both transitions, in order. The
//! store takes the [`DeviceUpdate`]s; [`crate::rules`] decides what they change.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::device::DeviceId;
use crate::labels::Labels;
use crate::status::Signal;

/// A valid heartbeat. The receipt time is not here: it is the hub's, added by whoever
/// received the message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Heartbeat {
    /// False when the device said `"status":"error"`.
    pub healthy: bool,
    /// The device's error text; only kept with `"status":"error"`.
    pub error: Option<String>,
    /// The device's own clock (`timestamp`), kept so skew can be shown.
    pub device_time: Option<Timestamp>,
    /// How often the device says it sends heartbeats (`interval`).
    pub interval: Option<Duration>,
    /// Labels the device declares: set key by key.
    pub labels: Option<Labels>,
    /// The device it is reached through (`parent`): `Some(None)` clears it, `None`
    /// (not in the heartbeat) keeps what is stored.
    pub parent: Option<Option<DeviceId>>,
    pub report: Report,
}

/// What a device reports about itself. Fields it leaves out keep their stored value.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Report {
    pub uptime_seconds: Option<u64>,
    pub free_memory: Option<u64>,
    pub firmware_version: Option<String>,
    pub hostname: Option<String>,
    pub os_info: Option<OsInfo>,
    pub metrics: Option<BTreeMap<String, f64>>,
}

impl Report {
    /// About how much memory the report's text and metrics take.
    pub fn approx_bytes(&self) -> usize {
        let text = |t: &Option<String>| t.as_ref().map_or(0, String::len);
        let os = self.os_info.as_ref().map_or(0, |os| {
            text(&os.distribution) + text(&os.version) + text(&os.kernel) + text(&os.architecture)
        });
        let metrics = self
            .metrics
            .as_ref()
            .map_or(0, |m| m.keys().map(|name| name.len() + 48).sum::<usize>());
        text(&self.firmware_version) + text(&self.hostname) + os + metrics
    }

    /// Overlays the fields `newer` carries onto `self`.
    pub fn merge(&mut self, newer: Report) {
        let Report {
            uptime_seconds,
            free_memory,
            firmware_version,
            hostname,
            os_info,
            metrics,
        } = newer;
        overlay(&mut self.uptime_seconds, uptime_seconds);
        overlay(&mut self.free_memory, free_memory);
        overlay(&mut self.firmware_version, firmware_version);
        overlay(&mut self.hostname, hostname);
        overlay(&mut self.os_info, os_info);
        overlay(&mut self.metrics, metrics);
    }
}

fn merge_labels(slot: &mut Option<Labels>, newer: Option<Labels>) {
    match (slot.as_mut(), newer) {
        (Some(labels), Some(newer)) => labels.merge(newer),
        (None, newer) => *slot = newer,
        (Some(_), None) => {}
    }
}

fn overlay<T>(slot: &mut Option<T>, newer: Option<T>) {
    if newer.is_some() {
        *slot = newer;
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OsInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 256)]
    pub distribution: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 256)]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 256)]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 256)]
    pub architecture: Option<String>,
}

/// Most status steps kept per device per flush. A device flapping faster than this
/// has its later steps folded into the last one: its final status stays right, the
/// intermediate transitions are not all recorded, and its memory stays bounded.
pub const MAX_STEPS: usize = 32;

/// Everything heard from one device since the last flush.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceUpdate {
    pub device: DeviceId,
    /// Status signals in arrival order; a run of identical signals is one step.
    pub steps: Vec<Step>,
    /// Receipt time of the latest heartbeat (`None` if only a Will arrived).
    pub last_seen: Option<Timestamp>,
    /// The device's clock in its latest heartbeat that carried one.
    pub device_time: Option<Timestamp>,
    /// That clock minus the hub's at the same heartbeat's receipt, in ms.
    pub clock_skew_ms: Option<i64>,
    /// The heartbeat interval the latest heartbeat that declared one declared; `None`
    /// keeps what is stored.
    pub interval: Option<Duration>,
    /// The labels the heartbeats declared, merged (newest wins per key); `None`: none
    /// declared, the stored ones stay.
    pub labels: Option<Labels>,
    /// The parent the latest heartbeat that named one (or `null`) named: `Some(None)`
    /// clears the stored one, `None` keeps it.
    pub parent: Option<Option<DeviceId>>,
    /// Error text to store: `Some(None)` clears it (the latest heartbeat was ok),
    /// `None` keeps what is stored.
    pub error: Option<Option<String>>,
    /// Reported fields merged across the heartbeats, newest wins.
    pub report: Report,
}

/// One run of identical signals.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub signal: Signal,
    /// When the first signal of the run arrived: the moment a transition happened.
    pub at: Timestamp,
    /// The latest heartbeat heard up to the end of this step in this batch, if any.
    pub last_heartbeat: Option<Timestamp>,
    /// For a run of error heartbeats, the latest one's error text: what the device's
    /// row holds at the end of the step, so the step's status event can carry it even
    /// when a later step in the same batch clears it.
    pub error: Option<String>,
}

impl DeviceUpdate {
    /// About how much memory this update holds: enough to bound what a failing
    /// database makes the hub keep, not an exact count.
    pub fn approx_bytes(&self) -> usize {
        const OVERHEAD: usize = 160;
        OVERHEAD
            + self.device.as_str().len()
            + self.steps.len() * std::mem::size_of::<Step>()
            + self
                .steps
                .iter()
                .filter_map(|s| s.error.as_ref())
                .map(String::len)
                .sum::<usize>()
            + self.labels.as_ref().map_or(0, Labels::approx_bytes)
            + self
                .parent
                .as_ref()
                .and_then(Option::as_ref)
                .map_or(0, |p| p.as_str().len())
            + self
                .error
                .as_ref()
                .and_then(|e| e.as_ref())
                .map_or(0, String::len)
            + self.report.approx_bytes()
    }

    fn new(device: DeviceId) -> Self {
        Self {
            device,
            steps: Vec::with_capacity(1),
            last_seen: None,
            device_time: None,
            clock_skew_ms: None,
            interval: None,
            labels: None,
            parent: None,
            error: None,
            report: Report::default(),
        }
    }

    fn push(&mut self, signal: Signal, at: Timestamp, error: Option<String>) {
        let last_heartbeat = match signal {
            Signal::Heartbeat { .. } => Some(at),
            _ => self.last_seen,
        };
        append(
            &mut self.steps,
            Step {
                signal,
                at,
                last_heartbeat,
                error,
            },
        );
    }

    fn add_heartbeat(&mut self, at: Timestamp, heartbeat: Heartbeat) {
        let Heartbeat {
            healthy,
            error,
            device_time,
            interval,
            labels,
            parent,
            report,
        } = heartbeat;
        let error = if healthy { None } else { error };
        self.push(Signal::Heartbeat { healthy }, at, error.clone());
        self.last_seen = Some(at);
        if let Some(device_time) = device_time {
            self.device_time = Some(device_time);
            self.clock_skew_ms = Some(device_time.millis_since(at));
        }
        self.interval = interval.or(self.interval);
        merge_labels(&mut self.labels, labels);
        overlay(&mut self.parent, parent);
        self.error = Some(error);
        self.report.merge(report);
    }
}

/// Adds `step` after `steps`: a repeat of the last signal extends that step, and past
/// [`MAX_STEPS`] the last step is replaced.
fn append(steps: &mut Vec<Step>, step: Step) {
    let full = steps.len() >= MAX_STEPS;
    match steps.last_mut() {
        Some(last) if last.signal == step.signal => {
            last.last_heartbeat = step.last_heartbeat.or(last.last_heartbeat);
            last.error = step.error;
        }
        Some(last) if full => *last = step,
        _ => steps.push(step),
    }
}

/// Pending updates keyed by device.
#[derive(Debug, Default)]
pub struct Batch {
    updates: HashMap<DeviceId, DeviceUpdate>,
    /// Messages folded in since the last `take`.
    messages: usize,
    /// The updates' [`DeviceUpdate::approx_bytes`], summed.
    bytes: usize,
}

impl Batch {
    pub fn add_heartbeat(&mut self, device: DeviceId, at: Timestamp, heartbeat: Heartbeat) {
        self.change(device, |update| update.add_heartbeat(at, heartbeat));
    }

    pub fn add_connection_lost(&mut self, device: DeviceId, at: Timestamp) {
        self.change(device, |update| {
            update.push(Signal::ConnectionLost, at, None)
        });
    }

    /// Folds one message into `device`'s update, keeping `bytes` current.
    fn change(&mut self, device: DeviceId, fold: impl FnOnce(&mut DeviceUpdate)) {
        let update = self
            .updates
            .entry(device)
            .or_insert_with_key(|device| DeviceUpdate::new(device.clone()));
        let before = update.approx_bytes();
        fold(update);
        self.bytes = (self.bytes + update.approx_bytes()).saturating_sub(before);
        self.messages += 1;
    }

    /// About how much memory the pending updates hold.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Distinct devices pending.
    pub fn len(&self) -> usize {
        self.updates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.updates.is_empty()
    }

    /// Messages folded in since the last `take`.
    pub fn messages(&self) -> usize {
        self.messages
    }

    /// Empties the batch.
    pub fn take(&mut self) -> Vec<DeviceUpdate> {
        self.messages = 0;
        self.bytes = 0;
        self.updates.drain().map(|(_, update)| update).collect()
    }

    /// Puts back updates whose flush failed, under anything that arrived since, so no
    /// heartbeat is lost to a database error.
    pub fn restore(&mut self, failed: Vec<DeviceUpdate>) {
        for old in failed {
            let restored = match self.updates.remove(&old.device) {
                None => old,
                Some(newer) => {
                    self.bytes = self.bytes.saturating_sub(newer.approx_bytes());
                    merge(old, newer)
                }
            };
            self.bytes += restored.approx_bytes();
            self.updates.insert(restored.device.clone(), restored);
        }
    }
}

/// `older` followed by `newer`, as if they had arrived in one batch.
fn merge(mut older: DeviceUpdate, newer: DeviceUpdate) -> DeviceUpdate {
    for step in newer.steps {
        let last_heartbeat = step.last_heartbeat.or(older.last_seen);
        append(
            &mut older.steps,
            Step {
                last_heartbeat,
                ..step
            },
        );
    }
    older.last_seen = newer.last_seen.or(older.last_seen);
    older.device_time = newer.device_time.or(older.device_time);
    older.clock_skew_ms = newer.clock_skew_ms.or(older.clock_skew_ms);
    older.interval = newer.interval.or(older.interval);
    merge_labels(&mut older.labels, newer.labels);
    overlay(&mut older.parent, newer.parent);
    older.error = newer.error.or(older.error);
    older.report.merge(newer.report);
    older
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).expect("valid id")
    }

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_unix_millis(ms)
    }

    fn beat(healthy: bool) -> Heartbeat {
        Heartbeat {
            healthy,
            error: (!healthy).then(|| "boom".to_string()),
            ..Heartbeat::default()
        }
    }

    const OK: Signal = Signal::Heartbeat { healthy: true };
    const BAD: Signal = Signal::Heartbeat { healthy: false };

    #[test]
    fn repeated_heartbeats_coalesce_into_one_row_and_one_step() {
        let mut batch = Batch::default();
        for ms in [10, 20, 30] {
            batch.add_heartbeat(id("a"), at(ms), beat(true));
        }
        batch.add_heartbeat(id("b"), at(15), beat(true));
        assert_eq!((batch.len(), batch.messages()), (2, 4));
        let mut updates = batch.take();
        updates.sort_by(|x, y| x.device.cmp(&y.device));
        let a = &updates[0];
        assert_eq!(a.last_seen, Some(at(30)));
        assert_eq!(
            a.steps,
            vec![Step {
                signal: OK,
                at: at(10),
                last_heartbeat: Some(at(30)),
                error: None,
            }]
        );
        assert!(batch.is_empty());
    }

    #[test]
    fn status_changes_inside_one_batch_are_kept_in_order() {
        let mut batch = Batch::default();
        batch.add_heartbeat(id("a"), at(10), beat(true));
        batch.add_heartbeat(id("a"), at(20), beat(false));
        batch.add_connection_lost(id("a"), at(25));
        batch.add_heartbeat(id("a"), at(30), beat(true));
        let update = batch.take().remove(0);
        let signals: Vec<_> = update
            .steps
            .iter()
            .map(|s| (s.signal, s.at, s.last_heartbeat))
            .collect();
        assert_eq!(
            signals,
            vec![
                (OK, at(10), Some(at(10))),
                (BAD, at(20), Some(at(20))),
                (Signal::ConnectionLost, at(25), Some(at(20))),
                (OK, at(30), Some(at(30))),
            ]
        );
        assert_eq!(
            update.error,
            Some(None),
            "latest heartbeat was ok: clear the error"
        );
        let texts: Vec<_> = update.steps.iter().map(|s| s.error.as_deref()).collect();
        assert_eq!(
            texts,
            vec![None, Some("boom"), None, None],
            "the error step keeps its text"
        );
    }

    #[test]
    fn a_run_of_error_heartbeats_keeps_the_latest_text() {
        let mut batch = Batch::default();
        batch.add_heartbeat(id("a"), at(10), beat(false));
        let mut newer = beat(false);
        newer.error = Some("fan stuck".into());
        batch.add_heartbeat(id("a"), at(20), newer);
        let update = batch.take().remove(0);
        let steps: Vec<_> = update
            .steps
            .iter()
            .map(|s| (s.signal, s.at, s.error.as_deref()))
            .collect();
        assert_eq!(steps, vec![(BAD, at(10), Some("fan stuck"))]);
        assert_eq!(update.error, Some(Some("fan stuck".into())));
    }

    #[test]
    fn a_flapping_device_keeps_a_bounded_history_ending_in_its_latest_status() {
        let mut batch = Batch::default();
        for i in 0..1000 {
            batch.add_heartbeat(id("flappy"), at(i), beat(i % 2 == 0));
        }
        let update = batch.take().remove(0);
        assert_eq!(update.steps.len(), MAX_STEPS);
        assert_eq!(
            update.steps.last().map(|s| (s.signal, s.at)),
            Some((BAD, at(999)))
        );
    }

    #[test]
    fn the_latest_heartbeat_naming_a_parent_or_null_wins_and_silence_keeps_it() {
        let with_parent = |parent: Option<Option<&str>>| Heartbeat {
            parent: parent.map(|p| p.map(id)),
            ..beat(true)
        };
        let mut batch = Batch::default();
        batch.add_heartbeat(id("a"), at(10), with_parent(Some(Some("gw-1"))));
        batch.add_heartbeat(id("a"), at(20), with_parent(None));
        batch.add_heartbeat(id("b"), at(10), with_parent(Some(Some("gw-1"))));
        batch.add_heartbeat(id("b"), at(20), with_parent(Some(None)));
        batch.add_heartbeat(id("c"), at(10), with_parent(None));
        let mut updates = batch.take();
        updates.sort_by(|x, y| x.device.cmp(&y.device));
        let parents: Vec<_> = updates.iter().map(|u| u.parent.clone()).collect();
        assert_eq!(parents, [Some(Some(id("gw-1"))), Some(None), None]);
        // A failed flush put back under a newer heartbeat that names none keeps it.
        batch.add_heartbeat(id("a"), at(30), with_parent(None));
        batch.restore(updates);
        let a = batch.take().into_iter().find(|u| u.device == id("a"));
        assert_eq!(a.and_then(|u| u.parent), Some(Some(id("gw-1"))));
    }

    #[test]
    fn restore_puts_failed_updates_before_newer_ones() {
        let mut batch = Batch::default();
        batch.add_heartbeat(id("a"), at(10), beat(false));
        let failed = batch.take();
        batch.add_heartbeat(id("a"), at(20), beat(true));
        batch.restore(failed);
        let update = batch.take().remove(0);
        let signals: Vec<_> = update.steps.iter().map(|s| (s.signal, s.at)).collect();
        assert_eq!(signals, vec![(BAD, at(10)), (OK, at(20))]);
        assert_eq!(update.last_seen, Some(at(20)));
        assert_eq!(update.error, Some(None));
    }
}
