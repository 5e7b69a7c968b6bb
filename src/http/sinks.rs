//! `/api/v1/sinks...`: the notification sinks at a glance, switched on and off, tested,
//! and their dead letters retried or dropped.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::HttpState;
use super::error::{ApiError, ErrorBody, from_rejection};
use crate::clock::Timestamp;
use crate::notify::{SinkError, SinkReport, TestResult};

impl From<SinkError> for ApiError {
    fn from(error: SinkError) -> Self {
        match error {
            SinkError::NotFound(name) => ApiError::NotFound(format!("no sink named {name:?}")),
            SinkError::Store(e) => e.into(),
        }
    }
}

/// Every configured sink.
#[derive(Debug, Serialize, ToSchema)]
pub struct SinkList {
    sinks: Vec<SinkReport>,
}

/// The notification sinks: backlog, failures, dead letters.
#[utoipa::path(get, path = "/api/v1/sinks", tag = "notifications",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Every sink", body = SinkList),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 503, description = "Database not answering", body = ErrorBody),
    ))]
pub async fn list(State(state): State<HttpState>) -> Result<Json<SinkList>, ApiError> {
    Ok(Json(SinkList {
        sinks: state.sinks.reports().await?,
    }))
}

/// A change to a sink.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SinkChange {
    /// Off: nothing is sent, and transitions meanwhile are not queued for it. On
    /// again: it hears transitions from then on. Kept across restarts.
    enabled: bool,
}

/// Switch a sink on or off.
#[utoipa::path(patch, path = "/api/v1/sinks/{name}", tag = "notifications",
    params(("name" = String, Path, description = "Sink name", pattern = r"^[A-Za-z0-9_-]{1,64}$")),
    request_body = SinkChange,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The sink", body = SinkReport),
        (status = 400, description = "Body is not JSON", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such sink", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "No `enabled` boolean", body = ErrorBody),
        (status = 503, description = "Database not answering", body = ErrorBody),
    ))]
pub async fn change(
    State(state): State<HttpState>,
    Path(name): Path<String>,
    body: Result<Json<SinkChange>, JsonRejection>,
) -> Result<Json<SinkReport>, ApiError> {
    let Json(change) = body.map_err(from_rejection)?;
    Ok(Json(state.sinks.set_enabled(&name, change.enabled).await?))
}

/// Send a test message now; the answer says what the receiver said.
#[utoipa::path(post, path = "/api/v1/sinks/{name}/test", tag = "notifications",
    params(("name" = String, Path, description = "Sink name", pattern = r"^[A-Za-z0-9_-]{1,64}$")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Sent; `delivered` says whether the receiver took it", body = TestResult),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such sink", body = ErrorBody),
        (status = 503, description = "No answer within http.request_timeout", body = ErrorBody),
    ))]
pub async fn test(
    State(state): State<HttpState>,
    Path(name): Path<String>,
) -> Result<Json<TestResult>, ApiError> {
    Ok(Json(state.sinks.test(&name).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterParams {
    /// `next_cursor` of the previous page.
    cursor: Option<i64>,
    /// Letters per page (1 to 1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// A notification given up on.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterView {
    id: i64,
    /// `device.offline`, `device.error`, `device.recovered`, ...
    r#type: String,
    device_id: String,
    event_id: uuid::Uuid,
    created_at: Timestamp,
    attempts: u32,
    /// The receiver's last answer, or why there was none.
    error: String,
}

/// A page of dead letters, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterList {
    dead_letters: Vec<DeadLetterView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<i64>,
}

/// A sink's dead letters.
#[utoipa::path(get, path = "/api/v1/sinks/{name}/dead-letters", tag = "notifications",
    params(("name" = String, Path, description = "Sink name", pattern = r"^[A-Za-z0-9_-]{1,64}$"), DeadLetterParams),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "A page of dead letters", body = DeadLetterList),
        (status = 400, description = "Bad query parameter", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such sink", body = ErrorBody),
        (status = 503, description = "Database not answering", body = ErrorBody),
    ))]
pub async fn dead_letters(
    State(state): State<HttpState>,
    Path(name): Path<String>,
    params: Result<Query<DeadLetterParams>, QueryRejection>,
) -> Result<Json<DeadLetterList>, ApiError> {
    let Query(params) = params.map_err(from_rejection)?;
    let limit = super::devices::limit(params.limit)?;
    let mut letters = state
        .sinks
        .dead_letters(&name, params.cursor.unwrap_or(0), limit + 1)
        .await?;
    let more = letters.len() > limit as usize;
    letters.truncate(limit as usize);
    let next_cursor = more.then(|| letters.last().map(|l| l.id)).flatten();
    Ok(Json(DeadLetterList {
        dead_letters: letters
            .into_iter()
            .map(|l| DeadLetterView {
                id: l.id,
                r#type: l.payload.kind,
                device_id: l.payload.device_id.to_string(),
                event_id: l.payload.event_id,
                created_at: l.created_at,
                attempts: l.attempts,
                error: l.error,
            })
            .collect(),
        next_cursor,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LetterParams {
    /// Only this dead letter; without it, all of the sink's.
    id: Option<i64>,
}

/// How many dead letters an action touched.
#[derive(Debug, Serialize, ToSchema)]
pub struct Touched {
    count: u64,
}

/// Put dead letters back in the queue (all, or `?id=`), due now.
#[utoipa::path(post, path = "/api/v1/sinks/{name}/dead-letters/retry", tag = "notifications",
    params(("name" = String, Path, description = "Sink name", pattern = r"^[A-Za-z0-9_-]{1,64}$"), LetterParams),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Queued again", body = Touched),
        (status = 400, description = "Bad query parameter", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such sink", body = ErrorBody),
        (status = 503, description = "Database not answering", body = ErrorBody),
    ))]
pub async fn retry(
    State(state): State<HttpState>,
    Path(name): Path<String>,
    params: Result<Query<LetterParams>, QueryRejection>,
) -> Result<Json<Touched>, ApiError> {
    let Query(params) = params.map_err(from_rejection)?;
    let count = state.sinks.retry_dead(&name, params.id).await?;
    Ok(Json(Touched { count }))
}

/// Forget dead letters (all, or `?id=`). An action on the list, like retry: the list
/// itself stays.
#[utoipa::path(post, path = "/api/v1/sinks/{name}/dead-letters/drop", tag = "notifications",
    params(("name" = String, Path, description = "Sink name", pattern = r"^[A-Za-z0-9_-]{1,64}$"), LetterParams),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Dropped", body = Touched),
        (status = 400, description = "Bad query parameter", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such sink", body = ErrorBody),
        (status = 503, description = "Database not answering", body = ErrorBody),
    ))]
pub async fn drop_dead(
    State(state): State<HttpState>,
    Path(name): Path<String>,
    params: Result<Query<LetterParams>, QueryRejection>,
) -> Result<Json<Touched>, ApiError> {
    let Query(params) = params.map_err(from_rejection)?;
    let count = state.sinks.drop_dead(&name, params.id).await?;
    Ok(Json(Touched { count }))
}
