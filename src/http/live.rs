//! `/api/v1/stream`: status changes as server-sent events, for the dashboard and any
//! script that wants to follow the fleet without MQTT.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{Stream, StreamExt};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use super::HttpState;
use super::error::ErrorBody;
use crate::alerts::LiveUpdate;

/// One server-sent event as a client reads it (the schema of each event the stream
/// sends; the events themselves are written by axum's `Event`).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct StreamEvent {
    /// `status`, `deleted` or `resync`.
    event: Option<String>,
    /// JSON text: a status event, `{"device_id": ...}`, or `{}`.
    data: Option<String>,
}

/// Follow status changes: events `status` (a status event), `deleted`
/// (`{"device_id": ...}`) and `resync` (updates were missed: reload).
#[utoipa::path(get, path = "/api/v1/stream", tag = "devices",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Server-sent events", content_type = "text/event-stream", body = StreamEvent),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
    ))]
pub async fn stream(
    State(state): State<HttpState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let closing = state.closing.clone();
    let updates = BroadcastStream::new(state.alerts.live())
        .map(|update| Ok(event(update)))
        // A stream never ends by itself; it must for the server to shut down.
        .take_until(async move { closing.cancelled().await });
    Sse::new(updates).keep_alive(KeepAlive::default())
}

fn event(update: Result<LiveUpdate, BroadcastStreamRecvError>) -> Event {
    match update {
        Ok(LiveUpdate::Status(status)) => Event::default()
            .event("status")
            // Serializing plain fields cannot fail.
            .data(serde_json::to_string(&status).unwrap_or_default()),
        Ok(LiveUpdate::Deleted(device)) => Event::default()
            .event("deleted")
            .data(serde_json::json!({ "device_id": device }).to_string()),
        Err(BroadcastStreamRecvError::Lagged(missed)) => Event::default()
            .event("resync")
            .data(serde_json::json!({ "missed": missed }).to_string()),
    }
}
