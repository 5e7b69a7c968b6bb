//! What a flush does to the stored devices, decided without I/O.
//!
//! A store reads the devices a flush names, asks [`decide`] which rows to write and
//! which events to add, and writes them in one transaction. Every status decision a
//! store makes is here (each step through [`crate::status::transition`], the error
//! text carried over, a Will from an unknown device ignored, the timeouts of the
//! watched statuses), so a second backend only brings its SQL.
//!
//! Most of a flush is devices that keep their status. [`steady`] picks them out before
//! anything is read: a store refreshes them with one conditional write (only where the
//! stored status is still the expected one) and reads and decides only the rest.

use std::collections::HashMap;
use std::time::Duration;

use crate::clock::Timestamp;
use crate::deadline::Deadlines;
use crate::device::DeviceId;
use crate::event::StatusEvent;
use crate::labels::Labels;
use crate::registration::Refusal;
use crate::status::{self, Signal, Status, Transition};
use crate::update::DeviceUpdate;

/// A device as a store reads it before deciding: what the rules need, nothing more.
#[derive(Debug, Clone, PartialEq)]
pub struct Current {
    pub status: Status,
    pub last_seen_at: Option<Timestamp>,
    pub status_changed_at: Timestamp,
    pub error: Option<String>,
    /// The device's own `offline_after` and declared interval: what its deadline
    /// comes from ([`crate::deadline`]).
    pub offline_after: Option<Duration>,
    pub interval: Option<Duration>,
    /// Its stored labels: with a heartbeat's merged in, they pick its label rule.
    pub labels: Labels,
}

/// A device whose status a flush leaves as it is: written in place, without reading
/// it first, only if its stored status is still `status`. A device that does not
/// match (another writer changed it, or it is unknown) takes the full path: read,
/// [`decide`], write.
///
/// The write sets `last_seen_at`, `error`, the fields the update carries and the
/// deadline (from the stored `offline_after` and interval, in the write itself, by
/// the rules of [`crate::deadline::Deadlines`]); status and `status_changed_at` stay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refresh<'a> {
    pub update: &'a DeviceUpdate,
    /// The status the device must still be in.
    pub status: Status,
    /// The error text to store (the update's heartbeat said it).
    pub error: Option<&'a str>,
}

/// The refresh for `update` if it leaves its device's status as it is: the device
/// only sent heartbeats of one kind since the last flush. `None`: the full path.
///
/// While label rules are configured, a store's refresh also requires that the
/// update's labels change none of the stored ones: the rule that applies depends on
/// the labels as merged, which [`decide`] reads. Firmware repeating its labels in
/// every heartbeat stays on this path; a heartbeat that changes a label does not.
pub fn steady(update: &DeviceUpdate) -> Option<Refresh<'_>> {
    let [step] = update.steps.as_slice() else {
        return None;
    };
    let Signal::Heartbeat { healthy } = step.signal else {
        return None;
    };
    // A heartbeat always says what the error text is; without one the stored text
    // would have to be read to be kept.
    let error = update.error.as_ref()?;
    Some(Refresh {
        update,
        status: if healthy {
            Status::Online
        } else {
            Status::Error
        },
        error: error.as_deref(),
    })
}

/// Unknown devices a heartbeat in this flush would register, each with the arrival of
/// its first heartbeat: what [`crate::registration::admit`] decides on. A Will alone
/// registers nothing.
pub fn newcomers(
    updates: &[&DeviceUpdate],
    current: &HashMap<String, Current>,
) -> Vec<(DeviceId, Timestamp)> {
    updates
        .iter()
        .filter(|u| !current.contains_key(u.device.as_str()))
        .filter_map(|u| {
            let first = u
                .steps
                .iter()
                .find(|s| matches!(s.signal, Signal::Heartbeat { .. }))?;
            Some((u.device.clone(), first.at))
        })
        .collect()
}

/// A device row to write: inserted if the device is new, otherwise overwritten, except
/// that a field the update leaves out (`None`) keeps its stored value, as does
/// `first_seen_at` once set. `registered_at` and `first_seen_at` of a new device are
/// `status_changed_at` and the update's `last_seen`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Row<'a> {
    pub update: &'a DeviceUpdate,
    pub status: Status,
    pub status_changed_at: Timestamp,
    /// Written as is: `None` clears it.
    pub error: Option<&'a str>,
    /// When the device goes offline if it stays silent (`None`: never heard from).
    pub deadline_at: Option<Timestamp>,
    /// The `offline_after` of its label rule, from its labels as written
    /// ([`Deadlines::rule`]): stored, so later refreshes compute the deadline in SQL.
    pub rule: Option<Duration>,
}

/// What a flush writes for the devices that take the full path.
#[derive(Debug, Default, PartialEq)]
pub struct Decision<'a> {
    pub rows: Vec<Row<'a>>,
    /// The transitions, in order: add each to the outbox in the same transaction.
    pub events: Vec<StatusEvent>,
}

/// Runs each update's steps through the status machine from the device's stored state
/// (`current`, keyed by device id; absent: unknown) and returns the rows and events to
/// write. A step received before the stored status changed is no transition. Devices
/// in `refused` are left out; so is an unknown device that only sent its Will. Each
/// row's deadline follows `deadlines`.
pub fn decide<'a>(
    updates: &[&'a DeviceUpdate],
    current: &'a HashMap<String, Current>,
    refused: &HashMap<DeviceId, Refusal>,
    deadlines: &Deadlines,
) -> Decision<'a> {
    let mut events = Vec::new();
    let mut rows = Vec::with_capacity(updates.len());
    for &update in updates {
        if refused.contains_key(&update.device) {
            continue;
        }
        let stored = current.get(update.device.as_str());
        let mut status = stored.map(|c| c.status);
        let mut changed = stored.map(|c| c.status_changed_at);
        for step in &update.steps {
            // A signal received before the stored transition was committed (by another
            // hub, whose flush or offline check came first) is older news than that
            // transition and cannot undo it: a late-delivered heartbeat never brings a
            // device another hub has already declared offline back online. Its time
            // still counts as last seen. One hub never gets here: its offline check
            // flushes what it has received first.
            if stored.is_some_and(|c| step.at < c.status_changed_at) {
                continue;
            }
            let Some(transition) = status::transition(status, step.signal) else {
                continue;
            };
            let last_seen = match step.signal {
                Signal::Heartbeat { .. } => Some(step.at),
                _ => step
                    .last_heartbeat
                    .or_else(|| stored.and_then(|c| c.last_seen_at)),
            };
            let mut event = StatusEvent::new(update.device.clone(), transition, last_seen, step.at);
            // The text the row holds at the end of this step, whatever later steps do.
            if transition.to == Status::Error {
                event.error.clone_from(&step.error);
            }
            events.push(event);
            status = Some(transition.to);
            changed = Some(step.at);
        }
        // A Will from a device we have never heard of creates nothing.
        let (Some(status), Some(status_changed_at)) = (status, changed) else {
            continue;
        };
        let error = match &update.error {
            Some(set) => set.as_deref(),
            None => stored.and_then(|c| c.error.as_deref()),
        };
        // `last_seen_at` as written: the later of the update's and the stored one.
        let last_seen_at = update.last_seen.max(stored.and_then(|c| c.last_seen_at));
        let own = stored.and_then(|c| c.offline_after);
        let interval = update.interval.or(stored.and_then(|c| c.interval));
        let rule = if deadlines.rules.is_empty() {
            None
        } else {
            // The labels as the write leaves them: the heartbeat's merged key by key
            // into the stored ones.
            let mut labels = stored.map(|c| c.labels.clone()).unwrap_or_default();
            if let Some(newer) = &update.labels {
                labels.merge(newer.clone());
            }
            deadlines.rule(&labels)
        };
        rows.push(Row {
            update,
            status,
            status_changed_at,
            error,
            deadline_at: last_seen_at.map(|seen| deadlines.deadline(seen, own, interval, rule)),
            rule,
        });
    }
    Decision { rows, events }
}

/// What silence does: for each watched status, the transition that takes a device in
/// it offline. A store runs one conditional update per entry (the device still in
/// `from` and its deadline passed), so each knows the status it replaces.
pub fn timeouts() -> impl Iterator<Item = (Status, Transition)> {
    Status::ALL.into_iter().filter_map(|from| {
        status::transition(Some(from), Signal::Timeout).map(|transition| (from, transition))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Reason;
    use crate::update::{Batch, Heartbeat, Step};

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).expect("valid id")
    }

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_unix_millis(ms)
    }

    fn beat(healthy: bool) -> Heartbeat {
        Heartbeat {
            healthy,
            error: (!healthy).then(|| "disk full".to_string()),
            ..Heartbeat::default()
        }
    }

    /// One flush's updates, built as the heartbeat handler builds them, by device id.
    fn flush(fill: impl FnOnce(&mut Batch)) -> Vec<DeviceUpdate> {
        let mut batch = Batch::default();
        fill(&mut batch);
        let mut updates = batch.take();
        updates.sort_by(|a, b| a.device.cmp(&b.device));
        updates
    }

    fn device(status: Status, seen: Option<i64>, changed: i64, error: Option<&str>) -> Current {
        Current {
            status,
            last_seen_at: seen.map(at),
            status_changed_at: at(changed),
            error: error.map(str::to_string),
            offline_after: None,
            interval: None,
            labels: Labels::default(),
        }
    }

    fn stored<const N: usize>(devices: [(&str, Current); N]) -> HashMap<String, Current> {
        devices
            .into_iter()
            .map(|(device, current)| (device.to_string(), current))
            .collect()
    }

    fn decide_all<'a>(
        updates: &'a [DeviceUpdate],
        current: &'a HashMap<String, Current>,
    ) -> Decision<'a> {
        let updates: Vec<&DeviceUpdate> = updates.iter().collect();
        decide(&updates, current, &HashMap::new(), &Deadlines::default())
    }

    /// `(device, status, status_changed_at, error)` of each row.
    fn rows(decision: &Decision<'_>) -> Vec<(String, Status, Timestamp, Option<String>)> {
        decision
            .rows
            .iter()
            .map(|r| {
                (
                    r.update.device.to_string(),
                    r.status,
                    r.status_changed_at,
                    r.error.map(str::to_string),
                )
            })
            .collect()
    }

    /// `(device, from, to, reason, last_seen_at, changed_at)` of an event.
    type EventRow = (
        String,
        Option<Status>,
        Status,
        Reason,
        Option<Timestamp>,
        Timestamp,
    );

    /// Each event as an [`EventRow`], in order.
    fn events(decision: &Decision<'_>) -> Vec<EventRow> {
        decision
            .events
            .iter()
            .map(|e| {
                (
                    e.device_id.to_string(),
                    e.previous_status,
                    e.status,
                    e.reason,
                    e.last_seen_at,
                    e.changed_at,
                )
            })
            .collect()
    }

    #[test]
    fn a_first_heartbeat_registers_its_device_at_its_arrival() {
        let updates = flush(|b| {
            b.add_heartbeat(id("a"), at(1_000), beat(true));
            b.add_heartbeat(id("b"), at(1_500), beat(false));
        });
        let current = HashMap::new();
        let decision = decide_all(&updates, &current);
        assert_eq!(
            rows(&decision),
            vec![
                ("a".into(), Status::Online, at(1_000), None),
                (
                    "b".into(),
                    Status::Error,
                    at(1_500),
                    Some("disk full".into())
                ),
            ]
        );
        assert_eq!(
            events(&decision),
            vec![
                (
                    "a".into(),
                    None,
                    Status::Online,
                    Reason::Registered,
                    Some(at(1_000)),
                    at(1_000)
                ),
                (
                    "b".into(),
                    None,
                    Status::Error,
                    Reason::Registered,
                    Some(at(1_500)),
                    at(1_500)
                ),
            ]
        );
    }

    #[test]
    fn heartbeats_of_one_kind_are_a_steady_refresh_and_no_event() {
        let updates = flush(|b| {
            for ms in [2_000, 2_100] {
                b.add_heartbeat(id("a"), at(ms), beat(true));
                b.add_heartbeat(id("b"), at(ms), beat(false));
            }
        });
        let refreshes: Vec<_> = updates
            .iter()
            .map(|u| steady(u).map(|r| (r.update.device.to_string(), r.status, r.error)))
            .collect();
        assert_eq!(
            refreshes,
            vec![
                Some(("a".into(), Status::Online, None)),
                Some(("b".into(), Status::Error, Some("disk full"))),
            ]
        );
        // Were they read after all (another writer changed them meanwhile, say), the
        // full path agrees: no transition, status_changed_at as stored.
        let current = stored([
            ("a", device(Status::Online, Some(1_000), 500, None)),
            (
                "b",
                device(Status::Error, Some(1_000), 600, Some("old text")),
            ),
        ]);
        let decision = decide_all(&updates, &current);
        assert!(decision.events.is_empty());
        assert_eq!(
            rows(&decision),
            vec![
                ("a".into(), Status::Online, at(500), None),
                ("b".into(), Status::Error, at(600), Some("disk full".into())),
            ]
        );
    }

    #[test]
    fn a_status_change_a_will_or_no_error_word_takes_the_full_path() {
        let updates = flush(|b| {
            b.add_heartbeat(id("flip"), at(1_000), beat(false));
            b.add_heartbeat(id("flip"), at(1_100), beat(true));
            b.add_connection_lost(id("gone"), at(1_000));
            b.add_heartbeat(id("late-will"), at(1_000), beat(true));
            b.add_connection_lost(id("late-will"), at(1_100));
        });
        assert!(updates.iter().all(|u| steady(u).is_none()));

        // A heartbeat step with no word on the error text: keeping the stored text
        // needs the stored row.
        let silent_on_error = DeviceUpdate {
            steps: vec![Step {
                signal: Signal::Heartbeat { healthy: false },
                at: at(1_000),
                last_heartbeat: Some(at(1_000)),
                error: None,
            }],
            error: None,
            ..updates[0].clone()
        };
        assert_eq!(steady(&silent_on_error), None);
    }

    #[test]
    fn error_then_recovery_in_one_flush_are_two_transitions_in_order() {
        let updates = flush(|b| {
            b.add_heartbeat(id("a"), at(2_000), beat(false));
            b.add_heartbeat(id("a"), at(2_100), beat(true));
        });
        let current = stored([("a", device(Status::Online, Some(1_000), 1_000, None))]);
        let decision = decide_all(&updates, &current);
        assert_eq!(
            events(&decision),
            vec![
                (
                    "a".into(),
                    Some(Status::Online),
                    Status::Error,
                    Reason::DeviceError,
                    Some(at(2_000)),
                    at(2_000)
                ),
                (
                    "a".into(),
                    Some(Status::Error),
                    Status::Online,
                    Reason::Heartbeat,
                    Some(at(2_100)),
                    at(2_100)
                ),
            ]
        );
        let texts: Vec<_> = decision.events.iter().map(|e| e.error.as_deref()).collect();
        assert_eq!(
            texts,
            vec![Some("disk full"), None],
            "the error event keeps the text the recovery clears from the row"
        );
        assert_eq!(
            rows(&decision),
            vec![("a".into(), Status::Online, at(2_100), None)]
        );
    }

    #[test]
    fn the_stored_status_decides_not_what_the_handler_last_wrote() {
        // Another writer took "a" offline after the handler's last flush.
        let updates = flush(|b| b.add_heartbeat(id("a"), at(7_000), beat(true)));
        let current = stored([("a", device(Status::Offline, Some(1_000), 6_000, None))]);
        let decision = decide_all(&updates, &current);
        assert_eq!(
            events(&decision),
            vec![(
                "a".into(),
                Some(Status::Offline),
                Status::Online,
                Reason::Heartbeat,
                Some(at(7_000)),
                at(7_000)
            )]
        );
        assert_eq!(
            rows(&decision),
            vec![("a".into(), Status::Online, at(7_000), None)]
        );
    }

    #[test]
    fn error_text_is_the_latest_heartbeats_and_a_will_keeps_the_stored_one() {
        let mut newer = beat(false);
        newer.error = Some("fan stuck".into());
        let updates = flush(|b| {
            b.add_heartbeat(id("a"), at(2_000), newer);
            b.add_connection_lost(id("b"), at(2_000));
        });
        let current = stored([
            (
                "a",
                device(Status::Error, Some(1_000), 1_000, Some("disk full")),
            ),
            (
                "b",
                device(Status::Error, Some(1_000), 1_000, Some("disk full")),
            ),
        ]);
        let decision = decide_all(&updates, &current);
        assert_eq!(
            rows(&decision),
            vec![
                (
                    "a".into(),
                    Status::Error,
                    at(1_000),
                    Some("fan stuck".into())
                ),
                (
                    "b".into(),
                    Status::Offline,
                    at(2_000),
                    Some("disk full".into())
                ),
            ]
        );
    }

    #[test]
    fn a_will_from_an_unknown_device_creates_nothing() {
        let updates = flush(|b| b.add_connection_lost(id("ghost"), at(1_000)));
        let current = HashMap::new();
        let pending: Vec<&DeviceUpdate> = updates.iter().collect();
        assert_eq!(newcomers(&pending, &current), vec![]);
        assert_eq!(decide_all(&updates, &current), Decision::default());
    }

    #[test]
    fn a_will_takes_a_watched_device_offline_with_its_last_heartbeat() {
        let updates = flush(|b| {
            b.add_connection_lost(id("a"), at(5_000));
            b.add_heartbeat(id("b"), at(2_000), beat(true));
            b.add_connection_lost(id("b"), at(3_000));
            b.add_connection_lost(id("p"), at(3_000));
        });
        let current = stored([
            ("a", device(Status::Online, Some(1_000), 1_000, None)),
            ("b", device(Status::Online, Some(1_000), 1_000, None)),
            ("p", device(Status::Provisioning, None, 1_000, None)),
        ]);
        let decision = decide_all(&updates, &current);
        assert_eq!(
            events(&decision),
            vec![
                (
                    "a".into(),
                    Some(Status::Online),
                    Status::Offline,
                    Reason::ConnectionLost,
                    Some(at(1_000)),
                    at(5_000)
                ),
                (
                    "b".into(),
                    Some(Status::Online),
                    Status::Offline,
                    Reason::ConnectionLost,
                    Some(at(2_000)),
                    at(3_000)
                ),
            ],
            "a Will reports the latest heartbeat, in this flush or stored"
        );
        assert_eq!(
            rows(&decision),
            vec![
                ("a".into(), Status::Offline, at(5_000), None),
                ("b".into(), Status::Offline, at(3_000), None),
                ("p".into(), Status::Provisioning, at(1_000), None),
            ]
        );
    }

    #[test]
    fn refused_devices_are_left_out() {
        let updates = flush(|b| {
            b.add_heartbeat(id("a"), at(1_000), beat(true));
            b.add_heartbeat(id("b"), at(1_000), beat(true));
        });
        let pending: Vec<&DeviceUpdate> = updates.iter().collect();
        let current = HashMap::new();
        let refused = HashMap::from([(id("b"), Refusal::DeviceLimit)]);
        let decision = decide(&pending, &current, &refused, &Deadlines::default());
        assert_eq!(
            rows(&decision),
            vec![("a".into(), Status::Online, at(1_000), None)]
        );
        assert_eq!(decision.events.len(), 1);
        assert_eq!(decision.events[0].device_id, id("a"));
    }

    #[test]
    fn a_rows_deadline_follows_its_own_setting_then_its_interval_then_the_fleet() {
        let fleet = Deadlines {
            default: std::time::Duration::from_secs(60),
            missed_beats: 3,
            rules: Vec::new(),
        };
        let updates = flush(|b| {
            let mut declares = beat(true);
            declares.interval = Some(std::time::Duration::from_secs(5));
            b.add_heartbeat(id("declares"), at(10_000), declares);
            b.add_heartbeat(id("own"), at(10_000), beat(true));
            b.add_heartbeat(id("plain"), at(10_000), beat(true));
            b.add_heartbeat(id("remembered"), at(10_000), beat(true));
        });
        let mut own = device(Status::Error, Some(500), 500, None);
        own.offline_after = Some(std::time::Duration::from_secs(2));
        own.interval = Some(std::time::Duration::from_secs(100));
        let mut remembered = device(Status::Error, Some(500), 500, None);
        remembered.interval = Some(std::time::Duration::from_secs(7));
        let current = stored([("own", own), ("remembered", remembered)]);
        let pending: Vec<&DeviceUpdate> = updates.iter().collect();
        let decision = decide(&pending, &current, &HashMap::new(), &fleet);
        let deadlines: Vec<(String, Option<Timestamp>)> = decision
            .rows
            .iter()
            .map(|r| (r.update.device.to_string(), r.deadline_at))
            .collect();
        assert_eq!(
            deadlines,
            vec![
                ("declares".into(), Some(at(25_000))),
                ("own".into(), Some(at(12_000))),
                ("plain".into(), Some(at(70_000))),
                ("remembered".into(), Some(at(31_000))),
            ]
        );
    }

    /// A heartbeat's labels are merged into the stored ones before the rule is picked
    /// (the stores send a heartbeat whose labels change something down this path).
    #[test]
    fn a_label_rule_applies_to_the_labels_as_merged_and_below_an_interval() {
        let fleet = Deadlines {
            default: std::time::Duration::from_secs(60),
            missed_beats: 3,
            rules: vec![crate::deadline::Rule {
                labels: Labels::of(&[("kind", "sensor"), ("site", "north")]),
                offline_after: std::time::Duration::from_secs(600),
            }],
        };
        let updates = flush(|b| {
            for device in ["joins", "declares", "elsewhere", "plain"] {
                let mut hb = beat(true);
                if device != "plain" {
                    hb.labels = Some(Labels::of(&[("kind", "sensor")]));
                }
                if device == "declares" {
                    hb.interval = Some(std::time::Duration::from_secs(5));
                }
                b.add_heartbeat(id(device), at(10_000), hb);
            }
        });
        let mut north = device(Status::Online, Some(500), 500, None);
        north.labels = Labels::of(&[("site", "north")]);
        let mut south = device(Status::Online, Some(500), 500, None);
        south.labels = Labels::of(&[("site", "south")]);
        let mut plain = device(Status::Online, Some(500), 500, None);
        plain.labels = Labels::of(&[("kind", "sensor"), ("site", "north")]);
        let current = stored([
            ("joins", north.clone()),
            ("declares", north),
            ("elsewhere", south),
            ("plain", plain),
        ]);
        let pending: Vec<&DeviceUpdate> = updates.iter().collect();
        let decision = decide(&pending, &current, &HashMap::new(), &fleet);
        let rows: Vec<(String, Option<Timestamp>, Option<std::time::Duration>)> = decision
            .rows
            .iter()
            .map(|r| (r.update.device.to_string(), r.deadline_at, r.rule))
            .collect();
        let rule = Some(std::time::Duration::from_secs(600));
        assert_eq!(
            rows,
            vec![
                ("declares".into(), Some(at(25_000)), rule),
                ("elsewhere".into(), Some(at(70_000)), None),
                ("joins".into(), Some(at(610_000)), rule),
                ("plain".into(), Some(at(610_000)), rule),
            ]
        );
    }

    #[test]
    fn newcomers_are_unknown_devices_with_a_heartbeat_at_their_first_one() {
        let updates = flush(|b| {
            b.add_heartbeat(id("known"), at(1_000), beat(true));
            b.add_connection_lost(id("late"), at(1_000));
            b.add_heartbeat(id("late"), at(1_200), beat(false));
            b.add_heartbeat(id("late"), at(1_300), beat(true));
            b.add_connection_lost(id("will-only"), at(1_000));
        });
        let pending: Vec<&DeviceUpdate> = updates.iter().collect();
        let current = stored([("known", device(Status::Online, Some(500), 500, None))]);
        assert_eq!(newcomers(&pending, &current), vec![(id("late"), at(1_200))]);
    }

    #[test]
    fn silence_takes_only_the_watched_statuses_offline() {
        let timeouts: Vec<_> = timeouts()
            .map(|(from, t)| (from, t.from, t.to, t.reason))
            .collect();
        assert_eq!(
            timeouts,
            vec![
                (
                    Status::Online,
                    Some(Status::Online),
                    Status::Offline,
                    Reason::HeartbeatTimeout
                ),
                (
                    Status::Error,
                    Some(Status::Error),
                    Status::Offline,
                    Reason::HeartbeatTimeout
                ),
            ]
        );
    }
}
