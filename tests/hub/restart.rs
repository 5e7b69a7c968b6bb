//! The hub as a real process: killed with SIGKILL and restarted on the same database.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use firmware_sim::BrokerUrl;
use fleetwatch::status::Status;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::helpers::*;

/// A `fleetwatch` process with its stderr lines available to the test.
pub struct HubProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub log: Vec<String>,
    /// Indexes into `log` of the lines a wait has already matched.
    matched: std::collections::HashSet<usize>,
}

impl HubProcess {
    /// Starts the binary in `dir` with the given environment overrides (and no
    /// FLEETWATCH_* variables inherited from the caller).
    pub fn spawn(dir: &Path, args: &[&str], env: &[(&str, String)]) -> Self {
        Self::spawn_command(
            Command::new(env!("CARGO_BIN_EXE_fleetwatch")),
            dir,
            args,
            env,
        )
    }

    /// As [`HubProcess::spawn`], under an open-file limit (soft and hard) of `files`.
    pub fn spawn_with_file_limit(
        files: u32,
        dir: &Path,
        args: &[&str],
        env: &[(&str, String)],
    ) -> Self {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("ulimit -n {files} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_fleetwatch"));
        Self::spawn_command(command, dir, args, env)
    }

    fn spawn_command(
        mut command: Command,
        dir: &Path,
        args: &[&str],
        env: &[(&str, String)],
    ) -> Self {
        command
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("FLEETWATCH_")) {
            command.env_remove(name);
        }
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("start fleetwatch");
        let (tx, lines) = mpsc::channel(10_000);
        let stderr = child.stderr.take().expect("stderr piped");
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            lines,
            log: Vec::new(),
            matched: std::collections::HashSet::new(),
        }
    }

    /// Waits for a log line containing `text` that no earlier wait matched; it may
    /// have been read already, while waiting for another (the hub logs its parts'
    /// starts in no fixed order).
    pub async fn wait_for_line(&mut self, text: &str) {
        let earlier =
            (0..self.log.len()).find(|i| !self.matched.contains(i) && self.log[*i].contains(text));
        if let Some(index) = earlier {
            self.matched.insert(index);
            return;
        }
        let found = within(PATIENCE, text, async {
            while let Some(line) = self.lines.recv().await {
                self.log.push(line.clone());
                if line.contains(text) {
                    self.matched.insert(self.log.len() - 1);
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            found,
            "fleetwatch exited before logging {text:?}; log:\n{}",
            self.log.join("\n")
        );
    }

    pub async fn wait(&mut self) -> ExitStatus {
        self.wait_up_to(PATIENCE).await
    }

    pub async fn wait_up_to(&mut self, limit: Duration) -> ExitStatus {
        let status = within(limit, "fleetwatch to exit", self.child.wait())
            .await
            .expect("wait");
        // Read stderr to its end: lines may still be in flight when the process exits.
        while let Some(line) =
            within(PATIENCE, "fleetwatch's stderr to close", self.lines.recv()).await
        {
            self.log.push(line);
        }
        status
    }

    /// Still running (not exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub async fn kill(&mut self) {
        self.child.kill().await.expect("SIGKILL");
    }

    pub fn terminate(&self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Collects stdout after exit.
    pub async fn stdout(&mut self) -> String {
        use tokio::io::AsyncReadExt;
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout.read_to_string(&mut out).await.expect("read stdout");
        }
        out
    }
}

/// The environment of a hub process on an embedded broker at `port` and the SQLite
/// file `db`.
pub fn hub_env(port: u16, db: &Path) -> Vec<(&'static str, String)> {
    hub_env_on(port, format!("sqlite://{}", db.display()))
}

/// The environment of a hub process on an embedded broker at `port` and the database
/// `database_url` names.
pub fn hub_env_on(port: u16, database_url: String) -> Vec<(&'static str, String)> {
    vec![
        ("FLEETWATCH_MQTT__LISTEN", format!("127.0.0.1:{port}")),
        ("FLEETWATCH_DATABASE__URL", database_url),
        ("FLEETWATCH_HTTP__LISTEN", "127.0.0.1:0".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_lose_nothing_repeat_nothing_and_respect_the_grace() {
    sigkill_and_restart(Database::Sqlite).await;
}

/// The hub process killed and restarted on one database of the kind `kind` (main.rs
/// runs it on PostgreSQL too).
pub async fn sigkill_and_restart(kind: Database) {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let database = TestDatabase::create(kind).await;
    let port = free_port();
    let url = BrokerUrl::new("127.0.0.1", port);
    let mut env = hub_env_on(port, database.url());
    env.push((
        "FLEETWATCH_HEARTBEAT__OFFLINE_AFTER",
        format!("{}ms", OFFLINE_AFTER.as_millis()),
    ));
    env.push(("FLEETWATCH_HEARTBEAT__CHECK_INTERVAL", "100ms".into()));

    let mut hub = HubProcess::spawn(dir.path(), &[], &env);
    hub.wait_for_line("subscribed to device heartbeats").await;
    let mut watcher = StatusWatcher::connect(&url).await;
    // Alive to the end: dropping it would fire its Will.
    let _beating = sim_device(&url, "keeps-beating", Duration::from_millis(300)).await;
    let quiet = sim_device(&url, "goes-quiet", Duration::from_millis(300)).await;
    let beating_online = watcher
        .expect("keeps-beating", Status::Online, "registered")
        .await;
    watcher
        .expect("goes-quiet", Status::Online, "registered")
        .await;
    quiet.silence().await.expect("silence");
    let quiet_offline = watcher
        .expect("goes-quiet", Status::Offline, "heartbeat_timeout")
        .await;

    hub.kill().await;
    let killed_at = fleetwatch::clock::Clock::new().now();
    drop(watcher);
    // The hub stays down for longer than offline_after: without the startup grace,
    // "keeps-beating" would be declared offline the moment it is back.
    tokio::time::sleep(OFFLINE_AFTER + Duration::from_millis(500)).await;

    let mut hub = HubProcess::spawn(dir.path(), &[], &env);
    hub.wait_for_line("subscribed to device heartbeats").await;
    let mut watcher = StatusWatcher::connect(&url).await;
    // The embedded broker lost its retained messages with the process; the hub
    // republishes each device's current status, same event, same id.
    assert_eq!(
        watcher.next("keeps-beating", PATIENCE).await.event,
        beating_online
    );
    assert_eq!(
        watcher.next("goes-quiet", PATIENCE).await.event,
        quiet_offline
    );
    // And they are retained again: an operator arriving now sees the whole fleet.
    let mut late = StatusWatcher::connect(&url).await;
    for expected in [&beating_online, &quiet_offline] {
        let seen = late.next(expected.device_id.as_str(), PATIENCE).await;
        assert!(seen.retained, "{seen:?}");
        assert_eq!(&seen.event, expected);
    }

    // Through the grace and beyond: the beating device reconnected and never went
    // offline. A broker may deliver a republished status twice to a subscriber that
    // arrives as it is published (at least once, same id); no new event may appear.
    watcher.collect_for(OFFLINE_AFTER * 2).await;
    for (device, known) in [
        ("keeps-beating", &beating_online),
        ("goes-quiet", &quiet_offline),
    ] {
        let unexpected: Vec<_> = watcher
            .unread(device)
            .into_iter()
            .filter(|event| event != known)
            .collect();
        assert_eq!(
            unexpected,
            vec![],
            "{device}: no new event after the restart"
        );
    }
    // The device really was heard again by the new hub.
    let store = fleetwatch::storage::connect(&database.url())
        .await
        .expect("store");
    let heard = store
        .device(&"keeps-beating".parse().expect("id"))
        .await
        .expect("read")
        .and_then(|device| device.last_seen_at);
    assert!(
        heard.is_some_and(|seen| seen > killed_at),
        "last heard {heard:?}, killed at {killed_at}"
    );

    hub.terminate();
    let status = hub.wait().await;
    assert!(
        status.success(),
        "SIGTERM exits 0: {status:?}\n{}",
        hub.log.join("\n")
    );

    // Every committed event was published, and none twice under different ids.
    assert_eq!(store.unpublished(0, 100).await.expect("read"), vec![]);
    for device in ["keeps-beating", "goes-quiet"] {
        let events = store
            .events(&device.parse().expect("id"), None, 100)
            .await
            .expect("read");
        let transitions: Vec<_> = events
            .iter()
            .rev()
            .map(|e| (e.event.previous_status, e.event.status))
            .collect();
        let expected = match device {
            "keeps-beating" => vec![(None, Status::Online)],
            _ => vec![
                (None, Status::Online),
                (Some(Status::Online), Status::Offline),
            ],
        };
        assert_eq!(transitions, expected, "{device}");
    }
}
