//! The measurements. Each starts what it needs (Mosquitto, the hub, a firmware-sim
//! fleet in this process), takes its figures and stops everything again.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{Result, bail};
use firmware_sim::{BrokerUrl, Fleet, FleetConfig, QoS};
use fleetwatch::mqtt::broker::EmbeddedBroker;
use fleetwatch::mqtt::broker_packet_limit;
use serde_json::json;
use tokio::time::{self, Instant};

use crate::listen::{Heard, Offline, listen};
use crate::procs::{Hub, HubBroker, Mosquitto, Proc, free_port};
use crate::report::{Baseline, Goal, Report};
use crate::{Scale, db, pgdb};

/// `offline_after` where a measurement wants no device to go offline.
pub(crate) const NEVER: Duration = Duration::from_secs(3600);
/// The hub's default `heartbeat.max_payload`, for the embedded baseline broker.
const MAX_PAYLOAD: usize = 65_536;

pub(crate) fn fleet(
    url: &BrokerUrl,
    prefix: &str,
    devices: u64,
    interval: Duration,
    connections: u64,
    qos: QoS,
) -> FleetConfig {
    FleetConfig {
        url: url.clone(),
        devices,
        interval,
        jitter: Duration::ZERO,
        id_prefix: prefix.into(),
        qos,
        connections,
        error_rate: 0.0,
        lwt: false,
        declare_interval: false,
        labels: Vec::new(),
        parent: None,
    }
}

fn qos_name(qos: QoS) -> u8 {
    match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

fn leak(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

/// A rate over a window, and the CPU a process spent per million of it.
pub(crate) struct Rate {
    pub(crate) per_s: f64,
    pub(crate) cpu_s_per_million: Option<f64>,
    pub(crate) offered_per_s: f64,
}

/// Counts over the window: `count` is sampled at its start and end.
pub(crate) async fn window<F, Fut>(
    scale: &Scale,
    fleet: &Fleet,
    proc: Option<&Proc>,
    mut count: F,
) -> Result<Rate>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<f64>>,
{
    time::sleep(scale.warmup).await;
    let (c0, sent0, cpu0) = (count().await?, fleet.stats.sent.load(Relaxed), cpu(proc)?);
    let started = Instant::now();
    time::sleep(scale.window).await;
    let (c1, sent1, cpu1) = (count().await?, fleet.stats.sent.load(Relaxed), cpu(proc)?);
    let secs = started.elapsed().as_secs_f64();
    let n = c1 - c0;
    if n <= 0.0 {
        bail!("nothing arrived during the measurement window");
    }
    Ok(Rate {
        per_s: n / secs,
        cpu_s_per_million: cpu0.zip(cpu1).map(|(a, b)| (b - a) / n * 1e6),
        offered_per_s: (sent1 - sent0) as f64 / secs,
    })
}

fn cpu(proc: Option<&Proc>) -> Result<Option<f64>> {
    proc.map(Proc::cpu_seconds).transpose()
}

pub(crate) fn ingest_fleet(url: &BrokerUrl, offered: u64, qos: QoS, scale: &Scale) -> Fleet {
    let devices = (offered as f64 * scale.ingest_interval.as_secs_f64()) as u64;
    Fleet::start(fleet(
        url,
        "ingest-",
        devices,
        scale.ingest_interval,
        scale.ingest_connections,
        qos,
    ))
}

/// The broker's drain rate to a subscriber that only counts.
async fn drain(
    url: &BrokerUrl,
    qos: QoS,
    broker: Option<&Proc>,
    offered: u64,
    scale: &Scale,
) -> Result<Rate> {
    let listener = listen(url, "devices/+/heartbeat", qos, false).await?;
    let fleet = ingest_fleet(url, offered, qos, scale);
    let heard = &listener.heard;
    let rate = window(scale, &fleet, broker, || async {
        Ok(heard.messages.load(Relaxed) as f64)
    })
    .await;
    fleet.stop().await;
    rate
}

/// Heartbeats per second the hub commits from the same fleet.
async fn commit(hub: &Hub, qos: QoS, offered: u64, scale: &Scale) -> Result<Rate> {
    let fleet = ingest_fleet(&hub.url, offered, qos, scale);
    let rate = window(scale, &fleet, Some(&hub.proc), || hub.committed()).await;
    fleet.stop().await;
    rate
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum BrokerKind {
    Mosquitto,
    Embedded,
}

/// The best rate over a ramp of offered rates.
#[derive(Default)]
struct Best(Option<(u64, Rate)>);

impl Best {
    /// Records one step; true when it got at least 90 % of what was offered.
    fn record(&mut self, offered: u64, rate: Rate) -> bool {
        let kept_up = rate.per_s >= 0.9 * offered as f64;
        if self
            .0
            .as_ref()
            .is_none_or(|(_, best)| rate.per_s > best.per_s)
        {
            self.0 = Some((offered, rate));
        }
        kept_up
    }

    fn take(self) -> Result<(u64, Rate)> {
        self.0
            .ok_or_else(|| anyhow::anyhow!("no ingest rates configured"))
    }
}

/// One drain step on a fresh broker of `kind`.
pub(crate) async fn broker_drain(
    dir: &Path,
    kind: BrokerKind,
    qos: QoS,
    offered: u64,
    scale: &Scale,
) -> Result<Rate> {
    match kind {
        BrokerKind::Mosquitto => {
            let mosquitto = Mosquitto::start(dir).await?;
            let rate = drain(&mosquitto.url, qos, Some(&mosquitto.proc), offered, scale).await;
            mosquitto.stop().await?;
            rate
        }
        BrokerKind::Embedded => {
            let port = free_port()?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            // rumqttd cannot be stopped; this one idles once its clients have left.
            let _broker =
                EmbeddedBroker::start(addr, broker_packet_limit(MAX_PAYLOAD), None).await?;
            drain(
                &BrokerUrl::new("127.0.0.1", port),
                qos,
                None,
                offered,
                scale,
            )
            .await
        }
    }
}

/// One commit step: a fresh hub (and, for Mosquitto, a fresh broker) on database `db`.
async fn hub_commit(
    dir: &Path,
    db: &Path,
    kind: BrokerKind,
    qos: QoS,
    offered: u64,
    scale: &Scale,
) -> Result<Rate> {
    match kind {
        BrokerKind::Mosquitto => {
            let mosquitto = Mosquitto::start(dir).await?;
            let hub = Hub::start(dir, db, HubBroker::External(&mosquitto.url), NEVER).await?;
            let rate = commit(&hub, qos, offered, scale).await;
            hub.stop().await?;
            mosquitto.stop().await?;
            rate
        }
        BrokerKind::Embedded => {
            let hub = Hub::start(dir, db, HubBroker::Embedded, NEVER).await?;
            let rate = commit(&hub, qos, offered, scale).await;
            hub.stop().await?;
            rate
        }
    }
}

/// Raises the offered rate until the broker, fresh each time, no longer delivers 90 %
/// of it to a counting subscriber. Returns the best drain and the rate offered for it.
async fn find_drain(dir: &Path, kind: BrokerKind, qos: QoS, scale: &Scale) -> Result<(u64, Rate)> {
    let mut best = Best::default();
    for &offered in &scale.ingest_rates {
        let rate = broker_drain(dir, kind, qos, offered, scale).await?;
        println!(
            "   {} QoS {} drain at {offered}/s offered: {:.0}/s",
            name(kind),
            qos_name(qos),
            rate.per_s
        );
        if !best.record(offered, rate) {
            break;
        }
    }
    best.take()
}

fn name(kind: BrokerKind) -> &'static str {
    match kind {
        BrokerKind::Mosquitto => "Mosquitto",
        BrokerKind::Embedded => "embedded broker",
    }
}

pub async fn ingest(dir: &Path, scale: &Scale, report: &mut Report) -> Result<()> {
    for (kind, qos, key, goal) in [
        (
            BrokerKind::Mosquitto,
            QoS::AtLeastOnce,
            "ingest_ratio_mosquitto_qos1",
            0.8,
        ),
        (
            BrokerKind::Embedded,
            QoS::AtLeastOnce,
            "ingest_ratio_embedded_qos1",
            0.8,
        ),
        (
            BrokerKind::Mosquitto,
            QoS::AtMostOnce,
            "ingest_ratio_mosquitto_qos0",
            0.5,
        ),
    ] {
        let (offered, baseline) = find_drain(dir, kind, qos, scale).await?;
        // The hub is offered the same rates from the baseline's best downwards, each on
        // a fresh broker and database, until it keeps up; its best commit rate counts.
        let mut best = Best::default();
        for &step in scale.ingest_rates.iter().rev().filter(|&&r| r <= offered) {
            let db = dir.join(format!("{key}-{step}.db"));
            let rate = hub_commit(dir, &db, kind, qos, step, scale).await?;
            println!("   hub at {step}/s offered: {:.0}/s committed", rate.per_s);
            if best.record(step, rate) {
                break;
            }
        }
        let (hub_offered, hub_rate) = best.take()?;
        report.add(
            key,
            hub_rate.per_s / baseline.per_s,
            "",
            Some(Goal::AtLeast(goal)),
            Some(Baseline {
                what: format!(
                    "{} drain to a counting subscriber, QoS {}",
                    name(kind),
                    qos_name(qos)
                ),
                value: baseline.per_s,
                unit: "msg/s",
            }),
            json!({
                "baseline_offered_per_s": offered,
                "hub_offered_per_s": hub_offered,
                "hub_committed_per_s": hub_rate.per_s,
                "broker_drain_per_s": baseline.per_s,
                "sent_per_s_during_hub_run": hub_rate.offered_per_s,
                "sent_per_s_during_baseline": baseline.offered_per_s,
            }),
        );
        if kind == BrokerKind::Mosquitto && qos == QoS::AtLeastOnce {
            let (Some(hub_cpu), Some(mosquitto_cpu)) =
                (hub_rate.cpu_s_per_million, baseline.cpu_s_per_million)
            else {
                bail!("no CPU figures");
            };
            report.add(
                "cpu_ratio",
                hub_cpu / mosquitto_cpu,
                "",
                Some(Goal::AtMost(1.5)),
                Some(Baseline {
                    what: "Mosquitto CPU per million drained (QoS 1)".into(),
                    value: mosquitto_cpu,
                    unit: "cpu-s",
                }),
                json!({
                    "hub_cpu_s_per_million_committed": hub_cpu,
                    "mosquitto_cpu_s_per_million_drained": mosquitto_cpu,
                }),
            );
        }
    }
    Ok(())
}

pub async fn db(dir: &Path, scale: &Scale, report: &mut Report) -> Result<()> {
    let figures = db::measure(dir, scale.db_devices, scale.db_batch, scale.db_each).await?;
    report.add(
        "db_ratio",
        figures.hub_rows_per_s / figures.bare_rows_per_s,
        "",
        Some(Goal::AtLeast(0.7)),
        Some(Baseline {
            what: format!("bare batched upsert, {} rows a transaction", scale.db_batch),
            value: figures.bare_rows_per_s,
            unit: "rows/s",
        }),
        json!({
            "hub_rows_per_s": figures.hub_rows_per_s,
            "bare_rows_per_s": figures.bare_rows_per_s,
            "devices": scale.db_devices,
            "batch": scale.db_batch,
        }),
    );
    report.add(
        "db_labelled_ratio",
        figures.labelled_rows_per_s / figures.hub_rows_per_s,
        "",
        None,
        Some(Baseline {
            what: "the same heartbeats without labels or rules".into(),
            value: figures.hub_rows_per_s,
            unit: "rows/s",
        }),
        json!({
            "labelled_rows_per_s": figures.labelled_rows_per_s,
            "hub_rows_per_s": figures.hub_rows_per_s,
            "rules": 1,
            "labels_per_heartbeat": 2,
            "open_with_another_rule_s": figures.rematch_changed_s,
            "open_with_the_same_rules_s": figures.rematch_same_s,
        }),
    );
    Ok(())
}

pub async fn pgdb(admin: &str, scale: &Scale, report: &mut Report) -> Result<()> {
    let figures = pgdb::measure(admin, scale.db_devices, scale.db_batch, scale.db_each).await?;
    let (hub, bare) = (&figures.hub, &figures.bare);
    // Microseconds per row written.
    let per_row = |seconds: f64, phase: &pgdb::Phase| seconds * 1e6 / phase.rows(scale.db_devices);
    let server = |phase: &pgdb::Phase| {
        phase
            .server_cpu_s
            .map_or("?".to_string(), |s| format!("{:.1}", per_row(s, phase)))
    };
    for (name, phase) in [("PgStore::apply", hub), ("bare UNNEST upsert", bare)] {
        println!(
            "   {name}: {:.0} rows/s ({} rounds in {:.1} s); per row: {:.1} µs, CPU {:.1} µs \
             here and {} µs in PostgreSQL, {:.0} B of WAL",
            phase.timed.rows_per_s,
            phase.timed.rounds,
            phase.timed.seconds,
            1e6 / phase.timed.rows_per_s,
            per_row(phase.client_cpu_s, phase),
            server(phase),
            phase.wal_bytes / phase.rows(scale.db_devices),
        );
    }
    let phase_detail = |phase: &pgdb::Phase| {
        json!({
            "rows_per_s": phase.timed.rows_per_s,
            "rounds": phase.timed.rounds,
            "seconds": phase.timed.seconds,
            "client_cpu_us_per_row": per_row(phase.client_cpu_s, phase),
            "server_cpu_us_per_row": phase.server_cpu_s.map(|s| per_row(s, phase)),
            "wal_bytes_per_row": phase.wal_bytes / phase.rows(scale.db_devices),
            "checkpoint_before": phase.checkpointed,
        })
    };
    report.add(
        "pg_db_ratio",
        hub.timed.rows_per_s / bare.timed.rows_per_s,
        "",
        Some(Goal::AtLeast(0.7)),
        Some(Baseline {
            what: format!(
                "bare UNNEST upsert, {} rows a transaction, {} devices",
                scale.db_batch, scale.db_devices
            ),
            value: bare.timed.rows_per_s,
            unit: "rows/s",
        }),
        json!({
            "hub_rows_per_s": hub.timed.rows_per_s,
            "bare_rows_per_s": bare.timed.rows_per_s,
            "devices": scale.db_devices,
            "batch": scale.db_batch,
            "server_version": figures.server_version,
            "hub": phase_detail(hub),
            "bare": phase_detail(bare),
        }),
    );
    Ok(())
}

pub async fn coalescing(dir: &Path, scale: &Scale, report: &mut Report) -> Result<()> {
    // Triggers count every row written to `devices`, whatever statement writes it.
    let db = dir.join("coalescing.db");
    let url = format!("sqlite://{}", db.display());
    drop(fleetwatch::storage::sqlite::SqliteStore::connect(&url).await?);
    let pool = sqlx::SqlitePool::connect(&url).await?;
    for statement in [
        "CREATE TABLE bench_writes (n INTEGER NOT NULL)",
        "INSERT INTO bench_writes VALUES (0)",
        "CREATE TRIGGER bench_count_inserts AFTER INSERT ON devices BEGIN UPDATE bench_writes SET n = n + 1; END",
        "CREATE TRIGGER bench_count_updates AFTER UPDATE ON devices BEGIN UPDATE bench_writes SET n = n + 1; END",
    ] {
        sqlx::query(statement).execute(&pool).await?;
    }

    let hub = Hub::start(dir, &db, HubBroker::Embedded, NEVER).await?;
    let config = fleet(
        &hub.url,
        "coalesce-",
        scale.coalescing_devices,
        scale.coalescing_interval,
        4,
        QoS::AtLeastOnce,
    );
    let fleet = Fleet::start(config);
    time::sleep(scale.warmup + scale.window).await;
    fleet.finish(Duration::from_secs(10)).await;
    let messages = hub.settle(Duration::from_secs(20)).await?;
    let metrics = hub.metrics().await?;
    let distinct = metrics.get("fleetwatch_flush_batch_rows_sum");
    let flushes = metrics.get("fleetwatch_flush_batch_rows_count");
    let rows: i64 = sqlx::query_scalar("SELECT n FROM bench_writes")
        .fetch_one(&pool)
        .await?;
    hub.stop().await?;
    pool.close().await;
    if distinct <= 0.0 {
        bail!("the hub committed no batch");
    }
    report.add(
        "coalescing",
        rows as f64 / distinct,
        "",
        Some(Goal::AtMost(1.05)),
        Some(Baseline {
            what: "distinct devices heard, summed over flushes".into(),
            value: distinct,
            unit: "rows",
        }),
        json!({
            "device_rows_written": rows,
            "distinct_devices_per_flush_summed": distinct,
            "flushes": flushes,
            "heartbeats_committed": messages,
            "heartbeats_per_row": messages / rows.max(1) as f64,
        }),
    );
    Ok(())
}

/// Lags past each device's deadline, in milliseconds, sorted.
pub(crate) fn lags_ms(events: &[Offline], offline_after: Duration) -> Vec<i64> {
    let mut lags: Vec<i64> = events
        .iter()
        .map(|e| e.arrived_ms - e.last_seen_ms - offline_after.as_millis() as i64)
        .collect();
    lags.sort_unstable();
    lags
}

pub(crate) fn quantile(sorted: &[i64], q: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

/// Runs a fleet against a hub on Mosquitto for `run_for`, stops it, and waits for
/// every device's offline event on `devices/+/status`.
async fn silence(
    dir: &Path,
    prefix: &str,
    config: (u64, Duration, u64),
    run_for: Duration,
    offline_after: Duration,
) -> Result<Vec<Offline>> {
    let (devices, interval, connections) = config;
    let mosquitto = Mosquitto::start(dir).await?;
    let hub = Hub::start(
        dir,
        &dir.join(format!("{prefix}.db")),
        HubBroker::External(&mosquitto.url),
        offline_after,
    )
    .await?;
    let listener = listen(&mosquitto.url, "devices/+/status", QoS::AtLeastOnce, true).await?;
    let fleet = Fleet::start(fleet(
        &mosquitto.url,
        prefix,
        devices,
        interval,
        connections,
        QoS::AtLeastOnce,
    ));
    time::sleep(run_for).await;
    fleet.finish(Duration::from_secs(10)).await;
    // A device scheduled at the very end of the run may not have been heard at all:
    // wait for the offline events of the devices the hub registered.
    hub.settle(Duration::from_secs(30)).await?;
    let events = all_offline(&listener.heard, &hub, devices, offline_after).await?;
    hub.stop().await?;
    mosquitto.stop().await?;
    Ok(events)
}

/// Once the fleet has stopped and `hub` settled: every offline event of the devices
/// the hub registered (at least 99 % of the `devices` started), waited for.
pub(crate) async fn all_offline(
    heard: &Heard,
    hub: &Hub,
    devices: u64,
    offline_after: Duration,
) -> Result<Vec<Offline>> {
    let expected = hub.devices().await? as usize;
    if expected + expected / 100 < devices as usize {
        bail!("only {expected} of {devices} devices were heard");
    }
    let limit = offline_after + Duration::from_secs(60);
    let deadline = Instant::now() + limit;
    while heard.offline_count() < expected {
        if Instant::now() > deadline {
            bail!(
                "{} of {expected} offline events within {limit:?}",
                heard.offline_count()
            );
        }
        time::sleep(Duration::from_millis(100)).await;
    }
    Ok(heard.offline())
}

pub async fn lag(dir: &Path, scale: &Scale, report: &mut Report) -> Result<()> {
    // First heartbeats spread over one offline_after; the fleet stops after that, so
    // deadlines are staggered over the same span and the checker meets them while the
    // rest still beat.
    let after = scale.lag_offline_after;
    let events = silence(dir, "lag-", (scale.lag_devices, after, 20), after, after).await?;
    let lags = lags_ms(&events, after);
    report.add(
        "detect_lag_p99_s",
        quantile(&lags, 0.99) as f64 / 1e3,
        "s",
        Some(Goal::AtMost(1.0)),
        Some(Baseline {
            what: "offline_after".into(),
            value: after.as_secs_f64(),
            unit: "s",
        }),
        json!({
            "devices": scale.lag_devices,
            "offline_events": events.len(),
            "p50_ms": quantile(&lags, 0.5),
            "p99_ms": quantile(&lags, 0.99),
            "max_ms": lags.last(),
            "min_ms": lags.first(),
            "check_interval_ms": 250,
        }),
    );
    Ok(())
}

pub async fn storm(dir: &Path, scale: &Scale, report: &mut Report) -> Result<()> {
    // Everyone beats every second for three seconds, then all stop at once.
    let after = scale.storm_offline_after;
    let events = silence(
        dir,
        "storm-",
        (scale.storm_devices, Duration::from_secs(1), 10),
        Duration::from_secs(3),
        after,
    )
    .await?;
    let lags = lags_ms(&events, after);
    let last_deadline =
        events.iter().map(|e| e.last_seen_ms).max().unwrap_or(0) + after.as_millis() as i64;
    let last_arrival = events.iter().map(|e| e.arrived_ms).max().unwrap_or(0);
    report.add(
        "storm_10k_s",
        lags.last().copied().unwrap_or(0) as f64 / 1e3,
        "s",
        Some(Goal::AtMost(2.0)),
        Some(Baseline {
            what: "offline_after".into(),
            value: after.as_secs_f64(),
            unit: "s",
        }),
        json!({
            "devices": scale.storm_devices,
            "offline_events": events.len(),
            "worst_lag_past_own_deadline_ms": lags.last(),
            "p50_ms": quantile(&lags, 0.5),
            "p99_ms": quantile(&lags, 0.99),
            "last_event_after_last_deadline_ms": last_arrival - last_deadline,
        }),
    );
    Ok(())
}

/// RSS growth of `proc` per connection with `connections` idle clients.
async fn per_connection(proc: &Proc, url: &BrokerUrl, connections: u64) -> Result<f64> {
    time::sleep(Duration::from_millis(500)).await;
    let before = proc.rss_bytes()?;
    // One device per connection, heartbeating once an hour: idle connections.
    let fleet = Fleet::start(fleet(
        url,
        "idle-",
        connections,
        Duration::from_secs(3600),
        connections,
        QoS::AtMostOnce,
    ));
    let deadline = Instant::now() + Duration::from_secs(120);
    while fleet.stats.connected.load(Relaxed) < connections {
        if Instant::now() > deadline {
            bail!(
                "{} of {connections} connections up after 120 s",
                fleet.stats.connected.load(Relaxed)
            );
        }
        time::sleep(Duration::from_millis(100)).await;
    }
    time::sleep(Duration::from_secs(2)).await;
    let after = proc.rss_bytes()?;
    fleet.stop().await;
    Ok((after as f64 - before as f64) / connections as f64)
}

pub async fn memory(dir: &Path, scale: &Scale, report: &mut Report) -> Result<()> {
    for &connections in &scale.memory_connections {
        let hub = Hub::start(
            dir,
            &dir.join(format!("memory-{connections}.db")),
            HubBroker::Embedded,
            NEVER,
        )
        .await?;
        let embedded = per_connection(&hub.proc, &hub.url, connections).await;
        hub.stop().await?;
        let mosquitto = Mosquitto::start(dir).await?;
        let baseline = per_connection(&mosquitto.proc, &mosquitto.url, connections).await;
        mosquitto.stop().await?;
        let (embedded, baseline) = (embedded?, baseline?);
        report.add(
            leak(format!("embedded_bytes_per_connection_{connections}")),
            embedded,
            "B",
            None,
            Some(Baseline {
                what: format!("Mosquitto per connection at {connections}"),
                value: baseline,
                unit: "B",
            }),
            json!({"connections": connections, "embedded": embedded, "mosquitto": baseline}),
        );
    }
    Ok(())
}

pub async fn sustained(dir: &Path, scale: &Scale, report: &mut Report) -> Result<()> {
    let devices = scale.sustained_devices;
    let mosquitto = Mosquitto::start(dir).await?;
    // The default offline_after: three missed minutes would be an outage, not noise.
    let hub = Hub::start(
        dir,
        &dir.join("sustained.db"),
        HubBroker::External(&mosquitto.url),
        Duration::from_secs(180),
    )
    .await?;
    time::sleep(Duration::from_millis(500)).await;
    let rss_before = hub.proc.rss_bytes()?;
    let cpu_before = hub.proc.cpu_seconds()?;
    let connections = (devices / 20_000).clamp(4, 50);
    let fleet = Fleet::start(fleet(
        &hub.url,
        "fleet-",
        devices,
        scale.sustained_interval,
        connections,
        QoS::AtMostOnce,
    ));
    let started = Instant::now();
    let progress_every = Duration::from_secs(30).min(scale.sustained_for);
    while started.elapsed() < scale.sustained_for {
        time::sleep(progress_every.min(scale.sustained_for.saturating_sub(started.elapsed())))
            .await;
        let devices_known = hub.devices().await?;
        println!(
            "   t={:>4.0}s sent={} committed={:.0} devices={devices_known:.0} hub_rss={} MB",
            started.elapsed().as_secs_f64(),
            fleet.stats.sent.load(Relaxed),
            hub.committed().await?,
            hub.proc.rss_bytes()? / 1_000_000
        );
    }
    let rss_after = hub.proc.rss_bytes()?;
    let cpu_after = hub.proc.cpu_seconds()?;
    let stats = std::sync::Arc::clone(&fleet.stats);
    let clean = fleet.finish(Duration::from_secs(30)).await;
    let sent = stats.sent.load(Relaxed) as f64;
    let committed = hub.settle(Duration::from_secs(60)).await?;
    let metrics = hub.metrics().await?;
    let false_offline = metrics.get("fleetwatch_transitions_total{status=\"offline\"}");
    hub.stop().await?;
    mosquitto.stop().await?;
    if clean < connections {
        println!(
            "   {} of {connections} connections did not finish cleanly",
            connections - clean
        );
    }
    let key = leak(format!(
        "sustained_{}_at_{}s",
        short(devices),
        scale.sustained_interval.as_secs()
    ));
    report.add(
        key,
        committed / sent.max(1.0),
        "",
        Some(Goal::AtLeast(1.0)),
        Some(Baseline {
            what: "heartbeats the fleet sent".into(),
            value: sent,
            unit: "msgs",
        }),
        json!({
            "devices": devices,
            "interval_s": scale.sustained_interval.as_secs(),
            "duration_s": scale.sustained_for.as_secs(),
            "qos": 0,
            "sent": sent,
            "committed": committed,
            "false_offline": false_offline,
            "sim_errors": stats.errors.load(Relaxed),
            "events_published": metrics.get("fleetwatch_events_published_total"),
            "hub_cpu_s": cpu_after - cpu_before,
        }),
    );
    report.add(
        "sustained_false_offline",
        false_offline,
        "",
        Some(Goal::AtMost(0.0)),
        None,
        json!({"devices": devices}),
    );
    report.add(
        "rss_bytes_per_device",
        (rss_after as f64 - rss_before as f64) / devices as f64,
        "B",
        Some(Goal::AtMost(500.0)),
        Some(Baseline {
            what: "hub RSS before the fleet".into(),
            value: rss_before as f64,
            unit: "B",
        }),
        json!({"devices": devices, "rss_before": rss_before, "rss_after": rss_after}),
    );
    Ok(())
}

/// 1000000 -> "1m", 20000 -> "20k".
fn short(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}m", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}
