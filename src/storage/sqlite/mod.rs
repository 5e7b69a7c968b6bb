//! The SQLite store: one file, WAL, `synchronous=NORMAL`. It reads and writes;
//! [`crate::rules`] decides what a flush writes.
//!
//! Every write runs in a `BEGIN IMMEDIATE` transaction, so writers queue on SQLite's
//! lock (with a busy timeout) instead of failing when a read has to become a write.
//!
//! Batches of rows are written as multi-row `VALUES` statements with bound parameters,
//! in chunks whose sizes are powers of two: a handful of statement shapes covers any
//! batch, so they stay prepared in sqlx's cache. (Rows as JSON objects unpacked with
//! `json_each` cost SQLite a re-serialisation of the object per field read, which made
//! that path several times slower.) Lists of plain ids or numbers still travel as one
//! JSON array, which `json_each` reads cheaply.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use sqlx::pool::PoolConnection;
use sqlx::query_builder::Separated;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use super::rows::{Columns, clamp, corrupt, device, outbox_item, parent_change, stored_event};
use super::{Applied, Device, DeviceQuery, OutboxItem, Store, StoreError, Summary, TOMBSTONE};
use crate::clock::Timestamp;
use crate::credentials::CredentialHash;
use crate::deadline::{self, Deadlines};
use crate::device::DeviceId;
use crate::event::{StatusEvent, StoredEvent};
use crate::labels::Labels;
use crate::registration::{self, NewDevices};
use crate::rules::{self, Current, Decision, Refresh};
use crate::status::{self, Signal, Status};
use crate::update::{DeviceUpdate, Report};

/// A device's `offline_after` in milliseconds, by the rules of
/// [`crate::deadline::Deadlines`], in SQL: its own setting, else its interval times
/// the missed beats, else its label rule's, else the default (each the SQL
/// expression given).
macro_rules! offline_after {
    ($own:literal, $interval:literal, $missed:literal, $rule:literal, $default:literal) => {
        concat!(
            "coalesce(",
            $own,
            ", ",
            $interval,
            " * ",
            $missed,
            ", ",
            $rule,
            ", ",
            $default,
            ")"
        )
    };
}

/// How long a writer waits for another to finish before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Page cache per connection, in KiB (negative: SQLite's unit for a size). The default
/// 2 MiB made every flush of a 30,000-device fleet re-read and spill pages; 64 MiB
/// holds about a million devices' hot rows and index pages. Memory is taken as used.
const PAGE_CACHE: &str = "-65536";

pub struct SqliteStore {
    pool: SqlitePool,
    deadlines: Deadlines,
}

impl SqliteStore {
    /// Opens (creating if missing) the database `url` names, `sqlite://PATH` or
    /// `sqlite:PATH`, and runs the migrations, with the default [`Deadlines`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::open(url, Deadlines::default()).await
    }

    /// Opens the database as [`Self::connect`] does, and brings every stored deadline
    /// in line with `deadlines` (a changed `heartbeat.offline_after` applies to the
    /// devices already waiting).
    pub async fn open(url: &str, deadlines: Deadlines) -> Result<Self, StoreError> {
        let options = Self::options(url)?;
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&pool).await?;
        let store = Self { pool, deadlines };
        store.reschedule().await?;
        Ok(store)
    }

    /// Brings every device's stored label rule (`rule_ms`) in line with the configured
    /// rules, inside [`Self::reschedule`]'s transaction (one connection, one page
    /// cache): the labelled devices are read a page at a time and those whose rule
    /// changed are rewritten. Without rules, the rescheduling scan clears them.
    async fn rematch_rules(&self, tx: &mut WriteTx) -> Result<(), StoreError> {
        if self.deadlines.rules.is_empty() {
            return Ok(());
        }
        let mut after = String::new();
        let mut changed = 0u64;
        loop {
            let rows = sqlx::query(
                "SELECT device_id, labels, rule_ms FROM devices \
                 WHERE device_id > ?1 AND labels IS NOT NULL ORDER BY device_id LIMIT 10000",
            )
            .bind(&after)
            .fetch_all(&mut **tx)
            .await?;
            let Some(last) = rows.last() else { break };
            after = last.try_get("device_id")?;
            let mut moved: Vec<(String, Option<i64>)> = Vec::new();
            for row in &rows {
                let labels: Labels = row.json("labels")?.unwrap_or_default();
                let rule = self.deadlines.rule(&labels).map(deadline::millis);
                if rule != row.int("rule_ms")? {
                    moved.push((row.try_get("device_id")?, rule));
                }
            }
            changed += moved.len() as u64;
            for chunk in chunks(&moved) {
                let mut query =
                    QueryBuilder::<Sqlite>::new("UPDATE devices SET rule_ms = v.column2 FROM (");
                query.push_values(chunk, |mut values, (id, rule)| {
                    values.push_bind(id.as_str()).push_bind(*rule);
                });
                query.push(") AS v WHERE devices.device_id = v.column1");
                query.build().execute(&mut **tx).await?;
            }
        }
        if changed > 0 {
            tracing::info!(devices = changed, "label rules matched again");
        }
        Ok(())
    }

    /// Rewrites the deadlines that differ from what `self.deadlines` makes of them:
    /// one scan, writing only what changed. Without rules the same scan clears the
    /// label rules a previous configuration left (a second scan would read a large
    /// file into a second connection's page cache).
    async fn reschedule(&self) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        self.rematch_rules(&mut tx).await?;
        let query = if self.deadlines.rules.is_empty() {
            sqlx::query(concat!(
                "UPDATE devices SET rule_ms = NULL, deadline_at = last_seen_at + ",
                offline_after!("offline_after_ms", "interval_ms", "?1", "NULL", "?2"),
                " WHERE rule_ms IS NOT NULL OR (last_seen_at IS NOT NULL \
                     AND deadline_at IS NOT last_seen_at + ",
                offline_after!("offline_after_ms", "interval_ms", "?1", "NULL", "?2"),
                ")"
            ))
        } else {
            sqlx::query(concat!(
                "UPDATE devices SET deadline_at = last_seen_at + ",
                offline_after!("offline_after_ms", "interval_ms", "?1", "rule_ms", "?2"),
                " WHERE last_seen_at IS NOT NULL AND deadline_at IS NOT last_seen_at + ",
                offline_after!("offline_after_ms", "interval_ms", "?1", "rule_ms", "?2")
            ))
        };
        let moved = query
            .bind(self.deadlines.missed_beats_i64())
            .bind(self.deadlines.default_ms())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        if moved > 0 {
            tracing::info!(
                devices = moved,
                "deadlines moved to the configured offline_after"
            );
        }
        Ok(())
    }

    /// The connection settings the hub uses for `url`: WAL, `synchronous=NORMAL`, a busy
    /// timeout and a page cache that holds a large fleet's hot pages (public so the
    /// benchmarks can hold a bare loop to the same settings).
    pub fn options(url: &str) -> Result<SqliteConnectOptions, StoreError> {
        Ok(SqliteConnectOptions::from_str(url)
            .map_err(|_| StoreError::UnsupportedUrl(url.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .pragma("cache_size", PAGE_CACHE))
    }

    async fn write(&self) -> Result<WriteTx, StoreError> {
        WriteTx::begin(&self.pool).await
    }
}

/// A write transaction (`BEGIN IMMEDIATE`) on a pooled connection of its own.
///
/// Only [`WriteTx::commit`] returns the connection to the pool. Any other end (an
/// error in the body, a failed COMMIT, the future dropped half-way) closes it, which
/// rolls back whatever is open. sqlx's own `Transaction` cannot be trusted here: after
/// `database or disk is full` SQLite may already have rolled the transaction back, so
/// sqlx's ROLLBACK fails, its transaction depth stays at one, and every later write on
/// that connection failed with "begin_with at non-zero transaction depth" until restart.
pub(crate) struct WriteTx {
    conn: PoolConnection<Sqlite>,
    committed: bool,
}

impl WriteTx {
    async fn begin(pool: &SqlitePool) -> Result<Self, StoreError> {
        let conn = pool.acquire().await?;
        let mut tx = Self {
            conn,
            committed: false,
        };
        sqlx::raw_sql("BEGIN IMMEDIATE")
            .execute(&mut *tx.conn)
            .await?;
        Ok(tx)
    }

    async fn commit(mut self) -> Result<(), StoreError> {
        sqlx::raw_sql("COMMIT").execute(&mut *self.conn).await?;
        self.committed = true;
        Ok(())
    }

    /// Ends a write that turned out to have nothing to do (a refusal), keeping the
    /// connection if the rollback works.
    async fn rollback(mut self) {
        if sqlx::raw_sql("ROLLBACK")
            .execute(&mut *self.conn)
            .await
            .is_ok()
        {
            self.committed = true;
        }
    }
}

impl std::ops::Deref for WriteTx {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if !self.committed {
            self.conn.close_on_drop();
        }
    }
}

/// A report's columns, ready to bind (nested objects as JSON text).
struct ReportColumns {
    uptime: Option<i64>,
    memory: Option<i64>,
    firmware: Option<String>,
    hostname: Option<String>,
    os_info: Option<String>,
    metrics: Option<String>,
}

impl ReportColumns {
    fn new(report: &Report) -> Result<Self, StoreError> {
        let json = |value: Result<Option<String>, serde_json::Error>| value.map_err(corrupt);
        Ok(Self {
            uptime: clamp(report.uptime_seconds),
            memory: clamp(report.free_memory),
            firmware: report.firmware_version.clone(),
            hostname: report.hostname.clone(),
            os_info: json(
                report
                    .os_info
                    .as_ref()
                    .map(serde_json::to_string)
                    .transpose(),
            )?,
            metrics: json(
                report
                    .metrics
                    .as_ref()
                    .map(serde_json::to_string)
                    .transpose(),
            )?,
        })
    }

    /// Binds the six report columns, in table order.
    fn bind(self, values: &mut Separated<'_, Sqlite, &'static str>) {
        values
            .push_bind(self.uptime)
            .push_bind(self.memory)
            .push_bind(self.firmware)
            .push_bind(self.hostname)
            .push_bind(self.os_info)
            .push_bind(self.metrics);
    }
}

const SELECT_CURRENT: &str = "SELECT device_id, status, last_seen_at, status_changed_at, error, \
     offline_after_ms, interval_ms, labels \
     FROM devices WHERE device_id IN (SELECT value FROM json_each(?1))";

const INSERT_DEVICES: &str = "INSERT INTO devices (device_id, status, last_seen_at, \
     first_seen_at, status_changed_at, registered_at, device_time, clock_skew_ms, error, \
     interval_ms, deadline_at, labels, \
     uptime_seconds, free_memory, firmware_version, hostname, os_info, metrics, parent, rule_ms) ";

const ON_CONFLICT_UPDATE: &str = " ON CONFLICT (device_id) DO UPDATE SET \
         status = excluded.status, \
         last_seen_at = coalesce(excluded.last_seen_at, devices.last_seen_at), \
         first_seen_at = coalesce(devices.first_seen_at, excluded.first_seen_at), \
         status_changed_at = excluded.status_changed_at, \
         device_time = coalesce(excluded.device_time, devices.device_time), \
         clock_skew_ms = coalesce(excluded.clock_skew_ms, devices.clock_skew_ms), \
         error = excluded.error, \
         interval_ms = coalesce(excluded.interval_ms, devices.interval_ms), \
         deadline_at = coalesce(excluded.deadline_at, devices.deadline_at), \
         labels = CASE WHEN excluded.labels IS NULL THEN devices.labels \
             ELSE json_patch(coalesce(devices.labels, '{}'), excluded.labels) END, \
         uptime_seconds = coalesce(excluded.uptime_seconds, devices.uptime_seconds), \
         free_memory = coalesce(excluded.free_memory, devices.free_memory), \
         firmware_version = coalesce(excluded.firmware_version, devices.firmware_version), \
         hostname = coalesce(excluded.hostname, devices.hostname), \
         os_info = coalesce(excluded.os_info, devices.os_info), \
         metrics = coalesce(excluded.metrics, devices.metrics), \
         parent = CASE WHEN excluded.parent IS NULL THEN devices.parent \
             ELSE nullif(excluded.parent, '') END, \
         rule_ms = excluded.rule_ms";

/// `column1..column15` of the VALUES list: id, status, seen, device_time,
/// clock_skew_ms, error, interval, the six report columns, labels (merged key by key
/// into the stored ones), parent ([`parent_change`]: NULL keeps it). The deadline
/// comes last, [`offline_after!`] spelled out (the label rule is the stored one: while
/// rules are configured, only heartbeats whose labels change nothing are kept here,
/// [`REFRESH_STEADY_LABELS_KEPT`]): its two
/// parameters (missed beats, default offline_after) are bound by [`refresh_steady`] in
/// text order, before the VALUES.
const REFRESH_STEADY: &str = "UPDATE devices SET \
         last_seen_at = coalesce(v.column3, devices.last_seen_at), \
         device_time = coalesce(v.column4, devices.device_time), \
         clock_skew_ms = coalesce(v.column5, devices.clock_skew_ms), \
         error = v.column6, \
         interval_ms = coalesce(v.column7, devices.interval_ms), \
         uptime_seconds = coalesce(v.column8, devices.uptime_seconds), \
         free_memory = coalesce(v.column9, devices.free_memory), \
         firmware_version = coalesce(v.column10, devices.firmware_version), \
         hostname = coalesce(v.column11, devices.hostname), \
         os_info = coalesce(v.column12, devices.os_info), \
         metrics = coalesce(v.column13, devices.metrics), \
         labels = CASE WHEN v.column14 IS NULL THEN devices.labels \
             ELSE json_patch(coalesce(devices.labels, '{}'), v.column14) END, \
         parent = CASE WHEN v.column15 IS NULL THEN devices.parent \
             ELSE nullif(v.column15, '') END, \
         deadline_at = coalesce(v.column3, devices.last_seen_at) + coalesce(\
             devices.offline_after_ms, coalesce(v.column7, devices.interval_ms) * ";

/// The condition after the VALUES: the stored status is still the expected one.
const REFRESH_STEADY_WHERE: &str = ") AS v \
     WHERE devices.device_id = v.column1 AND devices.status = v.column2";

/// While label rules are configured, also: the update's labels change none of the
/// stored ones (see [`rules::steady`]). Such a refresh says which rows it wrote: a
/// row left alone may hold the expected status.
const REFRESH_STEADY_LABELS_KEPT: &str = " AND (v.column14 IS NULL \
         OR json_patch(coalesce(devices.labels, '{}'), v.column14) = devices.labels) \
     RETURNING devices.device_id";

const INSERT_EVENTS: &str = "INSERT INTO status_events (event_id, device_id, status, \
     previous_status, reason, last_seen_at, changed_at, error) ";

/// Column lists as literals, so `concat!` can build `&'static str` queries from them.
macro_rules! event_columns {
    () => {
        "seq, event_id, device_id, status, previous_status, reason, last_seen_at, changed_at, \
         error"
    };
}

// After the macros above, which it uses.
mod notifications;
mod silences;

macro_rules! device_columns {
    () => {
        "device_id, status, last_seen_at, first_seen_at, status_changed_at, registered_at, \
         device_time, clock_skew_ms, error, offline_after_ms, interval_ms, deadline_at, \
         labels, uptime_seconds, free_memory, firmware_version, hostname, os_info, metrics, \
         parent"
    };
}

/// Largest chunk of rows per statement: 1024 rows of 20 columns stay well under
/// SQLite's 32,766 bound parameters.
const MAX_CHUNK: usize = 1024;

/// Splits `rows` into chunks of `MAX_CHUNK` and then powers of two, so every chunk
/// has one of eleven sizes and each statement shape is prepared once.
fn chunks<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if rows.is_empty() {
            return None;
        }
        let size = if rows.len() >= MAX_CHUNK {
            MAX_CHUNK
        } else {
            1 << rows.len().ilog2()
        };
        let (chunk, rest) = rows.split_at(size);
        rows = rest;
        Some(chunk)
    })
}

/// Writes the rows [`rules::decide`] returned: inserted, or updated where a device
/// exists (a column the update leaves NULL keeps its stored value). `current` holds
/// the devices that existed when read.
async fn upsert_devices(
    tx: &mut WriteTx,
    rows: &[rules::Row<'_>],
    current: &HashMap<String, Current>,
) -> Result<(), StoreError> {
    for chunk in chunks(rows) {
        let reports = chunk
            .iter()
            .map(|row| ReportColumns::new(&row.update.report))
            .collect::<Result<Vec<_>, _>>()?;
        let mut query = QueryBuilder::<Sqlite>::new(INSERT_DEVICES);
        query.push_values(chunk.iter().zip(reports), |mut values, (row, report)| {
            let seen = row.update.last_seen.map(Timestamp::unix_millis);
            let changed = row.status_changed_at.unix_millis();
            values
                .push_bind(row.update.device.to_string())
                .push_bind(row.status.as_str())
                .push_bind(seen)
                .push_bind(seen)
                .push_bind(changed)
                .push_bind(changed)
                .push_bind(row.update.device_time.map(Timestamp::unix_millis))
                .push_bind(row.update.clock_skew_ms)
                .push_bind(row.error.map(str::to_string))
                .push_bind(row.update.interval.map(deadline::millis))
                .push_bind(row.deadline_at.map(Timestamp::unix_millis))
                .push_bind(row.update.labels.as_ref().map(Labels::to_json));
            report.bind(&mut values);
            // A new device has no parent to keep: its row takes no `''` (clear).
            let parent = parent_change(row.update);
            let parent = if current.contains_key(row.update.device.as_str()) {
                parent
            } else {
                parent.filter(|p| !p.is_empty())
            };
            values
                .push_bind(parent.map(str::to_string))
                .push_bind(row.rule.map(deadline::millis));
        });
        query.push(ON_CONFLICT_UPDATE);
        query.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Makes the [`rules::steady`] refreshes, in place, where the stored status is still
/// the expected one (the condition is checked inside the write, so a device another
/// process took offline meanwhile is not touched) and, while label rules are
/// configured, their labels change nothing; returns the ids of those it could not
/// (their stored status differs, they are unknown, or their labels change): they take
/// the full path. One UPDATE per chunk; without rules only a chunk that did not update
/// every row is looked at again, inside the same write transaction.
async fn refresh_steady(
    tx: &mut WriteTx,
    refreshes: &[Refresh<'_>],
    deadlines: &Deadlines,
) -> Result<std::collections::HashSet<String>, StoreError> {
    let mut missed = std::collections::HashSet::new();
    for chunk in chunks(refreshes) {
        let reports = chunk
            .iter()
            .map(|refresh| ReportColumns::new(&refresh.update.report))
            .collect::<Result<Vec<_>, _>>()?;
        let mut query = QueryBuilder::<Sqlite>::new(REFRESH_STEADY);
        // The deadline's two parameters, in text order: before the VALUES.
        query
            .push_bind(deadlines.missed_beats_i64())
            .push(", devices.rule_ms, ")
            .push_bind(deadlines.default_ms())
            .push(") FROM (");
        query.push_values(
            chunk.iter().zip(reports),
            |mut values, (refresh, report)| {
                let update = refresh.update;
                values
                    .push_bind(update.device.to_string())
                    .push_bind(refresh.status.as_str())
                    .push_bind(update.last_seen.map(Timestamp::unix_millis))
                    .push_bind(update.device_time.map(Timestamp::unix_millis))
                    .push_bind(update.clock_skew_ms)
                    .push_bind(refresh.error.map(str::to_string))
                    .push_bind(update.interval.map(deadline::millis));
                report.bind(&mut values);
                values
                    .push_bind(update.labels.as_ref().map(Labels::to_json))
                    .push_bind(parent_change(update).map(str::to_string));
            },
        );
        query.push(REFRESH_STEADY_WHERE);
        if !deadlines.rules.is_empty() {
            query.push(REFRESH_STEADY_LABELS_KEPT);
            let refreshed: std::collections::HashSet<String> = query
                .build()
                .fetch_all(&mut **tx)
                .await?
                .iter()
                .map(|row| row.try_get("device_id"))
                .collect::<Result<_, _>>()?;
            missed.extend(
                chunk
                    .iter()
                    .map(|r| r.update.device.as_str())
                    .filter(|id| !refreshed.contains(*id))
                    .map(str::to_string),
            );
            continue;
        }
        // Without rules, the row count is enough (RETURNING cost a tenth of the
        // throughput in `bench/run.sh --only db`).
        let refreshed = query.build().execute(&mut **tx).await?.rows_affected();
        if refreshed == chunk.len() as u64 {
            continue;
        }
        if refreshed == 0 {
            // Typically a chunk of new devices: nothing to tell apart.
            missed.extend(chunk.iter().map(|r| r.update.device.to_string()));
            continue;
        }
        // The fast path leaves statuses alone, so a row refreshed above still holds the
        // status it was matched on.
        let ids: Vec<&str> = chunk.iter().map(|r| r.update.device.as_str()).collect();
        let stored = read_current(tx, &ids).await?;
        for refresh in chunk {
            if stored.get(refresh.update.device.as_str()).map(|c| c.status) != Some(refresh.status)
            {
                missed.insert(refresh.update.device.to_string());
            }
        }
    }
    Ok(missed)
}

/// The stored state of the devices `ids` names, by id; unknown ones are absent.
async fn read_current(
    tx: &mut WriteTx,
    ids: &[&str],
) -> Result<HashMap<String, Current>, StoreError> {
    let mut current = HashMap::with_capacity(ids.len());
    for row in sqlx::query(SELECT_CURRENT)
        .bind(to_json(&ids)?)
        .fetch_all(&mut **tx)
        .await?
    {
        current.insert(
            row.try_get("device_id")?,
            Current {
                status: row.status("status")?,
                last_seen_at: row.time("last_seen_at")?,
                status_changed_at: row.required_time("status_changed_at")?,
                error: row.try_get("error")?,
                offline_after: row.int("offline_after_ms")?.map(deadline::from_millis),
                interval: row.int("interval_ms")?.map(deadline::from_millis),
                labels: row.json("labels")?.unwrap_or_default(),
            },
        );
    }
    Ok(current)
}

async fn insert_events(tx: &mut WriteTx, events: &[StatusEvent]) -> Result<(), StoreError> {
    for chunk in chunks(events) {
        let mut query = QueryBuilder::<Sqlite>::new(INSERT_EVENTS);
        query.push_values(chunk, |mut values, event| {
            values
                .push_bind(event.event_id.to_string())
                .push_bind(event.device_id.to_string())
                .push_bind(event.status.as_str())
                .push_bind(event.previous_status.map(Status::as_str))
                .push_bind(event.reason.as_str())
                .push_bind(event.last_seen_at.map(Timestamp::unix_millis))
                .push_bind(event.changed_at.unix_millis())
                .push_bind(event.error.clone());
        });
        query.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Ends a write that changed one device and returned its row: commits and decodes
/// it, or, when no row matched, rolls back and says the device does not exist.
async fn updated_device(
    tx: WriteTx,
    row: Option<SqliteRow>,
    id: &DeviceId,
) -> Result<Device, StoreError> {
    let Some(row) = row else {
        tx.rollback().await;
        return Err(StoreError::NotFound(id.clone()));
    };
    let written = device(&row)?;
    tx.commit().await?;
    Ok(written)
}

async fn count_devices(tx: &mut WriteTx) -> Result<u64, StoreError> {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM devices")
        .fetch_one(&mut **tx)
        .await?;
    Ok(u64::try_from(count).unwrap_or(0))
}

fn to_json<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[async_trait]
impl Store for SqliteStore {
    async fn apply(
        &self,
        updates: &[DeviceUpdate],
        new: NewDevices,
    ) -> Result<Applied, StoreError> {
        if updates.is_empty() {
            return Ok(Applied::default());
        }
        let mut tx = self.write().await?;
        // Most of a flush is devices that keep their status: refresh those in place,
        // then read, decide and write only the rest.
        let steady: Vec<Refresh<'_>> = updates.iter().filter_map(rules::steady).collect();
        let missed = refresh_steady(&mut tx, &steady, &self.deadlines).await?;
        let updates: Vec<&DeviceUpdate> = updates
            .iter()
            .filter(|u| rules::steady(u).is_none() || missed.contains(u.device.as_str()))
            .collect();
        if updates.is_empty() {
            tx.commit().await?;
            return Ok(Applied::default());
        }
        let ids: Vec<&str> = updates.iter().map(|u| u.device.as_str()).collect();
        let current = read_current(&mut tx, &ids).await?;
        let newcomers = rules::newcomers(&updates, &current);
        // The count is a scan: only a cap with someone to admit needs it.
        let stored = match new.max_devices {
            Some(_) if !newcomers.is_empty() => count_devices(&mut tx).await?,
            _ => 0,
        };
        let refused = registration::admit(newcomers, stored, new);
        let Decision { rows, events } =
            rules::decide(&updates, &current, &refused, &self.deadlines);
        upsert_devices(&mut tx, &rows, &current).await?;
        insert_events(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(Applied {
            events,
            refused: refused.into_iter().collect(),
        })
    }

    async fn mark_offline(
        &self,
        now: Timestamp,
        heard_since: Timestamp,
    ) -> Result<Vec<StatusEvent>, StoreError> {
        let mut tx = self.write().await?;
        let mut events = Vec::new();
        // One statement per watched status, so each knows the status it replaces. The
        // range is the (status, deadline_at) index's; the grace condition (the
        // device's offline_after has passed since the hub could hear it) only filters
        // what the range found.
        for (from, transition) in rules::timeouts() {
            let rows = sqlx::query(
                "UPDATE devices SET status = ?1, status_changed_at = ?2 \
                 WHERE status = ?3 AND deadline_at < ?2 \
                     AND deadline_at - last_seen_at < ?2 - ?4 \
                 RETURNING device_id, last_seen_at",
            )
            .bind(transition.to.as_str())
            .bind(now.unix_millis())
            .bind(from.as_str())
            .bind(heard_since.unix_millis())
            .fetch_all(&mut *tx)
            .await?;
            for row in rows {
                events.push(StatusEvent::new(
                    row.device_id("device_id")?,
                    transition,
                    row.time("last_seen_at")?,
                    now,
                ));
            }
        }
        insert_events(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(events)
    }

    async fn set_labels(&self, id: &DeviceId, labels: &Labels) -> Result<Device, StoreError> {
        let mut tx = self.write().await?;
        // The whole set changes, so may the label rule and the deadline with it.
        let row = sqlx::query(concat!(
            "UPDATE devices SET labels = ?2, rule_ms = ?3, deadline_at = last_seen_at + ",
            offline_after!("offline_after_ms", "interval_ms", "?4", "?3", "?5"),
            " WHERE device_id = ?1 RETURNING ",
            device_columns!()
        ))
        .bind(id.as_str())
        .bind(labels.to_json())
        .bind(self.deadlines.rule(labels).map(deadline::millis))
        .bind(self.deadlines.missed_beats_i64())
        .bind(self.deadlines.default_ms())
        .fetch_optional(&mut *tx)
        .await?;
        updated_device(tx, row, id).await
    }

    async fn set_offline_after(
        &self,
        id: &DeviceId,
        offline_after: Option<Duration>,
    ) -> Result<Device, StoreError> {
        let mut tx = self.write().await?;
        let row = sqlx::query(concat!(
            "UPDATE devices SET offline_after_ms = ?2, deadline_at = last_seen_at + ",
            offline_after!("?2", "interval_ms", "?3", "rule_ms", "?4"),
            " WHERE device_id = ?1 RETURNING ",
            device_columns!()
        ))
        .bind(id.as_str())
        .bind(offline_after.map(deadline::millis))
        .bind(self.deadlines.missed_beats_i64())
        .bind(self.deadlines.default_ms())
        .fetch_optional(&mut *tx)
        .await?;
        updated_device(tx, row, id).await
    }

    async fn set_parent(
        &self,
        id: &DeviceId,
        parent: Option<&DeviceId>,
    ) -> Result<Device, StoreError> {
        let mut tx = self.write().await?;
        let row = sqlx::query(concat!(
            "UPDATE devices SET parent = ?2 WHERE device_id = ?1 RETURNING ",
            device_columns!()
        ))
        .bind(id.as_str())
        .bind(parent.map(DeviceId::as_str))
        .fetch_optional(&mut *tx)
        .await?;
        updated_device(tx, row, id).await
    }

    async fn count_children(
        &self,
        parents: &[DeviceId],
    ) -> Result<HashMap<DeviceId, u64>, StoreError> {
        if parents.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<&str> = parents.iter().map(DeviceId::as_str).collect();
        sqlx::query(
            "SELECT parent, count(*) AS n FROM devices \
             WHERE parent IN (SELECT value FROM json_each(?1)) GROUP BY parent",
        )
        .bind(to_json(&ids)?)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            let n: i64 = row.try_get("n")?;
            Ok((row.device_id("parent")?, u64::try_from(n).unwrap_or(0)))
        })
        .collect()
    }

    async fn devices_by_id(&self, ids: &[DeviceId]) -> Result<Vec<Device>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = ids.iter().map(DeviceId::as_str).collect();
        sqlx::query(concat!(
            "SELECT ",
            device_columns!(),
            " FROM devices WHERE device_id IN (SELECT value FROM json_each(?1))"
        ))
        .bind(to_json(&ids)?)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(device)
        .collect()
    }

    async fn register(
        &self,
        id: &DeviceId,
        now: Timestamp,
        max_devices: Option<u64>,
    ) -> Result<StatusEvent, StoreError> {
        let transition = status::transition(None, Signal::Register)
            .ok_or_else(|| StoreError::Corrupt("registration has no transition".into()))?;
        let mut tx = self.write().await?;
        if let Some(max) = max_devices
            && count_devices(&mut tx).await? >= max
        {
            // A device that exists is a conflict, whatever the count.
            let exists: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM devices WHERE device_id = ?1")
                    .bind(id.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
            tx.rollback().await;
            return Err(match exists {
                Some(_) => StoreError::AlreadyExists(id.clone()),
                None => StoreError::DeviceLimit(max),
            });
        }
        let inserted = sqlx::query(
            "INSERT INTO devices (device_id, status, status_changed_at, registered_at) \
             VALUES (?1, ?2, ?3, ?3) ON CONFLICT (device_id) DO NOTHING",
        )
        .bind(id.as_str())
        .bind(transition.to.as_str())
        .bind(now.unix_millis())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            tx.rollback().await;
            return Err(StoreError::AlreadyExists(id.clone()));
        }
        let event = StatusEvent::new(id.clone(), transition, None, now);
        insert_events(&mut tx, std::slice::from_ref(&event)).await?;
        tx.commit().await?;
        Ok(event)
    }

    async fn unpublished(&self, after_seq: i64, limit: u32) -> Result<Vec<OutboxItem>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            event_columns!(),
            " FROM status_events WHERE published_at IS NULL AND seq > ?1 ORDER BY seq LIMIT ?2"
        ))
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(outbox_item)
        .collect()
    }

    async fn mark_published(&self, seqs: &[i64], at: Timestamp) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE status_events SET published_at = ?1 \
             WHERE seq IN (SELECT value FROM json_each(?2)) AND published_at IS NULL",
        )
        .bind(at.unix_millis())
        .bind(to_json(&seqs)?)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn current_events(
        &self,
        after: Option<&DeviceId>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        sqlx::query(
            "SELECT e.seq, e.event_id, e.device_id, e.status, e.previous_status, e.reason, \
                 e.last_seen_at, e.changed_at, e.error \
             FROM devices AS d JOIN status_events AS e ON e.seq = \
                 (SELECT max(seq) FROM status_events WHERE device_id = d.device_id) \
             WHERE d.device_id > ?1 AND e.published_at IS NOT NULL \
             ORDER BY d.device_id LIMIT ?2",
        )
        .bind(after.map_or("", DeviceId::as_str))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(stored_event)
        .collect()
    }

    async fn device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            device_columns!(),
            " FROM devices WHERE device_id = ?1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(device)
        .transpose()
    }

    async fn devices(&self, query: &DeviceQuery) -> Result<Vec<Device>, StoreError> {
        // One statement shape per combination of filters, so each can use its index:
        // (status, device_id) for a status, the primary key for prefixes and paging.
        let mut sql = QueryBuilder::<Sqlite>::new(concat!(
            "SELECT ",
            device_columns!(),
            " FROM devices WHERE true"
        ));
        if let Some(status) = query.status {
            sql.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(prefix) = &query.prefix {
            // Every id character sorts below '~', so [prefix, prefix + "~") is the range.
            sql.push(" AND device_id >= ")
                .push_bind(prefix.clone())
                .push(" AND device_id < ")
                .push_bind(format!("{prefix}~"));
        }
        if let Some(after) = &query.after {
            sql.push(" AND device_id > ").push_bind(after.to_string());
        }
        // The partial index on (parent, device_id): a gateway's children in id order.
        if let Some(parent) = &query.parent {
            sql.push(" AND parent = ").push_bind(parent.to_string());
        }
        // Keys are plain (letters, digits, `_ . / -`), so a quoted path is safe. No
        // index: a label filter reads devices in id order until the page is full.
        for label in &query.labels {
            sql.push(" AND json_extract(labels, ")
                .push_bind(format!("$.\"{}\"", label.key))
                .push(") = ")
                .push_bind(label.value.clone());
        }
        sql.push(" ORDER BY device_id LIMIT ")
            .push_bind(query.limit);
        sql.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(device)
            .collect()
    }

    async fn events(
        &self,
        id: &DeviceId,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            event_columns!(),
            " FROM status_events WHERE device_id = ?1 AND seq < ?2 AND reason <> ?4 \
             ORDER BY seq DESC LIMIT ?3"
        ))
        .bind(id.as_str())
        .bind(before_seq.unwrap_or(i64::MAX))
        .bind(limit)
        .bind(TOMBSTONE)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(stored_event)
        .collect()
    }

    async fn summary(&self) -> Result<Summary, StoreError> {
        let mut summary = Summary::default();
        for row in sqlx::query("SELECT status, count(*) AS n FROM devices GROUP BY status")
            .fetch_all(&self.pool)
            .await?
        {
            *summary.slot(row.status("status")?) = row.unsigned("n")?.unwrap_or(0);
        }
        Ok(summary)
    }

    async fn delete(&self, id: &DeviceId, now: Timestamp) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        let status: Option<String> =
            sqlx::query_scalar("DELETE FROM devices WHERE device_id = ?1 RETURNING status")
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        let Some(status) = status else {
            tx.rollback().await;
            return Err(StoreError::NotFound(id.clone()));
        };
        sqlx::query("DELETE FROM status_events WHERE device_id = ?1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM device_credentials WHERE device_id = ?1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO status_events (event_id, device_id, status, reason, changed_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(Uuid::now_v7().to_string())
        .bind(id.as_str())
        .bind(status)
        .bind(TOMBSTONE)
        .bind(now.unix_millis())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn set_credential(
        &self,
        id: &DeviceId,
        credential: &CredentialHash,
    ) -> Result<(), StoreError> {
        // One writer at a time (BEGIN IMMEDIATE): no delete can slip in between.
        let mut tx = self.write().await?;
        let written = sqlx::query(
            "INSERT INTO device_credentials (device_id, salt, secret_hash) \
             SELECT device_id, ?2, ?3 FROM devices WHERE device_id = ?1 \
             ON CONFLICT (device_id) DO UPDATE \
             SET salt = excluded.salt, secret_hash = excluded.secret_hash",
        )
        .bind(id.as_str())
        .bind(&credential.salt[..])
        .bind(&credential.hash[..])
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if written == 0 {
            tx.rollback().await;
            return Err(StoreError::NotFound(id.clone()));
        }
        tx.commit().await?;
        Ok(())
    }

    async fn credential(&self, id: &DeviceId) -> Result<Option<CredentialHash>, StoreError> {
        let row: Option<(Vec<u8>, Vec<u8>)> =
            sqlx::query_as("SELECT salt, secret_hash FROM device_credentials WHERE device_id = ?1")
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await?;
        row.map(|(salt, hash)| {
            CredentialHash::from_parts(&salt, &hash)
                .ok_or_else(|| corrupt(format!("device {id}: credential of the wrong length")))
        })
        .transpose()
    }

    async fn revoke_credential(&self, id: &DeviceId) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM devices WHERE device_id = ?1")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            tx.rollback().await;
            return Err(StoreError::NotFound(id.clone()));
        }
        sqlx::query("DELETE FROM device_credentials WHERE device_id = ?1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn create_silence(
        &self,
        new: &crate::silence::NewSilence,
        now: Timestamp,
    ) -> Result<crate::silence::Silence, StoreError> {
        self.insert_silence(new, now).await
    }

    async fn silences(
        &self,
        ending_after: Timestamp,
    ) -> Result<Vec<crate::silence::Silence>, StoreError> {
        self.silences_ending_after(ending_after).await
    }

    async fn expire_silence(
        &self,
        id: i64,
        now: Timestamp,
    ) -> Result<crate::silence::Silence, StoreError> {
        self.end_silence(id, now).await
    }
}

impl Columns for SqliteRow {
    fn text(&self, column: &str) -> Result<Option<String>, StoreError> {
        Ok(self.try_get(column)?)
    }

    fn int(&self, column: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.try_get(column)?)
    }

    fn time(&self, column: &str) -> Result<Option<Timestamp>, StoreError> {
        Ok(self.int(column)?.map(Timestamp::from_unix_millis))
    }

    fn uuid(&self, column: &str) -> Result<Option<Uuid>, StoreError> {
        self.text(column)?
            .map(|text| Uuid::parse_str(&text).map_err(|e| corrupt(format!("{column}: {e}"))))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (SqliteStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        let store = SqliteStore::open(&url, crate::storage::conformance::DEADLINES)
            .await
            .expect("open store");
        (store, dir)
    }

    /// A changed `heartbeat.offline_after` applies, at the next start, to devices
    /// already waiting; a device's own setting and its interval still come first.
    #[tokio::test]
    async fn reopening_with_another_default_moves_the_deadlines_that_follow_it() {
        let (store, dir) = store().await;
        let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(store);
        let mut batch = crate::update::Batch::default();
        for name in ["plain", "own"] {
            batch.add_heartbeat(
                DeviceId::parse(name).expect("id"),
                Timestamp::from_unix_millis(1_000),
                crate::update::Heartbeat {
                    healthy: true,
                    ..Default::default()
                },
            );
        }
        store
            .apply(&batch.take(), NewDevices::UNLIMITED)
            .await
            .expect("apply");
        let own = DeviceId::parse("own").expect("id");
        store
            .set_offline_after(&own, Some(Duration::from_secs(5)))
            .await
            .expect("set");
        drop(store);
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        let reopened = SqliteStore::open(
            &url,
            Deadlines {
                default: Duration::from_secs(60),
                missed_beats: 3,
                rules: Vec::new(),
            },
        )
        .await
        .expect("reopen");
        let deadline = |d: Option<Device>| d.expect("exists").deadline_at;
        let plain = DeviceId::parse("plain").expect("id");
        assert_eq!(
            deadline(reopened.device(&plain).await.expect("read")),
            Some(Timestamp::from_unix_millis(61_000))
        );
        assert_eq!(
            deadline(reopened.device(&own).await.expect("read")),
            Some(Timestamp::from_unix_millis(6_000))
        );
    }

    crate::storage::conformance::store_conformance!(store().await);
    crate::storage::conformance::label_rules_conformance!({
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        move |deadlines| {
            // The directory lives as long as the closure, which the test holds.
            let (url, _dir) = (url.clone(), &dir);
            async move {
                let store = SqliteStore::open(&url, deadlines)
                    .await
                    .expect("open store");
                std::sync::Arc::new(store) as std::sync::Arc<dyn Store>
            }
        }
    });
    crate::storage::notify_conformance::notification_conformance!(store().await);
    crate::storage::silence_conformance::silence_conformance!(store().await);
}
