//! `/api/v1/devices...`: the fleet as JSON, registration and deletion, transition
//! history, and the HTTP heartbeat for agents that cannot speak MQTT.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering::Relaxed;
use tokio::sync::oneshot;
use utoipa::{IntoParams, ToSchema};

use super::HttpState;
use super::error::{ApiError, ErrorBody, from_rejection};
use crate::clock::Timestamp;
use crate::device::DeviceId;
use crate::event::StatusEvent;
use crate::heartbeat::{FlushError, Inbound, Outcome, PayloadError, payload};
use crate::labels::{LabelFilter, Labels};
use crate::registration::Refusal;
use crate::silence::{Silence, silenced_until};
use crate::status::Status;
use crate::storage::{Device, DeviceQuery, StoreError, Summary};

/// Devices per page unless `limit` says otherwise, and the most it may say.
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

pub(super) fn device_id(text: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(text).map_err(|e| ApiError::Unprocessable(format!("{text:?}: {e}")))
}

/// Cuts a page fetched with `limit + 1` rows back to `limit`; the cursor of the next
/// page when there is one.
fn next_page<T, C>(rows: &mut Vec<T>, limit: u32, cursor: impl FnOnce(&T) -> C) -> Option<C> {
    if rows.len() <= limit as usize {
        return None;
    }
    rows.truncate(limit as usize);
    rows.last().map(cursor)
}

pub(super) fn limit(requested: Option<u32>) -> Result<u32, ApiError> {
    match requested.unwrap_or(DEFAULT_LIMIT) {
        n @ 1..=MAX_LIMIT => Ok(n),
        n => Err(ApiError::BadRequest(format!(
            "limit {n} is out of range (1 to {MAX_LIMIT})"
        ))),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only devices with this status.
    status: Option<Status>,
    /// Only devices whose id starts with this (case-sensitive).
    prefix: Option<String>,
    /// Only devices carrying these labels: `key:value`, comma-separated for several
    /// (`site:north,kind:pump`).
    #[param(
        example = "site:north",
        pattern = r"^[A-Za-z0-9_./-]{1,64}:[^,\u0000-\u001f\u007f-\u009f]{1,128}(,[A-Za-z0-9_./-]{1,64}:[^,\u0000-\u001f\u007f-\u009f]{1,128})*$"
    )]
    label: Option<String>,
    /// Only the devices that name this device as their `parent` (a gateway's id).
    #[param(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$",
        max_length = 128,
        example = "gw-1"
    )]
    parent: Option<String>,
    /// `next_cursor` of the previous page (a device id).
    #[param(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$", max_length = 128)]
    cursor: Option<String>,
    /// Devices per page (1 to 1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// A device as the listing and the device route show it: as stored, and whether a
/// silence covers it now (computed from the silences, not stored with the device).
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceView {
    #[serde(flatten)]
    device: Device,
    /// While silenced: the latest end of the silences covering it now. Absent
    /// otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    silenced_until: Option<Timestamp>,
}

impl DeviceView {
    fn new(device: Device, silences: &[Silence], now: Timestamp) -> Self {
        let silenced_until = silenced_until(silences, &device.device_id, &device.labels, now);
        Self {
            device,
            silenced_until,
        }
    }
}

/// A page of devices, in id order.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceList {
    devices: Vec<DeviceView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// List devices, a page at a time.
#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", params(ListParams),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "A page of devices", body = DeviceList),
        (status = 400, description = "Bad query parameter", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 503, description = "Database not answering", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<HttpState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<DeviceList>, ApiError> {
    let Query(params) = params.map_err(from_rejection)?;
    let limit = limit(params.limit)?;
    let after = params
        .cursor
        .as_deref()
        .map(|cursor| {
            DeviceId::parse(cursor).map_err(|_| ApiError::BadRequest("invalid cursor".into()))
        })
        .transpose()?;
    let labels = params
        .label
        .as_deref()
        .map(LabelFilter::parse_list)
        .transpose()
        .map_err(ApiError::BadRequest)?
        .unwrap_or_default();
    let parent = params
        .parent
        .as_deref()
        .map(|parent| {
            DeviceId::parse(parent)
                .map_err(|e| ApiError::BadRequest(format!("parent {parent:?}: {e}")))
        })
        .transpose()?;
    let mut devices = state
        .store
        .devices(&DeviceQuery {
            status: params.status,
            prefix: params.prefix,
            after,
            labels,
            parent,
            limit: limit + 1,
        })
        .await?;
    let next_cursor = next_page(&mut devices, limit, |d| d.device_id.to_string());
    let now = state.clock.now();
    let silences = state.store.silences(now).await?;
    Ok(Json(DeviceList {
        devices: devices
            .into_iter()
            .map(|device| DeviceView::new(device, &silences, now))
            .collect(),
        next_cursor,
    }))
}

/// One device.
#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices",
    params(("id" = String, Path, description = "Device id", pattern = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$", max_length = 128)),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The device", body = DeviceView),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 422, description = "Not a valid device id", body = ErrorBody),
        (status = 503, description = "Database not answering", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    let id = device_id(&id)?;
    let device = state
        .store
        .device(&id)
        .await?
        .ok_or(StoreError::NotFound(id))?;
    let now = state.clock.now();
    let silences = state.store.silences(now).await?;
    Ok(Json(DeviceView::new(device, &silences, now)))
}

/// Replace a device's labels (its heartbeats' `labels` set keys again as they arrive).
#[utoipa::path(put, path = "/api/v1/devices/{id}/labels", tag = "devices",
    params(("id" = String, Path, description = "Device id", pattern = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$", max_length = 128)),
    request_body = Labels,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The device, with its new labels", body = Device),
        (status = 400, description = "Body is not JSON", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Not a valid device id, or labels out of bounds", body = ErrorBody),
        (status = 503, description = "Database not answering", body = ErrorBody),
    ))]
pub async fn set_labels(
    State(state): State<HttpState>,
    Path(id): Path<String>,
    body: Result<Json<Labels>, JsonRejection>,
) -> Result<Json<Device>, ApiError> {
    let id = device_id(&id)?;
    let Json(labels) = body.map_err(from_rejection)?;
    Ok(Json(state.store.set_labels(&id, &labels).await?))
}

/// A change to a device. Fields left out stay as they are.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceChange {
    /// The device's own `offline_after`: whole seconds, minutes or hours from 1 s to
    /// 30 days (`"20s"`, `"10m"`, `"2h"`), first in the order a deadline is chosen
    /// by; `null` clears it.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, example = "20s", pattern = r"^(([1-9][0-9]{0,5}|1[0-9]{6}|2[0-4][0-9]{5}|25[0-8][0-9]{4}|259[01][0-9]{3}|2592000)s|([1-9][0-9]{0,3}|[1-3][0-9]{4}|4[0-2][0-9]{3}|43[01][0-9]{2}|43200)m|([1-9][0-9]?|[1-6][0-9]{2}|7[01][0-9]|720)h)$")]
    offline_after: Option<Option<String>>,
    /// The device this one is reached through (a gateway's id; not the device
    /// itself); `null` clears it. Its next heartbeat that names a `parent` sets it
    /// again.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, example = "gw-1", pattern = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$", max_length = 128)]
    parent: Option<Option<String>>,
}

/// A field that is present, `null` included: `Some(None)` for null, where a missing
/// field stays `None`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A request body that must be a JSON object: serde's derived code would also read a
/// struct from an array (`[null, null]` as a [`DeviceChange`] naming both fields),
/// which the document does not allow.
#[derive(Debug)]
pub struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{MapAccess, Visitor, value::MapAccessDeserializer};

        struct ObjectOnly<T>(std::marker::PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectOnly<T> {
            type Value = T;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }

        d.deserialize_map(ObjectOnly(std::marker::PhantomData))
            .map(Object)
    }
}

/// Change a device's own settings: its `offline_after`, which moves its pending
/// deadline at once, and its `parent`.
#[utoipa::path(patch, path = "/api/v1/devices/{id}", tag = "devices",
    params(("id" = String, Path, description = "Device id", pattern = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$", max_length = 128)),
    request_body = DeviceChange,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The device, changed", body = Device),
        (status = 400, description = "Body is not JSON", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Not a valid device id, an unknown field, a value out of range, or a parent that is not a device id or is the device itself", body = ErrorBody),
        (status = 503, description = "Database not answering", body = ErrorBody),
    ))]
pub async fn change(
    State(state): State<HttpState>,
    Path(id): Path<String>,
    body: Result<Json<Object<DeviceChange>>, JsonRejection>,
) -> Result<Json<Device>, ApiError> {
    let id = device_id(&id)?;
    let Json(Object(change)) = body.map_err(from_rejection)?;
    // Every value is checked before anything is written.
    let offline_after = change
        .offline_after
        .map(|set| {
            set.map(|text| {
                crate::deadline::parse_text(&text)
                    .map_err(|why| ApiError::Unprocessable(format!("offline_after {why}")))
            })
            .transpose()
        })
        .transpose()?;
    let parent = change
        .parent
        .map(|set| set.map(|text| parent_of(&id, &text)).transpose())
        .transpose()?;
    let mut changed = None;
    if let Some(offline_after) = offline_after {
        changed = Some(state.store.set_offline_after(&id, offline_after).await?);
    }
    if let Some(parent) = parent {
        changed = Some(state.store.set_parent(&id, parent.as_ref()).await?);
    }
    match changed {
        Some(device) => Ok(Json(device)),
        // Nothing named, nothing changed: the device as it is.
        None => state
            .store
            .device(&id)
            .await?
            .map(Json)
            .ok_or_else(|| StoreError::NotFound(id).into()),
    }
}

/// `text` as the parent of `id`: a device id, and not `id` itself.
fn parent_of(id: &DeviceId, text: &str) -> Result<DeviceId, ApiError> {
    let parent = DeviceId::parse(text)
        .map_err(|e| ApiError::Unprocessable(format!("parent {text:?}: {e}")))?;
    if &parent == id {
        return Err(ApiError::Unprocessable(format!(
            "parent {text:?} is the device itself"
        )));
    }
    Ok(parent)
}

/// A device an operator expects.
#[derive(Debug, Deserialize, ToSchema)]
pub struct Registration {
    /// Letters, digits and `_ . : -`, starting with a letter or digit.
    #[schema(
        example = "pump-7",
        pattern = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$",
        max_length = 128
    )]
    device_id: String,
}

/// Register a device before it is heard from: status `provisioning`.
#[utoipa::path(post, path = "/api/v1/devices", tag = "devices", request_body = Registration,
    security(("api_key" = [])),
    responses(
        (status = 201, description = "Registered", body = Device),
        (status = 400, description = "Body is not JSON", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 403, description = "The hub holds devices.max_devices devices", body = ErrorBody),
        (status = 409, description = "The device already exists", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Not a valid device id, or a missing field", body = ErrorBody),
        (status = 503, description = "Database not answering", body = ErrorBody),
    ))]
pub async fn register(
    State(state): State<HttpState>,
    body: Result<Json<Registration>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(registration) = body.map_err(from_rejection)?;
    let id = device_id(&registration.device_id)?;
    let event = state
        .store
        .register(&id, state.clock.now(), state.max_devices)
        .await?;
    state.alerts.committed(std::slice::from_ref(&event));
    let device =
        state.store.device(&id).await?.ok_or_else(|| {
            ApiError::Internal(format!("device {id} vanished after registration"))
        })?;
    let mut headers = HeaderMap::new();
    if let Ok(location) = HeaderValue::from_str(&format!("/api/v1/devices/{id}")) {
        headers.insert(header::LOCATION, location);
    }
    Ok((StatusCode::CREATED, headers, Json(device)))
}

/// Forget a device and its history; its retained status is cleared.
#[utoipa::path(delete, path = "/api/v1/devices/{id}", tag = "devices",
    params(("id" = String, Path, description = "Device id", pattern = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$", max_length = 128)),
    security(("api_key" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 422, description = "Not a valid device id", body = ErrorBody),
        (status = 503, description = "Database not answering", body = ErrorBody),
    ))]
pub async fn delete(
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = device_id(&id)?;
    state.store.delete(&id, state.clock.now()).await?;
    state.alerts.deleted(id);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryParams {
    /// `next_cursor` of the previous page.
    cursor: Option<i64>,
    /// Events per page (1 to 1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// A page of a device's transitions, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    events: Vec<StatusEvent>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<i64>,
}

/// A device's transition history, newest first.
#[utoipa::path(get, path = "/api/v1/devices/{id}/events", tag = "devices",
    params(("id" = String, Path, description = "Device id", pattern = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$", max_length = 128), HistoryParams),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "A page of events", body = EventList),
        (status = 400, description = "Bad query parameter", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 422, description = "Not a valid device id", body = ErrorBody),
        (status = 503, description = "Database not answering", body = ErrorBody),
    ))]
pub async fn events(
    State(state): State<HttpState>,
    Path(id): Path<String>,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> Result<Json<EventList>, ApiError> {
    let id = device_id(&id)?;
    let Query(params) = params.map_err(from_rejection)?;
    let limit = limit(params.limit)?;
    let mut page = state.store.events(&id, params.cursor, limit + 1).await?;
    // Every device has at least its registration event, so only an empty page needs
    // to ask whether the device exists.
    if page.is_empty() && state.store.device(&id).await?.is_none() {
        return Err(StoreError::NotFound(id).into());
    }
    let next_cursor = next_page(&mut page, limit, |e| e.seq);
    Ok(Json(EventList {
        events: page.into_iter().map(|stored| stored.event).collect(),
        next_cursor,
    }))
}

/// Device counts.
#[derive(Debug, Serialize, ToSchema)]
pub struct FleetSummary {
    #[serde(flatten)]
    by_status: Summary,
    total: u64,
}

/// How many devices are in each status.
#[utoipa::path(get, path = "/api/v1/summary", tag = "devices",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Counts per status", body = FleetSummary),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 503, description = "Database not answering", body = ErrorBody),
    ))]
pub async fn summary(State(state): State<HttpState>) -> Result<Json<FleetSummary>, ApiError> {
    let by_status = state.store.summary().await?;
    Ok(Json(FleetSummary {
        total: by_status.total(),
        by_status,
    }))
}

/// The answer to an HTTP heartbeat.
#[derive(Debug, Serialize, ToSchema)]
pub struct HeartbeatAck {
    #[schema(example = "ok")]
    status: &'static str,
    /// True when this heartbeat registered a device the hub had never heard of.
    registered: bool,
    /// Reserved for commands to the device; always empty for now.
    pending_commands: Vec<serde_json::Value>,
}

impl HeartbeatAck {
    /// The answer, serialised once per process for each value of `registered`: every
    /// heartbeat gets one of two fixed bodies, so none is rendered per request.
    fn response(registered: bool) -> impl IntoResponse {
        static BODIES: std::sync::LazyLock<[Bytes; 2]> = std::sync::LazyLock::new(|| {
            [false, true].map(|registered| {
                let ack = HeartbeatAck {
                    status: "ok",
                    registered,
                    pending_commands: Vec::new(),
                };
                // A struct of plain fields serialises without fail.
                Bytes::from(serde_json::to_vec(&ack).unwrap_or_default())
            })
        });
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            BODIES[usize::from(registered)].clone(),
        )
    }
}

/// A heartbeat over HTTP: the MQTT payload, the same handling, the same events.
#[utoipa::path(post, path = "/api/v1/devices/{id}/heartbeat", tag = "devices",
    params(("id" = String, Path, description = "Device id", pattern = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$", max_length = 128)),
    request_body(content = crate::heartbeat::HeartbeatPayload, description = "The heartbeat payload of the MQTT interface (all fields optional, unknown ones ignored, at most 8 levels deep; an empty body is a bare heartbeat)", content_type = "application/json"),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Committed", body = HeartbeatAck),
        (status = 400, description = "The body is not JSON: not UTF-8, or a syntax error", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 403, description = "A new device while the hub holds devices.max_devices", body = ErrorBody),
        (status = 404, description = "An unknown device while devices.auto_register is off", body = ErrorBody),
        (status = 413, description = "Payload over the limit", body = ErrorBody),
        (status = 422, description = "Not a valid device id, or JSON that is not a heartbeat: not an object, nested too deep, a field of the wrong type or over its limit, a parent that is the device itself", body = ErrorBody),
        (status = 429, description = "A new device beyond devices.registration_rate; Retry-After says when to try again", body = ErrorBody),
        (status = 503, description = "Not committed (the database is failing) or not within http.request_timeout", body = ErrorBody),
    ))]
pub async fn heartbeat(
    State(state): State<HttpState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let id = device_id(&id)?;
    let body = body.map_err(from_rejection)?;
    let heartbeat = payload::parse_from(&id, &body, state.max_payload).map_err(|e| {
        state.metrics.reject(e.reason());
        // One rule: 400 when the body is not JSON at all, 422 when it is JSON but not
        // a heartbeat.
        match e {
            PayloadError::TooLarge { .. } => ApiError::PayloadTooLarge(e.to_string()),
            PayloadError::InvalidUtf8 | PayloadError::Malformed(_) => {
                ApiError::BadRequest(e.to_string())
            }
            PayloadError::NotAnObject
            | PayloadError::TooDeep
            | PayloadError::InvalidField(_)
            | PayloadError::OverLimit(_)
            | PayloadError::OwnParent(_) => ApiError::Unprocessable(e.to_string()),
        }
    })?;
    state.metrics.http_heartbeats_received.fetch_add(1, Relaxed);
    let (receipt, committed) = oneshot::channel();
    let message = Inbound::Heartbeat {
        device: id.clone(),
        at: state.clock.now(),
        heartbeat: Box::new(heartbeat),
        receipt: Some(receipt),
    };
    // Both waits are bounded by `http.request_timeout` (a layer around every route):
    // for room in a full queue, and for the commit.
    let stopping = || ApiError::Unavailable("the hub is shutting down".into());
    let queue = state.queue.upgrade().ok_or_else(stopping)?;
    queue.send(message).await.map_err(|_| stopping())?;
    drop(queue);
    let registered = match committed.await {
        Ok(Ok(Outcome::Committed { registered })) => registered,
        Ok(Ok(Outcome::Refused(refusal, retry))) => return Err(refused(&id, refusal, retry)),
        Ok(Err(FlushError::Store(error))) => {
            return Err(ApiError::Unavailable(format!(
                "the heartbeat is not committed yet ({error}); the hub holds it and retries"
            )));
        }
        Ok(Err(FlushError::Stopped)) | Err(_) => return Err(stopping()),
    };
    Ok(HeartbeatAck::response(registered))
}

/// The answer to a heartbeat from a device the registration policy would not register.
fn refused(id: &DeviceId, refusal: Refusal, retry: Option<std::time::Duration>) -> ApiError {
    match refusal {
        Refusal::NotRegistered => ApiError::NotFound(format!(
            "device {id} is not registered and devices.auto_register is off; \
             register it with POST /api/v1/devices"
        )),
        Refusal::DeviceLimit => ApiError::Forbidden(format!(
            "device {id} is new and the hub holds devices.max_devices devices"
        )),
        Refusal::RateLimited => ApiError::TooManyRequests {
            message: format!(
                "device {id} is new and too many devices registered just now \
                 (devices.registration_rate); send it again after Retry-After seconds"
            ),
            retry_after: retry.map_or(1, |wait| wait.as_secs_f64().ceil().max(1.0) as u64),
        },
    }
}
