//! `/api/v1/devices/{id}/credentials`: a device's login to the embedded broker
//! (`mqtt.require_login`). The secret is made here, answered once and never kept:
//! the store holds only its salted hash, so nobody can read it back, and losing it
//! means issuing a new one.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use super::HttpState;
use super::devices::device_id;
use super::error::{ApiError, ErrorBody};
use crate::credentials::DeviceSecret;

/// A device's new login. Shown once.
#[derive(Debug, Serialize, ToSchema)]
pub struct IssuedCredential {
    #[schema(example = "pump-7")]
    device_id: String,
    /// The MQTT username; the client id must be the same.
    #[schema(example = "pump-7")]
    username: String,
    /// The MQTT password: 256 random bits, unpadded base64url. Not retrievable later.
    #[schema(example = "q7JcV0yXbqk2P0m3rW8k2bJc1d5nW6o4TzQy9s3aLhE")]
    secret: String,
}

/// Issue a device's MQTT login for the embedded broker; issuing again replaces it
/// (the previous secret stops working).
#[utoipa::path(post, path = "/api/v1/devices/{id}/credentials", tag = "devices",
    params(("id" = String, Path, description = "Device id", pattern = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$", max_length = 128)),
    security(("api_key" = [])),
    responses(
        (status = 201, description = "Issued; the secret is in this answer only", body = IssuedCredential,
            headers(("Cache-Control" = String, description = "no-store"))),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 422, description = "Not a valid device id", body = ErrorBody),
        (status = 503, description = "Database not answering", body = ErrorBody),
    ))]
pub async fn issue(
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = device_id(&id)?;
    let secret = DeviceSecret::generate().map_err(|e| ApiError::Internal(e.to_string()))?;
    let hash = secret
        .hash()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    state.store.set_credential(&id, &hash).await?;
    tracing::info!(device_id = %id, "issued a device credential");
    Ok((
        StatusCode::CREATED,
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(IssuedCredential {
            device_id: id.to_string(),
            username: id.to_string(),
            secret: secret.expose().to_string(),
        }),
    ))
}

/// Revoke a device's MQTT login: it can no longer connect to the embedded broker
/// while `mqtt.require_login` is on (a connection already open stays open).
#[utoipa::path(delete, path = "/api/v1/devices/{id}/credentials", tag = "devices",
    params(("id" = String, Path, description = "Device id", pattern = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$", max_length = 128)),
    security(("api_key" = [])),
    responses(
        (status = 204, description = "Revoked (or it had none)"),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 422, description = "Not a valid device id", body = ErrorBody),
        (status = 503, description = "Database not answering", body = ErrorBody),
    ))]
pub async fn revoke(
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = device_id(&id)?;
    state.store.revoke_credential(&id).await?;
    tracing::info!(device_id = %id, "revoked a device credential");
    Ok(StatusCode::NO_CONTENT)
}
