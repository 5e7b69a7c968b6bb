//! The behaviour every [`NotificationStore`] backend must show, as one suite each
//! backend runs, like the device store's (`storage/conformance.rs`).
//!
//! Each test is a `pub(crate) async fn` taking a fresh, empty store that is both the
//! device store and the notification store: the queues are fed from the event log the
//! device store writes, so a test needs both sides of the same database. A backend's
//! tests instantiate them all with [`notification_conformance!`]; one left out of the
//! macro's list is dead code, which clippy refuses.

use std::sync::Arc;

use super::notifications::{NewNotification, Payload, QueueStats, Settled};
use super::{NotificationStore, OutboxEntry, Store};
use crate::clock::Timestamp;
use crate::device::DeviceId;
use crate::event::StoredEvent;
use crate::registration::NewDevices;
use crate::status::Reason;
use crate::update::{Batch, Heartbeat};

/// Every notification conformance test as a `#[tokio::test]` of its own, run against
/// the store `$store` evaluates to (inside the test's async body): a `(store, guard)`
/// pair, the guard (a temporary directory, say) kept alive for the test.
macro_rules! notification_conformance {
    ($store:expr) => {
        $crate::storage::notify_conformance::notification_conformance!($store =>
            a_new_sink_starts_at_the_end_of_the_log,
            a_cursor_moved_by_someone_else_queues_nothing,
            queueing_an_event_twice_keeps_the_first_notification,
            only_a_devices_oldest_pending_notification_is_due,
            due_notifications_come_oldest_first_up_to_the_limit,
            switching_a_sink_on_can_skip_what_it_missed,
            previous_change_is_the_devices_transition_before_a_seq,
            events_after_leaves_out_deleted_devices_tombstones,
            retrying_or_dropping_dead_letters_touches_one_or_all_of_a_sinks_own,
            oldest_pending_is_the_oldest_pending_notifications_creation,
        );
    };
    ($store:expr => $($test:ident),+ $(,)?) => {
        $(
            #[tokio::test]
            async fn $test() {
                let (store, _guard) = $store;
                $crate::storage::notify_conformance::$test(std::sync::Arc::new(store)).await;
            }
        )+
    };
}
pub(crate) use notification_conformance;

fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).expect("valid id")
}

fn at(ms: i64) -> Timestamp {
    Timestamp::from_unix_millis(ms)
}

/// Commits heartbeats (`healthy` false: an error) for devices, one flush.
async fn beats<S: Store>(store: &S, ms: i64, beats: &[(&str, bool)]) {
    let mut batch = Batch::default();
    for (device, healthy) in beats {
        batch.add_heartbeat(
            id(device),
            at(ms),
            Heartbeat {
                healthy: *healthy,
                ..Heartbeat::default()
            },
        );
    }
    store
        .apply(&batch.take(), NewDevices::UNLIMITED)
        .await
        .expect("apply");
}

/// The notification a sink would queue for `event`, its body naming `body`.
fn notification(event: &StoredEvent, body: &str) -> NewNotification {
    NewNotification {
        event_seq: event.seq,
        payload: Payload {
            device_id: event.event.device_id.clone(),
            event_id: event.event.event_id,
            kind: "device.online".into(),
            body: body.into(),
        },
    }
}

/// Queues every event after the sink's cursor, as created at `now`, and returns the
/// new cursor.
async fn queue_all<S: NotificationStore>(store: &S, sink: &str, now: Timestamp) -> i64 {
    let (cursor, _) = store.sink_state(sink).await.expect("state");
    let events = store.events_after(cursor, 100).await.expect("events");
    let items: Vec<_> = events
        .iter()
        .map(|e| notification(e, &format!("{{\"seq\":{}}}", e.seq)))
        .collect();
    let last = events.last().map_or(cursor, |e| e.seq);
    assert!(
        store
            .enqueue(sink, cursor, last, &items, now)
            .await
            .expect("enqueue")
    );
    last
}

/// The seqs of a device's events in the log, oldest first.
async fn seqs_of<S: NotificationStore>(store: &S, device: &str) -> Vec<i64> {
    store
        .events_after(0, 100)
        .await
        .expect("events")
        .iter()
        .filter(|e| e.event.device_id.as_str() == device)
        .map(|e| e.seq)
        .collect()
}

/// The devices of what is due for `sink` at `now`, in the order handed out.
async fn due_devices<S: NotificationStore>(
    store: &S,
    sink: &str,
    now: Timestamp,
    skip: &[i64],
    limit: u32,
) -> Vec<String> {
    store
        .due(sink, now, skip, limit)
        .await
        .expect("due")
        .iter()
        .map(|q| q.payload.device_id.to_string())
        .collect()
}

pub(crate) async fn a_new_sink_starts_at_the_end_of_the_log<S: Store + NotificationStore>(
    store: Arc<S>,
) {
    assert_eq!(store.log_end().await.expect("end"), 0, "an empty log");
    beats(&*store, 1_000, &[("a", true)]).await;
    let (cursor, enabled) = store.sink_state("ops").await.expect("state");
    assert!(cursor > 0);
    assert_eq!(store.log_end().await.expect("end"), cursor);
    assert!(
        store
            .events_after(cursor, 10)
            .await
            .expect("events")
            .is_empty()
    );
    assert_eq!(enabled, None);
    beats(&*store, 2_000, &[("a", false)]).await;
    assert_eq!(
        store.events_after(cursor, 10).await.expect("events").len(),
        1
    );
    // Seen again, the sink keeps its cursor: what came since is still ahead of it.
    assert_eq!(store.sink_state("ops").await.expect("state").0, cursor);
}

pub(crate) async fn a_cursor_moved_by_someone_else_queues_nothing<S: Store + NotificationStore>(
    store: Arc<S>,
) {
    store.sink_state("ops").await.expect("state");
    beats(&*store, 1_000, &[("a", true)]).await;
    let last = queue_all(&*store, "ops", at(0)).await;
    assert_eq!(store.sink_state("ops").await.expect("state").0, last);

    // A second instance that read the old cursor loses the race, with whatever it
    // would have queued.
    beats(&*store, 2_000, &[("b", true)]).await;
    let events = store.events_after(last, 10).await.expect("events");
    let newer = events.last().expect("b's event");
    assert!(
        !store
            .enqueue("ops", 0, newer.seq, &[notification(newer, "late")], at(0))
            .await
            .expect("enqueue")
    );
    assert_eq!(store.queue_stats("ops").await.expect("stats").backlog, 1);
    assert_eq!(store.sink_state("ops").await.expect("state").0, last);
}

pub(crate) async fn queueing_an_event_twice_keeps_the_first_notification<
    S: Store + NotificationStore,
>(
    store: Arc<S>,
) {
    let (start, _) = store.sink_state("ops").await.expect("state");
    beats(&*store, 1_000, &[("a", true)]).await;
    let events = store.events_after(start, 10).await.expect("events");
    let event = events.first().expect("a's event");
    assert!(
        store
            .enqueue(
                "ops",
                start,
                event.seq,
                &[notification(event, "first")],
                at(1)
            )
            .await
            .expect("enqueue")
    );
    // The cursor goes back (moved from where it really was), and the same event is
    // queued again: the sink already holds its notification, as first rendered.
    assert!(
        store
            .enqueue("ops", event.seq, start, &[], at(2))
            .await
            .expect("rewind")
    );
    assert_eq!(store.sink_state("ops").await.expect("state").0, start);
    assert!(
        store
            .enqueue(
                "ops",
                start,
                event.seq,
                &[notification(event, "second")],
                at(3)
            )
            .await
            .expect("enqueue again")
    );
    assert_eq!(store.sink_state("ops").await.expect("state").0, event.seq);
    let due = store.due("ops", at(10), &[], 10).await.expect("due");
    let kept: Vec<_> = due
        .iter()
        .map(|q| (q.payload.body.as_str(), q.created_at))
        .collect();
    assert_eq!(kept, [("first", at(1))]);

    // The key is the sink and the event: another sink queues the same event.
    let (audit, _) = store.sink_state("audit").await.expect("state");
    assert!(
        store
            .enqueue(
                "audit",
                audit,
                audit,
                &[notification(event, "audit")],
                at(4)
            )
            .await
            .expect("enqueue")
    );
    assert_eq!(store.queue_stats("audit").await.expect("stats").backlog, 1);
    assert_eq!(store.queue_stats("ops").await.expect("stats").backlog, 1);
}

pub(crate) async fn only_a_devices_oldest_pending_notification_is_due<
    S: Store + NotificationStore,
>(
    store: Arc<S>,
) {
    store.sink_state("ops").await.expect("state");
    beats(&*store, 1_000, &[("a", true), ("b", true)]).await;
    beats(&*store, 2_000, &[("a", false)]).await;
    queue_all(&*store, "ops", at(0)).await;
    let due = store.due("ops", at(0), &[], 10).await.expect("due");
    let ids: Vec<(String, i64)> = due
        .iter()
        .map(|q| (q.payload.device_id.to_string(), q.id))
        .collect();
    assert_eq!(ids.len(), 2, "a's second waits behind its first: {ids:?}");
    let of = |device: &str| {
        due.iter()
            .find(|q| q.payload.device_id.as_str() == device)
            .map(|q| q.id)
            .expect("due")
    };
    let (first_a, first_b) = (of("a"), of("b"));
    // In flight: skipped, and a's next still waits behind it.
    let without = store.due("ops", at(0), &[first_a], 10).await.expect("due");
    assert_eq!(without.iter().map(|q| q.id).collect::<Vec<_>>(), [first_b]);

    // Delivered: a's next moves up. Retrying later: not due before its time.
    store
        .settle(&[
            Settled::Delivered { id: first_a },
            Settled::Retry {
                id: first_b,
                attempts: 1,
                next_attempt_at: at(5_000),
                error: "503".into(),
            },
        ])
        .await
        .expect("settle");
    let next = store.due("ops", at(0), &[], 10).await.expect("due");
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].payload.device_id.as_str(), "a");
    let later = store.due("ops", at(5_000), &[], 10).await.expect("due");
    assert_eq!(later.len(), 2);
    assert_eq!(
        later.iter().find(|q| q.id == first_b).map(|q| q.attempts),
        Some(1),
        "the retry's attempts are recorded"
    );
    // The receiver is back: what waited for its retry is due at once.
    assert_eq!(store.due_now("ops", at(1)).await.expect("due now"), 1);
    assert_eq!(
        store.due("ops", at(1), &[], 10).await.expect("due").len(),
        2
    );

    // Dead: kept aside, and the device's queue moves on.
    store
        .settle(&[Settled::Dead {
            id: next[0].id,
            attempts: 1,
            error: "400 nope".into(),
        }])
        .await
        .expect("settle");
    let stats = store.queue_stats("ops").await.expect("stats");
    assert_eq!((stats.backlog, stats.dead_letters), (1, 1));
    let letters = store.dead_letters("ops", 0, 10).await.expect("letters");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].error, "400 nope");
    assert_eq!(
        store
            .retry_dead("ops", None, at(9_000))
            .await
            .expect("retry"),
        1
    );
    assert_eq!(store.queue_stats("ops").await.expect("stats").backlog, 2);
    store
        .settle(&[Settled::Dead {
            id: letters[0].id,
            attempts: 2,
            error: "400".into(),
        }])
        .await
        .expect("settle");
    assert_eq!(
        store
            .drop_dead("ops", Some(letters[0].id))
            .await
            .expect("drop"),
        1
    );
    assert_eq!(
        store.queue_stats("ops").await.expect("stats").dead_letters,
        0
    );
}

pub(crate) async fn due_notifications_come_oldest_first_up_to_the_limit<
    S: Store + NotificationStore,
>(
    store: Arc<S>,
) {
    store.sink_state("ops").await.expect("state");
    for (ms, device) in [(1_000, "c"), (2_000, "a"), (3_000, "d"), (4_000, "b")] {
        beats(&*store, ms, &[(device, true)]).await;
    }
    queue_all(&*store, "ops", at(0)).await;
    assert_eq!(due_devices(&*store, "ops", at(0), &[], 2).await, ["c", "a"]);
    let all = store.due("ops", at(0), &[], 10).await.expect("due");
    let first = all.first().map(|q| q.id).expect("c's notification");
    assert_eq!(
        due_devices(&*store, "ops", at(0), &[first], 2).await,
        ["a", "d"]
    );
    assert!(
        store
            .due("audit", at(0), &[], 10)
            .await
            .expect("due")
            .is_empty(),
        "another sink's queue is its own"
    );
}

pub(crate) async fn switching_a_sink_on_can_skip_what_it_missed<S: Store + NotificationStore>(
    store: Arc<S>,
) {
    store.sink_state("ops").await.expect("state");
    store
        .set_sink_enabled("ops", false, false)
        .await
        .expect("off");
    beats(&*store, 1_000, &[("a", true)]).await;
    assert_eq!(store.sink_state("ops").await.expect("state").1, Some(false));
    store.set_sink_enabled("ops", true, true).await.expect("on");
    let (cursor, enabled) = store.sink_state("ops").await.expect("state");
    assert_eq!(enabled, Some(true));
    assert!(
        store
            .events_after(cursor, 10)
            .await
            .expect("events")
            .is_empty()
    );

    // Without the skip, a sink switched back on hears what it missed.
    store
        .set_sink_enabled("ops", false, false)
        .await
        .expect("off");
    beats(&*store, 2_000, &[("a", false)]).await;
    store
        .set_sink_enabled("ops", true, false)
        .await
        .expect("on");
    let (kept, enabled) = store.sink_state("ops").await.expect("state");
    assert_eq!((kept, enabled), (cursor, Some(true)));
    assert_eq!(store.events_after(kept, 10).await.expect("events").len(), 1);
}

pub(crate) async fn previous_change_is_the_devices_transition_before_a_seq<
    S: Store + NotificationStore,
>(
    store: Arc<S>,
) {
    beats(&*store, 1_000, &[("a", true)]).await;
    beats(&*store, 1_500, &[("b", true)]).await;
    beats(&*store, 2_000, &[("a", false)]).await;
    beats(&*store, 3_000, &[("a", true)]).await;
    let a = seqs_of(&*store, "a").await;
    let b = seqs_of(&*store, "b").await;
    assert_eq!((a.len(), b.len()), (3, 1));
    let previous = |device: &'static str, seq: i64| {
        let store = Arc::clone(&store);
        async move {
            store
                .previous_change(&id(device), seq)
                .await
                .expect("previous change")
        }
    };
    assert_eq!(previous("a", a[2]).await, Some(at(2_000)));
    assert_eq!(previous("a", a[1]).await, Some(at(1_000)));
    assert_eq!(
        previous("a", b[0]).await,
        Some(at(1_000)),
        "another device's transitions do not count"
    );
    assert_eq!(previous("a", a[0]).await, None, "the first has none before");
    assert_eq!(previous("b", b[0]).await, None);

    // A device deleted and back starts over: neither its forgotten history nor its
    // tombstone is a transition before its new registration.
    store.delete(&id("a"), at(4_000)).await.expect("delete");
    beats(&*store, 5_000, &[("a", true)]).await;
    let again = seqs_of(&*store, "a").await;
    let registered = again.last().copied().expect("a's registration");
    assert_eq!(previous("a", registered).await, None);
    assert_eq!(previous("a", registered + 1).await, Some(at(5_000)));
}

pub(crate) async fn events_after_leaves_out_deleted_devices_tombstones<
    S: Store + NotificationStore,
>(
    store: Arc<S>,
) {
    beats(&*store, 1_000, &[("a", true), ("b", true)]).await;
    store.delete(&id("a"), at(2_000)).await.expect("delete");
    // The tombstone is in the log (the publisher clears a's retained status with it)...
    let outbox = store.unpublished(0, 10).await.expect("outbox");
    assert!(
        outbox
            .iter()
            .any(|i| matches!(&i.entry, OutboxEntry::Clear(d) if d.as_str() == "a")),
        "{outbox:?}"
    );
    // ...but no sink hears of it, nor of a's forgotten history.
    let events = store.events_after(0, 10).await.expect("events");
    let devices: Vec<_> = events
        .iter()
        .map(|e| e.event.device_id.to_string())
        .collect();
    assert_eq!(devices, ["b"]);

    beats(&*store, 3_000, &[("a", true)]).await;
    let after_b = events.last().map(|e| e.seq).expect("b's event");
    let back = store.events_after(after_b, 10).await.expect("events");
    let steps: Vec<_> = back
        .iter()
        .map(|e| (e.event.device_id.to_string(), e.event.reason))
        .collect();
    assert_eq!(steps, [("a".to_string(), Reason::Registered)]);
}

pub(crate) async fn retrying_or_dropping_dead_letters_touches_one_or_all_of_a_sinks_own<
    S: Store + NotificationStore,
>(
    store: Arc<S>,
) {
    store.sink_state("ops").await.expect("state");
    store.sink_state("audit").await.expect("state");
    beats(&*store, 1_000, &[("a", true), ("b", true)]).await;
    let mut letters = Vec::new();
    for sink in ["ops", "audit"] {
        queue_all(&*store, sink, at(100)).await;
        let due = store.due(sink, at(100), &[], 10).await.expect("due");
        let dead: Vec<_> = due
            .iter()
            .map(|q| Settled::Dead {
                id: q.id,
                attempts: 3,
                error: "410 gone".into(),
            })
            .collect();
        store.settle(&dead).await.expect("settle");
        let mut ids: Vec<_> = due.iter().map(|q| q.id).collect();
        ids.sort_unstable();
        letters.push(ids);
    }
    let (ops, audit) = (&letters[0], &letters[1]);
    assert_eq!((ops.len(), audit.len()), (2, 2));
    let dead_ids = |sink: &'static str| {
        let store = Arc::clone(&store);
        async move {
            store
                .dead_letters(sink, 0, 10)
                .await
                .expect("letters")
                .iter()
                .map(|l| l.id)
                .collect::<Vec<_>>()
        }
    };
    let stats = |sink: &'static str| {
        let store = Arc::clone(&store);
        async move {
            let s = store.queue_stats(sink).await.expect("stats");
            (s.backlog, s.dead_letters)
        }
    };

    // Dead letters page by id.
    let page = store.dead_letters("audit", 0, 1).await.expect("letters");
    assert_eq!(page.len(), 1);
    assert_eq!((page[0].attempts, page[0].error.as_str()), (3, "410 gone"));
    let rest = store
        .dead_letters("audit", page[0].id, 10)
        .await
        .expect("letters");
    assert_eq!(
        page.iter().chain(&rest).map(|l| l.id).collect::<Vec<_>>(),
        *audit
    );

    // One letter, by id, and only the sink's own.
    assert_eq!(
        store
            .retry_dead("ops", Some(audit[0]), at(9_000))
            .await
            .expect("retry"),
        0,
        "another sink's letter"
    );
    assert_eq!(
        store
            .retry_dead("ops", Some(ops[0]), at(9_000))
            .await
            .expect("retry"),
        1
    );
    assert_eq!(stats("ops").await, (1, 1));
    assert_eq!(dead_ids("ops").await, [ops[1]]);
    // A retried letter starts over, due now, its age counted from now.
    let retried = store.due("ops", at(9_000), &[], 10).await.expect("due");
    let retried: Vec<_> = retried
        .iter()
        .map(|q| (q.id, q.attempts, q.created_at))
        .collect();
    assert_eq!(retried, [(ops[0], 0, at(9_000))]);
    assert_eq!(
        store
            .retry_dead("ops", Some(ops[0]), at(9_500))
            .await
            .expect("retry"),
        0,
        "a pending notification is no dead letter"
    );
    assert_eq!(
        store.drop_dead("ops", Some(ops[0])).await.expect("drop"),
        0,
        "a pending notification is no dead letter"
    );
    assert_eq!(stats("ops").await, (1, 1));

    // All of the sink's letters, and none of another's.
    assert_eq!(
        store
            .retry_dead("ops", None, at(10_000))
            .await
            .expect("retry"),
        1
    );
    assert_eq!(stats("ops").await, (2, 0));
    assert_eq!(stats("audit").await, (0, 2));

    let again: Vec<_> = ops
        .iter()
        .map(|&id| Settled::Dead {
            id,
            attempts: 4,
            error: "410 gone".into(),
        })
        .collect();
    store.settle(&again).await.expect("settle");
    assert_eq!(
        store.drop_dead("ops", Some(audit[0])).await.expect("drop"),
        0,
        "another sink's letter"
    );
    assert_eq!(store.drop_dead("ops", Some(ops[0])).await.expect("drop"), 1);
    assert_eq!(dead_ids("ops").await, [ops[1]]);
    assert_eq!(store.drop_dead("ops", None).await.expect("drop"), 1);
    assert_eq!(stats("ops").await, (0, 0));
    assert_eq!(dead_ids("audit").await, *audit);
    assert_eq!(stats("audit").await, (0, 2));
}

pub(crate) async fn oldest_pending_is_the_oldest_pending_notifications_creation<
    S: Store + NotificationStore,
>(
    store: Arc<S>,
) {
    store.sink_state("ops").await.expect("state");
    assert_eq!(
        store.queue_stats("ops").await.expect("stats"),
        QueueStats::default()
    );
    beats(&*store, 1_000, &[("a", true)]).await;
    queue_all(&*store, "ops", at(10_000)).await;
    beats(&*store, 2_000, &[("b", true)]).await;
    queue_all(&*store, "ops", at(20_000)).await;
    let oldest = |store: Arc<S>| async move {
        store
            .queue_stats("ops")
            .await
            .expect("stats")
            .oldest_pending
    };
    assert_eq!(oldest(Arc::clone(&store)).await, Some(at(10_000)));

    let due = store.due("ops", at(20_000), &[], 10).await.expect("due");
    let of = |device: &str| {
        due.iter()
            .find(|q| q.payload.device_id.as_str() == device)
            .map(|q| q.id)
            .expect("due")
    };
    let (a, b) = (of("a"), of("b"));
    // A retry keeps the notification's age.
    store
        .settle(&[Settled::Retry {
            id: a,
            attempts: 1,
            next_attempt_at: at(30_000),
            error: "503".into(),
        }])
        .await
        .expect("settle");
    assert_eq!(oldest(Arc::clone(&store)).await, Some(at(10_000)));
    // A dead letter is no longer pending.
    store
        .settle(&[Settled::Dead {
            id: a,
            attempts: 2,
            error: "400".into(),
        }])
        .await
        .expect("settle");
    assert_eq!(
        store.queue_stats("ops").await.expect("stats"),
        QueueStats {
            backlog: 1,
            oldest_pending: Some(at(20_000)),
            dead_letters: 1,
        }
    );
    store
        .settle(&[Settled::Delivered { id: b }])
        .await
        .expect("settle");
    assert_eq!(oldest(Arc::clone(&store)).await, None);
}
