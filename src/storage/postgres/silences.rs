//! Silences in PostgreSQL (migration 20261225000001). Each write is one statement.

use super::{PgStore, time};
use crate::clock::Timestamp;
use crate::silence::{NewSilence, Silence};
use crate::storage::StoreError;
use crate::storage::silences::{MatcherColumns, silence};

/// [`crate::storage::silences::silence_columns`], with the jsonb columns as text.
macro_rules! pg_silence_columns {
    () => {
        "id, device_ids::text AS device_ids, pattern, labels::text AS labels, starts_at, \
         ends_at, comment, created_at"
    };
}

impl PgStore {
    pub(super) async fn insert_silence(
        &self,
        new: &NewSilence,
        now: Timestamp,
    ) -> Result<Silence, StoreError> {
        let columns = MatcherColumns::new(&new.matcher)?;
        let row = sqlx::query(concat!(
            "INSERT INTO silences (device_ids, pattern, labels, starts_at, ends_at, comment, \
             created_at) VALUES ($1::jsonb, $2, $3::jsonb, $4, $5, $6, $7) RETURNING ",
            pg_silence_columns!()
        ))
        .bind(columns.device_ids)
        .bind(columns.pattern)
        .bind(columns.labels)
        .bind(time(new.starts_at))
        .bind(time(new.ends_at))
        .bind(new.comment.as_deref())
        .bind(time(now))
        .fetch_one(&self.pool)
        .await?;
        silence(&row)
    }

    pub(super) async fn silences_ending_after(
        &self,
        ending_after: Timestamp,
    ) -> Result<Vec<Silence>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            pg_silence_columns!(),
            " FROM silences WHERE ends_at > $1 ORDER BY starts_at, id"
        ))
        .bind(time(ending_after))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(silence)
        .collect()
    }

    pub(super) async fn end_silence(&self, id: i64, now: Timestamp) -> Result<Silence, StoreError> {
        sqlx::query(concat!(
            "UPDATE silences SET ends_at = least(ends_at, $2), starts_at = least(starts_at, $2) \
             WHERE id = $1 RETURNING ",
            pg_silence_columns!()
        ))
        .bind(id)
        .bind(time(now))
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(silence)
        .unwrap_or(Err(StoreError::SilenceNotFound(id)))
    }
}
