//! The HTTP side of the hub (interface.md section 8): the JSON API under `/api/v1`
//! behind bearer keys, `/healthz` and `/metrics` for operations, and the dashboard at
//! `/`. Every route is registered through utoipa's router, so the OpenAPI document at
//! `/api/v1/openapi.json` is generated from the same list the server answers.

mod auth;
mod credentials;
mod dashboard;
mod devices;
mod error;
mod live;
mod ops;
mod server;
mod silences;
mod sinks;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use bytes::Bytes;
use std::time::Duration;

use axum::BoxError;
use axum::error_handling::HandleErrorLayer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::classify::StatusInRangeAsFailures;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::{ApiError, ErrorBody};
pub use server::{ConnectionLimits, bind, serve};

use crate::alerts::AlertChannel;
use crate::clock::Clock;
use crate::config::Secret;
use crate::health::Health;
use crate::heartbeat::Inbound;
use crate::metrics::Metrics;
use crate::storage::Store;

/// What every handler can reach.
#[derive(Clone)]
pub struct HttpState {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    /// The heartbeat handler's queue, for HTTP heartbeats. Weak: an open connection
    /// must not keep the queue open once the hub is stopping.
    pub queue: mpsc::WeakSender<Inbound>,
    pub alerts: AlertChannel,
    /// Accepted API keys; empty means no authentication (loopback only).
    pub keys: Arc<[Secret]>,
    pub max_payload: usize,
    /// `devices.max_devices`, for registrations through the API.
    pub max_devices: Option<u64>,
    pub health: Arc<Health>,
    pub sinks: Arc<crate::notify::Sinks>,
    /// Cancelled at shutdown, so open event streams end.
    pub closing: CancellationToken,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "fleetwatch",
        description = "Device fleet status over HTTP. The MQTT side is described in docs/interface.md."
    ),
    modifiers(&BearerKey),
    tags(
        (name = "devices", description = "The fleet: devices, history, heartbeats, live updates"),
        (name = "notifications", description = "Sinks that tell people: webhook, Telegram, Slack"),
        (name = "silences", description = "Maintenance windows: devices whose notifications are held"),
        (name = "operations", description = "Health, metrics, the dashboard")
    )
)]
struct ApiDoc;

struct BearerKey;

impl utoipa::Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// What a request may take.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Requests in progress at once, probes excepted; more are answered 503 at once.
    pub max_requests: usize,
    /// A request not answered within this is answered 503.
    pub timeout: Duration,
}

/// The router, serving (at `/api/v1/openapi.json`) the OpenAPI document describing it.
pub fn router(state: HttpState, limits: RequestLimits) -> Router {
    // Shed load rather than queue it: a client told 503 at once can retry elsewhere;
    // one left waiting holds a connection. Probes are exempt, so an orchestrator sees
    // a busy hub as busy, not dead.
    // One semaphore for every route: axum applies a layer to each route separately.
    let in_progress = Arc::new(tokio::sync::Semaphore::new(limits.max_requests.max(1)));
    let limited = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(overloaded))
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::with_semaphore(in_progress))
        .timeout(limits.timeout);
    let probes_timeout = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(overloaded))
        .timeout(limits.timeout);
    let api = OpenApiRouter::new()
        .routes(routes!(devices::list, devices::register))
        .routes(routes!(devices::get, devices::delete, devices::change))
        .routes(routes!(devices::events))
        .routes(routes!(devices::set_labels))
        .routes(routes!(devices::heartbeat))
        .routes(routes!(credentials::issue, credentials::revoke))
        .routes(routes!(devices::summary))
        .routes(routes!(live::stream))
        .routes(routes!(sinks::list))
        .routes(routes!(sinks::change))
        .routes(routes!(sinks::test))
        .routes(routes!(sinks::dead_letters))
        .routes(routes!(sinks::retry))
        .routes(routes!(sinks::drop_dead))
        .routes(routes!(silences::create, silences::list))
        .routes(routes!(silences::expire))
        .routes(routes!(openapi_json))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .layer(limited.clone());
    let public = OpenApiRouter::new()
        .routes(routes!(ops::metrics))
        .routes(routes!(dashboard::page))
        .layer(limited);
    let probes = OpenApiRouter::new()
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::livez))
        .layer(probes_timeout);
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(api)
        .merge(public)
        .merge(probes)
        .split_for_parts();
    let mut doc = doc;
    optional_heartbeat_body(&mut doc);
    // Rendered once: the document is fixed for the life of the process.
    let doc = OpenApiJson(Bytes::from(
        serde_json::to_vec(&doc).expect("the OpenAPI document serialises"),
    ));
    let max_body = state.max_payload;
    router
        .fallback(not_found)
        .layer(middleware::from_fn(json_method_not_allowed))
        .layer(Extension(doc))
        .layer(DefaultBodyLimit::max(max_body))
        // 503 is an answer the hub gives on purpose (a probe saying "not now", a
        // heartbeat not yet committed) and the cause is logged where it happens; as
        // a failure the trace layer would log every probe during an outage at ERROR.
        .layer(TraceLayer::new(
            StatusInRangeAsFailures::new(500..=502).into_make_classifier(),
        ))
        .with_state(state)
}

/// An HTTP heartbeat's body is an object or nothing at all (a bare heartbeat), but
/// never JSON `null`; utoipa can only say "not required" by making the schema
/// nullable, so the flag is set here.
fn optional_heartbeat_body(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::Required;
    let body = doc
        .paths
        .paths
        .get_mut("/api/v1/devices/{id}/heartbeat")
        .and_then(|item| item.post.as_mut())
        .and_then(|operation| operation.request_body.as_mut());
    if let Some(body) = body {
        body.required = Some(Required::False);
    }
}

/// The OpenAPI document as served.
#[derive(Clone)]
struct OpenApiJson(Bytes);

/// A request the limits turned away: over the concurrency cap, or past its timeout.
async fn overloaded(error: BoxError) -> ApiError {
    if error.is::<tower::load_shed::error::Overloaded>() {
        ApiError::Unavailable(
            "too many requests in progress (http.max_requests); try again shortly".into(),
        )
    } else if error.is::<tower::timeout::error::Elapsed>() {
        ApiError::Unavailable("no answer within http.request_timeout".into())
    } else {
        ApiError::Internal(error.to_string())
    }
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "operations",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
    ))]
async fn openapi_json(Extension(OpenApiJson(doc)): Extension<OpenApiJson>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], doc)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

/// axum answers a wrong method with an empty 405; give it the JSON body every other
/// error has.
async fn json_method_not_allowed(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let response = next.run(request).await;
    if response.status() == StatusCode::METHOD_NOT_ALLOWED {
        let mut json =
            ApiError::MethodNotAllowed(format!("{method} is not allowed here")).into_response();
        if let Some(allow) = response.headers().get(axum::http::header::ALLOW) {
            json.headers_mut()
                .insert(axum::http::header::ALLOW, allow.clone());
        }
        return json;
    }
    response
}
