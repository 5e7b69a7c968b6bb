//! Notifications: how fast a webhook sink delivers beside a bare client loop to the
//! same receiver, how long an offline storm takes to reach the receiver, and what a
//! receiver that was down for a long while gets when it comes back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use firmware_sim::{Fleet, FleetConfig, QoS};
use serde_json::json;
use tokio::time::{self, Instant};

use crate::Scale;
use crate::procs::{Hub, HubBroker};
use crate::report::{Baseline, Goal, Report};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A webhook receiver that answers at once, with the status it is set to (204 up,
/// 503 down, 400 refusing).
struct Receiver {
    addr: SocketAddr,
    shared: Arc<Received>,
}

#[derive(Default)]
struct Received {
    status: AtomicU16,
    /// Accepted requests by webhook-id, and when each arrived.
    accepted: Mutex<HashMap<String, Vec<Instant>>>,
    /// Every request, accepted or not.
    requests: AtomicU64,
    /// `changed_at` of the earliest transition accepted (Unix ms).
    first_changed_ms: Mutex<Option<i64>>,
}

impl Receiver {
    async fn start(status: u16) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Received::default());
        shared.status.store(status, Relaxed);
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(Arc::clone(&shared));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared })
    }

    fn accepted(&self) -> usize {
        self.shared.accepted.lock().map(|a| a.len()).unwrap_or(0)
    }

    /// (distinct notifications, deliveries, first arrival, last arrival)
    fn tally(&self) -> (usize, usize, Option<Instant>, Option<Instant>) {
        let accepted = self
            .shared
            .accepted
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default();
        let arrivals: Vec<Instant> = accepted.values().flatten().copied().collect();
        (
            accepted.len(),
            arrivals.len(),
            arrivals.iter().min().copied(),
            arrivals.iter().max().copied(),
        )
    }
}

async fn receive(
    State(shared): State<Arc<Received>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    shared.requests.fetch_add(1, Relaxed);
    let status = StatusCode::from_u16(shared.status.load(Relaxed)).unwrap_or(StatusCode::OK);
    if !status.is_success() {
        return status;
    }
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if let Some(changed) = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|b| b["data"]["changed_at"].as_str().map(str::to_string))
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
        && let Ok(mut first) = shared.first_changed_ms.lock()
    {
        let ms = changed.timestamp_millis();
        *first = Some(first.map_or(ms, |f| f.min(ms)));
    }
    if let Ok(mut accepted) = shared.accepted.lock() {
        accepted.entry(id).or_default().push(Instant::now());
    }
    status
}

/// A configuration file with a webhook sink to each receiver, named as given.
fn config(dir: &Path, name: &str, sinks: &[(&str, &Receiver)]) -> Result<std::path::PathBuf> {
    let path = dir.join(format!("{name}.toml"));
    // Each device's transition its own message: this measures delivery, not grouping
    // (bench/src/grouping.rs measures that).
    let text: String = std::iter::once("[notify]\ngroup_threshold = 0\n\n".to_string())
        .chain(sinks.iter().map(|(sink, receiver)| {
            format!(
                "[[notify.sinks]]\nname = \"{sink}\"\nkind = \"webhook\"\n\
                 url = \"http://{}/hooks\"\nsecret = \"{SECRET}\"\n\n",
                receiver.addr
            )
        }))
        .collect();
    std::fs::write(&path, text)?;
    Ok(path)
}

fn fleet(
    url: &firmware_sim::BrokerUrl,
    prefix: &str,
    devices: u64,
    interval: Duration,
    error_rate: f64,
) -> Fleet {
    Fleet::start(FleetConfig {
        url: url.clone(),
        devices,
        interval,
        jitter: interval / 10,
        id_prefix: prefix.into(),
        qos: QoS::AtLeastOnce,
        connections: 10,
        error_rate,
        lwt: false,
        declare_interval: false,
        labels: Vec::new(),
        parent: None,
    })
}

/// A bare client loop's requests/s to the receiver, run in a process of its own as
/// the hub is (this binary again, with `--bare-loop`).
async fn bare_loop_process(receiver: &Receiver, requests: u64) -> Result<f64> {
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--bare-loop")
        .arg(format!("http://{}/bare", receiver.addr))
        .arg("--requests")
        .arg(requests.to_string())
        .output()
        .await?;
    if !output.status.success() {
        bail!(
            "the bare client loop failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().parse()?)
}

/// A bare client loop's requests/s to `url`: the same concurrency a sink uses (16), a
/// body of a webhook's size, each answer read, no database behind it.
pub async fn bare_loop(url: &str, requests: u64) -> Result<f64> {
    let client = reqwest::Client::new();
    let body = Bytes::from(vec![b'x'; 520]);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..16u64 {
        let (client, body, url) = (client.clone(), body.clone(), url.to_string());
        tasks.spawn(async move {
            for i in (worker..requests).step_by(16) {
                client
                    .post(&url)
                    .header("webhook-id", format!("bare-{i}"))
                    .body(body.clone())
                    .send()
                    .await?
                    .bytes()
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(requests as f64 / started.elapsed().as_secs_f64())
}

/// Waits until `done` holds, polling every 100 ms, for at most `limit`.
async fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            bail!("{what} within {limit:?}");
        }
        time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// An offline storm with two webhook sinks. One receiver takes everything at once:
/// the time from the first transition to the last notification received. The other
/// refuses everything (400: dead letters), then takes it, and all its dead letters are
/// queued again at once: deliveries/s from a full queue, beside a bare client loop's.
pub async fn storm(dir: &Path, scale: &Scale, report: &mut Report) -> Result<()> {
    let devices = scale.storm_devices;
    let baseline_rx = Receiver::start(204).await?;
    let bare = bare_loop_process(&baseline_rx, devices.max(5_000)).await?;
    // The same loop inside this process, beside the receiver: printed for comparison
    // with earlier runs, whose baseline it was.
    let bare_in_process = bare_loop(
        &format!("http://{}/bare", baseline_rx.addr),
        devices.max(5_000),
    )
    .await?;

    let live = Receiver::start(204).await?;
    let bulk = Receiver::start(400).await?;
    let config = config(dir, "notify-storm", &[("live", &live), ("bulk", &bulk)])?;
    let after = scale.storm_offline_after;
    let hub = Hub::start_with(
        dir,
        &dir.join("notify-storm.db"),
        HubBroker::Embedded,
        after,
        Some(&config),
        &[],
    )
    .await?;
    let fleet = fleet(&hub.url, "nstorm-", devices, Duration::from_secs(1), 0.0);
    time::sleep(Duration::from_secs(3)).await;
    fleet.finish(Duration::from_secs(10)).await;
    let registered = hub.devices().await? as usize;
    wait_until(
        after + Duration::from_secs(180),
        "every offline notification",
        || live.accepted() >= registered,
    )
    .await?;
    let (distinct, deliveries, _, last) = live.tally();
    let first_changed = live
        .shared
        .first_changed_ms
        .lock()
        .ok()
        .and_then(|f| *f)
        .unwrap_or_default();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let last_ms = last.map_or(now_ms, |l| now_ms - l.elapsed().as_millis() as i64);

    // The refused ones, all dead letters by now, queued again at once.
    let deadline = Instant::now() + Duration::from_secs(60);
    while hub.get_json("/api/v1/sinks").await?["sinks"][1]["dead_letters"].as_u64()
        != Some(registered as u64)
    {
        if Instant::now() > deadline {
            bail!("the bulk sink's notifications did not all become dead letters");
        }
        time::sleep(Duration::from_millis(100)).await;
    }
    bulk.shared.status.store(204, Relaxed);
    let cpu_before = hub.proc.cpu_seconds()?;
    let started = Instant::now();
    hub.post("/api/v1/sinks/bulk/dead-letters/retry").await?;
    wait_until(
        Duration::from_secs(300),
        "the retried notifications",
        || bulk.accepted() >= registered,
    )
    .await?;
    let hub_cpu = hub.proc.cpu_seconds()? - cpu_before;
    let (bulk_distinct, _, _, bulk_last) = bulk.tally();
    let drained = bulk_last.map_or(f64::NAN, |l| l.duration_since(started).as_secs_f64());
    let rate = bulk_distinct as f64 / drained;
    hub.stop().await?;
    report.add(
        "notify_delivery_ratio",
        rate / bare,
        "",
        Some(Goal::AtLeast(0.8)),
        Some(Baseline {
            what: "bare client loop (own process) to the same receiver, 16 at a time".into(),
            value: bare,
            unit: "req/s",
        }),
        json!({
            "deliveries_per_s": rate,
            "notifications": bulk_distinct,
            "drained_s": drained,
            "hub_cpu_ms_per_1000": hub_cpu * 1e6 / bulk_distinct as f64,
            "bare_in_process_per_s": bare_in_process,
        }),
    );
    report.add(
        "notify_storm_s",
        (last_ms - first_changed) as f64 / 1e3,
        "s",
        None,
        Some(Baseline {
            what: format!("{devices} devices silent at once; offline_after"),
            value: after.as_secs_f64(),
            unit: "s",
        }),
        json!({
            "devices": registered,
            "receiver_requests": live.shared.requests.load(Relaxed),
            "deliveries": deliveries,
            "duplicates": deliveries - distinct,
        }),
    );
    Ok(())
}

/// A receiver down (503) through a flapping load, then up: what it gets.
pub async fn outage(dir: &Path, scale: &Scale, report: &mut Report) -> Result<()> {
    let receiver = Receiver::start(503).await?;
    let config = config(dir, "notify-outage", &[("bench", &receiver)])?;
    let db = dir.join("notify-outage.db");
    let hub = Hub::start_with(
        dir,
        &db,
        HubBroker::Embedded,
        // Nobody goes offline: the flapping is error and recovery.
        Duration::from_secs(3600),
        Some(&config),
        &[],
    )
    .await?;
    let (devices, interval) = (scale.outage_devices, scale.outage_interval);
    let fleet = fleet(&hub.url, "flap-", devices, interval, 0.1);
    time::sleep(scale.outage_for).await;
    let backlog_at_up = hub.get_json("/api/v1/sinks").await?["sinks"][0]["backlog"]
        .as_u64()
        .unwrap_or(0);
    let refused = receiver.shared.requests.load(Relaxed);
    receiver.shared.status.store(204, Relaxed);
    let up = Instant::now();
    fleet.finish(Duration::from_secs(10)).await;
    hub.settle(Duration::from_secs(30)).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let backlog = hub.get_json("/api/v1/sinks").await?["sinks"][0]["backlog"]
            .as_u64()
            .unwrap_or(u64::MAX);
        if backlog == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{backlog} notifications still waiting 600 s after the receiver came back");
        }
        time::sleep(Duration::from_millis(250)).await;
    }
    let drained = up.elapsed().as_secs_f64();
    hub.stop().await?;

    // What should have arrived: every alarm transition in the hub's own log.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await?;
    let expected: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM status_events WHERE status IN ('offline', 'error') \
         OR (status = 'online' AND previous_status IN ('offline', 'error'))",
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    let (distinct, deliveries, _, _) = receiver.tally();
    let lost = (expected as f64 - distinct as f64).max(0.0);
    report.add(
        "notify_outage_lost",
        lost,
        "",
        Some(Goal::AtMost(0.0)),
        Some(Baseline {
            what: "notifications the transitions called for".into(),
            value: expected as f64,
            unit: "",
        }),
        json!({ "delivered": distinct, "refused_attempts_while_down": refused }),
    );
    report.add(
        "notify_outage_duplicates",
        (deliveries - distinct) as f64,
        "",
        Some(Goal::AtMost(0.0)),
        None,
        json!({ "deliveries": deliveries }),
    );
    report.add(
        "notify_outage_drain_s",
        drained,
        "s",
        None,
        Some(Baseline {
            what: format!(
                "receiver down {} s under {devices} flapping devices; backlog when it came back",
                scale.outage_for.as_secs()
            ),
            value: backlog_at_up as f64,
            unit: "notifications",
        }),
        json!({ "retry_max_s": 60 }),
    );
    Ok(())
}
