//! Faults production brings: a full disk, a database locked by another writer. Each
//! runs the real hub and checks what operators rely on: nothing lost, no device
//! declared offline for the hub's own trouble, health that says what is wrong, and
//! recovery without a restart.
//!
//! The full-disk tests mount a tmpfs and need root: they sit behind the `fault-tests`
//! feature, which CI (running as root) turns on.

use std::time::Duration;

use firmware_sim::{BrokerUrl, Fleet, FleetConfig, QoS};
use fleetwatch::status::Status;
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::*;

/// The hub's HTTP side, from outside.
pub struct Http {
    base: String,
    client: reqwest::Client,
}

impl Http {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: base.into(),
            client: reqwest::Client::new(),
        }
    }

    pub async fn get(&self, path: &str) -> (StatusCode, String) {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .timeout(PATIENCE)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status();
        (status, response.text().await.expect("a body"))
    }

    pub async fn json(&self, path: &str) -> (StatusCode, Value) {
        let (status, body) = self.get(path).await;
        let value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"));
        (status, value)
    }

    /// The value of an unlabelled Prometheus sample.
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics").await;
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no sample {name} in /metrics"))
    }

    /// Devices per status and in total.
    pub async fn summary(&self) -> Value {
        self.json("/api/v1/summary").await.1
    }
}

/// A fleet of `devices` ids starting with `prefix`, beating every `interval`.
pub fn fleet(url: &BrokerUrl, prefix: &str, devices: u64, interval: Duration) -> Fleet {
    Fleet::start(FleetConfig {
        url: url.clone(),
        devices,
        interval,
        jitter: interval / 5,
        id_prefix: prefix.into(),
        qos: QoS::AtLeastOnce,
        connections: 4,
        error_rate: 0.0,
        lwt: false,
        declare_interval: false,
        labels: Vec::new(),
        parent: None,
    })
}

pub async fn wait_for_online(http: &Http, online: u64) {
    eventually(PATIENCE, &format!("{online} devices online"), || async {
        http.summary().await["online"] == online
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_lock_held_for_30_s_delays_commits_and_loses_or_invents_nothing() {
    use sqlx::Connection;

    let app = spawn_app_with(Broker::Embedded, |s| {
        s.health.commit_lag = Duration::from_secs(2);
    })
    .await;
    let http = Http::new(app.http.clone());
    let fleet = fleet(&app.url, "locked-", 50, Duration::from_millis(300));
    wait_for_online(&http, 50).await;

    // Another process's writer (a backup, a migration, `sqlite3` left open) holds the
    // write lock.
    let url = format!("sqlite://{}", app.db_path().display());
    let mut locker = sqlx::SqliteConnection::connect(&url)
        .await
        .expect("second connection");
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut locker)
        .await
        .expect("take the write lock");
    let locked_at = tokio::time::Instant::now();

    // An HTTP heartbeat is answered, with 503, instead of hanging on the lock.
    let response = within(
        Duration::from_secs(25),
        "the HTTP heartbeat to be answered",
        app.request(reqwest::Method::POST, "/api/v1/devices/agent-1/heartbeat")
            .send(),
    )
    .await
    .expect("response");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);

    eventually(PATIENCE, "/healthz to name the database", || async {
        let (status, report) = http.json("/healthz").await;
        status == StatusCode::SERVICE_UNAVAILABLE && report["database"] != "ok"
    })
    .await;
    let (status, ready) = http.json("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert!(http.metric("fleetwatch_uncommitted_devices").await >= 1.0);

    // The fault is the lock's length: hold it for 30 s in all.
    tokio::time::sleep_until(locked_at + Duration::from_secs(30)).await;
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut locker)
        .await
        .expect("release the lock");
    drop(locker);

    eventually(PATIENCE, "/healthz to recover", || async {
        http.get("/healthz").await.0 == StatusCode::OK
    })
    .await;
    wait_for_online(&http, 50).await;
    // No device that kept beating had an offline transition at any time, and
    // nothing went offline but the agent that fell silent.
    for i in 0..50 {
        let id = format!("locked-{i:02}");
        let history = app
            .store
            .events(&id.parse().expect("id"), None, 100)
            .await
            .expect("read");
        assert!(
            history.iter().all(|e| e.event.status == Status::Online),
            "{id}: {history:?}"
        );
    }
    assert!(app.metrics.transitions(Status::Offline) <= 1);
    // The heartbeat answered 503 was held and committed once the lock was gone (and
    // as that agent said nothing since, it is offline by now, rightly).
    let agent = app.stored("agent-1").await.expect("agent-1 registered");
    assert!(agent.last_seen_at.is_some());
    let (_, offline) = http.json("/api/v1/devices?status=offline").await;
    let offline: Vec<_> = offline["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["device_id"].clone())
        .collect();
    assert!(
        offline.iter().all(|id| id == "agent-1"),
        "devices that kept beating went offline: {offline:?}"
    );
    let response = app
        .request(reqwest::Method::POST, "/api/v1/devices/agent-1/heartbeat")
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(app.status_of("agent-1").await, Some(Status::Online));
    fleet.stop().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_under_a_1024_file_limit_are_cut_off_and_the_hub_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::restart::{HubProcess, hub_env};

    // This test holds 1,100 sockets itself.
    let limit = fleetwatch::open_files::raise_limit();
    assert!(
        limit >= 1_300,
        "this test needs an open-file hard limit of at least 1,300 (it is {limit}): ulimit -Hn"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let http_port = free_port();
    let mut env = hub_env(port, &dir.path().join("fleetwatch.db"));
    env.retain(|(name, _)| *name != "FLEETWATCH_HTTP__LISTEN");
    env.push(("FLEETWATCH_HTTP__LISTEN", format!("127.0.0.1:{http_port}")));
    let mut hub = HubProcess::spawn_with_file_limit(1024, dir.path(), &[], &env);
    hub.wait_for_line("subscribed to device heartbeats").await;
    assert!(
        hub.log
            .iter()
            .any(|l| l.contains("no room for http.max_connections")),
        "the lowered HTTP cap is announced:\n{}",
        hub.log.join("\n")
    );
    let url = BrokerUrl::new("127.0.0.1", port);
    let _steady = sim_device(&url, "steady", Duration::from_millis(300)).await;
    let http = Http::new(format!("http://127.0.0.1:{http_port}"));
    wait_for_online(&http, 1).await;

    // 1,100 clients send half a request each (no key needed to get this far) and hold.
    let mut loris = Vec::with_capacity(1100);
    for _ in 0..1100 {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", http_port))
            .await
            .expect("connect (accepted or queued)");
        stream
            .write_all(b"GET /api/v1/devices HTTP/1.1\r\nHost: hub\r\nX-Slow: ")
            .await
            .expect("half a request");
        loris.push(stream);
    }

    // A normal client is served again within 15 s (header timeout 5 s: the held
    // connections are cut off in rounds as the cap lets them in).
    let asked = tokio::time::Instant::now();
    let response = within(
        Duration::from_secs(15),
        "a normal request to be served",
        reqwest::Client::new()
            .get(format!("http://127.0.0.1:{http_port}/api/v1/summary"))
            .send(),
    )
    .await
    .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    eprintln!(
        "figure: a normal request served {:.2} s after 1,100 slow clients arrived",
        asked.elapsed().as_secs_f64()
    );

    // Every slow client was cut off, none served.
    within(PATIENCE * 2, "every slow connection to be closed", async {
        for stream in &mut loris {
            let mut rest = Vec::new();
            // Closed: end of stream (or a reset).
            let _ = stream.read_to_end(&mut rest).await;
            assert!(rest.is_empty() || !rest.starts_with(b"HTTP/1.1 200"));
        }
    })
    .await;
    drop(loris);

    assert!(hub.is_running(), "the hub stopped:\n{}", hub.log.join("\n"));
    // The database, the broker and the HTTP side all still work.
    let response = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{http_port}/api/v1/devices/after-loris/heartbeat"
        ))
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let late = sim_device(&url, "late-comer", Duration::from_millis(300)).await;
    wait_for_online(&http, 3).await;
    assert_eq!(http.get("/healthz").await.0, StatusCode::OK);
    late.stop().await;
    hub.terminate();
    assert!(hub.wait().await.success());
}

#[cfg(feature = "fault-tests")]
mod full_disk {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use super::*;
    use crate::restart::{HubProcess, hub_env};

    /// A tmpfs of `size`, unmounted on drop.
    struct Tmpfs {
        dir: tempfile::TempDir,
    }

    impl Tmpfs {
        fn mount(size: &str) -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let status = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .status()
                .expect("run mount");
            assert!(
                status.success(),
                "the fault-tests feature mounts a tmpfs: run the tests as root (CI does)"
            );
            Self { dir }
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }

        /// Writes a file until the filesystem is full; returns its path.
        fn fill(&self) -> PathBuf {
            use std::io::Write;
            let path = self.path().join("filler");
            let mut file = std::fs::File::create(&path).expect("create filler");
            let block = vec![0u8; 64 * 1024];
            loop {
                if let Err(e) = file.write_all(&block) {
                    assert_eq!(e.raw_os_error(), Some(28), "expected ENOSPC: {e}");
                    break;
                }
            }
            let _ = file.write_all(&block[..512]);
            path
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }

    /// A hub process with its database on `disk` and its HTTP side.
    fn start_hub(disk: &Tmpfs) -> (HubProcess, BrokerUrl, Http) {
        let port = free_port();
        let http_port = free_port();
        let mut env = hub_env(port, &disk.path().join("fleetwatch.db"));
        env.retain(|(name, _)| *name != "FLEETWATCH_HTTP__LISTEN");
        env.extend([
            ("FLEETWATCH_HTTP__LISTEN", format!("127.0.0.1:{http_port}")),
            ("FLEETWATCH_HEARTBEAT__OFFLINE_AFTER", "3s".into()),
            ("FLEETWATCH_HEARTBEAT__CHECK_INTERVAL", "100ms".into()),
            ("FLEETWATCH_HEALTH__COMMIT_LAG", "2s".into()),
        ]);
        let hub = HubProcess::spawn(disk.path(), &[], &env);
        (
            hub,
            BrokerUrl::new("127.0.0.1", port),
            Http::new(format!("http://127.0.0.1:{http_port}")),
        )
    }

    async fn wait_for_failing_writes(http: &Http) {
        eventually(PATIENCE, "/healthz to report failing writes", || async {
            let (status, report) = http.json("/healthz").await;
            status == StatusCode::SERVICE_UNAVAILABLE && report["database"] != "ok"
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_holds_heartbeats_says_so_and_recovers_when_space_returns() {
        let disk = Tmpfs::mount("8m");
        let (mut hub, url, http) = start_hub(&disk);
        hub.wait_for_line("subscribed to device heartbeats").await;
        let old = fleet(&url, "old-", 500, Duration::from_millis(500));
        wait_for_online(&http, 500).await;

        let filler = disk.fill();
        // New devices need new pages: their registrations cannot be written.
        let new = fleet(&url, "new-", 300, Duration::from_millis(500));
        wait_for_failing_writes(&http).await;
        assert_eq!(http.metric("fleetwatch_database_write_failing").await, 1.0);
        assert_eq!(
            http.json("/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        // Held for longer than a device's deadline: silence the hub could not write
        // down is not the devices' fault.
        eventually(PATIENCE, "heartbeats held past offline_after", || async {
            http.metric("fleetwatch_uncommitted_age_seconds").await > 4.0
        })
        .await;
        assert!(http.metric("fleetwatch_uncommitted_devices").await >= 300.0);

        std::fs::remove_file(&filler).expect("free the space");
        let freed = tokio::time::Instant::now();
        eventually(PATIENCE, "/healthz to recover", || async {
            http.get("/healthz").await.0 == StatusCode::OK
        })
        .await;
        // A figure for RELIABILITY.md (printed with --nocapture), not a condition.
        eprintln!(
            "figure: /healthz ok {:.2} s after the space was freed",
            freed.elapsed().as_secs_f64()
        );
        wait_for_online(&http, 800).await;
        let summary = http.summary().await;
        assert_eq!(
            (summary["total"].as_u64(), summary["offline"].as_u64()),
            (Some(800), Some(0))
        );
        let (_, metrics) = http.get("/metrics").await;
        assert!(
            metrics.contains("fleetwatch_transitions_total{status=\"offline\"} 0"),
            "a device went offline during the outage"
        );

        old.stop().await;
        new.stop().await;
        hub.terminate();
        let status = hub.wait().await;
        let log = hub.log.join("\n");
        assert!(status.success(), "{status:?}\n{log}");
        assert!(!log.contains("transaction depth"), "{log}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shutdown_that_cannot_commit_exits_non_zero_and_counts_the_devices() {
        let disk = Tmpfs::mount("8m");
        let (mut hub, url, http) = start_hub(&disk);
        hub.wait_for_line("subscribed to device heartbeats").await;
        let old = fleet(&url, "old-", 100, Duration::from_millis(500));
        wait_for_online(&http, 100).await;
        let _filler = disk.fill();
        let new = fleet(&url, "new-", 200, Duration::from_millis(500));
        wait_for_failing_writes(&http).await;

        hub.terminate();
        let status = hub.wait_up_to(Duration::from_secs(30)).await;
        let log = hub.log.join("\n");
        assert!(
            !status.success(),
            "exit 0 despite unsaved heartbeats:\n{log}"
        );
        let line = hub
            .log
            .iter()
            .find(|line| line.starts_with("fleetwatch: could not commit the heartbeats of"))
            .unwrap_or_else(|| panic!("no final line naming what was lost:\n{log}"));
        let devices: u64 = line
            .trim_start_matches("fleetwatch: could not commit the heartbeats of ")
            .split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count in {line:?}"));
        assert!(devices > 0, "{line}");
        old.stop().await;
        new.stop().await;
    }
}

/// The broker killed under load, and the hub killed inside an offline storm: the
/// guarantees that must hold across someone else's crash and the hub's own.
#[cfg(feature = "mosquitto-tests")]
mod crashes {
    use std::collections::{HashMap, HashSet};

    use fleetwatch::clock::Clock;
    use fleetwatch::storage::Store;

    use super::*;
    use crate::mosquitto::Mosquitto;
    use crate::restart::{HubProcess, hub_env};

    /// Every device's current event, as the store says.
    async fn current_events(store: &dyn Store) -> HashMap<String, fleetwatch::event::StatusEvent> {
        let mut events = HashMap::new();
        let mut after = None;
        loop {
            let page = store
                .current_events(after.as_ref(), 1000)
                .await
                .expect("read");
            let Some(last) = page.last() else {
                return events;
            };
            after = Some(last.event.device_id.clone());
            for stored in page {
                events.insert(stored.event.device_id.to_string(), stored.event);
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mosquitto_killed_under_2000_devices_loses_nothing_and_invents_no_offline() {
        const DEVICES: u64 = 2000;
        let _heavy = heavy().await;
        let mut mosquitto = Mosquitto::start();
        let offline_after = Duration::from_secs(3);
        let app = spawn_app_with(Broker::External(mosquitto.url.clone()), |s| {
            s.heartbeat.offline_after = offline_after;
        })
        .await;
        let http = Http::new(app.http.clone());
        let fleet = fleet(&mosquitto.url, "m-", DEVICES, Duration::from_secs(1));
        wait_for_online(&http, DEVICES).await;

        mosquitto.kill9();
        let mut listening = app.listening.clone();
        within(
            PATIENCE,
            "the hub to notice",
            listening.wait_for(|s| s.is_none()),
        )
        .await
        .expect("listening");
        mosquitto.restart();
        within(
            PATIENCE,
            "the hub to resubscribe",
            listening.wait_for(|s| s.is_some()),
        )
        .await
        .expect("listening");
        let back = Clock::new().now();
        // Every device is heard again, and the grace and a deadline after it pass.
        eventually(PATIENCE, "every device heard after the restart", || async {
            let mut query = fleetwatch::storage::DeviceQuery {
                limit: 1000,
                ..Default::default()
            };
            let mut heard = 0;
            loop {
                let page = app.store.devices(&query).await.expect("read");
                let Some(last) = page.last() else { break };
                query.after = Some(last.device_id.clone());
                heard += page
                    .iter()
                    .filter(|d| d.last_seen_at.is_some_and(|seen| seen > back))
                    .count();
            }
            heard as u64 == DEVICES
        })
        .await;
        eventually(PATIENCE, "two deadlines after the restart", || async {
            Clock::new().now().millis_since(back) > 2 * offline_after.as_millis() as i64
        })
        .await;
        assert_eq!(
            app.metrics.transitions(Status::Offline),
            0,
            "no device went offline for the broker's crash"
        );
        let summary = http.summary().await;
        assert_eq!(summary["online"], DEVICES, "{summary}");

        // An operator arriving now sees every device's current status, retained.
        let stored = current_events(app.store.as_ref()).await;
        let mut late = StatusWatcher::connect(&mosquitto.url).await;
        late.wait_for_devices(Status::Online, DEVICES as usize, PATIENCE)
            .await;
        for seen in &late.history {
            let device = seen.event.device_id.as_str();
            assert_eq!(Some(&seen.event), stored.get(device), "{device}");
        }
        eventually(PATIENCE, "the outbox to be empty", || async {
            app.store.unpublished(0, 10).await.expect("read").is_empty()
        })
        .await;
        fleet.stop().await;
        app.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_hub_killed_inside_an_offline_storm_reports_each_device_offline_once() {
        const DEVICES: usize = 2000;
        let _heavy = heavy().await;
        let mosquitto = Mosquitto::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("fleetwatch.db");
        let mut env = hub_env(free_port(), &db);
        env.extend([
            ("FLEETWATCH_MQTT__BROKER", "external".to_string()),
            ("FLEETWATCH_MQTT__URL", mosquitto.url.to_string()),
            ("FLEETWATCH_HEARTBEAT__OFFLINE_AFTER", "2s".into()),
            ("FLEETWATCH_HEARTBEAT__CHECK_INTERVAL", "100ms".into()),
        ]);
        let mut hub = HubProcess::spawn(dir.path(), &[], &env);
        hub.wait_for_line("subscribed to device heartbeats").await;
        let mut watcher = StatusWatcher::connect(&mosquitto.url).await;
        let fleet = fleet(
            &mosquitto.url,
            "storm-",
            DEVICES as u64,
            Duration::from_millis(500),
        );
        watcher
            .wait_for_devices(Status::Online, DEVICES, PATIENCE)
            .await;

        // All silent at once; the hub is killed as the storm's events go out.
        fleet.stop().await;
        watcher.wait_for_count(Status::Offline, 1, PATIENCE).await;
        hub.kill().await;
        let mut hub = HubProcess::spawn(dir.path(), &[], &env);
        hub.wait_for_line("subscribed to device heartbeats").await;
        watcher
            .wait_for_devices(Status::Offline, DEVICES, PATIENCE * 2)
            .await;
        // Re-deliveries of what was acknowledged but not marked come now, if at all.
        watcher.collect_for(Duration::from_secs(2)).await;

        let store = fleetwatch::storage::connect(&format!("sqlite://{}", db.display()))
            .await
            .expect("store");
        let stored = current_events(store.as_ref()).await;
        assert_eq!(stored.len(), DEVICES);
        let mut offline_ids: HashMap<String, HashSet<uuid::Uuid>> = HashMap::new();
        for seen in watcher
            .history
            .iter()
            .filter(|s| s.event.status == Status::Offline)
        {
            offline_ids
                .entry(seen.event.device_id.to_string())
                .or_default()
                .insert(seen.event.event_id);
        }
        assert_eq!(offline_ids.len(), DEVICES);
        for (device, ids) in &offline_ids {
            let current = &stored[device];
            assert_eq!(current.status, Status::Offline, "{device}");
            assert_eq!(
                ids,
                &HashSet::from([current.event_id]),
                "{device}: one offline event, re-sent (if at all) under its first id"
            );
            let history = store
                .events(&device.parse().expect("id"), None, 10)
                .await
                .expect("read");
            let offline = history
                .iter()
                .filter(|e| e.event.status == Status::Offline)
                .count();
            assert_eq!(offline, 1, "{device}: exactly one offline transition");
        }
        assert_eq!(store.unpublished(0, 10).await.expect("read"), vec![]);
        hub.terminate();
        assert!(hub.wait().await.success());
    }
}
