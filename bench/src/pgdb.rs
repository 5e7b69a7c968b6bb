//! The PostgreSQL write path alone: `PgStore`'s `Store::apply` on batches of steady
//! heartbeats (the same heartbeats and rounds as the SQLite case in `crate::db`),
//! against a bare loop writing the same rows as one
//! `INSERT … SELECT … FROM UNNEST(…) ON CONFLICT (device_id) DO UPDATE` per batch.
//!
//! Each side gets a database of its own, created for this run on the server the
//! harness is given (`--postgres`) and dropped after it: the hub's side through
//! `PgStore::connect`, the bare side a twin whose schema the same store migration
//! made (identical table and indexes), reached with the same connection settings
//! (`PgStore::options`). Round 0 registers every device (untimed); then
//! `VACUUM (ANALYZE)` and a `CHECKPOINT` (autovacuum may be off, and both sides should
//! start the timed rounds from the same clean state), then steady rounds for the time
//! given. Beside each rate, where it costs: this process's CPU (the client: for the
//! hub, building batches and decoding answers), the CPU of the server processes
//! serving the database (where the server is local and `/proc` shows them), and the
//! WAL written.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use fleetwatch::clock::Timestamp;
use fleetwatch::device::DeviceId;
use fleetwatch::storage::postgres::{PgSettings, PgStore};
use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};

use crate::db::{Timed, hub_round, timed_rounds};
use crate::procs::cpu_seconds;

/// The server the databases are made on when `--postgres` is not given.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// One side's timed rounds and what they cost.
pub struct Phase {
    pub timed: Timed,
    /// CPU seconds of this process over the timed rounds.
    pub client_cpu_s: f64,
    /// CPU seconds of the server processes connected to the phase's database, where
    /// `/proc` shows them (a local server, this user or root).
    pub server_cpu_s: Option<f64>,
    /// WAL the server wrote over the timed rounds (the whole server's, so anything
    /// else writing on it counts too).
    pub wal_bytes: f64,
    /// Whether the `CHECKPOINT` before the phase ran (it needs a superuser or the
    /// `pg_checkpoint` role; without it the figures are taken all the same).
    pub checkpointed: bool,
}

impl Phase {
    /// Rows written in the timed rounds.
    pub fn rows(&self, devices: usize) -> f64 {
        (self.timed.rounds as usize * devices) as f64
    }
}

pub struct PgFigures {
    /// `Store::apply`'s timed rounds.
    pub hub: Phase,
    /// The bare loop's timed rounds.
    pub bare: Phase,
    /// `SHOW server_version`.
    pub server_version: String,
}

/// The bare loop's statement: the columns and values the hub's steady refresh
/// writes (its `error` is NULL: the heartbeats are healthy; its deadline the default
/// offline_after past last_seen_at), plain `excluded` values.
const BARE_UPSERT: &str = "INSERT INTO devices (device_id, status, last_seen_at, \
         first_seen_at, status_changed_at, registered_at, device_time, clock_skew_ms, \
         error, uptime_seconds, free_memory, firmware_version, hostname, deadline_at) \
     SELECT v.device_id, 'online', v.seen, v.seen, v.seen, v.seen, v.device_time, v.skew, \
         v.error, v.uptime, v.memory, v.firmware, v.hostname, \
         v.seen + interval '180 seconds' \
     FROM UNNEST($1::text[], $2::timestamptz[], $3::timestamptz[], $4::bigint[], \
                 $5::text[], $6::bigint[], $7::bigint[], $8::text[], $9::text[]) \
         AS v(device_id, seen, device_time, skew, error, uptime, memory, firmware, hostname) \
     ON CONFLICT (device_id) DO UPDATE SET \
         last_seen_at = excluded.last_seen_at, \
         deadline_at = excluded.deadline_at, \
         device_time = excluded.device_time, \
         clock_skew_ms = excluded.clock_skew_ms, \
         error = excluded.error, \
         uptime_seconds = excluded.uptime_seconds, \
         free_memory = excluded.free_memory, \
         firmware_version = excluded.firmware_version, \
         hostname = excluded.hostname";

pub async fn measure(
    admin: &str,
    devices: usize,
    batch: usize,
    each: Duration,
) -> Result<PgFigures> {
    let ids: Vec<DeviceId> = (0..devices)
        .map(|i| DeviceId::parse(&format!("dev-{i:07}")))
        .collect::<Result<_, _>>()?;
    let names: Vec<String> = ids.iter().map(ToString::to_string).collect();
    let settings = PgSettings::default();
    let server_version = {
        let mut conn = connect_admin(admin).await?;
        let version: String = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&mut conn)
            .await?;
        conn.close().await?;
        version
    };

    let hub = with_database(admin, async |url| {
        let store = PgStore::connect(url, settings).await?;
        hub_round(&store, &ids, batch, 0).await?;
        measured(url, devices, each, |round| {
            hub_round(&store, &ids, batch, round)
        })
        .await
    })
    .await?;

    let bare = with_database(admin, async |url| {
        // The schema: the store's own migration.
        drop(PgStore::connect(url, settings).await?);
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(PgStore::options(url, settings)?)
            .await?;
        bare_round(&pool, &names, batch, 0).await?;
        let phase = measured(url, devices, each, |round| {
            bare_round(&pool, &names, batch, round)
        })
        .await?;
        pool.close().await;
        Ok(phase)
    })
    .await?;

    Ok(PgFigures {
        hub,
        bare,
        server_version,
    })
}

async fn connect_admin(admin: &str) -> Result<PgConnection> {
    PgConnection::connect(admin).await.with_context(|| {
        format!(
            "the PostgreSQL benchmark needs a server: {admin} cannot be reached (start it, \
             or give another with --postgres or FLEETWATCH_BENCH_POSTGRES)"
        )
    })
}

/// `admin` with its database replaced by `name` (any `?options` kept).
fn database_url(admin: &str, name: &str) -> String {
    let (base, query) = admin
        .split_once('?')
        .map_or((admin, None), |(base, query)| (base, Some(query)));
    let server = base.rsplit_once('/').map_or(base, |(server, _)| server);
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

/// Runs `phase` on a new empty database, `fleetwatch_bench_<uuid>`, and drops the
/// database afterwards, whether the phase worked or not.
pub(crate) async fn with_database<T>(
    admin: &str,
    phase: impl AsyncFnOnce(&str) -> Result<T>,
) -> Result<T> {
    let name = format!("fleetwatch_bench_{}", uuid::Uuid::now_v7().simple());
    let mut conn = connect_admin(admin).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut conn)
        .await
        .with_context(|| format!("CREATE DATABASE {name} on {admin}"))?;
    let result = phase(&database_url(admin, &name))
        .await
        .with_context(|| format!("on database {name}"));
    // FORCE ends connections the phase's pools may still be closing.
    let dropped = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await
    .with_context(|| format!("DROP DATABASE {name} on {admin}"));
    conn.close().await.ok();
    let value = result?;
    dropped?;
    Ok(value)
}

/// The timed rounds of one side, after `VACUUM (ANALYZE)` (the dead row versions of
/// round 0 gone, the planner's statistics current) and a `CHECKPOINT` (both phases
/// start with no dirty buffers), with what they cost.
async fn measured<F, Fut>(url: &str, devices: usize, each: Duration, round: F) -> Result<Phase>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut conn = PgConnection::connect(url).await?;
    sqlx::raw_sql("VACUUM (ANALYZE)").execute(&mut conn).await?;
    let checkpointed = match sqlx::raw_sql("CHECKPOINT").execute(&mut conn).await {
        Ok(_) => true,
        Err(e) => {
            println!("   (no CHECKPOINT before the phase: {e})");
            false
        }
    };
    let before = Usage::take(&mut conn).await?;
    let timed = timed_rounds(devices, each, round).await?;
    let after = Usage::take(&mut conn).await?;
    let wal_bytes: f64 =
        sqlx::query_scalar("SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)::float8")
            .bind(&after.wal)
            .bind(&before.wal)
            .fetch_one(&mut conn)
            .await?;
    conn.close().await?;
    let server_cpu_s = after
        .server
        .iter()
        .map(|(pid, &end)| {
            let start = before.server.get(pid).copied().flatten().unwrap_or(0.0);
            end.map(|end| end - start)
        })
        .sum::<Option<f64>>();
    Ok(Phase {
        timed,
        client_cpu_s: after.client - before.client,
        server_cpu_s,
        wal_bytes,
        checkpointed,
    })
}

/// CPU used so far by this process and by the server processes serving the
/// database, and the server's WAL position.
struct Usage {
    client: f64,
    /// By server process id: `None` where `/proc` does not show it.
    server: HashMap<i32, Option<f64>>,
    wal: String,
}

impl Usage {
    async fn take(conn: &mut PgConnection) -> Result<Self> {
        let (wal, pids): (String, Vec<i32>) = sqlx::query_as(
            "SELECT pg_current_wal_lsn()::text, \
                 coalesce(array_agg(pid) FILTER (WHERE pid <> pg_backend_pid()), '{}') \
             FROM pg_stat_activity WHERE datname = current_database()",
        )
        .fetch_one(&mut *conn)
        .await?;
        Ok(Self {
            client: cpu_seconds(std::process::id())?,
            server: pids
                .into_iter()
                .map(|pid| {
                    (
                        pid,
                        u32::try_from(pid).ok().and_then(|p| cpu_seconds(p).ok()),
                    )
                })
                .collect(),
            wal,
        })
    }
}

fn at_time(millis: i64) -> DateTime<Utc> {
    Timestamp::from_unix_millis(millis).to_datetime()
}

/// The same rows as `hub_round` writes, one upsert statement and transaction per
/// `batch` devices, every column bound as an array.
async fn bare_round(pool: &PgPool, ids: &[String], batch: usize, round: u64) -> Result<()> {
    let mut at = 1_000_000 + (round as i64) * ids.len() as i64;
    let device_time = 1_700_000_000_000i64;
    let uptime = round as i64;
    for chunk in ids.chunks(batch) {
        let n = chunk.len();
        let mut seen = Vec::with_capacity(n);
        let mut skew = Vec::with_capacity(n);
        for _ in chunk {
            at += 1;
            seen.push(at_time(at));
            skew.push(device_time - at);
        }
        let mut tx = pool.begin().await?;
        sqlx::query(BARE_UPSERT)
            .bind(chunk)
            .bind(seen)
            .bind(vec![at_time(device_time); n])
            .bind(skew)
            .bind(vec![None::<String>; n])
            .bind(vec![uptime; n])
            .bind(vec![48_213_504i64; n])
            .bind(vec!["1.4.2"; n])
            .bind(vec!["sim"; n])
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(())
}
