//! The sinks' queues in PostgreSQL (migrations/postgres).
//!
//! With several hubs, each runs every sink: a sink's cursor moves by compare-and-set
//! (`enqueue`), so one hub queues each event; deliveries are not yet shared out
//! between hubs (issue 10, step 3).

use async_trait::async_trait;
use sqlx::Row;

use super::{PgStore, time};
use crate::clock::Timestamp;
use crate::device::DeviceId;
use crate::event::StoredEvent;
use crate::storage::StoreError;
use crate::storage::notifications::{
    DeadLetter, NewNotification, NotificationStore, QueueStats, Queued, Settled,
};
use crate::storage::rows::{Columns, attempts, payload, stored_event};

#[async_trait]
impl NotificationStore for PgStore {
    async fn sink_state(&self, sink: &str) -> Result<(i64, Option<bool>), StoreError> {
        sqlx::query(
            "INSERT INTO notify_sinks (sink, last_seq) \
             VALUES ($1, (SELECT coalesce(max(seq), 0) FROM status_events)) \
             ON CONFLICT (sink) DO NOTHING",
        )
        .bind(sink)
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT last_seq, enabled FROM notify_sinks WHERE sink = $1")
            .bind(sink)
            .fetch_one(&self.pool)
            .await?;
        Ok((row.try_get("last_seq")?, row.try_get("enabled")?))
    }

    async fn set_sink_enabled(
        &self,
        sink: &str,
        enabled: bool,
        skip_to_end: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO notify_sinks (sink, last_seq, enabled) \
             VALUES ($1, (SELECT coalesce(max(seq), 0) FROM status_events), $2) \
             ON CONFLICT (sink) DO UPDATE SET enabled = excluded.enabled, \
                 last_seq = CASE WHEN $3 THEN excluded.last_seq ELSE notify_sinks.last_seq END",
        )
        .bind(sink)
        .bind(enabled)
        .bind(skip_to_end)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn log_end(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM status_events")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<StoredEvent>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            event_columns!(),
            " FROM status_events WHERE seq > $1 AND reason <> 'deleted' ORDER BY seq LIMIT $2"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(stored_event)
        .collect()
    }

    async fn previous_change(
        &self,
        device: &DeviceId,
        before_seq: i64,
    ) -> Result<Option<Timestamp>, StoreError> {
        let row = sqlx::query(
            "SELECT changed_at FROM status_events \
             WHERE device_id = $1 AND seq < $2 AND reason <> 'deleted' \
             ORDER BY seq DESC LIMIT 1",
        )
        .bind(device.as_str())
        .bind(before_seq)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(row) => row.time("changed_at")?,
            None => None,
        })
    }

    async fn enqueue(
        &self,
        sink: &str,
        from: i64,
        to: i64,
        items: &[NewNotification],
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let moved =
            sqlx::query("UPDATE notify_sinks SET last_seq = $3 WHERE sink = $1 AND last_seq = $2")
                .bind(sink)
                .bind(from)
                .bind(to)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if moved == 0 {
            return Ok(false);
        }
        if !items.is_empty() {
            let n = items.len();
            let (mut seqs, mut devices, mut events, mut kinds, mut bodies) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for item in items {
                seqs.push(item.event_seq);
                devices.push(item.payload.device_id.as_str());
                events.push(item.payload.event_id);
                kinds.push(item.payload.kind.as_str());
                bodies.push(item.payload.body.as_str());
            }
            sqlx::query(
                "INSERT INTO notifications (sink, event_seq, device_id, event_id, kind, body, \
                     state, next_attempt_at, created_at) \
                 SELECT $1, n.seq, n.device_id, n.event_id, n.kind, n.body, 'pending', $7, $7 \
                 FROM UNNEST($2::bigint[], $3::text[], $4::uuid[], $5::text[], $6::text[]) \
                     WITH ORDINALITY AS n(seq, device_id, event_id, kind, body, i) \
                 ORDER BY n.i \
                 ON CONFLICT (sink, event_seq) DO NOTHING",
            )
            .bind(sink)
            .bind(seqs)
            .bind(devices)
            .bind(events)
            .bind(kinds)
            .bind(bodies)
            .bind(time(now))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn due(
        &self,
        sink: &str,
        now: Timestamp,
        skip: &[i64],
        limit: u32,
    ) -> Result<Vec<Queued>, StoreError> {
        sqlx::query(
            "SELECT n.id, n.attempts, n.created_at, n.device_id, n.event_id, n.kind, n.body \
             FROM notifications AS n \
             WHERE n.sink = $1 AND n.state = 'pending' AND n.next_attempt_at <= $2 \
               AND n.id <> ALL($3) \
               AND n.id = (SELECT min(m.id) FROM notifications AS m \
                           WHERE m.sink = n.sink AND m.device_id = n.device_id \
                             AND m.state = 'pending') \
             ORDER BY n.id LIMIT $4",
        )
        .bind(sink)
        .bind(time(now))
        .bind(skip)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            Ok(Queued {
                id: row.required_int("id")?,
                payload: payload(row)?,
                attempts: attempts(row)?,
                created_at: row.required_time("created_at")?,
            })
        })
        .collect()
    }

    async fn settle(&self, outcomes: &[Settled]) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let mut delivered = Vec::new();
        let (mut ids, mut states, mut tries, mut next, mut errors) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for outcome in outcomes {
            match outcome {
                Settled::Delivered { id } => delivered.push(*id),
                Settled::Retry {
                    id,
                    attempts,
                    next_attempt_at,
                    error,
                } => {
                    ids.push(*id);
                    states.push("pending");
                    tries.push(i64::from(*attempts));
                    next.push(Some(time(*next_attempt_at)));
                    errors.push(error.as_str());
                }
                Settled::Dead {
                    id,
                    attempts,
                    error,
                } => {
                    ids.push(*id);
                    states.push("dead");
                    tries.push(i64::from(*attempts));
                    next.push(None);
                    errors.push(error.as_str());
                }
            }
        }
        let mut tx = self.pool.begin().await?;
        if !delivered.is_empty() {
            sqlx::query("DELETE FROM notifications WHERE id = ANY($1)")
                .bind(delivered)
                .execute(&mut *tx)
                .await?;
        }
        if !ids.is_empty() {
            sqlx::query(
                "UPDATE notifications SET state = o.state, attempts = o.attempts, \
                     next_attempt_at = coalesce(o.next, notifications.next_attempt_at), \
                     last_error = o.error \
                 FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::timestamptz[], \
                             $5::text[]) AS o(id, state, attempts, next, error) \
                 WHERE notifications.id = o.id",
            )
            .bind(ids)
            .bind(states)
            .bind(tries)
            .bind(next)
            .bind(errors)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn due_now(&self, sink: &str, now: Timestamp) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "UPDATE notifications SET next_attempt_at = $2 \
             WHERE sink = $1 AND state = 'pending' AND next_attempt_at > $2",
        )
        .bind(sink)
        .bind(time(now))
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn queue_stats(&self, sink: &str) -> Result<QueueStats, StoreError> {
        let row = sqlx::query(
            "SELECT \
                 count(*) FILTER (WHERE state = 'pending') AS backlog, \
                 min(created_at) FILTER (WHERE state = 'pending') AS oldest, \
                 count(*) FILTER (WHERE state = 'dead') AS dead \
             FROM notifications WHERE sink = $1",
        )
        .bind(sink)
        .fetch_one(&self.pool)
        .await?;
        Ok(QueueStats {
            backlog: row.unsigned("backlog")?.unwrap_or(0),
            oldest_pending: row.time("oldest")?,
            dead_letters: row.unsigned("dead")?.unwrap_or(0),
        })
    }

    async fn dead_letters(
        &self,
        sink: &str,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        sqlx::query(
            "SELECT id, device_id, event_id, kind, body, attempts, created_at, last_error \
             FROM notifications \
             WHERE sink = $1 AND state = 'dead' AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(sink)
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            Ok(DeadLetter {
                id: row.required_int("id")?,
                payload: payload(row)?,
                attempts: attempts(row)?,
                created_at: row.required_time("created_at")?,
                error: row.text("last_error")?.unwrap_or_default(),
            })
        })
        .collect()
    }

    async fn retry_dead(
        &self,
        sink: &str,
        id: Option<i64>,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        // A retried letter counts its age from now, or max_age would bury it again.
        Ok(sqlx::query(
            "UPDATE notifications SET state = 'pending', attempts = 0, next_attempt_at = $3, \
                 created_at = $3 \
             WHERE sink = $1 AND state = 'dead' AND ($2::bigint IS NULL OR id = $2)",
        )
        .bind(sink)
        .bind(id)
        .bind(time(now))
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn drop_dead(&self, sink: &str, id: Option<i64>) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "DELETE FROM notifications WHERE sink = $1 AND state = 'dead' \
             AND ($2::bigint IS NULL OR id = $2)",
        )
        .bind(sink)
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}
