//! Who is told what, and when: the alert policy between the event log and a sink's
//! queue (interface.md "Alert policy"). The status events themselves are never
//! changed; the policy only decides which of them become messages.
//!
//! Every transition a sink's filter matches is held here until it is decided:
//!
//! - **Flap damping.** A device's offline (or error) waits `notify.min_offline`; if
//!   the device is back before, neither the offline nor the recovery is sent. A
//!   recovery is sent only for a down transition that was sent.
//! - **Dependencies.** A child (a device naming a `parent`) that goes offline waits
//!   until its parent's fate is known: the parent beat after the child's last
//!   heartbeat, so the child alone is down (send it); the parent is offline, so the
//!   child is folded into the parent's message (which counts the devices behind it);
//!   or the parent's deadline passes (send it). When the parent recovers, a folded
//!   child still offline one deadline later is sent then; one that came back with
//!   its parent sends nothing.
//! - **Storm grouping.** A decided transition joins the group of its kind and of
//!   its labels named in `notify.group_by`; the group's window opens with its first
//!   transition and closes `notify.group_wait` later. Then at least
//!   `notify.group_threshold` transitions become one message; fewer, one each.
//! - **Silences.** A transition decided while its device is silenced is not sent; a
//!   device still down when its silences end is sent then, once.
//! - **Reminders.** With `notify.repeat_after`, a device still down is reminded of
//!   every `repeat_after` after its down transition was sent.
//!
//! The engine is a plain state machine ([`Engine`]) fed by the sink's task, which
//! asks the stores for the facts it needs ([`Facts`]). What it holds is only in
//! memory, so the sink's cursor in the event log stays before the oldest transition
//! still held: after a restart those transitions are decided again, and what was
//! already queued is not queued twice (a notification's key is its transition's
//! position in the log). What silences held past the cursor is found again in the
//! stores when an engine starts ([`Engine::recall`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;

use super::filter::is_recovery;
use super::message::{Behind, GroupNotice, Notice};
use crate::clock::Timestamp;
use crate::deadline::Deadlines;
use crate::device::DeviceId;
use crate::event::StoredEvent;
use crate::labels::Labels;
use crate::status::Status;
use crate::storage::{Device, StoreError};

/// Names listed in a grouped or a parent's message, at most.
pub const LISTED: usize = 5;
/// Reminders one down transition may have; a reminder's key is made of its
/// transition's position and its number, so they must be bounded.
const MAX_REMINDERS: i64 = 9_999;

/// `[notify]`'s policy keys, checked.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    pub group_wait: Duration,
    pub group_by: Vec<String>,
    /// 0: never group.
    pub group_threshold: u32,
    pub min_offline: Duration,
    pub repeat_after: Option<Duration>,
    /// The dashboard's address as people reach it, for links in messages.
    pub dashboard_url: Option<String>,
    /// A folded child's next deadline after its parent's recovery.
    pub deadlines: Deadlines,
}

impl Default for PolicySettings {
    fn default() -> Self {
        Self {
            group_wait: Duration::ZERO,
            group_by: Vec::new(),
            group_threshold: 0,
            min_offline: Duration::ZERO,
            repeat_after: None,
            dashboard_url: None,
            deadlines: Deadlines::default(),
        }
    }
}

/// Whether a device is silenced, and until when.
pub trait Quiet: Send + Sync {
    fn silenced_until(
        &self,
        device: &DeviceId,
        labels: &Labels,
        at: Timestamp,
    ) -> Option<Timestamp>;
}

/// Nothing is silenced.
pub struct NoSilences;

impl Quiet for NoSilences {
    fn silenced_until(&self, _: &DeviceId, _: &Labels, _: Timestamp) -> Option<Timestamp> {
        None
    }
}

/// Silences as stored: a device is silenced until the latest end of those covering it.
impl Quiet for Vec<crate::silence::Silence> {
    fn silenced_until(
        &self,
        device: &DeviceId,
        labels: &Labels,
        at: Timestamp,
    ) -> Option<Timestamp> {
        self.iter()
            .filter(|s| s.covers(device, labels, at))
            .map(|s| s.ends_at)
            .max()
    }
}

/// What the policy needs to know besides the event log.
#[async_trait]
pub trait Facts: Send + Sync + 'static {
    /// The stored devices among `ids` (unknown ones left out).
    async fn devices(&self, ids: &[DeviceId]) -> Result<Vec<Device>, StoreError>;
    /// For each of `parents` that devices name as theirs: how many, and the first
    /// `limit` of their ids (parents without any left out).
    async fn children(
        &self,
        parents: &[DeviceId],
        limit: usize,
    ) -> Result<HashMap<DeviceId, Behind>, StoreError>;
    /// The silences in force at `now` or later.
    async fn quiet(&self, now: Timestamp) -> Result<Box<dyn Quiet>, StoreError>;
    /// A device's latest transition.
    async fn latest_event(&self, id: &DeviceId) -> Result<Option<StoredEvent>, StoreError>;
    /// The devices down now, silenced now, and silenced when they went down (by
    /// silences in force at `now` or later): those whose down transition a silence
    /// held, to be told when their silences end.
    async fn silenced_down(&self, now: Timestamp) -> Result<Vec<Device>, StoreError>;
}

/// A message the policy decided to send.
#[derive(Debug, Clone, PartialEq)]
pub enum Decided {
    One {
        /// The notification's key in the sink's queue: its transition's position in
        /// the log (a reminder's is made from it, see [`reminder_key`]).
        key: i64,
        notice: Notice,
    },
    Group {
        key: i64,
        notice: GroupNotice,
    },
}

impl Decided {
    pub fn key(&self) -> i64 {
        match self {
            Decided::One { key, .. } | Decided::Group { key, .. } => *key,
        }
    }
}

/// The key of reminder `n` (1, 2, …) of the transition at `seq`: negative, so it
/// never meets a transition's own key.
pub fn reminder_key(seq: i64, n: i64) -> i64 {
    -(seq.saturating_mul(MAX_REMINDERS + 1) + n.min(MAX_REMINDERS))
}

/// A transition (or a reminder) not yet decided.
#[derive(Debug, Clone)]
struct Held {
    key: i64,
    /// Its position in the log, if it came from there now (a transition taken up
    /// again later, such as at a silence's end, keeps the sink's cursor nowhere).
    log_seq: Option<i64>,
    notice: Notice,
    labels: Labels,
    parent: Option<DeviceId>,
    own_offline_after: Duration,
    /// Not decided before this.
    ready_at: Timestamp,
    /// Was ready, but waits for its parent's fate.
    waiting_parent: bool,
    /// In this group's window, once decided.
    group: Option<GroupKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GroupKey {
    kind: &'static str,
    labels: Vec<(String, String)>,
}

#[derive(Debug)]
struct Window {
    closes_at: Timestamp,
    members: Vec<i64>,
}

/// What became of a device's down transition.
#[derive(Debug, Clone)]
enum Down {
    /// Sent; reminded `reminders` times so far.
    Sent {
        key: i64,
        sent_at: Timestamp,
        reminders: i64,
        notice: Notice,
        labels: Labels,
    },
    /// Folded into its parent's; looked at again at `recheck_at` once the parent is
    /// back.
    Folded {
        parent: DeviceId,
        offline_after: Duration,
        changed_at: Timestamp,
        recheck_at: Option<Timestamp>,
    },
    /// Decided while silenced.
    Silenced {
        labels: Labels,
        changed_at: Timestamp,
    },
}

/// One sink's policy.
pub struct Engine {
    settings: PolicySettings,
    held: BTreeMap<i64, Held>,
    /// Each device's held down transitions.
    held_down: HashMap<DeviceId, Vec<i64>>,
    windows: HashMap<GroupKey, Window>,
    down: HashMap<DeviceId, Down>,
    /// Whether the devices a silence holds have been recalled from the stores since
    /// this engine started (or was reset).
    recalled: bool,
}

/// The device facts a transition is held with.
#[derive(Debug, Clone, Default)]
pub struct Known {
    pub labels: Labels,
    pub parent: Option<DeviceId>,
    /// The device's offline_after: own, else interval times missed beats, else its
    /// label rule's, else the default.
    pub offline_after: Option<Duration>,
}

impl Known {
    pub fn of(device: &Device, deadlines: &Deadlines) -> Self {
        Self {
            labels: device.labels.clone(),
            parent: device.parent.clone(),
            offline_after: Some(deadlines.offline_after(
                device.offline_after,
                device.interval,
                deadlines.rule(&device.labels),
            )),
        }
    }
}

fn is_down(status: Status) -> bool {
    matches!(status, Status::Offline | Status::Error)
}

impl Engine {
    pub fn new(settings: PolicySettings) -> Self {
        Self {
            settings,
            held: BTreeMap::new(),
            held_down: HashMap::new(),
            windows: HashMap::new(),
            down: HashMap::new(),
            recalled: false,
        }
    }

    /// Forgets everything held (another process moved the sink's cursor).
    pub fn reset(&mut self) {
        self.held.clear();
        self.held_down.clear();
        self.windows.clear();
        self.down.clear();
        self.recalled = false;
    }

    /// The position of the oldest transition from the log still held: the sink's
    /// cursor may not pass it.
    pub fn oldest_held(&self) -> Option<i64> {
        self.held.values().filter_map(|h| h.log_seq).min()
    }

    /// Whether a pass could decide anything without a new transition.
    pub fn is_idle(&self) -> bool {
        self.held.is_empty()
            && (self.settings.repeat_after.is_none()
                || !self.down.values().any(|d| matches!(d, Down::Sent { .. })))
            && !self
                .down
                .values()
                .any(|d| matches!(d, Down::Silenced { .. } | Down::Folded { .. }))
    }

    /// Takes in a transition the sink's filter matched.
    pub fn observe(&mut self, stored: &StoredEvent, notice: Notice, known: Known) {
        let event = &stored.event;
        let device = event.device_id.clone();
        if is_down(event.status) {
            let ready_at = event.changed_at.saturating_add(self.settings.min_offline);
            self.hold(stored.seq, Some(stored.seq), notice, known, ready_at);
            self.held_down.entry(device).or_default().push(stored.seq);
            return;
        }
        if is_recovery(event) {
            // A parent back: its folded children are looked at one deadline later.
            for down in self.down.values_mut() {
                if let Down::Folded {
                    parent,
                    offline_after,
                    recheck_at,
                    ..
                } = down
                    && *parent == device
                {
                    *recheck_at = Some(event.changed_at.saturating_add(*offline_after));
                }
            }
            if let Some(seqs) = self.held_down.remove(&device) {
                // Back before its down transition was decided (within min_offline, or
                // while it waited for its parent's fate): a flap, nobody is told.
                let mut kept = Vec::new();
                for seq in seqs {
                    let undecided = self.held.get(&seq).is_some_and(|h| {
                        h.group.is_none() && (event.changed_at < h.ready_at || h.waiting_parent)
                    });
                    if undecided {
                        self.unhold(seq);
                    } else {
                        kept.push(seq);
                    }
                }
                if kept.is_empty() {
                    self.down.remove(&device);
                    return;
                }
                // Its down transition is decided and will be sent: so is this, after.
                self.held_down.insert(device, kept);
                self.hold(
                    stored.seq,
                    Some(stored.seq),
                    notice,
                    known,
                    event.changed_at,
                );
                return;
            }
            let send = match self.down.remove(&device) {
                Some(Down::Sent { .. }) => true,
                Some(Down::Folded { .. } | Down::Silenced { .. }) => false,
                // Went down before this process decided it (or before the sink
                // heard): its down transition was sent unless it was shorter than
                // min_offline.
                None => notice
                    .down_for()
                    .is_none_or(|down| down >= self.settings.min_offline),
            };
            if send {
                self.hold(
                    stored.seq,
                    Some(stored.seq),
                    notice,
                    known,
                    event.changed_at,
                );
            }
            return;
        }
        self.hold(
            stored.seq,
            Some(stored.seq),
            notice,
            known,
            event.changed_at,
        );
    }

    fn hold(
        &mut self,
        key: i64,
        log_seq: Option<i64>,
        notice: Notice,
        known: Known,
        ready_at: Timestamp,
    ) {
        let own_offline_after = known
            .offline_after
            .unwrap_or(self.settings.deadlines.default);
        self.held.insert(
            key,
            Held {
                key,
                log_seq,
                notice,
                labels: known.labels,
                parent: known.parent,
                own_offline_after,
                ready_at,
                waiting_parent: false,
                group: None,
            },
        );
    }

    fn unhold(&mut self, key: i64) {
        if let Some(held) = self.held.remove(&key)
            && let Some(group) = held.group
            && let Some(window) = self.windows.get_mut(&group)
        {
            window.members.retain(|k| *k != key);
            if window.members.is_empty() {
                self.windows.remove(&group);
            }
        }
    }

    /// Decides what can be decided at `now`.
    pub async fn pass(
        &mut self,
        now: Timestamp,
        facts: &dyn Facts,
    ) -> Result<Vec<Decided>, StoreError> {
        let quiet = facts.quiet(now).await?;
        self.take_up(now, facts, quiet.as_ref()).await?;
        self.remind(now);
        self.decide_ready(now, facts).await?;
        self.close_windows(now, facts, quiet.as_ref()).await
    }

    /// Whether [`Self::recall`] is due: the engine is new, or was reset.
    pub fn needs_recall(&self) -> bool {
        !self.recalled
    }

    /// What a silence held before this engine started: `devices` ([`Facts::silenced_down`],
    /// those the sink's filter matches) are down since before their silence, so their
    /// down transition was not sent; they are told when their silences end, as if
    /// this engine had decided them. (Transitions after the sink's cursor are decided
    /// again anyway; their keys keep them from being queued twice.)
    pub fn recall(&mut self, devices: impl IntoIterator<Item = Device>) {
        for device in devices {
            self.down
                .entry(device.device_id.clone())
                .or_insert(Down::Silenced {
                    labels: device.labels,
                    changed_at: device.status_changed_at,
                });
        }
        self.recalled = true;
    }

    /// Devices whose silences ended while down, and folded children still down a
    /// deadline after their parent's recovery, are held again to be sent.
    async fn take_up(
        &mut self,
        now: Timestamp,
        facts: &dyn Facts,
        quiet: &dyn Quiet,
    ) -> Result<(), StoreError> {
        let due: Vec<(DeviceId, Timestamp)> = self
            .down
            .iter()
            .filter_map(|(id, down)| match down {
                Down::Silenced { labels, changed_at }
                    if quiet.silenced_until(id, labels, now).is_none() =>
                {
                    Some((id.clone(), *changed_at))
                }
                Down::Folded {
                    recheck_at: Some(at),
                    changed_at,
                    ..
                } if *at <= now => Some((id.clone(), *changed_at)),
                _ => None,
            })
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let ids: Vec<DeviceId> = due.iter().map(|(id, _)| id.clone()).collect();
        let devices: HashMap<DeviceId, Device> = facts
            .devices(&ids)
            .await?
            .into_iter()
            .map(|d| (d.device_id.clone(), d))
            .collect();
        for (id, changed_at) in due {
            self.down.remove(&id);
            let Some(device) = devices.get(&id) else {
                continue;
            };
            // Still down since the same transition: it is told now.
            if !is_down(device.status) || device.status_changed_at != changed_at {
                continue;
            }
            let Some(latest) = facts.latest_event(&id).await? else {
                continue;
            };
            let known = Known::of(device, &self.settings.deadlines);
            let notice = Notice {
                event: latest.event,
                down_since: None,
                behind: None,
                reminder: None,
            };
            // Decided now, without waiting for its parent again.
            let known = Known {
                parent: None,
                ..known
            };
            self.hold(latest.seq, None, notice, known, now);
            self.held_down.entry(id).or_default().push(latest.seq);
        }
        Ok(())
    }

    /// Reminders of devices still down.
    fn remind(&mut self, now: Timestamp) {
        let Some(every) = self.settings.repeat_after else {
            return;
        };
        let mut due = Vec::new();
        for down in self.down.values_mut() {
            if let Down::Sent {
                key,
                sent_at,
                reminders,
                notice,
                labels,
            } = down
                && *reminders < MAX_REMINDERS
                && sent_at.saturating_add(every.saturating_mul((*reminders + 1) as u32)) <= now
            {
                *reminders += 1;
                let mut reminder = notice.clone();
                reminder.reminder = Some(u32::try_from(*reminders).unwrap_or(u32::MAX));
                due.push((reminder_key(*key, *reminders), reminder, labels.clone()));
            }
        }
        for (key, notice, labels) in due {
            let known = Known {
                labels,
                parent: None,
                offline_after: None,
            };
            self.hold(key, None, notice, known, now);
        }
    }

    /// Held transitions whose time has come join their group's window, unless a
    /// child must still wait for its parent's fate.
    async fn decide_ready(&mut self, now: Timestamp, facts: &dyn Facts) -> Result<(), StoreError> {
        let ready: Vec<i64> = self
            .held
            .values()
            .filter(|h| h.group.is_none() && h.ready_at <= now)
            .map(|h| h.key)
            .collect();
        if ready.is_empty() {
            return Ok(());
        }
        let parents: Vec<DeviceId> = ready
            .iter()
            .filter_map(|k| self.held.get(k))
            .filter(|h| h.notice.event.status == Status::Offline && h.notice.reminder.is_none())
            .filter_map(|h| h.parent.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let parents: HashMap<DeviceId, Device> = if parents.is_empty() {
            HashMap::new()
        } else {
            facts
                .devices(&parents)
                .await?
                .into_iter()
                .map(|d| (d.device_id.clone(), d))
                .collect()
        };
        for key in ready {
            let Some(held) = self.held.get(&key) else {
                continue;
            };
            let event = &held.notice.event;
            let parent = held
                .parent
                .as_ref()
                .filter(|_| event.status == Status::Offline && held.notice.reminder.is_none())
                .and_then(|p| parents.get(p));
            if let Some(parent) = parent {
                if is_down(parent.status) && !self.folds_into(&parent.device_id, &event.device_id) {
                    // Behind a parent that is down: the parent's message tells.
                    let folded = Down::Folded {
                        parent: parent.device_id.clone(),
                        offline_after: held.own_offline_after,
                        changed_at: event.changed_at,
                        recheck_at: None,
                    };
                    let device = event.device_id.clone();
                    self.unhold(key);
                    if let Some(seqs) = self.held_down.get_mut(&device) {
                        seqs.retain(|s| *s != key);
                    }
                    self.down.insert(device, folded);
                    continue;
                }
                let beat_since = match (parent.last_seen_at, event.last_seen_at) {
                    (Some(parent_seen), Some(child_seen)) => parent_seen > child_seen,
                    (Some(_), None) => true,
                    _ => false,
                };
                let parent_deadline_passed = parent.deadline_at.is_none_or(|at| at <= now);
                if parent.status == Status::Online && !beat_since && !parent_deadline_passed {
                    if let Some(held) = self.held.get_mut(&key) {
                        held.waiting_parent = true;
                    }
                    continue;
                }
            }
            let group = GroupKey {
                kind: held.notice.kind(),
                labels: self
                    .settings
                    .group_by
                    .iter()
                    .filter_map(|k| held.labels.get(k).map(|v| (k.clone(), v.to_string())))
                    .collect(),
            };
            // The window opens with its first transition (a transition taken in late,
            // after a restart or a wait for its parent, has waited already).
            // Without grouping (threshold 0) nothing waits for a window.
            let wait = if self.settings.group_threshold == 0 {
                Duration::ZERO
            } else {
                self.settings.group_wait
            };
            let closes_at = held.ready_at.saturating_add(wait);
            self.windows
                .entry(group.clone())
                .or_insert_with(|| Window {
                    closes_at,
                    members: Vec::new(),
                })
                .members
                .push(key);
            if let Some(held) = self.held.get_mut(&key) {
                held.group = Some(group);
            }
        }
        Ok(())
    }

    /// Whether `device` is folded, directly or through folded parents, into `into`:
    /// folding `into` into `device` then would close a loop (parents naming each
    /// other), where each would wait on the other's message and nobody be told.
    fn folds_into(&self, device: &DeviceId, into: &DeviceId) -> bool {
        let mut at = device;
        // Each step follows a folded device to its parent; a chain cannot be longer
        // than the devices folded.
        for _ in 0..=self.down.len() {
            if at == into {
                return true;
            }
            match self.down.get(at) {
                Some(Down::Folded { parent, .. }) => at = parent,
                _ => return false,
            }
        }
        false
    }

    /// Windows that closed become messages.
    async fn close_windows(
        &mut self,
        now: Timestamp,
        facts: &dyn Facts,
        quiet: &dyn Quiet,
    ) -> Result<Vec<Decided>, StoreError> {
        let closed: Vec<GroupKey> = self
            .windows
            .iter()
            .filter(|(_, w)| w.closes_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        let mut decided = Vec::new();
        for group in closed {
            let Some(window) = self.windows.remove(&group) else {
                continue;
            };
            // The devices behind each offline member, counted in one query.
            let offline: Vec<DeviceId> = window
                .members
                .iter()
                .filter_map(|key| self.held.get(key))
                .filter(|h| h.notice.event.status == Status::Offline && h.notice.reminder.is_none())
                .map(|h| h.notice.event.device_id.clone())
                .collect();
            let mut behind = facts.children(&offline, LISTED).await?;
            let mut notices = Vec::with_capacity(window.members.len());
            for key in window.members {
                let Some(mut held) = self.held.remove(&key) else {
                    continue;
                };
                let event = &held.notice.event;
                let device = event.device_id.clone();
                let down = is_down(event.status);
                if down && let Some(seqs) = self.held_down.get_mut(&device) {
                    seqs.retain(|s| *s != key);
                    if seqs.is_empty() {
                        self.held_down.remove(&device);
                    }
                }
                if is_recovery(event)
                    && matches!(
                        self.down.get(&device),
                        Some(Down::Folded { .. } | Down::Silenced { .. })
                    )
                {
                    // Its down transition was not told on its own: nor is this.
                    self.down.remove(&device);
                    continue;
                }
                if quiet.silenced_until(&device, &held.labels, now).is_some() {
                    if down {
                        self.down.insert(
                            device,
                            Down::Silenced {
                                labels: held.labels,
                                changed_at: event.changed_at,
                            },
                        );
                    }
                    continue;
                }
                if event.status == Status::Offline && held.notice.reminder.is_none() {
                    held.notice.behind = behind.remove(&device);
                }
                // Kept only for reminders: a recovery after a down that was sent is
                // sent anyway (it was down at least min_offline).
                if down && held.notice.reminder.is_none() && self.settings.repeat_after.is_some() {
                    self.down.insert(
                        device,
                        Down::Sent {
                            key,
                            sent_at: now,
                            reminders: 0,
                            notice: held.notice.clone(),
                            labels: held.labels.clone(),
                        },
                    );
                }
                notices.push((key, held.notice));
            }
            let threshold = self.settings.group_threshold as usize;
            if threshold > 0 && notices.len() >= threshold {
                let key = notices.iter().map(|(k, _)| *k).min().unwrap_or_default();
                decided.push(Decided::Group {
                    key,
                    notice: GroupNotice::new(
                        group.kind,
                        group.labels,
                        notices.into_iter().map(|(_, n)| n).collect(),
                        self.settings.dashboard_url.as_deref(),
                    ),
                });
            } else {
                decided.extend(
                    notices
                        .into_iter()
                        .map(|(key, notice)| Decided::One { key, notice }),
                );
            }
        }
        decided.sort_by_key(|d| d.key().abs());
        Ok(decided)
    }
}

/// The facts, read from the device store.
pub struct StoreFacts(pub std::sync::Arc<dyn crate::storage::Store>);

#[async_trait]
impl Facts for StoreFacts {
    async fn devices(&self, ids: &[DeviceId]) -> Result<Vec<Device>, StoreError> {
        self.0.devices_by_id(ids).await
    }

    async fn children(
        &self,
        parents: &[DeviceId],
        limit: usize,
    ) -> Result<HashMap<DeviceId, Behind>, StoreError> {
        let mut behind = HashMap::new();
        // Chunks keep each query's id list a manageable size.
        for chunk in parents.chunks(10_000) {
            for (parent, count) in self.0.count_children(chunk).await? {
                let first = self
                    .0
                    .devices(&crate::storage::DeviceQuery {
                        parent: Some(parent.clone()),
                        limit: u32::try_from(limit).unwrap_or(u32::MAX),
                        ..Default::default()
                    })
                    .await?;
                let first = first.into_iter().map(|d| d.device_id).collect();
                behind.insert(parent, Behind { count, first });
            }
        }
        Ok(behind)
    }

    async fn quiet(&self, now: Timestamp) -> Result<Box<dyn Quiet>, StoreError> {
        let silences = self.0.silences(now).await?;
        Ok(if silences.is_empty() {
            Box::new(NoSilences)
        } else {
            Box::new(silences)
        })
    }

    async fn latest_event(&self, id: &DeviceId) -> Result<Option<StoredEvent>, StoreError> {
        Ok(self.0.events(id, None, 1).await?.into_iter().next())
    }

    async fn silenced_down(&self, now: Timestamp) -> Result<Vec<Device>, StoreError> {
        let silences = self.0.silences(now).await?;
        if silences.is_empty() {
            return Ok(Vec::new());
        }
        let mut held = Vec::new();
        for status in [Status::Offline, Status::Error] {
            let mut after = None;
            loop {
                let page = self
                    .0
                    .devices(&crate::storage::DeviceQuery {
                        status: Some(status),
                        after: after.clone(),
                        limit: 1_000,
                        ..Default::default()
                    })
                    .await?;
                let Some(last) = page.last() else { break };
                after = Some(last.device_id.clone());
                held.extend(page.into_iter().filter(|d| {
                    let silenced = |at| silences.silenced_until(&d.device_id, &d.labels, at);
                    silenced(now).is_some() && silenced(d.status_changed_at).is_some()
                }));
            }
        }
        Ok(held)
    }
}

#[cfg(test)]
mod tests;
