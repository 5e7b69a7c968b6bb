//! Silences as rows, once for every backend: which columns a matcher is written to,
//! and how a row is read back ([`crate::silence`] owns the shapes and the checks).

use super::StoreError;
use super::rows::{Columns, corrupt};
use crate::device::DeviceId;
use crate::labels::Labels;
use crate::silence::{IdPattern, Silence, SilenceMatcher};

/// The columns of a silence, as every backend selects them (PostgreSQL casts its jsonb
/// columns to text, under the same names).
macro_rules! silence_columns {
    () => {
        "id, device_ids, pattern, labels, starts_at, ends_at, comment, created_at"
    };
}
pub(crate) use silence_columns;

/// A matcher as its three columns, exactly one of them set: `device_ids` a JSON array,
/// `pattern` text, `labels` a JSON object.
pub(crate) struct MatcherColumns {
    pub device_ids: Option<String>,
    pub pattern: Option<String>,
    pub labels: Option<String>,
}

impl MatcherColumns {
    pub fn new(matcher: &SilenceMatcher) -> Result<Self, StoreError> {
        let mut columns = Self {
            device_ids: None,
            pattern: None,
            labels: None,
        };
        match matcher {
            SilenceMatcher::Devices(ids) => {
                columns.device_ids = Some(
                    serde_json::to_string(ids).map_err(|e| corrupt(format!("device_ids: {e}")))?,
                );
            }
            SilenceMatcher::Pattern(pattern) => columns.pattern = Some(pattern.as_str().into()),
            SilenceMatcher::Labels(labels) => columns.labels = Some(labels.to_json()),
        }
        Ok(columns)
    }
}

/// A row of `silences`.
pub(crate) fn silence(row: &impl Columns) -> Result<Silence, StoreError> {
    let id = row.required_int("id")?;
    let matcher = match (
        row.json::<Vec<DeviceId>>("device_ids")?,
        row.text("pattern")?,
        row.json::<Labels>("labels")?,
    ) {
        (Some(ids), None, None) => SilenceMatcher::devices(ids),
        (None, Some(pattern), None) => SilenceMatcher::Pattern(
            IdPattern::parse(&pattern).map_err(|e| corrupt(format!("silence {id}: {e}")))?,
        ),
        (None, None, Some(labels)) => SilenceMatcher::Labels(labels),
        _ => return Err(corrupt(format!("silence {id}: not exactly one matcher"))),
    };
    Ok(Silence {
        id,
        matcher,
        starts_at: row.required_time("starts_at")?,
        ends_at: row.required_time("ends_at")?,
        comment: row.text("comment")?,
        created_at: row.required_time("created_at")?,
    })
}
