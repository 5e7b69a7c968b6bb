//! The write path alone: the hub's `Store::apply` on batches of steady heartbeats,
//! against a bare batched upsert of the same columns on the same SQLite settings and
//! batch size (the settings come from `SqliteStore::options`). The PostgreSQL case
//! (`crate::pgdb`) shares the heartbeats, the rounds and their timing.

use std::time::{Duration, Instant};

use anyhow::Result;
use fleetwatch::clock::Timestamp;
use fleetwatch::device::DeviceId;
use fleetwatch::storage::Store;
use fleetwatch::storage::sqlite::SqliteStore;
use fleetwatch::update::{Batch, Heartbeat, Report};
use sqlx::sqlite::{SqlitePool, SqlitePoolOptions};
use sqlx::{QueryBuilder, Sqlite};

pub struct DbFigures {
    /// Rows per second through `Store::apply`.
    pub hub_rows_per_s: f64,
    /// Rows per second through the bare upsert.
    pub bare_rows_per_s: f64,
    /// Rows per second through `Store::apply` with a label rule configured and every
    /// heartbeat repeating the same labels.
    pub labelled_rows_per_s: f64,
    /// Seconds to open that database again with another rule, which every device's
    /// labels match (each start matches the labelled devices again), and with the
    /// same rules again.
    pub rematch_changed_s: f64,
    pub rematch_same_s: f64,
}

fn heartbeat(uptime: u64) -> Heartbeat {
    Heartbeat {
        healthy: true,
        error: None,
        device_time: Some(Timestamp::from_unix_millis(1_700_000_000_000)),
        interval: None,
        labels: None,
        parent: None,
        report: Report {
            uptime_seconds: Some(uptime),
            free_memory: Some(48_213_504),
            firmware_version: Some("1.4.2".into()),
            hostname: Some("sim".into()),
            ..Report::default()
        },
    }
}

/// Rows per statement in the bare loop: under SQLite's 32,766 bound parameters.
const BARE_ROWS_PER_STATEMENT: usize = 1024;

pub async fn measure(
    dir: &std::path::Path,
    devices: usize,
    batch: usize,
    each: Duration,
) -> Result<DbFigures> {
    let ids: Vec<DeviceId> = (0..devices)
        .map(|i| DeviceId::parse(&format!("dev-{i:07}")))
        .collect::<Result<_, _>>()?;

    // The hub's store: register everyone, then time steady rounds.
    let hub_url = format!("sqlite://{}", dir.join("db-hub.db").display());
    let store = SqliteStore::connect(&hub_url).await?;
    let hub_rows_per_s =
        rows_per_s(devices, each, |round| hub_round(&store, &ids, batch, round)).await?;
    drop(store);

    // The same with a label rule, every heartbeat repeating its labels.
    let labelled_url = format!("sqlite://{}", dir.join("db-labelled.db").display());
    let labels: fleetwatch::labels::Labels =
        serde_json::from_value(serde_json::json!({"kind": "sensor", "site": "north"}))?;
    let rules = fleetwatch::deadline::Deadlines {
        rules: vec![fleetwatch::deadline::Rule {
            labels: labels.clone(),
            offline_after: Duration::from_secs(7200),
        }],
        ..fleetwatch::deadline::Deadlines::default()
    };
    let store = SqliteStore::open(&labelled_url, rules.clone()).await?;
    let labelled_rows_per_s = rows_per_s(devices, each, |round| {
        round_of(&store, &ids, batch, round, Some(&labels))
    })
    .await?;
    drop(store);
    let mut other = rules.clone();
    other.rules[0].offline_after = Duration::from_secs(3600);
    let started = Instant::now();
    drop(SqliteStore::open(&labelled_url, other.clone()).await?);
    let rematch_changed_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    drop(SqliteStore::open(&labelled_url, other).await?);
    let rematch_same_s = started.elapsed().as_secs_f64();

    // The bare loop: same schema (the hub's migrations), same pragmas, same batch.
    let bare_url = format!("sqlite://{}", dir.join("db-bare.db").display());
    drop(SqliteStore::connect(&bare_url).await?);
    let options = SqliteStore::options(&bare_url)?;
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    let names: Vec<String> = ids.iter().map(ToString::to_string).collect();
    let bare_rows_per_s = rows_per_s(devices, each, |round| {
        bare_round(&pool, &names, batch, round)
    })
    .await?;
    pool.close().await;
    Ok(DbFigures {
        hub_rows_per_s,
        bare_rows_per_s,
        labelled_rows_per_s,
        rematch_changed_s,
        rematch_same_s,
    })
}

/// Runs round 0 (registration, untimed), then rounds 1, 2, … for `each`: rows per
/// second over the timed rounds, `devices` rows a round.
async fn rows_per_s<F, Fut>(devices: usize, each: Duration, mut round: F) -> Result<f64>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    round(0).await?;
    Ok(timed_rounds(devices, each, round).await?.rows_per_s)
}

/// What [`timed_rounds`] measured.
#[derive(Debug, Clone, Copy)]
pub struct Timed {
    pub rows_per_s: f64,
    pub rounds: u64,
    pub seconds: f64,
}

/// Rounds 1, 2, … (whole rounds, until `each` has passed; round 0 is the caller's),
/// `devices` rows a round.
pub async fn timed_rounds<F, Fut>(devices: usize, each: Duration, mut round: F) -> Result<Timed>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let started = Instant::now();
    let mut rounds = 0u64;
    while started.elapsed() < each {
        rounds += 1;
        round(rounds).await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Timed {
        rows_per_s: (rounds as usize * devices) as f64 / seconds,
        rounds,
        seconds,
    })
}

/// Every device heartbeats once more, `batch` devices per `Store::apply`; device
/// `i` of round `r` is seen at `1_000_000 + r * devices + i + 1` ms.
pub async fn hub_round<S: Store>(
    store: &S,
    ids: &[DeviceId],
    batch: usize,
    round: u64,
) -> Result<()> {
    round_of(store, ids, batch, round, None).await
}

/// [`hub_round`], each heartbeat carrying `labels` if given.
async fn round_of<S: Store>(
    store: &S,
    ids: &[DeviceId],
    batch: usize,
    round: u64,
    labels: Option<&fleetwatch::labels::Labels>,
) -> Result<()> {
    let mut at = 1_000_000 + (round as i64) * ids.len() as i64;
    for chunk in ids.chunks(batch) {
        let mut pending = Batch::default();
        for id in chunk {
            at += 1;
            pending.add_heartbeat(
                id.clone(),
                Timestamp::from_unix_millis(at),
                Heartbeat {
                    labels: labels.cloned(),
                    ..heartbeat(round)
                },
            );
        }
        store
            .apply(
                &pending.take(),
                fleetwatch::registration::NewDevices::UNLIMITED,
            )
            .await?;
    }
    Ok(())
}

/// The same rows as plain multi-row upserts, `batch` rows per transaction.
async fn bare_round(pool: &SqlitePool, ids: &[String], batch: usize, round: u64) -> Result<()> {
    let mut at = 1_000_000 + (round as i64) * ids.len() as i64;
    let uptime = round as i64;
    for batch_ids in ids.chunks(batch) {
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        for statement_ids in batch_ids.chunks(BARE_ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT INTO devices (device_id, status, last_seen_at, first_seen_at, \
                 status_changed_at, registered_at, device_time, uptime_seconds, \
                 free_memory, firmware_version, hostname, deadline_at) ",
            );
            query.push_values(statement_ids, |mut row, id| {
                at += 1;
                row.push_bind(id.as_str())
                    .push_bind("online")
                    .push_bind(at)
                    .push_bind(at)
                    .push_bind(at)
                    .push_bind(at)
                    .push_bind(1_700_000_000_000i64)
                    .push_bind(uptime)
                    .push_bind(48_213_504i64)
                    .push_bind("1.4.2")
                    .push_bind("sim")
                    // The deadline the hub writes beside last_seen_at (indexed).
                    .push_bind(at + 180_000);
            });
            query.push(
                " ON CONFLICT (device_id) DO UPDATE SET \
                 last_seen_at = excluded.last_seen_at, \
                 deadline_at = excluded.deadline_at, \
                 device_time = excluded.device_time, \
                 uptime_seconds = excluded.uptime_seconds, \
                 free_memory = excluded.free_memory, \
                 firmware_version = excluded.firmware_version, \
                 hostname = excluded.hostname",
            );
            query.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
    }
    Ok(())
}
