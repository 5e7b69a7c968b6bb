//! Storm grouping: devices in many sites silent at once, `notify.group_by = ["site"]`:
//! how many messages a webhook receives (the goal: one per site) and how long after
//! the last device's deadline the last one arrives (the goal: `group_wait` + 1 s).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use firmware_sim::{Fleet, FleetConfig, QoS};
use serde_json::{Value, json};
use tokio::time::{self, Instant};

use crate::Scale;
use crate::procs::{Hub, HubBroker};
use crate::report::{Baseline, Goal, Report};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const GROUP_WAIT: Duration = Duration::from_secs(10);

/// What one webhook carried, and when it arrived (Unix ms).
struct Arrival {
    at_ms: i64,
    kind: String,
    devices: u64,
    /// The latest `changed_at` among its transitions (Unix ms).
    last_changed_ms: i64,
}

async fn receive(State(seen): State<Arc<Mutex<Vec<Arrival>>>>, body: Bytes) -> StatusCode {
    let at_ms = chrono::Utc::now().timestamp_millis();
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let changed = |event: &Value| {
        event["changed_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map_or(0, |t| t.timestamp_millis())
    };
    let (devices, last_changed_ms) = match body["data"]["events"].as_array() {
        Some(events) => (
            events.len() as u64,
            events.iter().map(changed).max().unwrap_or_default(),
        ),
        None => (1, changed(&body["data"])),
    };
    if let Ok(mut seen) = seen.lock() {
        seen.push(Arrival {
            at_ms,
            kind: body["type"].as_str().unwrap_or_default().to_string(),
            devices,
            last_changed_ms,
        });
    }
    StatusCode::NO_CONTENT
}

pub async fn grouping(dir: &Path, scale: &Scale, report: &mut Report) -> Result<()> {
    let (sites, per_site) = scale.grouping_sites;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let seen: Arc<Mutex<Vec<Arrival>>> = Arc::default();
    let app = axum::Router::new()
        .fallback(receive)
        .with_state(Arc::clone(&seen));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let config = dir.join("grouping.toml");
    std::fs::write(
        &config,
        format!(
            "[notify]\ngroup_by = [\"site\"]\ngroup_threshold = 10\ngroup_wait = \"{}s\"\n\n\
             [[notify.sinks]]\nname = \"ops\"\nkind = \"webhook\"\n\
             url = \"http://{addr}/hooks\"\nsecret = \"{SECRET}\"\n",
            GROUP_WAIT.as_secs()
        ),
    )?;
    let after = scale.storm_offline_after;
    let hub = Hub::start_with(
        dir,
        &dir.join("grouping.db"),
        HubBroker::Embedded,
        after,
        Some(&config),
        &[],
    )
    .await?;
    let fleets: Vec<Fleet> = (0..sites)
        .map(|site| {
            Fleet::start(FleetConfig {
                url: hub.url.clone(),
                devices: per_site,
                interval: Duration::from_secs(1),
                jitter: Duration::from_millis(100),
                id_prefix: format!("s{site:03}-"),
                qos: QoS::AtMostOnce,
                connections: 1,
                error_rate: 0.0,
                lwt: false,
                declare_interval: false,
                labels: vec![("site".into(), format!("site-{site:03}"))],
                parent: None,
            })
        })
        .collect();
    let devices = sites * per_site;
    let deadline = Instant::now() + Duration::from_secs(120);
    while (hub.devices().await? as u64) < devices {
        if Instant::now() > deadline {
            bail!("the fleet did not register");
        }
        time::sleep(Duration::from_millis(200)).await;
    }
    // Every device beats at least once more, then all fall silent together.
    time::sleep(Duration::from_secs(2)).await;
    for fleet in fleets {
        fleet.stop().await;
    }
    let offline_count = |seen: &[Arrival]| -> u64 {
        seen.iter()
            .filter(|a| a.kind.ends_with(".offline"))
            .map(|a| a.devices)
            .sum()
    };
    let deadline = Instant::now() + after + GROUP_WAIT + Duration::from_secs(120);
    loop {
        let told = seen.lock().map(|s| offline_count(&s)).unwrap_or_default();
        if told >= devices {
            break;
        }
        if Instant::now() > deadline {
            bail!("{told} of {devices} devices' offline notified");
        }
        time::sleep(Duration::from_millis(100)).await;
    }
    // Anything late would come within another window.
    time::sleep(GROUP_WAIT + Duration::from_secs(2)).await;
    hub.stop().await?;
    let seen = seen
        .lock()
        .map(|mut s| std::mem::take(&mut *s))
        .unwrap_or_default();
    let offline: Vec<&Arrival> = seen
        .iter()
        .filter(|a| a.kind.ends_with(".offline"))
        .collect();
    let grouped = offline
        .iter()
        .filter(|a| a.kind == "devices.offline")
        .count();
    let last_changed = offline
        .iter()
        .map(|a| a.last_changed_ms)
        .max()
        .unwrap_or_default();
    let last_arrival = offline.iter().map(|a| a.at_ms).max().unwrap_or_default();
    report.add(
        "grouped_messages",
        offline.len() as f64,
        "",
        Some(Goal::AtMost(sites as f64)),
        Some(Baseline {
            what: format!("{devices} devices in {sites} sites silent at once"),
            value: sites as f64,
            unit: "sites",
        }),
        json!({
            "grouped": grouped,
            "single": offline.len() - grouped,
            "devices_told": offline_count(&seen),
            "other_messages": seen.len() - offline.len(),
        }),
    );
    report.add(
        "grouped_last_message_s",
        (last_arrival - last_changed) as f64 / 1e3,
        "s",
        Some(Goal::AtMost(GROUP_WAIT.as_secs_f64() + 1.0)),
        Some(Baseline {
            what: "after the last device's offline; notify.group_wait".into(),
            value: GROUP_WAIT.as_secs_f64(),
            unit: "s",
        }),
        json!({ "offline_after_s": after.as_secs_f64() }),
    );
    Ok(())
}
