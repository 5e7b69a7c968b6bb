//! HTTP heartbeats: what 64 keep-alive connections get from `POST
//! /api/v1/devices/{id}/heartbeat` beside `GET /healthz` of the same hub (a route that
//! writes nothing; it pings the database on each request), the latency at a steady 200
//! requests/s beside the same for `/healthz`, and the hub's CPU per 1,000 heartbeats
//! over HTTP beside over MQTT.
//!
//! The load at 64 connections comes from `wrk` (installed with apt-get if missing), its
//! latencies from wrk's own histogram (a Lua `done` function prints them). wrk cannot
//! hold a rate, so the paced runs use a client of their own here: one request every
//! 5 ms whatever the earlier ones are doing (open loop), each timed from just before it
//! is sent to the last byte of its answer.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use firmware_sim::{Fleet, FleetConfig, QoS, heartbeat_payload};
use serde::Deserialize;
use serde_json::json;
use tokio::process::Command;
use tokio::task::JoinSet;
use tokio::time::{self, Instant, MissedTickBehavior};

use crate::Scale;
use crate::measure::{NEVER, fleet, window};
use crate::procs::{Hub, HubBroker};
use crate::report::{Baseline, Goal, Report};

/// wrk's threads and connections, as issue 12 measured them.
const WRK_THREADS: u32 = 2;
const CONNECTIONS: u32 = 64;
/// The paced runs' rate.
const PACED_PER_S: u64 = 200;
/// Device ids: `http-0000` to `http-9999` for 10,000, the MQTT fleet's ids too.
const PREFIX: &str = "http-";

pub async fn http(dir: &Path, scale: &Scale, report: &mut Report) -> Result<()> {
    ensure_wrk().await?;
    let hub = Hub::start(dir, &dir.join("http.db"), HubBroker::Embedded, NEVER).await?;
    // The devices, and the MQTT fleet that beats for them in the last part.
    let ids = fleet(
        &hub.url,
        PREFIX,
        scale.http_devices,
        scale.ingest_interval,
        scale.ingest_connections,
        QoS::AtLeastOnce,
    );
    let result = measure(dir, scale, report, &hub, &ids).await;
    hub.stop().await?;
    result
}

async fn measure(
    dir: &Path,
    scale: &Scale,
    report: &mut Report,
    hub: &Hub,
    ids: &FleetConfig,
) -> Result<()> {
    let body = heartbeat_payload("http-agent", 86_400, None);
    let client = reqwest::Client::new();
    let started = Instant::now();
    register(&client, hub, ids, &body).await?;
    let registered = hub.get_json("/api/v1/summary").await?["total"]
        .as_u64()
        .unwrap_or(0);
    if registered < scale.http_devices {
        bail!("{registered} of {} devices registered", scale.http_devices);
    }
    println!(
        "   {registered} devices registered by a first HTTP heartbeat each in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // At 64 connections: heartbeats, then /healthz.
    let script = dir.join("http-heartbeat.lua");
    std::fs::write(&script, heartbeat_script(ids, &body)?)?;
    let (cpu0, metrics0) = (hub.proc.cpu_seconds()?, hub.metrics().await?);
    let beats = wrk(hub, &script, "/", scale.http_for).await?;
    let (cpu1, metrics1) = (hub.proc.cpu_seconds()?, hub.metrics().await?);
    let commits = metrics1.get("fleetwatch_flush_batch_rows_count")
        - metrics0.get("fleetwatch_flush_batch_rows_count");
    let committed = metrics1.get("fleetwatch_flush_messages_total")
        - metrics0.get("fleetwatch_flush_messages_total");
    let http_cpu_ms = (cpu1 - cpu0) / beats.ok() * 1e6;
    println!(
        "   heartbeats at {CONNECTIONS} connections: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, \
         {:.1} heartbeats a commit",
        beats.per_s(),
        beats.p50_us / 1e3,
        beats.p99_us / 1e3,
        committed / commits.max(1.0)
    );
    let script = dir.join("http-healthz.lua");
    std::fs::write(&script, healthz_script())?;
    let healthz = wrk(hub, &script, "/healthz", scale.http_for).await?;
    println!(
        "   /healthz at {CONNECTIONS} connections: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
        healthz.per_s(),
        healthz.p50_us / 1e3,
        healthz.p99_us / 1e3
    );

    // At a steady 200/s: heartbeats, then /healthz.
    let cpu0 = hub.proc.cpu_seconds()?;
    let paced_beats = paced(scale.http_paced_for, |n| {
        let id = ids.device_id(n % scale.http_devices);
        client
            .post(format!("{}/api/v1/devices/{id}/heartbeat", hub.http_url()))
            .header("content-type", "application/json")
            .body(body.clone())
    })
    .await?;
    let paced_cpu_ms = (hub.proc.cpu_seconds()? - cpu0) / paced_beats.ok as f64 * 1e6;
    let paced_healthz = paced(scale.http_paced_for, |_| {
        client.get(format!("{}/healthz", hub.http_url()))
    })
    .await?;
    for (what, run) in [("heartbeats", &paced_beats), ("/healthz", &paced_healthz)] {
        println!(
            "   {what} at {PACED_PER_S}/s: p50 {:.2} ms, p99 {:.2} ms over {} requests",
            run.p50_ms(),
            run.p99_ms(),
            run.ok
        );
    }

    // The same devices over MQTT (the embedded broker, QoS 1), as the ingest runs beat.
    let fleet = Fleet::start(ids.clone());
    let mqtt = window(scale, &fleet, Some(&hub.proc), || hub.committed()).await;
    fleet.stop().await;
    let mqtt = mqtt?;
    let Some(mqtt_cpu_per_million) = mqtt.cpu_s_per_million else {
        bail!("no CPU figure for the MQTT run");
    };
    // CPU-seconds per million are CPU-milliseconds per thousand.
    let mqtt_cpu_ms = mqtt_cpu_per_million;
    println!(
        "   MQTT: {:.0} heartbeats/s committed; hub CPU per 1,000: {mqtt_cpu_ms:.1} ms \
         (HTTP at {CONNECTIONS} connections: {http_cpu_ms:.1} ms, at {PACED_PER_S}/s: \
         {paced_cpu_ms:.1} ms)",
        mqtt.per_s
    );

    let healthz_baseline = |what: &str, value: f64, unit: &'static str| Baseline {
        what: format!("GET /healthz {what}, same hub"),
        value,
        unit,
    };
    report.add(
        "http_heartbeat_ratio",
        beats.per_s() / healthz.per_s(),
        "",
        Some(Goal::AtLeast(0.3)),
        Some(healthz_baseline(
            &format!("at {CONNECTIONS} connections"),
            healthz.per_s(),
            "req/s",
        )),
        json!({
            "devices": scale.http_devices,
            "connections": CONNECTIONS,
            "wrk_threads": WRK_THREADS,
            "seconds": scale.http_for.as_secs_f64(),
            "heartbeats_per_s": beats.per_s(),
            "healthz_per_s": healthz.per_s(),
            "heartbeats": beats,
            "healthz": healthz,
            "heartbeats_committed": committed,
            "commits": commits,
            "heartbeats_per_commit": committed / commits.max(1.0),
        }),
    );
    report.add(
        "http_heartbeat_p50_ms",
        beats.p50_us / 1e3,
        "ms",
        Some(Goal::AtMost(5.0)),
        Some(healthz_baseline(
            &format!("p50 at {CONNECTIONS} connections"),
            healthz.p50_us / 1e3,
            "ms",
        )),
        json!({"p90_ms": beats.p90_us / 1e3, "max_ms": beats.max_us / 1e3}),
    );
    report.add(
        "http_heartbeat_p99_ms",
        beats.p99_us / 1e3,
        "ms",
        Some(Goal::AtMost(25.0)),
        Some(healthz_baseline(
            &format!("p99 at {CONNECTIONS} connections"),
            healthz.p99_us / 1e3,
            "ms",
        )),
        json!({"healthz_max_ms": healthz.max_us / 1e3}),
    );
    let paced_detail = |run: &Paced| {
        json!({
            "requests": run.ok,
            "failed": run.failed,
            "p50_ms": run.p50_ms(),
            "p90_ms": run.quantile_ms(0.9),
            "p99_ms": run.p99_ms(),
            "max_ms": run.quantile_ms(1.0),
            "latest_send_behind_schedule_ms": run.behind_ms,
        })
    };
    report.add(
        "http_paced_p50_ms",
        paced_beats.p50_ms(),
        "ms",
        Some(Goal::AtMost(5.0)),
        Some(healthz_baseline(
            &format!("p50 at {PACED_PER_S}/s"),
            paced_healthz.p50_ms(),
            "ms",
        )),
        json!({
            "rate_per_s": PACED_PER_S,
            "seconds": scale.http_paced_for.as_secs_f64(),
            "heartbeats": paced_detail(&paced_beats),
            "healthz": paced_detail(&paced_healthz),
        }),
    );
    report.add(
        "http_paced_p99_ms",
        paced_beats.p99_ms(),
        "ms",
        Some(Goal::AtMost(20.0)),
        Some(healthz_baseline(
            &format!("p99 at {PACED_PER_S}/s"),
            paced_healthz.p99_ms(),
            "ms",
        )),
        json!({}),
    );
    report.add(
        "http_cpu_ms_per_1000",
        http_cpu_ms,
        "cpu-ms",
        None,
        Some(Baseline {
            what: format!(
                "hub CPU per 1,000 MQTT heartbeats (embedded broker, QoS 1, {:.0}/s)",
                mqtt.per_s
            ),
            value: mqtt_cpu_ms,
            unit: "cpu-ms",
        }),
        json!({
            "http_at_connections": CONNECTIONS,
            "http_per_s": beats.per_s(),
            "http_paced_cpu_ms_per_1000": paced_cpu_ms,
            "mqtt_per_s": mqtt.per_s,
            "mqtt_connections": scale.ingest_connections,
            "mqtt_interval_ms": scale.ingest_interval.as_millis(),
        }),
    );
    Ok(())
}

/// Installs wrk from the distribution's packages if it is not on PATH, saying so.
async fn ensure_wrk() -> Result<()> {
    if Command::new("wrk").arg("--version").output().await.is_ok() {
        return Ok(());
    }
    println!("   wrk is not installed: installing it (apt-get install -y wrk)");
    let install = || async {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "wrk"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .await
            .is_ok_and(|s| s.success())
    };
    if install().await {
        return Ok(());
    }
    println!("   apt-get install failed; trying again after apt-get update");
    let updated = Command::new("apt-get")
        .args(["update", "-q"])
        .status()
        .await
        .is_ok_and(|s| s.success());
    if updated && install().await {
        return Ok(());
    }
    bail!("wrk is needed and could not be installed: apt-get install -y wrk")
}

/// Sends each device its first heartbeat, 64 at a time: the hub registers them.
async fn register(
    client: &reqwest::Client,
    hub: &Hub,
    ids: &FleetConfig,
    body: &[u8],
) -> Result<()> {
    let mut senders = JoinSet::new();
    for first in 0..u64::from(CONNECTIONS) {
        let urls: Vec<String> = (first..ids.devices)
            .step_by(CONNECTIONS as usize)
            .map(|n| {
                format!(
                    "{}/api/v1/devices/{}/heartbeat",
                    hub.http_url(),
                    ids.device_id(n)
                )
            })
            .collect();
        let (client, body) = (client.clone(), body.to_vec());
        senders.spawn(async move {
            for url in urls {
                client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await?
                    .error_for_status()?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = senders.join_next().await {
        done??;
    }
    Ok(())
}

/// What wrk's `done` function prints (see [`DONE`]): counts and latencies in µs.
#[derive(Debug, Deserialize, serde::Serialize)]
struct Wrk {
    requests: f64,
    duration_us: f64,
    /// Answers that were not 2xx or 3xx.
    status_errors: f64,
    /// Connect, read, write errors and timeouts.
    socket_errors: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    max_us: f64,
}

impl Wrk {
    /// Requests answered with success.
    fn ok(&self) -> f64 {
        self.requests - self.status_errors
    }

    fn per_s(&self) -> f64 {
        self.ok() / (self.duration_us / 1e6)
    }
}

/// A Lua `done` function that prints wrk's figures as one line of JSON.
const DONE: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH {\"requests\":%.0f,\"duration_us\":%.0f,\"status_errors\":%.0f," ..
    "\"socket_errors\":%.0f,\"p50_us\":%.0f,\"p90_us\":%.0f,\"p99_us\":%.0f,\"max_us\":%.0f}\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"#;

/// POSTs a heartbeat for each device in turn: thread `i` of `n` takes devices `i`,
/// `i + n`, `i + 2n`, ..., so 64 requests in flight are 64 different devices.
fn heartbeat_script(ids: &FleetConfig, body: &[u8]) -> Result<String> {
    let width = ids.device_id(0).len() - PREFIX.len();
    let body = std::str::from_utf8(body).context("the heartbeat payload is not UTF-8")?;
    Ok(format!(
        r#"
local devices, threads = {devices}, {WRK_THREADS}
local headers = {{ ["Content-Type"] = "application/json" }}
local body = [==[{body}]==]
local started = 0
setup = function(thread)
  thread:set("first", started)
  started = started + 1
end
local n = nil
request = function()
  n = (n or first) + threads
  local id = string.format("{PREFIX}%0{width}d", n % devices)
  return wrk.format("POST", "/api/v1/devices/" .. id .. "/heartbeat", headers, body)
end
{DONE}"#,
        devices = ids.devices,
    ))
}

fn healthz_script() -> String {
    DONE.to_string()
}

/// Runs wrk against the hub for `span`, at [`CONNECTIONS`] keep-alive connections.
async fn wrk(hub: &Hub, script: &Path, path: &str, span: Duration) -> Result<Wrk> {
    let output = Command::new("wrk")
        .arg(format!("-t{WRK_THREADS}"))
        .arg(format!("-c{CONNECTIONS}"))
        .arg(format!("-d{}s", span.as_secs().max(1)))
        .arg("--timeout")
        .arg("10s")
        .arg("-s")
        .arg(script)
        .arg(format!("{}{path}", hub.http_url()))
        .output()
        .await
        .context("running wrk")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("BENCH "))
        .with_context(|| format!("wrk printed no figures: {stdout}"))?;
    let figures: Wrk = serde_json::from_str(line)?;
    if figures.ok() <= 0.0 || figures.status_errors > figures.requests / 100.0 {
        bail!("wrk: {figures:?}: more than 1 % of the answers failed");
    }
    Ok(figures)
}

/// Latencies of a paced run, sorted.
struct Paced {
    latencies: Vec<Duration>,
    ok: u64,
    failed: u64,
    /// How far the latest send fell behind its schedule: the client kept the rate.
    behind_ms: f64,
}

impl Paced {
    fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let n = self.latencies.len();
        let index = ((n as f64 * q).ceil() as usize).clamp(1, n) - 1;
        self.latencies[index].as_secs_f64() * 1e3
    }

    fn p50_ms(&self) -> f64 {
        self.quantile_ms(0.5)
    }

    fn p99_ms(&self) -> f64 {
        self.quantile_ms(0.99)
    }
}

/// Sends [`PACED_PER_S`] requests a second for `span`, each on its own task (open loop:
/// a slow answer does not hold back the next request), over the client's keep-alive
/// pool; each timed from just before it is sent to the last byte of its answer.
async fn paced(span: Duration, request: impl Fn(u64) -> reqwest::RequestBuilder) -> Result<Paced> {
    // A few requests first, so the timed ones find open connections.
    for n in 0..8 {
        request(n).send().await?.error_for_status()?;
    }
    let period = Duration::from_secs(1) / PACED_PER_S as u32;
    let total = (span.as_secs_f64() * PACED_PER_S as f64) as u64;
    let mut ticks = time::interval(period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut flying = JoinSet::new();
    let started = Instant::now();
    let mut behind = Duration::ZERO;
    for n in 0..total {
        let scheduled = ticks.tick().await;
        behind = behind.max(scheduled.elapsed());
        let request = request(n);
        flying.spawn(async move {
            let sent = Instant::now();
            let answer = request.send().await?.error_for_status()?;
            answer.bytes().await?;
            anyhow::Ok(sent.elapsed())
        });
    }
    let mut run = Paced {
        latencies: Vec::with_capacity(total as usize),
        ok: 0,
        failed: 0,
        behind_ms: behind.as_secs_f64() * 1e3,
    };
    while let Some(done) = flying.join_next().await {
        match done? {
            Ok(latency) => {
                run.latencies.push(latency);
                run.ok += 1;
            }
            Err(_) => run.failed += 1,
        }
    }
    if run.failed > total / 100 {
        bail!(
            "{} of {total} paced requests failed over {:.1} s",
            run.failed,
            started.elapsed().as_secs_f64()
        );
    }
    run.latencies.sort_unstable();
    Ok(run)
}
