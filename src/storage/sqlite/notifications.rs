//! The sinks' queues in SQLite (migration 20261202000001).

use async_trait::async_trait;
use sqlx::Row;

use super::{SqliteStore, to_json};
use crate::clock::Timestamp;
use crate::device::DeviceId;
use crate::event::StoredEvent;
use crate::storage::StoreError;
use crate::storage::notifications::{
    DeadLetter, NewNotification, NotificationStore, Payload, QueueStats, Queued, Settled,
};
use crate::storage::rows::{Columns, attempts, corrupt, payload, stored_event};

#[async_trait]
impl NotificationStore for SqliteStore {
    async fn sink_state(&self, sink: &str) -> Result<(i64, Option<bool>), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO notify_sinks (sink, last_seq) \
             VALUES (?1, (SELECT coalesce(max(seq), 0) FROM status_events)) \
             ON CONFLICT (sink) DO NOTHING",
        )
        .bind(sink)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query("SELECT last_seq, enabled FROM notify_sinks WHERE sink = ?1")
            .bind(sink)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        let enabled: Option<i64> = row.try_get("enabled")?;
        Ok((row.try_get("last_seq")?, enabled.map(|e| e != 0)))
    }

    async fn set_sink_enabled(
        &self,
        sink: &str,
        enabled: bool,
        skip_to_end: bool,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO notify_sinks (sink, last_seq, enabled) \
             VALUES (?1, (SELECT coalesce(max(seq), 0) FROM status_events), ?2) \
             ON CONFLICT (sink) DO UPDATE SET enabled = excluded.enabled, \
                 last_seq = CASE WHEN ?3 THEN excluded.last_seq ELSE notify_sinks.last_seq END",
        )
        .bind(sink)
        .bind(i64::from(enabled))
        .bind(skip_to_end)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
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
            " FROM status_events WHERE seq > ?1 AND reason <> 'deleted' ORDER BY seq LIMIT ?2"
        ))
        .bind(after)
        .bind(limit)
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
        let changed: Option<i64> = sqlx::query_scalar(
            "SELECT changed_at FROM status_events \
             WHERE device_id = ?1 AND seq < ?2 AND reason <> 'deleted' \
             ORDER BY seq DESC LIMIT 1",
        )
        .bind(device.as_str())
        .bind(before_seq)
        .fetch_optional(&self.pool)
        .await?;
        Ok(changed.map(Timestamp::from_unix_millis))
    }

    async fn enqueue(
        &self,
        sink: &str,
        from: i64,
        to: i64,
        items: &[NewNotification],
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let moved =
            sqlx::query("UPDATE notify_sinks SET last_seq = ?3 WHERE sink = ?1 AND last_seq = ?2")
                .bind(sink)
                .bind(from)
                .bind(to)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if moved == 0 {
            tx.rollback().await;
            return Ok(false);
        }
        for item in items {
            sqlx::query(
                "INSERT INTO notifications (sink, event_seq, device_id, event_id, kind, body, \
                     state, next_attempt_at, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?7) \
                 ON CONFLICT (sink, event_seq) DO NOTHING",
            )
            .bind(sink)
            .bind(item.event_seq)
            .bind(item.payload.device_id.as_str())
            .bind(item.payload.event_id.to_string())
            .bind(item.payload.kind.as_str())
            .bind(item.payload.body.as_str())
            .bind(now.unix_millis())
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
        // The page comes back as one JSON array in one row: sqlx hands rows over from
        // SQLite's thread one at a time, and a page of 512 rows cost more in those
        // hand-overs than in the query.
        let page: Option<String> = sqlx::query_scalar(
            "SELECT json_group_array(json_array(n.id, n.attempts, n.created_at, \
                 json_object('device_id', n.device_id, 'event_id', n.event_id, \
                             'kind', n.kind, 'body', n.body))) \
             FROM (SELECT id, attempts, created_at, device_id, event_id, kind, body \
                   FROM notifications AS n \
                   WHERE n.sink = ?1 AND n.state = 'pending' AND n.next_attempt_at <= ?2 \
                     AND n.id NOT IN (SELECT value FROM json_each(?3)) \
                     AND n.id = (SELECT min(m.id) FROM notifications AS m \
                                 WHERE m.sink = n.sink AND m.device_id = n.device_id \
                                   AND m.state = 'pending') \
                   ORDER BY n.id LIMIT ?4) AS n",
        )
        .bind(sink)
        .bind(now.unix_millis())
        .bind(to_json(&skip)?)
        .bind(limit)
        .fetch_one(&self.pool)
        .await?;
        let rows: Vec<(i64, u32, i64, Payload)> =
            serde_json::from_str(page.as_deref().unwrap_or("[]"))
                .map_err(|e| corrupt(format!("queued notifications: {e}")))?;
        Ok(rows
            .into_iter()
            .map(|(id, attempts, created_at, payload)| Queued {
                id,
                payload,
                attempts,
                created_at: Timestamp::from_unix_millis(created_at),
            })
            .collect())
    }

    async fn settle(&self, outcomes: &[Settled]) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let mut tx = self.write().await?;
        // Deliveries, the bulk of it, in one statement.
        let delivered: Vec<i64> = outcomes
            .iter()
            .filter_map(|o| match o {
                Settled::Delivered { id } => Some(*id),
                _ => None,
            })
            .collect();
        if !delivered.is_empty() {
            sqlx::query("DELETE FROM notifications WHERE id IN (SELECT value FROM json_each(?1))")
                .bind(to_json(&delivered)?)
                .execute(&mut *tx)
                .await?;
        }
        for outcome in outcomes {
            let query = match outcome {
                Settled::Delivered { .. } => continue,
                Settled::Retry {
                    id,
                    attempts,
                    next_attempt_at,
                    error,
                } => sqlx::query(
                    "UPDATE notifications SET attempts = ?2, next_attempt_at = ?3, \
                         last_error = ?4 WHERE id = ?1",
                )
                .bind(id)
                .bind(attempts)
                .bind(next_attempt_at.unix_millis())
                .bind(error.as_str()),
                Settled::Dead {
                    id,
                    attempts,
                    error,
                } => sqlx::query(
                    "UPDATE notifications SET state = 'dead', attempts = ?2, last_error = ?3 \
                     WHERE id = ?1",
                )
                .bind(id)
                .bind(attempts)
                .bind(error.as_str()),
            };
            query.execute(&mut *tx).await?;
        }
        tx.commit().await
    }

    async fn due_now(&self, sink: &str, now: Timestamp) -> Result<u64, StoreError> {
        let mut tx = self.write().await?;
        let moved = sqlx::query(
            "UPDATE notifications SET next_attempt_at = ?2 \
             WHERE sink = ?1 AND state = 'pending' AND next_attempt_at > ?2",
        )
        .bind(sink)
        .bind(now.unix_millis())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(moved)
    }

    async fn queue_stats(&self, sink: &str) -> Result<QueueStats, StoreError> {
        let row = sqlx::query(
            "SELECT \
                 (SELECT count(*) FROM notifications WHERE sink = ?1 AND state = 'pending') AS backlog, \
                 (SELECT min(created_at) FROM notifications WHERE sink = ?1 AND state = 'pending') AS oldest, \
                 (SELECT count(*) FROM notifications WHERE sink = ?1 AND state = 'dead') AS dead",
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
             WHERE sink = ?1 AND state = 'dead' AND id > ?2 ORDER BY id LIMIT ?3",
        )
        .bind(sink)
        .bind(after_id)
        .bind(limit)
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
        let mut tx = self.write().await?;
        // A retried letter counts its age from now, or max_age would bury it again.
        let retried = sqlx::query(
            "UPDATE notifications SET state = 'pending', attempts = 0, next_attempt_at = ?3, \
                 created_at = ?3 \
             WHERE sink = ?1 AND state = 'dead' AND (?2 IS NULL OR id = ?2)",
        )
        .bind(sink)
        .bind(id)
        .bind(now.unix_millis())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(retried)
    }

    async fn drop_dead(&self, sink: &str, id: Option<i64>) -> Result<u64, StoreError> {
        let mut tx = self.write().await?;
        let dropped = sqlx::query(
            "DELETE FROM notifications WHERE sink = ?1 AND state = 'dead' \
             AND (?2 IS NULL OR id = ?2)",
        )
        .bind(sink)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(dropped)
    }
}
