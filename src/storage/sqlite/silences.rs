//! Silences in SQLite (migration 20261225000001).

use super::SqliteStore;
use crate::clock::Timestamp;
use crate::silence::{NewSilence, Silence};
use crate::storage::StoreError;
use crate::storage::silences::{MatcherColumns, silence, silence_columns};

impl SqliteStore {
    pub(super) async fn insert_silence(
        &self,
        new: &NewSilence,
        now: Timestamp,
    ) -> Result<Silence, StoreError> {
        let columns = MatcherColumns::new(&new.matcher)?;
        let mut tx = self.write().await?;
        let row = sqlx::query(concat!(
            "INSERT INTO silences (device_ids, pattern, labels, starts_at, ends_at, comment, \
             created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING ",
            silence_columns!()
        ))
        .bind(columns.device_ids)
        .bind(columns.pattern)
        .bind(columns.labels)
        .bind(new.starts_at.unix_millis())
        .bind(new.ends_at.unix_millis())
        .bind(new.comment.as_deref())
        .bind(now.unix_millis())
        .fetch_one(&mut *tx)
        .await?;
        let created = silence(&row)?;
        tx.commit().await?;
        Ok(created)
    }

    pub(super) async fn silences_ending_after(
        &self,
        ending_after: Timestamp,
    ) -> Result<Vec<Silence>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            silence_columns!(),
            " FROM silences WHERE ends_at > ?1 ORDER BY starts_at, id"
        ))
        .bind(ending_after.unix_millis())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(silence)
        .collect()
    }

    pub(super) async fn end_silence(&self, id: i64, now: Timestamp) -> Result<Silence, StoreError> {
        let mut tx = self.write().await?;
        let row = sqlx::query(concat!(
            "UPDATE silences SET ends_at = min(ends_at, ?2), starts_at = min(starts_at, ?2) \
             WHERE id = ?1 RETURNING ",
            silence_columns!()
        ))
        .bind(id)
        .bind(now.unix_millis())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await;
            return Err(StoreError::SilenceNotFound(id));
        };
        let ended = silence(&row)?;
        tx.commit().await?;
        Ok(ended)
    }
}
