//! The core scenarios, written once and run against each broker and each database
//! (see main.rs).

use std::time::Duration;

use fleetwatch::clock::Timestamp;
use fleetwatch::heartbeat::RejectReason;
use fleetwatch::status::Status;

use crate::helpers::*;

const BEAT: Duration = Duration::from_millis(300);

fn millis_between(earlier: Timestamp, later: Timestamp) -> i64 {
    later.millis_since(earlier)
}

pub async fn first_heartbeat_registers_online_and_last_seen_moves(setup: Setup) {
    let app = spawn_app(setup).await;
    let mut watcher = app.watch().await;
    let device = app.device("pump-7", Duration::from_secs(3600)).await;

    let event = watcher.expect("pump-7", Status::Online, "registered").await;
    assert_eq!(event.previous_status, None);
    assert_eq!(app.status_of("pump-7").await, Some(Status::Online));

    // A late subscriber gets the status from the broker's retained store.
    let mut late = app.watch().await;
    let retained = late.next("pump-7", PATIENCE).await;
    assert!(retained.retained, "status must be retained");
    assert_eq!(retained.event, event);

    let first = app.stored("pump-7").await.expect("registered");
    device.beat().await.expect("beat");
    eventually(PATIENCE, "last_seen_at to move", || async {
        let now = app.stored("pump-7").await.expect("registered");
        now.last_seen_at > first.last_seen_at
    })
    .await;
    let later = app.stored("pump-7").await.expect("registered");
    assert_eq!(later.first_seen_at, first.first_seen_at);
    assert_eq!(later.report.hostname.as_deref(), Some("pump-7"));
    assert!(
        later.device_time.is_some(),
        "the device's own timestamp is kept"
    );
    // Give an (unwanted) event from that heartbeat time to arrive before looking.
    watcher.collect_for(BEAT * 3).await;
    assert!(
        watcher.unread("pump-7").is_empty(),
        "more heartbeats are no transition"
    );
    app.stop().await;
}

pub async fn silence_means_one_offline_event_and_recovery_one_online_event(setup: Setup) {
    let app = spawn_app(setup).await;
    let mut watcher = app.watch().await;
    let device = app.device("quiet-1", BEAT).await;
    watcher
        .expect("quiet-1", Status::Online, "registered")
        .await;

    device.silence().await.expect("silence");
    let offline = watcher
        .expect("quiet-1", Status::Offline, "heartbeat_timeout")
        .await;
    assert_eq!(offline.previous_status, Some(Status::Online));
    let last_seen = offline
        .last_seen_at
        .expect("offline event carries last_seen_at");
    assert!(
        millis_between(last_seen, offline.changed_at) >= OFFLINE_AFTER.as_millis() as i64,
        "never reported before the deadline: {offline:?}"
    );

    // Staying silent for another deadline and more repeats nothing.
    watcher.collect_for(OFFLINE_AFTER + OFFLINE_AFTER / 2).await;
    assert_eq!(
        watcher.unread("quiet-1"),
        vec![],
        "exactly one offline event"
    );

    device.resume().await.expect("resume");
    let online = watcher.expect("quiet-1", Status::Online, "heartbeat").await;
    assert_eq!(online.previous_status, Some(Status::Offline));
    watcher.collect_for(BEAT * 3).await;
    assert_eq!(
        watcher.unread("quiet-1"),
        vec![],
        "exactly one online event"
    );
    app.stop().await;
}

pub async fn a_hundred_devices_silent_at_once_are_all_reported(setup: Setup) {
    let app = spawn_app(setup).await;
    let mut watcher = app.watch().await;
    let mut devices = Vec::new();
    for i in 0..100 {
        devices.push(
            app.device(&format!("herd-{i:03}"), Duration::from_secs(3600))
                .await,
        );
    }
    watcher.wait_for_count(Status::Online, 100, PATIENCE).await;
    for device in &devices {
        device.silence().await.expect("silence");
    }
    watcher.wait_for_count(Status::Offline, 100, PATIENCE).await;
    watcher.collect_for(Duration::from_millis(500)).await;
    for i in 0..100 {
        let id = format!("herd-{i:03}");
        let statuses: Vec<_> = watcher
            .unread(&id)
            .iter()
            .map(|e| (e.status, e.reason))
            .collect();
        assert_eq!(statuses.len(), 2, "{id}: {statuses:?}");
        assert_eq!(statuses[1].0, Status::Offline, "{id}");
    }
    app.stop().await;
}

pub async fn error_heartbeat_means_error_and_the_next_ok_one_online(setup: Setup) {
    let app = spawn_app(setup).await;
    let mut watcher = app.watch().await;
    let device = app.device("sensor-err", BEAT).await;
    watcher
        .expect("sensor-err", Status::Online, "registered")
        .await;

    device
        .report_error("disk full")
        .await
        .expect("report error");
    let error = watcher
        .expect("sensor-err", Status::Error, "device_error")
        .await;
    assert_eq!(error.previous_status, Some(Status::Online));
    let stored = app.stored("sensor-err").await.expect("exists");
    assert_eq!(stored.error.as_deref(), Some("disk full"));

    // Repeated error heartbeats are not new transitions.
    watcher.collect_for(BEAT * 3).await;
    assert_eq!(watcher.unread("sensor-err"), vec![]);

    device.report_ok().await.expect("report ok");
    let online = watcher
        .expect("sensor-err", Status::Online, "heartbeat")
        .await;
    assert_eq!(online.previous_status, Some(Status::Error));
    let stored = app.stored("sensor-err").await.expect("exists");
    assert_eq!(stored.error, None);
    app.stop().await;
}

pub async fn a_cut_connection_fires_the_will_before_the_deadline(setup: Setup) {
    // A deadline far away: only the Will can take the device offline in time.
    let app = spawn_app_with(setup, |s| {
        s.heartbeat.offline_after = Duration::from_secs(600)
    })
    .await;
    let mut watcher = app.watch().await;
    let device = app.device("cable-1", BEAT).await;
    watcher
        .expect("cable-1", Status::Online, "registered")
        .await;

    device.cut_connection().await;
    let offline = watcher
        .expect("cable-1", Status::Offline, "connection_lost")
        .await;
    assert_eq!(offline.previous_status, Some(Status::Online));
    assert!(offline.last_seen_at.is_some());
    app.stop().await;
}

pub async fn a_device_beating_just_inside_offline_after_never_flaps(setup: Setup) {
    let app = spawn_app(setup).await;
    let mut watcher = app.watch().await;
    // 80% of the deadline: each heartbeat lands 400 ms before the device would be due.
    let _device = app.device("steady-1", OFFLINE_AFTER.mul_f64(0.8)).await;
    watcher
        .expect("steady-1", Status::Online, "registered")
        .await;
    watcher.collect_for(OFFLINE_AFTER * 4).await;
    assert_eq!(
        watcher.unread("steady-1"),
        vec![],
        "no offline/online flapping"
    );
    assert_eq!(app.status_of("steady-1").await, Some(Status::Online));
    app.stop().await;
}

/// One bad message per rejection reason the hub can see.
fn bad_messages() -> Vec<(String, Vec<u8>, RejectReason)> {
    let deep = format!("{{\"x\":{}1{}}}", "[".repeat(10_000), "]".repeat(10_000));
    let oversized = format!("{{\"hostname\":\"{}\"}}", "x".repeat(64 * 1024));
    let ok = |payload: &[u8]| payload.to_vec();
    vec![
        (
            "devices/bad id/heartbeat".into(),
            ok(b""),
            RejectReason::InvalidDeviceId,
        ),
        (
            "devices//heartbeat".into(),
            ok(b""),
            RejectReason::InvalidDeviceId,
        ),
        (
            "devices/-dash/heartbeat".into(),
            ok(b""),
            RejectReason::InvalidDeviceId,
        ),
        (
            format!("devices/{}/heartbeat", "a".repeat(129)),
            ok(b""),
            RejectReason::InvalidDeviceId,
        ),
        (
            "devices/bad id/lwt".into(),
            ok(b""),
            RejectReason::InvalidDeviceId,
        ),
        (
            "devices/junk-1/heartbeat".into(),
            ok(b"{not json"),
            RejectReason::MalformedJson,
        ),
        (
            "devices/junk-2/heartbeat".into(),
            ok(b"[1,2,3]"),
            RejectReason::NotAnObject,
        ),
        (
            "devices/junk-3/heartbeat".into(),
            ok(br#"{"uptime_seconds":"long"}"#),
            RejectReason::InvalidField,
        ),
        (
            "devices/junk-4/heartbeat".into(),
            ok(br#"{"status":"sleeping"}"#),
            RejectReason::InvalidField,
        ),
        (
            "devices/junk-5/heartbeat".into(),
            ok(b"{\"hostname\":\"\xff\xfe\"}"),
            RejectReason::InvalidUtf8,
        ),
        (
            "devices/junk-6/heartbeat".into(),
            deep.into_bytes(),
            RejectReason::TooDeep,
        ),
        (
            "devices/junk-7/heartbeat".into(),
            oversized.into_bytes(),
            RejectReason::TooLarge,
        ),
    ]
}

pub async fn bad_input_is_rejected_counted_and_changes_nothing(setup: Setup) {
    let app = spawn_app(setup).await;
    let mut watcher = app.watch().await;
    let good = app.device("good-1", BEAT).await;
    watcher.expect("good-1", Status::Online, "registered").await;

    let raw = app.raw("vandal").await;
    let messages = bad_messages();
    for (topic, payload, _) in &messages {
        raw.publish(topic, payload.clone()).await.expect("publish");
    }
    for reason in RejectReason::ALL {
        let expected = messages.iter().filter(|(_, _, r)| *r == reason).count() as u64;
        eventually(
            PATIENCE,
            &format!("{} rejections of {}", expected, reason.as_str()),
            || {
                let metrics = app.metrics.clone();
                async move { metrics.rejected(reason) >= expected }
            },
        )
        .await;
        assert_eq!(
            app.metrics.rejected(reason),
            expected,
            "{}",
            reason.as_str()
        );
    }

    // A payload far over the broker's own limit: the broker refuses it (and drops the
    // sender); the hub's connection is not affected.
    let subscribed_since = *app.listening.borrow();
    let too_large = app.metrics.rejected(RejectReason::TooLarge);
    let flood = app.raw("flooder").await;
    let _ = flood
        .publish("devices/flood-1/heartbeat", vec![b' '; 1024 * 1024])
        .await;

    // The good device keeps beating and stays online; nothing else exists.
    let before = good.heartbeats_sent();
    let seen_before = app.stored("good-1").await.expect("exists").last_seen_at;
    eventually(
        PATIENCE,
        "the good device's next heartbeats to be committed",
        || async {
            let device = app.stored("good-1").await.expect("exists");
            good.heartbeats_sent() > before + 2 && device.last_seen_at > seen_before
        },
    )
    .await;
    let ids: Vec<String> = app
        .store
        .devices(&fleetwatch::storage::DeviceQuery {
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_iter()
        .map(|d| d.device_id.to_string())
        .collect();
    assert_eq!(
        ids,
        vec!["good-1".to_string()],
        "no device created by bad input"
    );
    assert_eq!(
        *app.listening.borrow(),
        subscribed_since,
        "the hub never lost its subscription"
    );
    assert_eq!(
        app.metrics.rejected(RejectReason::TooLarge),
        too_large,
        "refused by the broker, never seen by the hub"
    );
    watcher.collect_for(BEAT * 2).await;
    assert_eq!(watcher.unread("good-1"), vec![]);
    assert_eq!(
        watcher
            .history
            .iter()
            .filter(|s| s.event.device_id.as_str() != "good-1")
            .count(),
        0
    );
    app.stop().await;
}

pub async fn events_committed_before_start_are_published(setup: Setup) {
    let database = TestDatabase::create(setup.database).await;
    let settings = test_settings(&setup.broker, &database);
    // Committed, never published: what a crash between commit and publish leaves.
    let store = fleetwatch::storage::connect(&settings.database.url)
        .await
        .expect("store");
    let now = fleetwatch::clock::Clock::new().now();
    let registered = store
        .register(&"spare-9".parse().expect("valid id"), now, None)
        .await
        .expect("register");
    drop(store);

    let app = start(settings, database).await;
    let mut watcher = app.watch().await;
    let seen = watcher.next("spare-9", PATIENCE).await;
    assert_eq!(seen.event, registered, "same event, same id");
    eventually(PATIENCE, "the event to be marked published", || async {
        app.store.unpublished(0, 10).await.expect("read").is_empty()
    })
    .await;
    app.stop().await;
}

pub async fn a_backlog_larger_than_a_page_is_all_published(setup: Setup) {
    // The first hub's 5 s shutdown drain must deliver three pages.
    let _heavy = heavy().await;
    let database = std::sync::Arc::new(TestDatabase::create(setup.database).await);
    let settings = test_settings(&setup.broker, &database);
    let store = fleetwatch::storage::connect(&settings.database.url)
        .await
        .expect("store");
    let now = fleetwatch::clock::Clock::new().now();
    for i in 0..3000 {
        let id = format!("spare-{i:04}").parse().expect("valid id");
        store.register(&id, now, None).await.expect("register");
    }

    // Stopped at once: the shutdown drain alone must deliver all three pages.
    let app = start(settings.clone(), database.clone()).await;
    app.stop().await;
    assert_eq!(store.unpublished(0, 10).await.expect("read"), vec![]);

    // A broker holding none of those retained statuses (the embedded one on a fresh
    // port, or a fresh Mosquitto) gets them all republished, paged.
    let mut again = settings;
    let _fresh = match &setup.broker {
        Broker::Embedded => {
            again.mqtt.listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
            None
        }
        Broker::External(_) => {
            let fresh = crate::mosquitto::Mosquitto::start();
            again.mqtt.url = fresh.url.to_string();
            Some(fresh)
        }
    };
    let app = start(again, database).await;
    let mut watcher = app.watch().await;
    watcher
        .wait_for_count(Status::Provisioning, 3000, PATIENCE)
        .await;
    app.stop().await;
}
