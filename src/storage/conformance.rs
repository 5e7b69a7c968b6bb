//! The behaviour every [`Store`] backend must show, as one suite each backend runs.
//!
//! Each test is a `pub(crate) async fn` taking a fresh, empty store; a backend's tests
//! instantiate them all with [`store_conformance!`], so a test added here runs against
//! every backend (one left out of the macro's list is dead code, which clippy refuses).
//! Tests about one backend's own machinery (its SQL, its pragmas, its files) stay with
//! that backend.

use std::sync::Arc;
use std::time::Duration;

use super::{DeviceQuery, OutboxEntry, OutboxItem, Store, StoreError, Summary};
use crate::clock::Timestamp;
use crate::credentials::{CredentialHash, DeviceSecret};
use crate::deadline::Deadlines;
use crate::device::DeviceId;
use crate::event::{StatusEvent, StoredEvent};
use crate::registration::{NewDevices, Refusal};
use crate::status::{Reason, Status};
use crate::update::{Batch, Heartbeat, Report};

/// Every conformance test as a `#[tokio::test]` of its own, run against the store
/// `$store` evaluates to (inside the test's async body): a `(store, guard)` pair, the
/// guard (a temporary directory, say) kept alive for the test.
macro_rules! store_conformance {
    ($store:expr) => {
        $crate::storage::conformance::store_conformance!($store =>
            first_heartbeat_registers_and_later_ones_only_move_last_seen,
            error_and_recovery_in_one_batch_are_two_transitions,
            error_text_is_kept_while_in_error,
            an_error_event_keeps_its_text_after_a_recovery,
            a_heartbeat_after_another_writer_took_the_device_offline_is_a_transition,
            a_heartbeat_received_before_another_writer_took_the_device_offline_does_not_undo_it,
            a_device_in_error_takes_the_latest_error_text,
            a_will_from_an_unknown_device_creates_nothing,
            a_will_takes_a_known_device_offline_with_its_last_heartbeat,
            mark_offline_takes_only_overdue_watched_devices_once,
            racing_checkers_take_each_device_exactly_once,
            a_hundred_silent_devices_go_offline_in_one_pass,
            outbox_hands_out_unpublished_events_in_commit_order,
            a_deleted_device_leaves_only_a_tombstone_in_the_outbox,
            devices_page_by_id_with_status_and_prefix_filters,
            history_pages_newest_first,
            clock_skew_is_kept_from_the_latest_timestamped_heartbeat,
            current_events_are_each_devices_latest_published_one_a_page_at_a_time,
            unknown_devices_past_the_cap_are_refused_and_known_ones_still_written,
            without_auto_registration_only_registered_devices_are_written,
            registering_twice_is_refused,
            a_flush_of_ok_heartbeats_changes_only_the_devices_not_already_online,
            a_heartbeat_names_the_parent_in_every_write_path_and_null_clears_it,
            set_parent_names_or_clears_it_and_the_parent_filter_lists_the_children,
            devices_by_id_reads_the_devices_named_and_leaves_out_unknown_ones,
            a_credential_is_kept_per_device_and_replaced_by_the_next,
            a_credential_needs_an_existing_device,
            deleting_a_device_deletes_its_credential,
            revoking_a_credential_keeps_the_device,
            each_device_goes_offline_at_its_own_deadline,
            setting_offline_after_moves_the_pending_deadline_and_null_clears_it,
            the_grace_counts_each_devices_own_offline_after_from_heard_since,
            a_declared_interval_is_remembered_and_moves_the_deadline_in_every_write_path,
            heartbeat_labels_set_keys_and_the_api_replaces_the_whole_set,
            devices_page_by_label_and_every_filter_must_match,
        );
    };
    ($store:expr => $($test:ident),+ $(,)?) => {
        $(
            #[tokio::test]
            async fn $test() {
                let (store, _guard) = $store;
                $crate::storage::conformance::$test(std::sync::Arc::new(store)).await;
            }
        )+
    };
}
pub(crate) use store_conformance;

/// The deadlines every backend's conformance store is opened with: a short default,
/// so the tests' clocks stay in seconds.
pub(crate) const DEADLINES: Deadlines = Deadlines {
    default: Duration::from_secs(2),
    missed_beats: 3,
    rules: Vec::new(),
};

fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).expect("valid id")
}

fn at(ms: i64) -> Timestamp {
    Timestamp::from_unix_millis(ms)
}

fn beat(healthy: bool, hostname: Option<&str>) -> Heartbeat {
    Heartbeat {
        healthy,
        error: (!healthy).then(|| "disk full".to_string()),
        report: Report {
            hostname: hostname.map(str::to_string),
            ..Report::default()
        },
        ..Heartbeat::default()
    }
}

async fn apply(store: &Arc<dyn Store>, fill: impl FnOnce(&mut Batch)) -> Vec<StatusEvent> {
    let mut batch = Batch::default();
    fill(&mut batch);
    store
        .apply(&batch.take(), NewDevices::UNLIMITED)
        .await
        .expect("apply")
        .events
}

fn outbox_statuses(items: &[OutboxItem]) -> Vec<(String, Status)> {
    items
        .iter()
        .filter_map(|item| match &item.entry {
            OutboxEntry::Status(e) => Some((e.device_id.to_string(), e.status)),
            OutboxEntry::Clear(_) => None,
        })
        .collect()
}

fn statuses(events: &[StoredEvent]) -> Vec<(String, Status)> {
    events
        .iter()
        .map(|e| (e.event.device_id.to_string(), e.event.status))
        .collect()
}

fn summary(events: &[StatusEvent]) -> Vec<(String, Option<Status>, Status, Reason)> {
    let mut rows: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e.device_id.to_string(),
                e.previous_status,
                e.status,
                e.reason,
            )
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

pub(crate) async fn first_heartbeat_registers_and_later_ones_only_move_last_seen(
    store: Arc<dyn Store>,
) {
    let events = apply(&store, |b| {
        b.add_heartbeat(id("a"), at(1_000), beat(true, Some("host-a")))
    })
    .await;
    assert_eq!(
        summary(&events),
        vec![("a".into(), None, Status::Online, Reason::Registered)]
    );
    assert_eq!(events[0].last_seen_at, Some(at(1_000)));

    let events = apply(&store, |b| {
        b.add_heartbeat(id("a"), at(2_000), beat(true, None))
    })
    .await;
    assert!(events.is_empty());
    let device = store.device(&id("a")).await.expect("read").expect("exists");
    assert_eq!(device.status, Status::Online);
    assert_eq!(device.last_seen_at, Some(at(2_000)));
    assert_eq!(device.first_seen_at, Some(at(1_000)));
    assert_eq!(device.status_changed_at, at(1_000));
    assert_eq!(
        device.report.hostname.as_deref(),
        Some("host-a"),
        "absent fields keep their value"
    );
}

pub(crate) async fn error_and_recovery_in_one_batch_are_two_transitions(store: Arc<dyn Store>) {
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(1_000), beat(true, None))
    })
    .await;
    let events = apply(&store, |b| {
        b.add_heartbeat(id("a"), at(2_000), beat(false, None));
        b.add_heartbeat(id("a"), at(2_100), beat(true, None));
    })
    .await;
    let steps: Vec<_> = events
        .iter()
        .map(|e| (e.status, e.reason, e.changed_at))
        .collect();
    assert_eq!(
        steps,
        vec![
            (Status::Error, Reason::DeviceError, at(2_000)),
            (Status::Online, Reason::Heartbeat, at(2_100)),
        ]
    );
    let device = store.device(&id("a")).await.expect("read").expect("exists");
    assert_eq!((device.status, device.error), (Status::Online, None));
}

pub(crate) async fn error_text_is_kept_while_in_error(store: Arc<dyn Store>) {
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(1_000), beat(false, None))
    })
    .await;
    let device = store.device(&id("a")).await.expect("read").expect("exists");
    assert_eq!(
        (device.status, device.error.as_deref()),
        (Status::Error, Some("disk full"))
    );
}

/// A device that recovers at once (its next heartbeat, committed on its own) has its
/// row's error text cleared before a sink reads the error event: the event keeps it.
pub(crate) async fn an_error_event_keeps_its_text_after_a_recovery(store: Arc<dyn Store>) {
    let broke = apply(&store, |b| {
        b.add_heartbeat(id("a"), at(1_000), beat(false, None))
    })
    .await;
    let back = apply(&store, |b| {
        b.add_heartbeat(id("a"), at(1_010), beat(true, None))
    })
    .await;
    let committed: Vec<_> = broke
        .iter()
        .chain(&back)
        .map(|e| (e.status, e.error.as_deref()))
        .collect();
    assert_eq!(
        committed,
        vec![(Status::Error, Some("disk full")), (Status::Online, None)]
    );
    let device = store.device(&id("a")).await.expect("read").expect("exists");
    assert_eq!((device.status, device.error), (Status::Online, None));

    let history = store.events(&id("a"), None, 10).await.expect("read");
    let texts: Vec<_> = history
        .iter()
        .map(|e| (e.event.status, e.event.error.as_deref()))
        .collect();
    assert_eq!(
        texts,
        vec![(Status::Online, None), (Status::Error, Some("disk full"))],
        "history, newest first"
    );
    let outbox = store.unpublished(0, 10).await.expect("read");
    let texts: Vec<_> = outbox
        .iter()
        .filter_map(|item| match &item.entry {
            OutboxEntry::Status(e) => Some((e.status, e.error.clone())),
            OutboxEntry::Clear(_) => None,
        })
        .collect();
    assert_eq!(
        texts,
        vec![
            (Status::Error, Some("disk full".to_string())),
            (Status::Online, None)
        ]
    );
}

pub(crate) async fn a_heartbeat_after_another_writer_took_the_device_offline_is_a_transition(
    store: Arc<dyn Store>,
) {
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(1_000), beat(true, None))
    })
    .await;
    // `fleetwatch check` in another process, say.
    assert_eq!(
        store
            .mark_offline(at(6_000), at(0))
            .await
            .expect("pass")
            .len(),
        1
    );
    // The handler still thinks "a" is online; the write must not trust that.
    let events = apply(&store, |b| {
        b.add_heartbeat(id("a"), at(7_000), beat(true, None))
    })
    .await;
    assert_eq!(
        summary(&events),
        vec![(
            "a".into(),
            Some(Status::Offline),
            Status::Online,
            Reason::Heartbeat
        )]
    );
    let device = store.device(&id("a")).await.expect("read").expect("exists");
    assert_eq!(
        (device.status, device.last_seen_at),
        (Status::Online, Some(at(7_000)))
    );
}

/// Two hubs: one received a heartbeat at 6.5 s but flushed it after the other's offline
/// check committed at 7 s. The heartbeat is older than the transition: the device stays
/// offline (nothing published twice, no flap), and its last_seen_at moves forward.
pub(crate) async fn a_heartbeat_received_before_another_writer_took_the_device_offline_does_not_undo_it(
    store: Arc<dyn Store>,
) {
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(1_000), beat(true, None))
    })
    .await;
    let offline = store.mark_offline(at(7_000), at(0)).await.expect("pass");
    assert_eq!(offline.len(), 1);
    let late = apply(&store, |b| {
        b.add_heartbeat(id("a"), at(6_500), beat(true, None));
        b.add_connection_lost(id("b"), at(6_500));
    })
    .await;
    assert_eq!(late, vec![], "a late heartbeat is no transition");
    let device = store.device(&id("a")).await.expect("read").expect("exists");
    assert_eq!(
        (device.status, device.status_changed_at, device.last_seen_at),
        (Status::Offline, at(7_000), Some(at(6_500)))
    );
    // The device's next heartbeat, received after the transition, brings it back.
    let back = apply(&store, |b| {
        b.add_heartbeat(id("a"), at(8_000), beat(true, None))
    })
    .await;
    assert_eq!(
        summary(&back),
        vec![(
            "a".into(),
            Some(Status::Offline),
            Status::Online,
            Reason::Heartbeat
        )]
    );
}

pub(crate) async fn a_device_in_error_takes_the_latest_error_text(store: Arc<dyn Store>) {
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(1_000), beat(false, None))
    })
    .await;
    let mut newer = beat(false, None);
    newer.error = Some("fan stuck".into());
    let events = apply(&store, |b| b.add_heartbeat(id("a"), at(2_000), newer)).await;
    assert!(events.is_empty());
    let device = store.device(&id("a")).await.expect("read").expect("exists");
    assert_eq!(
        (device.error.as_deref(), device.last_seen_at),
        (Some("fan stuck"), Some(at(2_000)))
    );
}

pub(crate) async fn a_will_from_an_unknown_device_creates_nothing(store: Arc<dyn Store>) {
    let events = apply(&store, |b| b.add_connection_lost(id("ghost"), at(1_000))).await;
    assert!(events.is_empty());
    assert_eq!(store.device(&id("ghost")).await.expect("read"), None);
}

pub(crate) async fn a_will_takes_a_known_device_offline_with_its_last_heartbeat(
    store: Arc<dyn Store>,
) {
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(1_000), beat(true, None))
    })
    .await;
    let events = apply(&store, |b| b.add_connection_lost(id("a"), at(5_000))).await;
    assert_eq!(
        summary(&events),
        vec![(
            "a".into(),
            Some(Status::Online),
            Status::Offline,
            Reason::ConnectionLost
        )]
    );
    assert_eq!(
        (events[0].last_seen_at, events[0].changed_at),
        (Some(at(1_000)), at(5_000))
    );
}

pub(crate) async fn mark_offline_takes_only_overdue_watched_devices_once(store: Arc<dyn Store>) {
    apply(&store, |b| {
        b.add_heartbeat(id("old"), at(1_000), beat(true, None));
        b.add_heartbeat(id("old-error"), at(1_000), beat(false, None));
        b.add_heartbeat(id("fresh"), at(9_000), beat(true, None));
    })
    .await;
    store
        .register(&id("provisioned"), at(0), None)
        .await
        .expect("register");

    let events = store.mark_offline(at(10_000), at(0)).await.expect("pass");
    assert_eq!(
        summary(&events),
        vec![
            (
                "old".into(),
                Some(Status::Online),
                Status::Offline,
                Reason::HeartbeatTimeout
            ),
            (
                "old-error".into(),
                Some(Status::Error),
                Status::Offline,
                Reason::HeartbeatTimeout
            ),
        ]
    );
    assert!(
        events
            .iter()
            .all(|e| e.changed_at == at(10_000) && e.last_seen_at == Some(at(1_000)))
    );
    let again = store.mark_offline(at(10_001), at(0)).await.expect("pass");
    assert!(again.is_empty(), "a transition happens once");
}

pub(crate) async fn racing_checkers_take_each_device_exactly_once(store: Arc<dyn Store>) {
    apply(&store, |b| {
        for i in 0..200 {
            b.add_heartbeat(id(&format!("d{i}")), at(1_000), beat(true, None));
        }
    })
    .await;
    let passes = (0..4).map(|n| {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.mark_offline(at(10_000 + n), at(0)).await })
    });
    let mut taken = Vec::new();
    for pass in passes {
        taken.extend(pass.await.expect("join").expect("pass"));
    }
    let mut ids: Vec<_> = taken.iter().map(|e| e.device_id.to_string()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((taken.len(), ids.len()), (200, 200));
}

pub(crate) async fn a_hundred_silent_devices_go_offline_in_one_pass(store: Arc<dyn Store>) {
    apply(&store, |b| {
        for i in 0..100 {
            b.add_heartbeat(id(&format!("d{i:03}")), at(1_000 + i), beat(true, None));
        }
    })
    .await;
    let events = store.mark_offline(at(3_500), at(0)).await.expect("pass");
    assert_eq!(events.len(), 100);
}

pub(crate) async fn outbox_hands_out_unpublished_events_in_commit_order(store: Arc<dyn Store>) {
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(1_000), beat(true, None))
    })
    .await;
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(2_000), beat(false, None))
    })
    .await;
    store
        .register(&id("b"), at(3_000), None)
        .await
        .expect("register");

    let pending = store.unpublished(0, 10).await.expect("read");
    assert_eq!(
        outbox_statuses(&pending),
        vec![
            ("a".into(), Status::Online),
            ("a".into(), Status::Error),
            ("b".into(), Status::Provisioning)
        ]
    );
    assert!(pending.windows(2).all(|w| w[0].seq < w[1].seq));

    store
        .mark_published(&[pending[0].seq], at(4_000))
        .await
        .expect("mark");
    let left = store.unpublished(0, 10).await.expect("read");
    assert_eq!(left, pending[1..].to_vec());
    assert_eq!(
        store.unpublished(pending[1].seq, 10).await.expect("read"),
        pending[2..].to_vec()
    );
}

pub(crate) async fn a_deleted_device_leaves_only_a_tombstone_in_the_outbox(store: Arc<dyn Store>) {
    apply(&store, |b| {
        b.add_heartbeat(id("gone"), at(1_000), beat(true, None))
    })
    .await;
    apply(&store, |b| {
        b.add_heartbeat(id("kept"), at(1_000), beat(true, None))
    })
    .await;
    store.delete(&id("gone"), at(2_000)).await.expect("delete");

    assert_eq!(store.device(&id("gone")).await.expect("read"), None);
    assert_eq!(
        store.events(&id("gone"), None, 10).await.expect("read"),
        vec![]
    );
    let outbox: Vec<_> = store
        .unpublished(0, 10)
        .await
        .expect("read")
        .into_iter()
        .map(|i| i.entry)
        .collect();
    assert!(
        matches!(&outbox[..], [OutboxEntry::Status(e), OutboxEntry::Clear(g)]
        if e.device_id.as_str() == "kept" && g.as_str() == "gone"),
        "{outbox:?}"
    );
    assert!(matches!(
        store.delete(&id("gone"), at(3_000)).await,
        Err(StoreError::NotFound(_))
    ));

    // A device that comes back starts over, after its tombstone.
    let events = apply(&store, |b| {
        b.add_heartbeat(id("gone"), at(4_000), beat(true, None))
    })
    .await;
    assert_eq!(
        summary(&events),
        vec![("gone".into(), None, Status::Online, Reason::Registered)]
    );
    let outbox = store.unpublished(0, 10).await.expect("read");
    assert!(
        matches!(&outbox.last().map(|i| &i.entry), Some(OutboxEntry::Status(e)) if e.reason == Reason::Registered)
    );
}

pub(crate) async fn devices_page_by_id_with_status_and_prefix_filters(store: Arc<dyn Store>) {
    apply(&store, |b| {
        for name in ["pump-1", "pump-2", "pump-3", "valve-1", "valve-2"] {
            b.add_heartbeat(id(name), at(1_000), beat(!name.ends_with('2'), None));
        }
    })
    .await;
    let page = |query: DeviceQuery| {
        let store = &store;
        async move {
            store
                .devices(&query)
                .await
                .expect("list")
                .into_iter()
                .map(|d| d.device_id.to_string())
                .collect::<Vec<_>>()
        }
    };
    let q = |status, prefix: Option<&str>, after: Option<&str>, limit| DeviceQuery {
        status,
        prefix: prefix.map(str::to_string),
        after: after.map(id),
        labels: Vec::new(),
        parent: None,
        limit,
    };
    assert_eq!(page(q(None, None, None, 2)).await, ["pump-1", "pump-2"]);
    assert_eq!(
        page(q(None, None, Some("pump-2"), 2)).await,
        ["pump-3", "valve-1"]
    );
    assert_eq!(
        page(q(None, Some("valve"), None, 10)).await,
        ["valve-1", "valve-2"]
    );
    assert_eq!(
        page(q(Some(Status::Error), None, None, 10)).await,
        ["pump-2", "valve-2"]
    );
    assert_eq!(
        page(q(Some(Status::Online), Some("pump"), Some("pump-1"), 10)).await,
        ["pump-3"]
    );
    assert_eq!(
        page(q(None, Some("pumpkin"), None, 10)).await,
        Vec::<String>::new()
    );
    assert_eq!(
        store.summary().await.expect("summary"),
        Summary {
            online: 3,
            error: 2,
            ..Summary::default()
        }
    );
}

pub(crate) async fn history_pages_newest_first(store: Arc<dyn Store>) {
    for (ms, healthy) in [(1_000, true), (2_000, false), (3_000, true), (4_000, false)] {
        apply(&store, |b| {
            b.add_heartbeat(id("a"), at(ms), beat(healthy, None))
        })
        .await;
    }
    let first = store.events(&id("a"), None, 2).await.expect("read");
    let times: Vec<_> = first.iter().map(|e| e.event.changed_at).collect();
    assert_eq!(times, [at(4_000), at(3_000)]);
    let rest = store
        .events(&id("a"), Some(first[1].seq), 10)
        .await
        .expect("read");
    let times: Vec<_> = rest.iter().map(|e| e.event.changed_at).collect();
    assert_eq!(times, [at(2_000), at(1_000)]);
}

pub(crate) async fn clock_skew_is_kept_from_the_latest_timestamped_heartbeat(
    store: Arc<dyn Store>,
) {
    let mut ahead = beat(true, None);
    ahead.device_time = Some(at(1_000 + 2_500));
    apply(&store, |b| b.add_heartbeat(id("a"), at(1_000), ahead)).await;
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(2_000), beat(true, None))
    })
    .await;
    let device = store.device(&id("a")).await.expect("read").expect("exists");
    assert_eq!(device.clock_skew_ms, Some(2_500));
}

pub(crate) async fn current_events_are_each_devices_latest_published_one_a_page_at_a_time(
    store: Arc<dyn Store>,
) {
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(1_000), beat(true, None));
        b.add_heartbeat(id("b"), at(1_000), beat(true, None));
    })
    .await;
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(2_000), beat(false, None))
    })
    .await;
    store
        .register(&id("c"), at(3_000), None)
        .await
        .expect("register");
    let all: Vec<i64> = store
        .unpublished(0, 10)
        .await
        .expect("read")
        .iter()
        .map(|e| e.seq)
        .collect();
    store.mark_published(&all, at(4_000)).await.expect("mark");
    apply(&store, |b| {
        b.add_heartbeat(id("d"), at(5_000), beat(true, None))
    })
    .await;

    let first = store.current_events(None, 2).await.expect("page");
    let second = store
        .current_events(Some(&first[1].event.device_id), 2)
        .await
        .expect("page");
    let all: Vec<StoredEvent> = first.into_iter().chain(second).collect();
    assert_eq!(
        statuses(&all),
        vec![
            ("a".into(), Status::Error),
            ("b".into(), Status::Online),
            ("c".into(), Status::Provisioning)
        ]
    );
}

pub(crate) async fn unknown_devices_past_the_cap_are_refused_and_known_ones_still_written(
    store: Arc<dyn Store>,
) {
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(1_000), beat(true, None));
        b.add_heartbeat(id("b"), at(1_000), beat(true, None));
    })
    .await;
    let mut batch = Batch::default();
    batch.add_heartbeat(id("a"), at(2_000), beat(false, None));
    batch.add_heartbeat(id("d"), at(2_002), beat(true, None));
    batch.add_heartbeat(id("c"), at(2_001), beat(true, None));
    let capped = NewDevices {
        max_devices: Some(3),
        ..NewDevices::UNLIMITED
    };
    let applied = store.apply(&batch.take(), capped).await.expect("apply");
    assert_eq!(
        applied.refused,
        vec![(id("d"), Refusal::DeviceLimit)],
        "the earliest newcomer gets the last place"
    );
    assert_eq!(
        summary(&applied.events),
        vec![
            (
                "a".into(),
                Some(Status::Online),
                Status::Error,
                Reason::DeviceError
            ),
            ("c".into(), None, Status::Online, Reason::Registered),
        ]
    );
    assert_eq!(store.device(&id("d")).await.expect("read"), None);
    assert!(matches!(
        store.register(&id("e"), at(3_000), Some(3)).await,
        Err(StoreError::DeviceLimit(3))
    ));
    assert!(matches!(
        store.register(&id("a"), at(3_000), Some(3)).await,
        Err(StoreError::AlreadyExists(_))
    ));
    store
        .register(&id("e"), at(3_000), Some(4))
        .await
        .expect("room for one more");
}

pub(crate) async fn without_auto_registration_only_registered_devices_are_written(
    store: Arc<dyn Store>,
) {
    store
        .register(&id("known"), at(1_000), None)
        .await
        .expect("register");
    let mut batch = Batch::default();
    batch.add_heartbeat(id("known"), at(2_000), beat(true, None));
    batch.add_heartbeat(id("stranger"), at(2_000), beat(true, None));
    let closed = NewDevices {
        auto_register: false,
        ..NewDevices::UNLIMITED
    };
    let applied = store.apply(&batch.take(), closed).await.expect("apply");
    assert_eq!(
        applied.refused,
        vec![(id("stranger"), Refusal::NotRegistered)]
    );
    assert_eq!(
        summary(&applied.events),
        vec![(
            "known".into(),
            Some(Status::Provisioning),
            Status::Online,
            Reason::Heartbeat
        )]
    );
}

pub(crate) async fn registering_twice_is_refused(store: Arc<dyn Store>) {
    store.register(&id("a"), at(1), None).await.expect("first");
    assert!(matches!(
        store.register(&id("a"), at(2), None).await,
        Err(StoreError::AlreadyExists(_))
    ));
}

pub(crate) async fn a_flush_of_ok_heartbeats_changes_only_the_devices_not_already_online(
    store: Arc<dyn Store>,
) {
    apply(&store, |b| {
        for name in ["a", "b", "c", "d"] {
            b.add_heartbeat(id(name), at(1_000), beat(true, None));
        }
    })
    .await;
    apply(&store, |b| {
        for name in ["a", "c", "d"] {
            b.add_heartbeat(id(name), at(5_500), beat(true, None));
        }
    })
    .await;
    // Another writer takes "b" offline; the handler still thinks it online.
    let taken = store.mark_offline(at(6_000), at(0)).await.expect("pass");
    assert_eq!(
        summary(&taken),
        vec![(
            "b".into(),
            Some(Status::Online),
            Status::Offline,
            Reason::HeartbeatTimeout
        )]
    );

    let events = apply(&store, |b| {
        for name in ["a", "b", "c", "d", "e"] {
            b.add_heartbeat(id(name), at(7_000), beat(true, None));
        }
    })
    .await;
    assert_eq!(
        summary(&events),
        vec![
            (
                "b".into(),
                Some(Status::Offline),
                Status::Online,
                Reason::Heartbeat
            ),
            ("e".into(), None, Status::Online, Reason::Registered),
        ]
    );
    for (name, changed) in [
        ("a", 1_000),
        ("b", 7_000),
        ("c", 1_000),
        ("d", 1_000),
        ("e", 7_000),
    ] {
        let device = store
            .device(&id(name))
            .await
            .expect("read")
            .expect("exists");
        assert_eq!(
            (device.status, device.last_seen_at, device.status_changed_at),
            (Status::Online, Some(at(7_000)), at(changed)),
            "{name}"
        );
    }
}

fn new_credential() -> (DeviceSecret, CredentialHash) {
    let secret = DeviceSecret::generate().expect("randomness");
    let hash = secret.hash().expect("randomness");
    (secret, hash)
}

pub(crate) async fn a_credential_is_kept_per_device_and_replaced_by_the_next(
    store: Arc<dyn Store>,
) {
    store
        .register(&id("a"), at(1), None)
        .await
        .expect("register");
    store
        .register(&id("b"), at(1), None)
        .await
        .expect("register");
    assert_eq!(store.credential(&id("a")).await.expect("read"), None);

    let (first, first_hash) = new_credential();
    store
        .set_credential(&id("a"), &first_hash)
        .await
        .expect("set");
    let stored = store.credential(&id("a")).await.expect("read");
    assert_eq!(stored.as_ref(), Some(&first_hash));
    assert!(stored.is_some_and(|c| c.verify(first.expose().as_bytes())));
    assert_eq!(store.credential(&id("b")).await.expect("read"), None);

    let (second, second_hash) = new_credential();
    store
        .set_credential(&id("a"), &second_hash)
        .await
        .expect("rotate");
    let stored = store
        .credential(&id("a"))
        .await
        .expect("read")
        .expect("a credential");
    assert_eq!(stored, second_hash);
    assert!(stored.verify(second.expose().as_bytes()));
    assert!(!stored.verify(first.expose().as_bytes()));
}

pub(crate) async fn a_credential_needs_an_existing_device(store: Arc<dyn Store>) {
    let (_, hash) = new_credential();
    assert!(matches!(
        store.set_credential(&id("ghost"), &hash).await,
        Err(StoreError::NotFound(ghost)) if ghost.as_str() == "ghost"
    ));
    assert_eq!(store.credential(&id("ghost")).await.expect("read"), None);
    assert_eq!(store.device(&id("ghost")).await.expect("read"), None);
}

pub(crate) async fn deleting_a_device_deletes_its_credential(store: Arc<dyn Store>) {
    apply(&store, |b| {
        b.add_heartbeat(id("gone"), at(1_000), beat(true, None))
    })
    .await;
    let (_, hash) = new_credential();
    store.set_credential(&id("gone"), &hash).await.expect("set");
    store.delete(&id("gone"), at(2_000)).await.expect("delete");
    assert_eq!(store.credential(&id("gone")).await.expect("read"), None);

    // The same id registered again starts without one.
    store
        .register(&id("gone"), at(3_000), None)
        .await
        .expect("register");
    assert_eq!(store.credential(&id("gone")).await.expect("read"), None);
}

pub(crate) async fn revoking_a_credential_keeps_the_device(store: Arc<dyn Store>) {
    store
        .register(&id("a"), at(1), None)
        .await
        .expect("register");
    store
        .revoke_credential(&id("a"))
        .await
        .expect("revoking nothing is fine");
    let (_, hash) = new_credential();
    store.set_credential(&id("a"), &hash).await.expect("set");
    store.revoke_credential(&id("a")).await.expect("revoke");
    assert_eq!(store.credential(&id("a")).await.expect("read"), None);
    assert!(store.device(&id("a")).await.expect("read").is_some());
    assert!(matches!(
        store.revoke_credential(&id("ghost")).await,
        Err(StoreError::NotFound(_))
    ));
}

fn beat_every(interval_ms: u64) -> Heartbeat {
    Heartbeat {
        interval: Some(Duration::from_millis(interval_ms)),
        ..beat(true, None)
    }
}

async fn taken(store: &Arc<dyn Store>, now: i64, heard_since: i64) -> Vec<String> {
    let mut ids: Vec<String> = store
        .mark_offline(at(now), at(heard_since))
        .await
        .expect("pass")
        .iter()
        .map(|e| e.device_id.to_string())
        .collect();
    ids.sort();
    ids
}

async fn deadline_of(store: &Arc<dyn Store>, device: &str) -> Option<Timestamp> {
    store
        .device(&id(device))
        .await
        .expect("read")
        .expect("exists")
        .deadline_at
}

/// Default 2 s ([`DEADLINES`]), a declared interval of 1 s (three missed: 3 s), an
/// own setting of 10 s: three deadlines, each device taken at its own.
pub(crate) async fn each_device_goes_offline_at_its_own_deadline(store: Arc<dyn Store>) {
    apply(&store, |b| {
        b.add_heartbeat(id("plain"), at(1_000), beat(true, None));
        b.add_heartbeat(id("declares"), at(1_000), beat_every(1_000));
        b.add_heartbeat(id("own"), at(1_000), beat(false, None));
    })
    .await;
    let own = store
        .set_offline_after(&id("own"), Some(Duration::from_secs(10)))
        .await
        .expect("set");
    assert_eq!(
        (own.offline_after, own.deadline_at),
        (Some(Duration::from_secs(10)), Some(at(11_000)))
    );
    let declares = store.device(&id("declares")).await.expect("read");
    let declares = declares.expect("exists");
    assert_eq!(
        (declares.interval, declares.deadline_at),
        (Some(Duration::from_secs(1)), Some(at(4_000)))
    );
    assert_eq!(deadline_of(&store, "plain").await, Some(at(3_000)));

    assert_eq!(taken(&store, 3_000, 0).await, Vec::<String>::new());
    assert_eq!(taken(&store, 3_001, 0).await, ["plain"]);
    assert_eq!(taken(&store, 10_000, 0).await, ["declares"]);
    assert_eq!(taken(&store, 11_001, 0).await, ["own"]);
}

pub(crate) async fn setting_offline_after_moves_the_pending_deadline_and_null_clears_it(
    store: Arc<dyn Store>,
) {
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(1_000), beat(true, None))
    })
    .await;
    store
        .set_offline_after(&id("a"), Some(Duration::from_secs(60)))
        .await
        .expect("set");
    assert_eq!(taken(&store, 5_000, 0).await, Vec::<String>::new());
    // A later heartbeat keeps the device's own setting.
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(6_000), beat(true, None))
    })
    .await;
    assert_eq!(deadline_of(&store, "a").await, Some(at(66_000)));
    let cleared = store
        .set_offline_after(&id("a"), None)
        .await
        .expect("clear");
    assert_eq!(
        (cleared.offline_after, cleared.deadline_at),
        (None, Some(at(8_000)))
    );
    assert_eq!(taken(&store, 8_001, 0).await, ["a"]);
    assert!(matches!(
        store
            .set_offline_after(&id("nobody"), Some(Duration::from_secs(5)))
            .await,
        Err(StoreError::NotFound(_))
    ));
}

/// The hub could hear devices only since 8.5 s: a device with a 1 s offline_after is
/// overdue at 10 s, one with the 2 s default is not yet, however long ago both were
/// last seen.
pub(crate) async fn the_grace_counts_each_devices_own_offline_after_from_heard_since(
    store: Arc<dyn Store>,
) {
    apply(&store, |b| {
        b.add_heartbeat(id("short"), at(1_000), beat(true, None));
        b.add_heartbeat(id("default"), at(1_000), beat(true, None));
    })
    .await;
    store
        .set_offline_after(&id("short"), Some(Duration::from_secs(1)))
        .await
        .expect("set");
    assert_eq!(taken(&store, 10_000, 8_500).await, ["short"]);
    assert_eq!(taken(&store, 10_400, 8_500).await, Vec::<String>::new());
    assert_eq!(taken(&store, 10_501, 8_500).await, ["default"]);
}

/// Steady heartbeats (the fast refresh) and status changes (the full path) both
/// write the deadline: a newly declared interval moves it, a heartbeat without one
/// keeps the interval stored, a device's own setting outranks it.
pub(crate) async fn a_declared_interval_is_remembered_and_moves_the_deadline_in_every_write_path(
    store: Arc<dyn Store>,
) {
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(1_000), beat_every(1_000))
    })
    .await;
    assert_eq!(deadline_of(&store, "a").await, Some(at(4_000)));
    // Steady: online, still online.
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(2_000), beat_every(10_000))
    })
    .await;
    assert_eq!(deadline_of(&store, "a").await, Some(at(32_000)));
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(3_000), beat(true, None))
    })
    .await;
    assert_eq!(deadline_of(&store, "a").await, Some(at(33_000)));
    // Full path: online to error keeps the remembered interval.
    let events = apply(&store, |b| {
        b.add_heartbeat(id("a"), at(4_000), beat(false, None))
    })
    .await;
    assert_eq!(events.len(), 1);
    assert_eq!(deadline_of(&store, "a").await, Some(at(34_000)));
    store
        .set_offline_after(&id("a"), Some(Duration::from_secs(5)))
        .await
        .expect("set");
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(5_000), beat_every(20_000))
    })
    .await;
    assert_eq!(deadline_of(&store, "a").await, Some(at(10_000)));
    // Offline, then back: the full path from offline.
    assert_eq!(taken(&store, 10_001, 0).await, ["a"]);
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(11_000), beat(true, None))
    })
    .await;
    assert_eq!(deadline_of(&store, "a").await, Some(at(16_000)));
}

fn labels(json: serde_json::Value) -> crate::labels::Labels {
    serde_json::from_value(json).expect("valid labels")
}

fn beat_labelled(value: serde_json::Value) -> Heartbeat {
    Heartbeat {
        labels: Some(labels(value)),
        ..beat(true, None)
    }
}

async fn labels_of(store: &Arc<dyn Store>, device: &str) -> serde_json::Value {
    let device = store
        .device(&id(device))
        .await
        .expect("read")
        .expect("exists");
    serde_json::to_value(device.labels).expect("json")
}

/// A heartbeat's labels set the keys they carry, in the fast refresh and the full
/// path alike, and keep the rest; a heartbeat without labels keeps them all; the API
/// replaces the whole set.
pub(crate) async fn heartbeat_labels_set_keys_and_the_api_replaces_the_whole_set(
    store: Arc<dyn Store>,
) {
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(1_000), beat(true, None))
    })
    .await;
    assert_eq!(labels_of(&store, "a").await, serde_json::json!({}));
    // Steady (online, still online): labels merged in the fast refresh.
    apply(&store, |b| {
        b.add_heartbeat(
            id("a"),
            at(2_000),
            beat_labelled(serde_json::json!({"site": "north", "kind": "pump"})),
        )
    })
    .await;
    assert_eq!(
        labels_of(&store, "a").await,
        serde_json::json!({"site": "north", "kind": "pump"})
    );
    // Full path (a new device, and a known one going to error), two heartbeats in one
    // flush merged newest last.
    apply(&store, |b| {
        b.add_heartbeat(
            id("b"),
            at(3_000),
            beat_labelled(serde_json::json!({"site": "south"})),
        );
        b.add_heartbeat(
            id("a"),
            at(3_000),
            Heartbeat {
                labels: Some(labels(serde_json::json!({"site": "east"}))),
                ..beat(false, None)
            },
        );
        b.add_heartbeat(
            id("a"),
            at(3_100),
            Heartbeat {
                labels: Some(labels(serde_json::json!({"fw": "2"}))),
                ..beat(false, None)
            },
        );
    })
    .await;
    assert_eq!(
        labels_of(&store, "a").await,
        serde_json::json!({"site": "east", "kind": "pump", "fw": "2"})
    );
    assert_eq!(
        labels_of(&store, "b").await,
        serde_json::json!({"site": "south"})
    );
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(4_000), beat(false, None))
    })
    .await;
    assert_eq!(
        labels_of(&store, "a").await,
        serde_json::json!({"site": "east", "kind": "pump", "fw": "2"}),
        "a heartbeat without labels keeps them"
    );
    let set = store
        .set_labels(&id("a"), &labels(serde_json::json!({"room": "7"})))
        .await
        .expect("set");
    assert_eq!(
        serde_json::to_value(&set.labels).expect("json"),
        serde_json::json!({"room": "7"})
    );
    assert!(matches!(
        store
            .set_labels(&id("nobody"), &labels(serde_json::json!({})))
            .await,
        Err(StoreError::NotFound(_))
    ));
}

pub(crate) async fn devices_page_by_label_and_every_filter_must_match(store: Arc<dyn Store>) {
    apply(&store, |b| {
        for (name, site, kind) in [
            ("d1", "north", "pump"),
            ("d2", "north", "valve"),
            ("d3", "south", "pump"),
            ("d4", "north", "pump"),
        ] {
            b.add_heartbeat(
                id(name),
                at(1_000),
                beat_labelled(serde_json::json!({"site": site, "kind": kind})),
            );
        }
        b.add_heartbeat(id("d5"), at(1_000), beat(true, None));
    })
    .await;
    let page = |filters: &[(&str, &str)], after: Option<&str>, limit: u32| {
        let store = Arc::clone(&store);
        let query = DeviceQuery {
            labels: filters
                .iter()
                .map(|(key, value)| crate::labels::LabelFilter {
                    key: key.to_string(),
                    value: value.to_string(),
                })
                .collect(),
            after: after.map(id),
            limit,
            ..DeviceQuery::default()
        };
        async move {
            store
                .devices(&query)
                .await
                .expect("list")
                .into_iter()
                .map(|d| d.device_id.to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        page(&[("site", "north")], None, 10).await,
        ["d1", "d2", "d4"]
    );
    assert_eq!(
        page(&[("site", "north"), ("kind", "pump")], None, 10).await,
        ["d1", "d4"]
    );
    assert_eq!(page(&[("site", "north")], Some("d1"), 1).await, ["d2"]);
    assert!(page(&[("site", "west")], None, 10).await.is_empty());
}

/// A heartbeat naming `parent` (`Some(None)`: `null`), healthy or not.
fn beat_parent(healthy: bool, parent: Option<Option<&str>>) -> Heartbeat {
    Heartbeat {
        parent: parent.map(|p| p.map(id)),
        ..beat(healthy, None)
    }
}

async fn parent_of(store: &Arc<dyn Store>, device: &str) -> Option<String> {
    store
        .device(&id(device))
        .await
        .expect("read")
        .expect("exists")
        .parent
        .map(|p| p.to_string())
}

/// A heartbeat's `parent` is written by the fast refresh and the full path alike (a
/// new device, a status change); one without `parent` keeps the stored one; `null`
/// clears it, and a new device's `null` stores none.
pub(crate) async fn a_heartbeat_names_the_parent_in_every_write_path_and_null_clears_it(
    store: Arc<dyn Store>,
) {
    // Full path: new devices.
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(1_000), beat_parent(true, Some(Some("gw-1"))));
        b.add_heartbeat(id("b"), at(1_000), beat_parent(true, Some(None)));
        b.add_heartbeat(id("c"), at(1_000), beat_parent(true, None));
    })
    .await;
    assert_eq!(parent_of(&store, "a").await.as_deref(), Some("gw-1"));
    assert_eq!(parent_of(&store, "b").await, None);
    assert_eq!(parent_of(&store, "c").await, None);
    let unnamed = DeviceQuery {
        parent: Some(id("gw-1")),
        limit: 10,
        ..DeviceQuery::default()
    };
    let listed: Vec<String> = store
        .devices(&unnamed)
        .await
        .expect("list")
        .iter()
        .map(|d| d.device_id.to_string())
        .collect();
    assert_eq!(listed, ["a"]);
    // Steady (online, still online): kept when absent, set, cleared.
    apply(&store, |b| {
        b.add_heartbeat(id("a"), at(2_000), beat_parent(true, None));
        b.add_heartbeat(id("c"), at(2_000), beat_parent(true, Some(Some("gw-2"))));
    })
    .await;
    assert_eq!(
        parent_of(&store, "a").await.as_deref(),
        Some("gw-1"),
        "a heartbeat without parent keeps it"
    );
    assert_eq!(parent_of(&store, "c").await.as_deref(), Some("gw-2"));
    apply(&store, |b| {
        b.add_heartbeat(id("c"), at(3_000), beat_parent(true, Some(None)))
    })
    .await;
    assert_eq!(parent_of(&store, "c").await, None, "null clears it");
    // Full path on a known device: online to error sets it, back to online keeps it,
    // to error again with null clears it.
    let events = apply(&store, |b| {
        b.add_heartbeat(id("a"), at(4_000), beat_parent(false, Some(Some("gw-3"))))
    })
    .await;
    assert_eq!(events.len(), 1);
    assert_eq!(parent_of(&store, "a").await.as_deref(), Some("gw-3"));
    let events = apply(&store, |b| {
        b.add_heartbeat(id("a"), at(5_000), beat_parent(true, None))
    })
    .await;
    assert_eq!(events.len(), 1);
    assert_eq!(parent_of(&store, "a").await.as_deref(), Some("gw-3"));
    let events = apply(&store, |b| {
        b.add_heartbeat(id("a"), at(6_000), beat_parent(false, Some(None)))
    })
    .await;
    assert_eq!(events.len(), 1);
    assert_eq!(parent_of(&store, "a").await, None);
}

/// The API sets and clears a parent; a gateway's children are listed (with the other
/// filters, a page at a time) and counted.
pub(crate) async fn set_parent_names_or_clears_it_and_the_parent_filter_lists_the_children(
    store: Arc<dyn Store>,
) {
    apply(&store, |b| {
        for name in ["d1", "d2", "d3", "d4", "gw"] {
            b.add_heartbeat(id(name), at(1_000), beat(true, None));
        }
        b.add_heartbeat(id("d5"), at(1_000), beat(false, None));
    })
    .await;
    for (child, parent) in [("d1", "gw"), ("d2", "gw"), ("d3", "gw-2"), ("d5", "gw")] {
        let device = store
            .set_parent(&id(child), Some(&id(parent)))
            .await
            .expect("set");
        assert_eq!(device.parent, Some(id(parent)), "{child}");
    }
    let children = |parent: &str, status: Option<Status>, after: Option<&str>, limit: u32| {
        let store = Arc::clone(&store);
        let query = DeviceQuery {
            parent: Some(id(parent)),
            status,
            after: after.map(id),
            limit,
            ..DeviceQuery::default()
        };
        async move {
            store
                .devices(&query)
                .await
                .expect("list")
                .into_iter()
                .map(|d| d.device_id.to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(children("gw", None, None, 10).await, ["d1", "d2", "d5"]);
    let counts = store
        .count_children(&[id("gw"), id("d1"), id("gw-2"), id("nobody")])
        .await
        .expect("count");
    assert_eq!(
        counts,
        std::collections::HashMap::from([(id("gw"), 3), (id("gw-2"), 1)]),
        "parents without children are left out"
    );
    assert_eq!(children("gw", None, Some("d1"), 1).await, ["d2"]);
    assert_eq!(children("gw", Some(Status::Error), None, 10).await, ["d5"]);
    assert_eq!(children("gw-2", None, None, 10).await, ["d3"]);
    assert!(children("d1", None, None, 10).await.is_empty());
    let cleared = store.set_parent(&id("d2"), None).await.expect("clear");
    assert_eq!(cleared.parent, None);
    assert_eq!(parent_of(&store, "d2").await, None);
    assert_eq!(children("gw", None, None, 10).await, ["d1", "d5"]);
    assert_eq!(
        store.count_children(&[id("gw")]).await.expect("count"),
        std::collections::HashMap::from([(id("gw"), 2)])
    );
    assert!(matches!(
        store.set_parent(&id("nobody"), Some(&id("gw"))).await,
        Err(StoreError::NotFound(_))
    ));
    // A heartbeat that names no parent leaves the API's choice alone.
    apply(&store, |b| {
        b.add_heartbeat(id("d1"), at(2_000), beat(true, None))
    })
    .await;
    assert_eq!(parent_of(&store, "d1").await.as_deref(), Some("gw"));
}

pub(crate) async fn devices_by_id_reads_the_devices_named_and_leaves_out_unknown_ones(
    store: Arc<dyn Store>,
) {
    const N: usize = 2_500;
    let names: Vec<String> = (0..N).map(|i| format!("dev-{i:05}")).collect();
    apply(&store, |b| {
        for name in &names {
            b.add_heartbeat(id(name), at(1_000), beat_parent(true, Some(Some("gw-1"))));
        }
    })
    .await;
    assert!(store.devices_by_id(&[]).await.expect("none").is_empty());
    let mut wanted: Vec<DeviceId> = names.iter().map(|n| id(n)).collect();
    wanted.extend((0..10).map(|i| id(&format!("unknown-{i}"))));
    let found = store.devices_by_id(&wanted).await.expect("read");
    assert_eq!(found.len(), N);
    let mut found_ids: Vec<String> = found.iter().map(|d| d.device_id.to_string()).collect();
    found_ids.sort();
    assert_eq!(found_ids, names);
    assert!(
        found
            .iter()
            .all(|d| d.parent == Some(id("gw-1")) && d.status == Status::Online)
    );
    let one = store
        .devices_by_id(&[id("dev-00007"), id("nobody")])
        .await
        .expect("read");
    assert_eq!(
        one,
        store
            .device(&id("dev-00007"))
            .await
            .expect("read")
            .into_iter()
            .collect::<Vec<_>>()
    );
}

/// Label rules: each backend's tests run [`label_rules_pick_the_deadline_and_follow_labels_and_configuration`]
/// with a function that opens (again) one database with the rules given.
macro_rules! label_rules_conformance {
    ($open:expr) => {
        #[tokio::test]
        async fn label_rules_pick_the_deadline_and_follow_labels_and_configuration() {
            $crate::storage::conformance::label_rules_pick_the_deadline_and_follow_labels_and_configuration($open).await;
        }
    };
}
pub(crate) use label_rules_conformance;

fn rule(value: serde_json::Value, secs: u64) -> crate::deadline::Rule {
    crate::deadline::Rule {
        labels: labels(value),
        offline_after: Duration::from_secs(secs),
    }
}

/// [`DEADLINES`] with `rules`.
fn with_rules(rules: Vec<crate::deadline::Rule>) -> Deadlines {
    Deadlines { rules, ..DEADLINES }
}

/// A label rule sets the deadline of a device carrying its labels (as merged from
/// heartbeats, or as the API set them) unless the device has its own setting or
/// declares an interval; the first matching rule wins; a heartbeat without labels
/// keeps the rule; and the next start with other rules moves the stored deadlines.
/// `open` opens the same database each time, with the deadlines given.
pub(crate) async fn label_rules_pick_the_deadline_and_follow_labels_and_configuration<F, Fut>(
    open: F,
) where
    F: Fn(Deadlines) -> Fut,
    Fut: std::future::Future<Output = Arc<dyn Store>>,
{
    use serde_json::json;
    let store = open(with_rules(vec![
        rule(json!({"kind": "sensor", "site": "north"}), 600),
        rule(json!({"kind": "sensor"}), 60),
    ]))
    .await;
    apply(&store, |b| {
        b.add_heartbeat(
            id("s-north"),
            at(1_000),
            beat_labelled(json!({"kind": "sensor", "site": "north"})),
        );
        b.add_heartbeat(
            id("s-south"),
            at(1_000),
            beat_labelled(json!({"kind": "sensor", "site": "south"})),
        );
        b.add_heartbeat(
            id("declares"),
            at(1_000),
            Heartbeat {
                labels: Some(labels(json!({"kind": "sensor"}))),
                ..beat_every(5_000)
            },
        );
        b.add_heartbeat(id("plain"), at(1_000), beat(true, None));
        b.add_heartbeat(id("later"), at(1_000), beat(true, None));
    })
    .await;
    assert_eq!(deadline_of(&store, "s-north").await, Some(at(601_000)));
    assert_eq!(deadline_of(&store, "s-south").await, Some(at(61_000)));
    assert_eq!(deadline_of(&store, "declares").await, Some(at(16_000)));
    assert_eq!(deadline_of(&store, "plain").await, Some(at(3_000)));

    // Heartbeats of devices that stay online: labels merged into the stored ones pick
    // the rule; the same labels again keep it.
    apply(&store, |b| {
        b.add_heartbeat(
            id("later"),
            at(2_000),
            beat_labelled(json!({"kind": "sensor"})),
        );
        b.add_heartbeat(
            id("s-north"),
            at(2_000),
            beat_labelled(json!({"site": "south"})),
        );
        b.add_heartbeat(
            id("s-south"),
            at(2_000),
            beat_labelled(json!({"site": "south", "kind": "sensor"})),
        );
    })
    .await;
    assert_eq!(deadline_of(&store, "later").await, Some(at(62_000)));
    assert_eq!(deadline_of(&store, "s-north").await, Some(at(62_000)));
    assert_eq!(deadline_of(&store, "s-south").await, Some(at(62_000)));

    // A device's own setting comes first; cleared, the rule is back.
    store
        .set_offline_after(&id("s-south"), Some(Duration::from_secs(10)))
        .await
        .expect("set");
    assert_eq!(deadline_of(&store, "s-south").await, Some(at(12_000)));
    store
        .set_offline_after(&id("s-south"), None)
        .await
        .expect("clear");
    assert_eq!(deadline_of(&store, "s-south").await, Some(at(62_000)));

    // The API's labels replace the set, and the rule and deadline follow.
    let plain = store
        .set_labels(
            &id("plain"),
            &labels(json!({"kind": "sensor", "site": "north"})),
        )
        .await
        .expect("labels");
    assert_eq!(plain.deadline_at, Some(at(601_000)));
    store
        .set_labels(&id("later"), &labels(json!({})))
        .await
        .expect("labels");
    assert_eq!(deadline_of(&store, "later").await, Some(at(4_000)));
    assert_eq!(taken(&store, 4_001, 0).await, ["later"]);

    // The next start with other rules moves the stored deadlines of labelled devices.
    drop(store);
    let store = open(with_rules(vec![rule(json!({"kind": "sensor"}), 30)])).await;
    assert_eq!(deadline_of(&store, "s-north").await, Some(at(32_000)));
    assert_eq!(deadline_of(&store, "plain").await, Some(at(31_000)));
    assert_eq!(deadline_of(&store, "declares").await, Some(at(16_000)));
    assert_eq!(taken(&store, 31_001, 0).await, ["declares", "plain"]);
    // Heartbeats without labels keep the rule matched at start.
    apply(&store, |b| {
        b.add_heartbeat(id("s-south"), at(3_000), beat(true, None));
    })
    .await;
    assert_eq!(deadline_of(&store, "s-south").await, Some(at(33_000)));

    // And a start without rules takes them away.
    drop(store);
    let store = open(DEADLINES).await;
    assert_eq!(deadline_of(&store, "s-north").await, Some(at(4_000)));
    assert_eq!(deadline_of(&store, "s-south").await, Some(at(5_000)));
    apply(&store, |b| {
        b.add_heartbeat(
            id("s-north"),
            at(5_000),
            beat_labelled(json!({"kind": "sensor"})),
        );
    })
    .await;
    assert_eq!(deadline_of(&store, "s-north").await, Some(at(7_000)));
}
