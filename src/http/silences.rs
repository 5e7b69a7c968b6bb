//! `/api/v1/silences`: maintenance windows ([`crate::silence`]). Created, listed and
//! expired early here; the alert policy reads them to hold notifications, and the
//! device routes show each device's `silenced_until`.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::HttpState;
use super::error::{ApiError, ErrorBody, from_rejection};
use crate::clock::Timestamp;
use crate::silence::{NewSilence, Silence, SilenceRequest};

/// A rejected body is a bad request whatever was wrong with it (not JSON, a field of
/// the wrong type, an unknown field), so every mistake in a silence answers 400 with
/// the parser's words; only a body over the limit keeps its 413.
fn bad_body(rejection: JsonRejection) -> ApiError {
    match from_rejection(rejection) {
        ApiError::Unprocessable(message) => ApiError::BadRequest(message),
        other => other,
    }
}

/// Silence devices for a while: their transitions are still recorded and published,
/// but nobody is notified of them until the silence ends (and then only of a device
/// still down).
#[utoipa::path(post, path = "/api/v1/silences", tag = "silences", operation_id = "create_silence",
    request_body = SilenceRequest,
    security(("api_key" = [])),
    responses(
        (status = 201, description = "Created", body = Silence),
        (status = 400, description = "Not a valid silence: not JSON, an unknown field, not exactly one of device_ids, pattern and labels, no end, or an end not after the start or not in the future", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 503, description = "Database not answering", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<HttpState>,
    body: Result<Json<SilenceRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Silence>), ApiError> {
    let Json(request) = body.map_err(bad_body)?;
    let now = state.clock.now();
    let new = NewSilence::parse(request, now).map_err(ApiError::BadRequest)?;
    let silence = state.store.create_silence(&new, now).await?;
    tracing::info!(
        silence = silence.id,
        ends_at = %silence.ends_at,
        "silence created"
    );
    Ok((StatusCode::CREATED, Json(silence)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Also the silences that have ended (expired early or not).
    all: Option<bool>,
}

/// Silences, by start.
#[derive(Debug, Serialize, ToSchema)]
pub struct SilenceList {
    silences: Vec<Silence>,
}

/// The silences in force and those still to come (with `all=true`, also those
/// that ended), by `starts_at`.
#[utoipa::path(get, path = "/api/v1/silences", tag = "silences", operation_id = "list_silences",
    params(ListParams),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The silences", body = SilenceList),
        (status = 400, description = "Bad query parameter", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 503, description = "Database not answering", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<HttpState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<SilenceList>, ApiError> {
    let Query(params) = params.map_err(from_rejection)?;
    // Every silence ends after it was created, so after the epoch.
    let after = if params.all == Some(true) {
        Timestamp::from_unix_millis(0)
    } else {
        state.clock.now()
    };
    Ok(Json(SilenceList {
        silences: state.store.silences(after).await?,
    }))
}

/// End a silence now; one still to come ends before it starts. Ended silences stay
/// listed with `all=true`.
#[utoipa::path(delete, path = "/api/v1/silences/{id}", tag = "silences", operation_id = "expire_silence",
    params(("id" = i64, Path, description = "The silence's id", minimum = 1)),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The silence, ended", body = Silence),
        (status = 400, description = "Not a silence id", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such silence", body = ErrorBody),
        (status = 503, description = "Database not answering", body = ErrorBody),
    ))]
pub async fn expire(
    State(state): State<HttpState>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<Silence>, ApiError> {
    let Path(id) = id.map_err(from_rejection)?;
    let silence = state.store.expire_silence(id, state.clock.now()).await?;
    tracing::info!(silence = silence.id, "silence expired");
    Ok(Json(silence))
}
