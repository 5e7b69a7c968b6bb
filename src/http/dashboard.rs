//! The dashboard: one page, built into the binary, no build step. It reads the same
//! API as everyone else and follows `/api/v1/stream` for live changes.

use axum::http::header;
use axum::response::{Html, IntoResponse};

const PAGE: &str = include_str!("dashboard.html");

/// The live fleet dashboard.
#[utoipa::path(get, path = "/", tag = "operations",
    responses((status = 200, description = "The dashboard page", content_type = "text/html", body = String)))]
pub async fn page() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-cache")], Html(PAGE))
}
