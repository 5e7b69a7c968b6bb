//! Per-device deadlines at fleet scale: a hub holding `deadline_devices` devices whose
//! `offline_after` is spread evenly from 10 s to 1 h (each declared as an interval in
//! its heartbeats, three missed beats), silent from one moment on, so over the
//! window every device whose deadline falls in it goes offline. Measured: how late
//! each offline event is past its own deadline, and the offline check's cost per
//! pass, beside the same deadlines reached through one fleet-wide `offline_after`
//! (the same database, the same hub, every device's last heartbeat moved instead).
//!
//! The database is written through the hub's own store (`SqliteStore::apply`), then
//! moved forward in time with one UPDATE so the deadlines start just after the hub is
//! up: writing a million devices takes longer than the shortest deadline.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use firmware_sim::QoS;
use fleetwatch::clock::Timestamp;
use fleetwatch::deadline::Deadlines;
use fleetwatch::device::DeviceId;
use fleetwatch::registration::NewDevices;
use fleetwatch::storage::Store;
use fleetwatch::storage::sqlite::SqliteStore;
use fleetwatch::update::{Batch, Heartbeat};
use serde_json::json;
use tokio::time::{self, Instant};

use crate::Scale;
use crate::listen::listen;
use crate::measure::quantile;
use crate::procs::{Hub, HubBroker, Mosquitto};
use crate::report::{Baseline, Goal, Report};

/// The shortest and longest `offline_after` in the fleet.
const SHORTEST: Duration = Duration::from_secs(10);
const LONGEST: Duration = Duration::from_secs(3600);
/// Devices written per `apply`.
const BATCH: usize = 20_000;
/// The fleet-wide `offline_after` of the comparison run.
const GLOBAL: Duration = Duration::from_secs(10);

/// Device `i`'s `offline_after` in ms: even steps from [`SHORTEST`] to [`LONGEST`].
fn offline_after_ms(i: u64, devices: u64) -> i64 {
    let span = (LONGEST - SHORTEST).as_millis() as u64;
    (SHORTEST.as_millis() as u64 + i * span / devices.max(1)) as i64
}

fn device_id(i: u64) -> String {
    format!("dl-{i:07}")
}

fn index_of(id: &str) -> Option<u64> {
    id.strip_prefix("dl-")?.parse().ok()
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Each device declares its interval: its own deadline.
    Mixed,
    /// No device declares anything; last heartbeats are placed so that the fleet's
    /// one `offline_after` gives every device the same deadline as in `Mixed`.
    Global,
}

struct Run {
    /// Milliseconds past each device's own deadline that its offline event arrived.
    lags: Vec<i64>,
    check_mean_ms: f64,
    passes: f64,
    rss: u64,
    written_per_s: f64,
}

pub async fn deadlines(dir: &Path, scale: &Scale, report: &mut Report) -> Result<()> {
    let devices = scale.deadline_devices;
    let mosquitto = Mosquitto::start(dir).await?;
    let empty = Hub::start(
        dir,
        &dir.join("deadlines-empty.db"),
        HubBroker::External(&mosquitto.url),
        GLOBAL,
    )
    .await?;
    time::sleep(Duration::from_millis(500)).await;
    let rss_empty = empty.proc.rss_bytes()?;
    empty.stop().await?;
    mosquitto.stop().await?;
    let mixed = run(dir, scale, Mode::Mixed).await?;
    let global = run(dir, scale, Mode::Global).await?;

    let p99 = |lags: &[i64]| quantile(lags, 0.99) as f64 / 1e3;
    report.add(
        "detect_lag_p99_mixed_deadlines_s",
        p99(&mixed.lags),
        "s",
        Some(Goal::AtMost(1.0)),
        Some(Baseline {
            what: "the same deadlines through one global offline_after".into(),
            value: p99(&global.lags),
            unit: "s",
        }),
        json!({
            "devices": devices,
            "offline_after": "10 s to 1 h, evenly spread",
            "window_s": scale.deadline_window.as_secs(),
            "offline_events": mixed.lags.len(),
            "p50_ms": quantile(&mixed.lags, 0.5),
            "p99_ms": quantile(&mixed.lags, 0.99),
            "max_ms": mixed.lags.last(),
            "global_p50_ms": quantile(&global.lags, 0.5),
            "global_p99_ms": quantile(&global.lags, 0.99),
            "written_devices_per_s": mixed.written_per_s,
        }),
    );
    report.add(
        "check_pass_mixed_vs_global",
        mixed.check_mean_ms / global.check_mean_ms.max(1e-6),
        "",
        Some(Goal::AtMost(1.5)),
        Some(Baseline {
            what: "mean offline-check pass, one global offline_after".into(),
            value: global.check_mean_ms,
            unit: "ms",
        }),
        json!({
            "devices": devices,
            "mixed_mean_ms": mixed.check_mean_ms,
            "global_mean_ms": global.check_mean_ms,
            "mixed_passes": mixed.passes,
            "global_passes": global.passes,
        }),
    );
    report.add(
        "rss_bytes_per_device_mixed_deadlines",
        (mixed.rss as f64 - rss_empty as f64) / devices as f64,
        "B",
        Some(Goal::AtMost(500.0)),
        Some(Baseline {
            what: "RSS of a hub with no devices".into(),
            value: rss_empty as f64,
            unit: "B",
        }),
        json!({"devices": devices, "rss_empty": rss_empty, "rss_mixed": mixed.rss}),
    );
    Ok(())
}

/// Writes the fleet, starts a hub on it (on a Mosquitto of its own: the other run's
/// retained statuses would be heard again) and records the window's offline events.
async fn run(dir: &Path, scale: &Scale, mode: Mode) -> Result<Run> {
    let devices = scale.deadline_devices;
    let name = match mode {
        Mode::Mixed => "mixed",
        Mode::Global => "global",
    };
    let db = dir.join(format!("deadlines-{name}.db"));
    let url = format!("sqlite://{}", db.display());
    let hub_offline_after = match mode {
        Mode::Mixed => Duration::from_secs(180),
        Mode::Global => GLOBAL,
    };
    // Written with deadlines counted from 0; moved to start at `origin` afterwards.
    let started = Instant::now();
    {
        let store = SqliteStore::open(
            &url,
            Deadlines {
                default: hub_offline_after,
                missed_beats: 3,
                rules: Vec::new(),
            },
        )
        .await?;
        let mut batch = Batch::default();
        for i in 0..devices {
            let offline_after = offline_after_ms(i, devices);
            let (seen, interval) = match mode {
                Mode::Mixed => (0, Some(Duration::from_millis(offline_after as u64 / 3))),
                Mode::Global => (offline_after - GLOBAL.as_millis() as i64, None),
            };
            batch.add_heartbeat(
                DeviceId::parse(&device_id(i))?,
                Timestamp::from_unix_millis(seen),
                Heartbeat {
                    healthy: true,
                    interval,
                    ..Heartbeat::default()
                },
            );
            if batch.len() >= BATCH {
                store.apply(&batch.take(), NewDevices::UNLIMITED).await?;
            }
        }
        store.apply(&batch.take(), NewDevices::UNLIMITED).await?;
    }
    let written_per_s = devices as f64 / started.elapsed().as_secs_f64();
    // The registrations are history: mark them published, so the hub starts with an
    // empty outbox, and move every time forward so deadlines begin at `origin`.
    let origin = chrono::Utc::now().timestamp_millis() + scale.deadline_lead.as_millis() as i64;
    shift(&url, origin).await?;
    let mosquitto = Mosquitto::start(dir).await?;
    let listener = listen(&mosquitto.url, "devices/+/status", QoS::AtLeastOnce, true).await?;
    let hub = Hub::start(
        dir,
        &db,
        HubBroker::External(&mosquitto.url),
        hub_offline_after,
    )
    .await?;
    let up_ms = chrono::Utc::now().timestamp_millis();
    if up_ms >= origin {
        bail!(
            "the hub was up {} ms after the first deadlines began: raise deadline_lead",
            up_ms - origin
        );
    }
    let samples = hub.metrics().await?;
    let (sum0, count0) = (
        samples.get("fleetwatch_check_duration_seconds_sum"),
        samples.get("fleetwatch_check_duration_seconds_count"),
    );
    let end = origin + scale.deadline_window.as_millis() as i64;
    time::sleep(Duration::from_millis(
        (end - chrono::Utc::now().timestamp_millis()).max(0) as u64,
    ))
    .await;
    let samples = hub.metrics().await?;
    let (sum1, count1) = (
        samples.get("fleetwatch_check_duration_seconds_sum"),
        samples.get("fleetwatch_check_duration_seconds_count"),
    );
    let rss = hub.proc.rss_bytes()?;
    // Every device whose deadline passed a second before the window's end must be
    // offline by now (its event on the way or in).
    let due = (0..devices)
        .filter(|&i| origin + offline_after_ms(i, devices) < end - 1_000)
        .count();
    let wait = Instant::now() + Duration::from_secs(10);
    while listener.heard.offline_count() < due && Instant::now() < wait {
        time::sleep(Duration::from_millis(100)).await;
    }
    hub.stop().await?;
    mosquitto.stop().await?;
    let mut lags: Vec<i64> = listener
        .heard
        .offline()
        .iter()
        .filter_map(|e| {
            let i = index_of(&e.device_id)?;
            Some(e.arrived_ms - (origin + offline_after_ms(i, devices)))
        })
        .collect();
    if lags.len() < due {
        bail!(
            "{name}: {} of {due} due devices reported offline",
            lags.len()
        );
    }
    lags.sort_unstable();
    let passes = count1 - count0;
    let check_mean_ms = (sum1 - sum0) / passes.max(1.0) * 1e3;
    println!(
        "   {name}: {devices} devices written at {written_per_s:.0}/s; {} offline in {:?}: \
         lag p50 {} ms p99 {} ms; {passes:.0} passes of {check_mean_ms:.2} ms on average",
        lags.len(),
        scale.deadline_window,
        quantile(&lags, 0.5),
        quantile(&lags, 0.99),
    );
    Ok(Run {
        lags,
        check_mean_ms,
        passes,
        rss,
        written_per_s,
    })
}

/// Moves every stored time forward by `origin` (they were written counted from 0) and
/// marks the registration events published.
async fn shift(url: &str, origin: i64) -> Result<()> {
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(SqliteStore::options(url)?)
        .await?;
    sqlx::query(
        "UPDATE devices SET last_seen_at = last_seen_at + ?1, first_seen_at = first_seen_at + ?1, \
         status_changed_at = status_changed_at + ?1, registered_at = registered_at + ?1, \
         deadline_at = deadline_at + ?1",
    )
    .bind(origin)
    .execute(&pool)
    .await?;
    sqlx::query(
        "UPDATE status_events SET published_at = ?1, changed_at = changed_at + ?1, \
         last_seen_at = last_seen_at + ?1",
    )
    .bind(origin)
    .execute(&pool)
    .await?;
    pool.close().await;
    Ok(())
}
