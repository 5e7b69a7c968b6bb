//! For operations: `/healthz` (is the hub able to do its job right now?) and
//! `/metrics` (Prometheus). Neither needs an API key.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use tokio::sync::Mutex;
use tokio::time::Instant;
use utoipa::ToSchema;

use super::HttpState;
use crate::checker::Listening;
use crate::mqtt::broker;

/// How long a broker probe result is reused: health checks may come often.
const PROBE_CACHE: Duration = Duration::from_secs(1);
const DATABASE_TIMEOUT: Duration = Duration::from_secs(2);

/// What `/healthz` checks besides the database.
pub struct Health {
    /// The embedded broker, probed through a real MQTT round trip as `client_id`.
    embedded: Option<(SocketAddr, String)>,
    /// The hub's own subscription, for either kind of broker.
    listening: Listening,
    last_probe: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Health {
    pub fn new(embedded: Option<(SocketAddr, String)>, listening: Listening) -> Self {
        Self {
            embedded,
            listening,
            last_probe: Mutex::new(None),
        }
    }

    async fn broker(&self) -> Result<(), String> {
        if self.listening.borrow().is_none() {
            return Err("the hub is not subscribed to the broker".into());
        }
        let Some((addr, client_id)) = &self.embedded else {
            return Ok(());
        };
        // One probe at a time (they share a client id) and not more than once a second.
        let mut last = self.last_probe.lock().await;
        if let Some((at, result)) = last.as_ref()
            && at.elapsed() < PROBE_CACHE
        {
            return result.clone();
        }
        let result = broker::probe(*addr, client_id)
            .await
            .map_err(|e| format!("embedded broker: {e}"));
        *last = Some((Instant::now(), result.clone()));
        result
    }
}

/// The state of each part the hub needs.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthReport {
    /// `ok` or `unavailable`.
    #[schema(example = "ok")]
    status: &'static str,
    /// `ok`, or what is wrong with the database.
    #[schema(example = "ok")]
    database: String,
    /// `ok`, or what is wrong with the broker link.
    #[schema(example = "ok")]
    broker: String,
}

/// Healthy when the database answers and the broker link works.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses(
        (status = 200, description = "Every part works", body = HealthReport),
        (status = 503, description = "A part fails; the report names it", body = HealthReport),
    ))]
pub async fn healthz(State(state): State<HttpState>) -> (StatusCode, Json<HealthReport>) {
    let database = match tokio::time::timeout(DATABASE_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {DATABASE_TIMEOUT:?}")),
    };
    let broker = state.health.broker().await;
    let healthy = database.is_ok() && broker.is_ok();
    let describe = |part: Result<(), String>| part.err().unwrap_or_else(|| "ok".into());
    let report = HealthReport {
        status: if healthy { "ok" } else { "unavailable" },
        database: describe(database),
        broker: describe(broker),
    };
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report))
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
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&devices),
    )
}
