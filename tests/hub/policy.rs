//! The alert policy end to end (interface.md "Alert policy"): a real hub on its
//! embedded broker, devices from firmware-sim, receivers on loopback. The policy's
//! every branch is unit-tested with paused time in src/notify/policy/tests.rs; these
//! show the parts working together.

use std::collections::BTreeSet;
use std::time::Duration;

use firmware_sim::{BrokerUrl, Fleet, FleetConfig, QoS};
use fleetwatch::config::{Secret, SinkSettings};
use fleetwatch::notify::filter::FilterSettings;
use fleetwatch::status::Status;

use crate::helpers::*;
use crate::notify::webhook;
use crate::receiver::Receiver;

const BEAT: Duration = Duration::from_millis(300);

fn slack(name: &str, url: String) -> SinkSettings {
    SinkSettings {
        name: name.into(),
        kind: "slack".into(),
        enabled: true,
        url: Some(Secret::new(url)),
        secret: None,
        token: None,
        chat_id: None,
        api_url: None,
        filter: FilterSettings::default(),
    }
}

fn fleet(app: &TestApp, prefix: &str, devices: u64, site: &str) -> FleetConfig {
    FleetConfig {
        url: app.url.clone(),
        devices,
        interval: BEAT,
        jitter: Duration::ZERO,
        id_prefix: prefix.into(),
        qos: QoS::AtMostOnce,
        connections: 4,
        error_rate: 0.0,
        lwt: false,
        declare_interval: false,
        labels: vec![("site".into(), site.into())],
        parent: None,
    }
}

/// The `type` of each accepted webhook, in arrival order.
fn types(receiver: &Receiver) -> Vec<String> {
    receiver
        .accepted()
        .iter()
        .map(|r| r.json()["type"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_at_one_site_is_one_message_per_sink_and_a_few_devices_are_told_one_by_one() {
    let _heavy = heavy().await;
    let hooks = Receiver::start().await;
    let chat = Receiver::start().await;
    let app = spawn_app_with(Broker::Embedded, |s| {
        s.notify.sinks = vec![
            webhook("ops", hooks.url("/hooks")),
            slack("team", chat.url("/slack")),
        ];
        s.notify.group_wait = Duration::from_secs(2);
        s.notify.group_threshold = 50;
        s.notify.group_by = vec!["site".into()];
        s.notify.dashboard_url = Some("https://fleet.example.com".into());
        s.notify.retry_max = Duration::from_millis(200);
    })
    .await;
    let mut watcher = app.watch().await;

    let north = Fleet::start(fleet(&app, "north-", 300, "north"));
    watcher
        .wait_for_devices(Status::Online, 300, PATIENCE)
        .await;
    north.stop().await;
    watcher
        .wait_for_devices(Status::Offline, 300, PATIENCE)
        .await;
    hooks.wait_for_accepted(1, PATIENCE).await;
    chat.wait_for_accepted(1, PATIENCE).await;
    // The window has closed: whatever else came would be here by now.
    watcher.collect_for(Duration::from_secs(3)).await;
    assert_eq!(types(&hooks), ["devices.offline"], "one message per sink");
    let body = hooks.accepted()[0].json();
    assert_eq!(body["data"]["count"], 300, "{body}");
    assert_eq!(body["data"]["group"], serde_json::json!({"site": "north"}));
    let listed: BTreeSet<&str> = body["data"]["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["device_id"].as_str())
        .collect();
    assert_eq!(listed.len(), 300, "every device listed once");
    let text = chat.accepted()[0].json()["text"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        text.starts_with("🔴 300 devices offline at site north: north-000, north-001,")
            && text.contains("… (+295)")
            && text.ends_with("https://fleet.example.com/?label=site:north&status=offline"),
        "{text}"
    );

    let north = Fleet::start(fleet(&app, "north-", 300, "north"));
    hooks.wait_for_accepted(2, PATIENCE).await;
    chat.wait_for_accepted(2, PATIENCE).await;
    watcher.collect_for(Duration::from_secs(3)).await;
    assert_eq!(types(&hooks), ["devices.offline", "devices.recovered"]);
    assert_eq!(hooks.accepted()[1].json()["data"]["count"], 300);

    let south = Fleet::start(fleet(&app, "south-", 10, "south"));
    watcher
        .wait_for_devices(Status::Online, 310, PATIENCE)
        .await;
    south.stop().await;
    hooks.wait_for_accepted(12, PATIENCE).await;
    watcher.collect_for(Duration::from_secs(3)).await;
    let types = types(&hooks);
    assert_eq!(types.len(), 12, "{types:?}");
    assert!(
        types[2..].iter().all(|t| t == "device.offline"),
        "below the threshold, one each: {types:?}"
    );
    assert_eq!(chat.accepted().len(), 12);
    north.stop().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_down_for_less_than_min_offline_sends_nothing_and_reminders_repeat() {
    let hooks = Receiver::start().await;
    let app = spawn_app_with(Broker::Embedded, |s| {
        s.notify.sinks = vec![webhook("ops", hooks.url("/hooks"))];
        s.notify.min_offline = Duration::from_secs(3);
        s.notify.repeat_after = Some(Duration::from_secs(2));
    })
    .await;
    let mut watcher = app.watch().await;
    let flapping = app.device("flapping", BEAT).await;
    watcher
        .expect("flapping", Status::Online, "registered")
        .await;
    flapping.silence().await.expect("silence");
    watcher
        .expect("flapping", Status::Offline, "heartbeat_timeout")
        .await;
    flapping.resume().await.expect("resume");
    watcher
        .expect("flapping", Status::Online, "heartbeat")
        .await;

    let down = app.device("down", BEAT).await;
    watcher.expect("down", Status::Online, "registered").await;
    down.silence().await.expect("silence");
    let offline = watcher
        .expect("down", Status::Offline, "heartbeat_timeout")
        .await;
    // Told min_offline after it went down, then reminded every repeat_after.
    hooks.wait_for_accepted(3, PATIENCE).await;
    let accepted = hooks.accepted();
    let seen: Vec<(String, String)> = accepted
        .iter()
        .map(|r| {
            let body = r.json();
            (
                body["type"].as_str().unwrap_or_default().to_string(),
                body["data"]["device_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(
        seen[..3],
        [
            ("device.offline".to_string(), "down".to_string()),
            ("device.still_down".to_string(), "down".to_string()),
            ("device.still_down".to_string(), "down".to_string()),
        ],
        "nothing of the flap"
    );
    let reminder = accepted[1].json();
    assert_eq!(reminder["data"]["event_id"], offline.event_id.to_string());
    assert_eq!(reminder["data"]["reminder"], 1);
    assert_eq!(accepted[2].json()["data"]["reminder"], 2);
    let keys: BTreeSet<&str> = accepted.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(keys.len(), accepted.len(), "each reminder its own key");

    down.resume().await.expect("resume");
    watcher.expect("down", Status::Online, "heartbeat").await;
    eventually(PATIENCE, "the recovery", || async {
        hooks
            .accepted()
            .iter()
            .any(|r| r.json()["type"] == "device.recovered")
    })
    .await;
    let told = hooks.accepted().len();
    watcher.collect_for(Duration::from_secs(3)).await;
    assert_eq!(hooks.accepted().len(), told, "no reminder once it is back");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_nothing_is_told_until_the_startup_grace_has_passed() {
    use crate::restart::{HubProcess, hub_env};

    let hooks = Receiver::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("fleetwatch.toml");
    std::fs::write(
        &config,
        format!(
            "[notify]\ngroup_threshold = 0\n\n[[notify.sinks]]\nname = \"ops\"\n\
             kind = \"webhook\"\nurl = \"{}\"\nsecret = \"{}\"\n",
            hooks.url("/hooks"),
            crate::notify::SECRET
        ),
    )
    .expect("write the configuration");
    let port = free_port();
    let url = BrokerUrl::new("127.0.0.1", port);
    let mut env = hub_env(port, &dir.path().join("fleetwatch.db"));
    env.push((
        "FLEETWATCH_HEARTBEAT__OFFLINE_AFTER",
        format!("{}ms", OFFLINE_AFTER.as_millis()),
    ));
    env.push(("FLEETWATCH_HEARTBEAT__CHECK_INTERVAL", "100ms".into()));
    let args = ["--config", config.to_str().expect("path")];

    let mut hub = HubProcess::spawn(dir.path(), &args, &env);
    hub.wait_for_line("subscribed to device heartbeats").await;
    let mut watcher = StatusWatcher::connect(&url).await;
    let _beating = sim_device(&url, "keeps-beating", BEAT).await;
    let dead = sim_device(&url, "dies-meanwhile", BEAT).await;
    watcher
        .expect("keeps-beating", Status::Online, "registered")
        .await;
    let registered = watcher
        .expect("dies-meanwhile", Status::Online, "registered")
        .await;
    hub.kill().await;
    drop(watcher);
    dead.silence().await.expect("silence");
    // Down for longer than offline_after: every device's deadline passes meanwhile.
    tokio::time::sleep(OFFLINE_AFTER + Duration::from_secs(1)).await;

    let mut hub = HubProcess::spawn(dir.path(), &args, &env);
    hub.wait_for_line("subscribed to device heartbeats").await;
    let mut watcher = StatusWatcher::connect(&url).await;
    // The dead device is told of once its own deadline has passed since the hub
    // could hear it again; the one that kept beating reconnected and never is. First
    // the hub republishes its retained status: once, or twice when the kill came
    // before the publish was marked (the outbox sends it again beside the republish).
    // Either way it is the same event, not a new transition.
    let offline = loop {
        let seen = watcher.next("dies-meanwhile", PATIENCE).await.event;
        if seen.status != Status::Online {
            break seen;
        }
        assert_eq!(seen.event_id, registered.event_id, "a republish: {seen:?}");
    };
    assert_eq!(
        (offline.status, offline.reason.as_str()),
        (Status::Offline, "heartbeat_timeout"),
        "{offline:?}"
    );
    hooks.wait_for_accepted(1, PATIENCE).await;
    watcher.collect_for(OFFLINE_AFTER * 2).await;
    let told: Vec<String> = hooks
        .accepted()
        .iter()
        .map(|r| {
            let body = r.json();
            format!("{} {}", body["type"], body["data"]["device_id"])
        })
        .collect();
    assert_eq!(told, [r#""device.offline" "dies-meanwhile""#]);
    assert!(
        watcher
            .unread("keeps-beating")
            .iter()
            .all(|e| e.status == Status::Online),
        "{:?}",
        watcher.unread("keeps-beating")
    );
    hub.kill().await;
}

/// `(type, device, behind)` of each accepted webhook, in arrival order.
fn told(receiver: &Receiver) -> Vec<(String, String, u64)> {
    receiver
        .accepted()
        .iter()
        .map(|r| {
            let body = r.json();
            (
                body["type"].as_str().unwrap_or_default().to_string(),
                body["data"]["device_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                body["data"]["behind"]["count"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_behind_a_dead_gateway_are_one_message_and_one_recovery() {
    let _heavy = heavy().await;
    let hooks = Receiver::start().await;
    let app = spawn_app_with(Broker::Embedded, |s| {
        s.notify.sinks = vec![webhook("ops", hooks.url("/hooks"))];
    })
    .await;
    let mut watcher = app.watch().await;
    let children_of = |app: &TestApp| {
        let mut config = fleet(app, "child-", 100, "north");
        config.parent = Some("gw-1".into());
        Fleet::start(config)
    };
    let gateway = app.device("gw-1", BEAT).await;
    watcher.expect("gw-1", Status::Online, "registered").await;
    // The gateway's deadline is the shorter: it is found dead first.
    let response = app
        .request(reqwest::Method::PATCH, "/api/v1/devices/gw-1")
        .json(&serde_json::json!({"offline_after": "1s"}))
        .send()
        .await
        .expect("request");
    assert!(response.status().is_success(), "{}", response.status());
    let children = children_of(&app);
    watcher
        .wait_for_devices(Status::Online, 101, PATIENCE)
        .await;

    // The site loses power: gateway and children fall silent together.
    gateway.silence().await.expect("silence");
    children.stop().await;
    watcher
        .wait_for_devices(Status::Offline, 101, PATIENCE)
        .await;
    hooks.wait_for_accepted(1, PATIENCE).await;
    watcher.collect_for(Duration::from_secs(2)).await;
    assert_eq!(
        told(&hooks),
        [("device.offline".to_string(), "gw-1".to_string(), 100)],
        "one message, naming the gateway and the 100 behind it"
    );

    // Power is back.
    gateway.resume().await.expect("resume");
    let children = children_of(&app);
    watcher
        .wait_for_devices(Status::Online, 101, PATIENCE)
        .await;
    hooks.wait_for_accepted(2, PATIENCE).await;
    watcher.collect_for(OFFLINE_AFTER * 2).await;
    assert_eq!(
        told(&hooks)[1..],
        [("device.recovered".to_string(), "gw-1".to_string(), 0)],
        "one recovery"
    );
    children.stop().await;
    app.stop().await;
}

/// Silences `devices` for `seconds` from now through the API; returns when it ends.
async fn silence_for(
    app: &TestApp,
    devices: &[&str],
    seconds: i64,
) -> chrono::DateTime<chrono::Utc> {
    let ends_at = chrono::Utc::now() + chrono::Duration::seconds(seconds);
    let response = app
        .request(reqwest::Method::POST, "/api/v1/silences")
        .json(&serde_json::json!({
            "device_ids": devices,
            "ends_at": ends_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "comment": "firmware roll-out",
        }))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), reqwest::StatusCode::CREATED);
    ends_at
}

/// Nothing was told before `ends_at` (which must still lie ahead), then something is,
/// not before it; then waits a while for anything more, which the caller judges.
async fn told_at_the_end_only(
    hooks: &Receiver,
    watcher: &mut StatusWatcher,
    ends_at: chrono::DateTime<chrono::Utc>,
) {
    assert!(
        chrono::Utc::now() < ends_at,
        "the scenario ran past the silence; lengthen it"
    );
    assert!(hooks.received().is_empty(), "nothing while silenced");
    hooks.wait_for_accepted(1, PATIENCE).await;
    assert!(
        chrono::Utc::now() >= ends_at,
        "told only once the silence ended"
    );
    watcher.collect_for(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silence_holds_notifications_and_a_device_still_down_at_its_end_is_told_once() {
    let hooks = Receiver::start().await;
    let app = spawn_app_with(Broker::Embedded, |s| {
        s.notify.sinks = vec![webhook("ops", hooks.url("/hooks"))];
    })
    .await;
    let mut watcher = app.watch().await;
    let flaky = app.device("flaky", BEAT).await;
    let broken = app.device("broken", BEAT).await;
    watcher.expect("flaky", Status::Online, "registered").await;
    watcher.expect("broken", Status::Online, "registered").await;
    let ends_at = silence_for(&app, &["flaky", "broken"], 8).await;

    // Inside the silence: one device fails and recovers, the other fails for good.
    // Both transitions are recorded and published as ever.
    flaky.silence().await.expect("silence");
    watcher
        .expect("flaky", Status::Offline, "heartbeat_timeout")
        .await;
    flaky.resume().await.expect("resume");
    watcher.expect("flaky", Status::Online, "heartbeat").await;
    broken.silence().await.expect("silence");
    watcher
        .expect("broken", Status::Offline, "heartbeat_timeout")
        .await;
    told_at_the_end_only(&hooks, &mut watcher, ends_at).await;
    assert_eq!(
        told(&hooks),
        [("device.offline".to_string(), "broken".to_string(), 0)],
        "the one still down, once; nothing of the one that recovered"
    );
    drop(flaky);
    app.stop().await;
}

/// A hub stopped between a silenced device's offline and the silence's end: the next
/// one recalls what the silence held (its engine starts empty, past that transition in
/// the log) and tells it when the silence ends, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_a_silence_held_across_a_restart_is_told_when_the_silence_ends() {
    let hooks = Receiver::start().await;
    let database = std::sync::Arc::new(TestDatabase::create(Database::Sqlite).await);
    let mut settings = test_settings(&Broker::Embedded, &database);
    settings.notify.sinks = vec![webhook("ops", hooks.url("/hooks"))];
    let app = start(settings.clone(), database.clone()).await;
    let mut watcher = app.watch().await;
    let broken = app.device("broken", BEAT).await;
    watcher.expect("broken", Status::Online, "registered").await;
    let ends_at = silence_for(&app, &["broken"], 10).await;
    broken.silence().await.expect("silence");
    watcher
        .expect("broken", Status::Offline, "heartbeat_timeout")
        .await;
    let id = "broken".parse().expect("id");
    let offline = app.store.events(&id, None, 1).await.expect("read");
    let seq = offline.first().expect("the offline event").seq;
    // The sink's cursor, read from the file: past the offline once it is decided.
    let url = format!("sqlite://{}?mode=ro", app.db_path().display());
    eventually(PATIENCE, "the sink to decide the offline", || async {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&url)
            .await
            .expect("open the file");
        let cursor: Option<i64> =
            sqlx::query_scalar("SELECT last_seq FROM notify_sinks WHERE sink = 'ops'")
                .fetch_optional(&mut conn)
                .await
                .expect("read the cursor");
        cursor.is_some_and(|c| c >= seq)
    })
    .await;
    app.stop().await;
    drop(watcher);

    let app = start(settings, database).await;
    let mut watcher = app.watch().await;
    told_at_the_end_only(&hooks, &mut watcher, ends_at).await;
    assert_eq!(
        told(&hooks),
        [("device.offline".to_string(), "broken".to_string(), 0)],
        "once"
    );
    drop(broken);
    app.stop().await;
}
