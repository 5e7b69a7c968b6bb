//! For operations, none of them behind an API key:
//!
//! - `/livez`: the process serves requests. For a liveness probe: restarting the hub
//!   fixes neither a full disk nor a broker outage, and loses what it holds.
//! - `/readyz`: the hub can take a heartbeat and commit it now. For a readiness probe
//!   or a load balancer in front of HTTP heartbeats.
//! - `/healthz`: every part, each named: database (answers and takes writes), broker
//!   (the hub hears devices), publisher (status events reach the broker). For
//!   monitoring and for people.
//! - `/metrics`: Prometheus.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use super::HttpState;

const DATABASE_TIMEOUT: Duration = Duration::from_secs(2);

/// The database answers a query within [`DATABASE_TIMEOUT`] and takes writes.
async fn database(state: &HttpState) -> Result<(), String> {
    match tokio::time::timeout(DATABASE_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => state.health.writes(),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {DATABASE_TIMEOUT:?}")),
    }
}

fn describe(part: &Result<(), String>) -> String {
    match part {
        Ok(()) => "ok".into(),
        Err(e) => e.clone(),
    }
}

/// The state of each part the hub needs.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthReport {
    /// `ok` or `unavailable`.
    #[schema(example = "ok")]
    status: &'static str,
    /// `ok`, or what is wrong with the database: not answering, writes failing, or
    /// heartbeats waiting too long to be committed.
    #[schema(example = "ok")]
    database: String,
    /// `ok`, or what is wrong with the broker link.
    #[schema(example = "ok")]
    broker: String,
    /// `ok`, or how long status events have waited for the broker.
    #[schema(example = "ok")]
    publisher: String,
}

/// Healthy when the database answers and takes writes, the hub hears the broker, and
/// status events reach it.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses(
        (status = 200, description = "Every part works", body = HealthReport),
        (status = 503, description = "A part fails; the report names it", body = HealthReport),
    ))]
pub async fn healthz(State(state): State<HttpState>) -> (StatusCode, Json<HealthReport>) {
    let database = database(&state).await;
    let broker = state.health.broker().await;
    let publisher = state.health.publisher();
    let healthy = database.is_ok() && broker.is_ok() && publisher.is_ok();
    let report = HealthReport {
        status: if healthy { "ok" } else { "unavailable" },
        database: describe(&database),
        broker: describe(&broker),
        publisher: describe(&publisher),
    };
    (status_code(healthy), Json(report))
}

/// Whether the hub can take and commit a heartbeat now.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ok` or `unavailable`.
    #[schema(example = "ok")]
    status: &'static str,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// Ready when the database answers and takes writes and the hub is not shutting down.
/// The broker is not part of it: HTTP heartbeats, the API and the dashboard work
/// without one.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Not ready; the reason says why", body = Readiness),
    ))]
pub async fn readyz(State(state): State<HttpState>) -> (StatusCode, Json<Readiness>) {
    let ready = if state.closing.is_cancelled() {
        Err("shutting down".to_string())
    } else {
        database(&state).await
    };
    let report = Readiness {
        status: if ready.is_ok() { "ok" } else { "unavailable" },
        reason: ready.as_ref().err().cloned(),
    };
    (status_code(ready.is_ok()), Json(report))
}

/// The process is alive and serving.
#[utoipa::path(get, path = "/livez", tag = "operations",
    responses((status = 200, description = "Alive", body = Readiness)))]
pub async fn livez() -> Json<Readiness> {
    Json(Readiness {
        status: "ok",
        reason: None,
    })
}

fn status_code(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Counters and histograms in the Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    let devices = match state.store.summary().await {
        Ok(summary) => summary,
        Err(e) => {
            tracing::warn!(error = %e, "metrics without device counts: the database did not answer");
            Default::default()
        }
    };
    let mut text = state.metrics.render(&devices);
    state.health.render_metrics(&mut text);
    state.sinks.render_metrics(&mut text).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}
