//! The policy against facts held in memory; time is passed in, never waited for.

use std::sync::Mutex;

use super::*;
use crate::event::StatusEvent;
use crate::status::{Reason, Transition};

const T0: i64 = 1_800_000_000_000;

fn at(ms: i64) -> Timestamp {
    Timestamp::from_unix_millis(T0 + ms)
}

fn id(text: &str) -> DeviceId {
    DeviceId::parse(text).expect("id")
}

#[derive(Default)]
struct World {
    devices: Mutex<HashMap<DeviceId, Device>>,
    /// `(device or prefix*, from, until)`.
    silences: Mutex<Vec<(String, Timestamp, Timestamp)>>,
    events: Mutex<Vec<StoredEvent>>,
}

impl World {
    fn set(&self, name: &str, status: Status, seen_ms: i64, deadline_ms: Option<i64>) {
        let device = Device {
            device_id: id(name),
            status,
            last_seen_at: Some(at(seen_ms)),
            first_seen_at: Some(at(0)),
            status_changed_at: at(seen_ms),
            registered_at: at(0),
            device_time: None,
            clock_skew_ms: None,
            error: None,
            offline_after: None,
            interval: None,
            deadline_at: deadline_ms.map(at),
            labels: Labels::default(),
            parent: None,
            report: Default::default(),
        };
        self.devices
            .lock()
            .expect("lock")
            .insert(device.device_id.clone(), device);
    }

    fn silence(&self, pattern: &str, from_ms: i64, until_ms: i64) {
        self.silences
            .lock()
            .expect("lock")
            .push((pattern.to_string(), at(from_ms), at(until_ms)));
    }
}

struct Silenced(Vec<(String, Timestamp, Timestamp)>);

impl Quiet for Silenced {
    fn silenced_until(&self, device: &DeviceId, _: &Labels, at: Timestamp) -> Option<Timestamp> {
        self.0
            .iter()
            .filter(|(pattern, from, until)| {
                let hit = match pattern.strip_suffix('*') {
                    Some(prefix) => device.as_str().starts_with(prefix),
                    None => device.as_str() == pattern,
                };
                hit && *from <= at && at < *until
            })
            .map(|(_, _, until)| *until)
            .max()
    }
}

#[async_trait]
impl Facts for World {
    async fn devices(&self, ids: &[DeviceId]) -> Result<Vec<Device>, StoreError> {
        let devices = self.devices.lock().expect("lock");
        Ok(ids.iter().filter_map(|i| devices.get(i).cloned()).collect())
    }

    async fn children(
        &self,
        parents: &[DeviceId],
        limit: usize,
    ) -> Result<HashMap<DeviceId, Behind>, StoreError> {
        // Children are named `{parent}.child-N` in these tests.
        let devices = self.devices.lock().expect("lock");
        let mut behind = HashMap::new();
        for parent in parents {
            let mut ids: Vec<DeviceId> = devices
                .keys()
                .filter(|d| d.as_str().starts_with(&format!("{parent}.")))
                .cloned()
                .collect();
            if ids.is_empty() {
                continue;
            }
            ids.sort();
            let count = ids.len() as u64;
            ids.truncate(limit);
            behind.insert(parent.clone(), Behind { count, first: ids });
        }
        Ok(behind)
    }

    async fn quiet(&self, _: Timestamp) -> Result<Box<dyn Quiet>, StoreError> {
        Ok(Box::new(Silenced(
            self.silences.lock().expect("lock").clone(),
        )))
    }

    async fn latest_event(&self, device: &DeviceId) -> Result<Option<StoredEvent>, StoreError> {
        Ok(self
            .events
            .lock()
            .expect("lock")
            .iter()
            .rev()
            .find(|e| e.event.device_id == *device)
            .cloned())
    }

    async fn silenced_down(&self, now: Timestamp) -> Result<Vec<Device>, StoreError> {
        let quiet = Silenced(self.silences.lock().expect("lock").clone());
        Ok(self
            .devices
            .lock()
            .expect("lock")
            .values()
            .filter(|d| is_down(d.status))
            .filter(|d| {
                let silenced = |at| quiet.silenced_until(&d.device_id, &d.labels, at);
                silenced(now).is_some() && silenced(d.status_changed_at).is_some()
            })
            .cloned()
            .collect())
    }
}

/// Feeds transitions to an engine and keeps the log, as the sink's task does.
struct Harness {
    engine: Engine,
    world: World,
    seq: i64,
    /// When each device went down, for recoveries' `down_since`.
    down_since: HashMap<DeviceId, Timestamp>,
}

impl Harness {
    fn new(settings: PolicySettings) -> Self {
        Self {
            engine: Engine::new(settings),
            world: World::default(),
            seq: 0,
            down_since: HashMap::new(),
        }
    }

    /// A transition of `name` at `ms`, with its device's labels.
    fn transition(
        &mut self,
        name: &str,
        from: Status,
        to: Status,
        ms: i64,
        labels: Labels,
        parent: Option<&str>,
    ) -> i64 {
        self.seq += 1;
        let reason = match to {
            Status::Offline => Reason::HeartbeatTimeout,
            Status::Error => Reason::DeviceError,
            _ => Reason::Heartbeat,
        };
        let event = StatusEvent::new(
            id(name),
            Transition {
                from: Some(from),
                to,
                reason,
            },
            Some(at(ms - 1_000)),
            at(ms),
        );
        let down_since = if is_down(to) {
            self.down_since.insert(id(name), at(ms));
            None
        } else {
            self.down_since.remove(&id(name))
        };
        let stored = StoredEvent {
            seq: self.seq,
            event,
        };
        self.world.events.lock().expect("lock").push(stored.clone());
        let notice = Notice {
            event: stored.event.clone(),
            down_since,
            behind: None,
            reminder: None,
        };
        let known = Known {
            labels,
            parent: parent.map(id),
            offline_after: Some(Duration::from_secs(30)),
        };
        self.engine.observe(&stored, notice, known);
        self.seq
    }

    fn offline(&mut self, name: &str, ms: i64) -> i64 {
        self.world.set(name, Status::Offline, ms - 1_000, None);
        self.transition(
            name,
            Status::Online,
            Status::Offline,
            ms,
            Labels::default(),
            None,
        )
    }

    fn back(&mut self, name: &str, ms: i64) -> i64 {
        self.world.set(name, Status::Online, ms, Some(ms + 30_000));
        self.transition(
            name,
            Status::Offline,
            Status::Online,
            ms,
            Labels::default(),
            None,
        )
    }

    async fn pass(&mut self, ms: i64) -> Vec<Decided> {
        self.engine.pass(at(ms), &self.world).await.expect("pass")
    }
}

/// `(kind, device)` of single messages, `(kind, "N")` of grouped ones.
fn told(decided: &[Decided]) -> Vec<(String, String)> {
    decided
        .iter()
        .map(|d| match d {
            Decided::One { notice, .. } => (
                notice.kind().to_string(),
                notice.event.device_id.to_string(),
            ),
            Decided::Group { notice, .. } => (notice.kind(), notice.count.to_string()),
        })
        .collect()
}

fn pair(kind: &str, what: &str) -> (String, String) {
    (kind.to_string(), what.to_string())
}

#[tokio::test]
async fn without_a_policy_each_transition_is_told_at_once() {
    let mut h = Harness::new(PolicySettings::default());
    h.offline("pump-1", 1_000);
    assert_eq!(h.engine.oldest_held(), Some(1));
    assert_eq!(
        told(&h.pass(1_000).await),
        [pair("device.offline", "pump-1")]
    );
    assert_eq!(h.engine.oldest_held(), None);
    h.back("pump-1", 5_000);
    assert_eq!(
        told(&h.pass(5_000).await),
        [pair("device.recovered", "pump-1")]
    );
}

fn grouping(threshold: u32, by: &[&str]) -> PolicySettings {
    PolicySettings {
        group_wait: Duration::from_secs(10),
        group_threshold: threshold,
        group_by: by.iter().map(|s| s.to_string()).collect(),
        dashboard_url: Some("https://fleet.example.com/".into()),
        ..PolicySettings::default()
    }
}

#[tokio::test]
async fn a_storm_at_one_site_is_one_message_when_its_window_closes() {
    let mut h = Harness::new(grouping(50, &["site"]));
    let north = Labels::of(&[("site", "north")]);
    for i in 0..300 {
        let name = format!("pump-{i:03}");
        h.world.set(&name, Status::Offline, 0, None);
        h.transition(
            &name,
            Status::Online,
            Status::Offline,
            1_000 + i,
            north.clone(),
            None,
        );
    }
    assert!(
        h.pass(10_999).await.is_empty(),
        "the window is still open 9.999 s after its first transition"
    );
    assert_eq!(h.engine.oldest_held(), Some(1), "the cursor waits");
    let decided = h.pass(11_000).await;
    assert_eq!(told(&decided), [pair("devices.offline", "300")]);
    let Decided::Group { key, notice } = &decided[0] else {
        panic!("grouped");
    };
    assert_eq!(*key, 1, "keyed by its first transition");
    assert_eq!(notice.events.len(), 300);
    assert_eq!(
        notice.text(),
        "🔴 300 devices offline at site north: pump-000, pump-001, pump-002, pump-003, \
         pump-004, … (+295)\nhttps://fleet.example.com/?label=site:north&status=offline"
    );
    let body: serde_json::Value = serde_json::from_str(&notice.webhook_body()).expect("json");
    assert_eq!(body["type"], "devices.offline");
    assert_eq!(body["data"]["count"], 300);
    assert_eq!(body["data"]["group"]["site"], "north");
    assert_eq!(body["data"]["events"][299]["device_id"], "pump-299");
    assert_eq!(h.engine.oldest_held(), None);

    for i in 0..300 {
        let name = format!("pump-{i:03}");
        h.world.set(&name, Status::Online, 60_000, Some(90_000));
        h.transition(
            &name,
            Status::Offline,
            Status::Online,
            60_000,
            north.clone(),
            None,
        );
    }
    assert_eq!(
        told(&h.pass(70_000).await),
        [pair("devices.recovered", "300")]
    );
}

#[tokio::test]
async fn below_the_threshold_each_device_is_told_on_its_own() {
    let mut h = Harness::new(grouping(50, &[]));
    for i in 0..10 {
        h.offline(&format!("pump-{i}"), 1_000);
    }
    let decided = h.pass(11_000).await;
    assert_eq!(decided.len(), 10);
    assert!(
        told(&decided)
            .iter()
            .all(|(kind, _)| kind == "device.offline")
    );
}

#[tokio::test]
async fn groups_are_per_label_value_and_per_kind() {
    let mut h = Harness::new(grouping(3, &["site"]));
    for (i, site) in ["north", "north", "north", "south", "south", "south"]
        .iter()
        .enumerate()
    {
        let name = format!("pump-{i}");
        h.world.set(&name, Status::Error, 0, None);
        h.transition(
            &name,
            Status::Online,
            if i == 0 {
                Status::Error
            } else {
                Status::Offline
            },
            1_000,
            Labels::of(&[("site", site)]),
            None,
        );
    }
    let mut told = told(&h.pass(11_000).await);
    told.sort();
    assert_eq!(
        told,
        [
            pair("device.error", "pump-0"),
            pair("device.offline", "pump-1"),
            pair("device.offline", "pump-2"),
            pair("devices.offline", "3"),
        ]
    );
}

fn damped(min_offline_s: u64) -> PolicySettings {
    PolicySettings {
        min_offline: Duration::from_secs(min_offline_s),
        ..PolicySettings::default()
    }
}

#[tokio::test]
async fn a_device_down_for_less_than_min_offline_sends_nothing() {
    let mut h = Harness::new(damped(60));
    h.offline("pump-1", 1_000);
    assert!(h.pass(30_000).await.is_empty());
    h.back("pump-1", 40_000);
    assert!(h.pass(40_000).await.is_empty());
    assert!(h.pass(200_000).await.is_empty(), "not later either");
    assert_eq!(h.engine.oldest_held(), None);

    h.offline("pump-1", 300_000);
    assert!(h.pass(359_999).await.is_empty());
    assert_eq!(
        told(&h.pass(361_000).await),
        [pair("device.offline", "pump-1")]
    );
    h.back("pump-1", 400_000);
    assert_eq!(
        told(&h.pass(400_000).await),
        [pair("device.recovered", "pump-1")],
        "a recovery follows an offline that was sent"
    );
}

#[tokio::test]
async fn a_recovery_whose_offline_this_process_never_saw_is_judged_by_its_length() {
    let mut h = Harness::new(damped(60));
    h.down_since.insert(id("short"), at(0));
    h.down_since.insert(id("long"), at(0));
    h.back("short", 30_000);
    h.back("long", 90_000);
    assert_eq!(
        told(&h.pass(90_000).await),
        [pair("device.recovered", "long")]
    );
}

#[tokio::test]
async fn reminders_repeat_while_a_device_stays_down() {
    let mut h = Harness::new(PolicySettings {
        repeat_after: Some(Duration::from_secs(60)),
        ..PolicySettings::default()
    });
    let seq = h.offline("pump-1", 1_000);
    assert_eq!(h.pass(1_000).await.len(), 1);
    assert!(h.pass(60_999).await.is_empty());
    let decided = h.pass(61_000).await;
    assert_eq!(told(&decided), [pair("device.still_down", "pump-1")]);
    assert_eq!(decided[0].key(), reminder_key(seq, 1));
    assert!(h.pass(100_000).await.is_empty());
    let decided = h.pass(121_000).await;
    assert_eq!(decided[0].key(), reminder_key(seq, 2));
    assert_ne!(reminder_key(seq, 2), reminder_key(seq + 1, 1));
    h.back("pump-1", 130_000);
    assert_eq!(
        told(&h.pass(130_000).await),
        [pair("device.recovered", "pump-1")]
    );
    assert!(
        h.pass(500_000).await.is_empty(),
        "no reminder once it is back"
    );
}

#[tokio::test]
async fn a_silenced_device_that_recovers_inside_its_silence_sends_nothing() {
    let mut h = Harness::new(PolicySettings::default());
    h.world.silence("pump-*", 0, 100_000);
    h.offline("pump-1", 1_000);
    assert!(h.pass(1_000).await.is_empty());
    h.back("pump-1", 50_000);
    assert!(h.pass(50_000).await.is_empty());
    assert!(h.pass(150_000).await.is_empty(), "nor at the silence's end");
    assert!(h.engine.is_idle());
}

#[tokio::test]
async fn a_device_still_down_when_its_silence_ends_is_told_then_once() {
    let mut h = Harness::new(PolicySettings::default());
    h.world.silence("pump-1", 0, 100_000);
    let seq = h.offline("pump-1", 1_000);
    // Its status stays what the transition made it.
    h.world.set("pump-1", Status::Offline, 0, None);
    if let Some(d) = h.world.devices.lock().expect("lock").get_mut(&id("pump-1")) {
        d.status_changed_at = at(1_000);
    }
    assert!(h.pass(1_000).await.is_empty());
    assert!(h.pass(99_999).await.is_empty());
    let decided = h.pass(100_000).await;
    assert_eq!(told(&decided), [pair("device.offline", "pump-1")]);
    assert_eq!(decided[0].key(), seq, "the transition's own key");
    assert!(h.pass(200_000).await.is_empty(), "once");
    h.back("pump-1", 300_000);
    assert_eq!(
        told(&h.pass(300_000).await),
        [pair("device.recovered", "pump-1")]
    );
}

/// Sets a device's stored status as its transition at `ms` left it.
fn stays(h: &Harness, name: &str, status: Status, ms: i64) {
    h.world.set(name, status, ms - 1_000, None);
    if let Some(d) = h.world.devices.lock().expect("lock").get_mut(&id(name)) {
        d.status_changed_at = at(ms);
    }
}

/// A restart forgets what the engine held; what a silence held is recalled from the
/// stores: a device down since before its silence is told when the silence ends, and
/// one that was told before a silence began is not told again.
#[tokio::test]
async fn after_a_restart_a_device_a_silence_held_is_told_when_it_ends() {
    let mut h = Harness::new(PolicySettings::default());
    h.world.silence("quiet-1", 0, 100_000);
    h.offline("quiet-1", 1_000);
    stays(&h, "quiet-1", Status::Offline, 1_000);
    h.offline("told-1", 1_000);
    stays(&h, "told-1", Status::Offline, 1_000);
    assert_eq!(
        told(&h.pass(1_000).await),
        [pair("device.offline", "told-1")]
    );
    h.world.silence("told-1", 5_000, 100_000);

    // The hub restarts: a new engine, past the transitions in the log.
    h.engine = Engine::new(PolicySettings::default());
    assert!(h.engine.needs_recall());
    let held = h.world.silenced_down(at(10_000)).await.expect("facts");
    let names: Vec<&str> = held.iter().map(|d| d.device_id.as_str()).collect();
    assert_eq!(names, ["quiet-1"], "silenced since before it went down");
    h.engine.recall(held);
    assert!(!h.engine.needs_recall());
    assert!(h.pass(10_000).await.is_empty());
    assert!(h.pass(99_999).await.is_empty());
    assert_eq!(
        told(&h.pass(100_000).await),
        [pair("device.offline", "quiet-1")],
        "told at the silence's end, and told-1 not again"
    );
    assert!(h.pass(200_000).await.is_empty(), "once");
}

fn child(h: &mut Harness, name: &str, ms: i64) -> i64 {
    h.world.set(name, Status::Offline, ms - 1_000, None);
    h.transition(
        name,
        Status::Online,
        Status::Offline,
        ms,
        Labels::default(),
        Some("gw"),
    )
}

#[tokio::test]
async fn children_behind_a_parent_that_is_down_fold_into_its_message() {
    let mut h = Harness::new(PolicySettings::default());
    for i in 0..100 {
        h.world
            .set(&format!("gw.child-{i:03}"), Status::Online, 0, Some(60_000));
    }
    h.offline("gw", 10_000);
    let decided = h.pass(10_000).await;
    assert_eq!(told(&decided), [pair("device.offline", "gw")]);
    let Decided::One { notice, .. } = &decided[0] else {
        panic!("one");
    };
    let behind = notice
        .behind
        .as_ref()
        .expect("counts the devices behind it");
    assert_eq!(behind.count, 100);
    assert!(
        notice.text().contains(
            "100 devices behind it unreachable: gw.child-000, gw.child-001, \
             gw.child-002, gw.child-003, gw.child-004, … (+95)"
        ),
        "{}",
        notice.text()
    );
    for i in 0..100 {
        child(&mut h, &format!("gw.child-{i:03}"), 60_000);
    }
    assert!(h.pass(60_000).await.is_empty(), "folded into the gateway's");
    assert_eq!(h.engine.oldest_held(), None);

    // The gateway is back and so are 99 children; one stays down past its deadline.
    h.back("gw", 100_000);
    for i in 0..99 {
        let name = format!("gw.child-{i:03}");
        h.world.set(&name, Status::Online, 101_000, Some(131_000));
        h.transition(
            &name,
            Status::Offline,
            Status::Online,
            101_000,
            Labels::default(),
            Some("gw"),
        );
    }
    h.world.set("gw.child-099", Status::Offline, 59_000, None);
    if let Some(d) = h
        .world
        .devices
        .lock()
        .expect("lock")
        .get_mut(&id("gw.child-099"))
    {
        d.status_changed_at = at(60_000);
    }
    assert_eq!(
        told(&h.pass(101_000).await),
        [pair("device.recovered", "gw")],
        "one recovery"
    );
    assert!(h.pass(129_999).await.is_empty());
    assert_eq!(
        told(&h.pass(130_000).await),
        [pair("device.offline", "gw.child-099")],
        "still down one deadline after its parent came back"
    );
}

/// Parents naming each other (a configuration mistake the heartbeats cannot rule
/// out) going down together: one is folded into the other, whose message is sent,
/// never both into each other with nobody told.
#[tokio::test]
async fn devices_naming_each_other_as_parent_are_never_both_folded() {
    let mut h = Harness::new(PolicySettings::default());
    for (name, parent) in [("a", "c"), ("b", "a"), ("c", "b")] {
        h.world.set(name, Status::Offline, 9_000, None);
        h.transition(
            name,
            Status::Online,
            Status::Offline,
            10_000,
            Labels::default(),
            Some(parent),
        );
    }
    let decided = h.pass(10_000).await;
    assert_eq!(
        told(&decided),
        [pair("device.offline", "c")],
        "a folds into c, b into a, and c, whose parent b is folded into it, is told"
    );
    assert_eq!(h.engine.oldest_held(), None);
}

#[tokio::test]
async fn a_child_waits_for_its_parents_fate_at_most_until_the_parents_deadline() {
    let mut h = Harness::new(PolicySettings::default());
    // The gateway last beat before the child's last heartbeat: its fate is open.
    h.world.set("gw", Status::Online, 0, Some(30_000));
    child(&mut h, "gw.a", 10_000);
    assert!(h.pass(10_000).await.is_empty(), "waits for the gateway");
    // The gateway goes offline: the child folds in.
    h.offline("gw", 30_000);
    let decided = h.pass(30_000).await;
    assert_eq!(told(&decided), [pair("device.offline", "gw")]);

    let mut h = Harness::new(PolicySettings::default());
    h.world.set("gw", Status::Online, 0, Some(30_000));
    child(&mut h, "gw.b", 10_000);
    assert!(h.pass(10_000).await.is_empty());
    // The gateway beats after the child's last heartbeat: the child alone is down.
    h.world.set("gw", Status::Online, 12_000, Some(42_000));
    assert_eq!(
        told(&h.pass(12_000).await),
        [pair("device.offline", "gw.b")]
    );

    let mut h = Harness::new(PolicySettings::default());
    h.world.set("gw", Status::Online, 0, Some(30_000));
    child(&mut h, "gw.c", 10_000);
    assert!(h.pass(29_999).await.is_empty());
    assert_eq!(
        told(&h.pass(30_000).await),
        [pair("device.offline", "gw.c")],
        "no longer than the gateway's deadline"
    );
}

#[tokio::test]
async fn the_cursor_stays_before_the_oldest_transition_held() {
    let mut h = Harness::new(damped(60));
    h.offline("a", 1_000);
    let b = h.offline("b", 2_000);
    assert_eq!(h.engine.oldest_held(), Some(1));
    assert_eq!(told(&h.pass(61_000).await), [pair("device.offline", "a")]);
    assert_eq!(h.engine.oldest_held(), Some(b));
    h.pass(62_000).await;
    assert_eq!(h.engine.oldest_held(), None);
}

#[tokio::test]
async fn without_min_offline_a_quick_recovery_is_told_after_its_offline() {
    // Both read in one page, before any pass: each transition is still told.
    let mut h = Harness::new(PolicySettings::default());
    h.offline("pump-1", 1_000);
    h.back("pump-1", 1_200);
    assert_eq!(
        told(&h.pass(1_200).await),
        [
            pair("device.offline", "pump-1"),
            pair("device.recovered", "pump-1")
        ]
    );

    // Inside one grouping window, too: grouping never drops a transition.
    let mut h = Harness::new(grouping(50, &[]));
    h.offline("pump-1", 1_000);
    assert!(h.pass(1_000).await.is_empty());
    h.back("pump-1", 3_000);
    assert_eq!(
        told(&h.pass(11_000).await),
        [pair("device.offline", "pump-1")]
    );
    assert_eq!(
        told(&h.pass(13_000).await),
        [pair("device.recovered", "pump-1")]
    );
}

#[tokio::test]
async fn without_grouping_nothing_waits_for_a_window() {
    let mut h = Harness::new(PolicySettings {
        group_wait: Duration::from_secs(10),
        group_threshold: 0,
        ..PolicySettings::default()
    });
    for i in 0..20 {
        h.offline(&format!("pump-{i}"), 1_000);
    }
    assert_eq!(
        h.pass(1_000).await.len(),
        20,
        "group_threshold 0: each at once"
    );
    assert_eq!(h.engine.oldest_held(), None);
}
