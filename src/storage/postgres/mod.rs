//! The PostgreSQL store: one database several hubs can share. It reads and writes;
//! [`crate::rules`] decides what a flush writes.
//!
//! Rows travel as one array per column, unpacked with `UNNEST`: a flush of any size is
//! one statement of one shape, prepared once.
//!
//! Several writers run at once (the heartbeat flush, the offline check, the API; and
//! with several hubs, several of each), so the store says what SQLite's single writer
//! gave for free:
//! - A decision is made on locked rows. Devices that keep their status are refreshed
//!   with one conditional `UPDATE` (only where the stored status is still the expected
//!   one, which PostgreSQL re-checks on the newest row version); the rest are read
//!   `FOR UPDATE`, in id order, then decided and written. A device that did not exist
//!   when read is inserted only if it still does not (`ON CONFLICT DO NOTHING`); one
//!   another writer inserted meanwhile is read and decided again.
//! - The offline check takes devices `FOR UPDATE SKIP LOCKED`: a device a flush is
//!   refreshing is left to the next pass, so checkers never wait on flushes, never
//!   deadlock with them, and each overdue device is taken by exactly one checker.
//! - The event log's `seq` is commit order: a transaction takes [`OUTBOX_LOCK`] before
//!   it adds events and holds it to its commit, so the publisher's and the sinks'
//!   cursors never pass a number that has yet to commit. Holding it, a transaction only
//!   inserts events and commits, so it never waits on anything but the disk.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, QueryBuilder, Row};
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
use crate::update::DeviceUpdate;

/// The advisory lock that orders the event log (see the module's documentation). Any
/// constant works as long as every hub uses the same one: "fltw" in ASCII.
pub const OUTBOX_LOCK: i64 = 0x666c_7477;

/// The channel a transaction that adds events notifies on commit: the leading hub
/// listens, so a transition another hub commits is published at once.
pub const OUTBOX_CHANNEL: &str = "fleetwatch_outbox";

/// How many times a flush decides again for devices another writer inserted between
/// its read and its write. Each round can only lose devices that were new when read,
/// and a device exists for good once inserted, so a second round always settles.
const DECIDE_ROUNDS: usize = 3;

/// A device's `offline_after` as an SQL interval, by the rules of
/// [`crate::deadline::Deadlines`]: its own setting, else its interval times the missed
/// beats, else its label rule's, else the default (each the SQL expression given, in
/// milliseconds).
macro_rules! offline_after {
    ($own:literal, $interval:literal, $missed:literal, $rule:literal, $default:literal) => {
        concat!(
            "coalesce(",
            $own,
            ", ",
            $interval,
            " * ",
            $missed,
            "::bigint, ",
            $rule,
            ", ",
            $default,
            "::bigint) * interval '1 millisecond'"
        )
    };
}

/// Connection settings of the PostgreSQL store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgSettings {
    /// Connections in the pool: the flush, the checker, the publisher, each sink and
    /// the API share it.
    pub max_connections: u32,
    /// The server cancels a statement running longer than this; a stuck statement
    /// then fails like any other write and is retried.
    pub statement_timeout: Duration,
}

impl Default for PgSettings {
    fn default() -> Self {
        Self {
            max_connections: 10,
            statement_timeout: Duration::from_secs(30),
        }
    }
}

pub struct PgStore {
    pool: PgPool,
    deadlines: Deadlines,
}

impl PgStore {
    /// Connects to the database `url` names (`postgres://…`) and runs the migrations
    /// (several hubs starting at once are serialised by sqlx's migration lock), with
    /// the default [`Deadlines`].
    pub async fn connect(url: &str, settings: PgSettings) -> Result<Self, StoreError> {
        Self::open(url, settings, Deadlines::default()).await
    }

    /// Connects as [`Self::connect`] does, and brings every stored deadline in line
    /// with `deadlines`. Hubs sharing a database must share `heartbeat.offline_after`
    /// and `heartbeat.missed_beats`; the last one started sets the stored deadlines.
    pub async fn open(
        url: &str,
        settings: PgSettings,
        deadlines: Deadlines,
    ) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .connect_with(Self::options(url, settings)?)
            .await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        let store = Self { pool, deadlines };
        store.rematch_rules().await?;
        store.reschedule().await?;
        Ok(store)
    }

    /// Brings every device's stored label rule (`rule_ms`) in line with the configured
    /// rules: the labelled devices are read a page at a time and those whose rule
    /// changed are rewritten. Without rules, [`Self::reschedule`] clears them in its
    /// own scan.
    async fn rematch_rules(&self) -> Result<(), StoreError> {
        if self.deadlines.rules.is_empty() {
            return Ok(());
        }
        let mut after = String::new();
        let mut changed = 0u64;
        loop {
            let rows = sqlx::query(
                "SELECT device_id, labels::text AS labels, rule_ms FROM devices \
                 WHERE device_id > $1 AND labels IS NOT NULL ORDER BY device_id LIMIT 10000",
            )
            .bind(&after)
            .fetch_all(&self.pool)
            .await?;
            let Some(last) = rows.last() else { break };
            after = last.try_get("device_id")?;
            let (mut ids, mut moved) = (Vec::new(), Vec::new());
            for row in &rows {
                let labels: Labels = row.json("labels")?.unwrap_or_default();
                let rule = self.deadlines.rule(&labels).map(deadline::millis);
                if rule != row.int("rule_ms")? {
                    ids.push(row.try_get::<String, _>("device_id")?);
                    moved.push(rule);
                }
            }
            if ids.is_empty() {
                continue;
            }
            changed += ids.len() as u64;
            sqlx::query(
                "UPDATE devices SET rule_ms = v.rule \
                 FROM UNNEST($1::text[], $2::bigint[]) AS v(device_id, rule) \
                 WHERE devices.device_id = v.device_id",
            )
            .bind(ids)
            .bind(moved)
            .execute(&self.pool)
            .await?;
        }
        if changed > 0 {
            tracing::info!(devices = changed, "label rules matched again");
        }
        Ok(())
    }

    /// Rewrites the deadlines that differ from what `self.deadlines` makes of them:
    /// one scan, writing (and locking) only what changed.
    async fn reschedule(&self) -> Result<(), StoreError> {
        // Without rules the same scan clears the label rules a previous configuration
        // left.
        let query = if self.deadlines.rules.is_empty() {
            sqlx::query(concat!(
                "UPDATE devices SET rule_ms = NULL, deadline_at = last_seen_at + ",
                offline_after!("offline_after_ms", "interval_ms", "$1", "NULL", "$2"),
                " WHERE rule_ms IS NOT NULL OR (last_seen_at IS NOT NULL \
                     AND deadline_at IS DISTINCT FROM last_seen_at + ",
                offline_after!("offline_after_ms", "interval_ms", "$1", "NULL", "$2"),
                ")"
            ))
        } else {
            sqlx::query(concat!(
                "UPDATE devices SET deadline_at = last_seen_at + ",
                offline_after!("offline_after_ms", "interval_ms", "$1", "rule_ms", "$2"),
                " WHERE last_seen_at IS NOT NULL \
                     AND deadline_at IS DISTINCT FROM last_seen_at + ",
                offline_after!("offline_after_ms", "interval_ms", "$1", "rule_ms", "$2")
            ))
        };
        let moved = query
            .bind(self.deadlines.missed_beats_i64())
            .bind(self.deadlines.default_ms())
            .execute(&self.pool)
            .await?
            .rows_affected();
        if moved > 0 {
            tracing::info!(
                devices = moved,
                "deadlines moved to the configured offline_after"
            );
        }
        Ok(())
    }

    /// The connection options the hub uses for `url` (public so the benchmarks can
    /// hold a bare loop to the same settings).
    pub fn options(url: &str, settings: PgSettings) -> Result<PgConnectOptions, StoreError> {
        let timeout = settings.statement_timeout.as_millis().to_string();
        Ok(PgConnectOptions::from_str(url)
            .map_err(|_| StoreError::UnsupportedUrl(url.to_string()))?
            .application_name("fleetwatch")
            .options([("statement_timeout", timeout.as_str())]))
    }
}

fn time(t: Timestamp) -> DateTime<Utc> {
    t.to_datetime()
}

fn times(t: Option<Timestamp>) -> Option<DateTime<Utc>> {
    t.map(Timestamp::to_datetime)
}

impl Columns for PgRow {
    fn text(&self, column: &str) -> Result<Option<String>, StoreError> {
        Ok(self.try_get(column)?)
    }

    fn int(&self, column: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.try_get(column)?)
    }

    fn time(&self, column: &str) -> Result<Option<Timestamp>, StoreError> {
        Ok(self
            .try_get::<Option<DateTime<Utc>>, _>(column)?
            .map(Timestamp::from_datetime))
    }

    fn uuid(&self, column: &str) -> Result<Option<Uuid>, StoreError> {
        Ok(self.try_get(column)?)
    }
}

/// A report's and a heartbeat's optional columns, one array per column, for `UNNEST`.
#[derive(Default)]
struct Fields {
    ids: Vec<String>,
    seen: Vec<Option<DateTime<Utc>>>,
    device_time: Vec<Option<DateTime<Utc>>>,
    skew: Vec<Option<i64>>,
    error: Vec<Option<String>>,
    interval: Vec<Option<i64>>,
    uptime: Vec<Option<i64>>,
    memory: Vec<Option<i64>>,
    firmware: Vec<Option<String>>,
    hostname: Vec<Option<String>>,
    os_info: Vec<Option<String>>,
    metrics: Vec<Option<String>>,
    labels: Vec<Option<String>>,
    /// [`parent_change`]: NULL keeps the stored parent, `''` clears it.
    parent: Vec<Option<String>>,
}

impl Fields {
    fn with_capacity(n: usize) -> Self {
        let mut fields = Self::default();
        fields.ids.reserve(n);
        fields
    }

    fn push(&mut self, update: &DeviceUpdate, error: Option<&str>) -> Result<(), StoreError> {
        let json =
            |value: Option<Result<String, serde_json::Error>>| value.transpose().map_err(corrupt);
        let report = &update.report;
        self.ids.push(update.device.to_string());
        self.seen.push(times(update.last_seen));
        self.device_time.push(times(update.device_time));
        self.skew.push(update.clock_skew_ms);
        self.error.push(error.map(str::to_string));
        self.interval.push(update.interval.map(deadline::millis));
        self.uptime.push(clamp(report.uptime_seconds));
        self.memory.push(clamp(report.free_memory));
        self.firmware.push(report.firmware_version.clone());
        self.hostname.push(report.hostname.clone());
        self.os_info
            .push(json(report.os_info.as_ref().map(serde_json::to_string))?);
        self.metrics
            .push(json(report.metrics.as_ref().map(serde_json::to_string))?);
        self.labels
            .push(update.labels.as_ref().map(Labels::to_json));
        self.parent.push(parent_change(update).map(str::to_string));
        Ok(())
    }

    /// Binds the fourteen arrays as `$1..$14` of [`unnest_fields!`].
    fn bind<'q>(
        self,
        query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(self.ids)
            .bind(self.seen)
            .bind(self.device_time)
            .bind(self.skew)
            .bind(self.error)
            .bind(self.interval)
            .bind(self.uptime)
            .bind(self.memory)
            .bind(self.firmware)
            .bind(self.hostname)
            .bind(self.os_info)
            .bind(self.metrics)
            .bind(self.labels)
            .bind(self.parent)
    }
}

/// The arrays [`Fields::bind`] binds as `$1..$14`, unpacked into named columns of `v`,
/// followed by any further `array => column` pairs a statement binds after them.
macro_rules! unnest_fields {
    ($($array:literal => $column:literal),*) => {
        concat!(
            "UNNEST($1::text[], $2::timestamptz[], $3::timestamptz[], $4::bigint[], \
             $5::text[], $6::bigint[], $7::bigint[], $8::bigint[], $9::text[], $10::text[], \
             $11::text[], $12::text[], $13::text[], $14::text[]", $(", ", $array,)* ") \
             AS v(device_id, seen, device_time, skew, error, interval_ms, uptime, memory, \
                  firmware, hostname, os_info, metrics, labels, parent", $(", ", $column,)* ")"
        )
    };
}

/// The columns a write sets from [`unnest_fields!`], keeping a stored value where the
/// update has none. `last_seen_at` only moves forward: with several hubs an older
/// heartbeat can be flushed after a newer one.
macro_rules! set_fields {
    () => {
        "last_seen_at = greatest(v.seen, devices.last_seen_at), \
         device_time = coalesce(v.device_time, devices.device_time), \
         clock_skew_ms = coalesce(v.skew, devices.clock_skew_ms), \
         error = v.error, \
         interval_ms = coalesce(v.interval_ms, devices.interval_ms), \
         uptime_seconds = coalesce(v.uptime, devices.uptime_seconds), \
         free_memory = coalesce(v.memory, devices.free_memory), \
         firmware_version = coalesce(v.firmware, devices.firmware_version), \
         hostname = coalesce(v.hostname, devices.hostname), \
         os_info = coalesce(v.os_info::jsonb, devices.os_info), \
         metrics = coalesce(v.metrics::jsonb, devices.metrics), \
         labels = CASE WHEN v.labels IS NULL THEN devices.labels \
             ELSE coalesce(devices.labels, '{}'::jsonb) || v.labels::jsonb END, \
         parent = CASE WHEN v.parent IS NULL THEN devices.parent \
             ELSE nullif(v.parent, '') END"
    };
}

macro_rules! event_columns {
    () => {
        "seq, event_id, device_id, status, previous_status, reason, last_seen_at, changed_at, \
         error"
    };
}

macro_rules! device_columns {
    () => {
        "device_id, status, last_seen_at, first_seen_at, status_changed_at, registered_at, \
         device_time, clock_skew_ms, error, offline_after_ms, interval_ms, deadline_at, \
         labels::text AS labels, uptime_seconds, free_memory, firmware_version, hostname, \
         os_info::text AS os_info, metrics::text AS metrics, parent"
    };
}

pub mod leader;
// After the macros above, which it uses.
mod notifications;
mod silences;

/// Refreshes the devices that keep their status: in place, where the stored status is
/// still the expected one (PostgreSQL re-checks it on the newest version of a row
/// another writer changed meanwhile). Returns the ids it could not refresh (the stored
/// status differs, or the device is unknown): they take the full path.
/// The deadline is computed in the write from the stored setting, interval and label
/// rule (while rules are configured, a heartbeat whose labels change one is not
/// refreshed here: `$18`), with
/// the missed beats and default offline_after as `$16` and `$17`; `$18` says whether
/// label rules are configured.
const REFRESH_STEADY: &str = concat!(
    "UPDATE devices SET ",
    set_fields!(),
    ", deadline_at = greatest(v.seen, devices.last_seen_at) + ",
    offline_after!(
        "devices.offline_after_ms",
        "coalesce(v.interval_ms, devices.interval_ms)",
        "$16",
        "devices.rule_ms",
        "$17"
    ),
    " FROM ",
    unnest_fields!("$15::text[]" => "status"),
    // While label rules are configured ($18), the update's labels must change none
    // of the stored ones (see `rules::steady`).
    " WHERE devices.device_id = v.device_id AND devices.status = v.status \
         AND (NOT $18::boolean OR v.labels IS NULL \
             OR coalesce(devices.labels, '{}'::jsonb) || v.labels::jsonb = devices.labels) \
     RETURNING devices.device_id"
);

/// Writes decided rows of devices that existed when read (and are locked since).
const UPDATE_DECIDED: &str = concat!(
    "UPDATE devices SET status = v.status, status_changed_at = v.changed, \
         first_seen_at = coalesce(devices.first_seen_at, v.seen), \
         deadline_at = coalesce(v.deadline, devices.deadline_at), rule_ms = v.rule, ",
    set_fields!(),
    " FROM ",
    unnest_fields!(
        "$15::text[]" => "status",
        "$16::timestamptz[]" => "changed",
        "$17::timestamptz[]" => "deadline",
        "$18::bigint[]" => "rule"
    ),
    " WHERE devices.device_id = v.device_id"
);

/// Inserts decided rows of devices that did not exist when read, unless another
/// writer inserted them meanwhile; returns the ids inserted.
const INSERT_DECIDED: &str = concat!(
    "INSERT INTO devices (device_id, status, last_seen_at, first_seen_at, \
         status_changed_at, registered_at, device_time, clock_skew_ms, error, interval_ms, \
         deadline_at, uptime_seconds, free_memory, firmware_version, hostname, os_info, \
         metrics, labels, parent, rule_ms) \
     SELECT v.device_id, v.status, v.seen, v.seen, v.changed, v.changed, v.device_time, \
         v.skew, v.error, v.interval_ms, v.deadline, v.uptime, v.memory, v.firmware, \
         v.hostname, v.os_info::jsonb, v.metrics::jsonb, v.labels::jsonb, \
         nullif(v.parent, ''), v.rule FROM ",
    unnest_fields!(
        "$15::text[]" => "status",
        "$16::timestamptz[]" => "changed",
        "$17::timestamptz[]" => "deadline",
        "$18::bigint[]" => "rule"
    ),
    " ON CONFLICT (device_id) DO NOTHING RETURNING device_id"
);

const SELECT_CURRENT: &str = "SELECT device_id, status, last_seen_at, status_changed_at, error, \
         offline_after_ms, interval_ms, labels::text AS labels \
     FROM devices WHERE device_id = ANY($1) ORDER BY device_id FOR UPDATE";

const INSERT_EVENTS: &str = "INSERT INTO status_events (event_id, device_id, status, \
         previous_status, reason, last_seen_at, changed_at, error) \
     SELECT e.event_id, e.device_id, e.status, e.previous_status, e.reason, e.last_seen, \
         e.changed, e.error \
     FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
                 $6::timestamptz[], $7::timestamptz[], $8::text[]) WITH ORDINALITY \
         AS e(event_id, device_id, status, previous_status, reason, last_seen, changed, \
              error, n) \
     ORDER BY e.n";

async fn refresh_steady(
    tx: &mut PgConnection,
    refreshes: &[Refresh<'_>],
    deadlines: &Deadlines,
) -> Result<HashSet<String>, StoreError> {
    if refreshes.is_empty() {
        return Ok(HashSet::new());
    }
    let mut fields = Fields::with_capacity(refreshes.len());
    let mut expected = Vec::with_capacity(refreshes.len());
    for refresh in refreshes {
        fields.push(refresh.update, refresh.error)?;
        expected.push(refresh.status.as_str());
    }
    let refreshed = fields
        .bind(sqlx::query(REFRESH_STEADY))
        .bind(expected)
        .bind(deadlines.missed_beats_i64())
        .bind(deadlines.default_ms())
        .bind(!deadlines.rules.is_empty())
        .fetch_all(&mut *tx)
        .await?;
    not_returned(
        &refreshed,
        refreshes.iter().map(|r| r.update.device.as_str()),
    )
}

/// The stored state of the devices `ids` names, by id, locked until the transaction
/// ends (in id order, so two flushes lock shared devices in the same order); unknown
/// ones are absent.
async fn read_current(
    tx: &mut PgConnection,
    ids: &[&str],
) -> Result<HashMap<String, Current>, StoreError> {
    let mut current = HashMap::with_capacity(ids.len());
    for row in sqlx::query(SELECT_CURRENT)
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?
    {
        current.insert(
            row.try_get("device_id")?,
            Current {
                status: row.status("status")?,
                last_seen_at: row.time("last_seen_at")?,
                status_changed_at: row.required_time("status_changed_at")?,
                error: row.text("error")?,
                offline_after: row.int("offline_after_ms")?.map(deadline::from_millis),
                interval: row.int("interval_ms")?.map(deadline::from_millis),
                labels: row.json("labels")?.unwrap_or_default(),
            },
        );
    }
    Ok(current)
}

/// The ids of `wanted` whose rows a `… RETURNING device_id` statement did not return.
fn not_returned<'a>(
    returned: &[PgRow],
    wanted: impl Iterator<Item = &'a str>,
) -> Result<HashSet<String>, StoreError> {
    let returned: HashSet<String> = returned
        .iter()
        .map(|row| row.try_get("device_id"))
        .collect::<Result<_, _>>()?;
    Ok(wanted
        .filter(|id| !returned.contains(*id))
        .map(str::to_string)
        .collect())
}

/// `sql` (one of the `…_DECIDED` statements) with `rows` bound.
fn decided<'q>(
    sql: &'static str,
    rows: &[&rules::Row<'q>],
) -> Result<sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>, StoreError> {
    let mut fields = Fields::with_capacity(rows.len());
    let mut statuses = Vec::with_capacity(rows.len());
    let mut changed = Vec::with_capacity(rows.len());
    let mut deadline = Vec::with_capacity(rows.len());
    let mut rule = Vec::with_capacity(rows.len());
    for row in rows {
        fields.push(row.update, row.error)?;
        statuses.push(row.status.as_str());
        changed.push(time(row.status_changed_at));
        deadline.push(times(row.deadline_at));
        rule.push(row.rule.map(deadline::millis));
    }
    Ok(fields
        .bind(sqlx::query(sql))
        .bind(statuses)
        .bind(changed)
        .bind(deadline)
        .bind(rule))
}

/// Writes decided rows: updates those whose devices were read (and locked), inserts
/// the others unless another writer has meanwhile. Returns the ids of devices that
/// were new when read but exist now: their decision was made on a state that is gone.
async fn write_decided(
    tx: &mut PgConnection,
    rows: &[rules::Row<'_>],
    current: &HashMap<String, Current>,
) -> Result<HashSet<String>, StoreError> {
    let (known, new): (Vec<&rules::Row<'_>>, Vec<&rules::Row<'_>>) = rows
        .iter()
        .partition(|row| current.contains_key(row.update.device.as_str()));
    if !known.is_empty() {
        decided(UPDATE_DECIDED, &known)?.execute(&mut *tx).await?;
    }
    if new.is_empty() {
        return Ok(HashSet::new());
    }
    let inserted = decided(INSERT_DECIDED, &new)?.fetch_all(&mut *tx).await?;
    not_returned(&inserted, new.iter().map(|row| row.update.device.as_str()))
}

/// Appends `events` to the log in order, first taking [`OUTBOX_LOCK`] until the
/// transaction ends, so their seqs are commit order.
async fn insert_events(tx: &mut PgConnection, events: &[StatusEvent]) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    lock_outbox(tx).await?;
    let n = events.len();
    let (mut ids, mut devices, mut statuses, mut previous, mut reasons) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut seen, mut changed, mut errors) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for event in events {
        ids.push(event.event_id);
        devices.push(event.device_id.as_str());
        statuses.push(event.status.as_str());
        previous.push(event.previous_status.map(Status::as_str));
        reasons.push(event.reason.as_str());
        seen.push(times(event.last_seen_at));
        changed.push(time(event.changed_at));
        errors.push(event.error.as_deref());
    }
    sqlx::query(INSERT_EVENTS)
        .bind(ids)
        .bind(devices)
        .bind(statuses)
        .bind(previous)
        .bind(reasons)
        .bind(seen)
        .bind(changed)
        .bind(errors)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Takes [`OUTBOX_LOCK`] until the transaction ends, and tells the leading hub, when
/// the transaction commits, that the outbox has grown ([`OUTBOX_CHANNEL`]; PostgreSQL
/// folds a transaction's identical notifications into one).
async fn lock_outbox(tx: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1), pg_notify($2, '')")
        .bind(OUTBOX_LOCK)
        .bind(OUTBOX_CHANNEL)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The device an `UPDATE … RETURNING` of one device returned; none: it does not exist.
fn updated_device(row: Option<&PgRow>, id: &DeviceId) -> Result<Device, StoreError> {
    row.map(device)
        .transpose()?
        .ok_or_else(|| StoreError::NotFound(id.clone()))
}

async fn count_devices(tx: &mut PgConnection) -> Result<u64, StoreError> {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM devices")
        .fetch_one(&mut *tx)
        .await?;
    Ok(u64::try_from(count).unwrap_or(0))
}

#[async_trait]
impl Store for PgStore {
    async fn apply(
        &self,
        updates: &[DeviceUpdate],
        new: NewDevices,
    ) -> Result<Applied, StoreError> {
        if updates.is_empty() {
            return Ok(Applied::default());
        }
        // In id order: a batch arrives in hash order, and rows written in key order cost
        // PostgreSQL measurably less (index descents and pages touched in sequence:
        // 67,000 against 77,000-85,000 rows/s in `bench/run.sh --only pgdb`); two hubs writing
        // the same devices also lock them in the same order.
        let mut updates: Vec<&DeviceUpdate> = updates.iter().collect();
        updates.sort_unstable_by(|a, b| a.device.as_str().cmp(b.device.as_str()));
        let mut tx = self.pool.begin().await?;
        let steady: Vec<Refresh<'_>> = updates.iter().filter_map(|u| rules::steady(u)).collect();
        let missed = refresh_steady(&mut tx, &steady, &self.deadlines).await?;
        let mut pending: Vec<&DeviceUpdate> = updates
            .into_iter()
            .filter(|u| rules::steady(u).is_none() || missed.contains(u.device.as_str()))
            .collect();
        let mut applied = Applied::default();
        for _ in 0..DECIDE_ROUNDS {
            if pending.is_empty() {
                break;
            }
            let ids: Vec<&str> = pending.iter().map(|u| u.device.as_str()).collect();
            let current = read_current(&mut tx, &ids).await?;
            let newcomers = rules::newcomers(&pending, &current);
            let stored = match new.max_devices {
                Some(_) if !newcomers.is_empty() => count_devices(&mut tx).await?,
                _ => 0,
            };
            let refused = registration::admit(newcomers, stored, new);
            let Decision { rows, mut events } =
                rules::decide(&pending, &current, &refused, &self.deadlines);
            let lost = write_decided(&mut tx, &rows, &current).await?;
            events.retain(|e| !lost.contains(e.device_id.as_str()));
            applied.events.extend(events);
            applied.refused.extend(refused);
            pending.retain(|u| lost.contains(u.device.as_str()));
        }
        if !pending.is_empty() {
            return Err(StoreError::Corrupt(format!(
                "{} devices kept being inserted by another writer between read and write",
                pending.len()
            )));
        }
        insert_events(&mut tx, &applied.events).await?;
        tx.commit().await?;
        Ok(applied)
    }

    async fn mark_offline(
        &self,
        now: Timestamp,
        heard_since: Timestamp,
    ) -> Result<Vec<StatusEvent>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut events = Vec::new();
        // One statement per watched status, so each knows the status it replaces. The
        // range is the (status, deadline_at) index's; the grace condition (the
        // device's offline_after has passed since the hub could hear it) only filters
        // what the range found.
        for (from, transition) in rules::timeouts() {
            let rows = sqlx::query(
                "UPDATE devices SET status = $1, status_changed_at = $2 \
                 FROM (SELECT device_id FROM devices \
                       WHERE status = $3 AND deadline_at < $2 \
                           AND deadline_at - last_seen_at < $2 - $4 \
                       FOR UPDATE SKIP LOCKED) AS due \
                 WHERE devices.device_id = due.device_id \
                 RETURNING devices.device_id, devices.last_seen_at",
            )
            .bind(transition.to.as_str())
            .bind(time(now))
            .bind(from.as_str())
            .bind(time(heard_since))
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
        // The whole set changes, so may the label rule and the deadline with it.
        let row = sqlx::query(concat!(
            "UPDATE devices SET labels = $2::jsonb, rule_ms = $3::bigint, \
             deadline_at = last_seen_at + ",
            offline_after!("offline_after_ms", "interval_ms", "$4", "$3::bigint", "$5"),
            " WHERE device_id = $1 RETURNING ",
            device_columns!()
        ))
        .bind(id.as_str())
        .bind(labels.to_json())
        .bind(self.deadlines.rule(labels).map(deadline::millis))
        .bind(self.deadlines.missed_beats_i64())
        .bind(self.deadlines.default_ms())
        .fetch_optional(&self.pool)
        .await?;
        updated_device(row.as_ref(), id)
    }

    async fn set_offline_after(
        &self,
        id: &DeviceId,
        offline_after: Option<Duration>,
    ) -> Result<Device, StoreError> {
        let row = sqlx::query(concat!(
            "UPDATE devices SET offline_after_ms = $2::bigint, deadline_at = last_seen_at + ",
            offline_after!("$2::bigint", "interval_ms", "$3", "rule_ms", "$4"),
            " WHERE device_id = $1 RETURNING ",
            device_columns!()
        ))
        .bind(id.as_str())
        .bind(offline_after.map(deadline::millis))
        .bind(self.deadlines.missed_beats_i64())
        .bind(self.deadlines.default_ms())
        .fetch_optional(&self.pool)
        .await?;
        updated_device(row.as_ref(), id)
    }

    async fn set_parent(
        &self,
        id: &DeviceId,
        parent: Option<&DeviceId>,
    ) -> Result<Device, StoreError> {
        let row = sqlx::query(concat!(
            "UPDATE devices SET parent = $2 WHERE device_id = $1 RETURNING ",
            device_columns!()
        ))
        .bind(id.as_str())
        .bind(parent.map(DeviceId::as_str))
        .fetch_optional(&self.pool)
        .await?;
        updated_device(row.as_ref(), id)
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
            "SELECT parent, count(*) AS n FROM devices WHERE parent = ANY($1) GROUP BY parent",
        )
        .bind(ids)
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
            " FROM devices WHERE device_id = ANY($1)"
        ))
        .bind(ids)
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
        let mut tx = self.pool.begin().await?;
        if let Some(max) = max_devices
            && count_devices(&mut tx).await? >= max
        {
            // A device that exists is a conflict, whatever the count.
            let exists = sqlx::query_scalar::<_, i32>("SELECT 1 FROM devices WHERE device_id = $1")
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            return Err(match exists {
                Some(_) => StoreError::AlreadyExists(id.clone()),
                None => StoreError::DeviceLimit(max),
            });
        }
        let inserted = sqlx::query(
            "INSERT INTO devices (device_id, status, status_changed_at, registered_at) \
             VALUES ($1, $2, $3, $3) ON CONFLICT (device_id) DO NOTHING",
        )
        .bind(id.as_str())
        .bind(transition.to.as_str())
        .bind(time(now))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
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
            " FROM status_events WHERE published_at IS NULL AND seq > $1 ORDER BY seq LIMIT $2"
        ))
        .bind(after_seq)
        .bind(i64::from(limit))
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
        sqlx::query(
            "UPDATE status_events SET published_at = $1 \
             WHERE seq = ANY($2) AND published_at IS NULL",
        )
        .bind(time(at))
        .bind(seqs)
        .execute(&self.pool)
        .await?;
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
             FROM devices AS d CROSS JOIN LATERAL \
                 (SELECT * FROM status_events WHERE device_id = d.device_id \
                  ORDER BY seq DESC LIMIT 1) AS e \
             WHERE d.device_id > $1 AND e.published_at IS NOT NULL \
             ORDER BY d.device_id LIMIT $2",
        )
        .bind(after.map_or("", DeviceId::as_str))
        .bind(i64::from(limit))
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
            " FROM devices WHERE device_id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(device)
        .transpose()
    }

    async fn devices(&self, query: &DeviceQuery) -> Result<Vec<Device>, StoreError> {
        let mut sql = QueryBuilder::<Postgres>::new(concat!(
            "SELECT ",
            device_columns!(),
            " FROM devices WHERE true"
        ));
        if let Some(status) = query.status {
            sql.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(prefix) = &query.prefix {
            // Every id character sorts below '~' (ids compare bytewise: COLLATE "C").
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
        if !query.labels.is_empty() {
            // No index (see the migration): read in id order until the page is full.
            let wanted: std::collections::BTreeMap<&str, &str> = query
                .labels
                .iter()
                .map(|l| (l.key.as_str(), l.value.as_str()))
                .collect();
            sql.push(" AND labels @> ")
                .push_bind(serde_json::to_string(&wanted).map_err(corrupt)?)
                .push("::jsonb");
        }
        sql.push(" ORDER BY device_id LIMIT ")
            .push_bind(i64::from(query.limit));
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
            " FROM status_events WHERE device_id = $1 AND seq < $2 AND reason <> $4 \
             ORDER BY seq DESC LIMIT $3"
        ))
        .bind(id.as_str())
        .bind(before_seq.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
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
        let mut tx = self.pool.begin().await?;
        let status: Option<String> =
            sqlx::query_scalar("DELETE FROM devices WHERE device_id = $1 RETURNING status")
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        let Some(status) = status else {
            return Err(StoreError::NotFound(id.clone()));
        };
        sqlx::query("DELETE FROM status_events WHERE device_id = $1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        lock_outbox(&mut tx).await?;
        sqlx::query(
            "INSERT INTO status_events (event_id, device_id, status, reason, changed_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(Uuid::now_v7())
        .bind(id.as_str())
        .bind(status)
        .bind(TOMBSTONE)
        .bind(time(now))
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
        // A device deleted between the SELECT and the insert trips the foreign key:
        // the same answer as a device that was never there.
        let written = sqlx::query(
            "INSERT INTO device_credentials (device_id, salt, secret_hash) \
             SELECT device_id, $2, $3 FROM devices WHERE device_id = $1 \
             ON CONFLICT (device_id) DO UPDATE \
             SET salt = EXCLUDED.salt, secret_hash = EXCLUDED.secret_hash",
        )
        .bind(id.as_str())
        .bind(&credential.salt[..])
        .bind(&credential.hash[..])
        .execute(&self.pool)
        .await;
        match written {
            Ok(done) if done.rows_affected() > 0 => Ok(()),
            Ok(_) => Err(StoreError::NotFound(id.clone())),
            Err(sqlx::Error::Database(e)) if e.is_foreign_key_violation() => {
                Err(StoreError::NotFound(id.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn credential(&self, id: &DeviceId) -> Result<Option<CredentialHash>, StoreError> {
        let row: Option<(Vec<u8>, Vec<u8>)> =
            sqlx::query_as("SELECT salt, secret_hash FROM device_credentials WHERE device_id = $1")
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
        let exists: bool = sqlx::query_scalar(
            "WITH gone AS (DELETE FROM device_credentials WHERE device_id = $1) \
             SELECT EXISTS (SELECT 1 FROM devices WHERE device_id = $1)",
        )
        .bind(id.as_str())
        .fetch_one(&self.pool)
        .await?;
        if exists {
            Ok(())
        } else {
            Err(StoreError::NotFound(id.clone()))
        }
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

/// A database of its own for a test, created empty on the server the environment
/// names and dropped when the value is: tests run in parallel and never see each
/// other's rows.
#[cfg(any(test, feature = "postgres-tests"))]
pub mod scratch {
    use sqlx::Connection;
    use sqlx::postgres::PgConnection;

    /// The server tests create their databases on: `FLEETWATCH_TEST_POSTGRES`, by default
    /// the local one with trust authentication.
    pub fn admin_url() -> String {
        std::env::var("FLEETWATCH_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
    }

    pub struct ScratchDatabase {
        /// The URL to give the hub or the store.
        pub url: String,
        name: String,
        admin: String,
    }

    impl ScratchDatabase {
        /// Creates the database, named by a fresh UUID. Panics, naming the server, if
        /// PostgreSQL cannot be reached: a test that needs it must not pass without it.
        pub async fn create() -> Self {
            let admin = admin_url();
            let name = format!("fleetwatch_test_{}", uuid::Uuid::new_v4().simple());
            let mut conn = PgConnection::connect(&admin).await.unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL is needed for this test (feature postgres-tests) and {admin} \
                     cannot be reached: {e}. Start it (pg_ctlcluster ... main start) or set \
                     FLEETWATCH_TEST_POSTGRES"
                )
            });
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("CREATE DATABASE {name} on {admin}: {e}"));
            let base = admin
                .rsplit_once('/')
                .map_or(admin.as_str(), |(base, _)| base);
            Self {
                url: format!("{base}/{name}"),
                name,
                admin,
            }
        }
    }

    impl Drop for ScratchDatabase {
        fn drop(&mut self) {
            let (admin, name) = (self.admin.clone(), self.name.clone());
            // Drop may run inside a runtime, which cannot be blocked on: a thread of its
            // own with a runtime of its own. FORCE ends the store's open connections.
            let dropped = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(async {
                    let mut conn = PgConnection::connect(&admin)
                        .await
                        .map_err(|e| e.to_string())?;
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await
                    .map_err(|e| e.to_string())
                })
            })
            .join();
            if !matches!(dropped, Ok(Ok(_))) {
                eprintln!("could not drop test database {}: {dropped:?}", self.name);
            }
        }
    }
}

#[cfg(all(test, feature = "postgres-tests"))]
mod tests {
    use super::scratch::ScratchDatabase;
    use super::*;

    async fn store() -> (PgStore, ScratchDatabase) {
        let db = ScratchDatabase::create().await;
        let store = PgStore::open(
            &db.url,
            PgSettings::default(),
            crate::storage::conformance::DEADLINES,
        )
        .await
        .expect("open store");
        (store, db)
    }

    /// A changed `heartbeat.offline_after` applies, at the next start, to devices
    /// already waiting; a device's own setting still comes first.
    #[tokio::test]
    async fn reopening_with_another_default_moves_the_deadlines_that_follow_it() {
        let (store, db) = store().await;
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
        let reopened = PgStore::open(
            &db.url,
            PgSettings::default(),
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
        let db = ScratchDatabase::create().await;
        move |deadlines| {
            // The database lives as long as the closure, which the test holds.
            let (url, _db) = (db.url.clone(), &db);
            async move {
                let store = PgStore::open(&url, PgSettings::default(), deadlines)
                    .await
                    .expect("open store");
                std::sync::Arc::new(store) as std::sync::Arc<dyn Store>
            }
        }
    });
    crate::storage::notify_conformance::notification_conformance!(store().await);
    crate::storage::silence_conformance::silence_conformance!(store().await);
}
