//! Bearer keys for `/api/v1/*`. Every configured key is compared in constant time,
//! all of them each time, so timing says nothing about which key nearly matched.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::HttpState;
use super::error::ApiError;

pub async fn require_key(State(state): State<HttpState>, request: Request, next: Next) -> Response {
    if state.keys.is_empty() {
        // No key configured: configuration only allows a loopback listener then.
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    let accepted = presented.is_some_and(|presented| {
        state.keys.iter().fold(false, |any, key| {
            any | same(key.expose().as_bytes(), presented.as_bytes())
        })
    });
    if accepted {
        next.run(request).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

/// Byte equality whose running time depends only on the lengths.
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn compares_bytes_and_lengths() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret2"));
        assert!(!same(b"", b"x"));
        assert!(same(b"", b""));
    }
}
